"""Whole-slide benchmark: speed against the JPEG decode limit and a scikit-image peer, peak memory, start-up.

    python benchmarks/bench_wsi.py                          # 12,288 x 12,288 and 40,960 x 30,720, 3 runs each
    python benchmarks/bench_wsi.py --quick                  # 12,288 x 12,288, one run (while developing)
    python benchmarks/bench_wsi.py --size 20480x15360 --runs 1
    python benchmarks/bench_wsi.py --profile                # cProfile of one process on a small slide

Every scoring run uses the CLI's defaults (``her2score score SLIDE --out OUT -q``); ``--workers N``
passes a worker count instead. What it does, for each ``--size`` (level-0 px, WIDTHxHEIGHT):

(a) **Slide.** Writes (once; cached under ``--workdir``, default /tmp/her2bench) a pyramidal
    JPEG-compressed tiled TIFF at 0.25 µm/px: tissue (a few large irregular blobs over ~50% of the
    slide) made of a pool of synthetic IHC fields (``her2score.synthetic.generate_field``, 1024 px,
    HER2 0/1+/2+/3+ by ``--score``), each pasted in one of 8 rotations/flips, on noisy glass.
    Level 0 and every 2x reduction down to < 1024 px are written tile by tile from an iterator
    (no level is ever held whole in memory), each reduced level a separate IFD marked
    reduced-resolution (subfiletype 1) with resolution in px/cm, as ``write_pyramidal_tiff`` does,
    so tifffile and OpenSlide both read it. The same tile generator renders every level (fields
    downsampled with INTER_AREA, tissue contour from one signed-distance map), so levels agree.
    A sidecar ``.json`` records the tissue fraction and the level-0 tiles lying fully in tissue.

(b) **Decode limit.** Raw JPEG decode rate of level-0 tissue tiles on one core: the tiles' bytes
    are read first (``os.pread`` at tifffile's dataoffsets/databytecounts), then decoded in one
    thread with ``imagecodecs.jpeg8_decode`` (with the page's JPEGTables), checked equal to
    tifffile's own decode. MP per CPU-second of the best of several passes taken before and
    between the scoring runs (on a shared machine the slower passes measure the neighbours).
    Level 1 (the level the pipeline reads at the default 0.5 µm/px) is timed the same way, for
    information.

(c) **End to end.** ``her2score score SLIDE --out OUT -q`` in a fresh subprocess (fresh OUT each
    run), the CLI's default settings and worker count. Wall seconds; CPU seconds of the whole process tree (from
    wait4); peak memory of the whole process tree sampled from /proc every 0.2 s, as the sum of PSS
    (proportional set size: pages shared between the forked workers counted once - the memory the
    run really needs) and the sum of RSS (pages shared by fork counted in every process - an upper
    bound); and the largest single process (ru_maxrss).

(d) **Start-up.** Wall time of ``her2score --version`` (median of 3), and the time to the first
    tile: a fresh interpreter imports the CLI and the pipeline, loads the CNN as a batch worker does,
    opens the slide, finds the tissue and scores its first tile (``analyse_slide`` in one process,
    stopped there); seconds from the spawn to each stage, median over the runs.

(e) **Peer.** A plain scikit-image cell pipeline (:func:`peer_cells`: ``rgb2hed``, Otsu nuclei,
    distance-transform watershed, cells grown by ``expand_labels``, Sato ridge filter on DAB,
    ``regionprops``), what a data scientist writes in an afternoon, run on one core on a spread
    sample of the pipeline's own tiles (same read boxes at 0.5 µm/px), read once beforehand;
    her2score's ``score_tile`` (with the CNN on those tiles, as the CLI runs it) is timed on the
    same tiles in the same way.

Rates printed (all in level-0 pixels, i.e. area at the scan's 0.25 µm/px):

- tissue MP/s = level-0 area of the tiles the pipeline scores (its tile grid over tissue: tile
  cores, without the overlap margins) / wall seconds. This is the headline rate of DESIGN.md §6.
- ratio = tissue MP/s / one-core level-0 decode MP/s, both measured in this run (targets of issue
  10: >= 0.15 on tissue for the 40,960 x 30,720 slide; >= 0.10 on the whole slide for 12,288^2).
- slide MP/s = the whole level-0 area (glass included) / wall seconds, and its ratio to decode.
- peer ratio = tissue MP/s / the peer's one-core tissue MP per CPU-second (the same convention as
  the decode ratio: both denominators are one core); and, on the sampled tiles, her2score's
  one-core rate / the peer's one-core rate.

Note: at the default 0.5 µm/px the pipeline reads level 1 of this 2x pyramid (4x fewer pixels
than level 0); a scanner pyramid with 4x steps (``--level-step 4``, Aperio-like) makes it read and
resize level 0.

``--cnn`` prints the CNN's patches per CPU-second on one thread, torch eager against ONNX Runtime,
at batch sizes 16 (one tile's sample), 64 and 256.

``--profile`` writes a small slide of the same kind (``--profile-size``, default 8192 px square),
runs ``analyse_slide`` (with the shipped CNN loaded as the CLI's workers load it; ``--no-cnn`` without)
+ ``write_outputs`` in this one process under cProfile and prints the top 15
entries by cumulative and by own time, then the direct callees of ``score_tile`` and of
``analyse_slide`` (ms per megapixel of tile reads at the target µm/px, share of the parent), and
the cost of the pipeline's own region reads against reads aligned to the JPEG tiles.

To benchmark another copy of the package (e.g. a patched one), put it first on PYTHONPATH: the
CLI subprocesses inherit it, and the header line names the package that was imported.

Use only the 2 cores the CLI is given: run nothing else heavy meanwhile; the load average before
each run and the CPU utilisation of each run are printed so a disturbed run can be recognised.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

GENERATOR_VERSION = 2  # of the bench slides: 2 from her2score 0.4.6, whose fields draw a shared border as one line
FIELD_PX = 1024  # pool field side, level-0 px
MASK_SIZE = (640, 480)  # (width, height) of the tissue-shape map, whatever the slide size
GLASS_RGB = (246.0, 244.0, 248.0)
RAMP_PX = 3.0  # tissue edge ramp, in pixels of each level
PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------------
# (a) the synthetic slide


def _tissue_distance(seed: int, fraction: float = 0.5) -> np.ndarray:
    """Signed distance (mask px; > 0 inside) to the contour of a few irregular tissue blobs
    covering about ``fraction`` of a MASK_SIZE map, with a clear glass border."""
    rng = np.random.default_rng(seed)
    mw, mh = MASK_SIZE
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float32)
    f = np.zeros((mh, mw), np.float32)
    for _ in range(5):
        cx, cy = rng.uniform(0.18, 0.82) * mw, rng.uniform(0.2, 0.8) * mh
        sa, sb = rng.uniform(0.10, 0.22) * mw, rng.uniform(0.07, 0.16) * mw
        th = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        f += rng.uniform(0.7, 1.0) * np.exp(-0.5 * ((u / sa) ** 2 + (v / sb) ** 2))
    coarse = rng.standard_normal((mh // 40 + 3, mw // 40 + 3)).astype(np.float32)
    noise = cv2.resize(coarse, (mw + 80, mh + 80), interpolation=cv2.INTER_CUBIC)[40:40 + mh, 40:40 + mw]
    fine = cv2.GaussianBlur(rng.standard_normal((mh, mw)).astype(np.float32), (0, 0), 4)
    f += 0.22 * noise / (noise.std() + 1e-6) + 0.06 * fine / (fine.std() + 1e-6)
    border = min(mw, mh) * 0.04
    edge = np.minimum(np.minimum(xx, mw - 1 - xx), np.minimum(yy, mh - 1 - yy))
    f[edge < border] = f.min()
    binary = (f > np.quantile(f, 1 - fraction)).astype(np.uint8)
    binary = cv2.morphologyEx(binary, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= 200
    binary = keep[lab].astype(np.uint8)
    d_in = cv2.distanceTransform(binary, cv2.DIST_L2, 5)
    d_out = cv2.distanceTransform(1 - binary, cv2.DIST_L2, 5)
    return np.where(binary > 0, d_in - 0.5, 0.5 - d_out).astype(np.float32)


class SyntheticSlide:
    """Renders any tile of any level of the benchmark slide, deterministically, without holding a level."""

    def __init__(self, width: int, height: int, *, mpp: float, tile: int, scores: list[str], seed: int,
                 level_step: int = 2):
        from her2score.synthetic import generate_field

        self.width, self.height, self.mpp, self.tile = width, height, mpp, tile
        self.levels = []  # (width, height, downsample)
        ds = 1
        while True:
            w, h = max(1, width // ds), max(1, height // ds)
            self.levels.append((w, h, ds))
            if max(w, h) < 1024:
                break
            ds *= level_step
        self.distance = _tissue_distance(seed)
        rng = np.random.default_rng(seed + 1)
        pool = []
        for i, score in enumerate(scores):
            f = generate_field(score, seed=int(seed * 1000 + i), size_px=(FIELD_PX, FIELD_PX), mpp=mpp,
                               jpeg_quality=None)
            pool.append(f.image)
        self.pool = {}
        for _, _, ds in self.levels:
            side = FIELD_PX // ds
            self.pool[ds] = [a if ds == 1 else cv2.resize(a, (max(1, side), max(1, side)), interpolation=cv2.INTER_AREA)
                             for a in pool] if side >= 1 else None
        n_fr, n_fc = -(-height // FIELD_PX), -(-width // FIELD_PX)
        self.variant = rng.integers(0, len(pool) * 8, (n_fr, n_fc))
        self.glass = []
        for k in range(4):
            g = np.asarray(GLASS_RGB, np.float32) + cv2.GaussianBlur(
                rng.standard_normal((tile, tile, 3)).astype(np.float32), (0, 0), 0.7) * 1.6
            self.glass.append(np.clip(g + 0.5, 0, 255).astype(np.uint8))

    # level-k pixel box -> alpha (tissue weight, 0..1)
    def alpha(self, ds: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        lw = self.levels[[lv[2] for lv in self.levels].index(ds)][0]
        s = MASK_SIZE[0] / lw  # mask px per level px
        m = np.float32([[s, 0, (x0 + 0.5) * s - 0.5], [0, s, (y0 + 0.5) * s - 0.5]])
        d = cv2.warpAffine(self.distance, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=-1e3)
        return np.clip(0.5 + d / (s * RAMP_PX), 0.0, 1.0)

    def _field(self, ds: int, v: int) -> np.ndarray:
        i, d = divmod(int(v), 8)
        f = self.pool[ds][i]
        if d & 4:
            f = f.transpose(1, 0, 2)
        return np.rot90(f, d & 3)

    def _content(self, ds: int, x0: int, y0: int, t: int) -> np.ndarray:
        fp = FIELD_PX // ds
        out = np.empty((t, t, 3), np.uint8)
        nr, nc = self.variant.shape
        for fr in range(y0 // fp, (y0 + t - 1) // fp + 1):
            for fc in range(x0 // fp, (x0 + t - 1) // fp + 1):
                f = self._field(ds, self.variant[fr % nr, fc % nc])
                ys, ye = max(y0, fr * fp), min(y0 + t, (fr + 1) * fp)
                xs, xe = max(x0, fc * fp), min(x0 + t, (fc + 1) * fp)
                out[ys - y0:ye - y0, xs - x0:xe - x0] = f[ys - fr * fp:ye - fr * fp, xs - fc * fp:xe - fc * fp]
        return out

    def render_tile(self, ds: int, ty: int, tx: int) -> np.ndarray:
        t = self.tile
        a = self.alpha(ds, tx * t, ty * t, t, t)
        glass = self.glass[(ty * 7 + tx * 3) % len(self.glass)]
        if a.max() <= 0:
            return glass
        content = self._content(ds, tx * t, ty * t, t)
        if a.min() >= 1:
            return content
        g = glass.astype(np.float32)
        return (g + a[..., None] * (content.astype(np.float32) - g) + 0.5).astype(np.uint8)

    def tiles(self, ds: int):
        w, h, _ = next(lv for lv in self.levels if lv[2] == ds)
        for ty in range(-(-h // self.tile)):
            for tx in range(-(-w // self.tile)):
                yield self.render_tile(ds, ty, tx)

    def full_tissue_tiles(self, ds: int) -> list[int]:
        """Indices (row-major) of the tiles of level ``ds`` lying entirely in tissue."""
        w, h, _ = next(lv for lv in self.levels if lv[2] == ds)
        n_across = -(-w // self.tile)
        out = []
        for ty in range(h // self.tile):
            for tx in range(w // self.tile):
                if self.alpha(ds, tx * self.tile, ty * self.tile, self.tile, self.tile).min() >= 1:
                    out.append(ty * n_across + tx)
        return out

    def tissue_fraction(self) -> float:
        return float(np.mean(self.distance > 0))


def slide_path(workdir: Path, size: tuple[int, int], args) -> Path:
    name = (f"bench_{size[0]}x{size[1]}_{args.score}_t{args.tile}_q{args.quality}_s{args.level_step}"
            f"_seed{args.seed}_v{GENERATOR_VERSION}.tif")
    return workdir / name


def pool_scores(score: str, n: int) -> list[str]:
    if score == "mixed":
        return [("0", "1+", "2+", "3+")[i % 4] for i in range(n)]
    return [score] * n


def write_slide(path: Path, size: tuple[int, int], args) -> dict:
    """Write the benchmark slide (tile-streamed) and its sidecar; returns the sidecar dict."""
    import tifffile

    t0 = time.perf_counter()
    syn = SyntheticSlide(size[0], size[1], mpp=args.mpp, tile=args.tile, scores=pool_scores(args.score, args.pool),
                         seed=args.seed, level_step=args.level_step)
    t_pool = time.perf_counter() - t0
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=size[0] * size[1] > 3_000_000_000) as tw:
            for i, (w, h, ds) in enumerate(syn.levels):
                m = args.mpp * ds
                tw.write(syn.tiles(ds), shape=(h, w, 3), dtype=np.uint8, tile=(args.tile, args.tile),
                         photometric="rgb", compression="jpeg", compressionargs={"level": int(args.quality)},
                         subfiletype=0 if i == 0 else 1, resolution=(1e4 / m, 1e4 / m),
                         resolutionunit="CENTIMETER", metadata=None, maxworkers=1)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    full = {str(ds): syn.full_tissue_tiles(ds) for _, _, ds in syn.levels[:2]}
    side = {
        "version": GENERATOR_VERSION, "width": size[0], "height": size[1], "mpp": args.mpp, "tile": args.tile,
        "quality": args.quality, "levels": syn.levels, "tissue_fraction": syn.tissue_fraction(),
        "scores": pool_scores(args.score, args.pool), "seed": args.seed, "full_tissue_tiles": full,
        "pool_seconds": round(t_pool, 1), "write_seconds": round(time.perf_counter() - t0, 1),
        "bytes": path.stat().st_size,
    }
    path.with_suffix(".json").write_text(json.dumps(side))
    return side


def ensure_slide(workdir: Path, size: tuple[int, int], args) -> tuple[Path, dict]:
    path = slide_path(workdir, size, args)
    side_path = path.with_suffix(".json")
    if path.exists() and side_path.exists() and not args.rewrite:
        return path, json.loads(side_path.read_text())
    print(f"writing {path.name} ({size[0]} x {size[1]} px) ...", flush=True)
    side = write_slide(path, size, args)
    import resource

    print(f"  written in {side['write_seconds']} s (pool {side['pool_seconds']} s), {side['bytes'] / 1e6:.0f} MB; "
          f"peak RSS of this process so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)
    return path, side


# ------------------------------------------------------------------------------------------------
# (b) decode limit


def _jpeg_colorspaces(page) -> dict:
    if page.photometric == 6:  # YCbCr -> RGB
        return {"outcolorspace": 2}
    if page.photometric == 2:
        return {"colorspace": None if page.is_jfif else 2, "outcolorspace": 2}
    return {}


DECODE_SPREAD = 0.9
"""A size whose best decode pass is under this share of the run's best is warned of in the summary: on 5 Dec 2026
the 12,288² slide's six passes all ran at 299-312 MP/s while the other size's reached 421, and its whole-slide
ratio read 0.122 where the usual 416 MP/s gives 0.092."""


def decode_rate(path: Path, level: int, tiles: list[int], *, n: int, passes: int, seed: int = 0) -> list[tuple[float, float]]:
    """One-thread (wall, CPU-time) MP/s of imagecodecs.jpeg8_decode over ``n`` tiles of ``level`` (bytes read first)."""
    import imagecodecs
    import tifffile

    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(tiles, min(n, len(tiles)), replace=False).tolist()) if tiles else []
    if not pick:
        return []
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        offsets, counts, tables = page.dataoffsets, page.databytecounts, page.jpegtables
        kw = _jpeg_colorspaces(page)
        fd = os.open(path, os.O_RDONLY)
        try:
            raw = [os.pread(fd, counts[i], offsets[i]) for i in pick]
        finally:
            os.close(fd)
        first = imagecodecs.jpeg8_decode(raw[0], tables=tables, **kw)
        ref = page.decode(raw[0], pick[0], jpegtables=tables)[0].reshape(first.shape)
        if not np.array_equal(first, ref):
            raise SystemExit("jpeg8_decode output differs from tifffile's decode: check colour spaces")
    px = sum(page.tilewidth * page.tilelength for _ in pick)
    rates = []
    for _ in range(passes):
        t, c = time.perf_counter(), time.thread_time()
        for b in raw:
            imagecodecs.jpeg8_decode(b, tables=tables, **kw)
        rates.append((px / 1e6 / (time.perf_counter() - t), px / 1e6 / (time.thread_time() - c)))
    return rates


# ------------------------------------------------------------------------------------------------
# (c) end to end, with process-tree memory


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _mem(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of one process; zeros if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * PAGE
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return rss, pss


def _compiled_bytecode(package: Path, cache: Path) -> str:
    """Where the environment forbids writing bytecode (PYTHONDONTWRITEBYTECODE, as a development machine may
    set it), give the measured processes a compiled copy of ``package`` under ``cache`` (PYTHONPYCACHEPREFIX,
    inherited by every subprocess): pip compiles an installed package, and compiling her2score's sources
    anew costs each run about 0.06 s. Returns a note for the header ("" where nothing was changed)."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        return ""
    os.environ.pop("PYTHONDONTWRITEBYTECODE")
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    return f" (bytecode compiled into {cache}, as an installed package's is: the environment set PYTHONDONTWRITEBYTECODE)"


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("her2score")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "her2score.cli"]


