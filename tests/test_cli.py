"""The command line as a new user meets it: the README's main job (her2score score sample_images --out
results), arguments checked before any work, inputs that are not HER2 IHC refused in summary.csv,
a failed QC shown beside the score, 'check' exit codes and errors, and batch bookkeeping across runs."""
import csv
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from conftest import save_png
from realdata import REAL
from test_imagecheck import NOT_TISSUE, photo
from her2score import __version__
from her2score.batch import LOCK
from her2score.cli import build_parser, main
from her2score.synthetic import generate_field
from her2score.categories import CATEGORIES

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        return {Path(r["slide"]).name: r for r in csv.DictReader(f)}


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


def test_summary_carries_both_scores_confidence_flags_and_qc(scored):
    for row in summary(scored).values():
        assert row["qc_status"] in ("passed", "needs_review", "qc_failed", "not_scored")
        assert row["classical_score"] == row["score"]  # --no-cnn: the classical score is the score
        assert row["cnn_score"] == "" and row["confidence"] == ""
        assert row["qc_passed"] == str(row["qc_status"] != "qc_failed")
        assert {"flags", "qc", "specimen"} <= set(row)


def test_per_slide_outputs(scored):
    for name in ("field_3plus_a.png", "slide_2plus.tif"):
        d = scored / name
        result = json.loads((d / "result.json").read_text())
        assert result["score"] in ("2+", "3+") and result["qc_passed"] is True


def test_cells_csv_on_request(tmp_path):
    out = tmp_path / "out"
    assert main(["score", str(SAMPLES / "field_0_null.png"), "--out", str(out), "-q", "--no-cnn", "--cells-csv"]) == 0
    rows = list(csv.DictReader((out / "field_0_null.png" / "cells.csv").open(encoding="utf-8")))
    assert len(rows) == int(summary(out)["field_0_null.png"]["tumour_cells"]) + sum(r["tumour"] == "false" for r in rows)
    # flags as words pandas and polars read as booleans, as the parquet holds them (1/0 read as integers: d[d.tumour] failed)
    assert {r["tumour"] for r in rows} == {"true", "false"} and {r["neighbours_membrane"] for r in rows} <= {"true", "false"}


