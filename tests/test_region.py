"""Tumour regions from QuPath GeoJSON and mask images: parsing, validation messages, containment."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from her2score.region import Region, RegionError, load_region

SIZE = (1000, 800)


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(geometry, cls=None, object_type="annotation"):
    props = {"objectType": object_type}
    if cls:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    return {"type": "Feature", "id": "x", "geometry": geometry, "properties": props}


def _write(tmp_path, data, name="region.geojson"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return p


@pytest.fixture
def qupath(tmp_path):
    """A QuPath export: a tumour polygon with a hole, a tumour MultiPolygon, a stroma polygon, a cell detection."""
    return _write(tmp_path, {"type": "FeatureCollection", "features": [
        _feature({"type": "Polygon", "coordinates": [_square(100, 100, 400, 400), _square(200, 200, 300, 300)]}, "Tumor"),
        _feature({"type": "MultiPolygon", "coordinates": [[_square(600, 100, 700, 200)], [_square(800, 500, 900, 600)]]}, "Tumor"),
        _feature({"type": "Polygon", "coordinates": [_square(0, 600, 300, 800)]}, "Stroma"),
        _feature({"type": "Polygon", "coordinates": [_square(450, 450, 460, 460)]}, "Positive", object_type="detection"),
    ]})


def test_qupath_polygons_holes_multipolygons_and_classes(qupath):
    r = load_region(qupath, slide_size=SIZE)
    assert isinstance(r, Region) and len(r.polygons) == 3
    assert r.source == "annotation (region.geojson, 3 polygons, 1 non-tumour cut out)"
    x = np.array([150, 250, 650, 850, 100.5, 50, 150, 455, 999])
    y = np.array([150, 250, 150, 550, 700, 50, 700, 455, 799])
    #             in   hole  multi multi stroma out stroma detection out
    np.testing.assert_array_equal(r.contains(x, y), [True, False, True, True, False, False, False, False, False])


def test_contains_empty_and_single_geometry(tmp_path):
    p = _write(tmp_path, {"type": "Polygon", "coordinates": [_square(0, 0, 10, 10)]}, "bare.json")
    r = load_region(p, slide_size=SIZE)
    assert r.contains(np.array([]), np.array([])).shape == (0,)
    assert r.contains(np.array([5.0]), np.array([5.0])).tolist() == [True]


def test_non_tumour_annotations_are_cut_out_and_tumour_classes_decide(tmp_path):
    """An Ignore* or DCIS outline inside a tumour one is cut out of it; where any annotation is classed Tumor,
    only those are the tumour (a Region* of interest or an unclassified outline beside it is not); cells
    and detections of a QuPath 0.2 export (no objectType, an id naming the object) are never regions."""
    square = lambda *b: {"type": "Polygon", "coordinates": [_square(*b)]}  # noqa: E731
    x, y = np.array([50, 150, 350, 550]), np.array([50, 50, 50, 50])
    cut = _write(tmp_path, [_feature(square(0, 0, 200, 100), "Tumor"), _feature(square(100, 0, 200, 100), "Ignore*")], "cut.geojson")
    assert load_region(cut, slide_size=SIZE).contains(x, y).tolist() == [True, False, False, False]
    insitu = _write(tmp_path, [_feature(square(0, 0, 200, 100)), _feature(square(0, 0, 100, 100), "DCIS")], "dcis.geojson")
    assert load_region(insitu, slide_size=SIZE).contains(x, y).tolist() == [False, True, False, False]
    roi = _write(tmp_path, [_feature(square(0, 0, 100, 100), "Tumor"), _feature(square(0, 0, 800, 100), "Region*"),
                            _feature(square(300, 0, 400, 100))], "roi.geojson")
    assert load_region(roi, slide_size=SIZE).contains(x, y).tolist() == [True, False, False, False]
    old = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "PathAnnotationObject", "geometry": square(0, 0, 100, 100), "properties": {}},
        {"type": "Feature", "id": "PathCellObject", "geometry": square(300, 0, 400, 100), "properties": {}}]}
    assert load_region(_write(tmp_path, old, "old.geojson"), slide_size=SIZE).contains(x, y).tolist() == [True, False, False, False]


def test_derived_classes_of_qupath_04_are_their_base_class(tmp_path):
    """QuPath 0.4+ writes a derived class as "names": ["Tumor", "Positive"] (older versions "name": "Tumor: Positive"):
    both are tumour, and "Stroma: Positive" is stroma, cut out."""
    square = lambda *b: {"type": "Polygon", "coordinates": [_square(*b)]}  # noqa: E731
    derived = _feature(square(0, 0, 200, 100))
    derived["properties"]["classification"] = {"names": ["Tumor", "Positive"], "color": [200, 0, 0]}
    stroma = _feature(square(100, 0, 200, 100))
    stroma["properties"]["classification"] = {"names": ["Stroma", "Positive"]}
    other = _feature(square(300, 0, 400, 100))  # unclassified: not tumour beside a Tumor-classed annotation
    x, y = np.array([50, 150, 350]), np.array([50, 50, 50])
    p = _write(tmp_path, [derived, stroma, other, _feature(square(500, 0, 600, 100), "Tumor: Negative")], "derived.geojson")
    r = load_region(p, slide_size=SIZE)
    assert r.contains(np.append(x, 550), np.append(y, 50)).tolist() == [True, False, False, True]
    assert r.source == "annotation (derived.geojson, 2 polygons, 1 non-tumour cut out)"
    only_stroma = _write(tmp_path, [stroma], "stroma.geojson")
    with pytest.raises(RegionError, match=r"every polygon is classified as non-tumour \(Stroma: Positive\)"):
        load_region(only_stroma, slide_size=SIZE)


def test_unclassified_annotations_count_as_tumour(tmp_path):
    p = _write(tmp_path, [_feature({"type": "Polygon", "coordinates": [_square(0, 0, 10, 10)]})], "list.geojson")
    assert load_region(p, slide_size=SIZE).contains(np.array([5]), np.array([5])).tolist() == [True]


@pytest.mark.parametrize("content,reason", [
    ("{not json", "not valid GeoJSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}}]}, "feature 0 has no geometry object"),
    ({"type": "FeatureCollection", "features": [_feature({"type": "Point", "coordinates": [1, 2]}),
                                                _feature({"type": "LineString", "coordinates": [[1, 2], [3, 4]]})]},
     "no Polygon or MultiPolygon annotation (only LineString, Point); a tumour region needs an area"),
    ({"type": "FeatureCollection", "features": [_feature({"type": "Polygon", "coordinates": [_square(0, 0, 5, 5)]}, "Stroma"),
                                                _feature({"type": "Polygon", "coordinates": [_square(0, 0, 5, 5)]}, "Ignore*")]},
     "no tumour annotation: every polygon is classified as non-tumour (Ignore*, Stroma)"),
    ({"type": "FeatureCollection", "features": [_feature({"type": "Polygon", "coordinates": [_square(0, 0, 5, 5)]}, "Region*")]},
     "no tumour annotation: every polygon is classified Region* (a region of interest, not tumour); class the tumour "
     "Tumor, or leave it unclassified"),
    ({"type": "FeatureCollection", "features": [
        _feature({"type": "Polygon", "coordinates": [_square(0, 0, 5, 5)]}, "Stroma"),
        _feature({"type": "MultiPolygon", "coordinates": [[_square(0, 0, 5, 5)], [_square(9, 9, 19, 19)]]}, "Necrosis"),
        _feature({"type": "Polygon", "coordinates": [_square(0, 0, 50, 50)]}, "Region*")]},
     "no tumour annotation: 3 polygons are classified as non-tumour (Necrosis, Stroma) and 1 Region* (a region of "
     "interest, not tumour); class the tumour Tumor, or leave it unclassified"),
    ({"type": "FeatureCollection", "features": [
        _feature({"type": "Point", "coordinates": [1, 2]}, "Stroma"),
        _feature({"type": "Polygon", "coordinates": [_square(0, 0, 50, 50)]}, "Region*")]},
     "no tumour annotation: every polygon is classified Region* (a region of interest, not tumour); class the tumour "
     "Tumor, or leave it unclassified"),
    ({"type": "FeatureCollection", "features": [_feature({"type": "Point", "coordinates": [1, 2]}, "Stroma")]},
     "no Polygon or MultiPolygon annotation (only Point); a tumour region needs an area"),
    ({"type": "FeatureCollection", "features": []}, "the file holds no features (no tumour annotation)"),
    ({"type": "FeatureCollection", "features": {"a": 1}}, "'features' must be a list"),
    ({"hello": "world"}, "expected a GeoJSON FeatureCollection, Feature, Polygon or a list of Features"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}, "feature 0 (Polygon): a ring needs at least 3 points, got 2"),
    ({"type": "Polygon", "coordinates": [[["a", 0], [1, 1], [2, 0]]]}, "feature 0 (Polygon): coordinates must be [x, y] number pairs"),
    ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [2, "NaN"]]]}, "feature 0 (Polygon): coordinates must be finite numbers"),
    ({"type": "Polygon", "coordinates": []}, "feature 0: Polygon without coordinates"),
    ({"type": "FeatureCollection", "features": [_feature({"type": "Circle", "coordinates": [1, 2]})]}, "feature 0: unknown geometry type 'Circle'"),
    ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1' + "0" * 5000 + ', 0]]]}',
     "not valid GeoJSON (a number too long to be a coordinate)"),  # Python's own words, not naming the file
], ids=["invalid-json", "missing-geometry", "no-polygon", "all-non-tumour", "only-region-of-interest",
        "non-tumour-and-region-of-interest", "non-tumour-point-and-region-of-interest", "non-tumour-point", "empty", "features-not-list",
        "not-geojson", "short-ring", "non-numeric", "nan-string", "no-coordinates", "unknown-type", "5001-digit-number"])
def test_invalid_geojson_messages(tmp_path, content, reason):
    p = _write(tmp_path, content)
    with pytest.raises(RegionError) as e:
        load_region(p, slide_size=SIZE)
    assert str(e.value) == f"{p}: {reason}"


def test_missing_and_empty_region_files(tmp_path):
    with pytest.raises(RegionError, match=r"nope\.geojson: region file not found"):
        load_region(tmp_path / "nope.geojson", slide_size=SIZE)
    (tmp_path / "empty.geojson").write_bytes(b"")
    with pytest.raises(RegionError, match=r"empty\.geojson: region file is empty \(0 bytes\)"):
        load_region(tmp_path / "empty.geojson", slide_size=SIZE)
    (tmp_path / "folder.geojson").mkdir()
    with pytest.raises(RegionError, match=r"folder\.geojson: is a folder, not a region file"):
        load_region(tmp_path / "folder.geojson", slide_size=SIZE)


def test_an_unlocated_feature_is_passed_over(tmp_path):
    """GeoJSON allows "geometry": null (a feature with no place): it adds no area and refuses nothing."""
    nowhere = {"type": "Feature", "geometry": None, "properties": {"objectType": "annotation"}}
    p = _write(tmp_path, {"type": "FeatureCollection", "features": [
        nowhere, _feature({"type": "Polygon", "coordinates": [_square(0, 0, 10, 10)]}, "Tumor")]})
    assert len(load_region(p, slide_size=SIZE).polygons) == 1
    p = _write(tmp_path, {"type": "FeatureCollection", "features": [nowhere]})
    with pytest.raises(RegionError, match="no Polygon or MultiPolygon tumour annotation"):
        load_region(p, slide_size=SIZE)


def test_annotations_that_miss_the_slide_are_refused(tmp_path):
    """Polygons from another image, or in µm, lie off this slide: the file is refused, naming the slide's size and
    where they are, not read as 'no tumour cells'. One polygon reaching into the slide is enough."""
    far = _feature({"type": "Polygon", "coordinates": [_square(50_000, 50_000, 60_000, 60_000)]}, "Tumor")
    p = _write(tmp_path, {"type": "FeatureCollection", "features": [far]})
    with pytest.raises(RegionError, match=r"region\.geojson: its tumour annotations lie outside the 1000 x 800 px slide "
                                          r"\(x 50000 to 60000, y 50000 to 60000\)"):
        load_region(p, slide_size=SIZE)
    near = _feature({"type": "Polygon", "coordinates": [_square(900, 700, 1200, 900)]}, "Tumor")
    p = _write(tmp_path, {"type": "FeatureCollection", "features": [far, near]})
    assert load_region(p, slide_size=SIZE).contains(np.array([950.0]), np.array([750.0])).tolist() == [True]


def test_a_masks_transparent_pixels_are_not_tumour(tmp_path):
    """An RGBA mask drawn on a transparent white background: tumour only where it is opaque."""
    rgba = np.zeros((80, 100, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[10:40, 20:50] = (255, 0, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    r = load_region(tmp_path / "rgba.png", slide_size=SIZE)
    assert r.mask.mean() == pytest.approx(30 * 30 / (80 * 100))
    assert r.contains(np.array([300.0, 700.0]), np.array([200.0, 600.0])).tolist() == [True, False]


def test_mask_image(tmp_path):
    mask = np.zeros((80, 100), np.uint8)  # a tenth of the slide's 1000 x 800
    mask[10:40, 20:50] = 255
    p = tmp_path / "mask.png"
    Image.fromarray(mask).save(p)
    r = load_region(p, slide_size=SIZE)
    assert r.source == "mask (mask.png)"
    x = np.array([250, 100, 499, 500, -5, 5000])
    y = np.array([250, 250, 399, 400, 250, 250])
    np.testing.assert_array_equal(r.contains(x, y), [True, False, True, False, False, False])


def test_bad_masks(tmp_path):
    p = tmp_path / "blank.png"
    Image.fromarray(np.zeros((80, 100), np.uint8)).save(p)
    with pytest.raises(RegionError, match=r"blank\.png: mask image is empty \(no pixel marks tumour: non-zero"):
        load_region(p, slide_size=SIZE)
    p = tmp_path / "square.png"
    Image.fromarray(np.full((100, 100), 255, np.uint8)).save(p)
    with pytest.raises(RegionError, match=r"square\.png: mask aspect 100x100 does not match the slide's 1000x800"):
        load_region(p, slide_size=SIZE)
    p = tmp_path / "text.png"
    p.write_text("not a mask")
    with pytest.raises(RegionError, match=r"text\.png: not a GeoJSON \(\.geojson/\.json\) file nor a readable mask image"):
        load_region(p, slide_size=SIZE)


def test_a_jpeg_mask_is_read_at_half_its_top_a_lossless_one_at_non_zero(tmp_path):
    yy, xx = np.mgrid[:400, :500]
    disc = (yy - 200) ** 2 + (xx - 250) ** 2 < 120**2
    Image.fromarray(disc.astype(np.uint8) * 255).save(tmp_path / "mask.jpg", quality=50)
    jpeg = load_region(tmp_path / "mask.jpg", slide_size=(500, 400))
    assert abs(int(jpeg.mask.sum()) - int(disc.sum())) < 0.005 * disc.sum()  # the ringing round its edge is not tumour
    Image.fromarray(disc.astype(np.uint8)).save(tmp_path / "labels.png")  # 0/1 labels: any non-zero value is tumour
    assert np.array_equal(load_region(tmp_path / "labels.png", slide_size=(500, 400)).mask, disc)
    Image.fromarray(disc.astype(np.uint8)).save(tmp_path / "labels.jpg", quality=90)  # 0/1 labels in a JPEG
    labels = load_region(tmp_path / "labels.jpg", slide_size=(500, 400))
    assert abs(int(labels.mask.sum()) - int(disc.sum())) < 0.005 * disc.sum()


def test_a_mask_of_several_large_values_says_each_is_read_as_tumour(tmp_path):
    """QuPath's labelled export (Tumor 1, Stroma 2) took the stroma half in as tumour without a word, and a 0 tumour
    beside 3+ stroma scored 3+. A mask of several tumour regions (1, 2, 3) looks alike, so neither is refused: the
    region's words, in result.json, summary.csv and the overlay, say that every value was read as tumour. An
    anti-aliased edge's many small values and a mask of many small labels (cells) say nothing."""
    yy, xx = np.mgrid[:400, :500]
    labels = np.where(xx < 250, 1, 2).astype(np.uint8)
    labels[:20] = 0
    Image.fromarray(labels).save(tmp_path / "classes.png")
    r = load_region(tmp_path / "classes.png", slide_size=(500, 400))
    assert r.source == ("mask (classes.png; values 1, 2, each read as tumour: a label image's other classes must be "
                        "left out of it)") and r.mask.sum() == (labels > 0).sum()
    Image.fromarray(labels.astype(np.int32) * 1000).save(tmp_path / "classes.tif")
    assert "values 1000, 2000, each read as tumour" in load_region(tmp_path / "classes.tif", slide_size=(500, 400)).source
    disc = ((yy - 200) ** 2 + (xx - 250) ** 2) ** 0.5
    smooth = np.clip((120.5 - disc) * 255, 0, 255).astype(np.uint8)  # anti-aliased: 1-254 round the edge
    Image.fromarray(smooth).save(tmp_path / "smooth.png")
    assert load_region(tmp_path / "smooth.png", slide_size=(500, 400)).source == "mask (smooth.png)"
    cells = ((yy // 10) * 50 + xx // 10 + 1).astype(np.int32)  # 2,000 small labels
    Image.fromarray(cells).save(tmp_path / "cells.tif")
    assert load_region(tmp_path / "cells.tif", slide_size=(500, 400)).source == "mask (cells.tif)"


def test_a_float_or_32_bit_masks_fractions_are_non_zero(tmp_path):
    """A probability map saved as a float32 TIFF (0.5 where tumour) and a 32-bit label image are tumour where
    non-zero: read through 8-bit grey, 0.5 became 0 and the mask was refused as empty."""
    import tifffile

    disc = (np.mgrid[:400, :500][0] - 200) ** 2 + (np.mgrid[:400, :500][1] - 250) ** 2 < 120**2
    tifffile.imwrite(tmp_path / "prob.tif", disc * np.float32(0.5))
    assert np.array_equal(load_region(tmp_path / "prob.tif", slide_size=(500, 400)).mask, disc)
    Image.fromarray(disc.astype(np.int32) * 70000).save(tmp_path / "labels.tif")
    assert np.array_equal(load_region(tmp_path / "labels.tif", slide_size=(500, 400)).mask, disc)


def test_a_float_or_32_bit_masks_negative_values_are_no_tumour(tmp_path):
    """A signed mask (a float map of +1 tumour / -1 background, a signed distance or logit map, a label image with
    -1 for 'ignore') is tumour where positive: read as non-zero, its negative background made the whole slide
    tumour, where 8-bit grey (before 16/32-bit masks were read as stored) clipped it to 0."""
    import tifffile

    disc = (np.mgrid[:400, :500][0] - 200) ** 2 + (np.mgrid[:400, :500][1] - 250) ** 2 < 120**2
    tifffile.imwrite(tmp_path / "signed.tif", np.where(disc, 1, -1).astype(np.float32))
    assert np.array_equal(load_region(tmp_path / "signed.tif", slide_size=(500, 400)).mask, disc)
    Image.fromarray(np.where(disc, 3, -1).astype(np.int32)).save(tmp_path / "labels.tif")
    assert np.array_equal(load_region(tmp_path / "labels.tif", slide_size=(500, 400)).mask, disc)
    tifffile.imwrite(tmp_path / "negative.tif", np.where(disc, 0, -1).astype(np.float32))
    with pytest.raises(RegionError, match="empty"):
        load_region(tmp_path / "negative.tif", slide_size=(500, 400))


def test_a_mask_is_opened_only_as_a_format_that_reads_its_header_first(tmp_path):
    """An ICO decodes its embedded PNG on opening, before any size check: a mask file holding one is refused
    unread, whatever its name."""
    import io

    ico, out = tmp_path / "mask.png", io.BytesIO()
    Image.new("RGBA", (16, 16), (255, 255, 255, 255)).save(out, format="ICO")
    ico.write_bytes(out.getvalue())
    with pytest.raises(RegionError, match="not a GeoJSON"):
        load_region(ico, slide_size=(500, 400))


def test_a_cells_position_is_tested_where_qupath_draws_it(tmp_path):
    """The cell table's x_px is pixel-centre (pixel 100's centre is 100); QuPath's pixel 100 spans [100, 101].
    An annotation edge at QuPath x = 100.5 runs through pixel 100's centre: a cell at 100.3 (QuPath 100.8)
    lies inside a polygon starting there, one at 99.8 (QuPath 100.3) outside."""
    p = tmp_path / "r.geojson"
    p.write_text(json.dumps({"type": "Feature", "properties": {"objectType": "annotation"},
                             "geometry": {"type": "Polygon", "coordinates": [[[100.5, 0], [200, 0], [200, 200], [100.5, 200], [100.5, 0]]]}}))
    region = load_region(p, slide_size=(1000, 1000))
    assert region.contains(np.array([100.3, 99.8]), np.array([50.0, 50.0])).tolist() == [True, False]
    mask = np.zeros((2, 2), np.uint8)
    mask[:, 1] = 255  # the right half of a 200 px slide, at 1/100 scale: level-0 pixels 100-199
    path = tmp_path / "m.png"
    Image.fromarray(mask).save(path)
    half = load_region(path, slide_size=(200, 200))
    assert half.contains(np.array([99.4, 99.6, 100.0]), np.array([50.0, 50.0, 50.0])).tolist() == [False, True, True]


def test_a_float_masks_values_within_0_and_1_are_probabilities(tmp_path):
    """A softmax's probability map has no zero background (here 1e-4): its tumour is where it reaches 0.5, not
    wherever it is positive (the whole slide); a float mask reaching past 1 (a 0/255 mask) keeps 'positive'."""
    import tifffile

    disc = (np.mgrid[:400, :500][0] - 200) ** 2 + (np.mgrid[:400, :500][1] - 250) ** 2 < 120**2
    tifffile.imwrite(tmp_path / "softmax.tif", np.where(disc, 0.93, 1e-4).astype(np.float32))
    assert np.array_equal(load_region(tmp_path / "softmax.tif", slide_size=(500, 400)).mask, disc)
    tifffile.imwrite(tmp_path / "low.tif", np.where(disc, 0.3, 0.0).astype(np.float32))
    with pytest.raises(RegionError, match="empty"):
        load_region(tmp_path / "low.tif", slide_size=(500, 400))
    tifffile.imwrite(tmp_path / "255.tif", np.where(disc, 255.0, 0.0).astype(np.float32))
    assert np.array_equal(load_region(tmp_path / "255.tif", slide_size=(500, 400)).mask, disc)
