"""Slice-view behaviour the module adds to Slicer's markups widgets (MRML displayable managers, no Qt).

Slicer places a markups point only on a left click with no modifier (Shift + drag pans the view). The module makes a
Shift-click place a point too, in the views where its prompt nodes are shown, and the controller gives that point the
other polarity (read from the modifier while the point's PointPositionDefinedEvent fires).
"""

from __future__ import annotations

import vtk

PLACE_MODIFIER = vtk.vtkEvent.ShiftModifier


def allow_place_with_modifier(markups_displayable_manager, markups_node, modifier: int = PLACE_MODIFIER) -> bool:
    """Let modifier + left click place a control point of `markups_node` in the view of this displayable manager,
    exactly as a plain click does (press reserved, release places). False when the view has no widget for the node
    yet (its display node is not shown there)."""
    import slicer

    display = markups_node.GetDisplayNode()
    widget = markups_displayable_manager.GetWidget(display) if display is not None else None
    if widget is None:
        return False
    w = slicer.vtkSlicerMarkupsWidget
    widget.SetEventTranslation(w.WidgetStateDefine, vtk.vtkCommand.LeftButtonPressEvent, modifier,
                               w.WidgetEventReserved)
    widget.SetEventTranslation(w.WidgetStateDefine, vtk.vtkCommand.LeftButtonReleaseEvent, modifier,
                               w.WidgetEventControlPointPlace)
    return True
