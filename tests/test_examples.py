"""The examples run (on the cpu backend here; unchanged on a GPU)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


def missing(path: Path) -> list[str]:
    """The packages an example's docstring says it needs ("Needs: torch, aiohttp.") that are
    not installed."""
    m = re.search(r"^Needs: (.+)\.$", path.read_text(), re.MULTILINE)
    needs = [n.strip() for n in m.group(1).split(",")] if m else []
    return [n for n in needs if importlib.util.find_spec(n) is None]


def run_example(path: Path, env: dict[str, str] | None = None,
                args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    absent = missing(path)
    if absent:
        pytest.skip(f"examples/{path.name} needs {', '.join(absent)}, which is not installed")
    r = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


OWN_TESTS = {"distributed_training.py"}  # tests of their own, below
GENERIC = [p for p in EXAMPLES if p.name not in OWN_TESTS]


@pytest.mark.parametrize("path", GENERIC, ids=[p.name for p in GENERIC])
def test_example_runs(path: Path) -> None:
    r = run_example(path)
    assert "done" in r.stdout or "totals" in r.stdout


# Every process reports, at exit (atexit runs before the interpreter is torn down), the threads
# torch.distributed started that are still alive: gloo's ("pt_gloo_runloop", "gloo_tcp_loop")
# and the TCP store's ("pt_tcpstore_uv").
EXIT_THREADS = """
import atexit, os, sys

def _report():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    left = sorted(n for n in names if n.startswith(("pt_", "gloo")))
    if "torch.distributed" in sys.modules:  # not multiprocessing's resource tracker
        sys.stderr.write(f"EXIT-THREADS {os.getpid()} [{','.join(left)}]\\n")
    sys.stderr.flush()

