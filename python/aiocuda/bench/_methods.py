"""The ways to wait for stream work from a coroutine, and what is measured of each.

Every method waits for the same work from the same source. aiocuda waits through its native
completion queue; on the cuda source it is measured once per completion strategy,
``aiocuda (callback)`` and ``aiocuda (poll)`` (`aiocuda.set_strategy` around each measurement,
restored after it). The others are what users write without it:

- ``run_in_executor``: ``await loop.run_in_executor(None, event.synchronize)``;
- ``to_thread``: ``await asyncio.to_thread(event.synchronize)``;
- ``poll sleep(0)`` / ``poll 1ms``: ``while not event.query(): await asyncio.sleep(...)``;
- ``call_soon_threadsafe``: a Python callback on the stream calls ``loop.call_soon_threadsafe``
  (numba-cuda's ``async_done`` design; on the cuda source one Python host function per wait, so
  at most `Source.max_py_hostfns` in flight);
- ``in-loop floor``: the same futures resolved on the loop thread, with no cross-thread signal.

On a real GPU the peers (`_peers`: numba-cuda's ``async_done``, CuPy's ``synchronize`` in an
executor and its host-function callback) wait on the same stream with their own code.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .._api import set_strategy, strategy, synchronize
from .._loop import BATCH
from ._peers import HOSTFN_PEERS, PEERS
from ._sources import DriverSource, HostEvent, Source

AIOCUDA = "aiocuda"  # the cpu backend (its worker completes; no strategy)
AIOCUDA_CALLBACK = "aiocuda (callback)"
AIOCUDA_POLL = "aiocuda (poll)"
AIOCUDA_FLAG = "aiocuda (flag)"
EXECUTOR = "run_in_executor"
TO_THREAD = "to_thread"
POLL0 = "poll sleep(0)"
POLL1 = "poll 1ms"
CALLBACK = "call_soon_threadsafe"
FLOOR = "in-loop floor"
NOTHING = "nothing waiting"  # idle CPU: the gate alone, a baseline for the others
# Wake-up only, on the driver emulator: the emulated device's own thread writes an eventfd that
# the loop reads, as the work ends (DriverSource.notify): one native hop, the sleeping-loop floor
# on that source, with its device threads running as they do for every method.
DEVICE_EVENTFD = "device writes eventfd"
OURS = (AIOCUDA, AIOCUDA_FLAG, AIOCUDA_CALLBACK, AIOCUDA_POLL)
ALTERNATIVES = (EXECUTOR, TO_THREAD, POLL0, POLL1, CALLBACK, FLOOR)
METHODS = OURS + ALTERNATIVES + PEERS  # every method, in the report's order
STRATEGIES = {AIOCUDA_FLAG: "flag", AIOCUDA_CALLBACK: "callback", AIOCUDA_POLL: "poll"}
HOSTFN_METHODS = (CALLBACK, *HOSTFN_PEERS)  # a Python callback on the stream per wait


def methods_for(source_kind: str, peers: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The methods measured on a source of this kind ("cpu", "cuda"): aiocuda (per strategy on
    the cuda source), the alternatives, then the `peers` the source has (`Source.peers`)."""
    ours = (AIOCUDA_FLAG, AIOCUDA_CALLBACK, AIOCUDA_POLL) if source_kind == "cuda" else (AIOCUDA,)
    return ours + ALTERNATIVES + tuple(p for p in PEERS if p in peers)


@contextmanager
def strategy_of(method: str) -> Iterator[None]:
    """The cuda completion strategy `method` names, for the duration; any other method: as is."""
    name = STRATEGIES.get(method)
    if name is None:
        yield
        return
    before = strategy()
    set_strategy(name)
    try:
        yield
    finally:
        set_strategy(before)


async def _poll(done: Callable[[], bool], delay: float) -> None:
    while not done():
        await asyncio.sleep(delay)


def _resolver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> Callable[[], None]:
    def callback() -> None:  # runs on the stream's thread, holding the GIL
        loop.call_soon_threadsafe(fut.set_result, None)

    return callback


