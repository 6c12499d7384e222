"""`samunet train --model samunet_res34 --sam-vit-b PATH`: the paper's model trained end to end through the real CLI.

The stand-in for Meta's sam_vit_b_01ec64.pth is a randomly initialised original SAM ViT-B (1024-px layout, the one
`read_sam_vit_b` checks) saved in fp16 (188 MB) to a temporary folder, as in test_sam_vit_b.py. Data: two in-repo
SA-Med2D CT slices (Testing/data/sam_med2d_demo) with two targets each, through an image2label_train.json written with
absolute paths. Every step runs the full ViT-B at 256 px on the CPU (2 threads), so the runs are a few steps long.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SAM_MED2D, random_sam_vit_b_state
from PIL import Image

from samunet_core.checkpoints import sha256_of_file
from samunet_core.cli import main

TARGETS = {"amos_0004_75": ("liver", "aorta"), "amos_0006_90": ("liver", "spleen")}
SEED = 1  # step 0: a box on amos_0004_75; step 1: points on amos_0006_90 with 2 correction rounds
VIT = "image_encoder.sam_img_encoder."


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_standin.pth"
    torch.save({k: v.half() for k, v in random_sam_vit_b_state().items()}, path)
    return path


@pytest.fixture(scope="module")
def data_json(tmp_path_factory):
    table = {str(SAM_MED2D / "images" / f"{case}.png"): [str(SAM_MED2D / "masks" / f"{case}_{t}_000.png")
                                                          for t in targets]
             for case, targets in TARGETS.items()}
    path = tmp_path_factory.mktemp("data") / "image2label_train.json"
    path.write_text(json.dumps(table))
    return path


def _train(stand_in, data_json, run_dir, steps: int, out=None) -> list[str]:
    args = ["train", "--model", "samunet_res34", "--sam-vit-b", str(stand_in), "--no-pool",
            "--sam-med2d-json", str(data_json), "--run-dir", str(run_dir), "--steps", str(steps), "--seed", str(SEED),
            "--lr", "2e-3", "--box-fraction", "0.5", "--prompts-per-step", "2", "--threads", "2", "--device", "cpu",
            "--no-progress"]
    return args + (["--out", str(out)] if out else [])


@pytest.fixture(scope="module")
def runs(stand_in, data_json, tmp_path_factory):
    """Run A: 1 step, then resumed to 2 steps. Run B: 2 steps uninterrupted. Returns their folders and outputs."""
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "a", root / "b"
    assert main(_train(stand_in, data_json, a, 1)) == 0
    first = json.loads((a / "checkpoint.json").read_text())
    assert main(_train(stand_in, data_json, a, 2)) == 0
    assert main(_train(stand_in, data_json, b, 2, out=root / "b.pth")) == 0
    return {"a": a, "b": b, "b_out": root / "b.pth", "a_first": first}


def test_cli_trains_resumes_deterministically_and_records_provenance(runs, stand_in):
    a, b = runs["a"], runs["b"]
    assert runs["a_first"]["step"] == 1 and len(runs["a_first"]["history"]) == 1
    info_a, info_b = (json.loads((d / "checkpoint.json").read_text()) for d in (a, b))
    hist_a, hist_b = info_a["history"], info_b["history"]
    assert [h["step"] for h in hist_a] == [h["step"] for h in hist_b] == [0, 1]
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in hist_a + hist_b)
    # the schedule ran both prompt kinds and corrective rounds
    assert {h["box"] for h in hist_b} == {0.0, 1.0} and any(h["rounds"] > 0 for h in hist_b)
    # the resumed step 1 is the uninterrupted run's step 1
    for key in ("loss", "loss_last_round", "iou", "rounds", "box", "batch"):
        assert hist_a[1][key] == pytest.approx(hist_b[1][key], rel=1e-5, abs=1e-6), key
    assert info_a["sha256"] == sha256_of_file(a / "checkpoint.pt")
    init = info_b["init_from"]
    assert init["init"] == "sam_vit_b" and init["sha256"] == sha256_of_file(stand_in) and init["backbone"] == "resnet34"
    assert "resnet" in init["fresh_modules"] and init["from_sam"] == 282
    assert info_b["parameters"]["trainable"] == 29_347_244  # the paper's split: everything but the ViT-B
    assert info_b["data"]["images"] == 2 and info_b["data"]["targets"] == 4
    card = json.loads(runs["b_out"].with_suffix(".json").read_text())
    assert card["sha256"] == sha256_of_file(runs["b_out"]) and card["run"]["steps_done"] == 2
    assert (a / "samunet_res34.pth").is_file()  # the default --out


@pytest.fixture(scope="module")
def trained(runs):
    """Run B's --out loaded the way `samunet segment --model samunet_res34 --checkpoint OUT` loads it."""
    from samunet_core.registry import load_model

    return load_model("samunet_res34", checkpoint=runs["b_out"])


