"""`samunet segment` end to end on a real CT: prompt file in voxel coordinates -> .seg.nrrd read back with slicerio,
the overlay, correction with --edit, and every bad input (exit 2, a message naming the problem, no output file).

Embeddings go to a disk cache shared by the whole test session, so each slice is encoded once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from samunet_core import metrics
from samunet_core.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator"
CT = DATA / "example_ct_sm.nii.gz"
LABELS = {"liver": 5, "spleen": 1, "kidney_left": 3}
COLORS = {"liver": [0.86, 0.55, 0.4], "spleen": [0.6, 0.2, 0.8], "kidney_left": [0.2, 0.7, 0.3]}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "samunet_cache"


@pytest.fixture(scope="module")
def reference():
    """(Volume of the CT, frame, K x H x W reference labels as displayed axial slices)."""
    from samunet_core.io.volumes import read_volume

    volume = read_volume(CT)
    frame = volume.frame("axial")
    return volume, frame, frame.volume_to_slices(read_volume(DATA / "example_seg.nii.gz").array)


def ijk_box(frame, k: int, box) -> dict:
    """A slice box (x0, y0, x1, y1) on axial slice k -> the prompt file's IJK corners."""
    x0, y0, x1, y1 = box
    corners = frame.slice_to_ijk([[k, y0, x0], [k, y1, x1]])
    return {"corners": [[float(v) for v in c] for c in corners]}


def largest_slice_box(labels: np.ndarray, value: int) -> tuple[int, tuple[int, int, int, int]]:
    ref = labels == value
    k = int(np.argmax(ref.reshape(ref.shape[0], -1).sum(1)))
    return k, metrics.tight_box(metrics.largest_component(ref[k]))


def write_prompts(path: Path, segments: list[dict], coordinates: str = "IJK") -> Path:
    path.write_text(json.dumps({"coordinates": coordinates, "axis": "axial", "segments": segments}))
    return path


def segment(*args: str, cache_dir: Path) -> int:
    return main(["segment", *map(str, args), "--device", "cpu", "--cache-dir", str(cache_dir)])


@pytest.fixture(scope="module")
def segmented(reference, cache_dir, tmp_path_factory):
    """Liver and spleen, one box each on their largest slice, propagated; written as .seg.nrrd with an overlay."""
    _, frame, labels = reference
    out = tmp_path_factory.mktemp("segment")
    segments = []
    for name in ("liver", "spleen"):
        k, box = largest_slice_box(labels, LABELS[name])
        segments.append({"name": name, "color": COLORS[name], "boxes": [ijk_box(frame, k, box)], "propagate": True})
    prompts = write_prompts(out / "prompts.json", segments)
    code = segment(CT, "--prompts", prompts, "--output", out / "ct.seg.nrrd", "--overlay", out / "overlay.png",
                   "--preset", "soft_tissue", cache_dir=cache_dir)
    return code, out


def test_segment_writes_a_slicer_segmentation(segmented, reference, capsys) -> None:
    import slicerio

    code, out = segmented
    assert code == 0
    volume, frame, labels = reference
    seg = slicerio.read_segmentation(str(out / "ct.seg.nrrd"))
    names = [s["name"] for s in seg["segments"]]
    assert names == ["liver", "spleen"]
    for info in seg["segments"]:
        assert np.allclose(info["color"], COLORS[info["name"]], atol=1e-3)
    assert np.allclose(seg["ijkToLPS"], volume.geometry.ijk_to_lps_matrix(), atol=1e-4)
    voxels = seg["voxels"]  # (i, j, k) on the input's own grid
    for info in seg["segments"]:
        mask = frame.volume_to_slices((voxels == info["labelValue"]).transpose(2, 1, 0))
        d = metrics.dice(mask, labels == LABELS[info["name"]])
        assert d > 0.7, f"{info['name']}: 3D Dice {d:.3f}"
    from PIL import Image

    with Image.open(out / "overlay.png") as im:
        assert im.mode == "RGB" and im.width >= 256


def test_segment_prints_where_the_outputs_are(reference, cache_dir, tmp_path, capsys) -> None:
    _, frame, labels = reference
    k, box = largest_slice_box(labels, LABELS["kidney_left"])
    prompts = write_prompts(tmp_path / "p.json", [{"name": "kidney", "boxes": [ijk_box(frame, k, box)]}])
    out = tmp_path / "kidney.nii.gz"
    assert segment(CT, "--prompts", prompts, "--output", out, "--preset", "soft_tissue", cache_dir=cache_dir) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out.resolve()}" in printed
    from samunet_core.io.volumes import read_volume

    written = read_volume(out)
    assert written.geometry.same_grid(read_volume(CT).geometry)
    got = frame.volume_to_slices(written.array)
    assert set(np.unique(got).tolist()) == {0, 1}
    assert np.flatnonzero(got.any(axis=(1, 2))).tolist() == [k], "without propagate only the prompted slice"
    assert metrics.dice(got[k] == 1, labels[k] == LABELS["kidney_left"]) > 0.8


