"""Worker preload of the ``dgmm`` command's LocalCluster worker processes: Ctrl-C is the driver's.

A terminal's Ctrl-C reaches every process of its foreground group, the worker processes a
LocalCluster spawns included. Each then died printing a ``KeyboardInterrupt`` traceback, and the
scheduler warned about lost tasks, before the command had reported the interrupt and closed the
cluster itself. Loaded in each worker process (``LocalCluster(preload=[__name__])``, restarted
workers too), this module makes the workers ignore SIGINT; the driver still gets it, stops the fit,
and shuts the workers down.
"""

from __future__ import annotations

import signal
import threading


def dask_setup(worker) -> None:  # noqa: ARG001 - distributed's preload signature
    """Ignore SIGINT in this worker process (only its main thread may change signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
