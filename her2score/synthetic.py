"""Synthetic HER2 IHC fields and slides from a physical model, with known ground truth.

Tissue is drawn as per-pixel stain concentrations in log10 optical density (haematoxylin, DAB,
eosin for H&E), mixed by Beer-Lambert (OD_rgb = sum c_s * v_s, I = I0 * 10^-OD_rgb), then blurred
by a Gaussian optical PSF, given sensor noise, quantised to 8 bits and JPEG-compressed, in that
order. Tumour cells are a Voronoi tessellation of jittered seeds; each cell's membrane DAB deposit
(completeness, peak OD, width) is chosen from its ground-truth category, using the DAB OD bands
of DESIGN.md section 3 (faint < 0.2 <= weak/moderate < 0.6 <= strong). The per-cell truth is the
membrane as seen: a membrane belongs to both cells it separates. Written from physics only: nothing
here reads the scorer's thresholds or measurements (it borrows one run-length helper).
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image
from scipy.spatial import cKDTree

from .categories import CATEGORIES
from .files import atomic_file, atomic_write, visible_files
from .membrane import longest_circular_run
from .stain import EOSIN_OD, H_DAB, StainSet, estimate_background

__all__ = [
    "SCORES", "Confounders", "REAL_BORDERS", "SyntheticField", "generate_field", "generate_he_field", "make_slide",
    "paint_membranes",
    "write_pyramidal_tiff", "write_dataset", "write_samples",
]

SCORES: tuple[str, ...] = ("0", "1+", "2+", "3+")
_FILE_TAG = {"0": "0", "1+": "1plus", "2+": "2plus", "3+": "3plus"}
_FIELD_NAME = re.compile(rf"field_(?:{'|'.join(_FILE_TAG.values())})_\d{{4,}}\.(?:png|jpg)")
"""The name write_dataset gives each field it writes under images/."""
_LABELS_HEADER = ["path", "label", "level"]
"""write_dataset's labels.csv columns: the field's path under the set, its score (0-3+) and its five-level report."""
MAX_STAIN_JITTER_DEG = 30.0
"""The most stain jitter a set may be drawn with (s.d. of the stain vectors' turn, degrees)."""
_LN10 = np.float32(np.log(10.0))
_PAD_UM = 16.0  # canvas margin around the image, larger than any cell radius
PSF_UM = 0.4
"""The optics' Gaussian point spread (s.d., µm)."""


@dataclass(frozen=True, eq=False)
class SyntheticField:
    """A generated field and its truth.

    ``cells`` holds columns (one row per cell whose nucleus centre lies in the image / tissue):
    x_px, y_px (nucleus centre, image pixels), nucleus_radius_um, tumour (bool; stromal nuclei are
    False, category none), and two truths. The cell's own membrane deposit: deposit_category (what
    the class or composition drew), deposit_completeness (fraction of the cell's boundary it
    covers, 0-1), deposit_longest_arc, deposit_od (peak log10 DAB OD), width_um (deposit FWHM, µm).
    The membrane as seen, which ``truth_counts`` and the score use: category (a name from
    CATEGORIES), pattern, completeness, longest_arc and membrane_od (log10 OD): a membrane belongs to
    both cells it separates, so a cell enclosed by stained membrane at least as widely as by its own takes
    the enclosing rim's pattern, extent and mean OD (see _seen_categories); any other cell, its own.
    ``dab_od`` is the true deposited DAB OD per pixel (before blur) and ``label_map`` the row of
    ``cells`` owning each pixel (-1 for stroma/glass).
    """

    image: np.ndarray
    mpp: float
    score: str
    variant: str
    cells: dict[str, np.ndarray]
    stains: StainSet
    seed: int
    dab_od: np.ndarray | None = field(default=None, repr=False)
    label_map: np.ndarray | None = field(default=None, repr=False)

    def truth_counts(self) -> dict[str, int]:
        """Number of tumour cells in each category, as seen (``cells["category"]``)."""
        return _counts(self.cells)

    def to_truth_dict(self) -> dict:
        """JSON-serialisable summary: score, variant, seed, mpp, size, counts and fractions."""
        counts = self.truth_counts()
        n = sum(counts.values())
        return {
            "score": self.score, "variant": self.variant, "seed": int(self.seed), "mpp": float(self.mpp),
            "size_px": [int(self.image.shape[1]), int(self.image.shape[0])],
            "n_tumour_cells": n, "counts": counts,
            "fractions": {c: round(k / max(n, 1), 4) for c, k in counts.items()},
            "stains": self.stains.to_dict(),
        }


# --------------------------------------------------------------------------- composition

def _composition(score: str, variant: str, gastric: bool, rng) -> dict[str, float]:
    """Fractions of tumour cells per category, all well away from the 10% guideline cut-offs."""
    u = rng.uniform
    if score == "0":
        return {} if variant == "null" else {"faint_partial": u(0.02, 0.07)}
    if score == "1+":
        return {"faint_partial": u(0.25, 0.80)}
    if score == "2+":
        if gastric:
            return {"weak_moderate_complete": u(0.20, 0.55), "weak_moderate_lateral": u(0.12, 0.25),
                    "faint_partial": u(0.03, 0.10)}
        return {"weak_moderate_complete": u(0.25, 0.80), "faint_partial": u(0.03, 0.10)}
    if score == "3+":
        out = ({"strong_complete": u(0.20, 0.55), "strong_lateral": u(0.12, 0.25)} if gastric
               else {"strong_complete": u(0.30, 0.90)})
        rest = 1.0 - sum(out.values())
        out["weak_moderate_complete"] = u(0.3, 0.7) * rest
        out["faint_partial"] = u(0.2, 0.6) * (rest - out["weak_moderate_complete"])
        return out
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def _check_composition(composition: dict[str, float]) -> dict[str, float]:
    bad = [c for c in composition if c not in CATEGORIES or c == "none"]
    if bad:
        raise ValueError(f"composition categories must be among {CATEGORIES[1:]}, got {bad}")
    if any(v < 0 for v in composition.values()) or sum(composition.values()) > 1 + 1e-9:
        raise ValueError(f"composition fractions must be >= 0 and sum to at most 1, got {composition}")
    return dict(composition)


def _assign(fractions: dict[str, float], counted: np.ndarray, score: str, rng, order: np.ndarray | None = None) -> np.ndarray:
    """Category per seed: exact counts over ``counted`` seeds, random draws for the others.

    ``order``: a value per seed; when given, the counted seeds are taken from the highest value down
    (the first category where it is highest), so each category forms patches (clonal expression).
    """
    cats = np.full(len(counted), "none", dtype=object)
    names = list(fractions)
    probs = np.array([fractions[c] for c in names])
    counted_idx = np.flatnonzero(counted)
    idx = rng.permutation(counted_idx) if order is None else counted_idx[np.argsort(-order[counted_idx], kind="stable")]
    n = len(idx)
    k = np.floor(probs * n + 0.5).astype(int)
    if score == "0" and names and n:
        k[:] = np.clip(k, 1, max(1, int(0.08 * n)))  # ultralow: >0% and clearly <=10%
    start = 0
    for name, kk in zip(names, k):
        cats[idx[start:start + kk]] = name
        start += kk
    other = np.flatnonzero(~counted)
    if names and len(other):
        draw = rng.choice(len(names) + 1, size=len(other), p=np.append(probs, max(0.0, 1 - probs.sum())))
        for j, name in enumerate(names):
            cats[other[draw == j]] = name
    return cats


def _partial_arcs(rng) -> tuple[np.ndarray, np.ndarray]:
    """1-3 stained arcs (start, length; fractions of a turn) covering 15-60% of the border, each shorter than a U."""
    k = int(rng.integers(1, 4))
    total = rng.uniform(0.15, min(0.60, 0.33 * k))
    arcs = total * rng.dirichlet(np.full(k, 4.0))
    while arcs.max() > 0.35:  # keep every arc clearly shorter than a lateral (U) arc
        arcs = total * rng.dirichlet(np.full(k, 4.0))
    gaps = (1 - total) * rng.dirichlet(np.full(k, 2.0))
    pos = rng.uniform() + np.concatenate([[0], np.cumsum(arcs + gaps)[:-1]])
    return pos % 1.0, arcs


def _membrane_params(cats: np.ndarray, score: str, rng):
    """Peak DAB OD, deposit width (µm), up to 3 stained arcs (start, length; fractions of a turn), and
    the categories as drawn: ``cats`` with a fifth of a 2+ or 3+ field's faint partial cells drawn
    weak-to-moderate (weak but incomplete staining), named weak_moderate_partial.

    A category name is <intensity>_<pattern>: faint (OD 0.09-0.17), weak_moderate (0.25-0.52) or
    strong (0.70-1.20); partial (1-3 short arcs), lateral (one U-shaped arc) or complete.
    """
    n = len(cats)
    drawn = cats.copy()
    od, width = np.zeros(n), np.zeros(n)
    start, length = rng.uniform(0, 1, (n, 3)), np.zeros((n, 3))
    for i, c in enumerate(cats):
        if c == "none":
            continue
        if c == "faint_partial" and score in ("2+", "3+") and rng.random() < 0.2:
            od[i], width[i] = rng.uniform(0.25, 0.45), rng.uniform(0.8, 1.1)  # weak but incomplete
            drawn[i] = "weak_moderate_partial"
        elif c.startswith("faint"):
            od[i], width[i] = rng.uniform(0.09, 0.17), rng.uniform(0.5, 0.7)
        elif c.startswith("strong"):
            od[i], width[i] = rng.uniform(0.70, 1.20), rng.uniform(1.8, 2.4)
        else:
            od[i], width[i] = rng.uniform(0.25, 0.52), rng.uniform(0.85, 1.2)
        if c.endswith("partial"):
            arcs = _partial_arcs(rng)
            k = len(arcs[0])
            start[i, :k], length[i, :k] = arcs
        elif c.endswith("lateral"):
            length[i, 0] = 1.0 - rng.uniform(0.25, 0.45)  # one apical gap: U-shaped
        else:
            length[i, 0] = 1.0 if rng.random() < 0.5 else rng.uniform(0.94, 1.0)
    return od, width, start, length, drawn


SEEN_BINS = 36
"""Border bins (10° of perimeter each) over which the seen membrane's arcs are traced."""


def _seen_categories(cell: np.ndarray, pos: np.ndarray, rim_od: np.ndarray, deposit: np.ndarray,
                     n: int) -> dict[str, np.ndarray]:
    """Per-cell truth of the membrane as seen, from its rim pixels.

    ``cell``: the seed owning each rim pixel; ``pos``: its position along that cell's perimeter (0-1);
    ``rim_od``: the deposit OD there, the cell's own or its neighbour's across the edge (0: none);
    ``deposit``: each seed's own category. A membrane is seen by both cells it separates, so where
    the stained rim encloses a cell more widely than its own membrane does, the cell takes that
    pattern: complete when >= 75% of the border is stained and no gap reaches a quarter of it (the
    generator's smallest U gap), lateral (U) with one stained arc of >= 50%; its intensity, the mean
    OD over the stained rim, falls in DESIGN.md's bands (faint < 0.2 <= weak/moderate < 0.6 <=
    strong; faint complete or lateral is ``faint_partial``). So does a cell whose own membrane the
    rim follows (complete, or lateral seen lateral): a border shows the darker of its two cells'
    deposits (_membranes), so a weak-to-moderate ring among intense neighbours is seen intense where
    they meet, and the cell takes the rim's mean. Any other cell keeps its own deposit's category: a
    stretch of a neighbour's membrane along one side stays with the cell that stains it.
    Returns per seed: category, and where ``enclosed`` (the cells read from the rim) completeness,
    longest_arc (fractions of the border) and membrane_od of the enclosing rim.
    """
    on = rim_od > 0
    n_rim = np.bincount(cell, minlength=n)
    n_on = np.bincount(cell, on, minlength=n)
    completeness = n_on / np.maximum(n_rim, 1)
    membrane_od = np.bincount(cell, rim_od, minlength=n) / np.maximum(n_on, 1)
    bins = np.minimum((pos * SEEN_BINS).astype(np.int64), SEEN_BINS - 1)
    lit = np.zeros((n, SEEN_BINS), bool)
    seen = np.zeros((n, SEEN_BINS), bool)
    np.logical_or.at(lit, (cell, bins), on)
    seen[cell, bins] = True
    for _ in range(SEEN_BINS):  # a bin without rim pixels takes the state of the bin before it
        gap = ~seen & np.roll(seen, 1, axis=1)
        if not gap.any():
            break
        lit |= gap & np.roll(lit, 1, axis=1)
        seen |= gap
    longest_arc, longest_gap = (longest_circular_run(b) / SEEN_BINS for b in (lit, ~lit))
    complete = (completeness >= 0.75) & (longest_gap < 0.25)
    enclosed = complete | (longest_arc >= 0.50)
    pattern = np.where(complete, "complete", "lateral").astype(object)
    level = np.where(membrane_od >= 0.6, "strong_", np.where(membrane_od >= 0.2, "weak_moderate_", "")).astype(object)
    category = np.where(level == "", "faint_partial", level + pattern)
    own = np.char.rpartition(deposit.astype(str), "_")[:, 2]
    wider = enclosed & (complete | (own != "complete"))  # enclosed at least as widely as by its own membrane
    return {"category": np.where(wider, category, deposit).astype(object), "enclosed": wider,
            "completeness": completeness, "longest_arc": longest_arc, "membrane_od": membrane_od}


def _membranes(rng: np.random.Generator, lab: np.ndarray, across: np.ndarray, edge_um: np.ndarray, tumour: np.ndarray,
               centres: np.ndarray, od: np.ndarray, width: np.ndarray, arc_s: np.ndarray, arc_l: np.ndarray, cats: np.ndarray,
               mpp: float):
    """Each tumour cell's membrane deposit along its own border, and the membrane's truth.

    ``lab`` (H, W): the cell owning each pixel (an index into the per-cell arrays); ``across`` (H, W): the
    cell beyond the pixel's nearest edge; ``edge_um``: the pixel's distance in from that edge (µm);
    ``tumour``: the cells that may stain; ``centres`` (n, 2): each cell's (x, y) px, round which its
    stained arcs are placed (fractions of its perimeter, by angle); ``od``, ``width``, ``arc_s``,
    ``arc_l``, ``cats``: each cell's deposit as drawn (_membrane_params). The deposit is a Gaussian
    across the edge, centred on it, integrated over the pixel (sigma^2 + mpp^2/12, area kept) so that
    thin lines do not alias; its tail crosses into the cell beyond (stroma, glass on painted fields).
    A border is one line for the two cells it separates: where both stain it, it shows the darker of
    their deposits, not their sum (on the real colon IHC, borders shared by two stained cells read as
    dark as a cell's lone borders; tests/test_real.py). Returns the deposit (log10 DAB OD per pixel),
    each cell's completeness (the share of its rim, its pixels within 0.75 px of its edge, under its
    own deposit) and the membrane as seen (_seen_categories).
    """
    n = len(od)
    um = 1.0 / mpp
    # angle -> fraction of the cell's perimeter: empirical CDF of its boundary pixels' angles
    rim = tumour[lab] & (edge_um * um < 0.75)
    n_rim = np.bincount(lab[rim], minlength=n)

    def angle(cell, y, x):
        return (np.arctan2(y - centres[cell, 1], x - centres[cell, 0]) / (2 * np.pi)) % 1.0

    rim_y, rim_x = np.nonzero(rim)
    key_rim = np.sort(lab[rim] + angle(lab[rim], rim_y, rim_x))
    first = np.concatenate([[0], np.cumsum(n_rim)[:-1]])

    def perimeter_position(cell, y, x):
        return (np.searchsorted(key_rim, cell + angle(cell, y, x)) - first[cell]) / np.maximum(n_rim[cell], 1)

    stains = tumour & (od > 0)

    def stained(cell, pos):
        """Whether one of ``cell``'s arcs covers ``pos`` (perimeter_position) on its border."""
        on = np.zeros(len(cell), bool)
        for k in range(3):
            on |= ((pos - arc_s[cell, k]) % 1.0) < arc_l[cell, k]
        return on & stains[cell]

    sig_d = width / 2.355
    sig_r = np.sqrt(sig_d ** 2 + mpp ** 2 / 12)
    amp = od * sig_d / np.maximum(sig_r, 1e-6)
    gran = 1 + 0.15 * _fine(rng, lab.shape, 0.4 * um)
    near = (edge_um < 4.0) & (stains[lab] | stains[across])  # a line reaches here from one side or the other
    near_y, near_x = np.nonzero(near)
    dist = edge_um[near]
    line = np.zeros(len(dist), np.float32)
    for side in (lab[near], across[near]):  # the cell's own line, then its neighbour's: the darker
        live = np.flatnonzero(stains[side])
        c = side[live]
        on = stained(c, perimeter_position(c, near_y[live], near_x[live]))
        line[live] = np.maximum(line[live], amp[c] * np.exp(-0.5 * (dist[live] / sig_r[c]) ** 2) * on)
    deposit = np.zeros(lab.shape, np.float32)
    deposit[near] = line * gran[near]
    # the membrane as seen: a membrane belongs to every cell it borders (the README's convention),
    # so each rim pixel also shows the deposit of the tumour cell across the edge
    rl, nb = lab[rim], across[rim]
    rl_pos = perimeter_position(rl, rim_y, rim_x)
    own_on = stained(rl, rl_pos)
    completeness = np.where(od > 0, np.bincount(rl[own_on], minlength=n) / np.maximum(n_rim, 1), 0.0)
    rim_od = np.maximum(od[rl] * own_on, od[nb] * stained(nb, perimeter_position(nb, rim_y, rim_x)))
    return deposit, completeness, _seen_categories(rl, rl_pos, rim_od, cats, n)


def _truth_columns(seen: dict, completeness: np.ndarray, od: np.ndarray, width: np.ndarray, arc_l: np.ndarray,
                   cats: np.ndarray, rows: np.ndarray, tumour: np.ndarray) -> dict[str, np.ndarray]:
    """SyntheticField.cells' membrane truth for the cells ``rows`` (indices into the per-cell arrays;
    ``tumour`` per row: a non-tumour row is none, zeros): the membrane as seen (_membranes), the
    cell's own deposit, then ``tumour`` and ``pattern``."""
    enc = seen["enclosed"][rows]
    longest_arc = arc_l.max(axis=1)

    def either(seen_value, own):
        return np.where(tumour, np.where(enc, seen_value[rows], own[rows]), 0).astype(np.float32)

    def own(value):
        return np.where(tumour, value[rows], 0).astype(np.float32)

    category = np.where(tumour, seen["category"][rows].astype(str), "none").astype("<U24")
    return {
        "completeness": either(seen["completeness"], completeness),
        "longest_arc": either(seen["longest_arc"], longest_arc),
        "membrane_od": either(seen["membrane_od"], od),
        "category": category,
        "deposit_completeness": own(completeness), "deposit_longest_arc": own(longest_arc),
        "deposit_od": own(od), "width_um": own(width),
        "deposit_category": np.where(tumour, cats[rows].astype(str), "none").astype("<U24"),
        "tumour": tumour,
        "pattern": np.array([x.rsplit("_", 1)[-1] for x in category], dtype="<U10"),
    }


@dataclass(frozen=True)
class Confounders:
    """What real slides add beside membrane staining (all log10 DAB OD unless named otherwise).

    dab_tint_od: uniform DAB over all tissue (background staining); cytoplasmic_od: DAB in every
    tumour cell's cytoplasm (blush); nuclear_dab_fraction: fraction of nuclei carrying DAB OD
    0.4-0.9 (a nuclear marker such as Ki67); masking_od: DAB laid over the nuclei of
    membrane-stained cells (staining strong enough to hide the nucleus); lymphocyte_fraction:
    fraction of stromal seeds drawn as lymphocytes, each a cluster of 3-6 small round dark nuclei
    with ``lymphocyte_clusters``; border_od: nonspecific DAB along both sides of every tumour cell
    border (peak OD of each side's ~0.6 µm line), varying along it in ~3 µm patches with relative
    SD ``border_variation``: the texture real unstained membranes carry (REAL_BORDERS). None of
    these changes the per-cell membrane truth; the defaults draw nothing extra, so a field without
    confounders is the same for the same seed.
    """

    dab_tint_od: float = 0.0
    cytoplasmic_od: float = 0.0
    nuclear_dab_fraction: float = 0.0
    masking_od: float = 0.0
    lymphocyte_fraction: float = 0.10
    lymphocyte_clusters: bool = False
    border_od: float = 0.0
    border_variation: float = 1.0


REAL_BORDERS = Confounders(border_od=0.025)
"""Unstained cell borders as real slides show them. Per border sector of unstained cells, the peak
membrane contrast then reads q50 0.011 / q90 0.023 OD, 16% of sectors >= 0.02 OD (4 null fields):
its tail inside the range of the six real Ki67 fields (q90 0.019-0.025, 7-18%; tests/test_real.py),
its median a little above theirs (0.0073-0.0109), where the default generator's borders read q50
0.0077 / q90 0.014 / 1%."""


# --------------------------------------------------------------------------- tissue model

def _lowfreq(rng, shape, scale_px: float) -> np.ndarray:
    """Smooth unit-variance noise with features about ``scale_px`` across."""
    h, w = shape
    coarse = rng.standard_normal((int(h / scale_px) + 4, int(w / scale_px) + 4)).astype(np.float32)
    big = cv2.resize(coarse, (int((coarse.shape[1] - 1) * scale_px), int((coarse.shape[0] - 1) * scale_px)),
                     interpolation=cv2.INTER_CUBIC)
    out = big[int(scale_px):int(scale_px) + h, int(scale_px):int(scale_px) + w]
    return (out - out.mean()) / (out.std() + 1e-6)


def _fine(rng, shape, sigma_px: float, sigma_y: float | None = None) -> np.ndarray:
    n = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma_px,
                         sigmaY=sigma_y if sigma_y is not None else sigma_px)
    return n / (n.std() + 1e-6)


