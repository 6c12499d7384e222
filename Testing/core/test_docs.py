"""docs/formats.md is what users read about the file formats: every example in it goes through the real code.

Prompt-file examples are parsed by samunet_core.prompts.parse_prompts and resolved against the image they name; the
manifest example is written to a folder with small real files, loaded by samunet_core.manifest.load_manifest and
evaluated by samunet_core.evaluate.evaluate (with a stand-in model, so no weights are needed), and the results.csv and
summary.json examples must have exactly the columns and keys that run wrote; the bench example must have exactly the
keys samunet_core.bench.run_bench writes (again with a stand-in model).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from samunet_core.prompts import SliceBox

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs/formats.md"
CT = REPO / "Testing/data/slicerio_ctchest/CTChest4.nrrd"
MARKED = re.compile(r"<!-- example: ([\w-]+) -->\s*```(\w+)\n(.*?)```", re.S)


def examples() -> dict[str, tuple[str, str]]:
    """{marker: (language, text)} of the marked fenced blocks of docs/formats.md."""
    return {name: (lang, body) for name, lang, body in MARKED.findall(DOC.read_text(encoding="utf-8"))}


def example_json(name: str):
    lang, body = examples()[name]
    assert lang == "json", f"example {name} should be a json block"
    return json.loads(body)


def test_every_fenced_block_is_a_checked_example():
    text = DOC.read_text(encoding="utf-8")
    fences = re.findall(r"^```(\w*)$", text, re.M)
    assert len(fences) == 2 * len(examples()), "every fenced block of docs/formats.md needs an <!-- example: --> mark"
    assert set(examples()) == {"prompt-ras", "prompt-pixel", "prompt-edit", "job-file", "manifest", "results-csv",
                               "summary-json", "bench-json", "results-csv-interactive3d", "summary-interactive3d",
                               "prompt-interactive3d"}
    for lang, body in examples().values():
        if lang == "json":
            json.loads(body)


def test_no_reference_outside_the_repository():
    assert "shared/" not in DOC.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------------------------------
def test_prompt_file_doc_names_every_key_and_value():
    from samunet_core import prompts
    from samunet_core.transforms import AXES

    text = DOC.read_text(encoding="utf-8")
    keys = (*prompts._TOP_KEYS, *prompts._SEGMENT_KEYS, *prompts._POINT_KEYS, *prompts._BOX_KEYS)
    values = (*prompts.COORDINATES, *AXES, *prompts.MODES)
    missing = [word for word in keys + values if f'`"{word}"`' not in text]
    assert not missing, f"docs/formats.md does not document {missing}"


def test_ras_example_parses_and_resolves_on_the_ct():
    from samunet_core.io.volumes import read_volume
    from samunet_core.prompts import parse_prompts, resolve_prompts

    parsed = parse_prompts(example_json("prompt-ras"), source="docs prompt-ras")
    resolved = resolve_prompts(parsed, read_volume(CT).frame(parsed.axis))
    right, left = resolved.segments
    assert right.name == "right lung" and right.propagate and right.color == (0.85, 0.5, 0.4)
    assert [b.is_3d for b in right.boxes] == [False] and right.boxes[0].s0 == 12
    assert [p.s for p in right.points] == [12] and right.points[0].positive
    assert left.boxes[0].is_3d and (left.boxes[0].s0, left.boxes[0].s1) == (12, 20) and not left.propagate


def test_interactive3d_prompt_example_is_a_kidney_box3d_step():
    """The eval's step-2 prompt file for kidney_right (label 2) of the TotalSegmentator CT: the label's 3D bounding box
    on the axial slices (pixels as in the results-csv-interactive3d row), then two clicks, propagated."""
    from samunet_core import metrics
    from samunet_core.io.volumes import read_volume
    from samunet_core.prompts import parse_prompts, resolve_prompts

    ct = REPO / "Testing/data/totalsegmentator"
    parsed = parse_prompts(example_json("prompt-interactive3d"), source="docs prompt-interactive3d")
    frame = read_volume(ct / "example_ct_sm.nii.gz").frame(parsed.axis)
    (kidney,) = resolve_prompts(parsed, frame).segments
    ref = frame.volume_to_slices(read_volume(ct / "example_seg.nii.gz").array) == 2
    ks = np.flatnonzero(ref.any(axis=(1, 2)))
    x0, y0, x1, y1 = metrics.tight_box(ref.any(axis=0))
    assert (kidney.name, kidney.propagate, len(kidney.boxes)) == ("kidney_right", True, 1)
    assert kidney.boxes[0] == SliceBox(int(ks[0]), int(ks[-1]), x0, y0, x1, y1)
    row = next(csv.DictReader(io.StringIO(examples()["results-csv-interactive3d"][1])))
    assert row["prompt"] == f"box3d {x0} {y0} {x1} {y1} k {ks[0]}-{ks[-1]}"
    clicks = row["extra"].split("clicks=")[1].split(";")[0].split()
    assert [f"{'+' if p.positive else '-'}({p.s},{p.y:g},{p.x:g})" for p in kidney.points] == clicks


def test_pixel_example_parses_and_resolves_on_a_2d_image():
    from samunet_core.prompts import parse_prompts, resolve_prompts
    from samunet_core.transforms import SliceFrame

    parsed = parse_prompts(example_json("prompt-pixel"), source="docs prompt-pixel")
    assert parsed.axis == "axial"
    (head,) = resolve_prompts(parsed, SliceFrame.for_image(240, 256)).segments
    assert head.boxes[0].xyxy == (40.0, 30.0, 210.0, 190.0)
    assert [(p.x, p.y, p.positive) for p in head.points] == [(200.0, 60.0, False)]


def test_edit_example_parses_with_its_modes():
    from samunet_core.io.volumes import read_volume
    from samunet_core.prompts import parse_prompts, resolve_prompts

    parsed = parse_prompts(example_json("prompt-edit"), source="docs prompt-edit")
    segments = resolve_prompts(parsed, read_volume(CT).frame(parsed.axis)).segments
    modes = [None if s.mode is None else str(getattr(s.mode, "value", s.mode)) for s in segments]
    assert modes == [None, "remove", "replace"]  # None: "add" for an existing segment, else "replace"
    assert segments[0].points[0].s == 12 and not segments[0].points[0].positive
    assert segments[2].propagate and segments[2].points[0].positive


# ---------------------------------------------------------------------------------------------------------------------
# Manifest, results.csv and summary.json
# ---------------------------------------------------------------------------------------------------------------------
class StandInPredictor:
    """The Predictor interface evaluate/bench use, without a network: a box's answer is the box, a click's a square."""

    model_id = encoder_id = "litemedsam_clicks"
    device = "cpu"
    precision = "fp32"
    logits_grid = 256
    weights = SimpleNamespace(sha256="0" * 64, path="stand-in", extra={})

    class Encoder:
        build_s, info = 0.0, {}

        def __call__(self, x, should_abort=None):
            import torch

            return {"image_embedding": torch.zeros(x.shape[0], 4, 8, 8)}

    def __init__(self, runtime: str = "torch") -> None:
        self.runtime = runtime
        self.encoder = self.torch_encoder = self.Encoder()

    def prepare(self, image):
        return np.zeros((256, 256, 3), np.float32), None  # (model input, grid mapping) as Predictor.prepare

    def suggested_batch_size(self) -> int:
        return 1

    def encode(self, image, should_abort=None):
        return self.encode_batch([image], should_abort)[0]

    def encode_batch(self, images, should_abort=None):
        import torch

        from samunet_core.predictor import Embedding

        return [Embedding(self.encoder_id, {"image_embedding": torch.zeros(1, 4, 8, 8)},
                          np.asarray(image).shape[:2], (256, 256)) for image in images]

    def predict(self, embedding, points=None, labels=None, boxes=None, mask_input=None, return_masks=True):
        from samunet_core.predictor import Prediction

        h, w = embedding.original_size
        if boxes is not None:
            rects = np.asarray(boxes, np.float64).reshape(-1, 4)
        else:
            x, y = np.asarray(points, np.float64).reshape(-1, 2)[0]
            rects = np.array([[x - 3, y - 3, x + 3, y + 3]])
        masks = np.zeros((len(rects), h, w), bool)
        for n, (x0, y0, x1, y1) in enumerate(rects):
            masks[n, max(int(y0), 0):int(y1) + 1, max(int(x0), 0):int(x1) + 1] = True
        return Prediction(masks if return_masks else np.zeros((0,), bool),
                          np.zeros((len(rects), 1, 256, 256), np.float32), np.full(len(rects), 0.9, np.float32))


def write_manifest_files(root: Path, manifest: dict) -> Path:
    """Small real files at the paths the manifest example names; returns the manifest's path."""
    import SimpleITK as sitk
    from PIL import Image

    for case in manifest["cases"]:
        if case["kind"] == "2d":
            yy, xx = np.mgrid[:240, :256]
            inside = ((xx - 125) / 80.0) ** 2 + ((yy - 110) / 70.0) ** 2 <= 1
            (root / case["image"]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.where(inside, 200, 40).astype(np.uint8), mode="L").save(root / case["image"])
            for target in case["targets"]:
                Image.fromarray(np.where(inside, 255, 0).astype(np.uint8), mode="L").save(root / target["mask"])
        else:
            labels = np.zeros((6, 48, 48), np.uint8)
            labels[1:5, 8:20, 8:20] = 1
            labels[2:5, 26:40, 24:44] = 2
            image = np.where(labels == 1, 40, np.where(labels == 2, -800, -100)).astype(np.int16)
            assert set(case["labels"]) == {"1", "2"}
            for array, key in ((image, "image"), (labels, "labelmap")):
                itk = sitk.GetImageFromArray(array)
                itk.SetSpacing((0.8, 0.8, 2.5))
                itk.SetOrigin((-20.0, -20.0, 10.0))
                (root / case[key]).parent.mkdir(parents=True, exist_ok=True)
                sitk.WriteImage(itk, str(root / case[key]))
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return path


