"""Latency, throughput and memory benchmark: `samunet bench`.

Measured on real CT slices, per device (CPU always; CUDA too when present and asked for):
- encoder_ms: one slice through `Predictor.encode` (p50/p95 over >= 20 runs after warm-up);
- decoder_ms: one prompt through `Predictor.predict` without the mask upsampling (>= 100 prompts);
- click_to_mask_ms: `VolumeSession.predict` on a cached slice: prompt in, full-size HxW mask array out;
- correction_rewalk_ms: the engine's walk over 20 cached slices (what a correction that carries 20 slices costs);
- volume_slices_per_s: a session precomputing a volume (`VolumeSession.precompute`, batched as its prefetch is);
- the memory check: a session precomputing a 300-slice 512x512 CT (real slices stacked) with the default cache cap
  (it fills and evicts); peak RSS of the process must stay under 1.5 GiB.
Each encoder runtime (samunet_core/runtime.py) is measured in its own process, side by side.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core.errors import InputError

MEMORY_CHECK_SLICES = 300
MEMORY_LIMIT_BYTES = int(1.5 * 1024**3)
REWALK_SLICES = 20  # the neighbours a correction re-walks in the latency target (issue 22)
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
                 volume_slices: int = 16, memory_slices: int | None = None, runtime: str = "torch",
                 progress: Callable[[str], None] = print) -> dict[str, Any]:
    """All measurements of one runtime on one device. hu_slices: KxHxW real CT slices in HU. memory_slices: how many
    slices of the 300-slice volume the memory check precomputes (None: all 300; 0: skip)."""
    import torch

    from samunet_core.cache import EmbeddingCache, content_hash
    from samunet_core.predictor import load_predictor
    from samunet_core.session import VolumeSession
    from samunet_core.transforms import window_to_uint8

    slices = window_to_uint8(hu_slices, *CT_WINDOW)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    predictor = load_predictor(model, device=device, runtime=runtime)
    load_s = time.perf_counter() - t0
    tag = f"[{device} {predictor.runtime}]"
    image = slices[len(slices) // 2]
    h, w = image.shape

    progress(f"{tag} encoder: 2 warm-up + {encoder_runs} runs on a {w}x{h} slice")
    for _ in range(2):
        embedding = predictor.encode(image)
    sync()
    encoder_ms = [_timed(lambda: predictor.encode(image), sync) for _ in range(encoder_runs)]

    progress(f"{tag} decoder: {decoder_runs} prompts")
    prompts = _prompts(h, w, decoder_runs)
    for p in prompts[:5]:
        predictor.predict(embedding, return_masks=False, **p)
    decoder_ms = [_timed(lambda p=p: predictor.predict(embedding, return_masks=False, **p), sync) for p in prompts]

    fp32_bytes = embedding.nbytes
    fp16_bytes = embedding.converted(dtype=torch.float16).nbytes

    progress(f"{tag} click-to-mask: {decoder_runs} prompts through VolumeSession on a cached slice")
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

    progress(f"{tag} correction re-walk: a walk over {REWALK_SLICES} cached slices, 5 runs")
    rewalk_ms, rewalk_slices = _rewalk(predictor, image)

    result: dict[str, Any] = {
        "device": device, "device_name": _device_name(device), "threads": torch.get_num_threads(), "model": model,
        "runtime": predictor.runtime, "model_load_s": round(load_s, 2),
        "runtime_build_s": predictor.encoder.build_s,
        "export_build_s": (predictor.encoder.info or {}).get("build_s"),
        "slice_size": [h, w],
        "encoder_ms": percentiles(encoder_ms), "decoder_ms": percentiles(decoder_ms),
        "click_to_mask_ms": percentiles(click_ms),
        "correction_rewalk_ms": percentiles(rewalk_ms), "correction_rewalk_slices": rewalk_slices,
        "cache_bytes_per_slice": {"fp32": fp32_bytes, "fp16": fp16_bytes},
    }
    result.update(_volume_and_memory(predictor, hu_slices, volume_slices, memory_slices, progress))
    # after the memory check: an eager pass for comparison is not part of a session's footprint
    result["embedding_max_abs_diff_vs_torch"] = _parity(predictor, image)
    if device.startswith("cuda"):
        result["cuda_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def _rewalk(predictor: Any, image: np.ndarray, runs: int = 5) -> tuple[list[float], int]:
    """(ms per run, slices walked): the engine's walk (`interaction.SegmentState`, the policy every front end uses)
    carrying a box through REWALK_SLICES cached copies of one real slice, which is the work of a correction that
    re-walks that many neighbours: a decode, a chained box and the stopping rule per slice."""
    from samunet_core.cache import EmbeddingCache, content_hash
    from samunet_core.interaction import SegmentState
    from samunet_core.prompts import SliceBox
    from samunet_core.session import VolumeSession

    n = REWALK_SLICES + 1
    h, w = image.shape
    stack = np.repeat(image[None], n, axis=0)
    box = SliceBox(0, 0, 0.3 * w, 0.3 * h, 0.7 * w, 0.7 * h)
    times, walked = [], 0
    with VolumeSession(predictor, slices=lambda k: stack[k], n_slices=n, volume_key=content_hash(stack, CT_WINDOW),
                       cache=EmbeddingCache(), prefetch_radius=0) as session:
        session.precompute()
        for _ in range(runs + 1):  # the first run warms up
            state = SegmentState(session, n, (h, w), propagate=True)
            t = time.perf_counter()
            state.add_box(box)
            times.append((time.perf_counter() - t) * 1e3)
            walked = len(state.masks()) - 1
    return times[1:], walked


def _parity(predictor: Any, image: np.ndarray) -> dict[str, float]:
    """{output: max |runtime - eager torch|} on the benchmark slice (all zeros for the torch runtime itself)."""
    import torch

    array, _ = predictor.prepare(image)
    x = torch.from_numpy(array).permute(2, 0, 1)[None].to(predictor.device)
    produced, reference = predictor.encoder(x), predictor.torch_encoder(x)
    return {name: float((produced[name].cpu() - reference[name].cpu()).abs().max()) for name in reference}


def _volume_and_memory(predictor: Any, hu_slices: np.ndarray, volume_slices: int, memory_slices: int | None,
                       progress: Callable[[str], None]) -> dict[str, Any]:
    """Batched precompute throughput of a session (`VolumeSession.precompute`: the order and batches of its
    prefetch), and the memory check: one session precomputing a 300-slice CT with the default cache cap."""
    from samunet_core.cache import EmbeddingCache, content_hash
    from samunet_core.session import VolumeSession
    from samunet_core.transforms import window_to_uint8

    def precompute(volume: np.ndarray) -> tuple[float, EmbeddingCache, VolumeSession]:
        cache = EmbeddingCache()  # the default cap
        session = VolumeSession(predictor, slices=lambda k: window_to_uint8(volume[k], *CT_WINDOW),
                                n_slices=len(volume), volume_key=content_hash(volume, CT_WINDOW), cache=cache)
        with session:
            t0 = time.perf_counter()
            session.precompute()
            return time.perf_counter() - t0, cache, session

    tag = f"[{predictor.device} {predictor.runtime}]"
    progress(f"{tag} batched precompute of {volume_slices} slices")
    seconds, _, session = precompute(stacked_volume(hu_slices, volume_slices))
    out: dict[str, Any] = {"volume_slices_per_s": round(volume_slices / seconds, 3),
                           "volume_slices_timed": volume_slices, "encode_batch": session.encode_batch}
    del session  # its cache too, before the memory check
    if memory_slices != 0:
        n = min(memory_slices or MEMORY_CHECK_SLICES, MEMORY_CHECK_SLICES)
        volume = stacked_volume(hu_slices, n)
        progress(f"{tag} memory check: precomputing {n} slices of a 300x512x512 CT")
        seconds, cache, session = precompute(volume)
        peak = peak_rss_bytes()
        out["memory_check"] = {
            "volume_shape": list(volume.shape),
            "volume_source": "real CT slices (HU) repeated along k",
            "slices_encoded": session.stats.encodes, "precompute_s": round(seconds, 1),
            "cache_cap_bytes": cache.max_bytes, "cache_bytes": cache.nbytes,
            "cache_entries": len(cache), "cache_evictions": cache.stats.evictions,
            "peak_rss_bytes": peak, "peak_rss_mb": round(peak / 2**20, 1),
            "limit_bytes": MEMORY_LIMIT_BYTES, "passed": peak < MEMORY_LIMIT_BYTES,
            "slices_per_s": round(session.stats.encodes / seconds, 3),
        }
    return out


def _device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def bench_remote(url: str, token: str | None, hu_slices: np.ndarray, decoder_runs: int = 100, clients: int = 1,
                 progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Click-to-mask through a `samunet serve` server (RemoteSession: prompt out, compact mask back) on a cached
    slice, the same prompts as the local measurement, from `clients` concurrent clients (each its own session and
    upload); latencies of all clicks together, errors counted."""
    import threading

    from samunet_core.cache import content_hash
    from samunet_core.remote import RemoteClient, RemoteSession
    from samunet_core.transforms import window_to_uint8

    if clients < 1:
        raise InputError(f"--clients must be >= 1, got {clients}")
    slices = window_to_uint8(hu_slices, *CT_WINDOW)
    info = RemoteClient(url, token).info
    k = len(slices) // 2
    prompts = _prompts(*slices.shape[1:3], decoder_runs)
    times: list[float] = []
    uploads: list[float] = []
    errors: list[str] = []

    def one_client() -> None:
        try:
            t0 = time.perf_counter()
            session = RemoteSession(RemoteClient(url, token), slices, content_hash(slices, CT_WINDOW))
            uploads.append(time.perf_counter() - t0)
            with session:
                for p in prompts[:5]:
                    session.predict(k, **p)
                for p in prompts:
                    t = time.perf_counter()
                    session.predict(k, **p)
                    times.append((time.perf_counter() - t) * 1e3)
        except Exception as exc:  # counted and reported, the other clients go on
            errors.append(repr(exc))

    progress(f"[server {url}] {clients} client(s): upload, then {decoder_runs} prompts each on a cached slice")
    threads = [threading.Thread(target=one_client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"url": url, "server_model": info["model"], "server_device": info["device"],
            "server_runtime": info["runtime"], "clients": clients, "errors": len(errors),
            "error_examples": errors[:3], "upload_s": round(max(uploads), 3) if uploads else None,
            "volume_shape": list(slices.shape),
            "click_to_mask_ms": percentiles(times) if times else None}


def runtimes_to_bench(model: str, device: str) -> list[str]:
    """Every runtime usable for `model` on `device`: the one `auto` picks first, eager torch always among them."""
    from samunet_core import runtime as runtimes
    from samunet_core.registry import get_spec

    family = get_spec(model).family
    chosen = runtimes.resolve_runtime("auto", device, family)
    names = [chosen]
    if device.startswith("cpu") and family in runtimes.EXPORTABLE_FAMILIES:
        names += [n for n, spec in runtimes.RUNTIMES.items()
                  if n != chosen and (spec.backend == "torch" or runtimes.backend_version(spec.backend))]
    return names + (["torch"] if "torch" not in names else [])


def _bench_in_child(kwargs: dict[str, Any]) -> dict[str, Any]:
    """One runtime's measurements in a fresh process (its peak RSS is its own)."""
    import sys

    import torch

    torch.set_num_threads(kwargs.pop("threads"))
    return bench_device(**kwargs, progress=lambda msg: print(msg, file=sys.stderr, flush=True))


def run_bench(model: str, device: str = "auto", threads: int | None = None,
              volume_path: Path | None = None, encoder_runs: int = 20, decoder_runs: int = 100,
              volume_slices: int = 16, memory_slices: int | None = None, runtimes: list[str] | None = None,
              isolate: bool = True, server: str | None = None, token: str | None = None, clients: int = 1,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Benchmark on CPU (always) and CUDA (when `device` is auto and a GPU is present, or when asked for), every
    runtime side by side on the first device (CPU: torch, openvino, openvino-bf16, onnxruntime when installed).

    Returns the JSON document: the first device's numbers for the runtime `auto` picks at the top level (the keys
    DESIGN.md names), every device (its auto runtime) under "runs", every runtime of the first device under
    "runtimes". isolate: each runtime in its own process, so peak RSS is that runtime's alone; the memory check
    (300-slice precompute) runs for the auto runtime only.
    """
    import torch

    from samunet_core.predictor import resolve_device
    from samunet_core.runtime import RUNTIMES

    if encoder_runs < 20 or decoder_runs < 100:
        raise InputError("the benchmark needs at least 20 encoder runs and 100 decoder prompts")
    if volume_slices < 1:
        raise InputError(f"--volume-slices must be >= 1, got {volume_slices}")
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [resolve_device(device)]
    unknown = [name for name in runtimes or [] if name not in RUNTIMES]
    if unknown:
        raise InputError(f"unknown runtime(s) {unknown}; use {', '.join(RUNTIMES)}")
    path = Path(volume_path) if volume_path is not None else default_volume_path()
    hu_slices = load_ct(path)
    t0 = time.perf_counter()
    runs: dict[str, Any] = {}
    per_runtime: dict[str, Any] = {}
    for dev in devices:
        names = runtimes_to_bench(model, dev)
        if runtimes is not None and dev == devices[0]:
            names = [names[0]] + [n for n in runtimes if n != names[0]]
            names += ["torch"] if "torch" not in names else []  # eager torch is always among them
        for name in names if dev == devices[0] else names[:1]:
            kwargs = {"model": model, "device": dev, "hu_slices": hu_slices, "encoder_runs": encoder_runs,
                      "decoder_runs": decoder_runs, "volume_slices": volume_slices, "runtime": name,
                      "memory_slices": memory_slices if (dev == devices[0] and name == names[0]) else 0}
            if isolate:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    result = pool.submit(_bench_in_child, {**kwargs, "threads": torch.get_num_threads()}).result()
            else:
                result = bench_device(**kwargs, progress=progress)
            if dev == devices[0]:
                per_runtime[name] = result
            if name == names[0]:
                runs[dev] = result
    document = dict(runs[devices[0]])
    document.update({"volume_path": str(path), "torch": torch.__version__, "runs": runs,
                     "runtimes": per_runtime, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in per_runtime.values())})
    if server is not None:
        document["remote"] = bench_remote(server, token, hu_slices, decoder_runs, clients, progress)
    document["wall_s"] = round(time.perf_counter() - t0, 1)
    return document
