"""Is this a brightfield H-DAB tissue image at all? Real IHC (and real HER2 0) accepted; real H&E,
photos, rendered text, plots and fluorescence-like images refused; a wrong µm/px refused.

The non-tissue corpus is generated here (nothing committed); real images come from ../shared/data/real.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from realdata import real_cases
from her2score.imagecheck import (GLASS_MAX_CAST, MAX_EOSIN_FRACTION, MIN_STAIN_CHROMA_DEG, NotHerIhcError, check_image,
                                  check_slide, colour_cast, glass_background, white_level)
from her2score.pipeline import _thumbnail_mpp, score_slide
from her2score.slide import ArraySlide, open_slide
from her2score.stain import estimate_background, optical_density
from her2score.synthetic import generate_field, generate_he_field
from her2score.tissue import tissue_mask

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


# -- the corpus of images that are not H-DAB tissue ------------------------------------------------

def _figure_rgb(draw) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(5.12, 5.12), dpi=100)
    draw(fig)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def rendered_text() -> np.ndarray:
    """A screenshot of the kind of text that was once scored 3+."""
    def draw(fig):
        for i in range(8):
            fig.text(0.04, 0.9 - 0.11 * i, "3+ H=294.737 cells=114", fontsize=20)
    return _figure_rgb(draw)


def rendered_plot() -> np.ndarray:
    def draw(fig):
        ax = fig.add_subplot()
        x = np.linspace(0, 10, 200)
        ax.plot(x, np.sin(x), x, np.cos(x))
        rng = np.random.default_rng(0)
        ax.scatter(rng.uniform(0, 10, 60), rng.uniform(-1, 1, 60))
        ax.set_title("a plot")
    return _figure_rgb(draw)


def drawn_cells() -> np.ndarray:
    """A drawing of IHC cells in flat colours (brown rings, blue nuclei on white): once scored 3+."""
    import cv2

    rgb = np.full((512, 512, 3), 255, np.uint8)
    for y in range(30, 512, 44):
        for x in range(30 + (y // 44 % 2) * 22, 512, 44):
            cv2.circle(rgb, (x, y), 19, (150, 95, 50), 4)
            cv2.circle(rgb, (x, y), 15, (235, 215, 200), -1)
            cv2.circle(rgb, (x, y), 8, (80, 80, 160), -1)
    return rgb


def fluorescence_like() -> np.ndarray:
    """Tissue glowing on a black background (a synthetic field's light inverted)."""
    return (255 - generate_field("2+", seed=3, size_px=(384, 384)).image)[..., [1, 0, 2]]


def photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


NOT_TISSUE = {
    "text": (rendered_text, "rendered_graphic"),
    "plot": (rendered_plot, "rendered_graphic"),
    "fluorescence": (fluorescence_like, "dark_background"),
    "astronaut": (lambda: photo("astronaut"), "dark_background"),
    "coffee": (lambda: photo("coffee"), "no_counterstain"),
    "chelsea": (lambda: photo("chelsea"), "no_counterstain"),
    "drawn cells": (drawn_cells, "rendered_graphic"),
    "rocket at dusk": (lambda: photo("rocket"), "implausible_scale"),  # its blobs: 1.4 µm specks
}
"""Each input that once got a confident score, and the check that now refuses it."""


def check_file(path, mpp=None):
    """The check as analyse_slide runs it: on the slide's thumbnail, nuclei on a detail region."""
    with open_slide(path, mpp=mpp) as slide:
        thumb_mpp = _thumbnail_mpp(slide, 0.5)
        thumb = slide.thumbnail(mpp=thumb_mpp)
        tissue = tissue_mask(thumb, mpp=thumb_mpp, background=estimate_background(thumb))
        return check_slide(slide, thumb, tissue)


def check_case(case):
    src = case.load()
    return check_file(src, case.mpp) if isinstance(src, Path) else check_image(src, mpp=case.mpp)


CASES = real_cases()


# -- accepted --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in CASES if c.kind not in ("he", "inverted")], ids=lambda c: c.name)
def test_real_ihc_and_real_her2_zero_are_accepted(case):
    c = check_case(case)
    assert c.accepted, (case.name, c.reason)
    assert c.eosin_fraction < MAX_EOSIN_FRACTION / 2
    assert 1.5 <= c.nucleus_diameter_um <= 8.0


@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".png", ".tif")))
def test_sample_images_are_accepted(name):
    c = check_file(SAMPLES / name)
    assert c.accepted, c.reason


