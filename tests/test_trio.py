"""trio and anyio: what only a trio run has (cancel scopes, its worker threads, the run's end),
and anyio on both of its backends. The core bodies run on trio too (the `run_any` suites)."""

from __future__ import annotations

import os
import threading
import time
import traceback

import pytest

import aiocuda
from aiocuda import _core, _loop

from .conftest import no_collection, settle_native, wait_until

trio = pytest.importorskip("trio", reason="trio is a test dependency: pip install aiocuda[test]")
anyio = pytest.importorskip("anyio", reason="anyio is a test dependency: pip install aiocuda[test]")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_cancelled_wait_is_never_resurrected_and_its_record_is_freed():
    async def main():
        with aiocuda.CpuStream() as s:
            s.delay(0.05)
            fut = aiocuda.synchronize(s)
            with trio.move_on_after(0.005) as scope:
                await fut
            assert scope.cancelled_caught
            assert fut.cancelled() and aiocuda.statistics().pending == 1
            await s  # the cancelled wait's completion lands after it, and is dropped
            assert fut.cancelled()
            assert aiocuda.statistics().pending == 0
            return _core.live_records()

    assert trio.run(main) == 0
    settle_native()


def test_a_wait_left_by_one_of_two_tasks_still_completes_for_the_other():
    async def main():
        got = []
        with aiocuda.CpuStream() as s:
            s.delay(0.03)
            fut = s.submit(lambda: "value")

            async def waiter(scope: trio.CancelScope) -> None:
                with scope:
                    got.append(await fut)

            left, stays = trio.CancelScope(), trio.CancelScope()
            async with trio.open_nursery() as n:
                n.start_soon(waiter, left)
                n.start_soon(waiter, stays)
                await trio.sleep(0.005)
                left.cancel()
        return got, fut.cancelled()

    assert trio.run(main) == (["value"], False)  # the last waiter left nothing to cancel


def test_a_cancel_that_lands_as_the_wait_completes_leaves_the_task_its_result(caplog):
    # A future with done callbacks defers its waiters' wake-up behind them: a cancel delivered
    # in between (here by the callback itself) found the task gone from the waiters and raised
    # ValueError inside trio's cancellation (a nursery's first-done-wins, or a timeout landing
    # just after the work, ended the run with TrioInternalError).
    async def main():
        async with aiocuda.CpuStream() as s:
            s.delay(0.002)
            fut = s.submit(lambda: "value")
            with trio.CancelScope() as scope:
                fut.add_done_callback(lambda _: scope.cancel())
                got = await fut
                await trio.lowlevel.checkpoint()  # where the cancellation is delivered
            return got, scope.cancelled_caught

    with caplog.at_level("ERROR", logger="aiocuda"):
        assert trio.run(main) == ("value", True)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_a_run_that_ends_with_more_completions_due_than_one_drain_ends_cleanly():
    # The drain resolves _loop.BATCH at a time and schedules the rest; the run's end closes the
    # queue first, and that pass used to raise on the closed queue: TrioInternalError.
    with aiocuda.CpuStream() as s:
        async def main():
            s.delay(0.01)
            futs = [aiocuda.synchronize(s) for _ in range(12 * _loop.BATCH)]
            await futs[0]  # and return, with the others' completions landing

        for _ in range(3):
            trio.run(main)
    settle_native()
    assert _core.live_records() == 0


def test_a_trio_worker_thread_is_not_the_run():
    async def main():
        with aiocuda.CpuStream() as s:
            with pytest.raises(aiocuda.AiocudaError, match=r"needs a running event loop.*trio\.run"):
                await trio.to_thread.run_sync(aiocuda.synchronize, s)
            await s

    trio.run(main)


def test_the_runs_end_closes_its_queue_and_fd_with_work_in_flight():
    s = aiocuda.CpuStream()
    fds = _fds()
    states = []

    async def main():
        s.delay(0.1)
        futs = [aiocuda.synchronize(s) for _ in range(10)] + [s.submit(lambda: "late")]
        states.append(_loop.state_for(_loop.running_loop("test")))
        return futs

    futs = trio.run(main)  # the run ends with all of it pending: it fails them (nobody waited)
    assert all(isinstance(f.exception(), aiocuda.AiocudaError) for f in futs)
    assert states[0].queue.closed
    assert _core.live_records() == 11  # they keep the native queue and its fd until they land
    s.close()  # the work completes now, into a queue whose run has ended
    settle_native()
    assert _fds() == fds  # then the eventfd is closed


