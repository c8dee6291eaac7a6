"""Fair use of a replica's one model thread: cheap requests first, heavy ones in interleaved chunks.

A replica runs its network on one thread (torch already uses the cores it was given; two models at once
would only fight over them). Without a scheduler that thread served requests in arrival order, so a single
sample waited behind every morph queued before it: 8 s with 16 clients looping on 240-frame morphs.

Here every piece of model work is a job with a priority:

- ``INTERACTIVE`` (single samples, already batched across clients) run before anything else;
- ``BULK`` work (grids, morphs, style-mixing grids) is cut by its caller into chunks of a few network rows,
  one job per chunk. Each heavy request submits its next chunk only when the previous one is done, so
  chunks of concurrent heavy requests take turns (round-robin) and a sample waits for at most one chunk.

A job whose caller went away (client disconnected, request cancelled) is skipped, so an abandoned morph
stops costing the model thread after its current chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

log = logging.getLogger("ray.serve")

INTERACTIVE = 0
BULK = 1


class ModelScheduler:
    """One model thread fed from two FIFO queues, interactive first."""

    def __init__(self, thread_name: str = "styleray-model"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._queues: dict[int, deque] = {INTERACTIVE: deque(), BULK: deque()}
        self._runner: asyncio.Task | None = None
        self.jobs_run = {INTERACTIVE: 0, BULK: 0}

    async def run(self, priority: int, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` on the model thread when its turn comes; its result (or exception)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queues[priority].append((fn, args, future))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run_queued())
        return await future

    def waiting(self) -> dict[str, int]:
        return {"interactive": len(self._queues[INTERACTIVE]), "bulk": len(self._queues[BULK])}

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

    def _next(self):
        for priority in (INTERACTIVE, BULK):
            queue = self._queues[priority]
            while queue:
                fn, args, future = queue.popleft()
                if not future.done():  # a cancelled request's future is done: skip its work
                    return fn, args, future, priority
        return None

    def shutdown(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