def test_written_checkpoint_segments_and_kept_the_vit(runs, trained, stand_in):
    from samunet_core.predictor import Predictor

    model, info = trained
    assert info.sha256 == sha256_of_file(runs["b_out"])
    sam = torch.load(stand_in, weights_only=True)
    got = model.state_dict()
    assert torch.equal(got[VIT + "blocks.4.attn.qkv.weight"], sam["image_encoder.blocks.4.attn.qkv.weight"].float())
    predictor = Predictor(model, "samunet_res34", "samunet", device="cpu")
    image = np.array(Image.open(SAM_MED2D / "images" / "amos_0004_75.png"))
    prediction = predictor.predict(predictor.encode(image), boxes=np.array([60, 60, 180, 200]))
    assert prediction.masks.shape == (1, *image.shape[:2]) and prediction.masks.dtype == bool


def _fixed_box_loss(model) -> float:
    """samunet_loss of the tight liver box on amos_0004_75 (no jitter, no clicks), eval mode."""
    from samunet_core.model_input import SAMUNetInput
    from samunet_core.train.sam_vit_b import samunet_loss

    image = np.array(Image.open(SAM_MED2D / "images" / "amos_0004_75.png"))
    mask = np.array(Image.open(SAM_MED2D / "masks" / "amos_0004_75_liver_000.png")) > 0
    array, mapping = SAMUNetInput.image_to_array(image)
    target = torch.from_numpy(np.array(Image.fromarray(mask).resize((256, 256), Image.NEAREST)))[None]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = torch.from_numpy(SAMUNetInput.boxes_to_grid(np.array([[cols[0], rows[0], cols[-1], rows[-1]]]), mapping))
    with torch.no_grad():
        return float(samunet_loss(model.eval()(torch.from_numpy(array).permute(2, 0, 1)[None], box), target))


def test_training_lowers_the_loss_on_a_fixed_box(trained, stand_in):
    """The exported model (2 steps) against the same initial model the run started from (same seed)."""
    from samunet_core.train.samunet_vitb import build_model

    before, _ = build_model(stand_in, "samunet_res34", SEED)
    after = trained[0]
    b0, a0 = before.state_dict(), after.state_dict()
    assert all(torch.equal(b0[k], a0[k]) for k in b0 if k.startswith(VIT))  # the ViT-B stayed frozen
    for key in ("mask_decoder.med_token.weight", "resnet.stage1.0.conv1.weight", "adapters_in.0.reshaper.0.weight",
                "prompt_encoder.sam_prompt_encoder.point_embeddings.2.weight"):
        assert not torch.equal(b0[key], a0[key]), key  # everything else trained
    # measured 19.66 -> 17.52; the BatchNorm statistics alone (no optimiser step) would give 19.65
    loss_before, loss_after = _fixed_box_loss(before), _fixed_box_loss(after)
    assert loss_after < 0.95 * loss_before, (loss_before, loss_after)


def test_samunet_input_matches_the_model_preprocessing():
    from samunet_core.model_input import SAMUNetInput
    from samunet_core.train.data import ImageRecord
    from samunet_core.train.embeddings import grid_masks
    from samunet_core.train.samunet_vitb import model_input, prepare_item

    image = np.array(Image.open(SAM_MED2D / "images" / "amos_0006_90.png"))
    masks = [np.array(Image.open(SAM_MED2D / "masks" / f"amos_0006_90_{t}_000.png")) > 0 for t in ("liver", "aorta")]
    item = prepare_item(ImageRecord("x", "CT", image, [("liver", masks[0]), ("aorta", masks[1])]))
    array, mapping = SAMUNetInput.image_to_array(image)
    assert torch.equal(model_input(item)[0], torch.from_numpy(array).permute(2, 0, 1))
    assert item.input_size == mapping.input_size and item.names == ["liver", "aorta"]
    assert np.array_equal(item.masks, grid_masks(masks, mapping.input_size))
    assert prepare_item(ImageRecord("y", "CT", image, [("speck", np.zeros(image.shape[:2], bool))])) is None


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, stand_in, data_json, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "out.pth"
    common = ["--no-pool", "--sam-med2d-json", str(data_json), "--run-dir", str(run_dir), "--out", str(out),
              "--steps", "1", "--no-progress"]
    assert main(["train", "--model", "samunet_res34", *common]) == 2
    assert "--sam-vit-b" in capsys.readouterr().err
    assert main(["train", "--model", "litemedsam_clicks", "--sam-vit-b", str(stand_in), *common]) == 2
    assert "samunet_res34 or samunet_res50" in capsys.readouterr().err
    assert main(["train", "--model", "samunet_res50", "--sam-vit-b", str(tmp_path / "nope.pth"), *common]) == 2
    assert "sam_vit_b_01ec64.pth" in capsys.readouterr().err
    assert main(["train", "--model", "samunet_res34", "--sam-vit-b", str(stand_in), "--init", "x.pt", *common]) == 2
    assert "--init" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
