"""Optical density, H-DAB colour deconvolution and stain-vector estimation.

Every intensity here is true log10 optical density, OD = -log10(I / I0), with I0 the
slide's white background (Ruifrok & Johnston 2001). Stain vectors are unit RGB OD vectors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = [
    "StainSet",
    "H_DAB",
    "EOSIN_OD",
    "od_lut",
    "per_channel",
    "optical_density",
    "deconvolve",
    "GLASS_MIN",
    "GLASS_MIN_PIXELS",
    "unscanned_fill",
    "black_fill",
    "brightest_level",
    "estimate_background",
    "estimate_stains",
    "remove_dab",
    "scale_stains",
]


def _unit(v, name: str = "stain vector") -> tuple[float, float, float]:
    """``v`` scaled to unit length; ValueError unless it is 3 finite numbers, not all 0."""
    a = np.asarray(v, dtype=np.float64)
    if a.shape != (3,) or not np.isfinite(a).all() or not np.linalg.norm(a) > 0:
        raise ValueError(f"{name} must be 3 finite RGB optical densities, not all 0, got {v!r}")
    return tuple(float(x) for x in a / np.linalg.norm(a))


@dataclass(frozen=True)
class StainSet:
    """Named stain vectors (unit RGB optical density) and the background intensity I0 (RGB, 0-255)."""

    hematoxylin: tuple[float, float, float]
    dab: tuple[float, float, float]
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)
    source: str = "default"
    residual: tuple[float, float, float] = field(init=False)

    def __post_init__(self) -> None:
        h, d = np.array(_unit(self.hematoxylin, "haematoxylin vector")), np.array(_unit(self.dab, "DAB vector"))
        if np.degrees(np.arccos(min(1.0, abs(float(h @ d))))) < 1.0:  # a near-singular unmixing
            raise ValueError(f"the haematoxylin and DAB vectors lie under 1 degree apart: {self.hematoxylin}, {self.dab}")
        object.__setattr__(self, "hematoxylin", tuple(h.tolist()))
        object.__setattr__(self, "dab", tuple(d.tolist()))
        object.__setattr__(self, "residual", _unit(np.cross(h, d)))
        bg = np.asarray(self.background, dtype=np.float64)
        if bg.shape != (3,) or not np.isfinite(bg).all() or bg.min() <= 0:
            raise ValueError(f"background intensity must be 3 finite positive RGB values, got {self.background}")

    def matrix(self) -> np.ndarray:
        """3x3 float32 matrix whose rows are the H, DAB and residual OD vectors."""
        return np.array([self.hematoxylin, self.dab, self.residual], dtype=np.float32)

    def unmixing(self) -> np.ndarray:
        """3x3 float32 matrix M with (H, DAB, residual) = M @ od_rgb."""
        return np.linalg.inv(self.matrix().T.astype(np.float64)).astype(np.float32)

    def with_background(self, background) -> "StainSet":
        return StainSet(self.hematoxylin, self.dab, tuple(float(b) for b in background), self.source)

    def to_dict(self) -> dict:
        return {
            "hematoxylin": [round(x, 4) for x in self.hematoxylin],
            "dab": [round(x, 4) for x in self.dab],
            "residual": [round(x, 4) for x in self.residual],
            "background": [round(x, 1) for x in self.background],
            "source": self.source,
        }


H_DAB = StainSet(hematoxylin=(0.651, 0.701, 0.290), dab=(0.269, 0.568, 0.778), source="ruifrok-johnston")
"""Default H-DAB vectors (Ruifrok & Johnston 2001)."""

EOSIN_OD = _unit((0.072, 0.990, 0.105))
"""Eosin OD vector (Ruifrok & Johnston 2001): the synthetic H&E fields' eosin. Real scanned eosin lies
about as close to DAB as to it, so H&E is recognised by imagecheck, not by this vector."""


def od_lut(background: float = 255.0) -> np.ndarray:
    """256-entry float32 table: log10 OD of each 8-bit intensity against background I0."""
    i = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    return np.maximum(-np.log10(i / background), 0.0).astype(np.float32)


def per_channel(ufunc: np.ufunc, a: np.ndarray) -> np.ndarray:
    """``ufunc`` (np.maximum, np.minimum; np.add on floats) across the channels of a (..., 3) array, channel by
    channel: the same values as a reduction along the last axis, about 8x faster."""
    return ufunc(ufunc(a[..., 0], a[..., 1]), a[..., 2])


def optical_density(rgb: np.ndarray, background=(255.0, 255.0, 255.0)) -> np.ndarray:
    """RGB uint8 (..., 3) -> float32 log10 OD (..., 3), clipped at 0 (brighter than background)."""
    if rgb.dtype != np.uint8:
        raise TypeError(f"expected uint8 RGB, got {rgb.dtype}")
    if rgb.size == 0:
        return np.zeros(rgb.shape, np.float32)
    lut = np.stack([od_lut(b) for b in background], axis=-1).reshape(256, 1, 3)  # one pass over the pixels: 3x faster
    return cv2.LUT(np.ascontiguousarray(rgb).reshape(-1, 1, 3), lut).reshape(rgb.shape)


def deconvolve(rgb: np.ndarray, stains: StainSet = H_DAB) -> np.ndarray:
    """Colour deconvolution: RGB uint8 (H, W, 3) -> float32 (H, W, 3) stain ODs (haematoxylin, DAB, residual)."""
    od = optical_density(rgb, stains.background)
    h, w = od.shape[:2]
    return cv2.transform(od.reshape(h, w, 3), stains.unmixing()).reshape(h, w, 3)


def scale_stains(rgb: np.ndarray, *, hematoxylin: float = 1.0, dab: float = 1.0, residual: float = 1.0,
                 stains: StainSet | None = None) -> np.ndarray:
    """The same field with each stain's optical density multiplied by a factor: RGB uint8 recomposed
    (Beer-Lambert) from its deconvolved haematoxylin, DAB and residual OD so scaled.

    A real field with 0.5 x its haematoxylin is that field under a paler counterstain; with no DAB,
    a real HER2 0 (remove_dab). For a weaker DAB, scale ``residual`` with ``dab``: the residual is where
    the vectors misfit the DAB, and left whole it tints the membranes green. ``stains``: the field's
    vectors (default: Ruifrok-Johnston against the field's own background).
    """
    stains = stains or H_DAB.with_background(estimate_background(rgb))
    conc = deconvolve(rgb, stains) * np.float32([hematoxylin, dab, residual])
    od = conc @ stains.matrix()
    out = np.float32(stains.background) * np.power(np.float32(10.0), -np.maximum(od, 0.0))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def remove_dab(rgb: np.ndarray, stains: StainSet | None = None) -> np.ndarray:
    """The same field with its DAB taken out: RGB uint8 recomposed from its haematoxylin OD alone.

    A real DAB-stained field becomes a real HER2 0 (haematoxylin only) with its real morphology.
    The residual channel, where a stain vector's misfit lands, is dropped with the DAB.
    """
    return scale_stains(rgb, dab=0.0, residual=0.0, stains=stains)


GLASS_MIN = 200
"""Least 8-bit level, in every channel, of a pixel taken for glass (estimate_background)."""
GLASS_MIN_PIXELS = 100
"""Fewest glass pixels from which estimate_background takes the white level (fewer: 255)."""


def brightest_level(rgb: np.ndarray) -> float:
    """The 8-bit level that the GLASS_MIN_PIXELS brightest pixels reach in every channel (0 in a smaller
    image): estimate_background finds glass where it is GLASS_MIN or more."""
    low = per_channel(np.minimum, rgb).ravel()
    return float(np.partition(low, -GLASS_MIN_PIXELS)[-GLASS_MIN_PIXELS]) if len(low) >= GLASS_MIN_PIXELS else 0.0


def estimate_background(rgb: np.ndarray, *, min_brightness: int = GLASS_MIN) -> tuple[float, float, float]:
    """White level I0 per channel: the 99th percentile of bright (glass) pixels, else (too few) 255.

    Pure white (255 in every channel) is left out where enough other glass remains: it is the fill
    of an area the scanner did not image (or pasted around a field), not the glass under the tissue,
    whose own tint sets the stains' optical density (see unscanned_fill)."""
    bright = per_channel(np.minimum, rgb) >= min_brightness
    glass = bright & ~unscanned_fill(rgb)
    if np.count_nonzero(glass) >= GLASS_MIN_PIXELS:
        bright = glass
    if np.count_nonzero(bright) < GLASS_MIN_PIXELS:
        return (255.0, 255.0, 255.0)
    return tuple(float(np.percentile(rgb[..., c][bright], 99)) for c in range(3))  # a channel at a time: 3x faster


def unscanned_fill(rgb: np.ndarray) -> np.ndarray:
    """Pixels of pure white (255 in every channel): bool (H, W)."""
    return per_channel(np.minimum, rgb) == 255


def black_fill(rgb: np.ndarray) -> np.ndarray:
    """Pixels of pure black (0 in every channel), bool (H, W): what a rotation, a mask or an editor fills
    with, never a scanned pixel (a camera's black keeps noise, a stain its colour). A lossy (JPEG) copy of
    the fill, near black but not pure, is not told from a photograph's black, which can clip to 0 in
    patches too (scikit-image's astronaut: its sky)."""
    return per_channel(np.maximum, rgb) == 0


def estimate_stains(
    rgb: np.ndarray,
    *,
    background=(255.0, 255.0, 255.0),
    od_min: float = 0.15,
    alpha: float = 1.0,
    min_dab_fraction: float = 0.05,
    max_deviation_deg: float = 25.0,
    max_dab_deviation_deg: float = 20.0,
    h_percentile: float = 10.0,
    agree_deg: float = 5.0,
    leak_deg: float = 3.0,
    min_separation_deg: float = 20.0,
    max_pixels: int = 250_000,
    default: StainSet = H_DAB,
) -> tuple[StainSet, str]:
    """The slide's own H and DAB vectors where the default ones would leak one stain into the other.

    The haematoxylin is estimated from the pixels that are mostly haematoxylin (the ``h_percentile``
    of their directions away from DAB, see _purest). The DAB too (Macenko: the extreme OD directions
    in the plane of the two main components) where at least ``min_dab_fraction`` of the stained
    pixels carry DAB (OD > 0.15) under the pair and the pair's haematoxylin agrees with the first
    within ``agree_deg``, and its DAB lies within ``max_dab_deviation_deg`` of the default (chromogens
    differ by a few degrees; further off is DAB mixed with haematoxylin, as in a cytoplasmic blush,
    not a purer DAB); otherwise (HER2 0 and 1+, DAB in nuclei or cytoplasm: Macenko is unstable there)
    the default DAB. A haematoxylin more than ``max_deviation_deg`` from the default is not a stain.

    Each stain's estimate is used where it lies more than ``leak_deg`` beyond the default towards the
    other stain: under the default vectors such a haematoxylin reads as DAB (every nucleus brown) and
    such a DAB as haematoxylin (stained membranes found as nuclei, a 3+ refused or read 2+). A stain
    on the far side leaks negatively (a little signal lost, none invented) and keeps the default
    vector the thresholds were set with on real images (whose haematoxylin lies 5-15 degrees off the
    default, leaning away from DAB in all but one). A pair less than ``min_separation_deg`` apart is no H-DAB
    pair (the default's are 37 degrees apart; the jittered synthetic fields' own, 25 or more; a real H&E with
    its saturation halved, 11): the default vectors are kept. At most ``max_pixels`` pixels, evenly spread, are read.
    Returns the stain set and a note saying which and why.
    """
    flat = rgb.reshape(-1, 3)
    od = optical_density(flat[:: max(1, len(flat) // max_pixels)], background)  # an even sample is as good, and fast
    od = od[od.sum(axis=1) > od_min * 3]
    base = default.with_background(background)
    if len(od) < 500:
        return base, "too little stained tissue for estimation; default vectors used"
    ref_h, ref_d = np.array(default.hematoxylin), np.array(default.dab)
    u = od @ default.unmixing().T  # mostly haematoxylin, even where the default vectors leak much of it into DAB
    nuclear = od[(u[:, 0] > 0.2) & (u[:, 1] < 0.8 * u[:, 0])]  # a haematoxylin 16 deg towards DAB still passes
    if len(nuclear) < 500:
        return base, "too little haematoxylin for an estimate; default vectors used"
    h = _purest(nuclear, np.abs(np.linalg.svd(nuclear, full_matrices=False)[2][0]), ref_d, h_percentile)
    if _angle(h, ref_h) > max_deviation_deg:
        return base, f"estimated haematoxylin {_angle(h, ref_h):.0f} deg from the default; default vectors used"
    d, what = ref_d, "haematoxylin estimated, DAB too scarce or too mixed to estimate (default DAB)"
    pair = _macenko(od, ref_h, alpha)
    if (pair is not None and _angle(pair[1], ref_d) <= max_dab_deviation_deg and _angle(pair[0], h) <= agree_deg
            and np.mean(od @ StainSet(*pair).unmixing()[1] > 0.15) >= min_dab_fraction):
        (h, d), what = pair, "estimated (Macenko)"
    h_in, d_in = _toward(h, ref_h, ref_d), _toward(d, ref_d, ref_h)
    beyond = f"haematoxylin {h_in:+.1f} deg, DAB {d_in:+.1f} deg towards the other stain"
    use_h, use_d = h_in > leak_deg, d_in > leak_deg
    if not (use_h or use_d):
        return base, f"default vectors: the slide's own do not lean towards each other beyond them ({beyond})"
    used = " and ".join(name for name, on in (("haematoxylin", use_h), ("DAB", use_d)) if on)
    h, d = (h if use_h else ref_h), (d if use_d else ref_d)
    if (apart := _angle(h, d)) < min_separation_deg:
        return base, (f"default vectors: the slide's own stains ({beyond}) would lie only {apart:.0f} deg apart, under "
                      f"{min_separation_deg:g}: not two stains (a faded H&E reads so)")
    return StainSet(tuple(h), tuple(d), tuple(background), source="estimated"), f"{what}; the slide's own {used} used ({beyond})"


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    """Degrees between two vectors."""
    a, b = np.asarray(a, float) / np.linalg.norm(a), np.asarray(b, float) / np.linalg.norm(b)
    return float(np.degrees(np.arccos(np.clip(a @ b, -1.0, 1.0))))


def _plane(v: np.ndarray, towards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal (e1, e2) of the plane of ``v`` and ``towards``: e1 along ``v``, e2 on the side of ``towards``."""
    e1 = v / np.linalg.norm(v)
    e2 = towards - (towards @ e1) * e1
    return e1, e2 / np.linalg.norm(e2)


def _toward(v: np.ndarray, ref: np.ndarray, other: np.ndarray) -> float:
    """Degrees by which ``v`` lies beyond ``ref`` towards ``other`` (negative: away), in the plane of the two."""
    e1, e2 = _plane(ref, other)
    return float(np.degrees(np.arctan2(v @ e2, v @ e1)))


def _purest(od: np.ndarray, h: np.ndarray, d: np.ndarray, percentile: float) -> np.ndarray:
    """The unit direction at ``percentile`` of the OD pixels' angles from ``h`` towards ``d``, in the plane of the two.

    JPEG's loss of colour pulls a stain's pixels towards grey, which for haematoxylin is towards DAB:
    on synthetic fields of known vectors the mean direction of nuclear pixels lies 1.7 / 2.4 / 3.2
    degrees towards DAB at JPEG quality 95 / 88 / 75 (0.6 without JPEG), which reads faint DAB ~7%
    low; their 10th percentile lies within 1 degree.
    """
    e1, e2 = _plane(h, d)
    a = np.percentile(np.arctan2(od @ e2, od @ e1), percentile)
    return np.cos(a) * e1 + np.sin(a) * e2


def _macenko(od: np.ndarray, ref_h: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(haematoxylin, DAB) unit vectors: the ``alpha`` / 100 - ``alpha`` percentile directions of the OD
    pixels in the plane of their two main components, the one nearer ``ref_h`` taken as haematoxylin;
    None when the two are within 10 degrees (one stain only)."""
    plane = np.linalg.svd(od, full_matrices=False)[2][:2]
    if plane[0].sum() < 0:
        plane[0] = -plane[0]
    proj = od @ plane.T
    lo, hi = np.percentile(np.arctan2(proj[:, 1], proj[:, 0]), [alpha, 100 - alpha])
    v1 = np.abs(np.cos(lo) * plane[0] + np.sin(lo) * plane[1])
    v2 = np.abs(np.cos(hi) * plane[0] + np.sin(hi) * plane[1])
    h, d = (v1, v2) if _angle(v1, ref_h) <= _angle(v2, ref_h) else (v2, v1)
    h, d = h / np.linalg.norm(h), d / np.linalg.norm(d)
    return None if _angle(h, d) < 10 else (h, d)
