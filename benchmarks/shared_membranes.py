"""Shared against lone borders: does a border whose neighbour has its own membrane read darker, on real tissue
and on the generator's fields?

    python benchmarks/shared_membranes.py

Two cells' membranes along one border could hold two deposits on one line, and read darker than a
membrane facing stroma or an unstained cell. For each tumour cell with at least 3 stained border
sectors of each kind, the ratio of the mean line OD over its shared sectors (the cell across reads
complete or lateral: its own membrane encloses it) to that over its lone ones; the median and
quartiles per image. Real: scikit-image's colon IHC at 0.5 µm/px, at its own DAB and with half of it
(tests/realdata.py's "weaker" case). Generator: its 2+ and 3+ fields (seeds 9000-9002, 10000-10002).
The figures decide whether a cell's intensity may be read with its shared borders discounted: on
real tissue they are not darker, so the line's own OD is read (README, Limits). The recording wraps
pipeline.summarise_membranes and pipeline.stained_by_neighbours, where the reading passes, while it reads.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

import her2score.pipeline as pipeline
from her2score.slide import ArraySlide
from her2score.stain import scale_stains
from her2score.synthetic import generate_field


@contextmanager
def _recording() -> Iterator[dict]:
    """While open, each slide analysed leaves its cells' sector line OD, stained sectors and shared sectors (the
    cell across encloses itself by its own membrane) in the dict yielded."""
    seen: dict = {}
    summarise, by_neighbours = pipeline.summarise_membranes, pipeline.stained_by_neighbours

    def summarise_recorded(cells, **kwargs):
        mem = summarise(cells, **kwargs)
        seen.update(od=np.nan_to_num(cells.sector_od.astype(np.float32)), stained=mem.stained)
        return mem

    def by_neighbours_recorded(stained, beside, **kwargs):
        seen["beside"] = beside
        return by_neighbours(stained, beside, **kwargs)

    pipeline.summarise_membranes, pipeline.stained_by_neighbours = summarise_recorded, by_neighbours_recorded
    try:
        yield seen
    finally:
        pipeline.summarise_membranes, pipeline.stained_by_neighbours = summarise, by_neighbours


def shared_over_lone(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Per tumour cell with >= 3 shared and >= 3 lone stained sectors: mean line OD over its shared sectors
    divided by that over its lone ones."""
    with _recording() as seen:
        tumour = np.asarray(pipeline.analyse_slide(ArraySlide(rgb, mpp=mpp)).cells["tumour"], bool)
    od, stained, beside = seen["od"], seen["stained"], seen["beside"]
    shared, lone = stained & beside, stained & ~beside
    both = tumour & (shared.sum(1) >= 3) & (lone.sum(1) >= 3)
    od, shared, lone = od[both], shared[both], lone[both]
    return (od * shared).sum(1) / shared.sum(1) / ((od * lone).sum(1) / lone.sum(1))


def main() -> None:
    from skimage.data import immunohistochemistry

    colon = immunohistochemistry()
    images = [("real colon IHC", colon, 0.5), ("real colon IHC, half its DAB", scale_stains(colon, dab=0.5, residual=0.5), 0.5)]
    for score, seeds in (("2+", (9000, 9001, 9002)), ("3+", (10000, 10001, 10002))):
        for seed in seeds:
            f = generate_field(score, seed=seed)
            images.append((f"generator {score} seed {seed}", f.image, f.mpp))
    print(f"{'image':34s} {'cells':>6s} {'shared / lone line OD: median':>30s} {'quartiles':>12s}")
    for name, rgb, mpp in images:
        r = shared_over_lone(rgb, mpp)
        print(f"{name:34s} {len(r):6d} {np.median(r):30.2f} {np.percentile(r, 25):6.2f}-{np.percentile(r, 75):.2f}")


if __name__ == "__main__":
    main()
