"""SAM-UNet initialised from an original SAM ViT-B checkpoint (samunet_core.train.sam_vit_b), end to end.

The stand-in for Meta's sam_vit_b_01ec64.pth is a randomly initialised original SAM ViT-B (1024 px) built from the
installed segment-anything 1.0 classes (`build_original_sam_vit_b`, the architecture of
`sam_model_registry["vit_b"]`, which itself cannot be imported here: segment_anything/__init__ needs torchvision).
SAM zero-initialises pos_embed and the rel_pos tables; they are filled with N(0, 1) so the interpolation is visible.
Its fp32 state dict is saved as a .pth (375 MB) in a temporary folder.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SAM_MED2D, random_sam_vit_b_state
from PIL import Image

from samunet_core.errors import InputError
from samunet_core.model_input import SAMUNetInput
from samunet_core.train.sam_vit_b import (
    check_sam_vit_b,
    load_samunet_from_sam_vit_b,
    read_sam_vit_b,
    samunet_init_from_sam_vit_b,
    samunet_loss,
)

# Measured on the authors' model (Hhankyangg/sam-unet a0b84c5); the same constants as test_modeling.py.
AUTHORS_LAYOUT_SHA256 = {
    "resnet34": "956fbee389c1be5c05773c9d26fa2fa22126881e9e4f137447342dcbbba172c0",
    "resnet50": "6df69d99e272f98a41c83b78066815d855831dc6aacf6ebadde2e467a99e44fb",
}
AUTHORS_COUNTS = {"resnet34": (559, 116_019_884, 29_347_244), "resnet50": (661, 138_428_204, 51_755_564)}
VIT = "image_encoder.sam_img_encoder."
GLOBAL_BLOCKS = (2, 5, 8, 11)


def _layout_sha256(sd: dict[str, torch.Tensor]) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(sd.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _counts(model) -> tuple[int, int, int]:
    params = list(model.parameters())
    return (len(model.state_dict()), sum(p.numel() for p in params),
            sum(p.numel() for p in params if p.requires_grad))


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(path of the saved stand-in SAM ViT-B checkpoint, its state dict)."""
    state = random_sam_vit_b_state()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_standin.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def res34_loaded(stand_in):
    torch.manual_seed(0)
    return load_samunet_from_sam_vit_b(stand_in[0], "res34")


def test_res34_has_the_authors_layout_and_loads_strictly(res34_loaded):
    model, report = res34_loaded
    assert _counts(model) == AUTHORS_COUNTS["resnet34"]
    assert _layout_sha256(model.state_dict()) == AUTHORS_LAYOUT_SHA256["resnet34"]
    assert all(not p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("image_encoder."))
    assert report.backbone == "resnet34"
    assert (len(report.from_sam), len(report.fresh), len(report.dropped)) == (282, 277, 32)
    assert set(report.from_sam) | set(report.fresh) == set(model.state_dict())
    assert len(report.sha256) == 64
    summary = report.as_dict()
    assert summary["dropped_modules"] == ["mask_decoder.iou_prediction_head", "mask_decoder.iou_token",
                                          "mask_decoder.mask_tokens", "mask_decoder.output_hypernetworks_mlps"]
    assert summary["fresh_modules"] == ["adapters_bridge", "adapters_in", "embedding_encoder",
                                        "mask_decoder.embedding_maskfeature", "mask_decoder.hf_mlp",
                                        "mask_decoder.med_token", "resnet"]
    assert sorted(summary["interpolated"]) == sorted(
        [VIT + "pos_embed"] + [f"{VIT}blocks.{b}.attn.rel_pos_{a}" for b in GLOBAL_BLOCKS for a in "hw"])
    dropped_words = ("mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head", "iou_token")
    assert not any(word in key for key in model.state_dict() for word in dropped_words)
    assert all(any(word in key for word in dropped_words) for key in report.dropped)


