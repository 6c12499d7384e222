"""Access to the `segment_anything.modeling` classes without importing the `segment_anything` package.

Why: `segment_anything/__init__.py` imports its predictor, which imports torchvision (not installed here; installing it
would replace the CPU torch with CUDA builds). The `modeling` subpackage itself only needs torch and numpy and uses
relative imports alone, so we load that folder of the installed distribution as a package under a private name
(`_samunet_segment_anything_modeling`). Nothing is copied: the classes are the installed `segment-anything` 1.0 code.
When `segment_anything.modeling` has already been imported by someone else (a full install with torchvision), that
module is reused so class identities agree.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from samunet_core.errors import SamunetError

_PRIVATE_NAME = "_samunet_segment_anything_modeling"


def sam_modeling() -> ModuleType:
    """The `segment_anything.modeling` package (ImageEncoderViT, PromptEncoder, MaskDecoder, TwoWayTransformer...).

    Its submodules are reachable as attributes: `.common` (LayerNorm2d, MLPBlock), `.mask_decoder` (MLP), ...
    """
    already = sys.modules.get("segment_anything.modeling") or sys.modules.get(_PRIVATE_NAME)
    if already is not None:
        return already
    spec = importlib.util.find_spec("segment_anything")  # finds the top-level package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise SamunetError(
            "The 'segment-anything' package is not installed. Install the project with scripts/bootstrap.sh "
            "(or `pip install segment-anything==1.0`)."
        )
    modeling_dir = Path(next(iter(spec.submodule_search_locations))) / "modeling"
    init_file = modeling_dir / "__init__.py"
    if not init_file.is_file():
        raise SamunetError(f"segment-anything looks broken: {init_file} is missing. Reinstall segment-anything==1.0.")
    sub_spec = importlib.util.spec_from_file_location(
        _PRIVATE_NAME, init_file, submodule_search_locations=[str(modeling_dir)]
    )
    assert sub_spec is not None and sub_spec.loader is not None
    module = importlib.util.module_from_spec(sub_spec)
    sys.modules[_PRIVATE_NAME] = module
    try:
        sub_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(_PRIVATE_NAME, None)
        raise
    return module


def build_original_sam_vit_b() -> Any:
    """An original SAM ViT-B at 1024 px (random init), the architecture of SAM's released ViT-B checkpoint.

    Used to make SAM-ViT-B-shaped state dicts for testing `samunet_state_dict_from_sam_vit_b` and the parity script.
    """
    from functools import partial

    from torch import nn

    sam = sam_modeling()
    return sam.Sam(
        image_encoder=sam.ImageEncoderViT(
            depth=12, embed_dim=768, img_size=1024, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=12, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11],
            window_size=14, out_chans=256,
        ),
        prompt_encoder=sam.PromptEncoder(256, (64, 64), (1024, 1024), 16),
        mask_decoder=sam.MaskDecoder(
            transformer=sam.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
        ),
    )
