"""Where the chunk kernel's time goes: a stage-by-stage timing of ``dgmm.chunk.e_step_statistics``.

Runs on ONE thread (BLAS limited to 1 thread, as dgmm's threaded scheduler does) over one chunk of
dgmm's automatic size (8 MiB of float64) with the kernel's own row blocks, and times each stage of
``_e_step_block`` by re-running the same NumPy calls as ``dgmm/chunk.py`` one stage at a time
(the sum of the stages is checked against the real ``e_step_statistics`` on the same chunk):

  center     y = X - center
  gemm       the quadratic form's GEMM (full: y @ [U_1..U_k]; diag: two (n,d)x(d,k) products; ...)
  quad_rest  the rest of the quadratic form (offsets, squares, the per-component reduction)
  log_prob   -0.5 (d log 2 pi + quad) + log det, + log weights
  lse        row-wise log-sum-exp (max, shift, exp, sum, log)
  resp       subtract log norm, exp
  stats_*    statistics from responsibilities. full: shift (y - s_k for every component into a
             (k, n, d) array), sx (batched r^T w), scale (w *= sqrt r), syrk (one per component),
             rest (triangle copies, nk, column sum of y); other types: sx (their small GEMMs), rest
  merge      summing per-block statistics

Each stage is the minimum over repeats (the least disturbed run on a busy machine). Also prints the kernel's achieved GFLOP/s (4 n k d^2 for 'full') and a 1-thread GEMM probe of the
same shape class, so the kernel/GEMM gap is visible. One JSON line per configuration.

    python bench/profile_kernel.py
    python bench/profile_kernel.py --configs full:16:8,full:64:16 --dtype float32
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
from benchutil import emit, initial_parameters, load_average, make_data
from scipy.linalg import blas
from threadpoolctl import threadpool_limits

from dgmm import chunk
from dgmm.estimator import GaussianMixture


def kernel_params(X, k, kind):
    init = initial_parameters(X, k, kind, sample=min(20_000, len(X)))
    gm = GaussianMixture(k, covariance_type=kind, max_iter=1, tol=0, **init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X[:20_000].astype(np.float64))
    params = chunk.chunk_params(gm.weights_, gm.means_, gm.precisions_cholesky_, kind, input_dtype=X.dtype)
    if X.dtype == np.float32 and kind == "full":
        params = chunk.cast_params(params, np.float32)
    return params


def staged_block(X, params, work, t):
    """One row block, the same calls as chunk._e_step_block, timed per stage into dict ``t``."""
    kind = params.covariance_type
    dtype = params.center.dtype
    n, d = X.shape
    k = params.means.shape[0]
    c = time.perf_counter
    s = c()
    y = np.subtract(X, params.center, out=chunk._scratch(work, "y", X.shape, dtype), dtype=dtype)
    t["center"] += c() - s
    means, prec_chol = params.means, params.precisions_cholesky
    with np.errstate(under="ignore", invalid="ignore", over="ignore"):
        s = c()
        if kind == "full":
            stacked = np.ascontiguousarray(prec_chol.transpose(1, 0, 2)).reshape(d, k * d).astype(y.dtype, copy=False)
            offsets = np.einsum("ki,kij->kj", means, prec_chol).reshape(-1).astype(y.dtype, copy=False)
            z = np.matmul(y, stacked, out=chunk._scratch(work, "z", (n, k * d), y.dtype))
            s2 = c()
            t["gemm"] += s2 - s
            z -= offsets
            z *= z
            quad = np.einsum("nkd->nk", z.reshape(n, k, d))
            t["quad_rest"] += c() - s2
        elif kind == "tied":
            yu = y @ prec_chol
            s2 = c()
            t["gemm"] += s2 - s
            z = yu[:, None, :] - (means @ prec_chol)[None, :, :]
            z *= z
            quad = np.einsum("nkd->nk", z)
            t["quad_rest"] += c() - s2
        elif kind == "diag":
            precisions = prec_chol**2
            a = y @ (means * precisions).T
            y2 = y**2
            b = y2 @ precisions.T
            s2 = c()
            t["gemm"] += s2 - s
            quad = np.sum(means**2 * precisions, axis=1) - 2.0 * a + b
            t["quad_rest"] += c() - s2
        else:
            precisions = prec_chol**2
            a = y @ means.T
            s2 = c()
            t["gemm"] += s2 - s
            quad = np.sum(means**2, axis=1) * precisions - 2.0 * a * precisions + np.outer(
                np.einsum("ij,ij->i", y, y), precisions)
            t["quad_rest"] += c() - s2
        s = c()
        log_det = chunk.log_det_cholesky(prec_chol, kind, d)
        weighted = -0.5 * (d * math.log(2 * math.pi) + quad) + log_det.astype(y.dtype, copy=False)
        weighted += params.log_weights
        t["log_prob"] += c() - s
        s = c()
        log_prob_norm = chunk.logsumexp_rows(weighted)
        t["lse"] += c() - s
        s = c()
        weighted -= log_prob_norm[:, None]
        resp = np.exp(weighted, out=weighted)
        log_likelihood = log_prob_norm.astype(np.float64, copy=False).sum()
        t["resp"] += c() - s
        s = c()
        if kind == "full":
            resp_t = resp.T.astype(y.dtype, copy=False)
            w = np.subtract(y[None, :, :], means.astype(y.dtype)[:, None, :],
                            out=chunk._scratch(work, "d", (k,) + y.shape, y.dtype))
            s1 = c()
            t["stats_shift"] += s1 - s
            sx = np.matmul(resp_t[:, None, :], w)[:, 0, :].astype(np.float64)
            s2 = c()
            t["stats_sx"] += s2 - s1
            w *= np.sqrt(resp_t)[:, :, None]
            s1, s2 = s2, c()
            t["stats_scale"] += s2 - s1
            syrk = blas.ssyrk if y.dtype == np.float32 else blas.dsyrk
            uppers = [syrk(1.0, w[j].T, trans=0, lower=0) for j in range(k)]
            s3 = c()
            t["stats_syrk"] += s3 - s2
            sxx = np.empty((k, d, d))
            for j in range(k):
                sxx[j] = np.triu(uppers[j]) + np.triu(uppers[j], 1).T
            t["stats_rest"] += c() - s3
            s = c()
        else:
            sx = resp.T @ y
            if kind == "tied":
                sxx = y.T @ y
            elif kind == "diag":
                sxx = resp.T @ (y * y)
            else:
                sxx = resp.T @ np.einsum("ij,ij->i", y, y)
            s2 = c()
            t["stats_sx"] += s2 - s
            s = s2
        nk = resp.sum(axis=0, dtype=np.float64)
        sy = y.sum(axis=0, dtype=np.float64)
        t["stats_rest"] += c() - s
    return chunk.SufficientStatistics(nk, sx, sxx, sy, n, float(log_likelihood), 0)


def staged_chunk(X, params, t):
    work = chunk._thread_workspace()
    rows = chunk.block_rows(params.means.shape[0], X.shape[1])
    total = None
    for start in range(0, X.shape[0], rows):
        part = staged_block(X[start : start + rows], params, work, t)
        s = time.perf_counter()
        total = part if total is None else chunk.merge_statistics(total, part)
        t["merge"] += time.perf_counter() - s
    return total


def gemm_1t(n, d, k, dtype, repeats=5):
    """1-thread GFLOP/s of the kernel's own E-step GEMM shape: (n, d) @ (d, k d)."""
    a = np.random.default_rng(0).standard_normal((n, d)).astype(dtype)
    b = np.random.default_rng(1).standard_normal((d, k * d)).astype(dtype)
    out = np.empty((n, k * d), dtype)
    best = float("inf")
    for _ in range(repeats):
        s = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - s)
    return 2.0 * n * d * k * d / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="full:16:8,diag:16:8,tied:16:8,spherical:16:8,full:32:16,full:64:16",
                        help="kind:d:k,...")
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    for config in args.configs.split(","):
        kind, d, k = config.split(":")
        d, k = int(d), int(k)
        n = 8 * 2**20 // (8 * d)  # dgmm's automatic chunk for in-memory float64 input
        X = make_data(n, d, k, seed=3).astype(dtype)
        params = kernel_params(X, k, kind)
        with threadpool_limits(limits=1, user_api="blas"):
            chunk.e_step_statistics(X, (params,))  # warm the workspace
            real = []
            for _ in range(args.repeats):
                s = time.perf_counter()
                (ref,) = chunk.e_step_statistics(X, (params,))
                real.append(time.perf_counter() - s)
            stages = []
            for _ in range(args.repeats):
                t = dict.fromkeys(["center", "gemm", "quad_rest", "log_prob", "lse", "resp", "stats_shift",
                                   "stats_sx", "stats_scale", "stats_syrk", "stats_rest", "merge"], 0.0)
                s = time.perf_counter()
                got = staged_chunk(X, params, t)
                t["total"] = time.perf_counter() - s
                stages.append(t)
            gemm = gemm_1t(chunk.block_rows(k, d), d, k, dtype)
        assert np.allclose(got.sxx, ref.sxx, rtol=1e-6 if dtype == np.float64 else 1e-3)
        # Per-stage minimum over repeats: the least disturbed measurement of each stage on a busy machine.
        best = {key: min(t[key] for t in stages) for key in stages[0]}
        best["total"] = sum(v for key, v in best.items() if key != "total")
        real_best = min(real)
        row = dict(kind=kind, n_features=d, n_components=k, dtype=args.dtype, chunk_rows=n,
                   block_rows=chunk.block_rows(k, d), threads=1, e_step_statistics_seconds=round(real_best, 4),
                   rows_per_second_1thread=round(n / real_best),
                   staged_total_seconds=round(best["total"], 4),
                   staged_total_seconds_best_run=round(min(t["total"] for t in stages), 4),
                   stage_fraction={key: round(v / best["total"], 3) for key, v in best.items() if key != "total"},
                   stage_ms={key: round(1000 * v, 2) for key, v in best.items() if key != "total"},
                   kernel_gemm_shape_gflops_1thread=round(gemm, 1), load_average=load_average())
        if kind == "full":
            row["kernel_gflops_1thread"] = round(4.0 * n * k * d * d / real_best / 1e9, 2)
        emit(row)


if __name__ == "__main__":
    main()
