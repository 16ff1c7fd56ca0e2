"""Guideline scores from cell counts: cases from ASCO/CAP 2018/2023 and Hofmann 2008 / CAP 2016."""
from __future__ import annotations

import pytest

from her2score.guidelines import GUIDELINES, PANCREATIC_NOTE, apply_guideline, cumulative_counts, h_score

B18, B23, G = GUIDELINES


def cells(none: int = 0, fp: int = 0, wmc: int = 0, sc: int = 0, wml: int = 0, sl: int = 0) -> dict[str, int]:
    return {
        "none": none,
        "faint_partial": fp,
        "weak_moderate_complete": wmc,
        "strong_complete": sc,
        "weak_moderate_lateral": wml,
        "strong_lateral": sl,
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
    (cells(none=80, wml=20), B23, "1+", "1+", ("her2_low",)),  # weak lateral is incomplete staining
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
        (cells(none=97, sc=3), {"3+": 5, "2+": 5, "1+": 5}, "3+"),  # 5-cell cluster decides at 3%
        (cells(none=97, sc=3), {"3+": 4, "2+": 4, "1+": 4}, "0"),  # 4 cells: not enough, 3% < 10%
        (cells(none=97, sc=3), {"3+": 4, "2+": 6, "1+": 6}, "2+"),
        (cells(none=97, fp=3), {"1+": 5}, "1+"),
        (cells(none=90, wmc=10), {}, "2+"),  # percentages still apply to biopsies
    ],
)
def test_gastric_biopsy_clusters(counts, clusters, score):
    call = apply_guideline(counts, G, "biopsy", clusters=clusters)
    assert call.score == score, call.reason
    assert call.specimen == "biopsy"


def test_gastric_biopsy_cluster_reason():
    call = apply_guideline(cells(none=97, sc=3), G, "biopsy", clusters={"3+": 5})
    assert "cluster of 5 tumour cells" in call.reason and "3.0%" in call.reason


def test_clusters_ignored_for_resection():
    assert apply_guideline(cells(none=97, sc=3), G, clusters={"3+": 50}).score == "0"


def test_h_score_by_hand():
    # 10% faint (1), 20% weak-moderate (2), 30% strong (3): 10 + 40 + 90 = 140
    counts = cells(none=40, fp=10, wmc=15, wml=5, sc=20, sl=10)
    assert h_score(counts) == pytest.approx(140.0)
    assert apply_guideline(counts, B23).h_score == pytest.approx(140.0)
    assert h_score(cells(sc=7)) == 300.0 and h_score(cells(none=7)) == 0.0


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
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_guideline(**kwargs)


def test_h_score_needs_cells():
    with pytest.raises(ValueError, match="no tumour cells"):
        h_score({})


def test_pancreatic_note():
    assert "gastric" in PANCREATIC_NOTE and "no validated" in PANCREATIC_NOTE.lower()
