"""Folder runs: discover slides, score them in worker processes or on Dask, resume after a kill.

Per batch folder: one sub-folder of outputs per slide, ``manifest.json`` (each slide's state,
settings and summary row, rewritten atomically after a slide finishes) and ``summary.csv`` made from
the manifest (rewritten with it): every slide scored into the folder, by this run or an earlier one.
Both are rewritten after every slide while that costs little, and less often in batches of thousands
(see SAVE_COST_SHARE); a batch killed with SIGKILL scores again the slides finished since the last
write. A lock file keeps a second batch out of the folder while one runs; a batch that starts
removes the temporary files a killed one left behind.

One folder holds one set of settings (guideline, specimen, thresholds, the CNN weights' SHA-256): a
slide scored before with other settings is scored again when it is among the inputs, and a batch is
refused when the folder holds slides scored with other settings that are not.

Slides are scored in child processes (even with one worker): a slide that crashes its process
(a reader fault, the out-of-memory killer) gets an error row and the batch goes on. Children die
with the batch (Linux PR_SET_PDEATHSIG), so a killed batch leaves no orphan still writing.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import traceback
import unicodedata
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import __version__
from .categories import CATEGORIES
from .imagecheck import NotHerIhcError
from .files import content_sample, current_umask
from .outputs import OPTIONAL_OUTPUT_FILES, OUTPUT_FILES, atomic_write, remove_stale_temp_files, write_outputs
from .pipeline import NoTissueError, NuclearStainError, ScoringConfig, WrongStainError, analyse_slide
from .results import SlideResult
from .slide import (SLIDE_SUFFIXES, UNSUPPORTED_IMAGE_SUFFIXES, SlideError, automatic_backend, checked_backend, missing_reason,
                    resolved_path, unsupported_format)
from .workers import POLL_S, checked_workers, die_with_parent, pause, result_of, signals_held, wait_first, worker_pool

__all__ = [
    "Job", "BatchError", "BatchRows", "discover", "safe_name", "plan_jobs", "process_slide", "run_batch",
    "SUMMARY_COLUMNS", "MANIFEST", "SUMMARY", "LOCK", "SAVE_COST_SHARE", "SAVE_ALWAYS_UNDER_S",
]

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    ["slide", "status", "score", "qc_status", "level", "classical_score", "cnn_score", "confidence", "h_score",
     "tumour_cells", "qc_passed", "qc", "flags", "guideline", "specimen", "region"]
    + [f"pct_{c}" for c in CATEGORIES]
    + ["output", "error"]
)
"""summary.csv: ``status`` is ok, refused (no tissue, not a brightfield H-DAB image, nuclear DAB) or error; ``qc_status`` (see
SlideResult.qc_status) stands beside the score; ``qc`` lists the QC findings as code:severity; empty score: not scored."""
MANIFEST = "manifest.json"
SUMMARY = "summary.csv"
LOCK = ".her2score.lock"
RESERVED_NAMES = {MANIFEST, SUMMARY, LOCK}
SIDECAR_SUFFIXES = {".json", ".geojson", ".xml", ".csv", ".tsv", ".txt", ".md", ".ini", ".dat", ".log", ".yaml",
                    ".yml", ".toml"}
"""Files expected beside slides (annotations, truth tables, notes): skipped in folders without a warning."""
MAX_NAME_BYTES = 150
"""Longest output-folder name in UTF-8 bytes (file systems allow 255; a hash may be appended)."""


NOT_A_SLIDE = "not a slide format"
"""discover's reason for a file it skips in a folder (the other reason: her2score's own output folder)."""


class OutputError(Exception):
    """A slide's outputs could not be written: the message names the output folder and the reason."""


class BatchError(Exception):
    """A batch that cannot start (e.g. its output folder is in use by another batch)."""


class BatchRows(list):
    """The summary rows (every slide in the output folder, sorted by path) and this run's counts:
    ``scored`` (ok; ``unscored`` of them without a score: no tumour cells), ``failed`` (refused or error;
    ``refused`` of them refused: no tissue, not an H-DAB image, nuclear DAB) and ``reused`` (done before with
    the same settings); ``inputs``: the slides (paths as in the rows) this run was given."""

    def __init__(self, rows: Iterable[dict], *, scored: int = 0, reused: int = 0, failed: int = 0,
                 inputs: Iterable[str] = (), refused: int = 0, unscored: int = 0):
        super().__init__(rows)
        self.scored, self.reused, self.failed = scored, reused, failed
        self.refused, self.unscored = refused, unscored
        self.inputs = frozenset(inputs)


@dataclass(frozen=True)
class Job:
    """One slide to score: where it is, where its outputs go, and the settings. ``cells_csv``: also
    write cells.csv beside cells.parquet; ``default_mpp``: the µm/px where the file's metadata gives none;
    ``backend``: the reader (slide.BACKENDS; None: the one the file chooses)."""

    slide: str
    name: str
    out_dir: str
    config: ScoringConfig
    mpp: float | None = None
    region: str | None = None
    tile_workers: int = 1
    cnn_weights: str | None = None
    cells_csv: bool = False
    default_mpp: float | None = None
    backend: str | None = None


# -- discovery and naming ---------------------------------------------------------------------------

def _slide_like(path: Path) -> bool:
    """Whether ``path`` is named as a slide: a format read, or one known and not read (its row says so)."""
    return path.suffix.lower() in SLIDE_SUFFIXES + UNSUPPORTED_IMAGE_SUFFIXES


BATCH_OUTPUT = f"a her2score batch's output folder ({MANIFEST} and {SUMMARY})"
"""How discover names a batch's output folder (_batch_output)."""


def _batch_output(folder: Path, names: set[str]) -> bool:
    """Whether ``folder``, holding ``names``, is a batch's output: a MANIFEST beside a SUMMARY whose header is a
    batch's, not any manifest.json and summary.csv (a study's own were taken for ours)."""
    return {MANIFEST, SUMMARY} <= names and _batch_summary(folder / SUMMARY)


def _slide_output(names: set[str]) -> set[str]:
    """The output files of one slide's output folder among ``names``: its overlay.png beside another of OUTPUT_FILES,
    written with it (not any overlay.png); empty for any other folder."""
    ours = names & {*OUTPUT_FILES, *OPTIONAL_OUTPUT_FILES}
    return ours if "overlay.png" in ours and len(ours) > 1 else set()


EVALUATION_FILES = ("metrics.json", "per_image.csv", "report.md", "confusion.png", "bland_altman.png")
"""The files ``her2score evaluate`` writes into its --out, beside results/ (slides' output folders); the first three
always."""


