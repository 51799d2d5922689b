"""The ``dgmm`` command line. The only place that configures logging and prints.

::

    dgmm fit CONFIG.yaml [--set KEY=VALUE ...] [--resume]   fit, write the model (and checkpoints)
    dgmm select CONFIG.yaml [--n-components 1:10 ...]        sweep candidates, write the best by BIC/AIC
    dgmm predict CONFIG.yaml [--set ...]                      per-row labels / probabilities / log-likelihoods
    dgmm score CONFIG.yaml [--set ...]                        mean log-likelihood, BIC and AIC of the input
    dgmm sample MODEL -n N [-o OUT]                           draw rows from a fitted model
    dgmm info MODEL                                           what a model file holds
    dgmm check CONFIG.yaml [--set ...] [--for COMMAND]        validate a config and print it resolved
    dgmm demo                                                 synthetic Zarr data (if missing), fitted locally

Every command takes ``--quiet`` and ``--log-format {text,json}``. Configs are
validated completely before any cluster starts or any data is read; a bad
config exits with status 2 and writes nothing. Other failures exit with 1,
Ctrl-C with 130 (``dgmm fit --resume`` continues from the last checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings

from ._worker_preload import UnclosedSessionFilter
from .config import Config, ConfigError, check_extra_output, load_config, parse_config

logger = logging.getLogger("dgmm.cli")

#: The demo's config; ``configs/demo.yaml`` holds the same, documented.
DEMO_CONFIG = {
    "input": {
        "path": "data/demo.zarr",
        "synthetic": {"n_samples": 2_000_000, "n_features": 8, "n_components": 4, "chunk_rows": 250_000, "seed": 0},
    },
    "model": {"n_components": 4, "covariance_type": "full", "random_state": 0},
    "cluster": {"type": "local"},
    "output": {"model": "data/demo-model.npz", "overwrite": True, "checkpoint_every": 5},
    "predict": {"output": "data/demo-predictions.zarr", "probabilities": True, "log_likelihood": True,
                "overwrite": True},
}

EXIT_FAILURE, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130
#: Log level of a command's result (a score, a model's description, a selection table, a checked config):
#: printed with ``--quiet`` too, which silences progress only.
RESULT = logging.INFO + 5
#: Events that are a command's result.
RESULT_EVENTS = frozenset({"score", "info", "select", "config"})


# ---------------------------------------------------------------------------
# Output: human lines or JSON lines
# ---------------------------------------------------------------------------


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, message and the event's fields."""

    def format(self, record):
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": "info" if record.levelno == RESULT else record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        if record.name != logger.name:
            entry["logger"] = record.name
        for key, value in getattr(record, "fields", {}).items():
            entry[key] = _json_value(value)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record):
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"dgmm: {record.levelname.lower()}: {message}"
        return message


class _Below(logging.Filter):
    def __init__(self, level):
        super().__init__()
        self.level = level

    def filter(self, record):
        return record.levelno < self.level


