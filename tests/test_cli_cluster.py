"""`dgmm fit` on an existing scheduler (separately started `dask scheduler` and `dask worker` processes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import zarr

from dgmm import GaussianMixture, load_model
from cli_helpers import blobs, dgmm_command, run_dgmm, running, wait_for_line, write_config

def start_scheduler(root, n_workers=1):
    """A `dask scheduler` and `n_workers` single-threaded `dask worker` processes on 127.0.0.1: (address, procs)."""
    scheduler_file = root / "scheduler.json"
    procs = [subprocess.Popen(dask_command("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                           "--scheduler-file", str(scheduler_file)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() or not scheduler_file.read_text().strip():
        assert time.monotonic() < deadline, "the scheduler did not start"
        time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    assert address.startswith("tcp://127.0.0.1:")
    return address, procs + start_scheduler_workers(root, address, n_workers)


def start_scheduler_workers(root, address, n_workers, first=0):
    """``n_workers`` single-threaded `dask worker` processes for the scheduler at ``address``."""
    return [subprocess.Popen(dask_command("worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                          "--no-dashboard", "--name", f"w{i}", "--local-directory", str(root / f"w{i}")),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
            for i in range(first, first + n_workers)]


def stop_all(procs):
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dask_command(*args):
    """The `dask` console script of this interpreter's environment."""
    return [sys.executable, "-c", "import sys; from dask.__main__ import main; sys.exit(main())", *args]


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """A `dask scheduler` and two single-threaded `dask worker` processes, all on 127.0.0.1."""
    root = tmp_path_factory.mktemp("scheduler")
    address, procs = start_scheduler(root, n_workers=2)
    try:
        from distributed import Client

        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        stop_all(procs)


def test_fit_and_predict_through_address(tmp_path, scheduler):
    X = blobs(2400, 3, seed=4)
    data = tmp_path / "x.zarr"
    zarr.open_array(str(data), mode="w", shape=X.shape, chunks=(300, 3), dtype="f8")[:] = X
    model = {"n_components": 3, "random_state": 0, "tol": 1e-6, "covariance_type": "tied"}
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(data)},
        "model": model,
        "cluster": {"address": scheduler, "timeout": 20},
        "output": {"model": str(tmp_path / "model.npz")},
        "predict": {"output": str(tmp_path / "pred.parquet"), "probabilities": True},
    })
    fit = run_dgmm("fit", config)
    assert fit.returncode == 0, fit.stderr
    # started with --no-dashboard: said so, not "pip install bokeh" (which would change nothing over there)
    assert f"cluster: scheduler {scheduler} with 2 workers, 2 threads, the scheduler serves no dashboard" in fit.stdout
    expected = GaussianMixture(**model).fit(X)
    fitted = load_model(tmp_path / "model.npz")
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(fitted, name), getattr(expected, name), rtol=1e-10, err_msg=name)

    predict = run_dgmm("predict", config)
    assert predict.returncode == 0, predict.stderr
    frame = pd.read_parquet(tmp_path / "pred.parquet")
    assert len(frame) == len(X)
    np.testing.assert_array_equal(frame["label"].to_numpy(), expected.predict(X))
    np.testing.assert_allclose(frame.filter(like="probability").to_numpy(), expected.predict_proba(X),
                               rtol=1e-9, atol=1e-12)


def test_a_relative_zarr_path_is_read_by_workers_running_elsewhere(tmp_path, scheduler):
    """The workers run in another directory: a relative input.path named nothing there, and every block read as
    the fill value (zeros), which fitted without an error. Paths are made absolute before the array travels."""
    X = blobs(1200, 3, seed=5)
    zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=X.shape, chunks=(300, 3), dtype="f8")[:] = X
    model = {"n_components": 3, "random_state": 0, "tol": 1e-6}
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": "x.zarr"}, "model": model, "cluster": {"address": scheduler, "timeout": 20},
        "output": {"model": "model.npz"},
    })
    fit = run_dgmm("fit", config, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    expected = GaussianMixture(**model).fit(X)
    np.testing.assert_allclose(load_model(tmp_path / "model.npz").means_, expected.means_, rtol=1e-10)


def test_workers_that_cannot_see_the_zarr_store_fail_instead_of_reading_zeros(tmp_path, scheduler):
    import dask
    from distributed import Client

    from dgmm.io import open_zarr

    X = blobs(1200, 3, seed=6)
    zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=X.shape, chunks=(300, 3), dtype="f8")[:] = X
    lazy = open_zarr(str(tmp_path / "x.zarr"))  # metadata read here; then the store is gone for the workers
    os.rename(tmp_path / "x.zarr", tmp_path / "elsewhere.zarr")
    with Client(scheduler, timeout=30), dask.config.set(scheduler=None):
        with pytest.raises(FileNotFoundError, match=r"x\.zarr: the Zarr array cannot be read on .*every worker "
                                                     r"must see input\.path at the same path"):
            GaussianMixture(2, random_state=0).fit(lazy)


def long_fit_config(tmp_path, address, *, n_samples, n_components, max_iter) -> str:
    """A fit on the scheduler at ``address`` that runs ``max_iter`` iterations (tol 0), to stop or disturb."""
    np.save(tmp_path / "x.npy", blobs(n_samples, 4, seed=7))
    return write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy"), "chunk_rows": 10_000},
        "model": {"n_components": n_components, "random_state": 0, "tol": 0.0, "max_iter": max_iter,
                  "init_params": "random"},
        "cluster": {"address": address, "timeout": 20},
        "output": {"model": str(tmp_path / "model.npz")},
    })


