"""The examples run (on the cpu backend here; unchanged on a GPU)."""

from __future__ import annotations

import sys
import subprocess
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path) -> None:
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done" in r.stdout or "totals" in r.stdout


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2
