"""A continuous-batching token server: FastAPI on uvicorn streams each sequence's tokens as
server-sent events, while a scheduler keeps a batch of active sequences and runs one decode step
of a small torch model per iteration, admitting new sequences and retiring finished ones
between steps.

    python examples/token_server.py [--engine aiocuda|thread|both] [--streams 8] [--tokens 24]
    python examples/token_server.py --serve --engine aiocuda   # keep serving; curl -N URL

Needs: torch, fastapi, uvicorn, httpx.

--engine aiocuda: the scheduler is a task on the event loop and each step is
``await aiocuda.gpu_op(model.step, inputs, rows, prev, state, stream=s)``: on a GPU a CUDA stream,
awaited; without one the cpu backend (same code). It keeps two steps in flight: the next step,
fed from the current one's outputs on the device, is enqueued before the current one is awaited.
--engine thread: what vLLM and TGI do today: the scheduler on a thread of its own, the step
followed by a blocking synchronize, the tokens handed to the loop with ``call_soon_threadsafe``.
The engines and the scheduler live in ``aiocuda.bench._tokens`` (the serving benchmark,
``python -m aiocuda.bench serving``, runs the same ones under load). On the CPU, --step-ms adds
simulated device time to each step (a sleep: no CPU, no GIL), as a real model's step would take.

With no arguments: starts each engine on a free loopback port, streams a few sequences through
it over HTTP, prints what it measured, checks both engines gave the same tokens, prints done.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from typing import Any

import torch

from aiocuda.bench._serve_apps import gpu_available, loopback_socket, tokens_app, uvicorn_server
from aiocuda.bench._tokens import ENGINES, TinyLM

# tokens_app (aiocuda/bench/_serve_apps.py) is, in short:
#
#   @app.get("/generate")
#   async def generate(seed: int = 0, max_tokens: int = 16):
#       async def events():
#           async for tok in engine.generate(seed, max_tokens):  # a client that goes away
#               yield f"data: {tok}\n\n"                         # cancels its sequence
#           yield "data: [DONE]\n\n"
#       return StreamingResponse(events(), media_type="text/event-stream")


async def stream_one(client: Any, url: str, seed: int, tokens: int) -> dict[str, Any]:
    """One client: GET the stream, note when each token arrives."""
    t0 = time.perf_counter()
    stamps, got = [], []
    async with client.stream("GET", url, params={"seed": seed, "max_tokens": tokens}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("event: error"):
                raise RuntimeError(f"the server failed sequence {seed}")
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            stamps.append(time.perf_counter())
            got.append(int(line[6:]))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"tokens": got, "ttft": stamps[0] - t0, "gaps": gaps}


async def run_engine(engine_name: str, streams: int, tokens: int, step_ms: float,
                     serve: bool) -> dict[str, Any]:
    import httpx

    device = "cuda" if gpu_available() else "cpu"
    torch.set_num_threads(1)
    engine = ENGINES[engine_name](TinyLM(device, step_ms=step_ms))
    server = uvicorn_server(tokens_app(engine))
    sock = loopback_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/generate"
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # the server failed to start: raise its error
            await asyncio.sleep(0.01)
        if serve:
            print(f"{engine_name} engine on {device}: curl -N '{url}?seed=1&max_tokens=20'")
            await task
            return {}
        async with httpx.AsyncClient(timeout=60) as client:
            await stream_one(client, url, -1, 4)  # warm up (first calls, the connection)
            t0 = time.perf_counter()
            results = await asyncio.gather(*[stream_one(client, url, seed, tokens)
                                             for seed in range(streams)])
        wall = time.perf_counter() - t0
        stats = engine.stats()
    finally:
        server.should_exit = True
        await task
    gaps = sorted(g for r in results for g in r["gaps"])
    return {
        "device": device, "wall": wall, "sequences": [r["tokens"] for r in results],
        "tok_s": sum(len(r["tokens"]) for r in results) / wall,
        "ttft_ms": statistics.median(r["ttft"] for r in results) * 1e3,
        # --tokens 1: one token per stream, no gap between tokens to measure
        "itl_p50_ms": gaps[len(gaps) // 2] * 1e3 if gaps else math.nan,
        "itl_max_ms": gaps[-1] * 1e3 if gaps else math.nan,
        "steps": stats["steps"], "max_active": stats["max_active"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("aiocuda", "thread", "both"), default="both")
    ap.add_argument("--streams", type=int, default=8, help="concurrent client streams")
    ap.add_argument("--tokens", type=int, default=24, help="tokens per sequence")
    ap.add_argument("--step-ms", type=float, default=2.0,
                    help="on the CPU, simulated device time per decode step (a sleep)")
    ap.add_argument("--serve", action="store_true", help="keep serving (one engine)")
    args = ap.parse_args()
    if args.streams < 1 or args.tokens < 1 or not args.step_ms >= 0:
        ap.error("--streams and --tokens must be at least 1, --step-ms 0 or more")
    if args.serve:
        if args.engine == "both":
            ap.error("--serve runs one engine: --engine aiocuda or --engine thread")
        asyncio.run(run_engine(args.engine, 0, 0, args.step_ms, serve=True))
        return
    names = ("aiocuda", "thread") if args.engine == "both" else (args.engine,)
    out = {}
    for name in names:
        r = asyncio.run(run_engine(name, args.streams, args.tokens, args.step_ms, serve=False))
        out[name] = r
        print(f"{name:8} engine on {r['device']}: {args.streams} streams x {args.tokens} tokens "
              f"in {r['wall'] * 1e3:.0f} ms, {r['tok_s']:.0f} tokens/s, TTFT p50 "
              f"{r['ttft_ms']:.1f} ms, inter-token p50 {r['itl_p50_ms']:.1f} ms "
              f"(max {r['itl_max_ms']:.1f}), {r['steps']} steps, batch up to {r['max_active']}")
        if any(len(s) != args.tokens for s in r["sequences"]):
            raise SystemExit(f"{name}: a stream ended short")
    if len(out) == 2:
        # Same model, same seeds: every sequence's tokens agree when the batches did (arrivals
        # over HTTP may split the first batch differently, which changes only float rounding).
        same = sum(a == b for a, b in zip(out["aiocuda"]["sequences"],
                                          out["thread"]["sequences"]))
        print(f"identical token sequences from both engines: {same} of {args.streams}")
    print("done")


if __name__ == "__main__":
    main()
