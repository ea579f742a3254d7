"""Build the test-only CUDA driver emulator (emu.cpp) into tests/emu/build/. Never installed."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

SRC = Path(__file__).resolve().parent / "emu.cpp"
CSRC = SRC.parents[2] / "csrc"  # for spin.hpp


def build_emulator() -> Path:
    """Return the path of libcuda_emu.so, compiling it if it is missing or older than its sources."""
    out = SRC.parent / "build" / "libcuda_emu.so"
    out.parent.mkdir(exist_ok=True)
    newest = max(p.stat().st_mtime for p in (SRC, CSRC / "spin.hpp", Path(__file__)))
    # (costs.json is read when the library loads: a new calibration needs no rebuild)
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("a C++ compiler is needed to build the driver emulator (tests/emu)")
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-g", "-Wall", "-Wextra", "-shared", "-fPIC",
         "-fvisibility=hidden", "-pthread", f"-I{CSRC}", str(SRC), "-o", str(tmp), "-ldl"],
        check=True,
    )
    tmp.replace(out)
    return out


# ctypes prototypes of everything the tests call (handles are void pointers, CUresult is int).
_P, _I, _U, _ULL, _LL = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_ulonglong, ctypes.c_longlong
_PP, _IP = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int)
HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "cuInit": (_I, [_U]),
    "cuDriverGetVersion": (_I, [_IP]),
    "cuDeviceGetCount": (_I, [_IP]),
    "cuDeviceGet": (_I, [_IP, _I]),
    "cuDevicePrimaryCtxRetain": (_I, [_PP, _I]),
    "cuDevicePrimaryCtxRelease_v2": (_I, [_I]),
    "cuDevicePrimaryCtxReset_v2": (_I, [_I]),
    "cuDevicePrimaryCtxSetFlags_v2": (_I, [_I, _U]),
    "cuDevicePrimaryCtxGetState": (_I, [_I, ctypes.POINTER(_U), _IP]),
    "cuCtxGetCurrent": (_I, [_PP]),
    "cuCtxSetCurrent": (_I, [_P]),
    "cuCtxPushCurrent_v2": (_I, [_P]),
    "cuCtxPopCurrent_v2": (_I, [_PP]),
    "cuCtxGetId": (_I, [_P, ctypes.POINTER(_ULL)]),
    "cuCtxGetDevice": (_I, [_IP]),
    "cuCtxSynchronize": (_I, []),
    "cuCtxRecordEvent": (_I, [_P, _P]),
    "cuStreamCreate": (_I, [_PP, _U]),
    "cuStreamDestroy_v2": (_I, [_P]),
    "cuStreamGetCtx": (_I, [_P, _PP]),
    "cuStreamQuery": (_I, [_P]),
    "cuStreamSynchronize": (_I, [_P]),
    "cuStreamWaitEvent": (_I, [_P, _P, _U]),
    "cuLaunchHostFunc": (_I, [_P, HOST_FN, _P]),
    "cuStreamBeginCapture_v2": (_I, [_P, _I]),
    "cuStreamEndCapture": (_I, [_P, _PP]),
    "cuStreamIsCapturing": (_I, [_P, _IP]),
    "cuStreamGetCaptureInfo_v3": (_I, [_P, _IP, ctypes.POINTER(_ULL), _PP, _PP, _PP, ctypes.POINTER(ctypes.c_size_t)]),
    "cuThreadExchangeStreamCaptureMode": (_I, [_IP]),
    "cuGraphDestroy": (_I, [_P]),
    "cuEventCreate": (_I, [_PP, _U]),
    "cuEventRecord": (_I, [_P, _P]),
    "cuEventQuery": (_I, [_P]),
    "cuEventSynchronize": (_I, [_P]),
    "cuEventDestroy_v2": (_I, [_P]),
    "cuEventElapsedTime": (_I, [ctypes.POINTER(ctypes.c_float), _P, _P]),
    "cuGetErrorName": (_I, [_I, ctypes.POINTER(ctypes.c_char_p)]),
    "cuGetErrorString": (_I, [_I, ctypes.POINTER(ctypes.c_char_p)]),
    "cuGetProcAddress_v2": (_I, [ctypes.c_char_p, _PP, _I, _ULL, _IP]),
    "cuMemHostRegister_v2": (_I, [_P, ctypes.c_size_t, _U]),
    "cuMemHostUnregister": (_I, [_P]),
    "cuMemHostGetDevicePointer_v2": (_I, [ctypes.POINTER(_ULL), _P, _U]),
    "cuStreamWaitValue32_v2": (_I, [_P, _ULL, ctypes.c_uint32, _U]),
    "cuStreamWriteValue32_v2": (_I, [_P, _ULL, ctypes.c_uint32, _U]),
    "cuStreamGetId": (_I, [_P, ctypes.POINTER(_ULL)]),
    "emu_enqueue_sleep": (_I, [_P, _LL]),
    "emu_enqueue_notify": (_I, [_P, _I]),
    "emu_inject_error": (None, [_I, _I]),
    "emu_capture_before_next_mark": (None, [_P]),
    "emu_set_hostfn_latency_us": (None, [_LL]),
    "emu_set_hostfn_cap": (None, [_I]),
    "emu_set_queue_depth": (None, [_I]),
    "emu_fail_stream_creates": (None, [_I]),
    "emu_defaults": (None, []),
    "emu_thread_blocked_ns": (_ULL, []),
    "emu_thread_calls": (_ULL, [ctypes.c_char_p]),
    "emu_stream_ops": (_ULL, [_P, ctypes.c_char_p]),
    "emu_live": (_LL, [ctypes.c_char_p]),
    "emu_calls_from_host_fns": (_ULL, []),
    "emu_host_fn_stats": (None, [ctypes.POINTER(_ULL)] * 3),
    "emu_make_private_context": (_P, []),
    "emu_capture_status": (_I, [_P]),
}


def load_emulator(path: Path | str | None = None) -> ctypes.CDLL:
    """The emulator as a ctypes library with every prototype above declared."""
    lib = ctypes.CDLL(str(path or build_emulator()))
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


if __name__ == "__main__":
    print(build_emulator())