def _fibres(rng, shape, um: float, angle_deg: float) -> np.ndarray:
    """Unit-variance noise streaked along ``angle_deg`` (collagen fibres, ~3 x 0.6 µm grain)."""
    r = int(np.ceil(7 * um))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
    a = np.radians(angle_deg)
    u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
    k = np.exp(-0.5 * ((u / (2.5 * um)) ** 2 + (v / (0.6 * um)) ** 2))
    n = cv2.filter2D(rng.standard_normal(shape).astype(np.float32), -1, k / k.sum())
    return n / (n.std() + 1e-6)


def _build(rng, w: int, h: int, mpp: float, score: str, variant: str, gastric: bool, *,
           he: bool = False, tissue_fraction: float | None = None, composition: dict[str, float] | None = None,
           confounders: Confounders = Confounders(), clonal: bool = False):
    """Concentration maps (canvas with margin) and the cell table. Returns a dict."""
    um = 1.0 / mpp  # pixels per µm
    pad = int(np.ceil(_PAD_UM * um))
    H, W = h + 2 * pad, w + 2 * pad
    diam = rng.uniform(12.0, 15.0) * um
    dy = diam * np.sqrt(3) / 2
    gy, gx = np.meshgrid(np.arange(-1, H / dy + 1), np.arange(-1, W / diam + 1), indexing="ij")
    seeds = np.stack([((gx + 0.5 * (gy % 2)) * diam).ravel(), (gy * dy).ravel()], 1)
    seeds += rng.uniform(-0.3, 0.3, seeds.shape) * diam
    ns = len(seeds)
    tree = cKDTree(seeds)
    nn = tree.query(seeds, k=2)[0][:, 1] / um  # nearest-neighbour distance, µm

    # stroma gaps: smooth noise thresholded at the seeds; optional tissue mask (slides)
    field_noise = _lowfreq(rng, (H, W), 45 * um)
    sx_i = np.clip(seeds[:, 0].astype(int), 0, W - 1)
    sy_i = np.clip(seeds[:, 1].astype(int), 0, H - 1)
    sval = field_noise[sy_i, sx_i]
    tumour = sval > np.quantile(sval, rng.uniform(0.1, 0.3))
    mask = None
    if tissue_fraction is not None:
        yy_c, xx_c = np.ogrid[0:H, 0:W]
        r2 = ((2 * xx_c / W - 1) ** 2 + (2 * yy_c / H - 1) ** 2).astype(np.float32)
        t = _lowfreq(rng, (H, W), min(H, W) / 5) - 2.5 * r2 ** 2
        binary = (t > np.quantile(t, 1 - tissue_fraction)).astype(np.float32)
        mask = cv2.GaussianBlur(binary, (0, 0), 2 * um)

    # nuclei (per seed)
    r_um = np.minimum(rng.uniform(3.0, 4.5, ns), 0.36 * nn)
    elong = rng.uniform(1.0, 1.3, ns)
    na, nb = r_um * np.sqrt(elong) * um, r_um / np.sqrt(elong) * um
    theta = rng.uniform(0, np.pi, ns)
    ncx = seeds[:, 0] + rng.uniform(-0.8, 0.8, ns) * um
    ncy = seeds[:, 1] + rng.uniform(-0.8, 0.8, ns) * um
    inside = (ncx >= pad) & (ncx < pad + w) & (ncy >= pad) & (ncy < pad + h)
    if mask is not None:
        inside &= mask[np.clip(ncy.astype(int), 0, H - 1), np.clip(ncx.astype(int), 0, W - 1)] > 0.5
    counted = tumour & inside

    fractions = {} if he else composition if composition is not None else _composition(score, variant, gastric, rng)
    order = _lowfreq(rng, (H, W), 30 * um)[sy_i, sx_i] if clonal else None  # ~30 µm clones
    cats = _assign(fractions, counted, None if composition is not None else score, rng, order)
    cats[~tumour] = "none"
    od, width, arc_s, arc_l, cats = _membrane_params(cats, score, rng)

    # Voronoi: nearest and second-nearest seed per pixel; distance to their bisector = edge distance
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    # one thread: the command's --workers are processes, and scipy's query threads outlived a Ctrl-C (exit 139)
    d, idx = tree.query(np.column_stack([xx.ravel(), yy.ravel()]), k=2)
    lab = idx[:, 0].reshape(H, W)
    sep = np.linalg.norm(seeds[idx[:, 1]] - seeds[idx[:, 0]], axis=1)
    edge_um = ((d[:, 1] ** 2 - d[:, 0] ** 2) / (2 * sep) / um).astype(np.float32).reshape(H, W)
    tum_px = tumour[lab]

    dx, dy_ = xx - ncx[lab].astype(np.float32), yy - ncy[lab].astype(np.float32)
    c, s = np.cos(theta).astype(np.float32)[lab], np.sin(theta).astype(np.float32)[lab]
    u_, v_ = (dx * c + dy_ * s) / na[lab].astype(np.float32), (-dx * s + dy_ * c) / nb[lab].astype(np.float32)
    rr = np.sqrt(u_ * u_ + v_ * v_)
    nuc = np.clip((1 - rr) * nb[lab].astype(np.float32) / (0.5 * um) + 0.5, 0, 1) * tum_px
    chrom = 1 + 0.3 * _fine(rng, (H, W), 0.5 * um) + 0.25 * np.exp(-(((rr - 0.9) / 0.1) ** 2))
    h_nuc = rng.uniform(0.5, 0.9, ns) if he else rng.uniform(0.35, 0.8, ns)
    cyto_h = rng.uniform(0.03, 0.08, ns)
    phi = rng.uniform(0, 180)
    fibre = _fibres(rng, (H, W), um, phi)
    conc_h = np.where(tum_px, nuc * (h_nuc[lab] * chrom) + (1 - nuc) * cyto_h[lab],
                      (0.03 + 0.012 * fibre)).astype(np.float32)

    # stromal nuclei: spindles (fibroblasts) and a few lymphocytes
    strom = np.zeros((H, W), np.uint8)
    extra = []
    for i in np.flatnonzero(~tumour):
        p = rng.random()
        ctr = (int(ncx[i] * 16), int(ncy[i] * 16))
        if p < 0.35:
            ax = (int(rng.uniform(5, 8) * um * 16), int(rng.uniform(1.1, 1.6) * um * 16))
            cv2.ellipse(strom, ctr, ax, phi + rng.normal(0, 20), 0, 360, 255, -1, cv2.LINE_AA, 4)
            extra.append((i, np.sqrt(ax[0] * ax[1]) / 16 / um))
        elif p < 0.35 + confounders.lymphocyte_fraction:
            for k in range(int(rng.integers(3, 7)) if confounders.lymphocyte_clusters else 1):
                rad = rng.uniform(2.5, 3.0)
                a, r = (rng.uniform(0, 2 * np.pi), rng.uniform(5.5, 7.0) * um) if k else (0.0, 0.0)
                cv2.circle(strom, (ctr[0] + int(16 * r * np.cos(a)), ctr[1] + int(16 * r * np.sin(a))),
                           int(rad * um * 16), 255, -1, cv2.LINE_AA, 4)
                if k == 0:
                    extra.append((i, rad))
    strom_m = (strom.astype(np.float32) / 255) * ~tum_px
    conc_h += strom_m * (0.85 if he else 0.6)

    if he:
        eos = rng.uniform(0.15, 0.3, ns)
        conc_e = np.where(tum_px, (1 - nuc) * eos[lab] + 0.08 * nuc, 0.38 + 0.12 * fibre).astype(np.float32)
        conc_d = np.zeros((H, W), np.float32)
    else:
        conc_e = None
        conc_d, completeness, seen = _membranes(rng, lab, idx[:, 1].reshape(H, W), edge_um, tumour, seeds, od, width,
                                                arc_s, arc_l, cats, mpp)
        haze = od * rng.uniform(0.03, 0.08, ns)
        conc_d += (tum_px * (1 - nuc) * haze[lab]).astype(np.float32)
        cf = confounders
        conc_d += np.float32(cf.dab_tint_od) + (tum_px * (1 - nuc) * np.float32(cf.cytoplasmic_od)).astype(np.float32)
        if cf.nuclear_dab_fraction or cf.masking_od:
            nuclear = (rng.random(ns) < cf.nuclear_dab_fraction) * rng.uniform(0.4, 0.9, ns)
            nuc_any = np.maximum(nuc, strom_m)
            conc_d += (nuc_any * (nuclear[lab] + cf.masking_od * (od[lab] > 0) * tum_px)).astype(np.float32)
        if cf.border_od:  # nonspecific DAB along every tumour cell's border, stained or not
            near = tum_px & (edge_um < 2.0)
            level = np.maximum(1 + cf.border_variation * _lowfreq(rng, (H, W), 3 * um)[near], 0)
            sig = np.sqrt((0.6 / 2.355) ** 2 + mpp ** 2 / 12)
            conc_d[near] += (cf.border_od * level * np.exp(-0.5 * ((edge_um[near] - 0.3) / sig) ** 2)).astype(np.float32)

    if he:
        completeness = np.zeros(ns)
        seen = {"category": cats, "enclosed": np.zeros(ns, bool),
                **dict.fromkeys(("completeness", "longest_arc", "membrane_od"), completeness)}
    # cell table: counted tumour cells, then stromal nuclei inside the image
    rows = np.flatnonzero(counted)
    ex = [(i, r) for i, r in extra if inside[i]]
    sel = np.concatenate([rows, np.array([i for i, _ in ex], int)])
    n_t = len(rows)
    is_t = np.arange(len(sel)) < n_t
    cells = {
        "x_px": (ncx[sel] - pad).astype(np.float32), "y_px": (ncy[sel] - pad).astype(np.float32),
        "nucleus_radius_um": np.concatenate([r_um[rows], [r for _, r in ex]]).astype(np.float32),
        **_truth_columns(seen, completeness, od, width, arc_l, cats, sel, is_t),
    }
    row_of = np.full(ns, -1, np.int32)
    row_of[rows] = np.arange(n_t)
    label_map = np.where(tum_px, row_of[lab], -1).astype(np.int32)
    maps = {"h": conc_h, "d": None if he else conc_d, "e": conc_e}
    if mask is not None:
        maps = {k: (m * mask if m is not None else None) for k, m in maps.items()}
        label_map[mask < 0.5] = -1
    crop = (slice(pad, pad + h), slice(pad, pad + w))
    return {"maps": maps, "cells": cells, "pad": pad, "label_map": label_map[crop],
            "dab_od": None if he else maps["d"][crop].copy()}


