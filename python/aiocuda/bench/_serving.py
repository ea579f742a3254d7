"""``python -m aiocuda.bench serving``: FastAPI on uvicorn, loaded over loopback HTTP.

Three processes: the servers (``_serve_apps``, one per variant, each started once), the load
client (this module's ``client`` command: aiohttp, its own process, so it does not share the
servers' CPU accounting or loop), and this one, which drives the client point by point, probes
``/health`` of the server under load at a low rate meanwhile, and reads the server's CPU time
(its time.process_time(), every thread's, which a thread of the server answers on a pipe) at
the measured window's edges.

Requests: ``GET /work`` at each concurrency (closed loop: each client connection sends its next
request when the previous answers) for each variant: aiocuda's await, starlette's
``run_in_threadpool`` with a blocking synchronize, and a blocking synchronize inside
``async def``. Tokens: ``GET /generate`` streams (server-sent events) at each number of
concurrent streams, each stream starting a new sequence when one ends, for the continuous-batching
generator run by its aiocuda engine and by its threaded engine. Every point is repeated; the
report gives medians over the repeats, and the ratios aiocuda / thread pool (threaded engine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ._serve_apps import VARIANTS, WORK_MS, WORK_STREAMS, die_with_parent

ENGINES = ("aiocuda", "aiocuda-d1", "thread")  # aiocuda: 2 steps in flight; -d1: one
CLIENT_CMD = "client"


@dataclass(frozen=True)
class Config:
    concurrency: tuple[int, ...] = (1, 4, 16, 64, 256)
    streams: tuple[int, ...] = (1, 4, 16, 64, 256)
    seconds: float = 2.0  # measured window per point
    warmup_s: float = 0.5
    repeats: int = 3
    max_tokens: int = 32
    work_ms: float = WORK_MS
    work_streams: int = WORK_STREAMS
    step_ms: float = 5.0  # simulated device time per decode step, on the cpu backend
    probe_interval_s: float = 0.02
    point_timeout_s: float = 60.0


QUICK = Config(concurrency=(1, 16, 256), streams=(1, 16, 64), seconds=1.0, warmup_s=0.3,
               repeats=1, max_tokens=16)


def percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---- the load client (its own process) ---------------------------------------------------------

async def load_requests(url: str, concurrency: int, seconds: float, warmup_s: float,
                        go: Any) -> dict[str, Any]:
    from aiohttp import ClientSession, ClientTimeout, TCPConnector

    lat: list[float] = []
    errors = 0
    measuring = False
    stop_at = float("inf")

    async def one(session: ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            counted = measuring
            try:
                async with session.get(url) as r:
                    await r.read()
                    ok = r.status == 200
            except Exception:
                ok = False
            if counted and measuring:
                lat.append(time.perf_counter() - t0)
                errors += not ok

    conn = TCPConnector(limit=concurrency, force_close=False)
    async with ClientSession(connector=conn, timeout=ClientTimeout(total=120)) as session:
        tasks = [asyncio.ensure_future(one(session)) for _ in range(concurrency)]
        await asyncio.sleep(warmup_s)
        measuring = True
        go()
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        measuring = False
    return {"requests": len(lat), "errors": errors, "wall_s": wall,
            "rps": len(lat) / wall, "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3}


async def load_tokens(url: str, streams: int, seconds: float, warmup_s: float, max_tokens: int,
                      go: Any) -> dict[str, Any]:
    """Each stream asks for one sequence after another. What counts is what arrives in the
    window [t0, t0 + seconds): its tokens (over `seconds`), the first-token times of sequences
    asked for in it, the gaps ending in it. The streams start spread over the warm-up: started
    together, sequences of one length run in lockstep waves, and how many waves end inside the
    window (not the engine) would decide the token rate."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector

    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    sequences = 0
    errors = 0
    t0 = stop_at = float("inf")

    def inside(t: float) -> bool:
        return t0 <= t < stop_at

    async def stream(session: ClientSession, i: int) -> None:
        nonlocal tokens, sequences, errors
        await asyncio.sleep(warmup_s * 0.8 * i / streams)
        j = 0
        while time.perf_counter() < stop_at:
            j += 1
            asked = last = time.perf_counter()
            n = 0
            ok = False
            try:
                async with session.get(url, params={"seed": i * 100_003 + j,
                                                    "max_tokens": max_tokens}) as r:
                    async for line in r.content:
                        if line.startswith(b"event: error"):
                            break
                        if not line.startswith(b"data: "):
                            continue
                        now = time.perf_counter()
                        if line.startswith(b"data: [DONE]"):
                            ok = n == max_tokens
                            break
                        if inside(now):
                            tokens += 1
                            if n == 0:
                                if inside(asked):
                                    ttft.append(now - asked)
                            else:
                                itl.append(now - last)
                        last = now
                        n += 1
            except Exception:
                ok = False
            if inside(asked):
                sequences += 1
                errors += not ok

    conn = TCPConnector(limit=streams)
    async with ClientSession(connector=conn, timeout=ClientTimeout(total=300)) as session:
        tasks = [asyncio.ensure_future(stream(session, i)) for i in range(streams)]
        await asyncio.sleep(warmup_s)
        go()
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return {"sequences": sequences, "errors": errors, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / seconds,
            "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_p99_ms": percentile(ttft, 99) * 1e3,
            "itl_p50_ms": percentile(itl, 50) * 1e3, "itl_p99_ms": percentile(itl, 99) * 1e3}


