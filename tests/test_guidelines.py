"""Guideline scores from cell counts: cases from ASCO/CAP 2018/2023 and Hofmann 2008 / CAP 2016."""
from __future__ import annotations

import numpy as np
import pytest

from her2score.categories import CATEGORIES
from her2score.guidelines import (
    GUIDELINES,
    INTENSITY,
    ISOLATED_INTENSE_PERCENT,
    PANCREATIC_NOTE,
    STAINING_LEVEL,
    apply_guideline,
    cluster_sides,
    cluster_words,
    cumulative_counts,
    isolated_sides,
    deciding_cells,
    h_score,
    level_flags,
    near_cutoff,
    near_cutoff_sides,
    report_level,
)

B18, B23, G = GUIDELINES


def cells(none: int = 0, fp: int = 0, wmc: int = 0, sc: int = 0, wml: int = 0, sl: int = 0, sp: int = 0,
          wmp: int = 0) -> dict[str, int]:
    return {
        "none": none,
        "faint_partial": fp,
        "weak_moderate_complete": wmc,
        "strong_complete": sc,
        "weak_moderate_lateral": wml,
        "strong_lateral": sl,
        "strong_partial": sp,
        "weak_moderate_partial": wmp,
    }


CASES = [
    # (counts, guideline, score, level, flags that must be present)
    (cells(none=66, sc=34), B23, "3+", "3+", ()),
    (cells(none=89, sc=11), B18, "3+", "3+", ()),
    (cells(none=90, sc=10), B18, "2+", "2+", ("ish_reflex", "unusual_pattern")),  # exactly 10%: not 3+
    (cells(none=70, wmc=30), B23, "2+", "2+", ("ish_reflex",)),
    (cells(none=89, wmc=11), B23, "2+", "2+", ("ish_reflex",)),
    (cells(none=89, wmc=10, fp=1), B23, "1+", "1+", ("her2_low",)),  # exactly 10% complete: not 2+
    (cells(none=88, wmc=6, sc=6), B23, "2+", "2+", ("ish_reflex",)),  # cumulative: 12% complete >= 2+
    (cells(none=80, sl=20), B23, "2+", "2+", ("ish_reflex", "unusual_pattern")),  # intense lateral > 10%
    (cells(none=95, sc=5), B23, "2+", "2+", ("ish_reflex", "unusual_pattern")),  # intense complete <= 10%
    (cells(none=80, sp=20), B23, "2+", "2+", ("ish_reflex", "unusual_pattern")),  # intense incomplete, non-U
    (cells(none=88, sp=6, sl=6), B23, "2+", "2+", ("ish_reflex", "unusual_pattern")),  # 12% intense incomplete
    (cells(none=89, sp=11), B18, "2+", "2+", ("ish_reflex", "unusual_pattern")),
    (cells(none=90, sp=10), B23, "0", "0+ (ultralow)", ("ultralow",)),  # exactly 10%: not >10%
    (cells(none=88, sp=8, fp=4), B23, "1+", "1+", ("her2_low",)),  # 8% intense incomplete: 12% stained
    (cells(none=95, wmc=5), B23, "0", "0+ (ultralow)", ("ultralow",)),  # weak-moderate complete <= 10%
    (cells(none=95, wmc=5), B18, "0", "0", ()),
    (cells(none=80, wml=20), B23, "2+", "2+", ("ish_reflex", "unusual_pattern")),  # moderate lateral (ASCO/CAP 2018 note)
    (cells(none=89, wml=6, sp=5), B23, "2+", "2+", ("ish_reflex", "unusual_pattern")),  # 11% lateral or intense incomplete
    (cells(none=90, wml=10), B23, "0", "0+ (ultralow)", ("ultralow",)),  # exactly 10%: not >10%
    (cells(none=88, wml=8, fp=4), B23, "1+", "1+", ("her2_low",)),  # 8% lateral: 12% stained
    (cells(none=60, fp=40), B23, "1+", "1+", ("her2_low",)),
    (cells(none=89, fp=11), B23, "1+", "1+", ()),
    (cells(none=90, fp=10), B23, "0", "0+ (ultralow)", ("ultralow",)),  # exactly 10%: not 1+
    (cells(none=99, fp=1), B23, "0", "0+ (ultralow)", ("ultralow",)),
    (cells(none=100), B23, "0", "0 (null)", ("null",)),
    (cells(none=95, fp=5), B18, "0", "0", ()),
    (cells(none=100), B18, "0", "0", ()),
    # gastric resection: >= 10%, complete and lateral alike
    (cells(none=90, sc=10), G, "3+", "3+", ()),  # exactly 10% IS enough
    (cells(none=90, sc=9, wmc=1), G, "2+", "2+", ("ish_reflex",)),  # 9% strong counts towards 2+ (10%)
    (cells(none=90, sl=10), G, "3+", "3+", ()),  # lateral/basolateral strong
    (cells(none=90, wml=10), G, "2+", "2+", ("ish_reflex",)),
    (cells(none=90, wml=3, wmc=3, fp=4), G, "1+", "1+", ()),  # 6% at 2+, 10% stained
    (cells(none=90, fp=10), G, "1+", "1+", ()),
    (cells(none=91, fp=9), G, "0", "0", ()),
    (cells(none=80, sp=20), G, "1+", "1+", ()),  # gastric: intense but non-U partial membranes are 1+ cells
    (cells(none=90, sp=5, wmc=5), G, "1+", "1+", ()),  # 5% at 2+, 10% stained
]


@pytest.mark.parametrize(("counts", "guideline", "score", "level", "flags"), CASES)
def test_guideline_table(counts, guideline, score, level, flags):
    call = apply_guideline(counts, guideline)
    assert (call.score, call.level) == (score, level), call.reason
    assert set(flags) <= set(call.flags)
    assert call.guideline == guideline and call.specimen == "resection"


