"""How an image encoder runs: eager torch, or an exported model run by OpenVINO or ONNX Runtime.

An export is built once per (model, weights sha256, encoder source code, runtime and its version) and cached on disk
under `<cache root>/exports/`; its manifest (`export.json`) records every file's sha256, so a damaged or partly written
export is detected when it is opened and rebuilt, never served. Eager torch is the reference and the fallback.

Runtimes (measured on this project's 2-core Xeon, 2 threads; README's speed table comes from `samunet bench`):
- torch: eager PyTorch, fp32 (or the predictor's autocast precision). Pre-emptible between encoder submodules.
- openvino: the encoder converted with `openvino.convert_model`, fp32 inference; equal to eager within fp32 rounding.
- openvino-bf16: the same export with OpenVINO's bf16 inference precision (AMX / AVX512-BF16 CPUs); lossy: its
  embeddings are cached under their own encoder id and it is chosen by `auto` only where the Dice check holds.
- onnxruntime: the encoder exported to ONNX (opset 17), ONNX Runtime's CPU provider, fp32.
Exported runtimes are pre-empted by cancelling the running inference (OpenVINO: InferRequest.cancel, ONNX Runtime:
RunOptions.terminate), so a prefetch still yields to the slice the user asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samunet_core.checkpoints import sha256_of_file
from samunet_core.errors import InputError

EXPORT_FORMAT_VERSION = 1
# An fp32 export differs from eager torch only by the order of floating-point operations: measured max |difference|
# 4e-6 (embedding, values up to ~1) and 4e-5 (msf, values up to ~20), i.e. at most 4e-6 of an output's largest
# magnitude. 1e-4 of it is 25x above that and far below what a wrong graph or silently reduced precision gives (bf16:
# 3.6e-2), so a build whose check exceeds it is refused.
FP32_PARITY_TOLERANCE = 1e-4


def relative_max_difference(produced: Any, reference: Any) -> float:
    """max |produced - reference| / max |reference| (arrays or tensors of one output)."""
    produced, reference = np.asarray(produced, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(produced - reference).max() / max(np.abs(reference).max(), 1e-12))


class EncodeAborted(Exception):
    """An encode was pre-empted (a more urgent slice was asked for); nothing was produced."""


class ExportError(RuntimeError):
    """An export could not be built or does not match eager torch."""


@dataclass(frozen=True)
class RuntimeSpec:
    """name: what --runtime takes; backend: the library; precision: fp32 or bf16; exact: equal to eager torch
    within fp32 rounding (embeddings may share the eager cache)."""

    name: str
    backend: str
    precision: str
    exact: bool
    description: str


RUNTIMES: dict[str, RuntimeSpec] = {spec.name: spec for spec in (
    RuntimeSpec("torch", "torch", "fp32", True, "eager PyTorch (reference, always available)"),
    RuntimeSpec("openvino", "openvino", "fp32", True, "OpenVINO, fp32 inference"),
    RuntimeSpec("openvino-bf16", "openvino", "bf16", False, "OpenVINO, bf16 inference precision (lossy; Dice-checked)"),
    RuntimeSpec("onnxruntime", "onnxruntime", "fp32", True, "ONNX Runtime CPU provider, fp32"),
)}
RUNTIME_CHOICES = ("auto", *RUNTIMES)
EXPORTABLE_FAMILIES = ("litemedsam", "samunet_tinyvit")


def runtime_help() -> str:
    """The --runtime help text every front end shows."""
    return ("encoder runtime: auto (the fastest exact-enough one here: " + describe_auto() + "), "
            + ", ".join(RUNTIMES) + " (default: auto)")


def backend_version(backend: str) -> str | None:
    """Installed version of a runtime library, or None when it is not installed (nothing is imported)."""
    from importlib import metadata

    distribution = {"torch": "torch", "openvino": "openvino", "onnxruntime": "onnxruntime"}[backend]
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AMX-BF16 or AVX512-BF16): only there is bf16 inference faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# The Dice check (box protocol over ../shared/data/manifest.json, see docs/speed.md): runtimes whose mean |Dice change|
# against eager torch exceeded 0.001 are never picked by auto. Measured values live in docs/speed.md.
DICE_CHECK_PASSED = {"openvino": True, "onnxruntime": True, "openvino-bf16": False}


def auto_order(device: str) -> list[str]:
    """The runtimes `auto` tries, fastest first, on `device` ('cpu' or 'cuda...')."""
    if not device.startswith("cpu"):
        return ["torch"]  # exports here are CPU exports; on a GPU eager torch (batched) is the fast path
    order = []
    if cpu_has_native_bf16() and DICE_CHECK_PASSED["openvino-bf16"]:
        order.append("openvino-bf16")
    order += ["openvino", "onnxruntime", "torch"]
    return [name for name in order if DICE_CHECK_PASSED.get(name, True)]


def describe_auto(device: str = "cpu") -> str:
    usable = [n for n in auto_order(device) if backend_version(RUNTIMES[n].backend) is not None]
    return " > ".join(usable)


def resolve_runtime(name: str, device: str, family: str) -> str:
    """'auto' -> the first usable runtime of `auto_order`; an explicit name is checked (installed, CPU device,
    exportable family) and InputError says what to do otherwise."""
    if name == "auto":
        for candidate in auto_order(device):
            if candidate == "torch" or (family in EXPORTABLE_FAMILIES
                                        and backend_version(RUNTIMES[candidate].backend) is not None):
                return candidate
        return "torch"
    if name not in RUNTIMES:
        raise InputError(f"unknown runtime '{name}'; use one of: {', '.join(RUNTIME_CHOICES)}")
    spec = RUNTIMES[name]
    if spec.backend == "torch":
        return name
    if backend_version(spec.backend) is None:
        raise InputError(f"runtime '{name}' needs the '{spec.backend}' package: pip install {spec.backend} "
                         "(or use --runtime torch)")
    if not device.startswith("cpu"):
        raise InputError(f"runtime '{name}' runs on the CPU; use --device cpu, or --runtime torch on '{device}'")
    if family not in EXPORTABLE_FAMILIES:
        raise InputError(f"runtime '{name}' supports the {', '.join(EXPORTABLE_FAMILIES)} families, not '{family}'; "
                         "use --runtime torch")
    return name


# -- the graph that is exported -------------------------------------------------------------------------------------
def encoder_graph(encode: Callable[[Any], dict[str, Any]], model: Any, outputs: Sequence[str]) -> Any:
    """An nn.Module: Bx3x256x256 float model input -> tuple of the encoder's outputs in `outputs` order."""
    import torch

    class EncoderGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            produced = encode(x)
            return tuple(produced[name] for name in outputs)

    return EncoderGraph().eval()


