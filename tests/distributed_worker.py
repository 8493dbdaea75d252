"""Code that runs inside the processes spawned by ``test_sync_batch_norm.py`` (not a test
module: pytest does not collect it).

Every rank joins one gloo process group on loopback and runs every case below in order, in
the same group. Each rank builds the same global batch (same seed everywhere), takes its own
rows, runs ``normlab.SyncBatchNorm`` on them, and compares the result with a single-process
``normlab.BatchNorm`` (and ``torch.nn.BatchNorm*d`` where there is no mask) run on the
concatenation of all ranks' rows. Results (max abs differences, flags, error messages) are
written after every case to ``<out_dir>/rank<r>.json``; the tests read and assert on them.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import time
import traceback
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import normlab

TIMEOUT = datetime.timedelta(seconds=60)

# Every collective a synchronizing implementation could use; replaced by functions that
# raise inside ``collectives_forbidden``.
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "gather",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
)


@dataclass
class Case:
    """One comparison of SyncBatchNorm against single-process BatchNorm.

    ``sizes``: rows per world rank. ``tail``: the input shape without the batch axis.
    ``lengths``: per rank, one length per row (then the input has one sequence axis).
    ``mask``: "full" (a random bool mask shaped like the input without the channel axis) or
    "broadcast" (size 1 on every axis but the batch and the last one)."""

    name: str
    sizes: tuple[int, ...]
    tail: tuple[int, ...]
    dim: int = 1
    dtype: str = "float64"
    steps: int = 3
    lengths: tuple[tuple[int, ...], ...] | None = None
    mask: str | None = None
    module: dict = field(default_factory=dict)
    functional: bool = False
    nan_padding: bool = False  # x = NaN and dy = 0 at padded positions (needs lengths)
    offset: float = 0.0
    atol: float | None = None  # looser than tests/tolerances.py (large offsets only)

    @property
    def torch_ref(self) -> bool:
        return self.lengths is None and self.mask is None


def compare_cases(world_size: int) -> list[Case]:
    """The comparison cases, by world size (the same names for 2 and 3 processes)."""
    two = world_size == 2

    def per_rank(for_two, for_three):
        return tuple(for_two if two else for_three)

    return [
        Case("equal", per_rank([6, 6], [4, 4, 4]), (3, 5)),
        Case("equal-2d", per_rank([8, 8], [5, 5, 5]), (4,)),
        Case("uneven", per_rank([16, 8], [7, 2, 4]), (3, 4)),
        Case("one-empty-rank", per_rank([0, 6], [5, 0, 3]), (3, 4)),
        Case(
            "lengths-fully-padded-rank",
            per_rank([4, 3], [4, 3, 2]),
            (3, 7),
            lengths=per_rank([(5, 3, 7, 1), (0, 0, 0)], [(7, 2, 4, 6), (0, 0, 0), (3, 7)]),
        ),
        Case(
            "lengths-empty-rank",
            per_rank([0, 4], [3, 0, 4]),
            (2, 6),
            lengths=per_rank([(), (6, 2, 0, 5)], [(1, 6, 4), (), (0, 3, 6, 2)]),
        ),
        Case("blc-dim-last", per_rank([5, 9], [6, 1, 3]), (4, 3), dim=-1),
        Case(
            "blc-dim-last-lengths",
            per_rank([3, 4], [3, 4, 2]),
            (6, 3),
            dim=-1,
            lengths=per_rank([(0, 0, 0), (6, 1, 3, 5)], [(2, 6, 4), (1, 0, 5, 6), (0, 0)]),
        ),
        Case("mask-4d", per_rank([3, 2], [2, 3, 1]), (3, 4, 5), mask="full"),
        Case("mask-broadcast-4d", per_rank([2, 3], [2, 1, 3]), (2, 3, 4), mask="broadcast"),
        Case("float32", per_rank([12, 5], [6, 3, 8]), (3, 4), dtype="float32"),
        Case(
            "no-affine-momentum-none-2d-mask",
            per_rank([9, 6], [5, 4, 6]),
            (3,),
            mask="full",
            module={"affine": False, "momentum": None},
            steps=4,
        ),
        Case(
            "no-bias-untracked",
            per_rank([6, 4], [3, 4, 5]),
            (3, 4),
            module={"bias": False, "track_running_stats": False},
        ),
        Case(
            "momentum-eps",
            per_rank([7, 3], [2, 6, 3]),
            (2, 3),
            module={"momentum": 0.3, "eps": 1e-3},
        ),
        Case(
            "functional-lengths",
            per_rank([3, 3], [2, 3, 2]),
            (3, 5),
            lengths=per_rank([(5, 0, 2), (4, 4, 1)], [(5, 0), (1, 2, 3), (0, 5)]),
            functional=True,
        ),
        Case(
            "nan-padding-lengths",
            per_rank([3, 4], [3, 2, 3]),
            (5, 2),
            dim=-1,
            lengths=per_rank([(5, 0, 2), (0, 0, 0, 0)], [(5, 0, 2), (0, 0), (1, 4, 3)]),
            nan_padding=True,
        ),
        Case("large-offset", per_rank([20, 11], [9, 13, 7]), (2,), offset=1e8, atol=1e-6),
    ]


# --------------------------------------------------------------------------------------------
# Helpers


def maxdiff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Max abs difference (inf if exactly one is None or the shapes differ, 0 if empty)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    diff = torch.where(a.isnan() & b.isnan(), 0.0, (a - b).abs())  # NaN in only one: NaN
    return float(diff.max())


def bitwise_equal_on_group(t: torch.Tensor | None, group=None) -> bool:
    """Whether ``t`` is bitwise the same tensor on every rank of ``group``."""
    if t is None:
        return True
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, t.detach().contiguous(), group=group)
    return all(torch.equal(gathered[0], g) for g in gathered)


def summed_over_group(t: torch.Tensor, group=None) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


@contextlib.contextmanager
def collectives_forbidden():
    """Every torch.distributed collective raises (and is recorded in the yielded list)."""
    calls: list[str] = []

    def forbidden(name):
        def collective(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"collective torch.distributed.{name} called")

        return collective

    saved = []
    for module in (dist, dist.distributed_c10d):
        for name in COLLECTIVES:
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, forbidden(name))
    try:
        yield calls
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# Global batches


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def channel_axis(case: Case) -> int:
    return case.dim % (1 + len(case.tail))


def num_channels(case: Case) -> int:
    return case.tail[channel_axis(case) - 1]


def global_batch(case: Case, step: int):
    """(x, dy, mask kwargs) of the concatenated batch of all world ranks, the same on every
    rank. ``x`` is float64 then cast, so every dtype sees the same values."""
    seed = zlib.crc32(case.name.encode()) + 7919 * step
    g = torch.Generator().manual_seed(seed)
    shape = (sum(case.sizes), *case.tail)
    ch = channel_axis(case)
    bshape = [1] * len(shape)
    bshape[ch] = shape[ch]
    center = (torch.randn(shape[ch], generator=g, dtype=torch.float64) * 3).reshape(bshape)
    scale = (torch.rand(shape[ch], generator=g, dtype=torch.float64) + 0.5).reshape(bshape)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + center + case.offset
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    dtype = _dtype(case.dtype)
    masks = {}
    if case.lengths is not None:
        masks["lengths"] = torch.tensor(
            [n for rank_lengths in case.lengths for n in rank_lengths], dtype=torch.long
        )
        if case.nan_padding:  # padding holds garbage, and a loss that ignores it
            sequence_axis = 3 - ch  # (B, C, L) or (B, L, C)
            real = normlab.lengths_to_mask(masks["lengths"], shape[sequence_axis])
            real = real.unsqueeze(ch)
            x = x.masked_fill(~real, float("nan"))
            dy = dy.masked_fill(~real, 0.0)
    elif case.mask is not None:
        mshape = [n for d, n in enumerate(shape) if d != ch]
        if case.mask == "broadcast":
            mshape = [n if d in (0, len(mshape) - 1) else 1 for d, n in enumerate(mshape)]
        masks["mask"] = torch.rand(mshape, generator=g) < 0.6
    return x.to(dtype), dy.to(dtype), masks


def rows(rank: int, sizes, members) -> slice:
    """The rows of world rank ``rank`` in the concatenation of the members' batches."""
    start = sum(sizes[m] for m in members[: members.index(rank)])
    return slice(start, start + sizes[rank])


