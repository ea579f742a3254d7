"""The benchmark report and the pytest-benchmark suite run, and produce complete output.

These check the measuring machinery (every comparison present, files written, targets
computed from the measured rows, steps that time out reported as such), never a speed: speed
lives in the reports themselves.
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

import aiocuda
from aiocuda.bench import _methods, _peers, _report, _trio
from aiocuda.bench._methods import (
    AIOCUDA,
    AIOCUDA_CALLBACK,
    AIOCUDA_FLAG,
    AIOCUDA_POLL,
    CALLBACK,
    DEVICE_EVENTFD,
    EXECUTOR,
    FLOOR,
    NOTHING,
    POLL0,
    POLL1,
    methods_for,
)
from aiocuda.bench._peers import CUPY_EXECUTOR, CUPY_HOSTFN, NUMBA, PEERS
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

# The loops the whole report runs on (trio: its wake-up latency only, bench/_trio.py).
ASYNCIO_LOOPS = tuple(k for k in _report.available_loops() if k != "trio")


@pytest.fixture(scope="module")
def report() -> _report.Report:
    return _report.run(TINY, quick=True, loops=_report.available_loops())


def _sources() -> dict[str, str]:
    return {"cpu": "cpu", EMULATED: "cuda"} if CUDA else {"cpu": "cpu"}


def test_every_comparison_is_measured_on_every_source_and_loop(report):
    sources, loops = _sources(), set(ASYNCIO_LOOPS)
    assert report.timed_out == [] and report.failed == []
    assert {(t["source"], t["loop"]) for t in report.throughput} == {
        (s, lp) for s in sources for lp in loops
    }
    if "trio" in _report.available_loops():  # bench/_trio.py: wake-up latency only
        for s, kind in sources.items():
            rows = [r for r in report.latency if r["source"] == s and r["loop"] == "trio"]
            assert {r["method"] for r in rows} == set(_trio.methods_for(kind))
            assert all(len(r["samples_us"]) == TINY.latency_samples for r in rows)
        assert "wake-up latency in a trio run" in _report.table(report)
    for s, kind in sources.items():
        methods = methods_for(kind)
        ours = [m for m in methods if m in (AIOCUDA, AIOCUDA_FLAG, AIOCUDA_CALLBACK, AIOCUDA_POLL)]
        assert ours == ([AIOCUDA_FLAG, AIOCUDA_CALLBACK, AIOCUDA_POLL] if kind == "cuda"
                        else [AIOCUDA])
        for lp in loops:
            rows = {(t["method"], t["in_flight"]) for t in report.throughput
                    if t["source"] == s and t["loop"] == lp}
            assert rows == {(m, n) for m in methods for n in TINY.in_flight}
            waits = {r["method"] for r in report.latency if r["source"] == s and r["loop"] == lp}
            # and on the emulator, its device writing an eventfd: the sleeping-loop floor there
            assert waits == set(methods) - {FLOOR} | ({DEVICE_EVENTFD} if kind == "cuda" else set())
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
    each = {(m, lp) for m in (AIOCUDA_FLAG, AIOCUDA_CALLBACK, AIOCUDA_POLL)
            for lp in ASYNCIO_LOOPS}
    assert {(s["method"], s["loop"]) for s in report.stall} == each | {
        (CALLBACK, lp) for lp in ASYNCIO_LOOPS}
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
        for m in (AIOCUDA_FLAG, AIOCUDA_CALLBACK, AIOCUDA_POLL):
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


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_a_stamp_is_where_the_work_ends_never_after(kind):
    # The wake-up's start: after the held work (2 ms from before it was queued, less the one query
    # a driver stamp may err early by) and no later than the moment it is seen done.
    if kind == "cuda" and not CUDA:
        pytest.skip("the cuda backend is not available")
    src = CpuSource() if kind == "cpu" else DriverSource()
    try:
        before = time.perf_counter()
        src.hold(0.002)
        done_at = src.stamp()
        ev = src.event()
        ev.wait()
        seen = time.perf_counter()
        assert before + 0.002 - 0.0005 <= done_at() <= seen
    finally:
        src.close()


def test_a_gpu_run_is_held_to_the_gpu_wake_up_targets():
    # Issue 14: on a GPU, wake-up p50 <= 10 us and p99 <= 40 us; rows from the emulator are not
    # held to them (its figures stand for no GPU).
    def report_for(source: str, p50: float, p99: float) -> _report.Report:
        r = _report.Report("test machine", True, {"repeats": 1, "latency_samples": 3})
        r.latency.append({"source": source, "loop": "asyncio", "method": AIOCUDA_FLAG,
                          "p50_us": p50, "p99_us": p99})
        return r

    gpu = "cuda (NVIDIA H100 80GB HBM3)"
    rows = {t["what"]: t for t in _report.targets(report_for(gpu, 9.5, 41.0))}
    assert rows[f"{AIOCUDA_FLAG}: wake-up p50 on the GPU ({gpu}, asyncio), us"]["met"] is True
    p99 = rows[f"{AIOCUDA_FLAG}: wake-up p99 on the GPU ({gpu}, asyncio), us"]
    assert (p99["target"], p99["met"]) == ("<= 40", False)
    emulated = _report.targets(report_for(EMULATED, 9.5, 41.0))
    assert not any("on the GPU" in t["what"] for t in emulated)


def test_the_sleeping_loop_floor_is_the_same_sources_where_it_has_one():
    # Issue 14's wake-up p50 target (<= 1.25x the sleeping-loop floor, a native thread writing the
    # eventfd as the work ends): on the emulator, against its own device thread writing one (same
    # source, same device threads), the cpu backend's worker then shown beside it; on a GPU,
    # which writes no eventfd, against the cpu backend's worker.
    def targets(source: str, device_floor: bool) -> dict[str, dict[str, Any]]:
        r = _report.Report("test machine", True, {"repeats": 1, "latency_samples": 3})
        r.latency.append({"source": source, "loop": "asyncio", "method": AIOCUDA_FLAG,
                          "p50_us": 12.0, "p99_us": 50.0})
        r.latency.append({"source": "cpu", "loop": "asyncio", "method": AIOCUDA,
                          "p50_us": 8.0, "p99_us": 50.0})
        if device_floor:
            r.latency.append({"source": source, "loop": "asyncio", "method": DEVICE_EVENTFD,
                              "p50_us": 10.0, "p99_us": 30.0})
        return {t["what"]: t for t in _report.targets(r)}

    where = f"{EMULATED}, asyncio"
    rows = targets(EMULATED, True)
    dev = rows[f"{AIOCUDA_FLAG}: wake-up p50 vs the sleeping-loop floor (the emulated device "
               f"writing the eventfd; {where})"]
    assert (dev["value"], dev["target"], dev["met"]) == (1.2, "<= 1.25x", True)
    cpu = rows[f"{AIOCUDA_FLAG}: wake-up p50 vs the cpu backend's worker writing the eventfd "
               f"({where})"]
    assert (cpu["value"], cpu["target"], cpu["met"]) == (1.5, "-", None)
    gpu = "cuda (NVIDIA H100 80GB HBM3)"
    rows = targets(gpu, False)
    cpu = rows[f"{AIOCUDA_FLAG}: wake-up p50 vs the cpu backend's worker writing the eventfd "
               f"({gpu}, asyncio)"]
    assert (cpu["value"], cpu["target"], cpu["met"]) == (1.5, "<= 1.25x", False)
    assert not any("emulated device" in w for w in rows)


@pytest.mark.skipif(not CUDA, reason="the cuda backend is not available")
def test_the_emulated_device_wakes_a_loop_after_its_work():
    # DEVICE_EVENTFD: the loop wakes once the held work is done, and no earlier than its stamp.
    src = DriverSource()
    if not src.notifies:
        src.close()
        pytest.skip("AIOCUDA_TEST_REAL_DRIVER=1: a real driver writes no eventfd")

    async def main() -> list[float]:
        return await _methods.wake_latency(DEVICE_EVENTFD, src, 5)

    try:
        took = asyncio.run(main())
    finally:
        src.close()
    assert len(took) == 6 and all(0 < t < 5 for t in took)


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
        from aiocuda.bench import _report, _trio
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


# ---- peers: numba-cuda and CuPy, faked here (no GPU) ------------------------------------------
class _FakeNumbaStream:
    """numba-cuda's Stream.async_done: a stream callback that calls call_soon_threadsafe."""

    def __init__(self, src: DriverSource) -> None:
        self.src = src
        self.handle = ctypes.c_void_p(src.handle)  # numba's ctypes binding holds a c_void_p

    def async_done(self) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def resolver() -> None:
            if not fut.done():
                fut.set_result(self)

        self.src.post(lambda: loop.call_soon_threadsafe(resolver))
        return fut


