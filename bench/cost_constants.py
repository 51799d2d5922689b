#!/usr/bin/env python
"""Constants of the per-iteration cost model in docs/scaling.md, measured on this machine.

Prints one JSON object (and a table) with:

- ``kernel``: the E-step chunk kernel (``dgmm.chunk.e_step_statistics``) on one thread for
  d=64, k=32, full covariances, float32 input: rows/s, and the FLOP rate under the model's
  count of 3·d²·k FLOPs per row (2·d²·k for the batched triangular GEMM of the
  log-densities, d²·k for the weighted second moments);
- ``gemm``: raw single-thread float64 GEMM of the kernel's main shape (rows × d)·(d × k·d);
- ``read``: reading a float32 Zarr array (zstd, 8 MiB chunks, 128 MiB in all, page cache
  warm) with one thread: decompression plus copy, MB/s;
- ``scheduler``: per-task overhead of the distributed scheduler: a LocalCluster with one
  single-threaded worker process runs (a) a graph of 4,000 no-op tasks, (b) dgmm EM
  iterations over 1,000 tiny chunks (so that nearly all time is overhead), seconds per task;
- ``network`` (with ``--netns``, root only): round-trip time of a 64-byte TCP ping-pong and
  the bandwidth of one TCP stream between two network namespaces joined by veth links
  and a bridge (as in ``scripts/netns_cluster.py``).

    python bench/cost_constants.py [--netns] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchutil import netns_cluster_module


def _best(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def kernel_rate(d=64, k=32, rows=65_536):
    from threadpoolctl import threadpool_limits

    from dgmm import chunk

    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, d)).astype(np.float32)
    means = rng.normal(size=(k, d))
    prec_chol = np.tile(np.eye(d), (k, 1, 1))
    params = chunk.chunk_params(np.full(k, 1 / k), means, prec_chol, "full")
    with threadpool_limits(1, user_api="blas"):
        chunk.e_step_statistics(X[:4096], (params,))  # warm the workspace
        best, median = _best(lambda: chunk.e_step_statistics(X, (params,)), repeat=5)
        A = rng.normal(size=(4096, d))
        B = rng.normal(size=(d, k * d))
        gemm_best, _ = _best(lambda: A @ B, repeat=10)
    flops_per_row = 3 * d * d * k
    return {
        "d": d, "k": k, "rows": rows, "seconds_best": best, "seconds_median": median,
        "rows_per_second": rows / best, "rows_per_second_median": rows / median,
        "model_flops_per_row": flops_per_row, "gflops": rows * flops_per_row / best / 1e9,
        "gflops_median": rows * flops_per_row / median / 1e9,
    }, {"shape": f"(4096 x {d}) @ ({d} x {k * d}) float64", "gflops": 2 * 4096 * d * k * d / gemm_best / 1e9}


def read_rate(workdir: Path, d=64):
    import zarr

    rows_per_chunk = 8 * 2**20 // (4 * d)
    n_chunks = 16
    path = workdir / "read.zarr"
    rng = np.random.default_rng(1)
    z = zarr.open_array(str(path), mode="w", shape=(rows_per_chunk * n_chunks, d), chunks=(rows_per_chunk, d),
                        dtype="f4")
    for i in range(n_chunks):
        z[i * rows_per_chunk:(i + 1) * rows_per_chunk] = rng.normal(size=(rows_per_chunk, d)).astype(np.float32)
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    z = zarr.open_array(str(path), mode="r")

    def read_all():
        for i in range(n_chunks):
            z[i * rows_per_chunk:(i + 1) * rows_per_chunk]

    read_all()
    best, median = _best(read_all, repeat=3)
    nbytes = rows_per_chunk * n_chunks * d * 4
    return {"bytes": nbytes, "bytes_on_disk": on_disk, "chunk_bytes": rows_per_chunk * d * 4,
            "mb_per_second": nbytes / best / 1e6, "mb_per_second_median": nbytes / median / 1e6,
            "compression_ratio": nbytes / on_disk}


def scheduler_overhead():
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster

    from dgmm import GaussianMixture

    out = {}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.submit(lambda: 0).result()
        n = 4000
        tasks = [dask.delayed(lambda i: i, pure=True)(i, dask_key_name=f"noop-{i}") for i in range(n)]
        total = dask.delayed(sum)(tasks)
        t0 = time.perf_counter()
        dask.compute(total)
        seconds = time.perf_counter() - t0
        out["noop_graph"] = {"tasks": n + 1, "seconds": seconds, "seconds_per_task": seconds / (n + 1)}

        n_chunks, rows = 1000, 16
        X = da.random.default_rng(0).normal(size=(n_chunks * rows, 2), chunks=(rows, 2))
        times = []

        def callback(info):
            times.append(info.seconds)

        GaussianMixture(2, covariance_type="diag", init_params="random", tol=0.0, max_iter=4, random_state=0,
                        callbacks=[callback]).fit(X)
        tasks_per_iteration = n_chunks * 2 + (n_chunks + 6) // 7 + 1  # data + statistics, combines, parameters
        per_iteration = float(np.median(times[1:]))
        out["dgmm_tiny_chunks"] = {"chunks": n_chunks, "tasks_per_iteration": tasks_per_iteration,
                                   "seconds_per_iteration": per_iteration,
                                   "seconds_per_task": per_iteration / tasks_per_iteration}
    return out


_PING_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9700)); s.listen(); print("ready", flush=True)
for mode in ("ping", "bulk"):
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "ping":
        while True:
            m = c.recv(64)
            if not m: break
            c.sendall(m)
    else:
        n = 0
        while True:
            m = c.recv(1 << 20)
            if not m: break
            n += len(m)
        c.sendall(str(n).encode())
    c.close()
"""

