"""Shape checks shared by the decoders: B prompts against 1 or B image embeddings."""

from __future__ import annotations

import torch

from samunet_core.errors import InputError


def prompt_count(
    point_coords: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
) -> int:
    """Number of prompts B: the leading size of whichever prompt tensors are given (1 when none is)."""
    for t in (point_coords, point_labels, boxes, mask_input):
        if t is not None:
            return int(t.shape[0])
    return 1


def check_prompts(
    image_embedding: torch.Tensor,
    n: int,
    grid: int,
    channels: int,
    point_coords: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    mask_input: torch.Tensor | None,
    mask_size: int,
) -> None:
    """Raise InputError naming the first tensor whose shape does not fit B = n prompts."""
    shape = tuple(image_embedding.shape)
    if len(shape) != 4 or shape[1:] != (channels, grid, grid) or shape[0] not in (1, n):
        raise InputError(
            f"image embedding must be 1x{channels}x{grid}x{grid} or {n}x{channels}x{grid}x{grid} "
            f"for {n} prompt(s), got {shape}"
        )
    if (point_coords is None) != (point_labels is None):
        raise InputError("point coordinates and point labels must be given together")
    if point_coords is not None and point_labels is not None:
        if point_coords.ndim != 3 or point_coords.shape[0] != n or point_coords.shape[2] != 2:
            raise InputError(f"point coordinates must be {n}xNx2 (x, y), got {tuple(point_coords.shape)}")
        if tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
            raise InputError(
                f"point labels must be {n}x{point_coords.shape[1]} to match the coordinates, "
                f"got {tuple(point_labels.shape)}"
            )
    if boxes is not None and tuple(boxes.shape) != (n, 4):
        raise InputError(f"boxes must be {n}x4 (x0, y0, x1, y1), got {tuple(boxes.shape)}")
    if mask_input is not None and tuple(mask_input.shape) != (n, 1, mask_size, mask_size):
        raise InputError(
            f"mask input must be {n}x1x{mask_size}x{mask_size} logits from a previous decode, "
            f"got {tuple(mask_input.shape)}"
        )


def expand_to_prompts(t: torch.Tensor, n: int) -> torch.Tensor:
    """1xCxHxW or nxCxHxW -> nxCxHxW (a view when broadcasting)."""
    return t.expand(n, -1, -1, -1) if t.shape[0] == 1 else t
