"""ABI check of csrc/driver.hpp against the real CUDA headers (cuda.h, cudaTypedefs.h).

aiocuda builds without any CUDA header, so its driver declarations are checked here instead:
tests/abi/check.cpp static_asserts every entry point's pointer type, every constant and every
handle type against the headers; this file compiles it, proves it can fail, and checks what
only the header's text tells: which PFN variant cuGetProcAddress returns at each `ask` version.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DRIVER_HPP = REPO / "csrc" / "driver.hpp"
CHECK_CPP = REPO / "tests" / "abi" / "check.cpp"


def _cuda_include() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        inc = Path(root) / "include"
        if (inc / "cuda.h").is_file() and (inc / "cudaTypedefs.h").is_file():
            return inc
    return None


_include = _cuda_include()
if _include is None:
    pytest.skip(
        "no CUDA headers (cuda.h, cudaTypedefs.h) under CUDA_HOME, CUDA_PATH or /usr/local/cuda:"
        " the ABI check needs them; aiocuda itself builds without",
        allow_module_level=True,
    )
CUDA_INCLUDE: Path = _include

# X(name, pfn, ask, optional, ret, params) lines of AIOCUDA_DRIVER_ENTRIES.
DRIVER = DRIVER_HPP.read_text()
ENTRIES_MACRO = re.search(r"#define AIOCUDA_DRIVER_ENTRIES\(X\)(.*?)\n\s*\n", DRIVER, re.S)
assert ENTRIES_MACRO, "AIOCUDA_DRIVER_ENTRIES not found in csrc/driver.hpp"
ENTRIES = [
    (name, int(pfn), int(ask))
    for name, pfn, ask in re.findall(
        r"\bX\((\w+),\s*(\d+),\s*(\d+),\s*(?:true|false),", ENTRIES_MACRO.group(1)
    )
]
assert len(ENTRIES) == ENTRIES_MACRO.group(1).count("X("), "an entry the regex did not parse"

_version = re.search(r"#define CUDA_VERSION (\d+)", (CUDA_INCLUDE / "cuda.h").read_text())
assert _version, "no CUDA_VERSION in cuda.h"
CUDA_VERSION = int(_version[1])
if CUDA_VERSION < max(ask for _, _, ask in ENTRIES):
    pytest.skip(
        f"CUDA headers under {CUDA_INCLUDE} are version {CUDA_VERSION}, older than the newest"
        " entry aiocuda asks for: they cannot describe it",
        allow_module_level=True,
    )


def _compile(*defines: str) -> subprocess.CompletedProcess[str]:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler (set CXX, or install c++/g++)")
    cmd = [*shlex.split(cxx), "-std=c++17", "-fsyntax-only", f"-I{CUDA_INCLUDE}",
           f"-I{REPO / 'csrc'}", *defines, str(CHECK_CPP)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_driver_hpp_matches_cuda_headers() -> None:
    r = _compile()
    assert r.returncode == 0, f"driver.hpp disagrees with the CUDA headers:\n{r.stderr}"


def test_check_can_fail() -> None:
    # Negative control: check.cpp plants one wrong assertion; it, and only it, must fail.
    r = _compile("-DAIOCUDA_ABI_SELFTEST_BREAK")
    assert r.returncode != 0, "the planted ABI mismatch compiled: check.cpp checks nothing"
    assert "PFN_cuEventRecord" in r.stderr and "PFN_cuEventQuery_v2000" in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, r.stderr


@pytest.mark.parametrize(("name", "pfn", "ask"), ENTRIES, ids=[e[0] for e in ENTRIES])
def test_get_proc_address_returns_the_declared_variant(name: str, pfn: int, ask: int) -> None:
    # cuGetProcAddress(name, cudaVersion=ask) returns the newest variant whose version is <= ask
    # (per-thread-stream _ptsz/_ptds variants only on request; \b leaves them out).
    typedefs = (CUDA_INCLUDE / "cudaTypedefs.h").read_text()
    variants = sorted({int(v) for v in re.findall(rf"\*\s*PFN_{name}_v(\d+)\b", typedefs)})
    assert pfn in variants, f"cudaTypedefs.h has no PFN_{name}_v{pfn} (it has {variants})"
    got = max((v for v in variants if v <= ask), default=None)
    assert got == pfn, (
        f"cuGetProcAddress({name!r}, {ask}) returns "
        f"{f'PFN_{name}_v{got}' if got else 'nothing'}, not the declared PFN_{name}_v{pfn}"
        f" (variants: {variants})"
    )


def test_check_cpp_covers_every_constant_and_handle() -> None:
    # check.cpp lists constants and handles by hand: nothing driver.hpp declares may be missed.
    check = CHECK_CPP.read_text()
    constants = set(re.findall(r"constexpr\s+[\w ]+?\s+((?:CUDA|CU)_\w+)\s*=", DRIVER))
    assert constants, "no constants parsed from driver.hpp"
    missing = constants - set(re.findall(r"CHECK_CONST\((\w+)\)", check))
    assert not missing, f"constants driver.hpp declares but check.cpp does not check: {missing}"
    handles = set(re.findall(r"using (CU\w+) = CU\w+_st\*;", DRIVER))
    assert handles, "no handle typedefs parsed from driver.hpp"
    checked = set(re.findall(r"is_same_v<aiocuda::drv::(\w+), ::\1>", check))
    assert handles <= checked, f"handles check.cpp does not check: {handles - checked}"
