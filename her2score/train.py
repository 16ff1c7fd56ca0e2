"""Training of the tile CNN (:mod:`her2score.cnn`) on labelled fields, deterministic and CPU-friendly.

Sources: generated synthetic fields (:func:`synthetic_images`), a folder with one sub-folder per class
(:func:`folder_images`) or a CSV of ``path,label`` (:func:`csv_images`). Every image is read at the
model's µm/px; its label is the label of every patch cut from it (weak labels: a 2+ field also holds
unstained and faint cells, so patch labels are noisy by construction and label smoothing is used). An image
that scoring would refuse before reading its cells (imagecheck.check_image: H&E, another chromogen, no
counterstain, an implausible µm/px) is refused, naming the file; nuclear DAB (Ki67, ER, PR), which only the
cells show, is not looked for.

Stain augmentation happens in optical-density space: each patch is deconvolved with the default
H-DAB vectors into stain amounts, the haematoxylin and DAB vectors are rotated by random angles
(normal, ``stain_angle_deg`` s.d., bounded at twice that) and the stain amounts scaled (log-normal,
haematoxylin ``h_scale_sd``, DAB ``dab_scale_sd`` -- kept small because DAB intensity *is* the
label), and the patch is re-rendered by Beer-Lambert with a random background I0, sensor noise and
8-bit quantisation, then deconvolved again with the default vectors, as the pipeline does at
inference (but for a slide whose stains lean so far that it deconvolves with the slide's own: see
pipeline.analyse_slide). Flips and 90-degree rotations are added. Validation patches get one fixed perturbation
each (seeded), so early stopping rewards stain robustness.

Threads: one torch thread by default. On a shared 2-core machine two OpenMP threads that spin at
every barrier were measured 7x slower per step than one (0.18 s vs 1.22 s wall for a 32-patch step
under a load average of 10); on an idle machine ``threads=2`` can be faster.

Determinism: one seed drives the split, patch sampling, augmentation and torch initialisation;
torch deterministic algorithms, no worker processes in data loading. Same seed, same data, same
torch build and thread count -> the same weights.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cnn import CLASSES, INPUT_CHANNELS, TISSUE_OD, WeightsRecord, build_network, count_parameters, save_model, weights_path
from .files import atomic_write, content_sample
from .labels import class_folder_files, parse_score, read_csv_rows, row_label
from .stain import H_DAB, estimate_background, optical_density
from .workers import die_with_parent, result_of, worker_pool

__all__ = [
    "LabelledImage",
    "TrainConfig",
    "TrainResult",
    "synthetic_images",
    "folder_images",
    "csv_images",
    "train",
    "check_target",
]

log = logging.getLogger(__name__)

MAX_IMAGE_PX = 8192 * 8192
"""Largest training image (at the model's µm/px); larger slides should be cut into labelled fields."""


@dataclass(frozen=True, eq=False)
class LabelledImage:
    """One training image: RGB uint8 at the model's µm/px, its score, background I0 and origin."""

    rgb: np.ndarray
    label: str
    source: str
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)


# --------------------------------------------------------------------------------------- sources

def _synthetic_one(args) -> LabelledImage:
    from .synthetic import Confounders, generate_field

    score, seed, size_px, mpp, stain_jitter, gastric, border_od = args
    f = generate_field(score, seed=seed, size_px=size_px, mpp=mpp, stain_jitter=stain_jitter, gastric=gastric,
                       confounders=Confounders(border_od=border_od))
    return LabelledImage(f.image, score, f"synthetic:{score}:seed={seed}{':gastric' if gastric else ''}:border_od={border_od:.4f}",
                         estimate_background(f.image))


def check_synthetic(n_per_class: int, stain_jitter: float = 0.0, border_od_max: float = 0.0) -> None:
    """ValueError unless synthetic_images' settings hold: ``n_per_class`` at least 1, ``stain_jitter`` 0-30 degrees,
    ``border_od_max`` 0-0.2 OD."""
    from .synthetic import MAX_STAIN_JITTER_DEG

    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if not 0 <= stain_jitter <= MAX_STAIN_JITTER_DEG:
        raise ValueError(f"stain_jitter must be 0-{MAX_STAIN_JITTER_DEG:g} degrees (s.d. of the stain vectors' turn), "
                         f"got {stain_jitter}")
    if not 0 <= border_od_max <= 0.2:
        raise ValueError(f"border_od_max must be 0-0.2 OD (real unstained borders: up to 0.03), got {border_od_max}")


