"""PyTorch, awaited: a drop-in awaitable stream and event, collectives and CUDA graphs.

    s = aiocuda.torch.Stream()          # was: torch.cuda.Stream()
    with torch.cuda.stream(s):
        loss = step(x)
    await s                             # was: s.synchronize()

On a machine without CUDA, ``aiocuda.torch.Stream(device="cpu")`` gives the same methods on the
cpu backend (:class:`CpuTorchStream`), so the same loop runs in tests and on laptops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Mapping
from typing import Any, TypeVar

try:
    import torch
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "aiocuda.torch needs PyTorch, which is not installed: pip install 'aiocuda[torch]'"
    ) from exc

import torch.utils._pytree as pytree

from . import _core
from ._api import CpuStream, check_await, synchronize, wait_cuda_event
from ._errors import AiocudaError, faithful_copy
from ._loop import Shielded, running_loop, shield, wait_all
from ._ops import only_scalars

__all__ = ["CpuTorchEvent", "CpuTorchStream", "Event", "Stream", "replay"]

T = TypeVar("T")


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise AiocudaError(
            "PyTorch sees no CUDA device (torch.cuda.is_available() is False): use "
            "aiocuda.torch.Stream(device='cpu') for the cpu backend, or pass CPU tensors"
        )


def _is_cpu(device: Any) -> bool:
    """Whether `device` names the cpu; a ValueError for a device aiocuda cannot await."""
    if device is None:
        return False
    if isinstance(device, int) and not isinstance(device, bool):
        return False  # a CUDA ordinal (torch.device(5) asks for an accelerator to name it)
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(
            f"aiocuda.torch.Stream(device={device!r}): aiocuda awaits torch's 'cuda' devices "
            f"and, on 'cpu', its cpu backend; it has no '{kind}' streams. Use device='cpu' "
            "(with CPU tensors) where there is no CUDA device"
        )
    return kind == "cpu"


class Event(torch.cuda.Event):
    """A ``torch.cuda.Event`` that is also awaitable: ``await event`` waits for the work before
    its last ``record()``, on whatever stream that was, without blocking the loop.

    Without CUDA it cannot be made: the cpu backend's event is a :class:`CpuTorchEvent`, which
    ``record_event()`` of a ``Stream(device="cpu")`` returns.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if not torch.cuda.is_available():  # torch's own error names a "dummy base class"
            raise AiocudaError(
                "PyTorch sees no CUDA device (torch.cuda.is_available() is False): "
                "aiocuda.torch.Event is a CUDA event; on the cpu backend, "
                "aiocuda.torch.Stream(device='cpu').record_event() returns a CpuTorchEvent"
            )
        return super().__new__(cls, *args, **kwargs)  # type: ignore[no-untyped-call]

    def __await__(self) -> Generator[Any, None, None]:
        return _event_future(self).__await__()


