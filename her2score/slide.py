"""One Slide interface over tiled TIFF (tifffile), vendor formats (OpenSlide) and plain images.

Coordinates: the slide API speaks (x, y) and (width, height); ``location`` is in level-0
pixels, ``size`` in output pixels at the requested µm/px. Arrays are (row, col, RGB) uint8.

Every file problem becomes a SlideError whose message is "PATH: reason", raised as early as the
problem can be seen: suffix and content sniffing, TIFF structure (truncation, absurd headers)
and pixel format at open; corrupt image data when the pixels are read.
"""
from __future__ import annotations

import decimal
import html
import math
import numbers
import os
import re
import struct
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .jpeg import dqt_tables, jpeg_quality

__all__ = [
    "Slide",
    "SlideError",
    "NotHerIhcError",
    "open_slide",
    "ArraySlide",
    "SLIDE_SUFFIXES",
    "BACKENDS",
    "checked_backend",
    "automatic_backend",
    "UNSUPPORTED_IMAGE_SUFFIXES",
    "MAX_PLAIN_PIXELS",
    "MAX_DIMENSION",
]

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".qptiff")
OPENSLIDE_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SLIDE_SUFFIXES = TIFF_SUFFIXES + OPENSLIDE_SUFFIXES + PLAIN_SUFFIXES
PLAIN_KINDS = ("PNG", "JPEG", "BMP")
"""The kinds _sniff tells by their first bytes that the image backend reads whole (not a TIFF)."""
BACKENDS = ("tifffile", "openslide", "image")
"""The readers open_slide's ``backend`` may force: TIFF through tifffile, vendor formats through OpenSlide, whole
images through Pillow (PNG, JPEG, BMP, TIFF)."""
UNSUPPORTED_IMAGE_SUFFIXES = (
    ".czi", ".vsi", ".isyntax", ".dcm", ".dicom", ".jp2", ".j2k", ".jpx", ".jxl", ".gif", ".webp", ".avif",
    ".heic", ".tga", ".nd2", ".lif", ".zvi", ".kfb", ".sdpc", ".tmap", ".mds", ".ims", ".zarr",
)
"""Image and slide formats this tool recognises but cannot read: a clear error rather than a silent skip."""
MAX_PLAIN_PIXELS = 16_000 * 16_000
"""Largest image decoded whole (plain images, single TIFF tiles or strips): bigger ones must be tiled."""
MAX_DIMENSION = 2**21
"""Largest width or height accepted from any header (decompression-bomb guard)."""
READ_BLOCK_PX = 4096 * 4096
"""Most level pixels decoded at once by read_region: larger reads are done block by block."""
PLAUSIBLE_MPP = (0.05, 20.0)
"""µm/px outside this range in metadata is treated as absent (e.g. a 72-dpi default)."""
JPEG_COMPRESSION = 7
"""The TIFF Compression tag's value for JPEG ('new-style', with tables): whole-slide tiles."""

_MAGIC = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"),
)
_GREYSCALE = "greyscale image; HER2 scoring needs RGB colour to separate DAB from haematoxylin"


class FileError(Exception):
    """An error about one file: ``path`` and ``reason``, the message "<path>: <reason>"."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # pickled as (path, reason): a worker process's error reaches the parent whole
        return type(self), (self.path, self.reason)


class SlideError(FileError):
    """A slide that cannot be read; the message names the file and the reason."""


DEFAULT_MPP_SOURCE = "the default given"
"""How a slide's ``mpp_source`` (and its result's µm/px note) begins where open_slide's ``default_mpp`` was used."""


class NotHerIhcError(SlideError):
    """The image is not a brightfield H-DAB (HER2 IHC) tissue image (greyscale, H&E, no tissue stain,
    a photo or a graphic), or its µm/px is implausible: refused, not an error of reading."""


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float