# --------------------------------------------------------------------------- optics

def _jitter_vec(v, deg: float, rng) -> tuple[float, float, float]:
    v = np.asarray(v, float)
    if deg <= 0:
        return tuple(v)
    p = rng.standard_normal(3)
    p -= p.dot(v) * v
    p /= np.linalg.norm(p)
    a = np.radians(np.clip(rng.normal(0, deg), -2 * deg, 2 * deg))  # bounded: at most 2x the jitter
    out = np.abs(np.cos(a) * v + np.sin(a) * p)
    return tuple(out / np.linalg.norm(out))


def _stains(rng, stain_jitter: float) -> tuple[StainSet, float]:
    """Jittered stain vectors, background I0 and a haematoxylin amount scale."""
    base = rng.uniform(245, 255) - rng.uniform(0, 1.5 * stain_jitter)
    bg = np.clip(base + rng.uniform(-2, 2, 3) * (1 + stain_jitter / 3), 200, 255)
    hs = float(np.clip(np.exp(rng.normal(0, 0.03 * stain_jitter)), 0.6, 1.6))
    st = StainSet(_jitter_vec(H_DAB.hematoxylin, stain_jitter, rng), _jitter_vec(H_DAB.dab, stain_jitter, rng),
                  tuple(float(b) for b in bg), source="synthetic")
    return st, hs


