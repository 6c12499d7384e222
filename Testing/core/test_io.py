"""Reading volumes/images and writing segmentations with real files (samunet_core.io)."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from PIL import Image

from samunet_core.errors import InputError
from samunet_core.io.atomic import atomic_path, partial_files
from samunet_core.io.dicom_seg import read_dicom_seg, write_dicom_seg
from samunet_core.io.segmentations import (
    Segment,
    Segmentation,
    read_png_mask,
    read_segmentation,
    write_labelmap,
    write_png_mask,
    write_seg_nrrd,
)
from samunet_core.io.volumes import read_volume
from samunet_core.transforms import Geometry, window_to_uint8

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "Testing" / "data"
TOTALSEG = DATA / "totalsegmentator"
CTCHEST_SEG = DATA / "slicerio_ctchest" / "Segmentation.seg.nrrd"
CTCHEST_OVERLAP = DATA / "slicerio_ctchest" / "SegmentationOverlapping.seg.nrrd"
DCMQI = DATA / "dcmqi_ct3slice"
LIVER_SPINE_HEART = {1: "liver", 2: "spine", 3: "heart"}


@pytest.fixture(scope="module")
def ct_sm():
    return read_volume(TOTALSEG / "example_ct_sm.nii.gz")


@pytest.fixture(scope="module")
def dcmqi_series():
    return read_volume(DCMQI / "ct-3slice")


def test_read_nifti_keeps_geometry(ct_sm):
    image = sitk.ReadImage(str(TOTALSEG / "example_ct_sm.nii.gz"))
    assert ct_sm.kind == "nifti" and not ct_sm.is_2d
    assert ct_sm.array.shape == (30, 101, 122) and ct_sm.array.dtype == np.int16
    assert ct_sm.origin == pytest.approx(image.GetOrigin())
    assert ct_sm.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert ct_sm.direction == pytest.approx((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    np.testing.assert_array_equal(ct_sm.array, sitk.GetArrayFromImage(image))
    labels = read_volume(TOTALSEG / "example_seg.nii.gz")
    assert labels.geometry.same_grid(ct_sm.geometry)


def test_read_nrrd_volume():
    volume = read_volume(ROOT / "Resources" / "Samples" / "CTChest4.nrrd")
    assert volume.kind == "nrrd" and volume.array.shape == (34, 128, 128)
    assert volume.spacing == pytest.approx((3.046876, 3.046876, 10.0), abs=1e-5)
    assert volume.array.min() == -3024


def test_dicom_series_and_nifti_twin_share_geometry():
    """The DICOM slices (first 4 of the 20-slice series) sit exactly where slices 0-3 of the NIfTI twin sit."""
    series = read_volume(TOTALSEG / "example_ct_dicom_first4")
    assert series.kind == "dicom" and series.array.shape == (4, 512, 512)
    twin_image = sitk.ReadImage(str(TOTALSEG / "example_seg_dicom_on_dicom_grid.nii.gz"))
    twin_first4 = twin_image[:, :, 0:4]
    twin_geometry = Geometry(twin_first4.GetSize(), twin_first4.GetOrigin(), twin_first4.GetSpacing(),
                             twin_first4.GetDirection())
    assert series.geometry.same_grid(twin_geometry, tol=1e-4)
    assert series.origin == pytest.approx((-249.51171875, -437.51171875, -804.5))
    assert series.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    # dicom_files are in slice order: file k lies at z of slice k
    import pydicom

    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in series.dicom_files]
    assert z == pytest.approx([-804.5, -802.5, -800.5, -798.5])
    # physically aligned labels: liver (5) and spleen (1) are soft tissue, not fat/air
    labels = sitk.GetArrayFromImage(twin_first4)
    for value in (1, 5):
        assert 40 < series.array[labels == value].mean() < 120


def test_seg_nrrd_reads_names_colours_and_labelmap():
    segmentation = read_segmentation(CTCHEST_SEG)
    upstream = slicerio.read_segmentation(str(CTCHEST_SEG))
    assert segmentation.names == ["ribs", "cervical vertebral column", "thoracic vertebral column",
                                  "lumbar vertebral column", "right lung", "left lung", "tissue"]
    assert [s.color for s in segmentation.segments] == [pytest.approx(s["color"]) for s in upstream["segments"]]
    ct = read_volume(ROOT / "Resources" / "Samples" / "CTChest4.nrrd")
    assert segmentation.geometry.same_grid(ct.geometry)
    labelmap = read_volume(CTCHEST_SEG)
    assert labelmap.kind == "seg.nrrd" and labelmap.array.shape == ct.array.shape
    assert [s["name"] for s in labelmap.segments] == segmentation.names
    np.testing.assert_array_equal(labelmap.array == 5, segmentation.get("right lung").mask)
    # the right lung is on the patient's right (RAS x > 0)
    k, j, i = np.argwhere(labelmap.array == 5).mean(axis=0)
    assert segmentation.geometry.ijk_to_ras([i, j, k])[0, 0] > 0


def test_seg_nrrd_round_trip_through_slicerio(tmp_path):
    original = read_segmentation(CTCHEST_SEG)
    original.segments[4].color = (0.1, 0.2, 0.3)
    out = write_seg_nrrd(tmp_path / "ctchest.seg.nrrd", original)
    back = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in back["segments"]] == original.names
    assert back["segments"][4]["color"] == pytest.approx([0.1, 0.2, 0.3])
    np.testing.assert_allclose(back["ijkToLPS"], original.geometry.ijk_to_lps_matrix())
    for segment in original.segments:
        np.testing.assert_array_equal(slicerio.segment_mask(back, slicerio.segment_from_name(back, segment.name))
                                      .transpose(2, 1, 0), segment.mask)
    header = nrrd.read_header(str(out))
    assert header["Segment4_Name"] == "right lung" and "Segment4_Extent" in header
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert "TerminologyEntry" in header["Segment0_Tags"]  # upstream terminology kept
    assert [s.name for s in read_segmentation(out).segments] == original.names


def test_overlapping_segments_round_trip(tmp_path):
    original = read_segmentation(CTCHEST_OVERLAP)
    assert len(original.segments) == 8 and original.names[-1] == "overlapping sphere"
    sphere = original.get("overlapping sphere").mask
    assert any((sphere & s.mask).any() for s in original.segments[:-1])
    out = write_seg_nrrd(tmp_path / "overlap.seg.nrrd", original)
    assert slicerio.read_segmentation(str(out))["voxels"].ndim == 4
    back = read_segmentation(out)
    assert back.names == original.names
    for a, b in zip(original.segments, back.segments, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
    with pytest.raises(InputError, match="overlapping"):
        read_volume(CTCHEST_OVERLAP)


def test_nifti_labelmap_round_trip(tmp_path, ct_sm):
    labels = read_volume(TOTALSEG / "example_seg.nii.gz").array
    segmentation = Segmentation(ct_sm.geometry, [Segment("liver", labels == 5), Segment("spleen", labels == 1)])
    names = write_labelmap(tmp_path / "seg.nii.gz", segmentation)
    assert names == {1: "liver", 2: "spleen"}
    back = read_volume(tmp_path / "seg.nii.gz")
    assert back.geometry.same_grid(ct_sm.geometry, tol=1e-5)
    np.testing.assert_array_equal(back.array == 1, labels == 5)
    np.testing.assert_array_equal(back.array == 2, labels == 1)
    again = read_segmentation(tmp_path / "seg.nii.gz", names)
    assert again.names == ["liver", "spleen"]


def test_dicom_seg_written_and_read_back(tmp_path, dcmqi_series):
    labels = read_segmentation(DCMQI / "liver_spine_heart_seg.nrrd", LIVER_SPINE_HEART)
    assert labels.geometry.same_grid(dcmqi_series.geometry)
    out = write_dicom_seg(tmp_path / "seg.dcm", labels, dcmqi_series)
    seg = hd.seg.segread(str(out))
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == ["liver", "spine", "heart"]
    frames_with_voxels = sum(int(s.mask[k].any()) for s in labels.segments for k in range(3))
    assert seg.number_of_frames == frames_with_voxels
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    import pydicom

    assert referenced == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in dcmqi_series.dicom_files}
    back = read_dicom_seg(out, dcmqi_series)
    assert back.names == ["liver", "spine", "heart"]
    for a, b in zip(labels.segments, back.segments, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
        assert b.color == pytest.approx(a.color, abs=0.02)


def test_upstream_dicom_seg_matches_nrrd_labels(dcmqi_series):
    liver = read_dicom_seg(DCMQI / "liver.dcm", dcmqi_series)
    assert liver.names == ["Liver"]
    expected = read_segmentation(DCMQI / "liver_spine_heart_seg.nrrd", LIVER_SPINE_HEART).get("liver").mask
    np.testing.assert_array_equal(liver.segments[0].mask, expected)
    assert expected.sum() == 107098


def test_dicom_seg_refuses_series_without_uids(tmp_path):
    series = read_volume(TOTALSEG / "example_ct_dicom_first4")
    mask = np.zeros(series.geometry.array_shape, bool)
    mask[1, 200:220, 200:220] = True
    with pytest.raises(InputError, match="SOPInstanceUID"):
        write_dicom_seg(tmp_path / "seg.dcm", Segmentation(series.geometry, [Segment("x", mask)]), series)
    assert list(tmp_path.iterdir()) == []


def test_dicom_seg_needs_dicom_input(tmp_path, ct_sm):
    seg = Segmentation(ct_sm.geometry, [Segment("x", np.ones(ct_sm.geometry.array_shape, bool))])
    with pytest.raises(InputError, match="DICOM series"):
        write_dicom_seg(tmp_path / "seg.dcm", seg, ct_sm)


@pytest.fixture(scope="module")
def ct_slice_uint8(ct_sm):
    return window_to_uint8(ct_sm.frame().slice_image(ct_sm.array, 15), -160, 240)


def test_read_png_and_jpeg_grey_and_rgb(tmp_path, ct_slice_uint8):
    grey = ct_slice_uint8
    rgb = np.stack([grey, np.flipud(grey), 255 - grey], axis=-1)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.jpg", quality=95)
    Image.fromarray(grey, "L").save(tmp_path / "grey.jpeg", quality=95)
    Image.fromarray(np.dstack([rgb, np.full_like(grey, 255)]), "RGBA").save(tmp_path / "rgba.png")
    v = read_volume(tmp_path / "grey.png")
    assert v.is_2d and v.kind == "png" and v.array.dtype == np.uint8
    np.testing.assert_array_equal(v.array, grey)
    assert v.geometry.size == (grey.shape[1], grey.shape[0], 1)
    np.testing.assert_array_equal(read_volume(tmp_path / "rgb.png").array, rgb)
    np.testing.assert_array_equal(read_volume(tmp_path / "rgba.png").array, rgb)
    jpg = read_volume(tmp_path / "rgb.jpg")
    assert jpg.kind == "jpeg" and jpg.array.shape == rgb.shape
    with Image.open(tmp_path / "rgb.jpg") as im:
        np.testing.assert_array_equal(jpg.array, np.asarray(im))
    grey_jpg = read_volume(tmp_path / "grey.jpeg").array
    assert grey_jpg.shape == grey.shape and np.abs(grey_jpg.astype(int) - grey).mean() < 3  # lossy, same picture
    assert v.slices().shape == (1, *grey.shape)
    with pytest.raises(InputError, match="2D image"):
        v.frame("coronal")


def test_png_mask_write(tmp_path, ct_slice_uint8):
    mask = ct_slice_uint8 > 128
    out = write_png_mask(tmp_path / "mask.png", mask)
    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (mask.shape[1], mask.shape[0])
        assert set(np.unique(np.asarray(im)).tolist()) == {0, 255}
    np.testing.assert_array_equal(read_png_mask(out), mask)


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path):
    target = tmp_path / "out.seg.nrrd"
    target.write_text("previous result")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".seg.nrrd")
            tmp.write_text("half written")
            raise KeyboardInterrupt
    assert target.read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.seg.nrrd"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_partial_files_are_found_for_their_own_output_only(tmp_path):
    """What a writer killed mid-write leaves is what a running writer has: its temporary file. Another output whose
    name starts the same (a.b beside a) is not mistaken for it."""
    target, other = tmp_path / "a.seg.nrrd", tmp_path / "a.b.seg.nrrd"
    with atomic_path(target) as tmp, atomic_path(other) as other_tmp:
        tmp.write_text("half written")
        other_tmp.write_text("the other writer, still running")
        assert partial_files(target) == [tmp]
        assert partial_files(other) == [other_tmp]
    assert partial_files(target) == [] and target.read_text() == "half written"


def test_writer_failure_keeps_old_file(tmp_path, ct_sm):
    target = tmp_path / "seg.seg.nrrd"
    target.write_text("old")
    bad = Segmentation(ct_sm.geometry, [Segment("x", np.ones((2, 2, 2), bool))])
    with pytest.raises(InputError, match="mask shape"):
        write_seg_nrrd(target, bad)
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_bad_inputs_raise_clear_errors(tmp_path, ct_sm):
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported format .txt"):
        read_volume(tmp_path / "notes.txt")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="cannot read"):
        read_volume(tmp_path / "broken.nii.gz")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read"):
        read_volume(tmp_path / "broken.png")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(empty)
    with pytest.raises(InputError, match="single DICOM file"):
        read_volume(DCMQI / "ct-3slice" / "01.dcm")
    seg = Segmentation(ct_sm.geometry, [Segment("x", np.zeros(ct_sm.geometry.array_shape, bool))])
    with pytest.raises(InputError, match="does not exist"):
        write_seg_nrrd(tmp_path / "no_such_dir" / "x.seg.nrrd", seg)
    with pytest.raises(InputError, match="is a folder"):
        write_seg_nrrd(empty, seg)
    dup = Segmentation(ct_sm.geometry, [seg.segments[0], Segment("x", seg.segments[0].mask)])
    with pytest.raises(InputError, match="unique"):
        write_seg_nrrd(tmp_path / "dup.seg.nrrd", dup)
