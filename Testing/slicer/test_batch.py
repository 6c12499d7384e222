"""Batch: one set of RAS prompts applied to several loaded volumes through the engine's prompt policy; MRML is touched
on the main thread only; each volume's result is one Slicer write with provenance; a bad volume does not stop others."""

from __future__ import annotations

import json
import time

import numpy as np
from conftest import MrmlThreadWatch, reference_labels_kji

from SAMUNetSlicerLib.batch import BatchRunner, make_targets, prompt_file
from SAMUNetSlicerLib.geometry import SliceFrame
from SAMUNetSlicerLib.prompts import WorldPrompts, read_prompts
from SAMUNetSlicerLib.writer import read_tags

K = 12
LUNG_WINDOW = (1500, -600)  # window, level


def _lung_window(*volumes) -> None:
    for volume in volumes:
        volume.GetDisplayNode().AutoWindowLevelOff()
        volume.GetDisplayNode().SetWindowLevel(*LUNG_WINDOW)


def _roi(mrml, frame, slices, plane):
    """An ROI around the mask `plane` (HxW) spanning the displayed slices `slices` (one slice: a thin ROI, 1 mm
    thick, as drawn in a slice view)."""
    rows, cols = np.nonzero(plane)
    lo = frame.display_to_world([[slices[0], rows.min(), cols.min()]])[0]
    hi = frame.display_to_world([[slices[-1], rows.max(), cols.max()]])[0]
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenterWorld(*(lo + hi) / 2)
    size = np.abs(hi - lo)
    size[2] = max(size[2], 1.0)
    roi.SetSizeWorld(*size)
    return roi


def _written(mrml, target):
    return mrml.slicer.util.arrayFromSegmentBinaryLabelmap(target.segmentation_node, target.segment_id,
                                                           target.volume_node)


def _dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_prompt_file_from_markups():
    corners = np.array([[x, y, z] for x in (-10.0, 20.0) for y in (5.0, 7.0) for z in (-3.0, 1.0)])
    prompts = WorldPrompts(np.array([[1.0, 2.0, 3.0]]), np.array([[4.0, 5.0, 6.0]]), corners)
    assert prompt_file(prompts, "coronal", "liver", True) == {
        "coordinates": "RAS", "axis": "coronal",
        "segments": [{"name": "liver", "propagate": True,
                      "points": [{"position": [1.0, 2.0, 3.0], "positive": True},
                                 {"position": [4.0, 5.0, 6.0], "positive": False}],
                      "boxes": [{"corners": [[-10.0, 5.0, -3.0], [20.0, 7.0, 1.0]]}]}]}


def test_batch_over_two_volumes(mrml, predictor, embedding_cache):
    """A thin ROI drawn on slice K is a 2D box there (the engine's rule), on both volumes, stored differently."""
    ct = mrml.load_ct()
    array = mrml.slicer.util.arrayFromVolume(ct)
    frame = SliceFrame.for_volume(ct, "axial")
    # the same anatomy stored with the i axis reversed: different voxel order, same RAS positions
    flipped_matrix = frame.ijk_to_world.copy()
    flipped_matrix[:3, 3] = (frame.ijk_to_world @ np.r_[array.shape[2] - 1, 0, 0, 1.0])[:3]
    flipped_matrix[:3, 0] *= -1
    flipped = mrml.add_volume(array[:, :, ::-1].copy(), flipped_matrix, "ct flipped")
    _lung_window(ct, flipped)
    reference = reference_labels_kji() == 5
    roi = _roi(mrml, frame, [K], frame.slice_of(reference, K))

    targets = make_targets(mrml.scene, [ct, flipped], "right lung")
    assert [t.volume_name for t in targets] == ["ct", "ct flipped"]
    runner = BatchRunner(targets, predictor, read_prompts(None, None, roi), cache=embedding_cache)
    assert runner.start().result(timeout=300) == 2
    assert runner.progress()[:2] == (2, 2)
    results = runner.apply_ready()
    assert [r.error for r in results] == [None, None]
    for target, expected in zip(targets, (reference, reference[:, :, ::-1]), strict=True):
        written = _written(mrml, target)
        assert [k for k in range(written.shape[0]) if written[k].any()] == [K]
        assert _dice(written[K], expected[K]) > 0.8
        tags = read_tags(target.segmentation_node.GetSegmentation(), target.segment_id)
        assert tags["SAMUNet.Model"] == "litemedsam"
        entry = json.loads(tags["SAMUNet.Prompts"])[-1]
        assert entry["source"] == "batch" and entry["slices"] == [K] and len(entry["boxes"]) == 1
    first, second = (_written(mrml, t) for t in targets)
    np.testing.assert_array_equal(first, second[:, :, ::-1])  # same anatomy, same answer


