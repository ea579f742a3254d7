"""Where the benchmarked work comes from: a cpu-backend stream, or a CUDA stream.

A CUDA stream is driven through the same libcuda aiocuda loaded (``ctypes``): a real GPU, or the
test-only driver emulator when ``AIOCUDA_LIBCUDA`` names it. On a real GPU, work that keeps the
stream busy and kernels come from PyTorch (``torch.cuda._sleep``, ``add_``).

Every driver queue is bounded and an enqueue on a full one blocks (the emulator models this), so
nothing here puts more than a few operations on a stream that the event loop itself waits for:
a gate is one stream operation (a wait on a word of host memory, not a host function), and
Python host functions, one per wait in the ``call_soon_threadsafe`` design, are capped by
`DriverSource.max_py_hostfns`.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import mmap
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .. import _core
from .._api import CpuStream
from .._errors import AiocudaError


class HostEvent(Protocol):
    """An event a thread can block on or poll: what the alternatives to aiocuda wait with."""

    def done(self) -> bool: ...
    def wait(self) -> None: ...


class Gate:
    """Holds a stream's later work until `open()` (see `Source.gate`).

    `timed` gates (the fallback where a stream cannot wait on host memory) are a long kernel
    instead: `open()` does nothing and the stream goes on when the kernel ends; `until_open()`
    returns once it has.
    """

    def __init__(self, open_fn: Callable[[], None],
                 passed: Callable[[], bool] | None = None) -> None:
        self._open, self._passed = open_fn, passed
        self.timed = passed is not None

    def open(self) -> None:
        self._open()

    async def until_open(self) -> None:
        while self._passed is not None and not self._passed():
            await asyncio.sleep(0.0002)


#: A peer library's way to wait (see `_peers`): given the running loop, a function that starts
#: one wait for the end of the stream's current work.
PeerWaiter = Callable[[asyncio.AbstractEventLoop], Callable[[], Awaitable[Any]]]


class Source(Protocol):
    name: str
    kind: str  # "cpu" or "cuda"
    stream: Any  # what aiocuda.synchronize() takes
    max_py_hostfns: int | None  # Python host functions in flight at most (None: no limit)
    notes: list[str]  # how this source holds and gates work, for the report
    peers: dict[str, PeerWaiter]  # other libraries' waits on this stream, by method name

    def post(self, fn: Callable[[], object]) -> None:
        """Run a Python callable on the stream's own thread (the Python-callback design)."""

    def stamp(self) -> Callable[[], float]:
        """Mark the moment the stream reaches its current end (where the work is done): the
        returned function gives it, in `time.perf_counter` seconds, once the stream has passed
        it."""

    def hold(self, seconds: float) -> None:
        """Enqueue work that keeps the stream busy for about `seconds`."""

    def event(self) -> HostEvent:
        """Record an event at the current end of the stream (no aiocuda future attached)."""

    def gate(self, min_hold_s: float = 2.0) -> Gate:
        """Hold the stream's later work until the gate is opened (a timed gate: for at least
        `min_hold_s`)."""

    def open_gates(self) -> None:
        """Open every gate (the watchdog's way out of a stuck measurement); any thread."""

    def device_cpu_s(self) -> float:
        """CPU seconds so far of threads that stand for the device (the driver emulator's stream
        workers), which the process's CPU clock counts but a host with a GPU does not pay; 0.0
        for a GPU and for the cpu backend (its workers are the host's)."""

    def close(self) -> None: ...


class CpuSource:
    """The cpu backend: a native worker thread."""

    name: str = "cpu"
    kind: str = "cpu"
    max_py_hostfns: int | None = None

    def __init__(self) -> None:
        self.stream = CpuStream()
        self._gate = CpuStream()
        self._gos: list[threading.Event] = []
        self.notes: list[str] = []
        self.peers: dict[str, PeerWaiter] = {}

    def post(self, fn: Callable[[], object]) -> None:
        _ok(self.stream._post(fn))

    def stamp(self) -> Callable[[], float]:
        # Taken by the worker as it reaches the stamp; the work's completion follows on the same
        # thread with no hand-off (the sleeping-loop floor).
        at: list[float] = []
        self.post(lambda: at.append(time.perf_counter()))
        return lambda: at[0]

    def hold(self, seconds: float) -> None:
        self.stream.delay(seconds)

    def event(self) -> HostEvent:
        ev = _core.CpuEvent()
        _ok(self.stream._record(ev))
        return ev

    def gate(self, min_hold_s: float = 2.0) -> Gate:
        go = threading.Event()
        self._gos.append(go)
        _ok(self._gate._post(go.wait))  # the gate's worker waits without the GIL
        ev = _core.CpuEvent()
        _ok(self._gate._record(ev))
        _ok(self.stream._wait_event(ev))
        return Gate(go.set)

    def open_gates(self) -> None:
        for go in list(self._gos):
            go.set()

    def device_cpu_s(self) -> float:
        return 0.0

    def close(self) -> None:
        self.open_gates()
        self.stream.close()
        self._gate.close()


