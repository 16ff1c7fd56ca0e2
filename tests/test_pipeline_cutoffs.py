"""End to end: guideline edges through score_slide (no tumour cells, fused flags, isolated intense
cells, intense incomplete cells) and fields whose deciding population sits either side of a cut-off."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from her2score.cnn import CLASSES, TileClassifier, WeightsRecord
from her2score.eligibility import Rule, check_eligibility
from her2score.guidelines import percent_text
from her2score.pipeline import ScoringConfig, score_slide
from her2score.slide import ArraySlide
from her2score.synthetic import REAL_BORDERS, generate_field

B23, G = "breast-asco-cap-2023", "gastric"


class ConstantClassifier(TileClassifier):
    """A tile classifier that reads every tissue patch as one class with probability 1: it drives the
    CNN fusion to a chosen score, so the flags of a fused score can be checked."""

    def __init__(self, score: str):
        super().__init__(WeightsRecord(file=f"constant-{score}", sha256=""))
        self.probs = np.eye(len(CLASSES))[CLASSES.index(score)]

    def predict_patches(self, patches: np.ndarray) -> np.ndarray:
        return np.tile(self.probs, (len(patches), 1))


def _score(field, **kwargs):
    return score_slide(ArraySlide(field.image, mpp=field.mpp), **kwargs)


def test_no_tumour_cells_is_no_score(tmp_path):
    f = generate_field("3+", seed=9300)
    xy = np.column_stack([f.cells["x_px"], f.cells["y_px"]])
    grid = np.stack(np.meshgrid(np.arange(0, 512, 8), np.arange(0, 512, 8)), -1).reshape(-1, 2)
    far = grid[np.argmax([np.min(np.hypot(*(xy - p).T)) for p in grid])]  # the pixel farthest from any cell
    mask = np.zeros((512, 512), np.uint8)
    mask[far[1], far[0]] = 255
    Image.fromarray(mask).save(tmp_path / "tumour.png")
    r = score_slide(ArraySlide(f.image, mpp=f.mpp), region=tmp_path / "tumour.png", cnn=ConstantClassifier("3+"))
    assert r.tumour_cells == 0
    assert (r.score, r.classical_score, r.level) == (None, None, "not scored")
    assert r.flags == ("no_tumour_cells",) and r.confidence is None
    assert r.h_score is None and r.percentages == {}  # no cells counted: no H-score 0, no 0% shares
    assert r.reason == "no tumour cells found (mask (tumour.png); epithelial cells within it, left out: none): no HER2 score"
    assert not r.qc_passed and "too_few_tumour_cells" in {q.code for q in r.qc}
    assert '"score": null' in r.to_json()
    decision = check_eligibility(r, "her2-positive-breast")
    assert decision.status == "needs_review" and decision.reasons[0] == f"not scored: {r.reason}"


def test_the_cnn_never_lifts_a_0_that_false_membranes_could_give():
    """A 0 whose staining is within what real unstained membranes read (guidelines.false_membrane_share: none at all
    included, under any guideline) is not lifted by the CNN (cnn.fuse, no_higher): on real tissue it can read faint
    diffuse DAB as 1+."""
    f = generate_field("0", seed=9301, variant="ultralow")
    plain = _score(f)
    assert plain.level == "0+ (ultralow)" and "null_or_ultralow" in plain.flags, plain.reason
    held = _score(f, cnn=ConstantClassifier("1+"))
    assert (held.score, held.level, held.classical_score) == ("0", "0+ (ultralow)", "0")
    assert set(held.flags) == set(plain.flags) | {"cnn_disagrees"} and held.confidence == 0.4
    share = 100 - plain.percentages["none"]
    assert held.reason == plain.reason + (f"; the CNN (a mean over the tissue's patches) reads 1+ (p=1.00), not followed to a higher score: the {share:.1f}% "
                                          "stained is no more than real unstained membranes read, and on real tissue the "
                                          "CNN can read faint diffuse DAB as 1+")
    assert check_eligibility(held, "her2-low-breast").status == "needs_review"
    assert _score(f, cnn=ConstantClassifier("1+"), guideline="breast-asco-cap-2018").score == "0"  # a plain 0 too
    null = _score(generate_field("0", seed=9300, variant="null"), cnn=ConstantClassifier("1+"))
    assert (null.score, null.level) == ("0", "0 (null)") and "the 0.0% stained is no more than" in null.reason


def test_fused_score_carries_the_flags_of_its_own_level():
    """Every call open to the CNN (near_cutoff_points 100: each share is 'near'), a fused score carries its own
    level's flags, the classical call keeps its own."""
    f = generate_field("0", seed=9301, variant="ultralow")
    config = ScoringConfig(false_membrane_percent=0.0, near_cutoff_points=100.0)  # no null doubt: the CNN may lift it
    plain = _score(f, config=config)
    assert plain.score == "0" and {"null", "ultralow"} & set(plain.flags) and "null_or_ultralow" not in plain.flags
    fused = _score(f, cnn=ConstantClassifier("1+"), config=config)
    assert (fused.classical_score, fused.score, fused.level) == ("0", "1+", "1+")
    assert set(fused.flags) == {"her2_low", "cnn_disagrees", "near_cutoff"}  # no stale "ultralow" / "null"
    assert fused.classical_level == plain.level and fused.classical_flags == plain.flags
    assert fused.reason.startswith("reported 1+ after fusing the classical call with the CNN: the CNN (a mean over the tissue's patches) reads 1+ (p=1.00), "
                                   f"the cells measured give {plain.level} on ")
    assert fused.classical_reason == plain.reason

    config = ScoringConfig(near_cutoff_points=100.0)
    two = generate_field("2+", seed=9302)
    up = _score(two, cnn=ConstantClassifier("3+"), config=config)
    assert (up.classical_score, up.score) == ("2+", "3+")
    assert set(up.flags) == {"cnn_disagrees", "near_cutoff"} and "ish_reflex" in up.classical_flags
    assert "reflex ISH" not in up.reason and "reflex ISH required" in up.classical_reason  # the reason is the 3+'s
    three = generate_field("3+", seed=9303)
    held = _score(three, cnn=ConstantClassifier("2+"), config=config)
    assert (held.classical_score, held.score) == ("3+", "2+") and "; reflex ISH required" in held.reason
    one = _score(generate_field("1+", seed=9304), config=config)
    down = _score(generate_field("1+", seed=9304), cnn=ConstantClassifier("0"), config=config)  # a 0 over cells >10% stained: plain 0
    assert one.score == "1+" and 100 - one.percentages["none"] > 10
    assert (down.score, down.level) == ("0", "0") and set(down.flags) == {"cnn_disagrees", "near_cutoff"}
    assert check_eligibility(down, "her2-ultralow-breast").status == "needs_review"
    far = _score(two, cnn=ConstantClassifier("0"), config=config)  # two scores off: the CNN tips a call one score at most
    assert (far.score, far.level) == ("2+", "2+") and "cnn_disagrees" in far.flags
    agree = _score(two, cnn=ConstantClassifier("2+"), config=config)
    assert agree.flags == agree.classical_flags and agree.level == agree.classical_level == "2+"


