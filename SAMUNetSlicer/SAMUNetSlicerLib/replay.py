"""Replay a prompt file through the Slicer module's own controller, in a real MRML scene, without Slicer.

    python -m SAMUNetSlicerLib.replay VOLUME --prompts P.json --output OUT.seg.nrrd [--view red|yellow|green]
           [--model M] [--window LO HI | --preset NAME] [--device cpu|cuda|auto] [--cache-dir DIR]

(run with `SAMUNetSlicer/` on PYTHONPATH and the test extras, i.e. PyPI slicer-core, installed). The volume is loaded
by Slicer's volumes logic, three slice views (Red axial, Yellow sagittal, Green coronal) are added, and for each segment
of the prompt file the markups a user would place are placed one at a time in the file's order (boxes first, then
points), each in the chosen view moved to the prompt's slice, each firing the events Slicer fires; the controller
reacts exactly as it does under the widget. A segment with "propagate" is propagated after its boxes (or, without
boxes, after its clicks), so its clicks arrive as corrections that carry; then the segment is accepted.
The segmentation is then saved by Slicer's segmentation storage node. The window is the one `samunet segment` uses
for the same options, so replay and CLI see the same pixels: the two must give the same voxels (one policy).

Exit status 0 on success; 2 with a message naming the problem for bad input (no output file is written).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from samunet_core.errors import InputError
from samunet_core.runtime import RUNTIME_CHOICES

VIEWS = {"red": ("Red", "Axial"), "yellow": ("Yellow", "Sagittal"), "green": ("Green", "Coronal")}
DEFAULT_VIEW = {"axial": "red", "sagittal": "yellow", "coronal": "green"}


def mrml_scene():
    """(scene, segmentations logic, volumes logic): a slicer-core MRML scene with the module logics this module uses,
    and the globals `slicer.util` helpers read inside Slicer (slicer.mrmlScene, slicer.modules)."""
    from types import SimpleNamespace

    import slicer

    scene = slicer.vtkMRMLScene()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)  # registers the segmentation converters
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    slicer.modules = SimpleNamespace(segmentations=SimpleNamespace(logic=lambda: segmentations),
                                     volumes=SimpleNamespace(logic=lambda: volumes))
    return scene, segmentations, volumes


class ReplayScene:
    """A slicer-core MRML scene set up the way Slicer's application sets it up for this module: the logics, the
    interaction, selection and crosshair singletons, and three slice views."""

    def __init__(self) -> None:
        import slicer

        self.slicer = slicer
        self.scene, self.segmentations, self.volumes = mrml_scene()
        for class_name in ("vtkMRMLInteractionNode", "vtkMRMLSelectionNode", "vtkMRMLCrosshairNode"):
            node = self.scene.CreateNodeByClass(class_name)
            node.SetSingletonTag("Singleton")
            self.scene.AddNode(node)
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene)
        self.views = {}
        for name, orientation in VIEWS.values():
            node = self.scene.CreateNodeByClass("vtkMRMLSliceNode")
            node.SetLayoutName(name)
            node.SetName(name)
            node.SetDefaultOrientation(orientation)
            node.SetOrientation(orientation)
            self.scene.AddNode(node)
            self.views[name] = node

    def load_volume(self, path: Path, window: tuple[float, float]):
        volume = self.volumes.AddArchetypeVolume(str(path), path.name.split(".")[0], 0)
        if volume is None or volume.GetImageData() is None:
            raise InputError(f"{path}: Slicer's volume reader could not load it; give a NRRD or NIfTI volume")
        volume.CreateDefaultDisplayNodes()
        display = volume.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevel(window[1] - window[0], (window[0] + window[1]) / 2.0)
        return volume

    def show_slice(self, view: str, ras) -> None:
        """Move a view's slice through a world point (what scrolling to that slice does)."""
        self.views[view].JumpSliceByOffsetting(*map(float, ras))

    def under_mouse(self, view: str, ras) -> None:
        """The crosshair node records the view under the mouse, as Slicer's views do on mouse move."""
        from .geometry import vtk_matrix_to_numpy

        crosshair = self.scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        slice_node = self.views[view]
        ras_to_xy = np.linalg.inv(vtk_matrix_to_numpy(slice_node.GetXYToRAS()))
        xyz = (ras_to_xy @ np.append(np.asarray(ras, float), 1.0))[:3]
        crosshair.SetCursorPositionXYZ(list(map(float, xyz)), slice_node)


def place_point(node, ras) -> None:
    """A click in place mode: Slicer adds a control point and defines its position (PointPositionDefinedEvent)."""
    import vtk

    node.AddControlPointWorld(vtk.vtkVector3d(*map(float, ras)))