def _ok(err: str) -> None:
    if err:
        raise AiocudaError(err)


_HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_CU_EVENT_DISABLE_TIMING = 2
_CU_STREAM_NON_BLOCKING = 1
# cuda.h: "#define CU_MEMHOSTREGISTER_DEVICEMAP 0x02", "CU_STREAM_WAIT_VALUE_GEQ = 0x0",
# "CUDA_ERROR_NOT_SUPPORTED = 801"
_CU_MEMHOSTREGISTER_DEVICEMAP = 0x02
_CU_STREAM_WAIT_VALUE_GEQ = 0x0
_CUDA_ERROR_NOT_SUPPORTED = 801
# The prototypes, from cuda.h (CUDA 13); CUdeviceptr is unsigned long long, cuuint32_t uint32_t:
#   CUresult cuMemHostRegister_v2(void *p, size_t bytesize, unsigned int Flags);
#   CUresult cuMemHostUnregister(void *p);
#   CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *pdptr, void *p, unsigned int Flags);
#   CUresult cuStreamWaitValue32_v2(CUstream stream, CUdeviceptr addr, cuuint32_t value,
#                                   unsigned int flags);
_PROTOTYPES: dict[str, list[Any]] = {
    "cuMemHostRegister_v2": [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint],
    "cuMemHostUnregister": [ctypes.c_void_p],
    "cuMemHostGetDevicePointer_v2": [ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_void_p,
                                     ctypes.c_uint],
    "cuStreamWaitValue32_v2": [ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_uint32, ctypes.c_uint],
}
# Python host functions in flight on the cuda source at most: each is one pending operation of a
# bounded stream queue and of the context's host-function queue (the emulator admits 1024 and 56;
# a real driver's are finite too: 57 in a measurement), and while that queue is full every launch
# of the context waits; on a gated stream none of them finishes, so more would block the
# launching loop thread for ever. aiocuda's own host functions need up to 32 of those slots.
PY_HOSTFN_CAP = 16


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


class DriverError(AiocudaError):
    def __init__(self, name: str, code: int) -> None:
        super().__init__(f"{name} failed with CUDA error {code}: {_core.cuda_error_text(code)}")
        self.code = code


def _cu(lib: ctypes.CDLL, name: str, *args: Any) -> None:
    code = int(getattr(lib, name)(*args))
    if code:
        raise DriverError(name, code)


