"""Evaluation runs: score labelled images and measure classical, CNN and fused scores against the labels.

``LABELS`` is a CSV ``path,label[,eligible][,eligible_<rule>][,ish]`` (paths relative to the CSV's
folder; labels 0, 1+, 2+, 3+) or a folder with one sub-folder per class. Every image is scored by
the pipeline (or its result.json is reused), the CNN is run on it when the result carries no CNN
report, and ``out`` receives:

- ``metrics.json``: per method (classical, cnn, fused): n, accuracy, quadratic-weighted kappa, 95%
  bootstrap CIs for both (paired resamples of images, seeded), per-class precision and recall, the
  confusion matrix (rows truth, columns called) and, per eligibility rule, sensitivity and
  specificity (with CIs), the needs-review rate and the counts behind them;
- ``per_image.csv``, ``confusion.png``, ``report.md`` and ``results/<image>/result.json``.

Eligibility truth per image and rule: the ``eligible_<rule>`` column, or ``eligible`` for the rule
named by ``eligible_rule``; otherwise it is derived by applying the rule itself to a clean result
carrying the true score (enough tumour cells, no QC failure, no CNN). Where the 4-class label does
not decide the answer (a 0 label under a rule that separates null from ultralow, a percentage
requirement, an ISH level without an ``ish`` column) the image is left out of that rule's figures
and counted as undetermined. A predicted ``eligible`` is a positive call; ``not_eligible`` and
``needs_review`` are not (needs_review is reported as its own rate). Rules made for another
guideline family than the evaluation's are skipped, with the reason.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .results import SCORES, SlideResult

__all__ = [
    "METHODS",
    "LabelledItem",
    "read_labels",
    "confusion_matrix",
    "quadratic_weighted_kappa",
    "accuracy",
    "per_class",
    "bootstrap_ci",
    "binary_rates",
    "eligibility_truth",
    "method_result",
    "evaluate",
]

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("classical", "cnn", "fused")
_TRUE = {"1", "true", "yes", "y", "eligible"}
_FALSE = {"0", "false", "no", "n", "not_eligible", "not eligible", "ineligible"}


@dataclass(frozen=True)
class LabelledItem:
    path: str
    label: str
    eligible: dict[str, bool]
    ish: str | None = None


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


def read_labels(labels: str | os.PathLike, *, eligible_rule: str | None = None) -> list[LabelledItem]:
    """Labelled images from a CSV or a class-folder tree (see the module docstring)."""
    from .train import class_folder_files, read_labels_csv

    p = Path(labels)
    if p.is_dir():
        return [LabelledItem(str(f), label, {}) for f, label in class_folder_files(p)]
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such labels file or folder")
    rows = read_labels_csv(p)
    if "eligible" in rows[0] and any(r.get("eligible") for r in rows) and not eligible_rule:
        raise ValueError(f"{p}: has an 'eligible' column; say which rule it answers (--eligible-rule NAME), "
                         "or name the columns eligible_<rule>")
    items = []
    for i, r in enumerate(rows, start=2):
        where = f"{p}, line {i}"
        elig = {}
        for k, v in r.items():
            if k.startswith("eligible_") and v:
                elig[k[len("eligible_"):]] = _parse_bool(v, where)
        if eligible_rule and r.get("eligible"):
            elig[eligible_rule] = _parse_bool(r["eligible"], where)
        ish = (r.get("ish") or "").strip().lower() or None
        if ish not in (None, "positive", "negative"):
            raise ValueError(f"{where}: ish must be 'positive', 'negative' or empty, got {ish!r}")
        items.append(LabelledItem(r["path"], r["label"], {k: v for k, v in elig.items() if v is not None}, ish))
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
    / n) counts. NaN when undefined (no images, or no expected disagreement)."""
    cm = np.asarray(cm, np.float64)
    k = cm.shape[0]
    n = cm.sum()
    if n == 0:
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
    """Precision (of the calls of a class) and recall (of the true members) per class; None if undefined."""
    out = {}
    for k, c in enumerate(classes):
        called, true = cm[:, k].sum(), cm[k].sum()
        out[c] = {"precision": float(cm[k, k] / called) if called else None,
                  "recall": float(cm[k, k] / true) if true else None,
                  "n_true": int(true), "n_called": int(called)}
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


# --------------------------------------------------------------------------------------- eligibility

