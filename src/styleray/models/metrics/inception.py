"""Inception-v3 as FID measures it: the TensorFlow graph of 2015-12-05, ported to PyTorch.

Every FID implementation that reproduces the published numbers (TTUR's TensorFlow code, pytorch-fid,
clean-fid, NVIDIA's ``inception-2015-12-05.pkl``) uses the same weights. We load them in the format of
pytorch-fid: a plain state_dict, ``pt_inception-2015-12-05-6726825d.pth`` (the suffix is the start of its
SHA-256, torch.hub's convention), loaded with ``weights_only=True`` (no pickled code).

The architecture is torchvision's ``Inception3`` (defined here: torchvision is not a dependency) with the
three quirks of the TensorFlow graph that pytorch-fid's ``FIDInception*`` blocks patch:
- the average pools of the A, C and first E blocks ignore the zero padding (``count_include_pad=False``);
- the last E block pools with a max, not an average;
- the classifier has 1008 outputs (kept only so that the state_dict loads strictly; FID never uses it).
Features are the 2048 channels of the final average pool. Preprocessing follows pytorch-fid: bilinear resize
to 299x299 (``align_corners=False``), scale to [-1, 1]. NVIDIA's TorchScript model resizes like TensorFlow,
so FIDs agree with pytorch-fid's to a few hundredths, not to the last digit of NVIDIA's.

Nothing is downloaded: the file is looked up (explicit path, ``$STYLERAY_INCEPTION``, cache folder) and a
missing file raises :class:`MissingWeightsError` that names the file, the places looked and the URL.
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from styleray.models.weights import MissingWeightsError, WeightsFile  # noqa: F401 - MissingWeightsError re-exported

log = logging.getLogger(__name__)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_ENV = "STYLERAY_INCEPTION"
FEATURE_DIM = 2048
INPUT_SIZE = 299


INCEPTION_WEIGHTS = WeightsFile(
    what="Inception-v3 FID weights", filename=INCEPTION_FILE, url=INCEPTION_URL, flag="--inception", env=INCEPTION_ENV
)


def find_inception_weights(path: str | None = None) -> str:
    """The weights file: ``path`` (a file, or a folder holding INCEPTION_FILE), else ``$STYLERAY_INCEPTION``
    (same), else the cache folder. MissingWeightsError listing every place looked if none has it."""
    return INCEPTION_WEIGHTS.find(path)


# ---------------------------------------------------------------------------------------------------------
# Architecture (parameter names match torchvision's Inception3, hence the pytorch-fid state_dict)
# ---------------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool does not count the zero padding.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):  # -> 224 + pool_features channels
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionB(nn.Module):  # grid reduction 35 -> 17
    def __init__(self, in_channels: int):  # -> 480 + in_channels channels
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):  # factorized 7x7 convolutions
    def __init__(self, in_channels: int, channels_7x7: int):  # -> 768 channels
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_tf(x))], 1)


class InceptionD(nn.Module):  # grid reduction 17 -> 8
    def __init__(self, in_channels: int):  # -> 512 + in_channels channels
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):  # expanded filter bank
    def __init__(self, in_channels: int, max_pool: bool):  # -> 2048 channels; max_pool: the TF graph's last block
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """uint8 images [N, C, H, W] (C = 1 or 3, any size) -> pool features [N, 2048] float32."""

    feature_dim = FEATURE_DIM

    def __init__(self, num_classes: int = 1008):  # num_classes: logits of the unused classifier (1008 in the TF graph)
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, num_classes)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:  # uint8 [N, C, H, W] -> float [N, 3, 299, 299]
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = images.float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [N, 2048]
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [N, 64, 147, 147]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [N, 192, 71, 71]
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 192, 35, 35]
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # ... -> [N, 2048, 8, 8]
        return x.mean(dim=(2, 3))  # adaptive average pool -> [N, 2048]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_fid_inception(path: str | None = None) -> FIDInceptionV3:
    """The FID Inception-v3 with its weights, in eval mode, on CPU. See :func:`find_inception_weights`."""
    file = find_inception_weights(path)
    digest = _sha256(file)
    if not digest.startswith(INCEPTION_SHA256_PREFIX):
        log.warning(
            "%s: SHA-256 %s... does not start with %s (the published %s); FIDs will not be comparable with "
            "other implementations'", file, digest[:8], INCEPTION_SHA256_PREFIX, INCEPTION_FILE,
        )
    state = INCEPTION_WEIGHTS.read_state_dict(file)
    model = FIDInceptionV3()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{file}: does not match the FID Inception-v3 ({e}); expected {INCEPTION_FILE}") from e
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from files of old PyTorch
    if missing or unexpected:
        raise ValueError(
            f"{file}: does not match the FID Inception-v3 (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            f"expected {INCEPTION_FILE} from {INCEPTION_URL}"
        )
    return model.eval().requires_grad_(False)
