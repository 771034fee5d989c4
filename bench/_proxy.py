"""A loopback TCP proxy that behaves like a slower link: each direction delivers at most
``rate`` bytes per second and delays every byte by ``latency_s`` (a one-way latency), so a
benchmark can put a real network between the hooklab client and a server on this machine."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHUNK = 64 * 1024


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float, latency_s: float
) -> None:
    """Copy ``reader`` to ``writer``: a byte read at t leaves no earlier than t + latency, and
    the bytes leave at most ``rate`` per second."""
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def read() -> None:
        while chunk := await reader.read(CHUNK):
            await queue.put((time.monotonic(), chunk))
        await queue.put(None)

    async def write() -> None:
        free_at = 0.0  # when the link has sent everything before
        while (item := await queue.get()) is not None:
            arrived, chunk = item
            start = max(arrived + latency_s, free_at)
            free_at = start + len(chunk) / rate
            await asyncio.sleep(max(0.0, free_at - time.monotonic()))
            writer.write(chunk)
            await writer.drain()
        writer.close()

    await asyncio.gather(read(), write(), return_exceptions=True)


@contextmanager
def throttled(target_port: int, rate: float, latency_s: float) -> Iterator[str]:
    """A proxy to ``127.0.0.1:target_port`` on a free loopback port; yields its URL."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    stop: list[asyncio.Event] = []
    links: set[asyncio.Task[Any]] = set()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        both = asyncio.gather(
            _pipe(reader, up_writer, rate, latency_s), _pipe(up_reader, writer, rate, latency_s)
        )
        task = asyncio.ensure_future(both)
        links.add(task)
        try:
            await task
        except asyncio.CancelledError:
            pass
        finally:
            links.discard(task)

    async def serve() -> None:
        stop.append(asyncio.Event())
        server = await asyncio.start_server(connection, "127.0.0.1", 0, family=socket.AF_INET)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        await stop[0].wait()
        server.close()
        for task in list(links):
            task.cancel()
        await asyncio.gather(*links, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield f"http://127.0.0.1:{port[0]}"
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
        loop.close()