def _render(rng, maps: dict, vectors: dict, background, pad: int, w: int, h: int, mpp: float,
            jpeg_quality: int | None) -> np.ndarray:
    """Beer-Lambert -> Gaussian PSF (PSF_UM) -> sensor noise -> 8-bit -> JPEG."""
    od = None
    for k, m in maps.items():
        if m is None:
            continue
        term = m[..., None] * np.asarray(vectors[k], np.float32)
        od = term if od is None else od + term
    inten = np.exp(-_LN10 * od) * np.asarray(background, np.float32)
    inten = cv2.GaussianBlur(inten, (0, 0), PSF_UM / mpp)[pad:pad + h, pad:pad + w]
    inten += rng.standard_normal(inten.shape, dtype=np.float32) * np.sqrt(inten / 120.0 + 0.3)
    return _jpeg(np.clip(inten + 0.5, 0, 255).astype(np.uint8), jpeg_quality)


def _jpeg(rgb: np.ndarray, quality: int | None) -> np.ndarray:
    """``rgb`` through JPEG at ``quality`` (None or 0: as it is)."""
    if not quality:
        return rgb
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def _true_score(cells: dict[str, np.ndarray], gastric: bool) -> str:
    """The guideline's call on the true counts of ``cells`` (breast ASCO/CAP 2023, or gastric resection)."""
    from .guidelines import apply_guideline

    return apply_guideline(_counts(cells), "gastric" if gastric else "breast-asco-cap-2023").score


