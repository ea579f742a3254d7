"""Invariant 3: libcuda is opened at run time; the package imports and works without it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from aiocuda import _core

from .conftest import EMU_PATH, python_subprocess

NO_DRIVER = """
import asyncio, aiocuda
assert aiocuda.backends() == ("cpu",), aiocuda.backends()
async def main():
    with aiocuda.CpuStream() as s:
        assert await s.submit(sum, [1, 2]) == 3
    try:
        aiocuda.synchronize(0)
    except aiocuda.AiocudaError as exc:
        print("ERR", exc)
    ran = []
    try:  # refused before the function runs: its work would have nothing to await it
        await aiocuda.gpu_op(ran.append, 1, stream=5)
    except aiocuda.AiocudaError as exc:
        print("GPU_OP", exc, ran)
    try:  # the TensorFlow device path likewise
        await aiocuda.gpu_op(ran.append, 2, device="/GPU:0")
    except aiocuda.AiocudaError as exc:
        print("GPU_OP_TF", exc, ran)
asyncio.run(main())
"""


def test_import_and_cpu_backend_without_a_driver():
    r = python_subprocess(NO_DRIVER, {"AIOCUDA_LIBCUDA": "/nonexistent/libcuda.so.1"})
    assert r.returncode == 0, r.stderr
    assert "ERR no CUDA driver: could not load /nonexistent/libcuda.so.1" in r.stdout
    assert "AIOCUDA_LIBCUDA" in r.stdout  # says what to do
    assert "GPU_OP no CUDA driver: could not load /nonexistent/libcuda.so.1" in r.stdout
    assert "GPU_OP_TF no CUDA driver: could not load /nonexistent/libcuda.so.1" in r.stdout
    assert r.stdout.rstrip().endswith("[]")  # the functions never ran


@pytest.mark.skipif(EMU_PATH is None, reason="needs the driver emulator")
def test_a_driver_with_no_device():
    r = python_subprocess(NO_DRIVER, {"AIOCUDA_LIBCUDA": str(EMU_PATH), "AIOCUDA_EMU_DEVICES": "0"})
    assert r.returncode == 0, r.stderr
    # The driver's cuInit reports CUDA_ERROR_NO_DEVICE when it finds none (cuda.h lists it).
    assert "ERR the CUDA driver failed to initialise: CUDA_ERROR_NO_DEVICE" in r.stdout


@pytest.mark.skipif(EMU_PATH is None, reason="needs the driver emulator")
def test_a_driver_that_fails_to_initialise():
    r = python_subprocess(NO_DRIVER, {"AIOCUDA_LIBCUDA": str(EMU_PATH), "AIOCUDA_EMU_INIT_ERROR": "100"})
    assert r.returncode == 0, r.stderr
    assert "ERR the CUDA driver failed to initialise: CUDA_ERROR_NO_DEVICE" in r.stdout


def test_a_library_that_is_not_a_cuda_driver():
    libc = "libc.so.6"
    r = python_subprocess(NO_DRIVER, {"AIOCUDA_LIBCUDA": libc})
    assert r.returncode == 0, r.stderr
    assert "ERR the CUDA driver has no cuGetProcAddress_v2" in r.stdout


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_the_extension_links_no_cuda_torch_or_tensorflow():
    so = Path(_core.__file__)
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True)
    needed = [line for line in out.stdout.splitlines() if "(NEEDED)" in line]
    assert needed, out.stdout
    for lib in ("libcuda", "libcudart", "libtorch", "libc10", "tensorflow"):
        assert not any(lib in line for line in needed), needed


def test_cuda_info_reports_the_loaded_driver():
    info = _core.cuda_info()
    assert set(info) == {"available", "reason", "path", "version", "device_count"}
    if EMU_PATH is not None:
        assert info["available"] and Path(info["path"]) == EMU_PATH
        assert info["version"] == 13000


def test_info_command_reports_backends_driver_and_frameworks():
    r = python_subprocess("from aiocuda.__main__ import main; raise SystemExit(main(['info']))")
    assert r.returncode == 0, r.stderr
    assert "backends: cpu" in r.stdout and "event loop: asyncio" in r.stdout
    assert "frameworks: " in r.stdout
    assert "libcuda: " in r.stdout or "cuda: unavailable: " in r.stdout
