"""The shipped SAM-UNet on TinyViT (`samunet_tinyvit`): strict loading of its delta, registry and predictor, and one
fixed in-repo click on a CT slice no training saw, where it must beat the base model.

Real components: the shipped delta (samunet_core/weights), the packaged LiteMedSAM base weights, the in-repo SA-Med2D
slice amos_0004_75 (Testing/data/sam_med2d_demo, Apache-2.0 / CC BY 4.0; validation-only in the training split).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_click_dice
from PIL import Image

DATA = Path(__file__).resolve().parents[1] / "data" / "sam_med2d_demo"
HELD_OUT = "amos_0004_75"


@pytest.fixture(scope="module")
def shipped():
    from samunet_core.registry import get_spec, load_model

    spec = get_spec("samunet_tinyvit")
    model, info = load_model("samunet_tinyvit")
    return spec, model, info


def test_delta_loads_strictly_with_its_card(shipped, tmp_path):
    import torch

    from samunet_core.checkpoints import sha256_of_file
    from samunet_core.errors import CheckpointError
    from samunet_core.registry import model_status
    from samunet_core.train.delta import read_delta
    from samunet_core.train.weights_source import WEIGHTS_DIR

    spec, model, info = shipped
    path = WEIGHTS_DIR / spec.weights.filename
    card = json.loads(path.with_suffix(".json").read_text())
    assert sha256_of_file(path) == card["sha256"] == spec.weights.sha256 == info.sha256
    assert model_status("samunet_tinyvit").available
    blob = read_delta(path)
    assert blob["metadata"]["family"] == "samunet_tinyvit" and blob["metadata"]["backbone"] == spec.weights.backbone
    # every tensor is either the base TinyViT's or the delta's, and the delta's values are what the model holds
    state = model.state_dict()
    delta_keys = set(blob["state_dict"])
    assert {k for k in state if not k.startswith("image_encoder.")} == delta_keys
    some = sorted(k for k in delta_keys if k.startswith(("cnn.", "hq_decoder.")) and state[k].is_floating_point())[:5]
    for key in some:
        assert torch.equal(state[key], blob["state_dict"][key].float())
    # a delta missing one tensor is refused, not half-loaded
    broken = dict(blob, state_dict={k: v for k, v in blob["state_dict"].items() if k != some[0]})
    torch.save(broken, tmp_path / "broken.pt")
    fresh = spec.build()
    with pytest.raises(CheckpointError, match="leaves 1 tensors unset"):
        spec.weights.load_into(fresh, tmp_path / "broken.pt")


def test_one_click_beats_the_base_model_on_an_unseen_slice(shipped):
    from samunet_core.predictor import Predictor, load_predictor

    spec, model, info = shipped
    image = np.array(Image.open(DATA / "images" / f"{HELD_OUT}.png"))
    masks = [np.array(Image.open(p)) > 0 for p in sorted((DATA / "masks").glob(f"{HELD_OUT}_*.png"))]
    predictors = (Predictor(model, "samunet_tinyvit", spec.family, device="cpu", weights=info),
                  load_predictor("litemedsam", device="cpu"))
    new, base = (one_click_dice(p, p.encode(image), masks) for p in predictors)
    assert np.mean(new) > np.mean(base) + 0.3, (base, new)


def test_validation_shares_the_tinyvit_pass_and_gives_the_models_own_embedding(shipped, tmp_path):
    """train/validate's cached path (frozen TinyViT embedding from a disk cache, CNN branch and fusion on top) gives
    the embedding the model makes itself, on a cache miss and on a hit."""
    import torch

    from samunet_core.predictor import Predictor
    from samunet_core.train.validate import CachedEncoderPredictor

    spec, model, info = shipped
    predictor = Predictor(model, "samunet_tinyvit", spec.family, device="cpu", weights=info)
    image = np.array(Image.open(DATA / "images" / f"{HELD_OUT}.png"))
    direct = predictor.encode(image)
    cached = CachedEncoderPredictor(predictor, tmp_path)
    for _ in ("miss", "hit"):
        embedding = cached.encode(image)
        assert embedding.model_id == predictor.encoder_id
        for key in ("image_embedding", "msf"):
            torch.testing.assert_close(embedding.tensors[key], direct.tensors[key], rtol=0, atol=1e-5)
    assert len(list(tmp_path.rglob("*.pt"))) == 1  # one TinyViT embedding on disk, the fused one is not stored
