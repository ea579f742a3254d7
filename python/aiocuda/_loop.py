"""One completion queue per event loop: its reader, its drain and its statistics."""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from . import _core
from ._errors import AiocudaError, CudaError

__all__ = ["Statistics", "statistics", "state_for", "running_loop"]

#: Completions resolved per pass before the drain yields back to the loop (invariant 9).
BATCH = 256

_STATUS_CALL_RETURNED = _core.STATUS_CALL_RETURNED
_STATUS_CALL_RAISED = _core.STATUS_CALL_RAISED


@dataclass(frozen=True)
class Statistics:
    """A snapshot of one loop's completion queue."""

    pending: int  #: submissions whose native completion has not been drained yet
    completed: int  #: completions drained so far
    wakeups: int  #: times the loop woke up for the queue's fd
    batches: int  #: drain passes that resolved at least one completion
    largest_batch: int  #: most completions resolved in one pass


class LoopState:
    """The completion queue of one event loop, and the futures waiting on it."""

    __slots__ = (
        "loop_ref", "queue", "outcomes", "completed", "wakeups", "batches", "largest_batch",
        "_again", "fd",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop_ref = weakref.ref(loop)  # weak: the loop owns us through its reader, not back
        self.queue = _core.CompletionQueue()
        self.fd = self.queue.fd
        self.outcomes: dict[int, Any] = {}  # cpu calls: token -> return value or exception
        self.completed = self.wakeups = self.batches = self.largest_batch = 0
        self._again = False
        try:
            loop.add_reader(self.fd, self._on_readable)
        except NotImplementedError:
            self.queue.close()
            raise AiocudaError(
                f"{type(loop).__name__} does not support add_reader(), which aiocuda needs: use "
                "the default selector event loop or uvloop"
            ) from None

    def _on_readable(self) -> None:
        if self.queue.stale:
            return  # a forked child's copy: the fd is shared with the parent, never read it
        self.wakeups += 1
        self.drain()

    def _drain_again(self) -> None:
        self._again = False
        self.drain()

    def drain(self) -> None:
        """Resolve one bounded batch of completions; schedule another pass if more are left.

        At most one further pass is scheduled at a time, however often the fd fires meanwhile.
        """
        n, rest, more = self.queue.drain(BATCH)  # resolves the plain waits natively
        if rest:
            self._resolve_rest(rest)
        if n:
            self.completed += n
            self.batches += 1
            if n > self.largest_batch:
                self.largest_batch = n
        if more and not self._again:
            loop = self.loop_ref()
            if loop is not None and not loop.is_closed():
                self._again = True
                loop.call_soon(self._drain_again)

    def _resolve_rest(self, rest: list[tuple[asyncio.Future[Any], int, int]]) -> None:
        outcomes = self.outcomes
        for fut, status, token in rest:
            if status == _STATUS_CALL_RETURNED or status == _STATUS_CALL_RAISED:
                value = outcomes.pop(token, None)
            else:
                value = CudaError(status, _core.cuda_error_text(status))
            if fut.done():
                continue  # cancelled: a cancelled future is never resurrected
            if status == _STATUS_CALL_RETURNED:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def close(self) -> None:
        """Detach from the loop and drop the queue; records still in flight free themselves."""
        loop = self.loop_ref()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.fd)  # remove the reader first, then let the fd close
        self.queue.close()
        self.outcomes.clear()

    def statistics(self) -> Statistics:
        return Statistics(
            pending=0 if self.queue.closed else self.queue.pending,
            completed=self.completed,
            wakeups=self.wakeups,
            batches=self.batches,
            largest_batch=self.largest_batch,
        )


_states: dict[int, LoopState] = {}  # id(loop) -> state; entries die with their loop
_states_lock = threading.Lock()


def no_loop_error(what: str) -> AiocudaError:
    """The error for calling `what` where no event loop is running."""
    return AiocudaError(
        f"{what} needs a running event loop: call it from a coroutine or a callback "
        "running on the loop (for example inside asyncio.run(...))"
    )


def running_loop(what: str) -> asyncio.AbstractEventLoop:
    """Return the running loop, or raise an error saying where `what` must be called."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise no_loop_error(what) from None


def state_for(loop: asyncio.AbstractEventLoop) -> LoopState:
    """Return `loop`'s completion queue, creating it and its reader on first use."""
    st = _states.get(id(loop))
    if st is not None and st.loop_ref() is loop:
        return st
    return _new_state(loop)


def _new_state(loop: asyncio.AbstractEventLoop) -> LoopState:
    with _states_lock:
        _close_stale_locked()  # loops closed since we last looked
        st = LoopState(loop)
        _states[id(loop)] = st
        weakref.finalize(loop, _forget, id(loop), st)
        return st


def _forget(key: int, st: LoopState) -> None:
    with _states_lock:
        if _states.get(key) is st:
            del _states[key]
    st.close()


def close_loop_states() -> None:
    """Close the queues of loops that are closed or gone (done lazily otherwise)."""
    with _states_lock:
        _close_stale_locked()


def _close_stale_locked() -> None:
    for key, st in list(_states.items()):
        loop = st.loop_ref()
        if loop is None or loop.is_closed():
            del _states[key]
            st.close()


def statistics() -> Statistics:
    """Return a snapshot of the running loop's completion queue."""
    loop = running_loop("aiocuda.statistics()")
    st = _states.get(id(loop))
    if st is None or st.loop_ref() is not loop:
        return Statistics(0, 0, 0, 0, 0)
    return st.statistics()


def _after_fork_in_child() -> None:
    # The parent's queues, fds and in-flight records are not ours: never read, close or free
    # them. Futures that waited on the parent's work fail now instead of hanging.
    states = list(_states.values())
    _states.clear()
    err = AiocudaError(
        "this operation was submitted in the parent process before fork(); its completion is "
        "delivered to the parent only: submit it again in the child"
    )
    for st in states:
        loop = st.loop_ref()
        st.queue.abandon(err, loop is not None and not loop.is_closed())
        st.outcomes.clear()
        _orphans.append(st)


_orphans: list[LoopState] = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
