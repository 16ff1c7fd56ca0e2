"""Evaluation runs: score labelled images and measure classical, CNN and fused scores against the labels.

``LABELS`` is a CSV ``path,label[,level][,eligible][,eligible_<rule>][,ish]`` (paths relative to
the CSV's folder) or a folder with one sub-folder per label (0, null, 0+, 1+, 2+, 3+...). Labels are the five
report levels: ``0`` (null or ultralow not said), ``null`` / ``0 (null)``, ``0+`` / ``ultralow`` /
``0+ (ultralow)``, ``1+``, ``2+``, ``3+`` (also 1plus, 2plus, 3plus); an optional ``level`` column
gives the five-level label beside a 4-class ``label`` (``her2score synth`` writes both). A ``truth.jsonl`` beside the CSV
(as ``her2score synth`` writes: one ``{"path": ..., "counts": {category: n}}`` per image), or
``count_<category>`` columns in the CSV, give the true cell counts, for per-image percentage agreement. Every image is scored by the pipeline (or
its result.json is reused, where it was scored with the same settings and µm/px and read by the same reader), the CNN is run on it when the result carries no
report of the same CNN. Each image is labelled once (a second row for it is refused). ``out`` receives:

- ``metrics.json``: per method (classical, cnn, fused): n, accuracy with its Wilson 95% interval,
  quadratic-weighted kappa with a percentile-bootstrap 95% interval (paired resamples of images,
  seeded; flagged as unreliable under n = 30), per-class precision and recall (Wilson), the
  confusion matrix (rows truth, columns called), null vs ultralow agreement, and per eligibility
  rule sensitivity and specificity (Wilson), the needs-review rate and the counts behind them;
  ``percent_agreement``: per category, the mean absolute error and Bland-Altman bias and limits of
  the called percentage of tumour cells against the truth;
- ``per_image.csv`` (every score, level, flag, reason, percentage and eligibility answer; ``reused_from``: the
  absolute path of a result.json reused), ``confusion.png``, ``bland_altman.png`` (when truth has counts),
  ``report.md`` and ``results/<image>/result.json`` (a reused one copied there: ``out`` stands alone; metrics.json's
  ``reuse`` names the folder the copies came from).

Eligibility truth per image and rule never comes from ``check_eligibility``: it is the
``eligible_<rule>`` column (or ``eligible`` with ``eligible_rule``) when given, else it is derived
from the label and the rule file alone (``eligibility_truth``: the rule's eligible levels, ISH
levels and ISH result, and its percentage requirements on the true counts). Where these do not
decide the answer (a plain 0 label under a rule that separates null from ultralow, a percentage
requirement without true counts, an ISH level without an ``ish`` column) the image is left out of
that rule's figures and counted as undetermined. ``report.md`` says which source each rule used.
A predicted ``eligible`` is a positive call; ``not_eligible`` and ``needs_review`` are not
(needs_review is reported as its own rate). Rules made for another guideline family than the
evaluation's are skipped, with the reason.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .categories import CATEGORIES
from .eligibility import ish_result
from .labels import TRUTH_LEVELS, class_folder_files, class_folders, parse_truth_label, read_csv_rows, row_label
from .guidelines import FALSE_MEMBRANE_PERCENT, GUIDELINE_FAMILY, ZERO_SPLIT, level_flags, report_level, wilson_ci
from .files import content_sample
from .outputs import atomic_write
from .pipeline import OWN_STAINS_NOTE, READER_NOTE, with_call_doubts
from .slide import SlideError, automatic_backend, checked_backend, resolved_path
from .results import SCORES, ZERO_LEVELS, SlideResult

__all__ = [
    "METHODS",
    "TRUTH_LEVELS",
    "KAPPA_MIN_N",
    "LabelledItem",
    "parse_truth_label",
    "read_labels",
    "confusion_matrix",
    "quadratic_weighted_kappa",
    "accuracy",
    "per_class",
    "wilson_ci",
    "bootstrap_ci",
    "binary_rates",
    "eligibility_truth",
    "percent_agreement",
    "method_result",
    "evaluate",
]

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("classical", "cnn", "fused")
KAPPA_MIN_N = 30
"""Below this many images the bootstrap interval of kappa is reported with a warning."""

_TRUE = {"1", "true", "yes", "y", "eligible"}
_FALSE = {"0", "false", "no", "n", "not_eligible", "not eligible", "ineligible"}


@dataclass(frozen=True)
class LabelledItem:
    """One labelled image: its score (0, 1+, 2+, 3+), report level (None for a plain 0), known
    eligibility per rule, ISH result and true cell counts per category (None when unknown)."""

    path: str
    label: str
    eligible: dict[str, bool]
    ish: str | None = None
    level: str | None = None
    counts: dict[str, int] | None = field(default=None, compare=False)


# --------------------------------------------------------------------------------------- labels

def _parse_bool(value: str, where: str) -> bool | None:
    v = value.strip().lower()
    if v == "":
        return None
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{where}: eligible value {value!r} is not one of true/false, yes/no, 1/0, eligible/not_eligible")


def _count_value(value: Any, where: str) -> int:
    """A true cell count: a whole number >= 0 (an integral float or numeral string too); ValueError naming ``where``."""
    try:
        n = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        n = math.nan
    if not (math.isfinite(n) and n >= 0 and n == int(n)):
        raise ValueError(f"{where}: a cell count must be a whole number >= 0, got {value!r}")
    return int(n)


def _truth_counts(path: Path) -> dict[str, dict[str, int]]:
    """True cell counts per image (keyed by its resolved path, relative ones to the file's folder) from a truth.jsonl, or {}."""
    if not path.is_file():
        return {}
    out = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, counts = row["path"], row["counts"]
            if not isinstance(image, str) or not isinstance(counts, dict):
                raise TypeError("'path' must be a string and 'counts' an object")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {i}: not a truth record with 'path' and 'counts' ({e})") from None
        if unknown := sorted(set(map(str, counts)) - set(CATEGORIES)):
            raise ValueError(f"{path}, line {i}: unknown cell categories {unknown}; the categories are {list(CATEGORIES)}")
        out[str(resolved_path(path.parent / image))] = {str(k): _count_value(v, f"{path}, line {i}, {k}") for k, v in counts.items()}
    return out


def read_labels(labels: str | os.PathLike, *, eligible_rule: str | None = None) -> list[LabelledItem]:
    """Labelled images from a CSV or a class-folder tree (see the module docstring)."""
    p = Path(labels).absolute()  # images named absolutely: their results say which image they are (reuse)
    if p.is_dir():
        return [LabelledItem(str(f), score, {}, level=level) for f, (score, level)
                in class_folder_files(p, parse_truth_label)]
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such labels file or folder")
    truth = _truth_counts(p.parent / "truth.jsonl")
    try:
        rows = read_csv_rows(p)
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save the labels as UTF-8 CSV") from None
    except csv.Error as e:
        raise ValueError(f"{p}: not a readable CSV ({e})") from None
    for i, r in rows:
        if not r.get("path") and any(r.values()):
            raise ValueError(f"{p}, line {i}: a row without a path ({r})")
    rows = [(i, r) for i, r in rows if r.get("path")]
    if not rows:
        raise ValueError(f"{p}: no labelled rows")
    if unknown := sorted(k for k in rows[0][1] if k.startswith("count_") and k[len("count_"):] not in CATEGORIES):
        raise ValueError(f"{p}: unknown count columns {unknown}; the categories are {list(CATEGORIES)}")
    if any(r.get("eligible") for _, r in rows) and not eligible_rule:
        raise ValueError(f"{p}: has an 'eligible' column; say which rule it answers (--eligible-rule NAME; "
                         "eligible_rule=NAME in the Python API), or name the columns eligible_<rule>")
    items, line_of = [], {}
    for i, r in rows:
        where = f"{p}, line {i}"
        if (key := str(resolved_path(p.parent / r["path"]))) in line_of:
            raise ValueError(f"{where}: {r['path']} is labelled again (first on line {line_of[key]}); each image once")
        line_of[key] = i
        try:
            score, level = row_label(r)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        elig = {}
        for k, v in r.items():
            if k.startswith("eligible_") and v:
                elig[k[len("eligible_"):]] = _parse_bool(v, where)
        if eligible_rule and r.get("eligible"):
            answer = _parse_bool(r["eligible"], where)
            if elig.get(eligible_rule) not in (None, answer):
                raise ValueError(f"{where}: eligible and eligible_{eligible_rule} disagree")
            elig[eligible_rule] = answer
        try:
            ish = ish_result(r.get("ish") or None)  # empty: no ISH result
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        counts = truth.pop(key, None)
        if any(r.get(f"count_{c}") for c in CATEGORIES):  # true counts given in the labels file itself
            if empty := [f"count_{c}" for c in CATEGORIES if f"count_{c}" in r and not r[f"count_{c}"]]:
                raise ValueError(f"{where}: true counts given for some categories but not {empty} (write 0 for none)")
            given = {c: _count_value(r.get(f"count_{c}") or 0, f"{where}, count_{c}") for c in CATEGORIES}
            if counts is not None and given != {c: counts.get(c, 0) for c in CATEGORIES}:  # two truths, which?
                raise ValueError(f"{where}: its count_ columns and truth.jsonl give other true counts for {r['path']}; "
                                 "keep one")
            counts = given
        path = Path(r["path"])
        items.append(LabelledItem(str(path if path.is_absolute() else p.parent / path), score,
                                  {k: v for k, v in elig.items() if v is not None}, ish, level, counts))
    if truth:
        log.warning("%s: %d truth.jsonl record(s) name no labelled image (e.g. %s); their counts are unused",
                    p, len(truth), next(iter(truth)))
    return items


# --------------------------------------------------------------------------------------- metrics

def confusion_matrix(truth: Sequence[str], called: Sequence[str], classes: Sequence[str] = SCORES) -> np.ndarray:
    """Counts (K, K): rows the truth, columns the call."""
    k = len(classes)
    t = np.array([classes.index(x) for x in truth], int)
    c = np.array([classes.index(x) for x in called], int)
    return np.bincount(t * k + c, minlength=k * k).reshape(k, k)


def quadratic_weighted_kappa(cm: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights w_ij = (i - j)^2 / (K - 1)^2 from a confusion matrix:
    1 - sum(w * O) / sum(w * E), O the observed and E the expected (outer product of the marginals
    / n) counts. NaN when it measures nothing: no images, or every truth in one class (kappa is then 0
    however many are called right); calls all in one class against a varied truth give 0, no agreement
    beyond chance."""
    cm = np.asarray(cm, np.float64)
    k = cm.shape[0]
    n = cm.sum()
    if n == 0 or (cm.sum(axis=1) > 0).sum() < 2:
        return float("nan")
    i, j = np.indices((k, k))
    w = (i - j) ** 2 / (k - 1) ** 2
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    denom = (w * expected).sum()
    if denom == 0:
        return float("nan")
    return float(1.0 - (w * cm).sum() / denom)


def accuracy(cm: np.ndarray) -> float:
    n = cm.sum()
    return float(np.trace(cm) / n) if n else float("nan")


def per_class(cm: np.ndarray, classes: Sequence[str] = SCORES) -> dict[str, dict[str, Any]]:
    """Precision (of the calls of a class) and recall (of the true members) per class, with Wilson
    95% intervals; None where undefined."""
    out = {}
    for k, c in enumerate(classes):
        called, true, hit = int(cm[:, k].sum()), int(cm[k].sum()), int(cm[k, k])
        out[c] = {"precision": hit / called if called else None, "precision_ci95": list(wilson_ci(hit, called)),
                  "recall": hit / true if true else None, "recall_ci95": list(wilson_ci(hit, true)),
                  "n_true": true, "n_called": called}
    return out


def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of ``stat(indices)`` over ``resamples`` draws of n indices."""
    if n == 0 or resamples <= 0:
        return None, None
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)], np.float64)
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return None, None
    a = (1 - level) / 2
    lo, hi = np.quantile(vals, [a, 1 - a])
    return float(lo), float(hi)


