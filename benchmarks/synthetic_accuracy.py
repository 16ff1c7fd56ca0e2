"""Accuracy of the classical scorer on freshly generated synthetic fields, against their physical truth.

    python benchmarks/synthetic_accuracy.py --n-per-class 50 --seed 5000

Reports per-class field accuracy (breast ASCO/CAP 2023), the confusion matrix, per-cell matching
(detected nucleus within 3 µm of a true nucleus), per-cell completeness error and category
agreement, and seconds per megapixel. Use one seed range for tuning thresholds and another for
the figures you report.
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy.spatial import cKDTree

from her2score.pipeline import analyse_slide
from her2score.results import SCORES
from her2score.slide import ArraySlide
from her2score.synthetic import generate_field


def one(args):
    score, seed, jitter = args
    f = generate_field(score, seed=seed, stain_jitter=jitter)
    t0 = time.perf_counter()
    a = analyse_slide(ArraySlide(f.image, mpp=f.mpp))
    secs = time.perf_counter() - t0
    c = a.cells
    truth = f.cells
    tum = np.asarray(truth["tumour"], bool)
    tree = cKDTree(np.column_stack([truth["x_px"], truth["y_px"]]))
    d, idx = tree.query(np.column_stack([c["x"], c["y"]]))
    hit = d * f.mpp <= 3.0
    hit &= tum[idx]
    err = np.abs(c["completeness"][hit] - np.asarray(truth["completeness"])[idx[hit]])
    same = c["category"][hit] == np.asarray(truth["category"])[idx[hit]]
    return dict(truth=score, got=a.result.score, secs=secs, mp=f.image.shape[0] * f.image.shape[1] / 1e6,
                n_true=int(tum.sum()), n_hit=int(len(set(idx[hit].tolist()))), err=err.tolist(), same=same.tolist())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-per-class", type=int, default=50)
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--stain-jitter", type=float, default=0.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    jobs = [(s, a.seed + 1000 * k + i, a.stain_jitter) for k, s in enumerate(SCORES) for i in range(a.n_per_class)]
    with ProcessPoolExecutor(a.workers) as pool:
        rows = list(pool.map(one, jobs, chunksize=4))
    cm = np.zeros((4, 4), int)
    for r in rows:
        cm[SCORES.index(r["truth"]), SCORES.index(r["got"])] += 1
    err = np.concatenate([r["err"] for r in rows])
    same = np.concatenate([r["same"] for r in rows])
    out = {
        "n_fields": len(rows),
        "accuracy": float(np.trace(cm) / cm.sum()),
        "per_class_accuracy": {s: float(cm[i, i] / max(cm[i].sum(), 1)) for i, s in enumerate(SCORES)},
        "confusion_rows_truth_cols_called": {s: cm[i].tolist() for i, s in enumerate(SCORES)},
        "cells_detected_fraction": float(sum(r["n_hit"] for r in rows) / sum(r["n_true"] for r in rows)),
        "completeness_mae": float(err.mean()),
        "completeness_median_abs_error": float(np.median(err)),
        "cell_category_agreement": float(same.mean()),
        "seconds_per_megapixel_one_core": float(sum(r["secs"] for r in rows) / sum(r["mp"] for r in rows)),
    }
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