def _event_future(ev: Any) -> asyncio.Future[None]:
    device = getattr(ev, "device", None)
    index = device.index if device is not None and device.index is not None else (
        torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return wait_cuda_event(int(ev.cuda_event), index, ev)  # ev stays alive while awaited


class Stream(torch.cuda.Stream):
    """A ``torch.cuda.Stream`` that is also awaitable; use it wherever a torch stream goes.

    ``await s`` waits for all work enqueued on it so far; ``s.record_event()`` returns an
    awaitable :class:`Event`. ``Stream(device="cpu")`` returns a :class:`CpuTorchStream`.
    """

    def __new__(cls, device: Any = None, priority: int = 0, **kwargs: Any) -> Any:
        if _is_cpu(device):
            return CpuTorchStream()
        _require_cuda()
        return super().__new__(  # type: ignore[no-untyped-call]
            cls, device=device, priority=priority, **kwargs
        )

    def __await__(self) -> Generator[Any, None, None]:
        return synchronize(self).__await__()

    def record_event(self, event: Any = None) -> Any:
        """Record an event (an awaitable :class:`Event` unless one is given) and return it."""
        if event is None:
            event = Event()
        event.record(self)
        return event


class CpuTorchEvent:
    """An event of a :class:`CpuTorchStream`: record, query, synchronize, wait, await."""

    __slots__ = ("_ev", "_fut", "_stream")

    def __init__(self) -> None:
        self._ev = _core.CpuEvent()
        self._fut: asyncio.Future[None] | None = None
        self._stream: CpuTorchStream | None = None

    def record(self, stream: CpuTorchStream | None = None) -> None:
        if stream is None:  # torch.cuda.Event.record()'s current stream has no cpu counterpart
            raise TypeError("CpuTorchEvent.record() needs the CpuTorchStream to record on: the "
                            "cpu backend has no current stream (pass it: event.record(stream))")
        if not isinstance(stream, CpuTorchStream):
            raise TypeError("a CpuTorchEvent is recorded on a CpuTorchStream; got "
                            f"{type(stream).__name__}")
        _ok(stream._record(self._ev))
        self._stream = stream
        try:  # awaited later: a completion at exactly this point of the stream
            self._fut = synchronize(stream)
        except AiocudaError:
            self._fut = None  # recorded outside a running loop: see __await__

    def query(self) -> bool:
        return self._ev.done()

    def synchronize(self) -> None:
        self._ev.wait()

    def wait(self, stream: CpuTorchStream | None = None) -> None:
        if stream is None:  # torch.cuda.Event.wait()'s current stream has no cpu counterpart
            raise TypeError("CpuTorchEvent.wait() needs the CpuTorchStream to make wait: the "
                            "cpu backend has no current stream (pass it: event.wait(stream))")
        if not isinstance(stream, CpuTorchStream):
            raise TypeError(f"CpuTorchEvent.wait() needs a CpuTorchStream, got "
                            f"{type(stream).__name__}")
        stream.wait_event(self)

    def __await__(self) -> Generator[Any, None, None]:
        fut = self._fut
        if fut is None or fut.get_loop() is not running_loop("awaiting a CpuTorchEvent"):
            fut = _waiters.wait_for(self._ev)
        return shield(fut)


def _ok(err: str) -> None:
    if err:
        raise AiocudaError(err)


_EVENT_WAITERS = 16  # idle streams kept for blocking waits, at most


class _CpuEventWaiters:
    """Blocking waits, off the loop: for CpuTorchEvents recorded outside a loop, a stream waits
    on the event, then completes; for torch's blocking waits (a work handle without a future, a
    functional collective's tensor), a stream's worker makes the call. Each wait takes a stream
    with nothing pending, made if none is, so that it never sits behind another wait (one that
    timed out on a slow event, or a receive whose sender waits for a later one: with a bound on
    the streams, 17 pending receives hung the 17th, whose message had come): a thread per wait
    in progress, as ``run_in_executor`` would take. Streams past `_EVENT_WAITERS` are closed
    once their wait has ended."""

    def __init__(self) -> None:
        self.streams: list[CpuStream] = []

    def _idle(self) -> CpuStream:  # under _waiter_lock
        self.streams = [s for s in self.streams if not s.closed]
        stream = next((s for s in self.streams if not s._pending), None)
        if stream is None:
            stream = CpuStream()
            self.streams.append(stream)
        return stream

    def _trim(self, _: object = None) -> None:
        with _waiter_lock:
            extra = len(self.streams) - _EVENT_WAITERS
            for s in [s for s in self.streams if not s._pending][:max(extra, 0)]:
                s.close()
                self.streams.remove(s)

    def _trimmed(self, fut: Any) -> Any:  # under _waiter_lock
        if len(self.streams) > _EVENT_WAITERS:
            fut.add_done_callback(self._trim)
        return fut

    def wait_for(self, ev: _core.CpuEvent) -> asyncio.Future[None]:
        with _waiter_lock:
            stream = self._idle()
            _ok(stream._wait_event(ev))
            return self._trimmed(synchronize(stream))  # type: ignore[no-any-return]

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)``, a wait that releases the GIL, on a worker. A cancelled await
        leaves it running to its end there, as a submitted call does."""
        with _waiter_lock:
            return self._trimmed(self._idle().submit(fn, *args))  # type: ignore[no-any-return]


_waiters = _CpuEventWaiters()
_waiter_lock = threading.Lock()


class CpuTorchStream(CpuStream):
    """The cpu backend with ``torch.cuda.Stream``'s methods (what ``Stream(device="cpu")`` gives).

    ``synchronize()`` blocks, as torch's does; ``await s`` and ``await s.record_event()`` do not.
    Work is submitted with ``s.submit(fn, ...)`` or ``aiocuda.gpu_op(fn, ..., stream=s)``.
    """

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def priority(self) -> int:
        return 0  # one priority: its worker runs the work in submission order

    def query(self) -> bool:
        """Whether all the work submitted so far has finished (it never blocks)."""
        return self._pending == 0

    def wait_stream(self, other: CpuTorchStream) -> None:
        """Make later work on this stream wait for the work submitted to `other` so far."""
        if not isinstance(other, CpuTorchStream):
            raise TypeError(f"wait_stream() needs a CpuTorchStream, got {type(other).__name__}")
        ev = _core.CpuEvent()
        _ok(other._record(ev))
        _ok(self._wait_event(ev))

    def record_event(self, event: CpuTorchEvent | None = None) -> CpuTorchEvent:
        ev = event if event is not None else CpuTorchEvent()
        ev.record(self)
        return ev

    def wait_event(self, event: Any) -> None:
        if isinstance(event, CpuTorchEvent):
            _ok(self._wait_event(event._ev))
        else:
            super().wait_event(event)

    def synchronize(self) -> None:  # type: ignore[override]
        """Block the calling thread until all submitted work has run (torch semantics)."""
        ev = _core.CpuEvent()
        _ok(self._record(ev))
        ev.wait()

    def __enter__(self) -> CpuTorchStream:
        """``with s:`` means what it means for a torch stream, "make s current", and the cpu
        backend has no current stream: nothing changes (``torch.cuda.stream(s)`` does nothing
        either where torch has no CUDA, and raises where it has: torch wants a CUDA device), and
        unlike a plain ``CpuStream``'s ``with``, the stream is not closed when the block ends.
        Close it with ``close()``, ``await s.aclose()`` or ``async with s:``."""
        return self

    def __exit__(self, *exc: object) -> None:
        return None  # not closed: the stream is used after the block, as a torch stream is

    def __repr__(self) -> str:
        return f"<aiocuda.torch.CpuTorchStream {'closed' if self.closed else 'open'}>"


# ---- gpu_op on a CUDA device -----------------------------------------------------------------
_POOL_SIZE = 4
_pool: dict[int, Iterator[Stream]] = {}
_pool_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # The parent's worker and streams are not the child's, and a lock may have been held by a
    # thread that does not exist here.
    global _waiters, _waiter_lock, _pool_lock
    _waiters, _waiter_lock = _CpuEventWaiters(), threading.Lock()
    _collective_locks.clear()
    _work_waits.clear()
    _pool.clear()
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _pooled(device: torch.device) -> Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _pool_lock:
        it = _pool.get(index)
        if it is None:
            it = _pool[index] = itertools.cycle([Stream(device=index) for _ in range(_POOL_SIZE)])
        return next(it)


def _children(node: object) -> Iterable[Any]:
    """One level of `node`: what torch's pytree flattens it into (containers torch and libraries
    registered, such as transformers' ModelOutput), else the values of mappings (dict
    subclasses, ``UserDict`` such as BatchEncoding), items of lists, tuples and sets, fields of
    dataclasses, which pytree keeps whole."""
    if isinstance(node, (str, bytes, torch.Tensor)):
        return ()
    registered = pytree.SUPPORTED_NODES.get(pytree._get_node_type(node))
    if registered is not None:
        return registered.flatten_fn(node)[0]
    if isinstance(node, Mapping):
        return node.values()
    if isinstance(node, (list, tuple, set, frozenset)):
        return node
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [getattr(node, f.name) for f in dataclasses.fields(node)]
    return ()


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    """Every tensor in `tree`, at any depth, each once; a container reached twice (or holding
    itself) is walked once, without recursion."""
    stack, seen = [tree], {}  # id -> node: held, so that no id is reused while we walk
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        if isinstance(node, torch.Tensor):
            yield node
            continue
        children = _children(node)
        if not isinstance(children, list):
            children = list(children)
        if not only_scalars(children):  # (a million token ids: looked over in C)
            stack.extend(children)


def _on_current_stream(device: torch.device) -> asyncio.Future[None]:
    """Await the current stream of `device`: torch gives handle 0 for every device's default
    stream, so the device goes with it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return synchronize(torch.cuda.current_stream(index), device=index)


