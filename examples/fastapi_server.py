"""A FastAPI inference server on aiocuda: a batched endpoint, a streaming one and a health check.

    python examples/fastapi_server.py                  # serve on a free loopback port, drive it
    python examples/fastapi_server.py --serve [--port 8000]    # just serve (uvicorn)

Needs: torch, fastapi, uvicorn, httpx.

- ``POST /predict`` ``{"x": [32 numbers]}``: the request's tensor joins a batch
  (``@aiocuda.batch``); one ``aiocuda.gpu_op`` runs the model for the whole batch and each request
  gets its row. On a GPU the model runs on a CUDA stream that is awaited; without one, on the cpu
  backend's workers. The code is the same.
- ``GET /generate?n=16``: server-sent events, one per step of a small recurrent model, each step
  awaited (``gpu_op``) before its event is sent.
- ``GET /health``: the device, aiocuda's backends and the batch sizes so far.

With no arguments it starts uvicorn on a free loopback port in this process, sends concurrent
requests with httpx, prints what it measured, and stops.
"""

import argparse
import asyncio
import json
import socket
import statistics
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

import aiocuda

FEATURES, HIDDEN, CLASSES = 32, 64, 4
FLOAT32_MAX = 3.4028234663852886e38

# Finite, and within float32 (the model's dtype: 1e308 becomes inf there): anything else is
# refused with a 422 for its own request, instead of a row of NaN probabilities.
Feature = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


class Features(BaseModel):
    x: list[Feature]


def create_app() -> FastAPI:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES),
    ).to(device).eval()
    cell = torch.nn.Linear(HIDDEN, HIDDEN).to(device).eval()
    batch_sizes: list[int] = []

    @torch.inference_mode()  # a decorator: on the cpu backend fn runs on a worker thread
    def infer(x: torch.Tensor) -> torch.Tensor:
        return model(x).softmax(dim=-1)

    @torch.inference_mode()
    def step(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(cell(h))
        return h, h.argmax(dim=-1)

    @aiocuda.batch(max_batch_size=64, max_wait_s=0.002)
    async def classify(xs: list[torch.Tensor]) -> list[list[float]]:
        batch_sizes.append(len(xs))
        probs = await aiocuda.gpu_op(infer, torch.stack(xs))  # the whole batch, awaited
        return probs.tolist()  # the work is done: this copy does not wait on the GPU

    app = FastAPI(title="aiocuda example")
    app.state.batch_sizes = batch_sizes

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, and JSON has no inf or nan: a 500 instead.
        detail = [{k: e[k] for k in ("type", "loc", "msg")} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.post("/predict")
    async def predict(body: Features) -> dict[str, Any]:
        # Validated before it joins a batch: a batch fails as a whole, so one malformed request
        # would fail every request batched with it.
        if len(body.x) != FEATURES:
            raise HTTPException(422, f"x must be {FEATURES} numbers, got {len(body.x)}")
        probs = await classify(torch.tensor(body.x, device=device))
        return {"label": max(range(CLASSES), key=probs.__getitem__), "probs": probs}

    @app.get("/generate")
    async def generate(n: int = Query(16, ge=1, le=1024)) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            h = torch.full((1, HIDDEN), 0.1, device=device)
            for i in range(n):
                h, token = await aiocuda.gpu_op(step, h)  # each chunk awaits its GPU work
                yield f"data: {json.dumps({'step': i, 'token': int(token.item())})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "device": device, "backends": list(aiocuda.backends()),
                "batches": len(batch_sizes)}

    return app


async def drive(app: FastAPI, requests: int) -> None:
    """Serve `app` on a free loopback port, send it requests with httpx, print, stop."""
    import httpx

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()  # raises why it did not start
        await asyncio.sleep(0.01)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            h = (await client.get("/health")).raise_for_status().json()
            print(f"serving on 127.0.0.1:{port}, {h['device']}, aiocuda backends "
                  f"{h['backends']}, loop {type(asyncio.get_running_loop()).__module__}")

            async def one(i: int) -> float:
                t0 = time.perf_counter()
                x = [((i * 7 + j) % 11 - 5) / 5 for j in range(FEATURES)]
                r = (await client.post("/predict", json={"x": x})).raise_for_status().json()
                assert abs(sum(r["probs"]) - 1) < 1e-4, r
                return time.perf_counter() - t0

            t0 = time.perf_counter()
            latencies = await asyncio.gather(*(one(i) for i in range(requests)))
            wall = time.perf_counter() - t0
            sizes = app.state.batch_sizes
            if latencies:  # --requests 0: nothing measured
                print(f"POST /predict: {requests} concurrent requests in {wall * 1e3:.0f} ms, "
                      f"p50 {statistics.median(latencies) * 1e3:.1f} ms, "
                      f"{len(sizes)} batches (largest {max(sizes)})")
            bad = await client.post("/predict", json={"x": [1.0]})
            assert bad.status_code == 422, bad.text

            steps, checks = 0, 0
            streaming = True

            async def check_health() -> None:  # the loop answers while the stream runs
                nonlocal checks
                while streaming:
                    (await client.get("/health")).raise_for_status()
                    checks += 1

            checker = asyncio.create_task(check_health())
            t0 = time.perf_counter()
            async with client.stream("GET", "/generate", params={"n": 32}) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        steps += 1
            streaming = False
            await checker
            print(f"GET /generate: {steps} events streamed in "
                  f"{(time.perf_counter() - t0) * 1e3:.0f} ms, /health answered {checks} "
                  "times meanwhile")
            assert steps == 32, steps
    finally:
        server.should_exit = True
        await serving


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help="just serve, until interrupted")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--requests", type=int, default=64, help="POST /predict requests to send")
    args = ap.parse_args()
    app = create_app()
    if args.serve:
        uvicorn.run(app, host=args.host, port=args.port)  # uvloop when installed
        return
    try:
        import uvloop  # what uvicorn runs on when it is installed
    except ImportError:
        asyncio.run(drive(app, args.requests))
    else:
        uvloop.run(drive(app, args.requests))
    print("done")


if __name__ == "__main__":
    main()