def place_box(roi_node, corner1, corner2, normal=(0.0, 0.0, 1.0), axes=None) -> None:
    """Draw a box in a slice view with the states Slicer's ROI widget goes through (measured with a real slice view
    and mouse events in Testing/slicer/test_slice_view_mouse.py): click 1 defines the ROI's point at the first corner
    with no size (a box in progress); click 2 gives it its centre and size at once. Slicer aligns the box with RAS and
    gives it a depth along the view's normal equal to its shorter side. normal: the view's normal (world); axes: align
    the box with these world directions (columns) instead, for a view rotated to an oblique volume's planes."""
    import vtk

    c1, c2 = np.asarray(corner1, float), np.asarray(corner2, float)
    rotation = np.eye(3) if axes is None else np.asarray(axes, float)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    orientation = vtk.vtkMatrix4x4()
    orientation.DeepCopy(matrix.ravel())
    roi_node.SetAndObserveObjectToNodeMatrix(orientation)
    size = np.abs(rotation.T @ (c2 - c1))
    depth_axis = int(np.argmax(np.abs(rotation.T @ np.asarray(normal, float))))
    size[depth_axis] = min(size[a] for a in range(3) if a != depth_axis)
    roi_node.SetSizeWorld(0.0, 0.0, 0.0)
    roi_node.AddControlPointWorld(vtk.vtkVector3d(*c1))  # click 1
    modifying = roi_node.StartModify()  # click 2: Slicer's widget sets both, its events arrive together
    roi_node.SetSizeWorld(*size)
    roi_node.SetNthControlPointPositionWorld(0, vtk.vtkVector3d(*((c1 + c2) / 2.0)))
    roi_node.EndModify(modifying)


def set_box_depth(roi_node, first, last, normal) -> None:
    """Give a placed box the depth between two world points along a view's normal (what dragging its handles in
    another view does): the box becomes a 3D box over the slices it spans."""
    import vtk

    first, last, normal = (np.asarray(v, float) for v in (first, last, normal))
    size, centre = np.zeros(3), np.zeros(3)
    roi_node.GetSizeWorld(size)
    roi_node.GetCenterWorld(centre)
    axes = np.array([[roi_node.GetObjectToWorldMatrix().GetElement(r, c) for c in range(3)] for r in range(3)])
    axes = axes / np.linalg.norm(axes, axis=0)
    depth_axis = int(np.argmax(np.abs(axes.T @ normal)))
    direction = axes[:, depth_axis]
    size[depth_axis] = abs(float(direction @ (last - first)))
    centre = centre + direction * float(direction @ ((first + last) / 2.0 - centre))
    modifying = roi_node.StartModify()
    roi_node.SetSizeWorld(*size)
    roi_node.SetNthControlPointPositionWorld(0, vtk.vtkVector3d(*centre))
    roi_node.EndModify(modifying)


def view_axes(slice_node) -> np.ndarray:
    """3x3 world directions (columns) of a slice view: its x, y and normal."""
    from .geometry import vtk_matrix_to_numpy

    axes = vtk_matrix_to_numpy(slice_node.GetSliceToRAS())[:3, :3]
    return axes / np.linalg.norm(axes, axis=0)


