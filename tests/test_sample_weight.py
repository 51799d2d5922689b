"""sample_weight: integer weights equal row repetition, zero weights equal dropped rows."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from dgmm import GaussianMixture
from conftest import COVARIANCE_TYPES, make_mixture, perturbed_init


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
@pytest.mark.parametrize("as_dask", [False, True], ids=["numpy", "dask"])
def test_integer_weights_equal_repeated_rows(kind, as_dask):
    X = make_mixture(n_samples=400, n_features=3, seed=41)
    weights = np.random.default_rng(0).integers(0, 4, size=len(X))
    repeated = np.repeat(X, weights, axis=0)
    w, m, p = perturbed_init(X, kind)
    kwargs = dict(covariance_type=kind, weights_init=w, means_init=m, precisions_init=p, tol=1e-8, max_iter=200)
    reference = GaussianMixture(3, **kwargs).fit(repeated)
    Xin = da.from_array(X, chunks=(37, 3)) if as_dask else X
    win = da.from_array(weights, chunks=53) if as_dask else weights  # misaligned chunks: realigned to X's
    weighted = GaussianMixture(3, **kwargs).fit(Xin, sample_weight=win)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(weighted, name), getattr(reference, name), rtol=1e-8, err_msg=name)
    np.testing.assert_allclose(weighted.lower_bound_, reference.lower_bound_, rtol=1e-8)
    assert weighted.n_iter_ == reference.n_iter_
    np.testing.assert_allclose(weighted.score(Xin, sample_weight=win), reference.score(repeated), rtol=1e-10)


@pytest.mark.parametrize("init_params", ["random", "kmeans"])
def test_zero_weights_equal_dropped_rows_with_default_init_statistics(init_params):
    X = make_mixture(n_samples=300, n_features=2, seed=42)
    keep = np.ones(len(X), dtype=bool)
    keep[::3] = False
    w, m, p = perturbed_init(X[keep], "full")
    kwargs = dict(weights_init=w, means_init=m, precisions_init=p, tol=1e-8)
    a = GaussianMixture(3, **kwargs).fit(X[keep])
    b = GaussianMixture(3, **kwargs).fit(X, sample_weight=keep.astype(float))
    np.testing.assert_allclose(b.means_, a.means_, rtol=1e-8)
    np.testing.assert_allclose(b.covariances_, a.covariances_, rtol=1e-8)
    # default initialisation with weights still gives a sound fit
    gm = GaussianMixture(3, init_params=init_params, random_state=0).fit(X, sample_weight=keep.astype(float))
    assert np.isfinite(gm.lower_bound_)


def test_bad_sample_weights():
    X = make_mixture(n_samples=100, n_features=2)
    with pytest.raises(ValueError, match="Negative values"):
        GaussianMixture(2).fit(X, sample_weight=-np.ones(100))
    with pytest.raises(ValueError, match=r"expected \(100,\)"):
        GaussianMixture(2).fit(X, sample_weight=np.ones(99))
    with pytest.raises(ValueError, match="NaN or infinity"):
        GaussianMixture(2).fit(da.from_array(X, chunks=30), sample_weight=da.from_array(np.full(100, np.nan)))
    with pytest.raises(ValueError, match="Negative values"):
        GaussianMixture(2).fit(da.from_array(X, chunks=30), sample_weight=da.from_array(-np.ones(100), chunks=40))
