"""Readers open Zarr / Parquet / .npy lazily with known chunks; writers stage, then commit."""

from __future__ import annotations

import contextlib
import os
import re

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

from dgmm import GaussianMixture
from dgmm.io import SUCCESS_MARKER, InputSelectionError, is_complete, open_input, write_predictions, write_table, zarr_compressors
from conftest import make_mixture


@pytest.fixture(scope="module")
def X():
    return make_mixture(n_samples=1000, n_features=3, seed=11)


def no_compute(*args, **kwargs):
    raise AssertionError("opening an input must not compute")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_array_by_path(tmp_path, X, zarr_format):
    path = tmp_path / "x.zarr"
    z = zarr.open_array(str(path), mode="w", shape=X.shape, chunks=(137, 3), dtype="f8", zarr_format=zarr_format)
    z[:] = X
    with dask.config.set(scheduler=no_compute):
        A = open_input(str(path))
    assert A.chunks[0][:2] == (137, 137) and A.chunks[1] == (3,)
    np.testing.assert_array_equal(A.compute(), X)


def test_zarr_array_inside_a_group(tmp_path, X):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_group("features").create_array("table", shape=X.shape, chunks=(250, 3), dtype="f4")[:] = X
    group.create_array("ids", shape=(1000,), dtype="i8")
    A = open_input(str(tmp_path / "g.zarr"), component="features/table")
    assert A.dtype == np.float32 and A.numblocks == (4, 1)
    np.testing.assert_array_equal(A.compute(), X.astype(np.float32))
    assert open_input(str(tmp_path / "g.zarr")).shape == X.shape  # the only 2-D array is used
    from dgmm.io import zarr_component

    assert zarr_component(str(tmp_path / "g.zarr")) == "features/table"
    assert zarr_component(str(tmp_path / "g.zarr"), component="features/table") == "features/table"
    group.create_array("other", shape=(5, 2), dtype="f8")
    with pytest.raises(ValueError, match=r"is a Zarr group, not an array; set input.component .*'features/table'"):
        open_input(str(tmp_path / "g.zarr"))
    # a component that names nothing, or an array that is not a table: the setting's fault (exit 2), with the choices
    with pytest.raises(InputSelectionError, match=r"no array 'nope' in the Zarr group; set input.component to one "
                                                  r"of its 2-D arrays \('features/table', 'other'\)"):
        open_input(str(tmp_path / "g.zarr"), component="nope")
    with pytest.raises(InputSelectionError, match=r"the array 'ids' has shape \(1000,\), not \(n_samples, "
                                                  r"n_features\); set input.component .*'features/table', 'other'"):
        open_input(str(tmp_path / "g.zarr"), component="ids")
    with pytest.raises(FileNotFoundError, match="no Zarr array or group there"):
        open_input(str(tmp_path / "missing.zarr"), component="nope")
    zarr.open_array(str(tmp_path / "cube.zarr"), mode="w", shape=(4, 3, 2), dtype="f8")
    with pytest.raises(ValueError, match=r"shape \(4, 3, 2\); dgmm needs a 2-D array"):  # the data's fault
        open_input(str(tmp_path / "cube.zarr"))


def test_parquet_parts_are_read_in_dasks_order(tmp_path, X):
    """dask writes part.0 ... part.11 unpadded; rows line up with dask.dataframe.read_parquet (part.2 before part.10)."""
    import dask.dataframe as dd

    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    dd.from_pandas(frame, npartitions=12, sort=False).to_parquet(tmp_path / "t.parquet")
    assert "part.10.parquet" in os.listdir(tmp_path / "t.parquet")
    A = open_input(str(tmp_path / "t.parquet"))
    np.testing.assert_array_equal(A.compute(), X)
    np.testing.assert_array_equal(A.compute(), dd.read_parquet(tmp_path / "t.parquet").compute().to_numpy())
    # Hive partition keys live in directory names, not in the files: asked for, they are named as such
    frame.assign(day=np.arange(len(X)) % 2).to_parquet(tmp_path / "hive.parquet", partition_cols=["day"])
    with pytest.raises(ValueError, match=r"'day' is a Hive partition key \(in the directory names, not in the "
                                         r"files\), which dgmm does not read"):
        open_input(str(tmp_path / "hive.parquet"), columns=["a", "day"])
    # a pandas index written as a column (dask's __null_dask_index__ above, a named or filtered index) is not data
    frame.assign(id=np.arange(len(X))).set_index("id").to_parquet(tmp_path / "named.parquet")
    frame[frame["a"] > 0].to_parquet(tmp_path / "filtered.parquet")
    assert open_input(str(tmp_path / "named.parquet")).shape == X.shape
    assert open_input(str(tmp_path / "filtered.parquet")).shape == ((X[:, 0] > 0).sum(), 3)


def test_parquet_row_groups_become_chunks_from_the_footer(tmp_path, X):
    table = pa.table({"a": X[:, 0], "b": X[:, 1].astype(np.float32), "name": ["r"] * len(X), "c": X[:, 2],
                      "n": np.arange(len(X))})
    pq.write_table(table.slice(0, 600), tmp_path / "part-0.parquet", row_group_size=137)
    os.makedirs(tmp_path / "_tmp")
    pq.write_table(table.slice(600), tmp_path / "part-1.parquet", row_group_size=300)
    (tmp_path / "_SUCCESS").write_text("")
    with dask.config.set(scheduler=no_compute):
        A = open_input(str(tmp_path), format="parquet", columns=["a", "b", "c"])
    assert A.chunks[0] == (137, 137, 137, 137, 52, 300, 100)
    assert A.dtype == np.float64
    np.testing.assert_array_equal(A.compute(), np.column_stack([X[:, 0], X[:, 1].astype(np.float32), X[:, 2]]))
    # every numeric column by default, row groups merged up to chunk_rows within a file
    B = open_input(str(tmp_path / "part-0.parquet"), chunk_rows=300)
    assert B.shape == (600, 4) and B.chunks[0] == (274, 274, 52)
    np.testing.assert_array_equal(B[:, 3].compute(), np.arange(600))
    with pytest.raises(ValueError, match="column 'name' has type string, not a number"):
        open_input(str(tmp_path), format="parquet", columns=["a", "name"])
    with pytest.raises(ValueError, match="column 'zz' not found in"):
        open_input(str(tmp_path), format="parquet", columns=["zz"])


