"""Closing a CpuStream never waits on a loop's thread, and nothing hangs an exit forever.

The work in these tests waits for a gate that the test opens only after the close under test
has returned (or from the loop while it waits): a close that waited would see the work end
first (its gate times out), so each check is about order, not about how long anything took.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import aiocuda
from .conftest import Ticker
from .stress.common import under_asan

GATE_S = 10  # how long gated work waits for its gate before it gives up (a close that waited)


class Gated:
    """Work for a stream that waits for `gate`, then says whether the gate was opened."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.finished = threading.Event()

    def __call__(self) -> bool:
        opened = self.gate.wait(GATE_S)
        self.finished.set()
        return opened


@pytest.mark.parametrize("how", ["close", "with", "last reference"])
def test_closing_on_the_loop_returns_while_the_work_runs(run, how):
    async def main():
        work = Gated()
        if how == "with":
            with aiocuda.CpuStream() as s:
                fut = s.submit(work)
        else:
            s = aiocuda.CpuStream()
            fut = s.submit(work)
            if how == "close":
                s.close()
                assert s.closed
            else:
                del s  # the last reference: the stream is collected here
                gc.collect()
        running = not work.finished.is_set()  # a close that waited saw the work end
        work.gate.set()
        assert await fut is True  # the work still ran, in the background, and completed
        return running

    assert run(main()) is True


@pytest.mark.parametrize("how", ["aclose", "async with"])
def test_aclose_waits_for_the_work_and_the_loop_runs_meanwhile(run, how):
    async def open_gate_later(work):
        await asyncio.sleep(0.05)
        work.gate.set()

    async def main():
        work = Gated()
        opener = asyncio.ensure_future(open_gate_later(work))
        async with Ticker() as ticker:
            if how == "aclose":
                s = aiocuda.CpuStream()
                fut = s.submit(work)
                await s.aclose()
            else:
                async with aiocuda.CpuStream() as s:
                    fut = s.submit(work)
            ticks = ticker.ticks
        assert s.closed
        assert work.finished.is_set() and fut.done()  # it waited for the work
        assert s._wait_closed(0)  # and for the worker to exit
        await opener
        # Only the loop opens the gate: had the wait blocked it, the work would have timed out.
        assert fut.result() is True
        assert ticks >= 2
        await s.aclose()  # idempotent

    run(main())


def test_aclose_waits_for_work_that_a_close_left_running(run):
    async def main():
        work = Gated()
        s = aiocuda.CpuStream()
        fut = s.submit(work)
        s.close()  # returns at once on the loop
        waiting = asyncio.ensure_future(s.aclose())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        work.gate.set()
        await waiting
        assert work.finished.is_set()
        assert await fut is True

    run(main())


def test_a_cancelled_aclose_leaves_the_stream_closed_and_its_work_running(run):
    async def main():
        work = Gated()
        s = aiocuda.CpuStream()
        fut = s.submit(work)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.aclose(), 0.05)
        assert s.closed
        with pytest.raises(aiocuda.AiocudaError, match="closed"):
            s.submit(int)
        assert not work.finished.is_set()
        work.gate.set()
        assert await fut is True

    run(main())


def test_a_cancelled_async_with_block_does_not_wait_for_the_work(run):
    # A task cancelled inside `async with CpuStream()` (a timeout, a client gone) went on to
    # await all the stream's work in __aexit__ (asyncio delivers a cancellation once): the
    # cancellation, and a timeout around the block, waited as long as the work ran.
    async def main():
        work = Gated()
        streams = []

        async def block():
            async with aiocuda.CpuStream() as s:
                streams.append(s)
                fut = s.submit(work)
                await asyncio.sleep(GATE_S)  # cancelled meanwhile
            return fut

        task = asyncio.ensure_future(block())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not work.finished.is_set()  # it did not wait for the work
        assert streams[0].closed  # but the stream is closed, as a cancelled aclose() leaves it
        work.gate.set()
        await streams[0].aclose()  # the work runs to its end in the background
        assert work.finished.is_set()

    run(main())


