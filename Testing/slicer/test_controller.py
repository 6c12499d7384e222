"""The interaction controller with real MRML (slicer-core), the default model and the chest CT: prompts placed in the
Red, Yellow and Green slice views the way Slicer places them, each checked against the engine's policy called by hand.

Every test here guards a bug the module had: clicks in Yellow/Green decoded on an axial slice, Shift-click moving
points until none was positive, a box in progress raising, results of an earlier Start or a closed scene written,
undo of the wrong segmentation, masking ignored.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import vtk
from conftest import MrmlThreadWatch, raw_voxels, reference_labels_kji

from samunet_core import interaction
from samunet_core.interaction import Click, Mode, SlicePrompts
from samunet_core.transforms import window_to_uint8
from SAMUNetSlicerLib.controller import InteractionController
from SAMUNetSlicerLib.masking import MaskSettings
from SAMUNetSlicerLib.replay import ReplayScene, place_box, place_point, view_axes

LUNG = (-1350.0, 150.0)
K = 12  # axial slice where the right lung is largest


class Direct:
    """The engine's policy on one displayed slice, called by hand (what the controller must reproduce)."""

    def __init__(self, predictor, frame, array) -> None:
        self.predictor, self.frame, self.array = predictor, frame, array

    def predict(self, k, **prompts):
        image = window_to_uint8(self.frame.slice_of(self.array, k), *LUNG)
        return self.predictor.predict(self.predictor.encode(image), **prompts)


@pytest.fixture
def scene():
    mrml = ReplayScene()
    yield mrml
    mrml.scene.Clear(1)


@pytest.fixture
def ct(scene):
    from conftest import ct_path

    volume = scene.load_volume(ct_path(), LUNG)
    segmentation = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.CreateDefaultDisplayNodes()
    lung = segmentation.GetSegmentation().AddEmptySegment("lung", "lung")
    other = segmentation.GetSegmentation().AddEmptySegment("other", "other")
    return volume, segmentation, lung, other


@pytest.fixture
def controller(scene, default_predictor, embedding_cache):
    c = InteractionController(scene.scene, default_predictor, cache=embedding_cache, prefetch_radius=0)
    yield c
    c.close()


def segment_array(segmentation, segment_id, volume) -> np.ndarray:
    import slicer

    return np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)) > 0


def lung_box(frame, k: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """RAS corners of the right lung's box on displayed slice k, and the box in slice pixels."""
    plane = frame.slice_of(reference_labels_kji() == 5, k)
    rows, cols = np.nonzero(plane)
    box = (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max()))
    lo, hi = frame.display_to_world([[k, box[1], box[0]], [k, box[3], box[2]]])
    return lo, hi, box


def settle(pending, timeout: float = 120.0) -> None:
    """Wait until every future is finished or cancelled (futures.wait misses a plain cancel())."""
    deadline = time.monotonic() + timeout
    while not all(f.done() for f in pending):
        assert time.monotonic() < deadline, "the model did not answer"
        time.sleep(0.02)


def click(scene, controller, view: str, ras, tool: str = "positive") -> None:
    scene.show_slice(view, ras)
    scene.under_mouse(view, ras)
    place_point(controller.set_tool(tool), ras)


def inside_point(plane: np.ndarray) -> tuple[int, int]:
    """(row, col) inside a mask: the median row, and the median column of the mask on that row."""
    rows, cols = np.nonzero(plane)
    row = int(np.median(rows))
    return row, int(np.median(cols[rows == row]))


def largest_slice(frame, reference: np.ndarray) -> int:
    """The displayed slice of `frame` where `reference` (KJI) has the most voxels."""
    return int(np.argmax(frame.frame.volume_to_slices(reference).reshape(frame.n_slices, -1).sum(1)))


