"""A small CNN that scores HER2 staining of tissue patches, its weights record, and score fusion.

The network (TileNet, 77,556 parameters) reads square patches at the pipeline's
physical resolution (0.5 µm/px by default) as two log10 optical-density channels from H-DAB colour
deconvolution (haematoxylin, DAB), standardised with the mean/std stored in the weights, and gives
logits over the four scores 0 / 1+ / 2+ / 3+. A tile's probabilities are the mean of the softmax over
its tissue patches; a slide's are the patch-weighted mean over its tiles (:func:`aggregate_tiles`).

Weights are a torch state dict saved with a JSON metadata record (:func:`save_model`), loaded with
``torch.load(weights_only=True)`` and checked against a SHA-256 of the file (shipped weights:
:data:`DEFAULT_WEIGHTS`) and of the tensors (every file written by :func:`save_model`). torch is
imported lazily, so ``import her2score`` stays light.

Two runtimes, one interface (:class:`TileClassifier`): :func:`load_model` gives the torch network
(training, evaluation, reference outputs); :func:`load_onnx_model` gives the same network on ONNX
Runtime, one thread, for scoring slides: about 1.6x faster per patch on one core, and without
importing torch (1.5-2 s) when the ``.onnx`` that :func:`save_model` exports beside the weights
is present. Its outputs equal torch's within 1e-5 (tests/test_cnn.py).

Fusion (:func:`fuse`): the classical guideline call and the CNN are combined as a probability mixture

    p_fused = w * onehot(classical) + (1 - w) * p_cnn,     w = CLASSICAL_WEIGHT = 0.4

and the fused score is its arg-max (ties go to the classical call); the confidence is p_fused of the
chosen score. With w = 0.4 the CNN overrides the guideline call only when it puts at least
w / (1 - w) = 2/3 more probability on another score than on the classical one (e.g. 0.8 vs 0.1),
so the guideline call stands unless the network is confidently against it; when they agree the
confidence is at least 0.4, and near 1 when the network agrees firmly. The CNN may tip the call to a
neighbouring score, never further: its slide reading is a mean over every patch, which cannot see what a
guideline call may rest on, a minority of cells (a gastric biopsy's cluster of 5, intense staining in
<=10%). A real 3+ fragment among eleven real HER2 0 fragments on one gastric biopsy slide is 3+ by the
cluster rule, and the CNN's mean read it 0 (p=0.78; the weights shipped until 0.4.6): fused, it was
reported 0. No held-out field's fused score lies two scores or more from its classical one. And in the
pipeline it tips only a call the cells measured leave in doubt, to a score they leave possible (a share near
a cut-off, a cluster of about 5, intense cells at the isolated floor, a breast 1+ over moderate incomplete
membranes: ``fuse(..., to=)``): a network trained on synthetic fields read a field of 86% intense complete
cells 2+ in a review, and was reported; a call its cells leave in no doubt stands, and the disagreement is
flagged ``cnn_disagrees`` for eligibility to weigh.

Nor may the CNN lift a 0 whose stained cells are no more than real unstained membranes read
(guidelines.false_membrane_share, none at all included, on few cells within the share's 95% interval):
trained on generator fields, it can read faint diffuse DAB as 1+ on real ones, and such a 0 rests on the
same faint evidence. A real Ki67 field (DeepLIIF 799_2: a faint DAB blush and 1-3 brown nuclei; 7.8% of
its cells read stained at 0.5 µm/px) was read 1+ by the CNN (the weights shipped until 0.4.6: p=0.88, with
its brown nuclei's DAB removed too; the current weights, on the field as scored: p=0.90) and reported 1+,
HER2-low; it now stays 0+ (ultralow).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .files import atomic_write
from .results import SCORES, CnnReport
from .stain import H_DAB, StainSet, deconvolve

__all__ = [
    "use_one_thread",
    "CLASSES",
    "CLASSICAL_WEIGHT",
    "INPUT_CHANNELS",
    "ModelError",
    "WeightsRecord",
    "DEFAULT_WEIGHTS",
    "default_weights_path",
    "build_network",
    "count_parameters",
    "TileClassifier",
    "TorchTileClassifier",
    "OnnxTileClassifier",
    "load_model",
    "load_onnx_model",
    "export_onnx",
    "save_model",
    "fuse",
    "aggregate_tiles",
    "tissue_patches",
]

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = SCORES
"""Output order of the network: "0", "1+", "2+", "3+"."""

CLASSICAL_WEIGHT = 0.4
"""Prior weight of the classical guideline call in :func:`fuse` (the CNN gets 1 - this)."""

INPUT_CHANNELS: tuple[str, ...] = ("hematoxylin_od", "dab_od")
"""Network input: log10 optical density of each stain after H-DAB deconvolution, in this order."""

TISSUE_OD = 0.05
"""A pixel is tissue when its RGB optical density (sum over channels, log10) exceeds this."""


class ModelError(RuntimeError):
    """Model weights that cannot be used: missing, unreadable, corrupt or not matching their record.

    The message names the file.
    """


@dataclass(frozen=True)
class WeightsRecord:
    """What a weights file is (torchvision-style): file, checksum, what it expects and how it scored."""

    file: str
    sha256: str
    classes: tuple[str, ...] = CLASSES
    mpp: float = 0.5
    patch_px: int = 64
    input_channels: tuple[str, ...] = INPUT_CHANNELS
    normalisation: dict[str, list[float]] = field(default_factory=lambda: {"mean": [0.0, 0.0], "std": [1.0, 1.0]})
    min_tissue_fraction: float = 0.5
    architecture: str = "TileNet"
    width: int = 16
    parameters: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """ValueError for a record no model could work with (a hand-edited or damaged file)."""
        norm = self.normalisation
        if not (np.isfinite(self.mpp) and self.mpp > 0):
            raise ValueError(f"the record's mpp must be a positive µm/px, got {self.mpp!r}")
        if not (isinstance(self.patch_px, int) and self.patch_px >= 8):
            raise ValueError(f"the record's patch_px must be a whole number >= 8, got {self.patch_px!r}")
        if not 0 <= self.min_tissue_fraction <= 1:
            raise ValueError(f"the record's min_tissue_fraction must be within 0-1, got {self.min_tissue_fraction!r}")
        try:
            mean, std = np.asarray(norm["mean"], float), np.asarray(norm["std"], float)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"the record's normalisation must give mean and std per channel, got {norm!r}") from None
        if mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"the record's normalisation needs finite means and positive stds, got {norm!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"], d["input_channels"] = list(self.classes), list(self.input_channels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WeightsRecord":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("classes", "input_channels"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


DEFAULT_WEIGHTS = WeightsRecord(
    file="her2cnn.pt",
    sha256="9016373e80760b5cf66723cbbc33c4092fbd20409aa3a954d6d7392911d1eed5",
    mpp=0.5,
    patch_px=64,
    normalisation={"mean": [0.137646, 0.081746], "std": [0.197581, 0.172799]},
    min_tissue_fraction=0.5,
    width=16,
    parameters=77_556,
    metrics={
        "held_out_synthetic": {
            "data": "400 fields (100 per class), write_dataset seed 777, stain_jitter 6 (never seen in training); "
                    "394 scored, 6 refused as faded (their jittered haematoxylin 6.6-10.8 degrees from grey)",
            "command": "her2score synth /tmp/ev --n-per-class 100 --seed 777 --stain-jitter 6 && "
                       "her2score evaluate /tmp/ev/labels.csv --out /tmp/ev_out",
            "measured": "6 Dec 2026, her2score 0.5.0 (models/MODEL_CARD.md, Evaluation)",
            "cnn": {"accuracy": 0.995, "accuracy_ci95": [0.982, 0.999],
                    "quadratic_weighted_kappa": 0.998, "quadratic_weighted_kappa_ci95": [0.995, 1.0]},
            "fused": {"accuracy": 0.987, "accuracy_ci95": [0.971, 0.995],
                    "quadratic_weighted_kappa": 0.995, "quadratic_weighted_kappa_ci95": [0.99, 0.999]},
            "classical": {"accuracy": 0.98, "accuracy_ci95": [0.96, 0.99],
                    "quadratic_weighted_kappa": 0.992, "quadratic_weighted_kappa_ci95": [0.985, 0.997]},
        },
        "validation": {"val_loss": 0.18753, "val_patch_accuracy": 0.9555, "val_image_accuracy": 1.0},
        "real_labelled": "none available (no labelled real HER2 IHC set; trained on synthetic fields only)",
    },
    training={
        "command": "her2score train --synthetic 150 --seed 1 --workers 2 --out models/ --replace-shipped",
        "data": "600 synthetic fields (her2score.synthetic as of her2score 0.4.6, 512x512 px at 0.5 µm/px, "
                "SeedSequence(1), stain_jitter 0)",
        "best_epoch": 10, "epochs_run": 12, "seconds": 355.2, "threads": 1, "torch": "2.13.0+cpu", "seed": 1,
    },
)
"""The shipped weights (``models/her2cnn.pt``): checksum, what they expect and how they scored
(see models/MODEL_CARD.md). The file's own record is authoritative for normalisation."""

