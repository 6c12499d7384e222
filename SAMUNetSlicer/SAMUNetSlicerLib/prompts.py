"""Prompts as markups: positive and negative fiducials and an ROI box, observed through MRML events (no polling).

`PromptObserver` calls back whenever a point is placed, moved or removed or the box changes; `read_prompts` turns
the nodes into world RAS arrays; `prompts_by_slice` groups them by the displayed slice they lie on, in slice pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk

from samunet_core.errors import InputError

from .geometry import SliceFrame

POINT_EVENTS = (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                slicer.vtkMRMLMarkupsNode.PointRemovedEvent)


@dataclass(frozen=True)
class WorldPrompts:
    """positive, negative: Nx3 world RAS; box_corners: 8x3 world RAS corners of the ROI, or None."""

    positive: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    negative: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    box_corners: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return len(self.positive) == 0 and len(self.negative) == 0 and self.box_corners is None


@dataclass(frozen=True)
class SlicePrompts:
    """Prompts on displayed slice k: points Nx2 (x=col, y=row), labels N (1/0), box (x0, y0, x1, y1) or None."""

    k: int
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None
    world: dict = field(default_factory=dict, compare=False, hash=False)

    def points_array(self) -> np.ndarray | None:
        return np.asarray(self.points, np.float64).reshape(-1, 2) if self.points else None

    def labels_array(self) -> np.ndarray | None:
        return np.asarray(self.labels, np.int64) if self.labels else None


def defined_points_world(node) -> np.ndarray:
    """Nx3 world RAS of a markups node's placed control points (points still being placed are skipped)."""
    if node is None:
        return np.zeros((0, 3))
    out = []
    for index in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(index) != slicer.vtkMRMLMarkupsNode.PositionDefined:
            continue
        position = np.zeros(3)
        node.GetNthControlPointPositionWorld(index, position)
        out.append(position)
    return np.asarray(out, np.float64).reshape(-1, 3)


def roi_corners_world(roi_node) -> np.ndarray | None:
    """8x3 world RAS corners of a placed vtkMRMLMarkupsROINode, or None when it is not placed yet."""
    if roi_node is None or roi_node.GetNumberOfControlPoints() == 0:
        return None
    if roi_node.GetNthControlPointPositionStatus(0) != slicer.vtkMRMLMarkupsNode.PositionDefined:
        return None
    size = np.zeros(3)
    roi_node.GetSizeWorld(size)
    matrix = roi_node.GetObjectToWorldMatrix()
    m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    center = np.zeros(3)
    roi_node.GetCenterWorld(center)
    axes = m[:3, :3] / np.maximum(np.linalg.norm(m[:3, :3], axis=0), 1e-12)
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], np.float64)
    return center + (signs * size / 2.0) @ axes.T


def read_prompts(positive_node=None, negative_node=None, roi_node=None) -> WorldPrompts:
    return WorldPrompts(defined_points_world(positive_node), defined_points_world(negative_node),
                        roi_corners_world(roi_node))


def box_on_slice(corners_world: np.ndarray, frame: SliceFrame) -> tuple[int, int, tuple[float, float, float, float]]:
    """8x3 RAS corners -> (first slice, last slice, (x0, y0, x1, y1) pixels clipped to the slice)."""
    display = frame.world_to_display(corners_world)
    rows, cols = frame.slice_shape
    s0 = int(np.floor(display[:, 0].min() + 0.5))
    s1 = int(np.floor(display[:, 0].max() + 0.5))
    x0, x1 = np.clip([display[:, 2].min(), display[:, 2].max()], 0, cols - 1)
    y0, y1 = np.clip([display[:, 1].min(), display[:, 1].max()], 0, rows - 1)
    if x1 <= x0 or y1 <= y0:
        raise InputError("the box does not overlap the image on this slice; draw it over the structure")
    return max(s0, 0), min(s1, frame.n_slices - 1), (float(x0), float(y0), float(x1), float(y1))


