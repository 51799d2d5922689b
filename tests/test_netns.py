"""`dgmm fit` through `address:` on a scheduler and workers in separate network namespaces.

Real processes and real TCP over veth links and a bridge (``scripts/netns_cluster.py``);
skipped unless this runs as root with iproute2's ``ip netns``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from dgmm import load_model

pytestmark = [pytest.mark.netns, pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "netns_cluster.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("netns_cluster", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("netns_cluster", module)
    spec.loader.exec_module(module)
    return module


netns_cluster = _load_script()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = netns_cluster.netns_available()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")
    workdir = tmp_path_factory.mktemp("netns")
    os.chmod(workdir, 0o755)
    with netns_cluster.NetnsCluster(n_workers=2, workdir=workdir / "cluster", log=lambda *a: None) as c:
        yield c
    assert netns_cluster.leftovers(c.tag) == [], "namespaces or links left behind"
    assert all(p.poll() is not None for p in c.procs)


def test_fit_across_namespaces_equals_the_local_fit_and_ships_parameters_once_per_worker(tmp_path, cluster):
    X = netns_cluster.make_data(4000, 3, seed=1)
    data = tmp_path / "x.zarr"
    netns_cluster.write_zarr(data, X, chunk_rows=500)  # 8 chunks: one combine level (split_every 8)
    model = {"n_components": 3, "covariance_type": "full", "random_state": 0, "tol": 0.0, "max_iter": 5}

    fit, _, metrics, totals = netns_cluster.fit_on_cluster(cluster, data, model, tmp_path / "fit", timeout=300)
    assert f"cluster: scheduler {cluster.address} with 2 workers, 2 threads" in fit.stdout

    remote, local = load_model(tmp_path / "fit" / "model.npz"), netns_cluster.local_fit(data, model)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(remote, name), getattr(local, name), rtol=1e-10, atol=0, err_msg=name)

    # every role really talked over its veth: the kernel counted the bytes
    for role in ("client", "scheduler", "worker0", "worker1"):
        assert totals[role][0] > 10_000 and totals[role][2] > 10_000, (role, totals[role])

    iterations = netns_cluster.analyse(metrics, cluster.addresses)
    assert len(iterations) == model["max_iter"] - 1  # the last EM graph has no end in the logs
    for it in iterations:
        assert it["graph_tasks"] >= 8 + 1 + 1  # 8 chunk tasks, one combine, one parameter key (and reads)
        assert it["tasks"]["e_step_statistics"] and sum(it["tasks"]["e_step_statistics"].values()) == 8
        assert sum(it["tasks"]["combine_statistics"].values()) == 1
        # the parameters are one key: computed on one worker, fetched at most once by the other
        parameter_groups = [g for g in it["tasks"] if g not in {"e_step_statistics", "combine_statistics"}
                            and "zarr" not in g]
        assert len(parameter_groups) == 1, it["tasks"]
        assert sum(it["tasks"][parameter_groups[0]].values()) == 1
        assert it["transfers"].get(parameter_groups[0], {"count": 0})["count"] <= 1
        # the client sends one small graph and gets one small result per iteration
        assert it["links"]["client->scheduler"]["bytes"] < 50_000
        assert it["links"]["scheduler->client"]["bytes"] < 10_000
        assert all(v["rx_bytes"] > 0 for v in it["kernel"].values())


def test_cleanup_leaves_nothing_behind(tmp_path):
    why = netns_cluster.netns_available()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")
    c = netns_cluster.NetnsCluster(n_workers=1, workdir=tmp_path / "c", log=lambda *a: None)
    c._make_network()  # the network alone, then an abrupt close
    assert len(netns_cluster.leftovers(c.tag)) == 3 + 3 + 1  # 3 namespaces, 3 root-side veths, a bridge
    c.close()
    assert netns_cluster.leftovers(c.tag) == []
