"""The driver emulator itself (tests/emu/emu.cpp), through ctypes, not through aiocuda.

Each rule the emulator models (see the comments in emu.cpp, which quote cuda.h) has a test here.
Almost every test runs in a fresh interpreter (`emu_run`): the emulator's state is per process,
and these tests abort, fork, set environment variables and reset contexts, which must not disturb
the emulator that aiocuda uses in-process in the other test modules.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from .conftest import EMU_PATH, python_subprocess
from .stress.common import ASAN_FORK, under_asan

pytestmark = pytest.mark.emu

if EMU_PATH is None:  # pragma: no cover - AIOCUDA_TEST_REAL_DRIVER=1
    pytest.skip("the real driver is loaded, not the emulator", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]

# cuda.h values
SUCCESS, INVALID_VALUE, NOT_INITIALIZED, NO_DEVICE = 0, 1, 3, 100
INVALID_CONTEXT, INVALID_HANDLE, ILLEGAL_STATE, NOT_FOUND, NOT_READY = 201, 400, 401, 500, 600
ILLEGAL_ADDRESS, CONTEXT_IS_DESTROYED, NOT_PERMITTED, NOT_SUPPORTED = 700, 709, 800, 801
HOST_MEMORY_ALREADY_REGISTERED, HOST_MEMORY_NOT_REGISTERED = 712, 713
DEVICEMAP, WAIT_GEQ, WAIT_FLUSH = 0x2, 0x0, 1 << 30
CAPTURE_UNSUPPORTED, CAPTURE_INVALIDATED, CAPTURE_UNMATCHED, CAPTURE_UNJOINED = 900, 901, 903, 904
CAPTURE_ISOLATION, CAPTURE_IMPLICIT, CAPTURED_EVENT, CAPTURE_WRONG_THREAD = 905, 906, 907, 908
GLOBAL, THREAD_LOCAL, RELAXED = 0, 1, 2

PRELUDE = f"""
import ctypes, json, os, sys, threading, time
sys.path.insert(0, {str(ROOT)!r})
from tests.emu.build import HOST_FN, load_emulator
lib = load_emulator({str(EMU_PATH)!r})
byref, P = ctypes.byref, ctypes.c_void_p

def ok(rc, want=0):
    assert rc == want, f"got {{rc}}, want {{want}}"

def retain(dev=0):
    c = P(); ok(lib.cuDevicePrimaryCtxRetain(byref(c), dev)); return c.value

def push(ctx): ok(lib.cuCtxPushCurrent_v2(ctx))
def pop(): ok(lib.cuCtxPopCurrent_v2(None))

def stream(ctx, flags=0):
    push(ctx); s = P(); ok(lib.cuStreamCreate(byref(s), flags)); pop(); return s.value

def event(ctx, flags=0):
    push(ctx); e = P(); ok(lib.cuEventCreate(byref(e), flags)); pop(); return e.value

def ctx_id(ctx):
    i = ctypes.c_ulonglong(); ok(lib.cuCtxGetId(ctx, byref(i))); return i.value

def capturing(s):
    st = ctypes.c_int(-1); rc = lib.cuStreamIsCapturing(s, byref(st)); return rc, st.value

def end_capture(s):
    g = P(); rc = lib.cuStreamEndCapture(s, byref(g)); return rc, g.value

def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn())); t.start(); t.join(); return out[0]

def timed(fn, *args):
    t0 = time.monotonic(); rc = fn(*args); return rc, time.monotonic() - t0

def sleep(s, seconds): return lib.emu_enqueue_sleep(s, int(seconds * 1e6))

def out(**kw): print(json.dumps(kw), flush=True)

