"""`samunet batch --cluster local:2` on a real two-worker Dask cluster over real CT volumes: outputs equal to the serial
batch voxel for voxel, a failing volume reported while the others finish, a worker killed mid-volume (its volume
retried once, then reported), Ctrl-C stopping cleanly and a rerun resuming (serial batch too), jobs from a job file,
and a running `dask scheduler` + `dask worker` cluster joined through its scheduler file."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cohort import make_slab_cohort

from samunet_core.batch import BatchJob, read_job_file
from samunet_core.cli import main
from samunet_core.errors import InputError

DATA = Path(__file__).resolve().parents[1] / "data" / "totalsegmentator"
COMMON = ["--device", "cpu", "--preset", "soft_tissue", "--cache-dir", "none", "--no-progress"]
N_SLABS = 4


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Four distinct 6-slice CT volumes, each with its prompt file beside it."""
    folder = tmp_path_factory.mktemp("cohort")
    make_slab_cohort(DATA / "example_ct_sm.nii.gz", DATA / "example_seg.nii.gz", folder, N_SLABS, 6)
    return folder


@pytest.fixture(scope="module")
def serial(cohort, tmp_path_factory) -> Path:
    """The serial batch's outputs: the reference every cluster run must equal."""
    out = tmp_path_factory.mktemp("serial")
    assert main(["batch", str(cohort), "--output-dir", str(out), *COMMON]) == 0
    return out


def voxels(path: Path) -> tuple[list[str], np.ndarray]:
    import slicerio

    seg = slicerio.read_segmentation(str(path))
    return [s["name"] for s in seg["segments"]], seg["voxels"]


def assert_same_as_serial(out: Path, serial: Path, names: list[str]) -> None:
    for name in names:
        want_names, want = voxels(serial / name)
        got_names, got = voxels(out / name)
        assert got_names == want_names and got.dtype == want.dtype
        assert np.array_equal(got, want), f"{name}: cluster output differs from the serial batch"
        assert want.sum() > 100


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".partial" in p.name]


def slab_outputs() -> list[str]:
    return [f"slab{i}.seg.nrrd" for i in range(N_SLABS)]


