"""Checkpoints and callbacks of the Python API (the CLI builds on them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile

import dask.array as da
import numpy as np
import pytest

from dgmm import GaussianMixture
from dgmm.checkpoint import CheckpointError, load_checkpoint
from conftest import assert_same_model, make_mixture, rewrite


class StopAfter:
    """A callback that interrupts the fit after a given iteration, like a killed job."""

    def __init__(self, n_iter, exc=KeyboardInterrupt):
        self.n_iter, self.exc, self.seen = n_iter, exc, []

    def __call__(self, info):
        self.seen.append(info)
        if info.n_iter == self.n_iter:
            raise self.exc()


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("n_init", [1, 3])
def test_resume_gives_the_uninterrupted_model(tmp_path, kind, n_init):
    X = make_mixture(n_samples=800, n_features=3, seed=31)
    Xd = da.from_array(X, chunks=(97, 3))
    kwargs = dict(covariance_type=kind, n_init=n_init, init_params="random", random_state=4, tol=1e-9, max_iter=60)
    whole = GaussianMixture(3, **kwargs).fit(Xd)
    path = tmp_path / "fit.ckpt.npz"
    assert whole.n_iter_ > 4
    stopper = StopAfter(3)
    with pytest.raises(KeyboardInterrupt):
        GaussianMixture(3, checkpoint=str(path), checkpoint_every=2, callbacks=[stopper], **kwargs).fit(Xd)
    assert load_checkpoint(str(path)).n_iter == 3  # Ctrl-C saved the last completed iteration
    resumed = GaussianMixture(3, checkpoint=str(path), checkpoint_every=2, **kwargs).fit(Xd, resume=True)
    assert_same_model(resumed, whole, rtol=1e-10)
    assert resumed.converged_ == whole.converged_


def test_resume_without_checkpoint_starts_fresh_and_callbacks_report(tmp_path):
    X = make_mixture(n_samples=400, n_features=2)
    infos = []
    gm = GaussianMixture(3, random_state=0, checkpoint=str(tmp_path / "c.npz"), callbacks=infos.append)
    gm.fit(X, resume=True)
    assert [i.n_iter for i in infos] == list(range(1, gm.n_iter_ + 1))
    assert infos[-1].converged and infos[-1].lower_bound == pytest.approx(gm.lower_bound_)
    assert all(i.rows_per_second > 0 and i.n_samples == 400 for i in infos)
    assert (tmp_path / "c.npz").exists()


def test_verbose_resume_reports_how_every_restart_ended(tmp_path, capsys):
    """Restarts that ended before the checkpoint get their closing line; the others go on as usual."""
    X = make_mixture(n_samples=600, n_features=2, seed=32)
    kwargs = dict(n_init=3, init_params="random", random_state=1, tol=1e-3, max_iter=100, verbose=1,
                  checkpoint=str(tmp_path / "c.npz"))
    whole = GaussianMixture(3, **kwargs).fit(X)
    uninterrupted = capsys.readouterr().out.splitlines()
    GaussianMixture(3, **kwargs).fit(X, resume=True)  # from the finished fit's last checkpoint
    resumed = capsys.readouterr().out.splitlines()
    ends = [line for line in uninterrupted if line.startswith("Initialization ") and "converge" in line]
    assert len(ends) == 3 and whole.converged_
    assert resumed == [line for i in range(3) for line in (f"Initialization {i}", ends[i])], resumed


def test_checkpoint_from_other_data_or_settings_is_refused(tmp_path):
    X = make_mixture(n_samples=400, n_features=2)
    path = str(tmp_path / "c.npz")
    GaussianMixture(3, random_state=0, max_iter=3, checkpoint=path).fit(X)
    with pytest.raises(CheckpointError, match="data_digest"):
        GaussianMixture(3, random_state=0, checkpoint=path).fit(X + 1.0, resume=True)
    with pytest.raises(CheckpointError, match="n_components"):
        GaussianMixture(2, random_state=0, checkpoint=path).fit(X, resume=True)
    # max_iter does not change the model: allowed
    GaussianMixture(3, random_state=0, max_iter=50, checkpoint=path).fit(X, resume=True)


@pytest.mark.parametrize("kind", ["full", "diag"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_resume_on_rows_changed_away_from_the_ends_is_refused(tmp_path, kind, dtype):
    """The fingerprint hashes the first and last rows; the first resumed pass compares every row's sum."""
    X = make_mixture(n_samples=3000, n_features=3, seed=33).astype(dtype)
    path = str(tmp_path / "c.npz")
    kwargs = dict(covariance_type=kind, random_state=0, tol=0.0, checkpoint=path)
    with pytest.raises(KeyboardInterrupt):
        GaussianMixture(3, max_iter=10, callbacks=[StopAfter(3)], **kwargs).fit(da.from_array(X, chunks=(401, 3)))
    saved = os.path.getmtime(path), load_checkpoint(path).n_iter
    changed = X.copy()
    changed[1500, 2] += 20 * X[:, 2].std()  # one value, far from the first and last 256 rows
    with pytest.raises(CheckpointError, match=r"written for other data: the rows' sums differ in 1 of 3 features "
                                              r"\(feature 2: by [0-9.e-]+ per row\)"):
        GaussianMixture(3, max_iter=10, **kwargs).fit(da.from_array(changed, chunks=(401, 3)), resume=True)
    assert (os.path.getmtime(path), load_checkpoint(path).n_iter) == saved  # the checkpoint is kept as it was
    # the same rows in other chunks (and so summed in another order) resume, to the uninterrupted model
    whole = GaussianMixture(3, max_iter=10, **{**kwargs, "checkpoint": None}).fit(X)
    resumed = GaussianMixture(3, max_iter=10, **kwargs).fit(da.from_array(X, chunks=(1000, 3)), resume=True)
    float64 = dtype == np.float64
    assert_same_model(resumed, whole, rtol=1e-10 if float64 else 1e-3, atol=0.0 if float64 else 1e-6)


