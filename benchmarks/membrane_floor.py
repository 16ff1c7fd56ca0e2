"""Faint membranes against real unstained membranes: what each membrane threshold finds and what it invents.

    python benchmarks/membrane_floor.py

A faint, incomplete membrane (1+, ultralow) is the weakest signal the scorer must find, and
real tissue texture is what it must not take for one. For each variant of the per-cell
membrane thresholds (categories.Thresholds: ``min_completeness``, ``min_arc_sectors``; a lower
``faint_od`` changes nothing while the slide's noise floor, never under 0.02 OD, is above it) this prints:

- **synthetic 1+ and ultralow fields** (512 x 512 px at 0.5 µm/px, seeds from ``--seed``): the
  mean absolute error, in percentage points of tumour cells, of the measured ``faint_partial``
  share against the generator's truth;
- **real membranes with no HER2 staining**: the share of tumour cells read with a stained
  membrane (any category but ``none``) on the real Ki67 fields, scored with the nuclear-DAB
  refusal off (their DAB is nuclear; every membrane is unstained), and on every real field
  with its DAB removed (tests/realdata.py). Each such cell is a false membrane;
- **membranes painted on real tissue** (tests/realdata.py, painted_field; benchmarks/painted_real.py):
  the share of painted faint cells read faint, of those found and counted as tumour, on the two
  fields painted with 40% faint cells (3 seeds, scattered); and the share of tumour cells read
  stained on the same two fields untouched, their own DAB background kept (false membranes).

A variant that brings the synthetic faint share closer to truth only by reading more real
unstained membranes as stained is no gain: real wins (README, Limits). Last, at the default
thresholds, how far the membranes read stand out (``contrast_od``: the mean peak membrane contrast over
a cell's stained sectors, log10 OD): the generator's faint membranes found, against the false ones of
the real fields above. Where the two overlap, no threshold on contrast finds more of the one without
reading more of the other.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402

from her2score.categories import Thresholds  # noqa: E402
from her2score.pipeline import ScoringConfig, analyse_slide  # noqa: E402
from her2score.slide import ArraySlide  # noqa: E402
from her2score.synthetic import generate_field  # noqa: E402
from realdata import PAINTED_FIELDS, _pairs, matched_categories, painted_field, real_cases  # noqa: E402

DEFAULT = Thresholds()
VARIANTS: dict[str, Thresholds] = {
    "default": DEFAULT,
    "min_completeness 0.15": dataclasses.replace(DEFAULT, min_completeness=0.15),
    "min_completeness 0.125": dataclasses.replace(DEFAULT, min_completeness=0.125),
    "arcs of 2 sectors, min_completeness 0.08": dataclasses.replace(DEFAULT, min_arc_sectors=2, min_completeness=0.08),
}


def _config(t: Thresholds) -> ScoringConfig:
    return ScoringConfig(thresholds=t, nuclear_stain_min=1.0)  # a nuclear stain is measured, not refused


def _synthetic(job: tuple[str, str, int]) -> float:
    """Measured minus true faint_partial share (percentage points) on one generated field."""
    variant, score, seed = job
    f = generate_field(score, seed=seed, variant="ultralow" if score == "0" else None)
    r = analyse_slide(ArraySlide(f.image, mpp=f.mpp), config=_config(VARIANTS[variant])).result
    counts = f.truth_counts()
    return r.percentages.get("faint_partial", 0.0) - 100.0 * counts["faint_partial"] / sum(counts.values())


FAINT_40 = {"faint_partial": 0.40}
"""The painted fields' composition for the faint membranes found (the untouched fields: none)."""


def _painted(job: tuple[str, str, int, dict]) -> tuple[int, int]:
    """On one real field painted with ``composition`` (FAINT_40): (painted faint cells found as tumour, of them
    read faint); untouched (``composition`` empty): (tumour cells, read stained)."""
    variant, name, seed, composition = job
    f = painted_field(name, composition, seed=seed)
    a = analyse_slide(ArraySlide(f.image, mpp=f.mpp), config=_config(VARIANTS[variant]))
    if not composition:
        return a.result.tumour_cells, a.result.tumour_cells - a.result.counts.get("none", 0)
    read = [r for t, r in matched_categories(f, a.cells) if t == "faint_partial" and r not in ("missed", "non-tumour")]
    return len(read), sum(r == "faint_partial" for r in read)


def _real(job: tuple[str, str]) -> tuple[int, int]:
    """(tumour cells, tumour cells read with a stained membrane) on one real unstained-membrane field."""
    variant, name = job
    case = next(c for c in real_cases() if c.name == name)
    r = analyse_slide(case.slide(), mpp=case.mpp, config=_config(VARIANTS[variant])).result
    return r.tumour_cells, r.tumour_cells - r.counts.get("none", 0)


