"""The worker side of `samunet batch --cluster`: the plugin that loads the model once per Dask worker and runs volumes
with it. Imported by the client only when a cluster is used (Dask is not imported by a plain `samunet batch`)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from samunet_core.batch import BatchJob, Outcome, run_batch_job
from samunet_core.cluster import EVENT_TOPIC, PLUGIN_NAME, ModelConfig
from samunet_core.errors import InputError


def _load_worker_model(config: ModelConfig) -> tuple[Any, Any]:
    """(predictor, embedding cache) as `samunet batch` builds them, in this worker process."""
    import torch

    from samunet_core import __version__
    from samunet_core.cli_segment import build_cache
    from samunet_core.predictor import load_predictor

    if __version__ != config.engine_version:
        raise InputError(f"this worker runs samunet-core {__version__} but the batch was started with "
                         f"{config.engine_version}; install the same version on every worker")
    if config.threads:
        torch.set_num_threads(config.threads)
    predictor = load_predictor(config.model, device=config.device, checkpoint=config.checkpoint,
                               runtime=config.runtime)
    return predictor, build_cache(config.cache_dir)


class WorkerModel(WorkerPlugin):
    """Loads the model when its worker starts and runs jobs with it, one at a time (a worker started with
    --nthreads above 1 still runs one volume at a time: the model's threads are the parallelism)."""

    name = PLUGIN_NAME

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.error = ""
        self.load_seconds = 0.0
        self._predictor: Any = None
        self._cache: Any = None

    def setup(self, worker: Any) -> None:
        self._lock = threading.Lock()  # made here, on the worker: the plugin travels pickled
        _leave_ctrl_c_to_the_client()
        t0 = time.perf_counter()
        try:
            self._predictor, self._cache = _load_worker_model(self.config)
        except Exception as exc:  # noqa: BLE001 - reported to the client by `status`, which stops the batch
            self.error = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
        self.load_seconds = time.perf_counter() - t0

    def status(self) -> dict[str, Any]:
        return {"error": self.error, "pid": os.getpid(), "load_s": round(self.load_seconds, 2),
                "model": getattr(self._predictor, "model_id", ""), "runtime": getattr(self._predictor, "runtime", "")}

    def run(self, job: BatchJob) -> Outcome:
        if self.error:
            return Outcome(job.volume, "failed", f"the worker could not load the model: {self.error}")
        with self._lock:
            return run_batch_job(job, self._predictor, cache=self._cache, window=self.config.window,
                                 preset=self.config.preset)


def _leave_ctrl_c_to_the_client() -> None:
    """Ctrl-C in a terminal reaches every process of the group, local workers included; the client stops the job
    and closes its workers, so a worker ignores it (instead of printing a traceback mid-volume)."""
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the worker's main thread: leave the default
        pass


def worker_status(dask_worker: Any) -> dict[str, Any]:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return plugin.status() if plugin is not None else {"error": "the samunet model plugin is not installed"}


def run_on_worker(job: BatchJob, job_id: str) -> Outcome:
    from distributed import get_worker

    worker = get_worker()
    worker.log_event(EVENT_TOPIC, {"event": "start", "job": job_id, "volume": job.volume, "pid": os.getpid(),
                                   "worker": worker.address})
    outcome = worker.plugins[PLUGIN_NAME].run(job)
    return replace(outcome, worker=worker.address)
