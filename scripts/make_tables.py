"""Print README's result tables from `samunet eval` summaries and `samunet bench` JSON (never typed by hand).

usage: python scripts/make_tables.py eval DIR [DIR ...]      (each DIR holds a summary.json)
       python scripts/make_tables.py interactive DIR [DIR ...]   (interactive3d summaries)
       python scripts/make_tables.py bench FILE.json [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def unseen_cases(by_case: dict[str, dict]) -> tuple[int, float]:
    """(n, mean Dice) over the cases no click training saw (see samunet_core/train/splits.py), from by_case."""
    from samunet_core.train.splits import seen_in_training

    kept = [(v["n"], v["mean_dice"]) for case, v in by_case.items() if not seen_in_training(case)]
    n = sum(count for count, _ in kept)
    return n, (sum(count * dice for count, dice in kept) / n if n else float("nan"))


def eval_table(dirs: list[str]) -> str:
    lines = ["| model | protocol | n | mean Dice | mean NSD | by modality (n, Dice) | unseen cases (n, Dice) "
             "| 3D stride |",
             "|---|---|---|---|---|---|---|---|"]
    for d in dirs:
        s = json.loads((Path(d) / "summary.json").read_text())
        mods = ", ".join(f"{m} {v['n']}: {v['mean_dice']:.4f}" for m, v in sorted(s["by_modality"].items()))
        n_unseen, dice_unseen = unseen_cases(s.get("by_case", {}))
        lines.append(f"| {s['model']} | {s['protocol']} | {s['n_targets']} | {s['mean_dice']:.4f} | "
                     f"{s.get('mean_nsd', float('nan')):.4f} | {mods} | {n_unseen}: {dice_unseen:.4f} | "
                     f"{'walk' if s['protocol'] == 'propagate' else s.get('slice_stride', 1)} |")
    return "\n".join(lines)


def interactive_table(dirs: list[str]) -> str:
    """One row per (summary, group): all targets, each modality, and the seen / unseen split of by_case."""
    lines = ["| model | start | targets | n | Dice per step (start, click 1..N) | DSC_AUC | DSC_Final | gain |",
             "|---|---|---|---|---|---|---|---|"]
    for d in dirs:
        s = json.loads((Path(d) / "summary.json").read_text())
        if s.get("protocol") != "interactive3d":
            raise SystemExit(f"{d}: not an interactive3d summary (protocol {s.get('protocol')!r})")
        groups = [("all", s)] + sorted(s["by_modality"].items())
        for label, keep in (("seen", True), ("unseen", False)):
            cases = [v for case, v in s.get("by_case", {}).items() if _seen_3d(case) == keep]
            n = sum(v["n"] for v in cases)
            if n and len(cases) < len(s.get("by_case", {})):
                groups.append((label, {k: _weighted(cases, k) for k in ("mean_dice_per_step", "dsc_auc",
                                                                        "dsc_final")} | {"n": n}))
        for name, g in groups:
            steps = g["mean_dice_per_step"]
            n = g.get("n", s.get("n_targets"))
            lines.append(f"| {s['model']} | {s['start']} | {name} | {n} | {' '.join(f'{v:.3f}' for v in steps)} | "
                         f"{g['dsc_auc']:.3f} | {g['dsc_final']:.3f} | {steps[-1] - steps[0]:+.3f} |")
    return "\n".join(lines)


def _seen_3d(case_id: str) -> bool:
    """A 3D case whose patient is on the training side: the shared manifest's (splits.py) and every lidc3d stack
    (its patients' 2D slices are in the training pool, shared/data/lidc3d/SOURCES.md)."""
    from samunet_core.train.splits import seen_in_training

    return seen_in_training(case_id) or case_id.startswith("lidc3d/")


def _weighted(groups: list[dict], key: str):
    """The n-weighted mean of a key (a number or a list of numbers) over summary groups."""
    total = sum(g["n"] for g in groups)
    first = groups[0][key]
    if isinstance(first, list):
        return [sum(g["n"] * g[key][i] for g in groups) / total for i in range(len(first))]
    return sum(g["n"] * g[key] for g in groups) / total


def bench_table(files: list[str]) -> str:
    lines = ["| device | threads | model | runtime | encoder ms p50 / p95 | decoder ms p50 / p95 | "
             "click-to-mask ms p50 / p95 | volume slices/s | export + compile s (once) | peak RSS | "
             "300-slice precompute |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in files:
        doc = json.loads(Path(f).read_text())
        rows = list((doc.get("runtimes") or {}).values()) or [doc]
        rows += [r for device, r in (doc.get("runs") or {}).items() if device != doc.get("device")]
        for r in rows:
            mem = r.get("memory_check") or {}
            precompute = (f"{mem['precompute_s']:.0f} s, peak RSS {mem['peak_rss_mb']:.0f} MiB"
                          if mem.get("precompute_s") else "n/a")
            rss = f"{r['peak_rss_bytes'] / 2**20:.0f} MiB" if r.get("peak_rss_bytes") else "n/a"
            build = "-" if not r.get("export_build_s") else f"{r['export_build_s']:.0f} + {r['runtime_build_s']:.1f}"
            lines.append(
                f"| {r['device']} ({r.get('device_name', '')}) | {r['threads']} | {r['model']} | "
                f"{r.get('runtime', 'torch')} | "
                f"{r['encoder_ms']['p50']:.0f} / {r['encoder_ms']['p95']:.0f} | "
                f"{r['decoder_ms']['p50']:.1f} / {r['decoder_ms']['p95']:.1f} | "
                f"{r['click_to_mask_ms']['p50']:.1f} / {r['click_to_mask_ms']['p95']:.1f} | "
                f"{r['volume_slices_per_s']:.2f} | {build} | {rss} | {precompute} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    tables = {"eval": eval_table, "interactive": interactive_table, "bench": bench_table}
    if len(argv) < 2 or argv[0] not in tables:
        print(__doc__, file=sys.stderr)
        return 2
    print(tables[argv[0]](argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
