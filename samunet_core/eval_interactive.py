"""The interactive-3D protocol of `samunet eval` (`--protocol interactive3d`).

Modelled on the CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical Image Segmentation": each label
of a 3d case is one target; the simulated user gives a start prompt, then up to N corrective clicks, each at the
centre of the largest 3D error region; the 3D result is scored after every step.

- Start `box3d` (default): the label's tight 3D bounding box (max inclusive) on the axial slices, i.e. a 3D box whose
  corners lie on the label's lowest and highest axial slice. `box2d`: the tight 2D box of the largest 8-connected
  component on the label's largest axial slice (the first maximum of the slice areas, as the `propagate` protocol
  picks it). Both are given with "propagate": true: the engine's prompt policy decides what that does (a 3D box is
  not walked beyond its end slices; a 2D box is carried through the volume), and later clicks carry to the
  neighbours.
- Click i (`next_click`): error = prediction XOR reference over the axial slice stack; its largest 26-connected 3D
  component (ties: the component whose first voxel comes first in C order); the click is at the voxel of that
  component with the largest Euclidean distance to the nearest voxel outside it (distance transform with the voxel
  spacing (k, row, col) in mm as sampling; voxels outside the array count as outside; ties: the first in C order),
  positive if that voxel is in the reference (missed), negative if not (spurious), on the axial slice holding it.
  No error: no more clicks; the remaining steps keep Dice (and NSD) 1.0.
- Every step's 3D result comes from the engine's prompt policy, `samunet_core.interaction.SegmentState`: one state
  per target, the start box added, then one click per step. `interaction.segment_slices`, what `samunet segment`
  runs on a prompt file, replays a file's prompts on a fresh state in the same order, so the prompt file written for
  each step (OUT/prompts/<case>__<target>__step<i>.json, IJK voxel indices of the image file's own grid) gives
  `samunet segment` exactly the reported result.
- Per target: 3D Dice and NSD (2 mm) after each step 0..N, the seconds each step took, DSC_AUC = the trapezoid rule
  with unit spacing over the Dice after clicks 1..N (as the challenge; `dsc_auc`), DSC_Final = the Dice after click N.

Slice embeddings are keyed as a `samunet_core.session.VolumeSession` keys them (encoder id, hash of the windowed
axial slices, "axial:k"), so an embedding cache shared with `samunet segment --cache-dir` (or given to `evaluate`)
serves both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from samunet_core import metrics
from samunet_core.errors import InputError
from samunet_core.evaluate import (
    NSD_TOLERANCE_MM_3D,
    Outcome,
    Row,
    TimedPredictor,
    WorstTargets,
    _atomic_write,
    _check_labels_present,
    _finite_mean,
    _RecordingDecoder,
    read_volume,
    volume_default_window,
)
from samunet_core.manifest import Case, Window
from samunet_core.prompts import SegmentPrompts, SliceBox, SlicePoint

PROTOCOL = "interactive3d"
STARTS = ("box3d", "box2d")
DEFAULT_START = "box3d"
DEFAULT_CLICKS = 5
MAX_CLICKS = 50
CONNECTIVITY_3D = np.ones((3, 3, 3), dtype=bool)  # 26-connected error components, as the challenge's cc3d call
CASE_CACHE_BYTES = 1 << 30  # per-case in-memory embeddings: every step re-runs the policy over the same slices
PROMPTS_DIR = "prompts"


class VoxelClick(NamedTuple):
    """One simulated 3D click: voxel (k, row, col) of the axial slice stack; positive adds, negative removes."""

    k: int
    row: int
    col: int
    positive: bool


def check_options(start: str, clicks: int) -> None:
    """InputError for a start or a click count the protocol does not take."""
    if start not in STARTS:
        raise InputError(f"--start {start!r}: use one of {', '.join(STARTS)}")
    if isinstance(clicks, bool) or not isinstance(clicks, (int, np.integer)) or not 0 <= clicks <= MAX_CLICKS:
        raise InputError(f"--clicks {clicks}: give a whole number of clicks from 0 to {MAX_CLICKS}")


def options(protocol: str, start: str | None, clicks: int | None) -> tuple[str | None, int | None]:
    """(start, clicks) for `evaluate`: defaults filled and checked for this protocol; InputError when they are given
    to another protocol."""
    if protocol == PROTOCOL:
        start = DEFAULT_START if start is None else start
        clicks = DEFAULT_CLICKS if clicks is None else clicks
        check_options(start, clicks)
        return start, clicks
    if start is not None or clicks is not None:
        raise InputError(f"--start and --clicks belong to --protocol {PROTOCOL}, not {protocol}")
    return None, None


# ---------------------------------------------------------------------------------------------------------------------
# The simulated user
# ---------------------------------------------------------------------------------------------------------------------
def next_click(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
               ) -> VoxelClick | None:
    """The corrective click for a KxHxW prediction against its reference, or None when they agree (module doc)."""
    p, g = np.asarray(pred, bool), np.asarray(ref, bool)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"next_click needs two same-shape 3D masks, got {p.shape} and {g.shape}")
    error = p ^ g
    if not error.any():
        return None
    labels, n = ndimage.label(error, structure=CONNECTIVITY_3D)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    biggest = int(np.argmax(sizes))  # ndimage numbers components in C order of their first voxel; first maximum
    box = ndimage.find_objects(labels)[biggest - 1]
    region = np.pad(labels[box] == biggest, 1)  # the one-voxel frame: outside the component (and the array)
    dist = ndimage.distance_transform_edt(region, sampling=tuple(float(s) for s in spacing))[1:-1, 1:-1, 1:-1]
    # C order inside the crop is C order in the volume, so argmax's first maximum is the first in C order.
    k, row, col = (int(v) + b.start for v, b in zip(np.unravel_index(int(np.argmax(dist)), dist.shape), box,
                                                    strict=True))
    return VoxelClick(k, row, col, bool(g[k, row, col]))


def fill_steps(values: list[float], n_clicks: int, value: float = 1.0) -> list[float]:
    """Per-step values of a target that stopped early (no error left) padded with `value` to steps 0..n_clicks."""
    return list(values) + [value] * (n_clicks + 1 - len(values))


def dsc_auc(dice_per_step: list[float], n_clicks: int) -> float:
    """The challenge's DSC_AUC: the trapezoid rule with unit spacing over the Dice after clicks 1..N (step 0, the
    start prompt, is not in it; fewer than two clicks give 0.0)."""
    values = np.asarray(dice_per_step[1:n_clicks + 1], dtype=np.float64)
    return float(np.trapezoid(values, dx=1.0)) if values.size else 0.0


def dsc_final(dice_per_step: list[float], n_clicks: int) -> float:
    """The challenge's DSC_Final: the Dice after click N (the start prompt's with no clicks)."""
    return float(dice_per_step[n_clicks])


def start_box(ref: np.ndarray, start: str) -> SliceBox:
    """The start prompt for a KxHxW reference (module doc): its 3D bounding box, or the 2D box on its largest slice."""
    ref = np.asarray(ref, bool)
    if start == "box3d":
        ks, rows, cols = (np.flatnonzero(ref.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
        return SliceBox(int(ks[0]), int(ks[-1]), float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1]))
    k = largest_slice(ref)
    x0, y0, x1, y1 = metrics.tight_box(metrics.largest_component(ref[k]))
    return SliceBox(k, k, float(x0), float(y0), float(x1), float(y1))


def largest_slice(ref: np.ndarray) -> int:
    """The axial slice where the reference is largest (the first maximum: ties go to the lowest k)."""
    return int(np.argmax(ref.reshape(ref.shape[0], -1).sum(axis=1)))


def start_text(box: SliceBox, start: str) -> str:
    """results.csv's `prompt`: `box3d x0 y0 x1 y1 k k0-k1` or `box2d x0 y0 x1 y1 k k0`."""
    corners = "{:g} {:g} {:g} {:g}".format(*box.xyxy)
    return f"{start} {corners} k {box.s0}-{box.s1}" if start == "box3d" else f"{start} {corners} k {box.s0}"


