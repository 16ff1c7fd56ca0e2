"""Issue 5: every bad input gets a clear answer naming the file, the batch goes on, names are
untrusted, and a batch killed with SIGKILL (several times) resumes with nothing lost or duplicated.

Each bad-input case is checked twice: the exact message at the API level (open_slide /
score_slide), and a run_batch over a folder holding the bad file beside one good slide, which
must finish the good slide and record an error row for the bad one (also in summary.csv).
"""
from __future__ import annotations

import csv
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import save_png, save_png16_rgb, save_tiff, truncated_copy, write_bad
from her2score.batch import MANIFEST, BatchError, run_batch, safe_name
from her2score.outputs import OUTPUT_FILES
from her2score.pipeline import NoTissueError, NuclearStainError, WrongStainError, score_slide
from her2score.region import RegionError
from her2score.slide import SLIDE_SUFFIXES, NotHerIhcError, SlideError, open_slide
from her2score.synthetic import generate_field, make_slide, write_pyramidal_tiff

GOOD = "good 2+.png"
GREY = "greyscale image; HER2 scoring needs RGB colour to separate DAB from haematoxylin"
NO_TISSUE = "no tissue found (blank, fully white or black slide, or only fragments under 1,000 µm²)"
EOSIN = (r"\d+% of stained tissue has the colour of eosin: this looks like an H&E slide \(or a red chromogen: AEC, Fast Red\), "
         r"not a HER2 \(H-DAB\) immunostain; not scored")


def _api_error(path, *, mpp=None, score=True) -> SlideError:
    """The SlideError for ``path``: from open_slide, or (if it opens) from score_slide."""
    try:
        with open_slide(path, mpp=mpp):
            pass
    except SlideError as e:
        return e
    if not score:
        raise AssertionError(f"{path} opened")
    with pytest.raises(SlideError) as e:
        score_slide(path, mpp=mpp)
    return e.value


def _batch(tmp_path, inputs, **kw) -> dict[str, dict]:
    """run_batch into tmp_path/out; checks summary.csv matches the rows and the good slide is scored."""
    out = tmp_path / "out"
    rows = run_batch([str(i) for i in inputs], out, **kw)
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["slide"] for r in table] == [r["slide"] for r in rows]
    assert [r["status"] for r in table] == [r["status"] for r in rows]
    assert [r["error"] for r in table] == [r["error"] for r in rows]
    by = {Path(r["slide"]).name: r for r in rows}
    if GOOD in by:
        good = by[GOOD]
        assert good["status"] == "ok" and good["score"] in ("0", "1+", "2+", "3+") and good["error"] == ""
        assert (out / "good_2_.png" / "result.json").is_file()
    return by


def _batch_error(tmp_path, folder, bad: Path, message: str | None = None, pattern: str | None = None,
                 status: str = "error", **kw) -> str:
    by = _batch(tmp_path, [folder], **kw)
    row = by[bad.name]
    assert row["status"] == status and row["score"] == ""
    assert row["slide"] == str(bad)
    if message is not None:
        assert row["error"] == message
    if pattern is not None:
        assert re.fullmatch(pattern, row["error"]), row["error"]
    assert not (tmp_path / "out" / safe_name(bad.name) / "result.json").exists()
    return row["error"]


# --------------------------------------------------------------------------- one test per case

def test_zero_byte_file(tmp_path, slide_folder, fields, pyramid_tiff):
    bad = write_bad("zero_byte", slide_folder, fields=fields, pyramid=pyramid_tiff)
    msg = f"{bad}: empty file (0 bytes)"
    assert str(_api_error(bad)) == msg
    _batch_error(tmp_path, slide_folder, bad, msg)


def test_truncated_tiff(tmp_path, slide_folder, fields, pyramid_tiff):
    """Cut in half: the second level's directory is gone; the error is raised at open, by both
    backends, and again whenever scoring is attempted."""
    bad = write_bad("truncated_tiff", slide_folder, fields=fields, pyramid=pyramid_tiff)
    pattern = re.escape(str(bad)) + r": truncated TIFF: image directory 1 should start at byte \d+ but the file ends at byte \d+"
    assert re.fullmatch(pattern, str(_api_error(bad)))
    assert re.fullmatch(pattern, str(_api_error(bad, score=False)))
    for backend in ("tifffile", "openslide"):
        with pytest.raises(SlideError) as e:
            open_slide(bad, backend=backend)
        assert re.fullmatch(pattern, str(e.value))
    with pytest.raises(SlideError) as e:
        score_slide(bad)
    assert re.fullmatch(pattern, str(e.value))
    _batch_error(tmp_path, slide_folder, bad, pattern=pattern)