def _degrees_from_grey(vector) -> float:
    v = np.asarray(vector, float)
    return float(np.degrees(np.arccos(v.sum() / (np.sqrt(3) * np.linalg.norm(v)))))


def test_synthetic_hdab_with_stain_jitter_is_accepted_and_synthetic_he_refused():
    """Jittered fields are accepted, but one at 8° (a 3+ whose haematoxylin and DAB the jitter turned to 10.8°
    and 11.5° from grey) refused as faded. A field is refused so only where its haematoxylin lies under the
    bound: a greyish haematoxylin beside a coloured DAB (9.8° and 21.8°) keeps the image's colour."""
    faded = []
    for jitter in (0, 4, 8):
        for seed in range(8):
            f = generate_field(("0", "1+", "2+", "3+")[seed % 4], seed=500 + seed, stain_jitter=jitter, size_px=(256, 256))
            c = check_image(f.image, mpp=0.5)
            assert c.accepted or (c.code == "faded" and _degrees_from_grey(f.stains.hematoxylin) < MIN_STAIN_CHROMA_DEG), \
                (jitter, seed, c.reason)
            faded += [(jitter, seed)] * (not c.accepted)
    assert faded == [(8, 3)]
    for seed in range(4):
        c = check_image(generate_he_field(seed=seed, size_px=(256, 256)), mpp=0.5)
        assert c.code == "eosin" and "H&E" in c.reason


def _restained(rgb: np.ndarray, factor: float) -> np.ndarray:
    """The same field with every stain's optical density scaled (pale < 1 < over-stained)."""
    bg = np.array(glass_background(rgb))
    return np.clip(bg * 10 ** (-factor * optical_density(rgb, bg)) + 0.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("factor", [0.25, 0.5, 2.0, 3.0])
def test_pale_and_over_stained_hdab_is_never_refused(factor):
    colon = photo("immunohistochemistry")
    for rgb in (colon, generate_field("3+", seed=9, size_px=(256, 256)).image,
                generate_field("0", seed=10, size_px=(256, 256)).image):
        c = check_image(_restained(rgb, factor), mpp=0.5)
        assert c.accepted, (factor, c.reason)


def test_white_balance_casts_do_not_change_the_verdict():
    colon = photo("immunohistochemistry").astype(np.float32)
    he = generate_he_field(seed=2, size_px=(256, 256)).astype(np.float32)
    for cast in ((1.0, 0.94, 0.9), (0.92, 0.96, 1.0), (1.0, 0.93, 1.0)):  # yellow, blue and magenta casts
        assert check_image((colon * cast).astype(np.uint8), mpp=0.5).accepted
        assert check_image((he * cast).astype(np.uint8), mpp=0.5).code == "eosin"


def test_a_cast_beyond_the_white_balance_correction_is_named_as_the_likely_cause():
    """A cast stronger than GLASS_MAX_CAST is not corrected (a tissue-filled field's brightest pixels are pale
    stain): the real colon under a strong yellow cast loses its counterstain's blue and is refused, and the
    refusal says that with its brightest pixels taken as white the blue is there."""
    colon = photo("immunohistochemistry").astype(np.float32)
    c = check_image((colon * (1.0, 1.0, 0.85)).astype(np.uint8), mpp=0.5)
    assert c.code == "no_counterstain" and "colour cast of 11% (blue low), beyond the 3%" in c.reason, c.reason
    assert "white balance may be off" in c.reason and c.reason.endswith("; not scored")
    assert colour_cast(white_level((colon * (1.0, 1.0, 0.85)).astype(np.uint8))) > GLASS_MAX_CAST > colour_cast(white_level(colon.astype(np.uint8)))
    for name in ("coffee", "chelsea"):  # photos: no blue whatever their white, so no such hint
        r = check_image(photo(name), mpp=0.5)
        assert r.code == "no_counterstain" and "colour cast" not in r.reason, r.reason


# -- refused ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [c for c in CASES if c.kind == "he"], ids=lambda c: c.name)
def test_real_he_is_refused_as_eosin(case):
    c = check_case(case)
    assert c.code == "eosin", (case.name, c)
    assert "H&E" in c.reason


def _as_jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """``rgb`` saved and read back as a JPEG with Pillow's defaults (4:2:0 chroma), as most JPEGs are."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("case", [c for c in CASES if c.kind in ("he", "membranous", "nuclear") and isinstance(c.load(), np.ndarray)],
                         ids=lambda c: c.name)
def test_jpeg_chroma_keeps_he_refused_and_ihc_accepted(case):
    """4:2:0 chroma blends eosin into the nuclei (an H&E's eosin share falls from 0.30 to 0.15 at quality 75)."""
    rgb = case.load()[:1024, :1024]
    for quality in (75, 90):
        c = check_image(_as_jpeg(rgb, quality), mpp=case.mpp or 0.5)
        assert (c.code == "eosin") == (case.kind == "he"), (quality, c)


@pytest.mark.parametrize("name", sorted(NOT_TISSUE))
def test_images_that_are_not_hdab_tissue_are_refused(name):
    make, code = NOT_TISSUE[name]
    c = check_image(make(), mpp=0.5)
    assert not c.accepted and c.code == code, c
    assert "not scored" in c.reason


@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0])
def test_a_photograph_is_not_scored_at_any_scale_given(mpp):
    """The rocket at dusk passes the image check at 1 µm/px (its blobs then nucleus-sized) and at 0.25 (where its
    dark blue sky's 'nuclei' were read brown: refused as nuclear DAB, the wrong reason), and was scored 2+ with QC
    passed at 1 µm/px: its sky reads as haematoxylin of 0.94-0.97 OD in the nuclei, darker than any counterstain
    (pipeline.MAX_COUNTERSTAIN_OD). The real colon with 4x its haematoxylin (0.36 OD) is still scored."""
    from her2score.pipeline import MAX_COUNTERSTAIN_OD
    from her2score.stain import scale_stains

    with pytest.raises(NotHerIhcError, match=r"(haematoxylin, darker than any counterstain|blobs that would be nuclei)"):
        score_slide(ArraySlide(photo("rocket"), mpp=mpp))
    if mpp == 0.5:
        dark = score_slide(ArraySlide(scale_stains(photo("immunohistochemistry"), hematoxylin=4.0), mpp=mpp))
        assert dark.score == "3+" and 0.3 < dark.staining["counterstain_od"] < MAX_COUNTERSTAIN_OD / 1.5, dark.staining


