import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from her2score.categories import CATEGORIES
from her2score.guidelines import apply_guideline
from her2score.imagecheck import stain_fractions
from her2score.stain import H_DAB, deconvolve, optical_density
from her2score.synthetic import (
    REAL_BORDERS,
    generate_field,
    generate_he_field,
    make_slide,
    paint_membranes,
    write_dataset,
    write_pyramidal_tiff,
    write_samples,
)


def _fractions(f):
    """Share of tumour cells per category of their own membrane deposit (what the class draws)."""
    cat = f.cells["deposit_category"][f.cells["tumour"]]
    assert len(cat) > 100
    return {k: float(np.mean(cat == k)) for k in CATEGORIES}


def test_deterministic_per_seed():
    a, b = generate_field("2+", seed=11), generate_field("2+", seed=11)
    assert np.array_equal(a.image, b.image)
    assert a.truth_counts() == b.truth_counts()
    assert not np.array_equal(a.image, generate_field("2+", seed=12).image)
    assert a.image.shape == (512, 512, 3) and a.image.dtype == np.uint8
    assert set(a.truth_counts()) == set(CATEGORIES)
    json.dumps(a.to_truth_dict())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_composition_matches_class(seed):
    null = _fractions(generate_field("0", seed=seed, variant="null"))
    assert null["none"] == 1.0
    ul = _fractions(generate_field("0", seed=seed, variant="ultralow"))
    assert 0 < ul["faint_partial"] <= 0.08 and ul["none"] + ul["faint_partial"] == 1.0
    one = _fractions(generate_field("1+", seed=seed))
    assert one["faint_partial"] > 0.2 and one["none"] + one["faint_partial"] == 1.0
    two = _fractions(generate_field("2+", seed=seed))
    assert two["weak_moderate_complete"] > 0.2 and two["strong_complete"] == 0
    three = _fractions(generate_field("3+", seed=seed))
    assert three["strong_complete"] > 0.25
    g = _fractions(generate_field("3+", seed=seed, gastric=True))
    assert g["strong_lateral"] > 0.1 and g["strong_complete"] > 0.1


def test_cell_truth_consistent():
    f = generate_field("3+", seed=5, gastric=True)
    c = f.cells
    t = c["tumour"]
    cat, comp, od = c["deposit_category"][t], c["deposit_completeness"][t], c["deposit_od"][t]
    assert np.all(od[cat == "strong_complete"] >= 0.6) and np.all(comp[cat == "strong_complete"] > 0.85)
    wm = cat == "weak_moderate_complete"
    assert np.all((od[wm] >= 0.2) & (od[wm] < 0.6))
    lat = cat == "strong_lateral"
    assert np.all((comp[lat] > 0.5) & (comp[lat] < 0.8))
    fp = cat == "faint_partial"
    assert np.all(c["deposit_longest_arc"][t][fp] <= 0.35) and np.all((comp[fp] > 0.1) & (comp[fp] < 0.65))
    assert np.all(od[cat == "none"] == 0)
    assert c["width_um"][t][cat == "strong_complete"].mean() > 1.5
    assert np.all((c["x_px"] >= 0) & (c["x_px"] < 512) & (c["y_px"] >= 0) & (c["y_px"] < 512))


@pytest.mark.parametrize("seed", [1, 2])
def test_truth_sees_a_membrane_from_both_cells_it_separates(seed):
    """The truth follows the README's convention: a cell enclosed by stained membrane (its own or its
    neighbours') takes that pattern; one stained side of a neighbour's leaves it as its own deposit."""
    f = generate_field("3+", seed=seed)
    c = {k: v[f.cells["tumour"]] for k, v in f.cells.items()}
    seen, own = c["category"], c["deposit_category"]
    assert np.all(seen[own != "none"] != "none")  # never less stained than its own deposit
    changed = seen != own
    assert 0 < changed.mean() < 0.5
    assert np.all((c["completeness"][changed] >= 0.75) | (c["longest_arc"][changed] >= 0.5))
    assert np.any((own == "none") & (seen == "strong_complete"))  # an unstained cell surrounded by strong ones
    assert np.all(seen[own == "strong_complete"] == "strong_complete")  # its own complete ring decides
    for score in ("0", "1+", "2+", "3+"):  # the class's call holds on the cells as seen
        g = generate_field(score, seed=seed)
        assert apply_guideline(g.truth_counts(), "breast-asco-cap-2023").score == score