def _level_for(result: SlideResult, score: str) -> str:
    """The report level of ``score``: the classical level when it is the classical score, else the score."""
    return result.level if score == result.classical_score and result.level != "not scored" else score


def method_result(result: SlideResult, method: str) -> SlideResult | None:
    """The result as one method alone would have reported it (None when that method did not run).

    classical and cnn stand alone (no CNN report, so no disagreement doubt); fused is the result as
    the tool reports it, CNN included.
    """
    if method == "classical":
        s = result.classical_score
        return replace(result, score=s, level=_level_for(result, s), cnn=None, confidence=None)
    if method == "cnn":
        if result.cnn is None:
            return None
        s = result.cnn.score
        return replace(result, score=s, level=_level_for(result, s), cnn=None, confidence=None)
    if method == "fused":
        return replace(result, level=_level_for(result, result.score))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _truth_guideline(rule, guideline: str) -> str:
    """A guideline name the rule accepts: the evaluation's own when it fits, else one of the rule's family."""
    from .guidelines import GUIDELINE_FAMILY

    if rule.guideline in ("any", guideline, GUIDELINE_FAMILY.get(guideline)):
        return guideline
    if rule.guideline in GUIDELINE_FAMILY:
        return rule.guideline
    return next(g for g, fam in GUIDELINE_FAMILY.items() if fam == rule.guideline)


def eligibility_truth(label: str, rule, *, guideline: str, ish: str | None = None) -> bool | None:
    """Whether a slide of true score ``label`` is eligible under ``rule``, derived with the rule itself;
    None when the label does not decide it (see the module docstring)."""
    from .categories import CATEGORIES
    from .eligibility import ISH_RESULTS, check_eligibility
    from .results import SlideResult as SR

    g = _truth_guideline(rule, guideline)
    if label == "0":
        levels = ["0"] if g == "breast-asco-cap-2018" or g == "gastric" else ["0 (null)", "0+ (ultralow)"]
    else:
        levels = [label]
    n = max(rule.min_tumour_cells, 100) * 10
    count_sets = [{c: (n if c == "strong_complete" else 0) for c in CATEGORIES},
                  {c: (n if c == "none" else 0) for c in CATEGORIES}]
    answers = set()
    for level in levels:
        for counts in count_sets:
            for i in ([ish] if ish else [None, *ISH_RESULTS]):
                r = SR(slide="<truth>", score=label, level=level, flags=(), guideline=g, specimen="resection",
                       reason="true label", counts=counts, percentages={}, tumour_cells=n, h_score=0.0,
                       clusters={}, region="truth", qc=(), stains={}, mpp=0.5, tissue_area_mm2=0.0,
                       classical_score=label)
                status = check_eligibility(r, rule, ish=i).status
                if i is None and status == "needs_review":
                    continue  # waits for ISH: decided by the ISH variants
                answers.add(status == "eligible")
    return answers.pop() if len(answers) == 1 else None


# --------------------------------------------------------------------------------------- running

def _find_reusable(reuse: str | os.PathLike | None) -> dict[str, Path]:
    """result.json files under ``reuse`` keyed by the resolved slide path and by file name."""
    if not reuse:
        return {}
    root = Path(reuse)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: --reuse folder does not exist")
    by_key: dict[str, Path] = {}
    names: dict[str, list[Path]] = {}
    for f in sorted(root.rglob("result.json")):
        try:
            slide = json.loads(f.read_text(encoding="utf-8"))["slide"]
        except (ValueError, KeyError, OSError):
            continue
        by_key[str(Path(slide).resolve())] = f
        names.setdefault(Path(slide).name, []).append(f)
    for name, fs in names.items():
        if len(fs) == 1:
            by_key.setdefault(f"name:{name}", fs[0])
    return by_key


def _safe(path: str, root: Path | None) -> str:
    from .batch import safe_name

    p = Path(path)
    rel = str(p.relative_to(root)) if root is not None and p.is_relative_to(root) else p.name
    return safe_name(rel)


def _score_one(item: LabelledItem, *, config, mpp, model, reusable) -> tuple[SlideResult, bool, str]:
    """The image's result, whether it was reused, and who ran the CNN ("pipeline", "reused" or ""
    when none ran). A finished result is reused unless the CNN is wanted and it has none."""
    from .pipeline import analyse_slide

    key = str(Path(item.path).resolve())
    f = reusable.get(key) or reusable.get(f"name:{Path(item.path).name}")
    if f is not None:
        result = SlideResult.from_dict(json.loads(f.read_text(encoding="utf-8")))
        if model is None or result.cnn is not None:
            return result, True, "reused" if result.cnn is not None else ""
    result = analyse_slide(item.path, config=config, mpp=mpp, cnn=model).result
    return result, False, "pipeline" if result.cnn is not None else ""


