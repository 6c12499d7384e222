"""Batch throughput: `samunet batch` serial against `--cluster local:N`, cold embedding cache, same volumes.

    .venv/bin/python scripts/batch_throughput.py --out results/batch_throughput_cpu.json [--workers 2] [--volumes 8]

The cohort is consecutive slabs of a real CT (../shared/data/totalsegmentator/example_ct.nii.gz, 112 slices; without
../shared the in-repo 30-slice example_ct_sm), each with a propagated box prompt (Testing/support/cohort.py). The
encoder export is built first (a one-off per machine, not part of either time); each run is a fresh process with
`--cache-dir none`, so every slice is encoded. Times are wall clock from the command's start to its exit, so the
cluster's start-up and model loading are included. The outputs of both runs are compared voxel for voxel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing" / "support"))
from cohort import make_slab_cohort  # noqa: E402

SHARED_CT = ROOT.parent / "shared" / "data" / "totalsegmentator"
LOCAL_CT = ROOT / "Testing" / "data" / "totalsegmentator"


# Run through a small parent that reports the largest resident memory of any process under it (the batch process or,
# with --cluster, its largest worker), read after the command exits.
_MEASURE = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def batch(args: list[str], env: dict[str, str]) -> tuple[float, str, int]:
    """(wall seconds, what it printed, peak resident MiB of its largest process) of one `samunet batch`."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "samunet_core.cli", "batch", *args],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"samunet batch {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    peak_kb = int(done.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return seconds, done.stdout, peak_kb // 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--volumes", type=int, default=8)
    parser.add_argument("--slices", type=int, default=14)
    options = parser.parse_args()

    import numpy as np
    import slicerio

    source = SHARED_CT if (SHARED_CT / "example_ct.nii.gz").is_file() else LOCAL_CT
    ct = source / ("example_ct.nii.gz" if source == SHARED_CT else "example_ct_sm.nii.gz")
    labels = source / ("example_seg_fast_force_split.nii.gz" if source == SHARED_CT else "example_seg.nii.gz")
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        volumes = make_slab_cohort(ct, labels, folder / "in", options.volumes, options.slices)
        common = ["--preset", "soft_tissue", "--cache-dir", "none", "--no-progress", "--device", "cpu"]
        batch([str(volumes[0]), "--output-dir", str(folder / "warmup"), *common], env)  # builds the export once
        serial_s, _, serial_rss = batch([str(folder / "in"), "--output-dir", str(folder / "serial"), *common], env)
        cluster_s, printed, cluster_rss = batch([str(folder / "in"), "--output-dir", str(folder / "cluster"),
                                                 "--cluster", f"local:{options.workers}", *common], env)
        differing = 0
        for volume in volumes:
            name = volume.name.replace(".nii.gz", ".seg.nrrd")
            a = slicerio.read_segmentation(str(folder / "serial" / name))["voxels"]
            b = slicerio.read_segmentation(str(folder / "cluster" / name))["voxels"]
            differing += int(np.count_nonzero(a != b))
    import torch

    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}",
        "torch_threads_serial": torch.get_num_threads(),
        "workers": options.workers, "threads_per_worker": max(1, (os.cpu_count() or 1) // options.workers),
        "cohort": f"{options.volumes} slabs x {options.slices} slices of {ct.name}",
        "cache": "cold (--cache-dir none; export prebuilt)",
        "serial_s": round(serial_s, 1), "cluster_s": round(cluster_s, 1),
        "serial_volumes_per_min": round(60 * options.volumes / serial_s, 2),
        "cluster_volumes_per_min": round(60 * options.volumes / cluster_s, 2),
        "speedup": round(serial_s / cluster_s, 2), "voxels_differing": differing,
        "peak_rss_mib_serial_process": serial_rss, "peak_rss_mib_largest_cluster_process": cluster_rss,
        "cluster_summary": [line for line in printed.splitlines() if line.startswith("batch:")],
    }
    Path(options.out).parent.mkdir(parents=True, exist_ok=True)
    Path(options.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
