"""Membrane signal from DAB optical density, per-cell membrane measurements and their per-slide summary.

A membrane is a thin line of DAB that rises above the cell's own cytoplasm. Its contrast is the
white top-hat of the smoothed DAB OD with a 2 µm disk: a uniform tint, cytoplasmic blush, a brown
nucleus (Ki67, ER) or background fill the disk and vanish; a ~1-2 µm membrane does not. Tiles
measure, per cell and per angular sector, the peak contrast and the peak DAB OD; the slide then
decides which sectors are stained against its own noise floor (measure, then classify).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .cells import _smoothed, disk, local_background, nuclear_rise

__all__ = [
    "N_SECTORS", "CONTRAST_BINS", "membrane_contrast", "CellMeasurements", "measure_cells",
    "MembraneSummary", "summarise_membranes", "stained_by_neighbours", "noise_floor", "longest_circular_run", "sector_of",
    "pack_bits",
]

N_SECTORS = 24
"""Angular sectors around each cell centre in which membrane staining is looked for."""

CONTRAST_BINS = np.linspace(0.0, 0.5, 201, dtype=np.float64)
"""Histogram bin edges (log10 OD) of membrane contrast inside cells, the slide's noise-floor evidence."""


def membrane_contrast(dab_od: np.ndarray, nuclei: np.ndarray | None = None, *, mpp: float, sigma_um: float = 0.6,
                      radius_um: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed DAB OD and its membrane contrast (both log10 OD).

    Gaussian smoothing at ``sigma_um`` averages sensor and JPEG noise along the ~1 µm membrane;
    the contrast is the smoothed OD above its local level (grey opening with a ``radius_um``
    disk): high on thin lines, ~0 on tint, cytoplasmic blush and brown nuclei. Nuclei (a label
    or bool image), and the rim around them that the smoothing darkens, are first raised to the
    DAB of the cytoplasm around them (3 µm Gaussian, computed at FILL_MPP), so that the thin rim of a
    stained cytoplasm between unstained nuclei does not stand out as a membrane.
    """
    smooth = cv2.GaussianBlur(dab_od, (0, 0), sigma_um / mpp)
    level_of = smooth
    nuclear = None if nuclei is None else nuclei > 0
    if nuclear is not None and nuclear.any():
        fill = _cytoplasm_fill(smooth, ~nuclear, mpp=mpp, sigma_um=3.0)
        near = cv2.dilate(nuclear.view(np.uint8), disk(2 * sigma_um / mpp)) > 0  # smoothing darkens ~2 sigma around a nucleus
        level_of = np.maximum(fill, smooth, out=smooth.copy(), where=near)  # smooth off ``near``
    level = local_background(level_of, mpp=mpp, radius_um=radius_um, coarse_mpp=mpp)  # a new array: overwritten
    contrast = np.subtract(smooth, level, out=level)
    return smooth, np.maximum(contrast, 0.0, out=contrast)


FILL_MPP = 1.0
"""µm/px at which membrane_contrast averages the cytoplasm around nuclei: a 3 µm Gaussian computed
there and brought back differs from one at 0.5 µm/px by under 0.004 log10 OD at 99.9% of a tile's
pixels, in half the time."""


def _cytoplasm_fill(smooth: np.ndarray, off: np.ndarray, *, mpp: float, sigma_um: float) -> np.ndarray:
    """Mean of ``smooth`` over the pixels of ``off`` (bool) in a Gaussian window of ``sigma_um``,
    computed at FILL_MPP µm/px (at ``mpp`` where that is coarser) and brought back to ``mpp``."""
    f = min(1.0, mpp / FILL_MPP)
    weight = off.astype(np.float32)
    values = smooth * weight
    s = sigma_um / mpp
    if f < 1.0:  # the area average blurs by a box of 1/f px already (variance (1/f)^2 / 12 px^2)
        size = (max(1, round(smooth.shape[1] * f)), max(1, round(smooth.shape[0] * f)))
        values, weight = (cv2.resize(a, size, interpolation=cv2.INTER_AREA) for a in (values, weight))
        s = float(np.sqrt(max(s**2 - (1 / f) ** 2 / 12, 0.25))) * f
    fill = cv2.GaussianBlur(values, (0, 0), s) / np.maximum(cv2.GaussianBlur(weight, (0, 0), s), 1e-3)
    return cv2.resize(fill, smooth.shape[::-1], interpolation=cv2.INTER_LINEAR) if f < 1.0 else fill


@dataclass(frozen=True)
class CellMeasurements:
    """Per-cell measurements (arrays of equal length); positions in pixels (x = column): of the image measured
    as measure_cells returns them, of the slide's level 0 once pipeline.score_tile has placed them.

    x, y: cell centroid; nucleus_* are 0 for a cell found by its membrane ring alone (no nucleus
    seen); nucleus_area_um2 / nucleus_elongation / nucleus_width_um (minor axis): the shape of the
    nucleus's core (measure_cells), not of its mask; hematoxylin_od / nucleus_dab_od: mean OD over the
    nucleus (its mask); cytoplasm_dab_od: median smoothed DAB OD inside the cell away from its border and
    nucleus; sector_contrast / sector_od (n, N_SECTORS) float16: per sector of the cell's border
    band, the peak membrane contrast and the peak smoothed DAB OD of the line (log10; NaN where the
    cell has no border in that sector); width_um: stained membrane width (µm, over sectors above
    0.05 OD of contrast); sector_neighbour (n, N_SECTORS) int32: per sector, the label (in the label
    image measured) of the cell across the border, the one most of the sector's border touches (0:
    none, glass or stroma); cut_sectors int8: the sectors without a border band where the image's
    edge cuts the cell (measure_cells' ``outside``): unknown, as where a nucleus touches the border,
    but still part of the cell's border (summarise_membranes).
    """

    label: np.ndarray
    x: np.ndarray
    y: np.ndarray
    cell_area_um2: np.ndarray
    nucleus_area_um2: np.ndarray
    nucleus_elongation: np.ndarray
    nucleus_width_um: np.ndarray
    hematoxylin_od: np.ndarray
    nucleus_dab_od: np.ndarray
    cytoplasm_dab_od: np.ndarray
    width_um: np.ndarray
    sector_contrast: np.ndarray
    sector_od: np.ndarray
    sector_neighbour: np.ndarray
    cut_sectors: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def select(self, keep: np.ndarray) -> "CellMeasurements":
        return CellMeasurements(**{k: v[keep] for k, v in self.__dict__.items()})

    @classmethod
    def concat(cls, parts: list["CellMeasurements"]) -> "CellMeasurements":
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in cls.__dataclass_fields__})


def longest_circular_run(flags: np.ndarray) -> np.ndarray:
    """Longest run of True per row of a (n, k) bool array, wrapping around the ends."""
    n, k = flags.shape
    doubled = np.concatenate([flags, flags], axis=1)
    run = np.zeros(n, np.int32)
    best = np.zeros(n, np.int32)
    for j in range(2 * k):
        run = np.where(doubled[:, j], run + 1, 0)
        best = np.maximum(best, run)
    return np.minimum(best, k)


QUANTILE_BUCKETS = 64
"""Steps between a label's smallest and largest value in which _per_cell_quantile looks for its quantile."""


def _per_cell_quantile(labels: np.ndarray, values: np.ndarray, n_lab: int, q: float) -> np.ndarray:
    """The ``q`` quantile (lower) of float32 ``values`` per label (NaN for a label without values).

    Each label's values are first cut into QUANTILE_BUCKETS equal steps between its minimum and maximum
    (where every label's values and spread are finite; else all are sorted): only the bucket holding the
    quantile is sorted, a few % of the values. The values' bits are made to sort as the floats do (sign bit
    flipped for positives, all bits for negatives) and sorted with their label above them, as one 64-bit key
    (numpy's vectorised sort: 2-3x faster than an LSD radix sort over 16-bit digits, which sorts indices, not
    the keys).
    """
    values = np.ascontiguousarray(values, np.float32)
    labels = np.asarray(labels).astype(np.intp, copy=False)  # a narrow type would wrap in the bucket keys
    count = np.bincount(labels, minlength=n_lab)
    has = count > 0
    rank = np.zeros(n_lab, np.int64)
    rank[has] = (q * (count[has] - 1)).astype(np.int64)  # in the label's values, ascending
    lo, hi = np.full(n_lab, np.inf, np.float32), np.full(n_lab, -np.inf, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # a NaN value makes its label's bounds NaN
        np.minimum.at(lo, labels, values)
        np.maximum.at(hi, labels, values)
        bounded = np.isfinite(hi[has] - lo[has]).all()  # no NaN or infinite value, no spread past float32's range
    if bounded:  # a bucket's values are in order of their bits
        span = hi - lo
        scale = np.where((span > 1e-30) & (span < 1e30), np.float32(QUANTILE_BUCKETS) / np.clip(span, 1e-30, 1e30), np.float32(0))
        bucket = np.minimum(((values - lo[labels]) * scale[labels]).astype(np.int32), QUANTILE_BUCKETS)
        per = np.bincount(labels * (QUANTILE_BUCKETS + 1) + bucket, minlength=n_lab * (QUANTILE_BUCKETS + 1))
        cum = np.cumsum(per.reshape(n_lab, QUANTILE_BUCKETS + 1), axis=1)
        target = (cum <= rank[:, None]).sum(1)  # the bucket holding each label's quantile
        rank -= np.where(target > 0, cum[np.arange(n_lab), np.maximum(target - 1, 0)], 0)
        count = np.where(has, per.reshape(n_lab, -1)[np.arange(n_lab), np.minimum(target, QUANTILE_BUCKETS)], 0)
        sel = np.flatnonzero(bucket == target[labels])
        labels, values = labels[sel], values[sel]
    bits = values.view(np.uint32)
    bits = bits ^ np.where(bits >> 31 != 0, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    keys = np.sort((labels.astype(np.uint64) << np.uint64(32)) | bits)  # grouped by label, ascending within each
    low = keys[(np.cumsum(count) - count)[has] + rank[has]].astype(np.uint32)
    out = np.full(n_lab, np.nan)
    out[has] = (low ^ np.where(low >> 31 != 0, np.uint32(0x80000000), np.uint32(0xFFFFFFFF))).view(np.float32)
    return out


def _mean_by_label(labels: np.ndarray, where: np.ndarray, values: np.ndarray, n_lab: int) -> np.ndarray:
    """Mean of ``values`` per label over the pixels of ``where`` (labels outside it: 0)."""
    idx = np.flatnonzero(where)
    lab = labels.ravel()[idx]
    return np.bincount(lab, values.ravel()[idx], n_lab) / np.maximum(np.bincount(lab, minlength=n_lab), 1)


def _chamfer_ball(radius_px: float) -> np.ndarray:
    """Structuring element (uint8) of the offsets within ``radius_px`` by distanceTransform's 3x3 L2
    chamfer metric, measured by distanceTransform itself: dilating a mask with it marks where the
    distance to the mask is at most ``radius_px``."""
    k = int(radius_px / 0.95) + 1  # a chamfer step is at least 0.955 px
    point = np.ones((2 * k + 1, 2 * k + 1), np.uint8)
    point[k, k] = 0
    return (cv2.distanceTransform(point, cv2.DIST_L2, 3) <= radius_px).astype(np.uint8)


@lru_cache(maxsize=4)
def _pixel_grid(shape: tuple[int, int], origin: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column (float32, read-only) of each pixel of an image of ``shape`` whose first pixel is
    at ``origin`` (row, column), raveled: a pixel's position by its flat index is a gather, 9x faster
    than dividing by the width."""
    (h, w), (r0, c0) = shape, origin
    rows = np.repeat(np.arange(r0, r0 + h, dtype=np.float32), w)
    cols = np.tile(np.arange(c0, c0 + w, dtype=np.float32), h)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def _rows_cols(flat_idx: np.ndarray, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Row and column (float32) of the pixels at ``flat_idx`` of an image of ``shape`` whose first pixel is at ``origin``."""
    rows, cols = _pixel_grid(shape, origin)
    return rows[flat_idx], cols[flat_idx]


def _label_sums(cells: np.ndarray, n_lab: int, origin: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label (n_lab, float64; 0 for label 0): its pixel count and the sums of its pixels' rows and columns
    (in an image whose first pixel is at ``origin``), taken over the runs of each label along the image's rows
    (a tile's run ~20 px: 5x faster than over its pixels). The sums are of integers: exact in float64, whatever
    their order."""
    flat = cells.ravel()
    starts = np.empty(flat.size, bool)
    np.not_equal(flat[1:], flat[:-1], out=starts[1:])
    starts[:: cells.shape[1]] = True  # each row starts a run
    start = np.flatnonzero(starts)
    length = np.diff(start, append=flat.size).astype(np.float64)
    lab = flat[start].astype(np.intp)
    cell = lab > 0
    start, length, lab = start[cell], length[cell], lab[cell]
    row, col = _rows_cols(start, cells.shape, origin)  # of each run's first pixel
    return (np.bincount(lab, length, n_lab), np.bincount(lab, length * row, n_lab),
            np.bincount(lab, length * (col + (length - 1) / 2), n_lab))  # columns col to col + length - 1


def sector_of(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Angular sector (0 to N_SECTORS - 1, from the left and clockwise on the image) of pixels (dy, dx) px from a centroid."""
    angle = np.arctan2(dy, dx)
    scalar = angle.ndim == 0
    angle = np.atleast_1d(angle)
    angle += np.pi  # in place: the same steps, no temporaries
    angle /= 2 * np.pi
    angle *= N_SECTORS
    sector = angle.astype(np.int64)
    wrap = sector.view(np.uint64) >= N_SECTORS  # an angle of pi (N_SECTORS) or NaN: the modulo (an int64 division,
    if wrap.any():  # slower than the arctan2) taken of them alone
        sector[wrap] %= N_SECTORS
    return sector[0] if scalar else sector


def _sector_max(key: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    out = np.full(size, -np.inf, np.float32)
    np.maximum.at(out, key, values)
    return out


NUCLEUS_CORE_FRACTION = 0.5
"""A nucleus's core: its pixels whose nuclear OD stands at least this share of its peak (the 90th
percentile of its pixels) above the local level (_nucleus_core_shape): its full width at half maximum."""


def _nucleus_core_shape(nl: np.ndarray, nr: np.ndarray, nc: np.ndarray, rise: np.ndarray, *, n_lab: int, mpp: float
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label (n_lab): the area (µm²), elongation (major / minor axis) and width (minor axis, µm) of
    each cell's nuclear core, from the moments of its pixels (0 where a label has none).

    ``nl``, ``nr``, ``nc``, ``rise``: label, row, column and nuclear OD above its level (cells.nuclear_rise)
    of each nuclear pixel in a cell. The nuclear mask is thresholded at an absolute OD (segment_nuclei), far
    out in the blurred tail of a dark nucleus: a lymphocyte drawn 20-28 µm² measured 37-50 µm² on it, a
    fibroblast drawn 2.2-3.2 µm wide 5 µm and a third as elongated, real Ki67 tumour nuclei 1.38x their
    annotated area (median, DeepLIIF). The core is where the nucleus's own OD stands at least
    NUCLEUS_CORE_FRACTION of its peak above the local level: the full width at half maximum, which lies on
    the edge of a blurred nucleus whatever its darkness. Its peak is the 90th percentile of its pixels, not
    their maximum, which a chromatin clump or noise sets higher (the maximum left generator nuclei, textured,
    at 0.6x their drawn area). Measured: DeepLIIF nuclei 1.05x their annotated area (median), generator
    tumour nuclei 0.91x their drawn area.
    """
    peak = _per_cell_quantile(nl, rise, n_lab, 0.9)
    # a nucleus standing nowhere above its level (peak <= 0) keeps its whole mask; any other keeps at least its pixels at its peak
    core = np.flatnonzero(rise >= np.where(peak > 0, NUCLEUS_CORE_FRACTION * peak, -np.inf)[nl])
    cl, r, c = nl[core], nr[core].astype(np.float64), nc[core].astype(np.float64)
    n = np.bincount(cl, minlength=n_lab).astype(np.float64)
    w = np.maximum(n, 1)
    my, mx = np.bincount(cl, r, n_lab) / w, np.bincount(cl, c, n_lab) / w
    srr = np.bincount(cl, r**2, n_lab) / w - my**2
    scc = np.bincount(cl, c**2, n_lab) / w - mx**2
    src = np.bincount(cl, r * c, n_lab) / w - my * mx
    tr, det = srr + scc, srr * scc - src**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
    minor_var = np.maximum(tr / 2 - disc, 1e-6)
    elong = np.where(n > 0, np.sqrt(np.maximum(tr / 2 + disc, 1e-6) / minor_var), 0.0)
    return n * mpp * mpp, elong, np.where(n > 0, 4 * np.sqrt(minor_var) * mpp, 0.0)


def measure_cells(
    cells: np.ndarray,
    nuclei: np.ndarray,
    hematoxylin_od: np.ndarray,
    dab_od: np.ndarray,
    contrast: np.ndarray,
    *,
    mpp: float,
    band_um: float = 1.0,
    width_od: float = 0.05,
    unstained_od: float = 0.08,
    brown_nucleus_od: float = 0.10,
    halo_um: float = 1.5,
    line_reach_um: float = 0.5,
    outside: np.ndarray | None = None,
    core: tuple[int, int, int, int] | None = None,
    origin: tuple[int, int] = (0, 0),
    rise: np.ndarray | None = None,
) -> tuple[CellMeasurements, np.ndarray, np.ndarray]:
    """Measure the cells of a label image; also the histogram (CONTRAST_BINS) of membrane contrast in
    their interiors, and the anchor (x, y) px of every label, the cells named in sector_neighbour
    included (rows by label): its nucleus's centroid, or the cell's for a cell without a nucleus (NaN
    for a label with no pixel). ``core`` (x, y, width, height) px: measure only the cells anchored
    there (a tile's core), as if the others were not there but for the borders they share.

    ``dab_od`` is the smoothed DAB OD and ``contrast`` its membrane contrast (membrane_contrast).
    A cell's membrane is looked for in the band of its pixels within ``band_um`` of its border,
    nuclear pixels excluded, and so is the ``halo_um`` halo around a brown nucleus, whose mean DAB
    reaches ``brown_nucleus_od`` and exceeds that of its halo (a brown nucleus is never membrane);
    each of N_SECTORS angular sectors around the cell centroid keeps its peak contrast and the peak
    OD of the line within ``line_reach_um`` (either side of the border, off nuclei and brown halos:
    a membrane line shared by two cells peaks on one side of the border between them, and both read
    its intensity). The interior histogram (cell pixels off the band and off nuclei, in cytoplasm
    whose DAB level is under ``unstained_od``) is what an unstained membrane would read by noise
    alone: the noise floor. No membrane is read within ``band_um`` of ``outside`` (bool: beyond the
    image, Tile.beyond_slide): the sectors where the image's edge cuts a cell are unknown, not unstained.
    ``origin`` (row, column) px: where the label image's first pixel lies in the image whose px the
    positions (and ``core``) are given in, for a label image cut from a larger one.

    A nucleus's area, elongation and width (minor axis) are those of its core (_nucleus_core_shape:
    its pixels at half its peak or more), where the nuclear mask reaches out into the blurred tail;
    ``rise`` is the nuclear OD above its level that ``nuclei`` were cut from (segment_nuclei's
    ``return_rise``; None: cells.nuclear_rise of the smoothed ``hematoxylin_od``, brown nuclei's DAB left out).
    """
    n_lab = int(cells.max()) + 1
    f32 = np.float32
    cell_px = cells > 0
    area, row_sum, col_sum = _label_sums(cells, n_lab, origin)
    cy = row_sum / np.maximum(area, 1)
    cx = col_sum / np.maximum(area, 1)

    # the nucleus of each cell: nuclear pixels inside it (its anchor, mean OD; its shape is its core's, below)
    nuclear = nuclei > 0
    nuc_idx = np.flatnonzero(nuclear & cell_px)  # indices: faster than a boolean mask for several gathers
    nl = cells.ravel().take(nuc_idx).astype(np.intp)
    nr, nc = _rows_cols(nuc_idx, cells.shape, origin)
    nw = np.bincount(nl, minlength=n_lab).astype(np.float64)
    w = np.maximum(nw, 1)
    ny, nx = np.bincount(nl, nr, n_lab) / w, np.bincount(nl, nc, n_lab) / w
    h_mean = np.bincount(nl, hematoxylin_od.ravel()[nuc_idx], n_lab) / w
    nuc_dab = np.bincount(nl, dab_od.ravel()[nuc_idx], n_lab) / w

    # where each cell is: its nucleus's centroid (the cell's for one without a nucleus), which neighbouring
    # tiles read alike, as they may not read where a cell's border runs across flat cytoplasm
    anchors = np.column_stack([np.where(nw > 0, nx, cx), np.where(nw > 0, ny, cy)])
    anchors[area == 0] = np.nan
    measured = area > 0
    on = cell_px
    if core is not None:  # the cells anchored in the core; the others' pixels are left out
        x0, y0, w_core, h_core = core
        fx, fy = anchors[:, 0].astype(f32), anchors[:, 1].astype(f32)
        measured &= (fx >= x0) & (fx < x0 + w_core) & (fy >= y0) & (fy < y0 + h_core)
        on = measured.take(cells)  # np.take: half the time of fancy indexing
    labels = np.flatnonzero(measured)
    if len(labels) == 0:
        empty = np.zeros(0, f32)
        sectors = np.zeros((0, N_SECTORS), np.float16)
        return (CellMeasurements(np.zeros(0, np.int32), *([empty] * 10), sectors, sectors, np.zeros((0, N_SECTORS), np.int32),
                                 np.zeros(0, np.int8)), np.zeros(len(CONTRAST_BINS) - 1, np.int64), anchors)

    # border band of each cell (nuclear pixels excluded) and the interior
    padded = np.pad(cells, 1, mode="constant")
    center = padded[1:-1, 1:-1]
    sides = (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])
    border = ((center != sides[0]) | (center != sides[1]) | (center != sides[2]) | (center != sides[3])) & cell_px
    near = cv2.dilate(border.view(np.uint8), _chamfer_ball(band_um / mpp)) > 0
    border &= on
    # a DAB-stained nucleus (Ki67, ER, PR) and the blurred halo around it are never membrane
    halo = disk(halo_um / mpp)
    n_nuc = int(nuclei.max()) + 1
    nuc_mean = _mean_by_label(nuclei, nuclear, dab_od, n_nuc)
    brown = nuc_mean >= brown_nucleus_od
    brown[0] = False
    off_limits = nuclear
    if brown.any():  # and darker than its own halo
        wide = n_nuc > 1 << 16  # labels dilated as uint16 where they fit: 4x faster than as float32
        ring = cv2.dilate(nuclei.astype(np.float32 if wide else np.uint16), halo).astype(np.int32 if wide else np.uint16, copy=False)
        ring *= ~nuclear  # each nucleus's halo, by its label
        brown &= nuc_mean > _mean_by_label(ring, ring > 0, dab_od, n_nuc)
        off_limits = nuclear | (cv2.dilate(brown.take(nuclei).view(np.uint8), halo) > 0)
    if rise is None:
        rise = nuclear_rise(_smoothed(hematoxylin_od, mpp), mpp=mpp)
    nuc_area, elong, width_nuc = _nucleus_core_shape(nl, nr, nc, rise.ravel()[nuc_idx], n_lab=n_lab, mpp=mpp)
    cut_px = None
    if outside is not None and outside.any():  # the image's edge is no membrane
        edge = outside.view(np.uint8)
        # the band of a border pixel next to the image's edge reaches band_um past it
        off_limits = off_limits | (cv2.dilate(edge, _chamfer_ball(band_um / mpp + 1)) > 0)
        cut_px = np.flatnonzero(border & (cv2.dilate(edge, np.ones((3, 3), np.uint8)) > 0))
    usable = on > off_limits  # bool: on & ~off_limits
    band = usable & near
    inner = np.flatnonzero(usable > near)  # the interior
    inner_od, inner_c = dab_od.ravel()[inner], contrast.ravel()[inner]
    quiet = inner_c[inner_od - inner_c < unstained_od]  # off membranes, in unstained cytoplasm
    clipped = np.clip(quiet, 0, CONTRAST_BINS[-1] - 1e-6)  # float64 (the bound's type), as np.histogram reads it
    hist = np.histogram(clipped, bins=len(CONTRAST_BINS) - 1, range=(CONTRAST_BINS[0], CONTRAST_BINS[-1]))[0]
    cyto = _per_cell_quantile(cells.ravel()[inner], inner_od, n_lab, 0.5)

    band_idx = np.flatnonzero(band)
    lab = cells.ravel()[band_idx]
    br, bc = _rows_cols(band_idx, cells.shape, origin)
    dy, dx = br - cy.take(lab), bc - cx.take(lab)
    sector = sector_of(dy, dx)
    key = lab.astype(np.int64) * N_SECTORS + sector
    size = n_lab * N_SECTORS
    c_band = contrast.ravel()[band_idx]
    sec_c = _sector_max(key, c_band, size).reshape(n_lab, N_SECTORS)[labels]
    line_od = cv2.dilate(np.where(off_limits, 0, dab_od), disk(line_reach_um / mpp))  # the line's peak, on either side of the border
    sec_o = _sector_max(key, line_od.ravel()[band_idx], size).reshape(n_lab, N_SECTORS)[labels]
    sec_c[~np.isfinite(sec_c)] = np.nan
    sec_o[~np.isfinite(sec_o)] = np.nan
    on_border = border.ravel()[band_idx]
    border_px = np.bincount(key[on_border], minlength=size).reshape(n_lab, N_SECTORS)[labels]
    strong_px = np.bincount(key[c_band >= width_od], minlength=size).reshape(n_lab, N_SECTORS)[labels]
    lit = np.nan_to_num(sec_c) >= width_od
    cut = np.zeros(len(labels), np.int8)
    if cut_px is not None and len(cut_px):  # sectors whose border lies on the image's edge and holds no band
        cr_, cc_ = _rows_cols(cut_px, cells.shape, origin)
        cl_ = cells.ravel()[cut_px]
        on_edge = np.zeros(size, bool)
        on_edge[cl_.astype(np.int64) * N_SECTORS + sector_of(cr_ - cy[cl_], cc_ - cx[cl_])] = True
        cut = (on_edge.reshape(n_lab, N_SECTORS)[labels] & ~np.isfinite(sec_c)).sum(1).astype(np.int8)
    arc_px = (border_px * lit).sum(1)
    width = np.where(arc_px > 0, (strong_px * lit).sum(1) / np.maximum(arc_px, 1) * mpp, 0.0)

    neighbour = _sector_neighbours(border, padded, cy, cx, labels, origin)

    m = CellMeasurements(
        label=labels.astype(np.int32),
        x=cx[labels].astype(f32),
        y=cy[labels].astype(f32),
        cell_area_um2=(area[labels] * mpp * mpp).astype(f32),
        nucleus_area_um2=nuc_area[labels].astype(f32),
        nucleus_elongation=elong[labels].astype(f32),
        nucleus_width_um=width_nuc[labels].astype(f32),
        hematoxylin_od=h_mean[labels].astype(f32),
        nucleus_dab_od=nuc_dab[labels].astype(f32),
        cytoplasm_dab_od=cyto[labels].astype(f32),
        width_um=width.astype(f32),
        sector_contrast=sec_c.astype(np.float16),
        sector_od=sec_o.astype(np.float16),
        sector_neighbour=neighbour,
        cut_sectors=cut,
    )
    return m, hist, anchors


def _sector_neighbours(border: np.ndarray, padded: np.ndarray, cy: np.ndarray, cx: np.ndarray,
                       labels: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    """(len(labels), N_SECTORS) int32: per sector, the cell across the border (measure_cells' sector_neighbour).

    ``padded``: the label image with a 1 px frame of 0; ``origin``: its first pixel's (row, column) where
    ``cy`` and ``cx`` are given. A border pixel faces the first of its four
    neighbours (up, down, left, right) that is another cell; each sector names the cell most of its
    border pixels face.
    """
    width = border.shape[1]
    idx = np.flatnonzero(border)
    r, c = _rows_cols(idx, border.shape)
    at = idx + 2 * r.astype(np.intp) + width + 3  # the pixels in the padded image: (r + 1) * (width + 2) + c + 1
    flat = padded.ravel()
    lab = flat[at]
    other = np.zeros(len(at), padded.dtype)
    for step in (-(width + 2), width + 2, -1, 1):
        v = flat[at + step]
        other = np.where((other == 0) & (v != lab) & (v > 0), v, other)
    facing = other > 0
    r, c, lab, other = r[facing] + np.float32(origin[0]), c[facing] + np.float32(origin[1]), lab[facing], other[facing]
    sector = sector_of(r - cy.take(lab), c - cx.take(lab))
    n_lab = len(cy)
    key_type = np.int32 if n_lab * N_SECTORS * n_lab < 2**31 else np.int64  # a narrower sort where it fits
    keys = np.sort((lab.astype(key_type) * N_SECTORS + sector.astype(key_type)) * n_lab + other)
    first = np.flatnonzero(np.diff(keys, prepend=-1))  # each (cell, sector, neighbour) once, with its pixel count
    counts = np.diff(first, append=len(keys))
    keys = keys[first]
    cell_sector = keys // n_lab
    group = np.flatnonzero(np.diff(cell_sector, prepend=-1))
    # per (cell, sector) the most touched neighbour, of equals the highest label
    best = np.maximum.reduceat(counts.astype(np.int64) * n_lab + keys % n_lab, group)
    out = np.zeros(n_lab * N_SECTORS, np.int32)
    out[cell_sector[group]] = best % n_lab
    return out.reshape(n_lab, N_SECTORS)[labels]


def noise_floor(hist: np.ndarray, *, quantile: float = 0.99, minimum_od: float = 0.02) -> float:
    """The slide's membrane-contrast noise floor (log10 OD) from the summed interior histogram.

    The ``quantile`` of membrane contrast inside cells, away from any membrane: the level an
    unstained membrane reaches by noise, texture and JPEG alone; never below ``minimum_od``.
    """
    total = hist.sum()
    if total == 0:
        return float(minimum_od)
    k = int(np.searchsorted(np.cumsum(hist), quantile * total))
    return float(max(minimum_od, CONTRAST_BINS[min(k + 1, len(CONTRAST_BINS) - 1)]))


@dataclass(frozen=True)
class MembraneSummary:
    """Per-cell membrane staining once the slide's threshold is known (arrays of equal length).

    completeness: fraction of border sectors stained; longest_arc / longest_gap: longest
    contiguous stained / unstained run (fractions of the whole border, across the sectors where a
    nucleus touches it; a U-shaped basolateral pattern has one long gap); membrane_od: mean peak DAB OD
    (log10) along the body of the stained arcs, i.e. over stained sectors stained on both sides (an arc's
    ends, where the line tapers off, are left out; all stained sectors when no arc has a body);
    contrast_od: mean over stained sectors of the peak contrast above the cytoplasm (log10);
    stained (n, N_SECTORS) bool: the stained sectors, in runs (see summarise_membranes); arcs (n, N_SECTORS) bool:
    the stained runs with the sectors a nucleus or the image's edge hides between stained ones (the membrane goes on
    under them: the overlay draws them solid, as the arcs and the pattern are read).
    """

    completeness: np.ndarray
    longest_arc: np.ndarray
    longest_gap: np.ndarray
    membrane_od: np.ndarray
    contrast_od: np.ndarray
    stained: np.ndarray
    arcs: np.ndarray


def _in_runs(flags: np.ndarray, min_run: int) -> np.ndarray:
    """Keep the True entries of each row of a (n, k) bool array that lie in circular runs of at least ``min_run``."""
    if flags.all(axis=1).all() or min_run <= 1:
        return flags
    window = flags.copy()  # window[:, s]: the min_run sectors from s on are all stained
    for j in range(1, min_run):
        window &= np.roll(flags, -j, axis=1)
    keep = window.copy()
    for j in range(1, min_run):  # a full window marks its sectors kept
        keep |= np.roll(window, j, axis=1)
    return keep


def pack_bits(flags: np.ndarray) -> np.ndarray:
    """Rows of (n, k <= 32) bool as uint32 bit masks (bit j = column j)."""
    b = np.packbits(flags, axis=1, bitorder="little")
    return np.pad(b, ((0, 0), (0, 4 - b.shape[1]))).view("<u4").ravel()


def _unpack(bits: np.ndarray, k: int) -> np.ndarray:
    return np.unpackbits(bits.astype("<u4").view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :k].astype(bool)


def _bridging(known: np.ndarray):
    """A function that sets, in (n, k) flags, each unknown sector (no border band: a nucleus touches
    the border there) whose nearest known sectors on both sides are set: a membrane runs on behind
    the nucleus. Rows are handled as bit masks."""
    k = known.shape[1]
    full = np.uint32((1 << k) - 1)
    have0 = pack_bits(known)

    def rot(x: np.ndarray, step: int) -> np.ndarray:  # entry j takes entry j - step (circular)
        return ((x << np.uint32(1)) | (x >> np.uint32(k - 1))) & full if step > 0 else ((x >> np.uint32(1)) | (x << np.uint32(k - 1))) & full

    def fill(values: np.ndarray, step: int) -> np.ndarray:
        out, have = values & have0, have0.copy()
        for _ in range(k):
            new = ~have & rot(have, step) & full
            if not new.any():
                break
            out |= new & rot(out, step)
            have |= new
        return out

    def bridge(flags: np.ndarray) -> np.ndarray:
        f = pack_bits(flags)
        return _unpack(f | (~have0 & fill(f, 1) & fill(f, -1)), k)
    return bridge


def summarise_membranes(m: CellMeasurements, *, threshold_od: float, cytoplasm_base_od: float = 0.0,
                        cytoplasm_ratio: float = 0.35, min_run: int = 3) -> MembraneSummary:
    """Which sectors of each cell are stained, and what that makes of the cell.

    A sector is stained where its membrane contrast reaches ``threshold_od`` (the slide's floor,
    log10 OD) and its peak DAB OD exceeds the cell's own cytoplasm by ``cytoplasm_ratio`` x that
    cytoplasm's DAB above ``cytoplasm_base_od`` (the slide's unstained level): in a cell with
    cytoplasmic blush only a membrane clearly darker than the blush counts. Stained sectors count
    only in runs of at least ``min_run`` (a membrane is a line along the border; noise and the halo
    of a brown nucleus are specks). A sector without a border band (the nucleus touches the border,
    or the image's edge cuts the cell) is unknown: runs and arcs go on across it where the sectors
    either side are stained, gaps where both are unstained; completeness is the share of the border
    stained, a nucleus's sectors left out of it and the image edge's kept in (what the field hides is
    not taken as stained). Cells are taken ``SUMMARY_BLOCK`` at a
    time: a whole slide's temporaries stay the size of one block.
    """
    blocks = [_summarise(m.sector_contrast[a : a + SUMMARY_BLOCK], m.sector_od[a : a + SUMMARY_BLOCK],
                         m.cytoplasm_dab_od[a : a + SUMMARY_BLOCK], m.cut_sectors[a : a + SUMMARY_BLOCK],
                         threshold_od, cytoplasm_base_od, cytoplasm_ratio, min_run)
              for a in range(0, max(len(m), 1), SUMMARY_BLOCK)]
    return MembraneSummary(**{k: np.concatenate([getattr(b, k) for b in blocks]) for k in MembraneSummary.__dataclass_fields__})


SUMMARY_BLOCK = 16_384
"""Cells summarised at a time (summarise_membranes)."""


def _summarise(sector_contrast: np.ndarray, sector_od: np.ndarray, cytoplasm_dab_od: np.ndarray, cut_sectors: np.ndarray,
               threshold_od: float, cytoplasm_base_od: float, cytoplasm_ratio: float, min_run: int) -> MembraneSummary:
    has = np.isfinite(sector_contrast)
    c = np.nan_to_num(sector_contrast.astype(np.float32))
    od = np.nan_to_num(sector_od.astype(np.float32))
    cyto = np.nan_to_num(cytoplasm_dab_od, nan=0.0)[:, None]
    st = has & (c >= threshold_od) & (od - cyto >= cytoplasm_ratio * np.maximum(cyto - cytoplasm_base_od, 0.0))
    bridge = _bridging(has)
    st = _in_runs(bridge(st), min_run) & has
    n_band = np.maximum(has.sum(1) + cut_sectors, 1)  # the image's edge hides part of the border, which still counts
    n_st = st.sum(1)
    bst = bridge(st)
    body = st & np.roll(bst, 1, axis=1) & np.roll(bst, -1, axis=1)  # an arc's tapering ends left out
    read = np.where((body.sum(1) > 0)[:, None], body, st)
    n_read = read.sum(1)
    f32 = np.float32
    return MembraneSummary(
        completeness=(n_st / n_band).astype(f32),
        longest_arc=(longest_circular_run(bst) / N_SECTORS).astype(f32),
        longest_gap=(longest_circular_run(bridge(has & ~st)) / N_SECTORS).astype(f32),
        membrane_od=np.where(n_st > 0, (od * read).sum(1) / np.maximum(n_read, 1), 0.0).astype(f32),
        contrast_od=np.where(n_st > 0, (c * st).sum(1) / np.maximum(n_st, 1), 0.0).astype(f32),
        stained=st,
        arcs=bst,
    )


def stained_by_neighbours(stained: np.ndarray, beside: np.ndarray, *, reach: int = 2) -> np.ndarray:
    """Cells whose stained border may all be their neighbours' membrane: bool per cell.

    ``stained`` (n, N_SECTORS): the stained sectors (MembraneSummary.stained); ``beside`` (n,
    N_SECTORS): the sectors whose border is with a cell that its own membrane encloses (complete or
    lateral). A cell qualifies when each of its stained sectors lies within ``reach`` sectors of such
    a border: the neighbour's line bends round the cell past the end of the shared border, where the
    two meet a third cell (on generator fields the unstained neighbours of weak-moderate complete cells
    read stained 1-2 sectors past it; at 1 sector, 10 of 620 such cells in a field of 8% complete cells
    read faint partial and made it 1+). A cell with no stained sector does not.
    """
    along = beside.copy()
    for k in range(1, reach + 1):
        along |= np.roll(beside, k, axis=1) | np.roll(beside, -k, axis=1)
    return stained.any(1) & ~(stained & ~along).any(1)
