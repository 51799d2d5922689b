"""The dgmm command, run for real in a subprocess."""

from __future__ import annotations

import re

import numpy as np
import zarr

from dgmm.datasets import blob_parameters
from cli_helpers import run_dgmm


def test_demo_generates_zarr_and_fits_on_local_cluster(tmp_path):
    path = tmp_path / "demo.zarr"
    result = run_dgmm("demo", "--path", str(path), "--n-samples", "60000", "--chunk-rows", "7000",
                      "--n-components", "3", "--n-features", "4", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "LocalCluster with 2 worker processes" in result.stdout
    z = zarr.open_array(str(path), mode="r")
    assert z.shape == (60000, 4) and z.chunks == (7000, 4)
    assert not (tmp_path / "demo.zarr.tmp").exists()
    # the fitted means printed by the demo are close to the generating means
    means_text = result.stdout.split("means:")[1]
    fitted = np.array([[float(v) for v in re.findall(r"-?\d+\.\d+", line)] for line in means_text.strip().splitlines()])
    _, true_means, _ = blob_parameters(3, 4, seed=0)
    for mean in true_means:
        assert np.min(np.linalg.norm(fitted - mean, axis=1)) < 0.1
    # a second run reuses the data set
    again = run_dgmm("demo", "--path", str(path), "--n-samples", "60000", "--n-components", "3",
                     "--n-features", "4", "--workers", "1")
    assert again.returncode == 0, again.stderr
    zero = run_dgmm("demo", "--path", str(path), "--workers", "0")  # not "sized to the machine" in disguise
    assert zero.returncode == 2 and "cluster.n_workers: must be an int >= 1 or null" in zero.stderr
