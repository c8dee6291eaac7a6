"""Finding a pretrained network's weights file on this machine. Nothing is ever downloaded.

A file is looked up in order: the path given on the command line (a file, or a folder holding the file),
else the environment variable, else the cache folder (``$XDG_CACHE_HOME/styleray`` or
``~/.cache/styleray``). A missing file raises :class:`MissingWeightsError` naming the file, every place
looked, and where to get it. Environment and home are read when called, never at import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


class MissingWeightsError(FileNotFoundError, ValueError):
    """A weights file is not where it was looked for (a ValueError too: a user error with a fix)."""


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/styleray`` or ``~/.cache/styleray``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "styleray")


@dataclass(frozen=True)
class WeightsFile:
    what: str  # what the file is, for messages: "Inception-v3 FID weights"
    filename: str  # its published name, e.g. pt_inception-2015-12-05-6726825d.pth
    url: str  # where to fetch it once
    flag: str  # the command-line flag that names it, e.g. --inception
    env: str  # the environment variable that names it, e.g. STYLERAY_INCEPTION

    def candidates(self, path: str | None) -> list[tuple[str, str]]:
        """(origin, file path) in lookup order: the flag's path, else the variable's, then the cache folder."""
        found: list[tuple[str, str]] = []

        def add(origin: str, p: str) -> None:
            p = os.path.expanduser(p)
            found.append((origin, os.path.join(p, self.filename) if os.path.isdir(p) else p))

        if path:
            add(self.flag, path)
        else:
            if os.environ.get(self.env):
                add(f"${self.env}", os.environ[self.env])
            add("cache folder", os.path.join(default_cache_dir(), self.filename))
        return found

    def find(self, path: str | None = None) -> str:
        """The file; MissingWeightsError listing every place looked when none has it."""
        candidates = self.candidates(path)
        for _, p in candidates:
            if os.path.isfile(p):
                return p
        looked = "; ".join(f"{origin}: {p}" for origin, p in candidates)
        cached = os.path.join(default_cache_dir(), self.filename)
        raise MissingWeightsError(
            f"{self.what} {self.filename} not found (looked in {looked}). styleray never downloads at run time: "
            f"fetch {self.url} once (e.g. `curl -L -o {cached} {self.url}`), then pass {self.flag} PATH, set "
            f"{self.env}=PATH, or leave it in {default_cache_dir()}/"
        )

    def read_state_dict(self, file: str) -> dict[str, Any]:
        """The state_dict in ``file`` (plain tensors, ``weights_only=True``: no pickled code); ValueError naming
        the file and the one expected when it is not one."""
        import torch

        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any decode failure: the file is not the state_dict we need
            expected = f"expected {self.filename} from {self.url}"
            raise ValueError(f"{file}: not a loadable state_dict ({e}); {expected}") from e
        if not isinstance(state, dict):
            raise ValueError(f"{file}: holds a {type(state).__name__}, not a state_dict; expected {self.filename}")
        return state
