"""Cell outlines: simple closed polygons traced from a cell label image, and rings drawn clear of the membrane.

A cell's outline is traced from its own pixels in the label image (see trace_outlines), never
from radii around the centroid, so it has no spikes; outlines cut by the image edge are clipped
and kept simple (clip_outline).
"""
from __future__ import annotations

from collections.abc import Sequence

from collections.abc import Callable

import cv2
import numpy as np

__all__ = ["trace_outlines", "trace_outline_points", "grid_to_pixels", "Outlines", "polygon_area", "polygon_areas", "is_simple", "clip_outline", "draw_cell_rings"]


def polygon_area(poly: np.ndarray) -> float:
    """Signed shoelace area of a (k, 2) ring of (x, y) vertices (not repeated at the end), px² (0 under 3 vertices)."""
    return float(polygon_areas([poly])[0])


def polygon_areas(rings: Sequence[np.ndarray]) -> np.ndarray:
    """polygon_area of each ring at once, px² (float64)."""
    sizes = np.array([len(p) for p in rings], np.int64)
    areas = np.zeros(len(sizes))
    if not len(sizes) or sizes.sum() == 0:
        return areas
    pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in rings])
    ends = np.cumsum(sizes)
    following = np.arange(1, len(pts) + 1)
    following[ends[sizes > 0] - 1] = (ends - sizes)[sizes > 0]  # each ring's last vertex is followed by its first
    cross = pts[:, 0] * pts[following, 1] - pts[:, 1] * pts[following, 0]
    areas = 0.5 * np.bincount(np.repeat(np.arange(len(sizes)), sizes), cross, len(sizes))
    return np.where(sizes >= 3, areas, 0.0)


def _drop_collinear(poly: np.ndarray) -> np.ndarray:
    """The ring without vertices lying on the straight line through their two neighbours."""
    d = np.diff(np.concatenate([poly[-1:], poly, poly[:1]]), axis=0)
    keep = np.abs(d[:-1, 0] * d[1:, 1] - d[:-1, 1] * d[1:, 0]) > 1e-9
    return poly[keep] if keep.sum() >= 3 else poly


def _ring(up: np.ndarray) -> np.ndarray | None:
    """Outer ring (int (k, 2) (x, y)) of a uint8 mask (a cell's padded pixels upsampled 2x), or None when
    the mask has several parts or the traced chain passes a pixel twice (a pinch)."""
    c = _chain(up)
    return c if c is not None and not _pinched(c, np.array([len(c)]), up.shape[1])[0] else None


def _chain(up: np.ndarray) -> np.ndarray | None:
    """The one outer contour of a uint8 mask as int (k, 2) (x, y), k >= 3; None when the mask has several parts."""
    cs, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cs[0].reshape(-1, 2) if len(cs) == 1 and len(cs[0]) >= 3 else None


def _pinched(pts: np.ndarray, n: np.ndarray, width: int) -> np.ndarray:
    """Per chain, whether it passes a pixel twice (bool array). Chains (their (x, y) vertices back to back in
    ``pts``, ``n`` each) are of disjoint cells in one image ``width`` px wide: a pixel met twice is met twice
    by one chain."""
    flat = pts[:, 1].astype(np.int64) * width + pts[:, 0]
    order = np.arange(len(flat), dtype=np.int32 if len(flat) < 2**31 else np.int64)
    seen = np.empty(int(flat.max()) + 1, order.dtype)  # only the pixels written are read: no need to clear it
    seen[flat] = order  # a pixel met twice keeps one of its vertices: the other is a repeat
    twice = np.zeros(len(n), bool)
    twice[np.searchsorted(np.cumsum(n), np.flatnonzero(seen[flat] != order), side="right")] = True
    return twice


def _up2(mask: np.ndarray) -> np.ndarray:
    """The image upsampled 2x, each pixel a 2 x 2 block (INTER_NEAREST_EXACT: the same pixels as INTER_NEAREST at 2x, faster)."""
    return cv2.resize(mask, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST_EXACT)