def test_a_checkpoint_without_row_sums_still_resumes(tmp_path):
    """Checkpoints of earlier versions have no 'data_sum': they resume with the fingerprint's check alone."""
    X = make_mixture(n_samples=600, n_features=2, seed=34)
    path = str(tmp_path / "c.npz")
    kwargs = dict(random_state=0, tol=0.0, max_iter=8, checkpoint=path)
    whole = GaussianMixture(3, **{**kwargs, "checkpoint": None}).fit(X)
    with pytest.raises(KeyboardInterrupt):
        GaussianMixture(3, callbacks=[StopAfter(4)], **kwargs).fit(X)
    assert load_checkpoint(path).data_sum["weight"] == 600
    rewrite(path, edit_meta=lambda meta: meta.pop("data_sum"))
    assert load_checkpoint(path).data_sum is None
    assert_same_model(GaussianMixture(3, **kwargs).fit(X, resume=True), whole, rtol=1e-10)
    with pytest.raises(KeyboardInterrupt):
        GaussianMixture(3, callbacks=[StopAfter(4)], **kwargs).fit(X)
    rewrite(path, edit_meta=lambda meta: meta["data_sum"].update(sum=[1.0]))
    with pytest.raises(CheckpointError, match="inconsistent checkpoint: 'data_sum' must hold"):
        GaussianMixture(3, **kwargs).fit(X, resume=True)


def test_corrupt_or_newer_checkpoints_give_clear_errors(tmp_path):
    X = make_mixture(n_samples=300, n_features=2)
    path = tmp_path / "c.npz"
    GaussianMixture(3, random_state=0, max_iter=2, checkpoint=str(path)).fit(X)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable dgmm checkpoint"):
        GaussianMixture(3, random_state=0, checkpoint=str(path)).fit(X, resume=True)
    # nor is it written over by a new fit: nothing says that it is a checkpoint (writes are atomic)
    with pytest.raises(ValueError, match="is a file but not a dgmm checkpoint"):
        GaussianMixture(3, random_state=0, max_iter=2, checkpoint=str(path)).fit(X)
    # a newer format version
    path.unlink()
    GaussianMixture(3, random_state=0, max_iter=2, checkpoint=str(path)).fit(X)
    rewrite(path, edit_meta=lambda meta: meta.update(format_version=99))
    with pytest.raises(CheckpointError, match="newer dgmm"):
        GaussianMixture(3, random_state=0, checkpoint=str(path)).fit(X, resume=True)


