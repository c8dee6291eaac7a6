"""The sampler's model-thread scheduler with real threads: interactive work before bulk work, heavy requests'
chunks taking turns, abandoned work skipped, failures handed to their caller. Ordering is made deterministic
by holding the model thread on an event, not by timing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from styleray.serve.scheduler import BULK, INTERACTIVE, ModelScheduler


def _job(log: list[str], name: str, gate: threading.Event | None = None, started: threading.Event | None = None):
    def run():
        if started is not None:
            started.set()
        if gate is not None:
            assert gate.wait(10), "the test never opened the gate"
        log.append(name)
        return name

    return run


async def _until(predicate, what: str) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_interactive_jobs_overtake_queued_bulk_jobs():
    async def scenario():
        sched, log, gate, started = ModelScheduler(), [], threading.Event(), threading.Event()
        busy = asyncio.create_task(sched.run(BULK, _job(log, "bulk-running", gate, started)))
        await _until(started.is_set, "the first job to hold the model thread")
        queued = [asyncio.create_task(sched.run(BULK, _job(log, f"bulk-{i}"))) for i in range(3)]
        await _until(lambda: sched.waiting()["bulk"] == 3, "bulk jobs to queue")
        sample = asyncio.create_task(sched.run(INTERACTIVE, _job(log, "sample")))
        await _until(lambda: sched.waiting()["interactive"] == 1, "the sample to queue")
        gate.set()
        await asyncio.gather(busy, sample, *queued)
        sched.shutdown()
        return log

    assert asyncio.run(scenario()) == ["bulk-running", "sample", "bulk-0", "bulk-1", "bulk-2"]


def test_bulk_work_goes_shortest_remaining_first():
    """Heavy requests submit one chunk at a time, tagged with the chunks they still have to run: the request
    closest to done goes first, so a 1-chunk grid overtakes two 3-chunk morphs, and the morphs finish one
    after the other instead of all at the end (their encodings then overlap the other's network work)."""

    async def heavy(sched, log, name, chunks):
        for k in range(chunks):
            await sched.run(BULK, _job(log, f"{name}{k}"), remaining=chunks - k)

    async def scenario():
        sched, log = ModelScheduler(), []
        await asyncio.gather(heavy(sched, log, "a", 3), heavy(sched, log, "b", 3), heavy(sched, log, "c", 1))
        sched.shutdown()
        return log

    assert asyncio.run(scenario()) == ["c0", "a0", "a1", "a2", "b0", "b1", "b2"]


def test_abandoned_jobs_are_skipped_and_failures_reach_their_caller():
    async def scenario():
        sched, log, gate, started = ModelScheduler(), [], threading.Event(), threading.Event()
        busy = asyncio.create_task(sched.run(BULK, _job(log, "running", gate, started)))
        await _until(started.is_set, "the first job to hold the model thread")
        abandoned = asyncio.create_task(sched.run(BULK, _job(log, "abandoned")))
        await _until(lambda: sched.waiting()["bulk"] == 1, "the job to queue")
        abandoned.cancel()

        def boom():
            raise ValueError("model says no")

        failing = asyncio.create_task(sched.run(INTERACTIVE, boom))
        after = asyncio.create_task(sched.run(BULK, _job(log, "after")))
        gate.set()
        await busy
        with pytest.raises(ValueError, match="model says no"):
            await failing
        assert await after == "after"
        sched.shutdown()
        return log

    assert asyncio.run(scenario()) == ["running", "after"]
