"""Segmentation metrics and the simulated user of the evaluation protocols.

Everything here works on boolean numpy masks: HxW for a slice or an image, KxHxW for a volume. Coordinates that go
to the predictor are (x=col, y=row) in slice pixels, max inclusive for boxes.

- `dice`, `nsd`: overlap and normalised surface distance (surface Dice, Nikolov et al. 2021) with a tolerance in the
  units of `spacing` (mm for volumes, pixels for 2D images when spacing is left at 1).
- `largest_component`, `tight_box`, `interior_point`: how the protocols derive a box or a first click from a reference
  mask (8-connected components, ties to the first in row-major order).
- `next_click`: the corrective click at the centre of the largest error region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype != bool:
        array = array != 0
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D or 3D mask, got shape {array.shape}")
    return array


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice 2|P∩G| / (|P| + |G|) of two same-shape masks (HxW or KxHxW); 1.0 when both are empty."""
    p, g = _as_bool(pred, "pred"), _as_bool(ref, "ref")
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and ref {g.shape} differ in shape")
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a mask (same shape, bool): mask voxels with a face neighbour outside the mask.

    Voxels on the array border count as boundary (outside the array is background).
    """
    m = _as_bool(mask, "mask")
    if not m.any():
        return np.zeros_like(m)
    eroded = ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(m.ndim, 1), border_value=0)
    return m & ~eroded


def _distance_to(surface_mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Euclidean distance (in spacing units) from every voxel to the nearest voxel of `surface_mask`."""
    return ndimage.distance_transform_edt(~surface_mask, sampling=spacing)


def nsd(pred: np.ndarray, ref: np.ndarray, tolerance: float, spacing: tuple[float, ...] | None = None) -> float:
    """Normalised surface distance in [0, 1] of two same-shape masks (HxW or KxHxW).

    The fraction of boundary voxels of both masks that lie within `tolerance` of the other mask's boundary, distances
    in the units of `spacing` (one value per array axis, e.g. (row mm, col mm) or (k mm, row mm, col mm); default 1,
    i.e. pixels). 1.0 when both masks are empty, 0.0 when exactly one is.
    Boundaries are voxel boundaries (see `surface`), each boundary voxel weighted equally.
    """
    p, g = _as_bool(pred, "pred"), _as_bool(ref, "ref")
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and ref {g.shape} differ in shape")
    spacing = tuple(float(s) for s in (spacing or (1.0,) * p.ndim))
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {spacing} needs one value per axis of a {p.ndim}D mask")
    sp, sg = surface(p), surface(g)
    n_p, n_g = int(sp.sum()), int(sg.sum())
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    # Distances are only needed near the surfaces: crop to their joint bounding box grown by the tolerance.
    crop = _joint_crop(sp | sg, tolerance, spacing)
    sp_c, sg_c = sp[crop], sg[crop]
    dist_to_g = _distance_to(sg_c, spacing)
    dist_to_p = _distance_to(sp_c, spacing)
    close = int((dist_to_g[sp_c] <= tolerance).sum()) + int((dist_to_p[sg_c] <= tolerance).sum())
    return close / (n_p + n_g)


def _joint_crop(mask: np.ndarray, tolerance: float, spacing: tuple[float, ...]) -> tuple[slice, ...]:
    coords = np.nonzero(mask)
    crop = []
    for axis, idx in enumerate(coords):
        margin = int(np.ceil(tolerance / spacing[axis])) + 2
        crop.append(slice(max(int(idx.min()) - margin, 0), min(int(idx.max()) + margin + 1, mask.shape[axis])))
    return tuple(crop)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """HxW bool: the largest 8-connected component of a 2D mask (ties: the one met first in row-major order).

    An empty mask gives an empty result.
    """
    m = _as_bool(mask, "mask")
    if m.ndim != 2:
        raise ValueError(f"largest_component takes a 2D mask, got shape {m.shape}")
    labels, n = ndimage.label(m, structure=_EIGHT_CONNECTED)
    if n == 0:
        return np.zeros_like(m)
    # ndimage.label numbers components in row-major order of their first pixel, and argmax takes the first maximum.
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels == int(np.argmax(sizes)) + 1


def count_components(mask: np.ndarray) -> int:
    """Number of 8-connected components of a 2D mask."""
    return int(ndimage.label(_as_bool(mask, "mask"), structure=_EIGHT_CONNECTED)[1])


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) = (min col, min row, max col, max row) of a non-empty 2D mask, max inclusive."""
    m = _as_bool(mask, "mask")
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        raise ValueError("tight_box of an empty mask")
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """(x=col, y=row) of the pixel of a non-empty 2D mask farthest from its boundary.

    Exact Euclidean distance to the nearest background pixel, the image border counting as background; ties go to
    the first pixel in row-major order.
    """
    m = _as_bool(mask, "mask")
    if not m.any():
        raise ValueError("interior_point of an empty mask")
    dist = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(col), int(row)


@dataclass(frozen=True)
class Click:
    """One simulated click: (x=col, y=row) in slice pixels, positive (add) or negative (remove)."""

    x: int
    y: int
    positive: bool


def next_click(pred: np.ndarray, ref: np.ndarray) -> Click | None:
    """The corrective click for a 2D prediction against its reference, or None when they agree.

    Error regions are the 8-connected components of the missed (ref & ~pred) and spurious (pred & ~ref) pixels. The
    click goes to the `interior_point` of the largest region: positive if it was missed, negative if spurious. Ties:
    missed before spurious, then the region met first in row-major order.
    """
    p, g = _as_bool(pred, "pred"), _as_bool(ref, "ref")
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"next_click needs two same-shape 2D masks, got {p.shape} and {g.shape}")
    best: tuple[int, np.ndarray, bool] | None = None
    for error, positive in ((g & ~p, True), (p & ~g, False)):
        region = largest_component(error)
        size = int(region.sum())
        if size > 0 and (best is None or size > best[0]):
            best = (size, region, positive)
    if best is None:
        return None
    x, y = interior_point(best[1])
    return Click(x=x, y=y, positive=best[2])
