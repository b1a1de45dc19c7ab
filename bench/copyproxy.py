"""The "plain userspace proxy" baseline: the smallest reasonable trio copy loop.

Accept, connect to the upstream, then two tasks each ``recv_into`` a preallocated 64 KiB buffer and
``send`` it on; EOF becomes ``shutdown(SHUT_WR)``.  No policy, framing, counters or timeouts: the
difference between this and the sockpolicy userspace path is what sockpolicy's relay adds on top of
trio itself.
"""

from __future__ import annotations

import argparse
import contextlib
import socket

import trio

BUF_SIZE = 65536


async def _pump(src: trio.socket.SocketType, dst: trio.socket.SocketType) -> None:
    buf = bytearray(BUF_SIZE)
    view = memoryview(buf)
    with contextlib.suppress(OSError):
        while True:
            n = await src.recv_into(buf)
            if not n:
                break
            sent = 0
            while sent < n:
                sent += await dst.send(view[sent:n])
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


async def _handle(client: trio.socket.SocketType, upstream: tuple[str, int]) -> None:
    with client:
        up = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with up:
            try:
                await up.connect(upstream)
            except OSError:
                return
            for s in (client, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, up)
                nursery.start_soon(_pump, up, client)


async def _main(fd: int, upstream: tuple[str, int]) -> None:
    listener = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
    print("ready", flush=True)
    async with trio.open_nursery() as nursery:
        while True:
            try:
                client, _ = await listener.accept()
            except OSError:
                continue
            nursery.start_soon(_handle, client, upstream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    args = parser.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main, args.fd, (host, int(port)))


if __name__ == "__main__":
    main()
