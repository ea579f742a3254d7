"""The cuda backend end to end, against the driver emulator (tests/emu)."""

from __future__ import annotations

import asyncio
import time

import pytest

import aiocuda
from aiocuda import _core

pytestmark = pytest.mark.emu


class ProtocolStream:
    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


class TorchLikeStream:
    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle


def test_synchronize_waits_for_the_streams_work(run, emu):
    async def main():
        h = emu.stream()
        emu.sleep(h, 0.05)
        t0 = time.monotonic()
        await aiocuda.synchronize(h)
        return time.monotonic() - t0

    assert run(main()) >= 0.045


@pytest.mark.parametrize("wrap", [int, ProtocolStream, TorchLikeStream])
def test_stream_like_objects(run, emu, wrap):
    async def main():
        h = emu.stream()
        emu.sleep(h, 0.01)
        await aiocuda.synchronize(wrap(h))
        ev = aiocuda.record(wrap(h))
        await ev
        return ev.done()

    assert run(main()) is True


def test_event_done_follows_the_stream(run, emu):
    async def main():
        h = emu.stream()
        emu.sleep(h, 0.05)
        ev = aiocuda.record(h)
        assert not ev.done()
        await ev
        assert ev.done()
        assert "cuda" in repr(ev)

    run(main())


def test_many_streams_many_waits(run, emu):
    async def main():
        streams = [emu.stream() for _ in range(16)]
        for i, h in enumerate(streams):
            emu.sleep(h, 0.001 * i)
        futs = [aiocuda.synchronize(h) for h in streams for _ in range(1000)]
        await asyncio.gather(*futs)
        return aiocuda.statistics()

    stats = run(main())
    assert stats.completed == 16_000 and stats.pending == 0
    assert _core.cuda_pending() == 0


def test_completions_per_stream_are_fifo(run, emu):
    async def main():
        order: dict[int, list[int]] = {}
        streams = [emu.stream() for _ in range(4)]
        futs = []
        for i in range(20_000):
            h = streams[i % 4]
            f = aiocuda.synchronize(h)
            f.add_done_callback(lambda _f, h=h, i=i: order.setdefault(h, []).append(i))
            futs.append(f)
        await asyncio.gather(*futs)
        return order

    for seq in run(main()).values():
        assert seq == sorted(seq) and len(seq) == 5000


def test_an_unknown_handle_is_a_cuda_error(run, emu):
    async def main():
        with pytest.raises(aiocuda.CudaError, match="CUDA_ERROR_INVALID_HANDLE") as info:
            aiocuda.synchronize(0xDEAD0000)
        assert info.value.code == 400
        with pytest.raises(aiocuda.CudaError, match="CUDA_ERROR_INVALID_HANDLE"):
            aiocuda.record(0xDEAD0000)
        assert aiocuda.statistics().pending == 0

    run(main())


def test_submitting_after_a_sticky_error_is_refused_and_reset_recovers(run, emu):
    async def main():
        h = emu.stream()
        emu.inject_error(719)
        with pytest.raises(aiocuda.CudaError) as info:
            aiocuda.synchronize(h)
        assert info.value.name == "CUDA_ERROR_LAUNCH_FAILED"
        emu.reset()
        await aiocuda.synchronize(h)

    run(main())


def test_backends_lists_cuda_with_the_emulator(emu):
    assert aiocuda.backends() == ("cpu", "cuda")


def test_event_synchronize_blocks_and_reports_errors(run, emu):
    async def main():
        loop = asyncio.get_running_loop()
        h = emu.stream()
        emu.sleep(h, 0.03)
        ev = aiocuda.record(h)
        await loop.run_in_executor(None, ev.synchronize)
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

    run(main())
