import csv
import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import save_png
from her2score import __version__
from her2score.categories import CATEGORIES
from her2score.cli import main
from her2score.cnn import TileClassifier, WeightsRecord
from her2score.eligibility import Requirement, Rule, available_rules, check_eligibility, load_rule
from her2score.evaluate import (
    _result_folders,
    _rule_metrics,
    accuracy,
    binary_rates,
    bootstrap_ci,
    confusion_matrix,
    eligibility_truth,
    evaluate,
    method_result,
    parse_truth_label,
    per_class,
    percent_agreement,
    quadratic_weighted_kappa,
    read_labels,
    wilson_ci,
)
from her2score.pipeline import ScoringConfig
from her2score.results import CnnReport, SlideResult
from her2score.synthetic import write_dataset

LABELS = ["0", "0", "1+", "1+", "2+", "2+", "3+", "3+"]
CLASSICAL = ["0", "1+", "1+", "1+", "2+", "3+", "3+", "3+"]
CNN = ["0", "0", "1+", "0", "2+", "2+", "3+", "2+"]
THREE_ONLY = Rule(name="3+ only", version="1", guideline="breast", eligible_levels=("3+",))
"""A breast rule that reads 3+ alone and no ISH."""
FUSED = ["0", "0", "1+", "1+", "2+", "2+", "3+", "3+"]


# --------------------------------------------------------------------------- kappa by hand

def test_qwk_hand_worked_example():
    """Confusion (rows truth) [[1,1,0,0],[0,2,0,0],[0,0,1,1],[0,0,0,2]], n = 8, w_ij = (i-j)^2 / 9.

    Observed weighted disagreement: two cells one step off: 2 * 1/9 = 8/36.
    Expected: row totals 2,2,2,2, column totals 1,3,1,3 -> E_ij = 2 * c_j / 8 = c_j / 4;
    sum_i (i-j)^2 over the rows is 14, 6, 6, 14 for j = 0..3, so
    sum w*E = (14*1 + 6*3 + 6*1 + 14*3) / (9 * 4) = 80/36.  kappa = 1 - 8/80 = 0.9.
    """
    cm = confusion_matrix(LABELS, CLASSICAL)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]]
    assert quadratic_weighted_kappa(cm) == pytest.approx(0.9)
    assert accuracy(cm) == pytest.approx(0.75)


def test_qwk_reversed_and_perfect_and_undefined():
    # truth 0,1+,2+,3+ called 3+,2+,1+,0: observed (9+1+1+9)/9 = 20/9; expected 1/4 * 40/9 = 10/9 -> 1 - 2 = -1
    rev = confusion_matrix(["0", "1+", "2+", "3+"], ["3+", "2+", "1+", "0"])
    assert quadratic_weighted_kappa(rev) == pytest.approx(-1.0)
    assert quadratic_weighted_kappa(confusion_matrix(LABELS, LABELS)) == pytest.approx(1.0)
    assert math.isnan(quadratic_weighted_kappa(confusion_matrix(["2+", "2+"], ["2+", "2+"])))
    # every image truly 3+, one called 2+: kappa would be 0 whatever the agreement; it is undefined
    assert math.isnan(quadratic_weighted_kappa(confusion_matrix(["3+"] * 100, ["3+"] * 99 + ["2+"])))
    assert quadratic_weighted_kappa(confusion_matrix(["0", "1+", "3+"], ["1+"] * 3)) == 0.0  # one class called: chance
    assert math.isnan(quadratic_weighted_kappa(np.zeros((4, 4))))
    # every call one step high: kappa well below 1 but positive
    up = confusion_matrix(["0", "1+", "2+"], ["1+", "2+", "3+"])
    # rows 1,1,1,0; cols 0,1,1,1; observed 3 * 1/9; expected (1/3) * sum over i<3, j>0 of (i-j)^2/9 = (1/3)(1+0+1 + 4+1+0 + 9+4+1)/9 = 7/9
    assert quadratic_weighted_kappa(up) == pytest.approx(1 - (3 / 9) / (7 / 9))


def test_per_class_precision_recall_by_hand():
    pc = per_class(confusion_matrix(LABELS, CLASSICAL))
    assert pc["0"]["precision"] == 1.0 and pc["0"]["recall"] == 0.5 and (pc["0"]["n_true"], pc["0"]["n_called"]) == (2, 1)
    assert pc["0"]["recall_ci95"] == list(wilson_ci(1, 2))
    assert pc["1+"]["precision"] == pytest.approx(2 / 3) and pc["1+"]["recall"] == 1.0
    assert pc["2+"]["precision"] == 1.0 and pc["2+"]["recall"] == 0.5
    assert pc["3+"]["precision"] == pytest.approx(2 / 3) and pc["3+"]["recall"] == 1.0
    none = per_class(confusion_matrix(["0"], ["1+"]))
    assert none["2+"]["precision"] is None and none["2+"]["recall"] is None and none["2+"]["recall_ci95"] == [None, None]


