"""Batch jobs: which volumes, with which prompt file, to which output; running one; the end-of-batch summary.

The serial `samunet batch` and every cluster worker (samunet_core/cluster.py) run a volume through `run_batch_job`,
so their outputs are the same file for file. A job list comes from folders (`plan_from_inputs`) or from a job file
(`read_job_file`: CSV or JSON rows of volume, prompts, output[, overlay]).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samunet_core.errors import InputError, SamunetError

PROMPTS_SUFFIX = ".prompts.json"
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg")
JOB_FILE_COLUMNS = ("volume", "prompts", "output")  # required; "overlay" is optional


@dataclass(frozen=True)
class BatchJob:
    """One volume to segment. `prompts` None: no prompt file was found (`missing_prompts` says where it was looked
    for), and the job fails with that message when it runs, without stopping the others."""

    volume: str
    prompts: str | None
    output: str
    overlay: str | None = None
    missing_prompts: str = ""

    @property
    def name(self) -> str:
        return Path(self.volume).name


@dataclass
class Outcome:
    """What became of one job: status "done", "skipped" or "failed"; `attempts` > 1 when a worker died under it."""

    volume: str
    status: str
    message: str = ""
    seconds: float = 0.0
    attempts: int = 1
    worker: str = ""


def stem(path: str | os.PathLike) -> str:
    """Volume name without its (double) extension: CT1.nii.gz -> CT1; a DICOM folder keeps its name."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# ---------------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------------
def _is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(VOLUME_SUFFIXES) and not name.endswith(PROMPTS_SUFFIX)


def _is_dicom_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    return any(child.is_file() and (child.suffix.lower() == ".dcm" or _has_dicm_magic(child))
               for child in path.iterdir())


