"""The servers of ``python -m aiocuda.bench serving``: FastAPI apps on uvicorn (uvloop, httptools).

``python -m aiocuda.bench._serve_apps requests --variant aiocuda|threadpool|blocking`` serves
``GET /work`` (one unit of "GPU work" per request, waited three ways) and ``GET /health``;
``python -m aiocuda.bench._serve_apps tokens --engine aiocuda|thread`` serves ``GET /generate``
(the token generator's tokens as server-sent events). Either prints ``PORT <n>`` once it listens
on a free loopback port, and ends with its parent (or on SIGTERM).

The work per request: with a CUDA GPU (torch sees one), a small torch MLP on CUDA; without,
``CpuStream.delay(work_ms)``, a native sleep on a cpu-backend stream, round robin over a few
streams: like a kernel, it holds a device (a worker thread) and not a CPU, so what the variants
differ in is only how they wait for it:

- ``aiocuda``: ``await ev`` (``await aiocuda.gpu_op(model, x)`` on a GPU);
- ``threadpool``: ``await run_in_threadpool(ev.synchronize)`` (starlette's thread pool, the
  usual FastAPI answer; on a GPU the model call and ``torch.cuda.synchronize()`` in the pool);
- ``blocking``: ``ev.synchronize()`` inside ``async def`` (on a GPU the call, then
  ``torch.cuda.synchronize()``), which stalls the loop.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

VARIANTS = ("aiocuda", "threadpool", "blocking")
WORK_MS = 1.0
WORK_STREAMS = 4  # the "device" runs this many requests' work at once


def optional(name: str) -> Any:
    """An optional package (torch, fastapi, uvicorn, ...), imported when used and typed Any:
    the package type-checks where they are not installed."""
    return importlib.import_module(name)


def die_with_parent() -> None:
    """Linux: SIGTERM this process when the process that started it ends."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def gpu_available() -> bool:
    try:
        torch = optional("torch")
    except ImportError:
        return False
    import aiocuda

    return bool(torch.cuda.is_available()) and "cuda" in aiocuda.backends()


def work_waiters(work_ms: float = WORK_MS, streams: int = WORK_STREAMS, device: str = "auto"
                 ) -> tuple[dict[str, Callable[[], Awaitable[None]]], str]:
    """One coroutine function per variant, each doing one unit of work and waiting for it."""
    import aiocuda

    run_in_threadpool = optional("starlette.concurrency").run_in_threadpool

    if device == "auto":
        device = "cuda" if gpu_available() else "cpu"
    if device == "cuda":
        torch = optional("torch")
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512),
            torch.nn.ReLU(), torch.nn.Linear(512, 16),
        ).cuda().eval()
        x = torch.randn(32, 512, device="cuda")

        def call(t: Any) -> Any:
            with torch.no_grad():
                return model(t)

        def blocking_call() -> None:
            call(x)
            torch.cuda.synchronize()

        async def t_aiocuda() -> None:
            await aiocuda.gpu_op(call, x)

        async def t_pool() -> None:
            await run_in_threadpool(blocking_call)

        async def t_blocking() -> None:
            blocking_call()

        what = f"torch MLP 512-512-512-16, batch 32, on {torch.cuda.get_device_name()}"
        return {"aiocuda": t_aiocuda, "threadpool": t_pool, "blocking": t_blocking}, what

    pool = [aiocuda.CpuStream() for _ in range(streams)]
    nxt = itertools.cycle(pool)
    seconds = work_ms / 1e3

    def launch() -> aiocuda.Event:
        s = next(nxt)
        s.delay(seconds)
        return s.record()

    async def c_aiocuda() -> None:
        await launch()

    async def c_pool() -> None:
        await run_in_threadpool(launch().synchronize)

    async def c_blocking() -> None:
        launch().synchronize()

    what = (f"CpuStream.delay({work_ms:g} ms) round robin over {streams} cpu-backend streams "
            "(holds a worker, not a CPU, as a kernel holds a GPU)")
    return {"aiocuda": c_aiocuda, "threadpool": c_pool, "blocking": c_blocking}, what


