"""Tests that need a real NVIDIA GPU: the real-driver counterparts of tests/test_engine.py.

    AIOCUDA_TEST_REAL_DRIVER=1 .venv/bin/python -m pytest -m gpu

Elsewhere every test here skips with its reason. They are written for one GPU (an H100 should
take one to two minutes for all of them, most of it torch.compile, NCCL set-up and three child
processes); the tests of a second device skip on one. Every wait has a bound
(asyncio.wait_for, subprocess timeouts), so a bug fails a test instead of hanging the run. Long
kernels are torch.cuda._sleep, whose cycle count is calibrated against CUDA timing events once
per device (sleep_cycles).

Child processes (tests/gpu/*.py) inherit this environment unchanged, AIOCUDA_TEST_REAL_DRIVER
included (the real driver: conftest sets AIOCUDA_LIBCUDA only for the emulator), with the
aiocuda under test first on PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import aiocuda
from aiocuda import _core

from .conftest import EMU_PATH, Ticker

pytestmark = [
    pytest.mark.gpu,
    # torch, CuPy, Triton, numba and NCCL warn about their own settings (TF32, device ids,
    # deprecations): on a GPU those are reported, not turned into errors. What would be
    # aiocuda's mistakes (a coroutine never awaited: RuntimeWarning; a leak: ResourceWarning;
    # an exception in a finalizer or a thread) still fail the test.
    pytest.mark.filterwarnings("default::UserWarning"),
    pytest.mark.filterwarnings("default::DeprecationWarning"),
    pytest.mark.filterwarnings("default::FutureWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]

GPU_SCRIPTS = Path(__file__).resolve().parent / "gpu"
#: The directory holding the aiocuda under test, put first on a child process's PYTHONPATH.
PACKAGE_ROOT = str(Path(aiocuda.__file__).resolve().parent.parent)


# ---- fixtures and helpers ---------------------------------------------------------------------
@pytest.fixture
def gpu():
    if EMU_PATH is not None:
        pytest.skip(
            "the driver emulator is loaded; on a GPU machine run the gpu tests with "
            "AIOCUDA_TEST_REAL_DRIVER=1"
        )
    info = _core.cuda_info()
    if not info["available"]:
        pytest.skip(f"no usable GPU: {info['reason']}")
    return info


@pytest.fixture
def torch_cuda(gpu):
    torch = pytest.importorskip("torch", reason="the real-GPU tests launch kernels with torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


_CYCLES_PER_S: dict[int, float] = {}


def sleep_cycles(torch: Any, seconds: float, device: int = 0) -> int:
    """The torch.cuda._sleep argument that keeps `device` busy for about `seconds`.

    _sleep counts SM clock cycles; the clock is measured once per device with timing events.
    It blocks the calling thread for ~0.1 s the first time: call it outside the event loop.
    """
    rate = _CYCLES_PER_S.get(device)
    if rate is None:
        with torch.cuda.device(device):
            s = torch.cuda.Stream()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(s):
                torch.cuda._sleep(10_000_000)  # the clocks ramp up first
                start.record(s)
                torch.cuda._sleep(100_000_000)
                end.record(s)
            end.synchronize()
            rate = 100e6 / (start.elapsed_time(end) / 1e3)
        _CYCLES_PER_S[device] = rate
    return max(1, int(seconds * rate))


def need_devices(torch: Any, n: int) -> None:
    have = torch.cuda.device_count()
    if have < n:
        pytest.skip(f"needs {n} CUDA devices; this machine has {have}")


def capture_sleep_then_add(torch: Any, static: Any, cycles: int) -> Any:
    """A CUDA graph captured on `static`'s device: a kernel of `cycles`, then static += 1."""
    with torch.cuda.device(static.device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            torch.cuda._sleep(cycles)
            static.add_(1)
    return graph


def run_child(script: str, *args: str, env: dict[str, str] | None = None,
              timeout: float = 60) -> dict[str, Any]:
    """Run tests/gpu/`script` with this Python; return the JSON object of its last JSON line."""
    full_env = dict(os.environ)  # AIOCUDA_TEST_REAL_DRIVER stays; AIOCUDA_LIBCUDA is not added
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    full_env.update(env or {})
    try:
        r = subprocess.run([sys.executable, str(GPU_SCRIPTS / script), *args],
                           capture_output=True, text=True, env=full_env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                    for x in (exc.stdout, exc.stderr))
        pytest.fail(f"{script} did not finish within {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0 and lines, (
        f"{script} exited with {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    assert "setup_error" not in result, (
        f"{script} failed:\n{result['setup_error']}\n{r.stderr[-3000:]}")
    return result


# ---- basics -----------------------------------------------------------------------------------
def test_await_a_sleep_kernel(run, torch_cuda):
    """An await and an event on a torch stream end after its kernel, not before."""
    torch = torch_cuda

    async def main():
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            torch.cuda._sleep(50_000_000)  # tens of ms of GPU time
        ev = aiocuda.record(s)
        assert not ev.done()
        t0 = time.monotonic()
        await asyncio.wait_for(aiocuda.synchronize(s), 30)
        await asyncio.wait_for(ev, 30)
        return time.monotonic() - t0, ev.done(), s.query()

    waited, done, idle = run(main())
    assert done and idle and waited > 0


def test_results_are_ready_after_the_await(run, torch_cuda):
    """A reduction read after the await is complete."""
    torch = torch_cuda

    async def main():
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            x = torch.arange(1 << 20, device="cuda", dtype=torch.float64)
            y = (x * 2).sum()
        await asyncio.wait_for(aiocuda.synchronize(s), 30)
        return y.item()

    n = 1 << 20
    assert run(main()) == float(n * (n - 1))


def test_many_waits_on_the_legacy_stream(run, torch_cuda):
    """Handle 0 with the loop thread's current context: 10,000 awaits all complete."""
    torch = torch_cuda

    async def main():
        torch.cuda.current_device()
        futs = [aiocuda.synchronize(0) for _ in range(10_000)]
        await asyncio.wait_for(asyncio.gather(*futs), 60)
        return aiocuda.statistics().completed

    assert run(main()) == 10_000


# ---- the engine on real hardware (tests/test_engine.py on the emulator) -----------------------
def test_ten_thousand_awaits_behind_a_long_kernel(run, torch_cuda, strategy):
    """Rule 1: 10,000 awaits behind a ~0.5 s kernel all complete, none before the kernel (an
    event recorded after the kernel has completed whenever one resumes), in order, and the loop
    keeps running meanwhile (a 5 ms heartbeat ticks in proportion to the kernel's duration)."""
    torch = torch_cuda
    cycles = sleep_cycles(torch, 0.5)
    n = 10_000

    async def main():
        s = torch.cuda.Stream()
        start = torch.cuda.Event(enable_timing=True)
        kernel_done = torch.cuda.Event(enable_timing=True)
        order: list[int] = []
        early: list[int] = []  # awaits that resumed while the kernel still ran

        def resumed(i: int, _fut: asyncio.Future[None]) -> None:
            order.append(i)
            if not kernel_done.query():
                early.append(i)

        async with Ticker() as ticker:
            await asyncio.sleep(0.02)  # the heartbeat is running
            with torch.cuda.stream(s):
                start.record(s)
                torch.cuda._sleep(cycles)
                kernel_done.record(s)
            ticks0 = ticker.ticks
            futs = []
            for i in range(n):
                f = aiocuda.synchronize(s)
                f.add_done_callback(functools.partial(resumed, i))
                futs.append(f)
            done_at_once = sum(f.done() for f in futs)
            results = await asyncio.wait_for(asyncio.gather(*futs), 60)
            ticks = ticker.ticks - ticks0
        return results, order, early, done_at_once, ticks, start.elapsed_time(kernel_done) / 1e3

    results, order, early, done_at_once, ticks, kernel_s = run(main())
    assert kernel_s > 0.25, f"the kernel ran {kernel_s * 1e3:.0f} ms: the test needs a long one"
    assert results == [None] * n
    assert done_at_once == 0 and early == [], f"{len(early)} awaits resumed before the kernel ended"
    assert order == list(range(n))
    expected = kernel_s / Ticker().period
    assert ticks >= 0.25 * expected, (
        f"the heartbeat ticked {ticks} times during a {kernel_s * 1e3:.0f} ms kernel "
        f"(about {expected:.0f} if the loop never blocked)")


def test_awaiting_every_kernel_keeps_order_and_sees_each_result(run, torch_cuda, strategy):
    """Rule 2: 500 small kernels, each followed by an await kept in flight, then the same
    kernels back to back with one await. Each kernel increments a GPU counter and copies it to
    pinned host memory: every await, when it resumes, sees its own kernel's count; the awaits
    resume in launch order; the counter ends at 1000. (No timing: the benchmark measures stream
    time.)"""
    torch = torch_cuda
    n = 500

    async def main():
        s = torch.cuda.Stream()
        counter = torch.zeros(1, dtype=torch.int64, device="cuda")
        seen = torch.zeros(n, dtype=torch.int64, pin_memory=True)  # written by the GPU
        s.wait_stream(torch.cuda.current_stream())  # the counter's zero comes first
        order: list[int] = []
        wrong: list[tuple[int, int]] = []

        def resumed(i: int, _fut: asyncio.Future[None]) -> None:
            order.append(i)
            if int(seen[i]) != i + 1:
                wrong.append((i, int(seen[i])))

        futs = []
        with torch.cuda.stream(s):
            for i in range(n):  # each kernel awaited
                counter.add_(1)
                seen[i : i + 1].copy_(counter, non_blocking=True)
                f = aiocuda.synchronize(s)
                f.add_done_callback(functools.partial(resumed, i))
                futs.append(f)
            for _ in range(n):  # the same kernels back to back
                counter.add_(1)
        futs.append(aiocuda.synchronize(s))
        await asyncio.wait_for(asyncio.gather(*futs), 60)
        return int(counter.item()), order, wrong

    total, order, wrong = run(main())
    assert wrong == [], f"awaits that resumed before their kernel's result was there: {wrong[:5]}"
    assert order == list(range(n))
    assert total == 2 * n


def test_sixty_four_streams_with_fifty_awaits_each(run, torch_cuda, strategy):
    """Rule 6: 64 torch streams (more than the 16 lanes a device gets) x 50 awaits, each after a
    small kernel: all 3,200 complete, each sees its kernel's result, in order per stream, and
    every stream's counter ends at 50."""
    torch = torch_cuda
    n_streams, per_stream = 64, 50

    async def main():
        streams = [torch.cuda.Stream() for _ in range(n_streams)]
        counters = torch.zeros(n_streams, dtype=torch.int64, device="cuda")
        seen = torch.zeros(n_streams, per_stream, dtype=torch.int64, pin_memory=True)
        caller = torch.cuda.current_stream()
        for s in streams:
            s.wait_stream(caller)  # the counters' zeros come first
        orders: list[list[int]] = [[] for _ in range(n_streams)]
        wrong: list[tuple[int, int, int]] = []

        def resumed(i: int, j: int, _fut: asyncio.Future[None]) -> None:
            orders[i].append(j)
            if int(seen[i, j]) != j + 1:
                wrong.append((i, j, int(seen[i, j])))

        futs = []
        for j in range(per_stream):
            for i, s in enumerate(streams):
                with torch.cuda.stream(s):
                    counters[i].add_(1)
                    seen[i, j].copy_(counters[i], non_blocking=True)
                f = aiocuda.synchronize(s)
                f.add_done_callback(functools.partial(resumed, i, j))
                futs.append(f)
        await asyncio.wait_for(asyncio.gather(*futs), 60)
        return counters.tolist(), orders, wrong

    counts, orders, wrong = run(main())
    assert wrong == [], f"awaits that resumed before their kernel's result was there: {wrong[:5]}"
    assert orders == [list(range(per_stream))] * n_streams
    assert counts == [per_stream] * n_streams


def _foreign_stream(library: str) -> tuple[Any, int, Any]:
    """A new stream of `library`: what to await (the stream, or its raw handle where this
    version lacks __cuda_stream__), its CUstream handle, and the stream object to keep alive.
    Skips if the library is missing."""
    if library == "cupy":
        cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
        stream = cupy.cuda.Stream(non_blocking=True)
        raw = stream.ptr
    elif library == "cuda.core":
        pytest.importorskip("cuda.core", reason="cuda.core is not installed")
        try:
            from cuda.core import Device
        except ImportError:  # cuda.core before 0.4
            from cuda.core.experimental import Device
        dev = Device(0)
        dev.set_current()
        stream = dev.create_stream()
        raw = None
    else:
        cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
        stream = cuda.stream()
        h = stream.handle  # a ctypes c_void_p, or a cuda.bindings CUstream
        raw = h.value if hasattr(h, "value") else int(h)
    proto = getattr(stream, "__cuda_stream__", None)  # a method; a property in early cuda.core
    if proto is not None:
        return stream, (proto() if callable(proto) else proto)[1], stream
    if raw is None:
        pytest.skip(f"this {library} version's streams have no __cuda_stream__")
    return raw, raw, stream


@pytest.mark.filterwarnings("default")
@pytest.mark.parametrize("library", ["cupy", "cuda.core", "numba"])
def test_streams_of_other_libraries_are_awaited(run, torch_cuda, library):
    """Streams of CuPy, cuda.core and numba-cuda (by the __cuda_stream__ protocol, or by their
    raw handle where a version lacks it): the await ends after a kernel queued on that stream
    (launched through torch.cuda.ExternalStream), and wait() takes the stream too."""
    torch = torch_cuda
    stream, handle, _keep = _foreign_stream(library)
    ext = torch.cuda.ExternalStream(handle)
    cycles = sleep_cycles(torch, 0.1)

    async def main():
        with torch.cuda.stream(ext):
            torch.cuda._sleep(cycles)
        kernel_done = torch.cuda.Event()
        kernel_done.record(ext)
        await asyncio.wait_for(aiocuda.synchronize(stream), 30)
        after_synchronize = kernel_done.query()
        with torch.cuda.stream(ext):
            torch.cuda._sleep(cycles)
        await asyncio.wait_for(aiocuda.wait(stream), 30)
        return after_synchronize, ext.query()

    assert run(main()) == (True, True)


# ---- CUDA graph capture -----------------------------------------------------------------------
def test_a_global_capture_on_another_thread_stays_valid(run, torch_cuda, strategy):
    """Rule 3: while a thread captures a graph in global mode (torch.cuda.graph's default),
    awaits pend on two other streams behind ~0.3 s kernels: none fails, the capture still takes
    work after they completed and ends valid, and the graph replays to the right result.

    During the capture the loop thread allocates nothing (torch's allocator would cudaMalloc,
    which global mode forbids to every thread): all tensors exist beforehand."""
    torch = torch_cuda
    import aiocuda.torch as at

    cycles = sleep_cycles(torch, 0.3)
    static = torch.ones(1024, device="cuda")
    counters = torch.zeros(2, device="cuda")
    streams = [torch.cuda.Stream() for _ in range(2)]
    graph = torch.cuda.CUDAGraph()
    began, end_now = threading.Event(), threading.Event()
    failure: list[BaseException] = []
    torch.cuda.synchronize()
    gc.collect()  # no tensor is freed on the loop thread during the capture

    def capture() -> None:
        try:
            with torch.cuda.graph(graph, capture_error_mode="global"):
                static.mul_(2).add_(1)
                began.set()
                if not end_now.wait(60):
                    raise TimeoutError("the loop never ended the capture")
                static.mul_(2).add_(1)  # the capture still takes work: it was not invalidated
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failure.append(exc)
        finally:
            began.set()

    async def main():
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(aiocuda.synchronize(streams[0]), 30)  # aiocuda has met the device
        t = threading.Thread(target=capture, daemon=True)
        t.start()
        try:
            assert await asyncio.wait_for(loop.run_in_executor(None, began.wait, 60), 70)
            assert not failure, failure
            for i, s in enumerate(streams):
                with torch.cuda.stream(s):
                    torch.cuda._sleep(cycles)
                    counters[i].add_(1)
            futs = [aiocuda.synchronize(s) for s in streams for _ in range(30)]
            futs += [aiocuda.record(s) for s in streams]
            outcomes = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
        finally:
            end_now.set()
            await asyncio.wait_for(loop.run_in_executor(None, t.join, 60), 70)
        assert not failure, f"the capture failed: {failure[0]!r}"
        for _ in range(2):
            await asyncio.wait_for(at.replay(graph), 30)
        return outcomes, counters.tolist(), static.unique().tolist()

    outcomes, counts, values = run(main())
    assert [o for o in outcomes if o is not None] == []
    assert counts == [1.0, 1.0]
    assert values == [31.0]  # x -> 4x + 3 per replay: 1 -> 7 -> 31


@pytest.mark.parametrize("mode", ["global", "thread_local", "relaxed"])
def test_awaiting_a_capturing_stream_raises_at_once(run, torch_cuda, mode):
    """Rule 4: inside torch.cuda.graph, awaiting the capturing stream (synchronize, record, or
    wait() on a tensor whose current stream it is) raises AiocudaError at once; the capture
    stays valid (it takes more work, ends, and replays right) and the stream is awaitable after."""
    torch = torch_cuda
    import aiocuda.torch as at

    static = torch.ones(1024, device="cuda")
    cap = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()

    async def main():
        await asyncio.wait_for(aiocuda.synchronize(cap), 30)  # aiocuda has met the device
        refused: list[str | None] = []
        with torch.cuda.graph(graph, stream=cap, capture_error_mode=mode):
            static.mul_(2)
            for attempt in (lambda: aiocuda.synchronize(cap), lambda: aiocuda.record(cap),
                            lambda: aiocuda.synchronize(torch.cuda.current_stream())):
                try:
                    attempt()
                except aiocuda.AiocudaError as exc:
                    refused.append(str(exc))
                else:
                    refused.append(None)
            try:
                await asyncio.wait_for(aiocuda.wait(static), 5)
            except aiocuda.AiocudaError as exc:
                refused.append(str(exc))
            else:
                refused.append(None)
            static.add_(1)
        await asyncio.wait_for(at.replay(graph), 30)
        await asyncio.wait_for(aiocuda.synchronize(cap), 30)
        return refused, static.unique().tolist()

    refused, values = run(main())
    assert all(r is not None and "capturing" in r for r in refused), refused
    assert values == [3.0]  # one replay of x -> 2x + 1


# ---- sticky errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy_name, loop", [("callback", "asyncio"), ("poll", "uvloop")])
def test_a_real_sticky_error_fails_the_pending_awaits(gpu, strategy_name, loop):
    """Rule 5 (in a child process: the error breaks its context for good): 100 awaits, a device
    await and an event pend behind a 5 s kernel; a kernel on another stream writes through a
    null pointer (CuPy RawModule, or Triton). Every await fails with aiocuda.CudaError named
    CUDA_ERROR_ILLEGAL_ADDRESS (code 700) well before the 5 s, the event reports the same, and a
    later await of the stream fails the same way."""
    if not any(importlib.util.find_spec(m) for m in ("cupy", "triton")):
        pytest.skip("neither CuPy nor Triton is installed: the illegal-address kernel needs one")
    out = run_child("sticky_error.py", strategy_name, loop, timeout=60)
    if "skip" in out:
        pytest.skip(out["skip"])
    assert out["strategy"] == strategy_name
    assert out["pending_before_fault"] == 101, out
    illegal = ["CudaError", "CUDA_ERROR_ILLEGAL_ADDRESS", 700]
    assert [o[:3] if isinstance(o, list) else o for o in out["outcomes"]] == [illegal] * 101, (
        out["outcomes"][:3])
    assert out["took"] < 0.4 * out["spin_s"], (
        f"the awaits failed {out['took']:.2f} s after the fault (the kernel ran {out['spin_s']} s)")
    assert out["event"][:3] == illegal, out["event"]
    assert out["later"][0] in ("raised at once", "failed") and out["later"][1][:3] == illegal, (
        out["later"])


# ---- PyTorch ----------------------------------------------------------------------------------
def test_gpu_op_on_cuda_tensors(run, torch_cuda):
    """gpu_op on a CUDA module and tensor, on the pooled side stream and on a given stream."""
    torch = torch_cuda
    import aiocuda.torch as at

    model = torch.nn.Linear(256, 256).cuda()
    x = torch.randn(64, 256, device="cuda")

    async def main():
        with torch.no_grad():
            y = await asyncio.wait_for(aiocuda.gpu_op(model, x), 30)
            s = at.Stream()
            z = await asyncio.wait_for(aiocuda.gpu_op(model, x, stream=s), 30)
            return y, z, model(x)

    y, z, ref = run(main())
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(z, ref)


def test_gpu_op_refuses_mixed_devices(run, torch_cuda):
    """Tensors on two devices, or a stream of another device, are refused with what to do; CPU
    tensors beside CUDA ones are torch's business (a 0-dim CPU scalar is fine there)."""
    torch = torch_cuda

    async def main():
        got = await aiocuda.gpu_op(torch.add, torch.ones(1, device="cuda"), torch.tensor(2.0))
        assert got.device.type == "cuda" and got.item() == 3.0
        if torch.cuda.device_count() > 1:
            with pytest.raises(ValueError, match="different devices: cuda:0, cuda:1"):
                await aiocuda.gpu_op(torch.add, torch.ones(1, device="cuda:0"),
                                     torch.ones(1, device="cuda:1"))
            s1 = torch.cuda.Stream(device=1)
            with pytest.raises(ValueError, match="stream= says cuda:1"):
                await aiocuda.gpu_op(torch.neg, torch.ones(1, device="cuda:0"), stream=s1)

    run(main())


def test_gpu_op_with_a_device_without_index(run, torch_cuda):
    """Rule 9: device="cuda" (or torch.device("cuda")) names the tensors' device, as torch
    does; it is not a contradiction of cuda:0. A different index still is."""
    torch = torch_cuda
    x = torch.arange(4096, device="cuda", dtype=torch.float32)

    async def main():
        a = await asyncio.wait_for(aiocuda.gpu_op(torch.mul, x, 2, device="cuda"), 30)
        b = await asyncio.wait_for(aiocuda.gpu_op(torch.mul, x, 3, device=torch.device("cuda")),
                                   30)
        c = await asyncio.wait_for(aiocuda.gpu_op(torch.mul, x, 4, device="cuda:0"), 30)
        with pytest.raises(ValueError, match="cuda:1"):
            await aiocuda.gpu_op(torch.neg, x, device="cuda:1")
        return a, b, c

    a, b, c = run(main())
    for out, k in ((a, 2), (b, 3), (c, 4)):
        assert out.is_cuda
        torch.testing.assert_close(out, x * k)


def test_gpu_op_orders_the_callers_stream_after_fn_even_when_fn_raises(run, torch_cuda):
    """Rule 9: fn queues a ~0.3 s kernel and a write into its input on the side stream, then
    raises. The exception reaches the awaiter, and a read queued on the caller's stream
    afterwards still sees the write (the caller's stream waits for the side stream)."""
    torch = torch_cuda
    cycles = sleep_cycles(torch, 0.3)
    n = 1 << 20
    x = torch.zeros(n, device="cuda")

    class Boom(Exception):
        pass

    def fn(t):
        torch.cuda._sleep(cycles)
        t.fill_(7.0)
        raise Boom("fn failed after enqueuing work")

    async def main():
        with pytest.raises(Boom):
            await asyncio.wait_for(aiocuda.gpu_op(fn, x), 30)
        total = x.sum()  # on the caller's stream
        await asyncio.wait_for(aiocuda.wait(total), 30)
        after = await asyncio.wait_for(aiocuda.gpu_op(torch.add, x, 1), 30)  # still usable
        return total.item(), after.sum().item()

    total, after = run(main())
    assert total == 7.0 * n, "the caller's stream read the input before fn's queued write"
    assert after == 8.0 * n


@dataclasses.dataclass
class _Result:
    first: Any
    rest: dict[str, Any]


class _Bag(dict):  # a dict subclass, as model outputs often are
    pass


def test_gpu_op_outputs_nested_deeply_are_safe_on_the_callers_stream(run, torch_cuda):
    """Rule 9: fn returns tensors in a tuple inside a dict inside a list, in a dataclass (and a
    list in a dict in it) and in a dict subclass. The values are right, and each output is
    protected on the caller's stream (record_stream): reads queued there behind a ~0.3 s kernel,
    then the outputs freed, then same-size tensors allocated and overwritten on fn's stream,
    which would reuse unprotected memory at once; the reads still see fn's values."""
    torch = torch_cuda
    cycles = sleep_cycles(torch, 0.3)
    n = 1 << 20
    x = torch.ones(n, device="cuda")

    def fn(t):
        return [{"pair": (t + 1, t + 2)}, _Result(t + 3, {"deep": [t + 4]}), _Bag(last=t + 5)]

    async def main():
        s = torch.cuda.Stream()  # fn's stream: no free memory of its own but fn's outputs
        async with asyncio.timeout(30):  # (no task: nothing else keeps the outputs alive)
            out = await aiocuda.gpu_op(fn, x, stream=s)
        kinds = (type(out[1]), type(out[2]))
        leaves = [out[0]["pair"][0], out[0]["pair"][1], out[1].first, out[1].rest["deep"][0],
                  out[2]["last"]]
        torch.cuda._sleep(cycles)  # the caller's stream is busy for a while...
        sums = [leaf.sum() for leaf in leaves]  # ...so these reads run later
        del out, leaves
        with torch.cuda.stream(s):  # runs at once on the idle side stream
            scribble = [torch.full((n,), -1.0, device="cuda") for _ in range(5)]
        await asyncio.wait_for(aiocuda.synchronize(torch.cuda.current_stream()), 30)
        await asyncio.wait_for(aiocuda.synchronize(s), 30)
        del scribble
        return kinds, [v.item() for v in sums]

    kinds, sums = run(main())
    assert kinds == (_Result, _Bag)
    assert sums == [float(n * k) for k in (2, 3, 4, 5, 6)], (
        "an output was overwritten before the caller's stream read it: no record_stream")


def test_awaitable_stream_and_event(run, torch_cuda):
    """aiocuda.torch.Stream and its Event await their work; so does a plain torch.cuda.Event."""
    torch = torch_cuda
    import aiocuda.torch as at

    async def main():
        s = at.Stream()
        with torch.cuda.stream(s):
            torch.cuda._sleep(20_000_000)
            out = torch.ones(1 << 20, device="cuda").sum()
        ev = s.record_event()
        assert isinstance(ev, at.Event)
        await asyncio.wait_for(ev, 30)
        assert ev.query()
        plain = torch.cuda.Event()
        with torch.cuda.stream(s):
            torch.cuda._sleep(20_000_000)
        plain.record(s)
        await asyncio.wait_for(aiocuda.wait(plain), 30)  # any torch.cuda.Event, on any stream
        assert plain.query()
        await asyncio.wait_for(s, 30)
        return out.item()

    assert run(main()) == float(1 << 20)


def test_wait_on_a_cuda_tensor_and_a_graph_replay(run, torch_cuda):
    """wait() on a tensor returns it; replay() of a graph on the current device, five times."""
    torch = torch_cuda
    import aiocuda.torch as at

    static = torch.zeros(1024, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        static.add_(1)  # warm-up before capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static.add_(1)

    async def main():
        t = torch.arange(10, device="cuda") * 3
        assert await asyncio.wait_for(aiocuda.wait(t), 30) is t
        for _ in range(5):
            await asyncio.wait_for(at.replay(graph), 30)
        return static.sum().item()

    assert run(main()) == 1024 * 6


def test_replay_with_a_device_keyword(run, torch_cuda):
    """Rule 9: replay(graph, device=...) as an int, a string and a torch.device replays on that
    device's current stream and awaits it: the stream is idle once the await returns (the graph
    holds a ~0.15 s kernel)."""
    torch = torch_cuda
    import aiocuda.torch as at

    static = torch.zeros(1024, device="cuda:0")
    graph = capture_sleep_then_add(torch, static, sleep_cycles(torch, 0.15))

    async def main():
        idle = []
        for device in (0, "cuda:0", torch.device("cuda", 0)):
            await asyncio.wait_for(at.replay(graph, device=device), 30)
            idle.append(torch.cuda.current_stream(0).query())
        return idle, static.unique().tolist()

    idle, values = run(main())
    assert idle == [True, True, True]
    assert values == [3.0]


def test_wait_on_a_tensor_of_another_device(run, torch_cuda):
    """Rule 9 (two GPUs): a tensor on cuda:1, awaited while cuda:0 is current, waits on cuda:1's
    current stream (its default stream: handle 0, named with the tensor's device), not on
    device 0's: work queued there before the await has finished when it returns."""
    torch = torch_cuda
    need_devices(torch, 2)
    cycles = sleep_cycles(torch, 0.3, device=1)

    async def main():
        with torch.cuda.device(0):
            torch.zeros(1, device="cuda:0")  # device 0's context is current on the loop thread
            with torch.cuda.device(1):
                assert torch.cuda.current_stream().cuda_stream == 0
                t = torch.ones(1 << 20, device="cuda:1")
                torch.cuda._sleep(cycles)
                t.mul_(3)
                written = torch.cuda.Event()
                written.record()
            assert torch.cuda.current_device() == 0
            out = await asyncio.wait_for(aiocuda.wait(t), 30)
            return out is t, written.query(), torch.cuda.current_stream(1).query(), t.sum().item()

    same, written, idle, total = run(main())
    assert same and written and idle
    assert total == 3.0 * (1 << 20)


def test_replay_of_a_graph_of_another_device(run, torch_cuda):
    """Rule 9 (two GPUs): a graph captured on cuda:1, replayed while cuda:0 is current, with no
    device said and with device=1 / "cuda:1": each await returns only once cuda:1's current
    stream is idle (the graph holds a ~0.15 s kernel), and the graph ran three times."""
    torch = torch_cuda
    need_devices(torch, 2)
    import aiocuda.torch as at

    static = torch.zeros(1024, device="cuda:1")
    graph = capture_sleep_then_add(torch, static, sleep_cycles(torch, 0.15, device=1))

    async def main():
        idle = []
        with torch.cuda.device(0):
            torch.zeros(1, device="cuda:0")
            for kwargs in ({}, {"device": 1}, {"device": "cuda:1"}):
                await asyncio.wait_for(at.replay(graph, **kwargs), 30)
                idle.append(torch.cuda.current_stream(1).query())
        return idle, static.unique().tolist()

    idle, values = run(main())
    assert idle == [True, True, True]
    assert values == [3.0]


_COMPILED: dict[str, Any] = {}


def _compiled_mlp(torch: Any) -> dict[str, Any]:
    """A tiny MLP and torch.compile(mode="reduce-overhead") of it, built once per session (the
    first call compiles and is CUDA-graph trees' warm-up run); skips where it cannot build."""
    if not _COMPILED:
        if importlib.util.find_spec("triton") is None:
            _COMPILED["skip"] = "Triton is not installed: torch.compile's CUDA backend needs it"
        elif not hasattr(torch, "compile") or not hasattr(torch, "compiler"):
            _COMPILED["skip"] = f"torch {torch.__version__} has no torch.compile"
        else:
            try:
                dynamo = importlib.import_module("torch._dynamo")
                from torch._dynamo.utils import counters

                if not dynamo.is_dynamo_supported():
                    raise RuntimeError("torch._dynamo does not support this Python")
                skips = counters["inductor"]["cudagraph_skips"]
                torch.manual_seed(0)
                model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                            torch.nn.Linear(64, 64)).cuda().eval()
                compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True,
                                         dynamic=False)
                x = torch.randn(16, 64, device="cuda")
                with torch.no_grad():
                    torch.compiler.cudagraph_mark_step_begin()
                    compiled(x)
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - no compiler, no Triton build, ...
                _COMPILED["skip"] = (f"torch.compile(mode='reduce-overhead') cannot build here: "
                                     f"{type(exc).__name__}: {str(exc)[:300]}")
            else:
                if counters["inductor"]["cudagraph_skips"] != skips:
                    _COMPILED["skip"] = ("inductor chose not to use CUDA graphs for the model "
                                         "here (see its perf hints)")
                else:
                    _COMPILED.update(model=model, compiled=compiled, x=x, counters=counters)
    if "skip" in _COMPILED:
        pytest.skip(_COMPILED["skip"])
    return _COMPILED


