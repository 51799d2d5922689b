"""I/O overlap: one EM iteration on a Zarr array vs merely reading and summing it, cold and warm, per codec.

Copies of the same 16,500,000 x 16 float64 array (``dgmm.datasets.write_blobs_zarr``, 100,000-row
chunks: 165 chunks of 12.8 MB, 2.11 GB in memory), one per codec of ``--codecs``: ``zstd`` (zarr's
default, zstd level 3 without shuffle; the array at ``--path``), ``blosc-lz4`` (what dgmm's own
writers produce by default: Blosc LZ4 with byte shuffle), ``blosc-zstd`` and ``none``
(uncompressed); the copies other than zstd are written beside ``--path`` once, same chunks. For
each repeat, copy and task, the page cache is dropped as root (``sync; echo 3 >
/proc/sys/vm/drop_caches``) and the task timed cold, then timed again warm; the order of the tasks
alternates between repeats (the shared disk's speed drifts), and ratios are given per repeat:

* ``sum``: ``da.from_zarr(path).sum().compute()`` with dgmm's chunks, on the scheduler of
  ``--scheduler``: dask's threaded scheduler (one thread per core, the Python API's default) or a
  ``LocalCluster`` of one single-threaded worker process per core;
* ``sum_all_threads`` (optional): the same sum on twice as many threads, as many as a dgmm pass
  uses in all (its compute threads plus as many reading threads: ``dgmm.passes.ReadAheadPool`` on
  the threaded scheduler; with ``--scheduler processes``, on the two-thread workers below);
* ``diag`` / ``full``: ``dgmm.GaussianMixture(8, covariance_type=..., max_iter=1, tol=0)`` with
  weights, means and precisions given (no initialisation pass: exactly one pass over the data plus
  the M-step; ``n_passes_ == 1`` is checked), timed by its per-iteration callback. With
  ``--scheduler processes`` these run on a second ``LocalCluster`` with workers as the ``dgmm``
  command starts them: one per core, each with two threads (``cluster.read_ahead``,
  ``dgmm.cli.READ_AHEAD_THREADS_PER_CORE``), so one thread's read overlaps the other's kernel;
* ``diag_plain`` (``--scheduler processes`` only): the diag iteration on the plain single-threaded
  workers of ``sum``, i.e. without read-ahead (the ``dgmm`` command with ``read_ahead: false``).

Target: diag EM iteration <= 1.3x the sum, cold. Also prints, for the codec recommendation, the
on-disk size and single-thread encode/decode rates of candidate codecs on chunks of the data and of
dgmm's outputs (labels int64, probabilities and log-likelihoods float64). One JSON line per run,
then summaries.

    python bench/bench_io.py --repeats 5        # needs root for drop_caches; writes data/ if missing
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings

import dask
import dask.array as da
import numpy as np
from benchutil import emit, initial_parameters, load_average, machine
from benchutil import tree_cpu_seconds as cpu_seconds

import dgmm
from dgmm.io import zarr_compressors


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def page_cache_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bytes_on_disk(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files)


def ensure_data(path: str, copies: dict[str, str], n_samples: int, chunk_rows: int) -> None:
    """Write the zstd array at ``path`` if missing, then a copy per other codec (same chunks, same values)."""
    if not os.path.exists(path):
        code = ("import sys; from dgmm.datasets import write_blobs_zarr; write_blobs_zarr(sys.argv[1], int(sys.argv[2]), "
                "n_features=16, n_components=8, chunk_rows=int(sys.argv[3]), seed=0, compressor='zstd')")
        subprocess.run([sys.executable, "-c", code, path, str(n_samples), str(chunk_rows)], check=True)
    for codec, copy_path in copies.items():
        if os.path.exists(copy_path):
            continue
        src = da.from_zarr(path)
        tmp = copy_path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        compressors = None if codec == "none" else zarr_compressors(np.dtype(np.float64), codec, 3)
        src.to_zarr(tmp, compressors=compressors, overwrite=True)
        os.replace(tmp, copy_path)


def run_sum(path: str, threads: int | None = None) -> dict:
    t0, c0 = time.perf_counter(), cpu_seconds()
    with dask.config.set(num_workers=threads) if threads else contextlib.nullcontext():
        total = float(da.from_zarr(path).sum().compute())
    return dict(seconds=time.perf_counter() - t0, cpu_seconds=cpu_seconds() - c0, value=total)


def run_em(path: str, kind: str, init: dict) -> dict:
    seconds = []
    gm = dgmm.GaussianMixture(8, covariance_type=kind, max_iter=1, tol=0.0, callbacks=lambda i: seconds.append(i.seconds),
                              **init)
    t0, c0 = time.perf_counter(), cpu_seconds()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(da.from_zarr(path))
    wall = time.perf_counter() - t0
    assert gm.n_passes_ == 1, gm.n_passes_
    return dict(seconds=seconds[0], fit_seconds=wall, cpu_seconds=cpu_seconds() - c0, value=float(gm.lower_bound_))


def codec_table(path: str, n_chunks: int) -> list[dict]:
    """Size ratio and single-thread encode/decode MB/s of candidate codecs on data and dgmm outputs."""
    import numcodecs
    from numcodecs import blosc

    blosc.set_nthreads(1)

    X = np.asarray(da.from_zarr(path)[: n_chunks * 100_000].compute())
    init = initial_parameters(X, 8, "diag", sample=20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = dgmm.GaussianMixture(8, covariance_type="diag", max_iter=20, **init).fit(X[:200_000])
    outputs = {
        "data float64": X,
        "labels int64": gm.predict(X).astype(np.int64),
        "probabilities float64": gm.predict_proba(X),
        "log_likelihood float64": gm.score_samples(X),
    }
    codecs = {
        "none": None,
        "zstd level 0 (zarr default)": numcodecs.Zstd(level=0),
        "zstd level 1": numcodecs.Zstd(level=1),
        "blosc lz4 shuffle": numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=0),
        "blosc zstd shuffle": numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=0),
    }
    rows = []
    for what, array in outputs.items():
        chunks = [np.ascontiguousarray(array[i : i + 100_000]) for i in range(0, len(array), 100_000)]
        raw = sum(c.nbytes for c in chunks)
        for name, codec in codecs.items():
            if codec is None:
                rows.append(dict(output=what, codec=name, ratio=1.0))
                continue
            encode = decode = float("inf")
            for _ in range(3):  # best of 3: the least disturbed on a busy machine
                t0 = time.perf_counter()
                encoded = [codec.encode(c) for c in chunks]
                encode = min(encode, time.perf_counter() - t0)
                t0 = time.perf_counter()
                for e in encoded:
                    codec.decode(e)
                decode = min(decode, time.perf_counter() - t0)
            size = sum(len(e) for e in encoded)
            rows.append(dict(output=what, codec=name, ratio=round(raw / size, 2),
                             encode_mb_s=round(raw / encode / 2**20), decode_mb_s=round(raw / decode / 2**20)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="data/bench_2gb.zarr")
    parser.add_argument("--codecs", default="zstd,blosc-lz4,none",
                        help="copies to time: zstd (the array at --path), blosc-lz4 (dgmm's writers' default), "
                             "blosc-zstd, none (uncompressed); the others are written beside --path once")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="threads of dask's threaded scheduler for both sum and EM (0: dask's default, one per core)")
    parser.add_argument("--scheduler", choices=("threads", "processes"), default="threads",
                        help="threads: dask's threaded scheduler (the Python API's default); processes: a "
                             "distributed.LocalCluster of one single-threaded worker process per core (the dgmm "
                             "command's default), for both sum and EM")
    parser.add_argument("--n-samples", type=int, default=16_500_000)
    parser.add_argument("--chunk-rows", type=int, default=100_000)
    parser.add_argument("--tasks", default="sum,sum_all_threads,diag,full")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codec-chunks", type=int, default=4, help="chunks in the codec table (0: skip it)")
    args = parser.parse_args()
    codecs = args.codecs.split(",")
    stem = args.path[:-5] if args.path.endswith(".zarr") else args.path
    copies = {codec: args.path if codec == "zstd" else f"{stem}_{'raw' if codec == 'none' else codec}.zarr"
              for codec in codecs}
    ensure_data(args.path, {c: p for c, p in copies.items() if c != "zstd"}, args.n_samples, args.chunk_rows)
    if args.num_workers:
        dask.config.set(num_workers=args.num_workers)
    clusters: list = []
    clients: dict = {}  # task -> the distributed client it runs on (--scheduler processes)
    if args.scheduler == "processes":
        from distributed import Client, LocalCluster

        from dgmm.cli import LOCAL_WORKER_ENVIRON, READ_AHEAD_THREADS_PER_CORE

        def local_client(**workers):
            with dask.config.set(LOCAL_WORKER_ENVIRON):  # worker processes as the dgmm command starts them
                cluster = LocalCluster(n_workers=os.cpu_count(), processes=True, dashboard_address=None, **workers)
            clusters.append(cluster)
            return Client(cluster, set_as_default=False)

        # The sum on plain single-threaded workers; EM (and the wide sum) on workers as the dgmm command
        # starts them: two threads per core (cluster.read_ahead), so one thread reads while the other computes.
        plain = local_client(threads_per_worker=1)
        command = local_client(threads_per_worker=READ_AHEAD_THREADS_PER_CORE)
        clients = {task: plain if task in ("sum", "diag_plain") else command for task in args.tasks.split(",")}
    X = da.from_zarr(args.path)
    emit(dict(machine=machine(), argv=vars(args), n_samples=int(X.shape[0]), chunk_rows=int(X.chunks[0][0]),
              n_chunks=int(X.numblocks[0]), bytes_in_memory=int(X.nbytes), scheduler=dask.config.get("scheduler", None),
              threads=os.cpu_count(), scheduler_kind=args.scheduler, bytes_on_disk={c: bytes_on_disk(p) for c, p in copies.items()},
              load_average=load_average()))
    sample = np.asarray(X[:200_000].compute())
    inits = {kind: initial_parameters(sample, 8, kind) for kind in ("diag", "full")}
    tasks = args.tasks.split(",")
    if "diag_plain" in tasks and args.scheduler != "processes":
        parser.error("the task diag_plain needs --scheduler processes")
    results: dict = {}
    for repeat in range(args.repeats):
        for codec, path in copies.items():
            # Alternate the order of the tasks between repeats: the disk's speed drifts (shared host).
            for task in (tasks if repeat % 2 == 0 else tasks[::-1]):
                for state in ("cold", "warm"):
                    if state == "cold":
                        drop_caches()
                    cached = page_cache_mb()
                    load = load_average()
                    with clients[task].as_current() if clients else contextlib.nullcontext():
                        if task == "sum":
                            out = run_sum(path)
                        elif task == "sum_all_threads":
                            out = run_sum(path, 2 * (args.num_workers or dask.system.CPU_COUNT))
                        else:  # diag, full; diag_plain: diag on the plain workers
                            kind = task.removesuffix("_plain")
                            out = run_em(path, kind, inits[kind])
                    out["gb_per_s"] = X.nbytes / out["seconds"] / 1e9
                    results.setdefault((codec, task, state), []).append(out)
                    emit(dict(repeat=repeat, codec=codec, task=task, state=state, page_cache_mb_before=round(cached),
                              **{key: round(v, 3) if key != "value" else v for key, v in out.items()},
                              load_average=load))
    for codec in copies:
        for state in ("cold", "warm"):
            row = dict(summary=True, codec=codec, state=state)
            base = statistics.median(r["seconds"] for r in results[(codec, "sum", state)])
            row["sum_seconds"] = round(base, 2)
            row["sum_gb_per_s"] = round(X.nbytes / base / 1e9, 3)
            for task in tasks:
                if task in ("sum", "sum_all_threads"):
                    continue
                secs = statistics.median(r["seconds"] for r in results[(codec, task, state)])
                ratios = [r["seconds"] / s["seconds"] for r, s in zip(results[(codec, task, state)],
                                                                      results[(codec, "sum", state)])]
                row[f"{task}_seconds"] = round(secs, 2)
                row[f"{task}_over_sum"] = round(secs / base, 2)
                row[f"{task}_over_sum_per_repeat"] = [round(x, 2) for x in ratios]
                row[f"{task}_cpu_seconds"] = round(statistics.median(r["cpu_seconds"] for r in
                                                                     results[(codec, task, state)]), 2)
            row["sum_cpu_seconds"] = round(statistics.median(r["cpu_seconds"] for r in results[(codec, "sum", state)]), 2)
            if "diag" in tasks:
                row["diag_target_1_3_met"] = row["diag_over_sum"] <= 1.3
            if "sum_all_threads" in tasks:
                wide = statistics.median(r["seconds"] for r in results[(codec, "sum_all_threads", state)])
                row["sum_all_threads_seconds"] = round(wide, 2)
                for task in ("diag", "full"):
                    if task in tasks:
                        row[f"{task}_over_sum_all_threads"] = round(row[f"{task}_seconds"] / wide, 2)
            row["load_average"] = load_average()
            emit(row)
    for client in set(clients.values()):
        client.close()
    for cluster in clusters:
        cluster.close()
    if args.codec_chunks:
        for row in codec_table(args.path, args.codec_chunks):
            emit(dict(codec_table=True, **row))


if __name__ == "__main__":
    main()
