"""Kernel splicing over IPv6: the cases of test_splice.py with IPv6 clients, proxy and upstream.

The splice programs key sockets by cookie and read nothing family-specific, and the relay's EOF
accounting (``TCP_INFO``, ``SIOCOUTQ``) is the same for both families, so IPv6 should splice exactly
like IPv4.  These tests check it: on ``::1`` inside a test namespace, across a veth pair with ULA
addresses (``nodad``), and through a dual-stack listener (``::``) that takes an IPv4 client as a
v4-mapped address and splices it to an IPv6 upstream.  Every stream is checked byte for byte by the
receiver (helpers of test_splice.py), and every case ends with no map entry and no slot in use.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import trio
from _harness import NetNS, VethPair
from test_splice import (
    TIMEOUT,
    Upstream,
    assert_clean,
    exchange,
    proxy_process,
    reset_after_sending,
    upstream_resets_spliced,
    upstream_server,
)

pytestmark = pytest.mark.privileged


def sockets_in(netns: NetNS, family: int, count: int) -> list[trio.socket.SocketType]:
    return [
        trio.socket.from_stdlib_socket(s)
        for s in netns.call(lambda: [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)])
    ]


async def test_v6_loopback_both_directions_half_close(netns: NetNS) -> None:
    """3 MB each way over ::1, the client half-closes first; then 4 connections with random write sizes."""
    async with (
        upstream_server(netns, "::1") as up,
        proxy_process(netns, up, "--policy", "connect", "--listen", "::1") as px,
    ):
        assert px.splice_reason is None, px.stderr()
        addr = ("::1", px.port)
        with trio.fail_after(TIMEOUT):
            [sock] = sockets_in(netns, socket.AF_INET6, 1)
            await exchange(sock, addr, 1, 3_000_000, 3_000_000)
            socks = sockets_in(netns, socket.AF_INET6, 4)
            async with trio.open_nursery() as nursery:
                for i, s in enumerate(socks):
                    rng = random.Random(i)
                    nursery.start_soon(
                        lambda s=s, i=i, rng=rng: exchange(s, addr, 2 + i, 2_000_000, 1_500_000, rng=rng)
                    )
            stats = await px.wait_idle()
    assert up.errors == [] and up.results == {1: 3_000_000, **{2 + i: 2_000_000 for i in range(4)}}
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 5
    assert stats["serve"]["bytes_spliced"] >= 3_000_000, stats


async def test_v6_switch_paused_while_both_stream(netns: NetNS) -> None:
    """Splice() from on_message on IPv6, with the switch held open while both sides keep sending."""
    preamble = b"hello\nSPLICE\n"
    async with (
        upstream_server(netns, "::1") as up,
        proxy_process(netns, up, "--policy", "message", "--switch-pause", "0.3", "--listen", "::1") as px,
    ):
        addr = ("::1", px.port)
        with trio.fail_after(TIMEOUT):
            socks = sockets_in(netns, socket.AF_INET6, 4)
            async with trio.open_nursery() as nursery:
                for i, sock in enumerate(socks):
                    rng = random.Random(100 + i)
                    nursery.start_soon(
                        lambda s=sock, i=i, rng=rng: exchange(
                            s, addr, 10 + i, 4_000_000, 4_000_000, preamble=preamble, rng=rng
                        )
                    )
            stats = await px.wait_idle()
    assert up.errors == [] and up.results == {10 + i: 4_000_000 for i in range(4)}
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 4
    assert stats["serve"]["bytes_spliced"] > 4_000_000, stats


async def test_v6_client_rst_and_upstream_rst(netns: NetNS) -> None:
    """A reset on either side of a spliced IPv6 connection reaches the other side as a reset."""
    async with (
        upstream_server(netns, "::1") as up,
        proxy_process(netns, up, "--policy", "connect", "--listen", "::1") as px,
    ):
        with trio.fail_after(TIMEOUT):
            [b] = sockets_in(netns, socket.AF_INET6, 1)
            await reset_after_sending(b, ("::1", px.port), up)
            stats = await px.wait_idle()
    assert up.errors == [] and 21 not in up.results
    assert_clean(stats)

    lsock = netns.socket(socket.AF_INET6)
    lsock.bind(("::1", 0))
    lsock.listen(16)
    listener = trio.socket.from_stdlib_socket(lsock)
    up = Upstream(listener.getsockname()[:2])
    with listener:
        async with proxy_process(netns, up, "--policy", "connect", "--listen", "::1") as px:
            with trio.fail_after(TIMEOUT):
                [sock] = sockets_in(netns, socket.AF_INET6, 1)
                await upstream_resets_spliced(sock, listener, ("::1", px.port))
                stats = await px.wait_idle()
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 1


async def test_v6_across_veth_with_ula_addresses(veth_pair: VethPair) -> None:
    """Client in one namespace, proxy and upstream in the other, over fd00:5eed::/64 (MTU 1500, so real
    segmentation rather than loopback's 64 KiB skbs)."""
    client_end, proxy_end = veth_pair.a, veth_pair.b
    async with (
        upstream_server(proxy_end.ns, "::1") as up,
        proxy_process(proxy_end.ns, up, "--policy", "connect", "--listen", proxy_end.ip6) as px,
    ):
        assert px.splice_reason is None, px.stderr()
        addr = (proxy_end.ip6, px.port)
        with trio.fail_after(TIMEOUT):
            socks = sockets_in(client_end.ns, socket.AF_INET6, 3)
            async with trio.open_nursery() as nursery:
                for i, s in enumerate(socks):
                    nursery.start_soon(
                        lambda s=s, i=i: exchange(s, addr, 40 + i, 3_000_000, 3_000_000, rng=random.Random(i))
                    )
            stats = await px.wait_idle()
    assert up.errors == [] and up.results == {40 + i: 3_000_000 for i in range(3)}
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 3
    assert stats["serve"]["bytes_spliced"] > 3_000_000, stats


async def test_dual_stack_listener_splices_v4_mapped_clients(netns: NetNS) -> None:
    """A ``::`` listener (IPV6_V6ONLY off): an IPv4 client arrives as ::ffff:127.0.0.1 and is spliced to
    an IPv6 upstream; an IPv6 client on the same listener too."""
    async with (
        upstream_server(netns, "::1") as up,
        proxy_process(netns, up, "--policy", "connect", "--listen", "::") as px,
    ):
        with trio.fail_after(TIMEOUT):
            [v4] = sockets_in(netns, socket.AF_INET, 1)
            [v6] = sockets_in(netns, socket.AF_INET6, 1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(exchange, v4, ("127.0.0.1", px.port), 50, 2_000_000, 2_000_000)
                nursery.start_soon(exchange, v6, ("::1", px.port), 51, 2_000_000, 2_000_000)
            stats = await px.wait_idle()
    assert up.errors == [] and up.results == {50: 2_000_000, 51: 2_000_000}
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 2
    assert stats["serve"]["bytes_spliced"] >= 2_000_000, stats


# ---------------------------------------------------------------------------------------------------------
# sockpolicy serve --splice, steered on IPv6


class SpliceStall(AssertionError):
    """The echo stopped arriving: the known stall of ``serve --splice`` below (not IPv6-specific)."""


# Formerly a known bug, not IPv6-specific: in about 1 connection in 15 the echo stopped after 100 KB to 1 MB
# of 4 MB, the proxy's client-side socket in CLOSE-WAIT with an empty send queue (also on IPv4, e.g.
# test_splice_cli.py::test_serve_splice_byte_exact_and_counted 4 of 30 runs).  Not seen on the tree that
# has the merged switch fixes (bare FIN skbs dropped once splicing was requested, b767ea1) and the
# verdict's trim of overlapping retransmissions: 20 runs of this test (40 connections) and 20 of the IPv4
# CLI test passed.  Which change fixed it is not established.  A stall raises SpliceStall, with ss and
# the serve log.
@pytest.mark.parametrize("upstream_host", ["::1", "127.0.0.1"])
def test_serve_splice_ipv6_and_ipv4_byte_exact(netns: NetNS, tmp_path: Path, upstream_host: str) -> None:
    """The real command: ``--addr ::1/128 --addr 127.0.0.1/32``, an IPv6 (or IPv4) upstream.  Clients of
    both families dial port 8080 (steered by SK_LOOKUP to the proxy's sockets) and are spliced, 4 MB each
    way, byte-exact; the exit summary counts them all as spliced."""
    from _e2e import sockpolicy as run_cli
    from _e2e import stop as stop_cli
    from test_splice_cli import EchoUpstream, exchange, start, wait_for

    class EchoUpstreamAt(EchoUpstream):
        def __init__(self, ns: NetNS) -> None:
            family = socket.AF_INET6 if ":" in upstream_host else socket.AF_INET
            self.listener = ns.call(lambda: socket.create_server((upstream_host, 0), family=family))
            self.port = self.listener.getsockname()[1]
            threading.Thread(target=self._accept, daemon=True).start()

    up = EchoUpstreamAt(netns)
    upstream = f"[{upstream_host}]:{up.port}" if ":" in upstream_host else f"{upstream_host}:{up.port}"
    log = tmp_path / "serve.log"
    proc = start(netns, log, "--splice", "--upstream", upstream, "--proto", "tcp",
                 "--addr", "::1/128", "--addr", "127.0.0.1/32", "--metrics", "127.0.0.1:9464")  # fmt: skip
    try:
        for i, (family, host) in enumerate([(socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")]):

            def dial(family: int = family, host: str = host) -> socket.socket:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        s = socket.socket(family)
                        s.settimeout(10)
                        s.connect((host, 8080))
                        return s
                    except OSError:
                        s.close()
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)

            data = random.Random(i).randbytes(4 << 20)
            with netns.call(dial) as sock:
                try:
                    got = exchange(sock, data, end=True)
                except OSError as exc:
                    sockets = netns.run(["ss", "-tnim"], check=False).stdout
                    raise SpliceStall(
                        f"{host}: {exc!r}\n--- ss -tnim\n{sockets}\n--- serve log\n{log.read_text()}"
                    ) from exc
                assert got == data, host
        wait_for("both connections closed", lambda: _closed(netns, 2))
    finally:
        code, _ = stop_cli(proc)
        run_cli(netns, "unload")
        up.close()
    text = log.read_text()
    assert code == 0, text
    assert "splice: enabled" in text
    assert re.search(r"splice: 2 connections spliced \([1-9]\d* bytes\), 0 relayed in userspace", text), text
    assert "Traceback" not in text


def _closed(netns: NetNS, n: int) -> bool:
    from test_ops import scrape

    m = scrape(netns, 9464)
    return (
        m.get('sockpolicy_connections_active{label="default"}') == 0
        and m.get('sockpolicy_connections_total{label="default",proto="tcp"}') == n
    )