def parity_input(batch: int = 1) -> np.ndarray:
    """Bx3x256x256 float32 in [0, 1]: a smooth deterministic image with a zero-padded strip, as model inputs look."""
    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 255.0
    image = 0.5 + 0.25 * np.sin(6.0 * xx) * np.cos(4.0 * yy) + 0.2 * xx * yy
    image[200:] = 0.0  # the padding below a non-square slice
    x = np.repeat(np.clip(image, 0, 1)[None, None], 3, axis=1)
    return np.ascontiguousarray(np.repeat(x, batch, axis=0))


def encoder_source_digest() -> str:
    """sha256 over the source of everything that defines an encoder's graph: a code change invalidates exports even
    when the weights file is unchanged."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted((root / "modeling").glob("*.py")) + [root / "model_input.py"]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def state_sha256(module: Any) -> str:
    """sha256 over a module's state (names, dtypes, shapes, bytes): the weights an export was made from, whichever
    files they came from (a base checkpoint plus a delta, a user checkpoint)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ExportKey:
    """What an export depends on. Its directory name holds all of it, so a change of any part is a cache miss."""

    model_name: str
    weights_sha256: str
    backend: str
    backend_version: str
    torch_version: str
    code_sha256: str

    def folder(self, root: Path) -> Path:
        safe = self.model_name.replace("/", "_")
        tag = f"{self.weights_sha256[:16]}-code{self.code_sha256[:12]}-{self.backend}{self.backend_version}-" \
              f"torch{self.torch_version}-v{EXPORT_FORMAT_VERSION}"
        return root / safe / tag.replace("+", "_")


