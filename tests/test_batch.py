"""aiocuda.batch: dynamic batching on asyncio, uvloop and trio, awaiting real aiocuda work.

Every body is written with anyio and runs on each loop. No assertion depends on wall-clock time:
orderings are made with gates (events a batch waits on) and with waits of an hour that must
never be reached.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import aiocuda

anyio = pytest.importorskip("anyio", reason="anyio is a test dependency: pip install aiocuda[test]")
pytest.importorskip("trio", reason="trio is a test dependency: pip install aiocuda[test]")

BACKENDS = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}
HOUR = 3600.0  # a max_wait_s that no test may reach


@pytest.fixture(params=list(BACKENDS))
def go(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Run an async body on the loop under test, failing (not hanging) after 60 s."""
    backend, options = BACKENDS[request.param]
    if request.param == "uvloop":
        pytest.importorskip("uvloop")

    def run(body: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            if request.param != "trio":  # the loop under test is the one that runs
                loop_module = type(asyncio.get_running_loop()).__module__
                assert loop_module.startswith("uvloop") == (request.param == "uvloop")
            with anyio.fail_after(60):
                return await body()

        return anyio.run(bounded, backend=backend, backend_options=options)

    return run


async def doubled(items: list[int]) -> list[int]:
    """Real work on a cpu-backend worker (the same call runs on a GPU for CUDA tensors)."""
    return await aiocuda.gpu_op(lambda xs: [2 * x for x in xs], items)


async def until(pred: Callable[[], bool]) -> None:
    """Let the loop run (awaiting real cpu-backend work) until `pred()` holds."""
    s = aiocuda.CpuStream()
    while not pred():
        await aiocuda.synchronize(s)


async def spin(n: int = 20) -> None:
    """Let the loop run n times through real completions: anything ready would have run."""
    s = aiocuda.CpuStream()
    for _ in range(n):
        s.delay(0.0005)
        await aiocuda.synchronize(s)


def an_asyncio_future() -> asyncio.Future[None]:
    """A pending asyncio future (on a loop of its own: trio runs the batch functions too)."""
    loop = asyncio.new_event_loop()
    fut = loop.create_future()
    loop.close()
    return fut


def queues(b: aiocuda.Batcher[Any, Any]) -> list[Any]:
    return list(b._queues.values())


# ---- batching -------------------------------------------------------------------------------

def test_items_waiting_together_are_one_batch_up_to_max_batch_size(go):
    sizes: list[int] = []

    @aiocuda.batch(max_batch_size=4, max_wait_s=0)
    async def f(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return await doubled(items)

    async def body() -> dict[int, int]:
        out: dict[int, int] = {}

        async def call(i: int) -> None:
            out[i] = await f(i)

        async with anyio.create_task_group() as tg:
            for i in range(10):  # all ten wait before the first batch is formed
                tg.start_soon(call, i)
        return out

    assert go(body) == {i: 2 * i for i in range(10)}
    assert sizes == [4, 4, 2]


def test_bare_decorator_and_torch_rows(go):
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(4, 2)
    sizes: list[int] = []

    @aiocuda.batch
    async def predict(xs: list[Any]) -> list[Any]:
        sizes.append(len(xs))
        return list(await aiocuda.gpu_op(model, torch.stack(xs)))  # a tensor's rows

    assert predict.max_batch_size == 32 and predict.max_wait_s == 0.002
    assert predict.max_concurrent_batches == 1 and predict.__name__ == "predict"
    assert aiocuda.batch()(doubled).max_batch_size == 32  # with empty parentheses too
    xs = [torch.randn(4) for _ in range(5)]

    async def body() -> list[Any]:
        out: list[Any] = [None] * 5

        async def call(i: int) -> None:
            out[i] = await predict(xs[i])

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(call, i)
        return out

    ys = go(body)
    with torch.no_grad():
        for x, y in zip(xs, ys):
            assert torch.allclose(model(x), y, atol=1e-6)
    assert sizes == [5]


def test_a_batch_waits_for_max_batch_size_items_until_max_wait_s(go):
    calls: list[list[int]] = []

    @aiocuda.batch(max_batch_size=3, max_wait_s=HOUR)
    async def f(items: list[int]) -> list[int]:
        calls.append(sorted(items))
        return await doubled(items)

    async def body() -> None:
        started = 0

        async def call(i: int) -> None:
            nonlocal started
            started += 1
            assert await f(i) == 2 * i

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 1)
            tg.start_soon(call, 2)
            await until(lambda: started == 2)
            await spin()
            assert calls == []  # two wait, an hour is not over: no batch yet
            tg.start_soon(call, 3)  # the third fills it
        assert calls == [[1, 2, 3]]

    go(body)


def test_a_batch_that_does_not_fill_starts_after_max_wait_s(go):
    calls: list[list[int]] = []

    @aiocuda.batch(max_batch_size=100, max_wait_s=0.01)
    async def f(items: list[int]) -> list[int]:
        calls.append(items)
        return await doubled(items)

    async def body() -> int:
        return await f(21)  # would hang (and fail after 60 s) if the wait never ended

    assert go(body) == 42
    assert calls == [[21]]


@pytest.mark.parametrize("max_wait_s", [0.0001, 0.0012])
def test_a_lone_callers_wait_sleeps_rather_than_spins(go, monkeypatch, max_wait_s):
    # uvloop's clock moves in whole milliseconds and call_later rounds to the nearest one: a
    # deadline 0.1-0.4 ms away became a 0 ms timer, and the dispatcher went round about 100
    # times per batch, busy, until the clock ticked.
    from aiocuda import _batch

    rounds = [0]
    real = _batch._sleep_until_woken

    async def counted(*args: Any) -> None:
        rounds[0] += 1
        await real(*args)

    monkeypatch.setattr(_batch, "_sleep_until_woken", counted)

    @aiocuda.batch(max_batch_size=32, max_wait_s=max_wait_s)
    async def f(items: list[int]) -> list[int]:
        return items

    async def body() -> list[int]:
        return [await f(i) for i in range(20)]

    assert go(body) == list(range(20))
    assert rounds[0] <= 3 * 20, f"{rounds[0] / 20:.1f} dispatcher rounds per batch"


def test_items_arriving_while_the_batch_before_runs_wait_for_it(go):
    """max_concurrent_batches=1: what arrives meanwhile is the next batch, all of it."""
    calls: list[list[int]] = []

    async def body() -> None:
        gate = anyio.Event()

        @aiocuda.batch(max_batch_size=10, max_wait_s=0)
        async def f(items: list[int]) -> list[int]:
            calls.append(sorted(items))
            if items == [0]:
                await gate.wait()
            return await doubled(items)

        async def call(i: int) -> None:
            assert await f(i) == 2 * i

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 0)
            await until(lambda: len(calls) == 1)  # batch [0] runs, held by the gate
            for i in (1, 2, 3):
                tg.start_soon(call, i)
            await spin()  # their wait (0 s) is long over, but no batch may start yet
            assert calls == [[0]]
            gate.set()
        assert calls == [[0], [1, 2, 3]]

    go(body)


