"""Property-based fuzzing of every public entry point (hypothesis), in a process of its own so
that a crash (a segfault, an abort) is caught by the parent instead of ending the test run.

    python -m tests.stress.fuzz --group streams|cpu_stream|gpu_op|module --loop asyncio|uvloop
        [--seed N]

Seeded (--seed, else AIOCUDA_STRESS_SEED, else 20240611; 0 draws one at random), with no example
database: the same seed tries the same inputs, so a failure is replayed from the seed the run
prints first (and reports in its result).

The property: every call either works or raises TypeError, ValueError or AiocudaError (CudaError
included) with a message; a future or coroutine it returns completes (3 s at most) with a result,
one of those errors, or exactly what the user's function raised (a StopIteration arrives as a
RuntimeError caused by it); nothing is reported to the loop's exception handler. Raw CUstream
handles are drawn from real (emulated) streams, 0, 1, 2 and out-of-range values only: any other
handle is undefined behaviour in the driver (the emulator aborts), as README says. Delays are
short or invalid: a valid long delay would only hold the stream. ``Event`` is reached through
``record()``: constructing one by hand is not public API.
Prints one STRESS-RESULT JSON line: per entry point, "ok" or the falsifying example.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import pathlib
import random
import traceback
from decimal import Decimal
from fractions import Fraction
from typing import Any

if __name__ == "__main__" and "AIOCUDA_LIBCUDA" not in os.environ:
    from tests.emu.build import build_emulator

    os.environ["AIOCUDA_LIBCUDA"] = str(build_emulator())

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import aiocuda  # noqa: E402
from aiocuda import _core  # noqa: E402

from .churn import new_loop  # noqa: E402
from .common import emit, env_int, watchdog  # noqa: E402

ALLOWED = (TypeError, ValueError, aiocuda.AiocudaError)
AWAIT_TIMEOUT = 3.0


class Violation(AssertionError):
    """The property does not hold."""


class Boom(BaseException):
    pass


# ---- the world the examples run in ----------------------------------------------------------------
class World:
    loop: asyncio.AbstractEventLoop
    handles: list[int] = []  # valid CUstream handles of the emulator (both devices)
    streams: list[aiocuda.CpuStream] = []
    closed: aiocuda.CpuStream
    loop_errors: list[str] = []


W = World()


def run(coro: Any) -> Any:
    return W.loop.run_until_complete(asyncio.wait_for(coro, 4 * AWAIT_TIMEOUT))


def checked(fn: Any, /, *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """(True, result) or (False, the allowed error); anything else propagates (a violation)."""
    try:
        return True, fn(*args, **kwargs)
    except ALLOWED as e:
        if not str(e).strip():
            raise Violation(f"{type(e).__name__} without a message from {fn!r}") from e
        return False, e


async def settled(fut: Any, user_raised: list[BaseException] | None = None) -> None:
    """`fut` must complete in time with a result, an allowed error or what the user raised."""
    fut = asyncio.ensure_future(fut)
    done, _ = await asyncio.wait([fut], timeout=AWAIT_TIMEOUT)
    if not done:
        fut.cancel()
        raise Violation(f"{fut!r} did not complete in {AWAIT_TIMEOUT} s")
    if fut.cancelled():
        raise Violation(f"{fut!r} was cancelled by nobody")
    exc = fut.exception()
    if exc is None:
        return
    if user_raised and exc is user_raised[-1]:
        return
    if (user_raised and isinstance(exc, RuntimeError) and isinstance(user_raised[-1], StopIteration)
            and (exc.__cause__ is user_raised[-1] or exc.__context__ is user_raised[-1])):
        return
    if isinstance(exc, ALLOWED) and str(exc).strip():
        return
    raise Violation(f"{fut!r} failed with {exc!r}") from exc


def check_loop_errors() -> None:
    if W.loop_errors:
        errors = list(W.loop_errors)
        W.loop_errors.clear()
        raise Violation(f"loop exception handler called: {errors}")


# ---- strategies ---------------------------------------------------------------------------------------
class ProtocolStream:
    def __init__(self, value: Any, raises: bool) -> None:
        self.value, self.raises = value, raises

    def __cuda_stream__(self) -> Any:
        if self.raises:
            raise ValueError("this stream object refuses")
        return self.value

    def __repr__(self) -> str:
        return f"ProtocolStream({self.value!r}, raises={self.raises})"


class TorchLike:
    def __init__(self, handle: Any, device_index: Any) -> None:
        self.cuda_stream, self.device_index = handle, device_index

    def __repr__(self) -> str:
        return f"TorchLike({self.cuda_stream!r}, device_index={self.device_index!r})"


class Attribute:
    """An object with a __cuda_stream__ attribute that is not callable."""

    def __init__(self, value: Any) -> None:
        self.__cuda_stream__ = value

    def __repr__(self) -> str:
        return f"Attribute({self.__cuda_stream__!r})"


# Past C long, size_t and double; never in [3, 2**64), where an int is a (bogus) stream handle.
HUGE = [1 << 64, 10**400, -(1 << 63) - 1, -(10**400)]


def safe_ints() -> st.SearchStrategy[int]:
    """Ints that are never an unknown CUstream handle (undefined behaviour in a driver)."""
    return st.one_of(
        st.integers(-3, 2),
        st.integers(max_value=-1),
        st.integers(min_value=1 << 64, max_value=1 << 200),
        st.sampled_from(HUGE),
        st.sampled_from(W.handles),
    )


def junk(depth: int = 1) -> st.SearchStrategy[Any]:
    base = st.one_of(
        st.none(), st.booleans(), safe_ints(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=6), st.binary(max_size=6),
        st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:1", "/GPU:0", "/GPU:7", "GPU:1",
                         "/device:GPU:0", "/CPU:0", "device", "stream", ""]),
        st.complex_numbers(max_magnitude=1e6), st.just(Decimal("1e400")),
        st.just(Fraction(1, 3)), st.just(object()), st.just(NotImplemented), st.just(Ellipsis),
        st.just(len), st.just(aiocuda), st.just(W.closed), st.sampled_from(W.streams),
    )
    if depth <= 0:
        return base
    return st.one_of(
        base, st.lists(base, max_size=3), st.tuples(base, base),
        st.dictionaries(st.text(max_size=3), base, max_size=2), stream_objects(base),
    )


def stream_objects(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    handle = st.one_of(safe_ints(), inner)
    return st.one_of(
        st.builds(ProtocolStream, st.one_of(st.tuples(st.integers(0, 3), handle), inner),
                  st.booleans()),
        st.builds(TorchLike, handle, st.one_of(st.integers(-2, 3), inner)),
        st.builds(Attribute, st.one_of(st.tuples(st.just(0), handle), inner)),
    )


def streams() -> st.SearchStrategy[Any]:
    """Anything offered as a stream: real ones (cpu, emulated cuda, default) and junk."""
    return st.one_of(st.sampled_from(W.streams), st.sampled_from(W.handles),
                     st.sampled_from([0, 1, 2, W.closed]), junk())


def devices() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.integers(-2, 3), st.sampled_from([1 << 63, *HUGE]), junk(0))


def delays() -> st.SearchStrategy[Any]:
    """Short valid delays and invalid values; never a long valid one (it would only wait)."""
    return st.one_of(
        st.floats(0, 1e-3), st.integers(0, 0), st.floats(max_value=-1e-300),
        st.integers(max_value=-1), st.integers(min_value=1 << 1024, max_value=1 << 1100),
        st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 10**400, -(10**400), True,
                         Decimal("0.0001"), Fraction(1, 1000), "0.001", None, 1e-3j]),
        st.text(max_size=3),
    )


def user_functions() -> st.SearchStrategy[Any]:
    """(callable or not, what it raised so far): functions that return, raise, or are junk."""
    def make(kind: str) -> tuple[Any, list[BaseException]]:
        raised: list[BaseException] = []

        def fn(*args: Any, **kwargs: Any) -> Any:
            try:
                if kind == "value":
                    return (args, kwargs)
                if kind == "sum":
                    return sum(args)
                exc = {"ValueError": ValueError("user"), "StopIteration": StopIteration(1),
                       "Boom": Boom("user"), "KeyError": KeyError("k"),
                       "GeneratorExit": GeneratorExit(),
                       "StopAsyncIteration": StopAsyncIteration()}[kind]
                raise exc
            except BaseException as e:
                raised.append(e)
                raise

        return fn, raised

    kinds = st.sampled_from(["value", "sum", "ValueError", "StopIteration", "Boom", "KeyError",
                             "GeneratorExit", "StopAsyncIteration"])
    return st.one_of(kinds.map(make), junk(0).map(lambda j: (j, [])))


def kwargs_strategy() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(["a", "b", "fn", "self", "x"]), junk(0), max_size=2)


# ---- the properties, one per entry point -------------------------------------------------------------
def prop_synchronize() -> Any:
    @given(streams(), st.booleans(), devices())
    def prop(stream: Any, pass_device: bool, device: Any) -> None:
        async def body() -> None:
            kw = {"device": device} if pass_device else {}
            ok, fut = checked(aiocuda.synchronize, stream, **kw)
            if ok:
                await settled(fut)
            ok, fut = checked(aiocuda.synchronize, stream, stream, **kw)  # one too many
            if ok:
                raise Violation("synchronize() took two streams")
        run(body())
        check_loop_errors()
    return prop


def prop_record_and_event() -> Any:
    @given(streams(), st.booleans(), devices(), st.sampled_from(["await", "done", "sync", "all"]))
    def prop(stream: Any, pass_device: bool, device: Any, use: str) -> None:
        async def body() -> None:
            kw = {"device": device} if pass_device else {}
            ok, ev = checked(aiocuda.record, stream, **kw)
            if not ok:
                return
            if not isinstance(ev, aiocuda.Event):
                raise Violation(f"record() returned {ev!r}")
            repr(ev)
            if use in ("await", "all"):
                await settled(_await(ev))
            if use in ("done", "all"):
                ok, done = checked(ev.done)
                if ok and not isinstance(done, bool):
                    raise Violation(f"Event.done() returned {done!r}")
            if use in ("sync", "all"):
                checked(ev.synchronize)
        run(body())
        check_loop_errors()
    return prop


def prop_wait() -> Any:
    @given(st.one_of(streams(), st.just("event")))
    def prop(x: Any) -> None:
        async def body() -> None:
            target = W.streams[0].record() if x == "event" else x
            ok, coro = checked(aiocuda.wait, target)
            if ok:
                await settled(coro)
        run(body())
        check_loop_errors()
    return prop


def prop_cpu_submit() -> Any:
    @given(user_functions(), st.lists(junk(0), max_size=3), kwargs_strategy(),
           st.sampled_from(["open", "closed"]))
    def prop(fn_raised: Any, args: list[Any], kwargs: dict[str, Any], which: str) -> None:
        fn, raised = fn_raised

        async def body() -> None:
            s = W.streams[0] if which == "open" else W.closed
            ok, fut = checked(s.submit, fn, *args, **kwargs)
            if ok:
                await settled(fut, raised)
        run(body())
        check_loop_errors()
    return prop


def prop_cpu_delay() -> Any:
    @given(delays())
    def prop(seconds: Any) -> None:
        async def body() -> None:
            s = W.streams[1]
            checked(s.delay, seconds)
            checked(s.delay)  # missing argument
            await settled(s.synchronize())
        run(body())
        check_loop_errors()
    return prop


def prop_cpu_events() -> Any:
    @given(st.one_of(st.just("cpu"), st.just("cuda"), junk()), st.integers(0, 2),
           st.integers(0, 2))
    def prop(event: Any, a: int, b: int) -> None:
        async def body() -> None:
            src, dst = W.streams[a], W.streams[b]
            if event == "cpu":
                event_ = src.record()
            elif event == "cuda":
                event_ = aiocuda.record(W.handles[0])
            else:
                event_ = event
            checked(dst.wait_event, event_)
            await settled(dst.synchronize())
            await settled(_await(dst))
        run(body())
        check_loop_errors()
    return prop


def prop_cpu_lifecycle() -> Any:
    @given(st.lists(st.sampled_from(["submit", "record", "delay", "sync", "close", "wait_event",
                                     "repr", "enter", "await"]), max_size=8), junk(0))
    def prop(steps: list[str], extra: Any) -> None:
        async def body() -> None:
            ok, s = checked(aiocuda.CpuStream, *([extra] if extra is not None else []))
            if extra is not None and ok:
                raise Violation(f"CpuStream({extra!r}) was accepted")
            s = aiocuda.CpuStream()
            futs = []
            try:
                for step in steps:
                    if step == "submit":
                        ok, f = checked(s.submit, int, 3)
                    elif step == "record":
                        ok, f = checked(s.record)
                        f = _await(f) if ok else None
                    elif step == "delay":
                        ok, f = checked(s.delay, 1e-4)
                        f = None
                    elif step == "sync":
                        ok, f = checked(s.synchronize)
                    elif step == "close":
                        s.close()
                        ok, f = True, None
                    elif step == "wait_event":
                        ok, f = checked(s.wait_event, W.streams[0].record())
                        f = None
                    elif step == "repr":
                        repr(s)
                        ok, f = True, None
                    elif step == "enter":
                        with s:
                            pass
                        ok, f = True, None
                    else:
                        ok, f = checked(aiocuda.synchronize, s)
                    if ok and f is not None:
                        futs.append(f)
                for f in futs:
                    await settled(f)
            finally:
                s.close()
        run(body())
        check_loop_errors()
    return prop


def prop_gpu_op() -> Any:
    @given(user_functions(), st.lists(junk(0), max_size=2), kwargs_strategy(),
           st.one_of(st.none(), streams()), st.one_of(st.none(), devices()))
    def prop(fn_raised: Any, args: list[Any], kwargs: dict[str, Any], stream: Any,
             device: Any) -> None:
        fn, raised = fn_raised

        async def body() -> None:
            kw = dict(kwargs)
            if stream is not None:
                kw["stream"] = stream
            if device is not None:
                kw["device"] = device
            ok, coro = checked(aiocuda.gpu_op, fn, *args, **kw)
            if ok:
                await settled(coro, raised)
        run(body())
        check_loop_errors()
    return prop


def prop_module() -> Any:
    @given(devices(), st.one_of(st.sampled_from(["flag", "poll", "callback"]), junk(0)))
    def prop(device: Any, strategy: Any) -> None:
        async def body() -> None:
            ok, fut = checked(aiocuda.synchronize_device, device)
            if ok:
                await settled(fut)
            before = aiocuda.strategy()
            try:
                checked(aiocuda.set_strategy, strategy)
                if aiocuda.strategy() not in ("flag", "poll", "callback"):
                    raise Violation(f"strategy() is {aiocuda.strategy()!r}")
            finally:
                aiocuda.set_strategy(before)
            stats = aiocuda.statistics()
            if not isinstance(stats, aiocuda.Statistics) or stats.pending < 0:
                raise Violation(f"statistics() returned {stats!r}")
            if aiocuda.backends() not in (("cpu",), ("cpu", "cuda")):
                raise Violation(f"backends() returned {aiocuda.backends()!r}")
        run(body())
        check_loop_errors()
    return prop


def prop_no_running_loop() -> Any:
    @given(streams(), user_functions(), devices())
    def prop(stream: Any, fn_raised: Any, device: Any) -> None:
        # No loop runs here: each call works (it needs none) or raises one of the allowed errors.
        for call in (lambda: aiocuda.synchronize(stream),
                     lambda: aiocuda.record(stream),
                     lambda: W.streams[0].submit(fn_raised[0]),
                     lambda: W.streams[0].synchronize(),
                     lambda: W.streams[0].record(),
                     lambda: aiocuda.synchronize_device(device),
                     lambda: aiocuda.statistics()):
            ok, fut = checked(call)
            if ok:
                raise Violation(f"{call} worked with no running loop: {fut!r}")
            if isinstance(fut, aiocuda.AiocudaError) and "event loop" not in str(fut) and \
                    not isinstance(fut, aiocuda.CudaError):
                pass  # another aiocuda error (a closed stream, a device) is fine too
    return prop


def prop_cuda_error() -> Any:
    @given(junk(0), junk(0))
    def prop(code: Any, message: Any) -> None:
        import pickle

        try:
            e = aiocuda.CudaError(code, message)
        except ALLOWED:
            return
        except AttributeError as exc:  # message.split on a non-str
            raise Violation(f"CudaError({code!r}, {message!r}) raised {exc!r}") from exc
        str(e), repr(e), e.name, e.code
        pickle.loads(pickle.dumps(e))
    return prop


GROUPS = {
    "streams": [prop_synchronize, prop_record_and_event, prop_wait],
    "cpu_stream": [prop_cpu_submit, prop_cpu_delay, prop_cpu_events, prop_cpu_lifecycle],
    "gpu_op": [prop_gpu_op],
    "module": [prop_module, prop_no_running_loop, prop_cuda_error],
}


async def _await(aw: Any) -> Any:
    return await aw


def setup(kind: str) -> None:
    from tests.conftest import Emu  # noqa: PLC0415 (the emulator's ctypes controls)

    info = _core.cuda_info()
    assert info["available"], info["reason"]
    emu = Emu(pathlib.Path(os.environ["AIOCUDA_LIBCUDA"]))
    W.handles = [emu.stream(), emu.stream(), emu.stream(emu.primary(1))]
    W.streams = [aiocuda.CpuStream() for _ in range(3)]
    W.closed = aiocuda.CpuStream()
    W.closed.close()
    W.loop = new_loop(kind)
    W.loop.set_exception_handler(
        lambda _l, c: W.loop_errors.append(f"{c.get('message')} {c.get('exception')!r}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", choices=sorted(GROUPS), required=True)
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--examples", type=int, default=env_int("AIOCUDA_STRESS_EXAMPLES", 300))
    p.add_argument("--seed", type=int, default=env_int("AIOCUDA_STRESS_SEED", 20_240_611),
                   help="hypothesis seed (0: draw one at random, printed)")
    a = p.parse_args()
    seed = a.seed or random.SystemRandom().randrange(1, 2**32)
    print(f"== fuzz seed {seed}: replay with AIOCUDA_STRESS_SEED={seed} python -m "
          f"tests.stress.fuzz --group {a.group} --loop {a.loop} --examples {a.examples}",
          flush=True)
    watchdog()
    setup(a.loop)
    results: dict[str, str] = {}
    for make in GROUPS[a.group]:
        name = make.__name__.removeprefix("prop_")
        prop = make()
        prop = settings(max_examples=a.examples, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck), print_blob=False,
                        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
                        )(prop)
        from hypothesis import seed as seed_

        prop = seed_(seed)(prop)
        print(f"== {name}", flush=True)
        try:
            prop()
            results[name] = "ok"
        except BaseException as e:  # noqa: BLE001 (a falsifying example of any kind)
            text = "".join(traceback.format_exception(e))
            results[name] = text[-3000:]
            print(text, flush=True)
    for s in W.streams:
        s.close()
    W.loop.close()
    emit({"group": a.group, "loop": a.loop, "examples": a.examples, "seed": seed,
          "results": results})


if __name__ == "__main__":
    main()
