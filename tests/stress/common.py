"""What the stress harnesses measure about the process, and how they start a helper process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "STRESS-RESULT "


def env_int(name: str, default: int) -> int:
    """An integer from the environment (``AIOCUDA_STRESS_*``), or `default`."""
    text = os.environ.get(name, "").strip().replace("_", "")
    return int(text) if text else default


def under_asan() -> bool:
    """Whether AddressSanitizer runs in this process (scripts/asan-test preloads it)."""
    return "libasan" in os.environ.get("LD_PRELOAD", "")


# Why the tests that fork a process with other threads running skip under ASan. gcc 12's libasan
# intercepts no fork() (`strings libasan.so` lists no fork interceptor): a fork while another
# thread holds one of its allocator's locks leaves the child waiting for it for ever. Seen here:
# hung children with a thread in a futex wait on an address in the allocator's region table
# (the mapping at 0x640000000000), in 5 of 73 runs of the fork stress's thread scenario and on
# the first run of tests/test_fork.py (its child's CpuStream worker). The tests run unsanitized
# in every other stage of scripts/test.
ASAN_FORK = ("AddressSanitizer (gcc 12) is not fork-safe: a forked child can deadlock in its "
             "allocator when another thread allocates at fork time; run unsanitized elsewhere")


def rss_bytes() -> int:
    """The process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def native_threads() -> int:
    """Threads of this process, native ones included (not only Python's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return threading.active_count()


def watchdog() -> None:
    """Dump every thread's stack on SIGUSR1 (run_helper sends it to a helper that hangs).

    Not faulthandler.dump_traceback_later: re-arming it in a forked child deadlocks."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)


def emit(result: dict[str, Any]) -> None:
    """Print a helper process's result as one JSON line the parent finds (see run_helper)."""
    print(RESULT_PREFIX + json.dumps(result, default=repr), flush=True)


def run_helper(module: str, args: list[str], timeout: float,
               env: dict[str, str] | None = None) -> tuple[dict[str, Any] | None, str]:
    """Run ``python -m tests.stress.<module> ARGS`` from the repository root.

    Returns (its result, a description of how it ended with the tail of its output). The
    result is None when it crashed, hung (killed after `timeout` s) or printed none.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    cmd = [sys.executable, "-m", f"tests.stress.{module}", *args]
    # A session of its own: on a hang, the helper and any child it forked are killed together.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # helpers dump every thread's stack on SIGUSR1
        try:
            stdout, stderr = proc.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            stdout = stderr = ""
        _kill_group(proc.pid)
        more_out, more_err = proc.communicate()
        out = _text(stdout) + _text(more_out) + _text(stderr) + _text(more_err)
        return None, f"hung: killed after {timeout:.0f} s; output:\n{out[-6000:]}"
    _kill_group(proc.pid)  # children it left behind
    out = stdout + stderr
    result = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
    how = "exited with %d" % proc.returncode if proc.returncode >= 0 else (
        "killed by signal %d" % -proc.returncode)
    if proc.returncode != 0:
        result = None if result is None else {**result, "exit_status": proc.returncode}
    return result, f"{how}; output:\n{out[-6000:]}"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode(errors="replace")
