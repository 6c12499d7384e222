"""THE prompt policy: prompts on one displayed slice (+ an existing mask and a mode) -> model calls -> mask.

Every front end reaches the model through this module: `samunet segment` / `--edit` / `samunet batch`
(`segment_slices`, a replay on a `SegmentState`), every `samunet eval` protocol (`decode_slice`, `decode_step`,
`propagate_from_seeds`; `interactive3d`: a `SegmentState`) and the Slicer controller (a `SegmentState` per axis, run
on a VolumeSession's worker through `VolumeSession.run`), so what eval measures is what a user gets. The model is
reached through a `propagate.SliceDecoder`: anything with `predict(k, **prompts) -> Prediction`, prompts = points /
labels / boxes / mask_input as `Predictor.predict` takes them.

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
4. Prompted slices. A slice the user prompted (a box drawn there, a click there) keeps its own outcome by rules 1-3;
   a walk never overwrites it. A 3D box is drawn on its central slice (s0 + s1) // 2.
5. Memo. A `ClickMemo` only skips recomputing the prefix of the sequence already decoded for the same slice,
   embedding (model and image) and mode: results are identical with and without it, and adding one click to a
   slice costs one model call.

One segment's 3D result is a function of its prompts in order (`SegmentState`; `segment_slices` replays a prompt
file's boxes, then its clicks, each in file order), whichever front end gives them:

6. Walks. After a slice's prompts change, the walk runs on from it in both directions: each next slice is decoded
   from the box of the mask before it (`propagate.chained_box`), clipped to the 3D box it lies in. It stops at a
   prompted slice, where walks may not go (rule 8), at the first slice whose new mask agrees with what it held
   (IoU >= CARRY_AGREEMENT_IOU), or where `propagate`'s stopping rule ends it; then every carried slice beyond is
   dropped (it was reached through this one). Towards another prompted slice a walk only fills slices that hold
   nothing, at most halfway (ties to the lower slice): the slices there were carried from that prompted slice, and a
   correction far from it is a worse source than it (measured: re-walking them lost 0.1-0.4 Dice on a gallbladder).
   A correction's clicks go with it: each slice it reaches that makes the same mistake at a click's pixel (misses a
   positive click's, covers a negative click's) is decoded with the box and those clicks, in either direction.
   Between two prompted slices and inside a 3D box the user has said the structure goes on, so the stopping rule is
   off there and a lost mask carries the last box found (inside a 3D box with none found yet: the 3D box).
7. A click refines, never replaces. A click on a slice the walk reached is decoded with the box the walk gave that
   slice (rule 1 with that box: the walk's answer, then the clicks with the logits fed back). On a walkable slice the
   walk did not reach, a positive click gets the nearest result's chained box (none yet: the 3D box around it). The
   box is grown to take in positive clicks outside it. So a positive click adds what was missed, a negative one
   removes what was added, and the rest of the slice stays.
8. Where walks go. Inside every 3D box (a 3D box is walked from its drawn slice, not projected: each slice's box is
   the carried box clipped to the 3D box); with "propagate" and no 3D box, anywhere. A segment without "propagate"
   and without 3D boxes has independent slices, decoded by rules 1-3 alone.
9. Carried slices are combined with `existing` by the mode (rule 3, without clicks).
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
    _accept,
    chained_box,
    grow_box,
    mask_box,
    params_for_spacing,
    predict_box,
    propagate_masks,
)

if TYPE_CHECKING:
    from samunet_core.prompts import SegmentPrompts

EDIT_BOX_MARGIN = 3.0  # model-grid pixels around the existing mask and the positive clicks (rule 2)
CARRY_CLICKS = True  # a correction's clicks go with it to the neighbours that make the same mistake there (rule 6)
CARRY_AGREEMENT_IOU = 0.9  # a carried correction stops at the first slice whose new mask agrees this well (rule 6)
FRAGMENT_RATIO = 0.1  # pieces under this x the largest do not shape the next slice's box (measured on the demo CT)
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
                         walk_above: bool = True, params: PropagationParams = DEFAULT_PARAMS,
                         slice_spacing_mm: float | None = None) -> dict[int, np.ndarray]:
    """Carry the seeds' masks ({k: SliceMask}) through the volume (propagate.propagate_masks) -> {k: HxW bool} of
    every slice reached, seeds included. walk_below / walk_above=False: no walk beyond the lowest / highest seed;
    slice_spacing_mm: as for SegmentState."""
    return propagate_masks(decoder, n_slices, seeds, params_for_spacing(slice_spacing_mm, params),
                           walk_below=walk_below, walk_above=walk_above)


class SegmentState:
    """The 3D result of one segment's prompts on one axis, built prompt by prompt (rules 4 and 6-9 of the module doc).

    `add_box` / `add_click` apply one prompt and return the slices whose mask changed; `masks()` is the result. A
    replay of the same prompts in the same order on a fresh state gives the same result (`segment_slices` is that
    replay), so a front end that applies prompts one at a time agrees with `samunet segment` on the prompt file.
    Each call is atomic: if the model fails part way, the state is as it was before the call.

    existing: S x H x W bool, what the segment holds now (None: nothing); mode: how results combine with it (rule 3).
    slice_spacing_mm: mm between neighbouring slices of this axis: the walk's stopping rule is set for it
    (`propagate.params_for_spacing`); None keeps `params` as given.
    """

    def __init__(self, decoder: SliceDecoder, n_slices: int, slice_shape: tuple[int, int], *, propagate: bool = False,
                 existing: np.ndarray | None = None, mode: Mode | str = Mode.REPLACE,
                 params: PropagationParams = DEFAULT_PARAMS, slice_spacing_mm: float | None = None,
                 name: str = "") -> None:
        self.decoder, self.n_slices, self.slice_shape = decoder, int(n_slices), tuple(slice_shape)
        self.propagate, self.mode, self.name = bool(propagate), Mode(mode), name
        self.params = params_for_spacing(slice_spacing_mm, params)
        if existing is not None:
            existing = np.asarray(existing, bool)
            if existing.shape != (self.n_slices, *self.slice_shape):
                raise ValueError(f"existing masks are {existing.shape}, the volume's slices "
                                 f"{(self.n_slices, *self.slice_shape)}")
        self.existing = existing
        self.user: dict[int, SlicePrompts] = {}  # the user's prompts per slice (a 3D box: on its drawn slice)
        self.prior: dict[int, tuple[float, float, float, float]] = {}  # a clicked slice's box when the user drew none
        self.results: dict[int, SliceMask] = {}  # every slice with a result: the model's mask, logits, score
        self.carried_box: dict[int, np.ndarray] = {}  # the box each carried slice was decoded with
        self.boxes_3d: list[tuple[int, int, np.ndarray]] = []  # (s0, s1, (x0, y0, x1, y1)) of each 3D box
        self.warnings: list[str] = []
        self._memos: dict[int, ClickMemo] = {}

    # -- what the segment holds ----------------------------------------------------------------------------------
    def masks(self) -> dict[int, np.ndarray]:
        """{k: HxW bool} of every slice with a result, combined with `existing` by the mode (rule 3)."""
        out = {}
        for k, result in self.results.items():
            if k in self.user:
                out[k] = result.mask  # a prompted slice's outcome is already combined (decode_slice)
            else:
                out[k] = combine(result.mask, None if self.existing is None else self.existing[k], self.mode)
        return out

    def volume(self) -> np.ndarray:
        """S x H x W bool: the segment after these prompts (slices without a result: `existing`, else empty)."""
        out = (np.zeros((self.n_slices, *self.slice_shape), bool) if self.existing is None or self.mode is Mode.REPLACE
               else self.existing.copy())
        for k, mask in self.masks().items():
            out[k] = mask
        return out

    # -- prompts -------------------------------------------------------------------------------------------------
    def add_box(self, box: Any) -> list[int]:
        """One box (samunet_core.prompts.SliceBox; s0 < s1: a 3D box) -> sorted slices whose mask changed."""
        self._check_slice(box.s0, "box")
        self._check_slice(box.s1, "box")
        if box.s1 < box.s0:
            raise ValueError(f"a 3D box's slices must be s0 <= s1, got {box.s0}..{box.s1}")
        drawn = (box.s0 + box.s1) // 2 if box.is_3d else box.s0
        return self._apply(drawn, lambda p: SlicePrompts((*p.boxes, box.xyxy), p.clicks),
                           new_3d=(box.s0, box.s1, np.asarray(box.xyxy, np.float64)) if box.is_3d else None)

    def add_click(self, point: Any) -> list[int]:
        """One click (samunet_core.prompts.SlicePoint) -> sorted slices whose mask changed."""
        self._check_slice(point.s, "click")
        return self._apply(point.s, lambda p: p.with_click(Click(point.x, point.y, point.positive)))

    # -- the rules -----------------------------------------------------------------------------------------------
    def _apply(self, k: int, edit: Any, new_3d: tuple[int, int, np.ndarray] | None = None) -> list[int]:
        before = self.masks()
        saved = (dict(self.user), dict(self.prior), dict(self.results), dict(self.carried_box), list(self.boxes_3d),
                 list(self.warnings))
        try:
            if new_3d is not None:
                self.boxes_3d.append(new_3d)
            prompts = edit(self.user.get(k, SlicePrompts()))
            if not prompts.boxes and k not in self.user:
                prior = self._prior_box(k, prompts)
                if prior is not None:
                    self.prior[k] = prior
            self.user[k] = prompts
            self._decode_prompted(k)
            self._carry(k)
        except BaseException:
            (self.user, self.prior, self.results, self.carried_box, self.boxes_3d, self.warnings) = saved
            raise
        after = self.masks()
        return sorted(s for s in set(before) | set(after)
                      if s not in before or s not in after or not np.array_equal(before[s], after[s]))

    def _prior_box(self, k: int, prompts: SlicePrompts) -> tuple[float, float, float, float] | None:
        """Rule 7: the box a click on slice k is decoded with when the user drew none there: the box the walk gave the
        slice; on a walkable slice the walk did not reach, the nearest result's chained box, else the 3D box around
        it. Either is grown to take in positive clicks outside it. None: the slice's own prompts decide (rules 1-2)."""
        positive = prompts.points()[prompts.labels() == 1]
        if k in self.carried_box:
            box = np.asarray(self.carried_box[k], np.float64)
        else:
            if not len(positive) or not self._walkable(k):
                return None
            if self.mode is not Mode.REPLACE and self.existing is not None and self.existing[k].any():
                return None  # rule 2 boxes the existing mask and the clicks
            filled = [s for s, r in self.results.items() if r.mask.any()]
            if filled:
                nearest = min(filled, key=lambda s: (abs(s - k), s))
                box = chained_box(self.results[nearest].mask, self.params.box_margin)
            elif self._in_3d_box(k):
                box = self._clip(k, np.array([0.0, 0.0, self.slice_shape[1] - 1.0, self.slice_shape[0] - 1.0]))
            else:
                return None
        outside = [p for p in positive if not (box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3])]
        if outside:
            xy = np.concatenate([box.reshape(2, 2), np.asarray(outside)])
            box = self._clip(k, grow_box(np.array([*xy.min(axis=0), *xy.max(axis=0)]), EDIT_BOX_MARGIN,
                                         self.slice_shape))
        return tuple(float(v) for v in box)

    def _in_3d_box(self, k: int) -> bool:
        return any(s0 <= k <= s1 for s0, s1, _ in self.boxes_3d)

    def _decode_prompted(self, k: int) -> None:
        prompts = self.user[k]
        refined = not prompts.boxes and k in self.prior
        if refined:
            prompts = SlicePrompts((self.prior[k],), prompts.clicks)
        existing = None if self.existing is None else self.existing[k]
        if prompts.empty:
            return
        outcome = decode_slice(self.decoder, k, prompts, existing=existing, mode=self.mode,
                               memo=self._memos.setdefault(k, ClickMemo()))
        self.warnings += [f"segment {self.name!r}: {w}" if self.name else w for w in outcome.warnings]
        self.results[k] = SliceMask(outcome.mask, outcome.model.logits, outcome.model.score)
        self.carried_box.pop(k, None)

    def _walkable(self, k: int) -> bool:
        """Rule 8: a walk may reach slice k inside a 3D box, or anywhere in a propagated segment without 3D boxes."""
        return self._in_3d_box(k) or (self.propagate and not self.boxes_3d)

    def _clip(self, k: int, box: np.ndarray) -> np.ndarray:
        """A box clipped to the 3D boxes covering slice k (their union); unchanged outside every 3D box."""
        covering = [b for s0, s1, b in self.boxes_3d if s0 <= k <= s1]
        if not covering:
            return np.asarray(box, np.float64)
        limit = np.array([min(b[0] for b in covering), min(b[1] for b in covering), max(b[2] for b in covering),
                          max(b[3] for b in covering)])
        x0, y0 = max(box[0], limit[0]), max(box[1], limit[1])
        x1, y1 = min(box[2], limit[2]), min(box[3], limit[3])
        if x1 < x0 or y1 < y0:
            return limit
        return np.array([x0, y0, x1, y1])

    def _bounded(self, k: int, step: int) -> bool:
        """True when the user has said the structure continues past slice k in direction `step`: a prompted slice
        lies beyond it, or k is inside a 3D box (the stopping rule is then off, rule 8)."""
        if self._in_3d_box(k):
            return True
        return any((p - k) * step > 0 and self.results.get(p, SliceMask(np.zeros(1, bool))).mask.any()
                   for p in self.user)

    def _carry(self, k0: int) -> None:
        """Rule 6: walk on from slice k0 in both directions, each slice prompted with the chained box of the one
        before (clipped to the 3D box), until the new mask agrees with what the slice held, a prompted slice is met,
        the walk leaves the walkable slices, or the stopping rule ends it (then what the walk held beyond is dropped).
        """
        seed = self.results.get(k0)
        if seed is None:
            return
        for step in (-1, +1):
            prev = last = seed
            k, end = k0 + step, self._reach(k0, step)
            inward = end != (self.n_slices - 1 if step > 0 else 0)  # a prompted slice lies that way
            clicks = self.user[k0].clicks if CARRY_CLICKS and k0 in self.user else ()
            while (k <= end if step > 0 else k >= end) and k not in self.user and self._walkable(k):
                old = self.results.get(k)
                clicks = tuple(c for c in clicks if _same_mistake(old, c))  # the clicks' zone ends where ...
                if inward and not clicks and old is not None and old.mask.any():
                    break  # towards a prompted slice a correction only fills slices that hold nothing
                bounded = self._bounded(k, step)
                source = prev if prev.mask.sum() >= self.params.min_pixels else last
                if source.mask.sum() >= self.params.min_pixels:
                    box = self._clip(k, chained_box(without_fragments(source.mask), self.params.box_margin))
                elif self._in_3d_box(k):  # nothing found yet inside a 3D box: the 3D box itself
                    box = self._clip(k, np.array([0.0, 0.0, self.slice_shape[1] - 1.0, self.slice_shape[0] - 1.0]))
                else:
                    if not bounded:
                        self._drop_from(k, step)  # the structure ends before k: nothing carried lies beyond
                    break
                if clicks:  # ... the slice no longer makes the mistake the clicks fixed
                    outcome = decode_slice(self.decoder, k, SlicePrompts((tuple(float(v) for v in box),), clicks))
                    new = SliceMask(outcome.mask, outcome.model.logits, outcome.model.score)
                else:
                    mask_input = source.logits if self.params.use_logits else None
                    new = predict_box(self.decoder, k, box, mask_input)
                if not bounded and not _accept(new, prev, self.params, seed.score):
                    self._drop_from(k, step)
                    break
                self.results[k], self.carried_box[k] = new, box
                self._memos.pop(k, None)
                if old is not None and _agreement(old.mask, new.mask) >= CARRY_AGREEMENT_IOU:
                    break
                prev = new
                if new.mask.sum() >= self.params.min_pixels:
                    last = new
                k += step

    def _reach(self, k0: int, step: int) -> int:
        """The last slice a walk from k0 in direction `step` may reach: the volume's end, or, with a prompted slice
        holding a mask that way, the last slice nearer to k0 than to it (ties go to the lower slice)."""
        ahead = [p for p in self.user if (p - k0) * step > 0 and p in self.results and self.results[p].mask.any()]
        if not ahead:
            return self.n_slices - 1 if step > 0 else 0
        p = min(ahead, key=lambda p: abs(p - k0))
        return (k0 + p) // 2 if step > 0 else (k0 + p) // 2 + 1

    def _drop_from(self, k: int, step: int) -> None:
        while 0 <= k < self.n_slices and k not in self.user:
            self.results.pop(k, None)
            self.carried_box.pop(k, None)
            k += step

    def _check_slice(self, k: int, what: str) -> None:
        if not 0 <= int(k) < self.n_slices:
            raise ValueError(f"a {what} on slice {k}, but the volume has slices 0..{self.n_slices - 1} on this axis")