def test_beer_lambert_dab_od():
    null = generate_field("0", seed=4, variant="null")
    dab = deconvolve(null.image, null.stains)[..., 1]
    assert abs(float(np.median(dab[null.label_map >= 0]))) < 0.03
    assert np.percentile(dab, 99) < 0.12
    f = generate_field("3+", seed=4)
    dab = deconvolve(f.image, H_DAB.with_background(f.stains.background))[..., 1]
    rows = f.label_map
    own = f.cells["deposit_category"]
    strong = np.isin(rows, np.flatnonzero(own == "strong_complete")) & (f.dab_od > 0.5)
    none = np.isin(rows, np.flatnonzero(own == "none")) & (f.dab_od < 0.01)
    # faint lines (OD 0.09-0.17 drawn) from a 1+ field: on a 3+ field a faint cell's border pixels mostly show the
    # tail of a stronger neighbour's line (a shared border shows the darker deposit), not its own
    g = generate_field("1+", seed=4)
    faint = np.isin(g.label_map, np.flatnonzero(g.cells["deposit_category"] == "faint_partial")) & (g.dab_od > 0.05)
    assert strong.sum() > 100 and faint.sum() > 1000 and none.sum() > 100
    faint_dab = deconvolve(g.image, H_DAB.with_background(g.stains.background))[..., 1]
    s, fa, no = dab[strong].mean(), faint_dab[faint].mean(), dab[none].mean()
    assert s > 0.4 and s > 2 * fa and fa > no
    assert abs(no) < 0.05


def test_he_has_eosin_and_null_has_not():
    he = generate_he_field(seed=3)
    assert he.shape == (512, 512, 3)
    assert stain_fractions(optical_density(he))[0] > 0.3  # eosin fraction
    assert stain_fractions(optical_density(generate_field("0", seed=3, variant="null").image))[0] < 0.05


