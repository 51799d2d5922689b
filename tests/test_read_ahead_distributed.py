"""Read-ahead on distributed workers: kernels claim a compute resource, reads take the other threads.

A worker started with ``dgmm.passes.read_ahead_worker_options(t)`` has 2t threads and t units
of ``dgmm-compute``. dgmm's passes claim one unit per kernel (and reduction) only when every
worker offers the resource, so such a worker never runs more than t kernels at once, reads
chunks on its other threads meanwhile, and gives the same model; on workers without the
resource nothing is claimed (a claim no worker can meet would wait forever).
"""

from __future__ import annotations

import subprocess
import sys
import time

import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream

from dgmm import GaussianMixture, passes
from dgmm.cli import _local_workers, open_cluster
from dgmm.config import ClusterConfig
from conftest import assert_same_model, make_mixture, perturbed_init

READ_SECONDS = 0.02


def slow_read(block):
    """A block read that waits like a disk (module level: pickled by reference to the workers)."""
    time.sleep(READ_SECONDS)
    return block


def _intervals(records, name, shortest=0.0):
    """(worker, start, stop) of every task computed for at least ``shortest`` s whose key holds ``name``.

    (The read of a block is the task from_array's getter and ``slow_read`` were fused into,
    ``array-slow_read-...``; the block key ``slow_read-...`` is then an alias of it.)
    """
    out = []
    for record in records:
        if name in str(record["key"]):
            for span in record["startstops"]:
                if span["action"] == "compute" and span["stop"] - span["start"] >= shortest:
                    out.append((record["worker"], span["start"], span["stop"]))
    return out


def _most_at_once(intervals) -> int:
    """The largest number of ``intervals`` running at the same time on one worker."""
    most = 0
    for worker in {w for w, _, _ in intervals}:
        events = sorted([(start, 1) for w, start, _ in intervals if w == worker]
                        + [(stop, -1) for w, _, stop in intervals if w == worker])
        running = 0
        for _, step in events:
            running += step
            most = max(most, running)
    return most


def _overlaps(a, b) -> int:
    """How many intervals of ``a`` overlap one of ``b`` on the same worker."""
    return sum(any(wa == wb and sa < eb and sb < ea for wb, sb, eb in b) for wa, sa, ea in a)


def _fit_kwargs(X, kind="diag"):
    w, m, p = perturbed_init(X, kind)
    return dict(covariance_type=kind, weights_init=w, means_init=m, precisions_init=p, tol=0, max_iter=3)


@pytest.fixture(scope="module")
def data():
    return make_mixture(n_samples=240_000, n_features=16, seed=41)


@pytest.mark.parametrize("read_ahead", [True, False])
def test_kernels_claim_the_compute_resource_only_on_workers_that_offer_it(data, read_ahead):
    """Persisted blocks (no reads): 2 threads run 2 kernels at once, unless one unit of dgmm-compute caps them."""
    workers = passes.read_ahead_worker_options(1) if read_ahead else {"threads_per_worker": 2}
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None, **workers) as cluster, \
            Client(cluster) as client:
        assert passes.kernel_annotations() == ({"resources": {"dgmm-compute": 1}} if read_ahead else {})
        Xd = client.persist(da.from_array(data, chunks=(10_000, 16)))
        with get_task_stream(client) as stream:
            GaussianMixture(3, **_fit_kwargs(data)).fit(Xd)
    kernels = _intervals(stream.data, "e_step_statistics")
    assert len(kernels) == 3 * 24
    assert _most_at_once(kernels) == (1 if read_ahead else 2)


def test_workers_read_chunks_while_their_kernel_runs_and_give_the_same_model(data):
    Xd = da.from_array(data, chunks=(10_000, 16)).map_blocks(slow_read, dtype=data.dtype)
    kwargs = _fit_kwargs(data)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None,
                      **passes.read_ahead_worker_options(1)) as cluster, Client(cluster) as client:
        with get_task_stream(client) as stream:
            distributed = GaussianMixture(3, **kwargs).fit(Xd)
    kernels = _intervals(stream.data, "e_step_statistics")
    reads = _intervals(stream.data, "slow_read", shortest=READ_SECONDS)
    assert len(kernels) == 3 * 24 and len(reads) >= 3 * 24  # (and whatever validation reads)
    assert _most_at_once(kernels) == 1
    assert _overlaps(kernels, reads) >= 12  # most kernels have a read running beside them
    import dask

    with dask.config.set(scheduler="sync"):
        synchronous = GaussianMixture(3, **kwargs).fit(Xd)
    assert_same_model(distributed, synchronous)


def test_no_claim_while_any_worker_lacks_the_resource(data):
    """An existing cluster where one worker (a `dask worker` process) was started without the resource."""
    with LocalCluster(n_workers=1, processes=False, protocol="tcp://", host="127.0.0.1", dashboard_address=None,
                      **passes.read_ahead_worker_options(1)) as cluster, Client(cluster) as client:
        assert passes.kernel_annotations() == {"resources": {"dgmm-compute": 1}}
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                                   "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client.wait_for_workers(2, timeout=60)
            assert passes.kernel_annotations() == {}
            X = data[:20_000]
            Xd = da.from_array(X, chunks=(5_000, 16))
            fitted = GaussianMixture(3, **_fit_kwargs(X)).fit(Xd)  # kernels run on both workers
            assert fitted.n_iter_ == 3
        finally:
            worker.terminate()
            worker.wait(30)
    assert passes.kernel_annotations() == {}  # no client


def test_read_ahead_worker_options():
    assert passes.read_ahead_worker_options(3) == {"threads_per_worker": 6, "resources": {"dgmm-compute": 3}}
    with pytest.raises(ValueError, match="at least 1"):
        passes.read_ahead_worker_options(0)


def test_the_command_s_local_cluster_reads_ahead_unless_told_not_to():
    from dask.system import CPU_COUNT
    from distributed.deploy.utils import nprocesses_nthreads

    n, t = nprocesses_nthreads(CPU_COUNT)
    assert _local_workers(ClusterConfig()) == {"n_workers": n, "threads_per_worker": 2 * t,
                                               "resources": {"dgmm-compute": t}}
    assert _local_workers(ClusterConfig(processes=False)) == {
        "n_workers": 1, "threads_per_worker": 2 * CPU_COUNT, "resources": {"dgmm-compute": CPU_COUNT}}
    assert _local_workers(ClusterConfig(n_workers=3, threads_per_worker=2))["threads_per_worker"] == 4
    assert _local_workers(ClusterConfig(read_ahead=False)) == {"n_workers": None, "threads_per_worker": None}
    for read_ahead in (True, False):
        config = ClusterConfig(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                               read_ahead=read_ahead)
        with open_cluster(config) as client:
            info = client.scheduler_info(n_workers=-1)["workers"]
            assert [w["nthreads"] for w in info.values()] == [2 if read_ahead else 1]
            assert [w["resources"] for w in info.values()] == [{"dgmm-compute": 1} if read_ahead else {}]
            X = make_mixture(n_samples=4000, n_features=3, seed=42)
            fitted = GaussianMixture(2, random_state=0, max_iter=5).fit(da.from_array(X, chunks=(1000, 3)))
            assert np.isfinite(fitted.lower_bound_)
