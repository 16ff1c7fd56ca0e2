"""The pixel steps measure the same cells as when their outputs were pinned (tests/cellpin.py):
identical categories, patterns, compartments, tumour flags, cell labels and outline vertex counts;
float columns within 1e-4 log10 OD, 1e-3 of the border for completeness and arcs."""
from __future__ import annotations

import numpy as np
import pytest

from cellpin import FIELDS, PIN, cell_outputs

FRACTIONS = ("completeness", "longest_arc", "longest_gap")
"""Columns that are fractions of a cell's border (tolerance 1e-3)."""


@pytest.fixture(scope="module")
def pinned() -> dict[str, np.ndarray]:
    with np.load(PIN) as z:
        return dict(z)


def _tolerance(column: str) -> tuple[float, float]:
    """(rtol, atol) of a float column: fractions 1e-3, optical densities 1e-4, sizes and positions 1e-5 relative."""
    if column in FRACTIONS:
        return 0.0, 1e-3
    if column.startswith("sector_"):  # float16: one unit in the last place is ~1e-3 relative
        return 1e-3, 1e-4
    if column.endswith("_od"):
        return 0.0, 1e-4
    return 1e-5, 1e-4


@pytest.mark.parametrize("field", FIELDS)
def test_cell_outputs_match_the_pin(pinned, field):
    now = cell_outputs(field)
    want = {k: v for k, v in pinned.items() if k.startswith(f"{field}/")}
    assert sorted(now) == sorted(want), f"{field}: pinned columns differ"
    assert len(now[f"{field}/table/category"]) == len(want[f"{field}/table/category"]), f"{field}: cell count changed"
    for key, expected in want.items():
        got = now[key]
        assert got.shape == expected.shape, f"{key}: shape {got.shape}, pinned {expected.shape}"
        if expected.dtype.kind in "biu":
            np.testing.assert_array_equal(got, expected, err_msg=key)
        else:
            rtol, atol = _tolerance(key.rsplit("/", 1)[1])
            np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol,
                                       equal_nan=True, err_msg=key)


def test_the_pinned_fields_span_the_categories(pinned):
    """A regenerated pin still exercises the measurements: over 1000 cells in at least 6 categories."""
    cat = np.concatenate([pinned[f"{f}/table/category"] for f in FIELDS])
    assert len(cat) > 1000
    assert len(np.unique(cat)) >= 6
