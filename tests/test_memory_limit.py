"""An out-of-core fit finishes inside a memory limit smaller than the data.

A Zarr array of about 680 MB is fitted in a child process confined to a
cgroup-v1 memory cgroup of 400 MiB (swap included). The page cache of the
data is dropped first, so the child's reads are charged to its own cgroup and
the whole I/O path runs under the limit; the kernel reclaims that cache at the
limit, whereas anonymous memory (chunks, temporaries, statistics) cannot be
reclaimed without swap, so a fit that held the data would be OOM-killed. A
negative control shows the same cgroup does kill a process that reads the
whole array. The fitted parameters are checked against an independent
reference: one EM step recomputed here by streaming the chunks through
``scipy.stats.multivariate_normal``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from threadpoolctl import threadpool_limits

from dgmm.datasets import blob_parameters, write_blobs_zarr

pytestmark = pytest.mark.cgroup

N_SAMPLES = 11_000_000
N_FEATURES = 8
N_COMPONENTS = 4
CHUNK_ROWS = 100_000
SEED = 0
LIMIT_BYTES = 400 * 2**20
CHILD_TIMEOUT_S = 300

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")

# Both children join the cgroup before importing anything heavy, so every
# page they touch is charged to it.
FIT_CHILD = """\
import os, sys
with open(os.path.join(sys.argv[2], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
import json, resource, time, warnings
import dask
import dask.array as da
from dgmm import GaussianMixture

start = time.perf_counter()
gm = GaussianMixture(n_components=4, covariance_type="full", max_iter=5, tol=0, random_state=0)
with dask.config.set(scheduler="threads"), warnings.catch_warnings():
    warnings.simplefilter("ignore")  # tol=0 never converges: ConvergenceWarning by design
    gm.fit(da.from_zarr(sys.argv[1]))
print(json.dumps({
    "weights": gm.weights_.tolist(),
    "means": gm.means_.tolist(),
    "covariances": gm.covariances_.tolist(),
    "lower_bound": float(gm.lower_bound_),
    "lower_bounds": [float(v) for v in gm.lower_bounds_],
    "n_iter": int(gm.n_iter_),
    "n_passes": int(gm.n_passes_),
    "seconds": time.perf_counter() - start,
    "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "cgroup": open("/proc/self/cgroup").read(),
}))
"""

LOAD_ALL_CHILD = """\
import os, sys
with open(os.path.join(sys.argv[2], "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
import zarr
X = zarr.open_array(sys.argv[1], mode="r")[:]
print(X.nbytes)
"""


def _own_memory_cgroup() -> Path | None:
    """The cgroup-v1 memory cgroup of this process, or None without a v1 memory hierarchy."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_V1_MEMORY / path.lstrip("/")
    return None


def _read_int(cgroup: Path, name: str) -> int:
    return int((cgroup / name).read_text().split()[0])


def _oom_kills(cgroup: Path) -> int:
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0  # kernels before 4.13 do not count; the child's exit status still shows a kill


@pytest.fixture
def memory_cgroup():
    """A fresh memory cgroup limited to LIMIT_BYTES of RAM and swap, removed afterwards."""
    if not sys.platform.startswith("linux"):
        pytest.skip("memory cgroups are Linux only")
    if os.geteuid() != 0:
        pytest.skip("creating a memory cgroup needs root")
    parent = _own_memory_cgroup()
    if parent is None or not (parent / "memory.limit_in_bytes").exists():
        pytest.skip("no cgroup-v1 memory controller (only cgroup v2, or memory controller not mounted)")
    cgroup = parent / f"dgmm-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        cgroup.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup under {parent}: {exc}")
    try:
        try:
            (cgroup / "memory.limit_in_bytes").write_text(str(LIMIT_BYTES))
            if (cgroup / "memory.memsw.limit_in_bytes").exists():
                (cgroup / "memory.memsw.limit_in_bytes").write_text(str(LIMIT_BYTES))
        except OSError as exc:
            pytest.skip(f"cannot set a memory limit on {cgroup}: {exc}")
        if _read_int(cgroup, "memory.limit_in_bytes") > LIMIT_BYTES:
            pytest.skip("the memory cgroup ignored its limit")
        yield cgroup
    finally:
        _remove_cgroup(cgroup, parent)


def _remove_cgroup(cgroup: Path, parent: Path) -> None:
    # Only our own children ever join; they have exited (or been killed) by now,
    # but move any straggler back to the parent so the directory can go.
    for pid in (cgroup / "cgroup.procs").read_text().split():
        try:
            (parent / "cgroup.procs").write_text(pid)
        except OSError:
            pass
    cgroup.rmdir()


def _drop_page_cache(path: Path) -> None:
    """Flush and evict the files under ``path`` so the next reader pays for them in its own cgroup."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _bytes_on_disk(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files)


def _run_child(source: str, script: Path, data: Path, cgroup: Path) -> subprocess.CompletedProcess:
    script.write_text(source)
    return subprocess.run(
        [sys.executable, str(script), str(data), str(cgroup)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )


def _reference_em_step(path: Path, weights, means, covariances):
    """One EM step over the Zarr chunks with scipy densities, independent of dgmm.

    Returns the mean log-likelihood under the given parameters and the weights,
    means and covariances of the following M-step (second moments shifted by
    the given means).
    """
    X = zarr.open_array(path, mode="r")
    n_samples = X.shape[0]
    n_components, n_features = means.shape
    log_likelihood = 0.0
    nk = np.zeros(n_components)
    sx = np.zeros((n_components, n_features))
    sxx = np.zeros((n_components, n_features, n_features))
    densities = [multivariate_normal(means[k], covariances[k]) for k in range(n_components)]
    # One BLAS thread: multithreaded BLAS on small blocks is several times slower on a busy machine.
    with threadpool_limits(limits=1, user_api="blas"):
        for start in range(0, n_samples, CHUNK_ROWS):
            block = np.asarray(X[start : start + CHUNK_ROWS], dtype=np.float64)
            weighted = np.column_stack([np.log(weights[k]) + densities[k].logpdf(block) for k in range(n_components)])
            log_norm = logsumexp(weighted, axis=1)
            resp = np.exp(weighted - log_norm[:, None])
            log_likelihood += log_norm.sum()
            nk += resp.sum(axis=0)
            for k in range(n_components):
                d = block - means[k]
                sx[k] += resp[:, k] @ d
                sxx[k] += (d * resp[:, k : k + 1]).T @ d
    shift = sx / nk[:, None]
    new_means = means + shift
    new_covariances = sxx / nk[:, None, None] - np.einsum("ki,kj->kij", shift, shift)
    new_covariances += 1e-6 * np.eye(n_features)  # reg_covar's default
    return log_likelihood / n_samples, nk / n_samples, new_means, new_covariances


def test_fit_finishes_under_memory_limit_smaller_than_data(tmp_path, memory_cgroup):
    data = tmp_path / "blobs.zarr"
    try:
        write_blobs_zarr(data, N_SAMPLES, N_FEATURES, N_COMPONENTS, chunk_rows=CHUNK_ROWS, seed=SEED)
        data_bytes = _bytes_on_disk(data)
        assert data_bytes > 1.5 * LIMIT_BYTES, f"only {data_bytes} bytes on disk"
        _drop_page_cache(data)

        fit = _run_child(FIT_CHILD, tmp_path / "fit_child.py", data, memory_cgroup)
        max_usage = _read_int(memory_cgroup, "memory.max_usage_in_bytes")
        oom_kills_after_fit = _oom_kills(memory_cgroup)
        report = f"rc={fit.returncode} max_usage={max_usage} stderr:\n{fit.stderr[-3000:]}"
        assert fit.returncode == 0, report
        assert oom_kills_after_fit == 0, report
        result = json.loads(fit.stdout.strip().splitlines()[-1])
        assert memory_cgroup.name in result["cgroup"]  # the fit really ran inside the cgroup
        # Usage includes the data's page cache, which fills up to the limit and
        # is reclaimed there: at most the limit, never the data.
        assert 100 * 2**20 < max_usage <= LIMIT_BYTES < data_bytes, report
        print(
            f"data {data_bytes / 1e6:.0f} MB on disk, limit {LIMIT_BYTES / 1e6:.0f} MB, "
            f"cgroup max usage {max_usage / 1e6:.0f} MB (page cache included), "
            f"child peak RSS {result['maxrss_bytes'] / 1e6:.0f} MB, "
            f"fit {result['seconds']:.1f} s for {result['n_passes']} passes"
        )

        # Negative control: the same limit kills a process that holds the whole array.
        control = _run_child(LOAD_ALL_CHILD, tmp_path / "load_all_child.py", data, memory_cgroup)
        assert control.returncode == -signal.SIGKILL, (control.returncode, control.stdout, control.stderr[-2000:])
        assert _oom_kills(memory_cgroup) in (0, oom_kills_after_fit + 1)

        weights = np.array(result["weights"])
        means = np.array(result["means"])
        covariances = np.array(result["covariances"])
        assert result["n_iter"] == 5 and len(result["lower_bounds"]) == 5

        # Independent reference on every row: the fit is at an EM fixed point of
        # ALL the data. The fit agrees to ~1e-15; leaving out one chunk of 110
        # moves the means by ~2e-4, the weights by ~2e-5 and the mean
        # log-likelihood by ~6e-5, far outside these tolerances ...
        ref_lower_bound, ref_weights, ref_means, ref_covariances = _reference_em_step(
            data, weights, means, covariances
        )
        # (lower_bounds[-1] is the E-step of iteration 5, under iteration 4's parameters:
        # equal to the reference under the final ones once EM has converged.)
        np.testing.assert_allclose(result["lower_bounds"][-1], ref_lower_bound, rtol=0, atol=1e-8)
        np.testing.assert_allclose(weights, ref_weights, rtol=0, atol=1e-8)
        np.testing.assert_allclose(means, ref_means, rtol=0, atol=1e-7)
        np.testing.assert_allclose(covariances, ref_covariances, rtol=0, atol=1e-7)

        # ... and that fixed point is the mixture that generated the data.
        true_weights, true_means, true_scales = blob_parameters(N_COMPONENTS, N_FEATURES, SEED)
        order = np.argmin(((means[:, None, :] - true_means[None]) ** 2).sum(axis=2), axis=1)
        assert sorted(order) == list(range(N_COMPONENTS))
        np.testing.assert_allclose(means, true_means[order], atol=0.01)
        np.testing.assert_allclose(weights, true_weights[order], atol=0.001)
        true_covariances = np.stack([np.diag(s**2) for s in true_scales[order]])
        np.testing.assert_allclose(covariances, true_covariances, atol=0.015)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_the_command_sees_its_cgroup_memory_limit_and_does_not_keep_larger_data(tmp_path, memory_cgroup):
    """``input.persist: auto`` compares the data with the memory of this process's own cgroup.

    distributed's ``memory_limit: auto`` reads only the cgroup root, so a LocalCluster inside a
    smaller cgroup would otherwise count the whole machine and hold data the cgroup cannot.
    """
    code = ("import os, sys\n"
            "open(os.path.join(sys.argv[1], 'cgroup.procs'), 'w').write(str(os.getpid()))\n"
            "from dgmm.cli import _cgroup_memory_limit, _memory_for_data\n"
            "print(_cgroup_memory_limit(), _memory_for_data(None, 'threads'))\n")
    out = subprocess.run([sys.executable, "-c", code, str(memory_cgroup)], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert [int(v) for v in out] == [LIMIT_BYTES, LIMIT_BYTES]
