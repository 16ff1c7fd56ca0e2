"""Eligibility rule sets on constructed SlideResults: shipped rules, ISH, review reasons, rule files."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from her2score.eligibility import Requirement, Rule, RuleError, available_rules, check_eligibility, load_rule
from her2score.guidelines import MIN_TUMOUR_CELLS, apply_guideline, report_level
from her2score.results import CnnReport, QCFinding, SlideResult

SHIPPED = {
    "her2-positive-breast",
    "her2-low-breast",
    "her2-ultralow-breast",
    "gastric-toga",
    "t-dxd-tumour-agnostic",
    "car-t-her2",
}


def make_result(
    guideline: str = "breast-asco-cap-2023",
    *,
    qc: tuple[QCFinding, ...] = (),
    cnn: str | None = None,
    **counts: int,
) -> SlideResult:
    """A SlideResult whose score fields come from apply_guideline over ``counts``."""
    call = apply_guideline(counts, guideline)
    total = sum(counts.values())
    return SlideResult(
        slide="s.tif", score=call.score, level=call.level, flags=call.flags, guideline=guideline,
        specimen=call.specimen, reason=call.reason, counts=dict(counts),
        percentages={k: 100 * v / total for k, v in counts.items()}, tumour_cells=total,
        h_score=call.h_score, clusters={}, region="annotation", qc=qc, stains={}, mpp=0.5,
        tissue_area_mm2=1.0, classical_score=call.score,
        cnn=CnnReport(cnn, {}, 10, "test") if cnn else None,
    )


NULL = dict(none=200)
ULTRALOW = dict(none=196, faint_partial=4)  # 2%: far enough from 10% not to be near its cut-off, but could be null
CLEAR_ULTRALOW = dict(none=9_100, faint_partial=900)  # 9%: more than false membranes read (8%), even at its interval's low end
ONE = dict(none=150, faint_partial=50)
TWO = dict(none=140, weak_moderate_complete=60)
THREE = dict(none=100, strong_complete=100)
ZERO = dict(none=200)
THREE_ONLY = Rule(name="3+ only", version="1.0", guideline="breast", eligible_levels=("3+",))
"""A breast rule that reads 3+ alone and no ISH (the shipped tumour-agnostic one expects gastric scoring)."""


def test_available_rules():
    assert set(available_rules()) == SHIPPED
    for name in SHIPPED:
        rule = load_rule(name)
        assert rule.name == name and rule.version and rule.reference


def test_one_minimum_tumour_cell_count_for_qc_and_rules():
    from her2score.eligibility import RULES_DIR
    from her2score.pipeline import ScoringConfig

    assert MIN_TUMOUR_CELLS == 100 and ScoringConfig().min_tumour_cells == MIN_TUMOUR_CELLS
    for name in SHIPPED:
        assert load_rule(name).min_tumour_cells == MIN_TUMOUR_CELLS
        assert "min_tumour_cells" not in (RULES_DIR / f"{name}.toml").read_text()  # never restated
    with pytest.raises(RuleError, match="min_tumour_cells must be >= 100"):
        Rule(name="x", version="1", eligible_levels=("3+",), min_tumour_cells=50)
    stricter = Rule(name="x", version="1", eligible_levels=("3+",), min_tumour_cells=300)
    assert check_eligibility(make_result(none=99, strong_complete=200), stricter).status == "needs_review"
    assert check_eligibility(make_result("gastric", none=100, strong_complete=200), "t-dxd-tumour-agnostic").status == "eligible"


@pytest.mark.parametrize(
    ("rule", "counts", "ish", "status"),
    [
        ("her2-positive-breast", THREE, None, "eligible"),
        ("her2-positive-breast", TWO, None, "needs_review"),
        ("her2-positive-breast", TWO, "positive", "eligible"),
        ("her2-positive-breast", TWO, "negative", "not_eligible"),
        ("her2-positive-breast", ONE, None, "not_eligible"),
        ("her2-positive-breast", NULL, None, "not_eligible"),
        ("her2-low-breast", ONE, None, "eligible"),
        ("her2-low-breast", TWO, None, "needs_review"),
        ("her2-low-breast", TWO, "negative", "eligible"),
        ("her2-low-breast", TWO, "positive", "not_eligible"),
        ("her2-low-breast", THREE, None, "not_eligible"),
        ("her2-low-breast", ULTRALOW, None, "not_eligible"),
        ("her2-low-breast", NULL, None, "not_eligible"),
        ("her2-ultralow-breast", CLEAR_ULTRALOW, None, "eligible"),  # ultralow or, near the cut-off, 1+: eligible
        ("her2-ultralow-breast", ULTRALOW, None, "needs_review"),  # 2% stained could be false membranes: null
        ("her2-ultralow-breast", ONE, None, "eligible"),
        ("her2-ultralow-breast", TWO, "negative", "eligible"),
        ("her2-ultralow-breast", NULL, None, "not_eligible"),
        ("her2-ultralow-breast", THREE, None, "not_eligible"),
        (THREE_ONLY, THREE, None, "eligible"),
        (THREE_ONLY, TWO, None, "not_eligible"),  # no ISH can change it
        (THREE_ONLY, TWO, "positive", "not_eligible"),
    ],
)
def test_breast_rules(rule, counts, ish, status):
    decision = check_eligibility(make_result(**counts), rule, ish=ish)
    assert decision.status == status, decision.reasons
    assert decision.rule == getattr(rule, "name", rule) and decision.rule_version == "1.0"


@pytest.mark.parametrize(
    ("counts", "ish", "status"),
    [
        (dict(none=80, strong_lateral=20), None, "eligible"),  # lateral 3+
        (dict(none=90, strong_lateral=10), None, "needs_review"),  # at exactly 10%: near its cut-off, 2+ awaits ISH
        (dict(none=80, weak_moderate_lateral=20), None, "needs_review"),
        (dict(none=80, weak_moderate_lateral=20), "positive", "eligible"),
        (dict(none=90, faint_partial=10), "negative", "not_eligible"),
        (dict(none=90, faint_partial=10), "positive", "needs_review"),  # IHC 1+ with ISH positive: discordant
    ],
)
def test_gastric_toga(counts, ish, status):
    counts = {k: 10 * v for k, v in counts.items()}
    assert check_eligibility(make_result("gastric", **counts), "gastric-toga", ish=ish).status == status


@pytest.mark.parametrize(
    ("counts", "scale", "status", "words"),
    [
        (dict(none=40, weak_moderate_lateral=35, strong_complete=25), 200, "eligible", "60.0%"),
        (dict(none=49, weak_moderate_lateral=30, strong_complete=21), 200, "needs_review", "51.0%"),  # within 5.5 points
        (dict(none=40, faint_partial=20, strong_lateral=40), 2, "not_eligible", "40.0%"),  # faint cells don't count
        # exactly 50% is not > 50%, but no count can tell it from just over: review
        (dict(none=50, weak_moderate_lateral=30, strong_complete=20), 200, "needs_review", "50.0%"),
    ],
)
def test_car_t_fraction_rule(counts, scale, status, words):
    decision = check_eligibility(make_result("gastric", **{k: scale * v for k, v in counts.items()}), "car-t-her2")
    assert decision.status == status, decision.reasons
    assert any(words in r and ">50%" in r for r in decision.reasons)


def test_a_required_share_counted_on_few_cells_needs_review_only_where_its_interval_crosses_the_bound():
    """55% of 100 tumour cells (45.2-64.4%) may lie under car-t-her2's >50%; 55% of 10,000 (54.0-56.0%) may not."""
    few = check_eligibility(make_result("gastric", none=45, weak_moderate_complete=55), "car-t-her2")
    assert few.status == "needs_review", few.reasons
    assert few.reasons[0] == ("weak-to-moderate or stronger membrane staining (complete or lateral) in 55.0% of 100 tumour "
                              "cells: its 95% interval 45.2-64.4% reaches across the rule's >50%: the answer could be not "
                              "eligible")
    assert "without these doubts the answer would be: eligible" in few.reasons
    many = check_eligibility(make_result("gastric", none=4400, weak_moderate_complete=5600), "car-t-her2")  # 55.0-57.0%
    assert many.status == "eligible", many.reasons
    # under the bound, the other side is what the rest of the rule gives: 2+ is an eligible level
    under = check_eligibility(make_result("gastric", none=55, weak_moderate_complete=45), "car-t-her2")
    assert under.status == "needs_review" and under.reasons[0].endswith("the answer could be eligible"), under.reasons
    assert check_eligibility(make_result("gastric", none=6000, weak_moderate_complete=4000), "car-t-her2").status == "not_eligible"


