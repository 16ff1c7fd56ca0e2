import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from her2score import __version__
from her2score.categories import CATEGORIES
from her2score.guidelines import PANCREATIC_NOTE
from her2score.pipeline import NoTissueError, ScoringConfig, WrongStainError, analyse_slide, score_slide
from her2score.results import SlideResult
from her2score.slide import ArraySlide
from her2score.synthetic import generate_field, generate_he_field, make_slide, write_pyramidal_tiff
from her2score.tumour import TumourRule

CLASSES = ["0", "1+", "2+", "3+"]


@pytest.fixture(scope="module")
def fields():
    return {s: generate_field(s, seed=9100 + i) for i, s in enumerate(CLASSES)}


@pytest.mark.parametrize("score", CLASSES)
def test_synthetic_field_of_each_class(fields, score):
    f = fields[score]
    r = score_slide(ArraySlide(f.image, mpp=f.mpp))
    assert r.score == score, r.reason
    assert r.classical_score == score
    assert r.tumour_cells > 100
    assert sum(r.counts.values()) == r.tumour_cells
    assert sum(r.percentages.values()) == pytest.approx(100.0, abs=0.01)
    assert 0 <= r.h_score <= 300
    assert r.version == __version__ and r.stains["source"] == "ruifrok-johnston"
    assert "epithelial" in r.region
    if score == "2+":
        assert "ish_reflex" in r.flags
    assert r.slide_sample == ""  # in memory: no file to know it by


def test_a_result_records_the_file_it_scored(fields, tmp_path):
    """slide_sample: the file's content sample taken before it was read (evaluate --reuse matches on it)."""
    from her2score.files import content_sample

    Image.fromarray(fields["1+"].image).save(tmp_path / "f.png")
    r = score_slide(tmp_path / "f.png", mpp=0.5)
    assert r.slide_sample == content_sample(tmp_path / "f.png")
    (tmp_path / "result.json").write_text(r.to_json())
    back = SlideResult.read(tmp_path / "result.json")  # its counts and shares in the categories' order, as scored
    assert back == r and list(back.counts) == list(back.percentages) == [c for c in CATEGORIES if c in r.counts]


def test_haematoxylin_only_field_scores_null():
    f = generate_field("0", seed=9200, variant="null")
    r = score_slide(ArraySlide(f.image, mpp=f.mpp))
    assert (r.score, r.level) == ("0", "0 (null)")
    assert "null" in r.flags


def test_h_and_e_is_refused_not_scored_zero():
    he = generate_he_field(seed=9300)
    with pytest.raises(WrongStainError, match="H&E"):
        score_slide(ArraySlide(he, mpp=0.5, path="he_field.png"))


def test_h_and_e_whole_slide_is_refused_while_tile_workers_run(tmp_path):
    """With tile workers the stain check runs beside them: an H&E slide is still refused by name and
    reason, and no worker outlives the refusal."""
    import multiprocessing as mp

    he = generate_he_field(seed=9301, size_px=(1400, 1000))
    path = write_pyramidal_tiff(tmp_path / "he_slide.tif", he, mpp=0.5)
    with pytest.raises(WrongStainError, match=r"he_slide\.tif: .*H&E"):
        analyse_slide(path, config=ScoringConfig(tile_px=256), workers=2)
    assert mp.active_children() == []


def test_empty_slide_is_an_error():
    with pytest.raises(NoTissueError, match="no tissue"):
        score_slide(ArraySlide(np.full((600, 600, 3), 247, np.uint8), mpp=0.5, path="blank.png"))


def test_tumour_annotation_limits_the_scored_cells(fields, tmp_path):
    f = fields["3+"]
    geo = {"type": "FeatureCollection", "features": [{
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [256, 0], [256, 512], [0, 512], [0, 0]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
    }]}
    path = tmp_path / "region.geojson"
    path.write_text(json.dumps(geo))
    slide = ArraySlide(f.image, mpp=f.mpp)
    full = analyse_slide(slide)
    half = analyse_slide(slide, region=path)
    assert half.result.region.startswith("annotation")
    assert 0 < half.result.tumour_cells < len(full.cells["x"])
    assert np.all(half.cells["x"][half.cells["tumour"]] < 256)


def test_lymphocytes_and_stroma_within_a_tumour_annotation_are_not_tumour_cells(fields, tmp_path):
    """ASCO/CAP and Hofmann count invasive tumour cells: an annotation marks the tumour area, and the lymphocytes,
    fibroblasts and endothelium within it are still left out (before: every cell in it counted, 23-29% of them
    not tumour on the sample fields, diluting each share)."""
    f = fields["2+"]
    Image.fromarray(np.full(f.image.shape[:2], 255, np.uint8)).save(tmp_path / "all.png")
    slide = ArraySlide(f.image, mpp=f.mpp)
    plain, annotated = analyse_slide(slide), analyse_slide(slide, region=tmp_path / "all.png")
    assert annotated.result.tumour_cells == plain.result.tumour_cells < len(plain.cells["x"])
    assert annotated.result.counts == plain.result.counts
    left_out = plain.result.region.split("left out: ")[1]
    assert annotated.result.region == f"mask (all.png); epithelial cells within it, left out: {left_out}"
    assert "lymphocyte-like" in left_out and "spindle" in left_out


