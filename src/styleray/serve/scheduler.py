"""Fair use of a replica's one model thread: cheap requests first, heavy ones in interleaved chunks.

A replica runs its network on one thread (torch already uses the cores it was given; two models at once
would only fight over them). Without a scheduler that thread served requests in arrival order, so a single
sample waited behind every morph queued before it: 8 s with 16 clients looping on 240-frame morphs.

Here every piece of model work is a job with a priority:

- ``INTERACTIVE`` (single samples, already batched across clients) run before anything else, in order;
- ``BULK`` work (grids, morphs, style-mixing grids) is cut by its caller into chunks of a few network rows,
  one job per chunk, each submitted when the previous one is done and tagged with the chunks its request
  still has to run. A sample therefore waits for at most one chunk. Among bulk jobs the request closest to
  done goes first (shortest remaining work first): a small grid overtakes a long morph, and requests of
  equal size finish one after another, as they would in arrival order. (Round-robin between heavy requests
  was tried first: it kept small grids quick too, but a burst of equal morphs then all finished together,
  at the end; benchmarks/RESULTS.md, "Serve under load", has both.)

A job whose caller went away (client disconnected, request cancelled) is skipped, so an abandoned morph
stops costing the model thread after its current chunk.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

log = logging.getLogger("ray.serve")

INTERACTIVE = 0
BULK = 1


class ModelScheduler:
    """One model thread fed from a FIFO of interactive jobs and a heap of bulk jobs by work remaining."""

    def __init__(self, thread_name: str = "styleray-model"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._interactive: deque = deque()
        self._bulk: list = []  # heap of (chunks remaining, arrival, job)
        self._arrival = itertools.count()
        self._runner: asyncio.Task | None = None
        self.jobs_run = {INTERACTIVE: 0, BULK: 0}

    async def run(self, priority: int, fn: Callable, *args: Any, remaining: int = 1) -> Any:
        """Run ``fn(*args)`` on the model thread when its turn comes; its result (or exception).
        ``remaining``: bulk jobs only, the chunks its request still has to run, this one included."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if priority == INTERACTIVE:
            self._interactive.append((fn, args, future))
        else:
            heapq.heappush(self._bulk, (remaining, next(self._arrival), (fn, args, future)))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run_queued())
        return await future

    def waiting(self) -> dict[str, int]:
        return {"interactive": len(self._interactive), "bulk": len(self._bulk)}

    async def _run_queued(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = self._next()
            if job is None:
                return
            fn, args, future, priority = job
            try:
                result = await loop.run_in_executor(self._pool, fn, *args)
            except Exception as e:  # noqa: BLE001 - handed to the waiting request
                if not future.done():
                    future.set_exception(e)
                continue
            finally:
                self.jobs_run[priority] += 1
            if not future.done():
                future.set_result(result)
            # Let the caller run before the next pick, so that it can queue its next chunk: without this the
            # heap would never see it, and requests of equal size would take turns instead of finishing.
            await asyncio.sleep(0)

    def _next(self):
        while self._interactive or self._bulk:
            if self._interactive:
                (fn, args, future), priority = self._interactive.popleft(), INTERACTIVE
            else:
                (fn, args, future), priority = heapq.heappop(self._bulk)[2], BULK
            if not future.done():  # a cancelled request's future is done: skip its work
                return fn, args, future, priority
        return None

    def shutdown(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