def test_a_required_share_within_the_measurements_margin_of_its_bound_needs_review_on_any_number_of_cells():
    """A review read generator resections' 2+ share 2.2-4.2 points high near 50%: 51.7% of 4,236 cells (48.4% as a
    pathologist would see it) answered car-t-her2 eligible, and 51% of 10,000 cells too, neither reviewed. A share
    within the measurement's own 5.5 points of the bound (as near 10%) is unsure however many cells it counts."""
    near = check_eligibility(make_result("gastric", none=4900, weak_moderate_complete=5100), "car-t-her2")
    assert near.status == "needs_review" and near.reasons[0] == (
        "weak-to-moderate or stronger membrane staining (complete or lateral) in 51.0% of 10,000 tumour cells: within the "
        "measurement's 5.5 points of the rule's >50%: the answer could be not eligible"), near.reasons
    under = check_eligibility(make_result("gastric", none=5100, weak_moderate_complete=4900), "car-t-her2")
    assert under.status == "needs_review" and under.reasons[0].endswith("the answer could be eligible")
    assert check_eligibility(make_result("gastric", none=4400, weak_moderate_complete=5600), "car-t-her2").status == "eligible"
    assert check_eligibility(make_result("gastric", none=5600, weak_moderate_complete=4400), "car-t-her2").status == "not_eligible"


def test_several_unsure_requirements_are_weighed_together():
    """Two unmet requirements, each unsure: met together, they would make the slide eligible."""
    two = Rule(name="two", version="1", guideline="gastric", eligible_levels=("2+", "3+"),
               require=(Requirement("2+", 50), Requirement("3+", 30)))
    counts = dict(none=55, weak_moderate_complete=20, strong_complete=25)  # 45% (35.6-54.8), 25% (17.5-34.3)
    doubt = check_eligibility(make_result("gastric", **counts), two)
    assert doubt.status == "needs_review" and doubt.reasons[0].endswith("the answer could be eligible"), doubt.reasons
    sure = dict(none=55, weak_moderate_complete=35, strong_complete=10)  # the 3+ share, 10% (5.5-17.4), cannot reach 30%
    assert check_eligibility(make_result("gastric", **sure), two).status == "not_eligible"


def test_ish_not_used_at_other_levels_is_said():
    decision = check_eligibility(make_result(**ONE), "her2-low-breast", ish="negative")
    assert decision.status == "eligible"
    assert any("not used" in r for r in decision.reasons)


@pytest.mark.parametrize(("counts", "ish"), [(THREE, "negative"), (ONE, "positive"), (ZERO, "positive")])
def test_an_ish_result_that_contradicts_the_ihc_score_is_reviewed(counts, ish):
    """A 3+ with ISH negative, a 1+ or 0 with ISH positive: the rule answered on IHC alone ("ISH result not
    used"), eligible or not; a discordant pair is a pathologist's to reconcile (an ISH-positive case is
    HER2-positive whatever its IHC score). The rule's own answer stays among the reasons."""
    for rule in ("her2-positive-breast", "her2-low-breast"):
        decision = check_eligibility(make_result(**counts), rule, ish=ish)
        assert decision.status == "needs_review", decision.reasons
        assert decision.reasons[0].startswith(f"ISH {ish} contradicts IHC "), decision.reasons
        assert any(r.startswith("without these doubts the answer would be") for r in decision.reasons)


def test_awaiting_ish_reason():
    decision = check_eligibility(make_result(**TWO), "her2-positive-breast")
    assert any("awaits ISH" in r for r in decision.reasons)


def test_too_few_tumour_cells():
    decision = check_eligibility(make_result(none=10, strong_complete=40), "her2-positive-breast")
    assert decision.status == "needs_review"
    assert decision.reasons[0] == "too few tumour cells: 50 scored, the rule needs >= 100"
    assert "eligible" in decision.reasons[-1]  # the automatic answer is still given


def test_failed_qc_always_needs_review():
    qc = (
        QCFinding("blur", "fail", "slide out of focus"),
        QCFinding("stain", "fail", "H&E stain, not IHC"),
        QCFinding("fold", "warn", "tissue fold"),
    )
    decision = check_eligibility(make_result(qc=qc, **NULL), "her2-positive-breast")
    assert decision.status == "needs_review"
    assert decision.reasons[0] == "failed QC: slide out of focus; H&E stain, not IHC"
    assert "QC warning: tissue fold" in decision.reasons
    warn_only = check_eligibility(make_result(qc=qc[2:], **NULL), "her2-positive-breast")
    assert warn_only.status == "not_eligible"


def test_cnn_disagreement():
    disagree = check_eligibility(make_result(cnn="2+", **THREE), "her2-positive-breast")
    assert disagree.status == "needs_review"
    assert "classical score 3+ and CNN score 2+ disagree, and the rule answers eligible or needs review between them" in disagree.reasons
    assert check_eligibility(make_result(cnn="3+", **THREE), "her2-positive-breast").status == "eligible"
    # a disagreement the rule answers alike on both sides (and between) is no doubt: 0 and 1+ are not HER2-positive
    assert check_eligibility(make_result(cnn="1+", **NULL), "her2-positive-breast").status == "not_eligible"
    low = check_eligibility(make_result(cnn="1+", **NULL), "her2-low-breast")
    assert low.status == "needs_review" and any("classical score 0 and CNN score 1+ disagree" in r for r in low.reasons)
    ultralow = replace(make_result(cnn="1+", none=190, faint_partial=10), classical_level="0+ (ultralow)")
    assert any(r.startswith("classical score 0+ (ultralow) and CNN score 1+ disagree")  # the level the reason names
               for r in check_eligibility(ultralow, "her2-low-breast").reasons)
    # the classical 0's level is known from its cells: 0+ (ultralow) and 1+ are both HER2-ultralow-eligible, 0 (null) is not
    assert not any("disagree" in r for r in check_eligibility(ultralow, "her2-ultralow-breast").reasons)
    null = replace(make_result(cnn="1+", **NULL), classical_level="0 (null)")
    assert any(r.startswith("classical score 0 (null) and CNN score 1+ disagree, and the rule answers eligible or not "
                            "eligible") for r in check_eligibility(null, "her2-ultralow-breast").reasons)
    # 1+ against 3+ passes 2+, which awaits ISH under the HER2-positive rule
    assert check_eligibility(make_result(cnn="3+", **ONE), "her2-positive-breast").status == "needs_review"


def test_a_cnn_zero_over_stained_cells_is_neither_null_nor_ultralow():
    """A fused 0 where the cells measured give 1+ (20% faint): level plain 0, which the ultralow rule
    cannot answer (null and ultralow answer differently): review, saying why; it survives result.json."""
    classical = make_result(cnn="0", **ONE)
    fused = replace(classical, score="0", level=report_level("0", classical.guideline, classical.counts), flags=())
    assert fused.level == "0"
    d = check_eligibility(fused, "her2-ultralow-breast")
    assert d.status == "needs_review"
    assert any("scored 0 over tumour cells 25.0% stained, which is neither 0 (null) nor 0+ (ultralow)" in r for r in d.reasons), d.reasons
    assert SlideResult.from_dict(fused.to_dict()).level == "0"
    with pytest.raises(ValueError, match="is not a level of"):  # the classical call's own 0 is always null or ultralow
        SlideResult.from_dict(replace(fused, classical_score="0", classical_level="0").to_dict())