def synthetic_images(n_per_class: int, *, seed: int, size_px: tuple[int, int] = (512, 512), mpp: float = 0.5,
                     stain_jitter: float = 0.0, gastric_every: int = 5, border_od_max: float = 0.0,
                     workers: int = 1) -> list[LabelledImage]:
    """``n_per_class`` generated fields per score; field seeds from ``SeedSequence(seed)``.

    Every ``gastric_every``-th field of each class uses the gastric variant (lateral patterns at
    2+/3+); 0 fields are null or ultralow at random. With ``border_od_max`` > 0 each field carries
    unstained-border texture (synthetic.Confounders.border_od, peak OD) drawn uniformly from 0 to it;
    0.03 spans clean borders to the most textured real ones (models/MODEL_CARD.md: what it changes).
    ``workers`` processes generate in parallel (the result does not depend on it).
    """
    check_synthetic(n_per_class, stain_jitter, border_od_max)
    seeds = np.random.SeedSequence(seed).generate_state(n_per_class * len(CLASSES))
    border = np.random.default_rng([seed, 1]).uniform(0.0, border_od_max, len(seeds))  # a stream apart from the fields'
    jobs = [(score, int(seeds[j * n_per_class + i]), tuple(size_px), mpp, stain_jitter,
             bool(gastric_every) and i % gastric_every == gastric_every - 1, float(border[j * n_per_class + i]))
            for j, score in enumerate(CLASSES) for i in range(n_per_class)]
    if workers > 1:
        with worker_pool(workers, die_with_parent) as pool:
            return [result_of(f) for f in [pool.submit(_synthetic_one, j) for j in jobs]]
    return [_synthetic_one(j) for j in jobs]


def read_image(path: str | os.PathLike, *, mpp: float | None = None, target_mpp: float = 0.5,
               backend: str | None = None) -> np.ndarray:
    """A whole image/field as RGB uint8 at ``target_mpp`` (µm/px from the file, else ``mpp``), read by ``backend``
    (slide.BACKENDS; None: the reader the file chooses)."""
    from .slide import SlideError, open_slide

    with open_slide(path, mpp=mpp, backend=backend) as s:
        w, h = (round(d * s.mpp / target_mpp) for d in s.dimensions)
        if w * h > MAX_IMAGE_PX:
            raise SlideError(path, f"{w}x{h} px at {target_mpp} µm/px is too large for a training image; "
                                   "cut labelled fields from it")
        return s.read_region((0, 0), (w, h), mpp=target_mpp)


def _load(path: Path, label: str, mpp: float | None, target_mpp: float, backend: str | None) -> LabelledImage:
    """A labelled image read from ``path``; NotHerIhcError naming it where scoring would refuse it too
    (imagecheck.check_image: H&E, no counterstain, another chromogen, a photo or graphic, an implausible µm/px)."""
    from .imagecheck import NotHerIhcError, check_image

    rgb = read_image(path, mpp=mpp, target_mpp=target_mpp, backend=backend)
    if not (check := check_image(rgb, mpp=target_mpp)).accepted:
        raise NotHerIhcError(path, f"{check.reason.removesuffix('; not scored')}; not a training image")
    return LabelledImage(rgb, label, str(path), estimate_background(rgb))


def folder_images(root: str | os.PathLike, *, mpp: float | None = None, target_mpp: float = 0.5,
                  backend: str | None = None) -> list[LabelledImage]:
    """Images in class sub-folders ``0``, ``1+``, ``2+``, ``3+`` (or ``1plus``...) of ``root``, read by ``backend``
    (read_image); one that is no H-DAB IHC image is refused (NotHerIhcError, as scoring refuses it)."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    return [_load(f, label, mpp, target_mpp, backend) for f, label in class_folder_files(root)]


def read_labels_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a ``path,label[,...]`` CSV (labels.read_csv_rows: column names in any case) with ``path``
    resolved against the CSV's folder and ``label`` its score (labels.parse_score: null and ultralow are 0);
    ValueError naming the file and line on a bad row."""
    path = Path(path)
    rows = []
    for line, row in read_csv_rows(path):
        if not row.get("path"):
            continue
        try:
            row["label"] = row_label(row)[0]  # a level column that disagrees is refused, as evaluate refuses it
        except ValueError as e:
            raise ValueError(f"{path}, line {line}: {e}") from None
        p = Path(row["path"])
        row["path"] = str(p if p.is_absolute() else path.parent / p)
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no labelled rows")
    return rows


