"""The SK_LOOKUP dispatcher: steering, precedence, pinned state, atomic updates, scale.

Kernel tests run in a fresh network namespace each (the harness's ``netns`` fixture) and pin their state
under a per-test bpffs root that is removed afterwards.  The pure table computation is also checked
against the precedence rules directly, without a kernel.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _harness import NetNS

from sockpolicy import _libbpf
from sockpolicy._dispatcher import (
    Binding,
    BindingConflict,
    Dispatcher,
    InvalidLabel,
    TableTooLarge,
    compute_tables,
    reference_decision,
)
from sockpolicy._errors import BadSocket, KeyNotFound, NotLoaded
from sockpolicy._objects import AttachType
from sockpolicy._ranges import PortRange
from sockpolicy._state import detach_pinned_link, remove_dir

IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IP_ORIGDSTADDR = IP_RECVORIGDSTADDR
IPV6_RECVORIGDSTADDR = 74
IPV6_ORIGDSTADDR = IPV6_RECVORIGDSTADDR
REPO = Path(__file__).resolve().parent.parent

privileged = pytest.mark.privileged


# ---------------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def bpffs_root() -> Iterator[str]:
    root = f"/sys/fs/bpf/sp-test-{secrets.token_hex(4)}"
    yield root
    if os.path.isdir(root):
        for entry in Path(root).iterdir():
            detach_pinned_link(entry / "link")
            remove_dir(entry)
        os.rmdir(root)


@pytest.fixture
def disp(netns: NetNS, bpffs_root: str) -> Iterator[Dispatcher]:
    with Dispatcher.open(netns=netns.path, bpffs_root=bpffs_root) as d:
        yield d


def listener(
    ns: NetNS, addr: str = "127.0.0.1", port: int = 0, *, reuseport: bool = False, v6only: bool | None = None
) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = ns.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if v6only is not None:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind((addr, port))
    sock.listen(512)
    return sock


def udp_socket(ns: NetNS, addr: str = "127.0.0.1", port: int = 0) -> socket.socket:
    v6 = ":" in addr
    sock = ns.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
    sock.bind((addr, port))
    return sock


def connect(ns: NetNS, addr: str, port: int, timeout: float = 2.0) -> socket.socket:
    """A connected client socket; raises ConnectionRefusedError like a plain connect."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = ns.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((addr, port))
    except BaseException:
        sock.close()
        raise
    return sock


def refused(ns: NetNS, addr: str, port: int) -> bool:
    try:
        connect(ns, addr, port).close()
    except ConnectionRefusedError:
        return True
    return False


def accept_one(listeners: dict[str, socket.socket], client: socket.socket, timeout: float = 2.0) -> str:
    """The name of the listener that queued ``client``'s connection (which is accepted and closed)."""
    want = client.getsockname()[:2]
    deadline = time.monotonic() + timeout
    by_fd = {s.fileno(): name for name, s in listeners.items()}
    while time.monotonic() < deadline:
        ready, _, _ = select.select(list(listeners.values()), [], [], 0.2)
        for s in ready:
            conn, peer = s.accept()
            conn.close()
            if peer[:2] == want:
                return by_fd[s.fileno()]
    raise AssertionError(f"no listener accepted the connection from {want}")


def steered_to(ns: NetNS, listeners: dict[str, socket.socket], addr: str, port: int) -> str:
    """Connect to addr:port and return the name of the listener that got it, or 'refused'."""
    try:
        client = connect(ns, addr, port)
    except ConnectionRefusedError:
        return "refused"
    with client:
        return accept_one(listeners, client)


def recv_orig_dst(sock: socket.socket) -> tuple[bytes, tuple[str, int]]:
    """recvmsg with the original destination from IP(V6)_ORIGDSTADDR."""
    sock.settimeout(2)
    data, ancdata, _, _ = sock.recvmsg(2048, 256)
    for level, ctype, cdata in ancdata:
        if level == socket.IPPROTO_IP and ctype == IP_ORIGDSTADDR:
            port = struct.unpack("!H", cdata[2:4])[0]
            return data, (socket.inet_ntop(socket.AF_INET, cdata[4:8]), port)
        if level == socket.IPPROTO_IPV6 and ctype == IPV6_ORIGDSTADDR:
            port = struct.unpack("!H", cdata[2:4])[0]
            return data, (socket.inet_ntop(socket.AF_INET6, cdata[8:24]), port)
    raise AssertionError(f"no ORIGDSTADDR in {ancdata}")