def replay(volume_path: Path, prompts_path: Path, output: Path, *, view: str | None = None, model: str | None = None,
           window: tuple[float, float] | None = None, preset: str | None = None, device: str = "cpu",
           cache=None, predictor=None, runtime: str = "auto") -> Path:
    """Run the replay (see the module doc); returns the output path. InputError for bad input."""
    from samunet_core.interaction import Mode
    from samunet_core.io.volumes import read_volume
    from samunet_core.prompts import read_prompt_file
    from samunet_core.segment import window_volume

    if not str(output).lower().endswith(".seg.nrrd"):
        raise InputError(f"output {output}: replay writes a Slicer segmentation; name it *.seg.nrrd")
    prompts = read_prompt_file(prompts_path)
    engine_volume = read_volume(volume_path)
    if engine_volume.is_2d:
        raise InputError(f"{volume_path} is a 2D image; replay drives slice views of a volume")
    _, used_window = window_volume(engine_volume, window, preset)
    if used_window is None:
        raise InputError(f"{volume_path} is 8-bit; give --window LO HI so the view shows what the model sees")
    view = (view or DEFAULT_VIEW[prompts.axis]).lower()
    if view not in VIEWS:
        raise InputError(f"--view {view}: use one of {', '.join(VIEWS)}")
    view_name = VIEWS[view][0]
    if predictor is None:
        from samunet_core.predictor import load_predictor

        predictor = load_predictor(model, device=device, runtime=runtime)

    from .controller import InteractionController

    mrml = ReplayScene()
    mrml.views[view_name].SetOrientation(prompts.axis.capitalize())
    volume = mrml.load_volume(volume_path, used_window)
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SAMUNet")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.CreateDefaultDisplayNodes()
    controller = InteractionController(mrml.scene, predictor, cache=cache, prefetch_radius=0)
    try:
        for segment in prompts.segments:
            segment_id = segmentation.GetSegmentation().AddEmptySegment(segment["name"], segment["name"])
            if segment["color"] is not None:
                segmentation.GetSegmentation().GetSegment(segment_id).SetColor(*segment["color"])
            controller.start(volume, segmentation, segment_id, mode=Mode(segment.get("mode") or "replace"),
                             window=used_window)
            frame = controller.frame(prompts.axis).frame
            for box in segment["boxes"]:
                c1, c2 = (_to_ras(prompts, frame, c, segment["name"]) for c in box["corners"])
                slices = [frame.ras_to_slice(c)[0] for c in (c1, c2)]
                centre_slice = (slices[0][0] + slices[1][0]) / 2.0
                # the user draws the box on one slice (its centre), then drags its depth if it spans slices
                on_plane = [frame.slice_to_ras(np.array([[centre_slice, *s[1:]]]))[0] for s in slices]
                mrml.show_slice(view_name, (on_plane[0] + on_plane[1]) / 2.0)
                mrml.under_mouse(view_name, (on_plane[0] + on_plane[1]) / 2.0)
                roi = controller.set_tool("box")
                normal = view_axes(mrml.views[view_name])[:, 2]
                place_box(roi, on_plane[0], on_plane[1], normal=normal)
                controller.wait()
                if int(np.floor(slices[0][0] + 0.5)) != int(np.floor(slices[1][0] + 0.5)):
                    set_box_depth(roi, c1, c2, normal)
                    controller.wait()
            if segment["propagate"] and segment["boxes"]:
                # box, Propagate, then the corrections: each click carries to the neighbours as it lands
                controller.propagate("both", axis=prompts.axis)
                controller.wait()
            for point in segment["points"]:
                ras = _to_ras(prompts, frame, point["position"], segment["name"])
                mrml.show_slice(view_name, ras)
                mrml.under_mouse(view_name, ras)
                place_point(controller.set_tool("positive" if point["positive"] else "negative"), ras)
                controller.wait()
            if controller.errors:
                raise InputError(f"segment {segment['name']!r}: {controller.errors[0]}")
            if segment["propagate"] and not segment["boxes"]:
                controller.propagate("both", axis=prompts.axis)
                controller.wait()
            controller.accept()
    finally:
        controller.close()
    return _save(mrml, segmentation, output)


def _to_ras(prompts, frame, position, segment: str) -> np.ndarray:
    """One prompt-file position -> world RAS, through the engine's own conversion (checked to lie in the image)."""
    from samunet_core.prompts import slice_position

    return frame.slice_to_ras(slice_position(prompts, frame, position, segment)[None])[0]


def _save(mrml: ReplayScene, segmentation, output: Path) -> Path:
    """Slicer's segmentation storage node writes the .seg.nrrd; written to a temporary name, then moved."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        partial = Path(tmp) / output.name
        storage = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storage.SetFileName(str(partial))
        if not storage.WriteData(segmentation) or not partial.is_file():
            raise RuntimeError(f"Slicer could not write {output}")
        partial.replace(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m SAMUNetSlicerLib.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("volume", type=Path)
    parser.add_argument("--prompts", type=Path, required=True, help="prompt file (docs/formats.md)")
    parser.add_argument("--output", type=Path, required=True, help="the .seg.nrrd to write")
    parser.add_argument("--view", choices=sorted(VIEWS), help="slice view to place the prompts in (default: the one "
                        "showing the prompt file's axis: red axial, yellow sagittal, green coronal)")
    parser.add_argument("--model", help="registry model name (default: the default model)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"))
    group.add_argument("--preset", help="CT window preset, as for samunet segment")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES,
                        help="encoder runtime, as for samunet segment (default: auto)")
    parser.add_argument("--cache-dir", type=Path, help="embedding cache folder (the one `samunet segment` uses is "
                        "shared: same pixels, same keys); default: memory only")
    args = parser.parse_args(argv)
    try:
        if not args.volume.exists():
            raise InputError(f"volume {args.volume} does not exist; check the path")
        cache = None
        if args.cache_dir is not None:
            from samunet_core.cache import folder_cache

            cache = folder_cache(args.cache_dir)
        out = replay(args.volume, args.prompts, args.output, view=args.view, model=args.model,
                     window=tuple(args.window) if args.window else None, preset=args.preset, device=args.device,
                     cache=cache, runtime=args.runtime)
    except InputError as exc:
        print(f"replay: error: {exc}", file=sys.stderr)
        return 2
    print(f"replay: wrote {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
