"""Training images and their target masks, from our manifest format or SA-Med2D's `image2label_train.json`.

An `ImageRecord` is one image exactly as the encoder sees it (8-bit, windowed by DESIGN.md's default image rules)
with every target mask on it. 3D cases are sliced axially (array[k] of the LPS volume) and windowed per target:
targets with their own `target_windows` entry (e.g. lungs) come as a separate record of the same slice, exactly as
`samunet eval` groups them (it is the same code: `samunet_core.evaluate`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samunet_core.errors import InputError


@dataclass
class ImageRecord:
    """image: HxW or HxWx3 uint8 as the model sees it; targets: (name, HxW bool mask) pairs, none empty."""

    source: str
    modality: str
    image: np.ndarray
    targets: list[tuple[str, np.ndarray]] = field(default_factory=list)


def records_from_manifest(manifest_path: str | Path, case_ids: Iterable[str] | None = None,
                          slice_strides: dict[str, int] | None = None) -> Iterator[ImageRecord]:
    """Records of the chosen cases of a manifest (all when `case_ids` is None), in the order of `case_ids`.

    slice_strides: case id -> k stride for 3D cases (only axial slices with k % stride == 0; default 1).
    """
    from samunet_core.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    by_id = {c.id: c for c in manifest.cases}
    wanted = list(by_id) if case_ids is None else list(case_ids)
    unknown = [c for c in wanted if c not in by_id]
    if unknown:
        raise InputError(f"{manifest_path}: no case(s) {unknown[:5]}; check the split against the manifest")
    for case_id in wanted:
        case = by_id[case_id]
        if case.kind == "2d":
            yield _record_2d(case)
        else:
            yield from _records_3d(case, (slice_strides or {}).get(case_id, 1))


def _record_2d(case) -> ImageRecord:
    from samunet_core import evaluate

    image = evaluate.read_image_2d(case.image, case.id)
    if image.dtype != np.uint8:
        image = evaluate.window_slice(image, case.window, evaluate.volume_default_window(image))
    targets = []
    for target in case.targets:
        mask = evaluate.read_mask_2d(target.mask, image.shape[:2], case.id)
        if mask.any():
            targets.append((target.name, mask))
    return ImageRecord(case.id, case.modality, image, targets)


def _records_3d(case, stride: int) -> Iterator[ImageRecord]:
    from samunet_core import evaluate

    volume = evaluate.read_volume(case)
    volume_window = evaluate.volume_default_window(volume.image) if case.window is None else None
    for group in evaluate.plan_3d(case, volume.labels, stride):
        image = evaluate.window_slice(volume.image[group.k], group.window, volume_window)
        window = "" if group.window is None else f":w{group.window[0]:g},{group.window[1]:g}"
        targets = [(case.labels[label], volume.labels[group.k] == label) for label in group.labels]
        yield ImageRecord(f"{case.id}:k{group.k}{window}", case.modality, image, targets)


def records_from_sam_med2d(json_path: str | Path, root: str | Path | None = None,
                           modality: str = "CT") -> Iterator[ImageRecord]:
    """Records from SA-Med2D-16M's `image2label_train.json` layout: {image path: [mask paths]}.

    Paths are resolved against `root` (default: the JSON's folder). SA-Med2D writes them with its data folder's
    name first (`data_demo/images/x.png`); when that folder was renamed, the path is retried without its first part.
    Masks are 8-bit PNGs, nonzero = target; the target name is the mask's file stem.
    """
    from PIL import Image

    json_path = Path(json_path)
    try:
        table = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read SA-Med2D index {json_path} ({exc}); pass an image2label_train.json") from exc
    if not isinstance(table, dict):
        raise InputError(f"{json_path}: expected an object mapping image paths to lists of mask paths")
    base = Path(root) if root is not None else json_path.parent

    def resolve(rel: str) -> Path:
        for candidate in (base / rel, base / Path(*Path(rel).parts[1:])):
            if candidate.is_file():
                return candidate
        raise InputError(f"{json_path}: file {rel} not found under {base}; pass the data folder as root")

    for image_rel in sorted(table):
        image_path = resolve(image_rel)
        with Image.open(image_path) as img:
            image = np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
        targets = []
        for mask_rel in table[image_rel]:
            with Image.open(resolve(mask_rel)) as img:
                mask = np.asarray(img)
            mask = (mask[..., 0] if mask.ndim == 3 else mask) > 0
            if mask.shape != image.shape[:2]:
                raise InputError(f"{json_path}: mask {mask_rel} is not the size of {image_rel}")
            if mask.any():
                targets.append((Path(mask_rel).stem, mask))
        yield ImageRecord(f"sam_med2d:{Path(image_rel).stem}", modality, image, targets)


def flipped(record: ImageRecord) -> ImageRecord:
    """The record mirrored left-right (an image-space augmentation: it needs its own encoding)."""
    return ImageRecord(record.source + ":flip", record.modality, np.ascontiguousarray(record.image[:, ::-1]),
                       [(name, np.ascontiguousarray(mask[:, ::-1])) for name, mask in record.targets])


def augmented(record: ImageRecord, degrees: tuple[float, float] = (5.0, 15.0), seed: int = 0) -> ImageRecord:
    """A rotated, intensity-jittered copy of a record (an image-space augmentation: it needs its own encoding).

    Rotation about the image centre by `degrees` (low, high) either way (image bilinear, masks nearest, zero fill;
    the low bound keeps every copy a real change, as each costs an encoding), then a
    gamma in [0.7, 1.4], a contrast factor in [0.85, 1.15] and a brightness shift of up to +-12 grey levels. The
    draw is a pure function of the record's source id and `seed`, so a rerun encodes the same copy.
    """
    import hashlib

    import cv2

    digest = hashlib.sha256(f"{record.source}:{seed}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    angle = float(rng.uniform(*degrees) * rng.choice((-1.0, 1.0)))
    gamma, contrast, shift = rng.uniform(0.7, 1.4), rng.uniform(0.85, 1.15), rng.uniform(-12, 12)
    h, w = record.image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
    image = cv2.warpAffine(record.image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    levels = 255.0 * (np.arange(256) / 255.0) ** gamma
    lut = np.clip((levels - 127.5) * contrast + 127.5 + shift, 0, 255).astype(np.uint8)
    image = lut[image]
    targets = []
    for name, mask in record.targets:
        moved = cv2.warpAffine(mask.astype(np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST, borderValue=0) > 0
        if moved.any():
            targets.append((name, moved))
    return ImageRecord(f"{record.source}:aug{seed}", record.modality, np.ascontiguousarray(image), targets)
