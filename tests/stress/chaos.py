"""Chaos on one event loop: many streams and tasks, random cancellations, timeouts and
exceptions, event chains between streams, and (cuda) sticky errors with resets.

``run_chaos(ops, seed, backend, loop_kind, emu)`` returns the run's Figures; ``problems()`` lists
every check that failed. Checked: each future's outcome (the value, the very exception raised,
StopIteration delivered as a RuntimeError caused by it, a CudaError only after a sticky error was
injected); per-stream delivery order (the order in which one stream's futures complete, seen by
done callbacks, equals their submission order, cancelled ones excluded); no await completes
before its stream's earlier work (cpu: a counter the calls bump; cuda: an event recorded just
before the await, queried when it completes); no future left pending; no loop exception handler
call (a "Future exception was never retrieved" among them); every native record freed, no
future kept alive, the cuda engine idle; RSS growth bounded; fds and threads back to their
baseline (cpu) or bounded (cuda: aiocuda's lanes and pooled events stay).

The short tests (tests/test_stress.py) and scripts/stress run this same code with other sizes.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiocuda
from aiocuda import _core, _loop, _ops

from .common import fd_count, native_threads, rss_bytes

MiB = 1 << 20
CUDA_THREAD_SLACK = 40  # aiocuda's lanes and engine threads stay (bounded: 16 lanes a device)
ILLEGAL_ADDRESS = 700  # the sticky error injected on the emulator


class Boom(BaseException):
    """A BaseException that is not an Exception (nor KeyboardInterrupt or SystemExit)."""


@dataclass
class Figures:
    backend: str
    loop: str
    seed: int
    debug: bool = False
    ops: int = 0  #: aiocuda calls made (submit, synchronize, record, wait_event, delay, ...)
    futures: int = 0  #: futures and tasks tracked
    results: int = 0  #: completed with a result
    exceptions: int = 0  #: completed with an exception (the expected one)
    cancellations: int = 0  #: cancelled (directly, by a timeout or by cancelling an awaiter)
    timeouts: int = 0  #: asyncio.wait_for timeouts that fired (each cancelled its future)
    refused: int = 0  #: calls refused at once (cuda: after a sticky error)
    cuda_errors: int = 0  #: awaits failed with the sticky error (cuda)
    sticky_errors: int = 0  #: sticky errors injected (cuda), each followed by a reset
    strategy_flips: int = 0  #: set_strategy() calls while awaits were pending (cuda)
    inversions: int = 0  #: completions delivered after a later one of the same stream
    early: int = 0  #: awaits completed before the stream's earlier work had finished
    wrong: int = 0  #: futures with an outcome other than the expected one
    hung: int = 0  #: futures still pending at the end
    loop_errors: int = 0  #: loop exception handler calls ("never retrieved" among them)
    never_retrieved: int = 0  #: of which "exception was never retrieved"
    live_records_end: int = -1  #: native completion records alive after teardown
    cuda_pending_end: int = 0  #: awaits the cuda engine still held after teardown
    live_futures_end: int = -1  #: tracked futures still alive after teardown
    rss_start: int = 0  #: bytes, once the streams exist
    rss_growth: int = 0  #: bytes, from 20 % of the operations to the end
    fds_delta: int = 0  #: open fds after teardown minus before the run
    threads_delta: int = 0  #: native threads after teardown minus before the run
    forced: int = 0  #: forced outcomes (one timeout, cancellation, exception; a CudaError
    #: per sticky error) that came out as forced
    forced_missed: int = 0  #: forced outcomes that did not (a gated await completed early...)
    seconds: float = 0.0
    run_timed_out: bool = False
    stalled: bool = False  #: an await outlived the guard: the run stopped early
    examples: list[str] = field(default_factory=list)  #: the first few failures, described

    def note(self, what: str, category: str = "") -> None:
        self._noted = getattr(self, "_noted", {})
        n = self._noted.get(category, 0)
        if n < 3 and len(self.examples) < 15:
            self._noted[category] = n + 1
            self.examples.append(what)

    def problems(self, *, rss_limit: int = 64 * MiB, thread_slack: int | None = None,
                 fd_slack: int | None = None) -> list[str]:
        """Every check this run failed, each in words (empty: all passed)."""
        cuda = self.backend == "cuda"
        if thread_slack is None:
            thread_slack = CUDA_THREAD_SLACK if cuda else 0
        if fd_slack is None:
            fd_slack = 8 if cuda else 0
        out = []
        checks = [
            (self.run_timed_out, "the run did not finish in time"),
            (self.stalled, "an await outlived the guard, so the run stopped early"),
            (self.inversions, f"{self.inversions} completions delivered out of stream order"),
            (self.early, f"{self.early} awaits completed before the stream's earlier work"),
            (self.wrong, f"{self.wrong} futures got the wrong outcome"),
            (self.hung, f"{self.hung} futures never completed"),
            (self.loop_errors, f"{self.loop_errors} loop exception handler calls "
                               f"({self.never_retrieved} 'never retrieved')"),
            (self.live_records_end != 0, f"{self.live_records_end} native records never freed"),
            (self.cuda_pending_end != 0, f"the cuda engine still holds {self.cuda_pending_end}"),
            (self.live_futures_end != 0, f"{self.live_futures_end} futures kept alive"),
            (self.rss_growth > rss_limit, f"RSS grew {self.rss_growth / MiB:.1f} MiB "
                                          f"(limit {rss_limit / MiB:.0f})"),
            (self.fds_delta > fd_slack, f"{self.fds_delta} more fds than before the run"),
            (self.threads_delta > thread_slack,
             f"{self.threads_delta} more threads than before the run"),
            (self.ops == 0, "no operation ran"),
            (self.forced_missed, f"{self.forced_missed} forced outcomes did not happen"),
        ]
        out = [text for bad, text in checks if bad]
        if out and self.examples:
            out.append("examples: " + " | ".join(self.examples))
        return out

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- what a future must end with -------------------------------------------------------------
class Op:
    """One tracked future: its stream (for the order), its sequence and its expected outcome."""

    __slots__ = ("key", "seq", "check", "gen", "what", "may_cancel", "cleanup")

    def __init__(self, key: object, seq: int, check: Callable[..., str | None], gen: Any,
                 what: str, may_cancel: bool, cleanup: Callable[[], None] | None) -> None:
        self.key, self.seq, self.check, self.gen, self.what = key, seq, check, gen, what
        self.may_cancel, self.cleanup = may_cancel, cleanup


def _chain_has(exc: BaseException | None, kind: type[BaseException]) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def expect_value(value: object) -> Callable[[Any, BaseException | None], str | None]:
    def check(fut: Any, exc: BaseException | None) -> str | None:
        if exc is not None:
            return f"raised {exc!r}, expected the result {value!r}"
        got = fut.result()
        return None if got == value else f"returned {got!r}, expected {value!r}"
    return check


def expect_raised(instance: BaseException) -> Callable[[Any, BaseException | None], str | None]:
    def check(fut: Any, exc: BaseException | None) -> str | None:
        if exc is instance:
            return None
        return f"got {exc!r}, expected the instance raised, {instance!r}"
    return check


def expect_stop_iteration(fut: Any, exc: BaseException | None) -> str | None:
    # A future cannot hold StopIteration; asyncio itself turns it into a RuntimeError.
    if isinstance(exc, RuntimeError) and _chain_has(exc, StopIteration):
        return None
    return f"got {exc!r}, expected a RuntimeError caused by the StopIteration raised"


class CudaGen:
    """One generation of the emulated device: its streams, until a sticky error and reset."""

    def __init__(self, number: int, streams: list[int], ctx: int) -> None:
        self.number, self.streams, self.ctx = number, streams, ctx
        self.broken = False
        self.replaced = asyncio.Event()  # set once a reset made the next generation
        self.pending: set[Any] = set()  # its tracked futures not completed yet


def cuda_outcome(inner: Callable[[Any, BaseException | None], str | None] | None = None,
                 ) -> Callable[[Any, BaseException | None], str | None]:
    """The outcome of a cuda await: `inner`'s, or a CudaError once its generation broke."""
    def check(fut: Any, exc: BaseException | None, gen: CudaGen | None = None) -> str | None:
        if isinstance(exc, aiocuda.CudaError):
            if gen is not None and gen.broken and exc.code == ILLEGAL_ADDRESS:
                return None
            return f"failed with {exc!r} although no sticky error was injected"
        if inner is not None:
            return inner(fut, exc)
        return None if exc is None else f"raised {exc!r}"
    check.takes_gen = True  # type: ignore[attr-defined]
    return check


