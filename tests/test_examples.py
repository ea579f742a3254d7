"""The examples run (on the cpu backend here; unchanged on a GPU)."""

from __future__ import annotations

import importlib.util
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


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path) -> None:
    absent = missing(path)
    if absent:
        pytest.skip(f"examples/{path.name} needs {', '.join(absent)}, which is not installed")
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done" in r.stdout or "totals" in r.stdout


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2
