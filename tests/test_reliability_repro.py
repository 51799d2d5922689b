"""Reproducibility: one config and ``random_state`` give the same model on every scheduler and chunking.

The same config is fitted by ``dgmm fit``'s driver (:func:`dgmm.cli.run_fit`, in
this process) on the threaded scheduler, on LocalClusters of 1 and 2 worker
processes and of 2 thread workers, and on the same rows stored with other
chunkings (Zarr chunks of 1000 and of 337 rows, a ``.npy`` file read in
3 chunks, Parquet row groups).

Tolerances: with the same chunking the reduction tree is the same, so every
scheduler adds the same numbers in the same order: ``rtol=1e-10`` (measured:
bitwise equal). Another chunking changes the summation order and so the
rounding of every pass: ``rtol=1e-9``, the tolerance the core tests use for
chunking independence (measured: at most 3e-13 after 30 iterations).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from dgmm import load_model
from dgmm.cli import run_fit
from dgmm.config import parse_config
from cli_helpers import blobs

FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")
SAME_CHUNKING_RTOL = 1e-10
OTHER_CHUNKING_RTOL = 1e-9

MODELS = {
    # n_samples <= init_sample_size: sklearn's KMeans seeds on all rows in memory
    "in-memory-kmeans-init": {"n_components": 3, "covariance_type": "full", "random_state": 7, "tol": 0.0,
                              "max_iter": 30, "n_init": 2},
    # n_samples > init_sample_size: k-means|| and Lloyd passes over the chunks
    "out-of-core-kmeans-init": {"n_components": 4, "covariance_type": "diag", "random_state": 11, "tol": 0.0,
                                "max_iter": 30, "init_sample_size": 1000},
}
CLUSTERS = {
    "threads": {"type": "threads"},
    "1-worker-process": {"n_workers": 1, "threads_per_worker": 2},
    "2-worker-processes": {"n_workers": 2, "threads_per_worker": 1},
    "2-thread-workers": {"n_workers": 2, "threads_per_worker": 1, "processes": False},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    X = blobs(12_000, 3, seed=17)
    paths = {}
    for name, rows in (("zarr-1000", 1000), ("zarr-337", 337)):
        paths[name] = {"path": str(root / f"{name}.zarr")}
        zarr.open_array(paths[name]["path"], mode="w", shape=X.shape, chunks=(rows, 3), dtype="f8")[:] = X
    np.save(root / "x.npy", X)
    paths["npy-3-chunks"] = {"path": str(root / "x.npy"), "chunk_rows": 4000}
    pq.write_table(pa.table({f"x{j}": X[:, j] for j in range(3)}), root / "x.parquet", row_group_size=2500)
    paths["parquet-row-groups"] = {"path": str(root / "x.parquet")}
    return paths


def fit(tmp_path, name, input_section, model, cluster):
    config = parse_config({"input": input_section, "model": model, "cluster": cluster,
                           "output": {"model": str(tmp_path / f"{name}.npz"), "checkpoint_every": 0}},
                          source=f"{name}.yaml", command="fit")
    assert run_fit(config) == 0
    return load_model(tmp_path / f"{name}.npz")


def assert_same(a, b, rtol, what):
    for attr in FITTED:
        np.testing.assert_allclose(getattr(a, attr), getattr(b, attr), rtol=rtol, atol=0, err_msg=f"{what}: {attr}")
    np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=rtol, err_msg=what)
    assert a.n_iter_ == b.n_iter_, what


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_same_model_on_every_scheduler_and_chunking(tmp_path, inputs, model_name):
    model = MODELS[model_name]
    reference = fit(tmp_path, "reference", inputs["zarr-1000"], model, CLUSTERS["threads"])
    assert reference.n_iter_ == 30  # tol=0: every run makes all 30 passes, differences have time to grow
    for cluster_name, cluster in CLUSTERS.items():
        if cluster_name != "threads":
            other = fit(tmp_path, cluster_name, inputs["zarr-1000"], model, cluster)
            assert_same(other, reference, SAME_CHUNKING_RTOL, cluster_name)
    for input_name, section in inputs.items():
        if input_name != "zarr-1000":
            other = fit(tmp_path, input_name, section, model, CLUSTERS["threads"])
            assert_same(other, reference, OTHER_CHUNKING_RTOL, input_name)
