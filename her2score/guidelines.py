"""Guideline HER2 scores (0/1+/2+/3+, five report levels) and H-score from per-category cell counts.

Breast: ASCO/CAP 2018 (Wolff 2018), affirmed by the 2023 update; under "breast-asco-cap-2023" its 0 is
reported as 0 (null) or 0+ (ultralow), the split of DESTINY-Breast06 and the 2026 consensus's five levels
(ASCO/CAP 2023 itself made no new category: it called one premature).
Gastric: Hofmann 2008 / ToGA and CAP/ASCP/ASCO 2016 (Bartley 2017), resection and biopsy rules.
Every threshold is compared in integer (or exact fraction) arithmetic, so exactly 10% falls on the
documented side.

Two per-cell scales are kept apart: ``INTENSITY`` (how dark the membrane is, whatever its pattern:
the H-score's weights) and ``STAINING_LEVEL`` (the level a cell counts at in the guideline's
pattern categories: complete and lateral/basolateral membranes at their intensity, every other
stained membrane at 1+).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist
from typing import Any

from her2score.categories import CATEGORIES
from her2score.results import REPORT_LEVELS, SCORES, ZERO_LEVELS

__all__ = [
    "GUIDELINES",
    "GUIDELINE_FAMILY",
    "SPECIMENS",
    "ZERO_SPLIT",
    "REPORT_LEVELS",
    "INTENSITY",
    "NEAR_CUTOFF_POINTS",
    "NEAR_CUTOFF_CONFIDENCE",
    "DIFFUSE_CYTOPLASM_OD",
    "cytoplasm_doubt",
    "wilson_ci",
    "percent_text",
    "percent_value",
    "near_cutoff",
    "near_cutoff_sides",
    "cluster_sides",
    "cluster_words",
    "isolated_sides",
    "isolated_note",
    "isolated_words",
    "stronger_zero_sides",
    "stronger_zero_words",
    "edge_sides",
    "STRONGER_THAN_FAINT",
    "deciding_cells",
    "FALSE_MEMBRANE_PERCENT",
    "FALSE_STRONGER_PERCENT",
    "null_or_ultralow",
    "false_membrane_share",
    "with_null_doubt",
    "STAINING_LEVEL",
    "STAINED_AT_LEAST",
    "MIN_TUMOUR_CELLS",
    "ISOLATED_INTENSE_PERCENT",
    "ISOLATED_INTENSE_MIN_CELLS",
    "GASTRIC_READINGS",
    "PANCREATIC_NOTE",
    "GuidelineCall",
    "apply_guideline",
    "check_settings",
    "deciding_categories",
    "near_cutoff_settings",
    "cumulative_counts",
    "h_score",
    "level_flags",
    "report_level",
]

GUIDELINES: tuple[str, ...] = ("breast-asco-cap-2018", "breast-asco-cap-2023", "gastric")
GUIDELINE_FAMILY: dict[str, str] = {
    "breast-asco-cap-2018": "breast",
    "breast-asco-cap-2023": "breast",
    "gastric": "gastric",
}
SPECIMENS: tuple[str, ...] = ("resection", "biopsy")
ZERO_SPLIT: frozenset[str] = frozenset({"breast-asco-cap-2023"})
"""The guidelines whose 0 has two report levels, "0 (null)" and "0+ (ultralow)"; the others call a plain "0"."""

MIN_TUMOUR_CELLS: int = 100
"""The fewest tumour cells for an automatic guideline call. The one shared setting: the default of
the scoring QC (``ScoringConfig.min_tumour_cells``) and of every eligibility rule (rule files do
not repeat it; a rule may ask for more)."""

ISOLATED_INTENSE_PERCENT: float = 1.0
"""Default noise floor (% of tumour cells) of the breast "intense complete staining in <=10%" pattern.