@dataclass
class TargetRun:
    """One target through the protocol: per-step values for the steps made (0..len(clicks)), the final prompts and
    the final K x H x W prediction."""

    pred: np.ndarray
    prompts: SegmentPrompts
    dice: list[float] = field(default_factory=list)
    nsd: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    clicks: list[VoxelClick] = field(default_factory=list)


def run_target(segment: Callable[[SegmentPrompts], np.ndarray], prompts: SegmentPrompts, ref: np.ndarray,
               spacing: tuple[float, float, float], n_clicks: int,
               on_step: Callable[[int, SegmentPrompts], None] | None = None) -> TargetRun:
    """The start prompt, then up to `n_clicks` clicks. `segment(prompts) -> K x H x W bool` is the engine (the
    prompt policy over the whole volume); `on_step(i, prompts)` runs after step i (e.g. writes its prompt file)."""
    run: TargetRun | None = None
    for step in range(n_clicks + 1):
        if run is not None:
            click = next_click(run.pred, ref, spacing)
            if click is None:
                break
            run.clicks.append(click)
            prompts = replace(prompts, points=[*prompts.points, SlicePoint(click.k, float(click.col),
                                                                           float(click.row), click.positive)])
        t0 = time.perf_counter()
        pred = segment(prompts)
        seconds = time.perf_counter() - t0
        if run is None:
            run = TargetRun(pred, prompts)
        run.pred, run.prompts = pred, prompts
        run.seconds.append(seconds)
        run.dice.append(metrics.dice(pred, ref))
        run.nsd.append(metrics.nsd(pred, ref, NSD_TOLERANCE_MM_3D, spacing))
        if on_step is not None:
            on_step(step, prompts)
    assert run is not None
    return run


