"""Batch: the same world prompts (points and/or a box) applied to several loaded volumes.

Threads: everything that touches MRML happens on the main thread. `BatchRunner(...)` (main thread) reads the prompt
markups' world RAS positions, turns them into ONE prompt file (samunet_core.prompts: {"coordinates": "RAS", ...}),
and snapshots every volume (name, voxels, window, geometry) and resolves the prompt file on that volume's displayed
slices, by the engine's rules (`resolve_prompts`: box corners on one slice after rounding make a 2D box there, on
different slices a 3D box; a prompt outside the volume is an error for that volume only). The background thread gets
numpy and engine objects only: for each volume it runs `interaction.segment_slices` (THE prompt policy, propagation
included) on the volume's VolumeSession worker (`VolumeSession.run`). `apply_ready()` (main thread, e.g. a Qt timer)
writes each finished volume as ONE masked change of its segment (MaskedWriter.set_slices: one labelmap, one undo
record) with provenance tags. `progress()` reports; `cancel()` stops at the next model call (volumes finished before
are still written).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from samunet_core.errors import InputError
from samunet_core.interaction import segment_slices
from samunet_core.prompts import PromptFile, SegmentPrompts, parse_prompts, resolve_prompts
from samunet_core.session import VolumeSession

from .masking import MaskSettings
from .prompts import WorldPrompts
from .volume_view import VolumeView
from .writer import MaskedWriter, SegmentRegionIO, UndoRecord, provenance_tags, read_tags, slab_extent


@dataclass
class BatchTarget:
    """Where one volume's result goes. volume_name: the volume's name when the batch started (for messages)."""

    volume_node: Any
    segmentation_node: Any
    segment_id: str
    volume_name: str = ""


@dataclass
class BatchResult:
    """One volume's outcome. masks: displayed slice -> HxW bool (empty on error); prompts: the provenance entries;
    error: why this volume has no result (the other volumes go on); record: the undo record of its write."""

    target: BatchTarget
    masks: dict[int, np.ndarray]
    prompts: list[dict] = field(default_factory=list)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    record: UndoRecord | None = None


@dataclass
class _Job:
    """A volume as the worker sees it: numpy and engine objects only (no MRML)."""

    index: int
    name: str
    slices: Any  # k -> HxW uint8, windowed as the view shows it (VolumeView.slice_uint8: numpy only)
    n_slices: int
    slice_shape: tuple[int, int]
    key: str
    segment: SegmentPrompts | None
    error: str | None = None
    slice_spacing: float | None = None  # mm between neighbouring slices (the walk's stopping rule is set for it)


class _Cancelled(Exception):
    pass


class _CancellableDecoder:
    """The session's decoder, stopped at the next model call once the batch is cancelled."""

    def __init__(self, decoder, cancel: threading.Event) -> None:
        self._decoder, self._cancel = decoder, cancel

    def decode_key(self, k: int):
        return self._decoder.decode_key(k)

    def predict(self, k: int, **prompts: Any):
        if self._cancel.is_set():
            raise _Cancelled
        return self._decoder.predict(k, **prompts)


def make_targets(scene, volume_nodes, segment_name: str) -> list[BatchTarget]:
    """A new segmentation per volume (named after it, under the volume's transform) with one empty segment."""
    targets = []
    for volume in volume_nodes:
        name = volume.GetName()
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} SAMUNet")
        seg.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        seg.CreateDefaultDisplayNodes()
        targets.append(BatchTarget(volume, seg, seg.GetSegmentation().AddEmptySegment(segment_name, segment_name),
                                   name))
    return targets


def prompt_file(prompts: WorldPrompts, axis: str, name: str, propagate: bool = False) -> dict:
    """World RAS prompts -> a prompt-file dict (samunet_core.prompts) with one segment; the box's two corners are the
    min and max corners of the ROI."""
    segment: dict[str, Any] = {"name": name or "SAMUNet", "propagate": bool(propagate)}
    points = [{"position": [float(v) for v in ras], "positive": positive}
              for positions, positive in ((prompts.positive, True), (prompts.negative, False)) for ras in positions]
    if points:
        segment["points"] = points
    if prompts.box_corners is not None:
        corners = np.asarray(prompts.box_corners, np.float64)
        segment["boxes"] = [{"corners": [corners.min(axis=0).tolist(), corners.max(axis=0).tolist()]}]
    return {"coordinates": "RAS", "axis": axis, "segments": [segment]}