def test_torch_compile_reduce_overhead_through_gpu_op(run, torch_cuda):
    """Rule 7: a torch.compile(mode="reduce-overhead") model (CUDA graphs: recorded on the
    first call here, replayed after) awaited through gpu_op four times equals the eager model,
    and inductor skipped no CUDA graph on gpu_op's side stream."""
    torch = torch_cuda
    c = _compiled_mlp(torch)
    model, compiled, x, counters = c["model"], c["compiled"], c["x"], c["counters"]
    skips = counters["inductor"]["cudagraph_skips"]

    async def main():
        outs = []
        with torch.no_grad():
            ref = model(x)
            for _ in range(4):
                torch.compiler.cudagraph_mark_step_begin()
                y = await asyncio.wait_for(aiocuda.gpu_op(compiled, x), 120)
                outs.append(y.clone())  # the next replay overwrites a CUDA-graph output
        return ref, outs

    ref, outs = run(main())
    for y in outs:
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == skips, "CUDA graphs were skipped under gpu_op"


# ---- torch.distributed ------------------------------------------------------------------------
def _nccl(torch: Any) -> Any:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("this PyTorch build has no NCCL")
    return dist


def test_nccl_all_reduce_is_awaited(run, torch_cuda, tmp_path):
    """Rule 8 (one rank): an all_reduce queued behind a ~0.2 s kernel and a write on the current
    stream is awaited: when the await returns, the write before it has completed (an event
    recorded there is done, and a copy on an unordered stream reads the value) and the result
    is the tensor itself; ten collectives gathered all return their right values."""
    torch = torch_cuda
    dist = _nccl(torch)
    cycles = sleep_cycles(torch, 0.2)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        async def main():
            n = 1 << 16
            t = torch.zeros(n, device="cuda")
            host = torch.empty(n, pin_memory=True)
            torch.cuda._sleep(cycles)
            t.fill_(2.0)
            written = torch.cuda.Event()
            written.record()
            out = await asyncio.wait_for(aiocuda.wait(dist.all_reduce(t, async_op=True)), 60)
            was_written = written.query()
            unordered = torch.cuda.Stream()  # waits for nothing: reads t as it is now
            with torch.cuda.stream(unordered):
                host.copy_(t, non_blocking=True)
            await asyncio.wait_for(aiocuda.synchronize(unordered), 30)
            works = [dist.all_reduce(torch.full((4,), float(i), device="cuda"), async_op=True)
                     for i in range(10)]
            many = await asyncio.wait_for(asyncio.gather(*(aiocuda.wait(w) for w in works)), 60)
            return (was_written, host.unique().tolist(), out[0].is_cuda,
                    out[0].data_ptr() == t.data_ptr(), [m[0].tolist() for m in many])

        was_written, seen, on_gpu, same, many = run(main())
        assert was_written and seen == [2.0]
        assert on_gpu and same
        assert many == [[float(i)] * 4 for i in range(10)]
    finally:
        dist.destroy_process_group()


