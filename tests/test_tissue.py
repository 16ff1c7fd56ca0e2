import numpy as np

from her2score.tissue import tile_grid, tissue_mask


def test_tissue_mask_excludes_glass_black_and_green_pen():
    img = np.full((200, 200, 3), 245, np.uint8)
    img[20:120, 20:120] = (150, 110, 160)  # stained tissue
    img[150:190, 20:60] = (5, 5, 5)  # black border/debris
    img[150:190, 100:140] = (40, 160, 60)  # green marker
    tm = tissue_mask(img, mpp=4.0, min_area_um2=1000)
    assert tm.mask[70, 70]
    assert not tm.mask[5, 5]
    assert not tm.mask[170, 40]
    assert not tm.mask[170, 120]
    assert tm.pen[170, 120]
    assert tm.area_mm2 == tm.mask.sum() * (4e-3) ** 2


def test_tissue_mask_drops_small_fragments():
    img = np.full((200, 200, 3), 245, np.uint8)
    img[10:13, 10:13] = (150, 110, 160)
    img[50:150, 50:150] = (150, 110, 160)
    tm = tissue_mask(img, mpp=4.0, min_area_um2=2000)
    assert not tm.mask[11, 11] and tm.mask[100, 100]


def test_tile_grid_covers_tissue_once_and_is_deterministic():
    img = np.full((100, 100, 3), 245, np.uint8)
    img[:50, :50] = (150, 110, 160)
    tm = tissue_mask(img, mpp=8.0, min_area_um2=100)
    # slide of 1600 x 1600 px at the target (0.5 µm/px): 800 µm = 100 mask px at 8 µm/px
    tiles = tile_grid(tm, slide_size_px=(1600, 1600), tile_px=400, margin_px=20)
    assert tiles == tile_grid(tm, slide_size_px=(1600, 1600), tile_px=400, margin_px=20)
    cores = {t.core for t in tiles}
    # the tissue ends on a seam: the tiles across it lie within one mask pixel (8 µm) of it, and are taken too
    assert cores == {(x, y, 400, 400) for x in (0, 400, 800) for y in (0, 400, 800)}
    t = tiles[0]
    assert t.read == (-20, -20, 440, 440)


def test_tile_grid_clips_last_tiles():
    tm = tissue_mask(np.full((10, 10, 3), (150, 110, 160), np.uint8), mpp=8.0, min_area_um2=1)
    tiles = tile_grid(tm, slide_size_px=(1000, 700), tile_px=512, margin_px=16)
    assert [t.core for t in tiles] == [(0, 0, 512, 512), (512, 0, 488, 512), (0, 512, 512, 188), (512, 512, 488, 188)]


def test_beyond_slide_is_what_lies_past_the_slide_never_a_margin_inside_it():
    """A tile's read box past the slide's edge is outside; where the box ends just at the edge (no margin read
    beyond it), its edge row or column is; a box edge inside the slide (a margin, a seam with the next tile) never is."""
    from her2score.tissue import Tile

    corner = Tile(0, 0, (0, 0, 512, 512), 32, (1000, 800)).beyond_slide()  # read (-32, -32): 32 px past two edges
    assert corner[:, :32].all() and corner[:32].all() and not corner[32:, 32:].any()
    assert not Tile(1, 1, (512, 512, 256, 256), 32, (2000, 2000)).beyond_slide().any()  # inside: margins only
    right = Tile(0, 1, (512, 0, 488, 512), 32, (1000, 800)).beyond_slide()  # read 480..1032: the last 32 columns past
    assert right[40:, -32:].all() and not right[40:, :-32].any()
    whole = Tile(0, 0, (0, 0, 100, 80), 0).beyond_slide()  # a field read as one box, no margin: its 1 px frame
    assert whole[0].all() and whole[-1].all() and whole[:, 0].all() and whole[:, -1].all() and not whole[1:-1, 1:-1].any()


def test_a_tile_holding_a_thin_strip_of_tissue_is_scored():
    """A strip of tissue in a tile (here 5 mask pixels, 0.8% of its core) gets the tile scored: a floor on the
    tissue's share of a tile lost 9-18% of a small biopsy fragment's cells."""
    from her2score.tissue import TissueMask

    mask = np.zeros((100, 100), bool)  # 16 target px a mask pixel: a tile is 25 x 25 of them
    mask[3:20, 3:20] = True  # a fragment inside tile (0, 0)
    mask[60, 5:10] = True  # a strip alone in tile (0, 800), far from any other tissue
    none = np.zeros_like(mask)
    tiles = tile_grid(TissueMask(mask, 8.0, none, none), slide_size_px=(1600, 1600), tile_px=400, margin_px=20)
    assert {t.core[:2] for t in tiles} == {(0, 0), (0, 800)}


def test_small_real_tumour_clusters_are_tissue_and_black_ink_is_not():
    """Real colon crops 60 µm across (a cell block's clusters, ~2,800 µm²) on glass at 2 µm/px are tissue: at the
    old 5,000 µm² floor a slide of one 1+ fragment and 30 such 3+ clusters lost them all and read 1+, HER2-low
    eligible. A speck of 20 µm (400 µm², dust) is not. A black marker dot (RGB 35) is not tissue either: it was
    the slide's "thickest tissue", where the image check read its nuclei, and the slide was refused as dark."""
    import cv2
    from skimage.data import immunohistochemistry

    colon = cv2.resize(immunohistochemistry(), None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)  # 2 µm/px
    img = np.full((300, 300, 3), 245, np.uint8)
    disc = np.zeros((30, 30), np.uint8)
    cv2.circle(disc, (15, 15), 15, 1, -1)  # 60 µm across
    img[20:50, 20:50][disc > 0] = colon[40:70, 40:70][disc > 0]
    img[100:110, 100:110] = colon[60:70, 60:70]  # 20 µm
    cv2.circle(img, (200, 200), 60, (35, 35, 38), -1)  # a black marker dot, 240 µm
    img[150:260, 200:260] = np.where(img[150:260, 200:260] == 245, colon[:110, :60], img[150:260, 200:260])  # tissue beside it
    tm = tissue_mask(img, mpp=2.0)
    assert tm.mask[35, 35] and not tm.mask[105, 105]
    assert not tm.mask[200, 180] and tm.dark[200, 180]


def test_a_turns_black_fill_is_no_tissue_and_no_dark_debris():
    """A field turned 30 degrees with pure black corners (a sixth of the image): the fill is no tissue, and not
    the dark debris excluded from it, which the QC reported as '47% of the stained area excluded as pen ink or
    dark debris'; black ink (RGB 5, a scan's black keeps noise) still is."""
    import cv2

    img = np.full((400, 400, 3), 245, np.uint8)
    img[100:300, 100:300] = (150, 110, 160)
    img[180:200, 180:200] = (5, 5, 5)  # black ink on the tissue
    turned = cv2.warpAffine(img, cv2.getRotationMatrix2D((200, 200), 30, 1.0), (400, 400), borderValue=(0, 0, 0))
    tm = tissue_mask(turned, mpp=2.0, min_area_um2=1000)
    fill = turned.max(axis=2) == 0
    assert fill.mean() > 0.15 and not tm.mask[fill].any() and not tm.dark[fill].any()
    assert tm.dark[190, 190] and not tm.mask[190, 190]
