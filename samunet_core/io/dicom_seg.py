"""DICOM SEG (highdicom) for segmentations of a DICOM series: write one, read one back onto the series grid."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from samunet_core.errors import InputError
from samunet_core.io.atomic import atomic_path
from samunet_core.io.segmentations import Segment, Segmentation, default_color
from samunet_core.io.volumes import Volume

ALGORITHM_NAME = "SAMUNetSlicer"


def _source_datasets(volume: Volume) -> list:
    import pydicom

    if volume.kind != "dicom" or not volume.dicom_files:
        raise InputError(
            f"DICOM SEG needs a DICOM series as input, but {volume.path} is {volume.kind}; write .seg.nrrd or .nii.gz"
        )
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.dicom_files]
    for ds in datasets:
        # An empty SpecificCharacterSet (seen in anonymised data) means the default repertoire; highdicom rejects ''.
        if "SpecificCharacterSet" in ds and not str(ds.SpecificCharacterSet or "").strip():
            del ds.SpecificCharacterSet
    for name in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if any(not str(getattr(ds, name, "") or "").strip() for ds in datasets):
            raise InputError(
                f"the DICOM series in {volume.path} has no {name} (anonymised without UIDs), so a DICOM SEG cannot "
                "reference it; write .seg.nrrd or .nii.gz instead"
            )
    return datasets


def write_dicom_seg(
    path: str | os.PathLike,
    segmentation: Segmentation,
    volume: Volume,
    software_version: str = "0.1.0",
    series_description: str = "SAMUNetSlicer segmentation",
) -> Path:
    """Write a BINARY DICOM SEG referencing the series `volume` was read from. Each segment becomes one DICOM segment
    (label = name, display colour = colour). Empty segments are left out (DICOM SEG cannot hold them). Atomic."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not segmentation.geometry.same_grid(volume.geometry):
        raise InputError(
            f"segmentation grid ({segmentation.geometry.describe()}) differs from the DICOM series "
            f"({volume.geometry.describe()}); a DICOM SEG must be on the series grid"
        )
    datasets = _source_datasets(volume)
    kept = [s for s in segmentation.segments if np.any(s.mask)]
    if not kept:
        raise InputError("every segment is empty; a DICOM SEG needs at least one non-empty segment")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, family=codes.DCM.ArtificialIntelligence, version=software_version
    )
    descriptions = []
    for number, segment in enumerate(kept, start=1):
        rgb = np.clip(np.round(np.array(segment.color or default_color(number - 1)) * 255), 0, 255).astype(int)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=segment.name[:64],
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Tissue,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*(int(v) for v in rgb)),
            )
        )
    # Frames follow the source files, which are in slice order k: (nk, rows=nj, cols=ni, n_segments).
    pixels = np.stack([np.asarray(s.mask, dtype=bool) for s in kept], axis=-1)
    with warnings.catch_warnings():
        # highdicom warns about source attributes it copies unchanged (e.g. a one-component PatientName).
        warnings.simplefilter("ignore", UserWarning)
        seg = _build_seg(hd, datasets, pixels, descriptions, software_version, series_description)
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return Path(path)


def _build_seg(hd, datasets, pixels, descriptions, software_version, series_description):
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="SAMUNetSlicer",
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=software_version,
        device_serial_number="0",
        series_description=series_description,
    )


def read_dicom_seg(path: str | os.PathLike, volume: Volume) -> Segmentation:
    """A DICOM SEG that references the series of `volume` -> Segmentation on that series' grid (names from the
    segment labels, colours from the recommended display colours)."""
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:  # pydicom/highdicom raise several types for non-SEG files
        raise InputError(f"cannot read {path} as a DICOM SEG: {exc}") from exc
    datasets = _source_datasets(volume)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    if not referenced & set(uids):
        raise InputError(f"{path} does not reference any image of the DICOM series in {volume.path}")
    numbers = list(seg.segment_numbers)
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=numbers, assert_missing_frames_are_empty=True
        )
    except RuntimeError:
        # Older writers (e.g. dcmqi) omit SpatialLocationsPreserved; the frame -> source instance references
        # still place each frame on its slice.
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=numbers, assert_missing_frames_are_empty=True,
            ignore_spatial_locations=True,
        )
    segments = []
    for index, number in enumerate(numbers):
        description = seg.get_segment_description(number)
        color = None
        if "RecommendedDisplayCIELabValue" in description:
            lab = hd.color.CIELabColor.from_dicom_value(description.RecommendedDisplayCIELabValue)
            color = tuple(float(c) / 255.0 for c in lab.to_rgb())
        segments.append(
            Segment(name=str(description.segment_label), mask=pixels[..., index].astype(bool),
                    color=color or default_color(index))
        )
    return Segmentation(geometry=volume.geometry, segments=segments)
