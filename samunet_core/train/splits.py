"""The fixed training / validation split (see docs/training.md).

Rules: a split is by patient, volume or subject, never by slices of one volume. Within each source of the training
pool, the split unit ids are sorted and shuffled with `random.Random(SEED)`; the first `VAL_COUNTS[source]` units go
to validation, the next `TRAIN_COUNTS[source]` (a compute budget on a 2-core CPU; None = all the rest) to training.

- hc18: unit = subject (the number before `_`: `108_HC` and `108_2HC` are one subject).
- hvsmr: unit = patient (the number before `_`).
- chasedb1: unit = child (`Image_10L` and `Image_10R` are child 10).
- dsb2018, kvasir: unit = image (no patient id exists).
- CT volumes of the shared evaluation manifest: `totalseg/example_ct` and `totalseg/example_ct_dicom` train
  (`example_ct_sm` is the top 30 slices of `example_ct`: same patient, so it is never on the validation side; its
  slices are already in `example_ct`, so it is not used twice); `slicerio/ctchest`, `dcmqi/ct3slice` and the four
  `sam_med2d` CT images validate. These are all the TotalSegmentator CT volumes of the shared data (the pool under
  `train/` is 2D only), so each of their two patients sits on the training side only.
- lidc (added in v5): unit = patient (`lidc/LIDC-IDRI-0002` for `lidc/LIDC-IDRI-0002_n0_s11`). The source's own
  patient split is followed (`SOURCE_VAL_UNITS`): validation patients are drawn only from its `val` patients and
  training patients only from its `train` patients, each list sorted and shuffled with SEED on its own; the source's
  `val` patients beyond `VAL_COUNTS['lidc']` are used on neither side.

`assert_no_leakage` checks a split (and the shared evaluation manifest's cases) for units on both sides.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SEED = 0
VAL_COUNTS = {"hc18": 6, "kvasir": 6, "dsb2018": 1, "chasedb1": 1, "hvsmr": 1, "lidc": 12}
TRAIN_COUNTS: dict[str, int | None] = {"hc18": 80, "kvasir": 120, "dsb2018": None, "chasedb1": 4, "hvsmr": None,
                                       "lidc": 100}
# Pool sources of v4 (their split is frozen so validation numbers stay comparable) and those added since.
V4_SOURCES = ("dsb2018", "hvsmr", "chasedb1", "hc18", "kvasir")
NEW_SOURCES = ("lidc",)
# LIDC-IDRI patients of the source's own `val` split that have a case in the pool (train/lidc/cases.csv: 36 of its
# 42 val patients have a usable nodule). Kept here so the split needs no file; a test checks it against cases.csv.
LIDC_SOURCE_VAL = tuple(f"lidc/LIDC-IDRI-{n:04d}" for n in (
    27, 55, 83, 91, 140, 145, 150, 216, 219, 235, 237, 300, 301, 303, 309, 404, 437, 456, 460, 462, 479, 499, 510,
    516, 524, 556, 577, 649, 695, 705, 706, 725, 752, 866, 991, 1002))
# Sources that come with their own patient split: validation units are drawn only from these, training units only
# from the rest.
SOURCE_VAL_UNITS: dict[str, frozenset[str]] = {"lidc": frozenset(LIDC_SOURCE_VAL)}
SHARED_TRAIN = ("totalseg/example_ct", "totalseg/example_ct_dicom")
SHARED_VAL = ("sam_med2d/amos_0004_75", "sam_med2d/amos_0006_90", "sam_med2d/s0114_111", "sam_med2d/s0619_32",
              "slicerio/ctchest", "dcmqi/ct3slice")
# Cases of the shared evaluation manifest whose patient the click training saw (example_ct_sm is example_ct's top).
SHARED_SEEN = (*SHARED_TRAIN, "totalseg/example_ct_sm")


def seen_in_training(case_id: str) -> bool:
    """True for shared-manifest cases whose patient is on the training side (their scores are not independent)."""
    return case_id in SHARED_SEEN


# 3D training volumes: encode every STRIDE-th axial slice that has a target (1 = all; v2 used 4 and 3).
SHARED_TRAIN_STRIDE = {"totalseg/example_ct": 1, "totalseg/example_ct_dicom": 1}


def split_unit(case_id: str) -> str:
    """The unit a case is split by: 'hc18/108' for 'hc18/108_2HC', 'chasedb1/10' for 'chasedb1/Image_10L'."""
    source, name = case_id.split("/", 1)
    if source in ("hc18", "hvsmr", "lidc"):
        return f"{source}/{name.split('_')[0]}"
    if source == "chasedb1":
        return f"{source}/{name.removeprefix('Image_')[:2]}"
    if case_id == "totalseg/example_ct_sm":
        return "totalseg/example_ct"  # its top 30 slices: one patient
    return case_id


def comparable_to_v4(case_id: str) -> bool:
    """True for validation cases that were in v4's validation split (not of a source added since)."""
    return case_id.split("/", 1)[0] not in NEW_SOURCES


