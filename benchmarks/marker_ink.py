"""Marker ink drawn over real fields: what the call, the QC and three rules say.

    python benchmarks/marker_ink.py

Pathologists circle and tick slides with marker pens, and the ink is scanned with the tissue. Over
scikit-image's real colon IHC with its DAB removed (a real HER2 0; tests/realdata.py) and its copy at an eighth
of its DAB (a real 1+), this draws straight strokes of marker colours (red, dark red, pale red, magenta,
green, blue, black), 2-16 px wide (1-8 µm at 0.5 µm/px) on four courses, as ink absorbs light on top of the
stain (the field's RGB times the ink's colour, anti-aliased), and prints per ink and field how many strokes
leave the level as it was, change it with QC passed, fail QC or are refused (and why), the doubt flags of those
that change it and the answers of her2-ultralow-breast, her2-low-breast and her2-positive-breast to them (none
should be a confident eligible the field without ink would not get).
"""
from __future__ import annotations

import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
import skimage.data

from her2score import check_eligibility, score_slide
from her2score.slide import SlideError
from her2score.stain import scale_stains

INKS = {"red": (200, 60, 60), "dark red": (170, 40, 60), "pale red": (220, 90, 90), "magenta": (200, 40, 160),
        "green": (60, 150, 60), "blue": (50, 60, 170), "black": (40, 40, 40)}
WIDTHS_PX = (2, 4, 8, 16)
COURSES = (((0, 100), (511, 253)), ((0, 150), (511, 300)), ((0, 60), (511, 200)), ((100, 0), (300, 511)))
RULES = ("her2-ultralow-breast", "her2-low-breast", "her2-positive-breast")


def _field(name: str) -> np.ndarray:
    colon = skimage.data.immunohistochemistry()
    return scale_stains(colon, dab=0.0, residual=0.0) if name == "HER2 0" else scale_stains(colon, dab=0.12, residual=0.12)


def _inked(rgb: np.ndarray, ink: tuple[int, int, int], width: int, course) -> np.ndarray:
    mask = np.zeros(rgb.shape[:2], np.uint8)
    cv2.polylines(mask, [np.array(course, np.int32)], False, 255, width, cv2.LINE_AA)
    cover = mask[..., None] / 255.0
    return np.clip(rgb * (1 - cover) + rgb * np.float32(ink) / 255 * cover + 0.5, 0, 255).astype(np.uint8)


REFUSALS = {"another chromogen": "another chromogen", "colour of eosin": "eosin (H&E)", "DAB is nuclear": "nuclear DAB"}
"""Words of a refusal and what the table calls it."""


def _one(job) -> tuple[str, str, str, tuple, tuple]:
    """(field, ink, level read, or 'qc failed', or 'refused: why'; the rules' answers; the doubt flags)."""
    field, ink, width, course = job
    try:
        r = score_slide(_inked(_field(field), INKS[ink], width, course), mpp=0.5)
    except SlideError as e:
        why = next((name for words, name in REFUSALS.items() if words in str(e)), type(e).__name__)
        return field, ink, f"refused: {why}", (), ()
    doubts = tuple(f for f in r.flags if f in ("near_cutoff", "null_or_ultralow", "isolated_intense_cells", "cytoplasmic_dab"))
    return (field, ink, r.level if r.qc_passed else "qc failed", tuple(check_eligibility(r, rule).status for rule in RULES),
            doubts)


def answers_given(level: str) -> bool:
    """Whether a stroke's reading is a call the rules answered (not a refusal, not a QC failure)."""
    return not level.startswith("refused") and level != "qc failed"


def main() -> None:
    plain = {f: score_slide(_field(f), mpp=0.5) for f in ("HER2 0", "1+")}
    for f, r in plain.items():
        print(f"{f} field without ink: {r.level}, QC {'passed' if r.qc_passed else 'failed'}; "
              + ", ".join(f"{rule} {check_eligibility(r, rule).status}" for rule in RULES))
    jobs = [(f, ink, w, c) for f in plain for ink in INKS for w in WIDTHS_PX for c in COURSES]
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(_one, jobs))
    print(f"\n{len(jobs)} strokes: per field and ink, the level read (or QC failed / refused) over "
          f"{len(WIDTHS_PX) * len(COURSES)} strokes, and the rules' answers ({', '.join(RULES)}) where the level changed")
    for f in plain:
        for ink in INKS:
            rows = [(level, answers, doubts) for ff, ii, level, answers, doubts in results if (ff, ii) == (f, ink)]
            levels = Counter(level for level, _, _ in rows)
            changed = [(a, d) for level, a, d in rows if level != plain[f].level and answers_given(level)]
            answers = "; ".join(f"{n} x {'/'.join(a)}" for a, n in Counter(a for a, _ in changed).most_common()) or "-"
            undoubted = sum(not d for _, d in changed)
            print(f"  {f:7s} {ink:9s} " + ", ".join(f"{n} {lv}" for lv, n in levels.most_common())
                  + f"  | changed: {answers}" + (f"; {undoubted} with no doubt flag" if changed else ""))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
