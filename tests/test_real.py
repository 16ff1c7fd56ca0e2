"""The scorer on real images it was not made from (../shared/data/real and scikit-image's colon IHC).

None carries a HER2 label; each test asserts only what the image's SOURCE.md says a pathologist
sees: H&E is the wrong stain, Ki67 is nuclear DAB (never membrane staining), the colon glands carry
strong membranous DAB over unstained stroma, and a field with its DAB removed is a real HER2 0.
"""
from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
from PIL import Image

from her2score.imagecheck import NotHerIhcError
from her2score.guidelines import FALSE_MEMBRANE_PERCENT
from her2score.membrane import noise_floor
from her2score.pipeline import NuclearStainError, ScoringConfig, WrongStainError, analyse_slide, score_tile
from her2score.slide import ArraySlide
from her2score.stain import H_DAB, deconvolve, estimate_background, estimate_stains, optical_density
from her2score.synthetic import REAL_BORDERS, Confounders, generate_field
from her2score.tissue import Tile
from realdata import (PAINTED_FIELDS, REAL, _as_array, deepliif_detection, deepliif_tumour_selection, matched_categories,
                      painted_field, real_cases, recoloured)

CASES = {c.name: c for c in real_cases()}
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real images not found at {REAL}")


def analyse(case):
    return analyse_slide(case.slide(), mpp=case.mpp)


def names(kind: str) -> list[str]:
    return [n for n, c in CASES.items() if c.kind == kind]


@needs_real
@pytest.mark.parametrize("name", names("he"))
def test_he_is_refused_before_scoring(name):
    with pytest.raises(WrongStainError, match="H&E"):
        analyse(CASES[name])


@needs_real
def test_real_haematoxylin_lies_off_the_default_vectors_mostly_away_from_dab():
    """README, Stain vectors: the real images' own haematoxylin lies 5-15 deg from Ruifrok-Johnston's,
    leaning away from DAB (a negative, harmless leak) but for the colon's, which leans towards it."""
    from her2score.stain import _angle, _toward

    off, lean = {}, {}
    ref_h, ref_d = np.array(H_DAB.hematoxylin), np.array(H_DAB.dab)
    for name in ["skimage-colon-ihc", *names("nuclear")]:
        rgb = _as_array(CASES[name])()
        own, note = estimate_stains(rgb, background=estimate_background(rgb), leak_deg=-90)  # the estimate, always
        if not note.startswith("too little"):
            h = np.array(own.hematoxylin)
            off[name], lean[name] = _angle(h, ref_h), _toward(h, ref_h, ref_d)
    assert len(off) >= 6 and all(4 <= v <= 16 for v in off.values()), off  # measured 5.3-15.3
    assert lean.pop("skimage-colon-ihc") > 0 and all(v < 0 for v in lean.values()), lean


@needs_real
@pytest.mark.parametrize("name", names("nuclear"))
def test_nuclear_dab_never_scores_2_or_3(name):
    try:
        r = analyse(CASES[name]).result
    except NuclearStainError as e:
        nuclei, membranes = (float(v) for v in re.findall(r"(\d+\.\d+)% (?:of tumour cells have DAB-stained nuclei|a stained membrane)", str(e)))
        assert "DAB is nuclear" in str(e) and nuclei >= 0.5 * membranes  # shares to a decimal: the refusal's own test, shown
        return
    assert r.score in (None, "0", "1+"), r.reason
    assert not r.qc_passed  # what is left unrefused is too small a field for a call (a pale 1-2% Ki67 field)


@needs_real
@pytest.mark.parametrize("name", names("nuclear-derived"))
def test_ki67_crops_wrong_scales_and_heavy_jpeg_are_refused_as_nuclear(name):
    """A Ki67 field's crops at 0.5 µm/px, the field given 2.2x its µm/px, and the field at JPEG quality 60 or 50 are
    refused as nuclear DAB, also where the slide's own stain vectors are tried: membranes read stained next to
    brown nuclei (11-19% of cells), but a HER2 stain leaves nuclei unstained (they scored HER2 1+, QC passed)."""
    with pytest.raises(NuclearStainError, match="DAB is nuclear"):
        analyse(CASES[name])


@pytest.mark.parametrize("name", names("inverted"))
def test_inverted_fields_are_refused_as_no_brightfield_slide(name):
    """A real field inverted (a dark, tinted background with glowing nuclei, as a darkfield or fluorescence
    rendering looks) is no brightfield slide: refused as dark (the inverted Ki67 field scored HER2 2+)."""
    with pytest.raises(NotHerIhcError, match="of the image is dark"):
        analyse(CASES[name])


@needs_real
def test_most_ki67_fields_are_refused_as_nuclear():
    refused = 0
    for name in names("nuclear"):
        try:
            analyse(CASES[name])
        except NuclearStainError:
            refused += 1
    assert refused >= len(names("nuclear")) - 1


@needs_real
def test_real_unstained_membranes_stay_under_the_false_membrane_share():
    """Scored with the nuclear refusal off, a real Ki67 field's membranes are all unstained: the share of
    its tumour cells read stained is what false membranes alone give. On the large fields it stays under
    guidelines.FALSE_MEMBRANE_PERCENT (measured 6.1% and 6.3%), so their call is at most an ultralow that
    says it could be null, never 1+. A membrane threshold lowered to find more faint synthetic membranes
    fails here first (README Limits: arcs grown down to 0.6x the floor read 27-32%)."""
    large = 0
    for name in names("nuclear"):
        r = analyse_slide(CASES[name].slide(), mpp=CASES[name].mpp, config=ScoringConfig(nuclear_stain_min=1.0)).result
        if r.tumour_cells < 500:
            continue
        large += 1
        stained = 100 - r.percentages["none"]
        assert stained < FALSE_MEMBRANE_PERCENT, (name, r.percentages)
        assert r.level == "0 (null)" or (r.level == "0+ (ultralow)" and "null_or_ultralow" in r.flags), (name, r.reason)
    assert large >= 2

@needs_real
def test_every_real_ki67_field_read_ultralow_says_it_could_be_null():
    """The small DeepLIIF fields too (the test above keeps the large ones): scored with the nuclear refusal off, a
    real Ki67 field's membranes are all unstained, so an ultralow call on it is what false membranes give and carries
    null_or_ultralow (guidelines.FALSE_STRONGER_PERCENT was set on these six fields), and a call above 0 is near the
    cut-off. A discount for shared borders with strong_od 0.37 read three brown nuclei's edges on deepliif-ki67-34_3
    intense partial and lost it (README). Measured: 22_2 and 799_2 ultralow (1.8% and 8.3% stained), 34_3 and 6_2 1+
    on 12.7% and 10.3% (on the flood grid's first pixels: 34_3 ultralow on 10.0%, 6_2 2+ on 28.6%)."""
    read = {}
    for name in names("nuclear"):
        if not name.startswith("deepliif-ki67-"):
            continue
        r = analyse_slide(CASES[name].slide(), mpp=CASES[name].mpp, config=ScoringConfig(nuclear_stain_min=1.0)).result
        read[name] = (r.level, r.flags, r.counts)
    ultralow = {n: v for n, v in read.items() if v[0] == "0+ (ultralow)"}
    assert len(read) == 4 and len(ultralow) >= 2, read
    assert all("null_or_ultralow" in flags for _, flags, _ in ultralow.values()), ultralow
    assert all("near_cutoff" in flags for level, flags, _ in read.values() if level not in ("0 (null)", "0+ (ultralow)")), read