# ---------------------------------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------------------------------
def _number(value: float) -> int | float:
    nearest = round(float(value))
    return int(nearest) if abs(float(value) - nearest) < 1e-9 else float(value)


def prompt_document(frame: Any, prompts: SegmentPrompts) -> dict[str, Any]:
    """One segment's axial-slice prompts as a prompt file (docs/formats.md) in IJK: 0-based voxel indices of the
    image file's own grid (`frame`: the volume's axial SliceFrame), so `samunet segment` reads back the same prompts."""
    if frame.axis != "axial":
        raise ValueError("the interactive protocol prompts axial slices")

    def ijk(s: float, row: float, col: float) -> list[int | float]:
        return [_number(v) for v in frame.slice_to_ijk([[s, row, col]])[0]]

    segment: dict[str, Any] = {"name": prompts.name}
    if prompts.boxes:
        segment["boxes"] = [{"corners": [ijk(b.s0, b.y0, b.x0), ijk(b.s1, b.y1, b.x1)]} for b in prompts.boxes]
    if prompts.points:
        segment["points"] = [{"position": ijk(p.s, p.y, p.x), "positive": bool(p.positive)} for p in prompts.points]
    segment["propagate"] = bool(prompts.propagate)
    return {"coordinates": "IJK", "axis": "axial", "segments": [segment]}


def prompt_text(document: dict[str, Any]) -> str:
    """A prompt document as JSON text with one line per box and per click (what docs/formats.md shows)."""
    lines = ["{" + f'"coordinates": {json.dumps(document["coordinates"])}, "axis": {json.dumps(document["axis"])},',
             ' "segments": [']
    for n, segment in enumerate(document["segments"]):
        parts = [f'  {{"name": {json.dumps(segment["name"])}']
        for key in ("boxes", "points"):
            if key in segment:
                items = [json.dumps(item) for item in segment[key]]
                parts.append(f'   "{key}": [' + (",\n" + " " * (len(key) + 8)).join(items) + "]")
        parts.append(f'   "propagate": {json.dumps(segment["propagate"])}}}' + ("," if n + 1 < len(document["segments"])
                                                                                 else ""))
        lines.append(",\n".join(parts))
    lines.append(" ]}")
    return "\n".join(lines) + "\n"


def write_prompt_file(path: Path, frame: Any, prompts: SegmentPrompts) -> Path:
    """Write `prompt_document` atomically."""
    _atomic_write(path, prompt_text(prompt_document(frame, prompts)).encode("utf-8"))
    return path


def _safe(text: str) -> str:
    return text.replace("/", "_").replace("\\", "_")


