"""Propagation on a real CT (TotalSegmentator example_ct_sm, 30 axial slices) with the real LiteMedSAM weights.

One box on each organ's largest slice, carried through the volume; 3D Dice against the reference labels. Every slice
is encoded at most once per test session (a shared disk cache under pytest's session temp folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from samunet_core import metrics
from samunet_core.propagate import (
    DEFAULT_PARAMS,
    SliceMask,
    chained_box,
    grow_box,
    mask_box,
    predict_box,
    propagate_masks,
    stack,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator"
SOFT_TISSUE = (-160.0, 240.0)
# 3D Dice of a box carried through the volume (the propagate protocol) with the default parameters, minus a margin.
# Measured (session 2 walk): liver 0.906, spleen 0.777, kidney_left 0.924, gallbladder 0.935, aorta 0.839.
ORGAN_MIN_DICE = {"liver": 0.88, "spleen": 0.70, "kidney_left": 0.85, "gallbladder": 0.85, "aorta": 0.75}
LABELS = {"spleen": 1, "kidney_left": 3, "gallbladder": 4, "liver": 5, "aorta": 52}


def shared_cache(tmp_path_factory: pytest.TempPathFactory):
    from samunet_core.cache import EmbeddingCache

    return EmbeddingCache(disk_dir=tmp_path_factory.getbasetemp() / "samunet_cache" / "embeddings")


@pytest.fixture(scope="module")
def ct(litemedsam, tmp_path_factory):
    """(VolumeSession over the soft-tissue windowed axial slices, K x H x W reference labels)."""
    from samunet_core.io.volumes import read_volume
    from samunet_core.segment import open_session

    volume = read_volume(DATA / "example_ct_sm.nii.gz")
    labels = read_volume(DATA / "example_seg.nii.gz")
    session, _, _ = open_session(volume, litemedsam, "axial", window=SOFT_TISSUE,
                                 cache=shared_cache(tmp_path_factory))
    yield session, volume.frame("axial").volume_to_slices(labels.array)
    session.close()


def start_box(ref: np.ndarray) -> tuple[int, tuple[int, int, int, int]]:
    k = int(np.argmax(ref.reshape(ref.shape[0], -1).sum(1)))
    return k, metrics.tight_box(metrics.largest_component(ref[k]))


def test_box_helpers() -> None:
    mask = np.zeros((100, 200), bool)
    mask[10:20, 30:41] = True
    assert mask_box(mask).tolist() == [30, 10, 40, 19]
    # 3 model-grid pixels on a 200-wide slice (scale 256/200) are 2.34 slice pixels; clipped at the border.
    grown = grow_box(np.array([0.0, 10.0, 199.0, 19.0]), 3.0, mask.shape)
    assert grown[0] == 0 and grown[2] == 199
    assert grown[1] == pytest.approx(10 - 3 * 200 / 256) and grown[3] == pytest.approx(19 + 3 * 200 / 256)


def test_chained_box_is_the_official_grid_box() -> None:
    """The official chaining on a 512x512 slice: rows 100-199, cols 50-149 are grid rows 50-99, cols 25-74; grown by
    3 grid pixels that is (22, 47, 77, 102), which the model's truncating box scaling must receive exactly."""
    from samunet_core.model_input import GridMapping, LiteMedSAMInput

    mask = np.zeros((512, 512), bool)
    mask[100:200, 50:150] = True
    box = chained_box(mask, 3.0)
    mapping = GridMapping((512, 512), (256, 256))
    assert LiteMedSAMInput.boxes_to_grid(box[None], mapping)[0].tolist() == [22, 47, 77, 102]
    # clipped to the grid at the border; a one-pixel line that vanishes at 256 still gives a box
    mask[:] = False
    mask[0:4, 0:3] = True
    assert LiteMedSAMInput.boxes_to_grid(chained_box(mask, 3.0)[None], mapping)[0].tolist() == [0, 0, 4, 4]
    line = np.zeros((512, 512), bool)
    line[300, 10:400] = True
    grid = LiteMedSAMInput.boxes_to_grid(chained_box(line, 0.0)[None], mapping)[0]
    assert grid[1] == grid[3] == 150


def test_score_rule_is_relative_to_the_start_slice() -> None:
    """A predicted IoU of 0.5 ends a walk that started at 0.9 (below 0.65 x 0.9) but not one that started at 0.6:
    the rule follows each model's own IoU-head calibration."""
    from samunet_core.propagate import _accept

    prev = SliceMask(np.pad(np.ones((10, 10), bool), 5))
    new = SliceMask(prev.mask.copy(), score=0.5)
    assert not _accept(new, prev, DEFAULT_PARAMS, start_score=0.9)
    assert _accept(new, prev, DEFAULT_PARAMS, start_score=0.6)
    assert _accept(new, prev, DEFAULT_PARAMS)  # a start without a score (an existing mask): no score rule


def box_then_propagate(session, n_slices: int, k0: int, box) -> dict[int, np.ndarray]:
    """The `propagate` protocol through the one prompt policy: the box's answer on k0 seeds the walk."""
    from samunet_core.interaction import SlicePrompts, decode_slice, propagate_from_seeds

    seed = decode_slice(session, k0, SlicePrompts(boxes=(tuple(float(v) for v in box),))).model
    return propagate_from_seeds(session, n_slices, {k0: seed})


@pytest.mark.parametrize("organ", sorted(ORGAN_MIN_DICE))
def test_box_plus_propagation_matches_reference(ct, organ: str) -> None:
    session, labels = ct
    ref = labels == LABELS[organ]
    k0, box = start_box(ref)
    masks = box_then_propagate(session, ref.shape[0], k0, box)
    pred = stack(masks, ref.shape[0], ref.shape[1:])
    d = metrics.dice(pred, ref)
    print(f"{organ}: 3D Dice {d:.3f}, slices {min(masks)}-{max(masks)}, reference "
          f"{np.flatnonzero(ref.any(axis=(1, 2)))[[0, -1]].tolist()}")
    assert d >= ORGAN_MIN_DICE[organ], f"{organ}: 3D Dice {d:.3f}"
    assert k0 in masks and masks[k0].any()


def test_walk_stops_where_the_organ_ends(ct) -> None:
    """kidney_left ends at slice 22 of 30: the official chaining runs on to the volume's end, ours must not."""
    session, labels = ct
    ref = labels == LABELS["kidney_left"]
    last = int(np.flatnonzero(ref.any(axis=(1, 2)))[-1])
    k0, box = start_box(ref)
    masks = box_then_propagate(session, ref.shape[0], k0, box)
    reached = max(k for k, m in masks.items() if m.any())
    assert reached <= last + 2, f"walk ran on to slice {reached}; the kidney ends at {last}"


def test_between_two_prompted_slices_both_are_kept(ct) -> None:
    session, labels = ct
    ref = labels == LABELS["liver"]
    lo, hi = 8, 20
    seeds = {k: predict_box(session, k, metrics.tight_box(metrics.largest_component(ref[k]))) for k in (lo, hi)}
    masks = propagate_masks(session, ref.shape[0], seeds, DEFAULT_PARAMS, limits=(lo, hi))
    assert sorted(masks) == list(range(lo, hi + 1)), "every slice between the prompted ones gets a mask"
    for k in (lo, hi):
        assert np.array_equal(masks[k], seeds[k].mask), "a prompted slice keeps its own mask"
    between = stack({k: m for k, m in masks.items() if lo < k < hi}, ref.shape[0], ref.shape[1:])
    assert metrics.dice(between[lo + 1:hi], ref[lo + 1:hi]) > 0.8
