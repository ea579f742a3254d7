"""Child process of tests/test_gpu.py::test_a_real_sticky_error_fails_the_pending_awaits.

    sticky_error.py STRATEGY LOOP        (STRATEGY: callback | poll; LOOP: asyncio | uvloop)

Awaits pend behind a long kernel on one stream; a kernel on another stream then writes through a
null pointer, which makes the context's error sticky (CUDA_ERROR_ILLEGAL_ADDRESS). Prints one JSON
line saying what every await, the recorded event and a later await did, then leaves with
os._exit(0): after a sticky error the libraries' own teardown may fail, which is not under test.
The kernels come from CuPy (RawModule), or from Triton when CuPy is missing; with neither the
JSON line is {"skip": reason}.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback

SPIN_S = 5.0  # the long kernel; a sticky error must fail its awaits long before it would end

CUDA_SOURCE = r"""
extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        __nanosleep(10000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}

extern "C" __global__ void poke(int* p) {
    p[threadIdx.x] = 42;
}
"""


def cupy_kernels():
    """(name, awaited stream, launch_spin(seconds), launch_poke(), objects to keep alive)."""
    import cupy

    module = cupy.RawModule(code=CUDA_SOURCE)
    spin, poke = module.get_function("spin"), module.get_function("poke")  # compiled here
    long_stream = cupy.cuda.Stream(non_blocking=True)
    bad_stream = cupy.cuda.Stream(non_blocking=True)

    def launch_spin(seconds: float) -> None:
        with long_stream:
            spin((1,), (1,), (cupy.uint64(int(seconds * 1e9)),))

    def launch_poke() -> None:
        with bad_stream:
            poke((1,), (1,), (cupy.uint64(0),))  # int* p = NULL

    # The stream object itself if this CuPy has the __cuda_stream__ protocol, else its handle.
    awaited = long_stream if hasattr(long_stream, "__cuda_stream__") else long_stream.ptr
    return "cupy", awaited, launch_spin, launch_poke, (module, long_stream, bad_stream)


def triton_kernels():
    global tl  # Triton resolves the names a kernel uses in its module's globals
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _poke(ptr, offset_ptr):
        offset = tl.load(offset_ptr)
        tl.store(ptr + offset, 42.0)

    long_stream, bad_stream = torch.cuda.Stream(), torch.cuda.Stream()
    target = torch.zeros(16, device="cuda")
    good = torch.zeros(1, dtype=torch.int64, device="cuda")
    bad = torch.full((1,), 1 << 40, dtype=torch.int64, device="cuda")  # 4 TiB past `target`
    _poke[(1,)](target, good)  # compiles, and writes in bounds
    torch.cuda._sleep(10_000_000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(100_000_000)
    end.record()
    end.synchronize()
    cycles_per_s = 100e6 / (start.elapsed_time(end) / 1e3)

    def launch_spin(seconds: float) -> None:
        with torch.cuda.stream(long_stream):
            torch.cuda._sleep(int(seconds * cycles_per_s))

    def launch_poke() -> None:
        with torch.cuda.stream(bad_stream):
            _poke[(1,)](target, bad)

    return "triton", long_stream, launch_spin, launch_poke, (target, good, bad, bad_stream)


def outcome(value: object) -> object:
    if isinstance(value, BaseException):
        return [type(value).__name__, getattr(value, "name", None), getattr(value, "code", None),
                str(value)[:300]]
    return "ok"


async def main(aiocuda, kernels) -> dict:
    name, awaited, launch_spin, launch_poke, _keep = kernels
    launch_spin(0.001)
    await asyncio.wait_for(aiocuda.synchronize(awaited), 30)  # the path works before the fault
    launch_spin(SPIN_S)
    futs = [aiocuda.synchronize(awaited) for _ in range(100)]
    futs.append(aiocuda.synchronize_device(0))
    ev = aiocuda.record(awaited)
    await asyncio.sleep(0.05)
    pending = sum(not f.done() for f in futs)
    t0 = time.monotonic()
    launch_poke()
    results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 30)
    took = time.monotonic() - t0
    try:
        event = ["done() returned", ev.done()]
    except Exception as exc:  # noqa: BLE001
        event = outcome(exc)
    try:
        later_fut = aiocuda.synchronize(awaited)
    except Exception as exc:  # noqa: BLE001 - refused at once: the context is broken
        later = ["raised at once", outcome(exc)]
    else:
        try:
            await asyncio.wait_for(later_fut, 10)
            later = ["completed", "ok"]
        except Exception as exc:  # noqa: BLE001
            later = ["failed", outcome(exc)]
    return {"backend": name, "strategy": aiocuda.strategy(), "pending_before_fault": pending,
            "outcomes": [outcome(r) for r in results], "took": took, "event": event,
            "later": later, "spin_s": SPIN_S}


def run() -> dict:
    strategy, loop_name = sys.argv[1], sys.argv[2]
    import aiocuda

    aiocuda.set_strategy(strategy)
    kernels, missing = None, []
    for make in (cupy_kernels, triton_kernels):
        try:
            kernels = make()
            break
        except Exception as exc:  # noqa: BLE001 - not installed, or cannot compile here
            missing.append(f"{make.__name__}: {type(exc).__name__}: {exc}")
    if kernels is None:
        return {"skip": "neither CuPy nor Triton could build the illegal-address kernel here ("
                        + "; ".join(missing) + ")"}
    factory = None
    if loop_name == "uvloop":
        try:
            import uvloop
        except ImportError:
            loop_name = "asyncio (uvloop is not installed)"
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(main(aiocuda, kernels))
    result["loop"] = loop_name
    return result


if __name__ == "__main__":
    try:
        out = run()
    except BaseException:  # noqa: BLE001 - reported to the test, which prints it
        out = {"setup_error": traceback.format_exc()}
    print(json.dumps(out), flush=True)
    os._exit(0)
