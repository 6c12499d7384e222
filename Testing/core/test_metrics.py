"""Metrics and the simulated user on shapes with answers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from samunet_core import metrics


def rect(shape, rows, cols) -> np.ndarray:
    """Bool mask with rows r0..r1 and cols c0..c1 (inclusive) set."""
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return m


# -- Dice ------------------------------------------------------------------------------------------------------------
def test_dice_half_overlap():
    a = rect((20, 20), (0, 9), (0, 9))  # 100 px
    b = rect((20, 20), (0, 9), (5, 14))  # 100 px, 50 shared
    assert metrics.dice(a, b) == pytest.approx(0.5)


def test_dice_identical_disjoint_and_empty():
    a = rect((10, 10), (2, 4), (2, 4))
    assert metrics.dice(a, a) == 1.0
    assert metrics.dice(a, rect((10, 10), (6, 8), (6, 8))) == 0.0
    assert metrics.dice(np.zeros((5, 5)), np.zeros((5, 5))) == 1.0
    assert metrics.dice(a, np.zeros_like(a)) == 0.0


def test_dice_3d_and_shape_mismatch():
    a = np.zeros((3, 4, 4), bool)
    a[0] = True  # 16 voxels
    b = np.zeros_like(a)
    b[0, :2] = True  # 8 voxels inside a
    assert metrics.dice(a, b) == pytest.approx(2 * 8 / 24)
    with pytest.raises(ValueError):
        metrics.dice(a, a[0])


# -- NSD -------------------------------------------------------------------------------------------------------------
def test_surface_of_square_is_its_ring():
    s = metrics.surface(rect((20, 20), (5, 14), (5, 14)))
    assert s.sum() == 4 * 10 - 4
    assert not s[6:14, 6:14].any()
    # Touching the array border still has a boundary there.
    assert metrics.surface(np.ones((4, 4), bool)).sum() == 12


def test_nsd_exact_boundary_matches():
    # A 10x10 square inside a 10x20 rectangle that shares its top, bottom and left sides.
    a = rect((40, 40), (10, 19), (10, 19))  # surface 36 px
    b = rect((40, 40), (10, 19), (10, 29))  # surface 2*10 + 2*20 - 4 = 56 px
    # Tolerance below one pixel: only the 10 + 10 + 8 shared boundary pixels count, on both sides.
    assert metrics.nsd(a, b, tolerance=0.5) == pytest.approx((28 + 28) / (36 + 56))


def test_nsd_identical_empty_and_one_sided():
    a = rect((16, 16), (3, 9), (4, 12))
    assert metrics.nsd(a, a, tolerance=0.0) == 1.0
    assert metrics.nsd(np.zeros((8, 8)), np.zeros((8, 8)), 2.0) == 1.0
    assert metrics.nsd(a, np.zeros_like(a), 2.0) == 0.0


def test_nsd_uses_spacing():
    a = rect((40, 40), (10, 19), (10, 19))
    b = rect((40, 40), (10, 19), (13, 22))  # shifted 3 columns
    # In pixels, the sides 3 px apart are beyond a 2 px tolerance ...
    assert metrics.nsd(a, b, tolerance=2.0) < 1.0
    # ... but with 0.5 mm columns they are 1.5 mm apart, and every boundary pixel is within 2 mm.
    assert metrics.nsd(a, b, tolerance=2.0, spacing=(1.0, 0.5)) == 1.0
    # A 1-pixel shift is within 2 px everywhere.
    assert metrics.nsd(a, np.roll(a, 1, axis=1), tolerance=2.0) == 1.0


def test_nsd_3d_with_spacing():
    a = np.zeros((10, 20, 20), bool)
    a[2:8, 5:15, 5:15] = True
    b = np.roll(a, 1, axis=0)  # shifted one slice
    assert metrics.nsd(a, b, tolerance=2.0, spacing=(1.0, 1.0, 1.0)) == 1.0
    # 5 mm slices: the top and bottom faces are now 5 mm away from the other surface.
    assert metrics.nsd(a, b, tolerance=2.0, spacing=(5.0, 1.0, 1.0)) < 1.0
    with pytest.raises(ValueError):
        metrics.nsd(a, b, tolerance=2.0, spacing=(1.0, 1.0))


# -- components, boxes, clicks ---------------------------------------------------------------------------------------
def test_largest_component_is_eight_connected():
    m = np.zeros((10, 10), bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True  # a diagonal: one 8-connected component of 3
    m[5:7, 5] = True  # 2 px
    lcc = metrics.largest_component(m)
    assert lcc.sum() == 3 and lcc[0, 0] and lcc[2, 2]
    assert metrics.count_components(m) == 2


def test_largest_component_tie_goes_to_first_in_row_major_order():
    m = np.zeros((10, 10), bool)
    m[5:7, 0:2] = True  # 4 px, starts at row 5
    m[0:2, 8:10] = True  # 4 px, starts at row 0: first in row-major order
    lcc = metrics.largest_component(m)
    assert lcc[0, 8] and not lcc[5, 0]
    assert not metrics.largest_component(np.zeros((4, 4), bool)).any()


def test_tight_box_is_max_inclusive():
    assert metrics.tight_box(rect((20, 30), (2, 6), (3, 11))) == (3, 2, 11, 6)
    one = np.zeros((5, 5), bool)
    one[4, 1] = True
    assert metrics.tight_box(one) == (1, 4, 1, 4)
    with pytest.raises(ValueError):
        metrics.tight_box(np.zeros((3, 3), bool))


def test_interior_point_centre_ties_and_border():
    assert metrics.interior_point(rect((20, 20), (2, 6), (3, 7))) == (5, 4)
    # A 4x4 square has four equally deep centre pixels: the first in row-major order wins.
    assert metrics.interior_point(rect((10, 10), (2, 5), (2, 5))) == (3, 3)
    # The image border counts as boundary: a mask filling a 5x5 image has its deepest pixel in the middle.
    assert metrics.interior_point(np.ones((5, 5), bool)) == (2, 2)
    # A square touching the top, bottom and left image borders: without the border as boundary its deepest pixel
    # would sit on column 0 (5 px from the right edge); with it, the square's centre is deepest.
    assert metrics.interior_point(rect((5, 20), (0, 4), (0, 4))) == (2, 2)


def test_next_click_positive_for_missed_region():
    ref = rect((30, 30), (5, 15), (5, 15))
    click = metrics.next_click(np.zeros_like(ref), ref)
    assert click == metrics.Click(10, 10, True)


def test_next_click_negative_for_larger_spurious_region():
    ref = rect((40, 40), (5, 15), (5, 15))
    pred = ref.copy()
    pred[5:8, 5:8] = False  # 9 px missed
    pred[25:32, 22:29] = True  # 49 px spurious, centre (x=25, y=28)
    click = metrics.next_click(pred, ref)
    assert click == metrics.Click(25, 28, False)


def test_next_click_picks_largest_error_region_and_prefers_missed_on_ties():
    ref = rect((40, 40), (0, 39), (0, 19))
    pred = ref.copy()
    pred[2:5, 2:5] = False  # 9 px missed
    pred[10:17, 2:9] = False  # 49 px missed: largest, centre (x=5, y=13)
    assert metrics.next_click(pred, ref) == metrics.Click(5, 13, True)
    # Equal missed and spurious areas: missed first.
    ref2 = rect((20, 20), (0, 4), (0, 4))
    pred2 = rect((20, 20), (0, 4), (0, 4))
    pred2[0:2, 0:2] = False  # 4 missed
    pred2[10:12, 10:12] = True  # 4 spurious
    assert metrics.next_click(pred2, ref2).positive is True
    assert metrics.next_click(ref2, ref2) is None
