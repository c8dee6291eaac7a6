import numpy as np
import pytest
from PIL import Image

from styleray.datasets.prepare.classic import classic_mask, estimate_background
from styleray.datasets.synthetic import render_figure


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("background", ["solid", "gradient"])
def test_classic_mean_iou_against_true_masks(background):
    """The acceptance bar of the issue: mean IoU >= 0.90 on solid and gradient backgrounds."""
    ious = []
    for i in range(24):
        aspect = (1.0, 4 / 3, 3 / 4)[i % 3]
        image, truth, _ = render_figure(i, size=112, seed=11, background=background, aspect=aspect)
        result = classic_mask(np.asarray(image))
        ious.append(_iou(result.mask, truth))
        assert result.confidence > 0.9, (i, result.confidence)
    assert np.mean(ious) >= 0.90, ious
    assert min(ious) >= 0.85, ious


def test_classic_survives_jpeg():
    import io

    ious = []
    for i in range(8):
        image, truth, _ = render_figure(i, size=112, seed=12, background="gradient")
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        result = classic_mask(np.asarray(Image.open(buf).convert("RGB")))
        ious.append(_iou(result.mask, truth))
    assert np.mean(ious) >= 0.90, ious


def test_busy_backgrounds_lower_the_confidence():
    flat = [classic_mask(np.asarray(render_figure(i, size=96, background="solid")[0])).confidence for i in range(6)]
    busy = [classic_mask(np.asarray(render_figure(i, size=96, background="stripes")[0])).confidence
            for i in range(6)]
    assert min(flat) > 0.95
    assert np.mean(busy) < 0.8


def test_gradient_model_is_linear_and_clamped():
    h, w = 60, 90
    xx = np.linspace(0, 1, w)[None, :, None]
    img = np.clip(40 + 180 * xx + np.zeros((h, 1, 3)), 0, 255).astype(np.uint8)
    model, residuals, inliers = estimate_background(img)
    assert inliers > 0.99 and residuals.max() < 2.0
    assert np.abs(model - img).max() < 2.0


def test_empty_image_gives_empty_mask():
    result = classic_mask(np.full((64, 64, 3), 200, np.uint8))
    assert not result.mask.any()
    with pytest.raises(ValueError, match="RGB"):
        classic_mask(np.zeros((8, 8), np.uint8))