class _NotAbandonedGathers(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for distributed's ``AllExit``.

    When Ctrl-C interrupts a fit on a distributed cluster, the client's pending
    gather is abandoned with ``AllExit``, distributed's own signal for it, and
    asyncio reports the abandoned task as an error. That line is noise after
    "interrupted": the interruption itself is reported.
    """

    def filter(self, record):
        exc = record.exc_info[0] if record.exc_info else None
        return not (record.name == "asyncio" and exc is not None and exc.__name__ == "AllExit")


class _ShortLostTasks(logging.Filter):
    """Shortens distributed's "Removing worker ... caused the cluster to lose ... task(s) ...: {key, key, ...}"
    (kilobytes of task keys on one line) to the number of tasks; the command says itself that a worker left."""

    def filter(self, record):
        if record.name.startswith("distributed") and "caused the cluster to lose" in str(record.msg):
            import re

            message = record.getMessage()
            keys = re.search(r": (\{.*\}) \(stimulus_id", message, flags=re.DOTALL)
            if keys:
                count = keys.group(1).count("(") or keys.group(1).count(",") + 1
                record.msg = message[: keys.start()] + f": {count} task(s)"
                record.args = ()
        return True


class _NotEmpty(logging.Filter):
    """Drops records with no message (distributed's client logs ``logger.exception("")`` when it loses its
    scheduler; the command reports that loss itself, in one line)."""

    def filter(self, record):
        return bool(str(record.getMessage()).strip())


def configure_logging(quiet: bool = False, log_format: str = "text") -> None:
    """Progress and results to stdout, warnings and errors to stderr, as text or JSON lines."""
    formatter = _JsonFormatter() if log_format == "json" else _TextFormatter()
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(formatter)
    out.addFilter(_Below(logging.WARNING))
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(formatter)
    err.setLevel(logging.WARNING)
    err.addFilter(_NotAbandonedGathers())
    err.addFilter(_NotEmpty())
    err.addFilter(_ShortLostTasks())
    err.addFilter(UnclosedSessionFilter())  # aiohttp at exit, about s3fs sessions nobody closes: harmless
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(err)
    root.setLevel(logging.WARNING)
    logger.handlers[:] = [out, err]
    logger.propagate = False
    logger.setLevel(RESULT if quiet else logging.INFO)
    warnings.formatwarning = _format_warning
    logging.captureWarnings(True)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, ``Category: message``, without the file and source line of where it was raised."""
    return f"{category.__name__}: {message}"


def report(event: str, message: str, **fields) -> None:
    """One progress or result line (``event`` and ``fields`` appear in JSON output); results also with --quiet."""
    logger.log(RESULT if event in RESULT_EVENTS else logging.INFO, message, extra={"event": event, "fields": fields})


class IterationReporter:
    """An estimator callback printing one line per EM iteration."""

    def __init__(self):
        self.iteration_seconds: list[float] = []
        self.last_iteration = 0
        self.last_progress = time.monotonic()

    def __call__(self, info) -> None:
        self.iteration_seconds.append(info.seconds)
        self.last_iteration, self.last_progress = info.n_iter, time.monotonic()
        change = f"{info.change: .3e}" if math.isfinite(info.change) else f"{'-':>10}"
        report(
            "iteration",
            f"iteration {info.n_iter:4d}  lower bound {info.lower_bound: .8f}  change {change}  "
            f"{info.seconds:7.2f} s/iter  {info.rows_per_second:9.3g} rows/s"
            + ("  (converged)" if info.converged else ""),
            n_iter=info.n_iter, lower_bound=info.lower_bound, change=info.change, seconds=info.seconds,
            rows_per_second=info.rows_per_second, n_active=info.n_active, converged=info.converged,
        )


@contextlib.contextmanager
def init_progress(progress: IterationReporter | None = None):
    """Show the initialisation's passes (k-means‖ rounds, Lloyd and k-means++ passes) as progress lines.

    They are :mod:`dgmm.init`'s INFO log records; out of core they can take as
    long as several EM iterations, which used to pass without a line. Each also
    counts as progress for :class:`StallWatch`.
    """
    source = logging.getLogger("dgmm.init")

    class _Forward(logging.Handler):
        def emit(self, record):
            if record.levelno < logging.WARNING:
                report("init", f"init: {record.getMessage()}")
                if progress is not None:
                    progress.last_progress = time.monotonic()

    handler, previous = _Forward(logging.INFO), source.level
    source.addHandler(handler)
    source.setLevel(logging.INFO)
    try:
        yield
    finally:
        source.removeHandler(handler)
        source.setLevel(previous)


def _workers_info(client) -> dict:
    """The scheduler's view of every worker, by address (``scheduler_info()['workers']``)."""
    try:
        info = client.scheduler_info(n_workers=-1)  # distributed from 2025 lists 5 workers unless asked
    except TypeError:  # earlier versions list them all and take no n_workers
        info = client.scheduler_info()
    return info.get("workers", {})


class StallWatch:
    """Warn when a fit on a cluster goes without an EM iteration for long, naming the workers gone silent.

    A worker that is stopped (SIGSTOP, a suspended VM), swapping or cut off
    keeps its tasks until the scheduler drops it, after
    ``distributed.scheduler.worker-ttl`` (5 minutes by default) without a
    heartbeat; the fit then goes on, with its tasks rerun elsewhere. Until
    then nothing is printed: this thread says what the fit is waiting for.
    It warns after ``seconds`` (or 3 times the slowest iteration so far, if
    longer) without an iteration, then each time the wait has doubled.
    """

    def __init__(self, client, seconds: float, progress: IterationReporter, same_clock: bool):
        self.client, self.seconds, self.progress, self.same_clock = client, seconds, progress, same_clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dgmm-stall-watch", daemon=True)

    def __enter__(self):
        self.progress.last_progress = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        warned_at, stamp = 0.0, None
        while not self._stop.wait(max(0.5, min(self.seconds / 4, 15.0))):
            progress = self.progress
            if stamp != progress.last_progress:
                warned_at, stamp = 0.0, progress.last_progress
            waited = time.monotonic() - stamp
            threshold = max(self.seconds, 3 * max(progress.iteration_seconds, default=0.0), 2 * warned_at)
            if waited < threshold:
                continue
            warned_at = waited
            try:
                message = self._message(waited)
            except Exception:  # noqa: BLE001 (the scheduler did not answer: that is the news)
                message = f"{self._waiting(waited)}; the scheduler does not answer either"
            if progress.last_progress != stamp:  # an iteration ended meanwhile: the message is out of date
                warned_at = 0.0
                continue
            logger.warning("%s", message, extra={"event": "stall", "fields": {"seconds": round(waited, 1)}})

    def _waiting(self, waited: float) -> str:
        n_iter = self.progress.last_iteration
        where = f"in EM iteration {n_iter + 1}" if n_iter else "in the initialisation"
        return f"no progress for {waited:.0f} s ({where})"

    def _message(self, waited: float) -> str:
        workers = _workers_info(self.client)
        seen = {address: float(w.get("last_seen", 0.0)) for address, w in workers.items()}
        # the scheduler's clock: this process's for the clusters dgmm starts, else its most recent heartbeat
        now = time.time() if self.same_clock or not seen else max(seen.values())
        quiet = min(30.0, self.seconds)
        silent = sorted((now - t, address) for address, t in seen.items() if now - t > quiet)
        if not silent:
            slowest = max(self.progress.iteration_seconds, default=0.0)
            before = f" (the slowest iteration so far took {slowest:.1f} s)" if slowest else ""
            return f"{self._waiting(waited)}{before}; all {len(seen)} workers answer the scheduler"
        names = ", ".join(f"{address} ({age:.0f} s)" for age, address in reversed(silent))
        heard = (f"{self._waiting(waited)}: the scheduler has not heard from {len(silent)} of {len(seen)} workers "
                 f"for a while: {names}. A worker that is stopped, swapping or cut off keeps its tasks until the "
                 "scheduler drops it")
        if not self.same_clock:
            return (f"{heard} after the scheduler's distributed.scheduler.worker-ttl (5 minutes unless set) without "
                    "a heartbeat; its tasks then run elsewhere")
        import dask

        ttl = dask.config.get("distributed.scheduler.worker-ttl", None)
        if not ttl:  # None or false: the scheduler never drops a silent worker
            return (f"{heard}, and distributed.scheduler.worker-ttl is off here: it never will. Resume it "
                    "(SIGCONT), end it (its tasks then run elsewhere), or interrupt the fit and --resume it")
        return (f"{heard} after distributed.scheduler.worker-ttl ({ttl}) without a heartbeat; its tasks then run "
                "elsewhere")


# ---------------------------------------------------------------------------
# Clusters
# ---------------------------------------------------------------------------


def _dashboard(client, kind: str = "local", wanted: bool = True) -> str:
    """Where the scheduler's dashboard is. An existing scheduler (``address``) serves its own, or none:
    whether bokeh is installed here says nothing about it. ``wanted``: cluster.dashboard_address is set."""
    if not wanted and kind != "address":
        return "no dashboard (cluster.dashboard_address: null)"
    if kind == "address":
        try:
            serves = "dashboard" in client.scheduler_info().get("services", {}) and \
                client.run_on_scheduler(_has_bokeh)  # its HTTP server runs without bokeh, the dashboard not
        except Exception:  # noqa: BLE001 (a hint only)
            serves = bool(client.dashboard_link)
        return f"dashboard {client.dashboard_link}" if serves else "the scheduler serves no dashboard"
    if not _has_bokeh():
        return "dashboard not available (pip install bokeh)"
    link = client.dashboard_link
    return f"dashboard {link}" if link else "no dashboard"


def _has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


#: ``input.persist: auto`` keeps the input in memory when its bytes are at most this fraction of
#: the memory the computation may use (the workers' memory limits, or this process's).
PERSIST_FRACTION = 0.25


def _cgroup_memory_limit() -> int | None:
    """The smallest memory limit of this process's cgroups (v1 or v2) and their ancestors, if any."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        elif controllers == "":
            base, name = "/sys/fs/cgroup", "memory.max"
        else:
            continue
        while True:
            try:
                with open(os.path.join(base, path.lstrip("/"), name)) as f:
                    text = f.read().strip()
                if text.isdigit():
                    limits.append(int(text))
            except OSError:
                pass
            if path in ("/", ""):
                break
            path = os.path.dirname(path)
    return min(limits) if limits else None


def _local_memory() -> int:
    """distributed's memory limit for this machine, or less when this process's own cgroup says so.

    (``distributed.system.memory_limit`` takes the machine's memory, the root cgroup's
    limit and RLIMIT_RSS, but not the limit of a cgroup below the root.)
    """
    from distributed.system import memory_limit

    system, limit = memory_limit(), _cgroup_memory_limit()
    return min(system, limit) if limit else system


def _memory_for_data(client, kind: str) -> int | None:
    """Bytes of memory the computation may use: the workers' limits, or this process's; None if unknown.

    A LocalCluster's workers share this process's cgroup, which distributed's
    ``memory_limit: auto`` does not look at below the cgroup root, so the
    smaller of the two counts. A worker without a limit makes a remote
    cluster's memory unknown.
    """
    if client is None:
        return _local_memory()
    limits = [w.get("memory_limit") or 0 for w in _workers_info(client).values()]
    if kind == "local":
        local = _local_memory()
        return min(sum(limit or local for limit in limits), local)
    return sum(limits) if limits and all(limits) else None


def _gpu_memory(client, kind: str) -> int | None:
    """Bytes of GPU memory for ``input.device: gpu``: this process's device for kind threads, else None (unknown)."""
    if client is not None or kind != "threads":
        return None
    import cupy

    return int(cupy.cuda.Device().mem_info[1])


def _persist_input(X, client, config):
    """``X`` persisted (kept in memory after its first read) as ``input.persist`` says, with a report line.

    Only for commands that read the input many times (fit, select).
    """
    from dask.utils import format_bytes

    setting, nbytes = config.input.persist, int(X.nbytes)
    gpu = config.input.device == "gpu"  # then auto weighs the data against GPU memory, where it would be kept
    memory = None
    if setting == "auto":
        memory = (_gpu_memory if gpu else _memory_for_data)(client, config.cluster.kind)
        keep = memory is not None and nbytes <= PERSIST_FRACTION * memory
        why = (f"{format_bytes(nbytes)} of {format_bytes(memory)} {'GPU ' if gpu else ''}memory" if memory is not None
               else f"{'GPU ' if gpu else ''}memory unknown") + \
              f"; input.persist: auto keeps data up to {PERSIST_FRACTION:.0%}"
    else:
        keep, why = setting, f"input.persist: {str(setting).lower()}"
    where = ("the workers' " if client is not None else "") + ("GPU memory" if gpu else "memory")
    if keep:
        report("persist", f"data: kept in {where} after the first read ({why})", persisted=True, nbytes=nbytes,
               memory=memory)
        return X.persist()
    report("persist", f"data: read from storage on every pass ({why})", persisted=False, nbytes=nbytes,
           memory=memory)
    return X


def _worker_summary(client) -> tuple[int, int]:
    nthreads = client.nthreads()
    return len(nthreads), sum(nthreads.values())


#: Dask config for the worker processes of the command's LocalCluster. distributed starts them
#: with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes glibc's mmap threshold at 128 KiB: every
#: chunk-sized buffer (a Zarr read, its decoded copy) is then a fresh mmap that page-faults and is
#: unmapped again, which doubled the CPU time of reading a Zarr array (3.1 -> 6.1 CPU-s for 2 GB,
#: system time 0.5 -> 3.4 s). Unset, glibc reuses freed chunk buffers (its dynamic thresholds keep
#: at most a few tens of MB per process); a MALLOC_TRIM_THRESHOLD_ in the environment still wins.
LOCAL_WORKER_ENVIRON = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


#: Threads per core of the workers dgmm starts (``cluster.read_ahead``): a worker runs at most
#: ``nthreads`` tasks at once and each task reads its chunk or computes on it, so with one thread
#: per core a core idles while its thread waits for the disk or a decompressor. With two, one
#: thread's read overlaps the other's kernel (docs/scaling.md, "Read-ahead on distributed workers").
READ_AHEAD_THREADS_PER_CORE = 2


def _local_workers(config) -> dict:
    """LocalCluster's ``n_workers`` and ``threads_per_worker`` for a ``type: local`` config.

    ``threads_per_worker`` counts cores; with ``read_ahead`` (the default) each
    worker runs :data:`READ_AHEAD_THREADS_PER_CORE` threads per core. Null sizes
    are resolved the way LocalCluster resolves them, so read-ahead changes the
    threads but not the number of workers.
    """
    from dask.system import CPU_COUNT
    from distributed.deploy.utils import nprocesses_nthreads

    n_workers, threads = config.n_workers, config.threads_per_worker
    if not config.read_ahead:
        return {"n_workers": n_workers, "threads_per_worker": threads}
    if n_workers is None and threads is None:
        n_workers, threads = nprocesses_nthreads(CPU_COUNT) if config.processes else (1, CPU_COUNT)
    elif n_workers is None:
        n_workers = max(1, CPU_COUNT // threads) if config.processes else 1
    elif threads is None:
        threads = max(1, math.ceil(CPU_COUNT / n_workers))
    return {"n_workers": n_workers, "threads_per_worker": READ_AHEAD_THREADS_PER_CORE * threads}


@contextlib.contextmanager
def _cut_short_clusters_closed():
    """Close, quietly, a cluster whose start a signal (Ctrl-C, SIGTERM) cut short.

    The constructor never returned, so nothing closes it but distributed's exit
    hook, which then fails on its workers still starting ("AssertionError:
    Status.init", a traceback after "terminated"). Closed here instead: its
    worker processes end, and the exit hook no longer sees it.
    """
    from distributed.deploy.spec import SpecCluster

    before = set(SpecCluster._instances)
    try:
        yield
    except BaseException:
        for cluster in [c for c in list(SpecCluster._instances) if c not in before]:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)
            for worker in list(getattr(cluster, "workers", {}).values()):  # those close could not stop
                process = getattr(getattr(worker, "process", None), "process", None)
                with contextlib.suppress(Exception):
                    if process is not None and process.is_alive():
                        process.terminate()
            SpecCluster._instances.discard(cluster)
        raise


@contextlib.contextmanager
def open_cluster(config):
    """Start or attach to the cluster of a :class:`~dgmm.config.ClusterConfig`; yields a Client or None."""
    import dask

    kind = config.kind
    if kind == "threads":
        report("cluster", "cluster: dask threaded scheduler in this process", kind=kind)
        with dask.config.set(scheduler="threads"):
            yield None
        return
    from distributed import Client

    cluster = None
    with contextlib.ExitStack() as stack:
        if kind == "local":
            from distributed import LocalCluster

            # TCP on cluster.host for thread workers too (processes: false): distributed's default for them,
            # inproc://, takes no host and then serves the scheduler's and workers' HTTP endpoints on
            # every interface.
            # Worker processes keep glibc's own malloc thresholds (LOCAL_WORKER_ENVIRON).
            with dask.config.set(LOCAL_WORKER_ENVIRON), _cut_short_clusters_closed(), _signals_deferred(), \
                    _sighup_ignored_by_children():
                cluster = stack.enter_context(LocalCluster(
                    **_local_workers(config), processes=config.processes, memory_limit=config.memory_limit,
                    protocol="tcp://", host=config.host, dashboard_address=config.dashboard_address,
                    # without a dashboard the scheduler still serves /health and /metrics, by default on port
                    # 8787 (a clash with another cluster's dashboard): any free port of the cluster's host
                    **({} if config.dashboard_address
                       else {"scheduler_kwargs": {"dashboard_address": f"{config.host}:0"}}),
                    silence_logs=logging.CRITICAL,  # a failed task is reported once, by the command
                    # Ctrl-C is the command's: worker processes ignore it, so they neither print tracebacks
                    # nor die before the command closes them (thread workers share this process: no preload)
                    **({"preload": ["dgmm._worker_preload"]} if config.processes else {}),
                ))
            client = stack.enter_context(Client(cluster))
            n_workers, n_threads = _worker_summary(client)
            unit = ("worker process" if config.processes else "worker (threads)") if n_workers == 1 else \
                ("worker processes" if config.processes else "workers (threads)")
            per_core = f" ({READ_AHEAD_THREADS_PER_CORE} per core: read-ahead)" if config.read_ahead else ""
            description = f"LocalCluster with {n_workers} {unit}, {n_threads} threads{per_core}"
        elif kind == "address":
            _probe_scheduler(config.address, config.timeout)
            try:
                client = stack.enter_context(Client(config.address, timeout=config.timeout))
            except (OSError, TimeoutError) as exc:
                raise OSError(f"cannot reach the scheduler at {config.address} within {config.timeout:g} s "
                              f"({exc}); check cluster.address or raise cluster.timeout") from None
            try:
                client.wait_for_workers(1, timeout=config.timeout)
            except (TimeoutError, OSError):
                raise OSError(f"the scheduler at {config.address} has no workers (waited {config.timeout:g} s)") \
                    from None
            n_workers, n_threads = _worker_summary(client)
            description = f"scheduler {config.address} with {n_workers} worker{'' if n_workers == 1 else 's'}, " \
                          f"{n_threads} thread{'' if n_threads == 1 else 's'}"
        else:
            cluster = stack.enter_context(_jobqueue_cluster(config.jobqueue, config))
            client = stack.enter_context(Client(cluster))
            jq = config.jobqueue
            report("cluster", f"cluster: submitted {jq.jobs} {jq.system} job(s); waiting for workers "
                              f"(up to {jq.wait_timeout:g} s)", kind=kind, jobs=jq.jobs)
            _wait_for_jobqueue_workers(client, cluster, jq)
            n_workers, n_threads = _worker_summary(client)
            workers = "worker" if n_workers == 1 else "workers"
            description = f"{jq.system} jobqueue cluster with {n_workers} {workers} so far, {n_threads} threads"
        wanted = bool(config.dashboard_address)
        report("cluster", f"cluster: {description}, {_dashboard(client, kind, wanted)}", kind=kind,
               scheduler=client.scheduler.address, dashboard=client.dashboard_link if wanted else None)
        stack.enter_context(_watch_workers(client, kind))
        yield client


@contextlib.contextmanager
def _signal_handlers(signals, handler):
    """``handler`` for ``signals`` while the block runs, the previous handlers after (main thread only:
    Python sets handlers nowhere else)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _signals_deferred():
    """Ctrl-C and SIGTERM while the block runs (a cluster starting) take effect when it ends; a second at once.

    Cut short while its worker processes start, a LocalCluster is left half made: nothing closes it but
    distributed's exit hook, which fails on workers still starting ("AssertionError: Status.init"), and a
    process spawned just then prints "EOFError: Ran out of input". Once started, the cluster is closed
    as on any Ctrl-C. SIGHUP is left to :func:`_sighup_ignored_by_children` (its SIG_IGN is what the
    workers must inherit).
    """
    pending = []

    def interrupt(signum):
        return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

    def handler(signum, frame):
        if pending:  # asked twice: now
            raise interrupt(signum)
        pending.append(signum)
        with contextlib.suppress(OSError):
            os.write(sys.stderr.fileno(), b"dgmm: stopping once the cluster has started (again: at once)\n")

    with _signal_handlers((signal.SIGINT, signal.SIGTERM), handler):
        yield
    if pending:
        raise interrupt(pending[0])


def _sighup_ignored_by_children():
    """SIGHUP ignored while the LocalCluster starts its processes, which inherit that (an ignored signal stays
    ignored across exec): multiprocessing's resource tracker ignores SIGINT and SIGTERM but not SIGHUP, and a
    closed terminal killed it, with a dozen KeyError tracebacks. The command's own handler is put back after."""
    return _signal_handlers((signal.SIGHUP,), signal.SIG_IGN)


#: Seconds between two looks at the cluster's workers (:func:`_watch_workers`).
WORKER_WATCH_INTERVAL = 3.0


@contextlib.contextmanager
def _watch_workers(client, kind: str):
    """Say when workers leave or come back while a command runs, and above all when none is left.

    Without workers a distributed computation waits, silently, for one to join: a fit whose jobs all
    ended (walltime, preemption, scancel) or whose workers were all killed looked hung. A daemon
    thread asks the scheduler for its workers every few seconds and logs the changes.
    """
    stop = threading.Event()
    advice = {"jobqueue": "jobs that ended are not replaced", "address": "start workers for the scheduler",
              "local": "the LocalCluster restarts its worker processes"}.get(kind, "")

    def count() -> int | None:
        try:
            return len(client.nthreads())
        except Exception:  # noqa: BLE001 (closing, or the scheduler gone: the computation reports that)
            return None

    def watch():
        seen = count()
        while not stop.wait(WORKER_WATCH_INTERVAL):
            now = count()
            if now is None or seen is None or now == seen:
                seen = now if now is not None else seen
                continue
            if now == 0:
                logger.warning("cluster: no workers left; the computation waits for workers to join (%s; Ctrl-C "
                               "stops, and 'dgmm fit --resume' continues from the last checkpoint)", advice)
            elif now < seen:
                logger.warning("cluster: %d of %d workers left; the others carry on", seen - now, seen)
            else:
                report("workers", f"cluster: {now} worker{'' if now == 1 else 's'} now", n_workers=now)
            seen = now

    thread = threading.Thread(target=watch, name="dgmm-watch-workers", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _probe_scheduler(address: str, timeout: float) -> None:
    """Connect to ``address`` and complete distributed's handshake within ``timeout`` seconds, or raise OSError.

    ``Client(address, timeout=...)`` bounds the TCP connect but then waits for the
    handshake reply without a limit, so a peer that accepts connections and never
    answers (a wrong port, a stuck proxy or tunnel) would hang it forever. The probe
    runs on its own event loop in a daemon thread, so it also works under a running loop.
    """
    import asyncio
    import socket

    from distributed.comm import connect
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.security import Security

    scheme, location = parse_address(address)
    if scheme == "tcp":  # a refused connection or an unknown host is final: say so now, not after the timeout
        try:
            host, port = parse_host_port(location)
            with socket.create_connection((host, port), timeout=min(timeout, 5.0)):
                pass
        except ConnectionRefusedError:
            raise OSError(f"cannot reach the scheduler at {address}: connection refused (is a scheduler running "
                          "there?); check cluster.address") from None
        except socket.gaierror as exc:
            raise OSError(f"cannot reach the scheduler at {address}: unknown host ({exc}); check cluster.address") \
                from None
        except (OSError, ValueError):
            pass  # timeouts, unreachable networks, odd addresses: the probe below reports them

    async def probe():
        # (a little longer than connect's own timeout, so that its error, e.g. a refused connection, shows)
        comm = await asyncio.wait_for(
            connect(address, timeout=timeout, **Security().get_connection_args("client")), timeout + 1)
        await comm.close()

    failure: list = []

    def run():
        try:
            asyncio.run(probe())
        except BaseException as exc:  # reported below
            failure.append(exc)

    thread = threading.Thread(target=run, name="dgmm-probe-scheduler", daemon=True)
    thread.start()
    thread.join(timeout + 5)
    if thread.is_alive() or failure:
        reason = "connected, but no answer to the handshake"
        if failure and not isinstance(failure[0], (asyncio.TimeoutError, TimeoutError)):
            reason = f"{type(failure[0]).__name__}: {failure[0]}"
        raise OSError(f"cannot reach the scheduler at {address} within {timeout:g} s ({reason}); "
                      "check cluster.address or raise cluster.timeout")


def _jobqueue_cluster(jq, config):
    previous_sigint = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError("cluster.jobqueue needs dask-jobqueue: pip install 'dgmm[hpc]'") from None
    finally:
        # dask_jobqueue installs a SIGINT handler that calls sys.exit(); keep Ctrl-C a KeyboardInterrupt
        # so an interrupted fit reports it, leaves its checkpoint and exits with 130.
        signal.signal(signal.SIGINT, previous_sigint)
    cls = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}[jq.system]
    cluster = getattr(dask_jobqueue, cls)(**_jobqueue_kwargs(jq, config.read_ahead, config.dashboard_address))
    try:
        _submit_jobs(cluster, jq)
    except BaseException:
        cluster.close()  # cancels the jobs that were submitted
        raise
    return cluster


def _wait_for_jobqueue_workers(client, cluster, jq, poll: float = 5.0) -> None:
    """Wait up to ``wait_timeout`` for a first worker; on Slurm, fail as soon as every job has left the queue
    (they ended without a worker: see their logs), and on timeout say what the queue says of the jobs."""
    deadline = time.monotonic() + jq.wait_timeout
    while True:
        try:
            client.wait_for_workers(1, timeout=max(0.1, min(poll, deadline - time.monotonic())))
            return
        except (TimeoutError, OSError):
            pass
        states = _slurm_job_states(cluster) if jq.system == "slurm" else None
        logs = f" (their output: {jq.log_directory})" if jq.log_directory else " (their output files)"
        if states is not None and not any(state.split()[0] in SLURM_WAITING_STATES for state in states.values()):
            listing = "; ".join(f"job {job} {state}" for job, state in states.items()) or "none left in squeue"
            raise OSError(f"the {jq.system} jobs ended before any worker joined ({listing}); see what they "
                          f"printed{logs}")
        if time.monotonic() >= deadline:
            queue = "; ".join(f"job {job} {state}" for job, state in (states or {}).items())
            said = f"; the queue says: {queue}" if queue else ""
            raise OSError(f"no {jq.system} worker joined within {jq.wait_timeout:g} s (cluster.jobqueue.wait_timeout)"
                          f"{said}; the jobs were cancelled")


#: Slurm job states in which a job may still start a worker.
SLURM_WAITING_STATES = ("PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED")


def _slurm_job_states(cluster) -> dict[str, str] | None:
    """``{job id: 'STATE (reason)'}`` of the cluster's jobs still in squeue; None when squeue cannot say."""
    import subprocess

    ids = [job.job_id for job in cluster.workers.values() if getattr(job, "job_id", None)]
    if not ids:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(ids)], capture_output=True,
                             text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # squeue -j fails when none of the ids is known any more
        return {} if "Invalid job id" in out.stderr else None
    states = {}
    for line in out.stdout.splitlines():
        job, state, reason = (line.split(None, 2) + ["", ""])[:3]
        states[job] = f"{state} ({reason})" if reason and reason != "None" else state
    return states