def test_the_cnn_never_tips_a_call_its_cells_leave_in_no_doubt():
    """A network trained on synthetic fields read a field of 86% intense complete cells 2+ (or a clear 2+ as 3+, its
    reflex ISH dropped), and the fused score reported it. It tips only a call the cells leave in doubt (near a
    cut-off, a cluster of ~5, intense cells at the isolated floor, a 1+ over moderate incomplete membranes)."""
    three = generate_field("3+", seed=9303)
    plain = _score(three)
    assert plain.score == "3+" and plain.percentages["strong_complete"] > 50 and "near_cutoff" not in plain.flags
    held = _score(three, cnn=ConstantClassifier("2+"))
    assert (held.classical_score, held.score, held.level) == ("3+", "3+", "3+")
    assert held.flags == (*plain.flags, "cnn_disagrees") and held.confidence == pytest.approx(0.4)
    assert held.reason == plain.reason + (
        "; the CNN (a mean over the tissue's patches) reads 2+ (p=1.00), not followed to 2+: the cells measured leave the "
        "call in no doubt (a network trained on synthetic fields tips only a call its cells leave in doubt)")
    two = _score(generate_field("2+", seed=9302), cnn=ConstantClassifier("3+"))
    assert (two.classical_score, two.score) == ("2+", "2+") and "ish_reflex" in two.flags
    decision = check_eligibility(held, "her2-positive-breast")  # the disagreement is still a doubt: a second opinion
    assert decision.status == "needs_review" and decision.reasons[0].startswith("classical score 3+ and CNN score 2+ disagree")


