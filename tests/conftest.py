"""Small real inputs written into temporary folders: synthetic IHC fields as PNG/JPEG with µm/px in
their metadata, a small pyramidal TIFF, and a corpus of bad inputs (each a few bytes to a few kB,
generated here, nothing committed)."""
from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from her2score.synthetic import generate_field, generate_he_field, make_slide, write_pyramidal_tiff

FIELD_PX = (384, 384)
"""Synthetic fields: big enough for a tissue region (the tissue mask drops pieces under 0.02 mm²), small enough to be fast."""
SLIDE_PX = (1024, 768)
SLIDE_MPP = 0.25


def save_png(path, rgb: np.ndarray, *, mpp: float | None = 0.5) -> Path:
    """A PNG with its µm/px in the pHYs chunk (none when ``mpp`` is None)."""
    path = Path(path)
    img = Image.fromarray(rgb)
    img.save(path, dpi=(25400.0 / mpp,) * 2) if mpp else img.save(path)
    return path


def save_jpeg(path, rgb: np.ndarray, *, mpp: float | None = 0.5, quality: int = 92) -> Path:
    """A JPEG with its µm/px as JFIF density in px/cm, as scanners write it (the JFIF field is
    16-bit: in dots per inch it would overflow below 0.39 µm/px)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality, dpi=(1, 1))
    data = bytearray(buf.getvalue())
    if mpp:
        i = data.index(b"JFIF\x00")
        density = round(1e4 / mpp).to_bytes(2, "big")
        data[i + 7] = 2  # units: dots per cm
        data[i + 8 : i + 12] = density + density
    else:
        i = data.index(b"JFIF\x00")
        data[i + 7 : i + 12] = b"\x00\x00\x01\x00\x01"  # aspect ratio only: no resolution
    Path(path).write_bytes(bytes(data))
    return Path(path)


def save_tiff(path, data: np.ndarray, *, mpp: float | None = 0.5, **kw) -> Path:
    """A plain (untiled) TIFF with resolution tags in px/cm."""
    path = Path(path)
    if mpp:
        kw.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    tifffile.imwrite(path, data, **kw)
    return path


@pytest.fixture(scope="session")
def fields() -> dict[str, np.ndarray]:
    """One synthetic RGB field per score (384 x 384 at 0.5 µm/px)."""
    return {s: generate_field(s, seed=100 + i, size_px=FIELD_PX).image for i, s in enumerate(("0", "1+", "2+", "3+"))}


@pytest.fixture(scope="session")
def slide_rgb() -> np.ndarray:
    """A small whole-slide-like image (1024 x 768 at 0.25 µm/px) with glass around the tissue."""
    rgb, _ = make_slide("2+", seed=7, size_px=SLIDE_PX, mpp=SLIDE_MPP)
    return rgb


@pytest.fixture(scope="session")
def pyramid_tiff(tmp_path_factory, slide_rgb) -> Path:
    """Tiled JPEG pyramidal TIFF (levels 1024x768 and 512x384), resolution in px/cm. Read-only: copy to change."""
    return write_pyramidal_tiff(tmp_path_factory.mktemp("pyramid") / "slide.tif", slide_rgb, mpp=SLIDE_MPP)


@pytest.fixture(scope="session")
def good_png(tmp_path_factory, fields) -> Path:
    """A 2+ field as PNG with 0.5 µm/px in pHYs. Read-only: copy to change."""
    return save_png(tmp_path_factory.mktemp("good") / "good 2+.png", fields["2+"])


@pytest.fixture
def slide_folder(tmp_path, good_png) -> Path:
    """A folder holding one good slide; tests add bad ones beside it."""
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(good_png, folder / good_png.name)
    return folder


# --------------------------------------------------------------------------- bad-input corpus

def tiff_header_bomb(path, width: int = 10**7, height: int = 10**7) -> Path:
    """A 222-byte classic TIFF whose one directory claims ``width`` x ``height`` RGB pixels in one strip."""
    entries = [  # (tag, type, count, value): types 3 = SHORT, 4 = LONG
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
        (273, 4, 1, 8), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, 100),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack("<HHII", tag, typ, count, value) if typ == 4 else struct.pack("<HHIHH", tag, typ, count, value, 0)
    ifd += struct.pack("<I", 0)
    Path(path).write_bytes(b"II*\x00" + struct.pack("<I", 8 + 100) + bytes(100) + ifd)
    return Path(path)


def png_header_bomb(path, width: int = 10**7, height: int = 10**7) -> Path:
    """A 57-byte PNG whose header claims ``width`` x ``height`` RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return Path(path)


def truncated_copy(src, dst, fraction: float = 0.5) -> Path:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def write_bad(kind: str, folder: Path, *, fields: dict, pyramid: Path) -> Path:
    """Write one bad input named after its case into ``folder`` and return its path."""
    folder = Path(folder)
    f = fields["2+"]
    if kind == "zero_byte":
        p = folder / "empty.tif"
        p.write_bytes(b"")
    elif kind == "truncated_tiff":
        p = truncated_copy(pyramid, folder / "truncated.tif")
    elif kind == "text_as_png":
        p = folder / "notes.png"
        p.write_text("Patient 12, block B3: HER2 requested\n" * 5)
    elif kind == "text_as_tif":
        p = folder / "notes.tif"
        p.write_text("Patient 12, block B3: HER2 requested\n" * 5)
    elif kind == "unsupported_xyz":
        p = folder / "scan.xyz"
        p.write_bytes(b"XYZ\x00" + bytes(60))
    elif kind == "unsupported_docx":
        p = folder / "report.docx"
        p.write_bytes(b"PK\x03\x04" + bytes(60))
    elif kind == "tiff_bomb":
        p = tiff_header_bomb(folder / "bomb.tif")
    elif kind == "png_bomb":
        p = png_header_bomb(folder / "bomb.png")
    elif kind == "grey_png":
        p = save_png(folder / "grey.png", f[..., 1])
    elif kind == "grey_tif":
        p = save_tiff(folder / "grey.tif", f[..., 1])
    elif kind == "grey16_png":
        p = save_png(folder / "grey16.png", f[..., 1].astype(np.uint16) * 257)
    elif kind == "grey16_tif":
        p = save_tiff(folder / "grey16.tif", f[..., 1].astype(np.uint16) * 257)
    elif kind == "white":
        p = save_png(folder / "white.png", np.full(f.shape, 255, np.uint8))
    elif kind == "black":
        p = save_png(folder / "black.png", np.zeros(f.shape, np.uint8))
    elif kind == "he":
        p = save_png(folder / "h&e.png", generate_he_field(seed=5, size_px=f.shape[1::-1]))
    elif kind == "no_mpp":
        p = save_png(folder / "no-mpp.png", f, mpp=None)
    else:
        raise ValueError(kind)
    return p


def save_png16_rgb(path, rgb16: np.ndarray, *, mpp: float = 0.5) -> Path:
    """A 16-bit RGB PNG (cv2 writes it) with a pHYs chunk added for its µm/px."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb16[..., ::-1]))
    assert ok
    data = buf.tobytes()
    ppm = round(1e6 / mpp)
    body = b"pHYs" + struct.pack(">IIB", ppm, ppm, 1)
    phys = struct.pack(">I", 9) + body + struct.pack(">I", zlib.crc32(body))
    end_ihdr = 8 + 8 + 13 + 4
    Path(path).write_bytes(data[:end_ihdr] + phys + data[end_ihdr:])
    return Path(path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a test module: on a shared 2-core machine spinning OpenMP threads
    are many times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