def test_guideline_mismatch():
    gastric = check_eligibility(make_result("gastric", **THREE), "her2-positive-breast")
    assert gastric.status == "needs_review" and "expects breast scoring" in gastric.reasons[0]
    old = check_eligibility(make_result("breast-asco-cap-2018", **ULTRALOW), "her2-ultralow-breast")
    assert old.status == "needs_review" and "plain 0 under breast-asco-cap-2018" in old.reasons[0]
    for counts, status in ((ONE, "eligible"), (THREE, "not_eligible")):  # 2018 and 2023 score 1+ and 3+ alike
        assert check_eligibility(make_result("breast-asco-cap-2018", **counts), "her2-ultralow-breast").status == status
    anywhere = check_eligibility(make_result("gastric", **THREE), "t-dxd-tumour-agnostic")
    assert anywhere.status == "eligible"
    # DESTINY-PanTumor02 scored every site by the gastric criteria, under which strong lateral staining is 3+ and
    # breast's is an unusual 2+: a breast scoring is no answer for a tumour-agnostic indication
    for counts in (THREE, dict(none=100, strong_lateral=100)):
        breast = check_eligibility(make_result(**counts), "t-dxd-tumour-agnostic")
        assert breast.status == "needs_review" and "expects gastric scoring" in breast.reasons[0], breast.reasons


def test_rule_object_and_bad_ish():
    rule = replace(load_rule("her2-positive-breast"), min_tumour_cells=150)
    assert check_eligibility(make_result(none=10, strong_complete=140), rule).status == "eligible"
    assert check_eligibility(make_result(none=10, strong_complete=130), rule).status == "needs_review"
    with pytest.raises(ValueError, match="ish must be"):
        check_eligibility(make_result(**TWO), rule, ish="amplified")


USER_RULE = """
name = "my-trial"
version = "2.1"
description = "IHC 3+ in at least 50% of tumour cells, confirmed by FISH"
reference = "example"
min_tumour_cells = 200
ish_levels = ["3+"]
ish_eligible = "positive"
[[require]]
level = "3+"
min_percent = 50
inclusive = true
"""


def test_user_rule_file(tmp_path):
    path = tmp_path / "my-trial.toml"
    path.write_text(USER_RULE)
    rule = load_rule(path)
    assert rule == load_rule(str(path))
    assert rule.guideline == "any" and rule.require[0].inclusive
    half = make_result("gastric", none=10_000, strong_complete=10_000)  # exactly 50%, inclusive: met
    assert any(r.endswith("(10000/20000); rule needs >=50%: met") for r in check_eligibility(half, rule).reasons)
    over = make_result("gastric", none=8_000, strong_complete=12_000)  # 60%: past the measurement's margin
    assert check_eligibility(over, path).status == "needs_review"  # awaiting FISH
    assert check_eligibility(over, rule, ish="positive").status == "eligible"
    below = make_result("gastric", none=12_000, strong_complete=8_000)
    assert check_eligibility(below, rule).status == "not_eligible"  # FISH cannot help


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 'red'\n" + USER_RULE, "unknown key 'colour'; allowed keys: name"),
        (USER_RULE.replace("min_tumour_cells = 200", "min_tumour_cells = '200'"), "'min_tumour_cells' must be int"),
        (USER_RULE.replace("min_tumour_cells = 200", "min_tumour_cells = true"), "'min_tumour_cells' must be int"),
        (USER_RULE.replace("min_tumour_cells = 200", "min_tumour_cells = 50"), "min_tumour_cells must be >= 100"),
        (USER_RULE.replace('name = "my-trial"', ""), "missing required key 'name'"),
        (USER_RULE.replace("inclusive = true", "inclusive = 1"), "require\\[0\\]: key 'inclusive' must be bool"),
        (USER_RULE.replace("inclusive = true", "above = 1"), "require\\[0\\]: unknown key 'above'"),
        (USER_RULE.replace('level = "3+"', 'level = "4+"'), "require.level"),
        (USER_RULE.replace('ish_levels = ["3+"]', 'ish_levels = ["3"]'), "ish_levels has unknown levels"),
        (USER_RULE.replace('ish_levels = ["3+"]', "ish_levels = [3]"), "'ish_levels' must be a list of strings"),
        (USER_RULE.replace('ish_levels = ["3+"]', "ish_levels = []"), "nothing could be eligible"),
        ('eligible_levels = ["3+"]\n' + USER_RULE, "in both"),
        ('guideline = "lung"\n' + USER_RULE,  # each name once ("gastric" is a family and a guideline)
         "guideline must be one of \\['any', 'breast', 'gastric', 'breast-asco-cap-2018', 'breast-asco-cap-2023'\\], got 'lung'"),
        ("name = ", "invalid TOML"),
        (USER_RULE.replace('ish_eligible = "positive"\n', ""), "ish_levels need ish_eligible"),  # HER2-low rules need "negative"
        (USER_RULE.replace('ish_levels = ["3+"]', 'eligible_levels = ["3+"]'), "ish_eligible .* without ish_levels"),
        (USER_RULE.replace('version = "2.1"', 'version = " "'), "version must not be empty"),
        (USER_RULE.replace("inclusive = true", "inclusive = false").replace("min_percent = 50", "min_percent = 100"), "never be met"),
        (USER_RULE.replace('ish_levels = ["3+"]', 'ish_levels = ["0 (null)"]\neligible_levels = ["0"]'), "in both"),
    ],
)
def test_invalid_rule_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RuleError, match=message) as info:
        load_rule(path)
    assert str(info.value).startswith(str(path))


def test_a_missing_rule_file_is_named():
    """A path to nothing (as text or a Path) raised a bare FileNotFoundError: RuleError names it, as it names a bad file."""
    for missing in ("nope/rule.toml", Path("nope/rule.toml")):
        with pytest.raises(RuleError, match=r"^nope/rule\.toml: no such rule file$"):
            load_rule(missing)


def test_a_rule_path_is_named_as_it_was_given(tmp_path, monkeypatch):
    """Path respells './her2-low-breast' as 'her2-low-breast' and 'rules/' as 'rules': the message named what reads as
    a shipped rule missing, or a file the user did not name. It names the text given."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rules").mkdir()
    with pytest.raises(RuleError, match=r"^\./her2-low-breast: no such rule file$"):
        load_rule("./her2-low-breast")
    with pytest.raises(RuleError, match=r"^rules/: is a folder, not a rule file$"):
        load_rule("rules/")
    with pytest.raises(RuleError, match=r"^rules: is a folder, not a rule file$"):
        load_rule(Path("rules/"))


def test_a_shipped_rule_named_as_a_file_says_its_name(tmp_path, monkeypatch):
    """'her2-low-breast.toml' is a path (its suffix), and no such file is here: the message says the shipped rule's
    name, which 'her2score rules' lists without the suffix; a path with a folder is the user's own file."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuleError, match=r"^her2-low-breast\.toml: no such rule file \(the shipped rule is named "
                                        r"her2-low-breast, without \.toml\)$"):
        load_rule("her2-low-breast.toml")
    with pytest.raises(RuleError, match=r"^mine/her2-low-breast\.toml: no such rule file$"):
        load_rule("mine/her2-low-breast.toml")


def test_a_folder_given_as_a_rule_file_is_named(tmp_path):
    for folder in (tmp_path, tmp_path / "rules.toml"):
        folder.mkdir(exist_ok=True)
        with pytest.raises(RuleError, match=f"^{re.escape(str(folder))}: is a folder, not a rule file$"):
            load_rule(folder)


