import cv2
import numpy as np
import pytest

from her2score import membrane
from her2score.cells import grow_cells
from her2score.membrane import (N_SECTORS, measure_cells, membrane_contrast, noise_floor, stained_by_neighbours,
                                summarise_membranes)
from her2score.pipeline import ScoringConfig, score_tile
from her2score.stain import H_DAB
from her2score.synthetic import generate_field
from her2score.tissue import Tile

MPP = 0.5


def cell_with_arc(fraction: float, od: float, *, start_deg: float = 0.0, width_px: int = 2, background_od: float = 0.0):
    """One round cell (radius 14 px = 7 µm) with a DAB membrane arc covering ``fraction`` of it, on a uniform DAB level."""
    nuclei = np.zeros((64, 64), np.int32)
    cv2.circle(nuclei, (32, 32), 6, 1, -1)
    dab = np.full((64, 64), background_od, np.float32)
    if fraction > 0:
        cv2.ellipse(dab, (32, 32), (14, 14), 0, start_deg, start_deg + 360 * fraction, background_od + float(od), width_px)
    return nuclei, dab


def measure(nuclei, dab, threshold=0.025):
    smooth, contrast = membrane_contrast(dab, nuclei, mpp=MPP)
    cells = grow_cells(nuclei, contrast, mpp=MPP, max_radius_um=9)
    m, hist, _ = measure_cells(cells, nuclei, np.zeros_like(dab), smooth, contrast, mpp=MPP)
    return m, summarise_membranes(m, threshold_od=threshold), hist


def test_contrast_is_high_on_lines_and_zero_on_tint_and_blobs():
    img = np.full((96, 96), 0.05, np.float32)  # a uniform tint
    img[:, 30:32] += 0.4  # a 1 µm membrane
    cv2.circle(img, (70, 48), 8, 0.8, -1)  # a brown nucleus, 8 µm across
    _, contrast = membrane_contrast(img, mpp=MPP)
    assert contrast[48, 31] > 0.2
    assert contrast[48, 10] < 1e-3
    assert contrast[48, 70] < 0.02


def test_contrast_ignores_cytoplasm_between_unstained_nuclei():
    """A stained cytoplasm squeezed between two unstained nuclei is not a membrane once the nuclei are known."""
    nuclei = np.zeros((64, 96), np.int32)
    cv2.circle(nuclei, (34, 32), 9, 1, -1)
    cv2.circle(nuclei, (58, 32), 9, 2, -1)  # a 3 µm rim of cytoplasm between them
    dab = np.where(nuclei > 0, 0.0, 0.3).astype(np.float32)
    _, blind = membrane_contrast(dab, mpp=MPP)
    _, aware = membrane_contrast(dab, nuclei, mpp=MPP)
    assert blind[32, 46] > 0.1  # the rim between the nuclei looks like a ridge
    assert aware[32, 46] < 0.03


# A sector partly covered counts as stained, and smoothing lengthens an arc by ~1 px at each
# end: a drawn arc reads up to ~1.5 sectors longer per end, never shorter.
ARC_END = 1.5 / N_SECTORS


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_completeness_follows_the_drawn_arc(fraction):
    m, s, _ = measure(*cell_with_arc(fraction, 0.6))
    assert len(m) == 1
    assert fraction - 0.05 <= s.completeness[0] <= min(1.0, fraction + 2 * ARC_END + 0.01)
    if fraction:
        assert s.longest_arc[0] == pytest.approx(s.completeness[0])
        assert s.longest_gap[0] == pytest.approx(1 - s.completeness[0])  # one arc leaves one gap
        assert s.membrane_od[0] > 0.25


def test_a_uniform_tint_is_not_a_membrane():
    m, s, hist = measure(*cell_with_arc(0.0, 0.0, background_od=0.03))
    assert s.completeness[0] == 0
    assert noise_floor(hist) == pytest.approx(0.02)  # nothing above the minimum floor


