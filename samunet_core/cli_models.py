"""`samunet models`: every registered model, its input size, what it caches per slice, and its weights' state."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def model_rows() -> list[dict[str, object]]:
    from samunet_core.registry import DEFAULT_MODEL, get_spec, model_names

    rows = []
    for name in model_names():
        spec = get_spec(name)
        located = spec.weights.locate()
        rows.append({
            "name": name,
            "default": name == DEFAULT_MODEL,
            "input": f"{spec.input_size}x{spec.input_size}",
            "caches_per_slice": spec.caches,
            "cache_kib_fp32": spec.cache_bytes_fp32 // 1024,
            "weights": spec.weights.status(),
            "weights_path": str(located) if located else None,
            "description": spec.description,
        })
    return rows


def run(args: argparse.Namespace) -> int:
    rows = model_rows()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    header = ("model", "input", "caches per slice", "KiB", "weights")
    table = [header] + [(r["name"] + (" (default)" if r["default"] else ""), r["input"], r["caches_per_slice"],
                         str(r["cache_kib_fp32"]), r["weights"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0
