"""Running generations one at a time: admitted requests hold slots, jobs wait for the model in order."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio

from chattune.infer.engine import Engine
from chattune.infer.generate import Generation, Sampling


@dataclass
class Done:
    """The end of a generation: the new token ids (stop token included when one was generated)."""

    tokens: list[int]


@dataclass
class Job:
    """A validated request, ready to generate."""

    ids: list[int]
    sampling: Sampling
    stops: list[str]
    tools: bool  # read tool calls out of the reply (only when the request offered tools)
    include_usage: bool


class Runner:
    """One model, so one generation at a time (on its own thread); requests wait in arrival order."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = asyncio.Lock()  # FIFO: waiters acquire in the order they asked
        self.pending = 0  # admitted requests whose response has not finished (see `reserve`)
        self.running = False

    def reserve(self, limit: int) -> Slot | None:
        """A place among at most `limit` admitted requests, or None when all are taken.

        Taken at admission and held until the response has been sent in full: counting only from when
        generation was queued let a burst of streamed requests past the limit, since a stream reaches the
        queue only after its headers and first chunk are out.
        """
        if self.pending >= limit:
            return None
        self.pending += 1  # on the event loop thread only, so no lock is needed
        return Slot(self)

    async def pieces(self, job: Job, cancel: threading.Event) -> AsyncIterator[str | Done]:
        """Text pieces as they are generated, then a `Done`; the model is held until it is idle again."""
        async with self.lock:
            if cancel.is_set():  # the client left while queued
                return
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            ended = object()

            def post(item: Any) -> None:
                # RuntimeError: the event loop closed (server shut down), so nobody is listening
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, item)

            # the generation's own thread hands its text straight to this loop: no thread of ours in between
            generation = Generation(
                self.engine, job.ids, job.sampling, on_text=post, on_end=lambda: post(ended), cancel=cancel
            )
            self.running, finished = True, False
            generation.start()
            try:
                while (item := await queue.get()) is not ended:
                    yield item
                finished = True
                yield Done(generation.result())  # generate's error, if it raised, is raised here
            finally:
                # on disconnect or error: stop the model, and keep it until it has really stopped,
                # so the next request never runs beside a generation that is still finishing
                cancel.set()
                with anyio.CancelScope(shield=True):
                    while not finished and await queue.get() is not ended:
                        pass
                self.running = False


class Slot:
    """One admitted request's place in the queue; released once, however the request ends."""

    def __init__(self, runner: Runner):
        self.runner, self.held = runner, True

    def release(self) -> None:
        """Give the place back (again is a no-op)."""
        if self.held:
            self.held = False
            self.runner.pending -= 1
