"""SAM-UNet's own training start: `samunet_res34` / `samunet_res50` initialised from an original SAM ViT-B checkpoint.

The SAM-UNet authors train from Meta's `sam_vit_b_01ec64.pth` (1024 px): their build code (Hhankyangg/sam-unet,
sam_unet/models/segment_anything/build_sam.py `load_from`) resizes the ViT's absolute position embedding 64x64 -> 16x16
and the global blocks' (2, 5, 8, 11) relative position tables 127 -> 31 rows with
`F.interpolate(mode="bilinear", align_corners=False)`, keeps the windowed blocks' tables (27 rows, window 14 at every
input size), and drops SAM's output tokens, hypernetwork MLPs and IoU head (their decoder has no place for them).
The ResNet branch, adapters, bridges, med token, hf_mlp, embedding_maskfeature and embedding_encoder keep the freshly
built model's initialisation (the authors start the ResNet from ImageNet weights, which cannot be downloaded here).

- `read_sam_vit_b(path)`: the checkpoint as a state dict (weights-only), refused with an `InputError` naming the fix
  when it is missing or is not SAM ViT-B (ViT-H/L, LiteMedSAM/MobileSAM, a SAM-UNet checkpoint, other layouts).
- `samunet_init_from_sam_vit_b(sam_state, backbone)`: the complete initial SAM-UNet state dict (the authors' keys).
- `load_samunet_from_sam_vit_b(path, backbone)`: the built model with that state loaded strictly and the ViT frozen,
  plus a `SamInitReport` (which keys came from SAM, which are fresh, which SAM keys were dropped).
- `samunet_loss(logits, target)`: the authors' training loss, focal + 20 x Dice on logits upsampled to 256x256.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samunet_core.errors import CheckpointError, InputError

SAM_VIT_B_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
_GET_IT = (f"--sam-vit-b takes Meta's original SAM ViT-B checkpoint sam_vit_b_01ec64.pth (download it from "
           f"{SAM_VIT_B_URL}, about 375 MB) or another checkpoint with exactly its layout (e.g. MedSAM's medsam_vit_b)")
_SAM_PREFIX = "image_encoder.sam_img_encoder."
_GLOBAL_BLOCKS = (2, 5, 8, 11)
_BACKBONES = {"res34": "resnet34", "res50": "resnet50"}
# SAM state-dict entries that are tolerated but unused (buffers some exports carry).
_IGNORED_EXTRAS = ("pixel_mean", "pixel_std")


@dataclass(frozen=True)
class SamInitReport:
    """What `load_samunet_from_sam_vit_b` did. Keys are SAM-UNet keys except `dropped` (SAM checkpoint keys)."""

    source: str
    sha256: str
    backbone: str  # "resnet34" | "resnet50"
    from_sam: tuple[str, ...]  # SAM-UNet keys whose tensors come from the SAM checkpoint
    interpolated: tuple[str, ...]  # the subset of from_sam resized (pos_embed, global blocks' rel_pos)
    fresh: tuple[str, ...]  # SAM-UNet keys that keep the built model's own initialisation
    dropped: tuple[str, ...]  # SAM checkpoint keys SAM-UNet has no place for

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready provenance: counts, the interpolated keys, the fresh and the dropped modules."""
        fresh_modules = sorted({_module_of(k) for k in self.fresh})
        return {"init": "sam_vit_b", "source": self.source, "sha256": self.sha256, "backbone": self.backbone,
                "from_sam": len(self.from_sam), "fresh": len(self.fresh), "dropped": len(self.dropped),
                "interpolated": list(self.interpolated), "fresh_modules": fresh_modules,
                "dropped_modules": sorted({_module_of(k) for k in self.dropped})}

    def summary(self) -> str:
        return (f"SAM-UNet {self.backbone} from {Path(self.source).name}: {len(self.from_sam)} tensors from SAM "
                f"({len(self.interpolated)} interpolated), {len(self.fresh)} freshly initialised, "
                f"{len(self.dropped)} SAM tensors dropped")