def until(pred, timeout=5.0):  # wait for pred() (checked by the caller's asserts), 5 s at most
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.002)
"""


def emu_run(body: str, env: dict[str, str] | None = None, init: bool = True) -> Any:
    """Run `body` after PRELUDE in a fresh interpreter; return what it passed to out()."""
    code = PRELUDE + ("ok(lib.cuInit(0))\n" if init else "") + textwrap.dedent(body.lstrip("\n"))
    r = python_subprocess(code, env)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def emu_abort(body: str) -> tuple[Any, str]:
    """Run `body`, which must end in an abort(); return what it passed to out() and stderr."""
    # (an abort on purpose: not one for scripts/test to report)
    r = python_subprocess(PRELUDE + "ok(lib.cuInit(0))\n" + textwrap.dedent(body),
                          {"AIOCUDA_EMU_ABORT_LOG": ""})
    assert r.returncode == -6, (r.returncode, r.stdout, r.stderr)  # SIGABRT
    lines = r.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines else None), r.stderr


# Rule 13: cuInit ----------------------------------------------------------------------------------
def test_cuinit_flags_and_calls_before_cuinit():
    res = emu_run(
        """
        n = ctypes.c_int(); v = ctypes.c_int()
        before = lib.cuDeviceGetCount(byref(n))
        version = lib.cuDriverGetVersion(byref(v))       # needs no cuInit
        bad_flags = lib.cuInit(1)
        ok(lib.cuInit(0)); ok(lib.cuDeviceGetCount(byref(n)))
        out(before=before, version=version, v=v.value, bad_flags=bad_flags, n=n.value)
        """,
        init=False,
    )
    assert res == {"before": NOT_INITIALIZED, "version": 0, "v": 13000, "bad_flags": INVALID_VALUE,
                   "n": 2}
    assert emu_run("out(rc=lib.cuInit(0))", {"AIOCUDA_EMU_DEVICES": "0"}, init=False) == {"rc": NO_DEVICE}
    assert emu_run("out(rc=lib.cuInit(0))", {"AIOCUDA_EMU_INIT_ERROR": "999"}, init=False) == {"rc": 999}


# Rule 1: devices, primary contexts, the per-thread context stack, context ids ------------------------
def test_devices_contexts_and_the_context_stack():
    res = emu_run(
        """
        c0, c1 = retain(0), retain(1)
        flags, active = ctypes.c_uint(), ctypes.c_int()
        ok(lib.cuDevicePrimaryCtxGetState(0, byref(flags), byref(active)))
        private = lib.emu_make_private_context()
        cur = P(1); ok(lib.cuCtxGetCurrent(byref(cur))); first = cur.value
        no_ctx = lib.cuStreamCreate(byref(P()), 0)
        push(c0); push(c1)
        dev = ctypes.c_int(); ok(lib.cuCtxGetDevice(byref(dev)))
        popped = P(); ok(lib.cuCtxPopCurrent_v2(byref(popped)))
        ok(lib.cuCtxGetCurrent(byref(cur))); after_pop = cur.value
        ok(lib.cuCtxSetCurrent(c1)); ok(lib.cuCtxGetCurrent(byref(cur))); replaced = cur.value
        ok(lib.cuCtxSetCurrent(None)); ok(lib.cuCtxGetCurrent(byref(cur))); emptied = cur.value
        empty_pop = lib.cuCtxPopCurrent_v2(None)
        ids = [ctx_id(c0), ctx_id(c1), ctx_id(private)]
        ok(lib.cuDevicePrimaryCtxRelease_v2(0))       # the last retain: reset, inactive
        ok(lib.cuDevicePrimaryCtxGetState(0, byref(flags), byref(active)))
        push(c0); destroyed = lib.cuStreamCreate(byref(P()), 0); pop()
        out(distinct=c0 != c1 != private, active=active.value, first=first, no_ctx=no_ctx,
            dev=dev.value, popped=popped.value == c1, after_pop=after_pop == c0,
            replaced=replaced == c1, emptied=emptied, empty_pop=empty_pop,
            unique_ids=len(set(ids)) == 3, destroyed=destroyed,
            over_release=lib.cuDevicePrimaryCtxRelease_v2(0))
        """
    )
    assert res == {"distinct": True, "active": 0, "first": None, "no_ctx": INVALID_CONTEXT, "dev": 1,
                   "popped": True, "after_pop": True, "replaced": True, "emptied": None,
                   "empty_pop": INVALID_CONTEXT, "unique_ids": True, "destroyed": CONTEXT_IS_DESTROYED,
                   "over_release": INVALID_CONTEXT}


# Rule 2: streams run in order; the legacy stream synchronizes with blocking streams ---------------
def test_legacy_stream_implicit_synchronization():
    res = emu_run(
        WORD
        + textwrap.dedent("""        ok(register()); _, d = dptr()
        blocking, nonblocking = stream(c), stream(c, 1)
        ok(sleep(blocking, 0.2))
        ok(lib.cuStreamWaitValue32_v2(nonblocking, d, 1, 0))  # held until the host writes 1
        guard = threading.Timer(5, buf.__setitem__, (0, 1)); guard.start()  # never a hang
        ev = event(c); ok(lib.cuEventRecord(ev, 0))          # legacy: waits for `blocking` only
        early = lib.cuEventQuery(ev)
        rc, legacy_wait = timed(lib.cuEventSynchronize, ev)
        after = [lib.cuStreamQuery(blocking), lib.cuStreamQuery(nonblocking)]
        ok(sleep(1, 0.2)); ev2 = event(c); ok(lib.cuEventRecord(ev2, blocking))  # the reverse
        rc2, blocking_wait = timed(lib.cuEventSynchronize, ev2)
        nb_busy = lib.cuStreamQuery(nonblocking)
        guard.cancel(); buf[0] = 1
        ok(lib.cuStreamSynchronize(nonblocking)); ok(lib.cuMemHostUnregister(host))
        out(early=early, rc=rc, rc2=rc2, legacy_wait=legacy_wait, after=after,
            blocking_wait=blocking_wait, nb_busy=nb_busy, kernels=lib.emu_stream_ops(0, b"kernel"),
            records=lib.emu_stream_ops(0, b"record"))
        """)
    )
    assert res["early"] == NOT_READY and res["rc"] == res["rc2"] == SUCCESS
    # The legacy record waited for the blocking stream (0.2 s of work; a loaded machine only
    # makes it longer) and not for the non-blocking one, which is held until the end.
    assert res["legacy_wait"] > 0.15
    assert res["after"] == [SUCCESS, NOT_READY]
    assert res["blocking_wait"] > 0.15
    assert res["nb_busy"] == NOT_READY
    assert res["kernels"] == 1 and res["records"] == 1


# Rule 3: bounded queues block the caller; blocked time is counted per thread ---------------------
def test_a_full_stream_queue_blocks_the_caller():
    res = emu_run(
        """
        lib.emu_set_queue_depth(2)
        c = retain(0); s = stream(c); ev = event(c)
        ok(sleep(s, 0.15)); ok(sleep(s, 0.15))                # one running, one queued: full
        b0 = lib.emu_thread_blocked_ns()
        rc, kernel_wait = timed(lib.cuEventRecord, ev, s)     # room after the first kernel
        rc2, record_wait = timed(sleep, s, 0.01)
        blocked = (lib.emu_thread_blocked_ns() - b0) / 1e9
        other = in_thread(lib.emu_thread_blocked_ns)
        lib.emu_defaults(); ok(sleep(s, 0)); ok(sleep(s, 0)); ok(sleep(s, 0))
        out(rc=rc, rc2=rc2, kernel_wait=kernel_wait, record_wait=record_wait, blocked=blocked,
            other=other)
        """
    )
    assert res["rc"] == res["rc2"] == SUCCESS
    assert res["kernel_wait"] > 0.12 and res["record_wait"] > 0.12
    assert res["blocked"] >= res["kernel_wait"] + res["record_wait"] - 0.02
    assert res["other"] == 0


def test_the_host_function_cap_blocks_cu_launch_host_func():
    res = emu_run(
        """
        lib.emu_set_hostfn_cap(1)
        c = retain(0); a, b = stream(c), stream(c)
        noop = HOST_FN(lambda _: None)
        ok(sleep(a, 0.2)); ok(lib.cuLaunchHostFunc(a, noop, None))
        pending = lib.emu_live(b"hostfns_pending")
        b0 = lib.emu_thread_blocked_ns()
        rc, wait = timed(lib.cuLaunchHostFunc, b, noop, None)   # until a's function returned
        blocked = (lib.emu_thread_blocked_ns() - b0) / 1e9
        ok(lib.cuStreamSynchronize(b))
        out(pending=pending, rc=rc, wait=wait, blocked=blocked,
            calls=lib.emu_thread_calls(b"cuLaunchHostFunc"), after=lib.emu_live(b"hostfns_pending"))
        """
    )
    assert res["pending"] == 1 and res["rc"] == SUCCESS
    assert res["wait"] > 0.15 and res["blocked"] > 0.15
    assert res["calls"] == 2 and res["after"] == 0


def test_the_host_function_cap_blocks_a_context_wide_record_too():
    # The rule holds every enqueue of the context, cuCtxRecordEvent's (one item on each stream) too.
    res = emu_run(
        """
        lib.emu_set_hostfn_cap(1)
        c = retain(0); a = stream(c); e = event(c)
        noop = HOST_FN(lambda _: None)
        ok(sleep(a, 0.2)); ok(lib.cuLaunchHostFunc(a, noop, None))
        rc, wait = timed(lib.cuCtxRecordEvent, c, e)   # until a's function returned
        ok(lib.cuEventSynchronize(e))
        out(rc=rc, wait=wait)
        """
    )
    assert res["rc"] == SUCCESS and res["wait"] > 0.15


# Rule 4: one callback thread per context, stream order, latency, blocking later work ----------------
def test_host_functions_share_one_thread_per_context_and_block_their_stream():
    res = emu_run(
        """
        lib.emu_set_hostfn_latency_us(50_000)
        c0, c1 = retain(0), retain(1)
        a, b, d1 = stream(c0), stream(c0), stream(c1)
        seen = []
        def cb(arg):
            seen.append((arg, threading.get_ident(), time.monotonic()))
            seen.append(("driver call", lib.cuCtxGetCurrent(byref(P()))))
            if arg == 1:
                time.sleep(0.1)
        fn = HOST_FN(cb)
        def host_fn_stats():
            v = [ctypes.c_ulonglong() for _ in range(3)]
            lib.emu_host_fn_stats(*map(byref, v)); return [x.value for x in v]
        t0 = time.monotonic()
        ok(sleep(a, 0.1)); ok(lib.cuLaunchHostFunc(a, fn, 1))
        ev = event(c0); ok(lib.cuEventRecord(ev, a))          # blocked by host function 1
        ok(lib.cuLaunchHostFunc(b, fn, 2))                     # b reaches its function first
        ok(lib.cuLaunchHostFunc(d1, fn, 3))                    # another context, another thread
        ok(lib.cuEventSynchronize(ev)); t_ev = time.monotonic()
        ok(lib.cuStreamSynchronize(d1))
        calls = {a: (t, tid) for a, tid, t in (x for x in seen if len(x) == 3)}
        out(order=[x[0] for x in seen if len(x) == 3 and x[0] != 3],
            driver_calls=[x[1] for x in seen if len(x) == 2],
            same_thread=calls[1][1] == calls[2][1], main=calls[1][1] == threading.get_ident(),
            other_ctx_thread=calls[3][1] != calls[1][1],
            latency=calls[2][0] - t0, ev_after_fn=t_ev - calls[1][0],
            from_host_fns=lib.emu_calls_from_host_fns(), stats=host_fn_stats())
        """
    )
    assert res["order"] == [2, 1]
    assert res["driver_calls"] == [NOT_PERMITTED] * 3 and res["from_host_fns"] == 3
    assert res["same_thread"] and not res["main"] and res["other_ctx_thread"]
    assert res["latency"] >= 0.045
    assert res["ev_after_fn"] >= 0.095  # the record waited for the function to return
    calls, total_ns, max_ns = res["stats"]
    assert calls == 3 and max_ns >= 0.09e9 and total_ns >= max_ns


# Rule 5: invalid or destroyed handles abort --------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("lib.cuEventQuery(0xdead0)", "cuEventQuery: event 0xdead0 is not a valid/live handle"),
        ("s = stream(retain(0)); ok(lib.cuStreamDestroy_v2(s)); out(x=1); lib.cuStreamQuery(s)",
         "cuStreamQuery: stream 0x"),
        ("c = retain(0); s = stream(c); e = event(c); ok(lib.cuEventDestroy_v2(e)); out(x=1);"
         " lib.cuEventRecord(e, s)", "cuEventRecord: event 0x"),
        ("lib.cuCtxSetCurrent(0x1234)", "cuCtxSetCurrent: context 0x1234 is not"),
        ("sleep(0xbeef0, 1)", "emu_enqueue_sleep: stream 0xbeef0"),
        ("c = retain(0); push(c); s = stream(c); buf = (ctypes.c_uint32 * 1024)();"
         " ok(lib.cuMemHostRegister_v2(buf, 4096, 2)); d = ctypes.c_ulonglong();"
         " ok(lib.cuMemHostGetDevicePointer_v2(byref(d), buf, 0));"
         " ok(lib.cuStreamWaitValue32_v2(s, d.value, 1, 0)); out(x=1); lib.cuMemHostUnregister(buf)",
         "cuMemHostUnregister: host range 0x"),
    ],
)
def test_an_invalid_or_destroyed_handle_aborts(body, message):
    _, err = emu_abort(body)
    assert message in err
    assert "(undefined behaviour in the CUDA driver)" in err


def test_destroying_a_pending_event_or_a_busy_stream_is_fine():
    res = emu_run(
        """
        c = retain(0); s = stream(c); e = event(c); e2 = event(c)
        ok(sleep(s, 0.15)); ok(lib.cuEventRecord(e, s)); ok(lib.cuEventRecord(e2, s))
        destroy_event = lib.cuEventDestroy_v2(e)              # pending: released at completion
        destroy_stream = lib.cuStreamDestroy_v2(s)             # work still completes
        streams = lib.emu_live(b"streams")
        rc, wait = timed(lib.cuEventSynchronize, e2)
        t_end = time.monotonic() + 2
        while lib.emu_live(b"emu_threads") > 0 and time.monotonic() < t_end:
            time.sleep(0.01)                                  # the worker exits once drained
        out(destroy_event=destroy_event, destroy_stream=destroy_stream, streams=streams, rc=rc,
            wait=wait, events=lib.emu_live(b"events"), workers=lib.emu_live(b"emu_threads"))
        """
    )
    assert res["destroy_event"] == res["destroy_stream"] == res["rc"] == SUCCESS
    assert res["streams"] == 0 and res["events"] == 1 and res["wait"] > 0.1
    assert res["workers"] == 0


# Rule 6: sticky errors per context ----------------------------------------------------------------
def test_a_sticky_error_fails_its_context_only():
    res = emu_run(
        """
        c0, c1 = retain(0), retain(1)
        s0, s1 = stream(c0), stream(c1)
        called = []
        fn = HOST_FN(lambda _: called.append(1))
        ok(sleep(s0, 5)); ok(lib.cuLaunchHostFunc(s0, fn, None)); e0 = event(c0)
        ok(lib.cuEventRecord(e0, s0))
        ok(sleep(s1, 0.1)); e1 = event(c1); ok(lib.cuEventRecord(e1, s1))
        lib.emu_inject_error(0, 700)
        sync0, t = timed(lib.cuStreamSynchronize, s0)
        r = dict(sync0=sync0, fast=t < 0.5, query=lib.cuEventQuery(e0),
                 esync=lib.cuEventSynchronize(e0), squery=lib.cuStreamQuery(s0),
                 kernel=sleep(s0, 0.1), hostfn=lib.cuLaunchHostFunc(s0, fn, None),
                 record=lib.cuEventRecord(e0, s0), getctx=lib.cuStreamGetCtx(s0, byref(P())))
        push(c0)
        r.update(create=lib.cuStreamCreate(byref(P()), 0), ctxsync=lib.cuCtxSynchronize(),
                 other_dev_event=lib.cuEventQuery(e1))            # c0 is current: faulted
        pop()
        r.update(dev1_event=lib.cuEventSynchronize(e1), dev1_stream=lib.cuStreamSynchronize(s1))
        until(lambda: lib.emu_live(b"hostfns_pending") == 0)   # dropped, never called
        r.update(called=len(called), pending=lib.emu_live(b"hostfns_pending"))
        ok(lib.cuDevicePrimaryCtxReset_v2(0))                     # the only way back,
        retain(0)                                                 # then a retain to use it
        s = stream(c0); ok(sleep(s, 0.01))
        r.update(recovered=lib.cuStreamSynchronize(s))
        out(**r)
        """
    )
    assert res == {"sync0": ILLEGAL_ADDRESS, "fast": True, "query": 700, "esync": 700, "squery": 700,
                   "kernel": 700, "hostfn": 700, "record": 700, "getctx": 700, "create": 700,
                   "ctxsync": 700, "other_dev_event": 700, "dev1_event": 0, "dev1_stream": 0,
                   "called": 0, "pending": 0, "recovered": 0}


# Rule 7: a primary-context reset destroys handles; same CUcontext, new id --------------------------
def test_a_reset_destroys_streams_and_events_and_changes_the_context_id():
    res, err = emu_abort(
        """
        c = retain(0); id0 = ctx_id(c)
        s = stream(c); e = event(c); called = []
        fn = HOST_FN(lambda _: called.append(1))
        ok(sleep(s, 5)); ok(lib.cuLaunchHostFunc(s, fn, None)); ok(lib.cuEventRecord(e, s))
        streams_before = lib.emu_live(b"streams")
        ok(lib.cuDevicePrimaryCtxReset_v2(0))
        flags, active = ctypes.c_uint(), ctypes.c_int()
        ok(lib.cuDevicePrimaryCtxGetState(0, byref(flags), byref(active)))
        until(lambda: lib.emu_live(b"hostfns_pending") == 0)   # dropped, never called
        inactive_use = lib.cuStreamSynchronize(0) if push(c) is None else None
        pop()
        out(inactive_use=inactive_use, same_handle=retain(0) == c, new_id=ctx_id(c) != id0,
            active=active.value,
            streams_before=streams_before, streams=lib.emu_live(b"streams"),
            events=lib.emu_live(b"events"), pending=lib.emu_live(b"hostfns_pending"),
            called=len(called), fresh=lib.cuStreamSynchronize(stream(c)))
        lib.cuEventQuery(e)                                    # destroyed by the reset: aborts
        """
    )
    # inactive until retained again: a reset "destroys" the context and does not release it
    assert res == {"inactive_use": 709, "same_handle": True, "new_id": True, "active": 0,
                   "streams_before": 1,
                   "streams": 0, "events": 0, "pending": 0, "called": 0, "fresh": 0}
    assert "cuEventQuery: event 0x" in err


# Rule 8: stream capture ----------------------------------------------------------------------------
def test_work_on_a_capturing_stream_is_recorded_not_run():
    res = emu_run(
        """
        c = retain(0); s = stream(c); e = event(c); called = []
        fn = HOST_FN(lambda _: called.append(1))
        r = dict(legacy=lib.cuStreamBeginCapture_v2(0, 0) if push(c) is None else None)
        pop()
        ok(lib.cuStreamBeginCapture_v2(s, 0))
        st, cid = ctypes.c_int(), ctypes.c_ulonglong()
        ok(lib.cuStreamGetCaptureInfo_v3(s, byref(st), byref(cid), None, None, None, None))
        r.update(twice=lib.cuStreamBeginCapture_v2(s, 0), capturing=capturing(s), id=cid.value > 0,
                 kernel=sleep(s, 5), hostfn=lib.cuLaunchHostFunc(s, fn, None),
                 record=lib.cuEventRecord(e, s), captured=lib.emu_stream_ops(s, b"captured"),
                 kernels=lib.emu_stream_ops(s, b"kernel"))
        rc, graph = end_capture(s)
        r.update(end=rc, graph=graph is not None, graphs=lib.emu_live(b"graphs"),
                 destroy=lib.cuGraphDestroy(graph), after=capturing(s),
                 end_again=end_capture(s)[0])
        rc, t = timed(lib.cuStreamSynchronize, s)
        r.update(sync=rc, nothing_ran=t < 0.1, called=len(called),
                 captured_event=lib.cuEventQuery(e))            # last recorded inside a capture
        ok(lib.cuStreamBeginCapture_v2(s, 0)); ok(lib.cuEventRecord(e, s))
        r.update(prohibited=lib.cuEventQuery(e), end_global=end_capture(s)[0])
        ok(lib.cuStreamBeginCapture_v2(s, 2)); ok(lib.cuEventRecord(e, s))   # relaxed: not prohibited
        r.update(query_in_capture=lib.cuEventQuery(e), status=capturing(s), end2=end_capture(s))
        out(**r)
        """
    )
    assert res == {"legacy": CAPTURE_UNSUPPORTED, "twice": ILLEGAL_STATE, "capturing": [0, 1],
                   "id": True, "kernel": 0, "hostfn": 0, "record": 0, "captured": 3, "kernels": 1,
                   "end": 0, "graph": True, "graphs": 1, "destroy": 0, "after": [0, 0],
                   "end_again": ILLEGAL_STATE, "sync": 0, "nothing_ran": True, "called": 0,
                   "captured_event": CAPTURED_EVENT, "prohibited": CAPTURE_UNSUPPORTED,
                   "end_global": CAPTURE_INVALIDATED, "query_in_capture": CAPTURED_EVENT,
                   "status": [0, 2], "end2": [CAPTURE_INVALIDATED, None]}


def test_an_unsafe_call_from_another_thread_invalidates_a_global_capture():
    res = emu_run(
        """
        c = retain(0); s, other = stream(c), stream(c); e = event(c)
        ok(lib.cuEventRecord(e, other))                        # an ordinary, uncaptured event
        ok(lib.cuStreamBeginCapture_v2(s, 0))                  # GLOBAL
        def watchdog():                                        # pytorch#104555's NCCL watchdog
            return lib.cuEventQuery(e)
        r = dict(query=in_thread(watchdog), status=capturing(s), kernel=sleep(s, 0.01),
                 end=end_capture(s))
        out(**r)
        """
    )
    assert res == {"query": CAPTURE_UNSUPPORTED, "status": [0, 2], "kernel": CAPTURE_INVALIDATED,
                   "end": [CAPTURE_INVALIDATED, None]}


def test_capture_modes_thread_local_and_relaxed():
    res = emu_run(
        """
        c = retain(0); s, other = stream(c), stream(c); e = event(c)
        ok(lib.cuEventRecord(e, other)); ok(lib.cuEventSynchronize(e))   # complete: queries say 0
        def in_mode(mode, fn, *args):
            def body():
                m = ctypes.c_int(mode); ok(lib.cuThreadExchangeStreamCaptureMode(byref(m)))
                rc = fn(*args)
                ok(lib.cuThreadExchangeStreamCaptureMode(byref(m)))
                return rc, m.value
            return in_thread(body)
        r = {}
        # A GLOBAL capture: another thread in THREAD_LOCAL or RELAXED mode may query.
        ok(lib.cuStreamBeginCapture_v2(s, 0))
        r["thread_local"] = in_mode(1, lib.cuEventQuery, e)
        r["relaxed"] = in_mode(2, lib.cuStreamQuery, other)
        r["wrong_thread"] = in_thread(lambda: end_capture(s))
        r["still"] = capturing(s)
        r["end"] = end_capture(s)[0]
        # A THREAD_LOCAL capture: other threads in GLOBAL mode are not prohibited, its own thread is.
        ok(lib.cuStreamBeginCapture_v2(s, 1))
        r["other_global"] = in_thread(lambda: lib.cuEventQuery(e))
        r["own_thread"] = lib.cuEventQuery(e)
        r["end_tl"] = end_capture(s)
        # A RELAXED capture: its own thread may make unsafe calls, may end it elsewhere, but may
        # not query the capturing stream itself.
        ok(lib.cuStreamBeginCapture_v2(s, 2))
        r["relaxed_own"] = lib.cuStreamQuery(other)
        r["ended_elsewhere"] = in_thread(lambda: end_capture(s)[0])
        ok(lib.cuStreamBeginCapture_v2(s, 2))
        r["itself"] = lib.cuStreamSynchronize(s)
        r["end_relaxed"] = end_capture(s)
        out(**r)
        """
    )
    assert res == {"thread_local": [0, THREAD_LOCAL], "relaxed": [0, RELAXED],
                   "wrong_thread": [CAPTURE_WRONG_THREAD, None], "still": [0, 1], "end": 0,
                   "other_global": 0, "own_thread": CAPTURE_UNSUPPORTED,
                   "end_tl": [CAPTURE_INVALIDATED, None], "relaxed_own": 0, "ended_elsewhere": 0,
                   "itself": CAPTURE_UNSUPPORTED, "end_relaxed": [CAPTURE_INVALIDATED, None]}


def test_host_registration_is_a_potentially_unsafe_call_during_a_capture():
    # vllm#46933: cudaHostRegister during a capture returned cudaErrorStreamCaptureUnsupported and
    # broke the capture. Relaxed mode on the capturing thread allows it (cuda.h: "The local
    # thread is not prohibited from potentially unsafe API calls").
    res = emu_run(
        """
        c = retain(0); s = stream(c); ok(lib.cuCtxSetCurrent(c))
        page = ctypes.create_string_buffer(8192)
        base = (ctypes.addressof(page) + 4095) // 4096 * 4096
        ok(lib.cuStreamBeginCapture_v2(s, 0))
        r = {"global": lib.cuMemHostRegister_v2(ctypes.c_void_p(base), 4096, 2),
             "end": end_capture(s)[0]}
        ok(lib.cuStreamBeginCapture_v2(s, 0))
        m = ctypes.c_int(2); ok(lib.cuThreadExchangeStreamCaptureMode(byref(m)))
        r["relaxed"] = lib.cuMemHostRegister_v2(ctypes.c_void_p(base), 4096, 2)
        r["unregister"] = lib.cuMemHostUnregister(ctypes.c_void_p(base))
        ok(lib.cuThreadExchangeStreamCaptureMode(byref(m)))
        r["end_relaxed"] = end_capture(s)[0]
        out(**r)
        """
    )
    assert res == {"global": CAPTURE_UNSUPPORTED, "end": CAPTURE_INVALIDATED, "relaxed": 0,
                   "unregister": 0, "end_relaxed": 0}


def test_the_legacy_stream_while_a_blocking_stream_captures():
    res = emu_run(
        """
        c = retain(0); push(c); s, nb = stream(c), stream(c, 1)
        ok(lib.cuStreamBeginCapture_v2(nb, 0))
        r = dict(nonblocking=sleep(0, 0.001)); end_capture(nb)
        ok(lib.cuStreamBeginCapture_v2(s, 2))                  # even a relaxed capture
        r.update(is_capturing=capturing(0)[0], still=capturing(s), kernel=sleep(0, 0.001),
                 after=capturing(s), end=end_capture(s)[0])
        out(**r)
        """
    )
    assert res == {"nonblocking": 0, "is_capturing": CAPTURE_IMPLICIT, "still": [0, 1],
                   "kernel": CAPTURE_IMPLICIT, "after": [0, 2], "end": CAPTURE_INVALIDATED}


def test_ctx_record_event_during_a_capture():
    res = emu_run(
        """
        c = retain(0); s = stream(c); e = event(c)
        ok(lib.cuStreamBeginCapture_v2(s, 2))
        out(rc=lib.cuCtxRecordEvent(c, e), status=capturing(s)[1], end=end_capture(s)[0])
        """
    )
    assert res == {"rc": CAPTURE_UNSUPPORTED, "status": 2, "end": CAPTURE_INVALIDATED}


def test_capture_fork_join_and_isolation():
    res = emu_run(
        """
        c = retain(0); s, side = stream(c), stream(c); fork, join, plain = event(c), event(c), event(c)
        ok(lib.cuEventRecord(plain, side))
        r = {}
        ok(lib.cuStreamBeginCapture_v2(s, 0)); ok(lib.cuEventRecord(fork, s))
        ok(lib.cuStreamWaitEvent(side, fork, 0))               # side joins the capture
        r["side"] = capturing(side); ok(sleep(side, 1))
        r["unjoined"] = end_capture(s); r["side_after"] = capturing(side)
        ok(lib.cuStreamBeginCapture_v2(s, 0)); ok(lib.cuEventRecord(fork, s))
        ok(lib.cuStreamWaitEvent(side, fork, 0)); ok(sleep(side, 1))
        ok(lib.cuEventRecord(join, side)); ok(lib.cuStreamWaitEvent(s, join, 0))
        rc, g = end_capture(s); r["joined"] = rc; ok(lib.cuGraphDestroy(g))
        ok(lib.cuStreamBeginCapture_v2(s, 0))
        r["isolation"] = lib.cuStreamWaitEvent(s, plain, 0); r["iso_end"] = end_capture(s)[0]
        ok(lib.cuStreamBeginCapture_v2(s, 0))
        r["external"] = lib.cuStreamWaitEvent(s, plain, 1); r["ext_end"] = end_capture(s)[0] == 0
        rc, t = timed(lib.cuStreamSynchronize, side); r["ran_nothing"] = [rc, t < 0.5]
        out(**r)
        """
    )
    assert res == {"side": [0, 1], "unjoined": [CAPTURE_UNJOINED, None], "side_after": [0, 0],
                   "joined": 0, "isolation": CAPTURE_ISOLATION, "iso_end": CAPTURE_INVALIDATED,
                   "external": 0, "ext_end": True, "ran_nothing": [0, True]}


# Rule 9: cuCtxRecordEvent ---------------------------------------------------------------------------
def test_ctx_record_event_covers_every_stream_of_the_context():
    res = emu_run(
        WORD
        + textwrap.dedent("""        c0, c1 = retain(0), retain(1); push(c0)
        a, b, nb = stream(c0), stream(c0), stream(c0, 1)
        ok(sleep(a, 0.1)); ok(sleep(nb, 0.25)); ok(sleep(0, 0.05))
        e = event(c0); e1 = event(c1)
        ok(lib.cuCtxRecordEvent(c0, e))
        ok(register()); _, d = dptr()                           # later work is not included:
        ok(lib.cuStreamWaitValue32_v2(b, d, 1, 0)); ok(lib.cuStreamWaitValue32_v2(a, d, 1, 0))
        guard = threading.Timer(5, buf.__setitem__, (0, 1)); guard.start()  # never a hang
        r = dict(early=lib.cuEventQuery(e), other_ctx=lib.cuCtxRecordEvent(c0, e1),
                 ops=[lib.emu_stream_ops(x, b"ctxrecord") for x in (a, b, nb, 0)])
        rc, t = timed(lib.cuEventSynchronize, e)
        r.update(rc=rc, t=t, later=[lib.cuStreamQuery(a), lib.cuStreamQuery(b)])
        guard.cancel(); buf[0] = 1; ok(lib.cuCtxSynchronize()); ok(lib.cuMemHostUnregister(host))
        out(**r)
        """)
    )
    assert res["early"] == NOT_READY and res["other_ctx"] == INVALID_HANDLE and res["rc"] == 0
    assert res["ops"] == [1, 1, 1, 1]
    assert res["t"] > 0.2  # the 0.25 s of the non-blocking stream; not the work held after it
    assert res["later"] == [NOT_READY, NOT_READY]


# Rule 10: synchronize calls spin unless told to block -----------------------------------------------
def test_synchronize_spins_unless_blocking_sync():
    res = emu_run(
        """
        c = retain(0); push(c); s = stream(c)
        def busy_ns():  # this thread's time on a CPU, or runnable and waiting for one
            try:
                with open("/proc/thread-self/schedstat") as f:
                    ran, waited = f.read().split()[:2]
                return int(ran) + int(waited)
            except OSError:  # no scheduler statistics: CPU time only
                return time.thread_time_ns()
        def busy_share(fn, *args):  # shares of the wall time this thread was awake, and on a CPU
            b0, c0, t0 = busy_ns(), time.thread_time_ns(), time.monotonic()
            ok(fn(*args))
            wall = (time.monotonic() - t0) * 1e9
            return [(busy_ns() - b0) / wall, (time.thread_time_ns() - c0) / wall]
        def on_event(flags):
            e = event(c, flags); ok(sleep(s, 0.2)); ok(lib.cuEventRecord(e, s))
            return busy_share(lib.cuEventSynchronize, e)
        ok(sleep(s, 0.2)); r = dict(ctx_spin=busy_share(lib.cuCtxSynchronize))
        ok(sleep(s, 0.2)); r.update(stream_spin=busy_share(lib.cuStreamSynchronize, s))
        r.update(event_spin=on_event(0), event_block=on_event(1))
        ok(lib.cuDevicePrimaryCtxSetFlags_v2(0, 4))             # CU_CTX_SCHED_BLOCKING_SYNC
        flags, active = ctypes.c_uint(), ctypes.c_int()
        ok(lib.cuDevicePrimaryCtxGetState(0, byref(flags), byref(active)))
        ok(sleep(s, 0.2)); r.update(ctx_block=busy_share(lib.cuCtxSynchronize))
        r.update(flags=flags.value, bad_flags=lib.cuDevicePrimaryCtxSetFlags_v2(0, 4 | 1),
                 schedstat=os.path.exists("/proc/thread-self/schedstat"))
        ok(sleep(s, 0)); ok(lib.cuStreamSynchronize(s))
        r["never_recorded"] = lib.cuEventQuery(event(c))
        out(**r)
        """
    )
    # Shares of the waiting call's wall time: a spinning wait never sleeps, so its thread is
    # running or ready to run all the time, whatever else the machine runs (a loaded core makes
    # it wait for the CPU, not sleep); a blocking one sleeps, so it uses little CPU time (it may
    # wait for a CPU each time it wakes on a loaded machine). Without scheduler statistics, CPU
    # time only: a loaded 2-core machine may not give a spinning wait all of a core.
    spin = 0.9 if res["schedstat"] else 0.3
    assert min(res[k][0] for k in ("ctx_spin", "stream_spin", "event_spin")) > spin, res
    assert res["event_block"][1] < 0.1 and res["ctx_block"][1] < 0.1, res
    assert res["flags"] == 4 and res["bad_flags"] == INVALID_VALUE
    assert res["never_recorded"] == SUCCESS


# Rule 11: event records ---------------------------------------------------------------------------
def test_event_record_rules():
    res = emu_run(
        """
        c0, c1 = retain(0), retain(1)
        s0, t0_, s1 = stream(c0), stream(c0), stream(c1)
        e0, e1 = event(c0), event(c1)
        r = dict(cross=lib.cuEventRecord(e1, s0))              # event and stream of other contexts
        ok(sleep(s0, 0.6)); ok(lib.cuEventRecord(e0, s0))
        ok(lib.cuStreamWaitEvent(s1, e0, 0))                    # may name another device's event
        ok(lib.cuEventRecord(e0, t0_))                          # overwrites: now refers to t0_
        ok(lib.cuEventRecord(e1, s1))                           # after the cross-device wait
        rc0, t_rerecorded = timed(lib.cuEventSynchronize, e0)
        r.update(rerecorded=[rc0, t_rerecorded < 0.3], waiting=lib.cuEventQuery(e1))
        rc, t = timed(lib.cuEventSynchronize, e1)
        ms = ctypes.c_float()
        r.update(rc=rc, t=t > 0.1, elapsed_unrecorded=lib.cuEventElapsedTime(byref(ms), e0, event(c0)))
        out(**r)
        """
    )
    assert res == {"cross": INVALID_HANDLE, "rerecorded": [0, True], "waiting": NOT_READY, "rc": 0,
                   "t": True, "elapsed_unrecorded": INVALID_HANDLE}


# Rule 12: a forked child gets errors --------------------------------------------------------------
@pytest.mark.skipif(under_asan(), reason=ASAN_FORK)  # the emulator's stream thread runs at fork
def test_a_forked_child_gets_not_initialized():
    res = emu_run(
        """
        c = retain(0); s = stream(c); ok(sleep(s, 0.2))         # a worker is running at fork
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            v = ctypes.c_int(); name = ctypes.c_char_p()
            codes = [lib.cuInit(0), lib.cuDeviceGetCount(byref(v)), lib.cuCtxSetCurrent(c),
                     lib.cuStreamQuery(s), lib.cuDriverGetVersion(byref(v)),
                     lib.cuGetErrorName(3, byref(name))]
            os.write(w, json.dumps(codes).encode()); os._exit(0)
        os.close(w); child = json.loads(os.read(r, 1000)); os.waitpid(pid, 0)
        out(child=child, parent=lib.cuStreamSynchronize(s))
        """
    )
    assert res == {"child": [NOT_INITIALIZED] * 4 + [0, 0], "parent": 0}


# Rule 14: registered host memory; a stream waits on a word in it until the host writes it ---------
WORD = """
c = retain(0); push(c)
buf = (ctypes.c_uint32 * 1024)()                       # one page, the word at its start
host = ctypes.addressof(buf)
def register(flags=2): return lib.cuMemHostRegister_v2(host, 4096, flags)
def dptr(p=host):
    d = ctypes.c_ulonglong(0); rc = lib.cuMemHostGetDevicePointer_v2(byref(d), p, 0); return rc, d.value
