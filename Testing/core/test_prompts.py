"""Prompt files (DESIGN.md): validation, every coordinate system, axes, slice limits and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from samunet_core.errors import InputError
from samunet_core.io.segmentations import read_segmentation
from samunet_core.io.volumes import read_volume
from samunet_core.prompts import load_prompts, parse_prompts, read_prompt_file, resolve_prompts

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "Testing" / "data"
SAMPLES = ROOT / "Resources" / "Samples"


@pytest.fixture(scope="module")
def ct_sm():
    return read_volume(DATA / "totalsegmentator" / "example_ct_sm.nii.gz")


def write(tmp_path: Path, data, name: str = "prompts.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def file_in(coordinates: str, frame, point_src, box_src, axis: str = "axial") -> dict:
    """A prompt file with one point and one box given by (s, row, col) positions, written in `coordinates`."""
    def conv(src):
        src = np.asarray(src, float)
        if coordinates == "RAS":
            return frame.slice_to_ras(src).tolist()
        if coordinates == "LPS":
            return frame.slice_to_lps(src).tolist()
        if coordinates == "IJK":
            return frame.slice_to_ijk(src).tolist()
        return [[c, r, s] for s, r, c in src.tolist()]

    point = conv([point_src])[0]
    corners = conv(box_src)
    return {"coordinates": coordinates, "axis": axis,
            "segments": [{"name": "liver", "color": [1, 0.5, 0],
                          "points": [{"position": point, "positive": True}, {"position": point, "positive": False}],
                          "boxes": [{"corners": corners}], "propagate": True}]}


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_ras_lps_ijk_pixel_files_agree(tmp_path, ct_sm, axis):
    frame = ct_sm.frame(axis)
    last = frame.n_slices - 1
    h, w = frame.slice_shape
    point_src = [last, 3, w - 1]
    box_src = [[0, 2, 5], [0, h - 1, w - 3]]  # both corners on the first slice: a 2D box there
    results = []
    for coordinates in ("RAS", "LPS", "IJK", "pixel"):
        prompts = load_prompts(write(tmp_path, file_in(coordinates, frame, point_src, box_src, axis)), ct_sm)
        assert prompts.axis == axis and prompts.n_slices == frame.n_slices and prompts.slice_shape == (h, w)
        results.append(prompts.segments[0])
    for seg in results:
        assert seg.name == "liver" and seg.color == (1.0, 0.5, 0.0) and seg.propagate
        assert [(p.s, p.positive) for p in seg.points] == [(last, True), (last, False)]
        assert seg.points[0].x == pytest.approx(w - 1) and seg.points[0].y == pytest.approx(3)
        (box,) = seg.boxes
        assert (box.s0, box.s1) == (0, 0) and not box.is_3d
        assert box.xyxy == pytest.approx((5, 2, w - 3, h - 1))
        assert seg.prompted_slices() == [0, last]
        coords, labels = seg.points_on(last)
        np.testing.assert_allclose(coords, [[w - 1, 3], [w - 1, 3]], atol=1e-6)
        assert labels.tolist() == [1, 0]
        assert seg.boxes_on(0).shape == (1, 4) and seg.boxes_on(1).shape == (0, 4)


def test_ras_point_lands_on_the_voxel_it_names(tmp_path, ct_sm):
    """A RAS point at a bright voxel's centre selects that voxel in the displayed axial slice."""
    k, j, i = np.unravel_index(np.argmax(ct_sm.array), ct_sm.array.shape)
    ras = ct_sm.geometry.ijk_to_ras([i, j, k])[0].tolist()
    data = {"coordinates": "RAS", "segments": [{"name": "bone", "points": [{"position": ras}]}]}
    point = load_prompts(write(tmp_path, data), ct_sm).segments[0].points[0]
    displayed = ct_sm.frame("axial").slice_image(ct_sm.array, point.s)
    assert displayed[round(point.y), round(point.x)] == ct_sm.array.max()
    # the file is RAS-stored, so the display flips both in-plane axes
    assert (point.s, round(point.y), round(point.x)) == (k, ct_sm.array.shape[1] - 1 - j, ct_sm.array.shape[2] - 1 - i)


def test_3d_box_prompts_every_slice_inside(tmp_path, ct_sm):
    frame = ct_sm.frame()
    corners = frame.slice_to_ras([[4, 10, 20], [9, 40, 60]]).tolist()
    data = {"coordinates": "RAS", "segments": [{"name": "kidney", "boxes": [{"corners": corners[::-1]}]}]}
    seg = load_prompts(write(tmp_path, data), ct_sm).segments[0]
    (box,) = seg.boxes
    assert box.is_3d and (box.s0, box.s1) == (4, 9)
    assert seg.prompted_slices() == list(range(4, 10))
    assert all(seg.boxes_on(s).shape == (1, 4) for s in range(4, 10)) and seg.boxes_on(10).shape == (0, 4)
    assert not seg.propagate


