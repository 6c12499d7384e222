"""Training: data loaders, split rules, prompt simulation, a short real training run, and the shipped weights.

Real components throughout: the packaged LiteMedSAM weights, in-repo SA-Med2D CT slices (Testing/data/sam_med2d_demo,
Apache-2.0 / CC BY 4.0, see SOURCES.md there), the real encoder (each slice encoded once per session).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_click_dice
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data" / "sam_med2d_demo"
TRAIN_IMAGES = ("s0114_111", "s0619_32")  # training run; amos_0004_75 stays unseen for the point1 check
HELD_OUT = "amos_0004_75"
WEIGHTS = Path(__file__).resolve().parents[2] / "samunet_core" / "weights" / "litemedsam_clicks_v5.pt"


@pytest.fixture(scope="module")
def base_predictor():
    from samunet_core.predictor import Predictor
    from samunet_core.train.weights_source import load_base_litemedsam

    return Predictor(load_base_litemedsam(), "litemedsam", "litemedsam", device="cpu")


@pytest.fixture(scope="module")
def sam_med2d_json(tmp_path_factory) -> Path:
    """An SA-Med2D image2label_train.json for the two training slices, written the way SA-Med2D writes paths."""
    folder = tmp_path_factory.mktemp("sam_med2d_index")
    table = {f"data_demo/images/{name}.png": [f"data_demo/masks/{p.name}"
                                              for p in sorted((DATA / "masks").glob(f"{name}_*.png"))]
             for name in TRAIN_IMAGES}
    path = folder / "image2label_train.json"
    path.write_text(json.dumps(table))
    return path


@pytest.fixture(scope="module")
def cached_items(tmp_path_factory, base_predictor, sam_med2d_json):
    from samunet_core.train.data import records_from_sam_med2d
    from samunet_core.train.embeddings import list_items, precompute

    cache_dir = tmp_path_factory.mktemp("train_cache")
    records = records_from_sam_med2d(sam_med2d_json, root=DATA)
    counts = precompute(records, base_predictor, cache_dir, progress=False)
    assert counts["encoded"] == 2
    again = precompute(records_from_sam_med2d(sam_med2d_json, root=DATA), base_predictor, cache_dir,
                       progress=False)
    assert again["skipped"] == 2 and again["encoded"] == 0  # resumable: nothing encoded twice
    return cache_dir, list_items(cache_dir)


def test_sam_med2d_loader(sam_med2d_json):
    from samunet_core.errors import InputError
    from samunet_core.train.data import records_from_sam_med2d

    records = list(records_from_sam_med2d(sam_med2d_json, root=DATA))  # "data_demo/..." found under a renamed folder
    assert [r.source for r in records] == [f"sam_med2d:{n}" for n in TRAIN_IMAGES]
    assert [len(r.targets) for r in records] == [15, 8]
    assert all(m.shape == r.image.shape[:2] and m.any() for r in records for _, m in r.targets)
    with pytest.raises(InputError, match="not found"):
        list(records_from_sam_med2d(sam_med2d_json))  # default root: the JSON's own folder holds no images


def test_split_is_by_subject_and_patient():
    from samunet_core.train.splits import SHARED_TRAIN, SHARED_VAL, make_split, split_unit

    assert split_unit("hc18/108_2HC") == split_unit("hc18/108_HC") == "hc18/108"
    assert split_unit("chasedb1/Image_10L") == split_unit("chasedb1/Image_10R")
    assert split_unit("hvsmr/10003_108") == "hvsmr/10003"
    ids = [f"hc18/{i:03d}_HC" for i in range(40)] + [f"hc18/{i:03d}_2HC" for i in range(0, 40, 3)] + \
        [f"chasedb1/Image_{i:02d}{s}" for i in range(1, 11) for s in "LR"] + [f"kvasir/k{i}" for i in range(30)]
    split = make_split(ids)
    assert split == make_split(list(reversed(ids)))  # deterministic, order-free
    train_units = {split_unit(c) for c in split.train_pool}
    assert train_units.isdisjoint(split_unit(c) for c in split.val_pool)
    assert "totalseg/example_ct_sm" not in SHARED_VAL and "totalseg/example_ct" in SHARED_TRAIN
    assert set(SHARED_TRAIN).isdisjoint(SHARED_VAL)


def test_augmented_copy_moves_image_and_masks_together(sam_med2d_json):
    from samunet_core.train.data import augmented, records_from_sam_med2d

    record = next(records_from_sam_med2d(sam_med2d_json, root=DATA))
    copy = augmented(record)
    again = augmented(record)
    assert copy.source == record.source + ":aug0" and np.array_equal(copy.image, again.image)  # reproducible
    assert not np.array_equal(copy.image, record.image) and copy.image.dtype == np.uint8
    assert not np.array_equal(augmented(record, seed=1).image, copy.image)
    assert [n for n, _ in copy.targets] == [n for n, _ in record.targets]
    for (_, before), (_, after) in zip(record.targets, copy.targets, strict=True):
        assert not np.array_equal(before, after)
        # a rotation by <= 15 degrees keeps area (nearest-neighbour resampling) and most of the overlap of big masks
        assert abs(int(after.sum()) - int(before.sum())) <= 0.1 * before.sum() + 20
    # the image moved with the masks: mean intensity inside each mask is preserved up to the intensity jitter
    inside = [float(record.image[m].mean()) for _, m in record.targets]
    inside_copy = [float(copy.image[m].mean()) for _, m in copy.targets]
    assert np.corrcoef(inside, inside_copy)[0, 1] > 0.9


def test_corrective_click_follows_the_eval_rule():
    from samunet_core import metrics
    from samunet_core.train.prompt_sim import PAD_LABEL, Prompts, add_corrections

    ref = np.zeros((2, 256, 256), bool)
    ref[:, 50:150, 50:150] = True
    pred = np.zeros_like(ref)
    pred[0, 50:150, 50:100] = True  # misses the right half -> positive click there
    pred[1] = ref[1]  # perfect -> padding point
    prompts = Prompts(None, [[(100.0, 100.0, 1)], [(100.0, 100.0, 1)]])
    rng = np.random.default_rng(0)
    add_corrections(prompts, pred, ref, (256, 256), rng, random_prob=0.0)
    click = metrics.next_click(pred[0], ref[0])
    assert prompts.clicks[0][-1] == (float(click.x), float(click.y), 1) and click.x >= 100
    assert prompts.clicks[1][-1][2] == PAD_LABEL
    coords, labels, boxes = prompts.tensors()
    assert tuple(coords.shape) == (2, 2, 2) and labels.tolist() == [[1, 1], [1, PAD_LABEL]] and boxes is None


def test_precompute_files_grid_masks(cached_items):
    _, items = cached_items
    assert [it.source for it in items] == [f"sam_med2d:{n}" for n in TRAIN_IMAGES]
    for item in items:
        assert item.masks.shape[1:] == (256, 256) and item.masks.dtype == bool
        h, w = item.input_size
        assert not item.masks[:, h:, :].any() and not item.masks[:, :, w:].any()  # padding is background
        assert len(item.names) == len(item.masks) >= 5


def _fixed_point_loss(model, cache_dir, items) -> float:
    """Loss of one positive click at each target's most interior point (the point1 protocol), whole grid."""
    import torch

    from samunet_core.train.embeddings import open_cache
    from samunet_core.train.losses import segmentation_loss
    from samunet_core.train.prompt_sim import first_prompts

    cache = open_cache(cache_dir)
    losses = []
    for item in items:
        masks = item.masks[:4]
        prompts = first_prompts(masks, "points", np.random.default_rng(0), centre_prob=1.0, max_points=1)
        coords, labels, _ = prompts.tensors()
        emb = cache.get(item.key).tensors["image_embedding"]
        with torch.no_grad():
            logits, iou = model.decode(emb, coords, labels, None, None)
            losses.append(float(segmentation_loss(logits, iou, torch.as_tensor(masks)).total))
    return float(np.mean(losses))


