"""Dynamic batching: many callers' items, one call of an async function for the whole batch.

The behaviour follows Ray Serve's ``@serve.batch`` (max_batch_size, batch_wait_timeout_s,
max_concurrent_batches; https://docs.ray.io/en/latest/serve/advanced-guides/dyn-req-batch.html),
written for aiocuda: one queue per event loop (asyncio, uvloop or a trio run), no task while
nothing waits, and the callers' futures made by the loop they run on.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import math
import numbers
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ._errors import AiocudaError, faithful_copy
from ._loop import Shielded, drop_closed_spawned, is_cancellation, is_trio, running_loop, spawn

__all__ = ["Batcher", "batch"]

T = TypeVar("T")
R = TypeVar("R")

# Iterable, not Sequence: a tensor (its rows) is a valid return, and is not a Sequence.
BatchFn = Callable[[list[T]], Awaitable[Iterable[R]]]
MethodFn = Callable[[Any, list[T]], Awaitable[Iterable[R]]]

# Python 3.10's tasks have no cancelling(): there, a batch task records its own cancel() calls.
_HAS_CANCELLING = sys.version_info >= (3, 11)


class _Entry:
    """One caller's item, the future its caller awaits, and the caller's contextvars."""

    __slots__ = ("item", "fut", "arrived", "ctx")

    def __init__(self, item: Any, fut: Any, arrived: float, ctx: contextvars.Context) -> None:
        self.item, self.fut, self.arrived, self.ctx = item, fut, arrived, ctx


class _Queue:
    """The items waiting on one loop, and its batches. Used on that loop's thread only."""

    __slots__ = ("waiting", "running", "dispatching", "wakeup", "__weakref__")

    def __init__(self) -> None:
        self.waiting: dict[_Entry, None] = {}  # an ordered set: arrival order, O(1) removal
        self.running = 0  # batches started and not ended
        self.dispatching = False  # a dispatcher task is alive
        self.wakeup: Any = None  # the future the dispatcher sleeps on, if it sleeps

    def wake(self) -> None:
        fut, self.wakeup = self.wakeup, None
        if fut is not None and not fut.done():
            fut.set_result(None)


_CLOCK_SLACK = 1e-6  # seconds: a deadline this close is reached (see Batcher._dispatch)


def _now(loop: Any) -> float:
    if is_trio(loop):
        import trio

        return trio.current_time()
    return float(loop.time())


async def _sleep_until_woken(loop: Any, q: _Queue, timeout: float | None) -> None:
    """Sleep until ``q.wake()`` or until `timeout` seconds have passed (None: no limit)."""
    fut = loop.create_future()
    q.wakeup = fut
    try:
        if is_trio(loop):
            import trio

            with trio.move_on_after(math.inf if timeout is None else max(timeout, 0.0)):
                await Shielded(fut)
        else:
            if timeout is not None and not hasattr(loop, "_clock_resolution"):
                # uvloop's clock and timers move in whole milliseconds (libuv's), and call_later
                # rounds to the nearest one: a deadline 0.4 ms away would be a timer of 0 ms,
                # run again at once until the clock ticks (a busy loop of up to 1 ms). asyncio's
                # loops keep _clock_resolution and wake at the deadline. (Less a nanosecond: the
                # float error of `arrived + 0.002 - now` must not make 2 ms a 3 ms sleep.)
                timeout = math.ceil(timeout * 1000 - 1e-6) / 1000
            await asyncio.wait((fut,), timeout=timeout)
    finally:
        if q.wakeup is fut:
            q.wakeup = None
        if not fut.done():
            fut.cancel()


class _CancelCalls:
    """Whether the running batch task itself is being cancelled (not something it awaited)."""

    __slots__ = ("_loop", "_task", "_called")

    def __init__(self, loop: Any) -> None:
        self._loop, self._task, self._called = loop, None, False
        if is_trio(loop) or _HAS_CANCELLING:
            return
        task: Any = asyncio.current_task()
        cancel = task.cancel

        def tracked(msg: Any = None) -> bool:
            self._called = True
            return cancel(msg)  # type: ignore[no-any-return]

        try:
            task.cancel = tracked  # asyncio.run and others cancel a task by its cancel()
            self._task = task
        except AttributeError:  # a task class that takes no attributes: as if cancelled
            self._called = True

    def cancelled(self) -> bool:
        if is_trio(self._loop):
            import trio

            return trio.current_effective_deadline() == -math.inf
        if _HAS_CANCELLING:
            cancelling = getattr(asyncio.current_task(), "cancelling", None)
            return cancelling is None or cancelling() > 0
        return self._called

    def close(self) -> None:
        if self._task is not None:
            del self._task.cancel  # the task's own method again (and no reference cycle)
            self._task = None


