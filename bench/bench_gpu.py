"""Issue 9: one EM iteration of dgmm on CuPy chunks (GPU) against dgmm on the same machine's CPUs and sklearn.

One script, one run on the device machine (see ``bench/gpu_check.sh`` and ``bench/README.md``):

* data: n rows (default 20,000,000), d = 32, k = 16 Gaussian blobs, drawn on the GPU, copied to the host;
  float64 and float32 (the float32 copy of the same values);
* identical initial parameters (k rows as means, the sample covariance, equal weights) for every run;
* **dgmm, GPU, resident**: ``to_gpu(da.from_array(X, chunks)).persist()``: CuPy chunks kept in GPU memory;
* **dgmm, GPU, streamed**: ``to_gpu(da.from_array(X, chunks))``: every pass copies the host chunks to the GPU;
* **dgmm, CPU**: the NumPy array, dgmm's own chunking, dask's threaded scheduler on every core;
* **dgmm, CPU, processes** (part ``cpu-dist``): a ``distributed.LocalCluster`` of ``--workers``
  processes x 2 threads holding the array (persisted in ``--cpu-chunk-rows`` chunks): no shared GIL;
* **GPU, sync** (part ``gpu-sync``): the resident GPU fit on dask's single-threaded scheduler;
* **sklearn**: ``_e_step`` + ``_m_step`` (one EM iteration, exactly sklearn's loop body) on a
  subsample of ``--sklearn-rows`` rows, scaled linearly to n;
* GEMM peak of the GPU (square ``cupy.matmul``, float32 and float64) in the same script: the
  achieved fraction = FLOPs of the E-step's GEMMs per iteration / seconds per iteration / peak.

dgmm's seconds per iteration come from its per-iteration callbacks: the first iteration is dropped
(GPU kernel compilation, cuBLAS handles) and the median of the rest taken. ``tol=0`` so every
iteration runs. The GPU and CPU fits of the same number of iterations are compared (max relative
difference of means_ and covariances_). Without CuPy (``--numpy``) every "GPU" run uses NumPy:
a check of the script itself on small sizes, not a measurement.

    python bench/bench_gpu.py --out results.json
    python bench/bench_gpu.py --numpy --n-samples 200000 --cpu-iters 3 --gpu-iters 3   # script check, no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import dask
import dask.array as da
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dgmm
from dgmm import GaussianMixture


def log(*args):
    print(*args, flush=True)


def gemm_peak(xp, dtype, n=8192, repeats=10):
    """Median TFLOP/s of an n x n x n matmul (CUDA events)."""
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype=dtype)
    b = xp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype=dtype)
    if xp is np:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return 2 * n**3 / min(times) / 1e12
    for _ in range(3):
        a @ b
    xp.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, stop = xp.cuda.Event(), xp.cuda.Event()
        start.record()
        a @ b
        stop.record()
        stop.synchronize()
        times.append(xp.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def make_data(xp, n, d, k, seed=0):
    """k well-separated anisotropic blobs (n, d) float64, drawn with ``xp`` (on the GPU for CuPy)."""
    rs = xp.random.RandomState(seed)
    centers = rs.standard_normal((k, d)) * 6.0
    scales = rs.uniform(0.5, 2.0, (k, d))
    labels = rs.randint(0, k, n)
    X = rs.standard_normal((n, d))
    X *= scales[labels]
    X += centers[labels]
    return X


def initial_parameters(X_host, k, seed=0):
    rng = np.random.default_rng(seed)
    sample = X_host[rng.choice(len(X_host), 100_000, replace=False)].astype(np.float64)
    means = sample[rng.choice(len(sample), k, replace=False)]
    cov = np.cov(sample.T) + 1e-3 * np.eye(X_host.shape[1])
    precisions = np.stack([np.linalg.inv(cov)] * k)
    return dict(weights_init=np.full(k, 1.0 / k), means_init=means, precisions_init=precisions)


def timed_fit(X, k, init, iters):
    """(seconds per iteration after the first, all iteration seconds, model)."""
    seconds = []
    model = GaussianMixture(k, covariance_type="full", max_iter=iters, tol=0.0,
                            callbacks=lambda i: seconds.append(i.seconds), **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0], seconds, model


def sklearn_iteration(X, k, init, repeats):
    """Seconds of one sklearn EM iteration (_e_step + _m_step) on X, median of ``repeats``."""
    sk = SkGaussianMixture(k, covariance_type="full", init_params="random_from_data", **init)
    sk._initialize_parameters(X, np.random.RandomState(0))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, log_resp = sk._e_step(X)
        sk._m_step(X, log_resp)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-samples", type=int, default=20_000_000)
    parser.add_argument("--n-features", type=int, default=32)
    parser.add_argument("--n-components", type=int, default=16)
    parser.add_argument("--chunk-rows", type=int, default=2_000_000, help="rows per GPU chunk")
    parser.add_argument("--gpu-iters", type=int, default=6)
    parser.add_argument("--cpu-iters", type=int, default=3)
    parser.add_argument("--sklearn-rows", type=int, default=1_000_000)
    parser.add_argument("--sklearn-repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--parts", default="gemm,gpu,cpu,sklearn")
    parser.add_argument("--workers", type=int, default=None, help="cpu-dist: worker processes (default cores / 2)")
    parser.add_argument("--cpu-chunk-rows", type=int, default=250_000, help="cpu-dist: rows per chunk")
    parser.add_argument("--numpy", action="store_true", help="no GPU: run the 'GPU' parts with NumPy (script check)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if args.numpy:
        xp = np

        def to_device(X):
            return X
    else:
        import cupy as xp

        to_device = dgmm.to_gpu
    n, d, k = args.n_samples, args.n_features, args.n_components
    result = {
        "n_samples": n, "n_features": d, "n_components": k, "chunk_rows": args.chunk_rows,
        "python": platform.python_version(), "numpy": np.__version__, "dask": dask.__version__,
        "dgmm": dgmm.__version__, "cpu_count": os.cpu_count(), "library": xp.__name__,
    }
    if xp is not np:
        props = xp.cuda.runtime.getDeviceProperties(0)
        result["device"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        result["cupy"] = xp.__version__
    import sklearn

    result["sklearn"] = sklearn.__version__
    log(json.dumps(result))
    flops = 2 * n * k * d * (d + 1) + 2 * n * k * d * d + 2 * n * k * (d + 1)  # z, Σ r z zᵀ, Σ r [1, y]
    result["gemm_flops_per_iteration"] = flops
    if "gemm" in parts:
        for name in ("float32", "float64"):
            result[f"gemm_peak_tflops_{name}"] = gemm_peak(xp, np.dtype(name))
            log(f"GEMM peak {name}: {result[f'gemm_peak_tflops_{name}']:.1f} TFLOP/s")

    t0 = time.perf_counter()
    X_dev64 = make_data(xp, n, d, k)
    X64 = X_dev64 if xp is np else X_dev64.get()
    del X_dev64
    log(f"data: {n} x {d} float64 drawn in {time.perf_counter() - t0:.1f} s")
    init = initial_parameters(X64, k)
    for name in args.dtypes.split(","):
        dtype = np.dtype(name)
        X = X64 if dtype == np.float64 else X64.astype(dtype)
        row = result.setdefault(name, {})
        if "gpu" in parts:
            host = da.from_array(X, chunks=(args.chunk_rows, d))
            resident = to_device(host).persist()
            row["gpu_resident_s"], row["gpu_resident_iters"], _ = timed_fit(resident, k, init, args.gpu_iters)
            log(f"{name} GPU resident: {row['gpu_resident_s']:.4f} s/iter {row['gpu_resident_iters']}")
            _, _, gpu_same = timed_fit(resident, k, init, args.cpu_iters)
            if "gpu-sync" in parts:
                with dask.config.set(scheduler="sync"):
                    row["gpu_resident_sync_s"], row["gpu_resident_sync_iters"], _ = timed_fit(
                        resident, k, init, args.gpu_iters)
                log(f"{name} GPU resident, sync scheduler: {row['gpu_resident_sync_s']:.4f} s/iter")
            del resident
            row["gpu_streamed_s"], row["gpu_streamed_iters"], _ = timed_fit(to_device(host), k, init, args.gpu_iters)
            log(f"{name} GPU streamed from host memory: {row['gpu_streamed_s']:.4f} s/iter {row['gpu_streamed_iters']}")
            if xp is not np:
                xp.get_default_memory_pool().free_all_blocks()
        if "cpu" in parts:
            row["cpu_s"], row["cpu_iters"], cpu_model = timed_fit(X, k, init, args.cpu_iters)
            log(f"{name} CPU dgmm ({os.cpu_count()} cores): {row['cpu_s']:.3f} s/iter {row['cpu_iters']}")
        if "cpu-dist" in parts:
            from distributed import Client, LocalCluster, wait

            workers = args.workers or max(1, (os.cpu_count() or 2) // 2)
            with LocalCluster(n_workers=workers, threads_per_worker=2, dashboard_address=None,
                              memory_limit=None) as cluster, Client(cluster) as client:
                pieces = [X[i : i + args.cpu_chunk_rows] for i in range(0, n, args.cpu_chunk_rows)]
                futures = client.scatter(pieces)
                wait(futures)
                held = da.concatenate([da.from_delayed(f, p.shape, dtype=p.dtype) for f, p in zip(futures, pieces)])
                row["cpu_dist_s"], row["cpu_dist_iters"], cpu_dist_model = timed_fit(held, k, init, args.cpu_iters)
                row["cpu_dist_workers"] = f"{workers} processes x 2 threads"
                del held, futures
            log(f"{name} CPU dgmm, LocalCluster {row['cpu_dist_workers']}: {row['cpu_dist_s']:.3f} s/iter "
                f"{row['cpu_dist_iters']}")
            if "gpu" in parts:
                row["speedup_resident_vs_cpu_dist"] = row["cpu_dist_s"] / row["gpu_resident_s"]
                row["gpu_vs_cpu_dist_max_rel_diff"] = {
                    attr: max_rel(getattr(gpu_same, attr), getattr(cpu_dist_model, attr))
                    for attr in ("weights_", "means_", "covariances_")
                }
                log(f"{name} GPU resident vs CPU processes: {row['speedup_resident_vs_cpu_dist']:.1f}x; "
                    f"max rel diff {row['gpu_vs_cpu_dist_max_rel_diff']}")
        if "gpu" in parts and "cpu" in parts:
            row["gpu_vs_cpu_max_rel_diff"] = {
                attr: max_rel(getattr(gpu_same, attr), getattr(cpu_model, attr))
                for attr in ("weights_", "means_", "covariances_")
            }
            row["gpu_vs_cpu_lower_bound_rel_diff"] = abs(gpu_same.lower_bound_ - cpu_model.lower_bound_) / abs(
                cpu_model.lower_bound_)
            row["speedup_resident_vs_cpu"] = row["cpu_s"] / row["gpu_resident_s"]
            row["speedup_streamed_vs_cpu"] = row["cpu_s"] / row["gpu_streamed_s"]
            log(f"{name} GPU vs CPU after {args.cpu_iters} iterations: {row['gpu_vs_cpu_max_rel_diff']}")
        if "sklearn" in parts:
            rows = min(args.sklearn_rows, n)
            sub = X[np.random.default_rng(1).choice(n, rows, replace=False)]
            seconds, times = sklearn_iteration(sub, k, init, args.sklearn_repeats)
            row["sklearn_sub_s"], row["sklearn_sub_times"], row["sklearn_rows"] = seconds, times, rows
            row["sklearn_scaled_s"] = seconds * n / rows
            log(f"{name} sklearn: {seconds:.3f} s per iteration on {rows} rows -> {row['sklearn_scaled_s']:.2f} s at n")
        if "gpu" in parts:
            peak = result.get(f"gemm_peak_tflops_{name}")
            row["achieved_tflops_resident"] = flops / row["gpu_resident_s"] / 1e12
            if peak:
                row["fraction_of_gemm_peak_resident"] = row["achieved_tflops_resident"] / peak
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    log("\n| dtype | GPU resident s/iter | GPU streamed s/iter | CPU dgmm s/iter | sklearn s/iter (scaled) "
        "| CPU/GPU resident | CPU/GPU streamed | sklearn/GPU | TFLOP/s | of GEMM peak |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        row = result.get(name, {})

        def fmt(key, spec=".4f", row=row):
            return format(row[key], spec) if key in row else "-"

        sk_ratio = (f"{row['sklearn_scaled_s'] / row['gpu_resident_s']:.1f}x"
                    if "sklearn_scaled_s" in row and "gpu_resident_s" in row else "-")
        log(f"| {name} | {fmt('gpu_resident_s')} | {fmt('gpu_streamed_s')} | {fmt('cpu_s', '.3f')} "
            f"| {fmt('sklearn_scaled_s', '.2f')} | {fmt('speedup_resident_vs_cpu', '.1f')}x "
            f"| {fmt('speedup_streamed_vs_cpu', '.1f')}x | {sk_ratio} | {fmt('achieved_tflops_resident', '.1f')} "
            f"| {fmt('fraction_of_gemm_peak_resident', '.3f')} |")
    for key in ("gemm_peak_tflops_float32", "gemm_peak_tflops_float64"):
        if key in result:
            log(f"{key}: {result[key]:.1f}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
