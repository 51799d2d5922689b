#!/usr/bin/env python
"""`dgmm fit` on a Dask cluster whose processes live in separate Linux network namespaces.

Needs root and iproute2 (``ip netns``). One run:

1. creates a Linux bridge in the root namespace (no address on it, so nothing in the root
   namespace can reach the cluster and concurrent runs never collide) and one network
   namespace per role, each joined to the bridge by a veth pair, on 10.77.0.0/24::

       client    10.77.0.2    `dgmm fit` (and the collector of the metrics below)
       scheduler 10.77.0.10   `dask scheduler --host 10.77.0.10`
       worker i  10.77.0.11+i `dask worker --host 10.77.0.11+i --nthreads 1`

   Every message between two roles crosses two veth links and the bridge;
2. starts the scheduler and workers, each with the preload ``scripts/netns_metrics.py``
   (it records every TCP message and samples the namespace's /proc/net/dev);
3. for every ``--chunk-rows`` value, writes a Zarr array of ``--n-samples`` rows with that
   row chunking (same values each time), runs ``dgmm fit CONFIG`` in the client namespace
   with ``cluster.address: tcp://10.77.0.10:8786``, collects the metrics and splits them
   by EM iteration (one graph per iteration on the scheduler);
4. optionally (``--check-local``) fits the same array with the threaded scheduler in this
   process and compares the fitted parameters (rtol 1e-10);
5. tears everything down: processes (by their pids), namespaces, veths, the bridge.

``--delay-ms D`` puts a store-and-forward TCP proxy (``scripts/delay_proxy.py``) in front
of the scheduler and of every worker, adding D ms to every byte in each direction, so the
growth of the time per iteration counts the sequential network hops of an iteration.

Prints one summary per data set and, with ``--json PATH``, writes everything measured.

Examples
--------
::

    sudo python scripts/netns_cluster.py --workers 2 --n-samples 32000 --chunk-rows 4000,1000,250
    sudo python scripts/netns_cluster.py --delay-ms 20 --chunk-rows 4000,250
    sudo python scripts/netns_cluster.py --cleanup   # remove what a killed run left behind
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRELOAD = HERE / "netns_metrics.py"
PROXY = HERE / "delay_proxy.py"
PREFIX = "dgmm-ns-"
SUBNET = "10.77.0"
CLIENT_IP = f"{SUBNET}.2"
SCHEDULER_IP = f"{SUBNET}.10"
SCHEDULER_PORT = 8786
PROXY_PORT_OFFSET = 1  # a proxied server listens on PORT, its proxy on PORT + 1
WORKER_PORT = 9000


def netns_available() -> str | None:
    """None when network namespaces can be used here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"{PREFIX}probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], check=False, capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False, capture_output=True)
    return None


def _ip(*args, check=True):
    result = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def dask_command(*args) -> list[str]:
    """The `dask` console script of this interpreter's environment."""
    return [sys.executable, "-c", "import sys; from dask.__main__ import main; sys.exit(main())", *args]


