"""The real images the scorer is checked on: ../shared/data/real (beside the repository) and
scikit-image's colon IHC image, each with what its SOURCE.md says a pathologist sees, plus real
HER2 0 cases derived from them by removing their DAB with colour deconvolution, and the real colon
under a paler counterstain (its haematoxylin OD scaled down the same way) and with weaker DAB (its
DAB OD scaled down: the same membranes, fainter).

Shared by the tests and ``benchmarks/real_images.py``. Nothing here is copied into the repository.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import cv2
import numpy as np

if TYPE_CHECKING:
    from her2score.synthetic import SyntheticField

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
"""Where CI and the development machines keep the real images (``../shared/data/real``)."""


@dataclass(frozen=True)
class RealCase:
    """One real image: ``kind`` is membranous, nuclear, nuclear-derived, inverted, he, derived-0, pale or weaker; ``mpp``
    in µm/px (None: in the file)."""

    name: str
    kind: str
    load: Callable[[], "object"]
    mpp: float | None
    note: str

    def slide(self):
        """What analyse_slide takes for this image: an in-memory field named after the case, or the slide file's path."""
        src = self.load()
        if not isinstance(src, np.ndarray):
            return src
        from her2score.slide import ArraySlide

        return ArraySlide(src, mpp=self.mpp, path=self.name)


def _png(path: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))
    return load


def _skimage_ihc() -> np.ndarray:
    from skimage.data import immunohistochemistry

    return immunohistochemistry()


