"""score_slide: the one data flow from a slide to a guideline HER2 score.

open slide -> tissue mask -> tile grid at the target µm/px -> per tile: stain separation, nuclei,
cells, membrane, measurements -> slide: tumour cells, categories, counts, clusters -> guideline.
Tiles return measurements only; thresholds and guidelines apply once at the end.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial

import cv2
import numpy as np

from . import __version__
from .categories import CATEGORIES, PATTERNS, Thresholds, classify_cells
from .cells import (COARSE_MPP, COUNTERSTAIN_RATIO, FLOOD_MPP, NucleusThresholds, grow_cells, measure_nucleus_thresholds,
                    membrane_basins, segment_nuclei)
from .cnn import aggregate_tiles, fuse, use_one_thread
from .guidelines import (COARSE_SCAN_MPP, DOUBT_SIDES, FALSE_MEMBRANE_PERCENT, ISOLATED_INTENSE_PERCENT, MIN_TUMOUR_CELLS,
                         NEAR_CUTOFF_CONFIDENCE, NEAR_CUTOFF_POINTS, PANCREATIC_NOTE, STAINING_LEVEL, apply_guideline, check_settings,
                         edge_sides, false_membrane_share, isolated_note, level_flags, near_cutoff_settings, near_cutoff_sides,
                         percent_text, percent_value, report_level, wilson_ci, with_coarse_doubt, with_incomplete_doubt,
                         with_null_doubt)
from .files import content_sample
from .imagecheck import MIN_STAIN_CHROMA_DEG, PALE_CHROMA_DEG, NotHerIhcError, check_slide, fill_as_glass, stain_fractions
from .jpeg import pixel_jpeg_quality
from .membrane import (FILL_MPP, CellMeasurements, MembraneSummary, measure_cells, membrane_contrast, noise_floor, pack_bits,
                       stained_by_neighbours, summarise_membranes)
from .neighbours import groups, nearest_within, pairs_within
from .outlines import Outlines, trace_outline_points
from .region import Region, load_region
from .results import SCORES, CnnReport, QCFinding, SlideResult
from .slide import DEFAULT_MPP_SOURCE, EXIF_TURNED, ArraySlide, Slide, SlideError, open_slide
from .stain import (GLASS_MIN, GLASS_MIN_PIXELS, H_DAB, StainSet, brightest_level, deconvolve, estimate_background, estimate_stains,
                    optical_density)
from .tissue import MIN_TISSUE_UM2, Tile, TissueMask, tile_grid, tissue_mask
from .tumour import (COMPARTMENTS, LEFT_OUT, TumourRule, TumourSelection, diffuse_cytoplasm_od, select_tumour_cells,
                     stained_cytoplasm, staining_compartments, unstained_level, with_cytoplasm_doubt)
from .workers import FORKS, checked_workers, die_with_parent, result_of, worker_pool

__all__ = ["ScoringConfig", "SlideAnalysis", "WrongStainError", "NoTissueError", "NuclearStainError", "score_slide", "analyse_slide", "score_tile"]

log = logging.getLogger(__name__)

LEVEL_OF_CATEGORY = np.array([STAINING_LEVEL[c] for c in CATEGORIES], np.int8)
"""Guideline staining level (0, 1+, 2+, 3+) of each category in CATEGORIES order (guidelines.STAINING_LEVEL)."""

CALIBRATED_MPP = 0.5
"""µm/px at which the intensity bands (categories.Thresholds) were set, the default tile resolution."""

SEAM_TWIN_UM = 1.5
"""µm within which two tiles' cells on a seam are one cell read twice (two nuclei's centroids lie 4 µm or more apart)."""

NEIGHBOUR_MATCH_UM = 3.0
"""µm within which a cell in a tile's margin is the neighbouring tile's cell (their label images differ at the edge)."""

RESCUED_NUCLEAR_MAX = 0.10
"""Share of tumour cells with DAB-stained nuclei at which a slide scored again with its own stain vectors (after
a nuclear refusal under the default ones) is refused after all: the rescue is for membranes the default vectors
read as brown nuclei, which its own read as membranes (0.4% to 4.4% of tumour cells left on the 20 rescued
of 400 jittered synthetic fields); a real H&E with red and blue swapped keeps 23%. Nor may the rescue find
membranes the default vectors did not: where those read stained membranes in no more tumour cells than real
unstained membranes do (FALSE_MEMBRANE_PERCENT) and the slide's own read more, the own vectors, turned towards
haematoxylin, read the rims of brown nuclei as membranes (the real colon given nuclear DAB alone: 0% under the
default vectors, 1+ under its own; a generator 3+ whose DAB leans 10 degrees reads 40-43% under the default)."""

MAX_COUNTERSTAIN_OD = 0.6
"""The darkest counterstain a stained section gives (its level: cells.counterstain_od, log10 OD): over it an image
is refused. Real sections here read 0.08-0.22, jittered generator fields 0.13-0.31, the real colon with 2x and 4x
its haematoxylin 0.20 and 0.36; a photograph of a rocket against a dusk sky, its dark blue read as haematoxylin,
0.94 (given 1 µm/px it was scored 2+ with QC passed)."""

JPEG_QUALITY_FAIL = 60
JPEG_QUALITY_WARN = 70
"""A slide saved as JPEG under JPEG_QUALITY_FAIL (IJG quality of the level scored, _jpeg_quality: its tables or its pixels) fails QC, under JPEG_QUALITY_WARN
it is warned of: the compression's blocks read as faint membranes. Measured on real fields made HER2 0 or nearly
(the colon with no DAB or 0.05 x its DAB, a real Ki67 field with no DAB) saved at quality 10-90: at 70 and over
they read at most 6% of tumour cells stained; at 50-60 up to 19%, a confident 1+ (at 20-30, 16-20%)."""

MPP_OVERRIDE_MAX = 1.25
"""A µm/px given by the user more than this factor off the file's metadata fails QC (mpp_overrides_metadata): the
metadata can be wrong, but so can the user, and the nucleus-size check only refuses scales 2-3x off (a 1+ field
at 0.5 µm/px by its metadata, given 0.25, read 921 tumour cells for 3,651 and 0+ (ultralow), QC passed)."""

EOSIN_MIN_STAINED_PX = 200
"""Fewest stained pixels (over the tiles) whose eosin share the QC reads (fewer: the thumbnail's, as imagecheck.check_image reads it)."""


class WrongStainError(SlideError):
    """The slide carries eosin (H&E) rather than an H-DAB immunostain."""


class NoTissueError(SlideError):
    """No tissue was found on the slide."""


class NuclearStainError(SlideError):
    """The slide's DAB is nuclear (Ki67, ER, PR): not a membranous HER2 pattern. ``membrane``: the share of
    tumour cells read with a stained membrane (0-1)."""

    def __init__(self, path: os.PathLike | str, reason: str, membrane: float = 0.0):
        super().__init__(path, reason)
        self.membrane = membrane

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.membrane)