def test_no_cpu_on_the_runs_thread_while_the_work_runs():
    async def main():
        with aiocuda.CpuStream() as s:
            await s  # first use: the queue and its task are set up
            s.delay(0.3)
            with no_collection():
                before = time.thread_time()
                await s
                return time.thread_time() - before

    # A thread that polled would use the whole 0.3 s; asleep in wait_readable it uses next to
    # nothing (thread CPU time, so a loaded machine does not make it larger; the bound leaves room
    # for a sanitizer build's slower bookkeeping).
    assert trio.run(main) < 0.1


def test_several_trio_runs_in_several_threads_keep_their_own_queues():
    results: dict[int, object] = {}
    shared = aiocuda.CpuStream()

    def worker(i: int) -> None:
        async def main():
            loop = _loop.running_loop("test")
            futs = [shared.submit(lambda: i) for _ in range(500)]
            out = [await f for f in futs]
            return out == [i] * 500, aiocuda.statistics().completed, loop

        try:
            results[i] = trio.run(main)
        except BaseException as exc:  # reported below
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    shared.close()
    assert [r[:2] for r in results.values()] == [(True, 500)] * 4, results
    assert len({id(r[2]) for r in results.values()}) == 4  # one loop adapter per run
    settle_native()


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_anyio_on_both_backends(backend):
    async def main():
        with aiocuda.CpuStream() as s:
            s.delay(0.02)
            results = []
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(lambda i=i: _append(results, s, i))
            with anyio.move_on_after(0.005) as scope:
                s.delay(0.2)
                await s
            assert scope.cancelled_caught
            await s
            doubled = await aiocuda.gpu_op(lambda x: x * 2, 21)
        return sorted(results), doubled

    async def _append(results, s, i):
        results.append(await s.submit(lambda: i))

    options = {"use_uvloop": True} if backend == "uvloop" else {}
    got = anyio.run(main, backend="asyncio" if backend == "uvloop" else backend,
                    backend_options=options)
    assert got == ([0, 1, 2], 42)
    settle_native()


def test_the_future_api_under_trio():
    async def main():
        loop = _loop.running_loop("test")
        fut = loop.create_future()
        seen = []
        fut.add_done_callback(lambda f: seen.append(("cb", f.result())))
        fut.add_done_callback(seen.append)
        assert fut.remove_done_callback(seen.append) == 1
        assert not fut.done() and fut.get_loop() is loop
        with pytest.raises(Exception, match="not set"):
            fut.result()
        fut.set_result(5)
        with pytest.raises(Exception, match="invalid state"):
            fut.set_result(6)  # the native drain relies on this to drop late completions
        assert await fut == 5 and fut.exception() is None
        await trio.sleep(0)
        assert seen == [("cb", 5)]
        failed = loop.create_future()
        failed.set_exception(ValueError("no"))
        with pytest.raises(ValueError, match="no"):
            await failed
        assert not failed.cancel() and not failed.cancelled()

        other = loop.create_future()

        async def waiter():
            with pytest.raises(aiocuda.AiocudaError, match="cancel scope"):
                await other

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.sleep(0.001)
            assert other.cancel()  # another task's future: trio cannot cancel that task

    trio.run(main)


def test_each_wait_on_a_failed_future_raises_it_with_its_own_traceback():
    # As asyncio.Future (3.11+): the exception is raised with the traceback it was set with.
    # Raised as it was, each wait chained its frames onto the previous one's: a failed future
    # awaited again and again (a shielded Event in a retry loop, several tasks on one future)
    # kept every earlier waiter's frames, and their locals, for as long as the future.
    def boom() -> None:
        raise ValueError("boom")

    def depth(exc: BaseException) -> int:
        n, tb = 0, exc.__traceback__
        while tb is not None:
            n, tb = n + 1, tb.tb_next
        return n

    async def main():
        with aiocuda.CpuStream() as s:
            fut = s.submit(boom)
            depths = []
            for _ in range(20):
                with pytest.raises(ValueError, match="boom") as info:
                    await fut
                depths.append(depth(info.value))
            frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
        return depths, frames

    depths, frames = trio.run(main)
    assert depths == [depths[0]] * 20
    assert "boom" in frames  # the worker's frames are still there


