"""THE prompt policy: prompts on one displayed slice (+ an existing mask and a mode) -> model calls -> mask.

Every front end reaches the model through this module: `samunet segment` / `--edit` / `samunet batch`
(`segment_slices`), every `samunet eval` protocol (`decode_slice`, `decode_step`, `propagate_from_seeds`) and the
Slicer controller (`decode_slice` with a `ClickMemo`, run on a VolumeSession's worker through `VolumeSession.run`), so
what eval measures is what a user gets. The model is reached through a `propagate.SliceDecoder`: anything with
`predict(k, **prompts) -> Prediction`, prompts = points / labels / boxes / mask_input as `Predictor.predict` takes them.

The rules:

1. Sequence. A slice's prompts are decoded in the order the user gave them. With at most one box: step 0 is the box
   alone (if there is a box); step i (i = 1..n) is the box + clicks[:i], with the previous step's logits as
   `mask_input`. Successive clicks therefore always feed the previous logits back, exactly as `samunet eval`'s point
   protocols measure. With two or more boxes on a slice: each box is decoded with all the slice's clicks in one call,
   no mask input, and the masks are united; the logits and score kept are those of the box with the largest mask.
   Clicks alone (no box) are decoded alone, with no derived box (the base `litemedsam` answers clicks alone with an
   empty mask; the warning says so).
2. Correction. Mode ADD with no box and a non-empty `existing` mask: the slice's box is the box around
   existing ∪ positive clicks, grown by EDIT_BOX_MARGIN model-grid pixels (`propagate.grow_box`), and the sequence of
   rule 1 runs with that box.
3. Combination. REPLACE: the mask is the model's answer. ADD: existing ∪ answer; then every negative click lying on
   the result removes what the answer excludes of the island (8-connected) it lies on, and if the click is still
   inside, the island it now lies on. REMOVE: existing minus the answer (the prompts mark what to remove). No prompts:
   existing unchanged (REPLACE: empty).
4. 3D boxes and propagation. Every slice s0..s1 of a 3D box gets the box (with that slice's own clicks); nothing
   beyond a 3D box's end slices is walked. With "propagate": the model's answers on the prompted slices are the seeds,
   carried by `propagate.propagate_masks` (the walk and its stopping rule live in propagate.py); each prompted slice
   keeps its own outcome and each carried slice is combined with `existing` by the mode (rule 3, without clicks).
5. Memo. A `ClickMemo` only skips recomputing the prefix of the sequence already decoded for the same slice,
   embedding (model and image) and mode: results are identical with and without it, and adding one click to a
   slice costs one model call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from samunet_core.propagate import (
    DEFAULT_PARAMS,
    PropagationParams,
    SliceDecoder,
    SliceMask,
    grow_box,
    mask_box,
    propagate_masks,
)

if TYPE_CHECKING:
    from samunet_core.prompts import SegmentPrompts

EDIT_BOX_MARGIN = 3.0  # model-grid pixels around the existing mask and the positive clicks (rule 2)
CLICKS_ALONE_HINT = " (this model needs a box: clicks alone give empty masks with LiteMedSAM)"


class Mode(str, enum.Enum):
    """How the model's answer combines with what the slice already holds (rule 3)."""

    REPLACE = "replace"
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True)
class Click:
    """A click in slice pixels (x = column, y = row); positive adds, negative removes."""

    x: float
    y: float
    positive: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", float(self.x))
        object.__setattr__(self, "y", float(self.y))
        object.__setattr__(self, "positive", bool(self.positive))


