"""torch.distributed with gloo: two processes on localhost await their collectives."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install aiocuda[torch])")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("this PyTorch build has no torch.distributed", allow_module_level=True)

# Every rank script's main() counts the loop's turns meanwhile (1 ms apart): the loop must go on.
TICKER = """    ticks = 0
    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)
    beat = asyncio.ensure_future(ticker())
"""

RANK = r"""
import asyncio, sys
import torch, torch.distributed as dist
import aiocuda

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

async def main():
    #TICKER
    t = torch.full((4,), float(rank + 1))
    out = await aiocuda.wait(dist.all_reduce(t, async_op=True))
    assert torch.equal(t, torch.full((4,), 3.0)) and torch.equal(out[0], t), (t, out)
    works = [dist.all_reduce(torch.full((2,), float(i)), async_op=True) for i in range(20)]
    sums = await asyncio.gather(*[aiocuda.wait(w) for w in works])
    assert [s[0].tolist() for s in sums] == [[2.0 * i] * 2 for i in range(20)]
    b = torch.arange(3.0) if rank == 0 else torch.zeros(3)
    await aiocuda.wait(dist.broadcast(b, 0, async_op=True))
    assert b.tolist() == [0.0, 1.0, 2.0]
    beat.cancel()
    print(f"rank {rank} ok, loop ticked {ticks} times")

asyncio.run(main())
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(tmp_path, source: str) -> list[str]:
    """Run `source` as ranks 0 and 1 on a free port; each must exit 0. Their outputs."""
    script = tmp_path / "rank.py"
    script.write_text(source.replace("    #TICKER\n", TICKER))
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out, err))
    for r, (code, out, err) in enumerate(outs):
        assert code == 0, f"rank {r}: {out}\n{err}"
    return [out for _, out, _ in outs]


def test_two_gloo_processes_await_their_collectives(tmp_path):
    for r, out in enumerate(run_two_ranks(tmp_path, RANK)):
        assert f"rank {r} ok" in out


# Handles whose Work has no future (gloo: send, recv, reduce_scatter): aiocuda.wait raised
# "Work::getFuture not implemented." once the operation had started.
NO_FUTURE = r"""
import asyncio, datetime, os, sys, time
import torch, torch.distributed as dist
import aiocuda

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=3))

async def main():
    #TICKER
    if rank == 0:
        await asyncio.sleep(0.5)  # rank 1 waits for this send meanwhile
        assert await aiocuda.wait(dist.isend(torch.arange(2.0), 1)) is None
    else:
        buf = torch.zeros(2)
        work = dist.irecv(buf, 0)
        before = ticks
        try:  # cancelled: the wait goes on, off the loop
            await asyncio.wait_for(aiocuda.wait(work), 0.1)
            raise AssertionError("the recv was awaited before it was sent")
        except asyncio.TimeoutError:
            pass
        assert ticks - before >= 5, ticks - before  # the loop ran while the recv waited
        # Awaited again: the first wait's outcome (a second work.wait() waits for another send)
        assert await aiocuda.wait(work) is None
        assert buf.tolist() == [0.0, 1.0], buf
    got = torch.zeros(2)
    ops = [dist.P2POp(dist.isend, torch.full((2,), float(rank)), 1 - rank),
           dist.P2POp(dist.irecv, got, 1 - rank)]
    await asyncio.gather(*(aiocuda.wait(w) for w in dist.batch_isend_irecv(ops)))
    assert got.tolist() == [1.0 - rank] * 2, got
    out = torch.zeros(2)
    await aiocuda.wait(dist.reduce_scatter(out, [torch.full((2,), 1.0), torch.full((2,), 2.0)],
                                           async_op=True))
    assert out.tolist() == [2.0 * (rank + 1)] * 2, out
    if rank == 1:  # a recv nobody sends for: gloo's timeout reaches the awaiting task
        t0 = time.monotonic()
        try:
            await aiocuda.wait(dist.irecv(torch.zeros(1), 0, tag=7))
            raise AssertionError("a recv with no send completed")
        except RuntimeError as exc:
            assert "Timed out" in str(exc) and ticks > 0, exc
        assert time.monotonic() - t0 >= 2
    else:
        await asyncio.sleep(4)  # still there while rank 1's recv times out
    beat.cancel()
    print(f"rank {rank} ok", flush=True)

asyncio.run(main())
os._exit(0)  # the group holds a recv that failed: no orderly teardown
"""


def test_handles_without_a_future_are_awaited_off_the_loop(tmp_path):
    for r, out in enumerate(run_two_ranks(tmp_path, NO_FUTURE)):
        assert f"rank {r} ok" in out


# A functional collective's result (DTensor, FSDP2) is an AsyncCollectiveTensor: a CPU tensor
# that aiocuda.wait returned at once; its first use then waited on the loop's thread.
FUNCOL = r"""
import asyncio, sys, time
import torch, torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import aiocuda

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
funcol.all_reduce(torch.ones(1), "sum", dist.group.WORLD).tolist()  # connections made

async def main():
    # Both ranks leave the barrier together, whatever their start-up took (an ASan run started
    # rank 0 half a second after rank 1, and its wait took 0.49 s): then rank 1 joins 1 s late.
    dist.barrier()
    if rank == 1:
        time.sleep(1.0)  # joins the collective 1 s late: rank 0's wait takes that long
    #TICKER
    await asyncio.sleep(0)
    y = funcol.all_reduce(torch.ones(2), "sum", dist.group.WORLD)
    assert type(y).__name__ == "AsyncCollectiveTensor"
    t0, before = time.monotonic(), ticks
    a, b = await asyncio.gather(aiocuda.wait(y), aiocuda.wait(y))  # two awaits of one tensor
    if rank == 0:
        assert time.monotonic() - t0 >= 0.5, time.monotonic() - t0
        assert ticks - before >= 20, ticks - before  # the loop ran meanwhile
    assert type(a) is torch.Tensor and a.tolist() == [2.0, 2.0] == b.tolist(), (a, b)
    assert (await aiocuda.wait(y)).tolist() == [2.0, 2.0]  # waited: returns at once
    beat.cancel()
    print(f"rank {rank} ok", flush=True)

asyncio.run(main())
dist.destroy_process_group()
"""


def test_a_functional_collectives_tensor_is_awaited_off_the_loop(tmp_path):
    for r, out in enumerate(run_two_ranks(tmp_path, FUNCOL)):
        assert f"rank {r} ok" in out
