"""`samunet eval MANIFEST --protocol P --out DIR`: accuracy protocols over an evaluation manifest."""

from __future__ import annotations

import argparse

PROTOCOL_CHOICES = ("box", "point1", "point3", "point5", "propagate", "interactive3d")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from samunet_core.cli_segment import add_runtime_argument
    from samunet_core.registry import DEFAULT_MODEL

    parser.add_argument("manifest", help="evaluation manifest (JSON; format in docs/formats.md)")
    parser.add_argument("--protocol", required=True, choices=PROTOCOL_CHOICES,
                        help="box: tight box of the largest component; pointN: N simulated clicks; "
                             "propagate: box on the largest slice carried through 3D volumes; interactive3d: a start "
                             "box, then clicks at the centre of the largest 3D error (3D volumes)")
    parser.add_argument("--out", required=True,
                        help="output folder for results.csv, summary.json and overlays/ (columns and keys in "
                             "docs/formats.md)")
    parser.add_argument("--start", default=None, metavar="{box3d,box2d}",
                        help="interactive3d: the start prompt, the label's 3D bounding box (box3d, default) or the 2D "
                             "box on its largest axial slice, propagated (box2d)")
    parser.add_argument("--clicks", type=int, default=None, metavar="N",
                        help="interactive3d: corrective clicks after the start prompt, 0 to 50 (default 5)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint", default=None, help="weights file for models that take a user checkpoint")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    add_runtime_argument(parser)
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N cases")
    parser.add_argument("--slice-stride", type=int, default=1, metavar="K",
                        help="3D cases: only axial slices k with k %% K == 0 (default 1: every slice)")
    parser.add_argument("--overlays", type=int, default=0, metavar="N",
                        help="write PNGs of the N lowest-Dice targets to OUT/overlays/")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="keep slice embeddings on disk here; reruns (other protocols, models sharing the encoder) "
                             "then skip the encoder")
    parser.add_argument("--fp16-embeddings", action="store_true",
                        help="decode from embeddings rounded to fp16, as an fp16 embedding cache stores them")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from samunet_core.errors import InputError
    from samunet_core.eval_interactive import options
    from samunet_core.evaluate import evaluate
    from samunet_core.manifest import load_manifest
    from samunet_core.predictor import load_predictor

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.overlays < 0:
        raise InputError(f"--overlays must be >= 0, got {args.overlays}")
    options(args.protocol, args.start, args.clicks)  # before the manifest and the model load
    manifest = load_manifest(args.manifest)
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    cache = None
    if args.cache_dir:
        from samunet_core.cache import EmbeddingCache

        cache = EmbeddingCache(max_bytes=256 * 1024 * 1024, disk_dir=args.cache_dir)
    predictor = load_predictor(args.model, device=args.device, checkpoint=args.checkpoint, runtime=args.runtime)
    summary = evaluate(manifest, predictor, args.protocol, Path(args.out), manifest_path=str(args.manifest),
                       limit=args.limit, slice_stride=args.slice_stride, overlays=args.overlays,
                       progress=not args.no_progress, cache=cache,
                       fp16_embeddings=args.fp16_embeddings, start=args.start, clicks=args.clicks)
    print(f"{summary['model']} ({predictor.runtime}) {summary['protocol']}: {summary['n_targets']} targets, mean Dice "
          f"{summary['mean_dice']:.4f}, mean NSD {summary['mean_nsd']:.4f} ({summary['wall_s']:.0f} s)")
    for modality, stats in summary["by_modality"].items():
        print(f"  {modality}: n={stats['n']} Dice {stats['mean_dice']:.4f} NSD {stats['mean_nsd']:.4f}")
    if "mean_dice_per_step" in summary:
        steps = " ".join(f"{d:.4f}" for d in summary["mean_dice_per_step"])
        print(f"  start {summary['start']}, {summary['clicks']} clicks: mean Dice per step (0 = start) {steps}; "
              f"DSC_AUC {summary['dsc_auc']:.4f}, DSC_Final {summary['dsc_final']:.4f}")
        print(f"  prompt files of every step: {Path(args.out) / 'prompts'}")
    print(f"wrote {Path(args.out) / 'results.csv'} and {Path(args.out) / 'summary.json'}")
    return 0
