"""Per-cell categories: intensity and pattern kept apart (intense incomplete is not faint)."""
from __future__ import annotations

import numpy as np
import pytest

from her2score.categories import CATEGORIES, PATTERNS, Thresholds, classify_cells

T = Thresholds()
WEAK, MODERATE, STRONG = T.weak_od + 0.05, T.strong_od - 0.05, T.strong_od + 0.2  # weak and moderate: one band
FAINT = (T.faint_od + T.weak_od) / 2


def classify(completeness: float, arc: float, gap: float, od: float, t: Thresholds = T) -> tuple[str, str]:
    cat, pattern = classify_cells([completeness], [arc], [gap], [od], t)
    return CATEGORIES[cat[0]], PATTERNS[pattern[0]]


def test_existing_codes_are_stable_and_new_categories_are_appended():
    assert CATEGORIES[:6] == ("none", "faint_partial", "weak_moderate_complete", "strong_complete",
                              "weak_moderate_lateral", "strong_lateral")
    assert CATEGORIES[6:] == ("strong_partial", "weak_moderate_partial")


@pytest.mark.parametrize(
    ("completeness", "arc", "gap", "od", "category", "pattern"),
    [
        (0.0, 0.0, 1.0, STRONG, "none", "none"),  # nothing stained round the cell
        (0.35, 0.1, 0.3, FAINT, "faint_partial", "partial"),
        (0.35, 0.1, 0.3, MODERATE, "weak_moderate_partial", "partial"),  # weak-moderate incomplete: not faint
        (0.35, 0.1, 0.3, STRONG, "strong_partial", "partial"),  # intense but scattered: not faint
        (0.55, 0.3, 0.2, STRONG, "strong_partial", "partial"),  # fairly complete, no single U arc
        (0.65, 0.65, 0.35, STRONG, "strong_lateral", "lateral"),  # U-shaped stays lateral
        (0.65, 0.65, 0.35, WEAK, "weak_moderate_lateral", "lateral"),
        (0.95, 0.95, 0.05, STRONG, "strong_complete", "complete"),
        (0.95, 0.95, 0.05, WEAK, "weak_moderate_complete", "complete"),
        (1.0, 1.0, 0.0, FAINT, "faint_partial", "complete"),  # faint all round: barely perceptible, 1+
    ],
)
def test_category_and_pattern(completeness, arc, gap, od, category, pattern):
    assert classify(completeness, arc, gap, od) == (category, pattern)


def test_partial_intensity_bands_start_exactly_at_their_thresholds():
    below = np.nextafter(np.float32(T.strong_od), np.float32(0))
    assert classify(0.35, 0.1, 0.3, float(below))[0] == "weak_moderate_partial"
    assert classify(0.35, 0.1, 0.3, T.strong_od)[0] == "strong_partial"
    below = np.nextafter(np.float32(T.weak_od), np.float32(0))
    assert classify(0.35, 0.1, 0.3, float(below))[0] == "faint_partial"
    assert classify(0.35, 0.1, 0.3, T.weak_od)[0] == "weak_moderate_partial"


def test_stricter_completeness_turns_complete_into_partial_by_intensity():
    strict = Thresholds(complete_completeness=0.99)
    assert classify(0.7, 0.3, 0.1, STRONG, strict)[0] == "strong_partial"
    assert classify(0.7, 0.3, 0.1, WEAK, strict)[0] == "weak_moderate_partial"
    assert classify(0.7, 0.3, 0.1, FAINT, strict)[0] == "faint_partial"
    assert classify(0.7, 0.3, 0.1, STRONG)[0] == "strong_complete"


def test_every_category_is_reachable_and_codes_fit_int8():
    rng = np.random.default_rng(0)
    n = 5_000
    completeness = rng.uniform(0, 1, n)
    arc = completeness * rng.uniform(0.2, 1, n)
    gap = (1 - completeness) * rng.uniform(0.5, 1, n)
    od = rng.uniform(0, 1, n)
    cat, pattern = classify_cells(completeness, arc, gap, od)
    assert cat.dtype == np.int8 and set(np.unique(cat)) == set(range(len(CATEGORIES)))
    # a category never contradicts its pattern
    names, pats = np.array(CATEGORIES)[cat], np.array(PATTERNS)[pattern]
    assert set(pats[names == "strong_partial"]) == {"partial"}
    assert set(pats[np.char.endswith(names, "_lateral")]) == {"lateral"}
    assert set(pats[np.char.endswith(names, "_complete")]) == {"complete"}
    assert (od[names == "strong_partial"] >= T.strong_od).all()


def test_per_cell_arrays_of_other_lengths_are_refused():
    with pytest.raises(ValueError, match="of one length"):
        classify_cells([0.9, 0.9], [0.9, 0.9], [0.0, 0.0], [0.6])  # not broadcast: one intensity for two cells


def test_values_that_are_not_numbers_are_refused():
    """A NaN completeness or intensity would read as an unstained cell and be counted: refused, named."""
    ok = np.array([0.9, 0.5], np.float32)
    for k in range(4):
        arrays = [ok.copy() for _ in range(4)]
        arrays[k][1] = np.nan
        with pytest.raises(ValueError, match="values that are not finite"):
            classify_cells(*arrays)
