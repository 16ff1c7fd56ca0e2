import cv2
import numpy as np

from her2score.cells import grow_cells, segment_nuclei


def disks(centres, radius_px, shape=(128, 128), od=0.5):
    img = np.zeros(shape, np.float32)
    for x, y in centres:
        cv2.circle(img, (x, y), radius_px, od, -1)
    return img


def test_segment_nuclei_counts_and_splits_touching():
    h = disks([(30, 30), (90, 30), (40, 90), (54, 90)], 8)  # last two touch
    labels = segment_nuclei(h, mpp=0.5)
    assert len(np.unique(labels)) - 1 == 4
    assert labels[30, 30] != labels[30, 90]
    assert labels[90, 36] != labels[90, 58]


def test_segment_nuclei_ignores_dab_dominated_and_small_objects():
    h = disks([(30, 30)], 8, od=0.5) + disks([(90, 90)], 8, od=0.12) + disks([(90, 30)], 1, od=0.6)
    dab = disks([(90, 90)], 8, od=0.8)  # a strong DAB blob leaking some haematoxylin signal
    labels = segment_nuclei(h, dab, mpp=0.5)
    assert labels[30, 30] > 0
    assert labels[90, 90] == 0
    assert labels[30, 90] == 0
    assert len(np.unique(labels)) - 1 == 1


def test_grow_cells_bounded_and_split_on_membrane():
    nuclei = np.zeros((100, 100), np.int32)
    cv2.circle(nuclei, (30, 50), 6, 1, -1)
    cv2.circle(nuclei, (60, 50), 6, 2, -1)
    membrane = np.zeros((100, 100), np.float32)
    membrane[:, 41:43] = 1.0  # a vertical membrane off the midpoint (45)
    cells = grow_cells(nuclei, membrane, mpp=0.5, max_radius_um=8)
    assert cells[50, 40] == 1 and cells[50, 44] == 2  # the split follows the membrane, not the midpoint
    assert cells[5, 5] == 0  # beyond 8 µm (16 px) of any nucleus
    ys, xs = np.nonzero(cells == 1)
    assert np.hypot(xs - 30, ys - 50).max() <= 6 + 16 + 1.5
