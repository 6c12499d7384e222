"""Encode every training image once with the frozen encoder into the engine's disk cache (resumable).

Layout under `cache_dir`: the `EmbeddingCache` store (`litemedsam/xx/<sha>.pt`, one embedding per image, keyed by
the content hash of the 8-bit image the model saw) and `items/<sha>.npz`, one per image: its target masks on the
256 model grid (bit-packed, Tx256x256), their names, the source id and the grid mapping. An item whose npz and
embedding both exist is skipped, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core.train.data import ImageRecord

MODEL_ID = "litemedsam"
GRID = 256
MIN_GRID_PIXELS = 4  # targets smaller than this on the 256 grid give no usable training signal


@dataclass
class CachedItem:
    """One encoded image: embedding cache key, masks Tx256x256 bool on the model grid (padding is background)."""

    source: str
    modality: str
    key: tuple[str, str, str]
    names: list[str]
    masks: np.ndarray
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def grid_masks(masks: list[np.ndarray], input_size: tuple[int, int]) -> np.ndarray:
    """HxW bool masks -> Tx256x256 bool on the model grid (INTER_AREA to the resized size, >= half, padded)."""
    import cv2

    h, w = input_size
    out = np.zeros((len(masks), GRID, GRID), bool)
    for i, mask in enumerate(masks):
        small = cv2.resize(mask.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_AREA)
        out[i, :h, :w] = small >= 128
    return out


def _item_path(cache_dir: Path, source: str) -> Path:
    return cache_dir / "items" / f"{hashlib.sha256(source.encode()).hexdigest()[:24]}.npz"


def _write_item(path: Path, item: CachedItem) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, source=item.source, modality=item.modality, key=np.array(item.key),
                     names=np.array(item.names), packed=np.packbits(item.masks.reshape(len(item.names), -1), axis=1),
                     original_size=np.array(item.original_size), input_size=np.array(item.input_size))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def read_item(path: Path) -> CachedItem:
    with np.load(path) as z:
        n = len(z["names"])
        masks = np.unpackbits(z["packed"], axis=1, count=GRID * GRID).reshape(n, GRID, GRID).astype(bool)
        return CachedItem(str(z["source"]), str(z["modality"]), tuple(str(k) for k in z["key"]),
                          [str(s) for s in z["names"]], masks, tuple(int(v) for v in z["original_size"]),
                          tuple(int(v) for v in z["input_size"]))


def list_items(cache_dir: str | Path) -> list[CachedItem]:
    """Every item precomputed in `cache_dir`, sorted by source id."""
    paths = sorted((Path(cache_dir) / "items").glob("*.npz"))
    return sorted((read_item(p) for p in paths), key=lambda it: it.source)


def open_cache(cache_dir: str | Path, fp16: bool = True) -> Any:
    from samunet_core.cache import EmbeddingCache

    return EmbeddingCache(max_bytes=64 * 1024 * 1024, fp16=fp16, disk_dir=cache_dir)


def precompute(records: Iterable[ImageRecord], predictor: Any, cache_dir: str | Path, *, fp16: bool = True,
               progress: bool = True, total: int | None = None) -> dict[str, int]:
    """Encode each record's image once into the disk cache and file its grid masks. Returns counts."""
    from tqdm import tqdm

    from samunet_core.cache import content_hash

    cache_dir = Path(cache_dir)
    cache = open_cache(cache_dir, fp16=fp16)
    counts = {"encoded": 0, "skipped": 0, "targets": 0, "dropped_targets": 0}
    for record in tqdm(records, total=total, desc="encode", unit="image", disable=not progress):
        path = _item_path(cache_dir, record.source)
        key = (MODEL_ID, content_hash(record.image), "")
        disk = cache.disk_path(key)
        if path.is_file() and disk is not None and disk.is_file():
            counts["skipped"] += 1
            continue
        if disk is None or not disk.is_file():
            cache.put(key, predictor.encode(record.image))
            counts["encoded"] += 1
        from samunet_core.transforms import model_resized_shape

        input_size = model_resized_shape(*record.image.shape[:2], target=GRID)
        masks = grid_masks([m for _, m in record.targets], input_size)
        keep = masks.reshape(len(masks), -1).sum(1) >= MIN_GRID_PIXELS if len(masks) else np.zeros(0, bool)
        counts["dropped_targets"] += int((~keep).sum())
        counts["targets"] += int(keep.sum())
        names = [n for (n, _), k in zip(record.targets, keep, strict=True) if k]
        _write_item(path, CachedItem(record.source, record.modality, key, names, masks[keep],
                                     tuple(record.image.shape[:2]), input_size))
    return counts
