"""Membrane pixels from a ridge filter on DAB optical density, and per-cell membrane measurements."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["ridge_filter", "membrane_mask", "CellMeasurements", "measure_cells", "N_SECTORS"]

N_SECTORS = 24
"""Angular sectors around each nucleus in which membrane staining is looked for."""


def ridge_filter(dab_od: np.ndarray, *, mpp: float, sigma_um: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed DAB OD and its scale-normalised Hessian ridge response (both log10 OD).

    Gaussian smoothing at ``sigma_um`` averages sensor and JPEG noise along the ~1 µm membrane;
    the ridge response is high on thin bright lines and ~0 on flat haze.
    """
    s = sigma_um / mpp
    g = cv2.GaussianBlur(dab_od, (0, 0), s)
    dxx = cv2.Sobel(g, cv2.CV_32F, 2, 0, ksize=3)
    dyy = cv2.Sobel(g, cv2.CV_32F, 0, 2, ksize=3)
    dxy = cv2.Sobel(g, cv2.CV_32F, 1, 1, ksize=3)
    half_trace = (dxx + dyy) * 0.5
    root = cv2.sqrt(((dxx - dyy) * 0.5) ** 2 + dxy * dxy)
    return g, np.maximum(-(half_trace - root), 0.0) * (s * s)