@pytest.mark.parametrize("view, axis", [("Red", "axial"), ("Yellow", "sagittal"), ("Green", "coronal")])
def test_a_click_is_decoded_on_the_slice_of_the_view_it_was_placed_in(scene, ct, controller, default_predictor,
                                                                         view, axis):
    volume, segmentation, lung, _ = ct
    controller.start(volume, segmentation, lung, window=LUNG)
    frame = controller.frame(axis)
    reference = reference_labels_kji() == 5
    k = largest_slice(frame, reference)
    row, col = inside_point(frame.slice_of(reference, k))
    ras = frame.display_to_world([[k, row, col]])[0]
    click(scene, controller, view, ras)
    controller.wait()
    assert controller.errors == []
    written = segment_array(segmentation, lung, volume)
    expected = interaction.decode_slice(Direct(default_predictor, frame, raw_voxels(controller)), k,
                                        SlicePrompts(clicks=(Click(col, row),))).mask
    assert expected.any()
    assert np.array_equal(frame.slice_of(written, k), expected)
    assert written.sum() == expected.sum()  # nothing written outside that one slice of that axis


def test_an_oblique_view_is_refused_with_the_way_out(scene, ct, controller):
    volume, segmentation, lung, _ = ct
    controller.start(volume, segmentation, lung, window=LUNG)
    red = scene.views["Red"]
    red.SetSliceToRASByNTP(0.0, 0.3, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -300.0, 0)
    ras = controller.frame("axial").display_to_world([[K, 64, 40]])[0]
    red.JumpSliceByOffsetting(*ras)
    scene.under_mouse("Red", ras)
    place_point(controller.set_tool("positive"), ras)
    controller.wait()
    assert len(controller.errors) == 1
    assert "oblique" in controller.errors[0] and "Rotate to volume plane" in controller.errors[0]
    assert not segment_array(segmentation, lung, volume).any()


def test_an_oblique_volume_is_segmented_in_a_view_rotated_to_its_planes(scene, controller, default_predictor):
    from conftest import ct_path

    volume = scene.load_volume(ct_path(), LUNG)
    tilt = vtk.vtkTransform()
    tilt.RotateX(20.0)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    vtk.vtkMatrix4x4.Multiply4x4(tilt.GetMatrix(), matrix, matrix)
    volume.SetIJKToRASMatrix(matrix)
    segmentation = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment = segmentation.GetSegmentation().AddEmptySegment("lung")
    controller.start(volume, segmentation, segment, window=LUNG)
    frame = controller.frame("axial")
    lo, hi, box = lung_box(frame, K)
    red = scene.views["Red"]
    red.RotateToVolumePlane(volume)
    centre = (lo + hi) / 2
    scene.show_slice("Red", centre)
    scene.under_mouse("Red", centre)
    place_box(controller.set_tool("box"), lo, hi, normal=view_axes(red)[:, 2], axes=view_axes(red))
    controller.wait()
    assert controller.errors == []
    written = segment_array(segmentation, segment, volume)
    expected = interaction.decode_slice(Direct(default_predictor, frame, raw_voxels(controller)), K,
                                        SlicePrompts(boxes=(box,))).mask
    assert np.array_equal(frame.slice_of(written, K), expected)
    assert written.sum() == expected.sum() > 100


def test_shift_click_makes_only_that_point_negative(scene, ct, controller):
    volume, segmentation, lung, _ = ct
    shift = {"held": False}
    controller.negative_modifier = lambda: shift["held"]
    controller.start(volume, segmentation, lung, window=LUNG)
    frame = controller.frame("axial")
    positions = frame.display_to_world([[K, 60, 35], [K, 70, 40], [K, 64, 80]])
    click(scene, controller, "Red", positions[0])
    click(scene, controller, "Red", positions[1])
    shift["held"] = True
    click(scene, controller, "Red", positions[2])
    shift["held"] = False
    controller.wait()
    assert controller.positive_node.GetNumberOfControlPoints() == 2
    assert controller.negative_node.GetNumberOfControlPoints() == 1
    negative = np.zeros(3)
    controller.negative_node.GetNthControlPointPositionWorld(0, negative)
    assert np.allclose(negative, positions[2])
    prompts = controller.slice_prompts("axial", K)
    assert [c.positive for c in prompts.clicks] == [True, True, False]  # placement order kept