def _without_dab(load: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    def derived() -> np.ndarray:
        from her2score.stain import remove_dab

        return remove_dab(load())
    return derived


def _scaled(load: Callable[[], np.ndarray], **factors: float) -> Callable[[], np.ndarray]:
    def derived() -> np.ndarray:
        from her2score.stain import scale_stains

        return scale_stains(load(), **factors)
    return derived


PALER = (0.7, 0.5)
"""Factors on the real colon's haematoxylin OD for its "pale" cases: the same field under a lighter counterstain."""

WEAKER = (0.5, 0.25, 0.12, 0.05)
"""Factors on the real colon's DAB OD for its "weaker" cases: the same membranes stained more faintly. Its
residual OD (where the stain vectors misfit its DAB) is scaled with it: left whole, it tints the field green."""


def real_cases() -> list[RealCase]:
    """Every real case present on this machine (the folder may be missing outside CI)."""
    cases = [RealCase("skimage-colon-ihc", "membranous", _skimage_ihc, 0.5,
                      "colon glands, membranous + cytoplasmic DAB; unstained stroma (µm/px estimated)")]
    ki67 = []
    if REAL.is_dir():
        for p in sorted((REAL / "nuclear-ihc" / "deepliif-ki67" / "images").glob("*.png")):
            ki67.append(RealCase(f"deepliif-ki67-{p.stem}", "nuclear", _png(p), 0.3, "Ki67, nuclear DAB (µm/px estimated)"))
        for p in sorted((REAL / "nuclear-ihc" / "openslide-os2-ki67").glob("*.ome.tif")):
            ki67.append(RealCase(f"os2-ki67-{p.name.split('.')[0].split('-')[-1]}", "nuclear", lambda p=p: p, None,
                                 "Ki67, nuclear DAB, µm/px from OME-XML"))
        he = REAL / "he"
        he_mpp = {"OS-1-detail.ome.tif": None, "tcga-lung-rgb.png": 0.27, "high-nuclei-score-level0.png": 0.5,
                  "source.png": 0.5, "target.png": 0.5, "histo.png": 0.5}
        for p in sorted(he.rglob("*")):
            if p.name in he_mpp:
                load = (lambda p=p: p) if p.suffix == ".tif" else _png(p)
                cases.append(RealCase(f"he-{p.parent.name}-{p.stem.split('.')[0]}", "he", load, he_mpp[p.name], "H&E"))
            elif p.name.startswith("tcga-cr-7395-ts1_crop"):
                cases.append(RealCase(f"he-{p.stem[-11:]}", "he", _png(p), 1.0, "H&E, eosin-heavy squamous (µm/px estimated)"))
        for p in sorted((REAL / "wsi").rglob("*.svs")):
            cases.append(RealCase("he-wsi-tcga-ts1", "he", lambda p=p: p, 1.0, "H&E whole-slide file, no MPP in header"))
    cases += ki67
    for c in ki67:  # what a user may give: a crop at the pipeline's scale, the wrong µm/px, a heavily compressed file
        if c.name == "os2-ki67-ndpi":
            half = _resampled(_as_array(c), _file_mpp(c), 0.5)
            cases += [RealCase(f"{c.name}-crop-{y}-{x}", "nuclear-derived", _crop(half, y, x, 400), 0.5,
                               "a 200 µm crop of the Ki67 field, resampled to 0.5 µm/px") for y, x in ((600, 600), (0, 400), (400, 600))]
            cases.append(RealCase(f"{c.name}-given-0.5", "nuclear-derived", _as_array(c), 0.5,
                                  "the Ki67 field at its 0.227 µm/px, said to be 0.5 µm/px"))
        elif c.name == "os2-ki67-vsi":
            cases += [RealCase(f"{c.name}-jpeg-{q}", "nuclear-derived", _jpeg(_as_array(c), q), _file_mpp(c),
                               f"the Ki67 field saved as JPEG quality {q}") for q in (60, 50)]
    for c in (cases[0], *ki67):  # a negative, as a viewer's invert or a darkfield rendering shows it: no brightfield slide
        if c.name in ("skimage-colon-ihc", "deepliif-ki67-34_3"):
            cases.append(RealCase(f"{c.name}-inverted", "inverted", _inverted(_as_array(c)), c.mpp, "the real field inverted"))
    cases += [RealCase(f"skimage-colon-ihc-haematoxylin-{k:g}", "pale", _scaled(_skimage_ihc, hematoxylin=k), 0.5,
                       f"the real colon with {k:g} x its haematoxylin OD: a paler counterstain") for k in PALER]
    cases += [RealCase(f"skimage-colon-ihc-dab-{k:g}", "weaker", _scaled(_skimage_ihc, dab=k, residual=k), 0.5,
                       f"the real colon with {k:g} x its DAB OD: the same membranes, fainter") for k in WEAKER]
    derived = [c for c in cases if c.kind in ("membranous", "nuclear")]
    for c in derived:
        cases.append(RealCase(f"{c.name}-dab-removed", "derived-0", _without_dab(_as_array(c)), c.mpp or _file_mpp(c),
                              "the real field with its DAB removed by colour deconvolution: a real HER2 0"))
    return cases


def recoloured(rgb: np.ndarray, saturation: float, hue_deg: float) -> np.ndarray:
    """``rgb`` with its chroma scaled and its hue turned in linear-light YIQ (a faded stain, or a viewer's setting)."""
    lin = np.where(rgb <= 10, rgb / 255 / 12.92, ((rgb / 255 + 0.055) / 1.055) ** 2.4)
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    y, i, q = np.moveaxis(lin @ to_yiq.T, -1, 0)
    t = np.deg2rad(hue_deg)
    yiq = np.stack([y, saturation * (i * np.cos(t) - q * np.sin(t)), saturation * (i * np.sin(t) + q * np.cos(t))], -1)
    out = np.clip(yiq @ np.linalg.inv(to_yiq).T, 0, 1)
    out = np.where(out <= 0.0031308, 12.92 * out, 1.055 * out ** (1 / 2.4) - 0.055)
    return (out * 255).round().astype(np.uint8)


def _resampled(load: Callable[[], np.ndarray], mpp: float, to_mpp: float) -> Callable[[], np.ndarray]:
    def derived() -> np.ndarray:
        f = mpp / to_mpp
        return cv2.resize(load(), None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
    return derived


def _crop(load: Callable[[], np.ndarray], y: int, x: int, side: int) -> Callable[[], np.ndarray]:
    def derived() -> np.ndarray:
        return np.ascontiguousarray(load()[y : y + side, x : x + side])
    return derived


def _jpeg(load: Callable[[], np.ndarray], quality: int) -> Callable[[], np.ndarray]:
    def derived() -> np.ndarray:
        ok, data = cv2.imencode(".jpg", np.ascontiguousarray(load()[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
        return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1].copy()
    return derived


def _inverted(load: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    def derived() -> np.ndarray:
        return 255 - load()
    return derived


def _file_mpp(case: RealCase) -> float:
    from her2score.slide import open_slide

    with open_slide(case.load()) as s:
        return s.mpp


def _as_array(case: RealCase) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        src = case.load()
        if isinstance(src, np.ndarray):
            return src
        from her2score.slide import open_slide

        with open_slide(src) as s:
            return s.read_region((0, 0), s.dimensions, mpp=s.mpp)
    return load


def _centroids(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)[1:]
    yy, xx = np.indices(labels.shape)
    n = np.bincount(labels.ravel())[ids]
    return np.column_stack([np.bincount(labels.ravel(), xx.ravel())[ids] / n, np.bincount(labels.ravel(), yy.ravel())[ids] / n])


def _deepliif_annotated():
    """(name, RGB, label image of every annotated nucleus, label image of the Ki67-negative ones) of each DeepLIIF
    Ki67 field: red (Ki67-positive) and blue (negative) nuclei, green borders and specks under 15 px left out."""
    from PIL import Image

    def labelled(cell: np.ndarray) -> np.ndarray:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(cell.astype(np.uint8), connectivity=4)
        keep = stats[:, cv2.CC_STAT_AREA] >= 15
        keep[0] = False
        return np.where(keep[labels], labels, 0).astype(np.int32)

    for p in sorted((REAL / "nuclear-ihc" / "deepliif-ki67" / "images").glob("*.png")):
        rgb = np.asarray(Image.open(p).convert("RGB"))
        mask = np.asarray(Image.open(p.parents[1] / "masks" / p.name).convert("RGB")).astype(int)
        red, blue, border = mask[..., 0] > 100, mask[..., 2] > 100, mask[..., 1] > 80
        yield p.stem, rgb, labelled((red | blue) & ~border), labelled(blue & ~red & ~border)


def _deepliif_fields():
    """(name, RGB, annotated nucleus centroids (x, y) px) of each DeepLIIF Ki67 field."""
    for name, rgb, labels, _ in _deepliif_annotated():
        yield name, rgb, _centroids(labels)


def _pairs(a: np.ndarray, b: np.ndarray, within_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``a``, rows of ``b``): the points matched one-to-one (Hungarian, nearest) within ``within_px``."""
    from scipy.optimize import linear_sum_assignment

    if not (len(a) and len(b)):
        return np.zeros(0, int), np.zeros(0, int)
    d = np.linalg.norm(a[:, None] - b[None], axis=2)
    cost = np.where(d <= within_px, d, 1e6)
    rows, cols = linear_sum_assignment(cost)
    near = cost[rows, cols] < 1e6
    return rows[near], cols[near]


def _one_to_one(det: np.ndarray, gt: np.ndarray, within_px: float) -> np.ndarray:
    """Bool per detection: matched one-to-one (Hungarian, nearest) to an annotation within ``within_px``."""
    matched = np.zeros(len(det), bool)
    matched[_pairs(det, gt, within_px)[0]] = True
    return matched


def deepliif_tumour_selection(mpp: float = 0.3, match_um: float = 4.0) -> dict[str, tuple[int, int, int]]:
    """Per DeepLIIF field: (cells flagged tumour, flagged cells on an annotated nucleus, cells on an
    annotated nucleus). The masks outline the tumour nuclei a Ki67 count uses, not the thin stromal
    ones, so they are the real tumour labels here; the fields are scored with the nuclear-DAB
    refusal off (their DAB is Ki67)."""
    from her2score.pipeline import ScoringConfig, analyse_slide
    from her2score.slide import ArraySlide

    out = {}
    for name, rgb, gt in _deepliif_fields():
        cells = analyse_slide(ArraySlide(rgb, mpp=mpp), config=ScoringConfig(nuclear_stain_min=1.0)).cells
        on_nucleus = _one_to_one(np.column_stack([cells["x"], cells["y"]]), gt, match_um / mpp)
        flagged = np.asarray(cells["tumour"], bool)
        out[name] = (int(flagged.sum()), int((flagged & on_nucleus).sum()), int(on_nucleus.sum()))
    return out


def deepliif_detection(mpp: float = 0.3, match_um: float = 4.0) -> tuple[int, int, int]:
    """(matched, detected, annotated) nuclei over the DeepLIIF Ki67 fields, one-to-one within ``match_um``;
    nuclei found as score_tile finds them (thresholds set by each field's counterstain)."""
    from her2score.cells import measure_nucleus_thresholds, segment_nuclei
    from her2score.stain import H_DAB, deconvolve, estimate_background

    tp = det_n = gt_n = 0
    for _, rgb, gt in _deepliif_fields():
        hed = deconvolve(rgb, H_DAB.with_background(estimate_background(rgb)))
        h, d = hed[..., 0], hed[..., 1]
        nucleus = measure_nucleus_thresholds([h], mpp=mpp)
        det = _centroids(segment_nuclei(h, d, mpp=mpp, threshold_od=nucleus.threshold_od, contrast_od=nucleus.contrast_od))
        tp += int(_one_to_one(det, gt, match_um / mpp).sum())
        det_n, gt_n = det_n + len(det), gt_n + len(gt)
    return tp, det_n, gt_n


PAINTED_FIELDS = ("22_2", "799_2")
"""The DeepLIIF fields membranes are painted on: those with few Ki67-positive nuclei (1-10%), whose DAB removed
leaves pale ghosts; their Ki67-negative nuclei are the cells painted."""

PAINTED_MPP = 0.3
"""µm/px of the DeepLIIF fields (estimated: SOURCE.md)."""


KI67_HALO_UM = 2.0
"""How far round a Ki67-positive nucleus its DAB is removed for painting (µm): the blur of its stain."""

KI67_BROWN_OD = 0.3
"""DAB (log10 OD, smoothed 0.5 µm) from which a nucleus the masks leave out is taken for Ki67-positive too: the fields'
DAB background off nuclei stays under 0.1 (99th percentile), their Ki67 nuclei average 1.4-1.8."""


@lru_cache(maxsize=None)
def _painted_background(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB, label image of the Ki67-negative nuclei) of DeepLIIF field ``name`` as a real HER2 0: its Ki67
    DAB removed (within KI67_HALO_UM of each nucleus annotated positive, or as brown as KI67_BROWN_OD), and
    its DAB elsewhere kept, the chromogen's real background and noise (off nuclei 0.025 OD median, 0.05 at
    the 90th percentile), which stain.remove_dab of the whole field would take to 0. Read-only arrays (cached)."""
    from her2score.stain import H_DAB, deconvolve, estimate_background, remove_dab

    for stem, rgb, every, negative in _deepliif_annotated():
        if stem == name:
            dab = deconvolve(rgb, H_DAB.with_background(estimate_background(rgb)))[..., 1]
            brown = cv2.GaussianBlur(dab, (0, 0), 0.5 / PAINTED_MPP) >= KI67_BROWN_OD
            halo = round(KI67_HALO_UM / PAINTED_MPP)
            ki67 = cv2.dilate((((every > 0) & (negative == 0)) | brown).astype(np.uint8),
                              cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * halo + 1, 2 * halo + 1))) > 0
            out = np.where(ki67[..., None], remove_dab(rgb), rgb), negative
            for a in out:
                a.flags.writeable = False
            return out
    raise KeyError(f"no DeepLIIF field {name!r} under {REAL}")


def painted_field(name: str, composition: dict[str, float], *, seed: int, clonal: bool = False,
                  gastric: bool = False) -> "SyntheticField":
    """A real HER2 field of known truth: the DeepLIIF field ``name`` (PAINTED_FIELDS) with its Ki67 DAB removed
    (a real HER2 0, _painted_background) and the generator's membranes painted on its annotated Ki67-negative
    tumour cells in ``composition`` (synthetic.paint_membranes). Its counterstain, nuclei, stroma, DAB
    background and noise are real."""
    from her2score.synthetic import paint_membranes

    background, nuclei = _painted_background(name)
    return paint_membranes(background, nuclei, mpp=PAINTED_MPP, composition=composition, seed=seed, clonal=clonal,
                           gastric=gastric)


def painted_at_edge(name: str) -> np.ndarray:
    """Per painted cell of field ``name`` (painted_field's rows), whether its nucleus touches the field's edge (cut by it)."""
    _, nuclei = _painted_background(name)
    edge = np.concatenate([nuclei[0], nuclei[-1], nuclei[:, 0], nuclei[:, -1]])
    return np.isin(np.unique(nuclei[nuclei > 0]), edge)


def matched_categories(field: "SyntheticField", cells: dict[str, np.ndarray], match_um: float = 4.0) -> list[tuple[str, str]]:
    """(true category, category read) for each of a painted ``field``'s cells, read from the scored
    ``cells`` (SlideAnalysis.cells) nearest its nucleus, one-to-one within ``match_um``: "missed" where
    none is, "non-tumour" where that cell was not counted as tumour."""
    truth = np.column_stack([field.cells["x_px"], field.cells["y_px"]])
    read = ["missed"] * len(truth)
    for i, j in zip(*_pairs(truth, np.column_stack([cells["x"], cells["y"]]), match_um / field.mpp)):
        read[i] = str(cells["category"][j]) if cells["tumour"][j] else "non-tumour"
    return list(zip((str(c) for c in field.cells["category"]), read))
