"""Encoder runtimes (samunet_core/runtime.py): exports match eager torch, the export cache is keyed by the weights and
never serves a stale or damaged export, pre-emption cancels an exported inference, lossy runtimes keep their own cache.

Tolerance (runtime.FP32_PARITY_TOLERANCE): an fp32 export differs from eager torch only in the order of floating-point
operations. On the default model that was measured at 4e-6 (embedding) and 4e-5 (msf, values up to ~20): at most 4e-6
of an output's largest magnitude. 1e-4 of it leaves 25x headroom and is 360x below the bf16 runtime's error (3.6e-2),
so a graph that silently ran in reduced precision fails.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from conftest import dice, load_image

from samunet_core import runtime as runtimes
from samunet_core.errors import InputError
from samunet_core.predictor import EncodeAborted, load_predictor

PARITY_TOL = runtimes.FP32_PARITY_TOLERANCE


@pytest.fixture(scope="module")
def export_root(default_openvino):
    """The folder the shared OpenVINO predictor's export was built in (<root>/<model>/<key tag>)."""
    return default_openvino.encoder.folder.parents[1]


@pytest.fixture(scope="module")
def ct_slice():
    return load_image("amos_0004_75")


@pytest.fixture(scope="module")
def default_torch():
    return load_predictor(device="cpu", runtime="torch")


def _max_abs(a, b) -> dict[str, float]:
    return {k: float((a.tensors[k] - b.tensors[k]).abs().max()) for k in a.tensors}


def _relative(a, b) -> dict[str, float]:
    """Per output: max |a - b| / max |b| (b the reference)."""
    return {k: runtimes.relative_max_difference(a.tensors[k], b.tensors[k]) for k in b.tensors}


def test_openvino_export_of_the_default_model_matches_eager(default_torch, default_openvino, ct_slice):
    assert default_openvino.runtime == "openvino"
    assert default_openvino.encoder_id == default_torch.encoder_id  # exact: shares the eager embedding cache
    eager, exported = default_torch.encode(ct_slice), default_openvino.encode(ct_slice)
    assert set(exported.tensors) == {"image_embedding", "msf"}
    diffs = _relative(exported, eager)
    assert max(diffs.values()) < PARITY_TOL, diffs
    box = np.array([150, 150, 330, 300])
    a = default_torch.predict(eager, boxes=box).masks[0]
    b = default_openvino.predict(exported, boxes=box).masks[0]
    assert a.sum() > 500 and dice(a, b) > 0.999
    manifest = default_openvino.encoder.info
    assert max(manifest["parity_relative"].values()) < PARITY_TOL  # the check made when the export was built


def test_onnxruntime_export_of_litemedsam_matches_eager(litemedsam, export_root, ct_slice):
    onnx = load_predictor("litemedsam", device="cpu", runtime="onnxruntime", export_root=export_root)
    assert onnx.runtime == "onnxruntime"
    diffs = _relative(onnx.encode(ct_slice), litemedsam.encode(ct_slice))
    assert max(diffs.values()) < PARITY_TOL, diffs


def test_bf16_runtime_is_cached_apart_and_close(default_torch, export_root, ct_slice):
    bf16 = load_predictor(device="cpu", runtime="openvino-bf16", export_root=export_root)
    assert bf16.encoder_id == default_torch.encoder_id + "+openvino-bf16"
    eager, low = default_torch.encode(ct_slice), bf16.encode(ct_slice)
    rel = float((eager.tensors["image_embedding"] - low.tensors["image_embedding"]).norm()
                / eager.tensors["image_embedding"].norm())
    assert rel < 0.1  # measured 0.03: bf16, not garbage
    if runtimes.cpu_has_native_bf16():
        assert rel > 1e-4  # and truly reduced precision where the CPU has it (else OpenVINO keeps fp32)


def test_the_same_weights_reuse_their_export(default_openvino, export_root):
    again = load_predictor(device="cpu", runtime="openvino", export_root=export_root)
    assert again.encoder.folder == default_openvino.encoder.folder
    assert again.encoder.info == default_openvino.encoder.info  # not rebuilt: same manifest, same build time