def test_interpolated_and_copied_tensors(res34_loaded, stand_in):
    model, _ = res34_loaded
    sam, got = stand_in[1], model.state_dict()
    pos = sam["image_encoder.pos_embed"]
    assert pos.shape == (1, 64, 64, 768)
    expected = F.interpolate(pos.permute(0, 3, 1, 2), size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(got[VIT + "pos_embed"], expected.permute(0, 2, 3, 1))
    for block in GLOBAL_BLOCKS:
        for axis in "hw":
            table = sam[f"image_encoder.blocks.{block}.attn.rel_pos_{axis}"]
            assert table.shape == (127, 64)
            expected = F.interpolate(table[None, None], size=(31, 64), mode="bilinear", align_corners=False)[0, 0]
            assert torch.equal(got[f"{VIT}blocks.{block}.attn.rel_pos_{axis}"], expected)
    # windowed blocks, the prompt encoder and the kept mask-decoder parts: bit for bit
    for sam_key, ours in [
        ("image_encoder.blocks.0.attn.rel_pos_h", VIT + "blocks.0.attn.rel_pos_h"),
        ("image_encoder.blocks.7.attn.rel_pos_w", VIT + "blocks.7.attn.rel_pos_w"),
        ("image_encoder.blocks.4.attn.qkv.weight", VIT + "blocks.4.attn.qkv.weight"),
        ("image_encoder.neck.2.weight", VIT + "neck.2.weight"),
        ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
         "prompt_encoder.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
        ("prompt_encoder.point_embeddings.2.weight", "prompt_encoder.sam_prompt_encoder.point_embeddings.2.weight"),
        ("mask_decoder.transformer.layers.1.mlp.lin2.weight",
         "mask_decoder.sam_mask_decoder.transformer.layers.1.mlp.lin2.weight"),
        ("mask_decoder.output_upscaling.3.weight", "mask_decoder.sam_mask_decoder.output_upscaling.3.weight"),
    ]:
        assert sam[sam_key].shape == got[ours].shape
        assert torch.equal(sam[sam_key], got[ours]), ours
    # The conversion keeps the passed model's own tensors wherever SAM provides nothing.
    state = samunet_init_from_sam_vit_b(sam, "res34", model=model)
    assert list(state) == list(got) and all(torch.equal(state[k], got[k]) for k in got)


def test_res50_has_the_authors_layout(stand_in):
    model, report = load_samunet_from_sam_vit_b(stand_in[0], "samunet_res50")
    assert _counts(model) == AUTHORS_COUNTS["resnet50"]
    assert _layout_sha256(model.state_dict()) == AUTHORS_LAYOUT_SHA256["resnet50"]
    assert (len(report.from_sam), len(report.fresh)) == (282, 661 - 282)


def test_a_vit_b_already_at_256_passes_through(res34_loaded, stand_in):
    model, _ = res34_loaded
    sam = dict(stand_in[1])
    sam["image_encoder.pos_embed"] = torch.randn(1, 16, 16, 768)
    for block in GLOBAL_BLOCKS:
        for axis in "hw":
            sam[f"image_encoder.blocks.{block}.attn.rel_pos_{axis}"] = torch.randn(31, 64)
    state = samunet_init_from_sam_vit_b(sam, "res34", model=model)
    assert torch.equal(state[VIT + "pos_embed"], sam["image_encoder.pos_embed"])
    assert torch.equal(state[VIT + "blocks.5.attn.rel_pos_h"], sam["image_encoder.blocks.5.attn.rel_pos_h"])


def _save(obj, path):
    torch.save(obj, path)
    return path


def test_bad_inputs_name_the_fix(tmp_path, stand_in):
    with pytest.raises(InputError, match=r"no SAM ViT-B checkpoint at .*sam_vit_b_01ec64\.pth.*--sam-vit-b"):
        read_sam_vit_b(tmp_path / "missing.pth")
    with pytest.raises(InputError, match="folder"):
        read_sam_vit_b(tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(InputError, match="not a plain weights file.*sam_vit_b_01ec64"):
        read_sam_vit_b(tmp_path / "junk.pth")

    def vit(width: int, depth: int) -> dict[str, torch.Tensor]:
        return {"image_encoder.pos_embed": torch.zeros(1, 64, 64, width),
                **{f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(width) for i in range(depth)}}

    for width, depth, name in ((1024, 24, "ViT-L"), (1280, 32, "ViT-H")):
        path = _save(vit(width, depth), tmp_path / f"{name}.pth")
        with pytest.raises(InputError, match=f"{name}.*not ViT-B.*sam_vit_b_01ec64"):
            read_sam_vit_b(path)
    litemedsam_like = {"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(64, 3, 3, 3),
                       "image_encoder.layers.0.blocks.0.conv1.c.weight": torch.zeros(256, 64, 1, 1),
                       "mask_decoder.iou_token.weight": torch.zeros(1, 256)}
    with pytest.raises(InputError, match="LiteMedSAM.*not SAM ViT-B"):
        read_sam_vit_b(_save(litemedsam_like, tmp_path / "lite_medsam.pth"))
    samunet_like = {"model": {VIT + "pos_embed": torch.zeros(1, 16, 16, 768),
                              "mask_decoder.med_token.weight": torch.zeros(1, 256)}}
    with pytest.raises(InputError, match="SAM-UNet checkpoint.*--checkpoint"):
        read_sam_vit_b(_save(samunet_like, tmp_path / "epoch12_sam_unet.pth"))
    with pytest.raises(InputError, match="not a SAM checkpoint.*image_encoder.pos_embed"):
        check_sam_vit_b({"encoder.weight": torch.zeros(3)}, "x.pth")
    # a ViT-B with an extra module and a reshaped tensor (e.g. a fine-tune with adapters)
    sam = dict(stand_in[1])
    sam["image_encoder.blocks.0.adapter.weight"] = torch.zeros(4)
    sam["image_encoder.neck.0.weight"] = torch.zeros(128, 768, 1, 1)
    del sam["mask_decoder.mask_tokens.weight"]
    with pytest.raises(InputError, match=r"1 missing, 1 unexpected, 1 wrong-shape(.|\n)*adapter.weight"):
        samunet_init_from_sam_vit_b(sam, "res34")
    with pytest.raises(InputError, match="res34 or res50"):
        samunet_init_from_sam_vit_b(stand_in[1], "res18")


def test_one_image_training_lowers_the_loss_and_keeps_the_vit(stand_in):
    """3 Adam steps (lr 1e-4, the authors' recipe) of res34 on one CT slice with its liver box."""
    torch.manual_seed(0)
    model, _ = load_samunet_from_sam_vit_b(stand_in[0], "res34")
    image = np.array(Image.open(SAM_MED2D / "images" / "amos_0004_75.png"))
    mask = np.array(Image.open(SAM_MED2D / "masks" / "amos_0004_75_liver_000.png")) > 0
    array, mapping = SAMUNetInput.image_to_array(image)
    assert mapping.input_size == (256, 256)
    x = torch.from_numpy(array).permute(2, 0, 1)[None]
    target = torch.from_numpy(np.array(Image.fromarray(mask).resize((256, 256), Image.NEAREST)))[None]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = torch.from_numpy(SAMUNetInput.boxes_to_grid(np.array([[cols[0], rows[0], cols[-1], rows[-1]]]), mapping))
    vit_before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-4)
    model.train()
    losses = []
    for _ in range(3):
        loss = samunet_loss(model(x, box), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        losses.append(float(samunet_loss(model(x, box), target)))
    # (measured: 19.79, 19.29, 18.24 -> 15.40; other seeds fall as fast)
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < 0.9 * losses[0], losses
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(torch.equal(v, vit_before[k]) for k, v in model.image_encoder.state_dict().items())
    assert model.mask_decoder.med_token.weight.grad is not None
