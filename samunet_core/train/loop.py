"""The training loop: prompt encoder + mask decoder of LiteMedSAM on cached embeddings, image encoder frozen.

One step = one cached image and up to `prompts_per_step` of its targets, all decoded in one batch against the one
embedding. A step draws a first prompt (box or 1-3 points) and a number of correction rounds r; rounds before r run
without gradient (the model's own prediction places the next click and its logits are fed back as mask input); the
loss is taken on round r. Box steps at round 0 also distil towards the frozen base decoder (keeps box accuracy).

Families: `litemedsam_clicks` (a LiteMedSAM; the default) trains the prompt encoder + mask decoder on the cached
TinyViT embedding, decoding a crop window around the targets. `samunet_tinyvit` (a `SAMUNetTinyViT`, chosen by the
model handed in) trains the groups its `set_trainable` enabled: per step `model.encode(x, image_embedding=E)` runs the
CNN branch and fusion on the 256-grid model input `x` (stored next to the embedding cache by `store_model_inputs`)
with the cached frozen TinyViT embedding E, then every round decodes the full 256 grid with `model.decode`. Same
prompt schedule, losses and KD (the teacher is the initial model); no multimask lone-click option (one mask token).

Seeded and resumable: step s draws everything from `numpy.random.default_rng([seed, s])`, so a resumed run makes
the same choices as an uninterrupted one. A checkpoint (trainable weights, optimizer, step, history) is written
atomically every `checkpoint_every` steps, with its sha256 in a JSON next to it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core.train.delta import FAMILY_PREFIXES, TRAINED_PREFIXES, trained_state
from samunet_core.train.embeddings import CachedItem

FAMILIES = ("litemedsam_clicks", "samunet_tinyvit")


@dataclass
class TrainConfig:
    steps: int = 400
    prompts_per_step: int = 6
    lr: float = 1e-4
    min_lr_fraction: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    box_fraction: float = 0.3  # share of steps whose first prompt is a box (else 1-3 points)
    round_probs: tuple[float, ...] = (0.2, 0.2, 0.2, 0.2, 0.2)  # P(last round = r), r = 0..4 (v2: .35 .2 .15 .15 .15)
    kd_weight: float = 5.0  # box steps at round 0: BCE towards the base decoder's probabilities
    box_jitter: float = 0.1
    loss_every_round: bool = True  # loss on every round (earlier rounds' logits fed back detached), else the last only
    checkpoint_every: int = 25
    threads: int = 0  # torch threads (0: leave torch's default)
    multimask_first_click: bool = False  # a lone first click trains SAM's 3 ambiguity tokens (best of 3)
    crop: bool = True  # decode only a window of the embedding around the step's targets (cheaper on a CPU)
    crop_min_tokens: int = 32  # smallest window side in embedding tokens (x4 = grid pixels)
    crop_margin_px: int = 24  # grid pixels of context around the targets' union box
    propagation_fraction: float = 0.0  # share of steps that are one propagation step (where slice pairs exist)
    new_parts_lr_scale: float = 1.0  # samunet_tinyvit: lr multiplier of the randomly initialised / new modules


def prompt_schedule(config: TrainConfig) -> dict[str, Any]:
    """The prompt simulation as recorded in checkpoint metadata."""
    return {"first_prompt": {"box": config.box_fraction, "points_1_to_3": 1 - config.box_fraction},
            "box_jitter": f"50% of boxes, each side up to {config.box_jitter} x extent, max 5 px",
            "first_point": "50% most interior pixel of the largest component, else random at >= 1/3 max depth",
            "correction_rounds_probs": list(config.round_probs),
            "loss": "every round (mean)" if config.loss_every_round else "last round only",
            "correction_click": "metrics.next_click (centre of largest error region), 25% a random pixel of it",
            "mask_input": "previous round's logits (no gradient)", "kd_box_round0_weight": config.kd_weight,
            "lone_first_click": "best of the 3 ambiguity tokens" if config.multimask_first_click else "token 0",
            "propagation": {"fraction_of_steps": config.propagation_fraction,
                            "prompt": "box of the neighbouring slice's reference mask + the walk's margin "
                                      "(propagate.grown_grid_box), no mask input (the walk feeds none), no "
                                      "corrections; target empty where the structure has ended",
                            "pairs": "slices of one volume / LIDC nodule 1-2 slices apart, both directions"}}


EMBED_GRID = 64  # LiteMedSAM image embedding side; logits are 4x that
BACKGROUND_LOGIT = -20.0  # logits outside a decoded window, when fed back as mask input


def crop_window(masks: np.ndarray, min_tokens: int, margin_px: int) -> tuple[int, int, int]:
    """(row0, col0, side) in embedding tokens: a square window covering the union box of Bx256x256 masks plus a
    margin, at least `min_tokens` wide, inside the 64x64 grid. The full grid is (0, 0, 64)."""
    union = masks.any(axis=0)
    rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    y0, y1, x0, x1 = rows[0] - margin_px, rows[-1] + margin_px, cols[0] - margin_px, cols[-1] + margin_px
    side = int(np.clip(np.ceil(max(y1 - y0 + 1, x1 - x0 + 1) / 4), min_tokens, EMBED_GRID))
    side = min(side + side % 2, EMBED_GRID)

    def start(lo: int, hi: int) -> int:
        centre = (lo + hi) / 8.0
        return int(np.clip(round(centre - side / 2), 0, EMBED_GRID - side))

    return start(y0, y1), start(x0, x1), side


def decode_window(model: Any, image_embedding: Any, coords: Any, labels: Any, boxes: Any, mask_input: Any,
                  window: tuple[int, int, int], all_masks: bool = False) -> tuple[Any, Any]:
    """LiteMedSAM decode of B prompts restricted to a window of the 1x256x64x64 embedding.

    Prompts and mask input stay in the full 256 frame (the prompt encoder sees the whole image); the transformer
    attends only to the window's image tokens, with their own positional encodings. Returns (logits Bx1x4sx4s of the
    window, IoU Bx1; with `all_masks` all four mask tokens, Bx4 and Bx4). The window (0, 0, 64) is exactly the
    model's own decode.
    """
    r0, c0, side = window
    points = (coords, labels) if coords is not None else None
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
    pe = model.prompt_encoder.get_dense_pe()
    crop = (Ellipsis, slice(r0, r0 + side), slice(c0, c0 + side))
    inputs = dict(image_embeddings=image_embedding[crop], image_pe=pe[crop], sparse_prompt_embeddings=sparse,
                  dense_prompt_embeddings=dense[crop])
    if all_masks:
        return model.mask_decoder.predict_masks(**inputs)
    return model.mask_decoder(**inputs, multimask_output=False)


def paste_window(logits: Any, window: tuple[int, int, int]) -> Any:
    """Bx1x4sx4s window logits -> Bx1x256x256 full-grid logits (BACKGROUND_LOGIT outside the window)."""
    import torch

    r0, c0, side = (4 * v for v in window)
    if side == 4 * EMBED_GRID:
        return logits
    full = torch.full((logits.shape[0], 1, 4 * EMBED_GRID, 4 * EMBED_GRID), BACKGROUND_LOGIT, dtype=logits.dtype,
                      device=logits.device)
    full[:, :, r0:r0 + side, c0:c0 + side] = logits
    return full


def training_autocast(device: str) -> Any:
    """bf16 autocast on CUDA (the forward passes and losses of a training step), a no-op context on the CPU."""
    import contextlib

    import torch

    if str(device).startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * (config.min_lr_fraction + (1 - config.min_lr_fraction) * cosine)


def model_family(model: Any) -> str:
    """"samunet_tinyvit" for a SAMUNetTinyViT, else "litemedsam_clicks" (a LiteMedSAM)."""
    from samunet_core.modeling.samunet_tinyvit import SAMUNetTinyViT

    return "samunet_tinyvit" if isinstance(model, SAMUNetTinyViT) else "litemedsam_clicks"


def trainable_parameters(model: Any, family: str = "litemedsam_clicks") -> list[Any]:
    """litemedsam_clicks: freeze everything but the prompt encoder and mask decoder. samunet_tinyvit: the
    parameters its `set_trainable` left trainable (the TinyViT must stay frozen: its embedding is cached).
    Returns the trainable parameters."""
    if family == "samunet_tinyvit":
        if any(p.requires_grad for p in model.image_encoder.parameters()):
            from samunet_core.errors import InputError

            raise InputError("samunet_tinyvit trains on cached TinyViT embeddings: its image_encoder must stay frozen")
        return [p for p in model.parameters() if p.requires_grad]
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TRAINED_PREFIXES))
        if p.requires_grad:
            params.append(p)
    return params


# -- model inputs for samunet_tinyvit (the CNN branch needs the image, the embedding cache holds only E) ------------
INPUTS_DIR = "inputs"


def model_input_path(cache_dir: str | Path, image_hash: str) -> Path:
    """Where the 256-grid input of the image with content hash `image_hash` (the item key's [1]) is stored."""
    return Path(cache_dir) / INPUTS_DIR / f"{image_hash}.npy"


def store_model_inputs(records: Any, cache_dir: str | Path) -> Any:
    """Pass `records` through (a generator), first storing each image's LiteMedSAM-resized uint8 slice (hxwx3,
    INTER_AREA, at most 192 KB) under `cache_dir`/inputs/ unless present; `load_model_input` rebuilds the exact
    model input from it."""
    import cv2

    from samunet_core.cache import content_hash
    from samunet_core.model_input import MODEL_GRID, as_rgb_uint8
    from samunet_core.transforms import model_resized_shape

    for record in records:
        path = model_input_path(cache_dir, content_hash(record.image))
        if not path.is_file():
            rgb = as_rgb_uint8(record.image)
            new_h, new_w = model_resized_shape(*rgb.shape[:2], MODEL_GRID)
            resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            try:
                with open(tmp, "wb") as fh:
                    np.save(fh, resized)
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        yield record


def load_model_input(cache_dir: str | Path, image_hash: str) -> Any:
    """1x3x256x256 float32 tensor equal to `LiteMedSAMInput.image_to_array` of the stored image (min-max of the
    resized slice to [0, 1], zero-padded), or None when not stored."""
    import torch

    from samunet_core.model_input import MODEL_GRID

    path = model_input_path(cache_dir, image_hash)
    if not path.is_file():
        return None
    resized = np.load(path).astype(np.float64)
    lo, hi = resized.min(), resized.max()
    normalised = ((resized - lo) / np.clip(hi - lo, 1e-8, None)).astype(np.float32)
    padded = np.zeros((MODEL_GRID, MODEL_GRID, 3), np.float32)
    padded[: normalised.shape[0], : normalised.shape[1]] = normalised
    return torch.from_numpy(padded).permute(2, 0, 1)[None].contiguous()


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class Trainer:
    """Holds model, frozen teacher, optimizer and data; `run()` trains to `config.steps` (resuming if possible)."""

    def __init__(self, model: Any, items: list[CachedItem], cache: Any, config: TrainConfig,
                 run_dir: str | Path | None = None, device: str = "cpu", metadata: dict[str, Any] | None = None,
                 inputs_dir: str | Path | None = None) -> None:
        """inputs_dir (samunet_tinyvit only): where `store_model_inputs` wrote the model inputs (default: the
        embedding cache's folder)."""
        import torch

        from samunet_core.errors import InputError

        if config.threads:
            torch.set_num_threads(config.threads)
        self.items = [it for it in items if len(it.names)]
        if not self.items:
            raise InputError("no cached training images with targets; run the embedding precompute first")
        self.model, self.cache, self.config, self.device = model.to(device), cache, config, device
        self.family = model_family(model)
        self.prefixes = FAMILY_PREFIXES[self.family]
        self.inputs_dir = None
        if self.family == "samunet_tinyvit":
            if config.multimask_first_click:
                raise InputError("--multimask-first-click does not apply to samunet_tinyvit (one mask token)")
            self.inputs_dir = Path(inputs_dir if inputs_dir is not None else cache.disk_dir)
            missing = [it.source for it in self.items if not model_input_path(self.inputs_dir, it.key[1]).is_file()]
            if missing:
                raise InputError(f"{len(missing)} training image(s) have no stored model input in "
                                 f"{self.inputs_dir / INPUTS_DIR} (e.g. {missing[0]}); rerun `samunet train --model "
                                 "samunet_tinyvit` without --no-encode to store them")
        self.teacher = copy.deepcopy(model).eval() if config.kd_weight > 0 else None
        if self.teacher is not None:
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.params = trainable_parameters(self.model, self.family)
        from samunet_core.train.prompt_sim import propagation_pairs

        self.pairs = propagation_pairs([it.source for it in self.items], [it.input_size for it in self.items])
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=config.lr, weight_decay=config.weight_decay)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.metadata = metadata or {}
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0

    def _param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups, each with an `lr_scale`: for samunet_tinyvit the new modules (CNN branch, adapters, bridges,
        HQ decoder) get `new_parts_lr_scale`, SAM's own heads 1; one group otherwise."""
        if self.family != "samunet_tinyvit" or self.config.new_parts_lr_scale == 1.0:
            return [{"params": self.params, "lr_scale": 1.0}]
        from samunet_core.modeling.samunet_tinyvit import parameter_group

        new, sam = [], []
        for key, param in self.model.named_parameters():
            if param.requires_grad:
                (sam if parameter_group(key) in ("iou_head", "sam_heads") else new).append(param)
        groups = [{"params": new, "lr_scale": self.config.new_parts_lr_scale}]
        return groups + ([{"params": sam, "lr_scale": 1.0}] if sam else [])

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoint.pt"

    def save_checkpoint(self) -> str | None:
        from samunet_core.checkpoints import sha256_of_file

        path = self.checkpoint_path
        if path is None:
            return None
        atomic_torch_save({"step": self.step, "trainable": trained_state(self.model, self.prefixes),
                            "optimizer": self.optimizer.state_dict(), "history": self.history,
                            "train_seconds": self.train_seconds, "config": asdict(self.config)}, path)
        digest = sha256_of_file(path)
        info = {"checkpoint": path.name, "sha256": digest, "step": self.step, "config": asdict(self.config),
                "prompt_schedule": prompt_schedule(self.config), "train_seconds": round(self.train_seconds, 1),
                **self.metadata}
        (path.parent / "checkpoint.json").write_text(json.dumps(info, indent=1) + "\n")
        return digest

    def resume(self) -> bool:
        """Load the run's checkpoint if there is one; True when resumed."""
        import torch

        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if set(blob["trainable"]) != set(trained_state(self.model, self.prefixes)):
            from samunet_core.errors import CheckpointError

            raise CheckpointError(f"{path} is not a {self.family} training checkpoint (its tensors differ); pass "
                                  "--restart or another --run-dir")
        restore_training_state(self, blob)
        return True

    # -- one step -------------------------------------------------------------------------------------------------
    def _decode(self, model: Any, embedding: Any, prompts: Any, mask_input: Any, window: tuple[int, int, int],
                all_masks: bool = False) -> tuple[Any, Any]:
        coords, labels, boxes = prompts.tensors(self.device)
        if isinstance(embedding, dict):  # samunet_tinyvit: `encode`'s cache, full 256 grid
            return model.decode(embedding, coords, labels, boxes, mask_input)
        return decode_window(model, embedding, coords, labels, boxes, mask_input, window, all_masks)

    def _lone_click_round(self, embedding: Any, prompts: Any, target: Any, window: tuple[int, int, int]
                          ) -> tuple[Any, Any]:
        """Round 0 of a points step with `multimask_first_click`: targets prompted by one click are trained on the
        best of the three ambiguity tokens, the others on token 0. Returns (loss parts, Bx1 logits as a user would
        get them: the lone-click targets' token with the highest predicted IoU)."""
        import torch

        from samunet_core.train.losses import ambiguous_click_loss, segmentation_loss

        lone = torch.tensor([len(clicks) == 1 for clicks in prompts.clicks], device=self.device)
        logits, iou_pred = self._decode(self.model, embedding, prompts, None, window, all_masks=True)
        per_target = torch.where(lone, ambiguous_click_loss(logits[:, 1:], iou_pred[:, 1:], target),
                                 ambiguous_click_loss(logits[:, :1], iou_pred[:, :1], target))
        best = 1 + iou_pred[:, 1:].argmax(1)
        pick = torch.where(lone, best, torch.zeros_like(best))
        rows = torch.arange(len(pick), device=self.device)
        chosen, chosen_iou = logits[rows, pick][:, None], iou_pred[rows, pick][:, None]
        parts = segmentation_loss(chosen.detach(), chosen_iou.detach(), target)
        parts.total = per_target.mean()
        return parts, chosen

    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step (deterministic given the seed and `step`). Returns loss parts."""
        import torch

        from samunet_core.train import prompt_sim
        from samunet_core.train.losses import segmentation_loss

        cfg = self.config
        rng = np.random.default_rng([cfg.seed, step])
        if cfg.propagation_fraction > 0 and self.pairs and rng.random() < cfg.propagation_fraction:
            item, masks, prompts, window_masks = self._propagation_targets(rng)
            mode, rounds = "propagate", 0
        else:
            item = self.items[int(rng.integers(len(self.items)))]
            n_targets = len(item.names)
            batch = min(cfg.prompts_per_step, max(2, n_targets))
            chosen = rng.choice(n_targets, size=batch, replace=n_targets < batch)
            masks = window_masks = item.masks[chosen]
            mode = "box" if rng.random() < cfg.box_fraction else "points"
            prompts = prompt_sim.first_prompts(masks, mode, rng, jitter=cfg.box_jitter)
            probs = np.asarray(cfg.round_probs, np.float64)
            rounds = int(rng.choice(len(probs), p=probs / probs.sum()))
        batch = len(masks)
        embedding = self.cache.get(item.key)
        if embedding is None:
            raise RuntimeError(f"embedding of {item.source} missing from the cache; rerun the precompute")
        image_embedding = embedding.tensors["image_embedding"].to(self.device)
        tinyvit = self.family == "samunet_tinyvit"
        if tinyvit or not cfg.crop:
            window = (0, 0, EMBED_GRID)
        else:
            window = crop_window(window_masks, cfg.crop_min_tokens, cfg.crop_margin_px)
        x = load_model_input(self.inputs_dir, item.key[1]).to(self.device) if tinyvit else None
        r0, c0, side = (4 * v for v in window)
        target = torch.as_tensor(masks[:, r0:r0 + side, c0:c0 + side], device=self.device)
        teacher_logits = None
        # fusion "inside" (SAMUNetTinyViT) runs TinyViT with the CNN injections, gradient through it: no cached E
        cached_e = image_embedding if getattr(self.model, "fusion", "after") == "after" else None
        with training_autocast(self.device):  # bf16 on CUDA, nothing on the CPU
            if self.teacher is not None and mode == "box":
                with torch.no_grad():
                    source = self.teacher.encode(x, cached_e) if tinyvit else image_embedding
                    teacher_logits, _ = self._decode(self.teacher, source, prompts, None, window)
            self.model.train()
            if tinyvit:  # once per step, with gradient into the CNN branch and fusion; every round decodes against it
                image_embedding = self.model.encode(x, cached_e)
            mask_input = None
            losses = []
            for r in range(rounds + 1):
                if r == 0 and mode == "points" and cfg.multimask_first_click:
                    parts, logits = self._lone_click_round(image_embedding, prompts, target, window)
                    losses.append(parts)
                elif not cfg.loss_every_round and r < rounds:
                    with torch.no_grad():
                        logits, _ = self._decode(self.model, image_embedding, prompts, mask_input, window)
                else:
                    logits, iou_pred = self._decode(self.model, image_embedding, prompts, mask_input, window)
                    losses.append(segmentation_loss(logits, iou_pred, target, teacher_logits if r == 0 else None,
                                                    cfg.kd_weight))
                if r < rounds:
                    full = paste_window(logits.detach(), window)
                    prompt_sim.add_corrections(prompts, (full[:, 0] > 0).cpu().numpy(), masks, item.input_size, rng)
                    mask_input = full
            parts = losses[-1]
            total = sum(part.total for part in losses) / len(losses)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, step) * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.model.eval()
        return {"step": step, "loss": float(total.detach()), "focal": parts.focal, "dice": parts.dice,
                "iou_mse": parts.iou_mse, "kd": parts.kd, "iou": parts.iou, "rounds": rounds,
                "box": float(mode == "box"), "propagate": float(mode == "propagate"), "batch": batch}

    def _propagation_targets(self, rng: np.random.Generator) -> tuple[CachedItem, np.ndarray, Any, np.ndarray]:
        """One propagation step's data: a (prev, next) slice pair, up to `prompts_per_step` of prev's structures.
        Returns (next slice's item, Bx256x256 targets on it (empty where the structure ended), the walk's box prompts
        from prev's masks, the masks the crop window must cover)."""
        from samunet_core.train import prompt_sim

        prev_index, next_index = self.pairs[int(rng.integers(len(self.pairs)))]
        prev, nxt = self.items[prev_index], self.items[next_index]
        n_targets = len(prev.names)
        batch = min(self.config.prompts_per_step, n_targets)
        chosen = rng.choice(n_targets, size=batch, replace=False)
        prev_masks = prev.masks[chosen]
        index = {name: i for i, name in enumerate(nxt.names)}
        targets = np.zeros_like(prev_masks)
        for row, c in enumerate(chosen):
            j = index.get(prev.names[c])
            if j is not None:
                targets[row] = nxt.masks[j]
        prompts = prompt_sim.propagation_prompts(prev_masks)
        return nxt, targets, prompts, np.concatenate([prev_masks, targets])

    def run(self, progress: bool = True, stop_after_s: float | None = None) -> list[dict[str, float]]:
        """Train from the current step to `config.steps`, checkpointing; returns the history."""
        return run_steps(self, progress, stop_after_s)


def restore_training_state(trainer: Any, blob: dict[str, Any]) -> None:
    """Put a checked training checkpoint back: its trained tensors into `trainer.model` (strictly, with the rest of the
    model's own state), the optimizer state, the step, the history and the training time."""
    state = trainer.model.state_dict()
    state.update(blob["trainable"])
    trainer.model.load_state_dict(state, strict=True)
    trainer.optimizer.load_state_dict(blob["optimizer"])
    trainer.step, trainer.history = int(blob["step"]), list(blob["history"])
    trainer.train_seconds = float(blob.get("train_seconds", 0.0))


def run_steps(trainer: Any, progress: bool = True, stop_after_s: float | None = None) -> list[dict[str, float]]:
    """The step loop every trainer shares: `trainer.train_step(step)` from `trainer.step` to `trainer.config.steps`
    with a tqdm bar (EMA of the loss), the history and the training time kept, a checkpoint every
    `config.checkpoint_every` steps and at the end; stops early after `stop_after_s`. Returns the history."""
    from tqdm import tqdm

    cfg = trainer.config
    ema = None
    started = time.perf_counter()
    with tqdm(total=cfg.steps, initial=trainer.step, desc="train", unit="step", disable=not progress) as bar:
        while trainer.step < cfg.steps:
            t0 = time.perf_counter()
            record = trainer.train_step(trainer.step)
            trainer.train_seconds += time.perf_counter() - t0
            trainer.history.append(record)
            trainer.step += 1
            ema = record["loss"] if ema is None else 0.9 * ema + 0.1 * record["loss"]
            bar.set_postfix(loss=f"{ema:.3f}", iou=f"{record['iou']:.2f}")
            bar.update(1)
            if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
                trainer.save_checkpoint()
            if stop_after_s is not None and time.perf_counter() - started > stop_after_s:
                break
    if cfg.checkpoint_every:
        trainer.save_checkpoint()
    return trainer.history


def resume_or_run(trainer: Any, args: Any) -> list[dict[str, float]]:
    """What `samunet train` does with a trainer, for every family: resume its checkpoint unless --restart, then train
    to the end (or --time-limit-min), or with --export-only just take the checkpoint's history. Returns the history."""
    from samunet_core.errors import InputError

    if not args.restart and trainer.resume():
        print(f"resumed {trainer.checkpoint_path} at step {trainer.step}")
    elif args.export_only:
        raise InputError(f"--export-only needs a checkpoint in {args.run_dir}")
    if args.export_only:
        return trainer.history
    stop = None if args.time_limit_min is None else 60 * args.time_limit_min
    return trainer.run(progress=not args.no_progress, stop_after_s=stop)


def loss_summary(history: list[dict[str, float]]) -> dict[str, float | None]:
    """{"loss_first_25", "loss_last_25"}: the mean loss of the first and the last 25 steps of a run's history."""

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    return {"loss_first_25": mean([h["loss"] for h in history[:25]]),
            "loss_last_25": mean([h["loss"] for h in history[-25:]])}