def test_changed_weights_never_get_a_stale_export(default_openvino, export_root, ct_slice):
    """The same model name with different weights is a different export, and serves its own weights' output."""
    from samunet_core.predictor import Predictor
    from samunet_core.registry import get_spec, load_model

    model, weights = load_model("samunet_tinyvit")
    with torch.no_grad():  # the trained CNN branch changes, TinyViT does not
        for name, p in model.named_parameters():
            if name.startswith(("adapters_in", "adapters_bridge", "cnn")):
                p.mul_(1.5)
    family = get_spec("samunet_tinyvit").family
    changed_eager = Predictor(model, "samunet_tinyvit", family, device="cpu", weights=weights, runtime="torch")
    changed_ov = Predictor(model, "samunet_tinyvit", family, device="cpu", weights=weights, runtime="openvino",
                           export_root=export_root)
    assert changed_ov.encoder.folder != default_openvino.encoder.folder
    expected, served = changed_eager.encode(ct_slice), changed_ov.encode(ct_slice)
    assert max(_relative(served, expected).values()) < PARITY_TOL
    original = default_openvino.encode(ct_slice)
    assert max(_max_abs(original, served).values()) > 0.01  # the stale export would have served `original`


def _tiny_graph(scale: float = 1.0):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=4, padding=1)
    with torch.no_grad():
        conv.weight.mul_(scale)
    return runtimes.encoder_graph(lambda x: {"a": conv(x), "b": conv(x).mean(1, keepdim=True)}, conv, ("a", "b"))


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_a_damaged_export_is_rebuilt_not_crashed_on(tmp_path, runtime):
    graph = _tiny_graph()
    first = runtimes.make_encoder(runtime, model_name="tiny", graph=graph, outputs=("a", "b"), export_root=tmp_path)
    model_file = next(p for p in first.folder.iterdir() if p.suffix in (".bin", ".onnx"))
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])  # a half-written file
    with pytest.warns(RuntimeWarning, match="damaged or incomplete; rebuilding"):
        second = runtimes.make_encoder(runtime, model_name="tiny", graph=graph, outputs=("a", "b"),
                                       export_root=tmp_path)
    assert second.folder == first.folder
    x = torch.from_numpy(runtimes.parity_input(2))
    with torch.inference_mode():
        expected = graph(x)
    out = second(x)
    assert torch.allclose(out["a"], expected[0], atol=1e-5) and out["a"].shape == (2, 4, 64, 64)
    # a manifest that lies about a file, or no manifest at all, is a rebuild too
    manifest = json.loads((first.folder / "export.json").read_text())
    manifest["files"][model_file.name] = "0" * 64
    (first.folder / "export.json").write_text(json.dumps(manifest))
    assert runtimes.ExportStore(tmp_path).valid(first.folder) is None
    (first.folder / "export.json").unlink()
    with pytest.warns(RuntimeWarning):
        runtimes.make_encoder(runtime, model_name="tiny", graph=graph, outputs=("a", "b"), export_root=tmp_path)


def test_export_key_covers_weights_runtime_version_and_code(tmp_path):
    a, b = _tiny_graph(1.0), _tiny_graph(2.0)
    assert runtimes.state_sha256(a) != runtimes.state_sha256(b)
    assert runtimes.state_sha256(a) == runtimes.state_sha256(_tiny_graph(1.0))
    key = runtimes.ExportKey("tiny", runtimes.state_sha256(a), "openvino", "2026.4.1", torch.__version__, "c" * 64)
    folders = {key.folder(tmp_path)}
    for change in ({"weights_sha256": runtimes.state_sha256(b)}, {"backend_version": "2026.5.0"},
                   {"code_sha256": "d" * 64}, {"backend": "onnxruntime"}):
        folders.add(runtimes.ExportKey(**{**key.__dict__, **change}).folder(tmp_path))
    assert len(folders) == 5


def test_openvino_does_not_pin_threads_to_cores(default_openvino):
    """Pinned, two encoders in two processes (two batch workers) shared one core: half speed each."""
    assert default_openvino.encoder._compiled.get_property("ENABLE_CPU_PINNING") is False


def test_an_exported_encode_is_cancelled_when_pre_empted(default_openvino, ct_slice):
    x = torch.from_numpy(default_openvino.prepare(ct_slice)[0]).permute(2, 0, 1)[None]
    with pytest.raises(EncodeAborted):
        default_openvino.encoder(x, should_abort=lambda: True)
    assert default_openvino.encode(ct_slice).tensors["image_embedding"].shape == (1, 256, 64, 64)  # still usable


def test_onnxruntime_encode_is_cancelled_when_pre_empted(tmp_path):
    encoder = runtimes.make_encoder("onnxruntime", model_name="tiny", graph=_tiny_graph(), outputs=("a", "b"),
                                    export_root=tmp_path)
    big = torch.rand(256, 3, 256, 256)
    with pytest.raises(EncodeAborted):  # already pre-empted: nothing starts
        encoder(big, should_abort=lambda: True)
    calls = []

    def abort_once_running() -> bool:  # False for the check before the run, True once the run is under way
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(EncodeAborted):  # pre-empted while running: ONNX Runtime's terminate flag stops it
        encoder(big, should_abort=abort_once_running)
    assert len(calls) == 2
    assert encoder(big[:1])["a"].shape == (1, 4, 64, 64)