def world_rows(rank: int, sizes) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def members_batch(t: torch.Tensor, sizes, members) -> torch.Tensor:
    return torch.cat([t[world_rows(m, sizes)] for m in members])


def select_masks(masks: dict, index) -> dict:
    return {k: index(v) for k, v in masks.items()}


def torch_batch_norm_class(ndim: int):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]


def init_affine(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
        if module.bias is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=g))


# --------------------------------------------------------------------------------------------
# Cases


def run_compare(case: Case, rank: int, world_size: int, process_group=None, members=None):
    """SyncBatchNorm on this rank's rows vs BatchNorm (and torch) on the members' rows."""
    members = list(range(world_size)) if members is None else list(members)
    dtype = _dtype(case.dtype)
    c = num_channels(case)
    options = {"eps": 1e-5, "momentum": 0.1, **case.module}
    sync = normlab.SyncBatchNorm(
        c, process_group=process_group, dtype=dtype, dim=case.dim, **options
    )
    init_affine(sync, zlib.crc32(case.name.encode()))
    ref = normlab.BatchNorm(c, dtype=dtype, dim=case.dim, **options)
    ref.load_state_dict(sync.state_dict())
    ndim = 1 + len(case.tail)
    torch_ref = None
    if case.torch_ref:
        torch_ref = torch_batch_norm_class(ndim)(c, dtype=dtype, **options)
        torch_ref.load_state_dict(sync.state_dict())
    move = channel_axis(case) != 1  # torch wants channels at axis 1

    if case.functional:  # the same computation through normlab.distributed.sync_batch_norm
        state = {
            "running_mean": sync.running_mean.clone(),
            "running_var": sync.running_var.clone(),
        }

        def run_sync(x, **kw):
            return normlab.distributed.sync_batch_norm(
                x,
                state["running_mean"],
                state["running_var"],
                sync.weight,
                sync.bias,
                options["momentum"],
                options["eps"],
                case.dim,
                process_group=process_group,
                **kw,
            )

        def run_ref(x, **kw):
            return normlab.functional.batch_norm(
                x,
                ref.running_mean,
                ref.running_var,
                ref.weight,
                ref.bias,
                True,
                options["momentum"],
                options["eps"],
                case.dim,
                **kw,
            )

        def sync_buffers():
            return state["running_mean"], state["running_var"], None

    else:
        run_sync, run_ref = sync, ref

        def sync_buffers():
            return sync.running_mean, sync.running_var, sync.num_batches_tracked

    record = {"steps": [], "running_identical": True, "grad_none": False}
    for step in range(case.steps):
        xg, dyg, masks = global_batch(case, step)
        own = rows(rank, case.sizes, members)
        x_members = members_batch(xg, case.sizes, members)
        dy_members = members_batch(dyg, case.sizes, members)
        masks_members = select_masks(masks, lambda t: members_batch(t, case.sizes, members))
        masks_own = select_masks(masks, lambda t: t[world_rows(rank, case.sizes)])

        x = xg[world_rows(rank, case.sizes)].clone().requires_grad_()
        y = run_sync(x, **masks_own)
        (y * dyg[world_rows(rank, case.sizes)]).sum().backward()

        xr = x_members.clone().requires_grad_()
        yr = run_ref(xr, **masks_members)
        (yr * dy_members).sum().backward()

        result = {"y": maxdiff(y, yr[own]), "dx": maxdiff(x.grad, xr.grad[own])}
        finite = [x.grad, *(t for t in sync_buffers()[:2] if t is not None)]
        for name in ("weight", "bias"):
            p, pr = getattr(sync, name), getattr(ref, name)
            if p is None:
                result["d" + name] = maxdiff(None, pr)
                continue
            grad = p.grad
            if grad is None:  # still join the all_reduce so the group stays in step
                record["grad_none"] = True
                grad = torch.zeros_like(p)
            reduced = summed_over_group(grad, process_group)
            result["d" + name] = maxdiff(reduced, pr.grad)
            finite.append(reduced)
        result["finite"] = all(bool(torch.isfinite(t).all()) for t in finite)
        running_mean, running_var, nbt = sync_buffers()
        result["running_mean"] = maxdiff(running_mean, ref.running_mean)
        result["running_var"] = maxdiff(running_var, ref.running_var)
        result["nbt_equal"] = nbt is None or torch.equal(nbt, ref.num_batches_tracked)
        result["nbt"] = None if nbt is None else int(nbt)
        for t in (running_mean, running_var, nbt):
            record["running_identical"] &= bitwise_equal_on_group(t, process_group)

        if torch_ref is not None:
            xt = (x_members.movedim(channel_axis(case), 1) if move else x_members).clone()
            xt.requires_grad_()
            yt = torch_ref(xt)
            dyt = dy_members.movedim(channel_axis(case), 1) if move else dy_members
            (yt * dyt).sum().backward()
            yt_back = yt.movedim(1, channel_axis(case)) if move else yt
            dxt = xt.grad.movedim(1, channel_axis(case)) if move else xt.grad
            result["torch_y"] = maxdiff(y, yt_back[own])
            result["torch_dx"] = maxdiff(x.grad, dxt[own])
            for name in ("weight", "bias"):
                p, pt = getattr(sync, name), getattr(torch_ref, name)
                if p is not None and pt is not None:
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                    result["torch_d" + name] = maxdiff(
                        summed_over_group(grad, process_group), pt.grad
                    )
            result["torch_running_mean"] = maxdiff(running_mean, torch_ref.running_mean)
            result["torch_running_var"] = maxdiff(running_var, torch_ref.running_var)
            torch_ref.zero_grad(set_to_none=True)
        sync.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        record["steps"].append(result)
    return record


