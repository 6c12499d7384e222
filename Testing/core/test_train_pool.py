"""Training pool v5: the LIDC-IDRI source in the fixed split, the patient-level leakage check, and the v4 split and
training stream kept as they were.

The split rules are tested on synthetic case lists and tiny synthetic manifests (no ../shared needed); the tests on
the real pool run only where ../shared/data exists (CI has it) and are skipped cleanly elsewhere.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
VAL_MANIFEST = REPO / "samunet_core" / "train" / "splits" / "validation_manifest.json"
needs_shared = pytest.mark.skipif(not (SHARED / "train_manifest.json").is_file(), reason="../shared/data is absent")


def v4_ids() -> list[str]:
    return [f"hc18/{i:03d}_HC" for i in range(40)] + [f"hc18/{i:03d}_2HC" for i in range(0, 40, 3)] + \
        [f"chasedb1/Image_{i:02d}{s}" for i in range(1, 11) for s in "LR"] + [f"kvasir/k{i}" for i in range(30)] + \
        [f"hvsmr/1000{p}_{k}" for p in range(4) for k in range(3)] + [f"dsb2018/d{i}" for i in range(5)]


def lidc_ids(patients: list[int]) -> list[str]:
    """Two nodules per patient, the largest slice and one neighbour each."""
    return [f"lidc/LIDC-IDRI-{p:04d}_n{n}_s{s}" for p in patients for n in range(2) for s in (10 + n, 12 + n)]


def test_lidc_is_split_by_patient_within_the_source_split():
    from samunet_core.train.splits import LIDC_SOURCE_VAL, TRAIN_COUNTS, VAL_COUNTS, make_split, split_unit

    assert split_unit("lidc/LIDC-IDRI-0002_n0_s11") == split_unit("lidc/LIDC-IDRI-0002_n3_s7") == "lidc/LIDC-IDRI-0002"
    source_val = [int(u.rsplit("-", 1)[1]) for u in LIDC_SOURCE_VAL]
    others = [p for p in range(1, 1013) if f"lidc/LIDC-IDRI-{p:04d}" not in LIDC_SOURCE_VAL][:150]
    ids = lidc_ids(source_val + others)
    split = make_split(ids)
    assert split == make_split(list(reversed(ids)))  # deterministic, order-free
    val_units = {split_unit(c) for c in split.val_pool}
    train_units = {split_unit(c) for c in split.train_pool}
    assert len(val_units) == VAL_COUNTS["lidc"] and val_units <= set(LIDC_SOURCE_VAL)
    assert len(train_units) == TRAIN_COUNTS["lidc"] and train_units.isdisjoint(LIDC_SOURCE_VAL)
    # whole patients: every case of a chosen patient is on its side
    assert sorted(split.val_pool) == sorted(c for c in ids if split_unit(c) in val_units)
    assert sorted(split.train_pool) == sorted(c for c in ids if split_unit(c) in train_units)
    # a source-val patient is never trained on, even when validation has too few of them to fill its quota
    few = make_split(lidc_ids(source_val[:3] + others[:20]))
    assert {split_unit(c) for c in few.val_pool} == {f"lidc/LIDC-IDRI-{p:04d}" for p in source_val[:3]}
    assert {split_unit(c) for c in few.train_pool} == {f"lidc/LIDC-IDRI-{p:04d}" for p in others[:20]}


def test_adding_lidc_leaves_the_v4_split_unchanged():
    from samunet_core.train.splits import LIDC_SOURCE_VAL, make_split

    before = make_split(v4_ids())
    after = make_split(v4_ids() + lidc_ids([int(u.rsplit("-", 1)[1]) for u in LIDC_SOURCE_VAL] + list(range(1, 60))))
    assert [c for c in after.val_pool if not c.startswith("lidc/")] == list(before.val_pool)
    assert [c for c in after.train_pool if not c.startswith("lidc/")] == list(before.train_pool)
    assert after.val_shared == before.val_shared and after.train_shared == before.train_shared


def test_leakage_check_catches_a_unit_on_both_sides():
    from samunet_core.train.splits import SHARED_TRAIN, SHARED_VAL, LeakageError, Split, assert_no_leakage, make_split

    split = make_split(v4_ids() + lidc_ids(list(range(1, 40))))
    shared_eval = ["sam_med2d/amos_0004_75", "totalseg/example_ct_sm", "hc18/900_HC"]
    assert_no_leakage(split, shared_eval)
    cases = [
        # a patient's other nodule slice on the training side
        (Split((*split.train_pool, split.val_pool[-1].replace("_s", "_s9")), split.val_pool), "both sides"),
        # HC18: another image of a validation subject
        (Split((*split.train_pool, split.val_pool[0].replace("_HC", "_2HC").replace("_2HC", "_3HC")),
               split.val_pool), "both sides"),
        # a shared volume of a training patient validated (example_ct_sm is example_ct's top)
        (Split(split.train_pool, split.val_pool, SHARED_TRAIN, (*SHARED_VAL, "totalseg/example_ct_sm")),
         "both sides"),
        # a shared CT volume on both sides
        (Split(split.train_pool, split.val_pool, (*SHARED_TRAIN, "slicerio/ctchest"), SHARED_VAL), "both sides"),
        # a shared CT volume trained on but not in SHARED_SEEN: seen_in_training would miss its scores
        (Split(split.train_pool, split.val_pool, (*SHARED_TRAIN, "dcmqi/ct3slice"), SHARED_VAL[:-1]),
         "not in SHARED_SEEN"),
        # example_ct no longer trained on: seen_in_training would mark an unseen case
        (Split(split.train_pool, split.val_pool, ("totalseg/example_ct_dicom",), SHARED_VAL), "not of a training"),
    ]
    for bad, message in cases:
        with pytest.raises(LeakageError, match=message):
            assert_no_leakage(bad)
    # a shared evaluation case of a training subject
    trained_subject = next(c for c in split.train_pool if c.startswith("hc18/")).split("_")[0]
    with pytest.raises(LeakageError, match="shared evaluation"):
        assert_no_leakage(split, [*shared_eval, f"{trained_subject}_2HC"])
    with pytest.raises(AssertionError):  # LeakageError is an AssertionError (raised explicitly: works under -O)
        assert_no_leakage(Split(split.val_pool, split.val_pool))


def _tiny_root(root: Path, ids: list[str]) -> Path:
    """A data root with a train_manifest.json of 24x24 images (one square target each) for `ids`."""
    cases = []
    for i, case_id in enumerate(ids):
        stem = case_id.replace("/", "__")
        image = np.full((24, 24), 40 + 7 * i % 200, np.uint8)
        mask = np.zeros((24, 24), np.uint8)
        mask[6:18, 4 + i % 6:16 + i % 6] = 255
        Image.fromarray(image).save(root / f"{stem}.png")
        Image.fromarray(mask).save(root / f"{stem}_m.png")
        cases.append({"id": case_id, "kind": "2d", "modality": "CT", "image": f"{stem}.png",
                      "targets": [{"name": "t", "mask": f"{stem}_m.png"}]})
    (root / "train_manifest.json").write_text(json.dumps({"name": "train", "cases": cases}))
    return root


def test_training_stream_keeps_the_v4_records_and_copies(tmp_path):
    from samunet_core.train.splits import Split, training_records

    old = ["hc18/001_HC", "hc18/002_HC", "kvasir/a", "kvasir/b", "kvasir/c", "dsb2018/x"]
    new = [f"lidc/LIDC-IDRI-{p:04d}_n0_s3" for p in range(1, 8)]
    root = _tiny_root(tmp_path, old + new)
    v4 = [r.source for r in training_records(root, Split(tuple(old), (), (), ()))]
    v5 = [r.source for r in training_records(root, Split(tuple(old + new), (), (), ()))]
    assert [s for s in v5 if not s.startswith("lidc/")] == v4  # same records, same mirrored/rotated copies
    lidc = [s for s in v5 if s.startswith("lidc/")]
    assert [s for s in lidc if ":" not in s] == new
    assert sum(s.endswith(":flip") for s in lidc) == 1 and sum(":aug" in s for s in lidc) == 2  # its own counter
    assert v5.index(new[0]) < len(v5) // 2  # interleaved, not appended


def test_checked_in_validation_manifest_is_v4_plus_lidc_patients():
    from samunet_core.train.splits import LIDC_SOURCE_VAL, SHARED_VAL, VAL_COUNTS, comparable_to_v4, split_unit

    ids = [c["id"] for c in json.loads(VAL_MANIFEST.read_text())["cases"]]
    v4 = [c for c in ids if comparable_to_v4(c)]
    assert ids[:len(v4)] == v4 and len(v4) == 28 and v4[:len(SHARED_VAL)] == list(SHARED_VAL)  # v4's, first
    lidc = ids[len(v4):]
    assert all(c.startswith("lidc/") for c in lidc)
    patients = {split_unit(c) for c in lidc}
    assert len(patients) == VAL_COUNTS["lidc"] and patients <= set(LIDC_SOURCE_VAL)


@needs_shared
def test_lidc_source_val_matches_cases_csv():
    from samunet_core.train.splits import LIDC_SOURCE_VAL

    with open(SHARED / "train" / "lidc" / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {f"lidc/{r['patient_id']}" for r in rows if r["split"] == "val"} == set(LIDC_SOURCE_VAL)
    assert all(r["case"] == f"lidc/{r['patient_id']}_n{r['nodule']}_s{r['slice']}" for r in rows)


@needs_shared
def test_real_pool_split_has_no_leakage_and_the_documented_counts(tmp_path):
    from samunet_core.train.splits import SHARED_SEEN, assert_no_leakage, make_split, split_counts, validation_manifest

    pool = json.loads((SHARED / "train_manifest.json").read_text())
    shared = json.loads((SHARED / "manifest.json").read_text())
    split = make_split([c["id"] for c in pool["cases"]])
    assert_no_leakage(split, [c["id"] for c in shared["cases"]])
    # every TotalSegmentator CT volume of the shared data is on the training side (by patient)
    assert {c["id"] for c in shared["cases"] if c["id"].startswith("totalseg/")} == set(SHARED_SEEN)
    assert all(c["kind"] == "2d" for c in pool["cases"])  # the pool has no further CT volumes
    assert split_counts(split) == {
        "chasedb1": {"val_units": 1, "val_images": 2, "train_units": 4, "train_images": 8},
        "dsb2018": {"val_units": 1, "val_images": 1, "train_units": 44, "train_images": 44},
        "hc18": {"val_units": 6, "val_images": 6, "train_units": 80, "train_images": 80},
        "hvsmr": {"val_units": 1, "val_images": 7, "train_units": 3, "train_images": 23},
        "kvasir": {"val_units": 6, "val_images": 6, "train_units": 120, "train_images": 120},
        "lidc": {"val_units": 12, "val_images": 64, "train_units": 100, "train_images": 439},
    }
    out = tmp_path / "deep" / "a" / "b" / "c" / "validation_manifest.json"  # same depth as the checked-in one
    made = validation_manifest(split, pool, shared, SHARED, out)
    checked_in = json.loads(VAL_MANIFEST.read_text())
    assert [c["id"] for c in made["cases"]] == [c["id"] for c in checked_in["cases"]]
