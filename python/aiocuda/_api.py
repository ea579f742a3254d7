"""The public API: synchronize, record, Event, CpuStream, backends."""

from __future__ import annotations

import asyncio
import atexit
import inspect
import math
import numbers
import os
import sys
import time
import weakref
from collections.abc import Callable, Generator
from typing import Any, Protocol, TypeVar, Union, runtime_checkable

from . import _core
from ._errors import AiocudaError, CudaError
from ._loop import (is_cancellation, nested_trio, no_loop_error, on_loop_thread, other_loop,
                    running_loop, shield, state_for)

__all__ = [
    "CpuStream", "Event", "StreamLike", "backends", "record", "set_strategy", "strategy",
    "synchronize", "synchronize_device",
]

T = TypeVar("T")


@runtime_checkable
class CudaStreamProtocol(Protocol):
    """The CUDA stream protocol of cuda.core, CuPy and numba."""

    def __cuda_stream__(self) -> tuple[int, int]: ...


class CudaStreamAttribute(Protocol):
    """A stream that gives its handle as a ``cuda_stream`` attribute (``torch.cuda.Stream``)."""

    @property
    def cuda_stream(self) -> int: ...


#: What a stream argument may be: a CpuStream, an object with ``__cuda_stream__`` (cuda.core,
#: CuPy, numba), an object with a ``cuda_stream`` attribute (``torch.cuda.Stream``), or a raw
#: ``CUstream`` handle as an int (0 is the legacy default stream). Objects of untyped libraries
#: (CuPy, numba) are ``Any`` to a type checker, and pass.
StreamLike = Union["CpuStream", CudaStreamProtocol, CudaStreamAttribute, int]

_U64 = 1 << 64
_MAX_DEVICE = 1 << 20  # as the native core: far past any machine's device count
_MAX_DELAY_S = 1e9  # the worker sleeps in nanoseconds of a 64-bit clock: about 292 years at most


def _cuda_handle(stream: object) -> tuple[int, int]:
    """Return the raw CUstream handle of a CUDA stream-like object and its device (-1: unknown).

    A ``torch.cuda.Stream`` carries its device (``device_index``), which matters for its default
    stream: torch reports handle 0 for the default stream of every device. It has
    ``__cuda_stream__`` too, so the device is read whichever way the handle was.
    """
    device = -1
    if isinstance(stream, bool):
        raise TypeError("a stream cannot be a bool; pass a stream object or an int handle")
    if isinstance(stream, int):
        handle = int(stream)
    else:
        proto = getattr(stream, "__cuda_stream__", None)
        if proto is not None:
            value = proto() if callable(proto) else proto
            if not (isinstance(value, tuple) and len(value) == 2):
                raise TypeError(
                    f"{type(stream).__name__}.__cuda_stream__ returned {value!r}; the protocol "
                    "expects a (version, handle) tuple"
                )
            handle = value[1]
        elif hasattr(stream, "cuda_stream"):
            handle = stream.cuda_stream
        else:
            raise TypeError(
                "expected a stream: an aiocuda.CpuStream, an object with __cuda_stream__ "
                "(cuda.core, CuPy, numba), a torch.cuda.Stream, or an int CUstream handle; "
                f"got {type(stream).__name__}"
            )
        if not isinstance(handle, int) or isinstance(handle, bool):
            raise TypeError(
                f"the CUDA stream handle of {type(stream).__name__} is "
                f"{type(handle).__name__}, not int"
            )
        index = getattr(stream, "device_index", None)  # a torch stream's device
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index <= _MAX_DEVICE:
            device = index
    if handle < 0 or handle >= _U64:
        raise ValueError(f"CUstream handle {handle} is out of range: handles are in [0, 2**64)")
    return handle, device


def not_callable(fn: object, what: str) -> TypeError:
    """The error for passing `what` something that is not a function."""
    if inspect.isawaitable(fn):
        return TypeError(
            f"{what} runs plain functions and got the awaitable {fn!r}: await it directly "
            f"(`await ...`), not through {what}"
        )
    return TypeError(f"{what} needs a callable, got {type(fn).__name__}")


def not_a_coroutine_function(fn: object, what: str) -> None:
    """Raise a TypeError saying what to do if `fn` is an async function."""
    if inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"{what} runs plain functions and got the async function {fn!r}: await it on the "
            f"loop instead (`await fn(...)`), not through {what}"
        )


