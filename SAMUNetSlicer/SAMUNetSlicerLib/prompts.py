"""Prompts as markups: positive and negative fiducials and ROI boxes, read as world RAS arrays.

Which slice and pixel a prompt lands on is the engine's rule (samunet_core.prompts.resolve_prompts); the controller
(controller.py) observes the nodes and turns their events into requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import slicer


@dataclass(frozen=True)
class WorldPrompts:
    """positive, negative: Nx3 world RAS; box_corners: 8x3 world RAS corners of the ROI, or None."""

    positive: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    negative: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    box_corners: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return len(self.positive) == 0 and len(self.negative) == 0 and self.box_corners is None


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
