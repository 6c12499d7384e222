"""Markups placed by mouse events in real (offscreen, Qt-free) Slicer slice views, as a user places them in Slicer.

Each view is built from slicer-core by slice_view.SliceViewHarness; the CT is shown in it, the scene is put in Place
mode for a markups node and the left button is clicked at the display position of a known voxel centre.
"""

from __future__ import annotations

import numpy as np
import pytest
from slice_view import SlicerContext, SliceViewHarness, offscreen_rendering_error

VIEWS = [("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")]
TARGET_IJK = (70, 60, 12)  # a voxel inside the chest, away from every view's border
BOX_CORNER_OFFSETS = ((-50, -40), (45, 30))  # display offsets (pixels) of the two ROI corner clicks from the target


@pytest.fixture(scope="module", autouse=True)
def _offscreen():
    reason = offscreen_rendering_error()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def ct_scene(mrml):
    """The conftest scene, its volumes logic attached to a Slicer context (colours, markups, interaction nodes)."""
    context = SlicerContext(mrml.scene, mrml.volumes)
    volume = mrml.load_ct()
    return mrml, context, volume


@pytest.fixture(params=VIEWS, ids=[name for name, _ in VIEWS])
def view(request, ct_scene):
    mrml, context, volume = ct_scene
    name, orientation = request.param
    harness = SliceViewHarness(mrml.scene, name, orientation, size=(400, 400), context=context)
    harness.show_volume(volume)
    yield harness
    harness.close()


def ijk_to_ras(volume, ijk):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return np.array(matrix.MultiplyPoint((*map(float, ijk), 1.0))[:3])


def ras_to_ijk(volume, ras):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(matrix)
    return np.array(matrix.MultiplyPoint((*map(float, ras), 1.0))[:3])


def in_plane_axes(view) -> list[int]:
    """The volume's IJK axes lying in the slice plane (this CT is axis-aligned)."""
    normal = np.abs(view.slice_normal())
    return [axis for axis in range(3) if axis != int(np.argmax(normal))]


def distance_to_plane(view, ras) -> float:
    """Signed distance (mm) of `ras` from the slice plane, along the slice normal."""
    origin = np.array(view.ras_of_display(0, 0))
    return float(np.dot(np.asarray(ras) - origin, view.slice_normal()))


class EventLog:
    """Records markups node events with the interactor's modifier state and the node's state at that moment."""

    NAMES = ("PointAddedEvent", "PointPositionDefinedEvent", "PointPositionUndefinedEvent", "PointRemovedEvent")

    def __init__(self, node, interactor) -> None:
        self.node, self.interactor, self.entries = node, interactor, []
        for name in self.NAMES:
            node.AddObserver(getattr(node, name), lambda caller, _event, name=name: self._record(name))

    def _record(self, name: str) -> None:
        node = self.node
        entry = {
            "event": name.removesuffix("Event"),
            "shift": self.interactor.GetShiftKey(),
            "ctrl": self.interactor.GetControlKey(),
            "n": node.GetNumberOfControlPoints(),
            "status": [node.GetNthControlPointPositionStatus(i) for i in range(node.GetNumberOfControlPoints())],
        }
        if node.IsA("vtkMRMLMarkupsROINode"):
            entry["size"] = tuple(round(v, 3) for v in node.GetSize())
            entry["required"] = node.GetRequiredNumberOfControlPoints()
        self.entries.append(entry)

    def take(self) -> list[dict]:
        entries, self.entries = self.entries, []
        return entries

    def events(self, entries=None) -> list[str]:
        return [e["event"] for e in (self.entries if entries is None else entries)]


def target_on_slice(view, volume):
    """RAS of TARGET_IJK with the view's slice plane moved through it (the plane then holds that voxel centre)."""
    ras = ijk_to_ras(volume, TARGET_IJK)
    view.jump_to_ras(ras)
    assert abs(distance_to_plane(view, ras)) < 1e-6
    return ras


def test_views_render_the_ct(view):
    rgb = view.capture_rgb()
    assert rgb.shape == (400, 400, 3)
    assert rgb.std() > 10, "the slice image was not rendered"