@pytest.mark.parametrize("mpp", [0.25, 0.3, 0.5])
def test_the_shipped_cnn_never_lifts_the_real_ki67_field_to_her2_low(mpp):
    """DeepLIIF 799_2, a Ki67 field with a faint DAB blush that the nuclear refusal lets through, as the CLI scores it
    (the shipped CNN fused): the CNN reads it 1+, but its cells' 0+ (ultralow) is staining false membranes could give
    (at 0.3 µm/px 9.8% of 61 cells: within its 95% interval), so the call stays 0 and is never HER2-low."""
    if "deepliif-ki67-799_2" not in CASES or not REAL.is_dir():
        pytest.skip("real images not found")
    from her2score.cnn import load_onnx_model

    rgb = _as_array(CASES["deepliif-ki67-799_2"])()
    r = analyse_slide(ArraySlide(rgb, mpp=mpp), cnn=load_onnx_model()).result
    assert r.cnn.score == "1+" and (r.classical_score, r.score) == ("0", "0"), r.reason
    assert "her2_low" not in r.flags and "not followed to a higher score" in r.reason


@pytest.mark.parametrize("name", names("derived-0"))
def test_real_fields_without_their_dab_score_0(name):
    if name != "skimage-colon-ihc-dab-removed" and not REAL.is_dir():
        pytest.skip("real images not found")
    r = analyse(CASES[name]).result
    assert r.score == "0" and r.percentages["none"] >= 99.0, (r.level, r.percentages)
    assert r.staining["compartment"] in ("none", "nucleus", "membrane")


@pytest.fixture(scope="module")
def colon():
    return analyse(CASES["skimage-colon-ihc"]), CASES["skimage-colon-ihc"].load()


def _intense(r) -> float:
    return sum(r.percentages[c] for c in ("strong_complete", "strong_lateral", "strong_partial"))


def test_strong_membranous_glands_give_a_large_intense_fraction(colon):
    a, _ = colon
    r = a.result
    assert r.score == "3+"
    assert _intense(r) >= 35 and r.percentages["strong_complete"] >= 10
    assert r.staining["compartment"] == "membrane" and r.staining["dab_floor_od"] < 0.05


SCORES = ("0", "1+", "2+", "3+")


def test_the_colon_with_weaker_dab_reads_weaker_down_to_null(colon):
    """The real colon with its DAB OD scaled down (1, 0.5, 0.25, 0.12, 0.05, then none): the same membranes
    fading, with no truth beyond that. The score and the H-score never rise as the DAB falls, the call
    passes through every score on the way from 3+ to 0 (null), and the tumour cells stay the same cells
    (their selection reads no DAB). Measured: 3+ H 226, 2+ 179, 2+ 136, 1+ 43, then 0 (null) 0 at 0.05 and
    without DAB; 193-199 tumour cells (weak-to-moderate partial cells weigh 2, no longer 1 as faint ones)."""
    results = [colon[0].result, *(analyse(CASES[n]).result for n in names("weaker")),
               analyse(CASES["skimage-colon-ihc-dab-removed"]).result]
    seen = [(r.score, r.level, r.h_score, r.tumour_cells) for r in results]
    ranks = [SCORES.index(r.score) for r in results]
    assert ranks == sorted(ranks, reverse=True) and set(ranks) == set(range(4)), seen
    assert [r.h_score for r in results] == sorted((r.h_score for r in results), reverse=True), seen
    assert results[0].score == "3+" and results[-1].level == "0 (null)", seen
    n = results[0].tumour_cells
    assert all(abs(r.tumour_cells - n) <= 0.1 * n for r in results), seen


@pytest.mark.parametrize("name", ["skimage-colon-ihc", "skimage-colon-ihc-dab-0.12", "skimage-colon-ihc-dab-removed"])
def test_real_fields_in_focus_pass_the_focus_check_and_blurred_ones_fail_it(name):
    """The real colon, its 1+ and its HER2 0 (DAB scaled down, removed) under a pale counterstain are as sharp as
    one another: the check reads sharpness against the tissue's own contrast. The Laplacian's variance alone
    failed the real HER2 0 and 1+ as out of focus (0.0012 and 0.0014 against a floor of 0.0015) and passed a
    generated 3+ blurred by 0.75 µm. Blurred by 0.75 µm, each fails."""
    rgb = CASES[name].load()
    sharp = analyse_slide(ArraySlide(rgb, mpp=0.5)).result
    blurred = analyse_slide(ArraySlide(cv2.GaussianBlur(rgb, (0, 0), 1.5), mpp=0.5)).result
    assert "out_of_focus" not in {q.code for q in sharp.qc}, sharp.qc
    assert {q.code: q.severity for q in blurred.qc}.get("out_of_focus") == "fail", blurred.qc


@pytest.mark.parametrize("name", names("pale"))
def test_a_paler_counterstain_keeps_the_colons_cells_and_its_shares(name, colon):
    """The real colon under a lighter counterstain (0.7 and 0.5 x its haematoxylin OD): its nuclei fall
    under a fixed nucleus threshold, and with them mostly the unstained cells, which inflates the
    stained shares. The thresholds follow the counterstain (cells.nucleus_thresholds), so the cells stay
    and so do the shares, within 8.5 points (turning the field moves them by up to 5.0, bounded at 7.5:
    test_the_real_colon_turned_or_mirrored_...). Measured with every morphological step's kernel round (0.5.0): 156 and 117 of the colon's 191
    tumour cells, intense 82.1% and 79.5% against 77.5%; with fixed thresholds 92 cells at 79.3% and 14 cells at
    92.9% (0.4.9: 159 and 127 of 198 at 81.8% and 74.0% against 73.7%, fixed 98 at 83.7% and 10 at 100%). At 0.7 x
    the fixed thresholds keep under half the cells, their share no further off: it is the cells they lose."""
    base = colon[0].result
    r = analyse(CASES[name]).result
    fixed = analyse_slide(CASES[name].slide(), mpp=CASES[name].mpp, config=ScoringConfig(counterstain_ratio=0)).result
    assert r.score == "3+" and r.staining["nucleus_threshold_od"] < fixed.staining["nucleus_threshold_od"] == 0.10
    assert "weak_counterstain" in {q.code for q in r.qc} & {q.code for q in fixed.qc} - {q.code for q in base.qc}
    assert r.tumour_cells >= 0.55 * base.tumour_cells > fixed.tumour_cells, (r.tumour_cells, fixed.tumour_cells)
    assert abs(_intense(r) - _intense(base)) <= 8.5, (_intense(r), _intense(fixed))



