"""Batch: the same world prompts (points and/or a 3D box) applied to several loaded volumes.

`BatchRunner` snapshots every volume on the main thread, computes masks on a background thread (the model runs on
each volume's session worker), and `apply_ready()` writes finished volumes on the main thread. Progress is read with
`progress()`; `cancel()` stops after the current slice.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from samunet_core.session import VolumeSession

from .masking import MaskSettings
from .prompts import WorldPrompts, box_on_slice, prompts_by_slice
from .propagation import propagate_from_slice
from .volume_view import VolumeView
from .writer import MaskedWriter, SegmentRegionIO, provenance_tags, read_tags, slab_extent


@dataclass
class BatchTarget:
    """Where one volume's result goes."""

    volume_node: object
    segmentation_node: object
    segment_id: str


@dataclass
class BatchResult:
    target: BatchTarget
    masks: dict[int, np.ndarray]  # displayed slice -> HxW bool
    prompts: list[dict] = field(default_factory=list)
    error: str | None = None


def make_targets(scene, volume_nodes, segment_name: str) -> list[BatchTarget]:
    """A new segmentation per volume (named after it) with one empty segment `segment_name`."""
    targets = []
    for volume in volume_nodes:
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} SAMUNet")
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        seg.CreateDefaultDisplayNodes()
        targets.append(BatchTarget(volume, seg, seg.GetSegmentation().AddEmptySegment(segment_name, segment_name)))
    return targets


class BatchRunner:
    def __init__(self, targets: list[BatchTarget], predictor, prompts: WorldPrompts, *, axis: str = "axial",
                 propagate: bool = False, cache=None, settings: MaskSettings | None = None) -> None:
        self.targets = targets
        self.predictor = predictor
        self.prompts = prompts
        self.propagate = propagate
        self.cache = cache
        self.settings = settings
        self.views = [VolumeView(t.volume_node, axis) for t in targets]  # MRML reads stay on the main thread
        self._ready: queue.Queue[BatchResult] = queue.Queue()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._done = 0
        self._message = ""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="samunet-batch")
        self.future: Future | None = None

    def start(self) -> Future:
        """Compute in the background; the future resolves to the number of volumes computed."""
        self.future = self._executor.submit(self._run)
        return self.future

    def cancel(self) -> None:
        self._cancel.set()

    def progress(self) -> tuple[int, int, str]:
        with self._lock:
            return self._done, len(self.targets), self._message

    def _run(self) -> int:
        computed = 0
        for target, view in zip(self.targets, self.views, strict=True):
            if self._cancel.is_set():
                break
            with self._lock:
                self._message = f"segmenting {target.volume_node.GetName()}"
            try:
                result = self._compute(target, view)
            except Exception as exc:  # one bad volume must not hide the others; reported in the result
                result = BatchResult(target, {}, error=f"{type(exc).__name__}: {exc}")
            self._ready.put(result)
            computed += 1
            with self._lock:
                self._done = computed
        self._executor.shutdown(wait=False)
        return computed

    def _compute(self, target: BatchTarget, view: VolumeView) -> BatchResult:
        masks: dict[int, np.ndarray] = {}
        with VolumeSession(self.predictor, view.slice_uint8, view.n_slices, view.key, cache=self.cache,
                           axis=view.axis, prefetch_radius=0) as session:
            corners = self.prompts.box_corners
            by_slice = prompts_by_slice(WorldPrompts(self.prompts.positive, self.prompts.negative, None), view.frame)
            if corners is not None:
                first, last, box = box_on_slice(corners, view.frame)
                if last > first:  # a 3D box: every slice inside gets the box
                    for k in range(first, last + 1):
                        if self._cancel.is_set():
                            break
                        masks[k] = session.segment(k, boxes=np.asarray(box)[None]).result().masks[0]
                    return BatchResult(target, masks, [{"axis": view.axis, "box_slices": [first, last],
                                                        "box": list(box)}])
                by_slice = prompts_by_slice(self.prompts, view.frame)
            for k, p in by_slice.items():
                kwargs = {}
                if p.box is not None:
                    kwargs["boxes"] = np.asarray(p.box)[None]
                if p.points:
                    kwargs["points"], kwargs["labels"] = p.points_array(), p.labels_array()
                masks[k] = session.segment(k, **kwargs).result().masks[0]
            if self.propagate and len(masks) == 1:
                (k, seed), = masks.items()
                masks.update(propagate_from_slice(session, k, seed, "both", self._cancel))
            return BatchResult(target, masks, [p.world for p in by_slice.values()])

    def apply_ready(self) -> list[BatchResult]:
        """Write every finished volume (main thread). Returns the results written (errors included, not written)."""
        applied = []
        while True:
            try:
                result = self._ready.get_nowait()
            except queue.Empty:
                return applied
            if result.error is None and result.masks:
                self._write(result)
            applied.append(result)

    def _write(self, result: BatchResult) -> None:
        target = result.target
        view = next(v for v, t in zip(self.views, self.targets, strict=True) if t is target)
        writer = MaskedWriter(SegmentRegionIO(target.segmentation_node, target.volume_node), self.settings)
        segmentation = target.segmentation_node.GetSegmentation()
        previous = read_tags(segmentation, target.segment_id).get("SAMUNet.Prompts")
        for k, mask in sorted(result.masks.items()):
            extent = slab_extent(view.frame.volume_slab(k), view.frame.shape_kji)
            writer.set_mask(target.segment_id, extent, view.frame.slice_to_slab(mask), f"batch slice {k}")
        tags = provenance_tags(self.predictor, result.prompts, previous)
        for key, value in tags.items():
            segmentation.GetSegment(target.segment_id).SetTag("SAMUNet." + key, value)