def test_reason_names_the_deciding_percentage():
    call = apply_guideline(cells(none=658, sc=342), B23)
    assert call.reason == "strong complete membrane staining in 34.2% of tumour cells (342/1000, >10%)"
    assert "reflex ISH" in apply_guideline(cells(none=70, wmc=30), B18).reason


def test_breast_2023_differs_from_2018_only_in_the_zero_split():
    for counts, *_ in CASES:
        a, b = apply_guideline(counts, B18), apply_guideline(counts, B23)
        assert a.score == b.score
        if a.score != "0":
            assert (a.level, a.flags, a.reason) == (b.level, b.flags, b.reason)


@pytest.mark.parametrize(
    ("counts", "clusters", "score"),
    [
        (cells(none=95, sc=5), {"3+": 5, "2+": 5, "1+": 5}, "3+"),  # 5-cell cluster decides at 5%
        (cells(none=96, sc=4), {"3+": 4, "2+": 4, "1+": 4}, "0"),  # 4 cells: not enough, 4% < 10%
        (cells(none=94, sc=4, wmc=2), {"3+": 4, "2+": 6, "1+": 6}, "2+"),
        (cells(none=95, fp=5), {"1+": 5}, "1+"),
        (cells(none=90, wmc=10), {}, "2+"),  # percentages still apply to biopsies
    ],
)
def test_gastric_biopsy_clusters(counts, clusters, score):
    call = apply_guideline(counts, G, "biopsy", clusters=clusters)
    assert call.score == score, call.reason
    assert call.specimen == "biopsy"


def test_gastric_biopsy_cluster_reason():
    call = apply_guideline(cells(none=95, sc=5), G, "biopsy", clusters={"3+": 5})
    assert "cluster of 5 tumour cells" in call.reason and "5.0% of tumour cells (5/100, <10%)" in call.reason


def test_counts_given_as_booleans_are_refused():
    with pytest.raises(ValueError, match="must be an integer, got True"):
        apply_guideline({"none": True, "strong_complete": True}, B23)


def test_a_share_just_off_the_cut_off_is_never_printed_as_the_cut_off():
    """996 of 10,000 is 9.96%, not "10.0%" under a rule of >=10% (nor 1,004 "10.0%" under >10%)."""
    assert "9.96% of tumour cells (996/10000, <10%)" in apply_guideline(cells(none=9004, fp=996), G).reason
    assert "10.04% of tumour cells (1004/10000, >10%)" in apply_guideline(cells(none=8996, fp=1004), B23).reason
    assert "10.0% of tumour cells (1000/10000, >=10%)" in apply_guideline(cells(none=9000, fp=1000), G).reason


def test_public_helpers_refuse_unknown_names():
    from her2score.guidelines import deciding_cells, level_flags, near_cutoff_sides, report_level

    c = cells(none=90, fp=10)
    for bad in (lambda: deciding_cells(c, "Gastric"), lambda: level_flags("1+", "lung"),
                lambda: report_level("4+", B23, c), lambda: report_level("0", "breast-2023", c),
                lambda: deciding_cells(c, G, gastric_reading="perband"), lambda: near_cutoff_sides(c, "banana")):
        with pytest.raises(ValueError, match="unknown"):
            bad()
    assert near_cutoff_sides(c, None) == []


def test_clusters_ignored_for_resection():
    assert apply_guideline(cells(none=97, sc=3), G, clusters={"3+": 50}).score == "0"


def test_h_score_by_hand():
    # 10% faint (1), 20% weak-moderate (2), 30% strong (3): 10 + 40 + 90 = 140
    counts = cells(none=40, fp=10, wmc=15, wml=5, sc=20, sl=10)
    assert h_score(counts) == pytest.approx(140.0)
    assert apply_guideline(counts, B23).h_score == pytest.approx(140.0)
    assert h_score(cells(sc=7)) == 300.0 and h_score(cells(none=7)) == 0.0


def test_intense_incomplete_cells_are_intense_in_the_h_score():
    # 20% intense incomplete: intensity 3, not the faint 1 -> H = 60 (it was 20 when they were faint_partial)
    assert h_score(cells(none=80, sp=20)) == pytest.approx(60.0)
    assert apply_guideline(cells(none=80, sp=20), G).h_score == pytest.approx(60.0)
    # ...but a 1+ cell in the pattern levels (partial, not complete or U-shaped)
    assert cumulative_counts(cells(none=80, sp=20)) == {"3+": 0, "2+": 0, "1+": 20, "any": 20, "total": 100}
    assert set(INTENSITY) == set(STAINING_LEVEL) == set(CATEGORIES)
    assert [c for c in CATEGORIES if INTENSITY[c] != STAINING_LEVEL[c]] == ["strong_partial", "weak_moderate_partial"]


def test_weak_to_moderate_incomplete_cells_are_1plus_cells_of_intensity_2():
    """A weak-to-moderate incomplete, non-lateral membrane is a 1+ cell under both guidelines (ASCO/CAP 1+:
    incomplete staining; gastric 1+: reactive in part of its membrane), but weighs 2 in the H-score."""
    for guideline in (B23, G):
        call = apply_guideline(cells(none=80, wmp=20), guideline)
        assert (call.score, call.h_score) == ("1+", pytest.approx(40.0)), call.reason
    assert apply_guideline(cells(none=80, wmp=20), B23).reason == (
        "weak-to-moderate incomplete (non-lateral) membrane staining in 20.0% of tumour cells (20/100, >10%)")
    assert apply_guideline(cells(none=95, wmp=5), B23).level == "0+ (ultralow)"
    assert cumulative_counts(cells(none=80, wmp=20)) == {"3+": 0, "2+": 0, "1+": 20, "any": 20, "total": 100}
    assert apply_guideline(cells(none=80, wmp=10, sp=10), B23).score == "1+"  # 10% intense incomplete: not >10%


