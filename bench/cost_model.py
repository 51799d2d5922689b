#!/usr/bin/env python
"""The per-iteration cost model of docs/scaling.md as a calculator.

Terms of one EM iteration (full covariances; every chunk read once):

- compute per worker  = rows / (workers · threads · kernel rows/s per thread), the kernel
  rate scaled from its measurement at (d, k) = (64, 32) by the FLOPs per row 3·d²·k;
- read per worker     = bytes / workers / min(storage bandwidth per node, threads · decode rate);
- scheduler           = tasks · per-task overhead (tasks = 2 per chunk + combines + 1);
- network per worker  = (statistics of every chunk crossing workers, at most n_chunks · S,
  + the parameters P once per worker) / workers / NIC bandwidth;
- latency             = (a + b · tree depth + q · chunks per worker thread) round trips,
  with a, b, q fitted to the delay-proxy runs of scripts/netns_cluster.py (q = 0 when the
  scheduler does not queue root tasks, worker-saturation inf).

Iteration time ≈ max(compute, read, scheduler, network) + latency. The constants default
to the values measured on this project's 2-core VM (bench/cost_constants.py); ``--τ`` etc.
override them.

    python bench/cost_model.py                    # 1 TB float32, d=64, k=32, 100 workers
    python bench/cost_model.py --bytes 2.9e5 --d 3 --k 3 --workers 2 --threads 1 --chunk-bytes 72000
"""

from __future__ import annotations

import argparse
import json
import math

#: Measured here (bench/cost_constants.py, 2-core AMD EPYC VM under gVisor, load 6-8).
MEASURED = {
    "kernel_rows_per_second": 116_000.0,  # one thread, d=64, k=32, full, float32 input (shared-product kernel)
    "kernel_d": 64,
    "kernel_k": 32,
    "decode_bytes_per_second": 0.98e9,  # Zarr zstd float32 read, one thread, warm page cache
    "task_overhead_seconds": 3.7e-3,  # LocalCluster, no-op and tiny-chunk dgmm graphs alike
    "rtt_seconds": 22.5e-6,  # 64-byte TCP ping-pong between two network namespaces (veth + bridge)
    "nic_bytes_per_second": 0.76e9,  # one TCP stream between two namespaces
    "latency_a": 6.1,  # round trips per iteration, fitted to the delay-proxy runs
    "latency_b": 3.3,  # per level of the reduction tree
    "latency_q": 1.06,  # per chunk per single-threaded worker, with root-task queuing (default)
}


def predict(n_bytes, d, k, workers, threads, chunk_bytes, itemsize=4, split_every=8, storage_bytes_per_second=2e9,
            queuing=True, **constants) -> dict:
    c = {**MEASURED, **{key: v for key, v in constants.items() if v is not None}}
    rows = n_bytes / (d * itemsize)
    chunk_rows = chunk_bytes / (d * itemsize)
    n_chunks = math.ceil(rows / chunk_rows)
    tasks = 2 * n_chunks + math.ceil((n_chunks - 1) / (split_every - 1)) + 1
    depth = max(1, math.ceil(math.log(n_chunks, split_every))) if n_chunks > 1 else 0
    rate = c["kernel_rows_per_second"] * (3 * c["kernel_d"] ** 2 * c["kernel_k"]) / (3 * d * d * k)
    statistics_bytes = 8 * (k * d * d + k * d + k + 3)
    parameter_bytes = 8 * (k * d * d + k * d + k + d)
    compute = rows / (workers * threads * rate)
    read = n_bytes / workers / min(storage_bytes_per_second, threads * c["decode_bytes_per_second"])
    scheduler = tasks * c["task_overhead_seconds"]
    network_bytes = (n_chunks * statistics_bytes + workers * parameter_bytes) / workers if workers > 1 else 0.0
    network = network_bytes / c["nic_bytes_per_second"]
    queue = c["latency_q"] * n_chunks / (workers * threads) if queuing else 0.0
    round_trips = c["latency_a"] + c["latency_b"] * depth + queue
    latency = round_trips * c["rtt_seconds"]
    terms = {"compute": compute, "read": read, "scheduler": scheduler, "network": network}
    bottleneck = max(terms, key=terms.get)
    return {
        "rows": rows, "chunk_rows": chunk_rows, "n_chunks": n_chunks, "tasks": tasks, "tree_depth": depth,
        "kernel_rows_per_second_per_thread": rate, "flops_per_chunk": 3 * d * d * k * chunk_rows,
        "bytes_read_per_worker": n_bytes / workers, "statistics_bytes": statistics_bytes,
        "parameter_bytes": parameter_bytes, "network_bytes_per_worker_at_most": network_bytes,
        "round_trips": round_trips, **{f"{name}_seconds": v for name, v in terms.items()},
        "latency_seconds": latency, "iteration_seconds": max(terms.values()) + latency, "bottleneck": bottleneck,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=float, default=1e12, help="of the data set (default 1 TB)")
    parser.add_argument("--itemsize", type=int, default=4, help="4: float32, 8: float64")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--threads", type=int, default=32, help="per worker")
    parser.add_argument("--chunk-bytes", type=float, default=256 * 2**20)
    parser.add_argument("--storage", type=float, default=2e9, help="read bandwidth per worker node, bytes/s")
    parser.add_argument("--no-queuing", action="store_true", help="worker-saturation inf")
    parser.add_argument("--task-overhead", type=float, default=None, help="seconds per task")
    parser.add_argument("--rtt", type=float, default=None, help="seconds")
    parser.add_argument("--nic", type=float, default=None, help="bytes/s per worker")
    args = parser.parse_args(argv)
    out = predict(args.bytes, args.d, args.k, args.workers, args.threads, args.chunk_bytes, args.itemsize,
                  storage_bytes_per_second=args.storage, queuing=not args.no_queuing,
                  task_overhead_seconds=args.task_overhead, rtt_seconds=args.rtt, nic_bytes_per_second=args.nic)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