def membrane_mask(
    smooth_dab_od: np.ndarray,
    ridge: np.ndarray,
    nuclei: np.ndarray,
    *,
    faint_od: float,
    ridge_ratio: float = 0.15,
    mpp: float,
    nucleus_clearance_um: float = 0.5,
) -> np.ndarray:
    """Membrane pixels: smoothed DAB OD at least ``faint_od`` and ridge-like (ridge >= ratio x OD).

    Faint candidates must be clear of nuclei, whose dark chromatin leaks colour noise into the DAB
    channel; signal above ``clear_od`` (3 x faint) is taken wherever it lies.
    """
    k = 2 * max(1, round(nucleus_clearance_um / mpp)) + 1
    near_nucleus = cv2.dilate((nuclei > 0).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    level_ok = (smooth_dab_od >= 3 * faint_od) | ((smooth_dab_od >= faint_od) & (near_nucleus == 0))
    return level_ok & (ridge >= ridge_ratio * smooth_dab_od)


@dataclass(frozen=True)
class CellMeasurements:
    """Per-cell measurements (arrays of equal length); positions in tile pixels (x = column).

    completeness: fraction of boundary sectors stained; longest_arc / longest_gap: longest contiguous
    stained / unstained run (fractions of sectors; a U-shaped basolateral pattern has one long gap); membrane_od: mean over stained sectors of the peak DAB OD (log10);
    membrane_od_p90: 90th percentile of sector peaks; width_um: stained membrane width (µm);
    radii_px: (n, N_SECTORS) outer radius of the cell per sector, for outlines.
    """

    label: np.ndarray
    x: np.ndarray
    y: np.ndarray
    cell_area_um2: np.ndarray
    nucleus_area_um2: np.ndarray
    nucleus_elongation: np.ndarray
    hematoxylin_od: np.ndarray
    completeness: np.ndarray
    longest_arc: np.ndarray
    longest_gap: np.ndarray
    membrane_od: np.ndarray
    membrane_od_p90: np.ndarray
    width_um: np.ndarray
    radii_px: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def select(self, keep: np.ndarray) -> "CellMeasurements":
        return CellMeasurements(**{k: v[keep] for k, v in self.__dict__.items()})


def _longest_circular_run(flags: np.ndarray) -> np.ndarray:
    """Longest run of True per row of a (n, k) bool array, wrapping around the ends."""
    n, k = flags.shape
    doubled = np.concatenate([flags, flags], axis=1)
    run = np.zeros(n, np.int32)
    best = np.zeros(n, np.int32)
    for j in range(2 * k):
        run = np.where(doubled[:, j], run + 1, 0)
        best = np.maximum(best, run)
    return np.minimum(best, k)


def measure_cells(
    cells: np.ndarray,
    nuclei: np.ndarray,
    hematoxylin_od: np.ndarray,
    dab_od: np.ndarray,
    membrane: np.ndarray,
    *,
    mpp: float,
    band_um: float = 1.0,
) -> CellMeasurements:
    """Measure every cell of a label image: shape, nucleus, membrane completeness and DAB OD.

    The membrane of a cell is looked for in the band of its pixels within ``band_um`` of its border;
    each of N_SECTORS angular sectors around the nucleus centroid is stained if it holds a membrane pixel.
    """
    n_lab = int(cells.max()) + 1
    rows, cols = np.indices(cells.shape, dtype=np.float32)
    # nucleus position and shape (moments over nuclear pixels); cells without a nucleus pixel are dropped
    inside = nuclei > 0
    nl, nr, nc = nuclei[inside], rows[inside], cols[inside]
    nw = np.bincount(nl, minlength=n_lab).astype(np.float64)[:n_lab]
    sr = np.bincount(nl, nr, n_lab)[:n_lab]
    sc = np.bincount(nl, nc, n_lab)[:n_lab]
    labels = np.flatnonzero(nw > 0)
    labels = labels[labels > 0]
    labels = labels[np.bincount(cells.ravel(), minlength=n_lab)[labels] > 0]
    if len(labels) == 0:
        return CellMeasurements(*([np.zeros(0, np.float32)] * 13), np.zeros((0, N_SECTORS), np.float32))
    cy, cx = sr / np.maximum(nw, 1), sc / np.maximum(nw, 1)
    srr = np.bincount(nl, nr**2, n_lab)[:n_lab] / np.maximum(nw, 1) - cy**2
    scc = np.bincount(nl, nc**2, n_lab)[:n_lab] / np.maximum(nw, 1) - cx**2
    src = np.bincount(nl, nr * nc, n_lab)[:n_lab] / np.maximum(nw, 1) - cy * cx
    tr, det = srr + scc, srr * scc - src**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
    elong = np.sqrt(np.maximum(tr / 2 + disc, 1e-6) / np.maximum(tr / 2 - disc, 1e-6))
    h_mean = np.bincount(nl, hematoxylin_od[inside], n_lab)[:n_lab] / np.maximum(nw, 1)

    # border band of each cell
    padded = np.pad(cells, 1, mode="constant")
    center = padded[1:-1, 1:-1]
    border = (
        (center != padded[:-2, 1:-1]) | (center != padded[2:, 1:-1])
        | (center != padded[1:-1, :-2]) | (center != padded[1:-1, 2:])
    ) & (cells > 0)
    dist = cv2.distanceTransform((~border).astype(np.uint8), cv2.DIST_L2, 3)
    band = (cells > 0) & (dist <= band_um / mpp)
    lab = cells[band]
    br, bc = rows[band], cols[band]
    dy, dx = br - cy[lab], bc - cx[lab]
    sector = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * N_SECTORS).astype(np.int64) % N_SECTORS
    key = lab.astype(np.int64) * N_SECTORS + sector
    size = n_lab * N_SECTORS
    has_band = (np.bincount(key, minlength=size) > 0).reshape(n_lab, N_SECTORS)
    mem = membrane[band]
    stained = (np.bincount(key, mem.astype(np.float64), size) > 0).reshape(n_lab, N_SECTORS)
    peak = np.zeros(size, np.float32)
    np.maximum.at(peak, key[mem], dab_od[band][mem])
    peak = peak.reshape(n_lab, N_SECTORS)
    sector_max = np.zeros(size, np.float32)
    np.maximum.at(sector_max, key, dab_od[band])
    sector_max = sector_max.reshape(n_lab, N_SECTORS)
    radius = np.zeros(size, np.float32)
    np.maximum.at(radius, key, (np.hypot(dy, dx) + 0.5).astype(np.float32))
    radius = radius.reshape(n_lab, N_SECTORS)
    border_px = np.bincount(key[border[band]], minlength=size).reshape(n_lab, N_SECTORS)
    mem_px = np.bincount(key[mem], minlength=size).reshape(n_lab, N_SECTORS)

    hb, st = has_band[labels], stained[labels]
    n_band = np.maximum(hb.sum(1), 1)
    n_st = st.sum(1)
    completeness = n_st / n_band
    longest = _longest_circular_run(st) / n_band
    gap = _longest_circular_run(hb & ~st) / n_band
    membrane_od = np.where(n_st > 0, (peak[labels] * st).sum(1) / np.maximum(n_st, 1), 0.0)
    # 90th percentile (lower) of the sector peaks over the sectors a cell has
    ranked = np.sort(np.where(hb, sector_max[labels], -np.inf), axis=1)[:, ::-1]
    p90 = ranked[np.arange(len(labels)), ((n_band - 1) * 0.1).astype(int)]
    arc_px = (border_px[labels] * st).sum(1)
    width = np.where(arc_px > 0, (mem_px[labels] * st).sum(1) / np.maximum(arc_px, 1) * mpp, 0.0)
    cell_area = np.bincount(cells.ravel(), minlength=n_lab)[labels] * mpp * mpp
    f32 = np.float32
    return CellMeasurements(
        label=labels.astype(np.int32),
        x=cx[labels].astype(f32),
        y=cy[labels].astype(f32),
        cell_area_um2=cell_area.astype(f32),
        nucleus_area_um2=(nw[labels] * mpp * mpp).astype(f32),
        nucleus_elongation=elong[labels].astype(f32),
        hematoxylin_od=h_mean[labels].astype(f32),
        completeness=completeness.astype(f32),
        longest_arc=longest.astype(f32),
        longest_gap=gap.astype(f32),
        membrane_od=membrane_od.astype(f32),
        membrane_od_p90=p90.astype(f32),
        width_um=width.astype(f32),
        radii_px=radius[labels],
    )