class _SubmissionErrorsReported(logging.Filter):
    """Drop tornado's 'Exception in callback ... _correct_state_internal' record: :func:`_submit_jobs` reports it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_correct_state_internal" not in record.getMessage()


def _submit_jobs(cluster, jq) -> None:
    """Submit the jobs and wait for the batch system to accept them, so that a refused submission (a wrong
    queue or account, a limit) is an error now, with the batch system's words, not a wait of wait_timeout.

    ``cluster.scale`` only schedules the submissions; awaiting the cluster's state correction runs them.
    """
    tornado_log = logging.getLogger("tornado.application")
    if not any(isinstance(f, _SubmissionErrorsReported) for f in tornado_log.filters):
        tornado_log.addFilter(_SubmissionErrorsReported())

    async def submit():
        cluster.scale(jobs=jq.jobs)
        await cluster._correct_state()

    try:
        cluster.sync(submit)
    except RuntimeError as exc:  # dask-jobqueue: "Command exited with non-zero exit code ... stderr: ..."
        for name, job in list(cluster.workers.items()):  # never submitted: nothing to cancel, nothing to close
            if getattr(job, "job_id", None) is None:
                cluster.workers.pop(name)
                cluster.worker_spec.pop(name, None)
                cluster._created.discard(job)  # (SpecCluster.close asserts every created worker was closed)
        text = str(exc)
        detail = text.split("stderr:", 1)[1].strip() if "stderr:" in text else text.strip()
        raise OSError(f"cluster.jobqueue: the {jq.system} job submission failed: {' '.join(detail.split())}") \
            from None


def _jobqueue_kwargs(jq, read_ahead: bool, dashboard_address: str | None = "127.0.0.1:0") -> dict:
    """dask-jobqueue cluster arguments for a ``cluster.jobqueue`` section.

    With ``read_ahead`` each worker process runs :data:`READ_AHEAD_THREADS_PER_CORE`
    threads per core of its share of ``cores``, while the job still books
    ``cores`` CPUs from the batch system (Slurm ``job_cpu``, LSF ``ncpus``, PBS
    ``resource_spec``; SGE books CPUs only through ``job_extra_directives``).
    The scheduler listens where the jobs can reach it (``interface``, or every
    interface); its dashboard, which has no login, on ``cluster.dashboard_address``
    (this machine only by default: reach it through an SSH tunnel).
    """
    processes = jq.processes or 1
    kwargs = dict(cores=jq.cores, memory=jq.memory, processes=processes,
                  job_extra_directives=jq.job_extra_directives, job_script_prologue=jq.job_script_prologue,
                  silence_logs="error", scheduler_options={"dashboard_address": dashboard_address})
    if dashboard_address is None:
        # no dashboard; the scheduler still serves /health and /metrics, by default on every interface's
        # port 8787 (a clash with another cluster's dashboard): on a free port of this machine only
        kwargs["scheduler_options"] = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
    for name in ("walltime", "queue", "account", "interface", "local_directory", "log_directory"):
        value = getattr(jq, name)
        if value is not None:
            kwargs[name] = value
    if jq.system in ("lsf", "sge") and "account" in kwargs:
        kwargs["project"] = kwargs.pop("account")
    if read_ahead:
        per_process = max(1, jq.cores // processes)  # dask-jobqueue: threads per process = int(cores / processes)
        kwargs["cores"] = READ_AHEAD_THREADS_PER_CORE * per_process * processes
        if jq.system == "slurm":
            kwargs["job_cpu"] = jq.cores
        elif jq.system == "lsf":
            kwargs["ncpus"] = jq.cores
        elif jq.system == "pbs":
            from dask.utils import parse_bytes
            from dask_jobqueue.pbs import pbs_format_bytes_ceil

            kwargs["resource_spec"] = f"select=1:ncpus={jq.cores}:mem={pbs_format_bytes_ceil(parse_bytes(jq.memory))}"
    return kwargs


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def _open_data(config: Config, *, fitted_columns: list[str] | None = None):
    """The config's input as a lazy dask array, and the names of the Parquet columns it reads (None for Zarr, npy).

    ``fitted_columns``: the named columns the model to apply was fitted on.
    A Parquet input is then read by those names when ``input.columns`` is
    not set, so a table with more (or reordered) columns still gives the
    model its own features.
    """
    from .io import InputSelectionError, input_format, open_as, open_zarr_component, parquet_feature_names

    inp = config.input
    columns, by_name, named = None, False, ""
    try:
        fmt = input_format(inp.path, format=inp.format, storage_options=inp.storage_options)
        if fmt == "parquet" and inp.columns is None and fitted_columns:
            columns, by_name = list(fitted_columns), True
            named = f", the model's columns {', '.join(columns)}"
        elif fmt == "parquet":  # input.columns, or the numeric columns of the first file's footer
            columns = parquet_feature_names(inp.path, columns=inp.columns, storage_options=inp.storage_options)
        picked = None
        if fmt == "zarr":  # the array and the one it picked in a group, from one look at the store
            X, picked = open_zarr_component(inp.path, component=inp.component, storage_options=inp.storage_options,
                                            chunk_rows=inp.chunk_rows)
        else:
            X = open_as(fmt, inp.path, columns=columns, storage_options=inp.storage_options, chunk_rows=inp.chunk_rows)
    except InputSelectionError as exc:  # the data is there, the setting does not fit it: fix the config
        if by_name:
            raise ConfigError(f"{config.source}: input.columns: {exc}; the model {config.output.model} was fitted "
                              f"on the columns {', '.join(fitted_columns)}, which are read by name unless "
                              "input.columns says otherwise") from None
        raise ConfigError(f"{config.source}: {exc.key}: {exc}") from None
    except FileNotFoundError as exc:  # a URL (a local input.path was checked with the config)
        raise ConfigError(f"{config.source}: input.path: {exc}") from None
    except PermissionError as exc:  # an object store's "Forbidden", "Access Denied": say what was refused
        raise PermissionError(f"{inp.path}: access denied ({exc}); check the credentials (the environment, "
                              "~/.aws, the instance's role) and input.storage_options") from None
    if inp.columns is not None and fitted_columns and list(inp.columns) != list(fitted_columns):
        logger.warning("input.columns (%s) are not the columns the model %s was fitted on (%s)",
                       ", ".join(inp.columns), config.output.model, ", ".join(fitted_columns))
    if fmt == "zarr" and inp.component is None and picked:
        named += f", array {picked!r} (the group's one 2-D array)"
    n_chunks = X.numblocks[0]
    report("data", f"data: {inp.path} ({X.shape[0]:,} rows x {X.shape[1]} features{named}, {n_chunks} "
                   f"chunk{'s' if n_chunks != 1 else ''}, {X.dtype})", path=inp.path, n_samples=X.shape[0],
           n_features=X.shape[1], n_chunks=n_chunks, dtype=str(X.dtype), columns=columns)
    if inp.device == "gpu":
        from .namespace import to_gpu

        X = to_gpu(X)
        report("device", "data: chunks move to the GPU as they are read (input.device: gpu)", device="gpu")
    return X, columns


def _generate_synthetic(config: Config) -> None:
    from .datasets import write_blobs_zarr

    syn, path = config.input.synthetic, config.input.path
    if syn is None or os.path.exists(path):
        return
    t0 = time.perf_counter()
    import dask

    with dask.config.set(scheduler="threads"):
        write_blobs_zarr(path, syn.n_samples, syn.n_features, syn.n_components, chunk_rows=syn.chunk_rows,
                         seed=syn.seed)
    report("data_written", f"data: wrote {path} ({syn.n_samples:,} rows x {syn.n_features} features) in "
                           f"{time.perf_counter() - t0:.1f} s", path=path, n_samples=syn.n_samples)


def _print_parameters(model) -> None:
    import numpy as np

    with np.printoptions(precision=3, suppress=True):
        report("weights", f"weights: {model.weights_}", weights=model.weights_)
        report("means", f"means:\n{model.means_}", means=model.means_)


@contextlib.contextmanager
def _writer_lock(config: Config, what: str):
    """One writer at a time for a local checkpoint (else a local model): see :func:`dgmm.checkpoint.exclusive_writer`."""
    from .checkpoint import exclusive_writer
    from .io import is_url

    target = config.output.checkpoint_path or config.output.model
    if target is None or is_url(target):
        yield
        return
    with exclusive_writer(target, what):
        yield


def run_fit(config: Config, *, resume: bool = False) -> int:
    """Fit the model a validated config describes and write it (and checkpoints).

    One fit at a time writes a given checkpoint (or local model): a second is refused.
    """
    from . import GaussianMixture
    from .checkpoint import fingerprint_mismatch, load_checkpoint

    checkpoint = config.output.checkpoint_path
    if resume and checkpoint is None:
        raise ConfigError(f"{config.source}: output.checkpoint_every: --resume needs checkpoints "
                          "(checkpoint_every >= 1 and a local output.model or output.checkpoint)")
    out = config.output
    progress = IterationReporter()
    gm = GaussianMixture(**config.model.estimator_params(), callbacks=[progress],
                         checkpoint=checkpoint, checkpoint_every=max(out.checkpoint_every, 1))
    state = load_checkpoint(checkpoint) if resume and checkpoint is not None and os.path.exists(checkpoint) else None
    if state is not None:
        # Settings first, before a cluster starts or data is read; the data's digest is checked by fit.
        settings = gm._settings_fingerprint()
        mismatched = fingerprint_mismatch({k: state.fingerprint.get(k) for k in settings}, settings)
        if mismatched:
            raise ConfigError(f"{config.source}: --resume: the checkpoint {checkpoint} was written with other model "
                              f"settings (differs in: {', '.join(mismatched)}); restore them, or fit anew without "
                              "--resume")
    _generate_synthetic(config)
    X, columns = _open_data(config)
    source = _describe_input(config, columns)
    _check_parameter_memory(config, X, config.model.n_components, [config.model.covariance_type])
    _report_columns(config, source)
    resumed_from = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        if state is not None:
            resumed_from = state.n_iter
            report("resume", f"resuming from {checkpoint} after iteration {resumed_from}", checkpoint=checkpoint,
                   n_iter=resumed_from)
        else:
            report("checkpoint", f"note: replacing the checkpoint {checkpoint} of an earlier fit "
                                 "(dgmm fit --resume would continue it)", checkpoint=checkpoint)
    elif resume:
        logger.warning("--resume: no checkpoint at %s; fitting from the start", checkpoint)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        with _writer_lock(config, "dgmm fit"):  # from here on this process writes the checkpoint and model
            seconds = _fit_on_cluster(gm, X, config, resume, progress)
            _save_fitted(gm, X, config, source, started, seconds, progress, resumed_from)
    except KeyboardInterrupt:
        if checkpoint is not None and os.path.exists(checkpoint):  # none yet while initialising
            logger.warning("interrupted; 'dgmm fit %s --resume' continues from %s", config.source, checkpoint)
        raise
    return 0


@contextlib.contextmanager
def _parquet_nulls_named(config: Config):
    """An error about NaN in a Parquet input says that nulls are read as NaN: what such an input usually holds."""
    from .chunk import NonFiniteInputError

    try:
        yield
    except NonFiniteInputError as exc:
        from .config import _input_is_parquet

        if not _input_is_parquet(config.input):
            raise
        raise NonFiniteInputError(f"{exc} In a Parquet input, nulls (missing values) are read as NaN: fill or drop "
                                  "them (e.g. pyarrow.compute.fill_null), or choose other input.columns.") from None


def _fit_on_cluster(gm, X, config: Config, resume: bool, progress: IterationReporter) -> float:
    """``gm.fit(X)`` on the config's cluster; the seconds it took."""
    with _parquet_nulls_named(config), open_cluster(config.cluster) as client:
        t0 = time.perf_counter()
        X = _persist_input(X, client, config)
        seconds = config.cluster.stall_warning
        with StallWatch(client, seconds, progress, config.cluster.kind != "address") \
                if client is not None and seconds else contextlib.nullcontext(), init_progress(progress):
            gm.fit(X, resume=resume)
        return time.perf_counter() - t0


