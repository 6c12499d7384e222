"""The interactive loop: prompt events in, the model on the session's worker thread, the mask written on the main
thread under the Segment Editor's masking, with Accept / Clear / Undo, propagation and provenance.

Threading contract: `prompts_changed`, `request` and `propagate` never wait on the model; they return
concurrent.futures.Future objects completed on the engine's worker thread. Everything that touches MRML happens in
`apply` / `apply_propagation`, which the caller runs on the main thread once the future is done (in Slicer the widget
checks the future from a Qt timer; tests call `apply(future.result())`).
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from samunet_core.errors import InputError
from samunet_core.session import VolumeSession

from .masking import MaskSettings
from .prompts import SlicePrompts, WorldPrompts, prompts_by_slice
from .propagation import propagate_from_slice
from .volume_view import VolumeView
from .writer import MaskedWriter, SegmentRegionIO, UndoRecord, provenance_tags, read_tags, slab_extent, write_tags


class CorrectionMode(enum.Enum):
    """How a prediction combines with what the segment already holds on that slice."""

    REPLACE = "replace"  # the slice becomes the prediction (within masking)
    ADD = "add"  # the predicted region is added to the existing segment
    REMOVE = "remove"  # the predicted region is removed from the existing segment


@dataclass
class SliceUpdate:
    """A finished prediction for slice k (mask HxW bool in display orientation; None = prompts were removed)."""

    k: int
    generation: int
    prompts: SlicePrompts | None
    mask: np.ndarray | None
    logits: np.ndarray | None = None
    requested_at: float = 0.0
    timings_ms: dict = field(default_factory=dict)


@dataclass
class PropagationResult:
    seed_k: int
    masks: dict[int, np.ndarray]
    direction: str


@dataclass
class _SliceState:
    extent: tuple
    baseline: dict[str, np.ndarray]  # every segment's region before this interaction touched the slice
    written: dict[str, np.ndarray]  # what is in the segmentation now (for skipping redundant writes)
    prompts: SlicePrompts | None = None


class InteractiveSegmenter:
    """Ties a volume, a segmentation and one segment to a predictor for prompt-driven editing.

    settings: MaskSettings or a callable returning the Segment Editor's current ones. save_state_for_undo: hook into
    Slicer's Segment Editor undo (called before the first write of each interaction). point_box_margin_mm: LiteMedSAM
    needs a box; for points-only prompts the box around the positive points is grown by this margin (mm).
    """

    def __init__(self, volume_node, segmentation_node, segment_id: str, predictor, *, axis: str = "axial",
                 cache=None, settings: MaskSettings | Callable[[], MaskSettings] | None = None,
                 save_state_for_undo: Callable[[], object] | None = None,
                 correction: CorrectionMode = CorrectionMode.REPLACE, point_box_margin_mm: float = 25.0,
                 prefetch_radius: int = 2, session: VolumeSession | None = None) -> None:
        if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise InputError(f"segment '{segment_id}' is not in '{segmentation_node.GetName()}'; pick a segment")
        self.segment_id = segment_id
        self.predictor = predictor
        self.correction = correction
        self.point_box_margin_mm = point_box_margin_mm
        self.view = VolumeView(volume_node, axis)
        self.session = session or VolumeSession(predictor, self.view.slice_uint8, self.view.n_slices,
                                                self.view.key, cache=cache, axis=axis,
                                                prefetch_radius=prefetch_radius)
        self.writer = MaskedWriter(SegmentRegionIO(segmentation_node, volume_node), settings, save_state_for_undo)
        self._states: dict[int, _SliceState] = {}
        self._requested: dict[int, SlicePrompts | None] = {}
        self._latest: dict[int, int] = {}
        self._generation = itertools.count(1)
        self._interaction_saved = False
        self._coordinator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="samunet-propagate")
        self.last_latency_ms: float | None = None

    @property
    def frame(self):
        return self.view.frame

    # -- prompts -> requests (main thread, never waits) -----------------------------------------------------------
    def prompts_changed(self, prompts: WorldPrompts) -> list[Future]:
        """Requests for every slice whose prompts differ from what was last asked for."""
        by_slice = prompts_by_slice(prompts, self.frame)
        futures = []
        for k in sorted(set(by_slice) | {k for k, p in self._requested.items() if p is not None}):
            wanted = by_slice.get(k)
            if self._requested.get(k) != wanted:
                futures.append(self.request(k, wanted))
        if by_slice:
            self.session.prefetch(max(by_slice, key=lambda k: self._latest.get(k, 0)))
        return futures

    def request(self, k: int, prompts: SlicePrompts | None) -> Future:
        """Future[SliceUpdate] for slice k with these prompts (None: restore the slice)."""
        generation = next(self._generation)
        self._latest[k] = generation
        self._requested[k] = prompts
        started = time.perf_counter()
        outer: Future = Future()
        if prompts is None:
            outer.set_result(SliceUpdate(k, generation, None, None, requested_at=started))
            return outer
        kwargs = self._model_prompts(k, prompts)
        inner = self.session.segment(k, **kwargs)

        def finish(done: Future) -> None:
            if done.cancelled():
                outer.cancel()
                return
            exc = done.exception()
            if exc is not None:
                outer.set_exception(exc)
                return
            prediction = done.result()
            outer.set_result(SliceUpdate(k, generation, prompts, prediction.masks[0], prediction.logits[:1],
                                         started, dict(prediction.timings_ms)))

        inner.add_done_callback(finish)
        return outer

    def _model_prompts(self, k: int, prompts: SlicePrompts) -> dict:
        points, labels = prompts.points_array(), prompts.labels_array()
        box = prompts.box
        if box is None:
            box = self._derived_box(k, prompts)
        kwargs: dict = {"boxes": np.asarray(box, np.float64)[None]}
        if points is not None:
            kwargs["points"], kwargs["labels"] = points, labels
        return kwargs

    def _derived_box(self, k: int, prompts: SlicePrompts) -> tuple[float, float, float, float]:
        """A box for point-only prompts: the positive points grown by the margin, joined (in correction) with the
        existing mask's box on that slice."""
        rows, cols = self.frame.slice_shape
        labels = np.asarray(prompts.labels)
        positive = np.asarray(prompts.points, np.float64).reshape(-1, 2)[labels == 1]
        spacing = self._in_plane_spacing()
        margin = np.array([self.point_box_margin_mm / spacing[1], self.point_box_margin_mm / spacing[0]])
        lo = np.full(2, np.inf)
        hi = np.full(2, -np.inf)
        if len(positive):
            lo, hi = positive.min(0) - margin, positive.max(0) + margin
        existing = self._baseline_plane(k)
        if (self.correction is not CorrectionMode.REPLACE or not len(positive)) and existing.any():
            r, c = np.nonzero(existing)
            lo = np.minimum(lo, [c.min() - 3, r.min() - 3])
            hi = np.maximum(hi, [c.max() + 3, r.max() + 3])
        if not np.isfinite(lo).all():
            raise InputError("negative points alone do not say what to segment; add a positive point or a box")
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, [cols - 1, rows - 1])
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

    def _in_plane_spacing(self) -> tuple[float, float]:
        """(row, col) pixel size in mm of a displayed slice."""
        origin = self.frame.display_to_world([[0, 0, 0]])[0]
        row = np.linalg.norm(self.frame.display_to_world([[0, 1, 0]])[0] - origin)
        col = np.linalg.norm(self.frame.display_to_world([[0, 0, 1]])[0] - origin)
        return float(row), float(col)

    # -- applying results (main thread) ---------------------------------------------------------------------------
    def _state(self, k: int) -> _SliceState:
        state = self._states.get(k)
        if state is None:
            slab = self.frame.volume_slab(k)
            extent = slab_extent(slab, self.frame.shape_kji)
            baseline = self.writer.snapshot(extent)
            state = _SliceState(extent, baseline, dict(baseline))
            self._states[k] = state
        return state

    def _baseline_plane(self, k: int) -> np.ndarray:
        return self.frame.slab_to_slice(self._state(k).baseline[self.segment_id]) > 0

    def apply(self, update: SliceUpdate) -> bool:
        """Write a finished prediction into the segment; stale results (a newer request exists) are dropped."""
        if self._latest.get(update.k) != update.generation:
            return False
        state = self._state(update.k)
        if update.mask is None:
            regions = state.baseline
            state.prompts = None
        else:
            existing = self.frame.slab_to_slice(state.baseline[self.segment_id]) > 0
            if self.correction is CorrectionMode.ADD:
                desired = existing | update.mask
            elif self.correction is CorrectionMode.REMOVE:
                desired = existing & ~update.mask
            else:
                desired = update.mask
            changed = self.writer.compute(self.segment_id, state.extent, self.frame.slice_to_slab(desired),
                                          state.baseline)
            regions = {sid: changed.get(sid, region) for sid, region in state.baseline.items()}
            state.prompts = update.prompts
        if not self._interaction_saved and self.writer.save_state_for_undo is not None:
            self.writer.save_state_for_undo()
            self._interaction_saved = True
        self.writer.write_regions(state.extent, regions, state.baseline, state.written)
        state.written = dict(regions)
        if update.mask is None and update.k in self._states:
            del self._states[update.k]
        self.last_latency_ms = (time.perf_counter() - update.requested_at) * 1e3
        return True

    # -- accept / clear / undo ------------------------------------------------------------------------------------
    @property
    def has_pending(self) -> bool:
        return bool(self._states)

    def accept(self) -> UndoRecord | None:
        """Keep the current masks: one undo record for the whole interaction, provenance tags, prompts forgotten."""
        if not self._states:
            return None
        segmentation = self.writer.io.segmentation
        record = UndoRecord(description="SAMUNet prompts")
        record.tags[self.segment_id] = read_tags(segmentation, self.segment_id)
        prompts = []
        for _k, state in sorted(self._states.items()):
            for sid, before in state.baseline.items():
                if not np.array_equal(before > 0, state.written[sid] > 0):
                    record.regions.append((sid, state.extent, before))
            if state.prompts is not None:
                prompts.append({**state.prompts.world, "mode": self.correction.value})
        previous = record.tags[self.segment_id].get("SAMUNet.Prompts")
        write_tags(segmentation, self.segment_id, provenance_tags(self.predictor, prompts, previous))
        self.writer.undo_stack.append(record)
        self._forget()
        return record

    def clear(self) -> None:
        """Put every slice touched since the last Accept back as it was."""
        for state in self._states.values():
            self.writer.write_regions(state.extent, state.baseline, state.baseline, state.written)
        self._forget()

    def undo(self) -> UndoRecord | None:
        """Undo the last accepted change (pending, not yet accepted prompts are cleared first)."""
        if self._states:
            self.clear()
            return None
        return self.writer.undo()

    def _forget(self) -> None:
        self._states.clear()
        self._requested.clear()
        self._latest.clear()
        self._interaction_saved = False

    # -- propagation ----------------------------------------------------------------------------------------------
    def current_plane(self, k: int) -> np.ndarray:
        """HxW bool: the selected segment on displayed slice k as it is now."""
        extent = slab_extent(self.frame.volume_slab(k), self.frame.shape_kji)
        return self.frame.slab_to_slice(self.writer.io.read(self.segment_id, extent)) > 0

    def propagate(self, direction: str = "both", seed_k: int | None = None, cancel: threading.Event | None = None,
                  progress: Callable[[int, int], None] | None = None) -> Future:
        """Future[PropagationResult]: the seed slice's mask carried up/down/both (runs off the main thread)."""
        if seed_k is None:
            touched = [k for k, s in self._states.items() if s.prompts is not None]
            if not touched:
                raise InputError("nothing to propagate: segment a slice first (or give seed_k)")
            seed_k = max(touched, key=lambda k: self._latest.get(k, 0))
        seed = self.current_plane(seed_k)  # read on the main thread
        if not seed.any():
            raise InputError(f"slice {seed_k} has no mask to propagate")
        return self._coordinator.submit(
            lambda: PropagationResult(seed_k, propagate_from_slice(self.session, seed_k, seed, direction, cancel,
                                                                   progress), direction))

    def apply_propagation(self, result: PropagationResult) -> UndoRecord | None:
        """Write propagated slices (masked) as one undoable change, with provenance."""
        if not result.masks:
            return None
        self.accept()  # the seed interaction becomes its own undo step
        segmentation = self.writer.io.segmentation
        record = UndoRecord(description=f"SAMUNet propagate {result.direction}")
        record.tags[self.segment_id] = read_tags(segmentation, self.segment_id)
        if self.writer.save_state_for_undo is not None:
            self.writer.save_state_for_undo()
        for k, mask in sorted(result.masks.items()):
            extent = slab_extent(self.frame.volume_slab(k), self.frame.shape_kji)
            baseline = self.writer.snapshot(extent)
            changed = self.writer.compute(self.segment_id, extent, self.frame.slice_to_slab(mask), baseline)
            regions = {sid: changed.get(sid, region) for sid, region in baseline.items()}
            for sid in self.writer.write_regions(extent, regions, baseline):
                record.regions.append((sid, extent, baseline[sid]))
        prompts = [{"axis": self.frame.axis, "propagate": result.direction, "seed_slice": result.seed_k,
                    "slices": sorted(result.masks)}]
        write_tags(segmentation, self.segment_id,
                   provenance_tags(self.predictor, prompts, record.tags[self.segment_id].get("SAMUNet.Prompts")))
        self.writer.undo_stack.append(record)
        return record

    def close(self) -> None:
        self._coordinator.shutdown(wait=False, cancel_futures=True)
        self.session.close()