def _counts(cells: dict[str, np.ndarray]) -> dict[str, int]:
    """Number of the tumour ``cells`` in each category, as seen."""
    category = cells["category"][cells["tumour"]]
    return {c: int(np.count_nonzero(category == c)) for c in CATEGORIES}


def _field(score, seed, size_px, mpp, variant, stain_jitter, jpeg_quality, gastric, tissue_fraction=None,
           composition=None, confounders=Confounders(), clonal=False):
    rng = np.random.default_rng(seed)
    if composition is not None:
        composition = _check_composition(composition)
        variant = "composition"
    elif score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    elif score == "0":
        variant = variant or ("null" if rng.random() < 0.5 else "ultralow")
        if variant not in ("null", "ultralow"):
            raise ValueError(f"variant for score 0 must be 'null' or 'ultralow', got {variant!r}")
    else:
        variant = "gastric" if gastric else "standard"
    w, h = (int(v) for v in size_px)
    stains, hs = _stains(rng, stain_jitter)
    b = _build(rng, w, h, mpp, score, variant, gastric, tissue_fraction=tissue_fraction,
               composition=composition, confounders=confounders, clonal=clonal)
    b["maps"]["h"] *= hs
    img = _render(rng, b["maps"], {"h": stains.hematoxylin, "d": stains.dab}, stains.background,
                  b["pad"], w, h, mpp, jpeg_quality)
    if composition is not None:
        score = _true_score(b["cells"], gastric)
    return SyntheticField(img, float(mpp), score, variant, b["cells"], stains, int(seed),
                          dab_od=b["dab_od"], label_map=b["label_map"])


