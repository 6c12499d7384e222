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
  `sam_med2d` CT images validate.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 0
VAL_COUNTS = {"hc18": 6, "kvasir": 6, "dsb2018": 1, "chasedb1": 1, "hvsmr": 1}
TRAIN_COUNTS: dict[str, int | None] = {"hc18": 80, "kvasir": 120, "dsb2018": None, "chasedb1": 4, "hvsmr": None}
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
    if source in ("hc18", "hvsmr"):
        return f"{source}/{name.split('_')[0]}"
    if source == "chasedb1":
        return f"{source}/{name.removeprefix('Image_')[:2]}"
    return case_id


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
        units = sorted(by_source[source])
        random.Random(SEED).shuffle(units)
        n_val = VAL_COUNTS.get(source, 0)
        n_train = TRAIN_COUNTS.get(source)
        val_units = units[:n_val]
        train_units = units[n_val:] if n_train is None else units[n_val:n_val + n_train]
        val += [c for u in val_units for c in sorted(by_source[source][u])]
        train += [c for u in train_units for c in sorted(by_source[source][u])]
    assert not {split_unit(c) for c in train} & {split_unit(c) for c in val}
    return Split(tuple(train), tuple(val))


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
    manifest = validation_manifest(split, pool, shared, data_root, out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


FLIP_EVERY = 8  # every 8th training image also gets a left-right mirrored copy (encoded separately)
AUGMENT_EVERY = 4  # every 4th (offset 2) also gets a rotated, intensity-jittered copy (`data.augmented`)


def training_records(data_root: str | Path, split: Split | None = None, flip_every: int = FLIP_EVERY,
                     augment_every: int = AUGMENT_EVERY):
    """ImageRecords of the training side, round-robin over sources (dsb2018, hvsmr, chasedb1, hc18, kvasir, and
    each shared CT volume at every STRIDE-th slice), so any prefix of the stream is balanced across sources; every
    `flip_every`-th record is followed by its mirrored copy and every `augment_every`-th (offset by half) by a
    rotated, intensity-jittered copy (0 = none)."""
    from samunet_core.train.data import augmented, flipped, records_from_manifest

    data_root = Path(data_root)
    pool_path, shared_path = data_root / "train_manifest.json", data_root / "manifest.json"
    if split is None:
        split = make_split([c["id"] for c in json.loads(pool_path.read_text())["cases"]])
    streams = []
    for source in ("dsb2018", "hvsmr", "chasedb1", "hc18", "kvasir"):
        ids = [c for c in split.train_pool if c.startswith(source + "/")]
        streams.append(records_from_manifest(pool_path, ids))
    for case_id in split.train_shared:
        streams.append(records_from_manifest(shared_path, [case_id], SHARED_TRAIN_STRIDE))
    index = 0
    while streams:
        for stream in list(streams):
            record = next(stream, None)
            if record is None:
                streams.remove(stream)
                continue
            if not record.targets:
                continue
            yield record
            if flip_every and index % flip_every == 0:
                yield flipped(record)
            if augment_every and index % augment_every == augment_every // 2:
                copy = augmented(record)
                if copy.targets:
                    yield copy
            index += 1
