"""gpu_op and wait: framework objects in, awaits out.

Which path a call takes is decided from its arguments (where their tensors live), or from an
explicit ``device=`` / ``stream=``, never from what happens to be installed. Frameworks are looked
up in ``sys.modules`` only: an object cannot be a torch tensor unless torch is already imported,
so aiocuda never imports a framework itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import inspect
import itertools
import numbers
import os
import re
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from . import _core
from ._api import (
    CpuStream,
    Event,
    _device_index,
    check_await,
    exit_began,
    not_a_coroutine_function,
    not_callable,
    synchronize,
    synchronize_device,
)
from ._errors import AiocudaError
from ._loop import running_loop

__all__ = ["gpu_op", "wait"]

T = TypeVar("T")

_CPU = "cpu"


@dataclass(frozen=True)
class Place:
    """Where a call runs: ``kind`` is "cpu", "torch" (a torch CUDA device), "tf" (a TensorFlow
    GPU) or "stream" (any other CUDA stream-like); ``device`` the torch.device or GPU ordinal."""

    kind: str
    device: Any = None

    def __str__(self) -> str:
        if self.kind == "tf":
            return f"/GPU:{self.device}"
        return _CPU if self.kind == _CPU else str(self.device)


CPU = Place(_CPU)

_TORCH_CUDA = re.compile(r"cuda(?::(\d+))?")  # torch's spelling: "cuda", "cuda:N"
_TF_DEVICE = re.compile(r"(?:^|/|device:)(CPU|GPU):(\d+)$", re.IGNORECASE)


def _tf_place(device: str) -> Place:
    m = _TF_DEVICE.search(device)
    if m is None:
        return CPU  # eager tensors without a placement live on the host
    return CPU if m.group(1).upper() == "CPU" else Place("tf", int(m.group(2)))


def _torch_place(device: Any) -> Place:
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"a torch tensor on {device}: aiocuda runs torch's cpu and cuda devices; "
                         "call the function directly (or move the tensor: tensor.to('cpu'))")
    return CPU if device.type == "cpu" else Place("torch", device)


def place_of(value: object) -> Place | None:
    """The device a tensor or array lives on; None for anything that is not one."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return _torch_place(value.device)
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(value, (tf.Tensor, tf.Variable)):
        return _tf_place(value.device)
    keras_variable = getattr(sys.modules.get("keras"), "Variable", None)  # Keras 3's own
    if keras_variable is not None and isinstance(value, keras_variable):
        try:
            return place_of(value.value)  # its backend's variable (TensorFlow's, torch's)
        except TypeError:  # another backend's (JAX): not one aiocuda places, as before
            return None
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        return CPU
    if hasattr(value, "__cuda_array_interface__") or hasattr(value, "__dlpack__"):
        raise TypeError(
            f"aiocuda cannot tell where a {type(value).__module__}.{type(value).__qualname__} "
            "runs: it understands torch and TensorFlow tensors and numpy arrays. Pass "
            "stream=<its CUDA stream> (any object with __cuda_stream__) or device=..."
        )
    return None


# Leaves that are never a tensor, skipped by their exact type: a list of a million token ids is
# looked over in C (set(map(type, ...))), not one element at a time on the loop thread.
_SCALARS = frozenset((int, float, complex, bool, str, bytes, type(None)))


def only_scalars(children: list[object]) -> bool:
    """Whether a container's `children` are all scalars (nothing in them to walk), in C."""
    return set(map(type, children)) <= _SCALARS


def _parts_of(fn: object) -> tuple[list[object], list[object]]:
    """What `fn` carries: a functools.partial's arguments (walked as arguments are), and the
    callables and the object of a bound method, which only a torch module or tensor counts from
    (a module's forward, a tensor's method): any other object behind `fn` (a cache, a proxy, an
    array of another library) is not looked into."""
    args: list[object] = []
    while isinstance(fn, functools.partial):
        args += [*fn.args, *fn.keywords.values()]
        fn = fn.func
    return args, [fn, getattr(fn, "__self__", None)]


