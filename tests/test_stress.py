"""The stress suite, short: chaos on both backends and both loops (asyncio debug mode too), loop
churn, fork under load and fuzzing of every public entry point. The harnesses live in
tests/stress/; ``scripts/stress`` runs the same code long (a million operations a run) and
prints its figures. Sizes: AIOCUDA_STRESS_OPS, AIOCUDA_STRESS_LOOPS, AIOCUDA_STRESS_FORKS,
AIOCUDA_STRESS_EXAMPLES; AIOCUDA_STRESS_SEED picks another random sequence.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from . import conftest
from .conftest import LOOPS
from .stress import churn, forks
from .stress.chaos import run_chaos
from .stress.common import ASAN_FORK, env_int, run_helper, under_asan

pytestmark = pytest.mark.stress

OPS = env_int("AIOCUDA_STRESS_OPS", 20_000)
SEED = env_int("AIOCUDA_STRESS_SEED", 20_240_611)
EXAMPLES = env_int("AIOCUDA_STRESS_EXAMPLES", 300)
BACKENDS = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.emu)]


def _need(kinds: str) -> None:
    if "uvloop" in kinds and conftest.uvloop is None:
        pytest.skip("uvloop is not installed (pip install aiocuda[test])")


def _figures(x: Any) -> str:
    return json.dumps(x, indent=1, default=repr)


def _chaos(request: pytest.FixtureRequest, backend: str, loop_kind: str, ops: int,
           debug: bool) -> None:
    emu = request.getfixturevalue("emu") if backend == "cuda" else None
    fig = run_chaos(ops, SEED, backend, loop_kind, emu, debug=debug, guard=5.0,
                    deadline=30 + ops / 1_000)
    problems = fig.problems()
    assert not problems, "\n".join(problems) + "\nfigures: " + _figures(fig.as_dict())
    # Each kind of chaos happened: one of each is forced (a gate holds the stream), the rest is
    # random; problems() above already failed the run if a forced outcome came out otherwise.
    assert fig.cancellations and fig.timeouts and fig.exceptions, _figures(fig.as_dict())
    forced = 3 + (fig.sticky_errors if backend == "cuda" else 0)
    assert fig.forced == forced, _figures(fig.as_dict())
    if backend == "cuda":
        assert fig.sticky_errors >= 2 and fig.strategy_flips >= 3, _figures(fig.as_dict())
        assert fig.cuda_errors >= fig.sticky_errors, _figures(fig.as_dict())


# ---- chaos ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_chaos(request, backend, loop_kind):
    """Many streams and tasks; random cancellations, timeouts and exceptions (StopIteration and
    BaseException subclasses among them); event chains between streams; sticky errors and
    resets (cuda). Per-stream delivery order, outcomes, no early completion, nothing pending,
    no loop error, native records back to 0, RSS, fds and threads (tests/stress/chaos.py)."""
    _chaos(request, backend, loop_kind, OPS, debug=False)


@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_chaos_in_asyncio_debug_mode(request, backend, loop_kind):
    """The same under loop.set_debug(True): thread-safety checks on every loop call, creation
    tracebacks on futures, coroutine origin tracking."""
    _chaos(request, backend, loop_kind, max(1_000, OPS // 5), debug=True)


# ---- loop churn ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kinds", ["asyncio", "uvloop", "asyncio,uvloop"])
def test_loop_churn(kinds):
    """Thousands of loops in four threads (the main thread among them), most closed with work
    pending, two asyncio.run in a row leaving a synchronize() pending: no deadlock, and fds,
    threads, live loops, loop states, native records and RSS back to their baseline."""
    _need(kinds)
    loops = env_int("AIOCUDA_STRESS_LOOPS", 500)
    result, how = run_helper("churn", ["--threads", "4", "--loops", str(loops), "--kinds", kinds,
                                       "--cuda", "--timeout", "20"], timeout=40)
    assert result is not None, how
    assert not result["problems"], _figures(result) + "\n" + how
    assert result["loops"] >= 4 * loops
    # Loops really were closed with work pending: counted by the churn from futures still not
    # done after their loop had closed (3 runs in 5 leave one; measured 59-60%, loaded or not).
    assert result["closed_with_work_pending"] >= result["loops"] // 5, _figures(result)


# ---- fork ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("exit_mode", ["sys", "os"])
@pytest.mark.parametrize("scenario", ["loop", "thread", "churn"])
def test_fork(scenario, exit_mode, loop_kind):
    """fork() from a running loop (cpu and cuda work pending), from a thread running a loop,
    and again and again while three threads create loops; the child exits by sys.exit or
    os._exit. No child hangs, each sees the parent's pending work failed and can use aiocuda
    afresh, and the parent's loops keep delivering (tests/stress/forks.py)."""
    _need("uvloop" if scenario == "churn" else loop_kind)  # the churning threads use both
    if under_asan():
        pytest.skip(ASAN_FORK)
    n = env_int("AIOCUDA_STRESS_FORKS", 20) if scenario == "churn" else 3
    result, how = run_helper("forks", ["--scenario", scenario, "--exit", exit_mode,
                                       "--loop", loop_kind, "--forks", str(n)],
                             timeout=30 + 2 * n)
    assert result is not None, how
    assert not result["problems"], _figures(result) + "\n" + how
    assert result["children"] == n
    if scenario == "churn":
        assert result["loops_made_meanwhile"] > 0
        # The race this scenario is for happened: a child inherited the loop-state lock held
        # (by a thread it does not have) and still made a loop of its own. One such fork is
        # forced; the children report what they found.
        assert result["forks_forced_lock_held"] == 1, _figures(result)
        assert result["forks_with_states_lock_held"] >= 1, _figures(result)