def random_ports(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return sorted({1, 65535, *rng.sample(range(1, 65536), n - 2)})


# ---------------------------------------------------------------------------------------------------------
# validation and table computation (no kernel)


def test_binding_normalises_and_validates() -> None:
    b = Binding("TCP", "127.0.0.0/8", "80-90", "web")
    assert b == Binding("tcp", ipaddress.ip_network("127.0.0.0/8"), PortRange(80, 90), "web")
    assert Binding("udp", "::1", 53, "dns").ports == PortRange(53, 53)
    assert Binding("udp", "::1", (1, 2), "x").prefix == ipaddress.ip_network("::1/128")
    for bad in [
        lambda: Binding("sctp", "127.0.0.1", 80, "a"),
        lambda: Binding("tcp", "127.0.0.1/8", 80, "a"),  # host bits set
        lambda: Binding("tcp", "127.0.0.1", (0, 80), "a"),
        lambda: Binding("tcp", "127.0.0.1", (90, 80), "a"),
        lambda: Binding("tcp", "127.0.0.1", (1, 65536), "a"),
        lambda: Binding("tcp", "127.0.0.1", 80, "bad label"),
        lambda: Binding("tcp", "127.0.0.1", 80, "x" * 32),
        lambda: Binding("tcp", "127.0.0.1", 80, ""),
        lambda: Binding("tcp", "127.0.0.1", (PortRange(1, 2), PortRange(5, 6)), "a"),
    ]:
        with pytest.raises(ValueError) as info:
            bad()
        assert "\n" not in str(info.value)
    with pytest.raises(InvalidLabel):
        Binding("tcp", "127.0.0.1", 80, "a/b")
    # IPv4 and IPv6 bindings sort together without TypeError.
    assert sorted([Binding("tcp", "::1", 1, "a"), Binding("tcp", "127.0.0.1", 1, "a")])[0].prefix.version == 4


def _random_bindings(rng: random.Random, n: int) -> list[Binding]:
    prefixes = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "0.0.0.0/0", "::/0", "fd00::/8"]
    out = {}
    for _ in range(n):
        lo = rng.choice([1, 80, 443, 1000, 8000, 8080, rng.randint(1, 65535)])
        hi = rng.choice([lo, lo + 10, 8999, 65535, rng.randint(lo, 65535)])
        hi = min(max(hi, lo), 65535)
        b = Binding(rng.choice(["tcp", "udp"]), rng.choice(prefixes), (lo, hi), f"l{rng.randint(1, 9)}")
        out[(b.proto, b.prefix, b.ports)] = b
    return list(out.values())


def _table_decision(tables, ids: dict[int, str], proto: str, addr: str, port: int) -> str | None:
    """Repeat the program's decision on computed tables (LPM over the entries, in Python)."""
    ip = ipaddress.ip_address(addr)

    def lpm(cls: int) -> tuple[int, int] | None:
        want = struct.pack(
            ">BHB", socket.IPPROTO_TCP if proto == "tcp" else socket.IPPROTO_UDP, cls, ip.version
        )
        best = None
        for (plen, tail), label_id in tables.entries.items():
            if tail[:4] != want:
                continue
            packed = tail[4:8] if ip.version == 4 else tail[4:20]
            if ip in ipaddress.ip_network((ipaddress.ip_address(packed), plen - 40)) and (
                best is None or plen > best[0]
            ):
                best = (plen, label_id)
        return best

    partial = lpm(tables.port_class[port]) if tables.port_class[port] else None
    full = lpm(0) if tables.has_all_ports and port else None
    best = full if full is not None and (partial is None or full[0] > partial[0]) else partial
    return None if best is None else ids[best[1]]


