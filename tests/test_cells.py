import cv2
import numpy as np

import pytest

from her2score.cells import (NucleusThresholds, counterstain_od, grow_cells, measure_nucleus_thresholds, membrane_basins,
                             nucleus_thresholds, segment_nuclei)


def disks(centres, radius_px, shape=(128, 128), od=0.5):
    img = np.zeros(shape, np.float32)
    for x, y in centres:
        cv2.circle(img, (x, y), radius_px, od, -1)
    return img


def test_segment_nuclei_counts_and_splits_touching():
    h = disks([(30, 30), (90, 30), (40, 90), (54, 90)], 8)  # last two touch
    labels = segment_nuclei(h, mpp=0.5)
    assert len(np.unique(labels)) - 1 == 4
    assert labels[30, 30] != labels[30, 90]
    assert labels[90, 36] != labels[90, 58]


def test_segment_nuclei_keeps_elongated_nuclei_whole():
    h = np.zeros((128, 128), np.float32)
    cv2.ellipse(h, (64, 64), (26, 9), 30, 0, 360, 0.5, -1)  # 26 x 9 µm columnar nucleus
    labels = segment_nuclei(h, mpp=0.5)
    assert len(np.unique(labels)) - 1 == 1


def test_segment_nuclei_ignores_thin_lines_small_objects_and_raised_background():
    h = disks([(30, 30)], 8, od=0.5) + disks([(90, 30)], 1, od=0.6)
    h[:, 100:102] += 0.5  # a 1 µm line: a membrane or fibre
    h[64:, :] += 0.12  # haematoxylin leaking into a brown cytoplasm: a raised plateau, no nucleus
    labels = segment_nuclei(h, mpp=0.5)
    assert labels[30, 30] > 0
    assert labels[30, 90] == 0 and labels[40, 101] == 0 and labels[100, 40] == 0
    assert len(np.unique(labels)) - 1 == 1


def test_segment_nuclei_finds_brown_nuclei_by_their_dab():
    h = disks([(30, 30)], 8, od=0.5)
    dab = disks([(90, 90)], 8, od=0.9)  # a Ki67-positive nucleus: DAB hides its haematoxylin
    dab[:, 60:62] += 0.9  # a membrane is not a nucleus
    labels = segment_nuclei(h, dab, mpp=0.5)
    assert labels[30, 30] > 0 and labels[90, 90] > 0
    assert labels[30, 61] == 0
    assert len(np.unique(labels)) - 1 == 2


def test_nucleus_thresholds_fall_only_with_a_counterstain_paler_than_their_own_level():
    def pair(level, **kw):
        t = nucleus_thresholds(level, **kw)
        return t.threshold_od, t.contrast_od

    assert pair(None) == pair(0.5) == pair(0.10 / 0.85) == pair(0.08, ratio=0) == (0.10, 0.05)
    assert pair(0.08) == pytest.approx((0.068, 0.034))  # 0.85 x 0.08
    assert pair(0.01) == pair(0.0) == pytest.approx((0.05, 0.025))  # never under half
    assert nucleus_thresholds(0.08).counterstain == 0.08