def _short(exc: BaseException | None) -> str:
    if exc is None:
        return "result"
    return exc.name if isinstance(exc, aiocuda.CudaError) else type(exc).__name__


class Tracker:
    """Done callbacks on every future: order per stream, outcome, counts; what is pending."""

    def __init__(self, fig: Figures) -> None:
        self.fig = fig
        self.pending: dict[int, Any] = {}  # id(fut) -> fut, until it completes
        self.seq: dict[object, int] = {}
        self.last: dict[object, tuple[int, str]] = {}  # key -> (newest delivered, its outcome)
        self.alive: weakref.WeakSet[Any] = weakref.WeakSet()

    def track(self, fut: Any, key: object, check: Callable[..., str | None], what: str,
              gen: CudaGen | None = None, may_cancel: bool = True,
              cleanup: Callable[[], None] | None = None) -> Any:
        seq = 0
        if key is not None:
            seq = self.seq[key] = self.seq.get(key, 0) + 1
        op = Op(key, seq, check, gen, what, may_cancel, cleanup)
        self.fig.futures += 1
        self.pending[id(fut)] = fut
        self.alive.add(fut)
        if gen is not None:
            gen.pending.add(fut)
        fut.add_done_callback(functools.partial(self._done, op))
        return fut

    def _done(self, op: Op, fut: Any) -> None:
        try:
            self._judge(op, fut)
        finally:
            if op.cleanup is not None:
                op.cleanup()

    def _judge(self, op: Op, fut: Any) -> None:
        fig = self.fig
        self.pending.pop(id(fut), None)
        if op.gen is not None:
            op.gen.pending.discard(fut)
        if fut.cancelled():
            fig.cancellations += 1
            if not op.may_cancel:
                fig.wrong += 1
                fig.note(f"{op.what}: cancelled, but nobody cancelled it", "cancel")
            return
        exc = fut.exception()  # retrieved: an unexpected one is ours to report, not asyncio's
        if op.key is not None:
            last = self.last.get(op.key)
            if last is not None and op.seq < last[0]:
                fig.inversions += 1
                fig.note(f"{op.what} #{op.seq} of stream {op.key} ({_short(exc)}) delivered "
                         f"after #{last[0]} ({last[1]}); strategy {aiocuda.strategy()}"
                         + (f", generation broken: {op.gen.broken}" if op.gen else ""), "order")
            else:
                self.last[op.key] = (op.seq, _short(exc))
        if exc is None:
            fig.results += 1
        else:
            fig.exceptions += 1
            if isinstance(exc, aiocuda.CudaError):
                fig.cuda_errors += 1
        try:
            if getattr(op.check, "takes_gen", False):
                problem = op.check(fut, exc, op.gen)
            else:
                problem = op.check(fut, exc)
        except Exception as e:  # a check that cannot even look at the outcome
            problem = f"checking the outcome raised {e!r}"
        if problem:
            fig.wrong += 1
            fig.note(f"{op.what}: {problem}", "outcome")


