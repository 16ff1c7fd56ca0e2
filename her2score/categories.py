"""Per-cell HER2 membrane category from measurements and thresholds (log10 DAB OD, fractions)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

CATEGORIES: tuple[str, ...] = (
    "none",
    "faint_partial",
    "weak_moderate_complete",
    "strong_complete",
    "weak_moderate_lateral",
    "strong_lateral",
    "strong_partial",
    "weak_moderate_partial",
)
"""The eight per-cell categories, in the order used for codes in cell tables (new ones are appended).

Intensity and pattern stay separate: ``faint_partial`` is stained membrane that is faint (under
weak_od), whatever its pattern; ``weak_moderate_partial`` and ``strong_partial`` are weak-to-moderate
and intense membranes that are incomplete and not lateral. The guidelines score a weak-to-moderate
incomplete cell as 1+, as a faint one (see guidelines.py), but its H-score weight is its intensity, 2;
intense incomplete staining makes ASCO/CAP 2018's unusual equivocal 2+ pattern.
"""

PATTERNS: tuple[str, ...] = ("none", "partial", "lateral", "complete")

__all__ = ["CATEGORIES", "PATTERNS", "Thresholds", "classify_cells", "settings_from_dict"]


@dataclass(frozen=True)
class Thresholds:
    """Per-cell thresholds. Intensities are measured membrane DAB log10 OD: the peak across the
    membrane after 0.6 µm smoothing (see membrane.membrane_contrast); completeness is a fraction of
    the cell's boundary sectors.

    The deposit bands of DESIGN.md (QuPath's 0.2 / 0.4 / 0.6 = weak / moderate / strong) describe
    the stain deposit (HER2's categories join weak and moderate, so only the weak and strong bounds
    decide); a ~1 µm membrane imaged at 0.5 µm/px reads lower (optical blur and partial
    volume), so the defaults are those bands calibrated on synthetic fields of known deposit OD
    (tuning seeds 1000-4999, held apart from the accuracy seeds; benchmarks/threshold_calibration.py prints
    the cells each threshold puts at the wrong level: fewest at 0.46 for strong_od, which was 0.55
    while the generator drew a shared border as two deposits that added, and at 0.10-0.11 for weak_od,
    within 0.4% of the cells of 0.14's, kept). There ``complete_completeness`` puts fewest cells at the
    wrong pattern at 0.67-0.68 (1,709 of 23,666; 1,724 at 0.65, 1,776 at 0.60), but on membranes painted on real
    tissue (benchmarks/painted_real.py) 0.65 read 27 fewer of about 11,000 cells at their true category
    (weak-moderate complete 541 against 552, strong complete 641 against 657): real tissue's rings read
    less complete than the generator's, and real wins, so it stays 0.60. So does ``lateral_gap`` (the longest
    unstained arc a complete ring may have) at 0.30: 0.21-0.25 put fewest generator cells at the wrong pattern
    (1,531 of 23,637 against 1,729), but on painted real tissue 0.25 read 28 fewer complete and lateral cells at
    their category (strong lateral 65 against 49 of the 134 read as tumour cells, strong complete 653 against 684 of
    782), and gastric fields of intense lateral cells there were called right less often (0.5.4); at 0.30, 48 of those
    134 intense lateral cells read complete, which in <=10% of tumour cells make a breast 2+ (README, Limits). ``faint_od`` is the least
    membrane contrast (DAB above the cell's own cytoplasm) that counts as staining; a slide whose
    own noise floor is higher uses its floor instead (membrane.noise_floor). In a cell with
    cytoplasmic DAB a membrane must also stand ``cytoplasm_ratio`` x that blush above it, and a
    stained arc must span at least ``min_arc_sectors`` of the 24 border sectors (45°): see
    membrane.summarise_membranes. The faint floor, the blush ratio and the arc were set on real
    fields (Ki67 brown nuclei and derived HER2 0 must not read as membrane, the colon IHC membranes
    must) and on synthetic fields with background tint and cytoplasmic blush.
    """

    faint_od: float = 0.02
    weak_od: float = 0.14
    strong_od: float = 0.46
    min_completeness: float = 0.25
    complete_completeness: float = 0.60
    lateral_arc: float = 0.45
    lateral_gap: float = 0.30
    cytoplasm_ratio: float = 0.35
    min_arc_sectors: int = 3

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():  # NaN passes every comparison below as False: refused here
            try:
                finite = math.isfinite(value)
            except (TypeError, OverflowError):  # not a number, or an int too large for a float
                finite = False
            if not finite:
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 < self.faint_od < self.weak_od < self.strong_od:
            raise ValueError(f"DAB OD thresholds must be positive and increase (0 < faint_od < weak_od < strong_od): {self}")
        if not 0 <= self.min_completeness < self.lateral_arc < self.complete_completeness <= 1:
            raise ValueError(f"completeness thresholds must satisfy 0 <= min < lateral < complete <= 1: {self}")
        if not 0 < self.lateral_gap < 1:
            raise ValueError(f"lateral_gap must be a fraction between 0 and 1: {self}")
        if self.cytoplasm_ratio < 0 or not 1 <= self.min_arc_sectors <= 24:
            raise ValueError(f"cytoplasm_ratio must be >= 0 and min_arc_sectors within 1-24: {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "Thresholds":
        """The defaults with the fields ``d`` (a JSON object's dict) gives; ValueError naming an unknown field
        (and the known ones) or a value that is no number."""
        return settings_from_dict(cls, d, "threshold", whole_numbers=("min_arc_sectors",))


def settings_from_dict(cls, d, what: str, *, whole_numbers: tuple[str, ...] = ()):
    """The frozen dataclass ``cls`` of numeric settings at its defaults with the fields ``d`` (a JSON object's
    dict) gives; ValueError naming an unknown field (and the known ones) or a value that is no number (no whole
    number for the fields ``whole_numbers``). ``what``: a setting's name in words."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object of {what}s, got {type(d).__name__}")
    known = [f.name for f in fields(cls)]
    if unknown := sorted(set(d) - set(known)):
        raise ValueError(f"unknown {what} {unknown[0]!r}; the {what}s are {', '.join(known)}")
    for k, v in d.items():
        wanted = int if k in whole_numbers else (int, float)
        if isinstance(v, bool) or not isinstance(v, wanted):
            raise ValueError(f"{k} must be {'a whole number' if wanted is int else 'a number'}, got {v!r}")
    return replace(cls(), **d)


def classify_cells(
    completeness: np.ndarray,
    longest_arc: np.ndarray,
    longest_gap: np.ndarray,
    intensity_od: np.ndarray,
    thresholds: Thresholds = Thresholds(),
) -> tuple[np.ndarray, np.ndarray]:
    """Category and pattern codes (indices into CATEGORIES and PATTERNS) per cell.

    ``completeness``: fraction of the cell boundary stained (0-1); ``longest_arc`` / ``longest_gap``:
    the longest contiguous stained / unstained arc as a fraction of the boundary; ``intensity_od``:
    mean membrane DAB OD. Complete = stained nearly all round with no long gap; lateral ("U") = one
    long stained arc with one long gap (the apical side); any other stained cell is partial. A cell
    under ``weak_od`` is ``faint_partial`` whatever its pattern; a partial one is ``weak_moderate_partial``
    from ``weak_od`` and ``strong_partial`` from ``strong_od``.
    """
    t = thresholds
    completeness = np.asarray(completeness, dtype=np.float32)
    longest_arc = np.asarray(longest_arc, dtype=np.float32)
    longest_gap = np.asarray(longest_gap, dtype=np.float32)
    intensity_od = np.asarray(intensity_od, dtype=np.float32)
    if not completeness.ndim == 1 or not len(completeness) == len(longest_arc) == len(longest_gap) == len(intensity_od):
        raise ValueError("classify_cells: the four per-cell arrays must be 1-D and of one length, got "
                         f"{[np.shape(a) for a in (completeness, longest_arc, longest_gap, intensity_od)]}")
    for name, a in (("completeness", completeness), ("longest_arc", longest_arc), ("longest_gap", longest_gap),
                    ("intensity_od", intensity_od)):
        if not np.isfinite(a).all():  # NaN would read as an unstained cell, counted in the denominator
            raise ValueError(f"classify_cells: {name} has {int((~np.isfinite(a)).sum())} values that are not finite")
    stained = (completeness >= t.min_completeness) & (intensity_od >= t.faint_od)
    complete = stained & (completeness >= t.complete_completeness) & (longest_gap < t.lateral_gap)
    lateral = stained & ~complete & (longest_arc >= t.lateral_arc)
    pattern = np.where(complete, 3, np.where(lateral, 2, np.where(stained, 1, 0))).astype(np.int8)

    weak = intensity_od >= t.weak_od
    strong = intensity_od >= t.strong_od
    cat = np.zeros(len(completeness), dtype=np.int8)
    partial = stained & ~complete & ~lateral
    cat[stained] = 1  # faint, any pattern
    cat[complete & weak] = 2
    cat[complete & strong] = 3
    cat[lateral & weak] = 4
    cat[lateral & strong] = 5
    cat[partial & weak] = 7  # weak-to-moderate but incomplete, not U-shaped
    cat[partial & strong] = 6  # intense but incomplete, not U-shaped
    return cat, pattern
