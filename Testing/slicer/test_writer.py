"""Writes land on exactly the intended slice and voxels, honour Segment Editor masking, undo restores, tags exist."""

from __future__ import annotations

import json

import numpy as np
import pytest

from SAMUNetSlicerLib.geometry import SliceFrame
from SAMUNetSlicerLib.masking import OVERWRITE_ALL, OVERWRITE_NONE, OVERWRITE_VISIBLE, MaskSettings
from SAMUNetSlicerLib.writer import MaskedWriter, SegmentRegionIO, provenance_tags, read_tags, slab_extent


def _full(mrml, seg, sid, volume):
    return mrml.slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume)


def _put(mrml, seg, sid, volume, array):
    mrml.slicer.util.updateSegmentBinaryLabelmapFromArray(array.astype(np.uint8), seg, sid, volume)


@pytest.fixture
def scene(mrml):
    volume = mrml.load_ct()
    seg, (target, other) = mrml.add_segmentation(volume, "target", "other")
    existing = np.zeros((34, 128, 128), np.uint8)
    existing[5:9, 40:60, 40:60] = 1  # target already has voxels on other slices
    _put(mrml, seg, target, volume, existing)
    other_array = np.zeros((34, 128, 128), np.uint8)
    other_array[10:14, 60:90, 60:90] = 1
    _put(mrml, seg, other, volume, other_array)
    return mrml, volume, seg, target, other, existing, other_array


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_mask_lands_on_exactly_one_slice(scene, axis):
    mrml, volume, seg, target, other, existing, other_array = scene
    frame = SliceFrame.for_volume(volume, axis)
    writer = MaskedWriter(SegmentRegionIO(seg, volume))
    k = 11 if axis == "axial" else 70
    plane = np.zeros(frame.slice_shape, bool)
    plane[3:9, 10:30] = True
    slab = frame.volume_slab(k)
    extent = slab_extent(slab, frame.shape_kji)
    writer.set_mask(target, extent, frame.slice_to_slab(plane))
    expected = existing.copy()
    expected[slab] = frame.slice_to_slab(plane)
    result = _full(mrml, seg, target, volume)
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(frame.slice_of(result, k), plane)
    np.testing.assert_array_equal(_full(mrml, seg, other, volume), other_array)


@pytest.mark.parametrize("overwrite", [OVERWRITE_NONE, OVERWRITE_VISIBLE, OVERWRITE_ALL])
def test_other_segment_only_changes_when_settings_allow(scene, overwrite):
    mrml, volume, seg, target, other, existing, other_array = scene
    seg.GetDisplayNode().SetSegmentVisibility(other, False)  # hidden: "visible" overwrite must leave it alone
    frame = SliceFrame.for_volume(volume, "axial")
    writer = MaskedWriter(SegmentRegionIO(seg, volume), MaskSettings(overwrite=overwrite))
    plane = np.zeros(frame.slice_shape, bool)
    plane[30:80, 30:80] = True  # overlaps `other` on slice 12
    extent = slab_extent(frame.volume_slab(12), frame.shape_kji)
    writer.set_mask(target, extent, frame.slice_to_slab(plane))
    other_now = _full(mrml, seg, other, volume)
    target_now = _full(mrml, seg, target, volume)
    assert frame.slice_of(target_now, 12).sum() == plane.sum()
    overlap = frame.slice_to_slab(plane)[0] & other_array[12].astype(bool)
    if overwrite == OVERWRITE_ALL:
        assert other_now[12][overlap].sum() == 0
        np.testing.assert_array_equal(np.delete(other_now, 12, 0), np.delete(other_array, 12, 0))
    else:
        np.testing.assert_array_equal(other_now, other_array)