def test_a_scanners_black_frame_is_left_out_of_every_measure():
    """Black fill along a field's edges is no tissue and no stain: the field is judged without it (and a
    few pixels of soft or resampled edge), whatever share of the image it takes; black inside counts."""
    import cv2

    colon = photo("immunohistochemistry")
    framed = np.pad(colon, ((40, 40), (40, 120), (0, 0)))  # black on every side, wider on the right
    c = check_image(framed, mpp=0.5)
    assert c.accepted and c.dark_fraction == 0.0, c
    assert abs(c.nucleus_diameter_um - check_image(colon, mpp=0.5).nucleus_diameter_um) < 0.5
    assert check_image(np.pad(colon, ((400, 400), (400, 400), (0, 0))), mpp=0.5).accepted  # 80% frame
    fine = np.pad(cv2.resize(colon, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC), ((81, 81), (81, 81), (0, 0)))
    assert check_image(fine, mpp=0.25).accepted  # resampled to 0.5 µm/px for the nucleus size: a grey rim
    edge = np.zeros(framed.shape[:2], np.float32)
    edge[40:-40, 40:-120] = 1
    soft = (framed * cv2.GaussianBlur(edge, (0, 0), 1.5)[..., None]).astype(np.uint8)
    assert check_image(soft, mpp=0.5).accepted
    holed = colon.copy()
    holed[100:300, 150:400] = np.random.default_rng(0).integers(3, 20, (200, 250, 3))  # not a frame: a dark fifth, a camera's black
    assert check_image(holed, mpp=0.5).code == "dark_background"
    holed[100:300, 150:400] = 0  # pure black: an editor's fill, not a scanned pixel
    assert check_image(holed, mpp=0.5).accepted


