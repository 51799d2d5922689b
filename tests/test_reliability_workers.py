"""Worker loss: SIGKILLed worker processes mid-iteration; the fit completes with the undisturbed parameters.

The parameters of an EM iteration are a key of that iteration's graph (a literal
the scheduler holds), not data scattered to workers, so the scheduler can
recompute them after every worker holding them died. Each chunk task reads its
rows from a Zarr file and sleeps a little, so an iteration lasts long enough for a
kill to land in the middle of it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from dask.utils import key_split
from distributed import Client, Future, LocalCluster

from dgmm import GaussianMixture, chunk, graph
from conftest import make_mixture

FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")
CHUNK_DELAY = 0.03  # seconds per chunk task: an iteration of 24 chunks on 2 workers lasts >= 0.36 s
KWARGS = dict(n_components=3, covariance_type="full", random_state=0, tol=0.0, max_iter=6)


def slow_rows(block):
    """Identity on a block of rows, after a short sleep (runs on the workers)."""
    time.sleep(CHUNK_DELAY)
    return block


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes, each under a nanny that restarts it when it dies.

    distributed's SpecCluster closes a worker for good if it is not back
    ``lost-worker-timeout`` after *a* removal, and that timer is not cancelled when
    the worker comes back: a worker killed twice within the timeout (here: once
    per test) can be dropped while its second restart is under way. A long
    timeout keeps the stale timers from firing during this module.
    """
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         host="127.0.0.1") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    X = make_mixture(n_samples=4000, n_features=3, seed=41)
    path = tmp_path_factory.mktemp("workers") / "x.zarr"
    zarr.open_array(str(path), mode="w", shape=X.shape, chunks=(167, 3), dtype="f8")[:] = X
    return str(path)


def slow_array(path):
    return da.from_zarr(path).map_blocks(slow_rows, dtype=np.float64)


@pytest.fixture(scope="module")
def undisturbed(client, data):
    return GaussianMixture(**KWARGS).fit(slow_array(data))


def _iteration_state(dask_scheduler, prefix="e_step_statistics"):
    """What the scheduler holds of the pass now running: its ``prefix`` tasks (runs in the scheduler)."""
    from dask._task_spec import DataNode

    e_steps = [ts for key, ts in dask_scheduler.tasks.items() if key_split(key) == prefix]
    params = [ts for ts in dask_scheduler.tasks.values()
              if isinstance(ts.run_spec, DataNode) and isinstance(ts.run_spec.value, tuple)
              and ts.run_spec.value and all(isinstance(p, chunk.ChunkParams) for p in ts.run_spec.value)]
    return {
        "e_steps": len(e_steps),
        "processing": sum(ts.state == "processing" for ts in e_steps),
        "done": sum(ts.state not in ("waiting", "queued", "no-worker", "processing") for ts in e_steps),
        "params": [(ts.state, sorted(ws.address for ws in (ts.who_has or ()))) for ts in params],
    }


class KillWorkers:
    """An EM callback: after iteration ``after``, SIGKILL ``addresses``' processes once the next pass runs."""

    def __init__(self, client, addresses, after=2, prefix="e_step_statistics"):
        self.client, self.addresses, self.after, self.prefix = client, list(addresses), after, prefix
        self.pids = {a: p for a, p in client.run(os.getpid).items() if a in self.addresses}
        self.state = None
        self.killed_at = None
        self.thread = None

    def __call__(self, info):
        if info.n_iter == self.after:
            self.thread = threading.Thread(target=self._kill, args=(info.n_iter + 1,), daemon=True)
            self.thread.start()

    def _kill(self, iteration):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = self.client.run_on_scheduler(_iteration_state, prefix=self.prefix)
            if state["processing"] and 4 <= state["done"] <= state["e_steps"] - 4:
                for pid in self.pids.values():
                    os.kill(pid, signal.SIGKILL)
                self.state, self.killed_at = state, iteration
                return
            time.sleep(0.005)


def assert_same(a, b):
    for name in FITTED:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-10, atol=0, err_msg=name)
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=1e-10)
    assert a.n_iter_ == b.n_iter_


