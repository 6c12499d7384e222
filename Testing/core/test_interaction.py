"""The prompt policy (samunet_core.interaction) on real CT slices with the real weights.

Each test pins one rule of the module doc against the model called by hand (exact equality), so a front end that
drifts from the policy, or a policy that drifts from `samunet eval`, fails here. The CT is TotalSegmentator's
example_ct_sm under the soft-tissue window; embeddings go to the disk cache the other suites share, so only a few
slices around the spleen's largest slice are ever encoded.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from samunet_core import metrics
from samunet_core.errors import InputError
from samunet_core.interaction import (
    CLICKS_ALONE_HINT,
    EDIT_BOX_MARGIN,
    Click,
    ClickMemo,
    Mode,
    SlicePrompts,
    combine,
    decode_slice,
    decode_step,
    segment_slices,
    without_fragments,
)
from samunet_core.propagate import DEFAULT_PARAMS, chained_box, grow_box, mask_box

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator"
SOFT_TISSUE = (-160.0, 240.0)
SPLEEN, LIVER = 1, 5


@pytest.fixture(scope="module")
def clicks_model():
    from samunet_core.predictor import load_predictor

    return load_predictor("litemedsam_clicks", device="cpu")


@pytest.fixture(scope="module")
def ct(clicks_model, tmp_path_factory):
    """(VolumeSession with the click model over the soft-tissue axial slices, K x H x W labels, spleen's slice k0)."""
    from samunet_core.cache import EmbeddingCache
    from samunet_core.io.volumes import read_volume
    from samunet_core.segment import open_session

    volume = read_volume(DATA / "example_ct_sm.nii.gz")
    labels = volume.frame("axial").volume_to_slices(read_volume(DATA / "example_seg.nii.gz").array)
    cache = EmbeddingCache(disk_dir=tmp_path_factory.getbasetemp() / "samunet_cache" / "embeddings")
    session, _, _ = open_session(volume, clicks_model, "axial", window=SOFT_TISSUE, cache=cache)
    spleen = labels == SPLEEN
    k0 = int(np.argmax(spleen.reshape(spleen.shape[0], -1).sum(1)))
    yield session, labels, k0
    session.close()


class Counting:
    """A SliceDecoder that records (slice, prompt names) of every model call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[int, tuple[str, ...]]] = []

    def predict(self, k, **prompts):
        self.calls.append((k, tuple(sorted(prompts))))
        return self.inner.predict(k, **prompts)


def spleen_prompts(labels, k):
    """(tight box of the spleen on slice k, a positive click at its deepest pixel, a negative click off the organ)."""
    ref = metrics.largest_component(labels[k] == SPLEEN)
    box = metrics.tight_box(ref)
    x, y = metrics.interior_point(ref)
    return box, Click(x, y, True), Click(box[0] + 2, box[1] + 2, False)


# ----- rule 1: the sequence ------------------------------------------------------------------------------------------
def test_second_click_gets_the_first_clicks_logits(ct, clicks_model):
    session, labels, k = ct
    ref = labels[k] == SPLEEN
    emb = session.embedding(k)
    _, first, _ = spleen_prompts(labels, k)
    p1 = clicks_model.predict(emb, points=[[first.x, first.y]], labels=[1])
    nxt = metrics.next_click(p1.masks[0], ref)
    second = Click(nxt.x, nxt.y, nxt.positive)
    pts = [[first.x, first.y], [second.x, second.y]]
    lab = [1, int(second.positive)]
    p2 = clicks_model.predict(emb, points=pts, labels=lab, mask_input=p1.logits)
    without_feedback = clicks_model.predict(emb, points=pts, labels=lab)
    assert not np.array_equal(without_feedback.logits, p2.logits), "the feedback must matter for this test to mean it"

    out = decode_slice(session, k, SlicePrompts(clicks=(first, second)))
    assert out.calls == 2
    assert np.array_equal(out.model.logits, p2.logits) and out.model.score == float(p2.scores[0])
    assert np.array_equal(out.mask, p2.masks[0])
    step = decode_step(session, k, SlicePrompts(clicks=(first, second)), p1.logits)
    assert np.array_equal(step.logits, p2.logits)


def test_box_then_clicks_is_the_by_hand_sequence(ct, clicks_model):
    session, labels, k = ct
    emb = session.embedding(k)
    box, pos, neg = spleen_prompts(labels, k)
    boxes = np.asarray([box], np.float64)
    p0 = clicks_model.predict(emb, boxes=boxes)
    p1 = clicks_model.predict(emb, boxes=boxes, points=[[pos.x, pos.y]], labels=[1], mask_input=p0.logits)
    p2 = clicks_model.predict(emb, boxes=boxes, points=[[pos.x, pos.y], [neg.x, neg.y]], labels=[1, 0],
                              mask_input=p1.logits)
    decoder = Counting(session)
    out = decode_slice(decoder, k, SlicePrompts((box,), (pos, neg)))
    assert out.calls == 3 and [names for _, names in decoder.calls] == [
        ("boxes",), ("boxes", "labels", "mask_input", "points"), ("boxes", "labels", "mask_input", "points")]
    assert np.array_equal(out.model.logits, p2.logits) and np.array_equal(out.mask, p2.masks[0])


def test_two_boxes_are_decoded_together_and_united(ct, clicks_model):
    session, labels, k = ct
    emb = session.embedding(k)
    spleen_box, pos, _ = spleen_prompts(labels, k)
    liver_box = metrics.tight_box(metrics.largest_component(labels[k] == LIVER))
    by_hand = clicks_model.predict(emb, boxes=np.asarray([spleen_box, liver_box], np.float64),
                                   points=[[pos.x, pos.y]], labels=[1])
    best = int(np.argmax(by_hand.masks.reshape(2, -1).sum(1)))
    decoder = Counting(session)
    out = decode_slice(decoder, k, SlicePrompts((spleen_box, liver_box), (pos,)))
    assert out.calls == 1 and "mask_input" not in decoder.calls[0][1]
    assert np.array_equal(out.mask, by_hand.masks.any(axis=0))
    assert np.array_equal(out.model.logits, by_hand.logits[best:best + 1])
    assert out.model.score == float(by_hand.scores[best])


def test_clicks_alone_with_the_base_model_warn(ct, litemedsam):
    from samunet_core.propagate import EmbeddingDecoder

    session, labels, k = ct
    _, pos, _ = spleen_prompts(labels, k)
    base = EmbeddingDecoder(litemedsam, session.embedding)  # the click model shares the base encoder
    out = decode_slice(base, k, SlicePrompts(clicks=(pos,)))
    assert not out.model.mask.any()
    assert out.warnings == [f"slice {k} gave an empty mask{CLICKS_ALONE_HINT}"]


# ----- rule 5: the memo ----------------------------------------------------------------------------------------------
def test_memo_gives_identical_masks_with_fewer_calls(ct):
    session, labels, k = ct
    box, pos, neg = spleen_prompts(labels, k)
    memo = ClickMemo()
    prompts = SlicePrompts((box,))
    existing = labels[k] == LIVER
    for n, click in enumerate((None, pos, neg)):
        if click is not None:
            prompts = prompts.with_click(click)
        cold = decode_slice(session, k, prompts, existing=existing, mode=Mode.ADD)
        warm = decode_slice(session, k, prompts, existing=existing, mode=Mode.ADD, memo=memo)
        assert cold.calls == n + 1 and warm.calls == 1, "one more click costs one model call"
        assert np.array_equal(warm.mask, cold.mask) and np.array_equal(warm.model.logits, cold.model.logits)
    undo = SlicePrompts((box,), (pos,))
    assert decode_slice(session, k, undo, existing=existing, mode=Mode.ADD, memo=memo).calls == 0
    # another mode or slice is not the same sequence
    assert decode_slice(session, k, undo, existing=existing, mode=Mode.REMOVE, memo=memo).calls == 2
    assert decode_slice(session, k + 1, undo, mode=Mode.REMOVE, memo=memo).calls == 2


# ----- rules 2 and 3: correction and combination ---------------------------------------------------------------------
def test_add_without_a_box_decodes_the_box_around_existing_and_clicks(ct, clicks_model):
    session, labels, k = ct
    emb = session.embedding(k)
    existing = metrics.largest_component(labels[k] == SPLEEN)
    box, _, _ = spleen_prompts(labels, k)
    click = Click(box[2] + 6, box[3] + 4, True)  # just outside the spleen: the box must grow to hold it
    xy = np.array([mask_box(existing)[:2], mask_box(existing)[2:], [click.x, click.y]])
    derived = grow_box(np.array([*xy.min(0), *xy.max(0)]), EDIT_BOX_MARGIN, existing.shape)
    p0 = clicks_model.predict(emb, boxes=derived[None])
    p1 = clicks_model.predict(emb, boxes=derived[None], points=[[click.x, click.y]], labels=[1], mask_input=p0.logits)
    out = decode_slice(session, k, SlicePrompts(clicks=(click,)), existing=existing, mode=Mode.ADD)
    assert out.calls == 2 and np.array_equal(out.model.logits, p1.logits)
    assert np.array_equal(out.mask, existing | p1.masks[0])
    # REPLACE has no derived box: the click alone
    alone = clicks_model.predict(emb, points=[[click.x, click.y]], labels=[1])
    assert np.array_equal(decode_slice(session, k, SlicePrompts(clicks=(click,)), existing=existing).mask,
                          alone.masks[0])


def test_add_negative_click_removes_exactly_its_island(ct):
    session, labels, k = ct
    spleen = metrics.largest_component(labels[k] == SPLEEN)
    box, _, _ = spleen_prompts(labels, k)
    blob = np.zeros_like(spleen)
    blob[20:40, 20:40] = True  # a wrong island far from the spleen
    assert not spleen[:50, :50].any()
    existing = spleen | blob
    out = decode_slice(session, k, SlicePrompts((box,), (Click(30, 30, False),)), existing=existing, mode="add")
    answer = out.model.mask
    assert not answer[15:45, 15:45].any(), "the model's answer stays away from the blob"
    assert np.array_equal(out.mask, (existing | answer) & ~blob), "the island goes, everything else is kept"


def test_combination_rules():
    answer = np.zeros((20, 20), bool)
    answer[2:8, 2:8] = True
    existing = np.zeros_like(answer)
    existing[4:12, 4:12] = True  # one island with the answer
    existing[15:18, 15:18] = True  # another island
    union = existing | answer
    assert np.array_equal(combine(answer, existing, Mode.REPLACE), answer)
    assert np.array_equal(combine(answer, existing, Mode.REMOVE), existing & ~answer)
    assert np.array_equal(combine(answer, None, Mode.ADD), answer)
    assert np.array_equal(combine(answer, existing, Mode.ADD), union)
    # a negative click on the joint island where the answer is not: the island is cut back to the answer
    cut = combine(answer, existing, Mode.ADD, (Click(10, 10, False),))
    expected = union.copy()
    expected[:14, :14] = answer[:14, :14]
    assert np.array_equal(cut, expected)
    # a negative click the answer covers: its island goes, the other island stays
    gone = combine(answer, existing, Mode.ADD, (Click(3, 3, False),))
    assert np.array_equal(gone, union & (np.arange(20)[:, None] >= 14))
    # a negative click off the mask, and positive clicks, change nothing
    assert np.array_equal(combine(answer, existing, Mode.ADD, (Click(0, 19, False), Click(10, 10))), union)


def test_remove_subtracts_and_no_prompts_keep_the_slice(ct):
    session, labels, k = ct
    existing = (labels[k] == SPLEEN) | (labels[k] == LIVER)
    box, _, _ = spleen_prompts(labels, k)
    out = decode_slice(session, k, SlicePrompts((box,)), existing=existing, mode=Mode.REMOVE)
    assert np.array_equal(out.mask, existing & ~out.model.mask)
    assert metrics.dice(out.mask, labels[k] == LIVER) > 0.95
    for mode in Mode:
        kept = decode_slice(session, k, SlicePrompts(), existing=existing, mode=mode)
        assert kept.calls == 0
        assert np.array_equal(kept.mask, existing if mode is not Mode.REPLACE else np.zeros_like(existing))


# ----- rule 4: 3D boxes, segments ------------------------------------------------------------------------------------
def test_3d_box_covers_s0_to_s1_and_nothing_else(ct, clicks_model):
    from samunet_core.prompts import SegmentPrompts, SliceBox, SlicePoint

    session, labels, k = ct
    spleen = labels == SPLEEN
    x0, y0, x1, y1 = metrics.tight_box(spleen[k - 1:k + 2].any(axis=0))
    _, pos, _ = spleen_prompts(labels, k)
    seg = SegmentPrompts("spleen", boxes=[SliceBox(k - 1, k + 1, x0, y0, x1, y1)],
                         points=[SlicePoint(k, pos.x, pos.y)], propagate=True)
    decoder = Counting(session)
    masks, warnings = segment_slices(decoder, seg, labels.shape[0], labels.shape[1:])
    assert sorted(masks) == [k - 1, k, k + 1] and not warnings
    assert sorted({s for s, _ in decoder.calls}) == [k - 1, k, k + 1], "no walk beyond a 3D box"
    assert [s for s, _ in decoder.calls].count(k) == 2, "the clicked slice: the box, then box + click"
    assert np.array_equal(masks[k], decode_slice(session, k, SlicePrompts(((x0, y0, x1, y1),), (pos,))).mask)
    for s in (k - 1, k + 1):  # walked from the drawn (clicked) slice, the box clipped to the 3D box (rule 6)
        bx0, by0, bx1, by1 = chained_box(without_fragments(masks[k]), DEFAULT_PARAMS.box_margin)
        box = [max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)]
        assert np.array_equal(masks[s], clicks_model.predict(session.embedding(s), boxes=[box]).masks[0])
    assert metrics.dice(np.stack([masks[s] for s in (k - 1, k, k + 1)]), spleen[k - 1:k + 2]) > 0.7


def test_prompt_file_mode_and_slice_prompts():
    from samunet_core.prompts import SegmentPrompts, SliceBox, SlicePoint, parse_prompts

    base = {"name": "a", "points": [{"position": [1, 2, 3]}]}
    parsed = parse_prompts({"coordinates": "IJK", "segments": [dict(base, mode="Remove"), dict(base, name="b")]})
    assert [s["mode"] for s in parsed.segments] == ["remove", None]
    with pytest.raises(InputError, match=r"segment 'a' mode: unknown value \"erase\"; use one of replace, add, remove"):
        parse_prompts({"coordinates": "IJK", "segments": [dict(base, mode="erase")]})
    seg = SegmentPrompts("a", boxes=[SliceBox(2, 4, 1, 2, 3, 4), SliceBox(3, 3, 5, 6, 7, 8)],
                         points=[SlicePoint(3, 9, 9, False), SlicePoint(2, 1, 1), SlicePoint(3, 8, 8)])
    assert seg.slice_prompts(3) == SlicePrompts(((1, 2, 3, 4), (5, 6, 7, 8)), (Click(9, 9, False), Click(8, 8)))
    assert seg.slice_prompts(4) == SlicePrompts(((1, 2, 3, 4),))
    assert seg.slice_prompts(5).empty


def test_segment_volume_edit_modes(ct, clicks_model, tmp_path_factory):
    """--edit: "remove" subtracts the answer on the prompted slice; the default for an existing segment is "add"."""
    from samunet_core.cache import EmbeddingCache
    from samunet_core.io.segmentations import Segment, Segmentation
    from samunet_core.io.volumes import read_volume
    from samunet_core.prompts import parse_prompts
    from samunet_core.segment import segment_volume

    session, labels, k = ct
    volume = read_volume(DATA / "example_ct_sm.nii.gz")
    frame = volume.frame("axial")
    old = (labels == SPLEEN) | (labels == LIVER)
    edit = Segmentation(volume.geometry, [Segment("organs", np.ascontiguousarray(frame.slices_to_volume(old)))])
    box, _, _ = spleen_prompts(labels, k)
    cache = EmbeddingCache(disk_dir=tmp_path_factory.getbasetemp() / "samunet_cache" / "embeddings")
    answer = decode_slice(session, k, SlicePrompts((box,))).mask
    for mode, expected in (("remove", old[k] & ~answer), (None, old[k] | answer)):
        seg = {"name": "organs", "boxes": [{"corners": [[box[0], box[1], k], [box[2], box[3], k]]}]}
        if mode:
            seg["mode"] = mode
        prompts = parse_prompts({"coordinates": "pixel", "segments": [seg]})
        result = segment_volume(volume, prompts, clicks_model, window=SOFT_TISSUE, cache=cache, edit=edit)
        new = result.slice_masks["organs"]
        assert np.array_equal(new[k], expected)
        others = [s for s in range(len(old)) if s != k]
        assert np.array_equal(new[others], old[others])


# ----- the session and eval reach the model through the same policy ---------------------------------------------------
def test_session_run_decodes_on_the_worker(ct, clicks_model):
    from samunet_core.cache import EmbeddingCache
    from samunet_core.session import VolumeSession

    session, labels, k = ct
    box, pos, _ = spleen_prompts(labels, k)
    image = session._slices(k)
    fresh = VolumeSession(clicks_model, lambda _k: image, session.n_slices, "run-test", cache=EmbeddingCache(),
                          prefetch_radius=0)
    memo = ClickMemo()
    try:
        def job(decoder, prompts):
            return threading.current_thread() is fresh._worker, decode_slice(decoder, k, prompts, memo=memo)

        on_worker, out = fresh.run(lambda d: job(d, SlicePrompts((box,)))).result(timeout=300)  # encodes inline
        assert on_worker and fresh.stats.encodes == 1 and out.calls == 1
        _, more = fresh.run(lambda d: job(d, SlicePrompts((box,), (pos,)))).result(timeout=300)
        assert more.calls == 1, "the memo knows the session's embedding"
        assert np.array_equal(more.mask, decode_slice(session, k, SlicePrompts((box,), (pos,))).mask)
        assert fresh.stats.encodes == 1
    finally:
        fresh.close()


def test_eval_point_protocol_is_decode_slice_on_its_clicks(ct, clicks_model):
    from samunet_core.evaluate import TimedPredictor, prompt_box, prompt_clicks

    session, labels, k = ct
    ref = labels[k] == SPLEEN
    emb = session.embedding(k)
    timed = TimedPredictor(clicks_model)
    outcome = prompt_clicks(timed, emb, ref, 3)
    assert len(outcome.clicks) >= 2 and timed.decoder_calls == len(outcome.clicks)
    clicks = tuple(Click(c.x, c.y, c.positive) for c in outcome.clicks)
    out = decode_slice(session, k, SlicePrompts(clicks=clicks))
    assert out.calls == len(clicks)
    assert np.array_equal(out.mask, outcome.pred) and out.model.score == outcome.iou_pred
    box = prompt_box(timed, emb, ref)
    assert np.array_equal(box.pred, clicks_model.predict(emb, boxes=np.asarray([box.box], np.float64)).masks[0])