def _evaluation_output(folder: Path, names: set[str]) -> set[str]:
    """The files of an evaluation's output in ``folder``, holding ``names``: EVALUATION_FILES where its metrics.json
    is an evaluation's (its labels, image count and methods), not any file of that name; empty for any other folder."""
    if not set(EVALUATION_FILES[:3]) <= names:
        return set()
    try:
        metrics = json.loads((folder / EVALUATION_FILES[0]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return names & set(EVALUATION_FILES) if isinstance(metrics, dict) and {"labels", "n_images", "methods"} <= set(metrics) else set()


def _her2score_output(folder: Path, filenames: Iterable[str]) -> tuple[str, set[str], bool] | None:
    """Which her2score output ``folder``, holding ``filenames``, is: its words, the files of it there (a slide's and an
    evaluation's own; a batch's folder holds nothing else) and whether it is an evaluation's (whose results/ holds
    its images' result.json files); None for any other folder. A batch's (_batch_output), an evaluation's
    (_evaluation_output) or one slide's (_slide_output). None holds slides: an overlay.png is a drawing of one, a
    confusion.png a plot."""
    names = set(filenames)
    if _batch_output(folder, names):
        return BATCH_OUTPUT, names, False
    ours = _slide_output(names)
    if evaluation := _evaluation_output(folder, names):
        return f"a her2score evaluation's output folder ({', '.join(sorted(evaluation))})", ours | evaluation, True
    return (f"a her2score slide's output folder ({', '.join(sorted(ours))})", ours, False) if ours else None


def _batch_summary(path: Path) -> bool:
    """Whether ``path`` begins as a batch's SUMMARY does: its first three columns, every version's (slide, status,
    score), read past a byte-order mark and quotes and split by commas, semicolons or tabs (a spreadsheet's re-save, in
    any locale); a study's 'slide,status,stain' is not."""
    try:
        with open(path, "rb") as f:
            head = f.read(128).removeprefix(b"\xef\xbb\xbf").replace(b'"', b"")
    except OSError:
        return False
    return any(head.startswith(sep.join(c.encode() for c in SUMMARY_COLUMNS[:3]) + sep) for sep in (b",", b";", b"\t"))


def output_holding(path: Path) -> str | None:
    """Which her2score output folder (a batch's or a slide's, in words) holds the file ``path``, where it bears an
    output's name; None for any other file (discover, and the class folders of labels.class_folder_files)."""
    if path.name not in {*OUTPUT_FILES, *OPTIONAL_OUTPUT_FILES, MANIFEST, SUMMARY, *EVALUATION_FILES}:
        return None
    try:
        found = _her2score_output(path.parent, os.listdir(path.parent))
    except OSError:
        return None
    return found[0] if found else None


def _inside(path: Path, folders: list[Path]) -> bool:
    rp = resolved_path(path)
    return any(rp == f or rp.is_relative_to(f) for f in folders)


def discover(
    inputs: Iterable[str | os.PathLike],
    *,
    exclude: Iterable[str | os.PathLike] = (),
    skipped: list[tuple[str, str]] | None = None,
) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """Slides under the inputs (files, or folders searched recursively), as (slide, root) pairs,
    and the inputs that gave none as (path, "PATH: reason").

    A file named explicitly is taken where its suffix is a slide format's, read or not (_slide_like: an unreadable one
    gets its error when opened); any other file, and a file of her2score's own output (a slide's overlay.png), is a
    problem. Folders are searched through symbolic links, each real folder once. In folders: slide suffixes are taken,
    and so are image formats known to be unsupported (so they get a clear error row); hidden files and folders,
    folders under ``exclude`` (the batch's own output), other batches' output folders and MRXS data folders are not
    searched, nor are the output files of a slide's output folder (_her2score_output; its other files and folders
    are: write_outputs may write beside the slide); other files, and those output folders, are appended to
    ``skipped``. An output folder holding no slide, given itself, is a problem: no folder of slides.
    The same file reached twice (e.g. by two spellings) is taken once.
    """
    excluded = [resolved_path(Path(e)) for e in exclude]
    found, problems = [], []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            problems.append((str(p), f"{p}: {missing_reason(p, 'file or folder')}"))
        elif p.is_file():
            if what := output_holding(p):
                problems.append((str(p), f"{p}: in {what}, not a slide"))
            elif _slide_like(p):
                found.append((p, p.parent))
            else:
                problems.append((str(p), f"{p}: {unsupported_format(p.suffix.lower())}"))
        elif p.is_dir():
            slides, others, outputs, errors = _walk(p, excluded)
            for where, reason in errors:
                problems.append((where, f"{where}: {reason}"))
            if skipped is not None:
                skipped.extend((str(f), NOT_A_SLIDE) for f in others)
                skipped.extend((str(f), f"{what}: {done}") for f, what, done in outputs)
            if not slides and (own := [what for f, what, _ in outputs if resolved_path(f) == resolved_path(p)]):
                problems.append((str(p), f"{p}: {own[0]}, not a folder of slides"))
            elif not slides and not errors:
                extra = f"; {len(others)} other file{'s' if len(others) != 1 else ''} skipped" if others else ""
                if outputs:
                    extra += (f"; her2score's output: {outputs[0][0]}, {outputs[0][2]}"
                              + (f", and {len(outputs) - 1} more" if len(outputs) > 1 else ""))
                problems.append((str(p), f"{p}: folder holds no slides (looked for {', '.join(SLIDE_SUFFIXES)}{extra})"))
            found.extend((f, p) for f in slides)
        else:
            problems.append((str(p), f"{p}: not a file or folder"))
    unique, seen = [], set()
    for slide, root in found:
        key = resolved_path(slide)
        if key not in seen:
            seen.add(key)
            unique.append((slide, root))
    return unique, problems


def _walk(root: Path, excluded: list[Path]) -> tuple[list[Path], list[Path], list[tuple[Path, str, str]], list[tuple[str, str]]]:
    """Slides, other files, her2score's output folders (with _her2score_output's words and what was done: a batch's
    not searched, a slide's output files skipped, its other files and folders searched: an overlay is no slide) and
    listing errors under ``root``."""
    slides, others, outputs, errors = [], [], [], []

    def onerror(e: OSError) -> None:
        errors.append((e.filename or str(root), f"cannot list folder ({e.strerror or e})"))

    visited = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):  # a linked case folder too
        here = Path(dirpath)
        real = resolved_path(here)
        if real in visited:  # a link back up the tree, or a second link to one folder: listed once
            dirnames[:] = []
            continue
        visited.add(real)
        if found := _her2score_output(here, filenames):
            what, ours, evaluation = found
            if what == BATCH_OUTPUT:  # its slides' folders hold only outputs
                outputs.append((here, what, "not searched"))
                dirnames[:] = []
                continue
            # one slide's outputs, written beside the slide (write_outputs), or an evaluation's: its own files are no
            # slides, the rest are
            outputs.append((here, what, "its output files skipped"))
            if evaluation:  # its results/ holds the images' result.json files, nothing else
                dirnames[:] = [d for d in dirnames if d != "results"]
            filenames = [f for f in filenames if f not in ours]
        mrxs = {Path(f).stem for f in filenames if f.lower().endswith(".mrxs")}
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and d not in mrxs and not _inside(here / d, excluded))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            f = here / fn
            if _slide_like(f):
                slides.append(f)
            else:
                others.append(f)
    return sorted(slides), others, outputs, errors


def safe_name(relative: str) -> str:
    """A folder name for a slide's outputs that cannot leave the batch folder.

    Path separators become "__", anything but letters, digits, "." and "-" becomes "_" (unicode
    letters are kept, NFC-normalised), leading/trailing dots and underscores go (no "..", no hidden
    names), the result is at most MAX_NAME_BYTES UTF-8 bytes and never a batch file's own name.
    """
    text = unicodedata.normalize("NFC", relative).replace("\\", "/").replace(os.sep, "/")
    name = re.sub(r"[^\w.-]+", "_", text.replace("/", "__")).strip("._-")
    encoded = name.encode("utf-8")[:MAX_NAME_BYTES]
    name = encoded.decode("utf-8", "ignore").strip("._-")
    if not name or name.lower() in RESERVED_NAMES:
        name = f"slide_{name}" if name else "slide"
    return name