class NetnsCluster:
    """A scheduler and ``n_workers`` workers, each in its own network namespace, plus a client namespace.

    Use as a context manager; everything it creates is removed on exit, even after errors.
    """

    def __init__(self, n_workers: int = 2, workdir: str | os.PathLike | None = None, delay_ms: float = 0.0,
                 nthreads: int = 1, memory_limit: str = "2GiB", worker_saturation: str | None = None, log=print):
        self.n_workers = n_workers
        self.worker_saturation = worker_saturation
        self.tag = secrets.token_hex(2)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dgmm-netns-"))
        self.delay_ms = delay_ms
        self.nthreads = nthreads
        self.memory_limit = memory_limit
        self.log = log
        self.bridge = f"dg{self.tag}br"
        self.namespaces: dict[str, str] = {}  # role -> namespace name
        self.addresses: dict[str, str] = {}  # role -> IP
        self.root_veths: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.proc_logs: list = []

    # -- network -----------------------------------------------------------

    @property
    def roles(self) -> list[str]:
        return ["client", "scheduler"] + [f"worker{i}" for i in range(self.n_workers)]

    def _make_network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for index, role in enumerate(self.roles):
            ns = f"{PREFIX}{self.tag}-{role}"
            ip = addresses_for(self.n_workers)[role]
            outside, inside = f"dg{self.tag}v{index}", f"dg{self.tag}p{index}"
            _ip("netns", "add", ns)
            self.namespaces[role] = ns
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            self.root_veths.append(outside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", inside, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            self.addresses[role] = ip

    # -- processes ---------------------------------------------------------

    def popen(self, role: str, argv: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        """Start ``argv`` in ``role``'s namespace (output to WORKDIR/NAME.log); stopped on close."""
        log = open(self.workdir / f"{name}.log", "wb")
        self.proc_logs.append(log)
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                    **(env or {})}
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespaces[role], *argv], stdout=log,
                                stderr=subprocess.STDOUT, env=full_env, cwd=self.workdir)
        self.procs.append(proc)
        return proc

    def run(self, role: str, argv: list[str], timeout: float = 600, env: dict | None = None,
            cwd=None) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion in ``role``'s namespace and capture its output."""
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        return subprocess.run(["ip", "netns", "exec", self.namespaces[role], *argv], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=cwd or self.workdir)

    @property
    def address(self) -> str:
        """The scheduler address clients and workers use (its proxy when delaying)."""
        port = SCHEDULER_PORT + (PROXY_PORT_OFFSET if self.delay_ms else 0)
        return f"tcp://{SCHEDULER_IP}:{port}"

    def _start_dask(self) -> None:
        env = {"DGMM_NETLOG_SAMPLE_S": "0.01"}
        if self.worker_saturation is not None:
            env["DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION"] = str(self.worker_saturation)
        self.popen("scheduler", dask_command(
            "scheduler", "--host", SCHEDULER_IP, "--port", str(SCHEDULER_PORT), "--no-dashboard", "--no-show",
            "--preload", str(PRELOAD)), "scheduler", env)
        if self.delay_ms:
            self._start_proxy("scheduler", SCHEDULER_IP, SCHEDULER_PORT)
        for i in range(self.n_workers):
            role = f"worker{i}"
            ip = self.addresses[role]
            argv = ["worker", self.address, "--nthreads", str(self.nthreads), "--no-nanny", "--no-dashboard",
                    "--name", role, "--memory-limit", self.memory_limit, "--local-directory",
                    str(self.workdir / role), "--preload", str(PRELOAD)]
            if self.delay_ms:
                argv += ["--listen-address", f"tcp://{ip}:{WORKER_PORT}",
                         "--contact-address", f"tcp://{ip}:{WORKER_PORT + PROXY_PORT_OFFSET}"]
                self._start_proxy(role, ip, WORKER_PORT)
            else:
                argv += ["--host", ip, "--worker-port", str(WORKER_PORT)]
            self.popen(role, dask_command(*argv), role, env)
        waited = self.run("client", [sys.executable, __file__, "_wait", "--address", self.address,
                                     "--workers", str(self.n_workers)], timeout=180)
        if waited.returncode != 0:
            raise RuntimeError(f"the cluster did not come up:\n{waited.stdout}{waited.stderr}\n{self.tail_logs()}")

    def _start_proxy(self, role: str, ip: str, port: int) -> None:
        self.popen(role, [sys.executable, str(PROXY), "--listen", f"{ip}:{port + PROXY_PORT_OFFSET}",
                          "--target", f"{ip}:{port}", "--delay-ms", str(self.delay_ms)], f"{role}-proxy")

    def tail_logs(self, lines: int = 15) -> str:
        out = []
        for path in sorted(self.workdir.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)

    def net_counters(self) -> dict[str, tuple[int, int, int, int]]:
        """(rx bytes, rx packets, tx bytes, tx packets) of every namespace's eth0, read by the kernel."""
        out = {}
        for role, ns in self.namespaces.items():
            text = _ip("netns", "exec", ns, "cat", "/proc/net/dev").stdout
            for line in text.splitlines()[2:]:
                name, _, rest = line.partition(":")
                if name.strip() == "eth0":
                    f = rest.split()
                    out[role] = (int(f[0]), int(f[1]), int(f[8]), int(f[9]))
        return out

    # -- lifetime ----------------------------------------------------------

    def __enter__(self) -> NetnsCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._make_network()
            self._start_dask()
        except BaseException:
            self.close()
            raise
        self.log(f"cluster {self.tag}: scheduler {self.address} in {self.namespaces['scheduler']}, "
                 f"{self.n_workers} workers ({', '.join(self.addresses[f'worker{i}'] for i in range(self.n_workers))})"
                 f", client {CLIENT_IP}" + (f", {self.delay_ms:g} ms proxies" if self.delay_ms else ""))
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process this cluster started (SIGTERM, then SIGKILL), remove its network."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self.procs.clear()
        for log in self.proc_logs:
            log.close()
        self.proc_logs.clear()
        for ns in self.namespaces.values():
            _ip("netns", "del", ns, check=False)
        for veth in self.root_veths:
            _ip("link", "del", veth, check=False)
        _ip("link", "del", self.bridge, check=False)
        self.namespaces.clear()
        self.root_veths.clear()