@dataclass(frozen=True)
class ScoringConfig:
    """Every setting of a scoring run, with units; written into result.json.

    mpp: tile resolution (µm/px); tile_px: tile core (px at mpp); margin_um: overlap (µm; margin_px
    at mpp), at least max_cell_radius_um, so that a cell a tile owns lies within what it reads;
    thresholds: per-cell Thresholds (log10 DAB OD, fractions); estimate_stains: deconvolve with the
    slide's own vectors where Ruifrok-Johnston's would leak (stain.estimate_stains, from up to 8 tiles),
    else only on a slide those read as nuclear DAB (analyse_slide); nucleus_threshold_od: least smoothed
    haematoxylin OD of a nucleus; on a pale counterstain it and the nucleus contrast are lowered to
    counterstain_ratio x its level, to no less than half (cells.nucleus_thresholds; 0: never lowered);
    max_cell_radius_um: reach of a cell from its seed (µm);
    basin_contrast_od: membrane contrast that closes a ring into a cell; tumour: TumourRule (µm);
    nuclear_stain_min / nuclear_membrane_ratio: a slide whose tumour cells have DAB-stained nuclei in at
    least that share, and in at least that ratio to the share with stained membranes, is refused as
    nuclear DAB (HER2 stains membranes; measured on tumour cells: real colon IHC 0.03, its variants
    <= 0.01, 400 generated fields with stain jitter 6 <= 0.34; real Ki67 fields and crops 0.74-2.7, also
    under their own stain vectors, given 2.2x their µm/px and at JPEG quality 60); cluster_distance_um: cohesive-cluster
    spacing (gastric biopsy); min_tumour_cells, isolated_intense_percent, gastric_reading,
    near_cutoff_points and false_membrane_percent: see guidelines; blur_min: least sharpness in focus (sharpness:
    0.46-1.7 on real and generated fields in focus, 0.08-0.24 blurred by 0.75 µm);
    max_scan_mpp: coarsest scan (µm/px) for an automatic call; eosin_fail: eosin-coloured share of the stained
    tissue over which QC fails (real H-DAB <= 0.03; the real colon with a quarter of its width real H&E 0.084, a
    third 0.12; H&E itself is refused over imagecheck.MAX_EOSIN_FRACTION); background_max_od: QC warning
    (glass OD); cnn_slide_patches, cnn_patches_per_tile: a slide's CNN reading, the mean over its patches,
    reads about cnn_slide_patches of them spread evenly over its tiles, and at least cnn_patches_per_tile a
    tile (cnn_patch_limit; a field of up to 16 tiles of 512 px gets every patch). Patch probabilities varied with
    SD 0.34-0.41 on the 12,288² bench slide (the weights shipped until 0.4.6), so 1024 patches gave its mean a
    standard error of about 0.013.
    """

    guideline: str = "breast-asco-cap-2023"
    specimen: str = "resection"
    mpp: float = CALIBRATED_MPP
    tile_px: int = 512
    margin_um: float = 16.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    estimate_stains: bool = False
    nucleus_threshold_od: float = 0.10
    counterstain_ratio: float = COUNTERSTAIN_RATIO
    max_cell_radius_um: float = 9.0
    basin_contrast_od: float = 0.10
    tumour: TumourRule = field(default_factory=TumourRule)
    nuclear_stain_min: float = 0.05
    nuclear_membrane_ratio: float = 0.5
    cluster_distance_um: float = 20.0
    min_tumour_cells: int = MIN_TUMOUR_CELLS
    isolated_intense_percent: float = ISOLATED_INTENSE_PERCENT
    gastric_reading: str = "cumulative"
    near_cutoff_points: float = NEAR_CUTOFF_POINTS
    false_membrane_percent: float = FALSE_MEMBRANE_PERCENT
    blur_min: float = 0.3
    max_scan_mpp: float = 1.0
    eosin_fail: float = 0.08
    background_max_od: float = 0.06
    cnn_slide_patches: int = 1024
    cnn_patches_per_tile: int = 8

    def __post_init__(self) -> None:
        if not 0.1 <= self.mpp <= 2.0:
            raise ValueError(f"target mpp {self.mpp} µm/px is outside 0.1-2.0; membranes need ~0.5 µm/px")
        if self.tile_px < 64 or 2 * self.margin_px >= self.tile_px:
            raise ValueError(f"tile_px must be >= 64 and the margin ({self.margin_px} px) less than half a tile")
        if self.margin_um < self.max_cell_radius_um:
            raise ValueError(f"the tile margin ({self.margin_um:g} µm) must reach as far as a cell does from its seed "
                             f"(max_cell_radius_um {self.max_cell_radius_um:g})")
        if not all(0 < d < math.inf for d in (self.cluster_distance_um, self.tumour.neighbour_radius_um)):  # NaN fails too
            raise ValueError(f"cluster_distance_um ({self.cluster_distance_um!r}) and the tumour rule's neighbour_radius_um "
                             f"({self.tumour.neighbour_radius_um!r}) must be positive finite distances")
        if self.cnn_slide_patches < 1 or self.cnn_patches_per_tile < 1:
            raise ValueError(f"cnn_slide_patches ({self.cnn_slide_patches}) and cnn_patches_per_tile "
                             f"({self.cnn_patches_per_tile}) must be at least 1")
        if not 0 < self.nuclear_membrane_ratio <= 1:
            raise ValueError(f"nuclear_membrane_ratio must be within 0-1 (got {self.nuclear_membrane_ratio})")
        if self.min_tumour_cells < 1 or self.near_cutoff_points < 0 or not 0 <= self.false_membrane_percent <= 100:
            raise ValueError(f"min_tumour_cells must be >= 1 (got {self.min_tumour_cells}), near_cutoff_points >= 0 "
                             f"(got {self.near_cutoff_points}) and false_membrane_percent within 0-100 (got "
                             f"{self.false_membrane_percent})")
        check_settings(self.guideline, self.specimen, isolated_intense_percent=self.isolated_intense_percent,
                       gastric_reading=self.gastric_reading)

    @property
    def margin_px(self) -> int:
        """The tile margin in px at ``mpp``."""
        return round(self.margin_um / self.mpp)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ScoringConfig":
        """The settings a ``to_dict`` (a result.json's ``config``) holds; the defaults for any it lacks (an older
        version's). ValueError naming a setting this version does not know (one an older version had cannot be
        scored alike) or a value of another type than the setting's."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of settings, got {type(d).__name__}")
        defaults = cls()
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown setting {unknown[0]!r}; the settings are {', '.join(sorted(known))}")
        nested = {"thresholds": Thresholds.from_dict, "tumour": TumourRule.from_dict}
        for k, v in d.items():
            default = getattr(defaults, k)
            wanted = (bool,) if isinstance(default, bool) else (int,) if isinstance(default, int) else (
                (int, float) if isinstance(default, float) else (str,) if isinstance(default, str) else (dict,))
            if not isinstance(v, wanted) or isinstance(v, bool) != (wanted == (bool,)):
                raise ValueError(f"{k} must be {' or '.join(t.__name__ for t in wanted)}, got {v!r}")
        return cls(**{k: nested[k](v) if k in nested else v for k, v in d.items()})


@dataclass(frozen=True)
class TileResult:
    """Measurements of the cells a tile owns (positions in level-0 pixels) and its QC figures."""

    cells: CellMeasurements
    tissue_px: int
    focus: float
    contrast_hist: np.ndarray
    """Membrane contrast inside the tile's cells, away from membranes (membrane.CONTRAST_BINS): the noise-floor evidence."""
    cnn_probs: np.ndarray | None = None
    cnn_patches: int = 0
    outline_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int16))
    """The owned cells' outlines back to back, on the tracing grid (her2score.outlines.trace_outline_points):
    one small array, so a tile's result crosses between processes, and stays in memory, without an object per cell."""
    outline_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Vertices of each owned cell's outline in outline_points."""
    label_xy: np.ndarray = field(default_factory=lambda: np.zeros((1, 2), np.float32))
    """Level-0 (x, y) anchor of every cell of the tile, owned or not, by its label (NaN: no such label):
    its nucleus's centroid, or its own for a cell without a nucleus (measure_cells). The tile owns the
    cells anchored in its core; neighbouring tiles find each other's cells (``cells.sector_neighbour``) there."""
    outline_frame: tuple[float, float, float] = (0, 0, 1.0)
    """(ox, oy, scale): level-0 px = tile px x scale + (ox, oy) (_tile_frame; her2score.outlines.Outlines)."""
    nucleus: NucleusThresholds | None = None
    """The nucleus thresholds the tile was segmented with, and the counterstain level that set them."""
    eosin_px: int = 0
    """Stained pixels of the tile's core (every 3rd row and column) with the colour of eosin (imagecheck.stain_fractions)."""
    stained_px: int = 0
    """Stained pixels of the tile's core (every 3rd row and column) that eosin_px is counted among."""


TILE_TISSUE_OD = 0.1
"""Summed haematoxylin and DAB OD (log10) over which a tile's pixel is tissue (its tissue count, the focus)."""