def plan_jobs(slides: list[tuple[Path, Path]], out: Path, config: ScoringConfig, *, mpp=None,
              regions: Path | None = None, previous: dict[str, str] | None = None,
              cnn_weights: str | None = None, cells_csv: bool = False, default_mpp: float | None = None,
              backend: str | None = None) -> list[Job]:
    """One Job per slide, with unique safe output folder names (a hash is added on collision).

    ``previous`` maps slides to the folder names an earlier run gave them: they keep them, and the
    folders of earlier slides not among ``slides`` are never given to another; nor is a folder in ``out`` holding
    another slide's outputs (_outputs_of: a result, or a failed slide's kept outputs, recorded in a manifest since
    lost, or of slides since gone), which only the folders a slide would newly take are read for.
    """
    previous = previous or {}
    annotations = _Annotations(slides)
    jobs = []
    these = {str(slide) for slide, _ in slides}
    used = {name.lower() for slide, name in previous.items() if slide not in these}
    names: dict[int, str] = {}
    for i, (slide, _) in enumerate(slides):
        old = previous.get(str(slide))
        if old and _is_safe_name(old) and old.lower() not in used:
            names[i] = old
            used.add(old.lower())
    for i, (slide, root) in enumerate(slides):
        if i not in names:
            rel = str(slide.relative_to(root)) if slide.is_relative_to(root) else slide.name
            name = safe_name(rel)
            if name.lower() in used or _outputs_of(out / name) not in (None, str(slide)):
                name = _hashed_name(name, slide)
            names[i] = name
            used.add(name.lower())
        region = _find_region(regions, slide, root, annotations) if regions else None
        jobs.append(Job(str(slide), names[i], str(out / names[i]), config, mpp, region, cnn_weights=cnn_weights,
                        cells_csv=cells_csv, default_mpp=default_mpp, backend=_forced(slide, backend)))
    return jobs


def _outputs_of(folder: Path) -> str | None:
    """The slide whose outputs ``folder`` holds, as its result.json (or a failed slide's, kept in PREVIOUS) names it;
    '' where one is there but names none it can read; None where it holds no finished outputs."""
    for result in (folder / OUTPUT_FILES[0], folder / PREVIOUS / OUTPUT_FILES[0]):
        try:
            if result.is_file():
                return str(json.loads(result.read_text(encoding="utf-8"))["slide"])
        except (ValueError, KeyError, TypeError):
            return ""
        except OSError:  # a folder this user may not enter (a disk's lost+found): none of ours
            return None
    return None


def _forced(slide: Path, backend: str | None) -> str | None:
    """``backend`` where it is not the reader ``slide`` chooses itself (slide.automatic_backend), else None: the same
    reader either way, so a slide scored without --backend is reused with it, and the other way round."""
    if backend is None:
        return None
    try:
        return None if backend == automatic_backend(slide) else backend
    except SlideError:  # no reader of its own (a FIFO among them): the one given says what is wrong
        return backend


def _hashed_name(name: str, slide: Path) -> str:
    """``name`` made unique by 8 hex digits of the slide's path."""
    return f"{name}-{hashlib.sha1(str(slide).encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def _is_safe_name(name: str) -> bool:
    """Whether ``name`` is one safe_name gives, or one made unique by _hashed_name (which may pass its byte limit)."""
    plain = re.fullmatch(r"(.+)-[0-9a-f]{8}", name)
    return name == safe_name(name) or plain is not None and plain[1] == safe_name(plain[1])