def test_pyramidal_tiff_tifffile_and_openslide(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    openslide = pytest.importorskip("openslide")
    rgb, truth = make_slide("2+", seed=9, size_px=(1200, 800), mpp=0.25)
    assert rgb.shape == (800, 1200, 3) and truth.truth_counts()["weak_moderate_complete"] > 0
    assert (rgb[:20, :20].min(axis=2) > 225).all()  # glass at the corner
    p = write_pyramidal_tiff(tmp_path / "s.tif", rgb, mpp=0.25, tile=256, min_size=512)
    with tifffile.TiffFile(p) as t:
        assert len(t.pages) == 3
        assert [pg.subfiletype for pg in t.pages] == [0, 1, 1]
        assert t.pages[0].is_tiled
        assert abs(np.abs(t.pages[0].asarray().astype(int) - rgb).mean()) < 4
    with openslide.OpenSlide(str(p)) as s:
        assert s.level_count == 3
        assert s.level_dimensions[0] == (1200, 800)
        assert abs(float(s.properties["openslide.mpp-x"]) - 0.25) < 1e-3
        region = np.asarray(s.read_region((300, 100), 0, (400, 300)).convert("RGB")).astype(int)
        assert np.abs(region - rgb[100:400, 300:700]).mean() < 4


def test_write_dataset_png_mpp(tmp_path):
    out = write_dataset(tmp_path / "ds", n_per_class=1, seed=3, size_px=(128, 128), mpp=0.5)
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert [r["label"] for r in rows] == ["0", "1+", "2+", "3+"]
    truth = [json.loads(x) for x in open(out / "truth.jsonl")]
    assert [t["score"] for t in truth] == ["0", "1+", "2+", "3+"]
    with Image.open(out / rows[0]["path"]) as im:
        assert im.size == (128, 128)
        dpi = im.info["dpi"][0]
        assert abs(25400.0 / dpi - 0.5) < 0.01


def test_real_borders_add_dab_along_cell_borders_and_leave_the_truth():
    plain = generate_field("1+", seed=5)
    real = generate_field("1+", seed=5, confounders=REAL_BORDERS)
    for key in ("category", "membrane_od", "completeness"):
        assert np.array_equal(plain.cells[key], real.cells[key])
    extra = real.dab_od - plain.dab_od
    assert extra.min() >= 0 and extra.max() > 0.05
    lm = plain.label_map
    edge = np.zeros(lm.shape, bool)
    edge[1:] |= lm[1:] != lm[:-1]
    edge[:, 1:] |= lm[:, 1:] != lm[:, :-1]
    near = cv2.dilate(edge.view(np.uint8), np.ones((5, 5), np.uint8)) > 0  # within 2 px (1 µm) of a border
    inside = ~near & (lm >= 0)
    inside[:3], inside[-3:], inside[:, :3], inside[:, -3:] = False, False, False, False  # borders with cells past the edge
    assert extra[near].mean() > 0.005 and extra[inside].max() < 0.005, (extra[near].mean(), extra[inside].max())


def test_a_dataset_written_over_and_stopped_half_way_leaves_no_stale_labels(tmp_path, monkeypatch):
    """synth over an earlier set, stopped while writing its third image: the earlier labels (which would now
    describe images written over) are gone, every image left is whole (the one being written is the old one,
    not a truncated new one), and no temporary file remains."""
    from her2score import synthetic

    out = synthetic.write_dataset(tmp_path / "ds", n_per_class=1, seed=3, size_px=(96, 96))
    assert (out / "labels.csv").exists() and (out / "truth.jsonl").exists()
    saves, real_save = [], Image.Image.save

    def stopped_in_the_third(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) < 3:
            return real_save(self, fp, *args, **kwargs)
        if hasattr(fp, "write"):
            fp.write(b"\x89PNG\r\n\x1a\n half an image")
        else:
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", stopped_in_the_third)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_dataset(out, n_per_class=1, seed=4, size_px=(96, 96))
    monkeypatch.undo()
    assert not (out / "labels.csv").exists() and not (out / "truth.jsonl").exists()
    images = sorted((out / "images").iterdir())
    assert len(images) == 4 and not any(p.name.startswith(".") for p in images)
    for image in images:
        Image.open(image).load()  # whole
    (out / "images" / "field_3plus_0007.png").write_bytes(b"mine")  # a user's own, named like a field
    synthetic.write_dataset(out, n_per_class=1, seed=4, size_px=(96, 96))  # its fields, without labels: written over
    assert len(list(csv.DictReader(open(out / "labels.csv")))) == 4 and len(list((out / "images").iterdir())) == 5
    assert (out / "images" / "field_3plus_0007.png").read_bytes() == b"mine"  # the stopped run never listed it
    assert (out / synthetic.FIELDS_LIST).read_text().split() == sorted(
        f"images/{p.name}" for p in (out / "images").iterdir() if p.name != "field_3plus_0007.png")
    (out / "labels.csv").unlink()  # deleted by hand: the list says which fields are the set's
    synthetic.write_dataset(out, n_per_class=1, seed=5, size_px=(96, 96), fmt="jpg")
    assert sorted(p.suffix for p in (out / "images").iterdir()) == [".jpg"] * 4 + [".png"]
    assert (out / "images" / "field_3plus_0007.png").read_bytes() == b"mine"
    stopped = tmp_path / "stopped"  # stopped before its first field, then the user's own files put in
    (stopped / "images").mkdir(parents=True)
    (stopped / synthetic.FIELDS_LIST).write_text("images/field_0_0000.png\n")
    (stopped / "truth.jsonl").write_text("mine")
    with pytest.raises(ValueError, match="holds files but none of a set synth wrote"):
        synthetic.write_dataset(stopped, n_per_class=1, seed=4, size_px=(96, 96))
    assert (stopped / "truth.jsonl").read_text() == "mine"


def test_a_set_written_over_an_earlier_one_replaces_its_fields_and_nothing_else(tmp_path):
    """synth over a larger earlier set left the extra fields in images/, which labels.csv no longer listed: they go now,
    as do fields of another format, while the user's files in the folder stay. A folder holding other files, or a
    labelled set synth did not write, is refused and left as it was; hidden files are no holding."""
    out = write_dataset(tmp_path / "ds", n_per_class=2, seed=3, size_px=(96, 96))
    (out / "eval").mkdir()
    (out / "eval" / "report.md").write_text("mine")
    (out / "images" / "mine.png").write_bytes(b"mine")
    (out / "images" / "field_3plus_0007.png").write_bytes(b"mine too")  # named like a field, listed in no labels
    names = lambda: sorted(p.name for p in (out / "images").iterdir())  # noqa: E731
    write_dataset(out, n_per_class=1, seed=4, size_px=(96, 96))
    fields = ["field_0_0000.png", "field_1plus_0000.png", "field_2plus_0000.png", "field_3plus_0000.png"]
    assert names() == sorted([*fields, "mine.png", "field_3plus_0007.png"]) and (out / "eval" / "report.md").read_text() == "mine"
    with pytest.raises(ValueError, match="field_3plus_0007.png: a file no earlier set of synth's lists, where this set "
                                         "writes a field; move it"):
        write_dataset(out, n_per_class=8, seed=4, size_px=(96, 96))
    assert (out / "images" / "field_3plus_0007.png").read_bytes() == b"mine too" and (out / "labels.csv").is_file()
    (out / "images" / "field_3plus_0007.png").unlink()
    assert sorted(Path(r["path"]).name for r in csv.DictReader(open(out / "labels.csv"))) == fields
    write_dataset(out, n_per_class=1, seed=4, size_px=(96, 96), fmt="jpg")
    assert names() == sorted([*(f.replace(".png", ".jpg") for f in fields), "mine.png"])

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"^{notes}: holds files but no set synth wrote"):
        write_dataset(notes, n_per_class=1, seed=4, size_px=(96, 96))
    real = tmp_path / "real"
    (real / "images").mkdir(parents=True)
    (real / "labels.csv").write_text("path,label\nimages/field_0_0000.png,2+\n")
    (real / "images" / "field_0_0000.png").write_bytes(b"a real scan")
    with pytest.raises(ValueError, match="labels.csv: not the labels of a set synth wrote"):
        write_dataset(real, n_per_class=1, seed=4, size_px=(96, 96))
    assert [p.name for p in notes.iterdir()] == ["todo.txt"] and (real / "images" / "field_0_0000.png").read_bytes() == b"a real scan"
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".DS_Store").write_bytes(b"")
    assert (write_dataset(hidden, n_per_class=1, seed=4, size_px=(96, 96)) / "labels.csv").is_file()


