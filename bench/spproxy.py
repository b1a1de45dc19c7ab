"""The sockpolicy candidates: ``sockpolicy.proxy.serve`` on a listening socket the dispatcher steers to.

``--mode userspace``  an ``on_message`` callback that passes every message: every byte crosses Python.
``--mode spliced``    ``on_connect`` returns ``Pass(splice=True)``: the connection is handed to the kernel
                      (SOCKHASH + SK_SKB redirect) once kernel splicing exists; see run.py's probe.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import socket

import trio

from sockpolicy.proxy import Connection, Message, Pass, Policy, serve


def make_policy(mode: str) -> Policy:
    policy = Policy()
    if mode == "userspace":

        @policy.on_message()
        def passthrough(conn: Connection, msg: Message) -> Pass:
            return Pass()

    elif mode == "spliced":

        @policy.on_connect()
        def splice(conn: Connection) -> Pass:
            return Pass(splice=True)

    else:
        raise ValueError(f"unknown mode {mode!r}")
    return policy


async def _main(fd: int, upstream: tuple[str, int], mode: str) -> None:
    listener = socket.socket(fileno=fd)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                serve, make_policy(mode), tcp_sockets=[listener], upstream=upstream, idle_timeout=0
            )
        )
        print("ready", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    parser.add_argument("--mode", choices=("userspace", "spliced"), required=True)
    args = parser.parse_args()
    # serve() logs every connection at INFO; at 10k connections/s that logging would be the benchmark.
    logging.basicConfig(level=logging.WARNING)
    host, port = args.upstream.rsplit(":", 1)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main, args.fd, (host, int(port)), args.mode)


if __name__ == "__main__":
    main()