def prompt_file_name(case_id: str, target: str, step: int) -> str:
    """`<case>__<target>__step<i>.json`, '/' (and '\\') in the case id or target replaced by '_'."""
    return f"{_safe(case_id)}__{_safe(target)}__step{step}.json"


def remove_step_files(folder: Path, case_id: str, target: str) -> None:
    """Delete a target's step files left in `folder` by an earlier run (which may have placed more clicks)."""
    prefix = f"{_safe(case_id)}__{_safe(target)}__step"
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        name = path.name
        if name.startswith(prefix) and name.endswith(".json") and name[len(prefix):-len(".json")].isdigit():
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------------------------------
def _fmt_clicks(clicks: list[VoxelClick]) -> str:
    return " ".join(f"{'+' if c.positive else '-'}({c.k},{c.row},{c.col})" for c in clicks)


class _PolicyRun:
    """`segment(prompts)` for `run_target` over one `interaction.SegmentState`: each call applies only the prompts
    added since the last call (the prompts only ever grow at the end: boxes, then clicks)."""

    def __init__(self, decoder: Any, n_slices: int, slice_shape: tuple[int, int],
                 slice_spacing_mm: float | None = None) -> None:
        self.decoder, self.n_slices, self.slice_shape = decoder, n_slices, slice_shape
        self.slice_spacing_mm = slice_spacing_mm
        self.state: Any = None
        self._boxes = self._points = 0

    def __call__(self, prompts: SegmentPrompts) -> np.ndarray:
        from samunet_core.interaction import SegmentState

        if self.state is None:
            self.state = SegmentState(self.decoder, self.n_slices, self.slice_shape, propagate=prompts.propagate,
                                      slice_spacing_mm=self.slice_spacing_mm, name=prompts.name)
        if len(prompts.boxes) < self._boxes or len(prompts.points) < self._points:
            raise ValueError("prompts can only be added")
        for box in prompts.boxes[self._boxes:]:
            self.state.add_box(box)
        for point in prompts.points[self._points:]:
            self.state.add_click(point)
        self._boxes, self._points = len(prompts.boxes), len(prompts.points)
        return self.state.volume()

    @property
    def warnings(self) -> list[str]:
        return list(getattr(self.state, "warnings", []))

    def scores(self) -> list[float]:
        """The decoder's predicted IoU of every slice's current mask."""
        results = getattr(self.state, "results", {})
        return [float(r.score) for r in results.values() if r.score is not None]


