"""The volume-level job behind `samunet segment`, `samunet batch` and the Slicer Lib.

read volume -> window to 8-bit -> per-segment prompts on displayed slices -> the prompt policy
(samunet_core.interaction.segment_slices) through a VolumeSession -> masks back on the volume's own voxel grid ->
Segmentation (optionally merged into an existing one for `--edit`) -> written atomically in the format the output's
extension names.

How prompts become masks (the sequence of model calls on a slice, 3D boxes, propagation, and how a correction
combines with the existing mask) is samunet_core.interaction's policy, the same for every front end and every
`samunet eval` protocol.

Correction (`edit`): a segment whose name exists in the edited segmentation is changed only on the slices its prompts
(and, with "propagate", its walk) reach, combined with the existing mask by the segment's "mode" (default "add":
boxes and positive clicks add what the model finds, negative clicks remove their island; "remove" subtracts what the
prompts mark; "replace" overwrites). Every other segment's voxels, names and colours are kept exactly; segments not in
the file are added (mode default "replace").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core.errors import InputError
from samunet_core.propagate import DEFAULT_PARAMS, PropagationParams

OUTPUT_FORMATS = ".seg.nrrd (Slicer segmentation), .nii/.nii.gz/.nrrd (labelmap), .png (2D inputs), " \
    ".dcm (DICOM SEG, DICOM series inputs)"


def default_cache_dir() -> Path:
    """$SAMUNET_CACHE_DIR, else ~/.cache/samunet: where embeddings persist between runs."""
    env = os.environ.get("SAMUNET_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "samunet"


@dataclass
class SegmentResult:
    """What one job produced.

    segmentation: on the volume's own grid (all segments, edited or new). slice_masks: segment name -> S x H x W bool
    displayed slices along `axis` (new and edited segments only). image_u8: S x H x W[x3] uint8 the model saw.
    """

    segmentation: Any
    volume: Any
    axis: str
    window: tuple[float, float] | None
    image_u8: np.ndarray
    slice_masks: dict[str, np.ndarray]
    prompts: Any
    seconds: float = 0.0
    encodes: int = 0
    warnings: list[str] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# Output formats
# ---------------------------------------------------------------------------------------------------------------------
def output_kind(path: str | os.PathLike, volume: Any | None = None) -> str:
    """'seg.nrrd', 'labelmap', 'png' or 'dicom-seg' from the output's extension; InputError for anything else or for
    a format the input cannot have (PNG for a volume, DICOM SEG without a DICOM series)."""
    name = Path(path).name.lower()
    if name.endswith(".seg.nrrd"):
        kind = "seg.nrrd"
    elif name.endswith((".nii", ".nii.gz", ".nrrd")):
        kind = "labelmap"
    elif name.endswith(".png"):
        kind = "png"
    elif name.endswith(".dcm"):
        kind = "dicom-seg"
    else:
        raise InputError(f"output {path}: unsupported format; use one of {OUTPUT_FORMATS}")
    if volume is not None:
        if kind == "png" and not volume.is_2d:
            raise InputError(f"output {path}: a PNG mask is for 2D image inputs; {volume.path} is a volume, "
                             "write .seg.nrrd or .nii.gz")
        if kind == "dicom-seg" and volume.kind != "dicom":
            raise InputError(f"output {path}: DICOM SEG needs a DICOM series as input ({volume.path} is "
                             f"{volume.kind}); write .seg.nrrd or .nii.gz")
    return kind


def write_output(path: str | os.PathLike, segmentation: Any, volume: Any) -> Path:
    """Write `segmentation` in the format of `path`'s extension (atomic)."""
    from samunet_core.io import segmentations as segio

    kind = output_kind(path, volume)
    if kind == "seg.nrrd":
        return segio.write_seg_nrrd(path, segmentation)
    if kind == "labelmap":
        segio.write_labelmap(path, segmentation)
        return Path(path)
    if kind == "dicom-seg":
        from samunet_core.io.dicom_seg import write_dicom_seg

        return write_dicom_seg(path, segmentation, volume)
    return _write_png_labels(path, segmentation)