def leftovers(tag: str | None = None) -> list[str]:
    """Namespaces and root-namespace links of runs of this script (of the run ``tag``, else of any run)."""
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    found = [n for n in names if n.startswith(PREFIX + (f"{tag}-" if tag else ""))]
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if len(name) in (8, 9) and name.startswith("dg") and (name.endswith("br") or name[6:7] in ("v", "p")) \
                and (tag is None or name[2:6] == tag):
            found.append(name)
    return found


def cleanup() -> list[str]:
    """Remove namespaces and links that killed runs left behind; returns what was removed."""
    removed = leftovers()
    for name in removed:
        if name.startswith(PREFIX):
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)
        else:
            _ip("link", "del", name, check=False)
    return removed


# ---------------------------------------------------------------------------
# Run inside the client namespace
# ---------------------------------------------------------------------------


def _cmd_wait(args) -> int:
    from distributed import Client

    deadline = time.monotonic() + 120
    while True:  # a delay proxy may accept before the scheduler behind it listens: retry
        try:
            with Client(args.address, timeout=10) as client:
                client.wait_for_workers(args.workers, timeout=max(deadline - time.monotonic(), 1))
            return 0
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _cmd_collect(args) -> int:
    """Snapshot (and reset) the metrics of the scheduler and every worker into a JSON file."""
    from distributed import Client

    def scheduler_side(dask_scheduler, reset):
        return dask_scheduler._dgmm_netlog.snapshot(reset=reset)

    def worker_side(dask_worker, reset):
        out = dask_worker._dgmm_netlog.snapshot(reset=reset)
        out["transfer_incoming_log"] = [
            {"start": e["start"], "stop": e["stop"], "who": e["who"], "total": e["total"],
             "keys": {str(k): v for k, v in e["keys"].items()}} for e in dask_worker.transfer_incoming_log]
        out["address"] = dask_worker.address
        out["name"] = dask_worker.name
        if reset:
            dask_worker.transfer_incoming_log.clear()
            dask_worker.transfer_outgoing_log.clear()
        return out

    with Client(args.address, timeout=60) as client:
        scheduler = client.run_on_scheduler(scheduler_side, reset=args.reset)
        workers = client.run(worker_side, reset=args.reset)
    Path(args.out).write_text(json.dumps({"scheduler": scheduler, "workers": workers}, default=str))
    return 0


# ---------------------------------------------------------------------------
# Analysis: split the logs by EM iteration
# ---------------------------------------------------------------------------


def addresses_for(n_workers: int) -> dict[str, str]:
    """The role -> IP map of every :class:`NetnsCluster` with ``n_workers`` workers."""
    return {"client": CLIENT_IP, "scheduler": SCHEDULER_IP, **{f"worker{i}": f"{SUBNET}.{11 + i}"
                                                               for i in range(n_workers)}}


def _role_of(address: str, roles_by_ip: dict[str, str]) -> str:
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return roles_by_ip.get(host, "?")


def _kind(role: str) -> str:
    return "worker" if role.startswith("worker") else role


def _group(key: str) -> str:
    from dask.utils import key_split

    return key_split(key)


def _counter_at(samples: list, t: float) -> tuple:
    """The last /proc/net/dev sample at or before ``t`` (the first one if none)."""
    best = samples[0]
    for sample in samples:
        if sample[0] <= t:
            best = sample
        else:
            break
    return best


