"""fork() under load, in a process of its own: from a running loop, from a thread running a
loop, and many times while other threads create loops; each child exits by ``sys.exit`` (the
interpreter's normal shutdown: atexit, finalizers) or by ``os._exit``.

    python -m tests.stress.forks --scenario loop|thread|churn --exit sys|os --loop asyncio|uvloop

Checked: every child finishes (one that hangs, for example on a lock held at fork time, is
killed and counted); in the child, the parent's pending futures have failed with AiocudaError
and a fresh loop with a fresh CpuStream works; the child's exit status is its own; after each
child exits, the parent's loops still deliver completions (a child's finalizers must not touch
the parent's reader in the shared epoll set), and the parent's pending work completes.
Prints one STRESS-RESULT JSON line (tests.stress.common.run_helper reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

if __name__ == "__main__" and "AIOCUDA_LIBCUDA" not in os.environ:
    from tests.emu.build import build_emulator

    os.environ["AIOCUDA_LIBCUDA"] = str(build_emulator())

import aiocuda  # noqa: E402
from aiocuda import _core, _loop  # noqa: E402

from .churn import new_loop  # noqa: E402
from .common import emit, env_int, watchdog  # noqa: E402

CHILD_TIMEOUT = 5.0  # a child still running after this long is killed (counted as hung)
PARENT_TIMEOUT = 5.0  # each parent await after a child exited

# Bits of a child's report (its exit status is 10 + the bits under --exit os).
PENDING_NOT_FAILED = 1  # a future pending in the parent at fork time did not fail with AiocudaError
FRESH_LOOP_FAILED = 2  # a fresh loop with a fresh CpuStream did not work
CHILD_RAISED = 4  # something raised in the child


class Report:
    def __init__(self, scenario: str, exit_mode: str, kind: str) -> None:
        self.r: dict[str, Any] = {
            "scenario": scenario, "exit": exit_mode, "loop": kind, "children": 0,
            "hung_children": 0, "bad_exit_status": 0, "child_failures": 0,
            "parent_failures": 0, "loops_made_meanwhile": 0, "forks_with_states_lock_held": 0,
            "forks_forced_lock_held": 0, "notes": [],
        }

    def failed(self) -> bool:
        r = self.r
        return bool(r["hung_children"] or r["parent_failures"] or r["child_failures"]
                    or r["bad_exit_status"])

    def note(self, text: str) -> None:
        if len(self.r["notes"]) < 20:
            self.r["notes"].append(text)


PARENT = os.getpid()


def close_if_ours(loop: asyncio.AbstractEventLoop) -> None:
    """Close `loop` in the process that made it. A child unwinding with SystemExit leaves the
    parent's copy alone, as asyncio's and uvloop's close() would take the parent's readers out
    of the epoll set they share (their behaviour, not aiocuda's: aiocuda's own finalizers are
    what this checks)."""
    if os.getpid() == PARENT:
        loop.close()


def _fork() -> int:
    with warnings.catch_warnings():
        # Python >= 3.12 warns that fork() with threads may deadlock the child: the point here.
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def child_side(kind: str, pending: list[asyncio.Future[Any]], report_fd: int,
               exit_mode: str, lock_at_fork: Any) -> None:
    """The forked child: check, report through `report_fd` ("BITS HELD": HELD is 1 if
    `lock_at_fork`, aiocuda's loop-state lock as it was when the parent forked, is held in this
    process: by a thread that does not exist here), exit as asked. Never returns (under --exit
    sys it raises SystemExit, which unwinds through the parent's copy of the running loop to the
    interpreter's normal shutdown, or ends the thread it runs in)."""
    bits = 0
    held = int(lock_at_fork is not None and lock_at_fork.locked())
    try:
        asyncio.events._set_running_loop(None)  # the parent's loop does not run in this process
        for fut in pending:
            if not (fut.done() and not fut.cancelled()
                    and isinstance(fut.exception(), aiocuda.AiocudaError)):
                bits |= PENDING_NOT_FAILED

        async def fresh() -> int:
            with aiocuda.CpuStream() as s:
                s.delay(0.001)
                got = await asyncio.wait_for(s.submit(sum, [1, 2, 3]), 3)
                await asyncio.wait_for(aiocuda.synchronize(s), 3)
                return got

        loop = new_loop(kind)
        try:
            if loop.run_until_complete(fresh()) != 6:
                bits |= FRESH_LOOP_FAILED
        except Exception:
            bits |= FRESH_LOOP_FAILED
        finally:
            loop.close()
    except BaseException:
        bits |= CHILD_RAISED
    os.write(report_fd, f"{bits} {held}".encode())
    os.close(report_fd)
    if exit_mode == "os":
        os._exit(10 + bits)
    sys.exit(10 + bits)


async def wait_child(pid: int, report_fd: int, rep: Report, exit_mode: str,
                     in_thread: bool) -> bool:
    """Wait for the child without blocking the loop; kill it if it hangs; read its report.
    Return whether the child found the loop-state lock held (see child_side)."""
    rep.r["children"] += 1
    end = time.monotonic() + CHILD_TIMEOUT
    status = None
    while True:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
            break
        if time.monotonic() > end:
            print(f"hung child {pid}'s threads:\n{task_states(pid)}", file=sys.stderr,
                  flush=True)
            native_stacks(pid)
            os.kill(pid, signal.SIGUSR1)  # its stacks, to stderr (watchdog(), inherited)
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            rep.r["hung_children"] += 1
            rep.note(f"child {pid} hung: killed after {CHILD_TIMEOUT} s")
            break
        await asyncio.sleep(0.005)
    data = b""
    while True:
        try:
            chunk = os.read(report_fd, 64)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    os.close(report_fd)
    if status is None:
        return False
    fields = data.split()
    bits = int(fields[0]) if len(fields) == 2 else None
    if bits is None:
        rep.r["child_failures"] += 1
        rep.note(f"child exited with {status} without a report ({data!r})")
        return False
    held = fields[1] == b"1"
    rep.r["forks_with_states_lock_held"] += held
    if bits:
        rep.r["child_failures"] += 1
        rep.note(f"child failed checks {bits:#x} (1: pending future, 2: fresh loop, 4: raised)")
    # A SystemExit in a thread ends that thread; the process then exits with 0 (no shutdown).
    expected = 10 + bits if (exit_mode == "os" or not in_thread) else 0
    if status != expected:
        rep.r["bad_exit_status"] += 1
        rep.note(f"child exited with {status}, expected {expected}")
    return held


def task_states(pid: int) -> str:
    """A hung child's threads from /proc: state, kernel wait channel, system call."""
    rows = []
    try:
        tasks = sorted(os.listdir(f"/proc/{pid}/task"), key=int)
    except OSError as e:
        return f"no /proc/{pid}/task: {e!r}"
    for tid in tasks:
        base = f"/proc/{pid}/task/{tid}"
        fields = []
        for name in ("comm", "wchan", "syscall", "stat"):
            try:
                with open(f"{base}/{name}") as f:
                    text = f.read().strip()
            except OSError as e:
                text = f"<{e.strerror}>"
            if name == "stat":
                text = "state " + text.rsplit(")", 1)[-1].split()[0]
            fields.append(f"{name}={text[:80]}")
        rows.append(f"  task {tid}: " + ", ".join(fields))
    return "\n".join(rows)


def native_stacks(pid: int) -> None:
    """Print a hung child's native stacks (gdb, where installed and allowed) to stderr."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return
    try:
        proc = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-ex",
                               "thread apply all bt"], capture_output=True, text=True, timeout=30)
        out = proc.stdout + proc.stderr
    except (OSError, subprocess.SubprocessError) as e:
        out = f"gdb failed: {e!r}"
    lines = [x for x in out.splitlines() if x.startswith(("#", "Thread"))] or out.splitlines()
    print(f"native stacks of hung child {pid}:\n" + "\n".join(lines[:200]), file=sys.stderr,
          flush=True)


def fork_here(kind: str, pending: list[asyncio.Future[Any]], exit_mode: str) -> tuple[int, int]:
    """Fork from the running coroutine; return (pid, read end of the child's report)."""
    r, w = os.pipe()
    lock = getattr(_loop, "_states_lock", None)  # the child finds out whether it was held
    pid = _fork()
    if pid == 0:
        os.close(r)
        child_side(kind, pending, w, exit_mode, lock)
    os.close(w)
    os.set_blocking(r, False)
    return pid, r


async def parent_still_works(s: aiocuda.CpuStream, rep: Report, where: str,
                             cuda: int = 0) -> None:
    """The parent's loop delivers new completions (its reader is still in the epoll set)."""
    try:
        got = await asyncio.wait_for(s.submit(sum, [4, 5]), PARENT_TIMEOUT)
        assert got == 9, got
        await asyncio.wait_for(aiocuda.synchronize(s), PARENT_TIMEOUT)
        await asyncio.wait_for(s.record(), PARENT_TIMEOUT)  # type: ignore[arg-type]
        if cuda:
            await asyncio.wait_for(aiocuda.synchronize(cuda), PARENT_TIMEOUT)
    except (Exception, asyncio.TimeoutError) as e:
        rep.r["parent_failures"] += 1
        rep.note(f"{where}: the parent's loop no longer delivers completions: {e!r}")


async def pending_work(s: aiocuda.CpuStream, emu: Any, h: int) -> list[asyncio.Future[Any]]:
    s.delay(0.2)
    pending = [aiocuda.synchronize(s), s.submit(int, 5)]
    if emu is not None:
        emu.sleep(h, 0.2)
        pending.append(aiocuda.synchronize(h))
    # One turn of the loop before the fork, so that it has polled: no registration (aiocuda's
    # first reader on this loop) is still queued in it. uvloop runs the rest of its loop
    # iteration in a child that unwinds through its copy of the running loop (--exit sys), and
    # libuv (1.45 on; uvloop 0.23 bundles 1.52) then submits the queued epoll changes through
    # the io_uring ring it shares with the parent, as the parent does: strace shows both
    # processes' io_uring_enter on the parent's ring fd, and CI once saw the parent die of
    # SIGABRT with no output. uvloop's hazard, not aiocuda's: docs/troubleshooting.md.
    await asyncio.sleep(0)
    return pending


async def check_pending(pending: list[asyncio.Future[Any]], rep: Report, where: str) -> None:
    try:
        await asyncio.wait_for(asyncio.gather(*pending), PARENT_TIMEOUT)
    except (Exception, asyncio.TimeoutError) as e:
        rep.r["parent_failures"] += 1
        rep.note(f"{where}: work pending in the parent at fork time did not complete: {e!r}")


def scenario_loop(kind: str, exit_mode: str, emu: Any, rep: Report, forks: int) -> None:
    """Fork from a coroutine on the main thread's loop, with cpu and cuda work pending."""
    async def main() -> None:
        h = emu.stream() if emu is not None else 0
        if h:
            await aiocuda.synchronize(h)  # the driver is initialised in the parent
        with aiocuda.CpuStream() as s:
            for i in range(forks):
                if rep.failed():
                    break
                pending = await pending_work(s, emu, h)
                pid, r = fork_here(kind, pending, exit_mode)
                await wait_child(pid, r, rep, exit_mode, in_thread=False)
                await check_pending(pending, rep, f"fork {i}")
                await parent_still_works(s, rep, f"after child {i}", h)

    loop = new_loop(kind)
    try:
        loop.run_until_complete(main())
    finally:
        close_if_ours(loop)


def scenario_thread(kind: str, exit_mode: str, emu: Any, rep: Report, forks: int) -> None:
    """A thread running its own loop forks; the main thread's loop has work pending meanwhile."""
    def thread_main() -> None:
        async def main() -> None:
            with aiocuda.CpuStream() as s:
                for i in range(forks):
                    if rep.failed():
                        break
                    pending = await pending_work(s, None, 0)
                    pid, r = fork_here(kind, pending, exit_mode)
                    await wait_child(pid, r, rep, exit_mode, in_thread=True)
                    await check_pending(pending, rep, f"thread fork {i}")
                    await parent_still_works(s, rep, f"thread loop after child {i}")

        loop = new_loop(kind)
        try:
            loop.run_until_complete(main())
        except Exception as e:
            rep.r["parent_failures"] += 1
            rep.note(f"the forking thread raised {e!r}")
        finally:
            close_if_ours(loop)

    async def main() -> None:
        with aiocuda.CpuStream() as s:
            pending = await pending_work(s, None, 0)
            t = threading.Thread(target=thread_main)
            t.start()
            end = time.monotonic() + forks * (CHILD_TIMEOUT + 3 * PARENT_TIMEOUT)
            while t.is_alive() and time.monotonic() < end:
                await asyncio.sleep(0.01)
            if t.is_alive():
                rep.r["parent_failures"] += 1
                rep.note("the forking thread never finished")
            await check_pending(pending, rep, "main loop")
            await parent_still_works(s, rep, "main loop after the children")

    loop = new_loop(kind)
    try:
        loop.run_until_complete(main())
    finally:
        close_if_ours(loop)


def scenario_churn(kind: str, exit_mode: str, emu: Any, rep: Report, forks: int) -> None:
    """Fork again and again from a loop while three threads create and close loops; the first
    fork is made while a thread holds aiocuda's loop-state lock (the child must not hang on it),
    every other even one after trying to catch a churning thread holding it."""
    stop = threading.Event()
    made = [0]

    def churner(tid: int) -> None:
        kinds = ["asyncio", "uvloop"]
        with aiocuda.CpuStream() as s:
            i = 0
            while not stop.is_set():
                async def use() -> None:
                    s.submit(int, 1)  # pending at close
                    await s.submit(int, 2)
                loop = new_loop(kinds[(i + tid) % 2])
                try:
                    loop.run_until_complete(use())
                finally:
                    loop.close()
                made[0] += 1
                i += 1

    threads = [threading.Thread(target=churner, args=(t,), daemon=True) for t in range(3)]
    for t in threads:
        t.start()

    async def main() -> None:
        with aiocuda.CpuStream() as s:
            for i in range(forks):
                if rep.failed():
                    break  # fail fast: one hung child is enough
                pending = await pending_work(s, None, 0)
                await asyncio.sleep(0.002 * (i % 5))  # fork at varied points of the churn
                holder = None
                if i == 0:  # forced: a thread holds the lock across this fork
                    holder = LockHolder()
                    rep.r["forks_forced_lock_held"] += 1
                elif i % 2 == 0:
                    catch_lock_held()  # by a churning thread, if it happens
                try:
                    pid, r = fork_here(kind, pending, exit_mode)
                finally:
                    if holder is not None:
                        holder.release()
                held = await wait_child(pid, r, rep, exit_mode, in_thread=False)
                if holder is not None and not held and not rep.failed():
                    rep.r["child_failures"] += 1
                    rep.note("the child of a fork made with the loop-state lock held found it free")
                await parent_still_works(s, rep, f"after child {i}")
                for f in pending:
                    f.cancel()  # not waiting 0.2 s a fork; cancelled awaits stay harmless

    loop = new_loop(kind)
    try:
        loop.run_until_complete(main())
    finally:
        if os.getpid() == PARENT:  # (a child unwinding with SystemExit: nothing of the parent's)
            loop.close()
            stop.set()
            for t in threads:
                t.join(10)
            if any(t.is_alive() for t in threads):
                rep.r["parent_failures"] += 1
                rep.note("a loop-churning thread hung")
    rep.r["loops_made_meanwhile"] = made[0]


class LockHolder:
    """A thread that holds aiocuda's loop-state lock from construction until release(), as a
    thread making a loop's queue does for a moment: a fork meanwhile leaves the lock held in the
    child, by a thread the child does not have. White-box on purpose, found by name."""

    def __init__(self) -> None:
        self.lock = _loop._states_lock
        self.taken, self.done = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)
        self.thread.start()
        if not self.taken.wait(5):
            raise RuntimeError("could not take aiocuda's loop-state lock in 5 s")

    def _hold(self) -> None:
        with self.lock:
            self.taken.set()
            self.done.wait(10)

    def release(self) -> None:
        self.done.set()
        self.thread.join(10)


def catch_lock_held(limit: float = 0.05) -> bool:
    """Return at a moment another thread holds aiocuda's loop-state lock (True), or after
    `limit` s (False). White-box on purpose: a fork at that moment is the one that can leave
    the lock held in the child; found by name, so a renamed lock only makes forks random."""
    lock = getattr(_loop, "_states_lock", None)
    if lock is None or not hasattr(lock, "acquire"):
        return False
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if not lock.acquire(blocking=False):
            return True  # held by a churning thread, which cannot run again before the fork
        lock.release()
        time.sleep(0)  # let the churning threads run
    return False


SCENARIOS = {"loop": scenario_loop, "thread": scenario_thread, "churn": scenario_churn}


def problems(r: dict[str, Any]) -> list[str]:
    checks = [
        (r["children"] == 0, "no child was forked"),
        (r["hung_children"], f"{r['hung_children']} children hung"),
        (r["child_failures"], f"{r['child_failures']} children failed their checks"),
        (r["bad_exit_status"], f"{r['bad_exit_status']} children exited with a wrong status"),
        (r["parent_failures"], f"{r['parent_failures']} parent checks failed"),
    ]
    out = [text for bad, text in checks if bad]
    if out and r["notes"]:
        out.append("notes: " + " | ".join(r["notes"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    p.add_argument("--exit", choices=["sys", "os"], required=True)
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--forks", type=int, default=None,
                   help="children to fork (default: 3, churn: AIOCUDA_STRESS_FORKS or 25)")
    p.add_argument("--no-cuda", action="store_true")
    a = p.parse_args()
    forks = a.forks or (env_int("AIOCUDA_STRESS_FORKS", 25) if a.scenario == "churn" else 3)
    emu = None
    if a.scenario == "loop" and not a.no_cuda:
        from tests.conftest import Emu  # noqa: PLC0415 (the emulator's ctypes controls)

        info = _core.cuda_info()
        assert info["available"], info["reason"]
        emu = Emu(__import__("pathlib").Path(os.environ["AIOCUDA_LIBCUDA"]))
    rep = Report(a.scenario, a.exit, a.loop)
    rep.r["forks"] = forks
    watchdog()  # inherited by the children
    SCENARIOS[a.scenario](a.loop, a.exit, emu, rep, forks)
    if os.getpid() != PARENT:  # a child that returned here instead of exiting
        os._exit(99)
    rep.r["problems"] = problems(rep.r)
    emit(rep.r)


if __name__ == "__main__":
    main()
