"""Nuclei from haematoxylin optical density, and cells grown from them or enclosed by stained membrane (label images)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np
from skimage.segmentation._watershed_cy import watershed_raveled

__all__ = ["COARSE_MPP", "FLOOD_MPP", "segment_nuclei", "nuclear_rise", "NucleusThresholds", "counterstain_od", "nucleus_thresholds",
           "measure_nucleus_thresholds", "membrane_basins", "grow_cells"]


def disk(radius_px: float) -> np.ndarray:
    """Round structuring element: the pixels within ``radius_px`` (rounded, at least 1 px) of its
    centre, x² + y² <= r², as ``skimage.morphology.disk``; the same turned or mirrored (OpenCV's
    MORPH_ELLIPSE is a pixel wider than tall, so a transposed field read otherwise)."""
    r = max(1, int(round(radius_px)))
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y <= r * r).astype(np.uint8)


COARSE_MPP = 2.0
"""µm/px at which local_background computes its opening by default."""
FLOOD_MPP = 1.0
"""µm/px at which grow_cells floods by default."""


def local_background(image: np.ndarray, *, mpp: float, radius_um: float, coarse_mpp: float = COARSE_MPP) -> np.ndarray:
    """Grey opening of ``image`` with a disk of ``radius_um`` (structures narrower than the disk removed).

    Computed at ``coarse_mpp`` µm/px and brought back to the image's size: the level a small bright
    object (a nucleus, a membrane) stands on.
    """
    f = min(1.0, mpp / coarse_mpp)
    small = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA) if f < 1 else image
    opened = cv2.morphologyEx(small, cv2.MORPH_OPEN, disk(radius_um * f / mpp))
    if f < 1:
        return np.minimum(cv2.resize(opened, image.shape[::-1], interpolation=cv2.INTER_LINEAR), image)
    return opened  # an opening by a symmetric disk never exceeds the image


def _smoothed(hematoxylin_od: np.ndarray, mpp: float) -> np.ndarray:
    return cv2.GaussianBlur(hematoxylin_od, (0, 0), 0.5 / mpp)


def nuclear_rise(nuclear_od: np.ndarray, *, mpp: float) -> np.ndarray:
    """How far a smoothed nuclear OD image stands above its level, its grey opening with an 8 µm disk (log10 OD):
    what segment_nuclei thresholds by ``contrast_od``, and where measure_cells finds each nucleus's core."""
    return nuclear_od - local_background(nuclear_od, mpp=mpp, radius_um=8.0)


def _nuclear_mask(smooth: np.ndarray, rise: np.ndarray, *, mpp: float, threshold_od: float, contrast_od: float,
                  min_width_um: float = 2.0) -> np.ndarray:
    """uint8 mask of segment_nuclei's nuclear pixels in ``smooth`` (its smoothed nuclear OD; ``rise``: its
    nuclear_rise), before splitting."""
    mask = ((smooth >= threshold_od) & (rise >= contrast_od)).astype(np.uint8)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, disk(0.5 * min_width_um / mpp))


COUNTERSTAIN_RATIO = 0.85
"""Default: a nucleus threshold is never above this share of the counterstain's level (nucleus_thresholds)."""


@dataclass(frozen=True)
class NucleusThresholds:
    """segment_nuclei's ``threshold_od`` and ``contrast_od`` (log10 OD) for a counterstain whose level
    is ``counterstain`` (counterstain_od; None: not measured, or no nuclei found)."""

    counterstain: float | None
    threshold_od: float
    contrast_od: float


