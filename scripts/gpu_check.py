#!/usr/bin/env python3
"""The GPU checks of docs/speed.md, in one short run for a machine with a CUDA GPU (GPU time is scarce).

    python scripts/gpu_check.py --out gpu_check.json [--model NAME] [--seconds-per-case 20]

1. Batched encoder throughput (slices/s) of the model at batch 1, 8 and 32 in fp32 (TF32 off, the Predictor's
   setting), TF32 and bf16 autocast, with each precision's embedding difference against CPU fp32 on the same slices.
2. Click-to-mask p50/p95 on the GPU (a prompt on a cached slice to a full-size mask, as `samunet bench` times it).
3. Device agreement: the demo CT segmented with its prompt file on the CPU and on the GPU (fp32) -> Dice per segment
   and the slices each walk reached; the docs require Dice >= 0.99.
Writes one JSON document and prints a summary. Nothing here runs without a GPU (exit status 2 with a message).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def encoder_throughput(model: str, slices: np.ndarray) -> dict:
    import torch

    from samunet_core.predictor import load_predictor

    cpu = load_predictor(model, device="cpu", runtime="torch")
    reference = cpu.encode_batch(list(slices[:4]))
    out = {}
    for precision, tf32 in (("fp32", False), ("tf32", True), ("bf16", False)):
        gpu = load_predictor(model, device="cuda", precision="bf16" if precision == "bf16" else "fp32")
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        got = gpu.encode_batch(list(slices[:4]))
        rel = max(float((g.tensors[k].cpu() - r.tensors[k]).norm() / r.tensors[k].norm())
                  for g, r in zip(got, reference, strict=True) for k in r.tensors)
        rates = {}
        for batch in (1, 8, 32):
            images = [slices[i % len(slices)] for i in range(batch)]
            gpu.encode_batch(images)
            torch.cuda.synchronize()
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 3.0:
                gpu.encode_batch(images)
                n += batch
            torch.cuda.synchronize()
            rates[str(batch)] = round(n / (time.perf_counter() - t0), 1)
        out[precision] = {"slices_per_s": rates, "max_rel_error_vs_cpu_fp32": rel}
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    return out


def click_to_mask(model: str, image: np.ndarray) -> dict:
    import torch

    from samunet_core.bench import _prompts, percentiles
    from samunet_core.predictor import load_predictor

    gpu = load_predictor(model, device="cuda")
    embedding = gpu.encode(image)
    prompts = _prompts(*image.shape, 100)
    for p in prompts[:5]:
        gpu.predict(embedding, **p)
    times = []
    for p in prompts:
        t0 = time.perf_counter()
        gpu.predict(embedding, **p)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return percentiles(times)


def device_agreement(model: str) -> dict:
    from samunet_core.metrics import dice
    from samunet_core.predictor import load_predictor
    from samunet_core.segment import prepare_job, segment_volume

    job = prepare_job(REPO / "Resources/Samples/CTChest4.nrrd", REPO / "Resources/Samples/ctchest_prompts.json",
                      "/tmp/gpu_check.seg.nrrd")
    runs = {}
    for device in ("cpu", "cuda"):
        predictor = load_predictor(model, device=device, runtime="torch")
        runs[device] = segment_volume(job.volume, job.prompts, predictor, preset="lung").slice_masks
    return {name: {"dice": round(float(dice(runs["cpu"][name], runs["cuda"][name])), 4),
                   "slices_cpu": int(runs["cpu"][name].any(axis=(1, 2)).sum()),
                   "slices_cuda": int(runs["cuda"][name].any(axis=(1, 2)).sum())} for name in runs["cpu"]}


def main() -> int:
    import torch

    from samunet_core.bench import CT_WINDOW, default_volume_path, load_ct
    from samunet_core.registry import DEFAULT_MODEL
    from samunet_core.transforms import window_to_uint8

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it on a GPU machine", file=sys.stderr)
        return 2
    slices = window_to_uint8(load_ct(default_volume_path()), *CT_WINDOW)
    document = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
                "encoder": encoder_throughput(args.model, slices),
                "click_to_mask_ms": click_to_mask(args.model, slices[len(slices) // 2]),
                "device_agreement": device_agreement(args.model)}
    Path(args.out).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(document, indent=1))
    ok = all(v["dice"] >= 0.99 for v in document["device_agreement"].values())
    print("device agreement:", "PASS" if ok else "FAIL (Dice < 0.99)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