async def run_on_cuda(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any],
                      device: torch.device, stream: Any) -> T:
    """gpu_op's CUDA path: run `fn` under a side stream ordered after the caller's, await it."""
    if not torch.cuda.is_available():  # device= named one (a tensor on one cannot exist)
        raise AiocudaError(
            f"gpu_op() was asked to run on {device}, but PyTorch sees no CUDA device "
            "(torch.cuda.is_available() is False): pass device='cpu', or leave device= out, "
            "to run fn on the cpu backend"
        )
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if stream is not None and stream.device != device:
        raise ValueError(f"stream is on {stream.device}, but the tensors are on {device}")
    caller = torch.cuda.current_stream(device)
    s = stream if stream is not None else _pooled(device)
    # Where the await of `s` would be refused, it is refused before fn enqueues work (see
    # gpu_op): a capture on the caller's stream, which `s` would join through wait_stream, or
    # on `s` itself; a driver aiocuda cannot use.
    check_await(caller, device.index)
    if s != caller:
        check_await(s, device.index)
    s.wait_stream(caller)  # inputs are ready before fn's kernels read them
    result: Any = None
    try:
        with torch.cuda.stream(s):
            result = fn(*args, **kwargs)
    finally:
        # Also when fn raised: what it enqueued before raising still runs on `s`, and the
        # caller's later work must come after it.
        if s != caller:
            # The caching allocator ties a block to the stream that allocated it: inputs are
            # now also used on `s`, and outputs (allocated on `s`) will be used on the caller's.
            for t in _tensors((args, kwargs)):
                if t.is_cuda:
                    t.record_stream(s)
            for t in _tensors(result):
                if t.is_cuda:
                    t.record_stream(caller)
            caller.wait_stream(s)
    await synchronize(s, device=device.index)
    return result  # type: ignore[no-any-return]