class Slide(ABC):
    """A readable slide: level-0 size in pixels, µm/px, and region reads at any µm/px.

    ``notes`` lists conversions applied while reading (e.g. 16-bit samples scaled to 8 bits).
    """

    path: Path
    dimensions: tuple[int, int]
    mpp: float
    mpp_source: str
    """Where the µm/px came from, in words (a user's value and the metadata's where they differ, why a default was used)."""
    mpp_origin: str = "user"
    """The same as one of results.MPP_ORIGINS: "user", "metadata" or "default" (open_slide's ``default_mpp``); a
    Slide of the user's own that does not say is taken as given by the user."""
    levels: tuple[Level, ...]
    notes: tuple[str, ...] = ()
    backend: str | None = None
    """The reader open_slide opened it with, one of BACKENDS; None for an array or a Slide of the user's own."""
    metadata_mpp: float | None = None
    """The µm/px the file's metadata gives where a user's value overrides it by more than 5% and the metadata's is a
    microscope's (else None)."""
    level_jpeg_quality: tuple[int | None, ...] = ()
    """Per level, the IJG quality (1-100) its JPEG compression was saved at, the lower of its luminance and
    chrominance quantisation tables' (jpeg_quality); None where it is not JPEG-compressed or the backend does
    not say (see jpeg_quality_at)."""

    def _take_mpp(self, args: dict) -> None:
        """The µm/px, where it came from and the metadata's rival value, as _mpp_args gives them."""
        self.mpp, self.mpp_source, self.mpp_origin = args["mpp"], args["mpp_source"], args["mpp_origin"]
        self.metadata_mpp = args.get("metadata_mpp")

    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``level``; (x, y) in that level's pixels, in bounds."""

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_region(self, location: tuple[int, int], size: tuple[int, int], *, mpp: float) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``mpp`` µm/px whose top-left is ``location`` (level-0 px).

        Parts outside the slide are white glass. Reads that shrink a large area (thumbnails of a
        slide without a pyramid) are decoded block by block, so memory stays bounded.
        """
        width, height = int(size[0]), int(size[1])
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        if not (mpp > 0 and math.isfinite(mpp)):
            raise ValueError(f"mpp must be a positive number of µm/px, got {mpp}")
        scale = mpp / self.mpp  # level-0 px per output px
        level = self._best_level(scale)
        ds = self.levels[level].downsample
        lw, lh = self.levels[level].width, self.levels[level].height
        # region in the chosen level's pixels
        x0, y0 = location[0] / ds, location[1] / ds
        x1, y1 = x0 + width * scale / ds, y0 + height * scale / ds
        ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        ix1, iy1 = min(lw, math.ceil(x1)), min(lh, math.ceil(y1))
        out = np.full((height, width, 3), 255, np.uint8)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        # place the in-bounds part into the output frame
        f = ds / scale  # output px per level px
        ox0, oy0 = max(0, round((ix0 - x0) * f)), max(0, round((iy0 - y0) * f))
        ow = min(width - ox0, round((ix1 - ix0) * f))
        oh = min(height - oy0, round((iy1 - iy0) * f))
        if ow <= 0 or oh <= 0:
            return out
        exact = (ix0 - x0) * f == ox0 and (iy0 - y0) * f == oy0 and (ix1 - ix0) * f == ow and (iy1 - iy0) * f == oh
        if f >= 1 and not exact:  # an enlargement whose box falls between level pixels: mapped, not stretched
            return self._read_mapped(level, x0, y0, f, out)
        if (ix1 - ix0) * (iy1 - iy0) <= READ_BLOCK_PX or f >= 1:
            patch = self._read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
            out[oy0 : oy0 + oh, ox0 : ox0 + ow] = _fit(patch, ow, oh)
            return out
        # shrinking a large area: output blocks whose level-pixel footprint is at most READ_BLOCK_PX
        fx, fy = (ix1 - ix0) / ow, (iy1 - iy0) / oh  # level px per output px
        step = max(1, int(math.sqrt(READ_BLOCK_PX) / max(fx, fy)))
        for by in range(0, oh, step):
            bh = min(step, oh - by)
            ly0, ly1 = iy0 + math.floor(by * fy), min(iy1, iy0 + math.ceil((by + bh) * fy))
            for bx in range(0, ow, step):
                bw = min(step, ow - bx)
                lx0, lx1 = ix0 + math.floor(bx * fx), min(ix1, ix0 + math.ceil((bx + bw) * fx))
                patch = self._read_level(level, lx0, ly0, lx1 - lx0, ly1 - ly0)
                out[oy0 + by : oy0 + by + bh, ox0 + bx : ox0 + bx + bw] = _fit(patch, bw, bh)
        return out

    def _read_mapped(self, level: int, x0: float, y0: float, f: float, out: np.ndarray) -> np.ndarray:
        """``out`` (white) with its part inside the slide read from ``level``, whose point (x0, y0) (level px,
        fractional) is the output's origin, at ``f`` >= 1 output px a level px: each output pixel read at its
        own centre (bilinear), where resizing the level pixels the box touches would stretch them by up to a
        level pixel. (A shrunk read, f < 1, keeps that error under one output pixel.)"""
        lw, lh = self.levels[level].width, self.levels[level].height
        height, width = out.shape[:2]
        # output pixels whose centres lie inside the slide
        ox0, oy0 = max(0, math.ceil(-x0 * f - 0.5)), max(0, math.ceil(-y0 * f - 0.5))
        ox1, oy1 = min(width, math.ceil((lw - x0) * f - 0.5)), min(height, math.ceil((lh - y0) * f - 0.5))
        if ox1 <= ox0 or oy1 <= oy0:
            return out
        # the level pixels under them, and one more each side for the interpolation
        lx0, ly0 = max(0, math.floor(x0 + ox0 / f) - 1), max(0, math.floor(y0 + oy0 / f) - 1)
        lx1, ly1 = min(lw, math.ceil(x0 + ox1 / f) + 1), min(lh, math.ceil(y0 + oy1 / f) + 1)
        patch = np.ascontiguousarray(self._read_level(level, lx0, ly0, lx1 - lx0, ly1 - ly0))
        # output pixel ox0 + i has its centre at level x0 + (ox0 + i + 0.5) / f, which is patch pixel that - lx0 - 0.5
        to_out = np.float64([[f, 0, (lx0 - x0) * f + 0.5 * (f - 1) - ox0],
                             [0, f, (ly0 - y0) * f + 0.5 * (f - 1) - oy0]])
        out[oy0:oy1, ox0:ox1] = cv2.warpAffine(patch, to_out, (ox1 - ox0, oy1 - oy0), flags=cv2.INTER_LINEAR,
                                               borderMode=cv2.BORDER_REPLICATE)
        return out

    def thumbnail(self, *, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` µm/px (use a coarse mpp: this is one array)."""
        w, h = self.dimensions
        size = (max(1, round(w * self.mpp / mpp)), max(1, round(h * self.mpp / mpp)))
        return self.read_region((0, 0), size, mpp=mpp)

    def jpeg_quality_at(self, mpp: float) -> int | None:
        """The JPEG quality (level_jpeg_quality) of the level read_region reads at ``mpp`` µm/px: the level a
        slide is scored from, not its overview; None where unknown."""
        level = self._best_level(mpp / self.mpp)
        return self.level_jpeg_quality[level] if level < len(self.level_jpeg_quality) else None

    def _best_level(self, scale: float) -> int:
        """The coarsest level that is at least as fine as ``scale`` level-0 px per output px."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= scale * 1.01 and lv.downsample >= self.levels[best].downsample:
                best = i
        return best

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, dimensions={self.dimensions}, mpp={self.mpp:.4g})"


def _fit(patch: np.ndarray, width: int, height: int) -> np.ndarray:
    if patch.shape[1] == width and patch.shape[0] == height:
        return patch
    shrink = patch.shape[1] > width or patch.shape[0] > height
    return cv2.resize(patch, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _check_dimensions(path, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise SlideError(path, f"image has no pixels ({width} x {height})")
    if width > MAX_DIMENSION or height > MAX_DIMENSION:
        raise SlideError(path, f"header claims {width} x {height} pixels, beyond the {MAX_DIMENSION} limit "
                               "(corrupt file or decompression bomb); refused before reading")


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not np.isfinite(mpp):
        return None
    return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


HOT_SAMPLES = (0.001, 256, 0.01)
"""The brightest share of 16-bit colour samples left out of their brightest (_white_of), the least number of them,
and the most share that least may be (a small sample keeps its glass): hot or saturated specks do not set the scale
(one pixel at 65535 in a 12-bit image read every pixel 16 x too dark, and the slide as blank; a 3 x 3 speck is 27
samples)."""


FULL_SCALE_MARK = 0.02
"""The share of 16-bit colour samples at 65535 under which they are a mark drawn on an image whose other samples use
at most 14 bits (a camera snapshot's white scale bar, 0.4% of a 12-bit field's pixels, read every pixel 16 x too dark
and refused the field as blank), left out of its white (_white_of); more are saturated glass, and so are they beside
samples of 15 or 16 bits (a dense 16-bit field with a little saturated glass)."""


def _white_of(samples: np.ndarray) -> int:
    """The white of 16-bit colour ``samples``: the full scale of the bits their brightest uses (HOT_SAMPLES left
    out), at least 8 (glass is a brightfield image's brightest: a 12-bit camera's samples stored unscaled reach
    4095, not 65535; 8-bit values stored as 16-bit ones, as numpy's astype(np.uint16) leaves them, reach 255, and
    read against 511 every pixel was half as bright); samples at 65535 in under FULL_SCALE_MARK of them, beside
    others of 14 bits or fewer, are left out."""
    flat = np.asarray(samples, dtype=np.uint16).ravel()
    rest = flat[flat < 65535]
    if 0 < len(flat) - len(rest) < FULL_SCALE_MARK * len(flat) and (white := _white_of(rest)) <= 16383:
        return white  # a mark far over the image's own 12-14 bits: no glass
    share, least, most = HOT_SAMPLES
    left_out = max(int(share * len(flat)), min(least, int(most * len(flat))))
    at_least = np.cumsum(np.bincount(flat >> 8, minlength=256)[::-1])[::-1]  # samples of each high byte or more
    # bits b are used by more than left_out samples where that many reach 1 << (b - 1), the high byte 1 << (b - 9)
    bits = max((b for b in range(9, 17) if at_least[1 << (b - 9)] > left_out), default=8)
    return (1 << bits) - 1


def _bits_note(white: int) -> str:
    """The note a 16-bit image read against ``white`` gets."""
    if white == 255:
        return "16-bit samples holding 8-bit values (up to 255), read as 8-bit"
    return f"{white.bit_length()}-bit samples scaled to 8 bits"


def _to_8bit(arr: np.ndarray, white: int) -> np.ndarray:
    """uint16 samples with ``white`` their white as uint8, rounded (a rarer brighter sample white too)."""
    return ((np.minimum(arr, white).astype(np.uint32) * 255 + white // 2) // white).astype(np.uint8)


EXIF_TURNED = "turned as its EXIF orientation"
"""How a slide's notes begin where the image was turned upright as its EXIF Orientation tag says."""

PARTLY_TRANSPARENT_MIN = 0.10
"""The share of an image's pixels partly transparent above which its result notes the blending over white (a
semi-transparent layer covers most of an image; an anti-aliased cut-out's edge, a few % of a field, is no note)."""


def _alpha_notes(path, alpha: np.ndarray) -> list[str]:
    """Refuse an image every pixel of which is fully transparent; note one whose pixels are partly transparent over
    PARTLY_TRANSPARENT_MIN of it (blended over white, its stain reads weaker: a 2+ field at half opacity read 1+)."""
    if not alpha.any():
        raise SlideError(path, "every pixel is fully transparent (alpha 0): nothing to score; save the image without "
                               "its alpha channel")
    partly = float(np.mean((alpha > 0) & (alpha < 255)))
    if partly <= PARTLY_TRANSPARENT_MIN:
        return []
    return [f"{partly:.0%} of its pixels partly transparent, blended over white: their stain reads weaker than "
            "the slide's (save the image without its alpha channel)"]


