"""Accuracy protocols over an evaluation manifest: `samunet eval`.

Protocols (DESIGN.md, shared/data/reference/README.md):
- box: the tight box (max inclusive) of the reference's largest 8-connected component, no margin, no jitter.
- point1 / point3 / point5: first a positive click at the interior point of that component farthest from its
  boundary, then each next click at the centre of the largest error region (positive if missed, negative if
  spurious), all clicks so far given together with the previous logits as mask input.
- propagate (3D cases only): a box on the axial slice where the label is largest, carried through the volume by
  `samunet_core.propagate`; scored with 3D Dice/NSD over the whole volume.
- interactive3d (3D cases only): a start box (3D or 2D), then N clicks each at the centre of the largest 3D error
  region, 3D Dice/NSD after every step (samunet_core/eval_interactive.py).
Every protocol reaches the model through samunet_core.interaction, the prompt policy every front end uses.

2D cases: each mask is a target. 3D cases: every (label, axial slice k) with at least 30 label voxels is a target; the
slice is `array[k]` of the LPS-reoriented volume, windowed with the label's window (target_windows, else the case's).
One embedding is computed per (case, slice, window) and reused by every target on it.
Dice and NSD are computed at the slice's resolution against the whole reference mask. NSD tolerance: 2 px for 2D
images, 2 mm (in-plane spacing, or 3D spacing for propagate) for volumes.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core import metrics
from samunet_core.errors import InputError
from samunet_core.manifest import Case, Manifest, Window

PROTOCOLS = ("box", "point1", "point3", "point5", "propagate", "interactive3d")
VOLUME_PROTOCOLS = ("propagate", "interactive3d")  # one row per label of a 3d case; 2d cases are left out
MIN_SLICE_VOXELS = 30
NSD_TOLERANCE_PX_2D = 2.0
NSD_TOLERANCE_MM_3D = 2.0
CSV_COLUMNS = ("case_id", "modality", "kind", "target", "label", "k", "dice", "nsd", "iou_pred", "gt_pixels",
               "pred_pixels", "n_components", "lcc_pixels", "prompt", "n_clicks", "dice_per_click", "window", "extra",
               "nsd_per_step", "s_per_step", "dsc_auc", "prompt_file")


# ---------------------------------------------------------------------------------------------------------------------
# Images in, targets out
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Volume:
    """A 3D case as displayed axial slices: image KxHxW (native dtype), labels KxHxW int (LPS array[k]);
    spacing (k, row, col) in mm; frame: the image's axial SliceFrame (slice <-> the file's own voxel grid)."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    frame: Any = None


def read_image_2d(path: Path, case_id: str) -> np.ndarray:
    """HxW or HxWx3 image of a 2D case (grey stays grey, colour becomes RGB); 16-bit grey is kept."""
    from samunet_core.io.volumes import read_image_2d as read_png

    try:
        return read_png(path).array
    except InputError as exc:
        raise InputError(f"case '{case_id}': {exc}") from exc