def test_a_row_group_too_large_for_a_chunk_is_named_with_a_fix(tmp_path, monkeypatch, caplog):
    import dgmm.io

    monkeypatch.setattr(dgmm.io, "LARGE_PARQUET_CHUNK_BYTES", 10_000)  # 625 rows of 2 float64 columns
    table = pa.table({"a": np.arange(2000.0), "b": np.ones(2000)})
    pq.write_table(table, tmp_path / "small.parquet", row_group_size=500)
    pq.write_table(table, tmp_path / "one.parquet", row_group_size=2000)
    with caplog.at_level("WARNING", logger="dgmm.io"):
        assert open_input(str(tmp_path / "small.parquet")).chunks[0] == (500,) * 4
        assert open_input(str(tmp_path / "small.parquet"), chunk_rows=2000).chunks[0] == (2000,)  # asked for
        assert not caplog.records
        assert open_input(str(tmp_path / "one.parquet")).chunks[0] == (2000,)
    (record,) = caplog.records
    assert "row group 0 of" in record.message and "has 2,000 rows (31.25 kiB as float64), read as one chunk" \
        in record.message and "row_group_size=156)" in record.message, record.message


def test_parquet_directory_footers_are_read_concurrently_in_file_order(tmp_path, monkeypatch):
    import threading
    import time

    import dgmm.io

    n_files = 40
    for i in range(n_files):  # files of i + 1 rows whose values say which file and row they are
        rows = np.arange(i + 1, dtype=np.float64)
        pq.write_table(pa.table({"file": np.full(i + 1, float(i)), "row": rows}), tmp_path / f"p-{i:03d}.parquet")
    threads, lock, in_flight = set(), threading.Lock(), [0, 0]  # threads; footers being read now, most at once

    class Recording(pq.ParquetFile):
        @property
        def metadata(self):  # a footer that takes 20 ms to arrive, as from an object store
            with lock:
                threads.add(threading.get_ident())
                in_flight[0] += 1
                in_flight[1] = max(in_flight)
            time.sleep(0.02)
            with lock:
                in_flight[0] -= 1
            return super().metadata

    monkeypatch.setattr(pq, "ParquetFile", Recording)
    start = time.perf_counter()
    with dask.config.set(scheduler=no_compute):
        A = open_input(str(tmp_path), format="parquet")
    elapsed = time.perf_counter() - start
    assert A.chunks[0] == tuple(range(1, n_files + 1))  # sorted file order, every footer's row count
    assert threading.get_ident() not in threads and in_flight[1] == dgmm.io.FOOTER_READERS
    assert elapsed < n_files * 0.02 / 2  # 0.8 s one after another
    monkeypatch.undo()
    values = A.compute()
    np.testing.assert_array_equal(values[:, 0], np.repeat(np.arange(n_files), np.arange(1, n_files + 1)))
    np.testing.assert_array_equal(values[:, 1], np.concatenate([np.arange(i + 1) for i in range(n_files)]))
    # two unreadable files: the error names the first in the files' order, whichever thread fails first
    for i in (7, 30):
        data = (tmp_path / f"p-{i:03d}.parquet").read_bytes()
        (tmp_path / f"p-{i:03d}.parquet").write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"p-007\.parquet is not a readable Parquet file"):
        open_input(str(tmp_path), format="parquet")


def test_parquet_layouts_of_upstream_tools_are_read_row_for_row(tmp_path, X):
    """Layouts upstream tools write: .parq files (dask's suffix) beside .parquet ones (the .parq rows
    were dropped silently), a 0-row file without columns (pandas' empty frame; it was "column not
    found"), and int64 values beyond 2**53 (rounded as NumPy's astype rounds them, as pandas input is
    fitted; it was pyarrow's ArrowInvalid)."""
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    frame["a"] = np.arange(len(X), dtype=np.int64) * 3_000_000_000_000_001 - 2**62  # beyond 2**53
    (tmp_path / "lake").mkdir()
    frame.iloc[:100].to_parquet(tmp_path / "lake" / "part.0.parquet")
    pd.DataFrame().to_parquet(tmp_path / "lake" / "part.1.parquet")
    frame.iloc[100:].to_parquet(tmp_path / "lake" / "part.2.parq")
    expected = frame.to_numpy(dtype=np.float64)
    A = open_input(str(tmp_path / "lake"))
    assert A.shape == X.shape
    np.testing.assert_array_equal(A.compute(), expected)
    np.testing.assert_array_equal(A.compute()[:, 0], frame["a"].to_numpy().astype(np.float64))
    (tmp_path / "parq").mkdir()
    frame.to_parquet(tmp_path / "parq" / "only.parq")  # a directory of .parq files only: found by auto
    np.testing.assert_array_equal(open_input(str(tmp_path / "parq")).compute(), expected)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_cf_encoded_zarr_is_decoded_as_xarray_decodes_it(tmp_path, zarr_format):
    """xarray's packed encoding (int16 with scale_factor, add_offset and a _FillValue for NaN) was read
    as the raw integers: a model 1000x too large, with the sentinel -32768 fitted as data."""
    xr = pytest.importorskip("xarray")
    X = make_mixture(n_samples=1000, n_features=3, seed=2)
    X[[10, 20], 0] = np.nan
    path = str(tmp_path / "packed.zarr")
    xr.Dataset({"f": (("s", "v"), X)}).to_zarr(path, mode="w", zarr_format=zarr_format, encoding={
        "f": {"dtype": "int16", "scale_factor": 0.001, "add_offset": 1.0, "_FillValue": -32768}})
    expected = xr.open_zarr(path)["f"].values
    assert np.isnan(expected[[10, 20], 0]).all() and np.nanmax(np.abs(expected - X)) < 0.001
    A = open_input(path)  # the group's one 2-D array
    assert A.dtype == np.float64
    np.testing.assert_array_equal(A.compute(), expected)
    with pytest.raises(ValueError, match=r"2 of 1000 rows have non-finite values \(first at row 10\)"):
        GaussianMixture(2).fit(A)
    # arrays without CF attributes are read as stored: an int array's fill value 0 is a value
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(6, 2), dtype="i2", fill_value=0,
                              zarr_format=zarr_format)
    plain[:] = np.arange(12).reshape(6, 2)
    np.testing.assert_array_equal(open_input(str(tmp_path / "plain.zarr")).compute(), np.arange(12).reshape(6, 2))


