"""``overwrite`` replaces only what dgmm wrote: never the input, the model, the config or the current directory."""

from __future__ import annotations

import os
import re

import dask.array as da
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from dgmm.config import ConfigError, parse_config
from dgmm.io import SUCCESS_MARKER, is_complete, replace_refusal, write_table
from cli_helpers import blobs, run_dgmm, write_config


def tree(path):
    """Every file under ``path`` with its bytes: what a refused command must leave as it was."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


@pytest.fixture
def lake(tmp_path, monkeypatch):
    """A working directory with a Zarr input, a Parquet input directory, a model file and a user's folder."""
    from dgmm import GaussianMixture, save_model

    X = blobs(300, 2)
    zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=X.shape, chunks=(100, 2), dtype="f8")[:] = X
    (tmp_path / "table").mkdir()
    pq.write_table(pa.table({"a": X[:, 0], "b": X[:, 1]}), tmp_path / "table" / "part-0.parquet")
    (tmp_path / "results").mkdir()
    save_model(GaussianMixture(2, random_state=0).fit(X), tmp_path / "results" / "model.npz")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("not dgmm's")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config(**predict):
    return {"input": {"path": "in.zarr"}, "model": {"n_components": 2}, "cluster": {"type": "threads"},
            "output": {"model": "results/model.npz"},
            "predict": {"output": "p.zarr", "format": "zarr", "overwrite": True, **predict}}


@pytest.mark.parametrize(
    "predict, message",
    [
        ({"output": "."}, "predict.output: . would replace the current directory"),
        ({"output": ".."}, "predict.output: .. would replace the current directory"),
        ({"output": "results"}, "predict.output: results would replace the model (output.model: results/model.npz)"),
        ({"output": "in.zarr"}, "predict.output: in.zarr would replace the input (input.path: in.zarr)"),
        ({"output": "in.zarr/p.zarr"}, "predict.output: in.zarr/p.zarr lies inside the input (input.path: in.zarr)"),
        ({"output": "mine"}, ("predict.output: mine is not an output dgmm wrote (it has no dgmm completion marker); "
                              "dgmm replaces only its own outputs")),
        ({"output": "results/model.npz"}, "would replace the model"),
        ({"output": "table/p.zarr"}, None),  # a path inside another directory is fine
    ],
)
def test_predict_outputs_that_would_destroy_something_are_config_errors(lake, predict, message):
    if message is None:
        assert parse_config(config(**predict), command="predict").predict.output == predict["output"]
        return
    with pytest.raises(ConfigError, match="^<config>: .*" + re.escape(message)):
        parse_config(config(**predict), command="predict")


def test_predict_output_inside_a_parquet_input_is_refused(lake):
    raw = config(output="table/predictions.parquet")
    raw["input"] = {"path": "table"}
    with pytest.raises(ConfigError, match="table/predictions.parquet lies inside the input"):
        parse_config(raw, command="predict")  # its part files would be read as data by the next fit


def test_fit_model_path_over_the_input_or_a_directory_is_a_config_error(lake):
    np.save(lake / "x.npy", blobs(50, 2))
    raw = {"input": {"path": "x.npy"}, "output": {"model": "x.npy", "overwrite": True}}
    with pytest.raises(ConfigError, match=r"output.model: x.npy would replace the input \(input.path: x.npy\)"):
        parse_config(raw, command="fit")
    raw["output"]["model"] = "results"
    with pytest.raises(ConfigError, match="output.model: results is a directory; name the model file, e.g. "
                                          "results/model.npz"):
        parse_config(raw, command="fit")
    raw["output"]["model"] = "results/model.npz"  # an existing model file is replaced when asked
    assert parse_config(raw, command="fit").output.model == "results/model.npz"


def test_dgmm_predict_into_the_current_directory_exits_2_and_deletes_nothing(lake):
    """The report's case: ``predict.output: .`` with overwrite used to empty the directory."""
    work = lake / "work"
    work.mkdir()
    (work / "a.txt").write_text("keep")
    path = write_config(lake / "c.yaml", {**config(output=".", format="parquet"),
                                          "input": {"path": str(lake / "in.zarr")},
                                          "output": {"model": str(lake / "results" / "model.npz")}})
    before = tree(lake)
    result = run_dgmm("predict", path, cwd=work)
    assert result.returncode == 2, result.stderr
    assert "predict.output: . would replace the current directory" in result.stderr
    assert result.stdout == "" and tree(lake) == before
    result = run_dgmm("fit", path, "--set", f"output.model={lake / 'results'}", "--set", "output.overwrite=true")
    assert result.returncode == 2 and "is a directory; name the model file" in result.stderr
    assert tree(lake) == before and not list(lake.glob("*checkpoint*"))


