"""gpu_op, wait and aiocuda.torch with PyTorch on the CPU (the CUDA paths: tests/test_gpu.py)."""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install aiocuda[torch])")

import aiocuda  # noqa: E402
import aiocuda.torch as at  # noqa: E402
from aiocuda import _ops  # noqa: E402
from aiocuda._ops import Place  # noqa: E402

from . import loops  # noqa: E402
from .conftest import Ticker, python_subprocess  # noqa: E402


def test_gpu_op_runs_torch_cpu_work_off_the_loop(run_any):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
    x = torch.randn(8, 64)

    async def main():
        loop_thread = threading.get_ident()
        seen: list[int] = []

        async with Ticker(period=0.001) as ticker:

            def forward(m, batch):
                seen.append(threading.get_ident())
                # Waits without the GIL, as torch's kernels run, until the loop has run
                # another task 5 times.
                seen.append(ticker.reached.wait(5))
                with torch.no_grad():
                    return m(batch)

            y = await aiocuda.gpu_op(forward, model, x)
        return y, seen[0] != loop_thread, seen[1]

    y, off_loop, loop_ran = run_any(main())
    with torch.no_grad():
        assert torch.equal(y, model(x))
    assert off_loop
    assert loop_ran  # the loop ran other tasks meanwhile


def test_gpu_op_with_a_module_and_kwargs(run_any):
    model = torch.nn.Linear(4, 2)

    async def main():
        with torch.no_grad():
            return await aiocuda.gpu_op(model, input=torch.ones(3, 4))

    assert run_any(main()).shape == (3, 2)


def test_an_exception_reaches_the_awaiter_and_the_stream_stays_usable(run_any):
    async def main():
        s = at.Stream(device="cpu")
        with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
            await aiocuda.gpu_op(torch.mm, torch.ones(2, 3), torch.ones(2, 3), stream=s)
        out = await aiocuda.gpu_op(torch.mm, torch.ones(2, 3), torch.ones(3, 2), stream=s)
        assert out.sum().item() == 12
        assert aiocuda.statistics().pending == 0
        s.close()

    run_any(main())


def test_device_and_stream_must_agree_with_the_tensors(run_any):
    async def main():
        if not torch.cuda.is_available():  # host tensors may go to a device, if there is one
            # what to change is device= (found by review: it said to pass CPU tensors)
            for device in ("cuda:7", 7):
                with pytest.raises(aiocuda.AiocudaError,
                                   match=r"asked to run on cuda:7, but PyTorch sees no CUDA .*"
                                         r"pass device='cpu', or leave device= out"):
                    await aiocuda.gpu_op(torch.neg, torch.ones(1), device=device)
        with pytest.raises(ValueError, match="unknown device 'tpu'"):
            await aiocuda.gpu_op(torch.neg, torch.ones(1), device="tpu")
        with pytest.raises(ValueError, match="on meta: aiocuda runs torch's cpu and cuda"):
            await aiocuda.gpu_op(torch.neg, torch.ones(1, device="meta"))
        with pytest.raises(TypeError, match="stream= must be"):
            await aiocuda.gpu_op(torch.neg, torch.ones(1), stream="s0")
        with pytest.raises(TypeError, match="needs a callable"):
            await aiocuda.gpu_op(torch.ones(1))
        assert aiocuda.statistics().pending == 0

    run_any(main())


def test_device_tensors_may_not_be_contradicted(monkeypatch):
    on_gpu = object()  # stands for a tensor on GPU 0 (no GPU here)
    monkeypatch.setattr(_ops, "place_of", lambda v: Place("tf", 0) if v is on_gpu else None)
    with pytest.raises(ValueError, match="device= says cpu, but the tensors are on /GPU:0"):
        _ops.placement(None, (on_gpu,), {}, None, "cpu")
    with pytest.raises(ValueError, match="device= says /GPU:1, but the tensors are on /GPU:0"):
        _ops.placement(None, ([on_gpu],), {}, None, "/GPU:1")
    with pytest.raises(ValueError, match="stream= says cpu, but the tensors are on /GPU:0"):
        _ops.placement(None, (), {"x": on_gpu}, aiocuda.CpuStream(), None)
    assert _ops.placement(None, (on_gpu,), {}, None, "GPU:0") == Place("tf", 0)