def _without_collinear(pts: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Which vertices of rings concatenated in ``pts`` (int (N, 2), ring lengths ``n``) to keep: those not on
    the line through their two neighbours (as _drop_collinear, exact on the integer grid), or every vertex of
    a ring left with fewer than 3."""
    end = np.cumsum(n)
    first = end - n
    step = np.empty_like(pts)  # to the next vertex of the same ring
    step[:-1] = pts[1:] - pts[:-1]
    step[end - 1] = pts[first] - pts[end - 1]
    back = np.empty_like(pts)  # from the previous vertex
    back[1:] = step[:-1]
    back[first] = step[end - 1]
    keep = back[:, 0] * step[:, 1] != back[:, 1] * step[:, 0]
    short = np.add.reduceat(keep, first) < 3
    if short.any():
        keep |= np.repeat(short, n)
    return keep


def _cell_mask(cell_labels: np.ndarray, lab: int, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A label's pixels (uint8) in its box padded by a pixel, and the box's (x, y) on the 2x grid of the padded
    label image, where the label's outer contours (their vertices ``pts``, (k, 2) (x, y)) bound it."""
    lo, hi = pts.min(0) // 2 - 1, pts.max(0) // 2
    mask = (cell_labels[lo[1] : hi[1], lo[0] : hi[0]] == lab).view(np.uint8)
    return cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0), 2 * lo


def trace_outlines(cell_labels: np.ndarray, label_ids: np.ndarray) -> list[np.ndarray]:
    """One outline per id of ``label_ids`` (each id once): float32 (k, 2) (x, y) in pixel coordinates of ``cell_labels``
    (pixel centres at integers), first vertex not repeated; an empty (0, 2) array for a label with no pixel.

    The outline follows the cell's pixels 0.25 px inside their outer edge: the boundary of its
    largest 4-connected part with holes filled (a saddle-free pixel set), traced on a 2x grid so
    one-pixel necks keep a width. Such a ring is simple (no self-intersection, no spike);
    collinear vertices are dropped.
    """
    points, sizes = trace_outline_points(cell_labels, label_ids)
    return _split(grid_to_pixels(points), sizes)


def grid_to_pixels(points: np.ndarray) -> np.ndarray:
    """Vertices on trace_outline_points' grid as float32 (x, y) pixel coordinates of the label image."""
    return (points.astype(np.float32) - 0.5) / 2 - 1  # the 2x grid of the image padded by 1 px


