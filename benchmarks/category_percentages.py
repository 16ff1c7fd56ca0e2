"""Per-category percentages of tumour cells: the classical pipeline against the generator's truth.

    python benchmarks/category_percentages.py --n-per-class 10 --seed 7000 [--real-borders]

For each freshly generated synthetic field (512 x 512 px at 0.5 µm/px, breast ASCO/CAP 2023) the
pipeline's percentage of tumour cells in each category is compared with the true percentage
(the generator's own cell counts). Prints, per category, in percentage points: the mean absolute
error, the Bland-Altman bias and 95% limits, the largest error, and the share of fields within
±5 points (issue 12's bound); and the fields' score accuracy. ``--real-borders`` draws every field
with the unstained-border texture of real slides (synthetic.REAL_BORDERS): the figures a real slide
of the same composition would give. ``--json`` also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from her2score.categories import CATEGORIES
from her2score.evaluate import percent_agreement
from her2score.pipeline import analyse_slide
from her2score.results import SCORES
from her2score.slide import ArraySlide
from her2score.synthetic import REAL_BORDERS, Confounders, generate_field

BOUND = 5.0
"""Percentage points: the largest acceptable per-category error on a generator field."""


def one(job: tuple[str, int, bool]) -> dict:
    score, seed, real_borders = job
    f = generate_field(score, seed=seed, confounders=REAL_BORDERS if real_borders else Confounders())
    r = analyse_slide(ArraySlide(f.image, mpp=f.mpp)).result
    counts = f.truth_counts()
    total = sum(counts.values())
    truth = {c: 100.0 * counts.get(c, 0) / total for c in CATEGORIES}
    return {"truth_score": score, "score": r.score, "seed": seed, "called": dict(r.percentages), "truth": truth}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-per-class", type=int, default=10)
    ap.add_argument("--seed", type=int, default=7000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--real-borders", action="store_true", help="draw real slides' unstained-border texture")
    ap.add_argument("--json")
    a = ap.parse_args()
    jobs = [(s, a.seed + 1000 * k + i, a.real_borders) for k, s in enumerate(SCORES) for i in range(a.n_per_class)]
    with ProcessPoolExecutor(a.workers) as pool:
        rows = list(pool.map(one, jobs, chunksize=2))
    pairs = [(r["called"], r["truth"]) for r in rows]
    stats = percent_agreement(pairs)
    for c, st in stats.items():
        d = np.array([p[0].get(c, 0.0) - p[1].get(c, 0.0) for p in pairs])
        st["within_bound"] = float(np.mean(np.abs(d) <= BOUND))
    out = {"n_fields": len(rows), "seed": a.seed, "real_borders": a.real_borders, "bound_points": BOUND,
           "score_accuracy": float(np.mean([r["score"] == r["truth_score"] for r in rows])),
           "per_category": stats}
    print(f"{len(rows)} fields (seeds from {a.seed}{'; real borders' if a.real_borders else ''}); score accuracy {out['score_accuracy']:.3f}")
    print(f"{'category':<26}{'MAE':>7}{'bias':>8}{'95% limits':>18}{'max':>8}{'within ±5':>11}")
    for c, st in stats.items():
        print(f"{c:<26}{st['mae']:7.2f}{st['bias']:+8.2f}   [{st['loa_low']:+6.1f}, {st['loa_high']:+6.1f}]"
              f"{st['max_abs_error']:8.1f}{st['within_bound']:11.0%}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({**out, "fields": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