def _save_fitted(gm, X, config: Config, source, started, seconds: float, progress, resumed_from) -> None:
    """Write the fitted model with its metadata, drop the checkpoint it supersedes, report the fit."""
    out = config.output
    checkpoint = out.checkpoint_path
    iterations_run = len(progress.iteration_seconds)
    per_iteration = sum(progress.iteration_seconds) / iterations_run if iterations_run else 0.0
    metadata = {
        "source": source,
        "n_samples": int(X.shape[0]),
        "n_chunks": int(X.numblocks[0]),
        "cluster": config.cluster.kind,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "seconds_per_iteration": round(per_iteration, 4) if iterations_run else None,
        "resumed_from_iteration": resumed_from or None,
        "config": config.to_dict(),
    }
    _name_features(gm, source)
    _save_model(gm, out.model, metadata, out.storage_options)
    if checkpoint is not None and os.path.exists(checkpoint):
        os.remove(checkpoint)  # the committed model supersedes it
    # the kept restart's own count (with n_init > 1 the passes of this run may be more: restarts ran on)
    this_run = f" ({max(gm.n_iter_ - resumed_from, 0)} after resuming from iteration {resumed_from})" \
        if resumed_from else ""
    report("fit", f"fit: {gm.n_iter_} EM iterations{this_run} in {seconds:.1f} s "
                  f"({per_iteration:.2f} s per iteration), converged={gm.converged_}",
           n_iter=gm.n_iter_, seconds=seconds, seconds_per_iteration=per_iteration, converged=gm.converged_)
    report("lower_bound", f"lower bound (mean log-likelihood per row): {gm.lower_bound_:.6f}",
           lower_bound=float(gm.lower_bound_))
    report("model", f"model: {out.model}", path=out.model)
    _print_parameters(gm)


