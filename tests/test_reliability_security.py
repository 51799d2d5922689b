"""Security: no pickle in or out, validated loading, config strings never evaluated, nothing listening outside.

- Model files and checkpoints written by the command hold only plain numeric
  arrays and one JSON string (checked from every ``.npy`` member's header).
- Files crafted to run code when unpickled (an object array whose element's
  ``__reduce__`` creates a marker directory), given to every loader and every
  command, are refused and the marker never appears.
- Loading a checkpoint validates shapes, dtypes and positive-definiteness
  (model files: ``test_model_io.py``).
- Strings from a config reach the program as data: no ``eval``, no shell, no
  unsafe YAML, no template or environment expansion (and the source contains
  no such call).
- ``dgmm fit`` with the default LocalCluster listens on loopback only.
"""

from __future__ import annotations

import ast
import io
import json
import os
import signal
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from dgmm import GaussianMixture, load_model
from dgmm.checkpoint import CheckpointError, load_checkpoint, read_npz_header
from dgmm.model_io import ModelFormatError
from cli_helpers import blobs, dgmm_command, run_dgmm, running, wait_for_line, write_config
from conftest import rewrite

PACKAGE = Path(__file__).resolve().parent.parent / "dgmm"
LOOPBACK = {"127.0.0.1", "::1"}