def prompts_by_slice(prompts: WorldPrompts, frame: SliceFrame) -> dict[int, SlicePrompts]:
    """Group world prompts by displayed slice: points by their own slice, the box on its centre slice."""
    grouped: dict[int, dict] = {}
    for positions, label in ((prompts.positive, 1), (prompts.negative, 0)):
        for ras in positions:
            k = frame.slice_index(ras)
            _, row, col = frame.world_to_display(ras)[0]
            rows, cols = frame.slice_shape
            if not (-0.5 <= row < rows - 0.5 and -0.5 <= col < cols - 0.5):
                raise InputError(f"a point at RAS {np.round(ras, 1).tolist()} is outside the image; move it onto it")
            entry = grouped.setdefault(k, {"points": [], "labels": [], "box": None, "ras": [], "box_ras": None})
            entry["points"].append((float(col), float(row)))
            entry["labels"].append(label)
            entry["ras"].append([round(float(v), 3) for v in ras])
    if prompts.box_corners is not None:
        centre = prompts.box_corners.mean(axis=0)
        k = frame.slice_index(centre)
        _, _, box = box_on_slice(prompts.box_corners, frame)
        entry = grouped.setdefault(k, {"points": [], "labels": [], "box": None, "ras": [], "box_ras": None})
        entry["box"] = box
        entry["box_ras"] = [np.round(prompts.box_corners.min(0), 3).tolist(),
                            np.round(prompts.box_corners.max(0), 3).tolist()]
    return {k: SlicePrompts(k, tuple(e["points"]), tuple(e["labels"]), e["box"],
                            {"axis": frame.axis, "slice": k, "points_ras": e["ras"], "labels": e["labels"],
                             "box_ras": e["box_ras"]})
            for k, e in grouped.items()}


class PromptObserver:
    """Observes the prompt nodes and calls `on_change()` on every placement, move or removal (MRML events).

    It also remembers the order points were placed in, so the last prompt can be removed (Undo last prompt).
    """

    def __init__(self, on_change: Callable[[], None], positive_node=None, negative_node=None, roi_node=None) -> None:
        self.on_change = on_change
        self.nodes = {"positive": positive_node, "negative": negative_node, "roi": roi_node}
        self._observations: list[tuple[object, int]] = []
        self._placed: list[tuple[object, str]] = []  # (node, control point id) in placement order
        for role, node in self.nodes.items():
            if node is None:
                continue
            events = POINT_EVENTS + ((vtk.vtkCommand.ModifiedEvent,) if role == "roi" else ())
            for event in events:
                # custom MRML events reach Python as "NoEvent", so each event gets its own bound callback
                tag = node.AddObserver(event, lambda caller, _name, event=event: self._on_event(caller, event))
                self._observations.append((node, tag))

    def _on_event(self, caller, event) -> None:
        if event == slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent and caller is not self.nodes["roi"]:
            n = caller.GetNumberOfControlPoints()
            if n:
                self._placed.append((caller, caller.GetNthControlPointID(n - 1)))
        self.on_change()

    def read(self) -> WorldPrompts:
        return read_prompts(self.nodes["positive"], self.nodes["negative"], self.nodes["roi"])

    def remove_last_point(self) -> bool:
        """Remove the most recently placed point still present; True if one was removed."""
        while self._placed:
            node, point_id = self._placed.pop()
            index = node.GetNthControlPointIndexByID(point_id)
            if index >= 0:
                node.RemoveNthControlPoint(index)
                return True
        return False

    def move_last_point(self, source_role: str = "positive", target_role: str = "negative") -> bool:
        """Move the last placed point of one node to the other (a Shift-click makes a negative point)."""
        source, target = self.nodes[source_role], self.nodes[target_role]
        if source is None or target is None or source.GetNumberOfControlPoints() == 0:
            return False
        index = source.GetNumberOfControlPoints() - 1
        position = np.zeros(3)
        source.GetNthControlPointPositionWorld(index, position)
        source.RemoveNthControlPoint(index)
        target.AddControlPointWorld(*position)
        return True

    def clear(self) -> None:
        """Remove every prompt (points and box)."""
        for node in self.nodes.values():
            if node is not None:
                node.RemoveAllControlPoints()
        self._placed.clear()

    def remove(self) -> None:
        """Stop observing."""
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations.clear()
