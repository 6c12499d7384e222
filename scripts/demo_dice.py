"""3D Dice of the README demo (`make demo`) against the reference segmentation.

Runs the demo's `segment_volume` (CTChest4, the two lung boxes of Resources/Samples/ctchest_prompts.json, preset
"lung") and prints, per lung, the 3D Dice against the semi-automatic reference in
shared/data/slicerio_ctchest/Segmentation.seg.nrrd, the voxels written and the slices reached.

    .venv/bin/python scripts/demo_dice.py [--model samunet_tinyvit] [--threads 2] [--cache-dir DIR]

--cache-dir keeps the slice embeddings on disk so reruns (other stop rules) skip the encoder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_REFERENCE = ROOT.parent / "shared" / "data" / "slicerio_ctchest" / "Segmentation.seg.nrrd"
if not DEFAULT_REFERENCE.is_file():
    DEFAULT_REFERENCE = Path("/work/shared/data/slicerio_ctchest/Segmentation.seg.nrrd")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def propagation_params(overrides: list[str]) -> Any:
    """The walk's parameters: DEFAULT_PARAMS with FIELD=VALUE overrides (typed like the field's default)."""
    from samunet_core.propagate import DEFAULT_PARAMS

    changes: dict[str, Any] = {}
    for item in overrides:
        field, _, value = item.partition("=")
        if not hasattr(DEFAULT_PARAMS, field):
            raise SystemExit(f"--set {item}: PropagationParams has no field {field!r}")
        default = getattr(DEFAULT_PARAMS, field)
        if isinstance(default, bool):
            changes[field] = value.lower() in ("1", "true", "yes")
        elif value.lower() == "none":
            changes[field] = None
        elif isinstance(default, int):
            changes[field] = int(value)
        else:
            changes[field] = float(value)
    return DEFAULT_PARAMS.replace(**changes) if changes else DEFAULT_PARAMS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="registry model (default: the registry's default)")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="embedding cache folder (default: in memory)")
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE))
    parser.add_argument("--volume", default=str(ROOT / "Resources" / "Samples" / "CTChest4.nrrd"))
    parser.add_argument("--prompts", default=str(ROOT / "Resources" / "Samples" / "ctchest_prompts.json"))
    parser.add_argument("--preset", default="lung")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a PropagationParams field (repeatable), e.g. --set min_slice_iou=0.3")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from samunet_core.cache import EmbeddingCache, folder_cache
    from samunet_core.io.segmentations import read_segmentation
    from samunet_core.io.volumes import read_volume
    from samunet_core.predictor import load_predictor
    from samunet_core.prompts import read_prompt_file
    from samunet_core.segment import segment_volume

    volume = read_volume(args.volume)
    prompts = read_prompt_file(args.prompts)
    reference = read_segmentation(args.reference)
    if not reference.geometry.same_grid(volume.geometry):
        raise SystemExit(f"the reference {args.reference} is not on the volume's grid")
    predictor = load_predictor(args.model, runtime=args.runtime)
    cache = folder_cache(args.cache_dir) if args.cache_dir else EmbeddingCache()
    t0 = time.perf_counter()
    params = propagation_params(args.set)
    result = segment_volume(volume, prompts, predictor, preset=args.preset, cache=cache, params=params)
    seconds = time.perf_counter() - t0
    print(f"{predictor.model_id} ({predictor.runtime}), {args.threads} threads: segmented in {seconds:.1f} s "
          f"({result.encodes} slices encoded)")
    ref_by_name = {s.name.lower(): np.asarray(s.mask, bool) for s in reference.segments}
    dices = []
    for seg in result.segmentation.segments:
        ref = ref_by_name.get(seg.name.lower())
        if ref is None:
            print(f"  {seg.name}: no reference segment of that name")
            continue
        pred = np.asarray(seg.mask, bool).reshape(ref.shape)
        d = dice(pred, ref)
        dices.append(d)
        slices = result.slice_masks[seg.name].any(axis=(1, 2))
        reached = np.flatnonzero(slices)
        span = f"{reached[0]}-{reached[-1]}" if reached.size else "none"
        print(f"  {seg.name}: 3D Dice {d:.3f}  (reference {int(ref.sum())} voxels, written {int(pred.sum())} "
              f"on {int(slices.sum())} slices, {span})")
    if dices:
        print(f"  mean 3D Dice {np.mean(dices):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