def test_wilson_interval_by_hand():
    """8 of 10, z = 1.959964: p = 0.8, z²/n = 0.3841459, denominator 1.3841459;
    centre (0.8 + 0.1920729) / 1.3841459 = 0.7167402; half-width
    1.959964 * sqrt(0.016 + 0.0096036) / 1.3841459 = 0.2265777 -> [0.4901625, 0.9433178]
    (the published Wilson interval for 8/10 is 0.490-0.943)."""
    lo, hi = wilson_ci(8, 10)
    assert lo == pytest.approx(0.4901625, abs=1e-6) and hi == pytest.approx(0.9433178, abs=1e-6)
    # 0 of 10: [0, z²/(n + z²)] = [0, 3.841459 / 13.841459] = [0, 0.277533]
    assert wilson_ci(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_ci(0, 10)[1] == pytest.approx(0.277533, abs=1e-6)
    assert wilson_ci(10, 10)[1] == 1.0 and wilson_ci(10, 10)[0] == pytest.approx(1 - 0.277533, abs=1e-6)
    assert wilson_ci(0, 0) == (None, None)


def test_percent_agreement_by_hand():
    pairs = [({"none": 60.0, "faint_partial": 40.0}, {"none": 64.0, "faint_partial": 36.0}),
             ({"none": 50.0, "faint_partial": 50.0}, {"none": 48.0, "faint_partial": 52.0})]
    pa = percent_agreement(pairs, ["none", "faint_partial", "strong_complete"])
    # none: differences -4, +2 -> MAE 3, bias -1, SD sqrt(((-3)² + 3²) / 1) = 4.2426, limits -1 ± 8.3155
    assert pa["none"]["mae"] == pytest.approx(3.0) and pa["none"]["bias"] == pytest.approx(-1.0)
    assert pa["none"]["sd"] == pytest.approx(18 ** 0.5) and pa["none"]["loa_high"] == pytest.approx(-1 + 1.96 * 18 ** 0.5)
    assert pa["faint_partial"]["bias"] == pytest.approx(1.0) and pa["faint_partial"]["max_abs_error"] == 4.0
    assert pa["strong_complete"]["mae"] == 0.0  # absent on both sides


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    cm = confusion_matrix(LABELS * 10, CLASSICAL * 10)
    t = np.array([["0", "1+", "2+", "3+"].index(x) for x in LABELS * 10])
    c = np.array([["0", "1+", "2+", "3+"].index(x) for x in CLASSICAL * 10])

    def stat(idx):
        return quadratic_weighted_kappa(np.bincount(t[idx] * 4 + c[idx], minlength=16).reshape(4, 4))

    lo, hi = bootstrap_ci(stat, len(t), resamples=500, seed=1)
    assert lo <= quadratic_weighted_kappa(cm) <= hi and lo < hi <= 1
    assert bootstrap_ci(stat, len(t), resamples=500, seed=1) == (lo, hi)
    assert bootstrap_ci(stat, 0) == (None, None)


def test_binary_rates():
    sens, spec = binary_rates([True, True, False, False, False], [True, False, True, False, False])
    assert sens == 0.5 and spec == pytest.approx(2 / 3)


def test_five_level_labels():
    assert parse_truth_label("0") == ("0", None)
    assert parse_truth_label(" Null ") == parse_truth_label("0 (null)") == ("0", "0 (null)")
    assert parse_truth_label("0+") == parse_truth_label("ultralow") == parse_truth_label("0+ (ultralow)") == ("0", "0+ (ultralow)")
    assert parse_truth_label("2plus") == ("2+", "2+")
    # as data sets write them: scores without the plus, spaces anywhere, a hyphen in ultra-low
    assert [parse_truth_label(v)[0] for v in ("1", "2", "3", "3 +", " 2+ ")] == ["1+", "2+", "3+", "3+", "2+"]
    assert parse_truth_label("ultra-low") == parse_truth_label("0+(ultralow)") == parse_truth_label("0 + (Ultralow)") == ("0", "0+ (ultralow)")
    assert parse_truth_label("0(null)") == ("0", "0 (null)")
    for bad in ("4+", "4", "1.5", "+"):
        with pytest.raises(ValueError, match="0\\+ \\(or ultralow\\)"):
            parse_truth_label(bad)


def test_eligibility_truth_from_the_label_and_the_rule_file_alone():
    low = load_rule("her2-low-breast")
    assert [eligibility_truth(x, low) for x in ("0", "null", "0+", "1+", "2+", "3+")] == [False, False, False, True, None, False]
    assert eligibility_truth("2+", low, ish="negative") is True and eligibility_truth("2+", low, ish="positive") is False
    ultra = load_rule("her2-ultralow-breast")
    assert eligibility_truth("0", ultra) is None  # null or ultralow: a plain 0 cannot say
    assert [eligibility_truth(x, ultra) for x in ("null", "ultralow", "1+", "3+")] == [False, True, True, False]
    cart = load_rule("car-t-her2")
    assert [eligibility_truth(x, cart) for x in ("1+", "3+")] == [False, None]  # >50% requirement, no counts
    many = {"strong_complete": 60, "none": 40}
    few = {"strong_complete": 40, "none": 60}
    assert eligibility_truth("3+", cart, counts=many) is True and eligibility_truth("3+", cart, counts=few) is False
    # a rule written with a plain "0" level: every 0 label is eligible
    zero = Rule(name="zero", version="1", eligible_levels=("0",))
    assert [eligibility_truth(x, zero) for x in ("0", "null", "0+", "1+")] == [True, True, True, False]
    strict = Rule(name="strict", version="1", eligible_levels=("3+",), require=(Requirement("3+", 90.0),))
    assert eligibility_truth("2+", strict, counts=many) is False
    # a requirement the counts fail decides an ISH level without its ISH result (requirements hold there too)
    ish_rule = Rule(name="ish", version="1", eligible_levels=("3+",), ish_levels=("2+",), ish_eligible="positive",
                    require=(Requirement("2+", 50.0),))
    low_share = {"weak_moderate_complete": 20, "none": 80}
    assert eligibility_truth("2+", ish_rule, counts=low_share) is False
    assert eligibility_truth("2+", ish_rule, counts={"weak_moderate_complete": 60, "none": 40}) is None  # ISH decides
    assert eligibility_truth("2+", ish_rule) is None


# --------------------------------------------------------------------------- evaluate with known answers

def _result(path, classical, cnn=None, fused=None):
    report = None
    if cnn:
        report = CnnReport(cnn, {c: (0.7 if c == cnn else 0.1) for c in ("0", "1+", "2+", "3+")}, 1, "test-model")
    levels = {"0": "0 (null)"}
    return SlideResult(
        slide=str(path), score=fused or classical, level=levels.get(fused or classical, fused or classical), flags=(),
        classical_level=levels.get(classical, classical), guideline="breast-asco-cap-2023",
        specimen="resection", reason="test", counts={"none": 300, "faint_partial": 0}, percentages={},
        tumour_cells=300, h_score=0.0, clusters={}, region="cells", qc=(), stains={}, mpp=0.5, mpp_origin="metadata",
        tissue_area_mm2=0.05, classical_score=classical, cnn=report, confidence=0.9 if cnn else None,
        config=DEFAULT_CONFIG, version=__version__)


DEFAULT_CONFIG = json.loads(json.dumps(ScoringConfig().to_dict()))
"""The default scoring settings as a result.json records them (a result scored otherwise is not reused)."""


def test_each_method_carries_the_flags_of_its_own_call():
    """A classical ultralow that false membranes could give, fused to 1+ by a CNN that reads 1+: the
    classical result keeps the guideline call's flags; the CNN and fused results those of 1+."""
    counts = {"none": 290, "faint_partial": 10}
    fused = replace(_result("f.png", "0", cnn="1+", fused="1+"), counts=counts, level="1+",
                    flags=("her2_low", "cnn_disagrees"), classical_level="0+ (ultralow)",
                    classical_flags=("ultralow", "null_or_ultralow"))
    classical, cnn = method_result(fused, "classical"), method_result(fused, "cnn")
    assert (classical.score, classical.level, classical.flags) == ("0", "0+ (ultralow)", ("ultralow", "null_or_ultralow"))
    assert (cnn.score, cnn.level, cnn.flags) == ("1+", "1+", ("her2_low",))
    assert method_result(fused, "fused") is fused
    # the eligibility doubt follows: only the classical ultralow could be null
    rule = load_rule("her2-ultralow-breast")
    assert check_eligibility(classical, rule).status == "needs_review"
    assert check_eligibility(cnn, rule).status == "eligible"
    # a CNN that reads the same ultralow carries the doubt too (3.3% stained, within the 8%)
    same = replace(fused, cnn=replace(fused.cnn, score="0"))
    assert method_result(same, "cnn").flags == ("ultralow", "null_or_ultralow")
    # a slide whose stain fills the cytoplasm: the CNN's 2+ carries the doubt the pipeline gives a fused 2+
    blushed = replace(_result("f.png", "1+", cnn="2+", fused="2+"), counts={"none": 200, "faint_partial": 100},
                      staining={"diffuse_cytoplasm_od": 0.12, "membrane_contrast_od": 0.04})
    assert method_result(blushed, "cnn").flags == ("ish_reflex", "cytoplasmic_dab")
    assert check_eligibility(method_result(blushed, "cnn"), "her2-low-breast", ish="negative").status == "needs_review"


def test_a_result_written_before_classical_flags_keeps_its_flags_as_the_classical_ones():
    """A result.json without classical_flags (older versions) and without a CNN: its flags are the classical call's."""
    r = replace(_result("f.png", "0"), level="0+ (ultralow)", classical_level="0+ (ultralow)",
                flags=("ultralow", "null_or_ultralow"), classical_flags=("ultralow", "null_or_ultralow"))
    old = {k: v for k, v in r.to_dict().items() if k != "classical_flags"}
    assert SlideResult.from_dict(old).classical_flags == ("ultralow", "null_or_ultralow")
    assert check_eligibility(method_result(SlideResult.from_dict(old), "classical"), "her2-ultralow-breast").status == "needs_review"


def test_a_cnn_0_beside_another_classical_score_gets_the_pipelines_level():
    """A classical 1+ (20% faint) that the CNN reads 0: as the pipeline would report that 0 under 2023, a plain 0:
    its cells, over 10% stained, are neither null nor ultralow, so the ultralow rule asks for review. Over
    cells at most 10% stained it is ultralow."""
    r = replace(_result("f.png", "1+", cnn="0", fused="1+"), counts={"none": 240, "faint_partial": 60})
    cnn = method_result(r, "cnn")
    assert (cnn.score, cnn.level, cnn.flags) == ("0", "0", ())
    assert check_eligibility(cnn, "her2-ultralow-breast").status == "needs_review"
    # 10% of 3,000 cells: over the 8% false membranes read, its 95% interval too (of 300 cells it reaches 7.1%)
    few = method_result(replace(r, counts={"none": 2700, "faint_partial": 300}), "cnn")
    assert (few.level, few.flags) == ("0+ (ultralow)", ("ultralow",))
    assert check_eligibility(few, "her2-ultralow-breast").status == "eligible"


@pytest.fixture()
def known(tmp_path):
    data, prev = tmp_path / "data", tmp_path / "prev"
    (data / "img").mkdir(parents=True)
    rows = []
    for i, (lab, cl, cn, fu) in enumerate(zip(LABELS, CLASSICAL, CNN, FUSED)):
        img = data / "img" / f"f{i}.png"
        img.write_bytes(b"")  # never read: every result is reused
        d = prev / f"f{i}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(_result(img.resolve(), cl, cn, fu).to_json())
        rows.append((f"img/f{i}.png", lab))
    with open(data / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "eligible_her2-positive-breast"])
        for k, (p, lab) in enumerate(rows):
            w.writerow([p, lab, "yes" if k == 4 else ""])  # image 4 (2+) known ISH-amplified: eligible
    return data / "labels.csv", prev, tmp_path / "out"


class ResultsModel(TileClassifier):
    """The CNN the reused results name ("test-model"); never run, since every result is reused."""

    def __init__(self):
        super().__init__(WeightsRecord(file="test-model", sha256=""))

    def predict_patches(self, patches: np.ndarray) -> np.ndarray:
        raise AssertionError("every result is reused: the CNN is never run")


def test_evaluate_known_answers(known):
    labels, prev, out = known
    reader = ResultsModel()
    m = evaluate(labels, out, reuse=prev, model=reader, bootstrap=200, seed=0, rules=[*available_rules(), THREE_ONLY])
    assert m["n"] == 8 and m["errors"] == 0 and set(m["methods"]) == {"classical", "cnn", "fused"}
    assert m["model"] == "test-model"
    classical_only = evaluate(labels, out.with_name("classical"), reuse=prev, use_cnn=False, bootstrap=0)
    assert set(classical_only["methods"]) == {"classical"} and classical_only["model"] is None
    cl, cn, fu = (m["methods"][k] for k in ("classical", "cnn", "fused"))
    assert cl["accuracy"] == pytest.approx(0.75) and cl["quadratic_weighted_kappa"] == pytest.approx(0.9)
    assert cn["accuracy"] == pytest.approx(6 / 8)
    assert cn["quadratic_weighted_kappa"] == pytest.approx(quadratic_weighted_kappa(confusion_matrix(LABELS, CNN)))
    assert fu["accuracy"] == 1.0 and fu["quadratic_weighted_kappa"] == pytest.approx(1.0)
    assert m["reported_method"] == "fused" and m["accuracy"] == 1.0
    for mm in (cl, cn):
        lo, hi = mm["accuracy_ci95"]
        assert lo <= mm["accuracy"] <= hi
        lo, hi = mm["quadratic_weighted_kappa_ci95"]
        assert lo <= mm["quadratic_weighted_kappa"] <= hi

    # 3+ only: truth eligible = images 6, 7; classical calls 3+ on 5, 6, 7
    e = cl["eligibility"]["3+ only"]
    assert e["n"] == 8 and e["sensitivity"] == 1.0 and e["specificity"] == pytest.approx(5 / 6)
    # her2-low: 2+ images undetermined without ISH; image 1 (0 called 1+) is the false positive
    e = cl["eligibility"]["her2-low-breast"]
    assert e["n"] == 6 and e["n_undetermined"] == 2
    assert e["sensitivity"] == 1.0 and e["specificity"] == pytest.approx(3 / 4)
    # her2-positive: image 4 eligible from its column; 2+ (needs ISH) is not a positive call
    e = cl["eligibility"]["her2-positive-breast"]
    assert e["n"] == 7 and e["n_truly_eligible"] == 3
    assert e["sensitivity"] == pytest.approx(2 / 3)
    # image 4's 2+ awaits ISH: the review is one of the truly eligible (a miss), and one of all 8 scored, image 5 too
    assert (e["review_rate_eligible"], e["review_rate_ineligible"], e["wrong_calls"]) == (pytest.approx(1 / 3), 0.0, 0)
    assert e["needs_review_rate"] == pytest.approx(1 / 8)
    # the fused method carries the CNN, so classical/CNN disagreement gives needs_review where it changes the answer:
    # of the 4 disagreements, the two between 2+ and 3+ (0 against 1+ is not eligible either way)
    assert fu["eligibility"]["3+ only"]["needs_review_rate"] == pytest.approx(2 / 8)
    for rule in ("gastric-toga", "t-dxd-tumour-agnostic"):  # gastric scoring expected
        assert cl["eligibility"][rule] == {"skipped": "the rule expects gastric scoring; evaluated under breast-asco-cap-2023"}
    # a rule written for the other breast version is evaluated, as check_eligibility answers it
    old = Rule(name="low-2018", version="1", guideline="breast-asco-cap-2018", eligible_levels=("1+",))
    m18 = evaluate(labels, out.with_name("r18"), reuse=prev, use_cnn=False, bootstrap=0, rules=[old])
    assert "skipped" not in m18["methods"]["classical"]["eligibility"]["low-2018"]

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["methods"]["classical"]["confusion"]["matrix"] == confusion_matrix(LABELS, CLASSICAL).tolist()
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 8 and [r["classical"] for r in rows] == CLASSICAL and rows[0]["reused"] == "True"
    assert rows[4]["truth_her2-positive-breast"] == "eligible"
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "quadratic-weighted kappa" in report and "| fused |" in report
    assert (out / "results" / "img__f0.png" / "result.json").exists()
    # intervals: Wilson for proportions, bootstrap for kappa only, with a warning at n = 8 < 30
    assert cl["accuracy_ci95"] == list(wilson_ci(6, 8)) and e["sensitivity_ci95"] == list(wilson_ci(2, 3))
    assert cl["kappa_interval_reliable"] is False and any("n = 8 < 30" in w for w in m["warnings"])
    assert "Wilson" in report and "n = 8 < 30" in report
    # eligibility truth: the her2-positive column for image 4, the label and rule file for the rest
    assert e["truth_source"] == {"eligible column": 1, "label and rule file": 6}
    assert "eligible column 1, label and rule file 6" in report
    assert rows[0]["classical_level"] == "0 (null)" and rows[1]["level"] == "0 (null)" and "reason" in rows[0]
    assert rows[0]["reused_from"] == str(prev / "f0" / "result.json")
    # the CNN's own level and flags, which its figures are computed from
    assert [(r["cnn"], r["cnn_level"]) for r in rows] == [(c, method_result(SlideResult.from_dict(json.loads(
        (prev / f"f{i}" / "result.json").read_text())), "cnn").level) for i, c in enumerate(CNN)]
    assert "cnn_flags" in rows[0]


