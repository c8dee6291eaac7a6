"""Models by name: which runs an application serves, under which names, from which of their checkpoints.

Where models come from (``ServeArgs``):

- ``checkpoint``: one checkpoint or run folder, served as it is at start until ``POST /v1/reload`` (the
  single-model server of old). Its name is its run folder's name.
- ``models``: ``NAME -> run folder`` (or a checkpoint folder), given by the operator.
- ``runs``: a ROOT folder or ``s3://`` prefix (e.g. the queue's out prefix), scanned every
  ``scan_interval_s``: every run folder in it, ``scan_depth`` levels down (ROOT/RUN, ROOT/GROUP/RUN), is a
  model. A run folder is a folder with a ``checkpoints/`` folder; it is listed once it has a committed
  checkpoint (``meta.json`` written, which is written last), so a run still being written is never half-read.

Runs in ``models`` and under ``runs`` are *followed*: each scan picks the checkpoint the run's ``best.json``
names, or else its newest committed one, and a change is published to the replicas (``registry.py``).

The naming rule (``name_for``): the run folder's name, with every character outside ``A-Z a-z 0-9 . _ -``
replaced by ``-`` (at most 64 characters). When two runs get the same name, the rule is:

1. a name given in ``models`` (or the ``checkpoint``'s) belongs to that run;
2. a name already given to a run (in an earlier scan of this application) stays with it;
3. otherwise the run nearer to ROOT, then the one whose path sorts first, gets the plain name;
4. every other run is named by its path under ROOT with ``/`` written as ``.`` (``old/heroes`` ->
   ``old.heroes``), and if even that is taken, it is not served (a warning says so).

Pure Python over ``styleray.storage`` (no Ray): the registry runs it on a thread, and tests call it directly.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from dataclasses import dataclass
from typing import Iterable

from styleray.serve.schemas import InvalidRequest
from styleray.serve.sources import run_folder

log = logging.getLogger("ray.serve")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "a model name is 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
CHECKPOINTS_DIR = "checkpoints"  # RUN/checkpoints/ckpt-N (styleray.platform.checkpoint)
BEST_FILE = "best.json"
_CKPT = re.compile(r"^ckpt-\d{12}$")
MAX_META_BYTES = 1 << 20


class UnknownModel(InvalidRequest):
    """A request for a name the application does not serve: 404 listing the names (the second argument)."""

    status = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown model"

    @property
    def extra(self) -> dict:
        return {"models": list(self.args[1])} if len(self.args) > 1 else {}


class ModelUnavailable(InvalidRequest):
    """A model that exists but cannot be served now (no loadable checkpoint): 503 naming it."""

    status = 503
    retry_after = 10


# -- names ---------------------------------------------------------------------------------------------------


def name_for(folder: str) -> str | None:
    """The model name of a run folder's name, per the rule above; None when nothing usable is left."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", folder.strip().strip("/").rsplit("/", 1)[-1])[:64]
    name = name.lstrip(".-_")
    return name if NAME_RE.fullmatch(name) else None


def check_name(name: str, what: str = "model") -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise ValueError(f"{what} name {name!r}: {NAME_RULE}")
    return name


@dataclass(frozen=True)
class Source:
    """One served model: its name and where it comes from."""

    name: str
    uri: str  # a run folder, or a checkpoint folder
    follow: bool  # True: rescanned, its best.json choice or newest committed checkpoint is served
    origin: str  # "checkpoint", "models" or "runs"
    relpath: str | None = None  # under ROOT (origin "runs")


def explicit_sources(checkpoint: str | None, models: dict[str, str]) -> list[Source]:
    """The operator's models: ``checkpoint`` (named after its run folder) first, then ``models`` in order."""
    out: list[Source] = []
    if checkpoint is not None:
        name = name_for(run_folder(checkpoint))
        if name is None:
            raise ValueError(f"checkpoint {checkpoint!r}: its run folder's name gives no model name ({NAME_RULE}); "
                             "serve it with models: {NAME: PATH} instead")
        out.append(Source(name, checkpoint, follow=False, origin="checkpoint"))
    for name, uri in models.items():
        if any(s.name == name for s in out):
            raise ValueError(f"model name {name!r} is given twice (the checkpoint's run folder is also {name!r})")
        out.append(Source(check_name(name), uri, follow=not _is_checkpoint_path(uri), origin="models"))
    return out


def assign_names(explicit: list[Source], found: Iterable[str], root: str,
                 previous: dict[str, str] | None = None) -> tuple[list[Source], list[str]]:
    """Explicit sources plus the run folders ``found`` under ``root`` (paths relative to it), named by the rule
    in the module doc. ``previous``: name -> run URI from the last scan (rule 2). Also the notes to log (each
    duplicate name, and what became of it)."""
    taken = {s.name: s.uri for s in explicit}
    explicit_uris = {_norm(s.uri) for s in explicit}
    relpaths = sorted(found, key=lambda p: (p.count("/"), p))
    by_uri = {_norm(join(root, p)): p for p in relpaths}
    sources, notes, pending = list(explicit), [], []
    for name, uri in (previous or {}).items():  # rule 2: names keep their runs
        rel = by_uri.get(_norm(uri))
        if rel is not None and name not in taken and _norm(uri) not in explicit_uris:
            taken[name] = uri
            sources.append(Source(name, uri, True, "runs", rel))
    kept = {_norm(s.uri) for s in sources}
    for rel in relpaths:
        uri = join(root, rel)
        if _norm(uri) in kept:
            continue
        plain, qualified = name_for(rel), name_for(rel.replace("/", "."))
        for name in (plain, qualified):
            if name is not None and name not in taken:
                break
        else:
            pending.append(f"{rel}: not served: its names {plain!r} and {qualified!r} are taken")
            continue
        if name != plain:
            notes.append(f"two runs named {plain!r}: {_public_rel(taken[plain], root)} serves as {plain!r}, "
                         f"{rel} as {name!r}")
        taken[name] = uri
        sources.append(Source(name, uri, True, "runs", rel))
    return sources, notes + pending


