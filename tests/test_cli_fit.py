"""`dgmm fit / predict / score / info / sample` end to end on Zarr and Parquet files, in subprocesses."""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from dgmm import GaussianMixture, load_model
from dgmm.model_io import read_model_metadata
from dgmm.io import open_input
from conftest import assert_same_model
from cli_helpers import blobs, json_lines, run_dgmm, write_config

MODEL = {"n_components": 3, "covariance_type": "full", "random_state": 0, "tol": 1e-6, "max_iter": 50}

# the LocalCluster's own settings do not apply to the threaded scheduler (a config error)
THREADS = ("--set", "cluster.type=threads", "--set", "cluster.n_workers=null", "--set",
           "cluster.threads_per_worker=null")


def in_process_fit(X, **overrides):
    return GaussianMixture(**{**MODEL, **overrides}).fit(X)


@pytest.fixture(scope="module")
def zarr_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("zarr")
    X = blobs(3000, 3, seed=1)
    z = zarr.open_array(str(root / "x.zarr"), mode="w", shape=X.shape, chunks=(437, 3), dtype="f8")
    z[:] = X
    return root / "x.zarr", X


def test_fit_predict_score_info_from_zarr_on_a_local_cluster(tmp_path, zarr_data):
    path, X = zarr_data
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(path)},
        "model": MODEL,
        "cluster": {"n_workers": 2, "threads_per_worker": 1},
        "output": {"model": str(tmp_path / "out" / "model.npz"), "checkpoint_every": 2},
        "predict": {"output": str(tmp_path / "out" / "pred.zarr"), "probabilities": True, "log_likelihood": True},
    })
    fit = run_dgmm("fit", config)
    assert fit.returncode == 0, fit.stderr
    assert "LocalCluster with 2 worker processes" in fit.stdout
    assert "iteration    1  lower bound" in fit.stdout and "s/iter" in fit.stdout and "rows/s" in fit.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["model.npz"]  # the checkpoint is gone once the model is there
    model = load_model(tmp_path / "out" / "model.npz")
    expected = in_process_fit(da.from_zarr(str(path)))
    assert_same_model(model, expected, atol=1e-12, history=False)
    assert model.n_iter_ == expected.n_iter_

    predict = run_dgmm("predict", config, *THREADS)  # (on a cluster: test_cli_cluster)
    assert predict.returncode == 0, predict.stderr
    assert "predictions:" in predict.stdout and "3,000 rows" in predict.stdout
    group = zarr.open_group(str(tmp_path / "out" / "pred.zarr"), mode="r")
    assert group["labels"].shape == (3000,) and group["probabilities"].shape == (3000, 3)
    np.testing.assert_array_equal(group["labels"][:], expected.predict(X))
    np.testing.assert_allclose(group["probabilities"][:], expected.predict_proba(X), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(group["log_likelihood"][:], expected.score_samples(X), rtol=1e-9)
    assert [c.cname.value for c in group["labels"].compressors] == ["zstd"]  # Blosc-zstd for labels
    assert [c.cname.value for c in group["probabilities"].compressors] == ["lz4"]  # Blosc-LZ4 for floats
    plain = run_dgmm("predict", config, *THREADS, "--set", "predict.overwrite=true",
                     "--set", "predict.compressor=none", "--quiet")
    assert plain.returncode == 0, plain.stderr
    group = zarr.open_group(str(tmp_path / "out" / "pred.zarr"), mode="r")
    assert group["labels"].compressors == () and group["probabilities"].compressors == ()
    np.testing.assert_array_equal(group["labels"][:], expected.predict(X))

    score = run_dgmm("score", config, *THREADS, "--log-format", "json")
    assert score.returncode == 0, score.stderr
    (line,) = [e for e in json_lines(score.stdout) if e["event"] == "score"]
    assert line["score"] == pytest.approx(expected.score(X), rel=1e-9)
    assert line["bic"] == pytest.approx(expected.bic(X), rel=1e-9)

    info = run_dgmm("info", tmp_path / "out" / "model.npz")
    assert info.returncode == 0, info.stderr
    assert "3 components, full covariances, 3 features" in info.stdout and str(path) in info.stdout


@pytest.fixture(scope="module")
def parquet_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    X = blobs(2500, 2, seed=2)
    table = pa.table({"id": np.arange(len(X)), "x": X[:, 0], "y": X[:, 1], "tag": ["a"] * len(X)})
    os.makedirs(root / "table.parquet")
    pq.write_table(table.slice(0, 1500), root / "table.parquet" / "part-0.parquet", row_group_size=400)
    pq.write_table(table.slice(1500), root / "table.parquet" / "part-1.parquet", row_group_size=333)
    return root / "table.parquet", X


@pytest.mark.parametrize("predict_format", ["parquet", "zarr"])
def test_fit_and_predict_from_parquet(tmp_path, parquet_data, predict_format):
    path, X = parquet_data
    out = tmp_path / f"pred.{predict_format}"
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(path), "columns": ["x", "y"]},
        "model": {**MODEL, "covariance_type": "diag"},
        "cluster": {"type": "threads"},
        "output": {"model": str(tmp_path / "model.npz")},
        "predict": {"output": str(out), "labels": True, "log_likelihood": True},
    })
    fit = run_dgmm("fit", config, "--log-format", "json")
    assert fit.returncode == 0, fit.stderr
    events = json_lines(fit.stdout)
    data_event = next(e for e in events if e["event"] == "data")
    assert data_event["n_samples"] == 2500 and data_event["n_chunks"] == 8
    iterations = [e for e in events if e["event"] == "iteration"]
    assert [e["n_iter"] for e in iterations] == list(range(1, len(iterations) + 1))
    assert all(e["rows_per_second"] > 0 and e["seconds"] >= 0 for e in iterations)
    assert iterations[0]["change"] is None and iterations[-1]["converged"]
    expected = in_process_fit(open_input(str(path), columns=["x", "y"]), covariance_type="diag")
    model = load_model(tmp_path / "model.npz")
    assert_same_model(model, expected, atol=1e-12, history=False)

    predict = run_dgmm("predict", config, "--quiet")
    assert predict.returncode == 0, predict.stderr
    assert predict.stdout == ""
    if predict_format == "parquet":
        frame = pd.read_parquet(out)
        labels, ll = frame["label"].to_numpy(), frame["log_likelihood"].to_numpy()
        assert list(frame.columns) == ["label", "log_likelihood"]
    else:
        group = zarr.open_group(str(out), mode="r")
        labels, ll = group["labels"][:], group["log_likelihood"][:]
    assert len(labels) == len(X)
    np.testing.assert_array_equal(labels, expected.predict(X))
    np.testing.assert_allclose(ll, expected.score_samples(X), rtol=1e-9)
    again = run_dgmm("predict", config)
    assert again.returncode == 2 and "predict.output" in again.stderr and "exists" in again.stderr


