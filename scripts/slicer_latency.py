#!/usr/bin/env python3
"""Prompt-to-segment latency through the Slicer module's Lib path, with real MRML (slicer-core) and LiteMedSAM.

Measured from the markup change (an ROI moved: MRML event -> observer -> session worker -> decode) to the segment
updated in the segmentation node. The first prompt on a slice includes its encode; later prompts reuse the cached
embedding, which is the interactive case. Optionally writes an overlay screenshot of the result.

    .venv/bin/python scripts/slicer_latency.py [--repeats 20] \
        [--screenshot Resources/Screenshots/SAMUNetSlicer_lung.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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
    from SAMUNetSlicerLib.interactive import InteractiveSegmenter
    from SAMUNetSlicerLib.prompts import PromptObserver

    scene = slicer.vtkMRMLScene()
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    vol_logic = slicer.vtkSlicerVolumesLogic()
    vol_logic.SetMRMLScene(scene)
    slicer.mrmlScene = scene
    slicer.modules = SimpleNamespace(segmentations=SimpleNamespace(logic=lambda: seg_logic),
                                     volumes=SimpleNamespace(logic=lambda: vol_logic))
    volume = vol_logic.AddArchetypeVolume(str(CT), "CTChest4", 0)
    volume.GetDisplayNode().AutoWindowLevelOff()
    volume.GetDisplayNode().SetWindowLevel(1500, -600)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seg.CreateDefaultDisplayNodes()
    segment_id = seg.GetSegmentation().AddEmptySegment("right lung")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")

    predictor = load_predictor("litemedsam", device=args.device)
    segmenter = InteractiveSegmenter(volume, seg, segment_id, predictor, prefetch_radius=0)
    pending: list = []

    stages: list[dict] = []

    def prompt(center) -> float:
        t0 = time.perf_counter()
        roi.SetCenterWorld(*center)  # the MRML event drives everything from here
        while pending:
            update = pending.pop(0).result()
            t1 = time.perf_counter()
            segmenter.apply(update)
            stages.append({**update.timings_ms, "model_ms": (t1 - t0) * 1e3,
                           "write_ms": (time.perf_counter() - t1) * 1e3})
        return (time.perf_counter() - t0) * 1e3

    frame = segmenter.frame
    corners = frame.display_to_world([[K, 31, 18], [K, 93, 66]])  # the right lung's box on slice 12
    centre = corners.mean(0)
    roi.SetCenterWorld(*(centre + [0, 0, 100.0]))  # placed off this slice first, then moved onto it
    roi.SetSizeWorld(*(np.abs(corners[1] - corners[0]) + [0, 0, 1.0]))
    observer = PromptObserver(lambda: pending.extend(segmenter.prompts_changed(observer.read())), roi_node=roi)
    cold = prompt(centre + [0.5, 0, 0])
    warm = [prompt(centre + [((i % 5) - 2) * 1.5, 0, 0]) for i in range(args.repeats)]
    mask = frame.slice_of(slicer.util.arrayFromSegmentBinaryLabelmap(seg, segment_id, volume), K)
    report = {"device": args.device, "volume": CT.name, "slice": K, "cold_ms_with_encode": round(cold, 1),
              "warm_ms": {"p50": round(float(np.percentile(warm, 50)), 1),
                          "p95": round(float(np.percentile(warm, 95)), 1), "n": len(warm)},
              "warm_stages_ms_p50": {key: round(float(np.median([s[key] for s in stages[-len(warm):]])), 1)
                                     for key in stages[-1]},
              "mask_pixels": int(mask.sum())}
    print(json.dumps(report, indent=1))
    if args.screenshot:
        write_overlay(segmenter.view.slice_uint8(K), mask > 0, frame, corners, K, args.screenshot)
    observer.remove()
    segmenter.close()
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
