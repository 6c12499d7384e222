"""Predictor: encode a slice once, then decode any number of prompts against it.

numpy-facing: images are HxW(x3) uint8 slices (already windowed), prompts are in slice pixels (x = column,
y = row), masks come back at the slice's own resolution. Everything the decoder needs from the image lives in an
`Embedding` (LiteMedSAM: one 256x64x64 map; SAM-UNet: a 256x16x16 map plus a 32x64x64 multi-scale feature;
SAM-UNet on TinyViT: the fused 256x64x64 map plus a 32x128x128 multi-scale feature).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from samunet_core.errors import InputError
from samunet_core.model_input import MODEL_GRID, GridMapping, LiteMedSAMInput, SAMUNetInput
from samunet_core.runtime import EncodeAborted

# Upper estimate of one slice's encoder activations and outputs on a GPU (fp32, 256x256 input).
GPU_ENCODE_BYTES_PER_SLICE = 256 * 1024**2

__all__ = ["Embedding", "EncodeAborted", "Prediction", "Predictor", "load_predictor", "resolve_device"]


@dataclass
class Embedding:
    """Everything the decoder needs for one slice.

    tensors: name -> 1xCxhxw torch tensor on the predictor's device.
    original_size: (H, W) of the slice; input_size: (h, w) of the resized slice inside the 256 grid.
    """

    model_id: str
    tensors: dict[str, Any]
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    # Derived, prompt-independent decoder state (about 14 MB a slice, twice the embedding); rebuilt on demand, kept
    # for the last SIDE_CACHE_SLICES slices decoded only (see _image_side_cache), never counted in nbytes.
    scratch: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.tensors.values()))

    @property
    def mapping(self) -> GridMapping:
        return GridMapping(self.original_size, self.input_size)

    def converted(self, dtype: Any = None, device: Any = None) -> Embedding:
        """A copy with every tensor in `dtype` and/or on `device`."""
        return Embedding(self.model_id, {k: v.to(device=device or v.device, dtype=dtype or v.dtype)
                                         for k, v in self.tensors.items()}, self.original_size, self.input_size)


@dataclass
class Prediction:
    """masks: BxHxW bool; logits: Bx1xLxL float32 model-grid logits (feed back as mask_input); scores: B."""

    masks: np.ndarray
    logits: np.ndarray
    scores: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)


class _Family:
    """How one model family is fed and read out."""

    preprocessing: Any
    logits_grid: int
    outputs: tuple[str, ...]  # the encoder's outputs, in the order an exported graph returns them

    def __init__(self, model: Any) -> None:
        self.model = model

    def encode(self, x: Any) -> dict[str, Any]:
        raise NotImplementedError

    def decode(self, embedding: Embedding, tensors: dict[str, Any], coords: Any, labels: Any, boxes: Any,
               mask_input: Any) -> tuple[Any, Any]:
        raise NotImplementedError


SIDE_CACHE_SLICES = 8  # slices that keep their decoder state: the ones being clicked on or walked through


class _SideCacheHolders:
    """Which embeddings hold a decoder state, least recently used first. Past `limit` the oldest one's state is
    dropped, so the states' memory stays bounded however many embeddings the embedding cache keeps (without this a
    full 384 MiB cache of SAM-UNet-TinyViT embeddings held 1.3 GiB, measured over a batch)."""

    def __init__(self, limit: int) -> None:
        import threading
        from collections import OrderedDict

        self.limit = limit
        self._order: OrderedDict[tuple[int, Any], Any] = OrderedDict()
        self._lock = threading.Lock()

    def touch(self, embedding: Embedding, slot: Any) -> None:
        import weakref

        key = (id(embedding), slot)
        with self._lock:
            self._order.pop(key, None)
            self._order[key] = weakref.ref(embedding)
            while len(self._order) > self.limit:
                (_, old_slot), ref = self._order.popitem(last=False)
                old = ref()
                if old is not None:
                    old.scratch.pop(old_slot, None)

    def holding(self) -> int:
        """How many live embeddings hold a decoder state now."""
        with self._lock:
            return sum(1 for (_, slot), ref in self._order.items() if ref() is not None and slot in ref().scratch)


_SIDE_CACHE_HOLDERS = _SideCacheHolders(SIDE_CACHE_SLICES)


def _image_side_cache(embedding: Embedding, model: Any, cached: Any) -> Any:
    """The decoder's prompt-independent state for this slice (`model.image_side_cache(cached)`), kept in the
    embedding's scratch while the slice is among the last SIDE_CACHE_SLICES decoded. It holds projections by THIS
    decoder's weights, so it is keyed by the model; models sharing the encoder share the embedding but not this."""
    slot = ("decoder_cache", id(model))
    side = embedding.scratch.get(slot)
    device = next(iter(cached.values())).device if isinstance(cached, dict) else cached.device
    if side is None or side.keys.device != device:
        side = embedding.scratch[slot] = model.image_side_cache(cached)
    _SIDE_CACHE_HOLDERS.touch(embedding, slot)
    return side


