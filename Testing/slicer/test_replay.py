"""`python -m SAMUNetSlicerLib.replay` against `samunet segment` on the repository's CT: the same prompt file through
the Slicer module's controller (markups placed one at a time in real MRML) and through the CLI gives the same voxels,
because both call the engine's one prompt policy. Bad input: a message, exit status 2, no output file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samunet_core.cli import main as samunet
from samunet_core.io.segmentations import read_segmentation
from SAMUNetSlicerLib.replay import main as replay

REPO = Path(__file__).resolve().parents[2]
CT = REPO / "Testing/data/totalsegmentator/example_ct_sm.nii.gz"
LABELS = REPO / "Testing/data/totalsegmentator/example_seg.nii.gz"
SPLEEN, KIDNEY_LEFT, GALLBLADDER, LIVER = 1, 3, 4, 5


def largest_slice(labels: np.ndarray, label: int) -> int:
    return int(np.argmax((labels == label).reshape(labels.shape[0], -1).sum(1)))


def box_ijk(labels: np.ndarray, label: int, k: int) -> list[list[float]]:
    j, i = np.nonzero(labels[k] == label)
    return [[float(i.min()), float(j.min()), float(k)], [float(i.max()), float(j.max()), float(k)]]


def inside_ijk(labels: np.ndarray, label: int, k: int, offset: int = 0) -> list[float]:
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(labels[k] == label)
    j, i = np.unravel_index(np.argmax(distance), distance.shape)
    return [float(i + offset), float(j), float(k)]


def prompt_file(path: Path) -> Path:
    """Every kind of prompt on the repository's abdominal CT, in IJK: a box with corrective clicks (one positive, one
    negative), clicks alone, a 3D box and a box carried through the volume."""
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))
    ks = largest_slice(labels, SPLEEN)
    kl = largest_slice(labels, LIVER)
    kk = largest_slice(labels, KIDNEY_LEFT)
    kg = largest_slice(labels, GALLBLADDER)
    spleen_box = box_ijk(labels, SPLEEN, ks)
    outside = [spleen_box[1][0] + 2.0, spleen_box[1][1] + 2.0, float(ks)]  # a negative click just off the spleen
    kidney = box_ijk(labels, KIDNEY_LEFT, kk)
    data = {"coordinates": "IJK", "axis": "axial", "segments": [
        {"name": "spleen", "boxes": [{"corners": spleen_box}],
         "points": [{"position": inside_ijk(labels, SPLEEN, ks)}, {"position": outside, "positive": False}]},
        {"name": "liver", "points": [{"position": inside_ijk(labels, LIVER, kl)},
                                     {"position": inside_ijk(labels, LIVER, kl, offset=6)}]},
        {"name": "kidney_left", "boxes": [{"corners": [[kidney[0][0], kidney[0][1], kk - 1.0],
                                                       [kidney[1][0], kidney[1][1], kk + 1.0]]}]},
        {"name": "gallbladder", "boxes": [{"corners": box_ijk(labels, GALLBLADDER, kg)}], "propagate": True},
    ]}
    path.write_text(json.dumps(data))
    return path


def voxels(path: Path) -> dict[str, np.ndarray]:
    return {s.name: np.asarray(s.mask, bool) for s in read_segmentation(path).segments}


def test_replay_gives_the_voxels_of_samunet_segment(tmp_path):
    prompts = prompt_file(tmp_path / "prompts.json")
    cache = tmp_path / "embeddings"  # shared: the same pixels have the same keys in both front ends
    assert samunet(["segment", str(CT), "--prompts", str(prompts), "--output", str(tmp_path / "cli.seg.nrrd"),
                    "--preset", "soft_tissue", "--device", "cpu", "--cache-dir", str(cache)]) == 0
    assert replay([str(CT), "--prompts", str(prompts), "--output", str(tmp_path / "replay.seg.nrrd"),
                   "--preset", "soft_tissue", "--cache-dir", str(cache)]) == 0
    cli, slicer_path = voxels(tmp_path / "cli.seg.nrrd"), voxels(tmp_path / "replay.seg.nrrd")
    assert set(cli) == set(slicer_path) == {"spleen", "liver", "kidney_left", "gallbladder"}
    for name in cli:
        assert cli[name].any(), name
        assert int((cli[name] != slicer_path[name]).sum()) == 0, name
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))
    kidney_slices = np.nonzero(cli["kidney_left"].any(axis=(1, 2)))[0]
    k = largest_slice(labels, KIDNEY_LEFT)
    assert kidney_slices.tolist() == [k - 1, k, k + 1]  # the 3D box: its three slices and nothing beyond
    assert np.count_nonzero(cli["gallbladder"].any(axis=(1, 2))) > 3  # propagated beyond its prompted slice


def test_corrections_on_several_slices_carry_alike_in_slicer_and_the_cli(tmp_path):
    """A box, Propagate, then corrections on three slices (a click on a carried slice, a negative click, a click
    beyond where the walk stopped): each click carries to the neighbours as it lands in the controller, and the
    result equals `samunet segment` on the prompt file that holds the same prompts."""
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))
    spleen = labels == SPLEEN
    k = largest_slice(labels, SPLEEN)
    ks = np.flatnonzero(spleen.any(axis=(1, 2)))
    lo, hi = box_ijk(labels, SPLEEN, k)
    points = [{"position": inside_ijk(labels, SPLEEN, k + 2)},
              {"position": [lo[0] + 1.0, lo[1] + 1.0, float(k - 2)], "positive": False},
              {"position": inside_ijk(labels, SPLEEN, int(ks[-1]))}]
    data = {"coordinates": "IJK", "axis": "axial", "segments": [
        {"name": "spleen", "boxes": [{"corners": [lo, hi]}], "points": points, "propagate": True}]}
    prompts = tmp_path / "corrections.json"
    prompts.write_text(json.dumps(data))
    cache = tmp_path / "embeddings"
    assert samunet(["segment", str(CT), "--prompts", str(prompts), "--output", str(tmp_path / "cli.seg.nrrd"),
                    "--preset", "soft_tissue", "--device", "cpu", "--cache-dir", str(cache)]) == 0
    assert replay([str(CT), "--prompts", str(prompts), "--output", str(tmp_path / "replay.seg.nrrd"),
                   "--preset", "soft_tissue", "--cache-dir", str(cache)]) == 0
    cli, slicer_path = voxels(tmp_path / "cli.seg.nrrd"), voxels(tmp_path / "replay.seg.nrrd")
    assert cli["spleen"].any()
    assert int((cli["spleen"] != slicer_path["spleen"]).sum()) == 0
    no_clicks = dict(data["segments"][0], points=[])
    (tmp_path / "box.json").write_text(json.dumps(dict(data, segments=[no_clicks])))
    assert samunet(["segment", str(CT), "--prompts", str(tmp_path / "box.json"), "--output",
                    str(tmp_path / "box.seg.nrrd"), "--preset", "soft_tissue", "--device", "cpu",
                    "--cache-dir", str(cache)]) == 0
    box_only = voxels(tmp_path / "box.seg.nrrd")["spleen"]
    changed = np.flatnonzero((box_only != cli["spleen"]).any(axis=(1, 2)))
    assert len(set(changed) - {k + 2, k - 2, int(ks[-1])}) > 0, "the corrections changed slices beyond the clicked"


def test_replay_in_the_green_view_on_coronal_slices(tmp_path):
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))
    j = int(np.argmax((labels == LIVER).sum(axis=(0, 2))))
    k, i = np.nonzero(labels[:, j, :] == LIVER)
    data = {"coordinates": "IJK", "axis": "coronal", "segments": [
        {"name": "liver", "boxes": [{"corners": [[float(i.min()), j, float(k.min())],
                                                 [float(i.max()), j, float(k.max())]]}]}]}
    prompts = tmp_path / "coronal.json"
    prompts.write_text(json.dumps(data))
    cache = tmp_path / "embeddings"
    assert samunet(["segment", str(CT), "--prompts", str(prompts), "--output", str(tmp_path / "cli.seg.nrrd"),
                    "--preset", "soft_tissue", "--device", "cpu", "--cache-dir", str(cache)]) == 0
    assert replay([str(CT), "--prompts", str(prompts), "--output", str(tmp_path / "replay.seg.nrrd"),
                   "--preset", "soft_tissue", "--cache-dir", str(cache), "--view", "green"]) == 0
    cli, slicer_path = voxels(tmp_path / "cli.seg.nrrd"), voxels(tmp_path / "replay.seg.nrrd")
    assert cli["liver"].any() and np.array_equal(cli["liver"], slicer_path["liver"])
    assert np.nonzero(cli["liver"].any(axis=(0, 2)))[0].tolist() == [j]  # one coronal slice


@pytest.mark.parametrize("problem, content, message", [
    ("outside", {"coordinates": "IJK", "segments": [{"name": "a", "points": [{"position": [500, 5, 5]}]}]},
     "outside the image"),
    ("bad key", {"coordinates": "IJK", "segments": [{"name": "a", "dots": []}]}, "unknown key"),
    ("not json", None, "not valid JSON"),
])
def test_bad_input_exits_2_with_a_message_and_no_output(tmp_path, problem, content, message):
    prompts = tmp_path / "p.json"
    prompts.write_text("{" if content is None else json.dumps(content))
    out = tmp_path / "out.seg.nrrd"
    env = {**os.environ, "PYTHONPATH": str(REPO / "SAMUNetSlicer")}
    done = subprocess.run([sys.executable, "-m", "SAMUNetSlicerLib.replay", str(CT), "--prompts", str(prompts),
                           "--output", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not out.exists() and not list(tmp_path.glob("*.seg.nrrd"))
