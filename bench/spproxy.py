"""The sockpolicy candidates: ``sockpolicy.proxy.serve`` on a listening socket the dispatcher steers to.

``--mode userspace``  an ``on_message`` callback that passes every message: every byte crosses Python.
``--mode spliced``    ``on_connect`` returns ``Pass(splice=True)`` and serve() gets an open ``Splicer``: the
                      connection is handed to the kernel (SOCKHASH + SK_SKB redirect).
                      ``--backlog-high``/``--backlog-low`` override the Splicer's throttle bounds (run.py's
                      ``sp-spliced-kernel`` sets them so high that the kernel never hands a connection back).

The process creates its own listening socket (after opening the Splicer: accepted sockets belong to their
listener's cgroup, and only sockets in the Splicer's cgroup are enrolled) and registers it with the
benchmark's dispatcher under ``--label``.  It prints ``ready``, or ``unavailable: <reason>`` and exits
when the Splicer cannot open.  On SIGUSR1 it prints one JSON line of its counters (the splice probe in
run.py uses it); SIGTERM stops it cleanly, so the Splicer removes its cgroup.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import logging
import signal
import socket
import sys
from typing import Any

import trio

from sockpolicy.proxy import Connection, Message, Pass, Policy, serve

log = logging.getLogger("sockpolicy.proxy")


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


class _Notes(logging.Handler):
    """Keeps the proxy's log lines about splicing (why a connection stayed in userspace)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "splic" in message.lower() and len(self.lines) < 20:
            self.lines.append(message)


def open_splicer(backlog_high: int | None = None, backlog_low: int | None = None) -> tuple[Any, str]:
    """(an open Splicer, "") or (None, why not).

    :param backlog_high: ``Splicer.open(backlog_high=...)``; None: the library's default.
    :param backlog_low: ``Splicer.open(backlog_low=...)``; None: the library's default.
    """
    try:
        from sockpolicy.proxy import Splicer  # type: ignore[attr-defined]
    except ImportError:
        return None, "sockpolicy.proxy has no Splicer"
    if "splice" not in inspect.signature(serve).parameters:
        return None, "serve() takes no splice= argument"
    bounds = {
        k: v for k, v in (("backlog_high", backlog_high), ("backlog_low", backlog_low)) if v is not None
    }
    try:
        return Splicer.open(**bounds), ""
    except Exception as exc:  # SpliceUnavailable names the missing feature
        return None, f"Splicer.open() failed: {exc}"


def make_listener(port: int, bpffs_root: str, label: str) -> socket.socket:
    from sockpolicy import Dispatcher

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    with Dispatcher.open(bpffs_root=bpffs_root, create=False) as d:
        d.register_socket(label, sock)
    return sock


def counters(handle: Any, splicer: Any, notes: _Notes, splice_note: str) -> dict[str, Any]:
    stats = handle.stats
    out: dict[str, Any] = {
        "bytes_from_client": stats.bytes_from_client,
        "bytes_to_upstream": stats.bytes_to_upstream,
        "notes": ([splice_note] if splice_note else []) + notes.lines,
    }
    if splicer is not None:
        splice_stats = getattr(splicer, "stats", None)
        if dataclasses.is_dataclass(splice_stats):
            out["splice"] = dataclasses.asdict(splice_stats)
    return out


async def _main(args: argparse.Namespace, sock: socket.socket, splicer: Any, splice_note: str) -> None:
    host, port = args.upstream.rsplit(":", 1)
    notes = _Notes()
    # Debug logging only until the probe asked for counters: per-connection log records cost CPU.
    log.addHandler(notes)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    kwargs: dict[str, Any] = {"splice": splicer} if splicer is not None else {}
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                functools.partial(
                    serve,
                    make_policy(args.mode),
                    tcp_sockets=[sock],
                    upstream=(host, int(port)),
                    idle_timeout=0,
                    **kwargs,
                )
            )
            print("ready", flush=True)
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    print(json.dumps(counters(handle, splicer, notes, splice_note)), flush=True)
                    log.removeHandler(notes)
                    log.setLevel(logging.WARNING)
                    log.propagate = True
                else:
                    break
            nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bind", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--bpffs-root", required=True, help="the benchmark's dispatcher root")
    parser.add_argument("--label", required=True, help="dispatcher label to register the listener under")
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    parser.add_argument("--mode", choices=("userspace", "spliced"), required=True)
    parser.add_argument(
        "--backlog-high", type=int, help="spliced: Splicer backlog_high, bytes (default: library's)"
    )
    parser.add_argument(
        "--backlog-low", type=int, help="spliced: Splicer backlog_low, bytes (default: library's)"
    )
    args = parser.parse_args()
    # serve() logs every connection at INFO; at thousands of connections/s that logging would be the
    # benchmark.
    logging.basicConfig(level=logging.WARNING)
    splicer, splice_note = (
        open_splicer(args.backlog_high, args.backlog_low) if args.mode == "spliced" else (None, "")
    )
    try:
        sock = make_listener(args.bind, args.bpffs_root, args.label)
        try:
            trio.run(_main, args, sock, splicer, splice_note)
        finally:
            sock.close()
    finally:
        if splicer is not None:
            splicer.close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
