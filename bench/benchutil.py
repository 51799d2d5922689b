"""Helpers shared by the issue-6 benchmark scripts (bench_perf.py, bench_spark.py, bench_io.py).

Machine description, load average, GEMM probes, identical initial parameters and per-iteration
timers for dgmm and sklearn. Not part of the dgmm package.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_info, threadpool_limits

import dgmm


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other work on the shared machine slows every timing)."""
    return [round(x, 2) for x in os.getloadavg()]


def git_revision() -> str | None:
    """Short commit of the dgmm checkout, with '+dirty' when dgmm/ has local changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(dgmm.__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "dgmm"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    """What the numbers were measured on."""
    import dask
    import psutil
    import sklearn
    import zarr

    blas = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} threads={i.get('num_threads')}"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return dict(
        cpu=cpu_model(),
        cpus=os.cpu_count(),
        memory_gib=round(psutil.virtual_memory().total / 2**30, 1),
        python=platform.python_version(),
        numpy=np.__version__,
        sklearn=sklearn.__version__,
        dask=dask.__version__,
        zarr=zarr.__version__,
        blas=blas,
        dgmm=dgmm.__version__,
        dgmm_commit=git_revision(),
    )


def emit(row: dict) -> None:
    """Print one JSON line (flushed, so a long run can be watched)."""
    import json

    print(json.dumps(row), flush=True)


def gemm_gflops(n: int, dtype, threads: int, repeats: int = 2, seed: int = 0) -> float:
    """Best GFLOP/s of ``repeats`` square (n x n) @ (n x n) products with ``threads`` BLAS threads."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype=dtype)
    best = float("inf")
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a[:256, :256], b[:256, :256])  # wake the threads
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def make_data(n: int, d: int, k: int, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """n rows of a k-blob mixture in d dimensions (means uniform in [-5, 5], unit noise)."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(-5, 5, size=(k, d))
    labels = rng.integers(0, k, size=n)
    X = rng.standard_normal((n, d))
    X += means[labels]
    return X.astype(dtype, copy=False)


def initial_parameters(X: np.ndarray, k: int, kind: str, seed: int = 0, sample: int = 20_000) -> dict:
    """Identical starting point for every library: sklearn's own init + 1 iteration on a subsample."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    sub = np.asarray(X[np.sort(np.random.default_rng(seed).choice(len(X), sample, replace=False))], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gm = SkGaussianMixture(k, covariance_type=kind, max_iter=1, random_state=seed).fit(sub)
    return dict(weights_init=gm.weights_, means_init=gm.means_, precisions_init=gm.precisions_)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_seconds(include_self: bool = True) -> float:
    """User + system CPU seconds of this process's live children (Spark's JVM, LocalCluster
    workers), all threads, plus this process's own unless ``include_self`` is False."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in ([me] if include_self else []) + me.children(recursive=True):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class Fit:
    """Timings of one fit: wall seconds of the whole fit and of each EM iteration, and CPU seconds of
    iterations 2.. (process user+system time between consecutive iteration ends: load-independent
    except for contention effects)."""

    def __init__(self):
        self.total = 0.0
        self.seconds: list[float] = []
        self._cpu_marks: list[float] = []

    def mark(self, seconds: float) -> None:
        self.seconds.append(seconds)
        self._cpu_marks.append(cpu_seconds())

    @property
    def cpu_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self._cpu_marks, self._cpu_marks[1:])]


def dgmm_fit(X, k: int, kind: str, init: dict | None, iters: int, **extra):
    """Fit dgmm with tol=0 for ``iters`` iterations; returns (Fit timings, estimator)."""
    fit = Fit()
    gm = dgmm.GaussianMixture(k, covariance_type=kind, tol=0.0, max_iter=iters,
                              callbacks=lambda info: fit.mark(info.seconds), **(init or {}), **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        gm.fit(X)
        fit.total = time.perf_counter() - t0
    return fit, gm


_LAPSE = re.compile(r"Iteration (\d+)\s+time lapse ([0-9.]+)s")


class _VerboseTimer(io.StringIO):
    """stdout while sklearn fits: records each 'time lapse' line sklearn prints, and the CPU time then."""

    def __init__(self, fit: Fit):
        super().__init__()
        self.fit = fit

    def write(self, text):
        match = _LAPSE.search(text)
        if match:
            self.fit.mark(float(match.group(2)))
        return super().write(text)


def sklearn_fit(X, k: int, kind: str, init: dict, iters: int):
    """Fit sklearn with tol=0 for ``iters`` iterations from ``init``; returns (Fit timings, estimator).

    Per-iteration seconds come from sklearn's own ``verbose=2`` timer (E-step + M-step + lower bound
    of each iteration); iteration 1 also contains the initialisation, so callers drop it. The
    initialisation is 'random_from_data' (cheap): with 'kmeans' sklearn would run KMeans on all rows
    even though weights, means and precisions are given.
    """
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    gm = SkGaussianMixture(k, covariance_type=kind, tol=0.0, max_iter=iters, init_params="random_from_data",
                           random_state=0, verbose=2, verbose_interval=1, **init)
    fit = Fit()
    buffer = _VerboseTimer(fit)
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
        warnings.simplefilter("ignore", ConvergenceWarning)
        t0 = time.perf_counter()
        gm.fit(X)
        fit.total = time.perf_counter() - t0
    assert len(fit.seconds) == iters, buffer.getvalue()
    return fit, gm


def median_after_first(seconds: list[float]) -> float:
    """Median of the per-iteration seconds without the first iteration (warm-up / init)."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def median_or_nan(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def netns_cluster_module():
    """``scripts/netns_cluster.py`` as a module (the network-namespace cluster of the bench scripts)."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("netns_cluster", root / "scripts" / "netns_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("netns_cluster", module)
    spec.loader.exec_module(module)
    return module