def test_compute_tables_matches_precedence_rules() -> None:
    rng = random.Random(7)
    for _ in range(20):
        bindings = _random_bindings(rng, 12)
        label_ids = {label: i + 1 for i, label in enumerate(sorted({b.label for b in bindings}))}
        tables = compute_tables({b.key: label_ids[b.label] for b in bindings})
        ids = {v: k for k, v in label_ids.items()}
        for _ in range(60):
            proto = rng.choice(["tcp", "udp"])
            addr = rng.choice(["10.1.2.3", "10.1.2.4", "10.1.9.9", "10.9.9.9", "11.0.0.1", "fd00::1", "::1"])
            port = rng.choice([1, 80, 443, 999, 1000, 8000, 8080, 8999, 9000, 65535, rng.randint(1, 65535)])
            assert _table_decision(tables, ids, proto, addr, port) == reference_decision(
                bindings, proto, addr, port
            ), (proto, addr, port, bindings)


def test_port_classes_are_not_enumerated() -> None:
    def key(prefix: str, ports: tuple[int, int]) -> tuple:
        return Binding("tcp", prefix, ports, "x").key

    # Ranges cut the ports into classes; ports covered by the same set of ranges share one class, so
    # 8000-8999 with 8080 punched out is 2 classes (8080, the rest), not 3.
    tables = compute_tables({key("10.0.0.0/24", (8000, 8999)): 1, key("10.0.0.0/24", (8080, 8080)): 2})
    assert len(set(tables.port_class)) == 3
    assert tables.port_class[8079] == tables.port_class[8081] != tables.port_class[8080]
    assert len(tables.entries) == 2 and not tables.has_all_ports
    # 1000 prefixes over all ports: no classes at all, one entry per prefix, however many classes other
    # bindings create.
    bindings = {key(f"10.{i // 256}.{i % 256}.0/24", (1, 65535)): 1 for i in range(1000)}
    bindings.update({key("10.9.0.0/24", (p, p)): 2 for p in range(1000, 1500)})
    tables = compute_tables(bindings)
    assert tables.has_all_ports
    assert len(tables.entries) == 1000 + 500
    assert len(set(tables.port_class)) == 501
    # A prefix with a partial range needs one entry per class the range covers.
    bindings[key("10.8.0.0/24", (1000, 1999))] = 3
    assert len(compute_tables(bindings).entries) == 1000 + 500 + 501
    with pytest.raises(TableTooLarge):
        compute_tables(bindings, max_entries=1500)


# ---------------------------------------------------------------------------------------------------------
# steering


@privileged
def test_tcp_all_ports_to_one_socket_v4(netns: NetNS, disp: Dispatcher) -> None:
    disp.add_binding(Binding("tcp", "127.0.0.1/32", (1, 65535), "a"))
    with listener(netns) as ls:
        disp.register_socket("a", ls)
        ports = random_ports(200, seed=1)
        for port in ports:
            with connect(netns, "127.0.0.1", port) as client:
                conn, _ = ls.accept()
                with conn:
                    # The accepted socket reports the address and port that was dialled.
                    assert conn.getsockname() == ("127.0.0.1", port)
                    assert conn.getpeername() == client.getsockname()
    assert disp.counters()["a"] == {"lookups": len(ports), "misses": 0, "errors": 0}


@privileged
def test_tcp_all_ports_to_one_socket_v6(netns: NetNS, disp: Dispatcher) -> None:
    disp.add_binding(Binding("tcp", "::1/128", (1, 65535), "a6"))
    with listener(netns, "::1") as ls:
        disp.register_socket("a6", ls)
        for port in random_ports(50, seed=2):
            with connect(netns, "::1", port):
                conn, _ = ls.accept()
                with conn:
                    assert conn.getsockname()[:2] == ("::1", port)


@privileged
@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
def test_udp_all_ports_to_one_socket(netns: NetNS, disp: Dispatcher, addr: str) -> None:
    prefix = "::1/128" if ":" in addr else "127.0.0.1/32"
    disp.add_binding(Binding("udp", prefix, (1, 65535), "u"))
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with udp_socket(netns, addr) as server, netns.socket(family, socket.SOCK_DGRAM) as client:
        disp.register_socket("u", server)
        for port in random_ports(100, seed=3):
            payload = f"to {port}".encode()
            client.sendto(payload, (addr, port))
            data, dst = recv_orig_dst(server)
            assert (data, dst) == (payload, (addr, port))
    assert disp.counters()["u"]["lookups"] == 100


