"""Evaluate several models on one manifest with `samunet eval`'s own `evaluate`, sharing one TinyViT pass per slice.

Every model here has LiteMedSAM's frozen TinyViT, so a slice is encoded once into a disk cache
(`train/validate.CachedEncoderPredictor`); SAM-UNet on TinyViT adds its CNN branch and fusion on top. Numbers equal
`samunet eval --model M` (same code path from the embedding on).

usage: python scripts/compare_models.py MANIFEST --out DIR --cache-dir DIR [--slice-stride S]
           [--protocols box,point1,point3,point5,propagate] MODEL [MODEL ...]
MODEL: a registry name (litemedsam, litemedsam_clicks, samunet_tinyvit) or NAME=DELTA.pt for a trained delta not
(yet) in the registry, e.g. litemedsam_clicks_v5=/tmp/v5/litemedsam_clicks_v5.pt (its family is read from the file).
Writes DIR/<name>_<protocol>/summary.json (+ results.csv), the layout scripts/make_tables.py reads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def load_candidate(spec: str) -> tuple[str, Any, str, Any]:
    """'name' or 'name=delta.pt' -> (name, model, predictor family, WeightsInfo)."""
    from samunet_core.checkpoints import sha256_of_file
    from samunet_core.registry import WeightsInfo, get_spec, load_model

    if "=" not in spec:
        model, info = load_model(spec)
        return spec, model, get_spec(spec).family, info
    name, path = spec.split("=", 1)
    info = WeightsInfo(path, sha256_of_file(path))
    from samunet_core.train.delta import read_delta
    from samunet_core.train.weights_source import LiteMedSAMDeltaWeights, SAMUNetTinyViTDeltaWeights, base_weights

    metadata = read_delta(path).get("metadata", {})
    if metadata.get("family") == "samunet_tinyvit":
        from samunet_core.modeling.samunet_tinyvit import build_samunet_tinyvit

        backbone = metadata.get("backbone", "resnet34")
        model = build_samunet_tinyvit(None, backbone=backbone, pretrained_cnn=False,
                                      fusion=metadata.get("fusion", "after"))
        SAMUNetTinyViTDeltaWeights(Path(path).name, "", backbone).load_into(model, path)
        return name, model, "samunet_tinyvit", info
    from samunet_core.modeling.litemedsam import build_litemedsam

    base_weights().require()
    model = build_litemedsam()
    LiteMedSAMDeltaWeights(Path(path).name, "").load_into(model, path)
    return name, model, "litemedsam", info


def main() -> int:
    import torch

    from samunet_core.evaluate import evaluate
    from samunet_core.manifest import load_manifest
    from samunet_core.predictor import Predictor
    from samunet_core.train.validate import CachedEncoderPredictor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--slice-stride", type=int, default=1)
    parser.add_argument("--protocols", default="box,point1,point3,point5,propagate")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest = load_manifest(args.manifest)
    for spec in args.models:
        name, model, family, info = load_candidate(spec)
        predictor = CachedEncoderPredictor(Predictor(model, name, family, device="cpu", weights=info), args.cache_dir)
        for protocol in args.protocols.split(","):
            out = Path(args.out) / f"{name}_{protocol}"
            if (out / "summary.json").is_file():
                print(f"{out} exists, skipped")
                continue
            t0 = time.perf_counter()
            summary = evaluate(manifest, predictor, protocol, out, manifest_path=args.manifest,
                               slice_stride=args.slice_stride, progress=False)
            print(json.dumps({"model": name, "protocol": protocol, "n": summary["n_targets"],
                              "mean_dice": round(summary["mean_dice"], 4), "s": round(time.perf_counter() - t0)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
