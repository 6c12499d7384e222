"""A faster evaluation of SAM's mask decoder for repeated prompts on one image (same weights, same math).

SAM's `MaskDecoder.forward` copies the image embedding once per prompt and recomputes every image-side projection
on each call. For interactive clicks on one slice, the first transformer layer's image-side work does not depend on
the prompt when there is no mask input: keys = embedding + no-mask embedding, their positional sum, and three
projections of them. `ImageSideCache` holds those per embedding; `decode` runs the rest with fused attention and
broadcasting instead of copies. Outputs equal SAM's to float rounding (tested against `MaskDecoder.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ImageSideCache:
    """Prompt-independent tensors of one image embedding (batch 1, tokens-last layout N = h*w)."""

    keys: torch.Tensor  # 1xNxC: embedding + no-mask dense embedding
    key_pe: torch.Tensor  # 1xNxC: dense positional encoding
    layer0_t2i_k: torch.Tensor  # 1xheadsxNxd: layer 0 token->image key projection of keys + pe
    layer0_t2i_v: torch.Tensor  # 1xheadsxNxd: layer 0 token->image value projection of keys
    layer0_i2t_q: torch.Tensor  # 1xheadsxNxd: layer 0 image->token query projection of keys + pe
    hw: tuple[int, int]


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM Attention with projected, head-split q/k/v (any broadcastable batch) -> out_proj(result)."""
    out = F.scaled_dot_product_attention(q, k, v)
    return attn.out_proj(_merge(out))