def _describe_input(config: Config, columns: list[str] | None) -> dict:
    """The model metadata's ``source``: the input as configured, and the names of the columns read (Parquet)."""
    from .io import describe_source

    inp = config.input
    return describe_source(inp.path, format=inp.format, component=inp.component, columns=inp.columns,
                           feature_names=columns)


def _check_parameter_memory(config: Config, X, n_components: int, kinds, where: str = "model.covariance_type") -> None:
    """The estimator's memory check, before any cluster starts: the data's shape is known from its metadata.

    ``where``: what the error blames (the config key, or ``select``'s flags).
    """
    from .validation import check_parameter_memory

    try:
        for kind in kinds:
            check_parameter_memory(n_components, X.shape[1], kind, config.model.n_init, X.shape[0])
    except MemoryError as exc:
        raise ConfigError(f"{config.source}: {where}: {exc}") from None


def _name_features(model, source: dict) -> None:
    """A model fitted on named Parquet columns gets them as ``feature_names_in_``, as a fit on a DataFrame would:
    loaded in Python it then checks a DataFrame's columns (and warns for unnamed arrays) as sklearn does."""
    import numpy as np

    names = source.get("feature_names")
    if names and getattr(model, "feature_names_in_", None) is None:
        model.feature_names_in_ = np.asarray(names, dtype=object)