@pytest.mark.parametrize("limit", [1, 2])
def test_at_most_max_concurrent_batches_run_at_once(go, limit):
    active = most = ended = 0

    async def body() -> None:
        nonlocal active, most, ended
        gate = anyio.Event()

        @aiocuda.batch(max_batch_size=1, max_wait_s=0, max_concurrent_batches=limit)
        async def f(items: list[int]) -> list[int]:
            nonlocal active, most, ended
            active += 1
            most = max(most, active)
            await gate.wait()
            out = await doubled(items)
            active -= 1
            ended += 1
            return out

        async def call(i: int) -> None:
            assert await f(i) == 2 * i

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(call, i)
            await until(lambda: active == limit)
            await spin()  # a third batch would have started by now if it could
            assert active == limit
            gate.set()
        assert ended == 4

    go(body)
    assert most == limit


# ---- errors ---------------------------------------------------------------------------------

class Bad(Exception):
    pass


def test_an_exception_reaches_every_caller_of_its_batch_and_no_other(go):
    async def body() -> None:
        @aiocuda.batch(max_batch_size=3, max_wait_s=HOUR)
        async def f(items: list[int]) -> list[int]:
            out = await doubled(items)
            if -1 in items:
                raise Bad(f"bad item in {sorted(items)}")
            return out

        async def group(xs: list[int]) -> list[Any]:
            got: list[Any] = [None] * len(xs)

            async def call(k: int) -> None:
                try:
                    got[k] = await f(xs[k])
                except Bad as exc:
                    got[k] = exc

            async with anyio.create_task_group() as tg:
                for k in range(len(xs)):
                    tg.start_soon(call, k)
            return got

        failed = await group([1, -1, 2])
        assert all(isinstance(e, Bad) and str(e) == "bad item in [-1, 1, 2]" for e in failed)
        assert await group([3, 4, 5]) == [6, 8, 10]  # the batcher goes on

    go(body)


def test_each_caller_of_a_failed_batch_gets_an_exception_of_its_own(go):
    # One object for all: a note that one request's handler added, the exception it was
    # handling (__context__) and its frames showed in every other request's error.
    async def body() -> list[Any]:
        @aiocuda.batch(max_batch_size=3, max_wait_s=HOUR)
        async def f(items: list[int]) -> list[int]:
            raise Bad("model failed")

        got: list[Any] = [None] * 3

        async def call(k: int) -> None:
            try:
                raise KeyError(f"request {k}'s own")
            except KeyError:
                try:
                    await f(k)
                except Bad as exc:
                    if sys.version_info >= (3, 11):  # (no notes before)
                        exc.add_note(f"request {k}")
                    got[k] = exc

        async with anyio.create_task_group() as tg:
            for k in range(3):
                tg.start_soon(call, k)
        return got

    got = go(body)
    assert len({id(e) for e in got}) == 3
    for k, e in enumerate(got):
        assert type(e) is Bad and str(e) == "model failed"
        assert getattr(e, "__notes__", [f"request {k}"]) == [f"request {k}"]
        assert e.__context__.args == (f"request {k}'s own",)


