"""`dgmm fit` whose workers are Slurm jobs (dask-jobqueue's SLURMCluster on a real slurmctld/slurmd).

The config is ``configs/slurm-local.yaml`` with test paths and small data. The walltime
case: the job running the worker is cancelled mid-fit (``scancel``, as a walltime expiry
or a preemption ends it), the stalled fit is interrupted, and ``dgmm fit --resume``
continues from its checkpoint on newly submitted jobs, ending at the uninterrupted model.

Skipped unless Slurm (slurm-wlm, munge) is installed and this runs as root: the daemons
are started with ``scripts/slurm_setup.sh start`` when they are not already running, and
stopped again at the end if this module started them. A file lock serialises concurrent
runs of this module on one machine.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from dgmm import GaussianMixture, load_model
from dgmm.checkpoint import load_checkpoint
from conftest import assert_same_model
from cli_helpers import (blobs, dgmm_command, run_dgmm, running, wait_for_checkpoint, wait_until,
                         write_config)

pytestmark = [pytest.mark.slurm, pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")]

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "slurm_setup.sh"
CONFIG = ROOT / "configs" / "slurm-local.yaml"
LOCK = os.path.join(tempfile.gettempdir(), "dgmm-slurm-test.lock")


def _slurm_up() -> bool:
    ping = subprocess.run(["scontrol", "ping"], check=False, capture_output=True, text=True)
    return "is UP" in ping.stdout


def _job_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("needs root to start Slurm")
    missing = [cmd for cmd in ("slurmctld", "slurmd", "munged", "sbatch", "scancel") if shutil.which(cmd) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)}): sudo scripts/slurm_setup.sh install")
    pytest.importorskip("dask_jobqueue")
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started_here = not _slurm_up()
        if started_here:
            started = subprocess.run(["bash", str(SETUP), "start"], check=False, capture_output=True, text=True,
                                     timeout=120)
            if started.returncode != 0:
                pytest.skip(f"Slurm could not be started: {started.stderr.strip()[-500:]}")
        before = _job_ids()
        try:
            yield before
        finally:
            leftover = _job_ids() - before
            if leftover:
                subprocess.run(["scancel", *sorted(leftover)], check=False, capture_output=True)
            if started_here:
                subprocess.run(["bash", str(SETUP), "stop"], check=False, capture_output=True, timeout=120)


def _config(tmp_path, data, output: dict, model=None, **jobqueue) -> str:
    """``configs/slurm-local.yaml`` reading ``data``, writing ``output``, with one job of the given settings."""
    config = yaml.safe_load(CONFIG.read_text())
    config["input"] = {"path": str(data)}
    config["model"].update(model or {})
    config["cluster"]["jobqueue"].update(jobs=1, **jobqueue)
    config["output"] = output
    return write_config(tmp_path / "slurm.yaml", config)


def test_fit_on_slurm_jobs_survives_a_cancelled_job_by_resuming_on_new_jobs(tmp_path, slurm):
    X = blobs(24_000, 4, seed=11)
    data = tmp_path / "x.zarr"
    zarr.open_array(str(data), mode="w", shape=X.shape, chunks=(2_000, 4), dtype="f8")[:] = X
    model = {"n_components": 5, "random_state": 2, "tol": 0.0, "max_iter": 40}
    reference = GaussianMixture(**{**model, "covariance_type": "full"}).fit(X)
    config = _config(tmp_path, data, {"model": str(tmp_path / "out" / "model.npz"), "checkpoint_every": 1}, model,
                     walltime="00:10:00", log_directory=str(tmp_path / "slurm-logs"), wait_timeout=120,
                     local_directory=str(tmp_path / "worker-space"))
    checkpoint = tmp_path / "out" / "model.checkpoint.npz"

    with running(dgmm_command("fit", config)) as proc:
        wait_for_checkpoint(proc, checkpoint, n_iter=3, timeout=180)
        first_jobs = _job_ids() - slurm
        assert len(first_jobs) == 1, first_jobs  # jobs: 1, one worker process
        subprocess.run(["scancel", *first_jobs], check=True)  # the job's walltime is over
        assert wait_until(lambda: not _job_ids() & first_jobs, timeout=60), "scancel did not end the job"
        time.sleep(1.0)
        assert proc.poll() is None, "without workers the fit waits (it is not failed by a lost job)"
        # the driver's own allocation ends too: Slurm sends SIGTERM (then SIGKILL after KillWait)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr  # handled as Ctrl-C: jobs cancelled, the hint
    assert "--resume' continues from" in stderr and stderr.rstrip().endswith("dgmm: error: terminated (SIGTERM)")
    assert not (tmp_path / "out" / "model.npz").exists()
    stopped_at = load_checkpoint(str(checkpoint)).n_iter
    assert 3 <= stopped_at < model["max_iter"]

    resumed = run_dgmm("fit", config, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "cluster: submitted 1 slurm job(s)" in resumed.stdout
    assert f"resuming from {checkpoint} after iteration {stopped_at}" in resumed.stdout
    assert f"iteration {stopped_at + 1:4d}" in resumed.stdout
    logs = sorted(p.name for p in (tmp_path / "slurm-logs").glob("*.out"))
    assert len(logs) == 2, logs  # one job per fit: the resumed fit ran on a new job

    fitted = load_model(tmp_path / "out" / "model.npz")
    assert fitted.n_iter_ == reference.n_iter_ == model["max_iter"]
    assert_same_model(fitted, reference, rtol=1e-10, history=False)
    assert not checkpoint.exists()


def test_ctrl_c_while_waiting_for_slurm_jobs_exits_130(tmp_path, slurm):
    X = blobs(1_000, 2)
    np.save(tmp_path / "x.npy", X)
    config = _config(tmp_path, tmp_path / "x.npy", {"model": str(tmp_path / "model.npz")},
                     job_extra_directives=["--begin=now+1hour"], log_directory=str(tmp_path / "logs"))  # stays pending
    with running(dgmm_command("fit", config)) as proc:
        assert wait_until(lambda: _job_ids() - slurm, timeout=60), "no job was submitted"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, stdout, stderr)
    assert "interrupted" in stderr


def test_jobs_that_cannot_start_a_worker_are_reported_at_once_in_the_batch_systems_words(tmp_path, slurm):
    """A refused submission waited wait_timeout after asyncio tracebacks; jobs that ended at once, or that can
    never start, waited it without saying why."""
    np.save(tmp_path / "x.npy", blobs(1_000, 2))
    config = _config(tmp_path, tmp_path / "x.npy", {"model": str(tmp_path / "model.npz")},
                     log_directory=str(tmp_path / "logs"), wait_timeout=600)
    started = time.monotonic()
    refused = run_dgmm("fit", config, "--set", "cluster.jobqueue.queue=nosuchpartition")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "dgmm: error: cluster.jobqueue: the slurm job submission failed: sbatch: error: " in refused.stderr
    assert "nosuchpartition" in refused.stderr and "submitted" not in refused.stdout
    failed = run_dgmm("fit", config, "--set", 'cluster.jobqueue.job_script_prologue=["exit 3"]')
    assert failed.returncode == 1, failed.stderr
    assert "the slurm jobs ended before any worker joined" in failed.stderr
    assert f"see what they printed (their output: {tmp_path / 'logs'})" in failed.stderr
    assert time.monotonic() - started < 300  # neither waited wait_timeout (600 s)
    pending = run_dgmm("fit", config, "--set", "cluster.jobqueue.wait_timeout=8",
                       "--set", 'cluster.jobqueue.job_extra_directives=["--begin=now+1hour"]')
    assert pending.returncode == 1, pending.stderr
    assert "no slurm worker joined within 8 s" in pending.stderr and "PENDING (BeginTime)" in pending.stderr
    assert not (tmp_path / "model.npz").exists()
    assert wait_until(lambda: not (_job_ids() - slurm), timeout=60)  # every job was cancelled
