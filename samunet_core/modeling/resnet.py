"""ResNet-34 / ResNet-50 feature extractor for SAM-UNet's CNN branch (classifier head dropped).

Blocks and their parameter names follow torchvision's ResNet (BasicBlock / Bottleneck v1.5 with the stride on the
3x3 conv, `downsample.0` conv + `downsample.1` BN). The stages carry SAM-UNet's names: `stage0` = Sequential(conv1,
bn1, relu, maxpool) so its keys are `stage0.0.*` / `stage0.1.*`, and `stage1..4` = torchvision's `layer1..4`.
`resnet_state_dict_from_torchvision` renames an ImageNet torchvision state dict into this layout.
"""

from __future__ import annotations

import torch
from torch import nn

RESNET_SPECS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; BxCinxHxW -> Bx(planes)x(H/stride)x(W/stride)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, with a residual; BxCinxHxW -> Bx(4 planes)x(H/stride)x(W/stride)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetFeatures(nn.Module):
    """Bx3xSxS -> [f1, f2, f3, f4] at S/4, S/8, S/16, S/32 with `channel_list` channels (64..512 or 256..2048)."""

    def __init__(self, arch: str = "resnet50") -> None:
        super().__init__()
        if arch not in RESNET_SPECS:
            raise ValueError(f"unknown ResNet {arch!r}; choose one of {sorted(RESNET_SPECS)}")
        kind, depths = RESNET_SPECS[arch]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        self.arch = arch
        self.stage0 = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        in_ch = 64
        stages = []
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            stride = 1 if i == 0 else 2
            stage, in_ch = _make_stage(block, in_ch, planes, depth, stride)
            stages.append(stage)
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.channel_list = [p * block.expansion for p in (64, 128, 256, 512)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.stage1(self.stage0(x))
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        f4 = self.stage4(f3)
        return [f1, f2, f3, f4]


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck], in_ch: int, planes: int, depth: int, stride: int
) -> tuple[nn.Sequential, int]:
    out_ch = planes * block.expansion
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
    blocks: list[nn.Module] = [block(in_ch, planes, stride, downsample)]
    blocks += [block(out_ch, planes) for _ in range(1, depth)]
    return nn.Sequential(*blocks), out_ch


def resnet_state_dict_from_torchvision(tv_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet keys (conv1, bn1, layerN, fc) -> our keys (stage0.0, stage0.1, stageN); fc dropped."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in tv_sd.items():
        if key.startswith("fc."):
            continue
        if key.startswith("conv1."):
            renamed["stage0.0." + key[len("conv1.") :]] = value
        elif key.startswith("bn1."):
            renamed["stage0.1." + key[len("bn1.") :]] = value
        elif key.startswith("layer"):
            renamed["stage" + key[len("layer") :]] = value
        else:
            raise KeyError(f"unexpected key in a torchvision ResNet state dict: {key}")
    return renamed