def test_each_cell_left_out_of_the_tumour_says_why(fields, tmp_path):
    """A pathologist checking an exclusion (38 'lymphocyte-like' cells with intense complete membranes on the 3+
    sample) had only the slide's counts: each cell now says which rule left it out, the same counts the result
    gives; with an annotation, the cells outside it say so."""
    from collections import Counter

    from her2score.tumour import LEFT_OUT

    f = fields["2+"]
    a = analyse_slide(ArraySlide(f.image, mpp=f.mpp))
    why = a.cells["left_out_as"]
    assert all((w is None) == bool(t) for w, t in zip(why, a.cells["tumour"]))
    counts = Counter(w for w in why if w is not None)
    assert a.result.region.endswith(", ".join(f"{counts[w]} {w}" for w in LEFT_OUT[:-1] if counts[w]))
    mask = np.zeros(f.image.shape[:2], np.uint8)
    mask[:, : f.image.shape[1] // 2] = 255
    Image.fromarray(mask).save(tmp_path / "left.png")
    half = analyse_slide(ArraySlide(f.image, mpp=f.mpp), region=tmp_path / "left.png")
    outside = half.cells["x"] >= f.image.shape[1] // 2
    assert set(half.cells["left_out_as"][outside]) == {"outside the tumour annotation"}


def test_gastric_biopsy_uses_clusters(fields):
    f = fields["2+"]
    r = score_slide(ArraySlide(f.image, mpp=f.mpp), guideline="gastric", specimen="biopsy")
    assert r.clusters["2+"] >= 5
    assert r.score in ("2+", "3+")
    assert PANCREATIC_NOTE in r.notes
    in_config = score_slide(ArraySlide(f.image, mpp=f.mpp), config=ScoringConfig(guideline="gastric", specimen="biopsy"))
    assert (in_config.guideline, in_config.specimen) == ("gastric", "biopsy")  # not the keywords' defaults over it
    assert in_config.clusters == r.clusters and in_config.score == r.score


def test_pyramidal_tiff_through_tifffile_and_openslide(tmp_path):
    rgb, truth = make_slide("3+", seed=9400, size_px=(1600, 1200), mpp=0.25)
    path = write_pyramidal_tiff(tmp_path / "slide.tif", rgb, mpp=0.25)
    a = analyse_slide(path, config=ScoringConfig(), backend="tifffile")
    b = analyse_slide(path, config=ScoringConfig(), backend="openslide")
    assert a.result.score == b.result.score == "3+"
    assert a.result.mpp == pytest.approx(0.25)
    # same pixels to within decoder rounding: cell counts agree closely
    assert abs(a.result.tumour_cells - b.result.tumour_cells) <= 0.03 * a.result.tumour_cells
    assert a.result.tissue_area_mm2 == pytest.approx(b.result.tissue_area_mm2, rel=0.02)
    assert score_slide(path, backend="openslide") == b.result  # score_slide takes the reader as analyse_slide does


def test_tile_workers_give_the_same_result(tmp_path):
    rgb, _ = make_slide("2+", seed=9500, size_px=(1400, 1000), mpp=0.5)
    path = write_pyramidal_tiff(tmp_path / "s.tif", rgb, mpp=0.5)
    cfg = ScoringConfig(tile_px=256)
    one = analyse_slide(path, config=cfg)
    two = analyse_slide(path, config=cfg, workers=2)
    assert one.result.to_json() == two.result.to_json()


def test_a_slide_starts_no_more_tile_workers_than_it_has_tiles(tmp_path, monkeypatch):
    """--workers 40 on a 9-tile field started 40 processes, each opening the slide."""
    import her2score.pipeline as pipeline

    rgb, _ = make_slide("2+", seed=9500, size_px=(1000, 600), mpp=0.5)
    path = write_pyramidal_tiff(tmp_path / "s.tif", rgb, mpp=0.5)
    started = []
    real = pipeline.worker_pool
    monkeypatch.setattr(pipeline, "worker_pool", lambda n, *a, **k: started.append(n) or real(n, *a, **k))
    r = analyse_slide(path, config=ScoringConfig(tile_px=256), workers=40).result
    assert len(started) == 1 and 1 < started[0] <= 12, started  # 1,000 x 600 px in tiles of 256: 12 at most
    assert r.to_json() == analyse_slide(path, config=ScoringConfig(tile_px=256)).result.to_json()


def test_forked_tile_workers_share_a_plain_image_the_parent_decoded(tmp_path, monkeypatch):
    """Each tile worker decoded a PNG or JPEG again (a 16,000² PNG took 2.6 GB with one worker, 5.6 GB with two; an
    8,192² one's process tree peaked at 1.5 GB of PSS with two, 0.54 GB shared): forked workers use the parent's
    pixels and open nothing."""
    import os

    from her2score import pipeline
    from her2score.workers import FORKS

    if not FORKS:
        pytest.skip("workers are forked only where the platform forks")
    rgb, _ = make_slide("2+", seed=9501, size_px=(1400, 1000), mpp=0.5)
    Image.fromarray(rgb).save(tmp_path / "s.png", dpi=(50800, 50800))
    parent, opened = os.getpid(), pipeline.open_slide

    def open_in_parent_only(*args, **kwargs):
        assert os.getpid() == parent, "a tile worker opened the image again"
        return opened(*args, **kwargs)
    monkeypatch.setattr(pipeline, "open_slide", open_in_parent_only)
    cfg = ScoringConfig(tile_px=256)
    assert analyse_slide(tmp_path / "s.png", config=cfg, workers=2).result.to_json() == \
        analyse_slide(tmp_path / "s.png", config=cfg).result.to_json()


def test_cells_on_tile_edges_are_counted_once(fields):
    f = fields["2+"]
    slide = ArraySlide(f.image, mpp=f.mpp)
    whole = analyse_slide(slide, config=ScoringConfig(tile_px=512))
    tiled = analyse_slide(slide, config=ScoringConfig(tile_px=128, margin_um=16))
    pts = np.column_stack([tiled.cells["x"], tiled.cells["y"]])
    d = np.hypot(*(pts[:, None, :] - pts[None, :, :]).transpose(2, 0, 1)) + np.eye(len(pts)) * 99
    assert d.min() > 2.0  # no cell found twice by neighbouring tiles
    assert abs(len(tiled.cells["x"]) - len(whole.cells["x"])) <= 0.05 * len(whole.cells["x"])


def test_the_tile_margin_is_physical(fields):
    """The overlap is in µm (a cell reaches as far at any resolution): analysed at 0.25 µm/px it is 64 px,
    and the tiled analysis finds the cells where the whole field finds them (98.5% within 1 µm; the
    rest differ by the tiles' shared nucleus thresholds). At 32 px (8 µm, the old margin) 91% were;
    a margin short of a cell's reach is refused."""
    import cv2
    from scipy.spatial import cKDTree

    fine = ArraySlide(cv2.resize(fields["1+"].image, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC), mpp=0.25)
    cfg = ScoringConfig(mpp=0.25, tile_px=256)
    assert (cfg.margin_px, ScoringConfig().margin_px) == (64, 32)
    whole = analyse_slide(fine, config=replace(cfg, tile_px=4096))
    tiled = analyse_slide(fine, config=cfg)
    d, _ = cKDTree(np.column_stack([tiled.cells["x"], tiled.cells["y"]])).query(
        np.column_stack([whole.cells["x"], whole.cells["y"]]))
    assert len(whole.cells["x"]) > 300
    assert np.mean(d < 4) > 0.97  # level-0 px: 1 µm
    with pytest.raises(ValueError, match="must reach as far as a cell"):
        ScoringConfig(margin_um=8)



def test_settings_an_open_slide_or_a_region_cannot_take_are_refused_before_any_tile_is_read(fields, monkeypatch):
    """An open Slide keeps the µm/px and reader it was opened with: another mpp beside it was ignored, and the QC that
    catches a wrong µm/px never ran. A region of another type failed only after every tile had been scored; an
    empty guideline took the default."""
    import her2score.pipeline as pipeline

    f = fields["2+"]
    slide = ArraySlide(f.image, mpp=f.mpp)
    monkeypatch.setattr(pipeline, "score_tile", lambda *a, **k: pytest.fail("a tile was scored"))
    for given in (dict(mpp=1.0), dict(backend="openslide")):
        with pytest.raises(ValueError, match=r"mpp=.*, backend=.* given with an open Slide, which was opened at 0.5 µm/px"):
            score_slide(slide, **given)
    for region in (np.zeros(f.image.shape[:2], np.uint8), {"type": "FeatureCollection", "features": []}):
        with pytest.raises(TypeError, match=f"region must be a path .* not {type(region).__name__}"):
            score_slide(f.image, mpp=f.mpp, region=region)
    with pytest.raises(ValueError, match="unknown guideline ''"):
        score_slide(f.image, mpp=f.mpp, guideline="")
    with pytest.raises(TypeError, match=r"path must be a file path, an open Slide or an RGB array \(np.asarray\(image\) for a PIL image\), not Image"):
        score_slide(Image.fromarray(f.image), mpp=f.mpp)
    monkeypatch.undo()
    assert score_slide(slide, mpp=0.5, default_mpp=0.5).mpp == 0.5  # its own µm/px given again; a default it needs not


def test_a_results_settings_score_the_slide_again_alike(fields):
    """ScoringConfig.from_dict reads a result.json's config back (a dict passed as config failed deep inside)."""
    f = fields["1+"]
    config = ScoringConfig(guideline="breast-asco-cap-2018", thresholds=replace(ScoringConfig().thresholds, weak_od=0.15),
                           tumour=TumourRule(min_neighbours=2))
    first = score_slide(f.image, mpp=f.mpp, config=config)
    read = ScoringConfig.from_dict(json.loads(first.to_json())["config"])
    assert read == config and score_slide(f.image, mpp=f.mpp, config=read).to_dict() == first.to_dict()
    assert ScoringConfig.from_dict({"tile_px": 1024}) == ScoringConfig(tile_px=1024)  # an older result: defaults for the rest
    for bad, words in (({"tile_size": 512}, "unknown setting 'tile_size'"), ({"tumour": {"radius": 3}}, "unknown tumour rule setting 'radius'"),
                       ({"thresholds": {"weak_od": "0.1"}}, "weak_od must be a number"),
                       ({"near_cutoff_points": "5.5"}, "near_cutoff_points must be int or float, got '5.5'"),
                       ({"min_tumour_cells": 100.0}, "min_tumour_cells must be int"), ({"estimate_stains": 1}, "estimate_stains must be bool"),
                       ({"tumour": []}, "tumour must be dict")):
        with pytest.raises(ValueError, match=words):
            ScoringConfig.from_dict(bad)
    with pytest.raises(TypeError, match="config must be a ScoringConfig"):
        score_slide(f.image, mpp=f.mpp, config=config.to_dict())


def test_settings_that_would_switch_a_check_off_silently_are_refused():
    for bad in (dict(min_tumour_cells=-5), dict(near_cutoff_points=-3), dict(false_membrane_percent=-1),
                dict(false_membrane_percent=101)):
        with pytest.raises(ValueError, match="min_tumour_cells must be >= 1"):
            ScoringConfig(**bad)
    for bad in (dict(cluster_distance_um=0.0), dict(cluster_distance_um=float("nan")), dict(cluster_distance_um=float("inf")),
                dict(tumour=TumourRule(neighbour_radius_um=-1)), dict(tumour=TumourRule(neighbour_radius_um=float("inf")))):
        with pytest.raises(ValueError, match="must be positive finite distances"):
            ScoringConfig(**bad)
    with pytest.raises(ValueError, match="must be at least 1"):
        ScoringConfig(cnn_patches_per_tile=0)


def test_a_slides_cnn_reads_about_1024_patches_spread_over_its_tiles():
    """A field of up to 16 tiles of 512 px gives the CNN every patch (64 a tile); a larger slide about 1024 in all,
    and never fewer than 8 a tile."""
    from her2score.pipeline import cnn_patch_limit

    cfg = ScoringConfig()
    assert [cnn_patch_limit(cfg, n) for n in (1, 16, 17, 83, 128, 703)] == [1024, 64, 61, 13, 8, 8]


def test_level0_positions_of_a_scan_finer_than_the_analysis_are_pixel_centres(fields):
    """A field scanned at 0.25 µm/px and read at 0.5: each analysis pixel spans 2 level-0 pixels, so its centre is
    level-0 2x + 0.5 (pixel-centre coordinates), not 2x. The same field at 0.5 µm/px gives the same cells."""
    import cv2

    f = fields["2+"]
    fine = cv2.resize(f.image, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)  # read back at 0.5: f.image exactly
    coarse, scanned = analyse_slide(ArraySlide(f.image, mpp=0.5)), analyse_slide(ArraySlide(fine, mpp=0.25))
    assert len(scanned.cells["x"]) == len(coarse.cells["x"]) > 100
    np.testing.assert_allclose(scanned.cells["x"], 2 * coarse.cells["x"] + 0.5, atol=1e-3)
    np.testing.assert_allclose(scanned.cells["y"], 2 * coarse.cells["y"] + 0.5, atol=1e-3)
    for k in (0, len(coarse.cells["x"]) // 2):
        np.testing.assert_allclose(scanned.cells["outline"][k], 2 * coarse.cells["outline"][k] + 0.5, atol=1e-3)


def test_real_ihc_image_from_scikit_image(tmp_path):
    """skimage's IHC image: colonic glands stained for FHL2 (not HER2): strong membranous and
    cytoplasmic DAB, so a membrane scorer must call it strongly positive, with its reasons."""
    from skimage import data

    path = tmp_path / "skimage_ihc.png"
    Image.fromarray(data.immunohistochemistry()).save(path)
    r = score_slide(path, mpp=0.5)
    assert r.tumour_cells > 50
    assert r.score in ("2+", "3+")
    assert r.percentages["strong_complete"] + r.percentages["weak_moderate_complete"] > 10
    assert "%" in r.reason and r.mpp == 0.5
    assert any("from user" in n for n in r.notes)


def test_a_slide_the_default_vectors_read_as_nuclear_is_scored_with_its_own(fields):
    """A 3+ whose DAB leans ~6 deg towards haematoxylin (the generator's stain jitter, as chromogens and
    scanners vary): the default vectors read its membranes as brown nuclei, which would refuse it as
    nuclear DAB; it is scored again with its own vectors, and is 3+. Every slide can be scored with
    its own (estimate_stains); fields drawn with the default vectors keep them."""
    jittered = ArraySlide(generate_field("3+", seed=14, stain_jitter=6, size_px=(384, 384)).image, mpp=0.5)
    r = score_slide(jittered)
    assert r.score == "3+" and r.stains["source"] == "estimated" and r.config["estimate_stains"]
    assert any(n.startswith("scored with the slide's own stain vectors: the default ones read it as nuclear DAB (DAB is nuclear")
               for n in r.notes)
    assert any(n.startswith("stain vectors: estimated (Macenko); the slide's own DAB used") for n in r.notes)
    assert [q.code for q in r.qc if q.severity == "warn"] == ["own_stain_vectors"] and r.qc_status == "passed"
    for score in ("0", "3+"):
        plain = score_slide(ArraySlide(fields[score].image, mpp=0.5), config=ScoringConfig(estimate_stains=True))
        assert plain.stains["source"] == "ruifrok-johnston" and plain.score == score
        assert any(n.startswith("stain vectors: default vectors") for n in plain.notes)


def test_cnn_is_reported_and_fused(fields):
    from her2score.cnn import load_model

    cnn = load_model()
    f = fields["3+"]
    r = score_slide(ArraySlide(f.image, mpp=f.mpp), cnn=cnn)
    assert r.cnn is not None and r.cnn.model == cnn.name and r.cnn.tiles == 1
    assert sum(r.cnn.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert r.classical_score == "3+" and r.score in ("2+", "3+")
    assert 0.4 <= r.confidence <= 1.0
    assert (r.cnn.score != r.classical_score) == ("cnn_disagrees" in r.flags)
    plain = score_slide(ArraySlide(f.image, mpp=f.mpp))
    assert plain.cnn is None and plain.confidence is None and plain.counts == r.counts


def test_the_cnn_reads_only_the_tumour_annotation(fields, tmp_path):
    """A 1+ field beside a 3+ one (an excluded area: DCIS, normal tissue) with the 1+ half annotated: the CNN reads
    the annotated half, as the cells are counted, not the 3+ beside it."""
    from her2score.cnn import load_model

    cnn = load_model()
    left, right = fields["1+"].image, fields["3+"].image
    geo = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}}, "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [left.shape[1], 0], [left.shape[1], left.shape[0]], [0, left.shape[0]], [0, 0]]]}}
    path = tmp_path / "tumour.geojson"
    path.write_text(json.dumps(geo))
    alone = score_slide(ArraySlide(left, mpp=0.5), cnn=cnn)
    annotated = score_slide(ArraySlide(np.concatenate([left, right], axis=1), mpp=0.5), region=path, cnn=cnn)
    assert alone.cnn.score == "1+" and annotated.cnn.score == "1+", annotated.cnn
    assert annotated.cnn.probabilities["3+"] == pytest.approx(alone.cnn.probabilities["3+"], abs=0.1)
    assert "cnn_disagrees" not in annotated.flags


def test_an_annotation_no_cnn_patch_is_centred_in_says_so(fields, tmp_path):
    """A tumour annotation narrower than the CNN's patches, between their centres: its cells are counted, the CNN
    reads none of its patches and gives no reading; the notes say why rather than leaving a bare null."""
    from her2score.cnn import load_model

    f = fields["3+"]
    h = f.image.shape[0]
    geo = {"type": "Feature", "properties": {"classification": {"name": "Tumor"}}, "geometry": {
        "type": "Polygon", "coordinates": [[[100, 0], [130, 0], [130, h], [100, h], [100, 0]]]}}
    path = tmp_path / "strip.geojson"
    path.write_text(json.dumps(geo))
    r = score_slide(ArraySlide(f.image, mpp=f.mpp), region=path, cnn=load_model())
    assert r.tumour_cells > 0 and r.cnn is None and r.score == r.classical_score
    assert any("the CNN read no patch" in n and "tumour annotation" in n for n in r.notes), r.notes


def test_neighbours_across_a_tile_seam_are_the_neighbouring_tiles_cells():
    """A field scored as two tiles: each cell's sectors name the cells across its border by their rows
    in the slide's table, across the seam too, and the relation is mutual (A faces B, B faces A)."""
    from her2score.membrane import CellMeasurements
    from her2score.pipeline import _neighbour_rows, _read_tile, _slide_nucleus_thresholds, score_tile
    from her2score.stain import H_DAB, estimate_background
    from her2score.tissue import Tile

    f = generate_field("3+", seed=9500, size_px=(1024, 512))
    slide = ArraySlide(f.image, mpp=f.mpp)
    stains, config = H_DAB.with_background(estimate_background(f.image)), ScoringConfig()
    tiles = [Tile(0, 0, (0, 0, 512, 512), 32), Tile(0, 1, (512, 0, 512, 512), 32)]
    rgbs = [_read_tile(slide, t, f.mpp) for t in tiles]
    nucleus = _slide_nucleus_thresholds(rgbs, stains, config)  # one set for the slide, as analyse_slide does
    parts = [score_tile(rgb, t, stains=stains, config=config, scale=1.0, nucleus=nucleus) for rgb, t in zip(rgbs, tiles)]
    cells = CellMeasurements.concat([p.cells for p in parts])
    rows = np.concatenate(list(_neighbour_rows(parts, tolerance_px=6.0)))
    tile_of = np.repeat([0, 1], [len(p.cells) for p in parts])
    assert rows.shape == (len(cells), 24) and rows.min() >= -1 and rows.max() < len(cells)
    pairs = {(a, b) for a in range(len(cells)) for b in set(rows[a].tolist()) - {-1}}
    assert all(a != b for a, b in pairs)
    cross = [(a, b) for a, b in pairs if tile_of[a] != tile_of[b]]
    assert len(cross) > 30
    assert np.mean([(b, a) in pairs for a, b in pairs]) > 0.95
    assert np.mean([(b, a) in pairs for a, b in cross]) > 0.85


def test_a_slide_is_segmented_with_one_set_of_nucleus_thresholds_from_tiles_spread_over_it(monkeypatch):
    """Twelve tiles of the real colon, the last row under half its haematoxylin: the sample spreads
    through the grid, so the slide's level is that of all its tiles, and every tile is segmented with
    the one set of thresholds the result reports."""
    from skimage.data import immunohistochemistry

    import her2score.pipeline as pipeline
    from her2score.stain import H_DAB, estimate_background, scale_stains
    from her2score.tissue import tile_grid, tissue_mask

    colon = immunohistochemistry()
    rgb = np.concatenate([np.tile(colon, (3, 3, 1)), np.tile(scale_stains(colon, hematoxylin=0.5), (1, 3, 1))])
    tiles = tile_grid(tissue_mask(rgb[::4, ::4], mpp=2.0), slide_size_px=(rgb.shape[1], rgb.shape[0]))
    assert len(tiles) == 12
    used = []
    segment = pipeline.segment_nuclei
    monkeypatch.setattr(pipeline, "segment_nuclei", lambda *a, **k: used.append(k["threshold_od"]) or segment(*a, **k))
    slide = ArraySlide(rgb, mpp=0.5)
    stains = H_DAB.with_background(estimate_background(slide.thumbnail(mpp=pipeline._thumbnail_mpp(slide, 0.5))))
    everywhere = pipeline._slide_nucleus_thresholds([pipeline._read_tile(slide, t, 0.5) for t in tiles], stains, ScoringConfig())
    r = analyse_slide(slide).result
    # the level of all 12 tiles (0.107), within 0.004; the first 8 alone, the normal rows, give 0.115
    assert abs(r.staining["counterstain_od"] - everywhere.counterstain) < 0.004, (r.staining, everywhere)
    assert len(used) == 12 and len(set(used)) == 1 and used[0] == pytest.approx(r.staining["nucleus_threshold_od"], abs=1e-4)


def test_tile_workers_are_forked_whatever_the_default_start_method(tmp_path, pyramid_tiff):
    """Under forkserver (Python 3.14's default on Linux) a worker's parent is the server, not the process
    scoring the slide: the tile workers are forked all the same, and score the slide."""
    import subprocess
    import sys

    script = (
        "import multiprocessing as mp, sys\n"
        "from her2score.pipeline import ScoringConfig, analyse_slide\n"
        "mp.set_start_method('forkserver', force=True)\n"
        "print(analyse_slide(sys.argv[1], config=ScoringConfig(tile_px=256), workers=2).result.score)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(pyramid_tiff)], capture_output=True, text=True, timeout=300)
    one = analyse_slide(pyramid_tiff, config=ScoringConfig(tile_px=256)).result.score
    assert done.returncode == 0 and done.stdout.split()[-1] == one, done.stderr[-2000:]


def test_a_cell_on_a_seam_is_counted_once_at_a_scan_scale_off_the_grid():
    """At 0.2527 µm/px (an Aperio 40x scan) the grid's tiles are read at different phases, and a cell on a seam
    could fall in both cores (13 pairs of about 3,000 cells here, within 1.5 µm, each of one area twice): each is
    kept once. (Two cells whose centroids meet without being one are kept: a small cell in a large one's bay,
    18 and 452 µm².)"""
    from scipy.spatial import cKDTree

    f = generate_field("3+", seed=9, size_px=(3000, 3000), mpp=0.2527)
    a = analyse_slide(ArraySlide(f.image, mpp=0.2527), config=ScoringConfig(tile_px=256))
    xy = np.column_stack([a.cells["x"], a.cells["y"]])
    area = a.cells["cell_area_um2"]
    twins = [(i, j) for i, j in cKDTree(xy).query_pairs(1.5 / 0.2527) if max(area[i], area[j]) < 1.5 * min(area[i], area[j])]
    assert len(xy) > 2500 and twins == [], [(area[i], area[j]) for i, j in twins]


def test_tiles_own_each_cell_once_at_the_grids_own_scale():
    """At 0.5 µm/px two tiles can read a seam cell's border differently (flat cytoplasm floods either way), so its
    centroid may lie in both cores or in neither; its nucleus's centroid does not move: a field cut into 36 tiles
    holds the cells it holds as one tile, within 0.05% (the cell's centroid as owner lost 4 of 3,259 and read 4
    cells twice on a 2,500 px field)."""
    f = generate_field("2+", seed=3, size_px=(1536, 1536))
    counts = [len(analyse_slide(ArraySlide(f.image, mpp=0.5), config=ScoringConfig(tile_px=tile)).cells["x"])
              for tile in (256, 2048)]
    assert abs(counts[0] - counts[1]) <= 0.0005 * counts[1], counts


def _same_tile_result(a, b) -> list[str]:
    """The TileResult fields (CellMeasurements' too) where ``a`` and ``b`` differ (arrays bit for bit, NaN equal to NaN)."""
    from dataclasses import fields as fields_of

    def flat(r):
        out = {}
        for f in fields_of(r):
            v = getattr(r, f.name)
            out.update({f"{f.name}.{g.name}": getattr(v, g.name) for g in fields_of(v)} if hasattr(v, "__dataclass_fields__")
                       and not isinstance(v, tuple) else {f.name: v})
        return out
    fa, fb = flat(a), flat(b)
    return [k for k in fa if not (np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype
                                  and np.array_equal(np.asarray(fa[k]), np.asarray(fb[k]), equal_nan=np.asarray(fa[k]).dtype.kind == "f"))]


@pytest.mark.parametrize("target_mpp", [0.5, 0.25, 1.0])
def test_a_tiles_cells_are_read_in_its_content_box_exactly_as_in_the_whole_tile(monkeypatch, target_mpp):
    """A field on glass, tiled so that one tile is glass, one holds its corner and one most of it: each tile's
    cells are read only in its content box (most of its glass left out), and every measurement, outline and
    anchor is the one reading the whole tile gives, at each resolution whose coarse grids fall on the box's."""
    import her2score.pipeline as pipeline
    from her2score.pipeline import _content_box, _read_tile, _slide_nucleus_thresholds, score_tile
    from her2score.stain import H_DAB, deconvolve, estimate_background
    from her2score.tissue import Tile

    f = generate_field("3+", seed=9510)
    glass = np.median(f.image[f.label_map < 0], axis=0).astype(np.uint8)
    canvas = np.tile(glass, (1600, 1600, 1))
    canvas[700:1212, 900:1412] = f.image
    slide = ArraySlide(canvas, mpp=f.mpp)
    stains, config = H_DAB.with_background(estimate_background(canvas)), ScoringConfig(mpp=target_mpp)
    g = f.mpp / target_mpp  # grid px per slide px; each tile's core is 512 slide px: glass, the field's corner, its far edge
    tiles = [Tile(k, k, (round(at * g), round(at * g), round(512 * g), round(512 * g)), config.margin_px, (round(1600 * g),) * 2)
             for k, at in enumerate((0, 512, 1024))]
    rgbs = [_read_tile(slide, t, target_mpp) for t in tiles]
    nucleus = _slide_nucleus_thresholds(rgbs[1:], stains, config)
    boxes = [_content_box(*deconvolve(rgb, stains)[..., :2].transpose(2, 0, 1), mpp=target_mpp, start_od=nucleus.threshold_od,
                          cell_radius_um=9.0) for rgb in rgbs]
    areas = [(b[0].stop - b[0].start) * (b[1].stop - b[1].start) / rgb.shape[0] / rgb.shape[1] for b, rgb in zip(boxes, rgbs)]
    assert areas[0] < 0.01 and 0.1 < areas[1] < 0.9 and 0.1 < areas[2] < 1, areas  # measured at 0.5 µm/px: 0.08%, 0.29, 0.43
    scale = target_mpp / f.mpp
    boxed = [score_tile(rgb, t, stains=stains, config=config, scale=scale, nucleus=nucleus) for rgb, t in zip(rgbs, tiles)]
    monkeypatch.setattr(pipeline, "_content_box", lambda h, d, **_: (slice(0, h.shape[0]), slice(0, h.shape[1])))
    whole = [score_tile(rgb, t, stains=stains, config=config, scale=scale, nucleus=nucleus) for rgb, t in zip(rgbs, tiles)]
    assert len(whole[0].cells) == 0 and min(len(r.cells) for r in whole[1:]) > 40
    assert [_same_tile_result(a, b) for a, b in zip(boxed, whole)] == [[], [], []]


def test_a_content_box_lies_on_the_tiles_grid_and_reaches_32_um_past_its_content():
    from her2score.pipeline import CONTENT_REACH_UM, _content_box

    h = np.zeros((576, 576), np.float32)
    d = np.zeros_like(h)
    box = partial(_content_box, mpp=0.5, start_od=0.06, cell_radius_um=9.0)
    assert box(h, d) == (slice(0, 16), slice(0, 16))  # glass: one square, where no cell can be
    d[300, 200] = 0.03  # DAB alone is content too, from half the least OD a cell starts from
    rows, cols = box(h, d)
    reach = (9.0 + CONTENT_REACH_UM) / 0.5
    assert (rows.start, rows.stop, cols.start, cols.stop) == (224, 368, 128, 272)
    assert all(s.start % 16 == 0 and s.stop % 16 == 0 for s in (rows, cols))
    assert rows.start <= 300 - reach and rows.stop >= 301 + reach and cols.start <= 200 - reach and cols.stop >= 201 + reach
    h[570, 3] = 1.0  # near the tile's edges: the box ends there
    assert box(h, d) == (slice(224, 576), slice(0, 272))
    assert box(h[:570], d[:570]) == (slice(0, 570), slice(0, 576))  # off the grid: the whole tile
    assert box(h, d, start_od=0.0601) == (slice(496, 576), slice(0, 80))  # a cell starts at 0.0601: 0.03 is glass
    assert box(h, d, start_od=0.0601, cell_radius_um=41.0) == (slice(432, 576), slice(0, 144))  # a wider cell: a wider box
    for mpp in (0.4, 0.3, 0.2):  # a coarse grid (2 µm, 1 µm) off the box's 16 px: the whole tile
        assert box(h, d, mpp=mpp) == (slice(0, 576), slice(0, 576))
    assert box(h, d, mpp=0.25, start_od=0.0601) == (slice(432, 576), slice(0, 144))


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_a_worker_count_that_is_no_count_of_processes_is_refused(workers, tmp_path):
    from her2score.batch import run_batch

    with pytest.raises(ValueError, match=r"workers must be a whole number of processes, at least 1, got "):
        analyse_slide(ArraySlide(np.full((64, 64, 3), 240, np.uint8), mpp=0.5), workers=workers)
    with pytest.raises(ValueError, match=r"workers must be a whole number of processes, at least 1, got "):
        run_batch([str(tmp_path)], tmp_path / "out", workers=workers)
    assert not (tmp_path / "out").exists()


def test_a_numpy_worker_count_is_a_count():
    f = generate_field("2+", seed=3, size_px=(128, 128))
    assert score_slide(ArraySlide(f.image, mpp=f.mpp), workers=np.int64(1)).score is not None


@pytest.mark.parametrize("target_mpp", [0.5, 0.4])
def test_a_field_cropped_by_a_pixel_reads_as_it_did(target_mpp):
    """grow_cells floods at 1 µm/px: an odd-sided field (511 px at 0.5 µm/px) made its flood grid 256 pixels for 511,
    which drifted the cells' borders off their membranes: the sample 2+ read 75.1% complete whole and 67.0% with one
    pixel cropped off its top and left. Padded to whole flood pixels, it reads 73.6% (measured; 74.9% at 510 px). At
    0.4 µm/px (2 flood pixels for 5) every tile was off the grid: 66.2% whole, now 72.1% and 69.9-73.1% cropped."""
    rgb = np.asarray(Image.open(Path(__file__).resolve().parent.parent / "sample_images" / "field_2plus_a.png").convert("RGB"))

    def complete(im) -> float:
        p = score_slide(ArraySlide(np.ascontiguousarray(im), mpp=0.5), config=ScoringConfig(mpp=target_mpp)).percentages
        return p["weak_moderate_complete"] + p["strong_complete"]

    whole = complete(rgb)
    assert whole > 70  # as read at 0.5 µm/px, 75.1%
    for cropped in (rgb[1:, 1:], rgb[:-1, :-1], rgb[1:, :], rgb[:, 1:]):
        assert abs(complete(cropped) - whole) <= 2.5, (complete(cropped), whole)
