"""Wake-up latency in a trio run: aiocuda against what trio users write without it.

- ``aiocuda``: ``await aiocuda.synchronize(stream)`` (the run's queue, watched by a task asleep in
  ``trio.lowlevel.wait_readable``);
- ``trio to_thread``: ``await trio.to_thread.run_sync(event.synchronize)``;
- ``trio poll 1ms``: ``while not event.query(): await trio.sleep(0.001)``.

Measured as `_methods.wake_latency` measures it on asyncio: from a stamp taken on the stream when
the work is done to the awaiting task running again, one wait at a time on an idle run.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

from .._api import synchronize
from ._methods import AIOCUDA, AIOCUDA_FLAG, OURS, strategy_of, work_holds
from ._sources import Source

TRIO_THREAD = "trio to_thread"
TRIO_POLL = "trio poll 1ms"


def methods_for(source_kind: str) -> tuple[str, ...]:
    return (AIOCUDA_FLAG if source_kind == "cuda" else AIOCUDA, TRIO_THREAD, TRIO_POLL)


async def wake_latency(method: str, src: Source, samples: int) -> list[float]:
    """1 + `samples` wake-ups in seconds (the first, after set-up, is reported on its own)."""
    import trio

    out: list[float] = []
    with strategy_of(method):
        for hold in work_holds(1 + samples):
            src.hold(hold)  # the run is waiting when the work finishes
            done_at = src.stamp()
            if method in OURS:
                await synchronize(src.stream)
            elif method == TRIO_THREAD:
                await trio.to_thread.run_sync(src.event().wait)
            elif method == TRIO_POLL:
                ev = src.event()
                while not ev.done():
                    await trio.sleep(0.001)
            else:
                raise ValueError(f"unknown trio method {method!r}")
            out.append(time.perf_counter() - done_at())
    return out


async def _warm_then_measure(method: str, src: Source, samples: int) -> list[float]:
    # As the asyncio suite warms each method up before measuring it: the flag strategy learns
    # each stream's timing from its previous waits.
    await wake_latency(method, src, min(samples, 50))
    return await wake_latency(method, src, samples)


def steps(src: Source, samples: int) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(method, async function returning its samples, after a warm-up) for each method."""
    for m in methods_for(src.kind):
        yield m, functools.partial(_warm_then_measure, m, src, samples)
