#!/usr/bin/env python
"""A store-and-forward TCP proxy that delays every byte by a fixed time in each direction.

``tc qdisc ... netem delay`` is not available on every kernel (nor under gVisor); this
emulates a link's one-way latency in user space instead. Bytes read at time t are written
at t + delay, in order, without waiting for earlier writes to be acknowledged, so the
link stays pipelined: a stream of messages pays the delay once, not once per message.

    python scripts/delay_proxy.py --listen 10.77.0.10:8787 --target 10.77.0.10:8786 --delay-ms 20

Used by ``scripts/netns_cluster.py --delay-ms``. Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def forward():
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    task = asyncio.create_task(forward())
    try:
        while True:
            data = await reader.read(1 << 16)
            queue.put_nowait((time.monotonic() + delay, data))
            if not data:
                break
        await task
    except (ConnectionError, OSError):
        task.cancel()
    finally:
        writer.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(client_reader, client_writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pump(client_reader, upstream_writer, delay),
                             _pump(upstream_reader, client_writer, delay), return_exceptions=True)

    server = await asyncio.start_server(handle, *listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept connections on")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward them to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    args = parser.parse_args(argv)
    asyncio.run(_serve(_host_port(args.listen), _host_port(args.target), args.delay_ms / 1000.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
