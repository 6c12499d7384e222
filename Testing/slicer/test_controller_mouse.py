"""The controller driven by mouse events at display coordinates in a real slice view (slicer-core's slice logic,
displayable managers and markups widgets, offscreen): what a radiologist's clicks do, end to end.

Place mode -> click -> control point -> controller -> model -> mask in the segment; Shift-click -> that point only
becomes negative; a box drawn with two clicks is ignored while it is being drawn and segments its slice when done.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import raw_voxels, reference_labels_kji
from slice_view import SlicerContext, SliceViewHarness, offscreen_rendering_error

from samunet_core import interaction
from samunet_core.interaction import SlicePrompts
from samunet_core.transforms import window_to_uint8
from SAMUNetSlicerLib.controller import InteractionController

LUNG = (-1350.0, 150.0)
K = 12


@pytest.fixture
def view(mrml, default_predictor, embedding_cache):
    reason = offscreen_rendering_error()
    if reason:
        pytest.skip(reason)
    context = SlicerContext(mrml.scene, mrml.volumes)
    volume = mrml.load_ct()
    volume.GetDisplayNode().AutoWindowLevelOff()
    volume.GetDisplayNode().SetWindowLevel(LUNG[1] - LUNG[0], sum(LUNG) / 2)
    red = SliceViewHarness(mrml.scene, "Red", "Axial", context=context)
    red.show_volume(volume)
    seg, (lung,) = mrml.add_segmentation(volume, "lung")
    controller = InteractionController(mrml.scene, default_predictor, cache=embedding_cache, prefetch_radius=0,
                                       negative_modifier=lambda: bool(red.interactor.GetShiftKey()))
    controller.start(volume, seg, lung)  # the window comes from the volume's display node, as in Slicer
    frame = controller.frame("axial")
    red.jump_to_ras(frame.display_to_world([[K, 64, 64]])[0])
    yield red, controller, volume, seg, lung
    controller.close()
    red.close()


def written(seg, lung, volume) -> np.ndarray:
    import slicer

    return np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(seg, lung, volume)) > 0


def by_hand(controller, prompts: SlicePrompts) -> np.ndarray:
    """The engine's policy on slice K with the pixels the view shows."""
    predictor = controller.predictor
    frame = controller.frame("axial")

    class Decoder:
        def predict(self, k, **kw):
            image = window_to_uint8(frame.slice_of(raw_voxels(controller), k), *LUNG)
            return predictor.predict(predictor.encode(image), **kw)

    return interaction.decode_slice(Decoder(), K, prompts).mask


def lung_pixel(frame, k: int = K) -> tuple[int, int]:
    from scipy import ndimage

    plane = frame.slice_of(reference_labels_kji() == 5, k)
    distance = ndimage.distance_transform_edt(plane)
    row, col = np.unravel_index(np.argmax(distance), distance.shape)
    return int(row), int(col)


def test_mouse_click_in_place_mode_segments_the_clicked_slice(view):
    red, controller, volume, seg, lung = view
    frame = controller.frame("axial")
    row, col = lung_pixel(frame)
    controller.set_tool("positive")
    red.click(*red.display_of_ras(frame.display_to_world([[K, row, col]])[0]))
    assert controller.positive_node.GetNumberOfDefinedControlPoints() == 1
    controller.wait()
    assert controller.errors == []
    (placed,) = controller._placed.values()
    assert (placed.view, placed.axis, placed.s0) == ("Red", "axial", K)
    mask = written(seg, lung, volume)
    expected = by_hand(controller, controller.slice_prompts("axial", K))
    assert expected.any() and np.array_equal(frame.slice_of(mask, K), expected)
    assert mask.sum() == expected.sum()
    assert abs(placed.click.x - col) <= 0.5 and abs(placed.click.y - row) <= 0.5  # where the mouse was


def test_shift_click_makes_that_point_negative_and_only_that_one(view):
    from SAMUNetSlicerLib.views import allow_place_with_modifier

    red, controller, volume, seg, lung = view
    frame = controller.frame("axial")
    row, col = lung_pixel(frame)
    controller.set_tool("positive")
    for i in range(red.displayable_managers.GetDisplayableManagerCount()):
        manager = red.displayable_managers.GetNthDisplayableManager(i)
        if manager.IsA("vtkMRMLMarkupsDisplayableManager"):
            assert allow_place_with_modifier(manager, controller.positive_node)
    red.click(*red.display_of_ras(frame.display_to_world([[K, row, col]])[0]))
    controller.set_tool("positive")
    red.click(*red.display_of_ras(frame.display_to_world([[K, row + 4, col]])[0]))
    controller.set_tool("positive")
    red.click(*red.display_of_ras(frame.display_to_world([[K, 20, 64]])[0]), shift=True)
    controller.wait()
    assert controller.positive_node.GetNumberOfDefinedControlPoints() == 2
    assert controller.negative_node.GetNumberOfDefinedControlPoints() == 1
    prompts = controller.slice_prompts("axial", K)
    assert [c.positive for c in prompts.clicks] == [True, True, False]
    assert np.array_equal(frame.slice_of(written(seg, lung, volume), K), by_hand(controller, prompts))


def test_box_drawn_with_two_clicks_is_ignored_until_done_and_stays_on_its_slice(view):
    red, controller, volume, seg, lung = view
    frame = controller.frame("axial")
    plane = frame.slice_of(reference_labels_kji() == 5, K)
    rows, cols = np.nonzero(plane)
    first = red.display_of_ras(frame.display_to_world([[K, rows.min(), cols.min()]])[0])
    second = red.display_of_ras(frame.display_to_world([[K, rows.max(), cols.max()]])[0])
    roi = controller.set_tool("box")
    red.click(*first)  # click 1: a corner
    red.move(*second)  # the box follows the mouse, with a preview point
    assert not controller.busy and controller.errors == [] and not controller._placed
    red.click(*second)  # click 2
    assert roi.GetNumberOfControlPoints() == 1
    size = np.zeros(3)
    roi.GetSizeWorld(size)
    assert size[2] > 3 * 10.0  # Slicer gave the box a depth of several 10 mm slices ...
    controller.wait()
    (placed,) = controller._placed.values()
    assert placed.s0 == placed.s1 == K  # ... yet it is a box on the slice it was drawn on
    mask = written(seg, lung, volume)
    expected = by_hand(controller, controller.slice_prompts("axial", K))
    assert np.array_equal(frame.slice_of(mask, K), expected) and mask.sum() == expected.sum()
    dice = 2 * (expected & plane).sum() / (expected.sum() + plane.sum())
    assert dice > 0.6  # the default model's box on this lung slice: samunet_tinyvit 0.635, litemedsam_clicks v5 > 0.7