def csv_images(path: str | os.PathLike, *, mpp: float | None = None, target_mpp: float = 0.5,
               backend: str | None = None) -> list[LabelledImage]:
    """Images listed in a ``path,label`` CSV (paths relative to the CSV's folder), read by ``backend`` (read_image);
    one that is no H-DAB IHC image is refused (NotHerIhcError, as scoring refuses it)."""
    return [_load(Path(r["path"]), r["label"], mpp, target_mpp, backend) for r in read_labels_csv(path)]


# --------------------------------------------------------------------------------------- config

TRAIN_DEVICES = ("cpu", "cuda", "mps", "xpu")
"""The torch device types training may be given (TrainConfig.device)."""


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting; written into the training log and the weights record."""

    seed: int = 0
    patch_px: int = 64
    width: int = 16
    mpp: float = 0.5
    max_epochs: int = 12
    patience: int = 3
    batch_size: int = 128
    patches_per_image: int = 24
    val_fraction: float = 0.2
    val_patches_per_image: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    min_tissue_fraction: float = 0.5
    augment: bool = True
    stain_angle_deg: float = 6.0
    h_scale_sd: float = 0.2
    dab_scale_sd: float = 0.06
    background_min: float = 215.0
    noise_sd_max: float = 2.0
    threads: int = 1
    device: str = "cpu"
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.patch_px < 16 or self.patch_px % 8:
            raise ValueError(f"patch_px must be a multiple of 8 and >= 16, got {self.patch_px}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be within (0, 1), got {self.val_fraction}")
        if self.max_epochs < 1 or self.batch_size < 2 or self.patches_per_image < 1:
            raise ValueError("max_epochs, batch_size and patches_per_image must be positive (batch_size >= 2)")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be a positive number of minutes (or not given: no limit), got {self.max_minutes}")
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if not (math.isfinite(self.mpp) and 0.1 <= self.mpp <= 2.0):  # 0 divided; 50 made fields of a pixel and ran on
            raise ValueError(f"mpp must be 0.1-2 µm/px, got {self.mpp}")
        for name, ok, rule in (("width", self.width >= 1, "at least 1"), ("patience", self.patience >= 1, "at least 1"),
                               ("lr", math.isfinite(self.lr) and self.lr > 0, "above 0"), ("seed", self.seed >= 0, "0 or more")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")
        kind, sep, index = self.device.partition(":")  # one torch cannot name failed with a traceback once training began
        if kind not in TRAIN_DEVICES or (sep and not index.isdigit()):
            raise ValueError(f"device must be one of {', '.join(TRAIN_DEVICES)}, with an index where there are several "
                             f"(cuda:1), got {self.device!r}")


def check_device(device: str) -> None:
    """ValueError unless this torch build and machine have ``device`` (TrainConfig.device): CUDA, MPS or XPU asked
    for where there is none failed in torch, with a traceback, after the images were loaded."""
    import torch

    kind, _, index = device.partition(":")
    have = {"cpu": lambda: True, "cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available,
            "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}
    if not have[kind]():
        raise ValueError(f"device {device!r}: this machine or torch build cannot run on {kind} (use cpu)")
    count = {"cuda": lambda: torch.cuda.device_count(), "xpu": lambda: torch.xpu.device_count()}.get(kind, lambda: 1)()
    if index and int(index) >= count:
        raise ValueError(f"device {device!r}: this machine has {count} of {kind}, numbered from 0")


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` made: the weights record (with sha256), where it lies, and the epoch log."""

    record: WeightsRecord
    weights: Path | None
    log: dict[str, Any]
    net: Any = field(repr=False, default=None)


# --------------------------------------------------------------------------------------- patches

