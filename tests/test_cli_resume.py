"""`dgmm fit` killed with SIGKILL after its second checkpoint, then `--resume`: the uninterrupted model."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import zarr

from dgmm import load_model
from dgmm.checkpoint import load_checkpoint
from conftest import assert_same_model
from cli_helpers import (blobs, dgmm_command, run_dgmm, running, wait_for_checkpoint,
                         wait_for_line, write_config)


def test_sigkill_then_resume_gives_the_uninterrupted_model(tmp_path):
    X = blobs(40_000, 4, seed=7)
    data = tmp_path / "x.zarr"
    zarr.open_array(str(data), mode="w", shape=X.shape, chunks=(2_000, 4), dtype="f8")[:] = X
    base = {
        "input": {"path": str(data)},
        "model": {"n_components": 4, "covariance_type": "full", "random_state": 3, "tol": 0.0, "max_iter": 25,
                  "n_init": 2},
        "cluster": {"type": "threads"},
    }
    reference = write_config(tmp_path / "reference.yaml", {**base, "output": {"model": str(tmp_path / "ref.npz"),
                                                                           "checkpoint_every": 0}})
    whole = run_dgmm("fit", reference)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", {**base, "output": {"model": str(out / "model.npz"),
                                                                   "checkpoint_every": 2}})
    checkpoint = out / "model.checkpoint.npz"
    with running(dgmm_command("fit", config)) as proc:
        wait_for_checkpoint(proc, checkpoint, n_iter=4)  # the second checkpoint (every 2 iterations)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.npz").exists(), "a killed fit must not leave a model"
    killed_at = load_checkpoint(str(checkpoint)).n_iter
    assert 4 <= killed_at < 25

    resumed = run_dgmm("fit", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint} after iteration {killed_at}" in resumed.stdout
    assert f"iteration {killed_at + 1:4d}" in resumed.stdout and f"iteration {killed_at:4d}" not in resumed.stdout
    a, b = load_model(out / "model.npz"), load_model(tmp_path / "ref.npz")
    assert_same_model(a, b, rtol=1e-10)
    assert a.n_iter_ == 25
    assert not checkpoint.exists()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    X = blobs(3000, 2, seed=8)
    np.save(tmp_path / "x.npy", X)
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy")},
        "model": {"n_components": 2, "random_state": 0, "max_iter": 3, "tol": 0.0},
        "cluster": {"type": "threads"},
        "output": {"model": str(tmp_path / "m.npz"), "checkpoint": str(tmp_path / "keep.npz")},
    })
    first = run_dgmm("fit", config)
    assert first.returncode == 0, first.stderr
    # a checkpoint left by an interrupted fit with 2 components (re-created: a finished fit removes its own)
    from dgmm import GaussianMixture

    GaussianMixture(2, random_state=0, max_iter=2, tol=0.0, checkpoint=str(tmp_path / "keep.npz")).fit(X)
    other = run_dgmm("fit", config, "--resume", "--set", "model.n_components=3", "--set", "model.tol=1e-3",
                     "--set", "output.overwrite=true")
    # a config error, found before any cluster starts or data is read (no "data:" line)
    assert other.returncode == 2 and other.stdout == ""
    assert (f"--resume: the checkpoint {tmp_path / 'keep.npz'} was written with other model settings "
            "(differs in: n_components, tol)") in other.stderr
    assert (tmp_path / "keep.npz").exists()
    same = run_dgmm("fit", config, "--resume", "--set", "output.overwrite=true", "--set", "model.max_iter=5")
    assert same.returncode == 0, same.stderr
    assert "resuming from" in same.stdout
    # nothing to resume (the finished fit removed its checkpoint): said, then a fit from the start
    assert not (tmp_path / "keep.npz").exists()
    fresh = run_dgmm("fit", config, "--resume", "--set", "output.overwrite=true")
    assert fresh.returncode == 0 and "resuming from" not in fresh.stdout
    assert f"dgmm: warning: --resume: no checkpoint at {tmp_path / 'keep.npz'}; fitting from the start" in fresh.stderr


def test_resume_refuses_a_checkpoint_of_rows_changed_since(tmp_path):
    """Rows changed away from the first and last 256 (a partition rewritten): refused after the first pass,
    exit 1, with the checkpoint and no model left; the restored input resumes."""
    X = blobs(3000, 2, seed=9)
    np.save(tmp_path / "x.npy", X)
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy"), "chunk_rows": 500},
        "model": {"n_components": 2, "random_state": 0, "max_iter": 6, "tol": 0.0},
        "cluster": {"type": "threads"},
        "output": {"model": str(tmp_path / "m.npz"), "checkpoint": str(tmp_path / "keep.npz")},
    })
    from dgmm import GaussianMixture

    GaussianMixture(2, random_state=0, max_iter=3, tol=0.0, checkpoint=str(tmp_path / "keep.npz")).fit(X)
    changed = X.copy()
    changed[1000:1500] = X[1000:1500][::-1] + [0.0, 0.5]
    np.save(tmp_path / "x.npy", changed)
    refused = run_dgmm("fit", config, "--resume")
    assert refused.returncode == 1, refused.stderr
    assert (f"dgmm: error: checkpoint {tmp_path / 'keep.npz'} was written for other data: the rows' sums differ "
            "in 1 of 2 features (feature 1: by ") in refused.stderr
    assert "The input changed since the checkpoint was written" in refused.stderr
    assert load_checkpoint(str(tmp_path / "keep.npz")).n_iter == 3 and not (tmp_path / "m.npz").exists()
    np.save(tmp_path / "x.npy", X)
    resumed = run_dgmm("fit", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    whole = GaussianMixture(2, random_state=0, max_iter=6, tol=0.0).fit(X)
    assert_same_model(load_model(tmp_path / "m.npz"), whole, rtol=1e-10, history=False)


LOCAL = {"n_workers": 2, "threads_per_worker": 1}


@pytest.mark.parametrize("cluster, stop", [({"type": "threads"}, "SIGINT"), (LOCAL, "SIGINT"), (LOCAL, "SIGTERM"),
                                           (LOCAL, "SIGHUP")],
                         ids=["threads", "local_cluster", "local_cluster_sigterm", "local_cluster_sighup"])
def test_ctrl_c_leaves_a_resumable_checkpoint_and_no_model(tmp_path, cluster, stop):
    """Ctrl-C (SIGINT to the terminal's process group), SIGTERM to every process of the group (Slurm ending a
    job, a walltime) or SIGHUP (a closed terminal): the checkpoint of the last iteration, the --resume hint, no
    model, workers closed, and nothing from the worker processes or multiprocessing's resource tracker."""
    # on a LocalCluster, iterations long enough (about 1 s) that Ctrl-C lands while the client waits for results
    n, d, k, rows = (40_000, 4, 4, 2000) if cluster.get("type") == "threads" else (2_000_000, 8, 8, 100_000)
    X = blobs(n, d, seed=7)
    np.save(tmp_path / "x.npy", X)
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy"), "chunk_rows": rows},
        "model": {"n_components": k, "random_state": 1, "tol": 0.0, "max_iter": 40, "init_params": "random"},
        "cluster": cluster,
        "output": {"model": str(tmp_path / "model.npz"), "checkpoint_every": 10},
    })
    with running(dgmm_command("fit", config), new_session=True) as proc:
        wait_for_line(proc, "iteration    2")
        time.sleep(0 if cluster.get("type") == "threads" else 0.5)  # into the next iteration's pass
        os.killpg(proc.pid, getattr(signal, stop))  # the LocalCluster's worker processes get it too
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == (130 if stop == "SIGINT" else 128 + getattr(signal, stop)), stderr
    assert "--resume' continues from" in stderr
    last = "dgmm: error: interrupted" if stop == "SIGINT" else f"dgmm: error: terminated ({stop})"
    assert stderr.rstrip().endswith(last), stderr
    assert "Restarting worker" not in stderr and "resource_tracker" not in stderr, stderr
    assert "Task exception was never retrieved" not in stderr and "Traceback" not in stderr  # no asyncio noise
    assert "KeyboardInterrupt" not in stderr and "lose already computed" not in stderr  # nor the workers'
    assert not (tmp_path / "model.npz").exists()
    assert load_checkpoint(str(tmp_path / "model.checkpoint.npz")).n_iter >= 2  # saved on Ctrl-C, not at 10


