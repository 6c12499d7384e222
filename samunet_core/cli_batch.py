"""`samunet batch INPUTS... --output-dir DIR`: segment many volumes, resumably.

Inputs are volume files, DICOM series folders, or folders holding either (searched one level deep). Prompts: one
file for all (`--prompts P.json`), or one per volume: `<stem>.prompts.json` in `--prompts-dir`, else beside the
volume (for a DICOM folder: `<folder name>.prompts.json` beside or inside it). Outputs are `DIR/<stem><--format>`;
an existing output is skipped (a rerun resumes) unless `--force`. A volume that fails is reported and the batch goes
on; the summary at the end lists every failure and the exit status is 1 if any volume failed. Embeddings persist in
the disk cache, so a rerun encodes nothing it has seen.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from samunet_core.cli_segment import add_model_arguments, build_cache, load_model, window_args
from samunet_core.errors import InputError, SamunetError

PROMPTS_SUFFIX = ".prompts.json"
_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="volume files, DICOM series folders, or folders of either")
    parser.add_argument("--output-dir", required=True, help="folder for the outputs (created if missing)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", default=None,
                        help="one prompt file for every volume (JSON; format in docs/formats.md)")
    source.add_argument("--prompts-dir", default=None,
                        help=f"folder of per-volume prompt files named <volume-stem>{PROMPTS_SUFFIX} (default: "
                             "beside each volume)")
    parser.add_argument("--format", default=".seg.nrrd", choices=(".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".dcm"),
                        help="output format (default .seg.nrrd)")
    parser.add_argument("--overlays", action="store_true", help="also write DIR/<stem>_overlay.png")
    parser.add_argument("--force", action="store_true", help="redo volumes whose output already exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)


def stem(path: Path) -> str:
    """Volume name without its (double) extension: CT1.nii.gz -> CT1; a DICOM folder keeps its name."""
    name = path.name
    for suffix in _VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(_VOLUME_SUFFIXES) and not name.endswith(PROMPTS_SUFFIX)


def _is_dicom_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    for child in path.iterdir():
        if child.is_file() and (child.suffix.lower() == ".dcm" or _has_dicm_magic(child)):
            return True
    return False


def _has_dicm_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def find_volumes(inputs: list[str]) -> list[Path]:
    """Expand the inputs into volume files and DICOM series folders (sorted within each folder, duplicates
    dropped). InputError for an input that does not exist or a folder with nothing to segment."""
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise InputError(f"input {path} does not exist; check the path")
        if path.is_file() or _is_dicom_folder(path):
            found.append(path)
            continue
        children = sorted(path.iterdir())
        inside = [c for c in children if _is_volume_file(c) or _is_dicom_folder(c)]
        if not inside:
            raise InputError(f"folder {path} holds no volume files or DICOM series to segment")
        found += inside
    unique: list[Path] = []
    for path in found:
        if path.resolve() not in {p.resolve() for p in unique}:
            unique.append(path)
    return unique


def prompts_for(volume: Path, args: argparse.Namespace) -> Path:
    """The prompt file of one volume (see the module doc); InputError naming where it was looked for."""
    if args.prompts:
        return Path(args.prompts)
    name = stem(volume) + PROMPTS_SUFFIX
    candidates = [Path(args.prompts_dir) / name] if args.prompts_dir else [volume.parent / name]
    if volume.is_dir() and not args.prompts_dir:
        candidates.append(volume / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InputError(f"no prompt file for {volume}: looked for {', '.join(str(c) for c in candidates)}; give "
                     "--prompts for all volumes or write one per volume")


@dataclass
class Outcome:
    volume: Path
    status: str  # "done", "skipped", "failed"
    message: str = ""
    seconds: float = 0.0


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from samunet_core.segment import prepare_job, run_job

    windowing = window_args(args)
    volumes = find_volumes(args.inputs)
    if args.prompts and not Path(args.prompts).is_file():
        raise InputError(f"prompt file {args.prompts} does not exist; check the path")
    if args.prompts_dir and not Path(args.prompts_dir).is_dir():
        raise InputError(f"--prompts-dir {args.prompts_dir} is not a folder")
    out_dir = Path(args.output_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {out_dir} ({exc.strerror}); choose another") from exc
    stems = [stem(v) for v in volumes]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise InputError(f"several inputs share the name(s) {', '.join(clashes)} and would write the same output; "
                         "segment them in separate batches")
    todo = [v for v in volumes if args.force or not (out_dir / f"{stem(v)}{args.format}").exists()]
    # A wrong model or checkpoint would fail every volume: it is an error of the whole batch (exit 2).
    predictor = load_model(args) if todo else None
    cache = build_cache(args.cache_dir)
    outcomes: list[Outcome] = []
    with tqdm(volumes, desc="batch", unit="volume", disable=args.no_progress) as bar:
        for volume in bar:
            bar.set_postfix_str(volume.name)
            output = out_dir / f"{stem(volume)}{args.format}"
            overlay = out_dir / f"{stem(volume)}_overlay.png" if args.overlays else None
            if output.exists() and not args.force:
                outcomes.append(Outcome(volume, "skipped", f"{output} exists (use --force to redo)"))
                continue
            t0 = time.perf_counter()
            try:
                job = prepare_job(volume, prompts_for(volume, args), output, overlay)
                result = run_job(job, predictor, cache=cache, **windowing)
                outcomes.append(Outcome(volume, "done", ", ".join(str(p) for p in result.outputs),
                                        time.perf_counter() - t0))
            except SamunetError as exc:
                outcomes.append(Outcome(volume, "failed", str(exc), time.perf_counter() - t0))
                tqdm.write(f"samunet batch: {volume}: failed: {exc}")
            except Exception as exc:  # noqa: BLE001 - one broken volume must not end the batch; reported below
                outcomes.append(Outcome(volume, "failed", f"{type(exc).__name__}: {exc}", time.perf_counter() - t0))
                tqdm.write(f"samunet batch: {volume}: failed: {type(exc).__name__}: {exc}")
    return summarise(outcomes, out_dir)


def summarise(outcomes: list[Outcome], out_dir: Path) -> int:
    """Print the end-of-batch summary; 1 if any volume failed, else 0."""
    done = [o for o in outcomes if o.status == "done"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    failed = [o for o in outcomes if o.status == "failed"]
    seconds = sum(o.seconds for o in done)
    per = f", {seconds / len(done):.1f} s per volume" if done else ""
    print(f"batch: {len(done)} segmented, {len(skipped)} skipped (already done), {len(failed)} failed{per}")
    for o in done:
        print(f"  done    {o.volume} -> {o.message}")
    for o in skipped:
        print(f"  skipped {o.volume}: {o.message}")
    for o in failed:
        print(f"  FAILED  {o.volume}: {o.message}")
    print(f"outputs are in {out_dir.resolve()}")
    return 1 if failed else 0
