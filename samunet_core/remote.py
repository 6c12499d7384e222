"""The client of `samunet serve`: `RemoteClient` (health, upload) and `RemoteSession`, a slice decoder with the local
VolumeSession's interface (`predict(k, **prompts) -> Prediction`, `decode_key`, `stats`, `close`), so the prompt
policy, propagation and `samunet segment --server` run unchanged against a server.

Only prompts and compact masks travel (serve/protocol.py); the previous click's logits stay on the server and are
named by a `RemoteLogits` handle, which the prompt policy passes back as `mask_input` exactly like local logits.
If the server lost the session (restarted, expired), the session uploads the volume again once and says so.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from samunet_core.errors import InputError, SamunetError
from samunet_core.predictor import Prediction
from samunet_core.serve.protocol import API_PREFIX, PROTOCOL_VERSION, decode_mask


def read_token(path: str | None) -> str | None:
    """The bearer token in the file `path` (surrounding whitespace dropped), or None without a file."""
    from pathlib import Path

    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise InputError(f"token file {path} does not exist; give the file the server's token was written to")
    token = file.read_text(encoding="utf-8").strip()
    if not token:
        raise InputError(f"token file {path} is empty")
    return token


def _loopback_url(url: str) -> bool:
    from urllib.parse import urlparse

    from samunet_core.serve.protocol import is_loopback

    return is_loopback(urlparse(url).hostname or "")


class RemoteError(SamunetError):
    """The server answered with an error (the message is the server's)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server error {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class RemoteLogits:
    """Rows of one server-side logits array, as `Prediction.logits` of a RemoteSession (sliceable like an array)."""

    logits_id: str
    rows: tuple[int, ...]

    def __getitem__(self, index: slice) -> RemoteLogits:
        return RemoteLogits(self.logits_id, tuple(self.rows[index]))

    def __len__(self) -> int:
        return len(self.rows)


class RemoteClient:
    """A server at `url` (http://host:port) with a bearer `token` (None for a server run with --insecure-no-auth)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 120.0, ca_file: str | None = None
                 ) -> None:
        """ca_file: a PEM certificate (or bundle) to trust for an https:// server with its own certificate
        (default: the system's trusted certificates; also $SAMUNET_CA_FILE)."""
        import os
        import ssl

        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        ca_file = ca_file or os.environ.get("SAMUNET_CA_FILE")
        self._ssl = ssl.create_default_context(cafile=ca_file) if self.url.startswith("https://") else None
        if self.token and self.url.startswith("http://") and not _loopback_url(self.url):
            warnings.warn(f"the token goes to {self.url} unencrypted; serve HTTPS (--ssl-certfile) or use a TLS "
                          "proxy for anything beyond this computer", RuntimeWarning, stacklevel=2)
        self.info = self.check()
        # what `samunet segment` reports about the model it used
        self.model_id = self.info["model"]
        self.device = f"{self.info['device']} at {self.url}"
        self.runtime = self.info["runtime"]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
                ) -> dict[str, Any]:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + API_PREFIX + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("detail", exc.reason)
            except ValueError:
                message = str(exc.reason)
            raise RemoteError(exc.code, str(message)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(0, f"cannot reach {self.url} ({reason}); is `samunet serve` running there?") from None

    def post_json(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def check(self) -> dict[str, Any]:
        """The server's health document; InputError when it speaks another protocol version."""
        info = self.request("GET", "/health")
        if info.get("protocol") != PROTOCOL_VERSION:
            raise InputError(f"the server at {self.url} speaks protocol {info.get('protocol')} (engine "
                             f"{info.get('engine')}), this client speaks {PROTOCOL_VERSION}: install the same "
                             f"samunet version on both sides (server engine {info.get('engine')})")
        return info

    def upload(self, slices: np.ndarray, axis: str) -> dict[str, Any]:
        """S x H x W[x3] uint8 slices as the model sees them -> the server's session document."""
        slices = np.ascontiguousarray(slices, dtype=np.uint8)
        headers = {"X-Shape": ",".join(map(str, slices.shape)), "X-Axis": axis,
                   "Content-Type": "application/octet-stream"}
        body = zlib.compress(slices.tobytes(), 1)
        limit = self.info.get("max_upload_bytes")
        if limit is not None and len(body) > limit:
            raise InputError(f"the volume compresses to {len(body)} bytes, over the server's upload limit of {limit} "
                             "(its --max-upload-mb); ask for a larger limit or compute on this computer")
        return self.request("POST", "/sessions", body, headers)

    def open_session(self, slices: Any, volume_key: str, axis: str = "axial", n_slices: int | None = None,
                     prefetch_radius: int = 0) -> RemoteSession:
        """slices: S x H x W[x3] uint8, or a function k -> slice with `n_slices` (read when first needed)."""
        return RemoteSession(self, slices, volume_key, axis, prefetch=prefetch_radius, n_slices=n_slices)


@dataclass
class RemoteStats:
    encodes: int = 0
    requests: int = 0
    reuploads: int = 0
    round_trip_ms: list[float] = field(default_factory=list)


class RemoteSession:
    """A volume on the server; a SliceDecoder for interaction.py and propagate.py, and for the Slicer controller
    (`run(fn)` and `prefetch(k)` as VolumeSession has them, on one worker thread of this client).

    slices: S x H x W[x3] uint8, or a function k -> slice with n_slices; a function is read, and the volume uploaded,
    on the first request (on the worker thread when that request comes through `run`).
    """

    def __init__(self, client: RemoteClient, slices: Any, volume_key: str, axis: str = "axial",
                 prefetch: int = 0, n_slices: int | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.client = client
        self._source = slices
        self.volume_key = volume_key
        self.axis = axis
        self.prefetch_radius = prefetch
        if callable(slices):
            if n_slices is None:
                raise InputError("a function of slices needs n_slices")
            self.n_slices = int(n_slices)
            self.slices: np.ndarray | None = None
        else:
            self.slices = np.asarray(slices)
            self.n_slices = int(self.slices.shape[0])
        self.stats = RemoteStats()
        self._id: str | None = None
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="samunet-remote")
        if self.slices is not None:
            self._upload()

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(int(v) for v in self._volume().shape[1:3])

    def _volume(self) -> np.ndarray:
        if self.slices is None:
            self.slices = np.stack([np.asarray(self._source(k)) for k in range(self.n_slices)])
        return self.slices

    def _upload(self) -> str:
        self._id = self.client.upload(self._volume(), self.axis)["session"]
        return self._id

    @property
    def id(self) -> str:
        with self._lock:
            return self._id if self._id is not None else self._upload()

    def run(self, fn: Any) -> Any:
        """Future of fn(self), run on this session's worker thread (off a GUI thread)."""
        return self._worker.submit(fn, self)

    def prefetch(self, center: int, radius: int | None = None) -> None:
        """Ask the server to encode the neighbours of `center` ahead of time (never blocks the caller)."""
        radius = self.prefetch_radius if radius is None else radius
        if radius > 0 and 0 <= int(center) < self.n_slices:
            self._worker.submit(self.client.post_json, f"/sessions/{self.id}/prefetch",
                                {"slice": int(center), "radius": int(radius)})

    def decode_key(self, k: int) -> tuple[str, str, str, str]:
        return (self.client.info["model"], self.client.info["encoder_id"], self.volume_key, f"{self.axis}:{k}")

    def predict(self, k: int, points: Any = None, labels: Any = None, boxes: Any = None, mask_input: Any = None,
                return_masks: bool = True) -> Prediction:
        """Prompts on slice k (slice pixels, as Predictor.predict) -> Prediction (logits: a RemoteLogits)."""
        import time

        if not 0 <= int(k) < self.n_slices:
            raise InputError(f"slice {k} is outside the volume (0..{self.n_slices - 1} along {self.axis})")
        payload: dict[str, Any] = {"slice": int(k), "prefetch": self.prefetch_radius}
        if points is not None:
            payload["points"] = np.asarray(points, float).reshape(-1, 2).tolist()
            payload["labels"] = np.asarray(labels, int).reshape(-1).tolist() if labels is not None else None
        if boxes is not None:
            payload["boxes"] = np.asarray(boxes, float).reshape(-1, 4).tolist()
        if mask_input is not None:
            if not isinstance(mask_input, RemoteLogits):
                raise InputError("a RemoteSession takes as mask_input only the logits of its own earlier answers")
            payload["mask_input_id"], payload["mask_input_rows"] = mask_input.logits_id, list(mask_input.rows)
        t0 = time.perf_counter()
        try:
            answer = self.client.post_json(f"/sessions/{self.id}/predict", payload)
        except RemoteError as exc:
            if exc.status != 404 or mask_input is not None:
                raise
            warnings.warn(f"the server lost session {self.id} (restarted or expired); uploading the volume again",
                          RuntimeWarning, stacklevel=2)
            with self._lock:
                self._upload()
            self.stats.reuploads += 1
            answer = self.client.post_json(f"/sessions/{self.id}/predict", payload)
        self.stats.round_trip_ms.append((time.perf_counter() - t0) * 1e3)
        self.stats.requests += 1
        self.stats.encodes += int(answer["encoded"])
        masks = np.stack([decode_mask(m, self.slice_shape) for m in answer["masks"]])
        logits = RemoteLogits(answer["logits_id"], tuple(range(len(masks))))
        return Prediction(masks, logits, np.asarray(answer["scores"], np.float32))

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self._id is None:
            return
        try:
            self.client.request("DELETE", f"/sessions/{self._id}")
        except RemoteError:
            pass  # already gone (expired or the server restarted): nothing to close

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