# ---- the functions the cpu streams run ----------------------------------------------------------
def _work(counts: list[int], i: int, action: int, payload: Any) -> Any:
    counts[i] += 1  # every call on stream i bumps its count first (the under-wait check)
    if action == 0:
        return payload
    if action == 1:
        raise payload
    if action == 2:  # chain source: write a cell that a call on another stream reads
        cells, key, value = payload
        cells[key] = value
        return None
    if action == 3:  # chain sink
        cells, key = payload
        return cells.pop(key, "<not written yet>")
    raise AssertionError(action)


def _plain(action: int, payload: Any) -> Any:
    if action == 0:
        return payload
    raise payload


_KINDS = ("value", "ValueError", "StopIteration", "Boom", "KeyboardInterrupt", "SystemExit")


def _outcome(rng: random.Random, serial: int, awaited: bool) -> tuple[int, Any, Callable[..., Any], str]:
    """(action, payload, check, kind) for a call that returns or raises at random."""
    r = rng.random()
    kind = ("value" if r < 0.6 else "ValueError" if r < 0.75 else "StopIteration" if r < 0.85
            else "Boom" if r < 0.93 or awaited else "KeyboardInterrupt" if r < 0.965
            else "SystemExit")
    if kind == "value":
        value = ("v", serial)
        return 0, value, expect_value(value), kind
    if kind == "StopIteration":
        return 1, StopIteration(serial), expect_stop_iteration, kind
    exc = {"ValueError": ValueError, "Boom": Boom, "KeyboardInterrupt": KeyboardInterrupt,
           "SystemExit": SystemExit}[kind](f"chaos {serial}")
    return 1, exc, expect_raised(exc), kind


