"""Where a markup lands: world RAS -> volume IJK -> the displayed slice (k, row, col) of one view orientation.

A displayed slice is a plane of the volume's own voxel grid (no resampling), chosen and flipped so it looks the way
Slicer shows it (DESIGN.md): axial with anterior at the top and patient right on the image left, coronal and sagittal
with superior at the top (sagittal: anterior on the left). Oblique volumes use the voxel plane nearest the view.
The axis bookkeeping (which IJK axis is which display axis, and which way it runs) is samunet_core.transforms's
job; this module only reads the MRML side (matrices, parent transforms, window/level, slice-node orientation).
"""

from __future__ import annotations

import numpy as np
import vtk

from samunet_core import transforms
from samunet_core.errors import InputError

AXES = transforms.AXES


def vtk_matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """vtkMatrix4x4 -> 4x4 float64 array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def node_to_world(node) -> np.ndarray:
    """4x4 matrix from a transformable node's local frame to world RAS. Non-linear parent transforms are refused."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"'{node.GetName()}' is under a non-linear transform; harden it first "
                         "(Data module: right-click the transform > Harden transform)")
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return vtk_matrix_to_numpy(matrix)


def volume_ijk_to_world(volume_node) -> np.ndarray:
    """4x4 matrix: volume voxel index (i, j, k, 1) -> world RAS (mm), parent transform included."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return node_to_world(volume_node) @ vtk_matrix_to_numpy(matrix)


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, dims_ijk: tuple[int, int, int]) -> transforms.Geometry:
    """A 4x4 IJK->RAS matrix and (ni, nj, nk) -> the engine's LPS Geometry of the same grid."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(ijk_to_ras, np.float64)[:3, :]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError("the volume has a zero voxel spacing; fix its geometry (Volumes module > Volume information)")
    return transforms.Geometry(size=dims_ijk, origin=tuple(lps[:, 3]), spacing=tuple(spacing),
                               direction=tuple((lps[:, :3] / spacing).ravel()))


class SliceFrame:
    """One volume seen as a stack of displayed slices along one orientation (MRML side of transforms.SliceFrame).

    shape_kji: the volume array shape as slicer.util.arrayFromVolume gives it (K, J, I).
    """

    def __init__(self, axis: str, ijk_to_world: np.ndarray, shape_kji: tuple[int, int, int]) -> None:
        if axis not in AXES:
            raise InputError(f"unknown view orientation '{axis}'; use one of {', '.join(AXES)}")
        self.axis = axis
        self.ijk_to_world = np.asarray(ijk_to_world, np.float64)
        self.shape_kji = tuple(int(v) for v in shape_kji)
        dims = self.dims_ijk
        self.frame = transforms.SliceFrame(geometry_from_ijk_to_ras(self.ijk_to_world, dims), axis)
        # the own-grid axis that the slice index walks along, and the voxel index of displayed slice 0 on it
        step = self.frame.slice_to_ijk([[1.0, 0.0, 0.0]])[0] - self.frame.slice_to_ijk([[0.0, 0.0, 0.0]])[0]
        self._slab_ijk_axis = int(np.argmax(np.abs(step)))
        self._slab_sign = int(np.sign(step[self._slab_ijk_axis]))
        self._slab_first = int(round(self.frame.slice_to_ijk([[0.0, 0.0, 0.0]])[0][self._slab_ijk_axis]))
        slab_dims = list(dims)
        slab_dims[self._slab_ijk_axis] = 1
        self._slab_frame = transforms.SliceFrame(
            transforms.Geometry(size=tuple(slab_dims), direction=self.frame.geometry.direction), axis)

    @classmethod
    def for_volume(cls, volume_node, axis: str) -> SliceFrame:
        image = volume_node.GetImageData()
        if image is None:
            raise InputError(f"volume '{volume_node.GetName()}' has no image data; load it again")
        dims = image.GetDimensions()
        return cls(axis, volume_ijk_to_world(volume_node), (dims[2], dims[1], dims[0]))

    @property
    def dims_ijk(self) -> tuple[int, int, int]:
        return self.shape_kji[2], self.shape_kji[1], self.shape_kji[0]

    @property
    def n_slices(self) -> int:
        return self.frame.n_slices

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(rows, cols) of one displayed slice."""
        return tuple(self.frame.slice_shape)

    # -- points ---------------------------------------------------------------------------------------------------
    def world_to_display(self, ras: np.ndarray) -> np.ndarray:
        """Nx3 world RAS -> Nx3 continuous (slice, row, col); round the slice to pick the voxel plane."""
        return self.frame.ras_to_slice(np.atleast_2d(np.asarray(ras, np.float64)))

    def display_to_world(self, display: np.ndarray) -> np.ndarray:
        """Nx3 (slice, row, col) -> Nx3 world RAS."""
        return self.frame.slice_to_ras(np.atleast_2d(np.asarray(display, np.float64)))

    def slice_index(self, ras: np.ndarray) -> int:
        """The displayed slice a world point lies on (nearest voxel plane); InputError when outside the volume."""
        k = int(np.floor(self.world_to_display(ras)[0, 0] + 0.5))
        if not 0 <= k < self.n_slices:
            raise InputError(f"the prompt at RAS {np.round(np.asarray(ras, float).ravel(), 1).tolist()} is outside "
                             f"the volume ({self.axis} slice {k} of 0..{self.n_slices - 1}); place it on the image")
        return k

    # -- arrays ---------------------------------------------------------------------------------------------------
    def slice_of(self, array_kji: np.ndarray, k: int) -> np.ndarray:
        """(rows, cols) view of displayed slice k of a KxJxI array."""
        return self.frame.volume_to_slices(array_kji)[k]

    def volume_slab(self, k: int) -> tuple[slice, slice, slice]:
        """kji index of the one-voxel-thick slab holding displayed slice k (for region reads/writes)."""
        voxel = self._slab_first + self._slab_sign * int(k)
        index = [slice(None)] * 3
        index[2 - self._slab_ijk_axis] = slice(voxel, voxel + 1)
        return tuple(index)  # type: ignore[return-value]

    def slab_to_slice(self, slab_kji: np.ndarray) -> np.ndarray:
        """A one-voxel-thick KxJxI slab (from volume_slab) -> (rows, cols) in display orientation."""
        return self._slab_frame.volume_to_slices(slab_kji)[0]

    def slice_to_slab(self, plane: np.ndarray) -> np.ndarray:
        """(rows, cols) display-oriented plane -> the one-voxel-thick KxJxI slab it fills."""
        return np.ascontiguousarray(self._slab_frame.slices_to_volume(np.asarray(plane)[None]))


VIEW_ALIGNMENT_DEGREES = 1.0  # a view more than this off every voxel plane is oblique: its image is resampled
VIEW_NAMES = ("Red", "Yellow", "Green")


def slice_normal(slice_node) -> np.ndarray:
    """Unit normal (world RAS) of a slice view's plane."""
    normal = vtk_matrix_to_numpy(slice_node.GetSliceToRAS())[:3, 2]
    return normal / np.linalg.norm(normal)