def test_intensity_increases_with_deposit():
    ods = [measure(*cell_with_arc(1.0, od))[1].membrane_od[0] for od in (0.15, 0.4, 1.0)]
    assert ods[0] < ods[1] < ods[2]


def test_disjoint_arcs_have_short_longest_arc():
    nuclei, dab = cell_with_arc(0.2, 0.6, start_deg=0)
    _, dab2 = cell_with_arc(0.2, 0.6, start_deg=180)
    _, s, _ = measure(nuclei, np.maximum(dab, dab2))
    assert 0.35 <= s.completeness[0] <= 0.4 + 4 * ARC_END + 0.01
    assert s.longest_arc[0] <= 0.2 + 2 * ARC_END + 0.01


def test_threshold_and_cytoplasm_decide_the_stained_sectors():
    m, weak, _ = measure(*cell_with_arc(1.0, 0.05))
    assert weak.completeness[0] > 0.9
    assert summarise_membranes(m, threshold_od=0.2).completeness[0] == 0  # a slide whose noise floor is higher
    m, _, _ = measure(*cell_with_arc(1.0, 0.05, background_od=0.3))  # the same membrane over a brown cytoplasm
    blush = summarise_membranes(m, threshold_od=0.025, cytoplasm_base_od=0.0)
    assert blush.completeness[0] == 0  # not clearly darker than the blush


