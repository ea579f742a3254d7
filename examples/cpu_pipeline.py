"""A two-stage pipeline on the cpu backend: stage 2 waits on stage 1 through an event, as CUDA
streams do with cuStreamWaitEvent, while the event loop stays free for other tasks.

    python examples/cpu_pipeline.py
"""

from __future__ import annotations

import asyncio
import time

import aiocuda


def load(i: int, buffer: list[int]) -> None:
    time.sleep(0.01)  # stands in for I/O or a kernel that releases the GIL
    buffer[:] = range(i, i + 1000)


def reduce(buffer: list[int]) -> int:
    return sum(buffer)


async def main() -> None:
    results = []
    async with aiocuda.CpuStream() as loader, aiocuda.CpuStream() as compute:
        for i in range(8):
            # Like device buffers, data passes between streams through memory that the event
            # orders, not through the asyncio futures (those resolve on the loop, later).
            buffer: list[int] = []
            loader.submit(load, i, buffer)   # runs on the loader's worker
            ready = loader.record()          # an event after that work
            compute.wait_event(ready)        # compute's next work starts after it
            results.append(compute.submit(reduce, buffer))
        heartbeat = 0
        while not all(f.done() for f in results):
            heartbeat += 1                   # the loop keeps running meanwhile
            await asyncio.sleep(0.001)
        totals = await asyncio.gather(*results)
    print("totals:", totals)
    print(f"the loop ran {heartbeat} heartbeats while the streams worked")
    print("queue:", aiocuda.statistics())


if __name__ == "__main__":
    asyncio.run(main())
