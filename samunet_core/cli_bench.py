"""`samunet bench --out FILE.json`: latency, throughput and memory of a model on this machine."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from samunet_core.registry import DEFAULT_MODEL

    parser.add_argument("--out", required=True, help="JSON file to write (keys in docs/formats.md)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--device", default="auto",
                        help="auto (CPU, plus CUDA when present), cpu or cuda (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--volume", default=None,
                        help="CT volume or DICOM series folder to take real slices from (default: the repository's "
                             "512x512 DICOM test series, else slicerio's CTChest4)")
    parser.add_argument("--encoder-runs", type=int, default=20, help="timed encoder runs after warm-up (>= 20)")
    parser.add_argument("--decoder-runs", type=int, default=100, help="timed prompts (>= 100)")
    parser.add_argument("--volume-slices", type=int, default=16,
                        help="slices a session precomputes for volume_slices_per_s (default 16)")
    parser.add_argument("--memory-slices", type=int, default=None,
                        help="slices of the 300-slice memory check to precompute (default: all 300; 0 skips it)")
    parser.add_argument("--runtimes", nargs="+", default=None, metavar="NAME",
                        help="encoder runtimes to measure on the first device besides the one auto picks (default: "
                             "every installed one: torch, openvino, openvino-bf16, onnxruntime)")
    parser.add_argument("--server", default=None, metavar="URL",
                        help="also time click-to-mask through this `samunet serve` server (key \"remote\")")
    parser.add_argument("--token-file", default=None, metavar="FILE", help="the server's token (with --server)")
    parser.add_argument("--clients", type=int, default=1,
                        help="concurrent clients for --server, each with its own session (default 1)")
    parser.add_argument("--same-process", action="store_true",
                        help="measure every runtime in this process (default: one process each, so each peak RSS "
                             "is its own)")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from samunet_core.bench import run_bench
    from samunet_core.io.atomic import atomic_path, check_writable
    from samunet_core.remote import read_token

    out = check_writable(args.out)
    document = run_bench(model=args.model, device=args.device, threads=args.threads, volume_path=args.volume,
                         encoder_runs=args.encoder_runs, decoder_runs=args.decoder_runs,
                         volume_slices=args.volume_slices, memory_slices=args.memory_slices,
                         runtimes=args.runtimes, isolate=not args.same_process, server=args.server,
                         token=read_token(args.token_file), clients=args.clients,
                         progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    rows = [(f"{device} {r['runtime']}", r) for device, r in document["runs"].items()]
    rows += [(f"{document['device']} {name}", r) for name, r in document["runtimes"].items()
             if name != document["runtime"]]
    for device, r in rows:
        line = (f"{device} ({r['threads']} threads): encoder p50 {r['encoder_ms']['p50']:.0f} ms, decoder p50 "
                f"{r['decoder_ms']['p50']:.1f} ms, click-to-mask p50 {r['click_to_mask_ms']['p50']:.1f} ms "
                f"(p95 {r['click_to_mask_ms']['p95']:.1f}), {r['volume_slices_per_s']:.2f} slices/s")
        print(line)
        if "memory_check" in r:
            m = r["memory_check"]
            print(f"  memory check: {m['volume_shape']} volume, {m['slices_encoded']} slices encoded, cache "
                  f"{m['cache_bytes'] / 2**20:.0f} MiB ({m['cache_evictions']} evictions), peak RSS "
                  f"{m['peak_rss_mb']:.0f} MB -> {'PASS' if m['passed'] else 'FAIL'} (< 1.5 GiB), "
                  f"precomputed in {m['precompute_s']:.0f} s")
    if "remote" in document:
        r = document["remote"]
        clicks = r["click_to_mask_ms"] or {"p50": float("nan"), "p95": float("nan"), "n": 0}
        print(f"server {r['url']} ({r['server_device']}, {r['server_runtime']}), {r['clients']} client(s): "
              f"click-to-mask p50 {clicks['p50']:.1f} ms (p95 {clicks['p95']:.1f}) over {clicks['n']} clicks, "
              f"{r['errors']} errors, upload of a {'x'.join(map(str, r['volume_shape']))} volume {r['upload_s']} s")
    print(f"wrote {out}")
    return 0
