"""Tumour regions: QuPath GeoJSON annotations or mask images, tested against cell positions.

Region files come from users and are validated: every problem is a RegionError whose message
names the file and says what is wrong (invalid JSON, a feature without geometry, no polygon, a
mask of the wrong shape...).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.measure import points_in_poly

from .slide import FileError, open_plain_image

__all__ = ["Region", "RegionError", "load_region", "IGNORED_CLASSES"]

IGNORED_CLASSES = {"ignore*", "ignore", "stroma", "necrosis", "background", "normal", "in situ", "dcis", "immune cells"}
"""QuPath classifications whose annotations are not invasive tumour (case-insensitive): cut out of the
tumour annotations they lie in."""
TUMOUR_CLASSES = {"tumor", "tumour", "tumor*", "tumour*", "invasive tumor", "invasive tumour", "invasive carcinoma"}
"""Classifications that mark tumour: where a file has any, only they are the tumour; otherwise every
annotation not in IGNORED_CLASSES (nor QuPath's "Region*", a region of interest) is."""
NON_AREA_OBJECTS = {"detection", "cell", "tile"}
"""QuPath object types ignored when the file also holds annotations (exports of all objects)."""
NON_AREA_IDS = {"PathDetectionObject", "PathCellObject", "PathTileObject"}
"""Feature ids of the same objects in QuPath 0.2's exports (which have no objectType): never a region."""
MAX_REGION_BYTES = 512 * 2**20
"""Largest GeoJSON file read (a region is a few polygons; a bigger file is not a region export)."""
MAX_MASK_PIXELS = 20_000 * 20_000


class RegionError(FileError, ValueError):
    """A region file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Region:
    """Tumour region in level-0 pixels: polygons (exterior + holes) or a mask scaled to the slide."""

    source: str
    polygons: tuple[tuple[np.ndarray, tuple[np.ndarray, ...]], ...] = ()
    mask: np.ndarray | None = None
    mask_scale: tuple[float, float] = (1.0, 1.0)
    excluded: tuple[tuple[np.ndarray, tuple[np.ndarray, ...]], ...] = ()
    """Non-tumour annotations (IGNORED_CLASSES): cut out of the polygons."""

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which level-0 points (x, y) lie in the region (points off the mask are outside). Points are in the
        cell table's pixel-centre coordinates (pixel i's centre is i); a region's polygons in QuPath's, where
        pixel i spans [i, i + 1] (its centre is i + 0.5), and a mask pixel spans its share of the slide."""
        pts = np.column_stack([np.ravel(x), np.ravel(y)]).astype(np.float64) + 0.5
        if len(pts) == 0:
            return np.zeros(0, bool)
        if self.mask is not None:
            c = np.floor(pts[:, 0] * self.mask_scale[0])
            r = np.floor(pts[:, 1] * self.mask_scale[1])
            on = np.isfinite(c) & np.isfinite(r) & (c >= 0) & (r >= 0) & (c < self.mask.shape[1]) & (r < self.mask.shape[0])
            inside = np.zeros(len(pts), bool)
            inside[on] = self.mask[r[on].astype(np.intp), c[on].astype(np.intp)]
            return inside
        return _in_any(pts, self.polygons) & ~_in_any(pts, self.excluded)


def _in_any(pts: np.ndarray, polygons) -> np.ndarray:
    """Which points lie in any of ``polygons`` (exterior, holes)."""
    inside = np.zeros(len(pts), bool)
    for exterior, holes in polygons:
        hit = points_in_poly(pts, exterior)
        for hole in holes:
            hit &= ~points_in_poly(pts, hole)
        inside |= hit
    return inside


def _ring(path, where: str, ring) -> np.ndarray:
    try:
        r = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        raise RegionError(path, f"{where}: coordinates must be [x, y] number pairs") from None
    if r.ndim != 2 or r.shape[1] < 2:
        raise RegionError(path, f"{where}: a ring must be a list of [x, y] points (got an array of shape {r.shape})")
    if len(r) < 3:
        raise RegionError(path, f"{where}: a ring needs at least 3 points, got {len(r)}")
    if not np.isfinite(r[:, :2]).all():
        raise RegionError(path, f"{where}: coordinates must be finite numbers")
    return r[:, :2]


def _polygons(path, where: str, geometry: dict) -> tuple[list, list[str]]:
    """(polygons, types of non-area geometries) of one GeoJSON geometry."""
    kind = geometry.get("type")
    coords = geometry.get("coordinates")
    if kind == "GeometryCollection":
        polys, other = [], []
        for k, g in enumerate(geometry.get("geometries") or []):
            if not isinstance(g, dict):
                raise RegionError(path, f"{where}: geometry {k} of the collection is not an object")
            p, o = _polygons(path, f"{where}, geometry {k}", g)
            polys += p
            other += o
        return polys, other
    if kind not in ("Polygon", "MultiPolygon"):
        if kind not in ("Point", "MultiPoint", "LineString", "MultiLineString"):
            raise RegionError(path, f"{where}: unknown geometry type {kind!r}")
        return [], [kind]
    if not isinstance(coords, list) or not coords:
        raise RegionError(path, f"{where}: {kind} without coordinates")
    parts = [coords] if kind == "Polygon" else coords
    out = []
    for k, poly in enumerate(parts):
        if not isinstance(poly, list) or not poly:
            raise RegionError(path, f"{where}: {kind} part {k} must be a list of rings")
        rings = [_ring(path, f"{where} ({kind})", r) for r in poly]
        out.append((rings[0], tuple(rings[1:])))
    return out, []


def _class_name(props: dict) -> str:
    """A feature's QuPath class as QuPath shows it: "name", or a derived class's "names" (QuPath 0.4+) joined by ": "."""
    cls = props.get("classification")
    if isinstance(cls, dict):
        names = cls.get("names")
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)
        return str(cls.get("name") or "")
    return str(cls or "")