def read_mask_2d(path: Path, shape: tuple[int, int], case_id: str) -> np.ndarray:
    """HxW bool from a 0/255 PNG; the mask must have the image's height and width."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mask = np.asarray(img)
    except OSError as exc:
        raise InputError(f"case '{case_id}': cannot read mask {path} ({exc})") from exc
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != tuple(shape):
        raise InputError(f"case '{case_id}': mask {path} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                         f"{shape[1]}x{shape[0]}; masks must match their image")
    return mask > 0


def read_volume(case: Case) -> Volume:
    """Image and labelmap of a 3D case as LPS axial slices (array[k] of the LPS-reoriented volume), grids checked."""
    image = _read_3d(case.image, case.id, "image")
    labels = _read_3d(case.labelmap, case.id, "labelmap")
    if not image.geometry.same_grid(labels.geometry):
        raise InputError(f"case '{case.id}': image {case.image} ({image.geometry.describe()}) and labelmap "
                         f"{case.labelmap} ({labels.geometry.describe()}) are not on one voxel grid; resample the "
                         "labelmap onto the image")
    frame = image.frame("axial")
    label_array = labels.array
    if not np.issubdtype(label_array.dtype, np.integer):
        label_array = np.rint(label_array).astype(np.int64)
    sx, sy, sz = frame.reorientation.lps_geometry(image.geometry).spacing
    return Volume(frame.volume_to_slices(image.array), frame.volume_to_slices(label_array), (sz, sy, sx), frame)


def _read_3d(path: Path | None, case_id: str, what: str) -> Any:
    from samunet_core.io.volumes import read_volume as read_any

    try:
        volume = read_any(path)
    except InputError as exc:
        raise InputError(f"case '{case_id}': {what}: {exc}") from exc
    if volume.is_2d:
        raise InputError(f"case '{case_id}': {what} {path} is a 2D image; a 3d case needs a volume")
    return volume


def window_slice(array: np.ndarray, window: Window | None, volume_window: Window | None) -> np.ndarray:
    """2D slice -> HxW uint8 the model sees (DESIGN.md default image rules).

    uint8 data without a window is used as it is; otherwise the window (the target's, else the volume's percentile
    window `volume_window`) maps to 0..255 by clip((I - lo)/(hi - lo), 0, 1) * 255, truncated.
    """
    from samunet_core.transforms import window_to_uint8

    if window is None:
        if array.dtype == np.uint8:
            return array
        window = volume_window
    return window_to_uint8(array, *window)


def volume_default_window(image: np.ndarray) -> Window | None:
    """The window for targets without one: None for 8-bit data, else the 0.5/99.5 percentiles of the volume."""
    from samunet_core.transforms import percentile_window

    return None if image.dtype == np.uint8 else percentile_window(image)


@dataclass
class SliceTargets:
    """Targets that share one embedding: a 3D slice k under one window, or a whole 2D image."""

    k: int | None
    window: Window | None
    labels: list[int]


def plan_3d(case: Case, labels: np.ndarray, slice_stride: int = 1) -> list[SliceTargets]:
    """Group the (label, k) targets of a KxHxW labelmap by (slice, window); k ascending, labels ascending."""
    max_label = max(max(case.labels), int(labels.max()))
    groups: list[SliceTargets] = []
    for k in range(0, labels.shape[0], slice_stride):
        counts = np.bincount(labels[k].ravel().astype(np.int64).clip(0), minlength=max_label + 1)
        by_window: dict[Window | None, list[int]] = {}
        for label in case.labels:
            if counts[label] >= MIN_SLICE_VOXELS:
                by_window.setdefault(case.window_for(label), []).append(label)
        groups += [SliceTargets(k, window, labs) for window, labs in by_window.items()]
    return groups


def count_targets(case: Case, slice_stride: int, protocol: str) -> int:
    """Number of result rows a case will give (reads 3D labelmaps only)."""
    if protocol in VOLUME_PROTOCOLS:
        return len(case.labels) if case.kind == "3d" else 0
    if case.kind == "2d":
        return len(case.targets)
    labels_volume = _read_3d(case.labelmap, case.id, "labelmap")
    labels = labels_volume.frame("axial").volume_to_slices(labels_volume.array)
    return sum(len(g.labels) for g in plan_3d(case, labels, slice_stride))


# ---------------------------------------------------------------------------------------------------------------------
# The simulated user
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One target's prediction: HxW bool mask, the prompts used, the decoder's IoU guess, Dice after each click."""

    pred: np.ndarray
    prompt: str
    iou_pred: float
    dice_per_click: list[float]
    box: tuple[int, int, int, int] | None = None
    clicks: list[metrics.Click] = field(default_factory=list)


