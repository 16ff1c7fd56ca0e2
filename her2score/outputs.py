"""Per-slide outputs, each written atomically: result.json, cells.parquet (cells.csv on request),
overlay.png and cells.geojson.

The overlay lets a pathologist check the calls: each cell is a ring in its category's colour drawn
inside the cell, clear of its border, so the membrane DAB that was judged stays visible. A field of
view is drawn at its own resolution; a whole slide as a thumbnail, heatmaps of the share of tumour cells
counted for 3+, 2+ and 1+ under its guideline, and the most informative regions at 0.5 µm/px.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from .categories import CATEGORIES, PATTERNS
from .files import atomic_file, atomic_write, is_temp_file
from .guidelines import INTENSITY, deciding_categories
from .membrane import sector_of
from .outlines import clip_outline, draw_cell_rings
from .pipeline import SlideAnalysis
from .slide import Slide, SlideError, open_slide
from .tumour import COMPARTMENTS, LEFT_OUT
from .workers import FORKS, die_with_parent, result_of, worker_pool

__all__ = [
    "atomic_file", "atomic_write", "write_outputs", "write_cells_csv", "write_cells_parquet", "write_cells_geojson",
    "overlay_image", "overlay_png", "remove_stale_temp_files", "category_colour", "CATEGORY_COLOURS",
    "NON_TUMOUR_COLOUR", "NEIGHBOURS_COLOUR", "OUTPUT_FILES", "OPTIONAL_OUTPUT_FILES", "FIELD_MAX_PX",
]

CATEGORY_COLOURS: dict[str, tuple[int, int, int]] = {
    "none": (70, 130, 255),
    "faint_partial": (255, 230, 0),
    "weak_moderate_complete": (255, 140, 0),
    "strong_complete": (220, 0, 0),
    "weak_moderate_lateral": (190, 90, 255),
    "strong_lateral": (120, 0, 160),
    "strong_partial": (255, 60, 200),
    "weak_moderate_partial": (40, 170, 90),
}
"""RGB colour of each category in the overlay and in QuPath (see category_colour for others)."""

NON_TUMOUR_COLOUR: tuple[int, int, int] = (140, 140, 140)
"""RGB of cells outside the tumour (not counted), whatever their category."""

RING_KEY_COLOUR: tuple[int, int, int] = (90, 90, 90)
"""The legend's swatch for how a ring is drawn (solid where the border was read stained), not a category."""

NEIGHBOURS_COLOUR: tuple[int, int, int] = (0, 200, 210)
"""RGB of tumour cells read none whose stained border is their neighbours' membrane (``neighbours_membrane``): told
apart from unstained cells, so that a brown border inside a 'none' ring reads as the convention, not a miss."""

OUTPUT_FILES = ("result.json", "cells.parquet", "overlay.png", "cells.geojson")
"""The files every scored slide gets (result.json last: it marks completion)."""

OPTIONAL_OUTPUT_FILES = ("cells.csv",)
"""Files written on request (write_outputs(cells_csv=True))."""

FIELD_MAX_PX = 4096
"""Images up to this many level-0 pixels on their longest side get a field-of-view overlay at their own
resolution; larger ones a whole-slide overlay (thumbnail, heatmaps, regions)."""
MIN_OVERLAY_PX = 480
"""The least width of an overlay: a narrower field is padded with white, so that its title and legend fit."""
TEXT_WIDTH_PX = 1200
"""Overlays up to this width draw their title, legend and scale bar at the base font sizes; a wider one scales
them with its width, so that they read the same when the image is fitted to a screen."""


def category_colour(name: str) -> tuple[int, int, int]:
    """RGB of a cell category: CATEGORY_COLOURS, or a fixed colour derived from the name for a category added later."""
    if name in CATEGORY_COLOURS:
        return CATEGORY_COLOURS[name]
    h = sum((i + 1) * ord(ch) for i, ch in enumerate(name))
    return (60 + h % 180, 60 + (h // 7) % 180, 60 + (h // 49) % 180)


def remove_stale_temp_files(folder: str | os.PathLike, targets=OUTPUT_FILES + OPTIONAL_OUTPUT_FILES) -> list[Path]:
    """Delete atomic_write's leftover temporary files for ``targets`` in ``folder`` (after a kill).

    Only call this while no other writer can be using the folder (the batch holds its lock).
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if is_temp_file(e.name, targets) and e.is_file(follow_symlinks=False):
            try:
                os.unlink(e.path)
                removed.append(Path(e.path))
            except FileNotFoundError:
                pass
    return removed


CHUNK = 5_000
"""Cells formatted per write: outputs stream in bounded memory whatever the slide's size."""

GEOJSON_CHUNK = 1_000
"""Cells whose GeoJSON text is made at once: some MB of temporaries per process; the text does not depend on it."""

_NOT_COLUMNS = ("x", "y", "outline", "radii_um")
"""Cell-table entries that are not plain per-cell columns of the CSV / parquet table."""


def _columns(analysis: SlideAnalysis) -> list[str]:
    return [k for k in analysis.cells if k not in _NOT_COLUMNS]


def _fmt(values: np.ndarray) -> list[str]:
    """Text of one cell-table column: true/false for flags (pandas, polars and R read them as booleans, as the
    parquet holds them; 1/0 read as integers), 4 decimals for measurements, an empty field for a missing one (NaN:
    e.g. no cytoplasm to measure; None in a text column, null in the parquet), as pandas and polars read a missing
    value."""
    if values.dtype == bool:
        return np.where(values, "true", "false").tolist()
    if values.dtype.kind == "f":
        return ["" if v != v else f"{v:.4f}" for v in values.tolist()]
    return ["" if v is None else str(v) for v in values.tolist()]


def write_cells_csv(analysis: SlideAnalysis, f: BinaryIO) -> None:
    """One row per cell: position (level-0 px and µm), tumour flag (true/false), category, pattern and measurements."""
    t = analysis.cells
    mpp = analysis.result.mpp
    cols = _columns(analysis)
    f.write((",".join(["cell_id", "x_px", "y_px", "x_um", "y_um", *cols]) + "\n").encode())
    for a in range(0, len(t["x"]), CHUNK):
        b = min(a + CHUNK, len(t["x"]))
        x, y = t["x"][a:b], t["y"][a:b]
        columns = [
            [str(i) for i in range(a, b)],
            [f"{v:.1f}" for v in x.tolist()], [f"{v:.1f}" for v in y.tolist()],
            [f"{v * mpp:.2f}" for v in x.tolist()], [f"{v * mpp:.2f}" for v in y.tolist()],
            *(_fmt(t[c][a:b]) for c in cols),
        ]
        f.write(("\n".join(",".join(row) for row in zip(*columns)) + "\n").encode())


VOCABULARIES = {"category": CATEGORIES, "pattern": PATTERNS, "compartment": COMPARTMENTS, "left_out_as": LEFT_OUT}
"""Every value a cell-table text column can hold, in their order: the Parquet dictionary of each, so that every
file's categories are the same (pandas concatenates them as one Categorical, and counts the empty ones)."""


def _arrow(values: np.ndarray, vocabulary: tuple[str, ...] | None = None):
    """A cell-table column as an Arrow array made from its buffers (pa.array imports pandas, 0.2 s, to ask
    whether it was given a pandas object): strings dictionary-encoded, over ``vocabulary`` where given (in its
    order), else in order of first appearance, as pyarrow's dictionary_encode does; a None null; a float's NaN null.
    Its type depends on the dtype alone, so every block of a column has the first one's (a cast would import
    pyarrow.compute, 30 ms)."""
    import pyarrow as pa

    if values.dtype.kind == "U":  # fixed-width text, as numpy makes it from a list of str
        values = values.astype(object)
    elif values.dtype.kind != "O":  # Arrow's buffers are little-endian, as this machine's
        values = values.astype(values.dtype.newbyteorder("<"), copy=False)
    if values.dtype == object:
        missing = np.equal(values, None)  # np.unique cannot order None among str
        indices = np.zeros(len(values), np.int32)  # a null's index is never read
        if vocabulary is not None:
            index = {name: i for i, name in enumerate(vocabulary)}
            indices[~missing] = [index[v] for v in values[~missing].tolist()]
            names = list(vocabulary)
        else:
            found, first, codes = np.unique(values[~missing], return_index=True, return_inverse=True)
            order = np.argsort(first)
            rank = np.empty(len(order), np.int32)
            rank[order] = np.arange(len(order))
            indices[~missing] = rank[codes]
            names = found[order].tolist()
        text = [name.encode() for name in names]
        offsets = np.cumsum([0] + [len(b) for b in text], dtype=np.int32)
        dictionary = pa.Array.from_buffers(pa.string(), len(text), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(text))])
        return pa.DictionaryArray.from_arrays(_numbers(indices, missing), dictionary)
    if values.dtype == bool:
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(np.packbits(values, bitorder="little"))])
    return _numbers(values, np.isnan(values) if values.dtype.kind == "f" else np.zeros(len(values), bool))


