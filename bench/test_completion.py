"""aiocuda against the alternatives, as a pytest-benchmark suite.

    pytest bench --benchmark-enable [--benchmark-json out.json]

Each benchmark waits for 1,000 operations in flight on one source (cpu backend; cuda on a GPU or
on the driver emulator) with one method, on one loop. On the cuda source aiocuda is measured once
per completion strategy ("aiocuda (callback)", "aiocuda (poll)"), and the Python host functions of
call_soon_threadsafe are capped at what a bounded driver queue allows (at most
`PY_HOSTFN_CAP` in flight, rounds of that many). `python -m aiocuda.bench` runs the fuller report
(latency, stalls, loop lag, CPU, memory, awaiting every kernel, plots); this suite is for tracking
regressions with pytest-benchmark's own comparison tools (--benchmark-compare).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
from collections.abc import Iterator

import pytest

import aiocuda
from aiocuda import _core
from aiocuda.bench._methods import METHODS, in_flight_for, methods_for, throughput
from aiocuda.bench._report import available_loops, new_loop
from aiocuda.bench._sources import CpuSource, DriverSource, Source

IN_FLIGHT = 1_000


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def source(request: pytest.FixtureRequest) -> Iterator[Source]:
    if request.param == "cuda" and "cuda" not in aiocuda.backends():
        pytest.skip("the cuda backend is not available (no driver, or no device)")
    src: Source = CpuSource() if request.param == "cpu" else DriverSource()
    yield src
    src.close()


@pytest.fixture(params=available_loops())
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    lp = new_loop(request.param)
    yield lp
    lp.close()


@pytest.mark.parametrize("method", METHODS)
def test_wait_for_1000_in_flight(benchmark, source: Source, loop: asyncio.AbstractEventLoop,
                                 method: str) -> None:
    if method not in methods_for(source.kind):
        pytest.skip(f"{method} is not measured on the {source.kind} source")
    in_flight = in_flight_for(method, source, IN_FLIGHT)

    rates: list[float] = []

    def once() -> None:
        ops_per_s, _cpu = loop.run_until_complete(throughput(method, source, in_flight, IN_FLIGHT))
        rates.append(ops_per_s)

    def no_gc() -> None:  # a collection before each round, outside the timing (it was 80 % of it)
        gc.collect()
        gc.disable()

    loop.run_until_complete(throughput(method, source, min(100, in_flight), 100))  # warm-up
    try:
        benchmark.pedantic(once, setup=no_gc, teardown=gc.enable, rounds=5, iterations=1)
    finally:
        gc.enable()
    benchmark.extra_info["ops_per_s"] = statistics.median(rates)  # the rounds' median
    benchmark.extra_info["in_flight"] = in_flight
    assert rates and min(rates) > 0


SUBMITS = 10_000
SUBMIT_KINDS = ("aiocuda.synchronize", "aiocuda.synchronize, engine parked", "loop.create_future")


@pytest.mark.parametrize("kind", SUBMIT_KINDS)
def test_submit_10000(benchmark, source: Source, loop: asyncio.AbstractEventLoop,
                      kind: str) -> None:
    """What starting a wait costs the loop thread, its completion aside: 10,000
    `aiocuda.synchronize` calls, with the engine running or parked (`aiocuda._core.cuda_hold`:
    no other thread of aiocuda's competes for the lock or the CPU; cuda only), against 10,000
    `loop.create_future()`, the part of the in-loop floor a wait cannot avoid. The futures are
    completed and gathered after each timed round, outside the timing."""
    parked = kind.endswith("parked")
    if parked and source.kind != "cuda":
        pytest.skip("the cpu backend has no engine to park")
    made: list[asyncio.Future[None]] = []
    completed = 0

    async def submit() -> None:
        if kind == "loop.create_future":
            lp = asyncio.get_running_loop()
            made.extend(lp.create_future() for _ in range(SUBMITS))
        else:
            made.extend(aiocuda.synchronize(source.stream) for _ in range(SUBMITS))

    def setup() -> None:
        if parked:
            _core.cuda_hold(True)

    def settle() -> None:  # a round's futures, completed (pytest-benchmark may skip teardown)
        nonlocal completed
        if parked:
            _core.cuda_hold(False)
        if kind == "loop.create_future":
            for f in made:
                f.set_result(None)
        loop.run_until_complete(asyncio.wait_for(asyncio.gather(*made), 30))
        completed += len(made)
        made.clear()

    benchmark.pedantic(lambda: loop.run_until_complete(submit()), setup=setup, teardown=settle,
                       rounds=5, warmup_rounds=1)
    if made:
        settle()
    if benchmark.stats:  # (None under --benchmark-disable: one plain run)
        benchmark.extra_info["us_per_wait"] = benchmark.stats.stats.median / SUBMITS * 1e6
    assert completed >= SUBMITS and completed % SUBMITS == 0