def counterstain_od(hematoxylin_ods: Iterable[np.ndarray], *, mpp: float, threshold_od: float,
                    contrast_od: float) -> float | None:
    """The counterstain's level (log10 OD): the median haematoxylin OD, smoothed as segment_nuclei
    smooths it, over segment_nuclei's haematoxylin mask (before compact DAB blobs are added) at
    ``threshold_od`` and ``contrast_od`` (half the usual: measure_nucleus_thresholds) in one or more
    tiles at ``mpp`` µm/px: pale nuclei as well as dark ones, so it falls with the counterstain. None
    where the mask is empty."""
    values = []
    for h in hematoxylin_ods:
        smooth = _smoothed(h, mpp)
        mask = _nuclear_mask(smooth, nuclear_rise(smooth, mpp=mpp), mpp=mpp, threshold_od=threshold_od, contrast_od=contrast_od)
        values.append(smooth[mask > 0])
    values = np.concatenate(values) if values else np.zeros(0, np.float32)
    return float(np.median(values)) if len(values) else None


def nucleus_thresholds(counterstain: float | None, *, threshold_od: float = 0.10, contrast_od: float = 0.05,
                       ratio: float = COUNTERSTAIN_RATIO, min_scale: float = 0.5) -> NucleusThresholds:
    """segment_nuclei's thresholds for a counterstain whose level is ``counterstain`` (counterstain_od):
    ``threshold_od`` and ``contrast_od`` both scaled down where ``ratio`` x the level is under
    threshold_od (a pale counterstain, whose nuclei a fixed threshold would lose), to no less than
    ``min_scale`` of themselves; as given for a level of at least threshold_od / ratio, for None and
    for ``ratio`` 0."""
    scale = 1.0
    if counterstain is not None and ratio > 0 and threshold_od > 0:
        scale = float(np.clip(ratio * counterstain / threshold_od, min_scale, 1.0))
    return NucleusThresholds(counterstain, threshold_od * scale, contrast_od * scale)


def measure_nucleus_thresholds(hematoxylin_ods: Iterable[np.ndarray], *, mpp: float, threshold_od: float = 0.10,
                               contrast_od: float = 0.05, ratio: float = COUNTERSTAIN_RATIO,
                               min_scale: float = 0.5) -> NucleusThresholds:
    """nucleus_thresholds for the counterstain of these tiles, measured (counterstain_od) at
    ``min_scale`` of the thresholds, the least they can fall to. With ``ratio`` 0 the level is
    measured and the thresholds stay as given."""
    level = counterstain_od(hematoxylin_ods, mpp=mpp, threshold_od=min_scale * threshold_od,
                            contrast_od=min_scale * contrast_od)
    return nucleus_thresholds(level, threshold_od=threshold_od, contrast_od=contrast_od, ratio=ratio, min_scale=min_scale)