def waiter(method: str, src: Source,
           event: HostEvent | None = None) -> Callable[[], Awaitable[Any]]:
    """Return a function that starts one wait for the end of `src`'s current work.

    The event-based alternatives record an event per wait, or wait on `event` when one is given
    (many waits for the same work: no stream operation per wait).
    """
    loop = asyncio.get_running_loop()
    if method in OURS:
        stream = src.stream
        return lambda: synchronize(stream)
    if method in src.peers:
        return src.peers[method](loop)
    ev: Callable[[], HostEvent] = (lambda: event) if event is not None else src.event
    if method == EXECUTOR:
        return lambda: loop.run_in_executor(None, ev().wait)
    if method == TO_THREAD:
        return lambda: asyncio.to_thread(ev().wait)
    if method in (POLL0, POLL1):
        delay = 0.0 if method == POLL0 else 0.001
        return lambda: _poll(ev().done, delay)
    if method == CALLBACK:

        def start() -> asyncio.Future[None]:
            fut = loop.create_future()
            src.post(_resolver(loop, fut))
            return fut

        return start
    if method == FLOOR:

        def resolved() -> asyncio.Future[None]:
            fut = loop.create_future()
            fut.set_result(None)
            return fut

        return resolved
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def in_flight_for(method: str, src: Source, wanted: int) -> int:
    """How many waits of `method` may be in flight on `src` (Python host functions are capped)."""
    cap = src.max_py_hostfns
    return min(wanted, cap) if method in HOSTFN_METHODS and cap is not None else wanted


class _NoGC:
    """Collect, then keep the garbage collector off in a timed region (for every method alike);
    nothing if the caller has it off already (pytest-benchmark's setup collects, outside its
    timing)."""

    def __enter__(self) -> None:
        self.on = gc.isenabled()
        if self.on:
            gc.collect()
            gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.on:
            gc.enable()


async def _settle(futs: list[asyncio.Future[Any]]) -> None:
    """Cancel what is still pending (a measurement cut short), letting the cancellations run."""
    for f in futs:
        f.cancel()
    await asyncio.sleep(0)


async def throughput(method: str, src: Source, in_flight: int, ops: int) -> tuple[float, float]:
    """Run rounds of `in_flight` concurrent waits, `ops` waits in all (at least one round).

    Returns (operations per second, process CPU microseconds per operation).
    """
    with strategy_of(method):
        start = waiter(method, src)
        rounds = max(1, ops // in_flight)
        with _NoGC():
            c0, d0, t0 = time.process_time(), src.device_cpu_s(), time.perf_counter()
            for _ in range(rounds):
                await asyncio.gather(*[start() for _ in range(in_flight)])
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0 - (src.device_cpu_s() - d0)
    n = rounds * in_flight
    return n / wall, cpu / n * 1e6


def work_holds(n: int) -> list[float]:
    """How long each wake-up sample's work runs: mixed durations, 0.2-0.9 ms, the same seeded
    sequence for every method. A fixed duration flattered a design that learns when work ends
    (`flag` spins from just before the expected end): 24-41 us at the p50 for 0.5 ms every time,
    45-60 us for varied ones, while the sleeping-loop floor stays at 18-20 (found by review)."""
    rng = random.Random(20261207)
    return [rng.uniform(0.0002, 0.0009) for _ in range(n)]


async def wake_latency(method: str, src: Source, samples: int) -> list[float]:
    """Seconds from the moment the work is done (`Source.stamp`: the stream's own time where the
    work ends) to the awaiting coroutine running again, one operation at a time on an otherwise
    idle loop. What a method puts on the stream after the work (a host function, a mark) is
    part of its wake-up.

    Returns 1 + `samples` values: the first is the first wake-up after the method was set up
    (for aiocuda on the cuda source: right after `set_strategy`), reported on its own.
    """
    loop = asyncio.get_running_loop()
    out: list[float] = []
    if method == DEVICE_EVENTFD:
        return await _device_eventfd_latency(src, samples)
    with strategy_of(method):
        for hold in work_holds(1 + samples):
            src.hold(hold)  # the loop is waiting when the work finishes
            done_at = src.stamp()
            if method == CALLBACK:
                fut = loop.create_future()
                src.post(_resolver(loop, fut))
                await fut
            else:
                await waiter(method, src)()
            out.append(time.perf_counter() - done_at())
    return out


async def _device_eventfd_latency(src: Any, samples: int) -> list[float]:
    """wake_latency for `DEVICE_EVENTFD`: the loop sleeps on an eventfd of its own, which the
    source's (emulated) stream writes as the work ends."""
    loop = asyncio.get_running_loop()
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    out: list[float] = []
    fut: asyncio.Future[None] | None = None

    def readable() -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        if fut is not None and not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, readable)
    try:
        for hold in work_holds(1 + samples):
            src.hold(hold)
            done_at = src.stamp()
            fut = loop.create_future()
            src.notify(fd)
            await fut
            out.append(time.perf_counter() - done_at())
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return out