@dataclass(frozen=True)
class Split:
    """Case ids of the training pool and shared manifest on each side."""

    train_pool: tuple[str, ...]
    val_pool: tuple[str, ...]
    train_shared: tuple[str, ...] = SHARED_TRAIN
    val_shared: tuple[str, ...] = SHARED_VAL


def make_split(pool_case_ids: list[str]) -> Split:
    """Split the training pool's case ids by unit (deterministic; see module docstring)."""
    by_source: dict[str, dict[str, list[str]]] = {}
    for case_id in pool_case_ids:
        by_source.setdefault(case_id.split("/", 1)[0], {}).setdefault(split_unit(case_id), []).append(case_id)
    train: list[str] = []
    val: list[str] = []
    for source in sorted(by_source):
        n_val = VAL_COUNTS.get(source, 0)
        n_train = TRAIN_COUNTS.get(source)
        if source in SOURCE_VAL_UNITS:
            val_units = _shuffled(u for u in by_source[source] if u in SOURCE_VAL_UNITS[source])[:n_val]
            rest = _shuffled(u for u in by_source[source] if u not in SOURCE_VAL_UNITS[source])
            train_units = rest if n_train is None else rest[:n_train]
        else:
            units = _shuffled(by_source[source])
            val_units = units[:n_val]
            train_units = units[n_val:] if n_train is None else units[n_val:n_val + n_train]
        val += [c for u in val_units for c in sorted(by_source[source][u])]
        train += [c for u in train_units for c in sorted(by_source[source][u])]
    split = Split(tuple(train), tuple(val))
    assert_no_leakage(split)
    return split


def _shuffled(units: Iterable[str]) -> list[str]:
    units = sorted(units)
    random.Random(SEED).shuffle(units)
    return units


class LeakageError(AssertionError):
    """A split unit (patient, subject, volume or image) on both the training and the validation side."""


def assert_no_leakage(split: Split, shared_case_ids: Iterable[str] = ()) -> None:
    """Raise LeakageError if any unit is on both sides, across all sources and the shared evaluation manifest.

    Checked: pool and shared cases by their unit (`split_unit`): no training unit among the validation units;
    `SHARED_SEEN` holds every shared case trained on and only cases of training units (so `seen_in_training` marks
    exactly the shared cases whose patient training saw); and no other case of the shared manifest
    (`shared_case_ids`, e.g. its HC18 subjects) is of a training unit.
    """
    train_units = {split_unit(c) for c in (*split.train_pool, *split.train_shared)}
    val_units = {split_unit(c) for c in (*split.val_pool, *split.val_shared)}
    problems = []
    if both := sorted(train_units & val_units):
        problems.append(f"units on both sides: {both[:10]}")
    if unmarked := sorted(set(split.train_shared) - set(SHARED_SEEN)):
        problems.append(f"shared cases trained on but not in SHARED_SEEN: {unmarked}")
    if unseen := sorted(c for c in SHARED_SEEN if split_unit(c) not in train_units):
        problems.append(f"SHARED_SEEN cases not of a training unit: {unseen}")
    if leaked := sorted(c for c in shared_case_ids if c not in SHARED_SEEN and split_unit(c) in train_units):
        problems.append(f"shared evaluation cases of a training unit: {leaked[:10]}")
    if problems:
        raise LeakageError("; ".join(problems))


def split_counts(split: Split) -> dict[str, dict[str, int]]:
    """Per pool source: units and cases (= images, the pool is 2D) on each side."""
    counts: dict[str, dict[str, int]] = {}
    for side, ids in (("val", split.val_pool), ("train", split.train_pool)):
        for case_id in ids:
            entry = counts.setdefault(case_id.split("/", 1)[0], {"val_units": 0, "val_images": 0,
                                                                  "train_units": 0, "train_images": 0})
            entry[f"{side}_images"] += 1
        for unit in {split_unit(c) for c in ids}:
            counts[unit.split("/", 1)[0]][f"{side}_units"] += 1
    return dict(sorted(counts.items()))