def _candidate_positions(img: LabelledImage, patch_px: int, min_tissue: float) -> np.ndarray:
    """Top-left (row, col) of half-overlapping patches holding enough tissue."""
    rgb = img.rgb
    h, w = rgb.shape[:2]
    if h < patch_px or w < patch_px:
        return np.zeros((0, 2), int)
    tissue = (optical_density(rgb, img.background).sum(axis=2) > TISSUE_OD).astype(np.float32)
    integral = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    step = max(1, patch_px // 2)
    rows = np.arange(0, h - patch_px + 1, step)
    cols = np.arange(0, w - patch_px + 1, step)
    r, c = np.meshgrid(rows, cols, indexing="ij")
    r, c = r.ravel(), c.ravel()
    s = integral[r + patch_px, c + patch_px] - integral[r, c + patch_px] - integral[r + patch_px, c] + integral[r, c]
    keep = s / (patch_px * patch_px) >= min_tissue
    return np.column_stack([r[keep], c[keep]])


def _jitter_vectors(base: np.ndarray, deg: float, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) unit vectors: ``base`` rotated by a bounded normal angle about a random perpendicular axis."""
    n = len(base)
    p = rng.standard_normal((n, 3))
    p -= (p * base).sum(1, keepdims=True) * base
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    a = np.radians(np.clip(rng.normal(0.0, deg, n), -2 * deg, 2 * deg))[:, None] if deg > 0 else np.zeros((n, 1))
    v = np.abs(np.cos(a) * base + np.sin(a) * p)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class _Renderer:
    """uint8 RGB crops -> network input (N, 2, P, P) float32 torch, with optional OD-space augmentation."""

    def __init__(self, config: TrainConfig, device):
        import torch

        self.cfg, self.device = config, device
        self.unmix = torch.tensor(H_DAB.unmixing(), dtype=torch.float32, device=device)  # (3,3): conc = M @ od
        self.h0 = np.array(H_DAB.hematoxylin)
        self.d0 = np.array(H_DAB.dab)

    def __call__(self, crops: np.ndarray, background: np.ndarray, rng: np.random.Generator | None):
        import torch

        cfg = self.cfg
        n = len(crops)
        x = torch.from_numpy(crops).to(self.device).float().clamp_(min=1.0)  # (N, P, P, 3)
        bg = torch.from_numpy(background.astype(np.float32)).to(self.device).view(n, 1, 1, 3)
        od = torch.clamp(-torch.log10(x / bg), min=0.0)
        conc = od @ self.unmix.T  # (N, P, P, 3): H, DAB, residual amounts
        if rng is not None and cfg.augment:
            hv = _jitter_vectors(np.tile(self.h0, (n, 1)), cfg.stain_angle_deg, rng)
            dv = _jitter_vectors(np.tile(self.d0, (n, 1)), cfg.stain_angle_deg, rng)
            rv = np.cross(hv, dv)
            rv /= np.linalg.norm(rv, axis=1, keepdims=True)
            scale = np.exp(np.column_stack([
                np.clip(rng.normal(0, cfg.h_scale_sd, n), -2 * cfg.h_scale_sd, 2 * cfg.h_scale_sd),
                np.clip(rng.normal(0, cfg.dab_scale_sd, n), -2 * cfg.dab_scale_sd, 2 * cfg.dab_scale_sd),
                np.zeros(n)]))
            vecs = np.stack([hv, dv, rv], axis=1) * scale[:, :, None]  # (N, 3 stains, 3 rgb)
            new_bg = np.clip(rng.uniform(cfg.background_min, 255.0, (n, 1)) + rng.uniform(-3, 3, (n, 3)), 1, 255)
            noise = rng.uniform(0, cfg.noise_sd_max, n)
            t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)  # noqa: E731
            od_rgb = torch.einsum("nhws,nsc->nhwc", conc, t(vecs))
            bgt = t(new_bg).view(n, 1, 1, 3)
            inten = bgt * torch.pow(10.0, -od_rgb)
            gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**62)))
            inten = inten + torch.randn(inten.shape, generator=gen).to(self.device) * t(noise).view(n, 1, 1, 1)
            inten = torch.round(inten).clamp_(1.0, 255.0)
            od = torch.clamp(-torch.log10(inten / bgt), min=0.0)
            conc = od @ self.unmix.T
        out = conc[..., :2].permute(0, 3, 1, 2)  # (N, 2, P, P)
        if rng is not None and cfg.augment:
            k = rng.integers(0, 8, n)
            out = out.clone()
            for code in range(1, 8):
                idx = np.flatnonzero(k == code)
                if len(idx) == 0:
                    continue
                sel = torch.from_numpy(idx).to(self.device)
                v = out[sel]
                if code & 4:
                    v = torch.flip(v, dims=(3,))
                v = torch.rot90(v, int(code & 3), dims=(2, 3))
                out[sel] = v
        return out.contiguous(memory_format=torch.channels_last)


def _gather(images: Sequence[LabelledImage], which: np.ndarray, pos: np.ndarray, patch_px: int) -> tuple[np.ndarray, np.ndarray]:
    crops = np.empty((len(which), patch_px, patch_px, 3), np.uint8)
    bgs = np.empty((len(which), 3), np.float64)
    for i, (k, (r, c)) in enumerate(zip(which, pos)):
        crops[i] = images[k].rgb[r:r + patch_px, c:c + patch_px]
        bgs[i] = images[k].background
    return crops, bgs


def _sample_epoch(images, cands, idx, per_image, patch_px, rng) -> tuple[np.ndarray, np.ndarray]:
    """Image index and top-left of ``per_image`` random patches (jittered grid candidates) per image."""
    which, pos = [], []
    for k in idx:
        c = cands[k]
        pick = c[rng.integers(0, len(c), per_image)]
        h, w = images[k].rgb.shape[:2]
        jit = rng.integers(-patch_px // 4, patch_px // 4 + 1, (per_image, 2))
        p = np.column_stack([np.clip(pick[:, 0] + jit[:, 0], 0, h - patch_px), np.clip(pick[:, 1] + jit[:, 1], 0, w - patch_px)])
        which.append(np.full(per_image, k))
        pos.append(p)
    return np.concatenate(which), np.concatenate(pos)


def _split(labels: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of image indices: at least one validation image per class with >= 2 images."""
    train_idx, val_idx = [], []
    for c in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) == 0:
            continue
        n_val = min(len(members) - 1, max(1, round(val_fraction * len(members)))) if len(members) > 1 else 0
        val_idx.extend(members[:n_val].tolist())
        train_idx.extend(members[n_val:].tolist())
    return np.array(sorted(train_idx), int), np.array(sorted(val_idx), int)


