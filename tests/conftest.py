"""Shared fixtures: small mixtures with ragged chunks so boundary bugs show."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture as SkGaussianMixture

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def make_mixture(n_samples=600, n_features=3, offset=0.0, seed=0):
    """Three overlapping anisotropic blobs, optionally far from the origin."""
    rng = np.random.default_rng(seed)
    sizes = [n_samples // 2, n_samples // 3, n_samples - n_samples // 2 - n_samples // 3]
    centers = np.array([[0.0] * n_features, [4.0] + [1.0] * (n_features - 1), [1.0] + [-3.0] * (n_features - 1)])
    parts = []
    for size, center in zip(sizes, centers):
        A = rng.normal(size=(n_features, n_features)) * 0.5 + np.eye(n_features)
        parts.append(rng.normal(size=(size, n_features)) @ A + center)
    X = np.vstack(parts)
    rng.shuffle(X)
    return X + offset


def mixture_batch(X, kinds, rng, n_components=3):
    """One mixture per covariance type of ``kinds`` for X (ChunkParams): rows of X as means, its covariance."""
    from dgmm import chunk

    batch = []
    d = X.shape[1]
    for kind in kinds:
        k = n_components
        means = X[rng.choice(len(X), k, replace=False)].astype(np.float64)
        cov = {
            "full": np.stack([np.cov(X.T) + 0.1 * np.eye(d)] * k),
            "tied": np.cov(X.T) + 0.1 * np.eye(d),
            "diag": np.tile(X.var(axis=0), (k, 1)),
            "spherical": np.full(k, X.var()),
        }[kind]
        prec = chunk.compute_precision_cholesky(cov, kind)
        batch.append(chunk.chunk_params(np.full(k, 1 / k), means, prec, kind, input_dtype=X.dtype))
    return tuple(batch)


#: The fitted parameters that a resumed or re-run fit must reproduce.
FITTED = ("weights_", "means_", "covariances_", "precisions_cholesky_")


def assert_same_model(a, b, rtol=1e-10, atol=0.0, history=True) -> None:
    """``a`` and ``b`` have the same fitted parameters and, with ``history``, the same lower bounds and n_iter_."""
    for name in FITTED:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=atol, err_msg=name)
    if history:
        np.testing.assert_allclose(a.lower_bounds_, b.lower_bounds_, rtol=rtol)
        assert a.n_iter_ == b.n_iter_


def rewrite(path, edit_meta=None, edit_arrays=None):
    """Rewrite a model or checkpoint file with edited metadata or arrays (as a corrupt or foreign file would be).

    ``edit_meta`` receives the decoded JSON ``meta`` entry and ``edit_arrays`` the dict of the other arrays; each
    edits its argument in place.
    """
    with np.load(path, allow_pickle=False) as f:
        arrays = dict(f)
    meta = json.loads(str(arrays.pop("meta")))
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


@pytest.fixture
def dgmm_cli(capsys):
    """Run ``dgmm ARGS`` in this process; returns (exit status, stdout, stderr)."""
    from cli_helpers import InProcessCLI

    cli = InProcessCLI(capsys)
    yield cli
    cli.restore()


@pytest.fixture
def mixture_data():
    return make_mixture()


def perturbed_init(X, covariance_type, n_components=3, seed=0):
    """Initial parameters near (not at) sklearn's optimum, as sklearn would accept them."""
    sk = SkGaussianMixture(n_components, covariance_type=covariance_type, random_state=seed, max_iter=3).fit(X)
    weights = 0.8 * sk.weights_ + 0.2 / n_components
    means = sk.means_ + 0.25 * X.std(axis=0)
    precisions = sk.precisions_ * 0.7
    return weights, means, precisions