def test_a_type_error_raised_while_reading_the_results_is_the_functions_own(go):
    async def body() -> None:
        @aiocuda.batch(max_batch_size=2, max_wait_s=0.001)
        async def f(items: list[int]) -> Any:
            return ("#" + i for i in items)  # type: ignore[operator]  # a bug in a generator

        with pytest.raises(TypeError, match="can only concatenate str"):
            await f(1)

    go(body)


@pytest.mark.parametrize("returns, error, match", [
    (lambda items: items[:-1], ValueError, "got 3 items and returned 2 results"),
    (lambda items: items + [0], ValueError, "got 3 items and returned 4 results"),
    (lambda items: None, TypeError, "returned NoneType, not a sequence"),
    # list() takes these, but their elements are not one result per item in order
    (lambda items: "abc", TypeError, "returned str, not a sequence of results"),
    (lambda items: b"abc", TypeError, "returned bytes, not a sequence of results"),
    (lambda items: {i: i for i in items}, TypeError, "returned dict, not a sequence of results"),
    (lambda items: set(items), TypeError, "returned set, not a sequence of results"),
    # an unawaited future is iterable (it yields itself): list() failed with "await wasn't used
    # with future"; an unawaited coroutine said it was "not a sequence"
    (lambda items: an_asyncio_future(), TypeError,
     "returned the awaitable Future, not its results: await it"),
    (lambda items: doubled(items), TypeError,
     "returned the awaitable coroutine, not its results: await it"),
])
def test_a_wrong_number_of_results_fails_every_caller(go, returns, error, match):
    async def body() -> None:
        @aiocuda.batch(max_batch_size=3, max_wait_s=HOUR)
        async def f(items: list[int]) -> Any:
            await doubled(items)
            return returns(items)

        errors: list[BaseException] = []

        async def call(i: int) -> None:
            try:
                await f(i)
            except Exception as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(call, i)
        assert len(errors) == 3
        for e in errors:
            assert isinstance(e, error) and match in str(e), e

    go(body)


@pytest.mark.parametrize("has_cancelling", [
    pytest.param(True, id="cancelling", marks=pytest.mark.skipif(
        sys.version_info < (3, 11), reason="Task.cancelling() is new in Python 3.11")),
    pytest.param(False, id="py310")])
def test_a_cancelled_error_from_the_batch_function_is_an_error_for_its_callers(
        go, monkeypatch, has_cancelling):
    # Something the function awaited was cancelled, not its batch: the callers looked cancelled
    # (a TaskGroup even took that for no error at all).
    monkeypatch.setattr("aiocuda._batch._HAS_CANCELLING", has_cancelling, raising=False)

    async def body() -> None:
        @aiocuda.batch(max_batch_size=2, max_wait_s=HOUR)
        async def f(items: list[int]) -> list[int]:
            out = await doubled(items)
            if 0 in items:
                raise asyncio.CancelledError()  # as awaiting a task that was cancelled does
            return out

        got: dict[int, Any] = {}

        async def call(i: int) -> None:
            try:
                got[i] = await f(i)
            except BaseException as exc:  # noqa: BLE001 -- what each caller sees
                got[i] = exc

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(call, i)
        for i in (0, 1):
            assert isinstance(got[i], RuntimeError), got
            assert "the batch function raised CancelledError" in str(got[i])
            assert isinstance(got[i].__cause__, asyncio.CancelledError)
        assert (got[2], got[3]) == (4, 6)  # the batcher goes on

    go(body)


@pytest.mark.parametrize("has_cancelling", [
    pytest.param(True, id="cancelling", marks=pytest.mark.skipif(
        sys.version_info < (3, 11), reason="Task.cancelling() is new in Python 3.11")),
    pytest.param(False, id="py310")])