async def stream_stall(method: str, src: DriverSource, samples: int) -> list[float]:
    """Seconds the wait holds the stream (timing events on both sides of what it enqueues) while
    another Python thread spins in pure Python, contending for the GIL.

    aiocuda enqueues an event record; ``call_soon_threadsafe`` and the host-function peers a
    Python callback, which holds the stream until it has the GIL. The stream is held long
    enough for the loop thread, itself slowed by the spinner, to enqueue the two events and the
    wait first; a sample where it was not is not counted.
    """
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    out: list[float] = []
    try:
        with strategy_of(method):
            for _ in range(samples):
                src.hold(0.05)
                a = src.mark()
                fut = waiter(method, src)()  # enqueues what the method puts on the stream
                b = src.mark()
                queued_in_time = not a.done()
                await fut
                await synchronize(src.stream)  # b has been reached
                if queued_in_time:
                    out.append(src.elapsed(a, b))
    finally:
        stop.set()
        spinner.join()
    return out


async def burst_lag(method: str, src: Source, n: int) -> dict[str, float]:
    """A 1 ms heartbeat's lateness while `n` completions arrive at once.

    The stream is gated while the `n` waits are submitted; the gate opens once the heartbeat
    runs, and the beats from then until the last completion are counted. The in-loop floor
    resolves the same number of futures on the loop, in aiocuda's batches, at that moment.
    """
    loop = asyncio.get_running_loop()
    gate = None
    with strategy_of(method):
        if method == FLOOR:
            futs: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(n)]
            left = iter(futs)

            def batch() -> None:
                for i, f in enumerate(left):
                    f.set_result(None)
                    if i == BATCH - 1:
                        loop.call_soon(batch)
                        return

            def release() -> None:
                loop.call_soon(batch)

        else:
            start = waiter(method, src)
            gate = src.gate()
            release = gate.open
            futs = []
        try:
            if gate is not None:
                futs.extend(asyncio.ensure_future(start()) for _ in range(n))
            everything = _all_done(futs)  # not gather(): its O(n) last step would count as lag
            late: list[tuple[float, float]] = []  # (beat end, lateness)
            stop = False

            async def heartbeat() -> None:
                while not stop:
                    t = time.perf_counter()
                    await asyncio.sleep(0.001)
                    now = time.perf_counter()
                    late.append((now, now - t - 0.001))

            with _NoGC():
                beat = asyncio.ensure_future(heartbeat())
                await asyncio.sleep(0.02)
                release()
                if gate is not None:
                    await gate.until_open()
                started = time.perf_counter()
                await everything
                last = time.perf_counter()
                await asyncio.sleep(0.003)
                stop = True
                await beat
        finally:
            if gate is not None:
                gate.open()
            await _settle(futs)
    in_burst = sorted(lag for end, lag in late if end >= started and end - lag - 0.001 <= last)
    return {
        "burst_s": last - started,
        "beats": float(len(in_burst)),
        "p50_ms": _pct(in_burst, 50) * 1e3,
        "p99_ms": _pct(in_burst, 99) * 1e3,
        "max_ms": (in_burst[-1] if in_burst else 0.0) * 1e3,
    }


def _all_done(futs: list[asyncio.Future[Any]]) -> asyncio.Future[None]:
    loop = asyncio.get_running_loop()
    everything: asyncio.Future[None] = loop.create_future()
    left = len(futs)
    if not futs:
        everything.set_result(None)

    def one_done(_: object) -> None:
        nonlocal left
        left -= 1
        if left == 0 and not everything.done():
            everything.set_result(None)

    for f in futs:
        f.add_done_callback(one_done)
    return everything


async def idle_cpu(method: str, src: Source, n: int, window: float) -> float:
    """Host CPU (the process's, less the device's: `Source.device_cpu_s`), in % of one core,
    while `n` waits are pending on gated work (`NOTHING`: the gate alone).

    The event-based alternatives all wait on one event recorded after the gate (they wait for
    the same work; an event per wait would be `n` stream operations behind a closed gate).
    """
    with strategy_of(method):
        gate = src.gate(min_hold_s=window + 1.0)
        futs: list[asyncio.Future[Any]] = []
        try:
            if method != NOTHING:
                shared = src.event() if method in (EXECUTOR, TO_THREAD, POLL0, POLL1) else None
                start = waiter(method, src, shared)
                futs = [asyncio.ensure_future(start()) for _ in range(n)]
            await asyncio.sleep(0.05)
            c0, d0, t0 = time.process_time(), src.device_cpu_s(), time.perf_counter()
            await asyncio.sleep(window)
            cpu = time.process_time() - c0 - (src.device_cpu_s() - d0)
            pct = cpu / (time.perf_counter() - t0) * 100
            gate.open()
            await asyncio.gather(*futs)
        finally:
            gate.open()
            await _settle(futs)
    return pct