class _LiteMedSAMFamily(_Family):
    preprocessing = LiteMedSAMInput
    logits_grid = 256
    outputs = ("image_embedding",)

    def encode(self, x: Any) -> dict[str, Any]:
        return {"image_embedding": self.model.encode(x)}

    def decode(self, embedding, tensors, coords, labels, boxes, mask_input):
        image = tensors["image_embedding"]
        cache = _image_side_cache(embedding, self.model, image)
        logits, iou = self.model.decode_cached(image, cache, coords, labels, boxes, mask_input)
        return logits, iou[:, 0]


class _SAMUNetFamily(_Family):
    preprocessing = SAMUNetInput
    logits_grid = 64
    outputs = ("image_embeddings", "msf")

    def encode(self, x: Any) -> dict[str, Any]:
        image_embeddings, msf = self.model.encode(x)
        return {"image_embeddings": image_embeddings, "msf": msf}

    def decode(self, embedding, tensors, coords, labels, boxes, mask_input):
        import torch

        logits = self.model.decode(tensors["image_embeddings"], tensors["msf"], coords, labels, boxes, mask_input)
        return logits, torch.full((logits.shape[0],), float("nan"))


class _SAMUNetTinyViTFamily(_Family):
    """SAM-UNet on TinyViT: LiteMedSAM's input; the cache is the fused embedding + msf; logits on the 256 grid."""

    preprocessing = LiteMedSAMInput
    logits_grid = 256
    outputs = ("image_embedding", "msf")

    def encode(self, x: Any) -> dict[str, Any]:
        return self.model.encode(x)

    def decode(self, embedding, tensors, coords, labels, boxes, mask_input):
        cache = _image_side_cache(embedding, self.model, tensors)
        logits, iou = self.model.decode(tensors, coords, labels, boxes, mask_input, side_cache=cache)
        return logits, iou[:, 0]


_FAMILIES = {"litemedsam": _LiteMedSAMFamily, "samunet": _SAMUNetFamily, "samunet_tinyvit": _SAMUNetTinyViTFamily}


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; other values are checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{device}' asked for, but no CUDA GPU is available; use --device cpu or auto")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device '{device}'; use auto, cpu or cuda")
    return device


