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
        weights = None
        if not args.no_cnn:
            from .cnn import ModelError, default_weights_path, load_model

            try:
                weights = str(args.weights or default_weights_path())
                load_model(weights)  # fail now, once, rather than on every slide
            except ModelError as e:
                print(f"her2score: {e} (or score with --no-cnn)", file=sys.stderr)
                return 2
        rows = run_batch(args.inputs, args.out, config=config, mpp=args.mpp, regions=args.regions,
                         workers=args.workers, scheduler=args.scheduler, cnn_weights=weights, progress=progress)
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


def _train(args) -> int:
    import time

    from .slide import SlideError
    from .train import TrainConfig, csv_images, folder_images, synthetic_images, train

    if not (args.synthetic or args.folder or args.csv):
        print("her2score: give a training source: --synthetic N_PER_CLASS, --folder DIR and/or --csv FILE", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    images, notes = [], []
    try:
        if args.synthetic:
            print(f"generating {4 * args.synthetic} synthetic fields (seed {args.seed}) ...", flush=True)
            images += synthetic_images(args.synthetic, seed=args.seed, stain_jitter=args.synthetic_jitter,
                                       workers=args.workers)
            notes.append(f"{4 * args.synthetic} synthetic fields (her2score.synthetic, 512x512 px at 0.5 µm/px, "
                         f"SeedSequence({args.seed}), stain_jitter {args.synthetic_jitter:g})")
        if args.folder:
            images += folder_images(args.folder, mpp=args.mpp, target_mpp=args.target_mpp)
            notes.append(f"class folders under {args.folder}")
        if args.csv:
            images += csv_images(args.csv, mpp=args.mpp, target_mpp=args.target_mpp)
            notes.append(f"labelled images listed in {args.csv}")
    except (SlideError, ValueError, OSError) as e:
        print(f"her2score: {e}", file=sys.stderr)
        return 2
    print(f"{len(images)} labelled images ready in {time.perf_counter() - t0:.0f} s; training ...", flush=True)
    config = TrainConfig(seed=args.seed, patch_px=args.patch_px, width=args.width, mpp=args.target_mpp,
                         max_epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                         patches_per_image=args.patches_per_image, val_fraction=args.val_fraction, lr=args.lr,
                         augment=not args.no_augment, threads=args.threads, device=args.device,
                         max_minutes=args.max_minutes)

    def progress(row):
        print(f"epoch {row['epoch']:>2}: train loss {row['train_loss']:.4f} acc {row['train_patch_accuracy']:.3f} | "
              f"val loss {row['val_loss']:.4f} patch acc {row['val_patch_accuracy']:.3f} "
              f"image acc {row['val_image_accuracy']:.3f} | {row['seconds']:.0f} s", flush=True)

    try:
        res = train(images, config=config, out=args.out, name=args.name, data_note="; ".join(notes), progress=progress)
    except ValueError as e:
        print(f"her2score: {e}", file=sys.stderr)
        return 2
    r = res.record
    print(f"best epoch {res.log['best_epoch']} ({res.log['stopped']}); {r.parameters} parameters; "
          f"{res.weights.stat().st_size / 1024:.0f} KiB; total {time.perf_counter() - t0:.0f} s")
    print(f"weights: {res.weights}  sha256 {r.sha256}")
    print(f"log: {res.weights.with_suffix('')}.train_log.json")
    return 0


def _evaluate(args) -> int:
    from .cnn import ModelError
    from .evaluate import evaluate

    if not args.no_cnn:
        import torch

        torch.set_num_threads(max(1, args.threads))
    try:
        report = evaluate(args.labels, args.out, reuse=args.reuse, use_cnn=not args.no_cnn, model=args.model,
                          guideline=args.guideline, mpp=args.mpp, bootstrap=args.bootstrap, seed=args.seed,
                          eligible_rule=args.eligible_rule,
                          progress=None if args.quiet else _eval_progress)
    except ModelError as e:
        print(f"her2score: {e} (or evaluate with --no-cnn)", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"her2score: {e}", file=sys.stderr)
        return 2
    print(report["summary"])
    print(f"metrics: {Path(args.out) / 'metrics.json'}  report: {Path(args.out) / 'report.md'}")
    return 0 if report["errors"] == 0 else 1


def _eval_progress(done: int, total: int, row: dict) -> None:
    status = row.get("error") or f"truth {row['label']}  classical {row['classical']}  cnn {row.get('cnn') or '-'}  fused {row['fused']}"
    print(f"[{done}/{total}] {Path(row['path']).name}: {status}", file=sys.stderr, flush=True)


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
    s.add_argument("--no-cnn", action="store_true", help="classical features only (no CNN fusion)")
    s.add_argument("--weights", help="CNN weights file (default: the shipped models/her2cnn.pt)")
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

    t = sub.add_parser("train", help="train the tile CNN (synthetic fields, class folders or a path,label CSV)")
    t.add_argument("--synthetic", type=int, metavar="N_PER_CLASS", help="generate N synthetic fields per class")
    t.add_argument("--synthetic-jitter", type=float, default=0.0, help="stain jitter (degrees) of the generated fields")
    t.add_argument("--folder", help="folder with one sub-folder per class: 0, 1+, 2+, 3+ (or 1plus, 2plus, 3plus)")
    t.add_argument("--csv", help="CSV of path,label (paths relative to the CSV's folder)")
    t.add_argument("--out", required=True, help="folder for the weights and the training log")
    t.add_argument("--name", default="her2cnn.pt", help="weights file name (default her2cnn.pt)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mpp", type=float, help="µm/px for images whose metadata has none")
    t.add_argument("--target-mpp", type=float, default=0.5, help="µm/px the model works at (default 0.5)")
    t.add_argument("--epochs", type=int, default=12, help="maximum epochs (early stopping may end sooner)")
    t.add_argument("--patience", type=int, default=3, help="epochs without validation gain before stopping")
    t.add_argument("--patch-px", type=int, default=64)
    t.add_argument("--width", type=int, default=16, help="network width (16: 77,556 parameters)")
    t.add_argument("--patches-per-image", type=int, default=24, help="random patches per training image per epoch")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--no-augment", action="store_true", help="no stain/flip augmentation")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: robust on a shared machine; 2 is faster on an idle one)")
    t.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    t.add_argument("--workers", type=int, default=1, help="processes generating synthetic fields")
    t.add_argument("--max-minutes", type=float, help="stop after this many minutes")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="score labelled images; metrics (kappa, accuracy, eligibility) for classical, CNN and fused")
    e.add_argument("labels", help="CSV of path,label[,eligible][,ish] (paths relative to the CSV) or a folder per class")
    e.add_argument("--out", required=True, help="output folder: metrics.json, report.md, per_image.csv, confusion PNG")
    e.add_argument("--reuse", help="folder of earlier result.json files (from 'score' or 'evaluate') to reuse")
    e.add_argument("--no-cnn", action="store_true", help="classical scoring only")
    e.add_argument("--model", help="CNN weights file (default: the shipped models/her2cnn.pt)")
    e.add_argument("--guideline", default="breast-asco-cap-2023", choices=GUIDELINES)
    e.add_argument("--mpp", type=float, help="µm/px for images whose metadata has none")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    e.add_argument("--eligible-rule", help="the rule the CSV's 'eligible' column answers")
    e.add_argument("--threads", type=int, default=1, help="torch CPU threads for the CNN (default 1)")
    e.add_argument("-q", "--quiet", action="store_true", help="no per-image lines")
    e.set_defaults(func=_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