def _check_settings(max_batch_size: object, max_wait_s: object,
                    max_concurrent_batches: object) -> None:
    for name, value in (("max_batch_size", max_batch_size),
                        ("max_concurrent_batches", max_concurrent_batches)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):  # numpy's too
            raise TypeError(f"aiocuda.batch: {name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"aiocuda.batch: {name} must be at least 1, got {value}")
    if not isinstance(max_wait_s, numbers.Real) or isinstance(max_wait_s, bool):
        raise TypeError("aiocuda.batch: max_wait_s must be a number of seconds, got "
                        f"{type(max_wait_s).__name__}")
    try:
        seconds = float(max_wait_s)
    except OverflowError:  # an int beyond any float
        seconds = math.inf
    if not (0 <= seconds < math.inf):
        raise ValueError("aiocuda.batch: max_wait_s must be a finite number of seconds >= 0, "
                         f"got {max_wait_s}")


def _check_function(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"aiocuda.batch decorates an async function, got {type(fn).__name__}: "
                        "pass the settings as keywords, @aiocuda.batch(max_batch_size=32)")
    # An object with an `async def __call__` (a model wrapper) is an async function too; its
    # type's __call__, not its own attribute: a class's __call__ would make an instance.
    if not (inspect.iscoroutinefunction(fn)
            or inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))):
        if inspect.iscoroutinefunction(inspect.unwrap(fn)):
            raise TypeError(
                f"aiocuda.batch needs an async function, got {fn!r}, a plain function wrapping "
                "one (a decorator such as @torch.inference_mode(), which then covers only the "
                "making of the coroutine, not its run): use the decorator's context manager "
                "inside the async def instead (with torch.inference_mode(): ...)"
            )
        raise TypeError(
            f"aiocuda.batch needs an async function (async def f(items: list) -> list), got "
            f"{fn!r}: make it an async def and await its GPU work in it (aiocuda.gpu_op)"
        )


