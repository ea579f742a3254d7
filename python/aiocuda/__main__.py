"""python -m aiocuda {info,demo}: what is installed, and a demo that measures itself."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import platform
import sys
from collections.abc import Sequence

from . import __version__, _core, backends, strategy


def _loop_name(use_uvloop: bool) -> str:
    if use_uvloop:
        from importlib.metadata import version

        return f"uvloop {version('uvloop')}"
    return f"asyncio ({type(asyncio.new_event_loop()).__name__})"


def info(use_uvloop: bool) -> int:
    """Print the version, the backends, the driver and its devices, the loop, the frameworks."""
    cuda = _core.cuda_info()
    print(f"aiocuda {__version__} on Python {platform.python_version()} ({sys.platform})")
    print(f"backends: {', '.join(backends())}")
    if cuda["available"]:
        v = cuda["version"]
        print(f"libcuda: {cuda['path']} (driver API {v // 1000}.{v % 1000 // 10})")
        for i in range(cuda["device_count"]):
            print(f"  device {i}: {_core.cuda_device_name(i)}")
        print(f"completion strategy: {strategy()} (AIOCUDA_STRATEGY, aiocuda.set_strategy)")
    else:
        print(f"cuda: unavailable: {cuda['reason']}")
    print(f"event loop: {_loop_name(use_uvloop)}")
    print(f"frameworks: {_frameworks()}")
    return 0


def _frameworks() -> str:
    """Installed framework versions, without importing them (TensorFlow takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for label, dists in (("torch", ("torch",)),
                         ("tensorflow", ("tensorflow", "tensorflow-cpu"))):
        for dist in dists:
            try:
                found.append(f"{label} {version(dist)}")
                break
            except PackageNotFoundError:
                continue
    return ", ".join(found) or "none (pip install 'aiocuda[torch]' or 'aiocuda[tensorflow]')"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiocuda", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="version, backends, driver, devices, loop")
    p_info.add_argument("--uvloop", action="store_true", help="report uvloop as the loop")
    p_demo = sub.add_parser("demo", help="await many operations; compare with run_in_executor")
    p_demo.add_argument("--uvloop", action="store_true", help="run on uvloop")
    p_demo.add_argument("--ops", type=int, default=20000, help="operations per method")
    p_demo.add_argument("--streams", type=int, default=8, help="cpu-backend streams")
    p_demo.add_argument("--work-ms", type=float, default=0.1,
                        help="native work per operation (0 to 1000 ms)")
    args = parser.parse_args(argv)
    if args.uvloop and importlib.util.find_spec("uvloop") is None:
        parser.error("--uvloop: uvloop is not installed: pip install 'aiocuda[uvloop]'")
    if args.command == "info":
        return info(args.uvloop)
    from ._demo import run_demo

    return run_demo(args.ops, args.streams, args.work_ms / 1000, args.uvloop)


if __name__ == "__main__":
    sys.exit(main())
