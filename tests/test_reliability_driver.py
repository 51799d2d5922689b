"""Driver loss: the fitting process SIGKILLed mid-iteration or mid-write; outputs are intact or absent, never torn.

Some kills are placed exactly: the real ``dgmm`` command runs in a subprocess
whose chunk function (or Parquet part writer) SIGKILLs its own process at the
N-th call, so the process dies in the middle of an EM pass or of a write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import psutil
import pytest
import zarr

from dgmm import GaussianMixture, load_model, save_model
from dgmm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dgmm.io import SUCCESS_MARKER
from dgmm.model_io import ModelFormatError
from conftest import assert_same_model
from cli_helpers import blobs, dgmm_command, run_dgmm, running, wait_for_line, write_config

MODEL = {"n_components": 4, "covariance_type": "full", "random_state": 3, "tol": 0.0, "max_iter": 12}

#: Runs ``dgmm ARGS`` with ``TARGET`` in ``MODULE`` replaced by a wrapper that SIGKILLs this process at call ``AT``
#: (outputs written one part per input chunk: no merging of small chunks, so there are parts to be killed in).
KILLER = """
import importlib, os, signal, sys
import dgmm.io
dgmm.io.MIN_OUTPUT_CHUNK_BYTES = 0
module = importlib.import_module(os.environ["KILL_MODULE"])
name, at = os.environ["KILL_TARGET"], int(os.environ["KILL_AT"])
original, calls = getattr(module, name), [0]
def wrapper(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(module, name, wrapper)
from dgmm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_killed(*args, module, target, at, timeout=300):
    env = dict(os.environ, KILL_MODULE=module, KILL_TARGET=target, KILL_AT=str(at))
    return subprocess.run([sys.executable, "-c", KILLER, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def zarr_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("driver")
    X = blobs(20_000, 4, seed=7)
    path = root / "x.zarr"
    zarr.open_array(str(path), mode="w", shape=X.shape, chunks=(1_000, 4), dtype="f8")[:] = X  # 20 chunks
    return path


@pytest.fixture(scope="module")
def reference(zarr_data):
    import dask.array as da

    return GaussianMixture(**MODEL).fit(da.from_zarr(str(zarr_data)))


def test_sigkill_inside_a_chunk_task_of_iteration_4_then_resume(tmp_path, zarr_data, reference):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(zarr_data)}, "model": MODEL, "cluster": {"type": "threads"},
        "output": {"model": str(out / "model.npz"), "checkpoint_every": 1},
    })
    # 20 chunk tasks per pass: call 70 is the 10th chunk of iteration 4
    killed = run_killed("fit", config, module="dgmm.chunk", target="e_step_statistics", at=3 * 20 + 10)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "iteration    3" in killed.stdout and "iteration    4" not in killed.stdout
    assert load_checkpoint(str(out / "model.checkpoint.npz")).n_iter == 3
    # no model, nothing half-written; the killed fit's lock file (released by its death) is taken over and removed
    assert sorted(os.listdir(out)) == [".model.checkpoint.npz.dgmm-lock", "model.checkpoint.npz"]

    resumed = run_dgmm("fit", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "after iteration 3" in resumed.stdout and "iteration    4" in resumed.stdout
    assert_same_model(load_model(out / "model.npz"), reference, atol=1e-13)
    assert sorted(os.listdir(out)) == ["model.npz"]


@pytest.mark.slow
def test_driver_of_a_local_cluster_killed_mid_iteration_leaves_no_worker_processes(tmp_path, zarr_data, reference):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(zarr_data)}, "model": {**MODEL, "max_iter": 40},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
        "output": {"model": str(out / "model.npz"), "checkpoint_every": 1},
    })
    with running(dgmm_command("fit", config), stderr=subprocess.DEVNULL) as proc:
        wait_for_line(proc, "iteration    3")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2  # the worker processes (and multiprocessing helpers)
        proc.send_signal(signal.SIGKILL)  # iteration 4 is running
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, f"orphaned processes after the driver died: {[p.pid for p in alive]}"
    assert not (out / "model.npz").exists()
    killed_at = load_checkpoint(str(out / "model.checkpoint.npz")).n_iter
    assert 3 <= killed_at < 40

    resumed = run_dgmm("fit", config, "--resume", "--set", "model.max_iter=12", "--set", "cluster.type=threads",
                       "--set", "cluster.n_workers=null", "--set", "cluster.threads_per_worker=null")
    if killed_at >= 12:  # (never seen: a pass takes far longer than reading one line)
        pytest.skip(f"the kill landed after iteration {killed_at}")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_model(load_model(out / "model.npz"), reference, atol=1e-13)


