"""SAM-UNet on TinyViT with fusion "inside" (samunet_core/modeling/samunet_tinyvit.py, docs/samunet_tinyvit.md):
CNN features added inside the frozen TinyViT's stages, gradient through the transformer.

Fast: a random LiteMedSAM state (seeded) stands in for litemedsam_clicks, and the input is a synthetic image; the
properties tested (keys, the stage walk, zero-init equality, gradient flow) do not depend on trained weights.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from samunet_core.errors import InputError
from samunet_core.modeling.litemedsam import build_litemedsam
from samunet_core.modeling.samunet_tinyvit import (
    DEFAULT_TRAINABLE,
    INSIDE_STAGES,
    build_samunet_tinyvit,
    fusion_of_state,
    parameter_group,
    set_trainable,
    tinyvit_forward,
    tinyvit_stage_inputs,
)

# The after variant's layout (as in test_samunet_tinyvit.py); the inside variant swaps adapters_in for adapters_inside.
AFTER_KEYS = {"image_encoder": 298, "prompt_encoder": 17, "mask_decoder": 120, "cnn": 216, "adapters_in": 32,
              "adapters_bridge": 18, "embedding_encoder": 6, "hq_decoder": 13}
INSIDE_KEYS = {**{k: v for k, v in AFTER_KEYS.items() if k != "adapters_in"}, "adapters_inside": 34}
# Reshaper f_i -> TinyViT stage input (ResNet-34 branch): f0 64@128² -> 128@128² (1x1 conv), f1 64@64² -> 160@64²,
# f2 128@32² -> 160@64² (ConvT, LN, 1x1), f3 256@16² -> 320@64² (2x), f4 512@8² -> 320@64² (3x).
INSIDE_ADAPTER_PARAMETERS = (8_320, 10_400, 43_360, 185_216, 710_272)  # 957,568
AFTER_ADAPTER_PARAMETERS = 953_408
AFTER_TOTAL = 32_302_372
BOX = torch.tensor([[60.0, 70.0, 190.0, 180.0]])
CLICK = dict(point_coords=torch.tensor([[[120.0, 125.0]]]), point_labels=torch.tensor([[1]]))


def synthetic_image(seed: int = 0) -> np.ndarray:
    """256x256x3 uint8: smooth background, a bright ellipse and noise (a stand-in CT slice)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:256, :256]
    blob = ((yy - 125) / 55.0) ** 2 + ((xx - 125) / 65.0) ** 2 < 1
    grey = 60 + 0.3 * xx + 120 * blob + rng.normal(0, 8, (256, 256))
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def model_input(image: np.ndarray) -> torch.Tensor:
    x = image.astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())
    return torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()


def tops(state) -> dict[str, int]:
    out: dict[str, int] = {}
    for key in state:
        out[key.split(".")[0]] = out.get(key.split(".")[0], 0) + 1
    return out


@pytest.fixture(scope="module")
def setup():
    """(LiteMedSAM state, after model, inside model, x, E = TinyViT(x), inside.encode(x)); both models from the
    same random LiteMedSAM state and seed."""
    torch.manual_seed(0)
    state = build_litemedsam().state_dict()
    torch.manual_seed(1)
    after = build_samunet_tinyvit(state)
    torch.manual_seed(1)
    inside = build_samunet_tinyvit(state, fusion="inside")
    x = model_input(synthetic_image())
    with torch.no_grad():
        embedding = inside.image_encoder(x)
        encoded = inside.encode(x)
    return state, after, inside, x, embedding, encoded


# ---------------------------------------------------------------------------------------------------------------------
def test_keys_groups_and_the_recorded_fusion(setup):
    state, after, inside, *_ = setup
    assert after.fusion == "after" and inside.fusion == "inside"
    after_state, inside_state = after.state_dict(), inside.state_dict()
    # The after variant is unchanged: same keys, no adapters_inside module at all.
    assert tops(after_state) == AFTER_KEYS and len(after_state) == 720 and after.adapters_inside is None
    assert sum(p.numel() for p in after.parameters()) == AFTER_TOTAL
    assert tops(inside_state) == INSIDE_KEYS and len(inside_state) == 722 and inside.adapters_in is None
    shared = [k for k in inside_state if not k.startswith("adapters_inside.")]
    assert shared == [k for k in after_state if not k.startswith("adapters_in.")]  # same names, same order
    assert all(inside_state[k].shape == after_state[k].shape for k in shared)
    assert fusion_of_state(after_state) == "after" and fusion_of_state(inside_state) == "inside"
    with pytest.raises(InputError):
        fusion_of_state(state)  # a LiteMedSAM state has neither
    # One adapter per CNN level, each ending in the width of its TinyViT stage; their own group, trained by default.
    stages = tinyvit_stage_inputs(inside.image_encoder)
    assert stages == {0: (64, 256), 1: (128, 128), 2: (160, 64), 3: (320, 64)}
    for i, (adapter, stage) in enumerate(zip(inside.adapters_inside, INSIDE_STAGES, strict=True)):
        last = adapter.reshaper[-1]
        assert last.out_channels == stages[stage][0] and not last.weight.any() and not last.bias.any()
        assert sum(p.numel() for p in adapter.parameters()) == INSIDE_ADAPTER_PARAMETERS[i]
    groups: dict[str, int] = {}
    for key, param in inside.named_parameters():
        groups[parameter_group(key)] = groups.get(parameter_group(key), 0) + param.numel()
    assert groups["adapters_inside"] == sum(INSIDE_ADAPTER_PARAMETERS) and "adapters_in" not in groups
    assert sum(groups.values()) == AFTER_TOTAL - AFTER_ADAPTER_PARAMETERS + sum(INSIDE_ADAPTER_PARAMETERS)
    trained = {parameter_group(k) for k, p in inside.named_parameters() if p.requires_grad}
    assert trained == (set(DEFAULT_TRAINABLE) - {"adapters_in"}) | {"adapters_inside"}
    assert not any(p.requires_grad for p in inside.image_encoder.parameters())
    probe = copy.deepcopy(inside)
    assert all(k.startswith("adapters_inside.") for k in set_trainable(probe, ("adapters_inside",)))
    with pytest.raises(ValueError, match="fusion"):
        build_samunet_tinyvit(state, fusion="before")