def test_write_table_replaces_only_outputs_dgmm_wrote(lake):
    arrays = {"labels": da.arange(10, chunks=5)}
    with pytest.raises(FileExistsError, match="mine is not an output dgmm wrote"):
        write_table(arrays, "mine", format="zarr", overwrite=True)
    assert (lake / "mine" / "keep.txt").read_text() == "not dgmm's"
    with pytest.raises(FileExistsError, match="is the current directory or holds it"):
        write_table(arrays, str(lake), format="parquet", overwrite=True)
    with pytest.raises(FileExistsError, match="results/model.npz is a file, not an output dgmm wrote"):
        write_table(arrays, "results/model.npz", format="zarr", overwrite=True)
    assert replace_refusal("nothing-here") is None and replace_refusal("empty") is None
    write_table(arrays, "empty", format="zarr", overwrite=True)  # an empty directory holds nothing to lose
    assert is_complete("empty") and not (lake / "empty" / SUCCESS_MARKER).exists()  # Zarr: the marker is in the attributes
    write_table({"labels": da.arange(4, chunks=2)}, "empty", format="zarr", overwrite=True)  # dgmm's own output
    np.testing.assert_array_equal(zarr.open_group("empty", mode="r")["labels"][:], np.arange(4))
    assert not [p for p in os.listdir(lake) if "staging" in p]  # nothing staged was left behind


def test_select_table_may_not_replace_the_input_config_or_model(lake):
    from dgmm.config import check_extra_output

    parsed = parse_config(config(), command="predict")
    for path, message in (("in.zarr", "would replace the input"), ("results/model.npz", "would replace the model"),
                          ("in.zarr/bic.csv", "lies inside the input"), ("results", "is a directory"),
                          ("empty", "is a directory")):
        with pytest.raises(ConfigError, match=f"--table: {re.escape(path)} .*{message}|--table: .*{message}"):
            check_extra_output(parsed, "--table", path)
    assert check_extra_output(parsed, "--table", "results/bic.csv") == "results/bic.csv"  # beside the model is fine
    assert check_extra_output(parsed, "--table", f"file://{lake / 'bic.csv'}") == str(lake / "bic.csv")
    with pytest.raises(ConfigError, match="--table: cannot write /proc/bic.csv: /proc refuses new "
                                          "files"):  # os.access says yes to root: a real try says no
        check_extra_output(parsed, "--table", "/proc/bic.csv")
    path = write_config(lake / "c.yaml", {"input": {"path": "in.zarr"}, "model": {"n_components": 2},
                                          "cluster": {"type": "threads"}, "output": {"model": "best.npz"}})
    before = tree(lake)
    result = run_dgmm("select", path, "--n-components", "1:2", "--table", "c.yaml", cwd=lake)
    assert result.returncode == 2 and "--table: c.yaml would replace the config file" in result.stderr
    assert tree(lake) == before


def test_dgmm_check_for_a_command_runs_that_commands_output_checks(lake):
    """``dgmm check`` alone validates the config; ``--for predict`` also refuses what ``dgmm predict`` would."""
    path = write_config(lake / "c.yaml", config(output="mine"))
    plain = run_dgmm("check", path)
    assert plain.returncode == 0 and "valid" in plain.stdout, plain.stderr
    for command in ("predict", "score"):
        checked = run_dgmm("check", path, "--for", command)
        if command == "predict":
            assert checked.returncode == 2 and "predict.output: mine is not an output dgmm wrote" in checked.stderr
        else:  # score writes nothing; its model exists
            assert checked.returncode == 0 and "valid for 'dgmm score'" in checked.stdout, checked.stderr
    fit = run_dgmm("check", path, "--for", "fit")  # the model exists and output.overwrite is not set
    assert fit.returncode == 2 and "output.model: results/model.npz exists" in fit.stderr
    select = run_dgmm("check", path, "--for", "select", "--set", "output.overwrite=true")
    assert select.returncode == 0 and "valid for 'dgmm select'" in select.stdout, select.stderr
    assert tree(lake / "mine") == {"keep.txt": b"not dgmm's"}