WRITER = """
import sys, numpy as np
from dgmm import GaussianMixture, save_model
from dgmm.checkpoint import CheckpointState, save_checkpoint
kind, path = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
models = [GaussianMixture(12, random_state=seed, max_iter=2).fit(rng.normal(size=(400, 20))) for seed in (0, 1)]
print("ready", flush=True)
i = 0
while True:
    gm = models[i % 2]
    if kind == "model":
        save_model(gm, path, metadata={"i": i})
    else:
        run = {"weights": gm.weights_, "means": gm.means_, "covariances": gm.covariances_,
               "precisions_cholesky": gm.precisions_cholesky_, "lower_bound": -1.0, "lower_bounds": [-1.0],
               "n_iter": 1, "converged": False}
        fingerprint = {"n_components": 12, "n_features": 20, "covariance_type": "full", "seed": i % 2}
        save_checkpoint(path, CheckpointState(fingerprint=fingerprint, n_iter=i + 1, active=[0], runs=[run]), "x")
    i += 1
"""


@pytest.mark.parametrize("kind", ["model", "checkpoint"])
def test_sigkill_while_writing_in_a_loop_leaves_the_previous_good_file(tmp_path, kind):
    """Kill a process that rewrites the same file as fast as it can; the file always loads whole."""
    path = tmp_path / f"{kind}.npz"
    rng = np.random.default_rng(5)
    # At least 5 kills; more (up to 20) until one has landed inside a write (timing-dependent under load).
    torn_writes, versions = set(), set()
    for attempt in range(20):
        if attempt >= 5 and torn_writes:
            break
        with running([sys.executable, "-c", WRITER, kind, str(path)], stderr=None) as proc:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.05 + rng.uniform(0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        if kind == "model":
            model = load_model(path)  # never torn: the previous complete write is there
            versions.add(round(float(model.means_[0, 0]), 12))
        else:
            state = load_checkpoint(str(path))
            versions.add(state.fingerprint["seed"])
        leftovers = [f for f in os.listdir(tmp_path) if f != path.name]
        assert all(f.startswith(path.name + ".") and f.endswith(".tmp") for f in leftovers), leftovers
        torn_writes.update(leftovers)  # a temporary file left behind: the kill landed inside a write
        # (each writer's first completed write removes those of the writers killed before it)
    assert torn_writes, "no kill landed inside a write; the test proved nothing"
    for leftover in os.listdir(tmp_path):
        if leftover.endswith(".tmp"):  # a temporary file, whole or torn: loads, or is refused cleanly
            try:
                (load_model if kind == "model" else load_checkpoint)(str(tmp_path / leftover))
            except (CheckpointError, ModelFormatError):
                pass
    if kind == "model":  # the next write removes what the killed writers left
        save_model(load_model(path), path)
    else:
        save_checkpoint(str(path), load_checkpoint(str(path)), "x")
    assert os.listdir(tmp_path) == [path.name]


def test_predict_killed_mid_write_keeps_the_previous_output(tmp_path, zarr_data, reference):
    save_model(reference, tmp_path / "model.npz")
    target = tmp_path / "pred.parquet"
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(zarr_data)}, "cluster": {"type": "threads"},
        "output": {"model": str(tmp_path / "model.npz")},
        "predict": {"output": str(target), "probabilities": True},
    })
    killed = run_killed("predict", config, module="dgmm.io", target="_write_parquet_part", at=5)
    assert killed.returncode == -signal.SIGKILL
    assert not target.exists()  # nothing at the target: the staged parts were never committed
    assert all(name.startswith(".pred.parquet.dgmm-staging-") for name in os.listdir(tmp_path)
               if name.startswith(".")), os.listdir(tmp_path)

    staged = [name for name in os.listdir(tmp_path) if name.startswith(".pred.parquet.dgmm-staging-")]
    assert staged  # what the killed writer left (as large as the output)
    first = run_dgmm("predict", config)
    assert first.returncode == 0, first.stderr
    assert not [name for name in os.listdir(tmp_path) if "dgmm-staging" in name]  # swept by the next write
    before = pd.read_parquet(target)
    marker = (target / SUCCESS_MARKER).read_text()
    killed = run_killed("predict", config, "--set", "predict.overwrite=true", "--set", "predict.probabilities=false",
                        module="dgmm.io", target="_write_parquet_part", at=12)
    assert killed.returncode == -signal.SIGKILL
    assert (target / SUCCESS_MARKER).read_text() == marker  # the committed output is untouched
    pd.testing.assert_frame_equal(pd.read_parquet(target), before)
    np.testing.assert_array_equal(before["label"].to_numpy(), reference.predict(zarr.open_array(str(zarr_data))[:]))
    assert [name for name in os.listdir(tmp_path) if "dgmm-staging" in name]
    again = run_dgmm("predict", config, "--set", "predict.overwrite=true")
    assert again.returncode == 0, again.stderr
    assert not [name for name in os.listdir(tmp_path) if "dgmm-staging" in name]
