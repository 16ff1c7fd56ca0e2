"""her2score.neighbours against scipy's k-d tree and sparse graphs, which it stands in for."""
import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from her2score import neighbours
from her2score.neighbours import count_within, groups, nearest_within, pairs_within


def _clouds():
    """Random point sets: spread, clustered, on whole numbers (ties, duplicates), tiny, and cell-like density."""
    rng = np.random.default_rng(11)
    for k in range(24):
        n = int(rng.integers(2, 2500))
        xy = rng.uniform(-60, rng.uniform(5, 3000), (n, 2))
        if k % 3 == 0:
            xy = np.round(xy)  # equal distances and repeated points
        if k % 4 == 1:
            xy = rng.normal(0, 15, (n, 2)) + rng.uniform(0, 500, (1, 2))
        yield xy, float(rng.uniform(0.5, 45)), rng


@pytest.mark.parametrize("case", range(24))
def test_pairs_counts_and_groups_equal_scipys(case):
    xy, r, _ = list(_clouds())[case]
    ours = pairs_within(xy, r)
    theirs = cKDTree(xy).query_pairs(r, output_type="ndarray")
    assert ours.shape[1] == 2 and (ours[:, 0] < ours[:, 1]).all()
    assert sorted(map(tuple, ours.tolist())) == sorted(map(tuple, theirs.tolist()))
    np.testing.assert_array_equal(count_within(xy, r), cKDTree(xy).query_ball_point(xy, r, return_length=True) - 1)
    graph = coo_matrix((np.ones(len(theirs)), (theirs[:, 0], theirs[:, 1])), shape=(len(xy), len(xy)))
    np.testing.assert_array_equal(groups(len(xy), ours), connected_components(graph, directed=False)[1])


@pytest.mark.parametrize("case", range(24))
def test_nearest_within_equals_scipys_bounded_query(case):
    xy, r, rng = list(_clouds())[case]
    queries = np.concatenate([rng.uniform(xy.min() - 2 * r, xy.max() + 2 * r, (400, 2)), xy[:50] + rng.normal(0, r / 3, (min(50, len(xy)), 2)),
                              xy[:20], [[np.nan, np.nan], [np.nan, 0.0], [1e9, -1e9]]])
    if case % 3 == 0:
        queries = np.round(queries)
    d, _ = cKDTree(xy).query(np.nan_to_num(queries, nan=1e12), distance_upper_bound=r)
    ours = nearest_within(xy, queries, r)
    np.testing.assert_array_equal(ours >= 0, np.isfinite(d))
    found = ours >= 0  # the same point, or one exactly as near (the tree returns whichever it meets first)
    np.testing.assert_allclose(np.hypot(*(xy[ours[found]] - queries[found]).T), d[found], rtol=1e-12)


def test_empty_and_single_inputs():
    assert pairs_within(np.zeros((0, 2)), 1.0).shape == (0, 2)
    assert pairs_within(np.zeros((1, 2)), 1.0).shape == (0, 2)
    assert count_within(np.zeros((1, 2)), 1.0).tolist() == [0]
    assert nearest_within(np.zeros((0, 2)), np.zeros((3, 2)), 1.0).tolist() == [-1, -1, -1]
    assert groups(3, np.zeros((0, 2), int)).tolist() == [0, 1, 2]
    # a chain joins end to end, whatever order its links come in
    assert groups(6, np.array([[4, 5], [0, 1], [3, 4], [1, 2]])).tolist() == [0, 0, 0, 1, 1, 1]


def test_points_without_a_position_are_near_nothing_and_far_spreads_stay_exact():
    xy = np.array([[0.0, 0.0], [np.nan, 1.0], [1.0, 0.0], [np.inf, np.inf], [0.0, 1.5]])
    assert sorted(map(tuple, pairs_within(xy, 1.2).tolist())) == [(0, 2)]
    assert count_within(xy, 1.6).tolist() == [2, 0, 1, 0, 1]
    assert nearest_within(xy, np.array([[0.9, 0.1], [0.0, 1.4], [50.0, 50.0]]), 0.5).tolist() == [2, 4, -1]
    far = np.array([[0.0, 0.0], [1e12, 1e12], [1e12 + 0.5, 1e12], [0.25, 0.0]])  # 10^12 squares of 0.5 a side
    assert sorted(map(tuple, pairs_within(far, 0.6).tolist())) == [(0, 3), (1, 2)]
    assert nearest_within(far, np.array([[1e12 + 0.4, 1e12], [-1e15, 3.0]]), 0.6).tolist() == [2, -1]
    assert pairs_within(np.full((3, 2), np.nan), 1.0).shape == (0, 2)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive finite"):
            pairs_within(far[:1], bad)
    with pytest.raises(ValueError, match=r"\(N, 2\) points"):
        count_within(np.zeros((4, 3)), 1.0)


def test_points_closer_than_the_distance_on_a_lattice_are_never_missed():
    """Points on a lattice of the distance's own step: rounding once put two points 0.09999999999999998
    apart two squares apart, and the pair was missed (a reviewer's case, the first below)."""
    xy = np.array([[-3.0, 0.0], [0.30000000000000004, 0.0], [0.4, 0.0]])
    assert pairs_within(xy, 0.1).tolist() == [[1, 2]]
    assert nearest_within(np.array([[-21.0, -21.0], [19.6, -15.4]]), np.array([[20.3, -15.4]]), 0.7).tolist() == [1]
    rng = np.random.default_rng(5)
    for r in (0.1, 1 / 3, 0.7, 2.2, 1e5 / 3):
        for offset in (0.0, -7.3e5, 1e3 / 3):
            xy = offset + rng.integers(-30, 30, (300, 2)) * r
            theirs = cKDTree(xy).query_pairs(r, output_type="ndarray")
            assert sorted(map(tuple, pairs_within(xy, r).tolist())) == sorted(map(tuple, theirs.tolist())), (r, offset)
            queries = np.concatenate([xy + [r, 0], xy + rng.normal(0, r, xy.shape)])
            d, _ = cKDTree(xy).query(queries, distance_upper_bound=r)
            np.testing.assert_array_equal(nearest_within(xy, queries, r) >= 0, np.isfinite(d))


def test_dense_points_are_paired_in_bounded_batches(monkeypatch):
    """However many points lie within the distance, candidates are formed MAX_CANDIDATES or so at a time."""
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 40, (1500, 2))
    expected = cKDTree(xy).query_pairs(6.0, output_type="ndarray")
    monkeypatch.setattr(neighbours, "MAX_CANDIDATES", 500)
    assert sorted(map(tuple, pairs_within(xy, 6.0).tolist())) == sorted(map(tuple, expected.tolist()))
    np.testing.assert_array_equal(count_within(xy, 6.0), cKDTree(xy).query_ball_point(xy, 6.0, return_length=True) - 1)
    d, _ = cKDTree(xy).query(xy + 0.5, distance_upper_bound=6.0)
    assert (nearest_within(xy, xy + 0.5, 6.0) >= 0).tolist() == np.isfinite(d).tolist()
