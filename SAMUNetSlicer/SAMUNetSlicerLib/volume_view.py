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
    """array: KxJxI copy of the voxels; window: (lo, hi) from the display node; key: content hash for the cache."""

    def __init__(self, volume_node, axis: str = "axial", window: tuple[float, float] | None = None,
                 array: np.ndarray | None = None) -> None:
        """array: a snapshot already taken (views of one volume along several axes share it)."""
        self.volume_node = volume_node
        self.axis = axis
        self.frame = SliceFrame.for_volume(volume_node, axis)
        self.array = array if array is not None else np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
        self.window = window if window is not None else display_window(volume_node)
        # keyed as samunet segment keys the same pixels, so embeddings cached by either serve both
        self.key = volume_key(self.frame.frame.volume_to_slices(transforms.window_to_uint8(self.array, *self.window)),
                              axis)

    @property
    def n_slices(self) -> int:
        return self.frame.n_slices

    def slice_uint8(self, k: int) -> np.ndarray:
        """HxW uint8 displayed slice k, windowed exactly as the slice view shows it."""
        return transforms.window_to_uint8(self.frame.slice_of(self.array, k), *self.window)