def test_the_committed_sample_images_are_what_write_samples_makes(tmp_path):
    """sample_images/ is synthetic.write_samples' output: the same truth, and the same pixels (the slide's within
    the rounding of its JPEG tiles)."""
    import tifffile

    committed = Path(__file__).resolve().parent.parent / "sample_images"
    made = write_samples(tmp_path)
    assert json.loads((made / "truth.json").read_text()) == json.loads((committed / "truth.json").read_text())
    assert sorted(p.name for p in made.iterdir()) == sorted(p.name for p in committed.iterdir())
    for png in sorted(committed.glob("*.png")):
        assert np.array_equal(np.asarray(Image.open(made / png.name)), np.asarray(Image.open(png))), png.name
    ours, theirs = tifffile.imread(made / "slide_2plus.tif"), tifffile.imread(committed / "slide_2plus.tif")
    assert ours.shape == theirs.shape and np.abs(ours.astype(int) - theirs).mean() < 0.5


# --------------------------------------------------------------------------- membranes painted on a given field

def _nuclei_grid(rows: int = 4, cols: int = 4, mpp: float = 0.5, spacing_um: float = 12.0, radius_um: float = 3.5):
    """A pale field (haematoxylin-tinted) with a grid of round nuclei; (rgb, nucleus labels, centres (x, y) px)."""
    side = round((max(rows, cols) + 1) * spacing_um / mpp)
    rgb = np.full((side, side, 3), (232, 228, 236), np.uint8)
    labels = np.zeros((side, side), np.int32)
    centres = []
    for i in range(rows):
        for j in range(cols):
            c = (round((j + 1) * spacing_um / mpp), round((i + 1) * spacing_um / mpp))
            cv2.circle(rgb, c, round(radius_um / mpp), (120, 110, 170), -1)
            cv2.circle(labels, c, round(radius_um / mpp), len(centres) + 1, -1)
            centres.append(c)
    return rgb, labels, np.array(centres, float)


def test_painting_nothing_leaves_the_field_as_it_was():
    rgb, labels, _ = _nuclei_grid()
    f = paint_membranes(rgb, labels, mpp=0.5, composition={}, seed=1)
    assert np.array_equal(f.image, rgb)
    assert f.score == "0" and f.variant == "painted" and f.truth_counts()["none"] == 16
    assert not f.dab_od.any()
    assert set(np.unique(f.label_map)) == set(range(-1, 16))


