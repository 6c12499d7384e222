"""The walk through a volume does not change under float noise in the embeddings.

Devices and runtimes differ in rounding: OpenVINO fp32 against eager torch differs by at most 4e-6 on embedding values
of order 1 (test_runtime), a GPU in fp32 with TF32 off (the Predictor's CUDA setting) by the same order. Here every
embedding gets Gaussian noise of 1e-3 x its standard deviation, a few hundred times that, and the demo CT's two
lungs must be segmented on exactly the same slices with Dice >= 0.999 per segment. (Measured on this CT: at 3e-3 the
right lung loses three slices in 3 of 6 draws, because one slice's IoU with its neighbour sits at 0.459 against the
0.45 threshold; that level is what reduced-precision arithmetic gives, which is why no lossy runtime is a default.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dice

from samunet_core.cache import EmbeddingCache
from samunet_core.segment import prepare_job, segment_volume

REPO = Path(__file__).resolve().parents[2]
NOISE = 1e-3


class NoisyEncoder:
    """Wraps a predictor's encoder: clean outputs are computed once per input and returned with fresh noise."""

    def __init__(self, inner, level: float) -> None:
        self.inner, self.level, self.clean = inner, level, {}
        self.rng = np.random.default_rng(0)

    def __call__(self, x, should_abort=None):
        key = hashlib.sha1(x.numpy().tobytes()).hexdigest()
        if key not in self.clean:
            self.clean[key] = self.inner(x)
        out = {}
        for name, value in self.clean[key].items():
            noise = torch.from_numpy(self.rng.standard_normal(value.shape).astype(np.float32))
            out[name] = value + self.level * float(value.std()) * noise
        return out


@pytest.fixture
def noisy_default(default_openvino):
    encoder = NoisyEncoder(default_openvino.encoder, 0.0)
    default_openvino.encoder = encoder
    yield default_openvino, encoder
    default_openvino.encoder = encoder.inner


def test_the_demo_walk_does_not_change_under_float_noise(noisy_default, tmp_path):
    predictor, encoder = noisy_default
    job = prepare_job(REPO / "Resources/Samples/CTChest4.nrrd", REPO / "Resources/Samples/ctchest_prompts.json",
                      tmp_path / "out.seg.nrrd")

    def run() -> dict[str, np.ndarray]:
        return segment_volume(job.volume, job.prompts, predictor, preset="lung", cache=EmbeddingCache()).slice_masks

    clean = run()
    assert all(m.any(axis=(1, 2)).sum() >= 5 for m in clean.values())  # both lungs are carried over several slices
    encoder.level = NOISE
    for seed in range(3):
        encoder.rng = np.random.default_rng(seed)
        noisy = run()
        for name, mask in clean.items():
            assert np.array_equal(noisy[name].any(axis=(1, 2)), mask.any(axis=(1, 2))), (name, seed)
            assert dice(noisy[name], mask) >= 0.999, (name, seed)
