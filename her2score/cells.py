"""Nuclei from haematoxylin optical density, and cells grown from them (label images)."""
from __future__ import annotations

import cv2
import numpy as np
from skimage.segmentation import watershed

__all__ = ["segment_nuclei", "grow_cells"]


def _disk(radius_px: float) -> np.ndarray:
    k = max(1, int(round(radius_px))) * 2 + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))


def segment_nuclei(
    hematoxylin_od: np.ndarray,
    dab_od: np.ndarray | None = None,
    *,
    mpp: float,
    threshold_od: float = 0.10,
    dab_ratio: float = 0.4,
    min_area_um2: float = 10.0,
    max_area_um2: float = 200.0,
    split_distance_um: float = 2.5,
) -> np.ndarray:
    """Label image (int32, 0 = none) of nuclei in a haematoxylin log10 OD image at ``mpp`` µm/px.

    Threshold the smoothed haematoxylin OD where it also exceeds ``dab_ratio`` x the DAB OD (strong
    membranes leak some haematoxylin signal through deconvolution; nuclei are blue), split touching nuclei by watershed on the distance
    transform from its maxima (at least ``split_distance_um`` apart), drop objects outside the area range.
    """
    smooth = cv2.GaussianBlur(hematoxylin_od, (0, 0), 0.5 / mpp)
    mask = smooth > threshold_od
    if dab_od is not None:
        mask &= smooth > dab_ratio * cv2.GaussianBlur(dab_od, (0, 0), 0.5 / mpp)
    mask = mask.astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(0.75 / mpp))
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    peaks = (dist >= cv2.dilate(dist, _disk(split_distance_um / mpp))) & (dist >= 1.5 / mpp)
    _, markers = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
    # each mask pixel goes to the nearest peak (marker) in its own connected component of the mask;
    # ~2x faster than skimage's watershed on -dist, and the same nuclei in >99% of cases
    _, comp = cv2.connectedComponents(mask, connectivity=8)
    not_peak = (markers == 0).astype(np.uint8)
    _, nearest = cv2.distanceTransformWithLabels(not_peak, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    peak_px = np.flatnonzero(not_peak.ravel() == 0)  # OpenCV numbers the zero pixels 1.. in raster order
    marker_of = np.concatenate([[0], markers.ravel()[peak_px]]).astype(np.int32)
    comp_of = np.concatenate([[0], comp.ravel()[peak_px]])
    labels = marker_of[nearest]
    labels[(mask == 0) | (comp_of[nearest] != comp)] = 0
    area = np.bincount(labels.ravel())
    px_um2 = mpp * mpp
    bad = (area * px_um2 < min_area_um2) | (area * px_um2 > max_area_um2)
    bad[0] = True
    labels[bad[labels]] = 0
    return labels


def grow_cells(
    nuclei: np.ndarray,
    elevation: np.ndarray,
    *,
    mpp: float,
    max_radius_um: float = 9.0,
    flood_mpp: float = 1.0,
) -> np.ndarray:
    """Cell label image: each nucleus grown by watershed over ``elevation`` (membrane signal).

    Cells stop at ``max_radius_um`` from their nucleus; the glass/stroma outside that reach floods
    in from its own marker, so a cell's outer border also settles on its membrane. The flooding runs
    at ``flood_mpp`` µm/px (cells are ~12 µm across; membranes stay ridges at 1 µm/px) and the labels
    are brought back to ``mpp``, each nucleus keeping its own pixels.
    """
    reach = cv2.distanceTransform((nuclei == 0).astype(np.uint8), cv2.DIST_L2, 5) <= max_radius_um / mpp
    markers = nuclei.copy()
    outside = int(nuclei.max()) + 1
    markers[~reach] = outside
    f = min(1.0, mpp / flood_mpp)
    if f < 1.0:
        size = (max(1, round(nuclei.shape[1] * f)), max(1, round(nuclei.shape[0] * f)))
        small_markers = cv2.resize(markers, size, interpolation=cv2.INTER_NEAREST)
        ring = cv2.dilate((small_markers != outside).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        small = watershed(cv2.resize(elevation, size, interpolation=cv2.INTER_AREA), small_markers, mask=ring)
        cells = cv2.resize(small, nuclei.shape[::-1], interpolation=cv2.INTER_NEAREST)
        cells = np.where(nuclei > 0, nuclei, cells)
    else:
        cells = watershed(elevation, markers)
    cells[cells == outside] = 0
    return cells.astype(np.int32)
