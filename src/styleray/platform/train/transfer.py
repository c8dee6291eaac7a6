"""``--init-from RUN_OR_PKL``: a new run that starts from another model's G, D and G_ema (transfer learning).

    driver   resolve_run(settings, dataset header) -> RunSpec: the source's model configuration (a styleray
             checkpoint's, or read from an NVIDIA pickle), checked against what the settings ask for (each
             difference listed with its fix: the reference silently trains garbage there), and ``init_from``
             pinned to the source (a run folder: its newest checkpoint at this moment)
    workers  start_from_source(trainer, uri) when the run starts (kimg 0, fresh optimizers, the run's own ADA
             p), never when it resumes from its own checkpoints

Every route to a run (``styleray train``, sweeps' trials, the queue's check on arrival) resolves its settings
here, so --init-from and --freeze-d behave the same on all of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from styleray import storage
from styleray.config import ModelConfig, RunSpec
from styleray.settings import SettingsError, TrainSettings

log = logging.getLogger(__name__)


PRESET_FIELDS = (("channel_base", "channel base"), ("channel_max", "channel max"), ("z_dim", "z_dim"),
                 ("w_dim", "w_dim"), ("mapping_layers", "mapping depth"), ("mbstd_group", "minibatch-std group"))


@dataclass(frozen=True)
class Source:
    uri: str  # a checkpoint folder, or an NVIDIA network pickle
    model: ModelConfig
    kind: str  # "checkpoint", "pickle", or "resumed" (the run's own newest checkpoint: the source is not read)


def resolve_run(settings: TrainSettings, resolution: int, channels: int, num_classes: int,
                device: str = "cpu") -> RunSpec:
    """``settings.resolve`` for a dataset of this header, with the --init-from source's model in place (and
    --freeze-d checked against the discriminator). SettingsError naming each conflict and its fix."""
    from styleray.models.transfer import discriminator_layer_count

    run = settings.resolve(resolution, channels, num_classes, device)
    if settings.init_from is not None:
        source = _started_model(run.out, settings) or read_source(settings.init_from)
        model = check_against_source(settings, run, source)
        run = dataclasses.replace(run, model=model, init_from=source.uri)
        log.info("--init-from: %s %s (%d px, %s)", source.kind, source.uri, model.resolution,
                 f"{model.c_dim} classes" if model.c_dim else "unconditional")
    layers = discriminator_layer_count(run.model)
    if settings.freeze_d > layers:
        raise SettingsError(f"freeze_d (--freeze-d) = {settings.freeze_d}: the discriminator at "
                            f"{run.model.resolution} px has {layers} layers in its blocks; use 0 to {layers}")
    return run


def read_source(init_from: str) -> Source:
    """The source's checkpoint URI (a run folder: its newest loadable checkpoint) or pickle path, and its
    model configuration. SettingsError when there is none."""
    from styleray.platform import checkpoint as ckpt_lib

    path = storage.absolute(init_from)
    flag = f"init_from (--init-from) = {init_from}"
    if storage.exists(storage.join(path, "meta.json")) or storage.exists(ckpt_lib.checkpoints_dir(path)):
        try:
            ck = ckpt_lib.resolve(path)
        except ckpt_lib.CheckpointError as e:
            raise SettingsError(f"{flag}: {e} (train or import that run first)") from None
        return Source(uri=ck.uri, model=ModelConfig(**ck.state["model_cfg"]), kind="checkpoint")
    if not storage.exists(path):
        raise SettingsError(f"{flag} does not exist (give a styleray run or checkpoint folder, or a .pkl)")
    model, _ = _read_pickle(path, flag)
    return Source(uri=path, model=model, kind="pickle")


def _read_pickle(path: str, flag: str):
    from styleray.models.interop.nvidia_networks import convert_networks
    from styleray.models.interop.nvidia_pickle import NetworkPickleError, read_network_pickle

    try:
        imported = convert_networks(read_network_pickle(storage.read_bytes(path), path), path)
    except NetworkPickleError as e:
        raise SettingsError(f"{flag}: {e}") from None
    except IsADirectoryError:
        raise SettingsError(f"{flag} is a folder with no checkpoints (train or import into it first)") from None
    except OSError as e:
        raise SettingsError(f"{flag} cannot be read: {e.strerror or e}") from None
    return imported.model, imported.states


def _started_model(out: str | None, settings: TrainSettings) -> Source | None:
    """When the run will resume from its own checkpoint, that checkpoint's model (the source is then not read
    again, so a resumed run does not need it any more); None when the run starts now."""
    from styleray.platform import checkpoint as ckpt_lib

    if out is None or settings.resume != "latest":
        return None
    for uri in reversed(ckpt_lib.list_checkpoints(storage.absolute(out))):
        try:
            if storage.exists(storage.join(uri, "meta.json")):
                spec = RunSpec.from_dict(json.loads(storage.read_bytes(storage.join(uri, "config.json"))))
                return Source(uri=spec.init_from or storage.absolute(settings.init_from), model=spec.model,
                              kind="resumed")
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# ---------------------------------------------------------------------------------------------------------
# The source's configuration against the settings
# ---------------------------------------------------------------------------------------------------------


def check_against_source(settings: TrainSettings, run: RunSpec, source: Source) -> ModelConfig:
    """The run's model: the source's (with this run's classes). SettingsError listing every difference between
    the source and what the settings, the preset or the dataset ask for, each with its fix."""
    src, ours = source.model, run.model
    problems = _data_differences(settings, src, ours)
    if settings.map is not None and settings.map != src.mapping_layers:
        problems.append(f"mapping depth: the source has {src.mapping_layers} layers, --map {settings.map} asks for "
                        f"{settings.map} (drop --map)")
    if settings.preset != "auto":  # an explicit preset's architecture must be the source's
        for field, label in PRESET_FIELDS:
            if getattr(ours, field) != getattr(src, field) and not (field == "mapping_layers" and settings.map):
                fix = f"add --map {src.mapping_layers}, or " if field == "mapping_layers" else ""
                problems.append(f"{label}: the source has {getattr(src, field)}, --preset {settings.preset} "
                                f"{getattr(ours, field)} ({fix}drop --preset: the source's architecture is used)")
    problems += _mbstd_difference(run, src)
    if problems:
        raise SettingsError(f"init_from (--init-from) = {settings.init_from}: the source's model does not match "
                            f"this run: {'; '.join(problems)}")
    return dataclasses.replace(src, c_dim=ours.c_dim)


def _mbstd_difference(run: RunSpec, src: ModelConfig) -> list[str]:
    """D's minibatch-std layer groups min(group, round) of each round's images: the source's group must
    divide a round (a worker's whole share when it runs one round)."""
    train, size = run.train, run.train.round_batch
    group = min(src.mbstd_group, size)
    if size % group == 0:
        return []
    if train.rounds > 1:
        return [f"minibatch-std group: the source's is {src.mbstd_group}, and --batch-gpu {size} rounds cannot be "
                f"split into groups of {group} (make --batch-gpu a multiple of {group})"]
    fix = max(group, round(size / group) * group) * train.workers
    return [f"minibatch-std group: the source's is {src.mbstd_group}, and --batch {train.batch} over --workers "
            f"{train.workers} is {size} per worker (try --batch {fix})"]


def _data_differences(settings: TrainSettings, src: ModelConfig, ours: ModelConfig) -> list[str]:
    """Resolution, channels and classes: what the dataset (or --resolution, --cond) gives against the source."""
    problems = []
    if ours.resolution != src.resolution:
        fix = f"train on data prepared at {src.resolution} px: styleray prepare ... --resolution {src.resolution}"
        fix += f", with --resolution {src.resolution} or none" if settings.resolution else ""
        problems.append(f"resolution: the source is {src.resolution} px, this run {ours.resolution} px ({fix})")
    if ours.img_channels != src.img_channels:
        problems.append(f"channels: the source makes {src.img_channels}-channel images, {settings.data} holds "
                        f"{ours.img_channels}-channel ones (prepare the data as {'RGB' if src.img_channels == 3 else 'grayscale'})")
    if src.c_dim > 0 and ours.c_dim == 0:
        problems.append(f"classes: the source is conditional with {src.c_dim} classes (add --cond, with a dataset of "
                        f"{src.c_dim} classes)")
    elif src.c_dim > 0 and ours.c_dim != src.c_dim:
        problems.append(f"classes: the source has {src.c_dim} classes, {settings.data} {ours.c_dim} (prepare the "
                        f"data with --clusters {src.c_dim}, or start from an unconditional source)")
    return problems


# ---------------------------------------------------------------------------------------------------------
# The workers
# ---------------------------------------------------------------------------------------------------------


def load_source(uri: str) -> tuple[ModelConfig, dict[str, dict[str, Any]]]:
    """The source's model configuration and its G, D and G_ema state dicts (a checkpoint, or a pickle)."""
    from styleray.platform import checkpoint as ckpt_lib

    if storage.exists(storage.join(uri, "meta.json")):
        ck = ckpt_lib.load_checkpoint(uri)
        return ModelConfig(**ck.state["model_cfg"]), {k: ck.state[k] for k in ("G", "D", "G_ema")}
    return _read_pickle(uri, f"--init-from {uri}")


def start_from_source(trainer, uri: str) -> None:
    """Give a freshly built trainer the source's G, D and G_ema (its optimizers, counters and ADA p stay
    fresh)."""
    from styleray.models.transfer import start_from

    source_cfg, states = load_source(uri)
    for note in start_from(trainer.G, trainer.D, trainer.G_ema, states, source_cfg):
        log.info("--init-from: %s", note)
    log.info("started from %s: G, D and G_ema (kimg 0, fresh optimizers, augment p %.3f)", uri, trainer.augment_p)