class TimedPredictor:
    """Wraps a Predictor and adds up encoder/decoder time and calls; optionally reuses embeddings from a cache
    keyed by the pixels the encoder sees (so every protocol, and every model sharing the encoder, encodes once)."""

    def __init__(self, predictor: Any, cache: Any = None, fp16_embeddings: bool = False) -> None:
        self.predictor = predictor
        self.cache = cache
        self.fp16_embeddings = fp16_embeddings
        self.encoder_s = self.decoder_s = 0.0
        self.encoder_calls = self.decoder_calls = self.cache_hits = 0

    def encode(self, image: np.ndarray, key: Any = None) -> Any:
        """The image's embedding; `key`: its key in the cache (default: encoder id and a hash of the pixels)."""
        from samunet_core.cache import content_hash

        if self.cache is None:
            key = None
        elif key is None:
            key = (self.predictor.encoder_id, content_hash(image), "image")
        if key is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self.cache_hits += 1
                return self._stored(cached)
        t0 = time.perf_counter()
        embedding = self.predictor.encode(image)
        self.encoder_s += time.perf_counter() - t0
        self.encoder_calls += 1
        if key is not None:
            self.cache.put(key, embedding)
        return self._stored(embedding)

    def _stored(self, embedding: Any) -> Any:
        """The embedding as an fp16 cache would give it back (stored in fp16, decoded in fp32), if asked."""
        if not self.fp16_embeddings:
            return embedding
        import torch

        return embedding.converted(dtype=torch.float16).converted(dtype=torch.float32)

    def predict(self, embedding: Any, **prompts: Any) -> Any:
        t0 = time.perf_counter()
        out = self.predictor.predict(embedding, **prompts)
        self.decoder_s += time.perf_counter() - t0
        self.decoder_calls += 1
        return out


def _one_slice(predictor: TimedPredictor, embedding: Any) -> Any:
    """A propagate.SliceDecoder whose only slice (0) is `embedding`, for the interaction module."""
    from samunet_core.propagate import EmbeddingDecoder

    return EmbeddingDecoder(predictor, lambda _k: embedding)


def prompt_box(predictor: TimedPredictor, embedding: Any, ref: np.ndarray) -> Outcome:
    """Box protocol on one HxW reference mask: the box alone through `interaction.decode_slice` (one model call)."""
    from samunet_core.interaction import SlicePrompts, decode_slice

    box = metrics.tight_box(metrics.largest_component(ref))
    out = decode_slice(_one_slice(predictor, embedding), 0, SlicePrompts(boxes=(box,)))
    pred = out.mask
    return Outcome(pred, "box {} {} {} {}".format(*box), out.model.score, [metrics.dice(pred, ref)], box=box)


def prompt_clicks(predictor: TimedPredictor, embedding: Any, ref: np.ndarray, n_clicks: int) -> Outcome:
    """Point protocol with up to `n_clicks` clicks on one HxW reference mask (stops early if the mask is perfect).

    The simulated user clicks, and each click is one `interaction.decode_step` with all clicks so far and the previous
    logits: the sequence `interaction.decode_slice` runs on the final click list (rule 1)."""
    from samunet_core.interaction import Click, SlicePrompts, decode_step

    decoder = _one_slice(predictor, embedding)
    x, y = metrics.interior_point(metrics.largest_component(ref))
    clicks = [metrics.Click(x, y, True)]
    prompts = SlicePrompts(clicks=(Click(x, y, True),))
    logits = None
    dices: list[float] = []
    while True:
        step = decode_step(decoder, 0, prompts, logits)
        pred, logits = step.mask, step.logits
        dices.append(metrics.dice(pred, ref))
        if len(clicks) >= n_clicks:
            break
        click = metrics.next_click(pred, ref)
        if click is None:
            break
        clicks.append(click)
        prompts = prompts.with_click(Click(click.x, click.y, click.positive))
    prompt = ";".join(f"point{'+' if c.positive else '-'} {c.x} {c.y}" for c in clicks)
    return Outcome(pred, prompt, step.score, dices, clicks=clicks)