async def replay(graph: torch.cuda.CUDAGraph, stream: Any = None, *, device: Any = None) -> None:
    """Replay a captured CUDA graph and await it.

    torch launches a graph on the current stream of the device it was captured on, whatever the
    current device is (``CUDAGraph::replay`` guards to the capture stream's device). Say which
    device that is with ``device=`` (or with a `stream` on it, which becomes the current stream
    for the launch). torch does not tell, so with neither and more than one GPU, the current
    stream of every GPU is awaited: never too early, possibly late.
    """
    if not isinstance(graph, torch.cuda.CUDAGraph):
        raise TypeError(f"replay() needs a torch.cuda.CUDAGraph, got {type(graph).__name__}")
    _require_cuda()
    index = None if device is None else _cuda_index(device)
    if stream is not None:
        if index is not None and index != stream.device.index:
            raise ValueError(f"stream is on {stream.device}, but device={device!r}")
        with torch.cuda.stream(stream):
            graph.replay()
        await synchronize(stream, device=stream.device.index)
        return
    graph.replay()
    if index is None and torch.cuda.device_count() == 1:
        index = 0
    devices = [index] if index is not None else list(range(torch.cuda.device_count()))
    await wait_all([_on_current_stream(torch.device("cuda", d)) for d in devices])


def _cuda_index(device: Any) -> int:
    if isinstance(device, int) and not isinstance(device, bool):
        if device < 0:
            raise ValueError(f"device must be >= 0, got {device}")
        return device
    d = torch.device(device)
    if d.type != "cuda":
        raise ValueError(f"device={device!r} is not a CUDA device")
    return d.index if d.index is not None else torch.cuda.current_device()


# ---- aiocuda.wait for torch objects ------------------------------------------------------------
async def _done(value: T) -> T:
    return value


async def _then(aw: Awaitable[Any], value: T) -> T:
    await aw
    return value