def test_a_failing_nccl_collective_raises_from_the_await(gpu, tmp_path):
    """Rule 8 (in a child process: the failed group is not reusable): an all_reduce queued behind
    a 3 s kernel outlives its 1 s timeout; NCCL's watchdog marks it failed while it waits. The
    await returns once the work is done (not before: >= 1.5 s) and raises the collective's
    DistBackendError (aiocuda calls work.wait() after awaiting the handle)."""
    torch = pytest.importorskip("torch", reason="the NCCL test needs torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    _nccl(torch)
    out = run_child("nccl_timeout.py", str(tmp_path / "store"), timeout=90, env={
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0",  # the watchdog must not end the process
        "TORCH_NCCL_BLOCKING_WAIT": "0",  # (blocking wait runs no watchdog at all)
        "TORCH_NCCL_ENABLE_MONITORING": "0",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
        "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC": "100",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "0",  # no flight recorder to symbolize on the timeout
    })
    assert out["first"] == 2048.0, out
    assert out["error"] is not None, (
        "the await of a timed-out collective returned normally: the work's error was lost")
    name, mro, message = out["error"]
    assert "DistBackendError" in mro and "time" in message.lower(), out["error"]
    assert out["took"] >= 0.5 * out["sleep_s"], (
        f"the error surfaced {out['took']:.2f} s after the call, before the collective's work "
        f"({out['sleep_s']} s) was done")


# ---- TensorFlow -------------------------------------------------------------------------------
def test_tensorflow_gpu_tensor_is_awaited(run, gpu):
    """gpu_op and wait() on TensorFlow GPU tensors (a whole-device await)."""
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed")
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("TensorFlow sees no GPU (tensorflow-cpu, or no CUDA build)")

    async def main():
        with tf.device("/GPU:0"):
            a = tf.random.normal((1024, 1024))
        b = await asyncio.wait_for(aiocuda.gpu_op(tf.matmul, a, a), 60)
        assert "GPU" in b.device
        return await asyncio.wait_for(aiocuda.wait(b), 60) is b

    assert run(main())
