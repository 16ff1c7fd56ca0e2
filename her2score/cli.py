"""Command line: ``her2score score|check|rules|synth`` (and train/evaluate)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from . import __version__

__all__ = ["main"]


def default_workers() -> int:
    """The cores this process may use (its CPU affinity), the CLI's default for --workers."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check_mpp(args) -> None:
    """_UsageError unless --mpp and --default-mpp, where given, are plausible scan resolutions, and not both."""
    from .slide import PLAUSIBLE_MPP

    for name, value in (("--mpp", args.mpp), ("--default-mpp", args.default_mpp)):
        if value is not None and not PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]:
            raise _UsageError(f"{name} {value:g} µm/px is not a plausible scan resolution "
                              f"({PLAUSIBLE_MPP[0]:g}-{PLAUSIBLE_MPP[1]:g} µm/px; 40x scans are ~0.25, 20x ~0.5)")
    if args.mpp is not None and args.default_mpp is not None:
        raise _UsageError("--mpp overrides every file's µm/px, --default-mpp only where a file has none: give one")


def _score_config(args):
    """Every argument of 'score' checked, before any work: (ScoringConfig, weights path or None).
    Raises _UsageError with one line naming the bad argument."""
    from .categories import Thresholds
    from .pipeline import ScoringConfig

    _at_least("--workers", args.workers, 1)
    _check_mpp(args)
    missing = [i for i in args.inputs if not Path(i).exists()]
    if missing:
        from .slide import missing_reason

        raise _UsageError(f"{missing[0]}: {missing_reason(missing[0], 'file or folder')}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if args.regions and not Path(args.regions).is_dir():
        raise _UsageError(f"--regions {args.regions}: not a folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _UsageError(f"--out {out}: exists and is not a folder")
    for i in args.inputs:
        if Path(i).is_dir() and out.exists() and os.path.samefile(out, i):
            raise _UsageError(f"--out {out}: is the input folder {i}; give the results a folder of their own")
    if out.is_dir() and any(Path(i).is_dir() and out.resolve().is_relative_to(Path(i).resolve()) for i in args.inputs):
        if held := _slides_in_output(out):  # the search of the inputs leaves --out out: they would be left unscored
            raise _UsageError(f"--out {out}: lies in an input folder and holds slides of its own ({held[0]}"
                              f"{f' and {len(held) - 1} more' if len(held) > 1 else ''}), which would be left "
                              "unscored; give the results a folder of their own")
    _check_guideline(args)
    t = Thresholds()
    try:
        if args.thresholds:
            t = Thresholds.from_dict(json.loads(Path(args.thresholds).read_text(encoding="utf-8")))
    except OSError as e:
        raise _UsageError(f"--thresholds {args.thresholds}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise _UsageError(f"--thresholds {args.thresholds}: {e}") from None
    try:
        config = ScoringConfig(guideline=args.guideline, specimen=args.specimen, mpp=args.target_mpp,
                               thresholds=t, estimate_stains=args.estimate_stains,
                               isolated_intense_percent=args.isolated_floor, gastric_reading=args.gastric_reading)
    except (ValueError, TypeError) as e:
        raise _UsageError(f"--target-mpp {args.target_mpp}: {_in_options(str(e), GUIDELINE_OPTIONS)}") from None
    weights = None
    if not args.no_cnn:
        from .batch import _load_cnn
        from .cnn import ModelError, default_weights_path

        try:
            weights = os.path.abspath(args.weights or default_weights_path())
            model = _load_cnn(weights)  # fail now, once, rather than on every slide; forked workers inherit the model
        except ModelError as e:
            raise _UsageError(f"{_one_line(str(e))} (or score with --no-cnn)") from None
        if abs(model.mpp - config.mpp) > 1e-6:  # else every slide would fail on its own
            raise _UsageError(f"{weights}: the CNN was trained at {model.mpp:g} µm/px but tiles are read at "
                              f"{config.mpp:g} µm/px (--target-mpp); give weights trained there, or score with --no-cnn")
    return config, weights


def _slides_in_output(out: Path) -> list[str]:
    """Files under ``out`` named as slides that are not a batch's own outputs (outputs.OUTPUT_FILES), hidden
    files and folders left out as the search of the inputs leaves them (a Mac's ._overlay.png on a share)."""
    from .files import visible_files
    from .outputs import OPTIONAL_OUTPUT_FILES, OUTPUT_FILES
    from .slide import SLIDE_SUFFIXES

    return sorted(str(f.relative_to(out)) for f in visible_files(out)
                  if f.suffix.lower() in SLIDE_SUFFIXES and f.name not in OUTPUT_FILES + OPTIONAL_OUTPUT_FILES)


class _UsageError(Exception):
    """A bad argument or input, found before any work (exit code 2)."""


def _one_line(message: str) -> str:
    """A message's first line ('...' marks the rest cut: torch's load errors run to paragraphs)."""
    lines = message.strip().splitlines() or [""]
    return lines[0] + (" ..." if len(lines) > 1 else "")


def _at_least(option: str, value: int, least: int) -> None:
    """_UsageError naming ``option`` unless its ``value`` is at least ``least``."""
    if value < least:
        raise _UsageError(f"{option} must be at least {least}, got {value}")


def _check_guideline(args) -> None:
    """_UsageError naming the option unless each guideline setting goes with --guideline (guidelines.check_settings:
    biopsy has its own rule only under gastric, the per-band reading is gastric's, the isolated floor breast's)."""
    from .guidelines import ISOLATED_INTENSE_PERCENT, check_settings

    if not 0 <= args.isolated_floor <= 10:
        raise _UsageError(f"--isolated-floor {args.isolated_floor:g}: must be within 0-10 (% of tumour cells)")
    defaults = dict(specimen="resection", isolated_intense_percent=ISOLATED_INTENSE_PERCENT, gastric_reading="cumulative")
    for option, value, setting in (("--specimen", args.specimen, "specimen"),
                                   ("--isolated-floor", f"{args.isolated_floor:g}", "isolated_intense_percent"),
                                   ("--gastric-reading", args.gastric_reading, "gastric_reading")):
        try:
            check_settings(args.guideline, **{**defaults, setting: getattr(args, setting.replace("isolated_intense_percent",
                                                                                                  "isolated_floor"))})
        except ValueError as e:
            raise _UsageError(f"{option} {value}: {_in_options(str(e), GUIDELINE_OPTIONS)}") from None


STATUS_MARK = {"passed": " ", "needs_review": "?", "qc_failed": "!", "not_scored": "!"}
"""Console mark beside each score: '?' needs review, '!' failed QC or not scored, 'x' refused or error."""


def _console_line(r: dict) -> str:
    """One slide's line of the listing at the end, whatever its name and error hold."""
    if r["status"] != "ok":
        return f"  {'-':>3} x {r['status']:<12} {_printable(r['slide'])}  ({' '.join(r['error'].split())})"
    return (f"  {r['score'] or '-':>3} {STATUS_MARK.get(r['qc_status'], '!')} {r['qc_status']:<12} {r['level']:<16} "
            f"H={r['h_score'] if r['h_score'] != '' else '-':<7} cells={r['tumour_cells']:<6} {_printable(r['slide'])}")


class _Terminated(SystemExit):
    """SIGTERM or SIGHUP, as _score's handler raises it (exit code 143 or 129)."""


def _stop_on_signal(signum, frame) -> None:
    raise _Terminated(128 + signum)


GUIDELINE_OPTIONS = {"specimen": "--specimen", "gastric_reading": "--gastric-reading",
                     "isolated_intense_percent": "--isolated-floor"}
API_OPTIONS: dict[str, dict[str, str]] = {
    "score": GUIDELINE_OPTIONS,
    "evaluate": GUIDELINE_OPTIONS,
    "train": {"n_per_class": "--synthetic", "patch_px": "--patch-px", "val_fraction": "--val-fraction",
              "max_epochs": "--epochs", "batch_size": "--batch-size", "patches_per_image": "--patches-per-image",
              "max_minutes": "--max-minutes", "threads": "--threads", "mpp": "--target-mpp", "width": "--width",
              "patience": "--patience", "lr": "--lr", "seed": "--seed", "device": "--device",
              "stain_jitter": "--synthetic-jitter", "border_od_max": "--border-od-max"},
}
"""Per subcommand, the Python API's keywords that its settings' errors may name (guidelines.check_settings,
ScoringConfig, TrainConfig, train.check_synthetic), each with the option that sets it: the API's messages keep the
keyword, the command line says the option (_in_options, where those settings are checked: never over a message that
holds a path, whose folders may bear such names)."""


def _in_options(message: str, options: Mapping[str, str], *, words: bool = False) -> str:
    """``message`` with the API keywords of ``options`` as their options: ``name='value'`` as ``--option value``, a
    bare name where it is one (snake_case, or with ``words`` any: a message that names settings alone, as TrainConfig's
    do) as ``--option``; never a name within a path or a longer word."""
    if not options:
        return message

    def option(m: re.Match) -> str:
        if m[3] is not None:
            return f"{options[m[1]]} {m[3]}"
        return options[m[1]] if words or "_" in m[1] else m[0]
    keywords = "|".join(map(re.escape, options))
    return re.sub(rf"(?<![\w/.-])({keywords})(?:=(['\"]?)([^'\"\s,;)]*)\2)?(?![\w/.-])", option, message)


def _error(command: str, message: str) -> None:
    """'her2score COMMAND: message' on stderr, the one form of every subcommand's errors; nothing where its reader or
    terminal is gone (the exit code says it)."""
    try:
        print(f"her2score {command}: {message}", file=sys.stderr)
    except OSError:
        _output_gone()


def _output_gone() -> None:
    """Point stdout and stderr at /dev/null: their reader or terminal is gone ('| head', a closed SSH session), and
    the interpreter's last flush must not fail too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError):
            pass
    os.close(devnull)


def _printable(text: str) -> str:
    """``text`` with its control characters as escapes (a file name holding a newline broke a log's one line a slide)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _clock(seconds: float) -> str:
    """A duration as h:mm:ss or m:ss."""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class _Progress:
    """'score's progress on stderr after each finished slide: a bar on a terminal; elsewhere (a log file of
    nohup, cron or a cluster job) one line a slide, without carriage returns. Time and rate count from the
    batch's start; the time left from this run's own rate (slides reused from an earlier run take none). A slide is
    named by its path under ``root`` (the folder holding every input: sub1/dup.png and sub2/dup.png read alike by
    their names), else by its name."""

    def __init__(self, *, quiet: bool, root: str | None = None):
        self.quiet, self.started, self.terminal, self.root = quiet, time.time(), sys.stderr.isatty(), root
        self.bar, self.before = None, None  # the bar appears with the first finished slide

    def _name(self, slide: str) -> str:
        under = self.root is not None and Path(slide).is_relative_to(self.root)
        return _printable(os.path.relpath(slide, self.root) if under else Path(slide).name)

    def __call__(self, row: dict, done: int, total: int) -> None:
        if self.before is None:
            self.before = done - 1  # reused from an earlier run
        shown = (row["score"] or "not scored") + ("" if row["qc_status"] == "passed" else f" [{row['qc_status']}]")
        what = f"{self._name(row['slide'])}: {shown if row['status'] == 'ok' else row['status']}"
        if self.terminal:
            self._draw(what, done, total)
            if row["status"] != "ok":
                self.bar.write(f"{row['status']}: {' '.join(row['error'].split())}", file=sys.stderr)
        elif not self.quiet or row["status"] != "ok":
            elapsed = time.time() - self.started
            left = elapsed / (done - self.before) * (total - done)
            error = " ".join((row["error"] or "").split())  # one line, whatever the message
            error = f" ({error})" if row["status"] != "ok" else ""
            print(f"[{done}/{total}] {what}{error}; {_clock(elapsed)} elapsed, {_clock(left)} left", file=sys.stderr,
                  flush=True)

    def _draw(self, what: str, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done - 1, unit="slide", disable=self.quiet, dynamic_ncols=True)
            self.bar.start_t = self.started  # its clock and rate start with the batch, not the first slide's end
        self.bar.total, self.bar.n = total, done
        self.bar.set_postfix_str(what)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _until_gone(show: Callable[..., None]) -> Callable[..., None]:
    """``show``, until its output's reader or terminal is gone (an OSError: '2>&1 | tee log' with tee killed, EIO on
    a closed terminal); then nothing, and the work goes on unwatched."""
    gone = False

    def call(*args) -> None:
        nonlocal gone
        if not gone:
            try:
                show(*args)
            except OSError:
                gone = True
    return call


def _score(args) -> int:
    from .batch import BatchError, run_batch
    from .workers import STOP_SIGNALS

    try:
        config, weights = _score_config(args)
    except _UsageError as e:
        _error(args.command, str(e))
        return 2
    folders = [os.path.abspath(i if os.path.isdir(i) else os.path.dirname(os.path.abspath(i))) for i in args.inputs]
    progress = _Progress(quiet=args.quiet, root=os.path.commonpath(folders) if folders else None)

    # SIGTERM (kill, timeout, a cluster's scheduler) and SIGHUP (the terminal or SSH session closed) stop the batch as
    # Ctrl-C does: what finished is recorded. A signal ignored stays ignored (nohup's SIGHUP, a background job's)
    on_main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    replaced = {signum: signal.signal(signum, _stop_on_signal) for signum in STOP_SIGNALS
                if signum != signal.SIGINT and signal.getsignal(signum) is not signal.SIG_IGN} if on_main else {}
    stopped = 0  # the exit code when Ctrl-C, SIGTERM or SIGHUP stops the batch
    try:
        rows = run_batch(args.inputs, args.out, config=config, mpp=args.mpp, default_mpp=args.default_mpp, regions=args.regions,
                         workers=args.workers, scheduler=args.scheduler, cnn_weights=weights,
                         cells_csv=args.cells_csv, progress=_until_gone(progress), backend=args.backend)
    except BatchError as e:  # (the disk filled mid-batch, perhaps after its reader went away)
        _error(args.command, str(e))
        return 2
    except KeyboardInterrupt:
        stopped = 130
    except _Terminated as e:
        stopped = e.code
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        try:
            progress.close()
        except OSError:  # its reader went away
            pass
    if stopped:
        _error(args.command, f"{'interrupted' if stopped == 130 else 'terminated'}; the slides that finished are recorded "
                             f"in {Path(args.out) / 'summary.csv'}: run the same command again to score the rest")
        return stopped
    try:
        _say_totals(rows, Path(args.out) / "summary.csv")
    except OSError:  # the reader or terminal went away: what the batch did is recorded, and its exit code stands
        _output_gone()
    return 0 if rows.failed == 0 else 1


def _say_totals(rows, summary: Path) -> None:
    """The batch's totals and this run's slides (``summary``: its summary.csv), one line each, on stdout."""
    unscored = f" ({rows.unscored} without a score: no tumour cells)" if rows.unscored else ""
    refused = f" ({'all' if rows.refused == rows.failed else rows.refused} refused: no tissue, not an H-DAB stain, or a µm/px its nuclei rule out)" if rows.refused else ""
    print(f"{rows.scored} scored{unscored}, {rows.reused} reused, {rows.failed} failed{refused}; "
          f"{len(rows)} slide{'s' if len(rows) != 1 else ''} in {summary}")
    earlier = 0
    for r in rows:  # this run's slides; those scored into --out by earlier runs are in summary.csv
        if r["slide"] in rows.inputs:
            print(_console_line(r))
        else:
            earlier += 1
    if earlier:
        print(f"  (and {earlier:,} slide{'s' if earlier != 1 else ''} from earlier runs: see summary.csv)")


CHECK_EXIT = {"eligible": 0, "not_eligible": 1, "needs_review": 3}
"""Exit codes of 'check': 0 eligible under every rule, 1 not eligible under some rule (none needing
review), 3 needs review under some rule, 2 a usage or input error."""


def _check(args) -> int:
    from .eligibility import check_eligibility, distinct_rules, load_rule
    from .results import SlideResult

    try:
        try:
            result = SlideResult.read(args.result)
            rules = distinct_rules([load_rule(name) for name in args.rule])  # an error names the rule or its file
        except ValueError as e:
            raise _UsageError(str(e)) from None
        decisions = [check_eligibility(result, rule, ish=args.ish) for rule in rules]
    except _UsageError as e:
        _error(args.command, str(e))
        return 2
    statuses = [d.status for d in decisions]
    code = max((CHECK_EXIT[s] for s in statuses), default=0)
    if args.json:
        print(json.dumps({"result": str(Path(args.result)), "slide": result.slide, "score": result.score, "level": result.level,
                          "exit_code": code,
                          "decisions": [{"rule": d.rule, "version": d.rule_version, "status": d.status,
                                         "reasons": list(d.reasons)} for d in decisions]},
                         indent=2, ensure_ascii=False))
        return code
    for d in decisions:
        print(f"{d.rule} (v{d.rule_version}): {d.status}")
        for reason in d.reasons:
            print(f"  - {reason}")
    return code


def _rules(args) -> int:
    from .eligibility import available_rules, load_rule

    for name in available_rules():
        r = load_rule(name)
        print(f"{name:<24} v{r.version}  {r.description}")
    return 0


def _synth(args) -> int:
    from .synthetic import MAX_STAIN_JITTER_DEG, write_dataset

    try:
        _at_least("--seed", args.seed, 0)  # numpy's own words name no option, write_dataset's its keywords
        _at_least("--n-per-class", args.n_per_class, 1)
        if not 0 <= args.stain_jitter <= MAX_STAIN_JITTER_DEG:
            raise _UsageError(f"--stain-jitter must be 0-{MAX_STAIN_JITTER_DEG:g} degrees (s.d. of the stain vectors' "
                              f"turn), got {args.stain_jitter:g}")
        path = write_dataset(args.out, n_per_class=args.n_per_class, seed=args.seed, stain_jitter=args.stain_jitter,
                             real_borders=args.real_borders)
    except (_UsageError, ValueError) as e:  # a folder's message holds its path, never rewritten
        _error(args.command, str(e))
        return 2
    except OSError as e:
        _error(args.command, f"{args.out}: cannot write ({e.strerror or e})")
        return 2
    print(f"wrote {4 * args.n_per_class} fields into {path / 'images'}, their labels in {path / 'labels.csv'} and their "
          f"cell counts in {path / 'truth.jsonl'}")
    return 0


def _train(args) -> int:
    import time

    from .cnn import ModelError
    from .slide import SlideError
    from .train import TrainConfig, check_device, check_synthetic, check_target, csv_images, folder_images, synthetic_images, train

    if args.synthetic is None and not (args.folder or args.csv):
        _error(args.command, "give a training source: --synthetic N_PER_CLASS, --folder DIR and/or --csv FILE")
        return 2
    try:  # the settings checked before any image is made or read
        config = TrainConfig(seed=args.seed, patch_px=args.patch_px, width=args.width, mpp=args.target_mpp,
                             max_epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                             patches_per_image=args.patches_per_image, val_fraction=args.val_fraction, lr=args.lr,
                             augment=not args.no_augment, threads=args.threads, device=args.device,
                             max_minutes=args.max_minutes)
        if args.synthetic is not None:
            check_synthetic(args.synthetic, args.synthetic_jitter, args.border_od_max)
        check_device(config.device)
        if args.synthetic == 1 and not (args.folder or args.csv):  # found only once every field was made
            raise ValueError("--synthetic 1 alone leaves no image of any class for validation: give at least 2")
    except ValueError as e:
        _error(args.command, _in_options(str(e), API_OPTIONS[args.command], words=True))
        return 2
    try:
        check_target(args.out, args.name, replace_shipped=args.replace_shipped)
    except ValueError as e:
        _error(args.command, str(e))
        return 2
    t0 = time.perf_counter()
    images, notes = [], []
    read_by = f" (read by the {args.backend} backend)" if args.backend else ""
    try:
        if args.synthetic:
            print(f"generating {4 * args.synthetic} synthetic fields (seed {args.seed}) ...", flush=True)
            images += synthetic_images(args.synthetic, seed=args.seed, mpp=args.target_mpp, stain_jitter=args.synthetic_jitter,
                                       border_od_max=args.border_od_max, workers=args.workers)
            notes.append(f"{4 * args.synthetic} synthetic fields (her2score.synthetic, 512x512 px at {args.target_mpp:g} µm/px, "
                         f"SeedSequence({args.seed}), stain_jitter {args.synthetic_jitter:g}, "
                         f"border_od 0-{args.border_od_max:g})")
        if args.folder:
            images += folder_images(args.folder, mpp=args.mpp, target_mpp=args.target_mpp, backend=args.backend)
            notes.append(f"class folders under {args.folder}{read_by}")
        if args.csv:
            images += csv_images(args.csv, mpp=args.mpp, target_mpp=args.target_mpp, backend=args.backend)
            notes.append(f"labelled images listed in {args.csv}{read_by}")
    except (SlideError, ValueError, OSError) as e:
        _error(args.command, str(e))
        return 2
    print(f"{len(images)} labelled images ready in {time.perf_counter() - t0:.0f} s; training ...", flush=True)

    def progress(row):
        print(f"epoch {row['epoch']:>2}: train loss {row['train_loss']:.4f} acc {row['train_patch_accuracy']:.3f} | "
              f"val loss {row['val_loss']:.4f} patch acc {row['val_patch_accuracy']:.3f} "
              f"image acc {row['val_image_accuracy']:.3f} | {row['seconds']:.0f} s", flush=True)

    try:
        res = train(images, config=config, out=args.out, name=args.name, data_note="; ".join(notes), progress=progress,
                    replace_shipped=args.replace_shipped)
    except (ValueError, ModelError) as e:
        _error(args.command, str(e))
        return 2
    r = res.record
    print(f"best epoch {res.log['best_epoch']} ({res.log['stopped']}); {r.parameters} parameters; "
          f"{res.weights.stat().st_size / 1024:.0f} KiB; total {time.perf_counter() - t0:.0f} s")
    print(f"weights: {res.weights}  sha256 {r.sha256}")
    print(f"log: {res.weights.with_suffix('')}.train_log.json")
    return 0


def _evaluate(args) -> int:
    from .batch import BatchError
    from .cnn import ModelError
    from .evaluate import evaluate

    try:
        _check_guideline(args)
        _check_mpp(args)
        _at_least("--threads", args.threads, 1)
        _at_least("--bootstrap", args.bootstrap, 0)
        _at_least("--seed", args.seed, 0)
    except _UsageError as e:
        _error(args.command, str(e))
        return 2
    if not args.no_cnn:
        import torch

        torch.set_num_threads(max(1, args.threads))
    try:
        report = evaluate(args.labels, args.out, reuse=args.reuse, use_cnn=not args.no_cnn, model=args.weights,
                          guideline=args.guideline, specimen=args.specimen, gastric_reading=args.gastric_reading,
                          isolated_intense_percent=args.isolated_floor, mpp=args.mpp, bootstrap=args.bootstrap,
                          seed=args.seed, rules=args.rules, eligible_rule=args.eligible_rule, reuse_by_name=args.reuse_by_name,
                          progress=None if args.quiet else _until_gone(_eval_progress), default_mpp=args.default_mpp,
                          backend=args.backend)
    except ModelError as e:
        _error(args.command, f"{e} (or evaluate with --no-cnn)")
        return 2
    except (ValueError, OSError, BatchError) as e:
        _error(args.command, str(e))
        return 2
    try:
        print(report["summary"])
        print(f"metrics: {Path(args.out) / 'metrics.json'}  report: {Path(args.out) / 'report.md'}")
    except OSError:  # the reader or terminal went away: the report is written, and the exit code stands
        _output_gone()
    return 0 if report["errors"] == 0 else 1


def _eval_progress(done: int, total: int, row: dict) -> None:
    status = row.get("error") or f"truth {row['label']}  classical {row['classical']}  cnn {row.get('cnn') or '-'}  fused {row['fused']}"
    print(f"[{done}/{total}] {Path(row['path']).name}: {status}", file=sys.stderr, flush=True)


class _Choices(Sequence):
    """Option choices read on first use (a check or --help), so that building the parser (and
    ``her2score --version``) imports no numpy."""

    def __init__(self, load: Callable[[], Sequence[str]]):
        self._load, self._items = load, None

    def _get(self) -> tuple[str, ...]:
        if self._items is None:
            self._items = tuple(self._load())
        return self._items

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())


def _guidelines() -> Sequence[str]:
    from .guidelines import GUIDELINES

    return GUIDELINES


GUIDELINE_CHOICES = _Choices(_guidelines)


def _ish_results() -> Sequence[str]:
    from .eligibility import ISH_RESULTS

    return ISH_RESULTS


ISH_CHOICES = _Choices(_ish_results)


def _backends() -> Sequence[str]:
    from .slide import BACKENDS

    return BACKENDS


BACKEND_CHOICES = _Choices(_backends)


def _path(value: str) -> str:
    """A path given on the command line; an empty one (an unset shell variable) is refused, not read as the
    current folder (`--out ""` wrote a batch into it)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?); give a path")
    return value


def _ish(value: str) -> str:
    """--ish read as check_eligibility reads ish (eligibility.ish_result: any case)."""
    from .eligibility import ish_result

    try:
        return ish_result(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("ish ")) from None  # argparse names the option


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (unless its text already says it) and keeps the epilogs' line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


CHECK_EPILOG = """exit codes:
  0  eligible under every rule given
  1  not eligible under at least one rule (and none needs review)
  3  needs review under at least one rule (failed QC, too few tumour cells, equivocal 2+ awaiting ISH,
     an ISH result contradicting the IHC score, classical and CNN scores disagree, not scored)
  2  usage or input error: unknown rule, missing file, a folder, a JSON that is not a result.json"""

SCORE_EPILOG = """exit codes: 0 every slide of this run read and given a result.json (its qc_status may still say
needs_review, qc_failed or not_scored); 1 some refused or failed (see summary.csv);
2 usage or input error (nothing written, no output folder created), or the output folder full, over quota or
read-only (the batch stops; finished slides kept).
summary.csv lists every slide in --out; qc_status beside each score: passed, needs_review, qc_failed, not_scored."""


def _backend_argument(p: argparse.ArgumentParser) -> None:
    """--backend, which ``score``, ``evaluate`` and ``train`` share."""
    p.add_argument("--backend", choices=BACKEND_CHOICES, metavar="BACKEND",
                   help="read every file with this reader: %(choices)s (default: the one each file's suffix and first "
                        "bytes choose; a file it cannot read is an error)")


def _guideline_arguments(p: argparse.ArgumentParser) -> None:
    """The guideline settings ``score`` and ``evaluate`` share."""
    p.add_argument("--guideline", default="breast-asco-cap-2023", choices=GUIDELINE_CHOICES, metavar="GUIDELINE",
                   help="scoring guideline: %(choices)s")
    p.add_argument("--specimen", default="resection", choices=("resection", "biopsy"),
                   help="specimen type (biopsy has its own rule only under gastric)")
    p.add_argument("--gastric-reading", default="cumulative", choices=("cumulative", "per_band"),
                   help="gastric: count a cell at its level and every weaker one (cumulative), or at its own level only for "
                        "3+ and 2+ (per_band; reactivity of any kind in >=10%% is 1+ either way)")
    p.add_argument("--isolated-floor", type=float, default=1.0, metavar="PERCENT",
                   help="breast: intense complete cells in fewer than this %% of tumour cells (or fewer than 5) are "
                        "isolated cells, not the 'intense complete in <=10%%' 2+ pattern (0: one cell is enough)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="her2score", description="Guideline HER2 IHC scoring of slides and fields of view.",
                                formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"her2score {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score slides and folders of slides into an output folder", formatter_class=_Help,
                       epilog=SCORE_EPILOG)
    s.add_argument("inputs", type=_path, nargs="+", help="slide files or folders (searched recursively)")
    s.add_argument("--out", type=_path, required=True, help="output folder (resumable: slides done with the same settings are reused)")
    _guideline_arguments(s)
    s.add_argument("--mpp", type=float, help="scan resolution in µm/px: overrides the files' metadata (the result "
                                             "notes where they differ), needed where it has none (or --default-mpp); "
                                             "checked against the nuclei the image shows")
    s.add_argument("--default-mpp", type=float, help="µm/px of the files whose metadata gives none (scans with "
                                                     "their own and snapshots without in one batch; default: none, such "
                                                     "a file is refused)")
    s.add_argument("--target-mpp", type=float, default=0.5, help="resolution in µm/px at which cells are analysed")
    _backend_argument(s)
    s.add_argument("--regions", type=_path, help="folder of tumour annotations: <slide stem>.geojson (QuPath) or a mask image "
                                     "(default: detected tumour cells)")
    s.add_argument("--workers", type=int, default=default_workers(),
                   help="worker processes: slides side by side, or the tiles of a single slide "
                        f"(default: the cores this process may use, here {default_workers()})")
    s.add_argument("--scheduler", help="Dask scheduler address, or 'local' to start a LocalCluster (default: local processes)")
    s.add_argument("--estimate-stains", action="store_true",
                   help="deconvolve every slide with its own stain vectors where the default ones would leak one "
                        "stain into the other (default: only a slide the default ones read as nuclear DAB)")
    s.add_argument("--no-cnn", action="store_true", help="classical features only (no CNN fusion)")
    s.add_argument("--weights", type=_path, help="CNN weights file (default: the shipped models/her2cnn.pt)")
    s.add_argument("--cells-csv", action="store_true",
                   help="also write cells.csv beside each slide's cells.parquet (default: parquet only)")
    s.add_argument("--thresholds", type=_path, help="JSON file overriding per-cell thresholds (log10 DAB OD, fractions) "
                                        "(default: the calibrated thresholds)")
    s.add_argument("-q", "--quiet", action="store_true",
                   help="progress only for the slides that fail (default: a bar on a terminal, else a line a slide); "
                        "the results listed at the end are every slide of this run's (summary.csv has the folder's)")
    s.set_defaults(func=_score)

    c = sub.add_parser("check", help="eligibility of a scored slide (result.json) under named rule sets",
                       formatter_class=_Help, epilog=CHECK_EPILOG)
    c.add_argument("result", type=_path, help="a result.json written by 'her2score score'")
    c.add_argument("--rule", action="append", required=True, metavar="RULE",
                   help="rule set name (see 'her2score rules') or a .toml rule file; repeat for several rules")
    c.add_argument("--ish", type=_ish, choices=ISH_CHOICES, metavar="RESULT",
                   help="ISH result for 2+ slides, in any case: %(choices)s (default: not done)")
    c.add_argument("--json", action="store_true", help="machine-readable output: one JSON object with each decision")
    c.set_defaults(func=_check)

    r = sub.add_parser("rules", help="list the shipped eligibility rule sets", formatter_class=_Help)
    r.set_defaults(func=_rules)

    g = sub.add_parser("synth", help="generate a labelled synthetic IHC data set", formatter_class=_Help)
    g.add_argument("out", type=_path, help="output folder")
    g.add_argument("--n-per-class", type=int, default=50, help="fields per class (0, 1+, 2+, 3+)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--stain-jitter", type=float, default=0.0, help="stain-vector perturbation in degrees")
    g.add_argument("--real-borders", action="store_true", help="draw real slides' unstained-border texture (synthetic.REAL_BORDERS)")
    g.set_defaults(func=_synth)

    t = sub.add_parser("train", help="train the tile CNN (synthetic fields, class folders or a path,label CSV)",
                       formatter_class=_Help)
    t.add_argument("--synthetic", type=int, metavar="N_PER_CLASS", help="generate N synthetic fields per class")
    t.add_argument("--synthetic-jitter", type=float, default=0.0, help="stain jitter of the generated fields in degrees")
    t.add_argument("--border-od-max", type=float, default=0.0, metavar="OD",
                   help="unstained-border texture of the generated fields: peak OD drawn from 0 to this, "
                        "e.g. 0.03 (0: the generator's clean borders, as the shipped model)")
    t.add_argument("--folder", type=_path, help="folder with one sub-folder per class, named as evaluate's labels: 0, null, 0+ (or "
                   "ultralow), 1+, 2+, 3+ (or 1plus...); null and ultralow train as 0")
    t.add_argument("--csv", type=_path, help="CSV of path,label (paths relative to the CSV's folder)")
    t.add_argument("--out", type=_path, required=True, help="folder for the weights and the training log")
    t.add_argument("--replace-shipped", action="store_true",
                   help="allow --out/--name to name the shipped weights (models/her2cnn.pt), which every default run uses")
    t.add_argument("--name", default="her2cnn.pt", help="weights file name")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--mpp", type=float, help="scan resolution in µm/px (overrides the images' metadata)")
    _backend_argument(t)
    t.add_argument("--target-mpp", type=float, default=0.5, help="resolution in µm/px the model works at")
    t.add_argument("--epochs", type=int, default=12, help="maximum epochs (early stopping may end sooner)")
    t.add_argument("--patience", type=int, default=3, help="epochs without validation gain before stopping")
    t.add_argument("--patch-px", type=int, default=64, help="patch side in pixels at --target-mpp")
    t.add_argument("--width", type=int, default=16, help="network width (16: 77,556 parameters)")
    t.add_argument("--patches-per-image", type=int, default=24, help="random patches per training image per epoch")
    t.add_argument("--batch-size", type=int, default=128, help="patches per optimiser step")
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    t.add_argument("--val-fraction", type=float, default=0.2, help="share of images held out for validation (0-1)")
    t.add_argument("--no-augment", action="store_true", help="no stain/flip augmentation")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine; 2 is faster on an idle one; the same weights "
                        "to the bit need the same seed and threads)")
    t.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    t.add_argument("--workers", type=int, default=1, help="processes generating synthetic fields")
    t.add_argument("--max-minutes", type=float,
                   help="stop after the first epoch that ends past this many minutes of training, keeping the best epoch "
                        "(field generation not counted; default: no limit)")
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="score labelled images; metrics (kappa, accuracy, eligibility) for classical, CNN and fused",
                       formatter_class=_Help)
    e.add_argument("labels", type=_path, help="CSV of path,label[,eligible][,ish] (paths relative to the CSV) or a folder per class")
    e.add_argument("--out", type=_path, required=True, help="output folder: metrics.json, report.md, per_image.csv, confusion PNG")
    e.add_argument("--reuse", type=_path, help="folder of earlier result.json files (from 'score' or 'evaluate') to reuse where "
                                   "this version of her2score scored the image with the same settings and µm/px (and the "
                                   "same CNN, where it runs), without a --regions annotation")
    e.add_argument("--reuse-by-name", action="store_true",
                   help="with --reuse, also match a result by the image's file name where the image it names has moved "
                        "(warned of in the report; only for the same file: its size and first and last 64 KiB)")
    e.add_argument("--no-cnn", action="store_true", help="classical scoring only")
    e.add_argument("--weights", type=_path, help="CNN weights file (default: the shipped models/her2cnn.pt)")
    e.add_argument("--model", type=_path, dest="weights", help=argparse.SUPPRESS)  # the old name of --weights
    _guideline_arguments(e)
    e.add_argument("--mpp", type=float, help="scan resolution in µm/px (overrides the images' metadata)")
    e.add_argument("--default-mpp", type=float, help="µm/px of the images whose metadata gives none (default: none, "
                                                     "such an image is refused)")
    _backend_argument(e)
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% interval of kappa (proportions use Wilson intervals)")
    e.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    e.add_argument("--rule", action="append", dest="rules", metavar="RULE",
                   help="eligibility rule set: a name (see 'her2score rules') or a .toml rule file; repeat for several "
                        "(default: every shipped rule)")
    e.add_argument("--eligible-rule", help="the rule the CSV's 'eligible' column answers")
    e.add_argument("--threads", type=int, default=1, help="torch CPU threads for the CNN")
    e.add_argument("-q", "--quiet", action="store_true", help="no per-image lines")
    e.set_defaults(func=_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name's byte that is not UTF-8 is printed as its escape, \udcXX
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # a damaged TIFF's own complaints: its row in summary.csv says what is wrong, in one line
        logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away ('| head'): stop quietly, as Unix tools do
        _output_gone()  # the interpreter's last flush writes nowhere
        return 141
    except KeyboardInterrupt:  # Ctrl-C outside a batch (synth, train, evaluate): what was written whole stays
        hint = (f"; the images scored are kept: add --reuse {Path(args.out) / 'results'} to the same command to score "
                "only the rest" if args.command == "evaluate" else "")
        _error(args.command, f"interrupted{hint}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
