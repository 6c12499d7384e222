"""`samunet batch INPUTS... --output-dir DIR` or `samunet batch --jobs FILE`: segment many volumes, resumably.

Inputs are volume files, DICOM series folders, or folders holding either (searched one level deep). Prompts: one
file for all (`--prompts P.json`), or one per volume: `<stem>.prompts.json` in `--prompts-dir`, else beside the
volume (for a DICOM folder: `<folder name>.prompts.json` beside or inside it). Outputs are `DIR/<stem><--format>`.
A job file (`--jobs jobs.csv|jobs.json`) names volume, prompts and output (and optionally overlay) per row instead.
An existing output is skipped (a rerun resumes) unless `--force`. A volume that fails is reported and the batch goes
on; the summary at the end lists every failure and the exit status is 1 if any volume failed (130 after Ctrl-C).
Embeddings persist in the disk cache, so a rerun encodes nothing it has seen.

`--cluster local:N | dask:ADDRESS` runs one task per volume on Dask workers that keep the model loaded
(samunet_core/cluster.py); every volume goes through the same `batch.run_batch_job` as here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from samunet_core.batch import (
    BatchJob,
    Outcome,
    check_outputs_distinct,
    is_finished,
    plan_from_inputs,
    read_job_file,
    run_batch_job,
    summarise,
)
from samunet_core.cli_segment import add_model_arguments, build_cache, load_model, window_args
from samunet_core.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="volume files, DICOM series folders, or folders of either")
    parser.add_argument("--jobs", default=None, metavar="FILE",
                        help="a job file instead of INPUTS: CSV with the columns volume,prompts,output[,overlay] or "
                             "JSON [{\"volume\": ..., \"prompts\": ..., \"output\": ...}]; relative paths are relative "
                             "to the job file (outputs to --output-dir when given)")
    parser.add_argument("--output-dir", default=None, help="folder for the outputs (created if missing)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", default=None,
                        help="one prompt file for every volume (JSON; format in docs/formats.md)")
    source.add_argument("--prompts-dir", default=None,
                        help="folder of per-volume prompt files named <volume-stem>.prompts.json (default: beside "
                             "each volume)")
    parser.add_argument("--format", default=".seg.nrrd", choices=(".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".dcm"),
                        help="output format (default .seg.nrrd)")
    parser.add_argument("--overlays", action="store_true", help="also write DIR/<stem>_overlay.png")
    parser.add_argument("--force", action="store_true", help="redo volumes whose output already exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from samunet_core.cluster import CLUSTER_HELP

    parser.add_argument("--cluster", default=None, metavar="SPEC", help=CLUSTER_HELP)
    parser.add_argument("--worker-threads", type=int, default=None, metavar="T",
                        help="model threads per cluster worker (default: local:N shares this computer's cores out "
                             "between the N workers; dask:ADDRESS uses each worker's default)")
    add_model_arguments(parser)


def plan(args: argparse.Namespace) -> list[BatchJob]:
    """The jobs the arguments name (InputError for a bad combination or path); output folders created."""
    if args.jobs and args.inputs:
        raise InputError("give either volumes/folders or --jobs FILE, not both")
    if args.jobs:
        if args.prompts or args.prompts_dir or args.overlays:
            raise InputError("--jobs FILE names each job's prompt file (and overlay); drop --prompts, --prompts-dir "
                             "and --overlays")
        jobs = read_job_file(args.jobs, args.output_dir)
    elif not args.inputs:
        raise InputError("nothing to segment: give volumes or folders (with --output-dir), or --jobs FILE")
    elif not args.output_dir:
        raise InputError("give --output-dir DIR: the folder the outputs go to")
    else:
        jobs = plan_from_inputs(args.inputs, args.output_dir, args.format, prompts=args.prompts,
                                prompts_dir=args.prompts_dir, overlays=args.overlays)
    check_outputs_distinct(jobs)
    for folder in sorted({Path(p).parent for job in jobs for p in (job.output, job.overlay) if p}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the output folder {folder} ({exc.strerror}); choose another") from exc
    return jobs


def run(args: argparse.Namespace) -> int:
    windowing = window_args(args)
    spec = None
    if args.cluster:
        from samunet_core.cluster import parse_cluster

        spec = parse_cluster(args.cluster)  # a bad spec is an error before anything else
    jobs = plan(args)
    skipped = {job.volume: Outcome(job.volume, "skipped", f"{job.output} exists (use --force to redo)")
               for job in jobs if not args.force and is_finished(job)}
    todo = [job for job in jobs if job.volume not in skipped]
    where = str(Path(args.output_dir).resolve()) if args.output_dir else "the paths the job file names"
    if spec is not None:
        done, interrupted = _run_on_cluster(todo, spec, args, windowing)
    else:
        done, interrupted = _run_here(todo, args, windowing)
    by_volume = {**skipped, **{o.volume: o for o in done}}
    return summarise([by_volume[job.volume] for job in jobs if job.volume in by_volume], where, interrupted)


def _run_here(todo: list[BatchJob], args: argparse.Namespace, windowing: dict) -> tuple[list[Outcome], bool]:
    from tqdm import tqdm

    if args.worker_threads is not None:
        raise InputError("--worker-threads is for --cluster; without it the batch uses this computer's threads")
    # A wrong model or checkpoint would fail every volume: it is an error of the whole batch (exit 2).
    predictor = load_model(args) if todo else None
    cache = build_cache(args.cache_dir)
    outcomes: list[Outcome] = []
    try:
        with tqdm(todo, desc="batch", unit="volume", disable=args.no_progress) as bar:
            for job in bar:
                bar.set_postfix_str(job.name)
                outcome = run_batch_job(job, predictor, cache=cache, **windowing)
                if outcome.status == "failed":
                    tqdm.write(f"samunet batch: {job.volume}: failed: {outcome.message}")
                outcomes.append(outcome)
    except KeyboardInterrupt:
        return outcomes, True
    return outcomes, False


def _run_on_cluster(todo: list[BatchJob], spec: Any, args: argparse.Namespace, windowing: dict
                    ) -> tuple[list[Outcome], bool]:
    from samunet_core import __version__
    from samunet_core.cluster import ModelConfig, run_batch_on_cluster

    if args.server:
        raise InputError("--cluster and --server both say where to compute; give one")
    if args.worker_threads is not None and args.worker_threads < 1:
        raise InputError("--worker-threads must be 1 or more")
    if not todo:
        return [], False
    config = ModelConfig(args.model, args.checkpoint, args.device, args.runtime, args.cache_dir, windowing["window"],
                         windowing["preset"], args.worker_threads, __version__)
    return run_batch_on_cluster(todo, spec, config, progress=not args.no_progress)
