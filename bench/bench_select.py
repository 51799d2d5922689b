"""Model-selection sweep vs the same candidates fitted one after another.

    python bench/bench_select.py --n-samples 400000 --n-features 8 --repeats 3

Writes (if missing) a Zarr data set under data/, then times
``dgmm.select(X, n_components=range(1, 9), covariance_types=("full", "diag"))``
against 16 separate ``GaussianMixture(...).fit(X)`` calls with the same
parameters (threaded scheduler, this machine's cores), medians of repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import dask.array as da
from sklearn.exceptions import ConvergenceWarning

import dgmm
from dgmm import GaussianMixture, select
from dgmm.datasets import write_blobs_zarr


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", default="data/bench_select.zarr")
    parser.add_argument("--n-samples", type=int, default=400_000)
    parser.add_argument("--n-features", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-iter", type=int, default=20)
    args = parser.parse_args()
    write_blobs_zarr(args.path, args.n_samples, args.n_features, 5, chunk_rows=50_000, seed=0)
    X = da.from_zarr(args.path)
    grid = dict(n_components=range(1, 9), covariance_types=("full", "diag"))
    params = dict(random_state=0, tol=1e-3, max_iter=args.max_iter)
    sweep_times, separate_times = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", dgmm.DegenerateComponentWarning)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sweep = select(X, **grid, **params)
            sweep_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            passes = 0
            for kind in grid["covariance_types"]:
                for k in grid["n_components"]:
                    gm = GaussianMixture(k, covariance_type=kind, **params).fit(X)
                    gm.bic(X)  # the sweep scores every candidate too
                    passes += gm.n_passes_ + 1
            separate_times.append(time.perf_counter() - t0)
    row = dict(
        n_samples=args.n_samples,
        n_features=args.n_features,
        candidates=16,
        sweep_s=statistics.median(sweep_times),
        separate_s=statistics.median(separate_times),
        ratio=statistics.median(sweep_times) / statistics.median(separate_times),
        sweep_passes=sweep.n_passes,
        separate_passes=passes,
        best=sweep.results[sweep.best_index],
        runs_sweep=sweep_times,
        runs_separate=separate_times,
    )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
