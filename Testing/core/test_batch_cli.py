"""`samunet batch` over real volumes: outputs, resume (finished outputs skipped), --force, a failing volume reported
while the batch goes on, per-volume prompt files, and the disk cache reused across runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from samunet_core.cli import main

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator"
CT = DATA / "example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "samunet_cache"


@pytest.fixture(scope="module")
def spleen_prompt() -> dict:
    from samunet_core import metrics
    from samunet_core.io.volumes import read_volume

    frame = read_volume(CT).frame("axial")
    ref = frame.volume_to_slices(read_volume(DATA / "example_seg.nii.gz").array) == 1
    k = int(np.argmax(ref.reshape(ref.shape[0], -1).sum(1)))
    x0, y0, x1, y1 = metrics.tight_box(metrics.largest_component(ref[k]))
    corners = frame.slice_to_ijk([[k, y0, x0], [k, y1, x1]])
    return {"coordinates": "IJK", "segments": [{"name": "spleen", "boxes": [
        {"corners": [[float(v) for v in c] for c in corners]}]}]}


def batch(*args, cache_dir: Path) -> int:
    return main(["batch", *map(str, args), "--device", "cpu", "--preset", "soft_tissue", "--cache-dir",
                 str(cache_dir), "--no-progress"])


@pytest.fixture()
def folder(tmp_path, spleen_prompt) -> Path:
    """Two copies of the CT (same pixels: the cache makes the second free) and one broken file."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(CT, inputs / "a.nii.gz")
    shutil.copy(CT, inputs / "b.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"not a volume")
    (tmp_path / "prompts.json").write_text(json.dumps(spleen_prompt))
    return tmp_path


def test_batch_resume_force_and_failures(folder, cache_dir, capsys) -> None:
    out = folder / "out"
    code = batch(folder / "in", "--prompts", folder / "prompts.json", "--output-dir", out, cache_dir=cache_dir)
    printed = capsys.readouterr()
    assert code == 1, "a failed volume makes the exit status non-zero"
    assert "2 segmented, 0 skipped (already done), 1 failed" in printed.out
    assert "broken.nii.gz" in printed.out and "FAILED" in printed.out
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd", "b.seg.nrrd"], "no partial output for broken"
    import slicerio

    a = slicerio.read_segmentation(str(out / "a.seg.nrrd"))
    assert [s["name"] for s in a["segments"]] == ["spleen"] and a["voxels"].sum() > 100
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    (folder / "in" / "broken.nii.gz").unlink()
    assert batch(folder / "in", "--prompts", folder / "prompts.json", "--output-dir", out, cache_dir=cache_dir) == 0
    assert "0 segmented, 2 skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps, "finished outputs are not rewritten"

    cached = sorted(cache_dir.rglob("*.pt"))
    assert cached, "embeddings persist in the disk cache"
    assert batch(folder / "in" / "a.nii.gz", "--prompts", folder / "prompts.json", "--output-dir", out, "--force",
                 cache_dir=cache_dir) == 0
    assert "1 segmented, 0 skipped" in capsys.readouterr().out
    assert sorted(cache_dir.rglob("*.pt")) == cached, "a rerun encodes nothing it has seen"
    assert (out / "a.seg.nrrd").stat().st_mtime_ns != stamps["a.seg.nrrd"]
    assert (out / "b.seg.nrrd").stat().st_mtime_ns == stamps["b.seg.nrrd"]


def test_batch_per_volume_prompt_files_and_formats(folder, spleen_prompt, cache_dir, capsys) -> None:
    (folder / "in" / "broken.nii.gz").unlink()
    prompts_dir = folder / "prompts"
    prompts_dir.mkdir()
    (prompts_dir / "a.prompts.json").write_text(json.dumps(spleen_prompt))
    out = folder / "out"
    code = batch(folder / "in", "--prompts-dir", prompts_dir, "--output-dir", out, "--format", ".nii.gz",
                 cache_dir=cache_dir)
    printed = capsys.readouterr().out
    assert code == 1
    assert "no prompt file for" in printed and "b.prompts.json" in printed
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz"]
    # Beside the volume works too.
    (folder / "in" / "b.prompts.json").write_text(json.dumps(spleen_prompt))
    assert batch(folder / "in", "--output-dir", out, "--format", ".nii.gz", cache_dir=cache_dir) == 0
    assert "1 segmented, 1 skipped" in capsys.readouterr().out  # a was done: its prompt file is not needed again
    assert (out / "b.nii.gz").is_file()


def test_batch_bad_input(tmp_path, cache_dir, capsys) -> None:
    code = batch(tmp_path / "nowhere", "--output-dir", tmp_path / "out", cache_dir=cache_dir)
    assert code == 2 and "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    code = batch(empty, "--output-dir", tmp_path / "out", cache_dir=cache_dir)
    assert code == 2 and "holds no volume files" in capsys.readouterr().err
