"""Invariant 8: after fork() the child never touches the parent's queue or driver state."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import warnings
from collections.abc import Callable

import pytest

import aiocuda

from .stress.common import ASAN_FORK, under_asan

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
              pytest.mark.skipif(under_asan(), reason=ASAN_FORK)]


def _fork() -> int:
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork() in a process with threads; that is the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def _child_checks(s: aiocuda.CpuStream, pending: asyncio.Future[None], cuda_handle: int,
                  event: aiocuda.Event, cpu_event: aiocuda.Event) -> int:
    """Runs in the forked child; returns a bitmask of failed checks (0: all passed)."""
    failed = 0
    asyncio.events._set_running_loop(None)  # the parent's loop is not running in this process
    # A future that waited on the parent's work fails instead of hanging.
    if not (pending.done() and isinstance(pending.exception(), aiocuda.AiocudaError)):
        failed |= 1
    # The parent's CpuStream has no worker here, and its CUDA state is unusable: clear errors.
    async def refused(stream: object) -> None:
        try:
            aiocuda.synchronize(stream)
        except aiocuda.AiocudaError as exc:
            if "fork" not in str(exc):
                raise
        else:
            raise AssertionError(f"{stream!r} from the parent was usable in the child")

    async def use_new_stream() -> int:
        with aiocuda.CpuStream() as fresh:
            await aiocuda.synchronize(fresh)
            return await fresh.submit(lambda: 7)

    for bit, coro in ((2, refused(s)), (4, use_new_stream()), (8, refused(cuda_handle))):
        try:
            result = asyncio.run(asyncio.wait_for(coro, 10))  # never hangs the parent's test
            if bit == 4 and result != 7:
                failed |= bit
        except BaseException:
            failed |= bit
    # The parent's CUDA event: querying or waiting on it says why, without touching the driver.
    if not _each_refused_saying("fork", event.done, event.synchronize):
        failed |= 16
    # The parent's cpu event, recorded behind work still running at the fork: that work does
    # not run here, so a wait on it would never end (a child stream's worker hung in it, and
    # every later submit with it). Refused, saying why.
    if not _each_refused_saying("before fork()", cpu_event.synchronize,
                                lambda: aiocuda.CpuStream().wait_event(cpu_event)):
        failed |= 64
    # The parent's loop reader, called here as the parent's loop copy calls it (uvloop polls
    # the epoll set it shares with the parent once more while an exception unwinds through the
    # copy): it neither reads the parent's fd nor raises.
    from aiocuda import _loop

    for st in _loop._orphans:
        try:
            wakeups = st.wakeups
            st._on_readable()
            if st.wakeups != wakeups:
                failed |= 32
        except BaseException:
            failed |= 32
    if not _loop._orphans:
        failed |= 32  # the parent's loop state was not handed over as an orphan
    return failed


def _each_refused_saying(why: str, *calls: Callable[[], object]) -> bool:
    """Whether each call raises an AiocudaError whose message contains `why`."""
    for call in calls:
        try:
            call()
            return False
        except aiocuda.AiocudaError as exc:
            if why not in str(exc):
                return False
    return True


async def _exit_code(pid: int, timeout: float) -> int | str:
    """The child's exit code, or "hung" (it is killed) if it has not exited in `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        await asyncio.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


def test_fork_while_work_is_pending(run, emu):
    async def main():
        h = emu.stream()
        await aiocuda.synchronize(h)  # the driver is initialised in the parent
        emu.sleep(h, 0.3)
        event = aiocuda.record(h)
        with aiocuda.CpuStream() as s:
            s.delay(0.2)
            pending = aiocuda.synchronize(s)
            cpu_event = aiocuda.record(s)
            pid = _fork()
            if pid == 0:  # child
                code = 1
                try:
                    code = 10 + _child_checks(s, pending, h, event, cpu_event)
                finally:
                    os._exit(code)
            code = await _exit_code(pid, 30)
            await asyncio.wait_for(pending, 10)  # the parent's work completes as if nothing happened
            await asyncio.wait_for(event, 10)
            await asyncio.wait_for(cpu_event, 10)
            return code

    assert run(main()) == 10


def test_a_fork_inside_stream_work_ends_the_child_there(run):
    # A function on a CpuStream that forks and returns in the child: the child was a copy of the
    # worker, which ran the parent's next item a second time (here, a second write) and then slept
    # for ever. The child now ends as the function returns.
    r, w = os.pipe()

    def forks() -> int:
        pid = _fork()
        if pid == 0:
            print("from the child")
            return 0  # back into the worker, in the child
        return pid

    def after() -> None:
        os.write(w, b"x")

    async def main():
        with aiocuda.CpuStream() as s:
            s.delay(0.05)  # both calls are queued when the worker takes its next batch
            forked = s.submit(forks)
            later = s.submit(after)
            pid = await asyncio.wait_for(forked, 10)
            await asyncio.wait_for(later, 10)
            return await _exit_code(pid, 10)

    try:
        assert run(main()) == 0
        os.close(w)
        w = -1
        assert os.read(r, 16) == b"x"  # the parent's write alone
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
