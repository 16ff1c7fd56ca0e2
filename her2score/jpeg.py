"""The JPEG quality an image was saved at: from its quantisation tables where the file is a JPEG, or from its
pixels where it was saved losslessly since (a PNG or TIFF made from a JPEG, an array), whose 8 x 8 blocks keep
the steps the compression left."""
from __future__ import annotations

import numpy as np

__all__ = ["IJG_TABLES", "QUALITIES", "jpeg_quality", "dqt_tables", "pixel_jpeg_quality"]


IJG_TABLES = (
    (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99),
    (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
     47, 66, 99, 99, 99, 99, 99, 99, *[99] * 32),
)
"""The JPEG standard's luminance and chrominance quantisation tables (ITU T.81 Annex K), which libjpeg scales
by its quality."""


QUALITIES = np.arange(1, 101)
"""The IJG qualities, 1-100."""


def _scaled(standard) -> np.ndarray:
    """libjpeg's steps for the ``standard`` table's steps (one or many) at each of QUALITIES (rows): by 5000 / q %
    under quality 50, by 200 - 2q % from it, each rounded and kept within 1-255."""
    q = QUALITIES.reshape(-1, *[1] * np.ndim(standard))
    return np.clip((np.asarray(standard) * np.where(q < 50, 5000 // q, 200 - 2 * q) + 50) // 100, 1, 255)


def jpeg_quality(tables) -> int | None:
    """The lowest IJG quality (1-100) of a JPEG's quantisation ``tables`` ({table id: 64 steps, in any order}; id 0
    luminance, 1 chrominance, as Pillow's ``quantization``): per table, the quality whose scaling of its IJG_TABLES
    comes nearest its step sum, as libjpeg scales it (_scaled); None without a table. The chrominance table counts: brown DAB and
    blue haematoxylin differ in colour, and an encoder may keep the luminance fine and the colour coarse
    (cjpeg -quality 95,20)."""
    def against(standard: int, steps) -> int:
        sums = _scaled(IJG_TABLES[standard]).sum(1)
        return int(QUALITIES[np.argmin(np.abs(sums - int(np.sum(steps))))])

    # a table of another id (JPEG allows 0-3) may hold either component's steps: read as the kinder of the two
    qualities = [against(i, steps) if i in (0, 1) else max(against(0, steps), against(1, steps)) for i, steps in tables.items()]
    return min(qualities) if qualities else None


def dqt_tables(data: bytes) -> dict[int, list[int]]:
    """The quantisation tables ({id: 64 steps}) of the DQT segments of a JPEG stream or a TIFF's JPEGTables."""
    tables: dict[int, list[int]] = {}
    at = data.find(b"\xff\xdb")
    while at >= 0 and at + 4 <= len(data):
        end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        i = at + 4
        while i < min(end, len(data)):
            precision, table = data[i] >> 4, data[i] & 15
            size = 128 if precision else 64
            steps = data[i + 1 : i + 1 + size]
            if len(steps) < size:
                return tables
            tables.setdefault(table, list(np.frombuffer(steps, ">u2" if precision else np.uint8).astype(int)))
            i += 1 + size
        at = data.find(b"\xff\xdb", end)
    return tables


_DCT = np.array([[np.sqrt((1 if u == 0 else 2) / 8) * np.cos((2 * x + 1) * u * np.pi / 16) for x in range(8)] for u in range(8)])
"""The 8-point orthonormal DCT-II matrix: JPEG's 8 x 8 block transform is _DCT @ block @ _DCT.T."""

_STEPS = np.arange(2, 161)
"""Quantisation steps looked for (luminance, lowest frequencies): IJG quality 5 to 95."""

_LOWEST = ((0, 0), (0, 1), (1, 0), (1, 1))
"""The (row, column) frequencies whose steps are read: every textured block holds them."""


def _luminance_blocks(y: np.ndarray, row: int, col: int) -> np.ndarray:
    """The whole 8 x 8 blocks (n, 8, 8) of ``y`` (NaN where a colour sample is clipped) on the grid starting at
    (``row``, ``col``) that hold texture and no clipped sample: not flat glass, whose DC sits on every step
    alike, nor a block whose colours were clipped to 0 or 255 when decoded, which moves its luminance off the
    steps (a bright pink H&E)."""
    h, w = (y.shape[0] - row) // 8 * 8, (y.shape[1] - col) // 8 * 8
    b = y[row : row + h, col : col + w].reshape(h // 8, 8, w // 8, 8).swapaxes(1, 2).reshape(-1, 8, 8)
    return b[b.std(axis=(1, 2)) > 1.0]  # NaN fails the comparison


def _step(values: np.ndarray, *, least: int = 100, agreement: float = 0.5) -> int | None:
    """The step of _STEPS whose multiples ``values`` (one DCT coefficient over blocks) sit on most closely: the mean
    cosine of 2 pi value / step over the values past half a step, 1 on the multiples and ~0 for values spread
    evenly, is highest at the step itself (at half of it the noise about each multiple counts twice; at twice
    it, the odd multiples count against it); None where no step reaches ``agreement`` over ``least`` values."""
    values = values[np.abs(values) > 1.0]
    past = np.abs(values)[:, None] > _STEPS / 2
    n = past.sum(axis=0)
    closeness = np.where(n >= least, (np.cos(2 * np.pi * values[:, None] / _STEPS) * past).sum(axis=0) / np.maximum(n, 1), -1.0)
    best = int(np.argmax(closeness))
    return int(_STEPS[best]) if closeness[best] >= agreement else None


def pixel_jpeg_quality(rgb: np.ndarray, *, size_px: int = 768, phase_px: int = 384, most_blocks: int = 4000) -> int | None:
    """The IJG quality an image was last saved at as a JPEG, read from its pixels (uint8 RGB): for a copy saved
    losslessly since (a PNG, an uncompressed TIFF, an array), whose file has no quantisation tables.

    On a central ``size_px`` square, the block grid is the one of the 64 offsets whose textured blocks' DC
    coefficients (in its central ``phase_px`` square) take the fewest distinct values (to the nearest unit: on the grid they sit on multiples of a
    step; off it they spread); on it, each of the four lowest frequencies' luminance coefficients (of up to
    ``most_blocks`` blocks) gives its step, and the quality that scales IJG_TABLES' step to it (libjpeg's
    scaling); the median of those found (at least two). None where no grid shows steps: never a JPEG, or resized
    since (which blurs the blocks too). Luminance only: an encoder that kept the colour coarser than the
    luminance reads as its luminance quality here (jpeg_quality, from the tables, takes the lower)."""
    h, w = rgb.shape[:2]
    top, left = max(0, (h - size_px) // 2), max(0, (w - size_px) // 2)
    crop = rgb[top : top + size_px, left : left + size_px, :3]
    y = crop.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) - 128.0  # JPEG's luminance, level-shifted as it codes it
    y[(crop.max(axis=2) == 255) | (crop.min(axis=2) == 0)] = np.nan
    grids = [(row, col) for row in range(8) for col in range(8)]
    r0, c0 = (y.shape[0] - phase_px) // 16 * 8, (y.shape[1] - phase_px) // 16 * 8  # a central square, on y's own grid
    middle = y[max(r0, 0) : r0 + phase_px + 8, max(c0, 0) : c0 + phase_px + 8]
    spread = []
    for row, col in grids:
        dc = _luminance_blocks(middle, row, col).sum(axis=(1, 2)) / 8.0  # the orthonormal transform's (0, 0)
        spread.append(len(np.unique(np.round(dc))) / max(len(dc), 1))
    blocks = _luminance_blocks(y, *grids[int(np.argmin(spread))])
    if len(blocks) > most_blocks:
        blocks = blocks[np.random.default_rng(0).choice(len(blocks), most_blocks, replace=False)]
    coefficients = np.einsum("ux,nxy,vy->nuv", _DCT, blocks, _DCT, optimize=True)
    qualities = []
    for u, v in _LOWEST:
        step = _step(coefficients[:, u, v])
        if step is None:
            continue
        matching = QUALITIES[_scaled(IJG_TABLES[0][8 * u + v]) == step]
        if len(matching):
            qualities.append(float(np.median(matching)))
    return round(float(np.median(qualities))) if len(qualities) >= 2 else None