# ---- the run -------------------------------------------------------------------------------------
class Chaos:
    def __init__(self, ops: int, seed: int, backend: str, emu: Any, fig: Figures,
                 streams: int, workers: int, errors: int, guard: float, flips: int) -> None:
        self.rng = random.Random(seed)
        self.budget = ops
        self.total = ops
        self.backend, self.emu, self.fig = backend, emu, fig
        self.n_streams, self.n_workers, self.guard = streams, workers, guard
        self.tr = Tracker(fig)
        self.serial = 0
        self.cells: dict[int, Any] = {}
        self.rss_mid: int | None = None
        # the operation counts at which a sticky error is injected (cuda)
        self.error_at = sorted(self.rng.randrange(ops // 10, ops) for _ in range(errors)) \
            if backend == "cuda" and ops >= 10 else []
        self.flip_at = sorted(self.rng.randrange(ops) for _ in range(flips)) \
            if backend == "cuda" else []
        self.gen_number = 0
        self.gen: CudaGen | None = None
        self.cpu: list[aiocuda.CpuStream] = []
        self.counts: list[int] = []
        self.issued: list[int] = []

    # -- helpers
    def next_serial(self) -> int:
        self.serial += 1
        return self.serial

    def spend(self, n: int) -> int:
        n = min(n, self.budget)
        self.budget -= n
        done = self.total - self.budget
        if self.rss_mid is None and done >= self.total // 5:
            self.rss_mid = rss_bytes()
        return n

    def spawn(self, coro: Any, check: Callable[..., str | None], what: str,
              gen: CudaGen | None = None) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tr.track(task, None, check, what, gen)
        return task

    async def settle(self, futs: list[Any]) -> None:
        """Give each of `futs` a fate: cancelled, timed out, awaited, or left to its callback."""
        rng, fig = self.rng, self.fig
        waited = []
        for fut, awaitable in futs:
            r = rng.random()
            if awaitable is None:  # one that must not be awaited by a task (KeyboardInterrupt)
                if r < 0.2:
                    fut.cancel()
                else:
                    waited.append(fut)
            elif r < 0.08 and awaitable is fut:  # (an Event is cancelled through its awaiters)
                fut.cancel()
            elif r < 0.14:  # a timeout that may or may not fire
                try:
                    await asyncio.wait_for(awaitable, rng.random() * 0.002)
                except asyncio.TimeoutError:
                    fig.timeouts += 1
                except (Exception, Boom):
                    pass
            elif r < 0.18:  # an awaiter cancelled after a few loop iterations
                t = asyncio.ensure_future(_await(awaitable))
                for _ in range(rng.randrange(3)):
                    await asyncio.sleep(0)
                t.cancel()
                await asyncio.wait([t], timeout=self.guard)
                if not t.done():
                    self.stall()
                elif not t.cancelled():
                    t.exception()  # retrieved: the outcome itself is checked on `fut`
            elif r < 0.25:
                pass  # fire and forget: only its done callback sees it
            else:
                waited.append(fut)
        if waited:
            # asyncio.wait never cancels: what is still pending at the end counts as hung.
            _, late = await asyncio.wait(waited, timeout=self.guard)
            if late:
                self.stall()

    def stall(self) -> None:
        """An await outlived the guard: stop making work, so that a hang fails fast."""
        self.fig.stalled = True
        self.budget = 0

    # -- cpu backend
    def cpu_burst(self, n: int) -> list[tuple[Any, Any]]:
        rng, tr, fig = self.rng, self.tr, self.fig
        i = rng.randrange(len(self.cpu))
        s = self.cpu[i]
        out: list[tuple[Any, Any]] = []
        for _ in range(n):
            r = rng.random()
            serial = self.next_serial()
            fig.ops += 1
            if r < 0.5:
                awaited = rng.random() < 0.8
                action, payload, check, kind = _outcome(rng, serial, awaited)
                fut = s.submit(_work, self.counts, i, action, payload)
                self.issued[i] += 1
                tr.track(fut, i, check, f"submit({kind})")
                out.append((fut, fut if kind not in ("KeyboardInterrupt", "SystemExit") else None))
            elif r < 0.68:
                fut = s.synchronize() if rng.random() < 0.5 else aiocuda.synchronize(s)
                tr.track(fut, i, functools.partial(self._no_early_cpu, i, self.issued[i]),
                         "synchronize")
                out.append((fut, fut))
            elif r < 0.78:
                ev = s.record()
                tr.track(ev._fut, i, functools.partial(self._event_done, ev, self.issued[i], i),
                         "record", may_cancel=False)
                out.append((ev._fut, ev))
                if rng.random() < 0.3:  # more awaiters of the same event, one maybe cancelled
                    t = self.spawn(aiocuda.wait(ev), expect_value(None), "wait(event)")
                    if rng.random() < 0.5:
                        t.cancel()
            elif r < 0.88:  # a chain: stream j reads what stream i wrote before its event
                j = rng.randrange(len(self.cpu))
                if j == i:
                    j = (i + 1) % len(self.cpu)
                b = self.cpu[j]
                if rng.random() < 0.5:
                    s.delay(rng.random() * 2e-4)
                w = s.submit(_work, self.counts, i, 2, (self.cells, serial, ("c", serial)))
                self.issued[i] += 1
                tr.track(w, i, expect_value(None), "submit(chain source)")
                ev = s.record()
                tr.track(ev._fut, i, functools.partial(self._event_done, ev, self.issued[i], i),
                         "record(chain)", may_cancel=False)
                b.wait_event(ev)
                rd = b.submit(_work, self.counts, j, 3, (self.cells, serial))
                self.issued[j] += 1
                tr.track(rd, j, expect_value(("c", serial)), "submit(chain sink)")
                fig.ops += 4
                out += [(w, w), (rd, rd)]
            elif r < 0.93:
                s.delay(rng.random() * 2e-4)
            else:
                action, payload, check, kind = _outcome(rng, serial, True)
                stream = s if rng.random() < 0.5 else None
                self.spawn(aiocuda.gpu_op(_plain, action, payload, stream=stream), check,
                           f"gpu_op({kind})")
        return out

    def _no_early_cpu(self, i: int, issued: int, fut: Any, exc: BaseException | None) -> str | None:
        if exc is not None:
            return f"raised {exc!r}"
        if self.counts[i] < issued:
            self.fig.early += 1
            return f"completed after {self.counts[i]} of the {issued} calls before it had run"
        return None

    def _event_done(self, ev: aiocuda.Event, issued: int, i: int, fut: Any,
                    exc: BaseException | None) -> str | None:
        if exc is not None:
            return f"raised {exc!r}"
        if not ev.done():
            self.fig.early += 1
            return "the event's future completed, but event.done() is False"
        if self.counts[i] < issued:
            self.fig.early += 1
            return f"the event completed after {self.counts[i]} of the {issued} calls before it"
        return None

    # -- cuda backend (the emulator)
    def new_gen(self) -> None:
        emu = self.emu
        self.gen_number += 1
        ctx = emu.primary()
        self.gen = CudaGen(self.gen_number, [emu.stream(ctx) for _ in range(self.n_streams)], ctx)

    def foreign_event(self, gen: CudaGen, h: int) -> int:
        """A CUevent recorded on `h` now (0 if the driver refused: a sticky error)."""
        lib = self.emu.lib
        if lib.cuCtxPushCurrent_v2(gen.ctx) != 0:
            return 0
        ev = ctypes.c_void_p()
        try:
            if lib.cuEventCreate(ctypes.byref(ev), 0) != 0:
                return 0
            if lib.cuEventRecord(ev, h) != 0:
                lib.cuEventDestroy_v2(ev)
                return 0
        finally:
            lib.cuCtxPopCurrent_v2(None)
        return ev.value or 0

    def _no_early_cuda(self, gen: CudaGen, ev: int, fut: Any,
                       exc: BaseException | None) -> str | None:
        if exc is None and ev and self.gen is gen:
            if self.emu.lib.cuEventQuery(ev) == 600:  # CUDA_ERROR_NOT_READY: still running
                self.fig.early += 1
                return (f"completed while work recorded before it was still running (strategy "
                        f"{aiocuda.strategy()}, {self.fig.strategy_flips} flips and "
                        f"{self.fig.sticky_errors} sticky errors so far)")
        return None

    def _destroy_event(self, gen: CudaGen, ev: int) -> None:
        if ev and self.gen is gen:  # after a reset the event is gone with its context
            self.emu.lib.cuEventDestroy_v2(ev)

    def cuda_burst(self, n: int) -> list[tuple[Any, Any]]:
        rng, tr, fig, emu = self.rng, self.tr, self.fig, self.emu
        gen = self.gen
        assert gen is not None
        i = rng.randrange(len(gen.streams))
        h = gen.streams[i]
        out: list[tuple[Any, Any]] = []
        for _ in range(n):
            r = rng.random()
            serial = self.next_serial()
            fig.ops += 1
            key = (gen.number, i)
            stream: object = rng.choice((h, h, _ProtocolStream(h), _TorchLikeStream(h)))
            plain: object = stream if not isinstance(stream, _TorchLikeStream) else h
            try:
                if r < 0.25:
                    emu.lib.emu_enqueue_sleep(h, rng.randrange(300))  # refused once broken
                elif r < 0.6:
                    ev = self.foreign_event(gen, h) if rng.random() < 0.1 else 0
                    try:
                        fut = aiocuda.synchronize(stream)
                    except BaseException:
                        self._destroy_event(gen, ev)
                        raise
                    check = cuda_outcome(functools.partial(self._no_early_cuda, gen, ev))
                    tr.track(fut, key, check, "synchronize", gen,
                             cleanup=functools.partial(self._destroy_event, gen, ev))
                    out.append((fut, fut))
                elif r < 0.75:
                    cev = aiocuda.record(stream)
                    tr.track(cev._fut, key, cuda_outcome(functools.partial(
                        self._cuda_event_done, gen, cev)), "record", gen, may_cancel=False)
                    out.append((cev._fut, cev))
                    if rng.random() < 0.3:
                        t = self.spawn(aiocuda.wait(cev), cuda_outcome(), "wait(event)", gen)
                        if rng.random() < 0.5:
                            t.cancel()
                elif r < 0.85:  # chain: stream j waits for an event of stream i, then is awaited
                    j = (i + 1 + rng.randrange(len(gen.streams) - 1)) % len(gen.streams)
                    hb = gen.streams[j]
                    emu.lib.emu_enqueue_sleep(h, rng.randrange(300))
                    ev = self.foreign_event(gen, h)
                    if ev:
                        emu.lib.cuStreamWaitEvent(hb, ev, 0)
                    try:
                        fut = aiocuda.synchronize(hb)
                    except BaseException:
                        self._destroy_event(gen, ev)
                        raise
                    check = cuda_outcome(functools.partial(self._no_early_cuda, gen, ev))
                    tr.track(fut, (gen.number, j), check, "synchronize(chain)", gen,
                             cleanup=functools.partial(self._destroy_event, gen, ev))
                    out.append((fut, fut))
                    fig.ops += 1
                elif r < 0.93:
                    action, payload, check, kind = _outcome(rng, serial, True)
                    # (gpu_op knows torch streams only when torch is imported)
                    self.spawn(aiocuda.gpu_op(_plain, action, payload, stream=plain),
                               cuda_outcome(check), f"gpu_op({kind})", gen)
                elif r < 0.97:
                    fut = aiocuda.synchronize(0, device=0)
                    tr.track(fut, (gen.number, "legacy"), cuda_outcome(), "synchronize(0)", gen)
                    out.append((fut, fut))
                else:
                    fut = aiocuda.synchronize_device(0)
                    tr.track(fut, None, cuda_outcome(), "synchronize_device", gen)
                    out.append((fut, fut))
            except aiocuda.CudaError as e:
                fig.refused += 1
                if not (gen.broken and e.code == ILLEGAL_ADDRESS):
                    fig.wrong += 1
                    fig.note(f"refused with {e!r} although no sticky error was injected",
                             "refused")
        return out

    def _cuda_event_done(self, gen: CudaGen, ev: aiocuda.Event, fut: Any,
                         exc: BaseException | None) -> str | None:
        if exc is None and not gen.broken and not ev.done():
            self.fig.early += 1
            return "the event's future completed, but event.done() is False"
        return None

    async def sticky_error(self) -> None:
        """Inject a sticky error, check every await of the generation fails, reset, go on."""
        gen = self.gen
        assert gen is not None
        if gen.broken:
            return  # another worker is injecting one already
        self.force_cuda_error(gen)
        gen.broken = True
        self.fig.sticky_errors += 1
        self.emu.inject_error(ILLEGAL_ADDRESS)
        if gen.pending:
            await asyncio.wait(list(gen.pending), timeout=self.guard)
        self.emu.reset_device(0)  # destroys the generation's streams and events
        self.new_gen()
        gen.replaced.set()

    # -- each kind of chaos, forced (random timing alone may produce no timeout at all)
    def _expect_forced(self, what: str, happened: bool) -> None:
        if happened:
            self.fig.forced += 1
        else:
            self.fig.forced_missed += 1
            self.fig.note(f"forced {what} did not happen", "forced")

    async def _force_on_held(self, held: Callable[[], Any], release: Callable[[], None],
                             failing: Callable[[BaseException], Any]) -> None:
        """While `held()`'s stream is held by a gate: an await that must time out and one that
        is cancelled; then `release()` and an operation `failing()` that must raise."""
        fig = self.fig
        timed = held()
        try:
            await asyncio.wait_for(timed, 0.001)
        except asyncio.TimeoutError:
            fig.timeouts += 1
            self._expect_forced("timeout", timed.cancelled())
        else:
            self._expect_forced("timeout (the held await completed)", False)
        cancelled = held()
        cancelled.cancel()
        await asyncio.sleep(0)
        self._expect_forced("cancellation", cancelled.cancelled())
        release()
        exc = ValueError("forced")
        fut = asyncio.ensure_future(failing(exc))
        self.tr.track(fut, None, expect_raised(exc), "forced exception", self.gen)
        try:
            await asyncio.wait_for(fut, self.guard)
        except ValueError as e:
            self._expect_forced("exception", e is exc)
        except asyncio.TimeoutError:
            self.stall()

    async def force_cpu(self) -> None:
        s, gate = self.cpu[0], threading.Event()
        opened = s.submit(gate.wait, self.guard)  # the worker waits without the GIL
        self.tr.track(opened, None, expect_value(True), "submit(gate)")

        def held() -> Any:
            fut = s.synchronize()
            return self.tr.track(fut, 0, functools.partial(self._no_early_cpu, 0, self.issued[0]),
                                 "synchronize(held)")

        await self._force_on_held(
            held, gate.set, lambda exc: s.submit(_plain, 1, exc))
        await asyncio.wait([opened], timeout=self.guard)

    async def force_cuda(self) -> None:
        gen, lib = self.gen, self.emu.lib
        assert gen is not None
        h = gen.streams[0]
        from aiocuda.bench._sources import HostWord  # a word of host memory a stream waits on

        assert lib.cuCtxPushCurrent_v2(gen.ctx) == 0
        try:
            word = HostWord(lib)
        finally:
            lib.cuCtxPopCurrent_v2(None)
        assert lib.cuStreamWaitValue32_v2(h, word.device, 1, 0) == 0  # GEQ 1

        def held() -> Any:
            return self.tr.track(aiocuda.synchronize(h), (gen.number, 0), cuda_outcome(),
                                 "synchronize(held)", gen)

        await self._force_on_held(
            held, lambda: word.write(1), lambda exc: aiocuda.gpu_op(_plain, 1, exc, stream=h))
        await asyncio.wait_for(aiocuda.synchronize(h), self.guard)  # the wait has ended
        assert lib.cuCtxPushCurrent_v2(gen.ctx) == 0
        try:
            word.unregister()
        finally:
            lib.cuCtxPopCurrent_v2(None)

    def force_cuda_error(self, gen: CudaGen) -> None:
        """An await that is surely pending when the sticky error comes: it must fail with it."""
        h = gen.streams[0]
        self.emu.lib.emu_enqueue_sleep(h, int(4 * self.guard * 1e6))  # dropped by the fault

        def check(fut: Any, exc: BaseException | None) -> str | None:
            got = isinstance(exc, aiocuda.CudaError) and exc.code == ILLEGAL_ADDRESS
            self._expect_forced("CudaError", got)
            return None if got else f"got {exc!r} from work the sticky error dropped"

        self.tr.track(aiocuda.synchronize(h), (gen.number, 0), check, "synchronize(doomed)", gen)

    # -- workers
    async def worker(self) -> None:
        rng = self.rng
        while self.budget > 0:
            n = self.spend(rng.randint(1, 12))
            if self.error_at and self.total - self.budget >= self.error_at[0]:
                self.error_at.pop(0)
                await self.sticky_error()
            if self.flip_at and self.total - self.budget >= self.flip_at[0]:
                self.flip_at.pop(0)
                order = ("flag", "callback", "poll")
                aiocuda.set_strategy(order[(order.index(aiocuda.strategy()) + 1) % 3])
                self.fig.strategy_flips += 1
            futs = self.cpu_burst(n) if self.backend == "cpu" else self.cuda_burst(n)
            await self.settle(futs)
            gen = self.gen
            if gen is not None and gen.broken:  # refused calls await nothing: wait for the reset
                try:
                    await asyncio.wait_for(gen.replaced.wait(), self.guard)
                except asyncio.TimeoutError:
                    self.stall()
            else:
                await asyncio.sleep(0)

    async def main(self) -> None:
        if self.backend == "cpu":
            self.cpu = [aiocuda.CpuStream() for _ in range(self.n_streams)]
            self.counts = [0] * self.n_streams
            self.issued = [0] * self.n_streams
        else:
            self.new_gen()
        self.fig.rss_start = rss_bytes()
        try:
            await (self.force_cpu() if self.backend == "cpu" else self.force_cuda())
            await asyncio.gather(*[self.worker() for _ in range(self.n_workers)])
            # Every stream once more, so that the late completions of cancelled awaits land.
            if self.backend == "cpu":
                await asyncio.wait_for(asyncio.gather(*[aiocuda.synchronize(s) for s in self.cpu]),
                                       self.guard)
            elif not self.gen.broken:  # type: ignore[union-attr]
                await asyncio.wait_for(asyncio.gather(
                    *[aiocuda.synchronize(h) for h in self.gen.streams]),  # type: ignore[union-attr]
                    self.guard)
            if self.tr.pending:
                await asyncio.wait(list(self.tr.pending.values()), timeout=self.guard)
            end = time.monotonic() + self.guard
            while aiocuda.statistics().pending and time.monotonic() < end:
                await asyncio.sleep(0.001)
            self.fig.rss_growth = rss_bytes() - (self.rss_mid or self.fig.rss_start)
        finally:
            self.fig.hung = len(self.tr.pending)
            for fut in list(self.tr.pending.values()):
                self.fig.note(f"pending at the end: {fut!r}"[:300], "hung")
                fut.cancel()  # so that tearing down does not wait for them
            self.tr.pending.clear()
            for s in self.cpu:
                s.close()
            if self.gen is not None:
                for h in self.gen.streams:
                    self.emu.lib.cuStreamDestroy_v2(h)


class _ProtocolStream:
    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


class _TorchLikeStream:
    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle
        self.device_index = 0


async def _await(aw: Any) -> Any:
    return await aw


def run_chaos(ops: int, seed: int, backend: str, loop_kind: str, emu: Any = None, *,
              debug: bool = False, streams: int = 8, workers: int = 16, errors: int | None = None,
              guard: float = 10.0, deadline: float | None = None,
              flips: int | None = None) -> Figures:
    """Run `ops` operations of chaos on a new loop of `loop_kind`; return the figures.

    `emu` (tests.conftest.Emu) is needed for the cuda backend. `errors`: sticky errors to
    inject (cuda; default one per 50,000 operations, at least 2); `flips`: set_strategy() calls
    while awaits are pending (cuda; default one per 100,000 operations, at least 3). `guard`:
    how long one await may take before it counts as hung; `deadline`: the whole run.
    """
    from ..conftest import new_loop

    if backend == "cuda" and emu is None:
        raise ValueError("the cuda backend runs against the emulator: pass emu")
    if backend == "cuda":
        info = _core.cuda_info()  # initialises the driver, as the emu fixture does
        if not info["available"]:
            raise RuntimeError(f"the cuda backend is unavailable: {info['reason']}")
    if errors is None:
        errors = max(2, ops // 50_000)
    if flips is None:
        flips = max(3, ops // 100_000)
    if deadline is None:
        deadline = 60 + ops / 2_000
    fig = Figures(backend=backend, loop=loop_kind, seed=seed, debug=debug)
    _ops._pools[0].get()  # gpu_op's shared cpu streams live as long as the process: make them now
    warm = new_loop(loop_kind)  # uvloop opens a pipe of its own once per process
    warm.run_until_complete(asyncio.sleep(0))
    warm.close()
    gc.collect()
    _loop.close_loop_states()
    fds0, threads0 = fd_count(), native_threads()
    strategy0 = aiocuda.strategy()
    chaos = Chaos(ops, seed, backend, emu, fig, streams, workers, errors, guard, flips)
    errors_seen: list[dict[str, Any]] = []
    loop = new_loop(loop_kind)
    loop.set_exception_handler(lambda _l, ctx: errors_seen.append(ctx))
    loop.set_debug(debug)
    t0 = time.monotonic()
    try:
        loop.run_until_complete(asyncio.wait_for(chaos.main(), deadline))
    except asyncio.TimeoutError:
        fig.run_timed_out = True
    finally:
        fig.seconds = round(time.monotonic() - t0, 3)
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
        aiocuda.set_strategy(strategy0)
    del chaos.cpu, chaos.gen
    tracker = chaos.tr
    del chaos
    gc.collect()
    _loop.close_loop_states()
    end = time.monotonic() + 10
    while _core.live_records() and time.monotonic() < end:
        time.sleep(0.005)
        gc.collect()
        _loop.close_loop_states()
    fig.live_records_end = _core.live_records()
    texts: list[tuple[str, str]] = []

    def keep_texts() -> None:  # contexts hold tracebacks, which hold frames and futures
        texts.extend((str(c.get("message", "")), repr(c.get("exception"))) for c in errors_seen)
        errors_seen.clear()

    keep_texts()
    if backend == "cuda":
        fig.cuda_pending_end = _core.cuda_pending()
    gc.collect()
    keep_texts()
    gc.collect()
    fig.live_futures_end = len(tracker.alive)
    keep_texts()
    fig.loop_errors = len(texts)
    for msg, exc in texts:
        if "never retrieved" in msg:
            fig.never_retrieved += 1
        fig.note(f"loop exception handler: {msg} {exc}"[:400], "loop")
    end = time.monotonic() + 5  # workers exit after close() returns; give them a moment
    slack = CUDA_THREAD_SLACK if backend == "cuda" else 0
    while (native_threads() > threads0 + slack or fd_count() > fds0) and time.monotonic() < end:
        time.sleep(0.01)
    fig.fds_delta = fd_count() - fds0
    fig.threads_delta = native_threads() - threads0
    return fig