def _load_geojson(path: Path) -> Region:
    if path.stat().st_size > MAX_REGION_BYTES:
        raise RegionError(path, f"GeoJSON file of {path.stat().st_size} bytes is too large for a region export")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise RegionError(path, "not valid GeoJSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise RegionError(path, f"not valid GeoJSON ({e})") from None
    except ValueError:  # an integer of over 4,300 digits (Python's limit on converting one)
        raise RegionError(path, "not valid GeoJSON (a number too long to be a coordinate)") from None
    except RecursionError:
        raise RegionError(path, "not valid GeoJSON (nested too deeply)") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in ("Polygon", "MultiPolygon", "GeometryCollection"):
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    elif isinstance(data, list):
        features = data
    else:
        raise RegionError(path, "expected a GeoJSON FeatureCollection, Feature, Polygon or a list of Features")
    if not isinstance(features, list):
        raise RegionError(path, "'features' must be a list")
    if not features:
        raise RegionError(path, "the file holds no features (no tumour annotation)")
    has_annotations = any(isinstance(f, dict) and isinstance(f.get("properties"), dict)
                          and f["properties"].get("objectType") == "annotation" for f in features)
    polygons, excluded, skipped_classes, other_types, rois = [], [], [], [], 0
    classed: list[tuple[bool, list]] = []  # per annotation kept: (tumour-classed, its polygons)
    for i, f in enumerate(features):
        if not isinstance(f, dict):
            raise RegionError(path, f"feature {i} is not a JSON object")
        if "geometry" in f and f["geometry"] is None:
            continue  # an unlocated feature (GeoJSON allows it): no area
        if not isinstance(f.get("geometry"), dict):
            raise RegionError(path, f"feature {i} has no geometry object")
        props = f.get("properties") or {}
        if not isinstance(props, dict):
            raise RegionError(path, f"feature {i}: 'properties' must be an object")
        if has_annotations and props.get("objectType") in NON_AREA_OBJECTS or f.get("id") in NON_AREA_IDS:
            continue
        label = _class_name(props)
        name = label.split(":")[0].strip().lower()  # a derived class ("Tumor: Positive") is its base class
        polys, other = _polygons(path, f"feature {i}", f["geometry"])
        other_types += other
        if name in IGNORED_CLASSES:
            skipped_classes += [label] if polys else []  # a non-tumour point or line excludes no area
            excluded += polys
        elif name != "region*":
            classed.append((name in TUMOUR_CLASSES, polys))
        else:
            rois += len(polys)
    tumour_classed = any(t for t, _ in classed)
    polygons = [p for t, polys in classed if t or not tumour_classed for p in polys]
    if not polygons:
        names = ", ".join(sorted(set(skipped_classes)))
        roi, fix = "Region* (a region of interest, not tumour)", "class the tumour Tumor, or leave it unclassified"
        if excluded and rois:  # both kinds: either alone tells only part of why nothing is tumour
            n = len(excluded)
            raise RegionError(path, f"no tumour annotation: {n} polygon{'s are' if n != 1 else ' is'} classified as "
                                    f"non-tumour ({names}) and {rois} {roi}; {fix}")
        if skipped_classes:
            raise RegionError(path, f"no tumour annotation: every polygon is classified as non-tumour ({names})")
        if rois:
            raise RegionError(path, f"no tumour annotation: every polygon is classified {roi}; {fix}")
        if other_types:
            raise RegionError(path, f"no Polygon or MultiPolygon annotation (only {', '.join(sorted(set(other_types)))}); "
                                    "a tumour region needs an area")
        raise RegionError(path, "no Polygon or MultiPolygon tumour annotation in the file")
    cut = f", {len(excluded)} non-tumour cut out" if excluded else ""
    return Region(source=f"annotation ({path.name}, {len(polygons)} polygons{cut})", polygons=tuple(polygons),
                  excluded=tuple(excluded))


LABEL_MIN_SHARE = 0.05
"""A mask value over this share of a mask's marked pixels is a class or region of its own (_labels_note)."""


def _labels_note(marked: np.ndarray) -> str:
    """Words for a mask whose marked pixels hold two or more integer values each over LABEL_MIN_SHARE of them: a label
    image of several classes (QuPath's labelled export: Tumor 1, Stroma 2) and a mask of several tumour regions look
    alike, and every one is read as tumour; "" otherwise (an anti-aliased edge's values are each few)."""
    if marked.size == 0 or not np.array_equal(marked, np.round(marked)):
        return ""
    values, counts = np.unique(marked, return_counts=True)
    big = values[counts > LABEL_MIN_SHARE * marked.size]
    if len(big) < 2:
        return ""
    names = ", ".join(f"{v:g}" for v in big[:6]) + (", ..." if len(big) > 6 else "")
    return f"; values {names}, each read as tumour: a label image's other classes must be left out of it"


def _load_mask(path: Path, slide_size: tuple[int, int]) -> Region:
    from PIL import UnidentifiedImageError

    try:
        with open_plain_image(path) as img:
            if img.size[0] * img.size[1] > MAX_MASK_PIXELS:
                raise RegionError(path, f"{img.size[0]} x {img.size[1]} mask is too large; save it at lower resolution")
            if img.mode in ("I", "F") or img.mode.startswith("I;"):  # 16/32-bit labels or floats (a probability map)
                # as they are (8-bit grey made 0.5 a 0), tumour where positive: a negative value (a -1 background,
                # a logit) is none, as 8-bit grey clipped it to 0; NaN is none; floats all within 0-1 are
                # probabilities, tumour from 0.5 (a softmax's background is small, not 0)
                values = np.nan_to_num(np.asarray(img, np.float64), nan=0.0)
                probability = img.mode == "F" and values.min(initial=0) >= 0 and values.max(initial=0) <= 1
                mask = values >= 0.5 if probability else values > 0
                labels = None if probability else values
            else:
                grey = np.asarray(img.convert("L"))
                # JPEG rings round its edges: half its top value decides (255 or 1 for tumour)
                mask = 2 * grey.astype(np.int32) >= max(int(grey.max()), 1) if img.format == "JPEG" else grey > 0
                labels = None if img.format == "JPEG" else grey
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # a transparent pixel is no tumour
                mask &= np.asarray(img.convert("RGBA"))[..., 3] > 0
            note = "" if labels is None else _labels_note(labels[mask])
    except RegionError:
        raise
    except UnidentifiedImageError:
        raise RegionError(path, "not a GeoJSON (.geojson/.json) file nor a readable mask image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RegionError(path, f"cannot read mask image ({e})") from None
    if not mask.any():
        raise RegionError(path, "mask image is empty (no pixel marks tumour: non-zero, positive in a 16/32-bit or float mask, "
                                "0.5 or more in a probability map)")
    w, h = slide_size
    sw, sh = mask.shape[1] / w, mask.shape[0] / h
    if abs(sw / sh - 1) > 0.02:
        raise RegionError(path, f"mask aspect {mask.shape[1]}x{mask.shape[0]} does not match the slide's {w}x{h}")
    return Region(source=f"mask ({path.name}{note})", mask=mask, mask_scale=(sw, sh))


def load_region(path: str | os.PathLike, *, slide_size: tuple[int, int]) -> Region:
    """A tumour region from a QuPath GeoJSON export (.geojson/.json, level-0 pixel coordinates) or a
    mask image covering the whole slide (non-zero = tumour; a 16/32-bit or float one's negative values are not, a float
    one's values all within 0-1 are probabilities, tumour from 0.5; over half its top value in a JPEG; transparent
    pixels are not tumour; any size with the slide's aspect). A GeoJSON none of whose tumour polygons reaches
    into the ``slide_size`` (level-0 px) is refused: its coordinates are another image's, or not pixels.

    Annotations classified as non-tumour (IGNORED_CLASSES, e.g. Stroma, Ignore*, DCIS) are cut out of the
    tumour ones; where any annotation is classified tumour (TUMOUR_CLASSES) only those are the tumour,
    else every other annotation but a "Region*"; detections and cells (exports of all objects) are never used.
    """
    path = Path(path)
    if path.is_dir():
        raise RegionError(path, "is a folder, not a region file")
    if path.is_symlink() and not path.exists():
        raise RegionError(path, "is a symbolic link to nothing (broken, or a loop), not a region file")
    if path.exists() and not path.is_file():
        raise RegionError(path, "is not a regular file (a pipe, socket or device), not a region file")
    if not path.is_file():
        raise RegionError(path, "region file not found")
    if path.stat().st_size == 0:
        raise RegionError(path, "region file is empty (0 bytes)")
    if len(slide_size) != 2 or min(slide_size) <= 0:
        raise ValueError(f"slide_size must be positive (width, height), got {slide_size}")
    if path.suffix.lower() in (".geojson", ".json"):
        return _on_slide(path, _load_geojson(path), slide_size)
    return _load_mask(path, slide_size)


def _on_slide(path: Path, region: Region, slide_size: tuple[int, int]) -> Region:
    """``region``, refused where none of its tumour polygons reaches into the slide (level-0 px)."""
    w, h = slide_size
    boxes = np.array([[*ext.min(0), *ext.max(0)] for ext, _ in region.polygons])
    if not ((boxes[:, 2] > 0) & (boxes[:, 3] > 0) & (boxes[:, 0] < w) & (boxes[:, 1] < h)).any():
        x0, y0 = boxes[:, :2].min(0)
        x1, y1 = boxes[:, 2:].max(0)
        raise RegionError(path, f"its tumour annotations lie outside the {w} x {h} px slide (x {x0:.0f} to {x1:.0f}, "
                                f"y {y0:.0f} to {y1:.0f}): coordinates must be this slide's level-0 pixels "
                                "(an export from another image, or in µm?)")
    return region
