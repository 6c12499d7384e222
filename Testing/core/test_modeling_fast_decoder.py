"""The cached fast decoder path equals SAM's MaskDecoder on the real LiteMedSAM weights and a real CT embedding."""

import pytest
import torch
from conftest import load_image


@pytest.fixture(scope="module")
def model_and_embedding(litemedsam):
    emb = litemedsam.encode(load_image("amos_0006_90")).tensors["image_embedding"]
    return litemedsam.model, emb, litemedsam.model.image_side_cache(emb)


BOX = torch.tensor([[100.0, 90, 180, 170]])
POINTS = torch.tensor([[[140.0, 130], [150, 100]]])
LABELS = torch.tensor([[1, 0]])
MASK = torch.linspace(-6, 6, 65536).reshape(1, 1, 256, 256)


@pytest.mark.parametrize("prompts", [
    dict(boxes=BOX),
    dict(boxes=torch.tensor([[100.0, 90, 180, 170], [20, 30, 60, 90]])),
    dict(point_coords=POINTS, point_labels=LABELS),
    dict(boxes=BOX, point_coords=POINTS, point_labels=LABELS, mask_input=MASK),
    dict(boxes=BOX, multimask=True),
], ids=["box", "two boxes", "points", "box+points+mask", "multimask"])
def test_cached_decode_equals_sam_decoder(model_and_embedding, prompts):
    model, emb, cache = model_and_embedding
    with torch.inference_mode():
        ref_logits, ref_iou = model.decode(emb, **prompts)
        logits, iou = model.decode_cached(emb, cache, **prompts)
    assert logits.shape == ref_logits.shape and iou.shape == ref_iou.shape
    assert ref_logits.std() > 0.01  # not a trivial constant comparison (multimask heads are weak: std ~0.05)
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=0)  # measured max |diff| 3.4e-5
    assert torch.allclose(iou, ref_iou, atol=1e-5)
