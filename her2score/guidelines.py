"""Guideline HER2 scores (0/1+/2+/3+, five report levels) and H-score from per-category cell counts.

Breast: ASCO/CAP 2018 (Wolff 2018), kept in the 2023 update, which splits 0 into null and ultralow.
Gastric: Hofmann 2008 / ToGA and CAP/ASCP/ASCO 2016 (Bartley 2017), resection and biopsy rules.
Every threshold is compared in integer arithmetic, so exactly 10% falls on the documented side.
"""
from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

from her2score.categories import CATEGORIES

__all__ = [
    "GUIDELINES",
    "GUIDELINE_FAMILY",
    "SPECIMENS",
    "REPORT_LEVELS",
    "INTENSITY",
    "PANCREATIC_NOTE",
    "GuidelineCall",
    "apply_guideline",
    "cumulative_counts",
    "h_score",
]

GUIDELINES: tuple[str, ...] = ("breast-asco-cap-2018", "breast-asco-cap-2023", "gastric")
GUIDELINE_FAMILY: dict[str, str] = {
    "breast-asco-cap-2018": "breast",
    "breast-asco-cap-2023": "breast",
    "gastric": "gastric",
}
SPECIMENS: tuple[str, ...] = ("resection", "biopsy")
REPORT_LEVELS: tuple[str, ...] = ("0", "0 (null)", "0+ (ultralow)", "1+", "2+", "3+")
"""Every ``GuidelineCall.level``: the 2026 consensus five levels, plus plain "0" (2018, gastric)."""

INTENSITY: dict[str, int] = {
    "none": 0,
    "faint_partial": 1,
    "weak_moderate_complete": 2,
    "weak_moderate_lateral": 2,
    "strong_complete": 3,
    "strong_lateral": 3,
}
"""Per-cell intensity level used for H-score and cumulative percentages (complete and lateral alike)."""

PANCREATIC_NOTE = (
    "There is no validated HER2 scoring guideline for pancreatic cancer; "
    "clinical trials apply the gastric (Hofmann/ToGA) criteria, as this tool does."
)

_CUMULATIVE_KEYS = ("3+", "2+", "1+", "any")
_MIN_CLUSTER_CELLS = 5


@dataclass(frozen=True)
class GuidelineCall:
    """A guideline score with the report level, flags, the deciding reason and the percentages behind it.

    ``percentages``: % of tumour cells at intensity level >= 3 ("3+"), >= 2 ("2+") and >= 1 ("1+" and
    "any", equal since every stained category has level >= 1), complete and lateral patterns together.
    """

    score: str
    level: str
    flags: tuple[str, ...]
    guideline: str
    specimen: str
    reason: str
    h_score: float
    percentages: dict[str, float]


def _count(what: str, value: object) -> int:
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{what} must not be negative, got {n}")
    return n


