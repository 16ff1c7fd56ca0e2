"""Per-slide outputs: cell outlines (valid polygons), GeoJSON for QuPath, the parquet cell table, the overlay."""
from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import replace

import cv2
import numpy as np
import pytest
from scipy.spatial import cKDTree

from her2score.categories import CATEGORIES
from her2score.outlines import Outlines, clip_outline, draw_cell_rings, is_simple, polygon_area, trace_outline_points, trace_outlines
from her2score.outputs import (
    CATEGORY_COLOURS, MIN_OVERLAY_PX, NON_TUMOUR_COLOUR, OUTPUT_FILES, TEXT_WIDTH_PX, _json_rings, category_colour, overlay_image, write_cells_geojson, write_outputs,
)
from her2score.pipeline import ScoringConfig, analyse_slide
from her2score.slide import ArraySlide
from her2score.synthetic import generate_field

shapely = pytest.importorskip("shapely", reason="shapely is a test dependency: pip install '.[test]'")
from shapely.geometry import Point, Polygon, shape  # noqa: E402


# ------------------------------------------------------------------------------------ outlines

def _voronoi_labels(rng, size=64, holes=0.2) -> np.ndarray:
    pts = rng.integers(0, size, (int(rng.integers(5, 40)), 2))
    yy, xx = np.indices((size, size))
    _, idx = cKDTree(pts).query(np.column_stack([yy.ravel(), xx.ravel()]))
    labels = (idx.reshape(size, size) + 1).astype(np.int32)
    labels[rng.random((size, size)) < holes] = 0  # speckle: necks, pinches, holes, fragments
    return labels


def test_outlines_of_awkward_shapes_are_valid_and_follow_the_pixels():
    lab = np.zeros((20, 30), np.int32)
    lab[2:8, 2:8] = 1                      # square
    lab[10:18, 2:4] = 2; lab[16:18, 2:10] = 2   # L
    lab[2:6, 12:16] = 3; lab[6, 16] = 3; lab[7:11, 17:21] = 3   # two blocks joined diagonally (a pinch)
    lab[12:19, 12:19] = 4; lab[15, 15] = 0      # a hole
    lab[2, 24:29] = 5                      # one pixel thick
    lab[12:15, 24:27] = 6; lab[17:19, 24:27] = 6  # two parts: the larger is traced
    polys = trace_outlines(lab, np.array([1, 2, 3, 4, 5, 6, 7]))
    assert polys[6].shape == (0, 2)  # label 7 has no pixel
    for k, p in enumerate(polys[:6], start=1):
        assert p.dtype == np.float32 and p.shape[1] == 2
        poly = Polygon(p)
        assert poly.is_valid and is_simple(p), k
        n, part = cv2.connectedComponents((lab == k).astype(np.uint8), connectivity=4)
        largest = 1 + np.argmax(np.bincount(part.ravel())[1:])
        ys, xs = np.nonzero(part == largest)  # the traced part: every pixel centre inside (0.25 px from its edge)
        assert all(poly.contains(Point(x, y)) for x, y in zip(xs, ys)), k
        assert poly.area <= (lab == k).sum()
    sq = Polygon(polys[0])
    assert sq.bounds == (1.75, 1.75, 7.25, 7.25) and len(polys[0]) == 4  # 6x6 px square: 4 corners
    assert Polygon(polys[5]).area == pytest.approx(2.5 * 2.5)  # the 3x3 part, not the 3x2 one


def test_outlines_of_random_label_images_are_all_valid():
    rng = np.random.default_rng(7)
    n = 0
    for _ in range(40):
        lab = _voronoi_labels(rng)
        ids = np.unique(lab)[1:]
        for p in trace_outlines(lab, ids):
            n += 1
            assert Polygon(p).is_valid and is_simple(p)
    assert n > 500


def test_is_simple_agrees_with_shapely():
    bowtie = np.array([[0, 0], [2, 2], [2, 0], [0, 2]], np.float32)
    spike = np.array([[0, 0], [4, 0], [4, 4], [2, 4], [2, 1], [2, 4], [0, 4]], np.float32)  # back along itself
    square = np.array([[0, 0], [3, 0], [3, 3], [0, 3]], np.float32)
    for p in (bowtie, spike, square):
        assert is_simple(p) == Polygon(p).is_valid
    assert polygon_area(square) == 9.0


def test_clip_outline_keeps_polygons_valid_inside_the_image():
    u = np.array([[-5, 0], [5, 0], [5, 10], [3, 10], [3, 2], [-3, 2], [-3, 10], [-5, 10]], np.float32)  # crosses x=0 twice
    c_shape = np.array([[-5, 0], [5, 0], [5, 2], [-3, 2], [-3, 8], [5, 8], [5, 10], [-5, 10]], np.float32)  # two arms in
    for poly in (u, u[:, ::-1].copy(), u + [8, -5], c_shape, c_shape[::-1].copy()):
        c = clip_outline(poly, 6, 6)
        assert len(c) >= 3 and Polygon(c).is_valid
        assert c.min() >= 0 and c[:, 0].max() <= 6 and c[:, 1].max() <= 6
    inside = np.array([[1, 1], [2, 1], [2, 2]], np.float32)
    assert np.array_equal(clip_outline(inside, 6, 6), inside)
    assert clip_outline(inside + 100, 6, 6).shape == (0, 2)  # wholly outside


