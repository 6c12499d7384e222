"""SAM-UNet (Yang et al., arXiv 2408.09886): a frozen SAM ViT-B at 256 px fused with a trainable ResNet, U-Net style.

Built from `segment_anything.modeling` classes plus our ResNet and fusion modules, with state-dict keys and shapes
identical to the authors' checkpoints (`{'model': state_dict, ...}`), so those load strictly. See
shared/reference/samunet.md for the architecture facts this follows.

Forward:
- encode: tokens = patch_embed + pos_embed; for stage i: 2 windowed blocks, add adapters_in[i](f_i), a global block;
  stages 0..2 also feed adapters_bridge[2-i] (-> 32x64x64). Neck -> image embedding 256x16x16.
  msf = embedding_encoder(embedding) + bridge0 + bridge1 + bridge2 (32x64x64).
- decode: [med_token, sparse prompts] through SAM's two-way transformer; output_upscaling -> 32x64x64;
  embedding_maskfeature(...) + msf; hf_mlp(med token) dot that -> logits 1x64x64. No IoU head, no multimask.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from samunet_core.errors import CheckpointError
from samunet_core.modeling.prompts import check_prompts, expand_to_prompts, prompt_count
from samunet_core.modeling.resnet import ResNetFeatures
from samunet_core.modeling.sam_parts import sam_modeling

# Preprocessing constants for the predictor (0..255 RGB, SAM's ImageNet statistics); not model buffers.
PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
INPUT_SIZE = 256
PATCH_SIZE = 16
EMBEDDING_SIZE = INPUT_SIZE // PATCH_SIZE  # 16
LOGITS_SIZE = 4 * EMBEDDING_SIZE  # 64
MSF_CHANNELS = 32
VIT_EMBED_DIM = 768
VIT_DEPTH = 12
VIT_GLOBAL_BLOCKS = (2, 5, 8, 11)
VIT_WINDOW = 14
PROMPT_DIM = 256
BACKBONES = ("resnet34", "resnet50")


def _layer_norm_2d() -> type[nn.Module]:
    return sam_modeling().common.LayerNorm2d


class Reshaper(nn.Module):
    """BxCinxSinxSin -> BxCoutxSoutxSout; `reshaper` is the ModuleList the authors' keys index.

    Same size: one 1x1 conv. Smaller output (Sin = Sout * 2^n): n x [Conv3x3 s2 (c -> 2c), LayerNorm2d, GELU].
    Larger output: n x [ConvTranspose2x2 s2 (c -> c/2), LayerNorm2d, GELU]. Then a 1x1 conv to Cout.
    Convs are Kaiming-normal (fan_out, relu) with zero bias.
    """

    def __init__(self, size_in: int, channel_in: int, size_out: int, channel_out: int) -> None:
        super().__init__()
        layer_norm_2d = _layer_norm_2d()
        layers: list[nn.Module] = []
        ch = channel_in
        if size_in != size_out:
            ratio = max(size_in, size_out) / min(size_in, size_out)
            n = math.log2(ratio)
            if not ratio.is_integer() or not n.is_integer():
                raise ValueError(f"sizes must differ by a power of two, got {size_in} and {size_out}")
            for _ in range(int(n)):
                if size_in > size_out:
                    layers += [nn.Conv2d(ch, ch * 2, kernel_size=3, stride=2, padding=1), layer_norm_2d(ch * 2)]
                    ch *= 2
                else:
                    layers += [nn.ConvTranspose2d(ch, ch // 2, kernel_size=2, stride=2), layer_norm_2d(ch // 2)]
                    ch //= 2
                layers.append(nn.GELU())
        layers.append(nn.Conv2d(ch, channel_out, kernel_size=1))
        self.reshaper = nn.ModuleList(layers)
        for m in self.reshaper:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.reshaper:
            x = layer(x)
        return x


def _upsample_x4(in_ch: int, mid_ch: int, out_ch: int) -> nn.Sequential:
    """BxCinxHxW -> BxCoutx4Hx4W: ConvT 2x2 s2, LayerNorm2d, GELU, ConvT 2x2 s2 (keys .0, .1, .3)."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_ch, mid_ch, kernel_size=2, stride=2),
        _layer_norm_2d()(mid_ch),
        nn.GELU(),
        nn.ConvTranspose2d(mid_ch, out_ch, kernel_size=2, stride=2),
    )