VAL_MAX_TARGETS_PER_CASE = 10  # DSB2018 images carry up to 329 nuclei: the first 10 listed keep evaluation cheap


def validation_manifest(split: Split, pool_manifest: dict, shared_manifest: dict, data_root: Path,
                        out_path: Path, max_targets: int = VAL_MAX_TARGETS_PER_CASE) -> dict:
    """A manifest (shared/data/README.md format) of the validation cases, paths relative to `out_path`'s folder.

    pool_manifest / shared_manifest: the parsed JSON of shared/data/train_manifest.json and manifest.json, whose
    paths are relative to `data_root`. 2D cases keep their first `max_targets` targets.
    """
    rel = Path(os.path.relpath(Path(data_root).resolve(), Path(out_path).resolve().parent))

    def moved(case: dict) -> dict:
        case = json.loads(json.dumps(case))
        case["image"] = (rel / case["image"]).as_posix()
        if "labelmap" in case:
            case["labelmap"] = (rel / case["labelmap"]).as_posix()
        if "targets" in case:
            case["targets"] = case["targets"][:max_targets]
        for target in case.get("targets", []):
            target["mask"] = (rel / target["mask"]).as_posix()
        return case

    pool = {c["id"]: c for c in pool_manifest["cases"]}
    shared = {c["id"]: c for c in shared_manifest["cases"]}
    cases = [moved(shared[i]) for i in split.val_shared] + [moved(pool[i]) for i in split.val_pool]
    return {"name": "validation", "cases": cases}


def write_validation_manifest(data_root: str | Path, out_path: str | Path) -> dict:
    """Write the validation manifest JSON (atomically) for the data under `data_root`; returns it."""
    from samunet_core.io.atomic import atomic_path

    data_root, out_path = Path(data_root), Path(out_path)
    pool = json.loads((data_root / "train_manifest.json").read_text())
    shared = json.loads((data_root / "manifest.json").read_text())
    split = make_split([c["id"] for c in pool["cases"]])
    assert_no_leakage(split, [c["id"] for c in shared["cases"]])
    manifest = validation_manifest(split, pool, shared, data_root, out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


FLIP_EVERY = 8  # every 8th training image also gets a left-right mirrored copy (encoded separately)
AUGMENT_EVERY = 4  # every 4th (offset 2) also gets a rotated, intensity-jittered copy (`data.augmented`)


def training_records(data_root: str | Path, split: Split | None = None, flip_every: int = FLIP_EVERY,
                     augment_every: int = AUGMENT_EVERY):
    """ImageRecords of the training side, round-robin over sources (dsb2018, hvsmr, chasedb1, hc18, kvasir, each
    shared CT volume at every STRIDE-th slice, then the sources added since v4: lidc), so any prefix of the stream is
    balanced across sources; every `flip_every`-th record is followed by its mirrored copy and every
    `augment_every`-th (offset by half) by a rotated, intensity-jittered copy (0 = none).

    The v4 streams share one record counter and each added source has its own, so the v4 records and their copies
    are exactly v4's (their cached embeddings are reused) whatever is added.
    """
    from samunet_core.train.data import augmented, flipped, records_from_manifest

    data_root = Path(data_root)
    pool_path, shared_path = data_root / "train_manifest.json", data_root / "manifest.json"
    if split is None:
        split = make_split([c["id"] for c in json.loads(pool_path.read_text())["cases"]])
    streams = []  # (counter group, records)
    for source in V4_SOURCES:
        ids = [c for c in split.train_pool if c.startswith(source + "/")]
        streams.append(("v4", records_from_manifest(pool_path, ids)))
    for case_id in split.train_shared:
        streams.append(("v4", records_from_manifest(shared_path, [case_id], SHARED_TRAIN_STRIDE)))
    for source in NEW_SOURCES:
        ids = [c for c in split.train_pool if c.startswith(source + "/")]
        if ids:
            streams.append((source, records_from_manifest(pool_path, ids)))
    counters: dict[str, int] = {}
    while streams:
        for entry in list(streams):
            group, stream = entry
            record = next(stream, None)
            if record is None:
                streams.remove(entry)
                continue
            if not record.targets:
                continue
            yield record
            index = counters.get(group, 0)
            if flip_every and index % flip_every == 0:
                yield flipped(record)
            if augment_every and index % augment_every == augment_every // 2:
                copy = augmented(record)
                if copy.targets:
                    yield copy
            counters[group] = index + 1
