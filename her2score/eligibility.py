"""Eligibility rule sets (versioned TOML data files in ``rules/``) applied to a SlideResult.

Rule schema (top-level keys; ``[[require]]`` tables optional)::

    name = "her2-low-breast"         # required
    version = "1.0"                  # required
    description = "..."              # plain words
    reference = "..."                # trial / guideline citation
    guideline = "breast"             # expected scoring: "breast", "gastric", a guideline name, or "any"
    min_tumour_cells = 200           # optional: fewer scored tumour cells -> needs_review; default and
                                     #   floor: guidelines.MIN_TUMOUR_CELLS, the scoring QC's minimum
    eligible_levels = ["1+"]         # report levels ("0 (null)", "0+ (ultralow)") or scores ("0".."3+")
    ish_levels = ["2+"]              # levels decided by ISH (no ISH result -> needs_review)
    ish_eligible = "negative"        # the ISH result that makes an ish_levels slide eligible
    [[require]]                      # every table must hold, on eligible and ISH levels alike
    level = "2+"                     # cumulative, read one cell as the slide's guideline does
    min_percent = 50                 #   (guidelines.STAINED_AT_LEAST): "3+", "2+", "1+" or "any" (= "1+")
    inclusive = false                # false: > min_percent, true: >= min_percent

Precedence of ``check_eligibility``: doubts about the score itself (no score at all, failed QC, too
few tumour cells, a guideline other than the rule expects (the two breast versions count as one: they
differ only in 2023's split of 0), a plain 0 under a rule that answers null and ultralow differently,
CNN and classical scores disagreeing where the rule answers the scores from one to the other differently,
isolated intense cells that would change the answer if counted, a call too near a cut-off to be
sure of its side (guidelines.near_cutoff; for a gastric biopsy also a cluster one cell from the rule's 5,
guidelines.cluster_sides; for a breast 2+ that intense complete cells in <=10% make, those cells just over
the isolated-cell floor, guidelines.isolated_sides) whose level on the other side would change the answer,
an ultralow call whose staining false membranes alone could give where null would change the
answer, diffuse cytoplasmic DAB that may have been read as membranes where 0 would change the answer, an
ISH result that contradicts the IHC score (positive on a 0 or 1+, negative on a 3+), a ``[[require]]`` share counted on too few cells to be sure of its side of the bound where
the other side would change the answer) give needs_review whatever the score, since any answer
could change; the automatic answer is added as a reason (none for a slide that was not scored).
Otherwise an unmet ``[[require]]`` is not_eligible, an ISH level without an ISH result is
needs_review, and the level decides the rest. A level in neither list is not_eligible: no ISH
result can change it.
"""
from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from her2score.categories import CATEGORIES
from her2score.guidelines import (
    DOUBT_SIDES,
    FALSE_MEMBRANE_PERCENT,
    GUIDELINE_FAMILY,
    GUIDELINES,
    MIN_TUMOUR_CELLS,
    NEAR_CUTOFF_CONFIDENCE,
    NEAR_CUTOFF_POINTS,
    REPORT_LEVELS,
    ZERO_SPLIT,
    STAINED_AT_LEAST,
    apply_guideline,
    coarse_scan_zero,
    cytoplasm_doubt,
    edge_sides,
    moderate_incomplete,
    near_cutoff_settings,
    near_cutoff_sides,
    null_or_ultralow,
    percent_text,
    report_level,
    wilson_ci,
)
from her2score.results import SCORES, ZERO_LEVELS, SlideResult

__all__ = [
    "STATUSES",
    "ISH_RESULTS",
    "Requirement",
    "Rule",
    "RuleError",
    "Decision",
    "available_rules",
    "load_rule",
    "distinct_rules",
    "ish_result",
    "check_eligibility",
    "guideline_suits",
]

RULES_DIR = Path(__file__).with_name("rules")
STATUSES: tuple[str, ...] = ("eligible", "not_eligible", "needs_review")
ISH_RESULTS: tuple[str, ...] = ("positive", "negative")
"""The ISH results check_eligibility, 'check --ish' and evaluate's ish column take, in any case (ish_result)."""
_REQUIRE_LEVELS = ("3+", "2+", "1+", "any")
_REQUIRE_WORDS = {
    "breast": {"3+": "intense complete membrane staining",
               "2+": "complete membrane staining or the unusual 2+ pattern (lateral, or intense incomplete)"},
    "gastric": {"3+": "strong membrane staining (complete or lateral)",
                "2+": "weak-to-moderate or stronger membrane staining (complete or lateral)"},
}