def test_a_breast_1plus_over_incomplete_membranes_stronger_than_faint_is_a_doubt_between_1plus_and_2plus():
    """ASCO/CAP's 1+ is faint/barely perceptible incomplete staining; its 2018 note calls moderate to intense
    incomplete staining equivocal. Weak and moderate are one band here, so a 1+ resting on such cells keeps its
    score and says that a pathologist decides 1+ or 2+ (before: a plain 1+, her2_low, no doubt)."""
    from her2score.guidelines import moderate_incomplete, with_incomplete_doubt
    from her2score.results import DOUBT_FLAGS

    for counts, share in ((cells(none=80, wmp=20), 20.0), (cells(none=160, wmp=12, sp=9, fp=19), 10.5),
                          (cells(none=140, wmp=12, wml=9, fp=39), 10.5),
                          (cells(none=140, wmp=12, wmc=9, fp=39), 10.5)):  # a 2+ kind's complete cells count too (0.5.4)
        call = apply_guideline(counts, B23)
        assert call.level == "1+" and moderate_incomplete(counts, call.level, B23) == pytest.approx(share)
        flags, words = with_incomplete_doubt(call.flags, counts, call.level, B23)
        assert flags == ("her2_low", "moderate_incomplete") and "moderate_incomplete" in DOUBT_FLAGS
        assert words.startswith(f"; {share:.1f}% of tumour cells show membranes stronger than faint, weak-to-moderate "
                                "incomplete ones among them")
        assert "a pathologist decides 1+ or 2+ (reflex ISH)" in words
    for counts, level, guideline in ((cells(none=90, wmp=10, fp=20), "1+", B23),  # 10%: not >10%
                                     (cells(none=80, wml=5, sp=4, fp=11), "1+", B23),  # no weak-to-moderate incomplete cell
                                     (cells(none=54, fp=15, wmc=15, wmp=1), "1+", B23),  # a CNN's 1+ over 2+ kinds >10% alone
                                     (cells(none=80, fp=20), "1+", B23),  # faint: the guideline's own 1+
                                     (cells(none=80, wmp=20), "1+", G),  # gastric 1+: reactive in part of the membrane
                                     (cells(none=95, wmp=5), "0+ (ultralow)", B23)):
        assert moderate_incomplete(counts, level, guideline) is None
    assert moderate_incomplete(cells(none=80, wmp=20), "1+", B18) == pytest.approx(20.0)  # the 2018 note's own guideline
    assert with_incomplete_doubt(("her2_low",), cells(none=80, fp=20), "1+", B23) == (("her2_low",), "")


def test_intense_incomplete_reason_names_the_cells():
    call = apply_guideline(cells(none=88, sp=6, sl=6), B23)
    assert call.reason == (
        "unusual pattern: intense but incomplete membrane staining in 12.0% of tumour cells (12/100, >10%): "
        "intense lateral 6.0%, intense incomplete (non-lateral) 6.0%; reflex ISH required"
    )


@pytest.mark.parametrize(
    ("counts", "words"),
    [
        (cells(none=95, wmc=5), "weak-to-moderate complete membrane staining in 5.0% of tumour cells (5/100, >0% and <=10%)"),
        (cells(none=95, wml=5), "weak-to-moderate lateral membrane staining in 5.0%"),
        (cells(none=95, fp=5), "faint membrane staining in 5.0%"),
        (cells(none=95, fp=2, wmc=3), "membrane staining in 5.0% of tumour cells (5/100, >0% and <=10%): "
                                      "faint 2.0%, weak-to-moderate complete 3.0%"),
    ],
)
def test_ultralow_reason_describes_the_deciding_cells(counts, words):
    call = apply_guideline(counts, B23)
    assert call.level == "0+ (ultralow)" and words in call.reason
    assert ("faint" in call.reason) == bool(counts["faint_partial"])


def test_an_ultralow_call_over_cells_more_than_faint_says_it_is_the_tools_reading():
    """DESTINY-Breast06 names barely perceptible, incomplete staining ultralow; complete, lateral or weak-to-moderate
    cells in <=10% are ultralow here by this tool's reading, and the reason says so (a pathologist's review)."""
    words = "ultralow as this tool reads any staining in <=10%"
    assert words in apply_guideline(cells(none=94, wmc=6), B23).reason
    assert words in apply_guideline(cells(none=94, fp=3, wmp=3), B23).reason
    assert words not in apply_guideline(cells(none=94, fp=6), B23).reason


def test_one_plus_reason_describes_mixed_cells():
    call = apply_guideline(cells(none=87, wmc=8, fp=5), B23)
    assert call.level == "1+"
    assert call.reason == ("membrane staining in 13.0% of tumour cells (13/100, >10%): "
                           "faint 5.0%, weak-to-moderate complete 8.0%")


# -- isolated intense cells: the "intense complete in <=10%" pattern has a noise floor -------------

def test_isolated_intense_cells_count_as_the_stained_complete_cells_they_are():
    """Below the floor, intense complete cells do not make the 'intense complete in <=10%' 2+, but they are
    stained: three in 10,412 make a 0 ultralow, not null (as report_level names a 0 with stained cells)."""
    call = apply_guideline(cells(none=10_409, sc=3), B23)
    assert (call.score, call.level) == ("0", "0+ (ultralow)")
    assert call.level == report_level("0", B23, cells(none=10_409, sc=3))
    assert set(call.flags) == {"ultralow", "isolated_intense_cells"}
    assert "isolated intense cells: 3 of 10,412" in call.reason and "counted as stained complete cells" in call.reason
    assert call.reason.startswith("intense complete membrane staining in 0.03% of tumour cells (3/10412, >0% and <=10%)")
    assert call.h_score == pytest.approx(100 * 9 / 10_412)  # the cells are still measured
    low = apply_guideline(cells(none=8_409, sc=3, fp=2_000), B23)
    assert (low.level, set(low.flags)) == ("1+", {"her2_low", "isolated_intense_cells"})
    ultralow = apply_guideline(cells(none=9_909, sc=3, fp=500), B23)
    assert (ultralow.level, set(ultralow.flags)) == ("0+ (ultralow)", {"ultralow", "isolated_intense_cells"})
    assert apply_guideline(cells(none=10_409, sc=3), B18).flags == ("isolated_intense_cells",)
    # the reason names the part of the floor that makes them isolated: 4% is over 1%, but 4 cells are under 5
    assert "(4.0%, fewer than the 5 cells that the" in apply_guideline(cells(none=96, sc=4), B23).reason
    assert "(0.999%, under the 1% of tumour cells" in apply_guideline(cells(none=99_001, sc=999), B23).reason  # not "1%"
    assert "(0.9%, under the 1% of tumour cells that the" in apply_guideline(cells(none=991, sc=9), B23).reason