class SamMaskDecoderTrunk(nn.Module):
    """The parts of SAM's MaskDecoder that SAM-UNet keeps: `transformer` and `output_upscaling` (256 -> 32 ch, x4)."""

    def __init__(self, transformer_dim: int = PROMPT_DIM) -> None:
        super().__init__()
        sam = sam_modeling()
        self.transformer = sam.TwoWayTransformer(depth=2, embedding_dim=transformer_dim, mlp_dim=2048, num_heads=8)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            sam.common.LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )


class SamViTBranch(nn.Module):
    """Holds the SAM ViT-B as `sam_img_encoder` (key prefix `image_encoder.sam_img_encoder.*`)."""

    def __init__(self) -> None:
        super().__init__()
        self.sam_img_encoder = sam_modeling().ImageEncoderViT(
            img_size=INPUT_SIZE,
            patch_size=PATCH_SIZE,
            embed_dim=VIT_EMBED_DIM,
            depth=VIT_DEPTH,
            num_heads=12,
            mlp_ratio=4,
            out_chans=PROMPT_DIM,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=VIT_WINDOW,
            global_attn_indexes=VIT_GLOBAL_BLOCKS,
        )


class SamPromptBranch(nn.Module):
    """Holds SAM's PromptEncoder as `sam_prompt_encoder` (16x16 embedding grid, 256 input, 64x64 mask input)."""

    def __init__(self) -> None:
        super().__init__()
        self.sam_prompt_encoder = sam_modeling().PromptEncoder(
            embed_dim=PROMPT_DIM,
            image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
            input_image_size=(INPUT_SIZE, INPUT_SIZE),
            mask_in_chans=16,
        )