def test_stage_walk_is_tinyvit_forward(setup):
    _, _, inside, x, embedding, _ = setup
    encoder = inside.image_encoder
    with torch.no_grad():
        assert torch.equal(tinyvit_forward(encoder, x), embedding)  # bit for bit
        with pytest.raises(ValueError, match="stage 2"):
            tinyvit_forward(encoder, x, {2: torch.zeros(1, 160, 32, 32)})
        with pytest.raises(ValueError, match="no stage 4"):
            tinyvit_forward(encoder, x, {4: torch.zeros(1, 320, 64, 64)})


def test_inside_model_at_init_equals_the_after_model_and_litemedsam(setup):
    state, after, inside, x, embedding, encoded = setup
    lite = build_litemedsam()
    lite.load_state_dict(state)
    lite.eval()
    # The zero-initialised injections leave TinyViT's output as it is: E' = E exactly.
    assert torch.equal(encoded["image_embedding"], embedding)
    with torch.no_grad():
        cached = after.encode(x, embedding)
        for prompts in (dict(boxes=BOX), CLICK, dict(boxes=BOX, **CLICK)):
            logits, iou = inside.decode(encoded, **prompts)
            ref_logits, ref_iou = after.decode(cached, **prompts)
            lite_logits, lite_iou = lite.decode_cached(embedding, lite.image_side_cache(embedding), **prompts)
            assert logits.std() > 0.01  # not a constant output
            assert (logits - ref_logits).abs().max() <= 1e-6 and (iou - ref_iou).abs().max() <= 1e-6
            assert (logits - lite_logits).abs().max() <= 1e-6 and (iou - lite_iou).abs().max() <= 1e-6


def test_inside_refuses_a_precomputed_embedding(setup):
    _, _, inside, x, embedding, _ = setup
    with pytest.raises(InputError, match="fusion='inside'"):
        inside.encode(x, embedding)
    with pytest.raises(InputError, match="fusion='inside'"):
        inside(x, boxes=BOX, image_embedding=embedding)


def test_gradient_flows_through_the_frozen_tinyvit(setup):
    _, _, base, x, _, _ = setup
    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a "trained" state: otherwise the zero last convs stop the gradient before the CNN
        for adapter in model.adapters_inside:
            last = adapter.reshaper[-1]
            last.weight.copy_(1e-3 * torch.randn(last.weight.shape, generator=gen))
    bn = model.image_encoder.layers[1].downsample.conv1.bn
    stats = bn.running_mean.clone()
    model.train()
    logits, iou = model(x, boxes=BOX)
    target = torch.zeros_like(logits)
    target[..., 70:180, 60:190] = 1.0
    torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.image_encoder.parameters())
    assert torch.equal(bn.running_mean, stats)  # TinyViT stayed in eval mode
    cnn_grad = sum(float(p.grad.abs().sum()) for p in model.cnn.parameters() if p.grad is not None)
    assert cnn_grad > 0
    # Every adapter gets gradient, f0's too: it is added at stage 1 and reaches E' only through stages 1-3 and the neck.
    for i, adapter in enumerate(model.adapters_inside):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters()), i


def test_two_trainer_steps_train_the_inside_adapters(setup, tmp_path):
    from samunet_core.cache import content_hash
    from samunet_core.train.embeddings import CachedItem
    from samunet_core.train.loop import TrainConfig, Trainer, model_input_path

    _, _, base, _, embedding, _ = setup
    image = synthetic_image()
    image_hash = content_hash(image)
    path = model_input_path(tmp_path, image_hash)
    path.parent.mkdir(parents=True)
    np.save(path, image)  # what store_model_inputs writes: the 256-grid uint8 slice
    masks = np.zeros((1, 256, 256), bool)
    masks[0, 90:160, 75:175] = True
    item = CachedItem(source="synthetic/blob.png", modality="CT", key=("enc", image_hash, "grid"), names=["blob"],
                      masks=masks, original_size=(256, 256), input_size=(256, 256))
    cache = SimpleNamespace(disk_dir=tmp_path, get=lambda key: SimpleNamespace(tensors={"image_embedding": embedding}))
    config = TrainConfig(steps=2, prompts_per_step=1, lr=1e-3, warmup_steps=1, kd_weight=0.0, box_fraction=1.0,
                         round_probs=(1.0,), checkpoint_every=0, threads=1)
    model = copy.deepcopy(base)
    initial = copy.deepcopy(model.state_dict())
    trainer = Trainer(model, [item], cache, config)
    trainer.run(progress=False)
    assert len(trainer.history) == 2 and all(np.isfinite(h["loss"]) for h in trainer.history)
    state = trainer.model.state_dict()
    for i, adapter in enumerate(trainer.model.adapters_inside):  # the zero last convs moved: gradient at step 0
        assert adapter.reshaper[-1].weight.abs().max() > 0, i
    assert any(not torch.equal(state[k], initial[k]) for k in state if k.startswith("cnn."))
    assert all(torch.equal(state[k], initial[k]) for k in state if k.startswith("image_encoder."))
    # The Trainer still refuses a trainable TinyViT.
    set_trainable(model, (*DEFAULT_TRAINABLE, "tinyvit"))
    with pytest.raises(InputError, match="frozen"):
        Trainer(model, [item], cache, config)