def test_black_fill_from_a_rotation_or_a_mask_is_no_dark_background():
    """The real colon rotated 30 and 45 degrees with black corners (OpenCV's and most viewers' fill; 15-17% of
    the image), or with its glass painted black, was refused as not brightfield; with white corners it scored."""
    import cv2

    colon = photo("immunohistochemistry")
    for angle in (30, 45):
        turned = cv2.warpAffine(colon, cv2.getRotationMatrix2D((256, 256), angle, 1.0), (512, 512), borderValue=(0, 0, 0))
        assert check_image(turned, mpp=0.5).accepted, angle
    dim = np.round(colon * 0.75).astype(np.uint8)  # a greyer scan: its glass near 176, none at 200
    turned = cv2.warpAffine(dim, cv2.getRotationMatrix2D((256, 256), 30, 1.0), (512, 512), borderValue=(0, 0, 0))
    assert check_image(turned, mpp=0.5).accepted
    painted = colon.copy()
    painted[cv2.morphologyEx((colon.min(2) > 200).astype(np.uint8), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)) > 0] = 0
    c = check_image(painted, mpp=0.5)
    assert c.accepted and c.dark_fraction < 0.01, c
    for case in (c for c in CASES if c.kind == "he" and isinstance(c.load(), np.ndarray)):
        assert check_image(np.pad(case.load(), ((250, 250), (250, 250), (0, 0))), mpp=case.mpp or 0.5).code == "eosin", case.name


@pytest.mark.parametrize("interpolation", [0, 1])  # cv2.INTER_NEAREST, cv2.INTER_LINEAR
def test_nuclei_are_measured_alike_on_a_field_turned_on_black_or_white(interpolation):
    """The real colon turned with black corners: their edge (stepped, or blended into a dark rim) read as nuclei of
    1.4 µm, and the field was refused as far too fine at 30, 40 and 60 degrees; at others 1.8-8.4 µm, where its
    white-cornered twin reads 4.3-5.4."""
    import cv2

    colon = photo("immunohistochemistry")
    for angle in (10, 20, 30, 40, 60):
        m = cv2.getRotationMatrix2D((256, 256), angle, 1.0)
        m[:, 2] += 256
        black, white = (check_image(cv2.warpAffine(colon, m, (1024, 1024), flags=interpolation, borderValue=(v, v, v)),
                                    mpp=0.5) for v in (0, 255))
        assert black.accepted and 0.8 < black.nucleus_diameter_um / white.nucleus_diameter_um < 1.25, (angle, black, white)


def test_an_h_and_e_turned_on_black_is_refused_as_on_white():
    """A real H&E turned 15 or 45 degrees with black corners (a third of the image): the fill counted among the
    stained pixels and diluted the eosin share (torchstain's target: 0.30 to 0.13 and 0.07), and the field was scored."""
    import cv2

    he = [c for c in CASES if c.kind == "he" and isinstance(c.load(), np.ndarray)]
    if not he:
        pytest.skip("real H&E images not found")
    for case in he:
        rgb = case.load()
        h, w = rgb.shape[:2]
        plain = check_image(rgb, mpp=case.mpp or 0.5)
        for angle in (15, 45):
            m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
            m[:, 2] += w / 2, h / 2  # on a canvas twice its size
            turned = check_image(cv2.warpAffine(rgb, m, (2 * w, 2 * h), borderValue=(0, 0, 0)), mpp=case.mpp or 0.5)
            assert turned.code == "eosin", (case.name, angle, plain.eosin_fraction, turned)


def test_a_counterstain_too_pale_to_count_cells_by_is_refused_and_named():
    """The real colon keeps its DAB and 0.4 x its haematoxylin: its nuclei are barely blue (scored down
    to 0.5 x, see test_real); the refusal names the counterstain, not only photos and plots."""
    from her2score.stain import scale_stains

    c = check_image(scale_stains(photo("immunohistochemistry"), hematoxylin=0.4), mpp=0.5)
    assert c.code == "no_counterstain" and "counterstain missing or too pale" in c.reason, c


@pytest.mark.parametrize("mpp, accepted", [(0.1, False), (0.25, True), (0.5, True), (1.0, True), (2.0, False), (5.0, False)])
def test_an_implausible_mpp_is_refused(mpp, accepted):
    c = check_image(photo("immunohistochemistry"), mpp=mpp)
    assert c.accepted is accepted, c
    if not accepted:
        assert c.code == "implausible_scale"
        assert f"{mpp:g} µm/px" in c.reason if mpp > 1 else "far too fine" in c.reason


def test_score_slide_refuses_before_scoring_and_names_the_file():
    with pytest.raises(NotHerIhcError, match=r"colon\.png: at 5 µm/px nuclei would be \d+ µm across"):
        score_slide(ArraySlide(photo("immunohistochemistry"), mpp=5.0, path="colon.png"))
    with pytest.raises(NotHerIhcError, match=r"cat\.png: .*haematoxylin"):
        score_slide(ArraySlide(photo("chelsea"), mpp=0.5, path="cat.png"))