def test_a_scheduler_lost_mid_fit_is_one_line_with_the_resume_hint(tmp_path):
    address, procs = start_scheduler(tmp_path, n_workers=1)
    try:
        config = long_fit_config(tmp_path, address, n_samples=200_000, n_components=6, max_iter=500)
        with running(dgmm_command("fit", config)) as proc:
            wait_for_line(proc, "iteration    2")
            procs[0].kill()  # the scheduler
            _, stderr = proc.communicate(timeout=120)
    finally:
        stop_all(procs)
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr and "dgmm: error: \n" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if "the computation was cancelled" in line]  # one line
    assert "dgmm: error: the computation was cancelled: " in stderr and "was the scheduler, or the connection to " \
        "it, lost?); 'dgmm fit --resume' continues from the last checkpoint" in stderr, stderr
    assert not (tmp_path / "model.npz").exists() and (tmp_path / "model.checkpoint.npz").exists()


def test_a_fit_left_without_workers_says_so_and_goes_on_when_one_joins(tmp_path, monkeypatch):
    """With every worker gone a distributed computation waits, silently: the command said nothing for minutes."""
    address, procs = start_scheduler(tmp_path, n_workers=1)
    try:
        config = long_fit_config(tmp_path, address, n_samples=100_000, n_components=4, max_iter=150)
        with running(dgmm_command("fit", config)) as proc:
            wait_for_line(proc, "iteration    2")
            procs[1].kill()  # the only `dask worker` (its nanny: the worker process goes with it)
            procs[1].wait()
            import queue
            import threading

            lines: queue.Queue = queue.Queue()  # stderr read by a thread: a silent wait must fail the test, not hang it
            threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
            deadline, line, stderr = time.monotonic() + 60, "", ""
            while "cluster: no workers left" not in line:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))  # queue.Empty: no warning came
                stderr += line
            assert "start workers for the scheduler" in line and "--resume" in line
            procs.extend(start_scheduler_workers(tmp_path, address, 1, first=1))
            stdout = proc.stdout.read()
            proc.wait(timeout=180)
    finally:
        stop_all(procs)
    assert proc.returncode == 0, stderr
    assert "cluster: 1 worker now" in stdout and "iteration  150" in stdout, stdout
    assert load_model(tmp_path / "model.npz").n_iter_ == 150


def test_unreachable_scheduler_fails_fast_and_writes_nothing(tmp_path):
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    X = blobs(100, 2)
    np.save(tmp_path / "x.npy", X)
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy")},
        "cluster": {"address": f"tcp://127.0.0.1:{port}", "timeout": 30},
        "output": {"model": str(tmp_path / "model.npz")},
    })
    # refused, or a host that does not exist: final answers, given at once rather than after cluster.timeout
    for address, reason in ((f"tcp://127.0.0.1:{port}", "connection refused (is a scheduler running there?)"),
                            ("tcp://no-such-host.invalid:8786", "unknown host")):
        started = time.monotonic()
        result = run_dgmm("fit", config, "--set", f"cluster.address={address}")
        assert result.returncode == 1, result.stderr
        assert f"dgmm: error: cannot reach the scheduler at {address}: {reason}" in result.stderr, result.stderr
        assert time.monotonic() - started < 25  # not the 30 s timeout (the command's start-up included)
    # a port that accepts and never answers: the timeout, with the reason
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        silent = f"tcp://127.0.0.1:{mute.getsockname()[1]}"
        result = run_dgmm("fit", config, "--set", f"cluster.address={silent}", "--set", "cluster.timeout=2")
    assert result.returncode == 1
    assert f"cannot reach the scheduler at {silent} within 2 s (connected, but no answer" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "x.npy"]


def test_local_cluster_workers_keep_glibc_malloc_thresholds(monkeypatch):
    """distributed's MALLOC_TRIM_THRESHOLD_=65536 doubled the CPU of reading Zarr; the command's workers go without it."""
    from dgmm.cli import open_cluster
    from dgmm.config import ClusterConfig

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)  # an earlier LocalCluster in this process sets it
    with open_cluster(ClusterConfig(n_workers=1, threads_per_worker=1, dashboard_address=None)) as client:
        trim = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        omp = client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
    assert list(trim.values()) == [None]
    assert list(omp.values()) == ["1"]  # distributed's other settings for worker processes stay
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ


def test_no_dashboard_means_no_fixed_port_and_says_so(caplog):
    """dashboard_address: null still gave the scheduler's HTTP server (/health, /metrics) distributed's port
    8787 ("Port 8787 is already in use" beside another cluster), and the line read "dashboard not available
    (pip install bokeh)" or named a /status page that answers 404."""
    import logging
    import urllib.request

    from dgmm.cli import open_cluster
    from dgmm.config import ClusterConfig

    with caplog.at_level(logging.INFO, logger="dgmm"), \
            open_cluster(ClusterConfig(n_workers=1, threads_per_worker=1, processes=False,
                                       dashboard_address=None)) as client:
        port = client.scheduler_info()["services"]["dashboard"]
        assert port != 8787
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).status == 200
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cluster:")]
    assert lines and lines[0].endswith("no dashboard (cluster.dashboard_address: null)"), lines
