"""Segmentations in memory and on disk: Slicer .seg.nrrd (names, colours, overlaps), NIfTI/NRRD labelmaps, PNG masks.

Every write is atomic (see atomic.py): a crash or Ctrl-C leaves the previous file, never a half-written one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core.errors import InputError
from samunet_core.io.atomic import atomic_path, full_suffix
from samunet_core.io.volumes import apply_geometry, geometry_from_ijk_to_lps, geometry_from_sitk
from samunet_core.transforms import Geometry

# Distinct default colours (0..1 RGB), used in order for segments without a colour.
DEFAULT_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.30, 0.24),
    (0.25, 0.60, 0.85),
    (0.30, 0.75, 0.35),
    (0.95, 0.75, 0.20),
    (0.60, 0.40, 0.80),
    (0.95, 0.50, 0.15),
    (0.20, 0.80, 0.75),
    (0.85, 0.40, 0.65),
    (0.55, 0.55, 0.25),
    (0.50, 0.65, 1.00),
)

# slicerio segment fields that add_segment recomputes from the mask.
_RECOMPUTED_FIELDS = ("labelValue", "layer", "extent")


def default_color(index: int) -> tuple[float, float, float]:
    """Colour (0..1 RGB) for the index-th segment without one."""
    return DEFAULT_COLORS[index % len(DEFAULT_COLORS)]


@dataclass
class Segment:
    """One named segment. mask: bool (nk, nj, ni) on the segmentation's grid (2D: HxW).
    fields: other Slicer segment fields to keep on rewrite (id, terminology, status, tags)."""

    name: str
    mask: np.ndarray
    color: tuple[float, float, float] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Segmentation:
    """Named, possibly overlapping segments on one voxel grid."""

    geometry: Geometry
    segments: list[Segment] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    def get(self, name: str) -> Segment | None:
        """The segment called `name`, or None."""
        return next((s for s in self.segments if s.name == name), None)

    def labelmap(self) -> tuple[np.ndarray, dict[int, str]]:
        """(nk, nj, ni) uint8/uint16 labelmap with values 1..N in segment order, and {value: name}.
        Where segments overlap the later segment's value is kept (a labelmap holds one value per voxel)."""
        dtype = np.uint8 if len(self.segments) < 256 else np.uint16
        out = np.zeros(self.geometry.array_shape, dtype=dtype)
        for value, segment in enumerate(self.segments, start=1):
            out[np.asarray(segment.mask, dtype=bool)] = value
        return out, {value: s.name for value, s in enumerate(self.segments, start=1)}


def segmentation_from_labelmap(
    labelmap: np.ndarray, geometry: Geometry, names: dict[int, str] | None = None
) -> Segmentation:
    """(nk, nj, ni) integer labelmap -> Segmentation with one segment per nonzero value (named from `names` or
    'label_<value>'), in increasing value order."""
    segments = []
    for value in (int(v) for v in np.unique(labelmap) if v != 0):
        name = (names or {}).get(value, f"label_{value}")
        segments.append(Segment(name=name, mask=labelmap == value, color=default_color(len(segments))))
    return Segmentation(geometry=geometry, segments=segments)


