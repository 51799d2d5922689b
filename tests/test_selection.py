"""dgmm.select: a BIC/AIC sweep whose candidates share every pass over the data."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

import dgmm
from dgmm import GaussianMixture, select


def known_mixture(n=3000, seed=0):
    """Three well-separated diagonal Gaussians in 3-D: the truth is (3, 'diag') or richer."""
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0, 0.0], [8.0, 0.0, 2.0], [0.0, 9.0, -3.0]])
    scales = np.array([[1.0, 0.3, 2.0], [0.5, 1.5, 1.0], [2.0, 0.7, 0.4]])
    labels = rng.integers(0, 3, size=n)
    return means[labels] + rng.standard_normal((n, 3)) * scales[labels]


def test_sweep_matches_individual_fits_and_reads_each_chunk_once_per_iteration():
    X = known_mixture(1200, seed=1)
    Xd = da.from_array(X, chunks=(173, 3))
    params = dict(random_state=0, tol=1e-4, max_iter=40)
    sweep = select(Xd, n_components=range(1, 5), covariance_types=("full", "diag"), **params)
    assert len(sweep.results) == 8
    for row, gm in zip(sweep.results, sweep.estimators):
        alone = GaussianMixture(row["n_components"], covariance_type=row["covariance_type"], **params).fit(Xd)
        np.testing.assert_allclose(row["bic"], alone.bic(Xd), rtol=1e-8)
        np.testing.assert_allclose(row["aic"], alone.aic(Xd), rtol=1e-8)
        np.testing.assert_allclose(gm.means_, alone.means_, rtol=1e-8, atol=1e-10)
        assert row["n_iter"] == alone.n_iter_
    # passes: each candidate's initialisation, then ONE pass per EM iteration for all, then one scoring pass
    longest = max(row["n_iter"] for row in sweep.results)
    init_passes = sum(
        GaussianMixture(row["n_components"], covariance_type=row["covariance_type"], **{**params, "max_iter": 0})
        .fit(Xd)
        .n_passes_
        for row in sweep.results
    )
    assert sweep.n_passes == init_passes + longest + 1


def test_sweep_picks_the_true_number_of_components_and_type():
    X = known_mixture(3000, seed=2)
    sweep = select(X, n_components=range(1, 7), covariance_types=("spherical", "diag", "full"), random_state=0)
    best = sweep.results[sweep.best_index]
    assert best["n_components"] == 3
    assert best["covariance_type"] == "diag"
    assert sweep.best_estimator is sweep.estimators[sweep.best_index]
    frame = sweep.to_frame()
    assert list(frame.columns[:4]) == ["n_components", "covariance_type", "bic", "aic"]


def test_plot_and_bad_arguments(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    X = known_mixture(300, seed=3)
    sweep = select(X, n_components=[1, 2, 3], covariance_types=("diag",), criterion="aic", random_state=0)
    ax = sweep.plot()
    assert len(ax.lines) == 1
    ax.figure.savefig(tmp_path / "bic.png")
    assert (tmp_path / "bic.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="criterion"):
        select(X, criterion="likelihood")
    with pytest.raises(ValueError, match="sets 'covariance_type' itself"):
        select(X, covariance_type="full")
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        select(X[:5], n_components=[2, 8])
    assert dgmm.select is select