def _raisable(exc: BaseException) -> BaseException:
    """A copy of `exc`, kept by torch (its future's error) or by aiocuda (a handle's outcome), to
    raise: raising `exc` itself would give it a traceback whose frames hold the future or the
    handle, a cycle through torch's C++ that the collector cannot see (each failure kept its
    frames and tensors for ever). `exc` loses the traceback it has."""
    exc.__traceback__ = None
    dup = faithful_copy(exc)
    return exc if dup is None else dup  # (where no faithful copy can be made: the original)


# torch future -> the futures settled from it, one per loop. A torch future cannot drop a done
# callback, so each wait given up (a timeout in a retry loop) left one behind, and its future,
# until the torch future completed: a later wait on that loop shares the first one's instead.
_torch_waits: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


def _from_torch_future(tfut: torch._C.Future[Any]) -> Awaitable[Any]:
    """An awaitable settled from a torch Future's completion (a Python callback on the thread
    that completes it: torch futures are Python-level objects, not driver work)."""
    loop = running_loop("awaiting a torch.futures.Future")
    waits = _torch_waits.setdefault(tfut, [])
    for shared in waits:
        if shared.get_loop() is loop:
            return Shielded(shared)
    waits[:] = [f for f in waits if not f.get_loop().is_closed()]
    fut: asyncio.Future[Any] = loop.create_future()
    waits.append(fut)

    def settle(done: torch._C.Future[Any]) -> None:  # on the loop thread
        # Settled now: a later wait gets a callback that runs at once, and the map must not keep
        # this future, whose exception's traceback holds the torch future it is keyed by.
        waits = _torch_waits.get(done)
        if waits is not None and fut in waits:
            waits.remove(fut)
        if fut.done():
            return
        try:
            fut.set_result(done.wait())  # CUDA futures: the current stream now waits for it
        except Exception as exc:  # the collective failed: the awaiting task gets the error
            fut.set_exception(_raisable(exc))

    def on_done(done: torch._C.Future[Any]) -> None:
        try:
            loop.call_soon_threadsafe(settle, done)
        except RuntimeError:  # the loop was closed meanwhile: nobody is waiting any more
            waits = _torch_waits.get(done)
            if waits is not None and fut in waits:
                waits.remove(fut)  # (with it, the closed loop)

    tfut.add_done_callback(on_done)
    return Shielded(fut)


async def _work(work: Any) -> Any:
    """A torch.distributed work handle: gloo completes its future when the collective is done;
    NCCL when it is enqueued, after which the current stream waits for the collective's stream
    and that stream is awaited (no blocking wait). A handle without a future (gloo's
    reduce_scatter, send, recv) is waited for by a cpu worker; its result is None."""
    tfut = _work_futures.get(work)
    if tfut is None:
        try:
            tfut = work.get_future()  # a new wrapper at each call: kept, so that waits share it
        except RuntimeError:  # "Work::getFuture not implemented."; the operation has started
            await _waiters.call(_wait_once, work)  # raises the operation's error
            return None
        _work_futures[work] = tfut
    value = await _future_value(tfut)
    # The collective's own errors and timeouts surface here; it has completed, so this does not
    # block (with NCCL it also orders the current stream after the collective, already done).
    work.wait()
    return value


async def _future_value(tfut: Any) -> Any:
    """A torch future's value, once the GPU work that computes it has ended too: NCCL (and a
    DDP comm hook's then()) completes a future when its work is enqueued, so the current stream
    of every CUDA device in the value is awaited after it (found by review: a bare
    work.get_future() returned with the all-reduce still running)."""
    value = await _from_torch_future(tfut)
    devices = {t.device for t in _tensors(value) if t.is_cuda}
    for device in sorted(devices, key=lambda d: d.index or 0):
        await _on_current_stream(device)
    return value


# work handle -> its one blocking wait: [lock, None until it ran, then (its error or None,)]
_work_waits: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
# work handle -> its future (get_future() makes a new wrapper each time, which holds no handle)
_work_futures: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _wait_once(work: Any) -> None:
    """On a worker: ``work.wait()`` (it releases the GIL), once per handle. gloo's send and recv
    handles wait for one more transfer at each wait(): an await again, after a cancelled one or
    beside another, shares the first wait's outcome."""
    with _waiter_lock:
        state = _work_waits.setdefault(work, [threading.Lock(), None])
    with state[0]:
        if state[1] is None:
            try:
                work.wait()
                state[1] = (None,)
            except Exception as exc:
                state[1] = (exc,)
    if state[1][0] is not None:
        raise _raisable(state[1][0])