#: ``dgmm ARGS`` with a Ctrl-C (KeyboardInterrupt) raised when ``TARGET`` of ``MODULE`` is called.
INTERRUPTER = """
import importlib, os, sys
module = importlib.import_module(os.environ["STOP_MODULE"])
owner, name = (module, os.environ["STOP_TARGET"])
if "." in name:
    cls, name = name.split(".")
    owner = getattr(module, cls)
def interrupt(*args, **kwargs):
    raise KeyboardInterrupt
setattr(owner, name, interrupt)
from dgmm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("module, target, checkpoint", [
    ("dgmm.estimator", "GaussianMixture._initialize_runs", False),  # no iteration yet: nothing to resume
    ("dgmm.cli", "_save_model", True),  # every iteration done: --resume finishes at once
])
def test_the_resume_hint_is_given_when_there_is_a_checkpoint_to_resume(tmp_path, module, target, checkpoint):
    """The hint came with a Ctrl-C while initialising (when --resume only warns "no checkpoint") and not
    with one while the model was written (when the checkpoint exists)."""
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", blobs(3000, 2, seed=1))
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy")}, "model": {"n_components": 2, "max_iter": 3, "tol": 0.0},
        "cluster": {"type": "threads"}, "output": {"model": str(tmp_path / "model.npz")}})
    env = dict(os.environ, STOP_MODULE=module, STOP_TARGET=target)
    stopped = subprocess.run([sys.executable, "-c", INTERRUPTER, "fit", str(config)], env=env, capture_output=True,
                             text=True, timeout=300, check=False)
    assert stopped.returncode == 130 and stopped.stderr.rstrip().endswith("dgmm: error: interrupted"), stopped.stderr
    assert (tmp_path / "model.checkpoint.npz").exists() == checkpoint
    assert (f"interrupted; 'dgmm fit {config} --resume' continues from {tmp_path / 'model.checkpoint.npz'}"
            in stopped.stderr) == checkpoint, stopped.stderr
    if checkpoint:  # and it does
        resumed = run_dgmm("fit", config, "--resume")
        assert resumed.returncode == 0 and "fit: 3 EM iterations (0 after resuming from iteration 3)" in resumed.stdout, resumed.stdout


HOLDER = """
import sys, time
from dgmm.checkpoint import exclusive_writer
with exclusive_writer(sys.argv[1], "dgmm fit"):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_second_fit_on_the_same_checkpoint_is_refused_until_the_first_ends(tmp_path):
    """Two fits on one model interleaved their checkpoints, and the last to end deleted the other's under it. The
    second is refused while the first runs; a lock left by a killed fit (kill -9) is taken over."""
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", blobs(2000, 2, seed=3))
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy")}, "model": {"n_components": 2, "random_state": 0, "max_iter": 3},
        "cluster": {"type": "threads"}, "output": {"model": str(tmp_path / "out" / "m.npz")}})
    checkpoint = tmp_path / "out" / "m.checkpoint.npz"
    with running([sys.executable, "-c", HOLDER, str(checkpoint)]) as holder:
        assert holder.stdout.readline().strip() == "holding"
        for command in ("fit", "select"):
            refused = run_dgmm(command, config, *(["--n-components", "2"] if command == "select" else []))
            assert refused.returncode == 1, refused.stderr
            assert (f"dgmm: error: another dgmm fit (host {os.uname().nodename}, process {holder.pid}) is writing "
                    f"{checkpoint}; wait for it to end, or write elsewhere") in refused.stderr
        assert sorted(os.listdir(tmp_path / "out")) == [".m.checkpoint.npz.dgmm-lock"]
        holder.kill()
        holder.wait()
    done = run_dgmm("fit", config)  # the killed holder's lock file is left, and taken over
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["m.npz"]