# ---- fuzzing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loop_kind", LOOPS)
@pytest.mark.parametrize("group", ["streams", "cpu_stream", "gpu_op", "module"])
def test_fuzz_public_api(group, loop_kind):
    """hypothesis on every public entry point, in a subprocess (a crash fails the test, not the
    run): each call works or raises TypeError, ValueError or AiocudaError with a message, and
    what it returns completes (tests/stress/fuzz.py). Seeded (AIOCUDA_STRESS_SEED): each run
    tries the same inputs, and a failure says how to replay it."""
    _need(loop_kind)
    args = ["--group", group, "--loop", loop_kind, "--seed", str(SEED), "--examples",
            str(EXAMPLES)]
    replay = f"replay: python -m tests.stress.fuzz {' '.join(args)}"
    print(replay)  # in the log of every run (pytest -rA, or a failure's captured output)
    result, how = run_helper("fuzz", args, timeout=120)
    assert result is not None, f"the fuzzing process did not finish ({replay}): {how}"
    assert result["seed"] == SEED, _figures(result)  # the inputs are the seed's, not random ones
    failed = {k: v for k, v in result["results"].items() if v != "ok"}
    assert not failed, replay + "\n\n" + "\n\n".join(f"== {k}\n{v}" for k, v in failed.items())


def test_the_checks_can_fail():
    """The order and outcome checks of the chaos harness count what they should."""
    import asyncio

    from .stress.chaos import Figures, Tracker, expect_raised, expect_stop_iteration, expect_value

    async def main() -> Figures:
        loop = asyncio.get_running_loop()
        fig = Figures("cpu", "asyncio", 0)
        tr = Tracker(fig)
        a, b, c, d = (loop.create_future() for _ in range(4))
        tr.track(a, 0, expect_value(1), "a")
        tr.track(b, 0, expect_value(2), "b")
        tr.track(c, None, expect_stop_iteration, "c")
        tr.track(d, None, expect_raised(ValueError("x")), "d", may_cancel=False)
        b.set_result(2)  # delivered before a, submitted after it
        a.set_result(1)
        c.set_exception(RuntimeError("no cause"))
        d.cancel()
        await asyncio.sleep(0)
        return fig

    fig = asyncio.run(main())
    assert (fig.inversions, fig.wrong, fig.results, fig.cancellations) == (1, 2, 2, 1)
    assert fig.problems()
    assert churn.problems({"threads": 1, "loops": 1, "loops_per_thread": 1, "kinds": ["asyncio"],
                           "cuda": False, "closed_with_work_pending": 1, "seconds": 0,
                           "hung_threads": 0, "live_loops": 1, "loop_states": 0,
                           "live_records": 2, "cuda_pending": 0, "fds_delta": 1,
                           "threads_delta": 0, "rss_growth": 0, "errors": []})
    assert forks.problems({"children": 1, "hung_children": 1, "child_failures": 0,
                           "bad_exit_status": 0, "parent_failures": 0, "notes": []})