def test_parquet_column_names_travel_with_the_model(tmp_path, parquet_data):
    """fit records the columns it read; info and sample show them; predict and score read them by name."""
    path, X = parquet_data
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(path)},  # every numeric column: id, x, y
        "model": MODEL,
        "cluster": {"type": "threads"},
        "output": {"model": str(tmp_path / "model.npz")},
        "predict": {"output": str(tmp_path / "pred.parquet"), "log_likelihood": True},
    })
    fit = run_dgmm("fit", config)
    assert fit.returncode == 0, fit.stderr
    assert "columns: id, x, y (every numeric column; input.columns chooses others)" in fit.stdout
    meta = read_model_metadata(tmp_path / "model.npz")
    assert meta["fit"]["source"]["feature_names"] == ["id", "x", "y"] and meta["fit"]["source"]["columns"] is None
    # loaded in Python, it knows its feature names as a DataFrame fit does: a reordered frame is refused
    loaded = load_model(tmp_path / "model.npz")
    np.testing.assert_array_equal(loaded.feature_names_in_, ["id", "x", "y"])
    frame = pd.DataFrame({"id": np.arange(len(X)), "x": X[:, 0], "y": X[:, 1]})
    np.testing.assert_array_equal(loaded.predict(frame), loaded.predict(frame.to_numpy()))
    with pytest.raises(ValueError, match="feature names"):
        loaded.predict(frame[["y", "x", "id"]])
    info = run_dgmm("info", tmp_path / "model.npz")
    assert "features: id, x, y" in info.stdout, info.stdout
    csv = run_dgmm("sample", tmp_path / "model.npz", "-n", 2)
    assert csv.stdout.splitlines()[0] == "id,x,y,label", csv.stdout
    assert run_dgmm("sample", tmp_path / "model.npz", "-n", 5, "-o", tmp_path / "s.zarr").returncode == 0
    samples = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert samples["X"].metadata.dimension_names == ("sample", "feature") and samples["X"].shape == (5, 3)
    assert samples.attrs["dgmm"]["attributes"]["feature_names"] == ["id", "x", "y"]
    # a newer table: columns reordered, one more numeric column, strings between
    full = np.column_stack([np.arange(len(X)), X])
    newer = tmp_path / "newer.parquet"
    pq.write_table(pa.table({"y": X[:, 1], "score": np.ones(len(X)), "tag": ["b"] * len(X), "x": X[:, 0],
                             "id": np.arange(len(X))}), newer, row_group_size=1000)
    model = load_model(tmp_path / "model.npz")
    predict = run_dgmm("predict", config, "--set", f"input.path={newer}")
    assert predict.returncode == 0, predict.stderr
    assert "the model's columns id, x, y" in predict.stdout
    frame = pd.read_parquet(tmp_path / "pred.parquet")
    np.testing.assert_array_equal(frame["label"].to_numpy(), model.predict(full))
    np.testing.assert_allclose(frame["log_likelihood"].to_numpy(), model.score_samples(full), rtol=1e-12)
    score = run_dgmm("score", config, "--set", f"input.path={newer}", "--log-format", "json")
    (result,) = [e for e in json_lines(score.stdout) if e["event"] == "score"]
    np.testing.assert_allclose(result["score"], model.score(full), rtol=1e-12)
    # a table without one of the model's columns: a config error naming them
    pq.write_table(pa.table({"x": X[:, 0], "y": X[:, 1]}), tmp_path / "short.parquet")
    short = run_dgmm("score", config, "--set", f"input.path={tmp_path / 'short.parquet'}")
    assert short.returncode == 2
    check = run_dgmm("check", config, "--for", "score", "--set", f"input.path={tmp_path / 'short.parquet'}")
    assert check.returncode == 2 and "was fitted on the columns id, x, y" in check.stderr
    assert "column 'id' not found" in short.stderr and "was fitted on the columns id, x, y" in short.stderr
    # a model fitted in Python on a DataFrame: its feature_names_in_ pick the columns, and sklearn has nothing
    # to warn of ("X does not have valid feature names")
    from dgmm import save_model

    frame = pd.DataFrame({"y": X[:, 1], "x": X[:, 0]})
    save_model(GaussianMixture(3, random_state=0).fit(frame), tmp_path / "frame.npz")
    score = run_dgmm("score", config, "--set", f"input.path={newer}", "--set", f"output.model={tmp_path / 'frame.npz'}",
                     "--log-format", "json")
    assert score.returncode == 0 and "warning" not in score.stderr, score.stderr
    (result,) = [e for e in json_lines(score.stdout) if e["event"] == "score"]
    np.testing.assert_allclose(result["score"], load_model(tmp_path / "frame.npz").score(frame), rtol=1e-12)