def test_runtime_choice_errors_say_what_to_do():
    with pytest.raises(InputError, match="runs on the CPU"):
        runtimes.resolve_runtime("openvino", "cuda", "samunet_tinyvit")
    with pytest.raises(InputError, match="use --runtime torch"):
        runtimes.resolve_runtime("onnxruntime", "cpu", "samunet")
    with pytest.raises(InputError, match="unknown runtime"):
        runtimes.resolve_runtime("tensorrt", "cpu", "litemedsam")
    assert runtimes.resolve_runtime("auto", "cuda", "samunet_tinyvit") == "torch"
    assert runtimes.resolve_runtime("auto", "cpu", "samunet") == "torch"  # not exportable: eager
    assert runtimes.resolve_runtime("auto", "cpu", "samunet_tinyvit") == runtimes.auto_order("cpu")[0]


def test_batched_encoding_equals_single_slices(default_openvino, ct_slice):
    other = np.ascontiguousarray(ct_slice[::-1])
    batch = default_openvino.encode_batch([ct_slice, other[:400]])
    singles = [default_openvino.encode(ct_slice), default_openvino.encode(other[:400])]
    for got, want in zip(batch, singles, strict=True):
        assert got.original_size == want.original_size and got.input_size == want.input_size
        assert max(_relative(got, want).values()) < PARITY_TOL
        assert got.tensors["msf"].untyped_storage().nbytes() == got.tensors["msf"].nbytes  # own copy, not a view


def test_a_session_prefetches_in_batches(default_openvino):
    from samunet_core.cache import EmbeddingCache
    from samunet_core.session import VolumeSession

    slices = [np.full((128, 128), 10 * k, np.uint8) for k in range(12)]
    calls: list[int] = []
    encode_batch = default_openvino.encode_batch

    def counting(images, should_abort=None):
        calls.append(len(images))
        return encode_batch(images, should_abort)

    default_openvino.encode_batch = counting
    try:
        with VolumeSession(default_openvino, slices=lambda k: slices[k], n_slices=12, volume_key="batch-test",
                           cache=EmbeddingCache(), encode_batch=3) as session:
            assert session.precompute(center=0) == 12
            assert max(calls) == 3 and sum(calls) == 12
            assert all(session.cached(k) is not None for k in range(12))
    finally:
        del default_openvino.encode_batch
    assert default_openvino.suggested_batch_size() == 1  # CPU: batching measured not to pay


def test_a_request_pre_empts_an_exported_prefetch(default_openvino):
    """As test_session's pre-emption test, through OpenVINO's cancel instead of torch's module hooks."""
    from samunet_core.cache import EmbeddingCache
    from samunet_core.session import VolumeSession

    started = threading.Event()
    calls: list[int] = []

    def slices(k: int) -> np.ndarray:
        calls.append(k)
        if k == 0:
            started.set()
        return load_image("s0619_32" if k % 2 else "s0114_111")

    with VolumeSession(default_openvino, slices, n_slices=5, volume_key="preempt-ov", cache=EmbeddingCache()) as s:
        s.prefetch(0, radius=0)
        assert started.wait(30)
        s.request(4).result(timeout=60)
        assert s.stats.preempted >= 1 and calls[:2] == [0, 4]
        s.request(0).result(timeout=60)
        assert calls == [0, 4, 0] and s.key(0) in s.cache


def test_precompute_does_not_pin_evicted_embeddings(default_openvino):
    """A 300-slice precompute once held every slice's future, and so every embedding (2.75 GB at 300 slices)."""
    import gc
    import weakref

    from samunet_core.cache import EmbeddingCache
    from samunet_core.session import VolumeSession

    made: list[weakref.ref] = []
    encode_batch = default_openvino.encode_batch

    def recording(images, should_abort=None):
        out = encode_batch(images, should_abort)
        made.extend(weakref.ref(e) for e in out)
        return out

    slices = [np.full((96, 96), 20 * k, np.uint8) for k in range(8)]
    per_slice = default_openvino.encode(slices[0]).nbytes
    default_openvino.encode_batch = recording
    try:
        with VolumeSession(default_openvino, slices=lambda k: slices[k], n_slices=8, volume_key="pin-test",
                           cache=EmbeddingCache(max_bytes=2 * per_slice)) as session:
            assert session.precompute() == 8
            gc.collect()
            alive = sum(ref() is not None for ref in made)
            assert len(made) == 8 and alive <= 2 + 2  # the cache's two, the session's two most recent at most
    finally:
        del default_openvino.encode_batch