def _module_of(key: str) -> str:
    """'mask_decoder.hf_mlp.layers.0.weight' -> 'mask_decoder.hf_mlp'; 'resnet.stage1.0.conv1.weight' -> 'resnet'."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "mask_decoder" else parts[0]


def backbone_name(backbone: str) -> str:
    """'res34' | 'resnet34' | 'samunet_res34' (and the 50 forms) -> 'resnet34' | 'resnet50'."""
    short = backbone.removeprefix("samunet_").replace("resnet", "res")
    if short not in _BACKBONES:
        raise InputError(f"unknown SAM-UNet backbone {backbone!r}; choose res34 or res50 (models samunet_res34, "
                         "samunet_res50)")
    return _BACKBONES[short]


@functools.lru_cache(maxsize=1)
def _sam_vit_b_layout() -> dict[str, tuple[int, ...]]:
    """key -> shape of an original SAM ViT-B state dict at 1024 px (built on the meta device: no memory, no init)."""
    import torch

    from samunet_core.modeling.sam_parts import build_original_sam_vit_b

    with torch.device("meta"):
        model = build_original_sam_vit_b()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _expected_shape(key: str, layout: dict[str, tuple[int, ...]], grid: int) -> tuple[int, ...] | None:
    """The SAM ViT-B shape of `key` for a checkpoint whose position grid is `grid` x `grid` (64 at 1024 px)."""
    if key not in layout:
        return None
    if key == "image_encoder.pos_embed":
        return (1, grid, grid, layout[key][3])
    if any(key.startswith(f"image_encoder.blocks.{b}.attn.rel_pos_") for b in _GLOBAL_BLOCKS):
        return (2 * grid - 1, layout[key][1])
    return layout[key]


def check_sam_vit_b(state: Mapping[str, Any], source: str = "the checkpoint") -> None:
    """Raise InputError, naming what the file is and the fix, unless `state` has the SAM ViT-B layout.

    The position grid may be any size (64 x 64 for the 1024-px release); every other tensor must match exactly.
    """
    keys = list(state)
    if any(k.startswith(_SAM_PREFIX) or k.startswith("mask_decoder.med_token") for k in keys):
        raise InputError(
            f"{source} is a SAM-UNet checkpoint, not an original SAM ViT-B. Load it as the model's weights instead "
            "(--checkpoint PATH, or the SAMUNET_RES34_CHECKPOINT / SAMUNET_RES50_CHECKPOINT variable); " + _GET_IT + "."
        )
    if any(k.startswith(("image_encoder.patch_embed.seq.", "image_encoder.layers.")) for k in keys):
        raise InputError(
            f"{source} is a TinyViT-based checkpoint (LiteMedSAM / MobileSAM), not SAM ViT-B; SAM-UNet's frozen "
            "encoder is the ViT-B. " + _GET_IT + "."
        )
    pos = state.get("image_encoder.pos_embed")
    if pos is None or getattr(pos, "ndim", 0) != 4 or pos.shape[0] != 1 or pos.shape[1] != pos.shape[2]:
        found = ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
        raise InputError(
            f"{source} is not a SAM checkpoint: it has no image-encoder position embedding "
            f"'image_encoder.pos_embed' (1xGxGx768) (its first keys: {found}). " + _GET_IT + "."
        )
    depth = len({k.split(".")[2] for k in keys if k.startswith("image_encoder.blocks.")})
    width = int(pos.shape[3])
    if width != 768 or depth != 12:
        variant = {(1280, 32): "ViT-H (sam_vit_h_4b8939.pth)", (1024, 24): "ViT-L (sam_vit_l_0b3195.pth)"}.get(
            (width, depth), f"a ViT with width {width} and {depth} blocks")
        raise InputError(
            f"{source} is SAM {variant}, not ViT-B (width 768, 12 blocks): SAM-UNet is built on ViT-B. " + _GET_IT + "."
        )
    layout = _sam_vit_b_layout()
    grid = int(pos.shape[1])
    missing = sorted(k for k in layout if k not in state)
    unexpected = sorted(k for k in keys if k not in layout and not k.startswith(_IGNORED_EXTRAS))
    wrong = sorted(f"{k}: {tuple(state[k].shape)} (expected {_expected_shape(k, layout, grid)})" for k in keys
                   if k in layout and tuple(state[k].shape) != _expected_shape(k, layout, grid))
    if missing or unexpected or wrong:
        details = "".join(f"\n  {title}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                          for title, items in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong)) if items)
        raise InputError(
            f"{source} is not an original SAM ViT-B checkpoint ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} wrong-shape tensors; a fine-tune with extra modules such as SAM-Med2D's "
            f"adapters or HQ-SAM's tokens does not fit). " + _GET_IT + "." + details
        )


def read_sam_vit_b(path: str | os.PathLike) -> dict[str, Any]:
    """An original SAM ViT-B checkpoint (sam_vit_b_01ec64.pth: a plain state dict, 1024 px) -> {key: CPU tensor}.

    Read weights-only (no pickled code runs); `{'model': ...}` / `{'state_dict': ...}` wrappers are unwrapped.
    Raises InputError for a missing or unreadable file and for any file that is not SAM ViT-B.
    """
    from samunet_core.checkpoints import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no SAM ViT-B checkpoint at {path}" + (" (it is a folder)" if path.is_dir() else "") +
                         f". {_GET_IT}; pass its path with --sam-vit-b PATH.")
    try:
        state = read_state_dict(path)
    except CheckpointError as exc:
        if isinstance(exc.__cause__, pickle.UnpicklingError):  # (its --trust-checkpoint hint does not apply here)
            raise InputError(f"{path} is not a plain weights file: it holds pickled objects other than tensors (a "
                             f"training checkpoint?) or is no PyTorch file at all, and was not loaded. {_GET_IT}."
                             ) from exc
        raise InputError(f"{exc} {_GET_IT}.") from exc
    check_sam_vit_b(state, str(path))
    return state


def _build(backbone: str) -> Any:
    """The registry's builder for samunet_res34 / samunet_res50: fresh weights, ViT frozen, eval mode."""
    from samunet_core.registry import get_spec

    return get_spec("samunet_" + backbone.replace("resnet", "res")).build()


