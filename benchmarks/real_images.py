"""Score every real image (../shared/data/real and scikit-image's colon IHC) and write one table and the overlays.

    python benchmarks/real_images.py --out real_out

Prints, per image: its kind (what its SOURCE.md says it shows), the score or the refusal with its
reason, tumour cells, per-category percentages, the slide's DAB noise floor, its counterstain level
and the nucleus threshold that follows from it, and the staining compartment found; then nuclei
detection and the tumour-cell selection against the DeepLIIF masks.
Writes real_out/table.md and real_out/<image>.png overlays (field resolution).
None of these images carries a HER2 label: the table is checked against what each image shows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from her2score.categories import CATEGORIES  # noqa: E402
from her2score.outputs import overlay_png  # noqa: E402
from her2score.pipeline import analyse_slide  # noqa: E402
from her2score.slide import SlideError  # noqa: E402
from realdata import REAL, deepliif_detection, deepliif_tumour_selection, real_cases  # noqa: E402

SHORT = {"none": "none", "faint_partial": "faint", "weak_moderate_complete": "wm-c", "strong_complete": "s-c",
         "weak_moderate_lateral": "wm-l", "strong_lateral": "s-l", "strong_partial": "s-p",
         "weak_moderate_partial": "wm-p"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="real_out", help="folder for table.md and overlays (default: real_out)")
    ap.add_argument("--only", default="", help="score only images whose name contains this text")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = (["image", "kind", "score", "tumour/all cells"] + [SHORT.get(c, c) for c in CATEGORIES]
            + ["floor OD", "counterstain OD", "nucleus OD", "compartment", "refused: reason"])
    rows = []
    for case in real_cases():
        if args.only not in case.name:
            continue
        try:
            a = analyse_slide(case.slide(), mpp=case.mpp)
        except SlideError as e:
            rows.append([case.name, case.kind, "refused", ""] + [""] * len(CATEGORIES) + ["", "", "", "", str(e).split(": ", 1)[-1]])
            print(" | ".join(rows[-1]), flush=True)
            continue
        r = a.result
        pct = [f"{r.percentages.get(c, 0.0):.1f}" for c in CATEGORIES]
        rows.append([case.name, case.kind, f"{r.score} ({r.level})", f"{r.tumour_cells}/{len(a.cells['x'])}", *pct,
                     *(f"{r.staining[k]}" for k in ("dab_floor_od", "counterstain_od", "nucleus_threshold_od", "compartment")), ""])
        print(" | ".join(rows[-1]), flush=True)
        (out / f"{case.name}.png").write_bytes(overlay_png(a))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    if REAL.is_dir() and not args.only:
        tp, det, gt = deepliif_detection()
        p, r = tp / det, tp / gt
        lines.append(f"\nNuclei against the DeepLIIF Ki67 masks (4 fields, 0.3 µm/px, one-to-one within 4 µm): "
                     f"{tp} matched of {gt} annotated and {det} detected; recall {r:.3f}, precision {p:.3f}, F1 {2 * p * r / (p + r):.3f} "
                     "(the masks outline tumour nuclei only: stromal nuclei found count against precision)")
        print(lines[-1].strip())
        sel = deepliif_tumour_selection()
        flagged, right, annotated = (sum(v[i] for v in sel.values()) for i in range(3))
        lines.append(f"\nTumour cells without an annotation, against the same masks (cells on an annotated nucleus are tumour; "
                     f"nuclear refusal off): precision {right / flagged:.3f}, recall {right / annotated:.3f} "
                     f"({right} of {flagged} flagged cells, of {annotated} on an annotated nucleus); per field "
                     + ", ".join(f"{k} {r / max(f, 1):.2f} / {r / max(a, 1):.2f}" for k, (f, r, a) in sel.items()))
        print(lines[-1].strip())
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"table: {out / 'table.md'}")


if __name__ == "__main__":
    main()