def run_cli(slide: Path, out: Path, workers: int | None, extra: list[str], interval: float = 0.2,
            timeout: float = 1800.0) -> dict:
    """Score ``slide`` with the CLI in a subprocess (``workers`` None: the CLI's default); wall/CPU
    seconds and peak tree memory. The wall time ends when the process does (a blocking wait); a thread
    samples the tree's memory every ``interval`` seconds.

    A run past ``timeout`` seconds (a hang) has its whole process tree killed and stops the benchmark."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [*_cli(), "score", str(slide), "--out", str(out), "-q", *(["--workers", str(workers)] if workers else []), *extra]
    load = os.getloadavg()[0]
    peak = {"rss": 0, "pss": 0, "procs": 1, "hung": False}
    done = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def sample() -> None:
        while not done.wait(interval):
            pids = _tree(proc.pid)
            if time.perf_counter() - t0 > timeout:
                peak["hung"] = True
                for p in reversed(pids):
                    try:
                        os.kill(p, 9)
                    except OSError:
                        pass
                return
            peak["procs"] = max(peak["procs"], len(pids))
            mems = [_mem(p) for p in pids]
            peak["rss"] = max(peak["rss"], sum(m[0] for m in mems))
            peak["pss"] = max(peak["pss"], sum(m[1] for m in mems))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if peak["hung"]:
        raise SystemExit(f"her2score score ran past {timeout:.0f} s (hung?); killed: {' '.join(cmd)}")
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"her2score failed ({proc.returncode}):\n{stdout.decode()}\n{stderr.decode()}")
    cpu = rusage.ru_utime + rusage.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "peak_pss_mb": peak["pss"] / 2**20, "peak_rss_sum_mb": peak["rss"] / 2**20,
            "max_single_rss_mb": rusage.ru_maxrss / 1024, "processes": peak["procs"], "load_before": load,
            "stdout": stdout.decode(errors="replace").strip()}


def _tiles(path: Path) -> tuple[list, float, float]:
    """The pipeline's tile grid over this slide (default settings), the slide's µm/px and the thumbnail's mask area (level-0 MP)."""
    from her2score.pipeline import ScoringConfig
    from her2score.slide import open_slide
    from her2score.tissue import tile_grid, tissue_mask

    cfg = ScoringConfig()
    with open_slide(path) as s:
        longest_um = max(s.dimensions) * s.mpp
        thumb_mpp = float(np.clip(longest_um / 1500, max(s.mpp, cfg.mpp), 16.0))  # as pipeline._thumbnail_mpp
        tissue = tissue_mask(s.thumbnail(mpp=thumb_mpp), mpp=thumb_mpp)
        size_t = (round(s.dimensions[0] * s.mpp / cfg.mpp), round(s.dimensions[1] * s.mpp / cfg.mpp))
        tiles = tile_grid(tissue, slide_size_px=size_t, tile_px=cfg.tile_px, margin_px=cfg.margin_px)
        return tiles, s.mpp, float(tissue.mask.sum()) * (thumb_mpp / s.mpp) ** 2 / 1e6