atexit.register(_report)
"""

DISTRIBUTED_OUTPUT = re.compile(
    r"step   0 loss (?P<first>\d+\.\d{4})\n"
    r"step   5 loss \d+\.\d{4}\n"
    r"step  10 loss \d+\.\d{4}\n"
    r"step  15 loss (?P<last>\d+\.\d{4})\n"
    r"rank 0: 20 steps, 2560 samples, heartbeat ran \d+ times\n"
    r"rank 1: 20 steps, 2560 samples, heartbeat ran \d+ times\n"
    r"replicas identical, 5120 samples in all\n"
    r"done\n"
)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads from /proc")
def test_distributed_training_prints_each_ranks_totals_and_leaves_no_thread(tmp_path):
    """Each rank's totals, as rank 0 gathered them; the loss falls; and every process (the
    launcher and both ranks) ends with no thread of torch.distributed alive: a gloo thread left
    to drop its last collective while the interpreter exits aborts it (about 1 run in 20)."""
    (tmp_path / "sitecustomize.py").write_text(EXIT_THREADS)
    path = next(p for p in EXAMPLES if p.name == "distributed_training.py")
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path),
                                                       os.environ.get("PYTHONPATH")]))}
    r = run_example(path, env)
    m = DISTRIBUTED_OUTPUT.fullmatch(r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m["last"]) < float(m["first"]) / 10, r.stdout
    exits = re.findall(r"^EXIT-THREADS (\d+) \[(.*)\]$", r.stderr, re.MULTILINE)
    assert len(exits) == 3, r.stderr  # the launcher and two ranks
    assert all(left == "" for _, left in exits), r.stderr


def example(name: str) -> ModuleType:
    """Import examples/<name>.py (skipped where what it needs is not installed)."""
    path = next(p for p in EXAMPLES if p.name == f"{name}.py")
    absent = missing(path)
    if absent:
        pytest.skip(f"examples/{path.name} needs {', '.join(absent)}, which is not installed")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, args", [
    ("fastapi_server", ("--requests", "0")),  # max() of no batch sizes
    ("token_server", ("--tokens", "1", "--streams", "2", "--engine", "aiocuda")),  # no gaps
])
def test_an_example_runs_with_the_least_work(name: str, args: tuple[str, ...]) -> None:
    r = run_example(next(p for p in EXAMPLES if p.name == f"{name}.py"), args=args)
    assert "done" in r.stdout, r.stdout + r.stderr


def test_training_overlap_measures_after_a_warm_up_and_refuses_no_steps() -> None:
    # The load-then-train run went first and paid torch's first calls: `--steps 1` printed a
    # 37x gain from overlapping; `--steps 0` printed a ratio of nothing and a "Task exception
    # was never retrieved" (the first batch, loaded after its stream was closed).
    path = next(p for p in EXAMPLES if p.name == "training_overlap.py")
    absent = missing(path)
    if absent:
        pytest.skip(f"examples/{path.name} needs {', '.join(absent)}, which is not installed")
    r = run_example(path, args=("--steps", "1"))
    gain = float(re.search(r"\(([\d.]+)x\)", r.stdout).group(1))  # type: ignore[union-attr]
    # One step cannot overlap much (about 1x; the bug gave 26-53x). Each timed run takes only
    # 20-60 ms, so a stall on a busy machine can multiply one of them: a loose bound.
    assert gain < 12, r.stdout
    r = subprocess.run([sys.executable, str(path), "--steps", "0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--steps must be at least 1" in r.stderr, r.stderr


def test_inference_server_refuses_no_clients_and_takes_a_short_run() -> None:
    # --clients 0 (or --seconds 0) and a run short enough for one request ended in a
    # StatisticsError traceback from the load generator ("must have at least two data points").
    path = next(p for p in EXAMPLES if p.name == "inference_server.py")
    if missing(path):
        pytest.skip(f"examples/{path.name} needs {', '.join(missing(path))}")
    for args in (["--clients", "0"], ["--seconds", "0"]):
        r = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and "--clients must be at least 1" in r.stderr, r.stderr
    r = run_example(path, args=("--seconds", "0.001", "--clients", "1"))
    assert "done" in r.stdout, r.stdout + r.stderr


def test_inference_server_load_generator_counts_only_the_requests_it_made() -> None:
    # A run too short for two requests was padded for statistics.quantiles(), and the padded
    # list was what it counted: no request was reported as 2 (and one as 2), at a rate to match.
    mod = example("inference_server")
    r = asyncio.run(mod.loadgen("http://127.0.0.1:9/predict", 0.0, 1))  # over before a request
    assert r["requests"] == 0 and r["rps"] == 0, r


@pytest.mark.parametrize("args", [["--streams", "0"], ["--tokens", "0"], ["--step-ms", "-1"],
                                  ["--step-ms", "nan"]])
def test_token_server_refuses_arguments_out_of_range(args: list[str]) -> None:
    # Each ended in a traceback: StatisticsError (no streams), an HTTP 400 raised by the
    # client (no tokens), the engine's ValueError (a negative step).
    path = next(p for p in EXAMPLES if p.name == "token_server.py")
    if missing(path):
        pytest.skip(f"examples/{path.name} needs {', '.join(missing(path))}")
    r = subprocess.run([sys.executable, str(path), "--engine", "aiocuda", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "must be at least 1" in r.stderr, r.stderr


def test_fastapi_server_refuses_features_that_are_not_finite_float32() -> None:
    # They got a 200 with null probabilities (1e308 is inf in float32); inf and nan, once
    # refused, made FastAPI's own error response fail (it echoes the input: no inf in JSON).
    ex = example("fastapi_server")
    import httpx

    async def main() -> list[tuple[int, str]]:
        transport = httpx.ASGITransport(app=ex.create_app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            out = []
            for value in ("1e308", "-1e39", "Infinity", "-Infinity", "NaN", "0.5"):
                body = '{"x": [%s]}' % ", ".join([value] * ex.FEATURES)
                r = await client.post("/predict", content=body,
                                      headers={"content-type": "application/json"})
                out.append((r.status_code, r.text))
            return out

    replies = asyncio.run(main())
    assert [code for code, _ in replies] == [422] * 5 + [200], replies
    assert "finite" in replies[2][1] and "null" not in replies[-1][1]


def test_inference_server_refuses_a_malformed_request_alone() -> None:
    # Checked after batching (the length only), one request of strings failed the whole batch
    # (500 for all); a body that was not JSON, or not an object, was a 500.
    ex = example("inference_server")
    from aiohttp.test_utils import TestClient, TestServer

    async def main() -> tuple[list[int], list[int]]:
        batcher = ex.Batcher(ex.torch_predictors()[0])
        worker = asyncio.ensure_future(batcher.run())
        try:
            async with TestClient(TestServer(ex.make_app(batcher))) as client:
                async def post(**kw: Any) -> int:
                    async with client.post("/predict", **kw) as r:
                        return r.status

                good = [post(json={"x": [0.1] * ex.FEATURES}) for _ in range(15)]
                bad = [post(json={"x": ["a"] * ex.FEATURES}),
                       post(json={"x": [float("nan")] * ex.FEATURES}),
                       post(json={"x": [True] * ex.FEATURES}),
                       post(json=[1, 2]), post(data="{not json")]
                codes = await asyncio.gather(*good, *bad)
                return codes[:15], codes[15:]
        finally:
            worker.cancel()

    good, bad = asyncio.run(main())
    assert good == [200] * 15 and bad == [400] * 5, (good, bad)


def test_ray_serve_deployment_refuses_a_malformed_request_alone() -> None:
    # The deployment's class itself, without Ray: a request one feature short, sent with good
    # ones, failed them all (torch.stack of the batch).
    with warnings.catch_warnings():  # ray's own deprecation warnings, at import
        warnings.simplefilter("ignore")
        ex = example("ray_serve")
    replica = ex.Classifier.func_or_class()

    async def main() -> list[Any]:
        good = [replica([0.1] * ex.FEATURES) for _ in range(7)]
        bad = [replica([0.1] * (ex.FEATURES - 1)), replica(["a"] * ex.FEATURES)]
        return await asyncio.gather(*good, *bad, return_exceptions=True)

    replies = asyncio.run(main())
    assert all(isinstance(r, dict) for r in replies[:7]), replies
    assert all(isinstance(r, ValueError) and "finite numbers" in str(r) for r in replies[7:])


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2