class BatchRunner:
    """Create on the main thread (it reads MRML there); `start()` computes in the background; `apply_ready()` writes
    on the main thread. prompts: a prompt-file dict (the Slicer module passes InteractionController.prompt_file(): the
    prompts exactly as the controller resolved them) or world RAS prompts (prompts.read_prompts). settings: the
    Segment Editor's masking.
    undo_history: optional Slicer undo history (see writer.as_undo_history)."""

    def __init__(self, targets: list[BatchTarget], predictor, prompts: WorldPrompts | dict, *, axis: str = "axial",
                 propagate: bool = False, cache=None, settings: MaskSettings | None = None,
                 undo_history=None) -> None:
        self.targets = targets
        self.predictor = predictor
        self.prompts = prompts
        self.axis = axis
        self.propagate = propagate
        self.cache = cache
        self.settings = settings
        self.undo_history = undo_history
        # -- main thread: every MRML read happens here ------------------------------------------------------------
        for target in targets:
            if not target.volume_name:
                target.volume_name = target.volume_node.GetName()
        name = ""
        if targets:
            segment = targets[0].segmentation_node.GetSegmentation().GetSegment(targets[0].segment_id)
            name = segment.GetName() if segment is not None else ""
        if isinstance(prompts, dict):  # a prompt-file dict, e.g. InteractionController.prompt_file(): as placed
            self.prompt_dict = prompts
            self.axis = prompts.get("axis", axis)
        else:
            self.prompt_dict = prompt_file(prompts, axis, name, propagate)
        self.prompt_file: PromptFile = parse_prompts(self.prompt_dict, source="the batch prompts")
        self.views: list[VolumeView | None] = []
        self._jobs = [self._job(i, target) for i, target in enumerate(targets)]
        # -- shared with the worker -------------------------------------------------------------------------------
        self._ready: queue.Queue[tuple[int, dict[int, np.ndarray], list[str], str | None]] = queue.Queue()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._done = 0
        self._message = ""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="samunet-batch")
        self.future: Future | None = None

    def _job(self, index: int, target: BatchTarget) -> _Job:
        """Snapshot one volume (main thread); a volume that cannot be used becomes an error for it alone."""
        try:
            view = VolumeView(target.volume_node, self.axis)
            segment = resolve_prompts(self.prompt_file, view.frame.frame).segments[0]
        except InputError as exc:
            self.views.append(None)
            return _Job(index, target.volume_name, None, 0, (0, 0), "", None, str(exc))
        self.views.append(view)
        frame = view.frame
        return _Job(index, target.volume_name, view.slice_uint8, frame.n_slices, tuple(frame.slice_shape), view.key,
                    segment, slice_spacing=frame.frame.slice_spacing)

    # -- public API -------------------------------------------------------------------------------------------------
    def start(self) -> Future:
        """Compute in the background; the future resolves to the number of volumes computed (errors included)."""
        self.future = self._executor.submit(self._run)
        return self.future

    def cancel(self) -> None:
        self._cancel.set()

    def progress(self) -> tuple[int, int, str]:
        with self._lock:
            return self._done, len(self.targets), self._message

    # -- worker thread: numpy and engine objects only -----------------------------------------------------------------
    def _run(self) -> int:
        computed = 0
        try:
            for job in self._jobs:
                if self._cancel.is_set():
                    break
                with self._lock:
                    self._message = f"segmenting {job.name}"
                if job.error is not None:
                    self._ready.put((job.index, {}, [], job.error))
                else:
                    try:
                        masks, warnings = self._compute(job)
                    except _Cancelled:
                        break
                    except Exception as exc:  # one bad volume must not hide the others; reported in its result
                        self._ready.put((job.index, {}, [], f"{type(exc).__name__}: {exc}"))
                    else:
                        self._ready.put((job.index, masks, warnings, None))
                computed += 1
                with self._lock:
                    self._done = computed
            with self._lock:
                self._message = "cancelled" if self._cancel.is_set() else "done"
            return computed
        finally:
            self._executor.shutdown(wait=False)

    def _compute(self, job: _Job) -> tuple[dict[int, np.ndarray], list[str]]:
        open_remote = getattr(self.predictor, "open_session", None)  # computing on a `samunet serve` server
        if open_remote is not None:
            session = open_remote(job.slices, job.key, self.axis, n_slices=job.n_slices)
        else:
            session = VolumeSession(self.predictor, job.slices, job.n_slices, job.key, cache=self.cache,
                                    axis=self.axis, prefetch_radius=0)
        try:
            segment = job.segment
            return session.run(lambda decoder: segment_slices(
                _CancellableDecoder(decoder, self._cancel), segment, job.n_slices, job.slice_shape,
                slice_spacing_mm=job.slice_spacing)).result()
        finally:
            session.close()

    # -- main thread ---------------------------------------------------------------------------------------------
    def apply_ready(self) -> list[BatchResult]:
        """Write every finished volume (main thread): one masked change per volume, with provenance. Returns the
        results handled since the last call (errors included, not written)."""
        applied = []
        while True:
            try:
                index, masks, warnings, error = self._ready.get_nowait()
            except queue.Empty:
                return applied
            result = BatchResult(self.targets[index], masks, error=error, warnings=warnings)
            if error is None and masks:
                try:
                    self._write(index, result)
                except (InputError, RuntimeError) as exc:
                    result.error = f"{type(exc).__name__}: {exc}"
            applied.append(result)

    def _write(self, index: int, result: BatchResult) -> None:
        target, frame = result.target, self.views[index].frame
        writer = MaskedWriter(SegmentRegionIO(target.segmentation_node, target.volume_node), self.settings,
                              self.undo_history)
        segmentation = target.segmentation_node.GetSegmentation()
        previous = read_tags(segmentation, target.segment_id).get("SAMUNet.Prompts")
        segment = self.prompt_file.segments[0]
        result.prompts = [{"source": "batch", "coordinates": "RAS", "axis": self.axis,
                           "points": segment["points"], "boxes": segment["boxes"], "propagate": segment["propagate"],
                           "slices": sorted(int(k) for k in result.masks)}]
        slabs = {slab_extent(frame.volume_slab(k), frame.shape_kji): frame.slice_to_slab(mask)
                 for k, mask in sorted(result.masks.items())}
        result.record = writer.set_slices(target.segment_id, slabs, f"SAMUNet batch {target.volume_name}",
                                          provenance_tags(self.predictor, result.prompts, previous))