def test_edit_changes_only_the_named_segment_on_its_slice(segmented, reference, cache_dir, tmp_path) -> None:
    from samunet_core.io.segmentations import read_segmentation, write_seg_nrrd

    _, out = segmented
    _, frame, labels = reference
    original = read_segmentation(out / "ct.seg.nrrd")
    # Knock the liver out of one slice, then add it back with a box there.
    k, box = largest_slice_box(labels, LABELS["liver"])
    liver = original.get("liver")
    damaged_mask = frame.volume_to_slices(liver.mask).copy()
    damaged_mask[k] = False
    liver.mask = np.ascontiguousarray(frame.slices_to_volume(damaged_mask))
    damaged = tmp_path / "damaged.seg.nrrd"
    write_seg_nrrd(damaged, original)
    before = read_segmentation(damaged)
    prompts = write_prompts(tmp_path / "fix.json", [{"name": "liver", "boxes": [ijk_box(frame, k, box)]}])
    fixed = tmp_path / "fixed.seg.nrrd"
    assert segment(CT, "--prompts", prompts, "--output", fixed, "--edit", damaged, "--preset", "soft_tissue",
                   cache_dir=cache_dir) == 0
    after = read_segmentation(fixed)
    assert after.names == before.names
    assert [s.color for s in after.segments] == [s.color for s in before.segments]
    assert np.array_equal(after.get("spleen").mask, before.get("spleen").mask), "other segments untouched"
    old_liver = frame.volume_to_slices(before.get("liver").mask)
    new_liver = frame.volume_to_slices(after.get("liver").mask)
    others = [s for s in range(old_liver.shape[0]) if s != k]
    assert np.array_equal(new_liver[others], old_liver[others]), "only the prompted slice changes"
    assert metrics.dice(new_liver[k], labels[k] == LABELS["liver"]) > 0.85


def test_edit_negative_click_removes_a_region(segmented, reference, cache_dir, tmp_path) -> None:
    from samunet_core.io.segmentations import read_segmentation

    _, out = segmented
    _, frame, labels = reference
    before = read_segmentation(out / "ct.seg.nrrd")
    spleen = frame.volume_to_slices(before.get("spleen").mask)
    k = int(np.argmax(spleen.reshape(spleen.shape[0], -1).sum(1)))
    x, y = metrics.interior_point(metrics.largest_component(spleen[k]))
    ijk = frame.slice_to_ijk([[k, y, x]])[0]
    prompts = write_prompts(tmp_path / "remove.json", [
        {"name": "spleen", "points": [{"position": [float(v) for v in ijk], "positive": False}]}])
    edited = tmp_path / "edited.seg.nrrd"
    assert segment(CT, "--prompts", prompts, "--output", edited, "--edit", out / "ct.seg.nrrd",
                   "--preset", "soft_tissue", cache_dir=cache_dir) == 0
    after = read_segmentation(edited)
    new = frame.volume_to_slices(after.get("spleen").mask)
    assert not new[k][y, x], "the clicked pixel is no longer in the segment"
    assert new[k].sum() < spleen[k].sum()
    others = [s for s in range(spleen.shape[0]) if s != k]
    assert np.array_equal(new[others], spleen[others])
    assert np.array_equal(after.get("liver").mask, before.get("liver").mask)


# ----- bad input: exit 2, a message naming the problem, nothing written -----
@pytest.fixture()
def good_prompts(reference, tmp_path) -> Path:
    _, frame, labels = reference
    k, box = largest_slice_box(labels, LABELS["spleen"])
    return write_prompts(tmp_path / "good.json", [{"name": "spleen", "boxes": [ijk_box(frame, k, box)]}])


def bad_run(capsys, *args, cache_dir: Path) -> str:
    code = segment(*args, cache_dir=cache_dir)
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_missing_input(good_prompts, tmp_path, cache_dir, capsys) -> None:
    out = tmp_path / "o.seg.nrrd"
    err = bad_run(capsys, tmp_path / "nope.nii.gz", "--prompts", good_prompts, "--output", out, cache_dir=cache_dir)
    assert "nope.nii.gz" in err and "does not exist" in err
    assert not out.exists()


