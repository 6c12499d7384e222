"""SAM-UNet on LiteMedSAM's frozen TinyViT (samunet_core/modeling/samunet_tinyvit.py, docs/samunet_tinyvit.md).

Real weights: TinyViT, prompt encoder and SAM decoder come from litemedsam_clicks; the CNN branch and the fusion
modules are randomly initialised under a fixed seed. The image is a real CT slice with its real liver mask.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import SAM_MED2D, load_image, load_mask

from samunet_core.errors import CheckpointError, InputError
from samunet_core.modeling import fast_decoder
from samunet_core.modeling.litemedsam import build_litemedsam
from samunet_core.modeling.samunet_tinyvit import (
    DEFAULT_TRAINABLE,
    LITEMEDSAM_PREFIXES,
    _hq_logits,
    build_samunet_tinyvit,
    hq_logits_reference,
    parameter_group,
    set_trainable,
)

# Parameters per group, computed from the architecture in docs/samunet_tinyvit.md ("Parameters").
GROUP_PARAMETERS = {
    "tinyvit": 5_726_740,
    "sam_heads": 3_931_948,  # prompt encoder 6,220 + SAM decoder 4,058,340 - IoU head
    "iou_head": 132_612,
    "cnn": 21_284_672,  # torchvision ResNet-34 without fc (21,797,672 - 513,000)
    "adapters_in": 16_640 + 49_600 + 181_056 + 706_112,
    "bridges": 2_080 + 9_344 + 42_304 + 67_808,  # adapters_bridge 0..2 + embedding_encoder
    "hq_decoder": 256 + 139_808 + 11_392,  # med_token, hf_mlp, embedding_maskfeature
}
TOTAL_PARAMETERS = 32_302_372
TRAINABLE_PARAMETERS = 22_643_684  # cnn + adapters_in + bridges + hq_decoder + iou_head
STATE_KEYS = {"image_encoder": 298, "prompt_encoder": 17, "mask_decoder": 120, "cnn": 216, "adapters_in": 32,
              "adapters_bridge": 18, "embedding_encoder": 6, "hq_decoder": 13}  # 720 tensors
CACHE_BYTES_FP32 = (256 * 64 * 64 + 32 * 128 * 128) * 4  # 6 MiB per slice

CASE = "amos_0006_90"
LIVER_BOX = [97, 188, 269, 355]  # slice pixels (x0, y0, x1, y1), the reference box of the liver
LIVER_CLICK = [[180, 280]]  # (x, y) inside the liver


@pytest.fixture(scope="module")
def setup():
    """(clicks LiteMedSAM, our model at init, model input 1x3x256x256, TinyViT embedding, grid mapping)."""
    from samunet_core.model_input import LiteMedSAMInput
    from samunet_core.registry import load_model

    clicks, _ = load_model("litemedsam_clicks")
    torch.manual_seed(0)
    model = build_samunet_tinyvit(clicks.state_dict())
    array, mapping = LiteMedSAMInput.image_to_array(load_image(CASE))
    x = torch.from_numpy(array).permute(2, 0, 1)[None]
    with torch.inference_mode():
        embedding = clicks.encode(x)
    return clicks, model, x, embedding, mapping


def grid_prompts(mapping):
    from samunet_core.model_input import LiteMedSAMInput

    boxes = torch.as_tensor(LiteMedSAMInput.boxes_to_grid(np.array([LIVER_BOX]), mapping))
    points = torch.as_tensor(LiteMedSAMInput.points_to_grid(np.array([LIVER_CLICK]), mapping))
    return dict(point_coords=points, point_labels=torch.tensor([[1]]), boxes=boxes)


def liver_target(mapping) -> torch.Tensor:
    from samunet_core.train.embeddings import grid_masks

    mask = load_mask(SAM_MED2D / "masks" / f"{CASE}_liver_000.png")
    return torch.from_numpy(grid_masks([mask], mapping.input_size))  # 1x256x256


# ---------------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------------
def test_keys_and_parameter_counts():
    torch.manual_seed(0)
    model = build_samunet_tinyvit()
    state = model.state_dict()
    tops: dict[str, int] = {}
    for key in state:
        tops[key.split(".")[0]] = tops.get(key.split(".")[0], 0) + 1
    assert tops == STATE_KEYS and len(state) == 720
    # The LiteMedSAM part keeps LiteMedSAM's keys and shapes exactly, so its checkpoints load into it unchanged.
    lite = {k: tuple(v.shape) for k, v in build_litemedsam().state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items() if k.startswith(LITEMEDSAM_PREFIXES)} == lite
    groups: dict[str, int] = {}
    for key, param in model.named_parameters():
        groups[parameter_group(key)] = groups.get(parameter_group(key), 0) + param.numel()
    assert groups == GROUP_PARAMETERS
    assert sum(p.numel() for p in model.parameters()) == TOTAL_PARAMETERS
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == TRAINABLE_PARAMETERS
    assert {parameter_group(k) for k, p in model.named_parameters() if p.requires_grad} == set(DEFAULT_TRAINABLE)
    assert tuple(state["adapters_in.3.reshaper.9.weight"].shape) == (256, 64, 1, 1)
    assert tuple(state["adapters_bridge.0.reshaper.0.weight"].shape) == (32, 64, 1, 1)
    assert tuple(state["hq_decoder.embedding_maskfeature.3.weight"].shape) == (32, 32, 3, 3)
    # Everything but TinyViT, for a second phase that also tunes SAM's heads.
    names = set_trainable(model, (*DEFAULT_TRAINABLE, "sam_heads"))
    assert sum(p.numel() for k, p in model.named_parameters() if k in names) == TOTAL_PARAMETERS - 5_726_740
    with pytest.raises(ValueError, match="unknown parameter groups"):
        set_trainable(model, ("decoder",))


def test_clicks_state_must_be_a_litemedsam_state_dict(setup):
    clicks = setup[0]
    state = clicks.state_dict()
    state.pop("mask_decoder.iou_token.weight")
    with pytest.raises(CheckpointError, match="1 missing"):
        build_samunet_tinyvit(state)


# ---------------------------------------------------------------------------------------------------------------------
# Step 0 = litemedsam_clicks
# ---------------------------------------------------------------------------------------------------------------------
def test_untrained_model_returns_litemedsam_clicks_output(setup):
    clicks, model, x, embedding, mapping = setup
    prompts = grid_prompts(mapping)
    with torch.inference_mode():
        cached = model.encode(x, embedding)
        side = model.image_side_cache(cached)
        ref_logits, ref_iou = clicks.decode_cached(embedding, clicks.image_side_cache(embedding), **prompts)
        logits, iou = model.decode(cached, **prompts, side_cache=side)
        # second round: the first logits fed back as mask input (the uncached path)
        ref2, ref2_iou = clicks.decode_cached(embedding, clicks.image_side_cache(embedding), **prompts,
                                              mask_input=ref_logits)
        out2, out2_iou = model.decode(cached, **prompts, mask_input=logits)
        sam_logits, _ = clicks.decode(embedding, **prompts)  # SAM's own MaskDecoder.forward
    assert logits.shape == (1, 1, 256, 256) and iou.shape == (1, 1)
    assert ref_logits.std() > 1 and (ref_logits > 0).sum() > 1000  # a real liver mask, not a constant
    assert torch.equal(cached["image_embedding"], embedding)  # zero-initialised adapters
    # measured: bit-equal (max |diff| 0.0) to the clicks model's cached decode, with and without mask input
    assert (logits - ref_logits).abs().max() <= 1e-5 and (iou - ref_iou).abs().max() <= 1e-5
    assert (out2 - ref2).abs().max() <= 1e-5 and (out2_iou - ref2_iou).abs().max() <= 1e-5
    assert (logits - sam_logits).abs().max() < 1e-4  # measured 9.5e-6 (fast path vs SAM's)


def test_fits_the_predictor_through_a_family(setup, monkeypatch):
    """The Predictor hosts the model through a _Family like the one docs/samunet_tinyvit.md proposes."""
    from samunet_core import predictor as predictor_module
    from samunet_core.model_input import LiteMedSAMInput

    class Family(predictor_module._Family):
        preprocessing = LiteMedSAMInput
        logits_grid = 256

        def encode(self, x):
            return self.model.encode(x)

        def decode(self, embedding, tensors, coords, labels, boxes, mask_input):
            slot = ("decoder_cache", id(self.model))
            if slot not in embedding.scratch:
                embedding.scratch[slot] = self.model.image_side_cache(tensors)
            logits, iou = self.model.decode(tensors, coords, labels, boxes, mask_input,
                                            side_cache=embedding.scratch[slot])
            return logits, iou[:, 0]

    clicks, model, *_ = setup
    monkeypatch.setitem(predictor_module._FAMILIES, "samunet_tinyvit", Family)
    ours = predictor_module.Predictor(copy.deepcopy(model), "samunet_tinyvit", "samunet_tinyvit", device="cpu")
    reference = predictor_module.Predictor(clicks, "litemedsam_clicks", "litemedsam", device="cpu")
    image = load_image(CASE)
    emb, ref_emb = ours.encode(image), reference.encode(image)
    assert emb.nbytes == CACHE_BYTES_FP32 and ref_emb.nbytes == 256 * 64 * 64 * 4
    assert {k: tuple(v.shape) for k, v in emb.tensors.items()} == {"image_embedding": (1, 256, 64, 64),
                                                                    "msf": (1, 32, 128, 128)}
    out = ours.predict(emb, points=LIVER_CLICK, labels=[1], boxes=LIVER_BOX)
    ref = reference.predict(ref_emb, points=LIVER_CLICK, labels=[1], boxes=LIVER_BOX)
    assert np.array_equal(out.masks, ref.masks) and out.masks.sum() > 1000
    assert np.abs(out.logits - ref.logits).max() <= 1e-5 and np.abs(out.scores - ref.scores).max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Training: what gets gradients, and the decoder really reads the CNN features
# ---------------------------------------------------------------------------------------------------------------------
def train_step(model, x, embedding, prompts, target, optimizer=None):
    """One segmentation-loss backward (and optimizer step when given) on the real slice; returns the loss."""
    from samunet_core.train.losses import segmentation_loss

    model.train()
    model.zero_grad(set_to_none=True)
    logits, iou = model(x, **prompts, image_embedding=embedding)
    loss = segmentation_loss(logits, iou, target).total
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.eval()
    return float(loss.detach())


def grad_norm(model, prefix: str) -> float:
    grads = [p.grad for k, p in model.named_parameters() if k.startswith(prefix) and p.grad is not None]
    return float(sum(g.norm() ** 2 for g in grads) ** 0.5) if grads else 0.0


def decode_with_features(model, x, embedding, prompts, noise: float):
    """Logits after adding `noise` x N(0, 1) to every CNN feature map (fixed seed), through fuse and decode."""
    with torch.inference_mode():
        features = model.cnn_features(x)
        gen = torch.Generator().manual_seed(1)
        features = [f + noise * torch.randn(f.shape, generator=gen) for f in features]
        logits, _ = model.decode(model.fuse(embedding, features), **prompts)
    return logits


def test_tinyvit_frozen_cnn_and_fusion_learn_and_the_decoder_uses_them(setup):
    _, base, x, embedding, mapping = setup
    model = copy.deepcopy(base)
    prompts, target = grid_prompts(mapping), liver_target(mapping)
    bn = model.image_encoder.patch_embed.seq[0].bn
    stats = bn.running_mean.clone()

    # At initialisation the CNN features cannot reach the output (zero-initialised last layers).
    clean = decode_with_features(model, x, embedding, prompts, 0.0)
    assert torch.equal(decode_with_features(model, x, embedding, prompts, 1.0), clean)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    train_step(model, x, None, prompts, target, optimizer)  # TinyViT runs inside: still no gradient
    assert all(p.grad is None and not p.requires_grad for p in model.image_encoder.parameters())
    assert torch.equal(bn.running_mean, stats)  # train() left the frozen TinyViT in eval mode
    # Step 0: only the zero-initialised layers themselves receive gradient (the CNN's is exactly 0).
    assert grad_norm(model, "hq_decoder.hf_mlp.layers.2") > 0
    assert all(grad_norm(model, f"adapters_in.{i}.reshaper.{len(a.reshaper) - 1}") > 0
               for i, a in enumerate(model.adapters_in))
    assert grad_norm(model, "cnn.") == 0 and grad_norm(model, "adapters_bridge.") == 0

    train_step(model, x, embedding, prompts, target)
    for prefix in ("cnn.", "adapters_in.", "adapters_bridge.", "embedding_encoder.", "hq_decoder.med_token",
                   "hq_decoder.hf_mlp", "hq_decoder.embedding_maskfeature", "mask_decoder.iou_prediction_head"):
        assert grad_norm(model, prefix) > 0, prefix
    assert grad_norm(model, "prompt_encoder.") == 0 and grad_norm(model, "mask_decoder.transformer") == 0

    # After one step the CNN features change the logits, both through E' and through msf ...
    clean = decode_with_features(model, x, embedding, prompts, 0.0)
    changed = (decode_with_features(model, x, embedding, prompts, 1.0) - clean).abs().max()
    assert changed > 1e-3
    with torch.inference_mode():
        cached = model.encode(x, embedding)
        bumped = dict(cached, msf=cached["msf"] + torch.randn(cached["msf"].shape, generator=torch.Generator()
                                                              .manual_seed(2)))
        assert (model.decode(bumped, **prompts)[0] - model.decode(cached, **prompts)[0]).abs().max() > 1e-3
    # ... and with the fusion zeroed again they do not, and the output is litemedsam_clicks' once more.
    with torch.no_grad():
        for layer in (model.hq_decoder.hf_mlp.layers[-1], *(a.reshaper[-1] for a in model.adapters_in)):
            layer.weight.zero_()
            layer.bias.zero_()
    clean = decode_with_features(model, x, embedding, prompts, 0.0)
    assert torch.equal(decode_with_features(model, x, embedding, prompts, 1.0), clean)
    assert torch.equal(clean, decode_with_features(base, x, embedding, prompts, 0.0))


# ---------------------------------------------------------------------------------------------------------------------
# Shapes, batching, the fast HQ path
# ---------------------------------------------------------------------------------------------------------------------
def test_encode_decode_shapes_and_batching(setup):
    _, base, x, embedding, mapping = setup
    torch.manual_seed(3)
    model = copy.deepcopy(base)
    with torch.no_grad():  # non-zero fusion, so the checks below see the HQ path
        torch.nn.init.normal_(model.hq_decoder.hf_mlp.layers[-1].weight, std=0.05)
        for a in model.adapters_in:
            torch.nn.init.normal_(a.reshaper[-1].weight, std=0.01)
    boxes = torch.tensor([[40.0, 90, 130, 170], [150, 100, 200, 140]])
    with torch.inference_mode():
        full = model.encode(x)  # TinyViT inside
        cached = model.encode(x, embedding)
        assert {k: tuple(v.shape) for k, v in cached.items()} == {"image_embedding": (1, 256, 64, 64),
                                                                  "msf": (1, 32, 128, 128)}
        assert all(torch.allclose(full[k], cached[k], atol=1e-5) for k in cached)
        logits, iou = model.decode(cached, boxes=boxes)
        assert logits.shape == (2, 1, 256, 256) and iou.shape == (2, 1)
        side = model.image_side_cache(cached)
        for i in range(2):  # B prompts on one slice = each prompt alone, with or without the side cache
            one, one_iou = model.decode(cached, boxes=boxes[i : i + 1], side_cache=side)
            assert torch.allclose(one, logits[i : i + 1], atol=1e-4) and torch.allclose(one_iou, iou[i : i + 1],
                                                                                        atol=1e-5)
        two = {k: v.expand(2, -1, -1, -1) for k, v in cached.items()}  # prompt i on slice i
        per_image, _ = model.decode(two, boxes=boxes)
        assert torch.allclose(per_image, logits, atol=1e-4)
        with pytest.raises(InputError, match="image embedding must be"):
            model.decode({"image_embedding": embedding[:, :, :32], "msf": cached["msf"]}, boxes=boxes)
        with pytest.raises(InputError):
            model.decode({"image_embedding": embedding, "msf": cached["msf"][:, :, :64, :64]}, boxes=boxes)
        with pytest.raises(InputError, match="model input"):
            model.encode(x[:, :, :128])


def test_fast_hq_path_equals_the_paper_form():
    torch.manual_seed(4)
    model = build_samunet_tinyvit()
    torch.nn.init.normal_(model.hq_decoder.hf_mlp.layers[-1].weight, std=0.1)
    keys = torch.randn(2, 64 * 64, 256)
    with torch.no_grad():
        _, up1 = fast_decoder.upscale_and_project(model.mask_decoder.output_upscaling, keys, torch.randn(2, 1, 32),
                                                  (64, 64), with_first_step=True)
        up1_map = model.mask_decoder.output_upscaling[:3](keys.transpose(1, 2).reshape(2, 256, 64, 64))
        msf, med = torch.randn(1, 32, 128, 128), torch.randn(2, 256)
        fast = _hq_logits(model.hq_decoder, up1, msf, med, (64, 64))
        reference = hq_logits_reference(model.hq_decoder, up1_map, msf, med)
    assert fast.shape == (2, 1, 128, 128) and reference.abs().max() > 1
    assert torch.allclose(fast, reference, atol=1e-4, rtol=1e-5)  # measured max |diff| ~1.5e-5 on |x| ~ 40


# ---------------------------------------------------------------------------------------------------------------------
# Cost (printed, loosely bounded: the 2-core machine is shared)
# ---------------------------------------------------------------------------------------------------------------------