def binary_rates(truth: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(sensitivity, specificity) of boolean calls against boolean truth; NaN where undefined."""
    truth, positive = np.asarray(truth, bool), np.asarray(positive, bool)
    p, q = truth.sum(), (~truth).sum()
    sens = float((positive & truth).sum() / p) if p else float("nan")
    spec = float((~positive & ~truth).sum() / q) if q else float("nan")
    return sens, spec


def percent_agreement(pairs: Sequence[tuple[Mapping[str, float], Mapping[str, float]]],
                      categories: Sequence[str] = CATEGORIES) -> dict[str, dict[str, float | int]]:
    """Per category, agreement of called against true percentages of tumour cells over images:
    n, mean absolute error, Bland-Altman bias (mean called - truth), SD of the differences and the
    95% limits of agreement (bias ± 1.96 SD; SD and limits None for one image, which has no spread), and
    the largest absolute error; points in percentage points; ``n_present``: the images with cells of the category,
    truly or as called (the others agree at 0 and shrink the error and the spread: read the figures with it).
    ``pairs``: per image (called %, true %) by category (missing categories count 0)."""
    out = {}
    for c in categories:
        called = np.array([p[0].get(c, 0.0) for p in pairs], np.float64)
        true = np.array([p[1].get(c, 0.0) for p in pairs], np.float64)
        d = called - true
        if len(d) == 0:
            continue
        sd = float(d.std(ddof=1)) if len(d) > 1 else None
        bias = float(d.mean())
        out[c] = {"n": len(d), "n_present": int(np.sum((called > 0) | (true > 0))), "mae": float(np.abs(d).mean()),
                  "bias": bias, "sd": sd,
                  "loa_low": None if sd is None else bias - 1.96 * sd, "loa_high": None if sd is None else bias + 1.96 * sd,
                  "max_abs_error": float(np.abs(d).max())}
    return out


# --------------------------------------------------------------------------------------- eligibility

def _level_for(result: SlideResult, score: str | None) -> str:
    """The report level of ``score``: the classical level when it is the classical score, else the level the
    pipeline gives a score the guideline rules did not make (guidelines.report_level: a 2023 0 is null or ultralow)."""
    if score is None:
        return "not scored"
    classical_level = result.classical_level or (result.level if result.score == result.classical_score else "")
    if score == result.classical_score and classical_level not in ("", "not scored"):
        return classical_level
    return report_level(score, result.guideline, result.counts)


def method_result(result: SlideResult, method: str) -> SlideResult | None:
    """The result as one method alone would have reported it (None when that method did not run).

    classical and cnn stand alone (no CNN report, so no disagreement doubt): classical keeps the
    guideline call's own flags (``classical_flags``); cnn carries the flags its level gives by
    itself, as the pipeline gives a fused level (level_flags, ``null_or_ultralow`` where false membranes
    alone could make an ultralow, ``cytoplasmic_dab`` where the slide's staining says so), and eligibility
    weighs the classical call's ``near_cutoff`` (the cells measured) for it too. fused is the result as the
    tool reports it.
    """
    if method == "classical":
        s = result.classical_score
        return replace(result, score=s, level=_level_for(result, s), flags=result.classical_flags, cnn=None, confidence=None,
                       reason=result.classical_reason or result.reason, classical_reason="")
    if method == "cnn":
        if result.cnn is None:
            return None
        s = result.cnn.score
        level = _level_for(result, s)
        flags, _ = with_call_doubts(level_flags(level, result.guideline), s, level, result.counts, result.guideline,
                                    result.staining.get("diffuse_cytoplasm_od"), result.staining.get("membrane_contrast_od"),
                                    filled=result.staining.get("stained_cytoplasm_od"),
                                    false_membrane_percent=result.config.get("false_membrane_percent", FALSE_MEMBRANE_PERCENT),
                                    scan_mpp=result.mpp)
        return replace(result, score=s, level=level, flags=flags, cnn=None, confidence=None)
    if method == "fused":
        return result
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


_ANY_STAINING = ("faint_partial", "weak_moderate_partial", "weak_moderate_complete", "weak_moderate_lateral", "strong_partial",
                 "strong_complete", "strong_lateral")
_AT_LEAST = {
    "gastric": {1: _ANY_STAINING, 2: ("weak_moderate_complete", "weak_moderate_lateral", "strong_complete", "strong_lateral"),
                3: ("strong_complete", "strong_lateral")},
    "breast": {1: _ANY_STAINING, 2: ("weak_moderate_complete", "strong_complete", "weak_moderate_lateral", "strong_lateral",
                                     "strong_partial"),
               3: ("strong_complete",)},
}
"""The categories of a cell stained at each level or higher as each guideline family reads one cell. Gastric: complete
and lateral (U) membranes at their intensity, any other stained membrane at 1+. Breast: 3+ intense complete only; 2+
complete membranes, or the unusual pattern (lateral, or intense incomplete); 1+ any staining. Written out here rather
than taken from the package's own tables, so that a fault in those shows in the figures."""


def _requirement_holds(level: str, min_percent: float, inclusive: bool, counts: Mapping[str, int], family: str) -> bool:
    """Whether the true ``counts`` hold a rule's ``[[require]]`` under a guideline ``family`` ("breast" or "gastric"):
    the share at ``level`` ("1+", "2+", "3+" or "any") or higher over (``inclusive``: at least) ``min_percent``, in
    exact arithmetic."""
    total = sum(int(v) for v in counts.values())
    n = sum(int(counts.get(cat, 0)) for cat in _AT_LEAST[family][1 if level == "any" else int(level[0])])
    share, need = Fraction(100 * n, total), Fraction(str(min_percent))
    return share >= need if inclusive else share > need


def eligibility_truth(label: str, rule, *, ish: str | None = None, counts: Mapping[str, int] | None = None,
                      guideline: str | None = None) -> bool | None:
    """Whether a patient whose true label is ``label`` (any TRUTH_LEVELS spelling) is eligible under
    ``rule``, from the rule file alone (never check_eligibility): the label's level is eligible if it,
    or its score, is in ``eligible_levels``; in ``ish_levels`` it is eligible when ``ish`` equals
    ``ish_eligible``; otherwise not. A ``[[require]]`` percentage is checked on the true ``counts``, a cell
    read as ``guideline`` (the scoring evaluated; None: the rule's own, "breast" or "gastric" or one of
    theirs) reads one; ValueError where neither names one and the two families' readings differ.

    None when the label does not decide it: a plain 0 where the rule treats null and ultralow
    differently, an ISH level without an ISH result, a requirement without true counts. A requirement
    the counts fail makes it False whatever the ISH result (requirements hold on ISH levels too).
    """
    score, level = parse_truth_label(label)
    candidates = [level] if level else list(ZERO_LEVELS)  # a plain 0: null or ultralow
    counted = counts is not None and sum(counts.values()) > 0
    meets = None
    if counted and rule.require:
        named = guideline or rule.guideline
        family = GUIDELINE_FAMILY.get(named, named)  # a guideline's family, or the family a rule names itself
        held = {all(_requirement_holds(req.level, req.min_percent, req.inclusive, counts, f) for req in rule.require)
                for f in ([family] if family in _AT_LEAST else _AT_LEAST)}
        if len(held) > 1:
            raise ValueError(f"rule {rule.name!r} expects {rule.guideline!r} scoring, and breast and gastric read its "
                             "[[require]] cells differently here: give the guideline")
        meets = held.pop()
    answers = set()
    for lv in candidates:
        keys = {lv, score}
        if keys & set(rule.ish_levels):
            answer = None if ish is None else ish == rule.ish_eligible
        else:
            answer = bool(keys & set(rule.eligible_levels))
        if rule.require and (answer or (answer is None and meets is False)):
            answer = meets
        answers.add(answer)
    return answers.pop() if len(answers) == 1 else None


# --------------------------------------------------------------------------------------- running

def _find_reusable(reuse: str | os.PathLike | None, *, by_name: bool = False) -> dict[str, Path]:
    """result.json files (by absolute path) under ``reuse`` keyed by the resolved slide path, and, with ``by_name``, by file
    name where the slide is no longer at that path (its folder moved) and no other result names a slide
    so: a result does not say which pixels it read, and another set's field of the same name (synth names
    every set's fields alike) would be taken for it. A result naming its slide by a relative path is left
    out: relative to a folder this run cannot know, it could name another image."""
    if not reuse:
        return {}
    root = Path(reuse).absolute()  # per_image.csv's reused_from names the file wherever the report is read
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the folder of results to reuse (--reuse; reuse= in the Python API) " + ("is not a folder (give the folder of result.json files, e.g. an "
                                                       "earlier evaluation's results/)" if root.exists() else "folder does not exist"))
    by_key: dict[str, Path] = {}
    names: dict[str, list[Path]] = {}
    for f in sorted(root.rglob("result.json")):
        try:
            slide = json.loads(f.read_text(encoding="utf-8"))["slide"]
        except (ValueError, KeyError, OSError, TypeError):
            continue
        if not isinstance(slide, str) or not Path(slide).is_absolute():
            continue
        by_key[str(resolved_path(slide))] = f
        if by_name and not Path(slide).exists():
            names.setdefault(Path(slide).name, []).append(f)
    for name, fs in names.items():
        if len(fs) == 1:
            by_key.setdefault(f"name:{name}", fs[0])
    return by_key


def _result_folders(paths: Sequence[str], root: Path) -> list[str]:
    """Each image's folder under results/: its path under ``root`` (else its file name), made safe; a
    name two images would share gets ' (2)', ' (3)', ... on the later ones."""
    from .batch import safe_name

    out, seen = [], Counter()
    for path in paths:
        p = Path(path)
        name = safe_name(str(p.relative_to(root)) if p.is_relative_to(root) else p.name)
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def _changed_since(image: str, result_file: Path, result: SlideResult) -> bool:
    """Whether ``image`` may not be the file ``result`` (read from ``result_file``) was scored on: modified after
    ``result_file`` was written, or its content sample unlike the result's (a file copied over it with its old
    time kept, cp -p or rsync -a; the sample alone misses a same-sized file whose first and last 64 KiB are
    alike, glass); True where it cannot be read."""
    try:
        return (os.stat(image).st_mtime_ns > result_file.stat().st_mtime_ns
                or bool(result.slide_sample) and content_sample(image) != result.slide_sample)
    except OSError:
        return True


def _training_field_seeds(record, labels: str | os.PathLike, images: Sequence[str]) -> int:
    """How many of ``images`` a generator's truth.jsonl (beside ``labels``) says were drawn with the score and
    field seed of one of the CNN's training fields (train.synthetic_images: SeedSequence(seed) over the fields
    the weights record's training data names, the first quarter 0, then 1+, 2+, 3+): the same cells, stained
    alike (another score from the same seed is another image); 0 where either side does not say."""
    found = re.search(r"(\d+) synthetic fields \(.*SeedSequence\((\d+)\)", str(record.training.get("data", "")))
    truth = Path(labels).absolute()
    truth = (truth if truth.is_dir() else truth.parent) / "truth.jsonl"
    if not found or not truth.is_file():
        return 0
    n = int(found[1])
    seeds = np.random.SeedSequence(int(found[2])).generate_state(n).tolist()
    trained = {(SCORES[k * len(SCORES) // n], seed) for k, seed in enumerate(seeds)}
    wanted = {str(resolved_path(p)) for p in images}
    shared = 0
    for line in truth.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            if (row.get("score"), row.get("seed")) in trained and str(resolved_path(truth.parent / row["path"])) in wanted:
                shared += 1
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return shared


def _training_images(record, images: Sequence[str]) -> int:
    """How many of ``images`` the weights record lists among the CNN's training images (train: their
    files.content_sample, for images read from files); 0 where the record lists none."""
    known = set(record.training.get("image_samples") or ())
    return sum(1 for p in images if Path(p).is_file() and content_sample(p) in known) if known else 0


_RESERVED_RULE_NAMES = ("level", "flags", "model", "by", *(f"pct_{c}" for c in CATEGORIES))
"""Rule names whose per_image.csv columns (<method>_<rule>, truth_<rule>) are other columns' names."""


def _same_mpp(result: SlideResult, given: float | None, default: float | None = None) -> bool:
    """Whether ``result`` was scored at the µm/px a run now reads its image at: ``given``, or without it the
    file's own (a result scored at a µm/px the user gave is not), or where the file has none ``default`` (a result
    scored at another default, or at one where none is given now, is not)."""
    if given is not None:
        return abs(result.mpp - given) < 1e-9
    if result.mpp_origin == "default":
        return default is not None and abs(result.mpp - default) < 1e-9
    return result.mpp_origin == "metadata"


def _same_reader(result: SlideResult, image: str, backend: str | None) -> bool:
    """Whether ``result`` was read by the reader a run now opens ``image`` with: ``backend``, or without it the one
    the file chooses (slide.automatic_backend); a result naming none, written before results named their reader, only
    where no ``backend`` is given."""
    recorded = next((n.removeprefix(READER_NOTE) for n in result.notes if n.startswith(READER_NOTE)), None)
    if recorded is None:
        return backend is None
    try:
        return recorded == (backend or automatic_backend(image))
    except SlideError:  # scoring it again says what is wrong
        return False


def _score_one(item: LabelledItem, *, config, mpp, model, reusable, default_mpp=None,
               backend: str | None = None) -> tuple[SlideResult, str, str]:
    """The image's result, the result.json reused ("" when it was scored), and who ran the CNN
    ("pipeline", "reused" or "" when none ran). A finished result is reused where this version of the
    tool scored it with the same settings (guideline, specimen, thresholds and every other scoring
    setting; the default ones retried with the slide's own stain vectors count as the default), on its
    detected tumour cells (no annotation), read by the same reader (``backend``, slide.open_slide's) and, when
    given, at the same µm/px, unless the CNN is wanted and it has none, or another model's, or the image was
    not the file it was scored on (_changed_since)."""
    from .pipeline import analyse_slide

    key = str(resolved_path(item.path))
    f = reusable.get(key) or reusable.get(f"name:{Path(item.path).name}")
    result = None
    if f is not None:
        try:  # another version's result, or a damaged one: scored again
            result = SlideResult.read(f)
        except ValueError:
            pass
    if result is not None and not _changed_since(item.path, f, result):  # the image it was scored on
        recorded = dict(result.config)
        if any(n.startswith(OWN_STAINS_NOTE) for n in result.notes):  # the default settings, retried with its own stain vectors
            recorded["estimate_stains"] = False
        same = (result.version == __version__ and recorded == json.loads(json.dumps(config.to_dict()))
                and _same_mpp(result, mpp, default_mpp) and not result.region.startswith(("annotation", "mask"))
                and _same_reader(result, item.path, backend))
        if same and (model is None or (result.cnn is not None and result.cnn.model == model.name)):
            if model is None and result.cnn is not None:  # no CNN wanted: the reused result's CNN part is left out
                result = method_result(result, "classical")
            return result, str(f), "reused" if result.cnn is not None else ""
    result = analyse_slide(item.path, config=config, mpp=mpp, cnn=model, default_mpp=default_mpp, backend=backend).result
    return result, "", "pipeline" if result.cnn is not None else ""


def _remove_stale_results(folder: Path, keep: set[str]) -> None:
    """Remove the result folders an earlier run into the same ``--out`` left beside the ``keep`` this run
    wrote (images no longer labelled, or failing now; only folders holding nothing but a result.json):
    results/ then matches per_image.csv."""
    if not folder.is_dir():
        return
    for d in folder.iterdir():
        if d.name not in keep and d.is_dir() and not d.is_symlink() and [p.name for p in d.iterdir()] in ([], ["result.json"]):
            (d / "result.json").unlink(missing_ok=True)
            d.rmdir()


def _method_metrics(truth: list[str], called: list[str | None], truth_levels: list[str | None],
                    called_levels: list[str | None], *, resamples: int, seed: int, split_zero: bool) -> dict[str, Any] | None:
    """A method's figures over the images it scored; the null vs ultralow table (``split_zero``: the
    guideline tells them apart) over every image, an unscored one in its "not scored" column."""
    keep = [i for i, c in enumerate(called) if c is not None]
    if not keep:
        return None
    t = [truth[i] for i in keep]
    c = [called[i] for i in keep]
    cm = confusion_matrix(t, c)
    ti = np.array([SCORES.index(x) for x in t])
    ci = np.array([SCORES.index(x) for x in c])

    def cm_of(idx):
        return np.bincount(ti[idx] * 4 + ci[idx], minlength=16).reshape(4, 4)

    n, hits = len(keep), int(np.trace(cm))
    qwk = quadratic_weighted_kappa(cm)
    kept = []  # the resamples that give a kappa (one with every label of one class gives none)

    def kappa_of(idx: np.ndarray) -> float:
        kept.append(math.isfinite(k := quadratic_weighted_kappa(cm_of(idx))))
        return k

    kappa_ci = list(bootstrap_ci(kappa_of, n, resamples=resamples, seed=seed))
    point = kappa_ci[0] is not None and kappa_ci[0] == kappa_ci[1]
    note = ("kappa is undefined: every label is one class" if math.isnan(qwk) else
            "not drawn (no resamples)" if resamples <= 0 else f"n < {KAPPA_MIN_N}" if n < KAPPA_MIN_N else
            "none: kappa is undefined here" if kappa_ci[0] is None else
            "a point: the resamples that give a kappa all give the same" if point else None)
    return {
        "n": n,
        "n_correct": hits,
        "accuracy": accuracy(cm),
        "accuracy_ci95": list(wilson_ci(hits, n)),
        "quadratic_weighted_kappa": None if math.isnan(qwk) else qwk,
        "quadratic_weighted_kappa_ci95": kappa_ci,
        "kappa_interval_reliable": note is None,
        "kappa_interval_note": note,
        "kappa_resamples": max(resamples, 0),
        "kappa_resamples_kept": sum(kept),
        "per_class": per_class(cm),
        "confusion": {"classes": list(SCORES), "rows": "truth", "columns": "called", "matrix": cm.tolist()},
        "null_vs_ultralow": _null_vs_ultralow(truth_levels, called_levels) if split_zero else None,
    }


def _null_vs_ultralow(truth_levels: list[str | None], called_levels: list[str | None]) -> dict[str, Any] | None:
    """Images truly null or ultralow: their called level (rows truth, columns called) and the share
    called at exactly their level (Wilson 95%); None when there are none."""
    idx = [i for i, t in enumerate(truth_levels) if t in ZERO_LEVELS]
    if not idx:
        return None
    cols = ["0 (null)", "0+ (ultralow)", "0", "1+", "2+", "3+", "not scored"]
    m = np.zeros((2, len(cols)), int)
    for i in idx:
        called = called_levels[i] if called_levels[i] in cols else "not scored"
        m[ZERO_LEVELS.index(truth_levels[i]), cols.index(called)] += 1
    hits = int(m[0, 0] + m[1, 1])
    return {"rows": list(ZERO_LEVELS), "columns": cols, "matrix": m.tolist(), "n": len(idx),
            "agreement": hits / len(idx), "agreement_ci95": list(wilson_ci(hits, len(idx)))}


def _rule_metrics(truth: list[bool | None], status: list[str | None]) -> dict[str, Any]:
    """One rule's figures on the images scored (``status`` not None). Sensitivity: eligible calls of the truly
    eligible (a review is no eligible call, so a miss); specificity: the truly ineligible not called eligible (a review
    counts as not called eligible), so read both with the review rate of each truth class; wrong calls: definite
    answers against the truth; needs review: of every image scored, its truth known or not (a 2+ awaiting ISH)."""
    keep = [i for i, (t, s) in enumerate(zip(truth, status)) if t is not None and s is not None]
    t = np.array([truth[i] for i in keep], bool)
    s = np.array([status[i] for i in keep], object)
    pos = s == "eligible"
    review = s == "needs_review"
    sens, spec = binary_rates(t, pos)
    nan = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    scored = [st for st in status if st is not None]
    counts = {f"{'eligible' if tv else 'not_eligible'}->{st}": int(np.sum((t == tv) & (s == st)))
              for tv in (True, False) for st in ("eligible", "not_eligible", "needs_review")}
    return {
        "n": len(keep),
        "n_undetermined": len(scored) - len(keep),
        "n_truly_eligible": int(t.sum()),
        "sensitivity": nan(sens), "sensitivity_ci95": list(wilson_ci(int((pos & t).sum()), int(t.sum()))),
        "specificity": nan(spec), "specificity_ci95": list(wilson_ci(int((~pos & ~t).sum()), int((~t).sum()))),
        "review_rate_eligible": float(review[t].mean()) if t.any() else None,
        "review_rate_ineligible": float(review[~t].mean()) if (~t).any() else None,
        "wrong_calls": counts["eligible->not_eligible"] + counts["not_eligible->eligible"],
        "needs_review_rate": scored.count("needs_review") / len(scored) if scored else None,
        "counts": counts,
    }


def _truth_percent(counts: Mapping[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {c: 100.0 * counts.get(c, 0) / total for c in CATEGORIES} if total else {}


def evaluate(labels: str | os.PathLike, out: str | os.PathLike, *, reuse: str | os.PathLike | None = None,
             use_cnn: bool = True, model=None, guideline: str = "breast-asco-cap-2023", specimen: str = "resection",
             gastric_reading: str = "cumulative", isolated_intense_percent: float | None = None, mpp: float | None = None, bootstrap: int = 1000, seed: int = 0, rules: Sequence | None = None,
             eligible_rule: str | None = None, reuse_by_name: bool = False,
             progress: Callable[[int, int, dict], None] | None = None, default_mpp: float | None = None,
             backend: str | None = None) -> dict[str, Any]:
    """Score every labelled image and write metrics, per-image CSV, plots and report to ``out``.

    ``model``: a TileClassifier, a weights path, or None for the shipped weights (ignored when
    ``use_cnn`` is False). ``rules``: eligibility rules, by name, rule file or Rule (default: all shipped rules).
    ``specimen``: resection or biopsy (gastric biopsies count cohesive clusters); ``gastric_reading``,
    ``isolated_intense_percent`` (None: the default): as ScoringConfig's. ``reuse_by_name``: also
    reuse a result under ``reuse`` by the image's file name where the image it names has moved (warned of; only
    for the file it scored: its slide_sample). ``mpp`` overrides every image's µm/px; ``default_mpp`` is used
    where an image's metadata gives none; ``backend`` reads every image with one reader (slide.open_slide's; None:
    the one each file chooses).
    Returns the metrics dict (also ``metrics.json``) plus ``summary`` (text) and ``errors`` (count).
    """
    from .batch import output_lock
    from .eligibility import Rule, available_rules, check_eligibility, distinct_rules, guideline_suits, load_rule
    from .pipeline import ScoringConfig

    t_start = time.perf_counter()
    backend = checked_backend(backend)
    items = read_labels(labels, eligible_rule=eligible_rule)
    root = Path(labels).absolute()
    root = root if root.is_dir() else root.parent
    clf = None
    if use_cnn:
        from .cnn import TileClassifier, load_model

        clf = model if isinstance(model, TileClassifier) else load_model(model)
    config = ScoringConfig(guideline=guideline, specimen=specimen, gastric_reading=gastric_reading,
                           **({} if isolated_intense_percent is None else {"isolated_intense_percent": isolated_intense_percent}))
    rule_objs = distinct_rules([r if isinstance(r, Rule) else load_rule(r) for r in (rules or available_rules())])
    unknown = sorted({name for item in items for name in item.eligible} - {r.name for r in rule_objs} - set(available_rules()))
    if unknown:
        raise ValueError(f"{labels}: eligibility truth for unknown rules {unknown}; the rules are {available_rules()}")
    if clash := sorted(r.name for r in rule_objs if r.name in _RESERVED_RULE_NAMES):
        raise ValueError(f"rules named {clash} would overwrite per_image.csv's columns (<method>_<rule>, truth_<rule>); "
                         "rename them")
    out = Path(out)  # made once the settings are known to be good: a refused run leaves no folder
    if out.exists() and not out.is_dir():  # mkdir said "[Errno 17] File exists"
        raise ValueError(f"{out}: exists and is not a folder (--out; out= in the Python API)")
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):  # one run at a time in a folder, as for 'score' (a second one wrote over the first's files)
        same_name = {name for name, k in Counter(Path(item.path).name for item in items).items() if k > 1}
        reusable = {key: f for key, f in _find_reusable(reuse, by_name=reuse_by_name).items()  # by file name only where that names one image
                    if not (key.startswith("name:") and key[len("name:"):] in same_name)}
        folders = _result_folders([item.path for item in items], root)

        rows: list[dict[str, Any]] = []
        results: list[SlideResult | None] = []
        by_name: list[str] = []  # images whose reused result was matched by file name alone
        for n_done, item in enumerate(items, start=1):
            row: dict[str, Any] = {"path": item.path, "label": item.label, "truth_level": item.level or ""}
            try:
                result, reused_from, cnn_by = _score_one(item, config=config, mpp=mpp, model=clf, reusable=reusable,
                                                         default_mpp=default_mpp, backend=backend)
                if reused_from and str(resolved_path(result.slide)) != str(resolved_path(item.path)):
                    by_name.append(item.path)
                d = out / "results" / folders[n_done - 1]
                d.mkdir(parents=True, exist_ok=True)
                atomic_write(d / "result.json", result.to_json())
                row.update(classical=result.classical_score, cnn=result.cnn_score, fused=result.score,
                           confidence=result.confidence, level=result.level,
                           classical_level=method_result(result, "classical").level,
                           flags=";".join(result.flags), classical_flags=";".join(result.classical_flags),
                           reason=result.reason, h_score=result.h_score, tumour_cells=result.tumour_cells,
                           qc_passed=result.qc_passed, qc=";".join(f"{q.severity}:{q.code}" for q in result.qc),
                           reused=bool(reused_from), reused_from=reused_from, cnn_by=cnn_by,
                           cnn_model=result.cnn.model if result.cnn else "", error="")
                if result.cnn:
                    cnn_alone = method_result(result, "cnn")
                    row.update(cnn_level=cnn_alone.level, cnn_flags=";".join(cnn_alone.flags))
                    row.update({f"p_{c}": result.cnn.probabilities.get(c) for c in SCORES})
                row.update({f"pct_{c}": result.percentages.get(c) for c in CATEGORIES})
                if item.counts:
                    row.update({f"truth_pct_{c}": round(v, 3) for c, v in _truth_percent(item.counts).items()})
                results.append(result)
            except Exception as e:  # one bad image never stops the run
                msg = str(e) if item.path in str(e) else f"{item.path}: {type(e).__name__}: {e}"
                log.debug("failed: %s", msg, exc_info=True)
                row.update(classical=None, cnn=None, fused=None, error=msg)
                results.append(None)
            rows.append(row)
            if progress:
                progress(n_done, len(items), row)
        _remove_stale_results(out / "results", {folders[i] for i, r in enumerate(results) if r is not None})

        ok = [i for i, r in enumerate(results) if r is not None]
        truth = [items[i].label for i in ok]
        metrics: dict[str, Any] = {
            "labels": str(Path(labels).absolute()), "n_images": len(items), "n": len(ok), "errors": len(items) - len(ok),
            "not_scored": sum(1 for i in ok if results[i].score is None),
            "reused": sum(1 for r in rows if r.get("reused")), "reuse": str(Path(reuse).absolute()) if reuse else None,
            "guideline": guideline, "specimen": specimen, "gastric_reading": config.gastric_reading,
            "isolated_intense_percent": config.isolated_intense_percent, "bootstrap_resamples": bootstrap, "bootstrap_seed": seed,
            "intervals": "Wilson score 95% for proportions; percentile bootstrap over images for kappa",
            "model": clf.name if clf else None,
            "cnn_source": dict(sorted(Counter(r["cnn_by"] for r in rows if r.get("cnn_by")).items())) or None,
            "warnings": [], "methods": {},
            "qc_failed": sum(1 for i in ok if not results[i].qc_passed),
        }
        if metrics["qc_failed"]:
            codes = Counter(q.code for i in ok for q in results[i].qc if q.severity == "fail")
            metrics["warnings"].append(
                f"{metrics['qc_failed']} of the {len(ok)} images scored failed QC ({', '.join(f'{c} {n}' for c, n in codes.most_common())}): "
                "their calls count in every figure, as a user given them would read them; each method's accuracy over the "
                "images that passed stands beside it (per_image.csv's qc_passed says which)")
        every_level = [item.level for item in items]  # null vs ultralow: an image refused or failed is one not scored
        for method in METHODS:
            mrs = [method_result(results[i], method) for i in ok]
            if method != "classical" and clf is None and all(results[i].cnn is None for i in ok):
                continue
            called = [r.score if r is not None else None for r in mrs]
            called_levels = [None] * len(items)
            for i, r in zip(ok, mrs):
                called_levels[i] = r.level if r is not None else None
            # the CNN reads 0-3+: its 0 is split into null and ultralow by the cell counts, no table of its own
            m = _method_metrics(truth, called, every_level, called_levels, resamples=bootstrap, seed=seed,
                                split_zero=guideline in ZERO_SPLIT and method != "cnn")
            if m is None:
                continue
            passed = [(t, c) for i, t, c in zip(ok, truth, called) if c is not None and results[i].qc_passed]
            hits = sum(t == c for t, c in passed)
            m["qc_passed"] = {"n": len(passed), "accuracy": hits / len(passed) if passed else None,
                              "accuracy_ci95": list(wilson_ci(hits, len(passed))) if passed else [None, None]}
            if m["quadratic_weighted_kappa"] is None:
                metrics["warnings"].append(f"{method}: {m['kappa_interval_note']}, so agreement beyond chance cannot be "
                                           "measured; read the accuracy and per-class recall")
            elif m["n"] < KAPPA_MIN_N:
                metrics["warnings"].append(f"{method}: n = {m['n']} < {KAPPA_MIN_N} images: the bootstrap interval of "
                                           "kappa is unreliable (it can collapse to a point); read it as indicative only")
            elif not m["kappa_interval_reliable"]:
                metrics["warnings"].append(f"{method}: the bootstrap interval of kappa over {m['n']} images is "
                                           f"{m['kappa_interval_note']}: it says nothing of the uncertainty; the accuracy's "
                                           "Wilson interval does")
            elig = {}
            for rule in rule_objs:
                if not guideline_suits(rule.guideline, guideline):  # as check_eligibility decides it
                    elig[rule.name] = {"skipped": f"the rule expects {rule.guideline} scoring; evaluated under {guideline}"}
                    continue
                tv, st, source = [], [], {"eligible column": 0, "label and rule file": 0}
                for k, i in enumerate(ok):
                    item = items[i]
                    t = item.eligible.get(rule.name)
                    if t is None:
                        t = eligibility_truth(item.level or item.label, rule, ish=item.ish, counts=item.counts, guideline=guideline)
                        source["label and rule file"] += t is not None
                    else:
                        source["eligible column"] += 1
                    mr = mrs[k]
                    s = check_eligibility(mr, rule, ish=item.ish).status if mr is not None else None
                    tv.append(t)
                    st.append(s)
                    rows[i][f"truth_{rule.name}"] = "" if t is None else ("eligible" if t else "not_eligible")
                    rows[i][f"{method}_{rule.name}"] = s or ""
                elig[rule.name] = {"version": rule.version, "truth_source": source, **_rule_metrics(tv, st)}
            m["eligibility"] = elig
            metrics["methods"][method] = m
        pairs = [(results[i].percentages, _truth_percent(items[i].counts)) for i in ok
                 if items[i].counts and sum(items[i].counts.values()) and results[i].tumour_cells]
        metrics["percent_agreement"] = percent_agreement(pairs) if pairs else None
        if 1 < len(pairs) < KAPPA_MIN_N:
            metrics["warnings"].append(f"per-category agreement over {len(pairs)} images (n < {KAPPA_MIN_N}): the 95% limits of "
                                       "agreement (bias ± 1.96 SD) rest on a spread that few images hardly measure")
        if clf is not None and (shared := _training_field_seeds(clf.record, labels, [items[i].path for i in ok])):
            metrics["warnings"].append(
                f"cnn and fused: {shared} of the {len(ok)} images were generated with the score and seed of the CNN's own training "
                f"fields ({clf.record.training.get('data')}): their figures on them are on training data; generate held-out "
                "fields with another --seed")
        if clf is not None and (shared := _training_images(clf.record, [items[i].path for i in ok])):
            metrics["warnings"].append(
                f"cnn and fused: {shared} of the {len(ok)} images are among the CNN's own training images "
                f"({clf.record.training.get('data')}): their figures on them are on training data; evaluate on images it was not "
                "trained on")
        if eligible_rule and not any(eligible_rule in item.eligible for item in items):
            metrics["warnings"].append(f"--eligible-rule {eligible_rule}: the labels have no 'eligible' value, so its truth is "
                                       "derived from the labels as every other rule's")
        if Path(labels).is_dir() and (skipped := class_folders(labels, parse_truth_label)[1]):
            metrics["warnings"].append(f"{len(skipped)} sub-folder{'s' if len(skipped) > 1 else ''} of {labels} named no label "
                                       f"and {'were' if len(skipped) > 1 else 'was'} left out: {', '.join(skipped[:5])}")
        if by_name:
            metrics["warnings"].append(
                f"{len(by_name)} of the {len(items)} images took a result matched by file name alone (--reuse-by-name; e.g. "
                f"{by_name[0]}): its image has moved; its content sample is the result's")
        for w in metrics["warnings"]:
            log.warning("%s", w)
        # headline figures: the reported (fused when a CNN ran, else classical) score
        head = metrics["methods"].get("fused") or metrics["methods"].get("classical") or {}
        metrics["reported_method"] = "fused" if "fused" in metrics["methods"] else "classical"
        for k in ("accuracy", "accuracy_ci95", "quadratic_weighted_kappa", "quadratic_weighted_kappa_ci95", "per_class"):
            metrics[k] = head.get(k)
        metrics["seconds"] = round(time.perf_counter() - t_start, 1)

        atomic_write(out / "metrics.json", json.dumps(metrics, indent=1, default=_json_default) + "\n")
        _write_csv(out / "per_image.csv", rows)
        if metrics["methods"]:
            _plot_confusion(out / "confusion.png", metrics)
        else:  # nothing scored: no empty plot (nor an earlier run's)
            (out / "confusion.png").unlink(missing_ok=True)
        if pairs:
            _plot_bland_altman(out / "bland_altman.png", pairs)
        else:  # an earlier run's plot would stand beside a report that says none was measured
            (out / "bland_altman.png").unlink(missing_ok=True)
        summary = _summary(metrics)
        atomic_write(out / "report.md", _report(metrics, summary))
        return {**metrics, "summary": summary}



def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write(path, buf.getvalue())


def _figure(width_in: float, height_in: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=110)


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def _matrix_panel(ax, cm: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str) -> None:
    """A confusion matrix with the count written in every cell (rows truth, columns called)."""
    cm = np.asarray(cm)
    top = max(1, cm.max())
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=top, aspect="auto")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > 0.6 * top else "black", fontsize=9)
    ax.set_xticks(range(len(cols)), cols, fontsize=8, rotation=40 if len(cols) > 4 else 0,
                  ha="right" if len(cols) > 4 else "center")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("called")
    ax.set_ylabel("truth")
    ax.set_title(title, fontsize=9)


def _plot_confusion(path: Path, metrics: dict) -> None:
    """Per method, the 4-class confusion matrix (and null vs ultralow where truth has it), counts in each cell."""
    methods = list(metrics["methods"])
    nvu = [m for m in methods if metrics["methods"][m].get("null_vs_ultralow")]
    n_rows = 2 if nvu else 1
    fig = _figure(3.8 * max(1, len(methods)), 3.8 * n_rows)
    for k, m in enumerate(methods):
        mm = metrics["methods"][m]
        qwk = mm["quadratic_weighted_kappa"]
        title = f"{m}: acc {mm['accuracy']:.3f} (n={mm['n']})" + (f", QWK {qwk:.3f}" if qwk is not None else "")
        _matrix_panel(fig.add_subplot(n_rows, max(1, len(methods)), k + 1), np.array(mm["confusion"]["matrix"]), SCORES, SCORES, title)
        if m in nvu:
            t = mm["null_vs_ultralow"]
            _matrix_panel(fig.add_subplot(n_rows, max(1, len(methods)), len(methods) + k + 1), np.array(t["matrix"]),
                          t["rows"], t["columns"], f"{m}: null vs ultralow, agreement {t['agreement']:.3f} (n={t['n']})")
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_bland_altman(path: Path, pairs: list[tuple[Mapping[str, float], Mapping[str, float]]]) -> None:
    """Bland-Altman per category: difference (called - truth, points) against the mean of the two, with bias and 95% limits."""
    cats = [c for c in CATEGORIES if any(p[0].get(c, 0) or p[1].get(c, 0) for p in pairs)] or list(CATEGORIES)
    stats = percent_agreement(pairs, cats)
    cols = min(4, len(cats))
    rows = -(-len(cats) // cols)
    fig = _figure(3.4 * cols, 3.0 * rows)
    for k, c in enumerate(cats):
        ax = fig.add_subplot(rows, cols, k + 1)
        called = np.array([p[0].get(c, 0.0) for p in pairs])
        true = np.array([p[1].get(c, 0.0) for p in pairs])
        ax.scatter((called + true) / 2, called - true, s=10, alpha=0.7)
        st = stats[c]
        for y, style in ((st["bias"], "-"), (st["loa_low"], "--"), (st["loa_high"], "--")):
            if y is not None:
                ax.axhline(y, color="tab:red", linestyle=style, linewidth=1)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_title(f"{c}: MAE {st['mae']:.1f}, bias {st['bias']:+.1f}", fontsize=9)
        ax.set_xlabel("mean of called and true % of tumour cells", fontsize=7)
        ax.set_ylabel("called - true (points)", fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)


def _fmt(v, ci=None) -> str:
    if v is None:
        return "n/a"
    s = f"{v:.3f}"
    if ci and ci[0] is not None:
        s += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return s


def _kappa_text(mm: dict) -> str:
    """A method's kappa with its interval, or why it has none."""
    if mm["quadratic_weighted_kappa"] is None:
        return f"n/a ({mm['kappa_interval_note']})"
    kept, drawn = mm["kappa_resamples_kept"], mm["kappa_resamples"]
    return (_fmt(mm["quadratic_weighted_kappa"], mm["quadratic_weighted_kappa_ci95"])
            + ("" if mm["kappa_interval_reliable"] else f" (interval unreliable: {mm['kappa_interval_note']})")
            + (f" (interval of the {kept} of {drawn} resamples that give a kappa: the others hold one label class)"
               if 0 < kept < drawn else ""))


def _qc_passed_text(mm: dict, metrics: dict) -> str:
    """A method's accuracy over the images that passed QC, where some failed it ('' where none did)."""
    if not metrics.get("qc_failed"):
        return ""
    qc = mm["qc_passed"]
    return f"; QC passed ({qc['n']} images) {_fmt(qc['accuracy'], qc['accuracy_ci95'])}"


_NOT_SCORED_WORDS = ("left out of the classical and fused accuracy, kappa, per-class figures, confusion matrices and "
                     "percentage agreement; in eligibility each is a needs review, in null vs ultralow 'not scored'")
"""Where an image scored without tumour cells (no score) is counted, as the summary and report say it."""


def _summary(metrics: dict) -> str:
    lines = [f"{metrics['n']} of {metrics['n_images']} images scored ({metrics['errors']} refused or failed: "
             + ("left out of every figure but null vs ultralow's 'not scored' and the count right of all labelled"
                if metrics["methods"] else
                "no image was scored, so there is no figure")
             + (f"; {metrics['not_scored']} without tumour cells, no score: {_NOT_SCORED_WORDS}" if metrics["not_scored"] else "")
             + "); "
             + (f"{metrics['qc_failed']} of them failed QC (counted; see warnings); " if metrics.get("qc_failed") else "")
             + (f"{metrics['reused']} of them reused from {metrics['reuse']} (each kept in results/); " if metrics.get("reused") else "")
             + f"guideline {metrics['guideline']} ({metrics['specimen']}); model {metrics['model'] or 'none (classical only)'}"]
    for m, mm in metrics["methods"].items():
        lines.append(f"  {m:<9} n={mm['n']:<4} accuracy {_fmt(mm['accuracy'], mm['accuracy_ci95'])}  "
                     f"QWK {_kappa_text(mm)}" + _qc_passed_text(mm, metrics))
    return "\n".join(lines)


def _report(metrics: dict, summary: str) -> str:
    methods = list(metrics["methods"])
    out = ["# her2score evaluation", "",
           f"Labels: `{metrics['labels']}`; {metrics['n']} of {metrics['n_images']} images scored "
           f"({metrics['errors']} errors"
           + (f"; {metrics['not_scored']} without tumour cells, no score: {_NOT_SCORED_WORDS}" if metrics["not_scored"] else "")
           + (f"; {metrics['qc_failed']} failed QC, counted in every figure" if metrics.get("qc_failed") else "")
           + f"); guideline {metrics['guideline']}, specimen {metrics['specimen']}; "
           f"CNN model: {metrics['model'] or 'not run'}"
           + (f" (CNN run by: {', '.join(f'{k} {v}' for k, v in metrics['cnn_source'].items())})" if metrics['cnn_source'] else "")
           + ".",
           f"95% intervals: Wilson score intervals for proportions (accuracy, recall, precision, agreement, "
           f"sensitivity, specificity); percentile bootstrap over images for kappa ({metrics['bootstrap_resamples']} "
           f"resamples, seed {metrics['bootstrap_seed']}).", ""]
    if metrics["warnings"]:
        out += ["**Warnings:**", ""] + [f"- {w}" for w in metrics["warnings"]] + [""]
    if not methods:
        return "\n".join([*out, "No image was scored, so there is nothing to measure: `per_image.csv`'s error column says why.", ""])
    out += ["## Agreement with the labels", "",
            "| method | n | accuracy [95% CI] | quadratic-weighted kappa [95% CI] | right of all labelled images |",
            "| --- | --- | --- | --- | --- |"]
    for m in methods:
        mm = metrics["methods"][m]
        out.append(f"| {m} | {mm['n']} | {_fmt(mm['accuracy'], mm['accuracy_ci95'])}{_qc_passed_text(mm, metrics)} | "
                   f"{_kappa_text(mm)} | {mm['n_correct']} of {metrics['n_images']} |")
    out += ["", "Accuracy, kappa and the per-class figures are over the images each method scored; the last column "
                "counts an image refused, failed or without a score as not right."]
    out += ["", "Per-class recall / precision [95% CI]:", "", "| class | " + " | ".join(methods) + " |",
            "| --- | " + " | ".join("---" for _ in methods) + " |"]
    for c in SCORES:
        cells = []
        for m in methods:
            pc = metrics["methods"][m]["per_class"][c]
            cells.append(f"{_fmt(pc['recall'], pc['recall_ci95'])} / {_fmt(pc['precision'], pc['precision_ci95'])}")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    out += ["", "Confusion matrices (rows truth, columns called; 0, 1+, 2+, 3+), with counts: `confusion.png`.", ""]
    for m in methods:
        cm = metrics["methods"][m]["confusion"]["matrix"]
        out.append(f"- {m}: " + "; ".join(f"{SCORES[i]}: {cm[i]}" for i in range(4)))
    nvu = {m: metrics["methods"][m]["null_vs_ultralow"] for m in methods if metrics["methods"][m].get("null_vs_ultralow")}
    out += ["", "## Null vs ultralow", ""]
    if metrics["guideline"] not in ZERO_SPLIT:
        out.append(f"{metrics['guideline']} calls a plain 0 (only breast-asco-cap-2023 tells null from ultralow): no table.")
    elif not nvu:
        out.append("No image is labelled null or ultralow (a plain `0` label does not say which).")
    elif "cnn" in methods:
        out += ["The CNN reads 0, 1+, 2+ or 3+: a 0 it calls is split into null and ultralow by the cell counts, "
                "so it has no table of its own.", ""]
    for m, t in nvu.items():
        out += [f"{m}: called at exactly the true level in {_fmt(t['agreement'], t['agreement_ci95'])} of {t['n']} images.", "",
                "| truth \\ called | " + " | ".join(t["columns"]) + " |", "| --- | " + " | ".join("---" for _ in t["columns"]) + " |"]
        out += [f"| {r} | " + " | ".join(str(v) for v in row) + " |" for r, row in zip(t["rows"], t["matrix"])]
        out.append("")
    pa = metrics.get("percent_agreement")
    out += ["", "## Per-image percentage agreement", ""]
    if not pa:
        out.append("Not measured: no scored image with tumour cells has true cell counts (a `truth.jsonl` beside the "
                   "labels, or `count_<category>` columns).")
    else:
        out += ["Called against true percentage of tumour cells per category, in percentage points "
                "(Bland-Altman plot: `bland_altman.png`, a panel for each category some image has cells of, truly or "
                "as called). The figures are over every image with true counts; an image with no cells of a category, "
                "truly or as called, agrees at 0 and narrows them: the count in brackets has cells of it. The limits "
                "assume one spread at every level; where the differences fan out with the share (see the plot), read "
                "the largest error.", "",
                "| category | n (with cells of it) | mean abs. error | bias | 95% limits of agreement | max abs. error |",
                "| --- | --- | --- | --- | --- | --- |"]
        out += [f"| {c} | {v['n']} ({v['n_present']}) | {v['mae']:.2f} | {v['bias']:+.2f} | "
                + ("n/a (one image) | " if v["sd"] is None else f"[{v['loa_low']:+.2f}, {v['loa_high']:+.2f}] | ")
                + f"{v['max_abs_error']:.2f} |" for c, v in pa.items()]
    out += ["", "## Eligibility rules", "",
            "Sensitivity: truly eligible images called eligible (a needs_review is no eligible call: it counts as a "
            "miss); specificity: truly ineligible images not called eligible (a needs_review counts as not called "
            "eligible, so it is never a false positive): read both with the review rate of each truth class. Wrong "
            "calls: definite answers against the truth (eligible for an ineligible image, or not eligible for an "
            "eligible one). Needs review: of every image scored, its truth known or not (a 2+ awaiting ISH is "
            "undetermined). Truth never comes from the tool's `check_eligibility`: it is the labels file's eligible "
            "column where given, else derived from the label and the rule file's eligible levels, ISH levels and "
            "requirements (`eligibility_truth`); images it does not decide are left out of the sensitivity and "
            "specificity (undetermined). Images refused or failed are in no figure; one read without tumour cells, no score, "
            "is a needs review. The truth source column counts images "
            "per source.", "",
            "| rule | method | n (undetermined) | truth source | sensitivity [95% CI] | specificity [95% CI] "
            "| review: eligible / ineligible | wrong calls | needs review, all scored |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rules = list(metrics["methods"][methods[0]]["eligibility"]) if methods else []
    for r in rules:
        for m in methods:
            e = metrics["methods"][m]["eligibility"][r]
            if "skipped" in e:
                out.append(f"| {r} | {m} | - | - | skipped: {e['skipped']} | | | | |")
                continue
            src = ", ".join(f"{k} {v}" for k, v in e["truth_source"].items() if v) or "none"
            out.append(f"| {r} | {m} | {e['n']} ({e['n_undetermined']}) | {src} | {_fmt(e['sensitivity'], e['sensitivity_ci95'])} | "
                       f"{_fmt(e['specificity'], e['specificity_ci95'])} | {_fmt(e['review_rate_eligible'])} / "
                       f"{_fmt(e['review_rate_ineligible'])} | {e['wrong_calls']} of {e['n']} | {_fmt(e['needs_review_rate'])} |")
    out += ["", "## Summary", "", "```", summary, "```", ""]
    return "\n".join(out)