@dataclass(frozen=True)
class SlicePrompts:
    """Prompts on one displayed slice in the order the user gave them. boxes: (x0, y0, x1, y1) slice pixels, max
    inclusive."""

    boxes: tuple[tuple[float, float, float, float], ...] = ()
    clicks: tuple[Click, ...] = ()

    def __post_init__(self) -> None:
        boxes = []
        for box in self.boxes:
            values = tuple(float(v) for v in np.asarray(box, np.float64).reshape(-1))
            if len(values) != 4:
                raise ValueError(f"a box is (x0, y0, x1, y1), got {box!r}")
            boxes.append(values)
        object.__setattr__(self, "boxes", tuple(boxes))
        object.__setattr__(self, "clicks", tuple(c if isinstance(c, Click) else Click(*c) for c in self.clicks))

    @property
    def empty(self) -> bool:
        return not self.boxes and not self.clicks

    def points(self) -> np.ndarray:
        """Nx2 float64 (x, y) of the clicks."""
        return np.array([[c.x, c.y] for c in self.clicks], dtype=np.float64).reshape(-1, 2)

    def labels(self) -> np.ndarray:
        """N int64: 1 for a positive click, 0 for a negative one."""
        return np.array([1 if c.positive else 0 for c in self.clicks], dtype=np.int64)

    def with_click(self, click: Click) -> SlicePrompts:
        """These prompts with one more click at the end."""
        return SlicePrompts(self.boxes, (*self.clicks, click))


@dataclass
class SliceOutcome:
    """mask: HxW bool, the slice's new content (the model's answer combined with `existing` by the mode).
    model: the SliceMask of the last model call (mask, 1x1xLxL logits, score). calls: model calls made (0 when a memo
    answered). warnings: for the user (without a segment name)."""

    mask: np.ndarray
    model: SliceMask
    calls: int
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# One model call, one sequence
# ---------------------------------------------------------------------------------------------------------------------
def decode_step(decoder: SliceDecoder, k: int, prompts: SlicePrompts, previous_logits: np.ndarray | None = None
                ) -> SliceMask:
    """ONE model call with all of `prompts` on slice k, `previous_logits` (1x1xLxL) as mask input if given.

    Two or more boxes are decoded together (the clicks go with each box), their masks united, and the logits and
    score of the box with the largest mask kept.
    """
    if prompts.empty:
        raise ValueError("decode_step needs at least one box or click")
    kwargs: dict[str, Any] = {}
    if prompts.boxes:
        kwargs["boxes"] = np.asarray(prompts.boxes, np.float64).reshape(-1, 4)
    if prompts.clicks:
        kwargs["points"], kwargs["labels"] = prompts.points(), prompts.labels()
    if previous_logits is not None:
        kwargs["mask_input"] = previous_logits
    out = decoder.predict(k, **kwargs)
    if len(prompts.boxes) > 1:
        masks = np.asarray(out.masks, bool)
        best = int(np.argmax(masks.reshape(len(masks), -1).sum(1)))
        return SliceMask(masks.any(axis=0), out.logits[best:best + 1], float(out.scores[best]))
    return SliceMask(np.asarray(out.masks[0], bool), out.logits[:1], float(out.scores[0]))


def model_prompts(prompts: SlicePrompts, *, existing: np.ndarray | None = None, mode: Mode | str = Mode.REPLACE
                  ) -> SlicePrompts:
    """The prompts the model is given: the user's, with the correction box of rule 2 when it applies."""
    if Mode(mode) is not Mode.ADD or prompts.boxes or existing is None or not np.any(existing):
        return prompts
    existing = np.asarray(existing, bool)
    corners = [mask_box(existing).reshape(2, 2)]
    positive = prompts.points()[prompts.labels() == 1]
    if len(positive):
        corners.append(positive)
    xy = np.concatenate(corners)
    box = grow_box(np.array([*xy.min(axis=0), *xy.max(axis=0)]), EDIT_BOX_MARGIN, existing.shape)
    return SlicePrompts((tuple(box),), prompts.clicks)


def sequence(prompts: SlicePrompts) -> list[SlicePrompts]:
    """The model calls of rule 1, in order: each entry is one call's prompts (each after the first of a one-box or
    clicks-only sequence also gets the previous call's logits)."""
    if prompts.empty:
        return []
    if len(prompts.boxes) > 1:
        return [prompts]
    steps = [SlicePrompts(prompts.boxes)] if prompts.boxes else []
    steps += [SlicePrompts(prompts.boxes, prompts.clicks[:i]) for i in range(1, len(prompts.clicks) + 1)]
    return steps