Intense complete cells in fewer than this share of tumour cells are isolated cells (a misread cell,
an edge artefact), not a population: the call is what the other cells give, with the flag
``isolated_intense_cells``. At 1%, a slide of 10,000 tumour cells needs 100 intense complete cells
before the pattern sends it to 2+ and reflex ISH; 0 restores the literal rule (one cell is enough).
"""

ISOLATED_INTENSE_MIN_CELLS: int = 5
"""Fewer intense complete cells than this are isolated whatever their share (a 60-cell field with one
misread cell is not a 1.7% population); 5 is the smallest cohesive group the gastric biopsy rule accepts."""

GASTRIC_READINGS: tuple[str, ...] = ("cumulative", "per_band")
"""How gastric percentages are read: "cumulative" (default) counts a cell at its level and every
weaker one, since a strong membrane also shows weak-to-moderate and faint staining; "per_band" counts
each cell at its own level only for 3+ and 2+. Hofmann's 0 is membranous reactivity in <10% of tumour cells,
so under either reading reactivity of any kind in >=10% is at least 1+. 5% strong + 5% weak-to-moderate: 2+
cumulatively, 1+ per band (0 until 0.5.4, which Hofmann's 0 does not allow)."""

INTENSITY: dict[str, int] = {
    "none": 0,
    "faint_partial": 1,
    "weak_moderate_complete": 2,
    "weak_moderate_lateral": 2,
    "strong_complete": 3,
    "strong_lateral": 3,
    "strong_partial": 3,
    "weak_moderate_partial": 2,
}
"""Per-cell membrane intensity, 0 (none) to 3 (strong), whatever the pattern: the H-score's weights.

An intense incomplete membrane is intense (3) and a weak-to-moderate incomplete one weak-to-moderate (2),
though the guidelines score both as 1+ cells where they are not lateral (STAINING_LEVEL); faint is 1.
"""

STAINING_LEVEL: dict[str, int] = {**INTENSITY, "strong_partial": 1, "weak_moderate_partial": 1}
"""Per-cell level in the guideline's pattern categories, for gastric scoring, cumulative percentages,
biopsy clusters and eligibility requirements: complete and lateral/basolateral ("U") membranes count
at their intensity; any other stained membrane at 1+. Gastric counts only complete, basolateral or
lateral membranes as 2+ and 3+, and cells "reactive only in part of their membrane" as 1+ (Hofmann
2008, table 2; Rüschoff 2010), so an intense partial non-U membrane is a 1+ cell there.
"""

PANCREATIC_NOTE = ("pancreatic and other non-gastric GI tumours: no validated HER2 guideline; trials apply these "
                   "gastric (Hofmann/ToGA) criteria")
"""The note every result scored under the gastric guideline carries."""

_CUMULATIVE_KEYS = ("3+", "2+", "1+", "any")
_MIN_CLUSTER_CELLS = 5
CLUSTER_MARGIN_CELLS: tuple[int, int] = (2, 4)
"""How many cells under and over the biopsy rule's 5 a measured cluster may lie and still be on either side of it:
a cell read at another level or a nucleus missed moves a cluster by one, and unstained cells between stained ones
read their neighbours' membranes as their own, which chains scattered stained cells: on generator biopsies of 3+
cells scattered at 4-8% (largest true cluster 2-4 cells, linked within 20 µm) a review measured clusters of 6-9,
called 3+ on 6 of 34 fields with no doubt. So clusters of 3 to 9 cells are doubted, and the biopsy call they make
(or miss) is reviewed where its other side changes the answer."""
_CELL_WORDS = {
    "faint_partial": "faint",
    "weak_moderate_partial": "weak-to-moderate incomplete (non-lateral)",
    "weak_moderate_complete": "weak-to-moderate complete",
    "weak_moderate_lateral": "weak-to-moderate lateral",
    "strong_complete": "intense complete",
    "strong_lateral": "intense lateral",
    "strong_partial": "intense incomplete (non-lateral)",
}


@dataclass(frozen=True)
class GuidelineCall:
    """A guideline score with the report level, flags, the deciding reason and the percentages behind it.

    ``percentages``: % of tumour cells stained at "3+", "2+" and "1+" or higher as the guideline's family reads
    one cell (STAINED_AT_LEAST; "any" = "1+"): breast's 3+ intense complete, its 2+ every cell of a 2+ kind;
    gastric's by ``STAINING_LEVEL``, cumulative whatever the gastric reading.
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
    if isinstance(value, bool):  # True is 1 to operator.index
        raise ValueError(f"{what} must be an integer, got {value!r}")
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
    """Tumour cells at ``STAINING_LEVEL`` >= 3 ("3+"), >= 2 ("2+"), >= 1 ("1+", "any"), and "total"."""
    c = _validated(counts)
    at_least = {k: sum(n for cat, n in c.items() if STAINING_LEVEL[cat] >= k) for k in (1, 2, 3)}
    return {"3+": at_least[3], "2+": at_least[2], "1+": at_least[1], "any": at_least[1], "total": sum(c.values())}


NEAR_CUTOFF_POINTS: float = 5.5
"""How close (percentage points either side of the 10% cut-off) a call's deciding cells make it
borderline. Faint membranes are found in 47% of the cells that carry them where the generator's are
painted on real tissue at 0.5 µm/px (benchmarks/membrane_floor.py; a 0 whose faint share is over
10 x 0.45 = 4.5% may be a 1+: the margin was set when the generator's own fields gave 0.45, and they give
0.60 of the faint share on the 1+ fields of benchmarks/category_percentages.py now that a shared border
is drawn as one line), strong complete ones at ~1.0x, and an unstained cell bordering a stained one
reads the shared membrane as its own partial staining: a call this close may be the next level."""


NEAR_CUTOFF_CONFIDENCE: float = 0.95
"""A call is also borderline where the Wilson interval at this confidence of its deciding share,
from the number of tumour cells counted, reaches across the 10% cut-off: the cells of a field or a
biopsy (a few hundred) sample its tumour to within several points (15% of 100 cells: 9.3-23.3%)."""


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion k / n: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n),
    z the normal quantile of (1 + level) / 2; (None, None) when n = 0."""
    if n == 0:
        return None, None
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def _isolated(strong: int, total: int, isolated_percent: float) -> bool:
    """Whether a breast slide's intense complete cells, in <=10% of its tumour cells, are isolated cells,
    below the floor of the 'intense complete staining in <=10%' pattern (ISOLATED_INTENSE_PERCENT,
    ISOLATED_INTENSE_MIN_CELLS); over 10% they make 3+ whatever their number."""
    return 0 < strong and 10 * strong <= total and (Fraction(100 * strong, total) < Fraction(str(isolated_percent))
                                                    or (isolated_percent > 0 and strong < ISOLATED_INTENSE_MIN_CELLS))


_BREAST_2PLUS = ("weak_moderate_complete", "strong_complete", "weak_moderate_lateral", "strong_lateral", "strong_partial")
"""The cells whose share over 10% makes a breast 2+: complete membranes of any intensity (2+'s definition) and the
unusual pattern's, lateral/basolateral membranes of weak-to-moderate or intense staining and intense incomplete
ones, counted together: each cell shows staining of a 2+ kind, and the guideline's 2018 note calls a pattern its
definitions do not cover equivocal (6% weak-to-moderate complete with 6% intense lateral cells read 1+ when the two
were weighed apart, until 0.5.4)."""

STAINED_AT_LEAST: dict[str, dict[str, tuple[str, ...]]] = {
    "breast": {"3+": ("strong_complete",), "2+": _BREAST_2PLUS,
               "1+": tuple(cat for cat in CATEGORIES if cat != "none")},
    "gastric": {f"{k}+": tuple(cat for cat in CATEGORIES if STAINING_LEVEL[cat] >= k) for k in (3, 2, 1)},
}
"""Per guideline family, the categories of a tumour cell stained at each level or higher as that family's rules read
one cell (an eligibility rule's ``[[require]]`` shares). Breast: 3+ intense complete only (an intense lateral or
incomplete membrane is the unusual 2+ pattern); 2+ every cell of a 2+ kind (_BREAST_2PLUS); 1+ any staining.
Gastric: STAINING_LEVEL, complete and lateral (U) membranes at their intensity."""


def _known(guideline: str, gastric_reading: str = "cumulative") -> None:
    """Raise ValueError for a guideline or gastric reading the rules do not know, or a reading other than
    cumulative under a guideline that is not gastric's."""
    if guideline not in GUIDELINES:
        raise ValueError(f"unknown guideline {guideline!r}; choose one of {list(GUIDELINES)}")
    if gastric_reading not in GASTRIC_READINGS:
        raise ValueError(f"unknown gastric_reading {gastric_reading!r}; choose one of {list(GASTRIC_READINGS)}")
    if gastric_reading != "cumulative" and GUIDELINE_FAMILY[guideline] != "gastric":
        raise ValueError(f"gastric_reading {gastric_reading!r} is a reading of the gastric rules; {guideline} has none")


def deciding_categories(counts: Mapping[str, int], guideline: str, *, gastric_reading: str = "cumulative") -> dict[str, tuple[str, ...]]:
    """Per score ("3+", "2+", "1+"), the cell categories whose share past the 10% cut-off gives it under
    ``guideline`` (those deciding_cells counts). They depend on the guideline and reading alone; ``counts`` are
    validated."""
    _validated(counts)
    return _deciding_categories(guideline, gastric_reading)


def _deciding_categories(guideline: str, gastric_reading: str) -> dict[str, tuple[str, ...]]:
    """Per score ("3+", "2+", "1+"), the categories of deciding_cells: the family's STAINED_AT_LEAST, but for the
    gastric per-band reading's 3+ and 2+, each band alone."""
    _known(guideline, gastric_reading)
    family = GUIDELINE_FAMILY[guideline]
    if family == "gastric" and gastric_reading == "per_band":
        return {f"{k}+": tuple(cat for cat in CATEGORIES if STAINING_LEVEL[cat] == k or k == 1 <= STAINING_LEVEL[cat])
                for k in (3, 2, 1)}
    return dict(STAINED_AT_LEAST[family])


def deciding_cells(counts: Mapping[str, int], guideline: str, *, gastric_reading: str = "cumulative") -> dict[str, int]:
    """Per score ("3+", "2+", "1+"), the tumour cells whose share past the 10% cut-off gives it under
    ``guideline``, as apply_guideline counts them. Breast: 3+ strong complete; 2+ complete (any intensity),
    lateral/basolateral and intense incomplete membranes together (_BREAST_2PLUS); 1+ any membrane staining;
    isolated intense cells count in both as the stained complete cells they are. Gastric:
    cumulative_counts, or under the per_band reading the 3+ and 2+ bands each alone (1+: every stained cell). (Breast's 'intense complete in <=10%' 2+ and gastric biopsy clusters are no shares.)"""
    c = _validated(counts)
    groups = _deciding_categories(guideline, gastric_reading)
    return {score: sum(c[cat] for cat in cats) for score, cats in groups.items()}


_WEAKER: dict[str, str] = {
    "strong_complete": "weak_moderate_complete", "strong_lateral": "weak_moderate_lateral",
    "strong_partial": "weak_moderate_partial", "weak_moderate_complete": "faint_partial", "weak_moderate_lateral": "faint_partial",
    "weak_moderate_partial": "faint_partial", "faint_partial": "none",
}
"""Each stained category one intensity band weaker (what an under-read membrane reads as)."""


def _shares_of(counts: Mapping[str, int], n: int) -> dict[str, int]:
    """``n`` cells taken from ``counts`` in proportion to them (largest remainders; ties in CATEGORIES order)."""
    total = sum(counts.values())
    exact = {cat: Fraction(n * k, total) for cat, k in counts.items()}
    out = {cat: math.floor(v) for cat, v in exact.items()}
    for cat in sorted(exact, key=lambda cat: (-(exact[cat] - out[cat]), CATEGORIES.index(cat)))[: n - sum(out.values())]:
        out[cat] += 1
    return out


def _down_sides(c: dict[str, int], score: str, cats: tuple[str, ...], guideline: str, **rules) -> list[str]:
    """The scores ``c``'s call ``score`` falls to when its deciding cells (``cats``: their categories) fall just to
    the cut-off's other side: the surplus cells not there (missed, or not tumour), or read weaker, band by band,
    until they leave the deciding categories. ``rules``: apply_guideline's keywords."""
    total = sum(c.values())
    below = total // 10 if GUIDELINE_FAMILY[guideline] == "breast" else (total - 1) // 10  # most cells short of the cut
    out = []
    for weaker in (False, True):
        alt = dict(c)
        n = sum(c[cat] for cat in cats)
        for cat, k in _shares_of({cat: c[cat] for cat in cats}, max(0, n - below)).items():
            to = cat
            while weaker and to in cats:
                to = _WEAKER[to]
            alt[cat] -= k
            alt[to if weaker else "none"] += k
        other = apply_guideline(alt, guideline, **{**rules, "clusters": _fitted(rules.get("clusters") or {}, alt)}).score
        if other != score and other not in out:
            out.append(other)
    return out


FALSE_MEMBRANE_PERCENT: float = 8.0
"""Default share (% of tumour cells) of cells that real unstained membranes alone read as stained.

Measured on the real Ki67 fields scored with the nuclear refusal off, whose membranes are all
unstained (``python benchmarks/membrane_floor.py``; ``tests/test_real.py``): 6.0% and 4.5% of the
tumour cells of the two large fields (963 and 732 cells), 5.5% over all six (her2score 0.5.0; 6.1%,
6.3% and 6.8% with earlier versions, which found other cells); a real cell border
carries DAB texture (membrane contrast 0.019-0.025 OD at its 90th percentile) where faint membranes
read too. An ultralow call whose staining is no larger could be null.
"""

FALSE_STRONGER_PERCENT: float = 2.0
"""Of those false membranes, the share (% of tumour cells) read otherwise than as a faint or weak-to-moderate
partial membrane: over the six real Ki67 fields 0.9% of 1,996 tumour cells (intense incomplete 0.65,
intense complete 0.10, weak-to-moderate complete and either lateral 0.05 each), 1.0% and 0.3% on the two large
ones, against 2.6% faint and 2.0% weak-to-moderate partial (her2score 0.5.0; 1.3% of 2,154 before). An ultralow call with more such cells than this is
not what false membranes give."""


def near_cutoff_settings(guideline: str, specimen: str, clusters: Mapping[str, int] | None, config: Mapping[str, Any]) -> dict[str, Any]:
    """near_cutoff_sides' keyword arguments for a slide scored under ``guideline`` and ``specimen`` with ``config``
    (ScoringConfig.to_dict(), a result.json's config): its settings that ``guideline`` uses, the defaults for the
    rest (a result of 0.3.1 may record a per-band reading under breast or an isolated floor under gastric, which
    had no effect there) and for those it lacks."""
    family = GUIDELINE_FAMILY.get(guideline)
    return dict(guideline=guideline, specimen=specimen, clusters=clusters,
                gastric_reading=config.get("gastric_reading", "cumulative") if family == "gastric" else "cumulative",
                isolated_intense_percent=(config.get("isolated_intense_percent", ISOLATED_INTENSE_PERCENT) if family == "breast"
                                          else ISOLATED_INTENSE_PERCENT),
                points=config.get("near_cutoff_points", NEAR_CUTOFF_POINTS),
                false_membrane_percent=config.get("false_membrane_percent", FALSE_MEMBRANE_PERCENT))


def near_cutoff_sides(counts: Mapping[str, int], score: str | None, *, guideline: str = "breast-asco-cap-2023",
                      specimen: str = "resection", clusters: Mapping[str, int] | None = None,
                      gastric_reading: str = "cumulative", isolated_intense_percent: float = ISOLATED_INTENSE_PERCENT,
                      points: float = NEAR_CUTOFF_POINTS, false_membrane_percent: float = FALSE_MEMBRANE_PERCENT,
                      confidence: float = NEAR_CUTOFF_CONFIDENCE) -> list[tuple[str, float]]:
    """Each other score a borderline call could be, with the % of tumour cells that decides it (deciding_cells),
    the side nearer the 10% cut-off first; [] for a call sure of its side. The settings are apply_guideline's.

    Up, each higher score: its cells lie within ``points`` under the cut-off, or the Wilson interval
    (``confidence``) of their share reaches over it. Down, where the call's own deciding cells lie
    within ``points`` over it, or their share's interval reaches under it: the scores the rules give
    with those cells just under the cut-off, the surplus missing or read weaker until it no longer counts (a 2+ on
    weak-to-moderate complete cells alone falls to 0, or to 1+ if they read faint); not for
    a call that holds whatever its share: a gastric biopsy call its cohesive cluster of >= 5 cells
    holds (``clusters``, read for biopsies only), a breast 2+ that intense complete cells in <=10% make 2+.
    A 1+ is near its cut-off down to 0 within ``false_membrane_percent`` too, where that is wider than
    ``points``: real unstained membranes read stained in up to that share of cells (FALSE_MEMBRANE_PERCENT),
    so a 1+ whose stained share less it lies under 10% could be 0.
    """
    if score is None:
        return []
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; expected one of {list(SCORES)} or None")
    c = _validated(counts)
    share = deciding_cells(c, guideline, gastric_reading=gastric_reading)
    total, rank = max(sum(c.values()), 1), SCORES.index(score)
    sides = []
    for up in SCORES[rank + 1:]:
        if (pct := 100.0 * share[up] / total) <= 10.0:
            if pct > 10.0 - points or 100.0 * wilson_ci(share[up], total, confidence)[1] > 10.0:
                sides.append((up, pct))
    held = specimen == "biopsy" and (clusters or {}).get(score, 0) >= _MIN_CLUSTER_CELLS  # its cluster holds it
    if score == "2+" and GUIDELINE_FAMILY[guideline] == "breast":  # intense complete in <=10%: 2+ whatever else
        held |= not _isolated(c["strong_complete"], total, isolated_intense_percent) and c["strong_complete"] > 0
    if rank > 0 and not held and (pct := 100.0 * share[score] / total) >= 10.0:
        band = max(points, false_membrane_percent) if score == "1+" else points
        if pct < 10.0 + band or 100.0 * wilson_ci(share[score], total, confidence)[0] < 10.0:
            cats = _deciding_categories(guideline, gastric_reading)[score]
            sides += [(other, pct) for other in _down_sides(c, score, cats, guideline, specimen=specimen, clusters=clusters or {},
                                                           gastric_reading=gastric_reading,
                                                           isolated_intense_percent=isolated_intense_percent)]
    return sorted(sides, key=lambda side: abs(side[1] - 10.0))


def near_cutoff(counts: Mapping[str, int], score: str | None, **kw) -> tuple[str, float] | None:
    """The nearer side of near_cutoff_sides (same arguments), or None for a call sure of its side."""
    return next(iter(near_cutoff_sides(counts, score, **kw)), None)


def cluster_sides(counts: Mapping[str, int], score: str | None, *, guideline: str, specimen: str,
                  clusters: Mapping[str, int] | None, gastric_reading: str = "cumulative") -> list[tuple[str, str, int]]:
    """Each other score a gastric biopsy call would be were one of its clusters on the other side of the rule's 5,
    as (that score, the cluster's level, its size): a cluster within CLUSTER_MARGIN_CELLS of 5 (3 to 9 cells),
    moved to 4 or to 5. A cluster is a count of detected cells. A cell read at another level moves one level's
    cluster; a nucleus missed or found moves every cluster it lies in, i.e. the weaker levels' too where they are
    the same cells (the same size). [] for a resection, another guideline, or a call no such move changes."""
    if specimen != "biopsy" or GUIDELINE_FAMILY.get(guideline) != "gastric" or score is None or not clusters:
        return []
    order = ("3+", "2+", "1+")  # a cluster at a level holds cells stained at it or stronger
    under, over = CLUSTER_MARGIN_CELLS
    sides = []
    for i, level in enumerate(order):
        size = clusters.get(level, 0)
        if not _MIN_CLUSTER_CELLS - under <= size <= _MIN_CLUSTER_CELLS + over:
            continue
        across = _MIN_CLUSTER_CELLS - 1 if size >= _MIN_CLUSTER_CELLS else _MIN_CLUSTER_CELLS  # the other side of 5
        nested = {**clusters, **{k: across for k in order[i:] if clusters.get(k, 0) == size}}
        for moved in (_moved_cluster(clusters, level, across), _moved_cluster(nested, level, across)):
            held = _holding(counts, moved)
            alt = apply_guideline(held, guideline, specimen, clusters=_fitted(moved, held),
                                  gastric_reading=gastric_reading).score
            if alt != score and alt not in [s for s, _, _ in sides]:
                sides.append((alt, level, size))
    return sides


_LEVEL_CATEGORY = {"3+": "strong_complete", "2+": "weak_moderate_complete", "1+": "faint_partial"}


def _holding(counts: Mapping[str, int], clusters: Mapping[str, int]) -> dict[str, int]:
    """``counts`` with as many cells read at each level as its cluster needs beyond them, taken from the next
    weaker levels first, then from unstained cells (a cell of a cluster one cell larger is a cell read at its
    level); where the counts have too few cells in all, what they hold."""
    c = _validated(counts)
    for level in ("3+", "2+", "1+"):
        k = int(level[0])
        short = max(0, clusters.get(level, 0) - cumulative_counts(c)[level])
        for donor in sorted((cat for cat in CATEGORIES if STAINING_LEVEL[cat] < k), key=lambda cat: -STAINING_LEVEL[cat]):
            moved = min(short, c[donor])
            c[donor] -= moved
            c[_LEVEL_CATEGORY[level]] += moved
            short -= moved
    return c


def _fitted(clusters: Mapping[str, int], counts: Mapping[str, int]) -> dict[str, int]:
    """``clusters`` no larger than the cells of ``counts`` at each level or stronger (still nested): the clusters
    of a what-if reading whose counts lost cells (missed, or read weaker)."""
    cum = cumulative_counts(counts)
    return {level: min(size, cum[level]) for level, size in clusters.items() if level in ("3+", "2+", "1+")}


def _moved_cluster(clusters: Mapping[str, int], level: str, size: int) -> dict[str, int]:
    """``clusters`` with ``level``'s set to ``size``, the others kept nested (a cluster at a level is one at
    each weaker level too): a weaker level's at least ``size``, a stronger one's at most."""
    order = ("3+", "2+", "1+")
    i = order.index(level)
    return {k: max(clusters.get(k, 0), size) if j > i else min(clusters.get(k, 0), size) if j < i else size
            for j, k in enumerate(order)}


def cluster_words(level: str, size: int) -> str:
    """How a cluster_sides cluster is named in a reason."""
    short, over = _MIN_CLUSTER_CELLS - size, size - _MIN_CLUSTER_CELLS
    edge = "one short of" if short == 1 else f"{short} short of" if short > 1 else "just" if over == 0 else f"{over} over"
    why = " (unstained cells between stained ones can join a cluster)" if over > 0 else ""
    stained = level if level == "3+" else f"{level} or stronger"
    return f"a cohesive cluster of {size} tumour cells at {stained}, {edge} the biopsy rule's {_MIN_CLUSTER_CELLS}{why}"


def isolated_sides(counts: Mapping[str, int], score: str | None, *, guideline: str,
                   isolated_intense_percent: float = ISOLATED_INTENSE_PERCENT,
                   confidence: float = NEAR_CUTOFF_CONFIDENCE) -> list[tuple[str, str]]:
    """The (score, level) a breast call would be were its intense complete cells in <=10% isolated cells, where
    they lie just over the isolated floor (_isolated): one cell fewer would put them under it, or the
    Wilson interval (``confidence``) of their share reaches under ``isolated_intense_percent``; []
    for another guideline, a call they do not change, or cells sure of their side of the floor (and
    with the floor off, ``isolated_intense_percent`` 0)."""
    if score not in SCORES or GUIDELINE_FAMILY.get(guideline) != "breast" or isolated_intense_percent == 0:
        return []
    c = _validated(counts)
    total, strong = sum(c.values()), c["strong_complete"]
    if strong == 0 or 10 * strong > total or _isolated(strong, total, isolated_intense_percent):
        return []
    lower = wilson_ci(strong, total, confidence)[0]
    if not (_isolated(strong - 1, total, isolated_intense_percent) or 100.0 * lower < isolated_intense_percent):
        return []
    other, level = _breast_rules(c, guideline, isolated=True)[:2]
    return [] if other == score else [(other, level)]


def isolated_words(counts: Mapping[str, int], isolated_intense_percent: float = ISOLATED_INTENSE_PERCENT) -> str:
    """How an isolated_sides call's intense complete cells are named in a reason."""
    c = _validated(counts)
    strong, total = c["strong_complete"], sum(c.values())
    return (f"its {strong:,} intense complete cells ({percent_text(100 * strong / total, isolated_intense_percent)} of {total:,}) lie just over the "
            f"{isolated_intense_percent:g}% / {ISOLATED_INTENSE_MIN_CELLS}-cell floor below which they would be isolated cells")


STRONGER_THAN_FAINT = ("weak_moderate_complete", "weak_moderate_lateral", "strong_lateral", "strong_partial")
"""Stained cells a breast 0 may hold that are neither incomplete and no more than weak-to-moderate (as faint ones and
false membranes read: FALSE_STRONGER_PERCENT) nor intense complete (which over the isolated floor make 2+ in <=10%):
ASCO/CAP's 0 and DESTINY-Breast06's ultralow are faint incomplete staining, and its 2018 note calls a pattern its
definitions do not cover equivocal; the last two are intense incomplete cells."""


def stronger_zero_sides(counts: Mapping[str, int], score: str | None, *, guideline: str,
                        stronger_percent: float = FALSE_STRONGER_PERCENT) -> list[tuple[str, str]]:
    """The (score, level) a breast 0 could be where it holds cells stained more than faint (STRONGER_THAN_FAINT) in
    more than ``stronger_percent`` of its tumour cells (what real unstained membranes read otherwise than as faint or
    weak-to-moderate partial ones) and at least ISOLATED_INTENSE_MIN_CELLS: 1+ (a pathologist may read them as 1+
    cells), and 2+ where the intense incomplete ones alone are that many (as intense complete cells in <=10% make
    2+). A reading of the guideline's words, not of the cells: no CNN settles it (pipeline). [] for another
    guideline or score."""
    if score != "0" or GUIDELINE_FAMILY.get(guideline) != "breast":
        return []
    c = _validated(counts)
    total = sum(c.values())

    def many(cats: tuple[str, ...]) -> bool:
        n = sum(c[cat] for cat in cats)
        return n >= ISOLATED_INTENSE_MIN_CELLS and 100 * n > stronger_percent * total

    return [(s, s) for s, cats in (("1+", STRONGER_THAN_FAINT), ("2+", ("strong_lateral", "strong_partial"))) if many(cats)]


def stronger_zero_words(counts: Mapping[str, int]) -> str:
    """How a stronger_zero_sides call's cells stained more than faint are named in a reason."""
    c = _validated(counts)
    total = sum(c.values())
    kinds = ", ".join(f"{_CELL_WORDS[cat]} {percent_text(100 * c[cat] / total)}" for cat in STRONGER_THAN_FAINT if c[cat])
    return (f"{percent_text(100 * sum(c[cat] for cat in STRONGER_THAN_FAINT) / total)} of {total:,} tumour cells are stained "
            f"more than faint ({kinds}), which the guideline's 0 (faint incomplete staining) does not describe")


def edge_sides(counts: Mapping[str, int], score: str | None, *, guideline: str, specimen: str = "resection",
               clusters: Mapping[str, int] | None = None, gastric_reading: str = "cumulative",
               isolated_intense_percent: float = ISOLATED_INTENSE_PERCENT) -> list[tuple[str, str, str, bool]]:
    """The edges of the rules other than a share near 10% that a call at ``score`` lies on, as (words, the score
    across it, its report level under ``guideline``, whether the cells measured put it there): a gastric biopsy
    cluster of ~5 (cluster_sides) and intense complete cells at the isolated floor (isolated_sides), where a cell
    read otherwise moves the call; a breast 0 over cells stained more than faint (stronger_zero_sides), where only
    the guideline's words do (no CNN settles that)."""
    edges = [(cluster_words(cluster_level, size), other, other, True)
             for other, cluster_level, size in cluster_sides(counts, score, guideline=guideline, specimen=specimen,
                                                             clusters=clusters, gastric_reading=gastric_reading)]
    edges += [(isolated_words(counts, isolated_intense_percent), other, level, True)
              for other, level in isolated_sides(counts, score, guideline=guideline,
                                                 isolated_intense_percent=isolated_intense_percent)]
    return edges + [(stronger_zero_words(counts), other, level, False)
                    for other, level in stronger_zero_sides(counts, score, guideline=guideline)]


def false_membrane_share(counts: Mapping[str, int], *, percent: float = FALSE_MEMBRANE_PERCENT,
                         stronger_percent: float = FALSE_STRONGER_PERCENT, confidence: float | None = None) -> float | None:
    """The % of tumour cells stained in ``counts`` where false membranes alone could give it: at most ``percent``,
    of which at most ``stronger_percent`` stained otherwise than as faint or weak-to-moderate partial membranes
    (0 where nothing is stained); None for a larger share, or more cells intense, complete or lateral. With
    ``confidence``, each share is taken at the lower end of its Wilson interval: what a field of few cells could hold."""
    c = _validated(counts)
    total = sum(c.values())
    stained = total - c["none"]
    stronger = stained - c["faint_partial"] - c["weak_moderate_partial"]

    def low(n: int) -> float:
        return 100.0 * (n / total if confidence is None else wilson_ci(n, total, confidence)[0])

    if low(stronger) > stronger_percent or low(stained) > percent:
        return None
    return 100.0 * stained / total


def null_or_ultralow(counts: Mapping[str, int], level: str, *, percent: float = FALSE_MEMBRANE_PERCENT,
                     stronger_percent: float = FALSE_STRONGER_PERCENT, confidence: float | None = None) -> float | None:
    """The % of tumour cells stained in a "0+ (ultralow)" call that false membranes alone could give
    (false_membrane_share, at ``confidence`` where given): the call could be "0 (null)". None for any other level
    or staining."""
    if level != "0+ (ultralow)":
        return None
    return false_membrane_share(counts, percent=percent, stronger_percent=stronger_percent, confidence=confidence)


def with_null_doubt(flags: tuple[str, ...], counts: Mapping[str, int], level: str, *,
                    percent: float = FALSE_MEMBRANE_PERCENT) -> tuple[tuple[str, ...], str]:
    """``flags`` plus ``null_or_ultralow``, and the words that say why (to append to a reason; "" without
    the flag), where false membranes alone could make ``level`` an ultralow call (null_or_ultralow; on few cells
    within the 95% interval of the share, as the CNN is held: cnn.fuse)."""
    share = null_or_ultralow(counts, level, percent=percent, confidence=NEAR_CUTOFF_CONFIDENCE)
    if share is None:
        return flags, ""
    if share > percent:  # over it, within its interval
        n = sum(counts.values())
        return (*flags, "null_or_ultralow"), (f"; the {percent_text(share, percent)} stained of {n:,} tumour cells is, within "
                                              f"its {NEAR_CUTOFF_CONFIDENCE:.0%} interval, no more than the {percent:g}% "
                                              "real unstained membranes read: it could be 0 (null)")
    return (*flags, "null_or_ultralow"), (f"; the {percent_text(share, percent)} stained is within the {percent:g}% that real "
                                          "unstained membranes read: it could be 0 (null)")


DOUBT_SIDES: dict[str, str] = {"moderate_incomplete": "2+", "coarse_scan_zero": "1+"}
"""The score a call carrying each of these doubts of its cells could be (with_incomplete_doubt, with_coarse_doubt): the
side eligibility weighs, and one the CNN may tip the call to."""

COARSE_SCAN_MPP: float = 0.55
"""µm/px coarser than which faint membranes are read weaker and fewer: the two 1+ sample fields, 22% and 15% stained
at their 0.5 µm/px, read 16% and 11% brought to 0.6 µm/px, 12% and 9% at 0.75, 6% and 5% at 1 (a 0 or ultralow
call at such a scan could be 1+: coarse_scan_zero), and the real colon's intense complete share 34% at 0.5, 26% at 1."""


def coarse_scan_zero(level: str, scan_mpp: float | None) -> bool:
    """Whether a 0 call (null, ultralow or plain) rests on a scan coarser than COARSE_SCAN_MPP, where faint
    membranes are under-read: it could be 1+."""
    return scan_mpp is not None and scan_mpp > COARSE_SCAN_MPP and level in ("0", *ZERO_LEVELS)


def with_coarse_doubt(flags: tuple[str, ...], level: str, scan_mpp: float | None) -> tuple[tuple[str, ...], str]:
    """``flags`` plus ``coarse_scan_zero``, and the words that say why ("" without it), where coarse_scan_zero."""
    if not coarse_scan_zero(level, scan_mpp):
        return flags, ""
    return (*flags, "coarse_scan_zero"), (f"; scanned at {scan_mpp:.3g} µm/px, coarser than {COARSE_SCAN_MPP:g}: faint "
                                          "membranes read weaker and fewer there (the 1+ sample fields read 9-12% "
                                          "stained at 0.75 µm/px, 5-6% at 1), so it could be 1+")


STRONGER_INCOMPLETE = ("weak_moderate_partial", *_BREAST_2PLUS)
"""The cells of a breast 1+ that moderate_incomplete weighs: weak-to-moderate incomplete ones, with every cell of a 2+
kind (_BREAST_2PLUS), which they would join were they moderate (until 0.5.4 without the complete ones, the 2+ kinds
then weighed apart)."""


def moderate_incomplete(counts: Mapping[str, int], level: str, guideline: str) -> float | None:
    """The % of tumour cells with membranes stronger than faint (STRONGER_INCOMPLETE) where a breast "1+" call has
    them in >10%, weak-to-moderate incomplete ones among them: ASCO/CAP's 1+ is "faint/barely perceptible" incomplete staining, and its 2018
    note calls moderate to intense incomplete staining an unusual pattern, equivocal (2+). Weak and moderate are
    one band here (categories.Thresholds), so the tool cannot tell weak incomplete staining (1+, as earlier
    guidelines and the HercepTest manual word it) from moderate (2+). None where the 2+ kinds alone are over 10% (the
    cells give 2+: a 1+ the rules did not make), and for any other level, guideline or staining."""
    _known(guideline)
    if level != "1+" or GUIDELINE_FAMILY[guideline] != "breast":
        return None
    c = _validated(counts)
    n, total = sum(c[cat] for cat in STRONGER_INCOMPLETE), sum(c.values())
    kinds = n - c["weak_moderate_partial"]  # over 10% alone they make 2+ (a 1+ the rules did not make, a CNN's)
    return 100.0 * n / total if 10 * kinds <= total < 10 * n else None


def with_incomplete_doubt(flags: tuple[str, ...], counts: Mapping[str, int], level: str,
                          guideline: str) -> tuple[tuple[str, ...], str]:
    """``flags`` plus ``moderate_incomplete``, and the words that say why (to append to a reason; "" without the
    flag), where a breast 1+ rests on weak-to-moderate incomplete membranes (moderate_incomplete)."""
    share = moderate_incomplete(counts, level, guideline)
    if share is None:
        return flags, ""
    return (*flags, "moderate_incomplete"), (
        f"; {percent_text(share)} of tumour cells show membranes stronger than faint, weak-to-moderate incomplete ones "
        "among them: ASCO/CAP's 1+ is faint/barely perceptible staining and its 2018 note calls moderate to intense "
        "incomplete staining equivocal (2+); weak and moderate are one band here, so a pathologist decides 1+ or "
        "2+ (reflex ISH)")


def h_score(counts: Mapping[str, int]) -> float:
    """H-score (0-300) = 1*(%1+) + 2*(%2+) + 3*(%3+), each % of cells at exactly that ``INTENSITY``."""
    c = _validated(counts)
    return 100 * sum(INTENSITY[cat] * n for cat, n in c.items()) / sum(c.values())


def level_flags(level: str, guideline: str) -> tuple[str, ...]:
    """The flags a report level carries by itself: null, ultralow, her2_low (breast 1+), ish_reflex (2+)."""
    _known(guideline)
    if level not in REPORT_LEVELS:
        raise ValueError(f"unknown report level {level!r}; expected one of {list(REPORT_LEVELS)}")
    if level == "1+":
        return ("her2_low",) if GUIDELINE_FAMILY[guideline] == "breast" else ()
    return {"0 (null)": ("null",), "0+ (ultralow)": ("ultralow",), "2+": ("ish_reflex",)}.get(level, ())


def report_level(score: str, guideline: str, counts: Mapping[str, int], *, across_cutoff: bool = False) -> str:
    """The report level of a score not made by the guideline rules themselves (e.g. a CNN-fused score).

    Only a 0 under ASCO/CAP 2023 has two levels: "0 (null)" when no tumour cell shows membrane staining,
    "0+ (ultralow)" when some do, in <=10% of them. A 0 over cells more than 10% stained (a CNN's 0 where
    the cells measured give 1+ or more) is neither: a plain "0", which eligibility sends to review where
    null and ultralow would be answered differently. ``across_cutoff``: the level of a score just across a
    cut-off from these counts (eligibility's near-cut-off sides), where a 0 is the ultralow just under 10%.
    """
    _known(guideline)
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; expected one of {list(SCORES)}")
    if score != "0" or guideline not in ZERO_SPLIT:
        return score
    c = _validated(counts)
    total = sum(c.values())
    stained = total - c["none"]
    if stained == 0:
        return "0 (null)"
    return "0+ (ultralow)" if across_cutoff or 10 * stained <= total else "0"


def _percent_digits(share: float, cutoff: float, digits: int) -> int:
    """``digits``, or as many more as it takes not to round ``share`` (%) just off ``cutoff`` onto it, nor a share over 0 to 0."""
    while digits < 12 and share != cutoff and (round(share, digits) == cutoff or round(share, digits) == 0 < share):
        digits += 1
    return digits


def percent_text(share: float, cutoff: float = 10.0) -> str:
    """``share`` (%) to one decimal, or to as many more as it takes not to print a share just off
    ``cutoff`` as the cut-off itself (9.96% is not "10.0%" under a rule of >=10%; 1 cell fewer than
    10% of 2 million is 9.99995%), nor a share over 0 as 0 (3 cells of 10,412 are 0.03%)."""
    return f"{share:.{_percent_digits(share, cutoff, 1)}f}%"


def percent_value(share: float, cutoff: float = 10.0, digits: int = 3) -> float:
    """``share`` (%) rounded to ``digits`` decimals, or to more where that would put a share just off
    ``cutoff`` on it or a share over 0 at 0, as percent_text does for the words."""
    return round(share, _percent_digits(share, cutoff, digits))


def _pct(n: int, total: int, bound: str) -> str:
    return f"{percent_text(100 * n / total)} of tumour cells ({n}/{total}, {bound})"


def _staining_words(c: Mapping[str, int], total: int, bound: str, what: str = "membrane staining") -> str:
    """'<kind> membrane staining in <pct>' for the stained cells of ``c``; several kinds are listed after."""
    stained = {cat: n for cat, n in c.items() if cat != "none" and n}
    n = sum(stained.values())
    if len(stained) == 1:
        return f"{_CELL_WORDS[next(iter(stained))]} membrane staining in {_pct(n, total, bound)}"
    parts = ", ".join(f"{_CELL_WORDS[cat]} {percent_text(100 * k / total)}" for cat, k in stained.items())
    return f"{what} in {_pct(n, total, bound)}: {parts}"


def _breast(c: dict[str, int], guideline: str, isolated_percent: float) -> tuple[str, str, tuple[str, ...], str]:
    """(score, level, flags, reason) under ASCO/CAP 2018/2023: every threshold is strictly > 10%.

    Intense complete cells below the isolated floor (_isolated) do not make the "intense complete
    staining in <=10%" 2+ by themselves: they count as the stained complete cells they are (towards
    complete staining in >10%, any staining in >10%, ultralow), and the reason says so; the flag
    ``isolated_intense_cells`` marks a call the pattern would have made 2+.
    """
    total, strong = sum(c.values()), c["strong_complete"]
    if not _isolated(strong, total, isolated_percent):
        return _breast_rules(c, guideline)
    literal = _breast_rules(c, guideline)[0]
    score, level, flags, reason = _breast_rules(c, guideline, isolated=True)
    return (score, level, flags + (("isolated_intense_cells",) if score != literal else ()),
            reason + "; " + isolated_note(c, isolated_percent))


def isolated_note(counts: Mapping[str, int], isolated_intense_percent: float = ISOLATED_INTENSE_PERCENT) -> str:
    """How a reason names intense complete cells under the isolated floor (_isolated), counted as stained complete cells."""
    c = _validated(counts)
    strong, total = c["strong_complete"], sum(c.values())
    under = (f"under the {isolated_intense_percent:g}% of tumour cells"
             if Fraction(100 * strong, total) < Fraction(str(isolated_intense_percent))
             else f"fewer than the {ISOLATED_INTENSE_MIN_CELLS} cells")
    share = percent_text(100 * strong / total, isolated_intense_percent)  # 999 of 100,000 is 0.999%, never "1%"
    return (f"isolated intense cells: {strong:,} of {total:,} ({share}, {under} that the 'intense complete staining "
            "in <=10%' pattern needs), counted as stained complete cells, not as that pattern")


def _breast_rules(c: dict[str, int], guideline: str, isolated: bool = False) -> tuple[str, str, tuple[str, ...], str]:
    """_breast's call on counts ``c``; ``isolated``: its intense complete cells in <=10% are isolated cells,
    which do not make the "intense complete in <=10%" 2+.

    ASCO/CAP 2018's unusual pattern, "moderate to intense but incomplete (basolateral or lateral)"
    staining in >10%, is an equivocal 2+: lateral/basolateral membranes of weak-to-moderate intensity
    (weak and moderate are one band here, and the guideline calls a pattern its definitions do not
    cover equivocal) or intense ones, and intense incomplete non-lateral ones, counted with any
    complete ones in <=10% (every cell of a 2+ kind, _BREAST_2PLUS). Below
    1+, any membrane staining in >0% and <=10% is "0+ (ultralow)" ("IHC >0 <1+", DESTINY-Breast06): a
    stronger membrane also shows the faint level, so weak-to-moderate complete staining in <=10% is
    ultralow too; the reason names the cells. A 1+ over weak-to-moderate incomplete cells in >10% stays 1+
    (weak incomplete staining is 1+ in earlier wordings) and carries the doubt moderate_incomplete (with_call_doubts).
    """
    total = sum(c.values())
    strong, complete = c["strong_complete"], c["weak_moderate_complete"] + c["strong_complete"]
    lateral = c["weak_moderate_lateral"]

    def over(n: int) -> bool:
        return 10 * n > total

    if over(strong):
        return "3+", "3+", (), f"strong complete membrane staining in {_pct(strong, total, '>10%')}"
    if over(complete):
        kinds = {"weak_moderate_complete": c["weak_moderate_complete"], "strong_complete": strong}
        return "2+", "2+", ("ish_reflex",), _staining_words(kinds, total, ">10%", "complete membrane staining") + "; reflex ISH required"
    unusual = ("ish_reflex", "unusual_pattern")
    if over(sum(c[cat] for cat in _BREAST_2PLUS)):  # complete cells in <=10%, with lateral or intense incomplete ones
        kinds = {cat: c[cat] for cat in _BREAST_2PLUS}
        what = "intense membrane staining (incomplete, or complete in <=10%)" if strong else "intense but incomplete membrane staining"
        if lateral:
            what = ("lateral/basolateral or intense membrane staining (incomplete, or complete in <=10%)" if strong
                    else "incomplete membrane staining, lateral/basolateral or intense,")
        if c["weak_moderate_complete"]:
            what = "membrane staining complete in <=10%, or incomplete and lateral/basolateral or intense,"
        reason = _staining_words(kinds, total, ">10%", what)
        moderate = ("; ASCO/CAP's unusual 'moderate to intense but incomplete (basolateral or lateral)' pattern (weak "
                    "and moderate are not told apart)") if lateral else ""
        return "2+", "2+", unusual, f"unusual pattern: {reason}{moderate}; reflex ISH required"
    if strong and not isolated:
        reason = f"intense complete membrane staining in only {_pct(strong, total, '<=10%')}"
        return "2+", "2+", unusual, f"unusual pattern: {reason}; reflex ISH required"
    stained = total - c["none"]
    nothing = f"no membrane staining in any of {total:,} tumour cells"
    if over(stained):
        return "1+", "1+", ("her2_low",), _staining_words(c, total, ">10%")
    if guideline == "breast-asco-cap-2018":
        return "0", "0", (), _staining_words(c, total, "<=10%") if stained else nothing
    if not stained:
        return "0", "0 (null)", ("null",), nothing
    beyond = "" if stained == c["faint_partial"] else (  # cells not faint: ultralow by this tool's reading, not the trial's words
        "; ultralow as this tool reads any staining in <=10% (DESTINY-Breast06's ultralow is barely perceptible, incomplete staining)")
    return "0", "0+ (ultralow)", ("ultralow",), _staining_words(c, total, ">0% and <=10%") + beyond


_GASTRIC_WORDS = {
    "cumulative": {
        "3+": "strong complete or lateral/basolateral membrane staining",
        "2+": "weak-to-moderate or stronger complete or lateral/basolateral membrane staining",
        "1+": "faint/barely perceptible or partial membrane staining, or stronger,",
    },
    "per_band": {
        "3+": "strong complete or lateral/basolateral membrane staining",
        "2+": "weak-to-moderate complete or lateral/basolateral membrane staining (this band alone)",
        "1+": "membrane staining of any kind (no stronger band alone reaching 10%)",
    },
}


def _gastric(
    c: dict[str, int], specimen: str, clusters: Mapping[str, int] | None, reading: str
) -> tuple[str, str, tuple[str, ...], str]:
    """(score, level, flags, reason) under Hofmann/CAP 2016: >= 10% of cells, or a >= 5-cell cluster in biopsies.

    ``reading`` (GASTRIC_READINGS) decides whether a cell counts at its level and every weaker one
    (cumulative) or at its own level only for 3+ and 2+ (per_band; reactivity of any kind in >=10% is 1+ either way,
    as Hofmann's 0 is reactivity in <10%). Biopsy clusters are always cells stained at a
    level or stronger (as the pipeline measures them).
    """
    cum = cumulative_counts(c)
    total = cum["total"]
    share = deciding_cells(c, "gastric", gastric_reading=reading)
    words = _GASTRIC_WORDS[reading]
    sizes = _validated_clusters(clusters, cum) if specimen == "biopsy" else {}
    for score in ("3+", "2+", "1+"):
        flags = ("ish_reflex",) if score == "2+" else ()
        suffix = "; reflex ISH required" if score == "2+" else ""
        if 10 * share[score] >= total:
            return score, score, flags, f"{words[score]} in {_pct(share[score], total, '>=10%')}{suffix}"
        if sizes.get(score, 0) >= _MIN_CLUSTER_CELLS:
            reason = (
                f"biopsy: a cohesive cluster of {sizes[score]} tumour cells (>={_MIN_CLUSTER_CELLS}) with "
                f"{_GASTRIC_WORDS['cumulative'][score].rstrip(',')}, in "
                f"{_pct(cum[score], total, '<10%' if 10 * cum[score] < total else '>=10% across bands')} overall{suffix}"
            )
            return score, score, flags, reason
    reason = f"membrane staining in {_pct(cum['1+'], total, '<10%')}"
    if specimen == "biopsy":
        reason += f" and no stained cohesive cluster of >= {_MIN_CLUSTER_CELLS} tumour cells"
    return "0", "0", (), reason


def _validated_clusters(clusters: Mapping[str, int] | None, cumulative: Mapping[str, int]) -> dict[str, int]:
    """The largest cluster at each level, checked against the ``cumulative`` counts (cumulative_counts); a
    level not given takes the stronger levels' size."""
    if clusters is None:
        raise ValueError(
            "gastric biopsy scoring needs clusters: the largest cohesive cluster of tumour cells "
            "stained at each level ('3+', '2+', '1+'); a cluster of >= 5 cells decides the level"
        )
    unknown = sorted(set(clusters) - {"3+", "2+", "1+"})
    if unknown:
        raise ValueError(f"unknown cluster levels {unknown}; expected '3+', '2+', '1+'")
    sizes = {k: _count(f"cluster size for {k!r}", v) for k, v in clusters.items()}
    out, stronger = {}, 0
    for level in ("3+", "2+", "1+"):  # a cluster at a level holds cells at it or stronger: a 3+ cluster is a 2+ one
        size = sizes.get(level, stronger)
        if size < stronger:
            raise ValueError(f"cluster sizes must not shrink to weaker levels (a cluster at a level is one at each weaker "
                             f"level too): {level!r} {size} < {stronger} at a stronger level")
        if size > cumulative[level]:
            raise ValueError(f"a cluster of {size} tumour cells at {level} or stronger, but the counts hold only "
                             f"{cumulative[level]} such cells")
        out[level] = stronger = size
    return out


def check_settings(guideline: str, specimen: str, *, isolated_intense_percent: float, gastric_reading: str) -> None:
    """Raise ValueError for settings apply_guideline cannot score with (checked before any tile is read), and
    for those that would have no effect under ``guideline``: the per-band reading (gastric only), an isolated
    floor other than the default (breast only)."""
    _known(guideline, gastric_reading)
    if specimen not in SPECIMENS:
        raise ValueError(f"unknown specimen {specimen!r}; choose one of {list(SPECIMENS)}")
    if specimen == "biopsy" and GUIDELINE_FAMILY[guideline] != "gastric":
        raise ValueError(
            f"specimen 'biopsy' has its own rule only for gastric; {guideline} scores biopsies "
            "and resections alike: use specimen='resection'"
        )
    if not 0 <= isolated_intense_percent <= 10:
        raise ValueError(f"isolated_intense_percent must be within 0-10 (% of tumour cells), got {isolated_intense_percent!r}")
    if isolated_intense_percent != ISOLATED_INTENSE_PERCENT and GUIDELINE_FAMILY[guideline] != "breast":
        raise ValueError(f"isolated_intense_percent is the floor of breast's 'intense complete in <=10%' pattern; "
                         f"{guideline} has no such pattern")


def apply_guideline(
    counts: Mapping[str, int],
    guideline: str,
    specimen: str = "resection",
    *,
    clusters: Mapping[str, int] | None = None,
    isolated_intense_percent: float = ISOLATED_INTENSE_PERCENT,
    gastric_reading: str = "cumulative",
) -> GuidelineCall:
    """Score one slide from tumour-cell counts per category (missing categories count 0).

    ``clusters`` (gastric biopsy only, required there; ignored otherwise): the largest cohesive
    cluster of tumour cells stained at "3+", "2+", "1+" or higher. ``isolated_intense_percent``
    (breast; 0-10 %): the noise floor of the "intense complete in <=10%" pattern (see
    ISOLATED_INTENSE_PERCENT). ``gastric_reading``: one of GASTRIC_READINGS.
    """
    check_settings(guideline, specimen, isolated_intense_percent=isolated_intense_percent, gastric_reading=gastric_reading)
    c = _validated(counts)
    if GUIDELINE_FAMILY[guideline] == "breast":
        score, level, flags, reason = _breast(c, guideline, isolated_intense_percent)
    else:
        score, level, flags, reason = _gastric(c, specimen, clusters, gastric_reading)
        if gastric_reading == "per_band" and (cumulative := _gastric(c, specimen, clusters, "cumulative")[0]) != score:
            reason += f"; the cumulative reading (the default: a stronger cell shows the weaker levels too) gives {cumulative}"
    stained = {k: sum(c[cat] for cat in cats) for k, cats in STAINED_AT_LEAST[GUIDELINE_FAMILY[guideline]].items()}
    percentages = {k: 100 * stained["1+" if k == "any" else k] / sum(c.values()) for k in _CUMULATIVE_KEYS}
    return GuidelineCall(score, level, flags, guideline, specimen, reason, h_score(c), percentages)


DIFFUSE_CYTOPLASM_OD = 0.06
"""log10 OD over unstained tissue (tumour.diffuse_cytoplasm_od: the stroma, the palest tenth of cells or
UNSTAINED_MAX_OD, the lowest) above which the cytoplasm of the tumour cells read unstained
shows diffuse cytoplasmic DAB. Measured: the real colon 0.03; generator fields of every class 0.02 or less
(48, plain and with real borders), held-out 3+ fields at 6 degrees of stain jitter up to 0.087 (cells misread
as unstained keep a 3+ cell's haze); a real Ki67 field auto-contrasted (1% clipped, tones kept) 0.17, a real
H&E with its eosin put on the DAB channel 0.12, both read 1+ or 2+ from cytoplasm between cells."""


def cytoplasm_doubt(blush: float | None, rise: float | None, filled: float | None) -> str | None:
    """The words that say where diffuse cytoplasmic DAB stands higher than the membranes read stand out, as
    tumour.with_cytoplasm_doubt weighs it (``blush``, ``rise``, ``filled``: log10 OD, result.json's staining
    diffuse_cytoplasm_od, membrane_contrast_od and stained_cytoplasm_od); None where it does not."""
    if blush is not None and blush >= DIFFUSE_CYTOPLASM_OD and (rise is None or rise < blush):
        return f"the tumour cells read unstained carry cytoplasmic DAB {blush:.2f} OD over unstained tissue"
    if filled is not None and filled >= DIFFUSE_CYTOPLASM_OD and rise is not None and rise < filled:
        return (f"the tumour cells read stained carry cytoplasmic DAB {filled:.2f} OD over unstained tissue, more than their "
                f"membranes stand out ({rise:.2f})")
    return None