def test_a_box_still_being_drawn_is_ignored_quietly(scene, ct, controller):
    """After the first click of a box the ROI is a defined point with no size: no request, no error (the whole
    two-click sequence with Slicer's own ROI widget is in test_controller_mouse.py)."""
    volume, segmentation, lung, _ = ct
    controller.start(volume, segmentation, lung, window=LUNG)
    lo, hi, _ = lung_box(controller.frame("axial"), K)
    scene.show_slice("Red", lo)
    roi = controller.set_tool("box")
    roi.SetSizeWorld(0.0, 0.0, 0.0)
    roi.AddControlPointWorld(vtk.vtkVector3d(*lo))  # click 1: a corner, no size
    assert not controller.busy and controller.errors == [] and not controller._slices
    modifying = roi.StartModify()  # click 2
    roi.SetSizeWorld(*np.abs(hi - lo) + [0, 0, 30.0])
    roi.SetNthControlPointPositionWorld(0, vtk.vtkVector3d(*((lo + hi) / 2)))
    roi.EndModify(modifying)
    assert controller.busy
    controller.wait()
    assert controller.errors == []
    written = segment_array(segmentation, lung, volume)
    frame = controller.frame("axial")
    assert written.sum() == frame.slice_of(written, K).sum() > 100  # a 2D box on the slice it was drawn on


def test_add_and_remove_honour_the_segment_editor_masking(scene, ct, controller, default_predictor):
    volume, segmentation, lung, other = ct
    import slicer

    controller.settings = MaskSettings(mask_mode="outside_all", overwrite="OverwriteNone")
    controller.start(volume, segmentation, lung, window=LUNG, mode=Mode.ADD)
    frame = controller.frame("axial")
    lo, hi, box = lung_box(frame, K)
    other_region = np.zeros(segment_array(segmentation, other, volume).shape, np.uint8)
    plane = np.zeros(frame.slice_shape, bool)
    plane[:, : int((box[0] + box[2]) / 2)] = True  # "other" claims the left half of the slice
    other_region[frame.volume_slab(K)] = frame.slice_to_slab(plane)
    slicer.util.updateSegmentBinaryLabelmapFromArray(other_region, segmentation, other, volume)
    controller.start(volume, segmentation, lung, window=LUNG, mode=Mode.ADD)
    scene.show_slice("Red", (lo + hi) / 2)
    place_box(controller.set_tool("box"), lo, hi)
    controller.wait()
    written = frame.slice_of(segment_array(segmentation, lung, volume), K)
    answer = interaction.decode_slice(Direct(default_predictor, frame, raw_voxels(controller)), K,
                                      SlicePrompts(boxes=(box,)), existing=np.zeros_like(plane), mode=Mode.ADD).mask
    assert np.array_equal(written, answer & ~plane)  # nothing inside the other segment
    assert np.array_equal(frame.slice_of(segment_array(segmentation, other, volume), K), plane)
    controller.accept()
    # remove: the same box now marks what to take away
    controller.set_mode(Mode.REMOVE)
    place_box(controller.set_tool("box"), lo, hi)
    controller.wait()
    assert not segment_array(segmentation, lung, volume).any()  # the same box took away all it had added
    assert np.array_equal(frame.slice_of(segment_array(segmentation, other, volume), K), plane)


def test_undo_restores_exactly_the_previous_voxels(scene, ct, controller):
    import slicer

    volume, segmentation, lung, other = ct
    rng = np.random.default_rng(0)
    before = (rng.random(segment_array(segmentation, lung, volume).shape) > 0.7).astype(np.uint8)
    slicer.util.updateSegmentBinaryLabelmapFromArray(before, segmentation, lung, volume)
    controller.start(volume, segmentation, lung, window=LUNG)
    lo, hi, _ = lung_box(controller.frame("axial"), K)
    scene.show_slice("Red", (lo + hi) / 2)
    place_box(controller.set_tool("box"), lo, hi)
    controller.accept()
    assert not np.array_equal(segment_array(segmentation, lung, volume), before > 0)
    controller.undo()
    assert np.array_equal(segment_array(segmentation, lung, volume), before > 0)