class ClickMemo:
    """Per-caller cache of the last decoded sequence, so adding one click to a slice costs one model call.

    It only skips the prefix of a sequence already decoded for the same slice, embedding and mode: the embedding is
    named by the decoder's `decode_key(k)` when it has one (a VolumeSession: model, encoder, volume content, axis,
    slice), else by the decoder object itself. Results are identical with and without a memo. Not thread-safe: use
    one per caller (the Slicer controller runs its decodes on one worker thread).
    """

    def __init__(self) -> None:
        self._key: Any = None
        self._steps: list[SlicePrompts] = []
        self._results: list[SliceMask] = []

    def clear(self) -> None:
        self._key, self._steps, self._results = None, [], []

    def reusable(self, key: Any, steps: list[SlicePrompts]) -> list[SliceMask]:
        """The stored results of the longest common prefix of `steps` (empty for another slice/embedding/mode)."""
        if self._key is None or key != self._key:
            return []
        n = 0
        for mine, theirs in zip(self._steps, steps, strict=False):
            if mine != theirs:
                break
            n += 1
        return self._results[:n]

    def store(self, key: Any, steps: list[SlicePrompts], results: list[SliceMask]) -> None:
        self._key, self._steps, self._results = key, list(steps), list(results)


def _memo_key(decoder: SliceDecoder, k: int, mode: Mode) -> tuple[Any, int, Mode]:
    decode_key = getattr(decoder, "decode_key", None)
    return (decode_key(k) if callable(decode_key) else decoder, int(k), mode)


# ---------------------------------------------------------------------------------------------------------------------
# One slice
# ---------------------------------------------------------------------------------------------------------------------
def combine(answer: np.ndarray, existing: np.ndarray | None, mode: Mode | str,
            clicks: tuple[Click, ...] = ()) -> np.ndarray:
    """Rule 3: the model's HxW answer combined with the slice's existing mask (None: empty) by `mode`; in ADD the
    negative `clicks` then remove what the answer excludes of their island, and the island if still inside."""
    mode = Mode(mode)
    answer = np.asarray(answer, bool)
    if mode is Mode.REPLACE:
        return answer.copy()
    existing = np.zeros_like(answer) if existing is None else np.asarray(existing, bool)
    if mode is Mode.REMOVE:
        return existing & ~answer
    result = existing | answer
    negatives = [c for c in clicks if not c.positive]
    if negatives:
        from scipy import ndimage

        h, w = result.shape
        connect = np.ones((3, 3), bool)
        for click in negatives:
            y, x = min(max(int(round(click.y)), 0), h - 1), min(max(int(round(click.x)), 0), w - 1)
            if not result[y, x]:
                continue
            islands, _ = ndimage.label(result, structure=connect)
            result = result & ~((islands == islands[y, x]) & ~answer)
            if result[y, x]:
                islands, _ = ndimage.label(result, structure=connect)
                result = result & (islands != islands[y, x])
    return result


