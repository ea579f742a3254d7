"""The completion engine's figures, each a ratio against an alternative measured in the same run.

    python bench/completion.py [--quick] [--repeats N] [--json PATH]

1. Throughput: 100,000 operations in flight, completions produced natively (a cpu-backend
   stream's native marker; the driver emulator's stream with zero-length work), against the
   in-loop floor (the same futures created and resolved on the loop thread, no cross-thread
   signal) and against loop.call_soon_threadsafe fed from a Python thread (numba-cuda
   async_done style). Stock asyncio and uvloop.
2. Small Python callables: CpuStream.submit against run_in_executor with one worker.
3. Native memory per pending operation (RSS in a fresh process, beyond the futures themselves).
4. No polling: process CPU while 10,000 operations wait one second on slow work.

Medians over repeats; the garbage collector is off inside every timed region (for all methods
alike) so that its pauses do not decide the ratios. This machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.emu.build import build_emulator  # noqa: E402  (test-only emulator, never installed)

EMU = build_emulator()
os.environ.setdefault("AIOCUDA_LIBCUDA", str(EMU))

import aiocuda  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

Timed = Callable[[int], Awaitable[float]]


class Emu:
    def __init__(self) -> None:
        assert "cuda" in aiocuda.backends(), "the driver emulator did not load"  # runs cuInit
        self.lib = ctypes.CDLL(os.environ["AIOCUDA_LIBCUDA"])
        self.lib.emu_enqueue_sleep.argtypes = [ctypes.c_void_p, ctypes.c_longlong]
        self.lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]

    def stream(self) -> int:
        ctx, s = ctypes.c_void_p(), ctypes.c_void_p()
        assert self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) == 0
        self.lib.cuCtxSetCurrent(ctx)
        assert self.lib.cuStreamCreate(ctypes.byref(s), 0) == 0
        return s.value or 0

    def sleep(self, h: int, seconds: float) -> None:
        self.lib.emu_enqueue_sleep(h, int(seconds * 1e6))


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()


# ---- 1. throughput ---------------------------------------------------------------------------
async def floor(n: int) -> float:
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    futs = [loop.create_future() for _ in range(n)]
    for f in futs:
        f.set_result(None)
    await asyncio.gather(*futs)
    return time.perf_counter() - t0


def aiocuda_on(stream: Any) -> Timed:
    async def run(n: int) -> float:
        sync = aiocuda.synchronize
        t0 = time.perf_counter()
        futs = [sync(stream) for _ in range(n)]
        await asyncio.gather(*futs)
        return time.perf_counter() - t0

    return run


async def call_soon_threadsafe(n: int) -> float:
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    futs = [loop.create_future() for _ in range(n)]

    def producer() -> None:  # a Python completion callback per operation, on another thread
        cst = loop.call_soon_threadsafe
        for f in futs:
            cst(f.set_result, None)

    t = threading.Thread(target=producer)
    t.start()
    await asyncio.gather(*futs)
    t.join()
    return time.perf_counter() - t0


# ---- 2. small callables ------------------------------------------------------------------------
def add(a: int, b: int) -> int:
    return a + b


def submit_on(stream: aiocuda.CpuStream) -> Timed:
    async def run(n: int) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*[stream.submit(add, i, 1) for i in range(n)])
        return time.perf_counter() - t0

    return run


def executor_on(pool: ThreadPoolExecutor) -> Timed:
    async def run(n: int) -> float:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        await asyncio.gather(*[loop.run_in_executor(pool, add, i, 1) for i in range(n)])
        return time.perf_counter() - t0

    return run


def measure(kind: str, methods: dict[str, Timed], n: int, repeats: int) -> dict[str, float]:
    """Median seconds of each method, interleaved round by round on one loop."""
    times: dict[str, list[float]] = {m: [] for m in methods}

    async def main() -> None:
        for fn in methods.values():  # warm-up
            await fn(min(n, 1000))
        for _ in range(repeats):
            for name, fn in methods.items():
                gc.collect()
                gc.disable()
                try:
                    times[name].append(await fn(n))
                finally:
                    gc.enable()

    loop = new_loop(kind)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return {m: statistics.median(v) for m, v in times.items()}


# ---- 3. memory ---------------------------------------------------------------------------------
MEMORY_CHILD = "--memory-child"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(method: str, n: int) -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        cpu = aiocuda.CpuStream()
        emu = Emu()
        h = emu.stream()
        cpu.delay(30)  # everything below stays pending
        emu.sleep(h, 30)
        aiocuda.synchronize(cpu).cancel()  # create the loop's queue before the baseline
        aiocuda.synchronize(h).cancel()
        gc.collect()
        gc.disable()
        before = rss_bytes()
        if method == "futures":
            keep = [loop.create_future() for _ in range(n)]
        elif method == "cpu":
            keep = [aiocuda.synchronize(cpu) for _ in range(n)]
        else:
            keep = [aiocuda.synchronize(h) for _ in range(n)]
        print(rss_bytes() - before, flush=True)
        os._exit(0)  # the streams are still busy for 30 s: do not wait for them
        return len(keep)  # keeps `keep` alive up to the measurement

    asyncio.run(main())


def memory(n: int, repeats: int) -> dict[str, float]:
    out: dict[str, list[float]] = {"futures": [], "cpu": [], "cuda-emu": []}
    for _ in range(repeats):
        for method in out:
            r = subprocess.run(
                [sys.executable, __file__, MEMORY_CHILD, method, str(n)],
                capture_output=True, text=True, check=True,
            )
            out[method].append(int(r.stdout.strip()) / n)
    return {m: statistics.median(v) for m, v in out.items()}


# ---- 4. no polling -----------------------------------------------------------------------------
def idle_cpu(kind: str, n: int, window: float) -> dict[str, float]:
    async def main() -> dict[str, float]:
        out = {}
        emu = Emu()
        for name in ("nothing pending", "cpu backend", "cuda (emulator)"):
            futs: list[asyncio.Future[None]] = []
            if name == "cpu backend":
                s = aiocuda.CpuStream()
                s.delay(window + 0.5)
                futs = [aiocuda.synchronize(s) for _ in range(n)]
            elif name == "cuda (emulator)":
                h = emu.stream()
                emu.sleep(h, window + 0.5)
                futs = [aiocuda.synchronize(h) for _ in range(n)]
            await asyncio.sleep(0.1)
            c0, t0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(window)
            out[name] = (time.process_time() - c0) / (time.perf_counter() - t0) * 100
            await asyncio.gather(*futs)
            if name == "cpu backend":
                s.close()
        return out

    loop = new_loop(kind)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


# ---- report ------------------------------------------------------------------------------------
def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == MEMORY_CHILD:
        memory_child(sys.argv[2], int(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer operations and repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    n = 20_000 if args.quick else 100_000
    repeats = args.repeats or (3 if args.quick else 7)
    kinds = ["asyncio"] + (["uvloop"] if uvloop else [])
    report: dict[str, Any] = {
        "machine": f"{platform.node()}: {os.cpu_count()} cpus, {platform.machine()}, "
                   f"Python {platform.python_version()}",
        "operations": n, "repeats": repeats, "throughput": {}, "submit": {},
    }
    emu = Emu()
    print(report["machine"])
    print(f"{n} operations in flight, median of {repeats}\n")
    print(f"{'loop':8} {'method':34} {'ms':>8} {'ops/s':>10} {'vs floor':>9} {'vs cst':>7}")
    for kind in kinds:
        with aiocuda.CpuStream() as cpu:
            h = emu.stream()
            t = measure(kind, {
                "in-loop floor": floor,
                "aiocuda cpu backend": aiocuda_on(cpu),
                "aiocuda cuda (emulator)": aiocuda_on(h),
                "call_soon_threadsafe": call_soon_threadsafe,
            }, n, repeats)
        report["throughput"][kind] = t
        for m, sec in t.items():
            print(f"{kind:8} {m:34} {sec * 1e3:8.1f} {n / sec:10.0f} "
                  f"{t['in-loop floor'] / sec:8.2f}x {t['call_soon_threadsafe'] / sec:6.2f}x")
    print(f"\nsmall Python callables ({n // 5} calls, median of {repeats})")
    for kind in kinds:
        with aiocuda.CpuStream() as cpu, ThreadPoolExecutor(1) as pool:
            t = measure(kind, {"CpuStream.submit": submit_on(cpu),
                               "run_in_executor (1 worker)": executor_on(pool)}, n // 5, repeats)
        report["submit"][kind] = t
        ratio = t["run_in_executor (1 worker)"] / t["CpuStream.submit"]
        print(f"{kind:8} submit {n // 5 / t['CpuStream.submit']:9.0f}/s, run_in_executor "
              f"{n // 5 / t['run_in_executor (1 worker)']:9.0f}/s: {ratio:.2f}x")
    mem_n = 50_000 if args.quick else 200_000
    mem = memory(mem_n, 3)
    report["memory_bytes_per_op"] = mem
    print(f"\nmemory per pending operation ({mem_n} pending, RSS, median of 3 processes)")
    print(f"  asyncio future alone: {mem['futures']:.0f} B; with aiocuda: cpu backend "
          f"{mem['cpu']:.0f} B (+{mem['cpu'] - mem['futures']:.0f}), cuda on the emulator "
          f"{mem['cuda-emu']:.0f} B (+{mem['cuda-emu'] - mem['futures']:.0f}, the emulator's own "
          "queue entry included)")
    print("\nprocess CPU while 10,000 operations wait 1 s on slow work (% of one core)")
    report["idle_cpu_percent"] = {}
    for kind in kinds:
        c = idle_cpu(kind, 10_000, 1.0)
        report["idle_cpu_percent"][kind] = c
        print(f"  {kind:8} " + ", ".join(f"{k}: {v:.2f}%" for k, v in c.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
