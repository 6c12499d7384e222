"""A real Slicer slice view without Qt, driven by mouse events at display coordinates (test helper).

Built from PyPI slicer-core the way Slicer's qMRMLSliceView / qMRMLSliceWidget wire it up:
a vtkMRMLSliceLogic per view, a vtkRenderer/vtkRenderWindow (offscreen)/vtkRenderWindowInteractor, the slice-view
displayable managers Slicer uses (crosshair, segmentations 2D, markups, ...) in a vtkMRMLDisplayableManagerGroup, and a
vtkMRMLSliceViewInteractorStyle that observes the interactor and hands every mouse event to the displayable managers
first (so in Place mode the markups widget places control points exactly as in Slicer).

Display coordinates are VTK's: pixels, origin at the bottom-left of the view. For a single (non-lightbox) view they
are the slice node's XY coordinates, so XYToRAS maps them to RAS.

    ctx = SlicerContext(scene, volumes_logic)      # one per scene: app logic, markups logic, colours
    red = SliceViewHarness(scene, "Red", "Axial", context=ctx)
    red.show_volume(volume)
    ctx.place_mode(fiducial_node)
    red.click(*red.display_of_ras(ras))            # -> PointPositionDefinedEvent on fiducial_node

Interaction facts (slicer-core 5.11, checked by Testing/slicer/test_slice_view_mouse.py):
- A mouse move in Place mode adds a *preview* control point (PointAddedEvent, status PositionPreview); the left
  button release turns it into a defined one (PointPositionDefinedEvent, status PositionDefined).
- Shift/Ctrl/Alt + left click places nothing: the markups widget maps LeftButtonRelease with NoModifier only
  (Shift + left drag is kept for panning). `allow_place_with_modifier` adds a translation so it does.
- A Box ROI is placed by two clicks (first corner, opposite corner), not by click-and-drag.
"""

from __future__ import annotations

import vtk

SLICE_VIEW_DISPLAYABLE_MANAGERS = (
    "vtkMRMLVolumeGlyphSliceDisplayableManager",
    "vtkMRMLModelSliceDisplayableManager",
    "vtkMRMLCrosshairDisplayableManager",
    "vtkMRMLOrientationMarkerDisplayableManager",
    "vtkMRMLRulerDisplayableManager",
    "vtkMRMLScalarBarDisplayableManager",
    "vtkMRMLSegmentationsDisplayableManager2D",
    "vtkMRMLMarkupsDisplayableManager",
    "vtkMRMLTransformsDisplayableManager2D",
)


def offscreen_rendering_error() -> str | None:
    """None if an offscreen render window can render here, else the reason (for pytest.skip)."""
    try:
        window = vtk.vtkRenderWindow()
        window.SetOffScreenRendering(1)
        if not window.SupportsOpenGL():  # probes a context before anything renders
            return f"offscreen rendering unavailable ({window.GetClassName()} cannot create an OpenGL context)"
        window.SetSize(8, 8)
        window.AddRenderer(vtk.vtkRenderer())
        window.Render()
        window.Finalize()
    except Exception as error:  # noqa: BLE001 - any failure means no offscreen rendering
        return f"offscreen rendering failed: {error!r}"
    return None


class SlicerContext:
    """The application-level pieces Slicer creates once per scene: application logic (with the interaction and
    selection singleton nodes and the slice-logic collection), colours, markups logic (registered as "Markups" so
    the markups displayable manager can create widgets), a crosshair node and the slice orientation presets.

    Pass the volumes logic that loads volumes so it finds the Colors logic (else display nodes get no colour table).
    """

    def __init__(self, scene, volumes_logic=None) -> None:
        import slicer

        self.scene = scene
        if scene.GetFirstNodeByClass("vtkMRMLCrosshairNode") is None:
            crosshair = slicer.vtkMRMLCrosshairNode()
            crosshair.SetCrosshairName("default")
            scene.AddNode(crosshair)

        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(scene)
        self.app_logic.SetSliceLogics(vtk.vtkCollection())
        self.app_logic.SetViewLogics(vtk.vtkCollection())

        self.color_logic = self.app_logic.GetColorLogic()
        self.color_logic.SetMRMLApplicationLogic(self.app_logic)
        self.color_logic.SetMRMLScene(scene)
        self.app_logic.SetModuleLogic("Colors", self.color_logic)

        self.markups_logic = slicer.vtkSlicerMarkupsLogic()
        self.markups_logic.SetMRMLApplicationLogic(self.app_logic)
        self.markups_logic.SetMRMLScene(scene)
        self.app_logic.SetModuleLogic("Markups", self.markups_logic)

        if volumes_logic is not None:
            volumes_logic.SetMRMLApplicationLogic(self.app_logic)
            self.app_logic.SetModuleLogic("Volumes", volumes_logic)

        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)

    @property
    def interaction_node(self):
        return self.app_logic.GetInteractionNode()

    @property
    def selection_node(self):
        return self.app_logic.GetSelectionNode()

    def place_mode(self, markups_node, persistent: bool = False) -> None:
        """What the Markups toolbar does: `markups_node` becomes the active place node, interaction mode Place."""
        selection = self.selection_node
        selection.SetReferenceActivePlaceNodeClassName(markups_node.GetClassName())
        selection.SetActivePlaceNodeID(markups_node.GetID())
        interaction = self.interaction_node
        interaction.SetPlaceModePersistence(1 if persistent else 0)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def view_transform_mode(self) -> None:
        self.interaction_node.SetCurrentInteractionMode(self.interaction_node.ViewTransform)