def test_nucleus_thresholds_lowered_under_any_ratio_are_reported(colon):
    """The real colon's counterstain (0.119 OD) is dark enough for the default ratio (0.85 x 0.119 >= 0.10): nothing
    lowered, no warning. Under counterstain_ratio 0.5 the thresholds fall to 0.059 OD, and the QC says so (it
    judged the slide by the default ratio alone, and kept quiet)."""
    assert "weak_counterstain" not in {q.code for q in colon[0].result.qc}
    r = analyse_slide(CASES["skimage-colon-ihc"].slide(), mpp=0.5, config=ScoringConfig(counterstain_ratio=0.5)).result
    assert r.staining["nucleus_threshold_od"] < 0.10 and "weak_counterstain" in {q.code for q in r.qc}

def test_colon_stroma_and_inflammatory_cells_are_mostly_left_out(colon):
    """Cells in the DAB-free lamina propria (stroma, lymphocytes) versus cells in the glands."""
    a, rgb = colon
    t = a.cells
    dab = cv2.GaussianBlur(deconvolve(rgb, H_DAB.with_background(estimate_background(rgb)))[..., 1], (0, 0), 8)
    around = dab[np.clip(t["y"].astype(int), 0, 511), np.clip(t["x"].astype(int), 0, 511)]
    gland, stroma = around > 0.2, around < 0.08
    assert gland.sum() > 150 and stroma.sum() > 80
    assert t["tumour"][gland].mean() > 0.65
    assert t["tumour"][stroma].mean() < 0.30  # measured 0.20 since nuclei are measured by their core (0.41 by their mask, 0.47 before the plasma-cell and matrix rules): plump stromal nuclei still pass (see README Limits)
    assert t["tumour"][stroma].mean() < t["tumour"][gland].mean() - 0.25
    excluded = a.result.region
    assert "lymphocyte-like" in excluded and "spindle" in excluded


@needs_real
def test_nuclei_found_against_deepliif_masks():
    """DeepLIIF's masks outline tumour nuclei (Ki67+ and -); stromal nuclei we find are not in them.
    Measured recall 0.88, precision 0.61; 0.76 and 0.62 with fixed thresholds, which lose the pale 799_2's nuclei."""
    tp, det, gt = deepliif_detection()
    recall, precision = tp / gt, tp / det
    assert recall >= 0.82 and precision >= 0.5, (recall, precision)



@needs_real
def test_tumour_cells_without_an_annotation_against_deepliif_masks():
    """Cells flagged tumour with no annotation given, against the tumour nuclei DeepLIIF outlines:
    measured precision 0.67, recall 0.76 over the 4 fields with every morphological step's kernel round (0.5.0;
    0.4.9 0.66 / 0.78, 0.4.8 0.67 / 0.79; 0.66 / 0.81 with nuclei measured by their mask, 0.64 / 0.82 before the
    plasma-cell and matrix rules); stroma-rich 6_2 worst, 0.42 / 0.42 (0.4.9 0.45 / 0.46); the pale 799_2 0.49 / 0.61
    (0.4.9 0.55 / 0.70; 0.29 / 0.18 before the nucleus thresholds followed the counterstain)."""
    sel = deepliif_tumour_selection()
    flagged, right, annotated = (sum(v[i] for v in sel.values()) for i in range(3))
    assert right / flagged >= 0.65 and right / annotated >= 0.75, sel


# --------------------------------------------------------------------------- membranes of known truth painted on real tissue

PAINTED_CLASSES = {"0": {}, "1+": {"faint_partial": 0.40}, "2+": {"weak_moderate_complete": 0.50, "faint_partial": 0.10},
                   "3+": {"strong_complete": 0.60, "weak_moderate_complete": 0.20, "faint_partial": 0.10}}
"""Compositions well away from every cut-off, by the call they make (benchmarks/painted_real.py's clear classes)."""

PAINTED_CUTOFFS = tuple(("breast-asco-cap-2023", c) for c in (
    {"faint_partial": 0.08}, {"faint_partial": 0.12}, {"weak_moderate_complete": 0.08}, {"weak_moderate_complete": 0.12},
    {"strong_complete": 0.08}, {"strong_complete": 0.12}, {"strong_partial": 0.12})) + tuple(("gastric", c) for c in (
    {"strong_lateral": 0.08}, {"strong_lateral": 0.12}, {"weak_moderate_lateral": 0.12}))
"""(guideline, composition) whose deciding cells lie either side of a 10% cut-off."""


def _painted(name: str, composition: dict, clonal: bool, guideline: str = "breast-asco-cap-2023"):
    f = painted_field(name, composition, seed=0, clonal=clonal, gastric=guideline == "gastric")
    return f, analyse_slide(ArraySlide(f.image, mpp=f.mpp), config=ScoringConfig(guideline=guideline))


@needs_real
@pytest.mark.parametrize("name", PAINTED_FIELDS)
@pytest.mark.parametrize("score", PAINTED_CLASSES)
def test_membranes_painted_on_real_tissue_get_their_call(name, score):
    """Real tissue (a DeepLIIF field, its Ki67 removed) with membranes of known truth on its annotated tumour
    cells, scattered and in clones: the call is the truth's (benchmarks/painted_real.py: 48 of 48 over 3 seeds)."""
    for clonal in (False, True):
        f, a = _painted(name, PAINTED_CLASSES[score], clonal)
        assert f.score == score and a.result.score == score, (clonal, a.result.percentages, a.result.reason)
        if score == "0":  # untouched, the real DAB background reads ~5% stained: an ultralow that says it could be null
            assert a.result.level == "0 (null)" or "null_or_ultralow" in a.result.flags, (a.result.level, a.result.flags)


@needs_real
@pytest.mark.parametrize("name", PAINTED_FIELDS)
def test_membranes_painted_on_real_tissue_near_a_cutoff_are_never_called_wrong_unflagged(name):
    """Where the deciding cells lie at 8% or 12% of a real field's tumour cells (about 60-130 of them), breast and
    gastric, a wrong call always carries near_cutoff, so eligibility asks for review (benchmarks/painted_real.py: 31 of
    120 right, the 89 wrong all flagged: real unstained borders read ~5% stained, faint membranes are under-read)."""
    wrong = []
    for guideline, composition in PAINTED_CUTOFFS:
        for clonal in (False, True):
            f, a = _painted(name, composition, clonal, guideline)
            if a.result.score != f.score:
                wrong.append((composition, clonal, f.score, a.result.score, a.result.flags))
    assert all("near_cutoff" in w[-1] for w in wrong), wrong


@needs_real
def test_membranes_painted_on_real_tissue_are_read_cell_by_cell():
    """Each painted cell against the cell scored on its nucleus (one-to-one within 4 µm), over both fields' 2+ and 3+,
    scattered and clonal: of the cells found and counted as tumour, measured 76% of the weak-to-moderate complete,
    78% of the strong complete and 89% of the unstained cells read at their true category (the unstained beside
    stained ones read partial or lateral; the few faint cells among stained ones, 17%). About a third of all cells,
    stained or not alike (31-38%), are lost to detection and tumour selection (the DeepLIIF figures above), most of
    those the field's edge cuts among them."""
    pairs = []
    for name in PAINTED_FIELDS:
        for score in ("2+", "3+"):
            for clonal in (False, True):
                f, a = _painted(name, PAINTED_CLASSES[score], clonal)
                pairs += matched_categories(f, a.cells)
    for true in ("weak_moderate_complete", "strong_complete", "none"):
        read = [r for t, r in pairs if t == true and r not in ("missed", "non-tumour")]
        lost = sum(t == true for t, _ in pairs) - len(read)
        assert len(read) >= 100 and np.mean([r == true for r in read]) >= (0.8 if true == "none" else 0.7), (true, len(read), lost)
        assert lost <= 0.45 * (lost + len(read)), (true, len(read), lost)


