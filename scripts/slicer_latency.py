#!/usr/bin/env python3
"""Click-to-segment latency through the Slicer module's controller, with real MRML (slicer-core) and the default model.

Measured from a positive point placed (MRML event -> controller -> session worker -> decode) to the segment updated in
the segmentation node. The first click on a slice includes its encode; later clicks reuse the cached embedding, which
is the interactive case. Optionally writes an overlay screenshot of the result.

    .venv/bin/python scripts/slicer_latency.py [--repeats 20] \
        [--screenshot Resources/Screenshots/SAMUNetSlicer_lung.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMUNetSlicer"))
CT = next(p for p in (REPO / "Testing/data/slicerio_ctchest/CTChest4.nrrd", REPO / "Resources/Samples/CTChest4.nrrd")
          if p.is_file())
K = 12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()

    import slicer

    from samunet_core.predictor import load_predictor
    from SAMUNetSlicerLib.controller import InteractionController
    from SAMUNetSlicerLib.replay import ReplayScene, place_point

    mrml = ReplayScene()
    window = (-1350.0, 150.0)
    volume = mrml.load_volume(CT, window)
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seg.CreateDefaultDisplayNodes()
    segment_id = seg.GetSegmentation().AddEmptySegment("right lung")
    controller = InteractionController(mrml.scene, load_predictor(None, device=args.device), prefetch_radius=0)
    controller.start(volume, seg, segment_id, window=window)
    frame = controller.frame("axial")

    def click(row: float, col: float) -> float:
        """One positive click on slice K: markup event -> controller -> session worker -> segment written."""
        ras = frame.display_to_world([[K, row, col]])[0]
        mrml.show_slice("Red", ras)
        t0 = time.perf_counter()
        place_point(controller.positive_node, ras)
        controller.wait()
        return (time.perf_counter() - t0) * 1e3

    cold = click(62, 40)  # includes the slice's encode
    warm = []
    for i in range(args.repeats):
        controller.clear()  # each measured click is the first of its sequence: one decode
        warm.append(click(58 + (i % 5), 38 + (i % 3)))
    mask = frame.slice_of(slicer.util.arrayFromSegmentBinaryLabelmap(seg, segment_id, volume), K)
    report = {"device": args.device, "model": controller.predictor.model_id, "volume": CT.name, "slice": K,
              "cold_ms_with_encode": round(cold, 1),
              "warm_ms": {"p50": round(float(np.percentile(warm, 50)), 1),
                          "p95": round(float(np.percentile(warm, 95)), 1), "n": len(warm)},
              "mask_pixels": int(mask.sum())}
    print(json.dumps(report, indent=1))
    if args.screenshot:
        corners = frame.display_to_world([[K, 31, 18], [K, 93, 66]])
        write_overlay(controller._view("axial").slice_uint8(K), mask > 0, frame, corners, K, args.screenshot)
    controller.close()
    return 0


def write_overlay(image: np.ndarray, mask: np.ndarray, frame, corners, k: int, path: Path) -> None:
    """The slice as the model saw it, the mask in green, the box prompt in yellow, 4x upscaled."""
    from PIL import Image, ImageDraw

    from samunet_core.transforms import to_rgb

    rgb = to_rgb(image).astype(np.float32)
    rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array([40, 220, 90])
    scale = 4
    out = Image.fromarray(rgb.astype(np.uint8)).resize((image.shape[1] * scale, image.shape[0] * scale),
                                                      Image.NEAREST)
    display = frame.world_to_display(corners)
    x0, x1 = sorted(display[:, 2] * scale + scale / 2)
    y0, y1 = sorted(display[:, 1] * scale + scale / 2)
    ImageDraw.Draw(out).rectangle([x0, y0, x1, y1], outline=(250, 210, 60), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    out.save(tmp)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
