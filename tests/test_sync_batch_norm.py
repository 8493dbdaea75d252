"""normlab.SyncBatchNorm: statistics of the concatenation of all ranks' real elements.

The distributed tests spawn one gloo process group per world size (2 and 3) on loopback and
run every case of ``distributed_worker.py`` in it, in order; each rank writes its results
(max abs differences against single-process BatchNorm on the global batch, flags, error
messages) to a JSON file, which the tests below read. The group is bounded: every collective
times out after 60 s and the whole group is killed after ``GROUP_DEADLINE_S``, so a hang
fails the tests instead of blocking them.

The eval / world-size-1 / no-torch.distributed behaviour, convert_sync_batchnorm, state_dict
compatibility and merge_moments are tested in the pytest process itself.
"""

from __future__ import annotations

import copy
import datetime
import inspect
import json
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import distributed_worker as worker
import normlab
from normlab.distributed import merge_moments
from tolerances import grad_tol, tol

WORLD_SIZES = (2, 3)
GROUP_DEADLINE_S = 120
CASES = {case.name: case for case in worker.compare_cases(2)}
assert [c.name for c in worker.compare_cases(3)] == list(CASES)


# --------------------------------------------------------------------------------------------
# Spawning the process groups


def rendezvous(folder) -> str:
    """Where the ranks meet: a file (torch's FileStore), so no TCP port that another program
    could take between picking it and binding it."""
    return f"file://{folder}/rendezvous"


@dataclass
class GroupRun:
    world_size: int
    ranks: list[dict | None]
    error: str | None
    seconds: float

    def check(self) -> None:
        """Fail (not hang, not error) when the group did not finish cleanly."""
        assert self.error is None, f"process group of {self.world_size}: {self.error}"
        for rank, result in enumerate(self.ranks):
            assert result is not None, f"rank {rank} wrote no results"
            assert result["fatal"] is None, f"rank {rank}:\n{result['fatal']}"
            assert result["done"], f"rank {rank} did not finish every case"

    def records(self, name: str) -> list[dict]:
        """The record of case ``name`` on every rank; a case that crashed fails the test."""
        self.check()
        records = [result["cases"][name] for result in self.ranks]
        for rank, record in enumerate(records):
            assert record["error"] is None, (
                f"{name} on rank {rank} of {self.world_size}: {record['error']}\n"
                f"{record.get('traceback', '')}"
            )
        return records