def _report_columns(config: Config, source: dict) -> None:
    """Name the Parquet columns a fit reads when the config lets dgmm choose them (every numeric one)."""
    names = source.get("feature_names")
    if names and config.input.columns is None:
        report("columns", f"columns: {', '.join(names)} (every numeric column; input.columns chooses others)",
               columns=names)


def _model_feature_names(meta: dict) -> list[str] | None:
    """The names of the features a model was fitted on, from its metadata: ``feature_names_in_`` (a fit on a
    DataFrame), else the columns its ``dgmm fit`` read; None when they had no names."""
    source = meta.get("fit", {}).get("source")
    names = meta.get("fitted", {}).get("feature_names") or (source.get("feature_names")
                                                          if isinstance(source, dict) else None)
    return [str(name) for name in names] if names else None


def _open_with_model(config: Config):
    """The config's input and model, the model file read once: (X, columns, model)."""
    from .model_io import load_model_and_metadata

    model, meta = load_model_and_metadata(config.output.model, storage_options=config.output.storage_options)
    X, columns = _open_data(config, fitted_columns=_model_feature_names(meta))
    return X, columns, _model_for(config, model, X, columns)


def _model_for(config: Config, model, X, columns: list[str] | None):
    """The config's model, checked against ``X`` (read from the Parquet ``columns``, or unnamed: None)."""
    if X.shape[1] != model.n_features_in_:  # the config pairs a model with data it does not fit
        raise ConfigError(f"{config.source}: input.path: {config.input.path} has {X.shape[1]} features, but the "
                          f"model {config.output.model} was fitted on {model.n_features_in_}")
    names = getattr(model, "feature_names_in_", None)
    if names is not None and columns is not None and list(columns) == [str(name) for name in names]:
        del model.feature_names_in_  # the columns were read by these names: nothing left for sklearn to warn of
    return model


def run_predict(config: Config) -> int:
    """Write per-row predictions of the config's model for its input."""
    from .io import write_predictions

    X, columns, model = _open_with_model(config)
    p = config.predict
    fmt = p.resolved_format()
    keep = _kept_columns(config) if p.keep_columns else None
    if columns is not None and keep is None:  # a Parquet input without key columns: rows join by position only
        from .io import parquet_order_differs

        order = parquet_order_differs(config.input.path, config.input.storage_options)
        if order:
            logger.warning("%s: rows are predicted in dask's file order (%s before %s), which pandas.read_parquet "
                           "and pyarrow do not follow: join the predictions to the input by a key column "
                           "(predict.keep_columns), not by row position", config.input.path, *order)
    with _parquet_nulls_named(config), open_cluster(config.cluster):
        t0 = time.perf_counter()
        marker = write_predictions(model, X, p.output, format=fmt, labels=p.labels, probabilities=p.probabilities,
                                   log_likelihood=p.log_likelihood, storage_options=p.storage_options,
                                   overwrite=p.overwrite, compressor=p.compressor, keep=keep,
                                   nonfinite=p.nonfinite,
                                   attributes={"model": config.output.model, "input": config.input.path})
        seconds = time.perf_counter() - t0
    report("predict", f"predictions: {p.output} ({fmt}, {marker['n_rows']:,} rows: "
                      f"{', '.join(marker['arrays'])}) in {seconds:.1f} s",
           path=p.output, format=fmt, n_rows=marker["n_rows"], arrays=list(marker["arrays"]), seconds=seconds)
    return 0


def _kept_columns(config: Config):
    """``predict.keep_columns`` of the Parquet input (:class:`dgmm.io.ParquetColumns`), row-aligned with the data."""
    from .io import InputSelectionError, input_format, parquet_columns

    inp = config.input
    fmt = input_format(inp.path, format=inp.format, storage_options=inp.storage_options)
    if fmt != "parquet":
        raise ConfigError(f"{config.source}: predict.keep_columns: copies Parquet columns, but {inp.path} is {fmt}")
    try:
        return parquet_columns(inp.path, config.predict.keep_columns, storage_options=inp.storage_options,
                                    chunk_rows=inp.chunk_rows, key="predict.keep_columns")
    except InputSelectionError as exc:
        raise ConfigError(f"{config.source}: {exc.key}: {exc}") from None


def run_score(config: Config) -> int:
    """Print the mean log-likelihood, BIC and AIC of the config's model on its input."""
    X, columns, model = _open_with_model(config)
    with _parquet_nulls_named(config), open_cluster(config.cluster):
        t0 = time.perf_counter()
        score = model.score(X)
        seconds = time.perf_counter() - t0
    n = int(X.shape[0])
    n_parameters = model._n_parameters()
    bic = -2 * score * n + n_parameters * math.log(n)
    aic = -2 * score * n + 2 * n_parameters
    report("score", f"score (mean log-likelihood per row): {score:.6f}\nbic: {bic:.6f}\naic: {aic:.6f}",
           score=score, bic=bic, aic=aic, n_samples=n, n_parameters=n_parameters, seconds=seconds)
    return 0


def _parse_components(text: str) -> list[int]:
    """'1:8' (inclusive), '2,4,8' or '5' -> a list of component counts."""
    try:
        if ":" in text:
            lo, hi = (int(v) for v in text.split(":", 1))
            values = list(range(lo, hi + 1))
        else:
            values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--n-components: expected 'LO:HI' or a comma-separated list of ints, got {text!r}") from None
    if ":" in text and not values:
        raise ConfigError(f"--n-components: the range {text!r} is empty (LO:HI with LO <= HI, both included)")
    if not values or min(values) < 1:
        raise ConfigError(f"--n-components: needs at least one value >= 1, got {text!r}")
    return values


