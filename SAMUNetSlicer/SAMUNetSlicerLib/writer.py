"""Region-limited reads and writes of segments, with masking, undo records and provenance tags.

A region is an extent (i0, i1, j0, j1, k0, k1) of the volume's voxel grid, read as a KxJxI uint8 array. Writes go
through Slicer's segmentation API (`SetBinaryLabelmapToSegment`) in the segmentation's reference image geometry
("Reference image geometry" conversion parameter): a segmentation made on another grid (oversampled, cropped,
another volume's) keeps its geometry, and only the voxels of that grid whose nearest volume voxel changes are
written. Every change returns an UndoRecord holding the previous content of exactly the voxels it wrote (in the grid
it wrote them in) and the previous provenance tags, so undo restores them bit for bit.

Undo in Slicer: a writer can be given an undo history (see `as_undo_history`): Slicer's Segment Editor (logic or
widget) or a vtkSegmentationHistory. It saves a state before each change only when it tracks the segmentation being
written; the Segment Editor may be editing another segmentation, whose history must not get our changes.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from samunet_core.errors import InputError

from .masking import MaskSettings, apply_masking, segments_needed, visible_segment_ids

Extent = tuple[int, int, int, int, int, int]
TAG_PREFIX = "SAMUNet."
PROVENANCE_KEYS = ("Model", "WeightsSHA256", "Prompts", "SoftwareVersion")
SaveState = Callable[[], object]
UndoHistory = Callable[[object], SaveState | None]  # segmentation node -> its save-state function, or None


def _empty(extent) -> bool:
    return extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]


def _union(a: Extent, b: Extent) -> Extent:
    if _empty(a):
        return b
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]), min(a[4], b[4]), max(a[5], b[5]))


def _region_shape(extent: Extent) -> tuple[int, int, int]:
    return extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1


def _sub(inner: Extent, outer: Extent) -> tuple[slice, slice, slice]:
    """kji index of `inner` inside an array covering `outer` (inner within outer)."""
    return (slice(inner[4] - outer[4], inner[5] - outer[4] + 1), slice(inner[2] - outer[2], inner[3] - outer[2] + 1),
            slice(inner[0] - outer[0], inner[1] - outer[0] + 1))


def slab_extent(slab: tuple[slice, slice, slice], shape_kji: tuple[int, int, int]) -> Extent:
    """kji slices (as from SliceFrame.volume_slab) -> vtk extent (i0, i1, j0, j1, k0, k1)."""
    bounds = [s.indices(n)[:2] for s, n in zip(slab, shape_kji, strict=True)]
    (k0, k1), (j0, j1), (i0, i1) = bounds
    return i0, i1 - 1, j0, j1 - 1, k0, k1 - 1


def reference_geometry_parameter() -> str:
    """Slicer's name of the segmentation's reference geometry conversion parameter ("Reference image geometry")."""
    return slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()


def _matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], np.float64)


@dataclass
class UndoRecord:
    """Previous contents of the regions one change wrote: (segment id, extent, KxJxI uint8).

    grid: the 4x4 image-to-RAS matrix of the voxel grid the regions are in (the segmentation's reference grid the
    change was written in), or None for the volume's grid.
    """

    regions: list[tuple[str, Extent, np.ndarray]] = field(default_factory=list)
    tags: dict[str, dict[str, str | None]] = field(default_factory=dict)
    description: str = ""
    grid: np.ndarray | None = None


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
        if not segmentation_node.GetSegmentation().GetConversionParameter(reference_geometry_parameter()):
            # a new segmentation: the volume's grid becomes its reference geometry (an existing one is kept)
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)

    @property
    def segmentation(self):
        return self.segmentation_node.GetSegmentation()

    def segment_ids(self) -> list[str]:
        seg = self.segmentation
        return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]

    # -- grids ----------------------------------------------------------------------------------------------------
    def write_grid(self) -> vtk.vtkMatrix4x4:
        """Image-to-RAS matrix of the grid writes go to: the segmentation's reference geometry (the volume's grid
        when the reference has the volume's lattice or none is set)."""
        geometry = self.segmentation.GetConversionParameter(reference_geometry_parameter())
        if geometry:
            image = slicer.vtkOrientedImageData()
            if slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, image, False):
                matrix = vtk.vtkMatrix4x4()
                image.GetImageToWorldMatrix(matrix)
                if not slicer.vtkOrientedImageDataResample.IsEqual(matrix, self._ijk_to_ras):
                    return matrix
        return self._ijk_to_ras

    def _reference(self, extent: Extent, matrix: vtk.vtkMatrix4x4 | None = None) -> slicer.vtkOrientedImageData:
        image = slicer.vtkOrientedImageData()
        image.SetExtent(*extent)
        image.SetImageToWorldMatrix(matrix if matrix is not None else self._ijk_to_ras)
        return image

    def _image(self, extent: Extent, values: np.ndarray, matrix: vtk.vtkMatrix4x4 | None = None):
        image = self._reference(extent, matrix)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.asarray(values, np.uint8).ravel()
        return image

    def _grid_extent(self, extent: Extent, grid: vtk.vtkMatrix4x4) -> Extent:
        """The voxels of `grid` that overlap the volume voxels of `extent` (Slicer's TransformExtent rule)."""
        to_grid = np.linalg.inv(_numpy(grid)) @ _numpy(self._ijk_to_ras)
        corners = np.array([[i, j, k, 1.0] for i in (extent[0] - 0.5, extent[1] + 0.5)
                            for j in (extent[2] - 0.5, extent[3] + 0.5) for k in (extent[4] - 0.5, extent[5] + 0.5)])
        mapped = (corners @ to_grid.T)[:, :3]
        lo = np.floor(np.round(mapped.min(axis=0) + 0.5, 6)).astype(int)
        hi = np.ceil(np.round(mapped.max(axis=0) - 0.5, 6)).astype(int)
        return int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])

    # -- reads ----------------------------------------------------------------------------------------------------
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
        # segments share labelmap layers in Slicer: this segment's voxels are those holding its label value
        label = self.segmentation.GetSegment(segment_id).GetLabelValue()
        result[k0:k0 + kk, j0:j0 + jj, i0:i0 + ii] = values == label
        return result

    # -- writes ---------------------------------------------------------------------------------------------------
    def write(self, segment_id: str, extent: Extent, region: np.ndarray,
              where: np.ndarray | None = None) -> tuple[Extent, np.ndarray, np.ndarray]:
        """Set one segment's voxels inside `extent` (volume grid) to `region` (KxJxI, nonzero = inside) where `where`
        is true (default: the whole extent); everything else is unchanged. ONE Slicer write, in the segmentation's
        reference grid. Returns (extent in that grid, its previous content there, the grid's 4x4 matrix): what
        `write_in_grid` needs to put it back exactly."""
        if region.shape != _region_shape(extent):
            raise ValueError(f"region shape {region.shape} does not match extent {extent}")
        if where is not None and where.shape != region.shape:
            raise ValueError(f"'where' shape {where.shape} does not match extent {extent}")
        grid = self.write_grid()
        if grid is self._ijk_to_ras:
            previous = self._write(segment_id, extent, region > 0, where, grid)
            return extent, previous, _numpy(grid)
        # another lattice: a voxel of it changes when its nearest volume voxel is one to change (code 1 -> 0, 2 -> 1)
        code = (np.asarray(region) > 0).astype(np.uint8) + 1
        if where is not None:
            code[~np.asarray(where, bool)] = 0
        grid_extent = self._grid_extent(extent, grid)
        out = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            self._image(extent, code), self._reference(grid_extent, grid), out, False, False)
        codes = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(_region_shape(grid_extent))
        previous = self._write(segment_id, grid_extent, codes == 2, codes > 0, grid)
        return grid_extent, previous, _numpy(grid)

    def write_in_grid(self, segment_id: str, extent: Extent, region: np.ndarray, grid: np.ndarray) -> None:
        """Set one segment's voxels inside `extent` of the grid with image-to-RAS `grid` (4x4) to `region`."""
        matrix = _matrix(grid)
        if slicer.vtkOrientedImageDataResample.IsEqual(matrix, self._ijk_to_ras):
            matrix = self._ijk_to_ras
        self._write(segment_id, extent, np.asarray(region) > 0, None, matrix)

    def _write(self, segment_id: str, extent: Extent, values: np.ndarray, where: np.ndarray | None,
               grid: vtk.vtkMatrix4x4) -> np.ndarray:
        """The segment's whole labelmap on `grid` with `values` put into `extent` (where `where`), written once.
        Returns the previous content of `extent`."""
        if self.segmentation.GetSegment(segment_id) is None:
            raise InputError(f"segment '{segment_id}' is not in segmentation '{self.segmentation_node.GetName()}'")
        image = self._segment_image(segment_id)
        target, whole = extent, np.zeros(_region_shape(extent), bool)
        if image is not None:
            out = slicer.vtkOrientedImageData()
            # padded: the union of the segment's extent (brought to `grid`) and `extent`
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                image, self._reference(extent, grid), out, False, True)
            target = tuple(out.GetExtent())
            label = self.segmentation.GetSegment(segment_id).GetLabelValue()  # its layer may hold other segments
            whole = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(_region_shape(target)) == label
        inner = _sub(extent, target)
        previous = whole[inner].astype(np.uint8)
        whole[inner] = values if where is None else np.where(where, values, whole[inner])
        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                self._image(target, whole, grid), self.segmentation_node, segment_id,
                slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
            raise RuntimeError(f"Slicer refused to write segment '{segment_id}'")
        return previous

    def intensities(self, extent: Extent) -> np.ndarray:
        """KxJxI source volume values over `extent`."""
        array = slicer.util.arrayFromVolume(self.volume_node)
        return array[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1]


