"""`samunet batch --cluster`: one Dask task per volume, run by workers that load the model once and keep it.

Why Dask (and not Ray): it is pure Python (two wheels, seconds to install, nothing to run beside it for a local
cluster), it starts a 2-worker local cluster on a 2-core machine in a few seconds, and it reaches the clusters hospitals
and labs already have through dask-jobqueue (Slurm, PBS, SGE) and dask-kubernetes; the same scheduler address works
from any of them. Ray needs its own daemons (GCS, raylet) and a 70 MB wheel for the same one-task-per-volume job.

Spec: `local:N` starts N worker processes on this computer (one task at a time each, the CPU cores shared out between
them), `dask:ADDRESS` joins a running scheduler (`dask scheduler` + `dask worker ADDRESS --nthreads 1` on each node),
`dask:FILE.json` reads it from the scheduler file `dask scheduler --scheduler-file` wrote (shared filesystems, Slurm),
`dask` alone from $DASK_SCHEDULER_ADDRESS.

Each worker gets the `WorkerModel` plugin: it loads the model when the worker starts (also a worker that replaces a dead
one) and runs every volume given to it through samunet_core.batch.run_batch_job, the serial batch's own function, so
outputs are the same as the serial batch's. Outputs are written atomically; a worker that dies mid-volume leaves at
most a hidden temporary file, removed when the volume is retried or reported. The scheduler retries a task whose
worker died once (`distributed.scheduler.allowed-failures` = 1 on a local cluster; a running scheduler keeps its own
setting) and then reports it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from samunet_core.batch import BatchJob, Outcome, is_finished, remove_partials, run_batch_job
from samunet_core.errors import InputError

PLUGIN_NAME = "samunet-model"
EVENT_TOPIC = "samunet-batch"
ALLOWED_WORKER_DEATHS = 1  # a volume whose worker died is retried once, then reported
CLUSTER_HELP = ("run the volumes on a Dask cluster: local:N (N worker processes here), dask:ADDRESS (a running "
                "scheduler, e.g. dask:tcp://10.0.0.5:8786), dask:FILE.json (its scheduler file) or dask "
                "($DASK_SCHEDULER_ADDRESS); docs/cluster.md")


@dataclass(frozen=True)
class ClusterSpec:
    """kind "local" (start `workers` processes here) or "dask" (join the scheduler at `address`)."""

    kind: str
    address: str | None = None
    workers: int = 0


def parse_cluster(text: str) -> ClusterSpec:
    """'local:N' | 'dask' | 'dask:ADDRESS' -> ClusterSpec; InputError saying what is accepted."""
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind == "local":
        if not rest.strip().isdigit() or int(rest) < 1:
            raise InputError(f"--cluster {text}: give the number of workers, e.g. local:2")
        return ClusterSpec("local", workers=int(rest))
    if kind == "dask":
        address = rest.strip() or os.environ.get("DASK_SCHEDULER_ADDRESS", "")
        if address.endswith(".json"):
            address = os.path.expanduser(address)  # `dask:~/dask-scheduler.json`: no shell expands a ~ after a colon
            if not os.path.isfile(address):
                raise InputError(f"scheduler file {address} does not exist; start `dask scheduler --scheduler-file "
                                 f"{address}` first (docs/cluster.md)")
        if not address:
            raise InputError("--cluster dask: give the scheduler's address (dask:tcp://HOST:8786) or set "
                             "DASK_SCHEDULER_ADDRESS")
        return ClusterSpec("dask", address=address)
    if kind == "ray":
        raise InputError("--cluster ray: this build runs on Dask; start a Dask scheduler and workers (docs/cluster.md) "
                         "and give --cluster dask:ADDRESS, or use local:N on one computer")
    raise InputError(f"--cluster {text}: {CLUSTER_HELP}")


def usable_cores() -> int:
    """The cores this process may run on (a container's or a batch slot's CPU set, not the whole machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ModelConfig:
    """What every worker loads once: the `samunet batch` model options. threads None: the worker's own default."""

    model: str
    checkpoint: str | None
    device: str
    runtime: str
    cache_dir: str | None
    window: tuple[float, float] | None
    preset: str | None
    threads: int | None
    engine_version: str


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


try:  # Dask is imported here only when --cluster is used (cli_batch imports this module lazily)
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - the dependency is declared; this names the fix if it was removed
    WorkerPlugin = object  # type: ignore[misc,assignment]


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


def _worker_status(dask_worker: Any) -> dict[str, Any]:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    return plugin.status() if plugin is not None else {"error": "the samunet model plugin is not installed"}


def _run_on_worker(job: BatchJob, job_id: str) -> Outcome:
    from distributed import get_worker

    worker = get_worker()
    worker.log_event(EVENT_TOPIC, {"event": "start", "job": job_id, "volume": job.volume, "pid": os.getpid(),
                                   "worker": worker.address})
    outcome = worker.plugins[PLUGIN_NAME].run(job)
    return replace(outcome, worker=worker.address)


# ---------------------------------------------------------------------------------------------------------------------
# The client side
# ---------------------------------------------------------------------------------------------------------------------
class Attempts:
    """Start events from the workers: how often each job was started, and where (thread-safe; the Dask client calls
    `__call__` on its own thread)."""

    def __init__(self, listener: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.starts: dict[str, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._listener = listener

    def __call__(self, event: tuple[float, dict[str, Any]]) -> None:
        _, message = event
        with self._lock:
            self.starts.setdefault(message["job"], []).append(message)
        if self._listener is not None:
            self._listener(message)

    def count(self, job_id: str) -> int:
        with self._lock:
            return len(self.starts.get(job_id, []))


def open_client(spec: ClusterSpec, threads: int | None) -> tuple[Any, Any, int | None]:
    """(Dask client, the LocalCluster it owns or None, model threads per worker)."""
    import dask
    from distributed import Client, LocalCluster

    if spec.kind == "dask":
        try:
            if spec.address.endswith(".json"):  # a scheduler file, as `dask scheduler --scheduler-file F` writes
                return Client(scheduler_file=spec.address, timeout="20s"), None, threads
            return Client(spec.address, timeout="20s"), None, threads
        except OSError as exc:
            raise InputError(f"cannot reach the Dask scheduler at {spec.address} ({exc}); check the address and that "
                             "`dask scheduler` runs there") from exc
    per_worker = threads or max(1, usable_cores() // spec.workers)
    # worker-saturation 1.0: a worker holds only the volume it runs, so a worker's death marks no queued bystander
    # as suspicious (each death counts against every task the scheduler had given that worker).
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_WORKER_DEATHS,
                          "distributed.scheduler.worker-saturation": 1.0}):
        cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
    return Client(cluster), cluster, per_worker


def start_workers(client: Any, config: ModelConfig) -> list[dict[str, Any]]:
    """Install the model on every worker (and on workers that join later); InputError if any worker cannot load it."""
    client.register_plugin(WorkerModel(config), name=PLUGIN_NAME)
    statuses = client.run(_worker_status)
    if not statuses:
        raise InputError("the Dask cluster has no workers; start some (`dask worker ADDRESS --nthreads 1`)")
    errors = {address: s["error"] for address, s in statuses.items() if s.get("error")}
    if errors:
        address, error = next(iter(errors.items()))
        raise InputError(f"worker {address} cannot load the model: {error}")
    return [dict(s, worker=address) for address, s in statuses.items()]


def run_jobs(client: Any, jobs: Sequence[BatchJob], *, progress: bool = True,
             listener: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[Outcome], bool]:
    """Run `jobs` on the client's workers (model already started): (one Outcome per job in job order, interrupted).

    Ctrl-C cancels what has not finished and returns interrupted=True; outputs written before stay."""
    from distributed import as_completed
    from distributed.client import FutureCancelledError
    from tqdm import tqdm

    attempts = Attempts(listener)
    client.subscribe_topic(EVENT_TOPIC, attempts)
    ids = [f"samunet-batch-{index}-{os.getpid()}-{time.time_ns()}" for index in range(len(jobs))]
    futures = [client.submit(_run_on_worker, job, job_id, key=job_id, pure=False, priority=len(jobs) - index)
               for index, (job, job_id) in enumerate(zip(jobs, ids, strict=True))]
    index_of = {future.key: index for index, future in enumerate(futures)}
    outcomes: list[Outcome | None] = [None] * len(jobs)
    interrupted = False
    try:
        with tqdm(total=len(jobs), desc="batch", unit="volume", disable=not progress) as bar:
            for future in as_completed(futures):
                index = index_of[future.key]
                job = jobs[index]
                try:
                    outcome = replace(future.result(), attempts=max(1, attempts.count(ids[index])))
                except FutureCancelledError:
                    continue
                except Exception as exc:  # noqa: BLE001 - KilledWorker (died twice) or a lost scheduler
                    remove_partials(job)
                    outcome = Outcome(job.volume, "failed", _death_message(exc, attempts.count(ids[index])),
                                      attempts=attempts.count(ids[index]))
                if outcome.status == "failed":
                    tqdm.write(f"samunet batch: {job.volume}: failed: {outcome.message}")
                outcomes[index] = outcome
                bar.set_postfix_str(job.name)
                bar.update()
    except KeyboardInterrupt:
        interrupted = True
        client.cancel([f for f in futures if not f.done()], force=True)
    finally:
        client.unsubscribe_topic(EVENT_TOPIC)
    if interrupted:
        for index, job in enumerate(jobs):
            if outcomes[index] is None and is_finished(job):  # a worker finished it while the job was stopping
                outcomes[index] = Outcome(job.volume, "done", f"{job.output} (finished while stopping)",
                                          attempts=max(1, attempts.count(ids[index])))
            elif outcomes[index] is None:
                remove_partials(job)
    return [o for o in outcomes if o is not None], interrupted


def _death_message(exc: Exception, started: int) -> str:
    name = type(exc).__name__
    if name == "KilledWorker":
        return (f"the worker running it died {started or ALLOWED_WORKER_DEATHS + 1} times (killed, or out of memory); "
                "segment it alone (`samunet segment`) to see why")
    return f"{name}: {exc}"


def run_batch_on_cluster(jobs: Sequence[BatchJob], spec: ClusterSpec, config: ModelConfig, *,
                         progress: bool = True) -> tuple[list[Outcome], bool]:
    """Open the cluster, start the model on its workers, run `jobs`, close what this call opened."""
    client, cluster, threads = open_client(spec, config.threads)
    try:
        config = replace(config, threads=threads)
        workers = start_workers(client, config)
        loads = ", ".join(f"{w['load_s']:.1f} s" for w in workers)
        print(f"batch: {len(workers)} worker(s) ready ({workers[0]['model']}, {workers[0]['runtime']}, "
              f"{threads or 'default'} thread(s) each; model load {loads})")
        return run_jobs(client, jobs, progress=progress)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
