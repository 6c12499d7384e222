"""Carry a mask from one slice through its neighbours: the Lib's single entry point to the engine's propagation.

The walk and its stopping rule are samunet_core.propagate's; this module only adapts a VolumeSession to it so each
decode runs on the session's worker thread, and adds cancellation and progress for the GUI.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from samunet_core.predictor import Prediction
from samunet_core.propagate import SliceMask, propagate_masks

DIRECTIONS = ("up", "down", "both")


class _SessionDecoder:
    """SliceDecoder over a VolumeSession: the model runs on the session worker; a cancel answers empty masks,
    which ends every walk where it is (what was found so far is kept)."""

    def __init__(self, session, shape: tuple[int, int], cancel: threading.Event,
                 progress: Callable[[int, int], None] | None, total: int) -> None:
        self.session, self.shape, self.cancel, self.progress, self.total = session, shape, cancel, progress, total
        self.done = 0

    def predict(self, k: int, **prompts: Any) -> Prediction:
        if self.cancel.is_set():
            return Prediction(np.zeros((1, *self.shape), bool), np.full((1, 1, 1, 1), -1e4, np.float32),
                              np.zeros(1, np.float32))
        self.session.prefetch(k, radius=1)
        prediction = self.session.segment(k, **prompts).result()
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        return prediction


def propagate_from_slice(session, seed_k: int, seed_mask: np.ndarray, direction: str = "both",
                         cancel: threading.Event | None = None,
                         progress: Callable[[int, int], None] | None = None) -> dict[int, np.ndarray]:
    """Masks (HxW bool, display orientation) for the slices reached from `seed_k`, seed excluded.

    direction: "up" (increasing slice index), "down" or "both". Blocks until done: call it from a background
    thread, never from the GUI thread. progress(done, total) is called from that thread.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}")
    seed_mask = np.asarray(seed_mask, bool)
    total = {"up": session.n_slices - 1 - seed_k, "down": seed_k, "both": session.n_slices - 1}[direction]
    decoder = _SessionDecoder(session, seed_mask.shape, cancel or threading.Event(), progress, total)
    masks = propagate_masks(decoder, session.n_slices, {seed_k: SliceMask(seed_mask)},
                            walk_below=direction in ("down", "both"), walk_above=direction in ("up", "both"))
    return {k: np.asarray(m, bool) for k, m in masks.items() if k != seed_k and np.asarray(m).any()}