def wait_for_restarts(client, old_pids, n_workers=2, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = client.run(os.getpid)
        if len(pids) == n_workers and not set(pids.values()) & set(old_pids.values()):
            return pids
        time.sleep(0.2)
    nannies = {name: (str(n.status), str(n.process and n.process.status), n.process and n.process.pid)
               for name, n in client.cluster.workers.items()}
    raise AssertionError(f"the nannies did not restart the workers in {timeout} s: {pids} {nannies}")


def test_parameters_are_a_recomputable_key_of_each_pass():
    """The batch of parameters is one literal key (no Future, no outside key) that every chunk task depends on."""
    from dask._task_spec import DataNode

    X = da.from_array(make_mixture(n_samples=500, n_features=2), chunks=(37, 2))
    params = chunk.chunk_params(np.full(3, 1 / 3), np.zeros((3, 2)), np.stack([np.eye(2)] * 3), "full")
    lazy = graph.e_step_statistics(graph.RowBlocks(X), (params,), split_every=3)
    dsk = dict(lazy.__dask_graph__())
    holders = [k for k, v in dsk.items() if isinstance(v, DataNode) and isinstance(v.value, tuple)
               and v.value and isinstance(v.value[0], chunk.ChunkParams)]
    assert len(holders) == 1, holders
    (key,) = holders
    e_steps = {k: v for k, v in dsk.items() if key_split(k) == "e_step_statistics"}
    assert len(e_steps) == X.numblocks[0]
    assert all(key in v.dependencies for v in e_steps.values())
    # self-contained: every dependency is a key of the graph, nothing refers to data held elsewhere
    for k, v in dsk.items():
        assert not isinstance(getattr(v, "value", None), Future), k
        assert set(getattr(v, "dependencies", ())) <= set(dsk), k


def test_one_worker_killed_mid_iteration(client, data, undisturbed):
    victim = min(client.scheduler_info()["workers"])
    killer = KillWorkers(client, [victim], after=2)
    gm = GaussianMixture(**KWARGS, callbacks=[killer]).fit(slow_array(data))
    killer.thread.join(timeout=5)
    assert killer.killed_at == 3, "the kill did not land during iteration 3"
    state = killer.state
    assert state["processing"] >= 1 and 4 <= state["done"] < state["e_steps"], state  # mid-pass
    assert_same(gm, undisturbed)
    wait_for_restarts(client, killer.pids, n_workers=2)


@pytest.mark.slow
def test_every_worker_killed_once_and_restarted_by_its_nanny(client, data, undisturbed):
    workers = sorted(client.scheduler_info()["workers"])
    killer = KillWorkers(client, workers, after=3)
    gm = GaussianMixture(**KWARGS, callbacks=[killer]).fit(slow_array(data))
    killer.thread.join(timeout=5)
    assert killer.killed_at == 4
    state = killer.state
    assert state["processing"] >= 1 and 4 <= state["done"] < state["e_steps"], state
    # the parameters were held only by workers that died: the scheduler recomputed them from the graph
    (params_state,) = state["params"]
    assert params_state[0] == "memory" and set(params_state[1]) <= set(workers)
    assert_same(gm, undisturbed)
    new_pids = wait_for_restarts(client, killer.pids, n_workers=2)
    assert len(new_pids) == 2


def test_worker_killed_while_predictions_are_written(client, data, undisturbed, tmp_path, monkeypatch):
    """The staged Zarr output is committed complete, with the undisturbed predictions."""
    from dgmm.io import is_complete, write_predictions

    monkeypatch.setattr("dgmm.io.MIN_OUTPUT_CHUNK_BYTES", 0)  # one store task per input chunk: tasks to kill among

    victim = max(client.scheduler_info()["workers"])
    killer = KillWorkers(client, [victim], prefix="store-map")
    killer.thread = threading.Thread(target=killer._kill, args=(0,), daemon=True)
    killer.thread.start()
    X = slow_array(data)
    write_predictions(undisturbed, X, str(tmp_path / "pred.zarr"), format="zarr", probabilities=True)
    killer.thread.join(timeout=5)
    assert killer.killed_at == 0, "the kill did not land while the chunks were written"
    assert killer.state["processing"] >= 1 and 4 <= killer.state["done"] < killer.state["e_steps"], killer.state
    assert is_complete(str(tmp_path / "pred.zarr"))
    group = zarr.open_group(str(tmp_path / "pred.zarr"), mode="r")
    rows = zarr.open_array(data, mode="r")[:]
    np.testing.assert_array_equal(group["labels"][:], undisturbed.predict(rows))
    np.testing.assert_allclose(group["probabilities"][:], undisturbed.predict_proba(rows), rtol=1e-12, atol=1e-15)
    wait_for_restarts(client, killer.pids, n_workers=2)


#: ``dgmm ARGS`` in which every worker process dies (os._exit) as soon as it starts a chunk of the EM.
DYING_WORKERS = """
import os, sys
import dgmm.chunk as chunk
original = chunk.e_step_statistics
def dying(*args, **kwargs):
    try:
        from distributed import get_worker
        get_worker()
    except ValueError:  # not on a worker: the driver's own in-process passes
        return original(*args, **kwargs)
    os._exit(1)
chunk.e_step_statistics = dying
from dgmm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_workers_dying_on_every_attempt_end_the_command_with_a_clear_message(tmp_path, data):
    """distributed gives up on a task after ``allowed-failures`` worker deaths: exit 1, a message, no model."""
    import subprocess
    import sys

    from cli_helpers import write_config

    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": data}, "model": {"n_components": 2, "random_state": 0, "max_iter": 5},
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
        "output": {"model": str(tmp_path / "model.npz"), "checkpoint_every": 1}})
    result = subprocess.run([sys.executable, "-c", DYING_WORKERS, "fit", config], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if "all those workers died while running it" in line]
    assert error.startswith("dgmm: error: Attempted to run task 'dying-")
    assert "may be running out of memory: raise cluster.memory_limit" in error and "--resume' continues" in error
    assert not (tmp_path / "model.npz").exists()
    # (a worker restarting while the cluster shuts down may still log its own heartbeat traceback)
    lost = [line for line in result.stderr.splitlines() if "caused the cluster to lose" in line]
    assert lost and all(line.endswith("task(s)") and len(line) < 300 for line in lost), lost  # not kB of keys


def test_input_kept_in_worker_memory_survives_a_killed_worker(client, data, undisturbed):
    """`dgmm fit`'s input.persist: chunks kept on a worker that dies are read again from the Zarr file."""
    from distributed import wait

    X = slow_array(data).persist()  # what cli._persist_input does
    wait(X)
    held = client.who_has(X)
    victim = min(client.scheduler_info()["workers"])
    lost = [key for key, workers in held.items() if list(workers) == [victim]]
    assert lost, held  # the victim holds chunks no other worker has
    pids = client.run(os.getpid)
    killed = []

    def kill_after_second_iteration(info):
        if info.n_iter == 2:
            os.kill(pids[victim], signal.SIGKILL)
            killed.append(info.n_iter)

    gm = GaussianMixture(**KWARGS, callbacks=[kill_after_second_iteration]).fit(X)
    assert killed == [2]
    assert_same(gm, undisturbed)
    wait_for_restarts(client, {victim: pids[victim]}, n_workers=2)


def _stall_config(tmp_path, n_samples: int, stall_warning: float) -> str:
    """A `dgmm fit` config on a 2-worker LocalCluster, 8 iterations of about a second."""
    from cli_helpers import blobs, write_config

    np.save(tmp_path / "x.npy", blobs(n_samples, 4, seed=3))
    return write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy"), "chunk_rows": 20_000},
        "model": {"n_components": 3, "random_state": 0, "max_iter": 8, "tol": 0.0},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "stall_warning": stall_warning},
        "output": {"model": str(tmp_path / "model.npz")}})