def test_close_on_a_thread_without_a_loop_waits_for_the_work(run):
    async def main():
        work = Gated()
        s = aiocuda.CpuStream()
        fut = s.submit(work)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, work.gate.set)
        # The plain thread waits; the loop stays free, and opens the gate meanwhile.
        finished_when_closed = await asyncio.to_thread(
            lambda: (s.close(), work.finished.is_set())[1])
        assert finished_when_closed
        assert await fut is True

    run(main())


def test_a_stream_may_close_itself_from_its_own_work(run):
    async def main():
        s = aiocuda.CpuStream()
        # On the worker there is no running loop: close() cannot wait for itself, and returns.
        await asyncio.wait_for(s.submit(s.close), GATE_S)
        await asyncio.wait_for(s.aclose(), GATE_S)

    run(main())


# ---- exit and Ctrl-C: in a fresh interpreter, so a hang is a timeout ----------------------------

STUCK = {
    # Work that never returns, in each way it can: blocked with the GIL released, spinning in
    # Python (it holds the GIL in turns), and a native delay.
    "blocked": "s.submit(threading.Event().wait)",
    "spinning": "s.submit(spin)",
    "delay": "s.delay(1e6)",
}

# The child handles Ctrl-C as Python does in a terminal: a child of a shell's background job
# inherits SIGINT ignored, and Python then installs no handler (CI run with `&`: the Ctrl-C test
# hung for 60 s under ASan, its SIGINT ignored).
PRELUDE = """
import asyncio, signal, sys, threading, time, aiocuda
signal.signal(signal.SIGINT, signal.default_int_handler)

def spin():
    while True:
        pass
"""


def python(code: str, env: dict[str, str] | None = None, **kw):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


def finish(p: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"hung for {timeout} s:\n{out}\n{err}")


@pytest.mark.parametrize("stuck", sorted(STUCK))
@pytest.mark.parametrize("dropped", [False, True], ids=["kept", "collected"])
def test_exit_does_not_hang_on_work_that_never_returns(stuck, dropped):
    if stuck == "spinning" and under_asan():
        # CPython ends a thread that wants the GIL back during finalization with pthread_exit,
        # a forced unwind through the worker's frames, which AddressSanitizer reports as a
        # stack-buffer-overflow of 32 bytes (its report is cut short by the exit; seen only
        # here, only under ASan, and not with the worker blocked outside Python). To look into:
        # issue 15's closing note.
        pytest.skip("a forced unwind at interpreter exit is reported by AddressSanitizer")
    p = python(PRELUDE + f"""
s = aiocuda.CpuStream()
async def main():
    {STUCK[stuck]}
    await asyncio.sleep(0.05)
asyncio.run(main())
{"del s" if dropped else ""}
print("end of main", flush=True)
""", env={"AIOCUDA_EXIT_TIMEOUT": "0.5"})
    out, err = finish(p)
    assert p.returncode == 0, err
    assert out == "end of main\n"
    assert "1 CpuStream worker(s) still running" in err
    assert "terminate" not in err  # a worker stopped by the interpreter's exit unwinds cleanly


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_a_bad_exit_timeout_says_so_and_waits_the_default(value):
    # It was taken silently as the default: a typo went unnoticed.
    p = python(PRELUDE + """
s = aiocuda.CpuStream()
s.delay(0.2)
print("end of main", flush=True)
""", env={"AIOCUDA_EXIT_TIMEOUT": value})
    out, err = finish(p)
    assert p.returncode == 0, err
    assert out == "end of main\n"
    assert f"AIOCUDA_EXIT_TIMEOUT={value!r} is not a number of seconds >= 0" in err
    assert "still running" not in err  # the default (10 s) waited for the work