def _benchmark(name: str):
    """The module benchmarks/<name>.py."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_painted_benchmark_names_every_column_of_its_cell_table_apart():
    """benchmarks/painted_real.py's cell-by-cell table: each category read gets a column heading of its own (cut to
    12 characters, weak_moderate_complete, _lateral and _partial all read "weak_moderat")."""
    from her2score.categories import CATEGORIES

    bench = _benchmark("painted_real")
    heads = [bench.column(c) for c in (*CATEGORIES, "non-tumour", "missed")]
    assert len(set(heads)) == len(heads) and max(map(len, heads)) <= 12, heads


@pytest.mark.parametrize("dab", [1.0, 0.5])
def test_a_real_cells_shared_and_lone_borders_read_alike(dab):
    """Within one cell of the real colon IHC, the border sectors it shares with a cell enclosed by its own membrane read
    the line OD its lone sectors read (benchmarks/shared_membranes.py: median ratio 1.03 at its own DAB, 1.01 at half):
    so a line's intensity is read as seen, with no discount for two deposits on a shared border (README, Limits)."""
    from skimage.data import immunohistochemistry

    from her2score.stain import scale_stains

    ratios = _benchmark("shared_membranes").shared_over_lone(scale_stains(immunohistochemistry(), dab=dab, residual=dab), 0.5)
    assert len(ratios) >= 50 and 0.93 <= np.median(ratios) <= 1.08, (len(ratios), np.median(ratios))


@pytest.mark.xfail(strict=True, reason="measured 5 Dec 2026: 1.09 and 1.12 (generator 2+ seed 9000, 3+ seed 10000): "
                   "a shared border shows the darker of its two cells' deposits, drawn independently, where a real "
                   "gland's neighbours stain alike (README, Limits; 1.23 and 1.25 when the two deposits added). "
                   "Remove this mark when it passes (strict: an unexpected pass fails)")
def test_the_generators_shared_borders_read_as_real_ones_do():
    """As on the real colon (above), a generator cell's shared border sectors should read the line OD of its lone ones."""
    from her2score.synthetic import generate_field

    bench = _benchmark("shared_membranes")
    medians = [np.median(bench.shared_over_lone(f.image, f.mpp))
               for f in (generate_field("2+", seed=9000), generate_field("3+", seed=10000))]
    assert all(0.93 <= m <= 1.08 for m in medians), medians


def _field_tile(rgb: np.ndarray, mpp: float):
    """A whole field measured as one tile (TileResult), at the pipeline's resolution."""
    slide = ArraySlide(rgb, mpp=mpp)
    config = ScoringConfig()
    w, h = (round(d * mpp / config.mpp) for d in slide.dimensions)
    field = slide.read_region((0, 0), slide.dimensions, mpp=config.mpp)[:h, :w]
    stains = H_DAB.with_background(estimate_background(field))
    return score_tile(field, Tile(row=0, col=0, core=(0, 0, w, h), margin=0), stains=stains, config=config, scale=1.0)


def _interior_noise_od(rgb: np.ndarray, mpp: float) -> float:
    """The 99th percentile of membrane contrast inside cells away from membranes (log10 OD), unclamped:
    the level noise, texture and JPEG alone reach (membrane.noise_floor without its minimum)."""
    return noise_floor(_field_tile(rgb, mpp).contrast_hist, minimum_od=0.0)


