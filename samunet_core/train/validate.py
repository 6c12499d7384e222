"""Validation with `samunet eval`'s own code, sharing one embedding cache between models.

The base and the fine-tuned model share the frozen image encoder, so a slice's embedding is the same for both:
`CachedEncoderPredictor` answers `encode` from an fp32 disk cache (content-keyed) and leaves decoding to the model.
`evaluate_all` runs `box` and `point5` through `samunet_core.evaluate.evaluate`; `point1` and `point3` are read off
point5's per-click Dice (the click sequence is deterministic, so they equal separate point1/point3 runs).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

ENCODER_ID = "litemedsam"  # both models encode with this encoder


class CachedEncoderPredictor:
    """A Predictor whose `encode` goes through a disk-backed EmbeddingCache (fp32, exact) of the frozen TinyViT's
    embedding, keyed by image content. For SAM-UNet on TinyViT the cached embedding feeds the model's CNN branch and
    fusion (`model.encode(x, image_embedding=E)`), so every model in a validation shares one TinyViT pass per image."""

    def __init__(self, predictor: Any, cache_dir: str | Path) -> None:
        from samunet_core.cache import EmbeddingCache
        from samunet_core.train.loop import model_family

        self.predictor = predictor
        self.model_id = predictor.model_id
        self.encoder_id = predictor.encoder_id
        self.weights = predictor.weights
        self.device = predictor.device
        self.fused = model_family(predictor.model) == "samunet_tinyvit"
        self.cache = EmbeddingCache(max_bytes=256 * 1024 * 1024, fp16=False, disk_dir=cache_dir)

    def _model_input(self, image: np.ndarray) -> tuple[Any, Any]:
        """(1x3x256x256 model input on the device, grid mapping)."""
        import torch

        array, mapping = self.predictor.prepare(image)
        return torch.from_numpy(array).permute(2, 0, 1)[None].to(self.device), mapping

    def encode(self, image: np.ndarray) -> Any:
        import torch

        from samunet_core.cache import content_hash
        from samunet_core.predictor import Embedding

        key = (ENCODER_ID, content_hash(np.asarray(image)), "")
        embedding = self.cache.get(key)
        x, mapping = self._model_input(image) if self.fused else (None, None)
        if embedding is None:
            if self.fused:
                with torch.inference_mode():
                    tensors = {"image_embedding": self.predictor.model.image_encoder(x)}
                embedding = Embedding(ENCODER_ID, tensors, mapping.original_size, mapping.input_size)
            else:
                embedding = self.predictor.encode(image)
            self.cache.put(key, Embedding(ENCODER_ID, embedding.tensors, embedding.original_size,
                                          embedding.input_size))
        tensors = embedding.tensors
        if self.fused:
            with torch.inference_mode():
                tensors = self.predictor.model.encode(x, image_embedding=tensors["image_embedding"].to(self.device))
        return Embedding(self.encoder_id, tensors, embedding.original_size, embedding.input_size)

    def predict(self, embedding: Any, **prompts: Any) -> Any:
        return self.predictor.predict(embedding, **prompts)


def click_protocols_from_point5(results_csv: Path) -> dict[str, dict[str, Any]]:
    """{'point1'|'point3'|'point5': {'n_targets', 'mean_dice', 'by_modality'}} from a point5 results.csv."""
    with open(results_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for n in (1, 3, 5):
        by_mod: dict[str, list[float]] = {}
        values = []
        for row in rows:
            per_click = [float(v) for v in row["dice_per_click"].split()]
            value = per_click[min(n, len(per_click)) - 1]
            values.append(value)
            by_mod.setdefault(row["modality"], []).append(value)
        out[f"point{n}"] = {"n_targets": len(values), "mean_dice": round(float(np.mean(values)), 6),
                            "by_modality": {m: {"n": len(v), "mean_dice": round(float(np.mean(v)), 6)}
                                            for m, v in by_mod.items()}}
    return out


def evaluate_all(manifest_path: str | Path, predictor: Any, cache_dir: str | Path, out_dir: str | Path,
                 slice_stride: int = 1, progress: bool = True) -> dict[str, Any]:
    """box and point5 via samunet eval's `evaluate`, point1/point3 derived; writes OUT/<protocol>/ and
    OUT/summary_all.json. Returns {protocol: {'n_targets', 'mean_dice', 'by_modality'}}."""
    from samunet_core.evaluate import evaluate
    from samunet_core.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    cached = CachedEncoderPredictor(predictor, cache_dir)
    out_dir = Path(out_dir)
    table: dict[str, Any] = {}
    for protocol in ("box", "point5"):
        summary = evaluate(manifest, cached, protocol, out_dir / protocol, manifest_path=str(manifest_path),
                           slice_stride=slice_stride, progress=progress)
        if protocol == "box":
            table["box"] = {k: summary[k] for k in ("n_targets", "mean_dice", "by_modality")}
        else:
            table.update(click_protocols_from_point5(out_dir / protocol / "results.csv"))
    (out_dir / "summary_all.json").write_text(json.dumps({"model": predictor.model_id, **table}, indent=1) + "\n")
    return table