FIVE = ["null", "null", "0+", "0+", "0", "1+", "2+", "3+"]
FIVE_CALLED = [("0", "0 (null)"), ("0", "0+ (ultralow)"), ("0", "0+ (ultralow)"), ("1+", "1+"),
               ("0", "0 (null)"), ("1+", "1+"), ("2+", "2+"), ("3+", "3+")]


@pytest.fixture()
def five(tmp_path):
    data, prev = tmp_path / "data", tmp_path / "prev"
    (data / "img").mkdir(parents=True)
    with open(data / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for i, (lab, (score, level)) in enumerate(zip(FIVE, FIVE_CALLED)):
            img = data / "img" / f"f{i}.png"
            img.write_bytes(b"")
            r = _result(img.resolve(), score)
            if level == "0+ (ultralow)":  # counts an ultralow call could have: 9% faint of 10,000, over false membranes' 8%
                r = replace(r, counts={"none": 9100, "faint_partial": 900}, tumour_cells=10_000)
            d = prev / f"f{i}"
            d.mkdir(parents=True)
            (d / "result.json").write_text(r.__class__(**{**r.__dict__, "level": level, "classical_level": level}).to_json())
            w.writerow([f"img/f{i}.png", lab])
    return data / "labels.csv", prev, tmp_path / "out"


def test_evaluate_on_five_level_labels(five):
    labels, prev, out = five
    items = read_labels(labels)
    assert [i.label for i in items] == ["0", "0", "0", "0", "0", "1+", "2+", "3+"]
    assert [i.level for i in items][:5] == ["0 (null)", "0 (null)", "0+ (ultralow)", "0+ (ultralow)", None]
    m = evaluate(labels, out, reuse=prev, use_cnn=False, bootstrap=50)
    cl = m["methods"]["classical"]
    assert cl["confusion"]["matrix"][0] == [4, 1, 0, 0]  # the five 0 labels: one called 1+
    t = cl["null_vs_ultralow"]
    assert t["n"] == 4 and t["columns"][:2] == ["0 (null)", "0+ (ultralow)"]
    assert t["matrix"] == [[1, 1, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0, 0]]
    assert t["agreement"] == 0.5 and t["agreement_ci95"] == list(wilson_ci(2, 4))
    # her2-ultralow: null labels are not eligible, 0+ labels are; the plain 0 is undetermined
    e = cl["eligibility"]["her2-ultralow-breast"]
    assert e["n_undetermined"] == 2 and e["n_truly_eligible"] == 3  # the two 0+ and the 1+; 2+ needs ISH
    assert e["sensitivity"] == 1.0 and e["specificity"] == pytest.approx(2 / 3)  # the null called ultralow
    report = (out / "report.md").read_text()
    assert "## Null vs ultralow" in report and "| 0 (null) | 1 | 1 |" in report
    assert (out / "confusion.png").stat().st_size > 1000


def test_null_vs_ultralow_counts_an_image_refused_or_failed_as_not_scored(five, capsys):
    """An image that gets no result (here an empty file, its earlier result gone) is out of accuracy and kappa but
    is a 'not scored' in the null vs ultralow table, as the README says (a review found it left out there too)."""
    labels, prev, out = five
    (prev / "f1" / "result.json").unlink()  # f1: labelled null; now scored afresh from a 0-byte file
    m = evaluate(labels, out, reuse=prev, use_cnn=False, bootstrap=0)
    assert (m["n_images"], m["n"], m["errors"]) == (8, 7, 1)
    t = m["methods"]["classical"]["null_vs_ultralow"]
    assert t["n"] == 4 and t["matrix"][0] == [1, 0, 0, 0, 0, 0, 1] and t["agreement"] == 0.5
    assert "7 of 8 images scored (1 refused or failed: left out of every figure but null vs ultralow's 'not scored'" \
        in (out / "report.md").read_text()


def test_null_vs_ultralow_counts_unscored_images_and_is_left_out_where_the_guideline_calls_a_plain_0(five, tmp_path):
    labels, prev, out = five
    f = prev / "f0" / "result.json"  # a null-labelled image without tumour cells: no score
    r = SlideResult.from_dict(json.loads(f.read_text()))
    f.write_text(replace(r, score=None, classical_score=None, level="not scored", classical_level="not scored",
                         tumour_cells=0, counts={c: 0 for c in r.counts}, h_score=None).to_json())
    t = evaluate(labels, out, reuse=prev, use_cnn=False, bootstrap=0)["methods"]["classical"]["null_vs_ultralow"]
    assert t["n"] == 4 and t["matrix"][0] == [0, 1, 0, 0, 0, 0, 1] and t["agreement"] == 0.25
    for f in prev.rglob("result.json"):  # the same results as scored under 2018
        r = SlideResult.from_dict(json.loads(f.read_text()))
        f.write_text(replace(r, guideline="breast-asco-cap-2018", config={**r.config, "guideline": "breast-asco-cap-2018"}).to_json())
    m = evaluate(labels, tmp_path / "out2018", guideline="breast-asco-cap-2018", reuse=prev, use_cnn=False, bootstrap=0)
    assert m["n"] and all(mm["null_vs_ultralow"] is None for mm in m["methods"].values())
    assert "calls a plain 0 (only breast-asco-cap-2023 tells null from ultralow): no table" in (tmp_path / "out2018" / "report.md").read_text()


def test_a_rule_error_shows_in_the_eligibility_figures(five, monkeypatch):
    """Truth comes from the label and the rule file, so a broken check_eligibility is caught."""
    import her2score.eligibility as eligibility
    from her2score.eligibility import Decision

    labels, prev, out = five
    good = evaluate(labels, out, reuse=prev, use_cnn=False, bootstrap=0, rules=[THREE_ONLY])
    assert good["methods"]["classical"]["eligibility"]["3+ only"]["specificity"] == 1.0
    monkeypatch.setattr(eligibility, "check_eligibility", lambda r, rule, ish=None: Decision("eligible", "x", "1", ()))
    bad = evaluate(labels, out, reuse=prev, use_cnn=False, bootstrap=0, rules=[THREE_ONLY])
    assert bad["methods"]["classical"]["eligibility"]["3+ only"]["specificity"] == 0.0


def test_true_counts_from_columns_and_bad_labels_name_the_line(tmp_path):
    (tmp_path / "truth.jsonl").write_text('{"path": "c.png", "counts": {"none": 90, "stroma": 30}}\n')
    (tmp_path / "m.csv").write_text("path,label\nc.png,0\n")
    with pytest.raises(ValueError, match=r"truth\.jsonl, line 1: unknown cell categories \['stroma'\]"):
        read_labels(tmp_path / "m.csv")
    (tmp_path / "truth.jsonl").unlink()
    (tmp_path / "m.csv").write_text("path,label,count_none,count_stroma\nc.png,0,90,30\n")
    with pytest.raises(ValueError, match=r"unknown count columns \['count_stroma'\]"):
        read_labels(tmp_path / "m.csv")
    p = tmp_path / "l.csv"
    zeros = ",0" * (len(CATEGORIES) - 2)
    p.write_text(f"path,label,{','.join('count_' + c for c in CATEGORIES)}\na.png,1+,30,70{zeros}\nb.png,0{',' * len(CATEGORIES)}\n")
    items = read_labels(p)
    assert items[0].counts["none"] == 30 and items[0].counts["faint_partial"] == 70 and items[1].counts is None
    p.write_text("path,label,count_none,count_faint_partial\na.png,1+,30,70\n")  # a category without a column: 0 cells
    assert read_labels(p)[0].counts == {**dict.fromkeys(CATEGORIES, 0), "none": 30, "faint_partial": 70}
    for text, words in (  # an empty count cell, a column named twice, a labelled row without a path
            (f"path,label,{','.join('count_' + c for c in CATEGORIES)}\na.png,1+,30,70{',' * (len(CATEGORIES) - 2)}\n",
             r"line 2: true counts given for some categories but not \['count_weak"),
            ("path,label,path\na.png,1+,b.png\n", r"the header names \['path'\] more than once"),
            ("path,label\na.png,0\n,1+\n", r"l\.csv, line 3: a row without a path")):
        p.write_text(text)
        with pytest.raises(ValueError, match=words):
            read_labels(p)
    p.write_text("path,label\na.png,1+\nb.png,4+\n")
    with pytest.raises(ValueError, match=r"l\.csv, line 3: unknown label '4\+'"):
        read_labels(p)
    p.write_text("path,label,level\na.png,1+,0+\n")
    with pytest.raises(ValueError, match="does not agree"):
        read_labels(p)
    p.write_text("path,label,level\na.png,null,ultralow\n")  # two five-level labels that disagree
    with pytest.raises(ValueError, match="does not agree"):
        read_labels(p)
    p.write_text("path,label,level\na.png,null,0\nb.png,0,ultralow\n")  # a plain 0 beside a five-level one keeps it
    assert [i.level for i in read_labels(p)] == ["0 (null)", "0+ (ultralow)"]
    p.write_text("path,label\n\n\na.png,1+\n\nb.png,4+\n")  # the line in the file, blank lines counted
    with pytest.raises(ValueError, match=r"l\.csv, line 6: unknown label '4\+'"):
        read_labels(p)
    p.write_text("path,label\na.png,1+,\n")  # a trailing comma: a field the header has no column for
    with pytest.raises(ValueError, match=r"l\.csv, line 2: more fields than the header"):
        read_labels(p)
    for bad in ("-50", "90.5", "x"):
        p.write_text(f"path,label,count_none,count_strong_complete\na.png,3+,{bad},100\n")
        with pytest.raises(ValueError, match=r"line 2, count_none: a cell count must be a whole number >= 0"):
            read_labels(p)


def test_truth_counts_are_matched_by_the_images_path_and_refused_when_impossible(tmp_path, caplog):
    p = tmp_path / "l.csv"
    p.write_text("path,label\n./img/a.png,1+\n")
    (tmp_path / "truth.jsonl").write_text('{"path": "img/a.png", "counts": {"none": 80, "faint_partial": 20}}\n'
                                          '{"path": "img/gone.png", "counts": {"none": 1}}\n')
    with caplog.at_level("WARNING"):
        assert read_labels(p)[0].counts == {"none": 80, "faint_partial": 20}
    assert "1 truth.jsonl record(s) name no labelled image" in caplog.text
    # the labels file's own counts beside truth.jsonl's: taken where they agree, refused where they do not (the
    # file's overrode truth.jsonl's silently)
    p.write_text("path,label,count_none,count_faint_partial\n./img/a.png,1+,80,20\n")
    assert read_labels(p)[0].counts == {c: {"none": 80, "faint_partial": 20}.get(c, 0) for c in CATEGORIES}
    p.write_text("path,label,count_none,count_faint_partial\n./img/a.png,1+,50,50\n")
    with pytest.raises(ValueError, match=r"l\.csv, line 2: its count_ columns and truth\.jsonl give other true counts"):
        read_labels(p)
    p.write_text("path,label\n./img/a.png,1+\n")
    for bad in ('{"none": -3}', '{"none": 90.9}', '{"none": "many"}'):
        (tmp_path / "truth.jsonl").write_text('{"path": "img/a.png", "counts": %s}\n' % bad)
        with pytest.raises(ValueError, match=r"truth\.jsonl, line 1, none: a cell count must be a whole number >= 0"):
            read_labels(p)


def test_true_counts_that_add_up_to_0_are_left_out_of_the_percentage_agreement(tmp_path):
    prev = tmp_path / "prev"
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(b"")
        (prev / name).mkdir(parents=True)
        r = replace(_result((tmp_path / f"{name}.png").resolve(), "1+"), counts={"none": 80, "faint_partial": 20},
                    percentages={"none": 80.0, "faint_partial": 20.0}, tumour_cells=100)
        (prev / name / "result.json").write_text(r.to_json())
    (tmp_path / "l.csv").write_text("path,label,count_none,count_faint_partial\na.png,1+,80,20\nb.png,1+,0,0\n")
    pa = evaluate(tmp_path / "l.csv", tmp_path / "out", reuse=prev, use_cnn=False, bootstrap=0)["percent_agreement"]
    assert pa["none"]["n"] == 1 and pa["none"]["mae"] == 0.0 and pa["faint_partial"]["mae"] == 0.0


def test_a_symbolic_link_loop_in_the_labels_is_that_images_error(tmp_path):
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "l.csv").write_text("path,label\nloop.png,1+\n")
    m = evaluate(tmp_path / "l.csv", tmp_path / "out", use_cnn=False, bootstrap=0)
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_image.csv")))
    assert m["errors"] == 1 and "a symbolic link to nothing (broken, or a loop)" in rows[0]["error"]


