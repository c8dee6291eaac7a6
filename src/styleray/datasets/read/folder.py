"""The training-side reader of a prepared dataset: a folder of square images plus ``dataset.json``.

``dataset.json`` follows StyleGAN2-ADA's format, with class names added by ``styleray prepare``::

    {"labels": [["000000.png", 3], ["000001.png", 0], ...], "classes": ["upper-body", "full-body"]}

Images are returned as uint8 [N, H, W, C] arrays; the trainer scales them to [-1, 1].
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

DATASET_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # what the training reader reads


@dataclass
class ImageData:
    images: np.ndarray  # [N, H, W, C] uint8
    labels: np.ndarray | None  # [N] int64 class indices, or None (unconditional)
    num_classes: int  # 0 when unlabelled
    files: list[str]  # relative paths, in the order of `images`
    class_names: list[str] | None = None

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def one_hot(self, idx: np.ndarray) -> np.ndarray | None:
        if self.labels is None:
            return None
        out = np.zeros([len(idx), self.num_classes], np.float32)
        out[np.arange(len(idx)), self.labels[idx]] = 1
        return out


def list_image_files(root: str) -> list[str]:
    """Image files under root (recursive), relative, sorted; hidden files and folders skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(DATASET_IMAGE_EXTENSIONS):
                out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def read_labels(root: str) -> tuple[dict[str, int] | None, list[str] | None]:
    path = os.path.join(root, "dataset.json")
    if not os.path.exists(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:
        raise ValueError(f"--data {root}: dataset.json is not valid JSON: {e}") from e
    labels = meta.get("labels")
    if labels is None:
        return None, meta.get("classes")
    return {str(k).replace("\\", "/"): int(v) for k, v in labels}, meta.get("classes")


def load_image_folder(root: str, *, resolution: int | None = None, use_labels: bool = True, channels: int = 3) -> ImageData:
    """Read every image of a prepared dataset into memory (small datasets; Ray Data streams large ones)."""
    from PIL import Image

    if not os.path.isdir(root):
        raise ValueError(f"--data {root} does not exist or is not a folder (run `styleray prepare` first)")
    files = list_image_files(root)
    if not files:
        raise ValueError(f"--data {root} holds no images ({', '.join(DATASET_IMAGE_EXTENSIONS)})")
    label_map, class_names = read_labels(root) if use_labels else (None, None)
    mode = "RGB" if channels == 3 else "L"
    arrays = []
    for rel in files:
        with Image.open(os.path.join(root, rel)) as im:
            im = im.convert(mode)
            if im.width != im.height:
                raise ValueError(f"--data {root}: {rel} is {im.width}x{im.height}, not square (run `styleray prepare`)")
            if resolution is None:
                resolution = im.width
            if im.width != resolution:
                raise ValueError(
                    f"--data {root}: {rel} is {im.width}px but --resolution is {resolution}; "
                    f"prepare the data at {resolution} or pass --resolution {im.width}"
                )
            a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[..., None] if a.ndim == 2 else a)
    labels = None
    num_classes = 0
    if label_map is not None:
        missing = [f for f in files if f not in label_map]
        if missing:
            raise ValueError(f"--data {root}: dataset.json has no label for {missing[0]} (and {len(missing) - 1} more)")
        labels = np.array([label_map[f] for f in files], dtype=np.int64)
        if labels.min() < 0:
            raise ValueError(f"--data {root}: negative class label in dataset.json")
        num_classes = max(int(labels.max()) + 1, len(class_names or []))
    return ImageData(np.stack(arrays), labels, num_classes, files, class_names)


class BatchSampler:
    """Endless shuffled batches (a new permutation each epoch), optional random x-flip for --mirror."""

    def __init__(self, data: ImageData, batch: int, *, seed: int = 0, mirror: bool = False, rank: int = 0, world: int = 1):
        self.data, self.batch, self.mirror = data, batch, mirror
        self.rank, self.world = rank, world
        self.rng = np.random.default_rng([seed, rank])
        self._order = np.empty(0, np.int64)
        self._pos = 0

    def _next_indices(self) -> np.ndarray:
        out = []
        need = self.batch
        while need > 0:
            if self._pos >= len(self._order):
                self._order = self.rng.permutation(len(self.data.images))[self.rank :: self.world]
                if len(self._order) == 0:  # fewer images than workers
                    self._order = self.rng.permutation(len(self.data.images))
                self._pos = 0
            take = self._order[self._pos : self._pos + need]
            self._pos += len(take)
            need -= len(take)
            out.append(take)
        return np.concatenate(out)

    def next(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(images uint8 [B, H, W, C], one-hot labels [B, K] or None)."""
        idx = self._next_indices()
        imgs = self.data.images[idx]
        if self.mirror:
            flip = self.rng.random(len(idx)) < 0.5
            imgs = imgs.copy()
            imgs[flip] = imgs[flip, :, ::-1]
        return imgs, self.data.one_hot(idx)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self._order.tolist(), "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._order = np.asarray(state["order"], dtype=np.int64)
        self._pos = int(state["pos"])
