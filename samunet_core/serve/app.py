"""The HTTP server of `samunet serve` (FastAPI): volumes uploaded once, prompts in, compact masks out.

Endpoints (all under /v1, JSON unless said): GET /health (protocol, engine version, models; no token needed);
POST /sessions (body: zlib-compressed uint8 slices, headers X-Shape "S,H,W[,3]" and X-Axis) -> {"session", ...};
POST /sessions/{id}/predict {"slice", "points", "labels", "boxes", "mask_input_id", "mask_input_rows"} ->
{"masks": [{"region", "rle"}], "scores", "logits_id", "encoded"}; POST /sessions/{id}/prefetch {"slice"};
DELETE /sessions/{id}. Errors: 401 bad or missing token, 404 unknown session, 413 upload too large, 422 bad input,
429 too many requests or sessions; a fault inside is a 500 with a one-line message, never a traceback.

All model work runs on ONE worker thread per server (one device): a request's own work goes ahead of prefetches.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time.
import hmac
import itertools
import queue
import secrets
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from samunet_core.errors import InputError
from samunet_core.serve.protocol import API_PREFIX, PROTOCOL_VERSION, encode_mask

LOGITS_KEPT_PER_SESSION = 64


@dataclass
class ServeConfig:
    model: str | None = None
    device: str = "auto"
    runtime: str = "auto"
    token: str | None = None  # None only with insecure_no_auth
    insecure_no_auth: bool = False
    max_sessions: int = 16
    max_upload_bytes: int = 512 * 1024**2
    idle_timeout_s: float = 1800.0
    max_prompts: int = 64  # points + boxes in one request
    requests_per_s: float = 200.0  # per token (burst: one second's worth)
    cache_bytes: int | None = None  # the shared embedding cache (default: the engine's default cap)


class DeviceWorker:
    """One thread runs every model call, most urgent first (0: a request, 1: a prefetch)."""

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name="samunet-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], priority: int = 0) -> Future:
        future: Future = Future()
        self._queue.put((priority, next(self._seq), fn, future))
        return future

    def _run(self) -> None:
        while True:
            _, _, fn, future = self._queue.get()
            if fn is None:
                while not self._queue.empty():  # what was still queued will not run: say so to any waiter
                    pending = self._queue.get_nowait()[3]
                    pending.cancel()
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the request through the future
                future.set_exception(exc)

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the running call, drop the queued ones, end the thread (a model call must not outlive the
        interpreter: torch aborts the process)."""
        self._queue.put((-1, next(self._seq), None, Future()))
        self._thread.join(timeout)


@dataclass
class ServerSession:
    """One uploaded volume: S x H x W[x3] uint8 slices as the model sees them."""

    id: str
    slices: np.ndarray
    axis: str
    volume_key: str
    last_used: float = field(default_factory=time.monotonic)
    logits: OrderedDict = field(default_factory=OrderedDict)
    logits_seq: itertools.count = field(default_factory=itertools.count)
    cached: OrderedDict = field(default_factory=OrderedDict)  # this session's keys in the shared cache -> bytes


class ServerState:
    def __init__(self, config: ServeConfig, predictor: Any) -> None:
        from samunet_core.cache import EmbeddingCache

        self.config = config
        self.predictor = predictor
        # bounded and shared: each session may hold at most an equal share (see `embedding`)
        self.cache = EmbeddingCache(config.cache_bytes) if config.cache_bytes else EmbeddingCache()
        self.worker = DeviceWorker()
        self.sessions: dict[str, ServerSession] = {}
        self.lock = threading.Lock()
        self.buckets: dict[str, tuple[float, float]] = {}

    # -- sessions -----------------------------------------------------------------------------------------------------
    def expire_idle(self) -> None:
        now = time.monotonic()
        with self.lock:
            for sid in [s.id for s in self.sessions.values() if now - s.last_used > self.config.idle_timeout_s]:
                self._drop(sid)

    def _drop(self, sid: str) -> None:
        """Forget a session and free its share of the cache (call with the lock held)."""
        session = self.sessions.pop(sid, None)
        if session is not None:
            for key in session.cached:
                self.cache.discard(key)

    def add(self, slices: np.ndarray, axis: str) -> ServerSession:
        from samunet_core.cache import volume_key

        self.expire_idle()
        with self.lock:
            if len(self.sessions) >= self.config.max_sessions:
                raise TooMany(f"the server holds its maximum of {self.config.max_sessions} sessions; close one "
                              "(DELETE) or wait for idle ones to expire")
            session = ServerSession(secrets.token_urlsafe(12), slices, axis, volume_key(slices, axis))
            self.sessions[session.id] = session
            return session

    def get(self, sid: str) -> ServerSession:
        self.expire_idle()
        with self.lock:
            session = self.sessions.get(sid)
        if session is None:
            raise UnknownSession(f"no session {sid!r} on this server (it was closed, expired or the server "
                                 "restarted); upload the volume again")
        session.last_used = time.monotonic()
        return session

    # -- model work (on the worker thread) ------------------------------------------------------------------------
    def embedding(self, session: ServerSession, k: int) -> tuple[Any, bool]:
        key = (self.predictor.encoder_id, session.volume_key, f"{session.axis}:{k}")
        emb = self.cache.get(key)
        if emb is not None:
            return emb, False
        emb = self.predictor.encode(np.ascontiguousarray(session.slices[k]))
        # fair share: a session about to pass an equal part of the cache first gives up its own oldest slices, so
        # the shared LRU never has to evict another session's
        with self.lock:
            share = self.cache.max_bytes // max(len(self.sessions), 1)
            session.cached.pop(key, None)
            while session.cached and sum(session.cached.values()) + emb.nbytes > share:
                old, _ = session.cached.popitem(last=False)
                self.cache.discard(old)
            session.cached[key] = emb.nbytes
        self.cache.put(key, emb)
        return emb, True

    def rate_ok(self, token: str) -> bool:
        rate = self.config.requests_per_s
        now = time.monotonic()
        with self.lock:
            level, last = self.buckets.get(token, (rate, now))
            level = min(rate, level + (now - last) * rate)
            if level < 1:
                self.buckets[token] = (level, now)
                return False
            self.buckets[token] = (level - 1, now)
            return True


