"""Bad inputs: each gets a clear exception that says what to do, and nothing is left pending."""

from __future__ import annotations


import pytest

import aiocuda


def test_no_running_loop():
    s = aiocuda.CpuStream()
    with pytest.raises(aiocuda.AiocudaError, match=r"synchronize\(\) needs a running event loop"):
        aiocuda.synchronize(s)
    with pytest.raises(aiocuda.AiocudaError, match=r"record\(\) needs a running event loop"):
        aiocuda.record(s)
    with pytest.raises(aiocuda.AiocudaError, match=r"submit\(\) needs a running event loop"):
        s.submit(print)
    with pytest.raises(aiocuda.AiocudaError, match="asyncio.run"):
        aiocuda.statistics()
    s.close()


def test_the_error_is_a_runtime_error_too():
    assert issubclass(aiocuda.AiocudaError, RuntimeError)
    assert issubclass(aiocuda.CudaError, aiocuda.AiocudaError)
    e = aiocuda.CudaError(700, "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered")
    assert (e.code, e.name) == (700, "CUDA_ERROR_ILLEGAL_ADDRESS")
    assert aiocuda.CudaError(999, "odd").name == "CUDA_ERROR_999"
    import pickle

    again = pickle.loads(pickle.dumps(e))
    assert (again.code, again.name, str(again)) == (e.code, e.name, str(e))


@pytest.mark.parametrize(
    ("stream", "exc", "match"),
    [
        ("stream", TypeError, "expected a stream.*got str"),
        (None, TypeError, "got NoneType"),
        (1.5, TypeError, "got float"),
        (True, TypeError, "cannot be a bool"),
        (-1, ValueError, "out of range"),
        (2**64, ValueError, "out of range"),
        (type("Bad", (), {"__cuda_stream__": lambda self: 5})(), TypeError, "version, handle"),
        (type("BadT", (), {"cuda_stream": "x"})(), TypeError, "not int"),
    ],
)
def test_bad_streams(run, stream, exc, match):
    async def main():
        with pytest.raises(exc, match=match):
            aiocuda.synchronize(stream)
        with pytest.raises(exc, match=match):
            aiocuda.record(stream)
        assert aiocuda.statistics().pending == 0

    run(main())


def test_bad_arguments_to_cpu_streams(run):
    async def main():
        with aiocuda.CpuStream() as s:
            with pytest.raises(TypeError, match="needs a callable"):
                s.submit(42)
            with pytest.raises(TypeError, match="number"):
                s.delay("1")
            for bad in (-1, float("nan"), float("inf"), 1e300, 10**400, -(10**400)):
                with pytest.raises(ValueError, match=">= 0 and at most 1e"):
                    s.delay(bad)
            with pytest.raises(TypeError, match="aiocuda.Event"):
                s.wait_event(object())
            await s
            assert aiocuda.statistics().pending == 0

    run(main())


def test_a_cpu_stream_cannot_wait_on_a_cuda_event(run, emu):
    async def main():
        ev = aiocuda.record(emu.stream())
        with aiocuda.CpuStream() as s:
            with pytest.raises(TypeError, match="recorded on a CpuStream"):
                s.wait_event(ev)
        await ev

    run(main())


def test_an_exception_from_a_call_reaches_the_waiting_task_only(run):
    async def main():
        with aiocuda.CpuStream() as s:
            fut = s.submit(int, "not a number")
            with pytest.raises(ValueError, match="invalid literal"):
                await fut
            # A failure nobody awaits is reported as asyncio reports any such future, once.
            return await s.submit(int, "5")

    assert run(main()) == 5
