"""The ways to wait for stream work from a coroutine, and what is measured of each.

Every method waits for the same work from the same source. aiocuda waits through its native
completion queue; the others are what users write without it:

- ``run_in_executor``: ``await loop.run_in_executor(None, event.synchronize)``;
- ``to_thread``: ``await asyncio.to_thread(event.synchronize)``;
- ``poll sleep(0)`` / ``poll 1ms``: ``while not event.query(): await asyncio.sleep(...)``;
- ``call_soon_threadsafe``: a Python callback on the stream calls ``loop.call_soon_threadsafe``
  (numba-cuda's ``async_done`` design);
- ``in-loop floor``: the same futures resolved on the loop thread, with no cross-thread signal.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .._api import synchronize
from .._loop import BATCH
from ._sources import DriverSource, Source

AIOCUDA = "aiocuda"
EXECUTOR = "run_in_executor"
TO_THREAD = "to_thread"
POLL0 = "poll sleep(0)"
POLL1 = "poll 1ms"
CALLBACK = "call_soon_threadsafe"
FLOOR = "in-loop floor"
METHODS = (AIOCUDA, EXECUTOR, TO_THREAD, POLL0, POLL1, CALLBACK, FLOOR)


async def _poll(done: Callable[[], bool], delay: float) -> None:
    while not done():
        await asyncio.sleep(delay)


def _resolver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> Callable[[], None]:
    def callback() -> None:  # runs on the stream's thread, holding the GIL
        loop.call_soon_threadsafe(fut.set_result, None)

    return callback


def _stamp(into: list[float]) -> None:
    into.append(time.perf_counter())


def waiter(method: str, src: Source) -> Callable[[], Awaitable[Any]]:
    """Return a function that starts one wait for the end of `src`'s current work."""
    loop = asyncio.get_running_loop()
    if method == AIOCUDA:
        stream = src.stream
        return lambda: synchronize(stream)
    if method == EXECUTOR:
        return lambda: loop.run_in_executor(None, src.event().wait)
    if method == TO_THREAD:
        return lambda: asyncio.to_thread(src.event().wait)
    if method in (POLL0, POLL1):
        delay = 0.0 if method == POLL0 else 0.001
        return lambda: _poll(src.event().done, delay)
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


class _NoGC:
    """Collect, then keep the garbage collector off in a timed region (for every method alike)."""

    def __enter__(self) -> None:
        gc.collect()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        gc.enable()


async def throughput(method: str, src: Source, in_flight: int, ops: int) -> tuple[float, float]:
    """Run rounds of `in_flight` concurrent waits, `ops` waits in all (at least one round).

    Returns (operations per second, process CPU microseconds per operation).
    """
    start = waiter(method, src)
    rounds = max(1, ops // in_flight)
    with _NoGC():
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(rounds):
            await asyncio.gather(*[start() for _ in range(in_flight)])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = rounds * in_flight
    return n / wall, cpu / n * 1e6


async def wake_latency(method: str, src: Source, samples: int) -> list[float]:
    """Seconds from the moment the work is done (a stamp taken on the stream) to the awaiting
    coroutine running again, one operation at a time on an otherwise idle loop."""
    loop = asyncio.get_running_loop()
    out: list[float] = []
    for _ in range(samples):
        stamp: list[float] = []
        src.hold(0.0005)  # the loop is waiting when the work finishes
        if method == CALLBACK:
            fut = loop.create_future()
            resolve = _resolver(loop, fut)

            def stamp_and_resolve(stamp: list[float] = stamp, resolve: Any = resolve) -> None:
                _stamp(stamp)
                resolve()

            src.post(stamp_and_resolve)
            await fut
        else:
            src.post(functools.partial(_stamp, stamp))
            await waiter(method, src)()
        out.append(time.perf_counter() - stamp[0])
    return out


async def stream_stall(method: str, src: DriverSource, samples: int) -> list[float]:
    """Seconds the completion holds the stream (timing events on both sides of it) while another
    Python thread spins in pure Python, contending for the GIL.

    The stream is held long enough for the loop thread, itself slowed by the spinner, to enqueue
    the two events and the completion first; a sample where it was not is not counted.
    """
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    out: list[float] = []
    try:
        for _ in range(samples):
            src.hold(0.05)
            a = src.mark()
            if method == AIOCUDA:
                fut = synchronize(src.stream)
            else:
                fut = loop.create_future()
                src.post(_resolver(loop, fut))
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
        release = src.gate()
        futs = [asyncio.ensure_future(start()) for _ in range(n)]
    everything = _all_done(futs)  # not gather(): its O(n) last step would be counted as lag
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
        started = time.perf_counter()
        release()
        await everything
        last = time.perf_counter()
        await asyncio.sleep(0.003)
        stop = True
        await beat
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

    def one_done(_: object) -> None:
        nonlocal left
        left -= 1
        if left == 0:
            everything.set_result(None)

    for f in futs:
        f.add_done_callback(one_done)
    return everything


async def idle_cpu(method: str, src: Source, n: int, window: float) -> float:
    """Process CPU, in % of one core, while `n` waits are pending on gated work."""
    start = waiter(method, src)
    release = src.gate()
    futs = [asyncio.ensure_future(start()) for _ in range(n)]
    await asyncio.sleep(0.05)
    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(window)
    pct = (time.process_time() - c0) / (time.perf_counter() - t0) * 100
    release()
    await asyncio.gather(*futs)
    return pct


async def kernel_throughput(src: DriverSource, kernels: int) -> dict[str, float]:
    """`kernels` tiny kernels, each awaited by its own coroutine (all in flight together),
    against launching them back to back with one blocking synchronize at the end."""
    with _NoGC():
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


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


def percentile(values: list[float], p: float) -> float:
    return _pct(sorted(values), p)