def test_an_ultralow_call_that_false_membranes_could_give_is_flagged():
    """Real unstained membranes read stained in ~6% of tumour cells (guidelines.FALSE_MEMBRANE_PERCENT):
    an ultralow call with no more staining than that says it could be null."""
    f = generate_field("0", seed=8100, variant="ultralow")
    r = _score(f)
    share = 100 - r.percentages["none"]
    assert r.level == "0+ (ultralow)" and 0 < share <= 8, r.reason
    assert "null_or_ultralow" in r.flags and f"the {share:.1f}% stained is within the 8% " in r.reason
    assert check_eligibility(r, "her2-ultralow-breast").status == "needs_review"
    strict = _score(f, config=ScoringConfig(false_membrane_percent=share / 4))  # under the lower end of its interval
    assert strict.level == "0+ (ultralow)" and "null_or_ultralow" not in strict.flags
    assert check_eligibility(strict, "her2-ultralow-breast").status == "eligible"


def test_unstained_tissue_with_real_borders_is_flagged_never_confidently_her2_low():
    """HER2 0 (null) fields drawn with real slides' unstained-border texture (synthetic.REAL_BORDERS)
    read 4-11% of their cells stained, as real unstained tissue does: each call is flagged so that
    the HER2-low rule never answers eligible, and an ultralow call says it could be null."""
    flagged = 0
    for seed in (8100, 8101, 8102, 8103):
        r = _score(generate_field("0", seed=seed, variant="null", confounders=REAL_BORDERS))
        assert check_eligibility(r, "her2-low-breast").status != "eligible", (seed, r.reason)
        if r.level == "0+ (ultralow)" and 100 - r.percentages["none"] <= 8:
            assert "null_or_ultralow" in r.flags, r.reason
        flagged += r.level == "0+ (ultralow)" and "null_or_ultralow" in r.flags
    assert flagged >= 3  # measured: 3 ultralow (4.2-8.2%) flagged, one 1+ at 10.9% flagged near_cutoff

# -- fields drawn with an explicit composition ---------------------------------------------------
# generate_field(composition={category: fraction of tumour cells}, clonal=True) draws each field with
# its stained cells in patches, as tumours express HER2; the rest of the tumour cells are unstained.
# The truth is the cells as seen (README: shared membranes); its deciding share sits at 8% or 12%.
SHARE_POINTS = 3.0
"""Percentage points within which the measured deciding share must match the truth's at a cut-off."""


def _field(composition: dict[str, float], seed: int, gastric: bool = False, size_px: int = 768, clonal: bool = False):
    return generate_field(seed=seed, composition=composition, gastric=gastric, size_px=(size_px, size_px), clonal=clonal)


def _share(r, categories) -> float:
    return 100 * sum(r.counts.get(c, 0) for c in categories) / r.tumour_cells


def _misses(measured: str):
    """The mark of a cut-off field the pipeline does not yet get right, with what it measured (6 Dec 2026, 0.5.0)."""
    return pytest.mark.xfail(strict=True, reason=f"measured: {measured} (README Limits; strict: a pass fails)")


def _case(guideline, composition, deciding, low, high, score, measured=None):
    return pytest.param(guideline, composition, deciding, low, high, score, marks=[_misses(measured)] if measured else [])


