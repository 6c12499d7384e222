"""One segment's 3D result as a function of its prompts (samunet_core.interaction.SegmentState, rules 4 and 6-9).

Each test pins one rule against the model called by hand (exact equality), on TotalSegmentator's example_ct_sm under
the soft-tissue window with the click model, so a policy that drifts (a 3D box projected again, a click decoded
alone, a correction that does not carry or carries past a prompted slice) fails here. Two rules about bookkeeping (a
walk that fails, a structure that ends) are pinned with a small geometric decoder whose answers are known exactly.
Embeddings go to the disk cache the other suites share.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from samunet_core import metrics
from samunet_core.interaction import (
    CARRY_AGREEMENT_IOU,
    Click,
    SegmentState,
    SlicePrompts,
    _same_mistake,
    decode_slice,
    replay,
    without_fragments,
)
from samunet_core.interaction import (
    _agreement as agreement,
)
from samunet_core.predictor import Prediction
from samunet_core.prompts import SegmentPrompts, SliceBox, SlicePoint
from samunet_core.propagate import DEFAULT_PARAMS, chained_box, predict_box

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator"
SOFT_TISSUE = (-160.0, 240.0)
SPLEEN = 1


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """(VolumeSession with the click model over the soft-tissue axial slices, K x H x W spleen reference)."""
    from samunet_core.cache import EmbeddingCache
    from samunet_core.io.volumes import read_volume
    from samunet_core.predictor import load_predictor
    from samunet_core.segment import open_session

    volume = read_volume(DATA / "example_ct_sm.nii.gz")
    labels = volume.frame("axial").volume_to_slices(read_volume(DATA / "example_seg.nii.gz").array)
    cache = EmbeddingCache(disk_dir=tmp_path_factory.getbasetemp() / "samunet_cache" / "embeddings")
    session, _, _ = open_session(volume, load_predictor("litemedsam_clicks", device="cpu"), "axial",
                                 window=SOFT_TISSUE, cache=cache)
    yield session, labels == SPLEEN
    session.close()


class Recording:
    """A SliceDecoder that records (slice, box or None) of every model call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[int, tuple | None]] = []

    def predict(self, k, **prompts):
        boxes = prompts.get("boxes")
        self.calls.append((k, None if boxes is None else tuple(np.asarray(boxes, float).reshape(-1, 4)[0])))
        return self.inner.predict(k, **prompts)


def largest(ref: np.ndarray) -> int:
    return int(np.argmax(ref.reshape(ref.shape[0], -1).sum(1)))


def box2d(ref: np.ndarray, k: int) -> SliceBox:
    x0, y0, x1, y1 = metrics.tight_box(metrics.largest_component(ref[k]))
    return SliceBox(k, k, x0, y0, x1, y1)


