"""Where the truth's intensity levels separate on read membrane OD: the calibration of weak_od and strong_od.

    python benchmarks/intensity_bands.py [--n-per-class 40] [--seed 1000]

On generator fields from the tuning seeds (1+, 2+ and 3+, every fourth gastric; seeds from ``--seed``,
held apart from the accuracy seeds of synthetic_accuracy.py and category_percentages.py), each true tumour
cell with a membrane is matched to the scored cell within 4 µm (one to one, nearest), and the read membrane
OD (``membrane_od``: log10 DAB OD along the body of its stained arcs) is compared with the level of its
truth as seen (faint, weak-to-moderate or strong: DESIGN.md's 0.2 / 0.6 deposit bands). For each boundary
the script prints the number of cells a threshold on read OD puts on the wrong side, over a grid, and the
threshold that puts fewest there; ``categories.Thresholds`` holds the defaults. The truth's level is that
of the drawn deposit, or of the stained rim's mean where the rim reads for the cell (synthetic._seen_categories).
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from her2score.categories import Thresholds
from her2score.pipeline import analyse_slide
from her2score.slide import ArraySlide
from her2score.synthetic import generate_field

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from realdata import _pairs  # noqa: E402

LEVELS = {"faint": 0, "weak_moderate": 1, "strong": 2}
"""The truth's intensity levels, by the prefix of its category name."""
BOUNDARIES = (("weak_od", 0, 1, np.arange(0.08, 0.205, 0.01)), ("strong_od", 1, 2, np.arange(0.40, 0.605, 0.01)))
"""Each threshold: the two levels it separates and the read OD grid it is tried on."""


def one(job: tuple[str, int, bool]) -> tuple[np.ndarray, np.ndarray]:
    """(true level, read membrane OD) of the matched tumour cells of one field whose membrane is read."""
    score, seed, gastric = job
    f = generate_field(score, seed=seed, gastric=gastric)
    c = analyse_slide(ArraySlide(f.image, mpp=f.mpp)).cells
    truth, read = _pairs(np.column_stack([f.cells["x_px"], f.cells["y_px"]]), np.column_stack([c["x"], c["y"]]), 4 / f.mpp)
    od = np.asarray(c["membrane_od"])[read]
    keep = np.asarray(c["tumour"])[read] & (od > 0)
    category = np.asarray(f.cells["category"])[truth].astype(str)
    level = np.array([LEVELS.get(x.rsplit("_", 1)[0], -1) for x in category])
    keep &= level >= 0
    return level[keep], od[keep]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-per-class", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    jobs = [(s, a.seed + 100 * k + i, i % 4 == 3) for k, s in enumerate(("1+", "2+", "3+")) for i in range(a.n_per_class)]
    with ProcessPoolExecutor(a.workers) as pool:
        parts = list(pool.map(one, jobs))
    level = np.concatenate([p[0] for p in parts])
    od = np.concatenate([p[1] for p in parts])
    default = Thresholds()
    print(f"{len(jobs)} fields (seeds from {a.seed}); cells with a read membrane: "
          + ", ".join(f"{name} {int((level == v).sum()):,}" for name, v in LEVELS.items()))
    for name, low, high, grid in BOUNDARIES:
        pair = (level == low) | (level == high)
        wrong = [int(((od[pair] >= t) != (level[pair] == high)).sum()) for t in grid]
        best = grid[int(np.argmin(wrong))]
        now = int(((od[pair] >= getattr(default, name)) != (level[pair] == high)).sum())
        print(f"{name}: {int(pair.sum()):,} cells; fewest on the wrong side at {best:.2f} ({min(wrong):,}); "
              f"the default {getattr(default, name):.2f}: {now:,}")
        print("   " + "  ".join(f"{t:.2f}:{w}" for t, w in zip(grid, wrong)))


if __name__ == "__main__":
    main()