def _to_rgb(path, arr: np.ndarray) -> np.ndarray:
    """Validate an image array as 8-bit colour; RGBA is composited over white."""
    if arr.dtype != np.uint8:
        raise SlideError(path, f"{arr.dtype} pixels ({arr.dtype.itemsize * 8}-bit); HER2 scoring needs 8-bit RGB "
                               "brightfield images (convert to 8-bit RGB)")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 2)):
        raise NotHerIhcError(path, _GREYSCALE)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SlideError(path, f"unsupported pixel layout {arr.shape}")
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _without_extra_samples(arr: np.ndarray, extrasamples) -> np.ndarray:
    """RGB, or RGBA with unassociated alpha (for _to_rgb), from a TIFF's samples: an associated
    (premultiplied) alpha is composited over white here; extra samples of unspecified meaning are dropped."""
    if arr.shape[2] <= 3:
        return arr
    kind = int(extrasamples[0]) if extrasamples else 0
    if kind == 2:  # unassociated alpha
        return arr[..., :4]
    if kind == 1:  # associated alpha: colour already multiplied by it
        return np.minimum(arr[..., :3].astype(np.int32) + (255 - arr[..., 3:4].astype(np.int32)), 255).astype(np.uint8)
    return arr[..., :3]


def _positive(value) -> bool:
    """Whether ``value`` is one positive, finite real number: an int or a float, numpy's (a scalar or a 0-d array),
    a Fraction or a Decimal; not a bool (numpy's either), a string, a complex or an array of one or more dimensions."""
    if np.ndim(value) != 0:
        return False
    kind = np.asarray(value).dtype.kind
    if not (kind in "iuf" or kind == "O" and isinstance(value, (numbers.Real, decimal.Decimal))):  # a bool's kind is "b"
        return False
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # an int past a float's range
        return False
    return number > 0 and math.isfinite(number)


