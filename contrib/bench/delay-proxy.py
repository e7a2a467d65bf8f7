#!/usr/bin/env python3
"""A TCP proxy that adds network latency and an optional bandwidth cap.

Used by run.sh when the kernel has no netem qdisc (CONFIG_NET_SCH_NETEM unset):
every chunk is forwarded RTT/2 after it arrived, in order, so latency is added
without serialising the stream (a request pipeline still flows); a new
connection waits one RTT first, as a TCP handshake would. The cap is a shared
token bucket per direction, like one full-duplex link.

Usage: delay-proxy.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT RTT_MS [RATE_MBIT]
Prints "ready" on stdout once listening.
"""
import asyncio
import sys
import time

CHUNK = 256 << 10


class Link:
    """One direction of a link with a bandwidth cap (bytes per second, 0 = none)."""

    def __init__(self, rate):
        self.rate = rate
        self.next_free = 0.0

    def departure(self, n):
        if not self.rate:
            return 0.0
        now = time.monotonic()
        start = max(now, self.next_free)
        self.next_free = start + n / self.rate
        return self.next_free


async def pump(reader, writer, one_way, link):
    queue = asyncio.Queue(maxsize=64)

    async def receive():
        while True:
            try:
                data = await reader.read(CHUNK)
            except (ConnectionError, OSError):
                data = b""
            await queue.put((time.monotonic() + one_way, data))
            if not data:
                return

    async def send():
        while True:
            due, data = await queue.get()
            due = max(due, link.departure(len(data)))
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                return

    await asyncio.gather(receive(), send())


def main():
    listen_port, host, port, rtt_ms = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    rate = float(sys.argv[5]) * 1e6 / 8 if len(sys.argv) > 5 and float(sys.argv[5]) > 0 else 0
    one_way = rtt_ms / 2000.0
    up_link, down_link = Link(rate), Link(rate)

    async def handle(client_r, client_w):
        try:
            await asyncio.sleep(2 * one_way)  # the handshake's round trip
            server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(pump(client_r, server_w, one_way, up_link),
                                 pump(server_r, client_w, one_way, down_link))
        finally:
            for w in (server_w, client_w):
                try:
                    w.close()
                except Exception:
                    pass

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
