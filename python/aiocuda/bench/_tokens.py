"""A continuous-batching token generator, run two ways (shared by examples/token_server.py and
``python -m aiocuda.bench serving``).

A :class:`Scheduler` keeps a batch of active sequences; each step feeds every sequence one token
(its prompt first, one token a step, then what it generated) through a small recurrent language
model, greedy. Between two steps it admits waiting sequences (up to ``max_batch`` active) and
retires finished and cancelled ones. It is pure bookkeeping, driven by one of two engines:

- :class:`AiocudaEngine`: the scheduler is a task on the event loop, and each step is
  ``await aiocuda.gpu_op(model.step, ..., stream=s)`` (on a GPU a CUDA stream, awaited; on the
  cpu backend a worker): the loop serves clients while the step runs, and tokens go to the
  clients directly. By default it keeps two steps in flight: the next step, whose inputs are the
  current step's outputs on the device, is enqueued before the current one is awaited, so the
  device does not wait for the loop's turn (``depth=1``, engine "aiocuda-d1": one at a time).
- :class:`ThreadEngine`: what vLLM and TGI do today. The scheduler runs on a thread of its own,
  which calls the step and then blocks in a synchronize (``torch.cuda.synchronize()``; on the CPU
  the step itself blocks), and hands each step's tokens to the loop with
  ``call_soon_threadsafe``.

Both run the same scheduler over the same model, so given the same arrivals they produce the
same tokens. torch is imported when a model is made, not before.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

VOCAB = 2048
HIDDEN = 64
PROMPT_TOKENS = (2, 6)  # a prompt's length is drawn from this range by its seed

Event_ = tuple["Sequence", Any]  # (sequence, a token | None for the end | an exception)

STOPPED = "the token engine stopped before the sequence finished"


@dataclass(eq=False)
class StepState:
    """What a step leaves for the next one, filled when the step runs (on the device's order):
    each row's next token and hidden state, on the model's device. None until then, or for
    good when the step failed."""

    tokens: Any = None
    hidden: Any = None


class TinyLM:
    """Embedding, a GRU cell and a projection over a small vocabulary: one decode step for a
    whole batch is a few small matrix products, like a (very) small LLM's."""

    def __init__(self, device: str = "cpu", vocab: int = VOCAB, hidden: int = HIDDEN,
                 seed: int = 0, step_ms: float = 0.0) -> None:
        import importlib

        torch: Any = importlib.import_module("torch")
        if step_ms < 0:
            raise ValueError(f"step_ms must be >= 0, got {step_ms}")
        self.step_s = step_ms / 1e3 if torch.device(device).type == "cpu" else 0.0
        self.torch = torch
        self.device = torch.device(device)
        self.vocab, self.hidden = vocab, hidden
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.embed = torch.nn.Embedding(vocab, hidden)
            self.cell = torch.nn.GRUCell(hidden, hidden)
            self.head = torch.nn.Linear(hidden, vocab)
            for p in [*self.embed.parameters(), *self.cell.parameters(),
                      *self.head.parameters()]:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for m in (self.embed, self.cell, self.head):
            m.to(self.device).eval()

    def prompt(self, seed: int) -> list[int]:
        rng = random.Random(seed)
        return [rng.randrange(self.vocab) for _ in range(rng.randint(*PROMPT_TOKENS))]

    def step(self, inputs: list[int], rows: list[int], prev: StepState | None,
             out: StepState) -> Any:
        """One decode step for a batch. Row i reads token ``inputs[i]``, or where that is -1
        the token row ``rows[i]`` of the previous step produced; its hidden state is that row's
        (zeros for a new sequence, ``rows[i] == -1``). Fills `out`; returns the next tokens as a
        host tensor: on a GPU their copy is enqueued (pinned, non-blocking), so read them once
        the step's work has completed (awaited, or after a synchronize). Nothing is read back
        from `prev` on the host, so the next step can be enqueued before this one has run.
        On the CPU with ``step_ms``, the step then also holds its thread that long without the
        CPU or the GIL (a sleep), standing in for the device time of a real decode step."""
        torch = self.torch
        dev = self.device
        with torch.no_grad():
            lit = torch.tensor(inputs, dtype=torch.long).to(dev, non_blocking=True)
            src = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)
            if prev is not None and prev.tokens is not None:
                idx = src.clamp(min=0)
                ptok = prev.tokens.index_select(0, idx)
                ph = prev.hidden.index_select(0, idx) * (src >= 0).unsqueeze(1)
            else:  # nothing carries over (or the previous step failed: its rows are retired)
                ptok = torch.zeros_like(lit)
                ph = torch.zeros(len(inputs), self.hidden, device=dev)
            x = torch.where(lit >= 0, lit, ptok)
            h = self.cell(self.embed(x), ph)
            nxt = self.head(h).argmax(dim=1)
            out.tokens, out.hidden = nxt, h
            if dev.type == "cuda":
                host = torch.empty(nxt.shape, dtype=nxt.dtype, pin_memory=True)
                host.copy_(nxt, non_blocking=True)
                nxt = host
        if self.step_s:
            time.sleep(self.step_s)
        return nxt

    def synchronize(self) -> None:
        """Block until the step's device work is done (the threaded engine's wait)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)


@dataclass(eq=False)
class Sequence:
    seed: int
    prompt: list[int]
    max_tokens: int
    out: asyncio.Queue[Any]
    fed: int = 0  # tokens planned into steps so far
    planned: int = 0  # generated tokens planned
    delivered: int = 0  # generated tokens handed to the client's queue
    row: int = -1  # its row in the last step planned; -1 before its first
    cancelled: bool = False  # set on the loop when the client goes; read by the scheduler
    finished: bool = False  # set by the scheduler when it retires the sequence
    tokens: list[int] = field(default_factory=list)


@dataclass(eq=False)
class Plan:
    """One step: its batch, each row's input (a token, or -1: its previous output) and previous
    row, whether the row yields a generated token, and the state the step fills."""

    batch: list[Sequence]
    inputs: list[int]
    rows: list[int]
    emits: list[bool]
    state: StepState


class Scheduler:
    """The batch: sequences wait, are admitted (up to `max_batch` active), fed one token per step
    (their prompt, then what they generated) and retired when they have their `max_tokens`, are
    cancelled, or a step of theirs failed. What a step feeds is decided without reading what the
    previous step produced (a sequence's length is known in advance), so a step can be planned
    before the previous one has run. Runs on one thread (the engine's): nothing here is locked."""

    def __init__(self, model: Any, max_batch: int = 256) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self.steps = self.admitted = self.completed = self.cancelled = self.failed = 0
        self.max_active = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def prepare(self) -> Plan | None:
        """Retire the cancelled, admit the waiting: the next step's plan, or None."""
        keep = []
        for s in self.active:
            if s.cancelled:
                s.finished = True
                self.cancelled += 1
            else:
                keep.append(s)
        self.active = keep
        while self.waiting and len(self.active) < self.max_batch:
            s = self.waiting.popleft()
            if s.cancelled:
                s.finished = True
                self.cancelled += 1
                continue
            self.active.append(s)
            self.admitted += 1
        if not self.active:
            return None
        self.max_active = max(self.max_active, len(self.active))
        batch = list(self.active)
        plan = Plan(batch, [], [], [], StepState())
        done = False
        for i, s in enumerate(batch):
            plan.inputs.append(s.prompt[s.fed] if s.fed < len(s.prompt) else -1)
            plan.rows.append(s.row)
            s.row = i
            s.fed += 1
            emit = s.fed >= len(s.prompt)
            plan.emits.append(emit)
            if emit:
                s.planned += 1
                done = done or s.planned >= s.max_tokens
        if done:  # their last token is in this step: they take no part in the next
            self.active = [s for s in self.active if s.planned < s.max_tokens]
        self.steps += 1
        return plan

    def complete(self, plan: Plan, tokens: list[int]) -> list[Event_]:
        """A step ran: the tokens to deliver, and an end for each sequence that is complete."""
        events: list[Event_] = []
        for s, tok, emit in zip(plan.batch, tokens, plan.emits):
            if not emit or s.finished or s.cancelled:
                continue
            events.append((s, tok))
            s.delivered += 1
            if s.delivered >= s.max_tokens:
                s.finished = True
                self.completed += 1
                events.append((s, None))
        return events

    def fail(self, plan: Plan, exc: BaseException) -> list[Event_]:
        """A step raised: every sequence of its batch not yet retired ends with the exception."""
        events: list[Event_] = []
        for s in plan.batch:
            if s.finished:
                continue
            s.finished = True
            self.failed += 1
            if not s.cancelled:
                events.append((s, exc))
        gone = set(plan.batch)
        self.active = [s for s in self.active if s not in gone]
        return events

    def drain(self, plans: list[Plan] = ()) -> list[Sequence]:  # type: ignore[assignment]
        """Every sequence still held, waiting, active or in the steps `plans` (the engine stops)."""
        left = list(dict.fromkeys([*self.active, *self.waiting,
                                   *(s for p in plans for s in p.batch)]))
        left = [s for s in left if not s.finished]
        self.active, self.waiting = [], deque()
        for s in left:
            s.finished = True
        return left

    def stats(self) -> dict[str, int]:
        return {"steps": self.steps, "admitted": self.admitted, "completed": self.completed,
                "cancelled": self.cancelled, "failed": self.failed,
                "max_active": self.max_active, "active": len(self.active),
                "waiting": len(self.waiting)}


def deliver(events: list[Event_]) -> None:
    """On the loop: put each token (or end, or error) in its sequence's queue."""
    for s, item in events:
        if isinstance(item, int):
            s.tokens.append(item)
        s.out.put_nowait(item)


class Engine:
    """The common part: ``async for token in engine.generate(seed, max_tokens)``. Leaving the
    loop early (a client that disconnects, a cancelled task) cancels the sequence, which the
    scheduler retires before its next step."""

    name = ""

    def __init__(self, model: Any, max_batch: int = 256) -> None:
        self.model = model
        self.scheduler = Scheduler(model, max_batch)
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _submit(self, seq: Sequence) -> None:
        raise NotImplementedError

    def _cancel(self, seq: Sequence) -> None:
        seq.cancelled = True

    async def generate(self, seed: int, max_tokens: int) -> AsyncIterator[int]:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        seq = Sequence(seed, self.model.prompt(seed), max_tokens, asyncio.Queue())
        self._submit(seq)
        try:
            while True:
                item = await seq.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not seq.finished:
                self._cancel(seq)

    def stats(self) -> dict[str, int]:
        return self.scheduler.stats()

    def _stopped(self, left: list[Sequence]) -> None:
        deliver([(s, RuntimeError(STOPPED)) for s in left if not s.cancelled])


class AiocudaEngine(Engine):
    """The scheduler as a task on the loop; each step awaited with aiocuda.gpu_op.

    With ``depth=2`` (the default) the next step is enqueued on the engine's stream before the
    current one is awaited (its inputs are the current step's outputs, on the device, so nothing
    waits for them on the host): the device goes from one step to the next while the loop
    delivers tokens, the asynchronous scheduling an await makes natural. ``depth=1`` plans each
    step after the previous one's tokens are back, as the threaded engine does."""

    name = "aiocuda"

    def __init__(self, model: Any, max_batch: int = 256, depth: int = 2) -> None:
        super().__init__(model, max_batch)
        if depth not in (1, 2):
            raise ValueError(f"depth must be 1 or 2, got {depth}")
        self.depth = depth
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stream: Any = None
        self._inflight: deque[tuple[Plan, asyncio.Future[Any]]] = deque()

    async def start(self) -> None:
        import aiocuda

        self.loop = asyncio.get_running_loop()
        # The engine's own stream, as a serving engine keeps one: its steps run in order on it,
        # and on the cpu backend on one worker, which stays warm from step to step.
        if self.model.device.type == "cuda":
            import importlib

            self._stream = importlib.import_module("torch").cuda.Stream(self.model.device)
        else:
            self._stream = aiocuda.CpuStream()
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        plans = [p for p, _ in self._inflight]
        for _, fut in self._inflight:
            fut.cancel()  # the step still runs on the stream; its outcome is dropped
        self._inflight.clear()
        from aiocuda import CpuStream

        if isinstance(self._stream, CpuStream):
            await self._stream.aclose()
        self._stream = None
        self._stopped(self.scheduler.drain(plans))

    def _submit(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        self._work.set()

    def _cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._work.set()  # a waiting sequence leaves at the next prepare

    async def _run(self) -> None:
        import aiocuda

        sched, model, inflight = self.scheduler, self.model, self._inflight
        prev: StepState | None = None
        while True:
            while len(inflight) < self.depth:
                plan = sched.prepare()
                if plan is None:
                    break
                # Tasks start in order, so the steps reach the stream in order.
                fut: asyncio.Future[Any] = asyncio.ensure_future(aiocuda.gpu_op(
                    model.step, plan.inputs, plan.rows, prev, plan.state, stream=self._stream))
                inflight.append((plan, fut))
                prev = plan.state
            if not inflight:
                prev = None
                self._work.clear()
                await self._work.wait()
                continue
            plan, fut = inflight[0]
            try:
                host = await fut
                events = sched.complete(plan, host.tolist())
            except Exception as exc:
                events = sched.fail(plan, exc)
            inflight.popleft()
            deliver(events)


class ThreadEngine(Engine):
    """The scheduler on a thread: step, block in a synchronize, hand the tokens to the loop."""

    name = "thread"

    def __init__(self, model: Any, max_batch: int = 256) -> None:
        super().__init__(model, max_batch)
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._current: list[Plan] = []

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="token-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._inbox.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        self._stopped(self.scheduler.drain(self._current) + self._take_inbox())

    def _take_inbox(self) -> list[Sequence]:
        """The sequences submitted since the last look (None entries only wake the thread)."""
        got: list[Sequence] = []
        while True:
            try:
                s = self._inbox.get_nowait()
            except queue.Empty:
                return got
            if s is not None:
                got.append(s)

    def _submit(self, seq: Sequence) -> None:
        self._inbox.put(seq)

    def _cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._inbox.put(None)  # wakes the thread if it sleeps with nothing active

    def _run(self) -> None:
        sched, model, loop = self.scheduler, self.model, self.loop
        assert loop is not None
        prev: StepState | None = None
        while not self._stopping:
            if not sched.active and not sched.waiting:
                prev = None
                s = self._inbox.get()
                if s is not None:
                    sched.add(s)
            for s in self._take_inbox():
                sched.add(s)
            if self._stopping:
                break
            plan = sched.prepare()
            if plan is None:
                continue
            self._current = [plan]
            try:
                host = model.step(plan.inputs, plan.rows, prev, plan.state)
                model.synchronize()
                events = sched.complete(plan, host.tolist())
            except Exception as exc:
                events = sched.fail(plan, exc)
            prev = plan.state
            if events:
                try:
                    loop.call_soon_threadsafe(deliver, events)
                except RuntimeError:  # the loop closed under a running engine
                    return
            self._current = []


def aiocuda_sync(model: Any, max_batch: int = 256) -> AiocudaEngine:
    """The aiocuda engine planning each step after the previous one's tokens are back."""
    return AiocudaEngine(model, max_batch, depth=1)


ENGINES: dict[str, Any] = {"aiocuda": AiocudaEngine, "aiocuda-d1": aiocuda_sync,
                           "thread": ThreadEngine}
