"""A volume as the model sees it: a snapshot of its voxels, the display node's window, and one slice orientation.

Taken on the main thread (MRML is not thread-safe); afterwards `slice_uint8(k)` is pure numpy and safe to call from
the session's worker thread.
"""

from __future__ import annotations

import numpy as np
import slicer

from samunet_core import transforms
from samunet_core.cache import volume_key

from .geometry import SliceFrame, display_window


class VolumeView:
    """One volume along one axis as the model sees it. pixels: KxJxI uint8 snapshot of the voxels windowed by the
    display node's (lo, hi) window; key: content hash for the embedding cache."""

    def __init__(self, volume_node, axis: str = "axial", window: tuple[float, float] | None = None,
                 pixels: np.ndarray | None = None) -> None:
        """pixels: the windowed snapshot already taken (views of one volume along several axes share it)."""
        self.volume_node = volume_node
        self.axis = axis
        self.frame = SliceFrame.for_volume(volume_node, axis)
        self.window = window if window is not None else display_window(volume_node)
        self.pixels = pixels if pixels is not None else windowed_snapshot(volume_node, self.window)
        # keyed as samunet segment keys the same pixels, so embeddings cached by either serve both
        self.key = volume_key(self.frame.frame.volume_to_slices(self.pixels), axis)

    @property
    def n_slices(self) -> int:
        return self.frame.n_slices

    def slice_uint8(self, k: int) -> np.ndarray:
        """HxW uint8 displayed slice k, windowed exactly as the slice view shows it."""
        return np.ascontiguousarray(self.frame.slice_of(self.pixels, k))


def windowed_snapshot(volume_node, window: tuple[float, float]) -> np.ndarray:
    """KxJxI uint8: the volume's voxels windowed to 0..255 (a copy, safe to read from the worker thread)."""
    return transforms.window_to_uint8(slicer.util.arrayFromVolume(volume_node), *window)