def analyse(metrics: dict, addresses: dict[str, str], group: str = "e_step_statistics",
            include_last: bool = False) -> list[dict]:
    """Per graph holding tasks of ``group`` (per EM iteration by default): messages and bytes per
    link, worker-to-worker transfers, kernel bytes, tasks.

    The windows run from the scheduler's receipt of a graph's ``update-graph`` message to that
    of the next graph. The last graph has no such end: it is left out, or with ``include_last``
    its window ends 0.25 s after its last task finished.
    """
    roles_by_ip = {ip: role for role, ip in addresses.items()}
    sched = metrics["scheduler"]
    workers = list(metrics["workers"].values())
    update_reads = sorted(m[0] for m in sched["messages"] if m[1] == "r" and "update-graph" in m[5])
    graphs = sorted(sched["graphs"], key=lambda g: g[0])
    starts = []
    for g in graphs:
        before = [t for t in update_reads if t <= g[0]]
        starts.append(before[-1] if before else g[0])
    windows = []
    for i, g in enumerate(graphs):
        if not any(group in name for name in g[2]):
            continue
        if i + 1 < len(graphs):
            windows.append((starts[i], starts[i + 1], g))
        elif include_last:
            done = [t for t, *_ in sched["tasks"] if t >= starts[i]]
            windows.append((starts[i], (max(done) if done else starts[i]) + 0.25, g))

    # every message once: as written by scheduler/workers, plus what the scheduler read from the client
    rows = []
    for m in sched["messages"]:
        if m[1] == "w":
            # behind a delay proxy every peer of the scheduler is the proxy, in its own namespace
            peer = _role_of(m[3], roles_by_ip)
            rows.append((m[0], "scheduler", "peer via proxy" if peer == "scheduler" else peer, m[4], m[5]))
        elif _role_of(m[3], roles_by_ip) == "client":
            rows.append((m[0], "client", "scheduler", m[4], m[5]))
    for w in workers:
        for m in w["messages"]:
            if m[1] == "w":
                rows.append((m[0], _role_of(m[2], roles_by_ip), _role_of(m[3], roles_by_ip), m[4], m[5]))
    rows.sort()

    out = []
    for start, stop, g in windows:
        links: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        ops: Counter = Counter()
        for t, src, dst, nbytes, op in rows:
            if start <= t < stop:
                link = f"{_kind(src)}->{_kind(dst)}"
                links[link][0] += 1
                links[link][1] += nbytes
                if link in ("scheduler->worker", "worker->scheduler", "worker->worker"):
                    for part in op.split(","):
                        name, _, n = part.partition("*")
                        ops[f"{link} {name}"] += int(n or 1)
        transfers: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for w in workers:
            for e in w["transfer_incoming_log"]:
                if start <= e["start"] < stop:
                    for key, nbytes in e["keys"].items():
                        transfers[_group(key)][0] += 1
                        transfers[_group(key)][1] += int(nbytes or 0)
        tasks_by_group: dict[str, Counter] = defaultdict(Counter)
        for t, key, worker, _ in sched["tasks"]:
            if start <= t < stop:
                tasks_by_group[_group(key)][_role_of(worker or "", roles_by_ip)] += 1
        kernel = {}
        for w in [sched, *workers]:
            role = "scheduler" if w is sched else _role_of(w["address"], roles_by_ip)
            a, b = _counter_at(w["counters"], start), _counter_at(w["counters"], stop)
            kernel[role] = {"rx_bytes": b[1] - a[1], "rx_packets": b[2] - a[2], "tx_bytes": b[3] - a[3],
                            "tx_packets": b[4] - a[4]}
        out.append({
            "seconds": stop - start,
            "graph_tasks": g[1],
            "links": {k: {"messages": v[0], "bytes": v[1]} for k, v in sorted(links.items())},
            "ops": dict(sorted(ops.items())),
            "transfers": {k: {"count": v[0], "bytes": v[1]} for k, v in sorted(transfers.items())},
            "tasks": {k: dict(v) for k, v in sorted(tasks_by_group.items())},
            "kernel": kernel,
        })
    return out