def test_a_batch_task_that_is_cancelled_cancels_its_callers(monkeypatch, has_cancelling):
    # The other side of the test above: a cancelled batch (its task's cancel(), as asyncio.run
    # ends) is a cancellation for its callers, not an error; Python 3.10 has no cancelling().
    monkeypatch.setattr("aiocuda._batch._HAS_CANCELLING", has_cancelling, raising=False)
    batch_tasks: list[asyncio.Task[Any]] = []

    @aiocuda.batch(max_batch_size=1, max_wait_s=HOUR)
    async def f(items: list[int]) -> list[int]:
        batch_tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        await asyncio.sleep(HOUR)
        return items

    async def run() -> None:
        caller = asyncio.ensure_future(f(1))
        await until(lambda: bool(batch_tasks))
        batch_tasks[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert batch_tasks[0].cancel.__name__ == "cancel"  # py310: the task's own cancel() again

    asyncio.run(run())


@pytest.mark.parametrize("task", ["dispatcher", "batch"])
def test_a_batcher_whose_task_is_cancelled_before_it_ran_fails_its_callers_and_recovers(
        run, task):
    # A shutdown helper that cancels every task but its own, and then the program goes on. A task
    # cancelled before its first step never runs its coroutine, nor its finally clauses: the
    # dispatcher stayed "dispatching" (or the batch "running") for good, and every later call of
    # the batcher on that loop waited forever.
    @aiocuda.batch(max_batch_size=1, max_wait_s=HOUR)
    async def f(items: list[int]) -> list[int]:
        return await doubled(items)

    def background(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[Any]]:
        from aiocuda import _loop

        return [t for t in _loop._spawned if t.get_loop() is loop and not t.done()]

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        caller = asyncio.ensure_future(f(1))
        await asyncio.sleep(0)  # the caller started the dispatcher's task, which has not run
        if task == "batch":
            await asyncio.sleep(0)  # the dispatcher started the batch's task and ended
        (started,) = background(loop)
        fn = started.get_coro().cr_frame.f_locals["fn"]  # what aiocuda's _guarded runs
        assert fn.__name__ == {"dispatcher": "_dispatch", "batch": "_run_batch"}[task]
        started.cancel()
        with pytest.raises(RuntimeError, match=f"its {task} task was cancelled before the batch ran"):
            await asyncio.wait_for(caller, 60)
        # As the helper does it: the caller is cancelled too, and stays cancelled.
        caller = asyncio.ensure_future(f(2))
        await asyncio.sleep(0)
        for t in [*background(loop), caller]:
            t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        (q,) = queues(f)
        assert q.running == 0 and not q.dispatching and not q.waiting
        return await asyncio.wait_for(f(3), 60), await asyncio.wait_for(f(4), 60)

    assert run(main()) == (6, 8)


def test_one_of_two_batches_cancelled_before_it_ran_fails_its_own_callers(run):
    # Two batches started in one pass of the dispatcher (max_concurrent_batches=2): the first
    # one's task cancelled before its first step must fail its own callers, and leave the second
    # alone (a closure over the dispatcher's loop variable failed the second batch's callers and
    # left the first one's waiting forever; found by review).
    @aiocuda.batch(max_batch_size=1, max_wait_s=HOUR, max_concurrent_batches=2)
    async def f(items: list[int]) -> list[int]:
        return await doubled(items)

    async def main() -> int:
        from aiocuda import _loop

        loop = asyncio.get_running_loop()
        first, second = asyncio.ensure_future(f(1)), asyncio.ensure_future(f(2))
        await asyncio.sleep(0)  # both callers waiting, the dispatcher's task made
        await asyncio.sleep(0)  # the dispatcher started both batches' tasks and ended
        batches = [t for t in _loop._spawned if t.get_loop() is loop and not t.done()]
        assert len(batches) == 2
        order = {t.get_coro().cr_frame.f_locals["args"][2][0].item: t for t in batches}
        order[1].cancel()
        with pytest.raises(RuntimeError, match="its batch task was cancelled before the batch ran"):
            await asyncio.wait_for(first, 60)
        return await asyncio.wait_for(second, 60)

    assert run(main()) == 4


def test_a_dispatcher_cancelled_while_it_waits_fails_its_callers_and_recovers(run):
    @aiocuda.batch(max_batch_size=8, max_wait_s=HOUR)
    async def f(items: list[int]) -> list[int]:
        return await doubled(items)

    async def main() -> tuple[int, int]:
        from aiocuda import _loop

        loop = asyncio.get_running_loop()
        caller = asyncio.ensure_future(f(1))
        await spin(3)  # the dispatcher is asleep, waiting for more items or the hour
        (dispatcher,) = [t for t in _loop._spawned if t.get_loop() is loop and not t.done()]
        dispatcher.cancel()
        with pytest.raises(RuntimeError, match="its dispatcher task was cancelled"):
            await asyncio.wait_for(caller, 60)
        (q,) = queues(f)
        assert q.running == 0 and not q.dispatching and not q.waiting
        f.max_batch_size = 2  # (so that the next two calls need not wait the hour)
        return tuple(await asyncio.gather(f(3), f(4)))  # type: ignore[return-value]

    assert run(main()) == (6, 8)


def test_a_wrapped_objects_attributes_are_not_the_batchers_own(go):
    # update_wrapper copied the object's __dict__ over the batcher's settings and internals: a
    # model wrapper's max_batch_size or max_wait_s replaced the decorator's, its _fn was called
    # instead of the object, its _lock broke every call.
    sizes: list[int] = []

    async def raw(items: list[int]) -> list[str]:
        return ["raw"] * len(items)

    class Model:
        def __init__(self) -> None:
            self.max_batch_size, self.max_wait_s, self.max_concurrent_batches = 64, 0.0, 9
            self._fn, self._lock, self._queues, self._attr = raw, object(), None, None

        async def __call__(self, items: list[int]) -> list[int]:
            sizes.append(len(items))
            return await doubled(items)

    b = aiocuda.batch(max_batch_size=2, max_wait_s=HOUR)(Model())
    assert (b.max_batch_size, b.max_wait_s, b.max_concurrent_batches) == (2, HOUR, 1)

    async def body() -> list[int]:
        out = [0] * 4

        async def call(i: int) -> None:
            out[i] = await b(i)

        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(call, i)
        return out

    assert go(body) == [0, 2, 4, 6]
    assert sizes == [2, 2]  # full batches; max_wait_s (an hour) never reached


def test_a_deadline_on_a_millisecond_clock_never_sleeps_for_a_hair(go, monkeypatch):
    # uvloop's loop.time() moves in whole milliseconds, and arrived + 0.002 can round to a hair
    # (1.8e-12 s) past the tick it stands for: the dispatcher then slept for that hair again and
    # again until the clock ticked, spinning the loop (15-17 sleeps a batch instead of 1).
    from aiocuda import _batch

    sleeps: list[float | None] = []
    real = _batch._sleep_until_woken

    async def counted(loop: Any, q: Any, timeout: float | None) -> None:
        sleeps.append(timeout)
        await real(loop, q, timeout)

    monkeypatch.setattr(_batch, "_sleep_until_woken", counted)
    b = aiocuda.batch(max_batch_size=32, max_wait_s=0.002)(doubled)

    async def body() -> list[int]:
        return [await b(i) for i in range(10)]

    assert go(body) == [2 * i for i in range(10)]
    assert not [t for t in sleeps if t is not None and t < 1e-6], sleeps  # no sleep for a hair


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_batch_size": 0}, ValueError, "max_batch_size must be at least 1, got 0"),
    ({"max_batch_size": 2.5}, TypeError, "max_batch_size must be an int, got float"),
    ({"max_batch_size": True}, TypeError, "max_batch_size must be an int, got bool"),
    ({"max_concurrent_batches": 0}, ValueError, "max_concurrent_batches must be at least 1"),
    ({"max_wait_s": -0.1}, ValueError, "max_wait_s must be a finite number of seconds >= 0"),
    ({"max_wait_s": math.nan}, ValueError, "max_wait_s must be a finite number"),
    ({"max_wait_s": math.inf}, ValueError, "max_wait_s must be a finite number"),
    # an int beyond any float passed the check, then float() raised OverflowError
    ({"max_wait_s": 10**400}, ValueError, "max_wait_s must be a finite number"),
    ({"max_wait_s": "1"}, TypeError, "max_wait_s must be a number of seconds, got str"),
])
def test_bad_settings_raise_at_decoration_time(kwargs, error, match):
    with pytest.raises(error, match=match):
        aiocuda.batch(**kwargs)
    with pytest.raises(error, match=match):
        aiocuda.Batcher(doubled, **kwargs)