def test_missing_zarr_chunks_are_named_in_a_warning(tmp_path, X, caplog):
    """A chunk missing from the store reads as the fill value: an interrupted copy was fitted as zeros
    (a component at the origin holding the lost rows) with no more than a degenerate-component warning."""
    import logging

    z = zarr.create_array(str(tmp_path / "x.zarr"), shape=X.shape, chunks=(100, 3), dtype="f8")
    z[:] = X
    with caplog.at_level(logging.WARNING, logger="dgmm"):
        open_input(str(tmp_path / "x.zarr"))
    assert "chunks are not in the store" not in caplog.text
    os.remove(tmp_path / "x.zarr" / "c" / "2" / "0")
    os.remove(tmp_path / "x.zarr" / "c" / "4" / "0")
    with caplog.at_level(logging.WARNING, logger="dgmm"):
        A = open_input(str(tmp_path / "x.zarr"))
    assert (f"x.zarr: 2 of {A.numblocks[0]} chunks are not in the store and are read as the fill value 0.0; an "
            "interrupted copy or upload leaves such gaps") in caplog.text
    assert (A[200:300].compute() == 0).all()


def test_tiny_zarr_chunks_are_read_several_to_a_task(tmp_path, monkeypatch):
    """10-row chunks were a task each: an iteration 16x slower than in 1,000-row chunks. Merged chunks
    stay under MERGED_ZARR_CHUNK_BYTES and the array keeps MIN_ZARR_TASKS tasks (64) for the workers."""
    monkeypatch.setattr("dgmm.io.MIN_ZARR_CHUNK_BYTES", 16 * 2**10)  # the defaults (1 and 8 MiB), scaled down
    monkeypatch.setattr("dgmm.io.MERGED_ZARR_CHUNK_BYTES", 64 * 2**10)
    X = make_mixture(n_samples=5_007, n_features=4, seed=3)
    tiny = zarr.create_array(str(tmp_path / "tiny.zarr"), shape=X.shape, chunks=(10, 2), dtype="f8")
    tiny[:] = X  # 501 chunks of 10 rows x 4 columns (320 B)
    A = open_input(str(tmp_path / "tiny.zarr"))
    assert A.chunks == ((70,) * 71 + (37,), (2, 2))  # 7 chunks a task keeps 72 tasks
    np.testing.assert_array_equal(A.compute(), X)
    monkeypatch.setattr("dgmm.io.MERGED_ZARR_CHUNK_BYTES", 1024)
    assert open_input(str(tmp_path / "tiny.zarr")).chunks[0][0] == 30  # 3 chunks: 960 B of at most 1 KiB
    few = zarr.create_array(str(tmp_path / "few.zarr"), shape=X.shape, chunks=(100, 4), dtype="f8")
    few[:] = X  # 51 small chunks: fewer than 64 tasks already
    assert open_input(str(tmp_path / "few.zarr")).chunks[0] == (100,) * 50 + (7,)
    monkeypatch.setattr("dgmm.io.MIN_ZARR_CHUNK_BYTES", 256)
    big = zarr.create_array(str(tmp_path / "big.zarr"), shape=X.shape, chunks=(10, 4), dtype="f8")
    big[:] = X  # 320 B chunks over the (lowered) minimum are kept
    assert open_input(str(tmp_path / "big.zarr")).chunks[0][0] == 10


def test_parquet_nulls_become_nan_and_float32_stays(tmp_path):
    pq.write_table(pa.table({"x": pa.array([1.0, None, 3.0], pa.float32()), "y": pa.array([1, 2, None])}),
                   tmp_path / "t.parquet")
    A = open_input(str(tmp_path / "t.parquet"), columns=["x"])
    assert A.dtype == np.float32
    B = open_input(str(tmp_path / "t.parquet")).compute()
    assert np.isnan(B[1, 0]) and np.isnan(B[2, 1]) and B.dtype == np.float64


def test_parquet_decimal_columns_are_numbers(tmp_path):
    import decimal

    from dgmm.io import input_feature_names

    prices = pa.array([decimal.Decimal("1.25"), None, decimal.Decimal("-3.50")], pa.decimal128(10, 2))
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0], "price": prices, "name": ["a", "b", "c"]}), tmp_path / "d.parquet")
    A = open_input(str(tmp_path / "d.parquet")).compute()
    np.testing.assert_array_equal(A, [[1.0, 1.25], [2.0, np.nan], [3.0, -3.5]])
    assert input_feature_names(str(tmp_path / "d.parquet")) == ["x", "price"]


def test_npy_default_chunks_cut_a_mid_sized_file_for_several_workers(tmp_path, X, monkeypatch):
    """64 MiB chunks, but a file under 16 of them is cut into 16 chunks of at least the minimum."""
    import dgmm.io

    np.save(tmp_path / "x.npy", X)  # 1000 rows of 24 bytes
    monkeypatch.setattr(dgmm.io, "NPY_MIN_CHUNK_BYTES", 24 * 50)
    assert open_input(str(tmp_path / "x.npy")).chunks[0] == (62,) * 16 + (8,)  # 24,000 bytes / 16, in whole rows
    monkeypatch.setattr(dgmm.io, "NPY_MIN_CHUNK_BYTES", 24 * 100)
    assert open_input(str(tmp_path / "x.npy")).chunks[0] == (100,) * 10  # no chunk under the minimum
    monkeypatch.setattr(dgmm.io, "NPY_CHUNK_BYTES", 24 * 30)
    assert max(open_input(str(tmp_path / "x.npy")).chunks[0]) == 30  # nor over the maximum


def test_npy_is_memory_mapped_in_chunks(tmp_path, X):
    np.save(tmp_path / "x.npy", X)
    with dask.config.set(scheduler=no_compute):
        A = open_input(str(tmp_path / "x.npy"), chunk_rows=300)
    assert A.chunks[0] == (300, 300, 300, 100)
    np.testing.assert_array_equal(A.compute(), X)
    np.save(tmp_path / "f.npy", np.asfortranarray(X))
    np.testing.assert_array_equal(open_input(str(tmp_path / "f.npy")).compute(), X)
    np.save(tmp_path / "v.npy", X[:, 0])
    with pytest.raises(ValueError, match="dgmm needs a 2-D array"):
        open_input(str(tmp_path / "v.npy"))


def test_format_detected_without_suffix(tmp_path, X):
    np.save(tmp_path / "x.npy", X)
    os.rename(tmp_path / "x.npy", tmp_path / "plain")
    assert open_input(str(tmp_path / "plain")).shape == X.shape
    zarr.open_array(str(tmp_path / "z"), mode="w", shape=X.shape, dtype="f8")[:] = X
    assert open_input(str(tmp_path / "z")).shape == X.shape
    (tmp_path / "junk").write_text("hello")
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_input(str(tmp_path / "junk"))


