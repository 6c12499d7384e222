"""Shared fixtures: the real LiteMedSAM predictor (loaded once) and the in-repo CT slices."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))  # not Testing/: it holds a `slicer` dir
from export_home import exports_in_a_temporary_folder  # noqa: E402,F401  (autouse: exports in a temporary folder)

DATA = Path(__file__).resolve().parents[1] / "data"
SAM_MED2D = DATA / "sam_med2d_demo"


@pytest.fixture(scope="session")
def litemedsam():
    """The base LiteMedSAM model with its real weights (fails, never skips, if they are not installed)."""
    from samunet_core.predictor import load_predictor

    return load_predictor("litemedsam", device="cpu")


@pytest.fixture(scope="session")
def default_openvino():
    """The default model with its encoder exported to OpenVINO (fp32): built once per test run in this run's
    temporary export folder, which the CLI tests' `--runtime auto` shares."""
    from samunet_core.predictor import load_predictor

    return load_predictor(device="cpu", runtime="openvino")


def sam_med2d_targets() -> list[dict[str, object]]:
    """The 30 reference rows of the four sam_med2d CT slices: case, target, reference Dice, box, mask path."""
    lines = [line for line in (SAM_MED2D / "litemedsam_box_reference.csv").read_text().splitlines()
             if not line.startswith("#")]
    rows = []
    for row in csv.DictReader(lines):
        case = row["case_id"].split("/")[1]
        target = row["target"]
        suffix = "" if target[-4] == "_" and target[-3:].isdigit() else "_000"
        rows.append({"case": case, "target": target, "ref_dice": float(row["dice"]),
                     "box": [int(v) for v in row["prompt"].split()[1:]],
                     "mask": SAM_MED2D / "masks" / f"{case}_{target}{suffix}.png"})
    return rows


def load_image(case: str) -> np.ndarray:
    return np.array(Image.open(SAM_MED2D / "images" / f"{case}.png"))


def load_mask(path: Path) -> np.ndarray:
    return np.array(Image.open(path)) > 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def random_sam_vit_b_state(seed: int = 3) -> dict:
    """A randomly initialised stand-in with exactly the original SAM ViT-B checkpoint's layout (position embedding and
    relative-position tables drawn too, so their interpolation is visible)."""
    import torch

    from samunet_core.modeling.sam_parts import build_original_sam_vit_b

    torch.manual_seed(seed)
    sam = build_original_sam_vit_b()
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if name == "image_encoder.pos_embed" or "rel_pos" in name:
                p.normal_()
    return sam.state_dict()


def one_click_dice(predictor, embedding, masks) -> list[float]:
    """Dice of each mask against the model's answer to one positive click at its most interior point (point1)."""
    from samunet_core import metrics

    out = []
    for mask in masks:
        x, y = metrics.interior_point(metrics.largest_component(mask))
        pred = predictor.predict(embedding, points=np.array([[x, y]], float), labels=np.array([1])).masks[0]
        out.append(metrics.dice(pred, mask))
    return out
