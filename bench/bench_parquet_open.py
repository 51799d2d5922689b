"""Opening a Parquet directory of many small files on an object store with a round-trip time.

``dgmm.io.open_parquet`` reads every file's footer before the fit starts (row
counts, schema). On an object store each footer costs a few requests. This
script serves moto's S3 server on 127.0.0.1 behind ``scripts/delay_proxy.py``
(a TCP proxy that delays every byte by half of ``--delay-ms`` in each
direction: ``tc netem`` is not available on this kernel), writes ``--files``
Parquet files through the direct port, and times ``open_parquet`` through the
proxy with the footers read one at a time (``FOOTER_READERS = 1``) and as
many at a time as dgmm reads them by default. Medians of ``--repeats``,
alternating.

    python bench/bench_parquet_open.py --files 300 --delay-ms 20 --repeats 3

Run it with ``PYTHONPATH`` pointing at another checkout to time that one's
``open_parquet`` (one which has no ``FOOTER_READERS`` reads serially in both
columns).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from benchutil import emit, git_revision, load_average

PROXY = Path(__file__).resolve().parents[1] / "scripts" / "delay_proxy.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_ms(port: int, repeats: int = 5) -> float:
    """Median time to open a TCP connection and get the first byte of a reply, in ms (one or two round trips)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"HEAD /dgmm-bench HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            c.recv(1)
        out.append(1000 * (time.perf_counter() - t0))
    return round(statistics.median(out), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=400)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="added round-trip time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--readers", default="", help="comma-separated FOOTER_READERS values to time besides 1 and "
                        "the default")
    args = parser.parse_args()
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ[name] = value
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs
    from moto.server import ThreadedMotoServer

    import dgmm.io

    port, proxy_port = free_port(), free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = subprocess.Popen([sys.executable, str(PROXY), "--listen", f"127.0.0.1:{proxy_port}",
                              "--target", f"127.0.0.1:{port}", "--delay-ms", str(args.delay_ms / 2)])
    endpoint = f"http://127.0.0.1:{proxy_port}"
    try:
        fs = s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}", skip_instance_cache=True)
        fs.mkdir("dgmm-bench")
        table = pa.table({f"x{j}": np.random.default_rng(j).normal(size=1000) for j in range(8)})
        for i in range(args.files):
            with fs.open(f"dgmm-bench/lake/part-{i:05d}.parquet", "wb") as f:
                pq.write_table(table, f, row_group_size=500)
        rtt, rtt_delayed = connect_ms(port), connect_ms(proxy_port)
        default = getattr(dgmm.io, "FOOTER_READERS", 1)
        order = sorted({1, default, *(int(r) for r in args.readers.split(",") if r)})
        times: dict[int, list[float]] = {readers: [] for readers in order}
        for r in range(args.repeats):
            for readers in order if r % 2 == 0 else order[::-1]:
                if hasattr(dgmm.io, "FOOTER_READERS"):
                    dgmm.io.FOOTER_READERS = readers
                t0 = time.perf_counter()
                a = dgmm.io.open_parquet("s3://dgmm-bench/lake", storage_options={"endpoint_url": endpoint})
                times[readers].append(time.perf_counter() - t0)
                assert a.shape == (1000 * args.files, 8) and a.numblocks[0] == 2 * args.files
        emit({"bench": "parquet_open", "commit": git_revision(), "files": args.files, "delay_ms": args.delay_ms,
              "connect_ms": rtt, "connect_ms_delayed": rtt_delayed, "load": load_average(),
              **{f"seconds_readers_{k}": [round(t, 3) for t in v] for k, v in times.items()},
              **{f"median_readers_{k}": round(statistics.median(v), 3) for k, v in times.items()}})
    finally:
        proxy.terminate()
        proxy.wait(10)
        server.stop()


if __name__ == "__main__":
    main()
