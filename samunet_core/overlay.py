"""A PNG picture of a segmentation job: the prompted slice(s) as the model saw them, with each segment's contour in
its colour and the prompts (boxes as rectangles, positive clicks filled, negative clicks hollow)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

MAX_PANELS = 4
PANEL_SIDE = 384


def overlay_slices(result: Any, max_panels: int = MAX_PANELS) -> list[int]:
    """The displayed slices to draw: every prompted slice (a 3D box counts its middle slice), at most `max_panels`
    spread evenly."""
    slices: set[int] = set()
    for seg in result.prompts.segments:
        slices.update(p.s for p in seg.points)
        for box in seg.boxes:
            slices.add((box.s0 + box.s1) // 2)
    ordered = sorted(slices)
    if len(ordered) > max_panels:
        picks = np.linspace(0, len(ordered) - 1, max_panels).round().astype(int)
        ordered = [ordered[i] for i in picks]
    return ordered


def _bgr(color: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(int(round(c * 255)) for c in color)  # the canvas is RGB; cv2 only stores the triple


def render_panel(result: Any, k: int, side: int = PANEL_SIDE) -> np.ndarray:
    """HxWx3 uint8 picture of displayed slice k, scaled up to about `side` pixels."""
    import cv2

    from samunet_core.io.segmentations import default_color
    from samunet_core.transforms import to_rgb

    image = to_rgb(np.ascontiguousarray(result.image_u8[k]))
    h, w = image.shape[:2]
    scale = max(1, side // max(h, w)) if max(h, w) < side else 1
    canvas = cv2.resize(image, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    if max(h, w) > side:
        factor = side / max(h, w)
        canvas = cv2.resize(image, (int(w * factor + 0.5), int(h * factor + 0.5)), interpolation=cv2.INTER_AREA)
    fy, fx = canvas.shape[0] / h, canvas.shape[1] / w
    colors = {s.name: (s.color or default_color(i)) for i, s in enumerate(result.segmentation.segments)}
    for name, masks in result.slice_masks.items():
        mask = np.ascontiguousarray(masks[k]).astype(np.uint8)
        big = cv2.resize(mask, (canvas.shape[1], canvas.shape[0]), interpolation=cv2.INTER_NEAREST)
        found, _ = cv2.findContours(big, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, found, -1, _bgr(colors.get(name, (1.0, 0.0, 0.0))), 2)
    for seg in result.prompts.segments:
        color = _bgr(colors.get(seg.name, (1.0, 1.0, 0.0)))
        for box in seg.boxes:
            if box.covers(k):
                cv2.rectangle(canvas, (int(box.x0 * fx), int(box.y0 * fy)),
                              (int((box.x1 + 1) * fx) - 1, int((box.y1 + 1) * fy) - 1), color, 1)
        for point in seg.points:
            if point.s == k:
                centre = (int((point.x + 0.5) * fx), int((point.y + 0.5) * fy))
                cv2.circle(canvas, centre, 5, color, -1 if point.positive else 2)
    caption = f"{result.axis} slice {k}" if result.image_u8.shape[0] > 1 else "image"
    cv2.putText(canvas, caption, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def render_overlay(result: Any) -> np.ndarray:
    """HxWx3 uint8: the panels of `overlay_slices` side by side."""
    panels = [render_panel(result, k) for k in overlay_slices(result)] or [render_panel(result, 0)]
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    return np.concatenate(padded, axis=1)[:, :-4]


def write_overlay(path: str | os.PathLike, result: Any) -> Path:
    """Render the overlay of a SegmentResult and write it as PNG (atomic)."""
    from PIL import Image

    from samunet_core.io.atomic import atomic_path

    picture = render_overlay(result)
    with atomic_path(path) as tmp:
        Image.fromarray(picture, mode="RGB").save(tmp, format="PNG")
    return Path(path)
