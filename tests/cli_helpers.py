"""Helpers for tests that run the real ``dgmm`` command in subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import yaml


def dgmm_command(*args) -> list[str]:
    """``python -m dgmm.cli ARGS``: the console script's entry point, in this interpreter."""
    return [sys.executable, "-m", "dgmm.cli", *map(str, args)]


def run_dgmm(*args, cwd=None, env=None, timeout=300):
    """Run ``dgmm ARGS`` in a subprocess and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(dgmm_command(*args), cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def stop_process(proc, sig=signal.SIGKILL, timeout=60):
    """Send ``sig`` to ``proc`` if it still runs and reap it; SIGKILL it if it has not ended after ``timeout`` s."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running(command, stderr=subprocess.PIPE, stop=signal.SIGKILL, new_session=False):
    """Start ``command`` with its stdout (and by default stderr) as text pipes, for a test to signal and read.

    With ``new_session`` it leads a process group of its own (and its children), which a test signals as a
    terminal's Ctrl-C does: ``os.killpg(proc.pid, signal.SIGINT)``.
    On leaving the block the process is stopped with ``stop`` if it still runs (see :func:`stop_process`) and
    its pipes are closed, so that a failing assertion leaves no process behind.
    """
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=new_session)
    try:
        yield proc
    finally:
        stop_process(proc, stop)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def wait_until(condition, timeout, interval=0.2) -> bool:
    """Poll ``condition()`` until it is true (then True) or ``timeout`` seconds have passed (then False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def wait_for_line(proc, text, timeout=240) -> None:
    """Read ``proc``'s stdout until a line contains ``text``; fail if the output ends or ``timeout`` s pass first."""
    deadline = time.monotonic() + timeout
    while text not in (line := proc.stdout.readline()):
        assert line and time.monotonic() < deadline, "the fit ended early"


def wait_for_checkpoint(proc, path, n_iter, timeout=240) -> None:
    """Wait while ``proc`` runs until the checkpoint at ``path`` holds iteration ``n_iter`` or a later one."""
    from dgmm.checkpoint import CheckpointError, load_checkpoint

    def written() -> bool:
        assert proc.poll() is None, f"the fit ended before its checkpoint of iteration {n_iter}"
        with contextlib.suppress(FileNotFoundError, CheckpointError):  # (writes are atomic: not expected)
            return load_checkpoint(str(path)).n_iter >= n_iter
        return False

    assert wait_until(written, timeout, interval=0.02), f"no checkpoint of iteration {n_iter} within {timeout} s"


def write_config(path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def blobs(n_samples=3000, n_features=3, seed=0):
    """Three well-separated blobs with a little overlap."""
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0] * n_features, [5.0] + [1.0] * (n_features - 1), [1.0] + [-4.0] * (n_features - 1)])
    labels = rng.integers(0, 3, size=n_samples)
    return centers[labels] + rng.normal(size=(n_samples, n_features)) * np.array([1.0, 0.7, 1.3][:n_features] +
                                                                                  [1.0] * max(n_features - 3, 0))


class InProcessCLI:
    """Runs ``dgmm ARGS`` through :func:`dgmm.cli.main` in this process, its output captured by pytest's ``capsys``.

    Calling it returns ``(exit status, stdout, stderr)``; the status is what ``main`` hands to
    ``sys.exit``. ``main`` configures logging for a terminal, so :meth:`restore` puts pytest's
    logging back (the fixture ``dgmm_cli`` of the tests that use it calls it).
    """

    def __init__(self, capsys):
        import logging

        self.capsys = capsys
        root, cli_logger = logging.getLogger(), logging.getLogger("dgmm.cli")
        self.saved = (list(root.handlers), root.level, list(cli_logger.handlers), cli_logger.level,
                      cli_logger.propagate)

    def __call__(self, *args):
        from dgmm.cli import main

        status = main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        return status, out, err

    def restore(self):
        import logging

        root, cli_logger = logging.getLogger(), logging.getLogger("dgmm.cli")
        root.handlers[:], cli_logger.handlers[:] = self.saved[0], self.saved[2]
        root.setLevel(self.saved[1])
        cli_logger.setLevel(self.saved[3])
        cli_logger.propagate = self.saved[4]
        logging.captureWarnings(False)