@pytest.mark.parametrize(
    "checkpoint, message",
    [
        ("results/model.npz", "output.checkpoint: results/model.npz would replace the model (output.model: "
                              "results/best.npz)"),
        ("in.zarr", "output.checkpoint: in.zarr would replace the input (input.path: in.zarr)"),
        ("c.yaml", "output.checkpoint: c.yaml would replace the config file c.yaml"),
        ("empty", "output.checkpoint: the checkpoint empty is a directory; name the checkpoint file, e.g. "
                  "empty/fit.checkpoint.npz"),
        ("mine/keep.txt", "output.checkpoint: the checkpoint mine/keep.txt exists and is not a readable dgmm "
                          "checkpoint (BadZipFile: File is not a zip file); dgmm replaces its checkpoint"),
    ],
)
def test_a_checkpoint_path_over_the_model_input_config_or_another_file_is_a_config_error(lake, checkpoint, message):
    """The checkpoint is replaced while fitting and removed at the end: named as the model, the input or the config
    file, `dgmm fit` used to write over it, then delete it, and exit 0."""
    raw = {"input": {"path": "in.zarr"}, "model": {"n_components": 2, "max_iter": 2}, "cluster": {"type": "threads"},
           "output": {"model": "results/best.npz", "checkpoint": checkpoint}}
    if checkpoint == "results/model.npz":
        raw["output"]["model"] = "results/model.npz"
        raw["output"]["overwrite"] = True
        message = message.replace("results/best.npz", "results/model.npz")
    write_config(lake / "c.yaml", raw)
    before = tree(lake)
    result = run_dgmm("fit", "c.yaml", cwd=lake)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert f"dgmm: error: c.yaml: {message}" in result.stderr
    assert tree(lake) == before


def test_a_checkpoint_of_an_earlier_fit_may_be_replaced_and_python_fits_refuse_other_files(lake):
    from dgmm import GaussianMixture

    X = blobs(300, 2)
    GaussianMixture(2, max_iter=2, checkpoint="results/fit.ckpt").fit(X)  # any name: the contents say what it is
    raw = {"input": {"path": "in.zarr"}, "output": {"model": "results/new.npz", "checkpoint": "results/fit.ckpt"}}
    assert parse_config(raw, command="fit").output.checkpoint == "results/fit.ckpt"
    with pytest.raises(ValueError, match="checkpoint results/model.npz is a file but not a dgmm checkpoint"):
        GaussianMixture(2, checkpoint="results/model.npz").fit(X)
    with pytest.raises(ValueError, match="checkpoint empty is a directory"):
        GaussianMixture(2, checkpoint="empty").fit(X)
    assert tree(lake / "mine") == {"keep.txt": b"not dgmm's"} and os.listdir(lake / "empty") == []


def test_select_table_is_replaced_only_with_overwrite_and_written_after_the_model(lake):
    from dgmm.model_io import read_model_metadata

    (lake / "notes.csv").write_text("precious")
    path = write_config(lake / "c.yaml", {"input": {"path": "in.zarr"}, "model": {"n_components": 1},
                                          "cluster": {"type": "threads"}, "output": {"model": "best.npz"}})
    args = ("select", path, "--n-components", "1:2", "--covariance-types", "diag,full")
    refused = run_dgmm(*args, "--table", "notes.csv", cwd=lake)
    assert refused.returncode == 2 and (f"--table: notes.csv exists; set output.overwrite: true "
                                        "(--set output.overwrite=true) or choose another path") in refused.stderr
    assert (lake / "notes.csv").read_text() == "precious" and not (lake / "best.npz").exists()
    unwritable = run_dgmm(*args, "--table", "results/model.npz/bic.csv", cwd=lake)
    assert unwritable.returncode == 2 and "is a file, not a directory" in unwritable.stderr
    done = run_dgmm(*args, "--table", "notes.csv", "--set", "output.overwrite=true", cwd=lake)
    assert done.returncode == 0, done.stderr
    assert (lake / "notes.csv").read_text().startswith("n_components,covariance_type")
    # the stored config fits the chosen model (not the config's n_components: 1 / 'full'), without a checkpoint
    meta = read_model_metadata(lake / "best.npz")
    fitted = meta["fit"]["config"]
    assert (fitted["model"]["n_components"], fitted["model"]["covariance_type"]) == \
        (meta["n_components"], meta["covariance_type"]) != (1, "full")
    assert fitted["output"]["checkpoint"] is None and fitted["output"]["checkpoint_every"] == 0
    assert meta["fit"]["grid"] == {"n_components": [1, 2], "covariance_types": ["diag", "full"]}