def decode_slice(decoder: SliceDecoder, k: int, prompts: SlicePrompts, *, existing: np.ndarray | None = None,
                 mode: Mode | str = Mode.REPLACE, memo: ClickMemo | None = None) -> SliceOutcome:
    """All prompts on slice k -> SliceOutcome, by rules 1-3 (and 5 with a memo).

    existing: HxW bool, what the slice holds now (None: empty). With no prompts the slice keeps `existing` (REPLACE:
    empty) and no model call is made; `existing` is then needed for the slice's shape.
    """
    mode = Mode(mode)
    if existing is not None:
        existing = np.asarray(existing, bool)
    if prompts.empty:
        if existing is None:
            raise ValueError("decode_slice: no prompts and no existing mask (the slice's shape is unknown)")
        empty = np.zeros_like(existing)
        return SliceOutcome(empty.copy() if mode is Mode.REPLACE else existing.copy(), SliceMask(empty), 0, [])
    given = model_prompts(prompts, existing=existing, mode=mode)
    steps = sequence(given)
    key = _memo_key(decoder, k, mode) if memo is not None else None
    results = memo.reusable(key, steps) if memo is not None else []
    chained = len(given.boxes) <= 1
    calls = 0
    while len(results) < len(steps):
        previous = results[-1].logits if chained and results else None
        results.append(decode_step(decoder, k, steps[len(results)], previous))
        calls += 1
    if memo is not None:
        memo.store(key, steps, results)
    answer = results[-1]
    warnings = []
    if not answer.mask.any():
        warnings.append(f"slice {k} gave an empty mask{'' if given.boxes else CLICKS_ALONE_HINT}")
    return SliceOutcome(combine(answer.mask, existing, mode, prompts.clicks), answer, calls, warnings)


# ---------------------------------------------------------------------------------------------------------------------
# A segment through a volume
# ---------------------------------------------------------------------------------------------------------------------
def propagate_from_seeds(decoder: SliceDecoder, n_slices: int, seeds: dict[int, SliceMask], *, walk_below: bool = True,
                         walk_above: bool = True, params: PropagationParams = DEFAULT_PARAMS) -> dict[int, np.ndarray]:
    """Carry the seeds' masks ({k: SliceMask}) through the volume (propagate.propagate_masks) -> {k: HxW bool} of
    every slice reached, seeds included. walk_below / walk_above=False: no walk beyond the lowest / highest seed."""
    return propagate_masks(decoder, n_slices, seeds, params, walk_below=walk_below, walk_above=walk_above)


def segment_slices(decoder: SliceDecoder, seg: SegmentPrompts, n_slices: int, slice_shape: tuple[int, int], *,
                   existing: np.ndarray | None = None, mode: Mode | str = Mode.REPLACE,
                   params: PropagationParams = DEFAULT_PARAMS) -> tuple[dict[int, np.ndarray], list[str]]:
    """One segment's prompts (samunet_core.prompts.SegmentPrompts) through a volume, by rules 1-4.

    existing: S x H x W bool displayed slices the segment holds now, or None. Returns ({k: HxW bool} for every slice
    with a result: the prompted slices (every slice inside a 3D box) plus, with propagation, the slices reached;
    warnings naming the segment).
    """
    mode = Mode(mode)
    if existing is not None:
        existing = np.asarray(existing, bool)
        if existing.shape != (n_slices, *slice_shape):
            raise ValueError(f"existing masks are {existing.shape}, the volume's slices {(n_slices, *slice_shape)}")
    warnings: list[str] = []
    outcomes: dict[int, SliceOutcome] = {}
    for k in seg.prompted_slices():
        outcome = decode_slice(decoder, k, seg.slice_prompts(k), existing=None if existing is None else existing[k],
                               mode=mode)
        warnings += [f"segment {seg.name!r}: {w}" for w in outcome.warnings]
        outcomes[k] = outcome
    masks = {k: o.mask for k, o in outcomes.items()}
    if not seg.propagate or n_slices <= 1 or not outcomes:
        return masks, warnings
    inside_3d_box = {s for b in seg.boxes if b.is_3d for s in range(b.s0, b.s1 + 1)}
    carried = propagate_from_seeds(decoder, n_slices, {k: o.model for k, o in outcomes.items()},
                                   walk_below=min(outcomes) not in inside_3d_box,
                                   walk_above=max(outcomes) not in inside_3d_box, params=params)
    for k, mask in carried.items():
        if k not in masks:
            masks[k] = combine(mask, None if existing is None else existing[k], mode)
    return masks, warnings


__all__ = ["Mode", "Click", "SlicePrompts", "SliceOutcome", "SliceMask", "ClickMemo", "EDIT_BOX_MARGIN",
           "decode_step", "decode_slice", "model_prompts", "sequence", "combine", "segment_slices",
           "propagate_from_seeds"]