@privileged
def test_ipv4_to_dual_stack_v6_socket(netns: NetNS, disp: Dispatcher) -> None:
    disp.add_binding(Binding("tcp", "127.0.0.1/32", (1, 65535), "dual"))
    with listener(netns, "::", v6only=False) as ls:
        disp.register_socket("dual", ls)
        assert disp.sockets()["dual"][0]["v6only"] is False
        for port in random_ports(20, seed=4):
            with connect(netns, "127.0.0.1", port):
                conn, _ = ls.accept()
                with conn:
                    assert conn.getsockname()[:2] == ("::ffff:127.0.0.1", port)


@privileged
def test_v6only_socket_cannot_take_ipv4(netns: NetNS, disp: Dispatcher) -> None:
    disp.add_binding(Binding("tcp", "127.0.0.1/32", 4000, "v6o"))
    with listener(netns, "::", v6only=True) as ls:
        disp.register_socket("v6o", ls)
        assert disp.sockets()["v6o"][0]["v6only"] is True
        assert refused(netns, "127.0.0.1", 4000)
    assert disp.counters()["v6o"] == {"lookups": 1, "misses": 1, "errors": 0}


@privileged
def test_ports_outside_bindings_are_untouched(netns: NetNS, disp: Dispatcher) -> None:
    disp.add_binding(Binding("tcp", "127.0.0.1/32", (8000, 8999), "a"))
    with listener(netns) as steered, listener(netns, port=9000) as plain, listener(netns, port=8500) as other:
        disp.register_socket("a", steered)
        names = {"steered": steered, "plain": plain, "other": other}
        assert steered_to(netns, names, "127.0.0.1", 9000) == "plain"  # outside: normal lookup
        assert steered_to(netns, names, "127.0.0.1", 8500) == "steered"  # inside: the binding wins
        assert refused(netns, "127.0.0.1", 9001)  # outside, no listener: as without sockpolicy
        assert steered_to(netns, names, "127.0.0.2", 8500) == "refused"  # other address: untouched
    # UDP to the same ports is not bound either.
    with udp_socket(netns, port=8500) as u, netns.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.sendto(b"x", ("127.0.0.1", 8500))
        assert recv_orig_dst(u) == (b"x", ("127.0.0.1", 8500))
    assert disp.unmatched() >= 3


@privileged
def test_label_without_socket_refuses_and_counts_miss(netns: NetNS, disp: Dispatcher) -> None:
    disp.add_binding(Binding("tcp", "127.0.0.1/32", 5000, "nosock"))
    # Even a socket bound to exactly that address does not get it: the binding claims the port.
    with listener(netns, port=5000):
        assert refused(netns, "127.0.0.1", 5000)
        assert refused(netns, "127.0.0.1", 5000)
    assert disp.counters()["nosock"] == {"lookups": 2, "misses": 2, "errors": 0}
    # Registering then closing the socket: the kernel removes it, and connections are refused again.
    with listener(netns) as ls:
        disp.register_socket("nosock", ls)
        assert not refused(netns, "127.0.0.1", 5000)
    assert disp.sockets() == {}
    assert refused(netns, "127.0.0.1", 5000)