class Evil:
    """Unpickling this creates the directory ``path``: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def evil_npy(marker, shape=(2,)) -> bytes:
    buffer = io.BytesIO()
    array = np.empty(shape, dtype=object)
    array[...] = Evil(marker)
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def assert_plain_npz(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert names and all(n.endswith(".npy") for n in names), names
        for name in names:
            shape, dtype = read_npz_header(archive, name[: -len(".npy")])
            assert not dtype.hasobject and dtype.kind in "fU", (name, dtype)
            assert dtype.kind == "f" or (name == "meta.npy" and shape == ()), (name, dtype, shape)


# -- no pickle written -----------------------------------------------------------------------------------------


def test_files_written_by_the_command_hold_no_pickle(tmp_path):
    np.save(tmp_path / "x.npy", blobs(2000, 3))
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy"), "chunk_rows": 500},
        "model": {"n_components": 3, "random_state": 0, "n_init": 2},
        "cluster": {"type": "threads"},
        "output": {"model": str(tmp_path / "model.npz"), "checkpoint": str(tmp_path / "keep.npz")},
    })
    assert run_dgmm("fit", config).returncode == 0
    assert_plain_npz(tmp_path / "model.npz")
    with pytest.raises(KeyboardInterrupt):  # a checkpoint as an interrupted fit leaves it
        GaussianMixture(3, random_state=0, n_init=2, checkpoint=str(tmp_path / "ckpt.npz"),
                        callbacks=lambda info: (_ for _ in ()).throw(KeyboardInterrupt)).fit(blobs(2000, 3))
    assert_plain_npz(tmp_path / "ckpt.npz")
    for path in (tmp_path / "model.npz", tmp_path / "ckpt.npz"):
        with np.load(path, allow_pickle=False) as f:
            json.loads(str(f["meta"]))


# -- nothing unpickled -----------------------------------------------------------------------------------------


@pytest.fixture
def valid_files(tmp_path):
    from dgmm import save_model

    X = blobs(300, 2)
    gm = GaussianMixture(2, random_state=0, max_iter=2, tol=0.0, checkpoint=str(tmp_path / "c.npz"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm.fit(X)
    save_model(gm, tmp_path / "m.npz")
    np.save(tmp_path / "x.npy", X)
    return tmp_path


def replace_member(path, member, payload):
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[member] = payload
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


@pytest.mark.parametrize("which, member", [
    ("m.npz", "meta.npy"), ("m.npz", "weights.npy"), ("m.npz", "covariances.npy"),
    ("c.npz", "meta.npy"), ("c.npz", "run0_means.npy"), ("c.npz", "run0_precisions_cholesky.npy"),
])
def test_pickled_payloads_in_models_and_checkpoints_are_never_unpickled(valid_files, dgmm_cli, which, member):
    marker = valid_files / "PWNED"
    replace_member(valid_files / which, member, evil_npy(marker))
    with pytest.raises((ModelFormatError, CheckpointError)):
        (load_model if which == "m.npz" else load_checkpoint)(str(valid_files / which))
    config = write_config(valid_files / "cfg.yaml", {
        "input": {"path": str(valid_files / "x.npy")}, "model": {"n_components": 2, "random_state": 0},
        "cluster": {"type": "threads"},
        "output": {"model": str(valid_files / "m.npz"), "checkpoint": str(valid_files / "c.npz"), "overwrite": True},
        "predict": {"output": str(valid_files / "p.zarr")}})
    commands = [("info", valid_files / "m.npz"), ("predict", config), ("score", config),
                ("sample", valid_files / "m.npz", "-n", "3")] if which == "m.npz" else [("fit", config, "--resume")]
    # a checkpoint whose metadata cannot be read is not taken for one: refused with the config (exit 2)
    expected = 2 if (which, member) == ("c.npz", "meta.npy") else 1
    for args in commands:
        status, _, stderr = dgmm_cli(*args)
        assert status == expected and stderr.startswith("dgmm: error: "), (args, stderr)
    assert not marker.exists(), "a pickle was loaded"


def test_pickled_inputs_are_never_unpickled(tmp_path, dgmm_cli):
    marker = tmp_path / "PWNED"
    (tmp_path / "x.npy").write_bytes(evil_npy(marker, (4, 2)))  # an object .npy
    zarr_dir = tmp_path / "x.zarr"  # a Zarr v2 object array with a pickle filter
    zarr_dir.mkdir()
    (zarr_dir / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [4, 2], "chunks": [2, 2], "dtype": "|O", "compressor": None, "fill_value": None,
        "order": "C", "filters": [{"id": "pickle", "protocol": 5}], "dimension_separator": "."}))
    import pickle  # only to craft the hostile chunk this test must never see loaded

    for i in range(2):
        (zarr_dir / f"{i}.0").write_bytes(pickle.dumps(np.array([[Evil(marker)] * 2] * 2, dtype=object)))
    for data, message in ((tmp_path / "x.npy", "has dtype object, not a number"),
                          (zarr_dir, "cannot open as Zarr")):
        config = write_config(tmp_path / "c.yaml", {
            "input": {"path": str(data)}, "cluster": {"type": "threads"},
            "output": {"model": str(tmp_path / "m.npz")}})
        status, _, stderr = dgmm_cli("fit", config)
        assert status == 1 and message in stderr, stderr
    assert not marker.exists(), "a pickle was loaded"
    assert not (tmp_path / "m.npz").exists()


# -- validated checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit_meta, edit_arrays, message", [
    (None, lambda a: a.update(run0_means=np.zeros((5, 7))), r"'run0_means' has shape \(5, 7\), expected \(2, 2\)"),
    (None, lambda a: a.update(run0_weights=np.array([1, 0])), "'run0_weights' has dtype int64, expected float64"),
    (None, lambda a: a["run0_covariances"].__setitem__(1, -np.eye(2)), "covariance of component 1 is not positive"),
    (None, lambda a: a["run0_covariances"].__setitem__((0, 0, 1), 9.0), "covariance of component 0 is not symmetric"),
    (None, lambda a: a["run0_precisions_cholesky"].__setitem__((0, 1, 0), 1.0), "not upper triangular"),
    (None, lambda a: a["run0_weights"].__setitem__(0, np.nan), "'weights' holds NaN or infinity"),
    (None, lambda a: a.update(run0_weights=a["run0_weights"] * 3), "'weights' must be non-negative and sum to 1"),
    (lambda m: m["fingerprint"].update(covariance_type="banded"), None, "invalid covariance_type 'banded'"),
    (lambda m: m["fingerprint"].update(n_features=10**9), None, "implausibly large model"),
    (lambda m: m.update(active=[0, 0]), None, "'active' must list distinct restarts"),
    (lambda m: m["runs"][0].update(converged="yes"), None, "'converged' must be true or false"),
    (lambda m: m.update(n_iter=-1), None, "invalid n_iter -1"),
])
def test_checkpoints_are_validated_on_load(valid_files, edit_meta, edit_arrays, message):
    rewrite(valid_files / "c.npz", edit_meta, edit_arrays)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(valid_files / "c.npz"))


# -- config strings are data -----------------------------------------------------------------------------------


FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "system", "popen", "unsafe_load", "full_load",
                   "load_all", "loads"}


def test_source_has_no_eval_pickle_or_unsafe_yaml():
    """No eval/exec, no pickle/marshal/shelve import, yaml only through safe_load, no allow_pickle=True, no shell."""
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cloudpickle", "marshal", "shelve", "dill") for n in names):
                    problems.append(f"{path.name}:{node.lineno}: imports {names}")
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
                if name in FORBIDDEN_CALLS and not (name == "loads" and owner == "json"):
                    problems.append(f"{path.name}:{node.lineno}: calls {owner + '.' if owner else ''}{name}")
                if owner == "yaml" and name == "load":
                    problems.append(f"{path.name}:{node.lineno}: yaml.load")
                for keyword in node.keywords:
                    if keyword.arg in ("allow_pickle", "shell") and not (
                            isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                        problems.append(f"{path.name}:{node.lineno}: {keyword.arg}=...")
    assert not problems, problems
    # config files are read by a SafeLoader subclass that only adds the duplicate-key check
    from dgmm.config import _UniqueKeyLoader, _safe_load_unique

    assert issubclass(_UniqueKeyLoader, yaml.SafeLoader)
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor"):
        _safe_load_unique("x: !!python/object/apply:os.getcwd []")


HOSTILE = ["__import__('os').mkdir('{m}')", "$(mkdir {m})", "`mkdir {m}`", "{{{{ 7*7 }}}}", "${{HOME}}", "%(m)s",
           "!!python/object/apply:os.mkdir ['{m}']"]


@pytest.mark.parametrize("template", HOSTILE)
def test_config_strings_are_never_evaluated(tmp_path, dgmm_cli, template):
    marker = tmp_path / "PWNED"
    text = template.format(m=marker)
    np.save(tmp_path / "x.npy", blobs(300, 2))
    quoted = json.dumps(text)  # a YAML string (a tag outside quotes would be a tag: tested below)
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {{path: {json.dumps(str(tmp_path / 'x.npy'))}, storage_options: {{opt: {quoted}}}}}\n"
                      f"model: {{n_components: 2, random_state: 0}}\n"
                      f"cluster: {{type: threads}}\n"
                      f"output: {{model: {json.dumps(str(tmp_path / 'out' / 'm.npz'))}}}\n")
    status, stdout, stderr = dgmm_cli("check", config, "--log-format", "json")
    assert status == 0, stderr
    (line,) = [json.loads(s) for s in stdout.splitlines() if s.strip()]
    assert line["config"]["input"]["storage_options"]["opt"] == text  # verbatim: no expansion of any kind
    for key in ("input.path", "cluster.host", "cluster.dashboard_address", "model.covariance_type"):
        status, stdout, stderr = dgmm_cli("check", config, "--set", f"{key}={quoted}", "--log-format", "json")
        if status == 0:  # accepted as the string it is
            (line,) = [json.loads(s) for s in stdout.splitlines() if s.strip()]
            section, name = key.split(".")
            assert line["config"][section][name] == text, key
        else:
            assert status == 2 and "Traceback" not in stderr, (key, stderr)
    unquoted = tmp_path / "tag.yaml"  # the YAML tag itself, unquoted: refused by the safe loader
    unquoted.write_text(f"input: {{path: !!python/object/apply:os.mkdir [{json.dumps(str(marker))}]}}\n")
    status, _, stderr = dgmm_cli("check", unquoted)
    assert status == 2 and "not valid YAML" in stderr
    fit = run_dgmm("fit", config, "--set", f"output.model={json.dumps(str(tmp_path / 'out' / 'm.npz'))}")
    assert fit.returncode == 0, fit.stderr  # the whole command, in its own process, with the hostile string
    assert not marker.exists()


# -- nothing listens outside -----------------------------------------------------------------------------------


def listening_addresses(pid):
    """The local addresses of every listening TCP socket of ``pid`` and its descendants."""
    found = set()
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((proc.pid, conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:
            pass
    return found


def listening_during_fit(tmp_path, cluster):
    np.save(tmp_path / "x.npy", blobs(20_000, 3))
    section = {"cluster": cluster} if cluster is not None else {}
    config = write_config(tmp_path / "c.yaml", {
        "input": {"path": str(tmp_path / "x.npy"), "chunk_rows": 2000},
        "model": {"n_components": 3, "random_state": 0, "tol": 0.0, "max_iter": 1000}, **section,
        "output": {"model": str(tmp_path / "m.npz"), "checkpoint_every": 0}})
    with running(dgmm_command("fit", config), stderr=subprocess.DEVNULL, stop=signal.SIGINT) as proc:
        wait_for_line(proc, "iteration    2")
        addresses = listening_during_fit.last = listening_addresses(proc.pid)
        n_processes = 1 + len(psutil.Process(proc.pid).children(recursive=True))
    return addresses, n_processes


def test_default_local_cluster_listens_on_loopback_only(tmp_path):
    addresses, n_processes = listening_during_fit(tmp_path, None)  # no cluster section: the defaults
    assert n_processes >= 2 and len(addresses) >= 2, (n_processes, addresses)  # a scheduler and workers listen
    assert {ip for _, ip, _ in addresses} <= LOOPBACK, addresses


@pytest.mark.slow
def test_listening_check_sees_a_configured_public_host(tmp_path):
    """The same check on a cluster configured to listen on every interface: it is seen (the check works)."""
    addresses, _ = listening_during_fit(tmp_path, {"n_workers": 1, "threads_per_worker": 1, "host": "0.0.0.0"})
    assert {ip for _, ip, _ in addresses} - LOOPBACK, addresses


def test_threads_listen_nowhere_and_thread_workers_on_loopback(tmp_path):
    addresses, _ = listening_during_fit(tmp_path, {"type": "threads"})
    assert addresses == set(), addresses
    # thread workers, and no dashboard (distributed still serves /health and /metrics over HTTP)
    addresses, _ = listening_during_fit(tmp_path, {"n_workers": 2, "processes": False, "dashboard_address": None})
    assert addresses and {ip for _, ip, _ in addresses} <= LOOPBACK, addresses
