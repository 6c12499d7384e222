"""A volume session: the slice asked for is encoded first, neighbours are prefetched on ONE persistent worker thread.

All model work (encode and, through `submit`/`segment`/`run`, decode) runs on the session's single worker thread, so
a GPU keeps one thread-local state and a GUI thread never runs the model. A request for a slice pre-empts a prefetch
that is mid-encode (the encoder checks between its stages, an exported runtime cancels its inference), so the caller
waits for its own slice, not for a neighbour's. The slice asked for is encoded alone; prefetched neighbours are encoded
`encode_batch` at a time (`Predictor.suggested_batch_size`: from free GPU memory; 1 on the CPU, where batching was
measured not to raise throughput).
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
                 cache: EmbeddingCache | None = None, axis: str = "axial", prefetch_radius: int = 3,
                 encode_batch: int | None = None) -> None:
        self.predictor = predictor
        self._slices = slices
        self.n_slices = int(n_slices)
        self.volume_key = volume_key
        self.cache = cache if cache is not None else EmbeddingCache()
        self.axis = axis
        self.prefetch_radius = prefetch_radius
        self.encode_batch = int(encode_batch) if encode_batch is not None else predictor.suggested_batch_size()
        if self.encode_batch < 1:
            raise InputError(f"encode_batch must be >= 1, got {encode_batch}")
        self.stats = SessionStats()
        self._pending: list[_Job] = []
        self._running: list[_Job] = []
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
            for job in self._running:
                if job.slice_index == k:
                    job.priority = URGENT  # it is already ours: let it finish rather than restart
                    return job.future
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
        self._plan_prefetch(order)

    def precompute(self, center: int | None = None, timeout: float | None = None) -> int:
        """Encode every slice of the volume (nearest to `center` first, default the middle), in the background
        order and batches of a prefetch; blocks until done and returns how many slices were encoded. Later requests
        still go first. With a cache smaller than the volume the farthest slices evict the nearest (they come back
        from disk when the cache has a disk folder)."""
        center = self.n_slices // 2 if center is None else int(center)
        before = self.stats.encodes
        self.prefetch(center, radius=self.n_slices)
        with self._cond:
            futures = [j.future for j in self._pending + self._running if j.slice_index is not None]
        futures.reverse()
        while futures:  # let go of each result as soon as it is in: holding them all would pin every embedding
            future = futures.pop()
            try:
                future.result(timeout)
            except CancelledError:
                pass
            del future
        return self.stats.encodes - before

    def _plan_prefetch(self, order: list[int]) -> None:
        wanted = [k for k in order if 0 <= k < self.n_slices and self.key(k) not in self.cache]
        with self._cond:
            self._check_open()
            stale = [j for j in self._pending if j.priority == PREFETCH and j.slice_index not in wanted]
            for job in stale:
                self._pending.remove(job)
                job.future.cancel()
            queued = {j.slice_index for j in self._pending}
            running = {j.slice_index for j in self._running}
            for k in wanted:
                if k not in queued and k not in running:
                    self._pending.append(_Job(PREFETCH, next(self._seq), Future(), slice_index=k))
            self._cond.notify_all()

    def cancel_pending(self) -> int:
        """Cancel every queued job (and pre-empt a running prefetch); returns how many were dropped."""
        with self._cond:
            dropped = list(self._pending)
            self._pending.clear()
            for job in self._running:
                if job.priority == PREFETCH:
                    job.future.cancel()
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
        return self._encode_many([k], abortable, [job] if job is not None else [])[0]

    def _encode_many(self, ks: list[int], abortable: bool, jobs: list[_Job]) -> list[Embedding]:
        """Slices ks in one encoder pass, each put in the cache. Abortable: a prefetch yields to a request."""
        import time

        def should_abort() -> bool:
            if any(job.priority != PREFETCH for job in jobs):
                return False  # someone is waiting for one of these slices
            return all(job.future.cancelled() for job in jobs) or self._urgent_waiting() or self._closed

        t0 = time.perf_counter()
        embeddings = self.predictor.encode_batch([self._slices(k) for k in ks],
                                                 should_abort=should_abort if abortable and jobs else None)
        per_slice_ms = (time.perf_counter() - t0) * 1e3 / len(ks)
        self.stats.encode_ms.extend([per_slice_ms] * len(ks))
        self.stats.encodes += len(ks)
        for k, emb in zip(ks, embeddings, strict=True):
            self.cache.put(self.key(k), emb)
        return embeddings

    def _next_jobs(self) -> list[_Job] | None:
        """The most urgent job; a prefetch encode takes up to `encode_batch` queued prefetch encodes with it."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            ordered = sorted(self._pending, key=lambda j: (j.priority, j.seq))
            jobs = ordered[:1]
            if jobs[0].priority == PREFETCH and jobs[0].slice_index is not None:
                jobs += [j for j in ordered[1:] if j.priority == PREFETCH and j.slice_index is not None
                         and not j.future.cancelled()][: self.encode_batch - 1]
            for job in jobs:
                self._pending.remove(job)
            self._running = jobs
            return jobs

    def _work(self) -> None:
        while True:
            jobs = self._next_jobs()
            if jobs is None:
                return
            try:
                self._run_jobs(jobs)
            finally:
                with self._cond:
                    self._running = []

    def _run_jobs(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.future.cancelled()]
        if len(jobs) == 1 and jobs[0].call is not None:
            self._resolve(jobs[0], jobs[0].call)
            return
        to_encode = []
        for job in jobs:
            cached = self.cache.get(self.key(job.slice_index))
            if cached is not None:
                self._resolve(job, lambda cached=cached: cached)
            else:
                to_encode.append(job)
        if not to_encode:
            return
        was_prefetch = all(job.priority == PREFETCH for job in to_encode)
        try:
            embeddings = self._encode_many([job.slice_index for job in to_encode], was_prefetch, to_encode)
        except EncodeAborted:
            self.stats.preempted += 1
            with self._cond:
                for job in to_encode:
                    if not job.future.cancelled() and not self._closed:
                        job.seq = next(self._seq)
                        self._pending.append(job)  # retry after the urgent work
            return
        for job, emb in zip(to_encode, embeddings, strict=True):
            if job.priority == PREFETCH:
                self.stats.prefetch_encodes += 1
            else:
                self._remember(job.slice_index, emb)
            self._resolve(job, lambda emb=emb: emb)

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
