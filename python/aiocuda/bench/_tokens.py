"""A continuous-batching token generator, run two ways (shared by examples/token_server.py and
``python -m aiocuda.bench serving``).

A :class:`Scheduler` keeps a batch of active sequences; each step feeds every sequence one token
(its prompt first, one token a step, then what it generated) through a small recurrent language
model, greedy. Between two steps it admits waiting sequences (up to ``max_batch`` active) and
retires finished and cancelled ones. It is pure bookkeeping, driven by one of two engines:

- :class:`AiocudaEngine`: the scheduler is a task on the event loop, and each step is
  ``await aiocuda.gpu_op(model.step, ...)`` (on a GPU a CUDA stream, awaited; on the cpu backend
  a worker): the loop serves clients while the step runs, and tokens go to the clients directly.
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


class TinyLM:
    """Embedding, a GRU cell and a projection over a small vocabulary: one decode step for a
    whole batch is a few small matrix products, like a (very) small LLM's."""

    def __init__(self, device: str = "cpu", vocab: int = VOCAB, hidden: int = HIDDEN,
                 seed: int = 0, step_ms: float = 0.0) -> None:
        import torch

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
        self.zero = torch.zeros(hidden, device=self.device)

    def prompt(self, seed: int) -> list[int]:
        rng = random.Random(seed)
        return [rng.randrange(self.vocab) for _ in range(rng.randint(*PROMPT_TOKENS))]

    def step(self, tokens: list[int], hiddens: list[Any]) -> tuple[Any, list[Any]]:
        """One decode step: (next tokens as a host tensor, each sequence's new hidden state).
        On a GPU the tokens' copy to the host is enqueued (pinned, non-blocking): read them once
        the step's work has completed (awaited, or after a synchronize). On the CPU with
        ``step_ms``, the step then also holds its thread that long without the CPU or the GIL
        (a sleep), standing in for the device time of a real model's decode step."""
        torch = self.torch
        with torch.no_grad():
            x = torch.tensor(tokens, dtype=torch.long).to(self.device, non_blocking=True)
            h = self.cell(self.embed(x), torch.stack(hiddens))
            nxt = self.head(h).argmax(dim=1)
            if self.device.type == "cuda":
                host = torch.empty(nxt.shape, dtype=nxt.dtype, pin_memory=True)
                host.copy_(nxt, non_blocking=True)
                nxt = host
        if self.step_s:
            time.sleep(self.step_s)
        return nxt, list(h.unbind(0))

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
    fed: int = 0  # tokens fed to the model so far
    generated: int = 0
    last: int = 0  # the last token generated
    hidden: Any = None
    cancelled: bool = False  # set on the loop when the client goes; read by the scheduler
    finished: bool = False  # set by the scheduler when it retires the sequence
    tokens: list[int] = field(default_factory=list)

    def next_input(self) -> int:
        return self.prompt[self.fed] if self.fed < len(self.prompt) else self.last