class RuleError(ValueError):
    """An invalid rule file or rule value; the message names the file and the key."""


@dataclass(frozen=True)
class Requirement:
    """A minimum share of tumour cells stained at ``level`` or higher (cumulative), a cell read as the slide's
    guideline reads one (guidelines.STAINED_AT_LEAST)."""

    level: str
    min_percent: float
    inclusive: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.level, str) or self.level not in _REQUIRE_LEVELS:
            raise RuleError(f"require.level must be one of {list(_REQUIRE_LEVELS)}, got {self.level!r}")
        if isinstance(self.min_percent, bool) or not isinstance(self.min_percent, (int, float)) or not 0 <= self.min_percent <= 100:
            raise RuleError(f"require.min_percent must be a number within 0-100, got {self.min_percent!r}")
        if not isinstance(self.inclusive, bool):
            raise RuleError(f"require.inclusive must be true or false, got {self.inclusive!r}")
        if self.min_percent == 100 and not self.inclusive:
            raise RuleError("require: more than 100% (min_percent 100, inclusive false) can never be met")

    def bound(self) -> str:
        return f"{'>=' if self.inclusive else '>'}{self.min_percent:g}%"

    def cells(self, counts: dict[str, int], guideline: str) -> tuple[int, int]:
        """(tumour cells stained at ``level`` or higher under ``guideline``, all tumour cells)."""
        stained = STAINED_AT_LEAST[GUIDELINE_FAMILY[guideline]]["1+" if self.level == "any" else self.level]
        return sum(v for cat, v in counts.items() if cat in stained), sum(counts.values())

    def words(self, guideline: str) -> str:
        """What the cells counted show, in words, under ``guideline``."""
        return _REQUIRE_WORDS[GUIDELINE_FAMILY[guideline]].get(self.level, "any membrane staining")

    def met(self, counts: dict[str, int], guideline: str) -> tuple[bool, str]:
        """Whether the counts meet this requirement under ``guideline``, and the reason in words."""
        n, total = self.cells(counts, guideline)
        share, need = Fraction(100 * n, total or 1), Fraction(str(self.min_percent))
        ok = total > 0 and (share >= need if self.inclusive else share > need)
        words = f"{self.words(guideline)} in {percent_text(float(share), self.min_percent)} of tumour cells ({n}/{total})"
        return ok, f"{words}; rule needs {self.bound()}: {'met' if ok else 'not met'}"


@dataclass(frozen=True)
class Rule:
    """A named, versioned eligibility rule set; see the module docstring for the schema."""

    name: str
    version: str
    description: str = ""
    reference: str = ""
    guideline: str = "any"
    min_tumour_cells: int = MIN_TUMOUR_CELLS
    eligible_levels: tuple[str, ...] = ()
    ish_levels: tuple[str, ...] = ()
    ish_eligible: str | None = None
    require: tuple[Requirement, ...] = ()

    def __post_init__(self) -> None:
        for key in ("name", "version", "description", "reference", "guideline"):
            if not isinstance(getattr(self, key), str):
                raise RuleError(f"{key} must be a string, got {getattr(self, key)!r}")
        for key in ("name", "version"):
            if not getattr(self, key).strip():
                raise RuleError(f"{key} must not be empty")
        for key in ("eligible_levels", "ish_levels", "require"):
            value = getattr(self, key)
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
                raise RuleError(f"{key} must be a list, got {value!r}")
            object.__setattr__(self, key, tuple(value))
        if not all(isinstance(r, Requirement) for r in self.require):
            raise RuleError(f"require must hold Requirement values, got {self.require!r}")
        guidelines = tuple(dict.fromkeys(("any", *sorted(set(GUIDELINE_FAMILY.values())), *GUIDELINES)))  # "gastric" is both
        if self.guideline not in guidelines:
            raise RuleError(f"guideline must be one of {list(guidelines)}, got {self.guideline!r}")
        if isinstance(self.min_tumour_cells, bool) or not isinstance(self.min_tumour_cells, int):
            raise RuleError(f"min_tumour_cells must be a whole number, got {self.min_tumour_cells!r}")
        if self.min_tumour_cells < MIN_TUMOUR_CELLS:
            raise RuleError(
                f"min_tumour_cells must be >= {MIN_TUMOUR_CELLS} (the scoring minimum, "
                f"her2score.guidelines.MIN_TUMOUR_CELLS), got {self.min_tumour_cells}"
            )
        for key in ("eligible_levels", "ish_levels"):
            bad = [x for x in getattr(self, key) if x not in REPORT_LEVELS]
            if bad:
                raise RuleError(f"{key} has unknown levels {bad}; use some of {list(REPORT_LEVELS)}")
        suited = [g for g in GUIDELINES if guideline_suits(self.guideline, g)]
        for key in ("eligible_levels", "ish_levels"):
            if (split := [x for x in getattr(self, key) if x in ZERO_LEVELS]) and not ZERO_SPLIT & set(suited):
                raise RuleError(f"{key} has {split}, which {self.guideline} scoring never reports (it calls a plain \"0\", "
                                "null and ultralow alike): use \"0\"")
        if not self.eligible_levels and not self.ish_levels:
            raise RuleError("eligible_levels and ish_levels are both empty: nothing could be eligible")
        if both := _level_set(self.eligible_levels) & _level_set(self.ish_levels):
            raise RuleError(f"levels {sorted(both)} are in both eligible_levels and ish_levels (a \"0\" is any 0)")
        if self.ish_levels and self.ish_eligible not in ISH_RESULTS:
            raise RuleError(f"ish_levels need ish_eligible, the ISH result that makes them eligible: one of "
                            f"{list(ISH_RESULTS)}, got {self.ish_eligible!r}")
        if not self.ish_levels and self.ish_eligible is not None:
            raise RuleError(f"ish_eligible ({self.ish_eligible!r}) without ish_levels: no level awaits ISH")


