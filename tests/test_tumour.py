"""Tumour-cell selection without an annotation (tumour.select_tumour_cells), on hand-built cells.

A sheet of epithelial cells (nuclei 50 µm², 7 µm wide, at the haematoxylin OD of the sheet, cells of
120 µm², 10 µm apart) with one test cell placed among them: what the rule does with that cell alone.
"""
from __future__ import annotations

import numpy as np
import pytest

from her2score.membrane import N_SECTORS, CellMeasurements
from her2score.tumour import TumourRule, select_tumour_cells

MPP = 0.5


def _sheet(**test_cell) -> CellMeasurements:
    """A 5 x 5 sheet of epithelial cells 10 µm apart; the centre one (row 12) takes ``test_cell``'s values."""
    n = 25
    yy, xx = np.divmod(np.arange(n), 5)
    values = dict(cell_area_um2=120.0, nucleus_area_um2=50.0, nucleus_elongation=1.3, nucleus_width_um=7.0,
                  hematoxylin_od=0.20)
    cols = {k: np.full(n, v, np.float32) for k, v in values.items()}
    for k, v in test_cell.items():
        cols[k][12] = v
    return CellMeasurements(label=np.arange(1, n + 1, dtype=np.int32), x=(xx * 10 / MPP).astype(np.float32),
                            y=(yy * 10 / MPP).astype(np.float32), nucleus_dab_od=np.zeros(n, np.float32),
                            cytoplasm_dab_od=np.zeros(n, np.float32), width_um=np.zeros(n, np.float32),
                            sector_contrast=np.zeros((n, N_SECTORS), np.float16), sector_od=np.zeros((n, N_SECTORS), np.float16),
                            sector_neighbour=np.zeros((n, N_SECTORS), np.int32), cut_sectors=np.zeros(n, np.int8), **cols)


def _is_tumour(**test_cell) -> tuple[bool, dict]:
    s = select_tumour_cells(_sheet(**test_cell), um_per_px=MPP)
    assert s.tumour.sum() - s.tumour[12] == 24, s.excluded  # the sheet itself stays tumour
    return bool(s.tumour[12]), s.excluded


def test_the_epithelial_sheet_is_tumour():
    assert _is_tumour()[0]


@pytest.mark.parametrize("elongation", [1.2, 1.6])
def test_a_small_dark_oval_nucleus_is_lymphocyte_like(elongation):
    """Lymphocytes and plasma cells: under 32 µm², darker than 1.15 x the median nucleus. A plasma cell's oval
    nucleus measures 1.5-1.7 (the real colon's lamina propria), under the 1.7 the rule allows (1.5 until now)."""
    tumour, excluded = _is_tumour(nucleus_area_um2=26.0, nucleus_width_um=5.0, nucleus_elongation=elongation,
                                  hematoxylin_od=0.26)
    assert not tumour and excluded["lymphocyte-like"] == 1


@pytest.mark.parametrize("cell", [dict(hematoxylin_od=0.20, nucleus_elongation=1.6),  # as dark as the sheet
                                  dict(hematoxylin_od=0.26, nucleus_elongation=1.9)])  # longer than a plasma cell
def test_a_small_nucleus_not_dark_or_not_compact_is_not_lymphocyte_like(cell):
    tumour, excluded = _is_tumour(nucleus_area_um2=26.0, nucleus_width_um=5.0, **cell)
    assert tumour and excluded["lymphocyte-like"] == 0


def test_a_small_nucleus_alone_in_a_wide_cell_is_stroma():
    """A nucleus under 20 µm² (5 µm across) filling under a tenth of its cell (here 16 of 250 µm²: over 5 µm of
    'cytoplasm' all round) is a stromal nucleus in matrix; the same nucleus in a cell of 60 µm², or a nucleus of
    24 µm² in the wide cell, is kept."""
    tumour, excluded = _is_tumour(nucleus_area_um2=16.0, nucleus_width_um=4.5, cell_area_um2=250.0)
    assert not tumour and excluded["small nucleus in a wide cell (stroma)"] == 1
    assert _is_tumour(nucleus_area_um2=16.0, nucleus_width_um=4.5, cell_area_um2=60.0)[0]
    assert _is_tumour(nucleus_area_um2=24.0, nucleus_width_um=5.0, cell_area_um2=250.0)[0]


def test_the_stromal_criterion_can_be_switched_off_and_still_counts_as_a_neighbour():
    """matrix_max_um2=0 keeps every cell it would leave out. A cell left out as stroma still counts as a
    neighbour in the cohesion count: left out before it, it took scattered tumour cells of the stroma-rich
    real Ki67 field with it."""
    m = _sheet(nucleus_area_um2=16.0, nucleus_width_um=4.5, cell_area_um2=250.0)
    assert select_tumour_cells(m, um_per_px=MPP, rule=TumourRule(matrix_max_um2=0.0)).tumour.all()
    # an epithelial cell whose one neighbour within 10.5 µm is the small nucleus in a wide cell, one neighbour needed
    pair = m.select(np.isin(np.arange(25), [11, 12]))
    s = select_tumour_cells(pair, um_per_px=MPP, rule=TumourRule(neighbour_radius_um=10.5, min_neighbours=1))
    assert s.tumour.tolist() == [True, False], s.excluded
