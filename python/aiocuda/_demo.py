"""The README's first command: await many concurrent operations while a heartbeat measures how
late the event loop runs, and compare with the same work awaited through run_in_executor."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import CpuStream, Event, backends

Wait = Callable[[Event], Awaitable[None]]
CONCURRENCY = 256  # coroutines, each awaiting one operation at a time


@dataclass
class Result:
    method: str
    ops: int
    wall_s: float
    cpu_s: float
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.wall_s


async def _heartbeat(lateness: list[float], stop: asyncio.Event) -> None:
    """Sleep 1 ms at a time and record how late each wake-up was."""
    while not stop.is_set():
        t = time.perf_counter()  # not loop.time(): uvloop's clock has 1 ms resolution
        await asyncio.sleep(0.001)
        lateness.append(max(0.0, time.perf_counter() - t - 0.001))


async def _run(method: str, wait: Wait, ops: int, n_streams: int, work_s: float) -> Result:
    streams = [CpuStream() for _ in range(n_streams)]
    lateness: list[float] = []
    stop = asyncio.Event()
    beat = asyncio.ensure_future(_heartbeat(lateness, stop))
    await asyncio.sleep(0.01)

    async def worker(i: int) -> None:
        s = streams[i % n_streams]
        for _ in range(ops // CONCURRENCY + (i < ops % CONCURRENCY)):  # ops in all
            s.delay(work_s)  # native work that holds the stream without the GIL, like a kernel
            await wait(s.record())

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stop.set()
    await beat
    for s in streams:
        await s.aclose()
    lag = sorted(lateness) or [0.0]
    return Result(
        method, ops, wall, cpu,
        statistics.median(lag) * 1e3, lag[int(0.99 * (len(lag) - 1))] * 1e3, lag[-1] * 1e3,
    )


async def _await_event(ev: Event) -> None:
    await ev


async def _executor_wait(ev: Event) -> None:
    # What users write today: a blocking synchronize on a pool thread.
    await asyncio.get_running_loop().run_in_executor(None, ev.synchronize)


async def _main(ops: int, n_streams: int, work_s: float) -> list[Result]:
    results = []
    for name, wait in (("aiocuda (await event)", _await_event),
                       ("run_in_executor(None, ev.synchronize)", _executor_wait)):
        results.append(await _run(name, wait, ops, n_streams, work_s))
    return results


def run_demo(ops: int, n_streams: int, work_s: float, use_uvloop: bool) -> int:
    if ops <= 0 or n_streams <= 0 or not 0 <= work_s <= 1:  # (nan compares False)
        raise SystemExit("--ops and --streams must be positive, --work-ms from 0 to 1000")
    print(f"aiocuda demo: {ops} operations, each {work_s * 1e3:g} ms of native work, "
          f"on {n_streams} cpu-backend streams, {CONCURRENCY} coroutines each awaiting one at "
          f"a time; backends here: {', '.join(backends())}")
    print("loop: " + ("uvloop" if use_uvloop else "asyncio") +
          "; a 1 ms heartbeat coroutine measures event-loop lag meanwhile\n")
    if use_uvloop:
        import uvloop

        results = uvloop.run(_main(ops, n_streams, work_s))
    else:
        results = asyncio.run(_main(ops, n_streams, work_s))
    head = f"{'method':40} {'ops/s':>9} {'wall s':>7} {'cpu s':>6} {'lag p50':>8} {'p99':>7} {'max ms':>7}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.method:40} {r.ops_per_s:9.0f} {r.wall_s:7.3f} {r.cpu_s:6.3f} "
              f"{r.lag_p50_ms:8.3f} {r.lag_p99_ms:7.3f} {r.lag_max_ms:7.3f}")
    a, b = results
    print(f"\naiocuda vs run_in_executor: {a.ops_per_s / b.ops_per_s:.2f}x throughput, "
          f"{b.cpu_s / max(a.cpu_s, 1e-9):.2f}x less CPU time, "
          f"p99 loop lag {a.lag_p99_ms:.2f} ms vs {b.lag_p99_ms:.2f} ms")
    return 0