def test_host_tensors_beside_device_tensors_run_on_the_device(monkeypatch):
    # torch allows CPU tensors beside CUDA ones (0-dim scalars; pack_padded_sequence's lengths
    # must be on the CPU): they were refused as "different devices", with advice that could not
    # be followed. Two devices still conflict.
    cuda0, cuda1 = (Place("torch", torch.device("cuda", i)) for i in (0, 1))
    on0, on1 = object(), object()  # stand for tensors on cuda:0 and cuda:1 (no GPU here)
    real = _ops.place_of
    monkeypatch.setattr(_ops, "place_of",
                        lambda v: cuda0 if v is on0 else cuda1 if v is on1 else real(v))
    lengths = torch.tensor([3])
    assert real(lengths) == _ops.CPU
    for device in (None, "cuda:0", "cuda"):
        assert _ops.placement(None, (on0, lengths), {}, None, device) == cuda0
    assert _ops.placement(None, (torch.tensor(2.0), [on0]), {}, None, None) == cuda0
    with pytest.raises(ValueError, match="different devices: cuda:0, cuda:1; move them"):
        _ops.placement(None, (on0, lengths, on1), {}, None, None)


def test_gpu_op_finds_the_tensors_at_any_depth(monkeypatch):
    # One level deep only, a CUDA tensor in [[t]] or {"ids": [t]} sent fn to a cpu worker: its
    # await then ended when fn returned, before its kernels had run.
    from collections import UserDict
    from dataclasses import dataclass

    @dataclass
    class Batch:
        x: object

    on_gpu = object()  # stands for a tensor on GPU 0 (no GPU here)
    monkeypatch.setattr(_ops, "place_of", lambda v: Place("tf", 0) if v is on_gpu else None)
    loop: list[object] = [on_gpu]
    loop.append(loop)  # a list holding itself is walked once
    for arg in ([[on_gpu]], {"ids": [on_gpu]}, UserDict(x=on_gpu), Batch({"y": (on_gpu,)}),
                frozenset([on_gpu]), loop):
        assert _ops.placement(None, (1, arg), {}, None, None) == Place("tf", 0), arg
        assert _ops.placement(None, (), {"batch": arg}, None, None) == Place("tf", 0), arg
    assert _ops.placement(None, ([[1]], {"a": "text"}), {}, None, None) == _ops.CPU


def test_gpu_op_finds_the_tensors_in_containers_registered_with_torchs_pytree(monkeypatch):
    # A KV cache object registered with pytree, holding the only device tensors: fn ran on a cpu
    # worker, and its await ended when fn returned, before its kernels had run.
    import torch.utils._pytree as pytree

    class Cache:
        def __init__(self, k: object) -> None:
            self.k = k

    pytree.register_pytree_node(Cache, lambda c: ([c.k], None), lambda xs, _: Cache(xs[0]))
    try:
        on_gpu = object()  # stands for a tensor on GPU 0 (no GPU here)
        monkeypatch.setattr(_ops, "place_of", lambda v: Place("tf", 0) if v is on_gpu else None)
        assert _ops.placement(None, (Cache(on_gpu),), {}, None, None) == Place("tf", 0)
        assert _ops.placement(None, (Cache(1),), {}, None, None) == _ops.CPU
    finally:
        pytree._deregister_pytree_node(Cache)


def test_device_is_checked_against_a_torch_streams_device(monkeypatch):
    # device= beside a stream that says its device (a torch.cuda.Stream) must agree with it;
    # only beside a stream that does not (a handle, __cuda_stream__) does it name the device.
    torch_stream = object()  # stands for a torch.cuda.Stream on cuda:0 (no GPU here)
    own = _ops._stream_place
    monkeypatch.setattr(_ops, "_stream_place", lambda s: Place("torch", torch.device("cuda", 0))
                        if s is torch_stream else own(s))
    with pytest.raises(ValueError, match="cuda:0.*cuda:1"):
        _ops.placement(torch.neg, (torch.ones(1),), {}, torch_stream, "cuda:1")
    assert _ops.placement(torch.neg, (torch.ones(1),), {}, 7, "cuda:1") == Place("stream")
    # With no device tensor, the conflict is between the two arguments (the message said "the
    # tensors are on cuda:1" for a call with none: review).
    with pytest.raises(ValueError, match="stream= says cuda:0, but device= says cuda:1"):
        _ops.placement(int, (), {}, torch_stream, 1)
    with pytest.raises(ValueError, match="stream= says cuda:0, but device= says cpu"):
        _ops.placement(int, (torch.ones(1),), {}, torch_stream, "cpu")
    with pytest.raises(ValueError, match="stream= says cpu, but device= says cuda:1"):
        _ops.placement(int, (), {}, aiocuda.CpuStream(), "cuda:1")
    cuda0 = Place("torch", torch.device("cuda", 0))
    assert _ops.placement(int, (), {}, torch_stream, "cuda") == cuda0  # "cuda": any device
    assert _ops.placement(int, (), {}, torch_stream, "cuda:0") == cuda0
    assert _ops.placement(int, (torch.ones(1),), {}, torch_stream, None) == cuda0


