"""The durable queue of training requests: one SQLite file that outlives every process.

    requests   one row per training request: its train settings (JSON of settings.TrainSettings, the values
               that differ from the defaults; as given when the request was rejected), target kimg, priority, state,
               the current Ray job (submission id), attempts, last known kimg and checkpoint, last error
    attempts   one row per Ray job submitted for a request: its deterministic submission id, Ray status,
               start/end times, kimg at start and end, and the recovery time after an interruption
    events     every decision, with the time (`styleray queue show ID` prints them)
    manager    the lease of the one manager that drives this queue, with its heartbeat
    meta       the queue's random id (part of every submission id) and the schema version (a queue of
               schema 1, which stored `styleray train` flags, is migrated on open)

Writers are short transactions (``BEGIN IMMEDIATE``) in WAL mode with a busy timeout, so the manager and
`styleray queue add/cancel` can write at the same time. Every state change is a compare-and-set on the state
the writer read (``UPDATE ... WHERE state = ?``): a request cancelled while the manager looked at it stays
cancelled. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterator

SCHEMA_VERSION = 2
DEFAULT_DB = os.path.join("~", ".styleray", "queue.db")
DB_ENV = "STYLERAY_QUEUE"  # overrides DEFAULT_DB
BUSY_TIMEOUT_S = 30.0


class State(str, Enum):
    QUEUED = "queued"  # waiting for its first attempt
    RUNNING = "running"  # a Ray job is training it
    INTERRUPTED = "interrupted"  # its last job was interrupted; the next attempt is due at retry_at
    RETRYING = "retrying"  # a resume attempt is submitted; training has not ticked since
    SUCCEEDED = "succeeded"  # reached its target kimg
    FAILED = "failed"  # a user error, or interrupted too often without progress (see last_error)
    CANCELLED = "cancelled"  # `styleray queue cancel`

    @property
    def terminal(self) -> bool:
        return self in (State.SUCCEEDED, State.FAILED, State.CANCELLED)


ACTIVE = (State.RUNNING, State.RETRYING)  # a job of theirs is (or should be) on the cluster
HOLDS_SLOT = (State.RUNNING, State.RETRYING, State.INTERRUPTED)  # count towards --max-running
SUBMITTING = "SUBMITTING"  # attempt status before the Jobs API confirmed the submission
LOST = "LOST"  # attempt status when the cluster no longer knows the job (head node restarted)
JOB_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED", LOST)


class QueueError(ValueError):
    """A queue operation a user asked for cannot be done (unknown id, already finished, ...)."""


class LeaseHeld(RuntimeError):
    """Another manager is driving this queue."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    settings TEXT NOT NULL,             -- JSON object: the train settings (settings.TrainSettings.to_json)
    config TEXT,                        -- JSON: the resolved RunSpec, when it could be resolved at add time
    data TEXT,
    out TEXT NOT NULL,                  -- the run folder (local or s3://): checkpoints and metrics.jsonl
    target_kimg REAL NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,      -- consecutive attempts without a new checkpoint before giving up
    state TEXT NOT NULL,
    job_id TEXT,                        -- submission id of the current (or last) attempt
    attempts INTEGER NOT NULL DEFAULT 0,
    stalled INTEGER NOT NULL DEFAULT 0, -- consecutive interrupted attempts without a new checkpoint
    kimg REAL,                          -- last known kimg (metrics.jsonl)
    checkpoint TEXT,                    -- newest committed checkpoint
    checkpoint_kimg REAL,
    retry_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS requests_state ON requests (state, priority, id);
CREATE TABLE IF NOT EXISTS attempts (
    request_id INTEGER NOT NULL REFERENCES requests (id),
    attempt INTEGER NOT NULL,
    submission_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,               -- SUBMITTING, then Ray's PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED, or LOST
    entrypoint TEXT NOT NULL,
    created_at REAL NOT NULL,
    submitted_at REAL,                  -- the Jobs API accepted it
    job_started_at REAL,
    job_ended_at REAL,
    exit_code INTEGER,
    message TEXT,
    start_kimg REAL,                    -- newest checkpoint's kimg when the attempt was made
    end_kimg REAL,                      -- newest checkpoint's kimg when it ended
    interrupted_at REAL,                -- resume attempts: when the previous attempt was interrupted
    resumed_at REAL,                    -- resume attempts: the first training tick after the restart
    recovery_s REAL,                    -- resumed_at - interrupted_at
    PRIMARY KEY (request_id, attempt)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id INTEGER,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_request ON events (request_id, id);
CREATE TABLE IF NOT EXISTS manager (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    address TEXT,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    poll_s REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Request:
    id: int
    name: str
    settings: dict[str, Any]
    config: dict[str, Any] | None
    data: str | None
    out: str
    target_kimg: float
    priority: int
    max_attempts: int
    state: State
    job_id: str | None
    attempts: int
    stalled: int
    kimg: float | None
    checkpoint: str | None
    checkpoint_kimg: float | None
    retry_at: float | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Request":
        d = dict(row)
        d["settings"] = json.loads(d["settings"])
        d["config"] = json.loads(d["config"]) if d["config"] else None
        d["state"] = State(d["state"])
        return cls(**d)


@dataclass(frozen=True)
class Attempt:
    request_id: int
    attempt: int
    submission_id: str
    status: str
    entrypoint: str
    created_at: float
    submitted_at: float | None
    job_started_at: float | None
    job_ended_at: float | None
    exit_code: int | None
    message: str | None
    start_kimg: float | None
    end_kimg: float | None
    interrupted_at: float | None
    resumed_at: float | None
    recovery_s: float | None

    @property
    def finished(self) -> bool:
        return self.status in JOB_TERMINAL


@dataclass(frozen=True)
class Event:
    id: int
    request_id: int | None
    at: float
    kind: str
    detail: str


@dataclass(frozen=True)
class Lease:
    owner: str
    host: str
    pid: int
    address: str | None
    started_at: float
    heartbeat_at: float
    poll_s: float


def default_path() -> str:
    return os.path.expanduser(os.environ.get(DB_ENV) or DEFAULT_DB)


class Queue:
    """The queue in one SQLite file (created on first use). One object per process; not thread-safe."""

    def __init__(self, path: str | None = None, *, clock=time.time):
        self.path = os.path.abspath(os.path.expanduser(path or default_path()))
        self.clock = clock
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise ValueError(f"--db {self.path}: cannot open the queue database: {e}") from e
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('queue_id', ?)", (uuid.uuid4().hex[:8],))
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        version = int(self._meta("schema"))
        if version == 1:
            version = self._migrate_from_flags()
        if version != SCHEMA_VERSION:
            raise ValueError(f"--db {self.path} has queue schema {version}; this styleray reads {SCHEMA_VERSION}")
        self.queue_id = self._meta("queue_id")

    def _migrate_from_flags(self) -> int:
        """Schema 1 -> 2: each request's `styleray train` flags become its settings (flags that no longer parse
        are kept as ``{"argv": [...]}``, which the manager refuses with the reason)."""
        from styleray.settings import SettingsError, from_argv

        with self._tx() as db:
            if "train_args" in {r["name"] for r in db.execute("PRAGMA table_info(requests)")}:
                db.execute("ALTER TABLE requests RENAME COLUMN train_args TO settings")
            for row in db.execute("SELECT id, settings FROM requests").fetchall():
                argv = json.loads(row["settings"])
                if isinstance(argv, list):
                    try:
                        settings = from_argv(argv).changed()
                    except SettingsError:
                        settings = {"argv": argv}
                    db.execute("UPDATE requests SET settings = ? WHERE id = ?", (json.dumps(settings), row["id"]))
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
        return SCHEMA_VERSION

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock up front (no upgrade deadlocks between writers)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _meta(self, key: str) -> str:
        return self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    # ------------------------------------------------------------------------------------------ requests

    def add(
        self,
        *,
        name: str,
        settings: dict[str, Any],
        out: str,
        target_kimg: float,
        data: str | None = None,
        config: dict[str, Any] | None = None,
        priority: int = 0,
        max_attempts: int = 5,
        error: str | None = None,
    ) -> Request:
        """Append a request (state queued; or failed with ``error`` when it was rejected on arrival)."""
        now = self.clock()
        state = State.FAILED if error else State.QUEUED
        with self._tx() as db:
            if not error:
                clash = db.execute(
                    "SELECT id, name FROM requests WHERE out = ? AND state NOT IN (?, ?, ?)",
                    (out, State.SUCCEEDED.value, State.FAILED.value, State.CANCELLED.value),
                ).fetchone()
                if clash:
                    raise QueueError(
                        f"--out {out} is the run folder of request {clash['id']} ({clash['name']}), which is not "
                        "finished: two runs must not share a folder (use another --out, or cancel it first)"
                    )
            cur = db.execute(
                "INSERT INTO requests (name, settings, config, data, out, target_kimg, priority, max_attempts, "
                "state, created_at, updated_at, finished_at, last_error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    name, json.dumps(settings, sort_keys=True), json.dumps(config) if config else None, data, out,
                    float(target_kimg), int(priority), int(max_attempts), state.value, now, now,
                    now if error else None, error,
                ),
            )
            rid = cur.lastrowid
            self._event(db, rid, "rejected" if error else "queued",
                        error or f"{name}: {target_kimg:g} kimg into {out}, priority {priority}")
        return self.get(rid)

    def get(self, request_id: int) -> Request:
        row = self._db.execute("SELECT * FROM requests WHERE id = ?", (int(request_id),)).fetchone()
        if row is None:
            raise QueueError(f"no request {request_id} in {self.path} (see `styleray queue list`)")
        return Request.from_row(row)

    def find(self, ref: str | int) -> Request:
        """A request by its id, or by its name (the newest request of that name)."""
        if isinstance(ref, int) or str(ref).isdigit():
            return self.get(int(ref))
        row = self._db.execute("SELECT * FROM requests WHERE name = ? ORDER BY id DESC LIMIT 1", (str(ref),)).fetchone()
        if row is None:
            raise QueueError(f"no request named {ref!r} in {self.path} (see `styleray queue list`)")
        return Request.from_row(row)

    def list(self, states: tuple[State, ...] | None = None) -> list[Request]:
        """Requests in display order: by state group, then priority (high first), then age."""
        sql = "SELECT * FROM requests"
        params: tuple = ()
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            params = tuple(s.value for s in states)
        rows = self._db.execute(sql + " ORDER BY priority DESC, id ASC", params).fetchall()
        return [Request.from_row(r) for r in rows]

    def next_queued(self) -> Request | None:
        """The queued request to start next: highest priority, then oldest."""
        row = self._db.execute(
            "SELECT * FROM requests WHERE state = ? ORDER BY priority DESC, id ASC LIMIT 1", (State.QUEUED.value,)
        ).fetchone()
        return Request.from_row(row) if row else None

    def count(self, states: tuple[State, ...]) -> int:
        q = f"SELECT COUNT(*) FROM requests WHERE state IN ({','.join('?' * len(states))})"
        return self._db.execute(q, tuple(s.value for s in states)).fetchone()[0]

    def transition(self, request_id: int, expected: State | tuple[State, ...], new: State, *,
                   event: tuple[str, str] | None = None, **fields: Any) -> bool:
        """Compare-and-set the state (and set ``fields``); False if the request was no longer ``expected``."""
        expected = expected if isinstance(expected, tuple) else (expected,)
        now = self.clock()
        fields = {**fields, "state": new.value, "updated_at": now}
        if new.terminal:
            fields.setdefault("finished_at", now)
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE requests SET {sets} WHERE id = ? AND state IN ({','.join('?' * len(expected))})",
                (*fields.values(), request_id, *(s.value for s in expected)),
            )
            if cur.rowcount and event:
                self._event(db, request_id, *event)
        return bool(cur.rowcount)

    def update(self, request_id: int, **fields: Any) -> None:
        """Set bookkeeping fields (progress, errors) without touching the state."""
        fields["updated_at"] = self.clock()
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(f"UPDATE requests SET {sets} WHERE id = ?", (*fields.values(), request_id))

    def cancel(self, request_id: int) -> tuple[Request, Attempt | None]:
        """Cancel a request that has not finished; returns it and its attempt whose job may still run."""
        req = self.get(request_id)
        if req.state.terminal:
            raise QueueError(f"request {request_id} ({req.name}) is already {req.state.value}")
        event = ("cancelled", "by `styleray queue cancel`")
        if not self.transition(request_id, req.state, State.CANCELLED, event=event):
            return self.cancel(request_id)  # it changed under us: look again
        att = self.current_attempt(request_id)
        return self.get(request_id), (att if att is not None and not att.finished else None)

    # ------------------------------------------------------------------------------------------ attempts

    def start_attempt(self, req: Request, *, submission_id: str, entrypoint: str, new_state: State,
                      start_kimg: float | None, interrupted_at: float | None) -> Attempt | None:
        """Record attempt ``req.attempts + 1`` and move the request to ``new_state`` in one transaction,
        before anything is submitted; None if the request changed state meanwhile (e.g. cancelled)."""
        now = self.clock()
        n = req.attempts + 1
        with self._tx() as db:
            cur = db.execute(
                "UPDATE requests SET state = ?, attempts = ?, job_id = ?, retry_at = NULL, updated_at = ?, "
                "started_at = COALESCE(started_at, ?) WHERE id = ? AND state = ? AND attempts = ?",
                (new_state.value, n, submission_id, now, now, req.id, req.state.value, req.attempts),
            )
            if not cur.rowcount:
                return None
            db.execute(
                "INSERT INTO attempts (request_id, attempt, submission_id, status, entrypoint, created_at, "
                "start_kimg, interrupted_at) VALUES (?,?,?,?,?,?,?,?)",
                (req.id, n, submission_id, SUBMITTING, entrypoint, now, start_kimg, interrupted_at),
            )
            self._event(db, req.id, "attempt", f"attempt {n}: submitting {submission_id}")
        return self.attempt(req.id, n)

    def attempt(self, request_id: int, n: int) -> Attempt | None:
        row = self._db.execute(
            "SELECT * FROM attempts WHERE request_id = ? AND attempt = ?", (request_id, n)
        ).fetchone()
        return Attempt(**dict(row)) if row else None

    def current_attempt(self, request_id: int) -> Attempt | None:
        row = self._db.execute(
            "SELECT * FROM attempts WHERE request_id = ? ORDER BY attempt DESC LIMIT 1", (request_id,)
        ).fetchone()
        return Attempt(**dict(row)) if row else None

    def attempts(self, request_id: int | None = None) -> list[Attempt]:
        if request_id is None:
            rows = self._db.execute("SELECT * FROM attempts ORDER BY request_id, attempt").fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM attempts WHERE request_id = ? ORDER BY attempt", (request_id,)
            ).fetchall()
        return [Attempt(**dict(r)) for r in rows]

    def update_attempt(self, att: Attempt, **fields: Any) -> Attempt:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            db.execute(
                f"UPDATE attempts SET {sets} WHERE request_id = ? AND attempt = ?",
                (*fields.values(), att.request_id, att.attempt),
            )
        return self.attempt(att.request_id, att.attempt)

    def unfinished_attempts_of(self, states: tuple[State, ...]) -> list[tuple[Request, Attempt]]:
        """Attempts whose job may still run, of requests in ``states`` (e.g. cancelled ones to stop)."""
        in_states, in_terminal = ",".join("?" * len(states)), ",".join("?" * len(JOB_TERMINAL))
        rows = self._db.execute(
            "SELECT a.request_id, a.attempt FROM attempts a JOIN requests r ON r.id = a.request_id "
            f"WHERE r.state IN ({in_states}) AND a.status NOT IN ({in_terminal})",
            (*(s.value for s in states), *JOB_TERMINAL),
        ).fetchall()
        return [(self.get(r["request_id"]), self.attempt(r["request_id"], r["attempt"])) for r in rows]

    # ------------------------------------------------------------------------------------------ events

    def _event(self, db: sqlite3.Connection, request_id: int | None, kind: str, detail: str) -> None:
        db.execute(
            "INSERT INTO events (request_id, at, kind, detail) VALUES (?,?,?,?)",
            (request_id, self.clock(), kind, detail),
        )

    def event(self, request_id: int | None, kind: str, detail: str) -> None:
        with self._tx() as db:
            self._event(db, request_id, kind, detail)

    def events(self, request_id: int | None = None, limit: int | None = None) -> list[Event]:
        sql, params = "SELECT * FROM events", ()
        if request_id is not None:
            sql, params = sql + " WHERE request_id = ?", (request_id,)
        sql += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [Event(**dict(r)) for r in reversed(self._db.execute(sql, params).fetchall())]

    # ------------------------------------------------------------------------------------------ lease

    def acquire_lease(self, *, owner: str, address: str | None, poll_s: float, stale_after_s: float) -> Lease:
        """Become the queue's manager. LeaseHeld if another one's heartbeat is fresh and, on this host, its
        process is alive; a dead or silent manager's lease is taken over (and the takeover logged)."""
        now = self.clock()
        host, pid = socket.gethostname(), os.getpid()
        with self._tx() as db:
            row = db.execute("SELECT * FROM manager WHERE id = 1").fetchone()
            if row is not None and row["owner"] != owner:
                held = Lease(**{k: row[k] for k in Lease.__dataclass_fields__})
                # On this host a dead pid frees the lease at once; our own pid is a previous Manager object of
                # this process (a notebook, a test), which cannot be polling at the same time as this one.
                alive = (held.pid != pid and _pid_alive(held.pid)) if held.host == host else True
                fresh = now - held.heartbeat_at < stale_after_s
                if alive and fresh:
                    silent = now - held.heartbeat_at
                    raise LeaseHeld(
                        f"another manager (pid {held.pid} on {held.host}, last heartbeat {silent:.0f}s ago) drives "
                        f"{self.path}: stop it, or wait {stale_after_s - silent:.0f}s for its lease to expire"
                    )
                why = "its process is gone" if not alive else f"silent for {now - held.heartbeat_at:.0f}s"
                self._event(db, None, "manager", f"took over from pid {held.pid} on {held.host} ({why})")
            db.execute(
                "INSERT OR REPLACE INTO manager (id, owner, host, pid, address, started_at, heartbeat_at, poll_s) "
                "VALUES (1,?,?,?,?,?,?,?)",
                (owner, host, pid, address, now, now, poll_s),
            )
            self._event(db, None, "manager", f"pid {pid} on {host} drives the queue ({address or 'default address'})")
        return self.lease()

    def heartbeat(self, owner: str) -> bool:
        """Refresh our lease; False if another manager took it over."""
        with self._tx() as db:
            cur = db.execute("UPDATE manager SET heartbeat_at = ? WHERE id = 1 AND owner = ?", (self.clock(), owner))
        return bool(cur.rowcount)

    def release_lease(self, owner: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM manager WHERE id = 1 AND owner = ?", (owner,)).rowcount:
                self._event(db, None, "manager", f"pid {os.getpid()} stopped")

    def lease(self) -> Lease | None:
        row = self._db.execute("SELECT * FROM manager WHERE id = 1").fetchone()
        return Lease(**{k: row[k] for k in Lease.__dataclass_fields__}) if row else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
