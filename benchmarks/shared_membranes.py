"""Shared membranes: how much darker a border reads where both cells have their own membrane, and the
intensity thresholds on each cell's own deposit.

    python benchmarks/shared_membranes.py [--seed 1000] [--real-borders]

Generator fields on tuning seeds (from --seed; the accuracy benchmarks use other seeds) of intense,
weak-to-moderate and faint cells, complete and partial, scattered and in clones. Every truth cell is
paired with the scored cell on its nucleus (one-to-one within 4 µm). For each stained cell the
pipeline's reading is recorded: the line OD of its read sectors (membrane.MembraneSummary.read) and which
of them are shared (the cell across has its own membrane: membrane.own_membrane_od's ``shared``).

Printed: per drawn category, the read line OD over the drawn deposit OD where little (under 20%), some and
most (over 70%) of the read border is shared, whose ratio is membrane.SHARED_MEMBRANE_GAIN; then, for
each gain, the weak_od and strong_od that best separate the intensity levels of the truth (faint, weak to
moderate, intense: the cells as seen) and the errors there, beside the defaults'. The recording wraps
pipeline.own_membrane_od, the one place the reading passes.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

import her2score.pipeline as pipeline
from her2score.categories import Thresholds
from her2score.slide import ArraySlide
from her2score.synthetic import REAL_BORDERS, Confounders, generate_field

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from realdata import _pairs  # noqa: E402

COMPOSITIONS = [{"strong_complete": 0.08}, {"strong_complete": 0.12}, {"strong_partial": 0.12}, {"strong_partial": 0.20},
                {"weak_moderate_complete": 0.12}, {"weak_moderate_complete": 0.5},
                {"strong_complete": 0.6, "weak_moderate_complete": 0.2}, {"weak_moderate_complete": 0.3, "strong_partial": 0.1},
                {"faint_partial": 0.4}]
GAINS = (1.0, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8)
LEVELS = ("faint", "weak_moderate", "strong")
FORMER = (0.14, 0.55)
"""weak_od and strong_od when the level was read from the line's OD, shared or not (her2score 0.4.4)."""
_seen: dict = {}


def _recording(sector_od, read, shared, **kwargs):
    _seen.update(od=np.nan_to_num(sector_od.astype(np.float32)), read=read, shared=shared & read)
    return _own_membrane_od(sector_od, read, shared, **kwargs)


_own_membrane_od, pipeline.own_membrane_od = pipeline.own_membrane_od, _recording


def _level(category: np.ndarray) -> np.ndarray:
    """Intensity level (index into LEVELS; -1: unstained) of category names."""
    return np.select([np.char.startswith(category, "strong"), np.char.startswith(category, "weak")], [2, 1],
                     np.where(category == "none", -1, 0))


def one(job: tuple[dict | None, str | None, int, bool, bool, bool]) -> dict:
    composition, score, seed, clonal, gastric, real_borders = job
    f = generate_field(score, seed=seed, composition=composition, clonal=clonal, gastric=gastric, size_px=(768, 768),
                       confounders=REAL_BORDERS if real_borders else Confounders())
    cells = pipeline.analyse_slide(ArraySlide(f.image, mpp=f.mpp)).cells
    truth, det = _pairs(np.column_stack([f.cells["x_px"], f.cells["y_px"]]), np.column_stack([cells["x"], cells["y"]]), 4 / f.mpp)
    stained = np.asarray(cells["category"])[det] != "none"
    truth, det = truth[stained], det[stained]
    od, read, shared = (_seen[k][det] for k in ("od", "read", "shared"))
    return {"drawn": np.asarray(f.cells["deposit_category"])[truth].astype(str), "deposit_od": np.asarray(f.cells["deposit_od"])[truth],
            "seen": np.asarray(f.cells["category"])[truth].astype(str), "n_read": np.maximum(read.sum(1), 1),
            "line_sum": (od * read).sum(1), "shared_sum": (od * shared).sum(1), "n_shared": shared.sum(1)}


def _errors(level: np.ndarray, od: np.ndarray, weak_od: float, strong_od: float) -> np.ndarray:
    """3x3 counts: true level (rows) against the level read at these thresholds."""
    read = np.select([od >= strong_od, od >= weak_od], [2, 1], 0)
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (level, read), 1)
    return cm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1000, help="first tuning seed (default 1000)")
    ap.add_argument("--real-borders", action="store_true", help="draw real slides' unstained-border texture in every field")
    args = ap.parse_args()
    s, rb = args.seed, args.real_borders
    jobs = [(c, None, s + 7 * i + k, clonal, False, rb) for i, c in enumerate(COMPOSITIONS) for k in range(2) for clonal in (False, True)]
    jobs += [(None, score, s + 500 + k, False, False, rb) for score in ("1+", "2+", "3+") for k in range(3)]
    jobs += [({"strong_lateral": 0.12}, None, s + 900 + k, True, True, rb) for k in range(2)]
    with ProcessPoolExecutor(2) as ex:
        parts = list(ex.map(one, jobs))
    d = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    line = d["line_sum"] / d["n_read"]
    share = d["n_shared"] / d["n_read"]
    print(f"{len(jobs)} generator fields (seeds from {s}{', real-border texture' if rb else ''}); {len(line)} stained cells paired with their truth")
    print("\nread line OD / drawn deposit OD (median), by the share of the read border that is shared:")
    print(f"{'drawn category':24s} {'little (<20%)':>16s} {'some':>16s} {'most (>70%)':>16s}")
    for cat in ("strong_complete", "strong_lateral", "strong_partial", "weak_moderate_complete", "faint_partial"):
        cols = []
        for lo, hi in ((-1, 0.2), (0.2, 0.7), (0.7, 2)):
            m = (d["drawn"] == cat) & (share > lo) & (share <= hi) & (d["deposit_od"] > 0)
            cols.append(f"{np.median(line[m] / d['deposit_od'][m]):.3f} (n={m.sum()})" if m.sum() >= 5 else "-")
        print(f"{cat:24s} " + " ".join(f"{c:>16s}" for c in cols))
    level = _level(d["seen"])
    keep = level >= 0
    t = Thresholds()
    print(f"\nintensity levels of the truth (faint / weak-moderate / intense): {np.bincount(level[keep], minlength=3).tolist()}")
    print(f"{'gain':>5s} {'best weak_od':>12s} {'faint<->wm errors':>18s} {'best strong_od':>14s} {'wm<->intense errors':>20s}"
          f"   errors at the defaults ({t.weak_od}, {t.strong_od})")
    for gain in GAINS:
        own = ((d["line_sum"] - d["shared_sum"] + d["shared_sum"] / gain) / d["n_read"])[keep]
        lv = level[keep]
        strong = min(np.arange(0.25, 0.65, 0.01), key=lambda x: (c := _errors(lv, own, t.weak_od, x))[1, 2] + c[2, 1] + c[2, 0])
        weak = min(np.arange(0.06, 0.20, 0.005), key=lambda x: (c := _errors(lv, own, x, strong))[0, 1] + c[0, 2] + c[1, 0])
        cm, cd = _errors(lv, own, weak, strong), _errors(lv, own, t.weak_od, t.strong_od)
        print(f"{gain:5.2f} {weak:12.3f} {cm[0, 1] + cm[0, 2] + cm[1, 0]:18d} {strong:14.2f} {cm[1, 2] + cm[2, 1] + cm[2, 0]:20d}"
              f"   {cd[0, 1] + cd[0, 2] + cd[1, 0]} and {cd[1, 2] + cd[2, 1] + cd[2, 0]}")
    cf = _errors(level[keep], line[keep], *FORMER)
    print(f"the line's own OD (gain 1) at the former thresholds {FORMER}: {cf[0, 1] + cf[0, 2] + cf[1, 0]} and "
          f"{cf[1, 2] + cf[2, 1] + cf[2, 0]} errors")


if __name__ == "__main__":
    main()
