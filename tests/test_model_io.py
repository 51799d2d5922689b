"""Model files: safe round trips, validation on load, conversion to and from scikit-learn."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import dgmm
from dgmm import GaussianMixture, from_sklearn, load_model, save_model, to_sklearn
from dgmm.model_io import FORMAT_VERSION, ModelFormatError, read_model_metadata
from conftest import COVARIANCE_TYPES, make_mixture, rewrite

FITTED = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")


@pytest.fixture(scope="module")
def data():
    return make_mixture(n_samples=500, n_features=3, seed=5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_round_trip_gives_the_same_fitted_model(tmp_path, data, kind, dtype):
    data = data.astype(dtype)
    gm = GaussianMixture(3, covariance_type=kind, random_state=0, max_iter=20).fit(data)
    path = tmp_path / "m.npz"
    assert save_model(gm, path, metadata={"source": {"path": "x.zarr"}, "seconds": 1.5}) == str(path)
    loaded = load_model(path)
    assert isinstance(loaded, GaussianMixture)
    for name in FITTED:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(gm, name), err_msg=name)
    assert loaded.get_params()["covariance_type"] == kind and loaded.n_components == 3
    assert loaded.n_iter_ == gm.n_iter_ and loaded.converged_ == gm.converged_
    assert loaded.lower_bound_ == gm.lower_bound_ and loaded.lower_bounds_ == gm.lower_bounds_
    np.testing.assert_array_equal(loaded.predict(data), gm.predict(data))
    np.testing.assert_array_equal(loaded.score_samples(data), gm.score_samples(data))
    meta = read_model_metadata(path)
    assert meta["format_version"] == FORMAT_VERSION and meta["dgmm_version"] == dgmm.__version__
    assert meta["fit"] == {"source": {"path": "x.zarr"}, "seconds": 1.5}
    assert meta["params"]["random_state"] == 0


def test_float32_and_feature_names_survive(tmp_path, data):
    import pandas as pd

    frame = pd.DataFrame(data.astype(np.float32), columns=["a", "b", "c"])
    gm = GaussianMixture(2, random_state=0).fit(frame)
    save_model(gm, tmp_path / "m.npz")
    loaded = load_model(tmp_path / "m.npz")
    assert loaded.means_.dtype == np.float32 and list(loaded.feature_names_in_) == ["a", "b", "c"]
    np.testing.assert_array_equal(loaded.predict(frame), gm.predict(frame))


def test_file_holds_no_pickle(tmp_path, fitted):
    path = tmp_path / "m.npz"
    save_model(fitted, path)
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["covariances.npy", "means.npy", "meta.npy", "precisions_cholesky.npy",
                                        "weights.npy"]
        for name in z.namelist():
            header = z.read(name)[:128]
            assert b"'descr': '|O'" not in header and b"'descr': 'O'" not in header
    with np.load(path, allow_pickle=False) as f:
        json.loads(str(f["meta"]))


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_sklearn_conversion_both_ways(data, kind):
    gm = GaussianMixture(3, covariance_type=kind, random_state=1).fit(data)
    sk = to_sklearn(gm)
    assert isinstance(sk, SkGaussianMixture)
    np.testing.assert_array_equal(sk.predict(data), gm.predict(data))
    np.testing.assert_allclose(sk.score_samples(data), gm.score_samples(data), rtol=1e-12)
    np.testing.assert_allclose(sk.sample(50)[0].shape, (50, 3))
    sk_fitted = SkGaussianMixture(3, covariance_type=kind, random_state=2).fit(data)
    back = from_sklearn(sk_fitted)
    assert isinstance(back, GaussianMixture)
    np.testing.assert_array_equal(back.predict(data), sk_fitted.predict(data))
    np.testing.assert_allclose(back.predict_proba(data), sk_fitted.predict_proba(data), rtol=1e-10, atol=1e-14)


def test_sklearn_model_can_be_saved_and_loaded(tmp_path, data):
    sk = SkGaussianMixture(2, random_state=0).fit(data)
    save_model(sk, tmp_path / "m.npz")
    np.testing.assert_array_equal(load_model(tmp_path / "m.npz").predict(data), sk.predict(data))


def test_unfitted_models_are_refused(tmp_path):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        save_model(GaussianMixture(2), tmp_path / "m.npz")
    with pytest.raises(NotFittedError):
        to_sklearn(GaussianMixture(2))
    assert not (tmp_path / "m.npz").exists()


@pytest.fixture(scope="module")
def fitted(data):
    return GaussianMixture(3, random_state=0).fit(data)


@pytest.fixture
def saved(tmp_path, fitted):
    path = tmp_path / "m.npz"
    save_model(fitted, path)
    return path


def test_newer_format_version_is_refused(saved):
    rewrite(saved, edit_meta=lambda m: m.update(format_version=FORMAT_VERSION + 1, dgmm_version="9.0"))
    with pytest.raises(ModelFormatError, match=r"written by a newer dgmm \('9.0', model format 2\).*upgrade"):
        load_model(saved)


@pytest.mark.parametrize(
    "edit_meta, edit_arrays, message",
    [
        (lambda m: m.update(format="something-else"), None, "not a dgmm model file"),
        (lambda m: m.update(format_version="1"), None, "invalid model format_version"),
        (lambda m: m.update(covariance_type="banded"), None, "invalid covariance_type 'banded'"),
        (lambda m: m.update(n_components=4), None, r"'weights' has shape \(3,\), expected \(4,\)"),
        (lambda m: m.update(n_features=10**6), None, "implausibly large model"),
        (None, lambda a: a.update(means=a["means"].astype(np.int64)), "'means' has dtype int64"),
        (None, lambda a: a.update(weights=a["weights"] * 2), "'weights' must be non-negative and sum to 1"),
        (None, lambda a: a["means"].__setitem__((0, 0), np.nan), "'means' holds NaN or infinity"),
        (None, lambda a: a["covariances"].__setitem__(0, -np.eye(3)), "covariance of component 0 is not positive"),
        (None, lambda a: a["covariances"].__setitem__((1, 0, 1), 5.0), "covariance of component 1 is not symmetric"),
        (None, lambda a: a["precisions_cholesky"].__setitem__(2, np.eye(3)), "component 2 does not match"),
        (None, lambda a: a.pop("precisions_cholesky"), "no 'precisions_cholesky' array"),
        (lambda m: m["params"].update(tol=-1), None, "invalid stored parameters"),
        (lambda m: m["fitted"].update(feature_names=["a"]), None, "invalid feature_names"),
    ],
)
def test_inconsistent_files_are_refused_with_clear_errors(saved, edit_meta, edit_arrays, message):
    rewrite(saved, edit_meta, edit_arrays)
    with pytest.raises(ModelFormatError, match=message):
        load_model(saved)


def test_corrupt_or_foreign_files(tmp_path, saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="not a readable dgmm model file"):
        load_model(saved)
    np.savez(saved, weights=np.ones(2))
    with pytest.raises(ModelFormatError, match="no 'meta' entry"):
        load_model(saved)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(saved, "w") as z:
        z.writestr("meta.npy", buffer.getvalue())
    with pytest.raises(ModelFormatError, match="not a readable dgmm model file"):
        load_model(saved)  # an object array would need unpickling: refused
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_model(tmp_path / "missing.npz")


def test_failed_write_keeps_the_previous_model(tmp_path, data, fitted, monkeypatch):
    path = tmp_path / "m.npz"
    save_model(fitted, path)
    before = path.read_bytes()
    import dgmm.checkpoint as ck

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(from_sklearn(to_sklearn(fitted)), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.npz"]


#: Saves a model to ``argv[1]`` and is SIGKILLed after the temporary file is written, before the rename.
KILLED_WRITER = """
import os, signal, sys
import numpy as np
from dgmm import GaussianMixture, save_model
gm = GaussianMixture(2, random_state=0, max_iter=3).fit(np.random.default_rng(0).normal(size=(200, 2)))
print(os.getpid(), flush=True)
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
save_model(gm, sys.argv[1])
"""


def test_next_save_removes_the_temporary_file_of_a_killed_writer(tmp_path, fitted):
    path = tmp_path / "m.npz"
    save_model(fitted, path)
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (stale,) = [f for f in os.listdir(tmp_path) if f != "m.npz"]  # NAME.HOST.PID.TOKEN.tmp, whole but unrenamed
    _, _, host, dead_pid, token, _ = stale.split(".")
    assert stale == f"m.npz.{host}.{dead_pid}.{token}.tmp" and int(dead_pid) == killed_pid(killed)
    assert load_model(path).lower_bounds_ == fitted.lower_bounds_  # the previous model, whole
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as alive:
        try:
            kept = [f"m.npz.{host}.{alive.pid}.{token}.tmp",  # a writer still at work
                    f"m.npz.{host}-elsewhere.{dead_pid}.{token}.tmp",  # another host's process
                    f"other.npz.{host}.{dead_pid}.{token}.tmp",  # another file's
                    "m.npz.backup.tmp"]  # not a name the writer gives
            for name in kept:
                (tmp_path / name).write_bytes(b"partial")
            save_model(fitted, path)
            assert sorted(os.listdir(tmp_path)) == sorted(["m.npz", *kept])
        finally:
            alive.kill()
    loaded = load_model(path)
    for name in FITTED:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fitted, name), err_msg=name)


def killed_pid(result) -> int:
    """The pid KILLED_WRITER printed before it was killed."""
    return int(result.stdout.split()[0])