def test_half_voxel_margin_and_outside(tmp_path, ct_sm):
    frame = ct_sm.frame()
    last = frame.n_slices - 1
    inside = frame.slice_to_ras([[last + 0.45, 0, 0]]).tolist()[0]
    data = {"coordinates": "RAS", "segments": [{"name": "edge", "points": [{"position": inside}]}]}
    assert load_prompts(write(tmp_path, data), ct_sm).segments[0].points[0].s == last
    outside = frame.slice_to_ras([[last + 0.6, 5, 5]]).tolist()[0]
    data = {"coordinates": "RAS", "segments": [{"name": "liver", "points": [{"position": outside}]}]}
    with pytest.raises(InputError) as err:
        load_prompts(write(tmp_path, data), ct_sm)
    message = str(err.value)
    assert "'liver'" in message and "outside the image" in message and "point" in message
    assert f"{outside[0]}" in message and "R " in message and " mm" in message  # the point and the RAS extent


def test_outside_errors_in_ijk_and_pixel(tmp_path, ct_sm):
    data = {"coordinates": "IJK", "segments": [{"name": "a", "boxes": [{"corners": [[0, 0, 0], [122, 5, 5]]}]}]}
    with pytest.raises(InputError, match=r"'a': box corner \[122.0, 5.0, 5.0\] \(IJK\) .*i 0..121, j 0..100, k 0..29"):
        load_prompts(write(tmp_path, data), ct_sm)
    data = {"coordinates": "pixel", "segments": [{"name": "b", "points": [{"position": [3, 3, 30]}]}]}
    with pytest.raises(InputError, match="axial slice 0..29"):
        load_prompts(write(tmp_path, data), ct_sm)


