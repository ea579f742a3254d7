"""Bad inputs: each gets a clear exception that says what to do, and nothing is left pending."""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import warnings

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


def test_numbers_of_other_types_are_numbers(run):
    # numpy's float32 and int64 and a Fraction were refused with "seconds must be a number,
    # got float32" (they are numbers; only int and float were taken).
    np = pytest.importorskip("numpy")
    from fractions import Fraction

    async def main():
        async with aiocuda.CpuStream() as s:
            for seconds in (np.float32(0.001), np.int64(0), Fraction(1, 1000)):
                s.delay(seconds)
            with pytest.raises(ValueError, match=">= 0 and at most 1e"):
                s.delay(np.float32("nan"))
            await s

    run(main())
    b = aiocuda.batch(max_batch_size=np.int64(4), max_wait_s=np.float32(0.001),
                      max_concurrent_batches=np.int32(2))(_double_all)
    assert (b.max_batch_size, b.max_concurrent_batches) == (4, 2)
    assert type(b.max_batch_size) is int and type(b.max_wait_s) is float


def test_a_numpy_int_device_is_an_ordinal():
    # gpu_op(device=np.int64(0)) said "unknown device np.int64(0)".
    np = pytest.importorskip("numpy")
    pytest.importorskip("torch")
    from aiocuda._ops import _parse_device

    assert _parse_device(np.int64(0)) == _parse_device(0)
    with pytest.raises(ValueError, match="ordinal"):
        _parse_device(np.int64(-1))


async def _double_all(items):
    return [2 * x for x in items]


def test_a_cpu_stream_cannot_wait_on_a_cuda_event(run, emu):
    async def main():
        ev = aiocuda.record(emu.stream())
        with aiocuda.CpuStream() as s:
            with pytest.raises(TypeError, match="recorded on a CpuStream"):
                s.wait_event(ev)
        await ev

    run(main())


def test_a_copy_of_an_event_is_the_event(run, emu):
    # copy.copy gave a second Event holding the same native mark, and each released it when
    # collected: the second release freed it again (the process died); deepcopy raised
    # "cannot pickle '_asyncio.Future' object", so a structure holding an event could not be
    # deep-copied.
    async def main():
        h = emu.stream()
        ev = aiocuda.record(h)
        assert copy.copy(ev) is ev
        assert copy.deepcopy({"ev": ev})["ev"] is ev
        await ev
        with aiocuda.CpuStream() as s:
            cpu = s.record()
            assert copy.copy(cpu) is cpu and copy.deepcopy(cpu) is cpu
            await cpu
        del ev
        gc.collect()
        for _ in range(3):  # the pool's events are reused as before
            e = aiocuda.record(h)
            await e
            assert e.done()

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


async def _double(x):
    return 2 * x


class _AsyncCall:
    async def __call__(self, x):
        return 2 * x


def test_an_async_function_is_refused_with_what_to_do(run):
    async def main():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a coroutine made and never awaited would warn
            for fn in (_double, functools.partial(_double), _AsyncCall(), lambda x: _double(x)):
                with pytest.raises(TypeError, match=r"returned a coroutine.*`await fn\(\.\.\.\)`"):
                    await s.submit(fn, 1)
            for fn in (_double, functools.partial(_double)):
                with pytest.raises(TypeError, match=r"async function.*await it on the loop"):
                    await aiocuda.gpu_op(fn, 1)
            for fn in (_AsyncCall(), lambda x: _double(x)):  # found on the cpu path's worker
                with pytest.raises(TypeError, match=r"returned a coroutine.*`await fn\(\.\.\.\)`"):
                    await aiocuda.gpu_op(fn, 1)
            for call in (s.submit, aiocuda.gpu_op):
                coro = _double(1)
                with pytest.raises(TypeError, match=r"awaitable <coroutine.*await it directly"):
                    await call(coro)
                assert await coro == 2  # refused, not consumed
            gc.collect()
        assert await s.submit(int, 5) == 5  # the stream stays usable

    s = aiocuda.CpuStream()
    run(main())
    s.close()