def _write_png_labels(path: str | os.PathLike, segmentation: Any) -> Path:
    """One segment: a 0/255 mask; several: an 8-bit label image with values 1..N in segment order."""
    from samunet_core.io.segmentations import write_png_mask

    if len(segmentation.segments) == 1:
        return write_png_mask(path, np.asarray(segmentation.segments[0].mask).reshape(
            segmentation.geometry.array_shape[1:]))
    from PIL import Image

    from samunet_core.io.atomic import atomic_path

    if len(segmentation.segments) > 255:
        raise InputError("a PNG label image holds at most 255 segments; write .seg.nrrd instead")
    labels, _ = segmentation.labelmap()
    with atomic_path(path) as tmp:
        Image.fromarray(labels.reshape(labels.shape[-2:]).astype(np.uint8), mode="L").save(tmp, format="PNG")
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------------
def window_volume(volume: Any, window: tuple[float, float] | None = None, preset: str | None = None
                  ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Volume -> (uint8 array on the own grid, the window used; None when the data was 8-bit already)."""
    from samunet_core.transforms import resolve_window, window_to_uint8

    try:
        chosen = resolve_window(volume.array, window, preset)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if chosen is None:
        return np.asarray(volume.array), None
    return window_to_uint8(volume.array, *chosen), chosen


def open_session(volume: Any, predictor: Any, axis: str = "axial", *, window: tuple[float, float] | None = None,
                 preset: str | None = None, cache: Any = None) -> tuple[Any, np.ndarray, tuple[float, float] | None]:
    """(VolumeSession over the windowed displayed slices, S x H x W[x3] uint8 slices, window used).

    The session's content key is a hash of the windowed slices, so the same volume, window and axis reuse the
    embeddings of `cache` (and of its disk store) across runs. Close the session when done.
    """
    from samunet_core.cache import EmbeddingCache, volume_key
    from samunet_core.session import VolumeSession

    frame = volume.frame(axis)
    image_u8, used_window = window_volume(volume, window, preset)
    slices = frame.volume_to_slices(image_u8)
    key = volume_key(slices, axis)
    open_remote = getattr(predictor, "open_session", None)  # a RemoteClient: the volume goes to the server once
    if open_remote is not None:
        return open_remote(slices, key, axis), slices, used_window
    session = VolumeSession(predictor, lambda k: np.ascontiguousarray(slices[k]), frame.n_slices, key,
                            cache=cache if cache is not None else EmbeddingCache(), axis=axis, prefetch_radius=0)
    return session, slices, used_window


def segment_volume(volume: Any, prompts: Any, predictor: Any, *, window: tuple[float, float] | None = None,
                   preset: str | None = None, cache: Any = None, edit: Any = None,
                   params: PropagationParams = DEFAULT_PARAMS) -> SegmentResult:
    """Segment a Volume with a PromptFile (samunet_core.prompts.read_prompt_file) -> SegmentResult.

    edit: an existing Segmentation on the volume's grid to correct (see the module doc); None for a new one.
    cache: an EmbeddingCache (with a disk_dir, reruns need no encoding); None for a fresh in-memory one.
    """
    from samunet_core.interaction import Mode, segment_slices
    from samunet_core.io.segmentations import Segment, Segmentation
    from samunet_core.prompts import resolve_prompts

    t0 = time.perf_counter()
    frame = volume.frame(prompts.axis)
    resolved = resolve_prompts(prompts, frame)
    if edit is not None and not edit.geometry.same_grid(volume.geometry):
        raise InputError(f"the segmentation to edit ({edit.geometry.describe()}) is not on the input's voxel grid "
                         f"({volume.geometry.describe()}); edit a segmentation made on this volume")
    session, slices, used_window = open_session(volume, predictor, prompts.axis, window=window, preset=preset,
                                                cache=cache)
    n_slices, slice_shape = frame.n_slices, frame.slice_shape
    warnings: list[str] = []
    slice_masks: dict[str, np.ndarray] = {}
    try:
        for seg in resolved.segments:
            existing = edit.get(seg.name) if edit is not None else None
            if existing is not None:
                old = frame.volume_to_slices(np.asarray(existing.mask, bool).reshape(volume.geometry.array_shape)
                                             if not volume.is_2d else np.asarray(existing.mask, bool).reshape(
                                                 slice_shape))
                masks = np.array(old, dtype=bool).reshape(n_slices, *slice_shape)
                mode = seg.mode or Mode.ADD
            else:
                masks = np.zeros((n_slices, *slice_shape), dtype=bool)
                mode = seg.mode or Mode.REPLACE
                if mode is Mode.REMOVE:
                    where = "the segmentation being edited" if edit is not None else "a new segmentation (no --edit)"
                    warnings.append(f"segment {seg.name!r}: mode \"remove\" but the segment is not in {where}; "
                                    "it stays empty")
            results, seg_warnings = segment_slices(session, seg, n_slices, slice_shape,
                                                   existing=masks if existing is not None else None, mode=mode,
                                                   params=params, slice_spacing_mm=frame.slice_spacing)
            warnings += seg_warnings
            for k, mask in results.items():
                masks[k] = mask
            slice_masks[seg.name] = masks
        encodes = session.stats.encodes
    finally:
        session.close()

    def own_grid(masks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(frame.slices_to_volume(masks)).reshape(volume.geometry.array_shape)

    if edit is not None:
        segments = [Segment(s.name, own_grid(slice_masks[s.name]) if s.name in slice_masks else s.mask, s.color,
                            dict(s.fields)) for s in edit.segments]
        known = set(edit.names)
    else:
        segments, known = [], set()
    for seg in resolved.segments:
        if seg.name not in known:
            segments.append(Segment(seg.name, own_grid(slice_masks[seg.name]), seg.color))
    segmentation = Segmentation(geometry=volume.geometry, segments=segments)
    return SegmentResult(segmentation, volume, prompts.axis, used_window, slices, slice_masks, resolved,
                         time.perf_counter() - t0, encodes, warnings)


# ---------------------------------------------------------------------------------------------------------------------
# File to file
# ---------------------------------------------------------------------------------------------------------------------
def load_edit(path: str | os.PathLike, volume: Any) -> Any:
    """The segmentation to correct: a .seg.nrrd / labelmap on the volume's grid, or a DICOM SEG of its series."""
    from samunet_core.io.segmentations import read_segmentation

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--edit {path} does not exist; give the segmentation to correct")
    if path.name.lower().endswith(".dcm"):
        from samunet_core.io.dicom_seg import read_dicom_seg

        return read_dicom_seg(path, volume)
    return read_segmentation(path)


@dataclass
class Job:
    """One input checked and read, ready to segment: Volume, PromptFile, output paths, Segmentation to edit."""

    volume: Any
    prompts: Any
    output: Path
    overlay: Path | None = None
    edit: Any = None


def prepare_job(input_path: str | os.PathLike, prompts_path: str | os.PathLike, output_path: str | os.PathLike,
                overlay_path: str | os.PathLike | None = None, edit_path: str | os.PathLike | None = None) -> Job:
    """Check everything the user can get wrong before any model work: output format and folder, prompt file, input
    file, prompts inside the image, the segmentation to edit. Raises InputError naming the problem."""
    from samunet_core.io.atomic import check_writable
    from samunet_core.io.volumes import read_volume
    from samunet_core.prompts import read_prompt_file, resolve_prompts

    output_kind(output_path)
    check_writable(output_path)
    if overlay_path is not None:
        if not str(overlay_path).lower().endswith(".png"):
            raise InputError(f"--overlay {overlay_path}: the overlay is a PNG picture; give a .png path")
        check_writable(overlay_path)
    prompts = read_prompt_file(prompts_path)
    volume = read_volume(input_path)
    output_kind(output_path, volume)
    resolve_prompts(prompts, volume.frame(prompts.axis))
    edit = load_edit(edit_path, volume) if edit_path is not None else None
    return Job(volume, prompts, Path(output_path), Path(overlay_path) if overlay_path is not None else None, edit)


def run_job(job: Job, predictor: Any, *, window: tuple[float, float] | None = None, preset: str | None = None,
            cache: Any = None, params: PropagationParams = DEFAULT_PARAMS) -> SegmentResult:
    """Segment a prepared job and write its output (and overlay) atomically; `result.outputs` lists the files."""
    result = segment_volume(job.volume, job.prompts, predictor, window=window, preset=preset, cache=cache,
                            edit=job.edit, params=params)
    result.outputs.append(write_output(job.output, result.segmentation, job.volume))
    if job.overlay is not None:
        from samunet_core.overlay import write_overlay

        result.outputs.append(write_overlay(job.overlay, result))
    return result