def test_click_places_point_at_ras_under_cursor(view, ct_scene):
    mrml, context, volume = ct_scene
    node = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    log = EventLog(node, view.interactor)
    ras = target_on_slice(view, volume)
    x, y = view.display_of_ras(ras)
    assert 0 <= x < 400 and 0 <= y < 400
    context.place_mode(node)

    view.move(x, y)
    assert log.events(log.take()) == ["PointAdded"]  # the preview point that follows the pointer
    assert node.GetNthControlPointPositionStatus(0) == node.PositionPreview
    view.press(x, y)
    assert log.take() == []
    view.release(x, y)
    defined = log.take()
    assert log.events(defined) == ["PointPositionDefined"]
    assert defined[0]["shift"] == 0 and defined[0]["status"] == [node.PositionDefined]

    assert node.GetNumberOfControlPoints() == node.GetNumberOfDefinedControlPoints() == 1
    placed = np.array(node.GetNthControlPointPositionWorld(0))
    np.testing.assert_allclose(placed, view.ras_of_display(x, y), atol=1e-6)  # exactly the RAS under the pixel
    assert abs(distance_to_plane(view, placed)) < 1e-6  # on the slice plane
    spacing = np.array(volume.GetSpacing())
    axes = in_plane_axes(view)
    assert np.all(np.abs(placed - ras)[axes] <= spacing[axes] / 2)  # within half a voxel in-plane
    assert tuple(np.round(ras_to_ijk(volume, placed)).astype(int)) == TARGET_IJK
    # one-shot place mode (persistence off) ends after the point
    assert context.interaction_node.GetCurrentInteractionMode() == context.interaction_node.ViewTransform


def test_click_after_set_slice_offset_lands_on_the_new_slice(view, ct_scene):
    mrml, context, volume = ct_scene
    node = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    normal = np.array(view.slice_normal())
    step = float(np.abs(normal) @ np.array(volume.GetSpacing()))  # one voxel along the normal
    offset = view.slice_offset + 3 * step
    view.set_slice_offset(offset)
    assert view.slice_offset == pytest.approx(offset)
    context.place_mode(node)
    view.click(200, 210)
    placed = np.array(node.GetNthControlPointPositionWorld(0))
    assert float(placed @ normal) == pytest.approx(offset, abs=1e-6)
    np.testing.assert_allclose(placed, view.ras_of_display(200, 210), atol=1e-6)


def test_persistent_place_mode_previews_next_point(view, ct_scene):
    mrml, context, volume = ct_scene
    node = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    log = EventLog(node, view.interactor)
    x, y = view.display_of_ras(target_on_slice(view, volume))
    context.place_mode(node, persistent=True)
    view.click(x, y)
    view.click(x + 20, y - 10)
    assert log.events() == ["PointAdded", "PointPositionDefined", "PointAdded", "PointPositionDefined"]
    view.move(x + 40, y)  # a new preview point: GetNumberOfControlPoints counts it, the defined count does not
    assert node.GetNumberOfControlPoints() == 3 and node.GetNumberOfDefinedControlPoints() == 2
    assert context.interaction_node.GetCurrentInteractionMode() == context.interaction_node.Place
    context.view_transform_mode()
    assert log.events()[-1] == "PointRemoved"  # leaving Place mode removes the preview point
    assert node.GetNumberOfControlPoints() == 2


def test_click_over_a_shown_segment_still_places(view, ct_scene):
    """The segment being edited is shown in the view while prompts are placed: clicks on it still place points."""
    mrml, context, volume = ct_scene
    seg, (segment_id,) = mrml.add_segmentation(volume, "lung")
    seg.GetSegmentation().GetSegment(segment_id).SetColor(1.0, 0.0, 0.0)
    mask = np.zeros(volume.GetImageData().GetDimensions()[::-1], np.uint8)
    i, j, k = TARGET_IJK
    mask[k - 2 : k + 3, j - 10 : j + 11, i - 10 : i + 11] = 1
    mrml.slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, segment_id, volume)
    node = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    x, y = view.display_of_ras(target_on_slice(view, volume))
    r, g, b = view.capture_rgb()[399 - y, x].astype(int)
    assert r - max(g, b) > 30, "the (red) segment is not drawn under the cursor"
    context.place_mode(node)
    view.click(x, y)
    assert node.GetNumberOfDefinedControlPoints() == 1
    np.testing.assert_allclose(node.GetNthControlPointPositionWorld(0), view.ras_of_display(x, y), atol=1e-6)


@pytest.mark.parametrize("modifier", ["shift", "ctrl", "alt"])
def test_modifier_click_places_nothing_by_default(view, ct_scene, modifier):
    """Slicer's markups widget places on a left release with NO modifier only (Shift + left drag pans)."""
    mrml, context, volume = ct_scene
    node = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    log = EventLog(node, view.interactor)
    x, y = view.display_of_ras(target_on_slice(view, volume))
    context.place_mode(node)
    view.click(x, y, **{modifier: True})
    assert "PointPositionDefined" not in log.events()
    assert node.GetNumberOfDefinedControlPoints() == 0
    assert context.interaction_node.GetCurrentInteractionMode() == context.interaction_node.Place


