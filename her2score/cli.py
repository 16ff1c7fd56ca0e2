"""Command line: ``her2score score|check|rules|synth`` (and train/evaluate)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from . import __version__
from .categories import Thresholds
from .guidelines import GUIDELINES

__all__ = ["main"]


def _score(args) -> int:
    from tqdm import tqdm

    from .batch import BatchError, run_batch
    from .pipeline import ScoringConfig

    t = Thresholds()
    if args.thresholds:
        t = replace(t, **json.loads(Path(args.thresholds).read_text()))
    config = ScoringConfig(guideline=args.guideline, specimen=args.specimen, mpp=args.target_mpp,
                           thresholds=t, estimate_stains=args.estimate_stains)
    bar = tqdm(total=0, unit="slide", disable=args.quiet, dynamic_ncols=True)

    def progress(row, done, total):
        bar.total = total
        bar.n = done
        bar.set_postfix_str(f"{Path(row['slide']).name}: {row['score'] if row['status'] == 'ok' else 'error'}")
        bar.refresh()
        if row["status"] != "ok":
            tqdm.write(f"error: {row['error']}", file=sys.stderr)

    try:
        rows = run_batch(args.inputs, args.out, config=config, mpp=args.mpp, regions=args.regions,
                         workers=args.workers, scheduler=args.scheduler, progress=progress)
    except BatchError as e:
        print(f"her2score: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok} of {len(rows)} slides scored; summary: {Path(args.out) / 'summary.csv'}")
    for r in rows:
        line = f"{r['score']:>3}  {r['level']:<14} H={r['h_score']:<7} cells={r['tumour_cells']:<6}" if r["status"] == "ok" else "error"
        print(f"  {line}  {r['slide']}" + (f"  ({r['error']})" if r["status"] != "ok" else ""))
    return 0 if ok == len(rows) else 1


def _check(args) -> int:
    from .eligibility import RuleError, check_eligibility
    from .results import SlideResult

    result = SlideResult.from_dict(json.loads(Path(args.result).read_text(encoding="utf-8")))
    try:
        decisions = [check_eligibility(result, rule, ish=args.ish) for rule in args.rule]
    except RuleError as e:
        print(f"her2score: {e}", file=sys.stderr)
        return 2
    for d in decisions:
        print(f"{d.rule} (v{d.rule_version}): {d.status}")
        for reason in d.reasons:
            print(f"  - {reason}")
    return 0


def _rules(args) -> int:
    from .eligibility import available_rules, load_rule

    for name in available_rules():
        r = load_rule(name)
        print(f"{name:<24} v{r.version}  {r.description}")
    return 0


def _synth(args) -> int:
    from .synthetic import write_dataset

    path = write_dataset(args.out, n_per_class=args.n_per_class, seed=args.seed, stain_jitter=args.stain_jitter)
    print(f"wrote {4 * args.n_per_class} fields and {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="her2score", description="Guideline HER2 IHC scoring of slides and fields of view.")
    p.add_argument("--version", action="version", version=f"her2score {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score slides and folders of slides into an output folder")
    s.add_argument("inputs", nargs="+", help="slide files or folders (searched recursively)")
    s.add_argument("--out", required=True, help="output folder (resumable: finished slides are skipped)")
    s.add_argument("--guideline", default="breast-asco-cap-2023", choices=GUIDELINES)
    s.add_argument("--specimen", default="resection", choices=("resection", "biopsy"))
    s.add_argument("--mpp", type=float, help="µm/px for files whose metadata has none")
    s.add_argument("--target-mpp", type=float, default=0.5, help="µm/px at which cells are analysed (default 0.5)")
    s.add_argument("--regions", help="folder of tumour annotations: <slide stem>.geojson (QuPath) or a mask image")
    s.add_argument("--workers", type=int, default=1, help="worker processes (slides side by side, or tiles of one slide)")
    s.add_argument("--scheduler", help="Dask scheduler address, or 'local' to start a LocalCluster")
    s.add_argument("--estimate-stains", action="store_true", help="estimate per-slide stain vectors (Macenko)")
    s.add_argument("--thresholds", help="JSON file overriding per-cell thresholds (log10 DAB OD, fractions)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_score)

    c = sub.add_parser("check", help="eligibility of a scored slide (result.json) under named rule sets")
    c.add_argument("result", help="a result.json written by 'her2score score'")
    c.add_argument("--rule", action="append", required=True, help="rule set name (see 'her2score rules') or a TOML file")
    c.add_argument("--ish", choices=("positive", "negative"), help="ISH result, for 2+ slides")
    c.set_defaults(func=_check)

    r = sub.add_parser("rules", help="list the shipped eligibility rule sets")
    r.set_defaults(func=_rules)

    g = sub.add_parser("synth", help="generate a labelled synthetic IHC data set")
    g.add_argument("out")
    g.add_argument("--n-per-class", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stain-jitter", type=float, default=0.0, help="stain-vector perturbation (degrees)")
    g.set_defaults(func=_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
