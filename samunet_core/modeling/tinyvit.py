"""TinyViT image encoder in the LiteMedSAM configuration (256 px input, 256x64x64 embedding).

Parameter and buffer names equal the `image_encoder.*` keys of the LiteMedSAM checkpoint, so it loads strictly.
Architecture facts (from the official LiteMedSAM `tiny_vit_sam.py`): the stem is two 1x1 conv+BN layers (no
downsampling), stage 0 is MBConv blocks at full 256x256 resolution, stages 1-3 are windowed attention blocks with a
learned per-head bias over |dy|,|dx| offsets, a depthwise 3x3 conv between attention and MLP, and patch merging that
halves the grid except before the last stage (the 320-channel merge keeps stride 1). Output grid is 64x64.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from samunet_core.modeling.sam_parts import sam_modeling


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability `p` in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def _residual_drop(p: float) -> nn.Module:
    return DropPath(p) if p > 0.0 else nn.Identity()


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d; children named `c` and `bn` as in the checkpoint."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, pad: int = 0, groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_ch, out_ch, kernel, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(out_ch)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)


class Stem(nn.Module):
    """Bx3xHxW -> BxCxHxW: 1x1 ConvBN (3 -> C/2), GELU, 1x1 ConvBN (C/2 -> C). Keys `seq.0.*`, `seq.2.*`."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_ch, out_ch // 2), nn.GELU(), ConvBN(out_ch // 2, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block, BxCxHxW -> BxCxHxW: expand 1x1, depthwise 3x3, project 1x1, add, GELU."""

    def __init__(self, ch: int, expand_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(ch * expand_ratio)
        self.conv1 = ConvBN(ch, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, kernel=3, pad=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, ch, bn_weight_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path = _residual_drop(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        y = self.drop_path(self.conv3(y))
        return self.act3(x + y)


class PatchMerging(nn.Module):
    """BxCxHxW (or BxHWxC tokens) -> Bx(H'W')xC' tokens; stride 2 unless `stride` says otherwise."""

    def __init__(self, grid: tuple[int, int], in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.grid = grid
        self.act = nn.GELU()
        self.conv1 = ConvBN(in_ch, out_ch)
        self.conv2 = ConvBN(out_ch, out_ch, kernel=3, stride=stride, pad=1, groups=out_ch)
        self.conv3 = ConvBN(out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.grid
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks at full resolution, then patch merging to tokens."""

    def __init__(
        self, ch: int, grid: tuple[int, int], depth: int, expand_ratio: float, drop_paths: Sequence[float],
        out_ch: int, merge_stride: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(ch, expand_ratio, drop_paths[i]) for i in range(depth))
        self.downsample = PatchMerging(grid, ch, out_ch, merge_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, BxNxC -> BxNxC, with a learned bias per head and |offset|.

    `attention_biases` is (heads, number of distinct (|dy|, |dx|) offsets); the offset index table is a
    non-persistent buffer (not in the checkpoint). Offsets are numbered in first-seen order over the row-major
    product of window positions, which is how the checkpoint's bias columns are ordered.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.value_dim = key_dim  # attention ratio 1
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.value_dim))
        self.proj = nn.Linear(num_heads * self.value_dim, dim)

        positions = list(itertools.product(range(window), range(window)))
        offset_ids: dict[tuple[int, int], int] = {}
        table = []
        for p in positions:
            for q in positions:
                offset = (abs(p[0] - q[0]), abs(p[1] - q[1]))
                table.append(offset_ids.setdefault(offset, len(offset_ids)))
        n = len(positions)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offset_ids)))
        self.register_buffer("attention_bias_idxs", torch.tensor(table, dtype=torch.long).view(n, n), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        bias = self.attention_biases[:, self.attention_bias_idxs]
        attn = ((q @ k.transpose(-2, -1)) * self.scale + bias).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.value_dim)
        return self.proj(out)


class TokenMlp(nn.Module):
    """Pre-norm MLP, BxNxC -> BxNxC: LayerNorm, Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """BxHWxC -> BxHWxC: windowed attention (zero-padded to whole windows), depthwise conv, MLP."""

    def __init__(
        self, dim: int, grid: tuple[int, int], num_heads: int, window: int, mlp_ratio: float, drop_path: float,
        local_conv_size: int,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.window = window
        self.attn = WindowAttention(dim, dim // num_heads, num_heads, window)
        self.mlp = TokenMlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, kernel=local_conv_size, pad=local_conv_size // 2, groups=dim)
        self.drop_path = _residual_drop(drop_path)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        b, n, c = x.shape
        ws = self.window
        if h == ws and w == ws:
            return self.attn(x)
        x = x.view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        windows = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        windows = self.attn(windows)
        x = windows.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            x = x[:, :h, :w].contiguous()
        return x.view(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"TinyViT block expects {h}x{w}={h * w} tokens, got {n}")
        x = x + self.drop_path(self._windowed_attention(x))
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.drop_path(self.mlp(x))


class AttentionStage(nn.Module):
    """Stages 1-3: TinyViT blocks on a token grid, optionally followed by patch merging."""

    def __init__(
        self, dim: int, grid: tuple[int, int], depth: int, num_heads: int, window: int, mlp_ratio: float,
        drop_paths: Sequence[float], local_conv_size: int, out_ch: int | None, merge_stride: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, grid, num_heads, window, mlp_ratio, drop_paths[i], local_conv_size) for i in range(depth)
        )
        self.downsample = PatchMerging(grid, dim, out_ch, merge_stride) if out_ch is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """LiteMedSAM image encoder: Bx3x256x256 normalised image -> Bx256x64x64 embedding."""

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        drop_path_rate: float = 0.0,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = Stem(in_chans, embed_dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        # Grid per stage: stage i works at img_size / 2**i, except the last one, which stays at the previous
        # stage's grid because the merge into the widest stage keeps stride 1.
        n_stages = len(depths)
        grids = [img_size // 2 ** (i - 1 if i == n_stages - 1 else i) for i in range(n_stages)]
        self.layers = nn.ModuleList()
        for i in range(n_stages):
            grid = (grids[i], grids[i])
            drops = rates[sum(depths[:i]) : sum(depths[: i + 1])]
            is_last = i == n_stages - 1
            out_ch = None if is_last else embed_dims[i + 1]
            merge_stride = 1 if i + 1 == n_stages - 1 else 2
            if i == 0:
                self.layers.append(
                    ConvStage(embed_dims[0], grid, depths[0], mbconv_expand_ratio, drops, out_ch, merge_stride)
                )
            else:
                self.layers.append(
                    AttentionStage(
                        embed_dims[i], grid, depths[i], num_heads[i], window_sizes[i], mlp_ratio, drops,
                        local_conv_size, out_ch, merge_stride,
                    )
                )
        self.out_grid = grids[-1]
        self.apply(_init_weights)
        layer_norm_2d = sam_modeling().common.LayerNorm2d
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            layer_norm_2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            layer_norm_2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bx3xSxS (S = img_size) -> Bx256x(S/4)x(S/4)."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(f"TinyViT expects Bx3x{self.img_size}x{self.img_size}, got {tuple(x.shape)}")
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.out_grid, self.out_grid, c).permute(0, 3, 1, 2)
        return self.neck(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