def test_mask_modes_and_intensity_range(scene):
    mrml, volume, seg, target, other, existing, other_array = scene
    frame = SliceFrame.for_volume(volume, "axial")
    extent = slab_extent(frame.volume_slab(12), frame.shape_kji)
    plane = np.zeros(frame.slice_shape, bool)
    plane[30:80, 30:80] = True
    desired = frame.slice_to_slab(plane)[0].astype(bool)
    inside_other = other_array[12].astype(bool)
    # outside all segments: the other segment's voxels are not editable
    writer = MaskedWriter(SegmentRegionIO(seg, volume), MaskSettings(mask_mode="outside_all"))
    writer.set_mask(target, extent, desired[None])
    np.testing.assert_array_equal(_full(mrml, seg, target, volume)[12].astype(bool), desired & ~inside_other)
    writer.undo()
    # inside one segment only, with an editable intensity range
    ct = mrml.slicer.util.arrayFromVolume(volume)[12]
    writer = MaskedWriter(SegmentRegionIO(seg, volume), MaskSettings(mask_mode="inside_single",
                                                                       mask_segment_id=other,
                                                                       intensity_range=(-200.0, 300.0)))
    writer.set_mask(target, extent, desired[None])
    expected = desired & inside_other & (ct >= -200) & (ct <= 300)
    assert expected.any() and (desired & inside_other & ~expected).any()  # the range really excludes voxels
    np.testing.assert_array_equal(_full(mrml, seg, target, volume)[12].astype(bool), expected)


def test_settings_follow_a_real_segment_editor_node(mrml):
    node = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    node.SetMaskMode(mrml.slicer.vtkMRMLSegmentationNode.EditAllowedOutsideVisibleSegments)
    node.SetOverwriteMode(mrml.slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments)
    node.SourceVolumeIntensityMaskOn()
    node.SetSourceVolumeIntensityMaskRange(-100, 50)
    settings = MaskSettings.from_segment_editor_node(node)
    assert settings == MaskSettings("outside_visible", None, OVERWRITE_VISIBLE, (-100.0, 50.0))
    assert MaskSettings.from_segment_editor_node(None) == MaskSettings()  # default: never touch other segments


def test_undo_restores_every_touched_segment_and_tags(scene):
    mrml, volume, seg, target, other, existing, other_array = scene
    frame = SliceFrame.for_volume(volume, "axial")
    saved = []
    writer = MaskedWriter(SegmentRegionIO(seg, volume), MaskSettings(overwrite=OVERWRITE_ALL),
                          undo_history=lambda node: (lambda: saved.append(node)))
    before_target, before_other = _full(mrml, seg, target, volume), _full(mrml, seg, other, volume)
    plane = np.ones(frame.slice_shape, bool)
    predictor = type("P", (), {"model_id": "litemedsam",
                               "weights": type("W", (), {"sha256": "ab" * 32})()})()
    tags = provenance_tags(predictor, [{"slice": 12, "points_ras": [[1, 2, 3]]}])
    writer.set_mask(target, slab_extent(frame.volume_slab(12), frame.shape_kji), frame.slice_to_slab(plane),
                    provenance=tags)
    assert saved == [seg]
    after = read_tags(seg.GetSegmentation(), target)
    assert after["SAMUNet.Model"] == "litemedsam" and after["SAMUNet.WeightsSHA256"] == "ab" * 32
    assert json.loads(after["SAMUNet.Prompts"])[0]["slice"] == 12
    assert "SAMUNetSlicer" in after["SAMUNet.SoftwareVersion"]
    assert _full(mrml, seg, other, volume)[12].sum() == 0  # overwritten, as the settings allow
    writer.undo()
    np.testing.assert_array_equal(_full(mrml, seg, target, volume), before_target)
    np.testing.assert_array_equal(_full(mrml, seg, other, volume), before_other)
    assert all(v is None for v in read_tags(seg.GetSegmentation(), target).values())
    assert writer.undo() is None


# -- the segmentation's reference geometry is kept, and written in ----------------------------------------------------
def _fine_grid(volume, factor: int = 3):
    """A reference grid oversampled `factor` x in i and j: fine voxel factor*i + factor//2 is centred on volume voxel
    i (an odd factor, so nearest-neighbour lookups between the grids are unambiguous). Returns (4x4, extent)."""
    import vtk

    from SAMUNetSlicerLib.geometry import vtk_matrix_to_numpy

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    m = vtk_matrix_to_numpy(matrix)
    fine = m.copy()
    fine[:3, :2] /= factor
    fine[:3, 3] -= (factor // 2) * (fine[:3, 0] + fine[:3, 1])
    dims = volume.GetImageData().GetDimensions()
    return fine, (0, dims[0] * factor - 1, 0, dims[1] * factor - 1, 0, dims[2] - 1)


def _oriented(mrml, matrix, extent, array=None):
    import vtk
    from vtk.util import numpy_support

    image = mrml.slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    vm = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vm.SetElement(r, c, float(matrix[r, c]))
    image.SetImageToWorldMatrix(vm)
    if array is not None:
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.astype(np.uint8).ravel()
    return image


def _internal(mrml, seg, sid, matrix, extent):
    """The segment's own labelmap over `extent` of the grid `matrix`; asserts it is stored in that grid."""
    from vtk.util import numpy_support

    s = mrml.slicer
    image = s.vtkOrientedImageData()
    s.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, sid, image, False)
    reference = _oriented(mrml, matrix, extent)
    assert s.vtkOrientedImageDataResample.DoGeometriesMatch(image, reference), "not stored in the reference grid"
    out = s.vtkOrientedImageData()
    s.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference, out)
    k, j, i = extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1
    return numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(k, j, i) > 0


def test_existing_reference_geometry_is_kept_and_written_in(mrml):
    """Bug 1: the reference geometry was looked up under a wrong name, so every write reset it to the volume's."""
    s = mrml.slicer
    volume = mrml.load_ct()
    fine, fine_extent = _fine_grid(volume)
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.CreateDefaultDisplayNodes()
    name = s.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert name == "Reference image geometry"
    geometry = s.vtkSegmentationConverter.SerializeImageGeometry(_oriented(mrml, fine, fine_extent))
    seg.GetSegmentation().SetConversionParameter(name, geometry)
    target = seg.GetSegmentation().AddEmptySegment("target", "target")
    # prior content drawn on the fine grid: a sub-voxel pattern (every third fine column, never a volume voxel
    # centre) on slice 12 and a block on slice 5
    prior = np.zeros((34, fine_extent[3] + 1, fine_extent[1] + 1), bool)
    prior[12, 60:90, 30:300:3] = True
    prior[5, 90:150, 90:150] = True
    assert s.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        _oriented(mrml, fine, fine_extent, prior), seg, target, s.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)

    frame = SliceFrame.for_volume(volume, "axial")
    writer = MaskedWriter(SegmentRegionIO(seg, volume))
    assert seg.GetSegmentation().GetConversionParameter(name) == geometry
    plane = np.zeros(frame.slice_shape, bool)
    plane[20:40, 10:50] = True  # the volume voxels i 10..49 (fine 30..149) of rows 20..39 (fine 60..119)
    writer.set_mask(target, slab_extent(frame.volume_slab(12), frame.shape_kji), frame.slice_to_slab(plane))

    assert seg.GetSegmentation().GetConversionParameter(name) == geometry  # kept
    after = _internal(mrml, seg, target, fine, fine_extent)  # and written in it
    written = frame.slice_to_slab(plane)[0].astype(bool).repeat(3, 0).repeat(3, 1)  # volume voxel -> its 3x3 fine
    expected = prior.copy()
    expected[12] |= written  # the sub-voxel pattern is 0 in the volume grid: where the plane is, voxels turn 1
    np.testing.assert_array_equal(after, expected)  # outside the plane the fine pattern survives, bit for bit
    np.testing.assert_array_equal(frame.slice_of(_full(mrml, seg, target, volume), 12), plane)
    writer.undo()
    np.testing.assert_array_equal(_internal(mrml, seg, target, fine, fine_extent), prior)
    assert seg.GetSegmentation().GetConversionParameter(name) == geometry


def test_reference_geometry_of_another_volume_is_kept(mrml):
    volume = mrml.load_ct()
    other = mrml.load_ct("other")
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag([-1.5, -1.5, 5.0])
    other.SetIJKToRASMatrix(mrml.slicer.util.vtkMatrixFromArray(matrix))
    seg, (target,) = mrml.add_segmentation(other, "target")  # reference geometry: the other volume's grid
    name = mrml.slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    geometry = seg.GetSegmentation().GetConversionParameter(name)
    frame = SliceFrame.for_volume(volume, "axial")
    plane = np.zeros(frame.slice_shape, bool)
    plane[30:80, 30:80] = True
    MaskedWriter(SegmentRegionIO(seg, volume)).set_mask(
        target, slab_extent(frame.volume_slab(12), frame.shape_kji), frame.slice_to_slab(plane))
    assert seg.GetSegmentation().GetConversionParameter(name) == geometry
    assert _full(mrml, seg, target, volume).sum() > 0