class ExportStore:
    """Exported encoders on disk: `<root>/<model>/<key tag>/` holding the model files and export.json."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def valid(self, folder: Path) -> dict[str, Any] | None:
        """The folder's manifest if every file it lists is present with its recorded sha256, else None."""
        try:
            manifest = json.loads((folder / "export.json").read_text(encoding="utf-8"))
            files = manifest["files"]
            for name, sha in files.items():
                if sha256_of_file(folder / name) != sha:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return manifest

    def get_or_build(self, key: ExportKey, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
        """The valid export for `key`, building it when missing or damaged. `build(tmp_folder)` writes the model
        files into tmp_folder and returns extra manifest fields. The folder appears complete or not at all."""
        folder = key.folder(self.root)
        manifest = self.valid(folder)
        if manifest is not None:
            return folder, manifest
        if folder.exists():
            warnings.warn(f"the cached export {folder} is damaged or incomplete; rebuilding it", RuntimeWarning,
                          stacklevel=3)
            shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.{os.getpid()}.{threading.get_ident()}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            t0 = time.perf_counter()
            extra = build(tmp)
            files = {p.name: sha256_of_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"format": EXPORT_FORMAT_VERSION, **key.__dict__, "files": files,
                        "build_s": round(time.perf_counter() - t0, 2), **extra}
            (tmp / "export.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same export first: use theirs if it is valid
                if self.valid(folder) is None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest = self.valid(folder)
        if manifest is None:
            raise ExportError(f"the export written to {folder} does not verify; check the disk and retry")
        return folder, manifest


def default_export_root() -> Path:
    from samunet_core.segment import default_cache_dir

    return default_cache_dir() / "exports"


# -- encoders -----------------------------------------------------------------------------------------------------
class TorchEncoder:
    """Eager torch. `encode` checks `should_abort` before every encoder submodule (hooks installed once)."""

    name = "torch"

    def __init__(self, encode: Callable[[Any], dict[str, Any]], image_encoder: Any, autocast: Callable[[], Any]
                 ) -> None:
        self._encode = encode
        self._autocast = autocast
        self._abort = threading.local()

        def check(_module: Any, _inputs: Any) -> None:
            should_abort = getattr(self._abort, "fn", None)
            if should_abort is not None and should_abort():
                raise EncodeAborted()

        for module in image_encoder.modules():
            module.register_forward_pre_hook(check)
        self.build_s = 0.0
        self.info: dict[str, Any] = {}

    def __call__(self, x: Any, should_abort: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Bx3x256x256 float tensor on the model's device -> {name: BxCxhxw float32 tensor}."""
        import torch

        self._abort.fn = should_abort
        try:
            with torch.inference_mode(), self._autocast():
                out = self._encode(x)
        finally:
            self._abort.fn = None
        return {k: v.float() for k, v in out.items()}


class _ExportedEncoder:
    """Shared by the exported runtimes: build or open the cached export, then run numpy in, torch out."""

    def __init__(self, spec: RuntimeSpec, key: ExportKey, store: ExportStore, graph: Any, outputs: Sequence[str],
                 threads: int) -> None:
        self.name = spec.name
        self.spec = spec
        self.outputs = list(outputs)
        self.threads = threads
        t0 = time.perf_counter()
        self.folder, self.info = store.get_or_build(key, lambda tmp: self._export_checked(graph, tmp))
        self._open(self.folder)
        self.build_s = round(time.perf_counter() - t0, 2)  # the one-off cost: export (if not cached) + compile

    def _export_checked(self, graph: Any, folder: Path) -> dict[str, Any]:
        """Export into `folder`, then check the export (fp32) against eager torch on `parity_input`."""
        import torch

        self._export(graph, folder)
        self._open(folder, precision="fp32")
        x = parity_input(2)
        with torch.inference_mode():
            reference = graph(torch.from_numpy(x))
        produced = self._run(x)
        max_abs = {name: float(np.abs(produced[i] - reference[i].numpy()).max()) for i, name in enumerate(self.outputs)}
        relative = {name: relative_max_difference(produced[i], reference[i].numpy())
                    for i, name in enumerate(self.outputs)}
        if max(relative.values()) > FP32_PARITY_TOLERANCE:
            raise ExportError(f"{self.spec.backend} export differs from eager torch by {relative} of the outputs' "
                              f"largest values (tolerance {FP32_PARITY_TOLERANCE}); use --runtime torch and report "
                              "this")
        return {"outputs": self.outputs, "parity_max_abs": max_abs, "parity_relative": relative}

    def __call__(self, x: Any, should_abort: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Bx3x256x256 float tensor (CPU) -> {name: BxCxhxw float32 tensor}."""
        import torch

        if should_abort is not None and should_abort():
            raise EncodeAborted()  # pre-empted before it started: start nothing
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        produced = self._run(array, should_abort)
        return {name: torch.from_numpy(np.ascontiguousarray(out)) for name, out in zip(self.outputs, produced,
                                                                                        strict=True)}

    def _export(self, graph: Any, folder: Path) -> None:
        raise NotImplementedError

    def _open(self, folder: Path, precision: str | None = None) -> None:
        raise NotImplementedError

    def _run(self, x: np.ndarray, should_abort: Callable[[], bool] | None = None) -> list[np.ndarray]:
        raise NotImplementedError


class OpenVINOEncoder(_ExportedEncoder):
    """`openvino.convert_model` of the encoder graph (dynamic batch), saved as IR (fp32 weights), compiled for the
    CPU at batch 1 with the runtime's inference precision and the torch thread count. Batch 1 because on the CPU
    larger batches were measured no faster per slice, and a static shape lets OpenVINO plan its buffers: 410 MB
    resident against 550 MB for the dynamic-batch compile. A batch of B slices runs as B inferences."""

    def _export(self, graph: Any, folder: Path) -> None:
        import openvino as ov
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            converted = ov.convert_model(graph, example_input=torch.from_numpy(parity_input(1)),
                                         input=[ov.PartialShape([-1, 3, 256, 256])])
        ov.save_model(converted, str(folder / "encoder.xml"), compress_to_fp16=False)

    def _open(self, folder: Path, precision: str | None = None) -> None:
        import openvino as ov

        hint = {"fp32": "f32", "bf16": "bf16"}[precision or self.spec.precision]
        core = ov.Core()
        model = core.read_model(str(folder / "encoder.xml"))
        model.reshape([1, 3, 256, 256])
        # No CPU pinning: OpenVINO pins its threads to the first cores, so two encoders in two processes (two batch
        # workers on one machine) ran on the same core at half speed each (1,297 against 633 ms per slice, measured).
        compiled = core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False})
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def _run(self, x: np.ndarray, should_abort: Callable[[], bool] | None = None) -> list[np.ndarray]:
        rows = [self._run_one(x[i:i + 1], should_abort) for i in range(x.shape[0])]
        return [np.concatenate([row[n] for row in rows]) if len(rows) > 1 else rows[0][n]
                for n in range(len(self.outputs))]

    def _run_one(self, x: np.ndarray, should_abort: Callable[[], bool] | None) -> list[np.ndarray]:
        with self._lock:
            request = self._request
            request.start_async({0: np.ascontiguousarray(x)})
            while not request.wait_for(5):
                if should_abort is not None and should_abort():
                    request.cancel()
                    try:
                        request.wait()
                    except RuntimeError:
                        pass  # "Infer Request was canceled": expected
                    raise EncodeAborted()
            return [np.array(request.get_output_tensor(i).data) for i in range(len(self.outputs))]


class ONNXRuntimeEncoder(_ExportedEncoder):
    """`torch.onnx.export` (opset 17, dynamic batch) run by ONNX Runtime's CPU provider, all graph optimisations."""

    def _export(self, graph: Any, folder: Path) -> None:
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (torch.from_numpy(parity_input(1)),), str(folder / "encoder.onnx"),
                              input_names=["x"], output_names=self.outputs, opset_version=17, dynamo=False,
                              dynamic_axes={"x": {0: "batch"}, **{n: {0: "batch"} for n in self.outputs}})

    def _open(self, folder: Path, precision: str | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(folder / "encoder.onnx"), options,
                                             providers=["CPUExecutionProvider"])

    def _run(self, x: np.ndarray, should_abort: Callable[[], bool] | None = None) -> list[np.ndarray]:
        import onnxruntime as ort

        run_options = ort.RunOptions()
        done = threading.Event()
        aborted = threading.Event()

        def watch() -> None:
            while not done.is_set():  # checks at once, then every 5 ms: a short run is still cancellable
                if should_abort():
                    aborted.set()
                    run_options.terminate = True
                    return
                done.wait(0.005)

        watcher = threading.Thread(target=watch, daemon=True) if should_abort is not None else None
        if watcher is not None:
            watcher.start()
        try:
            return self._session.run(self.outputs, {"x": x}, run_options)
        except Exception:
            if aborted.is_set():
                raise EncodeAborted() from None
            raise
        finally:
            done.set()
            if watcher is not None:
                watcher.join()


def make_encoder(runtime: str, *, model_name: str, graph: Any, outputs: Sequence[str],
                 export_root: str | os.PathLike | None = None, threads: int | None = None) -> _ExportedEncoder:
    """The exported encoder for an already resolved, non-torch `runtime`, keyed by the graph's own weights."""
    import torch

    spec = RUNTIMES[runtime]
    key = ExportKey(model_name, state_sha256(graph), spec.backend, backend_version(spec.backend) or "?",
                    torch.__version__, encoder_source_digest())
    store = ExportStore(export_root if export_root is not None else default_export_root())
    cls = {"openvino": OpenVINOEncoder, "onnxruntime": ONNXRuntimeEncoder}[spec.backend]
    return cls(spec, key, store, graph, outputs, threads or torch.get_num_threads())