CASES = [
    # breast >10%: the deciding population near 8% and 12%
    _case(B23, {"weak_moderate_complete": 0.08}, ("weak_moderate_complete", "strong_complete"), 6, 9.5, "0",
          "7.4% (truth 8.0%), but with their neighbours' sides read lateral 10.3% of cells stained: called 1+ with near_cutoff"),
    _case(B23, {"weak_moderate_complete": 0.12}, ("weak_moderate_complete", "strong_complete"), 10.5, 14, "2+"),
    _case(B23, {"strong_complete": 0.12}, ("strong_complete",), 10.5, 14, "3+"),
    _case(B23, {"faint_partial": 0.08}, ("faint_partial",), 6, 9.5, "0", "3.6% (truth 8.0%), called 0: faint membranes under-found"),
    _case(B23, {"faint_partial": 0.12}, ("faint_partial",), 10.5, 14, "1+", "5.7% (truth 12.0%), called 0 with near_cutoff: faint membranes under-found"),
    _case(B23, {"strong_partial": 0.12}, ("strong_partial", "strong_lateral"), 10.5, 14, "2+",
          "8.6% (truth 12.0%), called 2+ with near_cutoff: intense incomplete cells read complete"),
    # gastric >=10%, lateral patterns count
    _case(G, {"strong_lateral": 0.08}, ("strong_lateral", "strong_complete"), 6, 9.5, "0"),
    _case(G, {"strong_lateral": 0.12}, ("strong_lateral", "strong_complete"), 10.5, 14, "3+"),
    _case(G, {"weak_moderate_lateral": 0.08}, ("weak_moderate_lateral", "weak_moderate_complete"), 6, 9.5, "0"),
    _case(G, {"weak_moderate_lateral": 0.12}, ("weak_moderate_lateral", "weak_moderate_complete"), 10.5, 14, "2+"),
]
ARGS = ("guideline", "composition", "deciding", "low", "high", "score")


def _cut_off_field(guideline, composition, deciding, low, high, score):
    f = _field(composition, seed=9400 + int(100 * sum(composition.values())), gastric=guideline == G, clonal=True)
    counts = f.truth_counts()
    truth_share = 100 * sum(counts[c] for c in deciding) / sum(counts.values())
    assert low <= truth_share <= high and f.score == score, (truth_share, f.score)  # the generator's truth
    return f, truth_share


@pytest.mark.parametrize(ARGS, [pytest.param(*c.values) for c in CASES])
def test_never_a_confident_wrong_call_at_a_cut_off(guideline, composition, deciding, low, high, score):
    """Either side of 10%: the call is right, or it carries near_cutoff, so that eligibility asks for
    review where the other side would change it."""
    f, _ = _cut_off_field(guideline, composition, deciding, low, high, score)
    r = _score(f, guideline=guideline)
    assert r.score == score or "near_cutoff" in r.flags, (r.score, r.reason, r.counts)


@pytest.mark.parametrize(ARGS, CASES)
def test_either_side_of_a_cut_off(guideline, composition, deciding, low, high, score):
    """The deciding share within SHARE_POINTS of the truth's, and the call the truth's."""
    f, truth_share = _cut_off_field(guideline, composition, deciding, low, high, score)
    r = _score(f, guideline=guideline)
    assert abs(_share(r, deciding) - truth_share) <= SHARE_POINTS, (truth_share, r.counts)
    assert r.score == score, r.reason


def test_intense_incomplete_cells_make_an_equivocal_2plus():
    f = _field({"strong_partial": 0.20}, seed=9501)
    r = _score(f)
    assert (r.score, r.level) == ("2+", "2+") and {"ish_reflex", "unusual_pattern"} <= set(r.flags), r.reason
    # the intense incomplete cells make most of the deciding share, not misread complete ones alone (a 2+ the
    # "intense complete in <=10%" pattern would give too)
    assert r.counts["strong_partial"] > 2 * r.counts["strong_complete"] and "intense incomplete" in r.reason, r.counts
    assert r.h_score >= 3 * 15  # intense cells weigh 3 in the H-score, not 1
    gastric = _score(_field({"strong_partial": 0.20}, seed=9501, gastric=True), guideline=G)
    assert gastric.score == "1+", gastric.reason  # gastric: partial non-U membranes are 1+ cells