# -- Slicer's undo history: only the segmentation being written ----------------------------------------------------
def test_segmentation_history_of_our_segmentation_restores_every_segment(scene):
    """Bug 2a: the real vtkSegmentationHistory the Segment Editor uses gets one state per change; restoring it gives
    back exactly the previous voxels of every segment (the selected one and the one it overwrote)."""
    mrml, volume, seg, target, other, existing, other_array = scene
    history = mrml.slicer.vtkSegmentationHistory()
    history.SetSegmentation(seg.GetSegmentation())
    frame = SliceFrame.for_volume(volume, "axial")
    writer = MaskedWriter(SegmentRegionIO(seg, volume), MaskSettings(overwrite=OVERWRITE_ALL), history)
    plane = np.zeros(frame.slice_shape, bool)
    plane[30:100, 30:100] = True  # overlaps `target` (slices 5..8) and `other` (slices 10..13)
    slabs = {slab_extent(frame.volume_slab(k), frame.shape_kji): frame.slice_to_slab(plane) for k in range(6, 13)}
    writer.set_slices(target, slabs, "propagated")
    assert history.GetNumberOfStates() == 1
    assert not np.array_equal(_full(mrml, seg, other, volume), other_array)
    assert history.RestorePreviousState()
    np.testing.assert_array_equal(_full(mrml, seg, target, volume), existing)
    np.testing.assert_array_equal(_full(mrml, seg, other, volume), other_array)


def test_undo_history_of_another_segmentation_is_left_alone(scene):
    """Bug 2b: a history (or Segment Editor) tracking ANOTHER segmentation must not save states of our writes."""
    mrml, volume, seg, target, other, existing, other_array = scene
    elsewhere, _ = mrml.add_segmentation(volume, "unrelated")
    history = mrml.slicer.vtkSegmentationHistory()
    history.SetSegmentation(elsewhere.GetSegmentation())
    editor = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = mrml.slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(mrml.scene)
    logic.SetSegmentEditorNode(editor)
    logic.SetSegmentationNode(elsewhere)
    frame = SliceFrame.for_volume(volume, "axial")
    plane = np.ones(frame.slice_shape, bool)
    extent = slab_extent(frame.volume_slab(12), frame.shape_kji)
    # the forms a caller may pass: the history, the editor logic, its bound saveStateForUndo (what the widget passed)
    for source in (history, logic, logic.SaveStateForUndo):
        writer = MaskedWriter(SegmentRegionIO(seg, volume), undo_history=source)
        assert writer.save_state_for_undo is None
        writer.set_mask(target, extent, frame.slice_to_slab(plane))
        writer.undo()
    assert history.GetNumberOfStates() == 0 and not logic.CanUndo()
    # once the editor edits our segmentation, its history gets our change
    logic.SetSegmentationNode(seg)
    writer = MaskedWriter(SegmentRegionIO(seg, volume), undo_history=logic.SaveStateForUndo)
    writer.set_mask(target, extent, frame.slice_to_slab(plane))
    assert logic.CanUndo()
    logic.Undo()
    np.testing.assert_array_equal(_full(mrml, seg, target, volume), existing)


def test_own_undo_is_bit_exact_with_prior_content_and_overwrite(scene):
    """Our UndoRecord restores exactly the previous voxels: the written segment had content on the written slices
    and on others, and another segment it overlapped was overwritten."""
    mrml, volume, seg, target, other, existing, other_array = scene
    frame = SliceFrame.for_volume(volume, "axial")
    writer = MaskedWriter(SegmentRegionIO(seg, volume), MaskSettings(overwrite=OVERWRITE_ALL))
    planes = {}
    rng = np.random.default_rng(0)
    for k in (7, 8, 9, 11, 12):  # 7, 8: prior target content; 11, 12: other's; 10 between is not written
        plane = np.zeros(frame.slice_shape, bool)
        plane[30 + k:70 + k, 35:95] = rng.random((40, 60)) > 0.3
        planes[slab_extent(frame.volume_slab(k), frame.shape_kji)] = frame.slice_to_slab(plane)
    record = writer.set_slices(target, planes, "several slices")
    assert {sid for sid, _, _ in record.regions} == {target, other}
    now = _full(mrml, seg, target, volume)
    assert not np.array_equal(now, existing)
    np.testing.assert_array_equal(now[10], existing[10])  # between the written slices nothing changed
    np.testing.assert_array_equal(_full(mrml, seg, other, volume)[10], other_array[10])
    writer.undo()
    np.testing.assert_array_equal(_full(mrml, seg, target, volume), existing)
    np.testing.assert_array_equal(_full(mrml, seg, other, volume), other_array)