def test_sample_and_info_json(tmp_path):
    X = blobs(600, 2, seed=3)
    model_path = tmp_path / "m.npz"
    from dgmm import save_model

    save_model(in_process_fit(X, max_iter=20), model_path, metadata={"seconds": 1.0})
    for name in ("s.npy", "s.parquet"):
        result = run_dgmm("sample", model_path, "-n", 250, "-o", tmp_path / name, "--seed", 3)
        assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "s.npy").shape == (250, 2)
    frame = pd.read_parquet(tmp_path / "s.parquet")
    assert list(frame.columns) == ["x0", "x1", "label"] and len(frame) == 250
    np.testing.assert_array_equal(frame[["x0", "x1"]].to_numpy(), np.load(tmp_path / "s.npy"))
    csv = run_dgmm("sample", model_path, "-n", 5)
    assert csv.returncode == 0 and csv.stdout.splitlines()[0] == "x0,x1,label" and len(csv.stdout.splitlines()) == 6
    quiet = run_dgmm("info", model_path, "--quiet")  # --quiet silences progress, not a command's result
    assert quiet.returncode == 0 and "3 components, full covariances, 2 features" in quiet.stdout
    info = run_dgmm("info", model_path, "--log-format", "json")
    (entry,) = json_lines(info.stdout)
    assert entry["metadata"]["format"] == "dgmm-model" and len(entry["weights"]) == 3


def test_quiet_keeps_results_and_warnings_are_one_line(tmp_path):
    """``score -q`` prints the score; a library warning is 'dgmm: warning: Category: message', no file or source."""
    X = (blobs(300, 3, seed=4) > 0).astype(np.float64)  # 8 distinct rows: components collapse onto duplicates
    zarr.create_array(str(tmp_path / "b.zarr"), data=X, chunks=(100, 3))
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "b.zarr")}, "model": {"n_components": 6, "random_state": 0},
        "cluster": {"type": "threads"}, "output": {"model": str(tmp_path / "m.npz")},
    })
    fit = run_dgmm("fit", config, "--quiet")
    assert fit.returncode == 0 and fit.stdout == "", fit.stderr
    lines = fit.stderr.splitlines()
    assert lines and all(line.startswith("dgmm: warning: DegenerateComponentWarning: Gaussian mixture component")
                         for line in lines), fit.stderr
    assert ".py:" not in fit.stderr
    score = run_dgmm("score", config, "--quiet")
    assert score.returncode == 0 and score.stdout.startswith("score (mean log-likelihood per row): ")
    assert "data:" not in score.stdout and "cluster:" not in score.stdout