DEFAULT_ONNX_SHA256 = "31e15b499f232a25550023a8ddc64a2383d58b50e958bb3df7e8a0f3aa70b4bf"
"""SHA-256 of ``models/her2cnn.onnx``, the shipped weights exported by :func:`export_onnx` (torch 2.13, onnx 1.23)."""


# --------------------------------------------------------------------------------------- network

def build_network(*, in_channels: int = 2, width: int = 16, n_classes: int = 4):
    """TileNet: one full-resolution conv (membranes are ~2 px wide), then stages at 1/2, 1/4, 1/8.

    conv3x3(c->w) BN ReLU, maxpool | conv3x3(->1.5w) BN ReLU, maxpool | [conv3x3(->3w) BN ReLU] x2,
    maxpool | conv3x3(->6w) BN ReLU | global average + max pooling | dropout 0.2 | linear(12w -> 4).
    With width 16 this has 77,556 parameters (about 0.3 MB as float32).
    """
    import torch
    import torch.nn as nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    w1, w2, w3, w4 = width, width * 3 // 2, width * 3, width * 6

    class TileNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                *block(in_channels, w1), nn.MaxPool2d(2),
                *block(w1, w2), nn.MaxPool2d(2),
                *block(w2, w3), *block(w3, w3), nn.MaxPool2d(2),
                *block(w3, w4),
            )
            self.dropout = nn.Dropout(0.2)
            self.head = nn.Linear(2 * w4, n_classes)

        def forward(self, x):
            f = self.features(x)
            pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
            return self.head(self.dropout(pooled))

    return TileNet().to(memory_format=torch.channels_last)


