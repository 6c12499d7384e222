"""Every coordinate frame and the intensity windowing, in one tested place.

Frames (numpy only; no SimpleITK needed here):

- physical: LPS or RAS millimetres (RAS = LPS with x and y negated).
- IJK: continuous voxel index (i, j, k) of the volume's OWN grid; a numpy array of that grid is indexed
  ``array[k, j, i]`` (SimpleITK's order).
- LPS index (x, y, z): voxel index of the same voxels reoriented to LPS with a pure axis permutation/flip (what
  ``sitk.DICOMOrient(image, "LPS")`` gives): x grows toward patient Left, y toward Posterior, z toward Superior. Its
  numpy array is ``lps_array[z, y, x]``. For an oblique direction matrix every voxel axis is assigned to its nearest
  LPS axis; points still go through the exact affine, so nothing is resampled.
- slice (s, row, col): slice ``s`` along the chosen axis as Slicer displays it.
  axial: ``lps_array[s]`` (anterior at the top, patient right on the image left);
  coronal: ``lps_array[:, s, :]`` with superior at the top (patient right on the image left);
  sagittal: ``lps_array[:, :, s]`` with superior at the top (anterior on the image left).
  Prompts for the model are (x=col, y=row) in that slice.
- model grid: the slice resized so its longest side is ``target`` (256 for LiteMedSAM), padded bottom/right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

AXES = ("axial", "coronal", "sagittal")

# CT windows in HU, (low, high). soft_tissue matches the evaluation manifest; lung matches its target_windows.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (-160.0, 240.0),  # W 400 / L 40
    "lung": (-1350.0, 150.0),  # W 1500 / L -600
    "bone": (-450.0, 1050.0),  # W 1500 / L 300
    "brain": (0.0, 80.0),  # W 80 / L 40
}
DEFAULT_PERCENTILES = (0.5, 99.5)

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _points(points: Sequence | np.ndarray, width: int = 3) -> np.ndarray:
    """Any point or list of points -> Nx`width` float64 (a single point becomes 1x`width`)."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != width:
        raise ValueError(f"expected points of {width} coordinates, got an array of shape {arr.shape}")
    return arr


def ras_to_lps(points: Sequence | np.ndarray) -> np.ndarray:
    """Nx3 RAS mm -> Nx3 LPS mm (negate x and y)."""
    return _points(points) * _LPS_TO_RAS


def lps_to_ras(points: Sequence | np.ndarray) -> np.ndarray:
    """Nx3 LPS mm -> Nx3 RAS mm (negate x and y)."""
    return _points(points) * _LPS_TO_RAS