@pytest.mark.parametrize(
    ("strong", "total", "floor", "score"),
    [
        (1, 10_000, ISOLATED_INTENSE_PERCENT, "0"),
        (99, 10_000, 1.0, "0"),  # 0.99%: below the 1% default floor
        (100, 10_000, 1.0, "2+"),  # exactly 1%: a population
        (1, 10_000, 0.0, "2+"),  # floor 0: the literal guideline, one cell is enough
        (20, 1_000, 2.5, "0"),
        (25, 1_000, 2.5, "2+"),
    ],
)
def test_isolated_floor_is_configurable(strong, total, floor, score):
    call = apply_guideline(cells(none=total - strong, sc=strong), B23, isolated_intense_percent=floor)
    assert call.score == score, call.reason
    assert ("isolated_intense_cells" in call.flags) == (score == "0")
    assert ISOLATED_INTENSE_PERCENT == 1.0


def test_isolated_floor_only_where_it_decides():
    # >10% complete staining or >10% intense incomplete decides first: no isolated flag
    for counts in (cells(none=85, wmc=14, sc=1), cells(none=85, sp=14, sc=1)):
        assert "isolated_intense_cells" not in apply_guideline(counts, B23).flags
    # gastric has no "intense complete in <=10%" pattern: a single strong cell is simply a stained cell
    assert apply_guideline(cells(none=9_999, sc=1), G).flags == ()


@pytest.mark.parametrize(
    ("counts", "floor", "sides"),
    [
        (dict(none=395, sc=5), 1.0, [("0", "0+ (ultralow)")]),  # 5 cells: one fewer is under the 5-cell floor
        (dict(none=989, sc=11), 1.0, [("0", "0+ (ultralow)")]),  # 1.1%: its 95% interval (0.6-2.0%) reaches under 1%
        (dict(none=800, sc=11, fp=189), 1.0, [("1+", "1+")]),  # stained cells in 20%: 1+
        (dict(none=970, sc=30), 1.0, []),  # 3.0% (2.1-4.3%): sure of its side
        (dict(none=396, sc=4), 1.0, []),  # isolated already: the call is 0, the flag says so
        (dict(none=395, sc=5), 0.0, []),  # the literal rule: no floor
        (dict(none=85, wmc=14, sc=1), 1.0, []),  # 2+ from >10% complete staining whatever the intense cell
    ],
)
def test_intense_cells_just_over_the_isolated_floor_could_be_isolated(counts, floor, sides):
    c = cells(**counts)
    call = apply_guideline(c, B23, isolated_intense_percent=floor)
    assert isolated_sides(c, call.score, guideline=B23, isolated_intense_percent=floor) == sides, call.reason
    assert isolated_sides(cells(none=395, sc=5), "0", guideline=G) == []  # gastric has no such pattern


# -- gastric readings: cumulative (default) or per band ----------------------------------------------

def test_gastric_cumulative_and_per_band_readings():
    counts = cells(none=90, sc=5, wmc=5)  # 5% strong + 5% weak-to-moderate
    cumulative = apply_guideline(counts, G)
    assert cumulative == apply_guideline(counts, G, gastric_reading="cumulative")
    assert cumulative.score == "2+" and "10.0% of tumour cells (10/100, >=10%)" in cumulative.reason
    per_band = apply_guideline(counts, G, gastric_reading="per_band")
    # neither band reaches 10%, but 10% react: Hofmann's 0 is membranous reactivity in <10% (it read 0 until 0.5.4)
    assert per_band.score == "1+"
    assert per_band.reason == ("membrane staining of any kind (no stronger band alone reaching 10%) in 10.0% of tumour "
                               "cells (10/100, >=10%); the cumulative reading (the default: a stronger cell shows the weaker "
                               "levels too) gives 2+")
    assert per_band.percentages == cumulative.percentages  # reported percentages stay cumulative


@pytest.mark.parametrize(
    ("counts", "cumulative", "per_band"),
    [
        (cells(none=90, sc=10), "3+", "3+"),
        (cells(none=90, sc=9, wmc=1), "2+", "1+"),
        (cells(none=80, sc=9, wmc=10, fp=1), "2+", "2+"),
        (cells(none=90, wmc=5, fp=5), "1+", "1+"),
        (cells(none=91, sc=5, wmc=4), "0", "0"),  # reactivity in <10%: 0 either way
        (cells(none=88, sc=6, fp=6), "1+", "1+"),
        (cells(none=80, wmc=9, fp=11), "1+", "1+"),
        (cells(none=90, sp=10), "1+", "1+"),
    ],
)
def test_gastric_readings_table(counts, cumulative, per_band):
    assert apply_guideline(counts, G).score == cumulative
    assert apply_guideline(counts, G, gastric_reading="per_band").score == per_band


