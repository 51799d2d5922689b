"""Worker preload of the ``dgmm`` command's LocalCluster worker processes (``LocalCluster(preload=[__name__])``,
restarted workers too).

- **Ctrl-C is the driver's.** A terminal's Ctrl-C reaches every process of its foreground group, the
  worker processes a LocalCluster spawns included. Each then died printing a ``KeyboardInterrupt``
  traceback, and the scheduler warned about lost tasks, before the command had reported the
  interrupt and closed the cluster itself. The workers ignore SIGINT; the driver still gets it,
  stops the fit, and shuts the workers down.
- **No "Unclosed client session" noise.** s3fs's aiohttp sessions, opened by Zarr stores on the
  workers, are never closed before the worker process exits, and aiohttp then logged two lines per
  worker to stderr at the end of every command on an ``s3://`` Zarr input (:class:`UnclosedSessionFilter`).
"""

from __future__ import annotations

import logging
import signal
import threading

#: How aiohttp's messages about sessions left open at exit begin (logged through the ``asyncio`` logger).
UNCLOSED_SESSION_MESSAGES = ("Unclosed client session", "Unclosed connector")


class UnclosedSessionFilter(logging.Filter):
    """Drop aiohttp's "Unclosed client session" / "Unclosed connector" records (harmless at exit)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(UNCLOSED_SESSION_MESSAGES)


def quiet_unclosed_sessions() -> None:
    """Install :class:`UnclosedSessionFilter` on the ``asyncio`` logger of this process (once)."""
    log = logging.getLogger("asyncio")
    if not any(isinstance(f, UnclosedSessionFilter) for f in log.filters):
        log.addFilter(UnclosedSessionFilter())


def dask_setup(worker) -> None:  # noqa: ARG001 - distributed's preload signature
    """Ignore SIGINT in this worker process (only its main thread may change signal handlers); quiet aiohttp."""
    quiet_unclosed_sessions()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
