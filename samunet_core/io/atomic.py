"""Atomic file writes: write to a temporary file in the destination folder, then os.replace it into place."""

from __future__ import annotations

import glob
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from samunet_core.errors import InputError

_TOKEN_BYTES = 4  # the random part of a temporary file's name: 8 hex digits
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


def _partial_name(final: Path, token: str) -> str:
    suffix = full_suffix(final)
    return f".{final.name[: len(final.name) - len(suffix)]}.{token}.partial{suffix}"


def partial_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files of unfinished writes of `path` (left only by a process killed while writing)."""
    final = Path(path)
    if not final.parent.is_dir():
        return []
    head, tail = _partial_name(final, "\0").split("\0")
    pattern = glob.escape(head) + "?" * 2 * _TOKEN_BYTES + glob.escape(tail)
    return sorted(p for p in final.parent.glob(pattern) if p.is_file())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffix); on success it replaces `path`, on ANY exception
    (KeyboardInterrupt included) it is removed and `path` is left as it was."""
    final = check_writable(path)
    tmp = final.parent / _partial_name(final, secrets.token_hex(_TOKEN_BYTES))
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