def test_cluster_batch_from_a_job_file_equals_serial_and_reports_a_failure(cohort, serial, tmp_path, capsys):
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    rows = [{"volume": str(cohort / f"slab{i}.nii.gz"), "prompts": str(cohort / f"slab{i}.prompts.json"),
             "output": f"slab{i}.seg.nrrd"} for i in range(N_SLABS)]
    rows.insert(1, {"volume": "broken.nii.gz", "prompts": str(cohort / "slab0.prompts.json"),
                    "output": "broken.seg.nrrd"})
    jobs = tmp_path / "jobs.csv"
    with open(jobs, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["volume", "prompts", "output"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    code = main(["batch", "--jobs", str(jobs), "--output-dir", str(out), "--cluster", "local:2", *COMMON])
    printed = capsys.readouterr().out
    assert code == 1, "a failed volume makes the exit status non-zero"
    assert f"{N_SLABS} segmented, 0 skipped (already done), 1 failed" in printed
    assert "FAILED" in printed and "broken.nii.gz" in printed
    assert sorted(p.name for p in out.iterdir()) == slab_outputs(), "nothing written for the broken volume"
    assert_same_as_serial(out, serial, slab_outputs())
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert main(["batch", "--jobs", str(jobs), "--output-dir", str(out), "--cluster", "local:2", *COMMON]) == 1
    assert f"0 segmented, {N_SLABS} skipped (already done), 1 failed" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps, "finished outputs are not redone"


def test_a_killed_worker_is_retried_once_then_the_volume_is_reported(cohort, serial, tmp_path):
    from samunet_core import __version__
    from samunet_core.cluster import ClusterSpec, ModelConfig, open_client, run_jobs, start_workers
    from samunet_core.registry import DEFAULT_MODEL

    out = tmp_path / "out"
    out.mkdir()
    jobs = [BatchJob(str(cohort / f"slab{i}.nii.gz"), str(cohort / f"slab{i}.prompts.json"),
                     str(out / f"slab{i}.seg.nrrd")) for i in range(3)]
    # What a writer killed in an earlier attempt leaves behind; the retry (slab0) and the report (slab1) remove it.
    for i in (0, 1):
        (out / f".slab{i}.deadbeef.partial.seg.nrrd").write_bytes(b"half a file")
    killed: list[int] = []

    def kill(event: dict) -> None:
        """slab0: its first worker is killed (the retry must succeed); slab1: every worker that starts it is."""
        name = Path(event["volume"]).name
        if name == "slab1.nii.gz" or (name == "slab0.nii.gz" and not any(k == 0 for k in killed)):
            killed.append(int(name[4]))
            os.kill(event["pid"], signal.SIGKILL)

    client, cluster, threads = open_client(ClusterSpec("local", workers=2), None)
    try:
        config = ModelConfig(DEFAULT_MODEL, None, "cpu", "auto", "none", None, "soft_tissue", threads, __version__)
        assert len(start_workers(client, config)) == 2
        outcomes, interrupted = run_jobs(client, jobs, progress=False, listener=kill)
    finally:
        client.close()
        cluster.close()
    assert not interrupted
    by_name = {Path(o.volume).name: o for o in outcomes}
    assert sorted(killed) == [0, 1, 1], "slab0 killed once, slab1 on both attempts"
    assert by_name["slab0.nii.gz"].status == "done" and by_name["slab0.nii.gz"].attempts == 2
    assert by_name["slab1.nii.gz"].status == "failed" and by_name["slab1.nii.gz"].attempts == 2
    assert "died 2 times" in by_name["slab1.nii.gz"].message
    assert by_name["slab2.nii.gz"].status == "done" and by_name["slab2.nii.gz"].attempts == 1
    assert sorted(p.name for p in out.iterdir()) == ["slab0.seg.nrrd", "slab2.seg.nrrd"], "no partial output left"
    assert_same_as_serial(out, serial, ["slab0.seg.nrrd", "slab2.seg.nrrd"])


@pytest.mark.parametrize("where", [[], ["--cluster", "local:2"]], ids=["serial", "cluster"])
def test_ctrl_c_stops_the_batch_cleanly_and_a_rerun_resumes(cohort, serial, tmp_path, capsys, where):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "samunet_core.cli", "batch", str(cohort), "--output-dir", str(out), *where,
               *COMMON]
    # Like a terminal's Ctrl-C: SIGINT to the whole process group (the client and its local workers).
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.monotonic() + 240
    # a finished output, not a write in progress (pathlib's glob also matches the hidden ".name.TOKEN.partial" files)
    while not (out.is_dir() and any(not p.name.startswith(".") for p in out.glob("*.seg.nrrd"))):
        assert process.poll() is None and time.monotonic() < deadline, "the batch ended before any output appeared"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    printed, _ = process.communicate(timeout=60)
    assert process.returncode == 130, printed
    assert "interrupted" in printed and "Traceback" not in printed, printed
    finished = sorted(p.name for p in out.iterdir())
    assert no_partials(out) and 1 <= len(finished) < N_SLABS, finished
    assert_same_as_serial(out, serial, finished)

    assert main(["batch", str(cohort), "--output-dir", str(out), *where, *COMMON]) == 0
    resumed = capsys.readouterr().out
    assert f"{N_SLABS - len(finished)} segmented, {len(finished)} skipped (already done), 0 failed" in resumed
    assert_same_as_serial(out, serial, slab_outputs())


def test_a_running_dask_cluster_from_its_scheduler_file(cohort, serial, tmp_path, capsys):
    """docs/cluster.md's multi-node recipe on one computer: `dask scheduler --scheduler-file F`, `dask worker
    --scheduler-file F --nworkers 2 --nthreads 1`, then `samunet batch --cluster dask:F` (over loopback)."""
    scheduler_file = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m", "dask"]
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1",
           "DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION": "1.0"}
    scheduler = subprocess.Popen([*dask, "scheduler", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
                                  "--port", "0", "--no-dashboard"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
    workers = None
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file():
            assert scheduler.poll() is None and time.monotonic() < deadline, "the Dask scheduler did not start"
            time.sleep(0.1)
        workers = subprocess.Popen([*dask, "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "2",
                                    "--nthreads", "1", "--no-dashboard"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file), timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        out = tmp_path / "out"
        code = main(["batch", str(cohort), "--output-dir", str(out), "--cluster", f"dask:{scheduler_file}", *COMMON])
        printed = capsys.readouterr().out
        assert code == 0, printed
        assert "batch: 2 worker(s) ready" in printed and f"{N_SLABS} segmented" in printed
        assert_same_as_serial(out, serial, slab_outputs())
    finally:
        for process in (workers, scheduler):
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)


def test_job_files_and_cluster_specs_are_checked(tmp_path, capsys):
    from samunet_core.cluster import parse_cluster

    assert parse_cluster("local:3").workers == 3
    assert parse_cluster("dask:tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert main(["batch", str(tmp_path), "--cluster", "dask:~/no-such-scheduler.json"]) == 2
    assert "no-such-scheduler.json does not exist; start `dask scheduler" in capsys.readouterr().err
    for bad, says in (("local:0", "number of workers"), ("ray", "runs on Dask"), ("slurm:4", "local:N")):
        with pytest.raises(InputError, match=says):
            parse_cluster(bad)
    volume = tmp_path / "a.nii.gz"
    volume.write_bytes(b"x")
    (tmp_path / "jobs.json").write_text(json.dumps([{"volume": "a.nii.gz", "prompts": "a.json", "output": "o/a.nrrd"}]))
    job = read_job_file(tmp_path / "jobs.json")[0]
    assert job.volume == str(volume) and job.output == str(tmp_path / "o" / "a.nrrd")
    (tmp_path / "jobs.json").write_text(json.dumps([{"volume": "a.nii.gz", "output": "o.nrrd"}]))
    with pytest.raises(InputError, match="job 1: no prompts"):
        read_job_file(tmp_path / "jobs.json")
    (tmp_path / "jobs.json").write_text(json.dumps([{"volume": "a.nii.gz", "prompts": "p", "output": "same.nrrd"}] * 2))
    assert main(["batch", "--jobs", str(tmp_path / "jobs.json"), *COMMON]) == 2
    assert "would both write" in capsys.readouterr().err
    assert main(["batch", str(volume), "--jobs", str(tmp_path / "jobs.json"), *COMMON]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["batch", str(volume), "--output-dir", str(tmp_path), "--cluster", "local:x", *COMMON]) == 2
    assert "number of workers" in capsys.readouterr().err
