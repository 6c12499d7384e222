"""Coordinate frames and windowing (samunet_core.transforms) against SimpleITK and real volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samunet_core.transforms import (
    AXES,
    CT_PRESETS,
    Geometry,
    Reorientation,
    SliceFrame,
    lps_to_ras,
    model_resized_shape,
    model_scale,
    model_to_slice,
    percentile_window,
    ras_to_lps,
    resolve_window,
    slice_to_model,
    to_rgb,
    to_uint8,
    window_to_uint8,
)

DATA = Path(__file__).resolve().parents[1] / "data"
TOTALSEG = DATA / "totalsegmentator"


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [n for n in range(3) if n != axis]
    m = np.eye(3)
    m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    return m


# Direction matrices: identity, RAS-stored NIfTI, a permuted sagittal acquisition, and two oblique ones.
DIRECTIONS = {
    "identity": np.eye(3),
    "ras_nifti": np.diag([-1.0, -1.0, 1.0]),
    "sagittal_acq": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
    "oblique_x20": rotation(0, 20.0) @ np.diag([1.0, -1.0, 1.0]),
    "oblique_mixed": rotation(2, -35.0) @ rotation(1, 25.0) @ np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], float),
}


def make_image(direction: np.ndarray, size=(7, 5, 6)) -> sitk.Image:
    rng = np.random.default_rng(1)
    image = sitk.GetImageFromArray(rng.integers(-1000, 1000, size[::-1]).astype(np.int16))
    image.SetDirection(tuple(np.asarray(direction, float).ravel()))
    image.SetSpacing((0.8, 1.3, 2.5))
    image.SetOrigin((-12.0, 30.5, 101.0))
    return image


def geometry_of(image: sitk.Image) -> Geometry:
    return Geometry(image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection())


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_reorientation_matches_sitk_dicomorient(name):
    image = make_image(DIRECTIONS[name])
    oriented = sitk.DICOMOrient(image, "LPS")
    reo = Reorientation.from_geometry(geometry_of(image))
    lps = reo.array_to_lps(sitk.GetArrayFromImage(image))
    np.testing.assert_array_equal(lps, sitk.GetArrayFromImage(oriented))
    assert reo.lps_geometry(geometry_of(image)).same_grid(geometry_of(oriented), tol=1e-9)
    np.testing.assert_array_equal(reo.lps_to_array(lps), sitk.GetArrayFromImage(image))


@pytest.mark.parametrize("name", list(DIRECTIONS))
@pytest.mark.parametrize("axis", AXES)
def test_slices_round_trip_and_points_agree_with_voxels(name, axis):
    image = make_image(DIRECTIONS[name])
    array = sitk.GetArrayFromImage(image)
    frame = SliceFrame(geometry_of(image), axis)
    slices = frame.volume_to_slices(array)
    assert slices.shape == (frame.n_slices, *frame.slice_shape)
    np.testing.assert_array_equal(frame.slices_to_volume(slices), array)
    # every voxel: its (s, row, col) in the displayed stack holds that voxel's value
    ii, jj, kk = np.meshgrid(*(np.arange(n) for n in image.GetSize()), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(float)
    src = frame.ijk_to_slice(ijk)
    assert np.allclose(src, np.round(src))
    s, r, c = np.round(src).astype(int).T
    np.testing.assert_array_equal(slices[s, r, c], array[kk.ravel(), jj.ravel(), ii.ravel()])
    np.testing.assert_allclose(frame.slice_to_ijk(src), ijk, atol=1e-9)


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_physical_round_trips_are_exact(name):
    image = make_image(DIRECTIONS[name])
    geometry = geometry_of(image)
    rng = np.random.default_rng(2)
    ijk = rng.uniform(-0.5, 5.5, size=(50, 3))
    lps = geometry.ijk_to_lps(ijk)
    for point_ijk, point_lps in zip(ijk[:5], lps[:5], strict=True):
        np.testing.assert_allclose(image.TransformContinuousIndexToPhysicalPoint(point_ijk.tolist()), point_lps)
    np.testing.assert_allclose(geometry.lps_to_ijk(lps), ijk, atol=1e-9)
    np.testing.assert_allclose(geometry.ras_to_ijk(geometry.ijk_to_ras(ijk)), ijk, atol=1e-9)
    np.testing.assert_allclose(lps_to_ras(lps)[:, :2], -lps[:, :2])
    np.testing.assert_allclose(ras_to_lps(lps_to_ras(lps)), lps)
    for axis in AXES:
        frame = SliceFrame(geometry, axis)
        np.testing.assert_allclose(frame.slice_to_ras(frame.ras_to_slice(lps_to_ras(lps))), lps_to_ras(lps), atol=1e-9)
        np.testing.assert_allclose(frame.slice_to_lps(frame.lps_to_slice(lps)), lps, atol=1e-9)


@pytest.mark.parametrize("name", ["oblique_x20", "oblique_mixed", "sagittal_acq", "ras_nifti"])
def test_displayed_slices_follow_the_patient_axes(name):
    """Axial: s grows to superior, rows to posterior, cols to patient left; coronal/sagittal: superior at the top."""
    image = make_image(DIRECTIONS[name], size=(9, 8, 7))
    geometry = geometry_of(image)
    expectations = {  # axis -> (LPS component growing with s, with row (sign), with col)
        "axial": (2, (1, +1), 0),
        "coronal": (1, (2, -1), 0),
        "sagittal": (0, (2, -1), 1),
    }
    for axis, (s_comp, (row_comp, row_sign), col_comp) in expectations.items():
        frame = SliceFrame(geometry, axis)
        h, w = frame.slice_shape
        centre = np.array([frame.n_slices // 2, h // 2, w // 2], float)
        base = frame.slice_to_lps(centre)[0]
        step_s = frame.slice_to_lps(centre + [1, 0, 0])[0] - base
        step_r = frame.slice_to_lps(centre + [0, 1, 0])[0] - base
        step_c = frame.slice_to_lps(centre + [0, 0, 1])[0] - base
        assert np.argmax(np.abs(step_s)) == s_comp and step_s[s_comp] > 0, (axis, step_s)
        assert np.argmax(np.abs(step_r)) == row_comp and row_sign * step_r[row_comp] > 0, (axis, step_r)
        assert np.argmax(np.abs(step_c)) == col_comp and step_c[col_comp] > 0, (axis, step_c)


def test_oblique_axial_slice_is_the_nearest_plane():
    """With a 20 degree tilt, the RAS point of a voxel lands on that voxel's displayed axial slice."""
    image = make_image(DIRECTIONS["oblique_x20"], size=(6, 6, 9))
    frame = SliceFrame(geometry_of(image), "axial")
    array = sitk.GetArrayFromImage(image)
    for ijk in ([0, 0, 0], [5, 5, 8], [2, 3, 4]):
        ras = lps_to_ras(image.TransformIndexToPhysicalPoint(ijk))
        s, row, col = np.round(frame.ras_to_slice(ras)[0]).astype(int)
        assert frame.slice_image(array, s)[row, col] == array[ijk[2], ijk[1], ijk[0]]


