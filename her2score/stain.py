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
    "estimate_background",
    "estimate_stains",
    "remove_dab",
]


def _unit(v) -> tuple[float, float, float]:
    a = np.asarray(v, dtype=np.float64)
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
        h, d = np.array(_unit(self.hematoxylin)), np.array(_unit(self.dab))
        object.__setattr__(self, "hematoxylin", tuple(h.tolist()))
        object.__setattr__(self, "dab", tuple(d.tolist()))
        object.__setattr__(self, "residual", _unit(np.cross(h, d)))
        if min(self.background) <= 0:
            raise ValueError(f"background intensity must be positive, got {self.background}")

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
    """``ufunc`` (np.maximum, np.minimum) across the channels of a (..., 3) array, channel by channel:
    the same values as a reduction along the last axis, about 8x faster."""
    return ufunc(ufunc(a[..., 0], a[..., 1]), a[..., 2])


def optical_density(rgb: np.ndarray, background=(255.0, 255.0, 255.0)) -> np.ndarray:
    """RGB uint8 (..., 3) -> float32 log10 OD (..., 3), clipped at 0 (brighter than background)."""
    if rgb.dtype != np.uint8:
        raise TypeError(f"expected uint8 RGB, got {rgb.dtype}")
    out = np.empty(rgb.shape, dtype=np.float32)
    for c in range(3):
        out[..., c] = cv2.LUT(rgb[..., c], od_lut(background[c]))
    return out


def deconvolve(rgb: np.ndarray, stains: StainSet = H_DAB) -> np.ndarray:
    """Colour deconvolution: RGB uint8 (H, W, 3) -> float32 (H, W, 3) stain ODs (haematoxylin, DAB, residual)."""
    od = optical_density(rgb, stains.background)
    h, w = od.shape[:2]
    return cv2.transform(od.reshape(h, w, 3), stains.unmixing()).reshape(h, w, 3)


def remove_dab(rgb: np.ndarray, stains: StainSet | None = None) -> np.ndarray:
    """The same field with its DAB taken out: RGB uint8 recomposed from its haematoxylin OD alone.

    A real DAB-stained field becomes a real HER2 0 (haematoxylin only) with its real morphology.
    The residual channel, where a stain vector's misfit lands, is dropped with the DAB.
    ``stains``: the field's vectors (default: Ruifrok-Johnston against the field's own background).
    """
    stains = stains or H_DAB.with_background(estimate_background(rgb))
    od = deconvolve(rgb, stains)[..., 0:1] * np.float32(stains.hematoxylin)
    out = np.float32(stains.background) * np.power(np.float32(10.0), -np.maximum(od, 0.0))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def estimate_background(rgb: np.ndarray, *, min_brightness: int = 200) -> tuple[float, float, float]:
    """White level I0 per channel: the 99th percentile of bright (glass) pixels, else 255."""
    flat = rgb.reshape(-1, 3)
    bright = flat[per_channel(np.minimum, flat) >= min_brightness]
    if len(bright) < 100:
        return (255.0, 255.0, 255.0)
    return tuple(float(v) for v in np.percentile(bright, 99, axis=0))


def estimate_stains(
    rgb: np.ndarray,
    *,
    background=(255.0, 255.0, 255.0),
    od_min: float = 0.15,
    alpha: float = 1.0,
    min_dab_fraction: float = 0.05,
    default: StainSet = H_DAB,
) -> tuple[StainSet, str]:
    """Macenko-style estimate of the H and DAB vectors from stained pixels.

    Returns the stain set and a note. Falls back to ``default`` (with the given background)
    when too few pixels carry DAB, where Macenko is unstable (HER2 0 slides).
    """
    od = optical_density(rgb, background).reshape(-1, 3)
    od = od[od.sum(axis=1) > od_min * 3]
    base = default.with_background(background)
    if len(od) < 500:
        return base, "too little stained tissue for estimation; default vectors used"
    dab_od = od @ default.unmixing()[1]
    if np.mean(dab_od > 0.15) < min_dab_fraction:
        return base, "too little DAB for a stable estimate (as expected at HER2 0); default vectors used"
    _, _, vt = np.linalg.svd(od - 0, full_matrices=False)
    plane = vt[:2]
    if plane[0].sum() < 0:
        plane[0] = -plane[0]
    proj = od @ plane.T
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = np.cos(lo) * plane[0] + np.sin(lo) * plane[1]
    v2 = np.cos(hi) * plane[0] + np.sin(hi) * plane[1]
    v1, v2 = np.abs(v1), np.abs(v2)
    ref_h = np.array(default.hematoxylin)
    # haematoxylin is the vector closer to the reference haematoxylin (more red absorption)
    h, d = (v1, v2) if np.dot(v1 / np.linalg.norm(v1), ref_h) >= np.dot(v2 / np.linalg.norm(v2), ref_h) else (v2, v1)
    h, d = h / np.linalg.norm(h), d / np.linalg.norm(d)
    angle = np.degrees(np.arccos(np.clip(np.dot(h, d), -1, 1)))
    if angle < 10:
        return base, f"estimated vectors nearly collinear ({angle:.1f} deg); default vectors used"
    for name, got, ref in (("haematoxylin", h, ref_h), ("DAB", d, np.array(default.dab))):
        dev = np.degrees(np.arccos(np.clip(np.dot(got, ref), -1, 1)))
        if dev > 25:
            return base, f"estimated {name} vector {dev:.0f} deg from the reference; default vectors used"
    return StainSet(tuple(h), tuple(d), tuple(background), source="macenko"), "estimated (Macenko)"