def _parse_covariance_types(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = sorted(set(kinds) - {"full", "tied", "diag", "spherical"})
    if unknown or not kinds:
        raise ConfigError(f"--covariance-types: expected a comma-separated subset of full,tied,diag,spherical, "
                          f"got {text!r}")
    return kinds


def run_select(config: Config, n_components, kinds, criterion: str, table: str | None) -> int:
    """Sweep n_components x covariance types on the config's input; write the best model and a table."""
    params = config.model.estimator_params()
    params.pop("n_components", None)
    params.pop("covariance_type", None)
    params.pop("warm_start", None)
    _generate_synthetic(config)
    X, columns = _open_data(config)
    source = _describe_input(config, columns)
    _check_parameter_memory(config, X, max(n_components), kinds, where="--n-components/--covariance-types")
    _report_columns(config, source)
    with _writer_lock(config, "dgmm select"):  # from here on this process writes the model
        return _select_and_save(config, X, source, n_components, kinds, criterion, table, params)


def _select_and_save(config: Config, X, source, n_components, kinds, criterion: str, table, params) -> int:
    from .selection import select

    with _parquet_nulls_named(config), open_cluster(config.cluster) as client:
        t0 = time.perf_counter()
        X = _persist_input(X, client, config)
        with init_progress():
            sweep = select(X, n_components=n_components, covariance_types=kinds, criterion=criterion, **params)
        seconds = time.perf_counter() - t0
    lines = [f"{'k':>4} {'type':>10} {'bic':>16} {'aic':>16} {'iter':>5} converged"]
    for i, row in enumerate(sweep.results):
        mark = " <- best" if i == sweep.best_index else ""
        lines.append(f"{row['n_components']:>4} {row['covariance_type']:>10} {row['bic']:>16.3f} "
                     f"{row['aic']:>16.3f} {row['n_iter']:>5} {row['converged']}{mark}")
    report("select", "\n".join(lines), results=sweep.results, best=sweep.results[sweep.best_index],
           n_passes=sweep.n_passes, seconds=seconds)
    best = sweep.best_estimator
    # the config that fits the chosen model alone (dgmm fit with it), and the grid it was chosen from
    fitted_config = config.to_dict()
    fitted_config["model"].update(n_components=int(best.n_components), covariance_type=best.covariance_type)
    fitted_config["output"].update(checkpoint=None, checkpoint_every=0)
    metadata = {"source": source,
                "n_samples": int(X.shape[0]), "cluster": config.cluster.kind,
                "selection": sweep.results, "criterion": criterion,
                "grid": {"n_components": [int(k) for k in n_components], "covariance_types": list(kinds)},
                "seconds": round(seconds, 3), "config": fitted_config}
    _name_features(best, source)
    _save_model(best, config.output.model, metadata, config.output.storage_options)
    report("model", f"best: n_components={best.n_components}, covariance_type={best.covariance_type} "
                    f"({sweep.n_passes} passes over the data in {seconds:.1f} s); model: {config.output.model}",
           path=config.output.model, n_components=best.n_components, covariance_type=best.covariance_type)
    if table:  # after the model: a table that cannot be written does not lose the sweep
        import csv
        import io as _io

        from .checkpoint import atomic_write_bytes

        buffer = _io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(sweep.results[0]))
        writer.writeheader()
        writer.writerows(sweep.results)
        atomic_write_bytes(table, buffer.getvalue().encode())
        report("table", f"table: {table}", path=table)
    return 0


def _cmd_select(args) -> int:
    n_components = _parse_components(args.n_components)
    kinds = _parse_covariance_types(args.covariance_types)
    config = load_config(args.config, args.set, command="fit")
    table = check_extra_output(config, "--table", args.table) if args.table else None
    return run_select(config, n_components, kinds, args.criterion, table)


def _cmd_fit(args) -> int:
    config = load_config(args.config, args.set, command="fit")
    return run_fit(config, resume=args.resume)


def _cmd_predict(args) -> int:
    overrides = list(args.set) + ([f"output.model={json.dumps(args.model)}"] if args.model else [])
    return run_predict(load_config(args.config, overrides, command="predict"))


def _save_model(model, path: str, metadata: dict, storage_options) -> None:
    """Save the fitted model; if it cannot be written to ``path``, a copy in the current directory keeps the fit.

    The output checks probe an object store before the fit, but credentials expire and stores fail during
    long fits: losing hours of computing to a failed upload is worse than a stray file.
    """
    from .model_io import save_model

    try:
        save_model(model, path, metadata=metadata, storage_options=storage_options)
    except Exception as exc:  # noqa: BLE001 (the store's own errors)
        rescue = "dgmm-unsaved-model-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + \
            ".npz"
        try:
            save_model(model, rescue, metadata=metadata)
        except Exception:  # noqa: BLE001
            rescue = None
        kept = f"; the model was saved to {os.path.abspath(rescue)} instead" if rescue else ""
        raise OSError(f"cannot write the model to {path} ({type(exc).__name__}: {str(exc).strip()}){kept}") \
            from None


def _cmd_score(args) -> int:
    overrides = list(args.set) + ([f"output.model={json.dumps(args.model)}"] if args.model else [])
    return run_score(load_config(args.config, overrides, command="score"))


def _cmd_check(args) -> int:
    import yaml

    command = {"select": "fit"}.get(args.command, args.command)
    config = load_config(args.config, args.set, command=command)
    if command is not None:
        _check_data_for(config, command)
    valid = "valid" if command is None else f"valid for 'dgmm {args.command}'"
    report("config", f"{config.source}: {valid}\n" + yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip(),
           config=config.to_dict(), command=args.command)
    return 0


def _check_data_for(config: Config, command: str) -> None:
    """What ``command`` checks of its data before any cluster starts (metadata and footers only, no rows):
    the model's columns and feature count, ``predict.keep_columns``, parameters that fit in memory."""
    if config.input.synthetic is not None and not os.path.exists(config.input.path):
        return  # generated by the command itself
    if command == "fit":
        X, _ = _open_data(config)
        _check_parameter_memory(config, X, config.model.n_components, [config.model.covariance_type])
        return
    X, columns, _ = _open_with_model(config)
    if command == "predict" and config.predict.keep_columns:
        _kept_columns(config)