def _parent_id(node) -> str | None:
    parent = node.GetParentTransformNode()
    return parent.GetID() if parent is not None else None


# -- Slicer's undo -------------------------------------------------------------------------------------------------
def _same_node(a, b) -> bool:
    if a is None or b is None:
        return False
    if a is b:
        return True
    return bool(a.GetID()) and a.GetID() == b.GetID() and a.GetScene() is b.GetScene()


def as_undo_history(source) -> UndoHistory | None:
    """What keeps Slicer's segmentation undo states -> a provider: segmentation node -> the function that saves a
    state of THAT segmentation, or None when `source` tracks another segmentation (checked at every change).

    source: None; a vtkSegmentationHistory (GetSegmentation, SaveState); Slicer's Segment Editor logic
    (vtkSlicerSegmentEditorLogic: GetSegmentationNode, SaveStateForUndo) or widget (qMRMLSegmentEditorWidget:
    segmentationNode(), saveStateForUndo()); a bound method of one of them (e.g. `editor.saveStateForUndo`: its
    owner is used, so it too only saves for the segmentation the editor edits); or a provider already.
    """
    if source is None:
        return None
    owner = getattr(source, "__self__", None)
    for candidate in (source, owner):
        if candidate is None:
            continue
        if hasattr(candidate, "SaveState") and hasattr(candidate, "GetSegmentation"):  # vtkSegmentationHistory
            history = candidate
            return lambda node: history.SaveState if (
                node is not None and history.GetSegmentation() is node.GetSegmentation()) else None
        if hasattr(candidate, "SaveStateForUndo") and hasattr(candidate, "GetSegmentationNode"):  # editor logic
            logic = candidate
            return lambda node: logic.SaveStateForUndo if _same_node(logic.GetSegmentationNode(), node) else None
        if hasattr(candidate, "saveStateForUndo") and hasattr(candidate, "segmentationNode"):  # editor widget
            widget = candidate
            return lambda node: widget.saveStateForUndo if _same_node(widget.segmentationNode(), node) else None
    what = ("give a vtkSegmentationHistory, the Segment Editor (logic or widget) or a function segmentation node -> "
            "save function")
    if not callable(source):
        raise TypeError(f"{source!r} is not an undo history: {what}")
    try:
        takes_node = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                         for p in inspect.signature(source).parameters.values())
    except (TypeError, ValueError):  # not introspectable: taken for a provider
        takes_node = True
    if not takes_node:
        raise TypeError(f"{source!r} saves some segmentation's state but cannot tell which one, so it could record "
                        f"our change in another segmentation's history; {what}")
    return source