def _method_metrics(truth: list[str], called: list[str | None], *, resamples: int, seed: int) -> dict[str, Any] | None:
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

    acc, qwk = accuracy(cm), quadratic_weighted_kappa(cm)
    return {
        "n": len(keep),
        "accuracy": acc,
        "accuracy_ci95": list(bootstrap_ci(lambda idx: accuracy(cm_of(idx)), len(keep), resamples=resamples, seed=seed)),
        "quadratic_weighted_kappa": None if math.isnan(qwk) else qwk,
        "quadratic_weighted_kappa_ci95": list(bootstrap_ci(lambda idx: quadratic_weighted_kappa(cm_of(idx)), len(keep),
                                                           resamples=resamples, seed=seed)),
        "per_class": per_class(cm),
        "confusion": {"classes": list(SCORES), "rows": "truth", "columns": "called", "matrix": cm.tolist()},
    }


def _rule_metrics(truth: list[bool | None], status: list[str | None], *, resamples: int, seed: int) -> dict[str, Any]:
    keep = [i for i, (t, s) in enumerate(zip(truth, status)) if t is not None and s is not None]
    t = np.array([truth[i] for i in keep], bool)
    s = np.array([status[i] for i in keep], object)
    pos = s == "eligible"
    review = s == "needs_review"
    sens, spec = binary_rates(t, pos)

    def ci(which):
        def f(idx):
            return binary_rates(t[idx], pos[idx])[which]
        return list(bootstrap_ci(f, len(keep), resamples=resamples, seed=seed))

    nan = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return {
        "n": len(keep),
        "n_undetermined": int(sum(1 for x, st in zip(truth, status) if x is None and st is not None)),
        "n_truly_eligible": int(t.sum()),
        "sensitivity": nan(sens), "sensitivity_ci95": ci(0) if t.any() else [None, None],
        "specificity": nan(spec), "specificity_ci95": ci(1) if (~t).any() else [None, None],
        "needs_review_rate": float(review.mean()) if len(keep) else None,
        "counts": {f"{'eligible' if tv else 'not_eligible'}->{st}": int(np.sum((t == tv) & (s == st)))
                   for tv in (True, False) for st in ("eligible", "not_eligible", "needs_review")},
    }


