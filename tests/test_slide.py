"""One reader suite over every backend: tifffile and OpenSlide on the same pyramidal TIFF, plain
PNG/JPEG through the image backend, and the in-memory ArraySlide; then µm/px metadata variants."""
from __future__ import annotations

import os
import struct
import tracemalloc
import warnings
from decimal import Decimal
from fractions import Fraction

import cv2
import numpy as np
import pytest
import tifffile

import her2score.slide as slide_module
from conftest import SLIDE_MPP, SLIDE_PX, save_jpeg, save_png, save_tiff
from her2score.slide import ArraySlide, NotHerIhcError, SlideError, open_slide


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _planar_pyramid(path, rgb):
    """A tiled, zlib, separate-plane (planarconfig 2) pyramid: each sample's tiles stored in turn."""
    half = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
    with tifffile.TiffWriter(path) as tw:
        for i, a in enumerate((rgb, half)):
            m = SLIDE_MPP * rgb.shape[1] / a.shape[1]
            tw.write(np.moveaxis(a, -1, 0), tile=(128, 128), photometric="rgb", planarconfig="separate",
                     compression="zlib", subfiletype=1 if i else 0, resolution=(1e4 / m, 1e4 / m),
                     resolutionunit="CENTIMETER", metadata=None)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, pyramid_tiff, slide_rgb):
    d = tmp_path_factory.mktemp("backends")
    return {
        "tifffile": (pyramid_tiff, "tifffile", 3.0),
        "openslide": (pyramid_tiff, "openslide", 3.0),
        "planar": (_planar_pyramid(d / "planar.tif", slide_rgb), "tifffile", 0.01),
        "png": (save_png(d / "slide.png", slide_rgb, mpp=SLIDE_MPP), None, 0.01),
        "jpeg": (save_jpeg(d / "slide.jpg", slide_rgb, mpp=SLIDE_MPP), None, 3.0),
        "array": (None, None, 0.01),
    }


@pytest.fixture(params=["tifffile", "openslide", "planar", "png", "jpeg", "array"])
def case(request, sources, slide_rgb):
    path, backend, tol = sources[request.param]
    slide = ArraySlide(slide_rgb, mpp=SLIDE_MPP) if path is None else open_slide(path, backend=backend)
    with slide:
        yield request.param, slide, tol


def test_dimensions_and_mpp_from_metadata(case):
    name, slide, _ = case
    assert slide.dimensions == SLIDE_PX
    assert slide.mpp == pytest.approx(SLIDE_MPP, rel=1e-6)
    assert slide.mpp_source == slide.mpp_origin == ("user" if name == "array" else "metadata")
    assert slide.levels[0].width == SLIDE_PX[0] and slide.levels[0].downsample == 1.0


def test_backend_types(sources):
    assert type(open_slide(sources["tifffile"][0])).__name__ == "TiffSlide"
    assert type(open_slide(sources["openslide"][0], backend="openslide")).__name__ == "OpenSlideSlide"
    assert type(open_slide(sources["png"][0])).__name__ == "ArraySlide"


def test_read_at_native_resolution(case, slide_rgb):
    _, slide, tol = case
    got = slide.read_region((300, 200), (64, 48), mpp=SLIDE_MPP)
    assert got.dtype == np.uint8 and got.shape == (48, 64, 3)
    assert _mad(got, slide_rgb[200:248, 300:364]) <= tol


def test_read_at_half_resolution_is_a_downsample(case, slide_rgb):
    """0.5 µm/px from a 0.25 µm/px slide equals an area downsample of the source."""
    _, slide, tol = case
    half = cv2.resize(slide_rgb, (SLIDE_PX[0] // 2, SLIDE_PX[1] // 2), interpolation=cv2.INTER_AREA)
    whole = slide.read_region((0, 0), (512, 384), mpp=0.5)
    assert _mad(whole, half) <= tol + 0.5
    part = slide.read_region((200, 100), (100, 80), mpp=0.5)
    assert _mad(part, half[50:130, 100:200]) <= tol + 0.5


def test_outside_the_slide_is_white(case, slide_rgb):
    _, slide, tol = case
    assert (slide.read_region((-1000, -1000), (50, 40), mpp=0.5) == 255).all()
    assert (slide.read_region((5000, 0), (20, 20), mpp=SLIDE_MPP) == 255).all()
    # straddling the bottom-right corner: the inside part is the slide, the rest glass
    got = slide.read_region((SLIDE_PX[0] - 40, SLIDE_PX[1] - 30), (100, 80), mpp=SLIDE_MPP)
    assert (got[30:] == 255).all() and (got[:, 40:] == 255).all()
    assert _mad(got[:30, :40], slide_rgb[-30:, -40:]) <= tol
    # straddling the top-left corner at 0.5 µm/px
    got = slide.read_region((-40, -20), (60, 50), mpp=0.5)
    assert (got[:10] == 255).all() and (got[:, :20] == 255).all()


def test_thumbnail(case, slide_rgb):
    _, slide, tol = case
    thumb = slide.thumbnail(mpp=2.0)
    assert thumb.shape == (96, 128, 3)
    ref = cv2.resize(slide_rgb, (128, 96), interpolation=cv2.INTER_AREA)
    assert _mad(thumb, ref) <= tol + 1.0


def test_openslide_and_tifffile_agree(pyramid_tiff):
    with open_slide(pyramid_tiff, backend="tifffile") as a, open_slide(pyramid_tiff, backend="openslide") as b:
        assert a.dimensions == b.dimensions and a.mpp == pytest.approx(b.mpp)
        assert [lv.width for lv in a.levels] == [lv.width for lv in b.levels] == [1024, 512]
        for loc, size, mpp in [((0, 0), (256, 192), 1.0), ((333, 77), (200, 150), 0.5), ((500, 400), (90, 70), 0.25)]:
            assert _mad(a.read_region(loc, size, mpp=mpp), b.read_region(loc, size, mpp=mpp)) < 2.0


def test_invalid_region_arguments(sources):
    with open_slide(sources["png"][0]) as s:
        with pytest.raises(ValueError):
            s.read_region((0, 0), (0, 10), mpp=0.5)
        with pytest.raises(ValueError):
            s.read_region((0, 0), (10, 10), mpp=0)


# --------------------------------------------------------------------------- µm/px metadata

def _aperio(path, rgb, mpp: str = "0.2500"):
    desc = f"Aperio Image Library v12.0.0\n{rgb.shape[1]}x{rgb.shape[0]} [0,0 {rgb.shape[1]}x{rgb.shape[0]}] (256x256) JPEG/RGB Q=90|AppMag = 40|MPP = {mpp}"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", compression="jpeg", description=desc, metadata=None)
    return path


def _ome(path, rgb):
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": 0.25, "PhysicalSizeYUnit": "µm"})
    return path


def _tiff_inch(path, rgb):
    return save_tiff(path, rgb, mpp=None, photometric="rgb", resolution=(101600, 101600), resolutionunit="INCH")


def _tiff_no_unit(path, rgb):
    """Resolution in px/inch with the ResolutionUnit tag renamed away: TIFF 6.0's default unit is the inch."""
    _tiff_inch(path, rgb)
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<HHI", 296, 3, 1))
    data[at : at + 2] = struct.pack("<H", 65000)
    path.write_bytes(bytes(data))
    return path


def _ome_cm(path, rgb):
    tifffile.imwrite(path, rgb, photometric="rgb", ome=True, metadata={"axes": "YXS", "PhysicalSizeX": 0.000025,
                                                                      "PhysicalSizeXUnit": "cm"})
    return path


def _imagej(path, rgb):  # ImageJ: pixels per micron, no TIFF unit
    tifffile.imwrite(path, rgb, photometric="rgb", imagej=True, resolution=(4, 4), metadata={"unit": "micron"})
    return path


def _tiff_um_unit(path, rgb):  # ResolutionUnit 5: pixels per micrometre
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(4, 4), resolutionunit=5)
    return path


def _imagej_escaped(path, rgb):  # ImageJ writes µm as the escape \u00B5m
    tifffile.imwrite(path, rgb, photometric="rgb", imagej=True, resolution=(4, 4), metadata={"unit": "\\u00B5m"})
    return path


def _quoted_aperio(path, rgb):  # not an Aperio file, though its description quotes one: its resolution tags decide
    tifffile.imwrite(path, rgb, photometric="rgb", description="converted from: Aperio Image Library|MPP = 0.9",
                     resolution=(40000, 40000), resolutionunit="CENTIMETER", metadata=None)
    return path


@pytest.mark.parametrize("writer,suffix", [
    (lambda p, a: save_tiff(p, a, mpp=0.25, photometric="rgb"), ".tif"),  # px/cm resolution tags
    (_tiff_inch, ".tif"),
    (_tiff_no_unit, ".tif"),
    (_ome_cm, ".ome.tif"),
    (_imagej, ".tif"),
    (lambda p, a: save_png(p, a, mpp=0.25), ".png"),  # pHYs
    (lambda p, a: save_jpeg(p, a, mpp=0.25), ".jpg"),  # JFIF density
    (_aperio, ".svs"),  # Aperio ImageDescription "MPP = 0.25"
    (_ome, ".ome.tif"),  # OME-XML PhysicalSizeX
    (_tiff_um_unit, ".tif"),
    (_imagej_escaped, ".tif"),
    (_quoted_aperio, ".tif"),
], ids=["tiff-px-per-cm", "tiff-px-per-inch", "tiff-no-unit-is-inch", "ome-cm", "imagej-micron", "png-phys", "jpeg-jfif",
        "aperio-description", "ome-physicalsize", "tiff-px-per-um", "imagej-escaped-um", "quoted-aperio-description"])
def test_mpp_from_metadata(tmp_path, slide_rgb, writer, suffix):
    rgb = slide_rgb[:256, :320]
    path = writer(tmp_path / f"s{suffix}", rgb)
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.25, rel=1e-3) and s.mpp_source == "metadata"
        assert s.dimensions == (320, 256)
    with open_slide(path, mpp=0.9) as s:  # --mpp overrides the metadata (which can be wrong), and says it differs
        assert s.mpp == 0.9 and s.mpp_source == "user (the file's metadata says 0.25)" and s.mpp_origin == "user"
    with open_slide(path, mpp=0.26) as s:  # within 5%: nothing to say
        assert s.mpp == 0.26 and s.mpp_source == "user"


