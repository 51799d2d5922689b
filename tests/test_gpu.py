"""CuPy-backed chunks on a GPU give the CPU's model (skipped without CuPy and a CUDA device).

Run on a GPU machine by ``bench/gpu_check.sh`` (issue 9); CI has no GPU, and there every test
here is skipped. The CPU side of the same code is covered by tests/test_namespace.py.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from dgmm import GaussianMixture, chunk, to_gpu
from dgmm.io import write_predictions
from conftest import COVARIANCE_TYPES, make_mixture, mixture_batch

cupy = pytest.importorskip("cupy")
try:
    HAVE_DEVICE = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # no driver or no device
    HAVE_DEVICE = False
pytestmark = pytest.mark.skipif(not HAVE_DEVICE, reason="no CUDA device")

#: GPU vs CPU, as issue 9 asks: rtol 1e-6 in float64, 1e-4 in float32 (with an absolute part
#: relative to the largest entry, for entries that are near zero).
RTOL = {np.float64: 1e-6, np.float32: 1e-4}
FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")


@pytest.mark.parametrize("kinds", [COVARIANCE_TYPES, ("full",), ("diag",)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_e_step_statistics_on_gpu_equal_cpu(dtype, weighted, kinds):
    rng = np.random.default_rng(0)
    X = make_mixture(300_000, 6, offset=20.0, seed=1).astype(dtype)
    weight = rng.uniform(0.5, 2.0, len(X)) if weighted else None
    batch = mixture_batch(X, kinds, rng)
    cpu = chunk.e_step_statistics(X, batch, weight)
    gpu = chunk.e_step_statistics(cupy.asarray(X), batch, None if weight is None else cupy.asarray(weight))
    rtol = 1e-9 if dtype == np.float64 else 1e-5
    for a, b in zip(cpu, gpu):
        for name in ("nk", "sx", "sxx", "sy", "log_likelihood"):
            got = getattr(b, name)
            assert isinstance(got, (np.ndarray, float)), (name, type(got))  # host arrays, not CuPy
            want = np.asarray(getattr(a, name))
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 0.1 * np.abs(want).max(), err_msg=name)
        assert b.n_samples == pytest.approx(a.n_samples, rel=1e-12) and b.n_nonfinite == 0  # Σ weights


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fit_on_gpu_equals_cpu_fit(kind, dtype):
    X = make_mixture(200_000, 8, offset=5.0, seed=2).astype(dtype)
    X_cpu = da.from_array(X, chunks=(40_000, 8))
    X_gpu = to_gpu(X_cpu)
    assert isinstance(X_gpu._meta, cupy.ndarray)
    kwargs = dict(n_components=3, covariance_type=kind, random_state=0, max_iter=25, tol=1e-6)
    cpu = GaussianMixture(**kwargs).fit(X_cpu)
    gpu = GaussianMixture(**kwargs).fit(X_gpu)
    rtol = RTOL[dtype]
    for name in FITTED:
        got, want = getattr(gpu, name), getattr(cpu, name)
        assert type(got) is np.ndarray and got.dtype == dtype, (name, type(got), got.dtype)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=name)
    np.testing.assert_allclose(gpu.lower_bound_, cpu.lower_bound_, rtol=rtol)
    assert gpu.n_iter_ == cpu.n_iter_


def test_predictions_on_gpu_input_are_lazy_cupy_and_equal_cpu(tmp_path):
    X = make_mixture(100_000, 5, seed=3)
    X_cpu = da.from_array(X, chunks=(30_000, 5))
    X_gpu = to_gpu(X_cpu)
    model = GaussianMixture(3, random_state=0).fit(X_cpu)
    for method in ("predict", "predict_proba", "score_samples"):
        lazy = getattr(model, method)(X_gpu)
        assert isinstance(lazy, da.Array) and isinstance(lazy._meta, cupy.ndarray), method
        got = lazy.compute()
        assert isinstance(got, cupy.ndarray), method
        want = getattr(model, method)(X)
        if method == "predict":
            np.testing.assert_array_equal(cupy.asnumpy(got), want)
        else:
            np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=1e-9, atol=1e-12)
    assert model.score(X_gpu) == pytest.approx(model.score(X), rel=1e-10)
    # Writers copy GPU chunks to the host as they write them.
    write_predictions(model, X_gpu, str(tmp_path / "out.zarr"), format="zarr", probabilities=True)
    import zarr

    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    np.testing.assert_array_equal(group["labels"][:], model.predict(X))


def test_nonfinite_rows_marked_missing_on_gpu_equal_cpu(tmp_path):
    import zarr

    from dgmm.graph import nonfinite_rows_zeroed

    X = make_mixture(60_000, 4, seed=7)
    X[[5, 30_001, 59_999], [0, 2, 3]] = [np.nan, np.inf, -np.inf]
    model = GaussianMixture(3, random_state=0).fit(np.delete(X, [5, 30_001, 59_999], axis=0))
    X_cpu = da.from_array(X, chunks=(20_000, 4))
    X_gpu = to_gpu(X_cpu)
    zeroed, mask = nonfinite_rows_zeroed(X_gpu)  # the chunk math stays on the device
    assert isinstance(zeroed._meta, cupy.ndarray) and isinstance(mask._meta, cupy.ndarray)
    assert isinstance(mask.compute(), cupy.ndarray)
    np.testing.assert_array_equal(np.flatnonzero(cupy.asnumpy(mask.compute())), [5, 30_001, 59_999])
    groups = {}
    for name, data in (("cpu", X_cpu), ("gpu", X_gpu)):
        write_predictions(model, data, str(tmp_path / f"{name}.zarr"), format="zarr", probabilities=True,
                          log_likelihood=True, nonfinite="missing")
        groups[name] = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")
    labels = groups["gpu"]["labels"][:]
    np.testing.assert_array_equal(labels, groups["cpu"]["labels"][:])
    assert (labels[[5, 30_001, 59_999]] == -1).all() and (np.delete(labels, [5, 30_001, 59_999]) >= 0).all()
    for name in ("probabilities", "log_likelihood"):
        np.testing.assert_allclose(groups["gpu"][name][:], groups["cpu"][name][:], rtol=1e-9, atol=1e-12,
                                   equal_nan=True, err_msg=name)


def test_gpu_fit_on_the_distributed_scheduler_equals_threads():
    distributed = pytest.importorskip("distributed")
    X = make_mixture(60_000, 4, seed=4).astype(np.float32)
    X_gpu = to_gpu(da.from_array(X, chunks=(20_000, 4)))
    threads = GaussianMixture(3, covariance_type="full", random_state=0, max_iter=10, tol=0).fit(X_gpu)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster:
        with distributed.Client(cluster):
            dist = GaussianMixture(3, covariance_type="full", random_state=0, max_iter=10, tol=0).fit(X_gpu)
    for name in FITTED:
        np.testing.assert_allclose(getattr(dist, name), getattr(threads, name), rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("persist", ["auto", False])
def test_dgmm_fit_with_input_device_gpu_gives_the_cpu_model(tmp_path, persist):
    from cli_helpers import json_lines, run_dgmm, write_config

    from dgmm import load_model

    np.save(tmp_path / "x.npy", make_mixture(120_000, 6, seed=5))
    models = {}
    for device in ("cpu", "gpu"):
        config = write_config(tmp_path / f"{device}.yaml", {
            "input": {"path": str(tmp_path / "x.npy"), "device": device, "persist": persist, "chunk_rows": 30_000},
            "model": {"n_components": 3, "random_state": 0, "tol": 1e-6, "max_iter": 30},
            "cluster": {"type": "threads"},
            "output": {"model": str(tmp_path / f"{device}.npz"), "checkpoint_every": 0},
        })
        result = run_dgmm("fit", config, "--log-format", "json", timeout=300)
        assert result.returncode == 0, result.stderr
        events = json_lines(result.stdout)
        if device == "gpu":
            assert any(e.get("event") == "device" for e in events)
            (kept,) = [e for e in events if e.get("event") == "persist"]
            assert kept["persisted"] is (persist == "auto"), kept
            assert ("GPU memory" in kept["message"]) is (persist == "auto"), kept
        models[device] = load_model(tmp_path / f"{device}.npz")
    for name in FITTED:
        np.testing.assert_allclose(getattr(models["gpu"], name), getattr(models["cpu"], name), rtol=1e-6,
                                   atol=1e-6 * np.abs(getattr(models["cpu"], name)).max(), err_msg=name)


def test_fit_on_a_cupy_array_equals_numpy_and_predicts_cupy_arrays():
    X = make_mixture(150_000, 6, seed=6)
    X_gpu = cupy.asarray(X)
    kwargs = dict(n_components=3, covariance_type="full", random_state=0, max_iter=20, tol=1e-6)
    cpu = GaussianMixture(**kwargs).fit(X)
    gpu = GaussianMixture(**kwargs).fit(X_gpu)
    for name in FITTED:
        got, want = getattr(gpu, name), getattr(cpu, name)
        assert type(got) is np.ndarray, name
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=name)
    labels = gpu.predict(X_gpu)
    assert isinstance(labels, cupy.ndarray)
    np.testing.assert_array_equal(labels.get(), gpu.predict(X))
    proba = gpu.predict_proba(X_gpu)
    assert isinstance(proba, cupy.ndarray) and proba.shape == (len(X), 3)
    np.testing.assert_allclose(proba.get(), gpu.predict_proba(X), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gpu.score_samples(X_gpu).get(), gpu.score_samples(X), rtol=1e-9)


def test_partial_fit_on_gpu_batches_equals_cpu():
    X = make_mixture(60_000, 4, seed=7)
    cpu, gpu = GaussianMixture(3, random_state=0), GaussianMixture(3, random_state=0)
    for start in range(0, len(X), 20_000):
        batch = da.from_array(X[start : start + 20_000], chunks=(10_000, 4))
        cpu.partial_fit(batch)
        gpu.partial_fit(to_gpu(batch))
    for name in FITTED:
        want = getattr(cpu, name)
        np.testing.assert_allclose(getattr(gpu, name), want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=name)


def test_select_on_gpu_input_equals_cpu():
    from dgmm import select

    X = da.from_array(make_mixture(40_000, 3, seed=8), chunks=(10_000, 3))
    grid = dict(n_components=range(1, 5), covariance_types=("full", "diag"), random_state=0, max_iter=30)
    cpu, gpu = select(X, **grid), select(to_gpu(X), **grid)
    assert [(r["n_components"], r["covariance_type"]) for r in gpu.results] == [
        (r["n_components"], r["covariance_type"]) for r in cpu.results
    ]
    np.testing.assert_allclose([r["bic"] for r in gpu.results], [r["bic"] for r in cpu.results], rtol=1e-6)
    assert gpu.best_estimator.get_params()["n_components"] == cpu.best_estimator.get_params()["n_components"]