def _level_set(levels: tuple[str, ...]) -> set[str]:
    """The report levels a rule's list names: a plain "0" is any 0 (it matches a score as well as a level)."""
    return {lv for x in levels for lv in (("0", *ZERO_LEVELS) if x == "0" else (x,))}


@dataclass(frozen=True)
class Decision:
    """An eligibility decision with the rule that made it and the reasons in words."""

    status: str
    rule: str
    rule_version: str
    reasons: tuple[str, ...]


_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "version": (str,),
    "description": (str,),
    "reference": (str,),
    "guideline": (str,),
    "min_tumour_cells": (int,),
    "eligible_levels": (list,),
    "ish_levels": (list,),
    "ish_eligible": (str,),
    "require": (list,),
}
_REQUIRE_TYPES: dict[str, tuple[type, ...]] = {"level": (str,), "min_percent": (int, float), "inclusive": (bool,)}


def _check_keys(table: dict[str, Any], types: dict[str, tuple[type, ...]], where: str) -> None:
    for key, value in table.items():
        if key not in types:
            raise RuleError(f"{where}unknown key {key!r}; allowed keys: {', '.join(types)}")
        allowed = types[key]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join(t.__name__ for t in allowed)
            raise RuleError(f"{where}key {key!r} must be {names}, got {type(value).__name__} {value!r}")


def _parse(data: dict[str, Any]) -> Rule:
    _check_keys(data, _TYPES, "")
    for key in ("name", "version"):
        if key not in data:
            raise RuleError(f"missing required key {key!r}")
    for key in ("eligible_levels", "ish_levels"):
        if not all(isinstance(x, str) for x in data.get(key, [])):
            raise RuleError(f"key {key!r} must be a list of strings")
    require = []
    for i, table in enumerate(data.get("require", [])):
        if not isinstance(table, dict):
            raise RuleError("key 'require' must be an array of tables ([[require]])")
        _check_keys(table, _REQUIRE_TYPES, f"require[{i}]: ")
        if "level" not in table or "min_percent" not in table:
            raise RuleError(f"require[{i}] needs both 'level' and 'min_percent'")
        require.append(Requirement(**table))
    fields = {k: tuple(v) if k in ("eligible_levels", "ish_levels") else v for k, v in data.items()}
    return Rule(**{**fields, "require": tuple(require)})


def available_rules() -> list[str]:
    """Names of the rule sets shipped with the package."""
    return sorted(p.stem for p in RULES_DIR.glob("*.toml"))


def _names_a_file(name_or_path: str | Path) -> bool:
    """Whether load_rule reads ``name_or_path`` as a file path: a Path, or text ending .toml (in any case), holding a
    folder ("rules/x", "./x") or with another suffix that names something on disk; else it is a shipped rule's name."""
    if not isinstance(name_or_path, str):
        return True
    path = Path(name_or_path)
    return path.suffix.lower() == ".toml" or path.name != name_or_path or (path.suffix != "" and path.exists())


