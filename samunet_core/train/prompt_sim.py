"""Simulated interactive prompts on the 256 model grid, as in interactive segmentation training (SAM, SAM-Med2D).

First prompt: the tight box of the target's largest 8-connected component (optionally jittered), or 1-3 positive
points (the first at the component's most interior point, as the `point*` protocols click, or at a random interior
pixel). Then corrective clicks: `samunet_core.metrics.next_click` on the current prediction, the same rule as
`samunet eval` (centre of the largest error region, positive in a miss, negative in a false positive), sometimes moved
to a random pixel of that region.

Propagation (one more prompt kind): on two slices of one volume, the previous slice's mask gives the next slice's
box exactly as the propagation walk makes it (`samunet_core.propagate.chained_box`: its box + 3 grid px); the target
is the next slice's mask of that structure, empty where the structure has ended (so the model learns to stop).

Coordinates are (x=col, y=row) in the 256 grid, the frame the prompt encoder takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from samunet_core import metrics

PAD_LABEL = -1  # SAM's "not a point" label: pads point lists to one length


@dataclass
class Prompts:
    """Prompts of B targets: boxes Bx4 (or None), per-target click lists [(x, y, label), ...]."""

    boxes: np.ndarray | None
    clicks: list[list[tuple[float, float, int]]] = field(default_factory=list)

    def tensors(self, device: str = "cpu"):
        """(coords BxNx2 float32 or None, labels BxN int64 or None, boxes Bx4 float32 or None) as torch tensors."""
        import torch

        boxes = None if self.boxes is None else torch.as_tensor(self.boxes, dtype=torch.float32, device=device)
        n = max((len(c) for c in self.clicks), default=0)
        if n == 0:
            return None, None, boxes
        coords = np.zeros((len(self.clicks), n, 2), np.float32)
        labels = np.full((len(self.clicks), n), PAD_LABEL, np.int64)
        for i, clicks in enumerate(self.clicks):
            for j, (x, y, label) in enumerate(clicks):
                coords[i, j], labels[i, j] = (x, y), label
        return torch.as_tensor(coords, device=device), torch.as_tensor(labels, device=device), boxes


def _random_pixel(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    i = int(rng.integers(len(rows)))
    return int(cols[i]), int(rows[i])


def _interior(mask: np.ndarray, rng: np.random.Generator, centre_prob: float) -> tuple[int, int]:
    """The most interior pixel (prob `centre_prob`), else a random pixel at least 1/3 of the max depth inside."""
    if rng.random() < centre_prob:
        return metrics.interior_point(mask)
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return _random_pixel(dist >= max(dist.max() / 3.0, 1.0), rng)


def jittered_box(mask: np.ndarray, rng: np.random.Generator, jitter: float, size: int) -> np.ndarray:
    """Tight box (x0, y0, x1, y1) of a grid mask's largest component, each side moved by up to `jitter` x its extent
    (at most 5 px, SAM-UNet's cap), clipped to the grid."""
    x0, y0, x1, y1 = metrics.tight_box(metrics.largest_component(mask))
    box = np.array([x0, y0, x1, y1], np.float64)
    if jitter > 0:
        w, h = x1 - x0 + 1, y1 - y0 + 1
        limit = np.minimum(np.array([w, h, w, h]) * jitter, 5.0)
        box += rng.uniform(-1, 1, 4) * limit
        box = np.clip(np.round(box), 0, size - 1)
        box[2], box[3] = max(box[2], box[0]), max(box[3], box[1])
    return box.astype(np.float32)


def first_prompts(masks: np.ndarray, mode: str, rng: np.random.Generator, *, jitter_prob: float = 0.5,
                  jitter: float = 0.1, centre_prob: float = 0.5, max_points: int = 3) -> Prompts:
    """The first prompt of each of B targets (masks Bx256x256 bool). mode: 'box' or 'points'."""
    if mode == "box":
        boxes = np.stack([jittered_box(m, rng, jitter if rng.random() < jitter_prob else 0.0, m.shape[0])
                          for m in masks])
        return Prompts(boxes, [[] for _ in masks])
    clicks = []
    for mask in masks:
        lcc = metrics.largest_component(mask)
        n = int(rng.integers(1, max_points + 1))
        x, y = _interior(lcc, rng, centre_prob)
        target_clicks = [(float(x), float(y), 1)]
        for _ in range(n - 1):
            x, y = _random_pixel(mask, rng)
            target_clicks.append((float(x), float(y), 1))
        clicks.append(target_clicks)
    return Prompts(None, clicks)


def add_corrections(prompts: Prompts, preds: np.ndarray, masks: np.ndarray, input_size: tuple[int, int],
                    rng: np.random.Generator, random_prob: float = 0.25) -> int:
    """Append one corrective click per target (in place). preds, masks: Bx256x256 bool; only the image part of the
    grid (input_size) is looked at, as a user sees no padding. A target already perfect gets a padding point.
    Returns the number of real clicks added."""
    h, w = input_size
    added = 0
    for i in range(len(masks)):
        pred, ref = preds[i, :h, :w], masks[i, :h, :w]
        click = metrics.next_click(pred, ref)
        if click is None:
            prompts.clicks[i].append((0.0, 0.0, PAD_LABEL))
            continue
        x, y = click.x, click.y
        if rng.random() < random_prob:
            error = (ref & ~pred) if click.positive else (pred & ~ref)
            labels, _ = ndimage.label(error, structure=np.ones((3, 3), bool))
            x, y = _random_pixel(labels == labels[y, x], rng)
        prompts.clicks[i].append((float(x), float(y), 1 if click.positive else 0))
        added += 1
    return added


# -- propagation: the previous slice's mask prompts the next slice ----------------------------------------------------
_STACK_SLICE = re.compile(r"^(?P<stack>.+):k(?P<k>\d+)(?P<window>(:w[^:]+)?)$")  # a 3D case's slice (data.py)
_LIDC_SLICE = re.compile(r"^(?P<stack>lidc/.+_n\d+)_s(?P<k>\d+)$")  # one nodule's crops, slice k of its CT
PROPAGATION_MAX_GAP = 2  # LIDC keeps a nodule's largest slice and the slices 2 above and below


def slice_position(source: str) -> tuple[str, int] | None:
    """A training image id -> (stack id, slice index) when it is one slice of a volume, else None.

    '<case>:k<k>[:w<lo>,<hi>]' (a slice of a 3D manifest case; the window is part of the stack id, as a windowed
    record has its own targets) and 'lidc/<patient>_n<nodule>_s<k>' (LIDC-IDRI crops). Mirrored / rotated copies
    (':flip', ':aug<n>') and 2D sources have no neighbours: None.
    """
    for pattern in (_STACK_SLICE, _LIDC_SLICE):
        match = pattern.match(source)
        if match:
            stack = match.group("stack") + (match.groupdict().get("window") or "")
            return stack, int(match.group("k"))
    return None


def propagation_pairs(sources: list[str], input_sizes: list[tuple[int, int]],
                      max_gap: int = PROPAGATION_MAX_GAP) -> list[tuple[int, int]]:
    """Index pairs (prev, next) of images that are slices of one stack, 1..max_gap slices apart, with the same model
    grid size; both directions (a walk goes up and down). Each slice pairs with its nearest neighbour on each side."""
    stacks: dict[str, list[tuple[int, int]]] = {}
    for i, source in enumerate(sources):
        position = slice_position(source)
        if position is not None:
            stacks.setdefault(position[0], []).append((position[1], i))
    pairs = []
    for members in stacks.values():
        members.sort()
        for (ka, a), (kb, b) in zip(members, members[1:], strict=False):
            if 0 < kb - ka <= max_gap and input_sizes[a] == input_sizes[b]:
                pairs.extend([(a, b), (b, a)])
    return sorted(pairs)


def propagation_prompts(prev_masks: np.ndarray, margin: float | None = None) -> Prompts:
    """Bx256x256 bool masks of the previous slice (each non-empty) -> the walk's boxes on the next slice
    (`propagate.grown_grid_box`; margin: the walk's `PropagationParams.box_margin` unless given)."""
    from samunet_core.propagate import PropagationParams, grown_grid_box

    margin = PropagationParams().box_margin if margin is None else margin
    boxes = np.stack([grown_grid_box(mask, margin) for mask in prev_masks]).astype(np.float32)
    return Prompts(boxes, [[] for _ in prev_masks])
