"""Shared by the serve tests: tiny checkpoints, a free port, image decoding."""

from __future__ import annotations

import io
import socket

import numpy as np
from PIL import Image

from styleray.config import RunSpec, resolve_preset
from styleray.models.training import StyleGAN2Trainer
from styleray.platform.checkpoint import save_checkpoint

RESOLUTION = 32
CLASSES = 3


def make_checkpoint(run_dir: str, seed: int, cur_nimg: int, resolution: int = RESOLUTION, c_dim: int = CLASSES) -> str:
    """A freshly initialised cpu-tiny generator saved as a checkpoint (different seeds: different weights)."""
    model, train = resolve_preset(
        "cpu-tiny", resolution=resolution, c_dim=c_dim, train_overrides={"batch": 4, "seed": seed}
    )
    trainer = StyleGAN2Trainer(model, train)
    meta = {"cur_nimg": cur_nimg, "kimg": cur_nimg / 1000, "tick": 0}
    return save_checkpoint(run_dir, trainer.state_dict(), config=RunSpec(model, train).to_dict(), meta=meta)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def frames(data: bytes) -> list[np.ndarray]:
    im = Image.open(io.BytesIO(data))
    out = []
    for i in range(getattr(im, "n_frames", 1)):
        im.seek(i)
        out.append(np.asarray(im.convert("RGB")))
    return out


def start_moto(log_path: str):
    """A moto S3 server on 127.0.0.1 (the moto_server next to this Python): (endpoint URL, process)."""
    import os
    import subprocess
    import sys
    import time

    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    log = open(log_path, "w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return f"http://127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto_server did not start; see {log_path}")
