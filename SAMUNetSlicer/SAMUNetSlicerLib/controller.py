"""The interaction controller: markups events in, the engine's prompt policy on the session worker, results written on
the main thread. No Qt: the Slicer widget maps buttons and keys to these calls, and `replay` drives the same class.

State: the volume, segmentation and segment being edited, the tool, the correction mode, every placed prompt (with the
view, axis and slice it was placed on), per axis the engine's `interaction.SegmentState` built from those prompts
(one job at a time on the session worker: a new prompt is applied to it, a moved or removed one replays them all, so
what is shown equals `samunet segment` on the prompt file), per written slice the snapshot the results are written
against, and an epoch that changes at every start/stop (results of an earlier start or a closed scene are dropped).
After Propagate ("both") the axis's prompts carry through the volume: every later click updates its slice and the
neighbours the engine's walk reaches, written together as one interaction (one undo step on Accept).

Threading contract: event handlers and `poll()` run on the main thread and are the only code touching MRML; the model
runs in `VolumeSession.run` on the session's worker, given only numpy and engine objects snapshotted here. The widget
calls `poll()` from a timer while `busy`; tests and replay call `wait()`.

Where a prompt goes: the slice view whose plane holds it (Red, Yellow or Green, in any orientation that shows the
volume's voxel planes) defines the axis; the engine's rounding (`samunet_core.prompts.resolve_prompts`) defines the
slice and the pixel. A box still being drawn (ROI not yet placed, or flat in the view's plane) is ignored quietly.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk

from samunet_core import interaction
from samunet_core.errors import InputError
from samunet_core.interaction import Click, Mode, SlicePrompts
from samunet_core.prompts import parse_prompts, resolve_prompts
from samunet_core.session import VolumeSession

from .geometry import VIEW_NAMES, display_window, distance_to_view_plane, view_axis, volume_ijk_to_world
from .masking import MaskSettings
from .prompts import roi_corners_world
from .volume_view import VolumeView, windowed_snapshot
from .writer import MaskedWriter, SegmentRegionIO, UndoRecord, provenance_tags, read_tags, slab_extent, write_tags

POINT_EVENTS = (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                slicer.vtkMRMLMarkupsNode.PointRemovedEvent)
ROI_EVENTS = POINT_EVENTS + (vtk.vtkCommand.ModifiedEvent,)
TOOLS = ("positive", "negative", "box")
DIRECTIONS = ("up", "down", "both")


@dataclass
class Placed:
    """One prompt as placed: its markups node and control point, the view, axis and slice range, and its pixels."""

    node: Any
    point_id: str
    role: str  # positive | negative | box
    order: int
    view: str
    axis: str
    s0: int
    s1: int
    click: Click | None = None
    box: tuple[float, float, float, float] | None = None
    world: list = field(default_factory=list)  # RAS position (points) or [lo, hi] corners (boxes)


@dataclass
class _Slice:
    """One displayed slice written since the last Accept/Clear."""

    extent: tuple
    baseline: dict[str, np.ndarray]  # every segment's voxels before this interaction touched the slice
    written: dict[str, np.ndarray]  # what the segmentation holds now
    shown: np.ndarray | None = None  # the segment's mask on this slice as last written (HxW bool)


@dataclass
class _AxisJob:
    """The segment's prompts on one axis and the engine state they built (`interaction.SegmentState`).

    The state lives on the session worker: the main thread only hands it prompts and reads the masks it returns."""

    state: interaction.SegmentState | None = None
    applied: tuple = ()  # the engine prompts the state holds, in the order applied
    key: tuple = ()  # (mode, propagate) the state was built with
    wanted: int = 0  # generation of the newest request
    running: Future | None = None
    running_generation: int = 0


@dataclass
class _Propagation:
    epoch: int
    axis: str
    direction: str
    future: Future


class InteractionController:
    """Prompt-driven editing of one segment; see the module doc.

    predictor: the engine Predictor. settings: MaskSettings or a callable giving the Segment Editor's current ones.
    undo_history(segmentation_node): the Segment Editor's undo hook for that segmentation, or None when the editor holds
    another one. negative_modifier(): True while the key that makes a point negative is held (Shift in Slicer).
    status(text): where messages for the user go. window: fixed (lo, hi) instead of the display node's.
    """

    def __init__(self, scene, predictor, *, cache=None,
                 settings: MaskSettings | Callable[[], MaskSettings] | None = None,
                 undo_history: Callable[[Any], Callable[[], object] | None] | None = None,
                 negative_modifier: Callable[[], bool] | None = None,
                 status: Callable[[str], None] | None = None, default_axis: str = "axial",
                 prefetch_radius: int = 2) -> None:
        self.scene = scene
        self.predictor = predictor
        self.cache = cache
        self.settings = settings
        self.undo_history = undo_history
        self.negative_modifier = negative_modifier or (lambda: False)
        self.status = status or (lambda _text: None)
        self.default_axis = default_axis
        self.prefetch_radius = prefetch_radius
        self.tool = "positive"
        self.mode = Mode.REPLACE
        self.message = ""
        self.errors: list[str] = []  # what went wrong since start (bad prompts, model failures), newest last
        self.last_latency_ms: float | None = None
        self._epoch = 0
        self._generation = itertools.count(1)
        self._order = itertools.count()
        self._handling = False
        self._started = False
        self._observations: list[tuple[Any, int]] = []
        self._scene_tags = [scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, self._on_scene_close)]
        self._reset_state()

    # -- start / stop ---------------------------------------------------------------------------------------------
    def start(self, volume_node, segmentation_node, segment_id: str, positive_node=None, negative_node=None, *,
              mode: Mode | str = Mode.REPLACE, window: tuple[float, float] | None = None) -> None:
        """Bind a volume, a segmentation and one of its segments; from now on prompts update that segment."""
        self.stop()
        if volume_node is None or segmentation_node is None or not segment_id:
            raise InputError("choose a volume, a segmentation and a segment first")
        if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise InputError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'; pick a segment")
        self.volume_node, self.segmentation_node, self.segment_id = volume_node, segmentation_node, segment_id
        self.mode = Mode(mode)
        self._window = window if window is not None else display_window(volume_node)
        self._pixels = windowed_snapshot(volume_node, self._window)  # one snapshot for every axis
        self._ijk_world = volume_ijk_to_world(volume_node)
        self._views: dict[str, VolumeView] = {}
        self._sessions: dict[str, VolumeSession] = {}
        self.writer = MaskedWriter(SegmentRegionIO(segmentation_node, volume_node), self.settings,
                                   undo_history=self.undo_history)
        self.positive_node = positive_node or self._new_node("vtkMRMLMarkupsFiducialNode", "SAMUNet +", (0, 1, 0))
        self.negative_node = negative_node or self._new_node("vtkMRMLMarkupsFiducialNode", "SAMUNet -", (1, 0, 0))
        self._box_nodes: list[Any] = []
        for node in (self.positive_node, self.negative_node):
            self._observe(node, POINT_EVENTS)
        self._epoch += 1
        self._started = True
        self.errors = []
        self._reconcile_all()

    def stop(self) -> None:
        """Forget pending work and stop observing; results still running are dropped when they arrive."""
        self._epoch += 1
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations.clear()
        for session in getattr(self, "_sessions", {}).values():
            session.close()
        self._sessions = {}
        self._started = False
        self._reset_state()

    def close(self) -> None:
        """Stop, and stop watching the scene (the module is closed)."""
        self.stop()
        for tag in self._scene_tags:
            self.scene.RemoveObserver(tag)
        self._scene_tags = []

    def _reset_state(self) -> None:
        self._placed: dict[tuple[str, str], Placed] = {}
        self._refused: set[tuple] = set()  # (node id, point id, position) already refused with a message
        self._box_depths: dict[str, float] = {}  # ROI node id -> its depth in slices when it was drawn
        self._slices: dict[tuple[str, int], _Slice] = {}
        self._jobs: dict[str, _AxisJob] = {}
        self._propagated: set[str] = set()  # axes whose prompts are carried through the volume (Propagate pressed)
        self._propagation: _Propagation | None = None
        self._interaction_saved = False

    def _on_scene_close(self, _caller, _event) -> None:
        self.stop()
        self._say("The scene was closed: pending results were dropped; press Start again.")

    @property
    def started(self) -> bool:
        return self._started

    @property
    def busy(self) -> bool:
        return any(j.running is not None for j in self._jobs.values()) or self._propagation is not None

    # -- tools ----------------------------------------------------------------------------------------------------
    def set_tool(self, tool: str) -> Any:
        """Put the views in place mode for a positive point, a negative point or a new box; returns the node."""
        if tool not in TOOLS:
            raise ValueError(f"tool must be one of {TOOLS}")
        self._require_started()
        self.tool = tool
        if tool == "box":
            node = self._new_node("vtkMRMLMarkupsROINode", f"SAMUNet box {len(self._box_nodes) + 1}", (1, 1, 0))
            self._box_nodes.append(node)
            self._observe(node, ROI_EVENTS)
        else:
            node = self.positive_node if tool == "positive" else self.negative_node
        selection = self.scene.GetFirstNodeByClass("vtkMRMLSelectionNode")
        interaction_node = self.scene.GetFirstNodeByClass("vtkMRMLInteractionNode")
        if selection is not None:
            selection.SetReferenceActivePlaceNodeClassName(node.GetClassName())
            selection.SetActivePlaceNodeID(node.GetID())
        if interaction_node is not None:
            interaction_node.SetPlaceModePersistence(tool != "box")
            interaction_node.SetCurrentInteractionMode(slicer.vtkMRMLInteractionNode.Place)
        return node

    def set_mode(self, mode: Mode | str) -> None:
        """replace / add / remove for the next requests (already written slices are recomputed)."""
        self.mode = Mode(mode)
        for axis in list(self._jobs):
            self._request(axis)

    # -- events (main thread) -------------------------------------------------------------------------------------
    def _observe(self, node, events) -> None:
        for event in events:
            tag = node.AddObserver(event, lambda caller, _event: self._on_markups_event(caller))
            self._observations.append((node, tag))

    def _on_markups_event(self, node) -> None:
        if self._handling or not self._started:
            return  # our own edits of the markups, or not started
        self._handling = True
        try:
            touched = self._reconcile(node)
        finally:
            self._handling = False
        for axis in sorted({axis for axis, _ in touched}):
            self._request(axis)

    def _reconcile_all(self) -> None:
        touched: set = set()
        for node in (self.positive_node, self.negative_node, *self._box_nodes):
            touched |= self._reconcile(node)
        for axis in sorted({axis for axis, _ in touched}):
            self._request(axis)

    def _reconcile(self, node) -> set[tuple[str, int]]:
        """Bring the placed-prompt registry in line with `node`; returns the (axis, slice) keys that changed."""
        node_id = node.GetID()
        present: dict[str, np.ndarray] = {}
        if node.IsA("vtkMRMLMarkupsROINode"):
            corners = roi_corners_world(node) if _roi_placed(node) else None
            if corners is not None:
                present[node.GetNthControlPointID(0)] = corners
        else:
            for index in range(node.GetNumberOfControlPoints()):
                if node.GetNthControlPointPositionStatus(index) == slicer.vtkMRMLMarkupsNode.PositionDefined:
                    position = np.zeros(3)
                    node.GetNthControlPointPositionWorld(index, position)
                    present[node.GetNthControlPointID(index)] = position
        touched: set[tuple[str, int]] = set()
        for key in [k for k in self._placed if k[0] == node_id and k[1] not in present]:
            touched |= self._slices_of(self._placed.pop(key))
        for point_id, world in present.items():
            old = self._placed.get((node_id, point_id))
            if old is not None and np.allclose(np.asarray(old.world, float), self._world_key(node, world)):
                continue
            if old is None and not node.IsA("vtkMRMLMarkupsROINode") and self.negative_modifier():
                node, point_id = self._flip_polarity(node, point_id, world)
            refusal = (node.GetID(), point_id, tuple(np.round(np.ravel(world), 3)))
            if refusal in self._refused:
                continue  # already explained to the user; wait for the prompt to move
            try:
                placed = self._place(node, point_id, world, old.order if old is not None else next(self._order))
            except InputError as exc:
                self._refused.add(refusal)
                self._fail(str(exc))
                placed = None
            if old is not None:
                touched |= self._slices_of(old)
                del self._placed[(old.node.GetID(), old.point_id)]
            if placed is not None:
                self._placed[(placed.node.GetID(), placed.point_id)] = placed
                touched |= self._slices_of(placed)
        return touched

    @staticmethod
    def _world_key(node, world: np.ndarray) -> np.ndarray:
        """What a Placed remembers of a node's position (points: RAS; ROI: its [lo, hi] corners)."""
        if node.IsA("vtkMRMLMarkupsROINode"):
            return np.array([world[0], world[-1]])
        return np.asarray(world)

    def _flip_polarity(self, node, point_id: str, world: np.ndarray) -> tuple[Any, str]:
        """A point placed while the modifier is held takes the other polarity: only that point moves node."""
        target = self.negative_node if node is self.positive_node else self.positive_node
        node.RemoveNthControlPoint(node.GetNthControlPointIndexByID(point_id))
        index = target.AddControlPointWorld(vtk.vtkVector3d(*world))
        return target, target.GetNthControlPointID(index)

    def _place(self, node, point_id: str, world: np.ndarray, order: int) -> Placed | None:
        """Resolve one markup into view, axis, slice and pixels (engine rounding); None for a box still drawn."""
        is_box = node.IsA("vtkMRMLMarkupsROINode")
        centre = world.mean(0) if is_box else world
        view, slice_node = self._view_of(centre)
        axis = view_axis(slice_node, self._ijk_to_world()) if slice_node is not None else self.default_axis
        frame = self._view(axis).frame.frame
        name = "prompt"
        if is_box:
            if np.count_nonzero(np.ptp(world, axis=0) > 1e-6) < 2:
                return None  # the first click of a box: a corner, no extent yet
            lo, hi = self._box_corners(node, world, axis)
            data = {"coordinates": "RAS", "axis": axis,
                    "segments": [{"name": name, "boxes": [{"corners": [lo.tolist(), hi.tolist()]}]}]}
            box = resolve_prompts(parse_prompts(data, "the box"), frame).segments[0].boxes[0]
            if box.x1 - box.x0 < 1.0 or box.y1 - box.y0 < 1.0:
                return None  # no area in the view
            return Placed(node, point_id, "box", order, view, axis, box.s0, box.s1, box=box.xyxy,
                          world=[lo.tolist(), hi.tolist()])
        role = "positive" if node is self.positive_node else "negative"
        data = {"coordinates": "RAS", "axis": axis,
                "segments": [{"name": name, "points": [{"position": list(map(float, world)),
                                                        "positive": role == "positive"}]}]}
        point = resolve_prompts(parse_prompts(data, f"the {role} point"), frame).segments[0].points[0]
        return Placed(node, point_id, role, order, view, axis, point.s, point.s,
                      click=Click(point.x, point.y, point.positive), world=list(map(float, world)))

    def _box_corners(self, node, corners: np.ndarray, axis: str) -> tuple[np.ndarray, np.ndarray]:
        """Two opposite world corners of the box an ROI marks on the displayed slices of `axis`.

        Slicer gives a box drawn in a slice view a depth (its shorter side) the user never chose, so a box is 2D, on the
        slice through its centre, until the user changes that depth (drags its handles in another view): from then on
        it is a 3D box over the slices it spans. Either way the box is the ROI's bounding box in slice pixels."""
        frame = self.frame(axis)
        display = frame.world_to_display(corners)
        depth = float(np.ptp(display[:, 0]))
        drawn = self._box_depths.setdefault(node.GetID(), depth)
        if abs(depth - drawn) < 1e-3:
            centre = frame.world_to_display(corners.mean(0))[0, 0]
            display[:, 0] = centre
        lo, hi = display.min(0), display.max(0)
        return tuple(frame.display_to_world(np.array([lo, hi])))

    def _view_of(self, ras: np.ndarray) -> tuple[str, Any]:
        """(view name, slice node) whose plane holds the prompt: the crosshair's view first (the one under the
        mouse), then Red, Yellow, Green. No slice views in the scene (scripting): the default axis."""
        nodes = {n.GetLayoutName(): n for n in _slice_nodes(self.scene)}
        if not nodes:
            return "", None
        order = [name for name in VIEW_NAMES if name in nodes] + sorted(set(nodes) - set(VIEW_NAMES))
        crosshair = self.scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is not None:
            xyz = [0.0, 0.0, 0.0]
            under_mouse = crosshair.GetCursorPositionXYZ(xyz)
            if under_mouse is not None and under_mouse.GetLayoutName() in nodes:
                order.insert(0, under_mouse.GetLayoutName())
        tolerance = 0.5 * float(np.min(np.linalg.norm(self._ijk_to_world()[:3, :3], axis=0)))
        for name in order:
            node = nodes[name]
            if distance_to_view_plane(node, ras) <= tolerance:
                return name, node
        raise InputError("the prompt is not on the plane of any slice view (Red, Yellow, Green); place it in a "
                         "slice view")

    # -- requests -------------------------------------------------------------------------------------------------
    def _slices_of(self, placed: Placed) -> set[tuple[str, int]]:
        return {(placed.axis, k) for k in range(placed.s0, placed.s1 + 1)}

    def slice_prompts(self, axis: str, k: int) -> SlicePrompts:
        """The prompts on displayed slice k of `axis`, boxes and clicks in the order they were placed."""
        placed = sorted((p for p in self._placed.values() if p.axis == axis and p.s0 <= k <= p.s1),
                        key=lambda p: p.order)
        return SlicePrompts(boxes=tuple(p.box for p in placed if p.box is not None),
                            clicks=tuple(p.click for p in placed if p.click is not None))

    def engine_prompts(self, axis: str) -> tuple:
        """The prompts on `axis` as the engine takes them (SliceBox / SlicePoint), in the prompt file's order: the
        boxes, then the clicks, each in the order they were placed (what `prompt_file` writes and `samunet segment`
        replays)."""
        from samunet_core.prompts import SliceBox, SlicePoint

        placed = sorted((p for p in self._placed.values() if p.axis == axis), key=lambda p: p.order)
        boxes = [SliceBox(p.s0, p.s1, *p.box) for p in placed if p.box is not None]
        points = [SlicePoint(p.s0, p.click.x, p.click.y, p.click.positive) for p in placed if p.click is not None]
        return (*boxes, *points)

    def _request(self, axis: str) -> None:
        """Ask for the segment's result on `axis` from its current prompts; never waits. One job per axis runs at a
        time; a newer request waits for it and is then sent with the newest prompts (a drag sends few, not every
        step)."""
        job = self._jobs.setdefault(axis, _AxisJob())
        job.wanted = next(self._generation)
        if job.running is None:
            self._submit(axis, job)

    def _submit(self, axis: str, job: _AxisJob) -> None:
        """Apply the prompts added since the last job to the axis's engine state, or replay them all on a fresh
        state when a prompt moved, was removed, or the mode or Propagate changed (rule: one segment's prompts in
        order give one result, whichever way they arrive)."""
        prompts = self.engine_prompts(axis)
        key = (self.mode, axis in self._propagated)
        generation, epoch, started = job.wanted, self._epoch, time.perf_counter()
        incremental = job.state is not None and job.key == key and prompts[:len(job.applied)] == job.applied
        state = job.state if incremental else None
        todo = prompts[len(job.applied):] if incremental else prompts
        existing = None if incremental or self.mode is Mode.REPLACE else self._existing(axis)
        frame, name, mode, propagate = self.frame(axis), self.segment_id, self.mode, key[1]
        job.state, job.applied, job.key = None, (), key  # owned by the job until it returns

        def work(decoder) -> tuple[int, float, Any, tuple, dict[int, np.ndarray]]:
            current = state
            if current is None:
                current = interaction.SegmentState(decoder, frame.n_slices, frame.slice_shape, propagate=propagate,
                                                   existing=existing, mode=mode, name=name,
                                                   slice_spacing_mm=frame.frame.slice_spacing)
            current.decoder = decoder
            for prompt in todo:  # each call is atomic; a failure leaves the job without a state (the next replays)
                (current.add_box if hasattr(prompt, "s1") else current.add_click)(prompt)
            return epoch, started, current, prompts, current.masks()

        job.running, job.running_generation = self._session(axis).run(work), generation
        last = max((p for p in self._placed.values() if p.axis == axis), key=lambda p: p.order, default=None)
        if last is not None:
            self._session(axis).prefetch(last.s0)

    def _existing(self, axis: str) -> np.ndarray:
        """S x H x W bool: the segment on `axis` before this interaction (slices written since Accept: their
        baseline)."""
        frame = self.frame(axis)
        whole = slab_extent((slice(None),) * 3, frame.shape_kji)
        existing = np.array(frame.frame.volume_to_slices(self.writer.io.read(self.segment_id, whole) > 0), bool)
        for (a, k), state in self._slices.items():
            if a == axis:
                existing[k] = frame.slab_to_slice(state.baseline[self.segment_id]) > 0
        return existing

    # -- results (main thread) ------------------------------------------------------------------------------------
    def poll(self) -> int:
        """Apply every finished result that is still current; returns how many slices were written."""
        applied = 0
        for axis, job in list(self._jobs.items()):
            future = job.running
            if future is None or not future.done():
                continue
            job.running = None
            try:
                epoch, started, state, prompts, masks = future.result()
            except Exception as exc:  # the model failed: say so, keep what is written; the next request replays
                self._fail(f"Segmentation failed on the {axis} slices: {exc}")
                continue
            if epoch != self._epoch:
                continue
            job.state, job.applied = state, prompts
            if job.running_generation != job.wanted:
                self._submit(axis, job)  # newer prompts arrived meanwhile
                continue
            applied += self._show(axis, masks)
            self.last_latency_ms = (time.perf_counter() - started) * 1e3
            for warning in state.warnings:
                self._say(warning)
            state.warnings.clear()
        applied += self._poll_propagation()
        return applied

    def wait(self, timeout: float = 300.0) -> int:
        """Block until nothing is pending and apply the results (replay and tests; the widget uses `poll`)."""
        deadline = time.monotonic() + timeout
        applied = 0
        while self.busy:
            running = [j.running for j in self._jobs.values() if j.running is not None]
            if self._propagation is not None:
                running.append(self._propagation.future)
            if not any(f.done() for f in running):  # (futures.wait would miss a plain cancel())
                futures.wait(running, timeout=0.02, return_when=futures.FIRST_COMPLETED)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the model did not answer within {timeout:.0f} s")
            applied += self.poll()
        return applied

    def _show(self, axis: str, masks: dict[int, np.ndarray]) -> int:
        """Write the axis's result: every slice whose mask changed; slices the result no longer holds go back to
        their baseline."""
        written = 0
        for k in sorted(masks):
            state = self._slices.get((axis, k))
            if state is not None and state.shown is not None and np.array_equal(state.shown, masks[k]):
                continue
            written += self._write(axis, k, self._slice(axis, k), masks[k])
        for a, k in [key for key in self._slices if key[0] == axis and key[1] not in masks]:
            written += self._restore(a, k)
        return written

    def _write(self, axis: str, k: int, state: _Slice, mask: np.ndarray) -> int:
        frame = self.frame(axis)
        changed = self.writer.compute(self.segment_id, state.extent, frame.slice_to_slab(mask), state.baseline)
        regions = {sid: changed.get(sid, region) for sid, region in state.baseline.items()}
        self._save_for_undo()
        self.writer.write_regions(state.extent, regions, state.baseline, state.written)
        state.written = dict(regions)
        state.shown = np.array(mask, bool)
        return 1

    def _restore(self, axis: str, k: int) -> int:
        state = self._slices.pop((axis, k))
        self.writer.write_regions(state.extent, state.baseline, state.baseline, state.written)
        return 1

    def _save_for_undo(self) -> None:
        if not self._interaction_saved and self.writer.save_state_for_undo is not None:
            self.writer.save_state_for_undo()
        self._interaction_saved = True

    # -- accept / clear / undo ------------------------------------------------------------------------------------
    def accept(self) -> UndoRecord | None:
        """Keep the masks: one undo record for the interaction, provenance tags, prompts removed."""
        self._require_started()
        self.wait()
        record = None
        if self._slices:
            segmentation = self.segmentation_node.GetSegmentation()
            record = UndoRecord(description="SAMUNet prompts")
            record.tags[self.segment_id] = read_tags(segmentation, self.segment_id)
            for state in self._slices.values():
                for sid, before in state.baseline.items():
                    if not np.array_equal(before > 0, state.written[sid] > 0):
                        record.regions.append((sid, state.extent, before))
            prompts = [self._provenance(p) for p in sorted(self._placed.values(), key=lambda p: p.order)]
            write_tags(segmentation, self.segment_id, provenance_tags(
                self.predictor, prompts, record.tags[self.segment_id].get("SAMUNet.Prompts")))
            self.writer.undo_stack.append(record)
        self._clear_prompts()
        return record

    def clear(self) -> None:
        """Put every slice touched since the last Accept back as it was and remove the prompts."""
        self._require_started()
        for state in self._slices.values():
            self.writer.write_regions(state.extent, state.baseline, state.baseline, state.written)
        self._clear_prompts()

    def undo(self) -> UndoRecord | None:
        """Clear pending prompts, or else undo the last accepted change (exact voxels and tags)."""
        self._require_started()
        if self._slices or self._placed:
            self.clear()
            return None
        return self.writer.undo()

    def remove_last_prompt(self) -> bool:
        """Remove the most recently placed prompt (its slice is recomputed); False when there is none."""
        if not self._placed:
            return False
        last = max(self._placed.values(), key=lambda p: p.order)
        index = last.node.GetNthControlPointIndexByID(last.point_id)
        if last.role == "box":
            last.node.RemoveAllControlPoints()
        elif index >= 0:
            last.node.RemoveNthControlPoint(index)
        return True

    def _clear_prompts(self) -> None:
        self._handling = True
        try:
            for node in (self.positive_node, self.negative_node):
                node.RemoveAllControlPoints()
            for node in self._box_nodes:
                self.scene.RemoveNode(node)
        finally:
            self._handling = False
        self._observations = [(n, t) for n, t in self._observations if n not in self._box_nodes]
        self._box_nodes = []
        epoch_keep = self._epoch
        self._reset_state()
        self._epoch = epoch_keep + 1  # results still running belong to the prompts just removed

    def prompt_file(self, name: str, propagate: bool = False) -> dict:
        """The prompts placed since the last Accept as a prompt file (RAS; docs/formats.md), in placement order, boxes
        as this controller reads them (2D unless their depth was changed): what Batch applies to other volumes."""
        placed = sorted(self._placed.values(), key=lambda p: p.order)
        if not placed:
            raise InputError("place points or a box first: Batch applies them to every loaded volume")
        axes = sorted({p.axis for p in placed})
        if len(axes) > 1:
            raise InputError(f"the prompts are on {' and '.join(axes)} slices; Batch needs them in one orientation")
        points = [{"position": p.world, "positive": p.role == "positive"} for p in placed if p.role != "box"]
        boxes = [{"corners": p.world} for p in placed if p.role == "box"]
        segment = {"name": name or "SAMUNet", "points": points, "boxes": boxes, "propagate": bool(propagate)}
        return {"coordinates": "RAS", "axis": axes[0], "segments": [segment]}

    def _provenance(self, placed: Placed) -> dict:
        entry = {"axis": placed.axis, "view": placed.view, "slices": [placed.s0, placed.s1], "mode": self.mode.value}
        if placed.role == "box":
            entry["box_ras"] = [[round(v, 3) for v in c] for c in placed.world]
        else:
            entry["point_ras"] = [round(v, 3) for v in placed.world]
            entry["positive"] = placed.role == "positive"
        return entry

    # -- propagation ----------------------------------------------------------------------------------------------
    def propagate(self, direction: str = "both", axis: str | None = None) -> None:
        """Carry the prompted slices' masks through the volume (the engine's walk); applied by `poll`."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        self._require_started()
        self.wait()
        if axis is None and self._placed:
            axis = max(self._placed.values(), key=lambda p: p.order).axis
        job = self._jobs.get(axis) if axis is not None else None
        if job is None or job.state is None or not any(m.any() for m in job.state.masks().values()):
            raise InputError("nothing to propagate: segment a slice first")
        if direction == "both":
            # the prompts from now on carry through the volume: a replay with "propagate", as the CLI's prompt file
            self._propagated.add(axis)
            self._request(axis)
            return
        seeds = {k: job.state.results[k] for k in job.state.user if k in job.state.results}
        inside_3d_box = {k for p in self._placed.values() if p.axis == axis and p.s1 > p.s0
                         for k in range(p.s0, p.s1 + 1)}
        below = direction != "up" and min(seeds) not in inside_3d_box  # no walk beyond a 3D box, as the CLI
        above = direction != "down" and max(seeds) not in inside_3d_box
        n_slices, epoch, spacing = self.frame(axis).n_slices, self._epoch, self.frame(axis).frame.slice_spacing

        def walk(decoder) -> dict[int, np.ndarray]:
            return interaction.propagate_from_seeds(decoder, n_slices, seeds, walk_below=below, walk_above=above,
                                                    slice_spacing_mm=spacing)

        self._propagation = _Propagation(epoch, axis, direction, self._session(axis).run(walk))

    def _poll_propagation(self) -> int:
        job = self._propagation
        if job is None or not job.future.done():
            return 0
        self._propagation = None
        try:
            masks = job.future.result()
        except Exception as exc:
            self._fail(f"Propagation failed: {exc}")
            return 0
        if job.epoch != self._epoch:
            return 0
        engine = self._jobs[job.axis].state if job.axis in self._jobs else None
        prompted = set(engine.user) if engine is not None else set()
        carried = {k: m for k, m in masks.items() if k not in prompted}
        self.accept()  # the prompted slices are one undo step, the propagation the next
        if not carried:
            self._say("Propagation found nothing beyond the prompted slices.")
            return 0
        frame, mode = self.frame(job.axis), self.mode
        slabs = {}
        for k, mask in carried.items():
            extent = slab_extent(frame.volume_slab(k), frame.shape_kji)
            existing = frame.slab_to_slice(self.writer.io.read(self.segment_id, extent)) > 0
            slabs[extent] = frame.slice_to_slab(interaction.combine(mask, existing, mode))
        self._save_for_undo()
        record = self.writer.set_slices(self.segment_id, slabs, description=f"SAMUNet propagate {job.direction}")
        segmentation = self.segmentation_node.GetSegmentation()
        previous = read_tags(segmentation, self.segment_id)
        record.tags.setdefault(self.segment_id, previous)
        write_tags(segmentation, self.segment_id, provenance_tags(
            self.predictor, [{"axis": job.axis, "propagate": job.direction, "slices": sorted(carried)}],
            previous.get("SAMUNet.Prompts")))
        self._interaction_saved = False
        self._say(f"Propagated to {len(carried)} slices.")
        return len(carried)

    # -- helpers --------------------------------------------------------------------------------------------------
    def frame(self, axis: str):
        return self._view(axis).frame

    def _view(self, axis: str) -> VolumeView:
        view = self._views.get(axis)
        if view is None:
            view = VolumeView(self.volume_node, axis, self._window, pixels=self._pixels)
            self._views[axis] = view
        return view

    def _session(self, axis: str) -> VolumeSession:
        session = self._sessions.get(axis)
        if session is None:
            view = self._view(axis)
            open_remote = getattr(self.predictor, "open_session", None)  # computing on a `samunet serve` server
            if open_remote is not None:
                session = open_remote(view.slice_uint8, view.key, axis, n_slices=view.n_slices,
                                      prefetch_radius=self.prefetch_radius)
            else:
                session = VolumeSession(self.predictor, view.slice_uint8, view.n_slices, view.key, cache=self.cache,
                                        axis=axis, prefetch_radius=self.prefetch_radius)
            self._sessions[axis] = session
        return session

    def _slice(self, axis: str, k: int) -> _Slice:
        state = self._slices.get((axis, k))
        if state is None:
            frame = self.frame(axis)
            extent = slab_extent(frame.volume_slab(k), frame.shape_kji)
            baseline = self.writer.snapshot(extent)
            state = _Slice(extent, baseline, dict(baseline))
            self._slices[(axis, k)] = state
        return state

    def _ijk_to_world(self) -> np.ndarray:
        return self._ijk_world

    def _new_node(self, class_name: str, name: str, color) -> Any:
        node = self.scene.AddNewNodeByClass(class_name, self.scene.GenerateUniqueName(name))
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetSelectedColor(*color)
        return node

    def _require_started(self) -> None:
        if not self._started:
            raise InputError("press Start first (choose a volume, a segmentation and a segment)")

    def _say(self, text: str) -> None:
        self.message = text
        self.status(text)

    def _fail(self, text: str) -> None:
        self.errors.append(text)
        self._say(text)


def _roi_placed(roi_node) -> bool:
    """An ROI is placed when its one control point (the centre) is defined: while the second corner is being chosen
    Slicer holds a second, preview point, and before the first click the only point is a preview."""
    return (roi_node.GetNumberOfControlPoints() == 1
            and roi_node.GetNthControlPointPositionStatus(0) == slicer.vtkMRMLMarkupsNode.PositionDefined)


def _slice_nodes(scene) -> list:
    nodes = scene.GetNodesByClass("vtkMRMLSliceNode")
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