# A model -> its first variable: finding it walks the model (milliseconds for thousands of
# layers), on the loop thread, for every call. TensorFlow's variables do not move.
_first_weights: weakref.WeakKeyDictionary[Any, object] = weakref.WeakKeyDictionary()
_NOT_A_MODEL = object()


def _tf_first_weight(v: object) -> object:
    """The first variable of a ``tf.Module`` (a Keras 2 layer too) or a Keras 3 layer, None
    before it has one (unbuilt: its inputs decide); _NOT_A_MODEL if `v` is neither."""
    tf: Any = sys.modules.get("tensorflow")
    module = tf is not None and isinstance(v, tf.Module)
    layer = getattr(sys.modules.get("keras"), "Layer", None)
    if not module and not (layer is not None and isinstance(v, layer)):
        return _NOT_A_MODEL
    try:
        return _first_weights[v]
    except (KeyError, TypeError):  # (TypeError: not weakly referable or not hashable)
        pass
    weights: Iterator[object] = (
        v._flatten(predicate=lambda x: isinstance(x, tf.Variable))  # type: ignore[attr-defined]
        if module else iter(v.weights))  # type: ignore[attr-defined]
    first = next(weights, None)
    if first is not None:
        with contextlib.suppress(TypeError):
            _first_weights[v] = first
    return first


