"""A training loop that overlaps loading the next batch with the current training step, through
an aiocuda.torch.Stream, while the event loop stays free (here: a heartbeat task).

    python examples/training_overlap.py [--steps 30]

Needs: torch.

On a GPU, host-side loading runs on a cpu-backend stream and the copy to the device on a side
stream (`aiocuda.torch.Stream()`, ordered before the step that uses it), while the step runs on
the default stream; on a machine without CUDA, `aiocuda.torch.Stream(device="cpu")` gives the
same methods on the cpu backend, and loading runs on its worker thread.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

import aiocuda
import aiocuda.torch as at

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH, FEATURES = 256, 128


def load_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stands in for decoding and augmenting a batch (torch releases the GIL in its kernels)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, FEATURES, generator=g)
    for _ in range(20):  # some host-side preprocessing work
        x = torch.tanh(x @ torch.eye(FEATURES) * 1.01)
    y = (x.sum(dim=1, keepdim=True) > 0).float()
    return x, y


def to_device(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.pin_memory().to(DEVICE, non_blocking=True), y.pin_memory().to(DEVICE, non_blocking=True)


async def train(steps: int, overlap: bool) -> tuple[float, float, int]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 1)).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    loader = at.Stream(device=DEVICE)  # was: torch.cuda.Stream()

    async def next_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(loader, at.CpuTorchStream):  # no CUDA: load on the stream's worker
            return await aiocuda.gpu_op(load_batch, i, stream=loader)
        x, y = await aiocuda.gpu_op(load_batch, i)  # host tensors: a cpu-backend stream
        return await aiocuda.gpu_op(to_device, x, y, stream=loader)  # the copy, on the side stream

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    beats = 0

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            beats += 1
            await asyncio.sleep(0.005)

    hb = asyncio.ensure_future(heartbeat())
    t0 = time.perf_counter()
    nxt = asyncio.ensure_future(next_batch(0))
    loss = torch.zeros(())
    for i in range(steps):
        x, y = await nxt  # the batch loaded while the previous step ran
        if overlap and i + 1 < steps:
            nxt = asyncio.ensure_future(next_batch(i + 1))
        loss = await aiocuda.gpu_op(step, x, y)
        if not overlap and i + 1 < steps:
            nxt = asyncio.ensure_future(next_batch(i + 1))
    elapsed = time.perf_counter() - t0
    hb.cancel()
    if isinstance(loader, at.CpuTorchStream):
        await loader.aclose()
    return elapsed, float(loss), beats


async def main(steps: int) -> None:
    await train(2, overlap=True)  # warm-up: torch's first calls are slow, and would count
    serial, loss_a, _ = await train(steps, overlap=False)
    overlapped, loss_b, beats = await train(steps, overlap=True)
    print(f"{steps} steps on {DEVICE}: load then train {serial:.2f} s; loading the next batch "
          f"during each step {overlapped:.2f} s ({serial / overlapped:.2f}x); final loss "
          f"{loss_a:.4f} / {loss_b:.4f}; heartbeat ran {beats} times meanwhile")
    assert abs(loss_a - loss_b) < 1e-5, "the same batches in the same order: the same model"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    asyncio.run(main(args.steps))
    print("done")
