"""Training the paper's own SAM-UNet (`samunet_res34` / `samunet_res50`) from an original SAM ViT-B checkpoint.

`samunet train --model samunet_res34 --sam-vit-b sam_vit_b_01ec64.pth ...` lands here (`run_cli`). The model is built
by `sam_vit_b.load_samunet_from_sam_vit_b`: the SAM ViT-B is frozen (as in the paper); the ResNet branch, adapters,
bridges, embedding_encoder, prompt encoder and the whole mask decoder train (the paper's split: "ViT frozen,
everything else trained").

The CNN features are added inside the ViT, so nothing can be cached: every step runs the full model on the image,
with gradient flowing through the frozen ViT blocks into the adapters and the ResNet. One step = one image (the
model's own 256-px input, `SAMUNetInput` preprocessing) and up to `prompts_per_step` of its targets decoded in one
batch against its single encoding, with the click model's prompt schedule (`prompt_sim`): a box or 1-3 points, then
0-4 corrective clicks (the `samunet eval` click rule on the previous prediction), the previous round's 64x64 logits
fed back detached as mask input. The loss is the authors' (`sam_vit_b.samunet_loss`: focal + 20 x Dice on the logits
upsampled to 256), averaged over the rounds. No distillation (there is no trained teacher to keep).

Seeded and resumable as `loop.Trainer`: step s draws everything from `numpy.random.default_rng([seed, s])`; the
checkpoint (every tensor but the frozen ViT, BatchNorm statistics included, plus optimizer, step, history) is written
atomically with its sha256 and metadata in a JSON next to it. At the end `--out` gets the complete model in the
SAM-UNet authors' format (`{'model': state_dict}`, fp32), which `samunet segment --model samunet_res34 --checkpoint
OUT` loads strictly, plus a JSON card.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core.errors import InputError

MODELS = ("samunet_res34", "samunet_res50")
VIT_PREFIX = "image_encoder."  # the frozen SAM ViT-B (image_encoder.sam_img_encoder.*)
CHECKPOINT_FORMAT = "samunet-vitb-train-v1"


@dataclass
class VitBItem:
    """One training image: its SAM-UNet-resized uint8 slice (hxwx3, before normalisation and padding) and its target
    masks on the 256 model grid (Tx256x256 bool, padding is background)."""

    source: str
    modality: str
    resized: np.ndarray
    names: list[str]
    masks: np.ndarray
    original_size: tuple[int, int]

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.resized.shape[:2])


def prepare_item(record: Any) -> VitBItem | None:
    """ImageRecord -> VitBItem (None when no target covers MIN_GRID_PIXELS of the grid). The image is resized as
    `SAMUNetInput.image_to_array` does (PIL bilinear, longest side 256); masks as the embedding precompute files them
    (`embeddings.grid_masks`)."""
    from PIL import Image

    from samunet_core.model_input import MODEL_GRID, as_rgb_uint8
    from samunet_core.train.embeddings import MIN_GRID_PIXELS, grid_masks
    from samunet_core.transforms import model_resized_shape

    rgb = as_rgb_uint8(record.image)
    h, w = model_resized_shape(*rgb.shape[:2], MODEL_GRID)
    resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR), np.uint8)
    masks = grid_masks([m for _, m in record.targets], (h, w))
    keep = masks.reshape(len(masks), -1).sum(1) >= MIN_GRID_PIXELS if len(masks) else np.zeros(0, bool)
    if not keep.any():
        return None
    names = [n for (n, _), k in zip(record.targets, keep, strict=True) if k]
    return VitBItem(record.source, record.modality, resized, names, masks[keep], tuple(rgb.shape[:2]))


def model_input(item: VitBItem) -> Any:
    """1x3x256x256 float32 tensor equal to `SAMUNetInput.image_to_array` of the item's image."""
    import torch

    from samunet_core.model_input import MODEL_GRID, SAM_PIXEL_MEAN, SAM_PIXEL_STD

    normalised = (item.resized.astype(np.float32) - np.float32(SAM_PIXEL_MEAN)) / np.float32(SAM_PIXEL_STD)
    padded = np.zeros((MODEL_GRID, MODEL_GRID, 3), np.float32)
    padded[: normalised.shape[0], : normalised.shape[1]] = normalised
    return torch.from_numpy(padded).permute(2, 0, 1)[None].contiguous()


