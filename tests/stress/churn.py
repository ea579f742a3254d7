"""Loop churn, in a process of its own: thousands of event loops of both kinds created, used and
closed in several threads, many closed with work still pending; then fds, threads, live loops,
native records and RSS must be back to their baseline.

    python -m tests.stress.churn --threads 4 --loops 300 --kinds asyncio,uvloop [--cuda]

Each thread (the main thread is one of them) keeps one CpuStream across all its loops (a
stream outlives loops, as in a server) and cycles through: asyncio.run-style runs that leave a
synchronize() of that stream pending at close (two in a row: a loop closed with work pending
is collected while the next one starts); runs with a fresh CpuStream of its own, closed with
work pending; runs that await everything; and (--cuda) runs leaving an await on an emulated
stream pending. Prints one STRESS-RESULT JSON line (tests.stress.common.run_helper reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import gc
import os
import random
import sys
import threading
import time
import weakref
from typing import Any

if __name__ == "__main__" and "AIOCUDA_LIBCUDA" not in os.environ:
    from tests.emu.build import build_emulator

    os.environ["AIOCUDA_LIBCUDA"] = str(build_emulator())

import aiocuda  # noqa: E402
from aiocuda import _core, _loop  # noqa: E402

from .common import (  # noqa: E402
    emit, env_int, fd_count, native_threads, rss_bytes, under_asan, watchdog,
)

MiB = 1 << 20
THREAD_SLACK = 20  # cuda: aiocuda's lanes (one per awaited stream, at most 16 a device) stay


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class Churn:
    def __init__(self, loops: int, kinds: list[str], cuda: bool, emu: Any) -> None:
        self.loops, self.kinds, self.cuda, self.emu = loops, kinds, cuda, emu
        self.refs: list[weakref.ref[asyncio.AbstractEventLoop]] = []
        self.refs_lock = threading.Lock()
        self.errors: list[str] = []
        self.made = 0
        # Loops closed with at least one await still pending, observed after the close: a future
        # of theirs that is not done then (only a drain on the loop's own thread resolves one).
        self.closed_pending = 0
        self.awaits_pending = 0  # their pending futures, in all

    def fail(self, what: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(what)

    def run_one(self, kind: str, coro: Any, use_asyncio_run: bool) -> int:
        """Run `coro` on a new loop of `kind` and close it; `coro` returns the futures it left
        unawaited. Return how many of them were still pending once the loop was closed."""
        errors: list[dict[str, Any]] = []
        if use_asyncio_run and kind == "asyncio":
            holder: list[asyncio.AbstractEventLoop] = []

            async def wrapped() -> Any:
                loop = asyncio.get_running_loop()
                holder.append(loop)
                loop.set_exception_handler(lambda _l, c: errors.append(c))
                return await coro

            result = asyncio.run(wrapped())
            loop = holder[0]
        else:
            loop = new_loop(kind)
            loop.set_exception_handler(lambda _l, c: errors.append(c))
            try:
                result = loop.run_until_complete(coro)
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
        with self.refs_lock:
            self.refs.append(weakref.ref(loop))
            self.made += 1
        for c in errors:
            self.fail(f"loop exception handler: {c.get('message')} {c.get('exception')!r}")
        return sum(1 for f in result if not f.done())  # (the futures go: they hold the loop)

    def thread_body(self, tid: int) -> None:
        rng = random.Random(tid)
        shared = aiocuda.CpuStream()
        handle = self.emu.stream() if self.cuda else 0
        try:
            for i in range(self.loops):
                kind = self.kinds[(i + tid) % len(self.kinds)]
                style = i % 5
                if style in (0, 1):  # leave a synchronize of the long-lived stream pending
                    coro = self.pending_on(shared, rng)
                elif style == 2:
                    coro = self.own_stream_pending(rng)
                elif style == 3:
                    coro = self.all_awaited(shared, rng)
                else:
                    coro = self.cuda_pending(handle, rng) if self.cuda else self.pending_on(
                        shared, rng)
                n = self.run_one(kind, coro, use_asyncio_run=style in (0, 1))
                if n:
                    with self.refs_lock:
                        self.closed_pending += 1
                        self.awaits_pending += n
        finally:
            shared.close()
            if handle:
                self.emu.lib.cuStreamSynchronize(handle)
                self.emu.lib.cuStreamDestroy_v2(handle)

    async def pending_on(self, s: aiocuda.CpuStream, rng: random.Random) -> list[Any]:
        s.delay(rng.random() * 0.002)
        left = [aiocuda.synchronize(s), s.submit(int, 1)]  # done before the next (in order)
        assert await s.submit(int, "7") == 7
        s.delay(0.001)
        s.record()  # an event nobody awaits
        return [*left, aiocuda.synchronize(s)]  # the last one is pending when the loop closes

    async def own_stream_pending(self, rng: random.Random) -> list[Any]:
        s = aiocuda.CpuStream()
        s.delay(rng.random() * 0.002)
        left = [s.synchronize(), s.submit(sum, [1, 2])]
        s.close()  # the completions may land after the loop is gone
        return left

    async def all_awaited(self, s: aiocuda.CpuStream, rng: random.Random) -> list[Any]:
        futs = [s.submit(int, i) for i in range(rng.randrange(1, 20))]
        got = await asyncio.wait_for(asyncio.gather(*futs, s.synchronize()), 10)
        if got[:-1] != list(range(len(futs))):
            self.fail(f"all_awaited: got {got}")
        return futs

    async def cuda_pending(self, h: int, rng: random.Random) -> list[Any]:
        self.emu.sleep(h, rng.random() * 0.002)
        left = [aiocuda.synchronize(h)]
        aiocuda.record(h)  # an event nobody awaits
        await aiocuda.synchronize(h)
        self.emu.sleep(h, 0.001)
        return [*left, aiocuda.synchronize(h)]  # the last one is pending when the loop closes


def live_loops(refs: list[weakref.ref[Any]]) -> int:
    return sum(1 for r in refs if r() is not None)


def churn(threads: int, loops: int, kinds: list[str], cuda: bool,
          timeout: float) -> dict[str, Any]:
    emu = None
    if cuda:
        from tests.conftest import Emu  # noqa: PLC0415 (the emulator's ctypes controls)

        info = _core.cuda_info()
        assert info["available"], info["reason"]
        emu = Emu(__import__("pathlib").Path(os.environ["AIOCUDA_LIBCUDA"]))
    # Warm up what lives as long as the process: each kind's one-time setup, the cuda engine.
    warm = Churn(1, kinds, cuda, emu)
    for kind in kinds:
        warm.run_one(kind, warm.all_awaited(aiocuda.CpuStream(), random.Random(0)), False)
    if cuda:  # aiocuda's lanes (one per awaited stream, up to 16 a device) stay: make them now
        hs = [emu.stream() for _ in range(threads)]
        for h in hs:
            warm.run_one(kinds[0], warm.cuda_pending(h, random.Random(0)), False)
        for h in hs:
            emu.lib.cuStreamSynchronize(h)
            emu.lib.cuStreamDestroy_v2(h)
    settle()
    fds0, threads0, rss0 = fd_count(), native_threads(), rss_bytes()

    job = Churn(loops, kinds, cuda, emu)
    t0 = time.monotonic()
    workers = [threading.Thread(target=job.thread_body, args=(t,), daemon=True)
               for t in range(1, threads)]
    for w in workers:
        w.start()
    job.thread_body(0)  # the main thread churns too (and keeps no loop alive afterwards)
    end = t0 + timeout
    for w in workers:
        w.join(max(0.0, end - time.monotonic()))
    hung = [w.name for w in workers if w.is_alive()]
    seconds = time.monotonic() - t0
    records = settle() if not hung else _core.live_records()
    end = time.monotonic() + 5
    slack = THREAD_SLACK if cuda else 0
    while (native_threads() > threads0 + slack or fd_count() > fds0) and time.monotonic() < end:
        time.sleep(0.01)  # a closed stream's worker exits just after close() returns
    result = {
        "threads": threads, "loops": job.made, "loops_per_thread": loops, "kinds": kinds,
        "cuda": cuda, "closed_with_work_pending": job.closed_pending,
        "awaits_pending_at_close": job.awaits_pending,
        "seconds": round(seconds, 2), "hung_threads": len(hung),
        "live_loops": live_loops(job.refs) if not hung else -1,
        "loop_states": len(_loop._states),
        "live_records": records,
        "cuda_pending": _core.cuda_pending() if cuda else 0,
        "fds_delta": fd_count() - fds0, "threads_delta": native_threads() - threads0,
        "rss_growth": rss_bytes() - rss0, "errors": job.errors,
    }
    return result


def settle() -> int:
    """Collect closed loops' states; wait (5 s at most) for native records to be freed."""
    end = time.monotonic() + 5
    while True:
        gc.collect()
        _loop.close_loop_states()
        if _core.live_records() == 0 or time.monotonic() > end:
            return _core.live_records()
        time.sleep(0.01)


