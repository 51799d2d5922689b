"""Dask preload that records every TCP message a scheduler or worker process sends or receives.

Load it with ``dask scheduler --preload scripts/netns_metrics.py`` (and the same for
``dask worker``). Nothing in dgmm imports it; ``scripts/netns_cluster.py`` uses it to count,
per EM iteration, the messages and bytes on each link of a multi-namespace cluster.

What it records, in this process, into ``server._dgmm_netlog`` (a :class:`NetLog`):

- ``messages``: one row per message on a TCP comm: (time, "w" or "r", local address,
  peer address, payload bytes, ops) where ops names the message's ``op`` (or the ops
  of a batched list of messages, ``"-"`` for replies without one);
- ``counters``: samples of this network namespace's ``/proc/net/dev`` (bytes and packets
  of every interface but ``lo``), every ``DGMM_NETLOG_SAMPLE_S`` seconds (default 0.02);
- on the scheduler: ``graphs``, one row per ``update_graph`` (time, number of tasks,
  names of the task groups), and ``tasks``, one row per task reaching memory (time,
  key, worker, nbytes).

Worker transfer logs (``transfer_incoming_log``) are read by the collector directly.

The instrumentation wraps ``distributed.comm.tcp.TCP.read``/``write`` and the
``from_frames`` they call; it changes no message and costs a few microseconds each.
"""

from __future__ import annotations

import contextvars
import os
import time
from collections import Counter

_READ_NBYTES: contextvars.ContextVar[int] = contextvars.ContextVar("dgmm_read_nbytes", default=0)


def _ops(msg) -> str:
    if isinstance(msg, dict):
        return str(msg.get("op", "-"))
    if isinstance(msg, (list, tuple)):
        counts = Counter(str(m.get("op", "-")) if isinstance(m, dict) else "-" for m in msg)
        return ",".join(f"{op}*{n}" if n > 1 else op for op, n in sorted(counts.items()))
    return "-"


def read_net_dev(path: str = "/proc/net/dev") -> tuple[int, int, int, int]:
    """(rx bytes, rx packets, tx bytes, tx packets) summed over every interface but ``lo``."""
    rx = rxp = tx = txp = 0
    with open(path) as f:
        for line in f.readlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                continue
            fields = rest.split()
            rx += int(fields[0])
            rxp += int(fields[1])
            tx += int(fields[8])
            txp += int(fields[9])
    return rx, rxp, tx, txp


class NetLog:
    """Rows recorded by this process; see the module docstring."""

    def __init__(self):
        self.messages: list[tuple] = []
        self.counters: list[tuple] = []
        self.graphs: list[tuple] = []
        self.tasks: list[tuple] = []

    def snapshot(self, reset: bool = False) -> dict:
        out = {"messages": list(self.messages), "counters": list(self.counters), "graphs": list(self.graphs),
               "tasks": list(self.tasks), "pid": os.getpid()}
        if reset:
            self.messages.clear()
            self.graphs.clear()
            self.tasks.clear()
            self.counters[:-1] = []
        return out


LOG = NetLog()


def _install_comm_wrappers() -> None:
    from distributed.comm import tcp

    if getattr(tcp.TCP, "_dgmm_wrapped", False):
        return
    original_read, original_write, original_from_frames = tcp.TCP.read, tcp.TCP.write, tcp.from_frames

    async def from_frames(frames, *args, **kwargs):
        _READ_NBYTES.set(sum(memoryview(f).nbytes for f in frames))
        return await original_from_frames(frames, *args, **kwargs)

    async def read(self, deserializers=None):
        msg = await original_read(self, deserializers)
        LOG.messages.append((time.time(), "r", self.local_address, self.peer_address, _READ_NBYTES.get(), _ops(msg)))
        return msg

    async def write(self, msg, serializers=None, on_error="message"):
        ops = _ops(msg)
        nbytes = await original_write(self, msg, serializers, on_error)
        LOG.messages.append((time.time(), "w", self.local_address, self.peer_address, int(nbytes), ops))
        return nbytes

    tcp.from_frames = from_frames
    tcp.TCP.read = read
    tcp.TCP.write = write
    tcp.TCP._dgmm_wrapped = True


def _start_counter_sampling(server) -> None:
    from tornado.ioloop import PeriodicCallback

    def sample():
        LOG.counters.append((time.time(), *read_net_dev()))

    sample()
    period_ms = 1000 * float(os.environ.get("DGMM_NETLOG_SAMPLE_S", "0.02"))
    callback = PeriodicCallback(sample, period_ms)
    callback.start()
    server._dgmm_netlog_callback = callback


def _scheduler_plugin():
    from dask.utils import key_split
    from distributed.diagnostics.plugin import SchedulerPlugin

    class GraphLog(SchedulerPlugin):
        name = "dgmm-netlog"

        def update_graph(self, scheduler, *, keys, tasks, **kwargs):
            groups = sorted({key_split(k) for k in tasks})
            LOG.graphs.append((time.time(), len(tasks), groups, [str(k) for k in keys]))

        def transition(self, key, start, finish, *args, **kwargs):
            if finish == "memory" and start == "processing":
                LOG.tasks.append((time.time(), str(key), kwargs.get("worker"), kwargs.get("nbytes")))

    return GraphLog()


def dask_setup(server) -> None:
    """Preload entry point: instrument this process's comms; log graphs on a scheduler."""
    _install_comm_wrappers()
    server._dgmm_netlog = LOG
    _start_counter_sampling(server)
    if type(server).__name__ == "Scheduler":
        server.add_plugin(_scheduler_plugin())
