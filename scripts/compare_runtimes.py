#!/usr/bin/env python3
"""The Dice check of docs/speed.md: per-target |Dice change| of `samunet eval` runs against a reference run.

    python scripts/compare_runtimes.py REFERENCE_DIR OTHER_DIR [...] > comparison.json

Each DIR is a `samunet eval --out DIR` folder of the same manifest and protocol (only the runtime differs). A runtime
passes when its mean |Dice change| over the targets is <= 0.001 (the bar a runtime must clear to be picked by auto).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

MAX_MEAN_CHANGE = 0.001


def per_target_dice(folder: Path) -> dict[tuple[str, ...], float]:
    with open(folder / "results.csv", newline="", encoding="utf-8") as f:
        return {(r["case_id"], r["label"], r["k"], r["target"]): float(r["dice"]) for r in csv.DictReader(f)}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    reference = per_target_dice(Path(argv[0]))
    ref_summary = json.loads((Path(argv[0]) / "summary.json").read_text())
    out = {"reference": {"dir": argv[0], "runtime": ref_summary.get("runtime"), "mean_dice": ref_summary["mean_dice"],
                         "n_targets": len(reference)}, "runs": {}}
    for folder in map(Path, argv[1:]):
        other = per_target_dice(folder)
        if set(other) != set(reference):
            print(f"{folder}: not the same targets as {argv[0]}", file=sys.stderr)
            return 1
        change = np.array([abs(other[key] - reference[key]) for key in reference])
        summary = json.loads((folder / "summary.json").read_text())
        out["runs"][folder.name] = {
            "runtime": summary.get("runtime"), "mean_dice": summary["mean_dice"],
            "mean_abs_dice_change": round(float(change.mean()), 6),
            "max_abs_dice_change": round(float(change.max()), 6),
            "targets_changed_over_0.01": int((change > 0.01).sum()),
            "encoder_ms_mean": summary.get("encoder_ms_mean"),
            "passed": bool(change.mean() <= MAX_MEAN_CHANGE)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
