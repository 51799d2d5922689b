"""NumPy input fitted under a distributed client: seconds per EM iteration (issue 6, session 10).

``da.from_array`` of an in-memory array embeds the chunks in the graph, so before commit 64c5c4d
every pass sent the whole array to the scheduler again; dgmm now persists it on the workers once per
fit. Run from a checkout (the JSON line records the commit); compare two checkouts by putting the
other first on ``PYTHONPATH``:

    python bench/bench_numpy_client.py --repeats 3
    PYTHONPATH=/path/to/old/checkout python bench/bench_numpy_client.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=1_000_000)
    parser.add_argument("--n-features", type=int, default=16)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    from distributed import Client, LocalCluster

    import dgmm
    from dgmm import GaussianMixture

    root = os.path.dirname(os.path.dirname(os.path.abspath(dgmm.__file__)))
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.n_samples, args.n_features))
    X[: args.n_samples // 2] += 3.0
    per_iteration = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, Client(cluster):
            for _ in range(args.repeats):
                times = []
                last = [time.perf_counter()]

                def tick(info, times=times, last=last):
                    now = time.perf_counter()
                    times.append(now - last[0])
                    last[0] = now

                last[0] = time.perf_counter()
                GaussianMixture(4, covariance_type="diag", init_params="random", random_state=0, tol=0,
                                max_iter=args.iters, callbacks=tick).fit(X)
                per_iteration.append(statistics.median(times[1:]))
    print(json.dumps({"bench": "numpy_client", "dgmm": root, "commit": commit, "n_samples": args.n_samples,
                      "n_features": args.n_features, "mib": round(X.nbytes / 2**20, 1),
                      "seconds_per_iteration": [round(t, 3) for t in per_iteration],
                      "median": round(statistics.median(per_iteration), 3), "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