def pipeline_grid(path: Path) -> dict:
    """The pipeline's own tile grid over this slide (default settings): count and level-0 area."""
    from her2score.pipeline import ScoringConfig

    cfg = ScoringConfig()
    tiles, mpp, mask_mp = _tiles(path)
    f = (cfg.mpp / mpp) ** 2
    core = sum(t.core[2] * t.core[3] for t in tiles) * f
    read = sum(t.read[2] * t.read[3] for t in tiles) * f
    return {"tiles": len(tiles), "tile_px": cfg.tile_px, "target_mpp": cfg.mpp, "core_mp": core / 1e6,
            "read_mp": read / 1e6, "tissue_mask_mp": mask_mp}


# ------------------------------------------------------------------------------------------------
# (d) start-up, (e) the scikit-image peer


def version_seconds(n: int = 3) -> float:
    """Median wall seconds of ``her2score --version`` in a fresh process."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([*_cli(), "--version"], check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def one_field_cli_seconds(workdir: Path, n: int = 3) -> float:
    """Median wall seconds of ``her2score score FIELD --out OUT -q`` (CLI defaults) on a one-tile field
    (448 x 448 px at 0.5 µm/px, PNG): the CLI's start-up, one tile and its outputs."""
    from PIL import Image

    from her2score.synthetic import generate_field

    field = workdir / "one_tile_field_2+.png"
    if not field.exists():
        Image.fromarray(generate_field("2+", seed=3, size_px=(448, 448)).image).save(field, dpi=(25400 / 0.5,) * 2)
    times = []
    for _ in range(n):
        times.append(run_cli(field, workdir / "out_one_field", None, [])["wall_s"])
    return statistics.median(times)


