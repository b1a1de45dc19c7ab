"""The benchmark's upstream server: one listening socket (inherited fd), four services chosen per connection.

The first byte a client sends picks the service, so every proxy candidate needs exactly one upstream:

``E`` echo       a thread per connection: ``recv_into`` a preallocated buffer, send it back (RTT).
``S`` sink       a thread per connection: count bytes until EOF, then answer the 8-byte total (bulk).
``R`` rate       inline in the accept loop: answer one byte and close (connection rate).  No thread is
                 started, so the server's own cost per connection stays as small as Python allows.
``H`` hold       answer one byte, then park the socket in one epoll thread until the peer closes
                 (9000 idle connections would otherwise mean 9000 threads).

Blocking sockets throughout: a blocked ``recv_into`` releases the GIL, so threads only contend while
they are actually copying, and no event loop sits between the kernel and the measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import struct
import sys
import threading

BUF_SIZE = 1 << 20
_COUNT = struct.Struct("!Q")


def _echo(conn: socket.socket) -> None:
    buf = bytearray(BUF_SIZE)
    view = memoryview(buf)
    with conn:
        while True:
            n = conn.recv_into(buf)
            if not n:
                return
            conn.sendall(view[:n])


def _sink(conn: socket.socket) -> None:
    buf = bytearray(BUF_SIZE)
    total = 0
    with conn:
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            total += n
        conn.sendall(_COUNT.pack(total))


class _Holder:
    """One thread that keeps idle connections open and closes each when its peer does."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="holder").start()

    def add(self, conn: socket.socket) -> None:
        with self.lock:
            self.socks[conn.fileno()] = conn
        self.ep.register(conn.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def _run(self) -> None:
        while True:
            for fd, _events in self.ep.poll(1.0):
                with self.lock:
                    conn = self.socks.pop(fd, None)
                if conn is None:
                    continue
                with contextlib.suppress(OSError):
                    self.ep.unregister(fd)
                conn.close()


def _serve(listener: socket.socket) -> None:
    holder: _Holder | None = None
    while True:
        conn, _ = listener.accept()
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(10.0)  # a client that never sends its mode byte cannot stall the loop forever
            mode = conn.recv(1)
            conn.settimeout(None)
        except OSError:
            conn.close()
            continue
        if mode == b"R":
            with contextlib.suppress(OSError):
                conn.send(b"r")
            conn.close()
        elif mode == b"H":
            holder = holder or _Holder()
            try:
                conn.send(b"h")
            except OSError:
                conn.close()
                continue
            holder.add(conn)
        elif mode in (b"E", b"S"):
            threading.Thread(target=_echo if mode == b"E" else _sink, args=(conn,), daemon=True).start()
        else:
            conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    args = parser.parse_args()
    # Small stacks: the threads only ever run one shallow loop.
    threading.stack_size(256 * 1024)
    listener = socket.socket(fileno=args.fd)
    listener.setblocking(True)
    print("ready", flush=True)
    try:
        _serve(listener)
    except KeyboardInterrupt:
        pass
    finally:
        sys.stdout.flush()
        os._exit(0)  # daemon threads blocked in recv: do not wait for them


if __name__ == "__main__":
    main()