def test_intense_incomplete_share_end_to_end():
    r = _score(_field({"strong_partial": 0.20}, seed=9501))
    assert 15 <= _share(r, ("strong_partial",)) <= 25, r.counts


def test_isolated_intense_cells_end_to_end():
    f = _field({"strong_complete": 0.004}, seed=9502, size_px=1024)  # 6 intense complete cells among 1,550
    r = _score(f)
    n = r.counts["strong_complete"]
    assert 0 < n < 0.01 * r.tumour_cells, r.counts
    assert r.score == "0" and "isolated_intense_cells" in r.flags, r.reason
    assert f"isolated intense cells: {n:,} of {r.tumour_cells:,}" in r.reason
    literal = _score(f, config=ScoringConfig(isolated_intense_percent=0.0))
    assert literal.score == "2+" and "unusual_pattern" in literal.flags, literal.reason
    assert check_eligibility(r, "her2-ultralow-breast").status == "needs_review"  # 2+ would await ISH
    three_only = Rule(name="3+ only", version="1", guideline="breast", eligible_levels=("3+",))
    assert check_eligibility(r, three_only).status == "not_eligible"  # not 3+ either way
    # fused to 1+ by the CNN, the call keeps the cells' flag and words, and trastuzumab still asks for review: as the
    # pattern they would make it 2+, where ISH decides (the fused call dropped both, and the answer was not eligible)
    fused = _score(f, cnn=ConstantClassifier("1+"), config=ScoringConfig(false_membrane_percent=0.0, near_cutoff_points=100.0))
    assert (fused.classical_score, fused.score) == ("0", "1+") and "isolated_intense_cells" in fused.flags, fused.reason
    assert f"isolated intense cells: {n:,} of {r.tumour_cells:,}" in fused.reason
    assert check_eligibility(fused, "her2-positive-breast").status == "needs_review"
    older = replace(fused, flags=tuple(x for x in fused.flags if x != "isolated_intense_cells"))  # as 0.5.0 wrote it
    assert check_eligibility(older, "her2-positive-breast").status == "needs_review"  # its classical flags say so


def test_intense_cells_just_over_the_isolated_floor_are_flagged_end_to_end():
    f = _field({"strong_complete": 0.015}, seed=9503, size_px=1024)  # 15 intense complete cells drawn, 14 found
    r = _score(f)
    n = r.counts["strong_complete"]
    assert r.score == "2+" and "near_cutoff" in r.flags and 0.01 * r.tumour_cells <= n <= 0.02 * r.tumour_cells, r.counts
    assert f"its {n} intense complete cells ({percent_text(100 * n / r.tumour_cells, 1.0)} of {r.tumour_cells}) lie just over the 1% / " \
           f"5-cell floor below which they would be isolated cells: it could be 0+ (ultralow)" in r.reason
    assert check_eligibility(r, "her2-low-breast", ish="negative").status == "needs_review"  # 2+ ISH- eligible, ultralow not


def test_a_gastric_biopsy_cluster_one_cell_from_the_rules_5_is_flagged_end_to_end():
    """A gastric biopsy of sparse clonal 2+ cells (1.5% drawn): its 0 call has a 2+ cluster of 4, one short of the
    rule's 5, and a 1+ cluster of 4; both are named, and gastric-toga asks for review (at 2+, ISH). (Seed 9600 read
    clusters of 3 with every morphological step's kernel round: 9635 is the first of 9600-9639 whose largest 2+ and
    1+ clusters both read 4.)"""
    f = generate_field(seed=9635, composition={"weak_moderate_complete": 0.015}, gastric=True, clonal=True)
    r = _score(f, guideline=G, specimen="biopsy")
    assert (r.score, r.clusters) == ("0", {"3+": 0, "2+": 4, "1+": 4}), (r.score, r.clusters)
    assert "near_cutoff" in r.flags
    assert "a cohesive cluster of 4 tumour cells at 2+ or stronger, one short of the biopsy rule's 5: it could be 2+" in r.reason
    assert "a cohesive cluster of 4 tumour cells at 1+ or stronger, one short of the biopsy rule's 5: it could be 1+" in r.reason
    decision = check_eligibility(r, "gastric-toga")
    assert decision.status == "needs_review" and "at 2+ the answer would be needs review" in decision.reasons[0]


