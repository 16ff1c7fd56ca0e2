"""Folder runs: discover slides, score them in worker processes or on Dask, resume after a kill.

Per batch folder: one sub-folder of outputs per slide, ``manifest.json`` (each slide's state and
summary row, rewritten atomically after every slide) and ``summary.csv`` made from the manifest.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .categories import CATEGORIES
from .outputs import atomic_write, write_outputs
from .pipeline import ScoringConfig, analyse_slide
from .slide import SLIDE_SUFFIXES

__all__ = ["Job", "BatchError", "discover", "plan_jobs", "process_slide", "run_batch", "SUMMARY_COLUMNS"]

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    ["slide", "status", "score", "level", "h_score", "tumour_cells", "qc_passed", "guideline", "region"]
    + [f"pct_{c}" for c in CATEGORIES]
    + ["output", "error"]
)
MANIFEST = "manifest.json"
LOCK = ".her2score.lock"


class BatchError(Exception):
    """A batch that cannot start (e.g. its output folder is in use by another batch)."""


@dataclass(frozen=True)
class Job:
    """One slide to score: where it is, where its outputs go, and the settings."""

    slide: str
    name: str
    out_dir: str
    config: ScoringConfig
    mpp: float | None = None
    region: str | None = None
    tile_workers: int = 1


def discover(inputs: Iterable[str | os.PathLike]) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """Slides under the inputs (files, or folders searched recursively), as (slide, root) pairs,
    and the inputs that gave none as (path, reason)."""
    found, problems = [], []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            problems.append((str(p), f"{p}: no such file or folder"))
        elif p.is_file():
            found.append((p, p.parent))
        else:
            slides = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not slides:
                problems.append((str(p), f"{p}: folder holds no slides (looked for {', '.join(SLIDE_SUFFIXES)})"))
            found.extend((f, p) for f in slides)
    unique = list(dict.fromkeys(found))
    return unique, problems


def safe_name(relative: str) -> str:
    """A folder name for a slide's outputs that cannot leave the batch folder."""
    name = re.sub(r"[^\w.-]+", "_", relative.replace(os.sep, "__")).strip("._")[:120]
    return name or "slide"


def plan_jobs(slides: list[tuple[Path, Path]], out: Path, config: ScoringConfig, *, mpp=None, regions: Path | None = None) -> list[Job]:
    """One Job per slide, with unique safe output folder names (a hash is added on collision)."""
    jobs, used = [], set()
    for slide, root in slides:
        rel = str(slide.relative_to(root)) if slide.is_relative_to(root) else slide.name
        name = safe_name(rel)
        if name.lower() in used:
            name = f"{name}-{hashlib.sha1(str(slide).encode()).hexdigest()[:8]}"
        used.add(name.lower())
        region = _find_region(regions, slide) if regions else None
        jobs.append(Job(str(slide), name, str(out / name), config, mpp, region))
    return jobs


def _find_region(regions: Path, slide: Path) -> str | None:
    for suffix in (".geojson", ".json", ".png", ".tif", ".tiff"):
        for stem in (slide.stem, slide.name):
            cand = regions / f"{stem}{suffix}"
            if cand.is_file():
                return str(cand)
    return None