def test_clipped_outlines_stay_valid_once_rounded_as_written():
    """A vertex 0.003 px inside the edge rounds onto it (as the GeoJSON writes 0.01 px): the ring must be simple
    after that rounding, not only before (a review found 34 of 20,000 clipped outlines folding back)."""
    ring = np.array([[851.997131, 605.41], [851.997131, 606.51], [853.5, 606.51], [853.5, 581.19], [850.0, 581.19]])
    c = clip_outline(ring, 852, 1114)
    assert Polygon(c).is_valid and np.array_equal(c, np.round(c, 2)) and c[:, 0].max() <= 852
    rng = np.random.default_rng(5)
    for _ in range(2000):  # staircase outlines of pixel cells whose edge falls a hair from the image's
        cells = rng.random((6, 6)) < 0.6
        cells[2:4, 2:4] = True
        n, lab = cv2.connectedComponents(cells.astype(np.uint8), connectivity=4)
        up = cv2.resize((lab == lab[2, 2]).astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        cs, _ = cv2.findContours(np.pad(up, 1), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        poly = cs[0].reshape(-1, 2) / 2.0 + rng.uniform(0, 3, 2)
        w = float(np.round(rng.uniform(poly[:, 0].min() + 0.5, poly[:, 0].max() - 0.5), 2)) - rng.choice([0.0, 0.003, 0.997])
        c = clip_outline(poly, w, 100.0)
        assert len(c) == 0 or (Polygon(c).is_valid and np.array_equal(c, np.round(c, 2))), (poly.tolist(), w)
        assert len(c) == 0 or (c.min() >= 0 and c[:, 0].max() <= w and c[:, 1].max() <= 100), (poly.tolist(), w)


def test_compact_outlines_read_back_as_traced_and_placed():
    """Outlines keeps each tile's grid vertices (int16) and gives, for every way of indexing, the float32
    level-0 rings trace_outlines gives, multiplied by the tile's scale and moved by its origin."""
    rng = np.random.default_rng(5)
    tiles, expected = [], []
    for origin, scale in (((3, 7), 2.0), ((100, 40), 1.9685)):
        lab = cv2.resize(rng.integers(0, 6, (8, 8)).astype(np.uint8), (48, 48), interpolation=cv2.INTER_NEAREST)
        ids = np.array([5, 1, 9, 2, 4])  # 9: no such label, an empty outline
        points, sizes = trace_outline_points(lab, ids)
        assert points.dtype == np.int16 and sizes[2] == 0 and (sizes[[0, 1, 3, 4]] > 0).all()
        tiles.append((points, sizes, (*origin, scale)))
        expected += [(p * np.float32(scale) + np.array(origin, np.float32)).astype(np.float32) for p in trace_outlines(lab, ids)]
    out = Outlines(tiles)

    def same(got, want) -> bool:
        return len(got) == len(want) and all(g.dtype == np.float32 and np.array_equal(g, w) for g, w in zip(got, want))

    assert len(out) == 10 and same(list(out), expected)
    assert same([out[i] for i in range(10)], expected) and np.array_equal(out[-1], expected[-1])
    assert same(out[3:8], expected[3:8]) and same(out[::3], expected[::3])  # across the two tiles
    assert same(out[np.array([7, 0, 7])], [expected[7], expected[0], expected[7]])
    assert same(out[np.arange(10) % 4 == 0], expected[::4])
    xy, sizes = out.block(3, 8)
    assert np.array_equal(sizes, [len(e) for e in expected[3:8]]) and np.array_equal(xy, np.concatenate(expected[3:8]))
    assert out.block(4, 4)[0].shape == (0, 2)
    pick = [8, 3, 4, -1, 7, 0, 1, 2, 6, 5]  # within a tile and across both, in and out of order, from the end, empty
    xy, sizes = out.take(pick)
    assert same(np.split(xy, np.cumsum(sizes)[:-1]), [expected[i] for i in pick])
    assert out.take([])[0].shape == (0, 2)
    with pytest.raises(IndexError):
        out[10]
    with pytest.raises(IndexError):
        out.take([2, -11])


def test_rings_leave_the_cell_border_untouched():
    lab = np.zeros((40, 40), np.int32)
    lab[5:20, 5:20], lab[5:20, 20:35] = 1, 2
    polys = trace_outlines(lab, np.array([1, 2]))
    canvas = np.full((40, 40, 3), 255, np.uint8)
    draw_cell_rings(canvas, polys, [(255, 0, 0), (0, 0, 255)], inset_px=2, width_px=1)
    assert (canvas[12, 19] == 255).all() and (canvas[12, 20] == 255).all()  # the shared border: not drawn
    assert (canvas == (255, 0, 0)).all(axis=2).sum() > 20 and (canvas == (0, 0, 255)).all(axis=2).sum() > 20


def test_a_cell_grown_round_another_does_not_hide_it():
    """An outline enclosing another cell (a cell grown round it) is filled first, so the enclosed cell keeps
    its ring whichever comes first in the table."""
    lab = np.zeros((60, 60), np.int32)
    lab[5:55, 5:55] = 1
    lab[20:40, 20:40] = 2  # inside cell 1
    polys = trace_outlines(lab, np.array([1, 2]))
    for order in ([0, 1], [1, 0]):
        canvas = np.full((60, 60, 3), 255, np.uint8)
        colours = [(255, 0, 0), (0, 0, 255)]
        draw_cell_rings(canvas, [polys[i] for i in order], [colours[i] for i in order], inset_px=2, width_px=1)
        assert (canvas == (0, 0, 255)).all(axis=2).sum() > 20 and (canvas == (255, 0, 0)).all(axis=2).sum() > 20


def test_category_colours_cover_every_category():
    for c in CATEGORIES:
        assert category_colour(c) == CATEGORY_COLOURS.get(c, category_colour(c))
    new = category_colour("some_future_category")
    assert new == category_colour("some_future_category") and new not in CATEGORY_COLOURS.values()


# ------------------------------------------------------------------------------------ on a scored field

@pytest.fixture(scope="module")
def field():
    f = generate_field("2+", seed=41, size_px=(384, 320))
    slide = ArraySlide(f.image, mpp=f.mpp)
    return f, slide, analyse_slide(slide)


def test_geojson_every_polygon_valid_inside_the_image_and_classified(field):
    f, slide, a = field
    buf = io.BytesIO()
    write_cells_geojson(a, buf, slide_size=slide.dimensions)
    geo = json.loads(buf.getvalue())
    feats = geo["features"]
    assert len(feats) == len(a.cells["x"]) > 100
    w, h = slide.dimensions
    whys = a.cells["left_out_as"]
    assert {"lymphocyte-like", None} <= set(whys)
    for i, (feat, cat, tum, given, why) in enumerate(zip(feats, a.cells["category"], a.cells["tumour"],
                                                         a.cells["neighbours_membrane"], whys)):
        g = shape(feat["geometry"])
        assert feat["geometry"]["type"] == "Polygon" and g.is_valid and not g.is_empty
        assert feat["geometry"]["coordinates"][0][0] == feat["geometry"]["coordinates"][0][-1]  # closed
        x0, y0, x1, y1 = g.bounds
        assert x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == cat and cat in CATEGORIES  # the category only
        assert props["tumour"] is bool(tum) and props["measurements"]["tumour"] == int(tum)
        assert props["left_out_as"] == why and (why is None) == bool(tum)  # why a cell is not a tumour cell
        # QuPath drops a detection's tumour and left_out_as properties but reads name and color: a cell
        # left out says why in its name and is drawn grey, as on the overlay, not in its category's colour
        assert (props.get("name"), props.get("color")) == ((None, None) if tum else
                                                          (f"non-tumour: {why}", list(NON_TUMOUR_COLOUR)))
        assert props["measurements"]["cell_id"] == i  # the row of cells.parquet (cell_id) it is
        assert {"completeness", "membrane_od", "width_um", "cell_area_um2"} <= set(props["measurements"])
        assert props["measurements"]["neighbours_membrane"] == int(given) and (cat == "none" or not given)
    # outlines touch the image edge somewhere (clipped there), and hold their cell's centre
    assert max(shape(ft["geometry"]).bounds[2] for ft in feats) == pytest.approx(w, abs=0.5)
    inside = [shape(ft["geometry"]).buffer(0.5).contains(Point(x + 0.5, y + 0.5))
              for ft, x, y in zip(feats, a.cells["x"], a.cells["y"])]
    assert np.mean(inside) > 0.97


def test_json_rings_write_what_json_writes():
    rng = np.random.default_rng(0)
    values = np.concatenate([np.round(rng.uniform(-1e5, 1e5, 5000), 2), np.round(rng.uniform(-2, 2, 5000), 2),
                             np.round(rng.uniform(0, 1e4, 1000).astype(np.float32), 2).astype(np.float64),
                             rng.uniform(0, 1e3, 100), [0.0, -0.0, 0.01, -0.01, 99.99, 100.0, 2.0**20, 1e13, 1e16, 5e-324,
                                                        np.nan, np.inf, -np.inf, 1048575.99, 0.5]])
    xy = rng.permutation(values)[: len(values) // 2 * 2].reshape(-1, 2)
    lengths = np.diff(np.r_[0, np.sort(rng.choice(np.arange(1, len(xy)), 300, replace=False)), len(xy)])
    starts = np.cumsum(lengths) - lengths
    expected = []
    for s, n in zip(starts, lengths):
        coords = xy[s : s + n].tolist()
        expected.append(json.dumps(coords + coords[:1], separators=(",", ":"))[1:-1].encode())
    assert _json_rings(xy, lengths) == expected
    exact = np.round(rng.uniform(0, 5e4, (1000, 2)), 2)
    assert _json_rings(exact, np.array([1000])) == [json.dumps((exact.tolist() + exact[:1].tolist()), separators=(",", ":"))[1:-1].encode()]
    assert _json_rings(np.zeros((0, 2)), np.zeros(0, int)) == []


@pytest.mark.parametrize("shrink", [1.0, 0.6])
def test_geojson_is_each_cell_dumped_by_json(field, shrink):
    """The vectorised writer's text is the per-cell json.dumps of the outline (+0.5 px, clipped, rounded to 0.01 px)."""
    f, slide, a = field
    w, h = slide.dimensions[0] * shrink, slide.dimensions[1] * shrink
    buf = io.BytesIO()
    write_cells_geojson(a, buf, slide_size=(w, h))
    geoms = [feat.split(b',"properties"', 1)[0] for feat in buf.getvalue().split(b'{"type":"Feature","geometry":')[1:]]
    assert len(geoms) == len(a.cells["x"])
    points = 0
    for geom, outline, x, y in zip(geoms, a.cells["outline"], a.cells["x"].tolist(), a.cells["y"].tolist()):
        ring = np.asarray(outline, np.float64) + 0.5
        if len(ring) < 3 or ring.min() < 0 or ring[:, 0].max() > w or ring[:, 1].max() > h:
            ring = clip_outline(ring, w, h) if len(ring) >= 3 else ring  # rounded when clipped
        if len(ring) >= 3:
            coords = np.round(ring, 2).tolist()
            assert geom == b'{"type":"Polygon","coordinates":[' + json.dumps(coords + coords[:1], separators=(",", ":")).encode() + b"]}"
        else:
            points += 1
            assert geom == f'{{"type":"Point","coordinates":[{min(max(x + 0.5, 0), w):.2f},{min(max(y + 0.5, 0), h):.2f}]}}'.encode()
    assert (points > 0) == (shrink < 1)


def test_parquet_round_trip_and_optional_csv(field, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    f, slide, a = field
    write_outputs(a, tmp_path / "out", slide=slide, cells_csv=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*OUTPUT_FILES, "cells.csv"])
    table = pq.read_table(tmp_path / "out" / "cells.parquet")
    n = len(a.cells["x"])
    assert table.num_rows == n
    d = table.to_pydict()
    assert d["cell_id"] == list(range(n))
    assert d["category"] == a.cells["category"].tolist() and d["tumour"] == a.cells["tumour"].tolist()
    assert np.allclose(d["x_px"], a.cells["x"]) and np.allclose(d["membrane_od"], a.cells["membrane_od"])
    assert np.allclose(d["x_um"], a.cells["x"] * a.result.mpp, atol=1e-3)
    assert "outline" not in d and "radii_um" not in d
    # the text columns' dictionaries hold every value in its order, present or not: one Categorical across slides
    from her2score.outputs import VOCABULARIES

    for name, vocabulary in VOCABULARIES.items():
        assert table.column(name).chunk(0).dictionary.to_pylist() == list(vocabulary), name
    rows = list(csv.DictReader(open(tmp_path / "out" / "cells.csv")))
    assert [r["category"] for r in rows] == d["category"] and list(rows[0]) == table.column_names
    # a missing measurement (a cell with no cytoplasm left to read) is null in the parquet and an empty CSV field, never NaN
    cyto = a.cells["cytoplasm_dab_od"].copy()
    missing = (np.arange(n) % 7 == 3) | np.isnan(cyto)
    cyto[missing] = np.nan
    write_outputs(replace(a, cells={**a.cells, "cytoplasm_dab_od": cyto}), tmp_path / "nan", slide=slide, cells_csv=True)
    column = pq.read_table(tmp_path / "nan" / "cells.parquet").column("cytoplasm_dab_od")
    assert column.null_count == missing.sum() and np.allclose(column.to_numpy(zero_copy_only=False)[~missing], cyto[~missing])
    rows = list(csv.DictReader(open(tmp_path / "nan" / "cells.csv")))
    assert [r["cytoplasm_dab_od"] == "" for r in rows] == missing.tolist() and "nan" not in (tmp_path / "nan" / "cells.csv").read_text()
    write_outputs(a, tmp_path / "plain", slide=slide)
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == sorted(OUTPUT_FILES)
    # an in-memory slide that cannot be opened again: the overlay is drawn on the thumbnail
    write_outputs(a, tmp_path / "memory")
    png = cv2.imdecode(np.frombuffer((tmp_path / "memory" / "overlay.png").read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert png.shape[1] == max(a.thumbnail.shape[1], MIN_OVERLAY_PX)


def test_a_cell_without_a_nucleus_has_null_nucleus_measurements(tmp_path):
    """A cell found by its membrane ring alone (a cell sectioned above its nucleus: here eight intense complete
    cells' nuclei painted over with their own cytoplasm's colour) has no nucleus: its nucleus_area_um2 is 0 and
    its other nucleus measurements are null, not 0 (a review: an elongation of 0)."""
    pq = pytest.importorskip("pyarrow.parquet")
    f = generate_field("3+", seed=9305)
    c, image = f.cells, f.image.copy()
    inner = (c["x_px"] > 60) & (c["x_px"] < 450) & (c["y_px"] > 60) & (c["y_px"] < 450)
    yy, xx = np.mgrid[:512, :512]
    for i in np.flatnonzero((c["category"] == "strong_complete") & c["tumour"] & inner)[:8]:
        nucleus = np.hypot(xx - c["x_px"][i], yy - c["y_px"][i]) < (1.3 * c["nucleus_radius_um"][i] + 0.8) / f.mpp
        cytoplasm = (f.label_map == i) & ~nucleus & (f.dab_od < 0.1)
        image[nucleus] = np.median(image[cytoplasm], axis=0).astype(np.uint8)
    a = analyse_slide(image, mpp=f.mpp)
    write_outputs(a, tmp_path / "out", cells_csv=True)
    d = pq.read_table(tmp_path / "out" / "cells.parquet").to_pydict()
    ring = [i for i, area in enumerate(d["nucleus_area_um2"]) if area == 0]
    assert ring and len(ring) < len(d["cell_id"])
    for column in ("nucleus_elongation", "nucleus_width_um", "nucleus_dab_od", "hematoxylin_od"):
        assert [i for i, v in enumerate(d[column]) if v is None] == ring, column
    rows = list(csv.DictReader(open(tmp_path / "out" / "cells.csv")))
    assert all(rows[i]["nucleus_elongation"] == "" and rows[i]["nucleus_area_um2"] == "0.0000" for i in ring)
    json.loads((tmp_path / "out" / "cells.geojson").read_text())  # no NaN written into the GeoJSON


def test_a_rewrite_that_dies_leaves_no_result_json_beside_a_mix_of_two_runs(field, tmp_path, monkeypatch):
    """result.json marks a finished slide: a rewrite killed after the cell files are replaced (here: the overlay
    fails) must not leave the earlier result.json, which a resumed batch would take as done, beside the new cells."""
    from her2score import outputs

    f, slide, a = field
    write_outputs(a, tmp_path / "out", slide=slide)
    assert (tmp_path / "out" / "result.json").is_file()

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "overlay_png", dies)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(a, tmp_path / "out", slide=slide)
    assert not (tmp_path / "out" / "result.json").exists() and (tmp_path / "out" / "cells.parquet").is_file()


def test_an_earlier_cells_csv_is_gone_before_a_rewrite_without_it_finishes(field, tmp_path, monkeypatch):
    """Rewritten without cells.csv, a slide's earlier cells.csv is removed before result.json is written
    again: killed in between, no finished-looking slide keeps the other run's cell table."""
    f, slide, a = field
    write_outputs(a, tmp_path / "out", slide=slide, cells_csv=True)
    assert (tmp_path / "out" / "cells.csv").is_file()
    import her2score.outputs as outputs

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "atomic_write", dies)  # the overlay and result.json are the last files written
    with pytest.raises(KeyboardInterrupt):
        write_outputs(a, tmp_path / "out", slide=slide)
    assert not (tmp_path / "out" / "cells.csv").exists() and not (tmp_path / "out" / "result.json").exists()


def test_outputs_written_with_feature_workers_are_the_same_bytes(field, tmp_path, monkeypatch):
    from her2score import outputs

    f, slide, a = field
    monkeypatch.setattr(outputs, "GEOJSON_CHUNK", 40)  # several chunks of cells: the forked workers share them
    write_outputs(a, tmp_path / "one", slide=slide)
    write_outputs(a, tmp_path / "two", slide=slide, workers=2)
    # no slide given: the slide is opened again from its file, here and with workers alike
    png = tmp_path / "field.png"
    cv2.imwrite(str(png), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))
    from_file = analyse_slide(png, mpp=f.mpp)
    write_outputs(from_file, tmp_path / "one_reopened")
    write_outputs(from_file, tmp_path / "two_reopened", workers=2)
    for name in OUTPUT_FILES:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
        assert (tmp_path / "one_reopened" / name).read_bytes() == (tmp_path / "two_reopened" / name).read_bytes(), name


def test_field_overlay_is_at_the_field_resolution_and_keeps_the_membrane_visible(field):
    f, slide, a = field
    img, box = overlay_image(a, slide)
    x, y, w, h = box
    assert (w, h) == slide.dimensions and img.shape[1] == max(w, MIN_OVERLAY_PX)  # the field at its own resolution
    panel = img[y : y + h, x : x + w]
    changed = np.any(panel != f.image, axis=2)
    assert 0.05 < changed.mean() < 0.6
    # the cell borders (where the membrane is) are left as they were; the scale bar is below the image, not on it
    border = np.zeros((h, w), np.uint8)
    for p in a.cells["outline"]:
        cv2.polylines(border, [np.round(p).astype(np.int32)], True, 1, 1)
    assert changed[border > 0].mean() < 0.1
    rings = np.zeros((h, w), bool)
    for p in a.cells["outline"]:  # every changed pixel is a ring pixel inside some cell
        m = np.zeros((h, w), np.uint8)
        cv2.fillPoly(m, [np.round(p).astype(np.int32)], 1)
        rings |= m > 0
    assert not (changed & ~rings).any()
    # title band above and legend band below are not the image; beside a narrow field, white
    assert y > 0 and img.shape[0] > y + h and (img[y : y + h, w:] == 255).all()


def test_a_narrow_field_gets_bands_wide_enough_for_its_title_and_legend():
    f = generate_field("2+", seed=43, size_px=(96, 512))
    slide = ArraySlide(f.image, mpp=f.mpp)
    img, (x, y, w, h) = overlay_image(analyse_slide(slide, config=ScoringConfig(min_tumour_cells=1)), slide)
    assert (w, h) == (96, 512) and img.shape[1] == MIN_OVERLAY_PX
    legend = img[y + h :]
    assert (legend[:, MIN_OVERLAY_PX - 5 :] == 255).all()  # the legend's last column is clear: nothing cut at the edge


def test_a_wide_fields_text_grows_with_it_so_that_it_reads_the_same_fitted_to_a_screen():
    f = generate_field("2+", seed=44, size_px=(2400, 256))
    slide = ArraySlide(f.image, mpp=f.mpp)
    a = analyse_slide(slide)
    img, (x, y, w, h) = overlay_image(a, slide)
    narrow, (_, y1, w1, h1) = overlay_image(a, ArraySlide(f.image[:, :1200].copy(), mpp=f.mpp))  # at TEXT_WIDTH_PX: base size
    assert (w, w1) == (2400, TEXT_WIDTH_PX)

    def ink_rows(band: np.ndarray) -> int:  # rows of the first text line: from its first dark row to the next blank row
        dark = (band < 128).any(axis=(1, 2))
        top = int(np.argmax(dark))
        return int(np.argmin(dark[top:]))

    big, base = ink_rows(img[:y]), ink_rows(narrow[:y1])
    assert 1.6 * base <= big <= 2.4 * base, (big, base)  # the title's first line, 2x the width: about 2x as tall
    assert img.shape[0] - (y + h) > 1.6 * (narrow.shape[0] - (y1 + h1))  # scale bar and legend too


def test_heatmap_bins_lie_where_their_cells_are():
    """Every bin covers its own bin_um of the slide on the thumbnail, whatever the thumbnail's width in bins (here
    a 1003 px thumbnail at 16 µm/px over 100 µm bins: 160.48 bins, a grid of 161 stretched over it before)."""
    from her2score.outputs import _grey_panel, _heat_panel

    thumb = np.full((600, 1003, 3), 255, np.uint8)
    bin_um = 100.0
    nb_x, nb_y = int(np.ceil(1003 * 16 / bin_um)), int(np.ceil(600 * 16 / bin_um))
    frac, total = np.zeros((nb_y, nb_x)), np.full((nb_y, nb_x), 10)
    frac[:, nb_x // 2 :] = 1.0  # the right half from bin nb_x // 2 on: x >= 8000 µm, thumbnail px 500
    panel = _heat_panel(_grey_panel(thumb, 1.0), 16.0, frac, total, bin_um, "t", 1003, (200, 0, 0))
    row = panel[panel.shape[0] // 2]  # a row through the map (title above, colour bar below)
    red = np.flatnonzero((row[:, 0] > 150) & (row[:, 1] < 120))
    assert red[0] == 500 and red[-1] == 1002


def test_the_overlay_draws_the_tumour_annotation_given(field, tmp_path):
    """A pathologist checks that the annotation given (--regions) was the one applied, and where: its outline, its
    holes and the non-tumour cut-outs are drawn on the field, black, and named in the legend (a review: cells were
    coloured inside it, grey outside, with no outline to check it by); a mask's edge alike."""
    from PIL import Image

    from her2score.outputs import REGION_COLOUR, _legend_entries

    f, slide, _ = field

    def square(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    geo = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(20, 20, 300, 280)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square(120, 100, 200, 180)]},
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma"}}}]}
    (tmp_path / "r.geojson").write_text(json.dumps(geo))
    mask = np.zeros((320, 384), np.uint8)
    mask[40:200, 60:260] = 255
    Image.fromarray(mask).save(tmp_path / "r.png")
    plain, _ = overlay_image(analyse_slide(slide), slide)
    for region, edges in ((tmp_path / "r.geojson", [((20, 300), 20), ((20, 300), 279), ((120, 200), 100)]),
                          (tmp_path / "r.png", [((60, 260), 40), ((60, 260), 199)])):
        a = analyse_slide(slide, region=region)
        assert a.region is not None and a.result.region.startswith(("annotation", "mask"))
        img, (x, y, w, h) = overlay_image(a, slide)
        panel = img[y : y + h, x : x + w]
        for (x0, x1), row in edges:  # along each top or bottom edge, mostly the outline's colour
            on = np.all(panel[row, x0 + 5 : x1 - 5] == REGION_COLOUR, axis=1)
            assert on.mean() > 0.8, (region.name, row, on.mean())
        assert ("tumour annotation given (its holes and cut-outs too)", REGION_COLOUR) in _legend_entries(a)
        assert not np.array_equal(img[-40:], plain[-40:])  # the legend drawn with it (its last 40 px rows, equal in size)
    # a mask going on past a canvas (a slide's region window) draws no frame where the canvas cuts it, and none
    # past the mask's own edge (the white beside a tall slide's thumbnail): what lies beyond the mask is outside
    from types import SimpleNamespace

    from her2score.outputs import _draw_region
    from her2score.region import Region

    mask = np.zeros((1000, 1000), bool)
    mask[100:900, 100:900] = True  # level-0 400-3600 at 4 level-0 px a mask pixel
    for side in (512, 1500):  # the outline's width grows with the canvas: none of it may reach in
        window = np.full((side, side, 3), 255, np.uint8)
        _draw_region(window, SimpleNamespace(region=Region("m.png", mask=mask, mask_scale=(0.25, 0.25))), (600.0, 600.0), 1.0)
        assert (window == 255).all()  # wholly inside the annotation
    # a polygon whose vertices lie 1e12 px away (an annotation in other units) is drawn where it crosses the canvas,
    # without overflowing the int32 OpenCV draws in (numpy warned, and the line was wherever the overflow put it)
    far = np.array([[100.5, 100.5], [1e12, 100.5], [1e12, 1e12], [100.5, 1e12], [100.5, 100.5]])
    window = np.full((512, 512, 3), 255, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _draw_region(window, SimpleNamespace(region=Region("r.geojson", polygons=((far, ()),))), (0.0, 0.0), 1.0)
    dark = np.all(window == REGION_COLOUR, axis=2)
    assert dark[99:102, 150:500].any(axis=0).all() and dark[150:500, 99:102].any(axis=1).all() and not dark[110:, 110:].any()
    window = np.full((512, 512, 3), 255, np.uint8)
    _draw_region(window, SimpleNamespace(region=Region("m.png", mask=mask, mask_scale=(0.25, 0.25))), (200.0, 200.0), 1.0)
    dark = np.all(window == REGION_COLOUR, axis=2)
    assert dark[200:203, 300:500].any(axis=0).mean() > 0.9 and not dark[:190].any()  # its edge at level-0 400
    right = np.zeros((100, 100), bool)
    right[20:80, 50:] = True  # reaching the slide's right edge (level-0 400 here)
    padded = np.full((400, 600, 3), 255, np.uint8)  # the slide, then 200 px of white beside it
    _draw_region(padded, SimpleNamespace(region=Region("m.png", mask=right, mask_scale=(0.25, 0.25))), (0.0, 0.0), 1.0)
    dark = np.all(padded == REGION_COLOUR, axis=2)
    assert not dark[:, 403:].any() and dark[80:320, 396:400].any(axis=1).all()


def test_slide_overlay_has_heatmaps_and_regions_at_cell_resolution(field, monkeypatch):
    f, slide, a = field
    img, box = overlay_image(a, slide, field_max_px=100, n_regions=2, region_px=128)
    assert box is None and img.shape[1] >= 1200
    ok, png = cv2.imencode(".png", img)
    assert ok and len(png) > 10_000
    from her2score import outputs

    monkeypatch.setattr(outputs, "TEXT_WIDTH_PX", 10**6)  # text that never grows: the slide overlay's is its base size
    assert np.array_equal(overlay_image(a, slide, field_max_px=100, n_regions=2, region_px=128)[0], img)


def test_a_tall_narrow_slides_overlay_stays_a_readable_size(field):
    """A strip 40 times as tall as wide: its thumbnail and heatmaps are drawn at most PANEL_MAX_RATIO times
    as tall as a panel is wide, narrower than the panel (a 20,000 x 50 px strip drew a 143,443 px tall overlay)."""
    from her2score.outputs import PANEL_MAX_RATIO

    f, _, _ = field
    strip = np.ascontiguousarray(np.tile(f.image, (10, 1, 1))[:, :80])  # 40 times as tall as wide
    slide = ArraySlide(strip, mpp=f.mpp)
    a = analyse_slide(slide)
    img, box = overlay_image(a, slide, field_max_px=100, n_regions=2, region_px=128)
    col_w = img.shape[1] // 4 - 8
    th, tw = a.thumbnail.shape[:2]
    assert box is None and th > 30 * tw  # width-fitted, its thumbnail alone would be over 30 panels' widths tall
    assert img.shape[0] < (PANEL_MAX_RATIO + 2) * col_w, img.shape  # with the title, the regions and the legend
    ok, png = cv2.imencode(".png", img)
    assert ok
    # an annotation reaching past the strip's right edge is drawn on the strip, not into the white beside it
    from her2score.outputs import REGION_COLOUR
    from her2score.region import Region

    past = Region("p", polygons=((np.array([[20, 100], [400, 100], [400, 2000], [20, 2000], [20, 100]], float), ()),))
    drawn, _ = overlay_image(replace(a, region=past), slide, field_max_px=100, n_regions=0, region_px=128)
    plain, _ = overlay_image(a, slide, field_max_px=100, n_regions=0, region_px=128)
    assert drawn.shape[1] == plain.shape[1] and drawn.shape[0] >= plain.shape[0]  # its legend entry may take a row more
    body = plain.shape[0] - 120  # above the legend and the scale band
    changed = np.any(drawn[:body] != plain[:body], axis=2)
    assert changed.any()
    panel_w = round(tw * min(col_w / tw, PANEL_MAX_RATIO * col_w / th))  # the strip's drawn width in the first panel
    rows = np.all(drawn[:body] == REGION_COLOUR, axis=2)[:, : panel_w + 3].any(axis=1)  # the rows the outline is drawn on
    assert rows.sum() > 20 and not changed[rows, panel_w + 3 : col_w].any()  # none of it in the white beside the strip


def test_slide_overlay_regions_lie_wholly_inside_the_slide(field):
    """A window the grid starts near the slide's edge is moved in, not read past it (a panel 90 µm of tissue
    and the rest blank, its box open on the thumbnail)."""
    f, slide, a = field
    boxes = []

    class Recording(ArraySlide):
        def read_region(self, location, size, *, mpp):
            boxes.append((*location, *size))
            return super().read_region(location, size, mpp=mpp)

    overlay_image(a, Recording(f.image, mpp=f.mpp), field_max_px=100, n_regions=4, region_px=200)
    w, h = slide.dimensions
    assert boxes and all(0 <= x and x + bw <= w and 0 <= y and y + bh <= h for x, y, bw, bh in boxes), (boxes, w, h)


def test_a_slide_without_tumour_cells_still_shows_regions_at_cell_resolution(field):
    from her2score.outputs import _regions

    f, slide, a = field
    none = replace(a, cells={**a.cells, "tumour": np.zeros(len(a.cells["x"]), bool)})
    regions = _regions(none, 2, 128 * 0.5 / a.result.mpp)
    assert len(regions) == 2 and all(why.startswith("most cells (no tumour cells) (") for _, _, why in regions)  # by count alone


def test_regions_show_what_the_call_rests_on_then_the_slides_bulk_without_overlap(field):
    """Strongest-first windows spent a mosaic slide's six on categories of 1-3 cells and never showed its faint or
    unstained tissue (a pathologist's review): the categories the call rests on come first, then the others, most
    common first, where a window holds at least REGION_MIN_CELLS of them."""
    from collections import Counter

    from her2score.guidelines import deciding_categories
    from her2score.outputs import REGION_MIN_CELLS, _regions

    f, slide, a = field
    window = 64.0
    regions = _regions(a, 6, window)
    assert 1 <= len(regions) <= 6
    named = [why.split("'")[1].replace(" ", "_") for _, _, why in regions if "'" in why]
    rests_on = deciding_categories(a.result.counts, a.result.guideline)[a.result.score]
    assert a.result.score == "2+" and named[0] in rests_on, (named, rests_on)
    count = Counter(a.cells["category"][a.cells["tumour"]])
    others = [c for c in named if c not in rests_on]
    assert others == sorted(others, key=lambda c: -count[c])  # the slide's bulk, most common first
    for (x, y, why) in regions:
        if "'" in why and why.split("'")[1].replace(" ", "_") not in rests_on:
            assert int(why.rsplit("(", 1)[1].rstrip(")")) >= REGION_MIN_CELLS, why
    for i, (x, y, _) in enumerate(regions):  # windows are disjoint
        for x2, y2, _ in regions[i + 1 :]:
            assert abs(x - x2) >= window or abs(y - y2) >= window


def test_slide_heatmaps_map_the_cells_each_cut_off_is_read_on():
    """Three heatmaps, of the tumour cells counted for 3+, 2+ and 1+ under the slide's guideline: 20% intense
    lateral cells are a breast 2+ (unusual pattern) but a gastric 3+; the strong map once counted intense
    incomplete 1+ cells under a 10% cut-off mark, and no map showed faint cells."""
    from her2score.guidelines import deciding_categories

    counts = {"none": 80, "strong_lateral": 20}
    breast, gastric = (deciding_categories(counts, g) for g in ("breast-asco-cap-2023", "gastric"))
    assert "strong_lateral" not in breast["3+"] and "strong_lateral" in breast["2+"] and "strong_lateral" in gastric["3+"]
    assert "strong_partial" in deciding_categories({"none": 80, "strong_partial": 20}, "breast-asco-cap-2023")["2+"]
    assert "strong_partial" not in gastric["2+"] and "faint_partial" in breast["1+"] and "faint_partial" in gastric["1+"]


def test_the_heatmaps_count_the_cells_of_the_slides_own_call(field):
    """The maps are drawn from the cells each score's cut-off is read on in the slide itself: every stained cell in
    its 1+ map, only intense complete ones in its 3+ map (breast), none of its unstained ones anywhere."""
    from her2score.outputs import _counted_for

    f, slide, a = field
    counted = _counted_for(a)
    category = a.cells["category"]
    assert (counted["1+"] == (category != "none")).all() and counted["1+"].any()
    assert (counted["3+"] == (category == "strong_complete")).all()
    empty = replace(a, result=replace(a.result, counts={c: 0 for c in a.result.counts}))
    assert not any(m.any() for m in _counted_for(empty).values())  # no tumour cells counted: nothing to map


def test_write_outputs_names_what_it_needs_when_given_score_slides_result(field, tmp_path):
    from her2score.outputs import write_outputs

    f, slide, a = field
    with pytest.raises(TypeError, match="write_outputs needs analyse_slide's SlideAnalysis .+, got SlideResult"):
        write_outputs(a.result, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_parquet_columns_of_any_byte_order_or_text_width_are_written_as_their_values():
    """A cell table built by hand (numpy's fixed-width text, a big-endian float read from a file) is written as its
    values: the buffers Arrow takes are little-endian and its text is variable-width."""
    from her2score.outputs import _arrow

    assert _arrow(np.array([1.5, np.nan, 3.0], dtype=">f4")).to_pylist() == [1.5, None, 3.0]
    assert _arrow(np.array([7, -2], dtype=">i8")).to_pylist() == [7, -2]
    assert _arrow(np.array(["tumour", "stroma é", "tumour"])).to_pylist() == ["tumour", "stroma é", "tumour"]


def test_a_none_in_a_text_column_is_a_null_through_parquet(tmp_path):
    """A text column holding None (an object column built by hand) was refused (np.unique cannot order None among
    str): it is a null of the dictionary array, the other values encoded in order of first appearance."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from her2score.outputs import _arrow

    values = ["stroma", None, "tumour", "stroma", None]
    column = _arrow(np.array(values, dtype=object))
    assert column.null_count == 2 and column.dictionary.to_pylist() == ["stroma", "tumour"]
    pq.write_table(pa.table({"label": column}), tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").column("label").to_pylist() == values
    assert _arrow(np.array([None, None], dtype=object)).to_pylist() == [None, None]


def test_a_none_in_a_text_column_is_an_empty_csv_field_as_it_is_a_parquet_null(field, tmp_path):
    """A None in a text column is null in cells.parquet (_arrow): in cells.csv it is an empty field, as a missing
    measurement is, not the text 'None' (which polars and the csv module read as a value)."""
    pq = pytest.importorskip("pyarrow.parquet")
    f, slide, a = field
    pattern = a.cells["pattern"].copy()
    missing = np.arange(len(pattern)) % 5 == 2
    pattern[missing] = None
    write_outputs(replace(a, cells={**a.cells, "pattern": pattern}), tmp_path / "out", slide=slide, cells_csv=True)
    assert pq.read_table(tmp_path / "out" / "cells.parquet").column("pattern").to_pylist() == pattern.tolist()
    rows = list(csv.DictReader(open(tmp_path / "out" / "cells.csv")))
    assert [r["pattern"] or None for r in rows] == pattern.tolist()


def test_the_overlay_title_names_the_call_once():
    """'HER2 0 (0 (null))' read the score twice: the title gives the report level, which names the score."""
    from types import SimpleNamespace

    from her2score.outputs import _title_lines

    base = dict(slide="a/s.png", guideline="breast-asco-cap-2023", specimen="resection", reason="r", tumour_cells=9,
                h_score=0.0, region="detected", flags=(), qc=())

    def title(score, level, qc_status="passed"):
        result = SimpleNamespace(**base, score=score, level=level, qc_status=qc_status)
        return _title_lines(SimpleNamespace(result=result))[0][0]
    assert title("0", "0 (null)") == "s.png: HER2 0 (null); breast-asco-cap-2023, resection"
    assert title("0", "0+ (ultralow)").startswith("s.png: HER2 0+ (ultralow);")
    assert title("2+", "2+").startswith("s.png: HER2 2+;") and title(None, "not scored", "not_scored").startswith("s.png: no HER2 score;")


def test_the_overlay_title_says_when_the_call_failed_qc_or_needs_review():
    """An overlay passed on alone (an e-mail, a LIS attachment) read "HER2 0+ (ultralow)" on a Ki67 field that failed
    QC, and never said needs review; QC failures and warnings shared one line."""
    from dataclasses import replace
    from types import SimpleNamespace

    from test_eligibility import make_result

    from her2score.outputs import _title_lines
    from her2score.results import QCFinding

    def lines(result):
        return [text for text, _ in _title_lines(SimpleNamespace(result=result))]
    plain = make_result(none=70, strong_complete=30)
    assert lines(plain)[0] == "s.tif: HER2 3+; breast-asco-cap-2023, resection" and lines(plain)[2].startswith("100 tumour cells; H-score 90.0;")
    failed = replace(plain, qc=(QCFinding("too_few_tumour_cells", "fail", "55 tumour cells scored", 55.0),
                                QCFinding("pale_counterstain", "warn", "weak counterstain", 0.1)))
    assert lines(failed)[0] == "s.tif: HER2 3+ (QC FAILED: not a guideline call); breast-asco-cap-2023, resection"
    assert lines(failed)[-2:] == ["QC failed: 55 tumour cells scored", "QC warnings: weak counterstain"]
    doubt = replace(plain, flags=("near_cutoff",))
    assert lines(doubt)[0] == "s.tif: HER2 3+ (NEEDS REVIEW); breast-asco-cap-2023, resection"


def test_cells_read_none_for_their_neighbours_membrane_are_drawn_apart_from_unstained_ones():
    """41 of 54 'none' cells on the 2+ sample have brown borders, their neighbours' membrane (the shared-membrane
    convention), and were drawn as the unstained cells are: a pathologist read them as misses."""
    from types import SimpleNamespace

    from her2score.outputs import NEIGHBOURS_COLOUR, NON_TUMOUR_COLOUR, _cell_colours, _legend_entries, category_colour

    cells = {"category": np.array(["none", "none", "none", "faint_partial"], dtype=object),
             "tumour": np.array([True, True, False, True]), "neighbours_membrane": np.array([False, True, True, False])}
    analysis = SimpleNamespace(cells=cells, region=None)
    assert _cell_colours(analysis, np.arange(4)) == [category_colour("none"), NEIGHBOURS_COLOUR, NON_TUMOUR_COLOUR,
                                                     category_colour("faint_partial")]
    assert ("tumour: none (its brown border is its neighbours' membrane)", NEIGHBOURS_COLOUR) in _legend_entries(analysis)
    assert _legend_entries(analysis)[-1][0] == "each ring solid beside its border read stained, dotted beside the rest"
    assert len({rgb for _, rgb in _legend_entries(analysis)}) == len(_legend_entries(analysis))  # every colour its own


def test_a_cells_ring_is_solid_where_its_membrane_was_read_stained_and_dotted_elsewhere():
    """The overlay showed each cell's verdict, not the evidence: which part of its border was read stained (a
    review could not check complete against lateral, nor find a faint cell's arc). A ring is now solid over its
    stained sectors (stained_sectors in the cell table) and dotted, one pixel in three, over the others."""
    from her2score.membrane import sector_of
    from her2score.outlines import draw_cell_rings

    canvas = np.zeros((60, 60, 3), np.uint8)
    square = np.array([[10, 10], [50, 10], [50, 50], [10, 50]], float)
    left = sum(1 << k for k in range(24) if k not in range(6, 18))  # sectors from the left, clockwise: 6-17 the right half

    def solid(cell, x, y):
        return (left >> sector_of(y - 30.0, x - 30.0)) & 1 == 1
    draw_cell_rings(canvas, [square], [(255, 0, 0)], inset_px=1.0, width_px=1.0, solid=solid)
    drawn = canvas[..., 0] == 255
    left_px, right_px = drawn[:, :28].sum(), drawn[:, 33:].sum()
    assert left_px > 2.5 * right_px > 0, (left_px, right_px)
    every = np.zeros_like(canvas)
    draw_cell_rings(every, [square], [(255, 0, 0)], inset_px=1.0, width_px=1.0)
    assert (every[..., 0] == 255)[:, :28].sum() == left_px  # the stained half as a plain ring draws it


def test_an_unstained_ring_is_dotted_whichever_way_it_runs():
    """Dots by x + y mod 3 left a ring running along the '/' diagonal wholly drawn or wholly empty (a review: 276
    runs of 4 px or more on the 2+ sample read as stained arcs); by arc length, every side is dotted."""
    from her2score.outlines import draw_cell_rings

    for shift in (0, 1, 2):
        canvas = np.zeros((80, 80, 3), np.uint8)
        diamond = np.array([[40, 8], [72, 40], [40, 72], [8, 40]], float) + shift
        draw_cell_rings(canvas, [diamond], [(255, 0, 0)], inset_px=1.0, width_px=1.0, solid=lambda c, x, y: np.zeros(len(x), bool))
        full = np.zeros_like(canvas)
        draw_cell_rings(full, [diamond], [(255, 0, 0)], inset_px=1.0, width_px=1.0)
        on, every = canvas[..., 0] == 255, full[..., 0] == 255
        for quadrant in (np.s_[:40 + shift, :40 + shift], np.s_[:40 + shift, 41 + shift:], np.s_[41 + shift:, :40 + shift],
                         np.s_[41 + shift:, 41 + shift:]):
            share = on[quadrant].sum() / every[quadrant].sum()
            assert 0.2 < share < 0.55, (shift, share)