def test_a_fused_call_names_the_edge_its_classical_call_lay_on():
    """A classical 2+ whose intense complete cells lie just over the isolated floor, tipped to 1+ by a CNN: the fused
    reason named 'a cluster one cell from the biopsy rule's 5, or intense cells at the isolated floor' whichever it was."""
    from types import SimpleNamespace

    from her2score.pipeline import _fused_call, _guideline_call
    from her2score.results import CnnReport

    counts = dict(none=275, faint_partial=120, strong_complete=5)
    read = SimpleNamespace(blush=None, rise=None, filled=None, scan_mpp=0.5, region_source="")
    classical = _guideline_call(counts, 400, {}, ScoringConfig(), read)
    assert classical.score == "2+" and classical.near_sides == () and classical.open_to == ("1+",)
    fused, _ = _fused_call(classical, CnnReport("1+", {"0": 0.0, "1+": 1.0, "2+": 0.0, "3+": 0.0}, 1, "m"), counts, 400, {},
                           ScoringConfig(), read)
    assert fused.score == "1+" and fused.reason.endswith(
        "; the 2+ the cells measured give is open to 1+: its 5 intense complete cells (1.2% of 400) lie just "
        "over the 1% / 5-cell floor below which they would be isolated cells: it could be 1+"), fused.reason
    # a 0 on a coarse scan lifted to 1+: the doubt that opened it is named (an edge of the guideline's words was, which
    # the CNN is not let settle, and coarse_scan_zero went unsaid)
    counts = dict(none=955, weak_moderate_complete=35, faint_partial=10)
    coarse = SimpleNamespace(**{**vars(read), "scan_mpp": 0.75})
    classical = _guideline_call(counts, 1000, {}, ScoringConfig(), coarse)
    assert "coarse_scan_zero" in classical.flags and classical.open_to == ("1+",)
    fused, _ = _fused_call(classical, CnnReport("1+", {"0": 0.1, "1+": 0.8, "2+": 0.05, "3+": 0.05}, 1, "m"), counts, 1000, {},
                           ScoringConfig(), coarse)
    assert fused.score == "1+" and fused.reason.endswith(
        "; the 0+ (ultralow) the cells measured give is open to 1+: a 0 on a scan coarser than 0.55 µm/px, where faint "
        "membranes read weaker and fewer, could be 1+"), fused.reason


def test_a_blushed_her2_0_read_1plus_is_flagged_and_reviewed():
    """HER2 0 fields with a cytoplasmic blush (0.1 OD in every tumour cell) on real slides' border texture read
    1+ (faint membranes from cytoplasm and borders); the unstained tumour cells' cytoplasm, darker than the
    stroma's by the blush, flags it, and the HER2-low rule asks for review. A 2+ field with no blush is not flagged."""
    from her2score.synthetic import Confounders
    from her2score.guidelines import DIFFUSE_CYTOPLASM_OD

    blushed = Confounders(cytoplasmic_od=0.1, border_od=REAL_BORDERS.border_od)
    r = _score(generate_field("0", seed=7100, confounders=blushed))
    assert r.score == "1+" and "cytoplasmic_dab" in r.flags, (r.score, r.flags)
    assert 0.08 < r.staining["diffuse_cytoplasm_od"] < 0.11 and "the membranes read may be cytoplasm" in r.reason
    assert check_eligibility(r, "her2-low-breast").status == "needs_review"
    plain = _score(generate_field("2+", seed=7003))
    assert "cytoplasmic_dab" not in plain.flags and plain.staining["diffuse_cytoplasm_od"] < DIFFUSE_CYTOPLASM_OD / 4
    # a held-out 3+ field (evaluation set, stain jitter 6): its cells misread as unstained keep a 3+ cell's haze,
    # over the bound, but its membranes stand out four times as far: membranes, not cytoplasm
    haze = _score(generate_field("3+", seed=853377318, stain_jitter=6.0))
    assert haze.staining["diffuse_cytoplasm_od"] > DIFFUSE_CYTOPLASM_OD and haze.staining["membrane_contrast_od"] > 0.25
    assert haze.score == "3+" and "cytoplasmic_dab" not in haze.flags