class _FakeCupyStream:
    """cupy.cuda.ExternalStream: synchronize, done, launch_host_func (optionally missing)."""

    def __init__(self, src: DriverSource, ptr: int) -> None:
        self.src, self.ptr = src, ptr  # CuPy: Stream.ptr, the raw handle

    @property
    def done(self) -> bool:
        return int(self.src.lib.cuStreamQuery(ctypes.c_void_p(self.ptr))) == 0

    def synchronize(self) -> None:  # ctypes releases the GIL, as CuPy does
        assert int(self.src.lib.cuStreamSynchronize(ctypes.c_void_p(self.ptr))) == 0

    def add_callback(self, callback: Any, arg: Any) -> None:
        self.src.post(lambda: callback(self, 0, arg))


class _FakeCupyStreamWithHostFunc(_FakeCupyStream):
    def launch_host_func(self, callback: Any, arg: Any) -> None:
        self.src.post(lambda: callback(arg))


def _current_context(src: DriverSource) -> int:
    ctx = ctypes.c_void_p()
    assert int(src.lib.cuCtxGetCurrent(ctypes.byref(ctx))) == 0
    return ctx.value or 0


def _install_fakes(monkeypatch: pytest.MonkeyPatch, src: DriverSource, host_func: bool = True,
                   numba_context: int | None = None) -> None:
    """Fake numba, numba.cuda and cupy modules with the surface the peers use, on `src`'s
    stream (a stream handle other than `src.handle` is an error, as the peers must wrap it)."""
    def stream_of(handle: int) -> DriverSource:
        assert handle == src.handle
        return src

    numba = types.ModuleType("numba")
    numba.__version__ = "0.0+fake"
    cuda = types.ModuleType("numba.cuda")
    cuda.external_stream = lambda h: _FakeNumbaStream(stream_of(h))
    cuda.current_context = lambda: types.SimpleNamespace(
        handle=ctypes.c_void_p(numba_context or _current_context(src)))
    numba.cuda = cuda
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "0.0+fake"
    cls = _FakeCupyStreamWithHostFunc if host_func else _FakeCupyStream

    def external_stream(ptr: int, device_id: int = -1) -> _FakeCupyStream:
        assert device_id == 0
        return cls(stream_of(ptr), ptr)

    cupy.cuda = types.SimpleNamespace(
        ExternalStream=external_stream,
        driver=types.SimpleNamespace(ctxGetCurrent=lambda: _current_context(src)))
    for name, mod in (("numba", numba), ("numba.cuda", cuda), ("cupy", cupy)):
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.fixture
def gpu_like(monkeypatch):
    """A cuda source on the driver emulator that says it is a real GPU (`emulated` False)."""
    if not CUDA:
        pytest.skip("the cuda backend is not available")
    src = DriverSource()
    monkeypatch.setattr(src, "emulated", False)
    yield src
    src.close()


