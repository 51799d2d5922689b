"""Seconds per EM iteration: dgmm vs Spark MLlib ``pyspark.ml.clustering.GaussianMixture``, same data and cores.

Spark runs ``local[2]`` (2 task threads, the machine's 2 cores; ``spark.driver.memory`` 6g) on the
same float64 data as ``bench_perf.py`` (n=2,000,000, d=16, k=8; Spark's mixture is always full
covariance), written once to ``--parquet`` with pyarrow (row groups of 250,000 rows, read as ~8
partitions) and assembled into vectors with ``VectorAssembler``. ``pyspark.ml`` takes no initial
model, so each fit starts from Spark's own initialisation with ``tol=0``; fits with ``maxIter=A``
and ``maxIter=B`` are timed and ``(t_B - t_A) / (B - A)`` is the time per iteration, free of
session start, Parquet reading, vector assembly, caching and initialisation (Spark persists its
training instances itself on the first pass, since the input DataFrame is not cached).

dgmm fits the same rows in memory (full covariance, tol=0, identical initial parameters as in
``bench_perf.py``, the threaded scheduler's 2 threads); its per-iteration seconds come from its
``callbacks`` (median of iterations 2..). Spark and dgmm runs alternate, repeats times. Target:
dgmm <= 0.3x Spark per iteration. One JSON line per run and a summary line.

    pip install -e ".[bench]"      # pyspark >= 3.5, Java 17
    python bench/bench_spark.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from benchutil import (
    dgmm_fit,
    emit,
    initial_parameters,
    load_average,
    machine,
    make_data,
    median_after_first,
    median_or_nan,
    tree_cpu_seconds,
)


def write_parquet(path: str, X: np.ndarray, row_group_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    table = pa.table({f"x{j}": X[:, j] for j in range(X.shape[1])})
    pq.write_table(table, path + ".tmp", row_group_size=row_group_rows, compression="none")
    os.replace(path + ".tmp", path)


def spark_session(cores: int, driver_memory: str):
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(f"local[{cores}]")
        .appName("dgmm-bench")
        .config("spark.driver.memory", driver_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", str(cores))
        .config("spark.sql.files.maxPartitionBytes", str(32 * 2**20))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def jvm_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children (Spark's JVM runs in one)."""
    return tree_cpu_seconds(include_self=False)


def spark_fit(spark, path: str, n_features: int, k: int, max_iter: int, seed: int):
    """Wall seconds of a whole Spark fit (read, assemble, init, max_iter iterations), its JVM CPU seconds, model."""
    from pyspark.ml.clustering import GaussianMixture as SparkGaussianMixture
    from pyspark.ml.feature import VectorAssembler

    t0, c0 = time.perf_counter(), jvm_cpu_seconds()
    df = spark.read.parquet(path)
    features = VectorAssembler(inputCols=[f"x{j}" for j in range(n_features)], outputCol="features").transform(df)
    model = SparkGaussianMixture(k=k, maxIter=max_iter, tol=0.0, seed=seed, featuresCol="features").fit(
        features.select("features"))
    seconds = time.perf_counter() - t0
    return seconds, jvm_cpu_seconds() - c0, model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-samples", type=int, default=2_000_000)
    parser.add_argument("--n-features", type=int, default=16)
    parser.add_argument("--n-components", type=int, default=8)
    parser.add_argument("--parquet", default="data/spark_2m16.parquet")
    parser.add_argument("--iters", default="2,7", help="Spark maxIter values A,B; per iteration = (t_B - t_A)/(B - A)")
    parser.add_argument("--dgmm-iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--driver-memory", default="6g")
    args = parser.parse_args()
    a, b = (int(x) for x in args.iters.split(","))
    n, d, k = args.n_samples, args.n_features, args.n_components

    X = make_data(n, d, k, seed=0)  # the same rows as bench_perf.py's sklearn part
    write_parquet(args.parquet, X, row_group_rows=250_000)
    init = initial_parameters(X, k, "full")
    import pyspark

    spark = spark_session(args.cores, args.driver_memory)
    emit(dict(machine=machine(), pyspark=pyspark.__version__, java=spark.sparkContext._jvm.System.getProperty(
        "java.version"), argv=vars(args), load_average=load_average()))
    spark_fit(spark, args.parquet, d, k, 1, seed=0)  # JIT and file-system warm-up, not timed

    spark_per_iter, spark_cpu, dgmm_per_iter, dgmm_cpu = [], [], [], []
    for repeat in range(args.repeats):
        times, cpus = {}, {}
        for max_iter in (a, b):
            load = load_average()
            seconds, cpu, model = spark_fit(spark, args.parquet, d, k, max_iter, seed=repeat)
            summary = model.summary
            times[max_iter], cpus[max_iter] = seconds, cpu
            emit(dict(who="spark", repeat=repeat, max_iter=max_iter, num_iter=summary.numIter, fit_seconds=round(
                seconds, 3), jvm_cpu_seconds=round(cpu, 2), log_likelihood_per_row=summary.logLikelihood / n,
                load_average=load))
        spark_per_iter.append((times[b] - times[a]) / (b - a))
        spark_cpu.append((cpus[b] - cpus[a]) / (b - a))
        load = load_average()
        timing, gm = dgmm_fit(X, k, "full", init, args.dgmm_iters)
        dgmm_per_iter.append(median_after_first(timing.seconds))
        dgmm_cpu.append(median_or_nan(timing.cpu_seconds))
        emit(dict(who="dgmm", repeat=repeat, iters=args.dgmm_iters, fit_seconds=round(timing.total, 3),
                  iteration_seconds=[round(s, 3) for s in timing.seconds],
                  seconds_per_iteration=round(dgmm_per_iter[-1], 3), cpu_seconds_per_iteration=round(dgmm_cpu[-1], 3),
                  lower_bound=float(gm.lower_bound_), load_average=load))
        emit(dict(who="spark", repeat=repeat, seconds_per_iteration=round(spark_per_iter[-1], 3),
                  cpu_seconds_per_iteration=round(spark_cpu[-1], 3)))
    spark.stop()
    ours, theirs = statistics.median(dgmm_per_iter), statistics.median(spark_per_iter)
    emit(dict(summary=True, n_samples=n, n_features=d, n_components=k, covariance_type="full", cores=args.cores,
              dgmm_s_per_iter=round(ours, 3), spark_s_per_iter=round(theirs, 3),
              spark_s_per_iter_all=[round(s, 3) for s in spark_per_iter],
              dgmm_cpu_s_per_iter=round(statistics.median(dgmm_cpu), 3),
              spark_cpu_s_per_iter=round(statistics.median(spark_cpu), 3),
              cpu_ratio=round(statistics.median(dgmm_cpu) / statistics.median(spark_cpu), 3),
              paired_ratios=[round(x / y, 3) for x, y in zip(dgmm_per_iter, spark_per_iter)],
              ratio=round(ours / theirs, 3), target=0.3,
              met=ours / theirs <= 0.3, load_average=load_average()))


if __name__ == "__main__":
    main()