def generate_field(score: str | None = None, *, seed: int, size_px: tuple[int, int] = (512, 512), mpp: float = 0.5,
                   variant: str | None = None, stain_jitter: float = 0.0, jpeg_quality: int | None = 88,
                   gastric: bool = False, composition: dict[str, float] | None = None,
                   confounders: Confounders = Confounders(), clonal: bool = False) -> SyntheticField:
    """One synthetic HER2 IHC field of class ``score`` ("0", "1+", "2+", "3+"), or of an exact ``composition``.

    ``size_px`` is (width, height) in pixels at ``mpp`` µm/px. ``variant`` ("null"/"ultralow")
    applies to score 0 (random if None). ``stain_jitter`` (degrees) rotates the H and DAB vectors,
    scales the haematoxylin amount and tints the background; DAB amounts are never scaled, so the
    category truth holds. ``gastric`` adds lateral (U-shaped) patterns at 2+/3+. ``composition``
    ({category: fraction of tumour cells}, e.g. {"strong_complete": 0.12}) replaces the class's
    random mix; the field's score is then the guideline's call on its true counts (breast ASCO/CAP
    2023, or gastric resection with ``gastric``). ``confounders`` adds background tint,
    cytoplasmic or nuclear DAB, nucleus-masking DAB and lymphocyte clusters. ``clonal`` draws each
    category in patches (~30 µm), as expression is in tumours, instead of scattering it cell by cell.
    Deterministic per seed.
    """
    return _field(score, seed, size_px, mpp, variant, stain_jitter, jpeg_quality, gastric,
                  composition=composition, confounders=confounders, clonal=clonal)