def test_biopsy_clusters_must_agree_with_the_counts():
    """A cluster is cells of the counts: no larger than the cells at its level or stronger, and a cluster at
    a level is one at each weaker level too (a level not given takes the stronger levels' size)."""
    with pytest.raises(ValueError, match="counts hold only 0 such cells"):
        apply_guideline(cells(none=1000), G, "biopsy", clusters={"3+": 5})
    with pytest.raises(ValueError, match="must not shrink"):
        apply_guideline(cells(none=90, sc=10), G, "biopsy", clusters={"3+": 5, "2+": 0, "1+": 0})
    call = apply_guideline(cells(none=95, sc=5), G, "biopsy", clusters={"3+": 5})
    assert call.score == "3+"
    assert apply_guideline(cells(none=95, wmc=5), G, "biopsy", clusters={"2+": 5}).score == "2+"


def test_what_if_probes_of_small_biopsies_keep_their_clusters_within_the_counts():
    """The near-cut-off and cluster probes read a biopsy's cells another way: their clusters follow the cells
    (a cluster of 4 with no unstained cell left grows from a weaker cell; cells missed shrink a cluster), and
    they never refuse the call they probe (both raised once clusters were checked against the counts)."""
    small = dict(none=35, weak_moderate_complete=5)  # 12.5%, a 2+ cluster of 4
    assert near_cutoff_sides(small, "2+", guideline=G, specimen="biopsy",
                             clusters={"3+": 0, "2+": 4, "1+": 4}) == [("0", 12.5), ("1+", 12.5)]
    full = dict(faint_partial=300, strong_complete=4)  # no unstained cell: the 3+ cluster's fifth cell is a faint one
    call = apply_guideline(full, G, "biopsy", clusters={"3+": 4, "2+": 4, "1+": 304})
    sides = cluster_sides(full, call.score, guideline=G, specimen="biopsy", clusters={"3+": 4, "2+": 4, "1+": 304})
    assert call.score == "1+" and [s for s, _, _ in sides] == ["3+", "2+"]


def test_gastric_per_band_biopsy_clusters_still_decide():
    call = apply_guideline(cells(none=95, sc=5), G, "biopsy", clusters={"3+": 5}, gastric_reading="per_band")
    assert call.score == "3+" and "cluster of 5" in call.reason
    # per band, 6% + 6% reach no band's 10%, but the cells at 2+ or stronger are 12%: never called "<10%"
    call = apply_guideline(cells(none=88, sc=6, wmc=6), G, "biopsy", clusters={"3+": 4, "2+": 5, "1+": 5},
                           gastric_reading="per_band")
    assert call.score == "2+" and "12.0% of tumour cells (12/100, >=10% across bands) overall" in call.reason


# -- levels and flags of a score the guideline did not make itself (CNN fusion) ---------------------

@pytest.mark.parametrize(
    ("score", "guideline", "counts", "level", "flags"),
    [
        ("1+", B23, cells(none=99, fp=1), "1+", ("her2_low",)),
        ("1+", G, cells(none=99, fp=1), "1+", ()),
        ("2+", B18, cells(none=100), "2+", ("ish_reflex",)),
        ("3+", B23, cells(none=95, sc=5), "3+", ()),
        ("0", B23, cells(none=92, fp=8), "0+ (ultralow)", ("ultralow",)),
        ("0", B23, cells(none=80, fp=20), "0", ()),  # a CNN's 0 over cells 20% stained: neither null nor ultralow
        ("0", B23, cells(none=100), "0 (null)", ("null",)),
        ("0", B18, cells(none=80, fp=20), "0", ()),
        ("0", G, cells(none=80, fp=20), "0", ()),
    ],
)
def test_report_level_and_its_flags(score, guideline, counts, level, flags):
    assert report_level(score, guideline, counts) == level
    assert level_flags(level, guideline) == flags


def test_a_zero_just_across_a_cut_off_is_ultralow():
    """Eligibility's near-cut-off side of a 1+ at 10.5% is the 0 just under 10%: ultralow, not a plain 0."""
    c = cells(none=895, fp=105)
    assert report_level("0", B23, c) == "0"
    assert report_level("0", B23, c, across_cutoff=True) == "0+ (ultralow)"
    assert report_level("0", B23, cells(none=100), across_cutoff=True) == "0 (null)"


def test_guideline_calls_carry_their_level_flags():
    for counts, guideline, *_ in CASES:
        call = apply_guideline(counts, guideline)
        assert set(level_flags(call.level, guideline)) <= set(call.flags), (counts, call)


def test_cumulative_percentages():
    call = apply_guideline(cells(none=40, fp=10, wmc=15, wml=5, sc=20, sl=10), G)
    assert call.percentages == pytest.approx({"3+": 30.0, "2+": 50.0, "1+": 60.0, "any": 60.0})
    assert cumulative_counts({"strong_lateral": 2, "faint_partial": 1}) == {
        "3+": 2, "2+": 2, "1+": 3, "any": 3, "total": 3,
    }


