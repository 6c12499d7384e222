"""`samunet batch --cluster`: one Dask task per volume, run by workers that load the model once and keep it.

Why Dask (and not Ray): it is pure Python (two wheels, seconds to install, nothing to run beside it for a local
cluster), it starts a 2-worker local cluster on a 2-core machine in a few seconds, and it reaches the clusters hospitals
and labs already have through dask-jobqueue (Slurm, PBS, SGE) and dask-kubernetes; the same scheduler address works
from any of them. Ray needs its own daemons (GCS, raylet) and a 70 MB wheel for the same one-task-per-volume job.

Spec: `local:N` starts N worker processes on this computer (one task at a time each, the CPU cores shared out between
them), `dask:ADDRESS` joins a running scheduler (`dask scheduler` + `dask worker ADDRESS --nthreads 1` on each node),
`dask:FILE.json` reads it from the scheduler file `dask scheduler --scheduler-file` wrote (shared filesystems, Slurm),
`dask` alone from $DASK_SCHEDULER_ADDRESS.

Each worker gets the `WorkerModel` plugin (samunet_core/cluster_worker.py, the worker side): it loads the model when
the worker starts (also a worker that replaces a dead one) and runs every volume given to it through
samunet_core.batch.run_batch_job, the serial batch's own function, so outputs are the same as the serial batch's.
Outputs are written atomically; a worker that dies mid-volume leaves at most a hidden temporary file, removed when the
volume is retried or reported. The scheduler retries a task whose worker died once
(`distributed.scheduler.allowed-failures` = 1 on a local cluster; a running scheduler keeps its own setting) and then
reports it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from samunet_core.batch import BatchJob, Outcome, is_finished, remove_partials
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
    from samunet_core.cluster_worker import WorkerModel, worker_status

    client.register_plugin(WorkerModel(config), name=PLUGIN_NAME)
    statuses = client.run(worker_status)
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

    from samunet_core.cluster_worker import run_on_worker

    attempts = Attempts(listener)
    client.subscribe_topic(EVENT_TOPIC, attempts)
    ids = [f"samunet-batch-{index}-{os.getpid()}-{time.time_ns()}" for index in range(len(jobs))]
    futures = [client.submit(run_on_worker, job, job_id, key=job_id, pure=False, priority=len(jobs) - index)
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
