"""The focus measure across scan resolutions, sharp and blurred, on real and generator fields.

    python benchmarks/focus_scales.py

For each field (scikit-image's real colon IHC, the real DeepLIIF and OpenSlide Ki67 fields, a real H&E field and three
generator fields), brought to 0.5, 0.6, 0.75 and 1 µm/px after a Gaussian blur of 0-1.5 µm, it prints
``pipeline.sharpness`` read at the scan's own µm/px, as the pipeline reads a scan coarser than its tiles. The QC
fails a tile under ``ScoringConfig.blur_min`` (0.3): a sharp field should read above it at every resolution, and a blur
of about one and a half of the scan's own pixels or more below it. Needs ``../shared/data/real`` beside the
repository for the real fields (those missing are skipped).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage.data import immunohistochemistry

from her2score.pipeline import sharpness
from her2score.stain import H_DAB, deconvolve
from her2score.synthetic import generate_field

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
SCANS = (0.5, 0.6, 0.75, 1.0)
BLURS_UM = (0.0, 0.5, 0.75, 1.0, 1.5)


def fields() -> dict[str, tuple[np.ndarray, float]]:
    """Each field's RGB and its µm/px (the real ones' as their SOURCE.md estimates it)."""
    out = {"colon": (immunohistochemistry(), 0.5)}
    for p in sorted((REAL / "nuclear-ihc" / "deepliif-ki67" / "images").glob("*.png")):
        out[f"ki67 {p.stem}"] = (np.asarray(Image.open(p).convert("RGB")), 0.3)
    for p in sorted((REAL / "nuclear-ihc" / "openslide-os2-ki67").glob("*.png")):
        out[f"ki67 {p.stem}"] = (np.asarray(Image.open(p).convert("RGB")), 0.2271)
    histo = REAL / "he" / "stardist-tcia" / "histo.png"
    if histo.is_file():
        out["H&E stardist"] = (np.asarray(Image.open(histo).convert("RGB")), 0.5)
    for score, seed in (("3+", 11), ("1+", 12), ("0", 13)):
        out[f"generator {score}"] = (generate_field(score, seed=seed, size_px=(1024, 1024)).image, 0.5)
    return out


def main() -> None:
    print(f"{'field':18} {'µm/px':>5}  " + "  ".join(f"blur {b:.2f}" for b in BLURS_UM))
    for name, (rgb, mpp) in fields().items():
        for scan in SCANS:
            row = []
            for blur in BLURS_UM:
                b = cv2.GaussianBlur(rgb, (0, 0), blur / mpp) if blur else rgb
                c = cv2.resize(b, None, fx=mpp / scan, fy=mpp / scan, interpolation=cv2.INTER_AREA)
                hed = deconvolve(c, H_DAB)
                row.append(sharpness(hed[..., 0] + hed[..., 1], mpp=scan, scan_mpp=scan))
            print(f"{name[:18]:18} {scan:5.2f}  " + "  ".join(f"{v:9.3f}" for v in row))


if __name__ == "__main__":
    main()
