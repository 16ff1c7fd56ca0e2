"""Tissue mask at low resolution and the tile grid over it."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from .stain import black_fill, optical_density, per_channel

__all__ = ["MIN_TISSUE_UM2", "DARK_INTENSITY", "DARK_MAX_CHROMA", "dark_neutral", "TissueMask", "tissue_mask", "pen_ink", "Tile",
           "tile_grid"]


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask at ``mpp`` µm/px, with the pixels excluded as pen ink or dark debris."""

    mask: np.ndarray
    mpp: float
    pen: np.ndarray
    dark: np.ndarray

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp * 1e-3) ** 2

    @cached_property
    def interior_point(self) -> tuple[int, int]:
        """(row, column) of the mask's pixel farthest from any non-tissue pixel: where a square read around it is
        most likely all tissue."""
        dist = cv2.distanceTransform(self.mask.astype(np.uint8), cv2.DIST_L2, 5)
        row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
        return int(row), int(col)


MIN_TISSUE_UM2 = 1_000.0
"""Least area (µm²) of a piece of tissue, about a cohesive cluster of 5 tumour cells (the gastric biopsy rule's
smallest): smaller fragments (debris, dust) are not tissue. At 5,000 µm² a slide of one 1+ fragment and 30
real 3+ clusters 60 µm across (a cell block, a fragmented core) lost every cluster and read 1+, HER2-low
eligible; it is 3+."""

DARK_INTENSITY = 50
DARK_MAX_CHROMA = 20
"""A pixel is dark and neutral (black) when its brightest channel is below 50 and its channels differ by
less than 20 (0-255): the background of fluorescence and darkfield, black marker ink and debris; in
brightfield tissue, where even over-stained pixels keep the colour of their stain, only a small share (the
deepest DAB of real Ki67 nuclei: INK_MAX_CHROMA)."""


INK_MAX_CHROMA = 8
"""Black ink and debris (tissue_mask) are dark neutral pixels within this chroma. Black marker ink reads within
6; the deepest DAB of a real Ki67 field's nuclei reads near (40, 27, 21), within DARK_MAX_CHROMA, and is tissue
(OS-2-ndpi's thumbnail: 1.9% of it dark within 20, 0.34% within 8)."""


def dark_neutral(rgb: np.ndarray, max_intensity: int = DARK_INTENSITY, max_chroma: int = DARK_MAX_CHROMA) -> np.ndarray:
    """Dark neutral pixels (bool): brightest channel below ``max_intensity``, channels within ``max_chroma``."""
    hi, lo = per_channel(np.maximum, rgb), per_channel(np.minimum, rgb)
    return (hi < max_intensity) & (hi - lo < max_chroma)


