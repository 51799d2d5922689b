"""Restarts and out-of-core initialisation on a Zarr array: what they cost in EM iterations.

Measured side by side in one process, repeats interleaved so that drift on a
shared machine hits every variant alike:

* seconds of a pass that only reads the chunks (the part of an EM iteration
  that restarts share);
* seconds per EM iteration (diag) with ``n_init=4`` and with ``n_init=1``
  (read from the per-iteration ``callbacks``, so the initialisation is not
  counted; ``tol=0`` keeps all restarts running), and their ratio; and per
  'full' EM iteration with ``n_init=1``;
* seconds of the out-of-core 'kmeans' initialisation (k-means‖ rounds,
  candidate weighing, Lloyd passes; ``n_init=1``) for each number of rounds
  in ``--rounds`` (the first is reported as ``kmeans_*``), and of the
  out-of-core 'k-means++', each as a number of diag (and full) EM iterations
  (``n_init=1``). The initialisation is timed as a whole ``fit`` with
  ``max_iter=0`` (validation, initialisation, no EM pass), so it runs with
  the same single-threaded BLAS as the EM passes.

Writes the blobs array (``dgmm.datasets.write_blobs_zarr``) if it is missing
and prints one JSON line per repeat, then one with the medians.

    python bench/bench_init.py --path data/bench_init.zarr --n-samples 2000000 --repeats 5 --rounds 3,5

``--quality`` instead prints, for 1, 2, 3 and 5 k-means‖ rounds, the mean
k-means inertia over 20 seeds of the out-of-core 'kmeans' (in memory, small
data) against sklearn's ``KMeans(n_init=1)`` on digits and on 20 blobs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import dask
import dask.array as da
import numpy as np
from sklearn.exceptions import ConvergenceWarning

import dgmm
from dgmm import GaussianMixture, init
from dgmm.datasets import write_blobs_zarr
from benchutil import git_revision


def em_seconds_per_iteration(X, n_components, n_init, iters, seed, covariance_type="diag"):
    """Median seconds of the EM iterations (not the initialisation) of one fit."""
    seconds = []
    gm = GaussianMixture(
        n_components,
        covariance_type=covariance_type,
        init_params="random",
        n_init=n_init,
        tol=0.0,
        max_iter=iters,
        random_state=seed,
        callbacks=lambda info: seconds.append(info.seconds),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm.fit(X)
    assert gm.n_passes_ == iters + 1
    return statistics.median(seconds)


def read_seconds(X):
    """Seconds of a pass that only reads and decompresses every chunk."""
    rows = [dask.delayed(len)(block) for block in X.to_delayed().ravel()]
    t0 = time.perf_counter()
    assert sum(dask.compute(*rows)) == X.shape[0]
    return time.perf_counter() - t0


def init_seconds(X, n_components, seed, init_params, rounds=None):
    """Seconds and passes of the out-of-core initialisation alone: a fit with ``max_iter=0``."""
    default_rounds = init.KMEANS_PARALLEL_ROUNDS
    if rounds is not None:
        init.KMEANS_PARALLEL_ROUNDS = rounds
    try:
        gm = GaussianMixture(
            n_components, covariance_type="diag", init_params=init_params, max_iter=0, random_state=seed
        )
        t0 = time.perf_counter()
        gm.fit(X)
        return time.perf_counter() - t0, gm.n_passes_
    finally:
        init.KMEANS_PARALLEL_ROUNDS = default_rounds


def rounds_quality(seeds=range(20)):
    """Mean k-means inertia over seeds for several round counts, against sklearn's KMeans(n_init=1)."""
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits, make_blobs
    from sklearn.preprocessing import StandardScaler

    from dgmm.passes import DataPasses, single_threaded_blas

    digits = StandardScaler().fit_transform(load_digits().data)
    blobs, _ = make_blobs(20_000, n_features=10, centers=20, cluster_std=2.0, random_state=1)
    for name, X, k in [("digits", digits, 10), ("blobs20", blobs, 20)]:
        row = {"data": name, "n_components": k}
        row["sklearn_kmeans_n_init_1"] = float(np.mean([KMeans(k, n_init=1, random_state=s).fit(X).inertia_ for s in seeds]))
        for rounds in (1, 2, 3, 5):
            inertia, lloyd = [], []
            for seed in seeds:
                with single_threaded_blas():
                    result = init.kmeans_parallel(DataPasses(X), k, seeds=(seed,), rounds=rounds)
                centers = result.centers[0]
                inertia.append(float(((X[:, None, :] - centers[None]) ** 2).sum(axis=-1).min(axis=1).sum()))
                lloyd.append(result.n_lloyd[0])
            row[f"rounds_{rounds}"] = float(np.mean(inertia))
            row[f"rounds_{rounds}_lloyd_passes"] = float(np.mean(lloyd))
        print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="data/bench_init.zarr")
    parser.add_argument("--n-samples", type=int, default=2_000_000)
    parser.add_argument("--n-features", type=int, default=16)
    parser.add_argument("--n-components", type=int, default=8)
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    parser.add_argument("--iters", type=int, default=5, help="EM iterations per timed fit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="em,init", help="what to time: em (read pass, EM iterations), init")
    parser.add_argument("--quality", action="store_true", help="k-means cost against rounds instead of timings")
    parser.add_argument(
        "--rounds", default=f"{init.KMEANS_PARALLEL_ROUNDS},5", help="k-means|| round counts to time, comma-separated"
    )
    args = parser.parse_args()
    if args.quality:
        rounds_quality()
        return

    t0 = time.perf_counter()
    path = write_blobs_zarr(
        args.path, args.n_samples, args.n_features, args.n_components, chunk_rows=args.chunk_rows, seed=0
    )
    written = time.perf_counter() - t0
    X = da.from_zarr(path)
    if X.shape != (args.n_samples, args.n_features):
        raise SystemExit(f"{path} holds {X.shape}; remove it or pass matching --n-samples/--n-features")
    k = args.n_components
    rows = []
    with dask.config.set(scheduler="threads"):
        for repeat in range(args.repeats):
            parts = args.parts.split(",")
            row = dict(repeat=repeat)
            if "em" in parts:
                read = read_seconds(X)
                em1 = em_seconds_per_iteration(X, k, 1, args.iters, repeat)
                em4 = em_seconds_per_iteration(X, k, 4, args.iters, repeat)
                full1 = em_seconds_per_iteration(X, k, 1, args.iters, repeat, "full")
                row.update(
                    em_s_per_iter_n_init_1=em1,
                    em_s_per_iter_n_init_4=em4,
                    restarts_ratio=em4 / em1,
                    read_s_per_pass=read,
                    # if reading were shared and each restart cost (em1 - read) of compute:
                    restarts_ratio_if_compute_bound=(read + 4 * (em1 - read)) / em1,
                    full_em_s_per_iter=full1,
                )
            if "init" in parts:
                em1 = row.get("em_s_per_iter_n_init_1") or em_seconds_per_iteration(X, k, 1, args.iters, repeat)
                full1 = row.get("full_em_s_per_iter") or em_seconds_per_iteration(X, k, 1, args.iters, repeat, "full")
                rounds = [int(r) for r in args.rounds.split(",")]
                km_s, km_passes = init_seconds(X, k, repeat, "kmeans", rounds[0])
                more = {r: init_seconds(X, k, repeat, "kmeans", r) for r in rounds[1:]}
                pp_s, pp_passes = init_seconds(X, k, repeat, "k-means++")
                row.update(
                    kmeans_rounds=rounds[0],
                    kmeans_init_s=km_s,
                    kmeans_init_passes=km_passes,
                    kmeans_init_in_em_iters=km_s / em1,
                    kmeans_init_in_full_em_iters=km_s / full1,
                    plusplus_init_s=pp_s,
                    plusplus_init_passes=pp_passes,
                    plusplus_init_in_em_iters=pp_s / em1,
                )
                for r, (seconds, passes) in more.items():
                    row[f"kmeans_{r}_rounds_init_s"] = seconds
                    row[f"kmeans_{r}_rounds_init_passes"] = passes
                    row[f"kmeans_{r}_rounds_init_in_em_iters"] = seconds / em1
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {
        key: statistics.median(r[key] for r in rows)
        for key in rows[0]
        if key != "repeat"
    }
    summary.update(
        n_samples=args.n_samples,
        n_features=args.n_features,
        n_components=k,
        chunk_rows=args.chunk_rows,
        n_chunks=int(X.numblocks[0]),
        gib=X.nbytes / 2**30,
        repeats=args.repeats,
        oversampling_factor=init.OVERSAMPLING_FACTOR,
        seconds_to_write_data=written,
        cpus=os.cpu_count(),
        load_average=os.getloadavg()[0],
        python=platform.python_version(),
        numpy=np.__version__,
        dask=dask.__version__,
        dgmm=dgmm.__version__,
        commit=git_revision(),
        parts=args.parts,
    )
    print(json.dumps({"median": summary}), flush=True)


if __name__ == "__main__":
    main()
