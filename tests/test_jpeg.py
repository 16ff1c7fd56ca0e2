"""The JPEG quality an image was saved at, read from its pixels where its file has no quantisation tables (a PNG or
an array made from a JPEG): the quality whose steps its 8 x 8 blocks keep, whatever crop, turn or mirror since."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from her2score.jpeg import pixel_jpeg_quality
from her2score.synthetic import generate_field


def _jpeg(rgb: np.ndarray, quality: int, subsampling: int = 2) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "JPEG", quality=quality, subsampling=subsampling)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.fixture(scope="module")
def colon() -> np.ndarray:
    from skimage.data import immunohistochemistry

    return immunohistochemistry()


@pytest.mark.parametrize("quality", [12, 25, 40, 55, 65, 80])
def test_the_quality_of_a_real_field_saved_as_jpeg_is_read_from_its_pixels(colon, quality):
    """The real colon cropped off its own block grid, saved as JPEG, decoded (as a PNG made from it holds it):
    the quality to within 1, from the crop as saved, mirrored or turned."""
    saved = _jpeg(colon[3:, 5:], quality)
    for seen in (saved, saved[:, ::-1], np.rot90(saved), saved[7:, 2:]):
        assert abs(pixel_jpeg_quality(seen) - quality) <= 1


def test_pixels_with_no_jpeg_history_have_no_quality(colon):
    """A field drawn without JPEG, noise, glass, a JPEG resized since (its blocks blurred with its steps) and a
    crop too small for a block count tell nothing: None, never a guess."""
    rng = np.random.default_rng(0)
    fresh = generate_field("1+", seed=5, jpeg_quality=None).image
    resized = cv2.resize(_jpeg(colon, 25), None, fx=0.8, fy=0.8, interpolation=cv2.INTER_AREA)
    for rgb in (fresh, rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), np.full((256, 256, 3), 235, np.uint8),
                resized, _jpeg(colon, 25)[:40, :40]):
        assert pixel_jpeg_quality(rgb) is None
    assert pixel_jpeg_quality(generate_field("1+", seed=5).image) == 88  # the generator's own JPEG (quality 88)


def test_the_last_coarse_save_is_read_and_clipped_colours_left_out(colon):
    """Saved at 30 and again at 90 (or the other way round), the 30's steps show; 4:4:4 chroma reads alike. An
    over-exposed field (1.5 x its intensities: 47% of its pixels with a channel at 255 once decoded) reads from the
    blocks its clipping spared: taken in, the clipped ones hid quality 15 and 50."""
    assert pixel_jpeg_quality(_jpeg(_jpeg(colon, 30), 90)) == 30 == pixel_jpeg_quality(_jpeg(_jpeg(colon, 90), 30))
    assert pixel_jpeg_quality(_jpeg(colon, 30, subsampling=0)) == 30
    bright = np.clip(colon * 1.5, 0, 255).astype(np.uint8)
    assert [pixel_jpeg_quality(_jpeg(bright, quality)) for quality in (15, 50)] == [15, 50]