def test_peers_are_selected_only_on_a_real_gpu(monkeypatch, gpu_like):
    _install_fakes(monkeypatch, gpu_like)
    skipped: list[str] = []
    failed: list[str] = []
    notes: list[str] = []
    cpu = CpuSource()
    try:
        assert _peers.attach(cpu, skipped, failed, notes) == {}
    finally:
        cpu.close()
    emulated = DriverSource()
    try:
        assert emulated.emulated and _peers.attach(emulated, skipped, failed, notes) == {}
    finally:
        emulated.close()
    assert skipped == failed == notes == []
    peers = _peers.attach(gpu_like, skipped, failed, notes)
    assert list(peers) == [NUMBA, CUPY_EXECUTOR, CUPY_HOSTFN] and skipped == failed == []
    assert any(n.startswith("peer numba-cuda") and "numba 0.0+fake" in n for n in notes)
    assert any(n.startswith("peer CuPy 0.0+fake") and "launch_host_func" in n for n in notes)
    assert any(f"{gpu_like.handle:#x}" in n and f"at most {PY_HOSTFN_CAP}" in n for n in notes)
    assert methods_for("cuda", tuple(peers))[-3:] == PEERS


def test_a_missing_peer_package_is_skipped_with_its_name(monkeypatch, gpu_like):
    for name in ("numba", "numba.cuda", "cupy"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    skipped: list[str] = []
    failed: list[str] = []
    assert _peers.attach(gpu_like, skipped, failed, []) == {}
    assert [s.split(":")[0] for s in skipped] == ["numba-cuda", "CuPy"] and failed == []
    assert all("not installed" in s for s in skipped)


def test_a_peer_in_another_context_is_a_failure_not_a_measurement(monkeypatch, gpu_like):
    _install_fakes(monkeypatch, gpu_like, numba_context=0x1234)
    failed: list[str] = []
    peers = _peers.attach(gpu_like, [], failed, [])
    assert list(peers) == [CUPY_EXECUTOR, CUPY_HOSTFN]
    assert len(failed) == 1 and "numba-cuda" in failed[0] and "0x1234" in failed[0]


def test_cupy_without_launch_host_func_uses_add_callback(monkeypatch, gpu_like):
    _install_fakes(monkeypatch, gpu_like, host_func=False)
    notes: list[str] = []
    peers = _peers.attach(gpu_like, [], [], notes)
    assert any("add_callback" in n for n in notes)

    async def main() -> None:
        gpu_like.hold(0.001)
        await asyncio.wait_for(peers[CUPY_HOSTFN](asyncio.get_running_loop())(), 10)

    asyncio.run(main())


def test_peers_are_measured_beside_aiocuda_on_the_same_stream(tmp_path, monkeypatch, gpu_like):
    _install_fakes(monkeypatch, gpu_like)
    report = _report.Report("test machine", True, dict(TINY.__dict__))
    gpu_like.peers.update(_peers.attach(gpu_like, report.skipped, report.failed, report.notes))
    runner = _report.Runner(report, TINY, _report.Progress(1, out=io.StringIO()), tmp_path)
    runner.src = gpu_like
    wanted = (*PEERS, AIOCUDA_CALLBACK, FLOOR)
    steps = [(w, f) for w, f in _report._plan(report, TINY, "cuda", gpu_like, "asyncio",
                                              tuple(gpu_like.peers))
             if w.endswith(wanted) and "kernels" not in w]

    async def main() -> None:
        for what, step in steps:
            await runner.step(what, step)

    try:
        asyncio.run(main())
    finally:
        runner.watchdog.close()
    assert report.failed == [] and report.timed_out == []
    capped = {NUMBA: PY_HOSTFN_CAP, CUPY_HOSTFN: PY_HOSTFN_CAP, CUPY_EXECUTOR: 300}
    for p in PEERS:
        rows = {t["in_flight"]: t["max_in_flight"] for t in report.throughput if t["method"] == p}
        assert rows == {1: 1, 10: 10, 300: capped[p]}, p
    assert {r["method"] for r in report.latency} >= set(PEERS)
    assert {(b["method"], b["completions"]) for b in report.burst if b["method"] in PEERS} == {
        (NUMBA, PY_HOSTFN_CAP), (CUPY_HOSTFN, PY_HOSTFN_CAP)}
    assert {s["method"] for s in report.stall if s["method"] in PEERS} == {NUMBA, CUPY_HOSTFN}
    assert {i["method"] for i in report.idle_cpu} >= set(PEERS)
    report.targets = _report.targets(report)
    names = [t["what"] for t in report.targets]
    for p in PEERS:
        assert any(n.startswith(f"{AIOCUDA_CALLBACK}: throughput vs {p} (") for n in names), p
        assert any(n.startswith(f"{AIOCUDA_CALLBACK}: wake-up p50 vs {p} (") for n in names), p
    text = _report.table(report)
    assert all(f"  {p} " in text for p in PEERS)


def test_a_failing_peer_is_reported_once_and_the_run_goes_on(tmp_path):
    def broken(loop: asyncio.AbstractEventLoop) -> Any:
        def start() -> Any:
            raise RuntimeError("boom")
        return start

    src = CpuSource()
    src.peers[NUMBA] = broken
    report = _report.Report("test machine", True, dict(TINY.__dict__))
    runner = _report.Runner(report, TINY, _report.Progress(1, out=io.StringIO()), tmp_path)
    runner.src = src
    steps = [(w, f) for w, f in _report._plan(report, TINY, "cpu", src, "asyncio", (NUMBA,))
             if w.endswith((NUMBA, FLOOR))]

    async def main() -> list[bool]:
        return [await runner.step(what, step) for what, step in steps]

    try:
        ok = asyncio.run(main())
    finally:
        runner.watchdog.close()
        src.close()
    assert ok.count(False) == 1  # its warm-up failed; no later step ran it again
    assert len(report.failed) == 1 and NUMBA in report.failed[0] and "boom" in report.failed[0]
    assert [t["method"] for t in report.throughput] == [FLOOR] * len(TINY.in_flight)


# ---- a report in parts: --source and --merge ----------------------------------------------------
def _bench(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiocuda.bench", "--quick", "--repeats", "1",
                           "--out", str(out), *args], capture_output=True, text=True, timeout=300)


