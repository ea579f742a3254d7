"""The token generator's scheduler and engines, its SSE server, and the serving benchmark's
machinery (``python -m aiocuda.bench serving``). No speed is asserted: speed lives in the report.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aiocuda.bench import _serving
from aiocuda.bench._tokens import ENGINES, STOPPED, Scheduler, Sequence

HAS_TORCH = importlib.util.find_spec("torch") is not None
MISSING_HTTP = [m for m in ("fastapi", "uvicorn", "aiohttp", "httpx")
                if importlib.util.find_spec(m) is None]
needs_http = pytest.mark.skipif(bool(MISSING_HTTP),
                                reason=f"needs {', '.join(MISSING_HTTP)}, not installed")
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs torch, not installed")
TIMEOUT = 20.0


class Tokens(list):
    def tolist(self) -> list[int]:
        return list(self)


class FakeModel:
    """Next token = a function of a sequence's own input and state (never of its batch), so
    each sequence's tokens are known in advance; steps can be slowed down and made to fail."""

    device = SimpleNamespace(type="cpu")

    def __init__(self, delay_s: float = 0.0, poison: int | None = None) -> None:
        self.delay_s, self.poison = delay_s, poison
        self.batches: list[int] = []

    def prompt(self, seed: int) -> list[int]:
        return [seed % 97 + i for i in range(1 + seed % 3)]

    def step(self, inputs: list[int], rows: list[int], prev: Any, out: Any) -> Tokens:
        import time

        self.batches.append(len(inputs))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.poison is not None and self.poison in inputs:
            raise ZeroDivisionError("a poisoned step")
        ok = prev is not None and prev.tokens is not None
        toks = [t if t >= 0 else (prev.tokens[r] if ok else 0) for t, r in zip(inputs, rows)]
        hs = [prev.hidden[r] if ok and r >= 0 else 0 for r in rows]
        out.tokens = [(t * 31 + h * 7 + 3) % 1009 for t, h in zip(toks, hs)]
        out.hidden = [h + 1 for h in hs]
        return Tokens(out.tokens)

    def synchronize(self) -> None:
        pass

    def expected(self, seed: int, n: int) -> list[int]:
        prompt, h, out, last = self.prompt(seed), 0, [], 0
        fed = 0
        while len(out) < n:
            tok = prompt[fed] if fed < len(prompt) else last
            nxt, h = (tok * 31 + h * 7 + 3) % 1009, h + 1
            fed += 1
            if fed >= len(prompt):
                out.append(nxt)
                last = nxt
        return out


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def collect(engine: Any, seed: int, n: int) -> list[int]:
    return [t async for t in engine.generate(seed, n)]


async def until(cond: Any, what: str) -> None:
    for _ in range(int(TIMEOUT / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# ---- the scheduler alone ------------------------------------------------------------------------

def test_scheduler_admits_up_to_max_batch_and_retires_finished_sequences() -> None:
    model = FakeModel()
    sched = Scheduler(model, max_batch=2)
    seqs = [Sequence(s, model.prompt(s), n, asyncio.Queue()) for s, n in ((0, 1), (1, 3), (2, 2))]
    for s in seqs:
        sched.add(s)
    p1 = sched.prepare()  # seq 0: prompt [0], its only token; seq 1: prompt [1, 2]
    assert p1.batch == seqs[:2] and p1.inputs == [0, 1] and p1.rows == [-1, -1]
    assert p1.emits == [True, False] and len(sched.waiting) == 1
    assert sched.active == [seqs[1]]  # seq 0's last token is planned: it takes no more steps
    p2 = sched.prepare()  # planned before p1 has run: seq 2 takes seq 0's place
    assert p2.batch == [seqs[1], seqs[2]] and p2.inputs == [2, 2] and p2.rows == [1, -1]
    events = sched.complete(p1, model.step(p1.inputs, p1.rows, None, p1.state))
    assert [(s.seed, x is None) for s, x in events] == [(0, False), (0, True)]
    assert seqs[0].finished and not seqs[1].finished
    seqs[2].cancelled = True
    events = sched.complete(p2, model.step(p2.inputs, p2.rows, p1.state, p2.state))
    assert [(s.seed, x) for s, x in events] == [(1, model.expected(1, 1)[0])]
    p3 = sched.prepare()
    assert p3.batch == [seqs[1]] and p3.inputs == [-1] and p3.rows == [0]
    assert sched.stats()["cancelled"] == 1 and seqs[2].finished
    exc = ValueError("a failed step")
    assert sched.fail(p3, exc) == [(seqs[1], exc)]
    assert seqs[1].finished and sched.stats()["failed"] == 1 and sched.prepare() is None
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        Scheduler(model, 0)


# ---- the engines ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_every_sequence_gets_exactly_its_tokens_in_order(kind: str) -> None:
    model = FakeModel(delay_s=0.0005)

    async def main() -> None:
        rng = random.Random(1)
        engine = ENGINES[kind](model, max_batch=4)
        async with engine:
            async def client(seed: int) -> list[int]:
                await asyncio.sleep(rng.uniform(0, 0.03))  # arrivals spread over the steps
                return await collect(engine, seed, 1 + seed % 9)

            got = await asyncio.gather(*[client(s) for s in range(24)])
            st = engine.stats()
        assert got == [model.expected(s, 1 + s % 9) for s in range(24)]
        assert st["admitted"] == st["completed"] == 24
        assert st["max_active"] <= 4 and max(model.batches) <= 4
        assert st["active"] == st["waiting"] == 0

    run(main())


@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_a_client_that_goes_away_retires_its_sequence(kind: str) -> None:
    model = FakeModel(delay_s=0.001)

    async def main() -> None:
        async with ENGINES[kind](model, max_batch=1) as engine:
            gen = engine.generate(5, 10_000)
            assert [await gen.__anext__() for _ in range(3)] == model.expected(5, 3)
            waiting = asyncio.ensure_future(collect(engine, 6, 10_000))  # no room: it waits
            await asyncio.sleep(0.01)
            waiting.cancel()
            await gen.aclose()
            await until(lambda: engine.stats()["cancelled"] == 2, "both retired")
            assert engine.stats()["active"] == 0
            assert await collect(engine, 7, 4) == model.expected(7, 4)  # still serving

    run(main())


@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_a_failed_step_fails_the_streams_of_its_batch_only(kind: str) -> None:
    model = FakeModel(poison=3)  # seed 3's prompt starts with token 3

    async def main() -> None:
        async with ENGINES[kind](model) as engine:
            results = await asyncio.gather(collect(engine, 3, 5), collect(engine, 10, 5),
                                           return_exceptions=True)
            assert all(isinstance(r, ZeroDivisionError) for r in results), results
            assert await collect(engine, 11, 5) == model.expected(11, 5)
            assert engine.stats()["failed"] == 2

    run(main())


@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_stopping_the_engine_fails_the_streams_it_holds(kind: str) -> None:
    async def main() -> None:
        engine = ENGINES[kind](FakeModel(delay_s=0.001))
        await engine.start()
        task = asyncio.ensure_future(collect(engine, 1, 10_000))
        await asyncio.sleep(0.02)
        await engine.stop()
        with pytest.raises(RuntimeError, match=STOPPED):
            await task

    run(main())


@needs_torch
def test_both_engines_give_the_same_tokens_for_the_same_seeds() -> None:
    from aiocuda.bench._tokens import TinyLM

    model = TinyLM("cpu")

    async def generate(kind: str) -> list[list[int]]:
        engine = ENGINES[kind](model, max_batch=64)
        tasks = [asyncio.ensure_future(collect(engine, s, 6 + s % 5)) for s in range(40)]
        for _ in range(3):
            await asyncio.sleep(0)  # every sequence submitted before the first step
        async with engine:
            return await asyncio.gather(*tasks)

    a = run(generate("aiocuda"))
    b = run(generate("thread"))
    assert a == b
    assert [len(x) for x in a] == [6 + s % 5 for s in range(40)]
    assert len({tuple(x) for x in a}) > 30  # the seeds make different sequences


# ---- over HTTP ------------------------------------------------------------------------------------

@needs_http
@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_sse_server_streams_tokens_and_a_disconnect_retires_the_sequence(kind: str) -> None:
    import httpx

    from aiocuda.bench._serve_apps import loopback_socket, tokens_app, uvicorn_server

    model = FakeModel(delay_s=0.001)

    async def main() -> None:
        engine = ENGINES[kind](model)
        server = uvicorn_server(tokens_app(engine), loop="asyncio")
        sock = loopback_socket()
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        try:
            await until(lambda: server.started or task.done(), "the server")
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                r = await client.get(base + "/generate", params={"seed": 4, "max_tokens": 5})
                lines = [ln for ln in r.text.splitlines() if ln]
                assert lines == [f"data: {t}" for t in model.expected(4, 5)] + ["data: [DONE]"]
                async with client.stream("GET", base + "/generate",
                                         params={"seed": 8, "max_tokens": 4000}) as r:
                    assert r.status_code == 200
                    n = 0
                    async for line in r.aiter_lines():
                        n += line.startswith("data: ")
                        if n == 3:
                            break
                async def cancelled() -> bool:
                    st = (await client.get(base + "/stats")).json()
                    return st["cancelled"] == 1 and st["active"] == 0

                for _ in range(200):
                    if await cancelled():
                        break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError(f"not retired: {engine.stats()}")
                bad = await client.get(base + "/generate", params={"max_tokens": 0})
                assert bad.status_code == 400
        finally:
            server.should_exit = True
            await task

    run(main())


# ---- the benchmark --------------------------------------------------------------------------------

def test_targets_compare_aiocuda_with_the_thread_pool_at_each_point() -> None:
    def row(kind: str, name: str, n: int, **v: float) -> dict[str, Any]:
        return {"kind": kind, "name": name, "n": n, **v}

    req = dict(rps=100.0, p99_ms=10.0, cpu_per_request_us=100.0, health_p99_ms=1.0)
    rows = [row("requests", "aiocuda", 4, **{**req, "rps": 120.0, "cpu_per_request_us": 80.0}),
            row("requests", "threadpool", 4, **req),
            row("tokens", "aiocuda", 64, itl_p99_ms=7.0, tokens_per_s=900.0),
            row("tokens", "thread", 64, itl_p99_ms=10.0, tokens_per_s=1000.0),
            row("tokens", "aiocuda", 4, itl_p99_ms=1.0, tokens_per_s=1.0)]
    got = {t["what"]: (round(t["ratio"], 2), t["met"]) for t in _serving.targets(rows)}
    assert got == {
        "requests/s, aiocuda / thread pool, concurrency 4": (1.2, True),
        "latency p99, aiocuda / thread pool, concurrency 4": (1.0, True),
        "server CPU per request, aiocuda / thread pool, concurrency 4": (0.8, False),
        "/health p99 under load, aiocuda / thread pool, concurrency 4": (1.0, True),
        "inter-token p99, aiocuda engine / threaded, 64 streams": (0.7, True),
        "tokens/s, aiocuda engine / threaded, 64 streams": (0.9, False),
    }


@needs_http
@needs_torch
def test_serving_benchmark_quick_tiny_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "aiocuda.bench", "serving", "--quick", "--out", str(out),
           "--concurrency", "1,3", "--streams", "1,2", "--seconds", "0.3", "--warmup", "0.1",
           "--repeats", "1", "--max-tokens", "3", "--step-ms", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "serving.json").read_text())
    keys = {(x["kind"], x["name"], x["n"]) for x in report["rows"]}
    assert keys == {("requests", v, n) for v in _serving.VARIANTS for n in (1, 3)} | \
        {("tokens", e, n) for e in _serving.ENGINES for n in (1, 2)}
    for x in report["rows"]:
        assert x["errors"] == 0, x
        if x["kind"] == "requests":
            assert x["requests"] > 0 and x["rps"] > 0 and x["p99_ms"] >= x["p50_ms"] > 0
            assert x["cpu_per_request_us"] >= 0 and x["health_n"] >= 1
        else:
            assert x["tokens"] > 0 and x["tokens_per_s"] > 0 and x["ttft_p50_ms"] > 0
    assert len(report["samples"]) == len(keys)
    assert report["server_loop"] == "uvloop" or importlib.util.find_spec("uvloop") is None
    whats = [t["what"] for t in report["targets"]]
    assert sum("concurrency" in w for w in whats) == 8  # 4 checks at 2 concurrencies
    assert any(t["met"] is None for t in report["targets"])  # no point at >= 64 streams
    text = (out / "serving.txt").read_text()
    assert text == r.stdout.split("wrote ")[0]
    for word in ("GET /work", "threadpool", "blocking", "tokens", "TTFT p50", "targets"):
        assert word in text
    if importlib.util.find_spec("matplotlib"):
        assert (out / "serving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serving_benchmark_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        _serving.main(["--concurrency", "1,x"])
    with pytest.raises(SystemExit):
        _serving.main(["--repeats", "0"])


@needs_torch
@needs_http
def test_the_guides_batched_endpoint_refuses_a_malformed_request_alone() -> None:
    # docs/guides/serving.md's /predict_batched, as written: a request one feature short, sent
    # with good ones, failed every request of its batch (torch.stack of the batch raised).
    import re

    import httpx

    page = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "serving.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    ns: dict[str, Any] = {}
    exec(blocks[0], ns)  # the app and its model
    exec(next(b for b in blocks if "/predict_batched" in b).split("async def main")[0], ns)

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=ns["app"], raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            good = [client.post("/predict_batched", json=[float(i)] * 16) for i in range(15)]
            bad = client.post("/predict_batched", json=[1.0] * 15)
            return [r.status_code for r in await asyncio.gather(*good, bad)]

    assert asyncio.run(main()) == [200] * 15 + [422]
