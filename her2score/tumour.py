"""Which cells are tumour cells, and where each cell's DAB lies (membrane, cytoplasm, nucleus).

The guideline's "invasive tumour cells" are approximated by epithelial cells, within the tumour annotation
where one is given: lymphocytes and plasma cells (small, compact, dense nuclei), spindle cells
(fibroblasts, endothelium, smooth muscle: nuclei narrower than 5 µm and elongated), isolated cells
(fewer than a few epithelial neighbours: stroma, scattered inflammatory cells) and small nuclei
alone in a wide cell (a stromal nucleus in extracellular matrix) are left out. Pure functions over
per-cell measurements; the thresholds are in µm and log10 OD.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .categories import settings_from_dict
from .guidelines import ZERO_SPLIT, cytoplasm_doubt
from .membrane import CellMeasurements
from .neighbours import count_within

__all__ = ["TumourRule", "TumourSelection", "select_tumour_cells", "LEFT_OUT", "COMPARTMENTS", "unstained_level", "stained_cytoplasm",
           "staining_compartments", "UNSTAINED_MAX_OD", "diffuse_cytoplasm_od", "with_cytoplasm_doubt"]


@dataclass(frozen=True)
class TumourRule:
    """How epithelial (tumour) cells are told from the rest, in µm.

    Lymphocyte-like (lymphocytes, plasma cells): nucleus smaller than ``lymphocyte_max_um2`` (about
    6 µm across), less elongated than ``lymphocyte_max_elongation`` (major / minor axis: a plasma
    cell's oval nucleus, ~10-12 px long at 0.5 µm/px, measures 1.5-1.7; 1.5 left the real colon's oval
    lamina-propria nuclei in) and darker than ``lymphocyte_darkness`` x the median nuclear haematoxylin
    OD (condensed chromatin; a ratio, so it holds under any counterstain). Spindle: nucleus narrower
    than ``spindle_max_width_um`` and longer than ``spindle_min_elongation`` x its width. Too small: a nucleus under ``min_nucleus_um2`` or a
    cell under ``min_cell_um2`` (debris, the dark junction of strong membranes). Cohesive: at least
    ``min_neighbours`` other candidate cells within ``neighbour_radius_um``. In matrix: a nucleus
    under ``matrix_max_um2`` (about 5 µm across) that fills less than ``matrix_max_fill`` of its cell
    (the cell, grown up to 9 µm from the nucleus, reaches 10 x its area, 200 µm² or more: a rim of
    cytoplasm over 5 µm wide around a tiny nucleus), which is a stromal nucleus lying alone in
    extracellular matrix; an epithelial cell's nucleus is larger or its neighbours keep its cell
    narrow. Such cells are left out after the cohesion count, in which they still count.

    A nucleus's area, elongation and width are those of its core, its full width at half maximum
    (membrane.measure_cells), so the bounds read in their own terms: the nuclear mask reaches into the
    blurred tail (real Ki67 nuclei 1.38x their annotated area on it, 1.05x on the core; a fibroblast
    drawn 2.2-3.2 µm wide ~5 µm on it, 3-3.5 µm on the core). The real fields read alike with the
    lymphocyte bound anywhere from 25 to 32 µm² (DeepLIIF tumour precision / recall 0.672-0.674 / 0.788,
    the colon's lamina propria 19-21% counted); the generator draws tumour nuclei 3-4.5 µm in radius but no
    wider than 0.36 of the distance to the next cell, a third of them under 31 µm², and 32 left out a fifth
    of its tumour cells, 28 a sixth. The debris and matrix bounds, set on the mask, stay: 8 and 14 µm² (the
    mask's figures scaled to the core) keep the DeepLIIF F1 (0.666 / 0.804) and a further 2% of the
    generator's tumour cells, but count 24% of the colon's lamina propria (20%).
    """

    lymphocyte_max_um2: float = 28.0
    lymphocyte_max_elongation: float = 1.7
    lymphocyte_darkness: float = 1.15
    spindle_max_width_um: float = 5.0
    spindle_min_elongation: float = 2.0
    min_nucleus_um2: float = 12.0
    min_cell_um2: float = 40.0
    neighbour_radius_um: float = 20.0
    min_neighbours: int = 3
    matrix_max_um2: float = 20.0
    matrix_max_fill: float = 0.10

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TumourRule":
        """The defaults with the fields ``d`` gives (categories.settings_from_dict)."""
        return settings_from_dict(cls, d, "tumour rule setting", whole_numbers=("min_neighbours",))


LEFT_OUT: tuple[str, ...] = ("lymphocyte-like", "spindle (stromal/endothelial)", "too small",
                             "isolated (not in an epithelial group)", "small nucleus in a wide cell (stroma)",
                             "outside the tumour annotation")
"""Why a cell is not a tumour cell, in the order of the codes TumourSelection.left_out holds (from 1; 0: counted)."""


@dataclass(frozen=True)
class TumourSelection:
    """Per cell why it was left out of the tumour (``left_out``: 0 counted, else 1 + its index in LEFT_OUT)."""

    left_out: np.ndarray

    @property
    def tumour(self) -> np.ndarray:
        """The tumour mask over cells."""
        return self.left_out == 0

    @property
    def excluded(self) -> dict[str, int]:
        """How many cells each criterion left out (within the annotation, where one is given)."""
        return {why: int(np.sum(self.left_out == code)) for code, why in enumerate(LEFT_OUT[:-1], start=1)}

    def describe(self, region: str | None = None) -> str:
        """The cells counted and those left out, in words; ``region``: the tumour annotation's source, if any."""
        out = ", ".join(f"{n} {why}" for why, n in self.excluded.items() if n)
        if region is None:
            return f"detected epithelial cells (no tumour annotation given); left out: {out or 'none'}"
        return f"{region}; epithelial cells within it, left out: {out or 'none'}"


def select_tumour_cells(m: CellMeasurements, *, um_per_px: float, rule: TumourRule = TumourRule(),
                        within: np.ndarray | None = None) -> TumourSelection:
    """Epithelial cells among ``m`` (positions in pixels of ``um_per_px`` µm); ``within``: per cell, whether it
    lies in the tumour annotation (cells outside it are not counted, left out as outside it and in no criterion's
    count; they still count as neighbours of the cells inside it).

    A cell found by its membrane ring alone (no nucleus seen) is epithelial by construction: it
    sits in a network of stained membranes.
    """
    nucleated = m.nucleus_area_um2 > 0
    dark_ref = float(np.median(m.hematoxylin_od[nucleated])) if nucleated.any() else 0.0
    lymph = (nucleated & (m.nucleus_area_um2 < rule.lymphocyte_max_um2)
             & (m.nucleus_elongation < rule.lymphocyte_max_elongation)
             & (m.hematoxylin_od > rule.lymphocyte_darkness * dark_ref))
    spindle = (nucleated & ~lymph & (m.nucleus_width_um < rule.spindle_max_width_um)
               & (m.nucleus_elongation > rule.spindle_min_elongation))
    small = ~lymph & ~spindle & ((nucleated & (m.nucleus_area_um2 < rule.min_nucleus_um2)) | (m.cell_area_um2 < rule.min_cell_um2))
    candidate = ~(lymph | spindle | small)
    isolated = np.zeros(len(m), bool)
    if candidate.any():
        pts = np.column_stack([m.x, m.y])[candidate] * um_per_px
        n = count_within(pts, rule.neighbour_radius_um)
        isolated[np.flatnonzero(candidate)[n < rule.min_neighbours]] = True
    # a small nucleus alone in a wide cell: stroma, left out after it has counted as a neighbour (counted out
    # there, it took scattered tumour cells of a stroma-rich real field with it)
    in_matrix = (candidate & ~isolated & nucleated & (m.nucleus_area_um2 < rule.matrix_max_um2)
                 & (m.nucleus_area_um2 < rule.matrix_max_fill * m.cell_area_um2))
    inside = np.ones(len(m), bool) if within is None else within
    left_out = np.zeros(len(m), np.int8)
    for code, left in enumerate((lymph, spindle, small, isolated, in_matrix), start=1):  # each excludes the ones before
        left_out[left] = code
    left_out[~inside] = len(LEFT_OUT)  # outside the annotation: not counted whatever it looks like
    return TumourSelection(left_out)


COMPARTMENTS: tuple[str, ...] = ("none", "membrane", "cytoplasm", "nucleus")
"""Where a cell's DAB lies, in the order of the codes staining_compartments returns."""


def unstained_level(m: CellMeasurements) -> float:
    """The slide's unstained cytoplasmic DAB level (log10 OD): the 10th percentile over cells (stroma, HER2 0 cells)."""
    cyto = np.nan_to_num(m.cytoplasm_dab_od, nan=0.0)
    return float(np.percentile(cyto, 10)) if len(cyto) else 0.0


def stained_cytoplasm(m: CellMeasurements, *, unstained_od: float, cytoplasmic_od: float = 0.10) -> np.ndarray:
    """Per cell, whether its cytoplasm's DAB exceeds the slide's ``unstained_od`` (unstained_level) by ``cytoplasmic_od`` (log10 OD)."""
    return np.nan_to_num(m.cytoplasm_dab_od, nan=0.0) - unstained_od >= cytoplasmic_od


UNSTAINED_MAX_OD = 0.03
"""The most cytoplasmic DAB (log10 OD) a slide's unstained level is taken to be where diffuse cytoplasmic DAB is
measured against it: the palest tenth of cells reads 0.016 OD or less on every real image here (0.000-0.016: the
colon IHC, the Ki67 fields and what is derived from them), where a blushed generator field with little stroma reads
0.09, its own blush, which measured against itself disappeared. Those real levels count a cell without measurable
cytoplasm as 0 (unstained_level): the real colon's is 0.000 only so (12% of its cells), its measured cells' palest
tenth 0.023. A DAB background over all tissue above this level (stroma included) is read as blush, by its excess
(cytoplasm_doubt's words say "over unstained tissue", not over the stroma): it raises the flag only where the
membranes read stand out less than it, which a background that high leaves in doubt too."""


def diffuse_cytoplasm_od(m: CellMeasurements, *, unstained_cells: np.ndarray, reference_cells: np.ndarray,
                         unstained_od: float, min_cells: int = 10, min_reference_cells: int = 5) -> float | None:
    """The median cytoplasmic DAB (log10 OD) of ``unstained_cells`` (bool: the tumour cells read without
    membrane staining) above the lowest of the slide's ``unstained_od`` (unstained_level: its palest tenth
    of cells, which where stroma is scarce are blushed tumour cells), UNSTAINED_MAX_OD and the median of
    ``reference_cells`` (bool: the cells left out as no tumour, where at least ``min_reference_cells``: where
    stroma is scarce, mostly tumour cells too); None for fewer than ``min_cells`` unstained tumour cells. Where
    HER2 stains membranes, such cells' cytoplasm is as pale as the stroma's; a stain that fills every tumour
    cell's cytoplasm leaves it as dark as that of the cells read stained, whose "membranes" may then be
    cytoplasm between cells."""
    def level(cells: np.ndarray, at_least: int) -> float | None:
        cyto = m.cytoplasm_dab_od[cells]
        cyto = cyto[np.isfinite(cyto)]
        return float(np.median(cyto)) if len(cyto) >= at_least else None

    own = level(unstained_cells, min_cells)
    if own is None:
        return None
    reference = level(reference_cells, min_reference_cells)
    return own - min(unstained_od, UNSTAINED_MAX_OD, np.inf if reference is None else reference)


def with_cytoplasm_doubt(flags: tuple[str, ...], score: str | None, level: str, blush: float | None,
                         rise: float | None, *, guideline: str, filled: float | None = None) -> tuple[tuple[str, ...], str]:
    """``flags`` plus ``cytoplasmic_dab``, and the words that say why (to append to a reason; "" without the flag),
    where membrane staining was read (a call over 0, or 0+ (ultralow)) and diffuse cytoplasmic DAB
    (diffuse_cytoplasm_od, at guidelines.DIFFUSE_CYTOPLASM_OD or more) stands higher than the membranes read stand out
    (``rise``: the stained tumour cells' median membrane contrast, log10 OD; None where the cells measured
    read no membrane, as under a CNN's call over a classical 0 (null)): in the tumour cells read unstained
    (``blush``), or in those read stained (``filled``): the stain fills cytoplasm, which the guidelines
    disregard, and the membranes read may be cytoplasm between cells: any lower level. Membranes standing out well above it are
    membranes (held-out generator fields: 3+ fields whose misread cells keep a 3+ cell's cytoplasmic haze, blush
    0.075-0.087 against membranes 0.31; the stained cells of 97 jittered 3+ fields, filled 0.14 median and
    0.26 at most, their membranes 1.15 x that or more; the flagged real cases: membranes 0.04-0.10 against
    blush 0.12-0.26, and the real colon's FHL2 stain, membranes 0.19 against its stained cells' cytoplasm
    0.43). ``guideline`` names the lowest level it could be: 0 (null) under one that splits 0
    (guidelines.ZERO_SPLIT), else 0 (eligibility weighs a breast 2018 call's 0 as 2023's two, null and
    ultralow, as its rules name them)."""
    if (score == "0" and level != "0+ (ultralow)") or score is None or (words := cytoplasm_doubt(blush, rise, filled)) is None:
        return flags, ""
    zero = "0 (null)" if guideline in ZERO_SPLIT else "0"
    return (*flags, "cytoplasmic_dab"), (f"; {words}: the stain fills cytoplasm, which the guidelines disregard, and the "
                                         f"membranes read may be cytoplasm between cells: it could be lower, down to {zero}")


def staining_compartments(m: CellMeasurements, membranous: np.ndarray, *, unstained_od: float,
                          nuclear_od: float = 0.15) -> np.ndarray:
    """Per cell, the code (index into COMPARTMENTS) of its DAB's compartment.

    ``membranous``: the cell's membrane is stained (its category is not "none"). Otherwise a
    nucleus whose DAB exceeds its cytoplasm by ``nuclear_od`` is nuclear staining; a stained
    cytoplasm (stained_cytoplasm) is cytoplasmic staining. Brown nuclei are never read as membrane (see membrane.measure_cells).
    """
    cyto = np.nan_to_num(m.cytoplasm_dab_od, nan=0.0)
    nuclear = (m.nucleus_area_um2 > 0) & (m.nucleus_dab_od - np.maximum(cyto, unstained_od) >= nuclear_od)
    code = np.zeros(len(m), np.int8)
    code[stained_cytoplasm(m, unstained_od=unstained_od)] = 2
    code[nuclear] = 3
    code[membranous] = 1
    return code