def _pale_nuclei(od: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    rng = np.random.default_rng(0)
    centres = [(x, y) for x in range(16, 128, 24) for y in range(16, 128, 24)]
    return disks(centres, 6, od=od) + rng.normal(0, 0.005, (128, 128)).astype(np.float32), centres


def test_the_counterstain_level_is_that_of_pale_and_dark_nuclei_alike():
    """The median over nuclei found at the least thresholds: a field of pale nuclei has their level,
    where a fixed 0.10 OD threshold finds none of them."""
    pale, centres = _pale_nuclei(0.08)
    dark, _ = _pale_nuclei(0.16)
    def level(tiles):
        return counterstain_od(tiles, mpp=0.5, threshold_od=0.05, contrast_od=0.025)

    assert level([pale]) == pytest.approx(0.08, abs=0.005)
    assert level([pale]) < level([pale, dark, pale]) < level([dark, pale, dark]) < level([dark])  # pooled: every tile weighs in
    assert segment_nuclei(pale, mpp=0.5).max() == 0
    nucleus = measure_nucleus_thresholds([pale], mpp=0.5)
    assert nucleus.counterstain == pytest.approx(0.08, abs=0.005) and nucleus.threshold_od < 0.07
    found = segment_nuclei(pale, mpp=0.5, threshold_od=nucleus.threshold_od, contrast_od=nucleus.contrast_od)
    at_centres = found[tuple(np.array(centres)[:, ::-1].T)]
    assert (at_centres > 0).all() and len(np.unique(at_centres)) == len(centres)
    glass = measure_nucleus_thresholds([np.zeros((128, 128), np.float32)], mpp=0.5)
    assert glass.counterstain is None and glass.threshold_od == 0.10
    fixed = measure_nucleus_thresholds([pale], mpp=0.5, ratio=0)  # measured, not applied
    assert fixed == NucleusThresholds(nucleus.counterstain, 0.10, 0.05)
    assert nucleus_thresholds(0.05, threshold_od=0.0) == NucleusThresholds(0.05, 0.0, 0.05)  # no division by a 0 threshold


def test_grow_cells_bounded_and_split_on_membrane():
    nuclei = np.zeros((100, 100), np.int32)
    cv2.circle(nuclei, (30, 50), 6, 1, -1)
    cv2.circle(nuclei, (60, 50), 6, 2, -1)
    membrane = np.zeros((100, 100), np.float32)
    membrane[:, 41:43] = 1.0  # a vertical membrane off the midpoint (45)
    cells = grow_cells(nuclei, membrane, mpp=0.5, max_radius_um=8)
    assert cells[50, 40] == 1 and cells[50, 44] == 2  # the split follows the membrane, not the midpoint
    assert cells[5, 5] == 0  # beyond 8 µm (16 px) of any nucleus
    ys, xs = np.nonzero(cells == 1)
    assert np.hypot(xs - 30, ys - 50).max() <= 6 + 16 + 1.5


def test_membrane_rings_without_a_visible_nucleus_become_cells():
    """Strong staining can hide a nucleus; a closed membrane ring of a cell's size still makes a cell."""
    membrane = np.zeros((120, 120), np.uint8)
    cv2.circle(membrane, (35, 60), 12, 1, 2)  # 12 µm ring, no nucleus inside
    cv2.circle(membrane, (85, 60), 12, 1, 2)  # ring around a detected nucleus
    cv2.circle(membrane, (60, 20), 40, 1, 2)  # too large for a cell
    nuclei = np.zeros((120, 120), np.int32)
    cv2.circle(nuclei, (85, 60), 5, 1, -1)
    basins = membrane_basins(membrane > 0, nuclei, mpp=0.5)
    assert basins[60, 35] and not basins[60, 85] and not basins[20, 60]
    cells = grow_cells(nuclei, membrane.astype(np.float32), mpp=0.5, basins=basins)
    assert cells[60, 35] > 0 and cells[60, 35] != cells[60, 85]


def test_flood_markers_take_what_covers_half_of_each_flood_pixel_whatever_the_orientation():
    """grow_cells' 1 µm flood grid: a flood pixel is a seed's where seeds cover half of it (2 of its 4 image pixels at
    0.5 µm/px), the outside's where that does, else to be flooded; the largest seed label in it. Mirrored or turned,
    the markers are the mirrored or turned markers (taking the first image pixel of each was not: a half-pixel pull
    up and left). At 0.4 µm/px (2.5 image pixels a flood pixel) each seed flood pixel's label lies in its footprint."""
    from her2score.cells import _flood_markers

    out = 99
    m = np.zeros((4, 6), np.int32)
    m[0, 0] = 5  # 1 of 4: flooded
    m[0:2, 2] = 7  # 2 of 4: the seed
    m[2:4, 0:2] = [[3, 8], [3, 0]]  # two seeds: the larger label
    m[2, 2:4] = out  # the outside on half
    m[3, 4:6] = out
    m[2, 4] = 6  # a seed on a quarter beside the outside's half: the outside
    assert _flood_markers(m, (3, 2), out).tolist() == [[0, 7, 0], [8, out, out]]
    rng = np.random.default_rng(3)
    field = np.zeros((64, 96), np.int32)
    for label, (y, x) in enumerate(rng.integers(4, 60, (40, 2)), start=1):
        cv2.circle(field, (int(x) + 16, int(y)), int(rng.integers(2, 6)), label, -1)
    field[:, 88:] = out
    flood = _flood_markers(field, (48, 32), out)
    for turn in (lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: np.rot90(a, 2)):
        assert np.array_equal(_flood_markers(np.ascontiguousarray(turn(field)), (48, 32), out), turn(flood))
    odd = np.pad(field, ((0, 1), (0, 4)), constant_values=out)[:65, :100]  # 65 x 100 image px -> 26 x 40 flood px
    coarse = _flood_markers(odd, (40, 26), out)
    for r, c in zip(*np.nonzero((coarse > 0) & (coarse != out))):
        footprint = odd[int(r * 2.5) : int(np.ceil((r + 1) * 2.5)), int(c * 2.5) : int(np.ceil((c + 1) * 2.5))]
        assert coarse[r, c] in footprint
