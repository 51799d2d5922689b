#!/usr/bin/env python
"""A fit that outlives its Slurm worker jobs' walltime, through the Python API.

Needs the single-node Slurm of ``scripts/slurm_setup.sh start`` and dask-jobqueue. It
fits a Zarr array on a ``SLURMCluster`` whose jobs have a short ``--walltime`` (default
one minute) and which adapts between ``--jobs`` and ``--jobs`` jobs: when Slurm ends a
job at its time limit, the adaptive cluster submits a replacement, the scheduler
recomputes what the lost worker held (the chunk statistics and the iteration's
parameter key, from their lineage in the graph) and the fit goes on in the same
process, without ``--resume``. It prints one line per EM iteration with the Slurm job
ids that ran it and, at the end, compares the model with an uninterrupted fit in this
process (threaded scheduler).

This is what ``dgmm fit`` would do if its jobqueue cluster adapted instead of calling
``cluster.scale(jobs=N)`` once (``dgmm/cli.py``); ``dgmm fit --resume`` is the path for
the CLI today (``tests/test_slurm.py``).

    sudo scripts/slurm_setup.sh start
    python scripts/slurm_walltime_demo.py --walltime 00:01:00 | tee docs/slurm-walltime-run.txt
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %j %M %l %T"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "dask-worker" in line]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--walltime", default="00:01:00", help="of each worker job (Slurm counts whole minutes)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--n-samples", type=int, default=60_000)
    parser.add_argument("--n-features", type=int, default=8)
    parser.add_argument("--n-components", type=int, default=8)
    parser.add_argument("--chunk-rows", type=int, default=5_000)
    parser.add_argument("--max-iter", type=int, default=400)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    import dask
    import dask.array as da
    import zarr
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from dgmm import GaussianMixture

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dgmm-slurm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=4.0, size=(args.n_components, args.n_features))
    X = centers[rng.integers(0, args.n_components, args.n_samples)] + rng.normal(size=(args.n_samples, args.n_features))
    path = workdir / "x.zarr"
    zarr.open_array(str(path), mode="w", shape=X.shape, chunks=(args.chunk_rows, args.n_features), dtype="f8")[:] = X
    model = dict(n_components=args.n_components, covariance_type="full", random_state=0, tol=0.0,
                 max_iter=args.max_iter)
    print(f"data: {path} ({args.n_samples:,} x {args.n_features}, {-(-args.n_samples // args.chunk_rows)} chunks); "
          f"model: {model}", flush=True)

    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        reference = GaussianMixture(**model).fit(da.from_zarr(str(path)))
    print(f"reference: uninterrupted threaded fit in this process, {time.perf_counter() - t0:.1f} s", flush=True)

    cluster = SLURMCluster(cores=1, processes=1, memory="2GB", queue="debug", walltime=args.walltime,
                           log_directory=str(workdir / "logs"), local_directory=str(workdir / "space"),
                           silence_logs="error")
    cluster.adapt(minimum_jobs=args.jobs, maximum_jobs=args.jobs)
    print(f"SLURMCluster: walltime {args.walltime}, adapt(minimum_jobs={args.jobs}, maximum_jobs={args.jobs})")
    print("job script:\n  " + "\n  ".join(cluster.job_script().splitlines()), flush=True)
    seen_jobs: list[str] = []

    def on_iteration(info):
        jobs = _jobs()
        for line in jobs:
            job = line.split()[0]
            if job not in seen_jobs:
                seen_jobs.append(job)
                print(f"  new Slurm job {line}", flush=True)
        if info.n_iter % 25 == 0 or info.n_iter == 1:
            print(f"iteration {info.n_iter:4d}  lower bound {info.lower_bound:.8f}  {info.seconds:.2f} s  "
                  f"jobs now: {[j.split()[0] for j in jobs]}  workers: {len(client.nthreads())}", flush=True)
        elif info.seconds > 2:
            print(f"iteration {info.n_iter:4d}  took {info.seconds:.1f} s (a worker was lost and replaced)",
                  flush=True)

    with cluster, Client(cluster) as client:
        client.wait_for_workers(1, timeout=120)
        t0 = time.perf_counter()
        fitted = GaussianMixture(**model, callbacks=[on_iteration]).fit(da.from_zarr(str(path)))
        seconds = time.perf_counter() - t0
    print(f"fit on Slurm: {fitted.n_iter_} iterations in {seconds:.1f} s on {len(seen_jobs)} Slurm jobs "
          f"({', '.join(seen_jobs)})")
    worst = 0.0
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        a, b = getattr(fitted, name), getattr(reference, name)
        worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))))
    equal = worst <= 1e-10
    print(f"vs the uninterrupted fit: max relative difference {worst:.2e} "
          f"({'equal at rtol 1e-10' if equal else 'DIFFERENT'})")
    return 0 if equal and len(seen_jobs) > args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