@dataclass(frozen=True)
class Geometry:
    """A voxel grid in LPS space, as SimpleITK describes it.

    size: (ni, nj, nk) voxels along i, j, k; the numpy array of this grid has shape (nk, nj, ni).
    origin: LPS mm of the centre of voxel (0, 0, 0). spacing: mm along i, j, k.
    direction: 3x3 row-major, columns are the LPS unit vectors of the i, j, k axes (SimpleITK's GetDirection()).
    """

    size: tuple[int, int, int]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "direction", tuple(float(v) for v in np.asarray(self.direction).ravel()))
        if len(self.size) != 3 or len(self.origin) != 3 or len(self.spacing) != 3 or len(self.direction) != 9:
            raise ValueError("Geometry needs 3 sizes, 3 origin values, 3 spacings and 9 direction values")

    @property
    def array_shape(self) -> tuple[int, int, int]:
        """(nk, nj, ni): the numpy shape of an array on this grid."""
        return self.size[2], self.size[1], self.size[0]

    @property
    def direction_matrix(self) -> np.ndarray:
        """3x3; column c is the LPS direction of voxel axis c (i, j, k)."""
        return np.array(self.direction, dtype=np.float64).reshape(3, 3)

    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix: (i, j, k, 1) -> (L, P, S, 1) mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix * np.array(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix: (i, j, k, 1) -> (R, A, S, 1) mm (Slicer's IJKToRAS)."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.ijk_to_lps_matrix()

    def ijk_to_lps(self, ijk: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 continuous (i, j, k) -> Nx3 LPS mm."""
        m = self.ijk_to_lps_matrix()
        return _points(ijk) @ m[:3, :3].T + m[:3, 3]

    def lps_to_ijk(self, lps: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 LPS mm -> Nx3 continuous (i, j, k) (exact inverse of the affine)."""
        m = self.ijk_to_lps_matrix()
        return np.linalg.solve(m[:3, :3], (_points(lps) - m[:3, 3]).T).T

    def ijk_to_ras(self, ijk: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 continuous (i, j, k) -> Nx3 RAS mm."""
        return lps_to_ras(self.ijk_to_lps(ijk))

    def ras_to_ijk(self, ras: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 RAS mm -> Nx3 continuous (i, j, k)."""
        return self.lps_to_ijk(ras_to_lps(ras))

    def same_grid(self, other: Geometry, tol: float = 1e-3) -> bool:
        """True when size matches and origin, spacing and direction agree within `tol`."""
        return (
            self.size == other.size
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def describe(self) -> str:
        """One line for error messages."""
        return (
            f"size {self.size}, origin {tuple(round(v, 3) for v in self.origin)}, "
            f"spacing {tuple(round(v, 4) for v in self.spacing)}"
        )


@dataclass(frozen=True)
class Reorientation:
    """The axis permutation/flip that takes a volume's own grid to the LPS-oriented grid (exactly invertible).

    source_axis[d]: which voxel axis (0=i, 1=j, 2=k) runs along LPS axis d (0=L, 1=P, 2=S).
    flip[d]: True when that voxel axis runs the opposite way (toward R, A or I).
    source_size: (ni, nj, nk) of the own grid.
    """

    source_axis: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    source_size: tuple[int, int, int]

    @classmethod
    def from_geometry(cls, geometry: Geometry) -> Reorientation:
        """Assign each voxel axis to its nearest LPS axis (largest |direction cosine| first, like DICOMOrient)."""
        weights = np.abs(geometry.direction_matrix)  # [lps axis d, voxel axis a]
        source_axis = [-1, -1, -1]
        free_d, free_a = {0, 1, 2}, {0, 1, 2}
        for _ in range(3):
            d, a = max(((d, a) for d in free_d for a in free_a), key=lambda da: (weights[da], -da[0], -da[1]))
            source_axis[d] = a
            free_d.remove(d)
            free_a.remove(a)
        dmat = geometry.direction_matrix
        flip = tuple(bool(dmat[d, source_axis[d]] < 0) for d in range(3))
        return cls(tuple(source_axis), flip, tuple(geometry.size))

    @property
    def lps_size(self) -> tuple[int, int, int]:
        """(nx, ny, nz): voxels along L, P, S; the LPS numpy array has shape (nz, ny, nx)."""
        return tuple(self.source_size[a] for a in self.source_axis)

    @property
    def is_identity(self) -> bool:
        return self.source_axis == (0, 1, 2) and not any(self.flip)

    def _numpy_perm(self) -> tuple[int, int, int]:
        # LPS numpy axis n is LPS axis 2-n, fed by voxel axis source_axis[2-n], which is own numpy axis 2-source_axis[.]
        return tuple(2 - self.source_axis[2 - n] for n in range(3))

    def array_to_lps(self, array: np.ndarray) -> np.ndarray:
        """(nk, nj, ni, ...) own-grid array -> (nz, ny, nx, ...) LPS array (a view; trailing axes such as RGB kept)."""
        if tuple(array.shape[:3]) != tuple(self.source_size[::-1]):
            raise ValueError(f"array shape {array.shape[:3]} is not this grid's {tuple(self.source_size[::-1])}")
        perm = self._numpy_perm() + tuple(range(3, array.ndim))
        out = array.transpose(perm)
        flips = tuple(n for n in range(3) if self.flip[2 - n])
        return np.flip(out, axis=flips) if flips else out

    def lps_to_array(self, lps_array: np.ndarray) -> np.ndarray:
        """(nz, ny, nx, ...) LPS array -> (nk, nj, ni, ...) own-grid array; exact inverse of `array_to_lps`."""
        if tuple(lps_array.shape[:3]) != tuple(self.lps_size[::-1]):
            raise ValueError(f"array shape {lps_array.shape[:3]} is not the LPS grid's {tuple(self.lps_size[::-1])}")
        flips = tuple(n for n in range(3) if self.flip[2 - n])
        arr = np.flip(lps_array, axis=flips) if flips else lps_array
        inverse = tuple(int(v) for v in np.argsort(self._numpy_perm())) + tuple(range(3, lps_array.ndim))
        return arr.transpose(inverse)

    def ijk_to_lps_index(self, ijk: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 continuous (i, j, k) -> Nx3 continuous LPS index (x, y, z)."""
        ijk = _points(ijk)
        out = np.empty_like(ijk)
        for d in range(3):
            a = self.source_axis[d]
            out[:, d] = (self.source_size[a] - 1) - ijk[:, a] if self.flip[d] else ijk[:, a]
        return out

    def lps_index_to_ijk(self, xyz: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 continuous LPS index (x, y, z) -> Nx3 continuous (i, j, k); exact inverse of `ijk_to_lps_index`."""
        xyz = _points(xyz)
        out = np.empty_like(xyz)
        for d in range(3):
            a = self.source_axis[d]
            out[:, a] = (self.source_size[a] - 1) - xyz[:, d] if self.flip[d] else xyz[:, d]
        return out

    def lps_geometry(self, geometry: Geometry) -> Geometry:
        """The geometry of the reoriented grid (same voxels and physical positions)."""
        dmat = geometry.direction_matrix
        corner_ijk = self.lps_index_to_ijk([0.0, 0.0, 0.0])
        columns, spacing = [], []
        for d in range(3):
            a = self.source_axis[d]
            columns.append(dmat[:, a] * (-1.0 if self.flip[d] else 1.0))
            spacing.append(geometry.spacing[a])
        return Geometry(
            size=self.lps_size,
            origin=tuple(geometry.ijk_to_lps(corner_ijk)[0]),
            spacing=tuple(spacing),
            direction=tuple(np.stack(columns, axis=1).ravel()),
        )


def _check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"unknown slice axis {axis!r}; use one of {', '.join(AXES)}")
    return axis


class SliceFrame:
    """Slices of one volume along one axis, as displayed, and every point conversion to and from them.

    For a 2D image (is_2d=True) the geometry is (W, H, 1) with unit spacing; its array is HxW or HxWxC and it has one
    axial slice, the image itself.
    """

    def __init__(self, geometry: Geometry, axis: str = "axial", is_2d: bool = False) -> None:
        self.geometry = geometry
        self.axis = _check_axis(axis)
        self.is_2d = is_2d
        if is_2d and (axis != "axial" or geometry.size[2] != 1):
            raise ValueError("a 2D image has a single axial slice")
        self.reorientation = Reorientation.from_geometry(geometry)
        nx, ny, nz = self.reorientation.lps_size
        self._lps_size = (nx, ny, nz)
        self.n_slices, self.slice_shape = {
            "axial": (nz, (ny, nx)),
            "coronal": (ny, (nz, nx)),
            "sagittal": (nx, (nz, ny)),
        }[self.axis]

    @classmethod
    def for_image(cls, height: int, width: int) -> SliceFrame:
        """Frame of a 2D image of HxW pixels (pixel (x=col, y=row) = IJK (i=x, j=y, k=0))."""
        return cls(Geometry(size=(width, height, 1)), "axial", is_2d=True)

    # ----- arrays -----
    def volume_to_slices(self, array: np.ndarray) -> np.ndarray:
        """Own-grid array (nk, nj, ni[, C]) (2D image: HxW[xC]) -> S x H x W[xC] displayed slices (a view)."""
        if self.is_2d:
            return np.asarray(array)[None]
        lps = self.reorientation.array_to_lps(np.asarray(array))
        if self.axis == "axial":
            return lps
        if self.axis == "coronal":
            return np.swapaxes(lps, 0, 1)[:, ::-1]
        return np.moveaxis(lps, 2, 0)[:, ::-1]

    def slices_to_volume(self, slices: np.ndarray) -> np.ndarray:
        """S x H x W[xC] displayed slices -> own-grid array (nk, nj, ni[, C]) (2D: HxW[xC]); inverse of the above."""
        slices = np.asarray(slices)
        if self.is_2d:
            return slices[0]
        if self.axis == "axial":
            lps = slices
        elif self.axis == "coronal":
            lps = np.swapaxes(slices[:, ::-1], 0, 1)
        else:
            lps = np.moveaxis(slices[:, ::-1], 0, 2)
        return self.reorientation.lps_to_array(lps)

    def slice_image(self, array: np.ndarray, s: int) -> np.ndarray:
        """Own-grid array -> HxW[xC] displayed slice `s` (a contiguous copy)."""
        if not 0 <= s < self.n_slices:
            raise IndexError(f"slice {s} outside 0..{self.n_slices - 1} ({self.axis})")
        return np.ascontiguousarray(self.volume_to_slices(array)[s])

    # ----- points -----
    def lps_index_to_slice(self, xyz: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 LPS index (x, y, z) -> Nx3 (s, row, col)."""
        xyz = _points(xyz)
        nz = self._lps_size[2]
        x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        if self.axis == "axial":
            return np.stack([z, y, x], axis=1)
        if self.axis == "coronal":
            return np.stack([y, (nz - 1) - z, x], axis=1)
        return np.stack([x, (nz - 1) - z, y], axis=1)

    def slice_to_lps_index(self, srowcol: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 (s, row, col) -> Nx3 LPS index (x, y, z)."""
        p = _points(srowcol)
        nz = self._lps_size[2]
        s, row, col = p[:, 0], p[:, 1], p[:, 2]
        if self.axis == "axial":
            return np.stack([col, row, s], axis=1)
        if self.axis == "coronal":
            return np.stack([col, s, (nz - 1) - row], axis=1)
        return np.stack([s, col, (nz - 1) - row], axis=1)

    def ijk_to_slice(self, ijk: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 continuous (i, j, k) of the own grid -> Nx3 continuous (s, row, col)."""
        return self.lps_index_to_slice(self.reorientation.ijk_to_lps_index(ijk))

    def slice_to_ijk(self, srowcol: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 (s, row, col) -> Nx3 continuous (i, j, k) of the own grid."""
        return self.reorientation.lps_index_to_ijk(self.slice_to_lps_index(srowcol))

    def lps_to_slice(self, lps: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 LPS mm -> Nx3 continuous (s, row, col) (exact affine, then the permutation/flip)."""
        return self.ijk_to_slice(self.geometry.lps_to_ijk(lps))

    def ras_to_slice(self, ras: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 RAS mm -> Nx3 continuous (s, row, col)."""
        return self.lps_to_slice(ras_to_lps(ras))

    def slice_to_lps(self, srowcol: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 (s, row, col) -> Nx3 LPS mm."""
        return self.geometry.ijk_to_lps(self.slice_to_ijk(srowcol))

    def slice_to_ras(self, srowcol: Sequence | np.ndarray) -> np.ndarray:
        """Nx3 (s, row, col) -> Nx3 RAS mm."""
        return lps_to_ras(self.slice_to_lps(srowcol))

    @property
    def slice_spacing(self) -> float | None:
        """mm between the centres of two neighbouring displayed slices (None for a 2D image)."""
        if self.is_2d:
            return None
        a, b = self.slice_to_lps([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
        return float(np.linalg.norm(b - a))


# ----- model input grid -----
def model_scale(height: int, width: int, target: int = 256) -> float:
    """Scale factor that makes the longest side of an HxW slice `target` pixels."""
    return float(target) / float(max(height, width))


def model_resized_shape(height: int, width: int, target: int = 256) -> tuple[int, int]:
    """(h, w) of the resized slice before padding to target x target (SAM's ResizeLongestSide rounding)."""
    scale = model_scale(height, width, target)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def slice_to_model(xy: np.ndarray, height: int, width: int, target: int = 256) -> np.ndarray:
    """...x2 (x, y) in slice pixels (or ...x4 boxes) -> the same in model-grid pixels."""
    return np.asarray(xy, dtype=np.float64) * model_scale(height, width, target)


def model_to_slice(xy: np.ndarray, height: int, width: int, target: int = 256) -> np.ndarray:
    """...x2 (x, y) in model-grid pixels (or ...x4 boxes) -> slice pixels; inverse of `slice_to_model`."""
    return np.asarray(xy, dtype=np.float64) / model_scale(height, width, target)


# ----- intensity -----
def window_to_uint8(array: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Any-shape array -> uint8 of the same shape: clip((I - lo) / (hi - lo), 0, 1) * 255, truncated (not rounded)."""
    if not hi > lo:
        raise ValueError(f"window high ({hi}) must be above low ({lo})")
    array = np.asarray(array)
    out = np.empty(array.shape, dtype=np.uint8)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    chunk = 1 << 22  # float64 temporaries of at most 32 MB
    for start in range(0, flat_in.size, chunk):
        part = (flat_in[start : start + chunk].astype(np.float64) - lo) / (hi - lo)
        flat_out[start : start + chunk] = (np.clip(part, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def percentile_window(array: np.ndarray, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> tuple[float, float]:
    """Whole-array percentiles (default 0.5 and 99.5) as a window (lo, hi); a flat image gets (v, v + 1)."""
    lo, hi = (float(v) for v in np.percentile(np.asarray(array), percentiles))
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def resolve_window(
    array: np.ndarray, window: tuple[float, float] | None = None, preset: str | None = None
) -> tuple[float, float] | None:
    """The window DESIGN.md's rules pick: explicit window, else preset, else None for uint8, else percentiles."""
    if window is not None and preset is not None:
        raise ValueError("give a window or a preset, not both")
    if window is not None:
        lo, hi = (float(v) for v in window)
        if not hi > lo:
            raise ValueError(f"window high ({hi}) must be above low ({lo})")
        return lo, hi
    if preset is not None:
        key = preset.lower().replace("-", "_").replace(" ", "_")
        if key not in CT_PRESETS:
            raise ValueError(f"unknown window preset {preset!r}; use one of {', '.join(CT_PRESETS)}")
        return CT_PRESETS[key]
    if np.asarray(array).dtype == np.uint8:
        return None
    return percentile_window(array)


def to_uint8(array: np.ndarray, window: tuple[float, float] | None = None, preset: str | None = None) -> np.ndarray:
    """Whole volume or image -> uint8 of the same shape by `resolve_window` (uint8 without a window: unchanged)."""
    chosen = resolve_window(array, window, preset)
    if chosen is None:
        return np.asarray(array)
    return window_to_uint8(array, *chosen)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HxW grey, HxWx1, HxWx3 or HxWx4 uint8 -> HxWx3 uint8 (grey replicated, alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"to_rgb needs an 8-bit image (window it first), got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    raise ValueError(f"expected HxW or HxWx(1|3|4) image, got shape {image.shape}")