def test_a_trio_run_and_an_asyncio_loop_at_once():
    import asyncio

    done = threading.Event()
    out: dict[str, object] = {}

    def trio_side() -> None:
        async def main():
            with aiocuda.CpuStream() as s:
                s.delay(0.05)
                await s
            return "trio"

        out["trio"] = trio.run(main)
        done.set()

    async def asyncio_side():
        with aiocuda.CpuStream() as s:
            s.delay(0.05)
            await s
        return "asyncio"

    t = threading.Thread(target=trio_side)
    t.start()
    out["asyncio"] = asyncio.run(asyncio_side())
    assert wait_until(done.is_set, 30)
    t.join()
    assert out == {"trio": "trio", "asyncio": "asyncio"}
    settle_native()


@pytest.mark.parametrize("how", ["trio.run in a coroutine", "guest of asyncio",
                                 "asyncio.run in a trio task", "uvloop in a trio task"])
def test_asyncio_and_trio_on_one_thread_each_call_gets_the_loop_that_runs_it(how):
    # Jupyter's %autoawait trio calls trio.run from a coroutine; trio's guest mode runs on an
    # asyncio host; a trio task may call asyncio.run. Each aiocuda call belongs to the loop
    # running the calling task, the native fast path (synchronize) included.
    import asyncio

    async def in_trio() -> str:
        with aiocuda.CpuStream() as s:
            s.delay(0.01)
            fut = aiocuda.synchronize(s)
            assert not isinstance(fut, asyncio.Future)
            await fut
            assert await s.submit(lambda: 2) == 2
            assert await aiocuda.gpu_op(lambda: 3) == 3
        return "trio"

    async def in_asyncio() -> str:
        with aiocuda.CpuStream() as s:
            s.delay(0.01)
            fut = aiocuda.synchronize(s)
            assert isinstance(fut, asyncio.Future)
            await fut
            assert await s.submit(lambda: 4) == 4
        return "asyncio"

    if how == "trio.run in a coroutine":
        async def host() -> tuple[str, str]:
            return trio.run(in_trio), await in_asyncio()

        assert asyncio.run(host()) == ("trio", "asyncio")
    elif how == "guest of asyncio":
        async def host() -> tuple[str, str]:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[object] = loop.create_future()
            trio.lowlevel.start_guest_run(
                in_trio, run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                done_callback=done.set_result)
            outcome = await done
            return outcome.unwrap(), await in_asyncio()  # type: ignore[attr-defined]

        assert asyncio.run(host()) == ("trio", "asyncio")
    elif how == "asyncio.run in a trio task":
        async def host() -> tuple[str, str]:
            return asyncio.run(in_asyncio()), await in_trio()

        assert trio.run(host) == ("asyncio", "trio")
    else:  # uvloop steps its tasks with no Python frame of its own on the stack (review)
        uvloop = pytest.importorskip("uvloop", reason="the uvloop case needs uvloop")

        async def host() -> tuple[str, str]:
            loop = uvloop.new_event_loop()
            try:
                return loop.run_until_complete(in_asyncio()), await in_trio()
            finally:
                loop.close()

        assert trio.run(host) == ("asyncio", "trio")
    settle_native()


def test_awaiting_again_after_the_last_waiter_was_cancelled_raises_an_aiocuda_error():
    # asyncio's CancelledError is a BaseException trio knows nothing of: it escaped the run.
    async def main():
        with aiocuda.CpuStream() as s:
            s.delay(0.1)
            fut = s.submit(lambda: 5)
            with trio.move_on_after(0.005):
                await fut
            with pytest.raises(aiocuda.AiocudaError, match="outcome was dropped"):
                await fut
            await s

    trio.run(main)
    settle_native()


def test_a_future_waits_with_ctrl_c_deferred_until_it_sleeps(monkeypatch):
    # Ctrl-C between joining the waiters and sleeping would leave the task among them, to be
    # rescheduled while it sleeps elsewhere ("Should never have been rescheduled"): trio delivers
    # it through abort() instead where the code is KI-protected, as ParkingLot.park is.
    import aiocuda._trio as trio_adapter

    seen = []
    real = trio.lowlevel.wait_task_rescheduled

    async def spy(abort):
        seen.append(trio.lowlevel.currently_ki_protected())
        return await real(abort)

    monkeypatch.setattr(trio_adapter.trio.lowlevel, "wait_task_rescheduled", spy)

    async def main():
        with aiocuda.CpuStream() as s:
            s.delay(0.01)
            await s.submit(lambda: 1)

    trio.run(main)
    assert seen == [True]