def _median(values):
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def summarise(iterations: list[dict]) -> dict:
    """Medians over the iterations (the first EM iteration is left out when there are others)."""
    its = iterations[1:] if len(iterations) > 1 else iterations
    links = sorted({k for it in its for k in it["links"]})
    groups = sorted({k for it in its for k in it["transfers"]})
    task_groups = sorted({k for it in its for k in it["tasks"]})
    roles = sorted({k for it in its for k in it["kernel"]})
    return {
        "iterations": len(its),
        "seconds": _median([it["seconds"] for it in its]),
        "graph_tasks": _median([it["graph_tasks"] for it in its]),
        "links": {k: {f: _median([it["links"].get(k, {}).get(f, 0) for it in its]) for f in ("messages", "bytes")}
                  for k in links},
        "transfers": {k: {f: _median([it["transfers"].get(k, {}).get(f, 0) for it in its]) for f in ("count", "bytes")}
                      for k in groups},
        "tasks": {k: {r: _median([it["tasks"].get(k, {}).get(r, 0) for it in its])
                      for r in sorted({r for it in its for r in it["tasks"].get(k, {})})} for k in task_groups},
        "kernel": {r: {f: _median([it["kernel"][r][f] for it in its if r in it["kernel"]])
                       for f in ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets")} for r in roles},
    }


def format_summary(label: str, s: dict) -> str:
    lines = [f"{label}: median of {s['iterations']} EM iterations: {s['seconds'] * 1000:.0f} ms, "
             f"{s['graph_tasks']} tasks in the graph"]
    for link, v in s["links"].items():
        lines.append(f"  {link:<20} {v['messages']:6d} messages {v['bytes']:>10,d} bytes")
    for group, v in s["transfers"].items():
        lines.append(f"  worker<-worker transfers of {group:<26} {v['count']:4d} ({v['bytes']:,d} bytes)")
    for group, by_role in s["tasks"].items():
        lines.append(f"  tasks {group:<30} " + ", ".join(f"{r}: {n}" for r, n in by_role.items()))
    for role, v in s["kernel"].items():
        lines.append(f"  kernel eth0 {role:<10} rx {v['rx_bytes']:>10,d} B / {v['rx_packets']:5d} pkts   "
                     f"tx {v['tx_bytes']:>10,d} B / {v['tx_packets']:5d} pkts")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def make_data(n_samples: int, n_features: int, seed: int = 0):
    """Three well-separated blobs with a little overlap (as the CLI tests' ``blobs``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centers = np.zeros((3, n_features))
    centers[1, 0], centers[1, 1:] = 5.0, 1.0
    centers[2, 0], centers[2, 1:] = 1.0, -4.0
    labels = rng.integers(0, 3, size=n_samples)
    return centers[labels] + rng.normal(size=(n_samples, n_features))


def write_zarr(path: Path, X, chunk_rows: int) -> None:
    import zarr

    zarr.open_array(str(path), mode="w", shape=X.shape, chunks=(chunk_rows, X.shape[1]), dtype="f8")[:] = X


def local_fit(path: Path, model: dict):
    """The same fit with dask's threaded scheduler in this process."""
    import dask
    import dask.array as da

    from dgmm import GaussianMixture

    with dask.config.set(scheduler="threads"):
        return GaussianMixture(**model).fit(da.from_zarr(str(path)))


def collect(cluster: NetnsCluster, path: Path) -> dict:
    """The metrics of the scheduler and workers since the last collection (then reset), also saved to ``path``."""
    collected = cluster.run("client", [sys.executable, __file__, "_collect", "--address", cluster.address,
                                       "--out", str(path), "--reset"], timeout=120)
    if collected.returncode != 0:
        raise RuntimeError(f"collecting metrics failed:\n{collected.stdout}{collected.stderr}")
    return json.loads(Path(path).read_text())


def fit_on_cluster(cluster: NetnsCluster, data: Path, model: dict, out: Path, timeout: float = 600) -> tuple:
    """`dgmm fit` in the client namespace, then the collected metrics (reset afterwards)."""
    import yaml

    config = {
        "input": {"path": str(data)},
        "model": model,
        "cluster": {"address": cluster.address, "timeout": 60},
        "output": {"model": str(out / "model.npz"), "checkpoint_every": 0, "overwrite": True},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = cluster.net_counters()
    t0 = time.perf_counter()
    fit = cluster.run("client", [sys.executable, "-m", "dgmm.cli", "fit", str(out / "config.yaml")],
                      timeout=timeout, cwd=out)
    seconds = time.perf_counter() - t0
    after = cluster.net_counters()
    if fit.returncode != 0:
        raise RuntimeError(f"dgmm fit failed ({fit.returncode}):\n{fit.stdout}\n{fit.stderr}\n{cluster.tail_logs()}")
    metrics = collect(cluster, out / "metrics.json")
    totals = {role: [b - a for a, b in zip(before[role], after[role])] for role in before}
    return fit, seconds, metrics, totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n-samples", type=int, default=24_000)
    parser.add_argument("--n-features", type=int, default=3)
    parser.add_argument("--n-components", type=int, default=3)
    parser.add_argument("--covariance-type", default="full")
    parser.add_argument("--chunk-rows", default="3000,750", help="comma-separated: one fit per value")
    parser.add_argument("--max-iter", type=int, default=6)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--worker-saturation", default=None,
                        help="the scheduler's distributed.scheduler.worker-saturation (default 1.1; 'inf': no queuing)")
    parser.add_argument("--check-local", action="store_true", help="compare with a threaded fit (rtol 1e-10)")
    parser.add_argument("--workdir", default=None, help="kept after the run (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="write everything measured here")
    parser.add_argument("--cleanup", action="store_true", help="only remove what killed runs left behind")
    sub = parser.add_subparsers(dest="internal")
    wait = sub.add_parser("_wait")
    wait.add_argument("--address", required=True)
    wait.add_argument("--workers", type=int, required=True)
    collect = sub.add_parser("_collect")
    collect.add_argument("--address", required=True)
    collect.add_argument("--out", required=True)
    collect.add_argument("--reset", action="store_true")
    args = parser.parse_args(argv)
    if args.internal == "_wait":
        return _cmd_wait(args)
    if args.internal == "_collect":
        return _cmd_collect(args)
    if args.cleanup:
        print("removed:", ", ".join(cleanup()) or "nothing")
        return 0
    why = netns_available()
    if why:
        print(f"network namespaces unavailable: {why}", file=sys.stderr)
        return 77

    import numpy as np

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dgmm-netns-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)
    X = make_data(args.n_samples, args.n_features)
    model = {"n_components": args.n_components, "covariance_type": args.covariance_type, "random_state": 0,
             "tol": 0.0, "max_iter": args.max_iter}
    report = {"workers": args.workers, "n_samples": args.n_samples, "n_features": args.n_features,
              "model": model, "delay_ms": args.delay_ms, "worker_saturation": args.worker_saturation, "runs": []}
    status = 0
    cluster = None
    try:
        with NetnsCluster(args.workers, workdir / "cluster", delay_ms=args.delay_ms,
                          worker_saturation=args.worker_saturation) as cluster:
            for rows in [int(r) for r in args.chunk_rows.split(",")]:
                data = workdir / f"x-{rows}.zarr"
                write_zarr(data, X, rows)
                n_chunks = -(-args.n_samples // rows)
                fit, seconds, metrics, totals = fit_on_cluster(cluster, data, model, workdir / f"fit-{rows}")
                iterations = analyse(metrics, cluster.addresses)
                summary = summarise(iterations)
                label = f"{n_chunks} chunks of {rows} rows, {args.workers} workers" + \
                    (f", {args.delay_ms:g} ms delay" if args.delay_ms else "") + \
                    (f", worker-saturation {args.worker_saturation}" if args.worker_saturation else "")
                print(format_summary(label, summary), flush=True)
                run = {"chunk_rows": rows, "n_chunks": n_chunks, "fit_seconds": seconds, "summary": summary,
                       "iterations": iterations, "fit_totals": totals,
                       "fit_stdout": fit.stdout.splitlines()[-40:]}
                if args.check_local:
                    from dgmm import load_model

                    remote, local = load_model(workdir / f"fit-{rows}" / "model.npz"), local_fit(data, model)
                    diffs = {}
                    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
                        a, b = getattr(remote, name), getattr(local, name)
                        diffs[name] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))
                        if not np.allclose(a, b, rtol=1e-10, atol=0):
                            status = 1
                    run["max_relative_difference_from_local_fit"] = diffs
                    print(f"  vs the local threaded fit: max relative difference "
                          f"{max(diffs.values()):.2e} ({'equal at rtol 1e-10' if status == 0 else 'DIFFERENT'})")
                report["runs"].append(run)
    finally:
        left = leftovers(cluster.tag) if cluster is not None else []
        if left:
            print(f"warning: left behind: {left}", file=sys.stderr)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return status


if __name__ == "__main__":
    sys.exit(main())