class MaskedWriter:
    """Writes a desired mask of the selected segment into a region under the Segment Editor's masking settings.

    settings: a MaskSettings, or a callable returning the current ones (read at each write, so changes the user
    makes in the Segment Editor apply at once). undo_history: what keeps Slicer's undo states, in any form
    `as_undo_history()` takes (the Segment Editor logic or widget, a vtkSegmentationHistory, a provider): a state is
    saved before each change, only when it tracks this writer's segmentation.
    """

    def __init__(self, io: SegmentRegionIO, settings: MaskSettings | Callable[[], MaskSettings] | None = None,
                 undo_history=None) -> None:
        self.io = io
        self._settings = settings if settings is not None else MaskSettings()
        self.undo_history: UndoHistory | None = as_undo_history(undo_history)
        self.undo_stack: list[UndoRecord] = []

    @property
    def settings(self) -> MaskSettings:
        return self._settings() if callable(self._settings) else self._settings

    @property
    def save_state_for_undo(self) -> SaveState | None:
        """Saves a Slicer undo state of this writer's segmentation, or None (no history, or it tracks another)."""
        return self.undo_history(self.io.segmentation_node) if self.undo_history is not None else None

    def snapshot(self, extent: Extent, segment_ids=None) -> dict[str, np.ndarray]:
        """Segments' content over `extent` (default: every segment; the baseline a live preview is computed from)."""
        ids = self.io.segment_ids() if segment_ids is None else segment_ids
        return {sid: self.io.read(sid, extent) for sid in ids}

    def compute(self, segment_id: str, extent: Extent, desired: np.ndarray, baseline: dict[str, np.ndarray],
                allowed: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Regions to write so `segment_id` becomes `desired` within `extent` (where `allowed`), masked, relative to
        `baseline`."""
        settings = self.settings
        intensities = self.io.intensities(extent) if settings.intensity_range is not None else None
        return apply_masking(desired.astype(bool), baseline, segment_id, settings,
                             visible_segment_ids(self.io.segmentation_node), intensities, allowed)

    def write_regions(self, extent: Extent, regions: dict[str, np.ndarray], baseline: dict[str, np.ndarray],
                      current: dict[str, np.ndarray] | None = None) -> list[str]:
        """Write regions whose content differs from `current` (default: baseline), one Slicer write per segment.
        Returns the written ids."""
        current = baseline if current is None else current
        written = []
        for sid in self.io.segment_ids():
            new = regions.get(sid, baseline[sid]) if sid in baseline else None
            if new is None or np.array_equal(new > 0, current[sid] > 0):
                continue
            self.io.write(sid, extent, new, (new > 0) != (current[sid] > 0))
            written.append(sid)
        return written

    def record(self, extent: Extent, baseline: dict[str, np.ndarray], changed_ids: list[str],
               tags_before: dict[str, dict[str, str | None]], description: str) -> UndoRecord:
        """Push an undo record holding `baseline` (volume grid) for the changed segments."""
        record = UndoRecord([(sid, extent, baseline[sid]) for sid in changed_ids], tags_before, description)
        self.undo_stack.append(record)
        return record

    def set_mask(self, segment_id: str, extent: Extent, desired: np.ndarray, description: str = "",
                 provenance: dict[str, str] | None = None) -> UndoRecord:
        """One complete masked change of one region with its undo record."""
        return self.set_slices(segment_id, {extent: desired}, description, provenance)

    def set_slices(self, segment_id: str, slabs: Mapping[Extent, np.ndarray], description: str = "",
                   provenance: dict[str, str] | None = None) -> UndoRecord:
        """Several regions of one segment (e.g. the slices of a propagation: extent -> desired KxJxI) as ONE change:
        masked per voxel with the current settings, each segment written once (one labelmap over the regions'
        bounding box; voxels between the regions are unchanged), one Slicer undo state, one undo record."""
        if self.io.segmentation.GetSegment(segment_id) is None:
            raise InputError(f"segment '{segment_id}' is not in '{self.io.segmentation_node.GetName()}'")
        slabs = {tuple(int(v) for v in extent): np.asarray(desired) for extent, desired in slabs.items()}
        tags_before = {segment_id: read_tags(self.io.segmentation, segment_id)} if provenance else {}
        if not slabs:
            return self._push(UndoRecord([], tags_before, description), segment_id, provenance)
        union: Extent = (0, -1, 0, -1, 0, -1)
        for extent, desired in slabs.items():
            if desired.shape != _region_shape(extent):
                raise ValueError(f"region shape {desired.shape} does not match extent {extent}")
            union = _union(union, extent)
        wanted = np.zeros(_region_shape(union), bool)
        covered = np.zeros(_region_shape(union), bool)
        for extent, desired in slabs.items():
            wanted[_sub(extent, union)] = desired > 0
            covered[_sub(extent, union)] = True
        settings = self.settings
        visible = visible_segment_ids(self.io.segmentation_node)
        baseline = self.snapshot(union, segments_needed(settings, segment_id, self.io.segment_ids(), visible))
        intensities = self.io.intensities(union) if settings.intensity_range is not None else None
        regions = apply_masking(wanted, baseline, segment_id, settings, visible, intensities, covered)
        record = UndoRecord([], tags_before, description)
        if regions:
            save = self.save_state_for_undo
            if save is not None:
                save()
        for sid, new in regions.items():
            grid_extent, previous, grid = self.io.write(sid, union, new, (new > 0) != (baseline[sid] > 0))
            record.regions.append((sid, grid_extent, previous))
            record.grid = grid
        return self._push(record, segment_id, provenance)

    def _push(self, record: UndoRecord, segment_id: str, provenance: dict[str, str] | None) -> UndoRecord:
        if provenance:
            write_tags(self.io.segmentation, segment_id, provenance)
        self.undo_stack.append(record)
        return record

    def undo(self) -> UndoRecord | None:
        """Restore the regions (and tags) of the last change; None when there is nothing to undo."""
        if not self.undo_stack:
            return None
        record = self.undo_stack.pop()
        restore(self.io, record)
        return record


def restore(io: SegmentRegionIO, record: UndoRecord) -> None:
    for sid, extent, previous in record.regions:
        if io.segmentation.GetSegment(sid) is None:
            continue
        if record.grid is None:
            io.write(sid, extent, previous)
        else:
            io.write_in_grid(sid, extent, previous, record.grid)
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