def test_tiff_with_tile_data_cut_off(tmp_path, slide_folder, pyramid_tiff):
    """Cut near the end: every directory is intact but tiles point past the end of the file."""
    bad = truncated_copy(pyramid_tiff, slide_folder / "cut.tif", fraction=0.97)
    pattern = re.escape(str(bad)) + r": truncated TIFF: \d+ of \d+ tiles/strips of level 1 lie past the end of the file \(\d+ bytes; the data run to byte \d+\)"
    assert re.fullmatch(pattern, str(_api_error(bad)))
    with pytest.raises(SlideError) as e:
        score_slide(bad)
    assert re.fullmatch(pattern, str(e.value))
    _batch_error(tmp_path, slide_folder, bad, pattern=pattern)


def test_a_corrupt_tile_read_by_a_tile_worker_is_named(tmp_path):
    """A tile that fails to decode in a tile worker (a slide alone in a batch gets all the workers) is
    named in the error as when read in one process, not lost as a broken process pool."""
    rgb, _ = make_slide("2+", seed=5, size_px=(3072, 768), mpp=0.5, tissue_fraction=0.9)
    (tmp_path / "in").mkdir()
    bad = write_pyramidal_tiff(tmp_path / "in" / "bad tile.tif", rgb, mpp=0.5, quality=85)
    with tifffile.TiffFile(bad) as t:  # level 0's tile at row 1, column 10 of 12: away from the stain check's read
        page = t.pages[0]
        index = -(-page.imagewidth // page.tilewidth) + 10
        at = int(page.dataoffsets[index])
    with open(bad, "r+b") as f:
        f.seek(at)
        f.write(bytes(16))  # no JPEG marker: the decoder refuses the tile
    pattern = re.escape(str(bad)) + rf": corrupt image data in tile/strip {index} of level 0 \(Jpeg8Error: .+\)"
    for workers in (1, 2):
        with pytest.raises(SlideError) as e:
            score_slide(bad, workers=workers)
        assert re.fullmatch(pattern, str(e.value)), (workers, str(e.value))
    row = run_batch([bad], tmp_path / "out", workers=2)[0]  # one slide, two workers: its tiles side by side
    assert row["status"] == "error" and re.fullmatch(pattern, row["error"]), row["error"]


@pytest.mark.parametrize("cls", [SlideError, NotHerIhcError, WrongStainError, NoTissueError, NuclearStainError, RegionError])
def test_errors_raised_in_a_worker_process_reach_the_caller_whole(cls):
    """Pickled to and from a worker process, each error keeps its class, path, reason and message."""
    error = cls("/slides/a b.svs", "corrupt image data in tile/strip 9 of level 1")
    with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        with pytest.raises(cls) as e:
            pool.submit(_raise, error).result()
    assert (type(e.value), str(e.value), e.value.path, e.value.reason) == (cls, str(error), error.path, error.reason)


def _raise(error: Exception) -> None:
    raise error


@pytest.mark.parametrize("kind,suffix", [("text_as_png", ".png"), ("text_as_tif", ".tif")])
def test_non_image_with_an_image_extension(tmp_path, slide_folder, fields, pyramid_tiff, kind, suffix):
    bad = write_bad(kind, slide_folder, fields=fields, pyramid=pyramid_tiff)
    msg = f"{bad}: not an image: named {suffix} but its content is not PNG, JPEG, BMP or TIFF (it starts with b'Patient ')"
    assert str(_api_error(bad)) == msg
    _batch_error(tmp_path, slide_folder, bad, msg)


@pytest.mark.parametrize("kind", ["unsupported_xyz", "unsupported_docx"])
def test_unsupported_format(tmp_path, slide_folder, fields, pyramid_tiff, caplog, kind):
    """Named explicitly: an error row. Found while searching a folder: not a slide format, so it is
    skipped, listed in the manifest and in a warning (slide folders hold notes, sheets, XML)."""
    bad = write_bad(kind, tmp_path, fields=fields, pyramid=pyramid_tiff)
    msg = f"{bad}: unsupported format '{bad.suffix}'; supported: {', '.join(SLIDE_SUFFIXES)}"
    assert str(_api_error(bad)) == msg
    by = _batch(tmp_path, [slide_folder, bad])
    assert by[bad.name]["status"] == "error" and by[bad.name]["error"] == msg
    # the same file inside the slide folder
    shutil.copy(bad, slide_folder / bad.name)
    with caplog.at_level(logging.WARNING, logger="her2score.batch"):
        by = _batch(tmp_path, [slide_folder])
    assert set(by) == {GOOD}
    assert f"skipped 1 file that is not a slide: {bad.name}" in caplog.text
    skipped = json.loads((tmp_path / "out" / MANIFEST).read_text(encoding="utf-8"))["skipped"]
    assert skipped == [[str(slide_folder / bad.name), "not a slide format"]]


def test_known_but_unsupported_slide_format_in_a_folder(tmp_path, slide_folder):
    """A vendor format the tool cannot read is not silently skipped: it gets an error row."""
    bad = slide_folder / "scan.czi"
    bad.write_bytes(b"ZISRAWFILE" + bytes(50))
    msg = (f"{bad}: unsupported format '.czi'; convert it to PNG or TIFF (a whole slide: a tiled pyramidal TIFF; "
           f"supported: {', '.join(SLIDE_SUFFIXES)})")
    assert str(_api_error(bad)) == msg
    _batch_error(tmp_path, slide_folder, bad, msg)


def test_tiff_header_bomb_refused_before_allocation(tmp_path, slide_folder, fields, pyramid_tiff):
    bad = write_bad("tiff_bomb", slide_folder, fields=fields, pyramid=pyramid_tiff)
    assert bad.stat().st_size < 300
    msg = (f"{bad}: header claims 10000000 x 10000000 pixels, beyond the 2097152 limit "
           "(corrupt file or decompression bomb); refused before reading")
    open_slide(slide_folder / GOOD).close()  # imports done before measuring
    tracemalloc.start()
    with pytest.raises(SlideError) as e:
        open_slide(bad, mpp=0.5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(e.value) == msg
    assert peak < 1_000_000, f"{peak} bytes allocated while refusing a bomb"
    _batch_error(tmp_path, slide_folder, bad, msg)


def test_png_header_bomb_refused_before_allocation(tmp_path, slide_folder, fields, pyramid_tiff):
    bad = write_bad("png_bomb", slide_folder, fields=fields, pyramid=pyramid_tiff)
    tracemalloc.start()
    e = _api_error(bad, mpp=0.5, score=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    pattern = re.escape(f"{bad}: header claims 10000000 x 10000000 pixels, beyond the 2097152 limit (corrupt file or "
                        "decompression bomb); refused before reading")
    assert re.fullmatch(pattern, str(e)) and peak < 1_000_000
    _batch_error(tmp_path, slide_folder, bad, pattern=pattern)


@pytest.mark.parametrize("kind,reason", [
    ("grey_png", GREY), ("grey_tif", GREY), ("grey16_png", "16-bit " + GREY), ("grey16_tif", "16-bit " + GREY),
])
def test_greyscale_images(tmp_path, slide_folder, fields, pyramid_tiff, kind, reason):
    """A greyscale image is no H-DAB image: refused (as H&E is), not an error of reading."""
    bad = write_bad(kind, slide_folder, fields=fields, pyramid=pyramid_tiff)
    msg = f"{bad}: {reason}"
    e = _api_error(bad)
    assert str(e) == msg and isinstance(e, NotHerIhcError)
    _batch_error(tmp_path, slide_folder, bad, msg, status="refused")


def test_16bit_rgb_is_scaled_to_8bit_and_scored(tmp_path, slide_folder, fields):
    """16-bit RGB (PNG and TIFF) is accepted: scaled to 8 bits, read exactly as the 8-bit image, noted."""
    rgb = fields["2+"]
    png16 = save_png16_rgb(slide_folder / "sixteen.png", rgb.astype(np.uint16) * 257)
    tif16 = save_tiff(slide_folder / "sixteen.tif", rgb.astype(np.uint16) * 257, photometric="rgb")
    reference = score_slide(slide_folder / GOOD)
    for path in (png16, tif16):
        with open_slide(path) as s:
            assert s.mpp == pytest.approx(0.5) and s.notes == ("16-bit samples scaled to 8 bits",)
            assert np.array_equal(s.read_region((0, 0), (384, 384), mpp=0.5), rgb)
        r = score_slide(path)
        assert (r.score, r.counts, r.h_score) == (reference.score, reference.counts, reference.h_score)
    by = _batch(tmp_path, [slide_folder])
    assert by["sixteen.png"]["status"] == by["sixteen.tif"]["status"] == "ok"
    assert by["sixteen.png"]["score"] == by["sixteen.tif"]["score"] == by[GOOD]["score"]


def test_rgba_png_is_composited_over_white_and_scored(tmp_path, slide_folder, fields):
    rgb = fields["2+"]
    opaque = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    path = save_png(slide_folder / "rgba.png", opaque)
    with open_slide(path) as s:
        assert np.array_equal(s.read_region((0, 0), (384, 384), mpp=0.5), rgb)
    reference = score_slide(slide_folder / GOOD)
    assert score_slide(path).counts == reference.counts
    holed = opaque.copy()
    holed[:100, :, 3] = 0  # transparent band: glass
    holed[100:150, :, 3] = 128  # half transparent: half way to white
    hpath = save_png(slide_folder / "rgba-transparent.png", holed)
    with open_slide(hpath) as s:
        got = s.read_region((0, 0), (384, 384), mpp=0.5)
    assert (got[:100] == 255).all()
    expected = (rgb[100:150].astype(np.float32) * 128 / 255 + 255 * 127 / 255 + 0.5).astype(np.uint8)
    assert np.abs(got[100:150].astype(int) - expected).max() <= 1
    by = _batch(tmp_path, [slide_folder])
    assert by["rgba.png"]["status"] == by["rgba-transparent.png"]["status"] == "ok"
    assert by["rgba.png"]["score"] == by[GOOD]["score"]


@pytest.mark.parametrize("kind", ["white", "black"])
def test_blank_slides_have_no_tissue(tmp_path, slide_folder, fields, pyramid_tiff, kind):
    bad = write_bad(kind, slide_folder, fields=fields, pyramid=pyramid_tiff)
    e = _api_error(bad)
    assert isinstance(e, NoTissueError) and str(e) == f"{bad}: {NO_TISSUE}"
    _batch_error(tmp_path, slide_folder, bad, f"{bad}: {NO_TISSUE}", status="refused")


def test_a_field_too_small_to_hold_tissue_says_so(tmp_path, slide_folder, fields):
    """A crop of a good field 30 µm across (or a wrong µm/px) is refused with its size, not as blank."""
    small = save_png(slide_folder / "crop.png", fields["2+"][:60, :60])
    e = _api_error(small)
    assert isinstance(e, NoTissueError)
    assert str(e) == (f"{small}: no tissue found: the image is only 30 x 30 µm at 0.5 µm/px, and tissue is a piece of at "
                      "least 1,000 µm² (check the µm/px, or give a larger field)")
    strip = save_png(slide_folder / "strip.png", np.tile(fields["2+"][:20], (1, 40, 1)))  # 10 µm tall, 7.7 mm long: no piece fits
    e = _api_error(strip)
    assert isinstance(e, NoTissueError) and "the image is only 7680 x 10 µm at 0.5 µm/px" in str(e)


def test_he_slide_is_the_wrong_stain_not_a_zero(tmp_path, slide_folder, fields, pyramid_tiff):
    bad = write_bad("he", slide_folder, fields=fields, pyramid=pyramid_tiff)
    e = _api_error(bad)
    assert isinstance(e, WrongStainError)
    assert re.fullmatch(re.escape(str(bad)) + ": " + EOSIN, str(e))
    # a true HER2 0 (haematoxylin only, no DAB) is scored 0, not refused
    zero = save_png(slide_folder / "her2-zero.png", fields["0"])
    assert score_slide(zero).score == "0"
    by = _batch(tmp_path, [slide_folder])
    assert by["her2-zero.png"]["status"] == "ok" and by["her2-zero.png"]["score"] == "0"
    assert by[bad.name]["status"] == "refused" and re.fullmatch(re.escape(str(bad)) + ": " + EOSIN, by[bad.name]["error"])


def test_slide_without_mpp(tmp_path, slide_folder, fields, pyramid_tiff):
    bad = write_bad("no_mpp", slide_folder, fields=fields, pyramid=pyramid_tiff)
    msg = (f"{bad}: no microns-per-pixel in the file's metadata; pass --mpp (e.g. --mpp 0.5; mpp=0.5 in the Python API), "
           "or --default-mpp for the files without one in a batch of scans and snapshots")
    assert str(_api_error(bad)) == msg
    _batch_error(tmp_path, slide_folder, bad, msg)
    # with --mpp it is scored, and the good slide keeps its own metadata
    by = _batch(tmp_path, [slide_folder], mpp=0.5)
    assert by[bad.name]["status"] == "ok"
    result = json.loads((tmp_path / "out" / "no-mpp.png" / "result.json").read_text(encoding="utf-8"))
    assert result["mpp"] == 0.5 and "µm/px 0.5 from user" in result["notes"] and result["mpp_origin"] == "user"


def test_path_that_does_not_exist(tmp_path, slide_folder):
    missing = tmp_path / "nowhere" / "slide.svs"
    assert str(_api_error(missing)) == f"{missing}: no such file"
    by = _batch(tmp_path, [slide_folder, missing])
    assert by["slide.svs"] == {**by["slide.svs"], "status": "error", "error": f"{missing}: no such file or folder"}


def test_folder_with_no_slides(tmp_path, slide_folder):
    empty = tmp_path / "empty folder"
    empty.mkdir()
    notes = tmp_path / "only notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("no slides here")
    looked = ", ".join(SLIDE_SUFFIXES)
    by = _batch(tmp_path, [slide_folder, empty, notes])
    assert by["empty folder"]["status"] == "error"
    assert by["empty folder"]["error"] == f"{empty}: folder holds no slides (looked for {looked})"
    assert by["only notes"]["error"] == f"{notes}: folder holds no slides (looked for {looked}; 1 other file skipped)"
    # alone, or with a file that is no slide format: no slide to score, a usage error before anything is made
    with pytest.raises(BatchError) as e:
        run_batch([empty, notes / "readme.txt"], tmp_path / "out2")
    assert str(e.value) == (f"no slide to score in the inputs given: {empty}: folder holds no slides (looked for {looked}); "
                            f"{notes / 'readme.txt'}: unsupported format '.txt'; supported: {looked}")
    assert not (tmp_path / "out2").exists()


def test_every_bad_input_in_one_batch(tmp_path, slide_folder, fields, pyramid_tiff):
    """The whole corpus in one folder: every bad file gets its own error row, the good slide is scored."""
    kinds = ["zero_byte", "truncated_tiff", "text_as_png", "text_as_tif", "tiff_bomb", "png_bomb", "grey_png",
             "grey_tif", "grey16_png", "grey16_tif", "white", "black", "he", "no_mpp"]
    bad = [write_bad(k, slide_folder, fields=fields, pyramid=pyramid_tiff) for k in kinds]
    by = _batch(tmp_path, [slide_folder], workers=2)
    assert len(by) == len(bad) + 1
    for p in bad:  # unreadable files are errors; readable images that are not HER2 IHC tissue are refused
        status = "refused" if p.stem in ("white", "black", "h&e", "grey", "grey16") else "error"
        assert by[p.name]["status"] == status and by[p.name]["error"].startswith(f"{p}: "), by[p.name]


# --------------------------------------------------------------------------- untrusted input

NASTY = ["Schnitt ü 3+ #1.png", "$(rm -rf x);.png", "it's \"quoted\" `x`.png", "a|b&c>d<e*f?.png", "  spaced  .png",
         "-rf.png", "a..png", "Schnitt ü 3+ #1.PNG"]


def test_nasty_slide_names_stay_inside_out(tmp_path, slide_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()  # what "$(rm -rf x)" would remove if any name reached a shell
    for name in NASTY:
        shutil.copy(slide_folder / GOOD, slide_folder / name)
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    by = _batch(tmp_path, [slide_folder])
    assert all(by[n]["status"] == "ok" for n in NASTY), {n: by[n]["error"] for n in NASTY}
    assert (tmp_path / "x").is_dir() and set(tmp_path.iterdir()) == before | {out}
    folders = [by[n]["output"] for n in NASTY]
    assert len(set(f.lower() for f in folders)) == len(NASTY)  # unique even on case-insensitive file systems
    for n, f in zip(NASTY, folders):
        d = out / f
        assert d.parent == out and d.resolve().parent == out.resolve() and not f.startswith(".")
        assert sorted(p.name for p in d.iterdir()) == sorted(OUTPUT_FILES)
        assert json.loads((d / "result.json").read_text(encoding="utf-8"))["slide"] == str(slide_folder / n)
    pair = sorted([by["Schnitt ü 3+ #1.png"]["output"], by["Schnitt ü 3+ #1.PNG"]["output"]], key=str.lower)
    assert pair[0] in ("Schnitt_ü_3_1.png", "Schnitt_ü_3_1.PNG") and re.fullmatch(r"Schnitt_ü_3_1\.(png|PNG)-[0-9a-f]{8}", pair[1])
    assert by["$(rm -rf x);.png"]["output"] == "rm_-rf_x_.png"


@pytest.mark.parametrize("raw,expected", [
    ("../../etc/passwd", "etc__passwd"),
    ("/etc/passwd", "etc__passwd"),
    ("..", "slide"),
    ("", "slide"),
    ("...", "slide"),
    (".hidden.png", "hidden.png"),
    ("a/../../b.png", "a__..__..__b.png"),
    ("C:\\Users\\x\\slide.svs", "C___Users__x__slide.svs"),
    ("manifest.json", "slide_manifest.json"),
    ("summary.csv", "slide_summary.csv"),
    ("Schnitt u\u0308.png", "Schnitt_ü.png"),  # NFD as macOS writes it, normalised to NFC
    ("tab\there\nnewline.png", "tab_here_newline.png"),
])
def test_safe_name(raw, expected, tmp_path):
    name = safe_name(raw)
    assert name == expected
    assert "/" not in name and "\\" not in name and not name.startswith(".") and name not in ("", ".", "..")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_safe_name_length_is_bounded_in_bytes():
    name = safe_name("ü" * 400 + ".png")
    assert 0 < len(name.encode("utf-8")) <= 150 and name == name.strip("._")


def test_output_folder_planted_as_a_link_is_refused(tmp_path, slide_folder):
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "good_2_.png").symlink_to(elsewhere, target_is_directory=True)
    rows = run_batch([slide_folder], out)
    assert rows[0]["status"] == "error" and "is a link or a file; refusing to write outside --out" in rows[0]["error"]
    assert list(elsewhere.iterdir()) == []


def test_region_files_are_validated_in_a_batch(tmp_path, slide_folder):
    regions = tmp_path / "regions"
    regions.mkdir()
    stem = Path(GOOD).stem
    (regions / f"{stem}.geojson").write_text('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}')
    rows = run_batch([slide_folder], tmp_path / "out", regions=regions)
    assert rows[0]["status"] == "error"
    assert rows[0]["error"] == f"{slide_folder / GOOD}: {regions / (stem + '.geojson')}: feature 0 has no geometry object"
    square = [[0, 0], [384, 0], [384, 384], [0, 384], [0, 0]]
    (regions / f"{stem}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))
    rows = run_batch([slide_folder], tmp_path / "out", regions=regions)
    assert rows[0]["status"] == "ok" and rows[0]["region"].startswith(f"annotation ({stem}.geojson, 1 polygons); epithelial cells within it, left out: ")


# --------------------------------------------------------------------------- SIGKILL and resume

def _count(out: Path, name: str = "result.json") -> int:
    return sum(1 for _ in out.glob(f"*/{name}")) if out.exists() else 0


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _kill_when(cmd, cwd, ready, timeout=90.0) -> bool:
    """Start the batch, SIGKILL it as soon as ``ready()`` holds; False if it finished first."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _walk_files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, files in os.walk(root) for f in files]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SIGKILL")
def test_killed_batch_resumes_with_nothing_lost_or_duplicated(tmp_path, fields, pyramid_tiff):
    from her2score.synthetic import generate_field

    slides = tmp_path / "slides"
    slides.mkdir()
    for s, rgb in fields.items():
        save_png(slides / f"field {s}.png", rgb)
    save_png(slides / "extra-a.png", generate_field("1+", seed=901, size_px=(384, 384)).image)
    save_png(slides / "extra-b.png", generate_field("3+", seed=902, size_px=(384, 384)).image)
    shutil.copy(pyramid_tiff, slides / "slide.tif")
    n = 7

    reference = tmp_path / "reference"
    run_batch([str(slides)], reference)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "her2score.cli", "score", str(slides), "--out", str(out), "-q", "--no-cnn"]
    kills = [
        lambda: (out / MANIFEST).exists(),  # very early: started, nothing scored yet
        lambda: _count(out) >= 1,
        lambda: _count(out) >= 3,
        lambda: _count(out, "cells.parquet") >= 5,  # possibly between a slide's outputs
    ]
    killed = 0
    for ready in kills:
        killed += _kill_when(cmd, tmp_path, ready)
        deadline = time.monotonic() + 5
        while _processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_mentioning(str(out)) == [], "worker processes outlived the killed batch"
    assert killed >= 2

    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["slides"]
    done_before = {e["row"]["output"] for e in manifest.values() if e["state"] == "done"}
    mtimes = {d: (out / d / "result.json").stat().st_mtime_ns for d in done_before}
    final = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert f" 0 failed; {n} slides in " in final.stdout

    # exactly one complete result per slide, identical to the uninterrupted run's
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == sorted(p.name for p in reference.iterdir() if p.is_dir()) and len(dirs) == n
    for d in dirs:
        assert sorted(p.name for p in (out / d).iterdir()) == sorted(OUTPUT_FILES)
        a, b = json.loads((out / d / "result.json").read_text("utf-8")), json.loads((reference / d / "result.json").read_text("utf-8"))
        assert {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {}, d
        for f in ("result.json", "cells.parquet", "cells.geojson"):
            assert (out / d / f).read_bytes() == (reference / d / f).read_bytes(), (d, f)
    assert [p for p in _walk_files(out) if p.name.endswith(".tmp")] == []
    assert (out / "summary.csv").read_text(encoding="utf-8") == (reference / "summary.csv").read_text(encoding="utf-8")
    # slides finished before the last start were not scored again
    assert all((out / d / "result.json").stat().st_mtime_ns == t for d, t in mtimes.items())


def _tumour_square(path: Path, side: int = 384) -> None:
    square = [[0, 0], [side, 0], [side, side], [0, side], [0, 0]]
    path.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
                                "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}))


def test_an_annotation_named_by_stem_is_refused_where_two_slides_of_a_folder_share_the_stem(tmp_path):
    """a.png beside a.tif: a.geojson could be either's (both were scored on it); a.png.geojson is the PNG's alone."""
    from her2score.synthetic import write_pyramidal_tiff

    field = generate_field("3+", seed=9100).image
    (tmp_path / "slides").mkdir()
    save_png(tmp_path / "slides" / "a.png", field)
    write_pyramidal_tiff(tmp_path / "slides" / "a.tif", field, mpp=0.5)
    regions = tmp_path / "regions"
    regions.mkdir()
    _tumour_square(regions / "a.geojson")
    with pytest.raises(BatchError, match=r"a\.geojson: the annotation of which slide\?.*a\.png\.geojson"):
        run_batch([tmp_path / "slides"], tmp_path / "out", regions=regions)
    (regions / "a.geojson").rename(regions / "a.png.geojson")
    rows = {Path(r["slide"]).name: r for r in run_batch([tmp_path / "slides"], tmp_path / "out", regions=regions)}
    assert rows["a.png"]["region"].startswith("annotation (a.png.geojson")
    assert rows["a.tif"]["region"].startswith("detected epithelial cells")


def test_an_annotation_that_cannot_be_read_or_has_a_twin_is_never_passed_over(tmp_path):
    """A broken link, a folder or a pipe named as the annotation was skipped ("no annotation", every detected cell
    scored, exit 0); two annotations of one slide (a mask beside a GeoJSON, F.geojson beside f.GEOJSON), one taken
    unsaid, each giving another result."""
    (tmp_path / "slides").mkdir()
    save_png(tmp_path / "slides" / "f.png", generate_field("3+", seed=9100).image)
    regions = tmp_path / "regions"
    regions.mkdir()
    for make, words in ((lambda p: p.symlink_to(tmp_path / "moved" / "f.geojson"), "is a symbolic link to nothing"),
                        (lambda p: p.mkdir(), "is a folder, not a region file"),
                        (lambda p: os.mkfifo(p), "is not a regular file (a pipe, socket or device)")):
        make(regions / "f.geojson")
        rows = run_batch([tmp_path / "slides"], tmp_path / "out", regions=regions, workers=1)
        assert rows[0]["status"] == "error" and f"{regions / 'f.geojson'}: {words}" in rows[0]["error"], rows[0]
        p = regions / "f.geojson"
        p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
    for twins in (("f.geojson", "f.png"), ("F.geojson", "f.GEOJSON"), ("f.geojson", "f.png.geojson")):
        for name in twins:
            _tumour_square(regions / name) if name.lower().endswith("json") else save_png(regions / name, np.full((64, 64, 3), 255, np.uint8))
        with pytest.raises(BatchError, match=r"f\.png: 2 annotations name it in .*regions \(.*, .*\): keep the one to use"):
            run_batch([tmp_path / "slides"], tmp_path / "out", regions=regions, workers=1)
        for name in twins:
            (regions / name).unlink()


def test_annotations_are_found_by_the_slides_path_and_never_shared_or_taken_from_a_slide(tmp_path):
    """Two slides named alike in two folders take the annotations under the same folders; a lone one at the
    top of --regions would be shared, so it is refused; the slide folder given as --regions holds no
    annotation of a slide (its own file is no mask); an edited annotation rescores; a JPEG mask, any case."""
    field = generate_field("3+", seed=9100).image
    for sub in ("A", "B"):
        (tmp_path / "slides" / sub).mkdir(parents=True)
        save_png(tmp_path / "slides" / sub / "s1.png", field)
    regions = tmp_path / "regions"
    (regions / "A").mkdir(parents=True)
    _tumour_square(regions / "A" / "s1.geojson")
    _tumour_square(regions / "s1.geojson", side=200)
    with pytest.raises(BatchError, match=r"s1\.geojson: the annotation of which slide\?"):
        run_batch([tmp_path / "slides"], tmp_path / "out", regions=regions)
    # given as two inputs, each slide sits at the top of its own: the lone annotation is either's, still refused
    # (not named after the whole file name, s1.png.geojson, which both slides share: that fix was offered and failed)
    with pytest.raises(BatchError, match=r"s1\.geojson: the annotation of which slide\?.*; score those inputs in runs of their own"):
        run_batch([tmp_path / "slides" / "A", tmp_path / "slides" / "B"], tmp_path / "out", regions=regions)
    (regions / "s1.geojson").unlink()
    (regions / "B").mkdir()
    _tumour_square(regions / "B" / "S1.GeoJSON", side=200)
    rows = {Path(r["slide"]).parent.name: r for r in run_batch([tmp_path / "slides"], tmp_path / "out", regions=regions)}
    assert rows["A"]["region"].startswith("annotation (s1.geojson, 1 polygons); epithelial cells within it, left out: ")
    assert rows["B"]["region"].startswith("annotation (S1.GeoJSON, 1 polygons); epithelial cells within it, left out: ")
    assert int(rows["B"]["tumour_cells"]) < int(rows["A"]["tumour_cells"])
    _tumour_square(regions / "A" / "s1.geojson", side=200)  # edited: scored again, not reused
    again = {Path(r["slide"]).parent.name: r for r in run_batch([tmp_path / "slides"], tmp_path / "out", regions=regions)}
    assert again["A"]["tumour_cells"] == rows["B"]["tumour_cells"] and again["B"] == rows["B"]
    same = run_batch([tmp_path / "slides" / "A"], tmp_path / "out_same", regions=tmp_path / "slides" / "A")
    assert same[0]["region"].startswith("detected epithelial cells")  # s1.png is the slide, not its mask
    mask = np.zeros(field.shape[:2], np.uint8)
    mask[:100, :100] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "s1.JPG")
    jpeg = run_batch([tmp_path / "slides" / "A"], tmp_path / "out_jpeg", regions=tmp_path / "masks")
    assert jpeg[0]["region"].startswith("mask (s1.JPG); epithelial cells within it, left out: ")


def test_a_slide_without_its_annotation_names_the_files_named_like_it(tmp_path, caplog):
    """QuPath's labelled export names a mask <image>-labels.png: not found, the slide was scored on detected cells
    with one warning that named no file, and the mask lay unused."""
    from her2score.batch import _Annotations, _find_region

    (tmp_path / "slides").mkdir()
    (tmp_path / "regions").mkdir()
    slide = tmp_path / "slides" / "field.png"
    slide.write_bytes(b"")
    (tmp_path / "regions" / "field-labels.png").write_bytes(b"")
    (tmp_path / "regions" / "other.png").write_bytes(b"")
    (tmp_path / "slides" / "field2.png").write_bytes(b"")  # another slide of the batch: its annotation is no hint
    (tmp_path / "regions" / "field2.geojson").write_bytes(b"")
    batch = _Annotations([(slide, tmp_path / "slides"), (tmp_path / "slides" / "field2.png", tmp_path / "slides")])
    with caplog.at_level(logging.WARNING, logger="her2score.batch"):
        assert _find_region(tmp_path / "regions", slide, tmp_path / "slides", batch) is None
    assert (f"field.png: no annotation under {tmp_path / 'regions'} ({tmp_path / 'regions' / 'field-labels.png'} is named "
            "like it: name one field<suffix> to use it); its tumour cells are detected") in caplog.text
    assert "other.png" not in caplog.text and "field2" not in caplog.text
