"""`cluster.jobqueue` through dask-jobqueue, with a stand-in `sbatch` that runs each job script locally.

The stand-ins are tiny shell scripts on PATH: `sbatch` starts the job script (which runs real
`dask worker` processes) in its own process group and prints Slurm's "Submitted batch job ID";
`scancel ID` ends that process group. Everything listens on the loopback interface.
"""

from __future__ import annotations

import os
import shutil
import stat

import numpy as np
import pytest

from dgmm import GaussianMixture, load_model
from cli_helpers import blobs, run_dgmm, write_config

pytest.importorskip("dask_jobqueue")
pytestmark = pytest.mark.skipif(shutil.which("setsid") is None or shutil.which("bash") is None,
                                reason="needs bash and setsid")

SBATCH = """#!/usr/bin/env bash
set -e
copy="$FAKE_SLURM_DIR/job-$RANDOM$RANDOM.sh"
cp "$1" "$copy"
setsid bash "$copy" > "$copy.log" 2>&1 < /dev/null &
echo "$!" >> "$FAKE_SLURM_DIR/jobs"
echo "Submitted batch job $!"
"""
SCANCEL = """#!/usr/bin/env bash
kill -TERM -- "-$1" 2>/dev/null || true
"""


def install(directory, name, text):
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_fit_on_a_slurm_cluster_through_dask_jobqueue(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    install(bin_dir, "sbatch", SBATCH)
    install(bin_dir, "scancel", SCANCEL)
    X = blobs(1500, 2, seed=12)
    np.save(tmp_path / "x.npy", X)
    model = {"n_components": 3, "random_state": 0, "tol": 1e-6}
    config = write_config(tmp_path / "slurm.yaml", {
        "input": {"path": str(tmp_path / "x.npy"), "chunk_rows": 400},
        "model": model,
        "cluster": {"jobqueue": {"system": "slurm", "cores": 2, "processes": 2, "memory": "2GB", "jobs": 1,
                                 "walltime": "00:10:00", "interface": "lo", "wait_timeout": 120,
                                 "local_directory": str(tmp_path / "scratch"),
                                 "job_extra_directives": ["--exclusive"]}},
        "output": {"model": str(tmp_path / "model.npz")},
    })
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path)}
    try:
        result = run_dgmm("fit", config, env=env, timeout=240)
    finally:
        for pid in (tmp_path / "jobs").read_text().split() if (tmp_path / "jobs").exists() else []:
            try:
                os.killpg(int(pid), 9)
            except ProcessLookupError:
                pass
    assert result.returncode == 0, result.stderr
    assert "submitted 1 slurm job(s)" in result.stdout
    assert "slurm jobqueue cluster with" in result.stdout
    scripts = [p for p in os.listdir(tmp_path) if p.startswith("job-") and p.endswith(".sh")]
    assert len(scripts) == 1
    script = (tmp_path / scripts[0]).read_text()
    assert "#SBATCH --exclusive" in script and "#SBATCH -t 00:10:00" in script and "--interface lo" in script
    # read-ahead: each of the 2 processes runs 2 threads on its core; the job still books 2 CPUs
    assert "#SBATCH --cpus-per-task=2" in script
    assert "--nthreads 2" in script and "--nworkers 2" in script
    expected = GaussianMixture(**model).fit(X)
    np.testing.assert_allclose(load_model(tmp_path / "model.npz").means_, expected.means_, rtol=1e-10)


@pytest.mark.parametrize("system, booked", [("slurm", "#SBATCH --cpus-per-task=4"), ("lsf", "#BSUB -n 4"),
                                            ("pbs", "#PBS -l select=1:ncpus=4:mem=3815MB"), ("sge", None)])
@pytest.mark.parametrize("read_ahead", [True, False])
def test_jobqueue_workers_read_ahead_and_jobs_book_the_configured_cores(system, booked, read_ahead):
    """cores: 4 in 2 processes: 2 cores per process, run by 4 threads with read-ahead; 4 CPUs booked either way."""
    import dask_jobqueue

    from dgmm.cli import _jobqueue_kwargs
    from dgmm.config import JobqueueConfig

    jq = JobqueueConfig(system=system, cores=4, memory="4GB", processes=2)
    kwargs = _jobqueue_kwargs(jq, read_ahead, dashboard_address=None)
    assert kwargs["scheduler_options"] == {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
    cls = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}[system]
    with getattr(dask_jobqueue, cls)(**kwargs) as cluster:
        script = cluster.job_script()
        # dashboard_address: null: the /health and /metrics server on a free port, not 8787 of every interface
        assert cluster.scheduler.http_server.port != 8787
    assert f"--nthreads {4 if read_ahead else 2}" in script and "--nworkers 2" in script
    if booked is not None:
        assert booked in script
