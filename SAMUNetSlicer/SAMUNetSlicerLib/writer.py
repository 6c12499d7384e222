"""Region-limited reads and writes of segments, with masking, undo records and provenance tags.

A region is an extent (i0, i1, j0, j1, k0, k1) of the volume's voxel grid, read and written as a KxJxI uint8 array.
Only the segments whose region content changes are written; every write returns an UndoRecord holding the previous
content of exactly those regions (and the previous provenance tags), so undo restores them bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from samunet_core.errors import InputError

from .masking import MaskSettings, apply_masking, visible_segment_ids

Extent = tuple[int, int, int, int, int, int]
TAG_PREFIX = "SAMUNet."
PROVENANCE_KEYS = ("Model", "WeightsSHA256", "Prompts", "SoftwareVersion")


def _empty(extent) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def _union(a: Extent, b: Extent) -> Extent:
    if _empty(a):
        return b
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]), min(a[4], b[4]), max(a[5], b[5]))


def _region_shape(extent: Extent) -> tuple[int, int, int]:
    return extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1


def slab_extent(slab: tuple[slice, slice, slice], shape_kji: tuple[int, int, int]) -> Extent:
    """kji slices (as from SliceFrame.volume_slab) -> vtk extent (i0, i1, j0, j1, k0, k1)."""
    bounds = [s.indices(n)[:2] for s, n in zip(slab, shape_kji, strict=True)]
    (k0, k1), (j0, j1), (i0, i1) = bounds
    return i0, i1 - 1, j0, j1 - 1, k0, k1 - 1


@dataclass
class UndoRecord:
    """Previous contents of the regions one change wrote: (segment id, extent, KxJxI uint8)."""

    regions: list[tuple[str, Extent, np.ndarray]] = field(default_factory=list)
    tags: dict[str, dict[str, str | None]] = field(default_factory=dict)
    description: str = ""


class SegmentRegionIO:
    """Read/write parts of the segments of one segmentation in the voxel grid of one volume."""

    def __init__(self, segmentation_node, volume_node) -> None:
        if _parent_id(segmentation_node) != _parent_id(volume_node):
            raise InputError(f"segmentation '{segmentation_node.GetName()}' and volume '{volume_node.GetName()}' "
                             "are under different transforms; put them under the same one or harden both")
        self.segmentation_node = segmentation_node
        self.volume_node = volume_node
        self._ijk_to_ras = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(self._ijk_to_ras)
        dims = volume_node.GetImageData().GetDimensions()
        self.full_extent: Extent = (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
        if not segmentation_node.GetSegmentation().GetConversionParameter("ReferenceImageGeometry"):
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)

    @property
    def segmentation(self):
        return self.segmentation_node.GetSegmentation()

    def segment_ids(self) -> list[str]:
        seg = self.segmentation
        return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]

    def _reference(self, extent: Extent) -> slicer.vtkOrientedImageData:
        image = slicer.vtkOrientedImageData()
        image.SetExtent(*extent)
        image.SetImageToWorldMatrix(self._ijk_to_ras)
        return image

    def _segment_image(self, segment_id: str) -> slicer.vtkOrientedImageData | None:
        image = slicer.vtkOrientedImageData()
        if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
                self.segmentation_node, segment_id, image, False):
            return None
        return None if _empty(image.GetExtent()) else image

    def read(self, segment_id: str, extent: Extent) -> np.ndarray:
        """KxJxI uint8 (0/1) content of one segment over `extent` of the volume grid."""
        if self.segmentation.GetSegment(segment_id) is None:
            raise InputError(f"segment '{segment_id}' is not in segmentation '{self.segmentation_node.GetName()}'")
        shape = _region_shape(extent)
        image = self._segment_image(segment_id)
        if image is None:
            return np.zeros(shape, np.uint8)
        out = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, self._reference(extent), out)
        scalars = out.GetPointData().GetScalars() if out.GetPointData() else None
        if scalars is None or _empty(out.GetExtent()):
            return np.zeros(shape, np.uint8)
        values = numpy_support.vtk_to_numpy(scalars).reshape(_region_shape(out.GetExtent()))
        result = np.zeros(shape, np.uint8)
        oe = out.GetExtent()
        # the resampled image may cover only part of the asked extent
        k0, j0, i0 = oe[4] - extent[4], oe[2] - extent[2], oe[0] - extent[0]
        kk, jj, ii = values.shape
        result[k0:k0 + kk, j0:j0 + jj, i0:i0 + ii] = values > 0
        return result

    def write(self, segment_id: str, extent: Extent, region: np.ndarray) -> None:
        """Replace one segment's voxels inside `extent` by `region` (KxJxI, nonzero = inside); outside unchanged."""
        if region.shape != _region_shape(extent):
            raise ValueError(f"region shape {region.shape} does not match extent {extent}")
        image = self._segment_image(segment_id)
        target = extent
        if image is not None:
            matches = slicer.vtkOrientedImageDataResample.DoGeometriesMatch(image, self._reference(extent))
            target = _union(tuple(image.GetExtent()) if matches else self.full_extent, extent)
        whole = self.read(segment_id, target) if image is not None else np.zeros(_region_shape(target), np.uint8)
        k0, j0, i0 = extent[4] - target[4], extent[2] - target[2], extent[0] - target[0]
        kk, jj, ii = region.shape
        whole[k0:k0 + kk, j0:j0 + jj, i0:i0 + ii] = region > 0
        labelmap = self._reference(target)
        labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = whole.ravel()
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                labelmap, self.segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
            raise RuntimeError(f"Slicer refused to write segment '{segment_id}'")

    def intensities(self, extent: Extent) -> np.ndarray:
        """KxJxI source volume values over `extent`."""
        array = slicer.util.arrayFromVolume(self.volume_node)
        return array[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1]