class SliceViewHarness:
    """One slice view ("Red", "Yellow", "Green", ...) of `scene`, offscreen, with Slicer's interaction.

    Several views of one scene must share one `SlicerContext` (pass `context=`); without it a new one is made.
    """

    def __init__(self, scene, layout_name: str = "Red", orientation: str = "Axial", size=(400, 400),
                 context: SlicerContext | None = None) -> None:
        import slicer

        self.scene = scene
        self.context = context or SlicerContext(scene)
        app_logic = self.context.app_logic
        self.size = (int(size[0]), int(size[1]))

        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.render_window = vtk.vtkRenderWindow()
        self.render_window.SetOffScreenRendering(1)
        self.render_window.SetMultiSamples(0)
        self.render_window.SetSize(*self.size)
        self.render_window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.render_window)
        # The low-level VTK style the MRML style falls back to (as in qMRMLSliceView).
        self.interactor.SetInteractorStyle(vtk.vtkInteractorStyleUser())
        self.interactor.Initialize()

        # Background slice image (what CTK's lightbox renderer manager draws in Slicer): RGBA 0..255 from the logic.
        self._image_mapper = vtk.vtkImageMapper()
        self._image_mapper.SetColorWindow(255)
        self._image_mapper.SetColorLevel(127.5)
        self._image_actor = vtk.vtkActor2D()
        self._image_actor.SetMapper(self._image_mapper)
        self._image_actor.GetProperty().SetDisplayLocationToBackground()
        self._image_actor.VisibilityOff()
        self.renderer.AddViewProp(self._image_actor)
        self._image_connection = None

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(app_logic)  # the factory is a singleton: set it for this view's scene
        for name in SLICE_VIEW_DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(name):
                factory.RegisterDisplayableManager(name)
        # Not factory.InstantiateDisplayableManagers(): it returns a new reference Python never releases (a leak).
        self.displayable_managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.displayable_managers.Initialize(factory, self.renderer)

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app_logic)
        self.logic.SetMRMLScene(scene)
        self.slice_node = self.logic.AddSliceNode(layout_name)
        app_logic.GetSliceLogics().AddItem(self.logic)
        self.slice_node.SetOrientation(orientation)
        self.displayable_managers.SetMRMLDisplayableNode(self.slice_node)

        self.style = slicer.vtkMRMLSliceViewInteractorStyle()
        self.style.SetDisplayableManagers(self.displayable_managers)
        self.style.SetSliceLogic(self.logic)
        self.style.SetInteractor(self.interactor)

        self.logic.ResizeSliceNode(*self.size)
        self.render()

    # --- view -------------------------------------------------------------------------------------------------
    def show_volume(self, volume_node, fit: bool = True) -> None:
        """Background layer = `volume_node`; fit the slice to it and snap the slice plane onto voxel centres."""
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID() if volume_node else None)
        if fit:
            self.logic.FitSliceToBackground()
            self.logic.SnapSliceOffsetToIJK()
        self.render()

    def set_slice_offset(self, offset_mm: float) -> None:
        self.logic.SetSliceOffset(offset_mm)
        self.render()

    @property
    def slice_offset(self) -> float:
        return self.logic.GetSliceOffset()

    def jump_to_ras(self, ras) -> None:
        """Move the slice plane (only its offset, not the in-plane view) through `ras`."""
        self.slice_node.JumpSliceByOffsetting(*[float(v) for v in ras[:3]])
        self.render()

    def slice_normal(self):
        """Unit normal of the slice plane in RAS (third column of SliceToRAS)."""
        m = self.slice_node.GetSliceToRAS()
        return tuple(m.GetElement(r, 2) for r in range(3))

    def render(self) -> None:
        connection = self.logic.GetImageDataConnection()
        if connection is not self._image_connection:
            self._image_connection = connection
            if connection is not None:
                self._image_mapper.SetInputConnection(connection)
            self._image_actor.SetVisibility(connection is not None)
        self.render_window.Render()

    def capture_rgb(self):
        """The rendered view as a (height, width, 3) uint8 array, row 0 at the top."""
        import numpy as np
        from vtk.util.numpy_support import vtk_to_numpy

        self.render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.render_window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)
        return np.ascontiguousarray(pixels[::-1])

    # --- coordinates ------------------------------------------------------------------------------------------
    def ras_of_display(self, x: float, y: float):
        """RAS of display position (x, y) on the current slice plane (through the slice node's XYToRAS)."""
        ras = self.slice_node.GetXYToRAS().MultiplyPoint((float(x), float(y), 0.0, 1.0))
        return tuple(ras[:3])

    def display_of_ras(self, ras, rounded: bool = True):
        """Display position of `ras` projected onto the slice plane; rounded to whole pixels (what a mouse gives)."""
        ras_to_xy = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(self.slice_node.GetXYToRAS(), ras_to_xy)
        x, y, _, _ = ras_to_xy.MultiplyPoint((float(ras[0]), float(ras[1]), float(ras[2]), 1.0))
        return (int(round(x)), int(round(y))) if rounded else (x, y)

    # --- mouse ------------------------------------------------------------------------------------------------
    def _send(self, event: str, x: int, y: int, shift: bool, ctrl: bool, alt: bool) -> None:
        iren = self.interactor
        iren.SetEventInformation(int(x), int(y), int(ctrl), int(shift))
        iren.SetAltKey(int(alt))
        getattr(iren, event)()  # vtkRenderWindowInteractor.MouseMoveEvent() etc.: invokes the VTK event

    def move(self, x: int, y: int, shift: bool = False, ctrl: bool = False, alt: bool = False) -> None:
        self._send("MouseMoveEvent", x, y, shift, ctrl, alt)

    def press(self, x: int, y: int, shift: bool = False, ctrl: bool = False, alt: bool = False) -> None:
        self._send("LeftButtonPressEvent", x, y, shift, ctrl, alt)

    def release(self, x: int, y: int, shift: bool = False, ctrl: bool = False, alt: bool = False) -> None:
        self._send("LeftButtonReleaseEvent", x, y, shift, ctrl, alt)

    def click(self, x: int, y: int, shift: bool = False, ctrl: bool = False, alt: bool = False) -> None:
        """A user's left click: the pointer moves to (x, y), then left press and release there, modifiers held."""
        self.move(x, y, shift, ctrl, alt)
        self.press(x, y, shift, ctrl, alt)
        self.release(x, y, shift, ctrl, alt)

    def drag(self, start, end, steps: int = 5, shift: bool = False) -> None:
        """Left press at `start`, moves with the button down, release at `end`."""
        (x0, y0), (x1, y1) = start, end
        self.move(x0, y0, shift)
        self.press(x0, y0, shift)
        for i in range(1, steps + 1):
            self.move(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), shift)
        self.release(x1, y1, shift)

    def place_box(self, corner1, corner2) -> None:
        """Place a Box ROI the way Slicer does in a slice view: click one corner, move, click the opposite corner."""
        self.click(*corner1)
        self.move(*corner2)
        self.click(*corner2)

    # --- markups widget -----------------------------------------------------------------------------------------
    def markups_widget(self, markups_node):
        """This view's markups widget for `markups_node` (vtkSlicerPointsWidget, vtkSlicerROIWidget, ...) or None."""
        for i in range(self.displayable_managers.GetDisplayableManagerCount()):
            manager = self.displayable_managers.GetNthDisplayableManager(i)
            if manager.IsA("vtkMRMLMarkupsDisplayableManager"):
                return manager.GetWidget(markups_node.GetDisplayNode())
        return None

    def allow_place_with_modifier(self, markups_node, modifier: int = vtk.vtkEvent.ShiftModifier) -> None:
        """Let modifier + left click place a point in this view (Slicer only places with no modifier), through the
        module's own rule (SAMUNetSlicerLib.views), as the widget applies it inside Slicer."""
        from SAMUNetSlicerLib.views import allow_place_with_modifier

        for i in range(self.displayable_managers.GetDisplayableManagerCount()):
            manager = self.displayable_managers.GetNthDisplayableManager(i)
            if manager.IsA("vtkMRMLMarkupsDisplayableManager"):
                if allow_place_with_modifier(manager, markups_node, modifier):
                    return
        raise RuntimeError(f"no markups widget for {markups_node.GetID()} in view {self.slice_node.GetName()}")

    # --- teardown -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Disconnect from the scene and release the render window (breaks the VTK reference cycles)."""
        self.style.SetInteractor(None)
        self.style.SetDisplayableManagers(None)
        self.displayable_managers.SetMRMLDisplayableNode(None)
        self.renderer.RemoveAllViewProps()
        self._image_mapper.RemoveAllInputConnections(0)
        self.context.app_logic.GetSliceLogics().RemoveItem(self.logic)
        self.logic.SetMRMLScene(None)
        self.render_window.Finalize()
        self.interactor.TerminateApp()

    def __enter__(self) -> SliceViewHarness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