# -- one change, one labelmap ------------------------------------------------------------------------------------
def _count_writes(mrml, seg) -> list:
    events = []
    seg.GetSegmentation().AddObserver(mrml.slicer.vtkSegmentation.SourceRepresentationModified,
                                      lambda caller, event: events.append(event))
    return events


def test_ten_slices_are_one_slicer_write_equal_to_slice_by_slice(mrml):
    """Bug 3: a propagated result is ONE SetBinaryLabelmapToSegment (one undo state, one record), not one per slice,
    and gives the same voxels as writing slice by slice."""
    volume = mrml.load_ct()
    frame = SliceFrame.for_volume(volume, "sagittal")
    one, (one_id,) = mrml.add_segmentation(volume, "lung")
    many, (many_id,) = mrml.add_segmentation(volume, "lung")
    for seg, sid in ((one, one_id), (many, many_id)):
        prior = np.zeros((34, 128, 128), np.uint8)
        prior[3:30, 20:60, 40:90] = 1  # content on the written slices and beyond
        _put(mrml, seg, sid, volume, prior)
    rng = np.random.default_rng(1)
    slabs = {}
    for k in range(50, 60):
        plane = rng.random(frame.slice_shape) > 0.5
        slabs[slab_extent(frame.volume_slab(k), frame.shape_kji)] = frame.slice_to_slab(plane)
    history = mrml.slicer.vtkSegmentationHistory()
    history.SetSegmentation(one.GetSegmentation())
    writer = MaskedWriter(SegmentRegionIO(one, volume), undo_history=history)
    events = _count_writes(mrml, one)
    writer.set_slices(one_id, slabs, "propagated")
    assert len(events) == 1 and history.GetNumberOfStates() == 1 and len(writer.undo_stack) == 1
    slice_writer = MaskedWriter(SegmentRegionIO(many, volume))
    events = _count_writes(mrml, many)
    for extent, region in slabs.items():
        slice_writer.set_mask(many_id, extent, region)
    assert len(events) == 10
    np.testing.assert_array_equal(_full(mrml, one, one_id, volume), _full(mrml, many, many_id, volume))


def test_a_save_function_that_cannot_tell_its_segmentation_is_refused(scene):
    mrml, volume, seg, target, other, existing, other_array = scene
    with pytest.raises(TypeError, match="cannot tell which one"):
        MaskedWriter(SegmentRegionIO(seg, volume), undo_history=lambda: None)


def test_a_segment_added_to_a_shared_layer_reads_only_its_own_voxels(mrml):
    """Slicer puts a new segment in the existing labelmap layer (shared labelmaps): reading it must give its own
    voxels, not every segment of the layer (the replay test found the first segment leaking into each later one)."""
    volume = mrml.load_ct()
    seg, (first,) = mrml.add_segmentation(volume, "first")
    io = SegmentRegionIO(seg, volume)
    full = io.full_extent
    region = np.zeros((full[5] + 1, full[3] + 1, full[1] + 1), np.uint8)
    region[20, 10:20, 10:20] = 1
    io.write(first, full, region)
    second = seg.GetSegmentation().AddEmptySegment("second", "second")
    assert seg.GetSegmentation().GetNumberOfLayers() == 1  # really shared
    assert io.read(second, full).sum() == 0
    assert np.array_equal(io.read(first, full), region)
    io.write(second, full, np.roll(region, 5, axis=2))
    assert np.array_equal(io.read(first, full), region)
    assert np.array_equal(io.read(second, full), np.roll(region, 5, axis=2))
