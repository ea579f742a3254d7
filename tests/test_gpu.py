"""Tests that need a real NVIDIA GPU: AIOCUDA_TEST_REAL_DRIVER=1 .venv/bin/python -m pytest -m gpu"""

from __future__ import annotations

import asyncio
import time

import pytest

import aiocuda
from aiocuda import _core

from .conftest import EMU_PATH

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu():
    if EMU_PATH is not None:
        pytest.skip(
            "the driver emulator is loaded; on a GPU machine run the gpu tests with "
            "AIOCUDA_TEST_REAL_DRIVER=1"
        )
    info = _core.cuda_info()
    if not info["available"]:
        pytest.skip(f"no usable GPU: {info['reason']}")
    return info


@pytest.fixture
def torch_cuda(gpu):
    torch = pytest.importorskip("torch", reason="the real-GPU tests launch kernels with torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


def test_await_a_sleep_kernel(run, torch_cuda):
    torch = torch_cuda

    async def main():
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            torch.cuda._sleep(50_000_000)  # tens of ms of GPU time
        ev = aiocuda.record(s)
        assert not ev.done()
        t0 = time.monotonic()
        await aiocuda.synchronize(s)
        await ev
        return time.monotonic() - t0, ev.done()

    waited, done = run(main())
    assert done and waited > 0


def test_results_are_ready_after_the_await(run, torch_cuda):
    torch = torch_cuda

    async def main():
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            x = torch.arange(1 << 20, device="cuda", dtype=torch.float64)
            y = (x * 2).sum()
        await aiocuda.synchronize(s)
        return y.item()

    n = 1 << 20
    assert run(main()) == float(n * (n - 1))


def test_many_waits_on_the_legacy_stream(run, torch_cuda):
    torch = torch_cuda

    async def main():
        torch.cuda.current_device()
        futs = [aiocuda.synchronize(0) for _ in range(10_000)]
        await asyncio.gather(*futs)
        return aiocuda.statistics().completed

    assert run(main()) == 10_000
