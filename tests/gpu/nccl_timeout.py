"""Child process of tests/test_gpu.py::test_a_failing_nccl_collective_raises_from_the_await.

    nccl_timeout.py STORE_FILE

A one-rank NCCL group with a 1 s collective timeout: an all_reduce queued behind a 3 s kernel on
the current stream outlives its timeout, so NCCL's watchdog marks the work failed (a
DistBackendError) while the GPU is still busy; the await returns once the work is done, and must
then raise that error (aiocuda calls work.wait() after awaiting a work handle). Prints one JSON
line and leaves with os._exit(0) (the failed group's teardown is not under test).

TORCH_NCCL_ASYNC_ERROR_HANDLING=0 keeps the watchdog from taking the process down, and
TORCH_NCCL_ENABLE_MONITORING=0 / TORCH_NCCL_DUMP_ON_TIMEOUT=0 keep it from dumping or aborting;
the test sets them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from datetime import timedelta

TIMEOUT_S = 1.0
SLEEP_S = 3.0


def run() -> dict:
    import torch
    import torch.distributed as dist

    import aiocuda

    dist.init_process_group("nccl", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1,
                            timeout=timedelta(seconds=TIMEOUT_S))
    torch.cuda._sleep(10_000_000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(100_000_000)
    end.record()
    end.synchronize()
    cycles_per_s = 100e6 / (start.elapsed_time(end) / 1e3)
    out: dict = {"timeout_s": TIMEOUT_S, "sleep_s": SLEEP_S}

    async def main() -> None:
        t = torch.full((1024,), 2.0, device="cuda")
        first = await asyncio.wait_for(aiocuda.wait(dist.all_reduce(t, async_op=True)), 60)
        out["first"] = first[0].sum().item()  # the group works: 2048.0
        torch.cuda._sleep(int(SLEEP_S * cycles_per_s))  # the collective waits behind this
        work = dist.all_reduce(t, async_op=True)
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(aiocuda.wait(work), 60)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out["error"] = [type(exc).__name__, [c.__name__ for c in type(exc).__mro__],
                            str(exc)[:2000]]
        else:
            out["error"] = None
        out["took"] = time.monotonic() - t0

    asyncio.run(main())
    return out


if __name__ == "__main__":
    try:
        result = run()
    except BaseException:  # noqa: BLE001 - reported to the test, which prints it
        result = {"setup_error": traceback.format_exc()}
    print(json.dumps(result), flush=True)
    os._exit(0)
