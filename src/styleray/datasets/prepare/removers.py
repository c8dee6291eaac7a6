"""Background removers: ``classic`` (no weights, :mod:`styleray.datasets.prepare.classic`) and ``rembg`` (U²-Net family).

rembg models are never downloaded at run time. ``--rembg-model NAME`` looks for ``NAME.onnx`` where rembg keeps
its models (``$U2NET_HOME`` when set, else ``$REMBG_HOME/models/NAME/`` or ``~/.rembg/models/NAME/``, and the
legacy ``~/.u2net/``); ``--rembg-model PATH`` runs any ONNX segmentation model through rembg's custom session
(input 1x3x320x320 normalised with ImageNet statistics, first output [1, 1, H, W] the mask). A missing file stops
the run before any work, with a message naming the file and where to put it.

rembg only loads a model that lies under its home folder, so each actor points ``U2NET_HOME`` at the model's
folder before it opens its session (one ONNX session per actor).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from styleray.datasets.prepare.classic import EIGHT, ClassicParams, _fill_small_holes, _keep_large_components, classic_mask
from styleray.datasets.prepare.config import DEFAULT_REMBG_MODEL

log = logging.getLogger(__name__)

# rembg sessions whose model is one file NAME.onnx and whose output is one foreground mask.
REMBG_MODELS = (
    "u2net", "u2netp", "u2net_human_seg", "silueta", "isnet-general-use", "isnet-anime", "bria-rmbg",
    "birefnet-general", "birefnet-general-lite", "birefnet-portrait", "birefnet-dis", "birefnet-hrsod",
    "birefnet-cod", "birefnet-massive",
)
CUSTOM_SESSION = "u2net_custom"


@dataclass(frozen=True)
class RembgModel:
    session: str  # rembg session name: one of REMBG_MODELS, or u2net_custom for a path
    path: str  # absolute path of the .onnx file

    @property
    def label(self) -> str:
        return self.session if self.session != CUSTOM_SESSION else f"custom:{os.path.basename(self.path)}"


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.lower().endswith(".onnx") or value.startswith("~")


def rembg_search_paths(name: str) -> list[str]:
    """Where rembg looks for NAME.onnx, in order (its session classes decide; no download)."""
    from rembg.sessions import sessions

    cls = sessions[name]
    fname = f"{name}.onnx"
    return [os.path.join(cls.model_dir(), fname), os.path.join(cls.legacy_home(), fname)]


def resolve_rembg_model(value: str) -> RembgModel:
    """The model file for ``--rembg-model NAME|PATH``; FileNotFoundError/ValueError with a fix when missing."""
    if _looks_like_path(value):
        path = os.path.abspath(os.path.expanduser(value))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--rembg-model {value}: no such file {path}. Give an existing .onnx file, a rembg model name "
                f"({', '.join(REMBG_MODELS[:4])}, ...), or use --remover classic (no weights needed).")
        return RembgModel(CUSTOM_SESSION, path)
    if value not in REMBG_MODELS:
        raise ValueError(f"--rembg-model {value!r} is not a supported rembg model name ({', '.join(REMBG_MODELS)}) "
                         "nor a path to an .onnx file")
    candidates = rembg_search_paths(value)
    for path in candidates:
        if os.path.isfile(path):
            return RembgModel(value, os.path.abspath(path))
    raise FileNotFoundError(
        f"--rembg-model {value}: the model file {value}.onnx is not on this machine; rembg expects it at "
        f"{candidates[0]} (or {candidates[1]}; U2NET_HOME/REMBG_HOME move these). styleray never downloads at "
        f"run time: fetch it once, e.g. from https://github.com/danielgatis/rembg/releases/download/v0.0.0/"
        f"{value}.onnx, into one of those paths, or pass --rembg-model /path/to/{value}.onnx, or use "
        f"--remover classic (no weights needed).")


def default_remover() -> tuple[str, RembgModel | None]:
    """``auto``: rembg with u2net when its file is present, else classic."""
    try:
        return "rembg", resolve_rembg_model(DEFAULT_REMBG_MODEL)
    except (FileNotFoundError, ValueError, ImportError) as e:
        log.info("no rembg model found (%s); using the classic remover", str(e).split(";")[0])
        return "classic", None


@dataclass
class Segmentation:
    mask: np.ndarray  # [H, W] bool, cleaned
    alpha: np.ndarray  # [H, W] float32 0..1
    confidence: float  # 0..1


def soft_confidence(alpha: np.ndarray, mask: np.ndarray) -> float:
    """1 - the share of pixels, away from the mask's edge, whose alpha is undecided (0.1 < alpha < 0.9)."""
    edge = ndimage.binary_dilation(mask, structure=EIGHT, iterations=2) & ~ndimage.binary_erosion(
        mask, structure=EIGHT, iterations=2)
    return 1.0 - float((((alpha > 0.1) & (alpha < 0.9)) & ~edge).mean())


def from_soft_alpha(alpha: np.ndarray, params: ClassicParams = ClassicParams()) -> Segmentation:
    """A soft alpha (rembg's output, or the image's own alpha channel) cleaned like the classic mask."""
    mask = alpha >= 0.5
    mask = _keep_large_components(mask, params.keep_fraction)
    if mask.any():
        mask = _fill_small_holes(mask, params.hole_fraction * mask.sum())
    return Segmentation(mask, alpha.astype(np.float32), soft_confidence(alpha, mask))


def segment_classic(rgb: np.ndarray) -> Segmentation:
    r = classic_mask(rgb)
    return Segmentation(r.mask, r.alpha, r.confidence)


class RembgSegmenter:
    """One rembg ONNX session; turns RGB arrays into soft masks. Used inside the Ray actor pool."""

    def __init__(self, model: RembgModel, threads: int = 1):
        import onnxruntime as ort
        from rembg import new_session

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        kwargs = {"model_path": model.path} if model.session == CUSTOM_SESSION else {}
        self.model = model
        old_home = os.environ.get("U2NET_HOME")
        os.environ["U2NET_HOME"] = os.path.dirname(model.path)  # rembg loads only under its home
        try:
            self.session = new_session(model.session, sess_opts=opts, **kwargs)
        finally:  # the session holds the model now; leave the process environment as it was
            if old_home is None:
                os.environ.pop("U2NET_HOME", None)
            else:
                os.environ["U2NET_HOME"] = old_home

    def alpha(self, rgb: np.ndarray) -> np.ndarray:
        from PIL import Image

        mask = self.session.predict(Image.fromarray(rgb))[0]  # PIL "L" at the image's size
        return np.asarray(mask, np.float32) / 255.0