def test_a_result_of_an_earlier_start_or_a_closed_scene_is_not_written(scene, ct, controller):
    import slicer

    volume, segmentation, lung, _ = ct
    controller.start(volume, segmentation, lung, window=LUNG)
    lo, hi, _ = lung_box(controller.frame("axial"), K + 3)  # a slice no other test encoded: the result is pending
    scene.show_slice("Red", (lo + hi) / 2)
    place_box(controller.set_tool("box"), lo, hi)
    pending = [j.running for j in controller._jobs.values() if j.running is not None]
    assert pending and not pending[0].done()
    controller.start(volume, segmentation, lung, window=LUNG)  # Start again before the answer
    settle(pending)
    controller.poll()
    assert not segment_array(segmentation, lung, volume).any()

    scene.show_slice("Red", (lo + hi) / 2 + [0, 0, 10.0])
    place_box(controller.set_tool("box"), lo + [0, 0, 10.0], hi + [0, 0, 10.0])
    pending = [j.running for j in controller._jobs.values() if j.running is not None]
    assert pending and not pending[0].done()
    writes = []
    segmentation.GetSegmentation().AddObserver(slicer.vtkSegmentation.SourceRepresentationModified,
                                               lambda *_: writes.append(1))
    scene.scene.Clear(0)  # File > Close scene while the model works
    assert not controller.started
    settle(pending)
    assert controller.poll() == 0
    assert writes == []


def test_segment_editor_history_of_another_segmentation_is_left_alone(scene, ct, controller):
    import slicer

    volume, segmentation, lung, _ = ct
    elsewhere = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    histories = {}
    for node in (segmentation, elsewhere):
        history = slicer.vtkSegmentationHistory()
        history.SetSegmentation(node.GetSegmentation())
        histories[node.GetID()] = history
    controller.undo_history = lambda node: histories[node.GetID()].SaveState
    controller.start(volume, segmentation, lung, window=LUNG)
    lo, hi, _ = lung_box(controller.frame("axial"), K)
    scene.show_slice("Red", (lo + hi) / 2)
    place_box(controller.set_tool("box"), lo, hi)
    controller.accept()
    assert histories[elsewhere.GetID()].GetNumberOfStates() == 0
    assert histories[segmentation.GetID()].GetNumberOfStates() == 1
    assert segment_array(segmentation, lung, volume).any()
    histories[segmentation.GetID()].RestorePreviousState()  # the Segment Editor's Undo
    assert not segment_array(segmentation, lung, volume).any()


def test_batch_applies_the_prompts_as_the_controller_placed_them(scene, ct, controller, default_predictor,
                                                                  embedding_cache):
    """A box drawn in a view has a depth Slicer chose (its shorter side): the controller reads it as a 2D box, and
    Batch, given the controller's prompts, does the same on every volume (the old batch made it a 3D box)."""
    from SAMUNetSlicerLib.batch import BatchRunner, make_targets

    volume, segmentation, lung, _ = ct
    controller.start(volume, segmentation, lung, window=LUNG)
    lo, hi, _ = lung_box(controller.frame("axial"), K)
    scene.show_slice("Red", (lo + hi) / 2)
    place_box(controller.set_tool("box"), lo, hi, normal=view_axes(scene.views["Red"])[:, 2])
    controller.wait()
    here = segment_array(segmentation, lung, volume)
    targets = make_targets(scene.scene, [volume], "lung")
    runner = BatchRunner(targets, default_predictor, controller.prompt_file("lung"), cache=embedding_cache)
    runner.start().result(timeout=300)
    (result,) = runner.apply_ready()
    assert result.error is None
    batch = segment_array(targets[0].segmentation_node, targets[0].segment_id, volume)
    assert batch.any() and np.array_equal(batch, here)  # one slice, the same voxels as the interactive result


def test_propagation_is_one_undo_step_after_the_prompted_slice(scene, ct, controller):
    volume, segmentation, lung, _ = ct
    controller.start(volume, segmentation, lung, window=LUNG)
    lo, hi, _ = lung_box(controller.frame("axial"), K)
    scene.show_slice("Red", (lo + hi) / 2)
    place_box(controller.set_tool("box"), lo, hi)
    controller.wait()
    seeded = segment_array(segmentation, lung, volume)
    controller.propagate("up")
    controller.wait()
    carried = segment_array(segmentation, lung, volume)
    frame = controller.frame("axial")
    slices = [k for k in range(frame.n_slices) if frame.slice_of(carried, k).any()]
    assert min(slices) == K and len(slices) > 1  # "up": only slices above the prompted one
    controller.undo()
    assert np.array_equal(segment_array(segmentation, lung, volume), seeded)
    controller.undo()
    assert not segment_array(segmentation, lung, volume).any()


