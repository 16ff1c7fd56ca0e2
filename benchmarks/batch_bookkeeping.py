"""What a batch's bookkeeping costs as it grows: one whole rewrite of manifest.json and summary.csv.

    python benchmarks/batch_bookkeeping.py                 # 100 to 30,000 slides
    python benchmarks/batch_bookkeeping.py --sizes 1000 10000 --rate 5

A sample field is scored once for a real summary row; the manifest is then filled with copies of it
under other slide names, and her2score.batch's own writer rewrites both files (median of 3). For a
batch finishing ``--rate`` slides a second (fields of view on 2 workers: about 5), it prints the share
of the batch process's time a rewrite after every slide would take, and the slides between rewrites
under SAVE_ALWAYS_UNDER_S and SAVE_COST_SHARE (which bound that share).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

from her2score import batch

SAMPLE = Path(__file__).resolve().parent.parent / "sample_images" / "field_2plus_a.png"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000, 30000], help="slides in the batch")
    p.add_argument("--rate", type=float, default=5.0, help="slides finished per second")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        batch.run_batch([str(SAMPLE)], out)  # one real slide: its manifest entry and summary row
        manifest = batch._Manifest(out)
        (entry,) = manifest.entries.values()
        print(f"one rewrite of manifest.json and summary.csv (median of 3); slides finishing {args.rate:g}/s")
        print(f"{'slides':>7} {'rewrite ms':>10} {'manifest MB':>11} {'after every slide':>18} "
              f"{'slides between rewrites':>24}")
        for n in args.sizes:
            manifest.entries = {}
            for i in range(n):
                e = copy.deepcopy(entry)
                e["row"]["slide"] = name = f"/data/slides/field_{i:06d}.png"
                manifest.entries[name] = e
            costs = []
            for _ in range(3):
                t = time.perf_counter()
                batch._write_progress(out, manifest)
                costs.append(time.perf_counter() - t)
            cost = statistics.median(costs)
            every = cost * args.rate  # seconds of rewriting per second of batch
            between = 1 if cost < batch.SAVE_ALWAYS_UNDER_S else max(1, round(cost / batch.SAVE_COST_SHARE * args.rate))
            print(f"{n:7d} {cost * 1e3:10.1f} {(out / batch.MANIFEST).stat().st_size / 1e6:11.1f} "
                  f"{every:17.0%} {between:24d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
