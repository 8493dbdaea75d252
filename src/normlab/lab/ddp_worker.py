"""Code that runs inside the processes the parallelism experiment (claim e) spawns: a small
sequence model trained data-parallel (DistributedDataParallel, gloo on loopback) with local
BatchNorm, normlab.SyncBatchNorm or LayerNorm, timing every step and counting the
collectives the model issues itself.

Kept apart from the claim module so that a spawned process imports only torch and normlab.
``launch`` starts the processes with a deadline: a hang fails, it never blocks.
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab

VARIANTS = ("bn_local", "bn_sync", "layer_norm")
# Public torch.distributed collectives that a norm could issue; DDP's gradient all-reduce runs
# in its C++ reducer and is not seen here (it is the same for every variant).
COUNTED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "barrier",
)


class SequenceModel(nn.Module):
    """(batch, length, features) -> one value per token: two Linear -> norm -> ReLU blocks."""

    def __init__(self, variant: str, features: int, hidden: int):
        super().__init__()
        make = {
            "bn_local": lambda: normlab.BatchNorm(hidden, dim=-1),
            "bn_sync": lambda: normlab.SyncBatchNorm(hidden, dim=-1),
            "layer_norm": lambda: normlab.LayerNorm(hidden),
        }[variant]
        self.inp, self.norm1 = nn.Linear(features, hidden), make()
        self.mid, self.norm2 = nn.Linear(hidden, hidden), make()
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        h = torch.relu(self.norm1(self.inp(x)))
        h = torch.relu(self.norm2(self.mid(h)))
        return self.out(h).squeeze(-1)


def _install_counter() -> Counter:
    """Wrap the public collectives of torch.distributed (looked up at call time by normlab's
    SyncBatchNorm and by user code) so that each call is counted."""
    counts: Counter = Counter()
    for name in COUNTED:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    return counts


def _ddp(module: nn.Module) -> nn.parallel.DistributedDataParallel:
    """DDP without the per-forward buffer broadcast, so local BatchNorm stays local and the
    only collective DDP adds is its gradient all-reduce (identical for every variant)."""
    parameters = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    if "forward_sync_buffers" in parameters:  # torch >= 2.13: broadcast_buffers deprecated
        # init sync of buffers is harmless (every rank starts from the same buffers)
        return nn.parallel.DistributedDataParallel(module, forward_sync_buffers=False)
    return nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)


def _batches(config: dict, seed: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    b, length, f = config["batch"], config["length"], config["features"]
    batches = []
    for _ in range(config["distinct_batches"]):
        x = torch.randn(b, length, f, generator=generator)
        target = x[..., 0] * x[..., 1] + 0.1 * torch.randn(b, length, generator=generator)
        batches.append((x, target))
    return batches


def _train_step(model, optimizer, x, target) -> None:
    loss = nn.functional.mse_loss(model(x), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _steps(run: dict, batches, counts: Counter, n: int, timed: bool) -> None:
    """``n`` training steps of one variant; when ``timed``, record each step's seconds and
    the collectives it issued."""
    for _ in range(n):
        x, target = batches[run["step"] % len(batches)]
        run["step"] += 1
        counts.clear()
        start = time.perf_counter()
        _train_step(run["model"], run["opt"], x, target)
        elapsed = time.perf_counter() - start
        if timed:
            run["times"].append(elapsed)
            run["collectives"].update(counts)


def worker(rank: int, world_size: int, rendezvous: str, config: dict, out_dir: str) -> None:
    """One rank: for each seed, every variant trains ``warmup`` untimed steps, then
    ``rounds`` rounds in which each variant (order rotated per round) trains
    ``steps_per_round`` timed steps. Writes rank<r>.json into ``out_dir``."""
    timeline = {"worker_start": time.time()}  # wall clock: comparable with the parent's
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=config["timeout_s"])
    dist.init_process_group(
        "gloo",
        init_method=rendezvous,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    timeline["group_ready"] = time.time()
    try:
        counts = _install_counter()
        results = {}
        for seed in config["seeds"]:
            batches = _batches(config, seed, rank)
            runs = {}
            for variant in VARIANTS:
                torch.manual_seed(seed)  # same initial weights for every variant and rank
                model = _ddp(SequenceModel(variant, config["features"], config["hidden"]))
                optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
                runs[variant] = {
                    "model": model,
                    "opt": optimizer,
                    "times": [],
                    "step": 0,
                    "collectives": Counter(),
                }
            for variant in VARIANTS:
                _steps(runs[variant], batches, counts, config["warmup"], timed=False)
            for r in range(config["rounds"]):
                order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
                for variant in order:
                    _steps(runs[variant], batches, counts, config["steps_per_round"], timed=True)

            # Outside the counted steps: do the ranks' running statistics agree?
            agreement = {}
            for variant in ("bn_local", "bn_sync"):
                norm = runs[variant]["model"].module.norm1
                gathered = [torch.empty_like(norm.running_mean) for _ in range(world_size)]
                dist.all_gather(gathered, norm.running_mean)
                agreement[variant] = float(max((g - gathered[0]).abs().max() for g in gathered[1:]))
            results[str(seed)] = {
                variant: {
                    "median_step_ms": 1000 * statistics.median(runs[variant]["times"]),
                    "quartiles_step_ms": [
                        1000 * q for q in statistics.quantiles(runs[variant]["times"], n=4)[::2]
                    ],
                    "timed_steps": len(runs[variant]["times"]),
                    "collectives_per_step": {
                        name: n / len(runs[variant]["times"])
                        for name, n in sorted(runs[variant]["collectives"].items())
                    },
                    "running_mean_rank_max_diff": agreement.get(variant),
                }
                for variant in VARIANTS
            }
        timeline["done"] = time.time()
        results["timeline"] = timeline
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
    # Results are on disk: leave at once. A normal interpreter exit with torch loaded takes
    # about a second more (module teardown), which the parent would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(config: dict, world_size: int = 2, deadline_s: float = 120.0):
    """Start ``world_size`` spawned ranks; returns a ``collect()`` callable that waits for
    them (until ``deadline_s`` after the start, then terminates them and raises
    TimeoutError) and returns each rank's results. Starting first lets the caller do other
    work while the ranks import torch."""
    out_dir = tempfile.mkdtemp(prefix="normlab-ddp-")
    # The ranks meet at a file (torch's FileStore), not at a TCP port picked free a moment
    # before, which another program could take first.
    rendezvous = "file://" + os.path.join(out_dir, "rendezvous")
    start, launched_at = time.monotonic(), time.time()
    # Spawned children inherit the environment: one thread each, no oversubscription.
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        context = mp.start_processes(
            worker,
            args=(world_size, rendezvous, config, out_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before

    def collect() -> list[dict]:
        try:
            while not context.join(timeout=0.1):  # raises if a rank failed
                if time.monotonic() - start > deadline_s:
                    raise TimeoutError(
                        f"data-parallel run did not finish within {deadline_s:.0f} s; "
                        "its processes were terminated"
                    )
            results = [
                json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)
            ]
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
                    process.join(5)
                    if process.is_alive():
                        process.kill()
                        process.join()
            shutil.rmtree(out_dir, ignore_errors=True)
        for result in results:  # seconds since launch
            result["timeline"] = {k: v - launched_at for k, v in result["timeline"].items()}
        return results

    return collect
