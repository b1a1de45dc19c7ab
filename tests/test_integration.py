"""End to end over a veth link: a client namespace dials a server namespace running ``sockpolicy serve``.

Every test runs the real command (SK_LOOKUP dispatcher pinned in bpffs, trio proxy, Python policy) in
namespace ``b`` and real clients in namespace ``a``; traffic crosses the veth pair, never the host.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _e2e import sockpolicy, start_serve, stop, wait_until_serving

pytestmark = pytest.mark.privileged

# The policy every test serves: it tags each message with the original destination and the worker pid
# (so the tests can check what the client dialled and which worker answered), and gives each special
# payload a verdict.  With no --upstream, passed messages go to the built-in echo service.
POLICY = textwrap.dedent(
    """
    import os
    from sockpolicy.proxy import Close, Direction, Drop, LineFramer, Policy, Rewrite

    policy = Policy()

    @policy.on_message(proto="udp")
    def datagrams(conn, msg):
        if msg.direction is not Direction.TO_UPSTREAM:
            return Rewrite(msg.data)
        if msg.data.startswith(b"DROP"):
            return Drop()
        host, port = conn.original_dst
        return Rewrite(f"{host} {port} ".encode() + msg.data)

    @policy.on_message(proto="tcp", framer=LineFramer())
    def lines(conn, msg):
        if msg.direction is not Direction.TO_UPSTREAM:
            return Rewrite(msg.data)
        if msg.data == b"who\\n":
            host, port = conn.original_dst
            return Rewrite(f"{host} {port} {os.getpid()}\\n".encode())
        if msg.data == b"drop\\n":
            return Drop()
        if msg.data == b"rewrite\\n":
            return Rewrite(b"REWRITTEN\\n")
        if msg.data == b"close\\n":
            return Close()
        if msg.data == b"boom\\n":
            raise RuntimeError("callback failure on purpose")
        return Rewrite(msg.data)
    """
)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.py"
    path.write_text(POLICY)
    path.chmod(0o644)
    return path


@pytest.fixture
def served(
    make_veth_pair: Any, policy_file: Path, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    """``sockpolicy serve`` in namespace b on its veth addresses, all ports; client side is namespace a."""
    mtu, extra = getattr(request, "param", (1500, ()))
    pair = make_veth_pair(mtu=mtu)
    args = ["--ports", "1-65535", "--addr", pair.b.ip4, "--addr", pair.b.ip6, "--policy", str(policy_file)]
    proc = start_serve(pair.b.ns, *args, *extra)
    try:
        wait_until_serving(proc, lambda: tcp_lines(pair.a.ns, pair.b.ip4, 4242, [b"who\n"]))
        yield {"pair": pair, "proc": proc, "client": pair.a.ns, "server": pair.b.ns}
    finally:
        code, err = stop(proc)
        sockpolicy(pair.b.ns, "unload")
    # serve survived everything the test did (a raising callback logs its traceback, and that is all).
    assert code == 0, err


def tcp_lines(ns: Any, host: str, port: int, lines: list[bytes], *, shutdown: bool = True) -> bytes:
    """From inside ``ns``: connect, send ``lines``, half-close, and read until EOF."""

    def go() -> bytes:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect((host, port))
            s.sendall(b"".join(lines))
            if shutdown:
                s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    return ns.call(go)


def exchange_then_end(ns: Any, host: str, port: int, first: bytes, last: bytes) -> bytes:
    """From inside ``ns``: send ``first`` and read its reply, then send ``last``, which should end the
    connection; returns everything received (an RST after ``last`` counts as the end)."""

    def go() -> bytes:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(first)
            reply = s.recv(100)
            s.sendall(last)
            try:
                return reply + s.recv(100)
            except ConnectionResetError:
                return reply

    return ns.call(go)


def udp_exchange(
    ns: Any, host: str, port: int, payload: bytes, timeout: float = 2.0
) -> tuple[bytes, Any] | None:
    """From inside ``ns``: send one datagram and return (reply, source address) or None on timeout."""

    def go() -> tuple[bytes, Any] | None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(payload, (host, port))
            try:
                return s.recvfrom(65536)
            except TimeoutError:
                return None

    return ns.call(go)


def test_tcp_random_ports_reach_one_socket_with_original_destination(served: dict[str, Any]) -> None:
    pair = served["pair"]
    rng = random.Random(20261130)
    ports = rng.sample(range(1, 65536), 200)
    pids = set()
    for port in ports:
        reply = tcp_lines(served["client"], pair.b.ip4, port, [b"who\n"])
        host, dialled, pid = reply.decode().split()
        assert (host, int(dialled)) == (pair.b.ip4, port)
        pids.add(pid)
    assert pids == {str(served["proc"].pid)}
    for port in ports[:20]:
        host, dialled, _ = tcp_lines(served["client"], pair.b.ip6, port, [b"who\n"]).decode().split()
        assert (host, int(dialled)) == (pair.b.ip6, port)


def test_udp_random_ports_reply_from_original_destination(served: dict[str, Any]) -> None:
    pair = served["pair"]
    rng = random.Random(7)
    for host in (pair.b.ip4, pair.b.ip6):
        for port in rng.sample(range(1, 65536), 50):
            result = udp_exchange(served["client"], host, port, b"ping")
            assert result is not None, f"no reply from {host} port {port}"
            reply, source = result
            assert reply == f"{host} {port} ping".encode()
            assert (source[0], source[1]) == (host, port)


def test_every_message_verdict_is_byte_exact(served: dict[str, Any]) -> None:
    pair = served["pair"]
    lines = [b"keep1\n", b"drop\n", b"rewrite\n", b"keep2\n"]
    assert tcp_lines(served["client"], pair.b.ip4, 80, lines) == b"keep1\nREWRITTEN\nkeep2\n"
    # A message split over many tiny writes is still judged whole: "drop" never reaches the upstream.
    assert tcp_lines(served["client"], pair.b.ip4, 81, [bytes([c]) for c in b"a\ndrop\nb\n"]) == b"a\nb\n"
    # Close ends the connection at that message; nothing after it is forwarded.
    assert exchange_then_end(served["client"], pair.b.ip4, 82, b"x\n", b"close\ny\n") == b"x\n"


def test_raising_callback_closes_only_its_own_connection(served: dict[str, Any]) -> None:
    pair = served["pair"]
    ready = threading.Event()
    result: dict[str, bytes] = {}

    def long_lived() -> None:
        # A second connection, open across the failure, that must keep working afterwards.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect((pair.b.ip4, 5000))
            s.sendall(b"before\n")
            first = s.recv(100)
            ready.set()
            assert failure_done.wait(10)
            s.sendall(b"after\n")
            result["reply"] = first + s.recv(100)

    failure_done = threading.Event()
    worker = threading.Thread(target=served["client"].call, args=(long_lived,))
    worker.start()
    assert ready.wait(10)
    assert exchange_then_end(served["client"], pair.b.ip4, 5001, b"ok\n", b"boom\nnever\n") == b"ok\n"
    failure_done.set()
    worker.join(10)
    assert result["reply"] == b"before\nafter\n"


def test_ports_outside_the_bindings_behave_as_without_sockpolicy(
    make_veth_pair: Any, policy_file: Path
) -> None:
    pair = make_veth_pair()
    proc = start_serve(pair.b.ns, "--ports", "10000-20000", "--addr", pair.b.ip4, "--proto", "tcp")
    try:
        wait_until_serving(proc, lambda: tcp_lines(pair.a.ns, pair.b.ip4, 15000, [b"in range\n"]))

        def plain_listener() -> socket.socket:
            s = socket.socket()
            s.bind((pair.b.ip4, 5555))
            s.listen()
            return s

        with pair.b.ns.call(plain_listener) as listener:
            client = pair.a.ns.call(socket.create_connection, (pair.b.ip4, 5555), 5)
            conn, _ = listener.accept()
            with client, conn:
                client.sendall(b"direct")
                assert conn.recv(100) == b"direct"
        with pytest.raises(ConnectionRefusedError):
            pair.a.ns.call(socket.create_connection, (pair.b.ip4, 5556), 5)
    finally:
        code, err = stop(proc)
        sockpolicy(pair.b.ns, "unload")
    assert code == 0, err


def test_binding_without_a_socket_is_refused(served: dict[str, Any]) -> None:
    pair = served["pair"]
    # A narrower binding to a label nobody serves wins over the served all-ports binding: the kernel
    # drops the SYN's lookup and the client sees ECONNREFUSED.
    bound = sockpolicy(
        served["server"],
        "bind",
        "--proto",
        "tcp",
        "--addr",
        pair.b.ip4,
        "--ports",
        "7000-7099",
        "--label",
        "nobody",
    )
    assert bound.returncode == 0, bound.stderr
    with pytest.raises(ConnectionRefusedError):
        tcp_lines(served["client"], pair.b.ip4, 7050, [b"who\n"])
    assert tcp_lines(served["client"], pair.b.ip4, 7100, [b"x\n"]) == b"x\n"
    status = sockpolicy(served["server"], "status", "--json")
    assert '"nobody"' in status.stdout


@pytest.mark.parametrize("served", [(1280, ())], indirect=True)
def test_fragmented_datagram_gets_the_same_verdict_as_a_small_one(served: dict[str, Any]) -> None:
    pair = served["pair"]
    server: Any = served["server"]

    def reassembled() -> int:
        # /proc/thread-self, not /proc/self: only this thread is inside the namespace.
        header, values = Path("/proc/thread-self/net/snmp").read_text().splitlines()[:2]
        return int(values.split()[header.split().index("ReasmOKs")])

    before = server.call(reassembled)
    big = b"PASS" + bytes(random.Random(1).randbytes(5996))
    result = udp_exchange(served["client"], pair.b.ip4, 6000, big)
    assert result is not None
    assert result[0] == f"{pair.b.ip4} 6000 ".encode() + big
    assert server.call(reassembled) > before, "the 6000-byte datagram did not travel fragmented"
    # The same verdict for a fragmented datagram as for a small one.
    assert udp_exchange(served["client"], pair.b.ip4, 6000, b"DROP small", timeout=1) is None
    assert udp_exchange(served["client"], pair.b.ip4, 6000, b"DROP" + bytes(5996), timeout=1) is None
    assert udp_exchange(served["client"], pair.b.ip4, 6000, b"PASS small") is not None


@pytest.mark.parametrize("served", [(1500, ("--workers", "2"))], indirect=True)
def test_reuseport_group_of_two_workers_shares_the_load(served: dict[str, Any]) -> None:
    pair = served["pair"]
    pids = [tcp_lines(served["client"], pair.b.ip4, 9000 + i, [b"who\n"]).split()[2] for i in range(100)]
    counts = {pid: pids.count(pid) for pid in set(pids)}
    assert len(counts) == 2, counts
    assert min(counts.values()) >= 10, counts


def test_restart_keeps_the_bindings(make_veth_pair: Any, policy_file: Path) -> None:
    """SIGTERM then start: the successor takes over the sockets and bindings; steering never detaches."""
    pair = make_veth_pair()
    args = ["--ports", "3000-3999", "--addr", pair.b.ip4, "--proto", "tcp", "--policy", str(policy_file)]
    expected = [f"tcp {pair.b.ip4}/32 ports 3000-3999 label default"]
    old = start_serve(pair.b.ns, *args)
    new = None
    try:
        wait_until_serving(old, lambda: tcp_lines(pair.a.ns, pair.b.ip4, 3000, [b"who\n"]))
        status_before = sockpolicy(pair.b.ns, "status", "--json").stdout
        old.send_signal(signal.SIGTERM)
        new = start_serve(pair.b.ns, *args)
        code, err = stop(old, sig=0)
        assert code == 0, err
        # Every connection after the old process is gone is answered by the successor.
        for port in (3001, 3500, 3999):
            host, dialled, pid = tcp_lines(pair.a.ns, pair.b.ip4, port, [b"who\n"]).decode().split()
            assert (host, int(dialled), int(pid)) == (pair.b.ip4, port, new.pid)
        assert sockpolicy(pair.b.ns, "bindings").stdout.splitlines() == expected
        status_after = sockpolicy(pair.b.ns, "status", "--json").stdout
        assert json.loads(status_before)["bindings"] == json.loads(status_after)["bindings"]
    finally:
        for proc in (old, new):
            if proc is not None:
                code, err = stop(proc)
        sockpolicy(pair.b.ns, "unload")
    assert code == 0, err
