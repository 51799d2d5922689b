"""Which BLAS entry points release the GIL? A pure-Python counter thread runs while the main thread is in ONE long call.

If the call releases the GIL the counter keeps its idle rate; if it holds the GIL the counter stops
for the call's duration. dgmm's 'full' kernel once computed second moments with
``scipy.linalg.blas.dsyrk``/``ssyrk`` (f2py wrappers that never release the GIL: the extension
module does not even import ``PyEval_SaveThread``), so under dask's threaded scheduler the other
worker thread could not run Python code while a syrk ran; it now uses ``numpy.matmul``, which calls
BLAS with the GIL released (``a.T @ a`` even calls syrk). This script keeps the evidence for
anyone tempted by scipy's BLAS wrappers. BLAS is limited to one thread, as dgmm does.

    python bench/gil_check.py
"""

from __future__ import annotations

import threading
import time

import numpy as np
from benchutil import emit, load_average
from scipy.linalg import blas
from threadpoolctl import threadpool_limits


def counter(stop: threading.Event, count: list) -> None:
    while not stop.is_set():
        count[0] += 1


def main():
    a = np.ascontiguousarray(np.random.default_rng(0).standard_normal((1_000_000, 64)))
    calls = {
        "time.sleep (GIL released)": lambda: time.sleep(0.3),
        "scipy.linalg.blas.dsyrk(1.0, a.T)": lambda: blas.dsyrk(1.0, a.T, trans=0, lower=0),
        "numpy a.T @ a (BLAS syrk)": lambda: a.T @ a,
    }
    with threadpool_limits(limits=1, user_api="blas"):
        for repeat in range(2):
            for label, call in calls.items():
                stop, count = threading.Event(), [0]
                thread = threading.Thread(target=counter, args=(stop, count))
                thread.start()
                time.sleep(0.05)  # let the counter start
                t0, before = time.perf_counter(), count[0]
                call()
                seconds, during = time.perf_counter() - t0, count[0] - before
                stop.set()
                thread.join()
                emit(dict(repeat=repeat, call=label, call_seconds=round(seconds, 3),
                          counter_mega_increments_per_s_during_call=round(during / seconds / 1e6, 2),
                          load_average=load_average()))


if __name__ == "__main__":
    main()
