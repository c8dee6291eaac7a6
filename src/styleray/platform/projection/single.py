"""One target, start to end: frame it, search its latent, tune around it (optional), write its folder.

A :class:`Projector` holds the loaded generator and distance, so the CLI (one image) and each actor of the
folder job (many images) load them once and project target after target.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from styleray import storage
from styleray.datasets.prepare.target import Target, frame_target
from styleray.models.projection.choose import build_distance
from styleray.models.projection.distances import Distance, psnr_uint8
from styleray.models.projection.pivotal import Tuned, pivotal_tuning
from styleray.models.projection.search import Progress, Projection, project
from styleray.platform.checkpoint import load_generator, save_checkpoint
from styleray.platform.projection import outputs
from styleray.platform.projection.options import ProjectOptions
from styleray.platform.projection.plot import curve_png

log = logging.getLogger(__name__)


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class _Recorder:
    """Keeps a GIF frame (target | this step's image) every `every` steps and passes progress on."""

    def __init__(self, target: np.ndarray, every: int, on_step: Callable[[str, Progress], None] | None, phase: str):
        self.target, self.every, self.on_step, self.phase = target, every, on_step, phase
        self.frames: list[np.ndarray] = []

    def __call__(self, p: Progress) -> None:
        if p.step % self.every == 0 or p.step == 1 or p.step == p.steps:
            self.frames.append(outputs.side_by_side([self.target, outputs.to_uint8(p.image)]))
        if self.on_step is not None:
            self.on_step(self.phase, p)


@dataclass
class Projector:
    G: Any  # the checkpoint's G_ema, eval mode, on `device`
    checkpoint: Any  # styleray.platform.checkpoint.Checkpoint (its uri, config, meta; state released)
    distance: Distance
    distance_note: str  # which distance and why (printed and recorded)
    options: ProjectOptions

    @classmethod
    def load(cls, options: ProjectOptions) -> "Projector":
        G, ckpt = load_generator(options.checkpoint, default_device(options.device))
        ckpt.state = {}  # only G_ema is needed; let the rest go
        distance, note = build_distance(options.distance, options.vgg16)
        return cls(G, ckpt, distance, note, options)

    def frame(self, data: bytes) -> Target:
        return frame_target(data, self.G.img_resolution, frame=self.options.frame, channels=self.G.img_channels)

    def run(self, data: bytes, source: str, out_dir: str,
            on_step: Callable[[str, Progress], None] | None = None) -> dict:
        """Project the image in ``data`` into ``out_dir``; returns its summary (also written last)."""
        started = time.perf_counter()
        target = self.frame(data)
        target_t = torch.from_numpy(target.image.copy()).permute(2, 0, 1).contiguous()
        o = self.options
        every = max(1, (o.steps + o.pti_steps) // o.gif_frames)
        search = _Recorder(target.image, every, on_step, "search")
        projection = project(self.G, target_t, o.search_config(), self.distance, search)
        tuning, tuned = _Recorder(target.image, every, on_step, "pivotal tuning"), None
        if o.pivotal_config() is not None:
            tuned = pivotal_tuning(self.G, projection, target_t, o.pivotal_config(), self.distance, tuning)
        summary = self._summary(source, target, projection, tuned, time.perf_counter() - started)
        self._write(out_dir, target, projection, tuned, search.frames + tuning.frames, summary)
        return summary

    def _summary(self, source: str, target: Target, p: Projection, tuned: Tuned | None, seconds: float) -> dict:
        reconstruction = outputs.to_uint8(p.image)
        summary = {
            "source": source, "checkpoint": self.checkpoint.uri, "resolution": self.G.img_resolution,
            "space": p.space, "steps": len(p.history), "seed": self.options.seed, "distance": p.distance_name,
            "distance_note": self.distance_note, "distance_value": p.distance, "framing": target.framing,
            "psnr": round(psnr_uint8(reconstruction, target.image), 3), "seconds": round(seconds, 3),
            "search_seconds": round(p.seconds, 3), "pti_steps": 0,
        }
        if tuned is not None:
            summary.update(pti_steps=len(tuned.history), pti_seconds=round(tuned.seconds, 3),
                           pti_distance_value=tuned.distance,
                           pti_psnr=round(psnr_uint8(outputs.to_uint8(tuned.image), target.image), 3))
        return summary

    def _write(self, out_dir: str, target: Target, p: Projection, tuned: Tuned | None, frames: list, summary: dict):
        join = lambda name: storage.join(out_dir, name)  # noqa: E731
        images = [target.image, outputs.to_uint8(p.image)] + ([outputs.to_uint8(tuned.image)] if tuned else [])
        storage.write_bytes(join("target.png"), outputs.png_bytes(images[0]))
        storage.write_bytes(join("reconstruction.png"), outputs.png_bytes(images[1]))
        storage.write_bytes(join("side_by_side.png"), outputs.png_bytes(outputs.side_by_side(images)))
        storage.write_bytes(join("progress.gif"), outputs.gif_bytes(frames))
        history = p.history + ([(len(p.history) + s, d, q) for s, d, q in tuned.history] if tuned else [])
        curve = curve_png(history, p.distance_name, len(p.history) + 1 if tuned else None)
        storage.write_bytes(join("curve.png"), curve)
        meta = {k: summary[k] for k in ("source", "checkpoint", "resolution", "space", "steps", "distance", "psnr")}
        storage.write_bytes(join(outputs.LATENT), outputs.latent_npz(p.ws, p.noise, meta))
        if tuned is not None:
            storage.write_bytes(join("reconstruction_pti.png"), outputs.png_bytes(images[2]))
            summary["pti_run"] = self._write_tuned_run(join(outputs.PTI_RUN), tuned, summary)
        outputs.write_summary(out_dir, summary)

    def _write_tuned_run(self, run_dir: str, tuned: Tuned, summary: dict) -> str:
        """The tuned generator as a small run folder (G_ema only) that generate and serve load as they are."""
        meta = self.checkpoint.meta
        weights = {k: v.cpu() for k, v in tuned.G.state_dict().items()}
        state = {"model_cfg": dataclasses.asdict(self.G.cfg), "G_ema": weights}
        info = {k: summary[k] for k in ("source", "checkpoint", "space", "steps", "pti_steps", "pti_psnr")}
        return save_checkpoint(run_dir, state, config=self.checkpoint.config, meta={
            "cur_nimg": meta.get("cur_nimg", 0), "kimg": meta.get("kimg", 0.0), "tick": meta.get("tick", 0),
            "pivotal_tuning": info,
        })


def project_file(options: ProjectOptions) -> dict:
    """``styleray project`` on one image file (local or s3://): its summary, outputs in --out."""
    from tqdm import tqdm

    try:
        data = storage.read_bytes(options.target)
    except FileNotFoundError:
        raise ValueError(f"--target {options.target}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--target {options.target} is a folder: give it without an image extension") from None
    projector = Projector.load(options)
    log.info("%s", projector.distance_note)
    total = options.steps + options.pti_steps
    with tqdm(total=total, desc="projection", unit="step", disable=not options.progress) as bar:
        def on_step(phase: str, p: Progress) -> None:
            bar.set_description(phase)
            bar.set_postfix(psnr=f"{p.psnr:.2f}", distance=f"{p.distance:.4f}", refresh=False)
            bar.update(1)

        return projector.run(data, options.target, options.out, on_step)
