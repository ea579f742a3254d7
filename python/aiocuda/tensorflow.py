"""TensorFlow, awaited: ``await aiocuda.wait(tensor)`` and ``await aiocuda.gpu_op(fn, x)``.

TensorFlow exposes no stream handle, and its GPU streams are non-blocking (since 2.13), so a mark on
the legacy stream would not be ordered after its work. GPU work is therefore awaited through
:func:`aiocuda.synchronize_device`: a context-wide mark (``cuCtxRecordEvent``, CUDA 12.5) on the
device's primary context (the one TensorFlow uses), passed once *all* work queued on that device
before it has finished; older drivers get a native thread per device calling ``cuCtxSynchronize``.
It may over-wait (other models' work on the same GPU is included); it never under-waits. Eager
tensors on the CPU are already computed.
"""

from __future__ import annotations

import numbers
from collections.abc import Awaitable
from typing import Any

try:
    import tensorflow as tf  # type: ignore[import-untyped,import-not-found,unused-ignore]
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "aiocuda.tensorflow needs TensorFlow, which is not installed: pip install "
        "'aiocuda[tensorflow]' (or tensorflow-cpu)"
    ) from exc

from ._api import synchronize_device
from ._errors import AiocudaError
from ._ops import CPU, _tf_place

__all__ = ["cuda_ordinal", "gpu_index", "wait"]


def gpu_index(x: tf.Tensor | tf.Variable) -> int | None:
    """TensorFlow's GPU index of a tensor (N in "/GPU:N"), or None for the host."""
    if not isinstance(x, (tf.Tensor, tf.Variable)):
        raise TypeError(f"aiocuda.tensorflow.gpu_index() needs a TensorFlow tensor, got "
                        f"{type(x).__name__}")
    place = _tf_place(x.device)
    return None if place == CPU else int(place.device)


def cuda_ordinal(index: int) -> int:
    """The CUDA device ordinal behind TensorFlow's "/GPU:`index`".

    TensorFlow numbers its GPUs among the visible ones (``tf.config.set_visible_devices``), one
    number per logical device (``tf.config.set_logical_device_configuration`` splits a GPU), in
    order; its physical devices ("/physical_device:GPU:N") carry the CUDA ordinal N. When
    TensorFlow sees no GPU at all, `index` is taken as the CUDA ordinal.
    """
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):  # numpy's too
        raise TypeError(f"aiocuda.tensorflow.cuda_ordinal() takes TensorFlow's GPU index (N in "
                        f"/GPU:N), an int, got {type(index).__name__}")
    index = int(index)
    if index < 0:
        raise ValueError(f"TensorFlow's GPU index (N in /GPU:N) must be >= 0, got {index}")
    logical: list[Any] = []
    for gpu in tf.config.get_visible_devices("GPU"):
        split = tf.config.get_logical_device_configuration(gpu)
        logical += [gpu] * (len(split) if split else 1)
    if not logical:
        return index  # TensorFlow sees no GPU (a CPU build): "/GPU:N" can only be CUDA's N
    if not 0 <= index < len(logical):
        raise AiocudaError(
            f"TensorFlow has no /GPU:{index}: it sees {len(logical)} GPU(s) "
            f"({', '.join(g.name for g in logical) or 'none'}); check tf.config.get_visible_devices()"
        )
    name = logical[index].name
    try:
        return int(name.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        raise AiocudaError(f"cannot tell the CUDA ordinal of TensorFlow's /GPU:{index} "
                           f"(physical device {name!r})") from None


async def _on_device(x: Any, index: int) -> Any:
    await synchronize_device(index)
    return x


async def _done(x: Any) -> Any:
    return x


async def _on_devices(x: Any, ordinals: list[int]) -> Any:
    for ordinal in ordinals:
        await synchronize_device(ordinal)
    return x


def waitable(x: object) -> Awaitable[Any] | None:
    """aiocuda.wait's TensorFlow cases; None if `x` is not a TensorFlow tensor (a composite one,
    ragged or sparse, waits for the devices of its parts)."""
    if isinstance(x, (tf.Tensor, tf.Variable)):
        index = gpu_index(x)
        return _done(x) if index is None else _on_device(x, cuda_ordinal(index))
    if not isinstance(x, tf.__internal__.CompositeTensor):
        return None
    parts = tf.nest.flatten(x, expand_composites=True)
    indexes = {i for i in map(gpu_index, parts) if i is not None}
    return _on_devices(x, [cuda_ordinal(i) for i in sorted(indexes)])


async def wait(x: tf.Tensor | tf.Variable) -> Any:
    """Await the work that produces `x` (GPU: the device's queued work); returns `x`."""
    aw = waitable(x)
    if aw is None:
        raise TypeError(f"aiocuda.tensorflow.wait() needs a TensorFlow tensor, got "
                        f"{type(x).__name__}")
    return await aw
