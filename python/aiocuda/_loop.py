"""One completion queue per event loop: its reader, its drain and its statistics."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import threading
import types
import weakref
from _weakref import _remove_dead_weakref  # type: ignore[attr-defined]
from collections.abc import Awaitable, Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any

from . import _core
from ._errors import AiocudaError

__all__ = ["Statistics", "statistics", "state_for", "running_loop", "other_loop", "nested_trio",
           "shield", "Shielded", "wait_all", "spawn", "is_trio", "is_cancellation"]

_log = logging.getLogger("aiocuda")

#: Completions resolved per pass before the drain yields back to the loop (invariant 9).
BATCH = 256


@dataclass(frozen=True)
class Statistics:
    """A snapshot of one loop's completion queue."""

    pending: int  #: submissions whose native completion has not been drained yet
    completed: int  #: completions drained so far
    wakeups: int  #: times the loop woke up for the queue's fd (a flood: once per 256 completions)
    batches: int  #: drain passes that resolved at least one completion
    largest_batch: int  #: most completions resolved in one pass


class LoopState:
    """The completion queue of one event loop, and the futures waiting on it."""

    __slots__ = (
        "loop_ref", "queue", "completed", "wakeups", "batches", "largest_batch", "fd",
        "finalizer", "__weakref__",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # The loop owns its state through its reader, and nothing else does: closing the loop
        # drops the reader, and with the state goes its queue (its fd, and the futures pending
        # in it, which reference the loop). Weak here, and weak in _states.
        self.loop_ref = weakref.ref(loop)
        try:
            self.queue = _core.CompletionQueue()
        except RuntimeError as e:  # std::system_error from eventfd() (EMFILE, ENFILE, ENOMEM)
            raise AiocudaError(
                f"aiocuda could not make this event loop's completion queue ({e}): at the "
                "limit of open files, close what holds them or raise it (ulimit -n)"
            ) from None
        self.fd = self.queue.fd
        self.finalizer: weakref.finalize[Any, Any] | None = None  # set by _new_state
        self.completed = self.wakeups = self.batches = self.largest_batch = 0
        try:
            loop.add_reader(self.fd, self._on_readable)
        except NotImplementedError:
            self.queue.close()
            raise AiocudaError(
                f"{type(loop).__name__} does not support add_reader(), which aiocuda needs: use "
                "the default selector event loop, uvloop or trio"
            ) from None
        except BaseException:  # a trio run that is ending, say: nothing will read the fd
            self.queue.close()
            raise

    def _on_readable(self) -> None:
        if self.queue.closed or self.queue.stale:
            # A forked child's copy of the parent's (abandoned, or not yet): the fd is shared
            # with the parent, never read it. uvloop calls this in a child when an exception
            # unwinds through its copy of the parent's running loop: libuv polls the epoll set
            # it shares with the parent once more on its way out.
            return
        self.wakeups += 1
        self.drain()

    def drain(self) -> None:
        """Resolve one bounded batch of completions, in finishing order.

        With more left, the native drain sets the fd again: the loop runs one pass per iteration,
        with its other callbacks between, and no Python code (where a Ctrl-C may land) stands
        between a pass and the next.
        """
        n = self.queue.drain(BATCH)[0]
        if n:
            self.completed += n
            self.batches += 1
            if n > self.largest_batch:
                self.largest_batch = n

    def close(self, fail: BaseException | None = None) -> None:
        """Detach from the loop and drop the queue; records still in flight free themselves.
        Its pending futures are dropped, or failed with `fail`."""
        if self.queue.closed:
            return  # closed already, or a forked child's copy of the parent's (abandoned)
        loop = self.loop_ref()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.fd)  # remove the reader first, then let the fd close
        self.queue.close(fail)

    def statistics(self) -> Statistics:
        return Statistics(
            pending=0 if self.queue.closed else self.queue.pending,
            completed=self.completed,
            wakeups=self.wakeups,
            batches=self.batches,
            largest_batch=self.largest_batch,
        )


# id(loop) -> weak reference to its state; an entry goes when its state does.
_states: dict[int, weakref.ReferenceType[LoopState]] = {}
# Guards the changes to _states. Held only around dict operations, never across code that can
# run a finalizer (dropping a loop, closing a state): a finalizer runs on whatever thread
# happens to drop the last reference, possibly one that holds the lock.
_states_lock = threading.Lock()


def no_loop_error(what: str) -> AiocudaError:
    """The error for calling `what` where no event loop is running."""
    return AiocudaError(
        f"{what} needs a running event loop: call it from a coroutine or a callback "
        "running on the loop (for example inside asyncio.run(...) or trio.run(...)); from a "
        "worker thread (run_in_executor, to_thread), hand it back to the loop with "
        "asyncio.run_coroutine_threadsafe, trio.from_thread.run or anyio.from_thread.run"
    )


def other_loop() -> Any:
    """Where asyncio has no running loop: the running trio run's loop adapter, or None.

    trio is looked for only if something imported it: a program that never does pays nothing.
    """
    if "trio" not in sys.modules:
        return None
    from . import _trio

    return _trio.current_loop()


