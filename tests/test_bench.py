"""The benchmark report and the pytest-benchmark suite run, and produce complete output.

These check the measuring machinery (every comparison present, files written, targets
computed from the measured rows), never a speed: speed lives in the reports themselves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import aiocuda
from aiocuda.bench import _report
from aiocuda.bench._methods import AIOCUDA, CALLBACK, FLOOR, METHODS

ROOT = Path(__file__).resolve().parent.parent

TINY = _report.Config(
    in_flight=(1, 10), ops=20, repeats=1, latency_samples=4, stall_samples=2, burst=2_000,
    idle_ops=50, idle_window_s=0.05, memory_ops=2_000, memory_repeats=1,
    kernels=50,
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report() -> _report.Report:
    return _report.run(TINY, quick=True, loops=_report.available_loops())


def test_every_comparison_is_measured_on_every_source_and_loop(report):
    sources = {"cpu", "cuda (driver emulator)"} if "cuda" in aiocuda.backends() else {"cpu"}
    loops = set(_report.available_loops())
    assert {(t["source"], t["loop"]) for t in report.throughput} == {
        (s, lp) for s in sources for lp in loops
    }
    for s in sources:
        for lp in loops:
            rows = {(t["method"], t["in_flight"]) for t in report.throughput
                    if t["source"] == s and t["loop"] == lp}
            assert rows == {(m, n) for m in METHODS for n in TINY.in_flight}
            waits = {r["method"] for r in report.latency if r["source"] == s and r["loop"] == lp}
            assert waits == set(METHODS) - {FLOOR}
            bursts = {b["method"] for b in report.burst if b["source"] == s and b["loop"] == lp}
            assert bursts == {AIOCUDA, CALLBACK, FLOOR}
    assert all(t["ops_per_s"] > 0 and t["cpu_us_per_op"] > 0 for t in report.throughput)
    assert all(len(r["samples_us"]) == TINY.latency_samples for r in report.latency)
    assert {m["source"] for m in report.memory} == sources


def test_stalls_and_kernels_are_measured_on_the_cuda_path(report):
    if "cuda" not in aiocuda.backends():
        pytest.skip("the cuda backend is not available")
    assert {(s["method"], s["loop"]) for s in report.stall} == {
        (m, lp) for m in (AIOCUDA, CALLBACK) for lp in _report.available_loops()
    }
    assert all(s["samples_us"] for s in report.stall)  # stream held long enough to queue both
    assert all(k["emulated"] and k["ratio"] > 0 for k in report.kernels)


def test_targets_follow_from_the_rows(report):
    names = [t["what"] for t in report.targets]
    assert any(n.startswith("throughput vs in-loop floor (cpu, asyncio") for n in names)
    assert any(n.startswith("wake-up p50 vs run_in_executor (cpu, asyncio") for n in names)
    for t in report.targets:
        if t["what"].startswith("throughput vs in-loop floor (cpu, asyncio"):
            ours = next(r for r in report.throughput if r["method"] == AIOCUDA
                        and r["source"] == "cpu" and r["loop"] == "asyncio" and r["in_flight"] == 10)
            floor = next(r for r in report.throughput if r["method"] == FLOOR
                         and r["source"] == "cpu" and r["loop"] == "asyncio" and r["in_flight"] == 10)
            assert t["value"] == pytest.approx(ours["ops_per_s"] / floor["ops_per_s"], rel=1e-3)
            assert t["met"] == (t["value"] >= 0.9)


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


def test_pytest_benchmark_suite_runs():
    r = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "bench"), "-q", "-p", "no:cacheprovider",
         "--benchmark-disable", "-k", "aiocuda or floor"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout
