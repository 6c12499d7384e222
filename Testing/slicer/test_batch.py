"""Batch: one RAS box prompt applied to two loaded volumes stored differently; progress reported; results written."""

from __future__ import annotations

import numpy as np
from conftest import reference_labels_kji

from SAMUNetSlicerLib.batch import BatchRunner, make_targets
from SAMUNetSlicerLib.geometry import SliceFrame
from SAMUNetSlicerLib.prompts import read_prompts
from SAMUNetSlicerLib.writer import read_tags

K = 12


def test_batch_over_two_volumes(mrml, predictor, embedding_cache):
    ct = mrml.load_ct()
    array = mrml.slicer.util.arrayFromVolume(ct)
    frame = SliceFrame.for_volume(ct, "axial")
    # the same anatomy stored with the i axis reversed: different voxels order, same RAS positions
    flipped_matrix = frame.ijk_to_world.copy()
    flipped_matrix[:3, 3] = (frame.ijk_to_world @ np.r_[array.shape[2] - 1, 0, 0, 1.0])[:3]
    flipped_matrix[:3, 0] *= -1
    flipped = mrml.add_volume(array[:, :, ::-1].copy(), flipped_matrix, "ct flipped")
    for volume in (ct, flipped):
        volume.GetDisplayNode().AutoWindowLevelOff()
        volume.GetDisplayNode().SetWindowLevel(1500, -600)
    reference = reference_labels_kji() == 5
    rows, cols = np.nonzero(frame.slice_of(reference, K))
    corners = frame.display_to_world([[K, rows.min(), cols.min()], [K, rows.max(), cols.max()]])
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenterWorld(*corners.mean(0))
    roi.SetSizeWorld(*(np.abs(corners[1] - corners[0]) + [0, 0, 1.0]))

    targets = make_targets(mrml.scene, [ct, flipped], "right lung")
    runner = BatchRunner(targets, predictor, read_prompts(None, None, roi), cache=embedding_cache)
    assert runner.start().result(timeout=300) == 2
    assert runner.progress()[:2] == (2, 2)
    results = runner.apply_ready()
    assert [r.error for r in results] == [None, None]
    for target, expected in zip(targets, (reference, reference[:, :, ::-1]), strict=True):
        written = mrml.slicer.util.arrayFromSegmentBinaryLabelmap(target.segmentation_node, target.segment_id,
                                                                  target.volume_node)
        assert [k for k in range(written.shape[0]) if written[k].any()] == [K]
        dice = 2 * (written[K].astype(bool) & expected[K]).sum() / (written[K].sum() + expected[K].sum())
        assert dice > 0.8
        tags = read_tags(target.segmentation_node.GetSegmentation(), target.segment_id)
        assert tags["SAMUNet.Model"] == "litemedsam" and "box_ras" in tags["SAMUNet.Prompts"]
    first, second = (mrml.slicer.util.arrayFromSegmentBinaryLabelmap(t.segmentation_node, t.segment_id,
                                                                     t.volume_node) for t in targets)
    np.testing.assert_array_equal(first, second[:, :, ::-1])  # same anatomy, same answer


def test_batch_cancel_stops_before_next_volume(mrml, predictor, embedding_cache):
    ct = mrml.load_ct()
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenterWorld(0, 0, -220)
    roi.SetSizeWorld(60, 60, 1)
    runner = BatchRunner(make_targets(mrml.scene, [ct, ct], "x"), predictor, read_prompts(None, None, roi),
                         cache=embedding_cache)
    runner.cancel()
    assert runner.start().result(timeout=60) == 0
    assert runner.apply_ready() == []
