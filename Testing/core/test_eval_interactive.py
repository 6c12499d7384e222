"""`samunet eval --protocol interactive3d` (samunet_core/eval_interactive.py): the simulated 3D click on synthetic
volumes whose answer is known, the challenge's DSC_AUC / DSC_Final arithmetic, the prompt files (IJK round trip),
bad options, and an end-to-end run on the in-repo TotalSegmentator CT whose final prompt files, fed to
`samunet segment` with the reported window, give back the reported Dice.

The end-to-end run uses litemedsam_clicks (clicks alone work, as on box2d's unboxed slices) on the CT's axial slices
0..19 (so at most 20 slices are ever encoded) and a disk embedding cache keyed as `samunet segment` keys it, so
`samunet segment` re-encodes nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from samunet_core import metrics
from samunet_core.cli import main
from samunet_core.errors import InputError
from samunet_core.eval_interactive import (
    VoxelClick,
    dsc_auc,
    dsc_final,
    fill_steps,
    next_click,
    prompt_document,
    run_target,
    start_box,
    write_prompt_file,
)
from samunet_core.prompts import SegmentPrompts, SliceBox, SlicePoint

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator"
CT = DATA / "example_ct_sm.nii.gz"
SEG = DATA / "example_seg.nii.gz"
LABELS = {"2": "kidney_right", "4": "gallbladder"}  # on axial slices 0..18 and 2..14
N_SLICES = 20
N_CLICKS = 2


# ---------------------------------------------------------------------------------------------------------------------
# The click
# ---------------------------------------------------------------------------------------------------------------------
def cube(shape, k0, k1, r0, r1, c0, c1) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[k0:k1, r0:r1, c0:c1] = True
    return mask


SHAPE = (24, 40, 40)


def test_missed_block_gives_a_positive_click_at_its_centre():
    ref = cube(SHAPE, 2, 20, 5, 35, 5, 35)
    pred = ref & ~cube(SHAPE, 4, 9, 20, 25, 10, 15)  # a 5x5x5 hole inside the reference: missed
    assert next_click(pred, ref) == VoxelClick(6, 22, 12, True)


def test_the_largest_error_wins_and_its_sign_is_what_lies_there():
    ref = cube(SHAPE, 2, 12, 5, 25, 5, 25)
    missed = cube(SHAPE, 4, 7, 10, 13, 10, 13)  # 27 voxels, first in C order
    spurious = cube(SHAPE, 15, 22, 28, 35, 28, 35)  # 343 voxels, detached from the reference
    pred = (ref & ~missed) | spurious
    assert next_click(pred, ref) == VoxelClick(18, 31, 31, False)
    # The other way round: the missed region is the larger one (and comes after the spurious one in C order).
    small_spurious = cube(SHAPE, 0, 1, 0, 3, 0, 3)  # 9 voxels at the volume's corner
    big_missed = cube(SHAPE, 4, 11, 8, 15, 8, 15)  # 343 voxels inside the reference
    pred = (ref & ~big_missed) | small_spurious
    assert next_click(pred, ref) == VoxelClick(7, 11, 11, True)


def test_error_components_are_26_connected():
    ref = np.zeros(SHAPE, bool)
    pair = cube(SHAPE, 2, 5, 2, 5, 2, 5) | cube(SHAPE, 5, 8, 5, 8, 5, 8)  # 2 x 27 voxels touching at one corner
    single = cube(SHAPE, 12, 15, 20, 23, 20, 25)  # 45 voxels: larger than either half of the pair
    click = next_click(pair | single, ref)
    assert not click.positive and pair[click.k, click.row, click.col], "the corner-touching pair is one region"
    assert (click.k, click.row, click.col) == (3, 3, 3)  # both halves' centres are as deep: the first in C order


def test_the_centre_is_measured_in_millimetres():
    # One region: a 5x5x5 cube (deepest point 3 voxels in) joined to a 3x9x9 slab (2 voxels in along k, 5 in-plane).
    ref = np.zeros(SHAPE, bool)
    region = cube(SHAPE, 2, 7, 2, 7, 2, 7) | cube(SHAPE, 3, 6, 7, 16, 2, 11)
    assert next_click(region, ref) == VoxelClick(4, 4, 4, False)  # isotropic: the cube's centre is deepest
    # 3 mm slices, 1 mm pixels: the slab's centre is 5 mm in-plane and 6 mm along k from outside; the cube's 3 mm.
    assert next_click(region, ref, spacing=(3.0, 1.0, 1.0)) == VoxelClick(4, 11, 6, False)


def test_no_error_no_click():
    ref = cube(SHAPE, 2, 20, 5, 35, 5, 35)
    assert next_click(ref.copy(), ref) is None
    assert next_click(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)) is None


def test_start_boxes():
    ref = cube(SHAPE, 3, 9, 10, 20, 4, 30) | cube(SHAPE, 5, 6, 22, 30, 4, 8)
    assert start_box(ref, "box3d") == SliceBox(3, 8, 4.0, 10.0, 29.0, 29.0)
    # box2d: the largest slice (5), the box of its largest 8-connected component (not the small one below)
    assert start_box(ref, "box2d") == SliceBox(5, 5, 4.0, 10.0, 29.0, 19.0)


# ---------------------------------------------------------------------------------------------------------------------
# The challenge's numbers and the step loop
# ---------------------------------------------------------------------------------------------------------------------
def test_dsc_auc_and_final():
    dice = [0.5, 0.6, 0.8, 0.9]
    assert dsc_auc(dice, 3) == pytest.approx((0.6 + 0.8) / 2 + (0.8 + 0.9) / 2)  # clicks 1..3, step 0 left out
    assert dsc_final(dice, 3) == 0.9 and dsc_final(dice, 0) == 0.5
    assert dsc_auc(dice, 1) == 0.0 and dsc_auc(dice, 0) == 0.0
    assert fill_steps([0.7, 1.0], 3) == [0.7, 1.0, 1.0, 1.0]
    assert dsc_auc(fill_steps([0.7, 1.0], 4), 4) == pytest.approx(3.0)


def test_step_loop_clicks_until_no_error_and_passes_every_prompt():
    ref = cube(SHAPE, 2, 12, 5, 25, 5, 25)
    seen: list[SegmentPrompts] = []

    def engine(prompts: SegmentPrompts) -> np.ndarray:  # the start misses a block; the first click fixes it
        seen.append(prompts)
        return ref.copy() if prompts.points else ref & ~cube(SHAPE, 4, 7, 10, 13, 10, 13)

    steps: list[int] = []
    run = run_target(engine, SegmentPrompts("t", boxes=[start_box(ref, "box3d")], propagate=True), ref,
                     (1.0, 1.0, 1.0), 5, lambda i, _p: steps.append(i))
    assert steps == [0, 1] and run.clicks == [VoxelClick(5, 11, 11, True)]
    assert seen[1].points == [SlicePoint(5, 11.0, 11.0, True)] and seen[1].boxes == seen[0].boxes
    assert run.dice[0] < 1.0 and run.dice[1] == 1.0 and run.nsd[1] == 1.0 and len(run.seconds) == 2


# ---------------------------------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------------------------------
def permuted_frame():
    """A small volume stored with i running toward S, j toward Right, k toward Posterior (axes permuted and flipped)."""
    from samunet_core.transforms import Geometry, SliceFrame

    direction = np.array([[0, -1, 0], [0, 0, 1], [1, 0, 0]], float)  # columns: LPS directions of i, j, k
    return SliceFrame(Geometry((7, 9, 11), (3.0, -2.0, 5.0), (2.0, 0.8, 1.5), tuple(direction.ravel())), "axial")


@pytest.mark.parametrize("which", ["ct", "permuted"])
def test_prompt_file_round_trip(which, tmp_path):
    from samunet_core.io.volumes import read_volume
    from samunet_core.prompts import read_prompt_file, resolve_prompts

    frame = read_volume(CT).frame("axial") if which == "ct" else permuted_frame()
    s_max, (h, w) = frame.n_slices - 1, frame.slice_shape
    prompts = SegmentPrompts("kidney/left", boxes=[SliceBox(1, s_max - 1, 1.0, 2.0, w - 2.0, h - 1.0)],
                             points=[SlicePoint(s_max, 0.0, h - 1.0, True), SlicePoint(0, w - 1.0, 0.0, False),
                                     SlicePoint(2, 3.0, 1.0, True)], propagate=True)
    path = write_prompt_file(tmp_path / "p.json", frame, prompts)
    document = json.loads(path.read_text())
    assert document == prompt_document(frame, prompts) and document["coordinates"] == "IJK"
    (back,) = resolve_prompts(read_prompt_file(path), frame).segments
    assert (back.name, back.boxes, back.points, back.propagate) == (prompts.name, prompts.boxes, prompts.points, True)
    assert [tmp.name for tmp in tmp_path.iterdir()] == ["p.json"], "written atomically, no temporary left"


def test_a_rerun_leaves_no_stale_step_files(tmp_path):
    from samunet_core.eval_interactive import prompt_file_name, remove_step_files

    names = [prompt_file_name("ct/a", "liver", i) for i in range(4)] + [prompt_file_name("ct/a", "liver_2", 0),
                                                                        "ct_a__liver__step1.json.bak"]
    for name in names:
        (tmp_path / name).write_text("{}")
    assert names[0] == "ct_a__liver__step0.json"
    remove_step_files(tmp_path, "ct/a", "liver")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[4:])


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (["--clicks", "51"], "--clicks 51"),
    (["--clicks", "-1"], "--clicks -1"),
    (["--start", "box4d"], "--start 'box4d'"),
])
def test_bad_options_exit_2(options, message, tmp_path, capsys):
    code = main(["eval", str(tmp_path / "missing.json"), "--protocol", "interactive3d", "--out", str(tmp_path / "o"),
                 *options])
    assert code == 2 and message in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.json"), "--protocol", "box", "--out", str(tmp_path / "o"),
                 "--clicks", "3"]) == 2
    assert "belong to --protocol interactive3d" in capsys.readouterr().err


def test_needs_3d_cases(tmp_path):
    from samunet_core.evaluate import evaluate
    from samunet_core.manifest import parse_manifest

    small = Path(__file__).resolve().parents[1] / "data" / "eval_small"
    manifest = parse_manifest(json.loads((small / "manifest.json").read_text()), small)
    with pytest.raises(InputError, match="interactive3d protocol needs 3d cases"):
        evaluate(manifest, None, "interactive3d", tmp_path / "out", progress=False)


def test_missing_label_is_the_manifest_error(tmp_path):
    from samunet_core.evaluate import evaluate
    from samunet_core.manifest import parse_manifest

    manifest = parse_manifest({"cases": [{"id": "ct", "kind": "3d", "modality": "CT", "image": str(CT),
                                          "labelmap": str(SEG), "labels": {"3": "kidney_left", "12": "absent"}}]},
                              tmp_path)
    with pytest.raises(InputError, match=r"labels \[12\] are listed in the manifest but absent"):
        evaluate(manifest, None, "interactive3d", tmp_path / "out", progress=False)  # before any model work


# ---------------------------------------------------------------------------------------------------------------------
# End to end on a real CT, and back through `samunet segment`
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clicks_model():
    from samunet_core.predictor import load_predictor

    return load_predictor("litemedsam_clicks", device="cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interactive_cache")


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> tuple[Path, Path]:
    """(image, labelmap): the CT and its labels cut to axial slices 0..N_SLICES-1 (k is the axial axis here), same
    origin, spacing and direction."""
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("interactive_ct")
    paths = folder / "ct.nii.gz", folder / "seg.nii.gz"
    for source, path in zip((CT, SEG), paths, strict=True):
        sitk.WriteImage(sitk.ReadImage(str(source))[:, :, :N_SLICES], str(path))
    return paths


@pytest.fixture(scope="module", params=["box3d", "box2d"])
def interactive_run(request, clicks_model, cache_dir, ct, tmp_path_factory):
    """Two targets of the CT (no window in the manifest: the volume's percentile window), start box3d or box2d."""
    from samunet_core.cache import folder_cache
    from samunet_core.evaluate import evaluate
    from samunet_core.manifest import load_manifest

    root = tmp_path_factory.mktemp(f"interactive_{request.param}")
    manifest = {"name": "t", "cases": [{"id": "totalseg/ct_sm", "kind": "3d", "modality": "CT", "image": str(ct[0]),
                                        "labelmap": str(ct[1]), "labels": LABELS}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    out = root / "out"
    summary = evaluate(load_manifest(root / "manifest.json"), clicks_model, "interactive3d", out, progress=False,
                       cache=folder_cache(cache_dir), start=request.param, clicks=N_CLICKS)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return request.param, out, rows, summary


def test_results_and_summary(interactive_run):
    from samunet_core.evaluate import CSV_COLUMNS

    start, out, rows, summary = interactive_run
    assert list(rows[0]) == list(CSV_COLUMNS) and [r["target"] for r in rows] == list(LABELS.values())
    assert (summary["protocol"], summary["start"], summary["clicks"], summary["n_targets"]) == \
        ("interactive3d", start, N_CLICKS, 2)
    for row in rows:
        dice = [float(v) for v in row["dice_per_click"].split()]
        assert len(dice) == len(row["nsd_per_step"].split()) == N_CLICKS + 1
        assert len(row["s_per_step"].split()) == int(row["n_clicks"]) + 1
        assert float(row["dice"]) == pytest.approx(dice[-1], abs=1e-4)
        assert float(row["dsc_auc"]) == pytest.approx(np.trapezoid(dice[1:]), abs=1e-3)
        assert row["prompt"].startswith(start) and row["prompt_file"] == \
            f"prompts/totalseg_ct_sm__{row['target']}__step{row['n_clicks']}.json"
        lo, hi = (float(v) for v in row["window"].split())
        assert lo < hi
    per_step = np.mean([[float(v) for v in r["dice_per_click"].split()] for r in rows], axis=0)
    assert summary["mean_dice_per_step"] == pytest.approx(per_step, abs=1e-4)
    assert summary["dsc_final"] == summary["mean_dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]),
                                                                         abs=1e-5)
    assert summary["dsc_auc"] == pytest.approx(np.mean([float(r["dsc_auc"]) for r in rows]), abs=1e-5)
    ct = summary["by_modality"]["CT"]
    assert ct["n"] == 2 and ct["mean_dice_per_step"] == summary["mean_dice_per_step"]
    assert ct["dsc_auc"] == summary["dsc_auc"] and ct["dsc_final"] == summary["dsc_final"]
    assert summary["encoder_calls"] <= N_SLICES


def test_every_step_has_its_prompt_file(interactive_run, ct):
    from samunet_core.io.volumes import read_volume
    from samunet_core.prompts import read_prompt_file, resolve_prompts

    start, out, rows, _ = interactive_run
    frame = read_volume(ct[0]).frame("axial")
    for row in rows:
        n = int(row["n_clicks"])
        names = sorted(p.name for p in (out / "prompts").glob(f"totalseg_ct_sm__{row['target']}__step*.json"))
        assert names == [f"totalseg_ct_sm__{row['target']}__step{i}.json" for i in range(n + 1)]
        for i in range(n + 1):
            (seg,) = resolve_prompts(read_prompt_file(out / "prompts" / names[i]), frame).segments
            assert seg.name == row["target"] and seg.propagate and len(seg.points) == i and len(seg.boxes) == 1
            assert seg.boxes[0].is_3d == (start == "box3d")
    assert not list((out / "prompts").glob(".*")), "no temporary files left"


def test_final_prompt_file_through_samunet_segment_gives_the_reported_dice(interactive_run, cache_dir, ct, tmp_path,
                                                                          capsys):
    from samunet_core.io.segmentations import read_segmentation
    from samunet_core.io.volumes import read_volume

    _, out, rows, _ = interactive_run
    frame = read_volume(ct[0]).frame("axial")
    labels = frame.volume_to_slices(read_volume(ct[1]).array)
    for row in rows:
        output = tmp_path / f"{row['target']}.seg.nrrd"
        code = main(["segment", str(ct[0]), "--prompts", str(out / row["prompt_file"]), "--output", str(output),
                     "--window", *row["window"].split(), "--model", "litemedsam_clicks", "--device", "cpu",
                     "--runtime", "torch", "--cache-dir", str(cache_dir)])
        assert code == 0
        assert "(0 slices encoded" in capsys.readouterr().out, "the eval's embeddings are keyed as segment keys them"
        (segment,) = read_segmentation(output).segments
        got = frame.volume_to_slices(np.asarray(segment.mask, bool).reshape(frame.geometry.array_shape))
        assert metrics.dice(got, labels == int(row["label"])) == pytest.approx(float(row["dice"]), abs=1e-6), row
