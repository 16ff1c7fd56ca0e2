"""Points near each other in the plane: pairs within a distance, neighbour counts, the nearest point within
a distance, and groups joined by such pairs.

A grid of squares a little wider than the distance stands in for scipy.spatial's k-d tree: a slide asks a
few such questions of its cells once, and importing scipy.spatial with its sparse graphs takes 0.3-0.4
CPU-seconds, as much as scoring five tiles.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["pairs_within", "count_within", "nearest_within", "groups"]

MAX_CANDIDATES = 1 << 22
"""Candidate pairs formed at once, about: bounds a query's memory (a few hundred MB) however dense the points."""

WIDER = 1 + 1e-5
"""How much wider than the distance a square is: two points closer than the distance then never lie two
squares apart through rounding (the coordinates' relative error is under 1e-6 over 2**30 squares)."""


def _points(xy, name: str = "xy") -> np.ndarray:
    xy = np.asarray(xy, np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"{name} must be (N, 2) points, got shape {xy.shape}")
    return xy


def _distance(distance: float) -> float:
    if not (math.isfinite(distance) and distance > 0):
        raise ValueError(f"the distance must be a positive finite number, got {distance!r}")
    return float(distance)


class _Grid:
    """The points of ``points`` with a position (finite), sorted by the square they lie in; the squares are
    ``distance`` wide (WIDER), or wider where the points spread over more than 2**30 of them (so the int64
    keys never overflow; a pair within the distance still lies in one square or two touching ones)."""

    def __init__(self, points: np.ndarray, distance: float):
        finite = np.flatnonzero(np.isfinite(points).all(axis=1))  # a point without a position is near nothing
        pts = points[finite]
        self.origin = pts.min(axis=0) if len(pts) else np.zeros(2)
        extent = pts.max(axis=0) - self.origin if len(pts) else np.zeros(2)
        self.size = max(distance, float(extent.max()) / 2**30) * WIDER
        col, row = self.square_of(pts)
        self.columns = int(col.max(initial=0)) + 3  # a margin of one square on either side
        self.rows = int(row.max(initial=0)) + 1
        keys = self.key(col, row)
        sort = np.argsort(keys, kind="stable")
        self.order = finite[sort]  # each sorted point's index in ``points``
        self.x, self.y = pts[sort].T.copy()
        self.keys, starts = np.unique(keys[sort], return_index=True)  # the squares holding points
        self.starts = np.append(starts, len(pts))

    def square_of(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(column, row) of the square each point lies in, float (whole numbers; the points' own from 0)."""
        return np.floor((xy - self.origin) / self.size).T

    def key(self, col: np.ndarray, row: np.ndarray) -> np.ndarray:
        """One int64 key per square (whole-number column and row of square_of, within the margins)."""
        return (row.astype(np.int64) + 1) * self.columns + col.astype(np.int64) + 1

    def ranges(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first, count) of the sorted points in the square of each of ``keys``."""
        if not len(self.keys):
            return np.zeros(len(keys), np.intp), np.zeros(len(keys), np.intp)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[at] == keys
        return self.starts[at], np.where(found, self.starts[at + 1] - self.starts[at], 0)


def _expand(first: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which, index): for each k, the indices first[k] ... first[k] + count[k] - 1, with k beside each."""
    which = np.repeat(np.arange(len(count)), count)
    return which, np.repeat(first - (np.cumsum(count) - count), count) + np.arange(len(which))


def _batches(count: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) runs of the rows of ``count`` ((N, k) candidates per row) of about MAX_CANDIDATES each
    (a row with more stands alone)."""
    total = np.cumsum(count.sum(axis=1))
    ends = np.unique(np.append(np.searchsorted(total, np.arange(1, (total[-1] if len(total) else 0) // MAX_CANDIDATES + 1)
                                               * MAX_CANDIDATES, "right"), len(count)))
    ends = ends[ends > 0]
    return list(zip([0, *ends[:-1].tolist()], ends.tolist()))


def _close(xy: np.ndarray, distance: float):
    """The grid of ``xy`` and, in batches, the pairs (i, j) of its sorted points at most ``distance`` apart, i < j."""
    grid = _Grid(xy, distance)
    n, r2 = len(grid.x), distance * distance
    square = np.repeat(np.arange(len(grid.keys)), np.diff(grid.starts))
    p = np.arange(n)
    # the rest of the point's own square, the next square along the row and the three below: each pair once
    c = grid.columns
    spans = [(p + 1, grid.starts[square + 1] - p - 1)] + [grid.ranges(grid.keys[square] + o) for o in (1, c - 1, c, c + 1)]
    count = np.column_stack([s[1] for s in spans])

    def pairs():
        for a, b in _batches(count):
            for first, k in spans:
                which, j = _expand(first[a:b], k[a:b])
                i = which + a
                dx, dy = grid.x[j] - grid.x[i], grid.y[j] - grid.y[i]
                keep = dx * dx + dy * dy <= r2
                yield i[keep], j[keep]

    return grid, pairs()


def pairs_within(xy, distance: float) -> np.ndarray:
    """Every pair (i, j), i < j, of the points ``xy`` ((N, 2)) at most ``distance`` apart: (K, 2) intp, in
    no particular order (as scipy's ``cKDTree(xy).query_pairs(distance, output_type="ndarray")``)."""
    xy, distance = _points(xy), _distance(distance)
    grid, found = _close(xy, distance)
    found = list(found)
    if not found:
        return np.zeros((0, 2), np.intp)
    i, j = (grid.order[np.concatenate(v)] for v in zip(*found))
    return np.column_stack([np.minimum(i, j), np.maximum(i, j)])


def count_within(xy, distance: float) -> np.ndarray:
    """Per point of ``xy`` ((N, 2)), how many other points lie at most ``distance`` from it (int64)."""
    xy, distance = _points(xy), _distance(distance)
    grid, found = _close(xy, distance)
    n = len(grid.x)
    in_order = np.zeros(n, np.int64)  # by sorted point
    for i, j in found:
        in_order += np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
    count = np.zeros(len(xy), np.int64)
    count[grid.order] = in_order
    return count


def nearest_within(points, queries, distance: float) -> np.ndarray:
    """Per query ((M, 2)), the index of the nearest of ``points`` ((N, 2)) less than ``distance`` from it,
    -1 where none is (the lowest index among equally near ones)."""
    points, queries, distance = _points(points, "points"), _points(queries, "queries"), _distance(distance)
    out = np.full(len(queries), -1, np.intp)
    grid = _Grid(points, distance)
    if not len(grid.x) or not len(queries):
        return out
    col, row = grid.square_of(queries)
    # a query a square or more beyond the points' squares has none near (and beyond a column, its neighbours' keys
    # would wrap); NaN is beyond every square
    inside = np.flatnonzero((col >= -1) & (col <= grid.columns - 2) & (row >= -1) & (row <= grid.rows))
    keys = grid.key(col[inside], row[inside])
    c = grid.columns
    offsets = (-c - 1, -c, -c + 1, -1, 0, 1, c - 1, c, c + 1)
    spans = [grid.ranges(keys + o) for o in offsets]
    for a, b in _batches(np.column_stack([s[1] for s in spans])):
        found = [_expand(first[a:b], k[a:b]) for first, k in spans]
        which, p = (np.concatenate(v) for v in zip(*found))
        q = inside[which + a]
        d2 = (grid.x[p] - queries[q, 0]) ** 2 + (grid.y[p] - queries[q, 1]) ** 2
        near = d2 < distance * distance
        q, p, d2 = q[near], grid.order[p[near]], d2[near]
        first = np.lexsort((p, d2, q))  # per query, the nearest first (ties: the lowest index)
        q, p = q[first], p[first]
        lead = np.ones(len(q), bool)
        lead[1:] = q[1:] != q[:-1]
        out[q[lead]] = p[lead]
    return out


def groups(n: int, pairs) -> np.ndarray:
    """Connected groups of ``n`` nodes joined by ``pairs`` ((K, 2)): each node's group, numbered in the order of
    the groups' lowest nodes (as scipy's undirected ``connected_components``)."""
    label = np.arange(n)
    i, j = np.asarray(pairs, np.intp).reshape(-1, 2).T
    while len(i):
        li, lj = label[i], label[j]
        apart = li != lj
        if not apart.any():
            break
        low = np.minimum(li, lj)[apart]
        np.minimum.at(label, li[apart], low)  # labels are roots here: the higher root hangs under the lower
        np.minimum.at(label, lj[apart], low)
        while not np.array_equal(up := label[label], label):  # every node straight to its root
            label = up
    return np.unique(label, return_inverse=True)[1].reshape(n)
