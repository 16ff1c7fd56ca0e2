"""The README's main job, as a new user runs it: her2score score sample_images --out results."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from her2score.cli import main

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert main(["score", str(SAMPLES), "--out", str(out), "-q", "--no-cnn"]) == 0
    return out


def test_samples_score_as_their_truth(scored):
    truth = json.loads((SAMPLES / "truth.json").read_text())
    rows = list(csv.DictReader((scored / "summary.csv").open()))
    assert len(rows) == len(truth) == 9
    for row in rows:
        t = truth[Path(row["slide"]).name]
        assert row["status"] == "ok", row["error"]
        assert row["score"] == t["score"], row
        if t.get("variant") in ("null", "ultralow"):
            assert row["level"] == {"null": "0 (null)", "ultralow": "0+ (ultralow)"}[t["variant"]]


def test_per_slide_outputs(scored):
    for name in ("field_3plus_a.png", "slide_2plus.tif"):
        d = scored / name
        result = json.loads((d / "result.json").read_text())
        assert result["score"] in ("2+", "3+") and result["qc_passed"] is True
        cells = list(csv.DictReader((d / "cells.csv").open()))
        assert sum(int(c["tumour"]) for c in cells) == result["tumour_cells"]
        geo = json.loads((d / "cells.geojson").read_text())
        assert len(geo["features"]) == len(cells)
        f = geo["features"][0]
        assert f["geometry"]["type"] == "Polygon" and f["properties"]["objectType"] == "detection"
        assert "name" in f["properties"]["classification"]
        assert (d / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_check_and_rules_commands(scored, capsys):
    result = scored / "field_2plus_a.png" / "result.json"
    assert main(["check", str(result), "--rule", "her2-low-breast", "--rule", "her2-positive-breast"]) == 0
    out = capsys.readouterr().out
    assert "her2-low-breast" in out and "needs_review" in out and "ISH" in out
    assert main(["check", str(result), "--rule", "her2-low-breast", "--ish", "negative"]) == 0
    assert "eligible" in capsys.readouterr().out
    assert main(["rules"]) == 0
    listed = capsys.readouterr().out
    for name in ("her2-positive-breast", "her2-low-breast", "her2-ultralow-breast", "gastric-toga", "car-t-her2"):
        assert name in listed


def test_missing_input_is_reported_and_exit_code_nonzero(tmp_path, capsys):
    code = main(["score", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "-q", "--no-cnn"])
    assert code == 1
    rows = list(csv.DictReader((tmp_path / "o" / "summary.csv").open()))
    assert rows[0]["status"] == "error" and "no such file" in rows[0]["error"]


@pytest.mark.parametrize("inputs", [["field_3plus_a.png", "slide_2plus.tif"], ["slide_2plus.tif"]])
def test_default_run_with_the_cnn_in_worker_processes(tmp_path, inputs):
    """The CLI loads the CNN before forking slide (or tile) workers: they must not hang on torch's
    inherited thread pool, and every result carries the CNN's view."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "her2score.cli", "score", *[str(SAMPLES / i) for i in inputs],
           "--out", str(out), "--workers", "2", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in inputs:
        result = json.loads((out / name / "result.json").read_text())
        assert result["cnn"]["tiles"] >= 1 and result["confidence"] is not None
