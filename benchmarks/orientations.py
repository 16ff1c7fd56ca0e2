"""A real field turned or mirrored: how far its cells, shares and level move.

    python benchmarks/orientations.py

A slide has no up: a pathologist's call does not change with the way the glass lies on the stage.
For scikit-image's real colon IHC (0.5 µm/px) this prints, for a left-right mirror, an upside-down
mirror, a half turn and a transpose, the share of its tumour cells (matched to their twin within
4 px, both tumour) that keep their category; then, for the colon and its copies with the DAB scaled
down (0.5, 0.25, 0.12 x, and none: tests/realdata.py), over the eight ways of turning and mirroring a
square, the levels called, the H-score's range and the largest range of any category's share (points).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from her2score.categories import CATEGORIES  # noqa: E402
from her2score.neighbours import nearest_within  # noqa: E402
from her2score.pipeline import analyse_slide  # noqa: E402
from her2score.slide import ArraySlide  # noqa: E402
from realdata import real_cases  # noqa: E402

COPIES = ("skimage-colon-ihc", "skimage-colon-ihc-dab-0.5", "skimage-colon-ihc-dab-0.25", "skimage-colon-ihc-dab-0.12",
          "skimage-colon-ihc-dab-removed")


def _analyse(rgb: np.ndarray, mpp: float):
    return analyse_slide(ArraySlide(np.ascontiguousarray(rgb), mpp=mpp))


def cells_kept(rgb: np.ndarray, mpp: float) -> dict[str, tuple[float, int]]:
    """Per transform: (share of matched tumour cells keeping their category, matched tumour cells)."""
    h, w = rgb.shape[:2]
    transforms = {"mirrored left-right": (lambda a: a[:, ::-1], lambda x, y: (w - 1 - x, y)),
                  "upside down": (lambda a: a[::-1], lambda x, y: (x, h - 1 - y)),
                  "turned half round": (lambda a: a[::-1, ::-1], lambda x, y: (w - 1 - x, h - 1 - y)),
                  "transposed": (lambda a: a.transpose(1, 0, 2), lambda x, y: (y, x))}
    upright = _analyse(rgb, mpp).cells
    out = {}
    for name, (turn, back) in transforms.items():
        other = _analyse(turn(rgb), mpp).cells
        x, y = back(np.asarray(other["x"]), np.asarray(other["y"]))
        twin = nearest_within(np.c_[x, y], np.c_[upright["x"], upright["y"]], 4.0)
        both = (twin >= 0) & np.asarray(upright["tumour"]) & np.asarray(other["tumour"])[twin]
        kept = np.asarray(upright["category"])[both] == np.asarray(other["category"])[twin][both]
        out[name] = (float(kept.mean()), int(both.sum()))
    return out


def eight_ways(rgb: np.ndarray, mpp: float) -> tuple[list[str], tuple[float, float], float]:
    """(levels called, (lowest, highest) H-score, largest range of a category's share in points)."""
    results = [_analyse(np.rot90(rgb, k)[:, ::-1] if flip else np.rot90(rgb, k), mpp).result
               for k in range(4) for flip in (False, True)]
    shares = np.array([[r.percentages[c] for c in CATEGORIES] for r in results])
    hs = [r.h_score for r in results]
    return sorted({r.level for r in results}), (min(hs), max(hs)), float((shares.max(0) - shares.min(0)).max())


def main() -> None:
    cases = {c.name: c for c in real_cases()}
    colon = cases["skimage-colon-ihc"]
    print("the real colon's tumour cells keeping their category (matched within 4 px):")
    for name, (kept, n) in cells_kept(colon.load(), colon.mpp).items():
        print(f"  {name:20s} {kept:6.1%} of {n}")
    print("over the eight orientations:")
    for name in COPIES:
        levels, (lo, hi), spread = eight_ways(cases[name].load(), cases[name].mpp)
        print(f"  {name:32s} levels {', '.join(levels)}; H-score {lo:.0f}-{hi:.0f}; shares within {spread:.1f} points")


if __name__ == "__main__":
    main()
