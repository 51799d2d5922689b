"""s3:// inputs and outputs against a local S3 endpoint (moto's server mode on 127.0.0.1)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from dgmm import GaussianMixture, load_model
from cli_helpers import blobs, run_dgmm, write_config

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

BUCKET = "dgmm-test"
MODEL = {"n_components": 3, "random_state": 0, "tol": 1e-6, "covariance_type": "diag"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port; yields the endpoint URL. Credentials are fake, from env."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp = pytest.MonkeyPatch()
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_SESSION_TOKEN", "testing")):
        mp.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_CONFIG_FILE", str(tmp_path_factory.mktemp("aws") / "none"))
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield endpoint
    finally:
        server.stop()
        mp.undo()


def test_fit_zarr_from_s3_on_a_local_cluster(tmp_path, s3):
    import zarr

    X = blobs(2000, 3, seed=9)
    options = {"endpoint_url": s3}
    z = zarr.open_array(f"s3://{BUCKET}/x.zarr", mode="w", shape=X.shape, chunks=(333, 3), dtype="f8",
                        storage_options=options)
    z[:] = X
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": f"s3://{BUCKET}/x.zarr", "storage_options": options},
        "model": MODEL,
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
        "output": {"model": str(tmp_path / "model.npz")},
    })
    assert "secret" not in (tmp_path / "c.yaml").read_text().lower()
    fit = run_dgmm("fit", config)
    assert fit.returncode == 0, fit.stderr
    assert f"data: s3://{BUCKET}/x.zarr (2,000 rows x 3 features, 7 chunks" in fit.stdout
    assert "Unclosed" not in fit.stderr, fit.stderr  # aiohttp's sessions left open by s3fs at the workers' exit
    expected = GaussianMixture(**MODEL).fit(X)
    np.testing.assert_allclose(load_model(tmp_path / "model.npz").means_, expected.means_, rtol=1e-10)


def test_fit_parquet_from_s3_and_predict_to_s3(tmp_path, s3):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    X = blobs(1800, 2, seed=10)
    options = {"endpoint_url": s3}
    fs = s3fs.S3FileSystem(endpoint_url=s3, skip_instance_cache=True)
    table = pa.table({"id": np.arange(len(X)) + 2**60, "a": X[:, 0], "b": X[:, 1]})
    for i, (start, stop) in enumerate(((0, 1000), (1000, 1800))):
        with fs.open(f"{BUCKET}/table/part-{i}.parquet", "wb") as f:
            pq.write_table(table.slice(start, stop - start), f, row_group_size=250)
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": f"s3://{BUCKET}/table", "format": "parquet", "columns": ["a", "b"],
                  "storage_options": options},
        "model": MODEL,
        "cluster": {"type": "threads"},
        "output": {"model": f"s3://{BUCKET}/models/m.npz", "storage_options": options},
        "predict": {"output": f"s3://{BUCKET}/pred.parquet", "log_likelihood": True, "storage_options": options,
                    "keep_columns": ["id"]},
    })
    fit = run_dgmm("fit", config)
    assert fit.returncode == 0, fit.stderr
    assert "8 chunks" in fit.stdout
    model = load_model(f"s3://{BUCKET}/models/m.npz", storage_options=options)
    expected = GaussianMixture(**MODEL).fit(X)
    np.testing.assert_allclose(model.means_, expected.means_, rtol=1e-10)

    predict = run_dgmm("predict", config)
    assert predict.returncode == 0, predict.stderr
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/pred.parquet"))
    assert names == ["_SUCCESS", "part-00000.parquet"]  # the 8 input chunks of 250 rows are small: one part
    assert not [p for p in fs.ls(BUCKET) if "staging" in p]
    frames = []
    for name in names[1:]:
        with fs.open(f"{BUCKET}/pred.parquet/{name}", "rb") as f:
            frames.append(pd.read_parquet(f))
    frame = pd.concat(frames)
    np.testing.assert_array_equal(frame["label"].to_numpy(), expected.predict(X))
    np.testing.assert_array_equal(frame["id"].to_numpy(), np.arange(len(X)) + 2**60)  # kept, read from the store
    np.testing.assert_allclose(frame["log_likelihood"].to_numpy(), expected.score_samples(X), rtol=1e-9)

    # the model on the store, with the endpoint as a flag
    info = run_dgmm("info", f"s3://{BUCKET}/models/m.npz", "--storage-option", f"endpoint_url={s3}")
    assert info.returncode == 0 and "features: a, b" in info.stdout, info.stderr
    sample = run_dgmm("sample", f"s3://{BUCKET}/models/m.npz", "-n", 3, "--storage-option", f"endpoint_url={s3}")
    assert sample.returncode == 0 and sample.stdout.splitlines()[0] == "a,b,label", sample.stderr
    # a Zarr prediction on the store opens in xarray: its metadata document (consolidated) is committed last
    import xarray as xr

    zarr_out = run_dgmm("predict", config, "--set", f"predict.output=s3://{BUCKET}/pred.zarr",
                        "--set", "predict.keep_columns=null")
    assert zarr_out.returncode == 0, zarr_out.stderr
    ds = xr.open_zarr(f"s3://{BUCKET}/pred.zarr", storage_options=options)
    np.testing.assert_array_equal(ds["labels"].values, expected.predict(X))
    assert ds.attrs["dgmm"]["n_rows"] == len(X)

    # what the command refuses on the store before any cluster starts (exit 2, nothing written)
    listing = sorted(fs.find(BUCKET))
    again = run_dgmm("fit", config, "--set", "model.n_components=2")
    assert again.returncode == 2 and again.stdout == ""
    assert f"output.model: s3://{BUCKET}/models/m.npz exists; set output.overwrite: true" in again.stderr
    inside = run_dgmm("predict", config, "--set", f"predict.output=s3://{BUCKET}/table/p.parquet")
    assert inside.returncode == 2 and "lies inside the input" in inside.stderr
    exists = run_dgmm("predict", config)
    assert exists.returncode == 2 and "pred.parquet exists; set predict.overwrite: true" in exists.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket is closed
    unreachable = run_dgmm("fit", config, "--set", f"output.model=s3://{BUCKET}/models/n.npz",
                           "--set", f"output.storage_options={{endpoint_url: '{closed}'}}")
    assert unreachable.returncode == 2 and unreachable.stdout == ""  # before the fit, not after it
    assert f"output.model: cannot reach s3://{BUCKET}/models/n.npz (" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    fs.invalidate_cache()
    assert sorted(fs.find(BUCKET)) == listing


def test_an_unreachable_store_is_one_error_line_not_a_traceback(tmp_path, s3):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = run_dgmm("info", f"s3://{BUCKET}/models/none.npz", env={"AWS_ENDPOINT_URL": closed,
                                                                     "AWS_MAX_ATTEMPTS": "1"})
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("dgmm: error: ") and "Traceback" not in result.stderr, result.stderr
    assert "127.0.0.1" in result.stderr  # the store's own message says where it could not connect


def test_object_store_outputs_are_checked_before_any_work(tmp_path, s3):
    """A mistyped bucket was created by the writer; a model over a dataset 'folder' clobbered it; a bucket root
    as the model failed after the whole fit. All are config errors before any cluster starts."""
    options = {"endpoint_url": s3}
    fs = s3fs.S3FileSystem(endpoint_url=s3, skip_instance_cache=True)
    fs.pipe_file(f"{BUCKET}/dataset.parquet/part-0.parquet", b"not really")
    np.save(tmp_path / "x.npy", blobs(500, 2))
    GaussianMixture(2, random_state=0).fit(np.load(tmp_path / "x.npy"))
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy")}, "model": {"n_components": 2},
        "cluster": {"type": "threads"}, "output": {"model": str(tmp_path / "m.npz"), "storage_options": options},
        "predict": {"output": f"s3://{BUCKET}/p.zarr", "storage_options": options},
    })
    cases = {
        "s3://no-such-bucket-x/m.npz": "output.model: s3://no-such-bucket-x/m.npz: the bucket 'no-such-bucket-x' "
                                       "does not exist (dgmm does not create buckets)",
        f"s3://{BUCKET}/dataset.parquet": f"output.model: s3://{BUCKET}/dataset.parquet is a folder of objects; "
                                          "name the model file",
        f"s3://{BUCKET}": f"output.model: s3://{BUCKET} names a bucket, not an object in it; e.g. "
                          f"s3://{BUCKET}/model.npz",
    }
    for model, message in cases.items():
        for command in (["check", config, "--for", "fit"], ["fit", config]):
            result = run_dgmm(*command, "--set", f"output.model={model}", "--set", "output.overwrite=true")
            assert result.returncode == 2 and message in result.stderr, (command, result.stderr)
    assert fs.cat_file(f"{BUCKET}/dataset.parquet/part-0.parquet") == b"not really"
    assert run_dgmm("fit", config).returncode == 0
    missing = run_dgmm("predict", config, "--set", f"input.path=s3://{BUCKET}/nope.zarr",
                       "--set", f"input.storage_options={{endpoint_url: '{s3}'}}")
    assert missing.returncode == 2 and f"input.path: s3://{BUCKET}/nope.zarr" in missing.stderr, missing.stderr
    for command in ("check", "predict"):
        args = ["--for", "predict"] if command == "check" else []
        result = run_dgmm(command, config, *args, "--set", "predict.output=s3://typo-bucket-y/p.zarr")
        assert result.returncode == 2, result.stderr
        assert "predict.output: s3://typo-bucket-y/p.zarr: the bucket 'typo-bucket-y' does not exist" in result.stderr
    fs.invalidate_cache()
    assert not fs.exists("typo-bucket-y") and not fs.exists("no-such-bucket-x")
    assert not [p for p in fs.find(BUCKET) if "write-probe" in p]  # the write probes are removed


def test_sample_writes_to_an_object_store(tmp_path, s3):
    import zarr

    fs = s3fs.S3FileSystem(endpoint_url=s3, skip_instance_cache=True)
    gm = GaussianMixture(2, random_state=0).fit(blobs(400, 3))
    from dgmm import save_model

    save_model(gm, tmp_path / "m.npz")
    for name in ("s.npy", "s.zarr"):
        result = run_dgmm("sample", str(tmp_path / "m.npz"), "-n", "50", "-o", f"s3://{BUCKET}/samples/{name}",
                          "--storage-option", f"endpoint_url={s3}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert not (tmp_path / "s3:").exists()  # not a local folder named after the URL
    fs.invalidate_cache()
    with fs.open(f"{BUCKET}/samples/s.npy", "rb") as f:
        assert np.load(f).shape == (50, 3)
    group = zarr.open_group(f"s3://{BUCKET}/samples/s.zarr", mode="r", storage_options={"endpoint_url": s3})
    assert group["X"].shape == (50, 3) and group["labels"].shape == (50,)
    again = run_dgmm("sample", str(tmp_path / "m.npz"), "-o", f"s3://{BUCKET}/samples/s.npy",
                     "--storage-option", f"endpoint_url={s3}")
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
    for name in ("s.npy", "s.zarr"):  # a mistyped bucket: a usage error naming it, for every format
        typo = run_dgmm("sample", str(tmp_path / "m.npz"), "-o", f"s3://no-such-bucket-z/{name}",
                        "--storage-option", f"endpoint_url={s3}")
        assert typo.returncode == 2 and f"-o: s3://no-such-bucket-z/{name}: the bucket 'no-such-bucket-z' does not " \
            "exist" in typo.stderr, typo.stderr
    assert not fs.exists("no-such-bucket-z")


def test_a_model_the_store_refuses_at_the_end_of_a_fit_is_kept_locally(tmp_path, monkeypatch):
    from dgmm.cli import _save_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.chdir(tmp_path)
    gm = GaussianMixture(2, random_state=0).fit(blobs(300, 2))
    with pytest.raises(OSError, match=r"cannot write the model to s3://b/m\.npz \(.*\); the model was saved to "
                                      r".*dgmm-unsaved-model-.*\.npz instead"):
        _save_model(gm, "s3://b/m.npz", {"n_samples": 300}, {"endpoint_url": closed})
    (rescued,) = tmp_path.glob("dgmm-unsaved-model-*.npz")
    np.testing.assert_array_equal(load_model(rescued).means_, gm.means_)


def test_a_store_lost_while_reading_zarr_is_not_called_a_corrupt_chunk(tmp_path, monkeypatch):
    """The endpoint going away mid-read raised botocore's EndpointConnectionError, which the Zarr block reader
    reported as 'a chunk is corrupt or truncated: rewrite the data': advice to destroy good data."""
    import dask
    import zarr

    from dgmm.io import is_storage_error, open_zarr

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    try:
        s3fs.S3FileSystem(skip_instance_cache=True, **options).mkdir("lost")
        z = zarr.open_array("s3://lost/x.zarr", mode="w", shape=(100, 2), chunks=(25, 2), dtype="f8",
                            storage_options=options)
        z[:] = 1.0
        X = open_zarr("s3://lost/x.zarr", storage_options=options)
    finally:
        server.stop()
    with dask.config.set(scheduler="sync"), pytest.raises(Exception) as caught:
        X.sum().compute()
    assert is_storage_error(caught.value) or isinstance(caught.value, OSError), repr(caught.value)
    assert "corrupt" not in str(caught.value)