def run_count_one(rank: int, world_size: int, masked: bool, real: int = 1):
    """A global batch with ``real`` (1, or 0 with a mask) real values per channel: rank 0
    holds it, the others hold nothing (no rows, or only fully padded rows). Single-process
    BatchNorm refuses such a batch; SyncBatchNorm must raise ValueError on every rank."""
    c = 3
    sync = normlab.SyncBatchNorm(c, dtype=torch.float64)
    ref = normlab.BatchNorm(c, dtype=torch.float64)
    if masked:
        lengths = torch.tensor([real, 0] if rank == 0 else [0, 0, 0])
        x = torch.randn(len(lengths), c, 4, dtype=torch.float64)
        kw = {"lengths": lengths}
        xg = torch.randn(4, c, 4, dtype=torch.float64)
        kwg = {"lengths": torch.tensor([real, 0, 0, 0])}
    else:
        x = torch.randn(1 if rank == 0 else 0, c, dtype=torch.float64)
        kw = {}
        xg, kwg = torch.randn(1, c, dtype=torch.float64), {}
    record = {"sync_error": None, "ref_error": None}
    try:
        sync(x.requires_grad_(), **kw)
    except Exception as exc:
        record["sync_error"] = error_text(exc)
    try:
        ref(xg, **kwg)
    except Exception as exc:
        record["ref_error"] = error_text(exc)
    # the group is usable afterwards: a plain collective still completes
    ones = torch.ones(2)
    dist.all_reduce(ones)
    record["all_reduce_after"] = ones.tolist()
    return record


