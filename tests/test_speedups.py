"""The pixel steps measure the same cells as when their outputs were pinned (tests/cellpin.py):
identical categories, patterns, compartments, tumour flags, cell labels and outline vertex counts;
float columns within 1e-4 log10 OD, 1e-3 of the border for completeness and arcs."""
from __future__ import annotations

import cv2
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


def test_per_cell_quantile_is_the_lower_quantile_of_each_label():
    """The one-sort per-cell quantile equals numpy's 'lower' quantile, with negative values, ties and empty labels."""
    from her2score.membrane import _per_cell_quantile

    rng = np.random.default_rng(3)
    labels = rng.integers(1, 40, 5000)
    values = np.round(rng.normal(0.0, 0.3, 5000), 2).astype(np.float32)  # ties, negatives, -0.0 and +0.0
    values[:50] = -0.0
    for q in (0.0, 0.25, 0.5, 0.9, 1.0):
        got = _per_cell_quantile(labels, values, 45, q)
        for lab in range(45):
            v = values[labels == lab]
            want = np.quantile(v, q, method="lower") if len(v) else np.nan
            assert got[lab] == want or (np.isnan(want) and np.isnan(got[lab])), (q, lab)
    # labels of a narrow type (their bucket keys must not wrap), a NaN or an infinity, a spread past float32's range
    want = _per_cell_quantile(labels, values, 45, 0.5)
    for dtype in (np.uint8, np.int16, np.uint16, np.uint64):
        np.testing.assert_array_equal(_per_cell_quantile(labels.astype(dtype), values, 45, 0.5), want)
    for odd in (np.nan, np.inf, -3e38):
        v = values.copy()
        v[labels == 7] = 3e38
        v[0] = odd
        got = _per_cell_quantile(labels, v, 45, 0.5)
        for lab in (labels[0], 7, 8):  # a NaN sorts last, as np.sort puts it
            ordered = np.sort(v[labels == lab])
            assert got[lab] == ordered[(len(ordered) - 1) // 2], (odd, lab)


def test_watershed_is_scikit_images():
    """cells.watershed, skimage's compiled flood called without its front end, labels exactly as
    skimage.segmentation.watershed does where no two markers tie (single-pixel markers, or marker
    regions of distinct elevations): with and without a mask, with markers off the mask, on plateaus
    (ties of flooded pixels) and on the membrane contrast of a real field, where the pipeline floods."""
    from skimage.data import immunohistochemistry
    from skimage.segmentation import watershed as skimage_watershed

    from her2score.cells import watershed
    from her2score.membrane import membrane_contrast
    from her2score.stain import H_DAB, deconvolve

    rng = np.random.default_rng(5)
    dab = deconvolve(immunohistochemistry()[:300, :400], H_DAB)[..., 1]
    _, contrast = membrane_contrast(dab, mpp=0.5)
    cases = [contrast, np.round(rng.random((120, 90)) * 4).astype(np.float32), -rng.random((64, 64))]
    for elevation in cases:
        markers = np.zeros(elevation.shape, np.int32)
        at = rng.choice(elevation.size, 40, replace=False)
        markers.ravel()[at] = rng.integers(1, 30, 40)  # labels shared by several seeds, too
        mask = rng.random(elevation.shape) > 0.15
        for m in (None, mask):
            want = skimage_watershed(elevation, markers, mask=m)
            got = watershed(elevation, markers, mask=m)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    # marker regions (nuclei) on distinct elevations: their insides never go on the queue, the same labels
    elevation = rng.random((150, 170))
    regions = np.zeros(elevation.shape, np.int32)
    for k, (y, x) in enumerate(rng.integers(10, 140, (30, 2)), start=1):
        cv2.circle(regions, (int(x), int(y)), int(rng.integers(2, 7)), k, -1)
    mask = rng.random(elevation.shape) > 0.1
    for m in (None, mask):
        np.testing.assert_array_equal(watershed(elevation, regions, mask=m), skimage_watershed(elevation, regions, mask=m))


def test_watershed_of_tied_markers_agrees_with_scikit_images_at_the_ties_only():
    """Where markers tie (a plateau of equal elevation holding several marker regions), the order in which
    skimage's queue takes them is arbitrary and cells.watershed's may differ: the labels still agree away
    from the borders between the tied regions (here >= 97% of pixels), and each pixel gets a label of an
    adjacent region."""
    from skimage.segmentation import watershed as skimage_watershed

    from her2score.cells import watershed

    rng = np.random.default_rng(8)
    elevation = np.zeros((160, 160))  # one plateau: every marker and every pixel tie
    regions = np.zeros(elevation.shape, np.int32)
    for k, (y, x) in enumerate(rng.integers(8, 152, (40, 2)), start=1):
        cv2.circle(regions, (int(x), int(y)), int(rng.integers(2, 6)), k, -1)
    got, want = watershed(elevation, regions), skimage_watershed(elevation, regions)
    assert (got > 0).all() and (got[regions > 0] == regions[regions > 0]).all()
    assert (got == want).mean() >= 0.97


def test_outlines_of_pinched_and_split_cells_are_their_largest_part():
    """Cells whose traced chain meets a pixel twice, or that come in two parts, fall back to the largest
    4-connected part with holes filled, whatever other cells the tile holds."""
    from her2score.outlines import is_simple, polygon_area, trace_outlines

    lab = np.zeros((30, 40), np.int32)
    lab[2:8, 2:8] = 1
    lab[8:12, 8:12] = 1  # touches the first square at a corner only: a pinch
    lab[15:20, 2:6] = 2
    lab[15:17, 20:22] = 2  # a second, smaller part
    lab[20:28, 25:35] = 3
    lab[23:25, 29:31] = 0  # a hole
    alone = [trace_outlines(np.where(lab == k, k, 0), np.array([k]))[0] for k in (1, 2, 3)]
    together = trace_outlines(lab, np.array([3, 1, 2, 7]))
    for a, b in zip(alone, [together[1], together[2], together[0]]):
        np.testing.assert_array_equal(a, b)
    assert len(together[3]) == 0
    assert abs(polygon_area(together[1])) == pytest.approx(5.5 * 5.5)  # the 6 x 6 square, 0.25 px inside its edge
    assert abs(polygon_area(together[2])) == pytest.approx(4.5 * 3.5)
    assert abs(polygon_area(together[0])) == pytest.approx(9.5 * 7.5)  # hole filled
    assert all(is_simple(p) for p in together[:3])


def test_outlines_traced_together_are_those_of_each_label_alone():
    """All cells are traced in one pass over the label image: each outline is, byte for byte, the one its
    label gives alone, whatever touches it (neighbours, labels in its holes, its own other parts)."""
    from her2score.outlines import trace_outlines

    rng = np.random.default_rng(11)
    for _ in range(20):
        lab = np.kron(rng.integers(0, 30, (12, 12)), np.ones((3, 3), int)).astype(np.int32)
        speckle = rng.random(lab.shape) < 0.1  # 1-px cells, diagonal contacts, holes, several parts
        lab[speckle] = rng.integers(0, 60, speckle.sum())
        ids = rng.permutation(np.unique(lab))[:40]
        for k, poly in zip(ids, trace_outlines(lab, ids)):
            alone = trace_outlines(np.where(lab == k, k, 0), np.array([k]))[0]
            assert poly.dtype == alone.dtype and poly.shape == alone.shape and poly.tobytes() == alone.tobytes(), k


def test_in_runs_keeps_exactly_the_sectors_of_long_circular_runs():
    """_in_runs against its definition, row by row: a stained sector is kept when the circular run holding it
    is at least min_run long (runs may wrap around the last sector)."""
    from her2score.membrane import _in_runs

    rng = np.random.default_rng(8)
    flags = rng.random((300, 24)) < 0.6
    flags[0] = True
    for min_run in (1, 2, 3, 5, 30):
        got = _in_runs(flags, min_run)
        for row, kept in zip(flags, got):
            if row.all():
                assert kept.all()
                continue
            shift = int(np.argmin(row))  # start the circle at an unstained sector: no run wraps
            rolled = np.roll(row, -shift)
            runs = np.split(rolled, np.flatnonzero(~rolled))  # each piece: an unstained sector, then its run
            want = np.concatenate([r if r.sum() >= min_run else np.zeros_like(r) for r in runs])
            np.testing.assert_array_equal(np.roll(want, shift), kept)


def test_bridging_sets_unknown_sectors_between_set_ones():
    """The bit-mask bridge against its definition: an unknown sector is set where the nearest known
    sector before it and the nearest after it (circularly) are both set; known sectors are unchanged."""
    from her2score.membrane import _bridging

    rng = np.random.default_rng(5)
    for p_unknown in (0.0, 0.2, 0.6, 0.95, 1.0):
        known = rng.random((400, 24)) >= p_unknown
        flags = (rng.random((400, 24)) < 0.5) & known  # as summarise_membranes calls it: unknown sectors unset
        got = _bridging(known)(flags)
        for row, k, g in zip(flags, known, got):
            assert np.array_equal(g[k], row[k])
            idx = np.flatnonzero(k)
            for j in np.flatnonzero(~k):
                if len(idx) == 0:
                    assert not g[j]
                    continue
                before = idx[idx < j][-1] if np.any(idx < j) else idx[-1]
                after = idx[idx > j][0] if np.any(idx > j) else idx[0]
                assert g[j] == (row[before] and row[after])