@pytest.mark.parametrize("value, words", [("0", "gives 0 µm/px"), ("nan", "gives nan µm/px"), ("inf", "gives inf µm/px"),
                                          ("-0.5", "gives -0.5 µm/px")])
@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_an_aperio_mpp_no_microscope_gives_is_named(tmp_path, slide_rgb, value, words, backend):
    """MPP = 0, nan or inf in an Aperio description said "no microns-per-pixel in the file's metadata" (OpenSlide
    leaves out a nan)."""
    with pytest.raises(SlideError, match=words + ", not a microscope scan's; pass --mpp"):
        open_slide(_aperio(tmp_path / "s.svs", slide_rgb[:256, :320], mpp=value), backend=backend)


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_an_aperio_mpp_with_a_decimal_comma_is_read(tmp_path, slide_rgb, backend):
    with open_slide(_aperio(tmp_path / "s.svs", slide_rgb[:256, :320], mpp="0,2527"), backend=backend) as s:  # it read as 0
        assert s.mpp == pytest.approx(0.2527) and s.mpp_source == "metadata"

def test_aperio_svs_through_openslide(tmp_path, slide_rgb):
    path = _aperio(tmp_path / "s.svs", slide_rgb[:256, :320])
    with open_slide(path, backend="openslide") as s:
        assert s.mpp == pytest.approx(0.25) and s.dimensions == (320, 256)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_mpp_fallback_only_without_metadata(tmp_path, slide_rgb, suffix):
    rgb = slide_rgb[:128, :128]
    path = tmp_path / f"plain{suffix}"
    {".png": save_png, ".jpg": save_jpeg, ".tif": save_tiff}[suffix](path, rgb, mpp=None)
    with pytest.raises(SlideError) as e:
        open_slide(path)
    assert str(e.value) == (f"{path}: no microns-per-pixel in the file's metadata; pass --mpp (e.g. --mpp 0.5; mpp=0.5 in the "
                            "Python API), or --default-mpp for the files without one in a batch of scans and snapshots")
    assert e.value.path == str(path)
    with open_slide(path, mpp=0.4) as s:
        assert s.mpp == 0.4 and s.mpp_source == "user"


def test_a_jpeg_stored_on_its_side_is_read_as_viewers_show_it(tmp_path, slide_rgb):
    from PIL import Image

    rgb = slide_rgb[:64, :96]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(rgb).save(path, quality=95, exif=exif.tobytes(), dpi=(101600, 101600))
    with open_slide(path, mpp=0.25) as s:
        assert s.dimensions == (64, 96) and any("EXIF orientation (6)" in n for n in s.notes)
        shown = s.read_region((0, 0), (64, 96), mpp=0.25)
        assert np.abs(shown.astype(int) - np.rot90(rgb, -1).astype(int)).mean() < 6  # JPEG's own error


def test_a_jpeg_that_states_no_unit_or_no_resolution_has_no_mpp(tmp_path, slide_rgb):
    """Pillow's dpi for such a JPEG is a guess (72 dpi, or an EXIF 'no unit' count taken as inches): never a µm/px."""
    from PIL import Image

    for name, tags in (("no_unit", {0x0128: 1, 0x011A: 12700}), ("no_resolution", {0x010F: "camera"})):
        exif = Image.Exif()
        for k, v in tags.items():
            exif[k] = v
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(slide_rgb[:64, :64]).save(path, quality=95, exif=exif.tobytes())
        with pytest.raises(SlideError, match="no microns-per-pixel in the file's metadata; pass --mpp"):
            open_slide(path)
    exif = Image.Exif()
    exif[0x0128], exif[0x011A] = 3, 20000  # EXIF, pixels per centimetre
    Image.fromarray(slide_rgb[:64, :64]).save(tmp_path / "cm.jpg", quality=95, exif=exif.tobytes())
    with open_slide(tmp_path / "cm.jpg") as s:
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "metadata"


def test_openslide_suffixes_say_what_is_wrong(tmp_path, slide_rgb, pyramid_tiff):
    """A PNG named .ndpi is read as a PNG; a truncated TIFF-based file and an MRXS without its data folder say so."""
    png = save_png(tmp_path / "field.png", slide_rgb[:64, :64]).rename(tmp_path / "field.ndpi")
    with open_slide(png) as s:
        assert s.dimensions == (64, 64)
    cut = tmp_path / "cut.ndpi"
    cut.write_bytes(pyramid_tiff.read_bytes()[:5000])
    with pytest.raises(SlideError, match=r"cut\.ndpi: .*(truncated|past the end)"):
        open_slide(cut)
    mrxs = tmp_path / "alone.mrxs"
    mrxs.write_text("[GENERAL]\n")
    with pytest.raises(SlideError, match=r"its data folder alone/ is not beside it"):
        open_slide(mrxs)


def test_an_overview_stored_before_the_full_image_is_not_level_0(tmp_path, slide_rgb):
    full = np.ascontiguousarray(np.tile(slide_rgb[:192, :256], (2, 2, 1)))  # 512 x 384
    path = tmp_path / "overview_first.tif"
    with tifffile.TiffWriter(path) as w:
        w.write(cv2.resize(full, (128, 96), interpolation=cv2.INTER_AREA), photometric="rgb", resolution=(10000, 10000),
                resolutionunit="CENTIMETER", metadata=None)  # the overview first, 1 µm/px
        w.write(full, photometric="rgb", tile=(128, 128), resolution=(40000, 40000), resolutionunit="CENTIMETER", metadata=None)
    with open_slide(path) as s:
        assert s.dimensions == (512, 384) and s.mpp == pytest.approx(0.25)
        assert [lv.downsample for lv in s.levels] == [1.0]  # a stripped page beside a tiled one is a preview
        assert np.array_equal(s.read_region((0, 0), (64, 64), mpp=0.25), full[:64, :64])