def test_a_batcher_under_classmethod_says_so(run_any):
    # It raised "'mappingproxy' object does not support item assignment"; on Python 3.13, where
    # classmethod binds without the batcher's __get__, "takes 2 positional arguments but 3 were
    # given" when called.
    class Model:
        @classmethod
        @aiocuda.batch
        async def classify(cls, items: list[int]) -> list[int]:
            return items

    async def main():
        for owner in (Model, Model()):
            with pytest.raises(TypeError, match=r"bound to the class Model \(@classmethod\)"):
                await owner.classify(3)
            # Python 3.13 passed the class itself as the item: it was batched.
            with pytest.raises(TypeError, match=r"bound to the class Model \(@classmethod\)"):
                await owner.classify()  # type: ignore[call-arg]

    run_any(main())


def test_a_batcher_takes_one_item(run_any):
    @aiocuda.batch
    async def doubled(items: list[int]) -> list[int]:
        return [2 * i for i in items]

    async def main():
        with pytest.raises(TypeError, match=r"doubled\(item\) takes one item, got 2 arguments"):
            await doubled(1, 2)  # type: ignore[call-arg]
        return await doubled(4), await named(int)  # a class is an item like any other

    @aiocuda.batch
    async def named(items: list[type]) -> list[str]:
        return [i.__name__ for i in items]

    assert run_any(main()) == (8, "int")


def test_a_function_that_is_not_async_is_refused():
    def plain(items: list[int]) -> list[int]:
        return items

    with pytest.raises(TypeError, match="needs an async function"):
        aiocuda.batch(plain)
    with pytest.raises(TypeError, match="needs an async function"):
        aiocuda.batch(max_batch_size=4)(plain)
    with pytest.raises(TypeError, match="pass the settings as keywords"):
        aiocuda.batch(32)  # type: ignore[call-overload]


def test_an_async_function_behind_a_plain_decorator_is_refused_saying_why():
    import functools

    def traced(fn: Callable[..., Any]) -> Callable[..., Any]:  # as @torch.inference_mode() does
        @functools.wraps(fn)
        def wrapper(*args: Any) -> Any:
            return fn(*args)

        return wrapper

    @traced
    async def f(items: list[int]) -> list[int]:
        return items

    with pytest.raises(TypeError, match="a plain function wrapping one"):
        aiocuda.batch(f)


