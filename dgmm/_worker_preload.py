"""Worker preload of the ``dgmm`` command's LocalCluster worker processes (``LocalCluster(preload=[__name__])``,
restarted workers too).

- **Ctrl-C, SIGTERM and SIGHUP are the driver's.** A terminal's Ctrl-C (and the SIGHUP of a closed
  terminal, and Slurm's SIGTERM to every process of a job) reaches every process of the group, the
  worker processes a LocalCluster spawns included. Each then died printing a traceback, and the
  scheduler warned about lost tasks and restarted them, before the command had reported the
  interrupt and closed the cluster itself. The workers ignore these signals; the driver still gets
  them, stops the fit, and shuts the workers down (the nanny asks a worker to stop through a queue,
  and kills it with SIGKILL if it must: never with these signals).
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


#: The signals the command's worker processes leave to the command.
DRIVER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def dask_setup(worker) -> None:  # (distributed's preload signature)
    """Ignore :data:`DRIVER_SIGNALS` in this worker process (only its main thread may change signal
    handlers); quiet aiohttp."""
    quiet_unclosed_sessions()
    if threading.current_thread() is threading.main_thread():
        for sig in DRIVER_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
