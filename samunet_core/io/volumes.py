"""Read NIfTI, NRRD (incl. Slicer .seg.nrrd as a labelmap), DICOM series folders and PNG/JPEG into a `Volume`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core.errors import InputError
from samunet_core.transforms import Geometry, SliceFrame

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".seg.nrrd", ".mha", ".mhd")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr, .seg.nrrd), MetaImage (.mha, .mhd), a folder holding one " \
    "DICOM series, or a 2D PNG/JPEG image"


@dataclass
class Volume:
    """A 3D volume or a 2D image with its geometry.

    array: 3D (nk, nj, ni) on the file's own voxel grid (SimpleITK's numpy order, axial = axis 0 in the usual case);
      2D images: HxW (grey) or HxWx3 (RGB).
    geometry: own grid in LPS (2D images: size (W, H, 1), unit spacing, origin 0, identity direction).
    kind: "nifti", "nrrd", "seg.nrrd", "metaimage", "dicom", "png" or "jpeg".
    dicom_files: the series' files in slice order k (DICOM only); segments: slicerio segment dicts (.seg.nrrd only).
    """

    array: np.ndarray
    geometry: Geometry
    kind: str
    path: Path
    dicom_files: tuple[str, ...] = ()
    segments: list[dict[str, Any]] | None = None

    @property
    def is_2d(self) -> bool:
        return self.kind in ("png", "jpeg")

    @property
    def origin(self) -> tuple[float, float, float]:
        return self.geometry.origin

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def direction(self) -> tuple[float, ...]:
        return self.geometry.direction

    def frame(self, axis: str = "axial") -> SliceFrame:
        """The SliceFrame that displays this volume along `axis` (2D images: axial only)."""
        if self.is_2d and axis != "axial":
            raise InputError(f"{self.path} is a 2D image; it has no {axis} slices (use axis 'axial' or leave it out)")
        return SliceFrame(self.geometry, axis, is_2d=self.is_2d)

    def slices(self, axis: str = "axial") -> np.ndarray:
        """S x H x W[x3] displayed slices (a view)."""
        return self.frame(axis).volume_to_slices(self.array)

    def to_sitk(self):
        """3D volume -> SimpleITK image with the same voxels and geometry."""
        import SimpleITK as sitk

        if self.is_2d:
            raise ValueError("to_sitk is for 3D volumes")
        image = sitk.GetImageFromArray(self.array)
        apply_geometry(image, self.geometry)
        return image


def geometry_from_sitk(image) -> Geometry:
    """SimpleITK 3D image -> Geometry."""
    return Geometry(image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def apply_geometry(image, geometry: Geometry) -> None:
    """Set origin, spacing and direction of a SimpleITK image in place."""
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(geometry.direction)


def geometry_from_ijk_to_lps(matrix: np.ndarray, size: tuple[int, int, int]) -> Geometry:
    """4x4 IJK->LPS matrix (slicerio's ijkToLPS) and (ni, nj, nk) -> Geometry."""
    matrix = np.asarray(matrix, dtype=np.float64)
    axes = matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    direction = tuple((axes / spacing).ravel())
    return Geometry(size=size, origin=tuple(matrix[:3, 3]), spacing=tuple(spacing), direction=direction)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(VOLUME_SUFFIXES + IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a volume or 2D image; raises InputError naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist; check the path")
    if path.is_dir():
        return read_dicom_series(path)
    suffix = _suffix(path)
    if suffix in IMAGE_SUFFIXES:
        return read_image_2d(path)
    if suffix == ".seg.nrrd":
        return read_seg_nrrd_labelmap(path)
    if suffix in VOLUME_SUFFIXES:
        kind = {".nii": "nifti", ".nii.gz": "nifti", ".mha": "metaimage", ".mhd": "metaimage"}.get(suffix, "nrrd")
        return _read_with_sitk(path, kind)
    if suffix == ".dcm":
        raise InputError(f"{path} is a single DICOM file; give the folder that holds the whole series instead")
    raise InputError(f"{path}: unsupported format {suffix or '(no extension)'}; supported: {SUPPORTED}")


def _read_with_sitk(path: Path, kind: str) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {path} as {kind}: {str(exc).strip().splitlines()[-1]}") from exc
    return _volume_from_sitk(image, kind, path)


def _volume_from_sitk(image, kind: str, path: Path, dicom_files: tuple[str, ...] = ()) -> Volume:
    import SimpleITK as sitk

    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise InputError(f"{path} has {image.GetDimension()} dimensions; a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar volume is needed"
        )
    array = sitk.GetArrayFromImage(image)
    return Volume(array=array, geometry=geometry_from_sitk(image), kind=kind, path=path, dicom_files=dicom_files)


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """A folder with exactly one DICOM series -> Volume (kind "dicom", dicom_files in slice order)."""
    import SimpleITK as sitk

    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(f"{folder} holds no DICOM series; give a folder of DICOM slices or a file ({SUPPORTED})")
    if len(series_ids) > 1:
        raise InputError(
            f"{folder} holds {len(series_ids)} DICOM series ({', '.join(series_ids)}); "
            "put each series in its own folder"
        )
    files = reader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"cannot read the DICOM series in {folder}: {str(exc).strip().splitlines()[-1]}") from exc
    return _volume_from_sitk(image, "dicom", folder, dicom_files=tuple(files))


def read_seg_nrrd_labelmap(path: str | os.PathLike) -> Volume:
    """A Slicer .seg.nrrd with one layer -> Volume whose array is the labelmap and `segments` the slicerio segment
    dicts (name, color, labelValue, ...). Overlapping (multi-layer) files: use segmentations.read_segmentation."""
    import slicerio

    path = Path(path)
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # pynrrd raises several types for broken files
        raise InputError(f"cannot read {path} as a Slicer segmentation: {exc}") from exc
    voxels = seg["voxels"]
    if voxels.ndim == 4:
        raise InputError(
            f"{path} has {voxels.shape[0]} overlapping segment layers and cannot be one labelmap; "
            "read it with samunet_core.io.segmentations.read_segmentation"
        )
    array = np.ascontiguousarray(voxels.transpose(2, 1, 0))
    geometry = geometry_from_ijk_to_lps(seg["ijkToLPS"], voxels.shape)
    return Volume(array=array, geometry=geometry, kind="seg.nrrd", path=path, segments=seg.get("segments", []))


def read_image_2d(path: str | os.PathLike) -> Volume:
    """PNG/JPEG -> Volume with HxW (grey, 8 or 16 bit) or HxWx3 uint8 (colour; alpha and palettes become RGB)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "RGB"):
                array = np.asarray(im)
            elif mode == "1":
                array = np.asarray(im.convert("L"))
            elif mode in ("I;16", "I;16B", "I;16L"):
                array = np.asarray(im).astype(np.uint16)
            elif mode in ("I", "F"):
                array = np.asarray(im)
            else:  # P, LA, RGBA, CMYK, YCbCr, ...
                array = np.asarray(im.convert("RGB"))
            fmt = (im.format or "").lower()
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read {path} as an image: {exc}") from exc
    kind = "jpeg" if fmt in ("jpeg", "mpo") or _suffix(path) in (".jpg", ".jpeg") else "png"
    height, width = array.shape[:2]
    return Volume(array=np.ascontiguousarray(array), geometry=Geometry(size=(width, height, 1)), kind=kind, path=path)
