"""Await a CUDA stream by its raw handle or any object with __cuda_stream__ / .cuda_stream.

    python examples/raw_stream.py

With PyTorch and a GPU it awaits a real kernel on a torch stream. Without them it says which
backends are available and awaits the same shape of work on the cpu backend.
"""

from __future__ import annotations

import asyncio
import time

import aiocuda


async def on_gpu() -> None:
    import torch

    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.randn(4096, 4096, device="cuda")
        y = x @ x
    t0 = time.perf_counter()
    await aiocuda.synchronize(s)  # torch.cuda.Stream has .cuda_stream: no adapter needed
    print(f"matmul done after {1e3 * (time.perf_counter() - t0):.2f} ms; y[0, 0] = {y[0, 0].item():.3f}")


async def on_cpu() -> None:
    async with aiocuda.CpuStream() as s:
        s.delay(0.02)  # 20 ms of native work, like a kernel
        ev = aiocuda.record(s)
        t0 = time.perf_counter()
        await ev
        print(f"cpu-backend work done after {1e3 * (time.perf_counter() - t0):.2f} ms")


def has_torch_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return "cuda" in aiocuda.backends() and torch.cuda.is_available()


if __name__ == "__main__":
    print("backends:", aiocuda.backends())
    asyncio.run(on_gpu() if has_torch_gpu() else on_cpu())
