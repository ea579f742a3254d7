"""The benchmark report and the pytest-benchmark suite run, and produce complete output.

These check the measuring machinery (every comparison present, files written, targets
computed from the measured rows, steps that time out reported as such), never a speed: speed
lives in the reports themselves.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import aiocuda
from aiocuda.bench import _report
from aiocuda.bench._methods import (
    AIOCUDA,
    AIOCUDA_CALLBACK,
    AIOCUDA_POLL,
    CALLBACK,
    EXECUTOR,
    FLOOR,
    NOTHING,
    POLL0,
    POLL1,
    methods_for,
)
from aiocuda.bench._sources import PY_HOSTFN_CAP, CpuSource, DriverSource

ROOT = Path(__file__).resolve().parent.parent
CUDA = "cuda" in aiocuda.backends()
EMULATED = "cuda (driver emulator)"

TINY = _report.Config(
    in_flight=(1, 10, 300), ops=20, repeats=1, latency_samples=4, stall_samples=2, burst=2_000,
    idle_ops=50, idle_window_s=0.05, memory_ops=2_000, memory_repeats=1,
    kernels=50, busy_kernels=40, kernel_us=50, kernel_repeats=1, step_timeout_s=60,
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report() -> _report.Report:
    return _report.run(TINY, quick=True, loops=_report.available_loops())


def _sources() -> dict[str, str]:
    return {"cpu": "cpu", EMULATED: "cuda"} if CUDA else {"cpu": "cpu"}


def test_every_comparison_is_measured_on_every_source_and_loop(report):
    sources, loops = _sources(), set(_report.available_loops())
    assert report.timed_out == [] and report.failed == []
    assert {(t["source"], t["loop"]) for t in report.throughput} == {
        (s, lp) for s in sources for lp in loops
    }
    for s, kind in sources.items():
        methods = methods_for(kind)
        ours = [m for m in methods if m in (AIOCUDA, AIOCUDA_CALLBACK, AIOCUDA_POLL)]
        assert ours == ([AIOCUDA_CALLBACK, AIOCUDA_POLL] if kind == "cuda" else [AIOCUDA])
        for lp in loops:
            rows = {(t["method"], t["in_flight"]) for t in report.throughput
                    if t["source"] == s and t["loop"] == lp}
            assert rows == {(m, n) for m in methods for n in TINY.in_flight}
            waits = {r["method"] for r in report.latency if r["source"] == s and r["loop"] == lp}
            assert waits == set(methods) - {FLOOR}
            bursts = {b["method"] for b in report.burst if b["source"] == s and b["loop"] == lp}
            assert bursts == {*ours, CALLBACK, FLOOR}
            idle = {b["method"] for b in report.idle_cpu if b["source"] == s and b["loop"] == lp}
            assert idle == {NOTHING, *ours, EXECUTOR, POLL0, POLL1, CALLBACK}
    assert all(t["ops_per_s"] > 0 and t["cpu_us_per_op"] > 0 for t in report.throughput)
    assert all(len(r["samples_us"]) == TINY.latency_samples for r in report.latency)
    assert all(r["first_us"] > 0 for r in report.latency)  # the first wake-up, on its own
    assert {m["source"] for m in report.memory} == set(sources)
    assert report.elapsed_s > 0


def test_python_host_functions_are_capped_on_the_cuda_source(report):
    if not CUDA:
        pytest.skip("the cuda backend is not available")
    cb = [t for t in report.throughput if t["source"] == EMULATED and t["method"] == CALLBACK]
    assert {t["in_flight"]: t["max_in_flight"] for t in cb} == {1: 1, 10: 10,
                                                                  300: PY_HOSTFN_CAP}
    burst = [b for b in report.burst if b["source"] == EMULATED and b["method"] == CALLBACK]
    assert all(b["completions"] == PY_HOSTFN_CAP and b["capped"] for b in burst)
    assert all(b["completions"] == TINY.burst and not b["capped"] for b in report.burst
               if b["method"] != CALLBACK or b["source"] == "cpu")
    idle = [x for x in report.idle_cpu if x["source"] == EMULATED and x["method"] == CALLBACK]
    assert all(x["waits"] == min(TINY.idle_ops, PY_HOSTFN_CAP) for x in idle)
    text = _report.table(report)
    assert f"{PY_HOSTFN_CAP}*" in text and f"at most {PY_HOSTFN_CAP} in flight" in text
    assert any("capped at" in n for n in report.notes)
    assert any("cuStreamWaitValue32" in n for n in report.notes)  # the gate, on the emulator


def test_stalls_and_kernels_are_measured_on_the_cuda_path_per_strategy(report):
    if not CUDA:
        pytest.skip("the cuda backend is not available")
    each = {(m, lp) for m in (AIOCUDA_CALLBACK, AIOCUDA_POLL) for lp in _report.available_loops()}
    assert {(s["method"], s["loop"]) for s in report.stall} == each | {
        (CALLBACK, lp) for lp in _report.available_loops()}
    assert all(s["samples_us"] for s in report.stall)  # stream held long enough to queue both
    assert {(k["method"], k["loop"]) for k in report.kernels} == each
    assert all(k["emulated"] and k["ratio"] > 0 for k in report.kernels)
    assert {(k["method"], k["loop"]) for k in report.awaited_kernels} == each
    for k in report.awaited_kernels:
        assert k["kernels"] == TINY.busy_kernels and k["kernel_us"] == TINY.kernel_us
        assert k["back_to_back_stream_s"] > 0 and k["awaited_stream_s"] > 0
        assert k["ratio"] == pytest.approx(k["back_to_back_stream_s"] / k["awaited_stream_s"])
        assert "early_completions" in k
    assert "driver emulator" in report.cuda and "not a GPU" in report.cuda
    assert f"cuda rows: {report.cuda}" in _report.table(report)


def test_targets_follow_from_the_rows(report):
    names = [t["what"] for t in report.targets]
    assert any(n.startswith("aiocuda: throughput vs in-loop floor (cpu, asyncio") for n in names)
    assert any(n.startswith("aiocuda: wake-up p50 vs run_in_executor (cpu, asyncio") for n in names)
    assert any(n.startswith("aiocuda: wake-up p99 vs poll sleep(0) (cpu, asyncio") for n in names)
    assert any(n.startswith("aiocuda: CPU per completion vs run_in_executor (cpu") for n in names)
    assert any(n.startswith("aiocuda: CPU while 50 wait on slow work vs poll sleep(0) (cpu")
               for n in names)
    if CUDA:
        for m in (AIOCUDA_CALLBACK, AIOCUDA_POLL):
            mine = [n for n in names if n.startswith(f"{m}: ")]
            for metric in ("throughput vs in-loop floor", "wake-up p50 vs poll sleep(0)",
                           "CPU per completion", "CPU while", "heartbeat p99 lateness",
                           "stream stall", "kernels of 50 us, each awaited",
                           "awaits that completed before"):
                assert any(metric in n for n in mine), (m, metric)
    for t in report.targets:
        if t["what"].startswith("aiocuda: throughput vs in-loop floor (cpu, asyncio"):
            ours = next(r for r in report.throughput if r["method"] == AIOCUDA
                        and r["source"] == "cpu" and r["loop"] == "asyncio" and r["in_flight"] == 300)
            floor = next(r for r in report.throughput if r["method"] == FLOOR
                         and r["source"] == "cpu" and r["loop"] == "asyncio" and r["in_flight"] == 300)
            assert t["value"] == pytest.approx(ours["ops_per_s"] / floor["ops_per_s"], rel=1e-3)
            assert t["met"] == (t["value"] >= 0.9)
        if t["target"] == "-":
            assert t["met"] is None


def test_report_files_table_and_redrawing(report, tmp_path):
    written = _report.write(report, tmp_path / "out")
    assert {p.name for p in written} == {"report.json", "report.txt", "throughput.png",
                                         "latency.png"}
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["throughput"] == report.throughput
    text = (tmp_path / "out" / "report.txt").read_text()
    assert "targets" in text and "aiocuda" in text and report.machine in text
    for png in ("throughput.png", "latency.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == PNG_MAGIC
    r = subprocess.run(
        [sys.executable, "-m", "aiocuda.bench", "--redraw", str(tmp_path / "out" / "report.json"),
         "--out", str(tmp_path / "again")], capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / "latency.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "again" / "report.txt").read_text() == text


def test_cli_rejects_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "aiocuda.bench", "--repeats", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--repeats must be at least 1" in r.stderr


# ---- steps that do not finish ----------------------------------------------------------------
def _runner(tmp_path: Path, timeout: float, grace: float) -> tuple[_report.Runner, io.StringIO]:
    cfg = _report.Config(step_timeout_s=timeout, stuck_grace_s=grace)
    log = io.StringIO()
    report = _report.Report("test machine", True, {"repeats": 1, "latency_samples": 1})
    return _report.Runner(report, cfg, _report.Progress(3, out=log), tmp_path), log


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_a_step_past_its_timeout_is_reported_and_the_next_one_runs(tmp_path, kind):
    if kind == "cuda" and not CUDA:
        pytest.skip("the cuda backend is not available")
    runner, _ = _runner(tmp_path, timeout=0.3, grace=30)
    src = CpuSource() if kind == "cpu" else DriverSource()
    runner.src = src
    done: list[str] = []

    async def never() -> None:  # awaits work behind a gate nobody opens
        src.gate()
        await aiocuda.synchronize(src.stream)

    async def fine() -> None:
        await aiocuda.synchronize(src.stream)  # the stream drained once the gate was opened
        done.append("fine")

    async def main() -> list[bool]:
        return [await runner.step("stuck step", never), await runner.step("next step", fine)]

    try:
        assert asyncio.run(main()) == [False, True]
    finally:
        runner.watchdog.close()
        src.close()
    assert done == ["fine"]
    assert runner.report.timed_out == ["stuck step: no result within 0.3 s"]
    saved = json.loads((tmp_path / "report.json").read_text())  # written as the run goes
    assert saved["timed_out"] == runner.report.timed_out
    assert "timed out: stuck step" in (tmp_path / "report.txt").read_text()


def test_the_watchdog_opens_the_gates_of_a_loop_stuck_in_a_driver_call(tmp_path):
    if not CUDA:
        pytest.skip("the cuda backend is not available")
    runner, log = _runner(tmp_path, timeout=0.2, grace=0.3)
    src = DriverSource()
    runner.src = src

    async def blocked() -> None:  # the loop thread itself waits in the driver, behind a gate
        src.gate()
        src.event().wait()

    try:
        asyncio.run(runner.step("blocking step", blocked))
    finally:
        runner.watchdog.close()
        src.close()
    assert "watchdog: 'blocking step' is stuck past its timeout; opening the gates" in log.getvalue()


def test_a_loop_stuck_for_good_ends_the_run_with_the_report_so_far(tmp_path):
    code = textwrap.dedent(f"""
        import asyncio, io, sys, time
        from pathlib import Path
        from aiocuda.bench import _report
        cfg = _report.Config(step_timeout_s=0.2, stuck_grace_s=0.3)
        report = _report.Report("test machine", True, {{"repeats": 1, "latency_samples": 1}})
        report.notes.append("measured before")
        runner = _report.Runner(report, cfg, _report.Progress(1, out=sys.stderr), Path({str(tmp_path)!r}))

        async def stuck() -> None:
            time.sleep(30)  # the loop thread never comes back

        asyncio.run(runner.step("stuck for good", stuck))
        print("not reached")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "not reached" not in r.stdout
    text = (tmp_path / "report.txt").read_text()
    assert "note: measured before" in text
    assert "timed out: stuck for good: the loop thread was stuck past the timeout" in text


def test_pytest_benchmark_suite_runs():
    r = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench"), "-q", "-p", "no:cacheprovider",
         "--benchmark-disable", "-k", "aiocuda or floor or call_soon"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout
