"""Membranes of known truth painted on real tissue: the scorer's calls and percentages against that truth.

    python benchmarks/painted_real.py [--seeds 3] [--json FILE]

Each DeepLIIF Ki67 field with few Ki67-positive nuclei (tests/realdata.py: PAINTED_FIELDS, 0.3 µm/px
estimated) has its Ki67 DAB removed, its DAB background kept (a real HER2 0), and the generator's membrane
deposits are painted on its annotated Ki67-negative tumour cells (her2score.synthetic.paint_membranes) in each composition below,
scattered over the cells and in clones. The counterstain, nuclei, stroma, noise and compression are real;
the membranes and their truth are the generator's. Printed per composition: the true call, how many
fields were called right, wrong but flagged near_cutoff (eligibility asks for review), or wrong with no
such flag; the median true and read share of stained tumour cells; and the per-category mean absolute
error (percentage points). Then every painted cell's true category against the category read for the
scored cell on its nucleus (one-to-one within 4 µm; "missed": no scored cell there; "non-tumour": one
not counted as tumour), and the share lost among cells inside the field and among those its edge cuts.
The truth covers the annotated cells only: unannotated nuclei the scorer counts as tumour read "none"
beside them, so "none" reads high by their share.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from realdata import PAINTED_FIELDS, REAL, matched_categories, painted_at_edge, painted_field  # noqa: E402

from her2score.categories import CATEGORIES  # noqa: E402
from her2score.pipeline import ScoringConfig, analyse_slide  # noqa: E402
from her2score.slide import ArraySlide  # noqa: E402

COMPOSITIONS = {
    "null": {},
    "ultralow (faint 5%)": {"faint_partial": 0.05},
    "faint 8%": {"faint_partial": 0.08},
    "faint 12%": {"faint_partial": 0.12},
    "1+ (faint 40%)": {"faint_partial": 0.40},
    "weak-moderate complete 8%": {"weak_moderate_complete": 0.08},
    "weak-moderate complete 12%": {"weak_moderate_complete": 0.12},
    "2+ (weak-moderate 50%, faint 10%)": {"weak_moderate_complete": 0.50, "faint_partial": 0.10},
    "strong complete 8%": {"strong_complete": 0.08},
    "strong complete 12%": {"strong_complete": 0.12},
    "strong partial 12%": {"strong_partial": 0.12},
    "3+ (strong 60%, weak-moderate 20%, faint 10%)": {"strong_complete": 0.60, "weak_moderate_complete": 0.20, "faint_partial": 0.10},
    "gastric: strong lateral 8%": {"strong_lateral": 0.08},
    "gastric: strong lateral 12%": {"strong_lateral": 0.12},
    "gastric: weak-moderate lateral 12%": {"weak_moderate_lateral": 0.12},
}
"""Shares of the annotated tumour cells in each category (the rest unstained), as generate_field's ``composition``; scored
under breast ASCO/CAP 2023, or gastric (resection) where named so."""


def column(category: str) -> str:
    """A category's heading in the cell-by-cell table: at most 12 characters, each its own (wm: weak_moderate,
    st: strong)."""
    return category.replace("weak_moderate", "wm").replace("strong", "st").replace("faint_partial", "faint")[:12]


def one(job: tuple[str, str, int, bool]) -> dict:
    name, comp, seed, clonal = job
    gastric = comp.startswith("gastric")
    f = painted_field(name, COMPOSITIONS[comp], seed=seed, clonal=clonal, gastric=gastric)
    a = analyse_slide(ArraySlide(f.image, mpp=f.mpp, path=f"{name}-painted"),
                      config=ScoringConfig(guideline="gastric" if gastric else ScoringConfig.guideline))
    r = a.result
    counts = f.truth_counts()
    truth = {c: 100.0 * counts[c] / max(sum(counts.values()), 1) for c in CATEGORIES}
    return {"field": name, "composition": comp, "seed": seed, "clonal": clonal, "true_score": f.score,
            "score": r.score, "level": r.level, "flags": list(r.flags), "truth": truth, "read": dict(r.percentages),
            "cells": matched_categories(f, a.cells), "at_edge": painted_at_edge(name).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="paintings per field, composition and arrangement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", help="also write every field's figures here")
    a = ap.parse_args()
    if not REAL.is_dir():
        sys.exit(f"no real images at {REAL}")
    jobs = [(f, c, s, cl) for c in COMPOSITIONS for f in PAINTED_FIELDS for s in range(a.seeds) for cl in (False, True)]
    with ProcessPoolExecutor(a.workers) as pool:
        rows = list(pool.map(one, jobs, chunksize=2))

    print(f"{len(rows)} painted fields: {', '.join(PAINTED_FIELDS)} x {a.seeds} seeds x scattered/clonal\n")
    print(f"{'composition':48s} {'true call':>10s} {'right':>6s} {'flagged':>8s} {'unflagged':>9s} "
          f"{'stained % true':>15s} {'read':>6s}  largest per-category MAE")
    wrong_unflagged = 0
    for comp in COMPOSITIONS:
        rs = [r for r in rows if r["composition"] == comp]
        right = sum(r["score"] == r["true_score"] for r in rs)
        flagged = sum(r["score"] != r["true_score"] and "near_cutoff" in r["flags"] for r in rs)
        unflagged = len(rs) - right - flagged
        wrong_unflagged += unflagged
        calls = "/".join(sorted({r["true_score"] for r in rs}))
        stained = [100 - r["truth"]["none"] for r in rs]
        read = [100 - r["read"].get("none", 100.0) for r in rs]
        mae = {c: np.mean([abs(r["read"].get(c, 0.0) - r["truth"][c]) for r in rs]) for c in CATEGORIES}
        worst = sorted(mae.items(), key=lambda kv: -kv[1])[:2]
        print(f"{comp:48s} {calls:>10s} {right:>6d} {flagged:>8d} {unflagged:>9d} {np.median(stained):15.1f} {np.median(read):6.1f}  "
              + ", ".join(f"{c} {v:.1f}" for c, v in worst))
    print(f"\nwrong calls without near_cutoff: {wrong_unflagged} of {len(rows)}")

    pairs = Counter(p for r in rows for p in map(tuple, r["cells"]))
    read_as = [c for c in (*CATEGORIES, "non-tumour", "missed") if any(k[1] == c for k in pairs)]
    print("\npainted cells, true category (rows) against the category read (columns; wm: weak_moderate, st: strong), all fields:")
    print(f"{'':24s}" + "".join(f"{column(c):>13s}" for c in read_as))
    for t in CATEGORIES:
        n = [pairs[(t, c)] for c in read_as]
        if sum(n):
            print(f"{t:24s}" + "".join(f"{k:13d}" for k in n))
    for edge, where in ((False, "inside the field"), (True, "cut by its edge")):
        read = [r for row in rows for (_, r), e in zip(row["cells"], row["at_edge"]) if e == edge]
        lost = sum(r in ("missed", "non-tumour") for r in read)
        print(f"painted cells {where}: {len(read)}, {100 * lost / max(len(read), 1):.0f}% lost (missed or not counted as tumour)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