def _refused(code: int, text: str) -> Exception:
    return CudaError(code, text) if code > 0 else AiocudaError(text)


_core.install_hooks(
    asyncio.events._get_running_loop,
    state_for,
    _cuda_handle,
    _refused,
    no_loop_error,
    asyncio.InvalidStateError,
    other_loop,
    nested_trio,
)

#: Native: runs once per operation. See its docstring (``help(aiocuda.synchronize)``).
synchronize = _core.synchronize


def _handle_on(stream: object, device: int | None) -> tuple[int, int]:
    """`stream`'s CUstream handle and CUDA device: its own, else `device`'s, else -1 (the
    current context's)."""
    handle, own = _cuda_handle(stream)
    dev = -1 if device is None else _device_index(device)
    if own >= 0 and dev >= 0 and own != dev:
        raise ValueError(f"the stream is on CUDA device {own}, but device={dev}")
    return handle, max(own, dev)


def check_await(stream: object, device: int | None = None) -> None:
    """Raise what an await on the CUDA stream `stream` would be refused for at once (a bad
    stream, no driver, no such device, a default stream with no context to name it, a capture).
    For callers that enqueue the work before they await it (gpu_op), so that a refused await
    leaves no work behind: the legacy stream of `device` (0) checks the driver and the device."""
    handle, dev = _handle_on(stream, device)
    code, why = _core.cuda_check_stream(handle, dev)
    if code:
        raise _refused(code, why)


def _device_index(device: int) -> int:
    if isinstance(device, bool) or not isinstance(device, int):
        raise TypeError(f"device must be an int CUDA device ordinal, got {type(device).__name__}")
    if device < 0 or device > _MAX_DEVICE:
        raise ValueError(f"device must be a CUDA device ordinal in [0, {_MAX_DEVICE}], got {device}")
    return device


def synchronize_device(device: int = 0) -> asyncio.Future[None]:
    """Return a future done when all work queued so far on CUDA device `device` has finished.

    For frameworks that expose no stream (TensorFlow): a mark of the whole primary context
    (``cuCtxRecordEvent``, CUDA 12.5 and later) completes like any other await; older drivers get
    a native thread calling ``cuCtxSynchronize`` (which spins while it waits). It waits for *all*
    the device's work, so it may over-wait; prefer :func:`synchronize` on a stream when you have
    one. The driver refuses a whole-device mark while a stream of the device captures a CUDA
    graph, and invalidates that capture (cuda.h, ``cuCtxRecordEvent``): the wait then fails
    with ``CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED``. The older drivers' ``cuCtxSynchronize`` does
    the same (as ``torch.cuda.synchronize()`` would): do not wait for a whole device while one
    of its streams captures, and that includes waits made before the capture began and still
    pending: past 8 pending whole-device waits, the later ones share a mark that aiocuda makes
    once an earlier one has passed, which may be after the capture began (the old drivers' thread
    likewise calls ``cuCtxSynchronize`` again for waits made while it was in one).
    """
    loop = running_loop("aiocuda.synchronize_device()")
    fut: asyncio.Future[None] = state_for(loop).queue.wait_device(loop, _device_index(device))
    return fut


def wait_cuda_event(event: int, device: int, keep: object = None) -> asyncio.Future[None]:
    """Return a future done when the CUevent `event` of device `device` has completed.

    Works for an event recorded by anyone on any stream: aiocuda's engine watches it (it is
    never waited on from the loop thread). `keep` (the object owning the event) stays referenced
    until the wait ends, so the event is not destroyed under the driver. An event never recorded
    (handle 0) is complete, as ``query()`` says.
    """
    loop = running_loop("awaiting a CUDA event")
    if not event:
        fut: asyncio.Future[None] = loop.create_future()
        fut.set_result(None)
        return fut
    return state_for(loop).queue.wait_cuda_event(loop, event, _device_index(device), keep)


