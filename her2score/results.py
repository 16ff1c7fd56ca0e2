"""Result types shared by the pipeline, eligibility and outputs (plain frozen dataclasses)."""
from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["QCFinding", "CnnReport", "SlideResult", "SCORES", "ZERO_LEVELS", "REPORT_LEVELS", "MPP_ORIGINS", "SEVERITIES"]

SCORES: tuple[str, ...] = ("0", "1+", "2+", "3+")
ZERO_LEVELS: tuple[str, ...] = ("0 (null)", "0+ (ultralow)")
"""The two levels a 0 is split into under "breast-asco-cap-2023" (DESTINY-Breast06, the 2026 consensus); 2018 and gastric call either a plain "0"."""
REPORT_LEVELS: tuple[str, ...] = ("0", *ZERO_LEVELS, "1+", "2+", "3+")
"""Every guideline call's level: the 2026 consensus five levels, plus plain "0" (2018, gastric)."""


@dataclass(frozen=True)
class QCFinding:
    """One quality-control finding. ``severity``: 'fail' (blocks an automatic decision), 'warn' or 'info' (SEVERITIES)."""

    code: str
    severity: str
    message: str
    value: float | None = None


@dataclass(frozen=True)
class CnnReport:
    """The CNN's view of a slide: mean tile probabilities over tissue tiles and the arg-max score."""

    score: str
    probabilities: dict[str, float]
    tiles: int
    model: str


DOUBT_FLAGS = frozenset({"near_cutoff", "null_or_ultralow", "moderate_incomplete", "coarse_scan_zero", "cytoplasmic_dab",
                         "isolated_intense_cells"})
"""Flags that doubt the call itself (a share near a cut-off, staining false membranes could give, a 1+ over moderate
incomplete membranes, a 0 on a scan too coarse for faint membranes, cytoplasm read as membrane, isolated intense cells): a result carrying one is needs_review in qc_status, as a weak-counterstain
field read 0+ on 7.7% with near_cutoff showed "passed" in summary.csv while eligibility asked for review."""


SEVERITIES: tuple[str, ...] = ("fail", "warn", "info")
"""A QC finding's severities (QCFinding.severity)."""

MPP_ORIGINS: tuple[str, ...] = ("user", "metadata", "default")
"""Where a slide's µm/px came from (``SlideResult.mpp_origin``, ``Slide.mpp_origin``): given by the user, the
file's metadata, or open_slide's ``default_mpp`` for a file without a plausible one of its own."""


