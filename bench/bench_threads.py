"""Threads and the GIL: dgmm's EM iteration on dask's threaded scheduler with row blocks sized for the threads.

Threads of one process share the GIL; every NumPy call of a row block releases it and takes it back,
and taking it back from another thread costs a hand-off. With many threads on cache-sized blocks,
the threads queue for the GIL (``dgmm.chunk.block_scale``). This script fits the same in-memory data
on dask's threaded scheduler with ``--threads`` threads, once with blocks sized for the threads
(dgmm's default) and once with the one-thread blocks (``chunk.MAX_BLOCK_SCALE = 1``), interleaved,
and optionally on a ``LocalCluster`` of worker processes of 2 threads (``--processes``, the
reference without a shared GIL). One JSON line per run, then one summary line per configuration.

Without a fit (``--kernel``): pools of each of ``--threads`` threads run the kernel on one
automatically sized chunk per thread, ``--chunks`` times back to back (no dask), with blocks of
2**``--log2-blocks`` values (``chunk.BLOCK_ELEMENTS``, dgmm's default 2**19 for up to 3 threads);
``thread_scaling`` = one thread's time per chunk / this pool's.

    python bench/bench_threads.py                                  # 2,000,000 x 32, k=16, full, float32
    python bench/bench_threads.py --threads 16 --processes         # on a 16-core machine
    python bench/bench_threads.py --kernel --threads 1,2 --log2-blocks 13,15,17,19,21,23
    python bench/bench_threads.py --distances --threads 1,2 --repeats 5
    python bench/bench_threads.py --handoff --threads 1,2 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import dask
import dask.array as da
import numpy as np
from benchutil import dgmm_fit, emit, initial_parameters, load_average, make_data, median_after_first
from threadpoolctl import threadpool_limits

from dgmm import chunk
from dgmm.passes import auto_chunk_rows


def fit_threads(X, k, kind, init, iters, threads, scaled):
    """Seconds per iteration (median after the first) on dask's threaded scheduler."""
    saved = chunk.MAX_BLOCK_SCALE
    chunk.MAX_BLOCK_SCALE = saved if scaled else 1
    try:
        with dask.config.set(scheduler="threads", num_workers=threads):
            fit, _ = dgmm_fit(X, k, kind, init, iters)
    finally:
        chunk.MAX_BLOCK_SCALE = saved
    return median_after_first(fit.seconds), fit


def fit_processes(X, k, kind, init, iters, workers, chunk_rows):
    """Seconds per iteration on a LocalCluster of ``workers`` processes x 2 threads holding the data."""
    from distributed import Client, LocalCluster, wait

    with LocalCluster(n_workers=workers, threads_per_worker=2, dashboard_address=None,
                      memory_limit=None) as cluster, Client(cluster) as client:
        pieces = [X[i : i + chunk_rows] for i in range(0, len(X), chunk_rows)]
        futures = client.scatter(pieces)
        wait(futures)
        held = da.concatenate([da.from_delayed(f, p.shape, dtype=p.dtype) for f, p in zip(futures, pieces)])
        fit, _ = dgmm_fit(held, k, kind, init, iters)
    return median_after_first(fit.seconds), fit


def kernel_per_chunk(X, batch, threads, log2_block, n_chunks):
    """Wall seconds per chunk of a pool of ``threads`` threads running the kernel on blocks of 2**log2_block values."""
    copies = [X.copy() for _ in range(threads)]
    saved = chunk.BLOCK_ELEMENTS
    chunk.BLOCK_ELEMENTS = 2**log2_block
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: chunk.e_step_statistics(copies[i % threads], batch), range(threads)))  # warm
            t0 = time.perf_counter()
            list(pool.map(lambda i: chunk.e_step_statistics(copies[i % threads], batch), range(n_chunks)))
            return (time.perf_counter() - t0) / n_chunks
    finally:
        chunk.BLOCK_ELEMENTS = saved


