"""Kernel per-message rules on IPv6 sockets, in a test namespace.

The rule programs read ``local_port`` / ``remote_port`` from ``sk_msg_md`` / ``__sk_buff``, which the
kernel fills for both families, and key sockets by cookie, so IPv6 should behave exactly like IPv4.
These tests check it with real IPv6 sockets on ``::1``: port-range and prefix rules with Drop (EACCES at
the sender), Pass and Redirect, framed receive, redirect labels for IPv6 and dual-stack (v4-mapped)
sockets, the enrolment key (the socket cookie), entries gone after close, and the cgroup SOCK_OPS
enrolment of ``sockpolicy enforce --cgroup`` for both the connecting and the accepting side.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from _e2e import in_ns, sockpolicy
from _harness import NetNS
from test_rules_kernel import CGROUP_ROOT, nothing_arrives, pattern, read_exact, temp_cgroup

from sockpolicy._rules import Enforcer, Framing, Rule, RuleSet, format_label, socket_cookie

pytestmark = pytest.mark.privileged


class Pairs:
    """Connected TCP pairs made inside a namespace; every socket is closed by the fixture."""

    def __init__(self, netns: NetNS) -> None:
        self.netns = netns
        self.made: list[socket.socket] = []

    def connect(
        self, host: str = "::1", family: int = socket.AF_INET6, *, dual_stack: bool = False
    ) -> tuple[socket.socket, socket.socket]:
        """``(client, accepted)`` over ``host``; ``dual_stack``: the client is an AF_INET6 socket without
        IPV6_V6ONLY that connects to an IPv4 ``host`` (its peer is then ``::ffff:a.b.c.d``)."""

        def make() -> tuple[socket.socket, socket.socket]:
            with socket.socket(family) as srv:
                srv.bind((host, 0))
                srv.listen()
                port = srv.getsockname()[1]
                if dual_stack:
                    client = socket.socket(socket.AF_INET6)
                    client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    client.connect((f"::ffff:{host}", port))
                else:
                    client = socket.create_connection((host, port))
                server, _ = srv.accept()
            return client, server

        client, server = self.netns.call(make)
        for s in (client, server):
            s.settimeout(5)
            self.made.append(s)
        return client, server

    def close(self, *socks: socket.socket) -> None:
        for s in socks:
            self.made.remove(s)
            s.close()


@pytest.fixture
def pairs(netns: NetNS) -> Iterator[Pairs]:
    p = Pairs(netns)
    yield p
    for s in p.made:
        s.close()


def test_v6_port_ranges_prefix_drop_pass(enforcer: Enforcer, pairs: Pairs) -> None:
    client, server = pairs.connect()
    assert client.family == socket.AF_INET6 and client.getpeername()[0] == "::1"
    lport, rport = client.getsockname()[1], client.getpeername()[1]
    enforcer.replace(
        RuleSet(
            (
                Rule("Pass", name="other-local", local_ports=str(lport % 65535 + 1)),
                Rule("Drop", name="no-flush", remote_ports=f"{rport}", prefix=b"FLUSHALL"),
                Rule("Pass", name="small", local_ports=f"{max(1, lport - 5)}-{lport}", max_len=10),
                Rule("Pass", name="big", remote_ports=f"1-{rport}", min_len=11),
            )
        )
    )
    cookie = enforcer.enrol(client)
    assert cookie == socket_cookie(client) and enforcer.enrolled() == [cookie]
    client.sendall(b"x" * 10)
    client.sendall(b"y" * 11)
    assert read_exact(server, 21) == b"x" * 10 + b"y" * 11
    with pytest.raises(PermissionError) as info:
        client.send(b"FLUSHALL\r\n")
    assert info.value.errno == errno.EACCES
    assert nothing_arrives(server)
    stats = enforcer.stats()
    assert [(r.msgs, r.bytes) for r in stats.rules] == [(0, 0), (1, 10), (1, 10), (1, 11)]
    assert stats.unmatched.msgs == 0
    pairs.close(client, server)
    assert enforcer.enrolled() == []


def test_v6_redirect_to_peer_address_label(enforcer: Enforcer, pairs: Pairs) -> None:
    """``Redirect(("::1", port))`` from a proxy callback goes to the socket labelled by its IPv6 peer."""
    from sockpolicy.proxy._verdicts import Redirect

    client, server = pairs.connect()
    upstream, upstream_server = pairs.connect()
    port = upstream.getpeername()[1]
    enforcer.replace(RuleSet((Rule(Redirect(("::1", port)), name="r", prefix=b"GET"),)))
    assert enforcer.label(upstream) == f"[::1]:{port}"
    enforcer.enrol(client)
    data = b"GET " + pattern(5000)
    client.sendall(data)
    assert read_exact(upstream_server, len(data)) == data
    assert nothing_arrives(server)
    client.sendall(b"PUT x")  # no rule matched: to its own peer
    assert read_exact(server, 5) == b"PUT x"
    stats = enforcer.stats()
    assert (stats["r"].msgs, stats["r"].bytes) == (1, len(data))
    assert (stats.unmatched.msgs, stats.unmatched.bytes) == (1, 5)


def test_v6_labels_are_canonical() -> None:
    """A label names an address, not its spelling: what a callback writes and what getpeername() of an
    IPv6 or dual-stack socket returns must give the same label."""
    assert format_label(("0:0:0:0:0:0:0:1", 80)) == format_label(("::1", 80)) == "[::1]:80"
    assert format_label(("FD00:5EED::0001", 80)) == "[fd00:5eed::1]:80"
    # A dual-stack socket connected to an IPv4 peer reports it v4-mapped; the proxy reports such peers
    # as plain IPv4 (normalize_addr), so a Redirect written for 127.0.0.1 must find that socket.
    assert format_label(("::ffff:127.0.0.1", 6380)) == "127.0.0.1:6380"
    assert format_label("backend") == "backend"


def test_dual_stack_socket_redirect_by_ipv4_label(enforcer: Enforcer, pairs: Pairs) -> None:
    from sockpolicy.proxy._verdicts import Redirect

    client, server = pairs.connect(dual_stack=True, host="127.0.0.1", family=socket.AF_INET)
    upstream, upstream_server = pairs.connect(dual_stack=True, host="127.0.0.1", family=socket.AF_INET)
    assert upstream.getpeername()[0] == "::ffff:127.0.0.1"
    port = upstream.getpeername()[1]
    enforcer.replace(RuleSet((Rule(Redirect(("127.0.0.1", port)), name="r"),)))
    assert enforcer.label(upstream) == f"127.0.0.1:{port}"
    enforcer.enrol(client)
    client.sendall(b"mapped")
    assert read_exact(upstream_server, 6) == b"mapped"
    assert nothing_arrives(server)
    assert enforcer.stats()["r"].msgs == 1


def test_v6_framed_receive_and_entries_gone(enforcer: Enforcer, pairs: Pairs) -> None:
    """Framed receive on an IPv6 socket: redirect by type byte to a labelled IPv6 socket, drop, pass."""
    framing = Framing(size=4)
    rules = RuleSet(
        (
            Rule(
                "Redirect",
                name="t1",
                to="one",
                ingress=True,
                prefix=b"\0\0\0\0\x01",
                mask=b"\0\0\0\0\xff",
                on="receive",
            ),
            Rule("Drop", name="t3", prefix=b"\0\0\0\0\x03", mask=b"\0\0\0\0\xff", on="receive"),
        ),
        framing=framing,
    )
    enforcer.replace(rules)
    client, server = pairs.connect()
    target, target_peer = pairs.connect()
    enforcer.label(target, "one")
    cookie = enforcer.enrol(server, send=False, framed=True)
    assert enforcer.enrolled("framed") == [cookie] == [socket_cookie(server)]
    f1 = framing.frame(b"\x01" + pattern(3000))
    f2 = framing.frame(b"\x02" + pattern(100, seed=2))
    f3 = framing.frame(b"\x03" + pattern(50, seed=3))
    client.sendall(f1 + f3 + f2)
    assert read_exact(target, len(f1)) == f1
    assert read_exact(server, len(f2)) == f2
    assert nothing_arrives(target_peer)
    stats = enforcer.stats()
    assert (stats["t1"].msgs, stats["t1"].bytes) == (1, len(f1))
    assert (stats["t3"].msgs, stats["t3"].bytes) == (1, len(f3))
    assert (stats.unmatched.msgs, stats.unmatched.bytes) == (1, len(f2))
    assert enforcer.frame_resyncs() == 0
    pairs.close(client, server, target, target_peer)
    assert enforcer.enrolled("framed") == [] and enforcer.enrolled() == [] and enforcer.labelled() == []


# --------------------------------------------------------------------------------------------------------
# sockpolicy enforce --cgroup: SOCK_OPS enrolment of a local application's IPv6 sockets

APP = textwrap.dedent(
    """
    import json, os, socket, sys
    with open(sys.argv[1] + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    server_port, own_port = int(sys.argv[2]), int(sys.argv[3])
    cookie = lambda s: int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), "little")

    def send(s, data):
        try:
            s.sendall(data)
            return "sent"
        except OSError as exc:
            return f"errno {exc.errno}"

    out = {}
    # Active side: connections to the test's server (outside the cgroup).
    a = socket.create_connection(("::1", server_port))
    b = socket.create_connection(("::1", server_port))
    # Passive side: a listener of our own; the accepted socket is enrolled too.
    lsn = socket.create_server(("::1", own_port), family=socket.AF_INET6)
    c = socket.create_connection(("::1", own_port))
    acc, _ = lsn.accept()
    out["cookies"] = sorted(cookie(s) for s in (a, b, c, acc))
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # the test has read the enrolled cookies
    out["flush"] = send(a, b"FLUSHALL\\r\\n")
    out["ping"] = send(b, b"PING\\r\\n")
    out["secret"] = send(acc, b"SECRET!")
    out["hello"] = send(acc, b"x")  # a drop sticks: not judged again, not counted
    out["c"] = send(c, b"from-c")
    out["c_got"] = acc.recv(100).decode()
    for s in (a, b, c, acc, lsn):
        s.close()
    print(json.dumps(out), flush=True)
    """
)


@pytest.mark.skipif(not CGROUP_ROOT.is_dir(), reason="no cgroup v2 at /sys/fs/cgroup/unified")
def test_v6_enforce_cgroup_enrols_active_and_passive(netns: NetNS, tmp_path: Path) -> None:
    own_port = 7000
    srv = netns.socket(socket.AF_INET6)
    with srv, temp_cgroup() as cgroup:
        srv.bind(("::1", 0))
        srv.listen()
        server_port = srv.getsockname()[1]
        rules = tmp_path / "rules.toml"
        rules.write_text(
            textwrap.dedent(
                f"""
                [[rule]]
                name = "no-flush"
                verdict = "Drop"
                remote_ports = "{server_port}"
                prefix = "FLUSHALL"
                on = "send"

                [[rule]]
                name = "no-secret"
                verdict = "Drop"
                local_ports = "{own_port - 1}-{own_port + 1}"
                prefix = "SECRET"
                on = "send"
                """
            )
        )
        done = sockpolicy(netns, "enforce", "--cgroup", str(cgroup), "--rules", str(rules))
        assert done.returncode == 0, done.stderr
        try:
            app = subprocess.Popen(
                [*in_ns(netns), sys.executable, "-c", APP, str(cgroup), str(server_port), str(own_port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                assert app.stdout is not None and app.stdin is not None
                first = app.stdout.readline()
                assert first, app.communicate(timeout=10)[1]
                cookies = json.loads(first)["cookies"]
                # The documented key: the socket cookie, the same for IPv6 sockets.
                with Enforcer.open(netns_inode=os.stat(netns.path).st_ino) as pinned:
                    enrolled = sorted(pinned.enrolled())
                assert enrolled == cookies
                app.stdin.write("go\n")
                app.stdin.flush()
                out, err = app.communicate(timeout=20)
            finally:
                if app.poll() is None:
                    app.kill()
                    app.communicate()
            assert app.returncode == 0, err
            result = json.loads(out)
            assert (result["flush"], result["ping"]) == (f"errno {errno.EACCES}", "sent")
            assert (result["secret"], result["hello"]) == (f"errno {errno.EACCES}", f"errno {errno.EACCES}")
            assert (result["c"], result["c_got"]) == ("sent", "from-c")
            srv.settimeout(5)
            received = []
            for _ in range(2):
                conn, _ = srv.accept()
                with conn:
                    received.append(read_exact(conn, 100, timeout=2))
            assert sorted(received) == [b"", b"PING\r\n"]
            status = sockpolicy(netns, "rules", "--json")
            assert status.returncode == 0, status.stderr
            doc = json.loads(status.stdout)
            assert doc["enrolled"] == 0  # every socket of the application is closed
            by_name = {r["name"]: (r["msgs"], r["bytes"]) for r in doc["counters"]["rules"]}
            assert by_name == {"no-flush": (1, 10), "no-secret": (1, 7)}
            unmatched = doc["counters"]["unmatched"]
            assert (unmatched["msgs"], unmatched["bytes"]) == (2, len(b"PING\r\n") + len(b"from-c"))
        finally:
            with contextlib.suppress(Exception):
                sockpolicy(netns, "enforce", "--unload")
    assert not os.path.exists(cgroup)