async def paced_cpu(method: str, src: Source, kernels: int, usec: float) -> dict[str, float]:
    """A loop that launches a kernel of `usec`, awaits it, and launches the next, `kernels`
    times: host CPU (the process's, less the device's) in % of one core over the run, and the
    wall time per kernel (the kernel plus the wake-up)."""
    with strategy_of(method):
        start = waiter(method, src)
        src.hold(usec / 1e6)  # a warm-up: the first wait sets the method up
        await start()
        with _NoGC():
            c0, d0, t0 = time.process_time(), src.device_cpu_s(), time.perf_counter()
            for _ in range(kernels):
                src.hold(usec / 1e6)
                await start()
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0 - (src.device_cpu_s() - d0)
    return {"percent": cpu / wall * 100, "per_kernel_us": wall / kernels * 1e6}


async def tiny_kernels(method: str, src: DriverSource, kernels: int) -> dict[str, float]:
    """`kernels` tiny kernels, each awaited by its own coroutine (all in flight together),
    against launching them back to back with one blocking synchronize at the end (wall time)."""
    with strategy_of(method), _NoGC():
        t0 = time.perf_counter()
        for _ in range(kernels):
            src.kernel()
        src.event().wait()
        back_to_back = time.perf_counter() - t0

        async def one() -> None:
            src.kernel()
            await synchronize(src.stream)

        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(kernels)])
        awaited = time.perf_counter() - t0
    return {
        "back_to_back_per_s": kernels / back_to_back,
        "awaited_per_s": kernels / awaited,
        "ratio": back_to_back / awaited,
    }


async def awaited_kernels(method: str, src: DriverSource, kernels: int, usec: float,
                          repeats: int) -> dict[str, Any]:
    """`kernels` kernels of `usec` each, every one followed by an ``aiocuda.synchronize`` kept in
    flight (gathered at the end), against the same kernels back to back with one await at the
    end. Stream time: timing events recorded before the first kernel and after the last one
    (it includes any gap where the loop did not keep the stream fed); wall time: from the first
    launch to the coroutine running after the last completion. Medians of `repeats` pairs.

    An await that completes before the stream reached the timing event recorded before it is
    an under-wait: counted in "early_completions" (the measurement then waits for the event).
    """
    b2b: list[tuple[float, float]] = []
    each: list[tuple[float, float]] = []
    early = 0

    async def reached(ev: HostEvent) -> None:
        nonlocal early
        if not ev.done():
            early += 1
            while not ev.done():
                await asyncio.sleep(0.0005)

    with strategy_of(method):
        await synchronize(src.stream)
        for _ in range(repeats):
            with _NoGC():
                a = src.mark()
                t0 = time.perf_counter()
                for _ in range(kernels):
                    src.kernel(usec)
                b = src.mark()
                await synchronize(src.stream)
                wall = time.perf_counter() - t0
                await reached(b)
                b2b.append((src.elapsed(a, b), wall))
            with _NoGC():
                futs = []
                a = src.mark()
                t0 = time.perf_counter()
                for _ in range(kernels):
                    src.kernel(usec)
                    futs.append(synchronize(src.stream))
                b = src.mark()
                await asyncio.gather(*futs)
                wall = time.perf_counter() - t0
                await synchronize(src.stream)
                await reached(b)
                each.append((src.elapsed(a, b), wall))
    b2b_stream = statistics.median(x[0] for x in b2b)
    each_stream = statistics.median(x[0] for x in each)
    b2b_wall = statistics.median(x[1] for x in b2b)
    each_wall = statistics.median(x[1] for x in each)
    return {
        "kernels": kernels, "kernel_us": usec, "repeats": repeats,
        "back_to_back_stream_s": b2b_stream, "awaited_stream_s": each_stream,
        "back_to_back_wall_s": b2b_wall, "awaited_wall_s": each_wall,
        "ratio": b2b_stream / each_stream, "wall_ratio": b2b_wall / each_wall,
        "early_completions": early,
    }


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def percentile(values: list[float], p: float) -> float:
    return _pct(sorted(values), p)
