"""Training's propagation prompt kind: slice pairs, the walk's box, targets that end, and real propagation steps.

Real data: the in-repo TotalSegmentator CT (Testing/data/totalsegmentator, CC BY 4.0, see SOURCES.md there), its first
three labelled axial slices encoded by the packaged LiteMedSAM encoder.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator"


def test_slice_positions_and_pairs():
    from samunet_core.train.prompt_sim import propagation_pairs, slice_position

    assert slice_position("totalseg/example_ct:k12") == ("totalseg/example_ct", 12)
    assert slice_position("totalseg/example_ct:k12:w-1350,150") == ("totalseg/example_ct:w-1350,150", 12)
    assert slice_position("lidc/LIDC-IDRI-0002_n0_s11") == ("lidc/LIDC-IDRI-0002_n0", 11)
    for copy in ("totalseg/example_ct:k12:flip", "lidc/LIDC-IDRI-0002_n0_s11:aug0", "kvasir/cju0t4oil7vzk099370nun5h9",
                 "hvsmr/10000_22"):
        assert slice_position(copy) is None, copy
    sources = ["ct:k10", "ct:k11", "ct:k14", "ct:k11:w-1350,150", "ct:k12:w-1350,150", "lidc/P_n0_s11",
               "lidc/P_n0_s13", "lidc/P_n1_s13", "ct:k10:flip"]
    sizes = [(256, 256)] * len(sources)
    pairs = propagation_pairs(sources, sizes)
    # k10-k11 (gap 1), lung window k11-k12, LIDC s11-s13 (gap 2); not k11-k14 (gap 3), not across nodules or windows
    assert pairs == sorted([(0, 1), (1, 0), (3, 4), (4, 3), (5, 6), (6, 5)])
    assert propagation_pairs(sources[:2], [(256, 256), (256, 200)]) == []  # another grid size: not one volume


def test_propagation_prompt_is_the_walks_box():
    from samunet_core.model_input import MODEL_GRID
    from samunet_core.propagate import PropagationParams, chained_box
    from samunet_core.train.prompt_sim import propagation_prompts
    from samunet_core.transforms import model_scale

    mask = np.zeros((MODEL_GRID, MODEL_GRID), bool)
    mask[40:90, 2:60] = True
    prompts = propagation_prompts(mask[None])
    assert prompts.clicks == [[]]
    # the walk's box for a slice already on the grid, in grid pixels (scale 1): the same numbers
    walk = chained_box(mask, PropagationParams().box_margin) * model_scale(MODEL_GRID, MODEL_GRID, MODEL_GRID)
    np.testing.assert_allclose(prompts.boxes[0], np.floor(walk + 1e-3), atol=0)
    np.testing.assert_array_equal(prompts.boxes[0], [0, 37, 62, 92])


@pytest.fixture(scope="module")
def ct_slices(tmp_path_factory):
    """The first three labelled axial slices of the in-repo TotalSegmentator CT, encoded and filed as training items."""
    from samunet_core.predictor import Predictor
    from samunet_core.train.data import records_from_manifest
    from samunet_core.train.embeddings import list_items, precompute
    from samunet_core.train.weights_source import load_base_litemedsam

    folder = tmp_path_factory.mktemp("prop")
    labels = json.loads((DATA / "label_map_total.json").read_text())
    manifest = {"name": "prop", "cases": [{"id": "totalseg/example_ct_sm", "kind": "3d", "modality": "CT",
                                           "image": str(DATA / "example_ct_sm.nii.gz"),
                                           "labelmap": str(DATA / "example_seg.nii.gz"),
                                           "labels": {str(k): v for k, v in labels.items()},
                                           "window": [-160, 240]}]}
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest))
    records = list(itertools.islice(records_from_manifest(path), 3))
    predictor = Predictor(load_base_litemedsam(), "litemedsam", "litemedsam", device="cpu")
    precompute(records, predictor, folder / "cache", progress=False)
    return folder / "cache", list_items(folder / "cache")


def test_propagation_steps_prompt_the_next_slice_from_the_previous(ct_slices):
    from samunet_core.propagate import PropagationParams, grown_grid_box
    from samunet_core.train.embeddings import open_cache
    from samunet_core.train.loop import TrainConfig, Trainer
    from samunet_core.train.prompt_sim import slice_position
    from samunet_core.train.weights_source import load_base_litemedsam

    cache_dir, items = ct_slices
    ks = sorted(slice_position(it.source)[1] for it in items)
    assert ks == list(range(ks[0], ks[0] + 3))
    config = TrainConfig(steps=3, prompts_per_step=4, lr=5e-4, warmup_steps=1, propagation_fraction=1.0)
    trainer = Trainer(load_base_litemedsam(), items, open_cache(cache_dir), config)
    assert len(trainer.pairs) == 4  # k0<->k1, k1<->k2

    ended = 0
    for step in range(12):
        rng = np.random.default_rng([0, step])
        rng.random()  # the kind draw train_step makes first
        nxt, targets, prompts, _ = trainer._propagation_targets(rng)
        prev = next(trainer.items[a] for a, b in trainer.pairs if trainer.items[b] is nxt and
                    _same_step_pair(trainer, step, a, b))
        for row, box in enumerate(prompts.boxes):
            name = _name_of_box(prev, box)
            want = nxt.masks[nxt.names.index(name)] if name in nxt.names else np.zeros_like(targets[row])
            np.testing.assert_array_equal(targets[row], want)
            ended += int(name not in nxt.names)
        expected = [grown_grid_box(m, PropagationParams().box_margin) for m in prev.masks]
        assert all(any(np.array_equal(box, e) for e in expected) for box in prompts.boxes)
    assert ended >= 1  # a structure that stops between two of these slices is trained towards an empty mask
    history = trainer.run(progress=False)
    assert [h["propagate"] for h in history] == [1.0, 1.0, 1.0]
    assert all(np.isfinite(h["loss"]) and h["rounds"] == 0 and h["kd"] == 0.0 for h in history)


def _same_step_pair(trainer, step, a, b) -> bool:
    rng = np.random.default_rng([0, step])
    rng.random()
    return trainer.pairs[int(rng.integers(len(trainer.pairs)))] == (a, b)


def _name_of_box(item, box) -> str:
    from samunet_core.propagate import PropagationParams, grown_grid_box

    for name, mask in zip(item.names, item.masks, strict=True):
        if np.array_equal(grown_grid_box(mask, PropagationParams().box_margin), box):
            return name
    raise AssertionError("a propagation box that is no structure's box on the previous slice")
