"""Folder runs: summary.csv, resume, retry, the lock, stale temporary files, determinism across runs
and worker counts, and a worker process dying mid-slide."""
from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import save_png
from her2score import batch
from her2score.batch import LOCK, MANIFEST, SAVE_ALWAYS_UNDER_S, SAVE_COST_SHARE, BatchError, _save_due, discover, run_batch
from her2score.cli import main
from her2score.outputs import OPTIONAL_OUTPUT_FILES, OUTPUT_FILES, atomic_write
from her2score.pipeline import ScoringConfig
from her2score.synthetic import generate_field
from her2score.slide import SLIDE_SUFFIXES

SMALL_TILES = ScoringConfig(tile_px=128, margin_um=12)


@pytest.fixture
def three(tmp_path, fields):
    folder = tmp_path / "slides"
    folder.mkdir()
    for s in ("0", "2+", "3+"):
        save_png(folder / f"field {s}.png", fields[s])
    return folder


def _mtimes(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json")}


def test_summary_csv_columns_and_rows(tmp_path, three):
    out = tmp_path / "out"
    (three / "broken.png").write_bytes(b"")
    rows = run_batch([three], out)
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header, table = reader.fieldnames, list(reader)
    assert header[:2] == ["slide", "status"]
    assert {"slide", "status", "score", "h_score", "tumour_cells", "error", "output", "qc_passed"} <= set(header)
    assert [r["slide"] for r in table] == sorted(str(p) for p in three.iterdir())
    by = {Path(r["slide"]).name: r for r in table}
    assert by["broken.png"]["status"] == "error" and by["broken.png"]["error"] == f"{three / 'broken.png'}: empty file (0 bytes)"
    for s in ("0", "2+", "3+"):
        r = by[f"field {s}.png"]
        assert r["status"] == "ok" and r["error"] == "" and r["score"] in ("0", "1+", "2+", "3+")
        assert float(r["h_score"]) >= 0 and int(r["tumour_cells"]) > 0
        result = json.loads((out / r["output"] / "result.json").read_text(encoding="utf-8"))
        assert (result["score"], str(result["tumour_cells"])) == (r["score"], r["tumour_cells"])
        assert result["qc_status"] == r["qc_status"] and r["qc_status"] in ("passed", "needs_review", "qc_failed",
                                                                            "not_scored")
    assert [{k: str(v) for k, v in r.items()} for r in rows] == table


def test_manifest_and_summary_are_rewritten_at_most_a_share_of_the_time():
    """Each rewrite is whole, so a batch of thousands rewrites them less often than after every slide."""
    assert SAVE_COST_SHARE == 0.1 and SAVE_ALWAYS_UNDER_S == 0.05
    assert _save_due(0.0, 0.007)  # 100 slides: 7 ms a rewrite, made after every slide however close
    assert not _save_due(0.5, 0.07)  # 1,000 slides: 70 ms a rewrite waits 0.7 s
    assert not _save_due(2.0, 0.66) and _save_due(6.6, 0.66)  # 10,000 slides


def _never_due(monkeypatch):
    """As in a batch of many thousands: no rewrite is due until the batch stops."""
    monkeypatch.setattr(batch, "SAVE_COST_SHARE", 1e-12)
    monkeypatch.setattr(batch, "SAVE_ALWAYS_UNDER_S", 0.0)


def _done_in(out: Path) -> set[str]:
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["slides"]
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        assert sorted(r["slide"] for r in csv.DictReader(f)) == sorted(manifest)
    return {Path(s).name for s, e in manifest.items() if e["state"] == "done"}


def _small_and_large(tmp_path, fields) -> Path:
    """A 384 px field and a 1536 px one (16 times the work): scored side by side, the small one ends first."""
    slides = tmp_path / "slides"
    slides.mkdir()
    save_png(slides / "a_small.png", fields["2+"])
    save_png(slides / "b_large.png", generate_field("3+", seed=7, size_px=(1536, 1536)).image)
    return slides


def _large_slide_stopped(out: Path) -> bool:
    """Whether the large slide, still being scored when the batch stopped, was stopped with it (no outputs)."""
    return not (out / "b_large.png").exists()


def test_slides_finished_before_an_interruption_are_recorded_before_the_workers_stop(tmp_path, fields, monkeypatch):
    """With no rewrite due during the run, the finished slides are written when it stops: here on
    Ctrl-C after the small field, while the other worker still scores the large one. They are written
    first; then that worker is stopped, and the next run scores the large slide."""
    _never_due(monkeypatch)
    slides, out = _small_and_large(tmp_path, fields), tmp_path / "out"

    def interrupt(row, done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch([slides], out, workers=2, progress=interrupt)
    assert _done_in(out) == {"a_small.png"} and _large_slide_stopped(out)
    rows = run_batch([slides], out)  # resumes: the large slide is scored
    assert rows.reused == 1 and rows.scored == 1 and len(rows) == 2


DASK_INTERRUPTED = """
import csv, json, os, signal, sys, threading, time
from pathlib import Path
from dask.distributed import LocalCluster
from her2score import batch


def main(slides, out):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C on, even where the test runner ignores it
    batch.SAVE_COST_SHARE, batch.SAVE_ALWAYS_UNDER_S = 1e-12, 0.0  # no rewrite is due until the batch stops
    at_close, close = [], LocalCluster.close

    def recording_close(self, *args, **kwargs):  # the slides done as the cluster closes (None: summary and manifest differ)
        slides = json.loads((Path(out) / batch.MANIFEST).read_text(encoding="utf-8"))["slides"]
        with open(Path(out) / "summary.csv", newline="", encoding="utf-8") as f:
            listed = sorted(r["slide"] for r in csv.DictReader(f))
        done = [Path(s).name for s, e in sorted(slides.items()) if e["state"] == "done"]
        at_close.append(done if listed == sorted(slides) else None)
        return close(self, *args, **kwargs)

    LocalCluster.close = recording_close

    def interrupt_soon(row, done, total):  # after the small slide: lands while the batch waits for the large one
        if done == 1:
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()

    try:
        batch.run_batch([slides], out, workers=2, scheduler="local", progress=interrupt_soon)
        time.sleep(60)  # not reached: the signal ends the batch, or here the script
    except KeyboardInterrupt:
        print(json.dumps(at_close))


if __name__ == "__main__":  # Dask's worker processes import this module again
    main(*sys.argv[1:])
"""


def test_slides_finished_before_an_interruption_are_recorded_before_the_dask_cluster_closes(tmp_path, fields):
    """Ctrl-C while the batch waits on Dask: the finished slides are written first, then the client and
    cluster close (which takes seconds; a kill meanwhile loses nothing recorded). In a process of its
    own, so that the interruption and the cluster's shutdown touch nothing of the test runner's."""
    pytest.importorskip("distributed")
    slides, out = _small_and_large(tmp_path, fields), tmp_path / "out"
    script = tmp_path / "interrupted.py"
    script.write_text(DASK_INTERRUPTED, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), str(slides), str(out)], capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert lines and json.loads(lines[-1])[:1] == [["a_small.png"]], (done.stdout, done.stderr[-2000:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses POSIX signals and process groups")
@pytest.mark.parametrize("signum, whole_group, ignored, code", [
    (signal.SIGTERM, False, False, 143),  # kill, timeout, a cluster's scheduler: the batch process alone
    (signal.SIGINT, True, False, 130),  # Ctrl-C: every process of the terminal's group, workers included
    (signal.SIGINT, True, True, 0),  # a batch started in the background ignores Ctrl-C, and so do its workers
    (signal.SIGHUP, True, False, 129),  # the terminal or SSH session closed: its whole group (it killed the batch unrecorded)
    (signal.SIGHUP, True, True, 0),  # nohup: the batch and its workers ignore it
])
def test_a_signal_stops_the_cli_batch_with_what_finished_recorded(tmp_path, fields, signum, whole_group, ignored, code):
    """A signal that lands while the batch waits for its workers ends 'her2score score' in order: the
    finished slide recorded at once (even with no rewrite due), the slide still running stopped, and one
    line saying so, no traceback. A signal the batch ignores (Ctrl-C in the background, SIGHUP under nohup) changes
    nothing."""
    slides, out = _small_and_large(tmp_path, fields), tmp_path / "out"
    code_ = ("import sys\nfrom her2score import batch\nfrom her2score.cli import main\n"
             "batch.SAVE_COST_SHARE, batch.SAVE_ALWAYS_UNDER_S = 1e-12, 0.0\nsys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code_, "score", str(slides), "--out", str(out), "--no-cnn",
                             "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # its own process group, so the test's is not signalled
                            preexec_fn=lambda: signal.signal(signum, signal.SIG_IGN if ignored else signal.SIG_DFL))
    # the progress line of the small slide: the batch has recorded its row (the large slide has about 2 s to go);
    # waited for, not slept on, so that a loaded machine cannot send the signal before the row arrives
    before = []
    while not (line := proc.stderr.readline()).startswith("[1/2] ") and line:
        before.append(line)
    assert line.startswith("[1/2] a_small.png: "), (line, before, proc.poll())
    (os.killpg if whole_group else os.kill)(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    if ignored:
        assert _done_in(out) == {"a_small.png", "b_large.png"} and err.startswith("[2/2] b_large.png: ") and err.count("\n") == 1
        return
    assert _done_in(out) == {"a_small.png"}
    said = "interrupted" if signum == signal.SIGINT else "terminated"
    assert err.count("\n") == 1 and err.startswith(f"her2score score: {said}; the slides that finished"), err
    assert _large_slide_stopped(out)  # SIGTERM reaches the batch alone: it stops the worker (which went on, unrecorded)



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses POSIX pipes")
def test_a_progress_reader_that_goes_away_leaves_the_batch_running(tmp_path, fields):
    """'2>&1 | tee log' with tee killed: the progress line after it raised BrokenPipeError and ended the batch
    mid-run (exit 141). It goes on unwatched, every slide is scored, and the exit code is the batch's, though
    its totals could not be printed."""
    slides, out = _small_and_large(tmp_path, fields), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "her2score", "score", str(slides), "--out", str(out), "--no-cnn",
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().startswith("[1/2] a_small.png: ")
    proc.stdout.close()  # the reader goes away while the large slide is scored
    assert proc.wait(timeout=300) == 0
    assert _done_in(out) == {"a_small.png", "b_large.png"}

CTRL_C_WHILE_RECORDING = """
import os, signal, sys, time
from her2score import cli
shown = cli._Progress.__call__
def progress(self, row, done, total):
    shown(self, row, done, total)
    if done == 1:  # Ctrl-C while the batch records its first slide: the workers die before it submits the next
        os.killpg(os.getpgrp(), signal.SIGINT)
        time.sleep(0.3)
cli._Progress.__call__ = progress
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses POSIX signals and process groups")
def test_ctrl_c_while_a_slide_is_recorded_stops_the_batch_in_order(tmp_path, fields):
    """The Ctrl-C that killed the workers is what the batch reports, not the broken pool it then finds (a
    traceback and exit 1 when it submitted the next slide)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(4):
        save_png(slides / f"f{i}.png", fields["2+"])
    done = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_RECORDING, "score", str(slides), "--out", str(tmp_path / "out"),
                           "--no-cnn", "--workers", "2"], capture_output=True, text=True, timeout=120, start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1].startswith("her2score score: interrupted; the slides that finished are recorded")
    assert len(_done_in(tmp_path / "out")) >= 1


SIGTERM_IN_THE_FINAL_SAVE = """
import os, signal, sys
from her2score import batch, cli
batch._save_due = lambda since, cost: False  # a large batch: every row waits for the final rewrite
write, manifests = batch.atomic_write, []
def write_then_term(path, data):
    write(path, data)
    if str(path).endswith("manifest.json"):
        manifests.append(path)
        if len(manifests) == 2:  # the final rewrite: the manifest written, the summary next
            os.kill(os.getpid(), signal.SIGTERM)
batch.atomic_write = write_then_term
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_sigterm_during_the_final_save_lands_after_it(tmp_path, fields):
    """manifest.json and summary.csv are one record: a SIGTERM between their writes waits for the second."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(2):
        save_png(slides / f"f{i}.png", fields["0"])
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SIGTERM_IN_THE_FINAL_SAVE, "score", str(slides), "--out", str(out),
                           "--no-cnn", "--workers", "1", "-q"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    assert _done_in(out) == {"f0.png", "f1.png"}  # and the summary lists what the manifest does


def test_slides_in_linked_folders_are_found_and_a_link_loop_ends(tmp_path, fields):
    """A case folder linked into the batch's folder is searched (it was skipped without a word); a link back
    up the tree is followed once, not for ever."""
    real = tmp_path / "cases" / "case1"
    real.mkdir(parents=True)
    save_png(real / "s.png", fields["1+"])
    root = tmp_path / "batch"
    root.mkdir()
    (root / "case1").symlink_to(real, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    slides, problems = discover([root])
    assert [s.name for s, _ in slides] == ["s.png"] and problems == []


def test_another_batchs_outputs_inside_the_slide_folder_are_not_slides(tmp_path, fields, caplog):
    """A second batch over a slide folder that holds the first batch's outputs scored their overlay.png as
    slides (refused rows, exit 1): a folder holding a manifest.json is another batch's, and is not searched.
    Given as the input itself, it is refused as no folder of slides."""
    case = tmp_path / "case"
    case.mkdir()
    save_png(case / "s.png", fields["1+"])
    first = run_batch([case], case / "results_breast")
    assert [Path(r["slide"]).name for r in first] == ["s.png"]
    skipped: list = []
    slides, problems = discover([case], skipped=skipped)
    assert [s.name for s, _ in slides] == ["s.png"] and problems == []
    assert skipped == [(str(case / "results_breast"), "a her2score batch's output folder (manifest.json and summary.csv): not searched")]
    second = run_batch([case], case / "results_gastric", config=ScoringConfig(guideline="gastric"))
    assert [(Path(r["slide"]).name, r["status"]) for r in second] == [("s.png", "ok")]
    assert (f"left out as her2score's own output: {case / 'results_breast'} (a her2score batch's output folder (manifest.json "
            "and summary.csv): not searched)") in caplog.text
    assert discover([case / "results_breast"])[1] == [(str(case / "results_breast"), f"{case / 'results_breast'}: a her2score "
                                                        "batch's output folder (manifest.json and summary.csv), not a folder of slides")]
    only = tmp_path / "only"  # a folder whose one subfolder is a batch's output: no slides, and it says why
    shutil.copytree(case / "results_breast", only / "res")
    assert discover([only])[1] == [(str(only), f"{only}: folder holds no slides (looked for {', '.join(SLIDE_SUFFIXES)}; "
                                               f"her2score's output: {only / 'res'}, not searched)")]
    study = case / "study"  # a study's own manifest.json and summary.csv are no batch of ours either
    study.mkdir()
    (study / "manifest.json").write_text('{"dataset": "mine"}')
    (study / "summary.csv").write_text("case,diagnosis\n1,IDC\n")
    save_png(study / "u.png", fields["0"])
    assert sorted(s.name for s, _ in discover([case])[0]) == ["s.png", "u.png"]
    (study / "summary.csv").write_text("slide,status,stain,block\nu.png,done,HER2,A1\n")  # a study's, begun alike
    assert sorted(s.name for s, _ in discover([case])[0]) == ["s.png", "u.png"]
    shutil.rmtree(study)
    resaved = case / "results_breast" / "summary.csv"  # a spreadsheet's re-save: a byte-order mark, quoted names
    resaved.write_bytes(b"\xef\xbb\xbf" + b",".join(b'"%s"' % c.encode() for c in batch.SUMMARY_COLUMNS) + b"\r\n")
    skipped = []
    assert [s.name for s, _ in discover([case], skipped=skipped)[0]] == ["s.png"]
    assert (str(case / "results_breast"), "a her2score batch's output folder (manifest.json and summary.csv): not searched") in skipped
    for sep in (b";", b"\t"):  # re-saved where a comma is the decimal mark, or as tab-separated text
        resaved.write_bytes(sep.join(c.encode() for c in batch.SUMMARY_COLUMNS) + b"\n")
        skipped = []
        assert [s.name for s, _ in discover([case], skipped=skipped)[0]] == ["s.png"]
        assert (str(case / "results_breast"), "a her2score batch's output folder (manifest.json and summary.csv): not searched") in skipped
    other = case / "scanner"  # a scanner's or another tool's manifest.json alone is no batch of ours
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    save_png(other / "t.png", fields["2+"])
    assert sorted(s.name for s, _ in discover([case])[0]) == ["s.png", "t.png"]


def test_one_slides_output_folder_is_her2score_output_not_slides(tmp_path, fields, caplog, capsys):
    """A slide's output folder (overlay.png beside result.json and the cells) kept among the slides, given as an
    input, or its overlay.png named: the overlay, a drawing of the slide, was scored as a slide of its own (refused or
    scored, exit 1). Found in a search its output files are skipped with a warning; given itself, holding no slide, it
    is no slide (exit 2). A slide beside its own outputs (write_outputs into the slide's folder), and the folders
    below, are still scored: a first version skipped the whole folder with a warning and exit 0."""
    case = tmp_path / "case"
    case.mkdir()
    save_png(case / "s.png", fields["1+"])
    run_batch([case / "s.png"], tmp_path / "out")
    kept = case / "s_outputs"
    shutil.copytree(tmp_path / "out" / "s.png", kept)
    what = "a her2score slide's output folder (cells.geojson, cells.parquet, overlay.png, result.json)"
    skipped: list = []
    slides, problems = discover([case], skipped=skipped)
    assert [s.name for s, _ in slides] == ["s.png"] and problems == [] and skipped == [(str(kept), f"{what}: its output files skipped")]
    assert discover([kept]) == ([], [(str(kept), f"{kept}: {what}, not a folder of slides")])
    assert discover([kept / "overlay.png"]) == ([], [(str(kept / "overlay.png"), f"{kept / 'overlay.png'}: in {what}, not a slide")])
    rows = run_batch([case], tmp_path / "again")
    assert [(Path(r["slide"]).name, r["status"]) for r in rows] == [("s.png", "ok")]
    assert f"left out as her2score's own output: {kept} ({what}: its output files skipped)" in caplog.text
    assert main(["score", str(kept), "--out", str(tmp_path / "o"), "--no-cnn"]) == 2
    assert f"{kept}: {what}, not a folder of slides" in capsys.readouterr().err and not (tmp_path / "o").exists()
    save_png(kept / "beside.png", fields["2+"])  # a slide beside the outputs, and one below them
    (kept / "more").mkdir()
    save_png(kept / "more" / "below.png", fields["3+"])
    assert sorted(s.name for s, _ in discover([case])[0]) == ["below.png", "beside.png", "s.png"]
    assert sorted(s.name for s, _ in discover([kept])[0]) == ["below.png", "beside.png"]
    (kept / "beside.png").unlink()
    shutil.rmtree(kept / "more")
    (kept / "result.json").unlink()
    (kept / "cells.parquet").unlink()
    (kept / "cells.geojson").unlink()  # an overlay.png alone is an image like any other
    assert [s.name for s, _ in discover([case])[0]] == ["s.png", "overlay.png"]


def test_a_symbolic_link_loop_is_one_error_row_not_a_crash(tmp_path, fields, capsys):
    """Python 3.11-3.12 raise RuntimeError resolving a link loop: the loop is that slide's error, the others are scored."""
    folder = tmp_path / "slides"
    folder.mkdir()
    save_png(folder / "ok.png", fields["2+"])
    (folder / "loop.svs").symlink_to("loop.svs")
    rows = {Path(r["slide"]).name: r for r in run_batch([folder], tmp_path / "out")}
    assert rows["ok.png"]["status"] == "ok"
    assert rows["loop.svs"]["status"] == "error" and "a symbolic link to nothing (broken, or a loop)" in rows["loop.svs"]["error"]
    assert main(["score", str(folder / "loop.svs"), "--out", str(tmp_path / "o2")]) == 2
    assert "loop.svs: a symbolic link to nothing (broken, or a loop)" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file names are bytes on Linux, not on macOS or Windows")
def test_a_file_name_that_is_not_utf8_is_scored_and_resumed(tmp_path, fields):
    """A latin-1 name (Python holds its byte as a lone surrogate) is scored beside the others, and the manifest,
    summary and result.json it is written into stay valid UTF-8, so that a second run resumes it."""
    folder = tmp_path / "slides"
    folder.mkdir()
    save_png(folder / "ok.png", fields["2+"])
    odd = folder / os.fsdecode(b"caf\xe9.png")
    save_png(odd, fields["0"])
    out = tmp_path / "out"
    rows = run_batch([folder], out)
    assert (rows.scored, rows.failed) == (2, 0)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert str(odd) in manifest["slides"]  # the same name again when read back
    assert json.loads((out / "caf_.png" / "result.json").read_text(encoding="utf-8"))["slide"] == str(odd)
    assert "caf\\udce9.png" in (out / "summary.csv").read_text(encoding="utf-8")
    again = run_batch([folder], out)
    assert (again.scored, again.reused) == (0, 2)
    # printed too, where the console's encoding is strict UTF-8 (PYTHONIOENCODING=utf-8, as under en_US.UTF-8)
    done = subprocess.run([sys.executable, "-m", "her2score.cli", "score", str(folder), "--out", str(tmp_path / "o2"),
                           "--no-cnn"], capture_output=True, text=True, errors="replace", timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0 and "caf\\udce9.png" in done.stdout, done.stderr[-2000:]


def test_resume_skips_done_slides_and_retries_errors(tmp_path, three, fields):
    out = tmp_path / "out"
    save_png(three / "later.png", fields["1+"], mpp=None)  # fails: no µm/px
    first = {Path(r["slide"]).name: r for r in run_batch([three], out)}
    assert first["later.png"]["status"] == "error"
    before = _mtimes(out)
    assert len(before) == 3
    time.sleep(0.01)
    save_png(three / "later.png", fields["1+"])  # fixed
    calls = []
    second = {Path(r["slide"]).name: r for r in run_batch([three], out, progress=lambda row, d, t: calls.append((d, t)))}
    assert second["later.png"]["status"] == "ok"
    after = _mtimes(out)
    assert {k: after[k] for k in before} == before  # done slides were not scored again
    assert calls == [(4, 4)]  # only the retried slide ran
    assert {k: second[k] for k in first if k != "later.png"} == {k: first[k] for k in first if k != "later.png"}


def test_slides_reached_again_through_a_link_are_reused_and_listed_once(tmp_path, fields):
    """A slide an earlier run scored through a linked folder, given now by its real path: the earlier entry is
    taken over under the spelling given now (reused, one row), and its annotation is found under that path."""
    (tmp_path / "real" / "sub").mkdir(parents=True)
    save_png(tmp_path / "real" / "sub" / "f.png", fields["1+"])
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    (tmp_path / "regions" / "sub").mkdir(parents=True)
    square = [[0, 0], [200, 0], [200, 200], [0, 200], [0, 0]]
    (tmp_path / "regions" / "sub" / "f.geojson").write_text(json.dumps(
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}))
    out = tmp_path / "out"
    first = run_batch([tmp_path / "alias"], out, regions=tmp_path / "regions")
    again = run_batch([tmp_path / "real"], out, regions=tmp_path / "regions")
    assert (again.scored, again.reused, len(again)) == (0, 1, 1)
    assert [r["slide"] for r in again] == [str(tmp_path / "real" / "sub" / "f.png")]
    assert again[0]["region"] == first[0]["region"] and again[0]["region"].startswith("annotation (f.geojson")


def test_a_file_name_with_a_newline_is_scored(tmp_path, fields):
    """The overlay's title wraps the slide's name at any whitespace (a newline failed the slide)."""
    save_png(tmp_path / "a\nb.png", fields["1+"])
    rows = run_batch([tmp_path], tmp_path / "out")
    assert [r["status"] for r in rows] == ["ok"], rows[0]["error"]


def test_a_result_rewritten_by_a_run_killed_before_its_record_is_scored_again(tmp_path, fields):
    """A run under other settings, killed between writing a slide's result.json and recording it, leaves the
    manifest saying done under the old settings: the slide is scored again, not reused with those outputs."""
    save_png(tmp_path / "f.png", fields["2+"])
    out = tmp_path / "out"
    run_batch([tmp_path / "f.png"], out)
    result = out / "f.png" / "result.json"
    data = json.loads(result.read_text())
    atomic_write(result, json.dumps({**data, "guideline": "gastric"}))  # what the killed gastric run wrote
    again = run_batch([tmp_path / "f.png"], out)
    assert (again.scored, again.reused) == (1, 0)
    assert json.loads(result.read_text())["guideline"] == "breast-asco-cap-2023"
    assert run_batch([tmp_path / "f.png"], out).reused == 1
    shutil.copytree(out, tmp_path / "copy")  # as cp -a, rsync -a or a restored backup: times kept, new inodes
    assert run_batch([tmp_path / "f.png"], tmp_path / "copy").reused == 1


def test_a_slide_of_a_later_run_never_takes_an_earlier_slides_folder(tmp_path, fields):
    """Two runs into one --out with slides of the same file name from different folders: the second gets a
    folder of its own, the first's results stay its own, and a third run reuses each from its folder. (The
    second took the first's folder, and the third then reused the second slide's 3+ as the first's score.)
    So does a slide whose name is over the byte limit and already carries a hash."""
    for sub, score in (("a", "0"), ("b", "3+")):
        (tmp_path / sub).mkdir()
        save_png(tmp_path / sub / "s.png", fields[score])
    out = tmp_path / "out"
    first = run_batch([tmp_path / "a" / "s.png"], out)
    second = run_batch([tmp_path / "b" / "s.png"], out)
    rows = {Path(r["slide"]).parent.name: r for r in second}
    assert rows["a"]["output"] != rows["b"]["output"] and rows["a"] == first[0]
    for sub, score in (("a", "0"), ("b", "3+")):
        assert json.loads((out / rows[sub]["output"] / "result.json").read_text())["score"] == score
    third = run_batch([tmp_path / "a" / "s.png"], out)
    assert (third.scored, third.reused) == (0, 1) and {r["score"] for r in third if r["slide"] == first[0]["slide"]} == {"0"}

    long = tmp_path / "long"
    long.mkdir()
    for end in ("A", "B"):
        save_png(long / ("p" * 155 + f"_{end}.png"), fields["1+"])
    out = tmp_path / "out_long"
    names = {Path(r["slide"]).name[-5]: r["output"] for r in run_batch([long], out)}
    again = run_batch([long / ("p" * 155 + "_B.png")], out)
    assert (again.scored, again.reused) == (0, 1)
    assert {Path(r["slide"]).name[-5]: r["output"] for r in again} == names and names["A"] != names["B"]


def test_changed_slide_or_settings_are_scored_again(tmp_path, three, fields):
    out = tmp_path / "out"
    run_batch([three], out)
    before = _mtimes(out)
    time.sleep(0.01)
    save_png(three / "field 0.png", fields["1+"])  # the file changed
    run_batch([three], out)
    after = _mtimes(out)
    assert after["field_0.png"] != before["field_0.png"]
    assert after["field_2_.png"] == before["field_2_.png"]
    run_batch([three], out, config=ScoringConfig(min_tumour_cells=10))  # other settings: everything again
    assert all(v != after[k] for k, v in _mtimes(out).items())


def test_a_slide_replaced_while_it_is_scored_is_scored_again(tmp_path, three, fields, monkeypatch):
    """A rescan written over the file while the batch reads the old one: the result is the old file's, so the
    next run scores the new one (the manifest took the file's signature after scoring, and reused the old result)."""
    out, slide = tmp_path / "out", three / "field 0.png"
    analyse = batch.analyse_slide

    def replaced_meanwhile(path, **kwargs):
        analysis = analyse(path, **kwargs)
        time.sleep(0.01)
        save_png(slide, fields["3+"])
        return analysis
    monkeypatch.setattr(batch, "analyse_slide", replaced_meanwhile)
    assert run_batch([slide], out)[0]["score"] == "0"
    monkeypatch.setattr(batch, "analyse_slide", analyse)
    again = run_batch([slide], out)
    assert (again.scored, again.reused) == (1, 0) and again[0]["score"] == "3+"


def test_another_version_of_the_tool_scores_the_slides_again(tmp_path, three, monkeypatch):
    """Outputs of another version (which may measure otherwise and write other columns) are never reused beside new ones."""
    out = tmp_path / "out"
    assert run_batch([three], out).scored == 3
    monkeypatch.setattr(batch, "__version__", "9.9.9")
    with pytest.raises(BatchError, match=r"holds 2 slides \(field 0.png, field 2\+.png\) scored with other settings "
                                         r"\(version .+ there, 9.9.9 now\)"):  # one folder never mixes versions' columns
        run_batch([three / "field 3+.png"], out)
    again = run_batch([three], out)
    assert (again.scored, again.reused) == (3, 0)


def test_summary_lists_every_slide_in_out_with_this_runs_counts(tmp_path, three, fields):
    out = tmp_path / "out"
    first = run_batch([three / "field 0.png", tmp_path / "gone.png"], out)
    assert (first.scored, first.reused, first.failed) == (1, 0, 1)
    rows = run_batch([three / "field 2+.png"], out)  # a second run into the same folder
    assert (rows.scored, rows.reused, rows.failed) == (1, 0, 0)
    assert [Path(r["slide"]).name for r in rows] == ["field 0.png", "field 2+.png"]  # the earlier error names no file: gone
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        assert [Path(r["slide"]).name for r in csv.DictReader(f)] == ["field 0.png", "field 2+.png"]
    again = run_batch([three], out)
    assert (again.scored, again.reused, again.failed) == (1, 2, 0) and len(again) == 3


def test_other_settings_are_refused_for_slides_not_in_the_run(tmp_path, three):
    out = tmp_path / "out"
    run_batch([three], out)
    before = _mtimes(out)
    with pytest.raises(BatchError, match=r"holds 2 slides \(field 0.png, field 2\+.png\) scored with other settings "
                                         r"\(guideline breast-asco-cap-2023 there, gastric now; specimen resection there, biopsy now\)"):
        run_batch([three / "field 3+.png"], out, config=ScoringConfig(guideline="gastric", specimen="biopsy"))
    assert _mtimes(out) == before  # refused before any work
    # any other setting is named (the refusal gave two hashes), and a slide whose file is gone is no input to give
    (three / "field 0.png").rename(tmp_path / "moved.png")
    try:
        stains = ScoringConfig(estimate_stains=True, thresholds=replace(ScoringConfig().thresholds, min_completeness=0.2))
        with pytest.raises(BatchError) as refused:
            run_batch([three / "field 3+.png"], out, config=stains)
    finally:
        (tmp_path / "moved.png").rename(three / "field 0.png")
    assert ("scored with other settings (estimate_stains False there, True now; thresholds.min_completeness 0.25 there, "
            "0.2 now)" in str(refused.value)), refused.value
    assert str(refused.value).endswith(f"1 of them no longer exists ({three / 'field 0.png'}): remove its output folder from "
                                       f"{out} and give the others as inputs too, or choose another --out")


def test_reinstalled_weights_with_the_same_content_rescore_nothing(tmp_path, fields):
    """The key is the weights' SHA-256, not their mtime: a reinstall rewriting the same bytes reuses
    every slide; other weights re-score."""
    from her2score.cnn import default_weights_path

    slide = tmp_path / "in" / "a.png"
    slide.parent.mkdir()
    save_png(slide, fields["3+"])
    weights = tmp_path / "site-packages" / "her2cnn.pt"
    weights.parent.mkdir()
    shutil.copy(default_weights_path(), weights)
    out = tmp_path / "out"
    assert run_batch([slide], out, cnn_weights=weights).scored == 1
    before = _mtimes(out)
    time.sleep(0.01)
    weights.write_bytes(default_weights_path().read_bytes())  # pip reinstall: same bytes, new mtime
    rows = run_batch([slide], out, cnn_weights=weights)
    assert (rows.scored, rows.reused) == (0, 1) and _mtimes(out) == before
    assert run_batch([slide], out).scored == 1  # classical only: other settings


def test_a_batch_after_torch_ran_in_the_same_process_finishes(tmp_path, fields):
    """A notebook trains (torch's OpenMP threads start), then scores a batch with weights that have no
    exported graph beside them: the export runs before the workers fork, so none hangs in torch."""
    from her2score.cnn import default_weights_path

    slide = tmp_path / "in" / "a.png"
    slide.parent.mkdir()
    save_png(slide, fields["3+"])
    weights = tmp_path / "mine" / "her2cnn.pt"  # no her2cnn.onnx beside it
    weights.parent.mkdir()
    shutil.copy(default_weights_path(), weights)
    script = (
        "import sys, torch\n"
        "from her2score.batch import run_batch\n"
        "torch.set_num_threads(2)\n"
        "torch.ones(4_000_000).clone()  # a copy on torch's OpenMP thread pool\n"
        "rows = run_batch([sys.argv[1]], sys.argv[2], cnn_weights=sys.argv[3], workers=1)\n"
        "print(rows.scored, rows.failed)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(slide), str(tmp_path / "out"), str(weights)],
                          capture_output=True, text=True, timeout=300)  # a hang would never return
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0"]


def test_cells_csv_on_request_and_never_stale(tmp_path, three, fields):
    out = tmp_path / "out"
    names = ("field_0.png", "field_2_.png", "field_3_.png")
    assert run_batch([three], out, cells_csv=True).scored == 3
    for name in names:
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(OUTPUT_FILES + OPTIONAL_OUTPUT_FILES)
        header = (out / name / "cells.csv").read_text(encoding="utf-8").splitlines()[0]
        assert header.startswith("cell_id,") and "category" in header
    rows = run_batch([three], out)  # without the flag: the same scores, reused, their cells.csv still true
    assert (rows.scored, rows.reused) == (0, 3) and (out / "field_0.png" / "cells.csv").is_file()
    time.sleep(0.01)
    save_png(three / "field 0.png", fields["1+"])  # changed: scored again without the flag, its cells.csv goes
    assert run_batch([three], out).scored == 1
    assert not (out / "field_0.png" / "cells.csv").exists() and (out / "field_3_.png" / "cells.csv").is_file()
    rows = run_batch([three], out, cells_csv=True)  # asked for again: only the slide without one is scored
    assert (rows.scored, rows.reused) == (1, 2) and (out / "field_0.png" / "cells.csv").is_file()
    time.sleep(0.01)
    (three / "field 2+.png").write_bytes(b"")  # now fails: no stale output, cells.csv included, beside its error row;
    rows = {Path(r["slide"]).name: r for r in run_batch([three], out, cells_csv=True)}  # what it had is set aside
    assert rows["field 2+.png"]["status"] == "error"
    assert [p.name for p in (out / "field_2_.png").iterdir()] == ["previous"]
    assert sorted(p.name for p in (out / "field_2_.png" / "previous").iterdir()) == sorted(OUTPUT_FILES + OPTIONAL_OUTPUT_FILES)


def test_a_slide_that_fails_again_keeps_the_outputs_an_earlier_run_finished(tmp_path, fields, monkeypatch):
    """Run again with --mpp forgotten (or wrong), a field that has no µm/px of its own fails: its finished outputs
    were deleted (hours of a whole slide's scoring lost to a command's slip). They are set aside in previous/, the
    error says where, and the slide scored again replaces them."""
    folder = tmp_path / "slides"
    folder.mkdir()
    save_png(folder / "a.png", fields["2+"], mpp=None)
    out = tmp_path / "out"
    first = run_batch([folder], out, mpp=0.5)
    result = (out / "a.png" / "result.json").read_bytes()
    rows = run_batch([folder], out)  # no --mpp: the PNG has none
    assert rows[0]["status"] == "error" and "no microns-per-pixel" in rows[0]["error"]
    kept = out / "a.png" / "previous"
    assert rows[0]["error"].endswith(f"; the outputs an earlier run finished are kept in {kept}")
    assert sorted(p.name for p in (out / "a.png").iterdir()) == ["previous"]
    assert (kept / "result.json").read_bytes() == result and sorted(p.name for p in kept.iterdir()) == sorted(OUTPUT_FILES)
    wrong = run_batch([folder], out, mpp=5.0, config=ScoringConfig(max_scan_mpp=10.0))  # refused: nuclei 10x too large
    assert wrong[0]["status"] == "refused" and "previous" not in wrong[0]["error"]  # nothing finished to set aside
    assert (kept / "result.json").read_bytes() == result
    again = run_batch([folder], out, mpp=0.5)
    assert (again.scored, again[0]["score"]) == (1, first[0]["score"]) and not kept.exists()
    # interrupted while set aside, the outputs go back where they were (they were left in a hidden folder); a file
    # named previous is no output of the tool, and makes way
    finished = sorted(p.name for p in (out / "a.png").iterdir())

    def interrupted(src, dst):
        raise KeyboardInterrupt
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(os, "rename", interrupted)
        batch._set_aside_outputs(str(out / "a.png"))
    assert sorted(p.name for p in (out / "a.png").iterdir()) == finished
    kept.write_text("not a folder")
    assert batch._set_aside_outputs(str(out / "a.png")) == str(kept)
    assert sorted(p.name for p in kept.iterdir()) == sorted(OUTPUT_FILES) and os.listdir(out / "a.png") == ["previous"]


def test_a_folder_holding_outputs_is_never_given_to_another_slide(tmp_path, fields):
    """A failed slide's kept outputs were deleted when another day's slide of the same file name took its folder (its
    row named none), and a slide's results were overwritten by another's once manifest.json was lost: a folder holding
    a result or kept outputs goes to its own slide only. previous/ is readable as the other outputs are (it was 0700)."""
    days = [tmp_path / "monday", tmp_path / "tuesday"]
    for day, field in zip(days, ("2+", "3+")):
        day.mkdir()
        save_png(day / "y.png", fields[field], mpp=None)
    out = tmp_path / "out"
    run_batch([days[0]], out, mpp=0.5)
    result = (out / "y.png" / "result.json").read_bytes()
    failed = run_batch([days[0]], out)  # no --mpp: set aside
    kept = out / "y.png" / "previous"
    assert failed[0]["status"] == "error" and (kept / "result.json").read_bytes() == result
    assert kept.stat().st_mode & 0o777 == (out / "y.png").stat().st_mode & 0o777  # as os.mkdir makes a folder
    tuesday = run_batch([days[1]], out, mpp=0.5)
    mine = [r for r in tuesday if r["slide"] == str(days[1] / "y.png")][0]
    assert mine["status"] == "ok" and mine["output"] != "y.png" and (kept / "result.json").read_bytes() == result
    again = run_batch([days[0]], out, mpp=0.5)  # monday's slide scored again: its own folder, what was kept superseded
    assert [r["output"] for r in again if r["slide"] == str(days[0] / "y.png")] == ["y.png"] and not kept.exists()
    (out / "manifest.json").write_text('{"version": 1, "slides":')  # lost
    lost = run_batch([days[1]], out, mpp=0.5)
    assert lost[0]["output"] not in ("y.png", "") and (out / "y.png" / "result.json").read_bytes() != b""
    assert json.loads((out / "y.png" / "result.json").read_text())["slide"] == str(days[0] / "y.png")


def test_folder_names_read_only_the_folders_a_slide_would_take(tmp_path, fields, monkeypatch):
    """plan_jobs read every result.json in --out on each run (0.9 s at 10,000 folders), and a folder it may not enter
    (a disk's lost+found) crashed the batch: only the folder a new slide would take is read, an unreadable one is none
    of ours. A slide failing after a Dask batch's stop leaves the outputs an earlier run finished where they are."""
    from her2score.batch import _outputs_of, plan_jobs, process_slide

    out = tmp_path / "out"
    for i in range(3):
        (out / f"other{i}").mkdir(parents=True)
        (out / f"other{i}" / "result.json").write_text(json.dumps({"slide": f"/elsewhere/other{i}"}))
    read: list = []
    original = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: read.append(self.parent.name) or original(self, *a, **k))
    save_png(tmp_path / "new.png", fields["1+"])
    assert plan_jobs([(tmp_path / "new.png", tmp_path)], out, ScoringConfig())[0].name == "new.png" and read == []
    monkeypatch.undo()

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "is_file", denied)
    assert _outputs_of(out / "lost+found") is None
    monkeypatch.undo()
    job = plan_jobs([(tmp_path / "new.png", tmp_path)], out, ScoringConfig())[0]
    (out / job.name).mkdir()
    (out / job.name / "result.json").write_text(json.dumps({"slide": job.slide}))
    (tmp_path / "new.png").write_bytes(b"")  # it fails now
    row = process_slide(job, stopped=lambda: True)
    assert row["status"] == "error" and "previous" not in row["error"]
    assert [p.name for p in (out / job.name).iterdir()] == ["result.json"]


def test_missing_outputs_are_rebuilt(tmp_path, three):
    out = tmp_path / "out"
    run_batch([three], out)
    (out / "field_3_.png" / "overlay.png").unlink()
    before = _mtimes(out)
    run_batch([three], out)
    assert (out / "field_3_.png" / "overlay.png").is_file()
    assert _mtimes(out)["field_3_.png"] != before["field_3_.png"]


def test_a_second_batch_is_refused_while_the_lock_is_held(tmp_path, three):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        with pytest.raises(BatchError) as e:
            run_batch([three], out)
        assert str(e.value) == (f"{out}: another her2score batch (pid 4242) is writing to this folder; "
                                "wait for it or choose another --out")
        assert not (out / MANIFEST).exists()  # nothing touched
        cli = subprocess.run([sys.executable, "-m", "her2score.cli", "score", str(three), "--out", str(out), "-q"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 2 and "another her2score batch" in cli.stderr
    assert len(run_batch([three], out)) == 3  # released: runs


def test_unusable_out_is_a_batch_error(tmp_path, three):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BatchError, match=r"file: --out exists and is not a folder"):
        run_batch([three], tmp_path / "file")


def test_stale_temporary_files_are_removed_on_start(tmp_path, three):
    out = tmp_path / "out"
    run_batch([three], out)
    stale = [out / ".manifest.json.k3j2h1g0.tmp", out / ".summary.csv.abcdefgh.tmp",
             out / "field_2_.png" / ".result.json.x1y2z3w4.tmp", out / "field_2_.png" / ".overlay.png.q_w_e_r_.tmp",
             out / "field_2_.png" / ".cells.csv.abcdefgh.tmp"]
    keep = [out / "notes.tmp", out / ".mine.txt.abcdefgh.tmp", out / "field_2_.png" / ".result.json.tmp.bak"]
    for p in stale + keep:
        p.write_bytes(b"partial")
    run_batch([three], out)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


def test_outputs_are_readable_by_the_group(tmp_path, three):
    old = os.umask(0o022)
    try:
        run_batch([three], tmp_path / "out")
        atomic_write(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    for p in [tmp_path / "x.txt", tmp_path / "out" / "summary.csv", *(tmp_path / "out" / "field_0.png").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_out_inside_the_input_folder_is_not_rescanned(tmp_path, three):
    out = three / "results"
    run_batch([three], out)
    rows = run_batch([three], out)
    assert len(rows) == 3 and all("results" not in r["slide"] for r in rows)


def test_the_same_slide_given_twice_is_scored_once(tmp_path, three):
    slide = three / "field 0.png"
    found, problems = discover([three, slide, Path(os.path.relpath(slide))])
    assert problems == [] and len(found) == 3
    rows = run_batch([three, slide], tmp_path / "out")
    assert len(rows) == 3


def test_forked_children_do_not_keep_the_lock(tmp_path):
    """A process forked while the batch holds its lock (a worker, a worker's worker) does not hold
    it: if the batch is killed and the child lives on, the next batch can still start."""
    from her2score import batch

    fh = batch._lock(tmp_path)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child outlives the lock holder
        os.write(w, b"x")
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(r, 1) == b"x"  # the child is running (its fork hooks have run)
        batch._unlock(fh)
        with open(tmp_path / LOCK) as other:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the child held it
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)



def test_default_mpp_serves_the_files_without_one_and_no_other(tmp_path, fields, pyramid_tiff):
    """A scan with its µm/px (0.25) and a snapshot without in one batch: --mpp would override the scan's too
    (it then fails QC), so --default-mpp gives the snapshot's alone, and each result says where its µm/px came from."""
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(pyramid_tiff, folder / "scan.tif")
    save_png(folder / "snapshot.png", fields["2+"], mpp=None)
    refused = {Path(r["slide"]).name: r for r in run_batch([folder], tmp_path / "plain")}
    assert refused["snapshot.png"]["status"] == "error" and "no microns-per-pixel" in refused["snapshot.png"]["error"]
    rows = {Path(r["slide"]).name: r for r in run_batch([folder], tmp_path / "out", default_mpp=0.5)}
    assert [rows[n]["status"] for n in ("scan.tif", "snapshot.png")] == ["ok", "ok"], rows
    scan, snap = (json.loads((tmp_path / "out" / rows[n]["output"] / "result.json").read_text()) for n in ("scan.tif", "snapshot.png"))
    assert scan["mpp"] == pytest.approx(0.25) and "µm/px 0.25 from metadata" in scan["notes"] and scan["mpp_origin"] == "metadata"
    assert snap["mpp_origin"] == "default"
    assert snap["mpp"] == 0.5 and "µm/px 0.5 from the default given (no microns-per-pixel in the file's metadata)" in snap["notes"]
    code = main(["score", str(folder), "--out", str(tmp_path / "both"), "--mpp", "0.5", "--default-mpp", "0.5"])
    assert code == 2 and not (tmp_path / "both").exists()
    # another default scores again the slides that used it, and only those (the scan was scored again each time)
    again = run_batch([folder], tmp_path / "out", default_mpp=0.45)
    assert again.reused == 1 and again.scored == 1
    snap = json.loads((tmp_path / "out" / rows["snapshot.png"]["output"] / "result.json").read_text())
    assert snap["mpp"] == 0.45
    gone = {Path(r["slide"]).name: r["status"] for r in run_batch([folder], tmp_path / "out")}
    assert gone == {"scan.tif": "ok", "snapshot.png": "error"}
    wrong = {Path(r["slide"]).name: r for r in run_batch([folder], tmp_path / "wrong", default_mpp=2.0)}
    assert wrong["scan.tif"]["status"] == "ok" and wrong["snapshot.png"]["status"] == "refused"  # it said: give --mpp
    assert wrong["snapshot.png"]["error"].endswith("the µm/px is wrong; give the scan's --mpp (this image has no µm/px "
                                                   "of its own: 2 was the default given, --default-mpp; default_mpp= "
                                                   "in the Python API)")


def test_an_unknown_backend_is_refused_before_any_work(tmp_path, three):
    with pytest.raises(ValueError, match="unknown backend 'pillow'; use 'tifffile', 'openslide' or 'image'"):
        run_batch([three], tmp_path / "out", backend="pillow")
    assert not (tmp_path / "out").exists()


def test_tile_workers_open_a_slide_at_its_default_mpp(tmp_path, fields):
    """A snapshot without µm/px scored with its tiles in two processes: each worker opens it again, which without
    the default given refused it (the batch then ran it again in one process, hiding the fault)."""
    from her2score.pipeline import analyse_slide

    big = save_png(tmp_path / "big.png", np.tile(fields["2+"], (2, 2, 1)), mpp=None)
    one = analyse_slide(big, config=SMALL_TILES, default_mpp=0.5).result
    two = analyse_slide(big, config=SMALL_TILES, default_mpp=0.5, workers=2).result
    assert two == one and one.mpp == 0.5

# --------------------------------------------------------------------------- determinism

def _result_bytes(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(out.glob("*/result.json"))}


def test_result_json_is_identical_across_runs_and_tile_workers(tmp_path, pyramid_tiff):
    """One slide, 12 tiles: workers=1 vs workers=2 (its tiles in two processes), and a repeat run."""
    slide = tmp_path / "slides" / "slide.tif"
    slide.parent.mkdir()
    shutil.copy(pyramid_tiff, slide)
    results, cells = [], []
    for i, workers in enumerate((1, 2, 1)):
        out = tmp_path / f"out{i}"
        rows = run_batch([slide], out, config=SMALL_TILES, workers=workers)
        assert rows[0]["status"] == "ok", rows[0]["error"]
        results.append(_result_bytes(out))
        cells.append([(out / "slide.tif" / name).read_bytes() for name in ("cells.parquet", "cells.geojson")])
    assert results[0] == results[1] == results[2]
    assert cells[0] == cells[1] == cells[2]
    result = json.loads(results[0]["slide.tif"])
    assert result["tumour_cells"] > 0 and result["config"]["tile_px"] == 128
    assert not any(k in result for k in ("time", "timestamp", "created", "date"))


def test_result_json_is_identical_across_slide_workers(tmp_path, three):
    a, b = tmp_path / "one", tmp_path / "two"
    run_batch([three], a, workers=1)
    run_batch([three], b, workers=2)
    assert _result_bytes(a) == _result_bytes(b) and len(_result_bytes(a)) == 3
    assert (a / "summary.csv").read_bytes() == (b / "summary.csv").read_bytes()


# --------------------------------------------------------------------------- a worker dies

def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def test_a_tile_worker_that_dies_makes_its_slide_an_error_row(tmp_path, three, pyramid_tiff, monkeypatch):
    """A slide's own tile worker killed (the OOM killer, a crashing reader): the slide's row says its
    process died, as when the process scoring the slide dies, and nothing of it is left in --out."""
    from her2score import pipeline

    shutil.copy(pyramid_tiff, three / "slide.tif")
    monkeypatch.setattr(pipeline, "_read_and_score", lambda *a, **k: os._exit(9))  # in the forked tile workers
    rows = {Path(r["slide"]).name: r for r in run_batch([three / "slide.tif"], tmp_path / "out", config=SMALL_TILES, workers=2)}
    assert rows["slide.tif"]["status"] == "error"
    assert "the process scoring this slide died (BrokenProcessPool)" in rows["slide.tif"]["error"]
    assert not (tmp_path / "out" / "slide.tif" / "result.json").exists()



def test_a_tile_worker_that_dies_once_has_its_slide_run_again(tmp_path, pyramid_tiff, monkeypatch):
    """A slide's tile worker killed once (the OOM killer): as when the process scoring a slide dies, the slide is
    run again in a fresh process, scoring its tiles itself, and finishes with the outputs of a clean run (it was
    an error row at once, where slides scored side by side were run again)."""
    from her2score import pipeline

    slide = tmp_path / "slides" / "slide.tif"
    slide.parent.mkdir()
    shutil.copy(pyramid_tiff, slide)
    clean = run_batch([slide], tmp_path / "clean", config=SMALL_TILES, workers=1)
    flag, read_and_score = tmp_path / "died", pipeline._read_and_score

    def dies_once(*a, **k):  # the forked tile workers see the flag the first death leaves
        if not flag.exists():
            flag.touch()
            os._exit(9)
        return read_and_score(*a, **k)

    monkeypatch.setattr(pipeline, "_read_and_score", dies_once)
    runs, analyse = tmp_path / "runs", batch.analyse_slide

    def recorded(*a, **k):  # each run's tile workers, in the process scoring the slide
        with open(runs, "a") as fh:
            fh.write(f"{k['workers']}\n")
        return analyse(*a, **k)

    monkeypatch.setattr(batch, "analyse_slide", recorded)
    rows = run_batch([slide], tmp_path / "out", config=SMALL_TILES, workers=2)
    assert flag.exists() and rows[0]["status"] == "ok", rows[0]["error"]
    assert runs.read_text().split() == ["2", "1"]  # run again alone, its tiles in its own process
    assert _result_bytes(tmp_path / "out") == _result_bytes(tmp_path / "clean") and clean[0]["status"] == "ok"


def test_two_slides_of_one_size_swapped_by_mv_are_scored_again(tmp_path, fields):
    """Uncompressed TIFF fields of one size and time, swapped with mv (name, size and time each stay with the
    path): each result followed the path, and a resumed batch reported the 3+ file's old 0."""
    import tifffile

    folder = tmp_path / "slides"
    folder.mkdir()
    for name, score in (("a.tif", "0"), ("b.tif", "3+")):
        tifffile.imwrite(folder / name, fields[score], photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        os.utime(folder / name, ns=(1_700_000_000_000_000_000,) * 2)
    first = {Path(r["slide"]).name: r["score"] for r in run_batch([folder], tmp_path / "out")}
    assert first == {"a.tif": "0", "b.tif": "3+"} and (folder / "a.tif").stat().st_size == (folder / "b.tif").stat().st_size
    os.rename(folder / "a.tif", folder / "t.tif")
    os.rename(folder / "b.tif", folder / "a.tif")
    os.rename(folder / "t.tif", folder / "b.tif")
    rows = run_batch([folder], tmp_path / "out")
    assert {Path(r["slide"]).name: r["score"] for r in rows} == {"a.tif": "3+", "b.tif": "0"}
    assert rows.reused == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses FIFOs and /proc")
def test_a_fifo_among_the_slides_is_an_error_row_and_never_blocks_the_batch(tmp_path, good_png):
    """A FIFO named like a slide: refused by the worker, then the batch hung for good sampling its content to
    record the row (opening a FIFO to read waits for a writer), deaf to SIGTERM and Ctrl-C."""
    from her2score.files import content_sample

    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(good_png, folder / "a.png")
    os.mkfifo(folder / "b.png")
    raised = []

    def sample():  # in a thread, so that a regression fails this test instead of hanging the suite
        try:
            content_sample(folder / "b.png")
        except OSError as e:
            raised.append(str(e))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive() and raised and "not a regular file" in raised[0]
    open_fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match=f"not a regular file: '{folder}'"):  # a folder: named, its descriptor closed
        content_sample(folder)
    assert len(os.listdir("/proc/self/fd")) == open_fds
    proc = subprocess.run([sys.executable, "-m", "her2score", "score", str(folder), "--out", str(tmp_path / "out"),
                           "--no-cnn", "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    rows = {Path(r["slide"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "summary.csv", encoding="utf-8"))}
    assert rows["a.png"]["status"] == "ok" and rows["b.png"]["status"] in ("error", "refused")
    assert "b.png" in rows["b.png"]["error"]

def test_a_backend_that_is_the_files_own_reader_is_no_setting_of_the_job(tmp_path, good_png):
    """A Job forces a reader only where it is not the one its file chooses (the same reads, the same key: a slide
    scored without --backend is reused with it); a file that chooses none, a FIFO among them, keeps the reader
    given, and is never read to ask (its first bytes would wait for a writer)."""
    from her2score.batch import plan_jobs

    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(good_png, folder / "a.png")
    os.mkfifo(folder / "b.png")
    slides = [(folder / "a.png", folder), (folder / "b.png", folder)]
    planned = {}

    def plan():  # in a thread, so that a regression fails this test instead of hanging the suite
        for backend in (None, "image", "tifffile"):
            planned[backend] = [j.backend for j in plan_jobs(slides, tmp_path / "out", ScoringConfig(), backend=backend)]

    t = threading.Thread(target=plan, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive() and planned == {None: [None, None], "image": [None, "image"], "tifffile": ["tifffile", "tifffile"]}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_a_worker_killed_mid_slide_does_not_stop_the_batch(tmp_path, three, pyramid_tiff):
    """SIGKILL the process scoring a slide: its slides are run again, one by one, and all finish."""
    shutil.copy(pyramid_tiff, three / "slide.tif")
    killed = []

    def killer():
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            for pid in _children(os.getpid()):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
                break
            time.sleep(0.002)

    t = threading.Thread(target=killer)
    t.start()
    rows = run_batch([three], tmp_path / "out", workers=2)
    t.join()
    assert killed, "no worker process seen"
    assert [r["status"] for r in rows] == ["ok"] * 4, [r["error"] for r in rows]
    for r in rows:
        assert sorted(p.name for p in (tmp_path / "out" / r["output"]).iterdir()) == sorted(OUTPUT_FILES)


def test_a_worker_dying_while_slides_are_still_handed_out_does_not_stop_the_batch(tmp_path, three, monkeypatch):
    """A worker SIGKILLed after the first slide is handed out and before the next: the pool is broken when the batch
    submits again, and the slides are run again as after any death (submit raised BrokenProcessPool out of run_batch)."""
    from contextlib import contextmanager

    real_pool, killed = batch._pool, []

    @contextmanager
    def dying_pool(n):
        with real_pool(n) as pool:
            submit = pool.submit

            def submit_then_kill(fn, *args):
                future = submit(fn, *args)
                if not killed:
                    killed.append(next(iter(pool._processes)))
                    os.kill(killed[0], signal.SIGKILL)
                    deadline = time.monotonic() + 30
                    while not pool._broken and time.monotonic() < deadline:  # the pool's own thread sees the death
                        time.sleep(0.01)
                return future

            pool.submit = submit_then_kill
            yield pool

    monkeypatch.setattr(batch, "_pool", dying_pool)
    rows = run_batch([three], tmp_path / "out", workers=2)
    assert killed and [r["status"] for r in rows] == ["ok"] * 3, [r["error"] for r in rows]


def test_an_earlier_runs_failed_slides_stay_listed(tmp_path, fields):
    """summary.csv lists every slide in --out: a slide an earlier run could not score keeps its row when a
    later run into the same --out scores other slides (it was dropped)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_png(tmp_path / "a" / "good.png", fields["1+"])
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "a" / "scan.czi").write_bytes(b"ZISRAWFILE")  # a slide format the tool knows and cannot read
    save_png(tmp_path / "b" / "other.png", fields["2+"])
    out = tmp_path / "out"
    run_batch([tmp_path / "a"], out)
    rows = run_batch([tmp_path / "b"], out)
    status = {Path(r["slide"]).name: r["status"] for r in rows}
    assert status == {"good.png": "ok", "broken.png": "error", "scan.czi": "error", "other.png": "ok"}
    with open(out / "summary.csv", newline="") as fh:
        assert {Path(r["slide"]).name: r["status"] for r in csv.DictReader(fh)} == status


def test_a_full_output_disk_stops_the_batch_naming_the_output_folder(tmp_path, three, monkeypatch, capsys):
    """On a full disk every remaining slide was still scored, each given an error row that named the slide
    ("[Errno 28] No space left on device"), as if the slide were bad. A full, over-quota or read-only output
    folder stops the batch with one line naming it; finished slides are kept, and the same command resumes.
    Another write error names the output folder, not the slide, and the batch goes on. (The fault is injected
    into the outputs' writing: filling a real disk needs a mount this suite may not make.)"""
    import her2score.batch as batch_module

    real_write = batch_module.write_outputs

    def write(analysis, out_dir, **kw):
        if Path(analysis.result.slide).name == "field 2+.png":
            raise OSError(errno_code, os.strerror(errno_code), str(Path(out_dir) / "cells.geojson"))
        return real_write(analysis, out_dir, **kw)

    import errno as errno_module

    bad_name = batch_module.safe_name("field 2+.png")
    monkeypatch.setattr(batch_module, "write_outputs", write)
    errno_code = errno_module.EACCES
    rows = {Path(r["slide"]).name: r for r in run_batch([three], tmp_path / "out1")}
    bad = rows["field 2+.png"]
    assert bad["status"] == "error" and f"{tmp_path / 'out1' / bad_name}: cannot write the outputs (Permission denied)" in bad["error"]
    assert "[Errno" not in bad["error"]
    assert [rows[n]["status"] for n in ("field 0.png", "field 3+.png")] == ["ok", "ok"]
    errno_code = errno_module.ENOSPC
    assert main(["score", str(three), "--out", str(tmp_path / "out2"), "-q", "--no-cnn", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"her2score score: {tmp_path / 'out2' / bad_name}: cannot write the outputs (No space left on device); "
                          "stopped. Finished slides are kept"), err
    summary = (tmp_path / "out2" / "summary.csv").read_text()
    assert "field 0.png" in summary and "field 2+.png" not in summary and not (tmp_path / "out2" / bad_name / "result.json").exists()
    monkeypatch.setattr(batch_module, "write_outputs", real_write)
    assert main(["score", str(three), "--out", str(tmp_path / "out2"), "-q", "--no-cnn"]) == 0  # resumed: the rest


def test_a_slide_folder_moved_or_renamed_is_resumed_not_scored_twice(tmp_path, three):
    """After the slide folder was renamed (or a share mounted elsewhere) every slide was scored again and listed
    twice in summary.csv, under its old path (gone) and its new one. A file gone from its recorded path whose
    name, size and modification time one new input shares is that file moved: its result is reused, listed
    once, and its result.json names it where it is now."""
    out = tmp_path / "out"
    first = run_batch([three], out)
    assert first.scored == 3
    moved = tmp_path / "renamed"
    three.rename(moved)
    again = run_batch([moved], out)
    assert (again.scored, again.reused) == (0, 3)
    with open(out / "summary.csv", newline="") as fh:
        slides = sorted(r["slide"] for r in csv.DictReader(fh))
    assert slides == sorted(str(moved / p.name) for p in moved.iterdir())
    for row in again:
        assert json.loads((out / row["output"] / "result.json").read_text())["slide"] == row["slide"]
    # a refused run (other settings for part of the folder) changes nothing: the next plain run still resumes
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    again2 = tmp_path / "again2"
    moved.rename(again2)
    with pytest.raises(BatchError):
        run_batch([again2 / "field 0.png"], out, config=ScoringConfig(min_tumour_cells=10))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps
    assert run_batch([again2], out).reused == 3
    again2.rename(moved)
    assert run_batch([moved], out).reused == 3
    # another file of the same name, size and modification time (one archive's slides, extracted) is no move
    other = tmp_path / "other"
    other.mkdir()
    first_png = sorted(moved.iterdir())[0]
    twin = other / first_png.name
    data = bytearray(first_png.read_bytes())
    data[-100:-90] = bytes(10)  # same size, other pixels' bytes near the end
    twin.write_bytes(bytes(data))
    os.utime(twin, ns=(first_png.stat().st_atime_ns, first_png.stat().st_mtime_ns))
    first_png.unlink()
    assert run_batch([other], out).scored == 1
    copied = tmp_path / "copied"  # a copy that keeps no modification time, the original gone: new files, scored
    shutil.copytree(moved, copied, copy_function=shutil.copy)
    for p in copied.iterdir():
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    shutil.rmtree(moved)
    assert run_batch([copied], out).scored == len(list(copied.iterdir())) == 2