def generate_he_field(*, seed: int, size_px: tuple[int, int] = (512, 512), mpp: float = 0.5,
                      jpeg_quality: int | None = 88) -> np.ndarray:
    """An H&E field (haematoxylin + eosin, no DAB), RGB uint8, for wrong-stain tests."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in size_px)
    bg = tuple(float(x) for x in np.clip(rng.uniform(245, 255) + rng.uniform(-2, 2, 3), 0, 255))
    b = _build(rng, w, h, mpp, "0", "null", False, he=True)
    return _render(rng, b["maps"], {"h": H_DAB.hematoxylin, "e": EOSIN_OD}, bg, b["pad"], w, h, mpp, jpeg_quality)


def paint_membranes(rgb: np.ndarray, nuclei: np.ndarray, *, mpp: float, composition: dict[str, float], seed: int,
                    clonal: bool = False, gastric: bool = False, reach_um: float = 4.0,
                    jpeg_quality: int | None = None) -> SyntheticField:
    """A real field with membranes of known truth: the generator's membrane deposits laid on its cells.

    ``rgb``: a real brightfield field without membrane DAB, a real HER2 0 (e.g. a real IHC field with its
    specific DAB taken out by stain.remove_dab where it stains, its DAB background kept: removed from the
    whole field, no chromogen is left, which no slide shows); ``nuclei``: a label image of the tumour nuclei
    to stain (an annotation: each nucleus its own label, 0 elsewhere; a bool mask: each 4-connected part one
    nucleus); ``mpp``: the field's µm/px. Each nucleus's cell is the ground nearer to it than to any other
    nucleus, out to ``reach_um`` from it (glass included); its membrane is drawn along that cell's edge with
    the composition's categories (``composition``, ``clonal`` and ``gastric`` as in generate_field), and
    laid on the field by Beer-Lambert: each pixel's light times the deposit's DAB transmittance (default
    vectors), blurred by the optics' PSF (PSF_UM), then JPEG at ``jpeg_quality`` (None: none beyond the
    field's own). The field keeps its own nuclei, counterstain, stroma and noise: what a scorer meets on
    real tissue. ``cells`` lists the annotated nuclei (all tumour), with the truth as generate_field gives
    it; ``label_map``: the cell owning each pixel (-1: none). Deterministic per seed.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    nuclei = np.asarray(nuclei)
    if nuclei.shape != rgb.shape[:2]:
        raise ValueError(f"nuclei must be a label image the size of rgb {rgb.shape[:2]}, got {nuclei.shape}")
    if nuclei.dtype == bool:  # a mask: each 4-connected part a nucleus
        nuclei = cv2.connectedComponents(nuclei.view(np.uint8), connectivity=4)[1]
    elif nuclei.dtype.kind not in "iu" or nuclei.min(initial=0) < 0:
        raise ValueError(f"nuclei must be a label image of whole numbers >= 0 (or a bool mask), got {nuclei.dtype}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0 (the field's µm/px), got {mpp}")
    if not reach_um > 0:
        raise ValueError(f"reach_um must be > 0 (how far a cell reaches beyond its nucleus, µm), got {reach_um}")
    ids, owner = np.unique(nuclei, return_inverse=True)  # owner: 0 for the ground, 1.. per nucleus
    ground = len(ids) > 0 and ids[0] == 0
    owner = owner.reshape(nuclei.shape).astype(np.intp) - ground
    n = len(ids) - ground
    if n == 0:
        raise ValueError("nuclei holds no nucleus to stain")
    um = 1.0 / mpp
    # each pixel's nearest nucleus pixel; beyond reach_um of every nucleus, the ground (cell n: no tumour)
    dist, (ny, nx) = ndimage.distance_transform_edt(owner < 0, return_indices=True)
    lab = np.where(dist <= reach_um * um, owner[ny, nx], n)
    # edges run between pixels of different cells: a pixel's distance in is to the nearest such pixel, plus half
    # a pixel, or to the end of its cell's reach, where nearer; the cell across is that pixel's other cell
    differs = np.zeros(lab.shape, bool)
    other = np.full(lab.shape, n)
    for a, b in (((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
                 ((slice(None), slice(None, -1)), (slice(None), slice(1, None)))):
        d = lab[a] != lab[b]
        for x, y in ((a, b), (b, a)):
            differs[x] |= d
            other[x] = np.where(d, lab[y], other[x])
    to_edge, (ey, ex) = ndimage.distance_transform_edt(~differs, return_indices=True)
    edge_um = np.minimum((to_edge + 0.5) * mpp, reach_um - dist * mpp).astype(np.float32)
    across = np.where(lab[ey, ex] == lab, other[ey, ex], lab[ey, ex])
    area = np.bincount(owner[owner >= 0], minlength=n)
    yy, xx = np.nonzero(owner >= 0)
    centres = np.column_stack([np.bincount(owner[yy, xx], xx, n), np.bincount(owner[yy, xx], yy, n)]) / area[:, None]

    tumour = np.arange(n + 1) < n
    order = _lowfreq(rng, lab.shape, 30 * um)[centres[:, 1].astype(int), centres[:, 0].astype(int)] if clonal else None
    cats = np.append(_assign(_check_composition(composition), tumour[:n], None, rng, order), "none")
    od, width, arc_s, arc_l, cats = _membrane_params(cats, None, rng)
    deposit, completeness, seen = _membranes(rng, lab, across, edge_um, tumour, np.vstack([centres, [[0.0, 0.0]]]),
                                             od, width, arc_s, arc_l, cats, mpp)
    stains = H_DAB.with_background(estimate_background(rgb))
    light = np.exp(-_LN10 * deposit[..., None] * np.asarray(stains.dab, np.float32))
    image = _jpeg(np.clip(rgb * cv2.GaussianBlur(light, (0, 0), PSF_UM / mpp) + 0.5, 0, 255).astype(np.uint8), jpeg_quality)
    rows = np.arange(n)
    cells = {"x_px": centres[:, 0].astype(np.float32), "y_px": centres[:, 1].astype(np.float32),
             "nucleus_radius_um": (np.sqrt(area / np.pi) * mpp).astype(np.float32),
             **_truth_columns(seen, completeness, od, width, arc_l, cats, rows, tumour[:n])}
    return SyntheticField(image, float(mpp), _true_score(cells, gastric), "painted", cells, stains, int(seed),
                          dab_od=deposit, label_map=np.where(lab < n, lab, -1).astype(np.int32))


def make_slide(score: str, *, seed: int, size_px: tuple[int, int] = (3000, 2000), mpp: float = 0.25,
               tissue_fraction: float = 0.5, variant: str | None = None, gastric: bool = False,
               stain_jitter: float = 0.0) -> tuple[np.ndarray, SyntheticField]:
    """A small whole-slide-like image: glass (I0 ~245-255) with irregular tissue regions.

    The tissue is one seamless synthetic field at the slide's ``mpp`` masked to ~``tissue_fraction``
    of the area; truth counts cover cells whose nucleus lies in tissue. No JPEG is applied here
    (the TIFF writer compresses). Returns (rgb, truth).
    """
    f = _field(score, seed, size_px, mpp, variant, stain_jitter, None, gastric, tissue_fraction=tissue_fraction)
    return f.image, f


# --------------------------------------------------------------------------- files

def write_pyramidal_tiff(path, rgb: np.ndarray, *, mpp: float, tile: int = 256, quality: int = 90,
                         min_size: int = 512) -> Path:
    """Tiled JPEG TIFF readable by tifffile and OpenSlide (generic TIFF).

    Level 0, then 2x reductions (cv2 INTER_AREA) until the longest side is at most ``min_size``,
    each a top-level IFD (reduced levels subfiletype=1), resolution 1e4/mpp px/cm. ``rgb`` is RGB;
    tifffile stores JPEG tiles as YCbCr (photometric 6), which tifffile and OpenSlide both decode.
    """
    path = Path(path)
    levels = [np.ascontiguousarray(rgb)]
    while max(levels[-1].shape[:2]) > min_size:
        a = levels[-1]
        levels.append(cv2.resize(a, (max(1, a.shape[1] // 2), max(1, a.shape[0] // 2)), interpolation=cv2.INTER_AREA))
    with tifffile.TiffWriter(path) as tw:
        for i, a in enumerate(levels):
            m = mpp * (rgb.shape[1] / a.shape[1])
            tw.write(a, tile=(tile, tile), photometric="rgb", compression="jpeg",
                     compressionargs={"level": int(quality)}, subfiletype=0 if i == 0 else 1,
                     resolution=(1e4 / m, 1e4 / m), resolutionunit="CENTIMETER", metadata=None)
    return path


def _save_image(path: Path, rgb: np.ndarray, mpp: float) -> None:
    """``rgb`` as a PNG (lossless) or JPEG (quality 88) by ``path``'s suffix, with its µm/px as dpi, written whole or not at all."""
    dpi = 25400.0 / mpp  # PIL writes pHYs in px/m
    options = dict(format="PNG", optimize=False, compress_level=9) if path.suffix == ".png" else dict(format="JPEG", quality=88)
    with atomic_file(path) as fh:
        Image.fromarray(rgb).save(fh, dpi=(dpi, dpi), **options)


FIELDS_LIST = ".synth-fields"
"""The hidden list of the fields of the set write_dataset wrote into a folder, or, while a run writes, of those it may
write: what a later run replaces where labels.csv is gone (a stopped run, or one deleted by hand)."""


def _is_field(rel: Path) -> bool:
    """Whether ``rel`` (a path within a set) names a field write_dataset writes: images/field_<score>_<n>.<png|jpg>."""
    return rel.parent == Path("images") and _FIELD_NAME.fullmatch(rel.name) is not None


def _write_fields_list(out: Path, rels) -> None:
    atomic_write(out / FIELDS_LIST, "".join(f"{rel}\n" for rel in sorted(rels)))


def _earlier_fields(out: Path) -> list[Path]:
    """The fields an earlier write_dataset wrote into ``out``, for a new set to replace: those its labels.csv lists, or
    where it is gone (a stopped run, or deleted by hand), those FIELDS_LIST names (a set of a version without that
    list: its images/field_<score>_<n>.<png|jpg>); [] for an empty or new folder. ValueError where ``out`` holds files but no
    earlier set (none of these), or a labels.csv that is not one write_dataset wrote (a labelled set of real images):
    nothing of another's is written over or removed (an image of the user's own named like a field but not listed
    stays, through a stopped run too)."""
    if not out.is_dir() or next(visible_files(out), None) is None:
        return []
    labels = out / "labels.csv"
    if labels.exists():
        try:
            rows = list(csv.reader(io.StringIO(labels.read_text(encoding="utf-8"))))
        except (OSError, UnicodeDecodeError, csv.Error):
            rows = []
        if not rows or rows[0] != _LABELS_HEADER or not all(len(r) == 3 and _is_field(Path(r[0])) for r in rows[1:]):
            raise ValueError(f"{labels}: not the labels of a set synth wrote; give synth an empty or new folder (it "
                             "replaces only a set of its own)")
        return [out / r[0] for r in rows[1:] if (out / r[0]).is_file()]
    if (listing := out / FIELDS_LIST).is_file():
        listed = [Path(rel) for rel in listing.read_text(encoding="utf-8").splitlines()]
        if fields := [out / rel for rel in listed if _is_field(rel) and (out / rel).is_file()]:
            return fields
        raise ValueError(f"{out}: holds files but none of a set synth wrote (its list names none that is there); give "
                         "synth an empty or new folder")
    fields = sorted(p for p in (out / "images").glob("*") if _FIELD_NAME.fullmatch(p.name)) if (out / "images").is_dir() else []
    if not fields:
        raise ValueError(f"{out}: holds files but no set synth wrote (no labels.csv, no images/field_*); give synth an "
                         "empty or new folder")
    return fields


def write_dataset(out_dir, *, n_per_class: int, seed: int, size_px: tuple[int, int] = (512, 512),
                  mpp: float = 0.5, stain_jitter: float = 0.0, fmt: str = "png", real_borders: bool = False) -> Path:
    """Write ``n_per_class`` fields per score plus labels.csv (path,label,level: the score and its
    report level, null and ultralow told apart) and truth.jsonl; ``real_borders``: every field with
    REAL_BORDERS. Each file is written whole or not at all; an earlier set's labels are removed first and
    the new labels.csv written last, so a run stopped half-way leaves no labels describing other images.
    ``out_dir``: a new or empty folder, or one holding an earlier set, whose fields the new set does not write over
    are removed (other files there are kept); ValueError for a folder holding anything else (_earlier_fields)."""
    if fmt not in ("png", "jpg"):
        raise ValueError(f"fmt must be 'png' or 'jpg', got {fmt!r}")
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class (the fields per class) must be a whole number of at least 1, got {n_per_class!r}")
    if not 0 <= stain_jitter <= MAX_STAIN_JITTER_DEG:
        raise ValueError(f"stain_jitter must be 0-{MAX_STAIN_JITTER_DEG:g} degrees (s.d. of the stain vectors' turn), "
                         f"got {stain_jitter!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    earlier = _earlier_fields(out)
    paths = [f"images/field_{_FILE_TAG[score]}_{i:04d}.{fmt}" for score in SCORES for i in range(n_per_class)]
    known = set(earlier)
    if theirs := [rel for rel in paths if (out / rel).exists() and out / rel not in known]:
        raise ValueError(f"{out / theirs[0]}: a file no earlier set of synth's lists, where this set writes a field"
                         f"{f' (and {len(theirs) - 1} more)' if len(theirs) > 1 else ''}; move it, or give synth another folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    # while no labels list them, the earlier set's fields and this one's are named in FIELDS_LIST (a stopped run's own)
    _write_fields_list(out, {str(f.relative_to(out)) for f in earlier} | set(paths))
    for name in ("labels.csv", "truth.jsonl"):  # an earlier set's labels would describe images written over
        (out / name).unlink(missing_ok=True)
    for f in known - {out / rel for rel in paths}:  # a larger set's, or another format's: no new labels list them
        f.unlink()
    seeds = np.random.SeedSequence(seed).generate_state(n_per_class * len(SCORES))
    rows, truth = [], []
    for j, score in enumerate(SCORES):
        for i in range(n_per_class):
            s = int(seeds[j * n_per_class + i])
            f = generate_field(score, seed=s, size_px=size_px, mpp=mpp, stain_jitter=stain_jitter,
                               jpeg_quality=None if fmt == "jpg" else 88,
                               confounders=REAL_BORDERS if real_borders else Confounders())
            rel = paths[j * n_per_class + i]
            _save_image(out / rel, f.image, mpp)
            rows.append((rel, score, {"null": "0 (null)", "ultralow": "0+ (ultralow)"}.get(f.variant, score)))
            truth.append({"path": rel, **f.to_truth_dict()})
    atomic_write(out / "truth.jsonl", "".join(json.dumps(t) + "\n" for t in truth))
    text = io.StringIO(newline="")
    wr = csv.writer(text)
    wr.writerow(_LABELS_HEADER)
    wr.writerows(rows)
    atomic_write(out / "labels.csv", text.getvalue())  # last: a set with labels is whole
    _write_fields_list(out, paths)  # this set's, should labels.csv go
    return out


def write_samples(out_dir) -> Path:
    """The committed sample set: 8 PNG fields (512 px, 0.5 µm/px), slide_2plus.tif (2400x1600 px at
    0.25 µm/px, 4 levels) and truth.json (each file's truth score, variant and cell counts)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [("0", "null", "field_0_null"), ("0", "ultralow", "field_0_ultralow"),
             ("1+", None, "field_1plus_a"), ("1+", None, "field_1plus_b"),
             ("2+", None, "field_2plus_a"), ("2+", None, "field_2plus_b"),
             ("3+", None, "field_3plus_a"), ("3+", None, "field_3plus_b")]
    truth = {}
    for k, (score, variant, name) in enumerate(specs):
        f = generate_field(score, seed=1000 + k, variant=variant)
        _save_image(out / f"{name}.png", f.image, f.mpp)
        truth[f"{name}.png"] = f.to_truth_dict()
    rgb, t = make_slide("2+", seed=2024, size_px=(2400, 1600), mpp=0.25, tissue_fraction=0.45)
    write_pyramidal_tiff(out / "slide_2plus.tif", rgb, mpp=0.25, quality=80)
    truth["slide_2plus.tif"] = t.to_truth_dict()
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    return out
