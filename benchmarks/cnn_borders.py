"""The CNN on real HER2 0 fields and on synthetic fields with and without real slides' unstained borders.

    python benchmarks/cnn_borders.py [WEIGHTS ...]

For the shipped weights and each WEIGHTS file given (e.g. one trained with
``her2score train --synthetic 150 --seed 1 --border-od-max 0.03``) this prints the CNN's call and
p(0) on every real field with its DAB removed (tests/realdata.py: real morphology, a real HER2 0),
and its accuracy on synthetic fields (6 per class, seeds 7300-7305) drawn with the generator's clean
borders and with synthetic.REAL_BORDERS, the unstained-border texture measured on real slides.
A model that gains on the textured synthetic fields but loses on the real ones is no gain: real wins.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402

from her2score.cnn import load_onnx_model  # noqa: E402
from her2score.pipeline import analyse_slide  # noqa: E402
from her2score.results import SCORES  # noqa: E402
from her2score.slide import ArraySlide  # noqa: E402
from her2score.synthetic import REAL_BORDERS, Confounders, generate_field  # noqa: E402
from realdata import real_cases  # noqa: E402

SEEDS = range(7300, 7306)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="*", help="weights files to compare with the shipped ones")
    a = ap.parse_args()
    real = [c for c in real_cases() if c.kind == "derived-0"]
    fields = {(border, score, seed): generate_field(score, seed=seed, confounders=REAL_BORDERS if border else Confounders())
              for border in (False, True) for score in SCORES for seed in SEEDS}
    print(f"{len(real)} real fields with their DAB removed; {len(fields)} synthetic fields (seeds {SEEDS.start}-{SEEDS.stop - 1})")
    for name in ["shipped", *a.weights]:
        model = load_onnx_model(None if name == "shipped" else name)
        calls, p0 = [], []
        for case in real:
            r = analyse_slide(case.slide(), mpp=case.mpp, cnn=model).result
            calls.append(r.cnn_score)
            p0.append(r.cnn.probabilities["0"])
        right = {False: [], True: []}
        for (border, score, _), f in fields.items():
            right[border].append(analyse_slide(ArraySlide(f.image, mpp=f.mpp), cnn=model).result.cnn_score == score)
        print(f"{name}\n  real HER2 0 (DAB removed): CNN 0 on {calls.count('0')}/{len(real)}, p(0) mean {np.mean(p0):.2f} "
              f"(range {min(p0):.2f}-{max(p0):.2f})\n  synthetic accuracy: clean borders {np.mean(right[False]):.3f}, "
              f"real borders {np.mean(right[True]):.3f}", flush=True)


if __name__ == "__main__":
    main()
