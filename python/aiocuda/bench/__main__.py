"""python -m aiocuda.bench: run the comparisons and write the report."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import _core, backends
from . import __doc__ as steps_doc
from ._report import (
    MEMORY_CHILD,
    QUICK,
    Config,
    Report,
    available_loops,
    load,
    memory_child,
    mismatch,
    run,
    table,
)
from ._report import write as write_report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [MEMORY_CHILD]:
        memory_child(argv[1], argv[2], int(argv[3]), *map(float, argv[4:5]))
        return 0
    if argv[:1] == ["serving"]:  # FastAPI/uvicorn under HTTP load: python -m aiocuda.bench serving
        from ._serving import main as serving_main

        return serving_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m aiocuda.bench",
        description="Measure aiocuda against the alternatives (same process, same run) and "
        "write report.txt, report.json and PNG plots. With AIOCUDA_LIBCUDA naming the test "
        "driver emulator (scripts/bench does this), the cuda path is measured without a GPU. "
        "The serving benchmark (FastAPI under HTTP load) is a command of its own: "
        "python -m aiocuda.bench serving --help.",
        epilog=steps_doc.split("\n\n", 1)[1] if steps_doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats (< 1 minute)")
    ap.add_argument("--out", type=Path, default=Path("bench-report"),
                    help="output folder (default: bench-report); report.json and report.txt "
                    "are rewritten after every measurement")
    ap.add_argument("--loop", choices=("asyncio", "uvloop", "trio"), action="append",
                    help="only this loop (repeatable; default: every one installed; trio: its wake-up "
                    "latency only)")
    ap.add_argument("--source", choices=("cpu", "cuda"), action="append",
                    help="only this source (repeatable; default: cpu, and cuda where the cuda "
                    "backend is available)")
    ap.add_argument("--merge", action="store_true",
                    help="add to OUT/report.json (if there is one): each source and loop "
                    "measured now replaces its rows there; the table and targets cover the "
                    "whole report. Use the same --quick and --repeats as the report")
    ap.add_argument("--repeats", type=int, help="override the number of repeats")
    ap.add_argument("--step-timeout", type=float, metavar="SECONDS",
                    help="a measurement that takes longer is reported as timed out "
                    "(default: 30 with --quick, else 120)")
    ap.add_argument("--costs", type=Path, metavar="COSTS_JSON",
                    help="measure nothing else: what the driver charges for a host function and "
                    "an event query, written as JSON (tests/emu/costs.json calibrates the "
                    "driver emulator from a GPU's)")
    ap.add_argument("--redraw", type=Path, metavar="REPORT_JSON",
                    help="measure nothing: redraw the table and plots of an earlier report.json "
                    "into --out")
    args = ap.parse_args(argv)
    if args.redraw and args.merge:
        ap.error("--redraw measures nothing: nothing to --merge")
    if args.costs:
        from ._costs import write as write_costs

        print(json.dumps(write_costs(args.costs), indent=1))
        print(f"wrote {args.costs}")
        return 0
    if args.redraw:
        report = Report(**json.loads(args.redraw.read_text()))
        print(table(report), end="")
        for p in write_report(report, args.out):
            print(f"wrote {p}")
        return 0
    cfg = QUICK if args.quick else Config()
    if args.repeats is not None:
        if args.repeats < 1:
            ap.error("--repeats must be at least 1")
        cfg = Config(**{**cfg.__dict__, "repeats": args.repeats})
    if args.step_timeout is not None:
        if args.step_timeout <= 0:
            ap.error("--step-timeout must be positive")
        cfg = Config(**{**cfg.__dict__, "step_timeout_s": args.step_timeout})
    loops = tuple(dict.fromkeys(args.loop)) if args.loop else available_loops()
    if "uvloop" in loops and "uvloop" not in available_loops():
        ap.error("uvloop is not installed: pip install 'aiocuda[bench]'")
    kinds = tuple(dict.fromkeys(args.source or ("cpu", "cuda")))
    if args.source and "cuda" in kinds and "cuda" not in backends():
        ap.error(f"--source cuda: the cuda backend is not available here: "
                 f"{_core.cuda_info()['reason']}")
    base = None
    if args.merge and (args.out / "report.json").exists():
        base = load(args.out / "report.json")
        why = mismatch(base, args.quick, cfg.__dict__)
        if why:
            ap.error(f"--merge: {args.out / 'report.json'} cannot take these rows: {why}")
    report = run(cfg, args.quick, loops, out=args.out, kinds=kinds, base=base)
    print(table(report), end="")
    for p in write_report(report, args.out):
        print(f"wrote {p}")
    return 0 if not report.timed_out and not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())