def test_a_report_is_built_in_parts_with_source_and_merge(tmp_path):
    if not CUDA and "uvloop" not in _report.available_loops():
        pytest.skip("needs the cuda backend or uvloop for a second part")
    first = _bench(tmp_path, "--source", "cpu", "--loop", "asyncio")
    assert first.returncode == 0, first.stderr[-3000:]
    one = json.loads((tmp_path / "report.json").read_text())
    assert {(t["source"], t["loop"]) for t in one["throughput"]} == {("cpu", "asyncio")}
    assert [m["source"] for m in one["memory"]] == ["cpu"]
    pair = (EMULATED, "asyncio") if CUDA else ("cpu", "uvloop")
    second = _bench(tmp_path, "--source", "cuda" if CUDA else "cpu", "--loop", pair[1], "--merge")
    assert second.returncode == 0, second.stderr[-3000:]
    two = json.loads((tmp_path / "report.json").read_text())
    assert list(dict.fromkeys((t["source"], t["loop"]) for t in two["throughput"])) == [
        ("cpu", "asyncio"), pair]
    assert [t for t in two["throughput"] if t["source"] == "cpu" and t["loop"] == "asyncio"] == \
        one["throughput"]  # the first part's rows, untouched
    assert [(p["source"], p["loop"]) for p in two["parts"]] == [("cpu", "asyncio"), pair]
    assert two["elapsed_s"] > one["elapsed_s"]
    # targets over both parts, the table too
    assert any(f"({pair[0]}, {pair[1]}" in t["what"] for t in two["targets"])
    assert any("(cpu, asyncio" in t["what"] for t in two["targets"])
    text = (tmp_path / "report.txt").read_text()
    assert "cpu on asyncio" in text and f"{pair[0]} on {pair[1]}" in text and "measured: " in text
    # measuring a pair again replaces its rows: no duplicates
    third = _bench(tmp_path, "--source", "cpu", "--loop", "asyncio", "--merge")
    assert third.returncode == 0, third.stderr[-3000:]
    three = json.loads((tmp_path / "report.json").read_text())
    assert len(three["throughput"]) == len(two["throughput"])
    assert [t for t in three["throughput"] if (t["source"], t["loop"]) == pair] == [
        t for t in two["throughput"] if (t["source"], t["loop"]) == pair]
    assert [m["source"] for m in three["memory"]] == (["cpu", EMULATED] if CUDA else ["cpu"])


