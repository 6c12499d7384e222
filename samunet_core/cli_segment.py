"""`samunet segment INPUT --prompts P.json --output OUT`: segment one image or volume from a prompt file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from samunet_core.errors import InputError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `segment` and `batch`: model, device, window, cache."""
    from samunet_core.registry import DEFAULT_MODEL
    from samunet_core.transforms import CT_PRESETS

    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"registered model name (see `samunet models`; default: {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint", default=None, help="weights file for the model (default: the registry's)")
    parser.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu or cuda")
    add_runtime_argument(parser)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--window", nargs=2, type=float, metavar=("LO", "HI"),
                       help="intensity window mapped to 0..255 (default: 8-bit data as it is, else the 0.5/99.5 "
                            "percentiles of the volume)")
    group.add_argument("--preset", choices=sorted(CT_PRESETS), help="CT window preset")
    parser.add_argument("--cache-dir", default=None,
                        help="folder where slice embeddings persist between runs (default $SAMUNET_CACHE_DIR or "
                             "~/.cache/samunet); 'none' keeps them in memory only")
    parser.add_argument("--server", default=None, metavar="URL",
                        help="compute on a `samunet serve` server (http[s]://host:port) instead of this computer")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="file holding the server's bearer token (with --server)")


def add_runtime_argument(parser: argparse.ArgumentParser) -> None:
    """--runtime, the same on every command that encodes (samunet_core/runtime.py decides what auto means)."""
    from samunet_core.runtime import RUNTIME_CHOICES, runtime_help

    parser.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES, help=runtime_help())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="NIfTI/NRRD volume, DICOM series folder, or PNG/JPEG image")
    parser.add_argument("--prompts", required=True, help="prompt file (JSON; format in docs/formats.md)")
    parser.add_argument("--output", required=True,
                        help="output file; its extension picks the format: .seg.nrrd, .nii.gz/.nii/.nrrd labelmap, "
                             ".png (2D input), .dcm (DICOM SEG, DICOM series input); see docs/formats.md")
    parser.add_argument("--overlay", default=None, help="also write a PNG of the prompted slice(s) with contours")
    parser.add_argument("--edit", default=None, metavar="EXISTING",
                        help="correct this segmentation (.seg.nrrd, labelmap or DICOM SEG): the prompt file's "
                             "segments are changed on their prompted slices (each segment's \"mode\": add, the "
                             "default for an existing segment, remove or replace; docs/formats.md), every other "
                             "segment is kept as it is")
    add_model_arguments(parser)


def build_cache(cache_dir: str | None) -> Any:
    """EmbeddingCache persisting to `cache_dir` (default folder when None, memory only for 'none')."""
    from samunet_core.cache import EmbeddingCache, folder_cache
    from samunet_core.segment import default_cache_dir

    if cache_dir is not None and cache_dir.lower() == "none":
        return EmbeddingCache()
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the embedding cache folder {folder} ({exc.strerror}); give --cache-dir "
                         "another folder or 'none'") from exc
    return folder_cache(folder)


def load_model(args: argparse.Namespace) -> Any:
    """The local Predictor, or with --server a RemoteClient (the server's model then decides)."""
    if getattr(args, "server", None):
        from samunet_core.remote import RemoteClient, read_token

        return RemoteClient(args.server, read_token(args.token_file))
    from samunet_core.predictor import load_predictor

    return load_predictor(args.model, device=args.device, checkpoint=args.checkpoint, runtime=args.runtime)




def window_args(args: argparse.Namespace) -> dict[str, Any]:
    window = tuple(args.window) if args.window else None
    if window is not None and not window[1] > window[0]:
        raise InputError(f"--window {window[0]:g} {window[1]:g}: HI must be above LO")
    return {"window": window, "preset": args.preset}


def report(result: Any, predictor: Any, prog: str = "samunet segment") -> None:
    """Print warnings, what was segmented and where the outputs are."""
    for warning in result.warnings:
        print(f"{prog}: warning: {warning}")
    window = "as stored (8-bit)" if result.window is None else f"{result.window[0]:g}..{result.window[1]:g}"
    print(f"segmented {result.volume.path} with {predictor.model_id} on {predictor.device} ({predictor.runtime}) in "
          f"{result.seconds:.1f} s "
          f"({result.encodes} slices encoded, window {window})")
    for seg in result.segmentation.segments:
        if seg.name in result.slice_masks:
            n = int(result.slice_masks[seg.name].any(axis=(1, 2)).sum())
            print(f"  {seg.name}: {int(seg.mask.sum())} voxels on {n} slices")
    for path in result.outputs:
        print(f"wrote {Path(path).resolve()}")


def run(args: argparse.Namespace) -> int:
    from samunet_core.segment import prepare_job, run_job

    windowing = window_args(args)
    job = prepare_job(args.input, args.prompts, args.output, args.overlay, args.edit)  # before the model loads
    predictor = load_model(args)
    result = run_job(job, predictor, cache=build_cache(args.cache_dir), **windowing)
    report(result, predictor)
    return 0
