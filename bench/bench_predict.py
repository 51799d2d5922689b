"""Writing predictions: labels alone against labels + probabilities + log-likelihood.

    python bench/bench_predict.py [--rows 400000] [--repeats 5]

A 'full' model (k = 8) is applied to a persisted dask array of ``--rows`` x 16
float64 rows in 20,000-row chunks, and ``dgmm.io.write_predictions`` writes a
Zarr group: labels only, then all three outputs. Each chunk's E-step runs once
for all the outputs asked for (``graph.predictions``), so the three outputs
should cost about what the labels alone do; they cost three E-steps before.
Prints the median wall and CPU seconds of ``--repeats`` runs of each, and the
ratio all-three / labels-only (threaded scheduler, this machine's cores).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import dask
import dask.array as da
import numpy as np

from dgmm import GaussianMixture
from dgmm.io import write_predictions


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    X = da.from_array(rng.normal(size=(args.rows, 16)) + rng.integers(0, 8, args.rows)[:, None] * 3.0,
                      chunks=(20_000, 16)).persist()
    model = GaussianMixture(8, random_state=0, max_iter=5).fit(X[:50_000].compute())
    out = tempfile.mkdtemp()
    results = {}
    with dask.config.set(scheduler="threads"):
        for name, outputs in (("labels", {}), ("all three", {"probabilities": True, "log_likelihood": True})):
            runs = []
            for i in range(args.repeats):
                path = f"{out}/{name.replace(' ', '-')}-{i}.zarr"
                runs.append(timed(lambda: write_predictions(model, X, path, format="zarr", **outputs)))
                shutil.rmtree(path)
            results[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
    shutil.rmtree(out, ignore_errors=True)
    print("| outputs | wall s (median) | CPU s (median) |")
    print("|---|---|---|")
    for name, (wall, cpu) in results.items():
        print(f"| {name} | {wall:.3f} | {cpu:.3f} |")
    print(f"all three / labels: wall {results['all three'][0] / results['labels'][0]:.2f}, "
          f"CPU {results['all three'][1] / results['labels'][1]:.2f}")


if __name__ == "__main__":
    main()
