"""The array-library layer of the chunk kernels (NumPy here; CuPy in tests/test_gpu.py on a GPU machine)."""

from __future__ import annotations

import importlib.util

import dask.array as da
import numpy as np
import pytest

from dgmm import GaussianMixture, chunk, io, namespace
from conftest import COVARIANCE_TYPES, make_mixture, mixture_batch


def test_array_module_of_numpy_inputs_is_numpy():
    assert namespace.array_module(np.ones((3, 2))) is np
    assert namespace.array_module(np.float64(1.0)) is np
    assert namespace.array_module([[1.0, 2.0]]) is np  # plain sequences are converted by NumPy


def test_array_module_refuses_other_array_libraries():
    with pytest.raises(TypeError, match=r"NumPy or CuPy arrays; got a chunk of type dask\.array"):
        namespace.array_module(da.ones((4, 2)))
    with pytest.raises(TypeError, match="dask"):
        chunk.e_step_statistics(
            da.ones((4, 2)), (chunk.chunk_params(np.ones(1), np.zeros((1, 2)), np.ones((1, 2)), "diag"),)
        )


def test_to_host_and_on_device_leave_numpy_alone():
    x = np.arange(6.0).reshape(3, 2)
    assert not namespace.is_gpu_array(x) and not namespace.is_gpu_array(da.from_array(x))
    assert namespace.to_host(x) is x
    assert namespace.on_device(np, x) is x
    assert namespace.on_device(np, None) is None
    out = namespace.to_host([1.0, 2.0])
    assert isinstance(out, np.ndarray) and out.tolist() == [1.0, 2.0]


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_to_gpu_without_cupy_says_what_to_install():
    with pytest.raises(ImportError, match=r"dgmm\[gpu\]"):
        namespace.to_gpu(da.ones((4, 2)))


def test_workspace_reuses_numpy_buffers_and_grows():
    work = chunk.Workspace()
    a = work.get("x", (4, 3))
    b = work.get("x", (2, 3))
    assert np.shares_memory(a, b)
    c = work.get("x", (10, 3))
    assert c.shape == (10, 3) and not np.shares_memory(a, c)
    assert work.get("x", (2, 2), np.float32).dtype == np.float32


@pytest.mark.parametrize("kinds", [COVARIANCE_TYPES, ("full",)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gpu_blocks_and_layout_give_the_same_statistics(monkeypatch, dtype, weighted, kinds):
    """The GPU's path, run here with NumPy: GPU-sized row blocks (GPU_BLOCK_ELEMENTS, many CPU blocks at once)
    and whitened residuals held (Σk, d, rows). Same statistics as the CPU's blocks and layout."""
    rng = np.random.default_rng(3)
    X = make_mixture(60_000, 4, offset=50.0, seed=3).astype(dtype)
    weight = rng.uniform(0.5, 2.0, size=len(X)) if weighted else None
    batch = mixture_batch(X, kinds, rng)
    small = chunk.e_step_statistics(X, batch, weight)
    plan = chunk._BatchPlan(batch, 4, X.dtype)
    assert plan.rows < len(X) and not plan.z_features_major  # the CPU splits the chunk into blocks
    monkeypatch.setattr(chunk, "BLOCK_ELEMENTS", chunk.GPU_BLOCK_ELEMENTS)
    monkeypatch.setattr(chunk, "_features_major_z", lambda xp: True)
    plan = chunk._BatchPlan(batch, 4, X.dtype)
    assert plan.rows >= len(X) and plan.z_features_major  # one GPU-sized block, GPU layout
    assert plan.head_only == (kinds == ("full",) and dtype == np.float32)
    large = chunk.e_step_statistics(X, batch, weight)
    # float32: the CPU's products use float32 responsibilities; sums that cancel (Σ r y of a component
    # near the centre) differ by float32 rounding of the largest terms, hence an absolute part.
    rtol = 1e-10 if dtype == np.float64 else 1e-5
    for a, b in zip(small, large):
        for name in ("nk", "sx", "sxx", "sy", "log_likelihood"):
            want = np.asarray(getattr(a, name))
            atol = rtol * 1e-3 if dtype == np.float64 else 1e-6 * np.abs(want).max()
            np.testing.assert_allclose(getattr(b, name), want, rtol=rtol, atol=atol, err_msg=name)
        assert isinstance(b.nk, np.ndarray) and b.nk.dtype == np.float64


def test_lazy_outputs_keep_numpy_meta_and_writers_get_numpy_chunks():
    X = da.from_array(make_mixture(300, 3), chunks=(100, 3))
    model = GaussianMixture(2, random_state=0).fit(X)
    labels = model.predict(X)
    assert isinstance(labels._meta, np.ndarray) and labels.dtype == np.int64
    assert isinstance(model.predict_proba(X)._meta, np.ndarray)
    assert isinstance(model.score_samples(X)._meta, np.ndarray) and model.score_samples(X).dtype == np.float64
    assert io._host_chunks(labels) is labels  # NumPy-backed arrays pass through unchanged
    np.testing.assert_array_equal(labels.compute(), model.predict(X.compute()))


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_dgmm_fit_with_device_gpu_but_no_cupy_is_a_config_error(tmp_path):
    from cli_helpers import run_dgmm, write_config

    np.save(tmp_path / "x.npy", make_mixture(300, 3))
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy"), "device": "gpu"},
        "model": {"n_components": 2},
        "output": {"model": str(tmp_path / "m.npz")},
    })
    result = run_dgmm("fit", config, timeout=120)
    assert result.returncode != 0
    assert "input.device" in result.stderr and "dgmm[gpu]" in result.stderr, result.stderr
    assert not (tmp_path / "m.npz").exists()