def test_an_async_callable_object_or_partial_is_an_async_function(go):
    import functools

    class Scaled:  # a model wrapper
        def __init__(self, k: int) -> None:
            self.k = k

        async def __call__(self, items: list[int]) -> list[int]:
            return [self.k * y for y in await doubled(items)]

    async def scaled(k: int, items: list[int]) -> list[int]:
        return [k * y for y in await doubled(items)]

    class Holder:  # as a class attribute, neither is bound to the instance (as without batch)
        by_object = aiocuda.batch(Scaled(3))
        by_partial = aiocuda.batch(functools.partial(scaled, 5))

    with pytest.raises(TypeError, match="needs an async function"):
        aiocuda.batch(Scaled)  # the class: calling it makes an instance, not a coroutine

    async def body() -> tuple[int, int]:
        h = Holder()
        return await h.by_object(1), await h.by_partial(1)

    assert go(body) == (6, 10)


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_mypy_strict_takes_a_function_returning_a_tensor_like_or_an_async_callable(tmp_path):
    # A tensor's rows are a valid return ("anything list() takes"), and a tensor is Iterable,
    # not a Sequence: mypy --strict refused the decorated function.
    (tmp_path / "typed.py").write_text(textwrap.dedent("""
        from __future__ import annotations
        from collections.abc import Iterator
        import aiocuda

        class Rows:  # a tensor: iterable over its rows, not a Sequence
            def __iter__(self) -> Iterator[float]:
                return iter([1.0])

        @aiocuda.batch(max_batch_size=8)
        async def rows(items: list[int]) -> Rows:
            return Rows()

        @aiocuda.batch
        async def strs(items: list[int]) -> tuple[str, ...]:
            return tuple(str(i) for i in items)

        class Scaled:
            async def __call__(self, items: list[int]) -> list[int]:
                return items

        class Model:
            @aiocuda.batch(max_batch_size=4)
            async def predict(self, items: list[int]) -> Rows:
                return Rows()

        async def main() -> None:
            a: float = await rows(1)
            b: str = await strs(1)
            c: int = await aiocuda.batch(Scaled())(1)
            d: float = await Model().predict(1)
            print(a, b, c, d)
    """))
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "typed.py"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_calling_it_outside_a_loop_says_where():
    b = aiocuda.batch(doubled)
    with pytest.raises(aiocuda.AiocudaError, match="needs a running event loop"):
        b(1).send(None)


# ---- cancellation ---------------------------------------------------------------------------

def test_a_caller_cancelled_before_its_batch_starts_is_left_out(go):
    calls: list[list[int]] = []

    @aiocuda.batch(max_batch_size=3, max_wait_s=HOUR)
    async def f(items: list[int]) -> list[int]:
        calls.append(sorted(items))
        return await doubled(items)

    async def body() -> None:
        results: dict[int, int] = {}
        waiting = 0
        scope = anyio.CancelScope()
        a_done = anyio.Event()

        async def a() -> None:
            nonlocal waiting
            with scope:
                waiting += 1
                results[0] = await f(0)
            a_done.set()

        async def call(i: int) -> None:
            nonlocal waiting
            waiting += 1
            results[i] = await f(i)

        async with anyio.create_task_group() as tg:
            tg.start_soon(a)
            tg.start_soon(call, 1)
            await until(lambda: waiting == 2)
            scope.cancel()
            await a_done.wait()
            await spin()
            assert calls == []  # 0 left: one waits, not three
            tg.start_soon(call, 2)
            tg.start_soon(call, 3)
        assert calls == [[1, 2, 3]]
        assert results == {1: 2, 2: 4, 3: 6}  # 0 was cancelled: no result

    go(body)


def test_a_caller_cancelled_after_its_batch_started_only_loses_its_result(go, caplog):
    seen: list[list[int]] = []
    ended = 0

    async def body() -> None:
        nonlocal ended
        gate = anyio.Event()

        @aiocuda.batch(max_batch_size=3, max_wait_s=HOUR)
        async def f(items: list[int]) -> list[int]:
            nonlocal ended
            seen.append(sorted(items))
            await gate.wait()
            out = await doubled(items)
            ended += 1
            return out

        results: dict[int, int] = {}
        scope = anyio.CancelScope()

        async def a() -> None:
            with scope:
                results[0] = await f(0)

        async def call(i: int) -> None:
            results[i] = await f(i)

        async with anyio.create_task_group() as tg:
            tg.start_soon(a)
            tg.start_soon(call, 1)
            tg.start_soon(call, 2)
            await until(lambda: len(seen) == 1)  # the batch of three started
            scope.cancel()
            await spin()
            gate.set()
        assert results == {1: 2, 2: 4}
        assert ended == 1

    with caplog.at_level(logging.DEBUG, logger="aiocuda"):
        go(body)
    assert seen == [[0, 1, 2]]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---- methods, loops, threads ----------------------------------------------------------------

class Model:
    def __init__(self, scale: int) -> None:
        self.scale = scale
        self.batches: list[list[int]] = []

    @aiocuda.batch(max_batch_size=8, max_wait_s=0)
    async def predict(self, items: list[int]) -> list[int]:
        self.batches.append(sorted(items))
        return [self.scale * y // 2 for y in await doubled(items)]


def test_each_batch_runs_in_its_own_first_callers_contextvars(go):
    # The dispatcher ran in the first caller's copied context, and every batch it started in
    # that one: under steady load, later batches read a finished request's contextvars, which
    # stayed alive as long as the dispatcher did.
    import contextvars

    request = contextvars.ContextVar("request", default="unset")
    seen: list[tuple[str, list[int]]] = []

    async def body() -> None:
        gate = anyio.Event()

        @aiocuda.batch(max_batch_size=2, max_wait_s=HOUR)
        async def f(items: list[int]) -> list[int]:
            seen.append((request.get(), sorted(items)))
            if len(seen) == 1:
                await gate.wait()  # 2 to 5 arrive while this batch runs: one dispatcher
            return await doubled(items)

        async def call(i: int) -> None:
            request.set(f"request-{i}")
            assert await f(i) == 2 * i

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 0)
            await until(lambda: bool(queues(f)) and len(queues(f)[0].waiting) == 1)
            tg.start_soon(call, 1)
            await until(lambda: len(seen) == 1)
            for i in range(2, 6):
                tg.start_soon(call, i)
                await until(lambda: len(queues(f)[0].waiting) == i - 1)
            gate.set()

    go(body)
    assert seen == [("request-0", [0, 1]), ("request-2", [2, 3]), ("request-4", [4, 5])]