def test_unreadable_input(good_prompts, tmp_path, cache_dir, capsys) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    out = tmp_path / "o.seg.nrrd"
    err = bad_run(capsys, broken, "--prompts", good_prompts, "--output", out, cache_dir=cache_dir)
    assert "broken.nii.gz" in err and "cannot read" in err
    assert not out.exists()


def test_unsupported_formats(good_prompts, tmp_path, cache_dir, capsys) -> None:
    text = tmp_path / "scan.txt"
    text.write_text("hello")
    out = tmp_path / "o.seg.nrrd"
    err = bad_run(capsys, text, "--prompts", good_prompts, "--output", out, cache_dir=cache_dir)
    assert "unsupported format" in err and not out.exists()
    odd = tmp_path / "o.xyz"
    err = bad_run(capsys, CT, "--prompts", good_prompts, "--output", odd, cache_dir=cache_dir)
    assert "unsupported format" in err and ".seg.nrrd" in err and not odd.exists()
    png = tmp_path / "o.png"
    err = bad_run(capsys, CT, "--prompts", good_prompts, "--output", png, cache_dir=cache_dir)
    assert "2D image" in err and not png.exists()


def test_prompt_outside_the_image(tmp_path, cache_dir, capsys) -> None:
    prompts = write_prompts(tmp_path / "outside.json", [
        {"name": "far", "boxes": [{"corners": [[10, 10, 5], [500, 20, 5]]}]}])
    out = tmp_path / "o.seg.nrrd"
    err = bad_run(capsys, CT, "--prompts", prompts, "--output", out, cache_dir=cache_dir)
    assert "'far'" in err and "outside the image" in err and not out.exists()


def test_a_box_without_area_is_refused(tmp_path, cache_dir, capsys) -> None:
    """A "3D box" whose corners differ only across slices (zero width on the slices): exit 2, nothing written."""
    prompts = write_prompts(tmp_path / "flat.json", [
        {"name": "flat", "boxes": [{"corners": [[10, 10, 2], [10, 40, 6]]}]}])
    out = tmp_path / "o.seg.nrrd"
    err = bad_run(capsys, CT, "--prompts", prompts, "--output", out, cache_dir=cache_dir)
    assert "segment 'flat' box 1 has no area on the axial slices (0 x 30 pixels" in err and not out.exists()


def test_empty_segment_list(tmp_path, cache_dir, capsys) -> None:
    prompts = write_prompts(tmp_path / "empty.json", [])
    out = tmp_path / "o.seg.nrrd"
    err = bad_run(capsys, CT, "--prompts", prompts, "--output", out, cache_dir=cache_dir)
    assert "segment list is empty" in err and not out.exists()


def test_unknown_model(good_prompts, tmp_path, cache_dir, capsys) -> None:
    out = tmp_path / "o.seg.nrrd"
    err = bad_run(capsys, CT, "--prompts", good_prompts, "--output", out, "--model", "no-such-model",
                  cache_dir=cache_dir)
    assert "no-such-model" in err and not out.exists()


def test_output_not_writable(good_prompts, tmp_path, cache_dir, capsys) -> None:
    out = tmp_path / "missing_folder" / "o.seg.nrrd"
    err = bad_run(capsys, CT, "--prompts", good_prompts, "--output", out, cache_dir=cache_dir)
    assert "missing_folder" in err and "does not exist" in err and not out.exists()
    folder = tmp_path / "a_folder.seg.nrrd"
    folder.mkdir()
    err = bad_run(capsys, CT, "--prompts", good_prompts, "--output", folder, cache_dir=cache_dir)
    assert "is a folder" in err


def test_dicom_seg_needs_a_dicom_input(good_prompts, tmp_path, cache_dir, capsys) -> None:
    out = tmp_path / "o.dcm"
    err = bad_run(capsys, CT, "--prompts", good_prompts, "--output", out, cache_dir=cache_dir)
    assert "DICOM SEG needs a DICOM series" in err and not out.exists()


def test_edit_file_on_another_grid(good_prompts, tmp_path, cache_dir, capsys) -> None:
    other = tmp_path / "other.seg.nrrd"
    shutil.copy(Path(__file__).resolve().parents[1] / "data" / "slicerio_ctchest" / "Segmentation.seg.nrrd", other)
    out = tmp_path / "o.seg.nrrd"
    err = bad_run(capsys, CT, "--prompts", good_prompts, "--output", out, "--edit", other, cache_dir=cache_dir)
    assert "voxel grid" in err and not out.exists()
