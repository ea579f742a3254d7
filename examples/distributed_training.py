"""Two processes train one model with torch.distributed (gloo), each awaiting its gradient
all-reduces with aiocuda.wait while its event loop stays free.

    python examples/distributed_training.py [--steps 20]

Needs: torch.

Unchanged on GPUs with backend "nccl": aiocuda.wait then awaits the collective's stream instead
of blocking (see aiocuda.torch).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import aiocuda

WORLD = 2
BATCH = 128


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and its optimizer: the same initial weights on every rank."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


async def train(rank: int, steps: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard of data
    beats = samples = 0

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            beats += 1
            await asyncio.sleep(0.001)

    hb = asyncio.ensure_future(heartbeat())
    for step in range(steps):
        x = torch.randn(BATCH, 32, generator=g)
        y = x[:, :1] * 2 - x[:, 1:2]
        samples += len(x)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        works = [dist.all_reduce(p.grad, async_op=True) for p in model.parameters()]
        await asyncio.gather(*[aiocuda.wait(w) for w in works])  # was: for w in works: w.wait()
        for p in model.parameters():
            p.grad /= WORLD
        opt.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3} loss {loss.item():.4f}", flush=True)
    hb.cancel()
    # Each rank's totals, and a checksum of its weights, gathered on every rank.
    mine = torch.tensor([steps, samples, beats, sum(p.detach().sum().item() for p in
                                                    model.parameters())], dtype=torch.float64)
    everyone = [torch.zeros(4, dtype=torch.float64) for _ in range(WORLD)]
    await aiocuda.wait(dist.all_gather(everyone, mine, async_op=True))
    # The gradients were averaged bit for bit alike, so the replicas are equal, not just close.
    assert all(t[3] == everyone[0][3] for t in everyone), "the replicas diverged"
    # No rank leaves (and tears its connections down) while another is still in a collective.
    await aiocuda.wait(dist.barrier(async_op=True))
    if rank == 0:
        for r, (n, k, b, _) in enumerate(t.tolist() for t in everyone):
            print(f"rank {r}: {n:.0f} steps, {k:.0f} samples, heartbeat ran {b:.0f} times",
                  flush=True)
        total = sum(int(t[1]) for t in everyone)
        print(f"replicas identical, {total} samples in all", flush=True)


def worker(rank: int, port: int, steps: int) -> None:
    # Build the optimizer before the process group: making one imports torch._dynamo, which
    # keeps references to a default group that exists then. destroy_process_group() could not
    # free such a group, so gloo's threads would outlive it, and one of them dropping its last
    # collective while the interpreter exits aborts the process ("terminate called without an
    # active exception"; pytorch issue 109478, pull request 179291).
    model, opt = build()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        asyncio.run(train(rank, steps, model, opt))
    finally:
        dist.destroy_process_group()  # frees the group: joins gloo's threads while Python runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    steps = ap.parse_args().steps
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(port, steps), nprocs=WORLD, join=True)
    print("done")


if __name__ == "__main__":
    main()