def record(stream: StreamLike, *, device: int | None = None) -> Event:
    """Record an event at the current end of `stream`'s work; ``await event`` waits for it.

    `device` names the device of a legacy default-stream handle (0, 1), as in :func:`synchronize`
    (2, the per-thread stream, is refused).
    """
    loop = running_loop("aiocuda.record()")
    st = state_for(loop)
    if isinstance(stream, CpuStream):
        if device is not None:
            raise TypeError("device= names a CUDA device; a CpuStream has none")
        cpu_event = _core.CpuEvent()
        _check(stream._record(cpu_event))
        ev = Event._made(cpu_event, 0)
        fut = st.queue.wait(loop, stream)
    else:
        handle, dev = _handle_on(stream, device)
        keep = None if isinstance(stream, int) else stream
        fut, mark = st.queue.record_cuda(loop, handle, dev, keep)
        ev = Event._made(None, mark)
    fut.add_done_callback(_mark_retrieved)
    ev._fut = fut
    return ev


def _check(err: str) -> None:
    if err:
        raise AiocudaError(err)


def _mark_retrieved(fut: asyncio.Future[Any]) -> None:
    # An event nobody awaits may still fail; its awaiters get the error through shield().
    if not fut.cancelled():
        fut.exception()


class Event:
    """A point in a stream's work, made by :func:`record`. ``await event`` waits for it.

    Awaiting is shielded: cancelling one awaiter does not cancel the event for the others.
    ``Event()`` made directly is an event never recorded: like a CUDA event before its first
    record, it is complete (``done()`` is True, ``await`` returns at once, a stream's
    ``wait_event`` does not wait).
    """

    __slots__ = ("_cpu", "_cuda", "_fut", "__weakref__")

    def __init__(self) -> None:
        self._cpu: _core.CpuEvent | None = None
        self._cuda = 0  # a mark's address, 0 for none
        self._fut: asyncio.Future[None] | None = None  # None: never recorded

    @classmethod
    def _made(cls, cpu: _core.CpuEvent | None, cuda: int) -> Event:
        ev = cls()
        ev._cpu = cpu
        ev._cuda = cuda
        return ev

    def done(self) -> bool:
        """Return True if the work before the event has finished (never blocks)."""
        if self._cpu is not None:
            return self._cpu.done()
        if not self._cuda:
            return True  # never recorded
        code, why = _core.cuda_mark_query(self._cuda)
        if code == 0:
            return True
        if code == 600:  # CUDA_ERROR_NOT_READY
            return False
        raise _refused(code, why)

    def synchronize(self) -> None:
        """Block the calling thread until the event completes (for threads; coroutines await)."""
        if self._cpu is not None:
            self._cpu.wait()
            return
        if not self._cuda:
            return  # never recorded
        code, why = _core.cuda_mark_synchronize(self._cuda)
        if code:
            raise _refused(code, why)

    def __await__(self) -> Generator[Any, None, None]:
        if self._fut is None:
            return _complete().__await__()  # never recorded
        return shield(self._fut)

    # A copy would hold the same native mark and release it again when collected (a use after
    # free in the engine, which killed the process): an event is a handle, its copy is itself.
    def __copy__(self) -> Event:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Event:
        return self

    def __del__(self) -> None:
        mark = getattr(self, "_cuda", 0)  # unset when __init__ was called wrongly
        if mark and _core is not None:  # _core is None late in interpreter shutdown
            _core.cuda_mark_release(mark)  # its pooled event is reused once passed
            self._cuda = 0

    def __repr__(self) -> str:
        if self._fut is None:
            return "<aiocuda.Event never recorded>"
        kind = "cpu" if self._cpu is not None else "cuda"
        try:  # the event itself: its loop's future never settles once that loop has closed
            state = "done" if self.done() else "pending"
        except AiocudaError as exc:  # a driver error (never raised from a repr)
            state = f"failed ({exc})"
        return f"<aiocuda.Event {kind} {state}>"


async def _complete() -> None:
    return None


_live_streams: weakref.WeakSet[CpuStream] = weakref.WeakSet()


