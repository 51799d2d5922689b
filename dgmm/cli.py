"""The ``dgmm`` command line. The only place that configures logging and prints."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _demo(args) -> int:
    import dask.array as da
    import numpy as np
    from distributed import Client, LocalCluster

    from . import GaussianMixture
    from .datasets import write_blobs_zarr

    t0 = time.perf_counter()
    path = write_blobs_zarr(args.path, args.n_samples, args.n_features, args.n_components,
                            chunk_rows=args.chunk_rows, seed=args.seed)
    print(f"data: {path} ({args.n_samples:,} rows x {args.n_features} features, "
          f"written in {time.perf_counter() - t0:.1f} s)")
    n_workers = args.workers or max(1, min(os.cpu_count() or 1, 4))
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0",
                      host="127.0.0.1", silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        print(f"cluster: LocalCluster with {n_workers} worker processes, dashboard {client.dashboard_link}")
        X = da.from_zarr(path)
        gm = GaussianMixture(n_components=args.n_components, covariance_type=args.covariance_type,
                             random_state=args.seed, verbose=0)
        t1 = time.perf_counter()
        gm.fit(X)
        seconds = time.perf_counter() - t1
    np.set_printoptions(precision=3, suppress=True)
    print(f"fit: {gm.n_iter_} EM iterations in {seconds:.1f} s "
          f"({seconds / max(gm.n_iter_, 1):.2f} s per iteration), converged={gm.converged_}")
    print(f"lower bound (mean log-likelihood per row): {gm.lower_bound_:.6f}")
    print("weights:", gm.weights_)
    print("means:")
    print(gm.means_)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgmm", description="Gaussian mixtures by out-of-core EM over Dask arrays.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="generate a synthetic Zarr data set (if missing) and fit it on a LocalCluster")
    demo.add_argument("--path", default="data/demo.zarr", help="where the Zarr array lives (default: %(default)s)")
    demo.add_argument("--n-samples", type=int, default=2_000_000)
    demo.add_argument("--n-features", type=int, default=8)
    demo.add_argument("--n-components", type=int, default=4)
    demo.add_argument("--chunk-rows", type=int, default=250_000)
    demo.add_argument("--covariance-type", default="full", choices=["full", "tied", "diag", "spherical"])
    demo.add_argument("--workers", type=int, default=0, help="worker processes (default: cores, at most 4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"dgmm: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