def count_parameters(net) -> int:
    return int(sum(p.numel() for p in net.parameters()))


# --------------------------------------------------------------------------------------- patches

def tissue_patches(hed: np.ndarray, *, patch_px: int, stains: StainSet = H_DAB, min_tissue_fraction: float = 0.5,
                   max_patches: int | None = None,
                   within: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping patches on a grid centred in a stain-OD image, kept when they hold enough tissue.

    ``hed``: float32 (H, W, 3) log10 OD of haematoxylin, DAB and residual (:func:`her2score.stain.deconvolve`
    with ``stains``). A pixel is tissue when its RGB OD summed over channels exceeds :data:`TISSUE_OD`
    (the RGB OD is ``stains.matrix().T @ hed``). ``within``: maps patch centres (row, col), float (N, 2) in
    ``hed``'s px, to bool (N,), False for a patch to leave out (outside a tumour annotation). ``max_patches``: keep
    at most this many of the patches left, evenly spaced in grid order. An image smaller than a patch is padded with
    glass (OD 0).
    Returns (patches float32 (N, 2, P, P) of haematoxylin and DAB OD, top-left (row, col) of each, int (N, 2)).
    """
    if hed.ndim != 3 or hed.shape[2] != 3 or hed.dtype != np.float32:
        raise ValueError(f"expected float32 (H, W, 3) stain OD, got {hed.dtype} {hed.shape}")
    h, w = hed.shape[:2]
    if h < patch_px or w < patch_px:
        padded = np.zeros((max(h, patch_px), max(w, patch_px), 3), np.float32)
        padded[:h, :w] = hed
        hed, (h, w) = padded, padded.shape[:2]
    ny, nx = h // patch_px, w // patch_px
    oy, ox = (h - ny * patch_px) // 2, (w - nx * patch_px) // 2
    grid = hed[oy:oy + ny * patch_px, ox:ox + nx * patch_px]
    od_sum = cv2.transform(grid, stains.matrix().sum(axis=1)[None, :])  # RGB OD summed over R, G, B
    frac = (od_sum > TISSUE_OD).reshape(ny, patch_px, nx, patch_px).mean(axis=(1, 3))
    rows, cols = np.meshgrid(oy + patch_px * np.arange(ny), ox + patch_px * np.arange(nx), indexing="ij")
    pos = np.column_stack([rows.ravel(), cols.ravel()])[frac.ravel() >= min_tissue_fraction]
    if within is not None and len(pos):
        pos = pos[within(pos + (patch_px - 1) / 2)]
    if max_patches is not None and len(pos) > max_patches:
        pos = pos[np.linspace(0, len(pos) - 1, max_patches).round().astype(int)]
    out = np.empty((len(pos), 2, patch_px, patch_px), np.float32)
    for i, (r, c) in enumerate(pos):
        out[i] = hed[r:r + patch_px, c:c + patch_px, :2].transpose(2, 0, 1)
    return out, pos


# --------------------------------------------------------------------------------------- model

class TileClassifier(ABC):
    """A network and its weights record; scores stain-OD patches, tiles and RGB images at ``record.mpp``
    µm/px. Subclasses run the network: :class:`TorchTileClassifier`, :class:`OnnxTileClassifier`."""

    def __init__(self, record: WeightsRecord, *, source: str = ""):
        self.record = record
        self.source = source

    @property
    def classes(self) -> tuple[str, ...]:
        return self.record.classes

    @property
    def mpp(self) -> float:
        return self.record.mpp

    @property
    def patch_px(self) -> int:
        return self.record.patch_px

    @property
    def name(self) -> str:
        """Model name for reports: file name and the first 12 hex digits of its SHA-256."""
        return f"{self.record.file}@{self.record.sha256[:12]}" if self.record.sha256 else self.record.file

    @abstractmethod
    def predict_patches(self, patches: np.ndarray) -> np.ndarray:
        """Class probabilities (N, 4) for stain-OD patches (N, 2, P, P) (unnormalised log10 OD)."""

    def predict_od(self, hed: np.ndarray, *, stains: StainSet = H_DAB, max_patches: int | None = None,
                   within: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, int]:
        """Mean class probabilities (4,) over the tissue patches of a stain-OD image (float32 (H, W, 3),
        haematoxylin/DAB/residual log10 OD from ``stains``, at ``self.mpp`` µm/px), and the number of
        patches used (0, with zero probabilities, when there is no tissue).

        Pass a tile's core (or accept that overlap margins are seen twice by neighbouring tiles).
        ``max_patches``: score at most this many tissue patches, evenly spaced over the image (a whole
        slide's mean needs no more); ``within``: which patches to read, by their centres (tissue_patches).
        """
        patches, _ = tissue_patches(hed, patch_px=self.patch_px, stains=stains,
                                    min_tissue_fraction=self.record.min_tissue_fraction, max_patches=max_patches,
                                    within=within)
        if len(patches) == 0:
            return np.zeros(len(self.classes), np.float64), 0
        return self.predict_patches(patches).mean(axis=0).astype(np.float64), int(len(patches))

    def predict_tile(self, rgb: np.ndarray, *, stains: StainSet = H_DAB, max_patches: int | None = None) -> tuple[np.ndarray, int]:
        """:meth:`predict_od` of an RGB uint8 (H, W, 3) image; ``stains``: the slide's stain set (its
        background I0 matters most)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {rgb.dtype} {rgb.shape}")
        return self.predict_od(deconvolve(rgb, stains), stains=stains, max_patches=max_patches)


class TorchTileClassifier(TileClassifier):
    """The network in torch (training, evaluation and the reference outputs)."""

    def __init__(self, net, record: WeightsRecord, *, device: str | None = "cpu", source: str = ""):
        import torch

        super().__init__(record, source=source)
        self.device = torch.device(device or "cpu")
        self.net = net.to(self.device).eval()
        norm = record.normalisation
        self._mean = torch.tensor(norm["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(norm["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def normalise(self, x):
        """Standardise a torch batch (N, 2, P, P) of stain OD with the record's mean/std."""
        return (x - self._mean) / self._std

    def predict_patches(self, patches: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        import torch

        if len(patches) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        out = []
        with torch.inference_mode():
            for i in range(0, len(patches), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(patches[i:i + batch_size])).to(self.device)
                x = x.contiguous(memory_format=torch.channels_last)
                out.append(torch.softmax(self.net(self.normalise(x)), dim=1).float().cpu().numpy())
        return np.concatenate(out)


ONNX_RECORD_KEY = "her2score_record"
ONNX_SOURCE_KEY = "her2score_source_sha256"
"""Metadata of an exported graph: its WeightsRecord (JSON) and the SHA-256 of the .pt it came from."""


class OnnxTileClassifier(TileClassifier):
    """The network (normalisation and softmax included) on ONNX Runtime's CPU provider, one thread:
    parallelism is across processes, and a single-threaded session is safe to inherit through fork.
    Built from the bytes of a graph written by :func:`export_onnx`; picklable (rebuilt from them)."""

    def __init__(self, model_bytes: bytes, source: str = ""):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        self._bytes = model_bytes
        self._session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        meta = self._session.get_modelmeta().custom_metadata_map
        if ONNX_RECORD_KEY not in meta:
            raise ValueError("no her2score weights record in the graph's metadata")
        self.source_sha256 = meta.get(ONNX_SOURCE_KEY, "")
        self._input = self._session.get_inputs()[0].name
        super().__init__(WeightsRecord.from_dict(json.loads(meta[ONNX_RECORD_KEY])), source=source)

    def __reduce__(self):
        return (OnnxTileClassifier, (self._bytes, self.source))

    def predict_patches(self, patches: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        if len(patches) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        x = np.ascontiguousarray(patches, dtype=np.float32)
        return np.concatenate([self._session.run(None, {self._input: x[i:i + batch_size]})[0]
                               for i in range(0, len(x), batch_size)])


def _repo_models_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models"


def _installed_model_file(name: str, dist=None) -> Path | None:
    """Where the installed distribution's record (``dist``: an importlib.metadata.Distribution, by default
    her2score's) puts ``models/<name>``: the wheel's data files land under the scheme's data folder, ``sys.prefix/share``
    in a virtual environment, ``~/.local/share`` with ``--user``, the prefix's with ``--prefix`` or a distribution's
    system pip. None where no record lists it."""
    import importlib.metadata  # here: ~13 ms that a repository checkout or a given file never needs

    try:
        dist = dist or importlib.metadata.distribution("her2score")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == name and f.parent.name == "models":
            return Path(dist.locate_file(f)).resolve()
    return None


def default_weights_path() -> Path:
    """The shipped weights: ``<repo>/models`` (source / editable install), then where the installed wheel's record
    puts them (any install scheme), then ``sys.prefix/share/her2score/models``. Returns the first that exists
    (the repository path when none does)."""
    repo = _repo_models_dir() / DEFAULT_WEIGHTS.file
    if repo.is_file():
        return repo
    for c in (_installed_model_file(DEFAULT_WEIGHTS.file), Path(sys.prefix) / "share" / "her2score" / "models" / DEFAULT_WEIGHTS.file):
        if c is not None and c.is_file():
            return c
    return repo


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_state(state: Mapping[str, Any]) -> str:
    """Checksum of a state dict's names, shapes, dtypes and bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_model(path: str | os.PathLike, net, record: WeightsRecord) -> WeightsRecord:
    """Write ``net``'s state dict and ``record`` (as JSON, with a tensor checksum) to ``path``
    atomically. Returns the record with ``file``, ``parameters`` and ``sha256`` (of the file) set.
    Weights holding NaN or infinite values are refused (ModelError), and nothing is written."""
    import torch

    path = weights_path(path)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    if not _finite(state):
        raise ModelError(f"{path}: not saved: the weights hold NaN or infinite values (a training run that diverged)")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = WeightsRecord.from_dict({**record.to_dict(), "file": path.name, "sha256": "",
                                      "parameters": count_parameters(net)})
    meta = {"format": "her2score-cnn/1", "record": record.to_dict(), "state_sha256": _sha256_state(state)}
    buf = io.BytesIO()
    torch.save({"state_dict": state, "meta": json.dumps(meta, sort_keys=True)}, buf)
    atomic_write(path, buf.getvalue())
    saved = WeightsRecord.from_dict({**record.to_dict(), "sha256": _sha256_file(path)})
    # the graph from the weights in hand: loading the file back would refuse new weights over the shipped ones
    cpu = build_network(in_channels=len(saved.input_channels), width=saved.width, n_classes=len(saved.classes))
    cpu.load_state_dict(state, strict=True)
    atomic_write(path.with_suffix(".onnx"), export_onnx(TorchTileClassifier(cpu, saved, device="cpu", source=str(path))))
    return saved


def weights_path(path: str | os.PathLike) -> Path:
    """``path`` as a weights file's: ValueError unless it ends in .pt (its ONNX graph goes beside it, as .onnx)."""
    path = Path(path)
    if path.suffix != ".pt":
        raise ValueError(f"{path}: a weights file's name ends in .pt (its ONNX graph is written beside it, "
                         "as the same name ending in .onnx)")
    return path


def _finite(state: Mapping[str, Any]) -> bool:
    """Whether every floating-point tensor of a state dict is finite."""
    import torch

    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def export_onnx(model: "TorchTileClassifier") -> bytes:
    """``model``'s network with its normalisation and softmax as an ONNX graph (opset 17, any batch
    size: float32 (N, 2, P, P) log10 OD -> probabilities (N, 4)), carrying its weights record and the
    SHA-256 of its weights file in the metadata. Needs torch and onnx."""
    import onnx
    import torch

    class Scored(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model.net

        def forward(self, x):
            return torch.softmax(self.net(model.normalise(x)), dim=1)

    x = torch.zeros(1, len(model.record.input_channels), model.patch_px, model.patch_px, device=model.device)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(Scored().eval(), (x,), buf, dynamo=False, opset_version=17, input_names=["od"],
                          output_names=["probabilities"], dynamic_axes={"od": {0: "n"}, "probabilities": {0: "n"}})
    graph = onnx.load_from_string(buf.getvalue())
    for key, value in ((ONNX_RECORD_KEY, json.dumps(model.record.to_dict(), sort_keys=True)),
                       (ONNX_SOURCE_KEY, model.record.sha256)):
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    return graph.SerializeToString()


def use_one_thread() -> None:
    """Give torch one intra-op thread in this worker process, if torch is loaded (ONNX Runtime sessions
    here always use one): parallelism is across processes, and a thread pool inherited through fork
    from a parent that used torch hangs on its first use."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def load_model(path: str | os.PathLike | None = None, *, device: str | None = "cpu") -> TileClassifier:
    """Load a :class:`TileClassifier` (no network access).

    ``path`` None loads the shipped weights (:func:`default_weights_path`) and checks their SHA-256
    against :data:`DEFAULT_WEIGHTS`, as it does for that file named by its path. Any file is checked against the tensor checksum saved inside it.
    ``device``: "cpu" (the default, and None: the same probabilities on every machine), or "cuda", ... where asked for.
    Raises :class:`ModelError` naming the file when it is missing, unreadable, corrupt or mismatched.
    """
    import torch

    p, file_sha, _ = _checked_weights_file(path)
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
        meta = json.loads(blob["meta"])
        state = blob["state_dict"]
        if meta.get("format") != "her2score-cnn/1":
            raise ValueError(f"unknown format {meta.get('format')!r}")
        record = WeightsRecord.from_dict(meta["record"])
    except Exception as e:  # torch raises many kinds on a damaged file; its own advice (weights_only=False) is unsafe
        if isinstance(e, pickle.UnpicklingError):  # torch's words end in that advice: none of them
            raise ModelError(f"{p}: not a readable her2score model file (not torch weights, or objects other than "
                             "weights, which are never loaded)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"{p}: not a readable her2score model file ({type(e).__name__}: {first[:200]})") from None
    if _sha256_state(state) != meta.get("state_sha256"):
        raise ModelError(f"{p}: weights do not match the checksum stored in the file (corrupt)")
    if not _finite(state):
        raise ModelError(f"{p}: the weights hold NaN or infinite values (a training run that diverged)")
    if tuple(record.classes) != CLASSES or tuple(record.input_channels) != INPUT_CHANNELS:
        raise ModelError(f"{p}: model classes {record.classes} / inputs {record.input_channels} are not "
                         f"{CLASSES} / {INPUT_CHANNELS}")
    net = build_network(in_channels=len(record.input_channels), width=record.width, n_classes=len(record.classes))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{p}: weights do not fit the {record.architecture} architecture: {e}") from None
    record = WeightsRecord.from_dict({**record.to_dict(), "file": p.name, "sha256": file_sha})
    return TorchTileClassifier(net, record, device=device, source=str(p))


def _checked_weights_file(path: str | os.PathLike | None) -> tuple[Path, str, bool]:
    """The weights file (None: the shipped one), its SHA-256, and whether it is the shipped file (by
    that path too, as the CLI passes it), which must match :data:`DEFAULT_WEIGHTS`."""
    p = default_weights_path() if path is None else Path(path)
    shipped = path is None or (p.is_file() and p.resolve() == default_weights_path().resolve())
    if not p.is_file():
        hint = (" (the shipped weights are missing: reinstall her2score, train a model with 'her2score train', "
                "or run classical-only with --no-cnn)") if shipped else ""
        raise ModelError(f"{p}: model weights not found{hint}")
    file_sha = _sha256_file(p)
    if shipped and DEFAULT_WEIGHTS.sha256 and file_sha != DEFAULT_WEIGHTS.sha256:
        raise ModelError(f"{p}: SHA-256 {file_sha[:16]}... does not match the shipped record "
                         f"{DEFAULT_WEIGHTS.sha256[:16]}...: the file is corrupt or was replaced "
                         "(keep your own weights in another folder and pass their path)")
    return p, file_sha, shipped


def load_onnx_model(path: str | os.PathLike | None = None) -> OnnxTileClassifier:
    """Load the weights ``path`` (None: the shipped ones) to run on ONNX Runtime (no network access).

    Uses the graph ``<path stem>.onnx`` beside the weights when it was exported from exactly this file
    (its metadata holds the file's SHA-256; the shipped graph must also match :data:`DEFAULT_ONNX_SHA256`),
    without importing torch; otherwise (no graph, or one from other weights) loads the weights with
    :func:`load_model` and exports them in memory (about 2 s).
    Raises :class:`ModelError` naming the file when the weights or the graph cannot be used.
    """
    p, file_sha, shipped = _checked_weights_file(path)
    graph = p.with_suffix(".onnx")
    if graph.is_file():
        try:
            clf = OnnxTileClassifier(graph.read_bytes(), source=str(p))
        except Exception as e:  # onnxruntime raises its own kinds on a damaged graph
            raise ModelError(f"{graph}: not a readable her2score ONNX graph ({type(e).__name__}: {e}); "
                             "delete it to export the weights again") from None
        shipped_ok = not shipped or _sha256_file(graph) == DEFAULT_ONNX_SHA256
        if clf.source_sha256 == file_sha and shipped_ok:
            return clf
        log.warning("%s was not exported from %s (or was changed since); exporting the weights again in memory", graph, p)
    return OnnxTileClassifier(export_onnx(load_model(p, device="cpu")), source=str(p))


# --------------------------------------------------------------------------------------- slides

def _as_probs(p: Mapping[str, float] | np.ndarray | Iterable[float]) -> np.ndarray:
    if isinstance(p, Mapping):
        missing = [c for c in CLASSES if c not in p]
        if missing:
            raise ValueError(f"CNN probabilities lack scores {missing}; need all of {CLASSES}")
        arr = np.array([float(p[c]) for c in CLASSES])
    else:
        arr = np.asarray(list(p) if not isinstance(p, np.ndarray) else p, dtype=np.float64).ravel()
    if arr.shape != (len(CLASSES),) or not np.all(np.isfinite(arr)) or np.any(arr < 0) or arr.sum() <= 0:
        raise ValueError(f"CNN probabilities must be {len(CLASSES)} non-negative finite numbers, got {arr}")
    return arr / arr.sum()


def fuse(classical_score: str, cnn_probs: Mapping[str, float] | np.ndarray, *,
         classical_weight: float = CLASSICAL_WEIGHT, to: Iterable[str] | None = None) -> tuple[str, float]:
    """Fused score and confidence from the classical guideline score and CNN probabilities.

    p_fused = w * onehot(classical) + (1 - w) * p_cnn; score = its arg-max among the classical score and
    its neighbours (ties: the classical score); confidence = p_fused[score], in [0, 1]. See the module
    docstring for what w = 0.4 means, and why the CNN tips a call at most one score. ``to``: the only scores
    the CNN may tip the call to (the pipeline's: those the cells measured leave possible; see the module
    docstring); None: either neighbour.
    """
    if classical_score not in CLASSES:
        raise ValueError(f"classical score must be one of {CLASSES}, got {classical_score!r}")
    if not 0.0 <= classical_weight <= 1.0:
        raise ValueError(f"classical_weight must be within 0-1, got {classical_weight}")
    p = _as_probs(cnn_probs)
    k = CLASSES.index(classical_score)
    fused = (1.0 - classical_weight) * p
    fused[k] += classical_weight
    allowed = None if to is None else set(to)
    near = [i for i in range(max(0, k - 1), min(len(CLASSES), k + 2))  # a neighbouring score at most
            if i == k or allowed is None or CLASSES[i] in allowed]
    best = max(near, key=lambda i: (fused[i], i == k))
    if fused[best] - fused[k] <= 1e-12:
        best = k
    return CLASSES[best], float(np.clip(fused[best], 0.0, 1.0))


def aggregate_tiles(tiles: Iterable[tuple[np.ndarray, int]], *, model: str) -> CnnReport | None:
    """A slide's CnnReport from per-tile (probabilities, patches) pairs: the patch-weighted mean.

    Returns None when no tile had tissue patches.
    """
    total, n_tiles, n_patches = np.zeros(len(CLASSES)), 0, 0
    for probs, n in tiles:
        if n > 0:
            total += np.asarray(probs, np.float64) * n
            n_tiles += 1
            n_patches += int(n)
    if n_patches == 0:
        return None
    mean = total / n_patches
    return CnnReport(score=CLASSES[int(np.argmax(mean))],
                     probabilities={c: round(float(v), 6) for c, v in zip(CLASSES, mean)},
                     tiles=n_tiles, model=model)
