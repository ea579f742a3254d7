"""Every code block of the README and docs/ runs, and every error message aiocuda raises is
documented in docs/troubleshooting.md.

The Python blocks of a page run in order, in one namespace, in a process of their own with the
cpu backend alone (no AIOCUDA_LIBCUDA, as a user would run them); a top-level ``await`` runs
under ``asyncio.run``. An HTML comment on the line before a block marks it:

    <!-- doc-test: gpu -->          needs a CUDA GPU and torch built with CUDA: skipped without one
    <!-- doc-test: async-with -->   uses ``async with CpuStream()`` / ``aclose()``: skipped, saying
                                    so, where this aiocuda does not have them yet
    <!-- doc-test: skip: WHY -->    not run, for the reason given

A page whose blocks import a framework that is not installed (torch, tensorflow, fastapi, httpx)
is skipped with that reason (the main suite has them all). Shell blocks are not run; the scripts
they name must exist. Run a page by hand: ``python tests/test_docs.py docs/api.md``.
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
OPTIONAL = ("torch", "tensorflow", "fastapi", "httpx")
PAGE_TIMEOUT_S = 300

_FENCE = re.compile(r"^(`{3,})([\w+-]*)[^\n]*\n(.*?)^\1\s*$", re.M | re.S)
_MARK = re.compile(r"<!--\s*doc-test:\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    marks: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.fullmatch(before.strip())
        marks = tuple(s.strip() for s in mark.group(1).split(",")) if mark else ()
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(page, line, m.group(2).lower(), m.group(3), marks))
    return out


# ---- the runner: one page, in a process of its own ---------------------------------------------

def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    import aiocuda

    return bool(torch.cuda.is_available()) and "cuda" in aiocuda.backends()


def _has_async_with() -> bool:
    import aiocuda

    return all(hasattr(aiocuda.CpuStream, a) for a in ("__aenter__", "__aexit__", "aclose"))


def _skip_reason(block: Block) -> str | None:
    for mark in block.marks:
        if mark == "gpu" and not _has_gpu():
            return "needs a CUDA GPU (torch.cuda.is_available() and aiocuda's cuda backend)"
        if mark == "async-with" and not _has_async_with():
            return ("needs CpuStream's `async with` / aclose() (issue 15, section 2), which this "
                    "aiocuda does not have yet")
        if mark.startswith("skip:"):
            return mark[5:].strip()
        if mark not in ("gpu", "async-with"):
            return f"unknown doc-test mark {mark!r}"  # reported as a failure below
    return None


def _imports(code: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def run_page(page: Path) -> list[dict[str, Any]]:
    """Run the Python blocks of `page` in order in one namespace; one result per block."""
    blocks = [b for b in blocks_of(page) if b.lang == "python"]
    missing = sorted({m for b in blocks for m in _imports(b.code) & set(OPTIONAL)
                      if importlib.util.find_spec(m) is None})
    ns: dict[str, Any] = {"__name__": "__main__"}
    results = []
    for b in blocks:
        res: dict[str, Any] = {"id": b.id, "status": "passed", "detail": ""}
        why = _skip_reason(b)
        if why is not None and why.startswith("unknown doc-test mark"):
            res.update(status="failed", detail=why)
        elif why is not None:
            res.update(status="skipped", detail=why)
        elif missing:
            res.update(status="skipped", detail=f"the page needs {', '.join(missing)}, which is "
                                                "not installed")
        else:
            print(f"---- {b.id}", flush=True)
            try:
                code = compile(b.code, b.id, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
                if code.co_flags & inspect.CO_COROUTINE:
                    asyncio.run(eval(code, ns))
                else:
                    exec(code, ns)
            except BaseException:  # a block that raises SystemExit or KeyboardInterrupt fails too
                res.update(status="failed", detail=traceback.format_exc())
        results.append(res)
    return results


# ---- the tests -----------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the runner alone needs no pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    _results: dict[Path, dict[str, dict[str, Any]]] = {}
    _workdirs: list[str] = []

    def _workdir() -> str:
        """Where the pages run: made when the first page runs, removed when pytest exits."""
        if not _workdirs:
            _workdirs.append(tempfile.mkdtemp(prefix="aiocuda-docs-"))
            atexit.register(shutil.rmtree, _workdirs[0], True)
        return _workdirs[0]

    def _page_results(page: Path) -> dict[str, dict[str, Any]]:
        if page not in _results:
            workdir = _workdir()
            out = Path(workdir) / f"{len(_results)}.json"
            env = {k: v for k, v in os.environ.items() if k != "AIOCUDA_LIBCUDA"}
            try:
                r = subprocess.run([sys.executable, str(Path(__file__)), str(page), str(out)],
                                   cwd=workdir, env=env, capture_output=True, text=True,
                                   timeout=PAGE_TIMEOUT_S)
                log = r.stdout + r.stderr
                res = json.loads(out.read_text()) if out.exists() else []
                if r.returncode and not res:
                    res = [{"id": "*", "status": "failed", "detail": log[-4000:]}]
            except subprocess.TimeoutExpired as exc:
                log, res = str(exc.stdout or "")[-4000:], []
                res = [{"id": "*", "status": "failed",
                        "detail": f"the page ran past {PAGE_TIMEOUT_S} s\n{log}"}]
            _results[page] = {x["id"]: {**x, "log": log} for x in res}
        return _results[page]

    _PY_BLOCKS = [b for p in PAGES for b in blocks_of(p) if b.lang == "python"]

    @pytest.mark.parametrize("block", _PY_BLOCKS, ids=[b.id for b in _PY_BLOCKS])
    def test_code_block_runs(block: Block) -> None:
        results = _page_results(block.page)
        res = results.get(block.id) or results.get("*")
        assert res is not None, f"{block.id} was not run"
        if res["status"] == "skipped":
            pytest.skip(res["detail"])
        assert res["status"] == "passed", f"{block.id} failed:\n{res['detail']}\n{res['log'][-3000:]}"

    def test_every_page_has_blocks_that_run() -> None:
        assert len(_PY_BLOCKS) >= 15, [b.id for b in _PY_BLOCKS]
        unmarked = {b.page for b in _PY_BLOCKS if not b.marks}
        assert (ROOT / "README.md") in unmarked, "the README's tour must run without a GPU"

    def test_shell_blocks_name_scripts_that_exist() -> None:
        bad = []
        for page in PAGES:
            for b in blocks_of(page):
                if b.lang not in ("sh", "bash", "console", "shell"):
                    continue
                for script in re.findall(r"(?:^|\s)\.?/?((?:scripts|examples|tests)/[\w./-]+)",
                                         b.code):
                    if not (ROOT / script).exists():
                        bad.append(f"{b.id}: {script}")
        assert not bad, bad

    def test_the_readme_starts_with_the_two_set_up_commands() -> None:
        lines = (ROOT / "README.md").read_text().splitlines()
        assert lines[0] == "# aiocuda"
        first = blocks_of(ROOT / "README.md")[0]
        assert first.lang == "sh" and first.line == 3, first
        cmds = [line.split("#")[0].strip() for line in first.code.splitlines()]
        assert cmds == ["./scripts/demo", "./scripts/test"], cmds

    def test_local_links_resolve() -> None:
        bad = []
        for page in PAGES:
            for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
                if re.match(r"[a-z]+:", target):
                    continue
                if not (page.parent / target).exists():
                    bad.append(f"{page.relative_to(ROOT)}: {target}")
        assert not bad, bad

    # ---- every error message is documented ----------------------------------------------------

    _EXC = {"AiocudaError", "CudaError", "TypeError", "ValueError", "RuntimeError", "ImportError",
            "NotImplementedError"}
    # Where the native core says what went wrong: the reason strings it builds.
    _CPP_SITES = re.compile(
        r"(?:\bwhy\s*=|\breason\s*=|\breturn\s+(?=\")|runtime_error\(|raise_refused\(\s*\w+\s*,|"
        r"PyErr_Format\(\s*PyExc_\w+\s*,|PyErr_SetString\(\s*PyExc_\w+\s*,|"
        r"PyObject_CallFunction\(\s*PyExc_\w+\s*,\s*\"s\"\s*,|kNotPrimaryText\s*=)"
        r'((?:"(?:[^"\\]|\\.)*"|[^;"])*);')
    _CPP_LITERALS = re.compile(r'"((?:[^"\\]|\\.)*)"(?:\s*"((?:[^"\\]|\\.)*)")*')

    def _literal_parts(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.JoinedStr):
            parts, cur = [], ""
            for v in node.values:
                if isinstance(v, ast.Constant):
                    cur += str(v.value)
                else:
                    parts.append(cur)
                    cur = ""
            return [*parts, cur]
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return _literal_parts(node.left) + _literal_parts(node.right)
        return []

    def _python_messages() -> list[tuple[str, str]]:
        found = []
        for f in sorted((ROOT / "python" / "aiocuda").glob("*.py")):
            if f.name in ("__main__.py", "_demo.py"):  # the command line's own output
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in _EXC and node.args):
                    continue
                arg = node.args[1] if node.func.id == "CudaError" and len(node.args) > 1 \
                    else node.args[0]
                parts = [p for p in _literal_parts(arg) if p.strip()]
                if parts:
                    found.append((f"python/aiocuda/{f.name}:{node.lineno}", max(parts, key=len)))
        return found

    def _cpp_messages() -> list[tuple[str, str]]:
        found = []
        for f in sorted((ROOT / "csrc").glob("*.[ch]pp")):
            text = f.read_text()
            for m in _CPP_SITES.finditer(text):
                parts = []
                for lit in _CPP_LITERALS.finditer(m.group(1)):
                    joined = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', lit.group(0)))
                    parts += re.split(r"%[a-zA-Z]", joined.encode().decode("unicode_escape"))
                parts = [p for p in parts if len(p.strip()) >= 12 and " " in p.strip()]
                if parts:
                    line = text.count("\n", 0, m.start()) + 1
                    found.append((f"csrc/{f.name}:{line}", max(parts, key=len)))
        return found

    def _norm(s: str) -> str:
        return " ".join(s.split())

    def test_every_error_message_is_documented() -> None:
        page = _norm((ROOT / "docs" / "troubleshooting.md").read_text())
        messages = _python_messages() + _cpp_messages()
        assert len(messages) > 40, messages  # the extraction still finds them
        missing = [f"{where}: {text.strip()!r}" for where, text in messages
                   if _norm(text) not in page]
        assert not missing, ("document these messages in docs/troubleshooting.md (what it means, "
                             "what to do):\n" + "\n".join(missing))


if __name__ == "__main__":
    results = run_page(Path(sys.argv[1]).resolve())
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(results))
    for r in results:
        print(f"{r['status']:8} {r['id']} {r['detail'].splitlines()[-1] if r['detail'] else ''}")
    sys.exit(1 if any(r["status"] == "failed" for r in results) else 0)
