"""trio: each trio run gets an object that looks, to aiocuda's core, like an asyncio loop.

The core needs five things of a loop: ``create_future()``, ``add_reader(fd, cb)`` /
``remove_reader(fd)``, ``call_soon(cb)`` and ``is_closed()``. :class:`TrioLoop` gives them for the
trio run it was made in: the queue's eventfd is watched by a system task blocked in
``trio.lowlevel.wait_readable`` (no thread, no polling), and the futures are :class:`TrioFuture`,
whose awaiting task sleeps in ``trio.lowlevel.wait_task_rescheduled`` and is rescheduled by the
drain, on the run's own thread. So the engine, the queue and the drain are the same for asyncio,
uvloop and trio: only where the fd is watched and how a waiting task is woken differ.

Cancellation follows asyncio's rules, through trio's cancel scopes: a task cancelled while it
waits leaves the future; a future left by its last waiter is cancelled, so a completion that
arrives later finds it done and is dropped (never resurrected), and its native record is freed
then, as on asyncio. When the run's main task returns, its system tasks are cancelled; a task
still waiting then (a system task's shielded cleanup, such as a batch function's) is served
first: the queue stays open until no task waits on any of the run's futures, as an asyncio loop
runs until ``asyncio.run``'s cancelled tasks have ended. Then the loop is closed and its queue
with it: futures nobody awaited fail (a later await raises at once), records still in flight
free themselves.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import types
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

import trio

from ._errors import AiocudaError
from ._loop import _lookup, close_loop_states, nested_trio

T = TypeVar("T")

_log = logging.getLogger("aiocuda")
_LOOP: trio.lowlevel.RunVar[TrioLoop] = trio.lowlevel.RunVar("aiocuda_loop")

_PENDING, _DONE, _CANCELLED = 0, 1, 2


def current_loop() -> TrioLoop | None:
    """The running trio run's loop adapter (made on first use), or None outside a trio run."""
    try:
        return _LOOP.get()
    except LookupError:
        loop = TrioLoop()
        _LOOP.set(loop)
        return loop
    except RuntimeError:  # not in a trio run (or on one of its worker threads)
        return None


class TrioLoop:
    """A trio run, as aiocuda's completion queue sees a loop."""

    __slots__ = ("_token", "_closed", "_readers", "_deferred", "_waiting", "_draining",
                 "__weakref__")

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._closed = False
        self._readers: dict[int, trio.CancelScope] = {}
        self._deferred = 0  # futures' done callbacks (and wake-ups behind them) not run yet
        self._waiting = 0  # tasks asleep in a TrioFuture of this run
        self._draining: trio.CancelScope | None = None  # the run's end waits for them: _watch
        # Closed when the run ends, also where it never made a queue (whose watcher says so).
        trio.lowlevel.add_instrument(_RunEnd(self))

    def defer(self, fn: Callable[..., object], *args: Any,
              context: contextvars.Context | None = None) -> None:
        """Run `fn(*args)` soon on the run's thread (in `context`, if given), in order with other
        deferred calls; an exception is logged (it must not crash the run)."""
        self._deferred += 1
        self.call_soon(self._run_deferred, fn, args, context)

    def _run_deferred(self, fn: Callable[..., object], args: tuple[Any, ...],
                      context: contextvars.Context | None) -> None:
        try:
            if context is None:
                fn(*args)
            else:
                context.run(fn, *args)
        except Exception:
            _log.exception("aiocuda: exception in a future's done callback %r", fn)
        finally:
            self._deferred -= 1

    def create_future(self) -> TrioFuture[Any]:
        return TrioFuture(self)

    def is_closed(self) -> bool:
        return self._closed

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        """Run `callback(*args)` soon on the run's thread; from any thread."""
        try:
            self._token.run_sync_soon(callback, *args)
        except trio.RunFinishedError:
            raise AiocudaError("the trio run has finished") from None

    call_soon_threadsafe = call_soon

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        scope = trio.CancelScope()
        try:
            trio.lowlevel.spawn_system_task(self._watch, fd, callback, scope,
                                            name="aiocuda queue")
        except RuntimeError:  # "Nursery is closed to new arrivals"
            raise AiocudaError(
                "this trio run is ending (its tasks are done), so aiocuda can start no wait in "
                "it: an async generator that trio finalizes at the run's end does this; close it "
                "inside the run (async with contextlib.aclosing(gen))"
            ) from None
        self._readers[fd] = scope
        self._closed = False  # a wait made as the run ends, after its queue closed: a new one

    def remove_reader(self, fd: int) -> None:
        scope = self._readers.pop(fd, None)
        if scope is not None:
            scope.cancel()
            # The fd closes next: trio must forget it first (its docs: notify_closing).
            trio.lowlevel.notify_closing(fd)

    async def _watch(self, fd: int, callback: Callable[[], object],
                     scope: trio.CancelScope) -> None:
        try:
            with scope:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        callback()
                    except Exception:  # a system task's exception would crash the whole run
                        _log.exception("aiocuda: the completion queue's drain failed")
        except trio.ClosedResourceError:
            pass  # remove_reader
        finally:
            if self._readers.get(fd) is scope:  # the run is ending: so is this loop
                # Once no task waits: a shielded one (a system task's cleanup) would sleep for
                # good on a future whose queue is closed. Their futures may settle otherwise
                # than through the queue: _left ends a pass, and a task woken may wait again
                # before this one runs, so the count is read after every pass.
                with trio.CancelScope(shield=True):
                    while self._waiting:
                        with trio.CancelScope() as self._draining:
                            await trio.lowlevel.wait_readable(fd)
                            try:
                                callback()
                            except Exception:
                                _log.exception("aiocuda: the completion queue's drain failed")
                self._draining = None
                del self._readers[fd]
                st = _lookup(self)  # type: ignore[arg-type]
                if st is not None:  # its futures not awaited yet could be, and fail then
                    st.close(AiocudaError(
                        "this trio run was ending (its main task had returned) and no task "
                        "waited for this aiocuda operation, so its completion queue closed: "
                        "await it as soon as it is started, or before the main task returns"))
                # Only then closed: another thread's close_loop_states() would drop its
                # futures instead of failing them.
                self._closed = True
                close_loop_states()

    def _left(self, tasks: int) -> None:
        """`tasks` stopped waiting on this run's futures."""
        self._waiting -= tasks
        if not self._waiting and self._draining is not None:
            self._draining.cancel()

    def __repr__(self) -> str:
        return f"<aiocuda.TrioLoop {'closed' if self._closed else 'running'}>"