def kernel_part(args):
    """``--kernel``: per configuration, thread count and block size, wall ms per chunk (median of repeats)."""
    from dgmm.estimator import GaussianMixture

    for config in args.configs.split(","):
        kind, d, k, dtype = config.split(":")
        d, k, dtype = int(d), int(k), np.dtype(dtype)
        rows = auto_chunk_rows(10**9, d)
        X = make_data(rows, d, k, seed=3, dtype=dtype)
        init = initial_parameters(X, k, kind, sample=min(20_000, rows))
        gm = GaussianMixture(k, covariance_type=kind, max_iter=0, **init).fit(X[:2000].astype(np.float64))
        batch = (chunk.chunk_params(gm.weights_, gm.means_, gm.precisions_cholesky_, kind, input_dtype=dtype),)
        one_thread: dict[int, float] = {}
        for log2_block in (int(e) for e in args.log2_blocks.split(",")):
            saved = chunk.BLOCK_ELEMENTS
            chunk.BLOCK_ELEMENTS = 2**log2_block
            block_rows = chunk._BatchPlan(batch, d, dtype).rows
            chunk.BLOCK_ELEMENTS = saved
            for threads in (int(t) for t in args.threads.split(",")):
                runs = [kernel_per_chunk(X, batch, threads, log2_block, args.chunks) for _ in range(args.repeats)]
                ms = statistics.median(runs) * 1e3
                if threads == 1:
                    one_thread[log2_block] = ms
                row = dict(part="kernel", kind=kind, n_features=d, n_components=k, dtype=str(dtype), chunk_rows=rows,
                           log2_block=log2_block, block_rows=block_rows, threads=threads,
                           ms_per_chunk=[round(r * 1e3, 2) for r in runs], median_ms_per_chunk=round(ms, 2),
                           load_average=load_average())
                if threads > 1 and log2_block in one_thread:
                    row["thread_scaling"] = round(one_thread[log2_block] / ms, 3)
                emit(row)


def _distances_job(copies, centers, i):
    from dgmm import chunk_kmeans

    return chunk_kmeans.nearest_centers(copies[i % len(copies)], centers)


def distances_part(args):
    """``--distances``: the k-means distance kernel (``chunk_kmeans.nearest_centers``) on pools of threads,
    with its fixed 4,096-row blocks (``DISTANCE_BLOCK_ELEMENTS = 0``) and with dgmm's rule."""
    from dgmm import chunk_kmeans

    rng = np.random.default_rng(0)
    for config in args.distance_configs.split(","):
        d, *sets = (int(v) for v in config.split(":"))
        rows = auto_chunk_rows(10**9, d)
        y = rng.standard_normal((rows, d))
        centers = tuple(rng.standard_normal((m, d)) for m in sets)
        saved = chunk_kmeans.DISTANCE_BLOCK_ELEMENTS
        for rule, elements in (("fixed 4096 rows", 0), ("by elements", saved)):
            chunk_kmeans.DISTANCE_BLOCK_ELEMENTS = elements
            block = chunk_kmeans.distance_block_rows(d, sum(sets))
            for threads in (int(t) for t in args.threads.split(",")):
                copies = [y.copy() for _ in range(threads)]
                runs = []
                job = functools.partial(_distances_job, copies, centers)
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(job, range(threads)))
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        list(pool.map(job, range(args.chunks)))
                        runs.append((time.perf_counter() - t0) / args.chunks)
                emit(dict(part="distances", n_features=d, centers=sets, chunk_rows=rows, rule=rule, block_rows=block,
                          threads=threads, median_ms_per_chunk=round(statistics.median(runs) * 1e3, 3),
                          load_average=load_average()))
        chunk_kmeans.DISTANCE_BLOCK_ELEMENTS = saved


