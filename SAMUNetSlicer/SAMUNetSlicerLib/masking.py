"""Segment Editor masking semantics, applied to one region of voxels.

Which voxels a write may change follows the Segment Editor node the user set up: the editable area (everywhere,
inside/outside all or visible segments, inside one segment), the editable intensity range of the source volume, and
whether other segments may be overwritten (all, visible, none = allow overlap). Without an editor node the defaults
never touch another segment: editable everywhere, overlap allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import slicer

OVERWRITE_ALL = "OverwriteAllSegments"
OVERWRITE_VISIBLE = "OverwriteVisibleSegments"
OVERWRITE_NONE = "OverwriteNone"

_MASK_MODES = {
    slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere: "everywhere",
    slicer.vtkMRMLSegmentationNode.EditAllowedInsideAllSegments: "inside_all",
    slicer.vtkMRMLSegmentationNode.EditAllowedInsideVisibleSegments: "inside_visible",
    slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments: "outside_all",
    slicer.vtkMRMLSegmentationNode.EditAllowedOutsideVisibleSegments: "outside_visible",
    slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment: "inside_single",
}
_OVERWRITE_MODES = {
    slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments: OVERWRITE_ALL,
    slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments: OVERWRITE_VISIBLE,
    slicer.vtkMRMLSegmentEditorNode.OverwriteNone: OVERWRITE_NONE,
}


@dataclass(frozen=True)
class MaskSettings:
    """mask_mode: everywhere | inside_all | inside_visible | outside_all | outside_visible | inside_single."""

    mask_mode: str = "everywhere"
    mask_segment_id: str | None = None
    overwrite: str = OVERWRITE_NONE
    intensity_range: tuple[float, float] | None = None

    @classmethod
    def from_segment_editor_node(cls, node) -> MaskSettings:
        """The settings of a vtkMRMLSegmentEditorNode (None -> the safe defaults)."""
        if node is None:
            return cls()
        intensity = None
        if node.GetSourceVolumeIntensityMask():
            lo, hi = node.GetSourceVolumeIntensityMaskRange()
            intensity = (float(lo), float(hi))
        return cls(mask_mode=_MASK_MODES[node.GetMaskMode()], mask_segment_id=node.GetMaskSegmentID() or None,
                   overwrite=_OVERWRITE_MODES[node.GetOverwriteMode()], intensity_range=intensity)


def visible_segment_ids(segmentation_node) -> set[str]:
    """Segments shown in the views (display node visible and segment visible)."""
    display = segmentation_node.GetDisplayNode()
    ids = [segmentation_node.GetSegmentation().GetNthSegmentID(i)
           for i in range(segmentation_node.GetSegmentation().GetNumberOfSegments())]
    if display is None:
        return set(ids)  # nothing hides them
    if not display.GetVisibility():
        return set()
    return {sid for sid in ids if display.GetSegmentVisibility(sid)}


def editable_region(settings: MaskSettings, selected_id: str, others: dict[str, np.ndarray], visible: set[str],
                    intensities: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Bool array of `shape`: where the selected segment may change. others: segment id -> region (0/1)."""

    def union(ids) -> np.ndarray:
        out = np.zeros(shape, bool)
        for sid in ids:
            out |= others[sid] > 0
        return out

    other_ids = [sid for sid in others if sid != selected_id]
    mode = settings.mask_mode
    if mode == "everywhere":
        editable = np.ones(shape, bool)
    elif mode == "inside_all":
        editable = union(other_ids)
    elif mode == "inside_visible":
        editable = union(s for s in other_ids if s in visible)
    elif mode == "outside_all":
        editable = ~union(other_ids)
    elif mode == "outside_visible":
        editable = ~union(s for s in other_ids if s in visible)
    elif mode == "inside_single":
        sid = settings.mask_segment_id
        editable = (others[sid] > 0) if sid in others else np.zeros(shape, bool)
    else:
        raise ValueError(f"unknown mask mode {mode}")
    if settings.intensity_range is not None and intensities is not None:
        lo, hi = settings.intensity_range
        editable &= (intensities >= lo) & (intensities <= hi)
    return editable


def segments_needed(settings: MaskSettings, selected_id: str, segment_ids, visible: set[str]) -> list[str]:
    """The segments whose voxels a masked change of `selected_id` reads or may change (the selected one first):
    the editable area's segments and, when overwriting is on, the segments it may clear."""
    others = [sid for sid in segment_ids if sid != selected_id]
    wanted: set[str] = set()
    mode = settings.mask_mode
    if mode in ("inside_all", "outside_all"):
        wanted.update(others)
    elif mode in ("inside_visible", "outside_visible"):
        wanted.update(s for s in others if s in visible)
    elif mode == "inside_single" and settings.mask_segment_id in others:
        wanted.add(settings.mask_segment_id)
    if settings.overwrite == OVERWRITE_ALL:
        wanted.update(others)
    elif settings.overwrite == OVERWRITE_VISIBLE:
        wanted.update(s for s in others if s in visible)
    return [selected_id] + [sid for sid in others if sid in wanted]


def apply_masking(desired: np.ndarray, baseline: dict[str, np.ndarray], selected_id: str, settings: MaskSettings,
                  visible: set[str], intensities: np.ndarray | None,
                  allowed: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """New region contents of every segment after setting the selected segment to `desired` under masking.

    desired: bool region; baseline: segment id -> region (0/1) before the change, the selected segment included
    (segments the settings do not involve may be left out, see `segments_needed`). allowed: bool region, the voxels
    this change covers (e.g. the slices of a propagation inside their bounding box); outside it no segment changes.
    Returns only the segments whose region changes.
    """
    shape = desired.shape
    current = baseline[selected_id] > 0
    editable = editable_region(settings, selected_id, baseline, visible, intensities, shape)
    if allowed is not None:
        editable &= np.asarray(allowed, bool)
    new_selected = np.where(editable, desired, current)
    changed: dict[str, np.ndarray] = {}
    if not np.array_equal(new_selected, current):
        changed[selected_id] = new_selected.astype(np.uint8)
    claimed = new_selected & editable
    if settings.overwrite == OVERWRITE_NONE:
        return changed
    for sid, region in baseline.items():
        if sid == selected_id or (settings.overwrite == OVERWRITE_VISIBLE and sid not in visible):
            continue
        cleared = (region > 0) & ~claimed
        if not np.array_equal(cleared, region > 0):
            changed[sid] = cleared.astype(np.uint8)
    return changed
