import io

import numpy as np
import pytest
from PIL import Image

from prep_helpers import awkward_files, png_claiming
from styleray.datasets.prepare.decode import TOO_LARGE, TOO_SMALL, UNREADABLE, Rejected, decode_image

LIMITS = dict(max_pixels=40_000_000, min_size=16, work_size=256)


def _png(image: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **params)
    return buf.getvalue()


@pytest.mark.parametrize("name", [n for n, (_, r) in awkward_files().items() if r is not None])
def test_bad_files_are_rejected_with_their_reason(name):
    data, reason = awkward_files()[name]
    with pytest.raises(Rejected) as err:
        decode_image(data, **LIMITS)
    assert err.value.code == reason, err.value.detail
    assert err.value.detail


@pytest.mark.parametrize("name", [n for n, (_, r) in awkward_files().items() if r is None])
def test_good_files_decode_to_rgb(name):
    data, _ = awkward_files()[name]
    dec = decode_image(data, **LIMITS)
    assert dec.rgb.dtype == np.uint8 and dec.rgb.ndim == 3 and dec.rgb.shape[2] == 3
    assert dec.rgb.shape[:2] == (dec.height, dec.width)
    assert dec.rgb.std() > 10  # a picture, not a blank


def test_bomb_is_refused_from_the_header_without_decoding():
    data = png_claiming(60000, 60000)
    assert len(data) < 1000
    with pytest.raises(Rejected) as err:
        decode_image(data, **LIMITS)
    assert err.value.code == TOO_LARGE
    # Our own limit decides, also below PIL's default bomb threshold.
    with pytest.raises(Rejected) as err:
        decode_image(_png(Image.new("RGB", (300, 300))), max_pixels=200 * 200, min_size=16, work_size=256)
    assert err.value.code == TOO_LARGE and "--max-pixels" in err.value.detail


def test_pil_limit_is_restored():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Rejected):
        decode_image(png_claiming(60000, 60000), **LIMITS)
    decode_image(_png(Image.new("RGB", (32, 32), (1, 2, 3))), **LIMITS)
    assert Image.MAX_IMAGE_PIXELS == before


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    dec = decode_image(_png(Image.fromarray(ramp)), **LIMITS)
    g = dec.rgb[..., 0].astype(int)
    assert g.min() == 0 and g.max() == 255
    assert abs(int(g[32, 32]) - round(ramp[32, 32] / 257)) <= 1
    assert (dec.rgb[..., 0] == dec.rgb[..., 1]).all()


def test_cmyk_becomes_rgb():
    red = Image.new("RGB", (40, 40), (220, 30, 30)).convert("CMYK")
    buf = io.BytesIO()
    red.save(buf, format="JPEG", quality=95)
    dec = decode_image(buf.getvalue(), **LIMITS)
    r, g, b = dec.rgb[20, 20].astype(int)
    assert r > 180 and g < 80 and b < 80


def test_palette_with_transparency_and_la_keep_alpha():
    p = Image.new("P", (40, 40), 0)
    p.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)
    p.paste(1, (10, 10, 30, 30))
    dec = decode_image(_png(p, transparency=0), **LIMITS)
    assert dec.alpha is not None and dec.alpha[0, 0] == 0 and dec.alpha[20, 20] == 255
    la = Image.new("LA", (40, 40), (90, 0))
    la.paste((10, 255), (5, 5, 20, 20))
    dec = decode_image(_png(la), **LIMITS)
    assert dec.alpha is not None and dec.alpha[0, 0] == 0 and dec.rgb[10, 10, 0] == 10
    opaque = decode_image(_png(Image.new("RGBA", (40, 40), (1, 2, 3, 255))), **LIMITS)
    assert opaque.alpha is None  # an opaque alpha channel carries no mask


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (80, 40), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 20, 40))  # red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    dec = decode_image(buf.getvalue(), **LIMITS)
    assert (dec.width, dec.height) == (40, 80) and dec.rgb.shape[:2] == (80, 40)
    assert dec.rgb[5, 20, 0] > 200 and dec.rgb[5, 20, 1] < 80  # the red band is now on top


def test_large_images_are_reduced_to_the_work_size():
    buf = io.BytesIO()
    Image.new("RGB", (1200, 600), (10, 200, 30)).save(buf, format="JPEG")
    dec = decode_image(buf.getvalue(), **LIMITS)
    assert (dec.width, dec.height) == (1200, 600)
    assert max(dec.rgb.shape[:2]) <= 256


def test_too_small_and_empty():
    with pytest.raises(Rejected) as err:
        decode_image(_png(Image.new("RGB", (8, 200))), **LIMITS)
    assert err.value.code == TOO_SMALL and "--min-size" in err.value.detail
    with pytest.raises(Rejected) as err:
        decode_image(b"", **LIMITS)
    assert err.value.code == UNREADABLE
