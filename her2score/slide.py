"""One Slide interface over tiled TIFF (tifffile), vendor formats (OpenSlide) and plain images.

Coordinates: the slide API speaks (x, y) and (width, height); ``location`` is in level-0
pixels, ``size`` in output pixels at the requested µm/px. Arrays are (row, col, RGB) uint8.
"""
from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "Slide",
    "SlideError",
    "open_slide",
    "ArraySlide",
    "SLIDE_SUFFIXES",
    "MAX_PLAIN_PIXELS",
    "MAX_DIMENSION",
]

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".qptiff")
OPENSLIDE_SUFFIXES = (".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SLIDE_SUFFIXES = TIFF_SUFFIXES + OPENSLIDE_SUFFIXES + PLAIN_SUFFIXES
MAX_PLAIN_PIXELS = 16_000 * 16_000
"""Largest image decoded whole (plain images, untiled TIFF pages): bigger ones must be tiled."""
MAX_DIMENSION = 2**21
"""Largest width or height accepted from any header (decompression-bomb guard)."""
PLAUSIBLE_MPP = (0.05, 20.0)
"""µm/px outside this range in metadata is treated as absent (e.g. a 72-dpi default)."""


class SlideError(Exception):
    """A slide that cannot be read; the message names the file and the reason."""

    def __init__(self, path: os.PathLike | str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float


class Slide(ABC):
    """A readable slide: level-0 size in pixels, µm/px, and region reads at any µm/px."""

    path: Path
    dimensions: tuple[int, int]
    mpp: float
    mpp_source: str
    levels: tuple[Level, ...]

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

        Parts outside the slide are white glass.
        """
        width, height = size
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {size}")
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
        patch = self._read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        # place the in-bounds part into the output frame
        f = ds / scale  # output px per level px
        ox0, oy0 = round((ix0 - x0) * f), round((iy0 - y0) * f)
        ow = min(width - ox0, round((ix1 - ix0) * f))
        oh = min(height - oy0, round((iy1 - iy0) * f))
        if ow <= 0 or oh <= 0:
            return out
        if patch.shape[1] != ow or patch.shape[0] != oh:
            interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
            patch = cv2.resize(patch, (ow, oh), interpolation=interp)
        out[oy0 : oy0 + oh, ox0 : ox0 + ow] = patch
        return out

    def thumbnail(self, *, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` µm/px (use a coarse mpp: this is one array)."""
        w, h = self.dimensions
        size = (max(1, round(w * self.mpp / mpp)), max(1, round(h * self.mpp / mpp)))
        return self.read_region((0, 0), size, mpp=mpp)

    def _best_level(self, scale: float) -> int:
        """The coarsest level that is at least as fine as ``scale`` level-0 px per output px."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= scale * 1.01 and lv.downsample >= self.levels[best].downsample:
                best = i
        return best

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, dimensions={self.dimensions}, mpp={self.mpp:.4g})"


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


def _to_rgb(path, arr: np.ndarray) -> np.ndarray:
    """Validate an image array as 8-bit colour; RGBA is composited over white."""
    if arr.dtype != np.uint8:
        raise SlideError(path, f"{arr.dtype} pixels ({arr.dtype.itemsize * 8}-bit); HER2 scoring needs 8-bit RGB "
                               "brightfield images (convert to 8-bit RGB)")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 2)):
        raise SlideError(path, "greyscale image; HER2 scoring needs RGB colour to separate DAB from haematoxylin")
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise SlideError(path, f"unsupported pixel layout {arr.shape}")
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(arr)


class ArraySlide(Slide):
    """An in-memory RGB field of view (also what plain PNG/JPEG files become)."""

    def __init__(self, rgb: np.ndarray, *, mpp: float, path: str | os.PathLike = "<array>", mpp_source="user"):
        if mpp is None or not mpp > 0:
            raise SlideError(path, "no microns-per-pixel: pass mpp (µm/px) for an in-memory image")
        self.path = Path(path)
        self._rgb = _to_rgb(path, np.asarray(rgb))
        h, w = self._rgb.shape[:2]
        self.dimensions = (w, h)
        self.mpp, self.mpp_source = float(mpp), mpp_source
        self.levels = (Level(w, h, 1.0),)

    def _read_level(self, level, x, y, width, height):
        return self._rgb[y : y + height, x : x + width]


def _plain_mpp(img) -> float | None:
    dpi = img.info.get("dpi")
    if dpi and dpi[0]:
        return _plausible(25400.0 / float(dpi[0]))
    return None


def _open_plain(path: Path, mpp: float | None) -> ArraySlide:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            _check_dimensions(path, *img.size)
            if img.size[0] * img.size[1] > MAX_PLAIN_PIXELS:
                raise SlideError(path, f"{img.size[0]} x {img.size[1]} plain image is too large to decode whole; "
                                       "save it as a tiled pyramidal TIFF")
            meta_mpp = _plain_mpp(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise SlideError(path, f"{img.mode} pixels (16/32-bit greyscale); HER2 scoring needs 8-bit RGB")
            if img.mode in ("L", "LA", "1"):
                raise SlideError(path, "greyscale image; HER2 scoring needs RGB colour to separate DAB from haematoxylin")
            if img.mode == "P":
                img = img.convert("RGBA")
            elif img.mode not in ("RGB", "RGBA"):
                img = img.convert("RGB")
            arr = np.asarray(img)
    except SlideError:
        raise
    except UnidentifiedImageError:
        raise SlideError(path, f"not a readable image although named {path.suffix}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SlideError(path, f"cannot decode image ({e}); truncated or corrupt file") from None
    return ArraySlide(arr, **_mpp_args(path, meta_mpp, mpp))


def _mpp_args(path, meta_mpp: float | None, user_mpp: float | None) -> dict:
    if meta_mpp:
        return {"mpp": meta_mpp, "path": path, "mpp_source": "metadata"}
    if user_mpp:
        return {"mpp": float(user_mpp), "path": path, "mpp_source": "user"}
    raise SlideError(path, "no microns-per-pixel in the file's metadata; pass --mpp (e.g. --mpp 0.5)")


def _tiff_mpp(tif, page) -> float | None:
    desc = page.tags.get("ImageDescription")
    text = desc.value if desc else ""
    if isinstance(text, bytes):
        text = text.decode("latin-1", "replace")
    m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", text)  # Aperio
    if m:
        return _plausible(float(m.group(1)))
    if tif.is_ome:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata or "")
        u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata or "")
        if m:
            factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(u.group(1) if u else "µm", 1.0)
            return _plausible(float(m.group(1)) * factor)
    xres, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if xres and unit:
        num, den = xres.value
        if num and den:
            px_per_unit = num / den
            per_unit_um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            if per_unit_um:
                return _plausible(per_unit_um / px_per_unit)
    return None


class TiffSlide(Slide):
    """Tiled (pyramidal, OME, Aperio SVS) or plain TIFF via tifffile, reading only the segments needed."""

    def __init__(self, path: Path, mpp: float | None):
        import tifffile

        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
            pages = list(self._tif.pages)
        except SlideError:
            raise
        except Exception as e:  # tifffile raises many types on corrupt input
            raise SlideError(path, f"not a readable TIFF ({type(e).__name__}: {e})") from None
        try:
            if not pages:
                raise SlideError(path, "TIFF has no images")
            base = pages[0]
            _check_dimensions(path, base.imagewidth, base.imagelength)
            self._check_page(base)
            meta = _tiff_mpp(self._tif, base)
            args = _mpp_args(path, meta, mpp)
            self.mpp, self.mpp_source = args["mpp"], args["mpp_source"]
            w0, h0 = base.imagewidth, base.imagelength
            self.dimensions = (w0, h0)
            levels = []
            for p in pages:
                if p.samplesperpixel != base.samplesperpixel or p.dtype != base.dtype or p.imagedepth > 1:
                    continue
                _check_dimensions(path, p.imagewidth, p.imagelength)
                ds = w0 / p.imagewidth
                if abs(h0 / ds - p.imagelength) > 2 + 0.01 * p.imagelength:
                    continue  # label or macro image
                if any(abs(lv[1].width - p.imagewidth) <= 1 for lv in levels):
                    continue
                if not p.is_tiled and p.imagewidth * p.imagelength > MAX_PLAIN_PIXELS:
                    continue
                levels.append((p, Level(p.imagewidth, p.imagelength, ds)))
            if not levels:
                raise SlideError(path, "full-resolution TIFF page is untiled and too large to decode; save it tiled")
            levels.sort(key=lambda pl: pl[1].downsample)
            self._pages = [p for p, _ in levels]
            self.levels = tuple(lv for _, lv in levels)
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except BaseException:
            self._tif.close()
            raise

    def _check_page(self, page) -> None:
        if page.samplesperpixel < 3:
            raise SlideError(self.path, "greyscale image; HER2 scoring needs RGB colour to separate DAB from haematoxylin")
        if page.dtype != np.uint8:
            raise SlideError(self.path, f"{page.dtype} samples; HER2 scoring needs 8-bit RGB brightfield images")
        if page.planarconfig != 1 and page.samplesperpixel > 1:
            raise SlideError(self.path, "planar (separate-plane) TIFF is not supported; save as contiguous RGB")

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()

    def _read_level(self, level, x, y, width, height):
        page = self._pages[level]
        if page.is_tiled:
            th, tw = page.tilelength, page.tilewidth
        else:
            th, tw = page.rowsperstrip or page.imagelength, page.imagewidth
        th, tw = min(th, page.imagelength), min(tw, page.imagewidth)
        n_across = -(-page.imagewidth // tw)
        out = np.empty((height, width, page.samplesperpixel), np.uint8)
        for ty in range(y // th, (y + height - 1) // th + 1):
            for tx in range(x // tw, (x + width - 1) // tw + 1):
                index = ty * n_across + tx
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                try:
                    data = os.pread(self._fd, count, offset)
                    if len(data) < count:
                        raise OSError(f"segment {index} ends past the end of the file")
                    seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
                except Exception as e:
                    raise SlideError(self.path, f"corrupt or truncated image data in level {level} "
                                                f"segment {index} ({type(e).__name__}: {e})") from None
                seg = seg.reshape(seg.shape[-3:])
                sy, sx = ty * th, tx * tw
                ay0, ax0 = max(y, sy), max(x, sx)
                ay1, ax1 = min(y + height, sy + seg.shape[0]), min(x + width, sx + seg.shape[1])
                out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = seg[ay0 - sy : ay1 - sy, ax0 - sx : ax1 - sx]
        return _to_rgb(self.path, out)


class OpenSlideSlide(Slide):
    """Vendor formats (NDPI, MRXS, SVS, generic tiled TIFF...) through OpenSlide."""

    def __init__(self, path: Path, mpp: float | None):
        import openslide

        self.path = path
        try:
            self._osr = openslide.OpenSlide(str(path))
        except Exception as e:
            raise SlideError(path, f"OpenSlide cannot open it ({type(e).__name__}: {e})") from None
        try:
            w, h = self._osr.dimensions
            _check_dimensions(path, w, h)
            props = self._osr.properties
            meta = None
            if props.get("openslide.mpp-x"):
                meta = _plausible(float(props["openslide.mpp-x"]))
            args = _mpp_args(path, meta, mpp)
            self.mpp, self.mpp_source = args["mpp"], args["mpp_source"]
            self.dimensions = (w, h)
            self.levels = tuple(
                Level(lw, lh, float(ds))
                for (lw, lh), ds in zip(self._osr.level_dimensions, self._osr.level_downsamples)
            )
        except BaseException:
            self._osr.close()
            raise

    def close(self) -> None:
        self._osr.close()

    def _read_level(self, level, x, y, width, height):
        ds = self.levels[level].downsample
        try:
            rgba = np.asarray(self._osr.read_region((round(x * ds), round(y * ds)), level, (width, height)))
        except Exception as e:
            raise SlideError(self.path, f"OpenSlide read failed ({type(e).__name__}: {e})") from None
        return _to_rgb(self.path, rgba)


def open_slide(path: str | os.PathLike, *, mpp: float | None = None, backend: str | None = None) -> Slide:
    """Open a slide or field of view.

    ``mpp`` (µm/px) is used only when the file carries none. ``backend`` forces
    'tifffile', 'openslide' or 'image'; by default the file's suffix decides.
    Raises SlideError naming the file and the reason.
    """
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "no such file")
    if path.is_dir():
        raise SlideError(path, "is a folder, not a slide (MRXS: pass the .mrxs file)")
    if path.stat().st_size == 0:
        raise SlideError(path, "empty file (0 bytes)")
    if mpp is not None and not (mpp > 0):
        raise SlideError(path, f"--mpp must be positive, got {mpp}")
    suffix = path.suffix.lower()
    if backend is None:
        if suffix in TIFF_SUFFIXES:
            backend = "tifffile"
        elif suffix in OPENSLIDE_SUFFIXES:
            backend = "openslide"
        elif suffix in PLAIN_SUFFIXES:
            backend = "image"
        else:
            raise SlideError(path, f"unsupported format '{suffix or 'no suffix'}'; supported: {', '.join(SLIDE_SUFFIXES)}")
    if backend == "tifffile":
        return TiffSlide(path, mpp)
    if backend == "openslide":
        return OpenSlideSlide(path, mpp)
    if backend == "image":
        return _open_plain(path, mpp)
    raise ValueError(f"unknown backend {backend!r}; use 'tifffile', 'openslide' or 'image'")
