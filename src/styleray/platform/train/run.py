"""``train(settings)``: what ``styleray train`` does, callable from a notebook or a test.

    TrainSettings -> metrics options (a missing Inception file fails before anything is read)
                  -> the dataset's header -> the resolved run (RunSpec; --init-from: the source's model,
                     transfer.resolve_run) -> ray_train.fit  (Ray Train)
                                           or local.fit_local (no_ray)
"""

from __future__ import annotations

from typing import Any

from styleray import storage
from styleray.settings import TrainSettings


class TrainingStopped(RuntimeError):
    """Training ended without reaching its target for a reason the user must act on (placement timed out,
    workers kept failing, training diverged); the message says what to do."""


def train(settings: TrainSettings) -> dict[str, Any]:
    """Train as the settings say; returns the run's summary (kimg, checkpoint, ...). TrainingStopped when
    the run could not finish, ValueError for settings or data that cannot work."""
    from styleray.platform.train.metrics import options_from_settings
    from styleray.platform.train.ray_train import PlacementTimeout, TrainingFailed
    from styleray.platform.train.stability import TrainingDiverged

    metrics = options_from_settings(settings)
    try:
        return _train_here(settings, metrics) if settings.no_ray else _train_on_ray(settings, metrics)
    except (PlacementTimeout, TrainingFailed, TrainingDiverged) as e:
        raise TrainingStopped(str(e)) from e


def _train_here(settings: TrainSettings, metrics) -> dict[str, Any]:
    import torch

    from styleray.datasets.read.folder import load_image_folder
    from styleray.platform.train.local import fit_local
    from styleray.platform.train.transfer import resolve_run

    data = load_image_folder(settings.data, resolution=settings.resolution)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = resolve_run(settings, data.resolution, data.channels, data.num_classes, device)
    if not settings.cond:
        data.labels, data.num_classes = None, 0
    plan = None
    if metrics is not None:
        from styleray.datasets.read.ray_data import inspect_dataset
        from styleray.platform.train.metrics import prepare

        info = inspect_dataset(storage.absolute(settings.data), storage.pyarrow_filesystem(settings.data)[0])
        same = list(info.files) == list(data.files)  # then its images are the ones already in memory
        plan = prepare(metrics, info, run.model.resolution, run.model.img_channels, device,
                       images=data.images if same else None)
    return fit_local(run, data, resume=settings.resume_from, metrics=plan, progress=not settings.no_progress)


def _train_on_ray(settings: TrainSettings, metrics) -> dict[str, Any]:
    from styleray.datasets.read.ray_data import inspect_dataset
    from styleray.platform.train import ray_train
    from styleray.platform.train.transfer import resolve_run

    data = inspect_dataset(storage.absolute(settings.data), storage.pyarrow_filesystem(settings.data)[0])
    run = resolve_run(settings, data.resolution, data.channels, data.num_classes)
    plan = None
    if metrics is not None:
        from styleray.platform.train.metrics import prepare

        plan = prepare(metrics, data, run.model.resolution, run.model.img_channels)
    return ray_train.fit(run, data=data, resume=settings.resume_from,
                         options=ray_train.RayOptions.from_settings(settings), metrics=plan)