class Predictor:
    """One loaded model on one device. Thread-safe for concurrent `predict`; `encode` may be aborted cooperatively.

    runtime: how the image encoder runs (samunet_core.runtime: auto, torch, openvino, openvino-bf16, onnxruntime);
    the decoder always runs in torch. A lossy runtime's embeddings get their own encoder id (never mixed in a cache
    with exact ones).
    """

    def __init__(self, model: Any, model_id: str, family: str, device: str = "auto", precision: str = "fp32",
                 weights: Any = None, encoder_id: str | None = None, runtime: str = "torch",
                 export_root: Any = None) -> None:
        import torch

        from samunet_core import runtime as runtimes

        self.device = resolve_device(device)
        self.model_id = model_id
        # Models that share an image encoder (same weights) share embeddings: they are made and cached under this id.
        self.encoder_id = encoder_id or model_id
        self.weights = weights
        dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if precision not in dtypes:
            raise InputError(f"unknown precision '{precision}'; use fp32, bf16 or fp16")
        if precision == "fp16" and self.device == "cpu":
            raise InputError("fp16 needs a GPU; on the CPU use bf16 or fp32")
        self.precision = precision
        self._autocast_dtype = dtypes[precision]
        if self.device.startswith("cuda") and precision == "fp32":
            # PyTorch runs cuDNN convolutions in TF32 by default: ~1e-3 relative noise, enough to move where a walk
            # stops (measured: the demo CT's left lung over 8 slices on CPU, 14 on CUDA). fp32 means fp32.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model = model.to(self.device).eval()
        self.family = family
        self._family = _FAMILIES[family](self.model)
        self.preprocessing = self._family.preprocessing
        self.logits_grid = self._family.logits_grid
        self.runtime = runtimes.resolve_runtime(runtime, self.device, family)
        if self.runtime != "torch" and precision != "fp32":
            raise InputError(f"precision '{precision}' applies to the torch runtime; runtime '{self.runtime}' sets "
                             "its own (use --runtime openvino-bf16 for bf16 on the CPU)")
        self.encoder = self._make_encoder(runtime, export_root)
        if not runtimes.RUNTIMES[self.runtime].exact:
            self.encoder_id = f"{self.encoder_id}+{self.runtime}"

    def _make_encoder(self, asked: str, export_root: Any) -> Any:
        """The resolved runtime's encoder; with --runtime auto a failed export falls back to eager torch, loudly."""
        import warnings

        from samunet_core import runtime as runtimes

        torch_encoder = self.torch_encoder = runtimes.TorchEncoder(self._family.encode, self.model.image_encoder,
                                                                   self._autocast)
        if self.runtime == "torch":
            return torch_encoder
        graph = runtimes.encoder_graph(self._family.encode, self.model, self._family.outputs)
        try:
            return runtimes.make_encoder(self.runtime, model_name=self.model_id, graph=graph,
                                         outputs=self._family.outputs, export_root=export_root)
        except Exception as exc:
            if asked != "auto":
                raise
            warnings.warn(f"runtime '{self.runtime}' failed ({exc}); encoding with eager torch", RuntimeWarning,
                          stacklevel=3)
            self.runtime = "torch"
            return torch_encoder

    # -- encoding -------------------------------------------------------------------------------------------------
    def _autocast(self) -> Any:
        """Reduced-precision autocast when asked for; a no-op context in fp32 (so an outer autocast still applies)."""
        import contextlib

        import torch

        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, self._autocast_dtype)

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, GridMapping]:
        """HxW(x3) uint8 -> (256x256x3 float32 model input, grid mapping)."""
        return self.preprocessing.image_to_array(image)

    def encode(self, image: np.ndarray, should_abort: Callable[[], bool] | None = None) -> Embedding:
        """HxW or HxWx3 uint8 slice -> Embedding. Raises EncodeAborted if `should_abort()` turns true midway."""
        return self.encode_batch([image], should_abort)[0]

    def encode_batch(self, images: list[np.ndarray], should_abort: Callable[[], bool] | None = None
                     ) -> list[Embedding]:
        """B slices (HxW or HxWx3 uint8, sizes may differ) -> B Embeddings from ONE encoder pass (batch B).
        Raises EncodeAborted if `should_abort()` turns true midway; then none is produced."""
        import torch

        if not images:
            return []
        prepared = [self.prepare(image) for image in images]
        x = torch.from_numpy(np.stack([array for array, _ in prepared])).permute(0, 3, 1, 2).to(self.device)
        tensors = self.encoder(x, should_abort)

        def row(v: Any, i: int) -> Any:  # a copy when batched: a cached slice must not pin the whole batch
            return v if len(prepared) == 1 else v[i:i + 1].clone()

        return [Embedding(self.encoder_id, {k: row(v, i) for k, v in tensors.items()}, mapping.original_size,
                          mapping.input_size) for i, (_, mapping) in enumerate(prepared)]

    def suggested_batch_size(self, limit: int = 32) -> int:
        """Slices per prefetch encoder pass: 1 on the CPU (batches of 2 and 4 were measured slower per slice than
        single slices, docs/speed.md); on a GPU as many as half the free memory holds at GPU_ENCODE_BYTES_PER_SLICE
        each, at most `limit`."""
        if not self.device.startswith("cuda"):
            return 1
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(self.device))
        return int(max(1, min(limit, free // 2 // GPU_ENCODE_BYTES_PER_SLICE)))

    # -- decoding -------------------------------------------------------------------------------------------------
    def predict(self, embedding: Embedding, points: Any = None, labels: Any = None, boxes: Any = None,
                mask_input: Any = None, return_masks: bool = True) -> Prediction:
        """Decode prompts against one slice's embedding.

        points: Nx2 or BxNx2 (x, y) slice pixels; labels: N or BxN (1 positive, 0 negative);
        boxes: 4 or Bx4 (x0, y0, x1, y1) slice pixels, max inclusive; mask_input: Bx1xLxL logits of a previous
        prediction. B prompts are decoded in one call. Returns masks BxHxW bool at the slice's size.
        """
        import time

        import torch

        if embedding.model_id != self.encoder_id:
            raise InputError(f"embedding was made by encoder '{embedding.model_id}', this predictor's encoder is "
                             f"'{self.encoder_id}'")
        t0 = time.perf_counter()
        mapping = embedding.mapping
        coords_t, labels_t, boxes_t, batch = self._prompts_to_tensors(points, labels, boxes, mapping)
        mask_t = None
        if mask_input is not None:
            mask_t = torch.as_tensor(np.asarray(mask_input, np.float32), device=self.device)
            if mask_t.ndim == 3:
                mask_t = mask_t[:, None]
            if mask_t.shape[-2:] != (self.logits_grid, self.logits_grid):
                raise InputError(f"mask_input must be Bx1x{self.logits_grid}x{self.logits_grid} logits of this model,"
                                 f" got {tuple(mask_t.shape)}")
            if mask_t.shape[0] != batch:
                mask_t = mask_t.expand(batch, -1, -1, -1)
        tensors = embedding.tensors
        if next(iter(tensors.values())).device.type != torch.device(self.device).type:
            tensors = {k: v.to(self.device) for k, v in tensors.items()}
        with torch.inference_mode(), self._autocast():
            logits, scores = self._family.decode(embedding, tensors, coords_t, labels_t, boxes_t, mask_t)
        logits = logits.float()
        t1 = time.perf_counter()
        masks = self.logits_to_masks(logits, mapping) if return_masks else np.zeros((0,), bool)
        t2 = time.perf_counter()
        return Prediction(masks, logits.cpu().numpy(), scores.float().cpu().numpy(),
                          {"decode": (t1 - t0) * 1e3, "postprocess": (t2 - t1) * 1e3})

    def _prompts_to_tensors(self, points: Any, labels: Any, boxes: Any, mapping: GridMapping
                            ) -> tuple[Any, Any, Any, int]:
        import torch

        coords_t = labels_t = boxes_t = None
        batch = 1
        if boxes is not None:
            boxes_np = np.asarray(boxes, np.float64).reshape(-1, 4)
            if not np.isfinite(boxes_np).all():
                raise InputError("box coordinates must be finite numbers")
            if (boxes_np[:, 2] < boxes_np[:, 0]).any() or (boxes_np[:, 3] < boxes_np[:, 1]).any():
                raise InputError("a box needs x0 <= x1 and y0 <= y1 (x0, y0, x1, y1 in slice pixels)")
            batch = boxes_np.shape[0]
            boxes_t = torch.as_tensor(self.preprocessing.boxes_to_grid(boxes_np, mapping), device=self.device)
        if points is not None:
            pts = np.asarray(points, np.float64)
            if pts.ndim == 2:
                pts = pts[None]
            if pts.ndim != 3 or pts.shape[-1] != 2 or pts.shape[1] == 0:
                raise InputError(f"points must be Nx2 or BxNx2 (x, y), got shape {np.asarray(points).shape}")
            if labels is None:
                raise InputError("points need labels (1 positive, 0 negative), one per point")
            lab = np.asarray(labels, np.int64).reshape(pts.shape[0], -1) if np.ndim(labels) == 2 else \
                np.asarray(labels, np.int64).reshape(1, -1)
            if lab.shape[-1] != pts.shape[1]:
                raise InputError(f"{pts.shape[1]} points but {lab.shape[-1]} labels")
            if pts.shape[0] == 1 and batch > 1:
                pts, lab = np.repeat(pts, batch, 0), np.repeat(lab, batch, 0)
            elif boxes is not None and pts.shape[0] != batch:
                raise InputError(f"{pts.shape[0]} point sets for {batch} boxes")
            batch = pts.shape[0]
            coords_t = torch.as_tensor(self.preprocessing.points_to_grid(pts, mapping), device=self.device)
            labels_t = torch.as_tensor(lab, device=self.device)
        if coords_t is None and boxes_t is None:
            raise InputError("no prompt given: pass at least one point or box")
        return coords_t, labels_t, boxes_t, batch

    def logits_to_masks(self, logits: Any, mapping: GridMapping) -> np.ndarray:
        """Bx1xLxL model-grid logits -> BxHxW bool masks at the slice's size (crop the padding, bilinear, > 0)."""
        import torch.nn.functional as F

        if logits.shape[-1] != MODEL_GRID:
            logits = F.interpolate(logits, (MODEL_GRID, MODEL_GRID), mode="bilinear", align_corners=False)
        h, w = mapping.input_size
        full = F.interpolate(logits[..., :h, :w], mapping.original_size, mode="bilinear", align_corners=False)
        return (full[:, 0] > 0).cpu().numpy()


def load_predictor(name: str | None = None, device: str = "auto", checkpoint: str | None = None, *,
                   trust: bool = False, precision: str = "fp32", runtime: str = "torch", export_root: Any = None
                   ) -> Predictor:
    """Build a registry model (default: `registry.DEFAULT_MODEL`), load its weights strictly, wrap it in a Predictor."""
    from samunet_core.registry import DEFAULT_MODEL, get_spec, load_model

    name = name or DEFAULT_MODEL
    spec = get_spec(name)
    model, weights = load_model(name, checkpoint, trust=trust)
    encoder_id = spec.encoder_id
    if spec.family == "samunet_tinyvit":  # its encoder is trained: embeddings are only valid for these weights
        encoder_id = f"{name}@{weights.sha256[:16]}"
    return Predictor(model, name, spec.family, device=device, precision=precision, weights=weights,
                     encoder_id=encoder_id, runtime=runtime, export_root=export_root)