"""


def test_a_stream_waiting_on_a_host_word_runs_later_work_only_once_it_is_written():
    res = emu_run(
        WORD
        + textwrap.dedent("""        ok(register()); rc, d = dptr()
        s = stream(c); ev = event(c)
        ok(lib.cuStreamWaitValue32_v2(s, d, 2, 0))           # GEQ 2
        ok(sleep(s, 0)); ok(lib.cuEventRecord(ev, s))
        time.sleep(0.1); before = lib.cuEventQuery(ev)
        buf[0] = 1; time.sleep(0.1); at_1 = lib.cuEventQuery(ev)   # 1 < 2: still waiting
        buf[0] = 5                                           # >= 2: the stream goes on
        rc2, wait = timed(lib.cuEventSynchronize, ev)
        out(rc=rc, same=d == host, before=before, at_1=at_1, rc2=rc2, wait=wait,
            waits=lib.emu_stream_ops(s, b"waitvalue"), unregister=lib.cuMemHostUnregister(host),
            again=lib.cuMemHostUnregister(host))
        """)
    )
    assert res["rc"] == SUCCESS and res["same"]  # the device pointer is the host pointer
    assert res["before"] == res["at_1"] == NOT_READY
    assert res["rc2"] == SUCCESS and res["wait"] < 0.5  # at once, give or take a loaded machine
    assert res["waits"] == 1
    assert res["unregister"] == SUCCESS and res["again"] == HOST_MEMORY_NOT_REGISTERED


def test_a_word_wait_is_a_pending_operation_of_the_bounded_queue():
    res = emu_run(
        WORD
        + textwrap.dedent("""        lib.emu_set_queue_depth(2)
        ok(register()); _, d = dptr(); s = stream(c); ev = event(c)
        ok(lib.cuStreamWaitValue32_v2(s, d, 1, 0)); ok(sleep(s, 0))   # full: the wait runs
        t = threading.Thread(target=lambda: (push(c), lib.cuEventRecord(ev, s))); t.start()
        time.sleep(0.1); blocked = t.is_alive()
        buf[0] = 1; t.join(2); unblocked = not t.is_alive()
        ok(lib.cuEventSynchronize(ev)); lib.emu_defaults()
        out(blocked=blocked, unblocked=unblocked)
        """)
    )
    assert res == {"blocked": True, "unblocked": True}


def test_host_registration_and_word_wait_rules():
    res = emu_run(
        WORD
        + textwrap.dedent("""        s = stream(c)
        unregistered = [dptr()[0], lib.cuStreamWaitValue32_v2(s, host, 1, 0),
                        lib.cuMemHostUnregister(host)]
        ok(register(0))                                      # not device-mapped
        not_mapped = [dptr()[0], lib.cuStreamWaitValue32_v2(s, host, 1, 0)]
        ok(lib.cuMemHostUnregister(host)); ok(register())
        d = dptr()[1]
        twice = [register(), lib.cuMemHostRegister_v2(host + 64, 16, DEVICEMAP)]
        flags = [lib.cuMemHostGetDevicePointer_v2(byref(ctypes.c_ulonglong()), host, 1),
                 lib.cuStreamWaitValue32_v2(s, d, 1, WAIT_FLUSH),
                 lib.cuStreamWaitValue32_v2(s, d, 1, 0x10),
                 lib.cuMemHostRegister_v2(host + 8192, 16, 0x4),     # IOMEMORY: not modelled
                 lib.cuMemHostRegister_v2(host + 8192, 16, 0x100)]
        edges = [lib.cuStreamWaitValue32_v2(s, d + 2, 1, 0),          # misaligned
                 lib.cuStreamWaitValue32_v2(s, d + 4096, 1, 0),       # past the range
                 dptr(host + 4092)[0]]
        pop(); no_ctx = [lib.cuMemHostRegister_v2(host + 8192, 16, 2), lib.cuMemHostUnregister(host)]
        push(c); ok(lib.cuMemHostUnregister(host))
        out(unregistered=unregistered, not_mapped=not_mapped, twice=twice, flags=flags,
            edges=edges, no_ctx=no_ctx)
        """).replace("DEVICEMAP", str(DEVICEMAP)).replace("WAIT_FLUSH", str(WAIT_FLUSH))
    )
    assert res == {
        "unregistered": [INVALID_VALUE, INVALID_VALUE, HOST_MEMORY_NOT_REGISTERED],
        "not_mapped": [INVALID_VALUE, INVALID_VALUE],
        "twice": [HOST_MEMORY_ALREADY_REGISTERED, HOST_MEMORY_ALREADY_REGISTERED],
        "flags": [INVALID_VALUE, NOT_SUPPORTED, INVALID_VALUE, NOT_SUPPORTED, INVALID_VALUE],
        "edges": [INVALID_VALUE, INVALID_VALUE, SUCCESS],
        "no_ctx": [INVALID_CONTEXT, INVALID_CONTEXT],
    }


# cuGetProcAddress follows cudaTypedefs.h's variants and the emulated driver version -----------------
PROC = """\
def gpa(name, version):
    pfn, st = P(), ctypes.c_int(-1)
    rc = lib.cuGetProcAddress_v2(name.encode(), byref(pfn), version, 0, byref(st))
    return [rc, st.value, pfn.value]