def _has_dicm_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def find_volumes(inputs: Sequence[str | os.PathLike]) -> list[Path]:
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
        inside = [c for c in sorted(path.iterdir()) if _is_volume_file(c) or _is_dicom_folder(c)]
        if not inside:
            raise InputError(f"folder {path} holds no volume files or DICOM series to segment")
        found += inside
    unique: list[Path] = []
    seen: set[Path] = set()
    for path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def prompts_for(volume: Path, prompts: str | None, prompts_dir: str | None) -> tuple[Path | None, str]:
    """(the prompt file of one volume, "") or (None, a message naming where it was looked for).

    One file for all (`prompts`), else `<stem>.prompts.json` in `prompts_dir`, else beside the volume (for a DICOM
    folder also inside it)."""
    if prompts:
        return Path(prompts), ""
    name = stem(volume) + PROMPTS_SUFFIX
    candidates = [Path(prompts_dir) / name] if prompts_dir else [volume.parent / name]
    if volume.is_dir() and not prompts_dir:
        candidates.append(volume / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate, ""
    return None, (f"no prompt file for {volume}: looked for {', '.join(str(c) for c in candidates)}; give "
                  "--prompts for all volumes or write one per volume")


def plan_from_inputs(inputs: Sequence[str | os.PathLike], output_dir: str | os.PathLike, output_format: str, *,
                     prompts: str | None = None, prompts_dir: str | None = None,
                     overlays: bool = False) -> list[BatchJob]:
    """Jobs for volume files / DICOM folders / folders of either: outputs `output_dir/<stem><output_format>`."""
    if prompts and not Path(prompts).is_file():
        raise InputError(f"prompt file {prompts} does not exist; check the path")
    if prompts_dir and not Path(prompts_dir).is_dir():
        raise InputError(f"--prompts-dir {prompts_dir} is not a folder")
    out_dir = Path(output_dir)
    jobs = []
    for volume in find_volumes(inputs):
        found, missing = prompts_for(volume, prompts, prompts_dir)
        output = out_dir / f"{stem(volume)}{output_format}"
        overlay = out_dir / f"{stem(volume)}_overlay.png" if overlays else None
        jobs.append(BatchJob(str(volume), str(found) if found else None, str(output),
                             str(overlay) if overlay else None, missing))
    return jobs


def read_job_file(path: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> list[BatchJob]:
    """Jobs from a CSV file (header row with the columns volume, prompts, output[, overlay]) or a JSON file (a list of
    objects with those keys, or {"jobs": [...]}). Relative volume and prompt paths are relative to the job file's
    folder; relative outputs to `output_dir` when given, else to the job file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"job file {path} does not exist; check the path")
    base = path.parent
    out_base = Path(output_dir) if output_dir is not None else base
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data.get("jobs") if isinstance(data, dict) else data
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise InputError(f"job file {path}: expected a list of objects with the keys "
                                 f"{', '.join(JOB_FILE_COLUMNS)} (or {{\"jobs\": [...]}})")
        elif path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            raise InputError(f"job file {path}: give a .csv or .json file (columns {', '.join(JOB_FILE_COLUMNS)})")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"job file {path} cannot be read ({exc}); fix its format") from exc
    if not rows:
        raise InputError(f"job file {path} lists no jobs")
    jobs = []
    for number, row in enumerate(rows, start=1):
        missing = [c for c in JOB_FILE_COLUMNS if not str(row.get(c) or "").strip()]
        if missing:
            raise InputError(f"job file {path}, job {number}: no {', '.join(missing)}; every job needs "
                             f"{', '.join(JOB_FILE_COLUMNS)}")

        def under(folder: Path, value: str) -> str:
            return str(Path(value) if Path(value).is_absolute() else folder / value)

        overlay = str(row.get("overlay") or "").strip()
        volume, prompts = under(base, str(row["volume"]).strip()), under(base, str(row["prompts"]).strip())
        if not Path(volume).exists():
            raise InputError(f"job file {path}, job {number}: volume {volume} does not exist; check the path")
        jobs.append(BatchJob(volume, prompts, under(out_base, str(row["output"]).strip()),
                             under(out_base, overlay) if overlay else None))
    return jobs


def check_outputs_distinct(jobs: Sequence[BatchJob]) -> None:
    """InputError when two jobs would write the same file."""
    seen: dict[str, str] = {}
    for job in jobs:
        for out in filter(None, (job.output, job.overlay)):
            key = os.path.normcase(os.path.abspath(out))
            if key in seen:
                raise InputError(f"{seen[key]} and {job.volume} would both write {out}; give them different outputs "
                                 "(or segment them in separate batches)")
            seen[key] = job.volume


def is_finished(job: BatchJob) -> bool:
    """A job is done when its output exists (and its overlay, when one is asked for): outputs appear atomically."""
    return Path(job.output).exists() and (job.overlay is None or Path(job.overlay).exists())


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------
def run_batch_job(job: BatchJob, predictor: Any, *, cache: Any = None, window: tuple[float, float] | None = None,
                  preset: str | None = None) -> Outcome:
    """Segment one job and write its outputs atomically; any error becomes a "failed" Outcome (never raises for a
    bad volume, so one broken file does not end a batch)."""
    from samunet_core.segment import prepare_job, run_job

    t0 = time.perf_counter()
    remove_partials(job)
    try:
        if job.prompts is None:
            raise InputError(job.missing_prompts)
        prepared = prepare_job(job.volume, job.prompts, job.output, job.overlay)
        result = run_job(prepared, predictor, cache=cache, window=window, preset=preset)
        return Outcome(job.volume, "done", ", ".join(str(p) for p in result.outputs), time.perf_counter() - t0)
    except SamunetError as exc:
        return Outcome(job.volume, "failed", str(exc), time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - one broken volume must not end the batch; it is reported
        return Outcome(job.volume, "failed", f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)


def remove_partials(job: BatchJob) -> list[Path]:
    """Delete the temporary files a killed process left while writing this job's outputs (they never replace an
    output; see samunet_core.io.atomic). Returns what was removed."""
    from samunet_core.io.atomic import partial_files

    removed = []
    for out in filter(None, (job.output, job.overlay)):
        for leftover in partial_files(out):
            try:
                leftover.unlink()
                removed.append(leftover)
            except FileNotFoundError:
                pass
    return removed


def summarise(outcomes: Sequence[Outcome], where: str, interrupted: bool = False) -> int:
    """Print the end-of-batch summary; 130 when interrupted, 1 if any volume failed, else 0."""
    done = [o for o in outcomes if o.status == "done"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    failed = [o for o in outcomes if o.status == "failed"]
    seconds = sum(o.seconds for o in done)
    per = f", {seconds / len(done):.1f} s per volume" if done else ""
    print(f"batch: {len(done)} segmented, {len(skipped)} skipped (already done), {len(failed)} failed{per}")
    for o in done:
        retried = f" (attempt {o.attempts}: a worker died under an earlier one)" if o.attempts > 1 else ""
        print(f"  done    {o.volume} -> {o.message}{retried}")
    for o in skipped:
        print(f"  skipped {o.volume}: {o.message}")
    for o in failed:
        print(f"  FAILED  {o.volume}: {o.message}")
    if interrupted:
        print("batch: interrupted; finished outputs are kept and no partial output is left: run the same command "
              "again to resume")
    print(f"outputs are in {where}")
    if interrupted:
        return 130
    return 1 if failed else 0
