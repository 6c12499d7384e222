"""EmbeddingCache: hits, misses, LRU eviction, the byte bound, fp16 storage and the disk store."""

import threading

import numpy as np
import pytest
import torch

from samunet_core.cache import EmbeddingCache, content_hash
from samunet_core.predictor import Embedding


def make_embedding(seed: int, channels: int = 8) -> Embedding:
    gen = torch.Generator().manual_seed(seed)
    return Embedding("m", {"image_embedding": torch.randn(1, channels, 16, 16, generator=gen)}, (100, 80), (256, 205))


def test_hit_miss_and_identity():
    cache = EmbeddingCache(max_bytes=10 * 8 * 16 * 16 * 4)
    emb = make_embedding(0)
    assert cache.get(("m", "vol", "axial:0")) is None
    cache.put(("m", "vol", "axial:0"), emb)
    got = cache.get(("m", "vol", "axial:0"))
    assert got is not None and torch.equal(got.tensors["image_embedding"], emb.tensors["image_embedding"])
    assert got.original_size == (100, 80) and got.input_size == (256, 205)
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    assert cache.get(("other_model", "vol", "axial:0")) is None


def test_lru_eviction_respects_byte_bound():
    one = make_embedding(0).nbytes
    cache = EmbeddingCache(max_bytes=3 * one)
    for k in range(3):
        cache.put(("m", "v", str(k)), make_embedding(k))
    cache.get(("m", "v", "0"))  # 0 becomes most recent; 1 is now the oldest
    cache.put(("m", "v", "3"), make_embedding(3))
    assert ("m", "v", "1") not in cache
    assert all(("m", "v", str(k)) in cache for k in (0, 2, 3))
    assert cache.nbytes == 3 * one <= cache.max_bytes
    assert cache.stats.evictions == 1


def test_entry_larger_than_bound_is_not_kept():
    cache = EmbeddingCache(max_bytes=100)
    cache.put(("m", "v", "0"), make_embedding(0))
    assert len(cache) == 0 and cache.nbytes == 0


def test_fp16_storage_halves_bytes_and_returns_fp32():
    emb = make_embedding(1)
    cache = EmbeddingCache(fp16=True)
    cache.put(("m", "v", "0"), emb)
    assert cache.nbytes == emb.nbytes // 2
    got = cache.get(("m", "v", "0"))
    assert got.tensors["image_embedding"].dtype == torch.float32
    assert torch.allclose(got.tensors["image_embedding"], emb.tensors["image_embedding"], atol=2e-3)


def test_disk_store_survives_a_new_cache(tmp_path):
    emb = make_embedding(2)
    first = EmbeddingCache(disk_dir=tmp_path)
    first.put(("m", "vol", "axial:4"), emb)
    assert first.stats.disk_writes == 1
    reopened = EmbeddingCache(disk_dir=tmp_path)
    got = reopened.get(("m", "vol", "axial:4"))
    assert got is not None and torch.equal(got.tensors["image_embedding"], emb.tensors["image_embedding"])
    assert reopened.stats.disk_hits == 1
    assert not list(tmp_path.rglob("*.tmp")), "no temporary files may be left behind"


def test_damaged_disk_entry_is_dropped(tmp_path):
    cache = EmbeddingCache(disk_dir=tmp_path)
    cache.put(("m", "vol", "0"), make_embedding(3))
    path = cache.disk_path(("m", "vol", "0"))
    path.write_bytes(b"not a torch file")
    assert EmbeddingCache(disk_dir=tmp_path).get(("m", "vol", "0")) is None
    assert not path.exists()


def test_thread_safety_under_concurrent_put_get():
    one = make_embedding(0).nbytes
    cache = EmbeddingCache(max_bytes=5 * one)
    errors = []

    def hammer(offset: int) -> None:
        try:
            for i in range(200):
                key = ("m", "v", str((i + offset) % 9))
                cache.put(key, make_embedding(i % 9))
                cache.get(key)
                assert cache.nbytes <= cache.max_bytes
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.nbytes == sum(e.nbytes for e in cache._entries.values()) <= 5 * one


@pytest.mark.parametrize("change", ["pixel", "shape", "extra"])
def test_content_hash_sees_every_change(change):
    base = np.zeros((4, 5), np.uint8)
    other = base.copy()
    extra = ()
    if change == "pixel":
        other[2, 3] = 1
    elif change == "shape":
        other = np.zeros((5, 4), np.uint8)
    else:
        extra = ((-160, 240),)
    assert content_hash(base) != content_hash(other, *extra)
    assert content_hash(base) == content_hash(base.copy())