class MedMaskDecoder(nn.Module):
    """HQ-SAM-style single-output decoder: `sam_mask_decoder`, `med_token`, `hf_mlp`, `embedding_maskfeature`."""

    def __init__(self, transformer_dim: int = PROMPT_DIM) -> None:
        super().__init__()
        sam = sam_modeling()
        self.sam_mask_decoder = SamMaskDecoderTrunk(transformer_dim)
        self.med_token = nn.Embedding(1, transformer_dim)
        self.hf_mlp = sam.mask_decoder.MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(transformer_dim // 8, transformer_dim // 4, 3, 1, 1),
            sam.common.LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.Conv2d(transformer_dim // 4, transformer_dim // 8, 3, 1, 1),
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        msf: torch.Tensor,
    ) -> torch.Tensor:
        """Embeddings 1|Bx256x16x16, PE 1x256x16x16, sparse BxNx256, dense Bx256x16x16, msf 1|Bx32x64x64
        -> logits Bx1x64x64."""
        n = sparse.shape[0]
        tokens = torch.cat([self.med_token.weight.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
        src = expand_to_prompts(image_embeddings, n) + dense
        pos = expand_to_prompts(image_pe, n)
        b, c, h, w = src.shape
        hs, src = self.sam_mask_decoder.transformer(src, pos, tokens)
        upscaled = self.sam_mask_decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        features = self.embedding_maskfeature(upscaled) + expand_to_prompts(msf, n)
        hyper = self.hf_mlp(hs[:, 0, :]).unsqueeze(1)  # Bx1x32
        b, c, h, w = features.shape
        return (hyper @ features.reshape(b, c, h * w)).view(b, 1, h, w)


class SAMUNet(nn.Module):
    """SAM-UNet with a ResNet-34 or ResNet-50 CNN branch; see the module docstring for the data flow."""

    def __init__(self, backbone: str = "resnet50", freeze_vit: bool = True) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown SAM-UNet backbone {backbone!r}; choose one of {BACKBONES}")
        self.backbone = backbone
        self.image_encoder = SamViTBranch()
        self.prompt_encoder = SamPromptBranch()
        self.mask_decoder = MedMaskDecoder()
        self.resnet = ResNetFeatures(backbone)
        feature_sizes = (INPUT_SIZE // 4, INPUT_SIZE // 8, INPUT_SIZE // 16, INPUT_SIZE // 32)
        self.adapters_in = nn.ModuleList(
            Reshaper(size, ch, EMBEDDING_SIZE, VIT_EMBED_DIM)
            for size, ch in zip(feature_sizes, self.resnet.channel_list, strict=True)
        )
        self.adapters_bridge = nn.ModuleList(
            _upsample_x4(VIT_EMBED_DIM, PROMPT_DIM, MSF_CHANNELS) for _ in range(len(VIT_GLOBAL_BLOCKS) - 1)
        )
        self.embedding_encoder = _upsample_x4(PROMPT_DIM, PROMPT_DIM // 4, MSF_CHANNELS)
        if freeze_vit:
            self.image_encoder.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bx3x256x256 normalised ((RGB - PIXEL_MEAN) / PIXEL_STD, zero-padded) ->
        (image_embeddings Bx256x16x16, msf Bx32x64x64)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"SAM-UNet expects Bx3x{INPUT_SIZE}x{INPUT_SIZE}, got {tuple(x.shape)}")
        vit = self.image_encoder.sam_img_encoder
        features = self.resnet(x)
        tokens = vit.patch_embed(x)  # BxHxWxC
        if vit.pos_embed is not None:
            tokens = tokens + vit.pos_embed
        bridges: list[torch.Tensor | None] = [None] * len(self.adapters_bridge)
        for i, global_block in enumerate(VIT_GLOBAL_BLOCKS):
            for j in range(global_block - 2, global_block):
                tokens = vit.blocks[j](tokens)
            tokens = tokens + self.adapters_in[i](features[i]).permute(0, 2, 3, 1)
            tokens = vit.blocks[global_block](tokens)
            if i < len(bridges):
                # U-Net order: the shallowest global block feeds the last bridge.
                k = len(bridges) - 1 - i
                bridges[k] = self.adapters_bridge[k](tokens.permute(0, 3, 1, 2))
        image_embeddings = vit.neck(tokens.permute(0, 3, 1, 2))
        msf = self.embedding_encoder(image_embeddings)
        for bridge in bridges:
            msf = msf + bridge
        return image_embeddings, msf

    def decode(
        self,
        image_embeddings: torch.Tensor,
        msf: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompts against encoded images -> logits Bx1x64x64 (threshold 0.0).

        image_embeddings 1x256x16x16 and msf 1x32x64x64 (shared by all B prompts) or Bx... (prompt i, image i).
        point_coords BxNx2 (x, y) and boxes Bx4 (x0, y0, x1, y1) in the 256 input frame; point_labels BxN
        (1 positive, 0 negative, -1 padding); mask_input Bx1x64x64 logits of a previous decode.
        """
        n = prompt_count(point_coords, point_labels, boxes, mask_input)
        check_prompts(image_embeddings, n, EMBEDDING_SIZE, PROMPT_DIM, point_coords, point_labels, boxes, mask_input,
                      LOGITS_SIZE)
        check_prompts(msf, n, LOGITS_SIZE, MSF_CHANNELS, None, None, None, None, LOGITS_SIZE)
        prompt_encoder = self.prompt_encoder.sam_prompt_encoder
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.mask_decoder(image_embeddings, prompt_encoder.get_dense_pe(), sparse, dense, msf)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Training convenience: Bx3x256x256 normalised images, Bx4 boxes (one per image) -> logits Bx1x64x64."""
        image_embeddings, msf = self.encode(x)
        return self.decode(image_embeddings, msf, boxes=boxes)


def build_samunet(backbone: str = "resnet50", freeze_vit: bool = True) -> SAMUNet:
    """A SAM-UNet ("resnet34" | "resnet50") with fresh weights, ViT frozen (requires_grad False), in eval mode."""
    return SAMUNet(backbone, freeze_vit=freeze_vit).eval()


# --- initialisation from an original SAM ViT-B (1024 px) checkpoint --------------------------------------------------

_SAM_PREFIX_MAP = (
    ("image_encoder.", "image_encoder.sam_img_encoder."),
    ("prompt_encoder.", "prompt_encoder.sam_prompt_encoder."),
    ("mask_decoder.transformer.", "mask_decoder.sam_mask_decoder.transformer."),
    ("mask_decoder.output_upscaling.", "mask_decoder.sam_mask_decoder.output_upscaling."),
)
# SAM keys SAM-UNet has no place for (its decoder keeps neither SAM's output tokens nor its heads).
_SAM_DROPPED_PREFIXES = (
    "mask_decoder.iou_token.",
    "mask_decoder.mask_tokens.",
    "mask_decoder.output_hypernetworks_mlps.",
    "mask_decoder.iou_prediction_head.",
    "pixel_mean",
    "pixel_std",
)


def samunet_state_dict_from_sam_vit_b(sam_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original SAM ViT-B state dict (1024 px, e.g. sam_vit_b_01ec64.pth) -> SAM-UNet keys it provides.

    pos_embed 1x64x64x768 -> 1x16x16x768 and the global blocks' rel_pos (127x64) -> (31x64) by bilinear
    interpolation (align_corners False), as the authors' build code does; windowed rel_pos (27x64) unchanged.
    SAM's output tokens, hypernetwork MLPs and IoU head are dropped. The ResNet, adapters, med_token, hf_mlp,
    embedding_maskfeature and embedding_encoder are not provided (they keep their initialisation).
    A ViT-B already at 256 px passes through unchanged.
    """
    pos = sam_sd.get("image_encoder.pos_embed")
    if pos is None or pos.ndim != 4 or pos.shape[0] != 1 or pos.shape[1] != pos.shape[2]:
        raise CheckpointError(
            "not a SAM image-encoder checkpoint: 'image_encoder.pos_embed' (1xGxGx768) is missing or malformed"
        )
    if pos.shape[3] != VIT_EMBED_DIM or f"image_encoder.blocks.{VIT_DEPTH - 1}.attn.qkv.weight" not in sam_sd or (
        f"image_encoder.blocks.{VIT_DEPTH}.attn.qkv.weight" in sam_sd
    ):
        raise CheckpointError(
            f"the SAM checkpoint is not ViT-B (embedding {pos.shape[3]}, expected {VIT_EMBED_DIM} with "
            f"{VIT_DEPTH} blocks); SAM-UNet is built on ViT-B (sam_vit_b_01ec64.pth)"
        )
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sam_sd.items():
        if key.startswith(_SAM_DROPPED_PREFIXES):
            continue
        target = next((new + key[len(old) :] for old, new in _SAM_PREFIX_MAP if key.startswith(old)), None)
        if target is None:
            unknown.append(key)
            continue
        out[target] = _resize_vit_tensor(key, value)
    if unknown:
        raise CheckpointError(f"unexpected keys in the SAM checkpoint: {unknown[:10]}")
    return out


def _resize_vit_tensor(key: str, value: torch.Tensor) -> torch.Tensor:
    if key == "image_encoder.pos_embed" and value.shape[1] != EMBEDDING_SIZE:
        grid = value.permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, (EMBEDDING_SIZE, EMBEDDING_SIZE), mode="bilinear", align_corners=False)
        return grid.permute(0, 2, 3, 1).to(value.dtype).contiguous()
    global_rel_pos = {f"image_encoder.blocks.{b}.attn.rel_pos_{a}" for b in VIT_GLOBAL_BLOCKS for a in "hw"}
    if key in global_rel_pos and value.shape[0] != 2 * EMBEDDING_SIZE - 1:
        table = value[None, None].float()
        table = F.interpolate(table, (2 * EMBEDDING_SIZE - 1, value.shape[1]), mode="bilinear", align_corners=False)
        return table[0, 0].to(value.dtype).contiguous()
    return value