def test_a_rule_path_is_told_from_a_shipped_name_by_its_suffix_in_any_case_a_folder_or_the_file(tmp_path, monkeypatch):
    """A name ending .TOML was taken for a shipped rule's and refused as unknown; so were a path with a folder but
    no .toml suffix and a file of another format, which now say it is no TOML."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "MY-TRIAL.TOML").write_text(USER_RULE)
    (tmp_path / "my-trial").write_text(USER_RULE)
    assert load_rule("MY-TRIAL.TOML").name == load_rule("./my-trial").name == load_rule(f"{tmp_path}/my-trial").name == "my-trial"
    (tmp_path / "my-trial.yaml").write_text("name: my-trial\nversion: '2.1'\n")
    for yaml in ("my-trial.yaml", str(tmp_path / "my-trial.yaml")):
        with pytest.raises(RuleError, match=r"^\S*my-trial\.yaml: invalid TOML \(a rule file must be TOML\): "):
            load_rule(yaml)
    assert load_rule("her2-low-breast").name == "her2-low-breast"  # a bare name is a shipped rule's
    for unknown in ("my-trial", "her2-low-breast.v2"):  # not read from disk: no suffix, or another that names no file
        with pytest.raises(ValueError, match=f"unknown rule '{unknown}'"):
            load_rule(unknown)


def test_unknown_rule_name():
    with pytest.raises(ValueError, match="unknown rule 'her2-huge'.*car-t-her2"):
        load_rule("her2-huge")


def test_rule_constructor_validates():
    with pytest.raises(RuleError, match="eligible_levels has unknown levels"):
        Rule(name="x", version="1", eligible_levels=("4+",))
    with pytest.raises(RuleError, match="eligible_levels must be a list, got '3\\+'"):
        Rule(name="x", version="1", eligible_levels="3+")
    with pytest.raises(RuleError, match="min_tumour_cells must be a whole number"):
        Rule(name="x", version="1", eligible_levels=("3+",), min_tumour_cells=150.5)
    with pytest.raises(RuleError, match="min_percent must be a number"):
        Requirement(level="2+", min_percent="50")
    listed = Rule(name="x", version="1", eligible_levels=["1+"], ish_levels=["2+"], ish_eligible="negative")
    assert listed.ish_levels == ("2+",) and check_eligibility(make_result(none=1000), listed).status == "not_eligible"


def test_a_rule_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"\xff" + USER_RULE.encode())
    with pytest.raises(RuleError, match=f"{path}: not UTF-8 text"):
        load_rule(path)


def test_no_score_needs_review_with_the_reason():
    unscored = SlideResult(
        slide="s.tif", score=None, level="not scored", flags=("no_tumour_cells",), guideline="breast-asco-cap-2023",
        specimen="resection", reason="no tumour cells found (annotation (t.geojson, 1 polygons)): no HER2 score",
        counts={"none": 0}, percentages={}, tumour_cells=0, h_score=0.0, clusters={}, region="annotation",
        qc=(QCFinding("too_few_tumour_cells", "fail", "0 tumour cells scored; at least 100 are needed"),),
        stains={}, mpp=0.5, tissue_area_mm2=1.0, classical_score=None,
    )
    for rule in SHIPPED:
        decision = check_eligibility(unscored, rule)
        assert decision.status == "needs_review"
        assert decision.reasons[0] == "not scored: no tumour cells found (annotation (t.geojson, 1 polygons)): no HER2 score"
        assert "failed QC: 0 tumour cells scored; at least 100 are needed" in decision.reasons
        assert not any("would be" in r for r in decision.reasons)  # no automatic answer without a score
    assert SlideResult.from_dict(unscored.to_dict()) == unscored


def test_a_result_json_whose_calls_disagree_is_refused():
    """from_dict refuses what the tool never writes: a classical level of another score, a reported score other
    than the classical one with no CNN to fuse, and QC findings that are not findings (ValueError, as the rest)."""
    good = make_result(none=175, faint_partial=25).to_dict()
    assert SlideResult.from_dict(good).score == "1+"
    for bad, words in (({"classical_level": "0 (null)"}, "'classical_level' '0 (null)' is not a level of classical score '1+'"),
                       ({"score": "3+", "level": "3+"}, "differs from 'classical_score' '1+' with no CNN"),
                       ({"qc": [["too_few", "fail"]]}, "'qc' must be a list of findings"),
                       ({"qc": [{"code": "x"}]}, "'qc' must be a list of findings")):
        with pytest.raises(ValueError, match=re.escape(words)):
            SlideResult.from_dict({**good, **bad})


def test_a_result_naming_what_the_tool_never_writes_is_refused_not_answered():
    """A guideline or specimen the rules do not know (a review's result.json edited to guideline "breast" was
    answered where no doubt asked apply_guideline, and raised where one did), a QC severity of another spelling (a
    "FAIL" was read as passed: eligible), flags that are no list, and a dict without a field: ValueError naming it."""
    good = make_result(none=175, faint_partial=25).to_dict()
    for bad, words in (({"guideline": "breast"}, "'guideline' must be one of"),
                       ({"specimen": "core"}, "'specimen' must be one of"),
                       ({"specimen": "biopsy"}, "(a biopsy under gastric only), got 'biopsy' under 'breast-asco-cap-2023'"),
                       ({"qc": [{"code": "x", "severity": "FAIL", "message": "m"}]}, "'qc' severities must be among"),
                       ({"flags": "her2_low"}, "'flags' must be a list of strings")):
        with pytest.raises(ValueError, match=re.escape(words)):
            check_eligibility({**good, **bad}, "her2-low-breast")
    del good["slide"]
    with pytest.raises(ValueError, match=re.escape("not a her2score result.json (no slide)")):
        check_eligibility(good, "her2-low-breast")


def test_a_breast_requirement_counts_cells_as_breast_reads_them():
    """Breast 3+ is intense complete staining; an intense lateral or incomplete membrane is the unusual 2+ pattern.
    A [[require]] at 3+ under breast counted the 60% intense lateral cells as 3+ (gastric's reading): eligible."""
    rule = Rule(name="cart-breast", version="1", guideline="breast", eligible_levels=("2+", "3+"),
                require=(Requirement("3+", 50.0, True),))
    counts = dict(none=200, strong_lateral=600, strong_complete=200)
    d = check_eligibility(make_result(**counts), rule)
    assert d.status == "not_eligible"
    assert any(x.startswith("intense complete membrane staining in 20.0% of tumour cells (200/1000); rule needs >=50%: not met")
               for x in d.reasons), d.reasons
    two = replace(rule, require=(Requirement("2+", 50.0, True),))  # the unusual pattern is 2+
    assert check_eligibility(make_result(**counts), two, ish="positive").status == "eligible"
    gastric = replace(rule, guideline="gastric")  # gastric counts complete and lateral alike at their intensity
    assert check_eligibility(make_result("gastric", **counts), gastric).status == "eligible"


def test_a_breast_1plus_over_moderate_incomplete_membranes_asks_for_review_where_2plus_would_answer_otherwise():
    """A 1+ resting on weak-to-moderate incomplete membranes could be the 2018 note's equivocal 2+ (moderate
    incomplete staining): review wherever 2+ (reflex ISH) would change the answer, read from the counts."""
    counts = dict(none=700, faint_partial=100, weak_moderate_partial=200)
    positive = check_eligibility(make_result(**counts), "her2-positive-breast")
    assert positive.status == "needs_review"
    assert positive.reasons[0] == ("20.0% of tumour cells show membranes stronger than faint, weak-to-moderate incomplete "
                                   "ones among them, which ASCO/CAP's 2018 note calls equivocal where moderate (weak and "
                                   "moderate are one band here): at 2+ the answer would be needs review"), positive.reasons
    assert "without these doubts the answer would be: not eligible" in positive.reasons
    assert check_eligibility(make_result(**counts), "her2-positive-breast", ish="negative").status == "not_eligible"
    assert check_eligibility(make_result(**counts), "her2-low-breast").status == "needs_review"  # 2+ awaits ISH
    assert check_eligibility(make_result(**counts), "her2-low-breast", ish="negative").status == "eligible"
    faint = dict(none=700, faint_partial=300)  # the guideline's own 1+
    assert check_eligibility(make_result(**faint), "her2-positive-breast").status == "not_eligible"
    assert check_eligibility(make_result("gastric", **counts), "gastric-toga").status == "not_eligible"


def test_a_rule_may_not_list_levels_its_scoring_never_reports():
    with pytest.raises(RuleError, match=re.escape("which gastric scoring never reports")):
        Rule(name="t", version="1", guideline="gastric", eligible_levels=("0 (null)",))
    Rule(name="t", version="1", guideline="breast", eligible_levels=("0+ (ultralow)",))  # 2023 reports it
    Rule(name="t", version="1", guideline="any", eligible_levels=("0+ (ultralow)",))


def test_a_contradicting_ish_result_is_a_doubt_not_also_unused():
    d = check_eligibility(make_result(**THREE), "her2-positive-breast", ish="negative")
    assert d.status == "needs_review" and any("ISH negative contradicts IHC 3+" in x for x in d.reasons)
    assert not any("not used" in x for x in d.reasons), d.reasons
    assert any("not used" in x for x in check_eligibility(make_result(**THREE), "her2-positive-breast", ish="positive").reasons)


def test_a_rule_file_may_not_take_a_shipped_rules_name_for_another_rule(tmp_path):
    """A copy of a shipped rule edited without a new name was reported and evaluated as the shipped rule (evaluate kept
    one of the two under the name); two different rules of one name are refused where they meet."""
    from her2score.eligibility import RULES_DIR, distinct_rules

    shipped = (RULES_DIR / "her2-low-breast.toml").read_text()
    copy = tmp_path / "copy.toml"
    copy.write_text(shipped)
    assert load_rule(copy) == load_rule("her2-low-breast")  # an unchanged copy is the shipped rule
    changed = tmp_path / "changed.toml"
    changed.write_text(shipped.replace('"2+"', '"3+"'))
    with pytest.raises(RuleError, match=re.escape(f"{changed}: name 'her2-low-breast' is a shipped rule's")):
        load_rule(changed)
    mine = Rule(name="mine", version="1", eligible_levels=("3+",))
    assert distinct_rules([mine, load_rule("car-t-her2"), mine]) == [mine, load_rule("car-t-her2")]
    with pytest.raises(RuleError, match="two different rules are named 'mine'"):
        distinct_rules([mine, replace(mine, version="2")])


def test_a_rule_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'name = "bom"\nversion = "1"\neligible_levels = ["3+"]\n')
    assert load_rule(path).name == "bom"


