"""Where the truth's intensity levels and patterns separate on what is read: the calibration of weak_od,
strong_od, complete_completeness and lateral_gap.

    python benchmarks/threshold_calibration.py [--n-per-class 40] [--seed 1000]

On generator fields from the tuning seeds (1+, 2+ and 3+, every fourth gastric; seeds from ``--seed``,
held apart from the accuracy seeds of synthetic_accuracy.py and category_percentages.py), each true cell
is matched to the scored cell within 4 µm (one to one, nearest), and the pairs whose scored cell is counted
as tumour and has a membrane read are kept (a true non-tumour cell read so counts, as ``none``). For each
threshold the script prints, over a grid, the number of cells it puts on the wrong side, and the value
that puts fewest there; ``categories.Thresholds`` holds the defaults.

- ``weak_od``, ``strong_od``: the read membrane OD (``membrane_od``: log10 DAB OD along the body of its
  stained arcs) against the level of the cell's truth as seen (faint, weak-to-moderate or strong:
  DESIGN.md's 0.2 / 0.6 deposit bands);
- ``complete_completeness``: the pattern categories.classify_cells reads with the threshold at each value
  (complete, or not) against the truth's pattern, over the cells whose truth is weak-to-moderate, strong or
  none (a faint cell is faint whatever its pattern); ``lateral_gap``, the longest unstained arc under which a ring
  reads complete, the same way.

The truth's level and pattern are those of the drawn deposit, or of the stained rim where the rim reads
for the cell (synthetic._seen_categories).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from her2score.categories import PATTERNS, Thresholds, classify_cells
from her2score.pipeline import analyse_slide
from her2score.slide import ArraySlide
from her2score.synthetic import generate_field

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from realdata import _pairs  # noqa: E402

LEVELS = {"faint": 0, "weak_moderate": 1, "strong": 2}
"""The truth's intensity levels, by the prefix of its category name."""
BOUNDARIES = (("weak_od", 0, 1, np.arange(0.08, 0.205, 0.01)), ("strong_od", 1, 2, np.arange(0.40, 0.605, 0.01)))
"""Each intensity threshold: the two levels it separates and the read OD grid it is tried on."""
COMPLETE_GRID = np.arange(0.50, 0.805, 0.01)
"""The complete_completeness values tried."""
GAP_GRID = np.arange(0.15, 0.355, 0.01)
"""The lateral_gap values tried."""


def one(job: tuple[str, int, bool]) -> dict[str, np.ndarray]:
    """Per matched tumour cell of one field whose membrane is read: its truth's category, and its read
    membrane OD, completeness, longest arc and longest gap."""
    score, seed, gastric = job
    f = generate_field(score, seed=seed, gastric=gastric)
    c = analyse_slide(ArraySlide(f.image, mpp=f.mpp)).cells
    truth, read = _pairs(np.column_stack([f.cells["x_px"], f.cells["y_px"]]), np.column_stack([c["x"], c["y"]]), 4 / f.mpp)
    kept = np.asarray(c["tumour"])[read] & (np.asarray(c["membrane_od"])[read] > 0)
    return {"category": np.asarray(f.cells["category"])[truth[kept]].astype(str),
            **{k: np.asarray(c[k])[read[kept]] for k in ("membrane_od", "completeness", "longest_arc", "longest_gap")}}


def _report(name: str, grid: np.ndarray, n: int, wrong_at) -> None:
    """Print the cells ``wrong_at(t)`` puts on the wrong side of threshold ``name`` over ``grid``, the fewest, and at the
    default; each threshold taken as float32, as categories.classify_cells compares it with the float32 measurements
    (a completeness of 13/20 reads complete at 0.65)."""
    grid = np.round(grid, 2).astype(np.float32)
    wrong = [wrong_at(t) for t in grid]
    default = np.float32(getattr(Thresholds(), name))
    print(f"{name}: {n:,} cells; fewest on the wrong side at {grid[int(np.argmin(wrong))]:.2f} ({min(wrong):,}); "
          f"the default {default:.2f}: {wrong_at(default):,}")
    print("   " + "  ".join(f"{t:.2f}:{w}" for t, w in zip(grid, wrong)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-per-class", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    jobs = [(s, a.seed + 100 * k + i, i % 4 == 3) for k, s in enumerate(("1+", "2+", "3+")) for i in range(a.n_per_class)]
    with ProcessPoolExecutor(a.workers) as pool:
        parts = list(pool.map(one, jobs))
    cells = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    prefix = np.char.rpartition(cells["category"], "_")[:, 0]
    level = np.array([LEVELS.get(x, -1) for x in prefix])
    od = cells["membrane_od"]
    print(f"{len(jobs)} fields (seeds from {a.seed}); cells with a read membrane: {len(od):,} ("
          + ", ".join(f"{name} {int((level == v).sum()):,}" for name, v in LEVELS.items()) + ")")
    for name, low, high, grid in BOUNDARIES:
        pair = (level == low) | (level == high)
        _report(name, grid, int(pair.sum()), lambda t, pair=pair, high=high: int(((od[pair] >= t) != (level[pair] == high)).sum()))
    judged = (level >= 1) | (cells["category"] == "none")
    complete = np.char.endswith(cells["category"], "complete")[judged]
    read = [cells[k][judged] for k in ("completeness", "longest_arc", "longest_gap", "membrane_od")]

    def wrong_pattern(name: str, t: float) -> int:
        pattern = classify_cells(*read, dataclasses.replace(Thresholds(), **{name: t}))[1]
        return int(((pattern == PATTERNS.index("complete")) != complete).sum())

    for name, grid in (("complete_completeness", COMPLETE_GRID), ("lateral_gap", GAP_GRID)):
        _report(name, grid, int(judged.sum()), lambda t, name=name: wrong_pattern(name, t))


if __name__ == "__main__":
    main()