def _values(fn: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[object]:
    """The arguments, at any depth of lists, tuples, sets, mappings (a tokenizer's
    ``BatchEncoding`` is one), dataclasses, TensorFlow composite tensors (ragged, sparse) and
    containers registered with torch's pytree (as the CUDA path's own walk,
    aiocuda.torch._children, finds them), each container once; for a torch module, a
    ``tf.Module`` or a Keras layer (an argument, `fn`, or the object of a bound method `fn`)
    its first parameter or variable."""
    bound, owners = _parts_of(fn)
    stack: list[object] = [*reversed(kwargs.values()), *reversed(args), *reversed(bound)]
    seen: dict[int, object] = {}  # id -> container: held, so that no id is reused meanwhile
    torch = sys.modules.get("torch")
    pytree = sys.modules.get("torch.utils._pytree")
    tf: Any = sys.modules.get("tensorflow")
    composite = None if tf is None else tf.__internal__.CompositeTensor
    # (a strategy's per-replica values span its devices: not one place, looked into as before)
    per_replica: Any = None if tf is None else tf.distribute.DistributedValues
    for v in owners:
        if torch is not None and isinstance(v, torch.nn.Module):
            yield next(itertools.chain(v.parameters(), v.buffers()), None)
        elif torch is not None and isinstance(v, torch.Tensor):
            yield v
        elif (first := _tf_first_weight(v)) is not _NOT_A_MODEL:
            yield first
    while stack:
        v = stack.pop()
        if type(v) in _SCALARS:
            continue
        if isinstance(v, (list, tuple, set, frozenset)):
            children: Any = v
        elif isinstance(v, Mapping):
            children = v.values()
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            children = [getattr(v, f.name) for f in dataclasses.fields(v)]
        elif torch is not None and isinstance(v, torch.nn.Module):
            yield next(itertools.chain(v.parameters(), v.buffers()), None)
            continue
        elif composite is not None and isinstance(v, composite) and \
                not isinstance(v, (tf.Variable, per_replica)):  # (a variable is one too)
            children = tf.nest.flatten(v, expand_composites=True)
        elif (first := _tf_first_weight(v)) is not _NOT_A_MODEL:
            yield first
            continue
        elif pytree is not None and (node := pytree.SUPPORTED_NODES.get(
                pytree._get_node_type(v))) is not None:
            children = node.flatten_fn(v)[0]
        else:
            yield v
            continue
        if id(v) not in seen:
            seen[id(v)] = v
            children = list(children)
            if not only_scalars(children):
                stack.extend(reversed(children))


def _is_tf(v: object) -> bool:
    tf = sys.modules.get("tensorflow")
    keras_variable = getattr(sys.modules.get("keras"), "Variable", None)
    return (tf is not None and isinstance(v, (tf.Tensor, tf.Variable))) or \
        (keras_variable is not None and isinstance(v, keras_variable))


def _tf_has_gpu(index: int) -> bool:
    """Whether TensorFlow has a "/GPU:`index`" (a logical device)."""
    return index < len(sys.modules["tensorflow"].config.list_logical_devices("GPU"))


def _parse_device(device: object) -> Place:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(device, torch.device):
        return _torch_place(device)
    if isinstance(device, numbers.Integral) and not isinstance(device, bool):  # numpy's too
        device = int(device)
        _device_index(device)  # an ordinal in range, else a ValueError
        if torch is None:
            raise ValueError(f"device={device} names a CUDA device by its ordinal, as torch does, "
                             "but torch is not imported: import torch first, or pass stream=")
        return _torch_place(torch.device("cuda", device))
    if isinstance(device, str):
        text = device.strip()
        if text.lower() == _CPU:
            return CPU
        if _TORCH_CUDA.fullmatch(text):
            if torch is None:
                raise ValueError(f"device={device!r} names a torch device, but torch is not "
                                 "imported: import torch first, or pass a TensorFlow device "
                                 "such as '/GPU:0'")
            return _torch_place(torch.device(text))
        if _TF_DEVICE.search(text):
            return _tf_place(text)
    raise ValueError(
        f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N', a CUDA ordinal N or a "
        "torch.device (PyTorch), or '/GPU:N' (TensorFlow)"
    )


def _stream_place(stream: object) -> Place:
    if isinstance(stream, CpuStream):
        return CPU
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(stream, torch.cuda.Stream):
        return Place("torch", stream.device)
    if _is_cuda_stream(stream):
        return Place("stream")
    raise TypeError(
        "stream= must be an aiocuda.CpuStream, a torch.cuda.Stream, an object with "
        f"__cuda_stream__ or cuda_stream, or an int CUstream handle; got {type(stream).__name__}"
    )


def _is_cuda_stream(x: object) -> bool:
    """What synchronize() takes as a CUDA stream: a handle, or an object giving one."""
    return (isinstance(x, int) and not isinstance(x, bool) or hasattr(x, "__cuda_stream__")
            or hasattr(x, "cuda_stream"))


def _names(given: Place, place: Place) -> bool:
    """Whether `given` names `place`: "cuda" (no index) names any CUDA device."""
    if given.kind == "torch" and place.kind == "torch" and given.device.index is None:
        return True
    return str(given) == str(place)


def placement(fn: object, args: tuple[Any, ...], kwargs: dict[str, Any], stream: object,
              device: object) -> Place:
    """Decide where `fn(*args, **kwargs)` runs; raise if the arguments disagree."""
    found: dict[str, Place] = {}
    tf_only = True  # every tensor found is TensorFlow's (or none was found)
    for v in _values(fn, args, kwargs):
        try:
            p = place_of(v)
        except TypeError:
            if stream is None and device is None:
                raise
            continue  # an array aiocuda does not know: the caller said where fn runs
        if p is not None:
            found.setdefault(str(p), p)
            tf_only = tf_only and _is_tf(v)
    # Host tensors beside device ones are the function's business, as torch allows (0-dim CPU
    # scalars; pack_padded_sequence's lengths must be on the CPU): two devices are a conflict.
    devices = [p for p in found.values() if p != CPU]
    if len(devices) > 1:
        how = ("with tf.device('/GPU:N'): tf.identity(x)" if any(p.kind == "tf" for p in devices)
               else "tensor.to(device)")
        raise ValueError(
            f"gpu_op() got tensors on different devices: {', '.join(sorted(map(str, devices)))}; "
            f"move them to one device first ({how}), then call gpu_op"
        )
    place = devices[0] if devices else CPU if found else None
    if place in (None, CPU) and device is None and stream is None and tf_only and \
            "tensorflow" in sys.modules:
        # TensorFlow host inputs (or none) in a tf.device("/GPU:N") scope run there, as in TF,
        # where TensorFlow has that GPU (else its soft placement runs them on the host).
        scope = _tf_device()
        if scope and (in_scope := _tf_place(scope)).kind == "tf" and _tf_has_gpu(in_scope.device):
            place = in_scope
    if device is not None and stream is not None and _stream_place(stream).kind == "stream":
        _stream_ordinal(device)  # device= only says which device the stream is on
        device = None
    said_by: str | None = None  # the argument that set `place`; None: the tensors did
    for what, given in (("device=", None if device is None else _parse_device(device)),
                        ("stream=", None if stream is None else _stream_place(stream))):
        if given is None:
            continue
        # Host tensors may feed a device (copies to it); device tensors must stay where they
        # are; device= and stream= must agree ("cuda" names any CUDA device).
        by_tensors = said_by is None
        if place is not None and given.kind != "stream" and not _names(given, place) and \
                not (by_tensors and place == CPU) and (by_tensors or not _names(place, given)):
            source = "the tensors are on" if said_by is None else f"{said_by} says"
            raise ValueError(f"{what} says {given}, but {source} {place}")
        if place is None or (by_tensors and place == CPU) or given.kind == "stream" or \
                not by_tensors:
            place, said_by = given, what
    return place if place is not None else CPU


class _CpuPool:
    """A few cpu-backend streams for gpu_op calls that name none.

    Each call goes to the stream used last if it has nothing pending (its worker is likely still
    awake: a call right after another pays no thread wake-up), else to an idle one, else to the
    least busy one; so calls made together still spread over the workers.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: list[CpuStream] = []
        self._last: CpuStream | None = None

    def get(self) -> CpuStream:
        if exit_began[0]:
            raise AiocudaError(
                "gpu_op() was called after aiocuda's exit hook closed its worker pool: the "
                "interpreter is exiting. Await GPU work before the program ends, not in an "
                "atexit handler or a __del__ that runs at exit"
            )
        with self._lock:
            if not self._streams:
                self._streams = [CpuStream() for _ in range(min(4, os.cpu_count() or 1))]
            last = self._last
            if last is None or last._pending:
                last = min(self._streams, key=lambda s: s._pending)
                self._last = last
            return last


# gpu_op's pools, by depth. A function run by gpu_op at depth d (pool d, or a CpuStream of the
# user's) runs with _nesting at depth d + 1, and while it runs its gpu_op calls use pool d + 1:
# on a loop of its own, or on its caller's loop if it hands them there (run_coroutine_threadsafe
# (...).result() copies its context, and with it _nesting). Its caller's pool could be busy,
# every stream of it, with functions waiting for such calls; the next pool's streams only run
# work of callers that wait on them. A task it started and left to run on counts, once the
# function has returned, at the depth of the function's caller. Threads: a few per depth used.
_pools = [_CpuPool()]
_pools_lock = threading.Lock()


class _Nesting:
    __slots__ = ("depth", "parent", "running", "stream")

    def __init__(self, depth: int, parent: _Nesting | None, stream: CpuStream) -> None:
        self.depth, self.parent, self.running, self.stream = depth, parent, True, stream


_nesting: contextvars.ContextVar[_Nesting | None] = contextvars.ContextVar(
    "aiocuda_gpu_op_nesting", default=None)


def _live_nesting() -> _Nesting | None:
    """The innermost gpu_op function still running in this context, if any."""
    n = _nesting.get()
    while n is not None and not n.running:
        n = n.parent
    return n


def _running_on(stream: CpuStream) -> bool:
    """True if a gpu_op function of this context still runs on `stream`: also where the caller
    is not on its worker (a loop it handed a coroutine to, run_coroutine_threadsafe)."""
    n = _live_nesting()
    while n is not None:
        if n.running and n.stream is stream:
            return True
        n = n.parent
    return False


def _caller_depth() -> int:
    n = _live_nesting()
    if n is not None:
        return n.depth
    return 1 if _core.on_cpu_worker() else 0  # 1: a function on a CpuStream, not from gpu_op


def _pool_at(depth: int) -> _CpuPool:
    if depth == 0:
        return _pools[0]
    with _pools_lock:
        while len(_pools) <= depth:
            _pools.append(_CpuPool())
        return _pools[depth]


def _reset_pools() -> None:  # a forked child must not use the parent's workers
    global _pools_lock
    _pools_lock = threading.Lock()
    _pools[:] = [_CpuPool()]


os.register_at_fork(after_in_child=_reset_pools)


async def gpu_op(fn: Callable[..., T], /, *args: Any, stream: Any = None, device: Any = None,
                 **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` and return its result once the work it enqueued has finished.

    - torch CUDA tensors: `fn` runs on the loop thread under ``torch.cuda.stream(s)`` (`stream`, or
      one of a small per-device pool) after `s` waits for the caller's current stream; outputs are
      safe to use on the caller's stream. Then `s` is awaited.
    - TensorFlow GPU tensors: `fn` runs on the loop thread in ``tf.device`` of that GPU, then the
      device's queued work is awaited (:func:`aiocuda.synchronize_device`; TensorFlow exposes no
      stream). Host inputs in the caller's ``tf.device("/GPU:N")`` scope go there too.
    - torch CPU tensors, numpy arrays, plain Python: `fn` runs on a cpu-backend stream (`stream`,
      or one of a small pool; a gpu_op called by such a function, on a loop it runs, uses another
      pool), so the loop stays free while it computes, in the caller's contextvars, torch
      grad, inference and cpu autocast modes and default device, and TensorFlow device scope
      and distribution strategy, as on the caller's thread. Other per-thread state stays behind
      (torch's saved-tensor hooks and function modes, its thread count). Under a recording
      ``tf.GradientTape``, which belongs to its thread, `fn` runs on the loop thread instead
      (unless ``stream=`` names a CpuStream), holding up the loop's other tasks meanwhile.
    - ``stream=`` any other CUDA stream (``__cuda_stream__`` or a handle): `fn` runs on the loop
      thread, then that stream is awaited (on ``device=``'s device: a default-stream handle,
      0, 1 or 2, needs it when no context is current).

    The path comes from where the arguments live (tensors at any depth of lists, tuples, sets,
    mappings, dataclasses and TensorFlow composite tensors; a torch module's parameters, a Keras
    layer's or ``tf.Module``'s variables, whether it is `fn`, an argument, the object of a bound
    method or in a ``functools.partial``), or from ``device=``
    (``"cpu"``, ``"cuda:0"``, a CUDA ordinal such as ``0``, a ``torch.device``, ``"/GPU:0"``) or
    ``stream=``, which may send host tensors to a device (a copy) but may not contradict device
    tensors; ``stream`` and ``device`` are gpu_op's own keywords and are not passed to `fn`. An
    exception from `fn` reaches the awaiting task.
    `fn` is a plain function: an async function is a TypeError (await it directly instead).
    """
    if not callable(fn):
        raise not_callable(fn, "gpu_op()")
    not_a_coroutine_function(fn, "gpu_op()")
    running_loop("aiocuda.gpu_op()")  # before fn runs: its work would be queued and lost
    place = placement(fn, args, kwargs, stream, device)
    if place.kind == "torch":
        from .torch import run_on_cuda

        return await run_on_cuda(fn, args, kwargs, place.device, stream)
    # Where the await would be refused, it is refused before fn enqueues work: a retry after
    # the error would run fn twice (an optimizer step), and the work's result would be lost.
    if place.kind == "tf":
        gpu = _tf_cuda_ordinal(place.device)
        check_await(0, gpu)
        tf = sys.modules.get("tensorflow")  # (device="/GPU:0" may come without TensorFlow)
        with contextlib.nullcontext() if tf is None else tf.device(str(place)):
            result = fn(*args, **kwargs)  # on the device awaited, not on TensorFlow's default
        await synchronize_device(gpu)
        return result
    if place.kind == "stream":
        ordinal = None if device is None else _stream_ordinal(device)
        check_await(stream, ordinal)
        result = fn(*args, **kwargs)
        await synchronize(stream, device=ordinal)
        return result
    if stream is None and "tensorflow" in sys.modules and _tf_tape_recording():
        return fn(*args, **kwargs)  # the tape records on this thread only: here, or no gradients
    depth = _caller_depth()
    cpu = stream if isinstance(stream, CpuStream) else _pool_at(depth).get()
    if cpu._on_worker or _running_on(cpu):  # fn would queue behind the function that waits for it
        raise AiocudaError(
            "gpu_op(stream=s) was called by a function running on s: fn would run after that "
            "function, which waits for it. Pass another stream, or none"
        )
    return await cpu.submit(_InCallersState(fn, args, kwargs, depth + 1, cpu))


_tf_eager: list[Any] = []  # TensorFlow's record and context modules, once imported


def _tf_modules() -> list[Any]:
    if not _tf_eager:
        _tf_eager[:] = [importlib.import_module(f"tensorflow.python.eager.{name}")
                        for name in ("record", "context")]
    return _tf_eager


def _tf_tape_recording() -> bool:
    """Whether a ``tf.GradientTape`` records on this thread (TensorFlow keeps tapes per thread)."""
    return bool(_tf_modules()[0].could_possibly_record())


def _stream_ordinal(device: object) -> int | None:
    """The CUDA device ordinal `device=` names beside a CUDA ``stream=`` (a default-stream handle
    needs one); None for "cuda" with no index."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _device_index(device)
    m = _TORCH_CUDA.fullmatch(device.strip()) if isinstance(device, str) else None
    if m:  # read without torch
        return None if m.group(1) is None else _device_index(int(m.group(1)))
    place = _parse_device(device)
    if place.kind == "torch":
        index: int | None = place.device.index
        return index
    if place.kind == "tf":
        return _tf_cuda_ordinal(place.device)
    raise ValueError(f"device={device!r} names the cpu, but stream= is a CUDA stream: pass the "
                     "stream's CUDA device (0, 'cuda:0'), or a CpuStream")


class _InCallersState:
    """`fn(*args, **kwargs)` to run on a cpu worker as it would on the caller's thread: in the
    caller's contextvars (as asyncio.to_thread does), with torch its grad, inference and cpu
    autocast modes and default device, and with TensorFlow its device scope and distribution
    strategy, which both keep per thread (torch's parallel_apply carries its modes too), set on
    the worker whatever an earlier call left there. Its repr is `fn`'s, for the messages that
    name the function."""

    __slots__ = ("fn", "args", "kwargs", "ctx", "torch", "modes", "tf_device", "tf_strategy",
                 "depth", "stream")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], depth: int, stream: CpuStream) -> None:
        self.fn, self.args, self.kwargs, self.depth, self.stream = fn, args, kwargs, depth, stream
        self.ctx = contextvars.copy_context()
        self.torch = torch = sys.modules.get("torch")
        self.modes = None if torch is None else _torch_modes(torch)
        tf = sys.modules.get("tensorflow")
        self.tf_device = "" if tf is None else _tf_device()
        self.tf_strategy = (tf.distribute.get_strategy()
                            if tf is not None and tf.distribute.has_strategy() else None)

    def __call__(self) -> Any:
        return self.ctx.run(self._call)

    def _call(self) -> Any:
        # The pool of fn's own gpu_op calls. (Linked to live callers only: a pipeline of
        # tasks that each start the next keeps no chain of ended ones.)
        nesting = _Nesting(self.depth, _live_nesting(), self.stream)
        _nesting.set(nesting)  # (in the copy of the caller's context)
        try:
            if not self.tf_device and self.tf_strategy is None:
                return self._in_torch_modes()
            with contextlib.ExitStack() as scopes:  # (a worker is in none: each call leaves its own)
                if self.tf_device:
                    scopes.enter_context(sys.modules["tensorflow"].device(self.tf_device))
                if self.tf_strategy is not None:  # variables made in fn are the strategy's
                    scopes.enter_context(self.tf_strategy.scope())
                return self._in_torch_modes()
        finally:
            nesting.running = False

    def _in_torch_modes(self) -> Any:
        torch = self.torch
        if torch is None or _torch_modes(torch) == self.modes:
            return self.fn(*self.args, **self.kwargs)
        grad, inference, autocast, dtype, cache, device = self.modes  # type: ignore[misc]
        # (a default device is a torch function mode, which every op inside then goes through:
        # only where the caller has one)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad), \
                torch.autocast("cpu", enabled=autocast, dtype=dtype, cache_enabled=cache), \
                torch.device(device) if device is not None else contextlib.nullcontext():
            return self.fn(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        return repr(self.fn)


def _tf_device() -> str:
    """This thread's TensorFlow device scope (``tf.device``), or "" outside one."""
    return str(_tf_modules()[1].context().device_name or "")


def _torch_modes(torch: Any) -> tuple[Any, ...]:
    """This thread's torch modes that a cpu worker takes over: grad, inference, cpu autocast
    (on, and if on its dtype and cache), default device (None: the cpu; looked up, which is
    slow, only where a torch function mode, which a default device is, is set)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch 2.4 and later
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else None
    else:
        autocast = torch.is_autocast_cpu_enabled()
        dtype = torch.get_autocast_cpu_dtype() if autocast else None
    device = None
    if torch._C._len_torch_function_stack() and hasattr(torch, "get_default_device"):  # 2.3+
        device = torch.get_default_device()
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, dtype,
            torch.is_autocast_cache_enabled() if autocast else None,
            None if device is None or device.type == "cpu" else device)


def _tf_cuda_ordinal(index: int) -> int:
    if "tensorflow" not in sys.modules:
        return index  # "/GPU:N" given with TensorFlow not imported: nothing renumbers it
    from .tensorflow import cuda_ordinal

    return cuda_ordinal(index)


def _waitable(x: object) -> Awaitable[Any] | None:
    if "torch" in sys.modules:
        from .torch import waitable as torch_waitable

        aw = torch_waitable(x)
        if aw is not None:
            return aw
    if "tensorflow" in sys.modules:
        from .tensorflow import waitable as tf_waitable

        aw = tf_waitable(x)
        if aw is not None:
            return aw
    return None


async def wait(x: Any) -> Any:
    """Await the GPU (or cpu-backend) work behind `x` without blocking the loop.

    `x` may be an :class:`aiocuda.Event`, a :class:`aiocuda.CpuStream` or any CUDA stream
    (``__cuda_stream__``, ``torch.cuda.Stream``, a handle); a torch tensor (CUDA: its device's
    current stream; returns the tensor), ``torch.cuda.Event``, ``torch.futures.Future`` (returns
    its value) or ``torch.distributed`` work handle (returns its result); a TensorFlow tensor
    (GPU: the device's queued work; returns the tensor).
    """
    running_loop("aiocuda.wait()")  # (else the error would name what wait calls)
    if isinstance(x, Event):
        await x
        return None
    if isinstance(x, CpuStream):
        await synchronize(x)
        return None
    aw = _waitable(x)
    if aw is not None:
        return await aw
    if _is_cuda_stream(x):
        await synchronize(x)
        return None
    hint = (": it is awaitable, so await it directly" if inspect.isawaitable(x) else "")
    raise TypeError(
        f"aiocuda.wait() cannot wait on {type(x).__module__}.{type(x).__qualname__}: it takes an "
        "aiocuda Event or CpuStream, a CUDA stream, a torch tensor, Event, Stream, Future or "
        f"distributed work handle, or a TensorFlow tensor{hint}"
    )
