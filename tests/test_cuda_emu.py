"""The cuda backend end to end, against the driver emulator (tests/emu)."""

from __future__ import annotations

import ctypes
import time

import pytest

import aiocuda
from aiocuda import _core
from aiocuda._api import wait_cuda_event

from .loops import gather, in_thread, sleep, wait_for

pytestmark = pytest.mark.emu


class ProtocolStream:
    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


class TorchLikeStream:
    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle


def test_synchronize_waits_for_the_streams_work(run_any, emu):
    async def main():
        h = emu.stream()
        emu.sleep(h, 0.05)
        t0 = time.monotonic()
        await aiocuda.synchronize(h)
        return time.monotonic() - t0

    assert run_any(main()) >= 0.045


@pytest.mark.parametrize("wrap", [int, ProtocolStream, TorchLikeStream])
def test_stream_like_objects(run_any, emu, wrap):
    async def main():
        h = emu.stream()
        emu.sleep(h, 0.01)
        await aiocuda.synchronize(wrap(h))
        ev = aiocuda.record(wrap(h))
        await ev
        return ev.done()

    assert run_any(main()) is True


def test_event_done_follows_the_stream(run_any, emu):
    async def main():
        h = emu.stream()
        emu.sleep(h, 0.05)
        ev = aiocuda.record(h)
        assert not ev.done()
        await ev
        assert ev.done()
        assert "cuda" in repr(ev)

    run_any(main())


def test_many_streams_many_waits(run_any, emu):
    async def main():
        streams = [emu.stream() for _ in range(16)]
        for i, h in enumerate(streams):
            emu.sleep(h, 0.001 * i)
        futs = [aiocuda.synchronize(h) for h in streams for _ in range(1000)]
        await gather(*futs)
        return aiocuda.statistics()

    stats = run_any(main())
    assert stats.completed == 16_000 and stats.pending == 0
    assert _core.cuda_pending() == 0


def test_completions_per_stream_are_fifo(run_any, emu):
    async def main():
        order: dict[int, list[int]] = {}
        streams = [emu.stream() for _ in range(4)]
        futs = []
        for i in range(20_000):
            h = streams[i % 4]
            f = aiocuda.synchronize(h)
            f.add_done_callback(lambda _f, h=h, i=i: order.setdefault(h, []).append(i))
            futs.append(f)
        await gather(*futs)
        return order

    for seq in run_any(main()).values():
        assert seq == sorted(seq) and len(seq) == 5000


def test_submitting_after_a_sticky_error_is_refused_and_a_reset_recovers(run_any, emu):
    # An unknown stream handle is undefined behaviour in the driver (the emulator aborts, see
    # tests/test_emulator.py), so aiocuda promises nothing for one; a broken context it reports.
    async def main():
        h = emu.stream()
        await aiocuda.synchronize(h)  # the context is known to aiocuda
        emu.inject_error(719)
        with pytest.raises(aiocuda.CudaError) as info:
            aiocuda.synchronize(h)
        assert info.value.name == "CUDA_ERROR_LAUNCH_FAILED"
        emu.reset_device(0)  # the only way back; it destroyed h
        await aiocuda.synchronize(emu.stream())

    run_any(main())


def test_backends_lists_cuda_with_the_emulator(emu):
    assert aiocuda.backends() == ("cpu", "cuda")


def test_event_synchronize_blocks_and_reports_errors(run_any, emu):
    async def main():
        h = emu.stream()
        emu.sleep(h, 0.03)
        ev = aiocuda.record(h)
        await in_thread(ev.synchronize)
        assert ev.done()
        emu.sleep(h, 5)
        ev2 = aiocuda.record(h)
        emu.inject_error(700)
        with pytest.raises(aiocuda.CudaError, match="ILLEGAL_ADDRESS"):
            ev2.synchronize()
        with pytest.raises(aiocuda.CudaError, match="ILLEGAL_ADDRESS"):
            ev2.done()
        with pytest.raises(aiocuda.CudaError, match="ILLEGAL_ADDRESS"):
            await ev2
        emu.reset_device(0)

    run_any(main())


# ---- foreign events and whole-device waits (torch.cuda.Event, TensorFlow) ----------------------
def test_a_foreign_event_is_awaited_when_it_completes(run_any, emu):
    s = emu.stream()
    emu.sleep(s, 0.1)
    ev = emu.event(s)

    async def main():
        t0 = time.perf_counter()
        fut = wait_cuda_event(ev, 0)
        await sleep(0.03)
        assert not fut.done()
        await fut
        return time.perf_counter() - t0

    assert run_any(main()) >= 0.09


def test_a_late_event_does_not_hold_up_an_early_one(run_any, emu):
    slow, fast = emu.stream(), emu.stream()
    emu.sleep(slow, 0.5)
    late, early = emu.event(slow), emu.event(fast)

    async def main():
        f_late = wait_cuda_event(late, 0)
        await wait_for(wait_cuda_event(early, 0), 0.3)  # each wait has its own stream
        assert not f_late.done()
        await f_late

    run_any(main())


def test_an_event_never_recorded_is_complete(run_any, emu):
    async def main():
        await wait_for(wait_cuda_event(0, 0), 1)

    run_any(main())