def test_a_resolution_tag_that_is_not_a_rational_is_no_resolution(tmp_path, slide_rgb):
    path = tmp_path / "short.tif"
    tifffile.imwrite(path, slide_rgb[:64, :64], photometric="rgb", extratags=[(282, "H", 1, 100, True)], metadata=None)
    with pytest.raises(SlideError, match="no microns-per-pixel in the file's metadata; pass --mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5


@pytest.mark.parametrize("backend", ["tifffile", "openslide", "image"])
def test_pixels_taller_than_wide_are_refused_by_name(tmp_path, slide_rgb, backend):
    """A file whose resolution says 0.5 µm across and 1.0 down was scored at 0.5 µm/px, its cells measured half
    as tall as they are, silently; --mpp does not make its pixels square. Within 2% they are square."""
    from PIL import Image

    for name, down in (("tall.tif", 1.0), ("nearly.tif", 0.505)):
        tifffile.imwrite(tmp_path / name, slide_rgb[:256, :256], photometric="rgb", tile=(128, 128),
                         resolution=(1e4 / 0.5, 1e4 / down), resolutionunit="CENTIMETER")
    Image.fromarray(slide_rgb[:64, :64]).save(tmp_path / "tall.png", dpi=(50800, 25400))
    for path in (tmp_path / "tall.tif",) + ((tmp_path / "tall.png",) if backend == "image" else ()):
        for mpp in (None, 0.5):
            with pytest.raises(SlideError, match=r"its pixels are not square: 0\.5 µm wide and 1 µm tall \(its resolution "
                                                 r"metadata\), so cells would be measured 100\.0% stretched one way"):
                open_slide(path, mpp=mpp, backend=backend)
    with open_slide(tmp_path / "nearly.tif", backend=backend) as s:
        assert s.mpp == pytest.approx(0.5)


def test_a_jpeg_whose_exif_and_jfif_give_two_microscope_resolutions_says_so(tmp_path, slide_rgb):
    """A JFIF density of 0.5 µm/px beside an EXIF resolution of 5 was resolved to the JFIF's without a word."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0128], exif[0x011A], exif[0x011B] = 3, 2000.0, 2000.0  # px/cm: 5 µm/px
    Image.fromarray(slide_rgb[:64, :64]).save(tmp_path / "two.jpg", dpi=(50800, 50800), exif=exif, quality=95)
    Image.fromarray(slide_rgb[:64, :64]).save(tmp_path / "one.jpg", dpi=(50800, 50800), quality=95)
    with open_slide(tmp_path / "two.jpg") as s:
        assert s.mpp == pytest.approx(0.5) and s.notes == (
            "its EXIF resolution says 5 µm/px, its JFIF density 0.5, which was taken; give --mpp if the EXIF one is the scan's",)
    with open_slide(tmp_path / "one.jpg") as s, open_slide(tmp_path / "two.jpg", mpp=0.5) as given:
        assert s.notes == given.notes == ()


def test_a_12_bit_jpeg_is_refused_by_what_it_is(tmp_path, slide_rgb):
    """Pillow decodes 8-bit JPEGs only: a valid 12-bit one was 'not a readable image although named .jpg'."""
    import imagecodecs

    (tmp_path / "f12.jpg").write_bytes(imagecodecs.jpeg8_encode(slide_rgb[:64, :64].astype(np.uint16) * 16, level=95,
                                                                 bitspersample=12))
    with pytest.raises(SlideError, match=r"f12\.jpg: a 12-bit JPEG, which is not decoded here: save it as an 8-bit JPEG"):
        open_slide(tmp_path / "f12.jpg", mpp=0.5)
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(40))
    with pytest.raises(SlideError, match="not a readable image although named .jpg"):
        open_slide(tmp_path / "junk.jpg", mpp=0.5)


def test_an_aspect_stated_without_a_unit_is_a_shape_too(tmp_path, slide_rgb):
    """A PNG pHYs or JPEG JFIF of unit 0 states only its pixels' aspect: 1000:2000 was scored as square."""
    import io
    import struct
    import zlib

    from PIL import Image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    buf = io.BytesIO()
    Image.fromarray(slide_rgb[:64, :64]).save(buf, "PNG")
    png = buf.getvalue()
    at = png.index(b"IDAT") - 4
    for across, down in ((1000, 2000), (1000, 1000)):
        (tmp_path / f"a{down}.png").write_bytes(png[:at] + chunk(b"pHYs", struct.pack(">IIB", across, down, 0)) + png[at:])
    buf = io.BytesIO()
    Image.fromarray(slide_rgb[:64, :64]).save(buf, "JPEG", dpi=(1, 2))
    jpeg = bytearray(buf.getvalue())
    jpeg[jpeg.index(b"JFIF") + 7] = 0  # units: none (aspect only)
    (tmp_path / "a.jpg").write_bytes(bytes(jpeg))
    for name, aspect in (("a2000.png", "1000:2000"), ("a.jpg", "1:2")):
        with pytest.raises(SlideError, match=f"its pixels are not square: its metadata states an aspect of {aspect} \\(no unit\\)"):
            open_slide(tmp_path / name, mpp=0.5)
    with open_slide(tmp_path / "a1000.png", mpp=0.5) as s:
        assert s.dimensions == (64, 64)


@pytest.mark.parametrize("backend", ["tifffile", "openslide", "image"])
def test_an_ome_tiff_gives_its_mpp_whichever_reader_reads_it(tmp_path, slide_rgb, backend):
    """OpenSlide and Pillow do not read OME-XML: an OME-TIFF given --backend openslide or image had 'no
    microns-per-pixel in the file's metadata', which it has. Its PhysicalSizeX / Y are read as tifffile reads them."""
    for name, down in (("square.ome.tif", 0.5), ("tall.ome.tif", 1.0)):
        tifffile.imwrite(tmp_path / name, slide_rgb[:256, :256], photometric="rgb", tile=(128, 128), ome=True,
                         metadata={"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": down,
                                   "PhysicalSizeYUnit": "µm"})
    with open_slide(tmp_path / "square.ome.tif", backend=backend) as s:
        assert s.mpp == pytest.approx(0.5) and s.mpp_origin == "metadata"
    with pytest.raises(SlideError, match="its pixels are not square: 0.5 µm wide and 1 µm tall"):
        open_slide(tmp_path / "tall.ome.tif", backend=backend)
    if backend == "tifffile":  # OME's size across beside a stale YResolution (0.25 µm) and no size down: not stretched
        tifffile.imwrite(tmp_path / "stale.ome.tif", slide_rgb[:256, :256], photometric="rgb", tile=(128, 128), ome=True,
                         metadata={"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"}, resolution=(4e4, 4e4),
                         resolutionunit="CENTIMETER")
        with open_slide(tmp_path / "stale.ome.tif", backend=backend) as s:
            assert s.mpp == pytest.approx(0.5)


@pytest.mark.parametrize("backend", ["tifffile", "openslide", "image"])
def test_an_ome_tiffs_mpp_is_its_scans_however_the_xml_spells_it(tmp_path, slide_rgb, backend):
    """A label written before the scan gave the scan the label's 0.4 µm/px; 'µm' as '&#181;m' and single quotes were
    missed (a stale resolution tag's 0.5 taken, or none); OpenSlide and Pillow took such a tag before OME's size."""
    scan = slide_rgb[:256, :384]
    with tifffile.TiffWriter(tmp_path / "multi.ome.tif", ome=True) as tw:  # a label first, as a Bio-Formats .vsi export
        tw.write(np.full((64, 128, 3), 230, np.uint8), photometric="rgb",
                 metadata={"axes": "YXS", "Name": "label", "PhysicalSizeX": 0.4, "PhysicalSizeY": 0.4})
        tw.write(scan, tile=(128, 128), photometric="rgb",
                 metadata={"axes": "YXS", "Name": "slide", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
    if backend == "tifffile":  # the others read a TIFF's first page (Pillow) or refuse two images (OpenSlide)
        with open_slide(tmp_path / "multi.ome.tif", backend=backend) as s:
            assert s.dimensions == (384, 256) and s.mpp == pytest.approx(0.25)
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" SizeX="384" SizeY="256" SizeC="3" '
           'SizeZ="1" SizeT="1" Interleaved="true" PhysicalSizeX="0.25" PhysicalSizeXUnit="&#181;m" PhysicalSizeY="0.25" '
           'PhysicalSizeYUnit="&#181;m"><Channel ID="Channel:0:0" SamplesPerPixel="3"/><TiffData/></Pixels></Image></OME>')
    for name, text in (("entity.ome.tif", xml), ("quotes.ome.tif", xml.replace('"0.25"', "'0.25'")),
                       ("micro.ome.tif", xml.replace("&#181;m", "&micro;m")),  # an HTML entity, no XML's: not well-formed
                       ("amp.ome.tif", xml.replace('<Image ID="Image:0">', '<Image ID="Image:0" Name="HER2 & CEP17">'))):
        tifffile.imwrite(tmp_path / name, scan, tile=(128, 128), photometric="rgb", description=text, metadata=None,
                         resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # a stale tag: 0.5 µm/px
        with open_slide(tmp_path / name, backend=backend) as s:
            assert s.mpp == pytest.approx(0.25), (name, s.mpp)
    tifffile.imwrite(tmp_path / "unit.ome.tif", scan, tile=(128, 128), photometric="rgb", metadata=None, resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER", description=xml.replace("&#181;m", "furlong"))
    with pytest.raises(SlideError, match="no microns-per-pixel"):  # a unit not known is none: not the stale tag's 0.5
        open_slide(tmp_path / "unit.ome.tif", backend=backend)


@pytest.mark.parametrize("backend", ["tifffile", "openslide", "image"])
def test_a_16_bit_tiff_of_12_bit_values_is_never_read_dark(tmp_path, slide_rgb, backend):
    """OpenSlide and Pillow keep a 16-bit sample's high byte: a 12-bit camera's TIFF read at a 16th of its brightness
    (mean 9 where tifffile reads 144). Pillow's is read whole as a PNG's is; OpenSlide's is refused, naming the reader that
    reads it."""
    tifffile.imwrite(tmp_path / "u12.tif", slide_rgb[:256, :256].astype(np.uint16) * 16, tile=(128, 128), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    if backend == "openslide":
        with pytest.raises(SlideError, match="16-bit samples, which OpenSlide reads by their high byte alone"):
            open_slide(tmp_path / "u12.tif", backend=backend)
        return
    with open_slide(tmp_path / "u12.tif", backend=backend) as s:
        got = s.read_region((0, 0), (256, 256), mpp=0.5)
        assert np.abs(got.astype(int) - slide_rgb[:256, :256]).max() <= 1 and s.notes[-1] == "12-bit samples scaled to 8 bits"
    if backend == "image":  # separate planes (Pillow's tiles say no 16 bits), zstd (OpenCV has none), a camera's turn
        rgb = slide_rgb[:200, :256]
        tifffile.imwrite(tmp_path / "planes.tif", rgb.astype(np.uint16) * 16, photometric="rgb", planarconfig="separate",
                         compression="zstd", resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
                         extratags=[(274, 3, 1, 6, True)])  # EXIF Orientation 6: turned 90 degrees clockwise to view
        with open_slide(tmp_path / "planes.tif", backend=backend) as s:
            got = s.read_region((0, 0), (200, 256), mpp=0.5)
            assert s.dimensions == (200, 256) and np.abs(got.astype(int) - np.rot90(rgb, -1)).max() <= 1
            assert s.notes[-1] == "turned as its EXIF orientation (6) says, as viewers show it"


def test_a_philips_tiff_is_read_by_openslide(tmp_path, slide_rgb):
    """Philips pads every level to whole tiles, so the pages' sizes are no measure of their scale: tifffile's reading
    took a 4x level for 3x and a 16x one for 6x (reads 47 grey levels off). The file goes to OpenSlide, which reads it
    as Philips wrote it."""
    import cv2

    tile, rgb = 256, slide_rgb[:700, :1000]
    pad = lambda a: np.pad(a, ((0, -a.shape[0] % tile), (0, -a.shape[1] % tile), (0, 0)), constant_values=255)
    spacing = "".join(f'<DataObject ObjectType="PixelDataRepresentation"><Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" '
                      f'Element="0x0030" PMSVR="IDoubleArray">&quot;{0.00025 * 2 ** i:g}&quot; &quot;{0.00025 * 2 ** i:g}&quot;'
                      '</Attribute></DataObject>' for i in range(3))
    xml = ('<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport"><Attribute Name="PIM_DP_SCANNED_IMAGES" '
           'Group="0x301D" Element="0x1003" PMSVR="IDataObjectArray"><Array><DataObject ObjectType="DPScannedImage"><Attribute '
           'Name="PIM_DP_IMAGE_TYPE" Group="0x301D" Element="0x1004" PMSVR="IString">WSI</Attribute><Attribute '
           'Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" Element="0x8B01" PMSVR="IDataObjectArray"><Array>'
           f'{spacing}</Array></Attribute></DataObject></Array></Attribute></DataObject>')
    with tifffile.TiffWriter(tmp_path / "philips.tiff") as tw:
        for i, f in enumerate((1, 2, 4)):
            level = rgb if f == 1 else cv2.resize(rgb, (1000 // f, 700 // f), interpolation=cv2.INTER_AREA)
            tw.write(pad(level), tile=(tile, tile), photometric="rgb", description=xml if i == 0 else f"level={i}",
                     software="Philips DP v1.0", metadata=None, subfiletype=1 if i else 0)
    from her2score.slide import automatic_backend

    assert automatic_backend(tmp_path / "philips.tiff") == "openslide"
    import openslide

    unreadable = tmp_path / "no_wsi.tiff"  # a Philips description naming no WSI image: OpenSlide cannot open it
    tifffile.imwrite(unreadable, pad(rgb), tile=(tile, tile), photometric="rgb", software="Philips DP v1.0", metadata=None,
                     description=xml.replace(">WSI<", ">LABELIMAGE<"))
    assert openslide.OpenSlide.detect_format(str(unreadable)) == "philips"  # so open_slide tries OpenSlide, then tifffile
    with open_slide(unreadable, mpp=0.25) as s:
        assert s.backend == "tifffile" and s.dimensions == (1024, 768)
    with open_slide(tmp_path / "philips.tiff", mpp=0.25) as s:
        assert [round(lv.downsample) for lv in s.levels] == [1, 2, 4]
        got = s.read_region((200, 200), (100, 80), mpp=1.0)  # from the 4x level
        want = cv2.resize(rgb[200:520, 200:600], (100, 80), interpolation=cv2.INTER_AREA)
        assert np.abs(got.astype(int) - want).mean() < 6


def test_implausible_metadata_is_not_trusted(tmp_path, slide_rgb):
    path = tmp_path / "screen.png"
    save_png(path, slide_rgb[:64, :64], mpp=25400 / 72)  # a 72-dpi screen default, not a scan
    with pytest.raises(SlideError, match=r"screen\.png: the file's resolution metadata gives 352\.\d µm/px, not a microscope scan's; pass --mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source.startswith("user (the file's metadata says 352.")


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "0.5", True, np.True_, np.array("0.5"), 10**400,
                                 np.complex128(0.5 + 1j), np.array([0.5])])
def test_bad_user_mpp(tmp_path, slide_rgb, bad):
    """A µm/px that is no positive number is refused by name, a string among them (it raised TypeError)."""
    path = save_png(tmp_path / "x.png", slide_rgb[:64, :64], mpp=None)
    with pytest.raises(SlideError, match=r"the µm/px given \(mpp, --mpp\) must be a positive number, got "):
        open_slide(path, mpp=bad)
    with pytest.raises(SlideError, match=r"<array>: the µm/px given \(mpp\) must be a positive number"):
        ArraySlide(slide_rgb, mpp=bad)
    for number in (np.float32(0.5), np.array(0.5), Decimal("0.5"), Fraction(1, 2)):  # anything float() takes but bools, strings
        assert open_slide(path, mpp=number).mpp == ArraySlide(slide_rgb, mpp=number).mpp == 0.5


def test_a_slide_class_of_the_users_own_is_scored(fields):
    """A Slide subclass written before Slide.mpp_origin existed is taken as at the user's µm/px (a review: it raised
    AttributeError)."""
    from pathlib import Path

    from her2score.pipeline import score_slide
    from her2score.slide import Level, Slide

    class Mine(Slide):
        def __init__(self, rgb):
            self._rgb, self.path = rgb, Path("mine")
            self.dimensions, self.mpp, self.mpp_source = (rgb.shape[1], rgb.shape[0]), 0.5, "user"
            self.levels = (Level(rgb.shape[1], rgb.shape[0], 1.0),)

        def _read_level(self, level, x, y, width, height):
            return self._rgb[y : y + height, x : x + width]
    r = score_slide(Mine(fields["2+"]))
    assert r.score == "2+" and r.mpp_origin == "user"


def test_array_slide_needs_mpp(slide_rgb):
    with pytest.raises(SlideError, match=r"<array>: no microns-per-pixel"):
        ArraySlide(slide_rgb, mpp=None)


def test_an_array_is_scored_as_given_or_refused_with_how_to_mend_it(fields):
    """score_slide takes an RGB array at the µm/px given; 16-bit samples are scaled as a 16-bit file's are; an
    array with its colours first says how to turn it (a review: score_slide(array) raised a TypeError on a path,
    a channels-first array said only 'unsupported pixel layout')."""
    from her2score.pipeline import score_slide

    rgb = fields["2+"]
    r = score_slide(rgb, mpp=0.5)
    assert r.score == score_slide(ArraySlide(rgb, mpp=0.5)).score == "2+" and r.mpp_origin == "user"
    with pytest.raises(SlideError, match="no microns-per-pixel"):
        score_slide(rgb)
    by_default = score_slide(rgb, default_mpp=0.5)  # an array has no µm/px of its own: the default is the default
    assert by_default.mpp_origin == "default" and "µm/px 0.5 from the default given (an array has no µm/px of its own)" in by_default.notes
    assert score_slide(rgb, mpp=0.5, default_mpp=0.4).mpp == 0.5
    with pytest.raises(SlideError, match=r"the µm/px given \(default_mpp, --default-mpp\) must be a positive number, got -1"):
        score_slide(rgb, default_mpp=-1)  # the keyword it was given by is named
    wide = ArraySlide(rgb.astype(np.uint16) * 257, mpp=0.5)
    assert np.array_equal(wide.read_region((0, 0), (64, 64), mpp=0.5), rgb[:64, :64])
    assert wide.notes == ("16-bit samples scaled to 8 bits",)
    with pytest.raises(SlideError, match=r"colours first; give \(height, width, 3\), e\.g\. array\.transpose\(1, 2, 0\)"):
        ArraySlide(rgb.transpose(2, 0, 1), mpp=0.5)


def test_a_separate_plane_field_reads_and_scores_as_its_contiguous_copy(tmp_path, fields):
    """Planar (planarconfig 2) strips, with an alpha plane as some exporters write, are the same field."""
    from her2score.pipeline import analyse_slide

    rgb = fields["2+"]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    planar = save_tiff(tmp_path / "planar.tif", np.moveaxis(rgba, -1, 0), photometric="rgb",
                       planarconfig="separate", extrasamples=["unassalpha"], rowsperstrip=50)
    contiguous = save_tiff(tmp_path / "contiguous.tif", rgb, photometric="rgb")
    with tifffile.TiffFile(planar) as t:
        assert t.pages[0].planarconfig == 2 and t.pages[0].samplesperpixel == 4
    with open_slide(planar) as a, open_slide(contiguous) as b:
        assert np.array_equal(a.read_region((0, 0), a.dimensions, mpp=0.5), rgb)
        assert np.array_equal(a.read_region((37, 61), (100, 120), mpp=0.5), rgb[61:181, 37:137])
        ra, rb = analyse_slide(a).result, analyse_slide(b).result
    assert ra.tumour_cells > 50 and (ra.score, ra.counts) == (rb.score, rb.counts)


def test_content_decides_over_suffix(tmp_path, slide_rgb):
    """A JPEG named .tif is read as the JPEG it is."""
    path = tmp_path / "really-a-jpeg.tif"
    save_jpeg(path, slide_rgb[:128, :128], mpp=0.5)
    with open_slide(path) as s:
        assert s.dimensions == (128, 128) and s.mpp == pytest.approx(0.5)


# --------------------------------------------------------------------------- bounded memory

def test_large_shrinking_reads_go_block_by_block(tmp_path, slide_rgb, monkeypatch):
    """A thumbnail of a slide without a pyramid is decoded in bounded blocks and equals a whole read."""
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, slide_rgb, tile=(128, 128), photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        assert len(s.levels) == 1
        whole = s.thumbnail(mpp=1.0)
        tracemalloc.start()
        monkeypatch.setattr(slide_module, "READ_BLOCK_PX", 128 * 128)
        blocked = s.thumbnail(mpp=1.0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert blocked.shape == whole.shape == (192, 256, 3)
    assert _mad(blocked, whole) < 1.0
    full_level0 = SLIDE_PX[0] * SLIDE_PX[1] * 3
    assert peak < full_level0 / 3, peak  # never the whole level 0 at once


def test_file_truncated_after_opening_fails_when_read(tmp_path, pyramid_tiff):
    """Tile data missing at read time (file cut while open) is a clear error at that read."""
    path = tmp_path / "shrinking.tif"
    path.write_bytes(pyramid_tiff.read_bytes())
    with open_slide(path) as s:
        os.truncate(path, 20_000)
        with pytest.raises(SlideError) as e:
            s.read_region((0, 0), (1024, 768), mpp=SLIDE_MPP)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "truncated TIFF" in msg and "file ends at byte" in msg


def test_a_jpeg_tile_cut_short_is_an_error_on_both_backends(tmp_path, pyramid_tiff):
    """The second half of one level-0 tile zeroed (a write or copy cut short): libjpeg decodes it as a
    grey block without a word, so tifffile would score it; both backends refuse it, naming the tile."""
    with tifffile.TiffFile(pyramid_tiff) as t:
        offset, count = t.pages[0].dataoffsets[5], t.pages[0].databytecounts[5]
    data = bytearray(pyramid_tiff.read_bytes())
    data[offset + count // 2 : offset + count] = bytes(count - count // 2)
    path = tmp_path / "cut tile.tif"
    path.write_bytes(bytes(data))
    for backend, words in (("tifffile", "corrupt JPEG in tile/strip 5 of level 0: no end-of-image marker"),
                           ("openslide", "Premature end of JPEG file")):
        with open_slide(path, backend=backend) as s:
            assert s.read_region((0, 0), (256, 256), mpp=SLIDE_MPP).shape == (256, 256, 3)  # other tiles read
            with pytest.raises(SlideError, match=words):
                s.read_region((256, 256), (256, 256), mpp=SLIDE_MPP)


def test_an_ome_length_unit_it_does_not_know_gives_no_mpp(tmp_path, slide_rgb):
    path = tmp_path / "s.ome.tif"
    tifffile.imwrite(path, slide_rgb[:64, :64], photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "parsec"})
    with pytest.raises(SlideError, match="no microns-per-pixel"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp_source == "user"



def test_a_small_16_bit_sample_keeps_its_glass_as_white():
    """The brightest 256 samples left out as hot pixels were all the glass of a 12 x 12 level (432 samples): its
    white read 2047, twice too bright. At most 1% of a sample is left out."""
    from her2score.slide import _white_of

    samples = np.full(432, 1500, np.uint16)
    samples[:9] = 4000  # three glass pixels
    assert _white_of(samples) == 4095
    samples[:9] = 65535  # three saturated pixels in a large sample are still hot pixels
    assert _white_of(np.concatenate([samples, np.full(100_000, 3000, np.uint16)])) == 4095


def test_a_mark_burnt_in_at_16_bit_full_scale_does_not_set_a_12_bit_images_white(tmp_path, slide_rgb):
    """A camera snapshot's white scale bar, 0.4% of a 12-bit field's pixels at 65535, read every pixel 16 x too dark
    (refused as blank); saturated glass, more of the image, is still white."""
    from her2score.slide import FULL_SCALE_MARK, _white_of

    twelve = slide_rgb.astype(np.uint16) * 16
    twelve[250:256, :200] = 65535  # 1,200 of 65,536 pixels: 1.8%
    assert 1200 / twelve[..., 0].size < FULL_SCALE_MARK
    tifffile.imwrite(tmp_path / "bar.tif", twelve, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "bar.tif") as s:
        read = s.read_region((0, 0), s.dimensions, mpp=s.mpp).astype(int)
        assert np.abs(read - slide_rgb)[twelve[..., 0] < 65535].max() <= 1 and s.notes == ("12-bit samples scaled to 8 bits",)
    glass = np.concatenate([np.full(5_000, 65535, np.uint16), np.full(95_000, 3000, np.uint16)])  # 5% saturated glass
    assert _white_of(glass) == 65535
    dense = np.concatenate([np.full(1_500, 65535, np.uint16), np.linspace(8000, 32000, 98_500).astype(np.uint16)])
    assert _white_of(dense) == 65535  # a dense 16-bit field with 1.5% saturated glass: not read 2 x too bright

def test_8_bit_values_in_16_bit_samples_read_as_they_are(tmp_path, slide_rgb):
    """astype(np.uint16) of an 8-bit image (some Fiji and MATLAB exports): its white was taken as 511 and every pixel
    read half as bright (a 1+ field refused as nuclear DAB); 9-bit values still scale by their own depth."""
    from her2score.slide import _white_of

    wide = slide_rgb.astype(np.uint16)
    tifffile.imwrite(tmp_path / "u16.tif", wide, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    for s in (ArraySlide(wide, mpp=0.5), open_slide(tmp_path / "u16.tif")):
        assert np.array_equal(s.read_region((0, 0), s.dimensions, mpp=s.mpp), slide_rgb)
        assert s.notes[-1] == "16-bit samples holding 8-bit values (up to 255), read as 8-bit"
    assert _white_of(np.full(1000, 300, np.uint16)) == 511 and _white_of(np.full(1000, 200, np.uint16)) == 255


def test_bit_depths_and_extra_samples(tmp_path, slide_rgb):
    """12-bit samples scale by their own depth; an unspecified extra sample is dropped, an associated
    (premultiplied) alpha composited over white, an unassociated one blended."""
    rgb = slide_rgb[:64, :64]
    twelve = tmp_path / "twelve.tif"
    tifffile.imwrite(twelve, rgb.astype(np.uint16), photometric="rgb", rowsperstrip=64, resolution=(40000, 40000),
                     resolutionunit="CENTIMETER", metadata=None, byteorder="<")
    a, b = (rgb.astype(np.uint32) * 4095 // 255).reshape(-1, 2).T  # 12-bit samples packed two in three bytes
    packed = np.stack([a >> 4, (a & 15) << 4 | b >> 8, b & 255], axis=1).astype(np.uint8).tobytes()
    data = bytearray(twelve.read_bytes())
    with tifffile.TiffFile(twelve) as tf:
        page = tf.pages[0]
        start, bits_at, count_at = page.dataoffsets[0], page.tags["BitsPerSample"].valueoffset, page.tags["StripByteCounts"].valueoffset
    data[start : start + len(packed)] = packed
    data[bits_at : bits_at + 6] = struct.pack("<3H", 12, 12, 12)
    data[count_at : count_at + 4] = struct.pack("<I", len(packed))
    twelve.write_bytes(bytes(data))
    with open_slide(twelve) as s:
        assert np.abs(s.read_region((0, 0), (64, 64), mpp=0.25).astype(int) - rgb).max() <= 1
        assert s.notes == ("12-bit samples scaled to 8 bits",)
    # a 12-bit camera's samples stored unscaled in 16 bits: white is 4095, not 65535 (read as a blank slide)
    unscaled = tmp_path / "unscaled.tif"
    tifffile.imwrite(unscaled, rgb.astype(np.uint16) * 16, photometric="rgb", resolution=(40000, 40000),
                     resolutionunit="CENTIMETER")
    with open_slide(unscaled) as s:
        assert np.abs(s.read_region((0, 0), (64, 64), mpp=0.25).astype(int) - rgb).max() <= 1
        assert s.notes == ("12-bit samples scaled to 8 bits",)
    hot = rgb.astype(np.uint16) * 16
    hot[5, 7] = hot[40:43, 2:5] = 65535  # a hot pixel and a 3 x 3 saturated speck (dust, a reflection) do not set the white
    tifffile.imwrite(unscaled, hot, photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with open_slide(unscaled) as s:
        read = s.read_region((0, 0), (64, 64), mpp=0.25).astype(int)
        assert np.abs(read - rgb)[hot[..., 0] < 65535].max() <= 1 and s.notes == ("12-bit samples scaled to 8 bits",)
    for alpha in ((), (np.full((64, 64), 65535, np.uint16),)):  # the same in a PNG (Pillow keeps only the high byte)
        png = tmp_path / f"unscaled{len(alpha)}.png"
        cv2.imwrite(str(png), np.dstack([*(rgb.astype(np.uint16) * 16)[..., ::-1].transpose(2, 0, 1), *alpha]))
        with open_slide(png, mpp=0.25) as s:
            assert np.abs(s.read_region((0, 0), (64, 64), mpp=0.25).astype(int) - rgb).max() <= 1
            assert s.notes == ("12-bit samples scaled to 8 bits",)
    opaque = np.full((64, 64, 1), 65535, np.uint16)  # an alpha at 16-bit full scale: no colour sample's depth
    tifffile.imwrite(unscaled, np.concatenate([rgb.astype(np.uint16) * 16, opaque], axis=2), photometric="rgb",
                     extrasamples=(2,), resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with open_slide(unscaled) as s:
        assert np.abs(s.read_region((0, 0), (64, 64), mpp=0.25).astype(int) - rgb).max() <= 1
    half = np.full((64, 64, 1), 128, np.uint8)
    for extra, expected in ((0, rgb), (1, np.minimum(rgb.astype(int) + 127, 255)),
                            (2, (rgb * (128 / 255) + 255 * (1 - 128 / 255) + 0.5).astype(np.uint8))):
        path = tmp_path / f"extra{extra}.tif"
        tifffile.imwrite(path, np.concatenate([rgb, half], axis=2), photometric="rgb", extrasamples=(extra,),
                         resolution=(40000, 40000), resolutionunit="CENTIMETER")
        with open_slide(path) as s:
            assert np.abs(s.read_region((0, 0), (64, 64), mpp=0.25).astype(int) - expected).max() <= 1, extra


def test_a_corrupt_16_bit_level_is_a_slide_error_naming_it(tmp_path, slide_rgb):
    """The white level of 16-bit samples is read on the smallest level when the slide opens: its corrupt data is a
    SlideError naming the tile and level, as on any read (it was the codec's own exception)."""
    a16 = slide_rgb[:512, :512].astype(np.uint16) * 257
    path = tmp_path / "corrupt16.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(a16, photometric="rgb", tile=(256, 256), compression="zlib", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        tw.write(a16[::2, ::2].copy(), photometric="rgb", tile=(256, 256), compression="zlib", subfiletype=1)
    with tifffile.TiffFile(path) as t:
        off, n = t.pages[1].dataoffsets[0], t.pages[1].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[off : off + n] = bytes((b * 7 + 3) % 256 for b in range(n))
    path.write_bytes(bytes(data))
    with pytest.raises(SlideError, match="corrupt image data in tile/strip 0 of level 1"):
        open_slide(path).read_region((0, 0), (256, 256), mpp=1.0)


def test_a_tile_table_shorter_than_the_image_is_refused_at_opening(tmp_path, slide_rgb):
    path = tmp_path / "short.tif"
    tifffile.imwrite(path, slide_rgb[:512, :512], photometric="rgb", tile=(256, 256), resolution=(40000, 40000),
                     resolutionunit="CENTIMETER")
    data = bytearray(path.read_bytes())
    for tag in (256, 257):  # ImageWidth, ImageLength (SHORT, or LONG) -> 5000
        for kind in (3, 4):
            at = data.find(struct.pack("<HHI", tag, kind, 1))
            if at >= 0:
                data[at + 8 : at + 12] = struct.pack("<H", 5000) + b"\0\0" if kind == 3 else struct.pack("<I", 5000)
    path.write_bytes(bytes(data))
    with pytest.raises(SlideError, match="needs 400 tiles/strips, its table has 4"):
        open_slide(path)


def test_pillows_own_pixel_limit_does_not_refuse_a_field(tmp_path, slide_rgb, monkeypatch):
    from PIL import Image

    path = save_png(tmp_path / "field.png", slide_rgb[:512, :512], mpp=0.5)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # far under the field's 262,144 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does it warn
        with open_slide(path) as s:
            assert s.dimensions == (512, 512)
    assert Image.MAX_IMAGE_PIXELS == 100_000  # put back


def test_a_pyramid_in_subifds_is_read_level_by_level(tmp_path, slide_rgb):
    """OME-TIFF as QuPath and bfconvert write it: the reduced levels are SubIFDs of the full-resolution page."""
    path = tmp_path / "sub.ome.tif"
    rgb = slide_rgb[:512, :512]
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(rgb, subifds=2, tile=(128, 128), photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.25,
                                                                                "PhysicalSizeXUnit": "µm"})
        for k in (2, 4):
            tif.write(cv2.resize(rgb, (512 // k, 512 // k), interpolation=cv2.INTER_AREA), tile=(128, 128),
                      photometric="rgb", subfiletype=1)
    with open_slide(path) as s:
        assert [lv.downsample for lv in s.levels] == [1.0, 2.0, 4.0]
        quarter = s.read_region((0, 0), (128, 128), mpp=1.0)
        assert _mad(quarter, cv2.resize(rgb, (128, 128), interpolation=cv2.INTER_AREA)) < 2


def test_the_ome_unit_is_that_of_the_pixels_element_with_the_size(tmp_path, slide_rgb):
    """Two images in one OME-XML: the first's size in the default unit (µm), the second's (a label-sized image: two
    of nearly one size are refused) in mm; the first image's unit is not taken from the second."""
    def pixels(i, size):
        side = 64 if i == 0 else 24
        return (f'<Image ID="Image:{i}"><Pixels ID="Pixels:{i}" DimensionOrder="XYCZT" Type="uint8" SizeX="{side}" SizeY="{side}" '
                f'SizeC="3" SizeZ="1" SizeT="1" {size}><Channel ID="Channel:{i}:0" SamplesPerPixel="3"/>'
                f'<TiffData IFD="{i}" PlaneCount="1"/></Pixels></Image>')

    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           + pixels(0, 'PhysicalSizeX="0.25"') + pixels(1, 'PhysicalSizeX="0.00025" PhysicalSizeXUnit="mm"') + "</OME>")
    path = tmp_path / "two.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(slide_rgb[:64, :64], photometric="rgb", description=xml, metadata=None)
        tif.write(slide_rgb[64:88, :24], photometric="rgb", metadata=None)
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == "metadata"



@pytest.mark.parametrize("stack", [False, True])
def test_a_tiff_of_several_full_size_images_is_refused_naming_them(tmp_path, slide_rgb, stack):
    """Three fields in one TIFF (pages written one by one, or one array of three): the largest page was scored
    alone, with no word of the others (a HER2 0 first, then two 3+ fields, read 0 (null) with QC passed)."""
    path = tmp_path / "fields.tif"
    fields = [slide_rgb[:128, :128], slide_rgb[128:256, :128], slide_rgb[256:384, :128]]
    if stack:
        tifffile.imwrite(path, np.stack(fields), photometric="rgb")
    else:
        with tifffile.TiffWriter(path) as tif:
            for f in fields:
                tif.write(f, photometric="rgb")
    with pytest.raises(SlideError, match=r"holds 3 images of 128 x 128 px, pages 0, 1, 2, none flagged as a reduced image "
                                         r"\(a pyramid level, label or macro\) of another: several fields"):
        open_slide(path, mpp=0.5)


@pytest.mark.parametrize("second", [(126, 128), (96, 120), (128, 64), (100, 100)])
def test_a_tiff_of_two_fields_of_other_sizes_is_refused(tmp_path, slide_rgb, second):
    """A second field 2 px narrower, of another shape, or of the same shape 1.28x smaller (a 3 MP snapshot beside a 5 MP
    one), is no pyramid level: the largest page was scored alone (a 126 px page beside 128 was taken for a level 1.016x
    down, a 96 x 120 one for a label), or read as the slide's level at coarser µm/px."""
    path = tmp_path / "fields.tif"
    w, h = second
    with tifffile.TiffWriter(path) as tif:
        tif.write(slide_rgb[:128, :128], photometric="rgb")
        tif.write(slide_rgb[128 : 128 + h, :w], photometric="rgb")
    with pytest.raises(SlideError, match=rf"holds 2 images \(128 x 128, {w} x {h} px\), pages 0, 1, none flagged"):
        open_slide(path, mpp=0.5)


def _field(w: int, h: int) -> np.ndarray:
    a = np.full((h, w, 3), 230, np.uint8)
    a[::7, ::5] = (120, 80, 60)
    return a


def _pyramid_with(tmp_path, name, base, pages):
    """A TIFF of a tiled ``base`` (w, h) and ``pages``: (w, h, tiled, subfiletype) each."""
    path = tmp_path / name
    with tifffile.TiffWriter(path) as tif:
        tif.write(_field(*base), tile=(128, 128), photometric="rgb")
        for w, h, tiled, subfiletype in pages:
            tif.write(_field(w, h), photometric="rgb", subfiletype=subfiletype, **({"tile": (128, 128)} if tiled else {}))
    return path


@pytest.mark.parametrize("base, pages, levels", [
    # a small Aperio-style field: a stripped thumbnail (59% of its area), a label and a macro flagged reduced (1, 9)
    ((1000, 1000), [(768, 768, False, 0), (400, 380, False, 1), (1280, 431, False, 9)], [1000]),
    ((1000, 1000), [(750, 750, True, 1)], [1000, 750]),  # a level 1.33x down, flagged
    ((1000, 1000), [(667, 667, True, 0)], [1000, 667]),  # a level 1.5x down rounded up, unflagged
    ((700, 600), [(512, 512, True, 1)], [700]),  # a level padded to its tiles (not the base's shape: no level), flagged
    ((2048, 1536), [(1024, 768, True, 1), (512, 384, True, 1), (1700, 600, False, 0)], [2048, 1024, 512]),  # an overview
    ((360, 360), [(1280, 431, False, 9)], [360]),  # a macro larger than a small field: it was opened as the slide
    ((700, 700), [(512, 512, False, 0), (400, 380, False, 1), (1280, 431, False, 9)], [700]),  # and was refused beside it
])
def test_levels_labels_macros_and_thumbnails_are_no_other_images(tmp_path, base, pages, levels):
    """Pages flagged as reduced images, stripped beside a tiled base, or levels of the slide's shape are its own:
    the slide opens with its levels (a first version of the multi-image refusal refused all of these)."""
    with open_slide(_pyramid_with(tmp_path, "slide.tif", base, pages), mpp=0.5) as s:
        assert s.dimensions == base and [lv.width for lv in s.levels] == levels


def test_the_slide_page_is_neither_a_small_colour_preview_nor_a_larger_flagged_macro(tmp_path):
    """A greyscale (16-bit) scan with a colour preview was scored from the preview; a stripped field with a larger
    flagged macro read the macro's pixels at finer µm/px (a level 0.5x down); two snapshots of one shape 1.27x apart
    (5 and 3 MP) were one pyramid; unflagged pyramids in 1.41x and 2x steps, tiled or stripped, are pyramids."""
    grey = tmp_path / "grey.tif"
    with tifffile.TiffWriter(grey) as tif:
        tif.write(np.full((1024, 1024), 30000, np.uint16), tile=(128, 128))
        tif.write(_field(256, 256), photometric="rgb")
    with pytest.raises(NotHerIhcError, match="greyscale"):
        open_slide(grey, mpp=0.5)
    macro = tmp_path / "macro.tif"
    with tifffile.TiffWriter(macro) as tif:
        tif.write(np.full((600, 800, 3), (150, 100, 60), np.uint8), photometric="rgb")
        tif.write(np.full((1200, 1600, 3), (20, 200, 20), np.uint8), photometric="rgb", subfiletype=9)
    with open_slide(macro, mpp=0.5) as s:
        assert s.dimensions == (800, 600) and [lv.width for lv in s.levels] == [800]
        assert tuple(s.read_region((0, 0), (8, 8), mpp=0.25)[4, 4]) == (150, 100, 60)
    snaps = tmp_path / "snaps.tif"
    with tifffile.TiffWriter(snaps) as tif:
        tif.write(_field(2592 // 8, 1944 // 8), photometric="rgb")
        tif.write(_field(2048 // 8, 1536 // 8), photometric="rgb")
    with pytest.raises(SlideError, match=r"holds 2 images \(324 x 243, 256 x 192 px\)"):
        open_slide(snaps, mpp=0.5)
    with open_slide(_pyramid_with(tmp_path, "root2.tif", (1024, 768), [(724, 543, True, 0), (512, 384, True, 0)]), mpp=0.5) as s:
        assert [lv.width for lv in s.levels] == [1024, 724, 512]
    stripped = tmp_path / "stripped.tif"  # tifffile's default pages: stripped, unflagged
    with tifffile.TiffWriter(stripped) as tif:
        for k in (1, 2, 4):
            tif.write(_field(1024 // k, 768 // k), photometric="rgb", rowsperstrip=16)
    with open_slide(stripped, mpp=0.5) as s:
        assert [lv.width for lv in s.levels] == [1024, 512, 256]


def test_a_greyscale_mask_stored_first_is_not_the_slide(tmp_path, slide_rgb):
    """A same-size greyscale page (a mask) before the RGB field: the field is the slide (it was refused as greyscale)."""
    path = tmp_path / "masked.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.full((128, 128), 255, np.uint8))
        tif.write(slide_rgb[:128, :128], photometric="rgb")
    with open_slide(path, mpp=0.5) as s:
        assert s.dimensions == (128, 128)
        np.testing.assert_array_equal(s.read_region((0, 0), (128, 128), mpp=0.5), slide_rgb[:128, :128])


def test_a_tiff_of_one_channel_a_page_is_refused_as_greyscale(tmp_path, slide_rgb):
    """An RGB image stored a channel a page (OME CYX): refused as the greyscale it is page by page, not as several
    full-size images, whose advice (save one as a file of its own) gives a greyscale file."""
    path = tmp_path / "planes.tif"
    with tifffile.TiffWriter(path) as tif:
        for c in range(3):
            tif.write(slide_rgb[:128, :128, c])
    with pytest.raises(NotHerIhcError, match="greyscale"):
        open_slide(path, mpp=0.5)

def test_a_broken_subifd_leaves_the_full_resolution_readable(tmp_path, slide_rgb):
    path = tmp_path / "sub.ome.tif"
    rgb = slide_rgb[:256, :256]
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(rgb, subifds=1, tile=(128, 128), photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.25})
        tif.write(rgb[::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1)
    with tifffile.TiffFile(path) as tf:
        at = tf.pages[0].tags["SubIFDs"].valueoffset
    data = bytearray(path.read_bytes())
    data[at : at + 4] = struct.pack("<I", len(data) + 1000)  # the SubIFD pointer past the end of the file
    path.write_bytes(bytes(data))
    with open_slide(path) as s:
        assert [lv.downsample for lv in s.levels] == [1.0]
        assert _mad(s.read_region((0, 0), (256, 256), mpp=0.25), rgb) < 1


def test_the_pillow_limit_is_put_back_when_threads_overlap():
    import threading

    from PIL import Image

    from her2score.slide import pillow_unlimited

    before, inside, go = Image.MAX_IMAGE_PIXELS, threading.Barrier(2), threading.Event()

    def hold():
        with pillow_unlimited():
            inside.wait()
            go.wait(5)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    assert Image.MAX_IMAGE_PIXELS == before


def _ramp_pyramid(path) -> np.ndarray:
    """A lossless two-level tiled TIFF at 0.25 µm/px of a ramp, 3 grey levels a level-0 pixel, its level 1
    the exact 2x average; the level-0 image."""
    l0 = np.repeat(np.repeat((3 * np.arange(80)).astype(np.uint8)[None, :, None], 64, 0), 3, 2)
    l1 = cv2.resize(l0, (40, 32), interpolation=cv2.INTER_AREA)
    res = dict(resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tw:
        tw.write(l0, tile=(16, 16), photometric="rgb", **res)
        tw.write(l1, tile=(16, 16), photometric="rgb", subfiletype=1, resolution=(1e4 / 0.5, 1e4 / 0.5),
                 resolutionunit="CENTIMETER")
    return l0


def test_a_read_between_level_pixels_is_not_stretched(tmp_path):
    """A read whose origin falls between pixels of the level it comes from (an odd level-0 x read from the 2x
    level) puts each output pixel where it lies: as the same area read from level 0 alone, within rounding.
    Resizing the 9 level pixels the box touched into 8 stretched them (on this ramp, 3 grey levels off)."""
    l0 = _ramp_pyramid(tmp_path / "ramp.tif")
    with open_slide(tmp_path / "ramp.tif") as s:
        assert [lv.downsample for lv in s.levels] == [1.0, 2.0]
        pyramid = s.read_region((21, 8), (16, 4), mpp=0.5).astype(int)
    flat = ArraySlide(l0, mpp=0.25).read_region((21, 8), (16, 4), mpp=0.5).astype(int)
    assert np.abs(pyramid - flat).max() <= 1, (pyramid[0, :, 0], flat[0, :, 0])


def test_an_enlarged_reads_pixels_do_not_depend_on_its_size():
    """Enlarged 2x, a 5 px read and a 6 px read from the same origin agree on their first five pixels (they read
    [0, 4, 10, 16, 20] and [0, 3, 8, 13, 18]: 2.5 level pixels were rounded up to 3 and stretched into 5)."""
    ramp = np.repeat(np.repeat((10 * np.arange(25)).astype(np.uint8)[None, :, None], 4, 0), 3, 2)
    s = ArraySlide(ramp, mpp=0.5)
    five, six = (s.read_region((0, 0), (n, 1), mpp=0.25).astype(int) for n in (5, 6))
    assert np.abs(five - six[:, :5]).max() <= 1, (five[0, :, 0], six[0, :, 0])


def test_reads_that_fall_on_level_pixels_are_unchanged(tmp_path):
    """Reads aligned with their level's pixels resize them as before (byte for byte: the pipeline's tiles)."""
    _ramp_pyramid(tmp_path / "ramp.tif")
    with open_slide(tmp_path / "ramp.tif") as s:
        aligned = s.read_region((20, 8), (16, 4), mpp=0.5)
        assert np.array_equal(aligned, s._read_level(1, 10, 4, 16, 4))


def test_a_camera_jfif_density_gives_way_to_the_exif_resolution(tmp_path, slide_rgb):
    """A JPEG whose JFIF header keeps a camera's 72 dpi (353 µm/px: no microscope's) but whose EXIF states
    20,000 px/cm is at 0.5 µm/px; a plausible JFIF density still wins."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x011A], exif[0x011B], exif[0x0128] = 20000, 20000, 3
    Image.fromarray(slide_rgb[:64, :64]).save(tmp_path / "jfif72.jpg", dpi=(72, 72), exif=exif.tobytes())
    with open_slide(tmp_path / "jfif72.jpg") as s:
        assert s.mpp == pytest.approx(0.5)
    Image.fromarray(slide_rgb[:64, :64]).save(tmp_path / "jfif.jpg", dpi=(50800, 50800), exif=exif.tobytes())
    with open_slide(tmp_path / "jfif.jpg") as s:
        assert s.mpp == pytest.approx(0.5)  # 50,800 dpi


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_tiff_slide_never_closed_frees_its_file_when_collected(pyramid_tiff):
    import gc

    gc.collect()
    before = _open_fds()
    for _ in range(50):
        s = open_slide(pyramid_tiff, backend="tifffile")
        s.read_region((0, 0), (8, 8), mpp=0.5)
        del s
    gc.collect()
    assert _open_fds() <= before + 2


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_closing_a_slide_twice_is_harmless(pyramid_tiff, backend):
    with open_slide(pyramid_tiff, backend=backend) as s:
        s.close()


def test_a_3d_tiff_says_so(tmp_path):
    path = tmp_path / "volume.tif"
    tifffile.imwrite(path, np.zeros((4, 64, 64, 3), np.uint8), volumetric=True, tile=(32, 32), photometric="rgb")
    with pytest.raises(SlideError, match=r"volume\.tif: 3-D TIFF \(4 planes deep\) is not supported"):
        open_slide(path, mpp=0.5)


def test_a_tiled_pyramids_stripped_thumbnail_is_no_level(tmp_path):
    """Aperio SVS stores a small stripped thumbnail page after level 0: it is a lossy preview, not a pyramid
    level (OpenSlide leaves it out too); the levels are the tiled pages."""
    rng = np.random.default_rng(1)
    l0 = rng.integers(0, 255, (256, 384, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "svs_like.tif") as tw:
        tw.write(l0, tile=(64, 64), photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
        tw.write(l0[::8, ::8], photometric="rgb", rowsperstrip=8)  # the thumbnail, stripped
        tw.write(l0[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    with open_slide(tmp_path / "svs_like.tif") as s:
        assert [lv.downsample for lv in s.levels] == [1.0, 2.0]


def test_jpeg_quality_is_read_from_the_quantisation_table(tmp_path, slide_rgb):
    """The IJG quality a JPEG file or a TIFF's JPEG tiles were saved at, per level, and that of the level read
    at a µm/px (pipeline QC jpeg_quality); None for lossless files or tables of no known kind."""
    from PIL import Image

    from her2score.jpeg import IJG_TABLES, jpeg_quality

    def quality_of(path, **kw) -> int | None:
        return open_slide(path, mpp=kw.pop("mpp", 0.5), **kw).jpeg_quality_at(0.5)

    for quality in (10, 49, 50, 75, 95):
        Image.fromarray(slide_rgb).save(tmp_path / f"q{quality}.jpg", quality=quality)
        assert quality_of(tmp_path / f"q{quality}.jpg") == quality

    def ijg(quality: int, table: int) -> list[int]:  # libjpeg's scaling, as cjpeg -quality 95,20 writes a file
        scale = 5000 // quality if quality < 50 else 200 - 2 * quality
        return [min(max((v * scale + 50) // 100, 1), 255) for v in IJG_TABLES[table]]

    Image.fromarray(slide_rgb).save(tmp_path / "fine_grey_coarse_colour.jpg", qtables=[ijg(95, 0), ijg(20, 1)], subsampling=2)
    assert quality_of(tmp_path / "fine_grey_coarse_colour.jpg") == 20  # the colour's: DAB vs haematoxylin
    assert jpeg_quality({2: ijg(20, 0), 3: ijg(20, 1)}) == 20 and jpeg_quality({}) is None  # tables of ids 2 and 3
    tifffile.imwrite(tmp_path / "q40.tif", slide_rgb[:512, :512], tile=(256, 256), photometric="rgb", compression="jpeg",
                     compressionargs={"level": 40})
    assert quality_of(tmp_path / "q40.tif") == 40
    with tifffile.TiffWriter(tmp_path / "levels.tif") as tw:  # 0.25 µm/px at 95, 0.5 at 20, 1.0 at 10
        for i, quality in enumerate((95, 20, 10)):
            level = slide_rgb[:1024:2**i, :1024:2**i]
            tw.write(level, tile=(128, 128), photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                     subfiletype=1 if i else 0, resolution=(1e4 / 0.25 / 2**i,) * 2, resolutionunit="CENTIMETER")
    for backend in ("tifffile", "openslide"):
        s = open_slide(tmp_path / "levels.tif", backend=backend)
        assert s.level_jpeg_quality == (95, 20, 10), backend
        assert (s.jpeg_quality_at(0.25), s.jpeg_quality_at(0.5), s.jpeg_quality_at(0.7)) == (95, 20, 20), backend
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: the table is read before the turn
    Image.fromarray(slide_rgb).save(tmp_path / "turned.jpg", quality=20, exif=exif.tobytes())
    assert quality_of(tmp_path / "turned.jpg") == 20
    tifffile.imwrite(tmp_path / "zlib.tif", slide_rgb[:512, :512], tile=(256, 256), photometric="rgb", compression="zlib")
    assert quality_of(tmp_path / "zlib.tif") is None
    assert quality_of(save_png(tmp_path / "f.png", slide_rgb)) is None


def test_a_tiff_too_large_for_the_image_backend_says_which_backends_read_it(tmp_path, monkeypatch):
    """The image backend decodes a file whole: a TIFF over its limit is pointed to the readers of tiles, a PNG to a TIFF."""
    import her2score.slide as slide_module
    from her2score.slide import SlideError, open_slide

    monkeypatch.setattr(slide_module, "MAX_PLAIN_PIXELS", 100 * 100)
    rgb = np.full((128, 128, 3), 200, np.uint8)
    tiff, png = tmp_path / "big.tif", tmp_path / "big.png"
    tifffile.imwrite(tiff, rgb, tile=(64, 64), photometric="rgb")
    cv2.imwrite(str(png), rgb)
    with pytest.raises(SlideError, match=r"big\.tif.*too large to decode whole; read it with the tifffile or openslide backend"):
        open_slide(tiff, mpp=0.5, backend="image")
    with pytest.raises(SlideError, match=r"big\.png.*too large to decode whole; save it as a tiled pyramidal TIFF"):
        open_slide(png, mpp=0.5, backend="image")


def test_a_stripped_tiff_too_large_for_the_image_backend_is_sent_only_where_it_is_read(tmp_path, monkeypatch):
    """The image backend's refusal sent every TIFF to 'the tifffile or openslide backend, which read its tiles': a
    stripped TIFF has none (OpenSlide reads no stripped TIFF), and one stored in a single strip over the limit the
    tifffile backend refuses too, telling the user to save it tiled. Each is sent where it is read."""
    import her2score.slide as slide_module
    from her2score.slide import SlideError, open_slide

    monkeypatch.setattr(slide_module, "MAX_PLAIN_PIXELS", 100 * 100)
    rgb = np.full((128, 128, 3), 200, np.uint8)
    strips, whole = tmp_path / "strips.tif", tmp_path / "whole.tif"
    tifffile.imwrite(strips, rgb, photometric="rgb", rowsperstrip=16)
    tifffile.imwrite(whole, rgb, photometric="rgb", rowsperstrip=128)
    with pytest.raises(SlideError, match=r"strips\.tif: .*too large to decode whole; read it with the tifffile backend, "
                                         r"which reads its strips$"):
        open_slide(strips, mpp=0.5, backend="image")
    assert open_slide(strips, mpp=0.5, backend="tifffile").dimensions == (128, 128)
    with pytest.raises(SlideError, match=r"whole\.tif: .*too large to decode whole; save it as a tiled pyramidal TIFF$"):
        open_slide(whole, mpp=0.5, backend="image")
    with pytest.raises(SlideError, match="save it as a tiled TIFF"):  # as the tifffile backend says
        open_slide(whole, mpp=0.5, backend="tifffile")


def test_the_image_backend_refuses_a_tiff_whose_first_page_is_not_its_largest(tmp_path):
    """--backend image (Pillow) reads a TIFF's first page alone: an overview stored before the scan was scored as the
    slide, at the overview's µm/px. Refused, naming both pages and the backend that takes the scan; a pyramid whose
    first page is its base is read as before."""
    from her2score.slide import SlideError, open_slide

    scan = np.full((160, 240, 3), 200, np.uint8)
    path = tmp_path / "overview_first.tif"
    with tifffile.TiffWriter(path) as w:
        w.write(scan[::8, ::8], photometric="rgb", resolution=(2500, 2500), resolutionunit="CENTIMETER")
        w.write(scan, photometric="rgb", tile=(64, 64), resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with pytest.raises(SlideError, match=r"overview_first\.tif: the image backend reads a TIFF's first page, 30 x 20, "
                                         r"and page 1 is larger \(240 x 160\): read it with the tifffile backend"):
        open_slide(path, backend="image")
    assert open_slide(path).dimensions == (240, 160)
    pyramid = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(pyramid) as w:
        w.write(scan, photometric="rgb", tile=(64, 64), resolution=(20000, 20000), resolutionunit="CENTIMETER")
        w.write(scan[::2, ::2], photometric="rgb", tile=(64, 64), subfiletype=1)
    read = open_slide(pyramid, backend="image")
    assert read.dimensions == (240, 160) and read.mpp == pytest.approx(0.5)
    # a page after the first that Pillow cannot read (its next-page offset past the end): the first read as before
    data = bytearray(pyramid.read_bytes())
    with tifffile.TiffFile(pyramid) as tif:
        second = tif.pages[1].offset
    entries = struct.unpack_from("<H", data, second)[0]
    struct.pack_into("<I", data, second + 2 + 12 * entries, len(data) + 1000)
    (broken := tmp_path / "broken.tif").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's 'Corrupt EXIF data'
        assert open_slide(broken, backend="image").dimensions == (240, 160)


def test_tifffile_forced_on_a_file_that_is_no_tiff_says_what_it_is(tmp_path):
    """A PNG or JPEG given to the tifffile backend names its kind and the reader that takes it; a file of no
    known kind is no TIFF."""
    rgb = np.full((32, 32, 3), 200, np.uint8)
    png, jpeg, other = save_png(tmp_path / "f.png", rgb), save_jpeg(tmp_path / "f.jpg", rgb), tmp_path / "f.tif"
    other.write_bytes(b"not an image at all")
    for path, kind in ((png, "PNG"), (jpeg, "JPEG")):
        with pytest.raises(SlideError, match=rf"tifffile reads TIFF files; this is a {kind} image \(the image backend reads it\)"):
            open_slide(path, mpp=0.5, backend="tifffile")
    with pytest.raises(SlideError, match=r"not a TIFF file \(no TIFF header\)"):
        open_slide(other, mpp=0.5, backend="tifffile")


def test_automatic_backend_never_waits_on_a_fifo(tmp_path):
    """evaluate --reuse asks automatic_backend which reader an image's file chooses, before opening it: for a FIFO
    named like an image (a result found for it by name) it waited for a writer, for good. It says it is no regular
    file, as open_slide does, and names a missing one."""
    import threading

    from her2score.slide import SlideError, automatic_backend

    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    raised = []

    def ask():  # in a thread, so that a regression fails this test instead of hanging the suite
        try:
            automatic_backend(fifo)
        except SlideError as e:
            raised.append(str(e))

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(10)
    alive = t.is_alive()
    if alive:  # let the thread go: a writer opens the FIFO and closes it
        with open(fifo, "wb"):
            pass
    assert not alive and raised == [f"{fifo}: not a regular file"]
    with pytest.raises(SlideError, match=r"gone\.png: no such file"):
        automatic_backend(tmp_path / "gone.png")


def test_transparency_is_noted_where_it_blends_the_stain_and_a_wholly_transparent_image_is_named(tmp_path):
    """A field at half opacity was blended over white without a word (a 2+ read 1+ with QC passed), and one wholly
    transparent, its colours intact, was refused as 'no tissue found (blank ...)'."""
    from PIL import Image

    from her2score.synthetic import generate_field

    rgb = generate_field("2+", seed=9700).image
    for alpha, name in ((128, "half.png"), (0, "clear.png"), (255, "opaque.png")):
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], alpha, np.uint8)])).save(tmp_path / name, dpi=(50800, 50800))
    with open_slide(tmp_path / "half.png") as s:
        assert s.notes[-1].startswith("100% of its pixels partly transparent, blended over white")
    with open_slide(tmp_path / "opaque.png") as s:
        assert not any("transparent" in n for n in s.notes)
    with pytest.raises(SlideError, match=r"clear\.png: every pixel is fully transparent \(alpha 0\)"):
        open_slide(tmp_path / "clear.png")


def test_an_annotation_of_an_image_its_exif_orientation_turns_is_refused(tmp_path):
    """The annotation was applied to the turned image, while a tool showing the stored pixels drew it on those: drawn
    on the 0 half of a side-by-side 3+ / 0 field, it scored 3+ with QC passed. Which frame was meant cannot be told."""
    from PIL import Image

    from her2score.pipeline import analyse_slide
    from her2score.synthetic import generate_field

    rgb = generate_field("3+", seed=9701).image
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "turned.jpg", quality=95, dpi=(50800, 50800), exif=exif.tobytes())
    Image.fromarray(np.full(rgb.shape[:2], 255, np.uint8)).save(tmp_path / "mask.png")
    with pytest.raises(SlideError, match=r"turned\.jpg: turned upright as its EXIF orientation says, and given a tumour "
                                         r"annotation"):
        analyse_slide(tmp_path / "turned.jpg", region=tmp_path / "mask.png")


def test_a_16_bit_images_alpha_is_read_on_its_own_16_bits(tmp_path):
    """A 16-bit RGBA of 12-bit colour had its alpha scaled by the colour's white: half opacity (32,768) read as opaque.
    Its alpha is read on its full 16 bits, and half opacity is noted as in an 8-bit image."""
    from her2score.synthetic import generate_field

    rgb = generate_field("2+", seed=9702).image.astype(np.uint16) * 16
    half = np.dstack([rgb, np.full(rgb.shape[:2], 32768, np.uint16)])
    cv2.imwrite(str(tmp_path / "half16.png"), half[..., [2, 1, 0, 3]])
    with open_slide(tmp_path / "half16.png", mpp=0.5) as s:
        assert any(n.startswith("100% of its pixels partly transparent") for n in s.notes), s.notes
        got = s.read_region((0, 0), (64, 64), mpp=0.5).astype(int)
    expected = ((rgb[:64, :64] / 16) * (32768 / 65535) + 255 * (1 - 32768 / 65535)).astype(int)
    assert np.abs(got - expected).max() <= 2
