"""Peak memory of an out-of-core fit: a Zarr array of at least 2 GB on the threaded scheduler.

Writes the array if it is missing (in a separate process, so the writer's
memory does not count), then fits ``GaussianMixture(n_components=8,
max_iter=5, tol=0, random_state=0)`` on ``dask.array.from_zarr(path)`` while
a background thread samples the resident set of the whole process tree with
psutil. Prints one JSON line: data size, seconds per EM iteration, peak RSS
(sampled, and the kernel's exact high-water mark from getrusage) and versions.

    python bench/fit_zarr_rss.py --path data/bench_2gb.zarr --covariance-type full
    python bench/fit_zarr_rss.py --path data/bench_8gb.zarr --n-samples 64000000 --init-params random --max-iter 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings

import dask
import dask.array as da
import numpy as np
import psutil
import zarr
from dask.callbacks import Callback

import dgmm
from dgmm import GaussianMixture

from benchutil import git_revision  # bench/ is on sys.path when a script there runs

MIB = 2**20


def bytes_on_disk(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files)


def ensure_data(path: str, n_samples: int, n_features: int, chunk_rows: int, compressor: str = "zstd") -> None:
    """Write the blobs array at ``path`` unless it is there, in a child process."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    code = (
        "import sys; from dgmm.datasets import write_blobs_zarr; "
        "write_blobs_zarr(sys.argv[1], int(sys.argv[2]), n_features=int(sys.argv[3]), n_components=8, "
        "chunk_rows=int(sys.argv[4]), seed=0, compressor=sys.argv[5])"
    )
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code, path, str(n_samples), str(n_features), str(chunk_rows), compressor], check=True
    )
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


class TreeRSSSampler(threading.Thread):
    """Samples the summed RSS of this process and all its descendants every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval = interval
        self.root = psutil.Process()
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def tree_rss(self) -> int:
        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.tree_rss())
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, self.tree_rss())


class ComputeTimes(Callback):
    """Wall time of every ``dask.compute`` on a local scheduler (a dask callback, not dgmm internals).

    dgmm makes one compute per EM iteration, after its initialisation computes,
    so the last ``n_iter_`` durations are the EM iterations.
    """

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._starts: list[tuple[float, float]] = []

    @staticmethod
    def _cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def _start(self, dsk):
        self._starts.append((time.perf_counter(), self._cpu()))

    def _finish(self, dsk, state, errored):
        wall, cpu = self._starts.pop()
        self.seconds.append(time.perf_counter() - wall)
        self.cpu_seconds.append(self._cpu() - cpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="data/bench_2gb.zarr")
    parser.add_argument("--n-samples", type=int, default=16_500_000)
    parser.add_argument("--n-features", type=int, default=16)
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    parser.add_argument("--n-components", type=int, default=8)
    parser.add_argument(
        "--compressor", default="zstd", help="codec of a newly written array (write_blobs_zarr's compressor=)"
    )
    parser.add_argument("--covariance-type", default="full", choices=["full", "tied", "diag", "spherical"])
    parser.add_argument("--max-iter", type=int, default=5)
    parser.add_argument("--init-params", default="kmeans",
                        help="'random' (one cheap pass) keeps the initialisation from dominating large runs")
    args = parser.parse_args()

    ensure_data(args.path, args.n_samples, args.n_features, args.chunk_rows, args.compressor)

    X = da.from_zarr(args.path)
    times = ComputeTimes()

    sampler = TreeRSSSampler()
    rss_before_fit = sampler.tree_rss()
    gm = GaussianMixture(
        n_components=args.n_components,
        covariance_type=args.covariance_type,
        max_iter=args.max_iter,
        tol=0,
        init_params=args.init_params,
        random_state=0,
    )
    load_before = [round(x, 2) for x in os.getloadavg()]
    sampler.start()
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"), times, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0 never converges: ConvergenceWarning by design
        gm.fit(X)
    fit_seconds = time.perf_counter() - t0
    peak_rss = sampler.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    iteration_seconds = times.seconds[-gm.n_iter_ :]
    iteration_cpu_seconds = times.cpu_seconds[-gm.n_iter_ :]
    row = dict(
        n_samples=int(X.shape[0]),
        n_features=int(X.shape[1]),
        n_components=args.n_components,
        covariance_type=args.covariance_type,
        chunk_rows=int(X.chunks[0][0]),
        n_chunks=int(X.numblocks[0]),
        bytes_in_memory=int(X.nbytes),
        bytes_on_disk=bytes_on_disk(args.path),
        n_iter=int(gm.n_iter_),
        n_passes=int(gm.n_passes_),
        fit_seconds=round(fit_seconds, 2),
        n_computes=len(times.seconds),
        seconds_per_iteration=round(statistics.median(iteration_seconds), 2),
        iteration_seconds=[round(t, 2) for t in iteration_seconds],
        init_seconds=round(fit_seconds - sum(iteration_seconds), 2),
        init_params=args.init_params,
        cpu_seconds_per_iteration=round(statistics.median(iteration_cpu_seconds), 2),
        iteration_cpu_seconds=[round(t, 2) for t in iteration_cpu_seconds],
        rss_before_fit_mb=round(rss_before_fit / MIB, 1),
        peak_rss_mb=round(peak_rss / MIB, 1),
        ru_maxrss_mb=round(maxrss / MIB, 1),
        rss_samples=sampler.samples,
        lower_bound=float(gm.lower_bound_),
        scheduler="threads",
        cpus=os.cpu_count(),
        load_average_1min=round(os.getloadavg()[0], 2),  # other work on the machine slows the timings
        load_average_before=load_before,
        load_average_after=[round(x, 2) for x in os.getloadavg()],
        total_memory_mb=round(psutil.virtual_memory().total / MIB),
        python=platform.python_version(),
        dgmm=dgmm.__version__,
        dgmm_commit=git_revision(),
        dask=dask.__version__,
        zarr=zarr.__version__,
        numpy=np.__version__,
    )
    print(json.dumps(row))


if __name__ == "__main__":
    main()
