"""`samunet train --model samunet_tinyvit`: the same Trainer on SAM-UNet over LiteMedSAM's frozen TinyViT.

Real components: litemedsam_clicks' weights (the init), the packaged LiteMedSAM encoder, in-repo SA-Med2D CT slices
(Testing/data/sam_med2d_demo). One slice is encoded once per module; each run is a few steps on 2 threads.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[1] / "data" / "sam_med2d_demo"
IMAGE = "s0619_32"
TRAIN = dict(prompts_per_step=2, lr=3e-4, warmup_steps=1, kd_weight=0.0, box_fraction=0.0, round_probs=(0.6, 0.4),
             threads=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """(cache_dir, items, clicks state dict): one slice encoded, its model input stored next to the embedding."""
    from samunet_core.predictor import Predictor
    from samunet_core.registry import load_model
    from samunet_core.train.data import records_from_sam_med2d
    from samunet_core.train.embeddings import list_items, precompute
    from samunet_core.train.loop import store_model_inputs
    from samunet_core.train.weights_source import load_base_litemedsam

    folder = tmp_path_factory.mktemp("tinyvit_train")
    index = folder / "image2label_train.json"
    index.write_text(json.dumps({f"data_demo/images/{IMAGE}.png": [f"data_demo/masks/{p.name}" for p in
                                                                  sorted((DATA / "masks").glob(f"{IMAGE}_*.png"))]}))
    cache_dir = folder / "cache"
    encoder = Predictor(load_base_litemedsam(), "litemedsam", "litemedsam", device="cpu")
    records = store_model_inputs(records_from_sam_med2d(index, root=DATA), cache_dir)
    assert precompute(records, encoder, cache_dir, progress=False)["encoded"] == 1
    clicks, _ = load_model("litemedsam_clicks")
    return cache_dir, list_items(cache_dir), clicks.state_dict()


def fresh_model(clicks_state):
    from samunet_core.modeling.samunet_tinyvit import build_samunet_tinyvit

    torch.manual_seed(0)
    return build_samunet_tinyvit(clicks_state)


def make_trainer(cache, steps, run_dir=None, **overrides):
    from samunet_core.train.embeddings import open_cache
    from samunet_core.train.loop import TrainConfig, Trainer

    cache_dir, items, clicks_state = cache
    config = TrainConfig(steps=steps, **{"checkpoint_every": 3, **TRAIN, **overrides})
    return Trainer(fresh_model(clicks_state), items, open_cache(cache_dir), config, run_dir=run_dir)


def fixed_loss(trainer) -> float:
    """Loss of the tight box of every target of the slice, full grid, model in eval mode."""
    from samunet_core.train.loop import load_model_input
    from samunet_core.train.losses import segmentation_loss
    from samunet_core.train.prompt_sim import first_prompts

    item = trainer.items[0]
    masks = item.masks
    _, _, boxes = first_prompts(masks, "box", np.random.default_rng(0), jitter_prob=0.0).tensors()
    emb = trainer.cache.get(item.key).tensors["image_embedding"]
    with torch.no_grad():
        cached = trainer.model.eval().encode(load_model_input(trainer.inputs_dir, item.key[1]), emb)
        logits, iou = trainer.model.decode(cached, boxes=boxes)
    return float(segmentation_loss(logits, iou, torch.as_tensor(masks)).total)


@pytest.fixture(scope="module")
def trained(cache):
    """An 8-step box run (4 targets a step, with correction rounds) with the loss on fixed boxes before and after."""
    trainer = make_trainer(cache, 8, box_fraction=1.0, prompts_per_step=4)
    before = fixed_loss(trainer)
    trainer.run(progress=False)
    return trainer, before, fixed_loss(trainer)


def test_stored_model_input_is_the_litemedsam_input(cache):
    from PIL import Image

    from samunet_core.model_input import LiteMedSAMInput
    from samunet_core.train.loop import load_model_input

    cache_dir, items, _ = cache
    image = np.array(Image.open(DATA / "images" / f"{IMAGE}.png"))
    expected, _ = LiteMedSAMInput.image_to_array(image)
    x = load_model_input(cache_dir, items[0].key[1])
    assert x.shape == (1, 3, 256, 256) and torch.equal(x[0].permute(1, 2, 0), torch.from_numpy(expected))


def test_training_lowers_the_loss_and_keeps_tinyvit_and_sam_trunk(trained, cache):
    trainer, before, after = trained
    assert trainer.family == "samunet_tinyvit" and len(trainer.history) == 8
    assert all(np.isfinite(h["loss"]) for h in trainer.history)
    assert after < 0.85 * before, (before, after)  # measured 0.331 -> 0.212
    clicks_state = cache[2]
    state = trainer.model.state_dict()
    for key, value in clicks_state.items():
        frozen = not key.startswith("mask_decoder.iou_prediction_head.")
        assert torch.equal(state[key], value) == frozen, key  # TinyViT and SAM trunk unchanged, IoU head trained
    init = fresh_model(clicks_state).state_dict()
    for prefix in ("cnn.", "adapters_in.", "adapters_bridge.", "embedding_encoder.", "hq_decoder."):
        assert any(not torch.equal(state[k], init[k]) for k in init if k.startswith(prefix)), prefix


def test_delta_reloads_strictly_and_reproduces_the_logits(trained, cache, tmp_path):
    from samunet_core.errors import CheckpointError
    from samunet_core.modeling.samunet_tinyvit import build_samunet_tinyvit
    from samunet_core.train.delta import FAMILY_PREFIXES, apply_delta, read_delta, save_delta
    from samunet_core.train.loop import load_model_input
    from samunet_core.train.weights_source import LITEMEDSAM_SHA256, load_base_litemedsam

    trainer = trained[0]
    cache_dir, items, clicks_state = cache
    path = tmp_path / "delta.pt"
    save_delta(trainer.model, path, LITEMEDSAM_SHA256, {"family": "samunet_tinyvit"},
               FAMILY_PREFIXES["samunet_tinyvit"])
    blob = read_delta(path)
    assert all(not k.startswith("image_encoder.") for k in blob["state_dict"])
    torch.manual_seed(123)  # a different random CNN: the delta must overwrite all of it
    fresh = build_samunet_tinyvit(clicks_state)
    n = apply_delta(fresh, blob, str(path))
    assert n == len([k for k in fresh.state_dict() if not k.startswith("image_encoder.")])
    rounded = copy.deepcopy(trainer.model)  # the trained model with its tensors through fp16, as the file holds them
    apply_delta(rounded, blob, str(path))
    x = load_model_input(cache_dir, items[0].key[1])
    emb = trainer.cache.get(items[0].key).tensors["image_embedding"]
    box = torch.tensor([[60.0, 60.0, 180.0, 180.0]])
    with torch.no_grad():
        outs = [m.eval().decode(m.encode(x, emb), boxes=box) for m in (fresh, rounded, trainer.model)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert (outs[0][0] - outs[2][0]).abs().max() < 0.05 * outs[2][0].abs().max()
    assert ((outs[0][0] > 0) == (outs[2][0] > 0)).float().mean() > 0.999
    with pytest.raises(CheckpointError, match="unexpected"):
        apply_delta(load_base_litemedsam(), blob, str(path))  # a LiteMedSAM has no CNN branch
    del blob["state_dict"]["cnn.stage1.0.conv1.weight"]
    with pytest.raises(CheckpointError, match="1 missing"):
        apply_delta(fresh, blob, str(path))


def test_resume_continues_identically(cache, tmp_path):
    from samunet_core.train.loop import TrainConfig

    options = dict(run_dir=tmp_path / "a", box_fraction=0.5, kd_weight=1.0, checkpoint_every=2)  # KD teacher too
    full = make_trainer(cache, 4, **options)
    config = full.config
    full.config = TrainConfig(**{**config.__dict__, "steps": 2})
    full.run(progress=False)  # checkpoint at step 2
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
    full.config = config
    full.run(progress=False)  # the uninterrupted run, steps 2..3
    resumed = make_trainer(cache, 4, **{**options, "run_dir": tmp_path / "b"})
    assert resumed.resume() and resumed.step == 2
    resumed.run(progress=False)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