def test_a_given_format_that_is_not_what_the_path_holds_names_input_format(tmp_path, X):
    """Each reader's own complaint ("Parquet magic bytes not found", "[Errno 21] Is a directory")
    used to be the error; now it names the setting and what the path holds."""
    np.save(tmp_path / "x.npy", X)
    zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=X.shape, dtype="f8")[:] = X
    pd.DataFrame(X, columns=["a", "b", "c"]).to_parquet(tmp_path / "x.parquet")
    names = {"zarr": "Zarr", "parquet": "Parquet", "npy": ".npy"}
    for held, held_name in names.items():
        path = str(tmp_path / f"x.{held}")
        for given, given_name in names.items():
            if given == held:
                assert open_input(path, format=given).shape == X.shape
                continue
            with pytest.raises(InputSelectionError, match=rf"holds {re.escape(held_name)} data, not "
                                                           rf"{re.escape(given_name)}; set input.format to "
                                                           rf"'{held}' or 'auto'") as caught:
                open_input(path, format=given)
            assert caught.value.key == "input.format"
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputSelectionError, match="plain is a directory, not a .npy file"):
        open_input(str(tmp_path / "plain"), format="npy")
    # zip files: a .npz archive is named as such; a zipped Zarr store gets the URL that opens it
    np.savez(tmp_path / "a.npz", X=X)
    store = zarr.storage.ZipStore(tmp_path / "z.zip", mode="w")
    zarr.create_array(store, shape=X.shape, dtype="f8", chunks=(100, 3))[:] = X
    store.close()
    for fmt in ("auto", "npy"):
        with pytest.raises(InputSelectionError, match=r"a.npz is a .npz archive, which dgmm does not read: save the "
                                                      r"array with numpy.save"):
            open_input(str(tmp_path / "a.npz"), format=fmt)
    for fmt in ("auto", "zarr"):
        with pytest.raises(InputSelectionError, match=r"z.zip is a zip file; a zipped Zarr store opens through "
                                                      r"fsspec's zip filesystem: input.path: zip://::file:///"):
            open_input(str(tmp_path / "z.zip"), format=fmt)
    np.testing.assert_array_equal(open_input(f"zip://::file://{tmp_path / 'z.zip'}").compute(), X)


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_predictions_are_row_aligned_and_committed(tmp_path, X, fmt, monkeypatch):
    monkeypatch.setattr("dgmm.io.MIN_OUTPUT_CHUNK_BYTES", 0)  # one output chunk per input chunk
    Xd = da.from_array(X, chunks=(137, 3))
    gm = GaussianMixture(3, random_state=0).fit(Xd)
    out = str(tmp_path / f"pred.{fmt}")
    marker = write_predictions(gm, Xd, out, format=fmt, probabilities=True, log_likelihood=True)
    assert marker["n_rows"] == len(X) and is_complete(out)
    assert sorted(os.listdir(tmp_path)) == [f"pred.{fmt}"]  # no staging left behind
    if fmt == "zarr":
        group = zarr.open_group(out, mode="r")
        labels, proba, ll = (group[n][:] for n in ("labels", "probabilities", "log_likelihood"))
        assert group["labels"].chunks == (137,)
        assert group.attrs["dgmm"]["n_rows"] == len(X)
    else:
        parts = sorted(p for p in os.listdir(out) if p.endswith(".parquet"))
        assert len(parts) == Xd.numblocks[0]
        frame = pd.read_parquet(out)
        assert list(frame.columns) == ["label", "probability_0", "probability_1", "probability_2", "log_likelihood"]
        labels, proba, ll = frame["label"].to_numpy(), frame.filter(like="probability").to_numpy(), \
            frame["log_likelihood"].to_numpy()
    np.testing.assert_array_equal(labels, gm.predict(X))
    np.testing.assert_allclose(proba, gm.predict_proba(X), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ll, gm.score_samples(X), rtol=1e-12)
    with pytest.raises(FileExistsError):
        write_predictions(gm, Xd, out, format=fmt)
    write_predictions(gm, Xd[:500], out, format=fmt, overwrite=True)
    assert write_table({"a": da.zeros(3)}, str(tmp_path / "small"), format=fmt)["n_rows"] == 3


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_an_overwrite_swaps_the_outputs_in_one_step(tmp_path, monkeypatch, fmt):
    """Linux swaps the new output for the old one with one renameat2(RENAME_EXCHANGE): the path never goes
    missing, as it did between two renames (a reader, or a kill -9 there, saw no output at all)."""
    from dgmm.io import rename_exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "inside").write_text("dir")
    b.write_text("file")
    assert rename_exchange(str(a), str(b)) and a.read_text() == "file" and (b / "inside").read_text() == "dir"
    assert not rename_exchange(str(a), str(tmp_path / "missing")) and a.read_text() == "file"
    out = str(tmp_path / f"out.{fmt}")
    write_table({"labels": da.arange(7, chunks=3)}, out, format=fmt)

    replace = os.replace

    def no_plain_rename(source, target, **kwargs):
        if os.fspath(target) == out or os.fspath(source) == out:
            raise AssertionError(f"os.replace({source}, {target}): the swap took two steps")
        return replace(source, target, **kwargs)

    monkeypatch.setattr(os, "replace", no_plain_rename)
    write_table({"labels": da.arange(5, chunks=3) * 10}, out, format=fmt, overwrite=True)
    monkeypatch.undo()
    if fmt == "zarr":
        np.testing.assert_array_equal(zarr.open_group(out, mode="r")["labels"][:], np.arange(5) * 10)
    else:
        np.testing.assert_array_equal(pd.read_parquet(out)["labels"].to_numpy(), np.arange(5) * 10)
    assert sorted(os.listdir(tmp_path)) == ["a", "b", f"out.{fmt}"]  # no staging, no old copy


def read_predictions(out, fmt):
    """Labels, probabilities and log-likelihoods of a Zarr or Parquet predictions output, as NumPy arrays."""
    if fmt == "zarr":
        group = zarr.open_group(out, mode="r")
        return tuple(group[n][:] for n in ("labels", "probabilities", "log_likelihood"))
    frame = pd.read_parquet(out)
    return (frame["label"].to_numpy(), frame.filter(like="probability").to_numpy(),
            frame["log_likelihood"].to_numpy())


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_nonfinite_rows_can_be_written_as_missing(tmp_path, X, fmt):
    """nonfinite='missing': label -1 and NaN where a row holds NaN or inf, the usual predictions elsewhere."""
    bad = X.copy()
    bad[[5, 400, 999], [1, 0, 2]] = [np.nan, np.inf, -np.inf]
    Xd = da.from_array(bad, chunks=(137, 3))
    gm = GaussianMixture(3, random_state=0).fit(X)
    with pytest.raises(ValueError, match=r"first at row (5|400|999)\b.*nonfinite=.missing."):
        write_predictions(gm, Xd, str(tmp_path / f"e.{fmt}"), format=fmt)
    assert not os.path.exists(tmp_path / f"e.{fmt}")
    out = str(tmp_path / f"m.{fmt}")
    write_predictions(gm, Xd, out, format=fmt, probabilities=True, log_likelihood=True, nonfinite="missing")
    labels, proba, ll = read_predictions(out, fmt)
    missing = np.zeros(len(X), dtype=bool)
    missing[[5, 400, 999]] = True
    assert labels.dtype == np.int64 and (labels[missing] == -1).all()
    assert np.isnan(proba[missing]).all() and np.isnan(ll[missing]).all()
    np.testing.assert_array_equal(labels[~missing], gm.predict(X[~missing]))
    np.testing.assert_allclose(proba[~missing], gm.predict_proba(X[~missing]), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ll[~missing], gm.score_samples(X[~missing]), rtol=1e-12)