class _RunEnd(trio.abc.Instrument):
    """Marks a TrioLoop closed when its run ends."""

    def __init__(self, loop: TrioLoop) -> None:
        self._loop = loop

    def after_run(self) -> None:
        self._loop._closed = True


class TrioFuture(Generic[T]):
    """The outcome of one aiocuda operation under trio; ``await`` it in the run that made it.

    Offers what aiocuda and its users use of ``asyncio.Future``: ``done``, ``cancelled``,
    ``result``, ``exception``, ``cancel``, ``add_done_callback``, ``get_loop``. Several tasks
    may await it; a task cancelled while it waits leaves it, and the last one to leave cancels
    it (see the module's docstring).
    """

    __slots__ = ("_loop", "_state", "_value", "_exc", "_tb", "_callbacks", "_waiters")

    def __init__(self, loop: TrioLoop) -> None:
        self._loop = loop
        self._state = _PENDING
        self._value: Any = None
        self._exc: BaseException | None = None
        self._tb: types.TracebackType | None = None  # _exc's traceback when it was set
        # (callback, the context it runs in: its caller's, as asyncio.Future's)
        self._callbacks: list[tuple[Callable[[TrioFuture[T]], object], contextvars.Context]] = []
        self._waiters: list[Any] = []  # trio tasks, each asleep in _wait

    def get_loop(self) -> TrioLoop:
        return self._loop

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def result(self) -> T:
        if self._state == _CANCELLED:
            raise asyncio.CancelledError()
        if self._state == _PENDING:
            raise asyncio.InvalidStateError("result is not set")
        if self._exc is not None:
            # With the traceback it came with, as asyncio.Future.result() (3.11+): each raise
            # of the one exception object would chain its frames onto the last one's, so that
            # every wait on a failed future (a shielded Event awaited in a loop, several tasks
            # on one future) kept all the earlier waiters' frames, and their locals, for as
            # long as the future.
            raise self._exc.with_traceback(self._tb)
        return self._value  # type: ignore[no-any-return]

    def exception(self) -> BaseException | None:
        if self._state == _CANCELLED:
            raise asyncio.CancelledError()
        if self._state == _PENDING:
            raise asyncio.InvalidStateError("exception is not set")
        return self._exc

    def set_result(self, value: T) -> None:
        self._settle(_DONE, value, None)

    def set_exception(self, exc: BaseException) -> None:
        if isinstance(exc, type):
            exc = exc()
        self._settle(_DONE, None, exc)

    def cancel(self, msg: object = None) -> bool:
        if self._state != _PENDING:
            return False
        self._settle(_CANCELLED, None, None)
        return True

    def add_done_callback(self, fn: Callable[[TrioFuture[T]], object], *,
                          context: contextvars.Context | None = None) -> None:
        if context is None:
            context = contextvars.copy_context()
        if self._state != _PENDING:
            self._loop.defer(fn, self, context=context)
        else:
            self._callbacks.append((fn, context))

    def remove_done_callback(self, fn: Callable[[TrioFuture[T]], object]) -> int:
        before = len(self._callbacks)
        self._callbacks = [cb for cb in self._callbacks if cb[0] != fn]
        return before - len(self._callbacks)

    def _settle(self, state: int, value: Any, exc: BaseException | None) -> None:
        if self._state != _PENDING:
            raise asyncio.InvalidStateError(f"invalid state: {self!r}")
        self._state, self._value, self._exc = state, value, exc
        self._tb = None if exc is None else exc.__traceback__
        waiters, self._waiters = self._waiters, []
        callbacks, self._callbacks = self._callbacks, []
        loop = self._loop
        if waiters:
            loop._left(len(waiters))
        if not callbacks and not loop._deferred:
            _wake(waiters)  # the usual case: straight away (the drain runs on the run's thread)
            return
        # As on asyncio: done callbacks run soon, in completion order, and a task woken by a
        # later completion runs after the callbacks of earlier ones.
        for fn, context in callbacks:
            loop.defer(fn, self, context=context)
        if waiters:
            loop.defer(_wake, waiters)

    # Ctrl-C between joining the waiters and sleeping would leave this task among them, to be
    # rescheduled later while it sleeps elsewhere: it arrives through abort() instead, as in
    # trio's own ParkingLot.park.
    @trio.lowlevel.enable_ki_protection
    async def _wait(self, shielded: bool) -> T:
        # The run that made it, stepping this task: not an asyncio loop nested in it, nor an
        # asyncio host of it as a guest, which share its thread.
        if asyncio.events._get_running_loop() is None:
            try:
                here = trio.lowlevel.current_trio_token() is self._loop._token
            except RuntimeError:
                here = False
        else:
            here = nested_trio() is self._loop
        if not here:
            raise AiocudaError(
                "this aiocuda operation was started in another trio run (or an asyncio loop is "
                "awaiting it): await it in the run that started it, or start it again here"
            )
        if self._state != _PENDING:
            await trio.lowlevel.checkpoint()  # trio's rule: every await may switch and cancel
            if self._state == _CANCELLED:  # asyncio's CancelledError means nothing to trio
                raise AiocudaError(
                    "this aiocuda operation's wait was given up (its last waiter was cancelled, "
                    "or cancel() was called), so its outcome was dropped: start it again, or "
                    "await an aiocuda.Event recorded for it (a cancelled wait does not drop an "
                    "Event)"
                )
            return self.result()
        task = trio.lowlevel.current_task()
        self._waiters.append(task)
        self._loop._waiting += 1

        def abort(_: Any) -> trio.lowlevel.Abort:
            if task not in self._waiters:
                # Settled, and its wake-up deferred behind done callbacks (_settle): that wake
                # reschedules this task, and trio delivers the cancellation at its next
                # checkpoint.
                return trio.lowlevel.Abort.FAILED
            self._waiters.remove(task)
            self._loop._left(1)
            if not shielded and not self._waiters:
                self.cancel()  # nobody waits any more: the outcome is dropped when it lands
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if self._state == _CANCELLED:  # cancel() was called on it while this task waited
            raise AiocudaError(
                "the aiocuda future this task awaited was cancelled by another task; under trio, "
                "cancel a wait by cancelling its task's cancel scope"
            )
        return self.result()

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait(False).__await__()

    def shielded(self) -> Generator[Any, None, T]:
        """Await without ever cancelling the future (``asyncio.shield``'s rule)."""
        return self._wait(True).__await__()

    def __repr__(self) -> str:
        state = ("pending", "done", "cancelled")[self._state]
        return f"<aiocuda.TrioFuture {state}>"


def _wake(tasks: list[Any]) -> None:
    for task in tasks:
        trio.lowlevel.reschedule(task)