def segment_nuclei(
    hematoxylin_od: np.ndarray,
    dab_od: np.ndarray | None = None,
    *,
    mpp: float,
    threshold_od: float = 0.10,
    contrast_od: float = 0.05,
    min_area_um2: float = 10.0,
    max_area_um2: float = 300.0,
    min_width_um: float = 2.0,
    neck_ratio: float = 0.85,
    nuclear_dab_od: float = 0.35,
    blob_radius_um: float = 2.0,
    min_blob_um2: float = 30.0,
    max_blob_spread: float = 2.5,
    return_rise: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Label image (int32, 0 = none) of nuclei in a haematoxylin log10 OD image at ``mpp`` µm/px; with
    ``return_rise``, also the nuclear_rise of the smoothed nuclear OD they were cut from (float32, log10 OD:
    haematoxylin, and the DAB of brown nuclei), from which measure_cells reads each nucleus's core.

    A nucleus pixel has smoothed haematoxylin OD of at least ``threshold_od`` and stands at least
    ``contrast_od`` above its surroundings (grey opening with an 8 µm disk), so haematoxylin that
    leaks into brown cytoplasm through imperfect stain vectors is not read as nuclei. Structures
    thinner than ``min_width_um`` (membranes, fibres) are opened away. Touching nuclei are split at
    necks: each core where the distance to the mask edge is at least ``neck_ratio`` of its local
    maximum (within 3 µm) seeds one nucleus, so an elongated nucleus stays whole. With ``dab_od``,
    nucleus-sized blobs of dark DAB (a Ki67-positive nucleus hides its haematoxylin) count as
    nuclear OD too: DAB of at least ``nuclear_dab_od`` left after opening away what is narrower
    than a ``blob_radius_um`` disk, in compact blobs of at least ``min_blob_um2`` (area at most
    ``max_blob_spread`` x the largest disk inside: a strong membrane network is branched), above
    its level over 12 µm (faint blush and broad staining excluded).
    """
    smooth = _smoothed(hematoxylin_od, mpp)
    if dab_od is not None:
        d = cv2.GaussianBlur(dab_od, (0, 0), 0.5 / mpp)
        n = 1
        if d.max() >= nuclear_dab_od:  # the opened DAB never exceeds the DAB itself
            # where the opened DAB reaches nuclear_dab_od: the opening of where the DAB does (a threshold
            # commutes with grey erosion and dilation), in uint8
            dark = local_background((d >= nuclear_dab_od).view(np.uint8), mpp=mpp, radius_um=blob_radius_um, coarse_mpp=mpp)
            n, comp = cv2.connectedComponents(dark, connectivity=8)
        if n > 1:
            at = np.flatnonzero(dark)
            blob = comp.ravel()[at]
            inscribed = np.zeros(n, np.float32)  # radius of the largest disk inside each blob, px
            np.maximum.at(inscribed, blob, cv2.distanceTransform(dark, cv2.DIST_L2, 5).ravel()[at])
            area = np.bincount(blob, minlength=n)
            # a nucleus is a compact blob; a strong membrane network's junctions form a branched one
            big = (area * (mpp * mpp) >= min_blob_um2) & (area <= max_blob_spread * np.pi * inscribed**2)
            big[0] = False
            if big.any():
                blobs = local_background(d, mpp=mpp, radius_um=blob_radius_um, coarse_mpp=mpp)
                blob_rise = np.maximum(blobs - local_background(blobs, mpp=mpp, radius_um=6.0), 0.0)
                np.add(smooth, blob_rise, out=smooth, where=big[comp])
    rise = nuclear_rise(smooth, mpp=mpp)
    mask = _nuclear_mask(smooth, rise, mpp=mpp, threshold_od=threshold_od, contrast_od=contrast_od, min_width_um=min_width_um)
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    dist_s = cv2.GaussianBlur(dist, (0, 0), 0.5 / mpp)
    core = (dist_s >= neck_ratio * cv2.dilate(dist_s, disk(3.0 / mpp))) & (dist >= 0.5 * min_width_um / mpp)
    _, markers = cv2.connectedComponents(core.astype(np.uint8), connectivity=8)
    labels = _split_at_necks(-dist, markers, mask)
    area = np.bincount(labels.ravel()) * (mpp * mpp)
    keep = (area >= min_area_um2) & (area <= max_area_um2)
    keep[0] = False
    labels = np.take(np.where(keep, np.arange(len(keep), dtype=np.int32), 0), labels)
    return (labels, rise) if return_rise else labels


_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)


def watershed(elevation: np.ndarray, markers: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``skimage.segmentation.watershed(elevation, markers, mask=mask)`` (4-connected) by its compiled
    core: importing skimage.segmentation's front end also imports scipy's sparse and spatial packages,
    half a second before the first tile. Only the marker pixels beside a pixel still to flood go on the
    flood's queue (a marker region's inside labels nothing: a third of the pixels of a tile's cell flood),
    so the labels are skimage's up to the order of markers of equal elevation, which its queue leaves
    arbitrary: the same where marker elevations differ. Pinned to the scikit-image versions whose flood
    this is (pyproject.toml; 0.23 and 0.24 labelled tied pixels otherwise); a test compares the two."""
    h, w = elevation.shape
    inner = np.s_[1 : h + 1, 1 : w + 1]  # each array framed by a pixel never flooded
    image = np.zeros((h + 2, w + 2))
    image[inner] = elevation
    output = np.zeros((h + 2, w + 2), markers.dtype)
    flood = np.zeros((h + 2, w + 2), bool)
    if mask is None:
        output[inner] = markers
        flood[inner] = True
    else:
        flood[inner] = mask
        np.multiply(markers, flood[inner], out=output[inner])
    to_flood = (flood & (output == 0)).view(np.uint8)
    front = np.flatnonzero((output != 0) & (cv2.dilate(to_flood, _CROSS) > 0))
    width = image.shape[1]
    watershed_raveled(image.ravel(), front, np.array([-width, -1, 1, width], np.intp),
                      flood.view(np.int8).ravel(), np.array([width, 1], np.intp), 0.0, output.ravel(), False)
    return output[inner].copy()


def _split_at_necks(elevation: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``watershed(elevation, markers, mask=mask)``, flooded only where it has to be: a 4-connected
    part of the mask with one marker takes that marker's label, one without any is 0, and the
    watershed runs on the parts holding two or more (touching nuclei), the same labels in fewer steps,
    given only their bounding box (the flood visits the same pixels in the same order; the
    watershed's fixed cost grows with the array it is given)."""
    n, parts = cv2.connectedComponents(mask, connectivity=4)
    at = np.flatnonzero(markers)
    stride = np.int64(markers.max()) + 1
    pairs = np.unique(parts.ravel()[at].astype(np.int64) * stride + markers.ravel()[at])
    part_of, marker_of = pairs // stride, pairs % stride
    count = np.bincount(part_of, minlength=n)
    label_of = np.zeros(n, np.int32)
    one = count[part_of] == 1
    label_of[part_of[one]] = marker_of[one]
    labels = np.take(label_of, parts)
    several = count >= 2
    if several.any():  # the watershed's labels are 0 off the shared parts, label_of 0 on them
        shared = np.take(several, parts)
        rows, cols = np.flatnonzero(shared.any(1)), np.flatnonzero(shared.any(0))
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        labels[box] += watershed(elevation[box], markers[box], mask=shared[box])
    return labels


def membrane_basins(
    membrane: np.ndarray,
    nuclei: np.ndarray,
    *,
    mpp: float,
    min_area_um2: float = 20.0,
    max_area_um2: float = 250.0,
    seal_um: float = 1.0,
) -> np.ndarray:
    """Cell interiors closed in by stained membrane that hold no detected nucleus (bool mask).

    In strongly stained tissue DAB can mask a nucleus while the membrane ring still outlines the
    cell. The membrane mask is closed over gaps up to ``seal_um``; each enclosed region of a cell's
    size (``min_area_um2``-``max_area_um2``) without a nucleus pixel is returned, shrunk by 1 µm.
    """
    sealed = cv2.morphologyEx(membrane.astype(np.uint8), cv2.MORPH_CLOSE, disk(0.5 * seal_um / mpp))
    n, comp = cv2.connectedComponents((sealed == 0).view(np.uint8), connectivity=4)
    area = np.bincount(comp.ravel(), minlength=n) * (mpp * mpp)
    inside = np.ones(n, bool)  # a region cut by the tile edge is not closed
    inside[np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1]])] = False
    nucleated = np.bincount(comp[nuclei > 0], minlength=n) > 0
    keep = (area >= min_area_um2) & (area <= max_area_um2) & inside & ~nucleated
    keep[0] = False
    basins = np.take(keep.view(np.uint8), comp)
    return cv2.erode(basins, disk(1.0 / mpp)).view(bool)