def eval_case(case: Case, predictor: TimedPredictor, worst: WorstTargets, out_dir: Path, start: str = DEFAULT_START,
              n_clicks: int = DEFAULT_CLICKS) -> Iterator[Row]:
    """One row per label of a 3d case (module doc); writes OUT/prompts/ as it goes."""
    from samunet_core.cache import EmbeddingCache, volume_key
    from samunet_core.transforms import window_to_uint8

    check_options(start, n_clicks)
    volume = read_volume(case)
    _check_labels_present(case, volume.labels)
    n_slices, shape = volume.labels.shape[0], tuple(volume.labels.shape[1:])
    prompt_dir = Path(out_dir) / PROMPTS_DIR
    prompt_dir.mkdir(parents=True, exist_ok=True)
    encoder_id = str(getattr(predictor.predictor, "encoder_id", getattr(predictor.predictor, "model_id", "")))
    local = EmbeddingCache(max_bytes=CASE_CACHE_BYTES)
    windowed: dict[Window | None, tuple[np.ndarray, str]] = {}
    default_window: list[Window | None] = []

    def effective_window(label: int) -> Window | None:
        """The label's window (manifest), else the volume's percentile window (None: 8-bit data as it is)."""
        window = case.window_for(label)
        if window is None:
            if not default_window:
                default_window.append(volume_default_window(volume.image))
            window = default_window[0]
        return window

    def slices_u8(window: Window | None) -> tuple[np.ndarray, str]:
        """(K x H x W uint8 axial slices the model sees, their VolumeSession content key)."""
        if window not in windowed:
            u8 = volume.image if window is None else window_to_uint8(volume.image, *window)
            windowed[window] = (u8, volume_key(u8, "axial"))
        return windowed[window]

    def embedding_of(k: int, window: Window | None) -> Any:
        u8, content = slices_u8(window)
        key = (encoder_id, content, f"axial:{k}")
        embedding = local.get(key)
        if embedding is None:
            embedding = predictor.encode(np.ascontiguousarray(u8[k]), key=key)
            local.put(key, embedding)
        return embedding

    for label, name in case.labels.items():
        ref = volume.labels == label
        window = effective_window(label)
        k_big = largest_slice(ref)
        box = start_box(ref, start)
        decoder = _RecordingDecoder(predictor, lambda k, w=window: embedding_of(k, w))
        policy = _PolicyRun(decoder, n_slices, shape, volume.spacing[0])
        remove_step_files(prompt_dir, case.id, name)

        def write_step(step: int, prompts: SegmentPrompts, name: str = name) -> None:
            write_prompt_file(prompt_dir / prompt_file_name(case.id, name, step), volume.frame, prompts)

        run = run_target(policy, SegmentPrompts(name, boxes=[box], propagate=True), ref, volume.spacing, n_clicks,
                         write_step)
        dice_steps = fill_steps(run.dice, n_clicks)
        scores = policy.scores()
        reached = sorted({k for k, _ in decoder.calls})
        lcc = metrics.largest_component(ref[k_big])
        gt_k = np.flatnonzero(ref.reshape(n_slices, -1).any(axis=1))
        extra = (f"start={start}; box_k={box.s0}-{box.s1}; gt_k={gt_k[0]}-{gt_k[-1]}; "
                 f"decoded_k={reached[0]}-{reached[-1]}; "
                 f"slices_segmented={int(run.pred.reshape(n_slices, -1).any(axis=1).sum())}; "
                 f"decodes={len(decoder.calls)}; clicks={_fmt_clicks(run.clicks)}; warnings={len(policy.warnings)}")
        final_file = prompt_file_name(case.id, name, len(run.clicks))
        row = Row(case.id, case.modality, case.kind, name, label, k_big, run.dice[-1], run.nsd[-1],
                  _finite_mean(scores), int(ref.sum()), int(run.pred.sum()), metrics.count_components(ref[k_big]),
                  int(lcc.sum()), start_text(box, start), len(run.clicks), dice_steps, window, extra,
                  nsd_per_step=fill_steps(run.nsd, n_clicks), s_per_step=run.seconds,
                  dsc_auc=dsc_auc(dice_steps, n_clicks), prompt_file=f"{PROMPTS_DIR}/{final_file}")
        if worst.wants(row.dice):
            on_slice = [metrics.Click(c.col, c.row, c.positive) for c in run.clicks if c.k == k_big]
            outcome = Outcome(run.pred[k_big], row.prompt, row.iou_pred, [row.dice],
                              box=tuple(int(v) for v in box.xyxy), clicks=on_slice)
            worst.offer(row.dice, slices_u8(window)[0][k_big], ref[k_big], outcome,
                        f"{case.id} {name} k{k_big} {start} +{len(run.clicks)} 3D dice {row.dice:.3f}")
        yield row


def summary_extras(rows: list[Row]) -> dict[str, Any]:
    """Per-step means for a group of interactive3d rows (all with the same number of steps); {} for other rows."""
    if not rows or any(r.dsc_auc is None for r in rows):
        return {}
    return {"mean_dice_per_step": [round(float(v), 6) for v in np.mean([r.dice_per_click for r in rows], axis=0)],
            "mean_nsd_per_step": [round(float(v), 6) for v in np.mean([r.nsd_per_step for r in rows], axis=0)],
            "dsc_auc": round(float(np.mean([r.dsc_auc for r in rows])), 6),
            "dsc_final": round(float(np.mean([r.dice for r in rows])), 6)}


__all__ = ["PROTOCOL", "STARTS", "DEFAULT_START", "DEFAULT_CLICKS", "MAX_CLICKS", "VoxelClick", "check_options",
           "options", "next_click", "fill_steps", "dsc_auc", "dsc_final", "start_box", "largest_slice", "run_target",
           "prompt_document", "write_prompt_file", "prompt_file_name", "remove_step_files", "eval_case",
           "summary_extras"]
