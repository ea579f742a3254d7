"""The package is typed: _core.pyi matches the native module, and mypy --strict passes."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import aiocuda
from aiocuda import _core

PKG = Path(_core.__file__).resolve().parent


def test_stub_names_match_the_module():
    tree = ast.parse((PKG / "_core.pyi").read_text())
    stubbed = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            stubbed.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            stubbed.add(node.target.id)
    exported = {n for n in dir(_core) if not n.startswith("__")}
    assert stubbed == exported


def test_stub_class_members_match():
    tree = ast.parse((PKG / "_core.pyi").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            stubbed = {
                n.name if isinstance(n, ast.FunctionDef) else n.target.id  # type: ignore[union-attr]
                for n in node.body
                if isinstance(n, (ast.FunctionDef, ast.AnnAssign))
            }
            real = {
                n for n in dir(getattr(_core, node.name))
                if not n.startswith("__") and not n.startswith("_pybind11")  # pybind11 internals
            }
            assert stubbed - {"__init__"} == real, node.name


FRAMEWORK_MODULES = {"aiocuda.torch": "torch", "aiocuda._trio": "trio"}  # aiocuda.tensorflow: no TF stubs


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
@pytest.mark.parametrize("part", ["core", "aiocuda.torch", "aiocuda._trio"])
def test_mypy_strict_passes_on_the_package(tmp_path, part):
    # From an empty directory, so mypy checks the installed package with its stubs.
    if part == "core":  # every module but those typed against a framework's own annotations
        names = [m.name for m in pkgutil.walk_packages(aiocuda.__path__, "aiocuda.")
                 if m.name not in FRAMEWORK_MODULES]
        args = ["--follow-imports=silent", "-m", "aiocuda", *(a for n in names for a in ("-m", n))]
    else:
        if importlib.util.find_spec(FRAMEWORK_MODULES[part]) is None:
            pytest.skip(f"{part} is typed against {FRAMEWORK_MODULES[part]}, which is not installed")
        args = ["-m", part]
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *args],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success" in r.stdout, r.stdout


USER_PROGRAM = """
import aiocuda


class ProtocolStream:
    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, 0)


class AttributeStream:  # torch.cuda.Stream's way
    cuda_stream: int = 0


async def good(s: aiocuda.CpuStream) -> None:
    for stream in (s, ProtocolStream(), AttributeStream(), 0):
        await aiocuda.synchronize(stream, device=None)
        await aiocuda.record(stream)


async def bad() -> None:
    await aiocuda.synchronize("stream")  # wrong: 1
    await aiocuda.synchronize(None)  # wrong: 2
    await aiocuda.record(1.5)  # wrong: 3
"""


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_mypy_strict_refuses_what_is_not_a_stream(tmp_path):
    # StreamLike was a Union with Any in it: mypy took anything as a stream.
    (tmp_path / "user.py").write_text(USER_PROGRAM)
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "user.py"],
                       capture_output=True, text=True, cwd=tmp_path)
    lines = [n for n, line in enumerate(USER_PROGRAM.splitlines(), 1) if "# wrong" in line]
    errors = sorted({int(m) for m in re.findall(r"user\.py:(\d+): error", r.stdout)})
    assert errors == lines, r.stdout + r.stderr


def test_py_typed_is_shipped():
    assert (PKG / "py.typed").exists()
