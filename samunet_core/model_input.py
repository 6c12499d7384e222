"""Each model family's own preprocessing policy: slice image -> model input array, slice prompts -> model grid.

The grid arithmetic itself (longest-side scale and resized shape) lives in `samunet_core.transforms`.

The model grid is the square the network sees (256 x 256): the slice is resized so its longest side is 256 and
zero-padded right/bottom. The families differ in detail, and parity with their published numbers depends on it:

- LiteMedSAM (official CVPR24 inference): OpenCV INTER_AREA resize, min-max normalisation of the resized image to
  [0, 1], boxes scaled by 256/max(H, W) and truncated to integers, points scaled as floats.
- SAM-UNet (authors' code): PIL bilinear resize (SAM's ResizeLongestSide), ImageNet mean/std on 0..255 values,
  boxes and points scaled per axis as floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samunet_core.transforms import model_resized_shape, model_scale

MODEL_GRID = 256
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """HxW or HxWx1/3 uint8 -> HxWx3 uint8 (grey replicated). Other dtypes are refused: window first."""
    from samunet_core.errors import InputError

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InputError(f"the model takes 8-bit images, got {image.dtype}; window the slice to uint8 first "
                         "(samunet_core.transforms.window_to_uint8)")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return image[:, :, :3]
    raise InputError(f"expected an HxW or HxWx3 image, got shape {image.shape}")


def _pad_to_grid(image: np.ndarray) -> np.ndarray:
    """hxwx3 float32 (h, w <= 256) -> 256x256x3 float32, zero-padded right and bottom."""
    padded = np.zeros((MODEL_GRID, MODEL_GRID, 3), np.float32)
    padded[: image.shape[0], : image.shape[1]] = image
    return padded


@dataclass(frozen=True)
class GridMapping:
    """How one slice maps onto the model grid."""

    original_size: tuple[int, int]  # (H, W) of the slice
    input_size: tuple[int, int]  # (h, w) of the resized slice inside the 256 grid

    @property
    def scale(self) -> float:
        return model_scale(*self.original_size, MODEL_GRID)

    @property
    def axis_scales(self) -> tuple[float, float]:
        """(sx, sy): per-axis scale as SAM's ResizeLongestSide computes it."""
        (old_h, old_w), (new_h, new_w) = self.original_size, self.input_size
        return new_w / old_w, new_h / old_h


class LiteMedSAMInput:
    """Official LiteMedSAM preprocessing (CVPR24_LiteMedSAM_infer.py)."""

    @staticmethod
    def image_to_array(image: np.ndarray) -> tuple[np.ndarray, GridMapping]:
        """HxW(x3) uint8 -> (256x256x3 float32 in [0, 1], mapping)."""
        import cv2

        rgb = as_rgb_uint8(image)
        h, w = rgb.shape[:2]
        new_h, new_w = model_resized_shape(h, w, MODEL_GRID)
        resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA).astype(np.float64)
        lo, hi = resized.min(), resized.max()
        normalised = ((resized - lo) / np.clip(hi - lo, 1e-8, None)).astype(np.float32)
        return _pad_to_grid(normalised), GridMapping((h, w), (new_h, new_w))

    @staticmethod
    def boxes_to_grid(boxes: np.ndarray, mapping: GridMapping) -> np.ndarray:
        """Bx4 (x0, y0, x1, y1) slice pixels -> Bx4 grid coordinates, truncated as the official script does."""
        return np.trunc(np.asarray(boxes, np.float64) * mapping.scale).astype(np.float32)

    @staticmethod
    def points_to_grid(points: np.ndarray, mapping: GridMapping) -> np.ndarray:
        """...x2 (x, y) slice pixels -> grid coordinates as floats (SAM's prompt encoder adds the half pixel)."""
        return (np.asarray(points, np.float64) * mapping.scale).astype(np.float32)


class SAMUNetInput:
    """SAM-UNet authors' preprocessing (SAM ResizeLongestSide + ImageNet normalisation)."""

    @staticmethod
    def image_to_array(image: np.ndarray) -> tuple[np.ndarray, GridMapping]:
        """HxW(x3) uint8 -> (256x256x3 float32 normalised, mapping); padding is zero after normalisation."""
        from PIL import Image

        rgb = as_rgb_uint8(image)
        h, w = rgb.shape[:2]
        new_h, new_w = model_resized_shape(h, w, MODEL_GRID)
        resized = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR), np.float32)
        normalised = (resized - np.float32(SAM_PIXEL_MEAN)) / np.float32(SAM_PIXEL_STD)
        return _pad_to_grid(normalised), GridMapping((h, w), (new_h, new_w))

    @staticmethod
    def boxes_to_grid(boxes: np.ndarray, mapping: GridMapping) -> np.ndarray:
        """Bx4 (x0, y0, x1, y1) slice pixels -> Bx4 grid coordinates, per-axis float scale."""
        sx, sy = mapping.axis_scales
        return (np.asarray(boxes, np.float64) * np.array([sx, sy, sx, sy])).astype(np.float32)

    @staticmethod
    def points_to_grid(points: np.ndarray, mapping: GridMapping) -> np.ndarray:
        """...x2 (x, y) slice pixels -> grid coordinates, per-axis float scale."""
        sx, sy = mapping.axis_scales
        return (np.asarray(points, np.float64) * np.array([sx, sy])).astype(np.float32)