def test_event_and_device_waits_check_the_device(run_any, emu):
    async def main():
        with pytest.raises(aiocuda.CudaError, match="no CUDA device 3: this machine has 2") as e:
            wait_cuda_event(emu.event(emu.stream()), 3)
        assert e.value.code == 101 and e.value.name == "CUDA_ERROR_INVALID_DEVICE"
        with pytest.raises(aiocuda.CudaError, match="no CUDA device 2"):
            aiocuda.synchronize_device(2)
        with pytest.raises(aiocuda.CudaError, match="no CUDA device 2"):
            aiocuda.synchronize(0, device=2)
        for bad in (-1, 2**31):  # as synchronize(device=) says: no internal signature dump
            with pytest.raises(ValueError, match="CUDA device ordinal in"):
                aiocuda.synchronize_device(bad)
            with pytest.raises(ValueError, match="CUDA device ordinal in"):
                aiocuda.record(0, device=bad)
        with pytest.raises(TypeError, match="int CUDA device ordinal"):
            aiocuda.synchronize_device(True)

    run_any(main())


def test_synchronize_device_waits_for_every_stream_and_serves_many_waiters(run_any, emu):
    a, b = emu.stream(), emu.stream()
    emu.sleep(a, 0.1)
    emu.sleep(b, 0.2)

    async def main():
        t0 = time.perf_counter()
        await gather(*[aiocuda.synchronize_device(0) for _ in range(200)])
        return time.perf_counter() - t0

    assert run_any(main()) >= 0.19


def test_synchronize_device_fails_on_a_sticky_error(run_any, emu):
    s = emu.stream()
    emu.sleep(s, 5)

    async def main():
        fut = aiocuda.synchronize_device(0)
        await sleep(0.05)
        emu.inject_error(700)  # CUDA_ERROR_ILLEGAL_ADDRESS
        with pytest.raises(aiocuda.CudaError) as e:
            await wait_for(fut, 2)
        assert e.value.code == 700
        emu.reset_device(0)

    run_any(main())


def test_gpu_op_on_a_tensorflow_gpu_device_awaits_the_device(run_any, emu):
    # gpu_op's TensorFlow GPU path without TensorFlow: an explicit device and a plain function.
    s = emu.stream()

    async def main():
        def enqueue() -> str:
            emu.sleep(s, 0.1)  # what a TF op does: queue device work and return at once
            return "queued"

        t0 = time.perf_counter()
        assert await aiocuda.gpu_op(enqueue, device="/GPU:0") == "queued"
        return time.perf_counter() - t0

    assert run_any(main()) >= 0.09


def test_gpu_op_with_a_raw_cuda_stream(run_any, emu):
    s = emu.stream()

    async def main():
        t0 = time.perf_counter()
        out = await aiocuda.gpu_op(lambda n: (emu.sleep(s, 0.05), n * 2)[1], 21, stream=s)
        return out, time.perf_counter() - t0

    out, took = run_any(main())
    assert out == 42 and took >= 0.045


def test_gpu_op_on_a_default_stream_handle_takes_its_device(run_any, emu):
    # gpu_op(fn, stream=0, device=0) refused device=0 as unknown, and device="cuda:0" was
    # dropped: the await of handle 0 (the current context's default stream, none current on
    # this thread) then failed after fn had run. A device= that cannot be the stream's is
    # refused before fn runs.
    async def main():
        out = [await aiocuda.gpu_op(lambda n: n * 2, 21, stream=0, device=0)]
        ran: list[int] = []
        with pytest.raises(ValueError, match="names the cpu, but stream= is a CUDA stream"):
            await aiocuda.gpu_op(ran.append, 1, stream=0, device="cpu")
        with pytest.raises(ValueError, match="device must be a CUDA device ordinal"):
            await aiocuda.gpu_op(ran.append, 1, stream=0, device=-1)
        # Refused by the driver side before fn runs too (they were refused after it: the work
        # was queued, its result lost, and a retry ran fn twice).
        current = ctypes.c_void_p()  # whatever an earlier test left current on this thread
        assert emu.lib.cuCtxGetCurrent(ctypes.byref(current)) == 0
        assert emu.lib.cuCtxSetCurrent(None) == 0
        try:
            with pytest.raises(aiocuda.AiocudaError, match="none is current on this thread"):
                await aiocuda.gpu_op(ran.append, 2, stream=0)
        finally:
            emu.lib.cuCtxSetCurrent(current)
        with pytest.raises(aiocuda.AiocudaError, match="CU_STREAM_PER_THREAD"):
            await aiocuda.gpu_op(ran.append, 3, stream=2, device=0)
        with pytest.raises(aiocuda.CudaError, match="CUDA_ERROR_INVALID_DEVICE"):
            await aiocuda.gpu_op(ran.append, 4, stream=0, device=7)
        with pytest.raises(aiocuda.CudaError, match="CUDA_ERROR_INVALID_DEVICE"):
            await aiocuda.gpu_op(ran.append, 5, device="/GPU:7")
        return out, ran

    assert run_any(main()) == ([42], [])


def test_every_api_takes_a_stream_object_with_a_cuda_stream_attribute(run_any, emu):
    class Stream:  # torch.cuda.Stream's shape, without torch
        def __init__(self, handle: int) -> None:
            self.cuda_stream, self.device_index = handle, 0

    s = Stream(emu.stream())

    # Each wait is checked by an event recorded after the work: aiocuda's own mark on the stream
    # may still be finishing when the await returns (a stream query may say not ready).
    def work() -> int:
        emu.sleep(s.cuda_stream, 0.02)
        return emu.event(s.cuda_stream)

    async def main():
        done = [work()]
        await aiocuda.wait(s)  # as synchronize() and record() take it
        out = await aiocuda.gpu_op(lambda n: (done.append(work()), n * 2)[1], 21, stream=s)
        assert [emu.lib.cuEventQuery(ctypes.c_void_p(e)) for e in done] == [0, 0]  # it has run
        for e in done:
            emu.lib.cuEventDestroy_v2(ctypes.c_void_p(e))
        return out

    assert run_any(main()) == 42