def evaluate(labels: str | os.PathLike, out: str | os.PathLike, *, reuse: str | os.PathLike | None = None,
             use_cnn: bool = True, model=None, guideline: str = "breast-asco-cap-2023", mpp: float | None = None,
             bootstrap: int = 1000, seed: int = 0, rules: Sequence[str] | None = None,
             eligible_rule: str | None = None,
             progress: Callable[[int, int, dict], None] | None = None) -> dict[str, Any]:
    """Score every labelled image and write metrics, per-image CSV, confusion PNG and report to ``out``.

    ``model``: a TileClassifier, a weights path, or None for the shipped weights (ignored when
    ``use_cnn`` is False). ``rules``: eligibility rule names (default: all shipped rules).
    Returns the metrics dict (also ``metrics.json``) plus ``summary`` (text) and ``errors`` (count).
    """
    from .eligibility import available_rules, check_eligibility, load_rule
    from .guidelines import GUIDELINE_FAMILY
    from .pipeline import ScoringConfig

    t_start = time.perf_counter()
    items = read_labels(labels, eligible_rule=eligible_rule)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(labels) if Path(labels).is_dir() else Path(labels).parent
    clf = None
    if use_cnn:
        from .cnn import TileClassifier, load_model

        clf = model if isinstance(model, TileClassifier) else load_model(model)
    config = ScoringConfig(guideline=guideline)
    reusable = _find_reusable(reuse)
    rule_objs = [load_rule(r) for r in (rules or available_rules())]

    rows: list[dict[str, Any]] = []
    results: list[SlideResult | None] = []
    for n_done, item in enumerate(items, start=1):
        row: dict[str, Any] = {"path": item.path, "label": item.label}
        try:
            result, reused, cnn_by = _score_one(item, config=config, mpp=mpp, model=clf, reusable=reusable)
            d = out / "results" / _safe(item.path, root)
            d.mkdir(parents=True, exist_ok=True)
            (d / "result.json").write_text(result.to_json(), encoding="utf-8")
            row.update(classical=result.classical_score, cnn=result.cnn_score, fused=result.score,
                       confidence=result.confidence, level=result.level, tumour_cells=result.tumour_cells,
                       qc_passed=result.qc_passed, reused=reused, cnn_by=cnn_by,
                       cnn_model=result.cnn.model if result.cnn else "", error="")
            if result.cnn:
                row.update({f"p_{c}": result.cnn.probabilities.get(c) for c in SCORES})
            results.append(result)
        except Exception as e:  # one bad image never stops the run
            msg = str(e) if item.path in str(e) else f"{item.path}: {type(e).__name__}: {e}"
            log.debug("failed: %s", msg, exc_info=True)
            row.update(classical=None, cnn=None, fused=None, error=msg)
            results.append(None)
        rows.append(row)
        if progress:
            progress(n_done, len(items), row)

    ok = [i for i, r in enumerate(results) if r is not None]
    truth = [items[i].label for i in ok]
    metrics: dict[str, Any] = {
        "labels": str(labels), "n_images": len(items), "n": len(ok), "errors": len(items) - len(ok),
        "guideline": guideline, "bootstrap_resamples": bootstrap, "bootstrap_seed": seed,
        "model": clf.name if clf else None,
        "cnn_source": dict(sorted((k, v) for k, v in _count(r.get("cnn_by") for r in rows).items() if k)) or None,
        "methods": {},
    }
    family = GUIDELINE_FAMILY[guideline]
    for method in METHODS:
        called = [getattr(results[i], "classical_score") if method == "classical" else
                  (results[i].cnn_score if method == "cnn" else results[i].score) for i in ok]
        if method != "classical" and clf is None and all(results[i].cnn is None for i in ok):
            continue
        m = _method_metrics(truth, called, resamples=bootstrap, seed=seed)
        if m is None:
            continue
        elig = {}
        for rule in rule_objs:
            if rule.guideline not in ("any", family, guideline):
                elig[rule.name] = {"skipped": f"the rule expects {rule.guideline} scoring; evaluated under {guideline}"}
                continue
            tv, st = [], []
            for k, i in enumerate(ok):
                item = items[i]
                t = item.eligible.get(rule.name)
                if t is None:
                    t = eligibility_truth(item.label, rule, guideline=guideline, ish=item.ish)
                mr = method_result(results[i], method)
                s = check_eligibility(mr, rule, ish=item.ish).status if mr is not None else None
                tv.append(t)
                st.append(s)
                rows[i][f"truth_{rule.name}"] = "" if t is None else ("eligible" if t else "not_eligible")
                rows[i][f"{method}_{rule.name}"] = s or ""
            elig[rule.name] = {"version": rule.version, **_rule_metrics(tv, st, resamples=bootstrap, seed=seed)}
        m["eligibility"] = elig
        metrics["methods"][method] = m
    # headline figures: the reported (fused when a CNN ran, else classical) score
    head = metrics["methods"].get("fused") or metrics["methods"].get("classical") or {}
    metrics["reported_method"] = "fused" if "fused" in metrics["methods"] else "classical"
    for k in ("accuracy", "accuracy_ci95", "quadratic_weighted_kappa", "quadratic_weighted_kappa_ci95", "per_class"):
        metrics[k] = head.get(k)
    metrics["seconds"] = round(time.perf_counter() - t_start, 1)

    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_json_default) + "\n", encoding="utf-8")
    _write_csv(out / "per_image.csv", rows)
    _plot_confusion(out / "confusion.png", metrics)
    summary = _summary(metrics)
    (out / "report.md").write_text(_report(metrics, summary), encoding="utf-8")
    return {**metrics, "summary": summary}


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


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
    path.write_text(buf.getvalue(), encoding="utf-8")


