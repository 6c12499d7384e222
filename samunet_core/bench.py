"""Latency, throughput and memory benchmark: `samunet bench`.

Measured on real CT slices, per device (CPU always; CUDA too when present and asked for):
- encoder_ms: one slice through `Predictor.encode` (p50/p95 over >= 20 runs after warm-up);
- decoder_ms: one prompt through `Predictor.predict` without the mask upsampling (>= 100 prompts);
- click_to_mask_ms: `VolumeSession.predict` on a cached slice: prompt in, full-size HxW mask array out;
- volume_slices_per_s: a session encoding consecutive slices of a volume;
- the memory check: a session over a 300-slice 512x512 CT (real slices stacked) with the default cache cap, encoding
  enough slices to fill the cap and evict; peak RSS of the process must stay under 2 GB.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core.errors import InputError

MEMORY_CHECK_SLICES = 300
MEMORY_LIMIT_BYTES = 2 * 1024**3
CT_WINDOW = (-160.0, 240.0)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if os.uname().sysname == "Darwin" else peak * 1024)


def percentiles(values_ms: list[float]) -> dict[str, float]:
    """{'p50', 'p95', 'mean', 'min', 'n'} of a list of milliseconds."""
    arr = np.asarray(values_ms, np.float64)
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p95": round(float(np.percentile(arr, 95)), 2),
            "mean": round(float(arr.mean()), 2), "min": round(float(arr.min()), 2), "n": int(arr.size)}


def default_volume_path() -> Path:
    """A real 512x512 CT for the benchmark: the repository's DICOM test series when this is a checkout, else the CT
    that ships with slicerio (128x128, installed with the engine's dependencies)."""
    repo_series = Path(__file__).resolve().parent.parent / "Testing/data/totalsegmentator/example_ct_dicom_first4"
    if repo_series.is_dir():
        return repo_series
    import importlib.util

    spec = importlib.util.find_spec("slicerio")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("no benchmark volume found; pass --volume PATH (a CT volume or DICOM series folder)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "CTChest4.nrrd"


def load_ct(path: Path) -> np.ndarray:
    """KxHxW axial slices of a CT volume or DICOM series in its own units (HU), LPS display orientation."""
    from samunet_core.io.volumes import read_volume

    volume = read_volume(path)
    if volume.is_2d:
        raise InputError(f"{path} is a 2D image; the benchmark needs a CT volume or DICOM series")
    return np.ascontiguousarray(volume.slices("axial"))


def stacked_volume(hu_slices: np.ndarray, n_slices: int) -> np.ndarray:
    """n_slices x H x W volume made by repeating real CT slices along k (a stand-in for a long series)."""
    return np.ascontiguousarray(hu_slices[np.arange(n_slices) % hu_slices.shape[0]])


def _prompts(h: int, w: int, n: int) -> list[dict[str, Any]]:
    """n deterministic prompts spread over an HxW slice: boxes and single positive points, alternating."""
    rng = np.random.default_rng(0)
    prompts = []
    for i in range(n):
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        half = rng.uniform(0.03, 0.15) * max(h, w)
        if i % 2 == 0:
            prompts.append({"boxes": np.array([[max(cx - half, 0), max(cy - half, 0), min(cx + half, w - 1),
                                                 min(cy + half, h - 1)]])})
        else:
            prompts.append({"points": np.array([[cx, cy]]), "labels": np.array([1])})
    return prompts


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def bench_device(model: str, device: str, hu_slices: np.ndarray, encoder_runs: int = 20, decoder_runs: int = 100,
                 volume_slices: int = 8, memory_slices: int | None = None, progress: Callable[[str], None] = print
                 ) -> dict[str, Any]:
    """All measurements on one device. hu_slices: KxHxW real CT slices in HU. memory_slices: how many slices the memory
    check encodes (None: enough to fill the default cache cap and evict; 0: skip)."""
    import torch

    from samunet_core.cache import EmbeddingCache, content_hash
    from samunet_core.predictor import load_predictor
    from samunet_core.session import VolumeSession
    from samunet_core.transforms import window_to_uint8

    slices = window_to_uint8(hu_slices, *CT_WINDOW)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    predictor = load_predictor(model, device=device)
    load_s = time.perf_counter() - t0
    image = slices[len(slices) // 2]
    h, w = image.shape

    progress(f"[{device}] encoder: 2 warm-up + {encoder_runs} runs on a {w}x{h} slice")
    for _ in range(2):
        embedding = predictor.encode(image)
    sync()
    encoder_ms = [_timed(lambda: predictor.encode(image), sync) for _ in range(encoder_runs)]

    progress(f"[{device}] decoder: {decoder_runs} prompts")
    prompts = _prompts(h, w, decoder_runs)
    for p in prompts[:5]:
        predictor.predict(embedding, return_masks=False, **p)
    decoder_ms = [_timed(lambda p=p: predictor.predict(embedding, return_masks=False, **p), sync) for p in prompts]

    fp32_bytes = embedding.nbytes
    fp16_bytes = embedding.converted(dtype=torch.float16).nbytes

    progress(f"[{device}] click-to-mask: {decoder_runs} prompts through VolumeSession on a cached slice")
    key = content_hash(slices, CT_WINDOW)
    with VolumeSession(predictor, slices=lambda k: slices[k], n_slices=len(slices), volume_key=key,
                       cache=EmbeddingCache()) as session:
        k = len(slices) // 2
        session.embedding(k)
        for p in prompts[:5]:
            session.predict(k, **p)
        click_ms = []
        for p in prompts:
            t = time.perf_counter()
            mask = session.predict(k, **p).masks[0]
            sync()
            click_ms.append((time.perf_counter() - t) * 1e3)
            assert mask.shape == (h, w)

    result: dict[str, Any] = {
        "device": device, "device_name": _device_name(device), "threads": torch.get_num_threads(), "model": model,
        "model_load_s": round(load_s, 2), "slice_size": [h, w],
        "encoder_ms": percentiles(encoder_ms), "decoder_ms": percentiles(decoder_ms),
        "click_to_mask_ms": percentiles(click_ms),
        "cache_bytes_per_slice": {"fp32": fp32_bytes, "fp16": fp16_bytes},
    }
    result.update(_volume_and_memory(predictor, hu_slices, volume_slices, memory_slices, fp32_bytes, progress))
    if device.startswith("cuda"):
        result["cuda_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return result


def _volume_and_memory(predictor: Any, hu_slices: np.ndarray, volume_slices: int, memory_slices: int | None,
                       fp32_bytes: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Throughput of a session encoding consecutive slices, and the 300-slice memory check (one session)."""
    from samunet_core.cache import DEFAULT_MAX_BYTES, EmbeddingCache, content_hash
    from samunet_core.session import VolumeSession
    from samunet_core.transforms import window_to_uint8

    volume = stacked_volume(hu_slices, MEMORY_CHECK_SLICES)
    n_fill = math.ceil(DEFAULT_MAX_BYTES / fp32_bytes) + 4
    n_encode = max(volume_slices, n_fill if memory_slices is None else memory_slices)
    n_encode = min(n_encode, MEMORY_CHECK_SLICES)
    cache = EmbeddingCache()  # the default cap
    key = content_hash(volume, CT_WINDOW)
    progress(f"[{predictor.device}] session over a {volume.shape[0]}x{volume.shape[1]}x{volume.shape[2]} CT: "
             f"encoding {n_encode} slices")
    times = []
    with VolumeSession(predictor, slices=lambda k: window_to_uint8(volume[k], *CT_WINDOW), n_slices=len(volume),
                       volume_key=key, cache=cache) as session:
        t_start = time.perf_counter()
        for k in range(n_encode):
            session.embedding(k)
            times.append(time.perf_counter() - t_start)
    first = times[min(volume_slices, n_encode) - 1]
    out: dict[str, Any] = {
        "volume_slices_per_s": round(min(volume_slices, n_encode) / first, 3),
        "volume_slices_timed": min(volume_slices, n_encode),
    }
    if memory_slices != 0:
        peak = peak_rss_bytes()
        out["memory_check"] = {
            "volume_shape": list(volume.shape), "volume_source": "real CT slices (HU) repeated along k",
            "slices_encoded": n_encode, "cache_cap_bytes": cache.max_bytes, "cache_bytes": cache.nbytes,
            "cache_entries": len(cache), "cache_evictions": cache.stats.evictions,
            "peak_rss_bytes": peak, "peak_rss_mb": round(peak / 2**20, 1),
            "limit_bytes": MEMORY_LIMIT_BYTES, "passed": peak < MEMORY_LIMIT_BYTES,
            "slices_per_s": round(n_encode / times[-1], 3),
        }
    return out


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def run_bench(model: str, device: str = "auto", threads: int | None = None,
              volume_path: Path | None = None, encoder_runs: int = 20, decoder_runs: int = 100,
              volume_slices: int = 8, memory_slices: int | None = None,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Benchmark on CPU (always) and CUDA (when `device` is auto and a GPU is present, or when asked for).

    Returns the JSON document: the first device's numbers at the top level (the keys DESIGN.md names), every device
    under "runs", and the peak RSS of the whole process.
    """
    import torch

    from samunet_core.predictor import resolve_device

    if encoder_runs < 20 or decoder_runs < 100:
        raise InputError("the benchmark needs at least 20 encoder runs and 100 decoder prompts")
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [resolve_device(device)]
    path = Path(volume_path) if volume_path is not None else default_volume_path()
    hu_slices = load_ct(path)
    runs = {}
    t0 = time.perf_counter()
    for dev in devices:
        runs[dev] = bench_device(model, dev, hu_slices, encoder_runs, decoder_runs, volume_slices,
                                 memory_slices if dev == devices[0] else 0, progress)
    document = dict(runs[devices[0]])
    document.update({"volume_path": str(path), "torch": torch.__version__, "runs": runs,
                     "peak_rss_bytes": peak_rss_bytes(), "wall_s": round(time.perf_counter() - t0, 1)})
    return document