def test_merge_refuses_a_report_of_another_configuration(tmp_path):
    base = _report.Report("m", True, json.loads(json.dumps(asdict(_report.QUICK))))
    _report.write(base, tmp_path, plot=False)
    r = subprocess.run([sys.executable, "-m", "aiocuda.bench", "--merge", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "made with --quick" in r.stderr
    r = _bench(tmp_path, "--merge", "--repeats", "2", "--source", "cpu")
    assert r.returncode == 2 and "repeats 3 there, 2 now" in r.stderr
    assert _report.mismatch(base, True, {**asdict(_report.QUICK),
                                         "step_timeout_s": 5.0}) == ""


def test_merge_replaces_pairs_and_keeps_the_rest():
    def rows(source: str, loop: str, value: float) -> dict[str, Any]:
        return {"source": source, "loop": loop, "method": FLOOR, "in_flight": 1,
                "ops_per_s": value, "cpu_us_per_op": 1.0}

    base = _report.Report("m", True, {"repeats": 1}, elapsed_s=10.0,
                          throughput=[rows("cpu", "asyncio", 1), rows("cpu", "uvloop", 2)],
                          memory=[{"source": "cpu", "future_bytes": 1}],
                          failed=["cpu asyncio: x: boom", "cpu uvloop: y: boom", "cpu: memory"],
                          notes=["a"], skipped=["s"],
                          parts=[{"source": "cpu", "loop": "asyncio", "machine": "m",
                                  "seconds": 5.0},
                                 {"source": "cpu", "loop": "uvloop", "machine": "m",
                                  "seconds": 5.0}])
    new = _report.Report("m2", True, {"repeats": 1}, elapsed_s=4.0,
                         throughput=[rows("cpu", "asyncio", 3)], notes=["a", "b"],
                         parts=[{"source": "cpu", "loop": "asyncio", "machine": "m2",
                                 "seconds": 4.0}])
    merged = _report.merge(base, new)
    assert [t["ops_per_s"] for t in merged.throughput] == [3, 2]  # asyncio replaced, in order
    assert merged.memory == base.memory  # not measured again: kept
    assert merged.failed == ["cpu uvloop: y: boom"]  # the cpu source and pair were measured
    assert merged.notes == ["a", "b"] and merged.skipped == ["s"]
    assert [p["seconds"] for p in merged.parts] == [4.0, 5.0]
    assert merged.machine == "m + m2" and merged.elapsed_s == 14.0
    assert base.throughput[0]["ops_per_s"] == 1  # the base report is not changed


@pytest.mark.parametrize("ops", [100, 300])
def test_the_demo_runs_exactly_the_operations_asked_for(ops):
    # --ops below the demo's 256 coroutines ran none and divided by zero; other counts were
    # rounded down to a multiple of 256.
    r = subprocess.run([sys.executable, "-m", "aiocuda", "demo", "--ops", str(ops)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"aiocuda demo: {ops} operations" in r.stdout
    rates = [float(line.split()[-6]) for line in r.stdout.splitlines()
             if line.startswith(("aiocuda (await", "run_in_executor("))]
    assert len(rates) == 2 and min(rates) > 0, r.stdout


@pytest.mark.parametrize("args", [["--work-ms", "nan"], ["--work-ms", "inf"], ["--work-ms", "-1"],
                                  ["--ops", "0"], ["--streams", "0"]])
def test_the_demo_refuses_arguments_out_of_range_with_a_message(args):
    # --work-ms nan or inf passed the check (work_s < 0 is False for both) and ended in a
    # ValueError traceback from CpuStream.delay inside the demo's tasks.
    r = subprocess.run([sys.executable, "-m", "aiocuda", "demo", "--ops", "10", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "--work-ms from 0 to 1000" in r.stderr, r.stderr


def test_the_benchmarks_help_names_the_serving_benchmark():
    # `python -m aiocuda.bench --help`, which the docs point to, did not mention `serving`.
    r = subprocess.run([sys.executable, "-m", "aiocuda.bench", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "python -m aiocuda.bench serving --help" in " ".join(r.stdout.split()), r.stdout


@pytest.mark.parametrize("command", ["info", "demo"])
def test_uvloop_asked_for_where_it_is_not_installed_says_so(command):
    # `python -m aiocuda info --uvloop` ended in a PackageNotFoundError traceback, and
    # `demo --uvloop` in a ModuleNotFoundError one, where uvloop is not installed.
    code = ("import sys; sys.modules['uvloop'] = None; from aiocuda.__main__ import main; "
            f"sys.exit(main([{command!r}, '--uvloop']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "uvloop is not installed: pip install 'aiocuda[uvloop]'" in r.stderr, r.stderr
