import csv
import json
import math

import numpy as np
import pytest

from her2score.cli import main
from her2score.eligibility import load_rule
from her2score.evaluate import (
    accuracy,
    binary_rates,
    bootstrap_ci,
    confusion_matrix,
    eligibility_truth,
    evaluate,
    per_class,
    quadratic_weighted_kappa,
    read_labels,
)
from her2score.results import CnnReport, SlideResult
from her2score.synthetic import write_dataset

LABELS = ["0", "0", "1+", "1+", "2+", "2+", "3+", "3+"]
CLASSICAL = ["0", "1+", "1+", "1+", "2+", "3+", "3+", "3+"]
CNN = ["0", "0", "1+", "0", "2+", "2+", "3+", "2+"]
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
    assert math.isnan(quadratic_weighted_kappa(np.zeros((4, 4))))
    # every call one step high: kappa well below 1 but positive
    up = confusion_matrix(["0", "1+", "2+"], ["1+", "2+", "3+"])
    # rows 1,1,1,0; cols 0,1,1,1; observed 3 * 1/9; expected (1/3) * sum over i<3, j>0 of (i-j)^2/9 = (1/3)(1+0+1 + 4+1+0 + 9+4+1)/9 = 7/9
    assert quadratic_weighted_kappa(up) == pytest.approx(1 - (3 / 9) / (7 / 9))


def test_per_class_precision_recall_by_hand():
    pc = per_class(confusion_matrix(LABELS, CLASSICAL))
    assert pc["0"] == {"precision": 1.0, "recall": 0.5, "n_true": 2, "n_called": 1}
    assert pc["1+"]["precision"] == pytest.approx(2 / 3) and pc["1+"]["recall"] == 1.0
    assert pc["2+"] == {"precision": 1.0, "recall": 0.5, "n_true": 2, "n_called": 1}
    assert pc["3+"]["precision"] == pytest.approx(2 / 3) and pc["3+"]["recall"] == 1.0
    none = per_class(confusion_matrix(["0"], ["1+"]))
    assert none["2+"]["precision"] is None and none["2+"]["recall"] is None


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


def test_eligibility_truth_from_labels():
    g = "breast-asco-cap-2023"
    low = load_rule("her2-low-breast")
    assert [eligibility_truth(x, low, guideline=g) for x in ("0", "1+", "2+", "3+")] == [False, True, None, False]
    assert eligibility_truth("2+", low, guideline=g, ish="negative") is True
    ultra = load_rule("her2-ultralow-breast")
    assert eligibility_truth("0", ultra, guideline=g) is None  # null or ultralow: the label cannot say
    cart = load_rule("car-t-her2")
    assert [eligibility_truth(x, cart, guideline=g) for x in ("1+", "3+")] == [False, None]  # >50% requirement


# --------------------------------------------------------------------------- evaluate with known answers

def _result(path, classical, cnn=None, fused=None):
    report = None
    if cnn:
        report = CnnReport(cnn, {c: (0.7 if c == cnn else 0.1) for c in ("0", "1+", "2+", "3+")}, 1, "test-model")
    level = {"0": "0 (null)"}.get(classical, classical)
    return SlideResult(
        slide=str(path), score=fused or classical, level=level, flags=(), guideline="breast-asco-cap-2023",
        specimen="resection", reason="test", counts={"none": 300, "faint_partial": 0}, percentages={},
        tumour_cells=300, h_score=0.0, clusters={}, region="cells", qc=(), stains={}, mpp=0.5,
        tissue_area_mm2=0.05, classical_score=classical, cnn=report, confidence=0.9 if cnn else None)


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


def test_evaluate_known_answers(known):
    labels, prev, out = known
    m = evaluate(labels, out, reuse=prev, use_cnn=False, bootstrap=200, seed=0)
    assert m["n"] == 8 and m["errors"] == 0 and set(m["methods"]) == {"classical", "cnn", "fused"}
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

    # t-dxd (3+ only): truth eligible = images 6, 7; classical calls 3+ on 5, 6, 7
    e = cl["eligibility"]["t-dxd-tumour-agnostic"]
    assert e["n"] == 8 and e["sensitivity"] == 1.0 and e["specificity"] == pytest.approx(5 / 6)
    # her2-low: 2+ images undetermined without ISH; image 1 (0 called 1+) is the false positive
    e = cl["eligibility"]["her2-low-breast"]
    assert e["n"] == 6 and e["n_undetermined"] == 2
    assert e["sensitivity"] == 1.0 and e["specificity"] == pytest.approx(3 / 4)
    # her2-positive: image 4 eligible from its column; 2+ (needs ISH) is not a positive call
    e = cl["eligibility"]["her2-positive-breast"]
    assert e["n"] == 7 and e["n_truly_eligible"] == 3
    assert e["sensitivity"] == pytest.approx(2 / 3) and e["needs_review_rate"] == pytest.approx(1 / 7)
    # the fused method carries the CNN, so classical/CNN disagreement gives needs_review
    assert fu["eligibility"]["t-dxd-tumour-agnostic"]["needs_review_rate"] == pytest.approx(4 / 8)  # 4 disagreements
    assert "skipped" in cl["eligibility"]["gastric-toga"]

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["methods"]["classical"]["confusion"]["matrix"] == confusion_matrix(LABELS, CLASSICAL).tolist()
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 8 and [r["classical"] for r in rows] == CLASSICAL and rows[0]["reused"] == "True"
    assert rows[4]["truth_her2-positive-breast"] == "eligible"
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "quadratic-weighted kappa" in report and "| fused |" in report
    assert (out / "results" / "img__f0.png" / "result.json").exists()


def test_plain_eligible_column_needs_a_rule(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("path,label,eligible\na.png,3+,yes\n")
    with pytest.raises(ValueError, match="--eligible-rule"):
        read_labels(p)
    items = read_labels(p, eligible_rule="her2-positive-breast")
    assert items[0].eligible == {"her2-positive-breast": True}
    p.write_text("path,label,eligible_x\na.png,3+,maybe\n")
    with pytest.raises(ValueError, match="maybe"):
        read_labels(p)


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
    # a second run reuses the first run's results
    m2 = evaluate(ds / "labels.csv", tmp_path / "ev2", reuse=out / "results", use_cnn=False, bootstrap=50)
    assert m2["methods"]["classical"]["confusion"] == m["methods"]["classical"]["confusion"]
    rows2 = list(csv.DictReader(open(tmp_path / "ev2" / "per_image.csv")))
    assert all(r["reused"] == "True" for r in rows2[:4])


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
    rows = list(csv.DictReader(open(tmp_path / "ev" / "per_image.csv")))
    assert all(r["cnn"] in ("0", "1+", "2+", "3+") and float(r["p_0"]) >= 0 for r in rows)
    assert m["cnn_source"] == {"pipeline": 4} and m2["cnn_source"] == {"pipeline": 4}
    rows2 = list(csv.DictReader(open(tmp_path / "ev2" / "per_image.csv")))
    for a, b in zip(rows, rows2):
        assert b["reused"] == "False" and b["cnn"] == a["cnn"]
        assert float(b["p_0"]) == pytest.approx(float(a["p_0"]), abs=1e-5)
    res = SlideResult.from_dict(json.loads(next((tmp_path / "ev" / "results").rglob("result.json")).read_text()))
    assert res.cnn is not None and res.cnn.model.startswith("m.pt@") and 0 <= res.confidence <= 1