def test_checkpoint_holds_no_pickle(tmp_path):
    X = make_mixture(n_samples=300, n_features=2)
    path = tmp_path / "c.npz"
    GaussianMixture(3, random_state=0, max_iter=2, checkpoint=str(path)).fit(X)
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            header = z.read(name)[:128]
            assert b"'descr': '|O'" not in header and b"'descr': 'O'" not in header, name
    np.load(path, allow_pickle=False)["meta"]  # loads with pickling disabled


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    X = make_mixture(n_samples=300, n_features=2)
    path = tmp_path / "c.npz"
    GaussianMixture(3, random_state=0, max_iter=2, checkpoint=str(path)).fit(X)
    before = path.read_bytes()
    import dgmm.checkpoint as ck

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        GaussianMixture(3, random_state=1, max_iter=2, checkpoint=str(path)).fit(X)
    assert path.read_bytes() == before
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []
    load_checkpoint(str(path))


def test_next_checkpoint_removes_temporary_files_of_killed_writers(tmp_path):
    from dgmm.checkpoint import _temporary_name

    X = make_mixture(n_samples=300, n_features=2)
    path = tmp_path / "c.npz"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    dead_pid = int(ended.stdout)  # a process that has ended (and been reaped), as a killed writer has
    stale = [_temporary_name(str(path)).replace(f".{os.getpid()}.", f".{dead_pid}.") for _ in range(2)]
    for name in stale:
        (tmp_path / name).write_bytes(b"torn")
    own = _temporary_name(str(path))  # this process's: a writer at work
    (tmp_path / own).write_bytes(b"in progress")
    GaussianMixture(3, random_state=0, max_iter=2, checkpoint=str(path)).fit(X)
    assert sorted(os.listdir(tmp_path)) == sorted(["c.npz", own])
    assert load_checkpoint(str(path)).n_iter == 2


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    """Model files, checkpoints and tables get the permissions a plain open() would give them."""
    from dgmm import save_model
    from dgmm.checkpoint import atomic_write_bytes

    model = GaussianMixture(2, random_state=0).fit(np.random.default_rng(0).normal(size=(50, 2)))
    previous = os.umask(umask)
    try:
        save_model(model, tmp_path / "model.npz")
        atomic_write_bytes(str(tmp_path / "table.csv"), b"k,bic\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "model.npz").stat().st_mode & 0o777 == mode
    assert (tmp_path / "table.csv").stat().st_mode & 0o777 == mode


def test_a_url_as_checkpoint_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it used to become the local file ./s3:/bucket/ck.npz
    X = np.random.default_rng(0).normal(size=(100, 2))
    with pytest.raises(ValueError, match="checkpoint must be a local path .* got 's3://bucket/ck.npz'"):
        GaussianMixture(2, checkpoint="s3://bucket/ck.npz").fit(X)
    assert os.listdir(tmp_path) == []


def test_a_failed_atomic_write_names_the_file_asked_for(tmp_path):
    """Not the temporary file (a read-only mount: '...m.npz.HOST.PID.TOKEN.tmp'), nor "[Errno 17] File exists"
    for a file where a directory of the path should be."""
    from dgmm.checkpoint import atomic_write_bytes

    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub" / "model.npz"
    with pytest.raises(NotADirectoryError, match=rf"cannot write {re.escape(str(target))}: Not a directory"):
        atomic_write_bytes(target, b"payload")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "model.npz").mkdir()  # os.replace of a file onto a directory fails
    with pytest.raises(IsADirectoryError, match=rf"cannot write {re.escape(str(tmp_path / 'locked' / 'model.npz'))}: "):
        atomic_write_bytes(tmp_path / "locked" / "model.npz", b"payload")
    assert os.listdir(tmp_path / "locked") == ["model.npz"]  # no temporary file left