def _numbers(values: np.ndarray, missing: np.ndarray):
    """Little-endian numbers as an Arrow array made from their buffer, null where ``missing`` (a validity bitmap)."""
    import pyarrow as pa

    valid = pa.py_buffer(np.packbits(~missing, bitorder="little")) if missing.any() else None
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [valid, pa.py_buffer(np.ascontiguousarray(values))])


def write_cells_parquet(analysis: SlideAnalysis, f: BinaryIO) -> None:
    """The cell table as Parquet (one row group per CHUNK cells): the CSV's columns with their own
    types (float32 measurements, a missing one null, never NaN; bool tumour; category and pattern as
    dictionary-encoded strings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = analysis.cells
    mpp = analysis.result.mpp
    cols = _columns(analysis)
    n = len(t["x"])

    def batch(a: int, b: int) -> pa.Table:
        x, y = np.asarray(t["x"][a:b], np.float32), np.asarray(t["y"][a:b], np.float32)
        data = {"cell_id": np.arange(a, b, dtype=np.int64), "x_px": x, "y_px": y,
                "x_um": (x * mpp).astype(np.float32), "y_um": (y * mpp).astype(np.float32)}
        return pa.table({k: _arrow(np.asarray(v), VOCABULARIES.get(k)) for k, v in (data | {c: t[c][a:b] for c in cols}).items()})

    first = batch(0, min(CHUNK, n))
    with pq.ParquetWriter(f, first.schema, compression="zstd") as w:
        w.write_table(first)
        for a in range(CHUNK, n, CHUNK):
            w.write_table(batch(a, min(a + CHUNK, n)))


def _slide_size(analysis: SlideAnalysis, slide: Slide | None) -> tuple[float, float]:
    """Level-0 (width, height) in px: the slide's, else estimated from the thumbnail."""
    if slide is not None:
        return float(slide.dimensions[0]), float(slide.dimensions[1])
    f = analysis.thumbnail_mpp / analysis.result.mpp
    return analysis.thumbnail.shape[1] * f, analysis.thumbnail.shape[0] * f


