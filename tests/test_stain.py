import numpy as np
import pytest

from her2score.stain import (H_DAB, StainSet, _angle, _plane, deconvolve, estimate_background, estimate_stains, optical_density,
                             remove_dab, scale_stains)


def render(h_od: float, dab_od: float, background=255.0) -> np.ndarray:
    """One pixel by Beer-Lambert from stain amounts (log10 OD) and the default vectors."""
    od = h_od * np.array(H_DAB.hematoxylin) + dab_od * np.array(H_DAB.dab)
    return np.round(background * 10 ** (-od)).astype(np.uint8).reshape(1, 1, 3)


def test_optical_density_is_log10():
    rgb = np.array([[[255, 25, 3]]], np.uint8)
    od = optical_density(rgb)
    assert od[0, 0, 0] == pytest.approx(0.0)
    assert od[0, 0, 1] == pytest.approx(-np.log10(25 / 255), abs=1e-5)
    assert od[0, 0, 2] == pytest.approx(-np.log10(3 / 255), abs=1e-5)


@pytest.mark.parametrize("h,d", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.6), (0.3, 0.3), (0.8, 0.1)])
def test_deconvolution_recovers_stain_amounts(h, d):
    out = deconvolve(render(h, d))[0, 0]
    assert out[0] == pytest.approx(h, abs=0.02)
    assert out[1] == pytest.approx(d, abs=0.02)
    assert abs(out[2]) < 0.02


def test_deconvolution_against_background():
    rgb = render(0.0, 0.4, background=230.0)
    plain = deconvolve(rgb)[0, 0, 1]
    corrected = deconvolve(rgb, H_DAB.with_background((230.0, 230.0, 230.0)))[0, 0, 1]
    assert corrected == pytest.approx(0.4, abs=0.02)
    assert plain > corrected + 0.03  # ignoring a grey background inflates OD


def test_stainset_is_normalised_and_validated():
    s = StainSet((1, 1, 0.5), (0.2, 0.5, 0.8))
    assert np.linalg.norm(s.hematoxylin) == pytest.approx(1.0)
    assert np.dot(s.residual, s.dab) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="background"):
        StainSet((1, 1, 1), (1, 0, 0), background=(0, 255, 255))
    for bad, words in [(dict(background=(float("nan"), 255, 255)), "background"), (dict(background=(255, 255)), "background"),
                       (dict(hematoxylin=(0, 0, 0)), "haematoxylin vector"), (dict(dab=(0.2, float("inf"), 0.8)), "DAB vector"),
                       (dict(dab=(2, 2, 1)), "under 1 degree"), (dict(dab=(1, 1.01, 0.5)), "under 1 degree")]:  # NaN made every OD NaN; a zero vector NaN vectors
        with pytest.raises(ValueError, match=words):
            StainSet(**{"hematoxylin": (1, 1, 0.5), "dab": (0.2, 0.5, 0.8), **bad})


def test_background_estimate_from_glass():
    img = np.full((100, 100, 3), 240, np.uint8)
    img[:50] = 120
    assert estimate_background(img) == pytest.approx((240.0, 240.0, 240.0))
    assert estimate_background(np.full((10, 10, 3), 100, np.uint8)) == (255.0, 255.0, 255.0)


def test_pure_white_fill_is_no_glass():
    """Tinted glass under the tissue sets I0, not the pure white a scanner fills unimaged area with (most of
    this image); clipped glass, all 255, stays 255."""
    from her2score.imagecheck import glass_background

    img = np.full((200, 200, 3), 255, np.uint8)
    img[:60, :60] = (231, 234, 246)  # the lilac glass of a real H&E
    img[20:40, 20:40] = 120
    assert estimate_background(img) == pytest.approx((231.0, 234.0, 246.0))
    assert glass_background(img)[0] < glass_background(img)[2] < 250
    assert estimate_background(np.full((50, 50, 3), 255, np.uint8)) == (255.0, 255.0, 255.0)


def _rotated(v, towards, deg: float) -> np.ndarray:
    """``v`` turned by ``deg`` degrees towards ``towards`` (away for negative), in the plane of the two."""
    e1, e2 = _plane(np.array(v), np.array(towards))
    a = np.radians(deg)
    return np.cos(a) * e1 + np.sin(a) * e2