REGION_SUFFIXES = (".geojson", ".json", ".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
"""Suffixes (any case) of a slide's annotation file under --regions: QuPath GeoJSON, or a mask image."""


class _Annotations:
    """What _find_region looks among: each folder's entries by lower-case name (listed once; a folder, a pipe or a
    link to nothing among them, which load_region refuses by name), less the batch's slides, and the batch's slides
    by stem."""

    def __init__(self, slides: list[tuple[Path, Path]]):
        self.slides = {resolved_path(p) for p, _ in slides}
        self.by_stem: dict[str, list[Path]] = {}
        self.by_rel: dict[Path, list[Path]] = {}  # by path under its input folder, less its suffix: two inputs may
        for p, root in slides:                    # hold the same, and one folder a.png beside a.tif
            self.by_stem.setdefault(p.stem, []).append(p)
            self.by_rel.setdefault(_under(p, root).with_suffix(""), []).append(p)
        self._folders: dict[Path, dict[str, list[Path]]] = {}

    def files(self, folder: Path) -> dict[str, list[Path]]:
        """``folder``'s entries by lower-case name (F.geojson and f.GEOJSON are both f.geojson's)."""
        if folder not in self._folders:
            found: dict[str, list[Path]] = {}
            for f in sorted(folder.iterdir()) if folder.is_dir() else ():
                if resolved_path(f) not in self.slides:
                    found.setdefault(f.name.lower(), []).append(f)
            self._folders[folder] = found
        return self._folders[folder]


def _under(slide: Path, root: Path) -> Path:
    """``slide``'s path under its input folder ``root`` (its name for a slide given as a file)."""
    return slide.relative_to(root) if slide.is_relative_to(root) else Path(slide.name)


def _find_region(regions: Path, slide: Path, root: Path, annotations: _Annotations) -> str | None:
    """The annotation of ``slide`` under ``regions``: ``<its path under its root, less its suffix or not>.<suffix>``,
    else ``<its stem or name>.<suffix>`` in ``regions`` itself, where no other slide of the batch has that stem
    (BatchError: which one it belongs to is unknown). A slide file is never taken as an annotation. None (and
    a warning) where there is none."""
    rel = _under(slide, root)
    for folder, names in ((regions / rel.parent, (rel.stem, rel.name)), (regions, (slide.stem, slide.name))):
        found = annotations.files(folder)
        cands = list({f: (name, suffix, f) for name in dict.fromkeys(names) for suffix in REGION_SUFFIXES
                      for f in found.get(f"{name}{suffix}".lower(), [])}.values())
        if len(cands) > 1:  # which one was meant cannot be told: each would give another result
            raise BatchError(f"{slide}: {len(cands)} annotations name it in {folder} ({', '.join(str(f) for *_, f in cands)}): "
                             "keep the one to use")
        if cands:
            name, suffix, cand = cands[0]
            by_path = folder == regions / rel.parent and name in (rel.stem, rel.name)
            alike = annotations.by_rel[rel.with_suffix("")] if by_path else annotations.by_stem[slide.stem]
            if name == rel.name:  # <name with its suffix>.geojson names one slide
                alike = [p for p in alike if p.name == slide.name]
            same = [str(p) for p in alike if p != slide]
            if same:
                whole = name != rel.name and not any(p.name == slide.name for p in alike if p != slide)
                fix = ((f"name it after the slide's whole file name ({rel.name}{suffix}), or " if whole else "")
                       + "score those inputs in runs of their own, each with its --regions, or give one folder "
                         "above them as the input, their annotations in sub-folders as the slides are" if by_path else
                       f"put it where the slide is under its folder ({regions / rel.parent}/)")
                raise BatchError(f"{cand}: the annotation of which slide? {slide} and {', '.join(same)} share its "
                                 f"name; {fix}")
            return str(cand)
    near = sorted({str(f) for folder in (regions / rel.parent, regions) for key, fs in annotations.files(folder).items()
                   for f in fs if key.startswith(slide.stem.lower()) and f.suffix.lower() in REGION_SUFFIXES
                   and f.stem not in annotations.by_stem})  # case10.geojson is slide case10's, not case1's
    hint = f" ({', '.join(near)} {'is' if len(near) == 1 else 'are'} named like it: name one {slide.stem}<suffix> to use it)" if near else ""
    log.warning("%s: no annotation under %s%s; its tumour cells are detected", slide, regions, hint)
    return None


def _signature(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _fingerprint(path: str) -> tuple[list | None, str | None]:
    """A slide file's _signature and content_sample, None each where it cannot be read."""
    try:
        sig = _signature(path)
    except OSError:
        sig = None
    try:
        sample = content_sample(path)
    except OSError:
        sample = None
    return sig, sample


def _result_stamp(folder: Path) -> list | None:
    """(size, mtime ns) of ``folder``'s result.json: a rewrite changes it, a copy that keeps times (cp -a, rsync -a,
    a restored backup) does not; None: no result.json."""
    try:
        st = os.stat(folder / "result.json")
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


_weights_sha: dict[tuple, str] = {}


def _weights_sha256(path: str) -> str:
    """SHA-256 of a weights file's content (a reinstall that rewrites the same bytes keeps it), cached per signature."""
    from .cnn import _sha256_file

    key = (path, *_signature(path))
    if key not in _weights_sha:
        _weights_sha[key] = _sha256_file(Path(path))
    return _weights_sha[key]


# -- one slide --------------------------------------------------------------------------------------

def _empty_row(slide: str, name: str = "") -> dict:
    row = {c: "" for c in SUMMARY_COLUMNS}
    row.update(slide=slide, output=name)
    return row


def _error_message(job: Job, e: BaseException) -> str:
    ours = isinstance(e, (OSError, ValueError)) or type(e).__module__.startswith("her2score")
    message = str(e) if ours and str(e) else f"{type(e).__name__}: {e}"
    if isinstance(e, MemoryError) or "Insufficient memory" in message and type(e).__module__.startswith("cv2"):  # no words of its own
        message = (f"ran out of memory while scoring it ({'MemoryError' if isinstance(e, MemoryError) else 'OpenCV'}): "
                   "score it alone with --workers 1, or on a machine with more memory")
    if job.slide not in message:
        message = f"{job.slide}: {message}"
    return message


def _remove_outputs(out_dir: str, names: tuple[str, ...] = OUTPUT_FILES + OPTIONAL_OUTPUT_FILES) -> None:
    """Remove a slide's earlier outputs ``names`` (default: all), so no stale file sits beside an error row."""
    for name in names:
        try:
            os.unlink(os.path.join(out_dir, name))
        except OSError:
            pass


PREVIOUS = "previous"
"""The sub-folder of a slide's output folder where its finished outputs are kept when a later run fails to score it
again (another --mpp, a file since replaced by a broken one): never deleted by a failure."""


def _set_aside_outputs(out_dir: str) -> str | None:
    """A failed slide's outputs, so no stale file sits beside its error row: those a run finished (result.json is
    there: write_outputs removes it first and writes it last) are moved into PREVIOUS, in place of what it held,
    and its path returned; partial ones are removed (None). Interrupted or refused (PREVIOUS a file or a link,
    which is removed: no output of this tool), the files go back where they were."""
    if not os.path.isfile(os.path.join(out_dir, "result.json")):
        _remove_outputs(out_dir)
        return None
    kept = os.path.join(out_dir, PREVIOUS)
    staged = tempfile.mkdtemp(prefix=f".{PREVIOUS}.", dir=out_dir)  # filled, then renamed into place
    os.chmod(staged, 0o777 & ~current_umask())  # readable as the other outputs are, not mkdtemp's private 0700
    moved = []
    try:
        for name in (*OPTIONAL_OUTPUT_FILES, *OUTPUT_FILES[1:], OUTPUT_FILES[0]):  # result.json, the mark, last
            try:
                os.replace(os.path.join(out_dir, name), os.path.join(staged, name))
            except FileNotFoundError:
                continue
            moved.append(name)
        if os.path.isdir(kept) and not os.path.islink(kept):
            shutil.rmtree(kept)
        elif os.path.lexists(kept):
            os.unlink(kept)
        os.rename(staged, kept)
    except BaseException:
        for name in moved:  # result.json, the mark, back last
            os.replace(os.path.join(staged, name), os.path.join(out_dir, name))
        os.rmdir(staged)
        raise
    return kept


_models: dict = {}


def _load_cnn(weights: str):
    """The CNN for ``weights`` on ONNX Runtime, loaded once per process (and inherited by forked workers)
    and again when the file changes (its size or modification time: new weights written over it)."""
    try:
        st = os.stat(weights)
        key = (weights, st.st_size, st.st_mtime_ns)
    except OSError:
        key = (weights,)  # missing: load_onnx_model says so
    if key not in _models:
        from .cnn import load_onnx_model

        for old in [k for k in _models if k[0] == weights]:
            del _models[old]
        _models[key] = load_onnx_model(weights)
    return _models[key]


def _preload_cnn(weights: str) -> None:
    """Load the CNN in the batch process before its workers fork. Weights without their exported
    graph are exported with torch here: torch run in a forked child hangs for good when the parent
    has used torch's OpenMP threads (a notebook that trained a model, then scores a batch). A file
    that fails to load is left to the workers, which report it per slide."""
    from .cnn import ModelError

    try:
        _load_cnn(weights)
    except (ModelError, OSError, ValueError):  # each slide's row will say why
        pass


def process_slide(job: Job, *, stopped: Callable[[], bool] | None = None) -> dict:
    """Score one slide and write its outputs. Failures become an error row, which for a full, over-quota or
    read-only output folder also carries ``stop`` (the batch stops: every slide after it would fail alike); only a
    tile or output worker's death is raised (BrokenProcessPool: _execute runs the slide again, alone). Where
    ``stopped()`` says the batch has stopped once the slide is scored, nothing is written (an error row says so)."""
    row = _empty_row(job.slide, job.name)
    row["fingerprint"] = _fingerprint(job.slide)  # before reading: a file replaced while scored is scored again
    try:
        out_dir = Path(job.out_dir)
        if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
            raise OSError(f"output folder {out_dir} is a link or a file; refusing to write outside --out")
        cnn = None
        if job.cnn_weights:
            from .cnn import use_one_thread

            cnn = _load_cnn(job.cnn_weights)
            use_one_thread()  # run_batch runs this in worker processes (local pool or Dask): torch, if loaded, one thread
        analysis = analyse_slide(job.slide, config=job.config, mpp=job.mpp, region=job.region,
                                 workers=job.tile_workers, cnn=cnn, default_mpp=job.default_mpp, backend=job.backend)
        if stopped is not None and stopped():  # what an earlier run finished is left as it is, too
            row.update(status="error", error=f"{job.slide}: the batch stopped before its outputs were written", output="")
            return row
        try:
            write_outputs(analysis, out_dir, cells_csv=job.cells_csv, workers=job.tile_workers)
        except OSError as e:  # the slide was read and scored: the fault is the output folder's, which says so
            reason = f"{out_dir}: cannot write the outputs ({e.strerror or e})"
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # every slide after it would fail alike
                _remove_outputs(job.out_dir)
                row.update(status="error", error=f"{job.slide}: {reason}", output="",
                           stop=f"{reason}; stopped. Finished slides are kept: make room and run the same command again "
                                "to resume")
                return row
            raise OutputError(reason) from None
        shutil.rmtree(out_dir / PREVIOUS, ignore_errors=True)  # scored again: what a failure kept is superseded
        r = analysis.result
        row.update(
            status="ok", score=r.score or "", qc_status=r.qc_status, level=r.level,
            classical_score=r.classical_score or "", cnn_score=r.cnn_score or "",
            confidence="" if r.confidence is None else r.confidence, h_score="" if r.h_score is None else r.h_score,
            tumour_cells=r.tumour_cells,
            qc_passed=r.qc_passed, qc=";".join(f"{q.code}:{q.severity}" for q in r.qc), flags=";".join(r.flags),
            guideline=r.guideline, specimen=r.specimen, region=r.region,
            default_mpp_used=r.mpp_origin == "default",  # for the manifest's key (record), no column
            **{f"pct_{c}": r.percentages.get(c, "") for c in CATEGORIES},
        )
    except BrokenProcessPool:  # a tile or output worker of this slide died (the OOM killer, a crashing reader):
        raise  # as when the process scoring it dies, _execute runs it again alone (one tile worker), Dask makes an error row
    except Exception as e:  # one bad slide never stops the batch
        log.debug("slide failed: %s\n%s", job.slide, traceback.format_exc())
        refused = isinstance(e, (NotHerIhcError, WrongStainError, NoTissueError, NuclearStainError))
        kept = "" if stopped is not None and stopped() else _kept_words(job)  # after a stop, --out is left alone
        row.update(status="refused" if refused else "error", error=_error_message(job, e) + kept)
        row["output"] = ""  # no outputs to name
    return row


def _kept_words(job: Job) -> str:
    """Set a failed slide's outputs aside (_set_aside_outputs); the words its error gets for those kept."""
    if not job.out_dir or Path(job.out_dir).is_symlink():
        return ""
    try:
        kept = _set_aside_outputs(job.out_dir)
    except OSError as e:
        return f"; its earlier outputs could not be set aside ({e.strerror or e})"
    return f"; the outputs an earlier run finished are kept in {kept}" if kept else ""


def _crash_row(job: Job, e: BaseException) -> dict:
    row = _empty_row(job.slide, job.name)
    row.update(status="error", error=f"{job.slide}: the process scoring this slide died ({type(e).__name__}); "
                                     "the file may crash the image reader or need more memory than is available"
                                     + _kept_words(job))
    row["output"] = ""
    return row


def _settings(job: Job) -> dict:
    """The settings one folder must not mix: the scoring configuration, the CNN weights' content and the tool's
    version (another version may measure otherwise and write other columns: 0.4 split weak-to-moderate
    partial cells from faint ones)."""
    return {"guideline": job.config.guideline, "specimen": job.config.specimen,
            "model_sha256": _weights_sha256(job.cnn_weights)[:16] if job.cnn_weights else "none (classical only)",
            "other settings": _settings_hash(job.config), "version": __version__}


def _other_config(config: ScoringConfig) -> dict:
    """The scoring settings but guideline and specimen."""
    other = asdict(config)
    del other["guideline"], other["specimen"]
    return other


def _settings_hash(config: ScoringConfig) -> str:
    """_settings' "other settings": a hash of _other_config."""
    return hashlib.sha1(json.dumps(_other_config(config), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _other_settings(config: ScoringConfig) -> dict:
    """_other_config flat, as JSON holds it: a nested setting (thresholds, the tumour rule) named
    'thresholds.min_completeness', to name what changed between runs."""
    def flat(d: dict, head: str = "") -> dict:
        return {k: v for key, value in d.items()
                for k, v in (flat(value, f"{head}{key}.").items() if isinstance(value, dict) else [(f"{head}{key}", value)])}
    return json.loads(json.dumps(flat(_other_config(config)), default=str))


def _config_key(job: Job, used_default: bool = False) -> str:
    """A slide's settings (the tool's version among them) plus what is its own (µm/px given, the default µm/px where
    ``used_default``, region file, reader given): equal keys score alike. A slide whose file gives its µm/px keeps its
    key whatever --default-mpp is, and one read by the reader its file chooses (plan_jobs: no ``backend`` then) the key
    it had before --backend was."""
    try:
        region = [_signature(job.region)] if job.region else []
    except OSError:  # a link to nothing: the slide's error row names it (load_region)
        region = [None]
    own = [job.mpp, job.default_mpp if used_default else None, job.region] + region + ([f"backend {job.backend}"] if job.backend else [])
    blob = json.dumps([_settings(job), *own], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


# -- manifest, summary, lock ------------------------------------------------------------------------

class _Manifest:
    """The batch's record of each slide's state, rewritten atomically (when: SAVE_COST_SHARE)."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / MANIFEST
        self.entries: dict[str, dict] = {}
        self.skipped: list[list[str]] = []
        self.moved: list[str] = []  # slides respelled from a gone path: their result.json names them at the next save
        self.configs: dict[str, dict] = {}  # the settings behind each "other settings" hash, to name what changed
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                entries = data["slides"]
                if isinstance(entries, dict) and all(isinstance(e, dict) and isinstance(e.get("row"), dict)
                                                     for e in entries.values()):
                    self.entries = entries
                    self.configs = {k: v for k, v in data.get("configs", {}).items() if isinstance(v, dict)}
                else:
                    raise TypeError("bad entries")
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("%s is unreadable; starting a fresh manifest (finished slides are scored again)", self.path)

    def names(self) -> dict[str, str]:
        """Each slide's output folder name: where its outputs are, or (``folder``) were kept after a failure."""
        return {s: name for s, e in self.entries.items() if (name := e["row"].get("output") or e.get("folder"))}

    def done(self, job: Job) -> bool:
        e = self.entries.get(job.slide)
        if (not e or e.get("state") != "done" or e.get("config") != _config_key(job, e.get("default_mpp_used", False))
                or e["row"].get("output") != job.name):
            return False
        recorded = e.get("sample")  # None: not read when recorded (or an older manifest)
        try:  # name, size and time alike are no proof: two slides of one size swapped by mv (content_sample)
            if e.get("signature") != _signature(job.slide) or recorded not in (None, content_sample(job.slide)):
                return False
        except OSError:
            return False
        wanted = OUTPUT_FILES + (OPTIONAL_OUTPUT_FILES if job.cells_csv else ())
        if not all((self.out / job.name / f).is_file() for f in wanted):
            return False
        # the result.json recorded, not one a later run killed before its record rewrote (an older manifest: unchecked)
        return "result" not in e or e["result"] == _result_stamp(self.out / job.name)

    def respell(self, slides: list[Path]) -> None:
        """Give each of ``slides`` the entry of an earlier run that reached the same file by another spelling (a
        linked folder), or reached a file since moved there (its folder renamed, moved or mounted elsewhere: the
        old path gone, one entry of its name, size, modification time and content sample), under the path given
        now: reused, listed once, its annotation found under its path now; a moved file's result.json names it
        there from the next save (a run refused before one changes nothing)."""
        given = {str(slide) for slide in slides}
        spelled = {resolved_path(s): s for s in self.entries if s not in given and os.path.lexists(s)}
        gone: dict[tuple, list[str]] = {}
        for s, e in self.entries.items():
            if s not in given and e.get("signature") and not os.path.lexists(s):
                gone.setdefault((Path(s).name, *e["signature"]), []).append(s)
        for slide in slides:
            if str(slide) in self.entries:
                continue
            if (old := spelled.pop(resolved_path(slide), None)) is None:
                try:
                    olds = gone.pop((slide.name, *_signature(str(slide))), [])
                    if len(olds) != 1:  # none, or several files alike: which one moved here is unknown
                        continue
                    sample = content_sample(str(slide))
                except OSError:
                    continue
                old = olds[0]
                if self.entries[old].get("sample") != sample:  # name, size and time alike are no proof (tar, cp -p)
                    continue
                self.moved.append(str(slide))
            entry = self.entries.pop(old)
            self.entries[str(slide)] = {**entry, "row": {**entry["row"], "slide": str(slide)}}

    def _renamed_result(self, entry: dict, slide: str) -> None:
        """Rewrite the result.json of ``entry`` (its own, unchanged since recorded) to name ``slide``, where it moved."""
        folder = self.out / entry["row"].get("output", "")
        if entry.get("state") != "done" or "result" not in entry or entry["result"] != _result_stamp(folder):
            return
        try:
            atomic_write(folder / "result.json", replace(SlideResult.read(folder / "result.json"), slide=slide).to_json())
        except (OSError, ValueError):
            return
        entry["result"] = _result_stamp(folder)

    def record(self, job: Job, row: dict) -> None:
        """Enter ``row``, the slide's summary row, taking from it process_slide's ``default_mpp_used`` and
        ``fingerprint`` (the file as it was before it was read; no columns)."""
        used_default = row.pop("default_mpp_used", False)
        sig, sample = row.pop("fingerprint", None) or _fingerprint(job.slide)
        done = row["status"] == "ok"
        if job.name:
            self.configs[_settings_hash(job.config)] = _other_settings(job.config)
        self.entries[job.slide] = {"state": "done" if done else "error", "signature": sig, "sample": sample, "folder": job.name,
                                   "config": _config_key(job, used_default), "default_mpp_used": used_default,
                                   "settings": _settings(job) if job.name else None,
                                   "row": row, **({"result": _result_stamp(self.out / job.name)} if done else {})}

    def save(self) -> None:
        for slide in self.moved:
            self._renamed_result(self.entries[slide], slide)
        self.moved = []
        used = {(e.get("settings") or {}).get("other settings") for e in self.entries.values()}
        atomic_write(self.path, json.dumps({"version": 1, "slides": self.entries, "skipped": self.skipped,
                                            "configs": {k: v for k, v in self.configs.items() if k in used}},
                                           indent=1, sort_keys=True, ensure_ascii=False))


def _summary_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, SUMMARY_COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in sorted(rows, key=lambda r: r["slide"]):
        w.writerow(row)
    return buf.getvalue()


_HELD_LOCK_FDS: set[int] = set()


def _drop_locks_in_child() -> None:
    """After fork: point the child's copies of held lock descriptors at /dev/null, so that a child
    outliving its batch (killed with SIGKILL) never keeps the batch folder locked."""
    for fd in list(_HELD_LOCK_FDS):
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, fd)
            os.close(null)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def _lock(out: Path):
    try:
        fh = open(out / LOCK, "a+", encoding="utf-8")
    except OSError as e:
        raise BatchError(f"{out}: cannot create the lock file ({e.strerror or e})") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise BatchError(f"{out}: another her2score batch{who} is writing to this folder; "
                         "wait for it or choose another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    _HELD_LOCK_FDS.add(fh.fileno())
    return fh


def _unlock(fh) -> None:
    _HELD_LOCK_FDS.discard(fh.fileno())
    fh.close()


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock within (BatchError where another her2score run holds it)."""
    fh = _lock(out)
    try:
        yield
    finally:
        _unlock(fh)


def _clean_temp_files(out: Path) -> None:
    """Remove temporary files a killed batch left in ``out`` and its slide folders."""
    removed = remove_stale_temp_files(out, (MANIFEST, SUMMARY))
    try:
        subdirs = [e.path for e in os.scandir(out) if e.is_dir(follow_symlinks=False)]
    except OSError:
        subdirs = []
    for d in subdirs:
        removed += remove_stale_temp_files(d)
    if removed:
        log.info("removed %d temporary files left by an interrupted batch", len(removed))


# -- the batch --------------------------------------------------------------------------------------

def run_batch(
    inputs: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    *,
    config: ScoringConfig = ScoringConfig(),
    mpp: float | None = None,
    regions: str | os.PathLike | None = None,
    workers: int = 1,
    scheduler: str | None = None,
    cnn_weights: str | os.PathLike | None = None,
    cells_csv: bool = False,
    progress: Callable[[dict, int, int], None] | None = None,
    default_mpp: float | None = None,
    backend: str | None = None,
) -> BatchRows:
    """Score every slide under ``inputs`` into ``out``; returns the summary rows (summary.csv): every
    slide scored into ``out`` (by this run or an earlier one with the same settings) and this run's
    failures, with this run's counts (BatchRows.scored, .reused, .failed).

    ``cnn_weights``: a CNN weights file (``her2score.cnn.default_weights_path()``) whose tile
    probabilities are fused with the guideline score; None scores with the classical features only.
    ``cells_csv``: also write each slide's cells.csv beside cells.parquet (a slide reused from an
    earlier run without it is scored again; a slide scored without it loses an earlier cells.csv).
    ``mpp`` (µm/px) overrides every file's; ``default_mpp`` is used where a file's metadata gives none.
    ``backend`` reads every slide with one reader (slide.open_slide's; None: the one each file chooses); a slide it
    cannot open gets an error row.

    Slides are named by absolute path in the rows, the manifest and each result.json.

    Slides already done with the same settings (and unchanged files) are skipped, so a killed batch
    resumes where it stopped; slides that failed are tried again; slides done with other settings are
    scored again. Raises BatchError, before scoring anything, when ``out`` holds slides scored with
    other settings that are not among the inputs (one folder never mixes settings). ``workers`` processes score slides
    side by side (or the tiles of a single slide); ``scheduler`` sends slides to a Dask cluster: an
    address, or 'local' for a LocalCluster. ``progress(row, done, total)`` is called after each slide.
    Raises BatchError when the batch cannot start (output folder unusable or locked by another batch), or, before
    anything is made or written, when the inputs hold no slide (an empty folder, a file that is no slide format).
    """
    # absolute paths: the manifest survives a change of working folder, and Dask workers (running
    # in folders of their own) and local workers see the same files and write the same results
    out = Path(os.path.abspath(out))
    inputs = [os.path.abspath(i) for i in inputs]
    regions = os.path.abspath(regions) if regions else None
    workers, backend = checked_workers(workers), checked_backend(backend)
    if scheduler and scheduler != "local":
        _check_address(scheduler)
    if out.exists() and not out.is_dir():
        raise BatchError(f"{out}: --out exists and is not a folder")
    slides, problems, skipped = _slides_to_score(inputs, out)
    made = [p for p in (out, *out.parents) if not p.exists()]  # the folders mkdir makes, deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BatchError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    with output_lock(out):
        try:
            return _run_locked(out, slides, problems, skipped, config, mpp, regions, workers, scheduler, cnn_weights,
                               cells_csv, progress, default_mpp, backend)
        except BatchError:
            left = {p.name for p in out.iterdir()}
            if made and left <= {LOCK, MANIFEST, SUMMARY}:  # refused before any slide (a scheduler not reached): no folder left
                for name in left:
                    (out / name).unlink()
                for folder in made:
                    try:
                        folder.rmdir()
                    except OSError:  # another run's folder beside it since: the rest stay
                        break
            raise


def _slides_to_score(inputs: list[str], out: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]],
                                                             list[tuple[str, str]]]:
    """discover's slides under ``inputs`` (``out`` left out), its problems and what it skipped (warned of); BatchError
    naming each input and why, where they hold no slide: a usage error, not a batch of error rows."""
    skipped: list[tuple[str, str]] = []
    slides, problems = discover(inputs, exclude=[out], skipped=skipped)
    if not slides:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BatchError(f"no slide to score in the inputs given: {'; '.join(why for _, why in problems[:3])}{more}"
                         if problems else "no inputs given")
    unexpected = [p for p, why in skipped if why == NOT_A_SLIDE and Path(p).suffix.lower() not in SIDECAR_SUFFIXES]
    if unexpected:
        names = ", ".join(Path(p).name for p in unexpected[:5]) + (", ..." if len(unexpected) > 5 else "")
        what = "file that is not a slide" if len(unexpected) == 1 else "files that are not slides"
        log.warning("skipped %d %s: %s", len(unexpected), what, names)
    if outputs := [f"{p} ({why})" for p, why in skipped if why != NOT_A_SLIDE]:
        log.warning("left out as her2score's own output: %s", "; ".join(outputs[:5]) + ("; ..." if len(outputs) > 5 else ""))
    return slides, problems, skipped


def _run_locked(out: Path, slides: list[tuple[Path, Path]], problems: list[tuple[str, str]], skipped: list[tuple[str, str]],
                config: ScoringConfig, mpp: float | None, regions: str | None, workers: int, scheduler: str | None,
                cnn_weights: str | os.PathLike | None, cells_csv: bool, progress: Callable[[dict, int, int], None] | None,
                default_mpp: float | None, backend: str | None) -> BatchRows:
    """run_batch's work on discover's ``slides`` (at least one), ``problems`` and ``skipped``, with ``out`` made and locked."""
    _clean_temp_files(out)
    manifest = _Manifest(out)
    manifest.skipped = [list(s) for s in skipped]
    manifest.respell([slide for slide, _ in slides])
    jobs = plan_jobs(slides, out, config, mpp=mpp, regions=Path(regions) if regions else None,
                     previous=manifest.names(), cnn_weights=os.path.abspath(cnn_weights) if cnn_weights else None,
                     cells_csv=cells_csv, default_mpp=default_mpp, backend=backend)
    this_run = {j.slide for j in jobs} | {p for p, _ in problems}
    # an earlier run's refused or failed slides stay listed while they exist, as they were (no results); a file given
    # that was no slide or image format at all (report.docx) is no slide in --out
    earlier = {s: e for s, e in manifest.entries.items() if s not in this_run and (
               (e.get("state") == "error" and os.path.lexists(s) and _slide_like(Path(s)))
               or (e.get("state") == "done" and (out / e["row"].get("output", "") / "result.json").is_file()))}
    _refuse_mixed_settings(out, {s: e for s, e in earlier.items() if e.get("state") == "done"}, _settings(jobs[0]),
                           manifest.configs, _other_settings(jobs[0].config))
    manifest.entries = {s: e for s, e in manifest.entries.items() if s in this_run or s in earlier}
    for path, reason in problems:
        row = _empty_row(path)
        row.update(status="error", error=reason)
        manifest.record(Job(path, "", "", config), row)

    last_end = last_cost = 0.0  # when the last write of manifest and summary ended, and what it took (monotonic s)

    def save() -> list[dict]:
        nonlocal last_end, last_cost
        start = time.monotonic()
        rows = _write_progress(out, manifest)
        last_end = time.monotonic()
        last_cost = last_end - start
        return rows

    todo = [j for j in jobs if not manifest.done(j)]
    total, done = len(jobs), len(jobs) - len(todo)
    if scheduler is None and workers > 1 and len(todo) < workers:
        todo = [replace(j, tile_workers=workers) for j in todo]
    rows = save()
    scored = failed = refused = unscored = unsaved = 0
    with ExitStack() as cluster:  # a Dask client and cluster, closed after the last write below
        finished = _execute(todo, workers, scheduler, cluster)
        try:
            for job, row in finished:
                if stop := row.pop("stop", None):  # the output folder full: the slide is left for the next run
                    raise BatchError(stop)
                manifest.record(job, row)
                unsaved += 1
                if _save_due(time.monotonic() - last_end, last_cost):
                    unsaved = 0  # a failed write is not tried again below
                    rows = save()
                done += 1
                scored, failed = scored + (row["status"] == "ok"), failed + (row["status"] != "ok")
                refused, unscored = refused + (row["status"] == "refused"), unscored + (row["status"] == "ok" and not row["score"])
                if progress:
                    progress(row, done, total)
        finally:  # the end, an error, Ctrl-C, SIGTERM or SIGHUP (see cli): what finished is recorded, then the workers stop
            try:
                if unsaved:
                    with signals_held():  # a SIGTERM now lands after the rewrite, not between its two files
                        rows = save()
            finally:
                finished.close()
    return BatchRows(rows, scored=scored, reused=len(jobs) - len(todo), failed=failed + len(problems), inputs=this_run,
                     refused=refused, unscored=unscored)


def _write_progress(out: Path, manifest: "_Manifest") -> list[dict]:
    """Rewrite ``out``'s manifest.json and summary.csv, each whole and atomically; the summary's rows."""
    rows = sorted((e["row"] for e in manifest.entries.values()), key=lambda r: r["slide"])
    try:
        manifest.save()
        atomic_write(out / SUMMARY, _summary_csv(rows))
    except OSError as e:
        raise BatchError(f"{out}: cannot record the batch's progress ({e.strerror or e}); stopped. "
                         "Finished slides are kept: run the same command again to resume") from None
    return rows


SAVE_COST_SHARE = 0.1
"""Most of a batch's time that rewriting manifest.json and summary.csv may take. Each rewrite is whole
(atomic), so it grows with the batch: about 7 ms at 100 slides, 70 ms at 1,000, 0.66 s at 10,000
(benchmarks/batch_bookkeeping.py). A rewrite that takes under SAVE_ALWAYS_UNDER_S is made after every
finished slide; a slower one once the time since the last is at least its cost / SAVE_COST_SHARE.
Always at the end, and when the batch stops on an error, Ctrl-C, SIGTERM or SIGHUP."""

SAVE_ALWAYS_UNDER_S = 0.05
"""A rewrite this quick (seconds; a batch of up to several hundred slides) is made after every slide."""


def _save_due(since_last_s: float, last_cost_s: float) -> bool:
    """Whether to rewrite the batch's manifest and summary now, ``since_last_s`` seconds after the last
    rewrite, which took ``last_cost_s`` (see SAVE_COST_SHARE)."""
    return last_cost_s < SAVE_ALWAYS_UNDER_S or since_last_s * SAVE_COST_SHARE >= last_cost_s


def _refuse_mixed_settings(out: Path, earlier: dict[str, dict], current: dict, configs: dict[str, dict],
                           current_other: dict) -> None:
    """BatchError when slides scored earlier into ``out`` (and not among this run's inputs) used other settings, naming
    each setting that differs (``configs``: the manifest's settings behind each hash; ``current_other``: this run's)."""
    other = {s: e.get("settings") or {} for s, e in earlier.items() if (e.get("settings") or {}) != current}
    if not other:
        return
    first = next(iter(other.values()))
    diffs = []
    for k, v in current.items():
        if first.get(k) == v:
            continue
        if k == "other settings" and (then := configs.get(first.get(k))) is not None:
            diffs += [f"{name} {then.get(name, 'unset')} there, {current_other.get(name, 'unset')} now"
                      for name in sorted({*then, *current_other}) if then.get(name) != current_other.get(name)]
        else:
            diffs.append(f"{k} {first.get(k, 'unknown')} there, {v} now")
    names = ", ".join(Path(s).name for s in sorted(other)[:3]) + (", ..." if len(other) > 3 else "")
    gone = [s for s in other if not os.path.lexists(s)]
    fix = ("give those slides as inputs too (they are scored again), or choose another --out" if not gone else
           f"{len(gone)} of them no longer exist{'s' if len(gone) == 1 else ''} ({', '.join(sorted(gone)[:2])}"
           f"{', ...' if len(gone) > 2 else ''}): remove {'its' if len(gone) == 1 else 'their'} output folder"
           f"{'' if len(gone) == 1 else 's'} from {out} and give the others as inputs too, or choose another --out")
    raise BatchError(f"{out}: holds {len(other)} slide{'s' if len(other) != 1 else ''} ({names}) scored with other "
                     f"settings ({'; '.join(diffs)}); one folder never mixes settings: {fix}")


def _pool(n: int) -> AbstractContextManager[ProcessPoolExecutor]:
    """``n`` slide worker processes, shut down at the end waiting for their slides. When the batch stops
    early (an error, Ctrl-C, SIGTERM, SIGHUP, or the caller closing the generator that uses them), the caller has
    recorded what finished, and the slides still running are stopped: the next run scores them again."""
    return worker_pool(n, die_with_parent, stop_on_error=True)


def _execute(jobs: list[Job], workers: int, scheduler: str | None, cluster: ExitStack):
    """Yield (job, row) as slides finish: in child processes (at most ``workers`` at a time), or on Dask
    (its client and any local cluster are entered into ``cluster``, for the caller to close).

    If a child dies, or a tile worker of the slide it scores, the slides it may have been scoring are run again
    one by one, each in a fresh process scoring its tiles itself; the one that kills its process again gets an
    error row.
    """
    if not jobs:
        return
    if scheduler:
        yield from _execute_dask(jobs, workers, scheduler, cluster)
        return
    n = 1 if jobs[0].tile_workers > 1 else max(1, min(workers, len(jobs)))
    if jobs[0].cnn_weights:  # loaded here, so the workers inherit it and never run torch (see _preload_cnn)
        _preload_cnn(jobs[0].cnn_weights)
    pending, suspects = deque(jobs), deque()
    while pending or suspects:
        if suspects:
            job = suspects.popleft()
            with _pool(1) as pool:  # its tiles in the one process too: the least memory (the same outputs)
                try:
                    row = result_of(pool.submit(process_slide, replace(job, tile_workers=1)))
                except BrokenProcessPool as e:
                    row = _crash_row(job, e)
            yield job, row
            continue
        with _pool(n) as pool:
            inflight: dict = {}
            broken = False
            while (pending or inflight) and not broken:
                while pending and len(inflight) < n:
                    try:
                        future = pool.submit(process_slide, pending[0])
                    except BrokenProcessPool:  # a worker died while slides were still being handed out
                        broken = True
                        break
                    inflight[future] = pending.popleft()
                if broken:
                    break
                finished = wait_first(inflight)
                for f in sorted(finished, key=lambda f: inflight[f].slide):
                    job = inflight.pop(f)
                    if isinstance(f.exception(), BrokenProcessPool):
                        suspects.append(job)
                        broken = True
                    else:
                        yield job, f.result()
            if broken:
                log.warning("a worker process died; re-running its slides one at a time")
                for f, job in sorted(inflight.items(), key=lambda fj: fj[1].slide):
                    if f.done() and f.exception() is None:
                        yield job, f.result()
                    else:
                        suspects.append(job)


def _check_address(scheduler: str) -> None:
    """BatchError unless ``scheduler`` is a network address a Dask client can be given (tcp, tls, ws, wss or ucx,
    with a host and a port), checked before anything is written; whether a scheduler answers there is known only
    on connecting."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        protocol, location = parse_address(scheduler)
        if protocol not in ("tcp", "tls", "ws", "wss", "ucx"):  # http: a dashboard's address; inproc: no other process
            raise ValueError(f"{protocol}:// is no scheduler protocol")
        parse_host_port(location)
    except ValueError as e:
        raise BatchError(f"--scheduler {scheduler!r} is not a Dask scheduler address ({e}); give e.g. "
                         "tcp://host:8786, or 'local'") from None


def _process_on_cluster(job: Job, stop: str) -> dict:
    """process_slide on a Dask worker for a batch that may stop early (Ctrl-C, SIGTERM: its Event named ``stop`` set):
    a slide begun after that, or scored after it, writes nothing, as the batch may have ended and its folder be
    unlocked (a running task cannot be interrupted)."""
    from dask.distributed import Event

    event = Event(stop)

    def stopped() -> bool:
        try:
            return event.is_set()
        except Exception:  # the scheduler not answering: write nothing rather than risk an unlocked --out
            return True
    if stopped():
        return {**_empty_row(job.slide), "status": "error", "error": f"{job.slide}: the batch stopped before it was scored"}
    return process_slide(job, stopped=stopped)


STOP_WAIT_S = 10.0
"""How long a Dask batch that stops early waits for the slides its workers are writing (seconds): one whose outputs
were begun before the stop finishes them, in that time, before the batch's folder is unlocked."""


def _execute_dask(jobs: list[Job], workers: int, scheduler: str, cluster: ExitStack):
    from dask.distributed import Client, Event, LocalCluster, as_completed as dask_completed, wait

    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # Dask's own INFO lines only with -v, as ours
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler == "local":
        scheduler = cluster.enter_context(LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                                                       dashboard_address=":0"))
    try:
        client = cluster.enter_context(Client(scheduler))
    except (OSError, TimeoutError) as e:
        raise BatchError(f"cannot reach the Dask scheduler {scheduler}: {e}") from None
    stop = Event(f"her2score-stop-{uuid.uuid4().hex}", client=client)
    futures = client.map(_process_on_cluster, jobs, stop=stop.name, pure=False)
    by_key = {f.key: j for f, j in zip(futures, jobs)}
    finished = dask_completed(futures)
    try:
        with signals_held():  # raised between polls, never inside the client's own locking
            while not finished.is_empty():
                ready = finished.next_batch(block=False)
                pause(0 if ready else POLL_S)  # a signal held is raised between results too, not only while none come
                for f in ready:
                    try:
                        row = f.result()
                    except Exception as e:  # a worker lost or killed while scoring
                        row = _crash_row(by_key[f.key], e)
                    yield by_key[f.key], row
    finally:
        if not finished.is_empty():  # stopped early: no slide writes once the folder may be unlocked
            try:
                stop.set()
                wait(futures, timeout=STOP_WAIT_S)  # those not begun end at once; those writing, within seconds
            except TimeoutError:
                log.warning("slides still being scored on the cluster after the stop will write nothing")
            except Exception as e:  # the scheduler gone: its workers cannot be told
                log.warning("could not tell the cluster's workers to stop (%s): slides running there may still write "
                            "their outputs", e)
