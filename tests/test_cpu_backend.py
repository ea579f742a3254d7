"""The cpu backend: submit, order, events, cross-stream waits, close."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback

import pytest

import aiocuda
from aiocuda import _core

from .conftest import Ticker
from .loops import Tasks, gather, in_thread, sleep, wait_for


def test_submit_returns_the_result(run_any):
    async def main():
        with aiocuda.CpuStream() as s:
            return await s.submit(lambda a, b=0: a * 10 + b, 4, b=2)

    assert run_any(main()) == 42


def test_submit_reraises_and_the_stream_stays_usable(run_any):
    def boom():
        raise KeyError("nope")

    async def main():
        with aiocuda.CpuStream() as s:
            with pytest.raises(KeyError, match="nope") as info:
                await s.submit(boom)
            frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
            assert "boom" in frames  # the worker's traceback travels with the exception
            return await s.submit(len, "abc")

    assert run_any(main()) == 3


def test_work_runs_in_submission_order(run_any):
    async def main():
        seen = []
        with aiocuda.CpuStream() as s:
            futs = [s.submit(seen.append, i) for i in range(2000)]
            await gather(*futs)
        return seen

    assert run_any(main()) == list(range(2000))


def test_awaiting_a_stream_waits_for_prior_work(run_any):
    async def main():
        with aiocuda.CpuStream() as s:
            t0 = time.monotonic()
            s.delay(0.05)
            await s
            return time.monotonic() - t0

    assert run_any(main()) >= 0.045


def test_event_done_and_await(run_any):
    async def main():
        with aiocuda.CpuStream() as s:
            s.delay(0.05)
            ev = s.record()
            assert not ev.done()
            await ev
            assert ev.done()
            await ev  # awaiting again is fine
            return repr(ev)

    assert "done" in run_any(main())


def test_cancelling_one_event_awaiter_leaves_the_others(run_any):
    async def main():
        with aiocuda.CpuStream() as s:
            s.delay(0.05)
            ev = s.record()
            async with Tasks() as ts:
                a = ts.spawn(_await(ev))
                b = ts.spawn(_await(ev))
                await sleep(0)
                a.cancel()
                await b
                assert a.cancelled()
                assert ev.done()

    async def _await(ev):
        await ev

    run_any(main())


def test_wait_event_orders_work_across_streams(run_any):
    async def main():
        with aiocuda.CpuStream() as s1, aiocuda.CpuStream() as s2:
            t0 = time.monotonic()
            s1.delay(0.08)
            ev = s1.record()
            s2.wait_event(ev)
            started = await s2.submit(time.monotonic)
            assert ev.done()
            return started - t0

    assert run_any(main()) >= 0.075


def test_wait_on_an_event_never_recorded_does_not_block(run_any):
    async def main():
        with aiocuda.CpuStream() as s1, aiocuda.CpuStream() as s2:
            ev = s1.record()
            await ev
            s2.wait_event(ev)
            return await s2.submit(lambda: "ran")

    assert run_any(main()) == "ran"


def test_close_is_idempotent_and_refuses_new_work(run_any):
    async def main():
        s = aiocuda.CpuStream()
        fut = s.submit(lambda: 1)
        s.close()
        s.close()
        assert s.closed
        assert await fut == 1  # work submitted before close still runs
        with pytest.raises(aiocuda.AiocudaError, match="closed"):
            s.submit(lambda: 2)
        with pytest.raises(aiocuda.AiocudaError, match="closed"):
            aiocuda.synchronize(s)
        with pytest.raises(aiocuda.AiocudaError, match="closed"):
            s.delay(0.1)
        with pytest.raises(aiocuda.AiocudaError, match="closed"):
            s.record()
        with aiocuda.CpuStream() as other:
            ev = other.record()
            with pytest.raises(aiocuda.AiocudaError, match="closed"):
                s.wait_event(ev)
            await ev
        assert aiocuda.statistics().pending == 0

    run_any(main())


def test_submit_releases_the_gil_to_torch_like_work(run_any):
    # The call waits without the GIL (as time.sleep and torch's kernels do) until the loop has
    # run another task 5 times: the loop keeps running while the stream works.
    async def main():
        async with Ticker(period=0.001) as ticker:
            with aiocuda.CpuStream() as s:
                return await s.submit(ticker.reached.wait, 5)

    assert run_any(main()) is True


def test_the_worker_runs_calls_off_the_loop_thread(run_any):
    async def main():
        with aiocuda.CpuStream() as s:
            return await s.submit(threading.get_ident), threading.get_ident()

    worker, loop_thread = run_any(main())
    assert worker != loop_thread


def test_event_synchronize_blocks_a_thread_until_done(run_any):
    async def main():
        with aiocuda.CpuStream() as s:
            s.delay(0.05)
            ev = s.record()
            await in_thread(ev.synchronize)
            return ev.done()

    assert run_any(main()) is True


def test_a_call_may_close_its_own_stream(run_any):
    async def main():
        s = aiocuda.CpuStream()
        first = s.submit(lambda: "before")
        closing = s.submit(s.close)  # runs on the stream's own worker
        assert await first == "before"
        await closing
        assert s.closed
        with pytest.raises(aiocuda.AiocudaError, match="closed"):
            s.submit(lambda: 1)
        s.close()

    run_any(main())


def test_a_call_waiting_for_a_later_record_on_its_own_stream_is_refused(run_any):
    # The worker runs in order: the record is behind the call, so the wait could never end.
    async def main():
        with aiocuda.CpuStream() as s:
            recorded = threading.Event()
            events: list[aiocuda.Event] = []

            def waits_for_itself() -> None:
                assert recorded.wait(10)
                events[0].synchronize()

            call = s.submit(waits_for_itself)
            events.append(s.record())
            recorded.set()
            with pytest.raises(aiocuda.AiocudaError, match="wait for itself"):
                await wait_for(call, 10)
            before = s.record()  # an event its stream already passed: no wait at all
            await s
            assert await wait_for(s.submit(lambda: before.synchronize() or "ok"), 10) == "ok"

    run_any(main())


def test_a_call_awaiting_its_own_stream_on_a_loop_of_its_own_is_refused(run_any):
    def awaits_its_stream(s: aiocuda.CpuStream) -> str:
        async def inner() -> None:
            await s  # the call itself is the stream's current work

        with pytest.raises(aiocuda.AiocudaError, match="wait for itself"):
            asyncio.run(inner())
        with pytest.raises(aiocuda.AiocudaError, match="called by a function running on s"):
            asyncio.run(aiocuda.gpu_op(len, "abc", stream=s))

        async def submits() -> None:
            await s.submit(len, "abc")  # queued behind the call: it waited for good

        with pytest.raises(aiocuda.AiocudaError, match="submitted a call to that same stream"):
            asyncio.run(submits())
        asyncio.run(s.aclose())  # as close(): it cannot wait for itself, and returns
        assert s.closed
        return "refused"

    async def main():
        with aiocuda.CpuStream() as s:
            return await wait_for(s.submit(awaits_its_stream, s), 10)

    assert run_any(main()) == "refused"


def test_gpu_op_work_handing_gpu_op_on_its_own_stream_to_the_callers_loop_is_refused(run):
    # The function's context (and with it the stream it runs on) travels with the coroutine it
    # hands to its caller's loop: the call there would queue behind the function, which waits.
    async def main():
        loop = asyncio.get_running_loop()
        with aiocuda.CpuStream() as s:

            def hands_back() -> str:
                fut = asyncio.run_coroutine_threadsafe(aiocuda.gpu_op(len, "abc", stream=s), loop)
                try:
                    fut.result(10)
                except aiocuda.AiocudaError as exc:
                    return str(exc)
                return "ran"

            out = await wait_for(aiocuda.gpu_op(hands_back, stream=s), 20)
            assert await aiocuda.gpu_op(len, "abc", stream=s) == 3  # from the loop: allowed
            return out

    assert "called by a function running on s" in run(main())


def test_gpu_op_called_by_gpu_op_work_never_waits_for_itself(run_any):
    # A function run by gpu_op may run a loop of its own that calls gpu_op again (here two
    # levels deep). Each pool stream may be the one running the caller, or busy with a caller
    # waiting for its callee; the nested calls use pools of their own, a few threads each.
    def inner(i: int) -> int:
        return asyncio.run(aiocuda.gpu_op(lambda: i * 10)) + 1

    def outer(i: int) -> int:
        async def both() -> list[int]:
            return list(await asyncio.gather(*[aiocuda.gpu_op(inner, i) for _ in range(3)]))

        return sum(asyncio.run(both()))

    async def main():
        workers0 = aiocuda._core.cpu_workers()
        got = await wait_for(gather(*[aiocuda.gpu_op(outer, i) for i in range(8)]), 30)
        return got, aiocuda._core.cpu_workers() - workers0

    got, new_workers = run_any(main())
    assert got == [3 * (i * 10 + 1) for i in range(8)]
    assert new_workers <= 3 * min(4, os.cpu_count() or 1)  # not a thread per nested call


def test_gpu_op_work_that_hands_gpu_op_back_to_the_loop_never_waits_for_itself(run):
    # A function run by gpu_op may hand a gpu_op call to its caller's loop and wait for it
    # (run_coroutine_threadsafe(...).result()), on every pool stream at once. The handed-back
    # calls run on the loop's thread, not on a worker, and went to the same pool, whose every
    # stream was busy with a function waiting for them: each waited until its timeout (review).
    async def main():
        loop = asyncio.get_running_loop()

        def hands_back(i: int) -> int:
            call = asyncio.run_coroutine_threadsafe(aiocuda.gpu_op(lambda: i * 10), loop)
            return call.result(timeout=10) + 1

        return await wait_for(gather(*[aiocuda.gpu_op(hands_back, i) for i in range(8)]), 30)

    assert run(main()) == [i * 10 + 1 for i in range(8)]


def test_tasks_that_gpu_op_work_leaves_running_do_not_nest_deeper(run):
    # A function run by gpu_op that starts the next stage on its caller's loop and returns
    # (a pipeline): the stage's task copies the function's context, but once the function has
    # returned its gpu_op calls count at the caller's depth, not one pool deeper per hop
    # (each pool is a few threads kept for the life of the process: review).
    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        finished = []

        async def stage(i: int) -> None:
            if i < 12:
                await aiocuda.gpu_op(starts_next, i)
            finished.append(i)
            if len(finished) == 13:  # every stage's task has ended
                done.set_result(len(finished))

        def starts_next(i: int) -> None:
            asyncio.run_coroutine_threadsafe(stage(i + 1), loop)

        await stage(0)
        return await wait_for(done, 30)

    pools = len(aiocuda._ops._pools)  # made by earlier tests, for the life of the process
    assert run(main()) == 13
    # pool 0, and pool 1 for a stage begun while its starter had not yet returned
    assert len(aiocuda._ops._pools) <= max(pools, 2)


def test_the_last_reference_may_go_away_on_the_worker(run_any):
    async def main():
        s = aiocuda.CpuStream()
        # The only other reference to `s` travels with the call; once the worker drops it the
        # stream is destroyed on its own worker thread.
        fut = s.submit(lambda stream: repr(stream), s)
        del s
        return await fut

    assert "CpuStream" in run_any(main())


def test_completions_reach_their_futures_in_stream_order(run_any):
    # Calls, plain waits and events mixed on one stream resolve their futures in stream order:
    # when `await s` resumes, every earlier submit's future is done and its callback has run.
    async def main():
        got: list[object] = []
        with aiocuda.CpuStream() as s:
            s.delay(0.01)
            for i in range(5):
                s.submit(int, i).add_done_callback(lambda f: got.append(f.result()))
                aiocuda.synchronize(s).add_done_callback(lambda f, i=i: got.append(f"wait {i}"))
            ev = aiocuda.record(s)
            last = s.submit(int, 99)
            await s
            seen = list(got)
            await gather(ev, last)
        return seen

    expected = [x for i in range(5) for x in (i, f"wait {i}")]
    assert run_any(main()) == expected


def test_a_call_raising_stop_iteration_fails_its_future_only(run_any):
    # A future cannot hold StopIteration; the call's future gets a RuntimeError caused by it,
    # and the rest of the drain pass (here: the same batch) is delivered.
    async def main():
        with aiocuda.CpuStream() as s:
            s.delay(0.01)  # so that all three finish in one drain pass
            bad = s.submit(next, iter([]))
            good = s.submit(int, 1)
            done = aiocuda.synchronize(s)
            results = await wait_for(gather(bad, good, done, return_exceptions=True), 5)
        return results

    bad, good, done = run_any(main())
    assert isinstance(bad, RuntimeError) and "StopIteration" in str(bad)
    assert isinstance(bad.__cause__, StopIteration)
    assert good == 1 and done is None


def test_base_exceptions_from_a_call_reach_the_awaiter(run_any):
    class Stop(BaseException):
        pass

    def boom() -> None:
        raise Stop("not an Exception")

    async def main():
        with aiocuda.CpuStream() as s:
            fut = s.submit(boom)
            with pytest.raises(Stop, match="not an Exception"):
                await wait_for(fut, 5)
            return await s.submit(int, 2)

    assert run_any(main()) == 2


def test_a_record_refused_by_a_closed_stream_leaves_the_event_as_it_was(run_any):
    from aiocuda import _core

    ev = _core.CpuEvent()
    s = aiocuda.CpuStream()
    s.close()
    assert s._record(ev)  # refused, with the reason
    assert ev.done()  # never recorded: nothing to wait for
    ev.wait()  # returns at once


def test_a_worker_keeps_one_python_thread_state(run_any):
    # One thread state for the worker's life (not one per call: making one takes CPython's
    # runtime lock without the GIL, which a fork elsewhere could leave held in the child).
    local = threading.local()

    def count() -> int:
        local.n = getattr(local, "n", 0) + 1
        return local.n

    async def main():
        with aiocuda.CpuStream() as s:
            return [await s.submit(count) for _ in range(3)]

    assert run_any(main()) == [1, 2, 3]


def test_a_cancelled_submit_still_runs_its_function(run_any):
    # As work enqueued on a CUDA stream: cancelling the future drops the outcome, not the call.
    async def main():
        ran = []
        async with aiocuda.CpuStream() as s:
            gate = threading.Event()
            s.submit(gate.wait, 10)
            fut = s.submit(ran.append, "ran")
            fut.cancel()
            gate.set()
            await s
            assert fut.cancelled()
        assert ran == ["ran"]

    run_any(main())


def test_gpu_op_keeps_one_worker_for_calls_in_turn_and_spreads_calls_made_together(run_any):
    # A call after another goes to the worker that ran it (still awake: no thread wake-up);
    # calls made together go to different workers, so they run at once.
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the pool has one stream on a machine with one CPU")

    async def main():
        in_turn = {await aiocuda.gpu_op(threading.get_ident) for _ in range(20)}
        gate = threading.Barrier(2, timeout=10)  # both calls must run at the same time
        together = await gather(aiocuda.gpu_op(lambda: (gate.wait(), threading.get_ident())[1]),
                                aiocuda.gpu_op(lambda: (gate.wait(), threading.get_ident())[1]))
        return in_turn, set(together)

    in_turn, together = run_any(main())
    assert len(in_turn) == 1
    assert len(together) == 2


def test_posted_calls_count_as_finished(run_any):
    # A posted call (the benchmarks' Python callbacks: nobody awaits its outcome) was never
    # counted as finished, so its stream looked busy for good to gpu_op's pool, which picks
    # the stream with the least pending.
    async def main():
        with aiocuda.CpuStream() as s:
            for _ in range(5):
                assert s._post(lambda: None) == ""
            await wait_for(aiocuda.synchronize(s), 10)
            return s._pending

    assert run_any(main()) == 0


def test_a_stream_whose_worker_cannot_start_says_so_and_leaves_nothing():
    workers = _core.cpu_workers()
    _core.cpu_fail_thread_starts(1)  # as the system refuses a thread (ulimit -u, pids.max)
    try:
        with pytest.raises(RuntimeError, match="could not start the CpuStream's worker thread"):
            aiocuda.CpuStream()
    finally:
        _core.cpu_fail_thread_starts(0)
    assert _core.cpu_workers() == workers
    with aiocuda.CpuStream() as s:  # the next one starts
        s.delay(0)
    assert asyncio.run(aiocuda.gpu_op(len, "abc")) == 3