class CpuStream(_core.CpuStreamBase):
    """An in-order native worker with CUDA stream semantics: the cpu backend.

    Work runs in submission order; ``await stream`` waits for everything submitted so far;
    ``wait_event`` makes later work wait for an event, as ``cuStreamWaitEvent`` does.

    In a coroutine, close it with ``async with aiocuda.CpuStream() as s:`` or
    ``await s.aclose()``, which wait for the submitted work without blocking the loop. Like
    ``cuStreamDestroy``, closing never cancels work: whatever was submitted runs. ``close()``
    on a loop's thread, leaving a plain ``with`` block there, leaving an ``async with`` block
    by a cancellation (a timeout), and dropping the last reference anywhere return at once and
    let that work finish in the background (its futures still complete); ``close()`` on a
    thread with no running loop waits for it. At interpreter exit, work still running is waited
    for, at most ``AIOCUDA_EXIT_TIMEOUT`` seconds (10 by default; Ctrl-C stops the wait), and
    then left to the process's end.
    """

    def __init__(self) -> None:
        super().__init__()
        _live_streams.add(self)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Run ``fn(*args, **kwargs)`` on the stream; the future gets its result or exception.

        `fn` is a plain function, run on the stream's worker thread: an async function's
        future fails with a TypeError (await it on the loop instead). Cancelling the future
        does not take the call back: like work enqueued on a CUDA stream, it still runs in its
        turn, and only its outcome is dropped. `fn` runs in the worker thread's own
        contextvars, as ``run_in_executor`` runs it, not the caller's: use :func:`aiocuda.gpu_op`
        (``stream=s``), or ``contextvars.copy_context().run``, to carry them.
        """
        if not callable(fn):  # the worker turns a coroutine fn returns into a TypeError
            raise not_callable(fn, "submit()")
        loop = running_loop("CpuStream.submit()")
        st = state_for(loop)
        fut: asyncio.Future[T] = st.queue.submit_call(
            self, loop, fn, args, kwargs or None
        )
        return fut

    def synchronize(self) -> asyncio.Future[None]:
        """Return a future done when all work submitted so far has run."""
        return synchronize(self)

    def record(self) -> Event:
        """Record an event at the current end of the stream."""
        return record(self)

    def wait_event(self, event: Event) -> None:
        """Make work submitted after this call wait until `event` has completed."""
        if not isinstance(event, Event):
            raise TypeError(f"wait_event() needs an aiocuda.Event, got {type(event).__name__}")
        if event._fut is None:
            return  # never recorded: complete
        if event._cpu is None:
            raise TypeError("a CpuStream can only wait on events recorded on a CpuStream")
        _check(self._wait_event(event._cpu))

    def delay(self, seconds: float) -> None:
        """Hold the stream for `seconds` without the GIL (the cpu analogue of a sleep kernel)."""
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):  # numpy's too
            raise TypeError(f"seconds must be a number, got {type(seconds).__name__}")
        try:
            value = float(seconds)
        except OverflowError:  # an int beyond any float
            value = math.inf
        if not 0 <= value <= _MAX_DELAY_S:
            raise ValueError(f"seconds must be >= 0 and at most {_MAX_DELAY_S:g}, got {seconds}")
        _check(self._delay(value))

    def close(self) -> None:
        """Stop accepting work; off a loop's thread, also wait for the work already submitted.

        On a thread running an event loop it never waits: the work already submitted runs in
        the background and its futures still complete (``await s.aclose()`` waits without
        blocking). Elsewhere it waits until that work has run; Ctrl-C interrupts the wait.
        Called by the stream's own work, it cannot wait for itself and returns. Idempotent.
        """
        self._close()
        if on_loop_thread():
            return  # never wait on a loop's thread
        while not self._wait_closed(_CLOSE_SLICE_S):
            # Past exit's bounded wait (AIOCUDA_EXIT_TIMEOUT): a worker reaching Python code now
            # is stopped by CPython, or one whose wait ended by aiocuda (stop_waits), for good.
            if sys.is_finalizing() or _core.parked_threads():
                return

    async def aclose(self) -> None:
        """Stop accepting work and wait until the work already submitted has run.

        The loop keeps running meanwhile. Cancelling the wait leaves the stream closed and
        its work running in the background. Called by the stream's own work (on a loop of its
        own), it cannot wait for itself and returns, as close() does. Idempotent.
        """
        if self._on_worker:
            self.close()
            return
        try:
            loop = running_loop("CpuStream.aclose()")
            queue = state_for(loop).queue
        except BaseException:  # no loop to wait on (a trio run that is ending): closed anyway
            self.close()
            raise
        await queue.wait_closed(loop, self)

    def __enter__(self) -> CpuStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> CpuStream:
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and is_cancellation(exc):
            # Cancelled (a timeout, a client gone): stop waiting, as a cancelled aclose() does.
            # asyncio delivers a cancellation once, so awaiting the work here would hold the
            # cancellation up for as long as the work runs.
            self.close()
            return
        await self.aclose()

    def __await__(self) -> Generator[Any, None, None]:
        return synchronize(self).__await__()

    def __repr__(self) -> str:
        return f"<aiocuda.CpuStream {'closed' if self.closed else 'open'}>"


_CLOSE_SLICE_S = 0.1  # a blocking close waits in slices this long, handling signals between
_EXIT_TIMEOUT_S = 10.0  # default of AIOCUDA_EXIT_TIMEOUT
exit_began = [False]  # set by the exit hook below: gpu_op's pool is closed from then on
_STOP_WAITS_S = 1.0  # at exit, the longest wait for threads already taking the GIL back


def _exit_timeout() -> float:
    text = os.environ.get("AIOCUDA_EXIT_TIMEOUT", "")
    try:
        value = float(text) if text else _EXIT_TIMEOUT_S
    except ValueError:
        value = math.nan
    if value >= 0:
        return value
    sys.stderr.write(f"aiocuda: AIOCUDA_EXIT_TIMEOUT={text!r} is not a number of seconds >= 0; "
                     f"exit waits {_EXIT_TIMEOUT_S:g} s for CpuStream workers\n")
    return _EXIT_TIMEOUT_S


@atexit.register
def _close_streams() -> None:
    # Let the workers finish while the interpreter can still run the calls they hold, those of
    # collected streams too; but never hang the exit on work that does not return. A worker
    # left running is then a daemon thread: one that tries to run Python code again exits.
    # Then a daemon thread whose native wait (Event.synchronize(), a blocking close()) ends
    # stays in it rather than take the GIL back, which CPython 3.10-3.13 answers with
    # pthread_exit() once the interpreter finalizes (csrc/module.cpp, NoGil).
    exit_began[0] = True
    try:
        for s in list(_live_streams):
            s._close()
        timeout = _exit_timeout()
        deadline = time.monotonic() + timeout
        while not _core.cpu_wait_workers(
                min(_CLOSE_SLICE_S, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:  # slices: Ctrl-C (a signal) is handled between two
                sys.stderr.write(
                    f"aiocuda: {_core.cpu_workers()} CpuStream worker(s) still running work "
                    f"{timeout:g} s into interpreter exit; leaving them (AIOCUDA_EXIT_TIMEOUT "
                    "sets how long exit waits)\n"
                )
                return
    finally:
        _core.stop_waits(_STOP_WAITS_S)


_STRATEGIES = ("callback", "poll", "flag")  # indexed as csrc/engine.hpp's Strategy
if os.environ.get("AIOCUDA_STRATEGY") not in (None, "", *_STRATEGIES):  # read natively at start
    raise ValueError(f"AIOCUDA_STRATEGY={os.environ['AIOCUDA_STRATEGY']!r} is not a completion "
                     "strategy: set it to flag, callback or poll, or unset it (flag)")


def set_strategy(name: str) -> None:
    """Choose how the cuda backend learns that awaited work is done: "flag", "callback" or "poll".

    "flag" (the default): an await's mark is a write of a sequence number into a word of host
    memory by the stream itself (cuStreamWriteValue32); aiocuda's thread reads the words with
    plain loads, spinning only while a completion is due by the stream's own history and
    sleeping otherwise. Where the driver cannot write host memory from a stream, marks are
    event records watched as by "callback". "callback": a host function on an aiocuda stream
    that waits on the mark's event; no CPU is used while work runs, at a host function's
    latency. "poll": a native thread queries the marks' events, spinning for 2 ms after the last
    completion and then sleeping at most 200 us at a time. ``AIOCUDA_STRATEGY`` sets it at
    start. Pending awaits are kept either way.
    """
    if not isinstance(name, str):
        raise TypeError(f"strategy must be a str, one of {_STRATEGIES}, got {type(name).__name__}")
    if name not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {name!r}")
    _core.cuda_set_strategy(_STRATEGIES.index(name))


def strategy() -> str:
    """Return the cuda backend's completion strategy: "flag", "callback" or "poll"."""
    return _STRATEGIES[_core.cuda_strategy()]


def backends() -> tuple[str, ...]:
    """Return the usable backends: ``("cpu",)`` or ``("cpu", "cuda")``."""
    return ("cpu", "cuda") if _core.cuda_info()["available"] else ("cpu",)
