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

RANK = r"""
import asyncio, sys
import torch, torch.distributed as dist
import aiocuda

rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

async def main():
    ticks = 0
    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)
    beat = asyncio.ensure_future(ticker())
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


def test_two_gloo_processes_await_their_collectives(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
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
        assert f"rank {r} ok" in out