def _signature(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def process_slide(job: Job) -> dict:
    """Score one slide and write its outputs; never raises: failures become an error row."""
    row = {c: "" for c in SUMMARY_COLUMNS}
    row.update(slide=job.slide, output=job.name)
    try:
        analysis = analyse_slide(job.slide, config=job.config, mpp=job.mpp, region=job.region, workers=job.tile_workers)
        write_outputs(analysis, job.out_dir)
        r = analysis.result
        row.update(
            status="ok", score=r.score, level=r.level, h_score=r.h_score, tumour_cells=r.tumour_cells,
            qc_passed=r.qc_passed, guideline=r.guideline, region=r.region,
            **{f"pct_{c}": r.percentages[c] for c in CATEGORIES},
        )
    except Exception as e:  # one bad slide never stops the batch
        message = str(e) if isinstance(e, (OSError, ValueError)) or type(e).__module__.startswith("her2score") else f"{type(e).__name__}: {e}"
        if not message.startswith(job.slide) and job.slide not in message:
            message = f"{job.slide}: {message}"
        log.debug("slide failed: %s\n%s", job.slide, traceback.format_exc())
        row.update(status="error", error=message)
    return row


def _config_key(job: Job) -> str:
    blob = json.dumps([asdict(job.config), job.mpp, job.region], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


class _Manifest:
    """The batch's record of each slide's state, rewritten atomically after every change."""

    def __init__(self, out: Path):
        self.path = out / MANIFEST
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))["slides"]
            except (ValueError, KeyError, TypeError):
                log.warning("%s is unreadable; starting a fresh manifest", self.path)

    def done(self, job: Job, out: Path) -> bool:
        e = self.entries.get(job.slide)
        try:
            sig = _signature(job.slide)
        except OSError:
            return False
        return bool(e and e["state"] == "done" and e["signature"] == sig and e["config"] == _config_key(job)
                    and (out / e["row"]["output"] / "result.json").exists())

    def record(self, job: Job, row: dict) -> None:
        try:
            sig = _signature(job.slide)
        except OSError:
            sig = None
        self.entries[job.slide] = {"state": "done" if row["status"] == "ok" else "error", "signature": sig,
                                   "config": _config_key(job), "row": row}
        self.save()

    def save(self) -> None:
        atomic_write(self.path, json.dumps({"version": 1, "slides": self.entries}, indent=1, sort_keys=True, ensure_ascii=False))


def _summary_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, SUMMARY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in sorted(rows, key=lambda r: r["slide"]):
        w.writerow(row)
    return buf.getvalue()


def _lock(out: Path):
    fh = open(out / LOCK, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise BatchError(f"{out}: another her2score batch is writing to this folder; wait for it or choose another --out") from None
    return fh


def run_batch(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    config: ScoringConfig = ScoringConfig(),
    mpp: float | None = None,
    regions: str | os.PathLike | None = None,
    workers: int = 1,
    scheduler: str | None = None,
    progress: Callable[[dict, int, int], None] | None = None,
) -> list[dict]:
    """Score every slide under ``inputs`` into ``out``; returns the summary rows (also in summary.csv).

    Slides already done with the same settings are skipped, so a killed batch resumes where it
    stopped. ``workers`` processes score slides side by side (or the tiles of a single slide);
    ``scheduler`` sends slides to a Dask cluster: an address, or 'local' for a LocalCluster.
    ``progress(row, done, total)`` is called after each slide.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        slides, problems = discover(inputs)
        jobs = plan_jobs(slides, out, config, mpp=mpp, regions=Path(regions) if regions else None)
        manifest = _Manifest(out)
        for path, reason in problems:
            manifest.record(Job(path, "", "", config), {**{c: "" for c in SUMMARY_COLUMNS}, "slide": path, "status": "error", "error": reason})
        todo = [j for j in jobs if not manifest.done(j, out)]
        total, done = len(jobs), len(jobs) - len(todo)
        if scheduler is None and workers > 1 and len(todo) < workers:
            todo = [replace(j, tile_workers=workers) for j in todo]
        for job, row in _execute(todo, workers, scheduler):
            manifest.record(job, row)
            done += 1
            if progress:
                progress(row, done, total)
        keep = {j.slide for j in jobs} | {p for p, _ in problems}
        rows = [e["row"] for s, e in manifest.entries.items() if s in keep]
        atomic_write(out / "summary.csv", _summary_csv(rows))
        return sorted(rows, key=lambda r: r["slide"])
    finally:
        lock.close()


def _execute(jobs: list[Job], workers: int, scheduler: str | None):
    """Yield (job, row) as slides finish: in this process, a process pool, or on Dask."""
    if not jobs:
        return
    if scheduler:
        yield from _execute_dask(jobs, workers, scheduler)
    elif workers <= 1 or jobs[0].tile_workers > 1:
        for job in jobs:
            yield job, process_slide(job)
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(process_slide, j): j for j in jobs}
            for f in as_completed(futures):
                yield futures[f], f.result()


def _execute_dask(jobs: list[Job], workers: int, scheduler: str):
    from dask.distributed import Client, LocalCluster, as_completed as dask_completed

    if scheduler == "local":
        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    else:
        cluster, client = None, Client(scheduler)
    try:
        futures = client.map(process_slide, jobs, pure=False)
        by_key = {f.key: j for f, j in zip(futures, jobs)}
        for f in dask_completed(futures):
            yield by_key[f.key], f.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