def test_a_loop_closed_with_callers_waiting_is_freed_when_another_loop_comes():
    # run_until_complete, then close(), as a loop of a thread of its own ends: its callers'
    # futures, in the batcher's queue, kept the loop (the queue's weak key) and their items
    # alive forever, and aiocuda kept its dispatcher task.
    import gc
    import weakref

    class Big:  # a request's tensor
        pass

    @aiocuda.batch(max_batch_size=64, max_wait_s=HOUR)
    async def f(items: list[Big]) -> list[Big]:
        return items

    async def start_callers(items: list[Big]) -> None:
        for it in items:
            asyncio.ensure_future(f(it))
        for _ in range(5):
            await asyncio.sleep(0)  # queued; the dispatcher sleeps

    loop = asyncio.new_event_loop()
    items = [Big() for _ in range(3)]
    refs = [weakref.ref(x) for x in items]
    loop.run_until_complete(start_callers(items))
    loop.close()
    loop_ref = weakref.ref(loop)
    del loop, items

    async def later() -> None:  # another loop uses the batcher
        task = asyncio.ensure_future(f(Big()))
        await asyncio.sleep(0)
        task.cancel()

    asyncio.run(later())
    gc.collect()
    assert loop_ref() is None
    assert [r() for r in refs] == [None, None, None]


def test_a_batch_running_when_its_loop_closed_logs_nothing_when_collected(caplog):
    # Collected with its closed loop, the batch task (GeneratorExit) cancelled its callers'
    # futures, on the closed loop: "background task ... failed: Event loop is closed", logged.
    import gc
    import time

    @aiocuda.batch(max_batch_size=2, max_wait_s=0.001)
    async def slow(items: list[int]) -> list[int]:
        return await aiocuda.gpu_op(lambda xs: (time.sleep(0.2), xs)[1], items)

    caplog.set_level(logging.ERROR, logger="aiocuda")
    loop = asyncio.new_event_loop()

    async def start() -> list[asyncio.Task[int]]:
        tasks = [loop.create_task(slow(i)) for i in range(3)]  # 2 run, 1 waits
        await asyncio.sleep(0.05)
        return tasks

    tasks = loop.run_until_complete(start())
    loop.close()
    del tasks, loop
    time.sleep(0.3)  # the function's work ends against the closed loop
    gc.collect()
    assert asyncio.run(asyncio.wait_for(slow(7), 5)) == 7  # the batcher works on
    gc.collect()
    assert not [r for r in caplog.records if r.name.startswith("aiocuda")], caplog.text


def test_the_batch_function_runs_in_its_first_callers_contextvars(go):
    # asyncio's create_task copies the caller's context; trio's system tasks ran in the run's
    # own, so a request id set by the caller read "unset" in the batch function under trio only.
    import contextvars

    request = contextvars.ContextVar("request", default="unset")
    seen: list[str] = []

    @aiocuda.batch(max_batch_size=8, max_wait_s=0.0)
    async def double(items: list[int]) -> list[int]:
        seen.append(request.get())
        return [2 * i for i in items]

    async def body() -> int:
        request.set("request-1")
        return await double(21)

    assert go(body) == 42
    assert seen == ["request-1"]


def test_a_method_gets_one_batcher_per_instance(go):
    m1, m2 = Model(10), Model(100)
    assert isinstance(Model.predict, aiocuda.Batcher)
    assert m1.predict is m1.predict and m1.predict is not m2.predict
    assert Model.predict.__name__ == "predict"

    async def body() -> dict[tuple[int, int], int]:
        out: dict[tuple[int, int], int] = {}

        async def call(m: Model, i: int) -> None:
            out[(m.scale, i)] = await m.predict(i)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(call, m1, i)
                tg.start_soon(call, m2, i)
        return out

    assert go(body) == {(s, i): s * i for s in (10, 100) for i in range(3)}
    assert m1.batches == [[0, 1, 2]] and m2.batches == [[0, 1, 2]]