def run_all_empty(rank: int, world_size: int):
    """Every rank has 0 rows (unmasked): single-process BatchNorm on the (empty) global
    batch returns an empty output and leaves the running statistics alone."""
    c = 3
    sync = normlab.SyncBatchNorm(c, dtype=torch.float64)
    ref = normlab.BatchNorm(c, dtype=torch.float64)
    record = {"sync_error": None, "ref_error": None}
    x = torch.randn(0, c, 4, dtype=torch.float64, requires_grad=True)
    try:
        y = sync(x)
        y.sum().backward()
        record["sync_shape"] = list(y.shape)
    except Exception as exc:
        record["sync_error"] = error_text(exc)
    try:
        yr = ref(torch.randn(0, c, 4, dtype=torch.float64))
        record["ref_shape"] = list(yr.shape)
    except Exception as exc:
        record["ref_error"] = error_text(exc)
    record["running_mean"] = maxdiff(sync.running_mean, ref.running_mean)
    record["running_var"] = maxdiff(sync.running_var, ref.running_var)
    return record


def _local_data(rank: int, rows_: int, c: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed + 101 * rank)
    x = torch.randn(rows_, c, length, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(rows_, c, length, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, length + 1, (rows_,), generator=g)
    lengths[0] = length
    return x, dy, lengths


def _exact_step(module, ref, x, dy, **kw):
    """Run both on the same local data; True iff outputs and all gradients are bitwise
    equal."""
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = module(xs, **kw), ref(xr, **kw)
    (y * dy).sum().backward()
    (yr * dy).sum().backward()
    same = torch.equal(y, yr) and torch.equal(xs.grad, xr.grad)
    for name in ("weight", "bias"):
        p, pr = getattr(module, name), getattr(ref, name)
        if p is not None:
            same = same and torch.equal(p.grad, pr.grad)
    module.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    return same


def _same_buffers(a: nn.Module, b: nn.Module) -> bool:
    ours, theirs = dict(a.named_buffers()), dict(b.named_buffers())
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def run_eval(rank: int, world_size: int):
    """After synchronized training, eval mode is plain BatchNorm on the local batch with the
    running statistics, and runs no collective (every rank has a different batch size)."""
    c, length = 3, 5
    sync = normlab.SyncBatchNorm(c, dtype=torch.float64)
    init_affine(sync, 5)
    for step in range(2):  # synchronized training: running statistics of the global batch
        x, dy, _ = _local_data(rank, 4, c, length, 10 + step)
        (sync(x) * dy).sum().backward()
    sync.zero_grad(set_to_none=True)
    sync.eval()
    ref = normlab.BatchNorm(c, dtype=torch.float64)
    ref.load_state_dict(sync.state_dict())
    ref.eval()
    torch_ref = nn.BatchNorm1d(c, dtype=torch.float64)
    torch_ref.load_state_dict(sync.state_dict())
    torch_ref.eval()
    untracked = normlab.SyncBatchNorm(c, track_running_stats=False, dtype=torch.float64).eval()
    untracked_ref = normlab.BatchNorm(c, track_running_stats=False, dtype=torch.float64).eval()
    record = {"error": None, "running_identical": bitwise_equal_on_group(sync.running_var)}
    record["trained_nbt"] = int(sync.num_batches_tracked)
    x, dy, lengths = _local_data(rank, 2 + rank, c, length, 99)
    with collectives_forbidden() as calls:
        try:
            record["exact"] = _exact_step(sync, ref, x, dy)
            record["exact_lengths"] = _exact_step(sync, ref, x, dy, lengths=lengths)
            record["exact_untracked"] = _exact_step(untracked, untracked_ref, x, dy)
            record["torch_y"] = maxdiff(sync(x), torch_ref(x))
            record["buffers_unchanged"] = _same_buffers(sync, ref)
        except Exception as exc:
            record["error"] = error_text(exc)
    record["collectives"] = list(calls)
    return record


def run_group_of_one(rank: int, world_size: int, own_group):
    """process_group of one process (world size > 1): plain BatchNorm on the local batch in
    training, bitwise, and no collective."""
    c, length = 3, 4
    sync = normlab.SyncBatchNorm(c, process_group=own_group, dtype=torch.float64, momentum=None)
    init_affine(sync, 7)
    ref = normlab.BatchNorm(c, dtype=torch.float64, momentum=None)
    ref.load_state_dict(sync.state_dict())
    record = {"error": None, "exact": [], "group_size": dist.get_world_size(own_group)}
    with collectives_forbidden() as calls:
        try:
            for step in range(3):
                x, dy, lengths = _local_data(rank, 3 + rank + step, c, length, 20 + step)
                record["exact"].append(_exact_step(sync, ref, x, dy))
                record["exact"].append(_exact_step(sync, ref, x, dy, lengths=lengths))
            record["buffers_equal"] = _same_buffers(sync, ref)
        except Exception as exc:
            record["error"] = error_text(exc)
    record["collectives"] = list(calls)
    return record


class _DimLastNet(nn.Module):
    """Linear -> (Sync)BatchNorm over the last axis -> ReLU -> Linear on (B, L, F)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.inp = nn.Linear(4, 6, dtype=torch.float64)
        self.norm = norm
        self.out = nn.Linear(6, 2, dtype=torch.float64)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.inp(x))))


def run_ddp(rank: int, world_size: int, layout: str):
    """DDP (gloo, CPU) with SyncBatchNorm vs the single-process model on the global batch:
    with equal local batches DDP's averaged gradient of the local mean loss is the gradient
    of the global mean loss, so the parameters after SGD steps are equal."""
    torch.manual_seed(1234)  # same initial model on every rank
    local_rows = 5
    if layout == "converted-bn1d":
        reference = nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)
        ).double()
        local = normlab.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reference))
        converted = isinstance(local[1], normlab.SyncBatchNorm)
        shape = (world_size * local_rows, 4)
    else:
        local = _DimLastNet(normlab.SyncBatchNorm(6, dim=-1, dtype=torch.float64))
        reference = _DimLastNet(normlab.BatchNorm(6, dim=-1, dtype=torch.float64))
        reference.load_state_dict(local.state_dict())
        converted = True
        shape = (world_size * local_rows, 3, 4)
    initial = {n: p.detach().clone() for n, p in local.named_parameters()}
    ddp = nn.parallel.DistributedDataParallel(local)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.2)
    own = world_rows(rank, [local_rows] * world_size)
    for step in range(2):
        g = torch.Generator().manual_seed(500 + step)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
        target = torch.randn((*shape[:-1], 2), generator=g, dtype=torch.float64)
        loss = (ddp(x[own]) - target[own]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_ref = (reference(x) - target).square().mean()
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
    params = dict(local.named_parameters())
    ref_params = dict(reference.named_parameters())
    buffers = dict(local.named_buffers())
    ref_buffers = dict(reference.named_buffers())
    return {
        "converted": converted,
        "same_names": params.keys() == ref_params.keys() and buffers.keys() == ref_buffers.keys(),
        "params": max(maxdiff(p, ref_params.get(n)) for n, p in params.items()),
        "buffers": max(maxdiff(b, ref_buffers.get(n)) for n, b in buffers.items()),
        "moved": max(maxdiff(p, initial[n]) for n, p in params.items()),
        "running_identical": all(bitwise_equal_on_group(b) for b in buffers.values()),
    }


# --------------------------------------------------------------------------------------------
# Entry point


def _write(out_dir: str, rank: int, results: dict) -> None:
    path = os.path.join(out_dir, f"rank{rank}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, path)


def main(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    """Entry point of each spawned process (torch.multiprocessing passes ``rank`` first)."""
    torch.set_num_threads(1)
    results: dict = {"cases": {}, "fatal": None, "done": False}
    try:
        dist.init_process_group(
            "gloo",
            init_method=rendezvous,
            rank=rank,
            world_size=world_size,
            timeout=TIMEOUT,
        )
        # every rank creates every group, in the same order
        singletons = [dist.new_group([r], timeout=TIMEOUT) for r in range(world_size)]
        pair_members = [0, world_size - 1]
        pair = dist.new_group(pair_members, timeout=TIMEOUT)
        compares = compare_cases(world_size)

        def pair_case():
            if rank not in pair_members:
                return {"skipped": True}
            case = copy.deepcopy(compares[4])  # masked, with a fully padded rank
            case.name = "subgroup"
            return run_compare(case, rank, world_size, pair, pair_members)

        plan = [
            (case.name, lambda case=case: run_compare(case, rank, world_size)) for case in compares
        ]
        plan[4:4] = [
            ("count-one", lambda: run_count_one(rank, world_size, masked=False)),
            ("count-one-masked", lambda: run_count_one(rank, world_size, masked=True)),
            ("count-zero-masked", lambda: run_count_one(rank, world_size, True, real=0)),
        ]  # the cases after these show that the group still works
        plan += [
            ("all-empty", lambda: run_all_empty(rank, world_size)),
            ("after-all-empty", lambda: run_compare(compares[0], rank, world_size)),
            ("eval", lambda: run_eval(rank, world_size)),
            ("group-of-one", lambda: run_group_of_one(rank, world_size, singletons[rank])),
            ("subgroup", pair_case),
            ("ddp-converted-bn1d", lambda: run_ddp(rank, world_size, "converted-bn1d")),
            ("ddp-dim-last", lambda: run_ddp(rank, world_size, "dim-last")),
        ]
        for name, run in plan:
            start = time.perf_counter()
            try:
                record = run()
                record.setdefault("error", None)
            except Exception as exc:
                record = {"error": error_text(exc), "traceback": traceback.format_exc()}
            record["seconds"] = time.perf_counter() - start
            results["cases"][name] = record
            _write(out_dir, rank, results)
        dist.barrier()
        results["done"] = True
    except Exception:
        results["fatal"] = traceback.format_exc()
    finally:
        _write(out_dir, rank, results)
        if dist.is_initialized():
            dist.destroy_process_group()