_PING_CLIENT = """
import socket, sys, time, json
host = sys.argv[1]
for _ in range(100):
    try:
        c = socket.create_connection((host, 9700), timeout=5); break
    except OSError: time.sleep(0.1)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 64
for _ in range(200): c.sendall(msg); c.recv(64)
n = 2000; t0 = time.perf_counter()
for _ in range(n): c.sendall(msg); c.recv(64)
rtt = (time.perf_counter() - t0) / n
c.close()
c = socket.create_connection((host, 9700), timeout=30)
buf = b"\\0" * (1 << 20); total = 256 << 20; t0 = time.perf_counter()
for _ in range(total // len(buf)): c.sendall(buf)
c.shutdown(socket.SHUT_WR); got = int(c.recv(64)); seconds = time.perf_counter() - t0
print(json.dumps({"rtt_seconds": rtt, "bulk_bytes": got, "bulk_mb_per_second": got / seconds / 1e6}))
"""


def network_rates(workdir: Path):
    nc = netns_cluster_module()
    why = nc.netns_available()
    if why:
        return {"skipped": why}
    cluster = nc.NetnsCluster(n_workers=0, workdir=workdir / "net", log=lambda *a: None)
    cluster.workdir.mkdir(parents=True, exist_ok=True)
    try:
        cluster._make_network()
        server = cluster.popen("scheduler", [sys.executable, "-c", _PING_SERVER, nc.SCHEDULER_IP], "ping-server")
        result = cluster.run("client", [sys.executable, "-c", _PING_CLIENT, nc.SCHEDULER_IP], timeout=300)
        server.wait(timeout=30)
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        return json.loads(result.stdout)
    finally:
        cluster.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--netns", action="store_true", help="also measure TCP between network namespaces (root)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="dgmm-constants-"))
    try:
        kernel, gemm = kernel_rate()
        result = {"kernel": kernel, "gemm": gemm}
        print(json.dumps(result), flush=True)
        result["read"] = read_rate(workdir)
        print(json.dumps({"read": result["read"]}), flush=True)
        result["scheduler"] = scheduler_overhead()
        print(json.dumps({"scheduler": result["scheduler"]}), flush=True)
        if args.netns:
            result["network"] = network_rates(workdir)
            print(json.dumps({"network": result["network"]}), flush=True)
        result["load_average"] = os.getloadavg()
        result["cpu_count"] = os.cpu_count()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