def test_shift_click_reports_shift_when_allowed(view, ct_scene):
    """With a Shift translation added to the view's points widget, Shift + click places a point and the interactor
    reports Shift while PointPositionDefinedEvent fires; a plain click then reports no Shift."""
    mrml, context, volume = ct_scene
    node = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    log = EventLog(node, view.interactor)
    ras = target_on_slice(view, volume)
    x, y = view.display_of_ras(ras)
    context.place_mode(node, persistent=True)
    view.allow_place_with_modifier(node)  # the widget exists once the node (with display node) is in the scene

    view.click(x, y, shift=True)
    view.click(x + 15, y + 5)
    defined = [e for e in log.entries if e["event"] == "PointPositionDefined"]
    assert [e["shift"] for e in defined] == [1, 0]
    assert node.GetNumberOfDefinedControlPoints() == 2
    np.testing.assert_allclose(node.GetNthControlPointPositionWorld(0), view.ras_of_display(x, y), atol=1e-6)
    np.testing.assert_allclose(node.GetNthControlPointPositionWorld(1), view.ras_of_display(x + 15, y + 5),
                               atol=1e-6)


def test_roi_box_two_clicks(view, ct_scene):
    """A Box ROI in a slice view: click a corner, move, click the opposite corner (Slicer 5.x)."""
    mrml, context, volume = ct_scene
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    assert roi.GetROIType() == roi.ROITypeBox and roi.GetRequiredNumberOfControlPoints() == 2
    log = EventLog(roi, view.interactor)
    x, y = view.display_of_ras(target_on_slice(view, volume))
    (dx0, dy0), (dx1, dy1) = BOX_CORNER_OFFSETS
    c0, c1 = (x + dx0, y + dy0), (x + dx1, y + dy1)
    ras0, ras1 = np.array(view.ras_of_display(*c0)), np.array(view.ras_of_display(*c1))
    context.place_mode(roi)
    normal_axis = int(np.argmax(np.abs(view.slice_normal())))  # ROI axes are RAS-aligned (ObjectToNode = identity)
    plane_axes = [a for a in range(3) if a != normal_axis]
    expected_in_plane = np.abs(ras1 - ras0)[plane_axes]

    view.click(*c0)  # first corner
    first = log.take()
    assert log.events(first) == ["PointAdded", "PointPositionDefined"]
    assert first[-1]["n"] == 1 and first[-1]["status"] == [roi.PositionDefined] and first[-1]["size"] == (0, 0, 0)
    assert first[-1]["required"] == 2  # not done yet: a controller must wait
    np.testing.assert_allclose(roi.GetNthControlPointPositionWorld(0), ras0, atol=1e-6)

    view.move(*c1)  # preview of the opposite corner: the box already has its final size
    moving = log.take()
    assert log.events(moving) == ["PointAdded"]
    assert moving[-1]["status"] == [roi.PositionDefined, roi.PositionPreview]
    np.testing.assert_allclose(np.array(roi.GetSize())[plane_axes], expected_in_plane, atol=1e-3)

    view.press(*c1)
    view.release(*c1)  # second corner: both corner points are replaced by one centre point
    second = log.take()
    assert log.events(second) == ["PointRemoved", "PointPositionUndefined", "PointPositionDefined"]
    assert second[-1]["n"] == 1 and second[-1]["status"] == [roi.PositionDefined]
    assert second[-1]["required"] == 1 and min(second[-1]["size"]) > 0  # done: the box is defined by its centre
    size = np.array(roi.GetSize())
    np.testing.assert_allclose(size[plane_axes], expected_in_plane, atol=1e-3)
    assert size[normal_axis] == pytest.approx(expected_in_plane.min())  # thickness = shorter in-plane side
    center = np.array(roi.GetCenterWorld())
    np.testing.assert_allclose(center, (ras0 + ras1) / 2, atol=1e-3)
    np.testing.assert_allclose(roi.GetNthControlPointPositionWorld(0), center, atol=1e-3)
    assert abs(distance_to_plane(view, center)) < 1e-3
    assert context.interaction_node.GetCurrentInteractionMode() == context.interaction_node.ViewTransform


def test_roi_click_and_drag_is_not_a_box(view, ct_scene):
    """Click-and-drag does not draw a box: the first corner is defined where the button is released."""
    mrml, context, volume = ct_scene
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    log = EventLog(roi, view.interactor)
    x, y = view.display_of_ras(target_on_slice(view, volume))
    context.place_mode(roi)
    view.drag((x - 50, y - 40), (x + 45, y + 30))
    assert log.events() == ["PointAdded", "PointPositionDefined"]
    assert roi.GetNumberOfDefinedControlPoints() == 1 and tuple(roi.GetSize()) == (0, 0, 0)
    np.testing.assert_allclose(roi.GetNthControlPointPositionWorld(0), view.ras_of_display(x + 45, y + 30), atol=1e-6)
    assert context.interaction_node.GetCurrentInteractionMode() == context.interaction_node.Place
