"""Atomic file writes: write to a temporary file in the destination folder, then os.replace it into place."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from samunet_core.errors import InputError

_MULTI_SUFFIXES = (".seg.nrrd", ".nii.gz", ".seg.nii.gz")


def full_suffix(path: str | os.PathLike) -> str:
    """'.seg.nrrd', '.nii.gz' or the plain suffix: writers pick their format from it."""
    name = Path(path).name.lower()
    for suffix in sorted(_MULTI_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return Path(path).name[-len(suffix) :]
    return Path(path).suffix


def check_writable(path: str | os.PathLike) -> Path:
    """Raise InputError unless `path` can be created: its folder exists and is writable, and it is not a folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"output {path} is a folder; give a file name such as {path / 'segmentation.seg.nrrd'}")
    if not folder.is_dir():
        raise InputError(f"output folder {folder} does not exist; create it first or choose another output path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"output folder {folder} is not writable; choose another output path")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffix); on success it replaces `path`, on ANY exception
    (KeyboardInterrupt included) it is removed and `path` is left as it was."""
    final = check_writable(path)
    suffix = full_suffix(final)
    tmp = final.parent / f".{final.name[: len(final.name) - len(suffix)]}.{secrets.token_hex(4)}.partial{suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"the writer produced no file at {tmp}")
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
