"""Weights files: locating, checksumming and loading state dicts strictly and without running pickled code.

A checkpoint is data, not code. `torch.load(weights_only=True)` refuses arbitrary globals; the SAM-UNet authors'
format (`{'model': state_dict, 'optimizer': <pickled torch.optim.Adam>}`) is read by substituting an inert
placeholder for the optimizer class, so nothing of the optimizer's (or anyone's) code runs. Only a user who passes
`trust=True` gets a full unpickle.
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from samunet_core.errors import CheckpointError

_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()

# Optimizer classes a training checkpoint may carry beside its weights; read as inert placeholders.
_OPTIMIZER_GLOBALS = [
    f"torch.optim.{module}.{cls}"
    for module, cls in [("adam", "Adam"), ("adamw", "AdamW"), ("sgd", "SGD"), ("lr_scheduler", "MultiStepLR")]
]


class InertPickledObject:
    """Stands in for a pickled object (e.g. an optimizer) that a weights file carries but we never need."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, memoised per (path, size, mtime) so repeated checks are free."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = value
    return value


def verify_sha256(path: str | os.PathLike, expected: str) -> str:
    """Raise CheckpointError unless the file's sha256 equals `expected`; returns the digest."""
    actual = sha256_of_file(path)
    if actual != expected:
        raise CheckpointError(
            f"checksum mismatch for {path}: sha256 {actual}, expected {expected}. The file is corrupt or is not the "
            "release this model was registered with; reinstall it (see `samunet models`)."
        )
    return actual


def read_state_dict(path: str | os.PathLike, *, trust: bool = False) -> dict[str, Any]:
    """Read a weights file into a flat {name: tensor} dict on the CPU.

    Accepts a plain state dict, `{'model': state_dict, ...}` (the SAM-UNet authors' format) or
    `{'state_dict': ...}`. Without `trust`, no pickled code is executed.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Give the path of an existing .pth/.pt file.")
    if not zipfile.is_zipfile(path) and path.stat().st_size < 64:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (too small to hold weights).")
    try:
        if trust:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            substitutes = [(InertPickledObject, name) for name in _OPTIMIZER_GLOBALS]
            # Plain containers an optimizer's state is made of; they construct data and run nothing else.
            with torch.serialization.safe_globals([*substitutes, collections.defaultdict, dict]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} contains pickled objects that are not weights ({_first_line(exc)}). It was not loaded, because "
            "unpickling can run arbitrary code. If you trust the file's origin, pass --trust-checkpoint "
            "(trust=True)."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): "
                              f"{_first_line(exc)}") from exc
    return _extract_state_dict(obj, path)


def _extract_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    import torch

    if isinstance(obj, Mapping):
        for wrapper_key in ("model", "state_dict"):
            inner = obj.get(wrapper_key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} holds no state dict of tensors (found {type(obj).__name__}). Expected a state dict, or a dict "
            "with the weights under 'model' or 'state_dict'."
        )
    return {str(k): v for k, v in obj.items()}


def load_strict(module: Any, state_dict: Mapping[str, Any], *, source: str) -> None:
    """Load `state_dict` into `module` strictly; a mismatch lists missing/unexpected keys and shape conflicts."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"{source} does not fit the {type(module).__name__} architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape keys). Is it a "
            f"checkpoint of another model?{_listing('missing', missing)}{_listing('unexpected', unexpected)}"
            f"{_listing('wrong shape', wrong_shape)}"
        )
    module.load_state_dict(state_dict, strict=True)


def _listing(title: str, keys: list[str], limit: int = 12) -> str:
    if not keys:
        return ""
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {title}: " + ", ".join(keys[:limit]) + more


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    found = re.search(r"GLOBAL (\S+)", text)  # torch's weights-only refusal names the offending global
    if found:
        return f"it refers to {found.group(1)}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