#: ``dgmm ARGS``, sent SIGTERM as soon as its LocalCluster has spawned a worker process (the cluster still starting).
TERM_AT_START = """
import os, signal, sys, threading, time
import psutil

def watch():
    me = psutil.Process()
    while True:
        try:
            if any("spawn_main" in " ".join(child.cmdline()) for child in me.children()):
                os.kill(os.getpid(), signal.SIGTERM)
                return
        except psutil.Error:
            pass
        time.sleep(0.005)

if __name__ == "__main__":
    threading.Thread(target=watch, daemon=True).start()
    from dgmm.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_while_the_local_cluster_starts_stops_the_command_cleanly(tmp_path):
    """SIGTERM (or Ctrl-C) while the LocalCluster's workers were starting left it half made: distributed's exit hook
    then printed "AssertionError: Status.init" (and a worker being spawned "EOFError: Ran out of input") after
    "terminated". The signal now takes effect once the cluster has started, which is then closed as usual."""
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", blobs(2000, 2, seed=4))
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy")}, "model": {"n_components": 2, "max_iter": 2},
        "cluster": {"n_workers": 2, "threads_per_worker": 1}, "output": {"model": str(tmp_path / "m.npz")}})
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", TERM_AT_START, "fit", config], capture_output=True,
                                text=True, timeout=120, check=False)
        assert result.returncode == 128 + signal.SIGTERM, result.stderr
        assert result.stderr.splitlines() == ["dgmm: stopping once the cluster has started (again: at once)",
                                              "dgmm: error: terminated (SIGTERM)"], result.stderr
        assert not (tmp_path / "m.npz").exists()
