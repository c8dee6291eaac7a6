"""An LPIPS-style distance on VGG16 features, from a local weights file (never downloaded).

The file is torchvision's ImageNet VGG16, ``vgg16-397923af.pth``: a plain state_dict loaded with
``weights_only=True`` (its ``features.*`` tensors; the classifier is not used). It is looked up as
``--vgg16 PATH``, then ``$STYLERAY_VGG16``, then the cache folder (:mod:`styleray.models.weights`).

The distance is LPIPS's "baseline" variant (Zhang et al. 2018) on VGG16: the activations after the last ReLU
of each of the five stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) are normalised to unit length
along the channels, and the squared differences are summed over channels, averaged over positions and summed
over the stages (LPIPS proper weights the channels with learned weights; the baseline weighs them equally).
Inputs are scaled from [-1, 1] with ImageNet's mean and standard deviation, and images larger than 256 px are
area-downsampled to 256 first, as the reference projector does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from styleray.models.projection.distances import Distance
from styleray.models.weights import WeightsFile

VGG16 = "vgg16"
VGG16_FILE = "vgg16-397923af.pth"
VGG16_WEIGHTS = WeightsFile(
    what="VGG16 weights (torchvision, ImageNet)",
    filename=VGG16_FILE,
    url=f"https://download.pytorch.org/models/{VGG16_FILE}",
    flag="--vgg16",
    env="STYLERAY_VGG16",
)
# torchvision's VGG16 "features": channels of each 3x3 conv, "M" a 2x2 max pool (configuration D).
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_SIDE = 256  # larger images are area-downsampled to this first


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional part, module indices as torchvision's (so its state_dict keys load)."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = int(v)
    return nn.Sequential(*layers)


class VGG16Features(nn.Module):
    """Images in [-1, 1] -> the unit-normalised activations at TAPS (LPIPS's embedding)."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1) * 2 - 1, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1) * 2, persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:  # [N, C, H, W] -> [[N, F_i, H_i, W_i]] * 5
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] > MAX_SIDE:
            x = F.interpolate(x, size=(MAX_SIDE, MAX_SIDE), mode="area")
        x = (x - self.mean) / self.std
        taps = []
        for i, layer in enumerate(self.features[: TAPS[-1] + 1]):
            x = layer(x)
            if i in TAPS:
                taps.append(x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return taps


class VGG16Distance(Distance):
    """LPIPS (baseline variant) on VGG16: see the module docstring."""

    name = VGG16
    description = "LPIPS-style distance on VGG16 features (baseline: uniform channel weights)"

    def __init__(self, net: VGG16Features):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.net(images)

    def compare(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        return sum((fa - fb).square().sum(dim=1).flatten(1).mean(dim=1) for fa, fb in zip(a, b))


def load_vgg16(path: str | None = None) -> VGG16Features:
    """VGG16Features with the weights of the file found for ``path`` (see VGG16_WEIGHTS); ValueError naming
    the file when it is not a VGG16 state_dict."""
    file = VGG16_WEIGHTS.find(path)
    state = VGG16_WEIGHTS.read_state_dict(file)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    net = VGG16Features()
    try:
        net.features.load_state_dict(features, strict=True)
    except RuntimeError as e:  # missing keys or shape mismatches
        raise ValueError(f"{file}: is not torchvision's VGG16 ({str(e).splitlines()[0]}); expected "
                         f"{VGG16_FILE} from {VGG16_WEIGHTS.url}") from e
    return net
