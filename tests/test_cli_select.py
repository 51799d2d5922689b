"""`dgmm select`: the BIC sweep from the command line."""

from __future__ import annotations

import csv

import numpy as np
import zarr

from cli_helpers import blobs, run_dgmm, write_config
from dgmm import load_model, select


def test_select_writes_best_model_and_table(tmp_path):
    X = blobs(n_samples=1500, n_features=2, seed=5)
    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=X.shape, chunks=(400, 2), dtype="f8")
    z[:] = X
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.zarr")},
        "model": {"random_state": 0, "tol": 1e-4},
        "cluster": {"type": "threads"},
        "output": {"model": str(tmp_path / "best.npz")},
    })
    result = run_dgmm("select", config, "--n-components", "1:4", "--covariance-types", "full,diag",
                      "--table", tmp_path / "t.csv")
    assert result.returncode == 0, result.stderr
    assert "<- best" in result.stdout
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    reference = select(X, n_components=range(1, 5), covariance_types=("full", "diag"), random_state=0, tol=1e-4)
    np.testing.assert_allclose([float(r["bic"]) for r in rows], [r["bic"] for r in reference.results], rtol=1e-8)
    best = load_model(str(tmp_path / "best.npz"))
    assert (best.n_components, best.covariance_type) == (
        reference.best_estimator.n_components, reference.best_estimator.covariance_type)
    assert best.n_components == 3
    info = run_dgmm("info", tmp_path / "best.npz")  # the model of a sweep reads like any fitted model
    assert info.returncode == 0, info.stderr
    assert f"data: {tmp_path / 'x.zarr'} (1500 rows)" in info.stdout and "3 components" in info.stdout


def test_select_rejects_bad_grid_and_writes_nothing(tmp_path):
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "missing.zarr")},
        "output": {"model": str(tmp_path / "best.npz")},
    })
    result = run_dgmm("select", config, "--n-components", "0:3")
    assert result.returncode != 0
    assert "--n-components" in result.stderr
    result = run_dgmm("select", config, "--n-components", "5:2")
    assert result.returncode == 2 and "the range '5:2' is empty" in result.stderr
    result = run_dgmm("select", config, "--covariance-types", "full,banana")
    assert result.returncode != 0 and "banana" in result.stderr
    assert not (tmp_path / "best.npz").exists()
