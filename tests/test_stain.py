import numpy as np
import pytest

from her2score.stain import H_DAB, StainSet, deconvolve, estimate_background, estimate_stains, optical_density, remove_dab


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
    with pytest.raises(ValueError):
        StainSet((1, 1, 1), (1, 0, 0), background=(0, 255, 255))


def test_background_estimate_from_glass():
    img = np.full((100, 100, 3), 240, np.uint8)
    img[:50] = 120
    assert estimate_background(img) == pytest.approx((240.0, 240.0, 240.0))
    assert estimate_background(np.full((10, 10, 3), 100, np.uint8)) == (255.0, 255.0, 255.0)


def test_macenko_falls_back_without_dab():
    rng = np.random.default_rng(0)
    h = rng.uniform(0.1, 0.8, (64, 64))
    rgb = np.concatenate([render(v, 0.0) for v in h.ravel()]).reshape(64, 64, 3)
    stains, note = estimate_stains(rgb)
    assert stains.hematoxylin == H_DAB.hematoxylin
    assert "default" in note


def test_macenko_estimates_when_dab_present():
    rng = np.random.default_rng(1)
    h, d = rng.uniform(0, 0.8, 5000), rng.uniform(0, 0.8, 5000)
    rgb = np.concatenate([render(a, b) for a, b in zip(h, d)]).reshape(50, 100, 3)
    stains, note = estimate_stains(rgb)
    assert note.startswith("estimated")
    assert np.dot(stains.dab, H_DAB.dab) > 0.99
    assert np.dot(stains.hematoxylin, H_DAB.hematoxylin) > 0.99


def test_remove_dab_leaves_haematoxylin_only():
    rgb = np.concatenate([render(0.5, 0.0), render(0.5, 0.6), render(0.0, 0.8)]).reshape(1, 3, 3)
    hed = deconvolve(remove_dab(rgb))
    assert np.abs(hed[..., 1]).max() < 0.01  # no DAB left
    assert hed[0, 0, 0] == pytest.approx(0.5, abs=0.02) and hed[0, 1, 0] == pytest.approx(0.5, abs=0.02)
    assert hed[0, 2, 0] == pytest.approx(0.0, abs=0.02)