def run_protocol(protocol: str, predictor: TimedPredictor, embedding: Any, ref: np.ndarray) -> Outcome:
    if protocol == "box":
        return prompt_box(predictor, embedding, ref)
    return prompt_clicks(predictor, embedding, ref, int(protocol[len("point"):]))


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    case_id: str
    modality: str
    kind: str
    target: str
    label: int | None
    k: int | None
    dice: float
    nsd: float
    iou_pred: float
    gt_pixels: int
    pred_pixels: int
    n_components: int
    lcc_pixels: int
    prompt: str
    n_clicks: int
    dice_per_click: list[float]
    window: Window | None
    extra: str = ""
    nsd_per_step: list[float] = field(default_factory=list)  # interactive3d only, like the three below
    s_per_step: list[float] = field(default_factory=list)
    dsc_auc: float | None = None
    prompt_file: str = ""

    def as_csv(self) -> dict[str, str]:
        return {
            "case_id": self.case_id, "modality": self.modality, "kind": self.kind, "target": self.target,
            "label": "" if self.label is None else str(self.label), "k": "" if self.k is None else str(self.k),
            "dice": f"{self.dice:.6f}", "nsd": f"{self.nsd:.6f}",
            "iou_pred": "" if not np.isfinite(self.iou_pred) else f"{self.iou_pred:.6f}",
            "gt_pixels": str(self.gt_pixels), "pred_pixels": str(self.pred_pixels),
            "n_components": str(self.n_components), "lcc_pixels": str(self.lcc_pixels), "prompt": self.prompt,
            "n_clicks": str(self.n_clicks), "dice_per_click": " ".join(f"{d:.4f}" for d in self.dice_per_click),
            "window": "" if self.window is None else f"{_exact(self.window[0])} {_exact(self.window[1])}",
            "extra": self.extra, "nsd_per_step": " ".join(f"{v:.4f}" for v in self.nsd_per_step),
            "s_per_step": " ".join(f"{v:.3f}" for v in self.s_per_step),
            "dsc_auc": "" if self.dsc_auc is None else f"{self.dsc_auc:.6f}", "prompt_file": self.prompt_file,
        }


def _exact(value: float) -> str:
    """A number as short as `:g` writes it when that reads back exactly, else Python's exact repr (e.g. a percentile
    window), so `samunet segment --window LO HI` reproduces the window bit for bit."""
    short = f"{value:g}"
    return short if float(short) == float(value) else repr(float(value))