# isolated intense cells (3 in 10,412): the flag gives needs_review only where counting them changes the answer
ISOLATED_NULL = dict(none=10_409, strong_complete=3)
ISOLATED_ONE = dict(none=8_409, strong_complete=3, faint_partial=2_000)


@pytest.mark.parametrize(
    ("counts", "rule", "ish", "status"),
    [
        (ISOLATED_NULL, "her2-ultralow-breast", None, "needs_review"),  # null, but 2+ (awaiting ISH) if counted
        (ISOLATED_NULL, THREE_ONLY, None, "not_eligible"),  # 0 or 2+: not eligible either way
        (ISOLATED_ONE, "her2-low-breast", None, "needs_review"),  # 1+ eligible; 2+ awaits ISH
        (ISOLATED_ONE, "her2-low-breast", "negative", "eligible"),  # 1+, or 2+ with ISH negative: eligible
        (ISOLATED_ONE, "her2-positive-breast", None, "needs_review"),
        (ISOLATED_ONE, "her2-positive-breast", "negative", "not_eligible"),
    ],
)
def test_isolated_intense_cells_review_only_where_they_decide(counts, rule, ish, status):
    result = make_result(**counts)
    assert "isolated_intense_cells" in result.flags
    decision = check_eligibility(result, rule, ish=ish)
    assert decision.status == status, decision.reasons
    doubt = [r for r in decision.reasons if r.startswith("isolated intense cells (3 of 10,412) were counted as stained complete cells, not as")]
    assert bool(doubt) == (status == "needs_review")
    if doubt:
        assert "would make the slide 2+" in doubt[0]


def test_intense_partial_cells_are_not_positive_membranes_in_requirements():
    # car-t-her2 needs >50% at 2+ or stronger, complete or lateral: intense non-U partial membranes are 1+ cells
    counts = dict(none=40, strong_partial=120, weak_moderate_complete=40)
    decision = check_eligibility(make_result("gastric", **counts), "car-t-her2")
    assert decision.status == "not_eligible"
    assert any("20.0% of tumour cells (40/200)" in r for r in decision.reasons)


def test_a_call_near_a_cut_off_needs_review_only_where_the_other_side_changes_the_answer():
    from her2score.guidelines import near_cutoff

    counts = {"none": 186, "faint_partial": 14}  # 0+ (ultralow), 7% faint: within 5.5 points under 1+
    assert near_cutoff(counts, "0") == ("1+", 7.0)
    assert near_cutoff({"none": 176, "faint_partial": 24}, "1+") == ("0", 12.0)  # just over: could be 0
    assert near_cutoff({"none": 96, "faint_partial": 4}, "0") is None
    assert near_cutoff({"none": 80, "strong_complete": 20}, "3+") is None
    r = make_result(**counts)
    r = replace(r, flags=(*r.flags, "near_cutoff"))
    low = check_eligibility(r, "her2-low-breast")  # at 1+ the answer would be eligible
    assert low.status == "needs_review" and any("at 1+ the answer would be eligible" in x for x in low.reasons)
    ultra = check_eligibility(r, "her2-ultralow-breast")  # 0+ and 1+ both eligible; 0 (null), which 7% could be, not
    assert ultra.status == "needs_review" and not any("at 1+" in x for x in ultra.reasons), ultra.reasons
    assert check_eligibility(r, "her2-positive-breast").status == "not_eligible"
    # read from the counts, flag or not: a result made from apply_guideline's call, which has none, is doubted alike
    assert check_eligibility(make_result(**counts), "her2-low-breast").status == "needs_review"
    over = make_result(none=176, faint_partial=24)
    over = replace(over, flags=(*over.flags, "near_cutoff"))
    doubt = check_eligibility(over, "her2-low-breast")  # 1+ is eligible; at 0+ (ultralow) it would not be
    assert doubt.status == "needs_review" and any("at 0+ (ultralow) the answer would be not eligible" in x for x in doubt.reasons)
    wide = replace(make_result(none=168, faint_partial=32), config={"near_cutoff_points": 6.5})  # 16%, flagged with a 6.5-point margin
    wide = replace(wide, flags=(*wide.flags, "near_cutoff"))
    assert check_eligibility(wide, "her2-low-breast").status == "needs_review"  # the slide's own margin, not the default 5.5


def test_a_2plus_on_its_only_stained_cells_is_weighed_at_0_too():
    """12.5% weak-to-moderate complete cells alone: just under 10% they make 0 (ultralow), not 1+; HER2-low
    with ISH negative is eligible at 2+ and at 1+, not at ultralow, so it needs review."""
    r = make_result(none=105, weak_moderate_complete=15)
    r = replace(r, flags=(*r.flags, "near_cutoff"))
    d = check_eligibility(r, "her2-low-breast", ish="negative")
    assert d.status == "needs_review" and any("at 0+ (ultralow) the answer would be not eligible" in x for x in d.reasons)


def test_a_call_on_few_cells_is_near_the_cut_off_where_its_interval_crosses_it():
    """Beyond the measurement's 5.5 points, a share counted on few cells is borderline where its 95% Wilson
    interval reaches across 10%: 16.7% of 60 cells (9.3-28.0%) could be 0, 16% of 1,000 (13.9-18.4%) not (but
    for the false-membrane band of a 1+, switched off here to show the interval alone)."""
    from her2score.guidelines import near_cutoff, near_cutoff_sides, wilson_ci

    assert [round(100 * v, 1) for v in wilson_ci(10, 60)] == [9.3, 28.0]
    assert near_cutoff({"none": 50, "faint_partial": 10}, "1+", false_membrane_percent=0) == ("0", 100 * 10 / 60)
    assert near_cutoff({"none": 840, "faint_partial": 160}, "1+", false_membrane_percent=0) is None  # (the band aside)
    assert near_cutoff({"none": 24, "faint_partial": 1}, "0") == ("1+", 4.0)  # 4% of 25: up to 19.5%
    assert near_cutoff({"none": 960, "faint_partial": 40}, "0") is None  # 4% of 1,000: up to 5.4%
    assert near_cutoff({"none": 85, "strong_complete": 15}, "3+") == ("2+", 15.0)
    assert near_cutoff({"none": 50, "faint_partial": 10}, "1+", confidence=0.5, false_membrane_percent=0) is None  # narrower
    # 1 faint cell of 7: both sides hold (no 2+ cell, but 0 of 7 could still be 35%); the nearer one is said
    assert near_cutoff({"none": 6, "faint_partial": 1}, "1+") == ("0", 100 / 7)
    # where the nearer side would not change the answer, the other one is weighed too (a 1+ with ISH negative)
    both = make_result("breast-asco-cap-2018", none=86, faint_partial=6, weak_moderate_complete=8)
    assert near_cutoff_sides(both.counts, "1+") == [("2+", 8.0), ("0", 14.0)]
    both = replace(both, flags=(*both.flags, "near_cutoff"))
    decision = check_eligibility(both, "her2-low-breast", ish="negative")
    assert decision.status == "needs_review" and "at 0+ (ultralow) the answer would be not eligible" in decision.reasons[0], decision.reasons
    few = replace(make_result(none=85, faint_partial=15), flags=("her2_low", "near_cutoff"))
    doubt = check_eligibility(few, "her2-low-breast")
    assert doubt.status == "needs_review"
    assert any(r.startswith("15.0% of 100 tumour cells decide the call, too near the 10% cut-off") for r in doubt.reasons), doubt.reasons