def test_the_progress_bar_counts_time_from_the_batch_start(tmp_path, capsys, monkeypatch):
    """On a terminal, the bar appears with the first finished slide, but its clock and rate start with the
    batch: a field is never shown scored at thousands of slides a second (no field scores in under 10 ms)."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    fields = [str(SAMPLES / n) for n in ("field_1plus_a.png", "field_2plus_a.png")]
    assert main(["score", *fields, "--out", str(tmp_path / "out"), "--no-cnn", "--workers", "1"]) == 0
    err = capsys.readouterr().err  # tqdm shows "N slide/s", or "N s/slide" when slower than one a second
    rates = [float(r) for r in re.findall(r"([0-9.]+)slide/s", err)] + [1 / float(s) for s in re.findall(r"([0-9.]+)s/slide", err)]
    assert rates and max(rates) < 100, err


def test_progress_in_a_log_file_is_one_line_a_slide(tmp_path):
    """Off a terminal (nohup, cron, a cluster job's log), each finished slide is one plain line with the
    count, its score or error, and the time taken and left; no carriage returns; -q keeps the errors only."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("field_1plus_a.png", "field_2plus_a.png"):
        shutil.copy(SAMPLES / name, folder / name)
    (folder / "broken.png").write_bytes(b"")
    cmd = [sys.executable, "-m", "her2score.cli", "score", str(folder), "--out", str(tmp_path / "out"), "--no-cnn", "--workers", "1"]
    err = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stderr
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 3, err
    assert lines[0] == f"[1/3] broken.png: error ({folder / 'broken.png'}: empty file (0 bytes)); " + lines[0].split("; ")[-1]
    assert re.fullmatch(r"\[2/3\] field_1plus_a\.png: 1\+; 0:\d\d elapsed, 0:\d\d left", lines[1]), lines[1]
    assert re.fullmatch(r"\[3/3\] field_2plus_a\.png: 2\+; 0:\d\d elapsed, 0:00 left", lines[2]), lines[2]
    cmd[cmd.index("--out") + 1] = str(tmp_path / "quiet")
    quiet = subprocess.run([*cmd, "-q"], capture_output=True, text=True, timeout=300).stderr.splitlines()
    assert len(quiet) == 1 and quiet[0].startswith("[1/3] broken.png: error"), quiet


def test_a_log_line_stays_one_line_whatever_the_error(capsys):
    from her2score.cli import _Progress

    row = {"slide": "/s/b.svs", "status": "error", "error": "/s/b.svs: bad\nsecond line\n", "score": None, "qc_status": ""}
    _Progress(quiet=True)(row, 1, 2)
    err = capsys.readouterr().err
    assert err.startswith("[1/2] b.svs: error (/s/b.svs: bad second line); 0:00 elapsed, ") and err.count("\n") == 1, err
    _Progress(quiet=True)({**row, "slide": "/s/b\nc.svs"}, 1, 2)  # whatever the file's name
    err = capsys.readouterr().err
    assert err.startswith("[1/2] b\\nc.svs: error") and err.count("\n") == 1, err


def test_log_lines_name_slides_of_one_name_by_their_folders(tmp_path, capsys):
    """Two inputs holding dup.png each: the log read '[1/2] dup.png: 3+' and '[2/2] dup.png: 0'."""
    for sub, name in (("sub1", "field_3plus_a.png"), ("sub2", "field_0_null.png")):
        (tmp_path / sub).mkdir()
        shutil.copy(SAMPLES / name, tmp_path / sub / "dup.png")
    assert main(["score", str(tmp_path / "sub1"), str(tmp_path / "sub2"), "--out", str(tmp_path / "out"), "--no-cnn",
                 "--workers", "1"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert sorted(line.split("] ")[1].split(": ")[0] for line in lines) == ["sub1/dup.png", "sub2/dup.png"], lines


def test_a_slide_that_cannot_be_read_or_fits_no_memory_says_so_in_words(tmp_path, good_png, monkeypatch):
    """An unreadable file gave the raw '[Errno 13] Permission denied: PATH' (its first 64 KiB are read before it is
    opened, for the manifest), a MemoryError 'PATH: MemoryError: '. (Root reads any file: the refusal is raised.)"""
    from her2score import pipeline
    from her2score.batch import run_batch

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(pipeline, "content_sample", denied)
    row = run_batch([good_png], tmp_path / "out")[0]
    assert row["error"] == f"{good_png}: cannot read file (Permission denied)", row["error"]

    def full(*a, **k):
        raise MemoryError
    monkeypatch.setattr(pipeline, "content_sample", full)
    row = run_batch([good_png], tmp_path / "out")[0]
    assert row["error"] == (f"{good_png}: ran out of memory while scoring it (MemoryError): score it alone with --workers 1, "
                            "or on a machine with more memory"), row["error"]
    import cv2

    def opencv_full(*a, **k):  # OpenCV's own allocation failure, as a large image's may raise it
        raise cv2.error("OpenCV(5.1.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate 4 bytes")
    monkeypatch.setattr(pipeline, "content_sample", opencv_full)
    row = run_batch([good_png], tmp_path / "out")[0]
    assert row["error"] == (f"{good_png}: ran out of memory while scoring it (OpenCV): score it alone with --workers 1, "
                            "or on a machine with more memory"), row["error"]


def test_guideline_settings_from_the_command_line(tmp_path, capsys):
    """The gastric reading and the isolated-intense floor (ScoringConfig) are set from the command line too;
    the floor's default is the guideline module's."""
    from her2score.cli import build_parser
    from her2score.guidelines import ISOLATED_INTENSE_PERCENT

    args = build_parser().parse_args(["score", "x", "--out", "y"])
    assert (args.isolated_floor, args.gastric_reading) == (ISOLATED_INTENSE_PERCENT, "cumulative")
    out = tmp_path / "out"
    assert main(["score", str(SAMPLES / "field_2plus_a.png"), "--out", str(out / "bad"), "--isolated-floor", "11"]) == 2
    assert "--isolated-floor 11: must be within 0-10" in capsys.readouterr().err and not (out / "bad").exists()
    assert main(["score", str(SAMPLES / "field_2plus_a.png"), "--out", str(out / "g"), "-q", "--no-cnn", "--guideline", "gastric",
                 "--gastric-reading", "per_band"]) == 0
    assert json.loads((out / "g" / "field_2plus_a.png" / "result.json").read_text())["config"]["gastric_reading"] == "per_band"
    assert main(["score", str(SAMPLES / "field_2plus_a.png"), "--out", str(out / "b"), "-q", "--no-cnn", "--isolated-floor", "0"]) == 0
    assert json.loads((out / "b" / "field_2plus_a.png" / "result.json").read_text())["config"]["isolated_intense_percent"] == 0.0
    # a setting the guideline has no use for is refused, not written into result.json without effect
    for bad in (["--gastric-reading", "per_band"], ["--guideline", "gastric", "--isolated-floor", "0"]):
        assert main(["score", str(SAMPLES / "field_2plus_a.png"), "--out", str(out / "bad"), *bad]) == 2
        assert f"{bad[-2]} {bad[-1]}: " in capsys.readouterr().err and not (out / "bad").exists()


def test_quiet_shows_progress_only_for_the_slides_that_fail(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    shutil.copy(SAMPLES / "field_1plus_a.png", tmp_path / "in")
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    assert main(["score", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "-q", "--no-cnn"]) == 1
    captured = capsys.readouterr()
    progress = captured.err.splitlines()
    assert len(progress) == 1 and "broken.png: error" in progress[0], progress
    listed = captured.out.splitlines()  # the results: every slide of the run
    assert listed[0].startswith("1 scored, 0 reused, 1 failed; ") and len(listed) == 3, listed  # an error: not refused


def test_score_runs_from_a_thread_other_than_the_main_one(tmp_path):
    """Only the main thread may set signal handlers: from another thread, 'score' runs without its SIGTERM one."""
    codes = []
    t = threading.Thread(target=lambda: codes.append(main(["score", str(SAMPLES / "field_1plus_a.png"), "--out",
                                                           str(tmp_path / "out"), "-q", "--no-cnn"])))
    t.start()
    t.join(120)
    assert codes == [0] and (tmp_path / "out" / "field_1plus_a.png" / "result.json").is_file()


def test_gastric_biopsy_is_scored(tmp_path):
    out = tmp_path / "out"
    argv = ["score", str(SAMPLES / "field_3plus_a.png"), "--out", str(out), "-q", "--no-cnn", "--guideline", "gastric",
            "--specimen", "biopsy"]
    assert main(argv) == 0
    result = json.loads((out / "field_3plus_a.png" / "result.json").read_text())
    assert (result["guideline"], result["specimen"], result["score"]) == ("gastric", "biopsy", "3+")


def test_version_imports_nothing_heavy():
    code = ("import sys\nfrom her2score.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('numpy', 'cv2', 'scipy', 'torch', 'onnxruntime') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == [f"her2score {__version__}", "[]"], done.stderr


def test_every_public_name_is_found_where_the_package_says():
    """Each of her2score's lazily imported names resolves (the refusals are caught as themselves, not only as SlideError)."""
    import her2score

    for name in her2score.__all__:
        assert getattr(her2score, name) is not None, name
    assert issubclass(her2score.NoTissueError, her2score.SlideError) and issubclass(her2score.NotHerIhcError, her2score.SlideError)


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "her2score", "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, f"her2score {__version__}"), done.stderr
    done = subprocess.run([sys.executable, "-m", "her2score", "score"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: her2score score" in done.stderr  # the same parser, named as the script is


def test_tiles_are_scored_without_scipy():
    """What a batch imports before its first tile, and what the tile itself needs, leave out scipy
    (half a second of imports): only the slide's last step (tumour cell neighbours, clusters) uses it."""
    code = ("import sys\nimport numpy as np\nimport her2score.batch, her2score.cli\n"
            "from her2score.pipeline import ScoringConfig, score_tile\nfrom her2score.stain import H_DAB\n"
            "from her2score.tissue import Tile\nfrom PIL import Image\n"
            f"rgb = np.asarray(Image.open({str(SAMPLES / 'field_2plus_a.png')!r}).convert('RGB'))\n"
            "h, w = rgb.shape[:2]\n"
            "r = score_tile(rgb, Tile(0, 0, (0, 0, w, h), 0), stains=H_DAB, config=ScoringConfig(), scale=1.0)\n"
            "print(len(r.cells) > 50, sorted({m.split('.')[0] for m in sys.modules if m.startswith('scipy')}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["True []"], done.stderr


def test_workers_default_to_the_cores_this_process_may_use():
    args = build_parser().parse_args(["score", "x", "--out", "o"])
    assert args.workers == len(os.sched_getaffinity(0))
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["score"].format_help().split())
    assert f"default: the cores this process may use, here {len(os.sched_getaffinity(0))}" in text


def test_every_option_says_its_default():
    sub = build_parser()._subparsers._group_actions[0].choices
    for command, parser in sub.items():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help" or action.help == "==SUPPRESS==":
                continue
            assert action.help, (command, action.dest)
            if action.default is not None and action.default is not False:
                assert "default" in parser._get_formatter()._get_help_string(action), (command, action.dest)
    assert "--weights" in sub["evaluate"].format_help() and "--model" not in sub["evaluate"].format_help()


# -- arguments checked before any work ---------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--mpp", "0"], "--mpp 0 µm/px is not a plausible"),
    (["--mpp", "-1"], "not a plausible"),
    (["--mpp", "500"], "not a plausible"),
    (["--specimen", "biopsy"], "--specimen biopsy: specimen 'biopsy' has its own rule only for gastric"),
    (["--target-mpp", "7"], "--target-mpp"),
    (["--thresholds", "/no/such.json"], "--thresholds /no/such.json"),
    (["--weights", "/no/such.pt"], "/no/such.pt: model weights not found"),
    (["MISSING"], "MISSING: no such file or folder"),
])
def test_bad_arguments_are_one_line_exit_2_and_create_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    inputs = [str(SAMPLES / "field_3plus_a.png")]
    if extra == ["MISSING"]:
        inputs, extra = [str(tmp_path / "MISSING")], []
    assert main(["score", *inputs, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("her2score score: ") and message in err, err  # no progress bar
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ('{"nope": 1}', "unknown threshold 'nope'; the thresholds are faint_od, weak_od, strong_od, "),
    ('{"weak_od": "0.2"}', "weak_od must be a number, got '0.2'"),
    ('{"min_arc_sectors": 2.5}', "min_arc_sectors must be a whole number, got 2.5"),
    ('[0.1, 0.2]', "expected a JSON object of thresholds, got list"),
    ('{"weak_od": 0.9}', "DAB OD thresholds must be positive and increase"),
    ('{"faint_od": -1}', "DAB OD thresholds must be positive and increase (0 < faint_od < weak_od < strong_od)"),
    ('{"cytoplasm_ratio": NaN}', "cytoplasm_ratio must be a finite number, got nan"),  # a NaN read a 3+ field 0, QC passed
    ('{"strong_od": Infinity}', "strong_od must be a finite number, got inf"),
    ('{"strong_od": 1e999}', "strong_od must be a finite number, got inf"),
    ('{"cytoplasm_ratio": 1' + "0" * 400 + '}', "cytoplasm_ratio must be a finite number"),  # too large for a float
])
def test_a_bad_thresholds_file_says_what_is_wrong_in_its_terms(tmp_path, capsys, text, message):
    """Python's own words (Thresholds.__init__() got an unexpected keyword argument, '<' not supported between
    'int' and 'str') were what a bad --thresholds file got; now the field, the value and the known fields."""
    (tmp_path / "t.json").write_text(text)
    assert main(["score", str(SAMPLES / "field_3plus_a.png"), "--out", str(tmp_path / "out"), "--thresholds",
                 str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"her2score score: --thresholds {tmp_path / 't.json'}: {message}"), err


def test_a_cnn_of_another_resolution_is_a_usage_error_naming_the_weights(tmp_path, capsys):
    """Tiles read at another µm/px than the CNN's: one usage error before any work, naming the weights (every
    slide failed on its own, exit 1); --no-cnn scores them."""
    slide = tmp_path / "f.png"
    shutil.copy(SAMPLES / "field_3plus_a.png", slide)
    assert main(["score", str(slide), "--out", str(tmp_path / "out"), "--target-mpp", "0.4"]) == 2
    err = capsys.readouterr().err
    assert "her2cnn.pt: the CNN was trained at 0.5 µm/px but tiles are read at 0.4 µm/px" in err, err
    assert not (tmp_path / "out").exists()
    assert main(["score", str(slide), "--out", str(tmp_path / "out"), "--target-mpp", "0.4", "--no-cnn", "-q"]) == 0


def test_a_bad_target_mpp_is_blamed_on_itself_beside_a_good_thresholds_file(tmp_path, capsys):
    (tmp_path / "t.json").write_text("{}")
    out = tmp_path / "out"
    assert main(["score", str(SAMPLES / "field_3plus_a.png"), "--out", str(out), "--thresholds", str(tmp_path / "t.json"),
                 "--target-mpp", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("her2score score: --target-mpp 0.0: ") and "--thresholds" not in err, err


def test_a_batch_refused_before_any_work_leaves_no_output_folder(tmp_path, capsys):
    """An annotation that could belong to two slides (two s.png, one regions/s.png) is an exit-2 refusal found
    once the output folder is locked: the folder this run made goes again (its lock file stayed)."""
    for sub in ("a", "b"):
        (tmp_path / "slides" / sub).mkdir(parents=True)
        shutil.copy(SAMPLES / "field_3plus_a.png", tmp_path / "slides" / sub / "s.png")
    (tmp_path / "regions").mkdir()
    shutil.copy(SAMPLES / "field_3plus_a.png", tmp_path / "regions" / "s.png")
    out = tmp_path / "out"
    assert main(["score", str(tmp_path / "slides"), "--out", str(out), "--regions", str(tmp_path / "regions"), "--no-cnn"]) == 2
    assert "her2score score: " in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("args", [["score", "{slide}", "--out", ""], ["score", "", "--out", "{out}"],
                                  ["score", "{slide}", "--out", "{out}", "--regions", " "], ["evaluate", "{slide}", "--out", ""],
                                  ["synth", ""]])
def test_an_empty_path_is_a_usage_error_not_the_current_folder(tmp_path, capsys, monkeypatch, args):
    """An unset shell variable ($OUT) gave --out "" and the batch went into the current folder; an empty input
    scored it, an empty --regions was no annotation at all."""
    monkeypatch.chdir(tmp_path)
    filled = [a.format(slide=SAMPLES / "field_0_null.png", out=tmp_path / "out") for a in args]
    with pytest.raises(SystemExit) as stop:
        main(filled)
    assert stop.value.code == 2 and "is empty (an unset shell variable?); give a path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_results_into_the_input_folder_are_refused(tmp_path, capsys):
    """--out naming the folder of slides itself: a usage error, not a failed slide per result folder."""
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(SAMPLES / "field_3plus_a.png", folder)
    assert main(["score", str(folder), "--out", str(tmp_path / "slides" / ".." / "slides"), "--no-cnn"]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["field_3plus_a.png"]
    # an --out inside the input folder that holds slides of its own: the search leaves --out out, so they were
    # silently left unscored (exit 0); a results folder there holding only its own outputs is fine
    (folder / "sub").mkdir()
    shutil.copy(SAMPLES / "field_0_null.png", folder / "sub")
    assert main(["score", str(folder), "--out", str(folder / "sub"), "--no-cnn"]) == 2
    assert "--out " + str(folder / "sub") + ": lies in an input folder and holds slides of its own (field_0_null.png)" in capsys.readouterr().err
    assert main(["score", str(folder), "--out", str(folder / "results"), "--no-cnn", "-q"]) == 0
    assert main(["score", str(folder), "--out", str(folder / "results"), "--no-cnn", "-q"]) == 0  # its overlays are no slides
    (folder / "results" / "field_3plus_a.png" / "._overlay.png").write_bytes(b"\0" * 4096)  # a Mac's resource fork on a share
    (folder / "results" / ".Trashes").mkdir()
    shutil.copy(SAMPLES / "field_0_null.png", folder / "results" / ".Trashes" / "x.png")
    assert main(["score", str(folder), "--out", str(folder / "results"), "--no-cnn", "-q"]) == 0  # hidden: not searched



@pytest.mark.parametrize("args, words", [
    (["--n-per-class", "1", "--stain-jitter", "-5"], "--stain-jitter must be 0-30 degrees"),
    (["--n-per-class", "-1"], "--n-per-class must be at least 1, got -1"),
    (["--n-per-class", "0"], "--n-per-class must be at least 1, got 0"),
    (["--n-per-class", "1", "--seed", "-1"], "--seed must be at least 0, got -1"),  # numpy's words named no option
])
def test_synth_refuses_settings_it_cannot_draw(tmp_path, capsys, args, words):
    """A negative jitter or count was a traceback, 0 fields 'wrote 0 fields' and exit 0."""
    assert main(["synth", str(tmp_path / "set"), *args]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "set").exists()


def test_synth_names_a_folder_as_it_was_given(tmp_path, capsys):
    """A folder's name holding a keyword (n_per_class) was rewritten as an option in the error: '/tmp/x --n-per-class'."""
    folder = tmp_path / "my n_per_class set"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["synth", str(folder), "--n-per-class", "1"]) == 2
    assert str(folder) in capsys.readouterr().err


def test_synth_into_a_file_says_so(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["synth", str(tmp_path / "f"), "--n-per-class", "1"]) == 2
    assert f"{tmp_path / 'f'}: exists and is not a folder" in capsys.readouterr().err

def test_synth_into_a_folder_of_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["synth", str(tmp_path), "--n-per-class", "1"]) == 2
    assert capsys.readouterr().err == (f"her2score synth: {tmp_path}: holds files but no set synth wrote (no labels.csv, no "
                                       "images/field_*); give synth an empty or new folder\n")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_output_piped_into_head_ends_quietly(tmp_path):
    """'her2score score ... | head -1': the reader going away (here before any line) ends the command quietly, with
    the batch's own exit code (its work is done and recorded: 141 said it had failed)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("field_0_null.png", "field_3plus_a.png"):
        shutil.copy(SAMPLES / name, slides)
    shell = (f"{sys.executable} -m her2score.cli score {slides} --out {tmp_path / 'out'} --no-cnn -q | true; "
             "echo \"rc ${PIPESTATUS[0]}\"")
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.strip() == "rc 0", done.stdout
    assert len(list((tmp_path / "out").glob("*/result.json"))) == 2


# -- inputs that are not HER2 IHC --------------------------------------------------------------------

def test_inputs_that_are_not_hdab_tissue_are_refused_in_summary_and_the_batch_goes_on(tmp_path, capsys):
    slides = tmp_path / "in"
    slides.mkdir()
    refused = []
    for name, (make, _) in NOT_TISSUE.items():
        save_png(slides / f"{name}.png", make())
        refused.append(f"{name}.png")
    he = sorted(p for p in (REAL / "he").rglob("*.png")) if REAL.is_dir() else []
    for p in he:  # each real H&E image, cropped to 384 px (the crop keeps its µm/px)
        save_png(slides / f"he-{p.stem}.png", np.asarray(Image.open(p).convert("RGB"))[:384, :384], mpp=0.5)
        refused.append(f"he-{p.stem}.png")
    save_png(slides / "colon-ihc.png", photo("immunohistochemistry"), mpp=0.5)
    save_png(slides / "colon-ihc-at-5um.png", photo("immunohistochemistry"), mpp=5.0)
    save_png(slides / "sample-3plus.png", generate_field("3+", seed=4, size_px=(384, 384)).image)
    refused.append("colon-ihc-at-5um.png")
    code = main(["score", str(slides), "--out", str(tmp_path / "out"), "-q", "--no-cnn", "--workers", "2"])
    assert code == 1
    rows = summary(tmp_path / "out")
    assert len(rows) == len(refused) + 2
    for name in refused:
        assert rows[name]["status"] == "refused" and rows[name]["score"] == "", rows[name]
        assert name in rows[name]["error"]  # the reason, naming the file
    if he:
        assert "H&E" in rows["he-histo.png"]["error"]
    assert "nuclei would be" in rows["colon-ihc-at-5um.png"]["error"]
    for name in ("colon-ihc.png", "sample-3plus.png"):
        assert rows[name]["status"] == "ok" and rows[name]["score"] in ("1+", "2+", "3+"), rows[name]
    out = capsys.readouterr().out
    assert f"2 scored, 0 reused, {len(refused)} failed (all refused: no tissue, not an H-DAB stain, or a µm/px its nuclei rule out)" in out
    assert out.count(" x refused ") == len(refused)


def test_a_failed_qc_is_marked_beside_the_score(tmp_path, capsys):
    canvas = np.full((512, 512, 3), 246, np.uint8)
    canvas[200:350, 200:350] = generate_field("3+", seed=9600).image[200:350, 200:350]  # a 75 µm fragment
    save_png(tmp_path / "fragment.png", canvas)
    main(["score", str(tmp_path / "fragment.png"), "--out", str(tmp_path / "out"), "-q", "--no-cnn"])
    row = summary(tmp_path / "out")["fragment.png"]
    assert row["status"] == "ok" and row["qc_status"] in ("qc_failed", "not_scored") and row["qc_passed"] == "False"
    assert "too_few_tumour_cells:fail" in row["qc"]
    line = next(l for l in capsys.readouterr().out.splitlines() if "fragment.png" in l)
    assert f"! {row['qc_status']}" in line


# -- check -----------------------------------------------------------------------------------------

def check(capsys, *argv):
    code = main(["check", *argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_check_exit_codes(scored, capsys):
    three, zero, two = (scored / n / "result.json" for n in ("field_3plus_a.png", "field_0_null.png", "field_2plus_a.png"))
    assert check(capsys, str(three), "--rule", "her2-positive-breast")[0] == 0
    assert check(capsys, str(zero), "--rule", "her2-positive-breast")[0] == 1
    code, out, _ = check(capsys, str(two), "--rule", "her2-low-breast", "--rule", "her2-positive-breast")
    assert code == 3 and "needs_review" in out and "ISH" in out
    assert check(capsys, str(two), "--rule", "her2-low-breast", "--ish", "negative")[0] == 0
    assert check(capsys, str(three), "--rule", "her2-positive-breast", "--rule", "her2-low-breast")[0] == 1
    code, out, _ = check(capsys, str(two), "--rule", "her2-low-breast", "--json")
    doc = json.loads(out)
    assert code == doc["exit_code"] == 3 and doc["decisions"][0]["status"] == "needs_review"
    assert doc["decisions"][0]["rule"] == "her2-low-breast" and doc["score"] == "2+"


def test_check_errors_are_one_line_exit_2(scored, tmp_path, capsys):
    result = str(scored / "field_3plus_a.png" / "result.json")
    (tmp_path / "other.json").write_text('{"rows": [1, 2]}')
    (tmp_path / "bad.json").write_text("{not json")
    good = json.loads(Path(result).read_text())
    (tmp_path / "score3.json").write_text(json.dumps({**good, "score": "3", "level": "3"}))
    (tmp_path / "counts.json").write_text(json.dumps({**good, "counts": [1, 2]}))
    (tmp_path / "origin.json").write_text(json.dumps({**good, "mpp_origin": "guessed"}))
    assert good["mpp_origin"] == "metadata"
    cases = [
        ((result, "--rule", "no-such-rule"), "unknown rule 'no-such-rule'; shipped rules: car-t-her2, gastric-toga"),
        ((str(tmp_path / "none.json"), "--rule", "her2-low-breast"), "none.json: no such file"),
        ((str(scored), "--rule", "her2-low-breast"), "is a folder"),
        ((str(tmp_path / "other.json"), "--rule", "her2-low-breast"), "other.json: not a her2score result.json"),
        ((str(tmp_path / "bad.json"), "--rule", "her2-low-breast"), "bad.json: not JSON"),
        ((str(tmp_path / "score3.json"), "--rule", "t-dxd-tumour-agnostic"), "'score' must be one of ['0', '1+', '2+', '3+']"),
        ((str(tmp_path / "counts.json"), "--rule", "car-t-her2"), "'counts' must map none, faint_partial"),
        ((str(tmp_path / "origin.json"), "--rule", "car-t-her2"), "'mpp_origin' must be one of ['user', 'metadata', 'default']"),
        ((result, "--rule", str(tmp_path / "none.toml")), f"her2score check: {tmp_path / 'none.toml'}: no such rule file\n"),
    ]
    for argv, message in cases:
        code, out, err = check(capsys, *argv)
        assert code == 2 and out == "" and err.count("\n") == 1 and message in err, (argv, err)
        assert "Traceback" not in err


def test_check_reads_ish_as_the_api_and_evaluate_do(scored, capsys):
    """--ish took 'negative' but not 'Negative', which check_eligibility and evaluate's ish column take: its choices
    are eligibility.ISH_RESULTS, read in any case as the API reads them (eligibility.ish_result)."""
    from her2score.eligibility import ISH_RESULTS

    two = str(scored / "field_2plus_a.png" / "result.json")
    check_parser = build_parser()._subparsers._group_actions[0].choices["check"]
    assert tuple(next(a for a in check_parser._actions if "--ish" in a.option_strings).choices) == ISH_RESULTS
    assert check(capsys, two, "--rule", "her2-low-breast", "--ish", "Negative")[0] == 0
    with pytest.raises(SystemExit) as refused:
        main(["check", two, "--rule", "her2-low-breast", "--ish", "equivocal"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "argument --ish: must be one of ['positive', 'negative'] (any case), got 'equivocal'" in err


def test_rules_command(capsys):
    assert main(["rules"]) == 0
    listed = capsys.readouterr().out
    for name in ("her2-positive-breast", "her2-low-breast", "her2-ultralow-breast", "gastric-toga", "car-t-her2"):
        assert name in listed


# -- batch bookkeeping -----------------------------------------------------------------------------

def test_summary_after_two_runs_into_one_out_and_settings_never_mixed(tmp_path, capsys, fields):
    a, b, out = save_png(tmp_path / "a.png", fields["3+"]), save_png(tmp_path / "b.png", fields["0"]), tmp_path / "out"
    assert main(["score", str(a), "--out", str(out), "-q", "--no-cnn"]) == 0
    capsys.readouterr()
    assert main(["score", str(b), "--out", str(out), "-q", "--no-cnn"]) == 0
    assert set(summary(out)) == {"a.png", "b.png"}
    printed = capsys.readouterr().out
    assert "1 scored, 0 reused, 0 failed; 2 slides in" in printed
    # the console lists this run's slides; the earlier run's stay in summary.csv
    assert str(b) in printed and str(a) not in printed
    assert printed.rstrip().endswith("(and 1 slide from earlier runs: see summary.csv)")
    assert main(["score", str(a), str(b), "--out", str(out), "-q", "--no-cnn"]) == 0
    assert "0 scored, 2 reused, 0 failed" in capsys.readouterr().out
    # other settings for a alone would mix two guidelines in one folder: refused before any work
    assert main(["score", str(a), "--out", str(out), "-q", "--no-cnn", "--guideline", "gastric"]) == 2
    err = capsys.readouterr().err
    assert "holds 1 slide (b.png) scored with other settings (guideline breast-asco-cap-2023 there, gastric now)" in err
    assert {r["guideline"] for r in summary(out).values()} == {"breast-asco-cap-2023"}
    # with every slide among the inputs, the folder is scored again under the new settings
    assert main(["score", str(a), str(b), "--out", str(out), "-q", "--no-cnn", "--guideline", "gastric"]) == 0
    assert "2 scored, 0 reused" in capsys.readouterr().out
    assert {r["guideline"] for r in summary(out).values()} == {"gastric"}


@pytest.mark.parametrize("backend, png_error", [
    ("tifffile", "tifffile reads TIFF files; this is a PNG image (the image backend reads it)"),
    pytest.param("openslide", "OpenSlide does not read PNG images (the image backend does)", marks=pytest.mark.skipif(
        importlib.util.find_spec("openslide") is None, reason="openslide-python not installed")),
])
def test_backend_reads_every_slide_and_a_file_it_cannot_is_an_error_row(tmp_path, capsys, pyramid_tiff, good_png,
                                                                         backend, png_error):
    """--backend forces the reader of every slide, named in each result's notes; a file it cannot read gets an error
    row naming the file and why, and the batch goes on. Another reader, like another --mpp, scores the slides given
    again and keeps the others; the reader a file chooses itself, given or not, is no other (the scan read by
    tifffile is reused without --backend)."""
    folder, out = tmp_path / "slides", tmp_path / "out"
    folder.mkdir()
    scan, field = shutil.copy(pyramid_tiff, folder / "scan.tif"), shutil.copy(good_png, folder / "field.png")
    run = ["score", str(folder), "--out", str(out), "-q", "--no-cnn", "--workers", "1"]
    assert main([*run, "--backend", backend]) == 1
    rows = summary(out)
    assert rows["scan.tif"]["status"] == "ok", rows["scan.tif"]["error"]
    assert f"reader: {backend}" in json.loads((out / "scan.tif" / "result.json").read_text())["notes"]
    assert rows["field.png"]["status"] == "error" and rows["field.png"]["error"] == f"{field}: {png_error}"
    capsys.readouterr()
    assert main([str(scan) if a == str(folder) else a for a in run] + ["--backend", backend]) == 0
    assert "0 scored, 1 reused, 0 failed" in capsys.readouterr().out
    assert main(run) == 0  # each file's own reader: the field scored, the scan again where it read otherwise
    assert ("1 scored, 1 reused" if backend == "tifffile" else "2 scored, 0 reused") + ", 0 failed" in capsys.readouterr().out
    assert "reader: tifffile" in json.loads((out / "scan.tif" / "result.json").read_text())["notes"]
    assert "reader: image" in json.loads((out / "field.png" / "result.json").read_text())["notes"]


def test_the_reader_a_file_chooses_given_as_backend_reuses_its_results(tmp_path, capsys, pyramid_tiff, good_png):
    """A slide scored without --backend was scored again with --backend naming the very reader its file chooses, and
    the other way round (a key of its own for the same reads), where evaluate --reuse takes it: reused both ways."""
    out = tmp_path / "out"
    run = ["score", str(pyramid_tiff), str(good_png), "--out", str(out), "-q", "--no-cnn", "--workers", "1"]
    assert main(run) == 0
    capsys.readouterr()
    assert main([*run, "--backend", "image"]) == 0  # the PNG's own reader: reused; the TIFF's another: scored again
    assert "1 scored, 1 reused, 0 failed" in capsys.readouterr().out
    assert main([a for a in run if a != str(good_png)] + ["--backend", "tifffile"]) == 0
    assert "1 scored, 0 reused, 0 failed" in capsys.readouterr().out
    assert main(run) == 0  # each read by the reader its file chooses, the one given or none
    assert "0 scored, 2 reused, 0 failed" in capsys.readouterr().out


def test_backend_openslide_where_openslide_is_missing_is_an_error_row_saying_so(tmp_path, capsys, pyramid_tiff,
                                                                               good_png, monkeypatch):
    """Every slide gets an error row naming it and saying OpenSlide is not there, not a bare ModuleNotFoundError."""
    monkeypatch.setitem(sys.modules, "openslide", None)  # an import of it fails, in the forked workers too
    out = tmp_path / "out"
    assert main(["score", str(pyramid_tiff), str(good_png), "--out", str(out), "-q", "--no-cnn", "--workers", "1",
                 "--backend", "openslide"]) == 1
    for name, path in (("slide.tif", pyramid_tiff), (good_png.name, good_png)):
        row = summary(out)[name]
        assert row["status"] == "error" and row["error"].startswith(
            f"{path}: OpenSlide is not available (ModuleNotFoundError: ") and row["error"].endswith(
            "install openslide-python and openslide-bin"), row["error"]


def test_a_bad_weights_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    out = tmp_path / "out"
    assert main(["score", str(SAMPLES / "field_0_null.png"), "--out", str(out), "--weights", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"her2score score: {bad}: not a readable her2score model file")
    assert err.rstrip().endswith("(or score with --no-cnn)") and not out.exists()
    # a text file: torch's words end in advice to load with weights_only=False, which is unsafe; none of them
    assert main(["score", str(SAMPLES / "field_0_null.png"), "--out", str(out), "--weights", str(SAMPLES.parent / "README.md")]) == 2
    err = capsys.readouterr().err
    assert "weights_only" not in err and "not torch weights, or objects other than weights" in err, err


@pytest.mark.parametrize("argv", [
    ["score", "NOWHERE", "--out", "OUT"],
    ["check", "NOWHERE", "--rule", "her2-low-breast"],
    ["synth", "OUT", "--n-per-class", "0"],
    ["train", "--out", "OUT"],
    ["train", "--synthetic", "1", "--patch-px", "12", "--out", "OUT"],
    ["evaluate", "NOWHERE", "--out", "OUT", "--no-cnn"],
    ["evaluate", "LABELS", "--out", "OUT", "--weights", "NOWHERE"],
    ["evaluate", "LABELS", "--out", "OUT", "--specimen", "biopsy"],
])
def test_every_command_words_its_errors_alike(tmp_path, capsys, argv):
    """'her2score score: ...', 'her2score check: ...', but 'her2score: ...' from train and from evaluate past its option
    checks: one form now, 'her2score COMMAND: message' on one line, exit 2."""
    (tmp_path / "labels.csv").write_text("path,label\nx.png,1+\n")
    names = {"NOWHERE": tmp_path / "nowhere", "OUT": tmp_path / "out", "LABELS": tmp_path / "labels.csv"}
    assert main([str(names.get(a, a)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"her2score {argv[0]}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, said", [
    (["score", "IN", "--specimen", "biopsy"], "scores biopsies and resections alike: use --specimen resection"),
    (["score", "IN", "--guideline", "gastric", "--isolated-floor", "2"], "--isolated-floor 2: --isolated-floor is the floor"),
    (["evaluate", "IN", "--gastric-reading", "per_band"], "--gastric-reading 'per_band' is a reading of the gastric rules"),
    (["train", "--synthetic", "1", "--patch-px", "12"], "--patch-px must be a multiple of 8 and >= 16, got 12"),
    (["train", "--synthetic", "1", "--epochs", "0"], "--epochs, --batch-size and --patches-per-image must be positive "
                                                     "(--batch-size >= 2)"),
    (["train", "--synthetic", "1", "--max-minutes", "0"], "--max-minutes must be a positive number of minutes (or not given"),
    (["train", "--synthetic", "-1"], "--synthetic must be >= 1, got -1"),
    (["train", "--synthetic", "0"], "--synthetic must be >= 1, got 0"),  # was 'give a training source'
    (["train", "--synthetic", "1"], "--synthetic 1 alone leaves no image of any class for validation: give at least 2"),
    # these five ended in a traceback (a division by zero, torch's own errors) or ran on for minutes (--target-mpp 50)
    (["train", "--synthetic", "1", "--target-mpp", "0"], "--target-mpp must be 0.1-2 µm/px, got 0.0"),
    (["train", "--synthetic", "1", "--target-mpp", "50"], "--target-mpp must be 0.1-2 µm/px, got 50.0"),
    (["train", "--synthetic", "1", "--device", "nope"], "--device must be one of cpu, cuda, mps, xpu"),
    (["train", "--synthetic", "1", "--device", "cuda:"], "--device must be one of cpu, cuda, mps, xpu"),
    (["train", "--synthetic", "1", "--device", "mps"], "--device 'mps': this machine or torch build cannot run on mps"),
    (["train", "--synthetic", "1", "--device", "cpu:3"], "--device 'cpu:3': this machine has 1 of cpu, numbered from 0"),
    (["train", "--synthetic", "1", "--width", "0"], "--width must be at least 1, got 0"),
    (["train", "--synthetic", "1", "--synthetic-jitter", "-5"], "--synthetic-jitter must be 0-30 degrees"),
    (["train", "--synthetic", "1", "--border-od-max", "-1"], "--border-od-max must be 0-0.2 OD"),
    (["train", "--synthetic", "1", "--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["train", "--synthetic", "1", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["evaluate", "IN", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["evaluate", "IN", "--bootstrap", "-5"], "--bootstrap must be at least 0, got -5"),  # dropped kappa's interval
])
def test_the_command_line_says_its_options_where_the_api_says_its_keywords(tmp_path, capsys, argv, said):
    """A command-line user was told "use specimen='resection'", "patch_px must be ..." (the Python API's keywords):
    the command line says the option, the API keeps its keyword."""
    from her2score.cli import API_OPTIONS

    argv = [str(SAMPLES / "field_0_null.png") if a == "IN" else a for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    keywords = {k for options in API_OPTIONS.values() for k in options if "_" in k}
    assert said in err and not re.search(r"\w=", err) and not any(k in err for k in keywords), err
    assert out == "" and not (tmp_path / "out").exists()  # refused before any work ("generating -4 synthetic fields")


def test_the_api_keeps_its_keywords_and_every_option_said_for_one_exists():
    from her2score.cli import API_OPTIONS
    from her2score.pipeline import ScoringConfig
    from her2score.train import TrainConfig

    with pytest.raises(ValueError, match="and resections alike: use specimen='resection'$"):
        ScoringConfig(specimen="biopsy")
    with pytest.raises(ValueError, match="^patch_px must be a multiple of 8"):
        TrainConfig(patch_px=12)
    commands = build_parser()._subparsers._group_actions[0].choices
    for command, options in API_OPTIONS.items():
        known = {o for action in commands[command]._actions for o in action.option_strings}
        assert set(options.values()) <= known, (command, set(options.values()) - known)


def test_paths_in_errors_keep_folder_names_that_look_like_keywords(tmp_path, capsys):
    """Keywords are said as options only in the settings' own errors: a first version rewrote every message, so a
    folder named batch_size or 'run specimen=biopsy' in a path read '--batch-size', 'run --specimen biopsy'."""
    labels = tmp_path / "batch_size" / "labels.csv"
    assert main(["train", "--csv", str(labels), "--out", str(tmp_path / "o")]) == 2
    assert str(labels) in capsys.readouterr().err
    run = tmp_path / "run specimen=biopsy"
    run.mkdir()
    assert main(["score", str(run), "--out", str(tmp_path / "o2"), "--no-cnn"]) == 2
    assert f"{run}: folder holds no slides" in capsys.readouterr().err


def test_missing_input_among_others_creates_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "her2score.cli", "score", str(SAMPLES / "field_0_null.png"),
                           str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"her2score score: {tmp_path / 'nope'}: no such file or folder"
    assert not (tmp_path / "o").exists()


def test_inputs_holding_no_slide_are_a_usage_error_that_writes_nothing(tmp_path, capsys):
    """An empty folder, a README or another batch's output folder given alone got an error row in a summary.csv written
    into --out (exit 1): nothing there is a slide, a usage error (exit 2, one line naming each input and why), and --out
    is neither made nor touched. A file named as a slide that cannot be read is still a failed slide (exit 1)."""
    empty, readme, out = tmp_path / "empty", tmp_path / "README.md", tmp_path / "out"
    empty.mkdir()
    readme.write_text("# notes")
    for inputs, why in (([empty], f"{empty}: folder holds no slides (looked for .tif, "),
                        ([readme], f"{readme}: unsupported format '.md'; supported: .tif, "),
                        ([readme, empty], f"{readme}: unsupported format '.md'; supported: ")):
        assert main(["score", *map(str, inputs), "--out", str(out), "--no-cnn"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"her2score score: no slide to score in the inputs given: {why}"), err
        assert not out.exists()
    assert main(["score", str(SAMPLES / "field_0_null.png"), "--out", str(out), "--no-cnn", "-q"]) == 0
    (out / LOCK).unlink()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["score", str(empty), "--out", str(out), "--no-cnn"]) == 2  # an earlier run's --out: left as it was
    assert main(["score", str(out), "--out", str(tmp_path / "again"), "--no-cnn"]) == 2  # a batch's outputs
    err = capsys.readouterr().err.splitlines()
    assert err[1] == (f"her2score score: no slide to score in the inputs given: {out}: a her2score batch's output folder "
                      "(manifest.json and summary.csv), not a folder of slides"), err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before and not (tmp_path / "again").exists()
    (tmp_path / "bad.svs").write_bytes(b"II*\0 not a slide")  # named as a slide: its own error row
    assert main(["score", str(tmp_path / "bad.svs"), "--out", str(tmp_path / "bad"), "--no-cnn", "-q"]) == 1
    assert summary(tmp_path / "bad")["bad.svs"]["status"] == "error"


@pytest.mark.parametrize("inputs", [["field_3plus_a.png", "slide_2plus.tif"], ["slide_2plus.tif"]])
def test_default_run_with_the_cnn_in_worker_processes(tmp_path, inputs):
    """The CLI loads the CNN (on ONNX Runtime, without torch) before forking slide (or tile) workers,
    which inherit it, and every result carries the CNN's view."""
    out = tmp_path / "out"
    code = "import sys\nfrom her2score.cli import main\ncode = main(sys.argv[1:])\nprint('torch' in sys.modules)\nsys.exit(code)"
    cmd = [sys.executable, "-c", code, "score", *[str(SAMPLES / i) for i in inputs],
           "--out", str(out), "--workers", "2", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"  # torch never imported
    for name in inputs:
        result = json.loads((out / name / "result.json").read_text())
        assert result["cnn"]["tiles"] >= 1 and result["confidence"] is not None
    rows = summary(out)
    assert all(r["cnn_score"] in ("0", "1+", "2+", "3+") and float(r["confidence"]) > 0 for r in rows.values())


def test_every_option_the_readme_shows_exists():
    """Each `her2score COMMAND ... --option` in the README (shell blocks, where indented lines continue
    the command above them, and inline code) is an option of that command."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    sub = build_parser()._subparsers._group_actions[0].choices
    shown: list[tuple[str, str]] = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        command = None
        for line in block.splitlines():
            code = line.split("#")[0]
            m = re.search(r"\bher2score ([a-z]+)", code)
            if m:
                command, code = m.group(1), code[m.end():]
            elif not line.startswith(" "):
                command = None
            if command:
                shown += [(command, o) for o in re.findall(r"(?<![\w-])--[a-z][\w-]*", code)]
    for command, rest in re.findall(r"`her2score ([a-z]+)([^`]*)`", readme):  # inline, in the prose
        shown += [(command, o) for o in re.findall(r"(?<![\w-])--[a-z][\w-]*", rest)]
    assert ("score", "--cells-csv") in shown and ("evaluate", "--specimen") in shown and ("check", "--json") in shown
    for command, option in shown:
        assert command in sub, command
        assert option in sub[command]._option_string_actions, (command, option)


def test_synth_draws_real_borders_on_request(tmp_path):
    from PIL import Image

    for name, extra in (("clean", []), ("real", ["--real-borders"])):
        assert main(["synth", str(tmp_path / name), "--n-per-class", "1", "--seed", "3", *extra]) == 0
    labels = [(tmp_path / name / "labels.csv").read_text() for name in ("clean", "real")]
    assert labels[0] == labels[1]  # the same fields and truth; only the unstained borders differ
    path = next(p.split(",")[0] for p in labels[0].splitlines()[1:] if ",0," in p)
    clean, real = (np.asarray(Image.open(tmp_path / name / path), np.float32) for name in ("clean", "real"))
    assert clean.shape == real.shape and real.mean() < clean.mean()  # more DAB, darker


def test_a_slide_with_no_tumour_cells_has_no_h_score_or_shares(tmp_path, capsys):
    """An annotation that holds no cell: the summary leaves the score, H-score and shares empty (no cells
    were counted, which is not HER2 0), and the console line shows H=-."""
    f = generate_field("3+", seed=9300)
    (tmp_path / "slides").mkdir()
    save_png(tmp_path / "slides" / "field.png", f.image)
    (tmp_path / "regions").mkdir()
    mask = np.zeros((512, 512), np.uint8)
    mask[0, 0] = 255  # one pixel: no cell centre lies in it
    Image.fromarray(mask).save(tmp_path / "regions" / "field.png")
    main(["score", str(tmp_path / "slides"), "--mpp", "0.5", "--regions", str(tmp_path / "regions"),
          "--out", str(tmp_path / "out"), "--no-cnn"])
    row = summary(tmp_path / "out")["field.png"]
    assert (row["status"], row["qc_status"], row["score"], row["h_score"]) == ("ok", "not_scored", "", "")
    assert all(row[f"pct_{c}"] == "" for c in CATEGORIES)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "field.png" in l)
    assert "H=- " in line and "not scored" in line
    assert out.startswith("1 scored (1 without a score: no tumour cells), 0 reused, 0 failed; ")


def test_check_refuses_a_result_json_whose_fields_disagree(scored, tmp_path, capsys):
    """Each field may be one the tool writes and the whole still not: a level that is not the score's,
    counts that do not add up to the tumour cells."""
    good = json.loads((scored / "field_3plus_a.png" / "result.json").read_text())
    cases = {"level.json": ({**good, "level": "0 (null)"}, "'level' '0 (null)' is not a level of score '3+'"),
             "counts.json": ({**good, "counts": {**good["counts"], "none": good["counts"]["none"] + 5000}},
                             f"'counts' add up to {good['tumour_cells'] + 5000}"),
             "guideline.json": ({**good, "guideline": "breast"}, "'guideline' must be one of")}  # it raised a traceback, exit 1
    for name, (doc, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(doc))
        code, out, err = check(capsys, str(tmp_path / name), "--rule", "t-dxd-tumour-agnostic")
        assert code == 2 and message in err, err