def test_a_close_late_in_exit_does_not_wait_for_a_worker_the_interpreter_stopped():
    # Exit gave up on a busy worker after AIOCUDA_EXIT_TIMEOUT; the worker then reached Python
    # code during finalization, where CPython stops a thread for good, and a close() from a
    # module global's __del__ waited for it forever (found by review).
    p = python(PRELUDE + """
import os
class Holder:
    def __init__(self, s):
        self.s = s
    def __del__(self):
        self.s.close()
        os.write(1, b"closed\\n")
async def main():
    s = aiocuda.CpuStream()
    s.submit(time.sleep, 1.5)
    s.submit(int)  # Python code again, after the exit's wait has given up
    return s
holder = Holder(asyncio.run(main()))
""", env={"AIOCUDA_EXIT_TIMEOUT": "0.5"})
    out, err = finish(p)
    assert p.returncode == 0, err
    assert out == "closed\n"


@pytest.mark.parametrize("dropped", [False, True], ids=["kept", "collected"])
def test_exit_waits_for_work_that_finishes(dropped):
    p = python(PRELUDE + f"""
s = aiocuda.CpuStream()
async def main():
    s.submit(lambda: (time.sleep(0.3), print("the work ran", flush=True)))
asyncio.run(main())
{"del s" if dropped else ""}
""")
    out, err = finish(p)
    assert p.returncode == 0, err
    assert out == "the work ran\n"
    assert err == ""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a process group")
@pytest.mark.parametrize("where", ["close", "exit", "event"])
def test_ctrl_c_stops_a_wait_for_work_that_never_returns(where):
    # A close() on the main thread with no loop, an Event's synchronize() and interpreter exit
    # wait for the work: on work that never returns, Ctrl-C (SIGINT) must end the wait (the
    # Event's was one wait, which no signal ended).
    then = {"close": "s.close()", "event": "ev.synchronize()", "exit": ""}[where]
    p = python(PRELUDE + f"""
s = aiocuda.CpuStream()
async def main():
    s.submit(threading.Event().wait)
    return s.record()
ev = asyncio.run(main())
print("waiting", flush=True)
{then}
""", env={"AIOCUDA_EXIT_TIMEOUT": "600" if where == "exit" else "0.5"})
    assert p.stdout is not None
    assert p.stdout.readline() == "waiting\n"
    time.sleep(0.3)  # into the wait (signalling earlier ends it just as well)
    p.send_signal(signal.SIGINT)
    out, err = finish(p, timeout=60)
    assert "KeyboardInterrupt" in err


def test_gpu_op_after_the_exit_hook_says_the_interpreter_is_exiting():
    # An atexit handler registered before aiocuda was imported runs after aiocuda's, which has
    # closed gpu_op's pool: the error said "the CpuStream is closed: create a new one", of a
    # stream the caller never made (review).
    p = python("""
import asyncio, atexit
def late():
    import aiocuda
    try:
        asyncio.run(aiocuda.gpu_op(int, "3"))
    except aiocuda.AiocudaError as e:
        print(e, flush=True)
atexit.register(late)
import aiocuda
print(asyncio.run(aiocuda.gpu_op(int, "2")), flush=True)
""")
    out, err = finish(p)
    assert p.returncode == 0, err
    assert out.splitlines() == [
        "2", "gpu_op() was called after aiocuda's exit hook closed its worker pool: the "
        "interpreter is exiting. Await GPU work before the program ends, not in an atexit "
        "handler or a __del__ that runs at exit"]


def test_a_close_in_a_late_atexit_handler_gives_up_on_a_worker_stopped_at_exit():
    # A worker waiting natively (an Event's synchronize()) when exit gave up on it is stopped
    # for good when that wait ends (it would be ended by CPython as the interpreter finalizes);
    # a close() from an atexit handler that runs after aiocuda's (registered before the import)
    # waited for it for ever (review).
    p = python("""
import asyncio, atexit, os
held = []
def late():
    held[0].close()
    os.write(1, b"closed\\n")
atexit.register(late)
import aiocuda
async def main():
    other = aiocuda.CpuStream()
    other.delay(30)
    s = aiocuda.CpuStream()
    s.submit(other.record().synchronize)  # its worker waits natively, in slices of 0.1 s
    return [s, other]
held[:] = asyncio.run(main())
""", env={"AIOCUDA_EXIT_TIMEOUT": "0.3"})
    out, err = finish(p)
    assert p.returncode == 0, err
    assert out == "closed\n"