def test_pixel_prompts_on_a_2d_image(tmp_path):
    from PIL import Image

    image = np.zeros((40, 60), np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    volume = read_volume(tmp_path / "img.png")
    data = {"coordinates": "pixel", "segments": [{"name": "lesion", "points": [{"position": [59, 0]}],
                                                  "boxes": [{"corners": [[1, 2], [30, 39]]}]}]}
    seg = load_prompts(write(tmp_path, data), volume).segments[0]
    assert (seg.points[0].s, seg.points[0].x, seg.points[0].y) == (0, 59.0, 0.0)
    assert seg.boxes[0].xyxy == (1.0, 2.0, 30.0, 39.0) and not seg.boxes[0].is_3d
    data["segments"][0]["points"][0]["position"] = [60, 0]
    with pytest.raises(InputError, match="x 0..59, y 0..39"):
        load_prompts(write(tmp_path, data), volume)
    data = {"coordinates": "RAS", "segments": [{"name": "lesion", "points": [{"position": [1, 2, 3]}]}]}
    with pytest.raises(InputError, match="no patient coordinates"):
        load_prompts(write(tmp_path, data), volume)
    data = {"coordinates": "pixel", "axis": "sagittal", "segments": [{"name": "l", "points": [{"position": [1, 2]}]}]}
    with pytest.raises(InputError, match="2D image"):
        load_prompts(write(tmp_path, data), volume)


def test_demo_prompt_file_matches_the_reference_segments():
    """Resources/Samples/ctchest_prompts.json: each box is the tight box of that segment on its largest slice."""
    volume = read_volume(SAMPLES / "CTChest4.nrrd")
    reference = read_segmentation(DATA / "slicerio_ctchest" / "Segmentation.seg.nrrd")
    prompts = load_prompts(SAMPLES / "ctchest_prompts.json", volume)
    assert [s.name for s in prompts.segments] == ["right lung", "left lung"]
    frame = volume.frame("axial")
    for seg in prompts.segments:
        (box,) = seg.boxes
        assert seg.propagate and not box.is_3d
        masks = frame.volume_to_slices(reference.get(seg.name).mask)
        s = int(masks.reshape(len(masks), -1).sum(1).argmax())
        rows, cols = np.nonzero(masks[s])
        assert box.s0 == s
        assert box.xyxy == pytest.approx((cols.min(), rows.min(), cols.max(), rows.max()), abs=0.01)
    right, left = prompts.segments[0].boxes[0], prompts.segments[1].boxes[0]
    assert right.x1 < left.x0  # patient right on the image left


BAD_FILES = {
    "malformed JSON": ('{"coordinates": "RAS", "segments": [', "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "unknown top key": ({"coordinates": "RAS", "segments": [], "extra": 1}, "unknown key.*'extra'"),
    "missing coordinates": ({"segments": [{"name": "a", "points": [{"position": [1, 2, 3]}]}]},
                            'missing "coordinates"'),
    "unknown coordinates": ({"coordinates": "XYZ", "segments": []}, 'unknown value "XYZ"; use one of RAS, LPS, IJK'),
    "unknown axis": ({"coordinates": "RAS", "axis": "oblique", "segments": []}, 'axis: unknown value "oblique"'),
    "empty segments": ({"coordinates": "RAS", "segments": []}, "segment list is empty"),
    "missing segments": ({"coordinates": "RAS"}, "segment list is empty"),
    "unknown segment key": ({"coordinates": "RAS", "segments": [{"name": "a", "label": 3}]}, "unknown key.*'label'"),
    "no name": ({"coordinates": "RAS", "segments": [{"points": [{"position": [1, 2, 3]}]}]}, 'non-empty "name"'),
    "duplicate name": ({"coordinates": "RAS", "segments": [{"name": "a", "points": [{"position": [1, 2, 3]}]},
                                                           {"name": "a", "points": [{"position": [1, 2, 3]}]}]},
                       "used twice"),
    "no prompts": ({"coordinates": "RAS", "segments": [{"name": "a", "propagate": True}]}, "has no prompts"),
    "bad colour": ({"coordinates": "RAS", "segments": [{"name": "a", "color": [255, 0, 0],
                                                        "points": [{"position": [1, 2, 3]}]}]}, "between 0 and 1"),
    "short position": ({"coordinates": "RAS", "segments": [{"name": "a", "points": [{"position": [1, 2]}]}]},
                       "list of 3 finite numbers"),
    "text position": ({"coordinates": "LPS", "segments": [{"name": "a", "points": [{"position": ["1", 2, 3]}]}]},
                      "finite numbers"),
    "unknown point key": ({"coordinates": "RAS", "segments": [{"name": "a", "points": [{"position": [1, 2, 3],
                                                                                        "label": 1}]}]},
                          "unknown key.*'label'"),
    "positive not bool": ({"coordinates": "RAS", "segments": [{"name": "a", "points": [{"position": [1, 2, 3],
                                                                                        "positive": "yes"}]}]},
                          "expected true or false"),
    "one corner": ({"coordinates": "RAS", "segments": [{"name": "a", "boxes": [{"corners": [[1, 2, 3]]}]}]},
                   "two points"),
    "propagate not bool": ({"coordinates": "RAS", "segments": [{"name": "a", "propagate": 1,
                                                                "points": [{"position": [1, 2, 3]}]}]},
                           "expected true or false"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_prompt_files_name_the_problem(tmp_path, case):
    data, pattern = BAD_FILES[case]
    path = write(tmp_path, data)
    with pytest.raises(InputError, match=pattern) as err:
        read_prompt_file(path)
    assert str(path) in str(err.value)


def test_missing_file_and_volume_specific_errors(tmp_path, ct_sm):
    with pytest.raises(InputError, match="does not exist"):
        read_prompt_file(tmp_path / "nope.json")
    data = {"coordinates": "pixel", "segments": [{"name": "a", "points": [{"position": [1, 2]}]}]}
    with pytest.raises(InputError, match=r"no slice index; for a volume give \[x, y, s\]"):
        load_prompts(write(tmp_path, data), ct_sm)
    data = {"coordinates": "IJK", "segments": [{"name": "a", "points": [{"position": [1, 2]}]}]}
    with pytest.raises(InputError, match="three indices"):
        load_prompts(write(tmp_path, data), ct_sm)


def test_defaults_and_case_insensitive_values(ct_sm):
    parsed = parse_prompts({"coordinates": "ras", "axis": "Coronal",
                            "segments": [{"name": "a", "points": [{"position": [0, 0, 0]}]}]})
    assert parsed.coordinates == "RAS" and parsed.axis == "coronal"
    assert parsed.segments[0]["points"][0]["positive"] is True and parsed.segments[0]["propagate"] is False
    assert parse_prompts({"coordinates": "IJK", "segments": [{"name": "a", "boxes": [
        {"corners": [[0, 0, 0], [5, 5, 0]]}]}]}).axis == "axial"
    with pytest.raises(ValueError, match="axis"):
        resolve_prompts(parsed, ct_sm.frame("axial"))