def test_a_contrast_stretched_image_is_refused_as_clipped_not_as_the_wrong_scale():
    """The real colon auto-contrasted with 1% and 2% clipped (PIL): its stained membranes clip to 0 in blue,
    read as 1.4 µm blobs, and it was refused as 'the µm/px is far too fine'. It is refused for what it is;
    0.5% clipped it still scores (under a tenth of its pixels clipped), and black fill counts for nothing."""
    from PIL import Image, ImageOps

    from her2score.imagecheck import MAX_CLIPPED_FRACTION, clipped_fraction

    colon = photo("immunohistochemistry")
    for cut in (1, 2):
        c = check_image(np.asarray(ImageOps.autocontrast(Image.fromarray(colon), cutoff=cut, preserve_tone=True)), mpp=0.5)
        assert c.code == "clipped" and "channel clipped at 0" in c.reason, (cut, c)
    assert check_image(np.asarray(ImageOps.autocontrast(Image.fromarray(colon), cutoff=0.5, preserve_tone=True)), mpp=0.5).accepted
    assert clipped_fraction(np.pad(colon, ((100, 100), (100, 100), (0, 0)))) == clipped_fraction(colon) < 1e-4  # 9 pixels
    assert clipped_fraction(_restained(colon, 3.0)) < MAX_CLIPPED_FRACTION / 5  # over-stained is not clipped


def test_a_negative_whose_glass_is_pure_black_is_no_black_fill():
    """The real colon over-exposed (its glass saturated to 255, tissue under it) then inverted, as a viewer
    shows a negative: its glass is pure black, which was left out as fill; the rest read 7.7% dark, under the
    8% bound, and with red and blue swapped it scored 3+. Fill is only fill beside glass: refused as dark."""
    colon = photo("immunohistochemistry").astype(np.float32)
    exposed = np.clip(colon * 1.35 + 0.5, 0, 255).astype(np.uint8)
    glass = exposed.min(axis=2) == 255
    exposed = np.minimum(exposed, 254)
    exposed[glass] = 255
    negative = 255 - exposed
    for rgb in (negative, np.ascontiguousarray(negative[..., ::-1])):
        c = check_image(rgb, mpp=0.5)
        assert c.code == "dark_background" and c.dark_fraction > 0.3, c


def test_a_greyscale_scan_saved_as_rgb_is_refused_as_nearly_grey():
    """The real colon IHC made greyscale and saved as RGB (equal channels) holds no colour to tell DAB from
    haematoxylin: it was refused only for lacking a counterstain's blue; it is now said to be grey."""
    colon = photo("immunohistochemistry")
    grey = np.repeat(np.round(colon @ [0.299, 0.587, 0.114]).astype(np.uint8)[..., None], 3, axis=-1)
    c = check_image(grey, mpp=0.5)
    assert c.code == "faded" and "lie 0.0° from grey" in c.reason and "greyscale" in c.reason, c.reason


def test_noise_sd_reads_the_luminance_noise_and_skips_flat_fill():
    """noise_sd is the s.d. of the luminance noise: 0.67 x the s.d. added to each channel (cv2's grey weights), within
    10%, however much texture; a flat fill beside it (a tile's glass beyond the slide) does not pull it down; a
    clean synthetic field reads under NOISY_SD."""
    from her2score.imagecheck import NOISY_SD, noise_sd

    rng = np.random.default_rng(0)
    flat = np.full((256, 256, 3), 180.0)
    for sd in (2.0, 4.0, 8.0):
        assert abs(noise_sd(np.clip(flat + rng.normal(0, sd, flat.shape), 0, 255).round().astype(np.uint8)) - 0.669 * sd) < 0.067 * sd
    field = generate_field("2+", seed=5, size_px=(256, 256)).image
    assert noise_sd(field) < NOISY_SD / 1.5
    noisy = np.clip(field + rng.normal(0, 6.0, field.shape), 0, 255).round().astype(np.uint8)
    half_fill = noisy.copy()
    half_fill[:, :128] = 240
    assert noise_sd(noisy) > NOISY_SD and abs(noise_sd(half_fill) - noise_sd(noisy)) < 0.1 * noise_sd(noisy)
