"""Where ``POST /v1/reload`` may read checkpoints from, and how server paths are shown to clients.

A reload names a checkpoint or run folder. It is read only when it is

- a local path under one of the allowed roots (default: the parent folder of the served run, so sibling
  runs and newer checkpoints of the same run are reachable; ``ServeArgs.reload_roots`` widens it). Symbolic
  links and ``..`` are resolved first, so neither leads out of a root. A relative path is relative to the
  first root: ``{"checkpoint": "r2"}`` is the served run's sibling ``r2``.
- a URI of an allowed scheme (``ServeArgs.reload_schemes``, default ``s3`` only). http(s), ftp and the other
  fsspec protocols are refused unless named there: a reload must not make the server fetch arbitrary URLs.

Clients never see the server's paths: local folders are named relative to their root (``r1/checkpoints/
ckpt-000000001000``), and error messages have the roots replaced by those names (``public``/``redact``).
Pure Python; the same policy object is used by the ingress (before anything is read) and the replicas.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

from styleray.serve.schemas import InvalidRequest

CHECKPOINTS_DIR = "checkpoints"  # run folder layout: RUN/checkpoints/ckpt-NNN (styleray.platform.checkpoint)
_CKPT_NAME = re.compile(r"^ckpt-\d{12}$")
# An absolute local path inside a message: a slash not preceded by a word character, a colon or a slash
# (so 's3://bucket/key' is left alone), then at least one more path component.
_LOCAL_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s'\"/:,;)]+/)+[^\s'\",;:)]*")


def scheme_of(target: str) -> str | None:
    """'s3' for 's3://b/k', None for a local path (a 'file://' URI counts as local)."""
    head, sep, _ = target.partition("://")
    if not sep or head == "file":
        return None
    return head.lower()


def run_folder(checkpoint: str) -> str:
    """The run folder of a checkpoint folder (RUN/checkpoints/ckpt-N -> RUN); a run folder stays itself."""
    path = checkpoint.rstrip("/")
    parent, name = posixpath.split(path) if scheme_of(path) else os.path.split(path)
    grand, mid = posixpath.split(parent) if scheme_of(path) else os.path.split(parent)
    return grand if _CKPT_NAME.match(name) and mid == CHECKPOINTS_DIR else path


def default_roots(served: str) -> tuple[str, ...]:
    """The parent folder of the served run (local); none for a remote run (its scheme is allowed instead)."""
    if scheme_of(served):
        return ()
    return (os.path.realpath(os.path.dirname(os.path.abspath(run_folder(served.removeprefix("file://"))))),)


@dataclass(frozen=True)
class SourcePolicy:
    """What reload may read. ``base``: where relative names resolve (the served run's parent)."""

    roots: tuple[str, ...]  # absolute local folders
    schemes: tuple[str, ...] = ("s3",)
    base: str = ""

    @classmethod
    def for_served(cls, served: str, roots: tuple[str, ...] | None, schemes: tuple[str, ...]) -> "SourcePolicy":
        chosen = tuple(os.path.realpath(os.path.abspath(r)) for r in roots) if roots else default_roots(served)
        if scheme_of(served):
            base = posixpath.dirname(run_folder(served))
        else:
            base = chosen[0] if chosen else os.path.dirname(os.path.abspath(run_folder(served)))
        return cls(roots=chosen, schemes=tuple(s.lower() for s in schemes), base=base)

    @classmethod
    def for_models(cls, served: list[str], runs: str | None, roots: tuple[str, ...] | None,
                   schemes: tuple[str, ...]) -> "SourcePolicy":
        """Several served paths: the default roots are every served run's parent folder, and ``runs`` itself."""
        first = served[0] if served else runs
        if first is None:
            raise ValueError("nothing to serve: give a checkpoint, models or runs")
        policy = cls.for_served(first, roots, schemes)
        if roots:
            return policy
        extra = [r for path in served[1:] for r in default_roots(path)]
        if runs is not None and not scheme_of(runs):
            extra.append(os.path.realpath(os.path.abspath(runs.removeprefix("file://"))))
        if not served and runs is not None:  # relative names are runs under ROOT
            base = runs if scheme_of(runs) else extra[-1]
            return cls(tuple(dict.fromkeys(extra)), policy.schemes, base)
        return cls(tuple(dict.fromkeys(policy.roots + tuple(extra))), policy.schemes, policy.base)

    def with_base(self, served: str) -> "SourcePolicy":
        """The same policy, relative names resolving beside ``served`` (a model's run or checkpoint)."""
        run = run_folder(served)
        if scheme_of(run):
            return SourcePolicy(self.roots, self.schemes, posixpath.dirname(run))
        return SourcePolicy(self.roots, self.schemes, os.path.dirname(os.path.abspath(run.removeprefix("file://"))))

    def resolve(self, target: str) -> str:
        """The absolute path or URI to read for ``target``; InvalidRequest (no server paths) when refused."""
        if "\x00" in target or not target.strip():
            raise InvalidRequest("checkpoint: give a checkpoint or run folder name (no NUL characters)")
        scheme = scheme_of(target)
        if scheme is not None:
            if scheme not in self.schemes:
                allowed = ", ".join(f"{s}://" for s in self.schemes) or "none"
                raise InvalidRequest(
                    f"checkpoint: the {scheme}:// scheme is not allowed for reload (allowed: local folders under "
                    f"the reload roots and {allowed}; ServeArgs.reload_schemes adds schemes)"
                )
            return target
        return self._resolve_local(target.removeprefix("file://"))

    def _resolve_local(self, path: str) -> str:
        if scheme_of(self.base):  # a remote served run: relative names are its siblings
            if os.path.isabs(path):
                raise InvalidRequest("checkpoint: local paths are not allowed for reload of a remote run")
            scheme, _, base = self.base.partition("://")
            joined = posixpath.normpath(posixpath.join(base, path))
            if not joined.startswith(base.rstrip("/") + "/"):
                raise InvalidRequest(f"checkpoint: {path[:200]!r} leads outside the served run's folder")
            return f"{scheme}://{joined}"
        real = os.path.realpath(os.path.join(self.base, path))  # resolves '..' and symbolic links
        if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots):
            raise InvalidRequest(
                f"checkpoint: {path[:200]!r} is outside the folders reload may read (the served run's parent "
                "folder; ServeArgs.reload_roots widens it)"
            )
        return real

    def public(self, uri: str) -> str:
        """How clients see ``uri``: relative to its root when local, else unchanged."""
        if scheme_of(uri):
            return uri
        path = os.path.abspath(uri.removeprefix("file://"))
        for root in sorted(self.roots, key=len, reverse=True):
            if path == root:
                return "."
            if path.startswith(root.rstrip(os.sep) + os.sep):
                return os.path.relpath(path, root)
        return os.path.basename(path.rstrip(os.sep)) or "."

    def redact(self, message: str) -> str:
        """A message with every local path replaced by its public name (or '<path>' outside the roots)."""
        return _LOCAL_PATH.sub(lambda m: self._public_or_hidden(m.group(0)), message)[:500]

    def _public_or_hidden(self, path: str) -> str:
        inside = any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in self.roots)
        return self.public(path) if inside else "<path>"