def _traced(fn: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(*args: Any) -> Any:  # no functools.wraps: every method is "wrapper"
        return await fn(*args)

    return wrapper


class TwoMethods:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    @aiocuda.batch(max_batch_size=4, max_wait_s=0.01)
    @_traced
    async def embed(self, items: list[int]) -> list[str]:
        self.calls.append(("embed", items))
        return [f"e{i}" for i in items]

    @aiocuda.batch(max_batch_size=4, max_wait_s=0.01)
    @_traced
    async def classify(self, items: list[int]) -> list[str]:
        self.calls.append(("classify", items))
        return [f"c{i}" for i in items]

    async def _impl(self, items: list[int]) -> list[int]:
        self.calls.append(("impl", items))
        return items

    small = aiocuda.batch(max_batch_size=1, max_wait_s=0.01)(_impl)
    big = aiocuda.batch(max_batch_size=8, max_wait_s=0.01)(_impl)


def test_batched_methods_of_one_qualname_keep_their_own_batchers(go):
    # Both methods of TwoMethods are "TwoMethods.<locals>..._traced.<locals>.wrapper" by name:
    # an instance kept one batcher per name, so m.classify ran embed's function; and one
    # function batched twice shared the first batcher's settings.
    m = TwoMethods()
    assert m.embed is not m.classify and m.small is not m.big
    assert m.big.max_batch_size == 8 and m.small.max_batch_size == 1

    async def body() -> list[str]:
        return [await m.embed(1), await m.classify(2)]

    assert go(body) == ["e1", "c2"]
    assert m.calls == [("embed", [1]), ("classify", [2])]


def test_a_shallow_copy_of_an_instance_batches_as_itself(go):
    # copy.copy shares the instance's __dict__ entries, the original's batcher among them: the
    # copy's calls ran as the original's (its scale, its batches).
    import copy

    original = Model(10)

    async def body() -> tuple[int, int]:
        first = await original.predict(2)  # the original's batcher is made now
        clone = copy.copy(original)
        clone.scale, clone.batches = 100, []
        return first, await clone.predict(2)

    assert go(body) == (20, 200)
    assert original.batches == [[2]]


def test_a_method_of_a_class_without_instance_dicts_says_what_to_do():
    class Slotted:
        __slots__ = ()

        @aiocuda.batch
        async def predict(self, items: list[int]) -> list[int]:
            return items

    with pytest.raises(TypeError, match="add '__dict__' to its __slots__"):
        Slotted().predict  # noqa: B018


def test_two_loops_in_two_threads_keep_their_own_queues(go):
    """Each thread's four items are one batch; a batcher shared by both loops must not mix
    them (two from each thread would make a batch of four first)."""
    batches: list[tuple[int, list[str]]] = []
    barrier = threading.Barrier(2, timeout=30)

    @aiocuda.batch(max_batch_size=4, max_wait_s=HOUR)
    async def f(items: list[str]) -> list[str]:
        batches.append((threading.get_ident(), sorted(items)))
        await doubled([1])
        return [x.upper() for x in items]

    async def body() -> None:
        me = threading.current_thread().name
        waiting = 0

        async def call(i: int) -> None:
            nonlocal waiting
            waiting += 1
            assert await f(f"{me}-{i}") == f"{me}-{i}".upper()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 0)
            tg.start_soon(call, 1)
            await until(lambda: waiting == 2)
            await anyio.to_thread.run_sync(barrier.wait)  # both threads have two waiting
            await spin()
            tg.start_soon(call, 2)
            tg.start_soon(call, 3)

    errors: list[BaseException] = []
    idents: dict[str, int] = {}

    def thread_main() -> None:
        idents[threading.current_thread().name] = threading.get_ident()
        try:
            go(body)
        except BaseException as exc:  # reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=thread_main, name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert sorted(items for _, items in batches) == [
        [f"{n}-{i}" for i in range(4)] for n in ("a", "b")
    ]
    for ident, items in batches:  # each batch ran on its callers' loop
        assert ident == idents[items[0][0]]


def test_nothing_is_left_running_while_nothing_waits(go):
    async def body() -> None:
        b = aiocuda.batch(max_batch_size=2, max_wait_s=0)(doubled)
        await b(0)  # aiocuda's own queue watcher exists from here on
        await spin()
        before = _living_tasks()
        async with anyio.create_task_group() as tg:
            for i in range(7):
                tg.start_soon(b, i)
        await spin(5)
        (q,) = queues(b)
        assert q.waiting == {} and q.running == 0 and not q.dispatching and q.wakeup is None
        assert _living_tasks() == before

    go(body)


def _living_tasks() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # not asyncio: trio
        import trio

        return trio.lowlevel.current_statistics().tasks_living


@pytest.mark.parametrize("when", ["waiting", "running"])
def test_a_loop_that_ends_with_callers_waiting_ends_cleanly(go, when):
    """The run ends while a caller waits for an hour (or its batch waits forever): it is
    cancelled, the batcher's tasks end with it, nothing is reported to the loop's exception
    handler or the log."""
    problems: list[Any] = []
    never = threading.Event()  # set only after the run: the batch would run forever

    @aiocuda.batch(max_batch_size=1 if when == "running" else 8, max_wait_s=HOUR)
    async def f(items: list[int]) -> list[int]:
        while not never.is_set():
            await doubled(items)
        return items

    async def body() -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            import trio

            trio.lowlevel.spawn_system_task(f, 1)  # cancelled when the main task has ended
        else:
            loop.set_exception_handler(lambda _loop, ctx: problems.append(ctx))
            loop.create_task(f(1))  # cancelled by the runner when the body has ended
        await spin()
        (q,) = queues(f)
        if when == "running":
            assert q.waiting == {} and q.running == 1
        else:
            assert len(q.waiting) == 1 and q.dispatching

    logger = logging.getLogger("aiocuda")
    handler = logging.Handler()
    handler.emit = problems.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        go(body)
    finally:
        logger.removeHandler(handler)
        never.set()
    assert problems == []
