"""The same fit on a real distributed LocalCluster with worker processes."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream

from dgmm import GaussianMixture
from conftest import make_mixture, perturbed_init


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as c:
        yield c


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_local_cluster_processes_equal_threaded(client, kind):
    X = make_mixture(n_samples=2000, n_features=3, seed=21)
    Xd = da.from_array(X, chunks=(137, 3))
    w, m, p = perturbed_init(X, kind)
    kwargs = dict(covariance_type=kind, weights_init=w, means_init=m, precisions_init=p, tol=0, max_iter=10)
    with get_task_stream(client) as stream:
        distributed_fit = GaussianMixture(3, **kwargs).fit(Xd)  # the active client runs it
    workers_used = {task["worker"] for task in stream.data}
    assert len(workers_used) == 2 and len(stream.data) >= 10 * Xd.numblocks[0]
    assert len(client.scheduler_info()["workers"]) == 2
    threaded = GaussianMixture(3, **kwargs)
    import dask

    with dask.config.set(scheduler="threads"):
        threaded.fit(Xd)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(distributed_fit, name), getattr(threaded, name), rtol=1e-10)
    np.testing.assert_allclose(distributed_fit.lower_bounds_, threaded.lower_bounds_, rtol=1e-10)


def test_default_init_and_lazy_predict_on_cluster(client):
    X = make_mixture(n_samples=1500, n_features=2, seed=22)
    Xd = da.from_array(X, chunks=(200, 2))
    gm = GaussianMixture(3, random_state=0).fit(Xd)
    local = GaussianMixture(3, random_state=0).fit(X)
    np.testing.assert_allclose(gm.means_, local.means_, rtol=1e-9)
    labels = gm.predict(Xd)
    assert isinstance(labels, da.Array)
    np.testing.assert_array_equal(client.compute(labels).result(), local.predict(X))


@pytest.mark.parametrize("init_params", ["k-means++", "kmeans", "random_from_data"])
def test_initial_reads_reuse_the_passes_tasks(client, tmp_path, init_params):
    """Rows read for seeding (and the fingerprint's head and tail) go through the passes' own block tasks.

    Slicing the array afresh sent the scheduler the blocks' keys with another definition while it
    still held them: distributed warned "Detected different run_spec ... can cause failures and
    deadlocks" before the first EM iteration on a Zarr input.
    """
    import logging

    import zarr

    X = make_mixture(n_samples=20_000, n_features=4, seed=23)
    zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=X.shape, chunks=(1000, 4), dtype="f8")[:] = X
    weights = np.random.default_rng(0).uniform(0.5, 2.0, size=len(X))
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    scheduler_log = logging.getLogger("distributed.scheduler")
    scheduler_log.addHandler(handler)
    try:
        fits = [GaussianMixture(9, init_params=init_params, random_state=1, max_iter=5, init_sample_size=500,
                                checkpoint=str(tmp_path / "ck.npz")).fit(da.from_zarr(str(tmp_path / "x.zarr")),
                                                                         sample_weight=w)
                for w in (None, da.from_array(weights, chunks=3000))]
    finally:
        scheduler_log.removeHandler(handler)
    assert not [r.getMessage() for r in records if "run_spec" in r.getMessage()]
    import dask

    with dask.config.set(scheduler="threads"):  # and the rows read are the same as on threads
        threaded = GaussianMixture(9, init_params=init_params, random_state=1, max_iter=5,
                                   init_sample_size=500).fit(da.from_zarr(str(tmp_path / "x.zarr")))
    np.testing.assert_allclose(fits[0].means_, threaded.means_, rtol=1e-10)


def test_predictions_with_kept_columns_and_missing_rows_are_written_by_the_workers(client, tmp_path, monkeypatch):
    """keep (read on the workers, part by part) and nonfinite='missing' on worker processes, as on threads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dgmm.io import open_input, parquet_columns, write_predictions

    monkeypatch.setattr("dgmm.io.MIN_OUTPUT_CHUNK_BYTES", 0)  # a part per input chunk: several worker tasks
    X = make_mixture(n_samples=1200, n_features=2, seed=23)
    X[7, 1] = np.nan
    ids = pa.array([None] + [2**60 + i for i in range(1, len(X))], pa.int64())
    table = pa.table({"id": ids, "a": X[:, 0], "b": X[:, 1]})
    (tmp_path / "t").mkdir()
    for i in range(4):
        pq.write_table(table.slice(300 * i, 300), tmp_path / "t" / f"part.{i}.parquet", row_group_size=100)
    gm = GaussianMixture(3, random_state=0).fit(X[np.isfinite(X).all(axis=1)])
    data = open_input(str(tmp_path / "t"), columns=["a", "b"])
    with get_task_stream(client) as stream:
        write_predictions(gm, data, str(tmp_path / "p.parquet"), format="parquet", log_likelihood=True,
                          keep=parquet_columns(str(tmp_path / "t"), ["id"]), nonfinite="missing")
    assert len({task["worker"] for task in stream.data}) == 2
    out = pq.read_table(tmp_path / "p.parquet")
    assert out.schema.field("id").type == pa.int64() and out.column("id").equals(pa.chunked_array([ids]))
    frame = out.to_pandas()
    assert frame["label"].iloc[7] == -1 and np.isnan(frame["log_likelihood"].iloc[7])
    keep = np.ones(len(X), dtype=bool)
    keep[7] = False
    np.testing.assert_array_equal(frame["label"].to_numpy()[keep], gm.predict(X[keep]))


@pytest.mark.parametrize("weighted", [False, True])
def test_numpy_input_is_sent_to_the_workers_once_not_with_every_pass(client, weighted):
    """da.from_array embeds the chunks in every pass's graph; on a client they are persisted once instead.

    (The weighted case also keeps the persisted weights alive for the fit: their futures are held by
    the passes' RowBlocks, not only by Delayed blocks cut from them.)
    """
    import warnings

    import dask

    X = make_mixture(n_samples=120_000, n_features=4, seed=24)  # 3.8 MB in 12 chunks
    weights = np.random.default_rng(0).uniform(0.5, 2.0, len(X)) if weighted else None
    kwargs = dict(n_components=3, random_state=0, tol=0, max_iter=4, chunk_size=10_000, init_sample_size=1000)
    with dask.config.set(scheduler="threads"):
        threaded = GaussianMixture(**kwargs).fit(X, sample_weight=weights)
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1MB"}), \
            warnings.catch_warnings(record=True) as caught, get_task_stream(client) as stream:
        warnings.simplefilter("always")
        fitted = GaussianMixture(**kwargs).fit(X, sample_weight=weights)
    assert not [w for w in caught if "large graph" in str(w.message)], [str(w.message)[:100] for w in caught]
    assert len({task["worker"] for task in stream.data}) == 2  # computed on the workers
    assert fitted.n_passes_ >= 4 + 2  # several passes, the data sent once
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(fitted, name), getattr(threaded, name), rtol=1e-10, err_msg=name)
    np.testing.assert_allclose(fitted.lower_bounds_, threaded.lower_bounds_, rtol=1e-10)