def distance_to_view_plane(slice_node, ras: np.ndarray) -> float:
    """|signed distance| in mm from a world RAS point to a slice view's plane."""
    matrix = vtk_matrix_to_numpy(slice_node.GetSliceToRAS())
    return float(abs(np.dot(np.asarray(ras, np.float64) - matrix[:3, 3], slice_normal(slice_node))))


def view_axis(slice_node, ijk_to_world: np.ndarray) -> str:
    """The volume orientation (axial/coronal/sagittal) whose voxel planes a slice view shows.

    The view's normal must be parallel to one of the volume's voxel axes (within VIEW_ALIGNMENT_DEGREES): an oblique
    view shows a resampled image the model never sees, so prompts there are refused with the way out.
    """
    directions = np.asarray(ijk_to_world, np.float64)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    cosines = np.abs(directions.T @ slice_normal(slice_node))
    ijk_axis = int(np.argmax(cosines))
    angle = float(np.degrees(np.arccos(min(1.0, cosines[ijk_axis]))))
    if angle > VIEW_ALIGNMENT_DEGREES:
        name = slice_node.GetLayoutName() or slice_node.GetName()
        raise InputError(f"the {name} view is oblique to the volume's voxel planes ({angle:.1f} degrees off); "
                         "prompts need a view on the volume's planes: in that view's menu choose "
                         "'Rotate to volume plane', then place the prompt again")
    for axis in AXES:
        step = transforms.SliceFrame(geometry_from_ijk_to_ras(ijk_to_world, (2, 2, 2)), axis)
        delta = step.slice_to_ijk([[1.0, 0.0, 0.0]])[0] - step.slice_to_ijk([[0.0, 0.0, 0.0]])[0]
        if int(np.argmax(np.abs(delta))) == ijk_axis:
            return axis
    raise AssertionError("every voxel axis belongs to one display axis")


def display_window(volume_node) -> tuple[float, float]:
    """(lo, hi) intensity window of the volume's display node: what the user sees maps to 0..255."""
    display = volume_node.GetDisplayNode()
    if display is None:
        raise InputError(f"volume '{volume_node.GetName()}' has no display node; show it in a slice view first")
    window, level = float(display.GetWindow()), float(display.GetLevel())
    if window <= 0:
        raise InputError(f"volume '{volume_node.GetName()}' has window {window}; set a positive window")
    return level - window / 2.0, level + window / 2.0
