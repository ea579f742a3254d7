"""The long stress run (scripts/stress): the short suite's harnesses with bigger sizes, and
their figures printed. Exits 1 if any check failed.

    python -m tests.stress.long [--ops N] [--only chaos,debug,churn,fork,fuzz]

Sizes (flags, or the environment): AIOCUDA_STRESS_OPS operations per chaos run (default
1,000,000; one run per backend and loop), AIOCUDA_STRESS_LOOPS loops per churning thread
(2,500: 10,000 a run), AIOCUDA_STRESS_FORKS forks while threads churn (100),
AIOCUDA_STRESS_EXAMPLES hypothesis examples per entry point (2,000), AIOCUDA_STRESS_SEED.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

if "AIOCUDA_LIBCUDA" not in os.environ and os.environ.get("AIOCUDA_TEST_REAL_DRIVER") != "1":
    from tests.emu.build import build_emulator

    os.environ["AIOCUDA_LIBCUDA"] = str(build_emulator())

from .common import env_int, run_helper  # noqa: E402

MiB = 1 << 20
PARTS = ("chaos", "debug", "churn", "fork", "fuzz")


def out(text: str = "") -> None:
    print(text, flush=True)


def chaos_rows(ops: int, seed: int, debug: bool) -> list[str]:
    from tests.conftest import EMU_PATH, Emu  # noqa: PLC0415 (builds and loads the emulator)

    from .chaos import run_chaos

    emu = Emu(EMU_PATH) if EMU_PATH is not None else None
    failures = []
    head = ("backend  loop     ops        ops/s    futures  cancelled timeouts exceptions "
            "sticky refused inversions early wrong hung loop_err records rss_growth fds thr")
    out(head)
    for backend in ("cpu", "cuda"):
        for kind in ("asyncio", "uvloop"):
            fig = run_chaos(ops, seed, backend, kind, emu, debug=debug)
            rate = fig.ops / fig.seconds if fig.seconds else 0.0
            out(f"{backend:8} {kind:8} {fig.ops:<10,} {rate:<8,.0f} {fig.futures:<8,} "
                f"{fig.cancellations:<9,} {fig.timeouts:<8,} {fig.exceptions:<10,} "
                f"{fig.sticky_errors:<6} {fig.refused:<7} {fig.inversions:<10} {fig.early:<5} "
                f"{fig.wrong:<5} {fig.hung:<4} {fig.loop_errors:<8} {fig.live_records_end:<7} "
                f"{fig.rss_growth / MiB:>6.1f}MiB {fig.fds_delta:+3} {fig.threads_delta:+3}")
            for p in fig.problems():
                failures.append(f"chaos {backend} {kind}{' debug' if debug else ''}: {p}")
    return failures


def churn_rows(loops: int) -> list[str]:
    from .churn import problems

    failures = []
    out("kinds           loops    closed-with-pending  seconds  hung  live_loops  states  "
        "records  fds  threads  rss_growth")
    for kinds in ("asyncio", "uvloop", "asyncio,uvloop"):
        r, how = run_helper("churn", ["--threads", "4", "--loops", str(loops), "--kinds", kinds,
                                      "--cuda", "--timeout", str(60 + loops / 20)],
                            timeout=120 + loops / 10)
        if r is None:
            out(f"{kinds:15} did not finish: {how}")
            failures.append(f"churn {kinds}: {how[:2000]}")
            continue
        out(f"{kinds:15} {r['loops']:<8,} {r['closed_with_work_pending']:<20,} "
            f"{r['seconds']:<8} {r['hung_threads']:<5} {r['live_loops']:<11} "
            f"{r['loop_states']:<7} {r['live_records']:<8} {r['fds_delta']:+4} "
            f"{r['threads_delta']:+8} {r['rss_growth'] / MiB:>8.1f}MiB")
        failures += [f"churn {kinds}: {p}" for p in problems(r)]
    return failures


def fork_rows(forks: int) -> list[str]:
    from .forks import problems

    failures = []
    out("scenario  exit  loop     children  hung  child_failed  bad_status  parent_failed  "
        "lock_held_at_fork  loops_meanwhile")
    for scenario in ("loop", "thread", "churn"):
        n = forks if scenario == "churn" else max(3, forks // 10)
        for exit_mode in ("sys", "os"):
            for kind in ("asyncio", "uvloop"):
                r, how = run_helper("forks", ["--scenario", scenario, "--exit", exit_mode,
                                              "--loop", kind, "--forks", str(n)],
                                    timeout=60 + 2 * n)
                if r is None:
                    out(f"{scenario:9} {exit_mode:5} {kind:8} did not finish")
                    failures.append(f"fork {scenario} {exit_mode} {kind}: {how[:2000]}")
                    continue
                out(f"{scenario:9} {exit_mode:5} {kind:8} {r['children']:<9} "
                    f"{r['hung_children']:<5} {r['child_failures']:<13} "
                    f"{r['bad_exit_status']:<11} {r['parent_failures']:<14} "
                    f"{r['forks_with_states_lock_held']:<18} {r['loops_made_meanwhile']}")
                failures += [f"fork {scenario} {exit_mode} {kind}: {p}" for p in problems(r)]
    return failures


def fuzz_rows(examples: int) -> list[str]:
    failures = []
    out(f"hypothesis, {examples:,} examples per entry point")
    for group in ("streams", "cpu_stream", "gpu_op", "module"):
        for kind in ("asyncio", "uvloop"):
            r, how = run_helper("fuzz", ["--group", group, "--loop", kind,
                                         "--examples", str(examples)],
                                timeout=300 + examples / 5)
            if r is None:
                out(f"{group:11} {kind:8} crashed or hung")
                failures.append(f"fuzz {group} {kind}: {how[:2000]}")
                continue
            res: dict[str, Any] = r["results"]
            out(f"{group:11} {kind:8} " + "  ".join(
                f"{k}: {'ok' if v == 'ok' else 'FAILED'}" for k, v in res.items()))
            for k, v in res.items():
                if v != "ok":
                    tail = "\n".join(v.strip().splitlines()[-8:])
                    failures.append(f"fuzz {group} {kind} {k}:\n{tail}")
    return failures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, default=env_int("AIOCUDA_STRESS_OPS", 1_000_000))
    p.add_argument("--loops", type=int, default=env_int("AIOCUDA_STRESS_LOOPS", 2_500))
    p.add_argument("--forks", type=int, default=env_int("AIOCUDA_STRESS_FORKS", 100))
    p.add_argument("--examples", type=int, default=env_int("AIOCUDA_STRESS_EXAMPLES", 2_000))
    p.add_argument("--seed", type=int, default=env_int("AIOCUDA_STRESS_SEED", 20_240_611))
    p.add_argument("--only", default=",".join(PARTS), help=f"parts to run, of {','.join(PARTS)}")
    a = p.parse_args()
    parts = [x for x in a.only.split(",") if x]
    t0 = time.monotonic()
    failures: list[str] = []
    out(f"aiocuda stress run: python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
        f"seed {a.seed}")
    if "chaos" in parts:
        out(f"\n== chaos: {a.ops:,} operations a run")
        failures += chaos_rows(a.ops, a.seed, debug=False)
    if "debug" in parts:
        ops = max(1_000, a.ops // 20)
        out(f"\n== chaos in asyncio debug mode: {ops:,} operations a run")
        failures += chaos_rows(ops, a.seed + 1, debug=True)
    if "churn" in parts:
        out(f"\n== loop churn: 4 threads x {a.loops:,} loops, work pending at close")
        failures += churn_rows(a.loops)
    if "fork" in parts:
        out(f"\n== fork: {a.forks} forks while threads create loops")
        failures += fork_rows(a.forks)
    if "fuzz" in parts:
        out("\n== fuzzing the public API")
        failures += fuzz_rows(a.examples)
    out(f"\n{time.monotonic() - t0:.0f} s; " + ("all checks passed" if not failures else
                                               f"{len(failures)} checks FAILED:"))
    for f in failures:
        out(" - " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