def test_ultralow_that_false_membranes_could_give_needs_review_only_where_null_changes_the_answer():
    from her2score.guidelines import FALSE_MEMBRANE_PERCENT, null_or_ultralow, with_null_doubt

    counts = {"none": 188, "faint_partial": 10, "strong_complete": 2}  # 5% faint, 2 isolated intense cells
    assert null_or_ultralow(counts, "0+ (ultralow)") == 6.0  # the isolated cells are stained cells, as in the call
    assert null_or_ultralow(counts, "0+ (ultralow)", percent=5.0) is None
    assert null_or_ultralow(counts, "0 (null)") is None and null_or_ultralow(counts, "1+") is None
    assert null_or_ultralow({"none": 182, "faint_partial": 18}, "0+ (ultralow)") is None  # 9%: above the default
    # real unstained membranes read stained mostly as faint partial (FALSE_STRONGER_PERCENT): intense or complete
    # staining beyond that is no false membrane, whatever its share
    assert null_or_ultralow({"none": 94, "strong_lateral": 6}, "0+ (ultralow)") is None
    assert null_or_ultralow({"none": 940, "faint_partial": 40, "weak_moderate_complete": 20}, "0+ (ultralow)") == 6.0  # 2%
    assert null_or_ultralow({"none": 940, "faint_partial": 39, "weak_moderate_complete": 21}, "0+ (ultralow)") is None
    # within the share's 95% interval (the CNN's hold): 6 of 65 cells (9.2%) could be false membranes, 900 of 10,000 not
    from her2score.guidelines import false_membrane_share
    assert false_membrane_share({"none": 59, "faint_partial": 6}) is None
    assert false_membrane_share({"none": 59, "faint_partial": 6}, confidence=0.95) == pytest.approx(100 * 6 / 65)
    assert false_membrane_share({"none": 9100, "faint_partial": 900}, confidence=0.95) is None
    assert with_null_doubt(("ultralow",), counts, "0+ (ultralow)") == (
        ("ultralow", "null_or_ultralow"),
        f"; the 6.0% stained is within the {FALSE_MEMBRANE_PERCENT:g}% that real unstained membranes read: it could be 0 (null)")
    assert with_null_doubt(("her2_low",), counts, "1+") == (("her2_low",), "")
    assert 6.3 < FALSE_MEMBRANE_PERCENT < 10  # above what real unstained membranes read, under the 1+ cut-off
    r = make_result(none=188, faint_partial=12)
    flagged = replace(r, flags=(*r.flags, "null_or_ultralow"))
    doubt = check_eligibility(flagged, "her2-ultralow-breast")  # ultralow is eligible, null is not
    assert doubt.status == "needs_review", doubt.reasons
    assert any("6.0% of tumour cells stained" in x and "at 0 (null) the answer would be not eligible" in x for x in doubt.reasons)
    for rule in ("her2-low-breast", "her2-positive-breast", THREE_ONLY):  # null and ultralow alike: no doubt
        d = check_eligibility(flagged, rule)  # (HER2-low's review asks of 1+, the other side of the 10% cut-off 6% is near)
        assert not any("at 0 (null) the answer" in x for x in d.reasons), d.reasons
        assert d.status == ("needs_review" if rule == "her2-low-breast" else "not_eligible")
    assert check_eligibility(r, "her2-ultralow-breast") == doubt  # read from the counts, flag or not


def test_a_gastric_biopsy_cluster_one_cell_from_the_rules_5_needs_review_where_it_changes_the_answer():
    """A biopsy called 0 beside a 2+ cluster of 4 (one short of 5) could be 2+, which gastric-toga sends
    to ISH: needs review. Held by a 2+ cluster of just 5, it could be 1+: not eligible, so also review."""
    counts = dict(none=297, weak_moderate_complete=9)  # 2.9%: only a cluster makes it more than 0
    base = make_result("gastric", **counts)

    def biopsy(clusters):
        call = apply_guideline(counts, "gastric", "biopsy", clusters=clusters)
        flags = call.flags + ("near_cutoff",)  # as the pipeline flags a cluster one cell from 5
        return replace(base, specimen="biopsy", clusters=clusters, score=call.score, classical_score=call.score,
                       level=call.level, flags=flags, reason=call.reason)

    short = check_eligibility(biopsy({"3+": 0, "2+": 4, "1+": 4}), "gastric-toga")
    assert short.status == "needs_review"
    assert ("a cohesive cluster of 4 tumour cells at 2+ or stronger, one short of the biopsy rule's 5: at 2+ the answer "
            "would be needs review") in short.reasons
    held = check_eligibility(biopsy({"3+": 0, "2+": 5, "1+": 5}), "gastric-toga", ish="positive")
    assert held.status == "needs_review" and any("just the biopsy rule's 5" in r for r in held.reasons), held.reasons
    three = dict(none=297, strong_complete=9)  # a 3+ held by a cluster of just 5, the same cells at every level
    call = apply_guideline(three, "gastric", "biopsy", clusters={"3+": 5, "2+": 5, "1+": 5})
    r = replace(make_result("gastric", **three), specimen="biopsy", clusters={"3+": 5, "2+": 5, "1+": 5}, score=call.score,
                classical_score=call.score, level=call.level, flags=call.flags + ("near_cutoff",), reason=call.reason)
    assert call.score == "3+" and check_eligibility(r, "gastric-toga", ish="positive").status == "needs_review"  # missed: 0
    eight = check_eligibility(biopsy({"3+": 0, "2+": 8, "1+": 8}), "gastric-toga", ish="positive")  # within the margin
    assert eight.status == "needs_review" and any("8 tumour cells at 2+ or stronger, 3 over the biopsy rule's 5" in r
                                                  for r in eight.reasons), eight.reasons
    wider = dict(none=294, weak_moderate_complete=12)  # 3.9%, a cluster of 10: past the margin
    call = apply_guideline(wider, "gastric", "biopsy", clusters={"3+": 0, "2+": 10, "1+": 10})
    sure = replace(make_result("gastric", **wider), specimen="biopsy", clusters={"3+": 0, "2+": 10, "1+": 10},
                   score=call.score, classical_score=call.score, level=call.level, flags=call.flags, reason=call.reason)
    assert call.score == "2+" and check_eligibility(sure, "gastric-toga", ish="positive").status == "eligible"


def test_an_ultralow_flagged_as_possibly_null_on_few_intense_cells_asks_for_review():
    """The flag weighs the intense share within its 95% interval (7 of 194 cells: 3.6%, its lower end under 2%), the
    doubt weighed its point value and raised none: a real HER2 0 with a red marker line read ultralow, 'eligible'
    under her2-ultralow-breast though its own reason said it could be 0 (null)."""
    from her2score.guidelines import with_null_doubt

    r = make_result(none=187, strong_lateral=4, strong_partial=3)
    flags, words = with_null_doubt(r.flags, r.counts, r.level)
    assert r.level == "0+ (ultralow)" and "null_or_ultralow" in flags and "it could be 0 (null)" in words
    d = check_eligibility(replace(r, flags=flags), "her2-ultralow-breast")
    assert d.status == "needs_review" and any("at 0 (null) the answer would be not eligible" in x for x in d.reasons), d.reasons


