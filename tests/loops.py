"""One test body, three loops (asyncio, uvloop, trio): what asyncio's and trio's APIs differ in,
said once here. On asyncio and uvloop each helper is asyncio's own call, so the bodies mean
there exactly what they meant before trio was added."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

try:
    import trio
except ImportError:  # pragma: no cover - trio is a test dependency
    trio = None

#: What a timed-out wait_for raises (before 3.11 asyncio's differs from the builtin).
Timeout = (asyncio.TimeoutError, TimeoutError)


def on_trio() -> bool:
    return asyncio.events._get_running_loop() is None


async def sleep(seconds: float) -> None:
    await (trio.sleep(seconds) if on_trio() else asyncio.sleep(seconds))


async def wait_for(aw: Awaitable[Any], timeout: float) -> Any:
    """Await `aw`, cancelling it after `timeout` s with a TimeoutError (trio: TooSlowError
    turned into one)."""
    if not on_trio():
        return await asyncio.wait_for(aw, timeout)
    try:
        with trio.fail_after(timeout):
            return await aw
    except trio.TooSlowError:
        raise TimeoutError(f"not done in {timeout} s") from None


async def gather(*aws: Awaitable[Any], return_exceptions: bool = False) -> list[Any]:
    """asyncio.gather; on trio, one task each in a nursery (an error is raised once all ended)."""
    if not on_trio():
        return await asyncio.gather(*aws, return_exceptions=return_exceptions)
    out: list[Any] = [None] * len(aws)
    failed: list[BaseException] = []

    async def one(i: int, aw: Awaitable[Any]) -> None:
        try:
            out[i] = await aw
        except Exception as exc:
            out[i] = exc
            failed.append(exc)

    async with trio.open_nursery() as n:
        for i, aw in enumerate(aws):
            n.start_soon(one, i, aw)
    if failed and not return_exceptions:
        raise failed[0]
    return out


async def in_thread(fn: Callable[[], Any]) -> Any:
    """Run a blocking `fn` on a worker thread (run_in_executor / trio.to_thread)."""
    if on_trio():
        return await trio.to_thread.run_sync(fn)
    return await asyncio.get_running_loop().run_in_executor(None, fn)


class Task:
    """A started coroutine that can be cancelled and awaited (asyncio.Task; on trio, a task in
    the Tasks nursery with its own cancel scope)."""

    def __init__(self, coro: Coroutine[Any, Any, Any], nursery: Any) -> None:
        self._task: asyncio.Task[Any] | None = None
        if nursery is None:
            self._task = asyncio.ensure_future(coro)
            return
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._value: Any = None
        self._exc: BaseException | None = None
        self._cancelled = False
        nursery.start_soon(self._run, coro)

    async def _run(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            with self._scope:
                self._value = await coro
            self._cancelled = self._scope.cancelled_caught
        except Exception as exc:
            self._exc = exc
        finally:
            coro.close()  # never started if cancelled first
            self._done.set()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
        else:
            self._scope.cancel()

    def cancelled(self) -> bool:
        return self._task.cancelled() if self._task is not None else self._cancelled

    def done(self) -> bool:
        return self._task.done() if self._task is not None else self._done.is_set()

    async def _result(self) -> Any:
        await self._done.wait()
        if self._cancelled:
            raise RuntimeError("awaited a cancelled task")
        if self._exc is not None:
            raise self._exc
        return self._value

    def __await__(self) -> Generator[Any, None, Any]:
        if self._task is not None:
            return self._task.__await__()
        return self._result().__await__()


class Tasks:
    """``async with Tasks() as ts: t = ts.spawn(coro())``: leaving the block waits until every
    task spawned has ended (on trio, a nursery holds them)."""

    async def __aenter__(self) -> Tasks:
        self._cm = trio.open_nursery() if on_trio() else None
        self._nursery = await self._cm.__aenter__() if self._cm is not None else None
        self._spawned: list[Task] = []
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        if self._cm is not None:
            return await self._cm.__aexit__(*exc)  # type: ignore[no-any-return]
        tasks = [t._task for t in self._spawned]
        await asyncio.gather(*tasks, return_exceptions=True)  # type: ignore[arg-type]
        return None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Task:
        task = Task(coro, self._nursery)
        self._spawned.append(task)
        return task