@pytest.mark.parametrize("fmt, nonfinite, dtype", [
    ("zarr", "error", np.float64), ("parquet", "error", np.float64),
    ("zarr", "missing", np.float32), ("parquet", "missing", np.float32),
])
def test_all_three_outputs_take_one_e_step_per_chunk(tmp_path, X, fmt, nonfinite, dtype, monkeypatch):
    """Labels, probabilities and log-likelihoods written together compute each chunk's weighted
    log-probabilities once, not once per output, and equal predict / predict_proba / score_samples
    bit for bit (dtypes included; rows holding NaN marked missing as usual)."""
    import threading

    import dgmm.chunk

    data = X.astype(dtype)
    missing = np.zeros(len(X), dtype=bool)
    if nonfinite == "missing":
        missing[[5, 400]] = True
        data[missing, 1] = np.nan
    Xd = da.from_array(data, chunks=(137, 3))  # 8 chunks, the last ragged
    gm = GaussianMixture(3, random_state=0).fit(X.astype(dtype))
    weighted_log_prob, lock, calls = dgmm.chunk.weighted_log_prob, threading.Lock(), []

    def counted(block, *args, **kwargs):
        with lock:  # the threaded scheduler runs chunks at once
            calls.append(len(block))
        return weighted_log_prob(block, *args, **kwargs)

    monkeypatch.setattr(dgmm.chunk, "weighted_log_prob", counted)
    out = str(tmp_path / f"pred.{fmt}")
    with dask.config.set(scheduler="threads"):
        write_predictions(gm, Xd, out, format=fmt, probabilities=True, log_likelihood=True, nonfinite=nonfinite)
    assert sorted(calls) == sorted(Xd.chunks[0])  # one E-step per chunk (it was one per output)
    monkeypatch.undo()
    labels, proba, ll = read_predictions(out, fmt)
    clean = da.from_array(np.where(missing[:, None], 0, data), chunks=Xd.chunks)
    want_labels = np.where(missing, -1, gm.predict(clean).compute())
    want_proba = np.where(missing[:, None], np.nan, gm.predict_proba(clean).compute())
    want_ll = np.where(missing, np.nan, gm.score_samples(clean).compute())
    assert labels.dtype == np.int64 and proba.dtype == ll.dtype == want_proba.dtype == want_ll.dtype == dtype
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_array_equal(proba, want_proba)
    np.testing.assert_array_equal(ll, want_ll)