def load_rule(name_or_path: str | Path) -> Rule:
    """A shipped rule by name, or a rule from a TOML file path (_names_a_file); RuleError names the file and why it
    is none (missing, a folder, unreadable, not TOML) or its bad key."""
    path = Path(name_or_path)
    shown = name_or_path if isinstance(name_or_path, str) else path  # as given: Path respells "./x" and "rules/"
    if not _names_a_file(name_or_path):
        if name_or_path not in available_rules():
            raise ValueError(
                f"unknown rule {name_or_path!r}; shipped rules: {', '.join(available_rules())} "
                "(or pass the path of a .toml rule file)"
            )
        path = shown = RULES_DIR / f"{name_or_path}.toml"
    try:
        rule = _parse(tomllib.loads(path.read_bytes().decode("utf-8-sig")))  # a Windows editor's byte-order mark is no TOML
        _not_a_shipped_name(rule, path)
        return rule
    except FileNotFoundError:
        from .slide import missing_reason

        shipped = f" (the shipped rule is named {path.stem}, without .toml)" if (
            path.name == str(shown) and path.suffix.lower() == ".toml" and path.stem in available_rules()) else ""
        raise RuleError(f"{shown}: {missing_reason(path, 'rule file')}{shipped}") from None
    except IsADirectoryError:
        raise RuleError(f"{shown}: is a folder, not a rule file") from None
    except OSError as e:  # no permission, a name too long
        raise RuleError(f"{shown}: cannot read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        must = "" if path.suffix.lower() == ".toml" else " (a rule file must be TOML)"
        raise RuleError(f"{shown}: invalid TOML{must}: {e}") from None
    except UnicodeDecodeError as e:
        raise RuleError(f"{shown}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RuleError as e:
        raise RuleError(f"{shown}: {e}") from None


def _not_a_shipped_name(rule: Rule, path: Path) -> None:
    """RuleError where ``rule``, read from ``path``, takes a shipped rule's name but is not that rule (a copy edited
    without a new name, which reports and evaluations would show as the shipped rule)."""
    shipped = RULES_DIR / f"{rule.name}.toml"
    if rule.name in available_rules() and path.resolve() != shipped.resolve() and rule != load_rule(rule.name):
        raise RuleError(f"name {rule.name!r} is a shipped rule's, but its definition differs from the shipped one: "
                        "give the changed rule a name of its own")


def distinct_rules(rules: list[Rule]) -> list[Rule]:
    """``rules`` with repeats of one rule left out; RuleError where two different rules share a name (decisions,
    evaluations and their columns are keyed by it)."""
    out: dict[str, Rule] = {}
    for rule in rules:
        if out.setdefault(rule.name, rule) != rule:
            raise RuleError(f"two different rules are named {rule.name!r} (version {out[rule.name].version} and "
                            f"{rule.version}): give each rule its own name")
    return list(out.values())


def _matches(levels: tuple[str, ...], result: SlideResult) -> bool:
    return result.level in levels or result.score in levels


def guideline_suits(expected: str, guideline: str) -> bool:
    """Whether a slide scored under ``guideline`` suits a rule that expects ``expected``: the breast versions
    score alike but for 2023's split of 0, which a plain 0 under a rule that tells them apart asks about
    (_plain_zero_doubt)."""
    family = GUIDELINE_FAMILY.get(guideline)
    return expected in ("any", guideline, family) or family == "breast" == GUIDELINE_FAMILY.get(expected)


def _decide(result: SlideResult, rule: Rule, ish: str | None) -> tuple[str, list[str]]:
    """The answer from the score, the requirements and ISH alone, with its reasons."""
    counts = {cat: result.counts.get(cat, 0) for cat in CATEGORIES}
    reasons = []
    for req in rule.require:
        ok, why = req.met(counts, result.guideline)
        reasons.append(why)
        if not ok:
            return "not_eligible", reasons
    level = result.level
    if _matches(rule.ish_levels, result):
        if ish is None:
            return "needs_review", [*reasons, f"{level} awaits ISH: eligible only if ISH is {rule.ish_eligible}"]
        status = "eligible" if ish == rule.ish_eligible else "not_eligible"
        return status, [*reasons, f"{level} with ISH {ish}; the rule needs ISH {rule.ish_eligible}"]
    if ish is not None and _ish_doubt(result, ish) is None:  # a discordant one is a doubt, said there
        reasons.append(f"ISH result ({ish}) not used: the rule decides {level} on IHC alone")
    allowed = ", ".join(rule.eligible_levels + tuple(f"{x} with ISH {rule.ish_eligible}" for x in rule.ish_levels))
    if _matches(rule.eligible_levels, result):
        return "eligible", [*reasons, f"{level} is an eligible level (eligible: {allowed})"]
    return "not_eligible", [*reasons, f"{level} is not an eligible level (eligible: {allowed})"]


def _other_answer(result: SlideResult, rule: Rule, ish: str | None, status: str, score: str, level: str) -> str | None:
    """The answer, in words, had the slide been scored ``score`` at ``level``; None when it is ``status`` again."""
    other, _ = _decide(replace(result, score=score, level=level), rule, ish)
    return None if other == status else other.replace("_", " ")


def _doubt_at(result: SlideResult, rule: Rule, ish: str | None, status: str, score: str, level: str, why: str) -> str | None:
    """``why``, and the answer the slide would have at ``score`` / ``level`` where it differs from ``status``; None
    where it does not (the doubt changes nothing)."""
    other = _other_answer(result, rule, ish, status, score, level)
    return None if other is None else f"{why}: at {level} the answer would be {other}"


def _isolated_doubt(result: SlideResult, rule: Rule, ish: str | None, status: str) -> str | None:
    """Why the slide needs review when its isolated intense cells, counted as a population, would
    change the answer; None when they would not (or the slide has none)."""
    if "isolated_intense_cells" not in (*result.flags, *result.classical_flags):  # a fused call may not repeat it
        return None
    counted = apply_guideline(result.counts, result.guideline, result.specimen, clusters=result.clusters,
                              isolated_intense_percent=0)
    if (other := _other_answer(result, rule, ish, status, counted.score, counted.level)) is None:
        return None
    n, total = result.counts.get("strong_complete", 0), result.tumour_cells
    return (f"isolated intense cells ({n:,} of {total:,}) were counted as stained complete cells, not as the 'intense "
            f"complete staining in <=10%' pattern; as that pattern they would make the slide {counted.level} and the answer {other}")


def _levels_guideline(result: SlideResult) -> str:
    """The guideline whose report levels a doubt's other side is named by: for breast, ASCO/CAP 2023, whose
    split of 0 into null and ultralow the counts decide (2018 scores alike but calls both plain 0)."""
    return "breast-asco-cap-2023" if GUIDELINE_FAMILY.get(result.guideline) == "breast" else result.guideline


def _near_cutoff_doubt(result: SlideResult, rule: Rule, ish: str | None, status: str) -> str | None:
    """Why the slide needs review when its call sits too near a cut-off to be sure of its side and a
    level on the other side would change the answer; None otherwise (see guidelines.near_cutoff_sides)."""
    settings = near_cutoff_settings(result.guideline, result.specimen, result.clusters, result.config)  # the slide's own
    reading, floor = settings["gastric_reading"], settings["isolated_intense_percent"]
    sides = near_cutoff_sides(result.counts, result.classical_score, **settings)
    if result.score != result.classical_score:  # a fused score: its own sides on the cells measured too
        sides = sorted({*sides, *near_cutoff_sides(result.counts, result.score, **settings)},
                       key=lambda side: (abs(side[1] - 10.0), SCORES.index(side[0])))  # ties in score order, not a set's
    named_by = _levels_guideline(result)
    for other_score, pct in sides:
        level = report_level(other_score, named_by, result.counts, across_cutoff=True)
        why = f"{percent_text(pct)} of {result.tumour_cells:,} tumour cells decide the call, too near the 10% cut-off to be sure of its side"
        if (doubt := _doubt_at(result, rule, ish, status, other_score, level, why)) is not None:
            return doubt
    edges = edge_sides(result.counts, result.classical_score, guideline=named_by, specimen=result.specimen,
                       clusters=result.clusters, gastric_reading=reading, isolated_intense_percent=floor)
    for words, other_score, level, _ in edges:
        if (doubt := _doubt_at(result, rule, ish, status, other_score, level, words)) is not None:
            return doubt
    return None


def _plain_zero_doubt(result: SlideResult, rule: Rule, ish: str | None) -> str | None:
    """Why the slide needs review when it was scored a plain 0 (a guideline that does not tell 0 (null)
    from 0+ (ultralow)) and the rule answers those two differently; None otherwise."""
    if result.level != "0":
        return None
    answers = {level: _decide(replace(result, level=level), rule, ish)[0] for level in ZERO_LEVELS}
    if len(set(answers.values())) == 1:
        return None
    if result.guideline in ZERO_SPLIT:  # a 0 not made by the rules (the CNN's) over cells more than 10% stained
        stained = 100 * (1 - result.counts.get("none", 0) / max(result.tumour_cells, 1))
        why = f"scored 0 over tumour cells {percent_text(stained)} stained, which is neither 0 (null) nor 0+ (ultralow)"
    else:
        why = f"scored a plain 0 under {result.guideline}, which does not tell 0 (null) from 0+ (ultralow)"
    return why + "; the rule answers " + " and ".join(f"{answer.replace('_', ' ')} at {level}" for level, answer in answers.items())


def _requirement_doubt(result: SlideResult, rule: Rule, ish: str | None, status: str) -> str | None:
    """Why the slide needs review when ``[[require]]`` shares too near the rule's bound to be sure of their side
    (within the measurement's own NEAR_CUTOFF_POINTS of it, as a share near 10% is: a review found generator
    resections' 2+ share read 2.2-4.2 points high at 50%, and 51.7% of 4,236 cells answered a 48%
    field eligible; or, counted on few cells, their NEAR_CUTOFF_CONFIDENCE Wilson interval reaching across it) could
    give another answer: an unsure met one unmet (not eligible), or every unmet one, all unsure, met (what the rest
    of the rule gives); None otherwise."""
    counts = {cat: result.counts.get(cat, 0) for cat in CATEGORIES}
    points = result.config.get("near_cutoff_points", NEAR_CUTOFF_POINTS)  # the slide's own margin
    unsure, met, words = set(), {}, []
    for req in rule.require:
        n, total = req.cells(counts, result.guideline)
        met[req] = req.met(counts, result.guideline)[0]
        if total:
            lo, hi = (100.0 * v for v in wilson_ci(n, total, NEAR_CUTOFF_CONFIDENCE))
            cut, share = req.min_percent, 100 * n / total
            crosses, near = lo < cut < hi, abs(share - cut) < points
            if crosses or near:
                unsure.add(req)
                why = (f"its {NEAR_CUTOFF_CONFIDENCE:.0%} interval {percent_text(lo, cut)[:-1]}-{percent_text(hi, cut)} reaches "
                       "across" if crosses else f"within the measurement's {points:g} points of")
                words.append(f"{req.words(result.guideline)} in {percent_text(share, cut)} of {total:,} tumour cells: {why} "
                             f"the rule's {req.bound()}")
    others = {"not_eligible"} if any(met[r] for r in unsure) else set()
    unmet = [r for r in rule.require if not met[r]]
    if unmet and set(unmet) <= unsure:
        others.add(_decide(result, replace(rule, require=tuple(r for r in rule.require if met[r])), ish)[0])
    changed = sorted(o for o in others if o != status)
    if not changed:
        return None
    return "; ".join(words) + f": the answer could be {' or '.join(o.replace('_', ' ') for o in changed)}"


def _disagreement_doubt(result: SlideResult, rule: Rule, ish: str | None) -> str | None:
    """Why the slide needs review when its classical and CNN scores disagree and the rule answers some score
    from the one to the other differently (a 0 there as null or ultralow, but a classical 0 at the level its
    cells gave); None when they agree or every such score gets the same answer (0 against 1+ under a rule
    for HER2-positive, 0+ (ultralow) against 1+ under one for HER2-ultralow)."""
    a, b = result.classical_score, result.cnn_score
    if a is None or b is None or a == b:
        return None
    lo, hi = sorted((SCORES.index(a), SCORES.index(b)))
    known = result.classical_level if a == "0" and result.classical_level in ZERO_LEVELS else None  # the cells tell null from ultralow
    levels = [(s, lv) for s in SCORES[lo : hi + 1] for lv in ((known,) if s == a and known else ZERO_LEVELS if s == "0" else (s,))]
    answers = sorted({_decide(replace(result, score=s, level=lv), rule, ish)[0] for s, lv in levels})
    if len(answers) == 1:
        return None
    words = result.classical_level if result.classical_level and result.classical_level.startswith(a) else a
    return (f"classical score {words} and CNN score {b} disagree, and the rule answers "
            f"{_either([x.replace('_', ' ') for x in answers])} between them")


def _null_doubt(result: SlideResult, rule: Rule, ish: str | None, status: str) -> str | None:
    """Why the slide needs review when its ultralow staining is no more than real unstained membranes read, within
    its 95% interval (guidelines.with_null_doubt's test, which flags null_or_ultralow, read from the counts) and 0
    (null) would change the answer; None otherwise."""
    percent = result.config.get("false_membrane_percent", FALSE_MEMBRANE_PERCENT)  # the slide's own, as its flag weighed it
    if (pct := null_or_ultralow(result.counts, result.level, percent=percent, confidence=NEAR_CUTOFF_CONFIDENCE)) is None:
        return None
    return _doubt_at(result, rule, ish, status, "0", "0 (null)",
                     f"{percent_text(pct, percent)} of tumour cells stained, no more than real unstained membranes read")


def _coarse_doubt(result: SlideResult, rule: Rule, ish: str | None, status: str) -> str | None:
    """Why the slide needs review when its 0 rests on a scan too coarse for faint membranes (guidelines.coarse_scan_zero,
    which flags coarse_scan_zero) and 1+ would change the answer; None otherwise."""
    if not coarse_scan_zero(result.level, result.mpp):
        return None
    side = DOUBT_SIDES["coarse_scan_zero"]
    return _doubt_at(result, rule, ish, status, side, side, f"scanned at {result.mpp:.3g} µm/px, too coarse for faint "
                                                            "membranes, which read weaker and fewer there")


def _incomplete_doubt(result: SlideResult, rule: Rule, ish: str | None, status: str) -> str | None:
    """Why the slide needs review when its breast 1+ rests on weak-to-moderate incomplete membranes, which
    the 2018 note would call equivocal 2+ where they are moderate (guidelines.moderate_incomplete, which flags
    moderate_incomplete, read from the counts), and 2+ would change the answer; None otherwise."""
    if (pct := moderate_incomplete(result.counts, result.level, result.guideline)) is None:
        return None
    side = DOUBT_SIDES["moderate_incomplete"]
    return _doubt_at(result, rule, ish, status, side, side, f"{percent_text(pct)} of tumour cells show membranes stronger "
                     "than faint, weak-to-moderate incomplete ones among them, which ASCO/CAP's 2018 note calls equivocal "
                     "where moderate (weak and moderate are one band here)")


def _cytoplasm_doubt(result: SlideResult, rule: Rule, ish: str | None, status: str) -> str | None:
    """Why the slide needs review when its stain fills the tumour cells' cytoplasm (flag cytoplasmic_dab), so that
    the membranes read may be cytoplasm and the slide any lower level, 0 with no membrane staining among them, and
    one of those would change the answer; it quotes the measurement that raised the flag. None otherwise."""
    if "cytoplasmic_dab" not in result.flags or result.score not in SCORES:
        return None
    zeros = ZERO_LEVELS if _levels_guideline(result) in ZERO_SPLIT else ("0",)
    lower = [("0", "0 (null)")] if result.score == "0" else [  # a 0+ (ultralow) could be 0 (null)
        *(("0", z) for z in zeros), *((s, s) for s in SCORES[1:SCORES.index(result.score)])]
    answers: dict[str, list[str]] = {}
    for score, level in lower:
        if (other := _other_answer(result, rule, ish, status, score, level)) is not None:
            answers.setdefault(other, []).append(level)
    if not answers:
        return None
    def measured(key: str) -> float | None:  # None where a result.json edited by hand holds no number
        value = result.staining.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    words = cytoplasm_doubt(measured("diffuse_cytoplasm_od"), measured("membrane_contrast_od"), measured("stained_cytoplasm_od"))
    at = "; ".join(f"at {_either(levels)} the answer would be {other}" for other, levels in answers.items())
    return f"diffuse cytoplasmic DAB may have been read as membrane staining{f' ({words})' if words else ''}: {at}"


def _either(answers: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return " or ".join([", ".join(answers[:-1]), answers[-1]] if len(answers) > 2 else answers)


def _ish_doubt(result: SlideResult, ish: str | None) -> str | None:
    """Why the slide needs review when its ISH result contradicts its IHC score: ISH positive on a 0 or 1+, ISH
    negative on a 3+ (both guidelines reflex ISH only on a 2+; a discordant pair is a pathologist's to reconcile:
    under breast an ISH-positive case is HER2-positive whatever its IHC, under gastric HER2-positive is IHC 3+
    or 2+ with ISH positive); None otherwise."""
    if ish == "positive" and result.score in ("0", "1+"):
        why = ("the gastric rules read ISH only on a 2+: HER2-positive is IHC 3+, or 2+ with ISH positive"
               if GUIDELINE_FAMILY[result.guideline] == "gastric" else
               "an ISH-positive case is HER2-positive whatever its IHC score")
        return (f"ISH positive contradicts IHC {result.level}: a discordant pair to reconcile ({why}; recheck the IHC "
                "for heterogeneity and the ISH)")
    if ish == "negative" and result.score == "3+":
        return ("ISH negative contradicts IHC 3+: a discordant pair to reconcile (an IHC 3+ is HER2-positive "
                "without ISH; recheck the IHC for artefact and the ISH)")
    return None


def ish_result(value: str | None) -> str | None:
    """``value`` as one of ISH_RESULTS, read in any case and without the blanks around it; None for None (ISH not
    done). ValueError naming the accepted values for anything else."""
    if value is None:
        return None
    ish = value.strip().lower() if isinstance(value, str) else value
    if ish not in ISH_RESULTS:
        raise ValueError(f"ish must be one of {list(ISH_RESULTS)} (any case), got {value!r}")
    return ish


def check_eligibility(result: SlideResult | str | os.PathLike | Mapping, rule: str | Path | Rule, *,
                      ish: str | None = None) -> Decision:
    """Decide eligibility of one slide under a rule (a shipped name, a TOML path or a Rule).

    ``result``: a SlideResult, a result.json's path (SlideResult.read) or its loaded dict (SlideResult.from_dict).
    ``ish``: "positive" or "negative" (ISH_RESULTS, in any case: ish_result) or None (not done yet). See the module
    docstring for precedence.
    """
    if not isinstance(result, SlideResult):
        result = SlideResult.from_dict(dict(result)) if isinstance(result, Mapping) else SlideResult.read(result)
    rule = rule if isinstance(rule, Rule) else load_rule(rule)
    ish = ish_result(ish)
    doubts = []
    if failed := [f.message for f in result.qc if f.severity == "fail"]:
        doubts.append(f"failed QC: {'; '.join(failed)}")
    if result.tumour_cells < rule.min_tumour_cells:
        doubts.append(f"too few tumour cells: {result.tumour_cells} scored, the rule needs >= {rule.min_tumour_cells}")
    if not guideline_suits(rule.guideline, result.guideline):
        doubts.append(f"the rule expects {rule.guideline} scoring; the slide was scored under {result.guideline}")
    if (split := _disagreement_doubt(result, rule, ish)) is not None:
        doubts.append(split)
    if result.score is None:  # no score, no automatic answer to add
        return Decision("needs_review", rule.name, rule.version, (f"not scored: {result.reason}", *doubts))
    status, reasons = _decide(result, rule, ish)
    if (discordant := _ish_doubt(result, ish)) is not None:
        doubts.append(discordant)
    if (zero := _plain_zero_doubt(result, rule, ish)) is not None:
        doubts.append(zero)
    if (isolated := _isolated_doubt(result, rule, ish, status)) is not None:
        doubts.append(isolated)
    if (near := _near_cutoff_doubt(result, rule, ish, status)) is not None:
        doubts.append(near)
    if (null := _null_doubt(result, rule, ish, status)) is not None:
        doubts.append(null)
    if (incomplete := _incomplete_doubt(result, rule, ish, status)) is not None:
        doubts.append(incomplete)
    if (coarse := _coarse_doubt(result, rule, ish, status)) is not None:
        doubts.append(coarse)
    if (cytoplasm := _cytoplasm_doubt(result, rule, ish, status)) is not None:
        doubts.append(cytoplasm)
    if (short := _requirement_doubt(result, rule, ish, status)) is not None:
        doubts.append(short)
    reasons.insert(0, f"scored {result.level} under {result.guideline} ({result.specimen}): {result.reason}")
    reasons += [f"QC warning: {f.message}" for f in result.qc if f.severity == "warn"]
    if doubts:
        reasons.append("without these doubts it would still need review" if status == "needs_review"
                       else f"without these doubts the answer would be: {status.replace('_', ' ')}")
        return Decision("needs_review", rule.name, rule.version, (*doubts, *reasons))
    return Decision(status, rule.name, rule.version, tuple(reasons))
