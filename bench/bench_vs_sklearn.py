"""Time per EM iteration: dgmm vs sklearn.mixture.GaussianMixture on the same in-memory data.

Both run 20 fixed iterations (tol=0) from identical initial parameters on this
machine's cores; the script reports medians of repeated runs and the ratio
dgmm / sklearn (below 1 means dgmm is faster).

    python bench/bench_vs_sklearn.py --n-samples 1000000 --n-features 16 --n-components 8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dgmm
from dgmm import GaussianMixture


def make_data(n, d, k, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.uniform(-5, 5, size=(k, d))
    labels = rng.integers(0, k, size=n)
    return means[labels] + rng.standard_normal((n, d)), means


def initial_parameters(X, k, kind, seed=0):
    """Identical starting point for both: sklearn's own init on a subsample, then 0 iterations."""
    sub = X[np.random.default_rng(seed).choice(len(X), 20_000, replace=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = SkGaussianMixture(k, covariance_type=kind, max_iter=1, random_state=seed).fit(sub)
    return dict(weights_init=gm.weights_, means_init=gm.means_, precisions_init=gm.precisions_)


def time_fit(cls, X, k, kind, init, iters, **extra):
    gm = cls(k, covariance_type=kind, tol=0.0, max_iter=iters, **init, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        gm.fit(X)
        seconds = time.perf_counter() - t0
    return seconds / iters, gm


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-samples", type=int, default=1_000_000)
    parser.add_argument("--n-features", type=int, default=16)
    parser.add_argument("--n-components", type=int, default=8)
    parser.add_argument("--kinds", default="full,diag")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    X, _ = make_data(args.n_samples, args.n_features, args.n_components)
    rows = []
    for kind in args.kinds.split(","):
        init = initial_parameters(X, args.n_components, kind)
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits both
            s, gm = time_fit(GaussianMixture, X, args.n_components, kind, init, args.iters)
            ours.append(s)
            s, sk = time_fit(SkGaussianMixture, X, args.n_components, kind, init, args.iters)
            theirs.append(s)
        agree = float(np.max(np.abs(gm.means_ - sk.means_)))
        row = dict(
            kind=kind,
            n_samples=args.n_samples,
            n_features=args.n_features,
            n_components=args.n_components,
            dgmm_s_per_iter=statistics.median(ours),
            sklearn_s_per_iter=statistics.median(theirs),
            ratio=statistics.median(ours) / statistics.median(theirs),
            max_abs_mean_difference=agree,
            runs_dgmm=ours,
            runs_sklearn=theirs,
        )
        rows.append(row)
        print(json.dumps(row))
    print(json.dumps(dict(machine=platform.machine(), cpus=os.cpu_count(), dgmm=dgmm.__version__,
                          numpy=np.__version__)))


if __name__ == "__main__":
    main()