class Batcher(Generic[T, R]):
    """Callers' items, gathered into batches, each batch given to one call of an async function.

    Made by :func:`aiocuda.batch`. ``await batcher(item)`` returns that item's result.

    Rules:

    - A batch starts when `max_batch_size` items wait, or `max_wait_s` seconds after the
      first of the waiting items arrived, whichever comes first; at most
      `max_concurrent_batches` batches run at once (more items wait for a free one). The
      function gets the items in arrival order and must return one result per item, in
      that order (a list, a tuple, a tensor's rows: anything ``list()`` takes).
    - An exception from the function reaches every caller of that batch; a wrong number of
      results fails them all with a ``ValueError``. Other batches are not affected. A
      ``CancelledError`` from the function (something it awaited was cancelled) reaches them
      as a ``RuntimeError``: only a batch cancelled itself (its loop ending) cancels them.
    - The function runs in its batch's first caller's contextvars (a copy).
    - A caller cancelled before its batch starts is left out of it; cancelled after, its
      result is dropped and the batch goes on (the GPU work runs to its end anyway).
    - Each event loop (asyncio, uvloop, or a trio run) has its own queue: callers on
      different loops, in different threads, are never batched together. A batch runs on
      its callers' loop, in a task of its own; while nothing waits, no task exists.
    - On a method, each instance gets its own batcher (its own queues), as a bound method, kept
      in the instance's ``__dict__``. It holds its instance, as a bound method does: the two
      make a cycle, which the garbage collector frees (``gc.collect()`` frees a dropped model's
      memory at once).
    - Each caller of a failed batch gets an exception of its own: a faithful copy of the one the
      function raised (the first caller gets that one), with its cause and traceback.
    """

    def __init__(self, fn: Callable[..., Awaitable[Iterable[R]]], *, max_batch_size: int = 32,
                 max_wait_s: float = 0.002, max_concurrent_batches: int = 1) -> None:
        _check_function(fn)
        _check_settings(max_batch_size, max_wait_s, max_concurrent_batches)
        self._setup(fn, int(max_batch_size), float(max_wait_s), int(max_concurrent_batches))

    def _setup(self, fn: Callable[..., Awaitable[Iterable[R]]], max_batch_size: int,
               max_wait_s: float, max_concurrent_batches: int) -> None:
        # First: it copies fn's __dict__, whose attributes (a model wrapper's own _fn, _lock or
        # max_batch_size) must not replace this batcher's.
        functools.update_wrapper(self, fn)
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_concurrent_batches = max_concurrent_batches
        self._queues: weakref.WeakKeyDictionary[Any, _Queue] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        # Where an instance keeps its batcher: one name per class-level batcher, since two of
        # them may wrap functions of one __qualname__ (a decorator without functools.wraps, one
        # function batched twice with other settings), and each must run its own.
        self._attr = f"_aiocuda_batcher_{getattr(fn, '__qualname__', '')}_{id(self):x}"

    # ---- methods: one batcher per instance ----------------------------------------------------

    def __get__(self, obj: object, objtype: type | None = None) -> Batcher[T, R]:
        if obj is None or not inspect.isfunction(self._fn):
            # An async callable object or a partial (which has a __get__ from Python 3.13 that
            # binds nothing): not a method, as without us.
            return self
        if isinstance(obj, type):  # classmethod(batch(f)) binds it to the class (Python < 3.13)
            raise self._on_a_class(obj)
        try:
            store: dict[str, Any] = obj.__dict__
        except AttributeError:
            raise TypeError(
                f"@aiocuda.batch on a method of {type(obj).__name__}, whose instances have no "
                "__dict__ (__slots__): add '__dict__' to its __slots__, where each instance "
                "keeps its batcher"
            ) from None
        bound: Batcher[T, R] | None = store.get(self._attr)
        # A shallow copy (copy.copy) shares the original's __dict__ entries: a batcher made for
        # another instance is replaced, or the copy's calls would run as the original's.
        if bound is None or getattr(bound._fn, "__self__", None) is not obj:
            made: Batcher[T, R] = Batcher.__new__(Batcher)
            made._setup(self._fn.__get__(obj, type(obj)),
                        self.max_batch_size, self.max_wait_s, self.max_concurrent_batches)
            with self._lock:  # one per instance, whoever wins
                bound = store.get(self._attr)
                if bound is None or getattr(bound._fn, "__self__", None) is not obj:
                    store[self._attr] = bound = made
        return bound

    # ---- pickling (Ray ships a deployment's class by value): settings only ----------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"fn": self._fn, "max_batch_size": self.max_batch_size,
                "max_wait_s": self.max_wait_s,
                "max_concurrent_batches": self.max_concurrent_batches}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["fn"], state["max_batch_size"], state["max_wait_s"],
                    state["max_concurrent_batches"])

    # ---- callers ------------------------------------------------------------------------------

    def _on_a_class(self, cls: type) -> TypeError:
        return TypeError(
            f"{self._name()} is bound to the class {cls.__name__} (@classmethod): a batcher "
            "belongs to an instance or to a function; decorate a method or a function"
        )

    def _is_classmethod_of(self, cls: type) -> bool:
        """Whether a classmethod over this batcher is an attribute of `cls` (or a base)."""
        return any(isinstance(v, classmethod) and v.__func__ is self
                   for k in cls.__mro__ for v in vars(k).values())

    if TYPE_CHECKING:
        async def __call__(self, item: T) -> R:
            """Add `item` to the next batch of this loop; return its result once the batch is
            done."""
    else:
        async def __call__(self, item, *extra):
            """Add `item` to the next batch of this loop; return its result once the batch is
            done."""
            if extra:  # one item, as type checkers see it; this says why when it is not
                if len(extra) == 1 and isinstance(item, type):
                    # Python 3.13's classmethod binds without __get__: (cls, item) arrive here.
                    raise self._on_a_class(item)
                raise TypeError(
                    f"{self._name()}(item) takes one item, got {1 + len(extra)} arguments")
            if isinstance(item, type) and self._is_classmethod_of(item):
                raise self._on_a_class(item)  # Python 3.13: Model.classify() passes Model alone
            return await self._submit(item)

        # What the documentation (and inspect.signature) shows: one item, as type checkers see.
        __call__.__signature__ = inspect.Signature(
            [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
             inspect.Parameter("item", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="T")],
            return_annotation="R")

    async def _submit(self, item: T) -> R:
        loop = running_loop(f"{self._name()}(item)")
        q = self._queue(loop)
        fut = loop.create_future()
        entry = _Entry(item, fut, _now(loop), contextvars.copy_context())
        q.waiting[entry] = None
        if not q.dispatching:
            q.dispatching = True
            try:
                # In an empty context: the dispatcher outlives this caller, and would keep its
                # contextvars alive and hand them to every later batch.
                contextvars.Context().run(spawn, loop, self._dispatch, loop, q,
                                          never_ran=lambda: self._dispatch_ended(q, True))
            except BaseException:  # the loop is closing: nothing will run this batch
                q.dispatching = False
                del q.waiting[entry]
                raise
        elif len(q.waiting) >= self.max_batch_size:
            q.wake()
        try:
            return await fut  # type: ignore[no-any-return]
        finally:
            if entry in q.waiting:  # cancelled before its batch started: leave the queue
                del q.waiting[entry]
                if not fut.done():
                    fut.cancel()
                if not q.waiting:
                    q.wake()  # it was the last one waiting: the dispatcher may end now

    def _name(self) -> str:
        return f"aiocuda.batch {getattr(self._fn, '__qualname__', self._fn)!s}"

    def _queue(self, loop: Any) -> _Queue:
        q = self._queues.get(loop)
        if q is None:
            stale: list[_Queue] = []
            with self._lock:
                q = self._queues.get(loop)
                if q is None:
                    # A loop closed with callers waiting (run_until_complete, then close()) is
                    # never collected: its queue's futures reference it. Drop such queues now.
                    for old, old_q in list(self._queues.items()):
                        if old.is_closed():
                            stale.append(old_q)
                            del self._queues[old]
                    q = self._queues[loop] = _Queue()
            for old_q in stale:  # outside the lock: this may drop a loop's last reference
                old_q.waiting.clear()
            if stale:
                drop_closed_spawned()  # their dispatchers, which will never run again
        return q

    # ---- the loop's dispatcher and batches ----------------------------------------------------

    async def _dispatch(self, loop: Any, q: _Queue) -> None:
        """Start batches while items wait; end when none does."""
        try:
            while q.waiting:
                now = _now(loop)
                deadline = next(iter(q.waiting)).arrived + self.max_wait_s
                # Within _CLOCK_SLACK of it counts as reached: uvloop's clock moves in whole
                # milliseconds, and `arrived + 0.002` may round to a hair past the tick it is.
                ready = len(q.waiting) >= self.max_batch_size or deadline - now <= _CLOCK_SLACK
                free = q.running < self.max_concurrent_batches
                if ready and free:
                    entries = []
                    for entry in q.waiting:
                        entries.append(entry)
                        if len(entries) == self.max_batch_size:
                            break
                    for entry in entries:
                        del q.waiting[entry]
                    q.running += 1
                    # In its first caller's contextvars (a request id, a trace span), as if
                    # that caller had called the function.
                    entries[0].ctx.run(spawn, loop, self._run_batch, loop, q, entries,
                                       never_ran=functools.partial(self._batch_ended, q, entries))
                    continue
                await _sleep_until_woken(loop, q, None if not free else deadline - now)
        except BaseException:
            self._dispatch_ended(q, True)
            raise
        finally:
            self._dispatch_ended(q, False)

    def _dispatch_ended(self, q: _Queue, failed: bool) -> None:
        """The dispatcher ended. If it was cancelled (or failed), the callers still waiting are
        told so: nothing else would start their batch, and they would wait forever."""
        q.dispatching = False
        if failed:
            self._fail([*q.waiting], self._stopped("dispatcher"))  # their callers leave the queue

    def _batch_ended(self, q: _Queue, entries: list[_Entry]) -> None:
        """A batch's task was cancelled before it started: its callers are told so."""
        self._fail(entries, self._stopped("batch"))
        q.running -= 1
        q.wake()

    def _stopped(self, task: str) -> AiocudaError:
        return AiocudaError(
            f"{self._name()}: its {task} task was cancelled before the batch ran (something "
            "cancelled aiocuda's background tasks, as cancelling every task of "
            "asyncio.all_tasks() does): call it again"
        )

    async def _run_batch(self, loop: Any, q: _Queue, entries: list[_Entry]) -> None:
        """Call the function on the entries' items; give each caller its result or the error."""
        cancels = _CancelCalls(loop)
        try:
            live = [e for e in entries if not e.fut.done()]  # not cancelled since it was taken
            if not live:
                return
            try:
                out = await self._fn([e.item for e in live])
                results = self._results(out, len(live))
            except Exception as exc:
                self._fail(live, exc)
                return
            except BaseException as exc:
                if isinstance(exc, GeneratorExit) or loop.is_closed():
                    raise  # collected with its closed loop: nobody waits, nothing to tell
                if is_cancellation(exc) and not cancels.cancelled():
                    # The function's own (a future or task it awaited was cancelled by something
                    # else): its callers were not cancelled, they get an error.
                    err = AiocudaError(
                        f"{self._name()}: the batch function raised CancelledError, but its "
                        "batch was not cancelled (something it awaited was): catch it in the "
                        "function, or raise another exception"
                    )
                    err.__cause__ = exc
                    self._fail(live, err)
                    return
                for e in live:  # cancelled (the loop is shutting down) or interrupted
                    if not e.fut.done():
                        e.fut.cancel()
                raise
            for e, r in zip(live, results):
                if not e.fut.done():  # a caller cancelled after the start: its result is dropped
                    e.fut.set_result(r)
        finally:
            cancels.close()
            q.running -= 1
            if not loop.is_closed():
                q.wake()

    @staticmethod
    def _fail(live: list[_Entry], exc: BaseException) -> None:
        """Each caller gets an exception of its own (a faithful copy where one can be made):
        what one request's handler adds to it (a note, its context, its traceback) must not
        show in another's."""
        first = True
        for e in live:
            if not e.fut.done():
                e.fut.set_exception(exc if first else faithful_copy(exc) or exc)
                first = False

    def _results(self, out: object, n: int) -> list[R]:
        if inspect.isawaitable(out):
            # An asyncio future is iterable (it yields itself): list() would fail obscurely.
            if inspect.iscoroutine(out):
                out.close()  # never to be awaited: no "never awaited" warning besides the error
            raise TypeError(
                f"{self._name()} returned the awaitable {type(out).__name__}, not its results: "
                "await it in the batch function and return what it gives"
            )
        if isinstance(out, (str, bytes, bytearray, Mapping, AbstractSet)):
            # list() takes them, but their elements are not one result per item, in order.
            raise TypeError(
                f"{self._name()} returned {type(out).__name__}, not a sequence of results: "
                "return one result per item, in the items' order (a list, a tuple, a tensor's "
                "rows)"
            )
        try:
            it = iter(out)  # type: ignore[call-overload]
        except TypeError:
            raise TypeError(
                f"{self._name()} returned {type(out).__name__}, not a sequence: return one "
                "result per item, in the items' order (a list, a tuple, a tensor's rows)"
            ) from None
        results: list[R] = list(it)  # a generator's own TypeError is the function's, as raised
        if len(results) != n:
            raise ValueError(
                f"{self._name()} got {n} items and returned {len(results)} results: return "
                "exactly one result per item, in the items' order"
            )
        return results

    def __repr__(self) -> str:
        return (f"<aiocuda.Batcher {self._name()} max_batch_size={self.max_batch_size} "
                f"max_wait_s={self.max_wait_s} "
                f"max_concurrent_batches={self.max_concurrent_batches}>")


