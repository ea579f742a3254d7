"""scripts/gpu-check, rehearsed on a machine shaped like the GPU machine, without its GPU.

That machine's `python3` is Python 3.12 in a virtual environment holding the build and test tools
(and torch, CuPy, ... which the rehearsal leaves out), with no network. The rehearsal makes such
a venv, clones this repository, and runs gpu-check there with pip forbidden to use an index, up
to the first step that needs a GPU: build, import, gpu tests skipped with their reason, the cpu
part of the report.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the GPU machine's venv holds that the build, the tests and the report use (less torch,
# CuPy, numba-cuda, Triton: no GPU here).
GPU_MACHINE_TOOLS = ["pybind11", "scikit-build-core", "cmake", "ninja", "pytest",
                     "pytest-benchmark", "uvloop", "matplotlib", "numpy"]

pytestmark = pytest.mark.skipif(
    os.environ.get("AIOCUDA_REHEARSAL") != "1",
    reason="the gpu-check rehearsal makes a Python 3.12 venv from PyPI and builds aiocuda in a "
    "clean clone (about a minute): scripts/test runs it with AIOCUDA_REHEARSAL=1",
)


def python312() -> str:
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(f"{root}/versions/3.12*/bin/python3.12")) + [
        p for p in [shutil.which("python3.12")] if p]
    if not found:
        pytest.fail("the rehearsal needs Python 3.12 (pyenv install 3.12, or python3.12 on PATH)")
    return found[0]


def test_gpu_check_runs_on_a_machine_shaped_like_the_gpu_machine(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the rehearsal runs gpu-check from a clean clone")
    venv = tmp_path / "gpu-python"
    subprocess.run([python312(), "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python3")
    subprocess.run([py, "-m", "pip", "install", "--quiet", *GPU_MACHINE_TOOLS], check=True,
                   timeout=600)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)

    env = {k: v for k, v in os.environ.items()
           if k not in ("AIOCUDA_LIBCUDA", "PYTHONPATH", "VIRTUAL_ENV", "AIOCUDA_REHEARSAL")}
    env.update(PYTHON=py, PIP_NO_INDEX="1")  # nothing can be downloaded on the GPU machine
    out = tmp_path / "out"
    r = subprocess.run([str(clone / "scripts" / "gpu-check"), str(out)], env=env, cwd=clone,
                       capture_output=True, text=True, timeout=900)
    log = r.stdout + r.stderr
    has_gpu = shutil.which("nvidia-smi") is not None
    assert r.returncode == (0 if has_gpu else 2), log

    summary = (out / "summary.txt").read_text()
    steps = {line.split()[0]: line for line in summary.splitlines()}
    assert list(steps) == ["machine", "build", "info", "gpu-tests", "report"], summary
    assert all(" ok " in line for line in steps.values()), summary
    assert "torch: not installed" in (out / "machine.txt").read_text()
    assert "backends: cpu" in (out / "info.txt").read_text()

    tests = (out / "gpu-tests.txt").read_text()
    assert " failed" not in tests and " error" not in tests, tests
    if not has_gpu:  # every gpu test skipped, each saying why
        skips = [line for line in tests.splitlines() if line.startswith("SKIPPED")]
        assert any("tests/test_gpu.py" in s and "no usable GPU: " in s for s in skips), tests
        assert "passed" not in tests.splitlines()[-1], tests

    report = json.loads((out / "report.json").read_text())
    sources = {row["source"] for row in report["latency"]}
    assert "cpu" in sources and (has_gpu or sources == {"cpu"}), sources
    assert not report["failed"] and not report["timed_out"], report
    for name in ("report.txt", "throughput.png", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    # The build came from the clone and went into OUTDIR, not into the machine's Python.
    assert (out / "site" / "aiocuda").is_dir()
    r = subprocess.run([py, "-c", "import aiocuda"], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode != 0 and "No module named 'aiocuda'" in r.stderr