def _outlines(analysis: SlideAnalysis, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 outlines of cells a..b (pixel centres at integers) back to back, float32 (V, 2), and each one's vertex count."""
    if "outline" not in analysis.cells:
        raise ValueError("the cell table has no 'outline' column (her2score.outlines.Outlines, made in score_tile)")
    return analysis.cells["outline"].block(a, b)


_HUNDREDTHS = np.array([f".{k // 10}" if k % 10 == 0 else f".{k:02d}" for k in range(100)], "S4").view("<u4")
"""json.dumps's fraction of x.00 to x.99 (".0", ".01", ..., ".1", ..., ".99"), NUL-padded to 4 bytes, as words."""


@lru_cache(maxsize=None)
def _signed_wholes(size: int) -> np.ndarray:
    """The text of 0, -0, 1, -1, ..., size - 1, -(size - 1) (entry 2 i + negative), NUL-padded to 8 bytes, as words."""
    return np.array([f"{sign}{i}" for i in range(size) for sign in ("", "-")], "S8").view("<u8")


def _hundredths_words(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """json.dumps text of each float64 that is the nearest double to a multiple of 0.01 under 2**20 in magnitude
    (as np.round(x, 2) gives: "-12.3", "4.05", "0.0"): its sign and integer part (8 bytes, NUL-padded, as uint64
    words) and its fraction (4 bytes, as uint32 words), from the integer hundredths; and which values are such."""
    magnitude = np.abs(values)
    hundredths = np.rint(magnitude * 100)
    exact = (hundredths / 100 == magnitude) & (hundredths < 100 * 2**20)
    hundredths[~exact] = 0
    whole = np.floor(hundredths / 100)  # exact: the hundredths are integers under 2**27
    frac = (hundredths - 100 * whole).astype(np.intp)
    whole = whole.astype(np.intp)
    wholes = _signed_wholes(1 << int(whole.max(initial=0)).bit_length())  # a power of two: few tables
    return wholes[2 * whole + np.signbit(values)], _HUNDREDTHS[frac], exact


def _json_rings(xy: np.ndarray, ring_lengths: np.ndarray) -> list[bytes]:
    """Each ring of ``xy`` (float64 (N, 2), rings concatenated, first vertex not repeated) closed, as json.dumps
    writes its list of [x, y] (compact) without the outer brackets: b"[x,y],...,[x0,y0]"."""
    ends = np.cumsum(ring_lengths)
    firsts = ends - ring_lengths
    closed = np.insert(np.arange(len(xy)), ends, firsts)  # each ring followed by its first vertex
    last = np.zeros(len(closed), bool)
    last[ends + np.arange(len(ends))] = True
    whole, frac, exact = _hundredths_words(xy[closed])
    rows = np.empty((len(closed), 9), "<u4")  # "[" x "," y "]" ",", each piece NUL-padded to whole words
    rows[:, 0], rows[:, 4] = ord("["), ord(",")
    rows[:, 1:3], rows[:, 3] = whole[:, 0, None].view("<u4"), frac[:, 0]
    rows[:, 5:7], rows[:, 7] = whole[:, 1, None].view("<u4"), frac[:, 1]
    rows[:, 8] = ord("]") | np.where(last, ord("\n"), ord(",")) << 8  # a newline ends each ring
    out = rows.tobytes().translate(None, b"\0").split(b"\n")[:-1]  # the pieces' NUL padding dropped (a third faster than a mask)
    for r in np.unique(np.repeat(np.arange(len(ends)), ring_lengths + 1)[~exact.all(axis=1)]).tolist():
        coords = xy[firsts[r] : ends[r]].tolist()  # any other value: written by json itself
        out[r] = json.dumps(coords + coords[:1], separators=(",", ":"))[1:-1].encode()
    return out


_POLYGON_HEAD, _POLYGON_TAIL = b'{"type":"Polygon","coordinates":[[', b"]]}"
"""A polygon geometry's text around its ring (_json_rings)."""


def _geojson_features(analysis: SlideAnalysis, a: int, b: int, size: tuple[float, float]) -> bytes:
    """The GeoJSON features of cells a..b (write_cells_geojson), joined by commas; ``size``: level-0 (width, height)."""
    t = analysis.cells
    w, h = size
    classes = {c: json.dumps({"name": c, "color": list(category_colour(c))}, separators=(",", ":")).encode() for c in CATEGORIES}
    measures = [(m, d) for m, d in (("completeness", 4), ("longest_arc", 4), ("membrane_od", 4), ("membrane_od_p90", 4),
                                    ("width_um", 3), ("cell_area_um2", 2), ("nucleus_area_um2", 2),
                                    ("neighbours_membrane", 0)) if m in t]
    feature = (b'{"type":"Feature","geometry":%b%b%b,"properties":{"objectType":"detection",%b"classification":%b,'
               b'"tumour":%b,"left_out_as":%b,"measurements":{' + ",".join(f'"{m}":%.{d}f' for m, d in measures).encode()
               + b',"tumour":%d,"cell_id":%d}}}')
    xy, sizes = _outlines(analysis, a, b)
    pts = xy.astype(np.float64) + 0.5  # QuPath: pixel centre i + 0.5
    starts = np.cumsum(sizes) - sizes
    outside = (pts[:, 0] < 0) | (pts[:, 1] < 0) | (pts[:, 0] > w) | (pts[:, 1] > h)
    cut = np.zeros(len(sizes), bool)
    has = sizes > 0
    cut[has] = np.logical_or.reduceat(outside, starts[has]) if len(pts) else False
    edge = cut | (sizes < 3)  # crosses the image edge (or no outline): clipped, kept simple
    rings = np.round(pts, 2)
    if edge.any():
        parts = [rings[s : s + k] for s, k in zip(starts.tolist(), sizes.tolist())]
        for k in np.flatnonzero(edge).tolist():
            clipped = clip_outline(pts[starts[k] : starts[k] + sizes[k]], w, h) if sizes[k] >= 3 else np.zeros((0, 2))
            parts[k] = clipped
        sizes = np.array([len(p) for p in parts], np.int64)
        rings = np.concatenate(parts)
    polygon = sizes >= 3
    heads, bodies, tails = [_POLYGON_HEAD] * (b - a), [b""] * (b - a), [_POLYGON_TAIL] * (b - a)
    for k, body in zip(np.flatnonzero(polygon).tolist(), _json_rings(rings[np.repeat(polygon, sizes)], sizes[polygon])):
        bodies[k] = body
    for k in np.flatnonzero(~polygon).tolist():  # nothing left inside the image: the cell's centre as a point
        x, y = float(t["x"][a + k]), float(t["y"][a + k])
        heads[k] = f'{{"type":"Point","coordinates":[{min(max(x + 0.5, 0), w):.2f},{min(max(y + 0.5, 0), h):.2f}]}}'.encode()
        tails[k] = b""
    tumour = np.asarray(t["tumour"][a:b], bool)
    cats = [classes.get(c) or json.dumps({"name": c}).encode() for c in t["category"][a:b].tolist()]
    why = {None: b"null", **{w: json.dumps(w).encode() for w in LEFT_OUT}}
    grey = json.dumps(list(NON_TUMOUR_COLOUR), separators=(",", ":"))
    named = {None: b"", **{w: f'"name":{json.dumps("non-tumour: " + w)},"color":{grey},'.encode() for w in LEFT_OUT}}
    left_out = t["left_out_as"][a:b].tolist()
    cols = [t[m][a:b].tolist() for m, _ in measures]
    args = chain.from_iterable(zip(heads, bodies, tails, [named[w] for w in left_out], cats,
                                   np.where(tumour, b"true", b"false").tolist(), [why[w] for w in left_out], *cols,
                                   tumour.astype(int).tolist(), range(a, b)))
    return ((feature + b",") * (b - a) % tuple(args))[:-1]


def _chunk_bounds(n: int) -> list[tuple[int, int]]:
    """(first, end) of each GEOJSON_CHUNK of ``n`` cells."""
    return [(a, min(a + GEOJSON_CHUNK, n)) for a in range(0, n, GEOJSON_CHUNK)]


def write_cells_geojson(analysis: SlideAnalysis, f: BinaryIO, *, slide_size: tuple[float, float] | None = None,
                        features: Iterable[bytes] | None = None) -> None:
    """QuPath-importable FeatureCollection: one detection per cell.

    Geometry: the cell's outline traced from its label mask, in level-0 px with QuPath's convention
    (a pixel spans [i, i + 1], so its centre is i + 0.5), clipped to the image (``slide_size``,
    level-0 width and height) and kept a simple polygon, rounded to 0.01 px. ``classification`` is the cell's
    category; ``tumour`` (true/false) and ``left_out_as`` (why a cell is not a tumour cell, tumour.LEFT_OUT; null for
    a tumour cell) are properties, which QuPath drops, so a cell left out also has two it reads: a ``name``
    ("non-tumour: " and why) and the overlay's grey ``color`` (drawn so in place of its class's); ``measurements``
    holds completeness, longest arc, membrane DAB OD (log10), width (µm), areas (µm²), neighbours_membrane (1: its
    stain is its neighbours' membrane, so it reads none), tumour (1/0) and cell_id as QuPath reads them.
    ``features``: the text of each chunk of cells (_chunk_bounds, _geojson_features) when made elsewhere.
    """
    size = slide_size or _slide_size(analysis, None)
    if features is None:
        features = (_geojson_features(analysis, a, b, size) for a, b in _chunk_bounds(len(analysis.cells["x"])))
    f.write(b'{"type":"FeatureCollection","features":[')
    for i, text in enumerate(features):
        if i:
            f.write(b",")
        f.write(text)  # not joined to its comma: a copy of the whole file's text less
    f.write(b"]}\n")


_forked: dict = {}
"""In a process forked to write features: the analysis it inherited."""


def _init_forked(parent: int, analysis: SlideAnalysis) -> None:
    die_with_parent(parent)
    _forked["analysis"] = analysis


def _forked_features(bounds: tuple[int, int], size: tuple[float, float]) -> bytes:
    return _geojson_features(_forked["analysis"], *bounds, size)


def _features_in_workers(analysis: SlideAnalysis, size: tuple[float, float], workers: int,
                         forked: Callable[[], None] = lambda: None) -> Iterator[bytes]:
    """The GeoJSON features of each GEOJSON_CHUNK of cells, in order, made by ``workers`` processes forked with
    ``analysis`` (never pickled), at most 4 chunks a worker in flight (bounded memory). ``forked`` is called
    once every worker exists (the pool forks them all at its first task, and never again)."""
    with worker_pool(workers, _init_forked, (analysis,)) as pool:
        pending: deque = deque()
        for i, bounds in enumerate(_chunk_bounds(len(analysis.cells["x"]))):
            pending.append(pool.submit(_forked_features, bounds, size))
            if i == 0:
                forked()
            if len(pending) >= 4 * workers:
                yield result_of(pending.popleft())
        while pending:
            yield result_of(pending.popleft())


# -------------------------------------------------------------------------------------- overlay

@lru_cache(maxsize=None)
def _font(size: int):
    """DejaVu Sans (shipped with matplotlib; has µ and ²) at ``size`` px, else Pillow's default font.
    The file is found without importing matplotlib (a fifth of a second)."""
    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    try:
        folder = Path(next(iter(spec.submodule_search_locations)))
        return ImageFont.truetype(str(folder / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (AttributeError, TypeError, StopIteration, OSError):  # no matplotlib, or no font file in it
        return ImageFont.load_default(size=size)


def _text_band(lines: list[tuple[str, int]], width: int, *, pad: int = 6) -> np.ndarray:
    """A white band ``width`` px wide holding the (text, font size) lines, each wrapped to the width."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped: list[tuple[str, int]] = []
    for text, size in lines:
        font, words, line = _font(size), text.split(), ""  # any whitespace: a file name may hold a newline
        for word in words:
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width - 2 * pad:
                wrapped.append((line, size))
                line = word
            else:
                line = trial
        wrapped.append((line, size))
    height = pad + sum(int(s * 1.3) for _, s in wrapped) + pad
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    y = pad
    for text, size in wrapped:
        d.text((pad, y), text, fill=(0, 0, 0), font=_font(size))
        y += int(size * 1.3)
    return np.asarray(img)


def _legend(width: int, entries: list[tuple[str, tuple[int, int, int]]], *, size: int = 13) -> np.ndarray:
    """A white band with a colour swatch and name per entry, laid out in rows across ``width``."""
    from PIL import Image, ImageDraw

    font = _font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = [(name, rgb, int(measure.textlength(name, font=font)) + size + 18) for name, rgb in entries]
    rows, row, used = [], [], 6
    for it in items:
        if row and used + it[2] > width - 6:
            rows.append(row)
            row, used = [], 6
        row.append(it)
        used += it[2]
    rows.append(row)
    line = int(size * 1.5)
    img = Image.new("RGB", (width, 8 + line * len(rows)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for r, items_r in enumerate(rows):
        x, y = 6, 4 + r * line
        for name, rgb, wpx in items_r:
            d.rectangle([x, y + 2, x + size, y + size + 2], outline=tuple(rgb), width=max(3, size // 4))
            d.text((x + size + 5, y), name, fill=(0, 0, 0), font=font)
            x += wpx
    return np.asarray(img)


def _scale_band(width: int, mpp: float, *, margin: int = 8, scale: float = 1.0) -> np.ndarray:
    """A white band ``width`` px wide with a labelled scale bar (a round length near 1/5 of the width) at
    its right, for an image of that width at ``mpp`` µm/px drawn above it (the image itself is left clear);
    its label's font ``scale`` x the base size."""
    from PIL import Image, ImageDraw

    target_um = width * mpp / 5
    um = max((v for v in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000) if v <= target_um), default=1)
    bar = max(1, round(um / mpp))
    label = f"{um} µm" if um < 1000 else f"{um / 1000:g} mm"
    size = round(max(11, min(18, width // 40)) * scale)
    thick = round(4 * scale)
    img = Image.new("RGB", (width, size + thick + 12), (255, 255, 255))
    d = ImageDraw.Draw(img)
    font = _font(size)
    tw = int(d.textlength(label, font=font))
    x1 = width - margin
    d.rectangle([max(0, x1 - bar), 3, x1, 3 + thick], fill=(0, 0, 0))
    d.text((max(0, x1 - bar / 2 - tw / 2), 5 + thick), label, fill=(0, 0, 0), font=font)
    return np.asarray(img)


REGION_COLOUR = (0, 0, 0)
"""RGB of the tumour annotation's outline (the region given, --regions) on the overlay."""


def _legend_entries(analysis: SlideAnalysis) -> list[tuple[str, tuple[int, int, int]]]:
    region = [("tumour annotation given (its holes and cut-outs too)", REGION_COLOUR)] if analysis.region is not None else []
    return ([(f"tumour: {c.replace('_', ' ')}", category_colour(c)) for c in CATEGORIES]
            + [("tumour: none (its brown border is its neighbours' membrane)", NEIGHBOURS_COLOUR),
               ("non-tumour cell (not counted)", NON_TUMOUR_COLOUR)] + region
            + [("each ring solid beside its border read stained, dotted beside the rest", RING_KEY_COLOUR)])


def _draw_region(canvas: np.ndarray, analysis: SlideAnalysis, origin: tuple[float, float], px_per_level0: float) -> None:
    """The outline of the tumour annotation the cells were counted in (its polygons, their holes and the non-tumour
    annotations cut out of them, or a mask's edge) on ``canvas``, whose pixel (0, 0) is level-0 ``origin``."""
    region = analysis.region
    if region is None:
        return
    ox, oy = origin
    width = max(2, round(canvas.shape[1] / 500))
    if region.mask is not None:  # the mask's pixels on the canvas's grid, a line's width beyond it on each side, and their edge
        h, w = canvas.shape[:2]
        pad = width + 2
        cols = np.floor(((np.arange(-pad, w + pad) / px_per_level0 + ox + 0.5) * region.mask_scale[0])).astype(np.intp)
        rows = np.floor(((np.arange(-pad, h + pad) / px_per_level0 + oy + 0.5) * region.mask_scale[1])).astype(np.intp)
        on_c = (cols >= 0) & (cols < region.mask.shape[1])
        on_r = (rows >= 0) & (rows < region.mask.shape[0])
        sampled = region.mask[np.ix_(np.where(on_r, rows, 0), np.where(on_c, cols, 0))] & on_r[:, None] & on_c[None, :]  # off the mask: outside
        # a mask going on past the canvas is traced beyond it (findContours keeps off the image's outer pixel), its
        # line's whole width off the drawing: no frame where the canvas cuts it
        edges, _ = cv2.findContours(sampled.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE, offset=(-pad, -pad))
    else:  # QuPath's coordinates: pixel i spans [i, i + 1]
        h, w = canvas.shape[:2]
        pad = width + 2
        edges = []
        for ring in (ring for exterior, holes in (*region.polygons, *region.excluded) for ring in (exterior, *holes)):
            pts = (ring - 0.5 - (ox, oy)) * px_per_level0
            if np.abs(pts).max() > FAR_PX:  # cut to the canvas (its edges a line's width off it): int32 holds it
                pts = clip_outline(pts + pad, w + 2 * pad, h + 2 * pad) - pad
            if len(pts):
                edges.append(np.round(pts).astype(np.int32))
    cv2.polylines(canvas, edges, True, REGION_COLOUR, width, cv2.LINE_AA)


FAR_PX = 1e6
"""Canvas px beyond which an annotation's vertex is cut to the canvas before it is drawn (one at 1e12 px overflowed
the int32 OpenCV draws in)."""


def _cell_colours(analysis: SlideAnalysis, idx: np.ndarray) -> list[tuple[int, int, int]]:
    t = analysis.cells
    return [NON_TUMOUR_COLOUR if not tum else NEIGHBOURS_COLOUR if theirs else category_colour(c)
            for c, tum, theirs in zip(t["category"][idx].tolist(), t["tumour"][idx].tolist(),
                                      t["neighbours_membrane"][idx].tolist())]


def _draw_cells(canvas: np.ndarray, analysis: SlideAnalysis, idx: np.ndarray, origin: tuple[float, float], px_per_level0: float) -> None:
    """Rings of cells ``idx`` on ``canvas``, whose pixel (0, 0) is level-0 ``origin`` and scale ``px_per_level0``."""
    if len(idx) == 0:
        return
    ox, oy = origin
    xy, sizes = analysis.cells["outline"].take(idx)
    polys = np.split((xy.astype(np.float64) - (ox, oy)) * px_per_level0, np.cumsum(sizes)[:-1])
    mpp_canvas = analysis.result.mpp / px_per_level0
    cx = (np.asarray(analysis.cells["x"], np.float64)[idx] - ox) * px_per_level0
    cy = (np.asarray(analysis.cells["y"], np.float64)[idx] - oy) * px_per_level0
    masks = np.asarray(analysis.cells["stained_sectors"], np.int64)[idx]

    def stained(cell: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:  # the cell's sector of each ring pixel
        return (masks[cell] >> sector_of(y - cy[cell], x - cx[cell])) & 1 == 1
    draw_cell_rings(canvas, polys, _cell_colours(analysis, idx), inset_px=max(1.0, 0.6 / mpp_canvas),
                    width_px=max(1.0, 0.5 / mpp_canvas), solid=stained)


def _title_lines(analysis: SlideAnalysis, scale: float = 1.0) -> list[tuple[str, int]]:
    """The title band's (text, font size px) lines, font sizes ``scale`` x the base ones."""
    r = analysis.result
    call = "no HER2 score" if r.score in (None, "") else f"HER2 {r.level}"  # the level names the score: 0 (null), 0+ (ultralow)
    status = _STATUS_WORDS[r.qc_status]  # an overlay passed on alone carries the status with the level
    lines = [(f"{Path(r.slide).name}: {call}{status}; {r.guideline}, {r.specimen}", 17),
             (f"Reason: {r.reason}", 13),
             (f"{r.tumour_cells} tumour cells; H-score {'-' if r.h_score is None else f'{r.h_score:.1f}'}; tumour: {r.region}", 13)]
    if r.flags:
        lines.append(("Flags: " + ", ".join(r.flags), 13))
    for severity, words in (("fail", "QC failed"), ("warn", "QC warnings")):
        if found := [q.message for q in r.qc if q.severity == severity]:
            lines.append((f"{words}: " + "; ".join(found), 13))
    return [(text, round(size * scale)) for text, size in lines]


_STATUS_WORDS = {"passed": "", "not_scored": "", "needs_review": " (NEEDS REVIEW)",
                 "qc_failed": " (QC FAILED: not a guideline call)"}
"""What the overlay's first line adds to the level for each SlideResult.qc_status."""


def _field_panel(analysis: SlideAnalysis, slide: Slide | None) -> tuple[np.ndarray, float]:
    """The field at its own resolution (level 0) with every cell's ring, and its µm/px."""
    if slide is not None:
        w, h = slide.dimensions
        canvas = slide.read_region((0, 0), (w, h), mpp=slide.mpp).copy()
        px = 1.0
        mpp = slide.mpp
    else:  # no slide to read: the thumbnail
        canvas = analysis.thumbnail.copy()
        px = analysis.result.mpp / analysis.thumbnail_mpp
        mpp = analysis.thumbnail_mpp
    _draw_cells(canvas, analysis, np.arange(len(analysis.cells["x"])), (0.0, 0.0), px)
    _draw_region(canvas, analysis, (0.0, 0.0), px)
    return canvas, mpp


def _heatmap(analysis: SlideAnalysis, which: np.ndarray, bin_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Per bin of ``bin_um`` on the thumbnail grid: fraction of tumour cells that are ``which``, and tumour count."""
    t = analysis.cells
    th, tw = analysis.thumbnail.shape[:2]
    um_per_thumb = analysis.thumbnail_mpp
    nb_x, nb_y = max(1, int(np.ceil(tw * um_per_thumb / bin_um))), max(1, int(np.ceil(th * um_per_thumb / bin_um)))
    tum = np.asarray(t["tumour"], bool)
    bx = np.clip((t["x"][tum] * analysis.result.mpp / bin_um).astype(int), 0, nb_x - 1)
    by = np.clip((t["y"][tum] * analysis.result.mpp / bin_um).astype(int), 0, nb_y - 1)
    key = by * nb_x + bx
    total = np.bincount(key, minlength=nb_x * nb_y).reshape(nb_y, nb_x)
    hits = np.bincount(key, weights=which[tum].astype(np.float64), minlength=nb_x * nb_y).reshape(nb_y, nb_x)
    return np.where(total > 0, hits / np.maximum(total, 1), 0.0), total


def _counted_for(analysis: SlideAnalysis) -> dict[str, np.ndarray]:
    """Per score ("3+", "2+", "1+"), the cells (bool) in the categories its 10% cut-off is read on under the
    slide's guideline (guidelines.deciding_categories); none where no tumour cell was counted."""
    category = analysis.cells["category"]
    if not sum(analysis.result.counts.values()):  # no tumour cell counted: nothing to map
        return {score: np.zeros(len(category), bool) for score in ("3+", "2+", "1+")}
    return {score: np.isin(category, cats) for score, cats in _deciding(analysis).items()}


def _deciding(analysis: SlideAnalysis) -> dict[str, tuple[str, ...]]:
    """guidelines.deciding_categories of the slide's counts under its guideline and gastric reading."""
    r = analysis.result
    return deciding_categories(r.counts, r.guideline, gastric_reading=r.config.get("gastric_reading", "cumulative"))


def _grey_panel(thumbnail: np.ndarray, f: float) -> np.ndarray:
    """The thumbnail in grey (RGB) at ``f`` panel px per thumbnail px: the heatmaps' ground (resized as one
    channel, a third of the work for the same pixels)."""
    th, tw = thumbnail.shape[:2]
    grey = cv2.resize(cv2.cvtColor(thumbnail, cv2.COLOR_RGB2GRAY), (max(1, round(tw * f)), max(1, round(th * f))),
                      interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)


HEAT_MIN_CELLS = 5
"""The fewest tumour cells a heatmap bin is shaded for (fewer: no share worth showing)."""


def _heat_panel(grey: np.ndarray, um_per_px: float, frac: np.ndarray, total: np.ndarray, bin_um: float, title: str,
                width: int, rgb: tuple[int, int, int], *, top_percent: float = 50.0, min_cells: int = HEAT_MIN_CELLS) -> np.ndarray:
    """``grey`` (_grey_panel, at ``um_per_px``), ``width`` px wide, with each bin of >= ``min_cells`` tumour cells
    shaded from white (0%) to ``rgb`` (``top_percent`` or more), titled, with a colour bar marking the 10%
    guideline cut-off."""
    from PIL import Image, ImageDraw

    base = grey.copy()
    hb, wb = base.shape[:2]

    def shade(v: np.ndarray) -> np.ndarray:
        t = np.clip(v * 100 / top_percent, 0, 1)[..., None]
        return (255 * (1 - t) + np.asarray(rgb, np.float64) * t).astype(np.uint8)

    # each panel pixel takes the bin its centre lies in
    by = np.minimum(((np.arange(hb) + 0.5) * um_per_px / bin_um).astype(np.intp), frac.shape[0] - 1)
    bx = np.minimum(((np.arange(wb) + 0.5) * um_per_px / bin_um).astype(np.intp), frac.shape[1] - 1)
    colour = shade(frac)[by[:, None], bx[None, :]]
    shown = (total >= min_cells)[by[:, None], bx[None, :]]
    base[shown] = (0.3 * base[shown] + 0.7 * colour[shown]).astype(np.uint8)
    bar = np.repeat(shade(np.linspace(0, top_percent / 100, width))[None], 12, axis=0)
    img = Image.new("RGB", (width, 30), (255, 255, 255))
    d, font = ImageDraw.Draw(img), _font(11)
    for p in (0, 10, 25, top_percent):
        x = min(width - 1, round(p / top_percent * (width - 1)))
        d.line([x, 0, x, 4], fill=(0, 0, 0))
        label = f"{p:g}%" + (" (cut-off)" if p == 10 else "+" if p == top_percent else "")
        tx = min(max(0, x - d.textlength(label, font=font) / 2), width - d.textlength(label, font=font))
        d.text((tx, 6), label, fill=(0, 0, 0), font=font)
    head = _text_band([(title, 13)], width, pad=3)
    return np.vstack([head, _beside(base, width), bar, np.asarray(img)])


PANEL_MAX_RATIO = 3
"""A slide overlay's thumbnail and heatmaps are at most this many times as tall as a panel is wide (a 20,000 x 50
px strip drew a 143,443 px tall overlay, which Pillow refuses to open as a decompression bomb)."""


def _beside(img: np.ndarray, width: int) -> np.ndarray:
    """``img`` with white on its right to ``width`` px (a tall thumbnail drawn narrower than its panel)."""
    return np.pad(img, ((0, 0), (0, max(0, width - img.shape[1])), (0, 0)), constant_values=255)


REGION_MIN_CELLS = 5
"""Fewest cells of a category a slide-overlay window shows it by, but for the categories the call rests on."""


def _regions(analysis: SlideAnalysis, n: int, window_level0: float) -> list[tuple[int, int, str]]:
    """Up to ``n`` windows (level-0 top-left x, y, why): the window richest in the tumour cells of each category
    the call rests on (guidelines.deciding_categories of the score; a 0's are the stained ones, what would make it
    1+), strongest first; then, most common first, that of each other category holding at least REGION_MIN_CELLS
    of its cells (the slide's bulk, unstained tissue too: strongest-first windows spent a slide's six on categories
    of 1-3 cells and never showed its faint or unstained tissue); then the windows richest in stained tumour cells,
    then those with most tumour cells; windows do not overlap. A slide without tumour cells (not scored) gets the
    windows with most cells of any kind.

    Windows lie on a grid of half a window, so each cell falls in four of them."""
    t = analysis.cells
    tum = np.asarray(t["tumour"], bool)
    if not tum.any():
        if not len(tum):
            return []
        tum = np.ones(len(tum), bool)
        kind = "cells (no tumour cells)"
    else:
        kind = "tumour cells"
    step = window_level0 / 2
    gx, gy = np.maximum(t["x"][tum] // step, 0).astype(np.int64), np.maximum(t["y"][tum] // step, 0).astype(np.int64)
    nx, ny = int(gx.max()) + 1, int(gy.max()) + 1
    cats = t["category"][tum]
    by_category: list[tuple[str, np.ndarray, int]] = []
    if kind == "tumour cells":  # non-tumour cells' categories are not counted
        deciding, score = _deciding(analysis), analysis.result.score
        rests_on = set(deciding[score if score in deciding else "1+"])
        count = {c: int(np.sum(cats == c)) for c in CATEGORIES}
        order = sorted(CATEGORIES, key=lambda c: (c not in rests_on, -INTENSITY.get(c, 0) if c in rests_on else -count[c],
                                                  CATEGORIES.index(c)))
        by_category = [(c, cats == c, 1 if c in rests_on else REGION_MIN_CELLS) for c in order]
    stained = [("stained", cats != "none", 1)] * n if kind == "tumour cells" else []  # then more of what a call rests on
    taken = np.zeros((ny, nx), bool)  # windows overlapping a chosen one (start within one step of it)
    chosen: list[tuple[int, int, str]] = []
    for label, sel, least in by_category + stained + [("", np.ones(len(cats), bool), 1)] * n:
        if len(chosen) >= n:
            break
        if not sel.any():
            continue
        grid = np.zeros((ny, nx), np.int64)
        for dx in (0, 1):  # a cell in grid cell (x, y) lies in the windows starting at x-1..x, y-1..y
            for dy in (0, 1):
                ok = sel & (gx >= dx) & (gy >= dy)
                grid += np.bincount((gy[ok] - dy) * nx + gx[ok] - dx, minlength=nx * ny).reshape(ny, nx)
        grid[taken] = 0
        if grid.max() < least:
            continue
        wy, wx = np.unravel_index(int(np.argmax(grid)), grid.shape)
        taken[max(0, wy - 1) : wy + 2, max(0, wx - 1) : wx + 2] = True
        v = int(grid[wy, wx])
        why = (f"most {kind} stained ({v})" if label == "stained" else f"most {kind} '{label.replace('_', ' ')}' ({v})" if label
               else f"most {kind} ({v})")
        chosen.append((int(wx * step), int(wy * step), why))
    return chosen


def _slide_panels(analysis: SlideAnalysis, slide: Slide | None, *, n_regions: int, region_px: int, region_mpp: float,
                  width: int) -> np.ndarray:
    """Whole-slide overlay body: thumbnail with numbered region boxes, three heatmaps of the share of tumour cells
    counted for 3+, 2+ and 1+ under the slide's guideline (guidelines.deciding_categories: the shares its 10%
    cut-offs are read on), then the regions at ``region_mpp``."""
    t = analysis.cells
    mpp0 = analysis.result.mpp
    counted = _counted_for(analysis)
    th, tw = analysis.thumbnail.shape[:2]
    bin_um = max(100.0, max(th, tw) * analysis.thumbnail_mpp / 60)
    col_w = width // 4 - 8  # four panels, 8 px apart
    f = min(col_w / tw, PANEL_MAX_RATIO * col_w / th)  # panel px per thumbnail px
    thumb = cv2.resize(analysis.thumbnail, (max(1, round(tw * f)), max(1, round(th * f))), interpolation=cv2.INTER_AREA)
    px = f * mpp0 / analysis.thumbnail_mpp  # thumbnail-panel px per level-0 px
    _draw_region(thumb, analysis, (0.0, 0.0), px)  # on the slide alone: an annotation reaching past it stops at its edge
    thumb = _beside(thumb, col_w)
    window_level0 = region_px * region_mpp / mpp0
    regions = []
    if slide is not None:  # each window wholly inside the slide: one at its edge is moved in, not cut short
        w0, h0 = slide.dimensions
        inside = {}  # two windows moved onto one are shown once
        for x, y, why in _regions(analysis, n_regions, window_level0):
            inside.setdefault((int(max(0, min(x, w0 - window_level0))), int(max(0, min(y, h0 - window_level0)))), why)
        regions = [(x, y, why) for (x, y), why in inside.items()]
    for k, (x, y, _) in enumerate(regions, start=1):
        p0 = (int(x * px), int(y * px))
        p1 = (int((x + window_level0) * px), int((y + window_level0) * px))
        cv2.rectangle(thumb, p0, p1, (0, 160, 255), 2)
        cv2.putText(thumb, str(k), (p0[0] + 3, p0[1] + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 90, 200), 2, cv2.LINE_AA)
    caption = ("Tissue; boxes: the regions below" if regions else
               "Tissue" + ("" if slide is not None else " (the slide could not be opened again for regions)"))
    panels = [np.vstack([_text_band([(caption, 13)], col_w, pad=3), thumb, _scale_band(col_w, analysis.thumbnail_mpp / f)])]
    grey = _grey_panel(analysis.thumbnail, f)
    for score, rgb in (("3+", (200, 0, 0)), ("2+", (235, 120, 0)), ("1+", (215, 170, 0))):
        frac, total = _heatmap(analysis, counted[score], bin_um)
        panels.append(_heat_panel(grey, analysis.thumbnail_mpp / f, frac, total, bin_um,
                                  f"% of tumour cells counted for {score} per {bin_um:.0f} µm bin (unshaded: "
                                  f"fewer than {HEAT_MIN_CELLS} tumour cells)", col_w, rgb))
    top_h = max(p.shape[0] for p in panels)
    top = np.hstack([np.pad(p, ((0, top_h - p.shape[0]), (0, 8), (0, 0)), constant_values=255) for p in panels])
    top = np.pad(top, ((0, 0), (0, width - top.shape[1]), (0, 0)), constant_values=255)
    rows = [top]
    tiles = []
    for k, (x, y, why) in enumerate(regions, start=1):
        img = slide.read_region((x, y), (region_px, region_px), mpp=region_mpp).copy()
        near = np.flatnonzero((t["x"] >= x - 50 / mpp0) & (t["x"] < x + window_level0 + 50 / mpp0)
                              & (t["y"] >= y - 50 / mpp0) & (t["y"] < y + window_level0 + 50 / mpp0))
        _draw_cells(img, analysis, near, (x, y), mpp0 / region_mpp)
        _draw_region(img, analysis, (x, y), mpp0 / region_mpp)
        label = _text_band([(f"{k}: {why}; at ({x * mpp0 / 1000:.2f}, {y * mpp0 / 1000:.2f}) mm, {region_mpp:g} µm/px", 12)], region_px, pad=3)
        tiles.append(np.vstack([label, img, _scale_band(region_px, region_mpp)]))
    per_row = max(1, width // (region_px + 4))
    for i in range(0, len(tiles), per_row):
        chunk = tiles[i:i + per_row]
        hh = max(c.shape[0] for c in chunk)
        row = np.hstack([np.pad(c, ((0, hh - c.shape[0]), (0, 4), (0, 0)), constant_values=255) for c in chunk])
        rows.append(np.pad(row, ((4, 0), (0, max(0, width - row.shape[1])), (0, 0)), constant_values=255)[:, :width])
    return np.vstack(rows)


def overlay_image(analysis: SlideAnalysis, slide: Slide | None = None, *, field_max_px: int = FIELD_MAX_PX,
                  n_regions: int = 6, region_px: int = 512, region_mpp: float = 0.5) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """The overlay as RGB, and for a field of view the box (x, y, width, height) of the field panel in it
    (None for a whole slide).

    Field of view (longest side <= ``field_max_px`` level-0 px): title band (slide, score, level,
    reason, flags, QC), the field at its own resolution with each cell's ring (tumour categories in
    colour, non-tumour grey), a scale bar under it (the image is left clear), then the legend; at
    least MIN_OVERLAY_PX wide. Whole slide: title; thumbnail with
    the regions boxed, heatmaps of the share of tumour cells counted for 3+, 2+ and 1+ under its guideline; the
    ``n_regions`` most informative ``region_px`` windows at ``region_mpp`` µm/px with rings; legend.
    """
    field = max(_slide_size(analysis, slide)) <= field_max_px
    if field:
        canvas, mpp = _field_panel(analysis, slide)
        width = max(canvas.shape[1], MIN_OVERLAY_PX)
        scale = max(1.0, width / TEXT_WIDTH_PX)
        body = np.vstack([canvas, _scale_band(canvas.shape[1], mpp, scale=scale)])
        body = np.pad(body, ((0, 0), (0, width - body.shape[1]), (0, 0)), constant_values=255)  # a narrow field: white beside it
    else:
        width = 3 * (min(max(region_px, 400), 600) + 4)  # three region tiles a row, 4 px apart
        scale = 1.0  # a slide's overlay has a width of its own
        body = _slide_panels(analysis, slide, n_regions=n_regions, region_px=region_px, region_mpp=region_mpp, width=width)
    title = _text_band(_title_lines(analysis, scale), width, pad=round(6 * scale))
    legend = _legend(width, _legend_entries(analysis), size=round(13 * scale))
    out = np.vstack([title, body, legend])
    return out, ((0, title.shape[0], canvas.shape[1], canvas.shape[0]) if field else None)


def overlay_png(analysis: SlideAnalysis, slide: Slide | None = None, **kw) -> bytes:
    """overlay_image encoded as PNG."""
    rgb, _ = overlay_image(analysis, slide, **kw)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"{analysis.result.slide}: could not encode the overlay PNG")
    return png.tobytes()


def _reopen(analysis: SlideAnalysis) -> Slide | None:
    """The analysed slide opened again (for the overlay's full-resolution pixels), or None if it cannot be."""
    try:
        return open_slide(analysis.result.slide, mpp=analysis.result.mpp)
    except (SlideError, OSError, ValueError):
        return None


def write_outputs(analysis: SlideAnalysis, out_dir: str | os.PathLike, *, cells_csv: bool = False,
                  slide: Slide | None = None, workers: int = 1) -> None:
    """Write the per-slide outputs into ``out_dir`` (OUTPUT_FILES, plus cells.csv when ``cells_csv``);
    an earlier result.json removed first and the new one written last, so it marks completion (a run
    killed in between leaves no result.json beside a mix of two runs' files). ``slide``: the analysed slide, when it is in memory
    (otherwise it is opened again from ``analysis.result.slide`` for the overlay). ``workers`` > 1: that
    many forked processes make the GeoJSON's text (the same bytes), where the platform forks (FORKS),
    and a thread of this process draws the overlay meanwhile, started once they have forked (a
    thread never runs across a fork). Drawn in a forked process instead, the
    overlay added 100 MB to the peak of a 1.3-gigapixel slide."""
    if not isinstance(analysis, SlideAnalysis):  # score_slide's SlideResult has no cells to write
        raise TypeError(f"write_outputs needs analyse_slide's SlideAnalysis (the result with its cells and thumbnail), "
                        f"got {type(analysis).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)  # an earlier run's outputs are incomplete from here until it is written again
    if not cells_csv:  # an earlier run's cells.csv would stand, stale, beside this run's finished outputs
        (out / "cells.csv").unlink(missing_ok=True)
    own = slide is None
    slide = slide if slide is not None else _reopen(analysis)
    try:
        size = _slide_size(analysis, slide)
        parallel = workers > 1 and len(analysis.cells["x"]) > GEOJSON_CHUNK and FORKS  # the workers inherit the analysis

        with ThreadPoolExecutor(1) as thread:
            drawn: list[Future] = []
            features = _features_in_workers(analysis, size, workers, lambda: drawn.append(thread.submit(
                overlay_png, analysis, slide))) if parallel else None
            with atomic_file(out / "cells.geojson") as f:
                write_cells_geojson(analysis, f, slide_size=size, features=features)
            with atomic_file(out / "cells.parquet") as f:  # after the GeoJSON: beside it, the peak grows (README)
                write_cells_parquet(analysis, f)
            if cells_csv:
                with atomic_file(out / "cells.csv") as f:
                    write_cells_csv(analysis, f)
            png = result_of(drawn[0]) if drawn else overlay_png(analysis, slide)
        atomic_write(out / "overlay.png", png)
    finally:
        if own and slide is not None and hasattr(slide, "close"):
            slide.close()
    atomic_write(out / "result.json", analysis.result.to_json())