@privileged
def test_precedence_and_fallback_on_removal(netns: NetNS, disp: Dispatcher) -> None:
    b8 = Binding("tcp", "127.0.0.0/8", (1, 65535), "p8")
    b24 = Binding("tcp", "127.0.0.0/24", (1, 65535), "p24")
    b32 = Binding("tcp", "127.0.0.1/32", (1, 65535), "p32")
    wide = Binding("tcp", "127.0.0.2/32", (1, 65535), "wide")
    mid = Binding("tcp", "127.0.0.2/32", (8000, 8999), "mid")
    narrow = Binding("tcp", "127.0.0.2/32", 8080, "narrow")
    disp.add_bindings([b8, b24, b32, wide, mid, narrow])
    assert disp.bindings() == sorted([b8, b24, b32, wide, mid, narrow])

    labels = ["p8", "p24", "p32", "wide", "mid", "narrow"]
    socks = {label: listener(netns) for label in labels}
    try:
        for label, s in socks.items():
            disp.register_socket(label, s)
        expect = {
            ("127.0.0.1", 80): "p32",
            ("127.0.0.9", 80): "p24",
            ("127.1.2.3", 80): "p8",
            ("127.0.0.2", 80): "wide",
            ("127.0.0.2", 8000): "mid",
            ("127.0.0.2", 8080): "narrow",
            ("127.0.0.2", 8081): "mid",
            ("127.0.0.2", 9000): "wide",
        }

        def check() -> None:
            current = disp.bindings()
            for (addr, port), label in expect.items():
                assert (
                    disp.lookup("tcp", addr, port) == label == reference_decision(current, "tcp", addr, port)
                )
                assert steered_to(netns, socks, addr, port) == label, (addr, port)

        check()
        disp.remove_binding(narrow)
        expect[("127.0.0.2", 8080)] = "mid"
        check()
        disp.remove_binding(mid)
        expect.update({("127.0.0.2", 8000): "wide", ("127.0.0.2", 8080): "wide", ("127.0.0.2", 8081): "wide"})
        check()
        disp.remove_binding(b32)
        expect[("127.0.0.1", 80)] = "p24"
        check()
        disp.remove_bindings([b24, wide])
        expect = {k: "p8" for k in expect}
        check()
        with pytest.raises(KeyNotFound):
            disp.remove_binding(b24)
        with pytest.raises(KeyNotFound):
            disp.remove_binding(Binding("tcp", "127.0.0.0/8", (1, 65535), "other-label"))
        with pytest.raises(BindingConflict):
            disp.add_binding(Binding("tcp", "127.0.0.0/8", (1, 65535), "other-label"))
        disp.add_binding(b8)  # the same binding again is a no-op
        assert disp.bindings() == [b8]
    finally:
        for s in socks.values():
            s.close()


@privileged
def test_address_routed_local_on_lo(netns: NetNS, disp: Dispatcher) -> None:
    netns.ip("route", "add", "local", "198.18.5.0/24", "dev", "lo")
    disp.add_binding(Binding("tcp", "198.18.5.0/24", 443, "svc"))
    with listener(netns) as ls:
        disp.register_socket("svc", ls)
        with connect(netns, "198.18.5.77", 443):
            conn, _ = ls.accept()
            with conn:
                assert conn.getsockname() == ("198.18.5.77", 443)


@privileged
def test_reuseport_group_shares_load(netns: NetNS, disp: Dispatcher) -> None:
    disp.add_binding(Binding("tcp", "127.0.0.1/32", (1, 65535), "group"))
    first = listener(netns, reuseport=True)
    second = listener(netns, port=first.getsockname()[1], reuseport=True)
    with first, second:
        disp.register_socket("group", first)  # one member is enough
        counts = {"first": 0, "second": 0}
        for i in range(100):
            with connect(netns, "127.0.0.1", 20000 + i) as client:
                counts[accept_one({"first": first, "second": second}, client)] += 1
    assert counts["first"] > 0 and counts["second"] > 0, counts


@privileged
def test_register_socket_validation(netns: NetNS, disp: Dispatcher) -> None:
    with netns.socket() as unlistened:
        unlistened.bind(("127.0.0.1", 0))
        with pytest.raises(BadSocket, match="listening"):
            disp.register_socket("a", unlistened)
    with netns.socket(socket.AF_INET, socket.SOCK_DGRAM) as unbound:
        with pytest.raises(BadSocket, match="bound"):
            disp.register_socket("a", unbound)
        unbound.bind(("127.0.0.1", 0))
        unbound.connect(("127.0.0.1", 9))
        with pytest.raises(BadSocket, match="connected"):
            disp.register_socket("a", unbound)
    with netns.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix, pytest.raises(BadSocket):
        disp.register_socket("a", unix)
    with pytest.raises(InvalidLabel):
        disp.register_socket("no spaces", socket.socket())
    with pytest.raises(KeyNotFound):
        disp.unregister_socket("a", "tcp", socket.AF_INET)
    with listener(netns) as ls:
        disp.register_socket("a", ls)
        cookie = struct.unpack("=Q", ls.getsockopt(socket.SOL_SOCKET, 57, 8))[0]  # SO_COOKIE
        assert disp.sockets() == {"a": [{"proto": "tcp", "family": "ipv4", "cookie": cookie, "v6only": None}]}
        disp.unregister_socket("a", "tcp", 4)
        assert disp.sockets() == {}


