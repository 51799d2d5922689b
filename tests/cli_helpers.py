"""Helpers for tests that run the real ``dgmm`` command in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import yaml


def run_dgmm(*args, cwd=None, env=None, timeout=300):
    """Run ``python -m dgmm.cli ARGS`` (the console script's entry point) and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "dgmm.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


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