def problems(r: dict[str, Any], *, rss_limit: int | None = 32 * MiB) -> list[str]:
    """The checks a churn result fails, in words (`rss_limit` None: no RSS check)."""
    thread_slack = THREAD_SLACK if r["cuda"] else 0
    checks = [
        (r["hung_threads"], f"{r['hung_threads']} threads hung (a deadlock?)"),
        (r["live_loops"], f"{r['live_loops']} closed loops still alive"),
        (r["loop_states"], f"{r['loop_states']} loop states left after close_loop_states()"),
        (r["live_records"], f"{r['live_records']} native records never freed"),
        (r["cuda_pending"], f"the cuda engine still holds {r['cuda_pending']}"),
        (r["fds_delta"] > 0, f"{r['fds_delta']} more fds than at the baseline"),
        (r["threads_delta"] > thread_slack, f"{r['threads_delta']} more threads than at the "
                                            "baseline"),
        (rss_limit is not None and r["rss_growth"] > rss_limit,
         f"RSS grew {r['rss_growth'] / MiB:.1f} MiB"),
        (r["errors"], f"errors: {r['errors']}"),
        (r["closed_with_work_pending"] == 0, "no loop was closed with work pending"),
    ]
    return [text for bad, text in checks if bad]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--loops", type=int, default=env_int("AIOCUDA_STRESS_LOOPS", 250),
                   help="loops per thread")
    p.add_argument("--kinds", default="asyncio,uvloop")
    p.add_argument("--cuda", action="store_true", help="also leave emulated cuda work pending")
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args()
    # A deadlock must end this process with every thread's traceback, not hang its parent.
    faulthandler.dump_traceback_later(a.timeout + 2, exit=True)
    watchdog()
    r = churn(a.threads, a.loops, a.kinds.split(","), a.cuda, a.timeout)
    # Under AddressSanitizer, RSS holds its quarantine of freed memory (256 MiB by default; a
    # uvloop churn grew 295 MiB): no measure of what aiocuda keeps. The native records, loops,
    # fds and threads are still counted.
    r["rss_checked"] = not under_asan()
    r["problems"] = problems(r, rss_limit=32 * MiB if r["rss_checked"] else None)
    emit(r)
    if r["hung_threads"]:
        faulthandler.dump_traceback(all_threads=True)
        sys.stdout.flush()
        os._exit(3)


if __name__ == "__main__":
    main()
