#!/usr/bin/env bash
# Issue 9's device check, one run on a GPU machine from the repository root:
#   GPU-vs-CPU tests (tests/test_gpu.py, tests/test_namespace.py), then bench/bench_gpu.py
#   (arguments are passed on to it), then bench/profile_gpu_block.py, then with THREADS_CHECK=1
#   bench/bench_threads.py on the machine's CPU cores (issue 6: threads and the GIL). For that part
#   alone: GPU_CHECK=0 THREADS_CHECK=1 bash bench/gpu_check.sh
# Logs and the JSON results go to $OUT (default bench/results/gpu-check, git-ignored). Wheels in
# .whl/ are installed into build/gpu-site (git-ignored) first, when that folder exists: for a machine with Python 3.12,
# CuPy, NumPy, SciPy but no network and none of dgmm's other dependencies, made beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl dask distributed zarr numcodecs donfig google-crc32c array-api-compat partd locket \
#     tblib zict tornado scikit-learn
# (versions as in bench/README.md, "GPU: CuPy-backed chunks").
set -u
OUT=${OUT:-$PWD/bench/results/gpu-check}
SITE=$PWD/build/gpu-site
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || exit 1
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import os, numpy, scipy, dask, distributed, zarr, sklearn, dgmm; print({m.__name__: m.__version__ for m in (numpy, scipy, sklearn, dask, distributed, zarr, dgmm)}, 'cpus', os.cpu_count())" \
    | tee "$OUT/versions.txt"
if [ "${GPU_CHECK:-1}" = 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
    python3 -c "import cupy; print('cupy', cupy.__version__)" | tee -a "$OUT/versions.txt"
    timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" \
        tests/test_gpu.py tests/test_namespace.py 2>&1 | tee "$OUT/pytest.log"
    timeout "${BENCH_TIMEOUT:-300}" python3 bench/bench_gpu.py --out "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
    timeout "${PROFILE_TIMEOUT:-60}" python3 bench/profile_gpu_block.py 2>&1 | tee "$OUT/profile.log"
fi
# Issue 6 on the device's many CPU cores (THREADS_CHECK=1, about 3 minutes on 16 cores): dask's threads with
# row blocks sized for them (dgmm's default) and with one-thread blocks, and worker processes of 2 threads;
# the kernel alone on 1 and on all cores per block size; the GIL hand-off alone per thread count.
if [ "${THREADS_CHECK:-0}" = 1 ]; then
    CORES=$(nproc)
    timeout "${THREADS_TIMEOUT:-200}" python3 bench/bench_threads.py --threads "$CORES" --processes \
        --n-samples 4000000 --repeats 2 2>&1 | tee "$OUT/bench_threads.log"
    timeout 60 python3 bench/bench_threads.py --kernel --threads "1,$CORES" --log2-blocks 19,21,22 \
        --configs full:32:16:float32 --repeats 2 2>&1 | tee "$OUT/bench_threads_kernel.log"
    timeout 60 python3 bench/bench_threads.py --handoff --threads "1,2,4,8,$CORES" --repeats 1 2>&1 \
        | tee "$OUT/bench_threads_handoff.log"
fi