def _work_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    return torch.distributed.Work


def _collective_tensor_type() -> type | None:
    # Such a tensor exists only once torch imported its functional collectives (DTensor and
    # FSDP2 do): never imported here, which would load torch.distributed.
    funcol = sys.modules.get("torch.distributed._functional_collectives")
    return getattr(funcol, "AsyncCollectiveTensor", None)


# id of an AsyncCollectiveTensor a worker waits for -> (its lock, how many workers use it)
_collective_locks: dict[int, tuple[threading.Lock, int]] = {}


def _trigger_wait(x: Any) -> torch.Tensor:
    """On a worker: wait for the collective behind `x`. One wait at a time per tensor: torch
    hands the collective to the first wait only, and a second one at the same time (an await
    again after a cancelled one) would return before the collective is done."""
    key = id(x)  # `x` is alive throughout: the id is not reused meanwhile
    with _waiter_lock:
        lock, users = _collective_locks.get(key, (threading.Lock(), 0))
        _collective_locks[key] = (lock, users + 1)
    try:
        with lock:
            return x.trigger_wait()  # type: ignore[no-any-return]
    finally:
        with _waiter_lock:
            lock, users = _collective_locks[key]
            if users == 1:
                del _collective_locks[key]
            else:
                _collective_locks[key] = (lock, users - 1)


async def _collective_tensor(x: Any) -> torch.Tensor:
    """A functional collective's result (AsyncCollectiveTensor): the collective is waited for,
    and the waited tensor returned. gloo's wait blocks, so a cpu worker makes it; NCCL's makes
    the current stream wait for the collective (it does not block), and that stream is awaited."""
    if x.is_cuda:
        out: torch.Tensor = x.trigger_wait()  # once waited, it returns the tensor at once
        await _on_current_stream(out.device)
        return out
    if x.completed:
        return x.elem  # type: ignore[no-any-return]
    return await _waiters.call(_trigger_wait, x)


# torch.Event is newer than the oldest torch aiocuda supports (2.1)
_GENERIC = tuple(t for t in (getattr(torch, "Stream", None), getattr(torch, "Event", None))
                 if isinstance(t, type))


def _generic(x: Any) -> Awaitable[Any] | None:
    """torch's device-generic torch.Stream and torch.Event (not the CUDA ones)."""
    generic_stream = getattr(torch, "Stream", None)
    kind = "Stream" if generic_stream is not None and isinstance(x, generic_stream) else "Event"
    device = x.device.type
    if device == "cpu":
        return _done(None)  # the cpu's work is done when its call returns; it records no events
    raise TypeError(
        f"aiocuda.wait() takes a device-generic torch.{kind} on the cpu only (nothing to wait "
        f"for there), and this one is on '{device}': pass a torch.cuda.{kind} (or an "
        f"aiocuda.torch.{kind}) for CUDA work"
    )


def waitable(x: object) -> Awaitable[Any] | None:
    """aiocuda.wait's torch cases; None if `x` is not a torch object."""
    collective = _collective_tensor_type()
    if collective is not None and isinstance(x, collective):  # a CPU tensor still being computed
        return _collective_tensor(x)
    if isinstance(x, torch.Tensor):
        if x.is_cuda:
            return _then(_on_current_stream(x.device), x)
        return _done(x)  # CPU tensors are computed synchronously
    if isinstance(x, (torch.cuda.Event, CpuTorchEvent)):
        return _then(x if isinstance(x, CpuTorchEvent) else _event_future(x), None)
    if isinstance(x, torch.cuda.Stream):
        return _then(synchronize(x, device=x.device_index), None)
    if isinstance(x, _GENERIC):  # after torch.cuda's, which derive from them
        return _generic(x)
    if isinstance(x, torch._C.Future):  # what get_future() and then() return, and its subclass
        return _future_value(x)
    work = _work_type()
    if work is not None and isinstance(x, work):
        return _work(x)
    return None