def sharpness(od: np.ndarray, *, mpp: float, scan_mpp: float | None = None, tissue_od: float = TILE_TISSUE_OD) -> float:
    """Focus QC of an optical-density image at ``mpp`` µm/px: over its tissue (OD above ``tissue_od``), the
    variance of the Laplacian against that of the detail within 4 px (the image less a 4 px Gaussian: 2 µm at
    CALIBRATED_MPP, where blur_min was set), read at CALIBRATED_MPP (a finer image is brought down to it first)
    or at ``scan_mpp``, the µm/px of the scan it was read from, where that is coarser: an image enlarged from a
    coarser scan is brought back to it, since the enlargement read as blur (sharp fields at 0.6-1 µm/px failed as
    out of focus), and its detail is read within as many of its pixels (at a tile resolution coarser than
    CALIBRATED_MPP too). That keeps a sharp real field's figure (0.48-2.1 from 0.5 to 1 µm/px on the real colon, Ki67
    and H&E fields: benchmarks/focus_scales.py) and fails a blur of about one and a half of the scan's own pixels
    or more (0.75 µm at 0.5 µm/px, 1.5 µm at 1 µm/px): a finer defocus than its pixels cannot be told from a sharp
    scan, and a 0 on a scan that coarse carries coarse_scan_zero anyway (guidelines.with_coarse_doubt). A ratio, so
    a pale counterstain or a HER2 0 (little OD, little Laplacian) reads as sharp as a 3+. NaN for 100 tissue pixels
    or fewer."""
    target = max(CALIBRATED_MPP, scan_mpp or 0.0)
    if mpp < target:
        f = mpp / target
        od = cv2.resize(od, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    tissue = od > tissue_od
    if np.count_nonzero(tissue) <= 100:
        return float("nan")
    smooth = cv2.GaussianBlur(od, (0, 0), 0.5)
    lap = cv2.Laplacian(smooth, cv2.CV_32F)
    detail = cv2.GaussianBlur(od, (0, 0), 2.0 / CALIBRATED_MPP)
    np.subtract(smooth, detail, out=detail)  # in place: no fresh temporary
    at = np.flatnonzero(tissue)  # one scan of the mask for both gathers
    return float(lap.take(at).var() / max(float(detail.take(at).var()), 1e-12))


CONTENT_REACH_UM = 23.0
CONTENT_GRID_PX = 16
"""score_tile finds cells only in a tile's content box (_content_box): the pixels within max_cell_radius_um +
CONTENT_REACH_UM of one whose haematoxylin or DAB OD (log10) reaches half the least that starts a cell (a
nucleus needs smoothed haematoxylin OD of its threshold, 0.05-0.10 by default, or DAB of 0.35; a membrane
basin a ring of membrane contrast basin_contrast_od, 0.10, over DAB's level around it, which on glass is
about 0) or counts as tissue (TILE_TISSUE_OD, summed). A cell reaches at most max_cell_radius_um from where it
starts, and CONTENT_REACH_UM is more than the filters that read it look further (the widest, the 8 µm opening
of local_background, 16 µm). The box
lies on the CONTENT_GRID_PX grid of the tile's own pixels, and is used only where every coarse grid a step
works on (COARSE_MPP, FLOOD_MPP, FILL_MPP; CALIBRATED_MPP for the focus) is a whole number of pixels dividing
it: at 0.125, 0.25, 0.5, 1 and 2 µm/px. There the box reads its cells exactly as the whole tile would (tests),
and the glass of a tile at the tissue's edge costs nothing."""


def _content_box(hematoxylin_od: np.ndarray, dab_od: np.ndarray, *, mpp: float, start_od: float,
                 cell_radius_um: float) -> tuple[slice, slice]:
    """The (rows, columns) of a tile (its two stains' OD at ``mpp`` µm/px) that score_tile reads for cells
    starting where either OD reaches ``start_od`` and reaching ``cell_radius_um`` from there (CONTENT_REACH_UM):
    the whole tile where its size or a coarse grid is off the CONTENT_GRID_PX grid, one square of the grid
    (glass, where no cell can be) where no pixel reaches half ``start_od``."""
    h, w = hematoxylin_od.shape
    g = CONTENT_GRID_PX
    steps = [c / mpp for c in (COARSE_MPP, FLOOD_MPP, FILL_MPP, CALIBRATED_MPP) if c > mpp]
    if h % g or w % g or any(abs(s - round(s)) > 1e-9 or g % round(s) for s in steps):
        return slice(0, h), slice(0, w)
    content = np.maximum(hematoxylin_od, dab_od) >= start_od / 2
    rows, cols = np.flatnonzero(content.any(1)), np.flatnonzero(content.any(0))
    if not len(rows):
        return slice(0, g), slice(0, g)
    reach = math.ceil((cell_radius_um + CONTENT_REACH_UM) / mpp)

    def span(first: int, last: int, size: int) -> slice:
        return slice(max(first - reach, 0) // g * g, min(-(-(last + 1 + reach) // g) * g, size))
    return span(int(rows[0]), int(rows[-1]), h), span(int(cols[0]), int(cols[-1]), w)


def score_tile(rgb: np.ndarray, tile: Tile, *, stains: StainSet, config: ScoringConfig, scale: float,
               nucleus: NucleusThresholds | None = None, cnn=None, cnn_max_patches: int | None = None,
               region: Region | None = None) -> TileResult:
    """Measure the cells of one tile (RGB uint8 at config.mpp, the tile's read box).

    ``scale``: level-0 px per tile px, to place cells in the slide; ``nucleus``: the slide's nucleus
    thresholds (cells.measure_nucleus_thresholds; None: from this tile's own counterstain); ``cnn``: an optional
    TileClassifier that also gives the tile's class probabilities (over its core only, from at most
    ``cnn_max_patches`` patches; with a tumour ``region``, those whose centre lies in it, as the cells counted).
    """
    mpp = config.mpp
    rgb = fill_as_glass(rgb, mpp=mpp)  # a rotation's or a mask's fill is no stain
    hed = deconvolve(rgb, stains)
    h_od, dab_od = hed[..., 0], hed[..., 1]
    nucleus = nucleus or _nucleus_thresholds([h_od], config)
    box = _content_box(h_od, dab_od, mpp=mpp, start_od=min(nucleus.threshold_od, config.basin_contrast_od, TILE_TISSUE_OD),
                       cell_radius_um=config.max_cell_radius_um)  # the tissue counted is content too
    origin = (box[0].start, box[1].start)
    # contiguous copies: OpenCV and ravel() copied the strided planes of hed at each call
    h_box, dab_box, outside = np.ascontiguousarray(h_od[box]), np.ascontiguousarray(dab_od[box]), tile.beyond_slide()[box]
    nuclei, rise = segment_nuclei(h_box, dab_box, mpp=mpp, threshold_od=nucleus.threshold_od, contrast_od=nucleus.contrast_od,
                                  return_rise=True)
    dab_smooth, contrast = membrane_contrast(dab_box, nuclei, mpp=mpp)
    basins = membrane_basins(contrast >= config.basin_contrast_od, nuclei, mpp=mpp)
    cells = grow_cells(nuclei, contrast, mpp=mpp, basins=basins, max_radius_um=config.max_cell_radius_um, outside=outside)
    x0, y0, w, h = tile.core
    rx, ry = tile.read[:2]
    m, contrast_hist, anchors = measure_cells(cells, nuclei, h_box, dab_smooth, contrast, mpp=mpp, outside=outside,
                                                core=(x0 - rx, y0 - ry, w, h), origin=origin, rise=rise)
    ox, oy, _ = frame = _tile_frame(tile, scale)
    m = replace(m, x=(m.x * scale + ox).astype(np.float32), y=(m.y * scale + oy).astype(np.float32))
    label_xy = anchors.astype(np.float32) * scale + np.array([ox, oy], np.float32)  # float32 throughout
    outline_points, outline_sizes = trace_outline_points(cells, m.label, origin)
    total_od = h_box + dab_box  # the focus filters reach less far than the box's margin
    tissue = total_od > TILE_TISSUE_OD
    focus = sharpness(total_od, mpp=mpp, scan_mpp=mpp / scale)
    probs, n_patches = None, 0
    mg = tile.margin
    if cnn is not None:
        within = None if region is None else (  # patch centres (row, col) in core px -> level-0 px, as the cells
            lambda rc: region.contains((rc[:, 1] + mg) * scale + ox, (rc[:, 0] + mg) * scale + oy))
        probs, n_patches = cnn.predict_od(hed[mg : mg + h, mg : mg + w], stains=stains, max_patches=cnn_max_patches,
                                          within=within)
    # eosin at the tiles' resolution, where it is not blended into the nuclei as on a thumbnail
    eosin, _, stained_px = stain_fractions(optical_density(rgb[mg : mg + h : 3, mg : mg + w : 3], stains.background))
    return TileResult(m, int(tissue.sum()), focus, contrast_hist, probs, n_patches, outline_points, outline_sizes,
                      label_xy, frame, nucleus, round(eosin * stained_px), stained_px)


@dataclass(frozen=True)
class SlideAnalysis:
    """A slide's result plus what the outputs need: the cell table, a thumbnail with its mask, and the tumour
    annotation the cells were counted in (None: detected epithelial cells).

    ``cells``: columns of equal length, numpy arrays but for "outline" (her2score.outlines.Outlines,
    each cell's float32 (k, 2) outline in level-0 px on access).
    """

    result: SlideResult
    cells: dict[str, np.ndarray | Outlines]
    thumbnail: np.ndarray
    thumbnail_mpp: float
    tissue: TissueMask
    region: Region | None = None


# -- worker processes: each opens the slide file itself after the fork, never using the parent's handle ----
_worker: dict = {}


def _init_worker(parent: int, path: str | ArraySlide, mpp: float | None, backend: str | None, cnn, region: Region | None) -> None:
    """``path``: the slide's file, or a plain image the parent decoded (forked workers share its pixels)."""
    die_with_parent(parent)  # a tile worker never outlives the process scoring the slide (e.g. a SIGKILLed batch)
    _worker["slide"] = path if isinstance(path, ArraySlide) else open_slide(path, mpp=mpp, backend=backend)
    _worker["cnn"] = cnn
    _worker["region"] = region
    if cnn is not None:
        use_one_thread()


def _run_tile(tile: Tile, *, stains: StainSet, config: ScoringConfig, nucleus: NucleusThresholds | None,
              cnn_max_patches: int | None) -> TileResult:
    return _read_and_score(_worker["slide"], tile, stains, config, nucleus, _worker["cnn"], cnn_max_patches, _worker["region"])


def _read_origin(tile: Tile, scale: float) -> tuple[int, int]:
    """The level-0 px where ``tile``'s read box starts (``scale``: level-0 px per grid px)."""
    x, y = tile.read[:2]
    return round(x * scale), round(y * scale)


def _read_tile(slide: Slide, tile: Tile, mpp: float) -> np.ndarray:
    """The tile's read box (core and margins) as RGB at ``mpp`` µm/px, the grid's resolution."""
    return slide.read_region(_read_origin(tile, mpp / slide.mpp), tile.read[2:], mpp=mpp)


def _tile_frame(tile: Tile, scale: float) -> tuple[float, float, float]:
    """(ox, oy, scale): level-0 px (pixel-centre coordinates, as QuPath's minus 0.5) of a tile px of
    ``tile``'s read box, as _read_tile reads it, are tile px x ``scale`` + (ox, oy): the box starts at
    its _read_origin, and each tile px spans ``scale`` level-0 px, centre on centre."""
    x0, y0 = _read_origin(tile, scale)
    return x0 + 0.5 * scale - 0.5, y0 + 0.5 * scale - 0.5, scale


def _read_and_score(slide: Slide, tile: Tile, stains: StainSet, config: ScoringConfig, nucleus: NucleusThresholds | None,
                    cnn, cnn_max_patches, region: Region | None) -> TileResult:
    return score_tile(_read_tile(slide, tile, config.mpp), tile, stains=stains, config=config, scale=config.mpp / slide.mpp,
                      nucleus=nucleus, cnn=cnn, cnn_max_patches=cnn_max_patches, region=region)


def _sample(tiles: list[Tile], n: int = 8) -> list[Tile]:
    """Up to ``n`` of ``tiles`` evenly spaced through the grid's order (rows and columns alike)."""
    return [tiles[i] for i in np.unique(np.linspace(0, len(tiles) - 1, min(n, len(tiles))).round().astype(int))]


def _nucleus_thresholds(hematoxylin_ods, config: ScoringConfig) -> NucleusThresholds:
    """The nucleus thresholds for the counterstain of these tiles' haematoxylin OD (cells.measure_nucleus_thresholds)."""
    return measure_nucleus_thresholds(hematoxylin_ods, mpp=config.mpp, threshold_od=config.nucleus_threshold_od,
                                      ratio=config.counterstain_ratio)


def _slide_nucleus_thresholds(sample: list[np.ndarray], stains: StainSet, config: ScoringConfig) -> NucleusThresholds:
    """A slide's nucleus thresholds, from the counterstain of a sample of its tiles (RGB, _sample)."""
    return _nucleus_thresholds((deconvolve(rgb, stains)[..., 0] for rgb in sample), config)


def cnn_patch_limit(config: ScoringConfig, n_tiles: int) -> int:
    """Patches the CNN reads in each tile of a slide of ``n_tiles`` tiles: config.cnn_slide_patches in all,
    spread evenly, and never fewer than config.cnn_patches_per_tile a tile."""
    return max(config.cnn_patches_per_tile, math.ceil(config.cnn_slide_patches / max(n_tiles, 1)))


def _thumbnail_mpp(slide: Slide, target_mpp: float) -> float:
    """Coarse enough for a ~1500 px thumbnail, never finer than the scan or the target."""
    longest_um = max(slide.dimensions) * slide.mpp
    return float(np.clip(longest_um / 1500, max(slide.mpp, target_mpp), 16.0))


def _largest_clusters(xy_um: np.ndarray, level: np.ndarray, distance_um: float) -> dict[str, int]:
    """Largest cohesive cluster (cells within ``distance_um`` of a neighbour) at or above each level."""
    out = {}
    for lv, name in ((3, "3+"), (2, "2+"), (1, "1+")):
        pts = xy_um[level >= lv]
        if len(pts) == 0:
            out[name] = 0
            continue
        comp = groups(len(pts), pairs_within(pts, distance_um))
        out[name] = int(np.bincount(comp).max())
    return out


def _opened(source, mpp, backend, default_mpp=None):
    """A context manager giving a Slide: opens a path, or lends an already open Slide, whose µm/px and reader are
    those it was opened with (ValueError where ``mpp`` or ``backend`` given beside it differ from them; ``default_mpp``
    is for a file without a µm/px, which an open Slide has)."""
    if not isinstance(source, Slide):
        return open_slide(source, mpp=mpp, backend=backend, default_mpp=default_mpp)
    if mpp is not None and not math.isclose(mpp, source.mpp, rel_tol=1e-6) or backend not in (None, source.backend):
        raise ValueError(f"mpp={mpp!r}, backend={backend!r} given with an open Slide, which was opened at {source.mpp:g} "
                         f"µm/px by {source.backend or 'no'} reader: give them to open_slide(path, ...), or pass the path")
    return nullcontext(source)


READER_NOTE = "reader: "
"""How the note naming the reader (slide.BACKENDS) that opened a slide's file begins; an array or a Slide given has none."""

OWN_STAINS_NOTE = "scored with the slide's own stain vectors: the default ones read it as nuclear DAB"
"""The note of a slide scored with its own stain vectors after the default ones refused it (analyse_slide)."""


def _check_config(config) -> None:
    """TypeError where ``config`` is no ScoringConfig (a dict failed deep inside)."""
    if not isinstance(config, ScoringConfig):
        raise TypeError(f"config must be a ScoringConfig (ScoringConfig.from_dict reads a result.json's 'config'), "
                        f"not {type(config).__name__}")


def analyse_slide(
    path: str | os.PathLike | Slide | np.ndarray,
    *,
    config: ScoringConfig = ScoringConfig(),
    mpp: float | None = None,
    region: str | os.PathLike | Region | None = None,
    backend: str | None = None,
    workers: int = 1,
    cnn=None,
    default_mpp: float | None = None,
) -> SlideAnalysis:
    """Score one slide and keep what the outputs need (see score_slide).

    A slide refused as nuclear DAB under the default stain vectors is scored again with its own
    where they lean beyond the default towards each other (stain.estimate_stains): there the default
    reads DAB as haematoxylin, so stained membranes are found as brown nuclei (measured on synthetic
    3+ fields whose DAB leans 5-12 degrees towards haematoxylin). Refused again, the first refusal stands.
    """
    workers = checked_workers(workers)
    if not isinstance(path, (str, os.PathLike, Slide, np.ndarray)):
        raise TypeError(f"path must be a file path, an open Slide or an RGB array (np.asarray(image) for a PIL image), "
                        f"not {type(path).__name__}")
    _check_config(config)
    if region is not None and not isinstance(region, (str, os.PathLike, Region)):  # before any tile is read
        raise TypeError(f"region must be a path to a QuPath GeoJSON or mask image, or a her2score.region.Region "
                        f"(load_region), not {type(region).__name__}")
    if isinstance(path, np.ndarray):  # an RGB field in memory, at the µm/px given, or the default given: it has none of its own
        path = (ArraySlide(path, mpp=mpp) if mpp is not None or default_mpp is None else
                ArraySlide(path, mpp=default_mpp, mpp_source=f"{DEFAULT_MPP_SOURCE} (an array has no µm/px of its own)",
                           mpp_origin="default"))
        mpp = default_mpp = None  # the array's own now
    try:
        return _analyse(path, config, mpp, region, backend, workers, cnn, default_mpp=default_mpp)
    except NuclearStainError as refusal:
        if config.estimate_stains:
            raise
        try:
            a = _analyse(path, replace(config, estimate_stains=True), mpp, region, backend, workers, cnn, retry_of=refusal,
                         default_mpp=default_mpp)
        except (NuclearStainError, NotHerIhcError):  # refused again, on any count
            raise refusal from None
        fractions = a.result.staining["fractions"]
        if (still := fractions["nucleus"]) >= RESCUED_NUCLEAR_MAX:  # the vectors were not the cause
            raise NuclearStainError(refusal.path, f"{refusal.reason}; with its own stain vectors {still:.0%} of tumour cells "
                                                  "still have DAB-stained nuclei (another stain, or an image with its red "
                                                  "and blue channels swapped?)", refusal.membrane) from None
        if refusal.membrane <= config.false_membrane_percent / 100 < fractions["membrane"]:  # membranes the default vectors never saw
            raise NuclearStainError(refusal.path, f"{refusal.reason}; its own stain vectors read {fractions['membrane']:.0%} "
                                                  f"of tumour cells with a stained membrane where the default ones read "
                                                  f"{refusal.membrane:.0%}, no more than unstained membranes read: membranes "
                                                  "only the slide's own vectors see are the rims of its brown nuclei",
                                    refusal.membrane) from None
        note = f"{OWN_STAINS_NOTE} ({refusal.reason})"
        warn = QCFinding("own_stain_vectors", "warn", "its stains lean off the default vectors, which read its DAB as "
                         "nuclear: scored with its own (see notes); check the stain")
        return replace(a, result=replace(a.result, notes=(*a.result.notes, note), qc=(*a.result.qc, warn)))


@dataclass(frozen=True)
class _Scan:
    """What reading a slide gave before its cells are judged (_analyse, for _finish and _qc): its path, µm/px
    (scored, where that came from, and the metadata's), JPEG quality and notes; thumbnail, tissue and stains; the tumour region; the
    eosin share of its stained tiles; the CNN's reading."""

    path: str
    mpp: float
    mpp_origin: str
    metadata_mpp: float | None
    jpeg: tuple[int, str] | None  # quality, where it was read (_jpeg_quality)
    notes: tuple[str, ...]
    thumb: np.ndarray
    thumb_mpp: float
    tissue: TissueMask
    stains: StainSet
    region: Region | None
    eosin: float
    cnn_report: CnnReport | None
    stain_chroma_deg: float
    sample: str  # files.content_sample of the slide file before it was read ('' in memory)


def _analyse(path, config: ScoringConfig, mpp, region, backend, workers: int, cnn,
             retry_of: NuclearStainError | None = None, default_mpp: float | None = None) -> SlideAnalysis:
    """analyse_slide's one pass; ``retry_of``: the refusal to raise again where the slide's own vectors are the default."""
    if cnn is not None and abs(cnn.mpp - config.mpp) > 1e-6:
        raise ValueError(f"the CNN was trained at {cnn.mpp} µm/px but tiles are read at {config.mpp} µm/px")
    try:
        file_sample = content_sample(path) if isinstance(path, (str, os.PathLike)) and os.path.isfile(path) else ""
    except OSError as e:  # as open_slide says it (a raw "[Errno 13] ..." reached the batch's error row)
        raise SlideError(path, f"cannot read file ({e.strerror or e})") from None
    with _opened(path, mpp, backend, default_mpp) as slide:
        thumb_mpp = _thumbnail_mpp(slide, config.mpp)
        thumb = slide.thumbnail(mpp=thumb_mpp)
        background = estimate_background(thumb)
        tissue = tissue_mask(thumb, mpp=thumb_mpp, background=background)
        if tissue.mask.sum() == 0:
            raise NoTissueError(slide.path, _no_tissue(slide))
        stains, stain_note = H_DAB.with_background(background), "default Ruifrok-Johnston vectors"
        width_t = round(slide.dimensions[0] * slide.mpp / config.mpp)
        height_t = round(slide.dimensions[1] * slide.mpp / config.mpp)
        tiles = tile_grid(tissue, slide_size_px=(width_t, height_t), tile_px=config.tile_px, margin_px=config.margin_px)
        several = len(tiles) > 1
        sample = [_read_tile(slide, t, config.mpp) for t in _sample(tiles)] if several or config.estimate_stains else []
        if config.estimate_stains:
            stains, stain_note = estimate_stains(np.concatenate([s.reshape(-1, 3) for s in sample]), background=background)
            if retry_of is not None and stains.source != "estimated":
                raise retry_of
        # one set for the whole slide; a single tile measures its own from the same pixels (score_tile)
        nucleus = _slide_nucleus_thresholds(sample, stains, config) if several else None
        del sample
        _refuse_dark_counterstain(slide.path, nucleus)
        if region is not None and any(note.startswith(EXIF_TURNED) for note in slide.notes):
            raise SlideError(slide.path, "turned upright as its EXIF orientation says, and given a tumour annotation: "
                                         "whether it was drawn on the image as stored or as turned cannot be told; "
                                         "save the image upright (no Orientation tag) and draw the annotation on it")
        region_obj = load_region(region, slide_size=slide.dimensions) if isinstance(region, (str, os.PathLike)) else region
        slide_path, slide_mpp, mpp_origin, metadata_mpp = str(slide.path), slide.mpp, slide.mpp_origin, slide.metadata_mpp
        notes = (f"stain vectors: {stain_note}", f"µm/px {slide.mpp:.4g} from {slide.mpp_source}",
                 *([f"{READER_NOTE}{slide.backend}"] if slide.backend else []), *slide.notes)

        cnn_max = cnn_patch_limit(config, len(tiles))  # a whole slide's CNN mean needs only a sample of its patches
        parallel = workers > 1 and len(tiles) > 1 and not isinstance(path, Slide)
        # the workers open it at the µm/px it was opened at (given, the metadata's or the default); a plain image,
        # decoded whole and holding no file, forked workers share (each decoded it again: a 16,000² PNG took 2.6 GB
        # with one worker, 5.6 with two)
        opened = slide if FORKS and isinstance(slide, ArraySlide) else slide_path
        # no more processes than tiles (--workers 40 on a 9-tile field started 40 of them, each with its slide open)
        with (worker_pool(min(workers, len(tiles)), _init_worker, (opened, slide_mpp, backend, cnn, region_obj)) if parallel
              else nullcontext()) as pool:
            # the workers score tiles (one a task: no core idles while another ends a long chunk) while this
            # process checks that the image is an H-DAB stain at all
            run = partial(_run_tile, stains=stains, config=config, nucleus=nucleus, cnn_max_patches=cnn_max)
            pending = [pool.submit(run, t) for t in tiles] if pool else None
            check = check_slide(slide, thumb, tissue)  # a brightfield H-DAB tissue image at a plausible µm/px?
            if not check.accepted:
                reason = check.reason
                if check.code == "implausible_scale" and slide.mpp_origin == "default":
                    reason += (f" (this image has no µm/px of its own: {slide.mpp:g} was the default given, --default-mpp; "
                               "default_mpp= in the Python API)")
                raise (WrongStainError if check.code == "eosin" else NotHerIhcError)(slide.path, reason)
            thumb_eosin, chroma = check.eosin_fraction, check.stain_chroma_deg
            jpeg = _jpeg_quality(slide, config.mpp, tissue)
            notes = (*notes, *([f"JPEG quality {jpeg[0]} (from {jpeg[1]})"] if jpeg else []))
            parts = ([result_of(f) for f in pending] if pool else
                     [_read_and_score(slide, t, stains, config, nucleus, cnn, cnn_max, region_obj) for t in tiles])
            if nucleus is None and parts:  # a single tile measured its own
                _refuse_dark_counterstain(slide.path, parts[0].nucleus)

    parts = _without_seam_twins(parts, tolerance_px=SEAM_TWIN_UM / slide_mpp)
    cells = CellMeasurements.concat([p.cells for p in parts]) if parts else None
    if cells is None or len(cells) == 0:
        raise NoTissueError(slide_path, "no cells found in the tissue (empty or unstained slide)")
    cnn_report = aggregate_tiles([(p.cnn_probs, p.cnn_patches) for p in parts], model=cnn.name) if cnn else None
    if cnn is not None and cnn_report is None:  # asked for, the CNN gives no reading: say why, not a bare null
        notes = (*notes, "the CNN read no patch: " + ("none with enough tissue is centred in the tumour annotation"
                                                      if region_obj is not None else "none holds enough tissue")
                 + "; the score is the classical one")
    # the eosin share at the tiles' resolution: a thumbnail blends eosin into the nuclei (a real H&E read under
    # the QC's 8%) and JPEG colours into eosin (a generated 3+ slide read 8.25%, its tiles 1.4%)
    stained = sum(p.stained_px for p in parts)
    eosin = sum(p.eosin_px for p in parts) / stained if stained >= EOSIN_MIN_STAINED_PX else thumb_eosin
    scan = _Scan(slide_path, slide_mpp, mpp_origin, metadata_mpp, jpeg, notes, thumb, thumb_mpp, tissue, stains, region_obj, eosin,
                 cnn_report, chroma, file_sample)
    return _finish(scan, config, cells, parts)


def _jpeg_quality(slide: Slide, mpp: float, tissue: TissueMask, *, size_px: int = 512,
                  earlier_by: int = 5) -> tuple[int, str] | None:
    """The JPEG quality of the level the tiles are read from at ``mpp`` µm/px, and where it was read: the level's
    quantisation tables, or the 8 x 8 blocks that a JPEG save left in the pixels (jpeg.pixel_jpeg_quality, of a
    ``size_px`` square of the scan's own pixels at the tissue's most interior point) where the file has none (a PNG
    or TIFF saved losslessly from a JPEG, an array) or they show an earlier save at least ``earlier_by`` coarser
    (a JPEG of a JPEG: its own tables say only the last save's); None where neither tells (never a JPEG, or
    resized since)."""
    tables = slide.jpeg_quality_at(mpp)
    row, col = tissue.interior_point
    w, h = min(size_px, slide.dimensions[0]), min(size_px, slide.dimensions[1])
    x = max(0, min(round(col * tissue.mpp / slide.mpp) - w // 2, slide.dimensions[0] - w))
    y = max(0, min(round(row * tissue.mpp / slide.mpp) - h // 2, slide.dimensions[1] - h))
    pixels = pixel_jpeg_quality(slide.read_region((x, y), (w, h), mpp=slide.mpp))
    if pixels is not None and (tables is None or pixels <= tables - earlier_by):
        before = f" before its last (the file's own tables say {tables})" if tables is not None else ""
        return pixels, f"the 8 x 8 blocks its pixels keep from a JPEG save{before}"
    return None if tables is None else (tables, "the quantisation tables of the level scored")


def _refuse_dark_counterstain(path, nucleus: NucleusThresholds | None) -> None:
    """NotHerIhcError where the counterstain's level is over MAX_COUNTERSTAIN_OD."""
    if nucleus is not None and nucleus.counterstain is not None and nucleus.counterstain > MAX_COUNTERSTAIN_OD:
        raise NotHerIhcError(path, f"its nuclei read {nucleus.counterstain:.2f} OD of haematoxylin, darker than any "
                                   "counterstain (stained sections 0.08-0.36, over-stained 4x included): not a brightfield "
                                   "H-DAB tissue image (a photograph, a darkfield image?); not scored")


@dataclass(frozen=True)
class _CellsRead:
    """A slide's cells as read (_read_cells): their membranes, category and pattern codes (with ``borrowed``: the
    cells emptied as showing their neighbours' membrane) and DAB compartment codes; which are tumour and why each other
    was left out (``selection``), and by what (``region_source``); the slide's staining figures (``staining``, as the
    result reports them) with its membrane noise floor (``floor``) and the cytoplasm levels the doubts read
    (``blush``, ``filled``, ``rise``: log10 OD, tumour.with_cytoplasm_doubt); the scan's µm/px (``scan_mpp``)."""

    mem: MembraneSummary
    category: np.ndarray
    pattern: np.ndarray
    borrowed: np.ndarray
    compartment: np.ndarray
    selection: TumourSelection
    region_source: str
    staining: dict
    floor: float
    blush: float | None
    filled: float | None
    rise: float | None
    scan_mpp: float

    @property
    def tumour(self) -> np.ndarray:
        return self.selection.tumour


def _read_cells(scan: _Scan, config: ScoringConfig, cells: CellMeasurements, parts: list[TileResult]) -> _CellsRead:
    """Each cell's membrane category, compartment and tumour flag, at the slide's own noise floor; refuses nuclear DAB."""
    t = config.thresholds
    floor = noise_floor(np.sum([p.contrast_hist for p in parts], axis=0))
    threshold = max(t.faint_od, floor)
    unstained = unstained_level(cells)
    mem = summarise_membranes(cells, threshold_od=threshold, cytoplasm_base_od=unstained,
                              cytoplasm_ratio=t.cytoplasm_ratio, min_run=t.min_arc_sectors)
    category, pattern = classify_cells(mem.completeness, mem.longest_arc, mem.longest_gap, mem.membrane_od, t)
    # a partly stained cell with no DAB of its own, stained only where it borders cells that their own membrane
    # encloses, shows their membrane, not its own (README: shared membranes)
    own_dab = stained_cytoplasm(cells, unstained_od=unstained)
    enclosing = pattern >= PATTERNS.index("lateral")
    beside = np.concatenate([(rows >= 0) & enclosing[np.maximum(rows, 0)]  # per tile: the int32 rows never pile up
                             for rows in _neighbour_rows(parts, tolerance_px=NEIGHBOUR_MATCH_UM / scan.mpp)])
    borrowed = (pattern == PATTERNS.index("partial")) & ~own_dab & stained_by_neighbours(mem.stained, beside)
    category[borrowed], pattern[borrowed] = 0, 0
    compartment = staining_compartments(cells, category > 0, unstained_od=unstained)
    # the guidelines count invasive tumour cells: lymphocytes and stroma within an annotation are left out too
    selection = select_tumour_cells(cells, um_per_px=scan.mpp, rule=config.tumour,
                                    within=None if scan.region is None else scan.region.contains(cells.x, cells.y))
    tumour = selection.tumour
    region_source = selection.describe(None if scan.region is None else scan.region.source)
    # the stain's pattern is judged on the cells HER2 is scored on (lymphocytes' dark nuclei can read brown)
    staining = _stain_compartments(scan.path, config, compartment[tumour] if tumour.any() else compartment, floor, threshold)
    nucleus = parts[0].nucleus  # the slide's, or a single tile's own
    blush = diffuse_cytoplasm_od(cells, unstained_cells=tumour & (category == 0), reference_cells=~tumour, unstained_od=unstained)
    read = tumour & (category > 0)
    filled = diffuse_cytoplasm_od(cells, unstained_cells=read, reference_cells=~tumour, unstained_od=unstained)
    rise = float(np.median(mem.contrast_od[read])) if read.any() else None  # how far the membranes read stand out
    staining.update(counterstain_od=None if nucleus.counterstain is None else round(nucleus.counterstain, 4),
                    nucleus_threshold_od=round(nucleus.threshold_od, 4),
                    diffuse_cytoplasm_od=None if blush is None else round(blush, 4),
                    stained_cytoplasm_od=None if filled is None else round(filled, 4),
                    membrane_contrast_od=None if rise is None else round(rise, 4))
    return _CellsRead(mem, category, pattern, borrowed, compartment, selection, region_source, staining, floor, blush, filled,
                      rise, scan.mpp)


@dataclass(frozen=True)
class _Call:
    """A call with the words and flags it is reported with (``h_score``: None without tumour cells; ``near_sides``:
    _near_sides of the guideline's own call)."""

    score: str | None
    level: str
    flags: tuple[str, ...]
    reason: str
    h_score: float | None = None
    near_sides: tuple = ()
    open_to: tuple[str, ...] = ()
    """The other scores the cells measured leave possible (a share near a cut-off, a cluster of ~5, intense cells at
    the isolated floor, guidelines.DOUBT_SIDES): those the CNN may tip the call to."""
    edges: tuple[tuple[str, str, bool], ...] = ()
    """The edges other than a share near 10% that the call lies on, (words, the score across, whether the cells
    measured put it there: guidelines.edge_sides)."""


def _guideline_call(counts: dict, n_tumour: int, clusters: dict, config: ScoringConfig, read: _CellsRead) -> _Call:
    """The guideline's call on the tumour cells' ``counts``, with the edges it lies near and the doubts of its cells."""
    if n_tumour == 0:  # no score at all, never HER2 0
        return _Call(None, "not scored", ("no_tumour_cells",), f"no tumour cells found ({read.region_source}): no HER2 score")
    call = apply_guideline(counts, config.guideline, config.specimen, clusters=clusters,
                           isolated_intense_percent=config.isolated_intense_percent, gastric_reading=config.gastric_reading)
    score, flags, reason = call.score, call.flags, call.reason
    near_sides = _near_sides(counts, score, config, clusters)
    if near_sides:  # the nearest share, and every score it could give
        flags = (*flags, "near_cutoff")
        reason += _near_words(near_sides, score, n_tumour, config)
    edges = edge_sides(counts, score, guideline=config.guideline, specimen=config.specimen, clusters=clusters,
                       gastric_reading=config.gastric_reading, isolated_intense_percent=config.isolated_intense_percent)
    if edges and "near_cutoff" not in flags:
        flags = (*flags, "near_cutoff")
    could_be: dict[str, list[str]] = {}  # one edge's words with every level across it
    for words, _, level, _ in edges:
        could_be.setdefault(words, []).append(level)
    edge_words = tuple(f"{words}: it could be {' or '.join(levels)}" for words, levels in could_be.items())
    reason += "".join(f"; {words}" for words in edge_words)
    flags, doubt = with_call_doubts(flags, score, call.level, counts, config.guideline, read.blush, read.rise,
                                    filled=read.filled, false_membrane_percent=config.false_membrane_percent,
                                    scan_mpp=read.scan_mpp)
    measured = [other for _, other, _, cells in edges if cells]  # the CNN may tip the call across these, not the others
    open_to = [side for side, _ in near_sides] + measured + [DOUBT_SIDES[f] for f in flags if f in DOUBT_SIDES]
    return _Call(score, call.level, flags, reason + doubt, call.h_score, tuple(near_sides), tuple(dict.fromkeys(open_to)),
                 tuple((words, other, cells) for words, other, _, cells in edges))


_DOUBT_WORDS = {"moderate_incomplete": "its weak-to-moderate incomplete membranes could be moderate, the 2018 note's 2+",
                "coarse_scan_zero": f"a 0 on a scan coarser than {COARSE_SCAN_MPP:g} µm/px, where faint membranes read weaker "
                                    "and fewer, could be 1+"}
"""How a fused reason names each doubt of guidelines.DOUBT_SIDES that opened the call to the score reported."""


def _fused_call(classical: _Call, report: CnnReport, counts: dict, n_tumour: int, clusters: dict, config: ScoringConfig,
                read: _CellsRead) -> tuple[_Call, float]:
    """The call reported after fusing ``classical`` with the CNN's ``report``, and its confidence: the reason, flags
    and level are the reported call's (the classical call keeps its own)."""
    # a 0 whose staining false membranes could give (none included; within its interval, on few cells): the CNN
    # may not lift it (cnn.fuse)
    false = (false_membrane_share(counts, percent=config.false_membrane_percent, confidence=NEAR_CUTOFF_CONFIDENCE)
             if classical.score == "0" else None)
    higher = SCORES[SCORES.index(classical.score) + 1:]
    open_to = [s for s in classical.open_to if false is None or s not in higher]
    score, confidence = fuse(classical.score, report.probabilities, to=open_to)
    cnn_words = f"the CNN (a mean over the tissue's patches) reads {report.score} (p={report.probabilities[report.score]:.2f})"
    if (free := fuse(classical.score, report.probabilities)[0]) != score:
        if free in higher and false is not None:
            within = (f" of {n_tumour:,} tumour cells, within its {NEAR_CUTOFF_CONFIDENCE:.0%} interval,"
                      if false > config.false_membrane_percent else "")
            cnn_words += (f", not followed to a higher score: the {percent_text(false, config.false_membrane_percent)} "
                          f"stained{within} is no more than real unstained membranes read, and on real tissue the CNN can "
                          "read faint diffuse DAB as 1+")
        else:
            read_so = [other for _, other, cells in classical.edges if not cells and other not in open_to]
            left = (f"only {' or '.join(open_to)} possible besides it" if open_to else
                    "no other score the CNN may settle" if read_so else "the call in no doubt")
            cnn_words += (f", not followed to {free}: the cells measured leave {left} (a network trained on synthetic "
                          "fields tips only a call its cells leave in doubt"
                          + (f"; the {' or '.join(read_so)} they could be is a reading of the guideline's words, which it "
                             "does not settle" if read_so else "") + ")")
    level, flags, reason = classical.level, classical.flags, classical.reason
    if score != classical.score:
        level = report_level(score, config.guideline, counts)
        flags, doubt = with_call_doubts(level_flags(level, config.guideline), score, level, counts, config.guideline,
                                        read.blush, read.rise, filled=read.filled,
                                        false_membrane_percent=config.false_membrane_percent, scan_mpp=read.scan_mpp)
        if "isolated_intense_cells" in classical.flags and score in ("0", "1+"):  # as the pattern they would make it 2+
            flags = (*flags, "isolated_intense_cells")
            doubt = "; " + isolated_note(counts, config.isolated_intense_percent) + doubt
        if (own := _near_sides(counts, score, config, clusters)) or "near_cutoff" in classical.flags:
            flags = (*flags, "near_cutoff")  # the cells measured lie near a cut-off, this call's or the classical one's
        # why the cells measured left the call open to this score: a share near 10%, an edge they lie on, a doubt of theirs
        near = dict(classical.near_sides)
        opened = [f"{percent_text(near[score])} of {n_tumour:,} tumour cells decide it, near the 10% cut-off"] if score in near else []
        opened += [f"{words}: it could be {score}" for words, other, cells in classical.edges if cells and other == score]
        opened += [_DOUBT_WORDS[f] for f in classical.flags if DOUBT_SIDES.get(f) == score]
        doubt = ((_near_words(own, score, n_tumour, config) if own else "")
                 + (f"; the {classical.level} the cells measured give is open to {score}: {'; '.join(opened)}" if opened else "")
                 + doubt)
        reason = (f"reported {level} after fusing the classical call with the CNN: {cnn_words}, the cells measured give "
                  f"{classical.level} on {classical.reason.split('; ')[0]}"
                  + ("; reflex ISH required" if level == "2+" else "") + doubt)
    elif report.score != classical.score:
        reason += f"; {cnn_words}"
    if report.score != classical.score:
        flags = (*flags, "cnn_disagrees")
    return _Call(score, level, tuple(flags), reason, classical.h_score), confidence


def _cell_table(cells: CellMeasurements, read: _CellsRead, parts: list[TileResult]) -> dict:
    """SlideAnalysis.cells: the columns of the cell table. A cell found by its membrane ring alone has no nucleus:
    its nucleus_area_um2 is 0, its other nucleus measurements NaN (null in the files), not 0."""
    seen = cells.nucleus_area_um2 > 0

    def nucleus(values: np.ndarray) -> np.ndarray:
        return np.where(seen, values, np.float32(np.nan))
    return {
        "x": cells.x, "y": cells.y,
        "category": np.array(CATEGORIES, dtype=object)[read.category],
        "pattern": np.array(PATTERNS, dtype=object)[read.pattern],
        "tumour": read.tumour,
        "left_out_as": np.array((None, *LEFT_OUT), dtype=object)[read.selection.left_out],
        "compartment": np.array(COMPARTMENTS, dtype=object)[read.compartment],
        "completeness": read.mem.completeness, "longest_arc": read.mem.longest_arc, "longest_gap": read.mem.longest_gap,
        "membrane_od": read.mem.membrane_od, "contrast_od": read.mem.contrast_od, "neighbours_membrane": read.borrowed,
        "stained_sectors": pack_bits(read.mem.arcs).astype(np.int32),  # bit k: sector k (24 of 32 bits)
        "cytoplasm_dab_od": cells.cytoplasm_dab_od, "nucleus_dab_od": nucleus(cells.nucleus_dab_od),
        "width_um": cells.width_um, "cell_area_um2": cells.cell_area_um2,
        "nucleus_area_um2": cells.nucleus_area_um2, "nucleus_elongation": nucleus(cells.nucleus_elongation),
        "nucleus_width_um": nucleus(cells.nucleus_width_um),
        "hematoxylin_od": nucleus(cells.hematoxylin_od), "cut_sectors": cells.cut_sectors,
        "outline": Outlines([(p.outline_points, p.outline_sizes, p.outline_frame) for p in parts]),
    }


def _finish(scan: _Scan, config: ScoringConfig, cells: CellMeasurements, parts: list[TileResult]) -> SlideAnalysis:
    """The slide's result from its cells: read, counted, called by the guideline, fused with the CNN's reading."""
    read = _read_cells(scan, config, cells, parts)
    tumour = read.tumour
    counts = {name: int(np.sum(read.category[tumour] == i)) for i, name in enumerate(CATEGORIES)}
    n_tumour = int(tumour.sum())
    xy_um = np.column_stack([cells.x, cells.y])[tumour] * scan.mpp
    clusters = _largest_clusters(xy_um, LEVEL_OF_CATEGORY[read.category[tumour]], config.cluster_distance_um)
    qc = _qc(scan, config, parts, n_tumour, read.floor)
    notes = (*scan.notes, PANCREATIC_NOTE) if config.guideline == "gastric" else scan.notes
    classical = _guideline_call(counts, n_tumour, clusters, config, read)
    reported, confidence, classical_reason = classical, None, ""
    if scan.cnn_report is not None and n_tumour:
        reported, confidence = _fused_call(classical, scan.cnn_report, counts, n_tumour, clusters, config, read)
        classical_reason = classical.reason
    pct = {k: percent_value(100.0 * v / n_tumour) for k, v in counts.items()} if n_tumour else {}  # no cells: no shares
    result = SlideResult(
        slide=scan.path,
        score=reported.score,
        level=reported.level,
        flags=tuple(reported.flags),
        guideline=config.guideline,
        specimen=config.specimen,
        reason=reported.reason,
        counts=counts,
        percentages=pct,
        tumour_cells=n_tumour,
        h_score=None if reported.h_score is None else round(float(reported.h_score), 3),
        clusters=clusters,
        region=read.region_source,
        qc=tuple(qc),
        stains=scan.stains.to_dict(),
        mpp=scan.mpp,
        mpp_origin=scan.mpp_origin,
        slide_sample=scan.sample,
        tissue_area_mm2=round(scan.tissue.area_mm2, 4),
        classical_score=classical.score,
        cnn=scan.cnn_report,
        confidence=None if confidence is None else round(confidence, 4),
        notes=tuple(notes),
        config=config.to_dict(),
        version=__version__,
        classical_level=classical.level,
        staining=read.staining,
        classical_flags=tuple(classical.flags),
        classical_reason=classical_reason,
    )
    return SlideAnalysis(result, _cell_table(cells, read, parts), scan.thumb, scan.thumb_mpp, scan.tissue, scan.region)


def with_call_doubts(flags: tuple[str, ...], score: str, level: str, counts: dict, guideline: str, blush: float | None,
                     rise: float | None, *, filled: float | None = None,
                     false_membrane_percent: float = FALSE_MEMBRANE_PERCENT,
                     scan_mpp: float | None = None) -> tuple[tuple[str, ...], str]:
    """``flags`` plus the doubts a call at ``score`` and report ``level`` carries on the cells measured, and the words
    of each (to append to a reason): ``null_or_ultralow`` where false membranes alone could make it an ultralow
    (with_null_doubt), ``moderate_incomplete`` where a breast 1+ rests on weak-to-moderate incomplete membranes
    (with_incomplete_doubt), ``coarse_scan_zero`` where a 0 rests on a scan (``scan_mpp``) too coarse for faint
    membranes (with_coarse_doubt) and ``cytoplasmic_dab`` where the slide's staining says so (``blush``, ``rise``, ``filled``:
    tumour.with_cytoplasm_doubt). For the guideline's own call ``flags`` are its call's; for a score the rules did
    not make (a CNN's, or one fused with it), its level's own (level_flags)."""
    flags, doubt = with_null_doubt(flags, counts, level, percent=false_membrane_percent)
    flags, incomplete = with_incomplete_doubt(flags, counts, level, guideline)
    flags, coarse = with_coarse_doubt(flags, level, scan_mpp)
    flags, more = with_cytoplasm_doubt(flags, score, level, blush, rise, guideline=guideline, filled=filled)
    return flags, doubt + incomplete + coarse + more


def _near_sides(counts: dict, score: str, config: ScoringConfig, clusters: dict) -> list[tuple[str, float]]:
    """guidelines.near_cutoff_sides of ``score`` on ``counts`` under the slide's settings."""
    return near_cutoff_sides(counts, score, **near_cutoff_settings(config.guideline, config.specimen, clusters, config.to_dict()))


def _near_words(sides: list[tuple[str, float]], score: str, n_tumour: int, config: ScoringConfig) -> str:
    """The words a reason gets for the nearest of ``sides``: the share, its interval, the margins that make it near."""
    near = sides[0][1]
    lo, hi = wilson_ci(round(near * n_tumour / 100), n_tumour, NEAR_CUTOFF_CONFIDENCE)
    false = (f", and real unstained membranes read stained in up to {config.false_membrane_percent:g}% of cells"
             if score == "1+" and 10.0 + config.near_cutoff_points <= near < 10.0 + config.false_membrane_percent else "")
    # a share far from 10% is near it only by its interval, on few cells: "0.0% ... near the 10% cut-off" alarmed
    head = ("near the 10% cut-off" if abs(near - 10.0) < config.near_cutoff_points or false
            else "too few tumour cells to be sure of the 10% cut-off")
    here = [s for s, pct in sides if pct == near]
    up = any(SCORES.index(s) > SCORES.index(score) for s in here)  # a higher score's cells, not the call's own share
    return (f"; {head} ({percent_text(near)} of {n_tumour:,} tumour cells decide "
            + ("a higher score" if up else "it")
            + f", {NEAR_CUTOFF_CONFIDENCE:.0%} interval {percent_text(100 * lo)[:-1]}-{percent_text(100 * hi)}; the measurement's "
            f"own margin is {config.near_cutoff_points:g} points{false}): it could be {' or '.join(here)}")


def _no_tissue(slide: Slide) -> str:
    """Why a slide has no tissue: too small an image to hold a piece of MIN_TISSUE_UM2, or blank."""
    w, h = (d * slide.mpp for d in slide.dimensions)
    if w * h < MIN_TISSUE_UM2 or min(w, h) < MIN_TISSUE_UM2**0.5:  # too small, or a strip too narrow to hold the piece
        w, h = (f"{v:.0f}" if v >= 10 else f"{v:.2g}" for v in (w, h))  # a 1-px image is 0.5 µm, not "0"
        return (f"no tissue found: the image is only {w} x {h} µm at {slide.mpp:g} µm/px, and tissue is a piece of "
                f"at least {MIN_TISSUE_UM2:,.0f} µm² (check the µm/px, or give a larger field)")
    return f"no tissue found (blank, fully white or black slide, or only fragments under {MIN_TISSUE_UM2:,.0f} µm²)"


def _stain_compartments(slide_path: str, config: ScoringConfig, compartment: np.ndarray, floor: float, threshold: float) -> dict:
    """Where the slide's DAB lies (shares of the ``compartment`` codes given: the tumour cells'), and the membrane
    threshold used; refuses nuclear DAB (not a HER2 pattern)."""
    frac = {name: round(float(np.mean(compartment == i)), 4) for i, name in enumerate(COMPARTMENTS) if i}
    if frac["nucleus"] >= config.nuclear_stain_min and frac["nucleus"] >= config.nuclear_membrane_ratio * frac["membrane"]:
        raise NuclearStainError(slide_path, f"DAB is nuclear, not a membranous HER2 pattern: {percent_text(100 * frac['nucleus'])} "
                                            f"of tumour cells have DAB-stained nuclei, {percent_text(100 * frac['membrane'])} a "
                                            "stained membrane (a HER2 stain "
                                            f"leaves nuclei unstained: under {config.nuclear_membrane_ratio:g} x the membranes; "
                                            "a Ki67, ER or PR stain?); not scored", frac["membrane"])
    dominant = max(frac, key=frac.get) if max(frac.values()) > 0 else "none"
    return {"dab_floor_od": round(floor, 4), "membrane_threshold_od": round(threshold, 4),
            "compartment": dominant, "fractions": frac}


def _without_seam_twins(parts: list[TileResult], *, tolerance_px: float) -> list[TileResult]:
    """``parts`` less each cell that an earlier tile owns too (its anchor within ``tolerance_px`` level-0 px).
    Where the scan's µm/px is no whole multiple of the grid's, neighbouring tiles read a seam at different
    phases, and a cell on it can fall in both cores, its two anchors a fraction of a µm apart."""
    if len(parts) < 2:
        return parts
    xy = np.concatenate([p.label_xy[p.cells.label] for p in parts])
    tile = np.repeat(np.arange(len(parts)), [len(p.cells) for p in parts])
    pairs = pairs_within(xy, tolerance_px)
    pairs = pairs[tile[pairs[:, 0]] != tile[pairs[:, 1]]]
    if len(pairs) == 0:
        return parts
    twin = np.zeros(len(xy), bool)
    twin[pairs.max(axis=1)] = True  # the later tile's reading
    out, start = [], 0
    for p in parts:
        keep = ~twin[start : start + len(p.cells)]
        start += len(p.cells)
        out.append(p if keep.all() else replace(p, cells=p.cells.select(keep), outline_sizes=p.outline_sizes[keep],
                                                   outline_points=p.outline_points[np.repeat(keep, p.outline_sizes)]))
    return out


def _neighbour_rows(parts: list[TileResult], *, tolerance_px: float) -> Iterator[np.ndarray]:
    """Per tile, (cells it owns, N_SECTORS) int32: per sector, the row of the cell across the border (-1: none)
    among all the parts' cells in order.

    Each tile names its neighbours by label; a label is the slide's cell at its anchor (TileResult.label_xy,
    within ``tolerance_px`` level-0 px): the same cell for one the tile owns, the one the neighbouring tile
    measured for one in the tile's margin.
    """
    cells = np.concatenate([p.label_xy[p.cells.label] for p in parts])
    rows = nearest_within(cells, np.concatenate([p.label_xy for p in parts]), tolerance_px)  # -1 where NaN
    for p, row_of in zip(parts, np.split(rows.astype(np.int32), np.cumsum([len(p.label_xy) for p in parts])[:-1])):
        row_of[0] = -1
        yield row_of[p.cells.sector_neighbour]


def _qc(scan: _Scan, config: ScoringConfig, parts: list[TileResult], n_tumour: int, floor_od: float) -> list[QCFinding]:
    qc = []
    if scan.metadata_mpp is not None and not 1 / MPP_OVERRIDE_MAX <= scan.mpp / scan.metadata_mpp <= MPP_OVERRIDE_MAX:
        qc.append(QCFinding("mpp_overrides_metadata", "fail", f"scored at the {scan.mpp:.4g} µm/px given, {scan.mpp / scan.metadata_mpp:.2g} x "
                            f"the {scan.metadata_mpp:.4g} the file's metadata says: cell sizes, the tumour-cell rules and the "
                            "share stained depend on it (a 1+ field given half its µm/px read 0+); check which is right",
                            round(scan.mpp / scan.metadata_mpp, 4)))
    if scan.jpeg is not None and scan.jpeg[0] < JPEG_QUALITY_WARN:
        quality, source = scan.jpeg
        qc.append(QCFinding("jpeg_quality", "fail" if quality < JPEG_QUALITY_FAIL else "warn",
                            f"saved as JPEG at quality {quality} (from {source}): the compression's "
                            f"blocks read as faint membranes (real HER2 0 fields read up to 19% stained under quality "
                            f"{JPEG_QUALITY_FAIL}); give the scan as acquired, or a copy at quality {JPEG_QUALITY_WARN} or "
                            "more", float(quality)))
    if config.mpp > CALIBRATED_MPP:
        qc.append(QCFinding("coarse_target", "warn", f"scored at {config.mpp:g} µm/px, coarser than the {CALIBRATED_MPP:g} "
                            "µm/px its intensity bands were set at: faint (1+) membranes read weaker and fewer", config.mpp))
    if scan.mpp > config.max_scan_mpp:
        qc.append(QCFinding("coarse_scan", "fail", f"scanned at {scan.mpp:.3g} µm/px, coarser than the "
                            f"{config.max_scan_mpp:g} µm/px a ~1 µm membrane needs: faint (1+) staining cannot be told "
                            "from 0 (it needs 40x, Rüschoff 2010)", round(scan.mpp, 4)))
    elif scan.mpp > COARSE_SCAN_MPP:
        qc.append(QCFinding("intensity_read_low", "warn", f"scanned at {scan.mpp:.3g} µm/px, coarser than the "
                            f"{CALIBRATED_MPP:g} µm/px the intensity bands were set at: blurred membranes read weaker "
                            "(the real colon's intense complete share: 34% at 0.5 µm/px, 26% at 1.0)", round(scan.mpp, 4)))
    if floor_od >= config.thresholds.weak_od:
        qc.append(QCFinding("noisy_dab", "warn", f"the slide's DAB noise floor ({floor_od:.3f} OD) reaches weak staining: "
                            "faint membranes cannot be told from noise", round(floor_od, 4)))
    focus = np.array([p.focus for p in parts], np.float64)
    weights = np.array([p.tissue_px for p in parts], np.float64)
    ok = np.isfinite(focus)
    if ok.any():
        blurred = float(np.sum(weights[ok] * (focus[ok] < config.blur_min)) / max(weights[ok].sum(), 1))
        if blurred > 0.5:
            qc.append(QCFinding("out_of_focus", "fail", f"{blurred:.0%} of tissue is out of focus", round(blurred, 4)))
        elif blurred > 0.1:
            qc.append(QCFinding("out_of_focus", "warn", f"{blurred:.0%} of tissue is out of focus", round(blurred, 4)))
    if n_tumour < config.min_tumour_cells:
        qc.append(QCFinding("too_few_tumour_cells", "fail",
                            f"{n_tumour} tumour cells scored; at least {config.min_tumour_cells} are needed for a guideline call",
                            float(n_tumour)))
    bg_od = float(-np.log10(np.mean(scan.stains.background) / 255.0))
    if bg_od > config.background_max_od:
        rgb = ", ".join(f"{v:.0f}" for v in scan.stains.background)
        qc.append(QCFinding("background_stain", "warn", f"glass background reads RGB ({rgb}), OD {bg_od:.2f}: "
                            "dirty, over-stained or badly white-balanced background", round(bg_od, 4)))
    if scan.stains.background == (255.0, 255.0, 255.0) and (brightest := brightest_level(scan.thumb)) < GLASS_MIN:
        # estimate_background found too few glass pixels and took white as 255 (glass at 255 is found)
        od = float(np.log10(255.0 / max(brightest, 1.0)))
        qc.append(QCFinding("white_level_assumed", "warn", f"no glass found (fewer than {GLASS_MIN_PIXELS} pixels read "
                            f"{GLASS_MIN} or more in every channel; the brightest read {brightest:.0f}): white is taken "
                            f"as 255. If the image has glass, its optical densities read up to {od:.2f} too high and "
                            "the call may be wrong: include some glass, or correct the white balance", round(brightest, 1)))
    level, threshold = parts[0].nucleus.counterstain, parts[0].nucleus.threshold_od
    if level is None:
        qc.append(QCFinding("weak_counterstain", "warn", "weak counterstain: no nuclei found in the sampled tissue even "
                            "at half the nucleus thresholds: check the counterstain", 0.0))
    elif threshold < config.nucleus_threshold_od or level * COUNTERSTAIN_RATIO < config.nucleus_threshold_od:
        # thresholds lowered for its counterstain, or a slide the default ratio finds pale (never lowered at ratio 0)
        qc.append(QCFinding("weak_counterstain", "warn", f"weak counterstain: nuclear haematoxylin OD {level:.3f}; nuclei "
                            f"found from {threshold:.3f} OD (fixed: {config.nucleus_threshold_od:g}): check the overlay "
                            "for pale nuclei missed", round(level, 4)))
    pen, dark = int(scan.tissue.pen.sum()), int(scan.tissue.dark.sum())
    excluded = float((pen + dark) / max(int(scan.tissue.mask.sum()) + pen + dark, 1))
    if excluded > 0.005:
        qc.append(QCFinding("tissue_excluded", "warn" if excluded > 0.2 else "info", f"{excluded:.1%} of the stained area excluded as pen ink or dark debris", round(excluded, 4)))
    if scan.stain_chroma_deg < PALE_CHROMA_DEG:
        qc.append(QCFinding("pale_colours", "warn", f"pale stain colours: the most coloured 2% of stained pixels lie "
                            f"{scan.stain_chroma_deg:.1f}° from grey (real H-DAB scans here 22-31°; refused under "
                            f"{MIN_STAIN_CHROMA_DEG:g}°): a fading stain or a desaturated scan reads membranes weaker (the real colon at 0.65 x "
                            "its saturation, 16°, reads 16% of its cells strong complete against 34%)",
                            round(scan.stain_chroma_deg, 2)))
    if scan.eosin > config.eosin_fail:  # part H&E, or DAB of a colour no real DAB has: a pathologist looks first
        qc.append(QCFinding("eosin_like_colour", "fail", f"{scan.eosin:.0%} of the stained tissue has an eosin-like colour "
                            "(part of it H&E, or an unusual DAB): check the stain", round(scan.eosin, 4)))
    return qc


def score_slide(
    path: str | os.PathLike | Slide | np.ndarray,
    *,
    guideline: str | None = None,
    specimen: str | None = None,
    mpp: float | None = None,
    region: str | os.PathLike | Region | None = None,
    config: ScoringConfig | None = None,
    backend: str | None = None,
    workers: int = 1,
    cnn=None,
    default_mpp: float | None = None,
) -> SlideResult:
    """Score one slide (a path or an open Slide, e.g. ArraySlide) or field of view (also an RGB array, height x
    width x 3, uint8 or uint16, at ``mpp``): HER2 0/1+/2+/3+ by ``guideline``, with counts, QC and stains.

    ``guideline`` and ``specimen``, where given, override ``config``'s (default: breast-asco-cap-2023, resection).

    ``mpp`` (µm/px) overrides the file's (the result notes where they differ) and is needed where it has
    none, unless ``default_mpp`` is given: the µm/px of a file whose metadata gives none (an open Slide keeps the
    µm/px and reader it was opened with: ValueError where another is given beside one); ``region`` is a QuPath GeoJSON or mask image of the
    tumour, or a Region (default: detected epithelial cells);
    ``cnn``: a TileClassifier (``her2score.cnn.load_model()``) whose tile probabilities are reported and
    fused with the guideline score (default: none, the classical call alone; the CLI fuses the shipped
    model unless --no-cnn); ``backend`` forces a reader (slide.open_slide). Raises SlideError (naming the file)
    when the slide cannot be scored: unreadable, no µm/px, no tissue, or the wrong stain (H&E).
    """
    config = ScoringConfig() if config is None else config
    _check_config(config)
    config = replace(config, guideline=config.guideline if guideline is None else guideline,
                     specimen=config.specimen if specimen is None else specimen)
    return analyse_slide(path, config=config, mpp=mpp, region=region, backend=backend, workers=workers, cnn=cnn,
                         default_mpp=default_mpp).result