class HostWord:
    """A 32-bit word of host memory registered with the driver and mapped for the device, which a
    stream can wait on (``cuStreamWaitValue32``) until the host writes it.

    cuda.h, cuStreamWaitValue32: "Enqueues a synchronization of the stream on the given memory
    location. Work ordered after the operation will block until the given condition on the memory
    is satisfied. By default, the condition is to wait for (int32_t)(*addr - value) >= 0, a cyclic
    greater-or-equal." and "If the memory was registered via cuMemHostRegister(), the device
    pointer should be obtained with cuMemHostGetDevicePointer()." cuMemHostRegister:
    "CU_MEMHOSTREGISTER_DEVICEMAP: Maps the allocation into the CUDA address space. The device
    pointer to the memory may be obtained by calling cuMemHostGetDevicePointer()." and "The
    memory page-locked by this function must be unregistered with cuMemHostUnregister()."
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._mem = mmap.mmap(-1, mmap.PAGESIZE)  # page-aligned, zeroed
        self._word = ctypes.c_uint32.from_buffer(self._mem)
        self.host = ctypes.addressof(self._word)
        _cu(lib, "cuMemHostRegister_v2", self.host, mmap.PAGESIZE, _CU_MEMHOSTREGISTER_DEVICEMAP)
        try:
            d = ctypes.c_ulonglong()
            _cu(lib, "cuMemHostGetDevicePointer_v2", ctypes.byref(d), self.host, 0)
        except AiocudaError:
            lib.cuMemHostUnregister(self.host)
            raise
        self.device = d.value

    @property
    def value(self) -> int:
        return self._word.value

    def write(self, value: int) -> None:
        self._word.value = value

    def unregister(self) -> None:
        _cu(self._lib, "cuMemHostUnregister", self.host)


class DriverSource:
    """A CUDA stream on device 0's primary context: a real GPU or the driver emulator."""

    kind: str = "cuda"
    max_py_hostfns: int | None = PY_HOSTFN_CAP

    def __init__(self) -> None:
        info = _core.cuda_info()
        if not info["available"]:
            raise AiocudaError(f"the cuda backend is not available: {info['reason']}")
        self.lib = lib = ctypes.CDLL(str(info["path"]))
        self.path = str(info["path"])
        self.emulated = hasattr(lib, "emu_enqueue_sleep")
        self._torch: Any = None
        self.notes: list[str] = []
        self.peers: dict[str, PeerWaiter] = {}  # filled on a real GPU (see `_peers.attach`)
        for fn, argtypes in _PROTOTYPES.items():
            if hasattr(lib, fn):
                getattr(lib, fn).argtypes = argtypes
                getattr(lib, fn).restype = ctypes.c_int
        if self.emulated:
            self.name = "cuda (driver emulator)"
            self.device = "the test-only driver emulator (tests/emu), not a GPU"
            ctx, s = ctypes.c_void_p(), ctypes.c_void_p()
            _cu(lib, "cuDevicePrimaryCtxRetain", ctypes.byref(ctx), 0)
            _cu(lib, "cuCtxSetCurrent", ctx)
            _cu(lib, "cuStreamCreate", ctypes.byref(s), _CU_STREAM_NON_BLOCKING)
            self.handle: int = s.value or 0
            self.stream: Any = self.handle
            lib.emu_enqueue_sleep.argtypes = [ctypes.c_void_p, ctypes.c_longlong]
            if hasattr(lib, "emu_device_cpu_ns"):
                lib.emu_device_cpu_ns.restype = ctypes.c_ulonglong
                self.notes.append(
                    "cuda: CPU is the process's less the emulator's stream workers, which stand "
                    "for the GPU (a stream waiting on host memory polls it from the device)")
            if hasattr(lib, "emu_enqueue_notify"):
                self.notes.append(
                    "cuda: 'device writes eventfd' is the sleeping-loop floor there: the emulated "
                    "stream's own thread writes an eventfd the loop reads as the work ends (a "
                    "test-only operation; no GPU can), wake-up only")
        else:
            torch: Any = importlib.import_module("torch")  # a real GPU: kernels from PyTorch
            if not torch.cuda.is_available():
                raise AiocudaError("a GPU benchmark needs PyTorch with CUDA on a visible device")
            self._torch = torch
            self.device = _core.cuda_device_name(0)
            self.name = f"cuda ({self.device})"
            self.stream = torch.cuda.Stream()
            self.handle = int(self.stream.cuda_stream)
            self._x = torch.zeros(1, device="cuda")  # also makes the primary context current
            self._cycles_per_s = self._calibrate()
        self._pending: dict[int, Callable[[], object]] = {}
        self._next = 0
        self._trampoline = _HOST_FN(self._dispatch)  # kept alive as long as the source
        self._ref_stream: int | None = None  # stamp()'s reference events, on an idle stream
        self._ref_torch: Any = None
        self._word: HostWord | None = None
        self._gates = 0  # gate n waits until the word is >= n
        self._word_refused = ""
        self.notes.append(f"cuda: Python host functions (call_soon_threadsafe) capped at "
                          f"{self.max_py_hostfns} in flight (bounded driver queues)")
        self.notes.append("cuda: a wake-up counts from a timing event recorded where the work "
                          "ends, put on the host's clock by a reference event on an idle stream "
                          "(the stamp is never late: it errs early by one query at most)")

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

    def stamp(self) -> Callable[[], float]:
        """A timing event at the stream's end, placed on the host's clock by a reference event:
        recorded on an idle stream of the same context and queried until done, it happened after
        the start of the last query that found it not done, which is taken as its time (so the
        stamp is never late, and a wake-up measured from it never short). A Python host function
        would stamp before its own return and the stream's resumption (about 40 us on the 2-core
        emulator), which every wait after it pays and no wait causes."""
        if self._ref_stream is None:
            if self._torch is not None:
                self._ref_torch = self._torch.cuda.Stream()
                self._ref_stream = int(self._ref_torch.cuda_stream)
            else:
                s = ctypes.c_void_p()
                _cu(self.lib, "cuStreamCreate", ctypes.byref(s), _CU_STREAM_NON_BLOCKING)
                self._ref_stream = s.value or 0
        best: tuple[float, float, DriverEvent] | None = None  # (uncertainty, time, event)
        for _ in range(10):  # the narrowest of a few tries: a preempted query widens it
            deadline = time.monotonic() + 5
            t_ref = time.perf_counter()
            ref = DriverEvent(self.lib, self._ref_stream, timing=True)
            while True:
                t = time.perf_counter()
                if ref.done():
                    break
                t_ref = t
                if time.monotonic() > deadline:
                    raise AiocudaError("a timing stamp's reference event did not complete in 5 s")
            width = time.perf_counter() - t_ref
            if best is None or width < best[0]:
                best = (width, t_ref, ref)
            if width <= 20e-6:
                break
        assert best is not None
        _, t_ref, ref = best
        end = DriverEvent(self.lib, self.handle, timing=True)
        return lambda: t_ref + self.elapsed(ref, end)

    def hold(self, seconds: float) -> None:
        self.kernel(seconds * 1e6)

    @property
    def notifies(self) -> bool:
        """Whether `notify` works: the driver emulator only (no GPU writes an eventfd)."""
        return self.emulated and hasattr(self.lib, "emu_enqueue_notify")

    def notify(self, fd: int) -> None:
        """Have the stream write 1 to the eventfd `fd` as it reaches this point: the emulated
        device's own thread wakes the loop as the work ends (the sleeping-loop floor)."""
        self.lib.emu_enqueue_notify.argtypes = [ctypes.c_void_p, ctypes.c_int]
        code = self.lib.emu_enqueue_notify(ctypes.c_void_p(self.handle), fd)
        if code:
            raise DriverError("emu_enqueue_notify", code)

    def kernel(self, usec: float = 0) -> None:
        """Launch one kernel of about `usec` microseconds (0: a tiny kernel; the emulator: one
        zero-length work item)."""
        if self._torch is None:
            self.lib.emu_enqueue_sleep(self.handle, int(usec))
            return
        with self._torch.cuda.stream(self.stream):
            if usec <= 0:
                self._x.add_(1)
            else:
                self._torch.cuda._sleep(int(usec * 1e-6 * self._cycles_per_s))

    def gate(self, min_hold_s: float = 2.0) -> Gate:
        """The stream waits until a word of registered host memory reaches this gate's number
        (cuStreamWaitValue32, GEQ): one stream operation, and no host function, so the loop can
        queue any number of awaits behind it. Where the driver refuses that, a kernel of
        `min_hold_s` holds the stream instead (a timed gate; the report says so)."""
        if not self._word_refused:
            try:
                if self._word is None:
                    self._word = HostWord(self.lib)
                    self.notes.append("cuda: gates are a stream wait on a word of registered "
                                      "host memory (cuStreamWaitValue32_v2, GEQ); opening one "
                                      "writes the word")
                n = self._gates + 1
                _cu(self.lib, "cuStreamWaitValue32_v2", ctypes.c_void_p(self.handle),
                    self._word.device, n, _CU_STREAM_WAIT_VALUE_GEQ)
                self._gates = n
                return Gate(lambda: self._open_word(n))
            except (AiocudaError, AttributeError) as e:
                if self.emulated:
                    raise
                self._word_refused = str(e)
                self.notes.append(f"cuda: {e}; gates are a torch.cuda._sleep hold instead "
                                  "(timed gates: the stream goes on when the hold ends)")
        self.hold(min_hold_s)
        ev = self.event()
        return Gate(lambda: None, passed=ev.done)

    def _open_word(self, n: int) -> None:
        word = self._word
        if word is not None and word.value < n:
            word.write(n)

    def device_cpu_s(self) -> float:
        if self.emulated and hasattr(self.lib, "emu_device_cpu_ns"):
            return int(self.lib.emu_device_cpu_ns()) / 1e9
        return 0.0

    def open_gates(self) -> None:
        self._open_word(self._gates)

    def event(self) -> HostEvent:
        return DriverEvent(self.lib, self.handle)

    def stream_context(self) -> int:
        """The stream's context (cuStreamGetCtx), which the peers must be working in."""
        ctx = ctypes.c_void_p()
        _cu(self.lib, "cuStreamGetCtx", ctypes.c_void_p(self.handle), ctypes.byref(ctx))
        return ctx.value or 0

    def mark(self) -> DriverEvent:
        """Record a timing event (for stream time between two points)."""
        return DriverEvent(self.lib, self.handle, timing=True)

    def elapsed(self, a: DriverEvent, b: DriverEvent) -> float:
        ms = ctypes.c_float()
        _cu(self.lib, "cuEventElapsedTime", ctypes.byref(ms), ctypes.c_void_p(a.handle),
            ctypes.c_void_p(b.handle))
        return ms.value / 1e3

    def idle(self, timeout: float) -> bool:
        """Wait (blocking, at most `timeout` s) until the stream has finished its work."""
        deadline = time.monotonic() + timeout
        ev = self.event()
        while not ev.done():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def close(self) -> None:
        self.open_gates()
        drained = self.idle(30)
        if self._word is not None:
            if drained:  # unregistering a range a stream still waits on is undefined behaviour
                self._word.unregister()
            else:
                _stuck.append(self._word)  # still registered: its memory must stay mapped
            self._word = None
        if self._ref_stream is not None and self._torch is None:
            self.lib.cuStreamDestroy_v2(ctypes.c_void_p(self._ref_stream))
        self._ref_stream = self._ref_torch = None


_stuck: list[HostWord] = []
