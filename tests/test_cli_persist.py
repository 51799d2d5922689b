"""`input.persist`: fit and select keep the input in memory after its first read when it fits.

``auto`` (the default) keeps it when it takes at most ``cli.PERSIST_FRACTION`` of the memory the
computation may use: the workers' memory limits (the smaller of their sum and this process's
cgroup for a LocalCluster), or this process's memory on the threaded scheduler. The model is the
same either way; the cgroup side is tested in test_memory_limit.py (marker ``cgroup``).
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from dgmm import load_model
from dgmm.cli import PERSIST_FRACTION, _local_memory, _memory_for_data, open_cluster
from dgmm.config import ClusterConfig
from cli_helpers import blobs, json_lines, run_dgmm, write_config


@pytest.fixture(scope="module")
def zarr_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("persist") / "x.zarr"
    X = blobs(4000, 3, seed=21)
    z = zarr.create_array(str(path), shape=X.shape, chunks=(500, 3), dtype=X.dtype)
    z[:] = X
    return str(path)


@pytest.mark.parametrize("cluster", [{"type": "threads"}, {"n_workers": 2, "threads_per_worker": 1}])
def test_fit_keeps_small_data_in_memory_and_gives_the_same_model(tmp_path, zarr_input, cluster):
    models = {}
    for persist in ("auto", False):
        model = tmp_path / f"model-{persist}.npz"
        config = write_config(tmp_path / "c.yaml", {
            "input": {"path": zarr_input, "persist": persist},
            "model": {"n_components": 3, "random_state": 0, "tol": 1e-8},
            "cluster": {**cluster, "dashboard_address": None} if "type" not in cluster else cluster,
            "output": {"model": str(model), "checkpoint_every": 0},
        })
        result = run_dgmm("fit", config, "--log-format", "json", timeout=240)
        assert result.returncode == 0, result.stderr
        (event,) = [e for e in json_lines(result.stdout) if e.get("event") == "persist"]
        assert event["persisted"] is (persist == "auto"), event
        assert event["message"].startswith("data: kept in" if persist == "auto" else "data: read from storage")
        models[persist] = load_model(model)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(models["auto"], name), getattr(models[False], name), rtol=1e-10)


def test_auto_compares_the_data_with_the_workers_memory_limits(tmp_path):
    X = np.zeros((20_000, 10))  # 1.6 MB
    np.save(tmp_path / "x.npy", X)
    with open_cluster(ClusterConfig(n_workers=2, threads_per_worker=1, processes=False, memory_limit="3MB",
                                    dashboard_address=None)) as client:
        memory = _memory_for_data(client, "local")
        assert memory == 2 * 3_000_000
    assert X.nbytes > PERSIST_FRACTION * memory  # so a fit there would read from storage on every pass
    assert _memory_for_data(None, "threads") == _local_memory() > 0


def test_select_reports_its_choice(tmp_path, zarr_input):
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": zarr_input, "persist": True},
        "model": {"random_state": 0},
        "cluster": {"type": "threads"},
        "output": {"model": str(tmp_path / "best.npz")},
    })
    result = run_dgmm("select", config, "--n-components", "2:3", "--covariance-types", "diag", timeout=240)
    assert result.returncode == 0, result.stderr
    assert "data: kept in memory after the first read (input.persist: true)" in result.stdout