def spawn_group(world_size: int, out_dir) -> GroupRun:
    """Run distributed_worker.main on ``world_size`` spawned processes, killing them if they
    have not all finished within GROUP_DEADLINE_S."""
    start = time.monotonic()
    error = None
    context = mp.start_processes(
        worker.main,
        args=(world_size, rendezvous(out_dir), str(out_dir)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    try:
        while not context.join(timeout=1):
            if time.monotonic() - start > GROUP_DEADLINE_S:
                error = f"did not finish within {GROUP_DEADLINE_S} s (killed)"
                break
    except Exception as exc:  # a worker died or raised outside its cases
        error = f"{type(exc).__name__}: {exc}"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        for process in context.processes:
            process.join(10)
    ranks = []
    for rank in range(world_size):
        path = out_dir / f"rank{rank}.json"
        ranks.append(json.loads(path.read_text()) if path.exists() else None)
    return GroupRun(world_size, ranks, error, time.monotonic() - start)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Spawns each world size once per module, on first use."""
    runs: dict[int, GroupRun] = {}

    def get(world_size: int) -> GroupRun:
        if world_size not in runs:
            runs[world_size] = spawn_group(world_size, tmp_path_factory.mktemp(f"ws{world_size}"))
        return runs[world_size]

    return get


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"{n}proc")
def group(request, spawned) -> GroupRun:
    return spawned(request.param)


def limits(case: worker.Case) -> tuple[float, float]:
    """(atol for outputs and running statistics, atol for gradients)."""
    dtype = getattr(torch, case.dtype)
    if case.atol is not None:
        return case.atol, case.atol
    return tol(dtype)["atol"], grad_tol(dtype)["atol"]


def worst(records: list[dict], key: str) -> float:
    values = [step[key] for record in records for step in record["steps"] if key in step]
    return max(values) if values else float("nan")


VALUE_KEYS = ("y", "running_mean", "running_var", "torch_y", "torch_running_mean")
VALUE_KEYS += ("torch_running_var",)
GRAD_KEYS = ("dx", "dweight", "dbias", "torch_dx", "torch_dweight", "torch_dbias")


def assert_close_to_single_process(records: list[dict], case: worker.Case, where: str):
    value_atol, grad_atol = limits(case)
    for rank, record in enumerate(records):
        assert len(record["steps"]) == case.steps
        assert not record["grad_none"], f"{where} rank {rank}: a parameter got no gradient"
        for step, result in enumerate(record["steps"]):
            for key in VALUE_KEYS + GRAD_KEYS:
                if key not in result:
                    continue
                atol = grad_atol if key in GRAD_KEYS else value_atol
                assert result[key] <= atol, (
                    f"{where} rank {rank} step {step}: max |{key} - single process| = "
                    f"{result[key]:.3g} > {atol:g}"
                )
            assert result["nbt_equal"], f"{where} rank {rank} step {step}: num_batches_tracked"
            assert result["finite"], f"{where} rank {rank} step {step}: NaN/Inf leaked"
            if case.torch_ref:
                assert "torch_y" in result


# --------------------------------------------------------------------------------------------
# Distributed: against single-process BatchNorm on the global batch


def test_process_groups_finish_every_case_within_the_deadline(group):
    group.check()
    names = set(group.ranks[0]["cases"])
    assert set(CASES) <= names
    assert group.seconds < GROUP_DEADLINE_S


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_gradients_and_running_stats_equal_single_process_on_global_batch(group, name):
    case = next(c for c in worker.compare_cases(group.world_size) if c.name == name)
    records = group.records(name)
    assert_close_to_single_process(records, case, f"{name} ({group.world_size} processes)")


def test_running_stats_are_bitwise_identical_on_every_rank(group):
    for name in [*CASES, "subgroup", "after-all-empty"]:
        for rank, record in enumerate(group.records(name)):
            if record.get("skipped"):
                continue
            assert record["running_identical"], f"{name}: rank {rank} differs from the others"
    for name in ("ddp-converted-bn1d", "ddp-dim-last"):
        assert all(r["running_identical"] for r in group.records(name)), name


def test_cumulative_momentum_none_counts_every_synchronized_step(group):
    records = group.records("no-affine-momentum-none-2d-mask")
    for record in records:
        assert [step["nbt"] for step in record["steps"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["count-one", "count-one-masked", "count-zero-masked"])
def test_fewer_than_two_global_values_raise_value_error_on_every_rank(group, name):
    """One real value per channel over all ranks (one rank 1 row, the others none; or one
    real position under a mask), or no real value under a mask: every rank raises."""
    for rank, record in enumerate(group.records(name)):
        error = record["sync_error"]
        assert error is not None, f"rank {rank} did not raise"
        assert error.startswith("ValueError"), error
        assert "more than 1 value per channel" in error, error
        # single-process BatchNorm on the same global batch refuses it too
        assert record["ref_error"] is not None and record["ref_error"].startswith("ValueError")
        assert record["all_reduce_after"] == [group.world_size] * 2


def test_group_still_synchronizes_after_the_count_error(group):
    group.check()
    names = list(group.ranks[0]["cases"])
    after = [n for n in names[names.index("count-zero-masked") + 1 :] if n in CASES]
    assert "lengths-fully-padded-rank" in after
    for name in after:
        group.records(name)  # no comparison after the error crashed or timed out
    name = "lengths-fully-padded-rank"
    case = next(c for c in worker.compare_cases(group.world_size) if c.name == name)
    assert_close_to_single_process(group.records(name), case, "after the error")


def test_all_ranks_empty_behaves_like_batch_norm_on_the_empty_global_batch(group):
    """Single-process BatchNorm accepts an empty unmasked batch (empty output, running
    statistics untouched); the concatenation of empty batches is such a batch."""
    for rank, record in enumerate(group.records("all-empty")):
        assert record["ref_error"] is None
        assert record["sync_error"] == record["ref_error"], f"rank {rank}"
        assert record["sync_shape"] == record["ref_shape"]
        assert record["running_mean"] == 0.0 and record["running_var"] == 0.0
    case = CASES["equal"]
    assert_close_to_single_process(group.records("after-all-empty"), case, "after all-empty")


def test_eval_mode_is_plain_batch_norm_and_runs_no_collective(group):
    for rank, record in enumerate(group.records("eval")):
        assert record["collectives"] == [], f"rank {rank}: {record['collectives']}"
        assert record["trained_nbt"] == 2
        assert record["running_identical"]
        assert record["exact"] and record["exact_lengths"] and record["exact_untracked"]
        assert record["buffers_unchanged"]
        assert record["torch_y"] <= tol(torch.float64)["atol"]


def test_process_group_of_one_is_plain_batch_norm_and_runs_no_collective(group):
    for rank, record in enumerate(group.records("group-of-one")):
        assert record["group_size"] == 1
        assert record["collectives"] == [], f"rank {rank}: {record['collectives']}"
        assert record["exact"] and all(record["exact"]), f"rank {rank}: {record['exact']}"
        assert record["buffers_equal"]


def test_process_group_argument_limits_synchronization_to_its_members(group):
    """Ranks 0 and world-1 synchronize over their own group: their statistics are those of
    their two batches only (rank 1 of 3 runs nothing in that group)."""
    members = [0, group.world_size - 1]
    records = group.records("subgroup")
    case = copy.deepcopy(worker.compare_cases(group.world_size)[4])
    for rank, record in enumerate(records):
        assert record.get("skipped", False) == (rank not in members)
    assert_close_to_single_process(
        [records[m] for m in members], case, f"subgroup {members} of {group.world_size}"
    )


@pytest.mark.parametrize("layout", ["ddp-converted-bn1d", "ddp-dim-last"])
def test_ddp_training_equals_single_process_training_on_global_batch(group, layout):
    for rank, record in enumerate(group.records(layout)):
        assert record["converted"] and record["same_names"]
        assert record["moved"] > 1e-3, "the SGD steps changed nothing; the test is vacuous"
        assert record["params"] <= grad_tol(torch.float64)["atol"], f"rank {rank}: {record}"
        assert record["buffers"] <= tol(torch.float64)["atol"], f"rank {rank}: {record}"


def test_print_max_abs_differences_per_case(spawned):
    """One line per case and world size (run with -s to see them)."""
    lines = []
    for world_size in WORLD_SIZES:
        run = spawned(world_size)
        run.check()
        lines.append(f"--- {world_size} processes: group finished in {run.seconds:.1f} s")
        cases = worker.compare_cases(world_size)
        for case in cases:
            records = run.records(case.name)
            parts = [f"{key}={worst(records, key):.1e}" for key in ("y", "dx", "dweight")]
            parts += [f"{key}={worst(records, key):.1e}" for key in ("dbias", "running_mean")]
            parts.append(f"running_var={worst(records, 'running_var'):.1e}")
            if case.torch_ref:
                parts.append(f"torch_y={worst(records, 'torch_y'):.1e}")
                parts.append(f"torch_dx={worst(records, 'torch_dx'):.1e}")
            lines.append(
                f"{world_size}proc {case.name:32s} {case.dtype} sizes={list(case.sizes)} "
                + " ".join(parts)
            )
        for name in ("ddp-converted-bn1d", "ddp-dim-last"):
            records = run.records(name)
            params = max(r["params"] for r in records)
            buffers = max(r["buffers"] for r in records)
            lines.append(f"{world_size}proc {name:32s} params={params:.1e} buffers={buffers:.1e}")
    print("\n" + "\n".join(lines))
    assert len(lines) == len(WORLD_SIZES) * (len(CASES) + 3)


# --------------------------------------------------------------------------------------------
# Without synchronization, in the pytest process


def _assert_plain_batch_norm(process_group=None) -> None:
    """SyncBatchNorm in training and eval equals normlab.BatchNorm bitwise, no collective."""
    settings = [
        ({}, (5, 3, 4), 1, False),
        ({"momentum": None, "bias": False}, (6, 4, 3), -1, True),
        ({"affine": False, "track_running_stats": False}, (4, 3, 5), 1, True),
    ]
    for kwargs, shape, dim, masked in settings:
        c = shape[dim]
        sync = normlab.SyncBatchNorm(
            c, process_group=process_group, dtype=torch.float64, dim=dim, **kwargs
        )
        worker.init_affine(sync, 3)
        ref = normlab.BatchNorm(c, dtype=torch.float64, dim=dim, **kwargs)
        ref.load_state_dict(sync.state_dict())
        with worker.collectives_forbidden() as calls:
            for step in range(3):
                x = torch.randn(shape, dtype=torch.float64) * 2 + step
                dy = torch.randn(shape, dtype=torch.float64)
                kw = {"lengths": torch.tensor([4, 1, 0, 3, 2, 4][: shape[0]])} if masked else {}
                if masked and dim == -1:
                    kw["lengths"] = kw["lengths"].clamp(max=shape[1])
                assert worker._exact_step(sync, ref, x, dy, **kw)
                assert worker._same_buffers(sync, ref)
            sync.eval()
            ref.eval()
            x = torch.randn(shape, dtype=torch.float64)
            assert worker._exact_step(sync, ref, x, torch.randn_like(x))
        assert calls == []
        if kwargs.get("track_running_stats", True):
            assert int(sync.num_batches_tracked) == 3


def test_without_torch_distributed_initialized_it_is_plain_batch_norm():
    assert not dist.is_initialized()
    _assert_plain_batch_norm()


def test_world_size_one_process_group_is_plain_batch_norm(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group(
        "gloo",
        init_method=rendezvous(tmp_path),
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
        _assert_plain_batch_norm()
        _assert_plain_batch_norm(process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_rejects_input_with_fewer_than_two_dimensions_like_torch_sync_batch_norm():
    with pytest.raises(ValueError, match="expected at least 2D input"):
        normlab.SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="expected at least 2D input"):
        normlab.SyncBatchNorm(3).eval()(torch.randn(3))
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        normlab.SyncBatchNorm(3)(torch.randn(1, 3))  # no dist: BatchNorm's check


# --------------------------------------------------------------------------------------------
# convert_sync_batchnorm


def _randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
        for name, b in module.named_buffers():
            if name.endswith("num_batches_tracked"):
                b.fill_(int(torch.randint(1, 50, (), generator=g)))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
            else:
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(3, eps=1e-3, momentum=0.2)
        self.bn3 = nn.BatchNorm3d(2, affine=False)
        self.torch_sync = nn.SyncBatchNorm(4, momentum=None)
        self.nl_dim_last = normlab.BatchNorm(5, dim=-1, dtype=torch.float64)
        self.nl_2d = normlab.BatchNorm2d(3, track_running_stats=False)
        self.conv = nn.Conv2d(3, 3, 1)
        self.inner = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5, bias=False).double())


# name in the model -> input shape for an eval forward
_BATCH_NORMS = {
    "1": (6, 4),
    "3.bn2": (2, 3, 4, 4),
    "3.bn3": (2, 2, 3, 2, 2),
    "3.torch_sync": (3, 4, 5),
    "3.nl_dim_last": (2, 3, 5),
    "3.nl_2d": (2, 3, 4, 4),
    "3.inner.1": (4, 5, 3),
}


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), _Block())
    _randomize(model, 0)
    model[1].weight.requires_grad_(False)
    model[3].bn2.bias.requires_grad_(False)
    model[3].bn2.eval()
    model[3].inner[1].eval()
    return model


def test_convert_sync_batchnorm_replaces_every_batch_norm_and_preserves_its_state():
    model = _model()
    original = copy.deepcopy(model)
    others = {n: m for n, m in model.named_modules() if n not in _BATCH_NORMS}
    group = object()
    converted = normlab.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    modules = dict(converted.named_modules())
    for name, module in others.items():  # untouched: the very same objects
        assert modules[name] is module, name
    assert not any(
        isinstance(m, normlab.SyncBatchNorm) for n, m in modules.items() if n not in _BATCH_NORMS
    )
    before = dict(original.named_modules())
    for name in _BATCH_NORMS:
        old, new = before[name], modules[name]
        assert type(new) is normlab.SyncBatchNorm, name
        assert new.process_group is group
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            assert getattr(new, attr) == getattr(old, attr), (name, attr)
        assert new.dim == getattr(old, "dim", 1), name
        assert new.training == old.training, name
        assert (new.bias is None) == (old.bias is None), name
        old_state, new_state = old.state_dict(), new.state_dict()
        assert list(new_state) == list(old_state), name
        for key, value in old_state.items():
            assert new_state[key].dtype == value.dtype, (name, key)
            assert torch.equal(new_state[key], value), (name, key)
        for (pname, p), (_, q) in zip(old.named_parameters(), new.named_parameters(), strict=True):
            assert q.requires_grad == p.requires_grad, (name, pname)
    assert modules["1"].weight.requires_grad is False
    assert modules["3.bn2"].bias.requires_grad is False
    assert modules["3.nl_dim_last"].dim == -1
    assert modules["3.nl_dim_last"].weight.dtype == torch.float64
    assert modules["3.inner.1"].running_mean.dtype == torch.float64
    assert modules["3.bn2"].training is False and modules["3.bn3"].training is True
    assert set(converted.state_dict()) == set(original.state_dict())


def test_converted_batch_norms_give_the_original_eval_output():
    model = _model()
    original = copy.deepcopy(model).eval()
    converted = normlab.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    before, after = dict(original.named_modules()), dict(converted.named_modules())
    for name, shape in _BATCH_NORMS.items():
        dtype = before[name].running_mean.dtype if before[name].track_running_stats else None
        x = torch.randn(shape, dtype=dtype or torch.float32) * 3 + 1
        expected, got = before[name](x), after[name](x)
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, **tol(got.dtype), msg=name)
        assert not torch.allclose(got, x), name  # it normalized something
    # a whole network, end to end
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Sequential(nn.BatchNorm2d(3))
    )
    _randomize(net, 1)
    net.eval()
    reference = copy.deepcopy(net)
    x = torch.randn(2, 2, 6, 6)
    converted = normlab.SyncBatchNorm.convert_sync_batchnorm(net)
    assert isinstance(converted[3][0], normlab.SyncBatchNorm)
    torch.testing.assert_close(converted(x), reference(x), **tol(torch.float32))


def test_convert_a_batch_norm_itself_returns_a_new_sync_batch_norm():
    bn = nn.BatchNorm1d(4, momentum=0.3).double()
    _randomize(bn, 2)
    sync = normlab.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert isinstance(sync, normlab.SyncBatchNorm) and sync is not bn
    assert sync.momentum == 0.3 and sync.weight.dtype == torch.float64
    for key, value in bn.state_dict().items():
        assert torch.equal(sync.state_dict()[key], value), key
    already = normlab.SyncBatchNorm(3, dim=-1)
    assert normlab.SyncBatchNorm.convert_sync_batchnorm(already) is already
    linear = nn.Linear(2, 2)
    assert normlab.SyncBatchNorm.convert_sync_batchnorm(linear) is linear


@pytest.mark.parametrize(
    "make",
    [
        lambda: normlab.BatchRenorm(3),
        lambda: nn.Sequential(nn.Linear(3, 3), normlab.BatchRenorm1d(3)),
        lambda: normlab.BatchNorm(3, virtual_batch_size=4),
        lambda: nn.Sequential(nn.Sequential(normlab.BatchNorm1d(3, virtual_batch_size=2))),
    ],
    ids=["batch-renorm", "nested-batch-renorm", "ghost", "nested-ghost"],
)
def test_convert_refuses_batch_renorm_and_ghost_batch_norm(make):
    with pytest.raises(ValueError, match="convert_sync_batchnorm"):
        normlab.SyncBatchNorm.convert_sync_batchnorm(make())


# --------------------------------------------------------------------------------------------
# Drop-in for torch.nn.SyncBatchNorm


def test_constructor_arguments_order_and_defaults_match_torch_sync_batch_norm():
    ours = inspect.signature(normlab.SyncBatchNorm.__init__).parameters
    theirs = inspect.signature(nn.SyncBatchNorm.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].kind == param.kind and ours[name].default == param.default, name
    positional = [n for n, p in ours.items() if p.kind != p.KEYWORD_ONLY]
    assert positional == [n for n, p in theirs.items() if p.kind != p.KEYWORD_ONLY]
    extra = {n: p for n, p in ours.items() if n not in theirs}
    assert set(extra) == {"dim"}
    assert extra["dim"].kind == inspect.Parameter.KEYWORD_ONLY and extra["dim"].default == 1
    assert ours["bias"].kind == inspect.Parameter.KEYWORD_ONLY and ours["bias"].default is True
    group = object()
    args = (4, 1e-3, 0.2, False, False, group)
    a, b = normlab.SyncBatchNorm(*args), nn.SyncBatchNorm(*args)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.process_group is group


@pytest.mark.parametrize(
    "kwargs", [{}, {"affine": False}, {"track_running_stats": False}, {"bias": False}]
)
def test_state_dict_moves_between_torch_and_normlab_sync_batch_norm_strictly(kwargs):
    theirs = nn.SyncBatchNorm(5, **kwargs)
    _randomize(theirs, 4)
    ours = normlab.SyncBatchNorm(5, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    _randomize(ours, 5)
    back = nn.SyncBatchNorm(5, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # and a checkpoint of a torch.nn.SyncBatchNorm inside a model
    model = nn.Sequential(nn.Linear(5, 5), nn.SyncBatchNorm(5, **kwargs))
    _randomize(model, 6)
    target = nn.Sequential(nn.Linear(5, 5), normlab.SyncBatchNorm(5, **kwargs))
    target.load_state_dict(model.state_dict(), strict=True)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------
# merge_moments


def _chunk_moments(chunks):
    """Per chunk (list over ranks of lists over channels of 1-D arrays): count, mean, M2."""
    counts = np.array([[len(v) for v in rank] for rank in chunks], dtype=np.float64)
    means = np.array([[v.mean() if len(v) else 0.0 for v in rank] for rank in chunks])
    m2s = np.array(
        [[((v - v.mean()) ** 2).sum() if len(v) else 0.0 for v in rank] for rank in chunks]
    )
    return [torch.from_numpy(a) for a in (counts, means, m2s)]


def test_merge_moments_equals_numpy_statistics_of_the_concatenation():
    rng = np.random.default_rng(0)
    for trial in range(40):
        world, channels = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        counts = rng.integers(0, 7, size=(world, channels))
        counts[int(rng.integers(world))] = 0  # an empty rank
        counts[0] += 2 * (counts.sum(0) < 2)  # at least two values per channel
        chunks = [
            [rng.normal(rng.normal(0, 5), rng.uniform(0.1, 3), n) for n in rank_counts]
            for rank_counts in counts
        ]
        total, mean, var = merge_moments(*_chunk_moments(chunks))
        for c in range(channels):
            values = np.concatenate([rank[c] for rank in chunks])
            assert total[c] == len(values), trial
            np.testing.assert_allclose(mean[c].item(), values.mean(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(var[c].item(), values.var(), rtol=1e-11, atol=1e-12)


def test_merge_moments_ignores_empty_ranks_exactly():
    rng = np.random.default_rng(1)
    values = [rng.normal(3, 2, n) for n in (5, 7)]
    chunks = [[values[0]], [np.array([])], [values[1]], [np.array([])]]
    total, mean, var = merge_moments(*_chunk_moments(chunks))
    expected = merge_moments(*_chunk_moments([chunks[0], chunks[2]]))
    assert torch.equal(total, expected[0]) and torch.equal(mean, expected[1])
    assert torch.equal(var, expected[2])
    # every rank empty: a zero count, and finite (no 0/0) statistics
    total, mean, var = merge_moments(*_chunk_moments([[np.array([])], [np.array([])]]))
    assert total.tolist() == [0.0]
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()


def test_merge_moments_is_stable_for_a_large_offset():
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 0.1, 3000)
    x = 1e8 + noise  # float64: E[x^2] - E[x]^2 would lose every digit of the variance
    splits = np.split(x, [0, 500, 1700, 1700, 2999])  # uneven, including empty chunks
    chunks = [[chunk] for chunk in splits]
    total, mean, var = merge_moments(*_chunk_moments(chunks))
    assert total.item() == 3000
    np.testing.assert_allclose(mean.item(), x.mean(), rtol=1e-15)
    np.testing.assert_allclose(var.item(), x.var(), rtol=1e-7)
    np.testing.assert_allclose(var.item(), noise.var(), rtol=1e-5)