def _project(linear: nn.Linear, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return _heads(linear(x), num_heads)


def build_image_side_cache(decoder: nn.Module, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                           no_mask_dense: torch.Tensor) -> ImageSideCache:
    """1xCxhxw embedding, 1xCxhxw positional encoding, 1xCxhxw no-mask dense embedding -> ImageSideCache."""
    _, _, h, w = image_embedding.shape
    keys = (image_embedding + no_mask_dense).flatten(2).transpose(1, 2).contiguous()
    key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    layer0 = decoder.transformer.layers[0]
    heads = layer0.cross_attn_token_to_image.num_heads
    k_in = keys + key_pe
    return ImageSideCache(
        keys=keys,
        key_pe=key_pe,
        layer0_t2i_k=_project(layer0.cross_attn_token_to_image.k_proj, k_in, heads),
        layer0_t2i_v=_project(layer0.cross_attn_token_to_image.v_proj, keys, heads),
        layer0_i2t_q=_project(layer0.cross_attn_image_to_token.q_proj, k_in, heads),
        hw=(h, w),
    )


def _observer_attention(attn: nn.Module, med_q_in: torch.Tensor, k_tokens: torch.Tensor, v_tokens: torch.Tensor,
                        med_k_in: torch.Tensor, med_v_in: torch.Tensor) -> torch.Tensor:
    """An observer token's self-attention over [the SAM tokens, itself] (the SAM tokens' projections reused)."""
    heads = attn.num_heads
    k = torch.cat([k_tokens, _project(attn.k_proj, med_k_in, heads)], dim=2)
    v = torch.cat([v_tokens, _project(attn.v_proj, med_v_in, heads)], dim=2)
    return _attend(attn, _project(attn.q_proj, med_q_in, heads), k, v)


def _block(layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
           key_pe: torch.Tensor, first: bool, cache: ImageSideCache | None, med: torch.Tensor | None = None,
           med_pe: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One TwoWayAttentionBlock -> (queries, keys, med). med: an optional Bx1xC observer token (SAM-UNet's med token)
    that attends to the tokens and the image like any token while nothing attends to it, so the SAM outputs are
    exactly those without it."""
    sa, t2i, i2t = layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    if layer.skip_first_layer_pe:
        q_p, k_p, v_p = (_project(p, queries, sa.num_heads) for p in (sa.q_proj, sa.k_proj, sa.v_proj))
        if med is not None:
            med = _observer_attention(sa, med, k_p, v_p, med, med)
        queries = _attend(sa, q_p, k_p, v_p)
    else:
        q = queries + query_pe
        q_p, k_p = _project(sa.q_proj, q, sa.num_heads), _project(sa.k_proj, q, sa.num_heads)
        v_p = _project(sa.v_proj, queries, sa.num_heads)
        if med is not None:
            med = med + _observer_attention(sa, med + med_pe, k_p, v_p, med + med_pe, med)
        queries = queries + _attend(sa, q_p, k_p, v_p)
    queries = layer.norm1(queries)

    q = queries + query_pe
    if first and cache is not None:
        k_proj, v_proj = cache.layer0_t2i_k, cache.layer0_t2i_v
    else:
        k_in = keys + key_pe
        k_proj, v_proj = _project(t2i.k_proj, k_in, t2i.num_heads), _project(t2i.v_proj, keys, t2i.num_heads)
    queries = layer.norm2(queries + _attend(t2i, _project(t2i.q_proj, q, t2i.num_heads), k_proj, v_proj))
    queries = layer.norm3(queries + layer.mlp(queries))
    if med is not None:
        med = layer.norm1(med)
        med = layer.norm2(med + _attend(t2i, _project(t2i.q_proj, med + med_pe, t2i.num_heads), k_proj, v_proj))
        med = layer.norm3(med + layer.mlp(med))

    q = queries + query_pe
    if first and cache is not None:
        image_q = cache.layer0_i2t_q
    else:
        image_q = _project(i2t.q_proj, keys + key_pe, i2t.num_heads)
    attn_out = _attend(i2t, image_q, _project(i2t.k_proj, q, i2t.num_heads),
                       _project(i2t.v_proj, queries, i2t.num_heads))
    keys = layer.norm4(keys + attn_out)
    return queries, keys, med


def _subpixel_weight(conv: nn.ConvTranspose2d) -> torch.Tensor:
    """ConvTranspose2d(C, O, 2, stride 2) weight CxOx2x2 -> Cx(2*2*O), columns ordered (a, b, o)."""
    c, o = conv.weight.shape[:2]
    return conv.weight.permute(0, 2, 3, 1).reshape(c, 4 * o)


def upscale_and_project(upscaling: nn.Sequential, keys: torch.Tensor, hyper_in: torch.Tensor,
                        hw: tuple[int, int], with_first_step: bool = False) -> Any:
    """SAM's output_upscaling followed by the hypernetwork dot product, as per-token matrix products.

    keys: BxNxC image tokens (N = h*w, row-major); hyper_in: BxMx(C/8). Returns BxMx4hx4w mask logits.
    Both transposed convolutions have kernel 2 and stride 2, so every token maps to its own 4x4 output block
    independently: two GEMMs and per-pixel LayerNorm/GELU, and only the final M-channel logits are rearranged
    (SAM's path rearranges a 32-channel 256x256 feature map instead).
    with_first_step: also return the first upscaling step per token, BxNx4xC1 (token (i, j) sub-pixel a*2+b is pixel
    (2i + a, 2j + b) of the 2h x 2w map), as (logits, first).
    """
    up1, norm, act1, up2, act2 = upscaling
    b, n, _ = keys.shape
    h, w = hw
    c1, c2 = up1.out_channels, up2.out_channels
    x = (keys @ _subpixel_weight(up1)).reshape(b, n, 4, c1) + up1.bias
    first = x = act1(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    x = (x @ _subpixel_weight(up2)).reshape(b, n, 4, 4, c2) + up2.bias
    x = act2(x)
    m = hyper_in.shape[1]
    logits = x.reshape(b, n * 16, c2) @ hyper_in.transpose(1, 2)  # B x (N*16) x M
    # token (i, j), first sub-pixel (a, b), second (a2, b2) -> pixel (4i + 2a + a2, 4j + 2b + b2)
    logits = logits.reshape(b, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    logits = logits.reshape(b, m, 4 * h, 4 * w)
    return (logits, first) if with_first_step else logits


def decode(decoder: nn.Module, cache: ImageSideCache, sparse: torch.Tensor, dense: torch.Tensor | None,
           image_embedding: torch.Tensor, multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM MaskDecoder.forward for B prompts on one image.

    sparse: BxTxC prompt tokens; dense: BxCxhxw mask-input embedding, or None for the cached no-mask case;
    image_embedding: 1xCxhxw. Returns (logits Bx1xHxW or Bx3xHxW, iou Bx1 or Bx3), as MaskDecoder.forward.
    """
    b = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    transformer = decoder.transformer
    key_pe = cache.key_pe
    use_cache = dense is None
    if use_cache:
        keys = cache.keys
    else:
        keys = (image_embedding + dense).flatten(2).transpose(1, 2)
    queries = tokens
    for i, layer in enumerate(transformer.layers):
        queries, keys, _ = _block(layer, queries, keys, tokens, key_pe, i == 0, cache if use_cache else None)
    final = transformer.final_attn_token_to_image
    q = queries + tokens
    attn_out = _attend(final, _project(final.q_proj, q, final.num_heads),
                       _project(final.k_proj, keys + key_pe, final.num_heads),
                       _project(final.v_proj, keys, final.num_heads))
    hs = transformer.norm_final_attn(queries + attn_out)

    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    wanted = range(1, decoder.num_mask_tokens) if multimask else range(0, 1)
    hyper_in = torch.stack([decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in wanted], dim=1)
    masks = upscale_and_project(decoder.output_upscaling, keys, hyper_in, cache.hw)
    iou = decoder.iou_prediction_head(hs[:, 0, :])
    iou = iou[:, 1:] if multimask else iou[:, 0:1]
    return masks, iou