def missed_point(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(x, y) of the deepest pixel of what `pred` missed of `ref` on one slice."""
    return metrics.interior_point(metrics.largest_component(ref & ~pred))


# ----- rule 8: a 3D box is walked, not projected ---------------------------------------------------------------------
def test_a_3d_box_is_walked_from_its_drawn_slice_and_clipped_to_the_box(ct):
    session, spleen = ct
    slices = np.flatnonzero(spleen.any(axis=(1, 2)))
    s0, s1 = int(slices[0]), int(slices[-1])
    x0, y0, x1, y1 = metrics.tight_box(spleen.any(axis=0))
    decoder = Recording(session)
    state = SegmentState(decoder, *spleen.shape[:1], spleen.shape[1:])
    state.add_box(SliceBox(s0, s1, x0, y0, x1, y1))
    drawn = (s0 + s1) // 2
    masks = state.masks()
    assert sorted(masks) == list(range(s0, s1 + 1)), "every slice of the 3D box, nothing beyond"
    assert [k for k, _ in decoder.calls] == [drawn, *range(drawn - 1, s0 - 1, -1), *range(drawn + 1, s1 + 1)]
    assert decoder.calls[0][1] == (x0, y0, x1, y1), "the drawn slice gets the box the user drew"
    for k, box in decoder.calls[1:]:
        before = k + 1 if k < drawn else k - 1
        expected = np.array(chained_box(without_fragments(masks[before]), DEFAULT_PARAMS.box_margin))
        expected = np.array([max(expected[0], x0), max(expected[1], y0), min(expected[2], x1), min(expected[3], y1)])
        assert np.allclose(box, expected), f"slice {k}: the chained box of slice {before} clipped to the 3D box"
    boxes = dict(decoder.calls[1:])
    assert np.array_equal(masks[drawn + 1], predict_box(session, drawn + 1, boxes[drawn + 1]).mask)
    projected = np.zeros_like(spleen)
    for k in range(s0, s1 + 1):
        projected[k] = predict_box(session, k, (x0, y0, x1, y1)).mask
    walked = state.volume()
    # measured with litemedsam_clicks: walked 0.881, projected 0.879 on this 30-slice crop (the issue's MR spleen: 0.41
    # projected); the walk must at least not lose to the projection
    assert metrics.dice(walked, spleen) >= metrics.dice(projected, spleen)


# ----- rule 7: a click refines the walk's answer ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def walked(ct):
    """(a propagated segment's state after its box, the box's slice, a carried slice 2 away)."""
    session, spleen = ct
    k0 = largest(spleen)
    state = SegmentState(session, spleen.shape[0], spleen.shape[1:], propagate=True)
    state.add_box(box2d(spleen, k0))
    assert {k0 - 2, k0 + 2} <= set(state.masks()), "the walk reached two slices either side"
    return state, k0, k0 + 2


def copy_of(state: SegmentState) -> SegmentState:
    """A replay of `state`'s prompts: the same result by rule (checked in test_replay_equals_one_at_a_time)."""
    clone = SegmentState(state.decoder, state.n_slices, state.slice_shape, propagate=state.propagate)
    clone.user, clone.prior, clone.results = dict(state.user), dict(state.prior), dict(state.results)
    clone.carried_box, clone.boxes_3d = dict(state.carried_box), list(state.boxes_3d)
    return clone


def test_a_click_on_a_carried_slice_is_decoded_with_the_walks_box(ct, walked):
    session, spleen = ct
    base, k0, k = walked
    state = copy_of(base)
    carried_box = tuple(state.carried_box[k])
    inside = np.zeros_like(spleen[k])
    x0, y0, x1, y1 = (int(round(v)) for v in carried_box)
    inside[y0:y1 + 1, x0:x1 + 1] = True
    missed = spleen[k] & ~state.masks()[k] & inside
    x, y = missed_point(state.masks()[k], missed) if missed.any() else metrics.interior_point(spleen[k] & inside)
    state.add_click(SlicePoint(k, x, y, True))
    expected = decode_slice(session, k, SlicePrompts((carried_box,), (Click(x, y, True),))).mask
    assert np.array_equal(state.masks()[k], expected), "the walk's box, then the click with its logits"
    alone = decode_slice(session, k, SlicePrompts(clicks=(Click(x, y, True),))).mask
    assert not np.array_equal(expected, alone), "(the test can tell a refined click from a click alone)"
    assert state.prior[k] == carried_box and k in state.user


# ----- rule 6: a correction carries until it agrees ------------------------------------------------------------------
def test_a_correction_carries_beyond_the_clicked_slice_and_stops_at_prompted_slices(ct, walked):
    session, spleen = ct
    base, k0, k = walked
    state = copy_of(base)
    state.decoder = decoder = Recording(session)
    before = state.masks()
    x, y = metrics.interior_point(metrics.largest_component(before[k]))
    changed = state.add_click(SlicePoint(k, x, y, False))  # a negative click in the middle: a big change
    after = state.masks()
    assert k in changed and not np.array_equal(after[k], before[k])
    walked_to = [s for s, _ in decoder.calls if s != k]
    assert k0 not in walked_to and np.array_equal(after[k0], before[k0]), "the box's slice keeps its own mask"
    up = sorted({s for s in walked_to if s > k})  # a slice in the click's zone takes two calls (box, box + click)
    assert up and up == list(range(k + 1, up[-1] + 1)), "the walk runs on upward from the click"
    for s in up:
        if s in after:  # each slice from the chained box of the one below, the corrected slice first
            box = chained_box(without_fragments(after[s - 1]), 3.0)
            if not _same_mistake(base.results.get(s), Click(x, y, False)):  # outside the click's zone: the box alone
                assert np.array_equal(after[s], predict_box(session, s, box).mask), s
    last = up[-1]
    ended = (last not in after  # the stopping rule ended it: it and every slice beyond were dropped
             or last == spleen.shape[0] - 1
             or agreement(after[last], before.get(last, np.zeros_like(after[last]))) >= CARRY_AGREEMENT_IOU)
    assert ended and all(s not in after for s in range(last + 1, spleen.shape[0]) if last not in after)
    assert all(s > k0 for s in walked_to), "never past the prompted box slice"


def test_replay_equals_prompts_applied_one_at_a_time(ct):
    session, spleen = ct
    k0 = largest(spleen)
    seg = SegmentPrompts("spleen", boxes=[box2d(spleen, k0)], propagate=True)
    state = SegmentState(session, spleen.shape[0], spleen.shape[1:], propagate=True)
    state.add_box(seg.boxes[0])
    for k in (k0 + 3, k0 - 2, k0 + 3):
        pred = state.volume()[k]
        error = spleen[k] ^ pred
        x, y = metrics.interior_point(metrics.largest_component(error))
        point = SlicePoint(k, x, y, bool(spleen[k][y, x]))
        seg.points.append(point)
        state.add_click(point)
    replayed = replay(session, seg, spleen.shape[0], spleen.shape[1:])
    assert sorted(replayed.masks()) == sorted(state.masks())
    for k, mask in state.masks().items():
        assert np.array_equal(replayed.masks()[k], mask), k


def test_without_propagation_slices_stay_independent(ct):
    """A segment with neither "propagate" nor a 3D box: a click on another slice is decoded alone, nothing carries."""
    session, spleen = ct
    k0 = largest(spleen)
    decoder = Recording(session)
    state = SegmentState(decoder, spleen.shape[0], spleen.shape[1:])
    state.add_box(box2d(spleen, k0))
    x, y = metrics.interior_point(spleen[k0 + 1])
    state.add_click(SlicePoint(k0 + 1, x, y))
    assert sorted(state.masks()) == [k0, k0 + 1]
    assert decoder.calls == [(k0, decoder.calls[0][1]), (k0 + 1, None)], "the click alone, no derived box, no walk"
    alone = decode_slice(session, k0 + 1, SlicePrompts(clicks=(Click(x, y),))).mask
    assert np.array_equal(state.masks()[k0 + 1], alone)


# ----- bookkeeping, with a decoder whose answers are known ------------------------------------------------------------
class Cylinder:
    """A geometric stand-in for the model: a 12-slice volume holding a disc of radius 6 on slices 2..11; the answer to a
    box is the disc inside the box, or nothing when a negative click lies on the disc."""

    def __init__(self, fail_after: int | None = None) -> None:
        yy, xx = np.mgrid[:32, :32]
        disc = (yy - 16) ** 2 + (xx - 16) ** 2 <= 36
        self.truth = np.zeros((12, 32, 32), bool)
        self.truth[2:12] = disc
        self.calls = 0
        self.fail_after = fail_after

    def predict(self, k, boxes=None, points=None, labels=None, mask_input=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("the model failed")
        mask = np.zeros((32, 32), bool)
        if boxes is not None:
            x0, y0, x1, y1 = np.asarray(boxes, float).reshape(-1, 4)[0]
            mask[int(np.ceil(y0)):int(y1) + 1, int(np.ceil(x0)):int(x1) + 1] = True
            mask &= self.truth[k]
        for (x, y), label in zip(np.asarray(points if points is not None else []).reshape(-1, 2),
                                 labels if labels is not None else [], strict=True):
            if label == 0 and self.truth[k][int(y), int(x)]:
                mask[:] = False
        return Prediction(mask[None], np.zeros((1, 1, 256, 256), np.float32), np.array([0.9]))


def test_a_negative_click_that_ends_the_structure_drops_what_was_carried_beyond():
    model = Cylinder()
    state = SegmentState(model, 12, (32, 32), propagate=True)
    state.add_box(SliceBox(5, 5, 8, 8, 24, 24))
    assert sorted(k for k, m in state.masks().items() if m.any()) == list(range(2, 12)), "the walk ran on to 11"
    changed = state.add_click(SlicePoint(10, 16, 16, False))
    assert changed == [10, 11]
    assert sorted(k for k, m in state.masks().items() if m.any()) == list(range(2, 10))


def test_a_prompt_whose_walk_fails_leaves_the_segment_as_it_was():
    model = Cylinder()
    state = SegmentState(model, 12, (32, 32), propagate=True)
    state.add_box(SliceBox(5, 5, 8, 8, 24, 24))
    before = {k: m.copy() for k, m in state.masks().items()}
    model.fail_after = model.calls + 2  # the click's slice (box, then box + click), then its first walk step fails
    with pytest.raises(RuntimeError, match="the model failed"):
        state.add_click(SlicePoint(9, 16, 16, True))
    assert sorted(state.masks()) == sorted(before) and 9 not in state.user
    for k, mask in before.items():
        assert np.array_equal(state.masks()[k], mask)


def test_a_prompt_outside_the_volume_is_refused():
    state = SegmentState(Cylinder(), 12, (32, 32), propagate=True)
    with pytest.raises(ValueError, match="slice 12, but the volume has slices 0..11"):
        state.add_click(SlicePoint(12, 3, 3))
    with pytest.raises(ValueError, match="slice -1"):
        state.add_box(SliceBox(-1, 4, 1, 1, 5, 5))
