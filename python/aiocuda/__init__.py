"""aiocuda: await GPU work on an asyncio event loop, with no thread blocked.

    await aiocuda.synchronize(stream)
    ev = aiocuda.record(stream); await ev
    async with aiocuda.CpuStream() as s: await s.submit(fn, x)
    y = await aiocuda.gpu_op(model, x)            # torch / TensorFlow / numpy / Python
    await aiocuda.wait(tensor_or_event_or_work)
    @aiocuda.batch(max_batch_size=32)             # await b(item): one call per batch of items

PyTorch and TensorFlow specifics live in ``aiocuda.torch`` and ``aiocuda.tensorflow``.
"""

from ._api import (
    CpuStream,
    Event,
    StreamLike,
    backends,
    record,
    set_strategy,
    strategy,
    synchronize,
    synchronize_device,
)
from ._batch import Batcher, batch
from ._errors import AiocudaError, CudaError
from ._loop import Statistics, statistics
from ._ops import gpu_op, wait

__version__ = "0.1.0"

__all__ = [
    "AiocudaError",
    "Batcher",
    "CpuStream",
    "CudaError",
    "Event",
    "Statistics",
    "StreamLike",
    "backends",
    "batch",
    "gpu_op",
    "record",
    "set_strategy",
    "statistics",
    "strategy",
    "synchronize",
    "synchronize_device",
    "wait",
]
