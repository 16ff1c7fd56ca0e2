import cv2
import numpy as np
import pytest

from her2score.categories import CATEGORIES, PATTERNS, Thresholds, classify_cells
from her2score.cells import grow_cells
from her2score.membrane import N_SECTORS, measure_cells, membrane_mask, ridge_filter

MPP = 0.5


def cell_with_arc(fraction: float, od: float, *, start_deg: float = 0.0, width_px: int = 2):
    """One round cell (radius 14 px = 7 µm) with a DAB membrane arc covering ``fraction`` of it."""
    nuclei = np.zeros((64, 64), np.int32)
    cv2.circle(nuclei, (32, 32), 6, 1, -1)
    dab = np.zeros((64, 64), np.float32)
    if fraction > 0:
        cv2.ellipse(dab, (32, 32), (14, 14), 0, start_deg, start_deg + 360 * fraction, float(od), width_px)
    return nuclei, dab


def measure(nuclei, dab, faint=0.035):
    g, ridge = ridge_filter(dab, mpp=MPP)
    cells = grow_cells(nuclei, ridge, mpp=MPP, max_radius_um=9)
    mem = membrane_mask(g, ridge, nuclei, faint_od=faint, mpp=MPP)
    return measure_cells(cells, nuclei, np.zeros_like(dab), g, mem, mpp=MPP)


def test_ridge_filter_prefers_lines_to_haze():
    img = np.full((64, 64), 0.3, np.float32)
    img[:, 30:32] += 0.4
    g, ridge = ridge_filter(img, mpp=MPP)
    assert ridge[32, 31] > 0.05
    assert ridge[32, 10] < 1e-3


# A sector partly covered counts as stained, and smoothing lengthens an arc by ~1 px at each
# end: a drawn arc reads up to ~1.25 sectors longer per end, never shorter.
ARC_END = 1.25 / N_SECTORS


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_completeness_follows_the_drawn_arc(fraction):
    m = measure(*cell_with_arc(fraction, 0.6))
    assert len(m) == 1
    assert fraction - 0.02 <= m.completeness[0] <= min(1.0, fraction + 2 * ARC_END + 0.01)
    if fraction:
        assert m.longest_arc[0] == pytest.approx(m.completeness[0])
        assert m.longest_gap[0] == pytest.approx(1 - m.completeness[0])  # one arc leaves one gap
        assert m.membrane_od[0] > 0.25


def test_intensity_increases_with_deposit():
    ods = [measure(*cell_with_arc(1.0, od)).membrane_od[0] for od in (0.15, 0.4, 1.0)]
    assert ods[0] < ods[1] < ods[2]


def test_disjoint_arcs_have_short_longest_arc():
    nuclei, dab = cell_with_arc(0.2, 0.6, start_deg=0)
    _, dab2 = cell_with_arc(0.2, 0.6, start_deg=180)
    m = measure(nuclei, np.maximum(dab, dab2))
    assert 0.38 <= m.completeness[0] <= 0.4 + 4 * ARC_END + 0.01
    assert m.longest_arc[0] <= 0.2 + 2 * ARC_END + 0.01


def test_measurements_do_not_mutate_inputs():
    nuclei, dab = cell_with_arc(0.5, 0.6)
    before = (nuclei.copy(), dab.copy())
    measure(nuclei, dab)
    assert np.array_equal(nuclei, before[0]) and np.array_equal(dab, before[1])


def test_classify_cells_categories_and_patterns():
    t = Thresholds()
    completeness = np.array([0.0, 0.35, 0.95, 0.95, 0.65, 0.65, 1.0, 0.35, 0.7])
    arc = np.array([0.0, 0.35, 0.95, 0.95, 0.65, 0.65, 1.0, 0.1, 0.3])
    gap = np.array([1.0, 0.65, 0.05, 0.05, 0.35, 0.35, 0.0, 0.3, 0.1])
    od = np.array([0.0, 0.3, 0.3, 0.9, 0.3, 0.9, 0.05, 0.9, 0.9])
    cat, pattern = classify_cells(completeness, arc, gap, od, t)
    names = [CATEGORIES[c] for c in cat]
    assert names[:4] == ["none", "faint_partial", "weak_moderate_complete", "strong_complete"]
    assert names[4:6] == ["weak_moderate_lateral", "strong_lateral"]  # one long stained arc, one long (apical) gap
    assert names[6] == "faint_partial"  # faint circumferential staining is barely perceptible: 1+
    assert names[7] == "faint_partial"  # intense but scattered, non-lateral: incomplete
    assert names[8] == "strong_complete"  # stained nearly all round with only short gaps
    assert [PATTERNS[p] for p in pattern[[0, 1, 2, 4]]] == ["none", "partial", "complete", "lateral"]
    strict = Thresholds(complete_completeness=0.99)
    assert CATEGORIES[classify_cells(completeness, arc, gap, od, strict)[0][8]] == "faint_partial"


def test_thresholds_validated():
    with pytest.raises(ValueError):
        Thresholds(weak_od=0.7, strong_od=0.5)
    with pytest.raises(ValueError):
        Thresholds(lateral_arc=0.9, complete_completeness=0.8)