def _split(rows: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """``rows`` cut into consecutive pieces of ``sizes`` rows (views)."""
    ends = np.cumsum(sizes).tolist()
    return [rows[a:b] for a, b in zip([0, *ends[:-1]], ends)]


def trace_outline_points(cell_labels: np.ndarray, label_ids: np.ndarray,
                         origin: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """trace_outlines' rings as traced, before conversion to pixels (grid_to_pixels): their vertices back
    to back, int16 (int32 where the grid's coordinates pass int16's range) (x, y) on the 2x grid of the
    label image padded by 1 px, and the vertex count of each id of ``label_ids`` (int64; 0 for a label
    with no pixel).
    ``origin`` (row, column): where the label image's first pixel lies in the image whose grid the
    vertices are given on, for a label image cut from a larger one."""
    cell_labels = np.asarray(cell_labels)
    label_ids = np.asarray(label_ids, dtype=np.int64)
    (r0, c0), (h, w) = origin, cell_labels.shape
    dtype = np.int16 if 2 * (max(r0 + h, c0 + w) + 2) < np.iinfo(np.int16).max else np.int32
    sizes = np.zeros(len(label_ids), np.int64)
    none = np.zeros((0, 2), dtype)
    top = int(max(cell_labels.max(initial=0), label_ids.max(initial=0)))
    asked = np.zeros(top + 1, np.int32)  # label -> itself if asked for, else 0 (so are negative labels)
    asked[label_ids[label_ids > 0]] = label_ids[label_ids > 0]
    labelled = np.take(asked, cell_labels.astype(np.int32, copy=False), mode="clip")
    bx, by, bw, bh = cv2.boundingRect((labelled != 0).view(np.uint8))  # traced in the box of the labels asked for
    if bw == 0:
        return none, sizes
    box = (slice(by, by + bh), slice(bx, bx + bw))
    cell_labels, r0, c0 = cell_labels[box], r0 + by, c0 + bx
    up = _up2(cv2.copyMakeBorder(labelled[box], 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0))
    # one trace of every region of equal labels: a cell's outer contours (top level; its holes' borders
    # are below) are those traced in its own mask, padded and upsampled alike: same start, same direction
    cs, tree = cv2.findContours(up, cv2.RETR_FLOODFILL, cv2.CHAIN_APPROX_NONE)
    if not cs:
        return none, sizes
    outer = np.flatnonzero(tree[0][:, 3] < 0)
    first = np.array([cs[i][0, 0] for i in outer.tolist()])
    owner = up[first[:, 1], first[:, 0]]  # the label each outer contour bounds
    parts = np.bincount(owner, minlength=top + 1)
    where = np.flatnonzero((label_ids > 0) & (parts[np.maximum(label_ids, 0)] > 0))  # 0: the background
    if not len(where):
        return none, sizes
    labs = label_ids[where]
    contour = np.zeros(top + 1, np.int64)
    contour[owner] = outer  # a label's outer contour, where it has one
    chains = [cs[i].reshape(-1, 2) for i in contour[labs].tolist()]
    n = np.array([len(c) for c in chains])
    pts = np.concatenate(chains)  # on the 2x grid of the padded image
    redo = _pinched(pts, n, up.shape[1])

    def outer_points(lab: int) -> np.ndarray:  # the vertices of a label's outer contours
        return np.concatenate([cs[i].reshape(-1, 2) for i in outer[owner == lab]])

    multi = np.flatnonzero(parts[labs] > 1)
    for j in multi:  # several parts: traced alone, as those inside its own holes are no outer contours there
        lab = int(labs[j])
        mask, at = _cell_mask(cell_labels, lab, outer_points(lab))
        ring = _ring(_up2(mask))
        redo[j] = ring is None
        if ring is not None:
            chains[j] = ring + at
    for j in np.flatnonzero(redo):  # several parts, or a pinch: largest 4-connected part, holes filled
        lab = int(labs[j])
        mask, at = _cell_mask(cell_labels, lab, outer_points(lab))
        _, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        mask = (comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
        outside = mask.copy()
        cv2.floodFill(outside, None, (0, 0), 2, flags=4)
        mask[outside == 0] = 1
        ring = _ring(_up2(mask))
        if ring is None:  # a saddle-free, hole-free 4-connected set always has one simple outer ring
            raise RuntimeError(f"cell label {lab}: no simple outline could be traced")
        chains[j] = ring + at
    if len(multi) or redo.any():  # chains replaced
        n = np.array([len(c) for c in chains])
        pts = np.concatenate(chains)
    keep = _without_collinear(pts, n)  # as traced (int32): a chain's steps are single pixels, no overflow
    sizes[where] = np.add.reduceat(keep, np.cumsum(n) - n)
    return (pts[keep] + (2 * c0, 2 * r0)).astype(dtype), sizes


class Outlines(Sequence):
    """Cells' outlines as their tiles traced them: each tile's vertices on its tracing grid
    (trace_outline_points: 4 bytes a vertex, no object per cell), with the tile's placement in the
    slide. Item i is cell i's outline, float32 (k, 2) (x, y) in level-0 px: trace_outlines' pixels
    of the tile's read box multiplied by ``scale`` (level-0 px per tile px) and moved by ``(ox, oy)``
    (level-0 px). A slice or an index array gives a list of them."""

    def __init__(self, tiles: list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]):
        """``tiles``: per tile, (points, sizes, (ox, oy, scale)); its cells follow the previous tile's."""
        self._tiles = [(pts, (ox, oy), scale) for pts, _, (ox, oy, scale) in tiles]
        sizes = [np.asarray(s, np.int64) for _, s, _ in tiles]
        self._tile = np.repeat(np.arange(len(tiles), dtype=np.int32), [len(s) for s in sizes])
        self._start = np.concatenate([np.cumsum(s) - s for s in sizes]) if sizes else np.zeros(0, np.int64)
        self._size = np.concatenate(sizes).astype(np.int32) if sizes else np.zeros(0, np.int32)

    def __len__(self) -> int:
        return len(self._size)

    def _decode(self, t: int, rows: slice | np.ndarray) -> np.ndarray:
        pts, origin, scale = self._tiles[t]
        return (grid_to_pixels(pts[rows]) * np.float32(scale) + np.array(origin, np.float32)).astype(np.float32)

    def take(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Outlines of ``cells`` (indices, negative from the end) back to back, as float32 (V, 2)
        level-0 px, and each one's vertex count."""
        n = len(self)
        cells = np.asarray(cells, np.int64).ravel()
        cells = np.where(cells < 0, cells + n, cells)
        if len(cells) == 0:
            return np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
        if cells.min() < 0 or cells.max() >= n:
            raise IndexError(f"cell index out of range for {n} outlines")
        tile, start, size = self._tile[cells], self._start[cells], self._size[cells].astype(np.int64)
        end = np.cumsum(size)
        out = np.empty((end[-1], 2), np.float32)
        cut = (np.flatnonzero(np.diff(tile)) + 1).tolist()  # runs of cells from one tile
        for a, b in zip([0, *cut], [*cut, len(cells)]):
            if (np.diff(cells[a:b]) == 1).all():  # consecutive cells: their vertices are consecutive too
                rows = slice(int(start[a]), int(start[b - 1] + size[b - 1]))
            else:
                rows = np.repeat(start[a:b] - (end[a:b] - size[a:b]), size[a:b]) + np.arange(end[a] - size[a], end[b - 1])
            out[end[a] - size[a] : end[b - 1]] = self._decode(int(tile[a]), rows)
        return out, size

    def block(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Outlines of cells a..b back to back (float32 (V, 2) level-0 px) and each one's vertex count."""
        return self.take(range(*slice(a, b).indices(len(self))[:2]))

    def __iter__(self):
        for a in range(0, len(self), 4096):
            yield from self[a : a + 4096]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return _split(*self.take(range(len(self))[key]))
        if np.ndim(key) == 0:
            i = range(len(self))[int(key)]  # negative indices; IndexError past the end
            return self._decode(int(self._tile[i]), slice(int(self._start[i]), int(self._start[i] + self._size[i])))
        key = np.asarray(key)
        return _split(*self.take(np.flatnonzero(key) if key.dtype == bool else key))


def _clip(pts: np.ndarray, width: float, height: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a ring to [0, width] x [0, height], one pass per side."""
    for axis, bound, sign in ((0, 0.0, -1), (0, float(width), 1), (1, 0.0, -1), (1, float(height), 1)):
        if len(pts) == 0:
            break
        d = (pts[:, axis] - bound) * sign  # <= 0 inside
        inside = d <= 0
        if inside.all():
            continue
        res = []
        for p, q, dp, dq, ip, iq in zip(pts, np.roll(pts, -1, axis=0), d, np.roll(d, -1), inside, np.roll(inside, -1)):
            if ip:
                res.append(p)
            if ip != iq:
                c = p + dp / (dp - dq) * (q - p)
                c[axis] = bound
                res.append(c)
        pts = np.array(res, np.float64).reshape(-1, 2)
    if len(pts):  # repeated vertices the cut may leave
        pts = pts[np.any(np.abs(pts - np.roll(pts, 1, axis=0)) > 1e-9, axis=1)]
    return pts


def is_simple(poly: np.ndarray) -> bool:
    """Whether a (k, 2) ring (first vertex not repeated) is a simple polygon: >= 3 vertices, non-zero
    area, and no two edges meeting except consecutive edges at their shared vertex."""
    p = np.asarray(poly, np.float64)
    k = len(p)
    if k < 3 or abs(polygon_area(p)) < 1e-12:
        return False
    a, b = p, np.roll(p, -1, axis=0)

    def orient(p1, p2, p3):  # sign of the cross product (p2 - p1) x (p3 - p1), all pairs
        v = (p2[..., 0] - p1[..., 0]) * (p3[..., 1] - p1[..., 1]) - (p2[..., 1] - p1[..., 1]) * (p3[..., 0] - p1[..., 0])
        return np.sign(np.where(np.abs(v) < 1e-12, 0.0, v))

    A, B, C, D = a[:, None], b[:, None], a[None], b[None]
    o1, o2, o3, o4 = orient(A, B, C), orient(A, B, D), orient(C, D, A), orient(C, D, B)

    def on_seg(p1, p2, q):  # q on segment p1-p2, given collinear
        return ((np.minimum(p1[..., 0], p2[..., 0]) <= q[..., 0] + 1e-12) & (q[..., 0] <= np.maximum(p1[..., 0], p2[..., 0]) + 1e-12)
                & (np.minimum(p1[..., 1], p2[..., 1]) <= q[..., 1] + 1e-12) & (q[..., 1] <= np.maximum(p1[..., 1], p2[..., 1]) + 1e-12))

    meet = ((o1 * o2 < 0) & (o3 * o4 < 0)) | ((o1 == 0) & on_seg(A, B, C)) | ((o2 == 0) & on_seg(A, B, D)) \
        | ((o3 == 0) & on_seg(C, D, A)) | ((o4 == 0) & on_seg(C, D, B))
    i, j = np.indices((k, k))
    adjacent = (j == (i + 1) % k) | (i == (j + 1) % k) | (i == j)
    if (meet & ~adjacent).any():
        return False
    # adjacent edges may share only their common vertex: not fold back along each other
    e = b - a
    nxt = np.roll(e, -1, axis=0)
    cross = e[:, 0] * nxt[:, 1] - e[:, 1] * nxt[:, 0]
    dot = (e * nxt).sum(1)
    return not bool(np.any((np.abs(cross) < 1e-12) & (dot < 0)))


def clip_outline(poly: np.ndarray, width: float, height: float, *, decimals: int = 2) -> np.ndarray:
    """A cell outline cut to the image [0, width] x [0, height] (same units), its vertices rounded to
    ``decimals`` places (as they are written) and kept a simple polygon after that rounding: the
    clipped ring when it is simple, else the convex hull of the clipped hull's rounded vertices
    (always simple); (0, 2) when nothing is left. Float64; outlines inside the box are only rounded."""
    pts = np.asarray(poly, np.float64)
    if len(pts) and pts[:, 0].min() >= 0 and pts[:, 1].min() >= 0 and pts[:, 0].max() <= width and pts[:, 1].max() <= height:
        return np.round(pts, decimals)
    scale = 10.0**decimals

    top = np.floor(np.array([width, height], np.float64) * scale + 1e-9)  # the box's far edges, on the grid

    def on_grid(ring: np.ndarray) -> np.ndarray:  # in grid units (whole numbers) inside the box, repeated and collinear vertices dropped
        g = np.clip(np.round(ring * scale), 0, top)
        g = g[np.any(g != np.roll(g, 1, axis=0), axis=1)] if len(g) else g
        return _drop_collinear(g) if len(g) >= 3 else g

    out = on_grid(_clip(pts, width, height))
    if len(out) >= 3 and is_simple(out):
        return out / scale
    hull = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2).astype(np.float64)[::-1]
    corners = on_grid(_clip(hull, width, height))
    if len(corners) < 3:
        return np.zeros((0, 2))
    out = cv2.convexHull(corners.astype(np.int32)).reshape(-1, 2).astype(np.float64)[::-1]  # exact on the grid
    out = _drop_collinear(out) if len(out) >= 3 else out
    if len(out) < 3 or abs(polygon_area(out)) < 1e-9:
        return np.zeros((0, 2))
    return out / scale


def draw_cell_rings(canvas: np.ndarray, outlines: list[np.ndarray], colours: list[tuple[int, int, int]], *,
                    inset_px: float, width_px: float, solid: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None) -> None:
    """Draw each cell as a coloured ring inside its outline, ``inset_px`` clear of the border, in place.

    ``outlines`` are (k, 2) (x, y) rings in ``canvas`` pixel coordinates. The border between two cells
    (where the membrane is) stays as it is in the image, so the DAB that was judged is not hidden.
    Rings of cells too small for the inset are drawn on their border instead. A cell whose outline
    encloses another's (one grown round it) is drawn first, the enclosed cell on it. ``solid(cell, x, y)``:
    which ring pixels (canvas x, y) of cells (their index in ``outlines``) lie where the membrane was read
    stained; the others are drawn dotted, a pixel in every three along the ring (by arc length round the outline's
    mean vertex, so that a ring running in any direction is dotted), so the stained arcs stand out.
    """
    h, w = canvas.shape[:2]
    labels = np.zeros((h, w), np.int32)
    areas = np.abs(polygon_areas(outlines))
    for i in np.argsort(areas, kind="stable")[::-1]:  # the largest first: a cell wrapped round another never covers it
        if len(outlines[i]) >= 3:
            cv2.fillPoly(labels, [np.round(outlines[i]).astype(np.int32)], int(i) + 1)
    if not labels.any():
        return
    pad = np.pad(labels, 1, mode="edge")
    border = ((pad[1:-1, 1:-1] != pad[:-2, 1:-1]) | (pad[1:-1, 1:-1] != pad[2:, 1:-1])
              | (pad[1:-1, 1:-1] != pad[1:-1, :-2]) | (pad[1:-1, 1:-1] != pad[1:-1, 2:]))
    dist = cv2.distanceTransform((~border).astype(np.uint8), cv2.DIST_L2, 3)
    ring = (labels > 0) & (dist > inset_px) & (dist <= inset_px + width_px)
    # cells the ring missed (smaller than the inset) get their border pixels
    has_ring = np.zeros(len(outlines) + 1, bool)
    has_ring[labels[ring]] = True
    ring |= (labels > 0) & border & ~has_ring[labels]
    if solid is not None:
        ys, xs = np.nonzero(ring)
        cell = labels[ys, xs] - 1
        centres = np.array([o.mean(axis=0) if len(o) else (0.0, 0.0) for o in outlines], np.float64).reshape(-1, 2)
        dx, dy = xs - centres[cell, 0], ys - centres[cell, 1]
        dotted = np.floor(np.arctan2(dy, dx) * np.hypot(dx, dy)) % 3 == 0  # every third pixel of arc length
        keep = solid(cell, xs, ys) | dotted
        ring[ys[~keep], xs[~keep]] = False
    lut = np.zeros((len(outlines) + 1, 3), np.uint8)
    lut[1:] = np.asarray(colours, np.uint8).reshape(-1, 3)
    canvas[ring] = lut[labels[ring]]