_SAM_TO_SAMUNET = (("image_encoder.", _SAM_PREFIX), ("prompt_encoder.", "prompt_encoder.sam_prompt_encoder."),
                   ("mask_decoder.", "mask_decoder.sam_mask_decoder."))


def _samunet_key(sam_key: str) -> str | None:
    """The SAM-UNet key a SAM key would land on by prefix alone (None outside the three SAM modules)."""
    return next((new + sam_key[len(old):] for old, new in _SAM_TO_SAMUNET if sam_key.startswith(old)), None)


def _convert(sam_state: Mapping[str, Any], backbone: str, model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(full SAM-UNet state dict, {'from_sam', 'interpolated', 'fresh', 'dropped'} key tuples)."""
    from samunet_core.modeling.samunet import samunet_state_dict_from_sam_vit_b

    check_sam_vit_b(sam_state)
    backbone = backbone_name(backbone)
    if model is None:
        model = _build(backbone)
    elif getattr(model, "backbone", None) != backbone:
        raise InputError(f"the model passed has backbone {getattr(model, 'backbone', None)!r}, not {backbone!r}")
    converted = samunet_state_dict_from_sam_vit_b(dict(sam_state))
    fresh_state = model.state_dict()
    misfits = sorted(k for k in converted if k not in fresh_state or converted[k].shape != fresh_state[k].shape)
    if misfits:  # cannot happen for a checked SAM ViT-B; guards the prefix mapping
        raise CheckpointError(f"SAM tensors converted to keys or shapes SAM-UNet does not have: {misfits[:8]}")
    origin = {_samunet_key(k): k for k in sam_state if _samunet_key(k) in converted}
    state = {k: converted.get(k, v) for k, v in fresh_state.items()}
    keys = {
        "from_sam": tuple(k for k in state if k in converted),
        "interpolated": tuple(k for k in state if k in converted and converted[k].shape != sam_state[origin[k]].shape),
        "fresh": tuple(k for k in state if k not in converted),
        "dropped": tuple(sorted(k for k in sam_state if _samunet_key(k) not in converted)),
    }
    return state, keys


def samunet_init_from_sam_vit_b(sam_state: Mapping[str, Any], backbone: str, model: Any = None) -> dict[str, Any]:
    """The initial SAM-UNet state dict (exactly the authors' keys) from an original SAM ViT-B state dict.

    backbone: "res34" | "res50" (or "resnet34" / "samunet_res34" ...). ViT, prompt encoder and the mask decoder's
    transformer / output_upscaling come from `sam_state` (pos_embed and the global blocks' rel_pos interpolated
    bilinearly, align_corners False); everything else from `model`'s own initialisation (a model built with the
    registry's builder when None). Fresh tensors are `model`'s live tensors (no copy).
    """
    return _convert(sam_state, backbone, model)[0]


def load_samunet_from_sam_vit_b(path: str | os.PathLike, backbone: str) -> tuple[Any, SamInitReport]:
    """(SAM-UNet built by the registry with the SAM ViT-B initialisation loaded strictly, report).

    The ViT (`image_encoder`) is frozen (requires_grad False); everything else is trainable. The model is returned
    in eval mode on the CPU, as the registry's `load_model` returns models: call `.train()` to train.
    """
    from samunet_core.checkpoints import load_strict, sha256_of_file

    backbone = backbone_name(backbone)
    sam_state = read_sam_vit_b(path)
    model = _build(backbone)
    state, keys = _convert(sam_state, backbone, model)
    load_strict(model, state, source=f"{path} (converted to SAM-UNet)")
    model.image_encoder.requires_grad_(False)
    model.eval()
    report = SamInitReport(source=str(path), sha256=sha256_of_file(path), backbone=backbone, **keys)
    return model, report


def samunet_loss(logits: Any, target: Any) -> Any:
    """The authors' training loss: logits Bx1x64x64 upsampled (bilinear, align_corners False) to 256x256, then
    focal (alpha 0.25, gamma 2) + 20 x Dice (smooth 1) against Bx256x256 {0, 1} targets; a scalar."""
    import torch.nn.functional as F

    from samunet_core.train.losses import dice_loss, focal_loss

    logits = F.interpolate(logits, (256, 256), mode="bilinear", align_corners=False)
    target = target.float().unsqueeze(1)
    return focal_loss(logits, target).mean() + 20.0 * dice_loss(logits, target).mean()