def prepare_items(records: Iterable[Any], progress: bool = True) -> list[VitBItem]:
    from tqdm import tqdm

    items = [prepare_item(r) for r in tqdm(records, desc="images", unit="image", disable=not progress)]
    return [it for it in items if it is not None]


def build_model(sam_vit_b: str | Path, model_name: str, seed: int) -> tuple[Any, Any]:
    """(SAM-UNet initialised from the SAM ViT-B checkpoint, SamInitReport). The fresh parts (ResNet, adapters,
    bridges, med token, hf_mlp, ...) are drawn after `torch.manual_seed(seed)`, so a run is reproducible."""
    import torch

    from samunet_core.train.sam_vit_b import load_samunet_from_sam_vit_b

    torch.manual_seed(seed)
    return load_samunet_from_sam_vit_b(sam_vit_b, model_name)


def checkpoint_state(model: Any) -> dict[str, Any]:
    """Every tensor (parameters and buffers) except the frozen ViT's, detached on the CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(VIT_PREFIX)}


def prompt_schedule(config: Any) -> dict[str, Any]:
    from samunet_core.train.loop import prompt_schedule as loop_schedule

    schedule = loop_schedule(config)
    for key in ("kd_box_round0_weight", "lone_first_click", "propagation"):  # the cached-embedding loop's only
        schedule.pop(key, None)
    schedule.update({"mask_input": "previous round's 64x64 logits (no gradient)",
                     "loss_fn": "focal + 20 x Dice on logits upsampled 64 -> 256 (sam_vit_b.samunet_loss)",
                     "correction_grid": "logits upsampled to 256 (bilinear), threshold 0"})
    return schedule


class VitBTrainer:
    """Trains a SAM-UNet built by `build_model` on `VitBItem`s; `run()` trains to `config.steps` (resuming)."""

    def __init__(self, model: Any, items: list[VitBItem], config: Any, run_dir: str | Path | None = None,
                 device: str = "cpu", metadata: dict[str, Any] | None = None) -> None:
        """config: a `loop.TrainConfig` (steps, prompts_per_step, lr schedule, seed, box_fraction, round_probs,
        box_jitter, loss_every_round, grad_clip, checkpoint_every, threads; the KD and crop fields do not apply)."""
        import torch

        if config.threads:
            torch.set_num_threads(config.threads)
        self.items = [it for it in items if len(it.names)]
        if not self.items:
            raise InputError("no training images with targets (each needs a mask of at least 4 pixels on the 256 "
                             "grid); check --data-root / --extra-manifest / --sam-med2d-json")
        if any(p.requires_grad for p in model.image_encoder.parameters()):
            raise InputError("the SAM ViT-B (image_encoder) must stay frozen, as in the paper")
        self.model, self.config, self.device = model.to(device), config, device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.metadata = metadata or {}
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    def save_checkpoint(self) -> str | None:
        from samunet_core.checkpoints import sha256_of_file
        from samunet_core.train.loop import atomic_torch_save

        path = self.checkpoint_path
        if path is None:
            return None
        config = dataclasses.asdict(self.config)
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": self.step, "trainable": checkpoint_state(self.model),
                            "optimizer": self.optimizer.state_dict(), "history": self.history,
                            "train_seconds": self.train_seconds, "config": config}, path)
        digest = sha256_of_file(path)
        info = {"checkpoint": path.name, "format": CHECKPOINT_FORMAT, "sha256": digest, "step": self.step,
                "config": config, "prompt_schedule": prompt_schedule(self.config),
                "train_seconds": round(self.train_seconds, 1), "history": self.history, **self.metadata}
        (path.parent / "checkpoint.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
        return digest

    def resume(self) -> bool:
        """Load the run's checkpoint if there is one; True when resumed."""
        import torch

        from samunet_core.errors import CheckpointError

        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        blob = torch.load(path, map_location="cpu", weights_only=True)
        own = checkpoint_state(self.model)
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT or set(blob["trainable"]) != set(own) \
                or any(blob["trainable"][k].shape != v.shape for k, v in own.items()):
            raise CheckpointError(f"{path} is not a training checkpoint of this model ({self.model.backbone}); pass "
                                  "--restart or another --run-dir")
        from samunet_core.train.loop import restore_training_state

        restore_training_state(self, blob)
        return True

    # -- one step -------------------------------------------------------------------------------------------------
    def _autocast(self) -> Any:
        import contextlib

        import torch

        if str(self.device).startswith("cuda"):
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step (deterministic given the seed and `step`). Returns the step record."""
        import torch
        import torch.nn.functional as F

        from samunet_core.train import prompt_sim
        from samunet_core.train.loop import lr_at
        from samunet_core.train.sam_vit_b import samunet_loss

        cfg = self.config
        rng = np.random.default_rng([cfg.seed, step])
        item = self.items[int(rng.integers(len(self.items)))]
        n_targets = len(item.names)
        batch = min(cfg.prompts_per_step, max(2, n_targets))
        chosen = rng.choice(n_targets, size=batch, replace=n_targets < batch)
        masks = item.masks[chosen]
        mode = "box" if rng.random() < cfg.box_fraction else "points"
        prompts = prompt_sim.first_prompts(masks, mode, rng, jitter=cfg.box_jitter)
        probs = np.asarray(cfg.round_probs, np.float64)
        rounds = int(rng.choice(len(probs), p=probs / probs.sum()))
        target = torch.as_tensor(masks, device=self.device)
        x = model_input(item).to(self.device)
        self.model.train()
        losses, mask_input, iou = [], None, 0.0
        with self._autocast():
            image_embeddings, msf = self.model.encode(x)  # gradient flows through the frozen ViT into the CNN
        for r in range(rounds + 1):
            coords, labels, boxes = prompts.tensors(self.device)
            grad = cfg.loss_every_round or r == rounds
            with torch.set_grad_enabled(grad), self._autocast():
                logits = self.model.decode(image_embeddings, msf, coords, labels, boxes, mask_input).float()
            if grad:
                losses.append(samunet_loss(logits, target))
            with torch.no_grad():
                pred = F.interpolate(logits.detach(), (256, 256), mode="bilinear", align_corners=False)[:, 0] > 0
                inter, union = (pred & target).sum((1, 2)).float(), (pred | target).sum((1, 2)).float()
                iou = float((inter / union.clamp(min=1)).mean())
            if r < rounds:
                prompt_sim.add_corrections(prompts, pred.cpu().numpy(), masks, item.input_size, rng)
                mask_input = logits.detach()
        total = sum(losses) / len(losses)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.model.eval()
        return {"step": step, "loss": float(total.detach()), "loss_last_round": float(losses[-1].detach()),
                "iou": iou, "rounds": rounds, "box": float(mode == "box"), "batch": batch}

    def run(self, progress: bool = True, stop_after_s: float | None = None) -> list[dict[str, float]]:
        """Train from the current step to `config.steps`, checkpointing; returns the history."""
        from samunet_core.train.loop import run_steps

        return run_steps(self, progress, stop_after_s)


def export(model: Any, out: str | Path, metadata: dict[str, Any]) -> str:
    """Write the complete model as `{'model': fp32 state_dict, 'samunet_train': JSON text}` (the SAM-UNet authors'
    format, loadable with weights_only=True and by `registry.load_model(name, checkpoint=out)`); returns its sha256."""
    import torch

    from samunet_core.checkpoints import sha256_of_file
    from samunet_core.io.atomic import atomic_path

    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    blob = {"model": state, "samunet_train": json.dumps(metadata, default=str)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(blob, tmp)
    return sha256_of_file(out)


# Options of `samunet train` that belong to the cached-embedding families only.
_NOT_FOR_VITB = (("trainable", "--trainable"), ("init", "--init"), ("multimask_first_click", "--multimask-first-click"),
                 ("encode_only", "--encode-only"), ("write_val_manifest", "--write-val-manifest"))


def run_cli(args: Any) -> int:
    """`samunet train --model samunet_res34|samunet_res50 --sam-vit-b PATH ...` (see docs/training.md)."""
    import torch

    from samunet_core.cli_train import _records, data_summary, git_commit, write_card
    from samunet_core.predictor import resolve_device
    from samunet_core.train.loop import TrainConfig, loss_summary, resume_or_run

    if args.model not in MODELS:
        raise InputError(f"--sam-vit-b initialises the paper's SAM-UNet only (--model {' or '.join(MODELS)}), not "
                         f"--model {args.model}")
    if not args.sam_vit_b:
        from samunet_core.train.sam_vit_b import _GET_IT

        raise InputError(f"--model {args.model} trains from an original SAM ViT-B checkpoint: {_GET_IT}; pass its "
                         "path with --sam-vit-b PATH")
    given = [flag for attr, flag in _NOT_FOR_VITB if getattr(args, attr, None)]
    given += ["--backbone"] if getattr(args, "backbone", "resnet34") != "resnet34" else []  # samunet_tinyvit's
    given += ["--new-lr-scale"] if getattr(args, "new_lr_scale", 1.0) != 1.0 else []
    if given:
        raise InputError(f"{', '.join(given)} do(es) not apply to --model {args.model} (its CNN is the model name's "
                         "ResNet)")
    if args.steps < 1 or args.prompts_per_step < 1:
        raise InputError("--steps and --prompts-per-step must be >= 1")
    if not args.no_pool and not (Path(args.data_root) / "train_manifest.json").is_file():
        raise InputError(f"{args.data_root} has no train_manifest.json; pass --data-root (the shared data folder) "
                         "or --no-pool with --sam-med2d-json / --extra-manifest")
    if args.validate:
        print("note: --validate is not supported for the SAM-UNet models yet; skipped")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, report = build_model(args.sam_vit_b, args.model, args.seed)  # a bad checkpoint fails before any output
    print(report.summary())
    t0 = time.perf_counter()
    items = prepare_items(_records(args), progress=not args.no_progress)
    prepare_s = time.perf_counter() - t0
    config = TrainConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, lr=args.lr, seed=args.seed,
                         box_fraction=args.box_fraction, kd_weight=0.0, crop=False,
                         loss_every_round=not args.loss_last_round_only, threads=args.threads)
    params = list(model.parameters())
    metadata = {"family": args.model, "init_from": report.as_dict(), "data": data_summary(items),
                "git_commit": git_commit(), "device": device, "torch": str(torch.__version__),
                "threads": torch.get_num_threads(), "bf16_autocast": str(device).startswith("cuda"),
                "parameters": {"total": sum(p.numel() for p in params),
                               "trainable": sum(p.numel() for p in params if p.requires_grad),
                               "frozen": "image_encoder (SAM ViT-B)"}}
    trainer = VitBTrainer(model, items, config, run_dir=args.run_dir, device=device, metadata=metadata)
    history = resume_or_run(trainer, args)
    run_info = {"steps_done": trainer.step, "config": dataclasses.asdict(config),
                "prompt_schedule": prompt_schedule(config), "train_seconds": round(trainer.train_seconds, 1),
                "prepare_seconds_this_run": round(prepare_s, 1),
                "seconds_per_step": round(trainer.train_seconds / max(len(history), 1), 3),
                **loss_summary(history)}
    out = Path(args.out) if args.out else Path(args.run_dir) / f"{args.model}.pth"
    digest = export(trainer.model.cpu(), out, {**metadata, "run": run_info})
    card = {"file": out.name, "sha256": digest, "bytes": out.stat().st_size, "format": "{'model': state_dict} fp32",
            "load_with": f"samunet segment --model {args.model} --checkpoint {out.name}", **metadata, "run": run_info}
    print(f"wrote {out} (sha256 {digest}) and {write_card(out, card)}")
    return 0
