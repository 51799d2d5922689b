#!/usr/bin/env python
"""Bytes of mixture parameters moved per EM iteration (and per predict) on a multi-namespace cluster.

For k·d² large (default k=64, d=256, full covariances: 33.7 MB of float64 parameters) the
parameters of an EM iteration should cross the network once per worker, not once per
task. This runs ``dgmm fit`` and ``dgmm predict`` through ``cluster.address`` on the
network-namespace cluster of ``scripts/netns_cluster.py`` (needs root), for every
combination of ``--workers`` and ``--chunks``, and reports per EM iteration (median of
iterations 2..max_iter-1) and for the predict pass:

- bytes the client sent to the scheduler (the graph, with the parameters in it),
- bytes the scheduler sent to workers (task specs: a parameter literal travels here),
- bytes workers sent each other, and how many worker-to-worker fetches moved a
  parameter-sized key,
- all bytes the kernel counted on the veth links (every namespace's transmit side),

each also divided by the size P of the parameters ("copies of P").

    sudo python bench/param_broadcast.py                          # k=64, d=256
    sudo python bench/param_broadcast.py --k 15 --d 90 --rows 4096  # P just under 1 MB
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml
from benchutil import netns_cluster_module


def parameter_nbytes(k: int, d: int) -> int:
    """Bytes of one full-covariance ChunkParams: center, means, precision Cholesky factors, log weights."""
    return 8 * (d + k * d + k * d * d + k)


PARAMETER_GROUPS = ("tuple", "ChunkParams")  # dask.delayed(batch) in graph.py; map_blocks' delayed argument
STATISTICS_GROUPS = ("e_step_statistics", "combine_statistics")


def _pass_row(nc, it: list[dict], P: int) -> dict:
    s = nc.summarise(it)  # medians (the first EM iteration left out)
    links = s["links"]

    def fetches(groups):
        hits = {g: v for g, v in s["transfers"].items() if any(g.startswith(p) for p in groups)}
        return sum(v["count"] for v in hits.values()), sum(v["bytes"] for v in hits.values())

    row = {
        "seconds": s["seconds"],
        "tasks": s["graph_tasks"],
        "client_to_scheduler": links.get("client->scheduler", {}).get("bytes", 0),
        "scheduler_to_client": links.get("scheduler->client", {}).get("bytes", 0),
        "scheduler_to_workers": links.get("scheduler->worker", {}).get("bytes", 0),
        "workers_to_scheduler": links.get("worker->scheduler", {}).get("bytes", 0),
        "worker_to_worker": links.get("worker->worker", {}).get("bytes", 0),
        "kernel_tx": sum(v["tx_bytes"] for v in s["kernel"].values()),
        "transfers": s["transfers"],
    }
    row["parameter_fetches"], row["parameter_fetch_bytes"] = fetches(PARAMETER_GROUPS)
    row["statistics_fetches"], row["statistics_fetch_bytes"] = fetches(STATISTICS_GROUPS)
    row["data_fetches"], row["data_fetch_bytes"] = fetches(("from-zarr",))
    return row


def _table(rows: list[dict], P: int) -> str:
    def mb(x):
        return f"{x / 1e6:.1f} MB ({x / P:.2f} P)"

    lines = ["| pass | workers | chunks | tasks | client→scheduler | scheduler→workers | parameter fetches "
             "worker←worker | statistics fetches worker←worker | workers→scheduler | all veth tx |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['pass']} | {r['workers']} | {r['chunks']} | {r['tasks']} | {mb(r['client_to_scheduler'])} "
            f"| {mb(r['scheduler_to_workers'])} | {r['parameter_fetches']}: {mb(r['parameter_fetch_bytes'])} "
            f"| {r['statistics_fetches']}: {mb(r['statistics_fetch_bytes'])} | {mb(r['workers_to_scheduler'])} "
            f"| {mb(r['kernel_tx'])} |")
    return "\n".join(lines)


def _analyse(nc, metrics, n_workers, command, P):
    addresses = nc.addresses_for(n_workers)
    if command == "fit":
        it = nc.analyse(metrics, addresses)
    else:
        it = nc.analyse(metrics, addresses, group="store-map", include_last=True)
    return _pass_row(nc, it, P)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--chunks", default="2,16")
    parser.add_argument("--max-iter", type=int, default=4)
    parser.add_argument("--json", default=None)
    parser.add_argument("--workdir", default=None, help="keep the data and raw metrics here")
    parser.add_argument("--reanalyse", action="store_true", help="only re-read the metrics saved in --workdir")
    args = parser.parse_args(argv)
    nc = netns_cluster_module()
    P = parameter_nbytes(args.k, args.d)
    if args.reanalyse:
        rows = []
        for n_workers in [int(w) for w in args.workers.split(",")]:
            for n_chunks in [int(c) for c in args.chunks.split(",")]:
                out = Path(args.workdir) / f"w{n_workers}-c{n_chunks}"
                for command in ("fit", "predict"):
                    metrics = json.loads((out / f"{command}-metrics.json").read_text())
                    rows.append({"workers": n_workers, "chunks": n_chunks,
                                 "pass": "EM iteration" if command == "fit" else "predict",
                                 **_analyse(nc, metrics, n_workers, command, P)})
        print(_table(rows, P))
        if args.json:
            Path(args.json).write_text(json.dumps({"k": args.k, "d": args.d, "P": P, "rows": rows}, indent=1))
        return 0
    why = nc.netns_available()
    if why:
        print(f"network namespaces unavailable: {why}", file=sys.stderr)
        return 77
    print(f"k={args.k}, d={args.d}, full covariances: P = {P:,} bytes of parameters; {args.rows} rows", flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dgmm-bench-params-"))
    workdir.mkdir(parents=True, exist_ok=True)
    X = nc.make_data(args.rows, args.d, seed=0)
    rows = []
    for n_workers in [int(w) for w in args.workers.split(",")]:
        with nc.NetnsCluster(n_workers, workdir / f"cluster-{n_workers}") as cluster:
            for n_chunks in [int(c) for c in args.chunks.split(",")]:
                out = workdir / f"w{n_workers}-c{n_chunks}"
                out.mkdir(parents=True)
                data = out / "x.zarr"
                nc.write_zarr(data, X, -(-args.rows // n_chunks))
                config = {
                    "input": {"path": str(data)},
                    "model": {"n_components": args.k, "covariance_type": "full", "init_params": "random",
                              "random_state": 0, "tol": 0.0, "max_iter": args.max_iter, "reg_covar": 0.1},
                    "cluster": {"address": cluster.address, "timeout": 60},
                    "output": {"model": str(out / "model.npz"), "checkpoint_every": 0},
                    "predict": {"output": str(out / "labels.zarr"), "labels": True},
                }
                (out / "c.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
                t0 = time.perf_counter()
                for command in ("fit", "predict"):
                    done = cluster.run("client", [sys.executable, "-m", "dgmm.cli", command, str(out / "c.yaml")],
                                       timeout=900, cwd=out)
                    if done.returncode != 0:
                        raise RuntimeError(f"dgmm {command}: {done.stdout}\n{done.stderr}\n{cluster.tail_logs()}")
                    metrics = nc.collect(cluster, out / f"{command}-metrics.json")
                    row = {"workers": n_workers, "chunks": n_chunks, "pass": "EM iteration" if command == "fit"
                           else "predict", **_analyse(nc, metrics, n_workers, command, P)}
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "transfers"}), flush=True)
                print(f"  ({n_workers} workers, {n_chunks} chunks: fit and predict in "
                      f"{time.perf_counter() - t0:.0f} s)", flush=True)
    print()
    print(_table(rows, P))
    if args.json:
        Path(args.json).write_text(json.dumps({"k": args.k, "d": args.d, "P": P, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