def test_a_blushed_her2_0_with_little_stroma_is_flagged_too():
    """A blushed HER2 0 on real borders with little stroma (30 stromal cells among 323 tumour cells): most cells
    left out as no tumour are blushed tumour cells, and so is the palest tenth of cells (0.09 OD), so the blush
    measured against them read 0.019 and the 1+ at 37% went unflagged, HER2-low eligible. Its reference is now
    held at UNSTAINED_MAX_OD, over the palest tenth of every real image."""
    from her2score.synthetic import Confounders
    from her2score.tumour import UNSTAINED_MAX_OD

    blushed = Confounders(cytoplasmic_od=0.1, border_od=REAL_BORDERS.border_od)
    f = generate_field("0", seed=25103, variant="null", confounders=blushed)
    assert (~f.cells["tumour"]).sum() < 0.1 * f.cells["tumour"].sum()
    r = _score(f)
    assert r.score == "1+" and "cytoplasmic_dab" in r.flags, (r.score, r.flags)
    assert r.staining["diffuse_cytoplasm_od"] >= 0.1 - UNSTAINED_MAX_OD - 0.01, r.staining
    assert check_eligibility(r, "her2-low-breast").status == "needs_review"


def test_a_3plus_whose_nuclei_dab_hides_reads_3plus():
    """Strong staining can hide a nucleus under DAB (Confounders.masking_od: 1 OD over the nuclei of every
    membrane-stained cell): the masked cells are still found (as brown nuclei, or as membrane basins), at
    least 90% as many tumour cells as on the same field unmasked, and the field reads 3+ with its strong
    complete fraction within 5 points of the truth."""
    from her2score.synthetic import Confounders

    for seed in (26102, 26103):
        plain = _score(generate_field("3+", seed=seed))
        f = generate_field("3+", seed=seed, confounders=Confounders(masking_od=1.0))
        assert np.array_equal(f.cells["category"], generate_field("3+", seed=seed).cells["category"])  # the same truth
        r = _score(f)
        truth = f.truth_counts()
        true_strong = 100 * truth["strong_complete"] / sum(truth.values())
        assert r.score == plain.score == "3+" and r.tumour_cells >= 0.9 * plain.tumour_cells, (seed, r.tumour_cells, plain.tumour_cells)
        assert abs(r.percentages["strong_complete"] - true_strong) <= 5, (seed, r.percentages["strong_complete"], true_strong)


def test_a_nuclear_stain_drawn_by_the_generator_is_refused():
    """The generator's Ki67 look-alike (a HER2 0 field with DAB of 0.4-0.9 OD on half its nuclei) is refused as
    nuclear DAB, as the real Ki67 fields are (tests/test_real.py), and not scored."""
    from her2score.pipeline import NuclearStainError
    from her2score.synthetic import Confounders

    f = generate_field("0", seed=26000, variant="null", confounders=Confounders(nuclear_dab_fraction=0.5))
    with pytest.raises(NuclearStainError, match=r"DAB is nuclear.* 0(\.0)?% a stained membrane"):
        _score(f)


