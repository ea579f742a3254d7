"""Build the test-only CUDA driver emulator (emu.cpp) into tests/emu/build/. Never installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SRC = Path(__file__).resolve().parent / "emu.cpp"
CSRC = SRC.parents[2] / "csrc"  # for spin.hpp


def build_emulator() -> Path:
    """Return the path of libcuda_emu.so, compiling it if it is missing or older than emu.cpp."""
    out = SRC.parent / "build" / "libcuda_emu.so"
    out.parent.mkdir(exist_ok=True)
    newest = max(SRC.stat().st_mtime, (CSRC / "spin.hpp").stat().st_mtime)
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("a C++ compiler is needed to build the driver emulator (tests/emu)")
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread",
         f"-I{CSRC}", str(SRC), "-o", str(tmp), "-ldl"],
        check=True,
    )
    tmp.replace(out)
    return out


if __name__ == "__main__":
    print(build_emulator())
