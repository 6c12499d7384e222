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
                          save_state_for_undo=lambda: saved.append(True))
    before_target, before_other = _full(mrml, seg, target, volume), _full(mrml, seg, other, volume)
    plane = np.ones(frame.slice_shape, bool)
    predictor = type("P", (), {"model_id": "litemedsam",
                               "weights": type("W", (), {"sha256": "ab" * 32})()})()
    tags = provenance_tags(predictor, [{"slice": 12, "points_ras": [[1, 2, 3]]}])
    writer.set_mask(target, slab_extent(frame.volume_slab(12), frame.shape_kji), frame.slice_to_slab(plane),
                    provenance=tags)
    assert saved == [True]
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
