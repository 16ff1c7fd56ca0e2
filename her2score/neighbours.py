"""Points near each other in the plane: pairs within a distance, neighbour counts, the nearest point within
a distance, and groups joined by such pairs.

A grid of squares as wide as the distance stands in for scipy.spatial's k-d tree: a slide asks a few such
questions of its cells once, and importing scipy.spatial with its sparse graphs takes 0.4 CPU-seconds, a
twentieth of scoring a 150-megapixel slide on two cores (benchmarks/bench_wsi.py).
"""
from __future__ import annotations

import numpy as np

__all__ = ["pairs_within", "count_within", "nearest_within", "groups"]

CHUNK = 16384
"""Points whose candidate pairs are formed at once (bounds the memory of a query on a whole slide's cells)."""


def _squares(xy: np.ndarray, size: float, origin: np.ndarray, columns: int) -> np.ndarray:
    """The square of side ``size`` each point lies in, as one int64 key; a margin of one square on every
    side, so a key's neighbours never wrap round to another row."""
    col, row = (np.floor((xy - origin) / size).astype(np.int64) + 1).T
    return row * columns + col


class _Grid:
    """The points of ``points`` with a position (finite), sorted by the square they lie in; the squares are
    ``distance`` wide, or wider where the points spread over more than 2**30 of them (so the int64 keys never
    overflow; a pair within the distance still lies in one square or two touching ones)."""

    def __init__(self, points: np.ndarray, distance: float):
        if not (np.isfinite(distance) and distance > 0):
            raise ValueError(f"the distance must be a positive number, got {distance!r}")
        finite = np.flatnonzero(np.isfinite(points).all(axis=1))  # a point without a position is near nothing
        pts = points[finite]
        self.origin = pts.min(axis=0) if len(pts) else np.zeros(2)
        extent = pts.max(axis=0) - self.origin if len(pts) else np.zeros(2)
        self.size = max(distance, float(extent.max()) / 2**30)
        self.columns = int(np.floor(extent[0] / self.size)) + 3
        self.rows = int(np.floor(extent[1] / self.size)) + 1  # of points, beside the margins
        keys = _squares(pts, self.size, self.origin, self.columns)
        sort = np.argsort(keys, kind="stable")
        self.order = finite[sort]  # each sorted point's index in ``points``
        self.x, self.y = pts[sort].T.copy()
        self.keys, starts = np.unique(keys[sort], return_index=True)  # the squares holding points
        self.starts = np.append(starts, len(pts))

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


def _close(xy: np.ndarray, distance: float):
    """The grid of ``xy`` and, in chunks, the pairs (i, j) of its sorted points at most ``distance`` apart, i < j."""
    grid = _Grid(xy, distance)
    n, r2 = len(grid.x), distance * distance
    square = np.repeat(np.arange(len(grid.keys)), np.diff(grid.starts))

    def chunks():
        for a in range(0, n, CHUNK):
            p = np.arange(a, min(a + CHUNK, n))
            # the rest of the point's own square, the next square along the row and the three below: each pair once
            spans = [(p + 1, grid.starts[square[p] + 1] - p - 1)]
            spans += [grid.ranges(grid.keys[square[p]] + o) for o in (1, grid.columns - 1, grid.columns, grid.columns + 1)]
            for first, count in spans:
                k, j = _expand(first, count)
                i = p[k]
                dx, dy = grid.x[j] - grid.x[i], grid.y[j] - grid.y[i]
                keep = dx * dx + dy * dy <= r2
                yield i[keep], j[keep]

    return grid, chunks()


def pairs_within(xy: np.ndarray, distance: float) -> np.ndarray:
    """Every pair (i, j), i < j, of the points ``xy`` ((N, 2)) at most ``distance`` apart: (K, 2) intp, in
    no particular order (as scipy's ``cKDTree(xy).query_pairs(distance, output_type="ndarray")``)."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    if len(xy) < 2:
        return np.zeros((0, 2), np.intp)
    grid, chunks = _close(xy, distance)
    i, j = (grid.order[np.concatenate(v)] for v in zip(*chunks))
    return np.column_stack([np.minimum(i, j), np.maximum(i, j)])


def count_within(xy: np.ndarray, distance: float) -> np.ndarray:
    """Per point of ``xy``, how many other points lie at most ``distance`` from it (int64)."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    count = np.zeros(len(xy), np.int64)
    if len(xy) >= 2:
        grid, chunks = _close(xy, distance)
        n = len(grid.x)
        in_order = np.zeros(n, np.int64)  # by sorted point
        for i, j in chunks:
            in_order += np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
        count[grid.order] = in_order
    return count


def nearest_within(points: np.ndarray, queries: np.ndarray, distance: float) -> np.ndarray:
    """Per query ((M, 2)), the index of the nearest of ``points`` ((N, 2)) less than ``distance`` from it,
    -1 where none is (the lowest index among equally near ones)."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    queries = np.asarray(queries, np.float64).reshape(-1, 2)
    out = np.full(len(queries), -1, np.intp)
    if len(points) == 0 or len(queries) == 0:
        return out
    grid = _Grid(points, distance)
    if not len(grid.x):
        return out
    col, row = np.floor((queries - grid.origin) / grid.size).T
    # a query a square or more beyond the points' squares has none near (and beyond a column, its neighbours' keys would wrap)
    inside = (col >= -1) & (col <= grid.columns - 2) & (row >= -1) & (row <= grid.rows)
    keys = _squares(np.where(inside[:, None], queries, grid.origin), grid.size, grid.origin, grid.columns)
    c = grid.columns
    for a in range(0, len(queries), CHUNK):
        q = np.flatnonzero(inside[a : a + CHUNK]) + a
        found = [_expand(*grid.ranges(keys[q] + o)) for o in (-c - 1, -c, -c + 1, -1, 0, 1, c - 1, c, c + 1)]
        k, p = (np.concatenate(v) for v in zip(*found))
        q = q[k]
        d2 = (grid.x[p] - queries[q, 0]) ** 2 + (grid.y[p] - queries[q, 1]) ** 2
        near = d2 < distance * distance
        q, p, d2 = q[near], grid.order[p[near]], d2[near]
        first = np.lexsort((p, d2, q))  # per query, the nearest first (ties: the lowest index)
        q, p = q[first], p[first]
        lead = np.ones(len(q), bool)
        lead[1:] = q[1:] != q[:-1]
        out[q[lead]] = p[lead]
    return out


def groups(n: int, pairs: np.ndarray) -> np.ndarray:
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