def client_main() -> None:
    """Commands as JSON lines on stdin; for each, ``GO`` when its window opens, ``STOP`` when it
    closes, then the result as a JSON line."""
    die_with_parent()
    run: Callable[..., Any] = asyncio.run
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        pass

    def go() -> None:
        print("GO", flush=True)
        asyncio.get_running_loop().call_later(cmd["seconds"], lambda: print("STOP", flush=True))

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "requests":
            res = run(load_requests(cmd["url"], cmd["n"], cmd["seconds"], cmd["warmup_s"], go))
        else:
            res = run(load_tokens(cmd["url"], cmd["n"], cmd["seconds"], cmd["warmup_s"],
                                  cmd["max_tokens"], go))
        print(json.dumps(res), flush=True)


# ---- the driver ---------------------------------------------------------------------------------

async def server_cpu_s(server: Proc) -> float:
    """The server process's CPU time, all its threads (those that ended too), as it reads it
    (time.process_time(), to the nanosecond, answered on its stdin and stdout by a thread of
    its own; /proc/PID/stat counts 10 ms ticks, a tenth of what a point at concurrency 1 may
    use)."""
    assert server.proc.stdin is not None
    server.proc.stdin.write(b"cpu\n")
    await server.proc.stdin.drain()
    return float(json.loads(await server.line(10))["cpu_s"])