def _shown(value) -> str:
    """A µm/px value as a message shows it: a number as itself, anything else as its repr ('0.5' in quotes)."""
    return str(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else repr(value)


class ArraySlide(Slide):
    """An in-memory RGB field of view (also what plain PNG/JPEG files become)."""

    def __init__(self, rgb: np.ndarray, *, mpp: float, path: str | os.PathLike = "<array>", mpp_source="user",
                 mpp_origin="user", notes: tuple[str, ...] = (), jpeg_quality: int | None = None,
                 metadata_mpp: float | None = None):
        if mpp is None:
            raise SlideError(path, "no microns-per-pixel: pass mpp (µm/px) for an in-memory image")
        if not _positive(mpp):
            name = "default_mpp, --default-mpp" if mpp_origin == "default" else "mpp"
            raise SlideError(path, f"the µm/px given ({name}) must be a positive number, got {_shown(mpp)}")
        self.path = Path(path)
        rgb = np.asarray(rgb)
        if rgb.ndim == 3 and rgb.shape[0] in (3, 4) and rgb.shape[2] not in (3, 4):
            raise SlideError(path, f"pixel layout {rgb.shape} has its colours first; give (height, width, 3), e.g. "
                                   "array.transpose(1, 2, 0)")
        if rgb.dtype == np.uint16 and rgb.ndim == 3 and rgb.shape[2] in (3, 4):  # as a 16-bit file is read
            white = _white_of(rgb[..., :3])
            rgb, notes = _to_8bit(rgb, white), (*notes, _bits_note(white))
        self._rgb = _to_rgb(path, rgb)
        h, w = self._rgb.shape[:2]
        self.dimensions = (w, h)
        self.mpp, self.mpp_source, self.mpp_origin = float(mpp), mpp_source, mpp_origin
        self.levels = (Level(w, h, 1.0),)
        self.notes = tuple(notes)
        self.level_jpeg_quality, self.metadata_mpp = (jpeg_quality,), metadata_mpp

    def _read_level(self, level, x, y, width, height):
        return self._rgb[y : y + height, x : x + width]


def _tiff_jpeg_quality(tif, page) -> int | None:
    """jpeg_quality of a page of an open tifffile.TiffFile, from its JPEGTables and its first non-empty segment's
    own tables, which may redefine them; None where it is not JPEG-compressed or holds no table."""
    if page.compression != 7:  # TIFF's JPEG
        return None
    tables = dqt_tables(bytes(page.jpegtables or b""))
    first = next((i for i, n in enumerate(page.databytecounts) if n), None)
    if first is not None:
        tif.filehandle.seek(page.dataoffsets[first])
        own = dqt_tables(tif.filehandle.read(min(int(page.databytecounts[first]), 1 << 16)))
        tables = {k: v for k, v in tables.items() if k not in own} | own
    return jpeg_quality(tables)


def _plain_mpp(img, axis: int = 0) -> float | None:
    """µm/px a plain image states across (``axis`` 0) or down (1): a JPEG's JFIF density in inch or cm, else (or where
    the JFIF's is no microscope's, e.g. a camera's 72 dpi) its EXIF resolution in inch or cm (EXIF's default unit: inch);
    another format's resolution as Pillow reads it (PNG pHYs, BMP). None where a JPEG states no unit (JFIF 0, EXIF 1)
    or no resolution, for which Pillow's dpi is a guess (72)."""
    try:
        if img.format == "JPEG":
            unit, density = img.info.get("jfif_unit"), img.info.get("jfif_density")
            if unit in (1, 2) and density and float(density[axis]) > 0:
                jfif = (25400.0 if unit == 1 else 10000.0) / float(density[axis])
                if _plausible(jfif) or img.getexif().get(0x011A + axis) is None:
                    return jfif
            return _exif_mpp(img, axis)
        dpi = img.info.get("dpi")
        if dpi and float(dpi[axis]) > 0:
            return 25400.0 / float(dpi[axis])
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        pass
    return None


def _exif_mpp(img, axis: int = 0) -> float | None:
    """µm/px across (``axis`` 0) or down (1) from an image's EXIF resolution in inch (EXIF's default unit) or cm;
    None where it states none, or no unit."""
    exif = img.getexif()
    unit, res = exif.get(0x0128, 2), exif.get(0x011A + axis)  # ResolutionUnit; XResolution, YResolution
    return (25400.0 if unit == 2 else 10000.0) / float(res) if unit in (2, 3) and res and float(res) > 0 else None


ASPECT_TOLERANCE = 0.02
"""How far (a share) a file's µm/px down may differ from across before its pixels are not square."""


def _square_pixels(path, across: float | None, down: float | None) -> None:
    """SlideError where the file states pixels more than ASPECT_TOLERANCE taller than wide or wider than tall (both
    a microscope's): its cells would be measured stretched, and no µm/px given undoes that."""
    if _plausible(across) and _plausible(down):
        _refuse_stretched(path, across, down, f"{across:.4g} µm wide and {down:.4g} µm tall (its resolution metadata)")


def _refuse_stretched(path, across: float, down: float, stated: str) -> None:
    """SlideError where a pixel's width and height (``across``, ``down``, in one unit) differ by more than
    ASPECT_TOLERANCE; ``stated``: how the file states them."""
    stretch = max(down / across, across / down)
    if stretch > 1 + ASPECT_TOLERANCE:
        raise SlideError(path, f"its pixels are not square: {stated}, so cells would be measured "
                               f"{100 * (stretch - 1):.1f}% stretched one way; resample it to square pixels first")


def _rival_resolution(img, taken: float | None) -> list[str]:
    """A note where a JPEG's EXIF resolution gives a microscope's µm/px more than ASPECT_TOLERANCE off the JFIF's taken
    (``taken``): the file says two things, and the one not taken may be the scan's."""
    if img.format != "JPEG" or taken is None:
        return []
    try:
        rival = _exif_mpp(img)
    except (TypeError, ValueError, ZeroDivisionError):
        return []
    if not _plausible(rival) or abs(rival / taken - 1) <= ASPECT_TOLERANCE:
        return []
    return [f"its EXIF resolution says {rival:.4g} µm/px, its JFIF density {taken:.4g}, which was taken; give --mpp if the "
            "EXIF one is the scan's"]


def _square_aspect(path, img) -> None:
    """SlideError where a plain image states its pixels' aspect without a unit (PNG pHYs or JPEG JFIF unit 0) more
    than ASPECT_TOLERANCE off square, as _square_pixels for a stated size."""
    across, down = img.info.get("aspect") or (img.info.get("jfif_density") if img.info.get("jfif_unit") == 0 else None) or (1, 1)
    try:
        _refuse_stretched(path, float(across), float(down), f"its metadata states an aspect of {across}:{down} (no unit)")
    except (TypeError, ValueError, ZeroDivisionError):  # no aspect a number states
        return


_PILLOW_LIMIT = {"lock": threading.Lock(), "users": 0, "saved": None}


@contextmanager
def pillow_unlimited() -> Iterator[None]:
    """Pillow's decompression-bomb check off (for open_plain_image): the caller checks the size the header
    gives against its own limit before decoding (Pillow's 89 MP default, an error at twice that and a
    warning between, would refuse fields this package accepts). Threads share it: the first in turns it
    off, the last out puts Pillow's limit back."""
    from PIL import Image

    state = _PILLOW_LIMIT
    with state["lock"]:
        if state["users"] == 0:
            state["saved"] = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        state["users"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["users"] -= 1
            if state["users"] == 0:
                Image.MAX_IMAGE_PIXELS = state["saved"]


PLAIN_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
"""The formats Pillow may open a plain image or mask as: each reads only its header when opened, so the
size is checked before any pixel is decoded (ICO, for one, decodes an embedded PNG on opening)."""


@contextmanager
def open_plain_image(path: Path) -> Iterator:
    """A plain image or mask opened by Pillow as one of PLAIN_FORMATS, its bomb check off (pillow_unlimited):
    the caller checks the size in the header against its own limit before decoding."""
    from PIL import Image

    with pillow_unlimited(), Image.open(path, formats=PLAIN_FORMATS) as img:
        yield img


_EXIF_TURNS = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
               6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}
"""An (H, W, C) array turned as each EXIF Orientation says a viewer shows it (as PIL's ImageOps.exif_transpose)."""


def _open_16bit(path: Path, meta_mpp, mpp: float | None, default_mpp: float | None, *, orientation: int = 1) -> ArraySlide:
    """A 16-bit colour PNG or TIFF (its first page, read by tifffile: any compression or plane layout), its samples
    scaled to 8 bits from the white their brightest colour sample sets (_white_of: a 12-bit camera's image, stored
    unscaled, read as near black through Pillow), turned as its EXIF ``orientation`` says."""
    try:
        if _sniff(path)[0] == "TIFF":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                arr = tif.pages.first.asarray()  # (height, width, samples), separate planes too
        else:
            arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
            arr = arr if arr is None or arr.ndim != 3 else arr[..., [2, 1, 0, 3][: arr.shape[2]]]  # BGR(A) as RGB(A)
    except Exception as e:  # the decoders raise many types on corrupt input
        raise SlideError(path, f"cannot decode its 16-bit colour samples ({type(e).__name__}: {e})") from None
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SlideError(path, "cannot decode its 16-bit colour samples")
    notes = []
    if orientation in _EXIF_TURNS:
        arr = np.ascontiguousarray(_EXIF_TURNS[orientation](arr))
        notes.append(f"{EXIF_TURNED} ({orientation}) says, as viewers show it")
    white = _white_of(arr[..., :3])
    rgb = _to_8bit(arr[..., :3], white)
    if arr.shape[2] == 4:  # alpha spans the full 16 bits whatever the colour's white
        alpha = _to_8bit(arr[..., 3], 65535)
        notes += _alpha_notes(path, alpha)
        rgb = np.dstack([rgb, alpha])
    return ArraySlide(rgb, notes=(_bits_note(white), *notes), **_mpp_args(path, meta_mpp, mpp, default_mpp))


def _larger_page(img) -> tuple[int, int, int] | None:
    """The first page (index, width, height) of a TIFF opened by Pillow that is larger than its first, which Pillow
    decodes (an overview or a thumbnail stored before the scan); None where the first is the largest."""
    first, larger = img.size[0] * img.size[1], None
    try:
        for i in range(1, getattr(img, "n_frames", 1)):
            img.seek(i)
            if img.size[0] * img.size[1] > first:
                larger = (i, *img.size)
                break
    except Exception:  # a broken page after the first (Pillow: TypeError, EOFError...): the first is read as before
        pass
    img.seek(0)
    return larger


_SAVE_TILED = "save it as a tiled pyramidal TIFF"


def _too_large_fix(path: Path) -> str:
    """What reads a TIFF too large for the image backend (which decodes it whole): the tifffile backend where its first
    page, the image Pillow read, is stored in segments it decodes one at a time (and OpenSlide too where they are
    tiles: it reads no stripped TIFF), else nothing here: it must be saved tiled."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if TiffSlide._segment_px(page) > MAX_PLAIN_PIXELS:
                return _SAVE_TILED
            return ("read it with the tifffile or openslide backend, which read its tiles" if page.is_tiled
                    else "read it with the tifffile backend, which reads its strips")
    except Exception:  # tifffile cannot read it either
        return _SAVE_TILED


@dataclass(frozen=True)
class _TiffPage:
    """What tifffile reads of the page of a TIFF that another reader (OpenSlide, Pillow) opened: its µm/px across and
    down (_tiff_mpp: OME-XML and ImageJ's unit, which they do not read), whether the file is an OME-TIFF (whose
    PhysicalSize tifffile reads before any resolution tag) and its bits per sample."""

    across: float | None = None
    down: float | None = None
    ome: bool = False
    bits: int = 8


def _tiff_page(path: Path, size: tuple[int, int]) -> _TiffPage:
    """_TiffPage of the page of ``size`` (width, height); the defaults for another format or no such page."""
    if _sniff(path)[0] != "TIFF":
        return _TiffPage()
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = next((p for p in tif.pages if (p.imagewidth, p.imagelength) == tuple(size)), None)
            return _TiffPage() if page is None else _TiffPage(*_tiff_mpp(tif, page), tif.is_ome, int(page.bitspersample))
    except Exception:  # tifffile reads no more of it than the other reader needs: no µm/px rather than no slide
        return _TiffPage()


def _open_plain(path: Path, mpp: float | None, default_mpp: float | None) -> ArraySlide:
    from PIL import UnidentifiedImageError

    notes = []
    try:
        with open_plain_image(path) as img:
            _check_dimensions(path, *img.size)
            if img.format == "TIFF" and (larger := _larger_page(img)):
                raise SlideError(path, f"the image backend reads a TIFF's first page, {img.size[0]} x {img.size[1]}, and "
                                       f"page {larger[0]} is larger ({larger[1]} x {larger[2]}): read it with the "
                                       "tifffile backend, which takes its full-resolution page")
            if img.size[0] * img.size[1] > MAX_PLAIN_PIXELS:
                raise SlideError(path, f"{img.size[0]} x {img.size[1]} plain image is too large to decode whole; "
                                       f"{_too_large_fix(path) if img.format == 'TIFF' else _SAVE_TILED}")
            meta_mpp, down = _plain_mpp(img), _plain_mpp(img, axis=1)
            page = _tiff_page(path, img.size) if img.format == "TIFF" else None
            if page is not None and (page.ome or meta_mpp is None):
                meta_mpp, down = page.across, page.down
            _square_pixels(path, meta_mpp, down)
            _square_aspect(path, img)
            notes += _rival_resolution(img, meta_mpp) if mpp is None else []  # the user's µm/px settles it
            quality = jpeg_quality(img.quantization) if getattr(img, "quantization", None) else None  # JPEG, MPO
            if img.mode.startswith("I;16"):
                raise NotHerIhcError(path, f"16-bit {_GREYSCALE}")
            if img.mode in ("I", "F"):
                raise NotHerIhcError(path, f"32-bit {_GREYSCALE}")
            if img.mode in ("L", "LA", "La", "1"):
                raise NotHerIhcError(path, _GREYSCALE)
            # Pillow's tiles say 16 bits, but not those of a TIFF of separate planes (tifffile's page does)
            sixteen = (any(";16" in str(getattr(t, "args", "")) for t in (img.tile or ()))
                       or (page is not None and page.bits > 8))
            if sixteen and img.format in ("PNG", "TIFF"):  # Pillow keeps only the high byte of 16-bit colour: read it whole
                return _open_16bit(path, meta_mpp, mpp, default_mpp, orientation=img.getexif().get(0x0112, 1))
            if sixteen:
                notes.append("16-bit samples scaled to 8 bits")
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA")
            elif img.mode not in ("RGB", "RGBA"):
                img = img.convert("RGB")
            orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation: a camera's picture stored on its side
            if orientation not in (1, None):
                from PIL import ImageOps

                img = ImageOps.exif_transpose(img)
                notes.append(f"{EXIF_TURNED} ({orientation}) says, as viewers show it")
            arr = np.asarray(img)
            if arr.ndim == 3 and arr.shape[2] == 4:
                notes += _alpha_notes(path, arr[..., 3])
    except SlideError:
        raise
    except UnidentifiedImageError:
        if (bits := _jpeg_precision(path)) not in (None, 8):
            raise SlideError(path, f"a {bits}-bit JPEG, which is not decoded here: save it as an 8-bit JPEG, or a 16-bit "
                                   "PNG or TIFF") from None
        raise SlideError(path, f"not a readable image although named {path.suffix}") from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise SlideError(path, f"cannot decode image ({e}); truncated or corrupt file") from None
    return ArraySlide(arr, notes=tuple(notes), jpeg_quality=quality, **_mpp_args(path, meta_mpp, mpp, default_mpp))


def _mpp_args(path, meta_mpp: float | None, user_mpp: float | None, default_mpp: float | None = None) -> dict:
    """µm/px given by the user (it overrides the metadata: the metadata can be wrong, e.g. a JPEG's 16-bit
    dpi), else from the metadata when plausible, else ``default_mpp`` where given (``mpp_source`` says why), else a
    SlideError naming the file. A user's value more than 5% off the metadata's says so in ``mpp_source`` and keeps
    the metadata's as ``metadata_mpp`` where it is a microscope's (a camera's 72 dpi is no rival to the user's value)."""
    if user_mpp:
        differs = meta_mpp and abs(float(user_mpp) / float(meta_mpp) - 1) > 0.05
        source = f"user (the file's metadata says {meta_mpp:.4g})" if differs else "user"
        rival = {"metadata_mpp": float(meta_mpp)} if differs and _plausible(meta_mpp) else {}
        return {"mpp": float(user_mpp), "path": path, "mpp_source": source, "mpp_origin": "user", **rival}
    if _plausible(meta_mpp):
        return {"mpp": float(meta_mpp), "path": path, "mpp_source": "metadata", "mpp_origin": "metadata"}
    # 0, negative, NaN or infinite too: a value, not none
    why = ("no microns-per-pixel in the file's metadata" if meta_mpp is None else
           f"the file's resolution metadata gives {meta_mpp:.4g} µm/px, not a microscope scan's")
    if default_mpp is not None:
        return {"mpp": float(default_mpp), "path": path, "mpp_source": f"{DEFAULT_MPP_SOURCE} ({why})",
                "mpp_origin": "default"}
    # --default-mpp serves a camera's 72 dpi as it serves no metadata (--mpp would override a batch's scans too)
    raise SlideError(path, f"{why}; pass --mpp (e.g. --mpp 0.5; mpp=0.5 in the Python API), or --default-mpp for the "
                           "files without one in a batch of scans and snapshots")


_OME_UM = {"µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "mm": 1e3, "cm": 1e4, "dm": 1e5,
           "m": 1e6, "in": 25400.0}
"""Micrometres per OME-XML PhysicalSizeXUnit (UnitsLength); another unit gives no µm/px from the metadata."""


def _number(text: str | None) -> float | None:
    """A metadata value as a number (a decimal comma, as a scanner set to some locales writes it, read as a point;
    nan and inf kept, to be named as no microscope's); None for none or no number."""
    try:
        return float(text.strip().replace(",", ".")) if text else None
    except ValueError:
        return None


def _ome_pixels(xml: str, width: int, height: int) -> dict[str, str] | None:
    """The attributes of the OME-XML Pixels element of the image ``width`` x ``height`` px: the one of that size, else
    the only one; None where there is none. A file may hold a label or an overview as its first image, each with its
    own PhysicalSizeX (a Bio-Formats export of a .vsi). Read tag by tag, not by an XML parser, which refuses a whole
    file for one stray '&' in an image's name; values in either quotes, with character and entity references
    ('&#181;m', '&micro;m') read as the characters they name."""
    pixels = [{k: html.unescape(v1 or v2) for k, v1, v2 in
               re.findall(r"""([\w:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""", attrs)}
              for attrs in re.findall(r"<(?:[\w.-]+:)?Pixels\b([^>]*)>", xml)]
    sized = [p for p in pixels if (p.get("SizeX"), p.get("SizeY")) == (str(width), str(height))]
    return sized[0] if sized else (pixels[0] if len(pixels) == 1 else None)


def _tiff_mpp(tif, page) -> tuple[float | None, float | None]:
    """(across, down) µm/px a TIFF page states: an Aperio description's MPP (square), OME's PhysicalSizeX / Y of the
    page's image (_ome_pixels, read once for both; a size across stated but not down, or in a unit not known, is
    none), else its XResolution / YResolution in ResolutionUnit (inch where none, ImageJ's own unit)."""
    desc = page.tags.get("ImageDescription")
    text = desc.value if desc else ""
    if isinstance(text, bytes):
        text = text.decode("latin-1", "replace")
    m = re.search(r"MPP\s*=\s*([^|\s]+)", text) if text.startswith("Aperio") else None  # an Aperio description
    if m and (value := _number(m.group(1))) is not None:  # (an OME or other export may quote its source's
        return value, value  # description, and another µm/px, further on)
    pixels = _ome_pixels(tif.ome_metadata or "", page.imagewidth, page.imagelength) if tif.is_ome else None
    if pixels is not None and pixels.get("PhysicalSizeX") is not None:  # stated: never a stale tag's instead
        def stated(axis: str) -> float | None:
            size = _number(pixels.get(f"PhysicalSize{axis}"))
            factor = _OME_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))  # OME's default unit: the micrometre
            return size * factor if size is not None and factor else None
        return stated("X"), stated("Y")
    unit = page.tags.get("ResolutionUnit")
    # no unit tag: inch (TIFF 6.0); 4 and 5 (mm, µm) are written by some scanners and converters
    per_unit_um = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(int(unit.value) if unit else 2)
    if per_unit_um is None and tif.is_imagej:  # ImageJ: no TIFF unit, pixels per its own unit
        per_unit_um = _IMAGEJ_UM.get(_unescaped(str((tif.imagej_metadata or {}).get("unit", ""))))

    def resolved(tag: str) -> float | None:
        res = page.tags.get(tag)
        value = res.value if res else None
        if (per_unit_um and isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)
                and value[0] > 0 and value[1] > 0):  # a RATIONAL; any other type or count is no resolution
            return per_unit_um / (value[0] / value[1])
        return None
    return resolved("XResolution"), resolved("YResolution")