@dataclass(frozen=True)
class SlideResult:
    """Everything the tool says about one slide.

    ``score`` is the reported score: the fused classical+CNN score when a CNN ran, else the
    classical guideline score; None when the slide was not scored (no tumour cells: ``level`` is
    "not scored" and ``reason`` says why). ``level`` and ``flags`` belong to the reported score;
    ``classical_score``, ``classical_level``, ``classical_flags`` and ``classical_reason`` (where a CNN
    ran; else '': ``reason`` is the guideline call's) are the guideline call's own, before any CNN fusion. Percentages are of scored tumour cells, per category (non-cumulative);
    with no score, ``percentages`` is empty and ``h_score`` None: no cells were counted, which is not HER2 0.
    ``mpp_origin`` says where ``mpp`` (µm/px) came from: "user", "metadata" or "default" (MPP_ORIGINS; the
    notes say why), '' in a result.json written before it existed. ``slide_sample``: the slide file as it was
    before it was read (files.content_sample: its size and first and last 64 KiB), so a result is reused for
    that file only; '' for an image given in memory, or a result.json written before it existed.
    """

    slide: str
    score: str | None
    level: str
    flags: tuple[str, ...]
    guideline: str
    specimen: str
    reason: str
    counts: dict[str, int]
    percentages: dict[str, float]
    tumour_cells: int
    h_score: float | None
    clusters: dict[str, int]
    region: str
    qc: tuple[QCFinding, ...]
    stains: dict[str, Any]
    mpp: float
    tissue_area_mm2: float
    classical_score: str | None
    cnn: CnnReport | None = None
    confidence: float | None = None
    notes: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    classical_level: str = ""
    classical_flags: tuple[str, ...] = ()
    staining: dict[str, Any] = field(default_factory=dict)
    classical_reason: str = ""
    mpp_origin: str = ""
    slide_sample: str = ""

    @property
    def qc_passed(self) -> bool:
        return not any(f.severity == "fail" for f in self.qc)

    @property
    def cnn_score(self) -> str | None:
        return self.cnn.score if self.cnn else None

    @property
    def qc_status(self) -> str:
        """What stands beside the score: not_scored (no score), qc_failed (a QC check failed), needs_review (the
        classical and CNN scores disagree, or the call carries a doubt: DOUBT_FLAGS) or passed. Eligibility asks
        for review of a doubt only where the other side would change a rule's answer."""
        if self.score is None:
            return "not_scored"
        if not self.qc_passed:
            return "qc_failed"
        if self.cnn_score is not None and self.cnn_score != self.classical_score or DOUBT_FLAGS & set(self.flags):
            return "needs_review"
        return "passed"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["qc_passed"] = self.qc_passed
        d["qc_status"] = self.qc_status
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def read(cls, path: str | os.PathLike) -> "SlideResult":
        """The result a result.json holds; ValueError naming the file and why it is none (a folder, missing,
        unreadable, not JSON, not a her2score result.json)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except IsADirectoryError:
            raise ValueError(f"{path}: is a folder; give the result.json inside a slide's output folder") from None
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:  # a name too long (JSON text given as a path?), no permission
            raise ValueError(f"{str(path)[:200]}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a her2score result.json (a JSON {type(data).__name__}, not an object)")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}" if str(e).startswith("not a her2score result") else
                             f"{path}: not a her2score result.json ({e})") from None
        except (TypeError, AttributeError, KeyError) as e:
            raise ValueError(f"{path}: not a her2score result.json ({type(e).__name__}: {e})") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SlideResult":
        """A result from its to_dict form (a result.json); ValueError where a value is not one the tool writes."""
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        if missing := [k for k in required if k not in d]:
            raise ValueError(f"not a her2score result.json (no {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        _check_dict(d)
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["flags"] = tuple(d.get("flags", ()))
        d["notes"] = tuple(d.get("notes", ()))
        # written before classical_flags existed: without a CNN the call's flags are the classical ones
        d["classical_flags"] = tuple(d.get("classical_flags", () if d.get("cnn") else d["flags"]))
        d["qc"] = tuple(QCFinding(**q) for q in d.get("qc", ()))
        from .categories import CATEGORIES

        for key in ("counts", "percentages"):  # in CATEGORIES' order, as scored (result.json sorts its keys)
            if key in d:
                d[key] = {c: d[key][c] for c in CATEGORIES if c in d[key]}
        if d.get("cnn"):
            d["cnn"] = CnnReport(**d["cnn"])
        return cls(**d)


def _check_dict(d: dict[str, Any]) -> None:
    """ValueError naming the first field of a result.json's dict that the tool would never write."""
    from .categories import CATEGORIES
    from .guidelines import GUIDELINE_FAMILY, GUIDELINES, SPECIMENS

    def numbers(key: str, keys, kind=(int, float)) -> None:
        value = d.get(key, {})
        if not isinstance(value, dict) or not all(k in keys and isinstance(v, kind) and not isinstance(v, bool)
                                                  for k, v in value.items()):
            raise ValueError(f"{key!r} must map {', '.join(keys)} to numbers, got {value!r}")

    if d.get("guideline") not in GUIDELINES:
        raise ValueError(f"'guideline' must be one of {list(GUIDELINES)}, got {d.get('guideline')!r}")
    if d.get("specimen") not in SPECIMENS or (d["specimen"] == "biopsy" and GUIDELINE_FAMILY[d["guideline"]] != "gastric"):
        raise ValueError(f"'specimen' must be one of {list(SPECIMENS)} (a biopsy under gastric only), got "
                         f"{d.get('specimen')!r} under {d['guideline']!r}")
    for key in ("flags", "classical_flags", "notes"):
        if not isinstance(d.get(key, []), (list, tuple)) or not all(isinstance(x, str) for x in d.get(key, [])):
            raise ValueError(f"{key!r} must be a list of strings, got {d.get(key)!r}")
    for key in ("score", "classical_score"):
        if d.get(key) not in (None, *SCORES):
            raise ValueError(f"{key!r} must be one of {list(SCORES)} or null, got {d.get(key)!r}")
    for key in ("level", "classical_level"):
        if d.get(key, "") not in ("", "not scored", *REPORT_LEVELS):
            raise ValueError(f"{key!r} must be one of {list(REPORT_LEVELS)} or 'not scored', got {d.get(key)!r}")
    if d.get("mpp_origin", "") not in ("", *MPP_ORIGINS):
        raise ValueError(f"'mpp_origin' must be one of {list(MPP_ORIGINS)}, got {d.get('mpp_origin')!r}")
    numbers("counts", CATEGORIES, int)
    numbers("percentages", CATEGORIES)
    numbers("clusters", SCORES[1:], int)
    n = d.get("tumour_cells")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"'tumour_cells' must be a whole number >= 0, got {n!r}")
    if "counts" in d and sum(d["counts"].values()) != n:
        raise ValueError(f"'counts' add up to {sum(d['counts'].values())}, not 'tumour_cells' {n}")
    score, level = d.get("score"), d.get("level")
    if (score is None) != (level == "not scored") or (score is None) != (n == 0):
        raise ValueError(f"'score' {score!r}, 'level' {level!r} and {n} tumour cells disagree: no score is "
                         "'not scored' with no tumour cells")
    zeros = ZERO_LEVELS if d.get("guideline") == "breast-asco-cap-2023" else ("0",)
    fused_zeros = (*zeros, "0")  # a CNN-fused 0 over cells > 10% stained is neither null nor ultralow (report_level)
    for s_key, l_key, words in (("score", "level", "score"), ("classical_score", "classical_level", "classical score")):
        s, lv = d.get(s_key), d.get(l_key)
        fused = l_key == "level" and d.get("cnn") and d.get("classical_score") != s
        levels = (fused_zeros if fused else zeros) if s == "0" else (s,)
        if s is not None and lv not in levels and not (l_key == "classical_level" and not lv):  # older: none
            raise ValueError(f"{l_key!r} {lv!r} is not a level of {words} {s!r} under {d.get('guideline')!r}")
    if not d.get("cnn") and "classical_score" in d and d["classical_score"] != score:
        raise ValueError(f"'score' {score!r} differs from 'classical_score' {d['classical_score']!r} with no CNN to fuse")
    qc, known = d.get("qc", ()), set(QCFinding.__dataclass_fields__)
    if not isinstance(qc, (list, tuple)) or not all(isinstance(q, dict) and set(q) <= known
                                                    and {"code", "severity", "message"} <= set(q) for q in qc):
        raise ValueError(f"'qc' must be a list of findings with code, severity and message, got {qc!r}")
    if bad := sorted({q["severity"] for q in qc} - set(SEVERITIES), key=str):
        raise ValueError(f"'qc' severities must be among {list(SEVERITIES)}, got {bad}")
