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


async def train(rank: int, steps: int) -> None:
    device = torch.device("cpu")
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard of data
    beats = 0

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            beats += 1
            await asyncio.sleep(0.001)

    hb = asyncio.ensure_future(heartbeat())
    for step in range(steps):
        x = torch.randn(128, 32, generator=g, device=device)
        y = x[:, :1] * 2 - x[:, 1:2]
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
    checksum = torch.stack([p.detach().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros(1) for _ in range(WORLD)]
    await aiocuda.wait(dist.all_gather(gathered, checksum, async_op=True))
    assert all(torch.allclose(t, gathered[0]) for t in gathered), "the replicas diverged"
    print(f"rank {rank}: {steps} steps, replicas identical, heartbeat ran {beats} times", flush=True)


def worker(rank: int, port: int, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        asyncio.run(train(rank, steps))
    finally:
        dist.destroy_process_group()


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
