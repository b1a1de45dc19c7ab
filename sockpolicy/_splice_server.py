"""A splicing proxy in a child process, driven over stdin/stdout (the splice tests and benchmarks use it).

Splicing moves the serving process into a dedicated cgroup, so it runs in a process of its own::

    python -m sockpolicy._splice_server --netns /run/netns/NAME --upstream 127.0.0.1:PORT --policy connect

It joins the network namespace (setns, so the mount namespace and with it the cgroup v2 mount stay
visible -- ``ip netns exec`` would remount /sys), opens a :class:`~sockpolicy.proxy.Splicer` (or logs why
it cannot), listens on ``--listen`` (default 127.0.0.1; an IPv6 address listens IPv6-only, ``::`` is
dual-stack: IPv4 clients arrive as v4-mapped addresses) and prints one JSON line
``{"port": ..., "splice": null | "reason"}``.  ``--upstream`` takes ``HOST:PORT`` or ``[V6]:PORT``.
With ``--hold`` it accepts nothing until it reads ``go`` (clients can then send before ``accept()``).
``--fastopen QLEN`` sets ``TCP_FASTOPEN`` on the listener, so that clients with a cookie put data into
their SYN (the namespace's ``net.ipv4.tcp_fastopen`` must allow the server side: bit 2).
Commands on stdin, one per line, each answered with one JSON line: ``go``, ``stats``, ``sweep``,
``midwrite`` (a restart's hand-over, to this same process, of a connection whose relay is suspended in
the middle of writing a chunk: :func:`_hand_over_mid_write`), ``quit``.

Policies: ``connect`` -- ``Pass(splice=True)`` from on_connect; ``message`` -- lines are inspected
(LineFramer) until one reads ``SPLICE``, whose verdict is ``Splice()``; ``down`` -- the same on lines from
the upstream; ``none`` -- plain ``Pass()`` (no splice requested).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import socket
import sys
from typing import Any

import trio

from sockpolicy.proxy import (
    Direction,
    LineFramer,
    Pass,
    Policy,
    Splice,
    Splicer,
    SpliceUnavailable,
    _tcp,
    serve,
)

CLONE_NEWNET = 0x40000000


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def build_policy(name: str) -> Policy:
    policy = Policy()
    if name == "connect":
        policy.on_connect()(lambda conn: Pass(splice=True))
    elif name in ("message", "down"):
        direction = Direction.TO_UPSTREAM if name == "message" else Direction.TO_CLIENT

        def inspect(conn: Any, msg: Any) -> Pass | Splice:
            return Splice() if msg.data.rstrip(b"\r\n") == b"SPLICE" else Pass()

        policy.on_message(framer=LineFramer(), direction=direction)(inspect)
    elif name != "none":
        raise SystemExit(f"unknown policy {name!r}")
    return policy


def _emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _main(args: argparse.Namespace) -> None:
    splicer: Splicer | None = None
    reason: str | None = None
    try:
        splicer = Splicer.open(backlog_high=args.backlog_high, backlog_low=args.backlog_low)
    except SpliceUnavailable as exc:
        reason = str(exc)
        logging.getLogger("sockpolicy.proxy").warning("splice unavailable: %s", reason)
    if args.switch_pause:
        pause = args.switch_pause

        async def hook() -> None:
            await trio.sleep(pause)

        _tcp.SPLICE_SWITCH_HOOK = hook
    family = socket.AF_INET6 if ":" in args.listen else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)  # after Splicer.open: in its cgroup
    if family == socket.AF_INET6:
        # Explicit either way: the default follows net.ipv6.bindv6only.  "::" takes IPv4 too (v4-mapped).
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if args.listen == "::" else 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.listen, 0))
    if args.fastopen:
        # Before listen(): the queue of connections whose SYN data is accepted before the handshake ends.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, args.fastopen)
    listener.listen(4096)
    host, port = args.upstream.rsplit(":", 1)
    host = host.removeprefix("[").removesuffix("]")
    _emit({"port": listener.getsockname()[1], "splice": reason, "pid": os.getpid()})
    stdin = trio.wrap_file(sys.stdin)
    try:
        async with trio.open_nursery() as nursery:
            handle = None
            if not args.hold:
                handle = await nursery.start(
                    lambda task_status: serve(
                        build_policy(args.policy),
                        tcp_sockets=[listener],
                        upstream=(host, int(port)),
                        splice=splicer,
                        idle_timeout=args.idle_timeout,
                        task_status=task_status,
                    )
                )
            while True:
                line = (await stdin.readline()).strip()
                if not line or line == "quit":
                    break
                if line == "go" and handle is None:
                    handle = await nursery.start(
                        lambda task_status: serve(
                            build_policy(args.policy),
                            tcp_sockets=[listener],
                            upstream=(host, int(port)),
                            splice=splicer,
                            idle_timeout=args.idle_timeout,
                            task_status=task_status,
                        )
                    )
                    _emit({"ok": True})
                elif line == "sweep" and splicer is not None:
                    splicer.sweep()
                    _emit({"ok": True})
                elif line == "stats":
                    _emit(_stats(splicer, handle))
                elif line == "midwrite" and splicer is not None:
                    _emit(await _hand_over_mid_write(splicer, nursery))
                else:
                    _emit({"ok": False, "error": f"unknown command {line!r}"})
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        if splicer is not None:
            splicer.close()


async def _hand_over_mid_write(
    splicer: Splicer, nursery: trio.Nursery, timeout: float = 20.0
) -> dict[str, Any]:
    """Wait for a relay suspended in the middle of a write into a spliced socket (part of a peeked chunk
    written, the rest not), hand its connection over as a restart would, and run it again here as the
    successor would (:func:`~sockpolicy.proxy._tcp.run_adopted_splice`): the hardest point to resume."""
    from sockpolicy.proxy._splice import AdoptedPair

    with trio.move_on_after(timeout):
        while True:
            for session in list(splicer.sessions):
                for direction in (Direction.TO_UPSTREAM, Direction.TO_CLIENT):
                    held, sent = session.unconsumed[direction], session.sent[direction]
                    if not 0 < sent < held:
                        continue
                    got = session.hand_over()
                    if got is None:
                        return {"ok": False, "error": f"hand_over refused: {session.kept_because}"}
                    client_fd, upstream_fd, client_slot, upstream_slot = got
                    conn = session.conn
                    pair = AdoptedPair(
                        socket.socket(fileno=client_fd),
                        socket.socket(fileno=upstream_fd),
                        client_slot,
                        upstream_slot,
                        os.getpid(),
                        [list(conn.client), list(conn.original_dst), list(conn.upstream)],
                    )
                    pair.client.setblocking(False)
                    pair.upstream.setblocking(False)
                    nursery.start_soon(_tcp.run_adopted_splice, session.ctx, pair)
                    return {"ok": True, "direction": direction.name, "held": held, "sent": sent}
            await trio.sleep(0.001)
    return {"ok": False, "error": "no relay was seen in the middle of a write"}


def _stats(splicer: Splicer | None, handle: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"fds": len(os.listdir("/proc/self/fd"))}
    if handle is not None:
        stats = handle.stats
        result["serve"] = {
            "accepted": stats.connections_accepted,
            "active": stats.connections_active,
            "closed": stats.connections_closed,
            "errors": stats.errors,
            "bytes_spliced": stats.bytes_spliced,
        }
    if splicer is not None:
        result["entries"] = splicer.entries()
        result["kernel"] = splicer.kernel_stats()
        result["splicer"] = vars(splicer.stats).copy()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--netns", help="network namespace path to join first")
    parser.add_argument("--upstream", required=True, help="HOST:PORT or [V6]:PORT")
    parser.add_argument("--listen", default="127.0.0.1", help="address to listen on (:: = dual-stack)")
    parser.add_argument("--policy", default="connect", choices=["connect", "message", "down", "none"])
    parser.add_argument("--hold", action="store_true", help="serve only after 'go' on stdin")
    parser.add_argument("--switch-pause", type=float, default=0.0, help="pause the switch (seconds)")
    parser.add_argument("--backlog-high", type=int, default=4 << 20)
    parser.add_argument("--backlog-low", type=int, default=1 << 20)
    parser.add_argument("--fastopen", type=int, default=0, help="TCP_FASTOPEN queue length on the listener")
    parser.add_argument("--idle-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SOCKPOLICY_LOG", "WARNING"), stream=sys.stderr)
    if args.netns:
        _setns(args.netns)
    trio.run(_main, args)


if __name__ == "__main__":
    main()
