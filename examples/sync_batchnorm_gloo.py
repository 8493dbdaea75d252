"""Two processes on one machine (gloo, CPU) train a small sequence model whose BatchNorm
statistics are synchronized over both processes and ignore padding.

    python examples/sync_batchnorm_gloo.py            # 2 processes, 20 steps
    python examples/sync_batchnorm_gloo.py --steps 3

Each process gets its own variable-length sequences (padded to a common length), so the two
ranks hold different amounts of real data; SyncBatchNorm's statistics are those of all real
tokens of both ranks together, and DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab

FEATURES, LENGTH, BATCH = 16, 12, 8


class TokenClassifier(nn.Module):
    """(batch, length, features) -> one logit per token, with a masked SyncBatchNorm."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(FEATURES, 32)
        self.norm = normlab.SyncBatchNorm(32, dim=-1)
        self.out = nn.Linear(32, 1)

    def forward(self, x, lengths):
        return self.out(torch.relu(self.norm(self.inp(x), lengths=lengths))).squeeze(-1)


def batch_for(rank: int, step: int):
    generator = torch.Generator().manual_seed(1000 * rank + step)
    lengths = torch.randint(1, LENGTH + 1, (BATCH,), generator=generator)
    x = torch.randn(BATCH, LENGTH, FEATURES, generator=generator)
    target = (x[..., 0] > 0).float()
    return x, lengths, target


def train(rank: int, world_size: int, rendezvous: str, steps: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=rendezvous,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.parallel.DistributedDataParallel(TokenClassifier())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x, lengths, target = batch_for(rank, step)
        real = normlab.lengths_to_mask(lengths, LENGTH)
        logits = model(x, lengths)
        loss = nn.functional.binary_cross_entropy_with_logits(logits[real], target[real])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 5 == 0 or step == steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    norm = model.module.norm
    means = [torch.empty_like(norm.running_mean) for _ in range(world_size)]
    dist.all_gather(means, norm.running_mean)
    if rank == 0:
        same = all(torch.equal(means[0], m) for m in means)
        print(f"running statistics identical on all {world_size} ranks: {same}")
    # Teardown: free the DDP model (its reducer holds the process group) while the group is
    # alive, and wait at a barrier (the GIL released) so that gloo's threads can drop the
    # last collectives' tensors. Otherwise the group's destructor, run with the GIL held,
    # can wait forever for a gloo thread that waits for the GIL (pytorch/pytorch#56297):
    # seen here as a hang at exit when the machine was slow (cold Numba cache).
    del model, optimizer, means
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    # The ranks meet at a file, not a TCP port: no free port to pick, so none that another
    # program can take between the pick and the bind.
    with tempfile.TemporaryDirectory(prefix="normlab-gloo-") as folder:
        rendezvous = "file://" + os.path.join(folder, "rendezvous")
        mp.spawn(train, args=(args.nproc, rendezvous, args.steps), nprocs=args.nproc)


if __name__ == "__main__":
    main()