class WorstTargets:
    """Keeps the images of the N lowest-Dice targets for overlays (N small: nothing else is kept in memory)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._heap: list[tuple[float, int, dict[str, Any]]] = []
        self._seq = 0

    def wants(self, dice: float) -> bool:
        return self.n > 0 and (len(self._heap) < self.n or -self._heap[0][0] > dice)

    def offer(self, dice: float, image: np.ndarray, ref: np.ndarray, outcome: Outcome, title: str) -> None:
        if not self.wants(dice):
            return
        self._seq += 1
        item = {"image": image.copy(), "ref": ref.copy(), "pred": outcome.pred.copy(), "box": outcome.box,
                "clicks": list(outcome.clicks), "title": title, "dice": dice}
        heapq.heappush(self._heap, (-dice, -self._seq, item))
        if len(self._heap) > self.n:
            heapq.heappop(self._heap)

    def worst_first(self) -> list[dict[str, Any]]:
        return [item for _, _, item in sorted(self._heap, key=lambda e: (-e[0], -e[1]))]


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results_csv(path: Path, rows: list[Row]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.as_csv())
    _atomic_write(path, buffer.getvalue().encode("utf-8"))


def _group_stats(rows: list[Row]) -> dict[str, Any]:
    from samunet_core.eval_interactive import summary_extras

    dices = [r.dice for r in rows]
    return {"n": len(rows), "mean_dice": round(float(np.mean(dices)), 6) if rows else None,
            "mean_nsd": round(float(np.mean([r.nsd for r in rows])), 6) if rows else None, **summary_extras(rows)}


def summarise(rows: list[Row], info: dict[str, Any]) -> dict[str, Any]:
    """summary.json content: overall and grouped means plus run information."""
    summary: dict[str, Any] = {"model": info["model"], "protocol": info["protocol"], "n_targets": len(rows)}
    overall = _group_stats(rows)
    summary["mean_dice"] = overall["mean_dice"]
    summary["mean_nsd"] = overall["mean_nsd"]
    summary["median_dice"] = round(statistics.median(r.dice for r in rows), 6) if rows else None
    summary["n_dice_below_0.3"] = sum(r.dice < 0.3 for r in rows)
    summary.update({k: v for k, v in overall.items() if k not in ("n", "mean_dice", "mean_nsd")})  # interactive3d
    for key, attr in (("by_modality", "modality"), ("by_kind", "kind"), ("by_case", "case_id")):
        groups: dict[str, list[Row]] = {}
        for r in rows:
            groups.setdefault(getattr(r, attr), []).append(r)
        summary[key] = {name: _group_stats(group) for name, group in groups.items()}
    summary.update({k: v for k, v in info.items() if k not in summary})
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------------------------------
def _draw_panel(rgb: np.ndarray, item: dict[str, Any], region: tuple[int, int, int, int], side: int) -> np.ndarray:
    """Crop `region` (y0, y1, x0, x1; end exclusive) of HxWx3 `rgb`, scale it up by an integer factor towards `side`
    pixels and draw the contours and prompts on it."""
    import cv2

    y0, y1, x0, x1 = region
    h, w = y1 - y0, x1 - x0
    scale = max(1, side // max(h, w))
    canvas = cv2.resize(np.ascontiguousarray(rgb[y0:y1, x0:x1]), (w * scale, h * scale),
                        interpolation=cv2.INTER_NEAREST)

    def contour(mask: np.ndarray, color: tuple[int, int, int]) -> None:
        crop = np.ascontiguousarray(mask[y0:y1, x0:x1]).astype(np.uint8)
        big = cv2.resize(crop, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        found, _ = cv2.findContours(big, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, found, -1, color, 2 if scale > 1 else 1)

    contour(item["ref"], (0, 255, 0))
    contour(item["pred"], (255, 0, 0))
    if item["box"] is not None:
        bx0, by0, bx1, by1 = item["box"]
        cv2.rectangle(canvas, ((bx0 - x0) * scale, (by0 - y0) * scale),
                      ((bx1 + 1 - x0) * scale - 1, (by1 + 1 - y0) * scale - 1), (255, 255, 0), 1)
    for click in item["clicks"]:
        centre = (int((click.x - x0) * scale + scale // 2), int((click.y - y0) * scale + scale // 2))
        cv2.circle(canvas, centre, 5, (0, 255, 255) if click.positive else (255, 0, 255), -1)
    return canvas


def render_overlay(item: dict[str, Any], side: int = 512) -> np.ndarray:
    """RGB uint8 picture of one target: the whole image the model saw (left) and a close-up of the target (right),
    with the reference contour (green), predicted contour (red), box (yellow), clicks (positive cyan, negative
    magenta) and a caption."""
    import cv2

    image = item["image"]
    rgb = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else np.ascontiguousarray(image[:, :, :3])
    h, w = rgb.shape[:2]
    panels = [_draw_panel(rgb, item, (0, h, 0, w), side)]
    area = item["ref"] | item["pred"]
    if area.any():
        x0, y0, x1, y1 = metrics.tight_box(area)
        if item["box"] is not None:
            x0, y0, x1, y1 = min(x0, item["box"][0]), min(y0, item["box"][1]), max(x1, item["box"][2]), \
                max(y1, item["box"][3])
        margin = max(8, (max(x1 - x0, y1 - y0) + 1) // 4)
        region = (max(y0 - margin, 0), min(y1 + margin + 1, h), max(x0 - margin, 0), min(x1 + margin + 1, w))
        if (region[1] - region[0]) * (region[3] - region[2]) < 0.5 * h * w:
            panels.append(_draw_panel(rgb, item, region, side))
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    canvas = np.concatenate(padded, axis=1)
    cv2.putText(canvas, item["title"], (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def write_overlays(out_dir: Path, worst: WorstTargets) -> list[str]:
    from PIL import Image

    folder = out_dir / "overlays"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for rank, item in enumerate(worst.worst_first(), start=1):
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in item["title"].split(" dice")[0])
        path = folder / f"{rank:03d}_{safe}.png"
        buffer = io.BytesIO()
        Image.fromarray(render_overlay(item)).save(buffer, format="PNG")
        _atomic_write(path, buffer.getvalue())
        names.append(path.name)
    return names


# ---------------------------------------------------------------------------------------------------------------------
# Running a manifest
# ---------------------------------------------------------------------------------------------------------------------
def _target_row(case: Case, target: str, label: int | None, k: int | None, ref: np.ndarray, outcome: Outcome,
                spacing: tuple[float, float] | None, window: Window | None) -> Row:
    lcc = metrics.largest_component(ref)
    tolerance = NSD_TOLERANCE_PX_2D if spacing is None else NSD_TOLERANCE_MM_3D
    return Row(case.id, case.modality, case.kind, target, label, k, outcome.dice_per_click[-1],
               metrics.nsd(outcome.pred, ref, tolerance, spacing), outcome.iou_pred, int(ref.sum()),
               int(outcome.pred.sum()), metrics.count_components(ref), int(lcc.sum()), outcome.prompt,
               len(outcome.clicks) if outcome.clicks else 0, outcome.dice_per_click, window)


def _eval_case_2d(case: Case, protocol: str, predictor: TimedPredictor, worst: WorstTargets) -> Iterator[Row]:
    image = read_image_2d(case.image, case.id)
    if image.dtype != np.uint8:
        image = window_slice(image, case.window, volume_default_window(image))
    embedding = predictor.encode(image)
    for target in case.targets:
        ref = read_mask_2d(target.mask, image.shape[:2], case.id)
        if not ref.any():
            raise InputError(f"case '{case.id}': mask {target.mask} of target '{target.name}' is empty")
        outcome = run_protocol(protocol, predictor, embedding, ref)
        row = _target_row(case, target.name, None, None, ref, outcome, None, case.window)
        worst.offer(row.dice, image, ref, outcome, f"{case.id} {target.name} dice {row.dice:.3f}")
        yield row


def _eval_case_3d(case: Case, protocol: str, predictor: TimedPredictor, worst: WorstTargets,
                  slice_stride: int) -> Iterator[Row]:
    volume = read_volume(case)
    _check_labels_present(case, volume.labels)
    volume_window = volume_default_window(volume.image) if case.window is None else None
    in_plane = volume.spacing[1:]
    for group in plan_3d(case, volume.labels, slice_stride):
        k = group.k
        image = window_slice(volume.image[k], group.window, volume_window)
        embedding = predictor.encode(image)
        for label in group.labels:
            ref = volume.labels[k] == label
            outcome = run_protocol(protocol, predictor, embedding, ref)
            row = _target_row(case, case.labels[label], label, k, ref, outcome, in_plane, group.window)
            worst.offer(row.dice, image, ref, outcome, f"{case.id} {case.labels[label]} k{k} dice {row.dice:.3f}")
            yield row


def _check_labels_present(case: Case, labels: np.ndarray) -> None:
    present = set(np.unique(labels).tolist()) - {0}
    missing = sorted(set(case.labels) - present)
    if missing:
        raise InputError(f"case '{case.id}': labels {missing} are listed in the manifest but absent from "
                         f"{case.labelmap}; list only labels that occur")


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


class _RecordingDecoder:
    """A propagate.SliceDecoder over cached embeddings of one (case, window) that records each decode's slice and
    predicted IoU."""

    def __init__(self, predictor: TimedPredictor, embedding_of: Any) -> None:
        self.predictor, self.embedding_of = predictor, embedding_of
        self.calls: list[tuple[int, float]] = []

    def predict(self, k: int, **prompts: Any) -> Any:
        out = self.predictor.predict(self.embedding_of(k), **prompts)
        self.calls.append((k, float(out.scores[0])))
        return out


def _eval_case_propagate(case: Case, predictor: TimedPredictor, worst: WorstTargets) -> Iterator[Row]:
    """One row per label: a box on the label's largest axial slice carried through the volume by the engine's walk
    (`interaction.SegmentState`, "propagate": true, as `samunet segment` runs it); 3D Dice and NSD over the whole
    volume."""
    from samunet_core.cache import EmbeddingCache
    from samunet_core.interaction import SegmentState
    from samunet_core.prompts import SliceBox
    from samunet_core.propagate import stack

    volume = read_volume(case)
    _check_labels_present(case, volume.labels)
    volume_window = volume_default_window(volume.image) if case.window is None else None
    n_slices, shape = volume.labels.shape[0], volume.labels.shape[1:]
    cache = EmbeddingCache()  # slices are shared by every label with the same window

    def embedding_of(k: int, window: Window | None) -> Any:
        key = (str(getattr(predictor.predictor, "model_id", "")), f"{case.id}|{window}", f"axial:{k}")
        embedding = cache.get(key)
        if embedding is None:
            embedding = predictor.encode(window_slice(volume.image[k], window, volume_window))
            cache.put(key, embedding)
        return embedding

    for label, name in case.labels.items():
        ref3d = volume.labels == label
        areas = ref3d.reshape(n_slices, -1).sum(axis=1)
        k_start = int(np.argmax(areas))  # the first maximum: ties go to the lowest k
        window = case.window_for(label)
        lcc = metrics.largest_component(ref3d[k_start])
        box = metrics.tight_box(lcc)
        decoder = _RecordingDecoder(predictor, lambda k, w=window: embedding_of(k, w))
        state = SegmentState(decoder, n_slices, shape, propagate=True, slice_spacing_mm=volume.spacing[0])
        state.add_box(SliceBox(k_start, k_start, *box))  # what `samunet segment` does with this box, propagated
        masks = state.masks()
        pred = stack(masks, n_slices, shape)
        reached = sorted(masks)
        scores = [score for _, score in decoder.calls]
        gt_k = np.flatnonzero(areas)
        extra = (f"k_start={k_start}; walked={reached[0]}-{reached[-1]}; gt_k={gt_k[0]}-{gt_k[-1]}; "
                 f"slices_segmented={int(pred.reshape(n_slices, -1).any(axis=1).sum())}; "
                 f"iou_start={scores[0]:.4f}; decodes={len(scores)}")
        row = Row(case.id, case.modality, case.kind, name, label, k_start, metrics.dice(pred, ref3d),
                  metrics.nsd(pred, ref3d, NSD_TOLERANCE_MM_3D, volume.spacing), _finite_mean(scores),
                  int(ref3d.sum()), int(pred.sum()), metrics.count_components(ref3d[k_start]), int(lcc.sum()),
                  "box {} {} {} {}".format(*box), 0, [], window, extra)
        if worst.wants(row.dice):
            outcome = Outcome(pred[k_start], row.prompt, scores[0], [row.dice], box=box)
            image = window_slice(volume.image[k_start], window, volume_window)
            worst.offer(row.dice, image, ref3d[k_start], outcome, f"{case.id} {name} k{k_start} 3D dice {row.dice:.3f}")
        yield row


def evaluate(manifest: Manifest, predictor: Any, protocol: str, out_dir: Path, *, manifest_path: str = "",
             limit: int | None = None, slice_stride: int = 1, overlays: int = 0, progress: bool = True,
             cache: Any = None, fp16_embeddings: bool = False, start: str | None = None,
             clicks: int | None = None) -> dict[str, Any]:
    """Run one protocol over a manifest; write DIR/results.csv, DIR/summary.json (and overlays; interactive3d: the
    prompt file of every step in DIR/prompts/). Returns the summary.

    limit: only the first N cases; slice_stride: only 3D slices k with k % stride == 0; start, clicks: the
    interactive3d protocol's start prompt (box3d, box2d) and number of clicks (default box3d, 5).
    """
    from tqdm import tqdm

    from samunet_core import eval_interactive

    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}")
    if slice_stride < 1:
        raise InputError(f"--slice-stride must be >= 1, got {slice_stride}")
    start, clicks = eval_interactive.options(protocol, start, clicks)
    cases = list(manifest.cases[:limit] if limit else manifest.cases)
    if protocol in VOLUME_PROTOCOLS:
        cases = [c for c in cases if c.kind == "3d"]
        if not cases:
            raise InputError(f"the {protocol} protocol needs 3d cases; this manifest (or --limit) selects none")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timed = TimedPredictor(predictor, cache, fp16_embeddings)
    worst = WorstTargets(overlays)
    total = sum(count_targets(c, slice_stride, protocol) for c in cases)
    rows: list[Row] = []
    with tqdm(total=total, desc=f"eval {protocol}", unit="target", disable=not progress) as bar:
        for case in cases:
            bar.set_postfix_str(case.id)
            if protocol == "propagate":
                produced = _eval_case_propagate(case, timed, worst)
            elif protocol == eval_interactive.PROTOCOL:
                produced = eval_interactive.eval_case(case, timed, worst, out_dir, start, clicks)
            elif case.kind == "2d":
                produced = _eval_case_2d(case, protocol, timed, worst)
            else:
                produced = _eval_case_3d(case, protocol, timed, worst, slice_stride)
            case_rows = []
            for row in produced:
                case_rows.append(row)
                bar.update(1)
            # 3D rows come slice by slice; list them label by label, slices ascending (2D rows keep manifest order).
            rows += sorted(case_rows, key=lambda r: (r.label or 0, r.k or 0))
    wall = time.perf_counter() - t_start
    import torch

    info = {
        "model": getattr(predictor, "model_id", "?"), "protocol": protocol, "manifest": manifest_path,
        "weights_sha256": getattr(getattr(predictor, "weights", None), "sha256", None),
        "n_cases": len(cases), "slice_stride": slice_stride, "limit": limit, "fp16_embeddings": fp16_embeddings,
        "nsd_tolerance": {"2d_px": NSD_TOLERANCE_PX_2D, "3d_mm": NSD_TOLERANCE_MM_3D},
        "min_slice_voxels": MIN_SLICE_VOXELS,
        "device": str(getattr(predictor, "device", "?")), "runtime": getattr(predictor, "runtime", "torch"),
        "threads": torch.get_num_threads(), "wall_s": round(wall, 2),
        "encoder_calls": timed.encoder_calls, "encoder_cache_hits": timed.cache_hits,
        "encoder_s": round(timed.encoder_s, 2),
        "encoder_ms_mean": round(1e3 * timed.encoder_s / max(timed.encoder_calls, 1), 1),
        "decoder_calls": timed.decoder_calls, "decoder_s": round(timed.decoder_s, 2),
        "decoder_ms_mean": round(1e3 * timed.decoder_s / max(timed.decoder_calls, 1), 1),
        "torch": torch.__version__,
    }
    if protocol == eval_interactive.PROTOCOL:
        info.update(start=start, clicks=clicks)
    summary = summarise(rows, info)
    if overlays:
        summary["overlays"] = write_overlays(out_dir, worst)
    write_results_csv(out_dir / "results.csv", rows)
    _atomic_write(out_dir / "summary.json", (json.dumps(summary, indent=1) + "\n").encode("utf-8"))
    return summary
