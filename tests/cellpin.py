"""Per-cell outputs of the pipeline on three fixed fields, pinned so that speed-ups of the pixel steps
can be shown to measure the same cells (tests/test_speedups.py).

    python tests/cellpin.py      # rewrites tests/data/cell_outputs.npz from the code as it stands

Run it only when a change is meant to alter the measurements, and say so in the commit. Per field
it keeps the cell table of ``analyse_slide`` (categories, patterns, compartments, tumour flags, every
numeric column, and each outline's vertex count, area and mean vertex) and the per-sector values of
``score_tile`` over the whole field as one tile (cell labels, sector contrast and OD, the
noise-floor histogram).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PIN = ROOT / "tests" / "data" / "cell_outputs.npz"
"""Where the pinned outputs live (a few tens of kB)."""
FIELDS = ("field_1plus_a", "field_3plus_a", "skimage-colon")
"""Two synthetic sample fields and scikit-image's real colon IHC image, all at 0.5 µm/px."""
TEXT = ("category", "pattern", "compartment", "left_out_as")
"""Text columns of the cell table, kept as their index into the names of ``her2score.categories`` / ``tumour`` (a
counted cell's left_out_as, None, as -1)."""
TILE = ("label", "sector_contrast", "sector_od", "sector_neighbour")
"""CellMeasurements fields kept from score_tile (the others are in the cell table)."""


def load_field(name: str):
    """The field as an ArraySlide at 0.5 µm/px."""
    from PIL import Image

    from her2score.slide import ArraySlide

    if name == "skimage-colon":
        from skimage.data import immunohistochemistry

        rgb = immunohistochemistry()
    else:
        rgb = np.asarray(Image.open(ROOT / "sample_images" / f"{name}.png").convert("RGB"))
    return ArraySlide(rgb, mpp=0.5, path=f"{name}.png")


def _outline_summary(outlines) -> dict[str, np.ndarray]:
    from her2score.outlines import polygon_area

    return {
        "outline_vertices": np.array([len(p) for p in outlines], np.int32),
        "outline_area": np.array([polygon_area(p) if len(p) else 0.0 for p in outlines], np.float32),
        "outline_mean_xy": np.array([p.mean(0) if len(p) else (0.0, 0.0) for p in outlines], np.float32).reshape(-1, 2),
    }


def cell_outputs(name: str) -> dict[str, np.ndarray]:
    """The pinned outputs of one field, keyed ``<field>/<column>``."""
    from her2score.categories import CATEGORIES, PATTERNS
    from her2score.pipeline import ScoringConfig, analyse_slide, score_tile
    from her2score.stain import H_DAB
    from her2score.tissue import Tile
    from her2score.tumour import COMPARTMENTS, LEFT_OUT

    names = {"category": CATEGORIES, "pattern": PATTERNS, "compartment": COMPARTMENTS, "left_out_as": LEFT_OUT}

    slide = load_field(name)
    out: dict[str, np.ndarray] = {}
    table = analyse_slide(slide).cells
    for key, col in table.items():
        if key == "outline":
            out.update({f"table/{k}": v for k, v in _outline_summary(col).items()})
        elif key in TEXT:
            out[f"table/{key}"] = np.array([-1 if v is None else names[key].index(v) for v in col], np.int8)
        else:
            out[f"table/{key}"] = np.asarray(col)
    w, h = slide.dimensions
    tile = score_tile(slide.read_region((0, 0), (w, h), mpp=0.5), Tile(0, 0, (0, 0, w, h), 0),
                      stains=H_DAB, config=ScoringConfig(), scale=1.0)
    for key in TILE:
        out[f"tile/{key}"] = getattr(tile.cells, key)
    out["tile/contrast_hist"] = tile.contrast_hist
    return {f"{name}/{k}": v for k, v in out.items()}


def main() -> int:
    pinned: dict[str, np.ndarray] = {}
    for name in FIELDS:
        pinned.update(cell_outputs(name))
    PIN.parent.mkdir(parents=True, exist_ok=True)
    tmp = PIN.with_name(PIN.stem + ".tmp.npz")
    np.savez_compressed(tmp, **pinned)
    tmp.replace(PIN)
    print(f"wrote {PIN} ({PIN.stat().st_size / 1e3:.0f} kB, {len(pinned)} arrays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