def test_job_file_example_reads_as_the_batch_reads_it(tmp_path):
    import shutil

    from samunet_core.batch import JOB_FILE_COLUMNS, read_job_file

    lang, body = examples()["job-file"]
    assert lang == "csv" and body.splitlines()[0].split(",")[:3] == list(JOB_FILE_COLUMNS)
    shutil.copy(CT, tmp_path / "CTChest4.nrrd")
    (tmp_path / "jobs.csv").write_text(body)
    first, second = read_job_file(tmp_path / "jobs.csv")
    assert first.volume == str(tmp_path / "CTChest4.nrrd") and first.prompts == str(tmp_path / "ctchest_prompts.json")
    assert first.output == str(tmp_path / "out/CTChest4.seg.nrrd") and first.overlay is None
    assert second.overlay == str(tmp_path / "out/CTChest4_again.png")
    assert read_job_file(tmp_path / "jobs.csv", "/data/out")[0].output == "/data/out/out/CTChest4.seg.nrrd"
    for column in JOB_FILE_COLUMNS:
        assert f"| `{column}` | yes |" in DOC.read_text(encoding="utf-8")


def test_manifest_doc_names_every_key_and_modality():
    from samunet_core.manifest import KINDS, MODALITIES

    text = DOC.read_text(encoding="utf-8")
    words = ("name", "cases", "id", "kind", "modality", "image", "targets", "mask", "labelmap", "labels", "window",
             "target_windows", *KINDS, *MODALITIES)
    missing = [w for w in words if f'"{w}"' not in text]
    assert not missing, f"docs/formats.md does not document {missing}"


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """The manifest example, loaded and evaluated (box protocol, one overlay) with the stand-in model."""
    from samunet_core.evaluate import evaluate
    from samunet_core.manifest import load_manifest

    root = tmp_path_factory.mktemp("manifest_example")
    path = write_manifest_files(root, example_json("manifest"))
    manifest = load_manifest(path)
    out = root / "out"
    summary = evaluate(manifest, StandInPredictor(), "box", out, manifest_path=str(path), overlays=1, progress=False)
    return SimpleNamespace(manifest=manifest, out=out, summary=summary)