def without_fragments(mask: np.ndarray, keep_ratio: float = FRAGMENT_RATIO) -> np.ndarray:
    """HxW bool without the 8-connected pieces smaller than `keep_ratio` x the largest piece: the next slice's box
    is made from what is left (a stray fragment would widen it, slice after slice)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= keep_ratio * sizes.max()) + 1
    return np.isin(labels, keep)


def _same_mistake(held: SliceMask | None, click: Click) -> bool:
    """True when a slice holding `held` makes there the mistake `click` corrects: it misses a positive click's pixel,
    or covers a negative click's."""
    if held is None:
        return click.positive
    h, w = held.mask.shape
    y, x = min(max(int(round(click.y)), 0), h - 1), min(max(int(round(click.x)), 0), w - 1)
    return bool(held.mask[y, x]) != click.positive


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two HxW masks (two empty masks agree: 1.0)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def segment_slices(decoder: SliceDecoder, seg: SegmentPrompts, n_slices: int, slice_shape: tuple[int, int], *,
                   existing: np.ndarray | None = None, mode: Mode | str = Mode.REPLACE,
                   params: PropagationParams = DEFAULT_PARAMS, slice_spacing_mm: float | None = None
                   ) -> tuple[dict[int, np.ndarray], list[str]]:
    """One segment's prompts (samunet_core.prompts.SegmentPrompts) through a volume: a replay on a fresh
    `SegmentState`, the boxes first, then the clicks, each in file order.

    existing: S x H x W bool displayed slices the segment holds now, or None. Returns ({k: HxW bool} for every slice
    with a result, warnings naming the segment).
    """
    state = replay(decoder, seg, n_slices, slice_shape, existing=existing, mode=mode, params=params,
                   slice_spacing_mm=slice_spacing_mm)
    return state.masks(), state.warnings


def replay(decoder: SliceDecoder, seg: SegmentPrompts, n_slices: int, slice_shape: tuple[int, int], *,
           existing: np.ndarray | None = None, mode: Mode | str = Mode.REPLACE,
           params: PropagationParams = DEFAULT_PARAMS, slice_spacing_mm: float | None = None) -> SegmentState:
    """A fresh SegmentState with `seg`'s prompts applied in the prompt file's order: boxes, then clicks."""
    state = SegmentState(decoder, n_slices, slice_shape, propagate=seg.propagate, existing=existing, mode=mode,
                         params=params, slice_spacing_mm=slice_spacing_mm, name=seg.name)
    for box in seg.boxes:
        state.add_box(box)
    for point in seg.points:
        state.add_click(point)
    return state


__all__ = ["Mode", "Click", "SlicePrompts", "SliceOutcome", "SliceMask", "ClickMemo", "EDIT_BOX_MARGIN",
           "decode_step", "decode_slice", "model_prompts", "sequence", "combine", "segment_slices",
           "propagate_from_seeds", "SegmentState", "replay", "CARRY_AGREEMENT_IOU"]