class Scheduler:
    """The batch: sequences wait, are admitted (up to `max_batch` active), fed one token per step
    and retired when they have their `max_tokens`, are cancelled, or their step failed. Runs on
    one thread (the engine's): nothing here is locked."""

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

    def _retire(self, seq: Sequence) -> None:
        seq.finished = True
        seq.hidden = None

    def prepare(self) -> tuple[list[Sequence], list[int], list[Any]] | None:
        """Retire the cancelled, admit the waiting; the next step's batch and inputs, or None."""
        keep = []
        for s in self.active:
            if s.cancelled:
                self._retire(s)
                self.cancelled += 1
            else:
                keep.append(s)
        self.active = keep
        while self.waiting and len(self.active) < self.max_batch:
            s = self.waiting.popleft()
            if s.cancelled:
                self._retire(s)
                self.cancelled += 1
                continue
            s.hidden = self.model.zero
            self.active.append(s)
            self.admitted += 1
        if not self.active:
            return None
        self.max_active = max(self.max_active, len(self.active))
        batch = list(self.active)
        return batch, [s.next_input() for s in batch], [s.hidden for s in batch]

    def finish(self, batch: list[Sequence], tokens: list[int], hiddens: list[Any]
               ) -> list[Event_]:
        """Take a step's outputs: the tokens to deliver, and an end for each finished one."""
        self.steps += 1
        events: list[Event_] = []
        done = set()
        for s, tok, h in zip(batch, tokens, hiddens):
            if s.cancelled:
                continue  # retired at the next prepare
            s.hidden = h
            s.fed += 1
            if s.fed < len(s.prompt):
                continue  # still reading its prompt
            s.last = tok
            s.generated += 1
            events.append((s, tok))
            if s.generated >= s.max_tokens:
                self._retire(s)
                self.completed += 1
                events.append((s, None))
                done.add(s)
        if done:
            self.active = [s for s in self.active if s not in done]
        return events

    def fail(self, batch: list[Sequence], exc: BaseException) -> list[Event_]:
        """A step raised: every sequence of its batch ends with the exception."""
        self.steps += 1
        failed = set(batch)
        self.active = [s for s in self.active if s not in failed]
        for s in batch:
            self._retire(s)
            self.failed += 1
        return [(s, exc) for s in batch if not s.cancelled]

    def drain(self) -> list[Sequence]:
        """Every sequence still held (the engine stops)."""
        left = [*self.active, *self.waiting]
        self.active, self.waiting = [], deque()
        for s in left:
            self._retire(s)
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
    """The scheduler as a task on the loop; each step awaited with aiocuda.gpu_op."""

    name = "aiocuda"

    def __init__(self, model: Any, max_batch: int = 256) -> None:
        super().__init__(model, max_batch)
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stream: Any = None

    async def start(self) -> None:
        import aiocuda

        self.loop = asyncio.get_running_loop()
        # The engine's own stream, as a serving engine keeps one: its steps run in order on it,
        # and on the cpu backend on one worker, which stays warm from step to step.
        if self.model.device.type == "cuda":
            import torch

            self._stream = torch.cuda.Stream(self.model.device)
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
        from aiocuda import CpuStream

        if isinstance(self._stream, CpuStream):
            await self._stream.aclose()
        self._stream = None
        self._stopped(self.scheduler.drain())

    def _submit(self, seq: Sequence) -> None:
        self.scheduler.add(seq)
        self._work.set()

    def _cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._work.set()  # a waiting sequence leaves at the next prepare

    async def _run(self) -> None:
        import aiocuda

        sched, model = self.scheduler, self.model
        while True:
            prepared = sched.prepare()
            if prepared is None:
                self._work.clear()
                await self._work.wait()
                continue
            batch, tokens, hiddens = prepared
            try:
                nxt, rows = await aiocuda.gpu_op(model.step, tokens, hiddens,
                                                 stream=self._stream)
                events = sched.finish(batch, nxt.tolist(), rows)
            except Exception as exc:
                events = sched.fail(batch, exc)
            deliver(events)


class ThreadEngine(Engine):
    """The scheduler on a thread: step, block in a synchronize, hand the tokens to the loop."""

    name = "thread"

    def __init__(self, model: Any, max_batch: int = 256) -> None:
        super().__init__(model, max_batch)
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False

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
        left = self.scheduler.drain()
        while True:
            try:
                s = self._inbox.get_nowait()
            except queue.Empty:
                break
            if s is not None:
                left.append(s)
        self._stopped(left)

    def _submit(self, seq: Sequence) -> None:
        self._inbox.put(seq)

    def _cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._inbox.put(None)  # wakes the thread if it sleeps with nothing active

    def _run(self) -> None:
        sched, model, loop = self.scheduler, self.model, self.loop
        assert loop is not None
        while not self._stopping:
            if not sched.active and not sched.waiting:
                s = self._inbox.get()
                if s is not None:
                    sched.add(s)
            while True:
                try:
                    s = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if s is not None:
                    sched.add(s)
            if self._stopping:
                break
            prepared = sched.prepare()
            if prepared is None:
                continue
            batch, tokens, hiddens = prepared
            try:
                nxt, rows = model.step(tokens, hiddens)
                model.synchronize()
                events = sched.finish(batch, nxt.tolist(), rows)
            except Exception as exc:
                events = sched.fail(batch, exc)
            if events:
                try:
                    loop.call_soon_threadsafe(deliver, events)
                except RuntimeError:  # the loop closed under a running engine
                    return


ENGINES = {"aiocuda": AiocudaEngine, "thread": ThreadEngine}