# ---------------------------------------------------------------------------------------------------------
# pinned state


_SUBPROCESS_SETUP = """
import sys
from sockpolicy._dispatcher import Binding, Dispatcher
d = Dispatcher.open(netns=sys.argv[1], bpffs_root=sys.argv[2])
d.add_binding(Binding("tcp", "127.0.0.1/32", (6000, 6999), "restart"))
print(d.path)
"""  # exits without closing or unloading


@privileged
def test_state_survives_process_and_unload_stops_steering(netns: NetNS, bpffs_root: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SETUP, netns.path, bpffs_root],
        capture_output=True, text=True, check=True, cwd=REPO, timeout=30,
    ).stdout.strip()  # fmt: skip
    state = Path(out)
    assert state.parent == Path(bpffs_root) and state.name == str(os.stat(netns.path).st_ino)

    with Dispatcher.open(netns=netns.path, bpffs_root=bpffs_root, create=False) as d:
        assert d.bindings() == [Binding("tcp", "127.0.0.1/32", (6000, 6999), "restart")]
        with listener(netns) as ls:
            d.register_socket("restart", ls)
        # Closing the object, not the state: a second open still steers.
    with Dispatcher.open(netns=netns.path, bpffs_root=bpffs_root, create=False) as d, listener(netns) as ls:
        d.register_socket("restart", ls)
        with connect(netns, "127.0.0.1", 6123):
            conn, _ = ls.accept()
            conn.close()
        assert len(_attached_programs(netns)) == 1
        d.unload()
        assert d.closed
        assert not state.exists()
        assert _attached_programs(netns) == []
        # The listener is still open, but nothing steers port 6123 to it any more.
        assert refused(netns, "127.0.0.1", 6123)
    with pytest.raises(NotLoaded):
        Dispatcher.open(netns=netns.path, bpffs_root=bpffs_root, create=False)


def _attached_programs(ns: NetNS) -> list[int]:
    fd = ns.open_fd()
    try:
        return _libbpf.prog_query(fd, int(AttachType.SK_LOOKUP), {})
    finally:
        os.close(fd)


@privileged
def test_concurrent_open_attaches_once(netns: NetNS, bpffs_root: str) -> None:
    barrier = threading.Barrier(4)
    opened: list[Dispatcher] = []
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            opened.append(Dispatcher.open(netns=netns.path, bpffs_root=bpffs_root))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert len({d.path for d in opened}) == 1
        assert len(_attached_programs(netns)) == 1
        assert sorted(os.listdir(bpffs_root)) == [str(os.stat(netns.path).st_ino)]  # no temp dirs left
    finally:
        for d in opened:
            d.close()


@privileged
def test_pinned_files_are_root_only(disp: Dispatcher, bpffs_root: str) -> None:
    assert os.stat(bpffs_root).st_mode & 0o777 == 0o700
    assert os.stat(disp.path).st_mode & 0o777 == 0o700
    names = sorted(os.listdir(disp.path))
    assert {"link", "prog", "trie", "port_class", "config", "sockets", "bindings", "labels"} <= set(names)
    for name in names:
        assert os.stat(disp.path / name).st_mode & 0o777 == 0o600, name


@privileged
def test_no_fd_leak_over_open_close(netns: NetNS, bpffs_root: str) -> None:
    Dispatcher.open(netns=netns.path, bpffs_root=bpffs_root).close()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with Dispatcher.open(netns=netns.path, bpffs_root=bpffs_root) as d:
            d.add_binding(Binding("udp", "127.0.0.1", 53, "dns"))
            d.bindings(), d.counters(), d.sockets(), d.lookup("udp", "127.0.0.1", 53)
        d.close()  # idempotent
    assert len(os.listdir("/proc/self/fd")) == before


def test_open_without_bpffs_or_state(tmp_path: Path) -> None:
    with pytest.raises(NotLoaded):
        Dispatcher.open(bpffs_root=tmp_path / "nothing", create=False)


# ---------------------------------------------------------------------------------------------------------
# atomic updates