def test_a_device_without_an_index_names_the_tensors_device(monkeypatch):
    on_gpu1 = object()  # stands for a tensor on cuda:1 (no GPU here)
    cuda1 = Place("torch", torch.device("cuda", 1))
    monkeypatch.setattr(_ops, "place_of", lambda v: cuda1 if v is on_gpu1 else None)
    assert _ops.placement(None, (on_gpu1,), {}, None, "cuda") == cuda1
    assert _ops.placement(None, (on_gpu1,), {}, None, torch.device("cuda")) == cuda1
    assert _ops.placement(None, (on_gpu1,), {}, None, "cuda:1") == cuda1
    with pytest.raises(ValueError, match="device= says cuda:0, but the tensors are on cuda:1"):
        _ops.placement(None, (on_gpu1,), {}, None, "cuda:0")


def test_tensors_are_found_at_any_depth():
    from collections import UserDict, namedtuple
    from dataclasses import dataclass

    @dataclass
    class Output:
        logits: torch.Tensor
        extra: object = None

    class Config(dict):  # a dict subclass, which torch's pytree keeps whole
        pass

    Pair = namedtuple("Pair", "a b")
    t = [torch.zeros(1) for _ in range(8)]
    loop: list[object] = [t[7]]
    loop.append(loop)  # a list holding itself is walked once
    tree = [{"a": (t[0], [t[1]])}, Output(t[2], Config(x=(t[3],))), UserDict(y=t[4]),
            Pair(t[5], "text"), {t[6]}, loop, 3, None]
    assert sorted(id(x) for x in at._tensors(tree)) == sorted(id(x) for x in t)


def test_the_cuda_paths_walk_looks_over_a_list_of_scalars_at_once(monkeypatch):
    # gpu_op's CUDA path walks its arguments and result for the tensors to tie to the streams:
    # a million token ids were visited one at a time on the loop thread (1.7 s; the placement
    # walk before it skips such a list in C; found by review).
    ids = list(range(100_000))
    x = torch.zeros(1)
    visited = 0
    children = at._children

    def counted(node):  # type: ignore[no-untyped-def]
        nonlocal visited
        visited += 1
        return children(node)

    monkeypatch.setattr(at, "_children", counted)
    assert [id(t) for t in at._tensors(((x, ids, ["text", 1.5]), {"ids": ids}))] == [id(x)]
    assert visited < 10, visited


