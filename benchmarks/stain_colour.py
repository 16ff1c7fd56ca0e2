"""Real IHC whose colours are faded or turned: what the call, the intense share and the QC say.

    python benchmarks/stain_colour.py

A scan's colours vary with the stain's age, the scanner and its colour profile. For scikit-image's
real colon IHC and its copy with a quarter of its DAB (a real 2+; tests/realdata.py) this prints, for
the colours' saturation scaled (0.8-0.5 x: a faded stain or a desaturated scan) and their hue turned
(-15 to +25 degrees, in linear-light YIQ: a scanner's rendering), the level, the intense complete and
all-intense shares of tumour cells, and the QC warnings, with the default stain vectors and with the
slide's own (``--estimate-stains``); a refusal is printed as such.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from her2score.guidelines import INTENSITY  # noqa: E402
from her2score.pipeline import ScoringConfig, analyse_slide  # noqa: E402
from her2score.slide import ArraySlide, SlideError  # noqa: E402
from realdata import real_cases, recoloured  # noqa: E402

SATURATIONS = (0.8, 0.7, 0.65, 0.6, 0.5)
HUES = (-15, -10, -5, 5, 10, 15, 20, 25)


def _reading(rgb, mpp: float, estimate: bool) -> str:
    try:
        r = analyse_slide(ArraySlide(rgb, mpp=mpp), config=ScoringConfig(estimate_stains=estimate)).result
    except SlideError as e:
        return f"refused ({str(e).split(': ', 2)[1][:60]})"
    p = r.percentages
    intense = sum(p[c] for c, level in INTENSITY.items() if level == 3)
    warned = ",".join(q.code for q in r.qc if q.severity != "pass") or "-"
    return f"{r.level:14s} {p['strong_complete']:5.1f} {intense:5.1f} {warned}"


def main() -> None:
    cases = {c.name: c for c in real_cases()}
    print("image / change                    default vectors: level, intense complete %, intense %, QC    |  own vectors")
    for name in ("skimage-colon-ihc", "skimage-colon-ihc-dab-0.25"):
        case = cases[name]
        rgb = case.load()
        changes = [("as stored", rgb)] + [(f"saturation x{s:g}", recoloured(rgb, s, 0.0)) for s in SATURATIONS] + [
            (f"hue {h:+d} deg", recoloured(rgb, 1.0, h)) for h in HUES]
        for label, img in changes:
            print(f"{name[-12:]:12s} {label:18s} {_reading(img, case.mpp, False):52s} | {_reading(img, case.mpp, True)}",
                  flush=True)


if __name__ == "__main__":
    main()
