"""Read-ahead on the workers dgmm starts: two threads per core, so one reads while the other computes.

A distributed worker runs at most ``nthreads`` tasks at once, each of which either reads a chunk
or computes on one; the ``dgmm`` command's LocalCluster and its dask-jobqueue workers therefore
run ``cli.READ_AHEAD_THREADS_PER_CORE`` threads per core unless ``cluster.read_ahead`` is false,
without changing the number of workers or the CPUs a job books (jobqueue: test_cli_jobqueue.py).
"""

from __future__ import annotations

import time

import dask
import dask.array as da
import pytest
from distributed import get_task_stream

from dgmm import GaussianMixture
from dgmm.cli import READ_AHEAD_THREADS_PER_CORE, _local_workers, open_cluster
from dgmm.config import ClusterConfig, ConfigError, parse_config
from conftest import assert_same_model, make_mixture, perturbed_init


def slow_read(block):
    """A block read that waits like a disk (module level: pickled by reference)."""
    time.sleep(0.005)
    return block


def test_local_cluster_sizes_resolve_as_local_cluster_does_with_two_threads_per_core():
    from dask.system import CPU_COUNT
    from distributed.deploy.utils import nprocesses_nthreads

    assert READ_AHEAD_THREADS_PER_CORE == 2
    n, t = nprocesses_nthreads(CPU_COUNT)
    assert _local_workers(ClusterConfig()) == {"n_workers": n, "threads_per_worker": 2 * t}
    assert _local_workers(ClusterConfig(processes=False)) == {"n_workers": 1, "threads_per_worker": 2 * CPU_COUNT}
    assert _local_workers(ClusterConfig(n_workers=3, threads_per_worker=2)) == {"n_workers": 3,
                                                                                "threads_per_worker": 4}
    assert _local_workers(ClusterConfig(threads_per_worker=1)) == {"n_workers": CPU_COUNT, "threads_per_worker": 2}
    assert _local_workers(ClusterConfig(read_ahead=False)) == {"n_workers": None, "threads_per_worker": None}


def test_read_ahead_is_only_for_the_workers_dgmm_starts():
    assert parse_config({"input": {"path": "s3://bucket/x.zarr"}, "cluster": {"read_ahead": False}}).cluster.read_ahead is False
    with pytest.raises(ConfigError, match="read_ahead: only applies to the workers dgmm starts"):
        parse_config({"input": {"path": "s3://bucket/x.zarr"}, "cluster": {"address": "tcp://h:8786", "read_ahead": False}})


@pytest.mark.parametrize("read_ahead", [True, False])
def test_the_command_s_workers_read_while_they_compute_and_give_the_same_model(read_ahead):
    """One worker of one core: with read-ahead a block is read while a kernel runs, else never."""
    # d = 32: kernels of about 2 ms, so that one can overlap a read by the 1 ms counted below (at d = 16 they
    # took about 1 ms, and the count of overlaps went as low as 5 in a loaded run)
    X = make_mixture(n_samples=60_000, n_features=32, seed=41)
    w, m, p = perturbed_init(X, "full")
    kwargs = dict(covariance_type="full", weights_init=w, means_init=m, precisions_init=p, tol=0, max_iter=3)
    Xd = da.from_array(X, chunks=(2_500, 32)).map_blocks(slow_read, dtype=X.dtype)
    config = ClusterConfig(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                           read_ahead=read_ahead)
    with open_cluster(config) as client:
        assert list(client.nthreads().values()) == [2 if read_ahead else 1]
        with get_task_stream(client) as stream:
            fitted = GaussianMixture(3, **kwargs).fit(Xd)
    spans = [(str(r["key"]), s["start"], s["stop"]) for r in stream.data for s in r["startstops"]
             if s["action"] == "compute"]
    kernels = [s for s in spans if "e_step_statistics" in s[0]]
    reads = [s for s in spans if "slow_read" in s[0] and s[2] - s[1] >= 0.005]  # (not the alias tasks)
    assert len(kernels) == 3 * 24 and len(reads) >= 3 * 24
    # kernels during which a read ran for at least 1 ms (the task stream's times are a little loose)
    overlapping = sum(any(min(k1, r1) - max(k0, r0) > 0.001 for _, r0, r1 in reads) for _, k0, k1 in kernels)
    assert (overlapping >= 10) if read_ahead else (overlapping == 0), overlapping
    with dask.config.set(scheduler="sync"):
        assert_same_model(fitted, GaussianMixture(3, **kwargs).fit(Xd))
