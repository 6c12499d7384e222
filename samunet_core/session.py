"""A volume session: the slice asked for is encoded first, neighbours are prefetched on ONE persistent worker thread.

All model work (encode and, through `submit`/`segment`/`run`, decode) runs on the session's single worker thread, so
a GPU keeps one thread-local state and a GUI thread never runs the model. A request for a slice pre-empts a prefetch
that is mid-encode (the encoder checks between its stages), so the caller waits for its own slice, not for a
neighbour's.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from samunet_core.cache import EmbeddingCache
from samunet_core.errors import InputError
from samunet_core.predictor import Embedding, EncodeAborted, Prediction, Predictor

URGENT, PREFETCH = 0, 1


@dataclass
class _Job:
    priority: int
    seq: int
    future: Future
    slice_index: int | None = None  # encode job for this slice, or None for a call
    call: Callable[[], Any] | None = None


@dataclass
class SessionStats:
    encodes: int = 0
    prefetch_encodes: int = 0
    preempted: int = 0
    hot_hits: int = 0
    encode_ms: list[float] = field(default_factory=list)


class VolumeSession:
    """Embeddings of one volume's slices along one axis, for interactive use.

    slices: k -> HxW(x3) uint8 slice as the model should see it (windowed); n_slices: K;
    volume_key: identity of the windowed volume content (see cache.content_hash); axis: names the slice id.
    """

    def __init__(self, predictor: Predictor, slices: Callable[[int], np.ndarray], n_slices: int, volume_key: str,
                 cache: EmbeddingCache | None = None, axis: str = "axial", prefetch_radius: int = 3) -> None:
        self.predictor = predictor
        self._slices = slices
        self.n_slices = int(n_slices)
        self.volume_key = volume_key
        self.cache = cache if cache is not None else EmbeddingCache()
        self.axis = axis
        self.prefetch_radius = prefetch_radius
        self.stats = SessionStats()
        self._pending: list[_Job] = []
        self._running: _Job | None = None
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._hot: dict[int, Embedding] = {}
        self._decoder = _WorkerDecoder(self)
        self._worker = threading.Thread(target=self._work, name=f"samunet-session-{volume_key[:8]}", daemon=True)
        self._worker.start()

    # -- public API -----------------------------------------------------------------------------------------------
    def key(self, k: int) -> tuple[str, str, str]:
        return (self.predictor.encoder_id, self.volume_key, f"{self.axis}:{k}")

    def cached(self, k: int) -> Embedding | None:
        """The embedding of slice k if it is already computed (never encodes)."""
        hot = self._hot.get(k)
        if hot is not None:
            self.stats.hot_hits += 1
            return hot
        emb = self.cache.get(self.key(k))
        if emb is not None:
            self._remember(k, emb)
        return emb

    def request(self, k: int) -> Future:
        """Future of slice k's Embedding, encoded ahead of any prefetch. Never blocks."""
        self._check_index(k)
        emb = self.cached(k)
        if emb is not None:
            done: Future = Future()
            done.set_result(emb)
            return done
        with self._cond:
            self._check_open()
            if self._running is not None and self._running.slice_index == k:
                self._running.priority = URGENT  # it is already ours: let it finish rather than restart
                return self._running.future
            for job in self._pending:
                if job.slice_index == k:
                    job.priority = URGENT
                    self._cond.notify_all()
                    return job.future
            job = _Job(URGENT, next(self._seq), Future(), slice_index=k)
            self._pending.append(job)
            self._cond.notify_all()
            return job.future

    def embedding(self, k: int, timeout: float | None = None) -> Embedding:
        """Slice k's Embedding; blocks only while slice k itself is encoded."""
        emb = self.cached(k)
        return emb if emb is not None else self.request(k).result(timeout)

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the session's worker thread, ahead of prefetches (e.g. a decode on the GPU)."""
        with self._cond:
            self._check_open()
            job = _Job(URGENT, next(self._seq), Future(), call=fn)
            self._pending.append(job)
            self._cond.notify_all()
            return job.future

    def segment(self, k: int, **prompts: Any) -> Future:
        """Future[Prediction] of prompts (points, labels, boxes, mask_input) on slice k, run on the worker."""
        self._check_index(k)
        return self.submit(lambda: self._decoder.predict(k, **prompts))

    def run(self, fn: Callable[[Any], Any]) -> Future:
        """Future of `fn(decoder)`, run on the worker thread ahead of prefetches. `decoder.predict(k, **prompts)`
        (a propagate.SliceDecoder) uses slice k's cached embedding or encodes it right there, on the worker, so it
        never waits on the worker itself; e.g. `session.run(lambda d: interaction.decode_slice(d, k, prompts))`."""
        return self.submit(lambda: fn(self._decoder))

    def decode_key(self, k: int) -> tuple[str, str, str, str]:
        """What `predict(k, ...)` answers from: the model, and slice k's embedding (encoder, volume content, axis:k)."""
        return (self.predictor.model_id, *self.key(k))

    def predict(self, k: int, **prompts: Any) -> Prediction:
        """Prompts on slice k, decoded in the calling thread (CPU use: no thread hand-off for a cached slice)."""
        return self.predictor.predict(self.embedding(k), **prompts)

    def prefetch(self, center: int, radius: int | None = None) -> None:
        """Queue neighbours of `center` (nearest first), replacing the previous prefetch plan."""
        radius = self.prefetch_radius if radius is None else radius
        order = [center] + [center + sign * d for d in range(1, radius + 1) for sign in (1, -1)]
        wanted = [k for k in order if 0 <= k < self.n_slices and self.key(k) not in self.cache]
        with self._cond:
            self._check_open()
            stale = [j for j in self._pending if j.priority == PREFETCH and j.slice_index not in wanted]
            for job in stale:
                self._pending.remove(job)
                job.future.cancel()
            queued = {j.slice_index for j in self._pending}
            running = self._running.slice_index if self._running is not None else None
            for k in wanted:
                if k not in queued and k != running:
                    self._pending.append(_Job(PREFETCH, next(self._seq), Future(), slice_index=k))
            self._cond.notify_all()

    def cancel_pending(self) -> int:
        """Cancel every queued job (and pre-empt a running prefetch); returns how many were dropped."""
        with self._cond:
            dropped = list(self._pending)
            self._pending.clear()
            if self._running is not None and self._running.priority == PREFETCH:
                self._running.future.cancel()
            self._cond.notify_all()
        for job in dropped:
            job.future.cancel()
        return len(dropped)

    def pending(self) -> list[int | None]:
        with self._cond:
            return [j.slice_index for j in sorted(self._pending, key=lambda j: (j.priority, j.seq))]

    def close(self) -> None:
        self.cancel_pending()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    def __enter__(self) -> VolumeSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- worker ---------------------------------------------------------------------------------------------------
    def _check_index(self, k: int) -> None:
        if not 0 <= int(k) < self.n_slices:
            raise InputError(f"slice {k} is outside the volume (0..{self.n_slices - 1} along {self.axis})")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the session is closed")

    def _remember(self, k: int, emb: Embedding) -> None:
        self._hot[k] = emb
        while len(self._hot) > 2:
            self._hot.pop(next(iter(self._hot)))

    def _urgent_waiting(self) -> bool:
        return any(j.priority == URGENT for j in self._pending)

    def _encode(self, k: int, abortable: bool, job: _Job | None = None) -> Embedding:
        import time

        def should_abort() -> bool:
            if job is None or job.priority != PREFETCH:
                return False
            return job.future.cancelled() or self._urgent_waiting() or self._closed

        t0 = time.perf_counter()
        emb = self.predictor.encode(self._slices(k), should_abort=should_abort if abortable else None)
        self.stats.encode_ms.append((time.perf_counter() - t0) * 1e3)
        self.stats.encodes += 1
        self.cache.put(self.key(k), emb)
        return emb

    def _next_job(self) -> _Job | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = min(self._pending, key=lambda j: (j.priority, j.seq))
            self._pending.remove(job)
            self._running = job
            return job

    def _work(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                if job.future.cancelled():
                    continue
                if job.call is not None:
                    self._resolve(job, job.call)
                    continue
                k = job.slice_index
                cached = self.cache.get(self.key(k))
                if cached is not None:
                    self._resolve(job, lambda cached=cached: cached)
                    continue
                was_prefetch = job.priority == PREFETCH
                try:
                    emb = self._encode(k, abortable=was_prefetch, job=job)
                except EncodeAborted:
                    self.stats.preempted += 1
                    with self._cond:
                        if not job.future.cancelled() and not self._closed:
                            job.seq = next(self._seq)
                            self._pending.append(job)  # retry after the urgent work
                    continue
                if was_prefetch and job.priority == PREFETCH:
                    self.stats.prefetch_encodes += 1
                else:
                    self._remember(k, emb)
                self._resolve(job, lambda emb=emb: emb)
            finally:
                with self._cond:
                    self._running = None

    @staticmethod
    def _resolve(job: _Job, produce: Callable[[], Any]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(produce())
        except BaseException as exc:  # handed to the caller through the future, never swallowed
            job.future.set_exception(exc)


class _WorkerDecoder:
    """The SliceDecoder handed to `VolumeSession.run`: on the worker thread a slice without an embedding is encoded
    inline (a queued request would wait on the worker itself); from any other thread it behaves as
    `VolumeSession.predict` (the encode goes through the worker, ahead of prefetches)."""

    def __init__(self, session: VolumeSession) -> None:
        self._session = session

    def decode_key(self, k: int) -> tuple[str, str, str, str]:
        return self._session.decode_key(k)

    def predict(self, k: int, **prompts: Any) -> Prediction:
        session = self._session
        session._check_index(k)
        if threading.current_thread() is not session._worker:
            return session.predict(k, **prompts)
        emb = session.cached(k)
        if emb is None:
            emb = session._encode(k, abortable=False)
            session._remember(k, emb)
        return session.predictor.predict(emb, **prompts)


__all__ = ["VolumeSession", "SessionStats", "CancelledError"]
