"""Read-ahead on dask's threaded scheduler: input blocks are read on threads of their own.

The pool (``dgmm.passes.ReadAheadPool``) must send every task that reads an input block
to the reading threads and every kernel to the compute threads, never run more kernels
at once than dask's ``num_workers``, stay out of the way of other schedulers and of a
user's own pool, and give the same model as the synchronous scheduler.
"""

from __future__ import annotations

import threading
import time

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from dask.callbacks import Callback

from dgmm import GaussianMixture, passes
from dgmm.graph import RowBlocks
from conftest import assert_same_model, make_mixture, perturbed_init


class _ThreadLog(Callback):
    """Records, per task key, the name of the thread that ran it (posttask gets the worker's ident)."""

    def __init__(self):
        super().__init__()
        self.threads: dict = {}

    def _posttask(self, key, result, dsk, state, worker_id):
        names = {t.ident: t.name for t in threading.enumerate()}
        self.threads[key] = names.get(worker_id, str(worker_id))


def _zarr_input(tmp_path, X, chunk_rows=173):
    store = tmp_path / "x.zarr"
    z = zarr.create_array(str(store), shape=X.shape, chunks=(chunk_rows, X.shape[1]), dtype=X.dtype)
    z[:] = X
    return da.from_zarr(str(store))


@pytest.mark.parametrize("kind", ["diag", "full"])
def test_reads_run_on_reading_threads_and_kernels_on_compute_threads(tmp_path, kind):
    X = make_mixture(n_samples=3000, n_features=4, seed=31)
    Xd = _zarr_input(tmp_path, X)
    w, m, p = perturbed_init(X, kind)
    kwargs = dict(covariance_type=kind, weights_init=w, means_init=m, precisions_init=p, tol=0, max_iter=4)
    blocks = RowBlocks(Xd)
    block_keys = {block.key for block in blocks.blocks}
    assert len(block_keys) == Xd.numblocks[0] == 18 and block_keys <= blocks.read_keys
    read_keys = blocks.read_keys
    log = _ThreadLog()
    with log:
        threaded = GaussianMixture(3, **kwargs).fit(Xd)
    reads = {key: name for key, name in log.threads.items() if key in read_keys}
    kernels = {key: name for key, name in log.threads.items() if str(key).startswith("('e_step_statistics")
               or str(key).startswith("e_step_statistics")}
    assert set(reads) >= block_keys
    assert len(kernels) == 4 * 18
    assert all(name.startswith("dgmm-read") for name in reads.values()), set(reads.values())
    assert all(name.startswith("dgmm-compute") for name in kernels.values()), set(kernels.values())
    with dask.config.set(scheduler="sync"):
        synchronous = GaussianMixture(3, **kwargs).fit(Xd)
    assert_same_model(threaded, synchronous)


def test_no_more_kernels_at_once_than_num_workers_and_reads_overlap_them(monkeypatch):
    """With num_workers=2: never 3 kernels at once, but blocks are read while 2 kernels run.

    dask's own pool of 2 threads would never have more than 2 tasks (reads and
    kernels together) running at once.
    """
    X = make_mixture(n_samples=4000, n_features=3, seed=32)
    running = {"kernels": 0, "reads": 0, "max_kernels": 0, "max_both": 0}
    lock = threading.Lock()

    def enter(what):
        with lock:
            running[what] += 1
            running["max_kernels"] = max(running["max_kernels"], running["kernels"])
            running["max_both"] = max(running["max_both"], running["kernels"] + running["reads"])

    def leave(what):
        with lock:
            running[what] -= 1

    def slow_read(block):
        enter("reads")
        time.sleep(0.01)  # a disk
        leave("reads")
        return block

    import dgmm.chunk as chunk_module

    original = chunk_module.e_step_statistics

    def slow_kernel(*args, **kwargs):
        enter("kernels")
        try:
            time.sleep(0.01)
            return original(*args, **kwargs)
        finally:
            leave("kernels")

    Xd = da.from_array(X, chunks=(100, 3)).map_blocks(slow_read, dtype=X.dtype)
    w, m, p = perturbed_init(X, "diag")
    monkeypatch.setattr(chunk_module, "e_step_statistics", slow_kernel)  # graph looks it up per pass
    with dask.config.set(num_workers=2):
        GaussianMixture(3, covariance_type="diag", weights_init=w, means_init=m, precisions_init=p,
                        tol=0, max_iter=2).fit(Xd)
    assert running["max_kernels"] == 2
    assert running["max_both"] >= 3


def test_pool_only_for_the_threaded_scheduler_without_a_user_pool():
    keys = frozenset({("x", 0, 0)})
    pool = passes.read_ahead_pool(keys)
    assert isinstance(pool, passes.ReadAheadPool) and pool._max_workers == 2 * dask.system.CPU_COUNT
    with dask.config.set(num_workers=3):
        assert passes.read_ahead_pool(keys)._max_workers == 6
    with dask.config.set(scheduler="threads"):
        assert passes.read_ahead_pool(keys) is not None
    for scheduler in ("sync", "single-threaded", "processes"):
        with dask.config.set(scheduler=scheduler):
            assert passes.read_ahead_pool(keys) is None
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as own, dask.config.set(pool=own):
        assert passes.read_ahead_pool(keys) is None


def test_pool_routes_by_key_and_sends_anything_unexpected_to_compute():
    pool = passes.ReadAheadPool(frozenset({"read-1"}), 1)

    def name(*_):
        return threading.current_thread().name

    assert pool.submit(name, [("read-1", None)]).result().startswith("dgmm-read")
    assert pool.submit(name, [("kernel-1", None)]).result().startswith("dgmm-compute")
    assert pool.submit(name, [("read-1", None), ("kernel-1", None)]).result().startswith("dgmm-compute")
    assert pool.submit(name, "not a batch").result().startswith("dgmm-compute")
    assert pool.submit(name).result().startswith("dgmm-compute")


def test_no_read_ahead_pool_with_a_distributed_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        assert passes.read_ahead_pool(frozenset()) is None
        with dask.config.set(scheduler="threads"):  # the user asks for threads despite the client
            assert passes.read_ahead_pool(frozenset()) is not None
    X = make_mixture(n_samples=600, n_features=2, seed=33)
    assert np.isfinite(GaussianMixture(2, random_state=0).fit(da.from_array(X, chunks=(150, 2))).lower_bound_)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_gets_pools_of_its_own():
    """After os.fork the child has the parent's pool objects but none of their threads.

    (dask's own default pool has the same problem, so a whole fit in a forked child can still
    hang in dask; this checks dgmm's pools.)
    """
    import multiprocessing

    parent = passes.read_ahead_pool(frozenset({"read"}))
    assert parent.submit(lambda batch: "ran", [("read", None)]).result(timeout=10) == "ran"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def child():
        pool = passes.read_ahead_pool(frozenset({"read"}))
        futures = [pool.submit(lambda batch: threading.current_thread().name, [(key, None)]) for key in ("read", "x")]
        queue.put([future.result(timeout=10) for future in futures])

    process = context.Process(target=child)
    process.start()
    process.join(30)
    if process.is_alive():
        process.kill()
        pytest.fail("dgmm's pools did not run tasks in the forked child")
    names = queue.get(timeout=5)
    assert names[0].startswith("dgmm-read") and names[1].startswith("dgmm-compute")