def pen_ink(rgb: np.ndarray) -> np.ndarray:
    """Marker ink (bool per pixel, grown by 1 px): green or cyan (no histology stain is green), or very
    saturated deep blue."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0].astype(np.int16) * 2, hsv[..., 1], hsv[..., 2]
    pen = ((hue > 70) & (hue < 200) & (sat > 60)) | ((hue >= 200) & (hue < 250) & (sat > 180) & (val < 180))
    return cv2.dilate(pen.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


def tissue_mask(
    thumb: np.ndarray,
    *,
    mpp: float,
    background=(255.0, 255.0, 255.0),
    min_od: float = 0.06,
    min_area_um2: float = MIN_TISSUE_UM2,
) -> TissueMask:
    """Tissue on a low-resolution RGB thumbnail (uint8) at ``mpp`` µm/px.

    Tissue = optical density against the glass ``background`` (RGB I0) above ``min_od`` (log10)
    in any channel, minus dark neutral pixels (dark_neutral: scanner borders, black marker ink, debris; a
    black dot of ink at RGB 30-45 was the slide's "thickest tissue", where the image check read its nuclei,
    and the slide was refused as dark) and pen ink (green/blue marker, recognised by its hue); smoothed and
    stripped of fragments smaller than ``min_area_um2``. A turn's or a mask's pure black fill (black_fill) is
    neither tissue nor the dark debris excluded from it.
    """
    od = optical_density(thumb, background)
    stained = per_channel(np.maximum, od) > min_od
    dark = dark_neutral(thumb, max_chroma=INK_MAX_CHROMA)
    pen = pen_ink(thumb)
    mask = (stained & ~dark & ~pen).astype(np.uint8)
    k = max(1, round(16 / mpp)) | 1  # ~16 µm structuring element
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_px = min_area_um2 / (mpp * mpp)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    return TissueMask(keep[labels] & ~pen & ~dark, mpp, pen & stained, dark & ~black_fill(thumb))


@dataclass(frozen=True)
class Tile:
    """One tile of the grid, in pixels at the grid's µm/px.

    ``core`` (x, y, width, height) owns the cells whose centroid falls in it; ``read`` is the
    core grown by the overlap margin, clipped to nothing (reads beyond the slide are white);
    ``slide_px``: the slide's (width, height) on the grid (None: not known, taken as no nearer than the read box's edge).
    """

    row: int
    col: int
    core: tuple[int, int, int, int]
    margin: int
    slide_px: tuple[int, int] | None = None

    @property
    def read(self) -> tuple[int, int, int, int]:
        x, y, w, h = self.core
        m = self.margin
        return (x - m, y - m, w + 2 * m, h + 2 * m)

    def beyond_slide(self) -> np.ndarray:
        """Bool (height, width) of the read box: its pixels beyond the slide, read as white glass, and its
        edge row or column where the box ends just at the slide's edge (nothing beyond was read): where no
        cell grows and no membrane is read. Inside the slide the box's edge is only a margin's edge."""
        x, y, w, h = self.read
        sw, sh = self.slide_px or (x + w, y + h)

        def inside(start: int, size: int, end: int) -> slice:  # the box's own pixels within the slide, on one axis
            lo = -start if start < 0 else (1 if start == 0 else 0)
            hi = end - start if end - start < size else (size - 1 if end - start == size else size)
            return slice(lo, max(lo, hi))

        out = np.ones((h, w), bool)
        out[inside(y, h, sh), inside(x, w, sw)] = False
        return out


def tile_grid(
    tissue: TissueMask,
    *,
    slide_size_px: tuple[int, int],
    tile_px: int = 512,
    margin_px: int = 32,
) -> list[Tile]:
    """Tiles (at the target µm/px) whose core reaches the tissue, or lies within one mask pixel of it: a
    coarse mask's pixel only partly over the tissue's edge can read as glass, and a tile holding a strip of
    a small fragment must still be scored (a share-of-the-tile floor lost 9-18% of a biopsy fragment's cells).

    ``slide_size_px`` is the slide's (width, height) at the target µm/px; the mask may be coarser.
    The grid depends only on its inputs, in row-major order.
    """
    width, height = slide_size_px
    scale_x = tissue.mask.shape[1] / width
    scale_y = tissue.mask.shape[0] / height
    integral = cv2.integral(cv2.dilate(tissue.mask.astype(np.uint8), np.ones((3, 3), np.uint8)))
    tiles = []
    for r, y in enumerate(range(0, height, tile_px)):
        for c, x in enumerate(range(0, width, tile_px)):
            w, h = min(tile_px, width - x), min(tile_px, height - y)
            mx0, my0 = int(x * scale_x), int(y * scale_y)
            mx1 = max(mx0 + 1, min(tissue.mask.shape[1], int(np.ceil((x + w) * scale_x))))
            my1 = max(my0 + 1, min(tissue.mask.shape[0], int(np.ceil((y + h) * scale_y))))
            inside = integral[my1, mx1] - integral[my0, mx1] - integral[my1, mx0] + integral[my0, mx0]
            if inside > 0:
                tiles.append(Tile(r, c, (x, y, w, h), margin_px, (width, height)))
    return tiles