def test_wait_on_an_awaitable_it_does_not_know_says_to_await_it(run):
    async def main():
        loop = asyncio.get_running_loop()
        coro = _double(1)
        fut = loop.create_future()
        for x in (coro, fut):
            with pytest.raises(TypeError, match=r"cannot wait on .*: it is awaitable, so await "
                                                r"it directly"):
                await aiocuda.wait(x)
        assert await coro == 2  # refused, not consumed
        fut.set_result(3)
        assert await fut == 3
        with pytest.raises(TypeError, match=r"TensorFlow tensor$"):  # not awaitable: no hint
            await aiocuda.wait(object())

    run(main())


def test_an_event_made_directly_is_a_complete_event_never_recorded(run):
    ev = aiocuda.Event()
    assert repr(ev) == "<aiocuda.Event never recorded>"
    assert ev.done()
    ev.synchronize()

    async def main():
        await ev
        await asyncio.wait_for(aiocuda.wait(ev), 5)
        async with aiocuda.CpuStream() as s:
            s.wait_event(ev)  # nothing to wait for
            assert await asyncio.wait_for(s.submit(int, 3), 5) == 3
            recorded = s.record()
            assert repr(recorded) in ("<aiocuda.Event cpu pending>", "<aiocuda.Event cpu done>")
            await recorded
            assert repr(recorded) == "<aiocuda.Event cpu done>"

    run(main())
    del ev
    gc.collect()  # nothing to release, and no error from its finalizer (warnings are errors)
    with pytest.raises(TypeError):
        aiocuda.Event(None, 0)  # the internal form is not public
    gc.collect()  # the half-made event's finalizer stays quiet too


def test_an_events_repr_follows_the_event_after_its_loop_closed():
    # Its loop's future never settles once that loop closed: the repr said pending for good.
    s = aiocuda.CpuStream()

    async def main() -> aiocuda.Event:
        s.delay(0.05)
        return s.record()

    ev = asyncio.run(main())
    assert repr(ev) == "<aiocuda.Event cpu pending>"
    ev.synchronize()
    assert ev.done() and repr(ev) == "<aiocuda.Event cpu done>"
    s.close()


def test_a_strategy_that_is_not_a_str_is_a_type_error():
    # set_strategy(None) or (3) was a ValueError; the API's rule is TypeError for a wrong type.
    for bad in (None, 3, ["flag"], b"flag"):
        with pytest.raises(TypeError, match=r"strategy must be a str, one of \('callback'"):
            aiocuda.set_strategy(bad)
    with pytest.raises(ValueError, match="strategy must be one of"):
        aiocuda.set_strategy("Flag")
    assert aiocuda.strategy() == "flag"


@pytest.mark.parametrize("value, ok", [("bogus", False), ("Flag", False), ("callback", True),
                                       ("", True)])
def test_an_unknown_strategy_in_the_environment_is_refused_at_import(value, ok):
    # It was ignored without a word: the engine ran "flag" whatever the variable said.
    from .conftest import python_subprocess

    r = python_subprocess("import aiocuda; print(aiocuda.strategy())",
                          env={"AIOCUDA_STRATEGY": value})
    if ok:
        assert r.returncode == 0 and r.stdout.strip() == (value or "flag"), r.stderr
    else:
        assert r.returncode != 0
        assert f"AIOCUDA_STRATEGY={value!r} is not a completion strategy" in r.stderr


def test_no_file_descriptor_left_for_a_loops_queue_says_so_and_the_loop_recovers():
    # A loop's first await makes its queue, whose eventfd needs a file descriptor: at the limit
    # it was a bare RuntimeError("eventfd: Too many open files") (found by review).
    from .conftest import python_subprocess

    r = python_subprocess(
        "import asyncio, os, resource, aiocuda\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "async def main():\n"
        "    s = aiocuda.CpuStream()\n"
        "    hog = []\n"
        "    try:\n"
        "        while True:\n"
        "            hog.append(os.open('/dev/null', os.O_RDONLY))\n"
        "    except OSError:\n"
        "        pass\n"
        "    try:\n"
        "        await s.submit(lambda: 1)\n"
        "    except aiocuda.AiocudaError as e:\n"
        "        print('refused:', e)\n"
        "    for fd in hog:\n"
        "        os.close(fd)\n"
        "    print('then:', await s.submit(lambda: 'ok'))\n"
        "    s.close()\n"
        "asyncio.run(main())\n"
    )
    assert r.returncode == 0, r.stderr
    assert "Too many open files" in r.stdout and "ulimit -n" in r.stdout, r.stdout
    assert r.stdout.splitlines()[-1] == "then: ok", r.stdout