def test_a_membrane_runs_on_behind_a_nucleus_touching_the_border():
    """Sectors without a border band (the nucleus reaches the border) neither break a stained arc
    nor count as stained: a U whose middle lies behind the nucleus stays one U."""
    from dataclasses import replace

    m, full, _ = measure(*cell_with_arc(0.45, 0.6, start_deg=200))  # an arc over sectors ~1-12
    sc = m.sector_contrast.astype(np.float32)
    stained = np.flatnonzero(sc[0] >= 0.025)
    assert np.all(np.diff(stained) == 1) and 9 <= len(stained) <= 14  # one arc, not wrapping past sector 0
    middle = stained[len(stained) // 2 - 1: len(stained) // 2 + 1]  # two sectors in the middle of the arc
    hidden = sc.copy()
    hidden[0, middle] = np.nan
    m2 = replace(m, sector_contrast=hidden.astype(np.float16), sector_od=np.where(np.isnan(hidden), np.nan, m.sector_od).astype(np.float16))
    s2 = summarise_membranes(m2, threshold_od=0.025)
    assert s2.longest_arc[0] == pytest.approx(full.longest_arc[0])
    assert s2.completeness[0] == pytest.approx((len(stained) - 2) / (N_SECTORS - 2), abs=1 / N_SECTORS)
    edge = stained[:2]  # at the end of the arc: the unknown sectors are not bridged
    hidden = sc.copy()
    hidden[0, edge] = np.nan
    m3 = replace(m, sector_contrast=hidden.astype(np.float16), sector_od=np.where(np.isnan(hidden), np.nan, m.sector_od).astype(np.float16))
    assert summarise_membranes(m3, threshold_od=0.025).longest_arc[0] < full.longest_arc[0]


def test_a_ring_the_images_edge_cuts_is_read_on_what_is_seen():
    """A stained ring cut by the image's edge (the right third of the cell beyond it): the cell stops at the
    edge, the sectors the edge hides are unknown (counted, not stained), and the seen ring reads as one arc
    (no gap but the cut and where the ring leaves the image): complete; a cell away from the edge has none."""
    nuclei, dab = cell_with_arc(1.0, 0.6)
    outside = np.zeros(nuclei.shape, bool)
    outside[:, 40:] = True  # the image ends 8 px (4 µm) right of the cell's centre
    dab[outside] = 0.0  # read beyond the image: white glass
    smooth, contrast = membrane_contrast(dab, nuclei, mpp=MPP)
    cells = grow_cells(nuclei, contrast, mpp=MPP, max_radius_um=9, outside=outside)
    assert not cells[outside].any()
    m, _, _ = measure_cells(cells, nuclei, np.zeros_like(dab), smooth, contrast, mpp=MPP, outside=outside)
    s = summarise_membranes(m, threshold_od=0.025)
    cut = int(m.cut_sectors[0])
    assert 4 <= cut <= 8 and (~np.isfinite(m.sector_contrast[0].astype(np.float32))).sum() == cut  # measured: 4
    # the sectors seen are stained but for at most the one at each end of the cut, where the ring leaves the
    # image (measured: both, symmetrically, 18 of 20)
    assert (N_SECTORS - cut - 2) / N_SECTORS <= s.completeness[0] <= (N_SECTORS - cut) / N_SECTORS
    # the arc runs on across what the edge hides, or where the sector at each end of the cut reads unstained (the ring
    # leaves the image there: measured, both), the gap is the cut and those two, under the lateral gap: still complete
    assert s.longest_gap[0] <= (cut + 2) / N_SECTORS and s.longest_arc[0] >= 0.7
    from her2score.categories import PATTERNS, classify_cells

    _, pattern = classify_cells(s.completeness, s.longest_arc, s.longest_gap, s.membrane_od)
    assert PATTERNS[pattern[0]] == "complete"
    whole, _, _ = measure_cells(grow_cells(nuclei, contrast, mpp=MPP, max_radius_um=9), nuclei, np.zeros_like(dab), smooth,
                             contrast, mpp=MPP)
    assert whole.cut_sectors[0] == 0  # read without the edge: every sector a border sector, no cut


def test_intensity_is_read_along_an_arcs_body_not_its_tapering_ends():
    """An intense arc whose end sectors taper off reads the OD of its body; a complete ring (no ends)
    reads the mean of all its sectors; the shortest arc (three sectors) reads its middle one."""
    from her2score.membrane import CellMeasurements

    def summary(od_row):
        od = np.asarray([od_row], np.float32)
        one = np.ones(1, np.float32)
        m = CellMeasurements(label=np.ones(1, np.int32), x=one, y=one, cell_area_um2=one, nucleus_area_um2=one,
                             nucleus_elongation=one, nucleus_width_um=one, hematoxylin_od=one, nucleus_dab_od=0 * one,
                             cytoplasm_dab_od=0 * one, width_um=one, sector_contrast=np.where(od > 0, od, 0).astype(np.float16),
                             sector_od=od.astype(np.float16), sector_neighbour=np.zeros((1, N_SECTORS), np.int32),
                             cut_sectors=np.zeros(1, np.int8))
        return summarise_membranes(m, threshold_od=0.05)

    arc = np.zeros(N_SECTORS)
    arc[3:11] = [0.2, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.2]  # 8 sectors, the two ends at 0.2
    s = summary(arc)
    assert s.completeness[0] == pytest.approx(8 / N_SECTORS)
    assert s.membrane_od[0] == pytest.approx(0.7, abs=1e-3)  # (the mean of all 8 would be 0.575)
    ring = np.full(N_SECTORS, 0.4)
    ring[::2] = 0.6
    assert summary(ring).membrane_od[0] == pytest.approx(0.5, abs=1e-3)
    short = np.zeros(N_SECTORS)
    short[5:7] = 0.3
    short[7] = 0.9  # three sectors: the middle one is the body
    assert summary(short).membrane_od[0] == pytest.approx(0.3, abs=1e-3)


def test_summaries_taken_in_blocks_equal_one_pass(monkeypatch):
    """A slide's cells are summarised a block at a time; every per-cell result equals one pass over them all."""
    f = generate_field("2+", seed=31)
    h, w = f.image.shape[:2]
    m = score_tile(f.image, Tile(row=0, col=0, core=(0, 0, w, h), margin=0), stains=H_DAB, config=ScoringConfig(),
                   scale=1.0).cells
    whole = summarise_membranes(m, threshold_od=0.03, cytoplasm_base_od=0.02)
    monkeypatch.setattr(membrane, "SUMMARY_BLOCK", 7)
    blocks = summarise_membranes(m, threshold_od=0.03, cytoplasm_base_od=0.02)
    assert len(m) > 100 and whole.stained.any() and (whole.completeness > 0.5).any()
    for k in whole.__dataclass_fields__:
        assert np.array_equal(getattr(whole, k), getattr(blocks, k)), k


def test_noise_floor_is_a_quantile_of_the_interior_histogram():
    from her2score.membrane import CONTRAST_BINS

    values = np.random.default_rng(0).uniform(0, 0.1, 100_000)
    hist = np.histogram(values, CONTRAST_BINS)[0]
    assert noise_floor(hist, quantile=0.99) == pytest.approx(0.099, abs=0.003)
    assert noise_floor(np.zeros_like(hist)) == 0.02


def test_measurements_do_not_mutate_inputs():
    nuclei, dab = cell_with_arc(0.5, 0.6)
    before = (nuclei.copy(), dab.copy())
    measure(nuclei, dab)
    assert np.array_equal(nuclei, before[0]) and np.array_equal(dab, before[1])


def test_measurements_take_arrays_in_any_memory_order():
    """Column-major (Fortran-order) inputs read as row-major ones (an in-place OpenCV call refused them)."""
    nuclei, dab = cell_with_arc(0.5, 0.6)
    smooth, contrast = membrane_contrast(dab, nuclei, mpp=MPP)
    cells = grow_cells(nuclei, contrast, mpp=MPP, max_radius_um=9)
    h = np.zeros_like(dab)
    m, hist, _ = measure_cells(cells, nuclei, h, smooth, contrast, mpp=MPP)
    f = np.asfortranarray
    mf, histf, _ = measure_cells(f(cells), f(nuclei), f(h), f(smooth), f(contrast), mpp=MPP)
    np.testing.assert_array_equal(mf.sector_od, m.sector_od)
    np.testing.assert_array_equal(mf.sector_contrast, m.sector_contrast)
    np.testing.assert_array_equal(histf, hist)


def test_brown_nucleus_is_not_membrane():
    """Nuclear pixels are never in a cell's membrane band: a Ki67-positive nucleus leaves the membrane unstained."""
    nuclei, dab = cell_with_arc(0.0, 0.0)
    dab[nuclei > 0] = 0.9
    m, s, _ = measure(nuclei, dab)
    assert s.completeness[0] == 0
    assert m.nucleus_dab_od[0] > 0.5


def test_each_sector_names_the_cell_across_its_border():
    """Two cells side by side on glass: the sectors of each that face the other name it, those facing glass name none."""
    cells = np.zeros((40, 70), np.int32)
    cells[10:30, 10:35] = 1
    cells[10:30, 35:60] = 2
    zero = np.zeros(cells.shape, np.float32)
    m, _, _ = measure_cells(cells, np.zeros_like(cells), zero, zero, zero, mpp=MPP)
    right, left = N_SECTORS // 2, 0  # sectors count from the left, clockwise on the image
    assert m.sector_neighbour.dtype == np.int32 and m.sector_neighbour.shape == (2, N_SECTORS)
    assert m.sector_neighbour[0, right] == 2 and m.sector_neighbour[1, left] == 1
    assert m.sector_neighbour[0, left] == 0 and m.sector_neighbour[1, right] == 0
    assert set(np.unique(m.sector_neighbour[0])) == {0, 2}


def test_stained_by_neighbours_needs_every_stained_sector_beside_an_enclosing_cell():
    """Cell 0 is stained only on its border with an enclosing cell and two sectors past it: that
    stain may be the neighbour's. Cell 1 is stained a third sector past it, cell 2 also where it
    faces glass, cell 3 borders no enclosing cell, cell 4 is unstained: none of those qualifies."""
    stained = np.zeros((5, N_SECTORS), bool)
    beside = np.zeros((5, N_SECTORS), bool)
    beside[[0, 1, 2, 4], 10:14] = True
    stained[0, 8:16] = True  # two sectors beyond the shared border at each end
    stained[1, 7:14] = True
    stained[2, 10:20] = True  # and on along the glass
    stained[3, 10:14] = True
    assert stained_by_neighbours(stained, beside).tolist() == [True, False, False, False, False]
    assert not stained_by_neighbours(stained, beside, reach=1)[0]  # the line's bend is its own
    assert stained_by_neighbours(stained, beside, reach=3)[1]


def test_measuring_a_core_measures_its_cells_as_the_whole_image_does():
    """measure_cells with ``core`` gives exactly the whole image's measurements of the cells anchored in the
    core (their nucleus's centroid there), no others, the anchors of every label, and an interior histogram
    of those cells only (on scikit-image's real colon IHC field, its cells grown as a tile grows them)."""
    from skimage.data import immunohistochemistry

    from her2score.cells import segment_nuclei
    from her2score.stain import deconvolve

    hed = deconvolve(immunohistochemistry()[256:512, :320], H_DAB)
    nuclei = segment_nuclei(hed[..., 0], hed[..., 1], mpp=MPP)
    smooth, contrast = membrane_contrast(hed[..., 1], nuclei, mpp=MPP)
    cells = grow_cells(nuclei, contrast, mpp=MPP, max_radius_um=9)
    whole, whole_hist, anchors = measure_cells(cells, nuclei, hed[..., 0], smooth, contrast, mpp=MPP)
    core = (60, 40, 150, 120)
    part, part_hist, part_anchors = measure_cells(cells, nuclei, hed[..., 0], smooth, contrast, mpp=MPP, core=core)
    ax, ay = anchors[whole.label].T
    inside = (ax >= 60) & (ax < 210) & (ay >= 40) & (ay < 160)
    assert 15 < inside.sum() < len(whole) - 15
    for name in whole.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[inside], err_msg=name)
    np.testing.assert_array_equal(part_anchors, anchors)
    assert np.isfinite(anchors[whole.label]).all() and len(anchors) == cells.max() + 1
    for lab, x, y, n in zip(whole.label, ax, ay, whole.nucleus_area_um2):  # the nucleus's centroid, else the cell's
        rows, cols = np.nonzero((nuclei > 0) & (cells == lab) if n > 0 else cells == lab)
        assert (x, y) == pytest.approx((cols.mean(), rows.mean()), abs=1e-3)
    assert 0 < part_hist.sum() < whole_hist.sum() and (part_hist <= whole_hist).all()
    none, none_hist, _ = measure_cells(cells, nuclei, hed[..., 0], smooth, contrast, mpp=MPP, core=(0, 0, 1, 1))
    assert len(none) == 0 and none_hist.sum() == 0  # a core no cell is anchored in: an empty table of the same types
    assert {k: getattr(none, k).dtype for k in none.__dataclass_fields__} == {k: getattr(whole, k).dtype for k in whole.__dataclass_fields__}