def _public_rel(uri: str, root: str) -> str:
    rel = _norm(uri).removeprefix(_norm(root) + "/")
    return rel


# -- scanning ------------------------------------------------------------------------------------------------


def find_runs(root: str, depth: int) -> list[str]:
    """Run folders (with a ``checkpoints/`` folder) under ``root``, at most ``depth`` levels down, as paths
    relative to it; hidden folders (``.name``) are skipped. Shallower first, then by path."""
    from styleray import storage

    try:
        storage.filesystem(root)[0].invalidate_cache()  # s3fs caches listings: new runs must show up
    except Exception:  # noqa: BLE001 - a filesystem without a cache
        pass
    found: list[str] = []
    level = [""]
    for _ in range(depth):
        below = []
        for rel in level:
            for child in storage.listdir(join(root, rel) if rel else root):
                if child.startswith(".") or _CKPT.match(child):
                    continue
                path = f"{rel}/{child}" if rel else child
                if CHECKPOINTS_DIR in storage.listdir(join(root, path)):
                    found.append(path)
                else:
                    below.append(path)
        level = below
    return sorted(found, key=lambda p: (p.count("/"), p))


@dataclass(frozen=True)
class Choice:
    """The checkpoint a model serves, as ``GET /v1/models`` lists it (read from its meta.json and config.json)."""

    checkpoint: str  # URI of the checkpoint folder
    kimg: float
    resolution: int | None
    classes: int | None
    fid: float | None
    kid: float | None
    chosen_by: str  # "best.json", "newest", "reload" or "start"

    @property
    def name(self) -> str:
        return self.checkpoint.rstrip("/").rsplit("/", 1)[-1]


def committed(ckpt: str) -> bool:
    """A checkpoint folder whose meta.json exists: written last, so its files are complete."""
    from styleray import storage

    return storage.exists(join(ckpt, "meta.json"))


def choose_checkpoint(run: str) -> Choice | None:
    """The checkpoint ``run`` should serve: the one its best.json names (when committed), else its newest
    committed one; None when it has none yet (or ``run`` cannot be read: logged)."""
    from styleray import storage

    try:
        storage.filesystem(run)[0].invalidate_cache()
        best = _best_name(run)
        if best is not None and committed(join(run, CHECKPOINTS_DIR, best)):
            return describe(join(run, CHECKPOINTS_DIR, best), "best.json")
        names = sorted(n for n in storage.listdir(join(run, CHECKPOINTS_DIR)) if _CKPT.match(n))
        for name in reversed(names):
            if committed(join(run, CHECKPOINTS_DIR, name)):
                return describe(join(run, CHECKPOINTS_DIR, name), "newest")
    except Exception as e:  # noqa: BLE001 - unreachable storage, a file vanishing mid-scan: next scan
        log.warning("cannot read run %s: %s: %s", run, type(e).__name__, e)
    return None


def _best_name(run: str) -> str | None:
    from styleray import storage

    try:
        best = json.loads(storage.read_bytes(join(run, BEST_FILE)))
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("ignoring unreadable %s", join(run, BEST_FILE))
        return None
    name = best.get("checkpoint") if isinstance(best, dict) else None
    return name if isinstance(name, str) and _CKPT.match(name) else None


def describe(ckpt: str, chosen_by: str) -> Choice:
    """A checkpoint's listing fields, from its meta.json and config.json (never its weights)."""
    meta = _small_json(join(ckpt, "meta.json"))
    try:
        model = _small_json(join(ckpt, "config.json")).get("model", {})
    except (FileNotFoundError, ValueError):
        model = {}
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    return Choice(ckpt, float(meta.get("kimg", 0.0)), _int(model.get("resolution")), _int(model.get("c_dim")),
                  _float(metrics.get("fid")), _float(metrics.get("kid")), chosen_by)


def _small_json(uri: str) -> dict:
    from styleray import storage

    fs, path = storage.filesystem(uri)
    if (fs.size(path) or 0) > MAX_META_BYTES:
        raise ValueError(f"{uri} is larger than {MAX_META_BYTES} bytes")
    value = json.loads(storage.read_bytes(uri))
    return value if isinstance(value, dict) else {}


def _int(v) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _float(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# -- paths -------------------------------------------------------------------------------------------------


def join(base: str, *parts: str) -> str:
    from styleray import storage

    return storage.join(base, *parts)


def _norm(uri: str) -> str:
    return uri.removeprefix("file://").rstrip("/")


def _is_checkpoint_path(uri: str) -> bool:
    """RUN/checkpoints/ckpt-N (by its name; a run folder otherwise)."""
    parent, name = posixpath.split(_norm(uri))
    return bool(_CKPT.match(name)) and posixpath.basename(parent) == CHECKPOINTS_DIR