def read_segmentation(path: str | os.PathLike, names: dict[int, str] | None = None) -> Segmentation:
    """Read a Slicer .seg.nrrd (names, colours, layers kept) or an integer NIfTI/NRRD labelmap (segments named by
    `names` or 'label_<value>') into a Segmentation."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"segmentation {path} does not exist; check the path")
    if full_suffix(path).lower() == ".seg.nrrd":
        return _read_seg_nrrd(path)
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {path} as a labelmap: {str(exc).strip().splitlines()[-1]}") from exc
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() != 3 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{path} is not a 3D integer labelmap (dimension {image.GetDimension()}, {array.dtype})")
    return segmentation_from_labelmap(array, geometry_from_sitk(image), names)


def _read_seg_nrrd(path: Path) -> Segmentation:
    import slicerio

    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # pynrrd raises several types for broken files
        raise InputError(f"cannot read {path} as a Slicer segmentation: {exc}") from exc
    voxels = seg["voxels"]
    layers = voxels if voxels.ndim == 4 else voxels[np.newaxis]
    geometry = geometry_from_ijk_to_lps(seg["ijkToLPS"], layers.shape[1:])
    segments = []
    for info in seg.get("segments", []):
        layer = layers[info.get("layer", 0)]
        mask = np.ascontiguousarray((layer == info["labelValue"]).transpose(2, 1, 0))
        color = tuple(float(c) for c in info["color"]) if "color" in info else default_color(len(segments))
        fields = {k: v for k, v in info.items() if k not in _RECOMPUTED_FIELDS + ("name", "color")}
        segments.append(Segment(name=info.get("name", info.get("id", f"segment_{len(segments)}")), mask=mask,
                                color=color, fields=fields))
    return Segmentation(geometry=geometry, segments=segments)


def write_seg_nrrd(path: str | os.PathLike, segmentation: Segmentation) -> Path:
    """Write a Slicer .seg.nrrd (slicerio's writer): names, colours, kept fields; overlapping segments go to extra
    layers as Slicer stores them. Atomic. Returns the path."""
    import slicerio

    geometry = segmentation.geometry
    _check_masks(segmentation)
    seg = slicerio.create_segmentation(geometry.size, geometry.ijk_to_lps_matrix(), dtype="uint8")
    seg["containedRepresentationNames"] = ["Binary labelmap"]
    used_ids = {s.fields.get("id") for s in segmentation.segments if s.fields.get("id")}
    for index, segment in enumerate(segmentation.segments):
        info: dict[str, Any] = {k: v for k, v in segment.fields.items() if k not in _RECOMPUTED_FIELDS}
        if "id" not in info:
            info["id"] = _unique_id(segment.name, used_ids)
        info["name"] = segment.name
        info["color"] = [float(c) for c in (segment.color or default_color(index))]
        info.setdefault("nameAutoGenerated", False)
        info.setdefault("colorAutoGenerated", segment.color is None)
        slicerio.add_segment(seg, np.asarray(segment.mask, dtype=bool).transpose(2, 1, 0), info)
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), seg)
    return Path(path)


def _unique_id(name: str, used: set) -> str:
    base = "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "Segment"
    candidate, n = base, 1
    while candidate in used:
        n += 1
        candidate = f"{base}_{n}"
    used.add(candidate)
    return candidate


def _check_masks(segmentation: Segmentation) -> None:
    shape = segmentation.geometry.array_shape
    names = segmentation.names
    if len(set(names)) != len(names):
        raise InputError(f"segment names must be unique, got {names}")
    for segment in segmentation.segments:
        if tuple(np.shape(segment.mask)) != shape:
            raise InputError(f"segment {segment.name!r} has mask shape {np.shape(segment.mask)}, the grid is {shape}")


def write_labelmap(path: str | os.PathLike, segmentation: Segmentation) -> dict[int, str]:
    """Write a NIfTI (.nii/.nii.gz) or NRRD labelmap (values 1..N in segment order, later segments win on overlap)
    with the segmentation's geometry. Atomic. Returns {value: name}."""
    import SimpleITK as sitk

    _check_masks(segmentation)
    labelmap, names = segmentation.labelmap()
    image = sitk.GetImageFromArray(labelmap)
    apply_geometry(image, segmentation.geometry)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return names


def write_png_mask(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """HxW bool mask -> single-channel 8-bit PNG with values 0/255. Atomic."""
    from PIL import Image

    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"a PNG mask must be HxW, got shape {mask.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(np.where(mask.astype(bool), 255, 0).astype(np.uint8), mode="L").save(tmp, format="PNG")
    return Path(path)


def read_png_mask(path: str | os.PathLike) -> np.ndarray:
    """Single-channel PNG mask -> HxW bool (nonzero = inside)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0
