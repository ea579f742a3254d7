"""Shared fixtures: both event loops, a strict loop runner, and the CUDA driver emulator."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from .emu.build import build_emulator

REAL_DRIVER = os.environ.get("AIOCUDA_TEST_REAL_DRIVER") == "1"


# The driver is opened on first use, so this must happen before any test touches the cuda
# backend. With AIOCUDA_TEST_REAL_DRIVER=1 (scripts/gpu-check) the real libcuda is used instead;
# AIOCUDA_TEST_EMULATOR=PATH uses an emulator built elsewhere (scripts/tsan-test's instrumented
# one), with its controls.
EMU_PATH: Path | None = None
if os.environ.get("AIOCUDA_TEST_EMULATOR"):
    EMU_PATH = Path(os.environ["AIOCUDA_TEST_EMULATOR"]).resolve()
    os.environ["AIOCUDA_LIBCUDA"] = str(EMU_PATH)
elif not REAL_DRIVER:
    EMU_PATH = build_emulator()
    os.environ["AIOCUDA_LIBCUDA"] = str(EMU_PATH)

from aiocuda import _core, _loop  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a test dependency
    uvloop = None

try:
    import trio
except ImportError:  # pragma: no cover - trio is a test dependency
    trio = None

LOOPS = ["asyncio", "uvloop"]
#: The core suites (the public API's bodies) run on trio too: see tests/loops.py.
ALL_LOOPS = [*LOOPS, "trio"]


@pytest.fixture(params=["flag", "callback", "poll"])
def strategy(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test under each cuda completion strategy; restore the one before."""
    import aiocuda

    before = aiocuda.strategy()
    aiocuda.set_strategy(request.param)
    yield request.param
    aiocuda.set_strategy(before)


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        if uvloop is None:
            pytest.skip("uvloop is not installed (pip install aiocuda[test])")
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class Ticker:
    """While entered, a task that counts how often the loop lets it run (every `period` s).

    `reached` (a threading.Event) is set once it has run `until` times: a call off the loop
    thread that waits on it (``reached.wait(timeout)`` is True) proves the loop kept running
    while that call was under way, however loaded the machine is.
    """

    def __init__(self, period: float = 0.005, until: int = 5) -> None:
        self.period, self.ticks, self.until = period, 0, until
        self.reached = threading.Event()

    async def _run(self) -> None:
        from .loops import sleep

        while True:
            self.ticks += 1
            if self.ticks >= self.until:
                self.reached.set()
            await sleep(self.period)

    async def __aenter__(self) -> Ticker:
        from .loops import Tasks

        self._tasks = Tasks()  # on asyncio a task; in a trio run, a nursery holds it
        await self._tasks.__aenter__()
        self._task = self._tasks.spawn(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await self._tasks.__aexit__(None, None, None)
        if not self._task.done():  # asyncio: let the cancelled task finish
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """No garbage collection in the block, for a test that measures a thread's CPU time.

    A full collection of this suite's heap (torch and TensorFlow loaded: about 450,000 objects)
    takes 50-150 ms of whichever thread allocates at the wrong moment, and may fall in the block:
    a test bounding an event loop thread's CPU at a few percent of 0.5 s would fail on the
    collector's time, not aiocuda's (CI run 3: "a thread used 9.1% of a core").
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def settle_native() -> None:
    """Forget closed loops' queues and wait for every native record to be freed."""
    gc.collect()
    _loop.close_loop_states()
    assert wait_until(lambda: _core.live_records() == 0), (
        f"{_core.live_records()} native records were never freed"
    )


class Runner:
    """Runs coroutines on a fresh loop of one kind; any loop exception handler call fails."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.errors: list[dict[str, Any]] = []

    def __call__(self, coro: Coroutine[Any, Any, Any], *, close: bool = True) -> Any:
        loop = new_loop(self.kind)
        loop.set_exception_handler(lambda _loop, ctx: self.errors.append(ctx))
        try:
            return loop.run_until_complete(coro)
        finally:
            if close:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()


class TrioRunner(Runner):
    """Runs coroutines in a fresh trio run; an error logged by aiocuda's queue task fails."""

    def __call__(self, coro: Coroutine[Any, Any, Any], *, close: bool = True) -> Any:
        if trio is None:
            pytest.skip("trio is not installed (pip install aiocuda[test])")
        errors = self.errors

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                errors.append({"message": record.getMessage(), "exc": record.exc_info})

        async def main() -> Any:
            return await coro

        handler = Catch(logging.ERROR)
        log = logging.getLogger("aiocuda")
        log.addHandler(handler)
        try:
            return trio.run(main)
        finally:
            log.removeHandler(handler)
            coro.close()  # never started if trio refused to run


def runner_for(kind: str) -> Iterator[Runner]:
    """A Runner of `kind`; after the test, nothing native may be left and nothing logged."""
    runner = TrioRunner(kind) if kind == "trio" else Runner(kind)
    yield runner
    settle_native()
    assert not runner.errors, f"unexpected loop exception handler calls: {runner.errors}"


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """Run a coroutine on the stock asyncio loop and on uvloop; check nothing leaked."""
    yield from runner_for(request.param)


@pytest.fixture(params=ALL_LOOPS)
def run_any(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """As `run`, and in a trio run: for bodies written with tests/loops.py's helpers."""
    yield from runner_for(request.param)


class Emu:
    """ctypes controls of the driver emulator (tests/emu/emu.cpp); see tests/test_emulator.py."""

    def __init__(self, path: Path) -> None:
        from .emu.build import load_emulator

        self.lib = load_emulator(path)  # the same library aiocuda dlopen()ed, prototypes declared

    def primary(self, device: int = 0) -> int:
        """Device `device`'s primary context (retained once more)."""
        ctx = ctypes.c_void_p()
        assert self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), device) == 0
        return ctx.value or 0

    def stream(self, ctx: int | None = None, flags: int = 0) -> int:
        """A new stream in `ctx` (default: device 0's primary context)."""
        assert self.lib.cuCtxPushCurrent_v2(ctx if ctx is not None else self.primary()) == 0
        out = ctypes.c_void_p()
        rc = self.lib.cuStreamCreate(ctypes.byref(out), flags)
        self.lib.cuCtxPopCurrent_v2(None)
        assert rc == 0, rc
        return out.value or 0

    def _ctx_of(self, stream: int) -> int:
        if stream in (0, 1, 2):
            return self.primary()
        ctx = ctypes.c_void_p()
        assert self.lib.cuStreamGetCtx(stream, ctypes.byref(ctx)) == 0
        return ctx.value or 0

    def event(self, stream: int, flags: int = 0) -> int:
        """A new event recorded on `stream` (a foreign event, as torch would make one)."""
        assert self.lib.cuCtxPushCurrent_v2(self._ctx_of(stream)) == 0
        ev = ctypes.c_void_p()
        try:
            assert self.lib.cuEventCreate(ctypes.byref(ev), flags) == 0
            assert self.lib.cuEventRecord(ev, stream) == 0
        finally:
            self.lib.cuCtxPopCurrent_v2(None)
        return ev.value or 0

    def sleep(self, stream: int, seconds: float) -> None:
        """Enqueue timed work on `stream` (0: the current context's legacy stream)."""
        assert self.lib.emu_enqueue_sleep(stream, int(seconds * 1e6)) == 0

    def inject_error(self, code: int, device: int = 0) -> None:
        """A sticky error on `device`'s primary context, as after a faulting kernel."""
        self.lib.emu_inject_error(device, code)

    def reset_device(self, device: int = 0) -> None:
        """cuDevicePrimaryCtxReset: destroys the context's streams and events (later use aborts).

        cuda.h makes the code that resets responsible for no other module using the device at
        the time; holding aiocuda's engine between two passes stands for that.
        """
        _core.cuda_hold(True)
        try:
            assert self.lib.cuDevicePrimaryCtxReset_v2(device) == 0
        finally:
            _core.cuda_hold(False)

    def host_fn_stats(self) -> tuple[int, int, int]:
        calls, total, peak = ctypes.c_ulonglong(), ctypes.c_ulonglong(), ctypes.c_ulonglong()
        self.lib.emu_host_fn_stats(ctypes.byref(calls), ctypes.byref(total), ctypes.byref(peak))
        return calls.value, total.value, peak.value

    def blocked_ns(self) -> int:
        """Nanoseconds the calling thread spent blocked in the driver."""
        return int(self.lib.emu_thread_blocked_ns())

    def thread_calls(self, name: str) -> int:
        """How often the calling thread called driver entry point `name`."""
        return int(self.lib.emu_thread_calls(name.encode()))

    def stream_ops(self, stream: int, kind: str) -> int:
        """Operations of `kind` (kernel, record, wait, hostfn, ctxrecord, captured) on `stream`."""
        return int(self.lib.emu_stream_ops(stream, kind.encode()))

    def live(self, what: str) -> int:
        """Live streams, events, graphs, hostfns_pending, threads or emu_threads."""
        return int(self.lib.emu_live(what.encode()))

    def capture_status(self, stream: int) -> int:
        return int(self.lib.emu_capture_status(stream))

    def reset(self) -> None:
        """Restore every control to its default (latency, host-function cap, queue depth)."""
        self.lib.emu_defaults()


@pytest.fixture(scope="session")
def _emu_session() -> Emu:
    if EMU_PATH is None:
        pytest.skip("AIOCUDA_TEST_REAL_DRIVER=1: the real driver is loaded, not the emulator")
    info = _core.cuda_info()
    assert info["available"], info["reason"]
    return Emu(EMU_PATH)


@pytest.fixture
def emu(_emu_session: Emu) -> Iterator[Emu]:
    _emu_session.reset()
    yield _emu_session
    _emu_session.reset()


def python_subprocess(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=60
    )