def test_predict_keeps_input_columns_to_join_by(tmp_path, monkeypatch):
    """predict.keep_columns copies Parquet columns as they are, row by row, with their Arrow types.

    Nullable int64 ids past 2**53, time zones, dictionaries, decimals, and a
    bool column null in the whole first part (its type must not be guessed
    from the values, or the parts disagree and the output cannot be read).
    """
    import decimal

    import dask.dataframe as dd
    from dask.utils import natural_sort_key

    X = blobs(3000, 2, seed=5)
    n = len(X)
    ids = pd.array([None] + list(range(1, n)), dtype="Int64") * 10**13 + 2**60
    frame = pd.DataFrame({"user": [f"u{i}" for i in range(n)], "id": ids,
                          "ts": pd.date_range("2026-01-01", periods=n, freq="min", tz="Europe/Paris"),
                          "kind": pd.Categorical(["x", "y", "z"] * (n // 3)),
                          "price": [decimal.Decimal(f"{i}.25") for i in range(n)],
                          "flag": pd.array([None] * 1500 + [True] * (n - 1500), dtype="boolean"),
                          "a": X[:, 0], "b": X[:, 1]})
    dd.from_pandas(frame, npartitions=11, sort=False).to_parquet(tmp_path / "t.parquet", write_index=False)
    kept = ["user", "id", "ts", "kind", "price", "flag"]
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "t.parquet"), "columns": ["a", "b"]},
        "model": MODEL, "cluster": {"type": "threads"}, "output": {"model": str(tmp_path / "m.npz")},
        "predict": {"output": str(tmp_path / "p.parquet"), "keep_columns": kept, "log_likelihood": True},
    })
    assert run_dgmm("fit", config, "--quiet").returncode == 0
    from dgmm.io import parquet_columns, write_predictions

    for small_parts in (False, True):  # one part, then a part per input chunk (the bool all null in the first)
        if small_parts:  # in this process: Python's write_predictions, as the CLI calls it
            monkeypatch.setattr("dgmm.io.MIN_OUTPUT_CHUNK_BYTES", 0)
            path = str(tmp_path / "t.parquet")
            write_predictions(load_model(tmp_path / "m.npz"), open_input(path, columns=["a", "b"]),
                              str(tmp_path / "p.parquet"), format="parquet", log_likelihood=True, overwrite=True,
                              keep=parquet_columns(path, kept))
        else:
            predict = run_dgmm("predict", config)
            assert predict.returncode == 0, predict.stderr
        source = pq.read_table(tmp_path / "t.parquet", columns=kept)
        written = pq.read_table(tmp_path / "p.parquet")  # every part has the input's types, or this fails
        assert written.schema.names == [*kept, "label", "log_likelihood"]
        for name in kept:
            assert written.schema.field(name).type == source.schema.field(name).type, name
        files = sorted(os.listdir(tmp_path / "t.parquet"), key=natural_sort_key)  # dask's order of the parts
        expected = pa.concat_tables([pq.read_table(tmp_path / "t.parquet" / f, columns=kept) for f in files])
        assert written.select(kept).equals(expected.replace_schema_metadata(written.select(kept).schema.metadata))
        assert len([p for p in os.listdir(tmp_path / "p.parquet") if p.endswith(".parquet")]) == (
            11 if small_parts else 1)
    out = written.to_pandas()
    table = dd.read_parquet(tmp_path / "t.parquet").compute().reset_index(drop=True)
    model = load_model(tmp_path / "m.npz")
    np.testing.assert_array_equal(out["label"].to_numpy(), model.predict(table[["a", "b"]].to_numpy()))
    # without key columns, rows join by position only, and pandas orders part.10 before part.2: a warning
    assert "dask's file order" not in predict.stderr
    positional = run_dgmm("predict", config, "--set", "predict.keep_columns=null", "--set", "predict.overwrite=true")
    assert positional.returncode == 0, positional.stderr
    assert (f"dgmm: warning: {tmp_path / 't.parquet'}: rows are predicted in dask's file order (part.2.parquet "
            "before part.10.parquet), which pandas.read_parquet and pyarrow do not follow: join the predictions to "
            "the input by a key column (predict.keep_columns)") in positional.stderr
    # settings that cannot work are config errors, before anything is written
    for override, message in [
        ("predict.keep_columns=[nope]", "predict.keep_columns: " + str(tmp_path / "t.parquet") + ": column 'nope' "
                                        "not found"),
        ("predict.keep_columns=[label]", "predict.keep_columns: 'label' is the name of a prediction column"),
        (f"predict.output={tmp_path / 'p.zarr'}", "predict.keep_columns: copies Parquet columns to a Parquet output"),
    ]:
        bad = run_dgmm("predict", config, "--set", override, "--set", "predict.overwrite=true")
        assert bad.returncode == 2 and message in bad.stderr, (override, bad.stderr)
        check = run_dgmm("check", config, "--for", "predict", "--set", override, "--set", "predict.overwrite=true")
        assert check.returncode == 2 and message in check.stderr, (override, check.stderr)  # found by check too
    assert not (tmp_path / "p.zarr").exists()