def test_a_fused_call_over_cells_near_a_cut_off_keeps_the_doubt():
    """A classical 1+ on 17.1% faint cells lies within the false-membrane band of the cut-off (10-18%: it could be 0),
    beyond the measurement's own 5.5-point margin (the field is drawn for it: 30% faint cells, its seed the first of
    11-13 that reads over 15.5% with every morphological step's kernel round; seed 11 read 17.3% before, 15.1% since).
    A CNN reading 0 fuses it to that side: the fused call keeps near_cutoff, so HER2-low with ISH negative asks for
    review, as the classical call alone does (it answered eligible). A CNN reading 2+ is not followed: the cells
    leave no doubt of 2+. A classical call with the band switched off does not say it."""
    f = generate_field(seed=12, composition={"faint_partial": 0.30}, size_px=(768, 768))
    r = _score(f, cnn=ConstantClassifier("0"))
    assert (r.classical_score, r.score) == ("1+", "0") and 15.5 < 100 - r.percentages["none"] < 18, r.percentages
    assert "near_cutoff" in r.classical_flags and "near_cutoff" in r.flags
    assert _score(f, cnn=ConstantClassifier("2+")).score == "1+"
    assert "real unstained membranes read stained in up to 8% of cells): it could be 0" in r.classical_reason
    assert check_eligibility(r, "her2-low-breast", ish="negative").status == "needs_review"
    off = _score(f, config=ScoringConfig(false_membrane_percent=0.0))
    assert "near_cutoff" not in off.flags and "real unstained membranes" not in off.reason


def test_the_null_doubt_reads_a_share_on_few_cells_within_its_interval():
    """The CNN is held from lifting a 0 whose share could be false membranes within its 95% interval (a real Ki67
    field: 9.1% of 66 cells), and its reason said so, but the null_or_ultralow flag read the bare share: not set.
    Both now read the interval."""
    from her2score.guidelines import with_null_doubt

    flags, words = with_null_doubt(("ultralow",), {"none": 60, "faint_partial": 6}, "0+ (ultralow)")
    assert flags == ("ultralow", "null_or_ultralow")
    assert words == ("; the 9.1% stained of 66 tumour cells is, within its 95% interval, no more than the 8% real "
                     "unstained membranes read: it could be 0 (null)")
    assert with_null_doubt(("ultralow",), {"none": 60000, "faint_partial": 6000}, "0+ (ultralow)")[0] == ("ultralow",)


def test_a_breast_zero_on_weak_to_moderate_complete_cells_says_they_could_be_1_plus():
    """5% weak-to-moderate complete cells: an ultralow by this tool's reading of any staining in <=10%, which the
    guideline's 0 (faint incomplete staining) does not describe; the call says it could be 1+ (her2-low: review)."""
    r = _score(_field({"weak_moderate_complete": 0.05}, seed=9601, size_px=1024))
    assert r.level == "0+ (ultralow)" and "near_cutoff" in r.flags, r.reason
    assert re.search(r"; [0-9.]+% of [0-9,]+ tumour cells are stained more than faint \(weak-to-moderate complete [0-9.]+%.*\), "
                     r"which the guideline's 0 \(faint incomplete staining\) does not describe: it could be 1\+$", r.reason), r.reason
    assert check_eligibility(r, "her2-low-breast").status == "needs_review"


def test_a_cnn_does_not_settle_what_a_breast_0_over_cells_stained_more_than_faint_could_be():
    """The 1+ such a 0 could be is a reading of the guideline's words, not of the cells: a CNN reading 1+ lifted a 0 of
    3.5% stained cells to a reported 1+ (HER2-low), which no rule gives; it is held, and the reason says why."""
    f = _field({"weak_moderate_complete": 0.035}, seed=9603, size_px=1024)
    r = _score(f, cnn=ConstantClassifier("1+"))
    assert r.level == "0+ (ultralow)" and "cnn_disagrees" in r.flags, r.reason
    assert "stained more than faint" in r.reason and r.reason.endswith(
        "not followed to 1+: the cells measured leave no other score the CNN may settle (a network trained on synthetic fields tips "
        "only a call its cells leave in doubt; the 1+ they could be is a reading of the guideline's words, which it does not settle)")