def test_painted_membranes_lie_between_the_nuclei_and_darken_only_there():
    rgb, labels, centres = _nuclei_grid()
    f = paint_membranes(rgb, labels, mpp=0.5, composition={"strong_complete": 1.0}, seed=2)
    assert f.score == "3+" and f.truth_counts()["strong_complete"] == 16
    assert np.allclose(np.column_stack([f.cells["x_px"], f.cells["y_px"]]), centres, atol=0.5)
    line = f.dab_od > 0.05  # the deposit's visible line (log10 OD); its tails reach the nuclei's edges, its core never
    assert not (f.dab_od > 0.35)[labels > 0].any() and not line[centres[:, 1].astype(int), centres[:, 0].astype(int)].any()
    mid = ((centres[0] + centres[1]) / 2).astype(int)  # midway between two neighbouring nuclei, 6 µm from each
    assert f.dab_od[mid[1], mid[0] - 2 : mid[0] + 3].max() > 0.3
    brown = deconvolve(f.image, H_DAB.with_background((232.0, 228.0, 236.0)))[..., 1]
    far = ~cv2.dilate(line.view(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)  # 2 µm or more from the line
    assert brown[line].mean() > 0.2
    assert np.array_equal(f.image[far], rgb[far])


def test_painted_composition_is_exact_and_deterministic():
    rgb, labels, _ = _nuclei_grid()
    a = paint_membranes(rgb, labels, mpp=0.5, composition={"weak_moderate_complete": 0.25}, seed=3)
    b = paint_membranes(rgb, labels, mpp=0.5, composition={"weak_moderate_complete": 0.25}, seed=3)
    assert np.count_nonzero(a.cells["deposit_category"] == "weak_moderate_complete") == 4
    assert np.array_equal(a.image, b.image) and a.truth_counts() == b.truth_counts()
    assert not np.array_equal(a.image, paint_membranes(rgb, labels, mpp=0.5, composition={"weak_moderate_complete": 0.25},
                                                       seed=4).image)


def test_painting_refuses_what_it_cannot_paint():
    rgb, labels, _ = _nuclei_grid()
    with pytest.raises(ValueError, match="uint8"):
        paint_membranes(rgb.astype(float), labels, mpp=0.5, composition={}, seed=1)
    with pytest.raises(ValueError, match="the size of rgb"):
        paint_membranes(rgb, labels[:-1], mpp=0.5, composition={}, seed=1)
    with pytest.raises(ValueError, match="no nucleus"):
        paint_membranes(rgb, np.zeros_like(labels), mpp=0.5, composition={}, seed=1)
    with pytest.raises(ValueError, match="composition categories"):
        paint_membranes(rgb, labels, mpp=0.5, composition={"brown": 0.2}, seed=1)
    with pytest.raises(ValueError, match="whole numbers >= 0"):
        paint_membranes(rgb, labels - 1, mpp=0.5, composition={}, seed=1)
    with pytest.raises(ValueError, match="whole numbers >= 0"):
        paint_membranes(rgb, labels.astype(float), mpp=0.5, composition={}, seed=1)


def test_a_nucleus_mask_is_painted_as_its_labelled_nuclei():
    rgb, labels, _ = _nuclei_grid()
    mask = paint_membranes(rgb, labels > 0, mpp=0.5, composition={"strong_complete": 0.5}, seed=5)
    labelled = paint_membranes(rgb, labels, mpp=0.5, composition={"strong_complete": 0.5}, seed=5)
    assert mask.truth_counts() == labelled.truth_counts() and mask.truth_counts()["strong_complete"] == 8


def test_painting_an_empty_field_says_there_is_no_nucleus():
    with pytest.raises(ValueError, match="no nucleus"):
        paint_membranes(np.zeros((0, 0, 3), np.uint8), np.zeros((0, 0), np.int32), mpp=0.5, composition={}, seed=1)


def test_painting_refuses_a_reach_that_leaves_no_cell():
    """A reach of 0 or less gives no cell beyond its nucleus to paint, and the truth would count membranes never laid."""
    rgb, labels, _ = _nuclei_grid()
    for reach in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="reach_um"):
            paint_membranes(rgb, labels, mpp=0.5, composition={"strong_complete": 1.0}, seed=2, reach_um=reach)
    for mpp in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="mpp"):
            paint_membranes(rgb, labels, mpp=mpp, composition={}, seed=2)
