"""A projection target framed like prepare frames training images; every awkward or bad file handled."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from prep_helpers import awkward_files

from styleray.datasets.prepare.target import BadTarget, frame_target
from styleray.datasets.synthetic import render_figure


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", [n for n, (_, r) in awkward_files().items() if r is not None])
def test_bad_files_raise_bad_target_with_their_reason(name):
    data, reason = awkward_files()[name]
    with pytest.raises(BadTarget) as err:
        frame_target(data, 32)
    assert err.value.code == reason and isinstance(err.value, ValueError)


@pytest.mark.parametrize("name", [n for n, (_, r) in awkward_files().items() if r is None])
def test_awkward_modes_come_out_rgb_at_the_resolution_on_white(name):
    """grayscale, 16-bit, CMYK, palette, alpha: all framed like prepare (figure on white, at 32 px)."""
    data, _ = awkward_files()[name]
    t = frame_target(data, 32)
    assert t.image.shape == (32, 32, 3) and t.image.dtype == np.uint8
    corners = t.image[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners >= 235).all(), (name, t.framing, corners)  # the solid background became white
    assert t.image.std() > 10


def test_a_raw_picture_is_framed_and_an_image_on_white_only_resized():
    raw, mask, _ = render_figure(3, size=120, seed=1, background="solid", aspect=0.75)  # 90 x 120, coloured bg
    t = frame_target(_png(raw), 32)
    assert t.framing == "prepare" and (t.width, t.height) == raw.size
    on_white = np.full((64, 64, 3), 255, np.uint8)
    on_white[20:44, 24:40] = (200, 30, 30)  # a square image with a white border: taken as it is
    t = frame_target(_png(Image.fromarray(on_white)), 32)
    assert t.framing == "resize"
    np.testing.assert_array_equal(t.image, np.asarray(Image.fromarray(on_white).resize((32, 32), Image.Resampling.LANCZOS)))
    same = frame_target(_png(Image.fromarray(t.image)), 32)  # at the model's resolution already: unchanged
    np.testing.assert_array_equal(same.image, t.image)
    forced = frame_target(_png(Image.fromarray(on_white)), 32, frame="prepare")
    assert forced.framing == "prepare" and not np.array_equal(forced.image, t.image)  # cropped to the figure


def test_no_figure_falls_back_to_resize_and_grayscale_models_get_one_channel():
    flat = Image.new("RGB", (40, 30), (90, 140, 200))  # nothing but background
    t = frame_target(_png(flat), 16, frame="prepare")
    assert t.framing == "resize (no figure found)" and t.image.shape == (16, 16, 3)
    assert (t.image[0] == 255).all() and (t.image[8, 8] == (90, 140, 200)).all()  # padded on white, centred
    gray = frame_target(_png(flat), 16, frame="resize", channels=1)
    assert gray.image.shape == (16, 16, 1)
    with pytest.raises(ValueError, match="--frame 'crop'"):
        frame_target(_png(flat), 16, frame="crop")
