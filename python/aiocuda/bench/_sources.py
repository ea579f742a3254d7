"""Where the benchmarked work comes from: a cpu-backend stream, or a CUDA stream.

A CUDA stream is driven through the same libcuda aiocuda loaded (``ctypes``): a real GPU, or the
test-only driver emulator when ``AIOCUDA_LIBCUDA`` names it. On a real GPU, work that keeps the
stream busy and tiny kernels come from PyTorch (``torch.cuda._sleep``, ``add_``).
"""

from __future__ import annotations

import ctypes
import importlib
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from .. import _core
from .._api import CpuStream
from .._errors import AiocudaError


class HostEvent(Protocol):
    """An event a thread can block on or poll: what the alternatives to aiocuda wait with."""

    def done(self) -> bool: ...
    def wait(self) -> None: ...


class Source(Protocol):
    name: str
    stream: Any  # what aiocuda.synchronize() takes

    def post(self, fn: Callable[[], object]) -> None:
        """Run a Python callable on the stream's own thread (the Python-callback design)."""

    def hold(self, seconds: float) -> None:
        """Enqueue work that keeps the stream busy for about `seconds`."""

    def event(self) -> HostEvent:
        """Record an event at the current end of the stream (no aiocuda future attached)."""

    def gate(self) -> Callable[[], None]:
        """Hold the stream's later work until the returned function is called."""

    def close(self) -> None: ...


class CpuSource:
    """The cpu backend: a native worker thread."""

    name = "cpu"

    def __init__(self) -> None:
        self.stream = CpuStream()
        self._gate = CpuStream()

    def post(self, fn: Callable[[], object]) -> None:
        _ok(self.stream._post(fn))

    def hold(self, seconds: float) -> None:
        self.stream.delay(seconds)

    def event(self) -> HostEvent:
        ev = _core.CpuEvent()
        _ok(self.stream._record(ev))
        return ev

    def gate(self) -> Callable[[], None]:
        go = threading.Event()
        _ok(self._gate._post(go.wait))  # the gate's worker waits without the GIL
        ev = _core.CpuEvent()
        _ok(self._gate._record(ev))
        _ok(self.stream._wait_event(ev))
        return go.set

    def close(self) -> None:
        self.stream.close()
        self._gate.close()


def _ok(err: str) -> None:
    if err:
        raise AiocudaError(err)


_HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_CU_EVENT_DISABLE_TIMING = 2
_CU_STREAM_NON_BLOCKING = 1


class DriverEvent:
    """A CUevent polled or waited on through ctypes (ctypes releases the GIL in calls)."""

    __slots__ = ("_lib", "handle")

    def __init__(self, lib: ctypes.CDLL, stream: int, timing: bool = False) -> None:
        self._lib = lib
        h = ctypes.c_void_p()
        _cu(lib, "cuEventCreate", ctypes.byref(h), 0 if timing else _CU_EVENT_DISABLE_TIMING)
        self.handle = h.value
        _cu(lib, "cuEventRecord", ctypes.c_void_p(self.handle), ctypes.c_void_p(stream))

    def done(self) -> bool:
        return int(self._lib.cuEventQuery(ctypes.c_void_p(self.handle))) == 0

    def wait(self) -> None:
        _cu(self._lib, "cuEventSynchronize", ctypes.c_void_p(self.handle))

    def __del__(self) -> None:
        self._lib.cuEventDestroy_v2(ctypes.c_void_p(self.handle))


def _cu(lib: ctypes.CDLL, name: str, *args: Any) -> None:
    code = int(getattr(lib, name)(*args))
    if code:
        raise AiocudaError(f"{name} failed with CUDA error {code}: {_core.cuda_error_text(code)}")


class DriverSource:
    """A CUDA stream on device 0's primary context: a real GPU or the driver emulator."""

    def __init__(self) -> None:
        info = _core.cuda_info()
        if not info["available"]:
            raise AiocudaError(f"the cuda backend is not available: {info['reason']}")
        self.lib = lib = ctypes.CDLL(str(info["path"]))
        self.emulated = hasattr(lib, "emu_enqueue_sleep")
        self._torch: Any = None
        if self.emulated:
            self.name = "cuda (driver emulator)"
            ctx, s = ctypes.c_void_p(), ctypes.c_void_p()
            _cu(lib, "cuDevicePrimaryCtxRetain", ctypes.byref(ctx), 0)
            _cu(lib, "cuCtxSetCurrent", ctx)
            _cu(lib, "cuStreamCreate", ctypes.byref(s), _CU_STREAM_NON_BLOCKING)
            self.handle: int = s.value or 0
            self.stream: Any = self.handle
            lib.emu_enqueue_sleep.argtypes = [ctypes.c_void_p, ctypes.c_longlong]
        else:
            torch: Any = importlib.import_module("torch")  # a real GPU: kernels from PyTorch
            if not torch.cuda.is_available():
                raise AiocudaError("a GPU benchmark needs PyTorch with CUDA on a visible device")
            self._torch = torch
            self.name = f"cuda ({_core.cuda_device_name(0)})"
            self.stream = torch.cuda.Stream()
            self.handle = int(self.stream.cuda_stream)
            self._x = torch.zeros(1, device="cuda")
            self._cycles_per_s = self._calibrate()
        self._pending: dict[int, Callable[[], object]] = {}
        self._next = 0
        self._trampoline = _HOST_FN(self._dispatch)  # kept alive as long as the source

    def _calibrate(self) -> float:
        torch = self._torch
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(1000)  # warm up
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            torch.cuda._sleep(10_000_000)
            b.record()
        b.synchronize()
        return float(10_000_000 / (a.elapsed_time(b) / 1e3))

    def _dispatch(self, key: int | None) -> None:
        self._pending.pop(key or 0)()

    def post(self, fn: Callable[[], object]) -> None:
        # numba-cuda's async_done design: a Python function as the host callback. The driver's
        # thread takes the GIL to run it.
        self._next += 1
        self._pending[self._next] = fn
        _cu(self.lib, "cuLaunchHostFunc", ctypes.c_void_p(self.handle), self._trampoline,
            ctypes.c_void_p(self._next))

    def hold(self, seconds: float) -> None:
        if self._torch is None:
            self.lib.emu_enqueue_sleep(self.handle, int(seconds * 1e6))
            return
        with self._torch.cuda.stream(self.stream):
            self._torch.cuda._sleep(int(seconds * self._cycles_per_s))

    def gate(self) -> Callable[[], None]:
        go = threading.Event()
        self.post(go.wait)  # a host function that blocks the stream (GIL released while waiting)
        return go.set

    def kernel(self) -> None:
        """Launch one tiny kernel (the emulator: one zero-length work item)."""
        if self._torch is None:
            self.lib.emu_enqueue_sleep(self.handle, 0)
            return
        with self._torch.cuda.stream(self.stream):
            self._x.add_(1)

    def event(self) -> HostEvent:
        return DriverEvent(self.lib, self.handle)

    def mark(self) -> DriverEvent:
        """Record a timing event (for stream time between two points)."""
        return DriverEvent(self.lib, self.handle, timing=True)

    def elapsed(self, a: DriverEvent, b: DriverEvent) -> float:
        ms = ctypes.c_float()
        _cu(self.lib, "cuEventElapsedTime", ctypes.byref(ms), ctypes.c_void_p(a.handle),
            ctypes.c_void_p(b.handle))
        return ms.value / 1e3

    def close(self) -> None:
        deadline = time.monotonic() + 30
        ev = self.event()
        while not ev.done() and time.monotonic() < deadline:
            time.sleep(0.001)