_IMAGEJ_UM = {"micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}
"""Micrometres per ImageJ length unit (its 'unit' metadata)."""


def _unescaped(unit: str) -> str:
    """An ImageJ unit as written (ImageJ escapes non-ASCII: '\\u00B5m' is µm)."""
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), unit).strip()


def _jpeg_precision(path: Path, *, max_bytes: int = 1 << 20) -> int | None:
    """The sample precision (bits) of a JPEG's frame header, read from its first ``max_bytes``; None where the file is
    no JPEG or none is found there."""
    with open(path, "rb") as f:
        data = f.read(max_bytes)
    at = 2 if data.startswith(b"\xff\xd8") else len(data)
    while at + 4 < len(data) and data[at] == 0xFF:
        marker, length = data[at + 1], struct.unpack(">H", data[at + 2 : at + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame: precision, then the size
            return data[at + 4] if at + 4 < len(data) else None
        at += 2 + length
    return None


def _sniff(path: Path) -> tuple[str | None, bytes]:
    """The container format from the first bytes ('TIFF', 'PNG', 'JPEG', 'BMP' or None) and those bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise SlideError(path, f"cannot read file ({e.strerror or e})") from None
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind, head
    return None, head


def _tiff_structure_problem(path: Path) -> str | None:
    """Walk the TIFF's chain of image directories without trusting it; say why it is broken, or None.

    Catches truncated files (a directory or its entries past the end of the file) and loops,
    reading a few bytes per directory: nothing is allocated from header values.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        bo = "<" if head[:2] == b"II" else ">"
        if len(head) < 8:
            return f"truncated TIFF: only {size} bytes, shorter than a TIFF header"
        version = struct.unpack(bo + "H", head[2:4])[0]
        if version == 42:
            offset, count_fmt, entry_size, next_fmt = struct.unpack(bo + "I", head[4:8])[0], "H", 12, "I"
        elif version == 43:
            if len(head) < 16:
                return f"truncated BigTIFF: only {size} bytes, shorter than a BigTIFF header"
            offset, count_fmt, entry_size, next_fmt = struct.unpack(bo + "Q", head[8:16])[0], "Q", 20, "Q"
        else:
            return f"not a TIFF file (version {version} in the header)"
        count_size, next_size = struct.calcsize(count_fmt), struct.calcsize(next_fmt)
        seen: set[int] = set()
        n = 0
        while offset:
            if offset in seen:
                return f"corrupt TIFF: image directory {n} loops back to byte {offset}"
            if n >= 100_000:
                return "corrupt TIFF: more than 100000 image directories"
            seen.add(offset)
            if offset + count_size > size:
                return (f"truncated TIFF: image directory {n} should start at byte {offset} but the file ends at "
                        f"byte {size}")
            f.seek(offset)
            (count,) = struct.unpack(bo + count_fmt, f.read(count_size))
            end = offset + count_size + count * entry_size + next_size
            if end > size:
                return (f"truncated TIFF: image directory {n} ({count} entries) runs to byte {end} but the file ends "
                        f"at byte {size}")
            f.seek(end - next_size)
            (offset,) = struct.unpack(bo + next_fmt, f.read(next_size))
            n += 1
        if n == 0:
            return "TIFF has no images"
    return None


def _segment_grid(page) -> tuple[int, int, int]:
    """(rows, columns) of a page's tiles or strips, clipped to the image, and its planes: the samples for
    separate planes (every sample's segments in turn), else 1."""
    th, tw = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip or page.imagelength, page.imagewidth)
    return min(th, page.imagelength), min(tw, page.imagewidth), page.samplesperpixel if page.planarconfig == 2 else 1


def _subifd_levels(tif, first) -> list:
    """The reduced levels stored as SubIFDs of ``first`` (the full-resolution page), from the series it
    heads; none where tifffile cannot read them (the file is then read at its full resolution alone)."""
    try:
        owner = next((s for s in tif.series if s.levels and s.levels[0].keyframe.offset == first.offset), None)
        return [level.keyframe for level in owner.levels[1:]] if owner else []
    except Exception:  # tifffile raises many types on corrupt input
        return []


def _downsample_of(page, base) -> float | None:
    """How many times smaller than TIFF page ``base`` ``page`` is, where it has base's shape (a pyramid level of it: its
    height within 2 px + 1% of base's at that downsample); None for another shape (a label or macro image)."""
    ds = base.imagewidth / page.imagewidth
    return ds if abs(base.imagelength / ds - page.imagelength) <= 2 + 0.01 * page.imagelength else None


def _base_page(pages: list):
    """The TIFF page that is the slide: the largest page not flagged a reduced image (NewSubfileType bit 0: a level,
    Aperio's label or macro), or a colour page of its size where that one is not colour (a greyscale mask stored
    first); the largest page where none is unflagged; None for none. A small field's macro, larger than the field,
    was taken for the slide; a greyscale scan with a colour preview is its greyscale page (refused as such)."""
    own = [p for p in pages if not p.is_reduced] or pages
    if not own:
        return None
    largest = max(own, key=_area)
    twins = [p for p in own if p.samplesperpixel >= 3 and _same_size(p, largest)]
    return twins[0] if largest.samplesperpixel < 3 and twins else largest


def _area(page) -> int:
    return page.imagewidth * page.imagelength


def _same_size(page, other) -> bool:
    return abs(page.imagewidth - other.imagewidth) <= 1 and abs(page.imagelength - other.imagelength) <= 1


MIN_LEVEL_DOWNSAMPLE = 1.3
"""The least downsample of an unflagged page of the slide's shape that is a pyramid level of it (scanners halve or
quarter each level, tools go down 1.33-1.5x): one less reduced is an image of its own (a field 2 px narrower, a
focal plane, a 3 MP snapshot beside a 5 MP one, 1.27x)."""

OTHER_IMAGE_AREA = 0.25
"""The share of the slide's area from which a TIFF page of the same samples that is no pyramid level of it is an
image of its own (a second field or scene), not a label, macro or thumbnail image (SVS: 5% or less)."""


def _level_of(page, base) -> float | None:
    """How many times smaller than ``base`` (the slide's page) TIFF ``page`` is, where it is of its shape
    (_downsample_of) and smaller: a pyramid level of it, unless _another_image; 1.0 for ``base``; None otherwise (a
    label or macro of another shape, or a larger page: a flagged macro larger than a small field was read as a level
    0.5x down)."""
    if page is base:
        return 1.0
    ds = _downsample_of(page, base)
    return ds if ds is not None and ds > 1.0 else None


def _another_image(page, base) -> bool:
    """Whether TIFF ``page`` holds an image of its own beside ``base`` (the slide's page): the same samples, at least
    OTHER_IMAGE_AREA of its area, not flagged a reduced image (pyramid levels, and Aperio's labels and macros), not
    stripped beside a tiled base (a thumbnail, as the level walk takes it), and not of its shape or less than
    MIN_LEVEL_DOWNSAMPLE smaller (a level is that far down, or flagged)."""
    if page.samplesperpixel != base.samplesperpixel or page.dtype != base.dtype or page.is_reduced:
        return False
    if base.is_tiled and not page.is_tiled:
        return False
    ds = _downsample_of(page, base)
    return _area(page) >= OTHER_IMAGE_AREA * _area(base) and (ds is None or ds < MIN_LEVEL_DOWNSAMPLE)


class TiffSlide(Slide):
    """Tiled (pyramidal, OME, Aperio SVS) or plain TIFF via tifffile, reading only the segments needed."""

    def __init__(self, path: Path, mpp: float | None, default_mpp: float | None = None):
        import tifffile

        self.path = path
        problem = _tiff_structure_problem(path)
        if problem:
            raise SlideError(path, problem)
        try:
            self._tif = tifffile.TiffFile(path)
            top = list(self._tif.pages)
            base = _base_page(top)
            # a pyramid in SubIFDs (OME-TIFF from QuPath, bfconvert): the levels of that image, no other's
            pages = top + (_subifd_levels(self._tif, base) if base is not None and base.subifds else [])
        except SlideError:
            raise
        except Exception as e:  # tifffile raises many types on corrupt input
            raise SlideError(path, f"not a readable TIFF ({type(e).__name__}: {e})") from None
        self._fd = None
        try:
            if base is None:
                raise SlideError(path, "TIFF has no images")
            # colour pages only: a channel a page (OME CYX, a fluorescence stack) is refused as greyscale below
            others = [p for p in top if p is not base and base.samplesperpixel >= 3 and _another_image(p, base)]
            if others:  # which of them is the slide, the file does not say
                shown = sorted([base, *others], key=top.index)
                sizes = {(p.imagewidth, p.imagelength) for p in shown}
                size = (f" of {base.imagewidth} x {base.imagelength} px" if len(sizes) == 1 else
                        f" ({', '.join(f'{p.imagewidth} x {p.imagelength}' for p in shown)} px)")
                raise SlideError(path, f"holds {len(shown)} images{size}, pages {', '.join(str(top.index(p)) for p in shown)}, "
                                       "none flagged as a reduced image (a pyramid level, label or macro) of another: several "
                                       "fields, scenes or focal planes in one file; save the one to score as a file of its own")
            _check_dimensions(path, base.imagewidth, base.imagelength)
            if base.imagedepth > 1:
                raise SlideError(path, f"3-D TIFF ({base.imagedepth} planes deep) is not supported; save one plane as RGB")
            self._check_page(base)
            w0, h0 = base.imagewidth, base.imagelength
            self.dimensions = (w0, h0)
            levels = []
            for p in pages:
                if p.samplesperpixel != base.samplesperpixel or p.dtype != base.dtype or p.imagedepth > 1:
                    continue
                _check_dimensions(path, p.imagewidth, p.imagelength)
                ds = _level_of(p, base)
                if ds is None:
                    continue  # label, macro or another image
                if any(abs(lv[1].width - p.imagewidth) <= 1 for lv in levels):
                    continue
                if self._segment_px(p) > MAX_PLAIN_PIXELS:
                    continue
                if base.is_tiled and not p.is_tiled:
                    continue  # a tiled pyramid's stripped page is its thumbnail (Aperio SVS), no level of it
                levels.append((p, Level(p.imagewidth, p.imagelength, ds)))
            if not any(p is base for p, _ in levels):
                raise SlideError(path, f"full-resolution image is stored in segments of {self._segment_px(base)} "
                                       "pixels, too large to decode; save it as a tiled TIFF")
            levels.sort(key=lambda pl: pl[1].downsample)
            self._pages = [p for p, _ in levels]
            self.levels = tuple(lv for _, lv in levels)
            size = path.stat().st_size
            for i, p in enumerate(self._pages):
                self._check_segments(p, i, size)
            across, down = _tiff_mpp(self._tif, base)
            _square_pixels(path, across, down)
            args = _mpp_args(path, across, mpp, default_mpp)
            self._take_mpp(args)
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._release = weakref.finalize(self, os.close, self._fd)  # closed with the slide, or when it is collected
            self._white = self._white_level(base)
            self.level_jpeg_quality = tuple(_tiff_jpeg_quality(self._tif, p) for p in self._pages)
            self.notes = ((_bits_note(self._white),) if base.dtype == np.uint16 else ())
        except BaseException:
            self._tif.close()
            raise

    @staticmethod
    def _segment_px(page) -> int:
        if page.is_tiled:
            return page.tilewidth * page.tilelength
        return page.imagewidth * min(page.rowsperstrip or page.imagelength, page.imagelength)

    def _check_page(self, page) -> None:
        photometric = int(page.photometric)
        spp = page.samplesperpixel
        if photometric == 3:
            raise SlideError(self.path, "palette (indexed-colour) TIFF; save it as 8-bit RGB")
        if photometric == 5:
            raise SlideError(self.path, "CMYK (separated) TIFF; save it as 8-bit RGB")
        if photometric in (8, 9, 10):
            raise SlideError(self.path, "CIE Lab TIFF; save it as 8-bit RGB")
        if spp < 3 or photometric in (0, 1) and spp - len(page.extrasamples or ()) < 3:
            bits = f"{page.dtype.itemsize * 8}-bit " if page.dtype.itemsize > 1 else ""
            raise NotHerIhcError(self.path, bits + _GREYSCALE)
        if page.dtype not in (np.uint8, np.uint16):
            raise SlideError(self.path, f"{page.dtype} samples; HER2 scoring needs 8-bit (or 16-bit) RGB brightfield images")
        if photometric == 6 and int(page.compression) in (1, 5, 8, 32773, 32946):
            raise SlideError(self.path, "YCbCr-coded uncompressed TIFF is not supported; save it as RGB")

    def _check_segments(self, page, level: int, file_size: int) -> None:
        offsets, counts = page.dataoffsets, page.databytecounts
        if len(offsets) == 0 or len(offsets) != len(counts):
            raise SlideError(self.path, f"corrupt TIFF: level {level} has no valid tile or strip table")
        th, tw, planes = _segment_grid(page)
        needed = planes * -(-page.imagelength // th) * -(-page.imagewidth // tw)
        if len(offsets) < needed:
            raise SlideError(self.path, f"corrupt TIFF: level {level} ({page.imagewidth} x {page.imagelength} px) needs "
                                        f"{needed} tiles/strips, its table has {len(offsets)}")
        ends = np.asarray(offsets, np.int64) + np.asarray(counts, np.int64)
        beyond = int(np.count_nonzero(ends > file_size))
        if beyond:
            raise SlideError(self.path, f"truncated TIFF: {beyond} of {len(ends)} tiles/strips of level {level} lie past "
                                        f"the end of the file ({file_size} bytes; the data run to byte {int(ends.max())})")

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self._release()
            self._fd = None
        self._tif.close()

    def _segment(self, page, level: int, index: int) -> np.ndarray | None:
        """Tile or strip ``index`` of ``page`` decoded, (rows, columns, samples); None where the file has none."""
        try:
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            if count == 0:
                return None
            data = os.pread(self._fd, count, offset)
            if len(data) < count:
                raise SlideError(self.path, f"truncated TIFF: tile/strip {index} of level {level} needs bytes "
                                            f"{offset}-{offset + count} but the file ends at byte "
                                            f"{offset + len(data)}")
            if page.compression == JPEG_COMPRESSION and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
                # libjpeg decodes a cut stream as grey without a word (OpenSlide refuses it)
                raise SlideError(self.path, f"corrupt JPEG in tile/strip {index} of level {level}: no end-of-image "
                                            "marker (the data are cut short or overwritten)")
            seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            return seg.reshape(seg.shape[-3:])
        except SlideError:
            raise
        except Exception as e:
            raise SlideError(self.path, f"corrupt image data in tile/strip {index} of level {level} "
                                        f"({type(e).__name__}: {e})") from None

    def _white_level(self, base, sample_segments: int = 64) -> int:
        """The sample value of white: the full scale of 8-15-bit samples; for 16-bit ones MaxSampleValue where
        the file gives it, else the full scale of the bits its brightest colour samples use (_white_of; glass is a
        brightfield slide's brightest: a 12-bit camera's samples stored unscaled reach 4095, not 65535), read
        on up to ``sample_segments`` tiles or strips of its smallest level spread over it (an alpha or other
        extra sample left out)."""
        if base.bitspersample < 16:  # 8-15 bits: their own full scale
            return (1 << base.bitspersample) - 1
        tag = base.tags.get("MaxSampleValue")
        top = int(np.max(np.atleast_1d(tag.value)[:3])) if tag is not None else 0
        if 0 < top < 65535:
            return top
        level = len(self._pages) - 1
        page = self._pages[level]
        planes = _segment_grid(page)[2]
        per_plane = len(page.dataoffsets) // planes
        samples = []
        for plane in range(min(planes, 3)):  # separate planes: the colour ones; contiguous: the first 3 samples
            for index in np.unique(np.linspace(0, per_plane - 1, min(per_plane, sample_segments)).astype(int)):
                seg = self._segment(page, level, plane * per_plane + int(index))
                if seg is not None:
                    samples.append((seg if planes > 1 else seg[..., :3]).ravel())
        return _white_of(np.concatenate(samples) if samples else np.zeros(0, np.uint16))

    def _read_level(self, level, x, y, width, height):
        page = self._pages[level]
        if self._fd is None:
            raise SlideError(self.path, "slide is closed")
        th, tw, planes = _segment_grid(page)
        n_across = -(-page.imagewidth // tw)
        spp = page.samplesperpixel
        per_plane = len(page.dataoffsets) // planes
        white = self._white
        out = np.full((height, width, spp), white, page.dtype)
        for ty in range(y // th, (y + height - 1) // th + 1):
            for tx in range(x // tw, (x + width - 1) // tw + 1):
                sy, sx = ty * th, tx * tw
                ay0, ax0 = max(y, sy), max(x, sx)
                for plane in range(planes):
                    seg = self._segment(page, level, plane * per_plane + ty * n_across + tx)
                    if seg is None:
                        continue  # sparse file: a missing tile is empty glass
                    ay1, ax1 = min(y + height, sy + seg.shape[0]), min(x + width, sx + seg.shape[1])
                    channels = slice(plane, plane + 1) if planes > 1 else slice(None)
                    out[ay0 - y : ay1 - y, ax0 - x : ax1 - x, channels] = seg[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx]
        if out.dtype == np.uint16:  # 9-16 significant bits: white stays white (a level's rare brighter pixel, white too)
            out = _to_8bit(out, white)
        return _to_rgb(self.path, _without_extra_samples(out, page.extrasamples))


class OpenSlideSlide(Slide):
    """Vendor formats (NDPI, MRXS, SVS, generic tiled TIFF...) through OpenSlide."""

    def __init__(self, path: Path, mpp: float | None, default_mpp: float | None = None):
        try:
            import openslide
        except (ImportError, OSError) as e:  # openslide-python, or the OpenSlide library it loads, missing
            raise SlideError(path, f"OpenSlide is not available ({type(e).__name__}: {e}); install openslide-python "
                                   "and openslide-bin") from None

        self.path = path
        try:
            self._osr = openslide.OpenSlide(str(path))
        except Exception as e:
            problem = None
            if (kind := _sniff(path)[0]) in PLAIN_KINDS:  # only where the backend was forced
                problem = f"OpenSlide does not read {kind} images (the image backend does)"
            elif kind == "TIFF":  # TIFF-based formats too (NDPI, SCN, BIF): a truncated file says so
                problem = _tiff_structure_problem(path)
            elif path.suffix.lower() == ".mrxs" and not path.with_suffix("").is_dir():
                problem = f"its data folder {path.with_suffix('').name}/ is not beside it (an MRXS slide is the file and that folder)"
            raise SlideError(path, problem or f"OpenSlide cannot open it ({type(e).__name__}: {e})") from None
        try:
            w, h = self._osr.dimensions
            _check_dimensions(path, w, h)
            props = self._osr.properties
            # OpenSlide leaves out a vendor's value it cannot use (an Aperio MPP of nan): read as tifffile reads it
            meta = _number(props.get("openslide.mpp-x") or props.get("aperio.MPP"))
            down = _number(props.get("openslide.mpp-y") or props.get("aperio.MPP"))
            page = _tiff_page(path, (w, h))
            if page.bits > 8:
                raise SlideError(path, f"{page.bits}-bit samples, which OpenSlide reads by their high byte alone (a "
                                       "12-bit camera's values read nearly black): read it with the tifffile backend")
            if page.ome or meta is None:  # OME's PhysicalSize, as tifffile reads it, before OpenSlide's resolution tags
                meta, down = page.across, page.down
            _square_pixels(path, meta, down)
            args = _mpp_args(path, meta, mpp, default_mpp)
            self._take_mpp(args)
            self.dimensions = (w, h)
            self.levels = tuple(
                Level(lw, lh, float(ds))
                for (lw, lh), ds in zip(self._osr.level_dimensions, self._osr.level_downsamples)
            )
            self.level_jpeg_quality = self._tiff_level_jpeg_quality()
        except BaseException:
            self._osr.close()
            raise

    def _tiff_level_jpeg_quality(self) -> tuple[int | None, ...]:
        """Per level, _tiff_jpeg_quality of the page of the level's size, where the file is a TIFF tifffile
        reads (SVS, NDPI, BIF, generic TIFF); None for a level no page matches (a label or macro image is no
        level, nor are Leica SCN's, sized by the slide's area) and for other formats."""
        if _sniff(self.path)[0] != "TIFF":
            return ()
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tif:
                pages = {(p.imagewidth, p.imagelength): p for p in reversed(tif.pages)}  # the first of a size wins
                return tuple(_tiff_jpeg_quality(tif, pages[(lv.width, lv.height)]) if (lv.width, lv.height) in pages
                             else None for lv in self.levels)
        except Exception:  # tifffile reads no more of it than OpenSlide needs: no quality rather than no slide
            return ()

    def close(self) -> None:
        if self._osr is not None:  # a second close (a with block around a closed slide) does nothing
            self._osr.close()
            self._osr = None

    def _read_level(self, level, x, y, width, height):
        ds = self.levels[level].downsample
        try:
            rgba = np.asarray(self._osr.read_region((round(x * ds), round(y * ds)), level, (width, height)))
        except Exception as e:
            raise SlideError(self.path, f"OpenSlide read failed ({type(e).__name__}: {e})") from None
        return _to_rgb(self.path, rgba)


def missing_reason(path: str | os.PathLike, what: str = "file") -> str:
    """Why ``path``, which does not exist, is missing: a symbolic link to nothing, or no such ``what``."""
    return "a symbolic link to nothing (broken, or a loop)" if Path(path).is_symlink() else f"no such {what}"


def resolved_path(path: str | os.PathLike) -> Path:
    """``path`` with its links followed, or made absolute where they cannot be (broken, or a loop: Python
    3.11-3.12 raise RuntimeError for a loop, later ones OSError)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(path).absolute()


def unsupported_format(suffix: str) -> str:
    """Why no reader takes a file of ``suffix`` (lower case, none of SLIDE_SUFFIXES): a format known and not read
    (UNSUPPORTED_IMAGE_SUFFIXES), or none known."""
    if suffix in UNSUPPORTED_IMAGE_SUFFIXES:
        return (f"unsupported format '{suffix}'; convert it to PNG or TIFF (a whole slide: a tiled pyramidal TIFF; "
                f"supported: {', '.join(SLIDE_SUFFIXES)})")
    return f"unsupported format '{suffix or 'no suffix'}'; supported: {', '.join(SLIDE_SUFFIXES)}"


def open_slide(path: str | os.PathLike, *, mpp: float | None = None, backend: str | None = None,
               default_mpp: float | None = None) -> Slide:
    """Open a slide or field of view.

    ``mpp`` (µm/px), when given, is used whatever the file carries (``mpp_source`` notes a metadata value
    more than 5% off it); otherwise the file's metadata must give one, or else ``default_mpp`` is used where
    given (a batch of scans with µm/px and snapshots without: ``mpp_source`` says why). ``backend`` forces
    'tifffile', 'openslide' or 'image'; by default the file's suffix and first bytes decide (automatic_backend: a PNG
    or JPEG named .tif is read as what it is); the Slide's ``backend`` names the one taken. Raises SlideError naming
    the file and the reason.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(path, missing_reason(path))
    if path.is_dir():
        raise SlideError(path, "is a folder, not a slide (MRXS: pass the .mrxs file)")
    if not path.is_file():
        raise SlideError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")
    for value, name in ((mpp, "mpp, --mpp"), (default_mpp, "default_mpp, --default-mpp")):
        if value is not None and not _positive(value):
            raise SlideError(path, f"the µm/px given ({name}) must be a positive number, got {_shown(value)}")
    forced = checked_backend(backend)
    backend = forced or automatic_backend(path)  # which sniffed the file: a TIFF where it chose tifffile
    if backend == "tifffile":
        if forced and (kind := _sniff(path)[0]) != "TIFF":
            raise SlideError(path, f"tifffile reads TIFF files; this is a {kind} image (the image backend reads it)"
                             if kind in PLAIN_KINDS else "not a TIFF file (no TIFF header)")
        slide = TiffSlide(path, mpp, default_mpp)
    elif backend == "openslide":
        try:
            slide = OpenSlideSlide(path, mpp, default_mpp)
        except SlideError:
            if forced or path.suffix.lower() not in TIFF_SUFFIXES:  # no Philips TIFF (automatic_backend), a vendor's file
                raise
            backend, slide = "tifffile", TiffSlide(path, mpp, default_mpp)  # a Philips TIFF OpenSlide cannot take
    else:
        slide = _open_plain(path, mpp, default_mpp)
    slide.backend = backend
    return slide


def checked_backend(backend: str | None) -> str | None:
    """``backend`` as open_slide takes it: one of BACKENDS, or None (the reader the file chooses); else ValueError."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use {', '.join(map(repr, BACKENDS[:-1]))} or {BACKENDS[-1]!r}")
    return backend


def automatic_backend(path: str | os.PathLike) -> str:
    """The reader open_slide takes for ``path`` where no ``backend`` is given: its suffix's, unless its first bytes say
    a plain image (a PNG or JPEG named .tif or .ndpi is read as what it is). Raises SlideError naming the file where
    no reader takes it, or it is no regular file (never waiting on a FIFO)."""
    path = Path(path)
    if not path.is_file():  # a FIFO's first bytes wait for a writer
        raise SlideError(path, "not a regular file" if path.exists() else missing_reason(path))
    suffix = path.suffix.lower()
    if suffix in OPENSLIDE_SUFFIXES:
        return "image" if _sniff(path)[0] in PLAIN_KINDS else "openslide"
    if suffix not in TIFF_SUFFIXES + PLAIN_SUFFIXES:
        raise SlideError(path, unsupported_format(suffix))
    kind, head = _sniff(path)
    if kind is None:
        raise SlideError(path, f"not an image: named {path.suffix} but its content is not PNG, JPEG, BMP or "
                               f"TIFF (it starts with {head[:8]!r})")
    if kind != "TIFF":
        return "image"
    return "openslide" if _philips(path) else "tifffile"


def _philips(path: Path) -> bool:
    """Whether OpenSlide takes ``path`` for a Philips TIFF, whose levels are padded to whole tiles (their sizes no
    measure of their scale): OpenSlide reads it as Philips wrote it, tifffile's pages would not (open_slide falls back
    to tifffile where OpenSlide then cannot open it)."""
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path)) == "philips"
    except Exception:  # no OpenSlide, or a file it cannot read: tifffile says what is wrong with it
        return False