def test_a_plain_0_needs_review_where_the_rule_tells_null_from_ultralow():
    """ASCO/CAP 2018 and gastric scoring say plain 0: where the rule answers null and ultralow differently
    it could be either; where both answer alike there is no doubt."""
    faint = make_result("breast-asco-cap-2018", none=970, faint_partial=30)  # 3%: not near 10%
    assert faint.level == "0"
    splits = Rule(name="ul", version="1", guideline="breast", eligible_levels=("0+ (ultralow)", "1+"))
    d = check_eligibility(faint, splits)
    assert d.status == "needs_review"
    assert d.reasons[0] == ("scored a plain 0 under breast-asco-cap-2018, which does not tell 0 (null) from 0+ (ultralow); "
                            "the rule answers not eligible at 0 (null) and eligible at 0+ (ultralow)")
    assert check_eligibility(faint, "her2-low-breast").status == "not_eligible"  # null and ultralow alike: not eligible
    gastric = make_result("gastric", none=1000)
    assert check_eligibility(gastric, Rule(name="g", version="1", eligible_levels=("0 (null)",))).status == "needs_review"


def test_a_cnn_score_beside_no_score_is_no_disagreement():
    unscored = replace(make_result(cnn="1+", **NULL), score=None, level="not scored", classical_score=None,
                       reason="no tumour cells found (mask (t.png)): no HER2 score", tumour_cells=0)
    d = check_eligibility(unscored, "her2-low-breast")
    assert d.status == "needs_review" and not any("disagree" in r for r in d.reasons), d.reasons


def test_intense_cells_just_over_the_isolated_floor_need_review_where_isolated_would_change_it():
    """Five intense complete cells in 400 make a breast 2+; four would be isolated cells, and the slide 0
    (ultralow, its only stained cells): the pipeline flags it near_cutoff, and a HER2-low answer after ISH asks for review."""
    base = make_result(none=395, strong_complete=5)
    assert base.score == "2+"
    result = replace(base, flags=(*base.flags, "near_cutoff"))
    d = check_eligibility(result, "her2-low-breast", ish="negative")
    assert d.status == "needs_review"
    assert d.reasons[0] == ("its 5 intense complete cells (1.2% of 400) lie just over the 1% / 5-cell floor below which "
                            "they would be isolated cells: at 0+ (ultralow) the answer would be not eligible")
    assert check_eligibility(result, THREE_ONLY).status == "not_eligible"  # 0 or 2+: not 3+ either way


def test_a_2018_call_near_a_cut_off_names_the_other_side_as_2023_would():
    """ASCO/CAP 2018 calls both 0s plain 0; under a rule that tells them apart, the other side of a
    near cut-off call is the level 2023 gives the same counts (here stained cells: 0+ (ultralow))."""
    counts = dict(none=178, faint_partial=22)  # 11% faint: 1+, near the cut-off
    for guideline in ("breast-asco-cap-2018", "breast-asco-cap-2023"):
        r = make_result(guideline, **counts)
        r = replace(r, flags=(*r.flags, "near_cutoff"))
        assert check_eligibility(r, "her2-ultralow-breast").status == "eligible"  # 1+ or ultralow: eligible either way
        only_ultralow = Rule(name="u", version="1", guideline="breast", eligible_levels=("0+ (ultralow)",))
        d = check_eligibility(r, only_ultralow)
        assert d.status == "needs_review" and "at 0+ (ultralow) the answer would be eligible" in d.reasons[0], d.reasons


def test_diffuse_cytoplasmic_dab_needs_review_only_where_a_lower_level_changes_the_answer():
    """A call flagged cytoplasmic_dab (the stain fills the tumour cells' cytoplasm: the membranes read may
    be cytoplasm, and the slide any lower level) asks for review where one of those would change the answer, and
    quotes the measurement that raised the flag (the unstained cells' cytoplasm, or the stained cells' over their
    membranes: a review quoted the unstained cells' 0.03 for the real colon, flagged by its stained cells' 0.43)."""
    low = make_result(none=160, faint_partial=40)  # 20%: not near 10%
    flagged = replace(low, flags=(*low.flags, "cytoplasmic_dab"), staining={"diffuse_cytoplasm_od": 0.12})
    doubt = check_eligibility(flagged, "her2-low-breast")
    assert doubt.status == "needs_review", doubt.reasons
    assert doubt.reasons[0] == ("diffuse cytoplasmic DAB may have been read as membrane staining (the tumour cells read "
                                "unstained carry cytoplasmic DAB 0.12 OD over unstained tissue): at 0 (null) or 0+ (ultralow) the "
                                "answer would be not eligible")
    unmeasured = replace(flagged, staining={"diffuse_cytoplasm_od": None})  # a result.json edited by hand
    assert check_eligibility(unmeasured, "her2-low-breast").reasons[0] == (
        "diffuse cytoplasmic DAB may have been read as membrane staining: at 0 (null) or 0+ (ultralow) the answer would "
        "be not eligible")
    assert check_eligibility(flagged, "her2-positive-breast").status == "not_eligible"  # 1+ and 0 alike
    assert check_eligibility(low, "her2-low-breast").status == "eligible"  # no flag, no doubt
    gastric = make_result("gastric", none=150, weak_moderate_complete=50)
    flagged = replace(gastric, flags=(*gastric.flags, "cytoplasmic_dab"), staining={"diffuse_cytoplasm_od": 0.2})
    assert "at 0 or 1+ the answer would be not eligible" in check_eligibility(flagged, "gastric-toga").reasons[0]
    # a 3+ whose stained cells' cytoplasm (0.43 OD) stands higher than their membranes (0.19), as the real colon's:
    # HER2-low is not eligible at 3+, but is at 1+ (and at 2+ with ISH negative), which it could be as well as 0
    colon = make_result(none=50, strong_complete=150)
    colon = replace(colon, flags=(*colon.flags, "cytoplasmic_dab"),
                    staining={"diffuse_cytoplasm_od": 0.03, "membrane_contrast_od": 0.19, "stained_cytoplasm_od": 0.43})
    doubt = check_eligibility(colon, "her2-low-breast")
    assert doubt.status == "needs_review" and doubt.reasons[0] == (
        "diffuse cytoplasmic DAB may have been read as membrane staining (the tumour cells read stained carry "
        "cytoplasmic DAB 0.43 OD over unstained tissue, more than their membranes stand out (0.19)): at 1+ the answer would "
        "be eligible; at 2+ the answer would be needs review"), doubt.reasons


def test_an_ish_result_is_read_in_any_case_as_evaluate_reads_it():
    r = make_result(none=80, weak_moderate_complete=20)
    assert check_eligibility(r, "her2-low-breast", ish=" Negative").status == check_eligibility(r, "her2-low-breast", ish="negative").status == "eligible"
    with pytest.raises(ValueError, match=r"^ish must be one of \['positive', 'negative'\] \(any case\), got 'equivocal'$"):
        check_eligibility(r, "her2-low-breast", ish="equivocal")


def test_a_cnn_call_over_cells_that_read_no_membrane_keeps_the_cytoplasm_doubt():
    """Where the cells measured read no membrane (membrane_contrast_od None) but the tumour cells carry diffuse
    cytoplasmic DAB, a CNN's 2+ may read that cytoplasm: flagged; a classical 0 (null) is not."""
    from her2score.tumour import with_cytoplasm_doubt

    flags, words = with_cytoplasm_doubt(("ish_reflex",), "2+", "2+", 0.2, None, guideline="breast-asco-cap-2023")
    assert flags == ("ish_reflex", "cytoplasmic_dab") and words.endswith("it could be lower, down to 0 (null)")
    assert with_cytoplasm_doubt(("null",), "0", "0 (null)", 0.2, None, guideline="breast-asco-cap-2023") == (("null",), "")
    assert with_cytoplasm_doubt(("ish_reflex",), "2+", "2+", 0.2, 0.3, guideline="gastric") == (("ish_reflex",), "")