def test_done_callbacks_run_in_their_callers_context_as_on_asyncio():
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="none")

    async def main():
        loop = _loop.running_loop("test")
        seen = []
        var.set("caller")
        fut = loop.create_future()
        fut.add_done_callback(lambda f: seen.append(("implicit", var.get())))
        ctx = contextvars.copy_context()
        ctx.run(var.set, "explicit")
        fut.add_done_callback(lambda f: seen.append(("context=", var.get())), context=ctx)
        var.set("later")  # the context was copied when the callback was added
        fut.set_result(1)
        done = loop.create_future()
        done.set_result(2)
        done.add_done_callback(lambda f: seen.append(("done", var.get())))
        await trio.sleep(0.01)
        return seen

    assert trio.run(main) == [("implicit", "caller"), ("context=", "explicit"),
                              ("done", "later")]


def test_a_generator_finalized_at_the_runs_end_closes_its_stream_and_says_why(caplog):
    # An async generator left suspended (a client went away) is finalized by trio after the
    # run's tasks: its `async with CpuStream()` then failed inside trio ("Nursery is closed to
    # new arrivals") and left the stream open.
    streams = []

    async def tokens():
        async with aiocuda.CpuStream() as s:
            streams.append(s)
            for i in range(10):
                yield await s.submit(lambda i=i: i)

    async def main():
        agen = tokens()
        assert await agen.__anext__() == 0
        main.agen = agen  # type: ignore[attr-defined]  # kept past the run's tasks

    fds = _fds()
    trio.run(main)
    del main.agen  # type: ignore[attr-defined]
    assert streams[0].closed
    assert "this trio run is ending" in caplog.text
    settle_native()
    assert _core.live_records() == 0 and _fds() <= fds


def test_closing_a_stream_in_a_trio_run_never_waits_for_its_work():
    async def main():
        gate = threading.Event()
        s = aiocuda.CpuStream()
        held = s.submit(gate.wait, 30)
        s.close()  # on the run's thread: returns at once, the work runs on
        assert s.closed and not held.done()
        gate.set()
        assert await held is True  # its future still completes

    trio.run(main)
    settle_native()


def test_an_event_awaited_in_another_run_or_loop_says_where_to_await_it():
    import asyncio

    made: list[aiocuda.Event] = []

    async def record_in_trio():
        with aiocuda.CpuStream() as s:
            made.append(s.record())
            await made[-1]

    async def await_elsewhere():
        with pytest.raises(aiocuda.AiocudaError, match="another trio run"):
            await made[0]

    trio.run(record_in_trio)
    trio.run(await_elsewhere)  # a second run
    asyncio.run(await_elsewhere())  # an asyncio loop

    async def record_in_asyncio():
        with aiocuda.CpuStream() as s:
            made[:] = [s.record()]
            await made[0]

    async def await_in_trio():
        with pytest.raises(aiocuda.AiocudaError, match="another event loop"):
            await made[0]

    asyncio.run(record_in_asyncio())
    trio.run(await_in_trio)
    settle_native()


@pytest.mark.parametrize("what", ["submit", "record", "synchronize"])
def test_a_system_tasks_shielded_wait_at_the_runs_end_completes(what):
    # A system task (every aiocuda.batch function under trio is one) cleaning up after the main
    # task returned: its shielded wait must complete, whether the queue's watcher was cancelled
    # before the wait began (a new queue serves it) or after (the watcher drains until no task
    # waits). It slept for good on a closed queue's future, or crashed the run.
    log: list[str] = []

    async def background(s: aiocuda.CpuStream) -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                s.delay(0.01)
                if what == "submit":
                    log.append(f"done {await s.submit(lambda: 42)}")
                elif what == "record":
                    log.append(f"done {await aiocuda.record(s)}")
                else:
                    log.append(f"done {await aiocuda.synchronize(s)}")

    async def main() -> None:
        s = aiocuda.CpuStream()
        await s  # the run has a queue, whose watcher the run's end cancels
        trio.lowlevel.spawn_system_task(background, s)
        await trio.sleep(0.01)

    def run() -> None:
        try:
            trio.run(main)
            log.append("returned")
        except BaseException as exc:  # noqa: BLE001 (reported below)
            log.append(f"raised {exc!r}")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), f"the run never ended: {log}"
    assert log == [f"done {42 if what == 'submit' else None}", "returned"]
    settle_native()