def _contrasts(job: tuple[str, object]) -> np.ndarray:
    """Membrane contrast (log10 OD) of the cells read stained, at the default thresholds: on a generated 1+ field
    (job ("1+", seed)) its true faint cells read faint; on a real field (("real", name)) or an untouched painted
    one (("untouched", name)) every tumour cell read stained, each a false membrane."""
    kind, what = job
    if kind == "1+":
        f = generate_field("1+", seed=what)
        c = analyse_slide(ArraySlide(f.image, mpp=f.mpp), config=_config(DEFAULT)).cells
        truth, read = _pairs(np.column_stack([f.cells["x_px"], f.cells["y_px"]]), np.column_stack([c["x"], c["y"]]), 4 / f.mpp)
        found = (np.asarray(f.cells["category"])[truth] == "faint_partial") & (np.asarray(c["category"])[read] == "faint_partial")
        return np.asarray(c["contrast_od"])[read[found & np.asarray(c["tumour"])[read]]]
    if kind == "real":
        case = next(x for x in real_cases() if x.name == what)
        c = analyse_slide(case.slide(), mpp=case.mpp, config=_config(DEFAULT)).cells
    else:
        f = painted_field(what, {}, seed=0)
        c = analyse_slide(ArraySlide(f.image, mpp=f.mpp), config=_config(DEFAULT)).cells
    return np.asarray(c["contrast_od"])[np.asarray(c["tumour"]) & (np.asarray(c["category"]) != "none")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-per-class", type=int, default=6, help="synthetic fields per class (1+, ultralow)")
    ap.add_argument("--seed", type=int, default=7100)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    ki67 = [c.name for c in real_cases() if c.kind == "nuclear"]
    no_dab = [c.name for c in real_cases() if c.kind == "derived-0"]
    if not ki67:
        sys.exit("no real Ki67 fields found (../shared/data/real): nothing to measure against")
    seeds = [(s, a.seed + 1000 * k + i) for k, s in enumerate(("1+", "0")) for i in range(a.n_per_class)]
    print(f"synthetic: {len(seeds)} fields (1+ and ultralow, seeds from {a.seed}); real: {len(ki67)} Ki67 fields "
          f"(nuclear refusal off), {len(no_dab)} fields with DAB removed")
    print(f"{'variant':<42}{'faint MAE':>10}{'1+ bias':>9}{'Ki67 false %':>14}{'worst':>8}{'no-DAB false %':>16}"
          f"{'painted faint found %':>23}{'untouched false %':>19}")
    with ProcessPoolExecutor(a.workers) as pool:
        for v in VARIANTS:
            err = np.array(list(pool.map(_synthetic, [(v, s, seed) for s, seed in seeds])))
            ki = list(pool.map(_real, [(v, n) for n in ki67]))
            nd = list(pool.map(_real, [(v, n) for n in no_dab]))
            ki_pct = [100.0 * s / max(n, 1) for n, s in ki]
            nd_pct = 100.0 * sum(s for _, s in nd) / max(sum(n for n, _ in nd), 1)
            faint = list(pool.map(_painted, [(v, n, seed, FAINT_40) for n in PAINTED_FIELDS for seed in range(3)]))
            untouched = list(pool.map(_painted, [(v, n, 0, {}) for n in PAINTED_FIELDS]))
            print(f"{v:<42}{np.abs(err).mean():10.1f}{err[:a.n_per_class].mean():+9.1f}"
                  f"{100.0 * sum(s for _, s in ki) / sum(n for n, _ in ki):14.1f}{max(ki_pct):8.1f}{nd_pct:16.1f}"
                  f"{100.0 * sum(k for _, k in faint) / max(sum(n for n, _ in faint), 1):23.1f}"
                  f"{100.0 * sum(k for _, k in untouched) / max(sum(n for n, _ in untouched), 1):19.1f}", flush=True)
        found = np.concatenate(list(pool.map(_contrasts, [("1+", seed) for s, seed in seeds if s == "1+"])))
        ki_false = np.concatenate(list(pool.map(_contrasts, [("real", n) for n in ki67])))
        untouched_false = np.concatenate(list(pool.map(_contrasts, [("untouched", n) for n in PAINTED_FIELDS])))
    print("membrane contrast (log10 OD) of the cells read stained, default thresholds, 10th / 25th / 50th / 75th / 90th percentile:")
    for name, v in (("synthetic 1+ faint membranes found", found), ("false membranes, real Ki67 fields", ki_false),
                    ("false membranes, untouched painted fields", untouched_false)):
        print(f"  {name:<56} {len(v):5d} cells: " + " / ".join(f"{q:.3f}" for q in np.percentile(v, [10, 25, 50, 75, 90])))


if __name__ == "__main__":
    main()