def _plot_confusion(path: Path, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    methods = list(metrics["methods"])
    fig = Figure(figsize=(3.6 * max(1, len(methods)), 3.6), dpi=110)
    for k, m in enumerate(methods):
        ax = fig.add_subplot(1, max(1, len(methods)), k + 1)
        cm = np.array(metrics["methods"][m]["confusion"]["matrix"])
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, cm.max()))
        for i in range(4):
            for j in range(4):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > 0.6 * max(1, cm.max()) else "black", fontsize=9)
        ax.set_xticks(range(4), SCORES)
        ax.set_yticks(range(4), SCORES)
        ax.set_xlabel("called")
        if k == 0:
            ax.set_ylabel("truth")
        mm = metrics["methods"][m]
        qwk = mm["quadratic_weighted_kappa"]
        ax.set_title(f"{m}: acc {mm['accuracy']:.3f}, QWK {qwk:.3f}" if qwk is not None else f"{m}: acc {mm['accuracy']:.3f}",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")


def _fmt(v, ci=None) -> str:
    if v is None:
        return "n/a"
    s = f"{v:.3f}"
    if ci and ci[0] is not None:
        s += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return s


def _summary(metrics: dict) -> str:
    lines = [f"{metrics['n']} of {metrics['n_images']} images scored ({metrics['errors']} errors); "
             f"guideline {metrics['guideline']}; model {metrics['model'] or 'none (classical only)'}"]
    for m, mm in metrics["methods"].items():
        lines.append(f"  {m:<9} n={mm['n']:<4} accuracy {_fmt(mm['accuracy'], mm['accuracy_ci95'])}  "
                     f"QWK {_fmt(mm['quadratic_weighted_kappa'], mm['quadratic_weighted_kappa_ci95'])}")
    return "\n".join(lines)


def _report(metrics: dict, summary: str) -> str:
    methods = list(metrics["methods"])
    out = ["# her2score evaluation", "",
           f"Labels: `{metrics['labels']}`; {metrics['n']} of {metrics['n_images']} images scored "
           f"({metrics['errors']} errors); guideline {metrics['guideline']}; CNN model: {metrics['model'] or 'not run'}"
           + (f" (CNN run by: {', '.join(f'{k} {v}' for k, v in metrics['cnn_source'].items())})" if metrics['cnn_source'] else "")
           + ".",
           f"95% CIs: percentile bootstrap over images, {metrics['bootstrap_resamples']} resamples, seed {metrics['bootstrap_seed']}.",
           "", "## Agreement with the labels", "",
           "| method | n | accuracy [95% CI] | quadratic-weighted kappa [95% CI] |", "| --- | --- | --- | --- |"]
    for m in methods:
        mm = metrics["methods"][m]
        out.append(f"| {m} | {mm['n']} | {_fmt(mm['accuracy'], mm['accuracy_ci95'])} | "
                   f"{_fmt(mm['quadratic_weighted_kappa'], mm['quadratic_weighted_kappa_ci95'])} |")
    out += ["", "Per-class recall / precision:", "", "| class | " + " | ".join(methods) + " |",
            "| --- | " + " | ".join("---" for _ in methods) + " |"]
    for c in SCORES:
        cells = []
        for m in methods:
            pc = metrics["methods"][m]["per_class"][c]
            cells.append(f"{_fmt(pc['recall'])} / {_fmt(pc['precision'])}")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    out += ["", "Confusion matrices (rows truth, columns called; 0, 1+, 2+, 3+): see `confusion.png`.", ""]
    for m in methods:
        cm = metrics["methods"][m]["confusion"]["matrix"]
        out.append(f"- {m}: " + "; ".join(f"{SCORES[i]}: {cm[i]}" for i in range(4)))
    out += ["", "## Eligibility rules", "",
            "Sensitivity: truly eligible images called eligible; specificity: truly ineligible images not called "
            "eligible (needs_review is not a positive call; its rate is given). Truth from the eligible column or "
            "derived from the label by the rule; undetermined images are left out.", "",
            "| rule | method | n (undetermined) | sensitivity [95% CI] | specificity [95% CI] | needs review |",
            "| --- | --- | --- | --- | --- | --- |"]
    rules = list(metrics["methods"][methods[0]]["eligibility"]) if methods else []
    for r in rules:
        for m in methods:
            e = metrics["methods"][m]["eligibility"][r]
            if "skipped" in e:
                out.append(f"| {r} | {m} | - | skipped: {e['skipped']} | | |")
                continue
            out.append(f"| {r} | {m} | {e['n']} ({e['n_undetermined']}) | {_fmt(e['sensitivity'], e['sensitivity_ci95'])} | "
                       f"{_fmt(e['specificity'], e['specificity_ci95'])} | {_fmt(e['needs_review_rate'])} |")
    out += ["", "## Summary", "", "```", summary, "```", ""]
    return "\n".join(out)