@privileged
def test_rewrites_never_misroute(netns: NetNS, disp: Dispatcher) -> None:
    # Two tables whose port classes are numbered differently, so that any mix of one table's port_class
    # and the other's trie sends some port to a label neither table gives it.
    t1 = [
        Binding("tcp", "127.0.0.1/32", (1, 65535), "A"),
        Binding("tcp", "127.0.0.1/32", (7000, 7999), "B"),
    ]
    t2 = [
        Binding("tcp", "127.0.0.1/32", (1, 65535), "A"),
        Binding("tcp", "127.0.0.1/32", (1, 999), "C"),
        Binding("tcp", "127.0.0.1/32", (7000, 7499), "C"),
    ]
    allowed = {
        500: {
            reference_decision(t1, "tcp", "127.0.0.1", 500),
            reference_decision(t2, "tcp", "127.0.0.1", 500),
        },
        7200: {"B", "C"},
        7700: {"B", "A"},
        9000: {"A"},
    }
    for port, labels in allowed.items():
        assert {reference_decision(t, "tcp", "127.0.0.1", port) for t in (t1, t2)} == labels
    disp.add_bindings(t1)
    socks = {label: listener(netns) for label in "ABC"}
    results: list[tuple[int, str]] = []
    done = threading.Event()

    def connector() -> None:
        ports = list(allowed)
        i = 0
        while not done.is_set():
            port = ports[i % len(ports)]
            results.append((port, steered_to(netns, socks, "127.0.0.1", port)))
            i += 1

    try:
        for label, s in socks.items():
            disp.register_socket(label, s)
        thread = threading.Thread(target=connector)
        thread.start()
        try:
            only1, only2 = [b for b in t1 if b not in t2], [b for b in t2 if b not in t1]
            # At least 200 rewrites, and more until plenty of connections overlapped them.
            flips, deadline = 0, time.monotonic() + 20
            while (flips < 200 or len(results) < 400) and time.monotonic() < deadline:
                if flips % 2 == 0:
                    disp.replace_bindings(remove=only1, add=only2)
                else:
                    disp.replace_bindings(remove=only2, add=only1)
                flips += 1
                time.sleep(0)  # let the connector run between rewrites
            if flips % 2:
                disp.replace_bindings(remove=only2, add=only1)
        finally:
            done.set()
            thread.join()
    finally:
        for s in socks.values():
            s.close()
    misrouted = [(port, got) for port, got in results if got not in allowed[port]]
    assert len(results) >= 400
    assert {got for _, got in results} == {"A", "B", "C"}  # both tables were seen
    assert not misrouted, misrouted[:10]
    assert disp.bindings() == sorted(t1)


# ---------------------------------------------------------------------------------------------------------
# scale