def test_short_training_run_lowers_loss_and_resumes(cached_items, tmp_path):
    from samunet_core.checkpoints import sha256_of_file
    from samunet_core.train.embeddings import open_cache
    from samunet_core.train.loop import TrainConfig, Trainer
    from samunet_core.train.weights_source import load_base_litemedsam

    cache_dir, items = cached_items
    config = TrainConfig(steps=8, prompts_per_step=3, lr=5e-4, warmup_steps=1, kd_weight=0.0, box_fraction=0.0,
                         round_probs=(0.8, 0.2), checkpoint_every=4)
    trainer = Trainer(load_base_litemedsam(), items, open_cache(cache_dir), config, run_dir=tmp_path)
    before = _fixed_point_loss(trainer.model, cache_dir, items)
    config_half = TrainConfig(**{**config.__dict__, "steps": 4})
    trainer.config = config_half
    trainer.run(progress=False)
    card = json.loads((tmp_path / "checkpoint.json").read_text())
    assert card["step"] == 4 and card["sha256"] == sha256_of_file(tmp_path / "checkpoint.pt")

    resumed = Trainer(load_base_litemedsam(), items, open_cache(cache_dir), config, run_dir=tmp_path)
    assert resumed.resume() and resumed.step == 4
    history = resumed.run(progress=False)
    assert resumed.step == 8 and len(history) == 8 and all(np.isfinite(h["loss"]) for h in history)
    after = _fixed_point_loss(resumed.model, cache_dir, items)
    assert after < 0.8 * before, (before, after)
    # only the prompt encoder and mask decoder changed
    base = load_base_litemedsam().state_dict()
    trained = resumed.model.state_dict()
    assert all(np.array_equal(base[k].numpy(), trained[k].numpy()) for k in base if k.startswith("image_encoder."))
    assert any(not np.array_equal(base[k].numpy(), trained[k].numpy()) for k in base if k.startswith("mask_decoder."))