def test_a_wait_not_awaited_before_the_runs_queue_closed_fails_when_awaited():
    # Its future would never be settled: awaiting it must raise, not sleep for good.
    seen: list[str] = []

    async def background(s: aiocuda.CpuStream, futs: list[object]) -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                while not _loop.running_loop("test").is_closed():  # the watcher closed the queue
                    await trio.sleep(0.001)
                try:
                    await futs[0]
                    seen.append("completed")
                except aiocuda.AiocudaError as exc:
                    seen.append(str(exc))

    async def main() -> None:
        s = aiocuda.CpuStream()
        await s
        s.delay(0.05)
        futs = [aiocuda.synchronize(s)]  # started in the run, awaited only at its end
        trio.lowlevel.spawn_system_task(background, s, futs)
        await trio.sleep(0.01)

    t = threading.Thread(target=trio.run, args=(main,), daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the run never ended"
    assert len(seen) == 1 and "no task waited for this aiocuda operation" in seen[0], seen
    settle_native()


def test_an_asyncio_loop_in_a_trio_task_awaiting_the_runs_future_is_refused_cleanly():
    # asyncio.run inside a trio task: the trio run's token is current on the thread, but asyncio
    # steps the awaiting task. It got "Task got bad yield", and the trio task stayed registered
    # as a waiter, rescheduled by the completion later while it slept elsewhere ("Should never
    # have been rescheduled").
    import asyncio

    async def consume(fut: object) -> str:
        try:
            await fut  # type: ignore[misc]
        except aiocuda.AiocudaError as exc:
            return str(exc)
        return "awaited"

    async def main() -> list[str]:
        with aiocuda.CpuStream() as s:
            s.delay(0.02)
            fut = aiocuda.synchronize(s)
            out = [asyncio.run(consume(fut)), asyncio.run(consume(aiocuda.record(s)))]
            await trio.sleep(0.05)  # the completions land meanwhile: this task is not woken
            await fut
            return out

    out = trio.run(main)
    assert all("another trio run (or an asyncio loop is awaiting it)" in m for m in out), out
    settle_native()


def test_a_trio_guest_and_its_asyncio_host_refuse_each_others_waits():
    import asyncio

    out: list[str] = []

    async def attempt(aw: object) -> None:
        try:
            await aw  # type: ignore[misc]
            out.append("awaited")
        except aiocuda.AiocudaError as exc:
            out.append(str(exc))

    async def guest(host_event: aiocuda.Event, made: list[object]) -> None:
        await attempt(host_event)
        s = aiocuda.CpuStream()
        s.delay(0.01)
        made.extend([aiocuda.synchronize(s), s])
        await trio.sleep(0.2)  # alive while the host tries its future
        await made[0]
        s.close()

    async def host() -> None:
        loop = asyncio.get_running_loop()
        with aiocuda.CpuStream() as s:
            ev = aiocuda.record(s)
            done = loop.create_future()
            made: list[object] = []
            trio.lowlevel.start_guest_run(guest, ev, made,
                                          run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                                          done_callback=done.set_result)
            while not made:
                await asyncio.sleep(0.001)
            await attempt(made[0])
            (await done).unwrap()

    asyncio.run(host())
    assert "started on another event loop" in out[0], out
    assert "another trio run (or an asyncio loop is awaiting it)" in out[1], out
    settle_native()


def test_a_run_that_made_no_queue_is_closed_when_it_ends():
    # Closed-loop pruning (aiocuda.batch's queues, aiocuda.torch's waits) asks is_closed().
    loops: list[object] = []

    async def main() -> None:
        loops.append(_loop.running_loop("test"))

    trio.run(main)
    assert loops[0].is_closed()  # type: ignore[attr-defined]


def test_a_wait_started_as_the_last_one_at_the_runs_end_is_left_is_served():
    # The last waiter leaving (a timeout) ends the watcher's drain, but the task it woke may wait
    # again before the watcher runs: that wait must be served, not failed as one nobody awaited
    # (the queue closed under it in about half the runs).
    log: list[str] = []

    async def background(s: aiocuda.CpuStream, s2: aiocuda.CpuStream) -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                s.delay(0.05)
                with trio.move_on_after(0.005):
                    await aiocuda.synchronize(s)
                try:
                    log.append(f"served {await s2.submit(lambda: 42)}")
                except aiocuda.AiocudaError as exc:
                    log.append(f"failed: {exc}")

    async def main() -> None:
        s, s2 = aiocuda.CpuStream(), aiocuda.CpuStream()
        await s
        trio.lowlevel.spawn_system_task(background, s, s2)
        await trio.sleep(0.002)

    for _ in range(10):
        log.clear()
        t = threading.Thread(target=trio.run, args=(main,), daemon=True)
        t.start()
        t.join(30)
        assert not t.is_alive(), "the run never ended"
        assert log == ["served 42"], log
    settle_native()
