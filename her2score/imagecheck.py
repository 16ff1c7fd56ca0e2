"""Is this a brightfield H-DAB tissue image at all? Checked before any cell is scored.

Colour is judged in optical density (OD = -log10(I / I0)) against the image's own glass
background, as ratios of the three channels' OD, which do not depend on how much stain a pixel
holds: r/g = OD_red / OD_green and b/g = OD_blue / OD_green.

- haematoxylin (blue to purple) absorbs red and green, little blue: b/g < 0.8, r/g ~0.6-1.6;
- DAB (brown) absorbs blue most: b/g > 1;
- eosin (pink) absorbs green, little red and little blue: r/g < 0.4 in eosin-heavy H&E. In purple
  H&E, eosin shows as cytoplasm and stroma redder (lower r/g) than the image's own nuclei; a single
  haematoxylin (an IHC HER2 0) has one colour in nuclei and elsewhere.

Refused: dark backgrounds (fluorescence, darkfield, most photos), images without a blue nuclear
counterstain (photos, text, plots, other chromogens), H&E (eosin), colours no mix of haematoxylin
and DAB gives (a green chromogen), and a µm/px that makes nuclei implausibly large. Every threshold
below was measured on the real images beside the repository (tests/realdata.py: H&E from four
sources, Ki67 IHC from two scanners), scikit-image's IHC image, the sample images and synthetic
fields with stain jitter up to 8 degrees (see tests/test_imagecheck.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .slide import NotHerIhcError, Slide
from .stain import GLASS_MIN_PIXELS, H_DAB, black_fill, deconvolve, optical_density, per_channel, unscanned_fill
from .tissue import DARK_INTENSITY, DARK_MAX_CHROMA, TissueMask, dark_neutral, pen_ink

__all__ = [
    "ImageCheck", "NotHerIhcError", "check_image", "check_slide", "glass_background", "white_level", "colour_cast", "dark_fraction", "black_fill", "fill_regions", "fill_as_glass", "clipped_fraction",
    "stain_fractions", "stain_chroma_deg", "denoised", "noise_sd", "off_plane_fraction", "rendered_fractions", "nucleus_diameter_um",
]

MAX_DARK_FRACTION = 0.08
"""Brightfield IHC measured: at most 0.025 dark (Ki67 ndpi); fluorescence-like 0.62, the astronaut photo 0.20."""
DIM_INTENSITY = 100
DIM_MAX_CHROMA = 30
MAX_DIM_FRACTION = 0.5
"""Dim grey pixels (every channel under 100, within 30 of each other): in brightfield tissue even the darkest
stain keeps its colour (brown DAB, blue haematoxylin), so they are at most 0.038 of a real image (Ki67 ndpi),
0.16 / 0.32 of the real colon with all its stains 3x / 4x over-stained; the dim, tinted background of an
inverted Ki67 field, which escapes the dark check above (brightest channel 55), is 0.76 of it."""
MAX_CLIPPED_FRACTION = 0.10
"""Pixels with a channel at 0 that are no black fill: their optical density is unknown (at least log10 of
the glass). Real scans here: at most 0.016 (a Ki67 field's darkest nuclei); the real colon with its stains
3x over-stained 0.010; contrast-stretched (PIL autocontrast, 0.5 / 1 / 2% clipped) 0.096 / 0.13 / 0.18, which
read blobs of 1.4 µm (stained membranes clipped to 0 in blue read as thin, dark lines) for its nuclei."""
STAINED_OD = 0.25
"""A pixel is stained when its summed RGB log10 OD exceeds this (pale pixels' colour ratios are noise)."""
COUNTERSTAIN_OD = 0.12
"""Lower floor for finding the counterstain, so that a pale haematoxylin still counts."""
MAX_EOSIN_FRACTION = 0.135
"""Eosin-coloured share of stained pixels. Measured on the first 1024 px square: real H&E 0.30-0.98 as
stored, 0.154-0.94 saved as JPEG with 4:2:0 chroma at quality 75-95 (the chroma blends eosin into the
nuclei); real H-DAB <= 0.03 in every such form; synthetic fields <= 0.118 with the evaluation set's
stain jitter (6°, 400 fields), a few over 0.2 at 12°."""
OFF_PLANE_DEG = 20.0
OFF_PLANE_MIN_OD = 0.5
MAX_OFF_PLANE_FRACTION = 0.3
"""Share of the pixels of summed OD over OFF_PLANE_MIN_OD whose colour lies more than OFF_PLANE_DEG off the
plane of the haematoxylin and DAB vectors: a colour no mix of the two gives (another chromogen or stain).
Measured: the real colon and Ki67 fields as stored, under 10% white-balance casts of one or two channels
and as JPEG quality 50 <= 0.005; 320 synthetic fields at 8° stain jitter, with and without DAB tint and
cytoplasmic blush, <= 0.003; the real colon with its DAB recoloured green 0.84 (it scored 2+). Paler
pixels and a 15° angle read white-balance casts and stain jitter as other colours (real Ki67 under a 10%
green cast 0.72, jittered synthetic fields 0.41)."""
MIN_STAIN_CHROMA_DEG = 13.0
"""Least angle from grey (equal OD in red, green and blue), in degrees, of the most coloured 2% of the stained
pixels' OD (stain_chroma_deg). Pure haematoxylin and DAB lie 18° and 21° from grey (Ruifrok-Johnston), their
mixes nearer it. Measured: every real H-DAB image here as stored 22.5-31.1 (the colon IHC, the Ki67 fields,
their crops, JPEGs and paler copies); real fields with their DAB removed, their own counterstain's colour kept
(stain.scale_stains with the residual kept) 21.5-23.7, recomposed from the default haematoxylin 18.8, with
their DAB scaled down 18.1; a real H&E with its eosin put on the DAB channel (DAB in every cell) 17.4. With
their colours' saturation halved (a faded stain or a desaturated scan) the real IHC read 11.7-15.3 (the colon
12.7: it read 2+ for 3+), at 0.3 x 6.0-9.3; real H&E at 0.3 x 5.9-15.0 (it scored 0, 0+ and 1+ under its own
stain vectors). So this catches only near-grey images: a fading stain under-reads membranes well before
it (the colon at 0.55 x saturation, 13.8°, reads 3+ on 14% strong complete cells against 34%). Synthetic
fields at 6° stain jitter (the model card's held-out set) read from 7.9: 6 of 400 under 13, each a 0 or 1+
field (little DAB) whose haematoxylin the jitter turned to 6.6-10.8° from grey."""
PALE_CHROMA_DEG = 17.0
"""Under this stain_chroma_deg (and at MIN_STAIN_CHROMA_DEG or over) a scored slide carries the QC warning
``pale_colours``: its membranes read weaker. The real colon at 0.8, 0.7, 0.65 and 0.6 x its colours'
saturation reads 19.7°, 17.4°, 16.2° and 15.0°, and 3+ on 30.7%, 19.1%, 15.7% and 12.8% strong complete
cells against 33.5% as stored (0.5.0; 0.4.9: 28.9%, 17.5%, 14.6% and 12.3% of 33.8%): warned at 0.65 and 0.6.
Milder fading goes unwarned: its quarter-DAB copy (a real 2+) at 0.65 x, 18.3°, reads 1+ flagged near_cutoff
(2+ with 0.4.9, 1+ with 0.4.8). Every real H-DAB image as stored reads 22.5 or more, real HER2 0 fields
in their own counterstain's colour 21.5-23.7, real fields with their DAB scaled down or recomposed from the
default haematoxylin 18.1-18.8: none is warned."""
MIN_HAEMATOXYLIN_FRACTION = 0.02
"""Blue/purple share of stained pixels. Measured: real IHC >= 0.07 (the colon image, mostly DAB); photos, text, plots ~0."""
GLASS_MAX_CAST = 0.03
"""The colour cast of the image's white that glass_background corrects, as a fraction of its mean."""
MAX_NUCLEUS_DIAMETER_UM = 14.0
"""Median nucleus diameter above this means the µm/px given is too coarse (real tissue measured 2-7 µm)."""
MAX_FLAT_FRACTION = 0.5
MIN_SOLID_FRACTION = 0.4
"""Rendered graphics: one exact colour fills > 0.5 of the image (text, plots: 0.92; scans <= 0.09) and
< 0.4 of the stained pixels survive an opening by a 5 px disc (strokes; tissue >= 0.54)."""
MAX_UNIFORM_FRACTION = 0.1
"""Rendered graphics with filled shapes: coloured stained pixels whose 3x3 neighbourhood is one exact
colour. Measured: every real image and synthetic field <= 0.0001, real H&E at JPEG quality 20 0.027
(uniform 8x8 blocks); a drawing of cells in flat colours 0.45, a logo 0.12."""
MIN_NUCLEUS_DIAMETER_UM = 1.6
"""Median nucleus diameter under this: blobs no larger than the finest scale measured (1.41 µm at 0.5
µm/px) are specks, not nuclei: a photo or a drawing, or a µm/px far too fine. Real images at their
µm/px measured >= 1.77 (the next scale)."""


@dataclass(frozen=True)
class ImageCheck:
    """What the check measured and its verdict; ``reason`` is empty when the image is accepted."""

    accepted: bool
    code: str
    reason: str
    dark_fraction: float
    eosin_fraction: float
    haematoxylin_fraction: float
    nucleus_diameter_um: float
    background: tuple[float, float, float]
    stain_chroma_deg: float = float("nan")


def white_level(rgb: np.ndarray) -> np.ndarray:
    """The image's white as it stands (RGB float64, 0-255): the median of the brightest 0.5% of pixels,
    any colour cast kept. Pure white fill around the tissue (stain.unscanned_fill) is left out where at
    least 1% of the pixels are something else."""
    flat = rgb.reshape(-1, 3)
    flat = flat[:: max(1, len(flat) // 500_000)]
    scanned = flat[~unscanned_fill(flat)]
    whole = flat.dtype == np.uint8
    flat = (scanned if len(scanned) >= max(50, len(flat) // 100) else flat).astype(np.float32)
    k = min(max(50, len(flat) // 200), len(flat))
    total = per_channel(np.add, flat)
    if whole and (level := _median_of_brightest(flat, total.astype(np.int32), k)) is not None:
        return level
    return np.median(flat[np.argpartition(total, -k)[-k:]], axis=0).astype(np.float64)


def _median_of_brightest(flat: np.ndarray, sums: np.ndarray, k: int) -> np.ndarray | None:
    """Per channel, the median of the ``k`` pixels of ``flat`` (float32 (N, 3), whole numbers 0-255) whose channel
    ``sums`` (int, 0-765) are largest, as float64 (3,), where it does not depend on which of the pixels tied at the
    k-th largest sum are taken; else None. Each channel's median is bounded by taking the tied pixels with its
    smallest values and with its largest: where both give one value, every choice (np.argpartition's) gives it."""
    cut = 765 - int(np.searchsorted(np.cumsum(np.bincount(sums, minlength=766)[::-1]), k))  # the k-th largest sum
    above, tied = flat[sums > cut], np.sort(flat[sums == cut], axis=0)
    m = k - len(above)  # taken from the tied pixels: 1 to len(tied)
    low = np.median(np.concatenate([above, tied[:m]]), axis=0)
    return low.astype(np.float64) if np.array_equal(low, np.median(np.concatenate([above, tied[len(tied) - m:]]), axis=0)) else None


def colour_cast(level: np.ndarray) -> float:
    """How far a white level's channels stray from their mean, as a fraction of it (0: neutral)."""
    mean = float(np.mean(level))
    return float(np.max(np.abs(np.asarray(level) / max(mean, 1.0) - 1)))


def glass_background(rgb: np.ndarray, *, max_cast: float = GLASS_MAX_CAST) -> tuple[float, float, float]:
    """White level I0 (RGB, 0-255): white_level with its colour cast limited to ``max_cast`` of its mean
    (tissue-filled fields have no glass: their brightest pixels are pale stain, which must not be taken
    for the white balance)."""
    return _as_background(white_level(rgb), max_cast)


def _as_background(level: np.ndarray, max_cast: float) -> tuple[float, float, float]:
    """A white level as I0: its cast limited to ``max_cast`` of its mean, no channel under 1."""
    mean = float(level.mean())
    return tuple(float(max(v, 1.0)) for v in np.clip(level, mean * (1 - max_cast), mean * (1 + max_cast)))


def _cast_hint(rgb: np.ndarray, level: np.ndarray) -> str:
    """Words to add to a missing-counterstain refusal where the image's white (``level``: white_level) has a
    colour cast beyond GLASS_MAX_CAST and, with that white taken as the glass, haematoxylin blue would be
    there: the scanner's white balance, not the stain, is the likely cause. "" otherwise."""
    cast = colour_cast(level)
    if cast <= GLASS_MAX_CAST:
        return ""
    _, haem, _ = stain_fractions(optical_density(rgb, _as_background(level, math.inf)))
    if haem < MIN_HAEMATOXYLIN_FRACTION:
        return ""
    worst = int(np.argmax(np.abs(level - level.mean())))
    side = "low" if level[worst] < level.mean() else "high"
    return (f"; its brightest pixels have a colour cast of {cast:.0%} ({('red', 'green', 'blue')[worst]} {side}), beyond the "
            f"{GLASS_MAX_CAST:.0%} the check corrects; taking them as white, {haem:.1%} of stained pixels have that blue: "
            "the scanner's white balance may be off (correct it and score again)")


def dark_fraction(rgb: np.ndarray, *, max_intensity: int = DARK_INTENSITY, max_chroma: int = DARK_MAX_CHROMA) -> float:
    """Fraction of dark neutral pixels (brightest channel below ``max_intensity``, channels within ``max_chroma``)
    among those that are not pure black fill (black_fill) in an image that has glass (GLASS_MIN_PIXELS bright
    and neutral, FILL_GLASS_MIN or more in every channel and within FILL_GLASS_CHROMA: a negative's glass is
    pure black, and its brightest pixels are its stains, coloured); 0 for fill alone."""
    fill = black_fill(rgb)
    lo, hi = per_channel(np.minimum, rgb), per_channel(np.maximum, rgb)
    if np.count_nonzero((lo >= FILL_GLASS_MIN) & (hi - lo <= FILL_GLASS_CHROMA)) < GLASS_MIN_PIXELS:
        fill[:] = False
    return _share_off(dark_neutral(rgb, max_intensity, max_chroma), fill)


def clipped_fraction(rgb: np.ndarray) -> float:
    """Fraction of the pixels that are not black fill (black_fill) with a channel at 0."""
    return _share_off(per_channel(np.minimum, rgb) == 0, black_fill(rgb))


def _share_off(mask: np.ndarray, fill: np.ndarray) -> float:
    """Share of the pixels off ``fill`` (bool) that ``mask`` (bool) marks; 0 where all are fill."""
    rest = fill.size - np.count_nonzero(fill)
    return float(np.count_nonzero(mask & ~fill) / rest) if rest else 0.0


FILL_GLASS_MIN = 160
FILL_GLASS_CHROMA = 24
"""Glass beside black fill (dark_fraction): pixels at FILL_GLASS_MIN or more in every channel, channels within
FILL_GLASS_CHROMA. The real colon at 0.8 of its exposure has glass near 188; the over-exposed colon inverted
(a negative, its glass pure black) has none: its brightest pixels are its inverted stains, such as DAB's
(165, 205, 235)."""


FILL_MIN_UM2 = 300.0
FILL_EDGE_MIN = 130
"""Pure black regions read as glass (fill_regions): those of FILL_MIN_UM2 (µm²) or more, larger than any
nucleus (segment_nuclei's max_area_um2: a rotation's corner, a masked background), and smaller ones whose
edge (the pixels just round them) averages FILL_EDGE_MIN or more in its brightest channel (a painted lumen
beside pale tissue: 231 or more in the real colon's). A contrast stretch clips the darkest nuclei to pure
black too, inside a dark edge (a real Ki67 field's: 97 at most; the real colon's, 47): those stay."""


def fill_regions(rgb: np.ndarray, *, mpp: float) -> np.ndarray:
    """The pixels of ``rgb`` (an image at ``mpp`` µm/px: a tile, a field) that are black fill (black_fill) in a region
    large or bright-edged enough to be fill (FILL_MIN_UM2, FILL_EDGE_MIN), and the pixel round it, bool: a turn's
    interpolation and the tile's resampling blend the fill's edge into a dark rim, read as a stained membrane
    along it (a real HER2 0 turned 15° on black read 0+ (ultralow) on 6% of its cells)."""
    black = black_fill(rgb)
    if not black.any():
        return black
    n, parts, stats, _ = cv2.connectedComponentsWithStats(black.view(np.uint8), connectivity=8)
    grown = cv2.dilate(parts.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int32)
    edge = (grown > 0) & (parts == 0)
    brightest = per_channel(np.maximum, rgb)[edge].astype(np.float64)
    edge_mean = np.bincount(grown[edge], brightest, n) / np.maximum(np.bincount(grown[edge], minlength=n), 1)
    fill = (stats[:, cv2.CC_STAT_AREA] * mpp * mpp >= FILL_MIN_UM2) | (edge_mean >= FILL_EDGE_MIN)
    fill[0] = False
    return cv2.dilate(fill[parts].view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)


def fill_as_glass(rgb: np.ndarray, *, mpp: float) -> np.ndarray:
    """``rgb`` (at ``mpp`` µm/px) with its black fill (fill_regions) made white glass; ``rgb`` itself where it has none."""
    fill = fill_regions(rgb, mpp=mpp)
    return np.where(fill[..., None], np.uint8(255), rgb) if fill.any() else rgb


def _without_frame(rgb: np.ndarray, *, rim_px: int = 4) -> np.ndarray:
    """``rgb`` less a scanner's black frame: the rows and columns at its edges that are at least 98% dark
    neutral, and ``rim_px`` more on each side that has them (a soft or resampled edge); the image itself
    where it has none, and a 0-pixel view where it is all frame. Tissue.tissue_mask leaves the fill out as it is."""
    dark = dark_neutral(rgb)
    rows, cols = np.flatnonzero(dark.mean(1) < 0.98), np.flatnonzero(dark.mean(0) < 0.98)
    if len(rows) == 0 or len(cols) == 0:
        return rgb[:0, :0]
    h, w = dark.shape
    r0, r1 = rows[0] + (rim_px if rows[0] else 0), rows[-1] + 1 - (rim_px if rows[-1] < h - 1 else 0)
    c0, c1 = cols[0] + (rim_px if cols[0] else 0), cols[-1] + 1 - (rim_px if cols[-1] < w - 1 else 0)
    return rgb[r0 : max(r0, r1), c0 : max(c0, c1)]


def _pixels(od: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(N, 3) of an OD image's pixels where ``keep`` (bool (H, W)), in row order: ``od[keep]``, a view where
    it keeps every pixel (a slide's thumbnail: indexing copied 2 million pixels for the samples taken of them)."""
    flat = od.reshape(-1, 3)
    return flat if keep.all() else flat[keep.ravel()]


def _od_sample(od: np.ndarray, at_most: int = 300_000) -> np.ndarray:
    """(N, 3) float64 of an OD image's pixels, every k-th so that N is about ``at_most``."""
    flat = od.reshape(-1, 3)
    return flat[:: max(1, len(flat) // at_most)].astype(np.float64)


def _stained_sample(od: np.ndarray, stained_od: float) -> np.ndarray:
    """_od_sample's pixels whose summed OD exceeds ``stained_od``."""
    flat = _od_sample(od)
    return flat[per_channel(np.add, flat) > stained_od]


NOISY_SD = 1.5
"""Luminance noise (noise_sd, grey levels) over which check_image reads colours from the image smoothed by a
DENOISE_PX Gaussian (denoised): the colour shares (stain_fractions) and the stain colour (stain_chroma_deg).
The tiles' eosin share for QC (pipeline) is read unsmoothed: smoothed, a real H&E amid white fill in a slide
read under the QC's 8% (8.25% unsmoothed), and was scored 0. Sensor noise
turns the colour ratios of pale pixels: real HER2 0 fields (their DAB removed) with noise of s.d. 6 grey levels
per channel added read 15-20% of their stained pixels eosin-coloured, refused as H&E; and it lends colour to a
faded image. Measured: a flat grey with noise of s.d. s per channel reads 0.67 s; every real image here as
stored 0.31-1.06 (the two torchstain H&E images 5.0 and 5.5: their origin is unstated; both stay refused as
H&E), synthetic fields 0.52-0.88; real images with noise of s.d. 3, 4 and 6 per channel added 2.1-2.6, 2.7-3.2
and 4.0-4.5. An image resampled from a finer scan reads less (resampling averages the noise down and correlates
what is left): the DeepLIIF fields (0.3 µm/px) with noise of s.d. 6 read 1.8-1.9 at 0.5 µm/px, as a slide's
detail region is read; hence 1.5, not 2."""
DENOISE_PX = 0.7
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_SECOND_DIFFERENCE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)  # its residual of noise s: s.d. 6 s
_ABS_NORMAL_Q25 = 0.3186  # lower quartile of |N(0, 1)|


def noise_sd(rgb: np.ndarray, *, at_most_px: int = 256) -> float:
    """Noise of an RGB uint8 image: the s.d. of its luminance (0.299 R + 0.587 G + 0.114 B; noise of s.d. s in
    each channel gives 0.67 s), in grey levels. Immerkær's estimate from the second-difference residual, made
    robust to tissue texture by taking its absolute values' lower quartile, off flat fill (pixels whose 3x3
    neighbourhood is one level: a tile's glass beyond the slide, a mask's fill), on at most an ``at_most_px``
    square from the image's centre (0 where fewer than 100 pixels are left)."""
    h, w = rgb.shape[:2]
    y, x = max(0, (h - at_most_px) // 2), max(0, (w - at_most_px) // 2)
    luma = rgb[y : y + at_most_px, x : x + at_most_px].astype(np.float32) @ _LUMA
    if min(luma.shape) < 3:
        return 0.0
    residual = np.abs(cv2.filter2D(luma, -1, _SECOND_DIFFERENCE)[1:-1, 1:-1])
    square = np.ones((3, 3), np.uint8)
    varied = (cv2.dilate(luma, square) > cv2.erode(luma, square))[1:-1, 1:-1]  # no fill: glass beyond a slide, a mask's
    return float(np.percentile(residual[varied], 25) / (6 * _ABS_NORMAL_Q25)) if varied.sum() >= 100 else 0.0


def denoised(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` smoothed by a DENOISE_PX Gaussian where its noise_sd exceeds NOISY_SD, else ``rgb`` itself: what its
    colours are read from."""
    return cv2.GaussianBlur(rgb, (0, 0), DENOISE_PX) if noise_sd(rgb) > NOISY_SD else rgb


def stain_fractions(od: np.ndarray, *, stained_od: float = STAINED_OD,
                    counterstain_od: float = COUNTERSTAIN_OD) -> tuple[float, float, int]:
    """(eosin fraction, haematoxylin fraction, stained pixel count) of RGB log10 OD pixels (..., 3).

    Haematoxylin, among pixels above ``counterstain_od``: b/g < 0.9 and 0.4 < r/g < 2.2 (bluer than
    that is a saturated rendered colour). Eosin, among pixels above ``stained_od`` and not DAB
    (b/g < 0.75): r/g < 0.4, or r/g < 0.85 and 0.12 below the r/g of the image's darkest non-DAB
    pixels (its nuclei), i.e. redder than its own haematoxylin.
    """
    flat = _od_sample(od)
    total = per_channel(np.add, flat)
    flat, total = flat[total > counterstain_od], total[total > counterstain_od]
    g = np.maximum(flat[:, 1], 1e-6)
    rg, bg = flat[:, 0] / g, flat[:, 2] / g
    haem = float(np.mean((bg < 0.9) & (rg > 0.4) & (rg < 2.2))) if len(flat) else 0.0
    stained = total > stained_od
    rg, bg, total = rg[stained], bg[stained], total[stained]
    if len(total) == 0:
        return 0.0, haem, 0
    not_dab = bg < 0.75
    eosin = not_dab & (rg < 0.4)
    if not_dab.sum() >= 50:
        od_nd = total[not_dab]
        nuclear_rg = float(np.median(rg[not_dab][od_nd >= np.percentile(od_nd, 90)]))
        eosin |= not_dab & (rg < 0.85) & (rg < nuclear_rg - 0.12)
    return float(eosin.mean()), haem, int(len(total))


def stain_chroma_deg(od: np.ndarray, *, stained_od: float = STAINED_OD, quantile: float = 0.98) -> float:
    """Angle from grey (degrees) of the stained pixels' colour: the ``quantile`` of the angles between the RGB
    log10 OD (..., 3) of the pixels of summed OD over ``stained_od`` and the grey axis, i.e. the purest stain
    colours of the image (a mix of two stains lies nearer grey than either). NaN where fewer than 200 are stained."""
    flat = _stained_sample(od, stained_od)
    if len(flat) < 200:
        return float("nan")
    cosine = flat.sum(1) / (np.sqrt(3.0) * np.linalg.norm(flat, axis=1))
    return float(np.degrees(np.arccos(np.clip(np.quantile(cosine, 1 - quantile), -1.0, 1.0))))


def off_plane_fraction(od: np.ndarray, *, stained_od: float = OFF_PLANE_MIN_OD, max_deg: float = OFF_PLANE_DEG) -> float:
    """Share of the RGB log10 OD pixels (..., 3) of summed OD over ``stained_od`` whose colour lies more than
    ``max_deg`` off the plane of the default haematoxylin and DAB vectors (no mix of those two stains has it)."""
    flat = _stained_sample(od, stained_od)
    if len(flat) == 0:
        return 0.0
    sine = np.abs(flat @ np.array(H_DAB.residual)) / np.linalg.norm(flat, axis=1)  # residual: the plane's unit normal
    return float(np.mean(sine > np.sin(np.radians(max_deg))))


def rendered_fractions(rgb: np.ndarray, od: np.ndarray, *, stained_od: float = STAINED_OD) -> tuple[float, float, float]:
    """(share of the commonest exact colour, share of stained pixels surviving a 5 px disc opening,
    share of coloured stained pixels (not dark neutral: a scanner's black fill; not marker ink) whose 3x3 neighbourhood
    is one exact colour, which a scan's sensor noise never leaves)."""
    flat = rgb.reshape(-1, 3)[:: max(1, rgb.shape[0] * rgb.shape[1] // 250_000)]
    packed = (flat[:, 0].astype(np.int32) << 16) | (flat[:, 1].astype(np.int32) << 8) | flat[:, 2]
    modal = float(np.unique(packed, return_counts=True)[1].max() / len(packed))
    stained = (per_channel(np.add, od) > stained_od).astype(np.uint8)
    opened = cv2.morphologyEx(stained, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    coloured = stained.astype(bool) & ~dark_neutral(rgb) & ~pen_ink(rgb)  # smooth marker ink on a thumbnail is not a drawing
    square = np.ones((3, 3), np.uint8)
    uniform = np.logical_and.reduce([cv2.dilate(c, square) == cv2.erode(c, square) for c in cv2.split(np.ascontiguousarray(rgb))])
    return (modal, float(opened.sum() / max(int(stained.sum()), 1)),
            float((uniform & coloured).sum() / max(int(coloured.sum()), 1)))


def nucleus_diameter_um(rgb: np.ndarray, *, mpp: float, background=(255.0, 255.0, 255.0),
                        work_mpp: float = 0.5, max_px: int = 768) -> float:
    """Typical nucleus diameter in µm if the image is at ``mpp`` µm/px (NaN when no blobs are found).

    Scale-normalised Laplacian of Gaussian on haematoxylin OD over 12 scales, on at most a
    ``max_px`` square around the haematoxylin's centre of mass at no finer than ``work_mpp``; the
    scale of the 300 strongest blob responses gives the diameter (2·√2·σ). A wrong µm/px shows as
    nuclei of the wrong size (the colon IHC at 5 µm/px: 43 µm nuclei).
    """
    rgb = fill_as_glass(rgb, mpp=mpp)  # black fill's edge read as 1.4-8 µm blobs
    f = min(1.0, mpp / work_mpp)
    if f < 1.0:
        rgb = cv2.resize(rgb, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        mpp = mpp / f
    h = np.clip(deconvolve(rgb, H_DAB.with_background(background))[..., 0], 0, 3)
    if max(h.shape) > max_px:
        m = cv2.moments(h)
        cy, cx = (m["m01"] / m["m00"], m["m10"] / m["m00"]) if m["m00"] > 0 else (h.shape[0] / 2, h.shape[1] / 2)
        y0 = int(np.clip(cy - max_px / 2, 0, max(0, h.shape[0] - max_px)))
        x0 = int(np.clip(cx - max_px / 2, 0, max(0, h.shape[1] - max_px)))
        h = np.ascontiguousarray(h[y0 : y0 + max_px, x0 : x0 + max_px])
    sigmas_px = 1.25 ** np.arange(12)
    sigmas_px = sigmas_px[sigmas_px < min(h.shape) / 8]
    if len(sigmas_px) == 0:
        return float("nan")
    best = np.full(h.shape, -np.inf, np.float32)
    scale = np.zeros(h.shape, np.int8)
    blurred, done = h, 0.0
    for i, s in enumerate(sigmas_px):  # each scale blurred from the last (Gaussians compose): shorter kernels
        blurred, done = cv2.GaussianBlur(blurred, (0, 0), float(np.sqrt(s * s - done * done))), s
        response = -(s * s) * cv2.Laplacian(blurred, cv2.CV_32F)
        scale[response > best] = i
        np.maximum(best, response, out=best)
    peaks = (best >= cv2.dilate(best, np.ones((5, 5), np.uint8))) & (best > 0.02)
    if peaks.sum() < 10:
        return float("nan")
    strongest = np.argsort(best[peaks])[-300:]
    return float(np.median(2 * np.sqrt(2) * sigmas_px[scale[peaks][strongest]]) * mpp)


def check_image(rgb: np.ndarray, *, mpp: float, detail: np.ndarray | None = None,
                detail_mpp: float | None = None) -> ImageCheck:
    """Judge an RGB uint8 image (a field, or a slide thumbnail at ``mpp`` µm/px).

    ``detail``: a tissue region at ``detail_mpp`` where nuclei are resolved (a whole slide's
    thumbnail is too coarse); without it the image itself is used for the nucleus size.
    """
    rgb = _without_frame(rgb)  # a scanner's black fill is neither dark tissue nor stain
    if rgb.size == 0:
        return ImageCheck(False, "dark_background", "the image is all black: not a brightfield slide; not scored", 1.0,
                          0.0, 0.0, float("nan"), (255.0, 255.0, 255.0))
    level = white_level(rgb)
    background = _as_background(level, GLASS_MAX_CAST)
    if detail is not None:
        detail = _without_frame(detail)
    own_detail = detail is None or detail.size == 0  # the image resolves its nuclei itself (a field)
    detail, detail_mpp, detail_background = ((rgb, mpp, background) if own_detail else
                                             (detail, detail_mpp or mpp, glass_background(detail)))
    dark = dark_fraction(detail)
    od = optical_density(rgb, background)
    on_scan = ~black_fill(rgb)  # a turn's or a mask's black fill is no stain: it diluted an H&E's eosin share
    scanned = _pixels(od, on_scan)
    smooth = denoised(rgb)  # colours read off the sensor's noise
    colours = scanned if smooth is rgb else _pixels(optical_density(smooth, background), on_scan)
    eosin, haem, n_stained = stain_fractions(colours)
    modal, solid, uniform = rendered_fractions(rgb, od)
    # stain colours where the stains are resolved: a thumbnail blends haematoxylin with DAB, nearer grey than either
    chroma = stain_chroma_deg(colours if own_detail else _pixels(optical_density(denoised(detail), detail_background),
                                                                   ~black_fill(detail)))
    diameter = nucleus_diameter_um(detail, mpp=detail_mpp, background=detail_background)
    code, reason = "ok", ""
    dim = dark_fraction(detail, max_intensity=DIM_INTENSITY, max_chroma=DIM_MAX_CHROMA)
    if dark > MAX_DARK_FRACTION or dim > MAX_DIM_FRACTION:
        share = dark if dark > MAX_DARK_FRACTION else dim
        code, reason = "dark_background", (f"{share:.0%} of the image is dark: not a brightfield slide (fluorescence, "
                                           "darkfield, an inverted image or a photograph); not scored")
    elif (clipped := max(clipped_fraction(rgb), clipped_fraction(detail))) > MAX_CLIPPED_FRACTION:
        code, reason = "clipped", (f"{clipped:.0%} of the image's pixels have a colour channel clipped at 0 (a contrast "
                                   "stretch or a levels edit): their optical densities cannot be read; give the scan as "
                                   "it was acquired; not scored")
    elif modal > MAX_FLAT_FRACTION and solid < MIN_SOLID_FRACTION:
        code, reason = "rendered_graphic", (f"{modal:.0%} of the image is one exact colour and its marks are thin "
                                            "strokes: a screenshot, text or a plot, not a scanned slide; not scored")
    elif uniform > MAX_UNIFORM_FRACTION:
        code, reason = "rendered_graphic", (f"{uniform:.0%} of its stained pixels lie in patches of one exact colour, "
                                            "which a scanner's noise never leaves: a drawing or a rendered image, "
                                            "not a scanned slide; not scored")
    elif chroma < MIN_STAIN_CHROMA_DEG:
        code, reason = "faded", (f"the image's stained pixels are nearly grey (the most coloured 2% lie {chroma:.1f}° from grey, "
                                 "haematoxylin and DAB 18-21°): a faded stain, or a desaturated or greyscale image; "
                                 "haematoxylin cannot be told from DAB, and every membrane would read weaker; not scored")
    elif n_stained >= 200 and eosin > MAX_EOSIN_FRACTION:
        code, reason = "eosin", (f"{eosin:.0%} of stained tissue has the colour of eosin: this looks like an "
                                 "H&E slide (or a red chromogen: AEC, Fast Red), not a HER2 (H-DAB) immunostain; not scored")
    elif n_stained >= 200 and (off := off_plane_fraction(scanned)) > MAX_OFF_PLANE_FRACTION:
        code, reason = "other_chromogen", (f"{off:.0%} of stained pixels have a colour no mix of haematoxylin and DAB "
                                           "gives: another chromogen (green, blue-green) or stain, not a HER2 (H-DAB) "
                                           "immunostain; not scored")
    elif n_stained >= 200 and haem < MIN_HAEMATOXYLIN_FRACTION:
        code, reason = "no_counterstain", (f"only {haem:.1%} of stained pixels have the blue of a haematoxylin "
                                           "counterstain: no nuclei to count cells by (a counterstain missing or "
                                           "too pale), or not an H-DAB tissue image (a photo, text, a plot or "
                                           f"another stain){_cast_hint(rgb, level)}; not scored")
    elif np.isfinite(diameter) and diameter > MAX_NUCLEUS_DIAMETER_UM:
        code, reason = "implausible_scale", (f"at {detail_mpp:g} µm/px nuclei would be {diameter:.0f} µm across "
                                             f"(real nuclei: 4-15 µm): the µm/px is wrong; give the scan's --mpp")
    elif np.isfinite(diameter) and diameter < MIN_NUCLEUS_DIAMETER_UM:
        code, reason = "implausible_scale", (f"at the µm/px given the blobs that would be nuclei are only "
                                             f"{diameter:.1f} µm across (real nuclei: 4-15 µm): the µm/px is far too "
                                             "fine, or this is not tissue (a photo or a drawing); not scored")
    return ImageCheck(code == "ok", code, reason, round(dark, 4), round(eosin, 4), round(haem, 4),
                      round(diameter, 2) if np.isfinite(diameter) else float("nan"), background, round(chroma, 2))


def check_slide(slide: Slide, thumb: np.ndarray, tissue: TissueMask, *, detail_px: int = 1024,
                detail_mpp: float = 0.5) -> ImageCheck:
    """check_image on a slide's thumbnail (at ``tissue.mpp``), with nuclei measured on a ``detail_px`` square read
    at max(scan, ``detail_mpp``) µm/px around the tissue's most interior point, where the thumbnail is coarser than
    both 1 µm/px and the scan."""
    thumb_mpp = tissue.mpp
    if thumb_mpp <= max(1.0, 1.01 * slide.mpp) or not tissue.mask.any():
        return check_image(thumb, mpp=thumb_mpp)
    row, col = tissue.interior_point
    read_mpp = max(slide.mpp, detail_mpp)
    half_l0 = detail_px * read_mpp / slide.mpp / 2
    x = int(max(0, min(col * thumb_mpp / slide.mpp - half_l0, slide.dimensions[0] - 2 * half_l0)))
    y = int(max(0, min(row * thumb_mpp / slide.mpp - half_l0, slide.dimensions[1] - 2 * half_l0)))
    detail = slide.read_region((x, y), (detail_px, detail_px), mpp=read_mpp)
    return check_image(thumb, mpp=thumb_mpp, detail=detail, detail_mpp=read_mpp)
