"""LiteMedSAM: TinyViT image encoder + SAM prompt encoder and mask decoder (256 px input, 256x256 logits).

State-dict keys equal those of the published `lite_medsam.pth` (435 tensors), so it loads strictly.
Preprocessing (resize, min-max to [0,1], pad) is the predictor's job; this module takes the 3x256x256 tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from samunet_core.modeling import fast_decoder
from samunet_core.modeling.prompts import check_prompts, expand_to_prompts, prompt_count
from samunet_core.modeling.sam_parts import sam_modeling
from samunet_core.modeling.tinyvit import TinyViT

INPUT_SIZE = 256  # model input side; prompts are given in this frame
EMBEDDING_SIZE = 64  # image embedding grid side
LOGITS_SIZE = 256  # low-res logits side (= 4 x EMBEDDING_SIZE)


class LiteMedSAM(nn.Module):
    """`image_encoder` (TinyViT), `prompt_encoder` (SAM PromptEncoder), `mask_decoder` (SAM MaskDecoder)."""

    def __init__(self) -> None:
        super().__init__()
        sam = sam_modeling()
        self.image_encoder = TinyViT(img_size=INPUT_SIZE)
        self.prompt_encoder = sam.PromptEncoder(
            embed_dim=256,
            image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
            input_image_size=(INPUT_SIZE, INPUT_SIZE),
            mask_in_chans=16,
        )
        self.mask_decoder = sam.MaskDecoder(
            num_multimask_outputs=3,
            transformer=sam.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Bx3x256x256 float (min-max normalised to [0,1], zero-padded) -> Bx256x64x64 image embedding."""
        return self.image_encoder(x)

    def _embed_prompts(self, image_embedding: torch.Tensor, point_coords: torch.Tensor | None,
                       point_labels: torch.Tensor | None, boxes: torch.Tensor | None, mask_input: torch.Tensor | None
                       ) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Check the prompts against the embedding -> (B, sparse BxTx256, dense Bx256x64x64)."""
        n = prompt_count(point_coords, point_labels, boxes, mask_input)
        check_prompts(image_embedding, n, EMBEDDING_SIZE, 256, point_coords, point_labels, boxes, mask_input,
                      LOGITS_SIZE)
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return n, sparse, dense

    def decode(
        self,
        image_embedding: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts against image embeddings -> (logits Bx1x256x256 or Bx3x256x256, predicted IoU Bx1 or Bx3).

        image_embedding: 1x256x64x64 (shared by all B prompts) or Bx256x64x64 (prompt i against image i).
        point_coords: BxNx2 (x, y) in the 256 input frame; point_labels: BxN (1 positive, 0 negative, -1 padding).
        boxes: Bx4 (x0, y0, x1, y1) in the 256 input frame. mask_input: Bx1x256x256 logits of a previous decode.
        B is the number of prompts; every given prompt tensor must have it.
        """
        n, sparse, dense = self._embed_prompts(image_embedding, point_coords, point_labels, boxes, mask_input)
        image_pe = self.prompt_encoder.get_dense_pe()
        if image_embedding.shape[0] == 1:
            # SAM's decoder repeats a single image embedding once per prompt.
            return self.mask_decoder(
                image_embeddings=image_embedding,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        # One image per prompt: SAM's decoder would pair every image with every prompt, so decode row by row.
        per_image = expand_to_prompts(image_embedding, n)
        outputs = [
            self.mask_decoder(
                image_embeddings=per_image[i : i + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse[i : i + 1],
                dense_prompt_embeddings=dense[i : i + 1],
                multimask_output=multimask,
            )
            for i in range(n)
        ]
        return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])


    def image_side_cache(self, image_embedding: torch.Tensor) -> fast_decoder.ImageSideCache:
        """Prompt-independent decoder work for one 1x256x64x64 embedding (reused by every later `decode_cached`)."""
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return fast_decoder.build_image_side_cache(self.mask_decoder, image_embedding,
                                                   self.prompt_encoder.get_dense_pe(), no_mask)

    def decode_cached(
        self,
        image_embedding: torch.Tensor,
        cache: fast_decoder.ImageSideCache,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode` for B prompts on ONE image (1x256x64x64) with its ImageSideCache: same outputs, less work."""
        _, sparse, dense = self._embed_prompts(image_embedding, point_coords, point_labels, boxes, mask_input)
        return fast_decoder.decode(self.mask_decoder, cache, sparse, dense if mask_input is not None else None,
                                   image_embedding, multimask)


def build_litemedsam() -> LiteMedSAM:
    """A LiteMedSAM with freshly initialised weights, in eval mode (load the checkpoint with load_state_dict)."""
    return LiteMedSAM().eval()