def _stop_a_worker_after_iteration_2(proc) -> list:
    """SIGSTOP one worker process of a running `dgmm fit` once it printed iteration 2; its worker processes."""
    import psutil

    from cli_helpers import wait_for_line

    wait_for_line(proc, "iteration    2")
    # the LocalCluster's nannies run in the command's process; each spawned one worker process
    children = psutil.Process(proc.pid).children()
    workers = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 2, [p.cmdline() for p in children]
    workers[0].suspend()
    return workers


@pytest.mark.slow
def test_a_stopped_worker_is_named_while_the_fit_waits_and_the_fit_then_completes(tmp_path, monkeypatch):
    """SIGSTOP on a worker process (a suspended VM, a swapping node): nothing finishes until the scheduler drops
    it after worker-ttl; meanwhile `dgmm fit` says which worker it waits for (cluster.stall_warning), then ends."""
    from cli_helpers import dgmm_command, running

    config = _stall_config(tmp_path, 400_000, stall_warning=3)
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL", "15s")
    with running(dgmm_command("fit", config), new_session=True) as proc:
        workers = _stop_a_worker_after_iteration_2(proc)
        try:
            stdout, stderr = proc.communicate(timeout=180)
        finally:
            if workers[0].is_running():
                workers[0].resume()
    assert proc.returncode == 0, stderr
    (warning,) = [line for line in stderr.splitlines() if "no progress for" in line][:1]
    assert warning.startswith("dgmm: warning: no progress for ") and "(in EM iteration " in warning, warning
    assert "the scheduler has not heard from 1 of 2 workers for a while: tcp://127.0.0.1:" in warning, warning
    assert "distributed.scheduler.worker-ttl (15s) without a heartbeat" in warning, warning
    assert "iteration    8" in stdout and (tmp_path / "model.npz").exists()


@pytest.mark.slow
def test_with_worker_ttl_off_the_stall_warning_says_the_worker_is_never_dropped(tmp_path, monkeypatch):
    """distributed.scheduler.worker-ttl: null turns the scheduler's drop off: the warning said the worker would be
    dropped "after distributed.scheduler.worker-ttl (None)"; it now says it never will, and what to do."""
    from cli_helpers import dgmm_command, running

    config = _stall_config(tmp_path, 200_000, stall_warning=2)
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL", "None")
    with running(dgmm_command("fit", config), new_session=True) as proc:
        workers = _stop_a_worker_after_iteration_2(proc)
        try:
            deadline = time.monotonic() + 120
            line = ""
            while "no progress for" not in line and time.monotonic() < deadline:
                line = proc.stderr.readline()
        finally:
            workers[0].resume()
    assert "the scheduler has not heard from 1 of 2 workers" in line, line
    assert "distributed.scheduler.worker-ttl is off here: it never will. Resume it (SIGCONT)" in line, line