def _field(h_vec, d_vec, dab_share: float, seed: int) -> np.ndarray:
    """100 x 100 px of Beer-Lambert pixels of the given stains: nuclei (haematoxylin, a trace of DAB)
    and, ``dab_share`` of them, membranes (DAB, a trace of haematoxylin)."""
    rng = np.random.default_rng(seed)
    n = 10_000
    membrane = rng.random(n) < dab_share
    h = np.where(membrane, rng.uniform(0, 0.05, n), rng.uniform(0.1, 0.9, n))
    d = np.where(membrane, rng.uniform(0.2, 0.9, n), rng.uniform(0, 0.03, n))
    od = h[:, None] * h_vec + d[:, None] * d_vec
    return np.round(255 * 10 ** (-od)).astype(np.uint8).reshape(100, 100, 3)


def test_default_vectors_kept_where_the_slide_matches_them():
    stains, note = estimate_stains(_field(np.array(H_DAB.hematoxylin), np.array(H_DAB.dab), 0.3, seed=0))
    assert stains.hematoxylin == H_DAB.hematoxylin and stains.dab == H_DAB.dab
    assert note.startswith("default vectors")


def test_both_vectors_estimated_where_dab_leans_towards_haematoxylin():
    h, d = np.array(H_DAB.hematoxylin), _rotated(H_DAB.dab, H_DAB.hematoxylin, 8.0)
    rgb = _field(h, d, 0.3, seed=1)
    stains, note = estimate_stains(rgb)
    assert note.startswith("estimated (Macenko)")
    assert _angle(stains.dab, d) < 1.5 and _angle(stains.hematoxylin, h) < 1.5
    # the default reads the membranes' DAB as haematoxylin; the slide's own vectors do not
    membrane = deconvolve(rgb)[..., 1] > 0.2
    assert deconvolve(rgb)[..., 0][membrane].mean() > 0.05
    assert deconvolve(rgb, stains)[..., 0][membrane].mean() < 0.04


def test_haematoxylin_alone_estimated_where_dab_is_scarce():
    """A HER2 0 whose haematoxylin leans 12 deg towards DAB: the default would brown every nucleus
    (half its haematoxylin OD read as DAB), and its nuclei must still be found to estimate it."""
    h = _rotated(H_DAB.hematoxylin, H_DAB.dab, 12.0)
    rgb = _field(h, np.array(H_DAB.dab), 0.0, seed=3)
    assert deconvolve(rgb)[..., 1].max() > 0.1  # the default reads DAB in every dark nucleus
    stains, note = estimate_stains(rgb)
    assert note.startswith("haematoxylin estimated") and stains.dab == H_DAB.dab
    assert _angle(stains.hematoxylin, h) < 1.0
    assert deconvolve(rgb, stains)[..., 1].max() < 0.04


def test_a_haematoxylin_leaning_away_from_dab_keeps_the_default():
    """Leaking negatively, it invents no DAB: the default vectors the thresholds were set with stay."""
    h = _rotated(H_DAB.hematoxylin, H_DAB.dab, -10.0)
    stains, note = estimate_stains(_field(h, np.array(H_DAB.dab), 0.0, seed=4))
    assert stains.hematoxylin == H_DAB.hematoxylin and note.startswith("default vectors")
    assert "haematoxylin -9.8 deg" in note


def test_no_estimate_from_too_few_stained_pixels():
    stains, note = estimate_stains(np.full((10, 10, 3), 250, np.uint8))
    assert stains.hematoxylin == H_DAB.hematoxylin and "too little" in note


def test_remove_dab_leaves_haematoxylin_only():
    rgb = np.concatenate([render(0.5, 0.0), render(0.5, 0.6), render(0.0, 0.8)]).reshape(1, 3, 3)
    hed = deconvolve(remove_dab(rgb))
    assert np.abs(hed[..., 1]).max() < 0.01  # no DAB left
    assert hed[0, 0, 0] == pytest.approx(0.5, abs=0.02) and hed[0, 1, 0] == pytest.approx(0.5, abs=0.02)
    assert hed[0, 2, 0] == pytest.approx(0.0, abs=0.02)


def test_scale_stains_scales_one_stain_and_leaves_the_other():
    rgb = np.concatenate([render(0.5, 0.0), render(0.5, 0.6), render(0.0, 0.8)]).reshape(1, 3, 3)
    assert np.abs(scale_stains(rgb).astype(int) - rgb).max() <= 1  # factors of 1: the same field
    before, after = deconvolve(rgb), deconvolve(scale_stains(rgb, hematoxylin=0.5, stains=H_DAB))
    assert after[0, :2, 0] == pytest.approx(0.5 * before[0, :2, 0], abs=0.02)  # half the haematoxylin
    assert after[0, :, 1] == pytest.approx(before[0, :, 1], abs=0.02)  # the DAB as it was