def test_file_urls_name_local_outputs_and_a_generated_input(tmp_path):
    """`output.model: file:///abs/m.npz` was written under ./file:/abs/m.npz (and its checkpoint, named after it,
    refused as a URL after the data was read); a synthetic `file://` input failed after `dgmm check` passed it."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": f"file://{tmp_path / 'syn.zarr'}",
                  "synthetic": {"n_samples": 3000, "n_features": 2, "n_components": 2, "chunk_rows": 1000}},
        "model": {"n_components": 2, "random_state": 0, "max_iter": 3},
        "cluster": {"type": "threads"},
        "output": {"model": f"file://{tmp_path / 'out' / 'm.npz'}"}})
    result = run_dgmm("fit", config, cwd=work)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "m.npz").is_file() and (tmp_path / "syn.zarr").is_dir()
    assert os.listdir(work) == [] and sorted(os.listdir(tmp_path / "out")) == ["m.npz"]  # checkpoint removed
    info = run_dgmm("info", f"file://{tmp_path / 'out' / 'm.npz'}", cwd=work)
    assert info.returncode == 0 and "2 components, full covariances, 2 features" in info.stdout, info.stderr


def test_the_out_of_core_initialisation_reports_its_passes(tmp_path):
    """Out-of-core seeding passes (k-means‖ rounds, Lloyd passes, k-means++ passes) passed without a line."""
    np.save(tmp_path / "x.npy", blobs(20_000, 3, seed=5))
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy"), "chunk_rows": 2000},
        "model": {"n_components": 3, "random_state": 0, "max_iter": 2, "init_sample_size": 1000},
        "cluster": {"type": "threads"}, "output": {"model": str(tmp_path / "m.npz"), "overwrite": True}})
    result = run_dgmm("fit", config)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("init: ")]
    assert lines[0] == "init: 'kmeans' seeding of 1 mixture (1 distinct seeding), out of core", lines
    assert any(line.startswith("init: k-means|| round 1/") for line in lines), lines
    assert any(line.startswith("init: Lloyd pass 1 of at most ") for line in lines), lines
    assert result.stdout.index("init: ") < result.stdout.index("iteration    1")
    plusplus = run_dgmm("fit", config, "--set", "model.init_params=k-means++")
    assert "init: k-means++ pass 3 of 3" in plusplus.stdout, plusplus.stdout
    quiet = run_dgmm("fit", config, "--quiet")
    assert quiet.returncode == 0 and "init:" not in quiet.stdout


def test_a_zarr_group_input_is_opened_once(tmp_path, monkeypatch, dgmm_cli):
    """The command opened a Zarr group twice per input (the array, then again to name the array it picked): two
    metadata round trips on an object store. The array and its name now come from one open."""
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("features/table", shape=(1000, 3), chunks=(250, 3), dtype="f8")[:] = blobs(1000, 3, seed=2)
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "g.zarr")}, "model": {"n_components": 2, "max_iter": 2},
        "cluster": {"type": "threads"}, "output": {"model": str(tmp_path / "m.npz")}})
    opened = []
    real_open = zarr.open

    def counted(*args, **kwargs):
        opened.append(kwargs.get("store"))
        return real_open(*args, **kwargs)

    monkeypatch.setattr(zarr, "open", counted)
    status, stdout, stderr = dgmm_cli("fit", config)
    assert status == 0, stderr
    assert "array 'features/table' (the group's one 2-D array)" in stdout
    assert opened == [str(tmp_path / "g.zarr")]