def nested_trio() -> Any:
    """Where asyncio has a running loop too: the trio run's adapter if the caller runs in a trio
    run nested in that loop's thread, else None.

    Both run on one thread when trio is a guest of an asyncio host
    (``trio.lowlevel.start_guest_run``), when a coroutine calls ``trio.run`` (Jupyter's
    ``%autoawait trio``), or when a trio task calls ``asyncio.run``. trio marks its ticks in
    sniffio's thread-local (which an asyncio run nested in a trio task does not undo); then the
    nearest frame of either library's code on the caller's stack says which one runs the caller:
    trio steps its tasks from trio._core, asyncio from its loop's callbacks, or the frame of the
    asyncio task being stepped (uvloop steps tasks with no Python frame of its own).
    """
    sniffio = sys.modules.get("sniffio")  # imported by trio
    if "trio" not in sys.modules or sniffio is None or sniffio.thread_local.name != "trio":
        return None
    get_coro = getattr(asyncio.current_task(), "get_coro", None)
    task_frame = getattr(get_coro(), "cr_frame", None) if get_coro is not None else None
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame is task_frame:
            return None
        top = str(frame.f_globals.get("__name__", "")).partition(".")[0]
        if top == "trio":
            from . import _trio

            return _trio.current_loop()
        if top in ("asyncio", "uvloop"):
            return None
        frame = frame.f_back
    return None


def running_loop(what: str) -> asyncio.AbstractEventLoop:
    """Return the running loop (asyncio's, or a trio run's adapter), or raise an error saying
    where `what` must be called."""
    loop: asyncio.AbstractEventLoop | None = asyncio.events._get_running_loop()
    if loop is None:
        loop = other_loop()
        if loop is None:
            raise no_loop_error(what)
    elif "trio" in sys.modules:
        trio_loop = nested_trio()
        if trio_loop is not None:
            loop = trio_loop
    return loop


def on_loop_thread() -> bool:
    """True if this thread is running an event loop (asyncio's or a trio run)."""
    return asyncio.events._get_running_loop() is not None or other_loop() is not None


def shield(fut: Any) -> Generator[Any, None, Any]:
    """``fut.__await__()`` that never cancels `fut` (``asyncio.shield``, for either kind)."""
    if isinstance(fut, asyncio.Future):
        if running_loop("await") is not fut.get_loop():  # a trio guest shares its host's thread
            raise AiocudaError(
                "this aiocuda operation was started on another event loop (or a trio run is "
                "awaiting it): await it on the loop that started it, or start it again here"
            )
        return asyncio.shield(fut).__await__()
    return fut.shielded()  # type: ignore[no-any-return]


class Shielded:
    """Awaits a future without ever cancelling it (asyncio's or trio's): one shared by several
    waits, which may each be given up."""

    __slots__ = ("_fut",)

    def __init__(self, fut: Any) -> None:
        self._fut = fut

    def __await__(self) -> Generator[Any, None, Any]:
        return shield(self._fut)


def is_cancellation(exc: BaseException) -> bool:
    """True if `exc` cancels its task: asyncio's CancelledError or trio's Cancelled."""
    if isinstance(exc, asyncio.CancelledError):
        return True
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(exc, trio.Cancelled)


def is_trio(loop: object) -> bool:
    """True if `loop` is a trio run's adapter (:class:`aiocuda._trio.TrioLoop`)."""
    if "trio" not in sys.modules:
        return False
    from . import _trio

    return isinstance(loop, _trio.TrioLoop)


# Tasks spawn() started on asyncio loops, kept alive until they end (the loop keeps only weak
# references to its tasks). A set of any thread's tasks: add and discard are atomic under the GIL.
_spawned: set[asyncio.Task[None]] = set()


def drop_closed_spawned() -> None:
    """Forget the tasks of loops closed while they were pending: they will never run again, and
    would keep their loop, and what they reference, alive."""
    for task in [t for t in list(_spawned) if t.get_loop().is_closed()]:  # list(): atomic
        _spawned.discard(task)


def spawn(loop: Any, fn: Callable[..., Awaitable[object]], *args: Any,
          never_ran: Callable[[], None] | None = None) -> None:
    """Run ``await fn(*args)`` in the background on `loop`, the running loop of this thread.

    asyncio (and uvloop): a task, referenced until it ends; it is cancelled with the others when
    ``asyncio.run`` ends. trio: a system task of the run, cancelled when the run's main task has
    ended. An exception from `fn` is logged (logger "aiocuda"), never raised into the loop or
    the run: `fn` should deliver its own errors to whoever waits on it.

    `never_ran` is called if the task ends without `fn` having started: an asyncio task
    cancelled before its first step (``for t in all_tasks(): t.cancel()``) never runs its
    coroutine, nor the ``finally`` clauses that would have released what `fn` was handed. A
    trio task always takes its first step.
    """
    if is_trio(loop):
        import trio

        # In the caller's contextvars, as asyncio's create_task runs it (a system task would
        # otherwise run in the run's own context).
        trio.lowlevel.spawn_system_task(_guarded, fn, args, name=_name(fn),
                                        context=contextvars.copy_context())
        return
    started: list[bool] = []
    task = loop.create_task(_guarded(fn, args, started))
    _spawned.add(task)
    task.add_done_callback(_spawned.discard)
    if never_ran is not None:
        task.add_done_callback(lambda _: None if started else never_ran())


