"""Per-slice embedding cache: an LRU bounded in bytes, thread-safe, optional fp16 storage, optional disk store.

Keys are (model id, content key, slice id): the content key is a hash of the pixels the model saw (a whole
volume after windowing, or one 2D image), the slice id says which slice of it ("axial:12"; "" for a 2D image). The
disk store files the same embedding under a sha256 of that key and the model id, so reopening a volume (or rerunning
a batch) needs no re-encoding.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core.predictor import Embedding

# 384 MiB: 64 slices of the default model (6 MiB each), 96 of LiteMedSAM's. Measured: a session precomputing a
# 300-slice 512x512 CT with the OpenVINO runtime peaks at 1.47 GiB resident with 512 MiB (docs/speed.md), over the
# 1.5 GB target; slices beyond the cap come back from the disk cache or are re-encoded.
DEFAULT_MAX_BYTES = 384 * 1024 * 1024
CacheKey = tuple[str, str, str]


def content_hash(array: np.ndarray, *extra: Any) -> str:
    """A sha256 of an array's shape, dtype and bytes (plus any extra identity, e.g. a window)."""
    digest = hashlib.sha256()
    digest.update(repr((array.shape, str(array.dtype), extra)).encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def volume_key(slices_u8: np.ndarray, axis: str) -> str:
    """Identity of a volume as the model sees it along one axis (S x H x W[x3] uint8 displayed slices): the CLI, the
    Slicer module and the server key their sessions by it, so one disk cache serves all of them."""
    return content_hash(np.ascontiguousarray(slices_u8), axis)


def folder_cache(folder: str | os.PathLike, **options: Any) -> EmbeddingCache:
    """The EmbeddingCache persisting under a user's cache folder (`--cache-dir`): its `embeddings/` subfolder, the
    same for every front end, so `samunet segment`, `samunet batch` and `replay` reuse each other's embeddings."""
    return EmbeddingCache(disk_dir=Path(folder) / "embeddings", **options)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    disk_hits: int = 0
    disk_writes: int = 0


class EmbeddingCache:
    """LRU of Embeddings bounded by `max_bytes` (as stored); `fp16` halves the bytes; `disk_dir` persists them."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, fp16: bool = False,
                 disk_dir: str | os.PathLike | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.fp16 = fp16
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self._entries: OrderedDict[CacheKey, Embedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: CacheKey) -> Embedding | None:
        """The embedding in fp32 (as the decoder wants it), or None. Falls back to the disk store."""
        with self._lock:
            stored = self._entries.get(key)
            if stored is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
        if stored is None:
            stored = self._read_disk(key)
            if stored is None:
                with self._lock:
                    self.stats.misses += 1
                return None
            with self._lock:
                self.stats.disk_hits += 1
            self._insert(key, stored)
        return self._as_fp32(stored)

    def put(self, key: CacheKey, embedding: Embedding) -> None:
        """Store an embedding (converted to fp16 if asked); evicts least recently used entries past the bound."""
        import torch

        stored = embedding.converted(dtype=torch.float16) if self.fp16 else embedding
        self._insert(key, stored)
        self._write_disk(key, stored)

    def discard(self, key: CacheKey) -> None:
        """Drop one entry from memory (the disk store keeps it)."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _insert(self, key: CacheKey, stored: Embedding) -> None:
        size = stored.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = stored
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.stats.evictions += 1

    @staticmethod
    def _as_fp32(stored: Embedding) -> Embedding:
        import torch

        first = next(iter(stored.tensors.values()))
        return stored if first.dtype == torch.float32 else stored.converted(dtype=torch.float32)

    # -- disk store -----------------------------------------------------------------------------------------------
    def disk_path(self, key: CacheKey) -> Path | None:
        if self.disk_dir is None:
            return None
        name = hashlib.sha256("\0".join(key).encode()).hexdigest()
        return self.disk_dir / key[0] / name[:2] / f"{name}.pt"

    def _read_disk(self, key: CacheKey) -> Embedding | None:
        import torch

        path = self.disk_path(key)
        if path is None or not path.is_file():
            return None
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if tuple(blob["key"]) != key:
                return None
            return Embedding(blob["model_id"], dict(blob["tensors"]), tuple(blob["original_size"]),
                             tuple(blob["input_size"]))
        except Exception:
            # A damaged cache file is not the user's data: drop it and re-encode.
            path.unlink(missing_ok=True)
            return None

    def _write_disk(self, key: CacheKey, stored: Embedding) -> None:
        import torch

        path = self.disk_path(key)
        if path is None or path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"key": list(key), "model_id": stored.model_id,
                "tensors": {k: v.detach().cpu() for k, v in stored.tensors.items()},
                "original_size": list(stored.original_size), "input_size": list(stored.input_size)}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(blob, tmp)
            os.replace(tmp, path)
            with self._lock:
                self.stats.disk_writes += 1
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
