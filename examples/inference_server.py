"""An async inference server with dynamic batching (aiohttp + a small PyTorch model), and a load
generator on loopback that measures it built two ways: awaiting the model with aiocuda.gpu_op,
and the usual loop.run_in_executor.

    python examples/inference_server.py [--seconds 3] [--clients 64]

Needs: torch, aiohttp.

Runs on the GPU when PyTorch sees one, else on the CPU (the cpu backend keeps the loop free).
The load generator runs in its own process, so it does not share the server's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

FEATURES = 256
Infer = Callable[[list[list[float]]], Awaitable[list[int]]]


class Batcher:
    """Collects requests for up to `max_wait` seconds (or `max_batch` of them) and runs one
    model call for all of them: the requests' coroutines wait on futures, the loop stays free."""

    def __init__(self, infer: Infer, max_batch: int = 64, max_wait: float = 0.002) -> None:
        self.infer, self.max_batch, self.max_wait = infer, max_batch, max_wait
        self.queue: asyncio.Queue[tuple[list[float], asyncio.Future[int]]] = asyncio.Queue()
        self.batches = 0

    async def predict(self, x: list[float]) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(self.max_wait)  # let a batch gather
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                outs = await self.infer([x for x, _ in batch])
            except Exception as exc:  # every request of the batch gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            for (_, fut), y in zip(batch, outs):
                if not fut.done():
                    fut.set_result(y)


def torch_predictors() -> tuple[Infer, Infer, str]:
    """The model, awaited with aiocuda and with run_in_executor."""
    import torch

    import aiocuda

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    ).to(device).eval()

    @torch.no_grad()
    def classify(x: torch.Tensor) -> torch.Tensor:
        return model(x).argmax(dim=1)

    async def with_aiocuda(batch: list[list[float]]) -> list[int]:
        x = torch.tensor(batch, device=device)
        y = await aiocuda.gpu_op(classify, x)  # the migration: this line
        return y.tolist()

    def blocking(batch: list[list[float]]) -> list[int]:
        return classify(torch.tensor(batch, device=device)).tolist()  # .tolist() synchronizes

    async def with_executor(batch: list[list[float]]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(None, blocking, batch)

    return with_aiocuda, with_executor, f"PyTorch {torch.__version__} on {device}"


def valid_features(body: object) -> list[float] | None:
    """The body's "x", if it is FEATURES finite numbers; else None."""
    x = body.get("x") if isinstance(body, dict) else None
    if not isinstance(x, list) or len(x) != FEATURES:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in x):
        return None
    return x


def make_app(batcher: Batcher) -> Any:
    """The server: ``POST /predict`` ``{"x": [FEATURES numbers]}`` -> ``{"y": label}``."""
    from aiohttp import web

    async def predict(request: web.Request) -> web.Response:
        # Validated before it joins a batch: a batch fails as a whole, so one malformed request
        # would fail every request batched with it.
        try:
            body = await request.json()
        except ValueError:  # not JSON
            body = None
        x = valid_features(body)
        if x is None:
            return web.json_response({"error": f"x must be {FEATURES} finite numbers"},
                                     status=400)
        return web.json_response({"y": await batcher.predict(x)})

    app = web.Application()
    app.router.add_post("/predict", predict)
    return app


async def serve(infer: Infer, seconds: float, clients: int) -> dict[str, Any]:
    """Start the server on a free loopback port, run the load generator against it, stop."""
    from aiohttp import web

    batcher = Batcher(infer)
    runner = web.AppRunner(make_app(batcher), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    worker = asyncio.ensure_future(batcher.run())
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--loadgen", f"http://127.0.0.1:{port}/predict",
            "--seconds", str(seconds), "--clients", str(clients),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"the load generator failed (exit {proc.returncode})")
        result: dict[str, Any] = json.loads(out)
        result["batches"] = batcher.batches
        return result
    finally:
        worker.cancel()
        await runner.cleanup()


async def loadgen(url: str, seconds: float, clients: int) -> dict[str, Any]:
    """`clients` concurrent clients posting requests for `seconds`; latency percentiles."""
    import random

    from aiohttp import ClientSession, TCPConnector

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(session: ClientSession, rng: random.Random) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            x = [rng.uniform(-1, 1) for _ in range(FEATURES)]
            t0 = time.perf_counter()
            async with session.post(url, json={"x": x}) as r:
                if r.status != 200 or "y" not in await r.json():
                    errors += 1
            latencies.append(time.perf_counter() - t0)

    async with ClientSession(connector=TCPConnector(limit=clients)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(session, random.Random(i)) for i in range(clients)])
        wall = time.perf_counter() - t0
    requests = len(latencies)  # counted before the padding below
    if requests < 2:  # quantiles() needs two points (a very short run)
        latencies = (latencies or [0.0]) * 2
    q = statistics.quantiles(latencies, n=100)
    return {"requests": requests, "errors": errors, "rps": requests / wall if wall > 0 else 0.0,
            "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3}


async def compare(predictors: tuple[Infer, Infer, str], seconds: float, clients: int) -> None:
    with_aiocuda, with_executor, what = predictors
    print(f"{what}; {clients} clients for {seconds:g} s each, dynamic batching up to 64")
    print(f"{'server':18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batches':>8} {'errors':>7}")
    for name, infer in (("aiocuda.gpu_op", with_aiocuda), ("run_in_executor", with_executor)):
        r = await serve(infer, seconds, clients)
        print(f"{name:18} {r['rps']:8.0f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
              f"{r['batches']:8} {r['errors']:7}")
        if r["errors"]:
            raise SystemExit(f"{r['errors']} requests failed")


def main(predictors: Callable[[], tuple[Infer, Infer, str]] = torch_predictors) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--loadgen", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.clients < 1 or not args.seconds > 0:
        ap.error("--clients must be at least 1 and --seconds above 0")
    if args.loadgen:  # the load generator's own process
        print(json.dumps(asyncio.run(loadgen(args.loadgen, args.seconds, args.clients))))
        return
    asyncio.run(compare(predictors(), args.seconds, args.clients))
    print("done")


if __name__ == "__main__":
    main()