def test_missing_categories_count_zero():
    assert apply_guideline({"none": 80, "strong_complete": 20}, B18).score == "3+"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(counts=cells(none=10), guideline="lung"), "unknown guideline"),
        (dict(counts=cells(none=10), guideline=G, specimen="cytology"), "unknown specimen"),
        (dict(counts=cells(none=10), guideline=B23, specimen="biopsy"), "only for gastric"),
        (dict(counts=cells(none=10), guideline=G, specimen="biopsy"), "needs clusters"),
        (dict(counts=cells(none=10), guideline=G, specimen="biopsy", clusters={"4+": 5}), "unknown cluster"),
        (dict(counts=cells(none=10), guideline=G, specimen="biopsy", clusters={"3+": -1}), "negative"),
        (dict(counts=cells(), guideline=B23), "no tumour cells to score"),
        (dict(counts={"none": 5, "weak": 3}, guideline=B23), "unknown cell categories"),
        (dict(counts={"none": -1, "strong_complete": 3}, guideline=B23), "negative"),
        (dict(counts={"none": 1.5}, guideline=B23), "integer"),
        (dict(counts=cells(none=10), guideline=B23, isolated_intense_percent=11), "isolated_intense_percent"),
        (dict(counts=cells(none=10), guideline=B23, isolated_intense_percent=-1), "isolated_intense_percent"),
        (dict(counts=cells(none=10), guideline=G, gastric_reading="strict"), "unknown gastric_reading"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_guideline(**kwargs)


def test_h_score_needs_cells():
    with pytest.raises(ValueError, match="no tumour cells"):
        h_score({})


def test_every_gastric_result_says_pancreatic_tumours_have_no_guideline_of_their_own():
    from her2score.pipeline import score_slide
    from her2score.slide import ArraySlide
    from her2score.synthetic import generate_field

    f = generate_field("2+", seed=45, size_px=(256, 256))
    assert PANCREATIC_NOTE in score_slide(ArraySlide(f.image, mpp=f.mpp), guideline="gastric").notes
    assert PANCREATIC_NOTE not in score_slide(ArraySlide(f.image, mpp=f.mpp)).notes
    assert "no validated" in PANCREATIC_NOTE and "gastric" in PANCREATIC_NOTE


def test_fewer_than_five_intense_cells_are_isolated_in_a_small_field():
    """One strong cell among 56 is 1.8%, over the 1% floor, but one cell is not a population."""
    call = apply_guideline({"none": 55, "strong_complete": 1}, "breast-asco-cap-2023")
    assert call.score == "0" and "isolated_intense_cells" in call.flags
    assert "1 of 56 (1.8%, fewer than the 5 cells" in call.reason
    literal = apply_guideline({"none": 55, "strong_complete": 1}, "breast-asco-cap-2023", isolated_intense_percent=0)
    assert literal.score == "2+"  # the literal rule, when asked for
    five = apply_guideline({"none": 95, "strong_complete": 5}, "breast-asco-cap-2023")
    assert five.score == "2+" and "unusual_pattern" in five.flags


def test_deciding_cells_are_those_the_rules_count():
    """Random counts: the call is the strongest score whose deciding cells pass 10% (breast: over it,
    unless intense complete cells beyond the isolated floor make their own <=10% 2+; gastric: at least it)."""
    from her2score.guidelines import _isolated

    rng = np.random.default_rng(11)
    for _ in range(400):
        counts = {cat: int(n) for cat, n in zip(CATEGORIES, rng.integers(0, 40, len(CATEGORIES)) * (rng.random(len(CATEGORIES)) < 0.5))}
        counts["none"] += 1
        total = sum(counts.values())
        for guideline, reading in (("breast-asco-cap-2023", "cumulative"), ("gastric", "cumulative"), ("gastric", "per_band")):
            strong = counts["strong_complete"]
            if guideline.startswith("breast") and strong and not _isolated(strong, total, ISOLATED_INTENSE_PERCENT):
                continue
            share = deciding_cells(counts, guideline, gastric_reading=reading)
            passes = (lambda n: 10 * n > total) if guideline.startswith("breast") else (lambda n: 10 * n >= total)
            expected = next((s for s in ("3+", "2+", "1+") if passes(share[s])), "0")
            assert apply_guideline(counts, guideline, gastric_reading=reading).score == expected, (counts, guideline, reading)


def test_lateral_cells_decide_a_breast_2_plus_as_the_unusual_pattern_only():
    """ASCO/CAP 2018's note: 'moderate to intense but incomplete (basolateral or lateral)' staining is an
    equivocal 2+. Weak-to-moderate lateral cells over 10% make that 2+ on their own, and count with complete
    ones (each a cell of a 2+ kind) where neither is over 10% alone; they never make a 2+ look near 3+."""
    held = dict(none=690, weak_moderate_complete=110, weak_moderate_lateral=200)  # 11% complete and 20% lateral
    assert apply_guideline(held, "breast-asco-cap-2023").score == "2+"
    assert near_cutoff(held, "2+") is None  # the 20% lateral hold the 2+ whatever the complete share
    alone = apply_guideline(dict(none=800, weak_moderate_lateral=200), "breast-asco-cap-2023")
    assert alone.flags == ("ish_reflex", "unusual_pattern")
    assert alone.reason == ("unusual pattern: weak-to-moderate lateral membrane staining in 20.0% of tumour cells (200/1000, "
                            ">10%); ASCO/CAP's unusual 'moderate to intense but incomplete (basolateral or lateral)' pattern "
                            "(weak and moderate are not told apart); reflex ISH required")
    counts = dict(none=860, weak_moderate_complete=80, weak_moderate_lateral=60)  # 8% complete and 6% lateral: 14%
    call = apply_guideline(counts, "breast-asco-cap-2023")
    assert call.score == "2+" and "unusual_pattern" in call.flags  # read 1+ until 0.5.4, each kind weighed alone
    assert call.reason.startswith("unusual pattern: membrane staining complete in <=10%, or incomplete and lateral/basolateral "
                                  "or intense, in 14.0% of tumour cells (140/1000, >10%): weak-to-moderate complete 8.0%, ")
    assert near_cutoff_sides(counts, "2+") == [("0", 14.0), ("1+", 14.0)]
    lateral = dict(none=610, weak_moderate_complete=300, strong_lateral=90)  # 9% intense incomplete: no 3+ in sight
    assert near_cutoff(lateral, "2+") is None


def test_a_gastric_biopsy_call_its_cluster_holds_is_sure_of_its_side():
    counts, clusters = dict(none=85, weak_moderate_complete=15), {"3+": 0, "2+": 15, "1+": 15}
    assert apply_guideline(counts, "gastric", "biopsy", clusters=clusters).score == "2+"
    assert near_cutoff(counts, "2+", guideline="gastric") == ("0", 15.0)  # on its share alone (100 cells), unsure
    assert near_cutoff(counts, "2+", guideline="gastric", specimen="biopsy", clusters=clusters) is None  # its cluster holds it
    assert near_cutoff(counts, "2+", guideline="gastric", clusters=clusters) == ("0", 15.0)  # a resection: clusters not read


def test_a_gastric_biopsy_cluster_within_the_margin_of_the_rules_5_is_a_side():
    """A measured cluster of 3 to 9 cells may be on either side of the rule's 5 (CLUSTER_MARGIN_CELLS): a review
    measured clusters of 6-9 on generator biopsies of scattered 3+ cells whose largest true cluster was 2-4, called
    3+ with no doubt (only 4 and 5 were doubted)."""
    counts = dict(none=288, weak_moderate_complete=8, strong_complete=4)  # 4%: only a cluster can make it more than 0

    def sides(clusters):
        score = apply_guideline(counts, G, "biopsy", clusters=clusters).score
        return score, cluster_sides(counts, score, guideline=G, specimen="biopsy", clusters=clusters)

    assert sides({"3+": 0, "2+": 4, "1+": 4}) == ("0", [("2+", "2+", 4), ("1+", "1+", 4)])  # one short: up
    # held by just 5: down, one cell read weaker (1+), or one nucleus missed from both clusters (0)
    assert sides({"3+": 0, "2+": 5, "1+": 5}) == ("2+", [("1+", "2+", 5), ("0", "2+", 5)])
    strong = dict(none=291, strong_complete=9)
    assert cluster_sides(strong, "3+", guideline=G, specimen="biopsy", clusters={"3+": 5, "2+": 5, "1+": 6}) == [
        ("2+", "3+", 5), ("1+", "3+", 5), ("0", "1+", 6)]  # the 1+ cluster of 6 could be 4 too
    assert sides({"3+": 4, "2+": 9, "1+": 9}) == ("2+", [("3+", "3+", 4), ("1+", "2+", 9), ("0", "2+", 9)])
    assert sides({"3+": 0, "2+": 6, "1+": 6}) == ("2+", [("1+", "2+", 6), ("0", "2+", 6)])
    assert sides({"3+": 0, "2+": 3, "1+": 3}) == ("0", [("2+", "2+", 3), ("1+", "1+", 3)])
    assert sides({"3+": 0, "2+": 10, "1+": 10}) == ("2+", []) and sides({"3+": 0, "2+": 2, "1+": 2}) == ("0", [])
    assert cluster_words("3+", 8) == ("a cohesive cluster of 8 tumour cells at 3+, 3 over the biopsy rule's 5 (unstained "
                                      "cells between stained ones can join a cluster)")
    assert cluster_sides(counts, "0", guideline=G, specimen="resection", clusters={"2+": 4}) == []  # resections: no clusters
    wide = dict(none=80, weak_moderate_complete=20)  # 20%: 2+ on its share, whatever its cluster
    assert cluster_sides(wide, "2+", guideline=G, specimen="biopsy", clusters={"3+": 0, "2+": 5, "1+": 5}) == []


def test_near_cutoff_sides_follow_every_route_of_the_rules():
    """Isolated intense cells count towards 1+ as stained cells; a breast 2+ that intense complete cells in <=10%
    make 2+ cannot fall to 1+; a call can be near a score two levels up; per band, each band is weighed."""

    isolated = dict(none=900, faint_partial=100, strong_complete=4)  # 4 isolated cells: 104 of 1,004 decide (10.36%)
    assert apply_guideline(isolated, B23).score == "1+"
    assert near_cutoff_sides(isolated, "1+") == [("0", 100 * 104 / 1004)]
    floor = dict(none=8510, faint_partial=1400, strong_complete=90)  # 0.9% intense: isolated, 1+ on 14.9%
    assert apply_guideline(floor, B23).score == "1+" and near_cutoff_sides(floor, "1+") == [("0", 14.9)]
    intense = dict(none=890, weak_moderate_complete=70, strong_complete=40)  # 11% complete, 4% intense: 2+ either way
    assert apply_guideline(intense, B23).score == "2+" and near_cutoff_sides(intense, "2+") == []
    skip = dict(none=910, weak_moderate_complete=90)  # 9% complete: at 10.1% it is 2+, not 1+
    assert apply_guideline(skip, B23).score == "0"
    assert sorted(near_cutoff_sides(skip, "0")) == [("1+", 9.0), ("2+", 9.0)]
    strong = dict(none=910, strong_complete=90)
    assert sorted(near_cutoff_sides(strong, "0", guideline=G)) == [("1+", 9.0), ("2+", 9.0), ("3+", 9.0)]
    # per band a strong cell is no 2+ cell, but any reactivity in >=10% is at least 1+
    assert near_cutoff_sides(strong, "0", guideline=G, gastric_reading="per_band") == [("1+", 9.0), ("3+", 9.0)]


def test_the_down_side_is_what_the_rules_give_just_under_the_cut_off():
    """A call whose deciding cells are its only stained cells falls past the next level: 2+ on 12.5%
    weak-to-moderate complete cells alone is 0 with 10% of them (ultralow), or 1+ if the surplus reads
    faint (test_eligibility: eligibility weighs both)."""
    alone = dict(none=105, weak_moderate_complete=15)
    assert near_cutoff_sides(alone, "2+") == [("0", 12.5), ("1+", 12.5)]
    assert near_cutoff_sides(dict(none=105, strong_complete=15), "3+", guideline=G) == [("0", 12.5), ("2+", 12.5)]
    assert near_cutoff_sides(dict(none=80, faint_partial=30, weak_moderate_complete=14), "2+") == [("1+", 100 * 14 / 124)]
    # the next level down, where the weaker cells hold it either way
    assert near_cutoff_sides(dict(none=85, faint_partial=20, strong_complete=12), "3+") == [("2+", 100 * 12 / 117)]


def test_isolated_intense_cells_count_in_the_complete_and_stained_shares():
    """Isolated intense complete cells are complete membranes: 98 weak-to-moderate complete and 4 intense
    complete cells of 1,000 are complete staining in 10.2%, a 2+ (as the literal rule also says: no flag);
    with 98 faint cells instead, stained cells in 10.2% make a 1+."""
    c = dict(none=898, weak_moderate_complete=98, strong_complete=4)
    call = apply_guideline(c, B23)
    assert call.score == "2+" and "isolated_intense_cells" not in call.flags
    assert "10.2% of tumour cells (102/1000" in call.reason and "isolated intense cells: 4 of 1,000" in call.reason
    assert deciding_cells(c, B23)["2+"] == 102
    faint = apply_guideline(dict(none=898, faint_partial=98, strong_complete=4), B23)
    assert faint.score == "1+" and "isolated_intense_cells" in faint.flags  # the literal rule: 2+
    same = apply_guideline(dict(none=85, weak_moderate_complete=14, strong_complete=1), B23)
    assert same.score == "2+" and "isolated_intense_cells" not in same.flags and "15.0%" in same.reason


@pytest.mark.parametrize("guideline", [B18, B23, G])
def test_reading_membranes_stronger_never_lowers_the_score(guideline):
    """Monotone: moving cells of any category to a stronger one (intensity up, or incomplete to complete)
    never gives a lower score, the isolated floor included."""
    rng = np.random.default_rng(21)
    stronger = {"none": ["faint_partial", "weak_moderate_complete", "strong_complete"],
                "faint_partial": ["weak_moderate_complete", "strong_complete", "strong_partial"],
                "weak_moderate_complete": ["strong_complete"], "strong_partial": ["strong_complete"],
                "weak_moderate_lateral": ["strong_lateral", "strong_complete"], "strong_lateral": ["strong_complete"]}
    order = {s: i for i, s in enumerate(("0", "1+", "2+", "3+"))}
    for _ in range(3000):
        c = {cat: int(rng.integers(0, 60)) * int(rng.random() < 0.6) for cat in CATEGORIES}
        c["none"] += int(rng.integers(1, 1000))
        src = rng.choice([cat for cat in stronger if c[cat]])
        dst = str(rng.choice(stronger[src]))
        k = int(rng.integers(1, c[src] + 1))
        up = {**c, src: c[src] - k, dst: c[dst] + k}
        before, after = apply_guideline(c, guideline).score, apply_guideline(up, guideline).score
        assert order[after] >= order[before], (c, src, dst, k, before, after)
    # over 10% they are 3+ whatever their number
    assert apply_guideline(dict(none=30, strong_complete=4), B23).score == "3+"


def test_scoring_settings_are_checked_before_any_tile_is_read(tmp_path):
    from her2score.pipeline import ScoringConfig, score_slide

    with pytest.raises(ValueError, match="unknown guideline 'Gastric'"):
        ScoringConfig(guideline="Gastric")
    with pytest.raises(ValueError, match="unknown gastric_reading"):
        ScoringConfig(guideline=G, gastric_reading="perband")
    with pytest.raises(ValueError, match="specimen 'biopsy' has its own rule only for gastric"):
        score_slide(tmp_path / "no such slide.tif", specimen="biopsy")  # refused before the file is opened


def test_down_sides_move_every_population_that_holds_the_call():
    """A gastric 2+ whose strong cells read weaker leaves 2+ only once they fall below it (faint: 1+); a
    breast 2+ held by complete and intense incomplete cells together just over 10% could be 0 or 1+."""
    assert near_cutoff_sides(dict(none=88, weak_moderate_complete=8, strong_complete=4), "2+", guideline=G) == [
        ("0", 12.0), ("1+", 12.0)]
    both = dict(none=176, weak_moderate_complete=12, strong_lateral=12)  # 6% complete, 6% intense incomplete
    assert apply_guideline(both, B23).score == "2+" and near_cutoff_sides(both, "2+") == [("0", 12.0), ("1+", 12.0)]
    held = dict(none=157, weak_moderate_complete=22, strong_lateral=21)  # 11.0% and 10.5%: 21.5% together, sure
    assert near_cutoff_sides(held, "2+") == []


def test_a_1plus_within_the_false_membrane_share_of_the_cut_off_could_be_0():
    """Real unstained membranes read stained in up to 8% of cells (FALSE_MEMBRANE_PERCENT, the default): a 1+ on
    16% stained could be 0; without that share, at 19%, or a 2+, it holds as before."""
    from her2score.guidelines import FALSE_MEMBRANE_PERCENT

    at16 = {"none": 840, "faint_partial": 160}
    assert near_cutoff_sides(at16, "1+") == near_cutoff_sides(at16, "1+", false_membrane_percent=FALSE_MEMBRANE_PERCENT) == [("0", 16.0)]
    assert near_cutoff_sides(at16, "1+", false_membrane_percent=0) == []  # the measurement's own 5.5 points alone
    assert near_cutoff_sides({"none": 810, "faint_partial": 190}, "1+", false_membrane_percent=8.0) == []
    two = {"none": 840, "weak_moderate_complete": 160}
    assert near_cutoff_sides(two, "2+", false_membrane_percent=8.0) == near_cutoff_sides(two, "2+") == []


def test_a_calls_percentages_read_one_cell_as_its_guideline_does():
    """Breast's 3+ cells are intense complete ones and its 2+ cells every cell of a 2+ kind; gastric counts lateral
    membranes at their intensity (breast's 3+ share read 20% on intense lateral cells, which make a breast 2+)."""
    counts = dict(none=700, strong_lateral=200, strong_partial=100)
    assert apply_guideline(counts, B23).percentages == {"3+": 0.0, "2+": 30.0, "1+": 30.0, "any": 30.0}
    assert apply_guideline(counts, G).percentages == {"3+": 20.0, "2+": 20.0, "1+": 30.0, "any": 30.0}