def _flood_markers(markers: np.ndarray, size: tuple[int, int], outside_label: int) -> np.ndarray:
    """``markers`` (int32 labels, ``outside_label`` the outside's) brought to ``size`` (width, height) flood pixels by
    what covers them: a flood pixel takes the seeds where they cover half of it or more (the largest seed label in
    the ceil(width / size) x ceil(height / size) image pixels from its first), else the outside where that covers
    half, else 0 (to be flooded). Taking the first image pixel of each (INTER_NEAREST) pulled every seed half an image
    pixel up and left, and a mirrored field's cells read otherwise."""
    seeded = (markers > 0) & (markers != outside_label)
    share = cv2.resize(seeded.view(np.uint8) * np.uint8(255), size, interpolation=cv2.INTER_AREA)  # 128: half
    outside = cv2.resize((markers == outside_label).view(np.uint8) * np.uint8(255), size, interpolation=cv2.INTER_AREA)
    kx, ky = -(-markers.shape[1] // size[0]), -(-markers.shape[0] // size[1])
    largest = cv2.dilate((markers * seeded).astype(np.float32), np.ones((ky, kx), np.uint8), anchor=(0, 0))
    label = cv2.resize(largest, size, interpolation=cv2.INTER_NEAREST)  # float32: exact for labels under 2**24
    return np.where(share >= 128, label, np.where(outside >= 128, outside_label, 0)).astype(markers.dtype)


def grow_cells(
    nuclei: np.ndarray,
    elevation: np.ndarray,
    *,
    mpp: float,
    basins: np.ndarray | None = None,
    max_radius_um: float = 9.0,
    flood_mpp: float = FLOOD_MPP,
    outside: np.ndarray | None = None,
) -> np.ndarray:
    """Cell label image: each nucleus (and each membrane basin) grown by watershed over ``elevation`` (membrane signal).

    Basins (see membrane_basins) are labelled after the nuclei. Cells stop at ``max_radius_um``
    from their seed; the glass/stroma outside that reach floods in from its own marker, so a cell's
    outer border also settles on its membrane, and neighbours meet on the membrane between them,
    never crossing it. The flooding runs at ``flood_mpp`` µm/px (cells are ~12 µm across; membranes
    stay ridges at 1 µm/px), from markers taken by what covers each flood pixel (_flood_markers), and the
    labels are brought back to ``mpp``, each seed keeping its own pixels.
    No cell grows into ``outside`` (bool: beyond the image, Tile.beyond_slide): a cell the image's edge
    cuts ends there.
    """
    seeds = nuclei
    if basins is not None and basins.any():
        _, b = cv2.connectedComponents(basins.astype(np.uint8), connectivity=8)
        seeds = np.where(b > 0, b + int(nuclei.max()), seeds).astype(np.int32)
    reach = cv2.distanceTransform((seeds == 0).view(np.uint8), cv2.DIST_L2, 5) <= max_radius_um / mpp
    markers = seeds.copy()
    off = ~reach if outside is None else ~reach | outside
    outside_label = int(seeds.max()) + 1
    np.copyto(markers, outside_label, where=off)
    f = min(1.0, mpp / flood_mpp)
    if f < 1.0:
        h, w = seeds.shape
        # the image padded (its edge repeated, outside) to a whole number of flood pixels (f = 2/5: 5 image pixels
        # to 2), whole blocks of it: a side off that grid drifted the cells' borders up to 1.5 px off their
        # membranes, and an odd-sided field read 3-9 points less stained
        q = Fraction(f).limit_denominator(16)
        k = q.denominator if abs(float(q) - f) < 1e-9 else 1
        pad = ((0, -h % k), (0, -w % k))
        if pad[0][1] or pad[1][1]:
            markers = np.pad(markers, pad, constant_values=outside_label)
            elevation = np.pad(elevation, pad, mode="edge")
        size = (max(1, round(markers.shape[1] * f)), max(1, round(markers.shape[0] * f)))
        small_markers = _flood_markers(markers, size, outside_label)
        ring = cv2.dilate((small_markers != outside_label).astype(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
        small = watershed(cv2.resize(elevation, size, interpolation=cv2.INTER_AREA), small_markers, mask=ring)
        cells = cv2.resize(small, markers.shape[::-1], interpolation=cv2.INTER_NEAREST)[:h, :w]
        cells = np.where(seeds > 0, seeds, cells)
    else:
        cells = watershed(elevation, markers)
    cells[cells == outside_label] = 0
    if outside is not None:
        cells[outside] = 0
    return cells.astype(np.int32, copy=False)