# --------------------------------------------------------------------------------------- training

def check_target(out: str | os.PathLike, name: str = "her2cnn.pt", *, replace_shipped: bool = False) -> Path:
    """Where ``train`` writes weights (``out/name``), checked before any work: ValueError for a name not ending in
    .pt, an ``out`` that is a file or that cannot be written (a temporary file is made and removed in it, or in the
    nearest folder above it that exists: the training run found out only when it ended), or the shipped weights
    (which every run without --weights uses) unless ``replace_shipped``."""
    import tempfile

    from .cnn import default_weights_path

    target = weights_path(Path(out) / name)
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"{out}: a file, not a folder for the weights (--out; out= in the Python API)")
    where = Path(out).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".her2score-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{out}: cannot write the weights there ({e.strerror or e})") from None
    if target.resolve() == default_weights_path().resolve() and not replace_shipped:
        raise ValueError(f"{target} is the shipped weights, which every run without --weights uses: train into "
                         "another folder and pass --weights, or give --replace-shipped (replace_shipped=True)")
    return target


def train(images: Sequence[LabelledImage], *, config: TrainConfig = TrainConfig(), out: str | os.PathLike | None = None,
          name: str = "her2cnn.pt", data_note: str = "", progress: Callable[[dict], None] | None = None,
          replace_shipped: bool = False) -> TrainResult:
    """Train a TileNet on labelled images; write ``out/name`` and ``out/<stem>.train_log.{json,csv}``
    (check_target: never over the shipped weights unless ``replace_shipped``).

    ``progress(row)`` is called after every epoch with that epoch's log row. Early stopping on the
    validation loss (patience ``config.patience``); the best epoch's weights are kept.
    """
    import torch
    import torch.nn.functional as F

    t_start = time.perf_counter()
    cfg = config
    if not images:
        raise ValueError("no training images")
    if out is not None:
        check_target(out, name, replace_shipped=replace_shipped)  # refused now, not after the training
    check_device(cfg.device)
    seen: dict[str, int] = {}
    for i, im in enumerate(images):  # one image twice could land in training and validation both
        # by its pixels: a copy under another name, in another format or in another class folder too
        key = hashlib.sha256(np.ascontiguousarray(im.rgb).tobytes() + str(im.rgb.shape).encode()).hexdigest()
        if key in seen:
            first = images[seen[key]]
            raise ValueError(f"{im.source}: the same image as {first.source} (images {seen[key] + 1} and {i + 1}, labelled "
                             f"{first.label} and {im.label}): an image in both the training and the validation split would "
                             "measure validation on training data; give each image once")
        seen[key] = i
    labels = np.array([CLASSES.index(parse_score(im.label)) for im in images])
    cands = [_candidate_positions(im, cfg.patch_px, cfg.min_tissue_fraction) for im in images]
    usable = np.array([len(c) > 0 for c in cands])
    if not usable.any():
        raise ValueError(f"no image holds a {cfg.patch_px}x{cfg.patch_px} px patch with enough tissue")
    if (~usable).any():
        log.warning("%d image(s) hold no tissue patch and are left out", int((~usable).sum()))
    if missing := [c for i, c in enumerate(CLASSES) if not (usable & (labels == i)).any()]:
        raise ValueError(f"no usable image of class {', '.join(missing)}: a model trained without a class never "
                         f"predicts it; give images of every class ({', '.join(CLASSES)})")

    rng = np.random.default_rng(cfg.seed)
    split_labels = np.where(usable, labels, -1)
    train_idx, val_idx = _split(split_labels, cfg.val_fraction, rng)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError("need at least two usable images of some class for a training/validation split")

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    if cfg.device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(max(1, cfg.threads))
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(cfg.seed)
        device = torch.device(cfg.device)
        net = build_network(in_channels=len(INPUT_CHANNELS), width=cfg.width, n_classes=len(CLASSES)).to(device)
        render = _Renderer(cfg, device)

        # normalisation from un-augmented training patches
        w0, p0 = _sample_epoch(images, cands, train_idx, 4, cfg.patch_px, np.random.default_rng(cfg.seed + 7))
        with torch.no_grad():
            x0 = render(*_gather(images, w0, p0, cfg.patch_px), None)
        mean = x0.mean(dim=(0, 2, 3)).cpu().numpy()
        std = x0.std(dim=(0, 2, 3)).cpu().numpy() + 1e-6
        norm = {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

        # fixed validation patches with one seeded stain perturbation each
        vrng = np.random.default_rng(cfg.seed + 1)
        v_which, v_pos = [], []
        for k in val_idx:
            c = cands[k]
            pick = c[vrng.choice(len(c), min(len(c), cfg.val_patches_per_image), replace=False)]
            v_which.append(np.full(len(pick), k))
            v_pos.append(pick)
        v_which, v_pos = np.concatenate(v_which), np.concatenate(v_pos)
        with torch.no_grad():
            xs = []
            for i in range(0, len(v_which), 512):
                xs.append(render(*_gather(images, v_which[i:i + 512], v_pos[i:i + 512], cfg.patch_px), vrng))
            x_val = (torch.cat(xs) - mean_t) / std_t
        y_val = torch.from_numpy(labels[v_which]).to(device)

        counts = np.bincount(labels[train_idx], minlength=len(CLASSES)).astype(np.float64)
        cw = np.where(counts > 0, counts.sum() / (len(CLASSES) * np.maximum(counts, 1)), 0.0)
        class_weight = torch.tensor(cw, dtype=torch.float32, device=device)

        steps_per_epoch = math.ceil(len(train_idx) * cfg.patches_per_image / cfg.batch_size)
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.max_epochs * steps_per_epoch,
                                                    pct_start=0.15, anneal_strategy="cos")
        epochs: list[dict] = []
        best = (float("inf"), 0, None)  # epoch 0: patience counts from the start
        stopped = "max_epochs"
        for epoch in range(1, cfg.max_epochs + 1):
            t0 = time.perf_counter()
            net.train()
            which, pos = _sample_epoch(images, cands, train_idx, cfg.patches_per_image, cfg.patch_px, rng)
            order = rng.permutation(len(which))
            which, pos = which[order], pos[order]
            tot_loss, tot_ok, tot_n, lr = 0.0, 0, 0, float(opt.param_groups[0]["lr"])
            for s in range(steps_per_epoch):
                sl = slice(s * cfg.batch_size, (s + 1) * cfg.batch_size)
                if len(which[sl]) < 2:
                    continue
                crops, bgs = _gather(images, which[sl], pos[sl], cfg.patch_px)
                x = (render(crops, bgs, rng) - mean_t) / std_t
                y = torch.from_numpy(labels[which[sl]]).to(device)
                logits = net(x)
                loss = F.cross_entropy(logits, y, weight=class_weight, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr = float(opt.param_groups[0]["lr"])  # the rate this step used (the scheduler's next one wraps at the end)
                opt.step()
                sched.step()
                tot_loss += float(loss.detach()) * len(y)
                tot_ok += int((logits.argmax(1) == y).sum())
                tot_n += len(y)
            val = _validate(net, x_val, y_val, v_which, labels)
            row = {"epoch": epoch, "train_loss": round(tot_loss / max(tot_n, 1), 5),
                   "train_patch_accuracy": round(tot_ok / max(tot_n, 1), 4), **val,
                   "lr": float(f"{lr:.4g}"), "seconds": round(time.perf_counter() - t0, 2)}
            if not (math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])):
                raise ValueError(f"training diverged at epoch {epoch} (train loss {row['train_loss']}, validation loss "
                                 f"{row['val_loss']}): nothing was saved; try a lower learning rate")
            epochs.append(row)
            log.info("epoch %d: %s", epoch, row)
            if progress:
                progress(row)
            if val["val_loss"] < best[0] - 1e-4:
                best = (val["val_loss"], epoch, {k: v.detach().clone() for k, v in net.state_dict().items()})
            elif epoch - best[1] >= cfg.patience:
                stopped = f"early stop: no validation-loss gain for {cfg.patience} epochs"
                break
            if cfg.max_minutes is not None and (time.perf_counter() - t_start) / 60 > cfg.max_minutes:
                stopped = f"time limit {cfg.max_minutes} min"
                break
        if best[2] is not None:
            net.load_state_dict(best[2])
        else:
            best = (float("nan"), epochs[-1]["epoch"], None)
        net.eval()
        best_row = next(r for r in epochs if r["epoch"] == best[1])
        seconds = round(time.perf_counter() - t_start, 1)
        record = WeightsRecord(
            file=name, sha256="", mpp=cfg.mpp, patch_px=cfg.patch_px, normalisation=norm,
            min_tissue_fraction=cfg.min_tissue_fraction, width=cfg.width, parameters=count_parameters(net),
            metrics={"validation": {k: best_row[k] for k in best_row if k.startswith("val_")}},
            training={
                "data": data_note, "images": int(usable.sum()), "train_images": int(len(train_idx)),
                "image_samples": sorted({content_sample(im.source) for im in images if Path(im.source).is_file()}),
                "val_images": int(len(val_idx)),
                "images_per_class": {c: int(np.sum(labels[usable] == i)) for i, c in enumerate(CLASSES)},
                "best_epoch": best[1], "epochs_run": len(epochs), "stopped": stopped,  # no time: the same run, the same file
                "threads": cfg.threads, "device": cfg.device, "torch": torch.__version__, "seed": cfg.seed,
            },
        )
        path = None
        if out is not None:
            path = Path(out) / name
            record = save_model(path, net, record)
        train_log = {"config": asdict(cfg), "record": record.to_dict(), "epochs": epochs,
                     "best_epoch": best[1], "stopped": stopped, "seconds": seconds}
        if path is not None:
            _write_log(path, train_log)
        return TrainResult(record, path, train_log, net)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def _validate(net, x_val, y_val, v_which, labels) -> dict:
    import torch
    import torch.nn.functional as F

    net.eval()
    probs = []
    with torch.inference_mode():
        for i in range(0, len(x_val), 512):
            probs.append(torch.softmax(net(x_val[i:i + 512]), dim=1))
    p = torch.cat(probs)
    loss = float(F.nll_loss(torch.log(p.clamp_min(1e-8)), y_val))
    patch_acc = float((p.argmax(1) == y_val).float().mean())
    pn = p.cpu().numpy()
    ok = []
    for k in np.unique(v_which):
        ok.append(int(np.argmax(pn[v_which == k].mean(0)) == labels[k]))
    return {"val_loss": round(loss, 5), "val_patch_accuracy": round(patch_acc, 4),
            "val_image_accuracy": round(float(np.mean(ok)), 4)}


def _write_log(weights: Path, train_log: dict) -> None:
    stem = weights.with_suffix("")
    atomic_write(stem.parent / f"{stem.name}.train_log.json", json.dumps(train_log, indent=1) + "\n")
    rows = train_log["epochs"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(rows[0]) if rows else ["epoch"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(stem.parent / f"{stem.name}.train_log.csv", buf.getvalue())