class TooMany(Exception):
    pass


class PrefetchBody(BaseModel):
    slice: int
    radius: int = Field(3, ge=0, le=16)


class PredictBody(BaseModel):
    """Prompts for one slice (slice pixels), as Predictor.predict takes them."""

    slice: int
    points: list[list[float]] | None = None
    labels: list[int] | None = None
    boxes: list[list[float]] | None = None
    mask_input_id: str | None = None
    mask_input_rows: list[int] | None = None
    prefetch: int = Field(0, ge=0, le=8)


class UnknownSession(Exception):
    pass


def create_app(config: ServeConfig, predictor: Any = None) -> Any:
    """The FastAPI application. predictor: a loaded Predictor (default: load config.model on config.device)."""
    import samunet_core
    from samunet_core.predictor import load_predictor
    from samunet_core.registry import DEFAULT_MODEL, model_names

    if config.token is None and not config.insecure_no_auth:
        raise InputError("a token is required (--token-file), or --insecure-no-auth on a loopback address")
    if predictor is None:
        predictor = load_predictor(config.model or DEFAULT_MODEL, device=config.device, runtime=config.runtime)
    state = ServerState(config, predictor)
    app = FastAPI(title="samunet serve", version=samunet_core.__version__)
    app.state.samunet = state

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(InputError)
    async def _input_error(_request: Any, exc: InputError) -> JSONResponse:
        return error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Any, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"malformed request: {where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(UnknownSession)
    async def _unknown(_request: Any, exc: UnknownSession) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(TooMany)
    async def _too_many(_request: Any, exc: TooMany) -> JSONResponse:
        return error(429, str(exc))

    @app.exception_handler(Exception)
    async def _fault(_request: Any, exc: Exception) -> JSONResponse:
        return error(500, f"internal error ({type(exc).__name__}); the server is still up")

    class Unauthorised(Exception):
        pass

    def authorised(request: Request) -> str:
        if config.insecure_no_auth:
            return "-"
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), config.token.encode()):
            raise Unauthorised()
        if not state.rate_ok(given):
            raise TooMany(f"more than {config.requests_per_s:g} requests per second with this token; slow down")
        return given

    @app.exception_handler(Unauthorised)
    async def _unauthorised(_request: Any, _exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "missing or wrong token: send 'Authorization: Bearer <token>' with the "
                                       "token the server was started with (--token-file)"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.get(f"{API_PREFIX}/health")
    def health() -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "engine": samunet_core.__version__, "model": predictor.model_id,
                "encoder_id": predictor.encoder_id, "device": predictor.device, "runtime": predictor.runtime,
                "models": model_names(), "sessions": len(state.sessions),
                "max_upload_bytes": config.max_upload_bytes, "max_prompts": config.max_prompts}

    @app.post(f"{API_PREFIX}/sessions")
    async def create_session(request: Request, _token: str = Depends(authorised)) -> dict[str, Any]:
        shape = _parse_shape(request.headers.get("x-shape", ""))
        axis = request.headers.get("x-axis", "axial")
        declared = int(request.headers.get("content-length") or 0)
        if declared > config.max_upload_bytes:
            return error(413, f"upload of {declared} bytes is over this server's limit of "
                              f"{config.max_upload_bytes} (--max-upload-mb)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_upload_bytes:
                return error(413, f"upload is over this server's limit of {config.max_upload_bytes} bytes "
                                  "(--max-upload-mb)")
        try:
            raw = zlib.decompressobj().decompress(bytes(body), int(np.prod(shape)) + 1)
        except zlib.error as exc:
            raise InputError(f"the upload is not zlib-compressed slice data ({exc})") from exc
        if len(raw) != int(np.prod(shape)):
            raise InputError(f"the upload holds {len(raw)} bytes, X-Shape {list(shape)} needs {int(np.prod(shape))}")
        slices = np.frombuffer(raw, np.uint8).reshape(shape)
        session = state.add(slices, axis)
        return {"session": session.id, "n_slices": shape[0], "slice_shape": list(shape[1:3]),
                "model": predictor.model_id, "encoder_id": predictor.encoder_id}

    @app.post(f"{API_PREFIX}/sessions/{{sid}}/predict")
    def predict(sid: str, body: PredictBody, _token: str = Depends(authorised)) -> dict[str, Any]:
        session = state.get(sid)
        n, (h, w) = session.slices.shape[0], session.slices.shape[1:3]
        _check_prompts(body, n, h, w, config.max_prompts)
        mask_input = None
        if body.mask_input_id is not None:
            stored = session.logits.get(body.mask_input_id)
            if stored is None:
                raise InputError(f"logits {body.mask_input_id!r} are no longer kept; send the click without them")
            rows = body.mask_input_rows if body.mask_input_rows is not None else list(range(len(stored)))
            if not rows or any(not 0 <= r < len(stored) for r in rows):
                raise InputError(f"mask_input_rows {rows}: logits {body.mask_input_id!r} have rows "
                                 f"0..{len(stored) - 1}")
            mask_input = stored[rows]

        def work() -> tuple[Any, bool]:
            emb, encoded = state.embedding(session, body.slice)
            out = predictor.predict(emb, points=body.points, labels=body.labels, boxes=body.boxes,
                                    mask_input=mask_input)
            return out, encoded

        out, encoded = state.worker.submit(work).result()
        logits_id = f"{body.slice}:{next(session.logits_seq)}"
        session.logits[logits_id] = out.logits
        while len(session.logits) > LOGITS_KEPT_PER_SESSION:
            session.logits.popitem(last=False)
        for d in range(1, body.prefetch + 1):
            for k in (body.slice + d, body.slice - d):
                if 0 <= k < n:
                    state.worker.submit(lambda k=k: state.embedding(session, k), priority=1)
        return {"masks": [encode_mask(m) for m in out.masks], "scores": [float(s) for s in out.scores],
                "logits_id": logits_id, "encoded": encoded}

    @app.post(f"{API_PREFIX}/sessions/{{sid}}/prefetch")
    def prefetch(sid: str, body: PrefetchBody, _token: str = Depends(authorised)) -> dict[str, Any]:
        session = state.get(sid)
        n = session.slices.shape[0]
        if not 0 <= body.slice < n:
            raise InputError(f"slice {body.slice} is outside the volume (0..{n - 1})")
        queued = 0
        for d in range(0, body.radius + 1):
            for k in {body.slice + d, body.slice - d}:
                if 0 <= k < n:
                    state.worker.submit(lambda k=k: state.embedding(session, k), priority=1)
                    queued += 1
        return {"queued": queued}

    @app.delete(f"{API_PREFIX}/sessions/{{sid}}")
    def close(sid: str, _token: str = Depends(authorised)) -> dict[str, Any]:
        state.get(sid)
        with state.lock:
            state._drop(sid)
        return {"closed": sid}

    return app


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (3, 4) or any(v < 1 for v in shape) or (len(shape) == 4 and shape[3] != 3):
        raise InputError(f"X-Shape {text!r}: give the slices' shape as 'S,H,W' (or 'S,H,W,3' for colour)")
    return shape


def _check_prompts(body: Any, n_slices: int, h: int, w: int, max_prompts: int) -> None:
    if not 0 <= body.slice < n_slices:
        raise InputError(f"slice {body.slice} is outside the volume (0..{n_slices - 1})")
    count = len(body.points or []) + len(body.boxes or [])
    if count == 0:
        raise InputError("no prompt given: send at least one point or box")
    if count > max_prompts:
        raise InputError(f"{count} prompts in one request; this server takes at most {max_prompts}")
    for x, y in (tuple(p) if len(p) == 2 else (np.nan, np.nan) for p in body.points or []):
        if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
            raise InputError(f"point ({x:g}, {y:g}) is outside the {w}x{h} slice")
    for box in body.boxes or []:
        if len(box) != 4 or not (0 <= box[0] <= w - 1 and 0 <= box[2] <= w - 1 and 0 <= box[1] <= h - 1
                                 and 0 <= box[3] <= h - 1):
            raise InputError(f"box {box} is not (x0, y0, x1, y1) inside the {w}x{h} slice")
