"""Run the comparisons, then write the report: a table, a JSON file and PNG plots."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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
    POLL0,
    POLL1,
    TO_THREAD,
    burst_lag,
    idle_cpu,
    kernel_throughput,
    percentile,
    stream_stall,
    throughput,
    wake_latency,
)
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
    kernels: int = 10_000


QUICK = Config(
    in_flight=(1, 100, 10_000), ops=150, repeats=3, budget_s=1.0, latency_samples=30,
    stall_samples=6, idle_window_s=0.2, memory_ops=50_000, memory_repeats=1,
    kernels=2_000,
)

LOOPS = ("asyncio", "uvloop")
SLOW_METHODS = (EXECUTOR, TO_THREAD, POLL0, POLL1)  # not run with more than 10,000 in flight
IDLE_METHODS = (AIOCUDA, EXECUTOR, POLL0, POLL1, CALLBACK)  # to_thread waits as the executor does


@dataclass
class Report:
    machine: str
    quick: bool
    config: dict[str, Any]
    throughput: list[dict[str, Any]] = field(default_factory=list)
    latency: list[dict[str, Any]] = field(default_factory=list)
    stall: list[dict[str, Any]] = field(default_factory=list)
    burst: list[dict[str, Any]] = field(default_factory=list)
    idle_cpu: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    kernels: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


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
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ("asyncio",)
    return LOOPS


def sources(skipped: list[str]) -> list[Callable[[], Source]]:
    from .. import backends

    out: list[Callable[[], Source]] = [CpuSource]
    if "cuda" in backends():
        out.append(DriverSource)
    else:
        skipped.append("cuda: the cuda backend is not available here (no driver or no device; "
                       "set AIOCUDA_LIBCUDA to the driver emulator to measure the cuda path)")
    return out


def run(cfg: Config, quick: bool, loops: tuple[str, ...]) -> Report:
    report = Report(machine_name(), quick, asdict(cfg))
    makers = sources(report.skipped)
    if "uvloop" not in loops:
        report.skipped.append("uvloop: not installed (pip install 'aiocuda[bench]')")
    per_loop = (len(METHODS) * len(cfg.in_flight) * cfg.repeats + 2 * len(METHODS)
                + 3 + 2 + len(IDLE_METHODS) + 1)
    progress = Progress(len(makers) * len(loops) * per_loop + len(makers) * cfg.memory_repeats)
    for make in makers:
        src = make()
        try:
            for kind in loops:
                loop = new_loop(kind)
                try:
                    loop.run_until_complete(_suite(report, cfg, src, kind, progress))
                finally:
                    loop.close()
        finally:
            src.close()
        _memory(report, cfg, src.name, progress)
    progress.finish()
    report.targets = targets(report)
    return report


async def _suite(report: Report, cfg: Config, src: Source, kind: str, progress: Progress) -> None:
    row = {"source": src.name, "loop": kind}
    for method in METHODS:  # warm-up, and the latency sweep
        progress.step(f"{src.name} {kind}: warm-up {method}")
        await throughput(method, src, 100, 100)
    for method in METHODS:
        progress.step(f"{src.name} {kind}: wake-up latency {method}")
        if method == FLOOR:  # nothing crosses a thread: no wake-up to measure
            continue
        lat = await wake_latency(method, src, cfg.latency_samples)
        report.latency.append({**row, "method": method, **_summary_us(lat)})
    too_slow: set[str] = set()
    for n in cfg.in_flight:
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
        for _ in range(cfg.repeats):
            for method in METHODS:  # interleaved, so drift hits every method alike
                progress.step(f"{src.name} {kind}: throughput, {n} in flight, {method}")
                if method in too_slow or (method in SLOW_METHODS and n > 10_000):
                    continue
                t0 = time.perf_counter()
                runs[method].append(await throughput(method, src, n, max(cfg.ops, n)))
                if time.perf_counter() - t0 > cfg.budget_s:
                    too_slow.add(method)
        for method, r in runs.items():
            if r:
                report.throughput.append({
                    **row, "method": method, "in_flight": n,
                    "ops_per_s": statistics.median(x[0] for x in r),
                    "cpu_us_per_op": statistics.median(x[1] for x in r),
                    "repeats": len(r),
                })
    for method in (AIOCUDA, CALLBACK, FLOOR):
        progress.step(f"{src.name} {kind}: loop lag during a burst, {method}")
        lag = await burst_lag(method, src, cfg.burst)
        report.burst.append({**row, "method": method, "completions": cfg.burst, **lag})
    if isinstance(src, DriverSource):
        for method in (AIOCUDA, CALLBACK):
            progress.step(f"{src.name} {kind}: stream stall under GIL contention, {method}")
            stall = await stream_stall(method, src, cfg.stall_samples)
            report.stall.append({**row, "method": method, **_summary_us(stall)})
    else:
        progress.step(f"{src.name} {kind}: stream stall")
        progress.step(f"{src.name} {kind}: stream stall")
    for method in IDLE_METHODS:
        progress.step(f"{src.name} {kind}: CPU while {cfg.idle_ops} wait, {method}")
        pct = await idle_cpu(method, src, cfg.idle_ops, cfg.idle_window_s)
        report.idle_cpu.append({**row, "method": method, "percent": pct})
    progress.step(f"{src.name} {kind}: tiny kernels")
    if isinstance(src, DriverSource):
        k = await kernel_throughput(src, cfg.kernels)
        report.kernels.append({**row, "kernels": cfg.kernels, "emulated": src.emulated, **k})


def _summary_us(seconds: list[float]) -> dict[str, Any]:
    us = sorted(s * 1e6 for s in seconds)
    return {"p50_us": percentile(us, 50), "p99_us": percentile(us, 99), "samples_us": us}


# ---- memory: a fresh process per measurement ------------------------------------------------
MEMORY_CHILD = "--memory-child"


def _memory(report: Report, cfg: Config, source: str, progress: Progress) -> None:
    got: dict[str, list[float]] = {"futures": [], "aiocuda": []}
    for _ in range(cfg.memory_repeats):
        progress.step(f"{source}: memory per pending operation")
        for what in got:
            r = subprocess.run(
                [sys.executable, "-m", "aiocuda.bench", MEMORY_CHILD, source, what,
                 str(cfg.memory_ops)],
                capture_output=True, text=True, check=True,
            )
            got[what].append(int(r.stdout.strip()) / cfg.memory_ops)
    fut, ours = statistics.median(got["futures"]), statistics.median(got["aiocuda"])
    report.memory.append({"source": source, "future_bytes": fut, "with_aiocuda_bytes": ours,
                          "aiocuda_bytes_per_op": ours - fut, "pending": cfg.memory_ops})


def memory_child(source: str, what: str, n: int) -> None:
    """Print the RSS growth from `n` pending waits (futures alone, or aiocuda's)."""
    import gc

    from .._api import synchronize

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        src: Source = CpuSource() if source == "cpu" else DriverSource()
        src.hold(60)  # everything below stays pending
        synchronize(src.stream).cancel()  # the loop's queue exists before the baseline
        gc.collect()
        gc.disable()
        before = rss()
        if what == "futures":
            keep = [loop.create_future() for _ in range(n)]
        else:
            keep = [synchronize(src.stream) for _ in range(n)]
        print(rss() - before, flush=True)
        del keep
        os._exit(0)  # the stream is still busy: do not wait for it

    asyncio.run(main())


# ---- targets ---------------------------------------------------------------------------------
def _find(rows: list[dict[str, Any]], **key: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)


def targets(r: Report) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def check(what: str, value: float, target: str, met: bool) -> None:
        out.append({"what": what, "value": round(value, 4), "target": target, "met": met})

    for t in r.throughput:
        if t["method"] != AIOCUDA or t["in_flight"] != max(r.config["in_flight"]):
            continue
        key = {"source": t["source"], "loop": t["loop"], "in_flight": t["in_flight"]}
        floor, cb = _find(r.throughput, method=FLOOR, **key), _find(r.throughput, method=CALLBACK,
                                                                     **key)
        where = f"{t['source']}, {t['loop']}, {t['in_flight']} in flight"
        if floor:
            check(f"throughput vs in-loop floor ({where})", t["ops_per_s"] / floor["ops_per_s"],
                  ">= 0.9x", t["ops_per_s"] >= 0.9 * floor["ops_per_s"])
        if cb and t["loop"] == "asyncio":
            check(f"throughput vs call_soon_threadsafe ({where})",
                  t["ops_per_s"] / cb["ops_per_s"], ">= 3x", t["ops_per_s"] >= 3 * cb["ops_per_s"])
    for lat in r.latency:
        if lat["method"] != AIOCUDA:
            continue
        key = {"source": lat["source"], "loop": lat["loop"]}
        where = f"{lat['source']}, {lat['loop']}"
        for other, limit in ((EXECUTOR, 0.5), (POLL1, 0.05)):
            o = _find(r.latency, method=other, **key)
            if o:
                for p in ("p50_us", "p99_us"):
                    ratio = lat[p] / o[p]
                    check(f"wake-up {p[:3]} vs {other} ({where})", ratio, f"<= {limit}x",
                          ratio <= limit)
        if lat["source"].startswith("cuda (") and "emulator" not in lat["source"]:
            check(f"wake-up p50 on the GPU ({where}), us", lat["p50_us"], "<= 20", lat["p50_us"] <= 20)
            check(f"wake-up p99 on the GPU ({where}), us", lat["p99_us"], "<= 60", lat["p99_us"] <= 60)
    for s in r.stall:
        if s["method"] == AIOCUDA:
            check(f"stream stall p50 under GIL contention ({s['source']}, {s['loop']}), us",
                  s["p50_us"], "< 50", s["p50_us"] < 50)
    for b in r.burst:
        if b["method"] == AIOCUDA:
            floor = _find(r.burst, method=FLOOR, source=b["source"], loop=b["loop"])
            check(f"heartbeat p99 lateness, {b['completions']} completions in a burst "
                  f"({b['source']}, {b['loop']}; in-loop floor "
                  f"{floor['p99_ms'] if floor else float('nan'):.1f}), ms", b["p99_ms"], "<= 2",
                  b["p99_ms"] <= 2)
    for k in r.kernels:
        if not k["emulated"]:
            check(f"{k['kernels']} tiny kernels awaited vs back to back ({k['source']}, "
                  f"{k['loop']})", k["ratio"], ">= 0.8x", k["ratio"] >= 0.8)
    return out


# ---- output ----------------------------------------------------------------------------------
def table(r: Report) -> str:
    lines = [f"machine: {r.machine}", "mode: " + ("--quick" if r.quick else "full") +
             f", medians of {r.config['repeats']} (throughput), {r.config['latency_samples']} "
             "samples (wake-up)", ""]
    for src in dict.fromkeys(t["source"] for t in r.throughput):
        for loop in dict.fromkeys(t["loop"] for t in r.throughput if t["source"] == src):
            key = {"source": src, "loop": loop}
            lines.append(f"{src} on {loop}")
            lines.append(f"  {'method':22} {'ops/s':>10} {'in flight':>9} {'x floor':>8} "
                         f"{'CPU us/op':>9} {'wake p50':>9} {'wake p99':>9} {'idle CPU':>9}")
            for m in METHODS:
                rows = [t for t in r.throughput if t["method"] == m and t["source"] == src
                        and t["loop"] == loop]
                t = max(rows, key=lambda x: x["in_flight"], default=None)
                lat = _find(r.latency, method=m, **key)
                idle = _find(r.idle_cpu, method=m, **key)
                floor = t and _find(r.throughput, method=FLOOR, in_flight=t["in_flight"], **key)
                ratio = (f"{t['ops_per_s'] / floor['ops_per_s']:7.2f}x" if t and floor
                         else f"{'-':>8}")
                lines.append(
                    f"  {m:22} {t['ops_per_s'] if t else 0:10.0f} "
                    f"{t['in_flight'] if t else 0:9} {ratio} "
                    f"{t['cpu_us_per_op'] if t else 0:9.1f} "
                    + (f"{lat['p50_us']:7.0f}us {lat['p99_us']:7.0f}us " if lat else f"{'-':>9} {'-':>9} ")
                    + (f"{idle['percent']:8.1f}%" if idle else f"{'-':>9}")
                )
            lines.append("")
    if r.stall:
        lines.append("stream stall while a Python thread spins (host function entry to exit)")
        for s in r.stall:
            lines.append(f"  {s['source']} {s['loop']:8} {s['method']:22} p50 {s['p50_us']:8.1f} us"
                         f"  p99 {s['p99_us']:8.1f} us")
        lines.append("")
    lines.append("1 ms heartbeat lateness while the completions of a burst arrive")
    for b in r.burst:
        lines.append(f"  {b['source']} {b['loop']:8} {b['method']:22} {b['completions']} in "
                     f"{b['burst_s'] * 1e3:6.0f} ms: p50 {b['p50_ms']:5.2f} p99 {b['p99_ms']:5.2f} "
                     f"max {b['max_ms']:5.2f} ms ({b['beats']:.0f} beats)")
    lines.append("")
    for mem in r.memory:
        lines.append(f"memory per pending operation, {mem['source']}: future "
                     f"{mem['future_bytes']:.0f} B, with aiocuda {mem['with_aiocuda_bytes']:.0f} B "
                     f"(+{mem['aiocuda_bytes_per_op']:.0f} B native)")
    for k in r.kernels:
        lines.append(f"tiny kernels, {k['source']} {k['loop']}: {k['kernels']} awaited one "
                     f"coroutine each {k['awaited_per_s']:.0f}/s, back to back "
                     f"{k['back_to_back_per_s']:.0f}/s: {k['ratio']:.2f}x")
    lines += ["", "targets"]
    for t in r.targets:
        lines.append(f"  {'met ' if t['met'] else 'MISS'} {t['what']}: {t['value']:g} "
                     f"(target {t['target']})")
    lines += [f"skipped: {s}" for s in r.skipped]
    return "\n".join(lines) + "\n"


def write(r: Report, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(asdict(r), indent=1) + "\n")
    (out / "report.txt").write_text(table(r))
    return [out / "report.json", out / "report.txt", *plots(asdict(r), out)]


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
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{r['machine']}", fontsize=8)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _draw_throughput(ax: Any, r: dict[str, Any], src: str, loop: str) -> None:
    for m in METHODS:
        pts = sorted((t["in_flight"], t["ops_per_s"]) for t in r["throughput"]
                     if t["method"] == m and t["source"] == src and t["loop"] == loop)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m, linewidth=2.5 if m == AIOCUDA else 1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("operations in flight")
    ax.set_ylabel("completions per second")


def _draw_latency(ax: Any, r: dict[str, Any], src: str, loop: str) -> None:
    for lat in r["latency"]:
        if lat["source"] == src and lat["loop"] == loop:
            us = lat["samples_us"]
            ax.plot(us, [(i + 1) / len(us) for i in range(len(us))], label=lat["method"],
                    linewidth=2.5 if lat["method"] == AIOCUDA else 1.2)
    ax.set_xscale("log")
    ax.set_xlabel("wake-up latency, us (work done -> coroutine runs)")
    ax.set_ylabel("fraction of operations")