@overload
def batch(fn: BatchFn[T, R], /) -> Batcher[T, R]: ...
@overload
def batch(fn: MethodFn[T, R], /) -> Batcher[T, R]: ...
@overload
def batch(*, max_batch_size: int = 32, max_wait_s: float = 0.002,
          max_concurrent_batches: int = 1) -> Callable[[BatchFn[T, R] | MethodFn[T, R]],
                                                         Batcher[T, R]]: ...


def batch(fn: Any = None, /, *, max_batch_size: int = 32, max_wait_s: float = 0.002,
          max_concurrent_batches: int = 1) -> Any:
    """Turn ``async def f(items: list[T]) -> Iterable[R]`` into a :class:`Batcher` whose
    ``await b(item)`` returns that item's result, computed in a batch with other callers' items.

    Use it bare (``@aiocuda.batch``) or with settings
    (``@aiocuda.batch(max_batch_size=32, max_wait_s=0.002, max_concurrent_batches=1)``),
    on a function or on a method (one batcher per instance). A typical body awaits one
    ``gpu_op`` for the batch: ``return list(await aiocuda.gpu_op(model, torch.stack(items)))``.
    Wrong settings, or a function that is not ``async def``, raise at decoration time.
    See :class:`Batcher` for the rules.
    """
    _check_settings(max_batch_size, max_wait_s, max_concurrent_batches)

    def decorate(f: Any) -> Batcher[Any, Any]:
        return Batcher(f, max_batch_size=max_batch_size, max_wait_s=max_wait_s,
                       max_concurrent_batches=max_concurrent_batches)

    if fn is None:
        return decorate
    return decorate(fn)