@privileged
def test_scale_100k_bindings(netns: NetNS, disp: Dispatcher, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(100)
    # A realistic mix: mostly single service ports, some shared ranges, some catch-all addresses.
    shapes = [(1, 65535), (8000, 8999)] + [None] * 18
    bindings = []
    for i in range(100_000):
        ports = shapes[i % 20] or 1000 + i % 5000
        prefix = ipaddress.IPv4Network((0x0A000000 + i * 4, 30))
        bindings.append(Binding("tcp" if i % 3 else "udp", prefix, ports, f"svc{i % 200}"))
    start = time.perf_counter()
    disp.add_bindings(bindings)
    elapsed = time.perf_counter() - start
    for b in rng.sample(bindings, 200):
        addr = b.prefix.network_address + rng.randint(0, 3)
        port = rng.randint(b.ports.lo, b.ports.hi)
        assert disp.lookup(b.proto, addr, port) == b.label
    assert disp.lookup("tcp", "11.0.0.1", 1000) is None
    assert disp.lookup("tcp", "10.0.0.4", 999) is None
    start = time.perf_counter()
    disp.add_binding(Binding("tcp", "10.0.0.0/8", (1, 65535), "catchall"))
    one_more = time.perf_counter() - start
    assert disp.lookup("tcp", "10.255.0.1", 80) == "catchall"
    assert len(disp.bindings()) == 100_001
    with capsys.disabled():
        print(f"\n[dispatcher] 100k bindings installed in {elapsed:.2f}s; one more binding: {one_more:.2f}s")


@privileged
def test_scale_1000_prefixes_all_ports(
    netns: NetNS, disp: Dispatcher, capsys: pytest.CaptureFixture[str]
) -> None:
    bindings = [
        Binding("tcp", f"10.{i // 256}.{i % 256}.0/24", (1, 65535), f"p{i % 50}") for i in range(1000)
    ]
    start = time.perf_counter()
    disp.add_bindings(bindings)
    elapsed = time.perf_counter() - start
    assert disp.lookup("tcp", "10.3.231.9", 65535) == "p49"  # i = 999
    assert disp.lookup("tcp", "10.0.0.1", 1) == "p0"
    assert disp.lookup("udp", "10.0.0.1", 1) is None
    with capsys.disabled():
        print(f"\n[dispatcher] 1000 prefixes x ports 1-65535 installed in {elapsed * 1000:.0f}ms")


@privileged
def test_table_too_large_is_refused_cleanly(netns: NetNS, bpffs_root: str) -> None:
    with Dispatcher.open(netns=netns.path, bpffs_root=bpffs_root, trie_entries=64) as d:
        d.add_binding(Binding("tcp", "127.0.0.1", 80, "a"))
        with pytest.raises(TableTooLarge):
            d.add_bindings(Binding("tcp", f"10.0.0.{i}/32", (1, 65535), "b") for i in range(70))
        # Nothing changed, and the label that the refused bindings would have used is not left behind.
        assert d.bindings() == [Binding("tcp", "127.0.0.1", 80, "a")]
        assert d.lookup("tcp", "127.0.0.1", 80) == "a"
        assert list(d.counters()) == ["a"]
        # 40 new entries + 1 old fit in 64 during the switch.
        d.add_bindings(Binding("tcp", f"10.0.0.{i}/32", (1, 65535), "b") for i in range(40))
        assert d.lookup("tcp", "10.0.0.39", 5) == "b"


@privileged
def test_state_of_a_dead_namespace_is_replaced(make_netns, bpffs_root: str) -> None:
    # A namespace's inode number can be reused after it is deleted; the pinned state left behind then
    # names the new namespace but its link is detached.  It must be replaced, not trusted.
    old = make_netns()
    with Dispatcher.open(netns=old.path, bpffs_root=bpffs_root) as d:
        d.add_binding(Binding("tcp", "127.0.0.1", 80, "old"))
        stale = d.path
    old.close()
    new = make_netns()
    os.rename(stale, Path(bpffs_root) / str(os.stat(new.path).st_ino))  # simulate the reuse
    with pytest.raises(NotLoaded):
        Dispatcher.open(netns=new.path, bpffs_root=bpffs_root, create=False)
    with Dispatcher.open(netns=new.path, bpffs_root=bpffs_root) as d:
        assert d.bindings() == []
        assert len(_attached_programs(new)) == 1


@privileged
def test_writer_dying_mid_update_is_repaired(netns: NetNS, bpffs_root: str) -> None:
    from sockpolicy._dispatcher import _CONFIG, _TRIE_TAIL, _TRIE_VALUE, _ZERO, _trie_key

    with Dispatcher.open(netns=netns.path, bpffs_root=bpffs_root) as d:
        d.add_binding(Binding("tcp", "127.0.0.1", 80, "a"))
        # What a writer that died after writing part of the inactive generation leaves behind.
        active, _, serial, version, _ = _CONFIG.unpack(d._maps["config"].lookup(_ZERO))
        junk = _trie_key(1 - active, 40 + 8, _TRIE_TAIL.pack(socket.IPPROTO_TCP, 1, 4, bytes(16)))
        d._maps["trie"].update(junk, _TRIE_VALUE.pack(1, 8))
        d._maps["config"].update(_ZERO, _CONFIG.pack(active, 1, serial, version, 0))
    with Dispatcher.open(netns=netns.path, bpffs_root=bpffs_root) as d:
        d.add_binding(Binding("tcp", "127.0.0.2", 80, "b"))
        active, dirty, _, _, _ = _CONFIG.unpack(d._maps["config"].lookup(_ZERO))
        keys = list(d._maps["trie"].keys())
        assert dirty == 0
        assert len(keys) == 2 and all(k[4] == active for k in keys)
        assert d.lookup("tcp", "127.0.0.1", 80) == "a" and d.lookup("tcp", "127.0.0.2", 80) == "b"