def addr(sym):
    return ctypes.cast(getattr(lib, sym), P).value
"""


def test_get_proc_address_picks_the_variant_for_the_version():
    res = emu_run(
        PROC
        + textwrap.dedent("""\
        cases = {
            "push_v2": gpa("cuCtxPushCurrent", 12000)[2] == addr("cuCtxPushCurrent_v2"),
            "push_v1": gpa("cuCtxPushCurrent", 3000)[2] == addr("cuCtxPushCurrent"),
            "sync_12000": gpa("cuCtxSynchronize", 12000)[2] == addr("cuCtxSynchronize"),
            "sync_13000": gpa("cuCtxSynchronize", 13000)[2] == addr("cuCtxSynchronize_v2"),
            "dev_12000": gpa("cuCtxGetDevice", 12000)[2] == addr("cuCtxGetDevice"),
            "getctx_12000": gpa("cuStreamGetCtx", 12000)[2] == addr("cuStreamGetCtx"),
            "getctx_12050": gpa("cuStreamGetCtx", 12050)[2] == addr("cuStreamGetCtx_v2"),
            "info_11000": gpa("cuStreamGetCaptureInfo", 11000)[2] == addr("cuStreamGetCaptureInfo"),
            "info_12000": gpa("cuStreamGetCaptureInfo", 12000)[2] == addr("cuStreamGetCaptureInfo_v2"),
            "info_12030": gpa("cuStreamGetCaptureInfo", 12030)[2] == addr("cuStreamGetCaptureInfo_v3"),
            "destroy": gpa("cuEventDestroy", 12000)[2] == addr("cuEventDestroy_v2"),
            "register": gpa("cuMemHostRegister", 12000)[2] == addr("cuMemHostRegister_v2"),
            "devptr": gpa("cuMemHostGetDevicePointer", 12000)[2] == addr("cuMemHostGetDevicePointer_v2"),
            "unregister": gpa("cuMemHostUnregister", 12000)[2] == addr("cuMemHostUnregister"),
            "wait_v1": gpa("cuStreamWaitValue32", 11000)[2] == addr("cuStreamWaitValue32"),
            "wait_v2": gpa("cuStreamWaitValue32", 12000)[2] == addr("cuStreamWaitValue32_v2"),
        }
        aiocuda = ["cuInit", "cuDriverGetVersion", "cuDeviceGetCount", "cuDeviceGet",
                   "cuDeviceGetName", "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxGetState",
                   "cuCtxGetCurrent", "cuCtxSetCurrent", "cuCtxPushCurrent", "cuCtxPopCurrent",
                   "cuCtxGetId", "cuCtxGetDevice", "cuCtxSynchronize", "cuStreamGetCtx",
                   "cuStreamIsCapturing", "cuStreamCreate", "cuStreamWaitEvent", "cuLaunchHostFunc",
                   "cuThreadExchangeStreamCaptureMode", "cuEventCreate", "cuEventRecord",
                   "cuEventQuery", "cuEventSynchronize", "cuEventDestroy", "cuGetErrorName",
                   "cuGetErrorString"]
        out(cases=cases, aiocuda=[n for n in aiocuda if gpa(n, 12000)[:2] != [0, 0]],
            record_12000=gpa("cuCtxRecordEvent", 12000)[:2], record_12050=gpa("cuCtxRecordEvent", 12050)[:2],
            unknown=gpa("cuNoSuchThing", 12000), newer_than_driver=gpa("cuInit", 13010)[0])
        """),
        init=False,  # cuGetProcAddress needs no cuInit
    )
    assert all(res["cases"].values()), res["cases"]
    assert res["aiocuda"] == []
    assert res["record_12000"] == [NOT_FOUND, 2] and res["record_12050"] == [0, 0]
    assert res["unknown"] == [NOT_FOUND, 1, None]
    assert res["newer_than_driver"] == INVALID_VALUE


def test_an_older_driver_hides_newer_variants():
    res = emu_run(
        PROC
        + textwrap.dedent("""\
        v = ctypes.c_int(); ok(lib.cuDriverGetVersion(byref(v)))
        out(version=v.value, record=gpa("cuCtxRecordEvent", 12040)[:2],
            record_12050=gpa("cuCtxRecordEvent", 12050)[0],
            getctx=gpa("cuStreamGetCtx", 12040)[2] == addr("cuStreamGetCtx"),
            init=gpa("cuInit", 12000)[:2])
        """),
        {"AIOCUDA_EMU_DRIVER_VERSION": "12040"},
    )
    assert res == {"version": 12040, "record": [NOT_FOUND, 1], "record_12050": INVALID_VALUE,
                   "getctx": True, "init": [0, 0]}


def test_error_names_and_strings():
    res = emu_run(
        """
        s = ctypes.c_char_p()
        names = []
        for code in (0, 700, 900, 907):
            ok(lib.cuGetErrorName(code, byref(s))); names.append(s.value.decode())
        ok(lib.cuGetErrorString(700, byref(s)))
        out(names=names, text=s.value.decode(), unknown=lib.cuGetErrorName(12345, byref(s)),
            null=s.value)
        """
    )
    assert res == {"names": ["CUDA_SUCCESS", "CUDA_ERROR_ILLEGAL_ADDRESS",
                             "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "CUDA_ERROR_CAPTURED_EVENT"],
                   "text": "an illegal memory access was encountered", "unknown": INVALID_VALUE,
                   "null": None}


# The conftest helper, in-process (only harmless calls: aiocuda shares this emulator) ---------------
def test_the_emu_fixture_helpers(emu):
    h = emu.stream()
    before = emu.thread_calls("cuEventRecord")
    ev = emu.event(h)
    assert emu.thread_calls("cuEventRecord_v2") == before + 1  # a version suffix is ignored
    assert emu.stream_ops(h, "record") == 1 and emu.stream_ops(h, "kernel") == 0
    emu.sleep(h, 0.01)
    assert emu.stream_ops(h, "kernel") == 1
    assert emu.lib.cuEventSynchronize(ev) == 0
    assert emu.capture_status(h) == 0
    assert emu.live("streams") >= 1 and emu.live("threads") >= 1 and emu.live("nonsense") == -1
    assert emu.lib.cuEventDestroy_v2(ev) == 0 and emu.lib.cuStreamDestroy_v2(h) == 0


def test_the_emulator_charges_the_calibrated_costs(tmp_path):
    # tests/emu/costs.json (published figures, or a GPU's from scripts/gpu-check) sets what a
    # host function and an event query cost; the environment overrides it. Measured through the
    # same command gpu-check runs on a GPU (python -m aiocuda.bench --costs).
    from .emu.build import build_emulator

    (tmp_path / "build").mkdir()
    lib = tmp_path / "build" / "libcuda_emu.so"
    shutil.copy(build_emulator(), lib)
    (tmp_path / "costs.json").write_text('{"hostfn_latency_us": 3000, "query_ns": 20000}')

    def measured(env: dict[str, str]) -> dict:
        out = tmp_path / "costs-out.json"
        r = subprocess.run([sys.executable, "-m", "aiocuda.bench", "--costs", str(out)],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "AIOCUDA_LIBCUDA": str(lib), **env})
        assert r.returncode == 0, r.stderr
        return json.loads(out.read_text())

    calibrated = measured({})
    assert calibrated["hostfn_latency_us"] >= 3000 and calibrated["query_ns"] >= 20000
    assert "not a GPU" in calibrated["measured_on"]
    overridden = measured({"AIOCUDA_EMU_HOSTFN_LATENCY_US": "0", "AIOCUDA_EMU_QUERY_NS": "0"})
    assert overridden["hostfn_latency_us"] < 3000 and overridden["query_ns"] < 20000


def test_the_stream_workers_cpu_is_counted_as_the_devices():
    # emu_device_cpu_ns: the CPU of the threads that stand for the GPU (the stream workers), which
    # a benchmark takes out of the process's. A stream running many tiny kernels spends some (its
    # front end spins between items); it is part of the process's CPU, never more.
    res = emu_run(
        """
        lib.emu_device_cpu_ns.restype = ctypes.c_ulonglong
        c = retain(0); s = stream(c)
        d0, p0 = lib.emu_device_cpu_ns(), time.process_time_ns()
        for _ in range(3000):
            ok(sleep(s, 0))
        ok(lib.cuStreamSynchronize(s))
        d1, p1 = lib.emu_device_cpu_ns(), time.process_time_ns()
        ok(lib.cuStreamDestroy_v2(s))
        until(lambda: lib.emu_live(b"streams") == 0)
        d2 = lib.emu_device_cpu_ns()  # an exited worker's CPU stays counted
        out(device=d1 - d0, process=p1 - p0, after=d2 - d1)
        """
    )
    assert 0 < res["device"] <= res["process"], res
    assert res["after"] >= 0, res


def test_a_caller_can_be_held_in_the_driver_after_its_mark():
    # emu_pause_after_next_mark: the next record or memory write on the stream is enqueued, then
    # its caller stays in the driver until emu_resume() (tests use it for the window between a
    # mark and what its caller does next). Other calls on the stream go on meanwhile.
    res = emu_run(
        """
        c = retain(0); s = stream(c); ev = event(c)
        lib.emu_pause_after_next_mark(P(s))
        ok(sleep(s, 0))                                   # a kernel is no mark: not held
        done = []
        t = threading.Thread(target=lambda: done.append(lib.cuEventRecord(P(ev), P(s))))
        t.start()
        until(lambda: lib.emu_paused() == 1)
        held = lib.emu_paused() == 1 and not done
        ok(sleep(s, 0))                                   # the stream is usable meanwhile
        lib.emu_resume(); t.join(5)
        out(held=held, rc=done, paused_after=lib.emu_paused())
        """
    )
    assert res == {"held": True, "rc": [SUCCESS], "paused_after": 0}