def _parent_id(node) -> str | None:
    parent = node.GetParentTransformNode()
    return parent.GetID() if parent is not None else None


class MaskedWriter:
    """Writes a desired mask of the selected segment into a region under the Segment Editor's masking settings.

    settings: a MaskSettings, or a callable returning the current ones (read at each write, so changes the user
    makes in the Segment Editor apply at once). save_state_for_undo: called once before each change so Slicer's own
    Segment Editor undo can revert it too (e.g. the Segment Editor widget's saveStateForUndo).
    """

    def __init__(self, io: SegmentRegionIO, settings: MaskSettings | Callable[[], MaskSettings] | None = None,
                 save_state_for_undo: Callable[[], object] | None = None) -> None:
        self.io = io
        self._settings = settings if settings is not None else MaskSettings()
        self.save_state_for_undo = save_state_for_undo
        self.undo_stack: list[UndoRecord] = []

    @property
    def settings(self) -> MaskSettings:
        return self._settings() if callable(self._settings) else self._settings

    def snapshot(self, extent: Extent) -> dict[str, np.ndarray]:
        """Every segment's content over `extent` (the baseline a live preview is computed from)."""
        return {sid: self.io.read(sid, extent) for sid in self.io.segment_ids()}

    def compute(self, segment_id: str, extent: Extent, desired: np.ndarray,
                baseline: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Regions to write so `segment_id` becomes `desired` within `extent`, masked, relative to `baseline`."""
        settings = self.settings
        intensities = self.io.intensities(extent) if settings.intensity_range is not None else None
        return apply_masking(desired.astype(bool), baseline, segment_id, settings,
                             visible_segment_ids(self.io.segmentation_node), intensities)

    def write_regions(self, extent: Extent, regions: dict[str, np.ndarray], baseline: dict[str, np.ndarray],
                      current: dict[str, np.ndarray] | None = None) -> list[str]:
        """Write regions whose content differs from `current` (default: baseline). Returns the written ids."""
        current = baseline if current is None else current
        written = []
        for sid in self.io.segment_ids():
            new = regions.get(sid, baseline[sid]) if sid in baseline else None
            if new is None or np.array_equal(new > 0, current[sid] > 0):
                continue
            self.io.write(sid, extent, new)
            written.append(sid)
        return written

    def record(self, extent: Extent, baseline: dict[str, np.ndarray], changed_ids: list[str],
               tags_before: dict[str, dict[str, str | None]], description: str) -> UndoRecord:
        """Push an undo record holding `baseline` for the changed segments."""
        record = UndoRecord([(sid, extent, baseline[sid]) for sid in changed_ids], tags_before, description)
        self.undo_stack.append(record)
        return record

    def set_mask(self, segment_id: str, extent: Extent, desired: np.ndarray, description: str = "",
                 provenance: dict[str, str] | None = None) -> UndoRecord:
        """One complete masked change with its undo record (batch and propagation use this)."""
        baseline = self.snapshot(extent)
        regions = self.compute(segment_id, extent, desired, baseline)
        tags_before = {segment_id: read_tags(self.io.segmentation, segment_id)} if provenance else {}
        if regions and self.save_state_for_undo is not None:
            self.save_state_for_undo()
        written = self.write_regions(extent, regions, baseline)
        if provenance:
            write_tags(self.io.segmentation, segment_id, provenance)
        return self.record(extent, baseline, written, tags_before, description)

    def undo(self) -> UndoRecord | None:
        """Restore the regions (and tags) of the last change; None when there is nothing to undo."""
        if not self.undo_stack:
            return None
        record = self.undo_stack.pop()
        restore(self.io, record)
        return record


def restore(io: SegmentRegionIO, record: UndoRecord) -> None:
    for sid, extent, previous in record.regions:
        if io.segmentation.GetSegment(sid) is not None:
            io.write(sid, extent, previous)
    for sid, tags in record.tags.items():
        segment = io.segmentation.GetSegment(sid)
        if segment is None:
            continue
        for key, value in tags.items():
            if value is None:
                segment.RemoveTag(key)
            else:
                segment.SetTag(key, value)


# -- provenance --------------------------------------------------------------------------------------------------
def read_tags(segmentation, segment_id: str) -> dict[str, str | None]:
    """Current values of our provenance tags on a segment (None = absent)."""
    segment = segmentation.GetSegment(segment_id)
    out: dict[str, str | None] = {}
    for key in PROVENANCE_KEYS:
        value = vtk.reference("")
        out[TAG_PREFIX + key] = str(value) if segment.GetTag(TAG_PREFIX + key, value) else None
    return out


def write_tags(segmentation, segment_id: str, provenance: dict[str, str]) -> None:
    segment = segmentation.GetSegment(segment_id)
    for key, value in provenance.items():
        segment.SetTag(TAG_PREFIX + key, value)


def provenance_tags(predictor, prompts: list[dict], previous_prompts: str | None = None) -> dict[str, str]:
    """Tag values for a change: model id, weights sha256, prompts (JSON, appended to earlier ones), versions."""
    import samunet_core

    history = json.loads(previous_prompts) if previous_prompts else []
    weights = getattr(predictor, "weights", None)
    return {
        "Model": str(predictor.model_id),
        "WeightsSHA256": str(getattr(weights, "sha256", "") or "unknown"),
        "Prompts": json.dumps(history + prompts, separators=(",", ":")),
        "SoftwareVersion": f"SAMUNetSlicer {samunet_core.__version__} (samunet_core {samunet_core.__version__})",
    }