class _FirstTile(Exception):
    pass


def first_tile_child(slide: Path, spawned: float) -> None:
    """In a fresh interpreter (``--first-tile``): seconds from ``spawned`` (time.time() of the parent at
    the spawn) to imports done, CNN loaded, and the first tile scored; printed as JSON."""
    stages = {"interpreter": time.time() - spawned}
    import her2score.cli  # noqa: F401  (the CLI's own imports)
    from her2score import pipeline
    from her2score.batch import _load_cnn
    from her2score.cnn import default_weights_path

    stages["imports"] = time.time() - spawned
    cnn = _load_cnn(str(default_weights_path()))
    stages["cnn_loaded"] = time.time() - spawned
    score_tile = pipeline.score_tile

    def first(*a, **k):
        score_tile(*a, **k)
        stages["first_tile"] = time.time() - spawned
        raise _FirstTile

    pipeline.score_tile = first  # instrumentation: stop analyse_slide after its first tile
    try:
        pipeline.analyse_slide(slide, workers=1, cnn=cnn)
    except _FirstTile:
        pass
    print(json.dumps(stages))


def first_tile_seconds(slide: Path) -> dict:
    spawned = time.time()
    out = subprocess.run([sys.executable, __file__, "--first-tile", str(slide), "--spawned", repr(spawned)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peer_cells(rgb: np.ndarray, *, mpp: float = 0.5) -> int:
    """A plain scikit-image cell pipeline on one RGB tile; returns the number of cells with a membrane measured.

    rgb2hed -> Otsu threshold on haematoxylin -> nuclei split by a watershed on their distance transform
    -> cells = nuclei grown by 4 µm (expand_labels) -> Sato ridge filter on DAB -> regionprops of each
    cell (area, centroid, mean ridge) and of its boundary pixels (mean DAB).
    """
    from scipy import ndimage as ndi
    from skimage import color, feature, filters, measure, segmentation

    hed = color.rgb2hed(rgb)
    hema, dab = hed[..., 0], hed[..., 2]
    nuclei = hema > filters.threshold_otsu(hema)
    distance = ndi.distance_transform_edt(nuclei)
    peaks = feature.peak_local_max(distance, min_distance=max(1, round(2.5 / mpp)), labels=measure.label(nuclei))
    markers = np.zeros(nuclei.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    nuclei_lab = segmentation.watershed(-distance, markers, mask=nuclei)
    cells = segmentation.expand_labels(nuclei_lab, distance=round(4 / mpp))
    ridge = filters.sato(dab, sigmas=(1, 2), black_ridges=False)
    features = [(p.label, p.area, p.centroid, p.intensity_mean) for p in measure.regionprops(cells, intensity_image=ridge)]
    boundary = segmentation.find_boundaries(cells, mode="inner") * cells
    membrane_dab = {p.label: p.intensity_mean for p in measure.regionprops(boundary, intensity_image=dab)}
    return sum(1 for f in features if f[0] in membrane_dab)


def _spread_tiles(path: Path, n: int) -> tuple:
    """The default ScoringConfig, the pipeline's grid, ``n`` of its tiles spread evenly over it, and
    level-0 px per tile px."""
    from her2score.pipeline import ScoringConfig, _sample

    cfg = ScoringConfig()
    tiles, mpp, _ = _tiles(path)
    return cfg, tiles, _sample(tiles, n), cfg.mpp / mpp


def _slide_stains(slide, tiles: list, cfg) -> tuple:
    """The default stain vectors, white set by the glass of an 8 µm/px thumbnail of ``slide``, and the
    slide's nucleus thresholds from the counterstain of a sample of ``tiles``, as analyse_slide sets them."""
    from her2score.pipeline import _read_tile, _sample, _slide_nucleus_thresholds
    from her2score.stain import H_DAB, estimate_background

    stains = H_DAB.with_background(estimate_background(slide.thumbnail(mpp=8.0)))
    return stains, _slide_nucleus_thresholds([_read_tile(slide, t, cfg.mpp) for t in _sample(tiles)], stains, cfg)


def peer_rates(path: Path, *, n: int, cnn) -> dict:
    """One-core tissue MP (level-0 px of tile cores) per CPU-second of the peer and of her2score's
    ``score_tile`` on the same ``n`` tiles, a spread sample of the pipeline's grid, read beforehand."""
    from her2score.pipeline import _read_tile, cnn_patch_limit, score_tile
    from her2score.slide import open_slide

    cfg, tiles, pick, scale = _spread_tiles(path, n)
    with open_slide(path) as s:
        stains, nucleus = _slide_stains(s, tiles, cfg)
        rgbs = [_read_tile(s, t, cfg.mpp) for t in pick]
    core_mp = sum(t.core[2] * t.core[3] for t in pick) * scale ** 2 / 1e6
    c = time.thread_time()
    peer_n = sum(peer_cells(rgb, mpp=cfg.mpp) for rgb in rgbs)
    peer_cpu = time.thread_time() - c
    c = time.thread_time()
    ours_n = sum(len(score_tile(rgb, t, stains=stains, config=cfg, scale=scale, nucleus=nucleus, cnn=cnn,
                                cnn_max_patches=cnn_patch_limit(cfg, len(tiles))).cells) for rgb, t in zip(rgbs, pick))
    ours_cpu = time.thread_time() - c
    return {"tiles": len(pick), "core_mp": core_mp, "peer_mps": core_mp / peer_cpu, "peer_cells": peer_n,
            "ours_mps": core_mp / ours_cpu, "ours_cells": ours_n}


def _count_cells(out: Path) -> int | None:
    """Rows of the slide's cell table: cells.parquet (the default) or cells.csv; None if there is neither."""
    parquet = next(out.glob("*/cells.parquet"), None)
    if parquet is not None:
        import pyarrow.parquet as pq

        return pq.ParquetFile(parquet).metadata.num_rows
    csv_path = next(out.glob("*/cells.csv"), None)
    if csv_path is None:
        return None
    with open(csv_path, "rb") as f:
        return max(0, sum(1 for _ in f) - 1)


def bench_size(size: tuple[int, int], args, workdir: Path, cnn) -> dict:
    path, side = ensure_slide(workdir, size, args)
    w, h = side["width"], side["height"]
    slide_mp = w * h / 1e6
    tissue_mp = slide_mp * side["tissue_fraction"]
    grid = pipeline_grid(path)
    workers = f"--workers {args.workers}" if args.workers else "the CLI's default --workers"
    print(f"\n=== slide {w} x {h} px at {side['mpp']} µm/px = {slide_mp:.0f} MP level 0; "
          f"{len(side['levels'])} levels (step {args.level_step}); {side['tile']} px JPEG tiles q{side['quality']}; "
          f"{side['bytes'] / 1e6:.0f} MB; tissue {side['tissue_fraction']:.1%} = {tissue_mp:.0f} MP ===")
    print(f"pipeline tile grid: {grid['tiles']} tiles of {grid['tile_px']} px at {grid['target_mpp']} µm/px over tissue; "
          f"cores {grid['core_mp']:.0f} MP, reads (with margins) {grid['read_mp']:.0f} MP, in level-0 px")
    full0 = side["full_tissue_tiles"]["1"]
    dec = decode_rate(path, 0, full0, n=args.decode_tiles, passes=3)
    lvl1 = side["levels"][1][2] if len(side["levels"]) > 1 else None
    dec1 = decode_rate(path, 1, side["full_tissue_tiles"].get(str(lvl1), []), n=args.decode_tiles // 4, passes=3) if lvl1 else []
    peer = peer_rates(path, n=args.peer_tiles, cnn=cnn)
    print(f"peer on {peer['tiles']} of the pipeline's tiles ({peer['core_mp']:.1f} MP level-0 cores), one core: scikit-image "
          f"{peer['peer_mps']:.2f} MP per CPU-second ({peer['peer_cells']} cells); her2score score_tile with the CNN "
          f"{peer['ours_mps']:.2f} ({peer['ours_cells']} cells): {peer['ours_mps'] / peer['peer_mps']:.1f}x the peer", flush=True)
    runs = []
    for r in range(args.runs):
        out = workdir / f"out_{w}x{h}"
        res = run_cli(path, out, args.workers, args.cli_args, timeout=args.timeout)
        res["first_tile"] = first_tile_seconds(path)
        dec += decode_rate(path, 0, full0, n=args.decode_tiles, passes=1, seed=r + 1)
        result = json.loads(next(out.glob("*/result.json")).read_text())
        res.update(tumour_cells=result.get("tumour_cells"), score=result.get("score"), cells=_count_cells(out),
                   output_mb=sum(f.stat().st_size for f in out.glob("*/*")) / 1e6)
        runs.append(res)
        ft = res["first_tile"]
        print(f"  run {r + 1}: wall {res['wall_s']:6.1f} s, cpu {res['cpu_s']:6.1f} s ({res['cpu_s'] / res['wall_s']:.2f} cores busy); "
              f"peak PSS {res['peak_pss_mb']:5.0f} MB, RSS sum {res['peak_rss_sum_mb']:5.0f} MB, largest process "
              f"{res['max_single_rss_mb']:5.0f} MB, {res['processes']} processes; load before {res['load_before']:.2f}; "
              f"{res['cells']} cells ({res['tumour_cells']} tumour), score {res['score']}, outputs {res['output_mb']:.0f} MB; "
              f"first tile at {ft['first_tile']:.2f} s (imports {ft['imports']:.2f}, CNN loaded {ft['cnn_loaded']:.2f})",
              flush=True)
    med = statistics.median
    # the limit is the best pass (CPU time): on a shared machine slower passes measure the neighbours
    dec_cpu, dec_wall = max(d[1] for d in dec), med(d[0] for d in dec)
    summary = {
        "width": w, "height": h, "slide_mp": slide_mp, "tissue_fraction": side["tissue_fraction"],
        "grid": grid, "decode_l0_mps": dec_cpu, "decode_l0_wall_mps": dec_wall, "decode_l0_passes": dec,
        "decode_l1_mps": max(d[1] for d in dec1) if dec1 else None, "peer": peer, "runs": runs,
    }
    print(f"decode limit, 1 core: imagecodecs.jpeg8_decode of {min(args.decode_tiles, len(full0))} level-0 tissue tiles, "
          f"best of {len(dec)} passes: {dec_cpu:.0f} MP/s per CPU-second (median {med(d[1] for d in dec):.0f}; "
          f"{dec_wall:.0f} MP/s wall median; passes "
          f"{min(d[1] for d in dec):.0f}-{max(d[1] for d in dec):.0f} CPU, {min(d[0] for d in dec):.0f}-{max(d[0] for d in dec):.0f} wall)"
          + (f"; level 1 tiles: {summary['decode_l1_mps']:.0f} MP/s" if dec1 else ""))
    if runs:
        wall, cpu = med(r["wall_s"] for r in runs), med(r["cpu_s"] for r in runs)
        summary.update(
            wall_s=wall, cpu_s=cpu, tissue_mps=grid["core_mp"] / wall, slide_mps=slide_mp / wall,
            ratio=grid["core_mp"] / wall / dec_cpu, slide_ratio=slide_mp / wall / dec_cpu,
            peer_ratio=grid["core_mp"] / wall / peer["peer_mps"], tissue_mp_per_cpu_s=grid["core_mp"] / cpu,
            peak_pss_mb=med(r["peak_pss_mb"] for r in runs), peak_rss_sum_mb=med(r["peak_rss_sum_mb"] for r in runs),
            max_single_rss_mb=med(r["max_single_rss_mb"] for r in runs),
            first_tile_s=med(r["first_tile"]["first_tile"] for r in runs),
        )
        print(f"end to end, {workers}, median of {len(runs)} runs: wall {wall:.1f} s; "
              f"tissue {summary['tissue_mps']:.1f} MP/s (level-0 px of the scored tiles' cores): "
              f"{summary['ratio']:.3f} of the 1-core decode rate, {summary['peer_ratio']:.1f}x the 1-core scikit-image peer; "
              f"slide {summary['slide_mps']:.1f} MP/s (whole level 0): {summary['slide_ratio']:.3f} of decode; "
              f"peak PSS {summary['peak_pss_mb']:.0f} MB (RSS sum {summary['peak_rss_sum_mb']:.0f} MB, largest process "
              f"{summary['max_single_rss_mb']:.0f} MB); first tile at {summary['first_tile_s']:.2f} s")
        print(f"  per CPU-second of the process tree: {summary['tissue_mp_per_cpu_s']:.1f} tissue MP "
              f"({summary['tissue_mp_per_cpu_s'] / dec_cpu:.3f} of the decode rate; {cpu / wall:.2f} cores were busy on average)")
    return summary


# ------------------------------------------------------------------------------------------------
# --cnn


def cnn_rates(seconds: float = 2.0) -> None:
    """Patches per CPU-second of the shipped CNN on one thread: torch eager (channels-last) against ONNX
    Runtime, by batch size (16 = one tile's sample, as the pipeline calls it), on real tissue patches."""
    import torch

    from her2score.cnn import load_model, load_onnx_model, tissue_patches
    from her2score.stain import deconvolve
    from her2score.synthetic import generate_field

    torch.set_num_threads(1)
    fields = [deconvolve(generate_field(sc, seed=i, size_px=(1024, 1024)).image) for i, sc in enumerate(("0", "1+", "2+", "3+"))]
    x = np.concatenate([tissue_patches(f, patch_px=64)[0] for f in fields])[:256]
    models = {"torch eager": load_model(device="cpu"), "onnxruntime": load_onnx_model()}
    diff = np.abs(models["torch eager"].predict_patches(x) - models["onnxruntime"].predict_patches(x)).max()
    print(f"\n=== CNN, one thread, {len(x)} tissue patches of 64 px; largest |p_onnx - p_torch| {diff:.1e} ===")
    for batch in (16, 64, 256):
        line = []
        for name, m in models.items():
            m.predict_patches(x[:batch])
            c, n = time.thread_time(), 0
            while time.thread_time() - c < seconds:
                m.predict_patches(x[:batch])
                n += batch
            line.append(f"{name} {n / (time.thread_time() - c):6.0f}")
        print(f"  batch {batch:3d}: " + ", ".join(line) + " patches per CPU-second")


# ------------------------------------------------------------------------------------------------
# --profile


def profile(args, workdir: Path) -> None:
    from her2score.outputs import write_outputs
    from her2score.pipeline import ScoringConfig, analyse_slide

    side_px = args.profile_size
    path, side = ensure_slide(workdir, (side_px, side_px), args)
    out = workdir / "out_profile"
    shutil.rmtree(out, ignore_errors=True)
    grid = pipeline_grid(path)
    cnn, cnn_note = None, "no CNN"
    if not args.no_cnn:  # as the CLI's default: the shipped CNN loaded as a batch worker loads it
        try:
            from her2score.batch import _load_cnn
            from her2score.cnn import default_weights_path

            cnn = _load_cnn(str(default_weights_path()))
            cnn_note = f"CNN {cnn.name} on {type(cnn).__name__}"
        except Exception as e:  # no torch or no weights: profile the classical pipeline
            cnn_note = f"no CNN ({type(e).__name__}: {e})"
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    analysis = analyse_slide(path, workers=1, **({"cnn": cnn} if cnn is not None else {}))
    t1 = time.perf_counter()
    write_outputs(analysis, out / "slide")
    prof.disable()
    t2 = time.perf_counter()
    print(f"\n=== profile: {side_px} x {side_px} px slide, {grid['tiles']} tiles ({grid['core_mp']:.0f} MP level-0 "
          f"cores), one process: analyse_slide {t1 - t0:.1f} s, write_outputs {t2 - t1:.1f} s "
          f"(profiled; {len(analysis.cells['x'])} cells; {cnn_note}) ===")
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(15)
        text = buf.getvalue()
        print(f"--- top 15 by {key} ---")
        print(text[text.index("   ncalls"):].rstrip())
    stats = pstats.Stats(prof)
    mp_read = grid["read_mp"] / (ScoringConfig().mpp / side["mpp"]) ** 2  # tile reads, MP at the target µm/px
    for parent in ("score_tile", "analyse_slide"):
        callee_breakdown(stats, parent, mp_read)
    read_paths(path, ScoringConfig(), n=args.profile_tiles)
    library_floor(path, side, grid, cnn, cnn_note, n=args.profile_tiles)


def library_floor(path: Path, side: dict, grid: dict, cnn, cnn_note: str, *, n: int) -> None:
    """CPU per tile (read and score_tile) inside the compiled calls the pipeline makes, against the CPU a
    tile may take for issue 10's ratio targets at this run's decode rate on this machine's cores.

    The floor is the time in OpenCV, ONNX Runtime and the JPEG decode: what the tile would still
    cost with every numpy and Python step free. scikit-image's watershed (its Python wrapper
    included) is shown beside it. Budget per tile = cores x level-0 core MP per tile / (ratio x
    one-core decode MP/s); the whole-slide one assumes nothing else (start-up, outputs) takes time.
    """
    import cv2

    from her2score.pipeline import _read_and_score, cnn_patch_limit
    from her2score.slide import open_slide

    cfg, tiles, pick, _ = _spread_tiles(path, n)
    prof = cProfile.Profile()
    with open_slide(path) as s:
        stains, nucleus = _slide_stains(s, tiles, cfg)
        c = time.process_time()
        prof.enable()
        for t in pick:
            _read_and_score(s, t, stains, cfg, nucleus, cnn, cnn_patch_limit(cfg, len(tiles)), None)
        prof.disable()
        cpu = (time.process_time() - c) / len(pick) * 1e3
    own = {"OpenCV": 0.0, "ONNX Runtime": 0.0, "JPEG decode": 0.0, "watershed": 0.0}
    for (file, _, name), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
        if file == "~" and name.startswith("<") and hasattr(cv2, name.strip("<>")):
            own["OpenCV"] += tottime
        elif "onnxruntime" in name and name.endswith(".run>"):
            own["ONNX Runtime"] += tottime
        elif file.endswith("imagecodecs.py") and name == "jpeg_decode":
            own["JPEG decode"] += tottime
        elif file.endswith("_watershed.py") and name == "watershed":
            own["watershed"] += tottime
    ms = {k: v / len(pick) * 1e3 for k, v in own.items()}
    floor = ms["OpenCV"] + ms["ONNX Runtime"] + ms["JPEG decode"]
    print(f"--- compiled calls, ms per tile ({len(pick)} tiles read and scored, {cnn_note}): "
          + ", ".join(f"{k} {v:.1f}" for k, v in ms.items())
          + f"; floor (OpenCV + ONNX Runtime + decode) {floor:.1f} of {cpu:.1f} ms CPU ({floor / cpu:.0%}) ---")
    dec = decode_rate(path, 0, side["full_tissue_tiles"]["1"], n=300, passes=3)
    if not dec:
        print("--- no level-0 JPEG tile lies wholly in tissue to time the decode on: no budget (a larger --profile-size) ---")
        return
    decode = max(d[1] for d in dec)
    cores = len(os.sched_getaffinity(0))
    mp_tile = grid["core_mp"] / grid["tiles"]
    slide_mp = side["width"] * side["height"] / 1e6
    tissue_budget = cores * mp_tile / (0.15 * decode) * 1e3
    slide_budget = cores * slide_mp / (0.10 * decode) / grid["tiles"] * 1e3
    print(f"--- CPU a tile may take on {cores} cores at this run's decode rate ({decode:.0f} MP/s, level-0 core "
          f"{mp_tile:.2f} MP a tile): 0.15 of decode on tissue {tissue_budget:.1f} ms; 0.10 on this whole slide "
          f"(tissue {side['tissue_fraction']:.0%}), nothing else taking time, {slide_budget:.1f} ms ---")


def callee_breakdown(stats: pstats.Stats, parent: str, mp: float) -> None:
    """Time of each function called directly by ``parent`` (by name), in ms per MP of tile read."""
    rows = []
    for func, (_, _, _, _, callers) in stats.stats.items():
        for caller, (_, nc, tt, ct) in callers.items():
            if caller[2] == parent:
                rows.append((ct, nc, f"{Path(func[0]).name}:{func[1]}({func[2]})"))
    parent_ct = sum(v[3] for f, v in stats.stats.items() if f[2] == parent)
    if not rows or not parent_ct:
        return
    print(f"--- direct callees of {parent} ({parent_ct:.2f} s in all; ms per MP of tile reads at the target µm/px) ---")
    for ct, nc, name in sorted(rows, reverse=True)[:12]:
        print(f"  {name:58s} {nc:6d} calls {ct:7.3f} s {ct / mp * 1e3:8.1f} ms/MP {ct / parent_ct:6.1%}")


def read_paths(path: Path, cfg, *, n: int) -> None:
    """Cost of the pipeline's own region reads (tile boxes with margins) vs reads aligned to the JPEG tiles."""
    from her2score.slide import open_slide
    from her2score.tissue import tile_grid, tissue_mask

    with open_slide(path) as s:
        thumb_mpp = float(np.clip(max(s.dimensions) * s.mpp / 1500, max(s.mpp, cfg.mpp), 16.0))
        tissue = tissue_mask(s.thumbnail(mpp=thumb_mpp), mpp=thumb_mpp)
        size_t = (round(s.dimensions[0] * s.mpp / cfg.mpp), round(s.dimensions[1] * s.mpp / cfg.mpp))
        tiles = tile_grid(tissue, slide_size_px=size_t, tile_px=cfg.tile_px, margin_px=cfg.margin_px)[:n]
        scale = cfg.mpp / s.mpp
        t = time.perf_counter()
        mp = 0.0
        for tl in tiles:
            mp += s.read_region((round(tl.read[0] * scale), round(tl.read[1] * scale)), tl.read[2:], mpp=cfg.mpp).size / 3e6
        t_read = time.perf_counter() - t
        line = (f"--- reads: pipeline tile boxes ({cfg.tile_px}+2x{cfg.margin_px} px at {cfg.mpp} µm/px) "
                f"{t_read / mp * 1e3:.1f} ms/MP ({mp / t_read:.0f} MP/s at the target µm/px")
        if hasattr(s, "_read_level") and hasattr(s, "_pages"):
            lvl = s._best_level(scale)
            page = s._pages[lvl]
            ds, tw = s.levels[lvl].downsample, page.tilewidth or 256
            t = time.perf_counter()
            mp_a = 0.0
            for tl in tiles:  # the same tiles' cores, snapped to the JPEG grid of the level read
                x = int(tl.core[0] * scale / ds) // tw * tw
                y = int(tl.core[1] * scale / ds) // tw * tw
                w, h = min(cfg.tile_px, s.levels[lvl].width - x), min(cfg.tile_px, s.levels[lvl].height - y)
                mp_a += s._read_level(lvl, x, y, w, h).size / 3e6
            t_al = time.perf_counter() - t
            line += f"); the same area read aligned to the {tw} px JPEG tiles: {t_al / mp_a * 1e3:.1f} ms/MP ({mp_a / t_al:.0f} MP/s"
        print(line + ") ---")


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/her2bench"), help="slide cache and outputs (default /tmp/her2bench)")
    p.add_argument("--size", nargs="+", default=["12288x12288", "40960x30720"],
                   help="slide size(s), level-0 px WIDTHxHEIGHT (default: 12288x12288 40960x30720)")
    p.add_argument("--quick", action="store_true", help="while developing: the 12,288^2 slide, one run, smaller samples")
    p.add_argument("--runs", type=int, default=3, help="end-to-end runs per size (medians reported)")
    p.add_argument("--workers", type=int, help="--workers passed to her2score score (default: none, the CLI's default)")
    p.add_argument("--peer-tiles", type=int, default=24, help="pipeline tiles in the scikit-image peer's sample")
    p.add_argument("--cli-args", nargs=argparse.REMAINDER, default=[], help="extra arguments for her2score score (last)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a scoring run counts as hung and is killed")
    p.add_argument("--decode-tiles", type=int, default=2000, help="level-0 tissue tiles in the decode sample")
    p.add_argument("--tile", type=int, default=256, help="JPEG tile side of the written slide (256 or 512)")
    p.add_argument("--quality", type=int, default=80, help="JPEG quality of the written slide")
    p.add_argument("--level-step", type=int, default=2, choices=(2, 4), help="pyramid downsample per level")
    p.add_argument("--score", default="mixed", choices=("mixed", "0", "1+", "2+", "3+"), help="HER2 score of the pool fields")
    p.add_argument("--pool", type=int, default=12, help="synthetic fields in the pool")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--mpp", type=float, default=0.25, help="µm/px of level 0")
    p.add_argument("--rewrite", action="store_true", help="write the slide again even if cached")
    p.add_argument("--profile", action="store_true", help="profile one process on a small slide instead")
    p.add_argument("--no-cnn", action="store_true", help="--profile without the CNN (the CLI's --no-cnn)")
    p.add_argument("--cnn", action="store_true", help="CNN patches/s only: torch eager against ONNX Runtime, by batch size")
    p.add_argument("--profile-size", type=int, default=8192, help="side (px) of the profiled slide")
    p.add_argument("--profile-tiles", type=int, default=64, help="tiles in the read-path comparison of --profile")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--first-tile", type=Path, help=argparse.SUPPRESS)  # the child of first_tile_seconds
    p.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.first_tile:
        first_tile_child(args.first_tile, args.spawned)
        return 0
    if args.quick:
        args.size, args.runs, args.decode_tiles, args.peer_tiles = ["12288x12288"], 1, 500, 8
    try:
        sizes = [tuple(int(v) for v in sz.lower().split("x")) for sz in args.size]
    except ValueError:
        raise SystemExit(f"--size takes WIDTHxHEIGHT in pixels, e.g. 12288x12288; got {args.size}") from None
    args.workdir.mkdir(parents=True, exist_ok=True)
    import her2score

    bytecode = _compiled_bytecode(Path(her2score.__file__).parent, args.workdir / "pycache")
    print(f"her2score benchmark: her2score {getattr(her2score, '__version__', '?')} from {Path(her2score.__file__).parent}"
          f"{bytecode}; python {sys.version.split()[0]}; {os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}); "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    if args.profile:
        profile(args, args.workdir)
        return 0
    if args.cnn:
        cnn_rates()
        return 0
    from her2score.batch import _load_cnn
    from her2score.cnn import default_weights_path

    cnn = _load_cnn(str(default_weights_path()))  # as a batch worker loads it (one thread)
    print(f"start-up: her2score --version {version_seconds():.2f} s wall; her2score score on a one-tile field "
          f"{one_field_cli_seconds(args.workdir):.2f} s wall (medians of 3)", flush=True)
    results = [bench_size(sz, args, args.workdir, cnn) for sz in sizes]
    if all(r["runs"] for r in results):
        print("\n=== summary (medians; MP in level-0 px at 0.25 µm/px; ratios to one-core rates measured in this run) ===")
        print(f"{'slide, level 0':>16} {'tissue MP':>9} {'wall s':>7} {'tissue MP/s':>11} {'decode MP/s':>11} "
              f"{'ratio':>6} {'peer x':>6} {'slide MP/s':>10} {'slide ratio':>11} {'cores busy':>10} {'peak PSS MB':>11} "
              f"{'RSS sum MB':>10} {'1st tile s':>10}")
        for r in results:
            print(f"{r['width']:>7} x {r['height']:<6} {r['grid']['core_mp']:9.0f} {r['wall_s']:7.1f} {r['tissue_mps']:11.1f} "
                  f"{r['decode_l0_mps']:11.0f} {r['ratio']:6.3f} {r['peer_ratio']:6.1f} {r['slide_mps']:10.1f} "
                  f"{r['slide_ratio']:11.3f} {r['cpu_s'] / r['wall_s']:10.2f} {r['peak_pss_mb']:11.0f} {r['peak_rss_sum_mb']:10.0f} "
                  f"{r['first_tile_s']:10.2f}")
        best = max(r["decode_l0_mps"] for r in results)
        for r in results:  # one size's passes all caught in a slow spell flatter its ratios (the same codec, similar tiles)
            if r["decode_l0_mps"] < DECODE_SPREAD * best:
                print(f"warning: the {r['width']} x {r['height']} slide's best decode pass ({r['decode_l0_mps']:.0f} MP/s) is under "
                      f"{DECODE_SPREAD:.0%} of this run's best ({best:.0f}): its ratios are flattered; against {best:.0f} they are "
                      f"{r['ratio'] * r['decode_l0_mps'] / best:.3f} on tissue and {r['slide_ratio'] * r['decode_l0_mps'] / best:.3f} whole")
        big, small = max(results, key=lambda r: r["slide_mp"]), min(results, key=lambda r: r["slide_mp"])
        if big is not small:
            print(f"memory for {big['slide_mp'] / small['slide_mp']:.0f}x the area: peak PSS x{big['peak_pss_mb'] / small['peak_pss_mb']:.2f}, "
                  f"RSS sum x{big['peak_rss_sum_mb'] / small['peak_rss_sum_mb']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