def test_an_out_that_is_a_file_is_refused_in_words(tmp_path, capsys):
    (tmp_path / "l.csv").write_text("path,label\nf.png,1+\n")
    (tmp_path / "afile").write_text("x")
    assert main(["evaluate", str(tmp_path / "l.csv"), "--out", str(tmp_path / "afile"), "--no-cnn"]) == 2
    assert capsys.readouterr().err.strip() == f"her2score evaluate: {tmp_path / 'afile'}: exists and is not a folder (--out; out= in the Python API)"


def test_an_evaluation_that_scored_nothing_draws_no_empty_plot_and_says_so(tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    (tmp_path / "l.csv").write_text("path,label\ncorrupt.png,null\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "confusion.png").write_bytes(b"an earlier run's")
    m = evaluate(tmp_path / "l.csv", tmp_path / "out", use_cnn=False, bootstrap=0)
    assert m["errors"] == 1 and m["methods"] == {} and not (tmp_path / "out" / "confusion.png").exists()
    assert m["summary"].startswith("0 of 1 images scored (1 refused or failed: no image was scored, so there is no figure)")


def test_an_evaluations_own_plots_are_never_taken_for_images(tmp_path, fields):
    """An evaluation written into the folder it read (cases/3+/eval): the next evaluate took its confusion.png for a
    labelled 3+ image, score for a slide, train for training data (each with an error naming a 230.9 µm/px)."""
    from her2score.batch import discover
    from her2score.labels import class_folder_files

    root = tmp_path / "cases"
    for score, name in (("0", "field_0_null.png"), ("3+", "field_3plus_a.png")):
        (root / score).mkdir(parents=True)
        save_png(root / score / name, fields[score])
    evaluate(root, root / "3+" / "eval", use_cnn=False, bootstrap=0)
    assert {"confusion.png", "metrics.json"} <= {p.name for p in (root / "3+" / "eval").iterdir()}
    assert sorted(p.name for p, _ in class_folder_files(root)) == ["field_0_null.png", "field_3plus_a.png"]
    skipped: list = []
    assert sorted(p.name for p, _ in discover([root], skipped=skipped)[0]) == ["field_0_null.png", "field_3plus_a.png"]
    assert [(Path(p).name, why.split(" (")[0]) for p, why in skipped] == [("eval", "a her2score evaluation's output folder")]
    again = evaluate(root, tmp_path / "again", use_cnn=False, bootstrap=0)
    assert again["n"] == 2 and again["errors"] == 0
    # only the evaluation's own files are skipped, known by its metrics.json: the slides beside them are slides, and
    # a study's own metrics.json, per_image.csv and report.md are no evaluation's
    evaluate(root, root, use_cnn=False, bootstrap=0)
    assert sorted(p.name for p, _ in discover([root])[0]) == ["field_0_null.png", "field_3plus_a.png"]
    study = tmp_path / "study"
    study.mkdir()
    for name in ("metrics.json", "per_image.csv", "report.md"):
        (study / name).write_text("{}" if name.endswith("json") else "")
    save_png(study / "confusion.png", fields["1+"])  # an image of the study's that happens to bear the name
    assert [p.name for p, _ in discover([study])[0]] == ["confusion.png"]


def test_class_folders_carry_five_level_labels(tmp_path):
    for name in ("null", "ultralow", "0+", "1plus", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"")
    (tmp_path / "1plus" / "._x.png").write_bytes(b"")  # a Mac's resource fork on a share
    (tmp_path / "1plus" / "x_out").mkdir()
    (tmp_path / "1plus" / "x_out" / "overlay.png").write_bytes(b"")  # her2score's drawing of x.png
    (tmp_path / "1plus" / "x_out" / "cells.geojson").write_text("{}")  # a stopped re-score's: no result.json yet
    (tmp_path / "1plus" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # a link to nothing
    elsewhere = tmp_path.parent / f"{tmp_path.name}_elsewhere"  # a linked sub-folder (a cluster's shared store)
    elsewhere.mkdir()
    (elsewhere / "y.png").write_bytes(b"")
    (tmp_path / "0+" / "more").symlink_to(elsewhere)
    (tmp_path / "0+" / "loop").symlink_to(tmp_path / "0+")  # a link back up: no loop
    got = sorted((Path(i.path).parent.name, i.label, i.level) for i in read_labels(tmp_path))
    assert got == [("0+", "0", "0+ (ultralow)"), ("1plus", "1+", "1+"), ("more", "0", "0+ (ultralow)"),
                   ("null", "0", "0 (null)"), ("ultralow", "0", "0+ (ultralow)")]
    (tmp_path / "null" / "overlay.png").write_bytes(b"")  # a user's own image of that name, with no result beside it
    assert sum(Path(i.path).name == "overlay.png" for i in read_labels(tmp_path)) == 1


def test_plain_eligible_column_needs_a_rule(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("path,label,eligible\na.png,3+,yes\n")
    with pytest.raises(ValueError, match=r"\(--eligible-rule NAME; eligible_rule=NAME in the Python API\)"):
        read_labels(p)
    items = read_labels(p, eligible_rule="her2-positive-breast")
    assert items[0].eligible == {"her2-positive-breast": True}
    p.write_text("path,label,eligible,eligible_her2-positive-breast\na.png,3+,no,yes\n")
    with pytest.raises(ValueError, match="eligible and eligible_her2-positive-breast disagree"):
        read_labels(p, eligible_rule="her2-positive-breast")
    p.write_text("path,label,eligible_x\na.png,3+,maybe\n")
    with pytest.raises(ValueError, match="maybe"):
        read_labels(p)



def test_an_evaluation_whose_progress_reader_goes_away_finishes(tmp_path):
    """'evaluate ... 2>&1 | head -n1': the second progress line raised BrokenPipeError and ended the run after one
    image, with no metrics.json or report.md. It goes on unwatched and writes them."""
    import subprocess
    import sys

    ds = write_dataset(tmp_path / "ds", n_per_class=1, seed=22, size_px=(256, 256))
    out = tmp_path / "ev"
    proc = subprocess.Popen([sys.executable, "-m", "her2score", "evaluate", str(ds / "labels.csv"), "--out", str(out),
                             "--no-cnn", "--bootstrap", "20"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().startswith("[1/4] ")
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0
    assert json.loads((out / "metrics.json").read_text())["n"] == 4 and (out / "report.md").is_file()


def test_evaluate_scores_images_without_a_scale_at_the_default_given(tmp_path):
    """A labelled set of snapshots without µm/px: refused image by image, or scored at --default-mpp (as 'score' does)."""
    from PIL import Image

    from her2score.synthetic import generate_field

    (tmp_path / "set").mkdir()
    for i, score in enumerate(("0", "3+")):
        Image.fromarray(generate_field(score, seed=60 + i, size_px=(256, 256)).image).save(tmp_path / "set" / f"{i}.png")
    labels = tmp_path / "set" / "labels.csv"
    labels.write_text("path,label\n0.png,0\n1.png,3+\n")
    args = ["evaluate", str(labels), "--no-cnn", "--bootstrap", "0", "-q"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 1
    assert main([*args, "--out", str(tmp_path / "ev"), "--default-mpp", "0.5"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 2 and m["methods"]["classical"]["accuracy"] == 1.0
    assert main([*args, "--out", str(tmp_path / "both"), "--mpp", "0.5", "--default-mpp", "0.5"]) == 2


def test_a_second_evaluation_into_a_folder_in_use_is_refused(tmp_path, capsys):
    """Two evaluations into one --out both exited 0, the first naming a metrics.json the second had written over."""
    from her2score import batch

    ds = write_dataset(tmp_path / "ds", n_per_class=1, seed=23, size_px=(128, 128))
    out = tmp_path / "ev"
    out.mkdir()
    held = batch._lock(out)  # another run writing there
    try:
        assert main(["evaluate", str(ds / "labels.csv"), "--out", str(out), "--no-cnn", "-q"]) == 2
        assert "another her2score batch" in capsys.readouterr().err and not (out / "metrics.json").exists()
    finally:
        batch._unlock(held)
    assert main(["evaluate", str(ds / "labels.csv"), "--out", str(out), "--no-cnn", "--bootstrap", "0", "-q"]) == 0


def test_the_report_says_what_it_left_out_and_what_it_reused(tmp_path):
    """A misspelt class folder was skipped with a log line alone, --eligible-rule without an 'eligible' column said
    nothing, and a run that reused every result said only 'N of N images scored'."""
    from PIL import Image

    from her2score.synthetic import generate_field

    for folder, score, seed in (("0", "0", 70), ("3+", "3+", 71), ("3++", "3+", 72)):
        (tmp_path / "cls" / folder).mkdir(parents=True)
        Image.fromarray(generate_field(score, seed=seed, size_px=(192, 192)).image).save(tmp_path / "cls" / folder / "f.png",
                                                                                         dpi=(50800, 50800))
    args = ["--no-cnn", "--bootstrap", "0", "-q", "--eligible-rule", "her2-low-breast"]
    assert main(["evaluate", str(tmp_path / "cls"), "--out", str(tmp_path / "ev"), *args]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_images"] == 2 and m["reused"] == 0
    assert any("1 sub-folder of" in w and "left out: 3++" in w for w in m["warnings"])
    assert any("--eligible-rule her2-low-breast: the labels have no 'eligible' value" in w for w in m["warnings"])
    assert main(["evaluate", str(tmp_path / "cls"), "--out", str(tmp_path / "ev2"), "--reuse", str(tmp_path / "ev" / "results"),
                 *args]) == 0
    m2 = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert m2["reused"] == 2 and (f"; 2 of them reused from {tmp_path / 'ev' / 'results'} (each kept in results/); guideline"
                                  in (tmp_path / "ev2" / "report.md").read_text())


def test_images_that_failed_qc_are_counted_and_said_to_be(tmp_path):
    """Every image failing QC (fields too small for 100 tumour cells), the report said '4 of 4 images scored' and
    an accuracy, as if all were sound: it says how many failed and why, and each method's accuracy over those
    that passed (none here: n/a)."""
    ds = write_dataset(tmp_path / "ds", n_per_class=1, seed=41, size_px=(160, 160))
    m = evaluate(ds / "labels.csv", tmp_path / "ev", use_cnn=False, bootstrap=0)
    assert m["qc_failed"] == 4 and m["methods"]["classical"]["qc_passed"] == {"n": 0, "accuracy": None, "accuracy_ci95": [None, None]}
    assert any(w.startswith("4 of the 4 images scored failed QC (too_few_tumour_cells 4)") for w in m["warnings"])
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "; 4 failed QC, counted in every figure)" in report and "; QC passed (0 images) n/a |" in report
    assert "4 of them failed QC (counted; see warnings)" in m["summary"]


def test_an_evaluation_that_reused_results_stands_alone(known, monkeypatch):
    """With --reuse given as a relative path, per_image.csv's reused_from named each result.json relative to the folder
    the command ran in, and neither metrics.json nor the report said where the results came from: reused_from is
    absolute, metrics.json's 'reuse' and the report name the folder, and results/ holds each result whole, so the
    evaluation stands alone once that folder is gone."""
    labels, prev, out = known
    monkeypatch.chdir(prev.parent)
    m = evaluate(labels, out, reuse=prev.name, use_cnn=False, bootstrap=0)
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert [r["reused_from"] for r in rows] == [str(prev / f"f{i}" / "result.json") for i in range(8)]
    assert m["reuse"] == json.loads((out / "metrics.json").read_text())["reuse"] == str(prev)
    assert f"8 of them reused from {prev} (each kept in results/)" in (out / "report.md").read_text()
    taken = [SlideResult.read(prev / f"f{i}" / "result.json") for i in range(8)]
    shutil.rmtree(prev)
    for i, result in enumerate(taken):  # --no-cnn: the classical call alone
        assert SlideResult.read(out / "results" / f"img__f{i}.png" / "result.json") == method_result(result, "classical")

def test_evaluate_runs_the_pipeline_classical_only(tmp_path):
    ds = write_dataset(tmp_path / "ds", n_per_class=1, seed=21, size_px=(320, 320))
    bad = ds / "images" / "broken.png"
    bad.write_bytes(b"not a png")
    with open(ds / "labels.csv", "a") as fh:
        fh.write("images/broken.png,2+\n")
    out = tmp_path / "ev"
    assert main(["evaluate", str(ds / "labels.csv"), "--out", str(out), "--no-cnn", "--bootstrap", "50", "-q"]) == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 5 and m["n"] == 4 and m["errors"] == 1
    assert list(m["methods"]) == ["classical"] and m["model"] is None
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert "broken.png" in rows[-1]["error"]
    # synth writes the five-level label and the true counts: per-image percentage agreement
    assert rows[0]["truth_level"] in ("0 (null)", "0+ (ultralow)") and rows[1]["truth_level"] == "1+"
    assert float(rows[1]["truth_pct_none"]) + float(rows[1]["truth_pct_faint_partial"]) > 50
    pa = m["percent_agreement"]
    assert pa["none"]["n"] == 4 and pa["none"]["mae"] >= 0 and (out / "bland_altman.png").stat().st_size > 1000
    # a second run reuses the first run's results
    m2 = evaluate(ds / "labels.csv", tmp_path / "ev2", reuse=out / "results", use_cnn=False, bootstrap=50)
    assert m2["methods"]["classical"]["confusion"] == m["methods"]["classical"]["confusion"]
    rows2 = list(csv.DictReader(open(tmp_path / "ev2" / "per_image.csv")))
    assert all(r["reused"] == "True" for r in rows2[:4])
    # but not under another guideline: those images are scored again, under its rules
    evaluate(ds / "labels.csv", tmp_path / "ev3", reuse=out / "results", use_cnn=False, bootstrap=0, guideline="gastric")
    rows3 = list(csv.DictReader(open(tmp_path / "ev3" / "per_image.csv")))
    assert all(r["reused"] == "False" for r in rows3[:4])
    assert all(json.loads(f.read_text())["guideline"] == "gastric" for f in (tmp_path / "ev3" / "results").rglob("result.json"))
    # into the same --out again, two images labelled, one of them now broken: results/ holds just the other's
    lines = (ds / "labels.csv").read_text().splitlines()
    (ds / "two.csv").write_text("\n".join(lines[:3]) + "\n")
    (ds / lines[2].split(",")[0]).write_bytes(b"")
    m4 = evaluate(ds / "two.csv", out, reuse=out / "results", use_cnn=False, bootstrap=0)  # never its old result
    assert (m4["n_images"], m4["n"]) == (2, 1)
    assert [p.parent.name for p in (out / "results").rglob("result.json")] == [_result_folders([str(ds / lines[1].split(",")[0])], ds)[0]]
    assert not (out / "bland_altman.png").exists() or m4.get("percent_agreement")


def test_evaluate_specimen_from_the_command_line(tmp_path, capsys):
    ds = write_dataset(tmp_path / "ds", n_per_class=1, seed=22, size_px=(320, 320))
    labels, out = str(ds / "labels.csv"), tmp_path / "ev"
    # breast scores biopsies like resections: refused before any work
    assert main(["evaluate", labels, "--out", str(out), "--no-cnn", "--specimen", "biopsy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("her2score evaluate: --specimen biopsy: specimen 'biopsy'")
    assert not out.exists()
    assert main(["evaluate", labels, "--out", str(out), "--no-cnn", "--gastric-reading", "per_band"]) == 2
    assert "--gastric-reading per_band: --gastric-reading 'per_band' is a reading of the gastric rules" in capsys.readouterr().err
    argv = ["evaluate", labels, "--out", str(out), "--no-cnn", "--guideline", "gastric", "--specimen", "biopsy",
            "--gastric-reading", "per_band", "--bootstrap", "50", "-q"]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["guideline"], m["specimen"], m["gastric_reading"]) == ("gastric", "biopsy", "per_band")
    results = sorted((out / "results").rglob("result.json"))
    assert len(results) == 4 and {json.loads(p.read_text())["specimen"] for p in results} == {"biopsy"}
    assert {json.loads(p.read_text())["config"]["gastric_reading"] for p in results} == {"per_band"}
    floor = tmp_path / "floor"  # the isolated floor, breast's, reaches the scoring too
    assert main(["evaluate", labels, "--out", str(floor), "--no-cnn", "--isolated-floor", "0", "--bootstrap", "0", "-q"]) == 0
    assert json.loads((floor / "metrics.json").read_text())["isolated_intense_percent"] == 0.0
    assert {json.loads(p.read_text())["config"]["isolated_intense_percent"] for p in (floor / "results").rglob("result.json")} == {0.0}


def test_evaluate_rules_from_the_command_line(tmp_path, capsys):
    """--rule names the rule sets judged: shipped ones by name, a rule of one's own by its .toml file."""
    from her2score.eligibility import RULES_DIR

    ds = write_dataset(tmp_path / "ds", n_per_class=1, seed=23, size_px=(320, 320))
    own = tmp_path / "mine.toml"
    own.write_text((RULES_DIR / "her2-low-breast.toml").read_text().replace('name = "her2-low-breast"', 'name = "my-low"'))
    labels, out = str(ds / "labels.csv"), tmp_path / "ev"
    assert main(["evaluate", labels, "--out", str(out), "--no-cnn", "--rule", "nosuch", "-q"]) == 2
    assert "unknown rule 'nosuch'" in capsys.readouterr().err and not out.exists()
    assert main(["evaluate", labels, "--out", str(out), "--no-cnn", "--bootstrap", "0", "-q",
                 "--rule", str(own), "--rule", "her2-positive-breast"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert list(m["methods"]["classical"]["eligibility"]) == ["my-low", "her2-positive-breast"]
    head = next(csv.reader(open(out / "per_image.csv")))
    assert "truth_my-low" in head and "classical_her2-positive-breast" in head and "classical_car-t-her2" not in head


def test_evaluate_with_a_cnn(tmp_path):
    torch = pytest.importorskip("torch")
    from her2score.cnn import WeightsRecord, build_network, load_model, save_model

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    save_model(tmp_path / "m.pt", build_network(width=8), WeightsRecord(file="m.pt", sha256="", width=8))
    model = load_model(tmp_path / "m.pt", device="cpu")
    ds = write_dataset(tmp_path / "ds", n_per_class=1, seed=22, size_px=(320, 320))  # the tissue mask needs >= 0.02 mm2
    try:
        m = evaluate(ds / "labels.csv", tmp_path / "ev", model=model, bootstrap=20)
        # classical-only results are not reused when the CNN is wanted: those images are scored again
        evaluate(ds / "labels.csv", tmp_path / "ev0", use_cnn=False, bootstrap=0)
        m2 = evaluate(ds / "labels.csv", tmp_path / "ev2", model=model, reuse=tmp_path / "ev0" / "results", bootstrap=0)
    finally:
        torch.set_num_threads(threads)
    assert set(m["methods"]) == {"classical", "cnn", "fused"} and m["methods"]["cnn"]["n"] == 4
    # the CNN reads 0-3+: its null-vs-ultralow 'agreement' was the cell counts' split, 1.000, reported as its own
    assert m["methods"]["cnn"]["null_vs_ultralow"] is None and m["methods"]["classical"]["null_vs_ultralow"] is not None
    assert "so it has no table of its own" in (tmp_path / "ev" / "report.md").read_text()
    assert any("per-category agreement over 4 images (n < 30)" in w for w in m["warnings"])  # limits drawn on 4: unwarned
    rows = list(csv.DictReader(open(tmp_path / "ev" / "per_image.csv")))
    assert all(r["cnn"] in ("0", "1+", "2+", "3+") and float(r["p_0"]) >= 0 for r in rows)
    assert m["cnn_source"] == {"pipeline": 4} and m2["cnn_source"] == {"pipeline": 4}
    rows2 = list(csv.DictReader(open(tmp_path / "ev2" / "per_image.csv")))
    for a, b in zip(rows, rows2):
        assert b["reused"] == "False" and b["cnn"] == a["cnn"]
        assert float(b["p_0"]) == pytest.approx(float(a["p_0"]), abs=1e-5)
    res = SlideResult.from_dict(json.loads(next((tmp_path / "ev" / "results").rglob("result.json")).read_text()))
    assert res.cnn is not None and res.cnn.model.startswith("m.pt@") and 0 <= res.confidence <= 1


# --------------------------------------------------------------------------- percentages against the generator's truth

PCT_FIELDS = (("0", 90), ("1+", 91), ("2+", 92), ("3+", 93))
PCT_BOUND = 5.0  # percentage points, per category and field (issue 12)


@pytest.mark.xfail(strict=True, reason=(
    "scorer, not the measurement: measured 6 Dec 2026 (her2score 0.5.0) against the truth as seen (README: shared "
    "membranes), largest per-category errors under 2 (0), 27.8 (1+: none +27.8, faint_partial -27.8: faint membranes "
    "under-found), under 2 (2+), 5.1 (3+: faint_partial -5.1, none +4.4, strong_complete -2.5) points. "
    "Remove this mark when it passes (strict: an unexpected pass fails)."))
def test_category_percentages_within_five_points_of_the_generator_truth():
    from her2score.pipeline import analyse_slide
    from her2score.slide import ArraySlide
    from her2score.synthetic import generate_field

    worst = {}
    for score, seed in PCT_FIELDS:
        f = generate_field(score, seed=seed)
        r = analyse_slide(ArraySlide(f.image, mpp=f.mpp)).result
        counts = f.truth_counts()
        truth = {c: 100.0 * v / sum(counts.values()) for c, v in counts.items()}
        pa = percent_agreement([(r.percentages, truth)])
        worst[score] = {c: round(v["bias"], 1) for c, v in pa.items() if abs(v["bias"]) > PCT_BOUND}
    assert worst == {s: {} for s, _ in PCT_FIELDS}


# --------------------------------------------------------------------------- what a labels file and --reuse can get wrong

def test_an_image_labelled_twice_is_refused(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("path,label\nx.png,1+\ny.png,0\n./x.png,1+\n")
    with pytest.raises(ValueError, match=r"l\.csv, line 4: \./x\.png is labelled again \(first on line 2\)"):
        read_labels(p)


def test_eligibility_truth_for_a_rule_that_does_not_exist_is_refused(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("path,label,eligible\nx.png,2+,yes\n")
    with pytest.raises(ValueError, match=r"unknown rules \['her2-low'\]"):
        evaluate(p, tmp_path / "out", use_cnn=False, eligible_rule="her2-low")


def test_reuse_by_file_name_only_where_it_names_one_labelled_image(tmp_path):
    """Two labelled images share a file name and --reuse holds a result for one of them elsewhere: neither
    takes it by name (both are scored; here they are empty files, so both are errors). Images outside the
    labels folder that share a name get results folders of their own."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "f.png").write_bytes(b"")
    prev = tmp_path / "prev" / "f"
    prev.mkdir(parents=True)
    (prev / "result.json").write_text(_result("/elsewhere/a/f.png", "3+").to_json())
    (tmp_path / "labels.csv").write_text("path,label\na/f.png,3+\nb/f.png,0\n")
    m = evaluate(tmp_path / "labels.csv", tmp_path / "out", reuse=tmp_path / "prev", use_cnn=False, bootstrap=0)
    assert m["n"] == 0 and m["errors"] == 2
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_image.csv")))
    assert all(r["error"] for r in rows) and not any(r.get("reused") for r in rows)
    from her2score.evaluate import _result_folders

    assert _result_folders(["/x/a/f.png", "/y/f.png", str(tmp_path / "a" / "f.png")], tmp_path) == [
        "f.png", "f.png (2)", "a__f.png"]
    for missing, why in ((tmp_path / "none", "folder does not exist"), (tmp_path / "labels.csv", "is not a folder")):
        with pytest.raises(FileNotFoundError, match=rf"{missing.name}: the folder of results to reuse \(--reuse; reuse= in "
                                                    rf"the Python API\) {why}"):
            evaluate(tmp_path / "labels.csv", tmp_path / "out2", reuse=missing, use_cnn=False, bootstrap=0)


def test_a_result_of_another_cnn_is_not_reused(tmp_path):
    class Named:
        name = "the-new-model"

    img = tmp_path / "f.png"
    img.write_bytes(b"")
    old = _result(img.resolve(), "1+", cnn="1+", fused="1+")  # its CNN report names "test-model"
    reusable = {str(img.resolve()): tmp_path / "r.json"}
    (tmp_path / "r.json").write_text(old.to_json())
    from her2score.evaluate import LabelledItem, _score_one
    from her2score.pipeline import ScoringConfig

    item = LabelledItem(str(img), "1+", {})
    classical_only, reused, cnn_by = _score_one(item, config=ScoringConfig(), mpp=None, model=None, reusable=reusable)
    assert reused and cnn_by == "" and classical_only.cnn is None  # --no-cnn: the reused CNN part is left out
    fused = replace(old, reason="the call; the CNN reads 3+ (p=0.73)", classical_reason="the call")
    (tmp_path / "r.json").write_text(fused.to_json())
    assert _score_one(item, config=ScoringConfig(), mpp=None, model=None, reusable=reusable)[0].reason == "the call"
    (tmp_path / "r.json").write_text(old.to_json())
    Named.name = "test-model"
    assert _score_one(item, config=ScoringConfig(), mpp=None, model=Named(), reusable=reusable)[1] == str(tmp_path / "r.json")
    Named.name = "the-new-model"
    with pytest.raises(Exception):  # scored again (an empty file here): never the old model's figures
        _score_one(item, config=ScoringConfig(), mpp=None, model=Named(), reusable=reusable)


def test_a_result_read_by_another_reader_is_not_reused(tmp_path):
    """Reuse needs the reader the run opens the image with: the one given (--backend), else the one the file chooses;
    a result naming none (written before results named their reader) is reused only where none is given."""
    from her2score.evaluate import LabelledItem, _score_one
    from her2score.slide import SlideError

    img = tmp_path / "f.tif"
    img.write_bytes(b"II*\x00" + bytes(60))  # a TIFF header: the file chooses tifffile; scoring it again raises
    item = LabelledItem(str(img), "1+", {})

    def reused(notes: tuple[str, ...], backend: str | None) -> bool:
        (tmp_path / "r.json").write_text(replace(_result(img, "1+"), notes=notes).to_json())
        try:
            return bool(_score_one(item, config=ScoringConfig(), mpp=None, model=None, backend=backend,
                                   reusable={str(img.resolve()): tmp_path / "r.json"})[1])
        except SlideError:  # scored again
            return False

    assert reused(("reader: tifffile",), None) and reused(("reader: tifffile",), "tifffile")
    assert not reused(("reader: tifffile",), "openslide") and not reused(("reader: openslide",), None)
    assert reused((), None) and not reused((), "tifffile")


def test_evaluate_reads_every_image_with_the_backend_given(tmp_path, good_png):
    """--backend as for score: each result names its reader, a reader that cannot read an image makes its row an
    error naming it, and a result read by another reader is not reused."""
    (tmp_path / "cls" / "2+").mkdir(parents=True)
    image = shutil.copy(good_png, tmp_path / "cls" / "2+" / "f.png")
    args = ["--no-cnn", "--bootstrap", "0", "-q"]
    assert main(["evaluate", str(tmp_path / "cls"), "--out", str(tmp_path / "ev"), *args]) == 0
    [first] = (tmp_path / "ev" / "results").glob("*/result.json")
    assert "reader: image" in SlideResult.read(first).notes
    reuse = ["--reuse", str(tmp_path / "ev" / "results")]
    assert main(["evaluate", str(tmp_path / "cls"), "--out", str(tmp_path / "tiff"), *reuse, *args, "--backend", "tifffile"]) == 1
    [row] = csv.DictReader(open(tmp_path / "tiff" / "per_image.csv"))
    assert row["error"] == f"{image}: tifffile reads TIFF files; this is a PNG image (the image backend reads it)"
    assert main(["evaluate", str(tmp_path / "cls"), "--out", str(tmp_path / "image"), *reuse, *args, "--backend", "image"]) == 0
    assert json.loads((tmp_path / "image" / "metrics.json").read_text())["reused"] == 1


def test_a_result_scored_with_other_settings_or_another_image_of_the_same_name_is_not_reused(tmp_path):
    """Reuse needs the same scoring settings and µm/px; a result is matched by file name only where the
    image it names has moved away, never for another image that shares the name."""
    from her2score.evaluate import LabelledItem, _find_reusable, _score_one

    img = tmp_path / "new" / "f.png"
    img.parent.mkdir()
    img.write_bytes(b"")  # an empty file: scoring it again raises
    item = LabelledItem(str(img), "1+", {})
    prev = tmp_path / "prev"

    def reusable_with(result, by_name=True):
        (prev / "f").mkdir(parents=True, exist_ok=True)
        (prev / "f" / "result.json").write_text(result.to_json())
        return _find_reusable(prev, by_name=by_name)

    moved = reusable_with(_result(tmp_path / "gone" / "f.png", "1+"))  # its image is no longer there: matched by name
    assert _score_one(item, config=ScoringConfig(), mpp=None, model=None, reusable=moved)[0].score == "1+"
    assert "name:f.png" not in reusable_with(_result(tmp_path / "gone" / "f.png", "1+"), by_name=False)  # only when asked
    other = tmp_path / "other" / "f.png"
    other.parent.mkdir()
    other.write_bytes(b"")
    stranger = reusable_with(_result(other, "3+"))  # another image that exists and shares the name: never taken
    assert "name:f.png" not in stranger
    with pytest.raises(Exception):
        _score_one(item, config=ScoringConfig(), mpp=None, model=None, reusable=stranger)
    for changed in (replace(_result(img, "1+"), config={**DEFAULT_CONFIG, "mpp": 1.0}),
                    replace(_result(img, "1+"), config={**DEFAULT_CONFIG, "thresholds": {**DEFAULT_CONFIG["thresholds"], "faint_od": 0.3}})):
        with pytest.raises(Exception):
            _score_one(item, config=ScoringConfig(), mpp=None, model=None, reusable=reusable_with(changed))
    for other in (replace(_result(img, "1+"), version="0.1.0"),  # another version of the tool
                  replace(_result(img, "1+"), region="annotation (f.geojson, 1 polygons)")):  # on an annotation
        with pytest.raises(Exception):
            _score_one(item, config=ScoringConfig(), mpp=None, model=None, reusable=reusable_with(other))
    retried = replace(_result(img, "1+"), config={**DEFAULT_CONFIG, "estimate_stains": True},
                      notes=("scored with the slide's own stain vectors: the default ones read it as nuclear DAB (...)",))
    assert _score_one(item, config=ScoringConfig(), mpp=None, model=None, reusable=reusable_with(retried))[1]  # default settings
    same = reusable_with(_result(img, "1+"))
    assert _score_one(item, config=ScoringConfig(), mpp=None, model=None, reusable=same)[0].score == "1+"
    with pytest.raises(Exception):  # scanned at another µm/px than the one given now
        _score_one(item, config=ScoringConfig(), mpp=0.25, model=None, reusable=same)


def test_a_result_is_reused_only_for_the_file_it_scored(tmp_path):
    """Another image copied over a labelled one with its old time kept (cp -p, rsync -a) was reused as the old
    image, by time: the old call stood for the new pixels. The result's slide_sample (the file's size and first
    and last 64 KiB, taken before it was read) must match as well as the time."""
    import os

    from her2score.evaluate import LabelledItem, _find_reusable, _score_one
    from her2score.files import content_sample

    img = tmp_path / "f.png"
    img.write_bytes(b"the scanned image")
    (tmp_path / "prev" / "f").mkdir(parents=True)
    (tmp_path / "prev" / "f" / "result.json").write_text(replace(_result(img, "1+"), slide_sample=content_sample(img)).to_json())
    item, reusable = LabelledItem(str(img), "1+", {}), _find_reusable(tmp_path / "prev")
    os.utime(img, ns=(1, 1))  # older than its result: the same file
    assert _score_one(item, config=ScoringConfig(), mpp=None, model=None, reusable=reusable)[1]
    img.write_bytes(b"another image, no slide")  # replaced, its old time kept: scored again (and it is none)
    os.utime(img, ns=(1, 1))
    with pytest.raises(Exception, match="f.png"):
        _score_one(item, config=ScoringConfig(), mpp=None, model=None, reusable=reusable)


def test_images_without_tumour_cells_are_said_to_be_left_out_of_accuracy(known):
    labels, prev, out = known
    f = next(prev.glob("*/result.json"))
    r = SlideResult.from_dict(json.loads(f.read_text()))
    f.write_text(replace(r, score=None, classical_score=None, level="not scored", classical_level="not scored",
                         tumour_cells=0, counts={c: 0 for c in r.counts}, h_score=None).to_json())
    m = evaluate(labels, out, reuse=prev, use_cnn=False, bootstrap=0)
    assert m["not_scored"] == 1 and m["methods"]["classical"]["n"] == m["n"] - 1
    assert "1 without tumour cells, no score: left out of the classical and fused accuracy" in m["summary"]


def test_the_truths_requirement_arithmetic_is_its_own_and_agrees_with_the_rules():
    """eligibility_truth checks [[require]] shares with evaluate's own table and arithmetic, so a fault in
    the package's Requirement would show in the figures; on random counts the two agree."""
    from her2score.eligibility import Requirement
    from her2score.evaluate import _requirement_holds

    rng = np.random.default_rng(5)
    for _ in range(500):
        counts = {c: int(v) for c, v in zip(CATEGORIES, rng.integers(0, 30, len(CATEGORIES)))}
        counts["none"] += 1
        for level in ("1+", "2+", "3+", "any"):
            for inclusive in (False, True):
                pct = float(rng.choice([0, 5, 10, 12.5, 30, 100 * counts["strong_complete"] / sum(counts.values())]))
                req = Requirement(level, pct, inclusive)
                for family, guideline in (("gastric", "gastric"), ("breast", "breast-asco-cap-2023")):
                    assert (_requirement_holds(level, pct, inclusive, counts, family)
                            == req.met(counts, guideline)[0]), (counts, level, pct, guideline)


def test_the_truth_reads_a_requirements_cells_as_the_guideline_evaluated_does():
    """Breast reads an intense lateral cell as the unusual 2+ pattern, not 3+; gastric counts it at 3+. A rule for any
    guideline takes the one evaluated, and cannot be read without one."""
    from her2score.eligibility import Requirement, Rule

    rule = Rule(name="r", version="1", guideline="any", eligible_levels=("2+", "3+"), require=(Requirement("3+", 50, True),))
    counts = {"none": 20, "strong_lateral": 60, "strong_complete": 20}  # 80% intense, 20% intense complete
    assert eligibility_truth("3+", rule, counts=counts, guideline="gastric") is True
    assert eligibility_truth("3+", rule, counts=counts, guideline="breast-asco-cap-2023") is False
    with pytest.raises(ValueError, match="give the guideline"):  # the two read it differently here
        eligibility_truth("3+", rule, counts=counts)
    assert eligibility_truth("3+", rule, counts={"none": 20, "strong_complete": 80}) is True  # alike


def test_results_that_may_name_another_image_or_scale_are_not_reused(tmp_path, monkeypatch):
    """A result naming its image by a relative path is no result of any image (relative to a folder this run
    cannot know); one scored at a µm/px the user gave is no result of the file's own µm/px; a damaged one, or
    one another version wrote without today's fields, is scored again rather than failing the image."""
    from her2score.evaluate import LabelledItem, _find_reusable, _score_one

    img = tmp_path / "f.png"
    img.write_bytes(b"")  # an empty file: scoring it again raises
    item = LabelledItem(str(img), "1+", {})
    prev = tmp_path / "prev" / "f"
    prev.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    def reused(text: str) -> bool:
        (prev / "result.json").write_text(text)
        try:
            return bool(_score_one(item, config=ScoringConfig(), mpp=None, model=None, reusable=_find_reusable(prev.parent))[1])
        except Exception:  # scored again: the empty file raises
            return False

    assert reused(_result(img, "1+").to_json())  # the control: the same image, settings and scale
    assert not reused(_result("f.png", "1+").to_json())  # relative: here it would name this f.png
    assert "name:f.png" not in _find_reusable(prev.parent)
    assert not reused(replace(_result(img, "1+"), mpp=0.42, mpp_origin="user").to_json())
    assert not reused(replace(_result(img, "1+"), mpp_origin="user").to_json())  # the user's 0.5 is not the file's own
    # a default µm/px given to 'score' (--default-mpp) is no more the file's own than one given outright
    assert not reused(replace(_result(img, "1+"), mpp_origin="default").to_json())
    from her2score.evaluate import _same_mpp

    by_default = replace(_result(img, "1+"), mpp=0.5, mpp_origin="default")
    assert not _same_mpp(by_default, None) and _same_mpp(by_default, None, 0.5) and not _same_mpp(by_default, None, 0.45)
    old = json.loads(_result(img, "1+").to_json())
    del old["tissue_area_mm2"]
    assert not reused(json.dumps(old)) and not reused("{not json")


def test_an_ish_column_is_read_as_check_eligibility_reads_ish(tmp_path):
    """The ish column takes what the API's ish= and 'check --ish' take (eligibility.ish_result: any case, empty for
    none); anything else is named with its file, line and the accepted values."""
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,ish\na.png,2+,Negative\nb.png,2+,\nc.png,2+,POSITIVE\n")
    assert [i.ish for i in read_labels(labels)] == ["negative", None, "positive"]
    labels.write_text("path,label,ish\na.png,2+,negative\nb.png,2+,equivocal\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(labels))}, line 3: ish must be one of \['positive', 'negative'\] "
                                         r"\(any case\), got 'equivocal'$"):
        read_labels(labels)


def test_labels_files_are_read_in_any_column_case_and_unreadable_ones_are_named(tmp_path):
    from her2score.evaluate import read_labels

    (tmp_path / "a.png").write_bytes(b"")
    good = tmp_path / "labels.csv"
    good.write_text("Path,LABEL,ISH,Eligible_her2-positive-breast,eligible_MyTrial\na.png,2+,positive,yes,no\n")
    [item] = read_labels(good)
    assert (item.ish, item.eligible) == ("positive", {"her2-positive-breast": True, "MyTrial": False})  # rule names as written
    assert Path(item.path).is_absolute() and Path(item.path) == tmp_path / "a.png"
    utf16 = tmp_path / "utf16.csv"
    utf16.write_text("path,label\na.png,2+\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"utf16\.csv: not UTF-8 text"):
        read_labels(utf16)
    long = tmp_path / "long.csv"
    long.write_text('path,label\n"' + "x" * 200_000 + '",2+\n')
    with pytest.raises(ValueError, match=r"long\.csv: not a readable CSV"):
        read_labels(long)
    twice = tmp_path / "twice.csv"
    twice.write_text("path,label,Label\na.png,2+,2+\n")
    with pytest.raises(ValueError, match="more than once"):
        read_labels(twice)
    for sep in (";", "\t"):  # a spreadsheet's export where the comma is the decimal mark, tab-separated text
        other = tmp_path / "other.csv"
        other.write_bytes(f"\ufeffPath{sep}Label{sep}count_none\r\na.png{sep}1+{sep}90\r\n".encode())
        [item] = read_labels(other)
        assert (item.label, item.counts["none"]) == ("1+", 90) and Path(item.path) == tmp_path / "a.png"
    excel = tmp_path / "excel.csv"  # Excel's first line naming the separator
    excel.write_text("sep=;\npath;label\na.png;1+\na.png;2+\n")
    with pytest.raises(ValueError, match=r"excel\.csv, line 4: "):  # the file's own line numbers, its first line counted
        read_labels(excel)
    for first in ("sep=;", "SEP=;", '"sep=;"', "sep=;;", "sep=; "):  # as a tool that ignores the line may re-save it
        excel.write_text(f"{first}\npath;label\na.png;1+\n")
        assert [i.label for i in read_labels(excel)] == ["1+"], first
    for header in (b"path,label", b"path;label"):  # a sep= line naming none: the header's own separator
        excel.write_bytes(b"sep=\r\n" + header + b"\r\n" + header.replace(b"path", b"a.png").replace(b"label", b"1+") + b"\r\n")
        assert [i.label for i in read_labels(excel)] == ["1+"], header
    neither = tmp_path / "neither.csv"
    neither.write_text("file|score\na.png|2+\n")
    with pytest.raises(ValueError, match=r"needs a header with columns 'path' and 'label' \(separated by commas, semicolons "
                                         r"or tabs\), found \['file\|score'\]"):
        read_labels(neither)


def test_limits_of_agreement_of_one_image_are_not_given():
    from her2score.evaluate import percent_agreement

    one = percent_agreement([({"none": 60.0}, {"none": 55.0})], categories=["none"])["none"]
    assert one["n"] == 1 and one["bias"] == pytest.approx(5.0) and one["sd"] is one["loa_low"] is one["loa_high"] is None
    two = percent_agreement([({"none": 60.0}, {"none": 55.0}), ({"none": 50.0}, {"none": 51.0})], categories=["none"])["none"]
    assert two["sd"] == pytest.approx(np.std([5.0, -1.0], ddof=1))


def test_a_refused_evaluation_leaves_no_output_folder(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.png,1+\n")
    with pytest.raises(ValueError):
        evaluate(labels, tmp_path / "out", use_cnn=False, specimen="biopsy")  # no biopsy rule under breast
    with pytest.raises(ValueError):
        evaluate(labels, tmp_path / "out", use_cnn=False, rules=["no-such-rule"])
    with pytest.raises(ValueError, match=r"rules named \['level'\] would overwrite per_image.csv's columns"):
        evaluate(labels, tmp_path / "out", use_cnn=False, rules=[Rule(name="level", version="1", eligible_levels=("1+",))])
    assert not (tmp_path / "out").exists()


def test_held_out_fields_drawn_from_the_cnns_training_seeds_are_counted(tmp_path):
    """synth and train draw fields from SeedSequence(seed): with one seed for both, evaluation would run on the
    CNN's training fields, those drawn with the same seed and score. The count comes from the generator's
    truth.jsonl and the weights record."""
    from her2score.evaluate import _training_field_seeds

    ds = write_dataset(tmp_path / "ds", n_per_class=2, seed=5, size_px=(96, 96))
    images = [str(p) for p in sorted((ds / "images").glob("*.png"))]

    def record(data: str) -> WeightsRecord:
        return WeightsRecord(file="x.pt", sha256="", training={"data": data})

    same = record("8 synthetic fields (her2score.synthetic, 512x512 px at 0.5 µm/px, SeedSequence(5), stain_jitter 0)")
    assert _training_field_seeds(same, ds / "labels.csv", images) == 8
    assert _training_field_seeds(same, ds / "labels.csv", images[:3]) == 3
    other = record("8 synthetic fields (her2score.synthetic, 512x512 px at 0.5 µm/px, SeedSequence(6), stain_jitter 0)")
    assert _training_field_seeds(other, ds / "labels.csv", images) == 0
    # 600 training fields, 150 a class: the seeds of synth's 1+, 2+ and 3+ fields drew training 0 fields, other images
    shipped_like = record("600 synthetic fields (her2score.synthetic, 512x512 px at 0.5 µm/px, SeedSequence(5), stain_jitter 0)")
    assert _training_field_seeds(shipped_like, ds / "labels.csv", images) == 2
    assert _training_field_seeds(record("class folders under x"), ds / "labels.csv", images) == 0


def test_images_a_cnn_was_trained_on_from_files_are_counted(tmp_path):
    """A CNN trained with --csv or --folder records its images' content (files.content_sample): evaluating on
    the same files, wherever they now lie, is counted and warned of (a data scientist's review: no warning)."""
    from her2score.evaluate import _training_images
    from her2score.files import content_sample

    ds = write_dataset(tmp_path / "ds", n_per_class=1, seed=5, size_px=(96, 96))
    images = [str(p) for p in sorted((ds / "images").glob("*.png"))]
    moved = tmp_path / "moved.png"
    moved.write_bytes(Path(images[0]).read_bytes())
    record = WeightsRecord(file="x.pt", sha256="", training={"data": "labelled images listed in x.csv",
                                                               "image_samples": sorted(content_sample(p) for p in images[:2])})
    assert _training_images(record, images) == 2 and _training_images(record, [str(moved), images[3]]) == 1
    assert _training_images(WeightsRecord(file="x.pt", sha256="", training={"data": "600 synthetic fields"}), images) == 0


def test_a_kappa_interval_that_collapses_to_a_point_is_flagged_whatever_n():
    """40 images all called right: every bootstrap resample gives kappa 1, an interval [1, 1] that bounds nothing."""
    from her2score.evaluate import _kappa_text, _method_metrics

    truth = [s for s in ("0", "1+", "2+", "3+") for _ in range(10)]
    m = _method_metrics(truth, list(truth), [None] * 40, [None] * 40, resamples=200, seed=0, split_zero=False)
    assert m["quadratic_weighted_kappa_ci95"] == [1.0, 1.0]
    assert m["kappa_interval_reliable"] is False and m["kappa_interval_note"].startswith("a point")
    one_class = _method_metrics(["3+"] * 40, ["3+"] * 40, [None] * 40, [None] * 40, resamples=200, seed=0, split_zero=False)
    assert one_class["kappa_interval_reliable"] is False and one_class["quadratic_weighted_kappa"] is None
    assert _kappa_text(one_class) == "n/a (kappa is undefined: every label is one class)"  # not "unreliable: n < 30"
    few = _method_metrics(["3+"] * 5, ["3+"] * 5, [None] * 5, [None] * 5, resamples=200, seed=0, split_zero=False)
    assert _kappa_text(few) == "n/a (kappa is undefined: every label is one class)"
    called = list(truth)
    called[0], called[15] = "1+", "2+"  # two errors: the resamples differ
    m = _method_metrics(truth, called, [None] * 40, [None] * 40, resamples=200, seed=0, split_zero=False)
    assert m["kappa_interval_reliable"] is True and m["kappa_interval_note"] is None


def test_another_sets_field_of_the_same_name_is_never_reused_and_a_moved_one_only_when_asked(tmp_path):
    """synth names every set's fields alike: set B evaluated with --reuse of set A's results (A's folder since
    moved) took A's results for B's images, silently, and later with reuse_by_name, warned of. A result names the
    file it scored (slide_sample): B's images are scored; A's own, moved, are reused by name when asked, and warned of."""
    a = write_dataset(tmp_path / "a", n_per_class=1, seed=31, size_px=(160, 160))
    b = write_dataset(tmp_path / "b", n_per_class=1, seed=32, size_px=(160, 160))  # written before A's results
    evaluate(a / "labels.csv", tmp_path / "ev_a", use_cnn=False, bootstrap=0)
    a.rename(tmp_path / "a_moved")
    for asked, out in ((False, "ev_b"), (True, "ev_b2")):
        evaluate(b / "labels.csv", tmp_path / out, reuse=tmp_path / "ev_a", use_cnn=False, bootstrap=0, reuse_by_name=asked)
        assert all(r["reused"] == "False" for r in csv.DictReader(open(tmp_path / out / "per_image.csv")))
    plain = evaluate(tmp_path / "a_moved" / "labels.csv", tmp_path / "ev_a2", reuse=tmp_path / "ev_a", use_cnn=False, bootstrap=0)
    assert plain["reused"] == 0
    named = evaluate(tmp_path / "a_moved" / "labels.csv", tmp_path / "ev_a3", reuse=tmp_path / "ev_a", use_cnn=False,
                     bootstrap=0, reuse_by_name=True)
    assert named["reused"] == 4
    assert any(w.startswith("4 of the 4 images took a result matched by file name alone") for w in named["warnings"])
    assert "file name alone" in (tmp_path / "ev_a3" / "report.md").read_text()


def test_a_run_where_no_image_scores_reports_that_plainly(tmp_path):
    (tmp_path / "l.csv").write_text("path,label\nmissing1.png,0\nmissing2.png,1+\n")
    m = evaluate(tmp_path / "l.csv", tmp_path / "out", use_cnn=False, bootstrap=0)
    assert (m["n"], m["errors"], m["methods"]) == (0, 2, {})
    report = (tmp_path / "out" / "report.md").read_text()
    assert "No image was scored" in report and "| class |" not in report


def test_a_rule_that_decides_nothing_shows_it_in_its_review_rates():
    """Specificity counts a review as not called eligible, so a tool that sends everything to review read 1.000
    specific beside a review rate over the images of known truth only; the review rate of each truth class, the wrong
    calls and the rate over every image scored (truth known or not) show what it decided."""
    truth = [True] * 5 + [False] * 15 + [None] * 4  # 4 images whose truth the labels leave undetermined
    m = _rule_metrics(truth, ["needs_review"] * 20 + ["eligible"] * 2 + [None] * 2)  # 2 of them not scored
    assert (m["n"], m["n_undetermined"], m["sensitivity"], m["specificity"]) == (20, 2, 0.0, 1.0)
    assert (m["review_rate_eligible"], m["review_rate_ineligible"], m["wrong_calls"]) == (1.0, 1.0, 0)
    assert m["needs_review_rate"] == pytest.approx(20 / 22)
    decided = _rule_metrics([True, True, False, False], ["eligible", "not_eligible", "eligible", "not_eligible"])
    assert (decided["sensitivity"], decided["specificity"], decided["wrong_calls"], decided["needs_review_rate"]) == (0.5, 0.5, 2, 0.0)


def test_percentage_agreement_counts_the_images_with_cells_of_each_category():
    pairs = [({"none": 90.0, "faint_partial": 10.0}, {"none": 80.0, "faint_partial": 20.0}),
             ({"none": 100.0}, {"none": 100.0}), ({"none": 100.0}, {"none": 100.0})]
    pa = percent_agreement(pairs)
    assert (pa["faint_partial"]["n"], pa["faint_partial"]["n_present"], pa["strong_complete"]["n_present"]) == (3, 1, 0)
    assert pa["faint_partial"]["mae"] == pytest.approx(10 / 3)  # over every image: the two at 0 agree


def test_a_kappa_interval_says_how_many_resamples_gave_one():
    from her2score.evaluate import _kappa_text, _method_metrics

    labels = ["0", "0", "0", "3+"]
    m = _method_metrics(labels, labels, [None] * 4, [None] * 4, resamples=1000, seed=0, split_zero=False)
    assert 0 < m["kappa_resamples_kept"] < 1000  # a resample of only 0s gives no kappa
    assert f"(interval of the {m['kappa_resamples_kept']} of 1000 resamples that give a kappa" in _kappa_text(m)
    none_drawn = _method_metrics(["0", "1+", "3+"], ["0", "1+", "2+"], [None] * 3, [None] * 3, resamples=0, seed=0, split_zero=False)
    assert _kappa_text(none_drawn).endswith("(interval unreliable: not drawn (no resamples))")  # it read "n < 30"
