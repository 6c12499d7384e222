"""Save and load only what training changed, in fp16: the prompt encoder and mask decoder for litemedsam_clicks
(a few MB); every part but the frozen TinyViT for samunet_tinyvit (`FAMILY_PREFIXES`; the CNN branch makes it ~53 MB).

File format (torch.save, loadable with weights_only=True): {"format": "samunet-delta-v1", "base_sha256": hex,
"prefixes": [...], "state_dict": {key: fp16 tensor}, "metadata": {...}}. At load time the tensors are cast to the
model's own dtype and loaded strictly for exactly the keys under `prefixes` (the file's own list).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from samunet_core.errors import CheckpointError

DELTA_FORMAT = "samunet-delta-v1"
TRAINED_PREFIXES = ("prompt_encoder.", "mask_decoder.")
# The state-dict prefixes a family's delta holds. samunet_tinyvit keeps SAM's prompt encoder and decoder in its delta
# even where they are frozen, so the file does not depend on which litemedsam_clicks version it started from.
FAMILY_PREFIXES: dict[str, tuple[str, ...]] = {
    "litemedsam_clicks": TRAINED_PREFIXES,
    "samunet_tinyvit": ("prompt_encoder.", "mask_decoder.", "cnn.", "adapters_in.", "adapters_bridge.",
                        "embedding_encoder.", "hq_decoder.", "adapters_inside."),
}


def trained_state(model: Any, prefixes: tuple[str, ...] = TRAINED_PREFIXES) -> dict[str, Any]:
    """{key: tensor} of the model's state under `prefixes` (detached, CPU)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def save_delta(model: Any, path: str | os.PathLike, base_sha256: str, metadata: dict[str, Any],
               prefixes: tuple[str, ...] = TRAINED_PREFIXES) -> str:
    """Write `model`'s tensors under `prefixes` (default: prompt encoder + mask decoder) in fp16 to `path`
    atomically; returns its sha256."""
    import json

    import torch

    from samunet_core.checkpoints import sha256_of_file

    metadata = json.loads(json.dumps(metadata, default=str))  # plain types only: the file must load weights_only
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in trained_state(model, prefixes).items()}
    blob = {"format": DELTA_FORMAT, "base_sha256": base_sha256, "prefixes": list(prefixes),
            "state_dict": state, "metadata": metadata}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shipped weights file must be readable by everyone
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return sha256_of_file(path)


def read_delta(path: str | os.PathLike) -> dict[str, Any]:
    """The delta file's dict (format checked); no pickled code runs (weights_only)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"delta weights file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"{path} is not a readable delta weights file (corrupt?): {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != DELTA_FORMAT or "state_dict" not in blob:
        raise CheckpointError(f"{path} is not a {DELTA_FORMAT} file (a prompt encoder + mask decoder delta); "
                              "full checkpoints load with --checkpoint instead")
    return blob


def apply_delta(model: Any, blob: dict[str, Any], source: str) -> int:
    """Overwrite the model's tensors under the delta's prefixes, strictly (every such key, no other); returns count."""
    prefixes = tuple(blob["prefixes"])
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    delta = blob["state_dict"]
    missing, unexpected = sorted(set(own) - set(delta)), sorted(set(delta) - set(own))
    wrong = sorted(k for k in set(own) & set(delta) if tuple(own[k].shape) != tuple(delta[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(f"{source} does not fit this model's {', '.join(prefixes)} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(wrong)} wrong-shape keys: "
                              f"{(missing + unexpected + wrong)[:6]})")
    merged = model.state_dict()
    for key, value in delta.items():
        merged[key] = value.to(own[key].dtype)
    model.load_state_dict(merged, strict=True)
    return len(delta)