def _blurred_nuclei(shapes, od: float = 0.6, sigma_um: float = 0.5):
    """A haematoxylin OD image (0.5 µm/px) of filled ellipses ((x, y), (semi-axes px), angle) at ``od``, blurred as
    an optical system blurs (Gaussian of ``sigma_um``), with the cytoplasm's faint haematoxylin around them."""
    h = np.full((120, 160), 0.04, np.float32)
    for centre, axes, angle in shapes:
        cv2.ellipse(h, centre, axes, angle, 0, 360, od + 0.04, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(h, (0, 0), sigma_um / MPP)


@pytest.mark.parametrize("od", [0.3, 0.6, 0.9])
def test_a_nucleus_is_measured_by_its_core_at_its_own_size_whatever_its_darkness(od):
    """The nuclear mask, cut at a fixed OD far out in a blurred nucleus's edge, reads a lymphocyte 3 µm in radius
    (28.3 µm²) and a fibroblast 3 µm wide well over their size (41-55 µm², 4.9-5.9 µm), the more so the darker they
    are; their cores (the pixels at half their own peak or more over their level) read them near it (30.3 µm², 3.6 µm),
    and alike at any darkness."""
    from her2score.cells import segment_nuclei

    h = _blurred_nuclei([((40, 60), (6, 6), 0), ((110, 60), (24, 3), 25)], od=od)  # semi-axes 3 x 3 and 12 x 1.5 µm
    nuclei, rise = segment_nuclei(h, mpp=MPP, return_rise=True)
    assert nuclei.max() == 2 and rise.shape == h.shape and rise.dtype == np.float32
    cells = grow_cells(nuclei, np.zeros_like(h), mpp=MPP, max_radius_um=4)
    m, _, _ = measure_cells(cells, nuclei, h, np.zeros_like(h), np.zeros_like(h), mpp=MPP, rise=rise)
    round_, spindle = np.argsort(m.nucleus_elongation)
    mask_area = np.bincount(nuclei.ravel())[1:] * MPP**2
    drawn = np.pi * (6 * MPP) ** 2
    assert abs(m.nucleus_area_um2[round_] / drawn - 1) < 0.25 < mask_area[nuclei[60, 40] - 1] / drawn - 1
    ys, xs = np.nonzero(nuclei == nuclei[60, 110])
    mask_width = 4 * np.sqrt(np.linalg.eigvalsh(np.cov(np.vstack([xs, ys])))[0]) * MPP
    assert 2.5 < m.nucleus_width_um[spindle] < 4.0 < 4.5 < mask_width and m.nucleus_elongation[spindle] > 5
    # without the rise, measure_cells reads the haematoxylin's own (no brown nuclei here): the same
    alone, _, _ = measure_cells(cells, nuclei, h, np.zeros_like(h), np.zeros_like(h), mpp=MPP)
    assert np.allclose(alone.nucleus_area_um2, m.nucleus_area_um2) and np.allclose(alone.nucleus_width_um, m.nucleus_width_um)


@pytest.mark.xfail(strict=True, reason="measured (6 Dec 2026, 0.5.0): the spindle's tip is seeded apart from its body in "
                   "22 of the 108 (angle, darkness) pairs; with OpenCV's elliptical kernel as often (32 of 432 spindles of three "
                   "widths each way); joining seeds with no neck between them merged the real colon's touching nuclei (399 to "
                   "333-390): not adopted")
def test_a_spindle_is_one_nucleus_at_any_angle():
    """A fibroblast-like nucleus (12 x 1.5 µm semi-axes) turned every 5 degrees, light to dark: one nucleus each.
    Its split at a neck's test (the core within 0.85 of its local maximum over 3 µm) can seed its tapering tip
    apart, the angle deciding how the pixels fall (the test above draws it at 25 degrees, where they do not)."""
    from her2score.cells import segment_nuclei

    split = [(angle, od) for angle in range(0, 180, 5) for od in (0.3, 0.6, 0.9)
             if segment_nuclei(_blurred_nuclei([((110, 60), (24, 3), angle)], od=od), mpp=MPP).max() != 1]
    assert not split, split


def test_a_nucleus_standing_nowhere_above_its_level_keeps_its_whole_mask():
    """A nuclear label whose OD does not rise over its level (a flat patch) is measured on all its pixels, never read
    as no nucleus; a one-pixel core still has a size."""
    labels = np.zeros((40, 40), np.int32)
    labels[10:20, 10:20] = 1
    labels[30, 30] = 2
    flat = np.zeros((40, 40), np.float32)
    peak = np.zeros((40, 40), np.float32)
    peak[30, 30] = 1.0
    cells = labels.copy()
    m, _, _ = measure_cells(cells, labels, flat, flat, flat, mpp=MPP, rise=np.where(labels == 1, 0.0, peak).astype(np.float32))
    assert m.nucleus_area_um2.tolist() == [100 * MPP**2, MPP**2]
