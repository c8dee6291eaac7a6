"""The search space of a sweep (``styleray tune --space space.yaml``), checked before anything runs.

Keys are train flags without dashes (so the best trial's values are a ``styleray train --config`` file as
they stand); each value is a constant or one distribution::

    lr_g:   {loguniform: [0.0005, 0.005]}   # learning rate of G
    lr_d:   {loguniform: [0.0005, 0.005]}   # learning rate of D (or lr: for both)
    gamma:  {choice: [0.05, 0.1, 0.5]}      # R1 weight
    batch:  {choice: [8, 16]}               # total batch
    target: {uniform: [0.5, 0.7]}           # ADA target
    map:    {grid: [1, 2]}                  # mapping network depth
    mirror: {choice: [true, false]}
    augment_p: 0.0                          # a constant: every trial trains with it

``grid`` values are crossed (every combination runs; with random search, --trials samples per combination);
``choice`` samples one of the values, ``uniform``/``loguniform`` a float in [low, high]. A model-based search
(optuna) needs distributions, not grids; ``--search grid`` needs discrete values (choice or grid).

Population-based training perturbs only what a running model can change: the learning rates, gamma, the
ADA target, mirror and augment_p. batch and map shape the networks (and the minibatch-std groups), so PBT
keeps the values a trial starts with (an exploiting trial takes them from the trial it copies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from styleray.settings import SettingsError, convert, read_yaml, value_type

# The train settings a sweep may vary (settings.TrainSettings fields: their types and checks apply).
SPACE_KEYS = ("lr", "lr_g", "lr_d", "gamma", "batch", "target", "map", "mirror", "augment_p")
PBT_MUTABLE = ("lr", "lr_g", "lr_d", "gamma", "target", "mirror", "augment_p")
KINDS = ("choice", "grid", "uniform", "loguniform")


@dataclass(frozen=True)
class Param:
    key: str
    kind: str  # "const", or one of KINDS
    values: tuple  # const: (value,); choice/grid: the values; uniform/loguniform: (low, high)

    @property
    def discrete(self) -> bool:
        return self.kind in ("const", "choice", "grid")


@dataclass(frozen=True)
class SearchSpace:
    params: tuple[Param, ...]
    source: str = "space.yaml"

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.params)

    def grid_size(self, search: str = "random") -> int:
        """Combinations crossed: the grid entries (with --search grid, the choice entries too)."""
        axes = ("grid", "choice") if search == "grid" else ("grid",)
        return math.prod(len(p.values) for p in self.params if p.kind in axes)

    def num_trials(self, search: str, samples: int) -> int:
        """Trials a sweep runs: every combination once (grid), or samples per grid combination."""
        if search == "grid":
            return self.grid_size("grid")
        return samples * (self.grid_size() if search == "random" else 1)

    def tune_space(self, search: str) -> dict[str, Any]:
        """Ray Tune's param_space for this search ("grid", "random" or "optuna")."""
        from ray import tune

        out: dict[str, Any] = {}
        for p in self.params:
            if p.kind == "const":
                out[p.key] = p.values[0]
            elif p.kind == "grid" or (p.kind == "choice" and search == "grid"):
                out[p.key] = tune.grid_search(list(p.values))
            elif p.kind == "choice":
                out[p.key] = tune.choice(list(p.values))
            elif p.kind == "uniform":
                out[p.key] = tune.uniform(*p.values)
            else:
                out[p.key] = tune.loguniform(*p.values)
        return out

    def pbt_mutations(self) -> dict[str, Any]:
        """PopulationBasedTraining's hyperparam_mutations: the distributions of the keys PBT may perturb."""
        from ray import tune

        out: dict[str, Any] = {}
        for p in self.params:
            if p.key not in PBT_MUTABLE or p.kind == "const":
                continue
            if p.kind in ("choice", "grid"):
                out[p.key] = list(p.values)
            elif p.kind == "uniform":
                out[p.key] = tune.uniform(*p.values)
            else:
                out[p.key] = tune.loguniform(*p.values)
        return out

    def check_search(self, search: str, scheduler: str) -> None:
        """ValueError when the space does not suit the search or the scheduler."""
        if search == "grid":
            for p in self.params:
                if not p.discrete:
                    raise ValueError(
                        f"--search grid needs discrete values, but {self.source}: {p.key} is {p.kind}: "
                        f"give {p.key}: {{grid: [...]}}, or use --search random"
                    )
        if search == "optuna":
            for p in self.params:
                if p.kind == "grid":
                    raise ValueError(
                        f"--search optuna samples distributions, but {self.source}: {p.key} is a grid: "
                        f"write {p.key}: {{choice: {list(p.values)}}}, or use --search grid/random"
                    )
        if scheduler == "pbt" and not self.pbt_mutations():
            raise ValueError(
                f"--scheduler pbt perturbs {', '.join(PBT_MUTABLE)}, but {self.source} varies none of them: "
                "give one a distribution, or use --scheduler asha/none"
            )


def _check_value(key: str, value: Any, source: str) -> Any:
    """The value converted and checked as the train setting ``key`` is (settings.convert)."""
    try:
        return convert(key, value)
    except SettingsError as e:
        raise ValueError(f"{source}: {e}") from None


def _param(key: str, spec: Any, source: str) -> Param:
    if not isinstance(spec, dict):
        return Param(key, "const", (_check_value(key, spec, source),))
    if len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ValueError(
            f"{source}: {key} must be a constant or one of {{choice: [...]}}, {{grid: [...]}}, "
            f"{{uniform: [low, high]}}, {{loguniform: [low, high]}}; got {spec!r}"
        )
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ValueError(f"{source}: {key}: {kind} needs a non-empty list, got {values!r}")
    values = [_check_value(key, v, source) for v in values]
    if kind in ("uniform", "loguniform"):
        if value_type(key) is not float:
            raise ValueError(f"{source}: {key} takes whole values or true/false: use choice or grid, not {kind}")
        if len(values) != 2 or not values[0] < values[1]:
            raise ValueError(f"{source}: {key}: {kind} needs [low, high] with low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"{source}: {key}: loguniform needs low > 0, got {values[0]}")
    elif len(set(values)) != len(values):
        raise ValueError(f"{source}: {key}: {kind} lists a value twice: {values}")
    return Param(key, kind, tuple(values))


def parse_space(doc: Any, source: str = "space.yaml") -> SearchSpace:
    """A SearchSpace from the YAML document; ValueError naming the key and the fix for anything wrong."""
    if not isinstance(doc, dict) or not doc:
        raise ValueError(f"{source}: expected a mapping of hyperparameters ({', '.join(SPACE_KEYS)})")
    params = []
    for key, spec in doc.items():
        name = str(key).replace("-", "_")
        if name not in SPACE_KEYS:
            raise ValueError(
                f"{source}: unknown hyperparameter {key!r}; the space covers {', '.join(SPACE_KEYS)} "
                "(fixed train settings go in --train-config)"
            )
        params.append(_param(name, spec, source))
    keys = {p.key for p in params}
    if "lr" in keys and keys & {"lr_g", "lr_d"}:
        raise ValueError(f"{source}: give lr (both networks) or lr_g/lr_d, not both")
    if not any(p.kind != "const" for p in params):
        raise ValueError(f"{source}: every value is a constant: give at least one a distribution (choice, grid, ...)")
    return SearchSpace(tuple(params), source)


def load_space(path: str) -> SearchSpace:
    return parse_space(read_yaml(path, "--space"), path)