class Proc:
    """A child process speaking JSON lines on its stdout; killed on close."""

    def __init__(self, proc: asyncio.subprocess.Process, what: str) -> None:
        self.proc, self.what = proc, what

    @classmethod
    async def start(cls, args: list[str], what: str) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=None)
        return cls(proc, what)

    async def line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the benchmark's {self.what} did not answer in {timeout:g} s")
        if not raw:
            raise RuntimeError(f"the benchmark's {self.what} exited "
                               f"(status {await self.proc.wait()}); its error output is above")
        return raw.decode()

    async def close(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.terminate()
                await asyncio.wait_for(self.proc.wait(), 5)
            except (ProcessLookupError, asyncio.TimeoutError):
                try:
                    self.proc.kill()
                except ProcessLookupError:
                    pass
                await self.proc.wait()


async def start_server(args: list[str], what: str, timeout: float) -> tuple[Proc, dict[str, Any]]:
    p = await Proc.start(["-m", "aiocuda.bench._serve_apps", *args], what)
    info = json.loads(await p.line(timeout))
    return p, info


async def probe(url: str, interval: float, out: list[float], stop: asyncio.Event) -> None:
    """GET `url` every `interval` seconds on a connection of its own; latencies into `out`."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector

    async with ClientSession(connector=TCPConnector(limit=1),
                             timeout=ClientTimeout(total=60)) as session:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                async with session.get(url) as r:
                    await r.read()
                out.append(time.perf_counter() - t0)
            except Exception:
                pass
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, interval - (time.perf_counter() - t0)))
            except asyncio.TimeoutError:
                pass


async def measure(client: Proc, server: Proc, info: dict[str, Any], cmd: dict[str, Any],
                  cfg: Config) -> dict[str, Any]:
    base = f"http://127.0.0.1:{info['port']}"
    assert client.proc.stdin is not None
    client.proc.stdin.write((json.dumps({**cmd, "url": base + cmd["path"],
                                         "seconds": cfg.seconds,
                                         "warmup_s": cfg.warmup_s}) + "\n").encode())
    await client.proc.stdin.drain()
    timeout = cfg.warmup_s + cfg.seconds + cfg.point_timeout_s
    if (await client.line(timeout)).strip() != "GO":
        raise RuntimeError("the benchmark's load client answered out of turn")
    cpu0 = await server_cpu_s(server)
    health: list[float] = []
    stop = asyncio.Event()
    prober = asyncio.ensure_future(probe(base + "/health", cfg.probe_interval_s, health, stop))
    try:  # the server's CPU over the window, which the tokens are counted in
        if (await client.line(timeout)).strip() != "STOP":
            raise RuntimeError("the benchmark's load client answered out of turn")
        cpu = await server_cpu_s(server) - cpu0
    finally:
        stop.set()
        await prober
    res: dict[str, Any] = json.loads(await client.line(timeout))
    res["server_cpu_s"] = cpu
    res["health_n"] = len(health)
    res["health_p99_ms"] = percentile(health, 99) * 1e3
    count = res.get("requests", res.get("tokens", 0))
    res["cpu_per_" + ("request_us" if "requests" in res else "token_us")] = (
        cpu / count * 1e6 if count else float("nan"))
    return res


def _median_rows(samples: dict[tuple[str, str, int], list[dict[str, Any]]]
                 ) -> list[dict[str, Any]]:
    rows = []
    for (kind, name, n), rs in samples.items():
        row: dict[str, Any] = {"kind": kind, "name": name, "n": n, "repeats": len(rs)}
        for k in rs[0]:
            vals = [r[k] for r in rs if isinstance(r.get(k), (int, float))]
            if vals:
                row[k] = statistics.median(vals)
        rows.append(row)
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def find(kind: str, name: str, n: int) -> dict[str, Any] | None:
        return next((r for r in rows if (r["kind"], r["name"], r["n"]) == (kind, name, n)), None)

    out = []
    ns = sorted({r["n"] for r in rows if r["kind"] == "requests"})
    checks = (("requests/s", "rps", ">=", 1.0), ("latency p99", "p99_ms", "<=", 1.0),
              ("server CPU per request", "cpu_per_request_us", "<=", 0.7),
              ("/health p99 under load", "health_p99_ms", "<=", 1.0))
    for n in ns:
        a, b = find("requests", "aiocuda", n), find("requests", "threadpool", n)
        if a is None or b is None:
            continue
        for what, key, op, bound in checks:
            ratio = a[key] / b[key] if b.get(key) else float("nan")
            met = ratio >= bound if op == ">=" else ratio <= bound
            out.append({"what": f"{what}, aiocuda / thread pool, concurrency {n}",
                        "ratio": ratio, "target": f"{op} {bound:g}x", "met": bool(met)})
    for n in sorted({r["n"] for r in rows if r["kind"] == "tokens"}):
        if n < 64:
            continue
        a, b = find("tokens", "aiocuda", n), find("tokens", "thread", n)
        if a is None or b is None:
            continue
        for what, key, op, bound in (("inter-token p99", "itl_p99_ms", "<=", 0.8),
                                     ("tokens/s", "tokens_per_s", ">=", 1.0)):
            ratio = a[key] / b[key] if b.get(key) else float("nan")
            met = ratio >= bound if op == ">=" else ratio <= bound
            out.append({"what": f"{what}, aiocuda engine / threaded, {n} streams",
                        "ratio": ratio, "target": f"{op} {bound:g}x", "met": bool(met)})
    if not any("streams" in str(t["what"]) for t in out):
        out.append({"what": "token generator at >= 64 streams", "ratio": float("nan"),
                    "target": "measured", "met": None})
    return out


def table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [f"aiocuda {report['version']} serving benchmark, {report['machine']}",
             f"requests: {report['work']}",
             f"tokens: {report['token_model']}",
             f"server: FastAPI on uvicorn ({report['server_loop']}, {report['server_http']}); "
             f"client: aiohttp in its own process; medians of {report['config']['repeats']} "
             f"repeat(s) of {report['config']['seconds']:g} s; /health probed every "
             f"{report['config']['probe_interval_s'] * 1e3:g} ms", ""]
    req = [r for r in rows if r["kind"] == "requests"]
    if req:
        lines.append(f"{'GET /work':12} {'conc':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
                     f"{'CPU/req us':>10} {'health p99':>10} {'errors':>6}")
        for n in sorted({r["n"] for r in req}):
            for name in VARIANTS:
                r = next((x for x in req if x["name"] == name and x["n"] == n), None)
                if r:
                    lines.append(f"{name:12} {n:5} {r['rps']:8.0f} {r['p50_ms']:8.2f} "
                                 f"{r['p99_ms']:8.2f} {r['cpu_per_request_us']:10.0f} "
                                 f"{r['health_p99_ms']:10.2f} {r['errors']:6.0f}")
        lines.append("")
    tok = [r for r in rows if r["kind"] == "tokens"]
    if tok:
        lines.append(f"{'tokens':12} {'strm':>5} {'tok/s':>8} {'TTFT p50':>8} {'TTFT p99':>8} "
                     f"{'ITL p50':>8} {'ITL p99':>8} {'CPU/tok us':>10} {'errors':>6}")
        for n in sorted({r["n"] for r in tok}):
            for name in ENGINES:
                r = next((x for x in tok if x["name"] == name and x["n"] == n), None)
                if r:
                    lines.append(f"{name:12} {n:5} {r['tokens_per_s']:8.0f} "
                                 f"{r['ttft_p50_ms']:8.2f} {r['ttft_p99_ms']:8.2f} "
                                 f"{r['itl_p50_ms']:8.2f} {r['itl_p99_ms']:8.2f} "
                                 f"{r['cpu_per_token_us']:10.1f} {r['errors']:6.0f}")
        lines.append("")
    lines.append("targets (aiocuda against the thread pool / the threaded engine, same run):")
    for t in report["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"  {state:12} {t['ratio']:6.2f}x  {t['target']:7} {t['what']}")
    if report.get("failed"):
        lines.append("failed: " + "; ".join(report["failed"]))
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    rows = report["rows"]
    panels = [("requests", "rps", "requests/s"), ("requests", "p99_ms", "latency p99 (ms)"),
              ("requests", "cpu_per_request_us", "server CPU per request (us)"),
              ("requests", "health_p99_ms", "/health p99 under load (ms)"),
              ("tokens", "tokens_per_s", "tokens/s"),
              ("tokens", "itl_p99_ms", "inter-token latency p99 (ms)")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (kind, key, label) in zip(axes.flat, panels):
        names = VARIANTS if kind == "requests" else ENGINES
        for name in names:
            pts = sorted((r["n"], r[key]) for r in rows
                         if r["kind"] == kind and r["name"] == name and key in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=name + (" engine" if kind == "tokens" else ""))
        ax.set_xscale("log", base=2)
        ns = sorted({r["n"] for r in rows if r["kind"] == kind})
        if ns:
            ax.set_xticks(ns, [str(n) for n in ns])
        if key in ("p99_ms", "health_p99_ms"):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_ylim(bottom=0 if ax.get_yscale() == "linear" else None)
        ax.set_xlabel("concurrent requests" if kind == "requests" else "concurrent streams")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"FastAPI/uvicorn serving, {report['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(report: dict[str, Any], out: Path, draw: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (("serving.json", json.dumps(report, indent=1) + "\n"),
                       ("serving.txt", table(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
        paths.append(out / name)
    if draw:
        p = plot(report, out / "serving.png")
        if p:
            paths.append(p)
    return paths


def machine_name() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       "")
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs {platform.machine()} {cpu}, Python "
            f"{platform.python_version()}").strip()


async def run(cfg: Config, out: Path | None, parts: tuple[str, ...] = ("requests", "tokens"),
              quick: bool = False) -> dict[str, Any]:
    report: dict[str, Any] = {
        "version": __version__, "machine": machine_name(), "quick": quick,
        "config": asdict(cfg), "work": "", "token_model": "", "server_loop": "",
        "server_http": "", "rows": [], "samples": [], "targets": [], "failed": [],
    }
    samples: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    procs: list[Proc] = []
    t_start = time.perf_counter()

    def save() -> None:
        report["rows"] = _median_rows(samples)
        report["targets"] = targets(report["rows"])
        report["elapsed_s"] = time.perf_counter() - t_start
        if out is not None:
            write(report, out, draw=False)

    try:
        client = await Proc.start(["-m", "aiocuda.bench._serving", CLIENT_CMD], "load client")
        procs.append(client)
        servers: dict[tuple[str, str], tuple[Proc, dict[str, Any]]] = {}
        common = ["--work-ms", str(cfg.work_ms), "--streams", str(cfg.work_streams)]
        if "requests" in parts:
            for v in VARIANTS:
                p, info = await start_server(["requests", "--variant", v, *common],
                                             f"{v} server", 120)
                procs.append(p)
                servers["requests", v] = (p, info)
                report["work"] = info["what"]
                report["server_loop"], report["server_http"] = info["loop"], info["http"]
        if "tokens" in parts:
            for e in ENGINES:
                p, info = await start_server(["tokens", "--engine", e, "--step-ms",
                                              str(cfg.step_ms)], f"{e} token server", 120)
                procs.append(p)
                servers["tokens", e] = (p, info)
                report["token_model"] = info["what"]
                report["server_loop"], report["server_http"] = info["loop"], info["http"]
        plan: list[tuple[str, str, int]] = []
        for rep in range(cfg.repeats):
            if "requests" in parts:
                for n in cfg.concurrency:
                    order = VARIANTS[rep % 3:] + VARIANTS[:rep % 3]  # no variant always first
                    plan += [("requests", v, n) for v in order]
            if "tokens" in parts:
                for n in cfg.streams:
                    order = ENGINES[rep % 3:] + ENGINES[:rep % 3]
                    plan += [("tokens", e, n) for e in order]
        for i, (kind, name, n) in enumerate(plan):
            proc, info = servers[kind, name]
            cmd = {"op": kind, "n": n, "max_tokens": cfg.max_tokens,
                   "path": "/work" if kind == "requests" else "/generate"}
            sys.stderr.write(f"[{i + 1}/{len(plan)}] {kind} {name} n={n} "
                             f"({time.perf_counter() - t_start:.0f} s)\n")
            res = await measure(client, proc, info, cmd, cfg)
            samples.setdefault((kind, name, n), []).append(res)
            report["samples"].append({"kind": kind, "name": name, "n": n, **res})
            save()
    except Exception as exc:
        report["failed"].append(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        for p in reversed(procs):
            await p.close()
        save()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CLIENT_CMD]:
        client_main()
        return 0
    ap = argparse.ArgumentParser(
        prog="python -m aiocuda.bench serving",
        description="FastAPI on uvicorn under HTTP load from a separate process: aiocuda's "
        "await against run_in_threadpool and a blocking call (GET /work), and a "
        "continuous-batching token generator's aiocuda engine against a threaded one (SSE). "
        "Writes serving.txt, serving.json and serving.png into --out.")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter points (about 1 minute)")
    ap.add_argument("--out", type=Path, default=Path("bench-report"),
                    help="output folder (default: bench-report)")
    ap.add_argument("--only", choices=("requests", "tokens"), help="measure one half only")
    ap.add_argument("--concurrency", help="comma-separated concurrencies for GET /work")
    ap.add_argument("--streams", help="comma-separated numbers of concurrent token streams")
    ap.add_argument("--seconds", type=float, help="measured window per point")
    ap.add_argument("--warmup", type=float, help="unmeasured load before each window (seconds)")
    ap.add_argument("--repeats", type=int, help="repeats per point (medians are reported)")
    ap.add_argument("--max-tokens", type=int, help="tokens per generated sequence")
    ap.add_argument("--work-ms", type=float, help="the cpu backend's work per request (ms)")
    ap.add_argument("--step-ms", type=float, help="simulated device time per decode step on the "
                    "cpu backend (ms; default 5, 0 for the tiny model's compute alone)")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    over: dict[str, Any] = {}
    for name, key in (("concurrency", "concurrency"), ("streams", "streams")):
        text = getattr(args, name)
        if text:
            try:
                vals = tuple(int(x) for x in text.split(","))
            except ValueError:
                ap.error(f"--{name}: comma-separated whole numbers, got {text!r}")
            if not vals or min(vals) < 1:
                ap.error(f"--{name}: each must be at least 1")
            over[key] = vals
    for name, key in (("seconds", "seconds"), ("warmup", "warmup_s"), ("repeats", "repeats"),
                      ("max_tokens", "max_tokens"), ("work_ms", "work_ms"),
                      ("step_ms", "step_ms")):
        v = getattr(args, name)
        if v is not None:
            if v < (0 if name in ("warmup", "step_ms") else 1e-9):
                ap.error(f"--{name.replace('_', '-')} must be positive")
            over[key] = v
    cfg = Config(**{**asdict(cfg), **over})
    parts = (args.only,) if args.only else ("requests", "tokens")
    try:
        report = asyncio.run(run(cfg, args.out, parts, quick=args.quick))
    except Exception as exc:
        print(f"serving benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(table(report), end="")
    for p in write(report, args.out):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