def _border_texture(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Per border sector of every cell, the peak membrane contrast (log10 OD): its median, 90th
    percentile and the share of sectors at 0.02 OD or more (the slide floor's minimum)."""
    v = _field_tile(rgb, mpp).cells.sector_contrast.astype(np.float64).ravel()
    v = v[np.isfinite(v)]
    return np.array([np.percentile(v, 50), np.percentile(v, 90), np.mean(v >= 0.02)])


@needs_real
def test_the_generators_dab_noise_is_that_of_real_fields():
    """Faint membranes are under-found on generated 1+ fields (README Limits); that is no artefact of a
    noisier generator: the noise its unstained interiors reach lies within what real fields reach."""
    real = [_interior_noise_od(CASES[n].load(), CASES[n].mpp) for n in (*names("membranous"), *names("nuclear"))
            if CASES[n].mpp is not None]
    synthetic = [_interior_noise_od(f.image, f.mpp) for f in (generate_field("1+", seed=7100), generate_field("1+", seed=7101),
                                                            generate_field("0", seed=8100, variant="ultralow"))]
    assert len(real) >= 4 and min(real) > 0
    assert min(real) - 0.0025 <= min(synthetic) and max(synthetic) <= max(real) + 0.0025, (real, synthetic)  # within a bin


def _border_textures() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Border statistics (_border_texture): per real Ki67 field with a µm/px, then per REAL_BORDERS and
    per default null field (seeds 8100, 8101)."""
    real = np.array([_border_texture(CASES[n].load(), CASES[n].mpp) for n in names("nuclear") if CASES[n].mpp is not None])
    drawn = np.array([_border_texture(*_null_field(seed, REAL_BORDERS)) for seed in (8100, 8101)])
    clean = np.array([_border_texture(*_null_field(seed, Confounders())) for seed in (8100, 8101)])
    return real, drawn, clean


@needs_real
def test_real_borders_in_the_generator_read_like_real_unstained_borders():
    """Real unstained cell borders (the Ki67 fields with a µm/px) carry DAB texture that the default
    generator's borders lack; synthetic.REAL_BORDERS draws it. Its upper tail, which the membrane floor
    (>= 0.02 OD) meets, lies within the real fields' range: measured real q90 0.019-0.025 and 7-18% of
    sectors >= 0.02 OD; REAL_BORDERS 0.022-0.023 and 15-17%; default 0.014 and 1-2%."""
    real, drawn, clean = _border_textures()
    assert len(real) >= 3
    low, high = real.min(0), real.max(0)
    assert np.all((low[1:] <= drawn[:, 1:]) & (drawn[:, 1:] <= high[1:])), (drawn, low, high)
    assert np.all(clean[:, 1:] < low[1:]), (clean, low)  # the default's borders are cleaner than any real field's


@needs_real
@pytest.mark.xfail(strict=True, reason="measured: REAL_BORDERS' median sector 0.011-0.012 OD, the real fields' 0.0073-0.0109")
def test_real_borders_median_sector_lies_in_the_real_range():
    """The drawn texture lifts every border a little, where real texture is sparser: REAL_BORDERS' median
    sector lies above the real range (default 0.008). Since the nucleus thresholds follow the
    counterstain, the pale field 799_2 counts 90 cells, not 31, and its borders read q50 0.0098, not
    0.0133, the top of the range before."""
    real, drawn, _ = _border_textures()
    assert np.all((real[:, 0].min() <= drawn[:, 0]) & (drawn[:, 0] <= real[:, 0].max())), (drawn[:, 0], real[:, 0])


def _null_field(seed: int, confounders) -> tuple[np.ndarray, float]:
    f = generate_field("0", seed=seed, variant="null", confounders=confounders)
    return f.image, f.mpp


@needs_real
def test_a_field_part_h_and_e_fails_qc():
    """The real colon with its right third replaced by real H&E (torchstain's breast source): an eosin-coloured share
    of 0.12, under H&E's refusal, fails QC (it was a warning), so eligibility asks a pathologist; the colon alone
    passes."""
    from her2score.eligibility import check_eligibility

    colon = _as_array(CASES["skimage-colon-ihc"])()
    he = np.asarray(Image.open(REAL / "he" / "torchstain-breast" / "source.png").convert("RGB"))
    he = cv2.resize(he[:438, :512], (512, 512), interpolation=cv2.INTER_AREA)
    mixed = colon.copy()
    mixed[:, 320:] = he[:, 320:]
    r = analyse_slide(ArraySlide(mixed, mpp=0.5)).result
    assert ("eosin_like_colour", "fail") in {(q.code, q.severity) for q in r.qc} and not r.qc_passed
    assert check_eligibility(r, "her2-positive-breast").status == "needs_review"
    assert "eosin_like_colour" not in {q.code for q in analyse(CASES["skimage-colon-ihc"]).result.qc}


def _lilac_he() -> np.ndarray:
    """torchstain's breast target: a real H&E on tinted (lilac) glass, refused as it is stored."""
    return np.asarray(Image.open(REAL / "he" / "torchstain-breast" / "target.png").convert("RGB"))


@needs_real
def test_h_and_e_among_pure_white_fill_fails_qc(tmp_path):
    """A real H&E on tinted glass, unchanged, amid the pure white that fills what a scanner did not image:
    as a field pasted beside the real colon, and alone in a whole-slide pyramidal TIFF. The white fill
    is no glass (stain.unscanned_fill), and eosin is read at the tiles' resolution, where a thumbnail
    blends it into the nuclei: QC fails where it passed (0+ (ultralow) and 1+, their H&E cells counted
    as unstained tumour cells)."""
    from her2score.stain import scale_stains
    from her2score.synthetic import write_pyramidal_tiff

    he = _lilac_he()
    h, w = he.shape[:2]
    weak = scale_stains(_as_array(CASES["skimage-colon-ihc"])(), dab=0.25, residual=0.25)
    canvas = np.full((600, 632 + w, 3), 255, np.uint8)
    canvas[20:532, 20:532], canvas[20 : 20 + h, 592 : 592 + w] = weak, he
    r = analyse_slide(ArraySlide(canvas, mpp=0.5)).result
    assert "eosin_like_colour" in {q.code for q in r.qc if q.severity == "fail"}, r.qc
    slide = np.full((4000, 4000, 3), 255, np.uint8)
    slide[1700 : 1700 + h, 1700 : 1700 + w] = he
    path = write_pyramidal_tiff(tmp_path / "he_on_white.tif", slide, mpp=0.5, quality=90)
    r = analyse_slide(path).result
    assert "eosin_like_colour" in {q.code for q in r.qc if q.severity == "fail"}, r.qc


@needs_real
def test_h_and_e_with_a_cool_cast_fails_qc():
    """The same H&E with a cool white-balance cast (red x0.92, green x0.97) passed the check's 3% cast limit
    and scored 0+ (ultralow) with QC passed; the tiles read it against their own white level."""
    cool = np.clip(_lilac_he() * np.array([0.92, 0.97, 1.0]), 0, 255).round().astype(np.uint8)
    r = analyse_slide(ArraySlide(cool, mpp=0.5)).result
    assert "eosin_like_colour" in {q.code for q in r.qc if q.severity == "fail"}, r.qc


@needs_real
@pytest.mark.parametrize("name", [n for n in names("he") if isinstance(CASES[n].load(), np.ndarray)])  # fields
def test_h_and_e_with_red_and_blue_swapped_is_never_scored_with_qc_passed(name, monkeypatch):
    """As cv2.imread gives an image (BGR): the swap turns haematoxylin's purple into a brown close to DAB's. The
    stardist field was refused as nuclear under the default vectors, then scored 3+ with QC passed with its own;
    its own pair lies under estimate_stains' 20 degrees apart, and were that allowed, the rescue leaves 10% or
    more of the tumour cells with brown nuclei and is refused after all. The three TCGA crops at 1 µm/px failed QC
    only as out of focus, which they are not (the tiles' enlargement read as blur, until 0.5.3): their swapped
    eosin reads as counterstain, and they read 0+ (ultralow) on the 6-7% of cells false membranes could give,
    sent to review. Never a call without doubt."""
    import functools

    from her2score import pipeline
    from her2score.slide import SlideError

    case = CASES[name]
    swapped = ArraySlide(np.ascontiguousarray(case.load()[..., ::-1]), mpp=case.mpp or 0.5)
    try:
        r = analyse_slide(swapped).result
    except SlideError:
        r = None
    assert r is None or not r.qc_passed or (r.score == "0" and "null_or_ultralow" in r.flags), (r.score, r.qc, r.flags)
    if name == "he-stardist-tcia-histo":  # the second guard, on its own
        monkeypatch.setattr(pipeline, "estimate_stains", functools.partial(estimate_stains, min_separation_deg=0))
        with pytest.raises(NuclearStainError, match="still have DAB-stained nuclei"):
            analyse_slide(swapped)


def test_a_green_chromogen_is_refused():
    """The real colon's DAB put back along a green chromogen's OD vector (0.70, 0.25, 0.67): no mix of
    haematoxylin and DAB has that colour. It scored 2+ (with a pen-ink warning); the check refuses it."""
    from her2score.imagecheck import MAX_OFF_PLANE_FRACTION, off_plane_fraction
    from her2score.stain import optical_density

    colon = _as_array(CASES["skimage-colon-ihc"])()
    stains = H_DAB.with_background(estimate_background(colon))
    hed = deconvolve(colon, stains)
    green = np.array([0.70, 0.25, 0.67]) / np.linalg.norm([0.70, 0.25, 0.67])
    od = hed[..., :1] * np.float32(stains.hematoxylin) + hed[..., 1:2] * np.float32(green)
    rgb = np.clip(np.float32(stains.background) * 10.0 ** -np.maximum(od, 0), 0, 255).round().astype(np.uint8)
    with pytest.raises(NotHerIhcError, match="no mix of haematoxylin and DAB"):
        analyse_slide(ArraySlide(rgb, mpp=0.5))
    assert off_plane_fraction(optical_density(colon, stains.background)) < MAX_OFF_PLANE_FRACTION / 4


@needs_real
def test_a_faded_h_and_e_is_refused_and_its_own_stain_vectors_are_no_pair():
    """OS-1's H&E with its saturation halved and its hue turned 15 degrees was refused as nuclear under the
    default vectors; its own "DAB" is a purple 11 degrees from its haematoxylin, and with it the field
    scored 2+ with QC passed. Two stains so close are no H-DAB pair (estimate_stains keeps the default
    vectors); and its colours lie so near grey that it is refused as faded before any scoring."""
    from her2score.stain import _angle

    faded = recoloured(np.asarray(Image.open(REAL / "he" / "openslide-os1" / "OS-1-detail.png").convert("RGB")), 0.5, -15)
    own, _ = estimate_stains(faded, background=estimate_background(faded), min_separation_deg=0)
    assert own.source == "estimated" and _angle(own.hematoxylin, own.dab) < 15
    assert estimate_stains(faded, background=estimate_background(faded))[0].source != "estimated"
    with pytest.raises(NotHerIhcError, match="nearly grey"):
        analyse_slide(ArraySlide(faded, mpp=0.2271))  # SOURCE.md


@needs_real
def test_faded_real_images_are_refused_as_nearly_grey():
    """A faded stain or a desaturated scan moves haematoxylin and DAB towards grey, and every membrane reads
    weaker: the colon IHC at half its colours' saturation read 2+ for 3+ with QC passed, and real H&E at 0.2-0.3
    x scored 0, 0+ and 1+. Every real H-DAB image as stored, with its DAB scaled down or removed, and a real
    HER2 0 keeping its own counterstain's colour (DAB removed, the residual kept) lies at least 4 degrees clear
    of the bound, and none is warned as pale; the colon at half saturation, and every real H&E at 0.2 x, is
    refused; at 0.65 x it is scored with the warning pale_colours."""
    from her2score.imagecheck import MIN_STAIN_CHROMA_DEG, PALE_CHROMA_DEG, check_image, stain_chroma_deg
    from her2score.stain import scale_stains

    def chroma(rgb: np.ndarray) -> float:
        return stain_chroma_deg(optical_density(rgb, check_image(rgb, mpp=0.5).background))

    kinds = ("membranous", "nuclear", "nuclear-derived", "pale", "weaker", "derived-0")
    seen = {case.name: chroma(_as_array(case)()) for case in CASES.values() if case.kind in kinds}
    assert len(seen) >= 25 and min(seen.values()) >= max(MIN_STAIN_CHROMA_DEG + 4, PALE_CHROMA_DEG), \
        sorted(seen.items(), key=lambda kv: kv[1])[:3]
    for name in ("skimage-colon-ihc", "os2-ki67-ndpi", "os2-ki67-vsi"):  # a real 0 in its own counterstain's colour
        assert chroma(scale_stains(_as_array(CASES[name])(), dab=0.0, residual=1.0)) >= MIN_STAIN_CHROMA_DEG + 8, name
    colon = _as_array(CASES["skimage-colon-ihc"])()
    with pytest.raises(NotHerIhcError, match=r"nearly grey \(the most coloured 2% lie 12.7° from grey"):
        analyse_slide(ArraySlide(recoloured(colon, 0.5, 0), mpp=0.5))
    # paler, but not grey: scored with a warning, its intense complete share read at 15% against 34% as stored
    pale = analyse_slide(ArraySlide(recoloured(colon, 0.65, 0), mpp=0.5)).result
    assert [(q.code, q.severity, q.value) for q in pale.qc if q.code == "pale_colours"] == [("pale_colours", "warn", 16.22)]
    assert pale.score == "3+" and pale.percentages["strong_complete"] < 20
    assert "pale_colours" not in {q.code for q in analyse(CASES["skimage-colon-ihc"]).result.qc}
    for name in names("he"):
        if isinstance(rgb := CASES[name].load(), np.ndarray):
            assert check_image(recoloured(rgb, 0.2, 0), mpp=CASES[name].mpp or 0.5).code == "faded", name


@needs_real
def test_real_her2_0_with_sensor_noise_is_scored_not_refused_as_h_and_e():
    """Sensor noise (s.d. 6 grey levels per channel, as a camera snapshot may carry) turns the colour ratios of
    pale haematoxylin: the real HER2 0 fields (their DAB removed) read 15-20% of their stained pixels
    eosin-coloured and were refused as H&E. The image check now reads colours from the image denoised where it
    is noisy (imagecheck.NOISY_SD; no real image as stored is): they score 0 (null). The tiles' eosin share
    for QC is read as before (denoised, a real H&E amid white fill fell under QC's 8%), so where noise lifts
    it over 8% the slide fails QC and eligibility asks for review. A real H&E with the same noise is still
    refused. Noise no longer lends a faded image colour: the colon at half saturation is refused as faded with
    it, and at 0.65 x keeps its pale_colours warning."""
    from her2score.eligibility import check_eligibility
    from her2score.imagecheck import NOISY_SD, noise_sd

    rng = np.random.default_rng(6)

    def noisy(rgb: np.ndarray, sd: float = 6.0) -> np.ndarray:
        return np.clip(rgb + rng.normal(0, sd, rgb.shape), 0, 255).round().astype(np.uint8)

    for name in ("skimage-colon-ihc-dab-removed", "deepliif-ki67-22_2-dab-removed", "deepliif-ki67-799_2-dab-removed"):
        rgb = _as_array(CASES[name])()
        assert noise_sd(rgb) < NOISY_SD < noise_sd(noisy(rgb)), name
        r = analyse_slide(ArraySlide(noisy(rgb), mpp=CASES[name].mpp or 0.5)).result
        assert r.level == "0 (null)", (name, r.level, r.qc)
        if "eosin_like_colour" in {q.code for q in r.qc}:
            assert check_eligibility(r, "her2-low-breast").status == "needs_review"
    he = CASES["he-openslide-os1-OS-1-detail"]
    with pytest.raises(WrongStainError, match="eosin"):
        analyse_slide(ArraySlide(noisy(_as_array(he)()), mpp=he.mpp or 0.2271))
    colon = _as_array(CASES["skimage-colon-ihc"])()
    with pytest.raises(NotHerIhcError, match="nearly grey"):
        analyse_slide(ArraySlide(noisy(recoloured(colon, 0.5, 0), 4.0), mpp=0.5))
    pale = analyse_slide(ArraySlide(noisy(recoloured(colon, 0.65, 0), 4.0), mpp=0.5)).result
    assert "pale_colours" in {q.code for q in pale.qc}


def test_a_real_her2_0_saved_as_heavy_jpeg_fails_qc(tmp_path):
    """The real colon with its DAB taken out (a real HER2 0) saved as a JPEG at quality 20 read 1+ on 16-18% faint
    cells, the compression's blocks taken for membranes, with QC passed and HER2-low eligible. The file's
    quantisation table says how hard it was compressed: under quality 60 QC fails and eligibility asks for review;
    at 90 it scores 0 with QC passed. A PNG of it, or its array, says it by its pixels; the colon itself was
    saved as a JPEG at 75 before scikit-image kept it as a PNG."""
    from her2score.eligibility import check_eligibility
    from her2score.pipeline import score_slide
    from her2score.stain import remove_dab

    unstained = remove_dab(_as_array(CASES["skimage-colon-ihc"])())
    for quality in (20, 90):
        Image.fromarray(unstained).save(tmp_path / f"q{quality}.jpg", quality=quality)
    r = score_slide(tmp_path / "q20.jpg", mpp=0.5)
    assert [(q.code, q.severity, q.value) for q in r.qc if q.code == "jpeg_quality"] == [("jpeg_quality", "fail", 20.0)]
    assert not r.qc_passed and "JPEG quality 20 (from the quantisation tables of the level scored)" in r.notes
    assert check_eligibility(r, "her2-low-breast").status == "needs_review"
    fine = score_slide(tmp_path / "q90.jpg", mpp=0.5)
    assert fine.score == "0" and fine.qc_passed and "jpeg_quality" not in {q.code for q in fine.qc}
    # the same pixels kept as a PNG, or given as an array, have no tables: the quality is read from their 8 x 8 blocks
    # (they read 1+ with QC passed, HER2-low eligible)
    pixels = np.asarray(Image.open(tmp_path / "q20.jpg").convert("RGB"))
    Image.fromarray(pixels).save(tmp_path / "q20.png")
    for source in (tmp_path / "q20.png", pixels):
        lossless = score_slide(source, mpp=0.5)
        assert [(q.code, q.severity, q.value) for q in lossless.qc if q.code == "jpeg_quality"] == [("jpeg_quality", "fail", 20.0)]
        assert "JPEG quality 20 (from the 8 x 8 blocks its pixels keep from a JPEG save)" in lossless.notes
        assert check_eligibility(lossless, "her2-low-breast").status == "needs_review"
    Image.fromarray(pixels).save(tmp_path / "q20_then_95.jpg", quality=95)  # a JPEG of it: its tables say 95
    again = score_slide(tmp_path / "q20_then_95.jpg", mpp=0.5)
    assert [(q.code, q.severity, q.value) for q in again.qc if q.code == "jpeg_quality"] == [("jpeg_quality", "fail", 20.0)]
    assert ("JPEG quality 20 (from the 8 x 8 blocks its pixels keep from a JPEG save before its last (the file's own "
            "tables say 95))") in again.notes
    colon = score_slide(_as_array(CASES["skimage-colon-ihc"])(), mpp=0.5)
    assert "JPEG quality 75 (from the 8 x 8 blocks its pixels keep from a JPEG save)" in colon.notes and colon.qc_passed
    assert not any("JPEG quality" in note for note in score_slide(unstained, mpp=0.5).notes)  # recomposed: no blocks left


def test_a_nuclear_stain_on_real_nuclei_is_not_rescued_into_membranes():
    """The real colon with its DAB taken out and put on 70% of its own nuclei (flat 0.25 OD: an ER, PR or Ki67
    pattern) is refused as nuclear under the default vectors, which read 0% of its tumour cells with a stained
    membrane. Its own vectors, turned towards haematoxylin, read the rims of those brown nuclei as intense
    partial membranes: it scored 1+ with QC passed and HER2-low eligible. Membranes only the own vectors see
    are no rescue: the refusal stands, and says why. (Which nuclei are brown is drawn at random: with every
    morphological step's kernel round, the first draw's own vectors still read a nuclear stain, and it is refused
    on that; the second's read 19% of its cells with a stained membrane, the case this test is for.)"""
    colon = _as_array(CASES["skimage-colon-ihc"])()
    stains = H_DAB.with_background(estimate_background(colon))
    conc = deconvolve(colon, stains)
    nuclei = cv2.GaussianBlur(conc[..., 0], (0, 0), 1.5) > 0.15
    n, label = cv2.connectedComponents(nuclei.astype(np.uint8), connectivity=8)
    brown = np.r_[False, np.random.default_rng(1).random(n - 1) < 0.7][label]
    conc[..., 1], conc[..., 2] = np.where(brown, 0.25, 0.0), 0.0
    rgb = np.clip(np.float32(stains.background) * 10 ** -np.maximum(conc @ stains.matrix(), 0) + 0.5, 0, 255).astype(np.uint8)
    with pytest.raises(NuclearStainError, match=r"0% a stained membrane.*its own stain vectors read \d+% of tumour cells "
                                                 r"with a stained membrane where the default ones read 0%") as refusal:
        analyse_slide(ArraySlide(rgb, mpp=0.5))
    assert refusal.value.membrane == 0.0
    # the share unstained membranes may read is the configured one: at 100% no membrane the own vectors read is
    # ruled out, and the own vectors' call stands (8%, the module's default, was used whatever the setting)
    rescued = analyse_slide(ArraySlide(rgb, mpp=0.5), config=ScoringConfig(false_membrane_percent=100.0)).result
    assert rescued.score is not None and "own_stain_vectors" in {q.code for q in rescued.qc}


@needs_real
def test_real_fields_whose_stain_fills_the_cytoplasm_are_flagged():
    """A real Ki67 field auto-contrasted (PIL, 1% clip: its faint tan cytoplasm stretched) read 2+, and a real
    H&E with its eosin put on the DAB channel read 1+, both from cytoplasm between cells with QC passed and
    no doubt; their unstained tumour cells' cytoplasm lies 0.17 / 0.12 OD over the stroma's: flagged and
    reviewed."""
    from PIL import ImageOps
    from skimage.color import hed2rgb, rgb2hed

    from her2score.eligibility import check_eligibility

    ki67 = Image.open(REAL / "nuclear-ihc" / "deepliif-ki67" / "images" / "799_2.png").convert("RGB")
    stretched = np.asarray(ImageOps.autocontrast(ki67, cutoff=1, preserve_tone=True))
    he = np.asarray(Image.open(REAL / "he" / "histolab-tcga" / "high-nuclei-score-level0.png").convert("RGB"))
    hed = rgb2hed(he)
    eosin_as_dab = (np.clip(hed2rgb(np.stack([hed[..., 0], np.zeros_like(hed[..., 0]), hed[..., 1]], -1)), 0, 1) * 255).round()
    for rgb, mpp in ((stretched, 0.3), (eosin_as_dab.astype(np.uint8), 0.5)):
        r = analyse_slide(ArraySlide(rgb, mpp=mpp)).result
        assert "cytoplasmic_dab" in r.flags and r.staining["diffuse_cytoplasm_od"] > 0.1, (r.score, r.flags, r.staining)
        assert check_eligibility(r, "her2-low-breast").status == "needs_review"
    # the colon's FHL2 stain fills its gland cells' cytoplasm (its SOURCE: membranous + cytoplasmic): its unstained
    # cells are clear (0.03), but its stained cells' cytoplasm (0.43 over the stroma) stands higher than their
    # membranes stand out (0.19): flagged, the 3+ kept; darker renderings alike
    colon = analyse(CASES["skimage-colon-ihc"]).result
    assert colon.staining["diffuse_cytoplasm_od"] < 0.05 < colon.staining["membrane_contrast_od"] < colon.staining["stained_cytoplasm_od"]
    assert colon.score == "3+" and "cytoplasmic_dab" in colon.flags and "the tumour cells read stained carry" in colon.reason
    rgb = _as_array(CASES["skimage-colon-ihc"])().astype(np.float32)
    for darker in (255 * (rgb / 255) ** 1.8, rgb * 0.8):
        r = analyse_slide(ArraySlide(np.round(darker).astype(np.uint8), mpp=0.5)).result
        assert r.score == "3+" and "cytoplasmic_dab" in r.flags, (r.flags, r.staining)


@needs_real
def test_real_ki67_stretched_into_a_faint_1plus_is_reviewed():
    """A real Ki67 field (1-2% brown nuclei, no membrane staining) auto-contrasted (PIL, 0.5% clipped per
    channel) reads 1+ on ~15% faint cells from its cell borders' texture: it was eligible for HER2-low
    therapy without a doubt. Real unstained membranes read stained in up to 8% of cells, so such a 1+ is
    near the cut-off (since every morphological step's kernel is round it reads 14.9%, within the measurement's
    own 5.5-point margin, which says so first; 17-18% before, in the false membranes' band). Stretched keeping its tones, it reads 1+ on cytoplasm between cells (49% of cells), its stained and unstained
    cells' cytoplasm at 0.062 and 0.058 OD over unstained tissue, and carries cytoplasmic_dab as well as near_cutoff
    (0.4.9: 0.059 and 0.058, just under cytoplasmic_dab's 0.06, held for review by near_cutoff alone)."""
    from PIL import ImageOps

    from her2score.eligibility import check_eligibility

    ki67 = Image.open(REAL / "nuclear-ihc" / "deepliif-ki67" / "images" / "799_2.png").convert("RGB")
    faint = analyse_slide(ArraySlide(np.asarray(ImageOps.autocontrast(ki67, cutoff=0.5)), mpp=0.3)).result
    assert faint.score == "1+" and "near_cutoff" in faint.flags, faint.reason
    assert "it could be 0" in faint.reason and 10 < 100 - faint.percentages["none"] < 18, faint.reason
    toned = analyse_slide(ArraySlide(np.asarray(ImageOps.autocontrast(ki67, cutoff=0.5, preserve_tone=True)), mpp=0.3)).result
    assert toned.score == "1+" and "near_cutoff" in toned.flags, toned.reason
    assert toned.staining["stained_cytoplasm_od"] > 0.05 and toned.staining["diffuse_cytoplasm_od"] > 0.05, toned.staining
    for r in (faint, toned):
        assert check_eligibility(r, "her2-low-breast").status == "needs_review"


def _turned(rgb: np.ndarray, angle: float, fill: int, interpolation: int) -> np.ndarray:
    """``rgb`` turned by ``angle`` degrees on a canvas that holds all of it, its corners ``fill`` (grey level)."""
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    size = (int(h * sin + w * cos), int(h * cos + w * sin))
    m[:, 2] += (size[0] - w) / 2, (size[1] - h) / 2
    return cv2.warpAffine(rgb, m, size, flags=interpolation, borderValue=(fill, fill, fill))


@pytest.mark.parametrize("name, angle, interpolation", [
    ("skimage-colon-ihc-dab-removed", 15, cv2.INTER_LINEAR),  # a viewer's bilinear turn: a dark rim, blended with the black
    ("skimage-colon-ihc-dab-removed", 45, cv2.INTER_CUBIC),
    pytest.param("deepliif-ki67-22_2-dab-removed", 15, cv2.INTER_NEAREST, marks=needs_real),  # rim from 0.3 to 0.5 µm/px
])
def test_a_real_her2_0_turned_on_black_reads_as_on_white(name, angle, interpolation):
    """A real HER2 0 turned with black corners: the pixels its edge blends with the black (the turn's interpolation,
    the tiles' resampling) read as a stained membrane along it, 0+ (ultralow) on 5-7% of cells or 1+ (11-13%), where
    its white-cornered twin reads 0 (null)."""
    case = CASES[name]
    her2_0 = _as_array(case)()
    for fill in (255, 0):
        r = analyse_slide(ArraySlide(_turned(her2_0, angle, fill, interpolation), mpp=case.mpp)).result
        assert (r.score, r.level, r.percentages["none"]) == ("0", "0 (null)", 100.0), (fill, r.reason)


def test_a_real_her2_0_with_its_glass_painted_black_still_reads_null():
    """The real colon with its DAB removed (a real HER2 0) and its glass painted pure black (a background
    removed by an editor): the black read as haematoxylin and DAB at once, and brown 'nuclei' in it refused
    the field as nuclear DAB. Pure black fill is no stain: it reads as its white-glass twin, 0 (null). (Pure
    black smaller than a nucleus inside a dark edge stays: clipped dark nuclei, as in the stretched Ki67 test.)"""
    import cv2

    her2_0 = _as_array(CASES["skimage-colon-ihc-dab-removed"])()
    glass = cv2.morphologyEx((her2_0.min(axis=2) > 220).astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)) > 0
    painted = her2_0.copy()
    painted[glass] = 0
    r = analyse_slide(ArraySlide(painted, mpp=0.5)).result
    assert (r.score, r.level) == ("0", "0 (null)") and r.qc_passed, r.reason
    # an 80 µm crop whose painted lumens are all smaller than a nucleus's largest area: read as glass by their
    # bright edge (it was refused as nuclear DAB, 70% brown 'nuclei'); a clipped nucleus's edge is dark
    crop = analyse_slide(ArraySlide(np.ascontiguousarray(painted[144:304, 160:320]), mpp=0.5)).result
    assert crop.level == "0 (null)" and crop.staining["fractions"]["nucleus"] == 0, crop.reason


@pytest.mark.parametrize("name", ["skimage-colon-ihc", "skimage-colon-ihc-dab-0.5", "skimage-colon-ihc-dab-0.12"])
def test_the_real_colon_turned_or_mirrored_keeps_its_call_or_flags_it(name):
    """A slide lies on the scanner either way round. The real colon and two of its fainter copies (3+, a 2+ at
    8% intense complete cells, 1+), mirrored and turned: cells are grown on a 1 µm/px grid anchored at the
    image's corner (README: Limits), so some cells' borders move and their categories with them. Measured
    over all eight orientations since every morphological step's kernel is round (0.5.0; benchmarks/orientations.py):
    every category's share within 5.0 points of each other, H-scores within 10, and each keeps its level (0.4.9,
    with OpenCV's elliptical kernels: 7.3 points, and the half-DAB copy read 2+ in five and 3+ in three, each call
    flagged near_cutoff). A call that changes with the orientation must be flagged both ways, and the shares must
    stay within 7.5 points of the upright's (10 with the elliptical kernels)."""
    upright = analyse(CASES[name]).result
    img = CASES[name].load()
    for turned in (np.rot90(flip, k) for flip in (img, img[:, ::-1]) for k in range(4)):
        r = analyse_slide(ArraySlide(np.ascontiguousarray(turned), mpp=CASES[name].mpp)).result
        if r.level != upright.level:
            assert "near_cutoff" in r.flags and "near_cutoff" in upright.flags, (r.level, r.reason, upright.reason)
        worst = max(abs(r.percentages[c] - upright.percentages[c]) for c in upright.percentages)
        assert worst <= 7.5, (r.percentages, upright.percentages)
        assert abs(r.tumour_cells - upright.tumour_cells) <= 0.05 * upright.tumour_cells, (r.tumour_cells, upright.tumour_cells)