def test_a_fused_score_near_its_own_cut_off_and_a_classical_near_one_are_both_weighed():
    """A classical 2+ on 16% weak-moderate complete cells is sure of its side; the CNN's 1+ over the same cells is
    not (16% stained lies within the false-membrane band: it could be 0). The fused 1+'s own side decides the
    HER2-low answer with ISH negative: review. A result whose near_cutoff lies only in its classical flags (a
    0.3.0 fused result, or the CNN's own view) is weighed too."""
    from her2score.guidelines import near_cutoff_sides

    base = make_result(none=840, weak_moderate_complete=160)
    assert base.score == "2+" and near_cutoff_sides(base.counts, "2+") == [] and near_cutoff_sides(base.counts, "1+") == [("0", 16.0)]
    fused = replace(base, score="1+", level="1+", flags=("her2_low", "near_cutoff", "cnn_disagrees"),
                    classical_flags=("ish_reflex",), cnn=CnnReport("1+", {"1+": 1.0}, 10, "test"))
    doubt = check_eligibility(fused, "her2-low-breast", ish="negative")
    assert doubt.status == "needs_review" and doubt.reasons[0].endswith("at 0+ (ultralow) the answer would be not eligible")
    faint = make_result(none=835, faint_partial=165)  # a classical 1+ near its cut-off, fused to 2+ by a 0.3.0 run
    old = replace(faint, score="2+", level="2+", flags=("ish_reflex", "cnn_disagrees"), classical_flags=("her2_low", "near_cutoff"),
                  cnn=CnnReport("2+", {"2+": 1.0}, 10, "test"))
    assert check_eligibility(old, "her2-low-breast", ish="negative").status == "needs_review"


def test_the_false_membrane_words_name_only_the_band_that_made_a_1plus_near():
    from her2score.pipeline import ScoringConfig, _near_words

    band = _near_words([("0", 16.0)], "1+", 1000, ScoringConfig())
    assert "real unstained membranes read stained in up to 8% of cells" in band
    assert "real unstained" not in _near_words([("0", 12.0)], "1+", 1000, ScoringConfig())  # within the 5.5 points
    few = _near_words([("1+", 0.0), ("2+", 0.0), ("3+", 0.0)], "0", 21, ScoringConfig())  # 0 of 21: near by its interval alone
    assert few.startswith("; too few tumour cells to be sure of the 10% cut-off (0.0% of 21 tumour cells decide a higher score, 95% interval 0.0-15.5%")
    assert _near_words([("0", 12.0)], "1+", 1000, ScoringConfig()).startswith("; near the 10% cut-off (12.0% of 1,000")
    interval = _near_words([("0", 16.0)], "1+", 100, ScoringConfig(false_membrane_percent=0.0))  # its interval, band off
    assert "real unstained" not in interval and "95% interval" in interval


def test_eligibility_of_a_result_json_by_path_or_dict(tmp_path):
    """check_eligibility takes a result.json's path or its loaded dict as well as a SlideResult (a user's first
    try raised AttributeError: 'str' object has no attribute 'qc'); a file that holds no result says so, by name."""
    import json

    result = make_result(**ONE)
    path = tmp_path / "result.json"
    path.write_text(result.to_json())
    expected = check_eligibility(result, "her2-low-breast")
    assert check_eligibility(str(path), "her2-low-breast") == expected == check_eligibility(path, "her2-low-breast")
    assert check_eligibility(json.loads(path.read_text()), "her2-low-breast") == expected
    with pytest.raises(ValueError, match="cannot read"):  # the JSON text itself, not its path
        check_eligibility(result.to_json(), "her2-low-breast")
    (tmp_path / "other.json").write_text('{"score": "1+"}')
    for bad, why in ((tmp_path / "other.json", "not a her2score result.json (no slide"), (tmp_path / "none.json", "no such file"),
                     (tmp_path, "is a folder")):
        with pytest.raises(ValueError) as refused:
            check_eligibility(bad, "her2-low-breast")
        assert str(refused.value).startswith(f"{bad}: {why}"), refused.value


def test_a_result_recording_a_setting_its_guideline_has_no_use_for_is_still_answered():
    """Results of 0.3.1 could record the per-band reading under breast or an isolated floor under gastric, which
    the scoring settings now refuse; they had no effect there, and eligibility ignores them (it raised)."""
    gastric = replace(make_result("gastric", none=88, weak_moderate_complete=12), config={"isolated_intense_percent": 2.0})
    gastric = replace(gastric, flags=(*gastric.flags, "near_cutoff"))
    assert check_eligibility(gastric, "gastric-toga").status == "needs_review"
    breast = replace(make_result(none=88, faint_partial=12), config={"gastric_reading": "per_band"})
    breast = replace(breast, flags=(*breast.flags, "near_cutoff"))
    assert check_eligibility(breast, "her2-low-breast").status == "needs_review"


def test_decisions_say_the_rules_eligible_levels_whole_and_ish_in_the_guidelines_terms():
    """Words from a pathologist's review: the eligible list names the ISH-dependent level too; a 2+ awaiting ISH
    with doubts 'would still need review' (not 'would be: needs review'); ISH positive on a gastric 1+ is read
    as the gastric rules read it (ISH only on a 2+), not as breast's 'HER2-positive whatever its IHC'."""
    d = check_eligibility(make_result(**ONE), "her2-low-breast")
    assert "1+ is an eligible level (eligible: 1+, 2+ with ISH negative)" in d.reasons
    few = check_eligibility(make_result(none=59, weak_moderate_complete=40), "her2-positive-breast")  # 99 cells: too few
    assert few.status == "needs_review" and few.reasons[-1] == "without these doubts it would still need review"
    gastric = check_eligibility(make_result("gastric", none=150, faint_partial=50), "gastric-toga", ish="positive")
    assert any(r.startswith("ISH positive contradicts IHC 1+: a discordant pair to reconcile (the gastric rules read "
                            "ISH only on a 2+: HER2-positive is IHC 3+, or 2+ with ISH positive;") for r in gastric.reasons)
    breast = check_eligibility(make_result(**ONE), "her2-low-breast", ish="positive")
    assert any("an ISH-positive case is HER2-positive whatever its IHC score" in r for r in breast.reasons)


def test_a_breast_zero_on_cells_stained_more_than_faint_needs_review_where_1_or_2_plus_answers_otherwise():
    """ASCO/CAP's 0 and DESTINY-Breast06's ultralow are faint incomplete staining; this tool reads any staining in
    <=10% as ultralow. Over what real unstained membranes read otherwise than faint (2%, >= 5 cells), weak-to-moderate
    cells could be read 1+, and lateral or intense incomplete ones the unusual pattern's 2+ (as intense complete
    ones in <=10% make 2+): 4% intense lateral cells were answered eligible under the ultralow rule, unreviewed."""
    lateral = make_result(none=9600, strong_lateral=400)
    assert lateral.level == "0+ (ultralow)"
    d = check_eligibility(lateral, "her2-ultralow-breast")
    assert d.status == "needs_review"
    assert d.reasons[0] == ("4.0% of 10,000 tumour cells are stained more than faint (intense lateral 4.0%), which the "
                            "guideline's 0 (faint incomplete staining) does not describe: at 2+ the answer would be needs review")
    moderate = make_result(none=9600, weak_moderate_complete=400)
    assert check_eligibility(moderate, "her2-ultralow-breast").status == "eligible"  # 1+ is eligible too; not 2+
    low = check_eligibility(moderate, "her2-low-breast")
    assert low.status == "needs_review" and "at 1+ the answer would be eligible" in low.reasons[0]
    for few in (dict(none=9800, strong_partial=200),  # 2%: what false membranes read otherwise than faint
                dict(none=96, weak_moderate_complete=4),  # 4%, but 4 cells
                dict(none=9650, faint_partial=100, weak_moderate_partial=250)):  # weak-to-moderate partial: as false ones read
        assert not any("stained more than faint" in r for r in check_eligibility(make_result(**few), "her2-low-breast").reasons)
    from her2score.guidelines import stronger_zero_sides

    B23 = "breast-asco-cap-2023"
    # 2+ where the intense incomplete cells alone are that many (as intense complete cells in <=10% make 2+)
    assert stronger_zero_sides(dict(none=9700, weak_moderate_complete=150, strong_lateral=150), "0", guideline=B23) == [("1+", "1+")]
    assert stronger_zero_sides(dict(none=9790, strong_lateral=210), "0", guideline=B23) == [("1+", "1+"), ("2+", "2+")]
    assert stronger_zero_sides(dict(none=9600, weak_moderate_lateral=400), "0", guideline=B23) == [("1+", "1+")]
    for guideline in ("gastric", "breast-asco-cap-2018"):  # gastric's 0 is reactivity in <10% whatever the kind; 2018's 0 alike
        assert stronger_zero_sides(dict(none=9600, strong_lateral=400), "0", guideline=guideline) == ([] if guideline == "gastric" else
                                                                                                    [("1+", "1+"), ("2+", "2+")])