def test_the_model_side_never_touches_mrml(scene, ct, controller):
    """Clicks, a box and a propagation: every MRML call happens on the main thread (the session worker gets numpy)."""
    volume, segmentation, lung, _ = ct
    with MrmlThreadWatch() as watch:
        controller.start(volume, segmentation, lung, window=LUNG)  # its session worker starts under the watch
        lo, hi, _ = lung_box(controller.frame("axial"), K)
        scene.show_slice("Red", (lo + hi) / 2)
        place_box(controller.set_tool("box"), lo, hi)
        click(scene, controller, "Red", controller.frame("axial").display_to_world([[K, 70, 40]])[0])
        controller.wait()
        controller.propagate("both")
        controller.wait()
    assert watch.c_calls > 0, "the profiler saw no calls on the worker"
    assert watch.off_main == [], f"MRML called off the main thread: {sorted(set(watch.off_main))}"
    assert segment_array(segmentation, lung, volume).any()


def test_sam_unet_on_tinyvit_runs_in_the_module_as_the_engine_runs_it(scene, ct, embedding_cache):
    """The SAM-UNet model (another family: fused embedding, its own cache key) behind the same controller: a click in
    the Red view gives exactly the engine's mask for that click."""
    from samunet_core.predictor import load_predictor

    predictor = load_predictor("samunet_tinyvit", device="cpu")
    volume, segmentation, lung, _ = ct
    controller = InteractionController(scene.scene, predictor, cache=embedding_cache, prefetch_radius=0)
    try:
        controller.start(volume, segmentation, lung, window=LUNG)
        frame = controller.frame("axial")
        plane = frame.slice_of(reference_labels_kji() == 5, K)
        row, col = inside_point(plane)
        click(scene, controller, "Red", frame.display_to_world([[K, row, col]])[0])
        controller.wait()
        assert controller.errors == []
        written = segment_array(segmentation, lung, volume)
        expected = interaction.decode_slice(Direct(predictor, frame, raw_voxels(controller)), K,
                                            SlicePrompts(clicks=(Click(col, row),))).mask
        assert expected.any() and np.array_equal(frame.slice_of(written, K), expected)
        assert (expected & plane).any()  # one click in a whole lung is ambiguous: Dice 0.13 with this model here
    finally:
        controller.close()


def test_computing_on_a_server_writes_what_this_computer_writes(scene, ct, default_predictor):
    """'Compute on: server URL': the same click through `samunet serve` on loopback writes the same voxels."""
    from samunet_core.remote import RemoteClient
    from samunet_core.serve.app import ServeConfig, create_app
    from samunet_core.serve.server import BackgroundServer

    token = "slicer-test-token-0123456789"
    server = BackgroundServer(create_app(ServeConfig(token=token), predictor=default_predictor))
    remote = InteractionController(scene.scene, RemoteClient(server.url, token), prefetch_radius=1)
    try:
        volume, segmentation, lung, _ = ct
        remote.start(volume, segmentation, lung, window=LUNG)
        frame = remote.frame("axial")
        reference = reference_labels_kji() == 5
        k = largest_slice(frame, reference)
        row, col = inside_point(frame.slice_of(reference, k))
        click(scene, remote, "Red", frame.display_to_world([[k, row, col]])[0])
        remote.wait()
        assert remote.errors == []
        written = segment_array(segmentation, lung, volume)
        expected = interaction.decode_slice(Direct(default_predictor, frame, raw_voxels(remote)), k,
                                            SlicePrompts(clicks=(Click(col, row),))).mask
        assert expected.any() and np.array_equal(frame.slice_of(written, k), expected)
        assert written.sum() == expected.sum()
    finally:
        remote.close()
        server.stop()
