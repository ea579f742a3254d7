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


# ---- issue 3: PyTorch and TensorFlow on a real device --------------------------------------------
def test_gpu_op_on_cuda_tensors(run, torch_cuda):
    torch = torch_cuda
    import aiocuda.torch as at

    model = torch.nn.Linear(256, 256).cuda()
    x = torch.randn(64, 256, device="cuda")

    async def main():
        with torch.no_grad():
            y = await aiocuda.gpu_op(model, x)
            s = at.Stream()
            z = await aiocuda.gpu_op(model, x, stream=s)
            return y, z, model(x)

    y, z, ref = run(main())
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(z, ref)


def test_gpu_op_refuses_mixed_devices(run, torch_cuda):
    torch = torch_cuda

    async def main():
        with pytest.raises(ValueError, match="different devices: cpu, cuda:0"):
            await aiocuda.gpu_op(torch.add, torch.ones(1, device="cuda"), torch.ones(1))
        if torch.cuda.device_count() > 1:
            s1 = torch.cuda.Stream(device=1)
            with pytest.raises(ValueError, match="stream= says cuda:1"):
                await aiocuda.gpu_op(torch.neg, torch.ones(1, device="cuda:0"), stream=s1)

    run(main())


def test_awaitable_stream_and_event(run, torch_cuda):
    torch = torch_cuda
    import aiocuda.torch as at

    async def main():
        s = at.Stream()
        with torch.cuda.stream(s):
            torch.cuda._sleep(20_000_000)
            out = torch.ones(1 << 20, device="cuda").sum()
        ev = s.record_event()
        assert isinstance(ev, at.Event)
        await ev
        assert ev.query()
        plain = torch.cuda.Event()
        with torch.cuda.stream(s):
            torch.cuda._sleep(20_000_000)
        plain.record(s)
        await aiocuda.wait(plain)  # any torch.cuda.Event, recorded on any stream
        assert plain.query()
        await s
        return out.item()

    assert run(main()) == float(1 << 20)


def test_wait_on_a_cuda_tensor_and_a_graph_replay(run, torch_cuda):
    torch = torch_cuda
    import aiocuda.torch as at

    static = torch.zeros(1024, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        static.add_(1)  # warm-up before capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static.add_(1)

    async def main():
        t = torch.arange(10, device="cuda") * 3
        assert await aiocuda.wait(t) is t
        for _ in range(5):
            await at.replay(graph)
        return static.sum().item()

    assert run(main()) == 1024 * 6


def test_nccl_all_reduce_is_awaited(run, torch_cuda, tmp_path):
    torch = torch_cuda
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this PyTorch build has no NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        async def main():
            t = torch.full((1 << 16,), 2.0, device="cuda")
            out = await aiocuda.wait(dist.all_reduce(t, async_op=True))
            return t.sum().item(), out[0].is_cuda

        total, on_gpu = run(main())
        assert total == 2.0 * (1 << 16) and on_gpu
    finally:
        dist.destroy_process_group()


def test_tensorflow_gpu_tensor_is_awaited(run, gpu):
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("TensorFlow sees no GPU (tensorflow-cpu, or no CUDA build)")

    async def main():
        with tf.device("/GPU:0"):
            a = tf.random.normal((1024, 1024))
        b = await aiocuda.gpu_op(tf.matmul, a, a)
        assert "GPU" in b.device
        return await aiocuda.wait(b) is b

    assert run(main())
