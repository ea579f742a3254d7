"""Run the comparisons, then write the report: a table, a JSON file and PNG plots.

Each measurement is a step with a timeout: a step that does not finish in time is cancelled and
listed as timed out, and the run goes on. A watchdog thread covers a loop thread stuck where
asyncio cannot cancel it (in a driver call): it opens the source's gates, and if that does not
free the loop either, writes the report so far, with the step named, and ends the process.
With an output folder, report.json and report.txt are rewritten after every step.

A report can be made in parts (`merge`): each run measures some sources and loops, and what it
measures replaces those (source, loop) pairs in the report it is merged into. A pair's rows
always come from one run, since the targets compare methods measured in the same run.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import __version__
from ._methods import (
    AIOCUDA,
    CALLBACK,
    EXECUTOR,
    FLOOR,
    METHODS,
    NOTHING,
    DEVICE_EVENTFD,
    OURS,
    POLL0,
    POLL1,
    TO_THREAD,
    awaited_kernels,
    burst_lag,
    idle_cpu,
    in_flight_for,
    methods_for,
    paced_cpu,
    percentile,
    stream_stall,
    throughput,
    tiny_kernels,
    wake_latency,
)
from ._peers import CUPY_EXECUTOR, HOSTFN_PEERS, PEERS, attach
from ._sources import CpuSource, DriverSource, Source


@dataclass(frozen=True)
class Config:
    in_flight: tuple[int, ...] = (1, 10, 100, 1_000, 10_000, 100_000)
    ops: int = 3_000  # waits per throughput measurement (more when in_flight is larger)
    repeats: int = 5
    budget_s: float = 8.0  # a method slower than this at one size is not run at larger sizes
    latency_samples: int = 300
    stall_samples: int = 50
    burst: int = 100_000
    idle_ops: int = 10_000
    idle_window_s: float = 1.0
    memory_ops: int = 200_000
    memory_repeats: int = 3
    kernels: int = 10_000  # tiny kernels, each awaited by its own coroutine
    busy_kernels: int = 2_000  # kernels of kernel_us, each followed by an await kept in flight
    kernel_us: float = 50.0
    kernel_repeats: int = 3
    paced_kernels: int = 500  # kernels of paced_us awaited one after another (host CPU)
    paced_us: float = 1000.0
    step_timeout_s: float = 120.0  # one measurement; then it is reported as timed out
    stuck_grace_s: float = 15.0  # past the timeout, the watchdog steps in


QUICK = Config(
    in_flight=(1, 100, 10_000), ops=150, repeats=3, budget_s=1.0, latency_samples=30,
    stall_samples=6, idle_window_s=0.2, memory_ops=50_000, memory_repeats=1,
    kernels=2_000, kernel_repeats=1, paced_kernels=100, step_timeout_s=30.0,
)

LOOPS = ("asyncio", "uvloop")
# not run with more than 10,000 in flight
SLOW_METHODS = (EXECUTOR, TO_THREAD, POLL0, POLL1, CUPY_EXECUTOR)
IDLE_ALTERNATIVES = (EXECUTOR, POLL0, POLL1, CALLBACK)  # to_thread waits as the executor does


@dataclass
class Report:
    machine: str
    quick: bool
    config: dict[str, Any]
    cuda: str = ""  # what the "cuda" rows ran on
    throughput: list[dict[str, Any]] = field(default_factory=list)
    latency: list[dict[str, Any]] = field(default_factory=list)
    stall: list[dict[str, Any]] = field(default_factory=list)
    burst: list[dict[str, Any]] = field(default_factory=list)
    idle_cpu: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    kernels: list[dict[str, Any]] = field(default_factory=list)  # tiny kernels
    awaited_kernels: list[dict[str, Any]] = field(default_factory=list)
    paced: list[dict[str, Any]] = field(default_factory=list)  # kernels awaited one by one
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    # one per (source, loop) measured: {"source", "loop", "machine", "seconds"}; a merged report
    # lists the runs its pairs come from
    parts: list[dict[str, Any]] = field(default_factory=list)


ROWS = ("throughput", "latency", "stall", "burst", "idle_cpu", "kernels", "awaited_kernels",
        "paced")
# configuration that may differ between the parts of one report
RUN_ONLY = ("step_timeout_s", "stuck_grace_s")


def load(path: Path) -> Report:
    data = json.loads(path.read_text())
    names = Report.__dataclass_fields__
    return Report(**{k: v for k, v in data.items() if k in names})


def mismatch(base: Report, quick: bool, config: dict[str, Any]) -> str:
    """Why a run with this configuration cannot be merged into `base` ("" if it can)."""
    config = json.loads(json.dumps(config))  # as report.json holds it (tuples are lists)
    if base.quick != quick:
        return f"it was made {'with' if base.quick else 'without'} --quick"
    diff = [k for k in config if k not in RUN_ONLY and base.config.get(k) != config[k]]
    if diff:
        return "its configuration differs: " + ", ".join(
            f"{k} {base.config.get(k)!r} there, {config[k]!r} now" for k in diff)
    return ""


def merge(base: Report, new: Report) -> Report:
    """`base` with what `new` measured: each (source, loop) in `new.parts` replaces that pair's
    rows, timeouts and failures; a memory row replaces that source's; notes and skips are
    joined; the targets are computed over the whole."""
    pairs = {(p["source"], p["loop"]) for p in new.parts}
    measured = {p["source"] for p in new.parts}
    out = Report(**{**asdict(base), "targets": []})
    for name in ROWS:
        kept = [r for r in getattr(base, name) if (r["source"], r["loop"]) not in pairs]
        setattr(out, name, sorted(kept + getattr(new, name), key=_order))
    again = {m["source"] for m in new.memory}
    out.memory = sorted([m for m in base.memory if m["source"] not in again] + new.memory,
                        key=_order)
    # step messages start with "<source> <loop>: ", a source's own ones with "<source>: "
    prefixes = tuple([f"{s} {lp}: " for s, lp in pairs] + [f"{s}: " for s in measured])
    out.timed_out = [x for x in base.timed_out if not x.startswith(prefixes)] + new.timed_out
    out.failed = [x for x in base.failed if not x.startswith(prefixes)] + new.failed
    out.notes = list(dict.fromkeys(base.notes + new.notes))
    out.skipped = list(dict.fromkeys(base.skipped + new.skipped))
    out.parts = sorted([p for p in base.parts if (p["source"], p["loop"]) not in pairs]
                       + new.parts, key=_order)
    if new.machine not in base.machine.split(" + "):
        out.machine = f"{base.machine} + {new.machine}"
    out.cuda = new.cuda or base.cuda
    out.config = {**base.config, **{k: new.config[k] for k in RUN_ONLY if k in new.config}}
    out.elapsed_s = base.elapsed_s + new.elapsed_s
    out.targets = targets(out)
    return out


def _order(row: dict[str, Any]) -> tuple[bool, int]:
    """A full run's order (cpu first, asyncio first), whichever part measured a row; a stable
    sort keeps the order within a pair."""
    loop = row.get("loop")
    return row["source"] != "cpu", LOOPS.index(loop) if loop in LOOPS else len(LOOPS)


class Progress:
    """One status line on stderr: a bar, the step count and what runs now."""

    def __init__(self, total: int, out: TextIO = sys.stderr) -> None:
        self.total, self.done, self.out, self.t0 = total, 0, out, time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        filled = 30 * self.done // max(1, self.total)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"{time.monotonic() - self.t0:4.0f}s {what}")
        if self.out.isatty():
            self.out.write(f"\r{line[:110]:110}")
        elif self.done * 10 // self.total != (self.done - 1) * 10 // self.total:
            self.out.write(line + "\n")  # a log: one line per tenth
        else:
            return
        self.out.flush()

    def say(self, text: str) -> None:
        self.out.write(("\n" if self.out.isatty() else "") + text + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.out.isatty():
            self.out.write("\n")


def machine_name() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{platform.node()}: {os.cpu_count()} x {cpu}, Python {platform.python_version()}, "
            f"aiocuda {__version__}")


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def available_loops() -> tuple[str, ...]:
    """The loops installed: asyncio, uvloop, and trio (its wake-up latency only)."""
    import importlib.util

    return ("asyncio", *(k for k in ("uvloop", "trio") if importlib.util.find_spec(k)))


def sources(skipped: list[str], kinds: tuple[str, ...] = ("cpu", "cuda")
            ) -> list[Callable[[], Source]]:
    from .. import backends

    out: list[Callable[[], Source]] = [CpuSource] if "cpu" in kinds else []
    if "cuda" in kinds and "cuda" in backends():
        out.append(DriverSource)
    elif "cuda" in kinds:
        skipped.append("cuda: the cuda backend is not available here (no driver or no device; "
                       "set AIOCUDA_LIBCUDA to the driver emulator to measure the cuda path)")
    return out


# ---- steps, timeouts, the watchdog ----------------------------------------------------------
class Watchdog:
    """Notices a step whose loop thread did not come back after its timeout (a driver call that
    blocks for ever cannot be cancelled by asyncio): opens the gates once, then gives up."""

    def __init__(self, grace_s: float, on_stuck: Callable[[str], None], say: Callable[[str], None]):
        self.grace_s, self.on_stuck, self.say = grace_s, on_stuck, say
        self._lock = threading.Lock()
        self._what: str | None = None
        self._deadline = 0.0
        self._open: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aiocuda-bench-watchdog",
                                        daemon=True)
        self._thread.start()

    def arm(self, what: str, timeout: float, open_gates: Callable[[], None] | None) -> None:
        with self._lock:
            self._what, self._open = what, open_gates
            self._deadline = time.monotonic() + timeout + self.grace_s

    def disarm(self) -> None:
        with self._lock:
            self._what = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            with self._lock:
                what, open_gates = self._what, self._open
                late = what is not None and time.monotonic() > self._deadline
                if late:
                    self._open = None
                    self._deadline = time.monotonic() + self.grace_s
            if not late or what is None:
                continue
            if open_gates is not None:
                self.say(f"watchdog: '{what}' is stuck past its timeout; opening the gates")
                open_gates()
                continue
            self.on_stuck(what)
            return


Step = tuple[str, Callable[[], Awaitable[None]]]


class Runner:
    def __init__(self, report: Report, cfg: Config, progress: Progress, out: Path | None,
                 base: Report | None = None) -> None:
        self.report, self.cfg, self.progress, self.out = report, cfg, progress, out
        self.base = base  # the report this run is merged into, if any
        self.src: Source | None = None
        self.watchdog = Watchdog(cfg.stuck_grace_s, self._stuck, progress.say)

    async def step(self, what: str, run: Callable[[], Awaitable[None]]) -> bool:
        """Run one measurement under the step timeout; False if it timed out or failed."""
        self.progress.step(what)
        timeout = self.cfg.step_timeout_s
        self.watchdog.arm(what, timeout, self.src.open_gates if self.src else None)
        ok = False
        try:
            await asyncio.wait_for(run(), timeout)
            ok = True
        except asyncio.TimeoutError:
            self.report.timed_out.append(f"{what}: no result within {timeout:g} s")
            self.progress.say(f"timed out: {what}")
        except Exception as e:  # noqa: BLE001 - reported, and the run goes on
            self.report.failed.append(f"{what}: {type(e).__name__}: {e}")
            self.progress.say(f"failed: {what}: {e}")
        finally:
            self.watchdog.disarm()
        if not ok and self.src is not None:
            await self._settle(self.src)
        self.save()
        return ok

    async def _settle(self, src: Source) -> None:
        """After a step cut short: open its gates and let the stream drain (bounded)."""
        src.open_gates()
        ev = src.event()
        deadline = time.monotonic() + 10
        while not ev.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)

    def current(self) -> Report:
        """The report so far, merged into the base report if there is one."""
        if self.base is not None:
            return merge(self.base, self.report)
        self.report.targets = targets(self.report)
        return self.report

    def save(self) -> None:
        # with a base, every save holds the base too: a run cut short loses none of it
        if self.out is not None:
            write(self.current(), self.out, plot=False)

    def _stuck(self, what: str) -> None:  # on the watchdog's thread: the loop thread is stuck
        self.report.timed_out.append(f"{what}: the loop thread was stuck past the timeout "
                                     "(in a driver call?); the run stopped here")
        report = self.current()
        self.progress.say(table(report))
        if self.out is not None:
            write(report, self.out, plot=False)
            self.progress.say(f"partial report in {self.out}")
        sys.stdout.flush()
        os._exit(3)


def run(cfg: Config, quick: bool, loops: tuple[str, ...], out: Path | None = None,
        kinds: tuple[str, ...] = ("cpu", "cuda"), base: Report | None = None) -> Report:
    """Measure the sources of `kinds` on `loops`; with `base`, return the two merged."""
    t_start = time.monotonic()
    report = Report(machine_name(), quick, asdict(cfg))
    makers = sources(report.skipped, kinds)
    if "uvloop" not in available_loops():
        report.skipped.append("uvloop: not installed (pip install 'aiocuda[bench]')")
    asyncio_loops = tuple(k for k in loops if k != "trio")
    total = sum(len(asyncio_loops) * len(_plan(report, cfg, "cuda" if make is DriverSource
                                               else "cpu", None, ""))
                + cfg.memory_repeats + ("trio" in loops) * 3 for make in makers)
    progress = Progress(total)
    runner = Runner(report, cfg, progress, out, base)
    try:
        for make in makers:
            src = make()
            runner.src = src
            src.peers.update(attach(src, report.skipped, report.failed, report.notes))
            progress.total += len(asyncio_loops) * (len(_plan(report, cfg, src.kind, None, "",
                                                      tuple(src.peers)))
                                            - len(_plan(report, cfg, src.kind, None, "")))
            for note in src.notes:
                if note not in report.notes:
                    report.notes.append(note)
            if isinstance(src, DriverSource):
                report.cuda = (f"{src.device}, through {src.path}" if not src.emulated else
                               f"aiocuda's cuda backend on {src.device} ({src.path})")
            try:
                for kind in loops:
                    part = {"source": src.name, "loop": kind, "machine": report.machine,
                            "seconds": 0.0}
                    report.parts.append(part)  # from now on this pair replaces a base's
                    t0 = time.monotonic()
                    if kind == "trio":
                        try:
                            _trio_suite(runner, src)
                        finally:
                            part["seconds"] = round(time.monotonic() - t0, 1)
                        continue
                    loop = new_loop(kind)
                    try:
                        loop.run_until_complete(_suite(runner, src, kind))
                    finally:
                        loop.close()
                        part["seconds"] = round(time.monotonic() - t0, 1)
            finally:
                src.close()
                runner.src = None
                for note in src.notes:  # a gate fallback is noted when it happens
                    if note not in report.notes:
                        report.notes.append(note)
            _memory(runner, src.name)
    finally:
        runner.watchdog.close()
    progress.finish()
    report.elapsed_s = time.monotonic() - t_start
    return runner.current()


def _trio_suite(runner: Runner, src: Source) -> None:
    """Wake-up latency in a trio run (bench/_trio.py), each step bounded as on asyncio."""
    import trio

    from . import _trio

    async def main() -> None:
        for m, measure in _trio.steps(src, runner.cfg.latency_samples):
            what = f"{src.name} trio: wake-up latency {m}"
            runner.progress.step(what)
            timeout = runner.cfg.step_timeout_s
            runner.watchdog.arm(what, timeout, src.open_gates)
            try:
                with trio.fail_after(timeout):
                    first, *samples = await measure()
                runner.report.latency.append({"source": src.name, "loop": "trio", "method": m,
                                              **_summary_us(samples), "first_us": first * 1e6})
            except trio.TooSlowError:
                runner.report.timed_out.append(f"{what}: no result within {timeout:g} s")
            except Exception as e:  # noqa: BLE001 - reported, and the run goes on
                runner.report.failed.append(f"{what}: {type(e).__name__}: {e}")
            finally:
                runner.watchdog.disarm()
            runner.save()

    trio.run(main)


async def _suite(runner: Runner, src: Source, kind: str) -> None:
    for what, step in _plan(runner.report, runner.cfg, src.kind, src, kind, tuple(src.peers)):
        await runner.step(what, step)


def _plan(report: Report, cfg: Config, source_kind: str, src: Source | None, loop: str,
          peers: tuple[str, ...] = ()) -> list[Step]:
    """The measurements for one source on one loop, in order (`src` None: only to count them),
    with these of the peers (`Source.peers`)."""
    name = src.name if src else source_kind
    row = {"source": name, "loop": loop}
    methods = methods_for(source_kind, peers)
    ours = tuple(m for m in methods if m in OURS)
    hostfn_peers = tuple(m for m in methods if m in HOSTFN_PEERS)
    cuda = source_kind == "cuda"
    steps: list[Step] = []
    the_src: Any = src
    broken: set[str] = set()  # peers that failed or timed out once here: not run again

    def add(what: str, fn: Callable[[], Awaitable[None]], method: str = "") -> None:
        if method in PEERS:
            fn = _unless_broken(method, fn, broken)
        steps.append((f"{name} {loop}: {what}", fn))

    for m in methods:  # warm-up
        async def warm(m: str = m) -> None:
            await throughput(m, the_src, in_flight_for(m, the_src, 100), 100)
        add(f"warm-up {m}", warm, m)
    for m in methods:
        if m == FLOOR:  # nothing crosses a thread: no wake-up to measure
            continue

        async def lat(m: str = m) -> None:
            first, *samples = await wake_latency(m, the_src, cfg.latency_samples)
            report.latency.append({**row, "method": m, **_summary_us(samples),
                                   "first_us": first * 1e6})
        add(f"wake-up latency {m}", lat, m)
    if cuda:  # the sleeping-loop floor of this source, where it has one (the emulator)
        async def device_lat() -> None:
            if not getattr(the_src, "notifies", False) or not hasattr(os, "eventfd"):
                return
            first, *samples = await wake_latency(DEVICE_EVENTFD, the_src, cfg.latency_samples)
            report.latency.append({**row, "method": DEVICE_EVENTFD, **_summary_us(samples),
                                   "first_us": first * 1e6})
        add(f"wake-up latency {DEVICE_EVENTFD}", device_lat)
    # A method over its time budget at one size is not run at larger ones; its repeats at that
    # size still run, so its row is a median like every other (a run past the budget left one
    # sample, and a target used it).
    too_slow: dict[str, int] = {}   # method -> the size it went over the budget at
    failed: set[str] = set()
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for n in cfg.in_flight:
        for _ in range(cfg.repeats):
            for m in methods:  # interleaved, so drift hits every method alike
                async def tput(m: str = m, n: int = n) -> None:
                    if m in failed or too_slow.get(m, n) < n or (m in SLOW_METHODS and n > 10_000):
                        return
                    eff = in_flight_for(m, the_src, n)
                    t0 = time.perf_counter()
                    try:
                        r = await throughput(m, the_src, eff, max(cfg.ops, n))
                    except BaseException:
                        failed.add(m)
                        raise
                    if time.perf_counter() - t0 > cfg.budget_s:
                        too_slow.setdefault(m, n)
                    got = runs.setdefault((m, n), [])
                    got.append(r)
                    _upsert(report.throughput, {**row, "method": m, "in_flight": n}, {
                        "max_in_flight": eff,
                        "ops_per_s": statistics.median(x[0] for x in got),
                        "cpu_us_per_op": statistics.median(x[1] for x in got),
                        "repeats": len(got),
                    })
                add(f"throughput, {n} in flight, {m}", tput, m)
    for m in (*ours, CALLBACK, *hostfn_peers, FLOOR):
        async def burst(m: str = m) -> None:
            n = in_flight_for(m, the_src, cfg.burst)
            lag = await burst_lag(m, the_src, n)
            report.burst.append({**row, "method": m, "completions": n,
                                 "capped": n < cfg.burst, **lag})
        add(f"loop lag during a burst, {m}", burst, m)
    if cuda:
        for m in (*ours, CALLBACK, *hostfn_peers):
            async def stall(m: str = m) -> None:
                samples = await stream_stall(m, the_src, cfg.stall_samples)
                report.stall.append({**row, "method": m, **_summary_us(samples)})
            add(f"stream stall under GIL contention, {m}", stall, m)
    for m in (NOTHING, *ours, *IDLE_ALTERNATIVES, *(p for p in methods if p in PEERS)):
        async def idle(m: str = m) -> None:
            n = 0 if m == NOTHING else in_flight_for(m, the_src, cfg.idle_ops)
            pct = await idle_cpu(m, the_src, n, cfg.idle_window_s)
            report.idle_cpu.append({**row, "method": m, "percent": pct, "waits": n})
        add(f"CPU while {cfg.idle_ops} wait, {m}", idle, m)
    for m in (*ours, POLL0, EXECUTOR):
        async def paced(m: str = m) -> None:
            got = await paced_cpu(m, the_src, cfg.paced_kernels, cfg.paced_us)
            report.paced.append({**row, "method": m, "kernels": cfg.paced_kernels,
                                 "kernel_us": cfg.paced_us, **got})
        add(f"CPU awaiting {cfg.paced_kernels} {cfg.paced_us:g} us kernels one by one, {m}",
            paced, m)
    if cuda:
        for m in ours:
            async def tiny(m: str = m) -> None:
                k = await tiny_kernels(m, the_src, cfg.kernels)
                report.kernels.append({**row, "method": m, "kernels": cfg.kernels,
                                       "emulated": the_src.emulated, **k})
            add(f"{cfg.kernels} tiny kernels, {m}", tiny)
        for m in ours:
            async def busy(m: str = m) -> None:
                k = await awaited_kernels(m, the_src, cfg.busy_kernels, cfg.kernel_us,
                                          cfg.kernel_repeats)
                report.awaited_kernels.append({**row, "method": m, "emulated": the_src.emulated,
                                               "time": "stream (timing events)", **k})
            add(f"awaiting each of {cfg.busy_kernels} {cfg.kernel_us:g} us kernels, {m}", busy)
    return steps


def _unless_broken(method: str, fn: Callable[[], Awaitable[None]], broken: set[str]
                   ) -> Callable[[], Awaitable[None]]:
    """`fn`, not run once `method` is in `broken`; its failure or timeout puts it there (a peer
    that fails, fails every step: its first failure is reported, and the run goes on)."""
    async def run() -> None:
        if method in broken:
            return
        try:
            await fn()
        except BaseException:
            broken.add(method)
            raise
    return run


def _upsert(rows: list[dict[str, Any]], key: dict[str, Any], values: dict[str, Any]) -> None:
    for r in rows:
        if all(r.get(k) == v for k, v in key.items()):
            r.update(values)
            return
    rows.append({**key, **values})


def _summary_us(seconds: list[float]) -> dict[str, Any]:
    us = sorted(s * 1e6 for s in seconds)
    return {"p50_us": percentile(us, 50), "p99_us": percentile(us, 99), "samples_us": us}


# ---- memory: a fresh process per measurement ------------------------------------------------
MEMORY_CHILD = "--memory-child"


def _memory(runner: Runner, source: str) -> None:
    cfg, report = runner.cfg, runner.report
    got: dict[str, list[float]] = {"futures": [], "aiocuda": []}
    for _ in range(cfg.memory_repeats):
        what = f"{source}: memory per pending operation"
        runner.progress.step(what)
        try:
            for kind in got:
                r = subprocess.run(
                    [sys.executable, "-m", "aiocuda.bench", MEMORY_CHILD, source, kind,
                     str(cfg.memory_ops), str(0.9 * cfg.step_timeout_s)],
                    capture_output=True, text=True, check=True, timeout=cfg.step_timeout_s,
                )
                got[kind].append(int(r.stdout.strip()) / cfg.memory_ops)
        except subprocess.TimeoutExpired:
            report.timed_out.append(f"{what}: no result within {cfg.step_timeout_s:g} s")
        except subprocess.CalledProcessError as e:
            report.failed.append(f"{what}: {e}: {e.stderr.strip()[-500:]}")
        except ValueError as e:
            report.failed.append(f"{what}: {e}")
        runner.save()
    if got["futures"] and got["aiocuda"]:
        fut, ours = statistics.median(got["futures"]), statistics.median(got["aiocuda"])
        report.memory.append({"source": source, "future_bytes": fut, "with_aiocuda_bytes": ours,
                              "aiocuda_bytes_per_op": ours - fut, "pending": cfg.memory_ops})
        runner.save()


MEMORY_HOLD_S = 5.0  # a timed gate's hold in the memory child (the measurement takes ~1 s)


def memory_child(source: str, what: str, n: int, timeout_s: float = 120.0) -> None:
    """Print the RSS growth from `n` pending waits (futures alone, or aiocuda's)."""
    import faulthandler
    import gc

    from .._api import synchronize

    # Ends the child even where its main thread is stuck in a driver call, before the parent
    # kills it (which it does at its timeout), so the failure shows the child's traceback.
    faulthandler.dump_traceback_later(timeout_s, exit=True)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        src: Source = CpuSource() if source == "cpu" else DriverSource()
        # Everything below stays pending behind a gate, opened once measured: nothing is left
        # running on the device when the child exits. A timed gate (where the driver cannot
        # wait on host memory) is a short kernel instead; the event tells if it ended too soon.
        gate = src.gate(min_hold_s=MEMORY_HOLD_S)
        held = src.event()
        synchronize(src.stream).cancel()  # the loop's queue exists before the baseline
        gc.collect()
        gc.disable()
        before = rss()
        if what == "futures":
            keep = [loop.create_future() for _ in range(n)]
        else:
            keep = [synchronize(src.stream) for _ in range(n)]
        grown = rss() - before
        pending = not held.done()
        gate.open()
        if not pending:
            print(f"the stream was not held for the whole measurement (a timed gate of "
                  f"{MEMORY_HOLD_S:g} s)", file=sys.stderr, flush=True)
            os._exit(1)
        print(grown, flush=True)
        del keep
        os._exit(0)  # the waits are still being completed: do not wait for them

    asyncio.run(main())


# ---- targets: each one a ratio against an alternative measured in the same run --------------
def _find(rows: list[dict[str, Any]], **key: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)


def _largest(rows: list[dict[str, Any]], **key: Any) -> dict[str, Any] | None:
    return max((r for r in rows if all(r.get(k) == v for k, v in key.items())),
               key=lambda r: r["in_flight"], default=None)


def _is_gpu(source: str) -> bool:
    return source.startswith("cuda (") and "emulator" not in source


def targets(r: Report) -> list[dict[str, Any]]:
    """One row per metric and method of aiocuda: its value (mostly a ratio against an
    alternative measured in the same run), the target where there is one ("-": none, met
    None), and whether it is met."""
    out: list[dict[str, Any]] = []

    def check(what: str, value: float, target: str = "-", met: bool | None = None) -> None:
        out.append({"what": what, "value": round(value, 4), "target": target, "met": met})

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("inf") if a else 1.0

    pairs = dict.fromkeys((t["source"], t["loop"]) for t in
                          [*r.throughput, *r.latency, *r.burst, *r.idle_cpu])
    for source, loop in pairs:
        key = {"source": source, "loop": loop}
        where = f"{source}, {loop}"
        ours = [m for m in METHODS if m in OURS and any(
            x["method"] == m for x in [*r.throughput, *r.latency] if x["source"] == source
            and x["loop"] == loop)]
        for m in ours:
            t = _largest(r.throughput, method=m, **key)
            if t:
                n = t["in_flight"]
                floor = _find(r.throughput, method=FLOOR, in_flight=n, **key)
                cb = _find(r.throughput, method=CALLBACK, in_flight=n, **key)
                if floor:
                    v = ratio(t["ops_per_s"], floor["ops_per_s"])
                    check(f"{m}: throughput vs in-loop floor ({where}, {n} in flight)", v,
                          ">= 0.9x", v >= 0.9)
                if cb:
                    capped = (f"; call_soon_threadsafe at most {cb['max_in_flight']} in flight"
                              if cb.get("max_in_flight", n) < n else "")
                    v = ratio(t["ops_per_s"], cb["ops_per_s"])
                    check(f"{m}: throughput vs call_soon_threadsafe ({where}, {n} in flight"
                          f"{capped})", v, ">= 3x", v >= 3)
                    v = ratio(t["cpu_us_per_op"], cb["cpu_us_per_op"])
                    check(f"{m}: CPU per completion vs call_soon_threadsafe ({where}, {n} in "
                          f"flight{capped})", v)
                ex = _largest(r.throughput, method=EXECUTOR, **key)
                mine = ex and _find(r.throughput, method=m, in_flight=ex["in_flight"], **key)
                if ex and mine:
                    v = ratio(mine["cpu_us_per_op"], ex["cpu_us_per_op"])
                    check(f"{m}: CPU per completion vs run_in_executor ({where}, "
                          f"{ex['in_flight']} in flight)", v)
                for p in PEERS:  # at ours' largest size, else the peer's own largest
                    o = (_find(r.throughput, method=p, in_flight=n, **key)
                         or _largest(r.throughput, method=p, **key))
                    mine = o and _find(r.throughput, method=m, in_flight=o["in_flight"], **key)
                    if o and mine:
                        size = (f"{o['in_flight']} in flight" +
                                (f"; {p} at most {o['max_in_flight']}"
                                 if o.get("max_in_flight", o["in_flight"]) < o["in_flight"]
                                 else ""))
                        check(f"{m}: throughput vs {p} ({where}, {size})",
                              ratio(mine["ops_per_s"], o["ops_per_s"]))
                        check(f"{m}: CPU per completion vs {p} ({where}, {size})",
                              ratio(mine["cpu_us_per_op"], o["cpu_us_per_op"]))
            lat = _find(r.latency, method=m, **key)
            if lat:
                for other, limit in ((EXECUTOR, 0.5), (POLL1, 0.05), (POLL0, None),
                                     *((peer, None) for peer in PEERS)):
                    o = _find(r.latency, method=other, **key)
                    if o:
                        for p in ("p50_us", "p99_us"):
                            v = ratio(lat[p], o[p])
                            if limit is None:
                                check(f"{m}: wake-up {p[:3]} vs {other} ({where})", v)
                            else:
                                check(f"{m}: wake-up {p[:3]} vs {other} ({where})", v,
                                      f"<= {limit}x", v <= limit)
                # The sleeping-loop floor: a native thread writes the eventfd as the work ends
                # (one hop), measured on the same loop in this run. On the driver emulator, its
                # own stream thread does (DEVICE_EVENTFD: same source, same device threads);
                # elsewhere the cpu backend's worker does, which is then the target's floor.
                cpu_floor = source != "cpu" and _find(r.latency, method=AIOCUDA,
                                                      source="cpu", loop=loop)
                dev_floor = _find(r.latency, method=DEVICE_EVENTFD, **key)
                if dev_floor:
                    v = ratio(lat["p50_us"], dev_floor["p50_us"])
                    check(f"{m}: wake-up p50 vs the sleeping-loop floor (the emulated device "
                          f"writing the eventfd; {where})", v, "<= 1.25x", v <= 1.25)
                if cpu_floor:
                    v = ratio(lat["p50_us"], cpu_floor["p50_us"])
                    check(f"{m}: wake-up p50 vs the cpu backend's worker writing the eventfd "
                          f"({where})", v, *(("<= 1.25x", v <= 1.25) if not dev_floor else ()))
                busy = _find(r.latency, method=POLL0, **key)
                if busy:
                    v = ratio(lat["p99_us"], busy["p99_us"])
                    check(f"{m}: wake-up p99 vs busy polling's p99 ({where})", v, "<= 1.0x",
                          v <= 1.0)
                if "first_us" in lat:
                    check(f"{m}: first wake-up after setting the method up (after set_strategy "
                          f"for a strategy) vs its p50 ({where})", ratio(lat["first_us"],
                                                                      lat["p50_us"]))
                if _is_gpu(source):  # issue 14's figures
                    check(f"{m}: wake-up p50 on the GPU ({where}), us", lat["p50_us"], "<= 10",
                          lat["p50_us"] <= 10)
                    check(f"{m}: wake-up p99 on the GPU ({where}), us", lat["p99_us"], "<= 40",
                          lat["p99_us"] <= 40)
            idle = _find(r.idle_cpu, method=m, **key)
            poll = _find(r.idle_cpu, method=POLL0, **key)
            none = _find(r.idle_cpu, method=NOTHING, **key)
            if idle and poll:
                v = ratio(idle["percent"], poll["percent"])
                base = f", nothing waiting {none['percent']:.1f}%" if none else ""
                check(f"{m}: CPU while {idle.get('waits', r.config['idle_ops'])} wait on slow "
                      f"work vs poll sleep(0) "
                      f"({where}; {idle['percent']:.1f}% vs {poll['percent']:.1f}% of a core"
                      f"{base})", v)
            if idle and none:
                v = idle["percent"] - none["percent"]
                check(f"{m}: CPU above nothing waiting while {idle.get('waits', r.config['idle_ops'])}"
                      f" wait on slow work ({where}), % of a core", v, "<= 1", v <= 1)
            pc = _find(r.paced, method=m, **key)
            if pc:
                busy = _find(r.paced, method=POLL0, **key)
                vs = f"; poll sleep(0) {busy['percent']:.0f}%" if busy else ""
                check(f"{m}: CPU while awaiting {pc['kernel_us']:g} us kernels one after another "
                      f"({where}{vs}), % of a core", pc["percent"], "<= 25",
                      pc["percent"] <= 25)
            s = _find(r.stall, method=m, **key)
            if s:
                check(f"{m}: stream stall p50 under GIL contention ({where}), us", s["p50_us"],
                      "< 50", s["p50_us"] < 50)
                for p in HOSTFN_PEERS:
                    o = _find(r.stall, method=p, **key)
                    if o:
                        check(f"{m}: stream stall p50 under GIL contention vs {p} ({where})",
                              ratio(s["p50_us"], o["p50_us"]))
            b = _find(r.burst, method=m, **key)
            if b:
                floor = _find(r.burst, method=FLOOR, **key)
                check(f"{m}: heartbeat p99 lateness, {b['completions']} completions in a burst "
                      f"({where}; in-loop floor "
                      f"{floor['p99_ms'] if floor else float('nan'):.1f}), ms", b["p99_ms"],
                      "<= 2", b["p99_ms"] <= 2)
            for k in r.awaited_kernels:
                if k["method"] == m and k["source"] == source and k["loop"] == loop:
                    check(f"{m}: {k['kernels']} kernels of {k['kernel_us']:g} us, each awaited, "
                          f"vs back to back, stream time ({where})", k["ratio"], ">= 0.9x",
                          k["ratio"] >= 0.9)
                    early = k.get("early_completions", 0)
                    check(f"{m}: awaits that completed before the stream reached earlier work, "
                          f"count ({where}; {2 * k['repeats']} checked)", early, "0", early == 0)
            for k in r.kernels:
                if k.get("method", AIOCUDA) == m and k["source"] == source and k["loop"] == loop:
                    what = (f"{m}: {k['kernels']} tiny kernels awaited vs back to back, wall "
                            f"time ({where})")
                    if k["emulated"]:
                        check(what, k["ratio"])
                    else:
                        check(what, k["ratio"], ">= 0.8x", k["ratio"] >= 0.8)
            if loop == "trio":  # bench/_trio.py: wake-up latency only, against trio's own ways
                mine = _find(r.latency, method=m, **key)
                for alt in ("trio to_thread", "trio poll 1ms"):
                    theirs = _find(r.latency, method=alt, **key)
                    if mine and theirs:
                        for pct in ("p50", "p99"):
                            check(f"{m}: wake-up {pct} vs {alt} ({where})",
                                  ratio(mine[f"{pct}_us"], theirs[f"{pct}_us"]))
    return out


# ---- output ----------------------------------------------------------------------------------
def _methods_in(rows: list[dict[str, Any]]) -> list[str]:
    seen = {r["method"] for r in rows}
    return [m for m in (*METHODS, DEVICE_EVENTFD) if m in seen]


def table(r: Report) -> str:
    lines = [f"machine: {r.machine}"]
    if r.cuda:
        lines.append(f"cuda rows: {r.cuda}")
    if r.parts:
        lines.append("measured: " + ", ".join(
            f"{p['source']} {p['loop']} {p['seconds']:.0f} s" for p in r.parts))
    lines.append("mode: " + ("--quick" if r.quick else "full") +
                 f", medians of {r.config['repeats']} (throughput), "
                 f"{r.config['latency_samples']} samples (wake-up)"
                 + (f", {r.elapsed_s:.0f} s" if r.elapsed_s else ""))
    lines += [f"note: {n}" for n in r.notes]
    lines.append("")
    capped_rows: list[str] = []
    w = max([22, *(len(x["method"]) for x in [*r.throughput, *r.latency])])  # method column
    for src in dict.fromkeys(t["source"] for t in r.throughput):
        for loop in dict.fromkeys(t["loop"] for t in r.throughput if t["source"] == src):
            key = {"source": src, "loop": loop}
            lines.append(f"{src} on {loop}")
            lines.append(f"  {'method':{w}} {'ops/s':>10} {'in flight':>9} {'x floor':>8} "
                         f"{'CPU us/op':>9} {'wake p50':>9} {'wake p99':>9} {'idle CPU':>9}")
            mine = [t for t in r.throughput if t["source"] == src and t["loop"] == loop]
            for m in _methods_in(mine + [x for x in r.latency if x["source"] == src
                                         and x["loop"] == loop]):
                t = _largest(mine, method=m)
                lat = _find(r.latency, method=m, **key)
                idle = _find(r.idle_cpu, method=m, **key)
                floor = t and _find(r.throughput, method=FLOOR, in_flight=t["in_flight"], **key)
                ratio = (f"{t['ops_per_s'] / floor['ops_per_s']:7.2f}x" if t and floor
                         else f"{'-':>8}")
                n = f"{t['in_flight']}" if t else "-"
                if t and t.get("max_in_flight", t["in_flight"]) < t["in_flight"]:
                    n = f"{t['max_in_flight']}*"
                    capped_rows.append(f"{m} on {src}: at most {t['max_in_flight']} in flight "
                                       f"(the row stands for {t['in_flight']})")
                lines.append(
                    f"  {m:{w}} " + (f"{t['ops_per_s']:10.0f}" if t else f"{'-':>10}")
                    + f" {n:>9} {ratio} "
                    + (f"{t['cpu_us_per_op']:9.1f} " if t else f"{'-':>9} ")
                    + (f"{lat['p50_us']:7.0f}us {lat['p99_us']:7.0f}us " if lat
                       else f"{'-':>9} {'-':>9} ")
                    + (f"{idle['percent']:8.1f}%" if idle else f"{'-':>9}")
                    + (f" ({idle['waits']} waiting)" if idle and idle.get(
                        "waits", r.config["idle_ops"]) != r.config["idle_ops"] else "")
                )
            firsts = [f"{x['method']} {x['first_us']:.0f} us" for x in r.latency
                      if x["source"] == src and x["loop"] == loop and "first_us" in x
                      and x["method"] in OURS]
            if firsts:
                lines.append("  first aiocuda wake-up after set-up (set_strategy), not in p50/p99: "
                             + ", ".join(firsts))
            none = _find(r.idle_cpu, method=NOTHING, **key)
            if none:
                lines.append(f"  idle CPU with nothing waiting (the gate alone): "
                             f"{none['percent']:.1f}%")
            lines.append("")
    trio_rows = [x for x in r.latency if x["loop"] == "trio"]
    if trio_rows:
        lines.append("wake-up latency in a trio run (one wait at a time)")
        for x in trio_rows:
            lines.append(f"  {x['source']:24} {x['method']:{w}} p50 {x['p50_us']:7.0f} us  "
                         f"p99 {x['p99_us']:7.0f} us")
        lines.append("")
    for c in dict.fromkeys(capped_rows):
        lines.append(f"* {c}: each wait is a Python host function, and a driver's queues are "
                     "bounded")
    if capped_rows:
        lines.append("")
    if r.stall:
        lines.append("stream stall while a Python thread spins (what the wait enqueues, timing "
                     "events on both sides)")
        for s in r.stall:
            lines.append(f"  {s['source']} {s['loop']:8} {s['method']:{w}} p50 "
                         f"{s['p50_us']:8.1f} us  p99 {s['p99_us']:8.1f} us")
        lines.append("")
    if r.burst:
        lines.append("1 ms heartbeat lateness while the completions of a burst arrive")
    for b in r.burst:
        lines.append(f"  {b['source']} {b['loop']:8} {b['method']:{w}} {b['completions']} in "
                     f"{b['burst_s'] * 1e3:6.0f} ms: p50 {b['p50_ms']:5.2f} p99 {b['p99_ms']:5.2f} "
                     f"max {b['max_ms']:5.2f} ms ({b['beats']:.0f} beats)"
                     + (" (capped)" if b.get("capped") else ""))
    lines.append("")
    for mem in r.memory:
        lines.append(f"memory per pending operation, {mem['source']}: future "
                     f"{mem['future_bytes']:.0f} B, with aiocuda {mem['with_aiocuda_bytes']:.0f} B "
                     f"(+{mem['aiocuda_bytes_per_op']:.0f} B native)")
    for k in r.kernels:
        lines.append(f"tiny kernels, {k['source']} {k['loop']} {k.get('method', AIOCUDA)}: "
                     f"{k['kernels']} awaited one coroutine each {k['awaited_per_s']:.0f}/s, back "
                     f"to back {k['back_to_back_per_s']:.0f}/s: {k['ratio']:.2f}x")
    for k in r.paced:
        lines.append(f"awaiting {k['kernel_us']:g} us kernels one after another, {k['source']} "
                     f"{k['loop']} {k['method']}: host CPU {k['percent']:.1f}% of a core, "
                     f"{k['per_kernel_us']:.0f} us per kernel ({k['kernels']} kernels)")
    for k in r.awaited_kernels:
        lines.append(f"awaiting every kernel, {k['source']} {k['loop']} {k['method']}: "
                     f"{k['kernels']} x {k['kernel_us']:g} us, stream time back to back "
                     f"{k['back_to_back_stream_s'] * 1e3:.1f} ms, each awaited "
                     f"{k['awaited_stream_s'] * 1e3:.1f} ms: {k['ratio']:.2f}x (wall "
                     f"{k['back_to_back_wall_s'] * 1e3:.1f} / {k['awaited_wall_s'] * 1e3:.1f} ms: "
                     f"{k['wall_ratio']:.2f}x)")
    lines += ["", "targets (value: a ratio against an alternative measured in this run, unless "
              "a unit is named; info: no target)"]
    for t in r.targets:
        state = "info" if t["met"] is None else "met " if t["met"] else "MISS"
        target = "" if t["target"] == "-" else f" (target {t['target']})"
        lines.append(f"  {state} {t['what']}: {t['value']:g}{target}")
    lines += [f"timed out: {s}" for s in r.timed_out]
    lines += [f"failed: {s}" for s in r.failed]
    lines += [f"skipped: {s}" for s in r.skipped]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write(r: Report, out: Path, plot: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "report.json", json.dumps(asdict(r), indent=1) + "\n")
    _write_atomic(out / "report.txt", table(r))
    return [out / "report.json", out / "report.txt", *(plots(asdict(r), out) if plot else [])]


def plots(r: dict[str, Any], out: Path) -> list[Path]:
    """Throughput against operations in flight, and wake-up latency distributions (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'aiocuda[bench]'; or make "
              "them elsewhere: python -m aiocuda.bench --redraw report.json)", file=sys.stderr)
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    sources = list(dict.fromkeys(t["source"] for t in r["throughput"]))
    loops = list(dict.fromkeys(t["loop"] for t in r["throughput"]))
    if not sources:
        return []
    from matplotlib.ticker import NullFormatter

    for name, draw in (("throughput", _draw_throughput), ("latency", _draw_latency)):
        fig, axes = plt.subplots(len(sources), len(loops), squeeze=False,
                                 figsize=(6 * len(loops), 3.8 * len(sources)))
        for row, src in enumerate(sources):
            for col, loop in enumerate(loops):
                ax = axes[row][col]
                draw(ax, r, src, loop)
                ax.set_title(f"{src}, {loop}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels overlap
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
        fig.suptitle(f"{r['machine']}" + (f"\ncuda rows: {r['cuda']}" if r.get("cuda") else ""),
                     fontsize=8)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _color(method: str) -> str:
    """One color per method in every panel: matplotlib's default cycle, C0..C9, then more for
    the peers (which are also drawn dashed)."""
    if method not in METHODS:
        return "black"
    i = METHODS.index(method)
    return f"C{i}" if i < 10 else ("black", "darkgoldenrod", "magenta", "teal")[(i - 10) % 4]


def _style(method: str) -> dict[str, Any]:
    return {"color": _color(method), "linewidth": 2.5 if method in OURS else 1.2,
            "linestyle": "--" if method in PEERS else "-"}


def _draw_throughput(ax: Any, r: dict[str, Any], src: str, loop: str) -> None:
    for m in METHODS:
        pts = sorted((t["in_flight"], t["ops_per_s"]) for t in r["throughput"]
                     if t["method"] == m and t["source"] == src and t["loop"] == loop)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m, **_style(m))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("operations in flight")
    ax.set_ylabel("completions per second")


def _draw_latency(ax: Any, r: dict[str, Any], src: str, loop: str) -> None:
    for lat in r["latency"]:
        if lat["source"] == src and lat["loop"] == loop:
            us = lat["samples_us"]
            ax.plot(us, [(i + 1) / len(us) for i in range(len(us))], label=lat["method"],
                    **_style(lat["method"]))
    ax.set_xscale("log")
    ax.set_xlabel("wake-up latency, us (work done -> coroutine runs)")
    ax.set_ylabel("fraction of operations")
