"""Where the chunk kernel's time goes: ``dgmm.chunk.e_step_statistics`` on one thread, and on two.

Runs on ONE thread (BLAS limited to 1 thread, as dgmm's threaded scheduler does) over one chunk
of dgmm's automatic size (8 MiB of float64), and times, with the kernel's own functions (no copy
of its code here, so this cannot drift from it):

  kernel     the whole ``e_step_statistics`` (log-densities, log-sum-exp, statistics, the
             per-chunk back-transform) for a batch of ``--members`` mixtures (restarts)
  log_prob   only the log-densities of the same batch (``chunk._log_prob_block`` over the
             kernel's row blocks): the rest of ``kernel`` is log-sum-exp + statistics
  gemm_1t    the best 1-thread GEMM rate (a square 1536 x 1536 matmul) and, for 'full', the
             kernel's GFLOP/s as a fraction of it
  threaded   wall seconds per chunk when a pool of one thread, then of ``--threads`` threads,
             runs the kernel on 24 chunks back to back (median of ``--repeats``), as dask's threaded scheduler does
             (``--threads 0`` skips it); ``thread_scaling`` = one thread / ``--threads`` threads:
             2 on two cores when nothing serialises the threads, lower when the kernel holds
             the GIL (see the note above ``dgmm.chunk.block_rows``)

Process CPU time, minimum over ``--repeats`` (the least disturbed run on a busy machine).
FLOPs of 'full': 4 n k d^2 per mixture (E-step whitening + second moments). One JSON line
per configuration ``type:d:k``.

    python bench/profile_kernel.py
    python bench/profile_kernel.py --configs full:32:16,full:64:16 --dtype float32
    python bench/profile_kernel.py --configs diag:16:8 --members 1,4
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from benchutil import emit, initial_parameters, load_average, make_data
from threadpoolctl import threadpool_limits

from dgmm import chunk
from dgmm.estimator import GaussianMixture
from dgmm.passes import auto_chunk_rows


def batch_params(X, k, kind, members):
    """``members`` parameter sets (sklearn-style starting points from different seeds)."""
    out = []
    for seed in range(members):
        init = initial_parameters(X, k, kind, seed=seed, sample=min(20_000, len(X)))
        gm = GaussianMixture(k, covariance_type=kind, max_iter=0, **init).fit(X[:2000].astype(np.float64))
        out.append(chunk.chunk_params(gm.weights_, gm.means_, gm.precisions_cholesky_, kind, input_dtype=X.dtype))
    return tuple(out)


def best_cpu(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def log_prob_only(X, batch):
    plan = chunk._BatchPlan(batch, X.shape[1], X.dtype)
    work = chunk._thread_workspace()
    L = np.empty((plan.n_total, plan.rows))
    for start in range(0, X.shape[0], plan.rows):
        block = X[start : start + plan.rows]
        chunk._log_prob_block(block, plan, work, L[:, : block.shape[0]])


def threaded_seconds(X, batch, threads, repeats, n_chunks=24):
    """Median wall seconds per chunk with ``threads`` threads running the kernel on ``n_chunks`` chunks.

    The median, not the minimum: how often two threads collide on the GIL varies from run to run,
    and the minimum would report the luckiest run.
    """
    copies = [X.copy() for _ in range(threads)]  # one chunk per thread, as dask's workers hold theirs

    def job(i):
        chunk.e_step_statistics(copies[i % threads], batch)

    runs = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(job, range(n_chunks)))
            runs.append(time.perf_counter() - t0)
    return float(np.median(runs)) / n_chunks


def gemm_probe(dtype, repeats, size=1536):
    """The best 1-thread GEMM rate: a square (size x size) matmul, GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(size, size)).astype(dtype)
    b = rng.normal(size=(size, size)).astype(dtype)
    seconds = best_cpu(lambda: a @ b, repeats)
    return 2 * size**3 / seconds / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="full:16:8,diag:16:8,tied:16:8,spherical:16:8,full:32:16,full:64:16")
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--members", default="1", help="batch sizes (restarts) to time, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads of the threaded measurement (0: skip it)")
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    # One BLAS thread from the start: OpenBLAS threads woken by a multithreaded call (the
    # sklearn-initialised parameters) spin for a while afterwards, and process CPU time would
    # count their spinning as the kernel's.
    threadpool_limits(1)
    for config in args.configs.split(","):
        kind, d, k = config.split(":")
        d, k = int(d), int(k)
        n = auto_chunk_rows(10**9, d)
        X = make_data(n, d, k, seed=3).astype(dtype)
        for members in (int(m) for m in args.members.split(",")):
            batch = batch_params(X, k, kind, members)
            with threadpool_limits(1):
                chunk.e_step_statistics(X[:4096], batch)  # warm the workspace
                kernel = best_cpu(lambda: chunk.e_step_statistics(X, batch), args.repeats)
                log_prob = best_cpu(lambda: log_prob_only(X, batch), args.repeats)
                row = dict(
                    type=kind,
                    n_features=d,
                    n_components=k,
                    members=members,
                    dtype=str(dtype),
                    rows=n,
                    kernel_s=kernel,
                    rows_per_s=n / kernel,
                    log_prob_share=log_prob / kernel,
                    rest_share=1 - log_prob / kernel,
                    load_average=load_average(),
                )
                if args.threads:
                    one = threaded_seconds(X, batch, 1, args.repeats)
                    wall = threaded_seconds(X, batch, args.threads, args.repeats)
                    row["threads"] = args.threads
                    row["pool_1_thread_s_per_chunk"] = one
                    row["threaded_s_per_chunk"] = wall
                    row["thread_scaling"] = one / wall
                if kind == "full":
                    flops = 4 * n * k * d * d * members
                    row["gflops"] = flops / kernel / 1e9
                    row["gemm_1t_gflops"] = gemm_probe(dtype, args.repeats)
                    row["fraction_of_gemm"] = row["gflops"] / row["gemm_1t_gflops"]
            emit(row)


if __name__ == "__main__":
    main()
