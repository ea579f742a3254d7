"""The examples run (on the cpu backend here; unchanged on a GPU)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


def missing(path: Path) -> list[str]:
    """The packages an example's docstring says it needs ("Needs: torch, aiohttp.") that are
    not installed."""
    m = re.search(r"^Needs: (.+)\.$", path.read_text(), re.MULTILINE)
    needs = [n.strip() for n in m.group(1).split(",")] if m else []
    return [n for n in needs if importlib.util.find_spec(n) is None]


def run_example(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    absent = missing(path)
    if absent:
        pytest.skip(f"examples/{path.name} needs {', '.join(absent)}, which is not installed")
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120,
                       env=env)
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


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2