def _storage_options(pairs: list[str]) -> dict:
    """``--storage-option KEY=VALUE`` flags as fsspec options (VALUE read as a YAML scalar: true, 3, text)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--storage-option: expected KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--storage-option: the value of {key.strip()!r} is not valid YAML: {value!r}") from None
    return options


def _load_named_model(path: str, storage_options):
    """The model file named on the command line and its metadata (one read); a missing one is a usage error
    (exit 2), as in a config."""
    from .model_io import load_model_and_metadata

    try:
        return load_model_and_metadata(path, storage_options=storage_options)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc) if str(exc) else f"{path}: no such model file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a model file") from None


def _cmd_info(args) -> int:
    import numpy as np

    options = _storage_options(args.storage_options)
    model, meta = _load_named_model(args.model, options)  # validates the whole file
    fitted, fit = meta.get("fitted", {}), meta.get("fit", {})
    source = fit.get("source") or {}
    if isinstance(source, str):  # models of dgmm select before it wrote the source as fit does
        source = {"path": source}
    lines = [
        f"model: {args.model} (dgmm model format {meta['format_version']}, written by dgmm {meta.get('dgmm_version')})",
        f"{meta['n_components']} components, {meta['covariance_type']} covariances, {meta['n_features']} features, "
        f"{meta.get('dtype')}",
        f"fit: {fitted.get('n_iter')} EM iterations, converged={fitted.get('converged')}, "
        f"lower bound {fitted.get('lower_bound')}",
    ]
    if source:
        lines.append(f"data: {source.get('path')} ({fit.get('n_samples')} rows) in {fit.get('seconds')} s "
                     f"on {fit.get('cluster')}")
    names = _model_feature_names(meta)
    if names:
        lines.append(f"features: {', '.join(names)}")
    with np.printoptions(precision=3, suppress=True):
        lines.append(f"weights: {model.weights_}")
        lines.append(f"means:\n{model.means_}")
    report("info", "\n".join(lines), metadata=meta, weights=model.weights_, means=model.means_)
    return 0


def _cmd_sample(args) -> int:
    import dask.array as da
    import numpy as np

    from .io import _filesystem, format_from_suffix, is_url, missing_bucket, write_bytes, write_table

    if args.n_samples < 1:
        raise ConfigError(f"--n-samples: must be >= 1, got {args.n_samples}")
    if args.output is not None and format_from_suffix(args.output) not in ("npy", "zarr", "parquet"):
        raise ConfigError(f"-o: {args.output}: the output must end in .npy, .zarr or .parquet (or omit -o for CSV "
                          "on stdout)")
    options = _storage_options(args.storage_options)
    model, meta = _load_named_model(args.model, options)
    if args.seed is not None:
        model.random_state = args.seed
    X, y = model.sample(args.n_samples)
    names = _model_feature_names(meta) or [f"x{j}" for j in range(X.shape[1])]
    out = args.output
    if out is None:
        import io

        buffer = io.StringIO()
        np.savetxt(buffer, np.column_stack([X, y]), delimiter=",", fmt="%.10g", header=",".join([*names, "label"]),
                   comments="")
        sys.stdout.write(buffer.getvalue())
        return 0
    fmt = format_from_suffix(out)
    fs, root = _filesystem(out, options)
    bucket = missing_bucket(fs, root) if is_url(out) else None
    if bucket is not None:
        raise ConfigError(f"-o: {out}: the bucket {bucket!r} does not exist (dgmm does not create buckets); "
                          "check the URL")
    if fs.exists(root) and not args.overwrite:
        raise ConfigError(f"-o: {out} exists; pass --overwrite or choose another path")
    if fmt == "npy":
        import io

        buffer = io.BytesIO()
        np.save(buffer, X, allow_pickle=False)
        write_bytes(out, buffer.getvalue(), options)
    else:  # zarr, parquet (checked above)
        arrays = {"X": da.from_array(X, chunks=(max(len(X), 1), -1)), "labels": da.from_array(y)}
        import dask

        with dask.config.set(scheduler="threads"):
            write_table(arrays, out, format=fmt, column_names={"X": names, "labels": ["label"]},
                        overwrite=args.overwrite, dimension_names={"X": ("sample", "feature")},
                        attributes={"model": args.model, "feature_names": names}, storage_options=options)
    report("sample", f"samples: {out} ({args.n_samples:,} rows x {X.shape[1]} features)", path=out,
           n_samples=args.n_samples)
    return 0


def _cmd_demo(args) -> int:
    overrides = [f"cluster.n_workers={'null' if args.workers is None else args.workers}"]
    if args.workers is not None:  # 0 or less is refused by the config check, as cluster.n_workers: 0 is
        overrides.append("cluster.threads_per_worker=1")
    if args.path is not None:
        stem = args.path.rstrip("/")
        stem = stem[: -len(".zarr")] if stem.endswith(".zarr") else stem
        overrides += [f"input.path={json.dumps(args.path)}", f"output.model={json.dumps(stem + '-model.npz')}",
                      f"predict.output={json.dumps(stem + '-predictions.zarr')}"]
    for flag, keys in (("n_samples", ["input.synthetic.n_samples"]), ("n_features", ["input.synthetic.n_features"]),
                       ("chunk_rows", ["input.synthetic.chunk_rows"]),
                       ("n_components", ["input.synthetic.n_components", "model.n_components"]),
                       ("covariance_type", ["model.covariance_type"]),
                       ("seed", ["input.synthetic.seed", "model.random_state"])):
        value = getattr(args, flag)
        if value is not None:
            overrides += [f"{key}={value}" for key in keys]
    config = parse_config(DEMO_CONFIG, source="dgmm demo", overrides=[*overrides, *args.set], command="fit")
    return run_fit(config)


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="print only warnings and errors")
    common.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="text lines, or one JSON object per line (default: %(default)s)")
    overrides = argparse.ArgumentParser(add_help=False)
    overrides.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config key, e.g. --set model.n_components=8 (value parsed as YAML)")

    parser = argparse.ArgumentParser(prog="dgmm", description="Gaussian mixtures by out-of-core EM over Dask arrays.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    fit = sub.add_parser("fit", parents=[common, overrides], help="fit the model a config describes")
    fit.add_argument("config", help="YAML config (see configs/)")
    fit.add_argument("--resume", action="store_true", help="continue from the last checkpoint, if there is one")
    fit.set_defaults(func=_cmd_fit)

    select_cmd = sub.add_parser("select", parents=[common, overrides],
                                help="sweep n_components x covariance types; write the best model by BIC/AIC")
    select_cmd.add_argument("config", help="YAML config (input, model defaults, cluster, output.model)")
    select_cmd.add_argument("--n-components", default="1:10", help="'LO:HI' inclusive or '2,4,8' (default: 1:10)")
    select_cmd.add_argument("--covariance-types", default="full,tied,diag,spherical",
                            help="comma-separated (default: %(default)s)")
    select_cmd.add_argument("--criterion", choices=["bic", "aic"], default="bic")
    select_cmd.add_argument("--table", help="also write the results table to this CSV file")
    select_cmd.set_defaults(func=_cmd_select)

    for name, func, text, needs in (
            ("predict", _cmd_predict, "write per-row labels, probabilities, log-likelihoods",
             "input, output.model and a predict section"),
            ("score", _cmd_score, "mean log-likelihood, BIC and AIC of the input", "input and output.model")):
        cmd = sub.add_parser(name, parents=[common, overrides], help=text)
        cmd.add_argument("config", help=f"YAML config: {needs}")
        cmd.add_argument("--model", help="model file (default: output.model of the config)")
        cmd.set_defaults(func=func)

    sample = sub.add_parser("sample", parents=[common], help="draw rows from a fitted model")
    sample.add_argument("model", help="model file written by 'dgmm fit'")
    sample.add_argument("--n-samples", "-n", type=int, default=1000, help="rows to draw (default: %(default)s)")
    sample.add_argument("--output", "-o", help=".npy, .zarr or .parquet (default: CSV on stdout)")
    sample.add_argument("--seed", type=int, default=None, help="random seed (default: the model's random_state)")
    sample.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    sample.set_defaults(func=_cmd_sample)

    info = sub.add_parser("info", parents=[common], help="what a model file holds")
    info.add_argument("model")
    info.set_defaults(func=_cmd_info)
    for command, urls in ((sample, "a model URL and an --output URL"), (info, "a model URL")):
        command.add_argument("--storage-option", dest="storage_options", action="append", default=[],
                             metavar="KEY=VALUE", help=f"fsspec option for {urls} (e.g. endpoint_url=http://..., "
                                                       "anon=true); repeatable. Credentials: the environment")

    check = sub.add_parser("check", parents=[common, overrides], help="validate a config and print it resolved")
    check.add_argument("config")
    check.add_argument("--for", dest="command", choices=["fit", "predict", "score", "select"], default=None,
                       help="also run the checks that command makes before it starts (its outputs may be written, "
                            "its model exists, ...); without it only the config itself is checked")
    check.set_defaults(func=_cmd_check)

    demo = sub.add_parser("demo", parents=[common, overrides],
                          help="generate a synthetic Zarr data set (if missing) and fit it on a LocalCluster")
    demo.add_argument("--path", default=None, help="where the Zarr array lives (default: data/demo.zarr)")
    demo.add_argument("--n-samples", type=int, default=None, help="default 2,000,000")
    demo.add_argument("--n-features", type=int, default=None, help="default 8")
    demo.add_argument("--n-components", type=int, default=None, help="default 4")
    demo.add_argument("--chunk-rows", type=int, default=None, help="default 250,000")
    demo.add_argument("--covariance-type", default=None, choices=["full", "tied", "diag", "spherical"])
    demo.add_argument("--workers", type=int, default=None, help="worker processes (default: sized to the machine)")
    demo.add_argument("--seed", type=int, default=None)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "quiet", False), getattr(args, "log_format", "text"))
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    from .checkpoint import CheckpointError
    from .io import MissingExtraError

    resume = "'dgmm fit --resume' continues from the last checkpoint" if args.func is _cmd_fit else ""
    try:
        with _terminate_as_interrupt():
            return args.func(args)
    except ConfigError as exc:
        logger.error("%s", exc, extra={"event": "error", "fields": {"kind": "config"}})
        return EXIT_CONFIG
    except CheckpointError as exc:
        logger.error("%s", exc, extra={"event": "error", "fields": {"kind": "checkpoint"}})
        return EXIT_FAILURE
    except (ValueError, OSError, TimeoutError, MemoryError) as exc:
        logger.error("%s", exc, extra={"event": "error", "fields": {"kind": type(exc).__name__}})
        return EXIT_FAILURE
    except MissingExtraError as exc:
        logger.error("%s", exc, extra={"event": "error", "fields": {"kind": "missing_extra"}})
        return EXIT_CONFIG
    except Terminated as exc:
        logger.error("terminated (%s)", exc.signal_name, extra={"event": "error", "fields": {"kind": "terminated"}})
        return 128 + exc.signum
    except KeyboardInterrupt:
        logger.error("interrupted", extra={"event": "error", "fields": {"kind": "interrupted"}})
        return EXIT_INTERRUPTED
    except Exception as exc:
        from .io import is_storage_error

        if is_storage_error(exc):  # an object store's client library: its message says what went wrong
            logger.error("%s: %s%s", type(exc).__name__, str(exc).strip(), resume and f"; {resume}",
                         extra={"event": "error", "fields": {"kind": type(exc).__name__}})
            return EXIT_FAILURE
        if _is_cancelled_future(exc):  # e.g. the scheduler died
            logger.error("the computation was cancelled: %s (was the scheduler, or the connection to it, lost?)%s",
                         " ".join(str(exc).split()).rstrip("."), resume and f"; {resume}",
                         extra={"event": "error", "fields": {"kind": "cancelled"}})
            return EXIT_FAILURE
        if not _is_killed_worker(exc):
            raise  # a bug: keep the traceback
        logger.error("%s Workers dying again and again may be running out of memory: raise cluster.memory_limit, "
                     "use smaller chunks or fewer threads per worker%s.", str(exc).strip(), resume and f" ({resume})",
                     extra={"event": "error", "fields": {"kind": "killed_worker"}})
        return EXIT_FAILURE


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a batch system's kill, walltime, a closed session), handled as Ctrl-C is.

    A KeyboardInterrupt, so every path that handles Ctrl-C applies: the fit
    writes its checkpoint and the ``--resume`` hint, jobqueue jobs are
    cancelled and clusters closed; the exit status is 128 + the signal number.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name


def _terminate_as_interrupt():
    """Turn SIGTERM and SIGHUP into :class:`Terminated` while a command runs (main thread only)."""

    def handler(signum, frame):
        raise Terminated(signum)

    return _signal_handlers((signal.SIGTERM, signal.SIGHUP), handler)


def _is_cancelled_future(exc: BaseException) -> bool:
    """True for distributed's FutureCancelledError (e.g. 'cancelled for reason: scheduler-connection-lost')."""
    if "distributed" not in sys.modules:
        return False
    from distributed.client import FutureCancelledError

    return isinstance(exc, FutureCancelledError)


def _is_killed_worker(exc: BaseException) -> bool:
    """True for distributed's KilledWorker: a task whose workers died ``allowed-failures`` times."""
    if "distributed" not in sys.modules:
        return False
    from distributed.scheduler import KilledWorker

    return isinstance(exc, KilledWorker)


if __name__ == "__main__":
    sys.exit(main())