def test_batch_touches_mrml_only_on_the_main_thread(mrml, predictor, embedding_cache):
    """Every MRML call (nodes, scene, segmentations, segments) is made on the main thread: a profiler on every thread
    the batch starts records each C call whose object is an MRML/segmentation object; none may come from another
    thread. Each volume's 3D box result is one Slicer write."""
    import slicer

    ct = mrml.load_ct("first")
    again = mrml.load_ct("second")
    _lung_window(ct, again)
    frame = SliceFrame.for_volume(ct, "axial")
    reference = reference_labels_kji() == 5
    roi = _roi(mrml, frame, [K - 1, K + 1], frame.slice_of(reference, K))  # corners on slices 11 and 13: a 3D box
    targets = make_targets(mrml.scene, [ct, again], "right lung")
    writes = []
    for target in targets:
        target.segmentation_node.GetSegmentation().AddObserver(
            slicer.vtkSegmentation.SourceRepresentationModified, lambda caller, event: writes.append(caller))
    runner = BatchRunner(targets, predictor, read_prompts(None, None, roi), cache=embedding_cache)
    with MrmlThreadWatch() as watch:
        future = runner.start()
        results = []
        while not future.done():  # what the widget's timer does
            results += runner.apply_ready()
            time.sleep(0.05)
        assert future.result() == 2
        results += runner.apply_ready()
    assert watch.c_calls > 0, "the profiler saw no calls on the batch threads"
    assert watch.off_main == [], f"MRML called off the main thread: {sorted(set(watch.off_main))}"
    assert [r.error for r in results] == [None, None]
    assert len(writes) == 2  # one labelmap per volume
    for target in targets:
        written = _written(mrml, target)
        assert [k for k in range(written.shape[0]) if written[k].any()] == [K - 1, K, K + 1]
        assert _dice(written[K], reference[K]) > 0.8


def test_volume_whose_prompts_fall_outside_is_an_error_others_go_on(mrml, predictor, embedding_cache):
    ct = mrml.load_ct()
    frame = SliceFrame.for_volume(ct, "axial")
    elsewhere_matrix = frame.ijk_to_world.copy()
    elsewhere_matrix[:3, 3] += [0.0, 0.0, 2000.0]  # the same voxels 2 m higher: the prompts miss it
    elsewhere = mrml.add_volume(mrml.slicer.util.arrayFromVolume(ct).copy(), elsewhere_matrix, "elsewhere")
    _lung_window(ct, elsewhere)
    reference = reference_labels_kji() == 5
    roi = _roi(mrml, frame, [K], frame.slice_of(reference, K))
    hidden = mrml.add_volume(mrml.slicer.util.arrayFromVolume(ct).copy(), frame.ijk_to_world, "no display")
    hidden.SetAndObserveDisplayNodeID(None)  # no window to show it with
    targets = make_targets(mrml.scene, [elsewhere, hidden, ct], "right lung")
    runner = BatchRunner(targets, predictor, read_prompts(None, None, roi), cache=embedding_cache)
    assert runner.start().result(timeout=300) == 3
    outside, no_display, good = runner.apply_ready()
    assert "outside the image" in outside.error and not _written(mrml, targets[0]).any()
    assert "display node" in no_display.error and not _written(mrml, targets[1]).any()
    assert good.error is None and _dice(_written(mrml, targets[2])[K], reference[K]) > 0.8


def test_batch_propagation_is_one_write(mrml, predictor, embedding_cache):
    """With "propagate", the engine carries the box's slice through the volume; the result is ONE Slicer write."""
    ct = mrml.load_ct()
    full = SliceFrame.for_volume(ct, "axial")
    matrix = full.ijk_to_world.copy()
    matrix[:3, 3] = (full.ijk_to_world @ np.r_[0, 0, K - 3, 1.0])[:3]  # slices K-3..K+3 only: a short walk
    crop = mrml.add_volume(mrml.slicer.util.arrayFromVolume(ct)[K - 3:K + 4].copy(), matrix, "crop")
    _lung_window(crop)
    frame = SliceFrame.for_volume(crop, "axial")
    reference = (reference_labels_kji() == 5)[K - 3:K + 4]
    roi = _roi(mrml, frame, [3], frame.slice_of(reference, 3))
    targets = make_targets(mrml.scene, [crop], "right lung")
    writes = []
    targets[0].segmentation_node.GetSegmentation().AddObserver(
        mrml.slicer.vtkSegmentation.SourceRepresentationModified, lambda caller, event: writes.append(event))
    runner = BatchRunner(targets, predictor, read_prompts(None, None, roi), propagate=True, cache=embedding_cache)
    assert runner.start().result(timeout=600) == 1
    (result,) = runner.apply_ready()
    assert result.error is None and len(writes) == 1 and len(result.record.regions) == 1
    written = _written(mrml, targets[0])
    touched = [k for k in range(written.shape[0]) if written[k].any()]
    assert 3 in touched and len(touched) > 1 and touched == list(range(touched[0], touched[-1] + 1))
    assert sorted(k for k, m in result.masks.items() if m.any()) == touched
    assert _dice(written[3], reference[3]) > 0.8


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
