"""Tumour regions: QuPath GeoJSON annotations or mask images, tested against cell positions."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.measure import points_in_poly

__all__ = ["Region", "RegionError", "load_region"]

IGNORED_CLASSES = {"ignore*", "ignore", "stroma", "necrosis", "background", "normal", "in situ", "dcis"}
"""QuPath classifications whose annotations are not scored as invasive tumour (case-insensitive)."""


class RegionError(ValueError):
    """A region file that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class Region:
    """Tumour region in level-0 pixels: polygons (exterior + holes) or a mask scaled to the slide."""

    source: str
    polygons: tuple[tuple[np.ndarray, tuple[np.ndarray, ...]], ...] = ()
    mask: np.ndarray | None = None
    mask_scale: tuple[float, float] = (1.0, 1.0)

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which level-0 points (x, y) lie in the region."""
        pts = np.column_stack([x, y]).astype(np.float64)
        if self.mask is not None:
            c = np.clip((pts[:, 0] * self.mask_scale[0]).astype(int), 0, self.mask.shape[1] - 1)
            r = np.clip((pts[:, 1] * self.mask_scale[1]).astype(int), 0, self.mask.shape[0] - 1)
            return self.mask[r, c]
        inside = np.zeros(len(pts), bool)
        for exterior, holes in self.polygons:
            hit = points_in_poly(pts, exterior)
            for hole in holes:
                hit &= ~points_in_poly(pts, hole)
            inside |= hit
        return inside


def _rings(path, geometry: dict) -> list[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    polys = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else None
    if polys is None:
        return []  # points and lines carry no area
    out = []
    for poly in polys:
        try:
            rings = [np.asarray(r, dtype=np.float64)[:, :2] for r in poly]
        except (TypeError, ValueError, IndexError):
            raise RegionError(path, f"malformed {kind} coordinates") from None
        if not rings or any(r.ndim != 2 or len(r) < 3 for r in rings):
            raise RegionError(path, f"{kind} ring with fewer than 3 points")
        out.append((rings[0], tuple(rings[1:])))
    return out


def _load_geojson(path: Path) -> Region:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegionError(path, f"not valid GeoJSON ({e})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in ("Polygon", "MultiPolygon"):
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    elif isinstance(data, list):
        features = data
    else:
        raise RegionError(path, "expected a GeoJSON FeatureCollection, Feature, Polygon or a list of Features")
    if not isinstance(features, list):
        raise RegionError(path, "'features' must be a list")
    polygons = []
    for i, f in enumerate(features):
        if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
            raise RegionError(path, f"feature {i} has no geometry object")
        props = f.get("properties") or {}
        cls = props.get("classification") or {}
        name = (cls.get("name") if isinstance(cls, dict) else str(cls)) or ""
        if name.strip().lower() in IGNORED_CLASSES:
            continue
        polygons.extend(_rings(path, f["geometry"]))
    if not polygons:
        raise RegionError(path, "no Polygon or MultiPolygon tumour annotation in the file")
    return Region(source=f"annotation ({path.name}, {len(polygons)} polygons)", polygons=tuple(polygons))


def _load_mask(path: Path, slide_size: tuple[int, int]) -> Region:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L")) > 0
    except (UnidentifiedImageError, OSError) as e:
        raise RegionError(path, f"cannot read mask image ({e})") from None
    if not mask.any():
        raise RegionError(path, "mask image is empty (no non-zero pixel)")
    w, h = slide_size
    sw, sh = mask.shape[1] / w, mask.shape[0] / h
    if abs(sw / sh - 1) > 0.02:
        raise RegionError(path, f"mask aspect {mask.shape[1]}x{mask.shape[0]} does not match the slide's {w}x{h}")
    return Region(source=f"mask ({path.name})", mask=mask, mask_scale=(sw, sh))


def load_region(path: str | os.PathLike, *, slide_size: tuple[int, int]) -> Region:
    """A tumour region from a QuPath GeoJSON export (.geojson/.json, level-0 pixel coordinates) or a
    mask image covering the whole slide (non-zero = tumour; any size with the slide's aspect)."""
    path = Path(path)
    if not path.is_file():
        raise RegionError(path, "region file not found")
    if path.suffix.lower() in (".geojson", ".json"):
        return _load_geojson(path)
    return _load_mask(path, slide_size)