def test_a_module_among_the_arguments_or_behind_fn_decides_the_path():
    # Only a module passed as fn itself was looked at: gpu_op(step, model, x),
    # gpu_op(model.forward, x) and gpu_op(partial(step, model), x) sent a CUDA model's call to a
    # cpu worker, whose await then ended before its kernels had run. A module on "meta" (a
    # device aiocuda refuses) shows where it was looked at.
    import functools

    model = torch.nn.Linear(2, 2, device="meta")
    x = torch.zeros(1, 2)

    def step(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        return m(batch)

    for fn, args in ((model, (x,)), (step, (model, x)), (model.forward, (x,)),
                     (functools.partial(step, model), (x,)), (step, ([model], x))):
        with pytest.raises(ValueError, match="a torch tensor on meta"):
            _ops.placement(fn, args, {}, None, None)
    assert _ops.placement(step, (torch.nn.Linear(2, 2), x), {}, None, None) == _ops.CPU


def test_only_a_module_or_tensor_behind_fn_counts(monkeypatch):
    # Anything else behind fn is not looked into: a bound method of an array of another
    # library (jax's x.block_until_ready), of a proxy that has every attribute, or of a large
    # cache (walking it held the loop) runs as before.
    class Foreign:  # a DLPack-capable array of a library aiocuda does not know
        def __dlpack__(self):  # pragma: no cover - never called
            raise AssertionError

        def block_until_ready(self) -> None:  # pragma: no cover
            pass

    class Proxy:  # an RPC proxy: every attribute exists
        def __getattr__(self, name: str) -> object:
            return lambda *a: None

    looked: list[object] = []
    monkeypatch.setattr(_ops, "place_of", lambda v: looked.append(v))
    cache = {i: [torch.zeros(1)] for i in range(1000)}
    for fn in (Foreign().block_until_ready, Proxy().compute, cache.get):
        assert _ops.placement(fn, (5,), {}, None, None) == _ops.CPU
    assert looked == []
    t = torch.zeros(2)
    assert _ops.placement(t.add, (1,), {}, None, None) == _ops.CPU
    assert looked == [t]  # a tensor's own method: the tensor counts


def test_plain_values_are_not_looked_at_one_by_one(monkeypatch):
    # Each element of every list went through place_of on the loop thread: gpu_op(sum, a list
    # of a million ints) held the loop 1.35 s for 4 ms of work. Scalars are skipped by type, a
    # list of them as a whole; a tensor among them is still found.
    looked: list[object] = []
    on_gpu = object()  # stands for a tensor on GPU 0 (no GPU here)

    def place_of(v: object) -> Place | None:
        looked.append(v)
        return Place("tf", 0) if v is on_gpu else None

    monkeypatch.setattr(_ops, "place_of", place_of)
    ids = list(range(100_000))
    rows = [[0.5] * 16 for _ in range(1000)]
    assert _ops.placement(sum, (ids, rows, {"text": "a", "n": 1.5}, (None, True, b"x")), {},
                          None, None) == _ops.CPU
    assert looked == []
    assert _ops.placement(sum, ([1, "a", [2.0, on_gpu]],), {}, None, None) == Place("tf", 0)


def test_gpu_op_on_a_cpu_worker_keeps_the_callers_torch_modes_and_contextvars(run_any):
    # torch keeps grad, inference and autocast modes per thread: fn on a cpu worker ran with
    # the worker's defaults (its output required grad under no_grad; float32 under autocast),
    # and without the caller's contextvars, unlike the same program on a GPU (fn on the loop
    # thread). It now runs as it would on the caller's thread.
    import contextvars

    request = contextvars.ContextVar("request", default="unset")

    def probe(x: torch.Tensor) -> tuple[object, ...]:
        y = x * 2
        return (torch.is_grad_enabled(), y.requires_grad, y.is_inference(), (x @ x).dtype,
                request.get())

    async def main():
        request.set("request-1")
        x = torch.ones(2, 2, requires_grad=True)
        out = {"plain": (probe(x), await aiocuda.gpu_op(probe, x))}
        with torch.no_grad():
            out["no_grad"] = (probe(x), await aiocuda.gpu_op(probe, x))
        with torch.inference_mode():
            out["inference_mode"] = (probe(x), await aiocuda.gpu_op(probe, x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["autocast"] = (probe(x), await aiocuda.gpu_op(probe, x))
        with torch.inference_mode(), torch.enable_grad():
            out["inference_mode, enable_grad"] = (probe(x), await aiocuda.gpu_op(probe, x))
        # The default device, per thread too (on a GPU machine, "cuda" gave CPU tensors).
        with torch.device("meta"):
            out["default device"] = (torch.zeros(1).device,
                                     (await aiocuda.gpu_op(torch.zeros, 1)).device)
        try:
            torch.set_default_device("meta")
            out["set_default_device"] = (torch.ones(1).device,
                                         (await aiocuda.gpu_op(torch.ones, 1)).device)
        finally:
            torch.set_default_device(None)
        # A call that turns grad off on its worker leaves the next call as its caller is.
        with aiocuda.CpuStream() as s:
            await aiocuda.gpu_op(torch.set_grad_enabled, False, stream=s)
            out["after a call set grad off"] = (probe(x), await aiocuda.gpu_op(probe, x, stream=s))
        return out

    out = run_any(main())
    for name, (direct, via_worker) in out.items():
        assert via_worker == direct, name
    assert out["autocast"][1][3] == torch.bfloat16 and out["no_grad"][1][1] is False
    assert out["default device"][1].type == "meta"


def test_an_unsupported_framework_array_is_refused(run_any):
    class Foreign:  # a DLPack-capable array from a framework aiocuda does not know
        def __dlpack__(self):  # pragma: no cover - never called
            raise AssertionError

    async def main():
        with pytest.raises(TypeError, match="cannot tell where a .*Foreign runs"):
            await aiocuda.gpu_op(lambda a: a, Foreign())
        with aiocuda.CpuStream() as s:  # saying where it runs is enough
            assert isinstance(await aiocuda.gpu_op(lambda a: a, Foreign(), stream=s), Foreign)

    run_any(main())


def test_cuda_stream_without_cuda_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(aiocuda.AiocudaError, match=r"Stream\(device='cpu'\)"):
        at.Stream()
    with pytest.raises(aiocuda.AiocudaError, match=r"Stream\(device='cpu'\)"):
        at.Stream(device=5)  # a CUDA ordinal: torch's own RuntimeError before


def test_an_event_without_cuda_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # torch's own error was "Tried to instantiate dummy base class Event"
    with pytest.raises(aiocuda.AiocudaError, match=r"aiocuda.torch.Event is a CUDA event.*"
                                                   r"Stream\(device='cpu'\).record_event\(\)"):
        at.Event()


@pytest.mark.parametrize("device", ["mps", "meta", torch.device("xpu")])
def test_a_stream_on_a_device_that_is_not_cuda_says_what_to_do(device):
    # Whether or not the machine has CUDA: the message is about the device asked for.
    with pytest.raises(ValueError, match=r"no '(mps|meta|xpu)' streams.*device='cpu'"):
        at.Stream(device=device)


def test_cpu_stream_has_torch_stream_methods(run_any):
    async def main():
        order: list[str] = []
        a, b = at.Stream(device="cpu"), at.Stream(device="cpu")
        assert isinstance(a, at.CpuTorchStream) and a.device == torch.device("cpu")
        a.submit(lambda: (time.sleep(0.05), order.append("a")))
        b.wait_stream(a)  # b's later work waits for a's work so far
        b.submit(order.append, "b")
        ev = b.record_event()
        assert not ev.query() and not b.query() and a.priority == 0
        await ev
        assert ev.query() and order == ["a", "b"] and b.query()
        a.submit(time.sleep, 0.02)
        a.synchronize()  # blocks, like torch.cuda.Stream.synchronize
        await a  # and awaiting never does
        b.close()
        a.close()

    run_any(main())


def test_a_cpu_torch_event_says_which_stream_it_makes_wait():
    # event.wait() with no stream (torch's current stream) or None was an AttributeError
    # ('NoneType' object has no attribute 'wait_event'), not the message record() gives.
    ev, s = at.CpuTorchEvent(), at.Stream(device="cpu")
    for call in (lambda: ev.wait(), lambda: ev.wait(None)):
        with pytest.raises(TypeError, match=r"needs the CpuTorchStream to make wait"):
            call()
    with pytest.raises(TypeError, match=r"wait\(\) needs a CpuTorchStream, got CpuStream"):
        ev.wait(aiocuda.CpuStream())
    ev.wait(s)  # never recorded: nothing to wait for
    s.close()


def test_with_on_a_cpu_torch_stream_keeps_it_open(run):
    # For a torch stream `with s:` makes s current; it closed the CpuTorchStream, whose next use
    # then failed with "the CpuStream is closed".
    async def main():
        s = at.Stream(device="cpu")
        with s as entered:
            assert entered is s
        assert not s.closed
        assert (await aiocuda.gpu_op(torch.ones, 2, stream=s)).tolist() == [1.0, 1.0]
        async with s:  # aiocuda's: closes once the work has run
            s.submit(time.sleep, 0.01)
        assert s.closed

    run(main())


def test_a_cpu_event_recorded_outside_the_loop_can_be_awaited(run_any):
    s = at.Stream(device="cpu")
    s.delay(0.05)
    ev = at.CpuTorchEvent()
    ev.record(s)  # no loop running here

    async def main():
        t0 = time.perf_counter()
        await aiocuda.wait(ev)
        return time.perf_counter() - t0

    assert run_any(main()) > 0.02 and ev.query()
    ev.synchronize()
    with pytest.raises(TypeError, match="has no current stream"):
        at.CpuTorchEvent().record()  # torch.cuda.Event.record()'s current stream: none here
    s.close()


def test_a_cpu_event_awaited_after_another_that_timed_out_does_not_wait_for_it(run_any):
    # Events recorded outside a loop were all awaited through one shared stream: a wait that
    # timed out on a slow event stayed queued there, and a later await of an event done long
    # before waited for the slow one's work too (seconds).
    a, b = at.Stream(device="cpu"), at.Stream(device="cpu")
    a.delay(5.0)
    slow = a.record_event()
    fast = b.record_event()  # nothing before it: done at once

    async def main():
        with pytest.raises(TimeoutError):  # asyncio's, or trio's TooSlowError turned into it
            await loops.wait_for(aiocuda.wait(slow), 0.05)
        await aiocuda.wait(fast)
        return slow.query()

    assert run_any(main()) is False  # fast's await ended while slow's work still ran
    a.close()
    b.close()


def test_wait_on_torch_objects(run_any):
    async def main():
        t = torch.arange(4)
        assert await aiocuda.wait(t) is t  # CPU tensors are already computed
        fut = torch.futures.Future()
        threading.Timer(0.01, fut.set_result, [7]).start()
        assert await aiocuda.wait(fut) == 7
        # then() and a work handle's get_future() give torch._C.Future, the base of
        # torch.futures.Future: refused as "cannot wait on torch.Future" before.
        chained = fut.then(lambda f: f.value() + 1)
        assert not isinstance(chained, torch.futures.Future)
        assert await aiocuda.wait(chained) == 8
        failing = torch.futures.Future()
        threading.Timer(0.01, failing.set_exception, [ValueError("collective failed")]).start()
        with pytest.raises(ValueError, match="collective failed"):
            await aiocuda.wait(failing)
        with pytest.raises(TypeError, match="cannot wait on builtins.object"):
            await aiocuda.wait(object())

    run_any(main())


def test_a_torch_futures_exception_reaches_the_awaiter_as_it_was_raised(run_any):
    class Coded(Exception):  # its message is made from another argument
        def __init__(self, code: int = 0) -> None:
            super().__init__(f"error code {code}")
            self.code = code

    async def main():
        for exc in (Coded(7), ValueError("plain")):
            fut = torch.futures.Future()
            fut.set_exception(exc)
            with pytest.raises(type(exc)) as caught:
                await aiocuda.wait(fut)
            assert str(caught.value) == str(exc)

    run_any(main())


def test_blocking_waits_never_queue_behind_other_blocking_waits(run_any):
    # Past 16 blocking waits in progress (gloo receives without a future), a wait whose result
    # was ready sat behind one of them: a receive whose sender first waits for a later message
    # hung. Each gets a thread of its own; those past 16 are let go when their wait ends.
    release = threading.Event()
    waiters = at._waiters

    async def main():
        held = [waiters.call(release.wait, 30) for _ in range(20)]
        assert await loops.wait_for(waiters.call(int, "5"), 10) == 5
        release.set()
        assert all(await loops.gather(*held))

    try:
        run_any(main())
    finally:
        release.set()
    assert len(waiters.streams) <= at._EVENT_WAITERS


def test_waits_given_up_on_a_torch_future_share_one_callback(run_any):
    # A torch future cannot drop a done callback: each wait given up (a timeout in a retry loop)
    # left one behind, with its future, until the torch future completed (0.9 KB a retry).
    import gc

    def futures_alive() -> int:
        gc.collect()
        return sum(type(o).__name__ in ("Future", "TrioFuture") for o in gc.get_objects())

    async def main():
        fut = torch.futures.Future()
        before = futures_alive()
        for _ in range(50):
            with pytest.raises((TimeoutError, asyncio.TimeoutError)):
                await loops.wait_for(aiocuda.wait(fut), 0.001)
        kept = futures_alive() - before
        threading.Timer(0.01, fut.set_result, [5]).start()
        assert await loops.wait_for(aiocuda.wait(fut), 5) == 5
        assert await aiocuda.wait(fut) == 5
        return kept

    assert run_any(main()) <= 2


def test_wait_on_device_generic_torch_streams_and_events(run_any):
    # torch.Stream and torch.Event: refused as "cannot wait on torch.Stream", while the message
    # said aiocuda.wait takes a torch Stream and Event.
    async def main():
        assert await aiocuda.wait(torch.Stream("cpu")) is None  # cpu work is done on return
        if hasattr(torch, "Event"):
            assert await aiocuda.wait(torch.Event("cpu")) is None

    run_any(main())

    class OnCuda(torch.Stream):  # device-generic, of an accelerator (torch.accelerator's)
        device = property(lambda self: torch.device("cuda", 0))

    async def other():
        with pytest.raises(TypeError, match=r"torch.Stream on the cpu only.*on 'cuda': pass a "
                                            r"torch.cuda.Stream"):
            await aiocuda.wait(OnCuda("cpu"))

    run_any(other())


def test_a_work_handle_without_a_future_is_waited_for_off_the_loop(run_any, monkeypatch):
    # gloo's send, recv and reduce_scatter handles: aiocuda.wait raised "Work::getFuture not
    # implemented." after the operation had started.
    class Work:
        def __init__(self, error: Exception | None = None) -> None:
            self.error, self.waits, self.release = error, 0, threading.Event()

        def get_future(self) -> torch.futures.Future:
            raise RuntimeError("Work::getFuture not implemented.")

        def wait(self) -> bool:  # blocks without the GIL, as torch's does
            self.waits += 1
            assert self.release.wait(10)
            if self.error is not None:
                raise self.error
            return True

    monkeypatch.setattr(at, "_work_type", lambda: Work)

    async def main():
        async with Ticker(period=0.001) as ticker:
            work = Work()
            with pytest.raises(TimeoutError):  # cancelled: the wait goes on on its worker
                await loops.wait_for(aiocuda.wait(work), 0.05)
            threading.Timer(0.1, work.release.set).start()
            before = ticker.ticks
            assert await aiocuda.wait(work) is None  # the first wait's outcome
            assert ticker.ticks - before >= 5  # the loop ran meanwhile
        assert work.waits == 1  # a second wait() of a send or recv waits for another transfer
        failing = Work(RuntimeError("Timed out waiting 1800000ms for recv operation"))
        failing.release.set()
        with pytest.raises(RuntimeError, match="Timed out waiting"):
            await aiocuda.wait(failing)

    run_any(main())


def test_failed_waits_are_not_kept_and_a_work_handles_waits_share_a_future(run_any, monkeypatch):
    # A failed torch future, or a failed handle without one, was kept for ever by aiocuda's own
    # maps (the exception's traceback held the key); and get_future() makes a new wrapper at each
    # call, so waits given up on one work handle shared nothing.
    import gc
    import weakref

    class Work:
        def __init__(self, future: bool = True) -> None:
            self.futures, self.done = 0, torch.futures.Future()
            self.has_future = future

        def get_future(self) -> torch.futures.Future:
            if not self.has_future:
                raise RuntimeError("Work::getFuture not implemented.")
            self.futures += 1
            return self.done.then(lambda f: f.value())  # a new future at each call

        def wait(self) -> bool:  # done by then where there is a future
            if not self.has_future:
                raise RuntimeError("recv failed")
            return True

    monkeypatch.setattr(at, "_work_type", lambda: Work)

    async def main():
        failed = torch.futures.Future()
        failed.set_exception(ValueError("collective failed"))
        with pytest.raises(ValueError, match="collective failed"):
            await aiocuda.wait(failed)
        no_future = Work(future=False)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="recv failed"):
                await aiocuda.wait(no_future)
        kept = [weakref.ref(failed), weakref.ref(no_future)]
        work = Work()
        for _ in range(5):
            with pytest.raises((TimeoutError, asyncio.TimeoutError)):
                await loops.wait_for(aiocuda.wait(work), 0.001)
        work.done.set_result(3)
        assert await loops.wait_for(aiocuda.wait(work), 5) == 3
        return kept, work.futures

    kept, futures = run_any(main())
    gc.collect()
    assert [ref() for ref in kept] == [None, None]
    assert futures == 1


def test_waiting_on_torch_objects_imports_no_functional_collectives():
    r = python_subprocess(
        "import asyncio, sys, torch, aiocuda, aiocuda.torch\n"
        "assert asyncio.run(aiocuda.wait(torch.ones(1))).tolist() == [1.0]\n"
        "assert 'torch.distributed._functional_collectives' not in sys.modules\n"
    )
    assert r.returncode == 0, r.stderr


def test_replay_needs_a_graph(run_any):
    async def main():
        with pytest.raises(TypeError, match="needs a torch.cuda.CUDAGraph"):
            await at.replay(object())

    run_any(main())


@pytest.mark.parametrize("module, extra", [("aiocuda.torch", "aiocuda[torch]"),
                                           ("aiocuda.tensorflow", "aiocuda[tensorflow]")])
def test_a_missing_framework_names_the_extra(module, extra):
    top = module.split(".")[1]
    r = python_subprocess(
        "import sys\n"
        f"sys.modules[{top!r}] = None  # as if it were not installed\n"
        f"import {module}\n"
    )
    assert r.returncode != 0
    assert "ImportError" in r.stderr and f"pip install '{extra}'" in r.stderr, r.stderr


class FakeStream:
    """A torch.cuda.Stream stand-in carrying an emulator stream (the torch CPU build has none)."""

    def __init__(self, emu, name: str, log: list[str]) -> None:
        self.name, self.cuda_stream, self.log = name, emu.stream(), log
        self.device = torch.device("cuda", 0)

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(f"{self.name} waits for {other.name}")


@pytest.fixture
def fake_cuda(emu, monkeypatch):
    """gpu_op's torch CUDA path on the driver emulator: torch's stream functions stood in for
    by FakeStreams; returns (caller, side, log, current): the caller's current stream, the
    pooled side stream, what happened in order, the stack of current streams."""
    log: list[str] = []
    caller, side = FakeStream(emu, "caller", log), FakeStream(emu, "side", log)
    current: list[FakeStream] = [caller]

    class StreamContext:
        def __init__(self, s: FakeStream) -> None:
            self.s = s

        def __enter__(self) -> None:
            current.append(self.s)

        def __exit__(self, *exc: object) -> None:
            current.pop()

    monkeypatch.setattr(at.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(at.torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(at.torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(at, "_pooled", lambda device: side)
    return caller, side, log, current


@pytest.mark.parametrize("fn_raises", [False, True])
def test_the_cuda_path_orders_streams_and_awaits_the_side_stream(run_any, emu, fake_cuda, fn_raises):
    caller, side, log, current = fake_cuda

    def kernel(n: int) -> int:
        log.append(f"fn runs on {current[-1].name}")
        emu.sleep(current[-1].cuda_stream, 0.1)  # device work enqueued by fn
        if fn_raises:
            raise KeyError("after enqueuing work")
        return n + 1

    async def main():
        t0 = time.perf_counter()
        out = await at.run_on_cuda(kernel, (41,), {}, torch.device("cuda", 0), None)
        return out, time.perf_counter() - t0

    if fn_raises:  # the work fn enqueued still runs: the caller's later work comes after it
        with pytest.raises(KeyError, match="after enqueuing work"):
            run_any(main())
    else:
        out, took = run_any(main())
        assert out == 42 and took >= 0.09  # awaited the side stream's work
    assert log == ["side waits for caller", "fn runs on side", "caller waits for side"]


@pytest.mark.parametrize("capturing", ["caller", "side"])
def test_the_cuda_path_refuses_a_capture_before_fn_runs(run, emu, fake_cuda, capturing):
    # The side stream would join a capture on the caller's stream through wait_stream, and fn
    # would add its work to the graph; then the await is refused. A retry would capture fn twice:
    # the refusal comes first, with nothing done on either stream.
    caller, side, log, _ = fake_cuda
    s = caller if capturing == "caller" else side
    ran: list[int] = []

    async def main():
        emu.lib.cuCtxSetCurrent(emu.primary())
        assert emu.lib.cuStreamBeginCapture_v2(ctypes.c_void_p(s.cuda_stream), 0) == 0
        try:
            with pytest.raises(aiocuda.AiocudaError, match="capturing a CUDA graph"):
                await at.run_on_cuda(ran.append, (1,), {}, torch.device("cuda", 0), None)
        finally:
            graph = ctypes.c_void_p()
            rc = emu.lib.cuStreamEndCapture(ctypes.c_void_p(s.cuda_stream), ctypes.byref(graph))
            if graph.value:
                emu.lib.cuGraphDestroy(graph)
            emu.lib.cuCtxSetCurrent(None)
        assert rc == 0  # the refusal left the capture valid
        assert ran == [] and log == []
        await at.run_on_cuda(ran.append, (2,), {}, torch.device("cuda", 0), None)  # after it: runs
        assert ran == [2]

    run(main())


class DefaultStream:
    """What torch reports for the default stream of cuda:`index`: handle 0, with its device."""

    def __init__(self, index: int) -> None:
        self.cuda_stream, self.device_index = 0, index
        self.device = torch.device("cuda", index)


class OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (the torch CPU build has no CUDA tensors)."""

    is_cuda = True

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 1)


@pytest.fixture
def device1_busy(emu, monkeypatch):
    """Two emulated GPUs, device 0 current on the loop thread, torch's CUDA queries stood in for;
    calling it queues `seconds` of work on device 1's default stream."""
    monkeypatch.setattr(at.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(at.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(at.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(at.torch.cuda, "current_stream", lambda device=None: DefaultStream(
        device if isinstance(device, int) else getattr(device, "index", None) or 0))

    def busy(seconds: float) -> None:
        emu.lib.cuCtxSetCurrent(emu.primary(1))
        emu.sleep(0, seconds)
        emu.lib.cuCtxSetCurrent(emu.primary(0))

    emu.lib.cuCtxSetCurrent(emu.primary(0))
    yield busy
    emu.lib.cuCtxSetCurrent(None)


async def _took(aw) -> float:
    t0 = time.perf_counter()
    await aw
    return time.perf_counter() - t0


def test_default_stream_waits_go_to_the_tensors_device(run_any, device1_busy, monkeypatch):
    # Each of these waits on handle 0 of cuda:1 while cuda:0 is current: if it went to the
    # current device instead, it would end at once, before device 1's work.
    class Work:
        waited_after: float | None = None

        def get_future(self) -> torch.futures.Future:
            fut = torch.futures.Future()
            fut.set_result([torch.Tensor._make_subclass(OnCuda1, torch.ones(2))])
            return fut

        def wait(self) -> bool:
            self.waited_after = time.perf_counter() - t0
            return True

    monkeypatch.setattr(at, "_work_type", lambda: Work)
    x = torch.Tensor._make_subclass(OnCuda1, torch.ones(2))

    async def main():
        nonlocal t0
        device1_busy(0.1)
        assert await _took(aiocuda.wait(x)) >= 0.09  # a tensor on cuda:1
        device1_busy(0.1)
        work, t0 = Work(), time.perf_counter()
        out = await aiocuda.wait(work)  # a work handle whose result is on cuda:1
        assert out[0].is_cuda and work.waited_after is not None and work.waited_after >= 0.09
        # Its future alone (NCCL completes it at enqueue): the value's device is awaited too
        # (found by review: it returned at once, the collective still running).
        device1_busy(0.1)
        assert await _took(aiocuda.wait(Work().get_future())) >= 0.09

    t0 = 0.0
    run_any(main())


def test_replay_waits_on_the_graphs_device(run_any, device1_busy, monkeypatch):
    class Graph:  # stands for a graph captured on cuda:1: torch replays it there
        def replay(self) -> None:
            device1_busy(0.1)

    monkeypatch.setattr(at.torch.cuda, "CUDAGraph", Graph)

    async def main():
        assert await _took(at.replay(Graph(), device=1)) >= 0.09
        assert await _took(at.replay(Graph(), device="cuda:1")) >= 0.09
        # No device said, two GPUs: every GPU's current stream is awaited, never too early.
        assert await _took(at.replay(Graph())) >= 0.09
        with pytest.raises(ValueError, match="not a CUDA device"):
            await at.replay(Graph(), device="cpu")

    run_any(main())


def test_a_collectives_error_surfaces_after_the_await(run_any, monkeypatch):
    class Work:  # torch.distributed reports a failed or timed-out collective from wait()
        def get_future(self) -> torch.futures.Future:
            fut = torch.futures.Future()
            fut.set_result([torch.ones(1)])
            return fut

        def wait(self) -> bool:
            raise RuntimeError("collective timed out after 1800000 ms")

    monkeypatch.setattr(at, "_work_type", lambda: Work)

    async def main():
        with pytest.raises(RuntimeError, match="timed out"):
            await aiocuda.wait(Work())

    run_any(main())
