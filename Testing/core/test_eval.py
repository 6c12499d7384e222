"""`samunet eval` end to end on small in-repo cases, against the official LiteMedSAM reference Dice.

Data: Testing/data/eval_small (2 SAM-Med2D / HC18 images, see its SOURCES.md) and the 3-slice dcmqi CT in
Testing/data/dcmqi_ct3slice. The reference rows are copied from shared/data/reference/litemedsam_box.csv.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from samunet_core.cli import main
from samunet_core.errors import InputError
from samunet_core.manifest import load_manifest, parse_manifest
from samunet_core.train.weights_source import LITEMEDSAM_SHA256

DATA = Path(__file__).resolve().parent.parent / "data"
SMALL = DATA / "eval_small"
DCMQI = DATA / "dcmqi_ct3slice"
REQUIRED_COLUMNS = {"case_id", "modality", "kind", "target", "label", "k", "dice", "nsd"}
REQUIRED_SUMMARY = {"model", "protocol", "n_targets", "mean_dice", "mean_nsd", "by_modality", "by_kind", "by_case",
                    "wall_s", "encoder_calls", "encoder_s", "decoder_calls", "decoder_s"}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def reference_dice() -> dict[tuple[str, str, str], float]:
    return {(r["case_id"], r["target"], r["k"]): float(r["dice"])
            for r in read_rows(SMALL / "reference_litemedsam_box.csv")}


def run_eval(manifest: Path, out: Path, *extra: str) -> tuple[list[dict[str, str]], dict]:
    """The base model, whose box results the official reference pins down."""
    code = main(["eval", str(manifest), "--out", str(out), "--device", "cpu", "--no-progress", "--model", "litemedsam",
                 *extra])
    assert code == 0
    return read_rows(out / "results.csv"), json.loads((out / "summary.json").read_text())


def check_schema(rows: list[dict[str, str]], summary: dict, protocol: str, n: int) -> None:
    assert REQUIRED_COLUMNS <= set(rows[0])
    assert len(rows) == n
    assert REQUIRED_SUMMARY <= set(summary)
    assert summary["protocol"] == protocol and summary["model"] == "litemedsam" and summary["n_targets"] == n
    assert summary["weights_sha256"] == LITEMEDSAM_SHA256
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0 and 0.0 <= float(row["nsd"]) <= 1.0
    mean = sum(float(r["dice"]) for r in rows) / n
    assert summary["mean_dice"] == pytest.approx(mean, abs=1e-5)
    assert sum(m["n"] for m in summary["by_modality"].values()) == n


@pytest.fixture(scope="module")
def box_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_box")
    return out, *run_eval(SMALL / "manifest.json", out, "--protocol", "box", "--overlays", "2")


def test_box_matches_reference_dice(box_run):
    out, rows, summary = box_run
    check_schema(rows, summary, "box", 4)
    assert set(summary["by_modality"]) == {"CT", "US"}
    assert summary["encoder_calls"] == 2  # one embedding per image, reused by its 3 targets
    reference = reference_dice()
    for row in rows:
        assert float(row["dice"]) == pytest.approx(reference[(row["case_id"], row["target"], "")], abs=0.01), row
    # The box is the tight box of the largest component, max inclusive (shared/data/reference rows).
    assert rows[0]["prompt"] == "box 289 203 315 229"


def test_box_overlays_written(box_run):
    out, _, summary = box_run
    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 2 and summary["overlays"] == [p.name for p in pngs]
    assert "aorta" in pngs[0].name  # the lowest Dice of the four comes first


def test_point3_clicks(tmp_path):
    rows, summary = run_eval(SMALL / "manifest.json", tmp_path, "--protocol", "point3")
    check_schema(rows, summary, "point3", 4)
    for row in rows:
        clicks = row["prompt"].split(";")
        assert 1 <= len(clicks) <= 3 and int(row["n_clicks"]) == len(clicks)
        assert clicks[0].startswith("point+ ")
        assert len(row["dice_per_click"].split()) == len(clicks)
        assert float(row["dice_per_click"].split()[-1]) == pytest.approx(float(row["dice"]), abs=1e-4)
    # First click: the deepest interior pixel of the aorta (as in shared/data/reference/litemedsam_point1.csv).
    assert rows[0]["prompt"].split(";")[0] == "point+ 302 216"


def write_dcmqi_manifest(folder: Path) -> Path:
    """A one-case 3D manifest over the in-repo dcmqi 3-slice CT (3 labels, soft-tissue window)."""
    manifest = {"name": "t", "cases": [{
        "id": "dcmqi/ct3slice", "kind": "3d", "modality": "CT", "image": str(DCMQI / "ct-3slice"),
        "labelmap": str(DCMQI / "liver_spine_heart_seg.nrrd"), "labels": {"1": "liver", "2": "spine", "3": "heart"},
        "window": [-160, 240]}]}
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def test_3d_box_matches_reference(tmp_path):
    path = write_dcmqi_manifest(tmp_path)
    # Stride 2 keeps slices 0 and 2 (two encodes, each shared by the three labels).
    rows, summary = run_eval(path, tmp_path / "out", "--protocol", "box", "--slice-stride", "2")
    check_schema(rows, summary, "box", 6)
    assert summary["encoder_calls"] == 2
    assert [(r["label"], r["k"]) for r in rows[:2]] == [("1", "0"), ("1", "2")]
    assert {r["k"] for r in rows} == {"0", "2"}
    reference = reference_dice()
    for row in rows:
        assert float(row["dice"]) == pytest.approx(reference[(row["case_id"], row["target"], row["k"])], abs=0.01)


# -- bad input --------------------------------------------------------------------------------------------------------
def test_missing_file_is_a_clear_cli_error(tmp_path, capsys):
    data = json.loads((SMALL / "manifest.json").read_text())
    data["cases"][1]["targets"][0]["mask"] = "hc18/masks/nope.png"
    (tmp_path / "m.json").write_text(json.dumps(data))
    for name in ("sam_med2d_demo", "hc18"):
        (tmp_path / name).symlink_to(SMALL / name)
    code = main(["eval", str(tmp_path / "m.json"), "--protocol", "box", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "hc18/428_HC" in err and "fetal_head" in err and "nope.png" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["cases"][0].update(kind="4d"), "'kind'"),
    (lambda d: d["cases"][0].update(modality="XR"), "'modality'"),
    (lambda d: d["cases"].append(dict(d["cases"][0])), "appears twice"),
    (lambda d: d["cases"][0]["targets"].append(dict(d["cases"][0]["targets"][0])), "target name 'aorta'"),
    (lambda d: d["cases"][0].update(window=[240, -160]), "'window'"),
    (lambda d: d["cases"][0].pop("image"), "'image'"),
    (lambda d: d["cases"][0].update(targets=[]), "'targets'"),
    (lambda d: d.update(cases={}), "'cases'"),
])
def test_malformed_manifest(mutate, message):
    data = json.loads((SMALL / "manifest.json").read_text())
    mutate(data)
    with pytest.raises(InputError, match=message):
        parse_manifest(data, SMALL, source="m.json")


def test_3d_manifest_checks(tmp_path):
    base = {"id": "v", "kind": "3d", "modality": "CT", "image": str(DCMQI / "ct-3slice"),
            "labelmap": str(DCMQI / "liver_spine_heart_seg.nrrd"), "labels": {"1": "liver"}}
    case = parse_manifest({"cases": [dict(base, target_windows={"1": [-1350, 150]})]}, tmp_path).cases[0]
    assert case.window_for(1) == (-1350.0, 150.0) and case.window_for(2) is None
    with pytest.raises(InputError, match="label 2"):
        parse_manifest({"cases": [dict(base, target_windows={"2": [0, 1]})]}, tmp_path)
    with pytest.raises(InputError, match="not an integer"):
        parse_manifest({"cases": [dict(base, labels={"x": "liver"})]}, tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        parse_manifest({"cases": [dict(base, labelmap="missing.nrrd")]}, tmp_path)
    with pytest.raises(InputError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        load_manifest(tmp_path / "bad.json")


def test_label_missing_from_labelmap(tmp_path, capsys):
    manifest = {"name": "t", "cases": [{
        "id": "dcmqi/ct3slice", "kind": "3d", "modality": "CT", "image": str(DCMQI / "ct-3slice"),
        "labelmap": str(DCMQI / "liver_spine_heart_seg.nrrd"), "labels": {"1": "liver", "7": "kidney"}}]}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    code = main(["eval", str(tmp_path / "m.json"), "--protocol", "box", "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--no-progress"])
    assert code == 2 and "[7]" in capsys.readouterr().err


def test_propagate_3d(tmp_path):
    path = write_dcmqi_manifest(tmp_path)
    rows, summary = run_eval(path, tmp_path / "out", "--protocol", "propagate")
    check_schema(rows, summary, "propagate", 3)  # one row per label, 3D Dice
    # Start slice = the label's largest slice (shared/data/reference/litemedsam_propagate.csv: 0, 1, 0).
    assert [r["k"] for r in rows] == ["0", "1", "0"]
    assert summary["encoder_calls"] == 3  # each slice once, shared by the labels
    # The official chaining scores 0.79 here (liver 0.91); the engine's walk must stay in that range.
    assert summary["mean_dice"] > 0.6 and float(rows[0]["dice"]) > 0.85
