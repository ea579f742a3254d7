"""aiocuda: await GPU work on an asyncio event loop, with no thread blocked.

    await aiocuda.synchronize(stream)
    ev = aiocuda.record(stream); await ev
    async with ... / with aiocuda.CpuStream() as s: await s.submit(fn, x)
"""

from ._api import CpuStream, Event, StreamLike, backends, record, synchronize
from ._errors import AiocudaError, CudaError
from ._loop import Statistics, statistics

__version__ = "0.1.0"

__all__ = [
    "AiocudaError",
    "CpuStream",
    "CudaError",
    "Event",
    "Statistics",
    "StreamLike",
    "backends",
    "record",
    "statistics",
    "synchronize",
]
