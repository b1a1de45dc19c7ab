"""Tests of the test harness (tests/_harness.py): namespaces, veth pairs, privilege gating, fd-leak check."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import _harness
import pytest
import trio

TESTS_DIR = Path(__file__).resolve().parent
IP_MTU = 14  # <linux/in.h>; not exported by the socket module


def _netns_inode_of_this_thread() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _echo_once(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _roundtrip(client: socket.socket, payload: bytes) -> bytes:
    received = bytearray()

    def reader() -> None:
        while chunk := client.recv(65536):
            received.extend(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    client.sendall(payload)
    client.shutdown(socket.SHUT_WR)
    thread.join(timeout=10)
    return bytes(received)


def _tcp_echo_across(server_ns: _harness.NetNS, client_ns: _harness.NetNS, family: int, addr: str) -> None:
    """Listen in server_ns on addr, connect from client_ns, echo 256 KiB back."""
    with server_ns.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((addr, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        server = threading.Thread(target=_echo_once, args=(listener,))
        server.start()
        try:
            with client_ns.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(10)
                client.connect((addr, port))
                payload = os.urandom(256 * 1024)
                assert _roundtrip(client, payload) == payload
        finally:
            server.join(timeout=10)
        assert not server.is_alive()


# ---------------------------------------------------------------------------------------------------
# namespaces
# ---------------------------------------------------------------------------------------------------


def test_netns_has_only_lo_and_it_is_up(netns):
    assert netns.name.startswith("sp-")
    assert netns.path == f"/run/netns/{netns.name}"
    assert os.path.exists(netns.path)
    links = netns.links()
    assert [link["ifname"] for link in links] == ["lo"]
    assert "UP" in links[0]["flags"]
    assert netns.ip("-o", "link", "show").stdout.count("\n") == 1


def test_socket_created_in_netns_lives_there(netns):
    with netns.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        # The host's 127.0.0.1:port is a different address: it can be bound, and nobody listens on it.
        with socket.socket() as host_bound:
            host_bound.bind(("127.0.0.1", port))
            with socket.socket() as host_client, pytest.raises(ConnectionRefusedError):
                host_client.connect(("127.0.0.1", port))

        # A client created in the same namespace, used from this (host) thread, reaches the listener.
        with netns.socket() as client:
            client.settimeout(5)
            client.connect(("127.0.0.1", port))
            conn, _ = listener.accept()
            with conn:
                client.sendall(b"ping")
                assert conn.recv(4) == b"ping"


def test_call_runs_in_namespace_without_moving_caller(netns):
    host_ns = _netns_inode_of_this_thread()
    ns_inode = os.stat(netns.path).st_ino
    assert ns_inode != host_ns
    assert netns.call(_netns_inode_of_this_thread) == ns_inode
    assert _netns_inode_of_this_thread() == host_ns
    assert netns.call(lambda a, b=0: a + b, 1, b=2) == 3

    def boom() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        netns.call(boom)


async def test_acall_from_trio_keeps_trio_threads_in_host_namespace(netns):
    host_ns = _netns_inode_of_this_thread()
    ns_inode = os.stat(netns.path).st_ino
    for _ in range(3):
        assert await netns.acall(_netns_inode_of_this_thread) == ns_inode
    assert _netns_inode_of_this_thread() == host_ns
    # trio's cached worker threads were not moved either
    assert await trio.to_thread.run_sync(_netns_inode_of_this_thread) == host_ns
    sock = await netns.acall(socket.socket, socket.AF_INET6, socket.SOCK_DGRAM)
    with trio.socket.from_stdlib_socket(sock) as tsock:
        await tsock.bind(("::1", 0))
        await tsock.sendto(b"x", tsock.getsockname())
        assert await tsock.recv(1) == b"x"


def test_run_popen_and_fd(netns):
    assert netns.run(["ip", "-o", "link"]).stdout.split(":")[1].strip() == "lo"
    with pytest.raises(_harness.CommandFailed, match="exited"):
        netns.run(["false"])
    proc = netns.popen([sys.executable, "-c", "import os; print(os.stat('/proc/self/ns/net').st_ino)"],
                       stdout=subprocess.PIPE, text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=10)
    proc.stdout.close()
    assert int(out) == os.stat(netns.path).st_ino
    assert os.fstat(netns.fd()).st_ino == os.stat(netns.path).st_ino
    fd = netns.open_fd()
    os.close(fd)


def test_make_netns_gives_distinct_namespaces(make_netns):
    a, b = make_netns(), make_netns()
    assert a.name != b.name
    assert os.stat(a.path).st_ino != os.stat(b.path).st_ino


@pytest.mark.privileged  # it creates namespaces without a namespace fixture
def test_close_removes_namespace_and_kills_its_processes():
    with _harness.NetNS.create() as ns:
        name = ns.name
        proc = ns.popen(["sleep", "30"])
        assert name in _harness.run(["ip", "netns", "list"]).stdout
    assert not os.path.exists(f"/run/netns/{name}")
    assert name not in _harness.run(["ip", "netns", "list"]).stdout
    assert proc.returncode is not None
    ns.close()  # idempotent

    pair = _harness.create_veth_pair(mtu=1500)
    names = [pair.a.ns.name, pair.b.ns.name]
    pair.close()
    assert not any(os.path.exists(f"/run/netns/{n}") for n in names)


# ---------------------------------------------------------------------------------------------------
# veth pairs
# ---------------------------------------------------------------------------------------------------


def test_veth_pair_addresses_and_tcp_v4_v6(veth_pair):
    a, b = veth_pair.a, veth_pair.b
    assert (a.ip4, b.ip4, a.ip6, b.ip6) == ("198.18.0.1", "198.18.0.2", "fd00:5eed::1", "fd00:5eed::2")
    assert a.ns.name != b.ns.name
    assert sorted(link["ifname"] for link in a.ns.links()) == ["lo", a.ifname]
    assert sorted(link["ifname"] for link in b.ns.links()) == ["lo", b.ifname]
    _tcp_echo_across(b.ns, a.ns, socket.AF_INET, b.ip4)
    _tcp_echo_across(a.ns, b.ns, socket.AF_INET6, a.ip6)


def test_veth_pair_mtu_and_several_pairs(make_veth_pair):
    small = make_veth_pair(mtu=1280)
    default = make_veth_pair()
    for end in (small.a, small.b):
        assert end.ns.ip_json("link", "show", "dev", end.ifname)[0]["mtu"] == 1280
    assert default.a.ns.ip_json("link", "show", "dev", default.a.ifname)[0]["mtu"] == 1500
    assert (default.a.ip4, default.b.ip6) == ("198.18.1.1", "fd00:5eed::102")

    # The route MTU seen by a connected socket, and a transfer larger than many MTUs.
    with small.a.ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect((small.b.ip4, 9))
        assert udp.getsockopt(socket.IPPROTO_IP, IP_MTU) == 1280
    _tcp_echo_across(small.b.ns, small.a.ns, socket.AF_INET6, small.b.ip6)
    _tcp_echo_across(default.a.ns, default.b.ns, socket.AF_INET, default.a.ip4)


# ---------------------------------------------------------------------------------------------------
# privilege gating and fd-leak check, via pytest runs on a generated test file
# ---------------------------------------------------------------------------------------------------

CHILD_TESTS = textwrap.dedent(
    """
    import os
    import socket
    from pathlib import Path

    import _harness
    import pytest
    import trio

    OUT = Path(os.environ["SP_CHILD_OUT"])
    LEAKED = []


    @pytest.mark.privileged
    def test_priv():
        pass


    @pytest.mark.privileged
    def test_priv_skips():
        pytest.skip("explicit skip")


    @pytest.mark.privileged
    @pytest.mark.xfail(strict=True)
    def test_priv_xfail():
        raise AssertionError


    def test_plain():
        pass


    def test_netns_fixture_fails(netns):  # no marker: the fixture makes it privileged
        (OUT / "failing_ns").write_text(netns.name)
        raise AssertionError("deliberate")


    def test_forgets_netns():
        if _harness.privilege_problem():
            pytest.skip("unprivileged")
        (OUT / "forgotten_ns").write_text(_harness.NetNS.create().name)


    @pytest.mark.privileged
    def test_leaks_fd():
        LEAKED.append(open("/dev/null"))


    @pytest.mark.privileged
    @pytest.mark.no_fd_check
    def test_leaks_fd_exempt():
        LEAKED.append(open("/dev/zero"))


    @pytest.mark.privileged
    async def test_trio_no_leak(netns):
        sock = await netns.acall(socket.socket)
        sock.close()
        a, b = trio.socket.socketpair()
        with a, b:
            await a.send(b"x")
            assert await b.recv(1) == b"x"
        await trio.to_thread.run_sync(lambda: None)
        await trio.sleep(0.01)
    """
)


def _run_child(tmp_path: Path, *, require: bool, fake_unprivileged: bool) -> tuple[dict[str, str], str]:
    """Run pytest on CHILD_TESTS; return ({test name: outcome}, output). Outcomes: passed, failed,
    skipped, xfailed (failures and errors are both 'failed')."""
    test_file = tmp_path / "test_child.py"
    test_file.write_text(CHILD_TESTS)
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    xml = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOCKPOLICY_", "PYTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["SP_CHILD_OUT"] = str(out_dir)
    if require:
        env[_harness.REQUIRE_PRIVILEGED_ENV] = "1"
    if fake_unprivileged:
        env[_harness.FAKE_UNPRIVILEGED_ENV] = "1"
    argv = [sys.executable, "-m", "pytest", "-p", "_harness", "-p", "no:cacheprovider", "-rA",
            "-o", "trio_mode=true", "-o", "timeout=60", "--junitxml", str(xml), str(test_file)]  # fmt: skip
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert xml.exists(), output
    outcomes: dict[str, str] = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name")
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome != "failed":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
        # a test failing at teardown appears twice (call passed, teardown error): keep the worst
        if outcomes.get(name) != "failed":
            outcomes[name] = outcome
    expected_rc = 1 if "failed" in outcomes.values() else 0
    assert result.returncode == expected_rc, output
    return outcomes, output


def test_unprivileged_run_skips_privileged_tests(tmp_path):
    outcomes, output = _run_child(tmp_path, require=False, fake_unprivileged=True)
    assert outcomes == {
        "test_priv": "skipped",
        "test_priv_skips": "skipped",
        "test_priv_xfail": "skipped",
        "test_plain": "passed",
        "test_netns_fixture_fails": "skipped",
        "test_forgets_netns": "skipped",
        "test_leaks_fd": "skipped",
        "test_leaks_fd_exempt": "skipped",
        "test_trio_no_leak": "skipped",
    }, output
    assert "SOCKPOLICY_FAKE_UNPRIVILEGED=1 simulates an unprivileged run" in output


def test_unprivileged_run_fails_privileged_tests_when_required(tmp_path):
    outcomes, output = _run_child(tmp_path, require=True, fake_unprivileged=True)
    assert outcomes["test_plain"] == "passed", output
    for name, outcome in outcomes.items():
        if name not in ("test_plain", "test_forgets_netns"):
            assert outcome == "failed", (name, output)
    assert outcomes["test_forgets_netns"] == "skipped"  # not privileged-marked: an ordinary skip
    assert "SOCKPOLICY_REQUIRE_PRIVILEGED=1 forbids skipping it" in output


@pytest.mark.privileged
def test_privileged_run_require_turns_skip_into_failure_and_checks_fds(tmp_path):
    outcomes, output = _run_child(tmp_path, require=True, fake_unprivileged=False)
    assert outcomes == {
        "test_priv": "passed",
        "test_priv_skips": "failed",  # an explicit skip of a privileged test fails under REQUIRE
        "test_priv_xfail": "xfailed",  # xfail is not a skip
        "test_plain": "passed",
        "test_netns_fixture_fails": "failed",
        "test_forgets_netns": "passed",
        "test_leaks_fd": "failed",
        "test_leaks_fd_exempt": "passed",
        "test_trio_no_leak": "passed",  # trio's own fds are not mistaken for a leak
    }, output
    assert "skipped under SOCKPOLICY_REQUIRE_PRIVILEGED=1" in output and "explicit skip" in output
    assert "fd leak:" in output and "-> /dev/null" in output
    assert "/dev/zero" not in output
    # The namespace of the failing test was deleted; the forgotten one was swept at session end.
    failing = (tmp_path / "out" / "failing_ns").read_text()
    forgotten = (tmp_path / "out" / "forgotten_ns").read_text()
    assert not os.path.exists(f"/run/netns/{failing}")
    assert not os.path.exists(f"/run/netns/{forgotten}")
    assert f"removed leftover namespaces {forgotten}" in output


@pytest.mark.privileged
def test_privileged_run_without_require_allows_skips(tmp_path):
    outcomes, output = _run_child(tmp_path, require=False, fake_unprivileged=False)
    assert outcomes["test_priv_skips"] == "skipped", output
    assert outcomes["test_priv"] == "passed", output


def test_privilege_problem_reads_capabilities(monkeypatch):
    monkeypatch.delenv(_harness.FAKE_UNPRIVILEGED_ENV, raising=False)
    monkeypatch.setattr(_harness, "effective_caps", lambda: 1 << _harness.CAP_NET_ADMIN)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    problem = _harness.privilege_problem()
    assert "not root" in problem and "CAP_SYS_ADMIN" in problem and "CAP_BPF" in problem
    assert "CAP_NET_ADMIN" not in problem
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(_harness, "effective_caps", lambda: (1 << 40) - 1)
    assert _harness.privilege_problem() is None
    monkeypatch.setenv(_harness.FAKE_UNPRIVILEGED_ENV, "1")
    assert _harness.privilege_problem() is not None


def test_format_leak():
    assert _harness.format_leak({0: "a", 1: "b"}, {0: "a", 1: "b"}) is None
    assert _harness.format_leak({0: "a", 1: "b"}, {0: "a"}) is None
    message = _harness.format_leak({0: "a"}, {0: "a", 3: "socket:[1]"})
    assert "fd 3 -> socket:[1]" in message
