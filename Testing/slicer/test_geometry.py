"""Markups in RAS reach the right displayed slice and pixel, on an LPS-stored CT and on an oblique, flipped volume."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ct_path

from samunet_core.errors import InputError
from SAMUNetSlicerLib.geometry import AXES, SliceFrame, display_window, view_axis


def _lps_display(lps_zyx: np.ndarray, axis: str, k: int) -> np.ndarray:
    """DESIGN.md's rule on an independently reoriented (SimpleITK DICOMOrient 'LPS') array."""
    if axis == "axial":
        return lps_zyx[k]
    if axis == "coronal":
        return lps_zyx[:, k, :][::-1]
    return lps_zyx[:, :, k][::-1]


@pytest.mark.parametrize("axis", AXES)
def test_displayed_slices_match_simpleitk_lps(mrml, axis):
    import SimpleITK as sitk

    volume = mrml.load_ct()
    frame = SliceFrame.for_volume(volume, axis)
    array = mrml.slicer.util.arrayFromVolume(volume)
    lps = sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(ct_path())), "LPS"))
    expected_slices = {"axial": lps.shape[0], "coronal": lps.shape[1], "sagittal": lps.shape[2]}[axis]
    assert frame.n_slices == expected_slices
    for k in (0, 7, frame.n_slices - 1):
        np.testing.assert_array_equal(frame.slice_of(array, k), _lps_display(lps, axis, k))


def test_ct_markup_reaches_voxel_and_pixel(mrml):
    volume = mrml.load_ct()
    frame = SliceFrame.for_volume(volume, "axial")
    ijk = np.array([40.0, 70.0, 12.0])
    ras = frame.ijk_to_world @ np.r_[ijk, 1.0]
    # a markup placed 0.4 voxel off the centre, as a click would be
    ras_click = ras[:3] + np.array([0.4 * 3.046, -0.4 * 3.046, 0.3 * 10])
    fid = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    fid.AddControlPointWorld(*ras_click)
    world = np.zeros(3)
    fid.GetNthControlPointPositionWorld(0, world)
    k = frame.slice_index(world)
    s, row, col = frame.world_to_display(world)[0]
    assert k == 12
    # LPS-stored CT: i grows towards patient right, so it runs backwards on the image; j grows anterior -> up
    assert (round(row), round(col)) == (127 - 70, 127 - 40)
    array = mrml.slicer.util.arrayFromVolume(volume)
    assert frame.slice_of(array, k)[round(row), round(col)] == array[12, 70, 40]


def _rotation(axis_vec, degrees):
    axis_vec = np.asarray(axis_vec, float) / np.linalg.norm(axis_vec)
    a = np.deg2rad(degrees)
    K = np.array([[0, -axis_vec[2], axis_vec[1]], [axis_vec[2], 0, -axis_vec[0]], [-axis_vec[1], axis_vec[0], 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


@pytest.mark.parametrize("axis", AXES)
def test_oblique_flipped_volume_markup_hits_marker_voxel(mrml, axis):
    # K=20 slices stored along R-L (a sagittal acquisition), rows along S->I, columns along A->P, tilted 17 degrees
    directions = np.column_stack([[0, -1, 0], [0, 0, -1], [-1, 0, 0]]).astype(float)  # i->P, j->I, k->L (RAS)
    spacing = np.array([0.8, 1.1, 2.5])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = _rotation([1, 1, 0.3], 17) @ directions * spacing
    ijk_to_ras[:3, 3] = [12.0, -30.0, 55.0]
    array = np.zeros((20, 30, 40), np.int16)
    marker_kji = (13, 21, 9)
    array[marker_kji] = 1000
    volume = mrml.add_volume(array, ijk_to_ras)
    frame = SliceFrame.for_volume(volume, axis)
    centre = ijk_to_ras @ np.r_[marker_kji[::-1], 1.0]
    fid = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    fid.AddControlPointWorld(*(centre[:3] + 0.3))  # off-centre by less than half a voxel
    world = np.zeros(3)
    fid.GetNthControlPointPositionWorld(0, world)
    k = frame.slice_index(world)
    _, row, col = frame.world_to_display(world)[0]
    plane = frame.slice_of(mrml.slicer.util.arrayFromVolume(volume), k)
    assert plane[round(row), round(col)] == 1000
    assert plane.sum() == 1000  # exactly one voxel on that slice
    # display orientation: the in-plane axis that runs towards superior points up the image for coronal/sagittal
    if axis != "axial":
        top = frame.display_to_world(np.array([[k, 0, 0]]))[0]
        bottom = frame.display_to_world(np.array([[k, frame.slice_shape[0] - 1, 0]]))[0]
        assert top[2] > bottom[2]


def test_markup_under_linear_transform_uses_world_coordinates(mrml):
    import vtk

    volume = mrml.load_ct()
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 30.0)  # shift 30 mm right, roughly ten voxels
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    frame = SliceFrame.for_volume(volume, "axial")
    untransformed = SliceFrame.for_volume(mrml.load_ct("plain"), "axial")
    ras = np.array([0.0, 0.0, -200.0])
    shift = frame.world_to_display(ras)[0] - untransformed.world_to_display(ras)[0]
    assert abs(shift[2] - 30.0 / 3.046875) < 1e-3  # columns run towards patient left, so +R is +col here


def test_outside_prompt_is_refused_and_window_follows_display_node(mrml):
    volume = mrml.load_ct()
    frame = SliceFrame.for_volume(volume, "axial")
    with pytest.raises(InputError, match="outside the volume"):
        frame.slice_index(np.array([0.0, 0.0, 500.0]))
    volume.GetDisplayNode().AutoWindowLevelOff()
    volume.GetDisplayNode().SetWindowLevel(400, 40)
    assert display_window(volume) == (-160.0, 240.0)


def test_view_axis_from_real_slice_nodes(mrml):
    from SAMUNetSlicerLib.geometry import volume_ijk_to_world

    volume = mrml.load_ct()  # LPS file with flipped x and y: each view must still find its own voxel axis
    mrml.slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(mrml.scene)  # what Slicer does at startup
    for orientation, expected in (("Axial", "axial"), ("Coronal", "coronal"), ("Sagittal", "sagittal")):
        node = mrml.scene.AddNewNodeByClass("vtkMRMLSliceNode")
        node.SetOrientation(orientation)
        assert view_axis(node, volume_ijk_to_world(volume)) == expected