def test_manifest_example_loads(eval_run):
    example = example_json("manifest")
    manifest = eval_run.manifest
    assert manifest.name == example["name"]
    two_d, three_d = manifest.cases
    assert (two_d.kind, two_d.modality, [t.name for t in two_d.targets]) == ("2d", "US", ["fetal_head"])
    assert (three_d.kind, three_d.labels, three_d.window) == ("3d", {1: "heart", 2: "right_lung"}, (-160.0, 240.0))
    assert three_d.window_for(2) == (-1350.0, 150.0) and three_d.window_for(1) == (-160.0, 240.0)


def test_results_csv_example_has_the_written_columns(eval_run):
    from samunet_core.evaluate import CSV_COLUMNS

    lang, body = examples()["results-csv"]
    assert lang == "csv"
    documented = list(csv.reader(io.StringIO(body)))
    written = list(csv.reader(io.StringIO((eval_run.out / "results.csv").read_text(encoding="utf-8"))))
    assert documented[0] == written[0] == list(CSV_COLUMNS)
    assert all(len(row) == len(CSV_COLUMNS) for row in documented[1:])
    assert {(r[0], r[3]) for r in documented[1:]} <= {(r[0], r[3]) for r in written[1:]}
    text = DOC.read_text(encoding="utf-8")
    assert not [c for c in CSV_COLUMNS if f"| `{c}` |" not in text], "a results.csv column is not in the table"


@pytest.fixture(scope="module")
def interactive_run(tmp_path_factory):
    """The manifest example's 3d case through the interactive3d protocol with the stand-in model."""
    from samunet_core.evaluate import evaluate
    from samunet_core.manifest import load_manifest

    root = tmp_path_factory.mktemp("interactive_example")
    path = write_manifest_files(root, example_json("manifest"))
    out = root / "out"
    summary = evaluate(load_manifest(path), StandInPredictor(), "interactive3d", out, manifest_path=str(path),
                       progress=False, start="box2d", clicks=2)
    return SimpleNamespace(out=out, summary=summary)