def requests_app(variant: str, work_ms: float = WORK_MS, streams: int = WORK_STREAMS,
                 device: str = "auto") -> Any:
    FastAPI = optional("fastapi").FastAPI
    Response = optional("fastapi.responses").Response

    waiters, what = work_waiters(work_ms, streams, device)
    wait = waiters[variant]
    app = FastAPI()
    app.state.what = what
    ok = b'{"ok":true}'

    async def work() -> Any:
        await wait()
        return Response(ok, media_type="application/json")

    async def health() -> Any:
        return Response(ok, media_type="application/json")

    app.add_api_route("/work", work, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    return app


def tokens_app(engine: Any) -> Any:
    """FastAPI app streaming the engine's tokens as server-sent events: ``data: <token>`` per
    token, then ``data: [DONE]``; a failed step ends the stream with ``event: error``."""
    from contextlib import asynccontextmanager

    FastAPI = optional("fastapi").FastAPI
    responses = optional("fastapi.responses")
    JSONResponse, Response = responses.JSONResponse, responses.Response
    StreamingResponse = responses.StreamingResponse

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(lifespan=lifespan)

    async def generate(seed: int = 0, max_tokens: int = 16) -> Any:
        if not 1 <= max_tokens <= 4096:
            return JSONResponse({"error": "max_tokens must be 1 to 4096"}, status_code=400)

        async def events() -> Any:
            try:
                async for tok in engine.generate(seed, max_tokens):
                    yield f"data: {tok}\n\n"
            except Exception as exc:  # the step failed: this stream ends with it
                yield f"event: error\ndata: {type(exc).__name__}: {exc}\n\n"
                return
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def health() -> Any:
        return Response(b'{"ok":true}', media_type="application/json")

    async def stats() -> Any:
        return JSONResponse(engine.stats())

    app.add_api_route("/generate", generate, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/stats", stats, methods=["GET"])
    return app


def answer_cpu_reads() -> None:
    """Answer each ``cpu`` line on stdin with this process's CPU time (every thread's, those
    that ended too: time.process_time) as a JSON line, from a thread of its own: the driver's
    CPU per request, read at the window's edges even while the loop is blocked (the blocking
    variant's loop answered an HTTP read seconds late, after the window)."""
    for line in sys.stdin:
        if line.strip() == "cpu":
            print(json.dumps({"cpu_s": time.process_time()}), flush=True)


def loopback_socket() -> socket.socket:
    """A listening socket on a free loopback port (the kernel picks it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: Any, loop: str = "auto") -> Any:
    uvicorn = optional("uvicorn")
    if loop == "auto":
        try:
            optional("uvloop")
            loop = "uvloop"
        except ImportError:
            loop = "asyncio"
    try:
        optional("httptools")
        http = "httptools"
    except ImportError:
        http = "h11"
    config = uvicorn.Config(app, loop=loop, http=http, log_level="warning", access_log=False,
                            lifespan="on", backlog=2048, timeout_keep_alive=60,
                            timeout_graceful_shutdown=3)
    return uvicorn.Server(config)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m aiocuda.bench._serve_apps")
    ap.add_argument("app", choices=("requests", "tokens"))
    ap.add_argument("--variant", choices=VARIANTS, default="aiocuda")
    ap.add_argument("--engine", choices=("aiocuda", "aiocuda-d1", "thread"), default="aiocuda")
    ap.add_argument("--work-ms", type=float, default=WORK_MS)
    ap.add_argument("--streams", type=int, default=WORK_STREAMS)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--step-ms", type=float, default=0.0)
    args = ap.parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.app == "requests":
        app = requests_app(args.variant, args.work_ms, args.streams, args.device)
        what = app.state.what
    else:
        from ._tokens import ENGINES, TinyLM

        torch = optional("torch")
        torch.set_num_threads(args.torch_threads)
        device = args.device
        if device == "auto":
            device = "cuda" if gpu_available() else "cpu"
        model = TinyLM(device, step_ms=args.step_ms)
        app = tokens_app(ENGINES[args.engine](model, args.max_batch))
        what = (f"TinyLM (vocab {model.vocab}, hidden {model.hidden}, GRU cell, greedy) on "
                f"{device}, torch {torch.__version__}, {args.torch_threads} torch thread(s), "
                f"batches up to {args.max_batch}"
                + (f", + {args.step_ms:g} ms of simulated device time per step (a sleep)"
                   if model.step_s else ""))
    server = uvicorn_server(app)
    threading.Thread(target=answer_cpu_reads, name="cpu-reads", daemon=True).start()
    sock = loopback_socket()
    print(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid(), "what": what,
                      "loop": server.config.loop, "http": server.config.http}), flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