def _validated(counts: Mapping[str, int]) -> dict[str, int]:
    unknown = sorted(set(counts) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown cell categories {unknown}; expected some of {list(CATEGORIES)}")
    out = {cat: _count(f"count for {cat!r}", counts.get(cat, 0)) for cat in CATEGORIES}
    if not sum(out.values()):
        raise ValueError("no tumour cells to score (all category counts are 0)")
    return out


def cumulative_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Tumour cells at intensity level >= 3 ("3+"), >= 2 ("2+"), >= 1 ("1+", "any"), and "total"."""
    c = _validated(counts)
    at_least = {k: sum(n for cat, n in c.items() if INTENSITY[cat] >= k) for k in (1, 2, 3)}
    return {"3+": at_least[3], "2+": at_least[2], "1+": at_least[1], "any": at_least[1], "total": sum(c.values())}


def h_score(counts: Mapping[str, int]) -> float:
    """H-score (0-300) = 1*(%1+) + 2*(%2+) + 3*(%3+), each % of cells at exactly that ``INTENSITY``."""
    cum = cumulative_counts(counts)
    # Summing the cumulative percentages counts a level-k cell k times.
    return 100 * (cum["1+"] + cum["2+"] + cum["3+"]) / cum["total"]


def _pct(n: int, total: int, bound: str) -> str:
    return f"{100 * n / total:.1f}% of tumour cells ({n}/{total}, {bound})"


def _breast(c: dict[str, int], guideline: str) -> tuple[str, str, tuple[str, ...], str]:
    """(score, level, flags, reason) under ASCO/CAP 2018/2023: every threshold is strictly > 10%."""
    total = sum(c.values())
    strong, complete = c["strong_complete"], c["weak_moderate_complete"] + c["strong_complete"]
    stained = total - c["none"]

    def over(n: int) -> bool:
        return 10 * n > total

    if over(strong):
        return "3+", "3+", (), f"strong complete membrane staining in {_pct(strong, total, '>10%')}"
    if over(complete):
        reason = f"weak-to-moderate complete membrane staining in {_pct(complete, total, '>10%')}"
        return "2+", "2+", ("ish_reflex",), reason + "; reflex ISH required"
    if over(lateral := c["strong_lateral"]) or strong:
        reason = (
            f"intense incomplete (lateral) membrane staining in {_pct(lateral, total, '>10%')}"
            if over(lateral)
            else f"intense complete membrane staining in only {_pct(strong, total, '<=10%')}"
        )
        return "2+", "2+", ("ish_reflex", "unusual_pattern"), f"unusual pattern: {reason}; reflex ISH required"
    if over(stained):
        reason = f"faint or incomplete membrane staining in {_pct(stained, total, '>10%')}"
        return "1+", "1+", ("her2_low",), reason
    if guideline == "breast-asco-cap-2018":
        return "0", "0", (), f"membrane staining in {_pct(stained, total, '<=10%')}"
    if not stained:
        return "0", "0 (null)", ("null",), f"no membrane staining in any of {total} tumour cells"
    reason = f"faint incomplete membrane staining in {_pct(stained, total, '>0% and <=10%')}"
    return "0", "0+ (ultralow)", ("ultralow",), reason


_GASTRIC_WORDS = {
    "3+": "strong complete or lateral/basolateral membrane staining",
    "2+": "weak-to-moderate or stronger complete or lateral/basolateral membrane staining",
    "1+": "faint or barely perceptible membrane staining",
}


def _gastric(
    c: dict[str, int], specimen: str, clusters: Mapping[str, int] | None
) -> tuple[str, str, tuple[str, ...], str]:
    """(score, level, flags, reason) under Hofmann/CAP 2016: >= 10% of cells, or a >= 5-cell cluster in biopsies."""
    cum = cumulative_counts(c)
    total = cum["total"]
    sizes = _validated_clusters(clusters) if specimen == "biopsy" else {}
    for score in ("3+", "2+", "1+"):
        flags = ("ish_reflex",) if score == "2+" else ()
        suffix = "; reflex ISH required" if score == "2+" else ""
        if 10 * cum[score] >= total:
            return score, score, flags, f"{_GASTRIC_WORDS[score]} in {_pct(cum[score], total, '>=10%')}{suffix}"
        if sizes.get(score, 0) >= _MIN_CLUSTER_CELLS:
            reason = (
                f"biopsy: a cohesive cluster of {sizes[score]} tumour cells (>={_MIN_CLUSTER_CELLS}) with "
                f"{_GASTRIC_WORDS[score]}, in {_pct(cum[score], total, '<10%')} overall{suffix}"
            )
            return score, score, flags, reason
    reason = f"membrane staining in {_pct(cum['1+'], total, '<10%')}"
    if specimen == "biopsy":
        reason += f" and no stained cohesive cluster of >= {_MIN_CLUSTER_CELLS} tumour cells"
    return "0", "0", (), reason


def _validated_clusters(clusters: Mapping[str, int] | None) -> dict[str, int]:
    if clusters is None:
        raise ValueError(
            "gastric biopsy scoring needs clusters: the largest cohesive cluster of tumour cells "
            "stained at each level ('3+', '2+', '1+'); a cluster of >= 5 cells decides the level"
        )
    unknown = sorted(set(clusters) - {"3+", "2+", "1+"})
    if unknown:
        raise ValueError(f"unknown cluster levels {unknown}; expected '3+', '2+', '1+'")
    return {k: _count(f"cluster size for {k!r}", v) for k, v in clusters.items()}


def apply_guideline(
    counts: Mapping[str, int],
    guideline: str,
    specimen: str = "resection",
    *,
    clusters: Mapping[str, int] | None = None,
) -> GuidelineCall:
    """Score one slide from tumour-cell counts per category (missing categories count 0).

    ``clusters`` (gastric biopsy only, required there; ignored otherwise): the largest cohesive
    cluster of tumour cells stained at "3+", "2+", "1+" or higher.
    """
    if guideline not in GUIDELINES:
        raise ValueError(f"unknown guideline {guideline!r}; choose one of {list(GUIDELINES)}")
    if specimen not in SPECIMENS:
        raise ValueError(f"unknown specimen {specimen!r}; choose one of {list(SPECIMENS)}")
    if specimen == "biopsy" and GUIDELINE_FAMILY[guideline] != "gastric":
        raise ValueError(
            f"specimen 'biopsy' has its own rule only for gastric; {guideline} scores biopsies "
            "and resections alike: use specimen='resection'"
        )
    c = _validated(counts)
    if GUIDELINE_FAMILY[guideline] == "breast":
        score, level, flags, reason = _breast(c, guideline)
    else:
        score, level, flags, reason = _gastric(c, specimen, clusters)
    cum = cumulative_counts(c)
    percentages = {k: 100 * cum[k] / cum["total"] for k in _CUMULATIVE_KEYS}
    return GuidelineCall(score, level, flags, guideline, specimen, reason, h_score(c), percentages)