def test_interactive3d_results_csv_example(interactive_run):
    from samunet_core.evaluate import CSV_COLUMNS

    lang, body = examples()["results-csv-interactive3d"]
    assert lang == "csv"
    documented = list(csv.DictReader(io.StringIO(body)))
    written = list(csv.DictReader(io.StringIO((interactive_run.out / "results.csv").read_text(encoding="utf-8"))))
    assert list(documented[0]) == list(written[0]) == list(CSV_COLUMNS)
    for row in documented + written:
        dice = [float(v) for v in row["dice_per_click"].split()]
        assert len(dice) == len(row["nsd_per_step"].split()) == 3  # --clicks 2
        assert len(row["s_per_step"].split()) == int(row["n_clicks"]) + 1
        assert float(row["dsc_auc"]) == pytest.approx(np.trapezoid(dice[1:]), abs=1e-3)
        assert row["prompt_file"] == "prompts/{}__{}__step{}.json".format(row["case_id"].replace("/", "_"),
                                                                          row["target"], row["n_clicks"])
    for row in written:
        assert (interactive_run.out / row["prompt_file"]).is_file()


def _key_tree(value):
    """Nested dict keys (values of non-dict entries dropped) for comparing structures."""
    if isinstance(value, dict):
        return {key: _key_tree(v) for key, v in value.items()}
    return None


def test_summary_json_example_has_the_written_keys(eval_run):
    written = json.loads((eval_run.out / "summary.json").read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(eval_run.summary))
    assert _key_tree(example_json("summary-json")) == _key_tree(written)
    text = DOC.read_text(encoding="utf-8")
    assert not [k for k in written if f"`{k}`" not in text], "a summary.json key is not in the table"


def test_interactive3d_summary_example_has_the_added_keys(eval_run, interactive_run):
    written = json.loads((interactive_run.out / "summary.json").read_text(encoding="utf-8"))
    box_keys = set(json.loads((eval_run.out / "summary.json").read_text(encoding="utf-8")))
    fragment = example_json("summary-interactive3d")
    added = set(written) - box_keys
    assert added == set(fragment) - {"protocol", "by_modality"} and box_keys - {"overlays"} <= set(written)
    assert _key_tree(fragment["by_modality"]) == _key_tree(written["by_modality"])
    assert {k: written[k] for k in ("protocol", "start", "clicks")} == {"protocol": "interactive3d", "start": "box2d",
                                                                       "clicks": 2}
    assert len(written["mean_dice_per_step"]) == len(fragment["mean_dice_per_step"]) == 3
    text = DOC.read_text(encoding="utf-8")
    assert not [k for k in added if f"`{k}`" not in text], "an interactive3d summary key is not in the table"


# ---------------------------------------------------------------------------------------------------------------------
# samunet bench
# ---------------------------------------------------------------------------------------------------------------------
class StandInTinyViT(StandInPredictor):
    """The default model's outputs (fused embedding and msf), for the bench's per-output keys."""

    model_id = encoder_id = "samunet_tinyvit"

    class Encoder(StandInPredictor.Encoder):
        def __call__(self, x, should_abort=None):
            import torch

            return {"image_embedding": torch.zeros(x.shape[0], 4, 8, 8), "msf": torch.zeros(x.shape[0], 2, 16, 16)}


def test_bench_json_example_has_the_written_keys(monkeypatch):
    from samunet_core import bench, predictor

    monkeypatch.setattr(predictor, "load_predictor",
                        lambda *args, runtime="torch", **kwargs: StandInTinyViT(runtime))
    document = bench.run_bench("samunet_tinyvit", device="cpu", volume_path=CT, encoder_runs=20, decoder_runs=100,
                               volume_slices=2, memory_slices=2, runtimes=["torch"], isolate=False,
                               progress=lambda _message: None)
    document = json.loads(json.dumps(document))
    example = example_json("bench-json")
    assert _key_tree(example) == _key_tree(document)
    per_run = _key_tree({k: v for k, v in example.items()
                         if k not in ("volume_path", "torch", "runs", "runtimes", "wall_s")})
    assert _key_tree(example["runs"]["cpu"]) == per_run
    assert document["runtime"] == example["runtime"] and "torch" in document["runtimes"]
    for name, run in example["runtimes"].items():  # the other runtimes: the same keys without the memory check
        expected = per_run if name == example["runtime"] else {k: v for k, v in per_run.items() if k != "memory_check"}
        assert _key_tree(run) == expected, name
    text = DOC.read_text(encoding="utf-8")
    assert "`cuda_max_memory_allocated_bytes`" in text  # CUDA runs only: not in the CPU example
    assert not [k for k in document if f"`{k}`" not in text], "a bench key is not in the table"
    assert not [k for k in document["memory_check"] if f"`{k}`" not in text]