def _name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or repr(fn))


async def _guarded(fn: Callable[..., Awaitable[object]], args: tuple[Any, ...],
                   started: list[bool] | None = None) -> None:
    if started is not None:  # `fn` runs to its first await in this step: its try is entered
        started.append(True)
    try:
        await fn(*args)
    except Exception:  # asyncio would log it at collection; a trio system task would crash the run
        _log.exception("aiocuda: the background task %s failed", _name(fn))


async def wait_all(aws: Iterable[Awaitable[Any]]) -> None:
    """Await every operation in `aws`, already started (futures); the first error is raised
    once all have ended, and nothing is left running."""
    first: BaseException | None = None
    for aw in list(aws):
        try:
            await aw
        except Exception as exc:
            first = first or exc
    if first is not None:
        raise first


def state_for(loop: asyncio.AbstractEventLoop) -> LoopState:
    """Return `loop`'s completion queue, creating it and its reader on first use."""
    ref = _states.get(id(loop))
    st = ref() if ref is not None else None
    if st is not None and st.loop_ref() is loop:
        return st
    return _new_state(loop)


def _lookup(loop: asyncio.AbstractEventLoop) -> LoopState | None:
    ref = _states.get(id(loop))
    st = ref() if ref is not None else None
    return st if st is not None and st.loop_ref() is loop else None


def _new_state(loop: asyncio.AbstractEventLoop) -> LoopState:
    close_loop_states()  # loops closed since we last looked
    st = LoopState(loop)
    key = id(loop)
    with _states_lock:  # dict operations only
        winner = _lookup(loop)
        if winner is None:
            _states[key] = weakref.ref(st, _entry_remover(key))
    if winner is not None:  # another thread made one meanwhile
        st.close()
        return winner
    # Should anything keep the state after its loop is collected, its queue must still close
    # then (a running-loop cache is keyed by the loop's address). Holds neither of them.
    st.finalizer = weakref.finalize(loop, _forget, weakref.ref(st))
    # Only then, never at exit: a loop alive at exit may be running, in a daemon thread, and
    # closing its state from the exiting thread would unregister its reader from under it
    # (remove_reader is not thread-safe: uvloop's changes libuv's watchers while that thread
    # polls them; a trio run's cancels its task from a foreign thread) and drop its futures.
    st.finalizer.atexit = False
    return st


def _entry_remover(key: int) -> Callable[[object], None]:
    def remove(_: object) -> None:
        # Only if the entry still holds a dead reference: a state of a newer loop at the same
        # address may have replaced it. One C call: atomic under the GIL.
        _remove_dead_weakref(_states, key)

    return remove


def _forget(st_ref: weakref.ReferenceType[LoopState]) -> None:
    # Runs when a loop is collected, on any thread, maybe one inside _new_state: no lock wait.
    st = st_ref()
    if st is not None:
        st.close()


def close_loop_states() -> None:
    """Close the queues of loops that are closed or gone, should anything still hold them."""
    stale: list[LoopState] = []
    with _states_lock:
        for key, ref in list(_states.items()):
            st = ref()
            loop = st.loop_ref() if st is not None else None
            if st is not None and (loop is None or loop.is_closed()):
                del _states[key]
                stale.append(st)
    for st in stale:  # outside the lock: closing may drop a loop's last reference
        st.close()


def statistics() -> Statistics:
    """Return a snapshot of the running loop's completion queue."""
    st = _lookup(running_loop("aiocuda.statistics()"))
    return Statistics(0, 0, 0, 0, 0) if st is None else st.statistics()


def _after_fork_in_child() -> None:
    # The parent's queues, fds, in-flight records and reader registrations (in an epoll
    # instance the child shares) are not ours: never read, close, free or unregister them,
    # however the child exits. Futures that waited on the parent's work fail now instead of
    # hanging. The lock may have been held by a thread that does not exist here.
    global _states_lock
    _states_lock = threading.Lock()
    states = [st for st in (ref() for ref in _states.values()) if st is not None]
    _states.clear()
    err = AiocudaError(
        "this operation was submitted in the parent process before fork(); its completion is "
        "delivered to the parent only: submit it again in the child"
    )
    for st in states:
        if st.finalizer is not None:
            st.finalizer.detach()  # collecting the loop would unregister the parent's reader
        loop = st.loop_ref()
        st.queue.abandon(err, loop is not None and not loop.is_closed())
        _orphans.append(st)


_orphans: list[LoopState] = []  # kept, never closed: see _after_fork_in_child
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