def test_small_input_chunks_are_merged_into_output_chunks_of_a_few_mib(tmp_path, X):
    """7-row input chunks: a few output chunks (files), not one per input chunk."""
    import dgmm.io

    Xd = da.from_array(np.tile(X, (40, 1)), chunks=(7, 3))  # 40,000 rows in 5,715 chunks
    gm = GaussianMixture(3, random_state=0).fit(X)
    for fmt in ("zarr", "parquet"):
        out = tmp_path / f"p.{fmt}"
        write_predictions(gm, Xd, str(out), format=fmt, probabilities=True)
        rows = -(-dgmm.io.MIN_OUTPUT_CHUNK_BYTES // (3 * 8))  # the widest array: 3 float64 probabilities a row
        if fmt == "zarr":
            group = zarr.open_group(str(out), mode="r")
            assert group["labels"].chunks == group["probabilities"].chunks[:1] == (min(rows, 40_000),)
            labels = group["labels"][:]
        else:
            assert len([p for p in os.listdir(out) if p.endswith(".parquet")]) == -(-40_000 // rows)
            labels = pd.read_parquet(out)["label"].to_numpy()
        np.testing.assert_array_equal(labels, gm.predict(np.tile(X, (40, 1))))


def test_irregular_chunks_are_written_to_regular_zarr_chunks(tmp_path):
    a = da.concatenate([da.arange(10, chunks=10), da.arange(7, chunks=7), da.arange(13, chunks=13)])
    write_table({"a": a, "b": da.ones((30, 2), chunks=((10, 7, 13), 2))}, str(tmp_path / "o.zarr"), format="zarr")
    group = zarr.open_group(str(tmp_path / "o.zarr"), mode="r")
    np.testing.assert_array_equal(group["a"][:], np.concatenate([np.arange(10), np.arange(7), np.arange(13)]))
    assert group["b"].shape == (30, 2)


def test_a_zarr_output_holds_only_what_zarr_knows(tmp_path):
    """Its completion marker is the group's ``dgmm`` attribute: listing members warns of no foreign key."""
    import warnings

    out = str(tmp_path / "o.zarr")
    write_table({"labels": da.arange(10, chunks=4), "p": da.ones((10, 2), chunks=4)}, out, format="zarr")
    assert sorted(os.listdir(out)) == ["labels", "p", "zarr.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(out, mode="r")
        assert sorted(group.array_keys()) == ["labels", "p"] and sorted(dict(group.members())) == ["labels", "p"]
    assert group.attrs["dgmm"]["n_rows"] == 10 and group.attrs["dgmm"]["seconds"] >= 0
    assert is_complete(out)
    # an output of an earlier dgmm, with a _SUCCESS file, is still dgmm's and may be replaced
    zarr.open_group(str(tmp_path / "old.zarr"), mode="w").create_array("labels", shape=(3,), dtype="i8")
    (tmp_path / "old.zarr" / SUCCESS_MARKER).write_text("{}")
    assert is_complete(str(tmp_path / "old.zarr"))
    write_table({"labels": da.arange(5, chunks=5)}, str(tmp_path / "old.zarr"), format="zarr", overwrite=True)
    assert zarr.open_group(str(tmp_path / "old.zarr"), mode="r")["labels"].shape == (5,)
    # a Zarr group dgmm did not write (no dgmm attribute) is not replaced
    zarr.open_group(str(tmp_path / "theirs.zarr"), mode="w").create_array("x", shape=(3,), dtype="i8")
    assert not is_complete(str(tmp_path / "theirs.zarr"))
    with pytest.raises(FileExistsError, match="not an output dgmm wrote"):
        write_table({"labels": da.arange(5, chunks=5)}, str(tmp_path / "theirs.zarr"), format="zarr", overwrite=True)


@contextlib.contextmanager
def copies_failing_after(monkeypatch, cut: int):
    """fsspec's in-memory filesystem whose ``copy`` (an object store's server-side copy) fails after ``cut`` copies."""
    from fsspec.implementations.memory import MemoryFileSystem

    copy, calls = MemoryFileSystem.copy, []

    def copy_then_die(self, *args, **kwargs):
        if len(calls) == cut:
            raise ConnectionError("killed mid-commit")
        calls.append(args)
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "copy", copy_then_die)
    try:
        yield
    finally:
        monkeypatch.setattr(MemoryFileSystem, "copy", copy)


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_an_object_store_commit_cut_short_never_looks_complete(monkeypatch, fmt):
    """On object stores the staged objects are copied one by one; the marker goes last.

    The commit is cut after each number of copies in turn (fsspec's in-memory
    filesystem, the code path of s3:// and gs://): the target must never be
    complete until every object is there.
    """
    import fsspec

    monkeypatch.setattr("dgmm.io.MIN_OUTPUT_CHUNK_BYTES", 0)  # several parts to cut between
    fs = fsspec.filesystem("memory")
    arrays = {"labels": da.arange(12, chunks=4), "p": da.ones((12, 2), chunks=4)}
    for cut in range(1, 100):
        url = f"memory://cut{fmt}{cut}/out"
        try:
            with copies_failing_after(monkeypatch, cut):
                write_table(arrays, url, format=fmt)
        except ConnectionError:
            assert not is_complete(url), f"complete after {cut} copies"
            continue
        break
    written = [p for p in fs.find(url) if not p.endswith(SUCCESS_MARKER)]
    assert cut == len(written) >= 3 and is_complete(url)  # every cut point was tried
    if fmt == "zarr":
        np.testing.assert_array_equal(zarr.open_group(url, mode="r")["labels"][:], np.arange(12))
    fs.rm("/", recursive=True)


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_an_object_store_overwrite_cut_short_loses_nothing_and_is_replaced_by_a_rerun(monkeypatch, fmt):
    """Replacing an output on an object store deletes the old objects before copying the new ones (no rename).

    A commit cut short at any point must leave an output that is not complete, that dgmm recognises as its
    own (so that overwrite may replace it: it refused it as "not an output dgmm wrote"), and the complete new
    output in its staging folder; a rerun replaces it and removes that staging copy.
    """
    import fsspec

    from dgmm.io import COMMITTING_MARKER, replace_refusal

    monkeypatch.setattr("dgmm.io.MIN_OUTPUT_CHUNK_BYTES", 0)
    fs = fsspec.filesystem("memory")
    old = {"labels": da.zeros(12, dtype=int, chunks=4)}
    new = {"labels": da.arange(12, chunks=4)}
    n_copies = None
    for cut in range(0, 100):
        url = f"memory://over{fmt}{cut}/out"
        write_table(old, url, format=fmt)
        try:
            with copies_failing_after(monkeypatch, cut):
                write_table(new, url, format=fmt, overwrite=True)
            n_copies = cut
        except ConnectionError:
            assert not is_complete(url), f"complete after {cut} copies"
            assert fs.exists(f"over{fmt}{cut}/out/{COMMITTING_MARKER}")
            assert replace_refusal(url) is None  # dgmm's own, replaceable
            (staging,) = [p for p in fs.ls(f"over{fmt}{cut}", detail=False) if "dgmm-staging" in p]
            assert len(fs.find(staging)) >= 3  # the complete new output was kept
        if n_copies is not None:
            break
        write_table(new, url, format=fmt, overwrite=True)  # the rerun
        assert is_complete(url) and not fs.exists(f"over{fmt}{cut}/out/{COMMITTING_MARKER}")
        assert fs.ls(f"over{fmt}{cut}", detail=False) == [f"/over{fmt}{cut}/out"]  # its staging copy removed
    assert n_copies >= 3 and is_complete(url)  # every cut point was tried
    labels = (zarr.open_group(url, mode="r")["labels"][:] if fmt == "zarr"
              else pd.concat([pd.read_parquet(fs.open(p)) for p in sorted(fs.find(url)) if p.endswith(".parquet")])
              ["labels"].to_numpy())
    np.testing.assert_array_equal(labels, np.arange(12))
    # someone else's objects appearing at the target while a write without overwrite runs are never deleted
    import dgmm.io

    commit = dgmm.io._commit

    def theirs_first(fs_, staging, root, *args, **kwargs):
        fs_.pipe_file(f"{root}/theirs.csv", b"a,b\n")
        return commit(fs_, staging, root, *args, **kwargs)

    monkeypatch.setattr(dgmm.io, "_commit", theirs_first)
    with pytest.raises(FileExistsError, match="appeared while writing; the new output is left at"):
        write_table(new, f"memory://race{fmt}/out", format=fmt)
    assert fs.cat_file(f"race{fmt}/out/theirs.csv") == b"a,b\n"
    assert [p for p in fs.ls(f"race{fmt}", detail=False) if "dgmm-staging" in p]
    fs.rm("/", recursive=True)


def test_an_object_store_commit_never_interleaves_with_a_live_one():
    """Two writers replacing one object-store output: the second used to take the first's marker for a cut-short
    commit, delete what it had copied and its staging folder, and leave a mixed output with a valid _SUCCESS."""
    import json
    import subprocess
    import sys
    import time

    import fsspec

    from dgmm.checkpoint import _host_tag
    from dgmm.io import COMMIT_LEASE_SECONDS, COMMITTING_MARKER

    fs = fsspec.filesystem("memory")
    old, new = {"labels": da.zeros(12, dtype=int, chunks=4)}, {"labels": da.arange(12, chunks=4)}
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        cases = [  # who wrote the marker found at the target, and whether that commit may still run
            ({"host": _host_tag(), "pid": alive.pid, "time": 0}, True),  # this host, a live process
            ({"host": _host_tag(), "pid": dead.pid, "time": time.time()}, False),  # this host, an ended one
            ({"host": "elsewhere", "pid": 1, "time": time.time()}, True),  # another host, refreshed just now
            ({"host": "elsewhere", "pid": 1, "time": time.time() - 2 * COMMIT_LEASE_SECONDS}, False),  # long ago
        ]
        for i, (record, live) in enumerate(cases):
            url, root, theirs = f"memory://live{i}/out", f"/live{i}/out", f"/live{i}/.out.dgmm-staging-elsewhere.1.a"
            write_table(old, url, format="parquet")
            fs.pipe_file(f"{theirs}/part-0.parquet", b"theirs")
            fs.pipe_file(f"{root}/{COMMITTING_MARKER}", json.dumps({**record, "staging": theirs}).encode())
            if live:
                with pytest.raises(FileExistsError, match="another dgmm write .* is committing its output there now; "
                                                          "the new output is left at"):
                    write_table(new, url, format="parquet", overwrite=True)
                assert fs.exists(f"{theirs}/part-0.parquet") and fs.exists(f"{root}/{SUCCESS_MARKER}"), i  # untouched
            else:
                write_table(new, url, format="parquet", overwrite=True)
                assert is_complete(url) and not fs.exists(f"{root}/{COMMITTING_MARKER}"), i
                assert fs.ls(f"/live{i}", detail=False) == [root], i  # the cut-short commit's staging copy removed
        # without overwrite, a target that appeared while writing is refused, whatever commit is in flight there
        import dgmm.io

        commit = dgmm.io._commit

        def marker_first(fs_, staging, root, *args, **kwargs):
            fs_.pipe_file(f"{root}/{COMMITTING_MARKER}", json.dumps(cases[0][0]).encode())
            return commit(fs_, staging, root, *args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dgmm.io, "_commit", marker_first)
            with pytest.raises(FileExistsError, match="appeared while writing"):
                write_table(new, "memory://race/out", format="parquet")
    finally:
        alive.kill()
        alive.wait()
        fs.rm("/", recursive=True)


def blosc(array):
    """(cname, clevel, shuffle) of a Zarr array's one Blosc compressor, in either format's codec class."""
    (codec,) = array.compressors
    if array.metadata.zarr_format == 3:
        return str(codec.cname.value), codec.clevel, str(codec.shuffle.value)
    return codec.cname, codec.clevel, {0: "noshuffle", 1: "shuffle", 2: "bitshuffle"}[codec.shuffle]


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_zarr_predictions_use_blosc_with_shuffle_and_round_trip_exactly(tmp_path, X, zarr_format):
    """Labels: Blosc-zstd 3; probabilities and log-likelihoods: Blosc-LZ4 5; byte shuffle; the values exact.

    The output opens in xarray as a Dataset without a warning: dimension names
    (v3 dimension_names, v2 _ARRAY_DIMENSIONS) and consolidated metadata.
    """
    import warnings

    import xarray as xr

    Xd = da.from_array(X, chunks=(137, 3))
    gm = GaussianMixture(3, random_state=0).fit(Xd)
    out = str(tmp_path / "pred.zarr")
    with zarr.config.set({"default_zarr_format": zarr_format}):
        write_predictions(gm, Xd, out, format="zarr", probabilities=True, log_likelihood=True)
    group = zarr.open_group(out, mode="r")
    assert group.metadata.zarr_format == zarr_format
    assert blosc(group["labels"]) == ("zstd", 3, "shuffle")
    assert blosc(group["probabilities"]) == blosc(group["log_likelihood"]) == ("lz4", 5, "shuffle")
    np.testing.assert_array_equal(group["labels"][:], gm.predict(X))
    np.testing.assert_array_equal(group["probabilities"][:], gm.predict_proba(Xd).compute())
    np.testing.assert_array_equal(group["log_likelihood"][:], gm.score_samples(Xd).compute())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(out)
    assert dict(ds.sizes) == {"sample": len(X), "component": 3}
    assert ds["probabilities"].dims == ("sample", "component") and ds["labels"].dims == ("sample",)
    assert ds.attrs["dgmm"]["n_rows"] == len(X) and is_complete(out)
    np.testing.assert_array_equal(ds["labels"].values, gm.predict(X))
    np.testing.assert_allclose(ds["log_likelihood"].values, gm.score_samples(X), rtol=1e-12)


@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("compressor, expected", [("blosc-zstd", ("zstd", 3, "shuffle")),
                                                  ("blosc-lz4", ("lz4", 5, "shuffle")), ("zstd", None), ("none", ())])
def test_zarr_compressor_can_be_chosen(tmp_path, zarr_format, compressor, expected):
    data = {"a": da.arange(1000, chunks=300), "b": da.random.default_rng(0).normal(size=(1000, 2), chunks=(300, 2))}
    out = str(tmp_path / "o.zarr")
    with zarr.config.set({"default_zarr_format": zarr_format}):
        write_table(data, out, format="zarr", compressor=compressor)
    group = zarr.open_group(out, mode="r")
    for name, array in data.items():
        if expected is None:  # zarr's own default: zstd level 0 (that is, 3) without shuffle
            ((codec,),) = [group[name].compressors]
            assert type(codec).__name__ in ("ZstdCodec", "Zstd") and codec.level == 0
        elif expected == ():
            assert group[name].compressors == ()
        else:
            assert blosc(group[name]) == expected
        np.testing.assert_array_equal(group[name][:], array.compute())


def test_unknown_or_parquet_compressor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown compressor 'gzip': use one of default, blosc-lz4"):
        write_table({"a": da.zeros(3)}, str(tmp_path / "o.zarr"), format="zarr", compressor="gzip")
    with pytest.raises(ValueError, match="applies to Zarr outputs"):
        write_table({"a": da.zeros(3)}, str(tmp_path / "o.parquet"), format="parquet", compressor="none")
    with pytest.raises(ValueError, match="unsupported Zarr format 4"):
        zarr_compressors("f8", zarr_format=4)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_synthetic_data_sets_use_blosc_lz4_with_shuffle(tmp_path, zarr_format):
    from dgmm.datasets import blobs, write_blobs_zarr

    path = write_blobs_zarr(tmp_path / "x.zarr", 1000, 3, chunk_rows=300, zarr_format=zarr_format)
    array = zarr.open_array(path, mode="r")
    assert array.metadata.zarr_format == zarr_format and blosc(array) == ("lz4", 5, "shuffle")
    np.testing.assert_array_equal(array[:], blobs(1000, 3, chunk_rows=300).compute())
    np.testing.assert_array_equal(open_input(path).compute(), array[:])
    plain = write_blobs_zarr(tmp_path / "plain.zarr", 1000, 3, chunk_rows=300, compressor="none")
    assert zarr.open_array(plain, mode="r").compressors == ()


def test_failed_write_leaves_nothing_that_looks_complete(tmp_path):
    def boom(block):
        if block[0] >= 20:
            raise RuntimeError("worker lost")
        return block

    bad = da.arange(40, chunks=10).map_blocks(boom, dtype=np.int64)
    for fmt in ("zarr", "parquet"):
        out = tmp_path / f"o.{fmt}"
        with pytest.raises(RuntimeError, match="worker lost"):
            write_table({"a": bad}, str(out), format=fmt)
        assert os.listdir(tmp_path) == [] or all(not p.startswith(f"o.{fmt}") for p in os.listdir(tmp_path))
        assert not (out / SUCCESS_MARKER).exists()
    assert os.listdir(tmp_path) == []


def test_a_write_sweeps_only_the_staging_that_dead_writers_on_this_host_left(tmp_path):
    import subprocess
    import sys

    from dgmm.checkpoint import _host_tag

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid, host = int(dead.stdout), _host_tag()
    names = {
        f".out.zarr.dgmm-staging-{host}.{dead_pid}.0123456789ab": False,  # a killed writer's: removed
        f".out.zarr.dgmm-staging-{host}.{dead_pid}.0123456789ab.old": False,  # the replaced output it left
        f".out.zarr.dgmm-staging-{host}.{os.getpid()}.0123456789ab": True,  # a live writer's (this process)
        f".out.zarr.dgmm-staging-other-host.{dead_pid}.0123456789ab": True,  # another host's: cannot tell
        f".other.zarr.dgmm-staging-{host}.{dead_pid}.0123456789ab": True,  # another target's
        "out.zarr.dgmm-staging-not-hidden": True,
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "part-0.parquet").write_bytes(b"x")
    write_table({"labels": da.arange(6, chunks=3)}, str(tmp_path / "out.zarr"), format="zarr")
    left = set(os.listdir(tmp_path))
    assert left == {"out.zarr", *(name for name, kept in names.items() if kept)}
    # swept before writing too: a write that fails again (a disk still full) no longer keeps what the
    # earlier failed attempt's tasks left after its own clean-up
    stale = tmp_path / f".out.zarr.dgmm-staging-{host}.{dead_pid}.fedcba987654"
    stale.mkdir()
    (stale / "labels").mkdir()

    def fail(block):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        write_table({"labels": da.arange(6, chunks=3).map_blocks(fail, dtype=np.int64)}, str(tmp_path / "out.zarr"),
                    format="zarr", overwrite=True)
    assert not stale.exists()
    assert set(os.listdir(tmp_path)) == left  # the failed write's own staging removed, the output kept


@pytest.mark.parametrize("empty", ["no columns", "another column"])
def test_the_feature_columns_of_a_parquet_directory_come_from_a_file_with_rows(tmp_path, empty):
    """An empty part.0 (a DataFrame with no rows) is skipped by the reader: its columns, none or others, are not
    the table's ('15,000 rows x 0 features', or "input.columns: column 'extra' not found" with no input.columns)."""
    from dgmm.io import input_feature_names

    table = tmp_path / "t.parquet"
    table.mkdir()
    frame = pd.DataFrame() if empty == "no columns" else pd.DataFrame({"extra": pd.Series([], dtype="float64")})
    frame.to_parquet(table / "part.0.parquet")
    X = np.random.default_rng(0).normal(size=(300, 3))
    for i in range(1, 4):
        pd.DataFrame(X[100 * (i - 1):100 * i], columns=["x0", "x1", "x2"]).to_parquet(table / f"part.{i}.parquet")
    names = input_feature_names(str(table))
    assert names == ["x0", "x1", "x2"]
    np.testing.assert_array_equal(open_input(str(table), columns=names).compute(), X)


def test_big_endian_files_are_read_in_the_machines_byte_order(tmp_path):
    """A '>f4' .npy file or Zarr v2 array gave a float64 model (sklearn's dtype checks take '>f4' for another
    dtype than float32), where the same data stored '<f4' gives a float32 one."""
    X = np.random.default_rng(0).normal(size=(400, 3)).astype(np.float32)
    np.save(tmp_path / "be.npy", X.astype(">f4"))
    z = zarr.open_array(str(tmp_path / "be.zarr"), mode="w", shape=X.shape, chunks=(100, 3), dtype=">f4",
                        zarr_format=2)
    z[:] = X
    for path in ("be.npy", "be.zarr"):
        lazy = open_input(str(tmp_path / path))
        assert lazy.dtype == np.dtype("float32") and lazy.dtype.isnative
        np.testing.assert_array_equal(lazy.compute(), X)
        gm = GaussianMixture(2, random_state=0, max_iter=3).fit(lazy)
        assert gm.means_.dtype == np.float32
        reference = GaussianMixture(2, random_state=0, max_iter=3).fit(da.from_array(X, chunks=lazy.chunks))
        np.testing.assert_array_equal(gm.means_, reference.means_)


def test_chunk_rows_reads_whole_zarr_chunks_to_a_task(tmp_path):
    """input.chunk_rows was ignored for Zarr inputs: it now merges whole stored chunks up to that many rows."""
    X = np.random.default_rng(0).normal(size=(10_000, 16))
    z = zarr.open_array(str(tmp_path / "x.zarr"), mode="w", shape=X.shape, chunks=(2000, 16), dtype="f8")
    z[:] = X
    assert open_input(str(tmp_path / "x.zarr")).chunks[0] == (2000,) * 5
    for chunk_rows, expected in ((5000, (4000, 4000, 2000)), (100, (2000,) * 5), (10**9, (10_000,))):
        lazy = open_input(str(tmp_path / "x.zarr"), chunk_rows=chunk_rows)
        assert lazy.chunks[0] == expected
        np.testing.assert_array_equal(lazy.compute(), X)


def test_an_output_replaced_where_a_link_stood_leaves_no_link_behind(tmp_path):
    """A symbolic link at the output path is replaced as a path is (the data it points to stays where it is); the
    link, swapped aside, was left as a hidden staging entry for good (rmtree refuses links)."""
    write_table({"labels": da.arange(4, chunks=2)}, str(tmp_path / "real.zarr"), format="zarr")
    os.symlink(tmp_path / "real.zarr", tmp_path / "link.zarr")
    write_table({"labels": da.arange(6, chunks=3)}, str(tmp_path / "link.zarr"), format="zarr", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["link.zarr", "real.zarr"]
    assert not os.path.islink(tmp_path / "link.zarr")
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "link.zarr"), mode="r")["labels"][:], np.arange(6))
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "real.zarr"), mode="r")["labels"][:], np.arange(4))