def test_real_nifti_axial_slice_is_displayed_like_slicer():
    """example_ct_sm is stored RAS (direction -1, -1, 1): axial display flips rows and columns of the file array."""
    image = sitk.ReadImage(str(TOTALSEG / "example_ct_sm.nii.gz"))
    frame = SliceFrame(geometry_of(image), "axial")
    array = sitk.GetArrayFromImage(image)
    slices = frame.volume_to_slices(array)
    np.testing.assert_array_equal(slices, sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS")))
    np.testing.assert_array_equal(slices[7], array[7, ::-1, ::-1])
    right_col, left_col = frame.slice_to_ras([[7, 50, 0], [7, 50, frame.slice_shape[1] - 1]])
    assert right_col[0] > left_col[0]  # image left = patient right (larger R)
    top, bottom = frame.slice_to_ras([[7, 0, 60], [7, frame.slice_shape[0] - 1, 60]])
    assert top[1] > bottom[1]  # top row = anterior


def test_row_flipped_labelmap_displays_like_its_twin():
    """The upstream row-flipped labelmap and its resampled twin are the same anatomy: identical displayed slices."""
    flipped = sitk.ReadImage(str(TOTALSEG / "example_seg_dicom.nii.gz"))
    twin = sitk.ReadImage(str(TOTALSEG / "example_seg_dicom_on_dicom_grid.nii.gz"))
    assert not np.array_equal(sitk.GetArrayFromImage(flipped), sitk.GetArrayFromImage(twin))
    for axis in AXES:
        a = SliceFrame(geometry_of(flipped), axis).volume_to_slices(sitk.GetArrayFromImage(flipped))
        b = SliceFrame(geometry_of(twin), axis).volume_to_slices(sitk.GetArrayFromImage(twin))
        np.testing.assert_array_equal(a, b)


def test_2d_image_frame():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    frame = SliceFrame.for_image(3, 4)
    assert frame.n_slices == 1 and frame.slice_shape == (3, 4)
    np.testing.assert_array_equal(frame.volume_to_slices(image)[0], image)
    np.testing.assert_array_equal(frame.slices_to_volume(frame.volume_to_slices(image)), image)
    np.testing.assert_allclose(frame.ijk_to_slice([3, 2, 0]), [[0, 2, 3]])
    rgb = np.zeros((3, 4, 3), np.uint8)
    assert frame.volume_to_slices(rgb).shape == (1, 3, 4, 3)


def test_model_grid_scaling():
    assert model_scale(512, 256) == 0.5
    assert model_resized_shape(512, 300) == (256, 150)
    assert model_resized_shape(101, 122) == (212, 256)
    box = np.array([[10.0, 20.0, 100.0, 200.0]])
    np.testing.assert_allclose(slice_to_model(box, 512, 400), box * 0.5)
    np.testing.assert_allclose(model_to_slice(slice_to_model(box, 101, 122), 101, 122), box)


def test_window_truncates_and_clips():
    hu = np.array([-2000, -160, -159, 39, 40, 239, 240, 3000], dtype=np.int16)
    out = window_to_uint8(hu, -160, 240)
    assert out.dtype == np.uint8
    expected = (np.clip((hu.astype(float) + 160) / 400, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert out.tolist() == [0, 0, 0, 126, 127, 254, 255, 255]  # 200/400*255 = 127.5 -> 127 (truncated)
    with pytest.raises(ValueError):
        window_to_uint8(hu, 10, 10)


def test_presets_percentiles_and_uint8_rules():
    assert CT_PRESETS["soft_tissue"] == (-160.0, 240.0)
    assert CT_PRESETS["lung"] == (-1350.0, 150.0)
    assert set(CT_PRESETS) == {"soft_tissue", "lung", "bone", "brain"}
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(TOTALSEG / "example_ct_sm.nii.gz")))
    np.testing.assert_array_equal(to_uint8(ct, preset="lung"), window_to_uint8(ct, -1350, 150))
    np.testing.assert_array_equal(to_uint8(ct, window=(-100, 300)), window_to_uint8(ct, -100, 300))
    lo, hi = percentile_window(ct)
    assert (lo, hi) == tuple(np.percentile(ct, [0.5, 99.5]))
    assert resolve_window(ct) == (lo, hi)
    scaled = to_uint8(ct)
    assert scaled.min() == 0 and scaled.max() == 255
    grey = (ct[5] % 256).astype(np.uint8)
    assert resolve_window(grey) is None and to_uint8(grey) is grey
    assert percentile_window(np.full((4, 4), 7.0)) == (7.0, 8.0)
    with pytest.raises(ValueError, match="unknown window preset"):
        resolve_window(ct, preset="liver")


def test_to_rgb():
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3)
    rgb = to_rgb(grey)
    assert rgb.shape == (2, 3, 3) and all(np.array_equal(rgb[..., c], grey) for c in range(3))
    rgba = np.zeros((2, 3, 4), np.uint8)
    assert to_rgb(rgba).shape == (2, 3, 3)
    assert to_rgb(rgb) is not None and np.array_equal(to_rgb(rgb), rgb)
    with pytest.raises(ValueError):
        to_rgb(grey.astype(np.int16))
