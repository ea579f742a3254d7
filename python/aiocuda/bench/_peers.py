"""Other libraries' own ways to await stream work, measured beside aiocuda on a real GPU.

Each wraps the benchmark's stream (`DriverSource.handle`: a ``torch.cuda.Stream`` on device 0)
in the library's own stream object and waits with the library's own code:

- ``numba-cuda async_done``: ``numba.cuda.external_stream(handle).async_done()``, numba's
  asyncio future, resolved by its stream callback through ``loop.call_soon_threadsafe``;
- ``cupy synchronize in executor``: ``loop.run_in_executor(None, stream.synchronize)`` on a
  ``cupy.cuda.ExternalStream(handle)``;
- ``cupy host-function callback``: ``stream.launch_host_func(cb, arg)`` (``add_callback`` where
  CuPy has no ``launch_host_func``), where ``cb`` resolves a future with
  ``loop.call_soon_threadsafe``.

The two host-function peers put one Python callback on the stream per wait, so they are capped
like ``call_soon_threadsafe`` (`PY_HOSTFN_CAP`). Both libraries work in the current context,
device 0's primary context that PyTorch made current; that is checked against the stream's own
context before a peer is used. Never on the driver emulator: numba and CuPy load the system's
libcuda, not the emulator, so they could not see its streams.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
from collections.abc import Awaitable, Callable
from typing import Any

from ._sources import PY_HOSTFN_CAP, PeerWaiter

NUMBA = "numba-cuda async_done"
CUPY_EXECUTOR = "cupy synchronize in executor"
CUPY_HOSTFN = "cupy host-function callback"
PEERS = (NUMBA, CUPY_EXECUTOR, CUPY_HOSTFN)
HOSTFN_PEERS = (NUMBA, CUPY_HOSTFN)  # one Python callback on the stream per wait


def attach(src: Any, skipped: list[str], failed: list[str], notes: list[str]
           ) -> dict[str, PeerWaiter]:
    """The peers to measure on `src` (a `Source`): none unless it is a real GPU's cuda source
    (``emulated`` False). A package that is not installed is a line in `skipped`; one that cannot
    wrap the stream (or is not in its context) a line in `failed`; each one used, a note."""
    if src.kind != "cuda" or getattr(src, "emulated", True):
        return {}
    out: dict[str, PeerWaiter] = {}
    for package, module, make in (("numba-cuda", "numba.cuda", _numba), ("CuPy", "cupy", _cupy)):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            skipped.append(f"{package}: not installed ({e}); no {package} rows on {src.name}")
            continue
        try:
            got, note = make(mod, src)
        except Exception as e:  # noqa: BLE001 - reported; aiocuda is measured without it
            failed.append(f"{src.name}: {package}: could not wait on the benchmark stream: "
                          f"{type(e).__name__}: {e}")
            continue
        out.update(got)
        notes.append(note)
    if out:
        notes.append(f"peers on {src.name} wrap the benchmark stream {src.handle:#x}; "
                     f"{', '.join(m for m in HOSTFN_PEERS if m in out)} put a Python callback "
                     f"on the stream per wait: at most {PY_HOSTFN_CAP} in flight")
    return out


def _numba(cuda: Any, src: Any) -> tuple[dict[str, PeerWaiter], str]:
    stream = cuda.external_stream(src.handle)
    _same_stream("numba-cuda", _address(stream.handle), _address(cuda.current_context().handle),
                 src)

    def waiter(loop: asyncio.AbstractEventLoop) -> Callable[[], Awaitable[Any]]:
        start: Callable[[], Awaitable[Any]] = stream.async_done  # its future, on the running loop
        return start

    numba = importlib.import_module("numba")
    return {NUMBA: waiter}, (
        f"peer numba-cuda {_version('numba-cuda')} (numba "
        f"{getattr(numba, '__version__', '?')}): numba.cuda.external_stream(handle).async_done()")


def _cupy(cp: Any, src: Any) -> tuple[dict[str, PeerWaiter], str]:
    stream = cp.cuda.ExternalStream(src.handle, device_id=0)
    _ = stream.done  # a query through CuPy's runtime: the handle is valid in its context
    _same_stream("CuPy", int(stream.ptr), int(cp.cuda.driver.ctxGetCurrent()), src)
    launch = getattr(stream, "launch_host_func", None)  # CuPy >= 9; add_callback before

    def executor(loop: asyncio.AbstractEventLoop) -> Callable[[], Awaitable[Any]]:
        return lambda: loop.run_in_executor(None, stream.synchronize)

    def hostfn(loop: asyncio.AbstractEventLoop) -> Callable[[], Awaitable[Any]]:
        def start() -> asyncio.Future[None]:
            fut = loop.create_future()
            if launch is not None:
                launch(_resolve, (loop, fut))
            else:
                stream.add_callback(_resolve_status, (loop, fut))
            return fut

        return start

    how = "launch_host_func" if launch is not None else "add_callback (no launch_host_func)"
    return {CUPY_EXECUTOR: executor, CUPY_HOSTFN: hostfn}, (
        f"peer CuPy {getattr(cp, '__version__', '?')}: cupy.cuda.ExternalStream(handle, "
        f"device_id=0); synchronize in the default executor, and host functions through {how}")


def _resolve(arg: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]) -> None:
    loop, fut = arg  # on CuPy's callback thread, holding the GIL
    loop.call_soon_threadsafe(_done, fut, 0)


def _resolve_status(_stream: object, status: int,
                    arg: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]) -> None:
    loop, fut = arg
    loop.call_soon_threadsafe(_done, fut, status)


def _done(fut: asyncio.Future[None], status: int) -> None:
    if fut.done():  # cancelled: a measurement cut short
        return
    if status:
        fut.set_exception(RuntimeError(f"stream callback status {status}"))
    else:
        fut.set_result(None)


def _same_stream(package: str, stream: int, ctx: int, src: Any) -> None:
    """The peer's stream object wraps the benchmark stream, and it works in that stream's
    context (else its waits would not be for the same work)."""
    if stream != src.handle:
        raise RuntimeError(f"{package} wraps stream {stream:#x}, not the benchmark stream "
                           f"{src.handle:#x}")
    want = src.stream_context()
    if ctx != want:
        raise RuntimeError(f"{package} works in context {ctx:#x}, the benchmark stream is in "
                           f"{want:#x} (device 0's primary context)")


def _address(handle: Any) -> int:
    """A context handle as an int: numba's ctypes ``c_void_p`` has ``.value``; the NVIDIA
    binding's ``CUcontext`` converts with ``int()``."""
    return int(getattr(handle, "value", handle) or 0)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"
