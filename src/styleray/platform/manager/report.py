"""Plain-text views of the queue: `styleray queue list` (a table with progress bars) and `queue show ID`."""

from __future__ import annotations

import json
import shlex
import time

from styleray.platform.manager.queue import Attempt, Queue, Request, State
from styleray.platform.manager.requests import train_argv
from styleray.settings import SettingsError

BAR = 20


def progress_bar(kimg: float | None, target: float, width: int = BAR) -> str:
    """'[#########-----------]   4.50/10 kimg  45%'."""
    done = min(max((kimg or 0.0) / target, 0.0), 1.0) if target > 0 else 0.0
    filled = int(round(done * width))
    return f"[{'#' * filled}{'-' * (width - filled)}] {kimg or 0.0:7.2f}/{target:<6g} kimg {done * 100:3.0f}%"


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    s = max(now - t, 0.0)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    if s < 172800:
        return f"{s / 3600:.0f}h ago"
    return f"{s / 86400:.0f}d ago"


def _stamp(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def manager_line(queue: Queue, now: float | None = None) -> str:
    now = now if now is not None else time.time()
    lease = queue.lease()
    if lease is None:
        return f"manager: none is running on {queue.path} (start one: styleray manager --address http://HEAD:8265)"
    silent = now - lease.heartbeat_at
    stale = "  (SILENT: is it still running?)" if silent > 3 * lease.poll_s + 5 else ""
    return (f"manager: pid {lease.pid} on {lease.host}, {lease.address or 'default address'}, "
            f"polls every {lease.poll_s:g}s, last {_ago(lease.heartbeat_at, now)}{stale}")


def _state_text(req: Request, now: float) -> str:
    if req.state == State.INTERRUPTED and req.retry_at:
        wait = req.retry_at - now
        return f"interrupted (resume {'in %.0fs' % wait if wait > 0 else 'due'})"
    return req.state.value


def list_table(queue: Queue, now: float | None = None, *, all_: bool = True) -> str:
    now = now if now is not None else time.time()
    reqs = queue.list()
    if not all_:
        reqs = [r for r in reqs if not r.state.terminal]
    lines = [manager_line(queue, now), ""]
    if not reqs:
        lines.append("the queue is empty (add a request: styleray queue add --name N --data D --out O --kimg K)")
        return "\n".join(lines)
    order = {s: i for i, s in enumerate([State.RUNNING, State.RETRYING, State.INTERRUPTED, State.QUEUED,
                                          State.FAILED, State.SUCCEEDED, State.CANCELLED])}
    reqs.sort(key=lambda r: (order[r.state], -r.priority, r.id))
    name_w = max(4, *(min(len(r.name), 24) for r in reqs))
    header = f"{'ID':>4}  {'NAME':<{name_w}}  {'PRIO':>4}  {'STATE':<26}  {'PROGRESS':<46}  {'ATT':>3}  UPDATED"
    lines.append(header)
    for r in reqs:
        lines.append(
            f"{r.id:>4}  {r.name[:24]:<{name_w}}  {r.priority:>4}  {_state_text(r, now):<26}  "
            f"{progress_bar(r.kimg, r.target_kimg):<46}  {r.attempts:>3}  {_ago(r.updated_at, now)}"
        )
        if r.state in (State.FAILED, State.INTERRUPTED) and r.last_error:
            lines.append(f"{'':>4}  {'':<{name_w}}  -> {r.last_error[:160]}")
    return "\n".join(lines)


def _attempt_line(a: Attempt) -> str:
    kimg = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    rec = f"  recovered in {a.recovery_s:.1f}s" if a.recovery_s is not None else ""
    code = f" exit {a.exit_code}" if a.exit_code not in (None, 0) else ""
    line = (f"  #{a.attempt}  {a.submission_id}  {a.status}{code}  submitted {_stamp(a.submitted_at)}  "
            f"ended {_stamp(a.job_ended_at)}  kimg {kimg(a.start_kimg)} -> {kimg(a.end_kimg)}{rec}")
    if a.message and a.status not in ("SUCCEEDED", "PENDING", "RUNNING"):
        line += f"\n      {a.message[:300]}"
    return line


def _command(r: Request) -> str:
    """The `styleray train` command a request runs, or its stored settings when they do not check."""
    try:
        return "styleray train " + shlex.join(train_argv(r.settings))
    except SettingsError as e:
        return f"(none: {e}) settings {json.dumps(r.settings, sort_keys=True)}"


def _served_line(r: Request) -> str | None:
    """Under which model name a serve app watching the run's out prefix serves it (platform/served.py)."""
    from styleray.platform.served import served_as

    served = served_as(r.out)
    if served is None:
        return None  # no `styleray serve --runs` watches a folder above the run
    if served.name is not None:
        return (f"  served as  model {served.name!r} ({served.checkpoint or 'no checkpoint yet'}) by the serve app "
                f"watching {served.root}: GET /v1/sample?model={served.name}")
    if r.state is State.SUCCEEDED or r.checkpoint:
        return (f"  served as  - (not yet: the serve app watching {served.root} rescans every "
                f"{served.scan_interval_s:g} s; a run is served once it has a committed checkpoint)")
    return None


def show(queue: Queue, request_id: int, now: float | None = None) -> str:
    now = now if now is not None else time.time()
    r = queue.get(request_id)
    lines = [
        f"request {r.id}: {r.name}",
        f"  state      {_state_text(r, now)}",
        f"  progress   {progress_bar(r.kimg, r.target_kimg)}",
        f"  checkpoint {r.checkpoint or '-'}"
        + (f" ({r.checkpoint_kimg:.3f} kimg)" if r.checkpoint_kimg is not None else ""),
        f"  priority   {r.priority}    attempts {r.attempts} (stalled {r.stalled} of at most {r.max_attempts})",
        f"  run        {r.out}",
        f"  data       {r.data or '-'}",
        f"  command    {_command(r)}",
        f"  created    {_stamp(r.created_at)}    started {_stamp(r.started_at)}    finished {_stamp(r.finished_at)}",
    ]
    if r.last_error:
        lines.append(f"  last error {r.last_error}")
    served = _served_line(r)
    if served:
        lines.append(served)
    attempts = queue.attempts(r.id)
    lines.append("")
    lines.append(f"attempts ({len(attempts)}):" if attempts else "attempts: none yet")
    lines += [_attempt_line(a) for a in attempts]
    lines.append("")
    lines.append("events:")
    lines += [f"  {_stamp(e.at)}  {e.kind:<12} {e.detail}" for e in queue.events(r.id)]
    return "\n".join(lines)
