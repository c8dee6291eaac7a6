"""Seconds from an interruption to training resumed, under `styleray manager`, per attempt.

Starts a private single-node cluster (`ray start --head` on 127.0.0.1 with token auth, as the tests do), queues
one cpu-tiny run, and interrupts its job N times once it has written a new checkpoint: alternately by killing
the job's driver (SIGKILL: what a lost process or node looks like) and by `ray job stop` (the Jobs API). The
manager runs in this process (`Manager.poll_once` every --poll seconds, --backoff 0) and records, per resume
attempt, when the job ended, when it noticed, when it resubmitted, and the first training tick after that.

    python benchmarks/manager_recovery.py [--mode ray-train|no-ray|both] [--interruptions 3] [--poll 1]

Columns: detect = job end -> manager noticed (<= --poll), submit = noticed -> resubmitted (backoff + the
checkpoint lookup), start = resubmitted -> first tick (job start, imports, Ray Train worker group, restore,
one tick), total = recovery_s as `styleray queue show` prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "platform"))  # the tests' private-cluster helper

from manager_cluster import RayHead  # noqa: E402

TICK = 0.02


def train_flags(data: str, out: str, kimg: float, ray_train: bool) -> list[str]:
    flags = ["--data", data, "--out", out, "--preset", "cpu-tiny", "--resolution", "16", "--batch", "4",
             "--tick", str(TICK), "--snap", "1", "--kimg", str(kimg)]
    if ray_train:
        return flags + ["--workers", "1", "--cpus-per-worker", "0.5", "--max-failures", "0"]
    return flags + ["--no-ray", "--no-progress"]


def run_mode(head: RayHead, data: str, root: str, mode: str, interruptions: int, poll: float) -> list[dict]:
    from styleray.platform.manager import Manager, ManagerOptions, Queue, State
    from styleray.platform.manager.jobs import RayJobs
    from styleray.platform.manager.requests import check_request

    ray_train = mode == "ray-train"
    out = os.path.join(root, f"run-{mode}")
    queue = Queue(os.path.join(root, f"{mode}.db"))
    spec = check_request(mode, train_flags(data, out, 50.0, ray_train))  # far more than we let it train
    assert spec.error is None, spec.error
    rid = queue.add(name=spec.name, train_args=spec.train_args, out=spec.out, target_kimg=spec.target_kimg,
                    data=spec.data).id
    jobs = RayJobs(head.url)
    manager = Manager(queue, jobs, ManagerOptions(address=head.url, poll_s=poll, backoff_s=0.0))

    def step_until(cond, what: str, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            manager.poll_once()
            if cond():
                return
            time.sleep(poll)
        raise RuntimeError(f"{mode}: not {what} after {timeout:.0f}s")

    kinds = []
    for i in range(interruptions):
        att = queue.current_attempt(rid)
        base = att.start_kimg or 0.0 if att else 0.0
        step_until(lambda b=base: queue.get(rid).state == State.RUNNING and (queue.get(rid).checkpoint_kimg or 0) > b
                   + TICK / 2, "checkpointed")
        att = queue.current_attempt(rid)
        if i % 2 == 0:
            kinds.append("driver SIGKILL")
            driver = head.find_process("styleray", "train", out)
            driver.send_signal(signal.SIGKILL)
        else:
            kinds.append("ray job stop")
            jobs.stop(att.submission_id)
        resumed = att.attempt + 1
        step_until(lambda n=resumed: queue.get(rid).state == State.RUNNING and queue.current_attempt(rid).attempt == n,
                   "resumed")
    queue.cancel(rid)
    step_until(lambda: queue.current_attempt(rid).finished, "stopped")

    events = [e for e in queue.events(rid) if e.kind == "interrupted"]
    rows = []
    for att, kind, ev in zip(queue.attempts(rid)[1:], kinds, events, strict=True):
        rows.append({
            "mode": mode, "attempt": att.attempt, "interruption": kind,
            "detect_s": ev.at - att.interrupted_at, "submit_s": att.submitted_at - ev.at,
            "start_s": att.resumed_at - att.submitted_at, "total_s": att.recovery_s,
        })
    queue.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["ray-train", "no-ray", "both"], default="both")
    ap.add_argument("--interruptions", type=int, default=3)
    ap.add_argument("--poll", type=float, default=1.0, help="manager poll interval (s)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()

    from styleray.datasets.synthetic import make_clean_training_set

    root = tempfile.mkdtemp(prefix="mgr-bench-")
    data = str(make_clean_training_set(os.path.join(root, "data"), n=32, resolution=16))
    head = RayHead(num_cpus=2)
    rows = []
    try:
        head.wait_ready()
        os.environ["RAY_AUTH_TOKEN_PATH"] = head.token_path
        for mode in (["ray-train", "no-ray"] if args.mode == "both" else [args.mode]):
            rows += run_mode(head, data, root, mode, args.interruptions, args.poll)
    finally:
        head.stop()
    load = os.getloadavg()
    print(f"# manager recovery, --poll {args.poll:g}s --backoff 0; load average {load[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'mode':<10} {'att':>3}  {'interruption':<15} {'detect':>7} {'submit':>7} {'start':>7} {'total':>7}")
    for r in rows:
        print(f"{r['mode']:<10} {r['attempt']:>3}  {r['interruption']:<15} {r['detect_s']:7.1f} {r['submit_s']:7.1f} "
              f"{r['start_s']:7.1f} {r['total_s']:7.1f}")
    for mode in sorted({r["mode"] for r in rows}):
        totals = [r["total_s"] for r in rows if r["mode"] == mode]
        print(f"{mode}: recovery median {statistics.median(totals):.1f}s, min {min(totals):.1f}s, "
              f"max {max(totals):.1f}s over {len(totals)} interruptions")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "load": load, "poll_s": args.poll}, f, indent=2)


if __name__ == "__main__":
    main()