def test_delta_roundtrip_is_strict(tmp_path):
    import torch

    from samunet_core.errors import CheckpointError
    from samunet_core.train.delta import apply_delta, read_delta, save_delta
    from samunet_core.train.weights_source import LITEMEDSAM_SHA256, load_base_litemedsam

    model = load_base_litemedsam()
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(1.0)
    path = tmp_path / "delta.pt"
    save_delta(model, path, LITEMEDSAM_SHA256, {"note": "test"})
    assert path.stat().st_size < 10 * 1024 * 1024
    fresh = load_base_litemedsam()
    blob = read_delta(path)
    assert apply_delta(fresh, blob, str(path)) == len([k for k in fresh.state_dict()
                                                        if k.startswith(("prompt_encoder.", "mask_decoder."))])
    assert torch.allclose(fresh.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight.half().float())
    del blob["state_dict"]["mask_decoder.iou_token.weight"]
    with pytest.raises(CheckpointError, match="1 missing"):
        apply_delta(fresh, blob, str(path))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError):
        read_delta(tmp_path / "bad.pt")


def test_shipped_weights_load_strictly_and_improve_point1(base_predictor):
    from samunet_core.checkpoints import sha256_of_file
    from samunet_core.modeling.litemedsam import build_litemedsam
    from samunet_core.predictor import Predictor
    from samunet_core.train.weights_source import LiteMedSAMDeltaWeights

    card = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert WEIGHTS.stat().st_size < 10 * 1024 * 1024 and sha256_of_file(WEIGHTS) == card["sha256"]
    source = LiteMedSAMDeltaWeights(WEIGHTS.name, card["sha256"])
    assert source.status() == "ready" and source.require() == WEIGHTS
    model = build_litemedsam()
    extra = source.load_into(model, WEIGHTS)
    assert extra["delta_tensors"] == 137
    trained = Predictor(model, "litemedsam_clicks", "litemedsam", device="cpu")

    image = np.array(Image.open(DATA / "images" / f"{HELD_OUT}.png"))
    masks = [np.array(Image.open(p)) > 0 for p in sorted((DATA / "masks").glob(f"{HELD_OUT}_*.png"))]
    embedding = base_predictor.encode(image)
    base = one_click_dice(base_predictor, embedding, masks)
    from samunet_core.predictor import Embedding

    clicks = one_click_dice(trained, Embedding("litemedsam_clicks", embedding.tensors, embedding.original_size,
                                             embedding.input_size), masks)
    assert np.mean(clicks) > np.mean(base) + 0.3, (base, clicks)


def test_ambiguous_click_loss_trains_the_best_candidate():
    """SAM's one-click loss: only the best of the candidate masks counts, the IoU head learns all of them."""
    import torch

    from samunet_core.train.losses import ambiguous_click_loss

    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 4:12] = 1
    good = torch.where(target > 0, 10.0, -10.0)
    bad = -good
    logits = torch.stack([torch.stack([bad[i], good[i], bad[i]]) for i in range(2)]).requires_grad_(True)
    iou_pred = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    loss = ambiguous_click_loss(logits, iou_pred, target)
    assert loss.shape == (2,) and float(loss.detach().max()) < 0.05, loss
    loss.sum().backward()
    assert float(logits.grad[:, 1].abs().sum()) > 0 and float(logits.grad[:, [0, 2]].abs().sum()) == 0


def test_lone_click_steps_train_the_ambiguity_tokens(cached_items):
    from samunet_core.train.embeddings import open_cache
    from samunet_core.train.loop import TrainConfig, Trainer
    from samunet_core.train.weights_source import load_base_litemedsam

    cache_dir, items = cached_items
    config = TrainConfig(steps=3, prompts_per_step=3, lr=5e-4, warmup_steps=1, kd_weight=0.0, box_fraction=0.0,
                         round_probs=(0.5, 0.5), multimask_first_click=True)
    trainer = Trainer(load_base_litemedsam(), items, open_cache(cache_dir), config)
    before = {k: v.clone() for k, v in trainer.model.mask_decoder.output_hypernetworks_mlps.state_dict().items()}
    history = trainer.run(progress=False)
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    after = trainer.model.mask_decoder.output_hypernetworks_mlps.state_dict()
    changed = {k.split(".")[0] for k in before if not torch_equal(before[k], after[k])}
    # token 0 serves the other targets; of tokens 1-3 only the best candidate learns (without the option none would)
    assert "0" in changed and changed & {"1", "2", "3"}, changed


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