def handoff_part(args):
    """``--handoff``: the GIL's cost alone. Each thread repeats one NumPy call that releases the GIL
    (``np.add(a, 1.0, out=a)`` on ``size`` values) for a second; calls per second in all, per pool size."""
    import threading

    def calls_per_second(threads, size, seconds=1.0):
        counts = [0] * threads
        stop = threading.Event()

        def work(i):
            a = np.zeros(size)
            count = 0
            while not stop.is_set():
                np.add(a, 1.0, out=a)
                count += 1
            counts[i] = count

        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in pool:
            t.join()
        return sum(counts) / seconds

    for size in (1_000, 4_000, 16_000, 64_000, 256_000):
        row = dict(part="handoff", values_per_call=size, load_average=load_average())
        for threads in (int(t) for t in args.threads.split(",")):
            row[f"calls_per_s_{threads}_threads"] = round(statistics.median(
                [calls_per_second(threads, size) for _ in range(args.repeats)]))
        emit(row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=2_000_000)
    parser.add_argument("--n-features", type=int, default=32)
    parser.add_argument("--n-components", type=int, default=16)
    parser.add_argument("--kind", default="full")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default=str(os.cpu_count()), help="dask threads (comma-separated)")
    parser.add_argument("--processes", action="store_true", help="also a LocalCluster of cores/2 processes x 2 threads")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="threads: a dask array of chunks of this many rows (default: the NumPy array, "
                             "which dgmm cuts into its automatic chunks)")
    parser.add_argument("--kernel", action="store_true", help="the kernel alone on a thread pool, per block size")
    parser.add_argument("--configs", default="full:32:16:float32,diag:16:8:float64",
                        help="--kernel: type:d:k:dtype, comma-separated")
    parser.add_argument("--log2-blocks", default="15,17,19,21", help="--kernel: log2 of the block's values")
    parser.add_argument("--chunks", type=int, default=24, help="--kernel, --distances: chunks per measurement")
    parser.add_argument("--distances", action="store_true", help="the k-means distance kernel on a thread pool")
    parser.add_argument("--handoff", action="store_true", help="calls per second of a GIL-releasing NumPy call")
    parser.add_argument("--distance-configs", default="2:3,16:8,32:16,32:64,16:32:32",
                        help="--distances: d:centres[:centres of another set...], comma-separated")
    args = parser.parse_args()
    threadpool_limits(1)  # as dgmm does on the threaded scheduler; worker processes set it themselves
    if args.kernel:
        return kernel_part(args)
    if args.distances:
        return distances_part(args)
    if args.handoff:
        return handoff_part(args)
    n, d, k, kind = args.n_samples, args.n_features, args.n_components, args.kind
    dtype = np.dtype(args.dtype)
    X = make_data(n, d, k, seed=3, dtype=dtype)
    init = initial_parameters(X, k, kind)
    base = dict(n_samples=n, n_features=d, n_components=k, kind=kind, dtype=str(dtype), cpu_count=os.cpu_count())
    thread_counts = [int(t) for t in args.threads.split(",")]
    results: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        order = [(t, s) for t in thread_counts for s in (True, False)]
        if repeat % 2:
            order.reverse()
        for threads, scaled in order:
            label = f"threads={threads} blocks={'scaled' if scaled else 'one-thread'}"
            data = X if args.chunk_rows is None else da.from_array(X, chunks=(args.chunk_rows, d))
            seconds, fit = fit_threads(data, k, kind, init, args.iters, threads, scaled)
            results.setdefault(label, []).append(seconds)
            emit(dict(base, run=label, repeat=repeat, threads=threads, block_scale=chunk.block_scale(threads)
                      if scaled else 1, s_per_iter=seconds, iteration_seconds=fit.seconds,
                      load_average=load_average()))
        if args.processes:
            workers = max(1, (os.cpu_count() or 2) // 2)
            label = f"processes={workers}x2"
            seconds, fit = fit_processes(X, k, kind, init, args.iters, workers, auto_chunk_rows(n, d))
            results.setdefault(label, []).append(seconds)
            emit(dict(base, run=label, repeat=repeat, s_per_iter=seconds, iteration_seconds=fit.seconds,
                      load_average=load_average()))
    for label, runs in results.items():
        emit(dict(base, summary=True, run=label, median_s_per_iter=statistics.median(runs), runs=runs))


if __name__ == "__main__":
    main()
