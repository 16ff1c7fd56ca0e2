"""Per-slide outputs, each written atomically: result.json, cells.csv, overlay.png, cells.geojson."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from .categories import CATEGORIES
from .membrane import N_SECTORS
from .pipeline import SlideAnalysis

__all__ = ["atomic_file", "atomic_write", "write_outputs", "write_cells_csv", "write_cells_geojson", "remove_stale_temp_files", "CATEGORY_COLOURS", "OUTPUT_FILES"]

CATEGORY_COLOURS: dict[str, tuple[int, int, int]] = {
    "none": (70, 130, 255),
    "faint_partial": (255, 230, 0),
    "weak_moderate_complete": (255, 140, 0),
    "strong_complete": (220, 0, 0),
    "weak_moderate_lateral": (190, 90, 255),
    "strong_lateral": (120, 0, 160),
}
"""RGB colour of each category in the overlay and in QuPath."""

OUTPUT_FILES = ("result.json", "cells.csv", "overlay.png", "cells.geojson")


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary ``.NAME.XXXXXXXX.tmp`` in the same folder,
    fsynced and renamed over ``path`` when the block ends without error (deleted otherwise), so a
    reader or a killed run only ever sees the old or the new file whole.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (see atomic_file)."""
    with atomic_file(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def is_temp_file(name: str, targets=None) -> bool:
    """Whether ``name`` is a temporary file that atomic_write makes for one of ``targets`` (file names)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    stem = name[1:-4]  # "NAME.XXXXXXXX"
    base, _, rand = stem.rpartition(".")
    return bool(base and rand) and (targets is None or base in targets)


def remove_stale_temp_files(folder: str | os.PathLike, targets=OUTPUT_FILES) -> list[Path]:
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


def _fmt(values: np.ndarray) -> list[str]:
    """Text of one cell-table column: integers for flags, 4 decimals for measurements."""
    if values.dtype == bool:
        return values.astype(np.uint8).astype(str).tolist()
    if values.dtype.kind == "f":
        return [f"{v:.4f}" for v in values.tolist()]
    return [str(v) for v in values.tolist()]


def write_cells_csv(analysis: SlideAnalysis, f: BinaryIO) -> None:
    """One row per cell: position (level-0 px and µm), tumour flag, category, pattern and measurements."""
    t = analysis.cells
    mpp = analysis.result.mpp
    cols = [k for k in t if k not in ("x", "y", "radii_um")]
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


def _outlines_level0(analysis: SlideAnalysis, a: int = 0, b: int | None = None) -> np.ndarray:
    """(n, N_SECTORS, 2) outline vertices of cells a..b in level-0 px, from the per-sector radii."""
    t = analysis.cells
    angles = -np.pi + (np.arange(N_SECTORS) + 0.5) * 2 * np.pi / N_SECTORS
    r_px = t["radii_um"][a:b] / analysis.result.mpp
    xs = t["x"][a:b, None] + r_px * np.cos(angles)[None]
    ys = t["y"][a:b, None] + r_px * np.sin(angles)[None]
    return np.stack([xs, ys], axis=-1)


def write_cells_geojson(analysis: SlideAnalysis, f: BinaryIO) -> None:
    """QuPath-importable FeatureCollection: one detection per cell (its outline in level-0 px, 0.1 px),
    classified by its category, with completeness, membrane OD, width and the tumour flag."""
    t = analysis.cells
    classes = {
        (cat, tumour): json.dumps({"name": cat if tumour else f"{cat} (non-tumour)", "color": list(rgb)}, separators=(",", ":"))
        for cat, rgb in CATEGORY_COLOURS.items() for tumour in (True, False)
    }
    per = 2 * N_SECTORS
    f.write(b'{"type":"FeatureCollection","features":[')
    for a in range(0, len(t["x"]), CHUNK):
        b = min(a + CHUNK, len(t["x"]))
        xy = [f"{v:.1f}" for v in _outlines_level0(analysis, a, b).ravel().tolist()]
        feats = []
        for k, (cat, tumour, comp, od, width) in enumerate(zip(
            t["category"][a:b].tolist(), t["tumour"][a:b].tolist(), t["completeness"][a:b].tolist(),
            t["membrane_od"][a:b].tolist(), t["width_um"][a:b].tolist(),
        )):
            v = xy[k * per : (k + 1) * per]
            pts = [f"[{v[j]},{v[j + 1]}]" for j in range(0, per, 2)]
            feats.append(
                '{"type":"Feature","geometry":{"type":"Polygon","coordinates":[[' + ",".join(pts + pts[:1]) + ']]},'
                f'"properties":{{"objectType":"detection","classification":{classes[(cat, bool(tumour))]},'
                f'"measurements":{{"completeness":{comp:.4f},"membrane_od":{od:.4f},"width_um":{width:.3f},'
                f'"tumour":{int(bool(tumour))}}}}}}}'
            )
        f.write(((b"," if a else b"") + ",".join(feats).encode()))
    f.write(b"]}\n")


def overlay_png(analysis: SlideAnalysis, *, max_side: int = 2000) -> bytes:
    """The tissue thumbnail with each tumour cell drawn in its category colour (non-tumour cells grey)."""
    thumb = analysis.thumbnail
    f = min(1.0, max_side / max(thumb.shape[:2]))
    canvas = cv2.resize(thumb, None, fx=f, fy=f, interpolation=cv2.INTER_AREA) if f < 1 else thumb.copy()
    px_per_level0 = analysis.result.mpp / analysis.thumbnail_mpp * f
    t = analysis.cells
    small = np.median(t["radii_um"]) / analysis.result.mpp * px_per_level0 < 3 if len(t["x"]) else True
    groups = [(~t["tumour"], (150, 150, 150))] + [(t["tumour"] & (t["category"] == c), CATEGORY_COLOURS[c]) for c in CATEGORIES]
    for a in range(0, len(t["x"]), CHUNK):  # non-tumour cells first, tumour cells drawn over them
        b = min(a + CHUNK, len(t["x"]))
        if small:
            for sel, colour in groups:
                for x, y in zip(t["x"][a:b][sel[a:b]] * px_per_level0, t["y"][a:b][sel[a:b]] * px_per_level0):
                    cv2.circle(canvas, (int(x), int(y)), 1, colour, -1)
            continue
        outlines = np.round(_outlines_level0(analysis, a, b) * px_per_level0).astype(np.int32)
        for sel, colour in groups:
            if sel[a:b].any():
                cv2.polylines(canvas, list(outlines[sel[a:b]]), True, colour, 1, cv2.LINE_AA)
    legend = np.full((18 * len(CATEGORIES) + 8, max(canvas.shape[1], 260), 3), 255, np.uint8)
    for k, name in enumerate(CATEGORIES):
        y = 14 + 18 * k
        cv2.rectangle(legend, (6, y - 10), (18, y + 2), CATEGORY_COLOURS[name], -1)
        cv2.putText(legend, name.replace("_", " "), (24, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if legend.shape[1] > canvas.shape[1]:
        canvas = np.pad(canvas, ((0, 0), (0, legend.shape[1] - canvas.shape[1]), (0, 0)), constant_values=255)
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.vstack([canvas, legend]), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode the overlay PNG")
    return png.tobytes()


def write_outputs(analysis: SlideAnalysis, out_dir: str | os.PathLike) -> None:
    """Write the four per-slide outputs into ``out_dir``; result.json last, so it marks completion."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "cells.csv") as f:
        write_cells_csv(analysis, f)
    atomic_write(out / "overlay.png", overlay_png(analysis))
    with atomic_file(out / "cells.geojson") as f:
        write_cells_geojson(analysis, f)
    atomic_write(out / "result.json", analysis.result.to_json())
