"""Kernel per-message rules on spliced connections (docs/splice.md, "Kernel rules"), end to end.

The proxy is the splicing child process of ``tests/test_splice.py`` (``python -m sockpolicy._splice_server``
in the test's namespace).  Its ``Splicer.open()`` picks up the rules pinned in that namespace, which the
test creates with ``Enforcer.create(pin=True)`` before starting it and removes with ``unload()`` after.

Messages are sent one at a time with ``TCP_NODELAY`` and the next one only after the previous one's effect
is visible (its echo arrived, or the drop rule's counter moved), so that each message is one skb: an
unframed message on a spliced connection is one received skb (see docs/splice.md).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from _e2e import sockpolicy as cli
from _e2e import stop
from _harness import NetNS
from test_splice import TIMEOUT, assert_clean, client_sockets, exchange, proxy_process, upstream_server
from test_splice_cli import EchoUpstream as ThreadedEchoUpstream
from test_splice_cli import connect, serve_args, start, wait_for

from sockpolicy._objects import Map, MapType
from sockpolicy._rules import Enforcer, Framing, GenerationStats, Rule, RuleSet

pytestmark = pytest.mark.privileged


@contextlib.contextmanager
def pinned_rules(netns: NetNS, ruleset: RuleSet) -> Iterator[Enforcer]:
    """The namespace's pinned rules state (what ``sockpolicy enforce`` makes), removed afterwards."""
    enforcer = netns.call(lambda: Enforcer.create(pin=True))
    try:
        enforcer.replace(ruleset)
        yield enforcer
    finally:
        enforcer.unload()


class EchoUpstream:
    """Echoes every connection until EOF, then half-closes; keeps what each connection received."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.received: list[bytes] = []


@contextlib.asynccontextmanager
async def echo_upstream(netns: NetNS) -> AsyncIterator[EchoUpstream]:
    lsock = netns.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    listener = trio.socket.from_stdlib_socket(lsock)
    up = EchoUpstream(listener.getsockname())

    async def echo(sock: trio.socket.SocketType) -> None:
        got = bytearray()
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                while data := await sock.recv(65536):
                    got += data
                    await sock.send(data)
                sock.shutdown(socket.SHUT_WR)
        up.received.append(bytes(got))

    async with trio.open_nursery() as nursery:

        async def accept_loop() -> None:
            while True:
                sock, _ = await listener.accept()
                nursery.start_soon(echo, sock)

        nursery.start_soon(accept_loop)
        try:
            yield up
        finally:
            nursery.cancel_scope.cancel()
            listener.close()


async def recv_exact(sock: trio.socket.SocketType, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        data = await sock.recv(size - len(got))
        assert data, f"EOF after {len(got)} of {size} bytes"
        got += data
    return bytes(got)


async def wait_count(enforcer: Enforcer, rule: str, msgs: int) -> None:
    """Until the live counter of ``rule`` reaches ``msgs`` (a dropped message has no other visible effect)."""
    while enforcer.stats()[rule].msgs < msgs:
        await trio.sleep(0.005)
    assert enforcer.stats()[rule].msgs == msgs


def total(stats: GenerationStats) -> tuple[int, int]:
    """(messages, bytes) over every rule of a generation and its "no rule matched" counter."""
    every = [*stats.rules, stats.unmatched]
    return sum(r.msgs for r in every), sum(r.bytes for r in every)


def drop_rules(upstream_port: int) -> RuleSet:
    return RuleSet(
        (
            Rule("Drop", name="no-drop", prefix=b"DROP"),
            # Replies only: the proxy receives them on its upstream socket, whose remote port is the
            # upstream's (the request went up through the client's socket, remote port: the client's).
            Rule("Drop", name="no-secret-reply", prefix=b"SECRET", remote_ports=str(upstream_port)),
        )
    )


async def test_drop_rules_before_and_after_the_switch(netns: NetNS) -> None:
    """Line policy: lines are inspected in userspace until ``SPLICE``, then the connection is spliced.
    Drop rules remove exactly the matching messages in both phases; everything else arrives byte-exact,
    the counters account for every message and byte, EOF propagates, and nothing is left behind."""
    keep_before = [b"hello %d\n" % i for i in range(5)]
    keep_after = [b"after %d %s\n" % (i, b"x" * (i * 300)) for i in range(20)]
    dropped_bytes = 0
    async with echo_upstream(netns) as up:
        with pinned_rules(netns, drop_rules(up.addr[1])) as enforcer:
            async with proxy_process(netns, up, "--policy", "message") as px:  # type: ignore[arg-type]
                assert px.splice_reason is None, px.stderr()
                assert "splice: kernel rules apply" in px.stderr()
                with trio.fail_after(TIMEOUT):
                    [sock] = client_sockets(netns, 1)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    await sock.connect(px.addr)
                    drops = 0

                    async def keep(line: bytes) -> None:
                        await sock.send(line)
                        assert await recv_exact(sock, len(line)) == line

                    async def drop(line: bytes) -> None:
                        nonlocal drops, dropped_bytes
                        await sock.send(line)
                        drops += 1
                        dropped_bytes += len(line)
                        await wait_count(enforcer, "no-drop", drops)

                    for i, line in enumerate(keep_before):  # in userspace: PASS mode
                        await keep(line)
                        await drop(b"DROP before %d\n" % i)
                    await keep(b"SPLICE\n")
                    for i, line in enumerate(keep_after):  # spliced
                        await drop(b"DROP after %d %s\n" % (i, b"y" * (i * 200)))
                        await keep(line)
                    # Goes up (no rule matches the request), comes back as a reply and is dropped there.
                    await sock.send(b"SECRET reply\n")
                    await wait_count(enforcer, "no-secret-reply", 1)
                    await keep(b"last\n")
                    sock.shutdown(socket.SHUT_WR)
                    assert await sock.recv(1) == b"", "bytes after the last echo"
                    sock.close()
                    stats = await px.wait_idle()
            final = enforcer.stats()
            # The splice enrols its own sockets: nothing entered the rules' socket maps.
            assert enforcer.enrolled() == [] and enforcer.enrolled("framed") == []
            assert enforcer.labelled() == []
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 1
    sent_up = b"".join(
        [*(line for line in keep_before), b"SPLICE\n", *keep_after, b"SECRET reply\n", b"last\n"]
    )
    assert up.received == [sent_up]  # the upstream saw no dropped message, and everything else in order
    # Spliced: at most everything after SPLICE (plus the 7-byte reply to SPLICE itself, which may go
    # either way) except the dropped reply.  Each direction switches once the relay has caught up, which
    # takes it a message or two (observed: both directions spliced by the third message); from the
    # 11th message on, each one went through the kernel both ways.
    after = sum(len(line) for line in keep_after) + len(b"SECRET reply\n") + len(b"last\n")
    spliced = stats["serve"]["bytes_spliced"]
    late = sum(len(line) for line in keep_after[10:]) + len(b"last\n")
    assert 2 * late <= spliced <= 2 * after - len(b"SECRET reply\n") + 7, stats
    kernel = stats["kernel"]
    assert kernel["rule_dropped"] == drops + 1 and kernel["rule_diverted"] == 0, kernel
    assert (final["no-drop"].msgs, final["no-drop"].bytes) == (drops, dropped_bytes)
    assert (final["no-secret-reply"].msgs, final["no-secret-reply"].bytes) == (1, len(b"SECRET reply\n"))
    # Every other message was judged twice (the request on the client side, its echo on the upstream
    # side), every byte exactly once per side.
    assert final.unmatched.bytes == 2 * len(sent_up) - len(b"SECRET reply\n"), final.to_dict()


async def test_pass_rule_set_changes_nothing(netns: NetNS) -> None:
    """A rule set that passes everything: 3 MB each way through the seeded-pattern exchange of
    test_splice, byte-exact with EOF, and every received byte judged exactly once."""
    rules = RuleSet(
        (
            Rule("Pass", name="tagged", prefix=b"\xfe\xfdNEVER"),
            Rule("Drop", name="never", prefix=b"\xfe\xfcNO"),
        )
    )
    with pinned_rules(netns, rules) as enforcer:
        async with upstream_server(netns) as up, proxy_process(netns, up, "--policy", "connect") as px:
            with trio.fail_after(TIMEOUT):
                [sock] = client_sockets(netns, 1)
                await exchange(sock, px.addr, 1, 3_000_000, 3_000_000, rng=random.Random(7))
                stats = await px.wait_idle()
        final = enforcer.stats()
    assert up.errors == [] and up.results == {1: 3_000_000}
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 1 and stats["serve"]["bytes_spliced"] >= 3_000_000, stats
    assert stats["kernel"]["rule_dropped"] == 0
    assert final["tagged"].msgs == 0 and final["never"].msgs == 0
    # The proxy received: client preamble + header + 3 MB, and the upstream's preamble + 3 MB.
    received = len(b"PRE\n") + 24 + 3_000_000 + len(b"PRE\n") + 3_000_000
    msgs, judged = total(final)
    assert judged == received, final.to_dict()
    assert msgs >= 2


async def test_replacement_while_spliced_traffic_flows(netns: NetNS) -> None:
    """Rule sets replaced back to back while 3000 messages (seeded sizes up to 8 KiB) go back and forth
    through a spliced connection: every echo byte-exact, and the bytes counted by all generations
    together are exactly the bytes the proxy received (each message once on the way up, once back)."""
    sets = [
        RuleSet(
            (
                Rule("Drop", name="never", prefix=b"\xfe\xfcNO"),
                Rule("Pass", name=f"gen-{i}", min_len=1 + i % 3),
            )
        )
        for i in range(8)
    ]
    rng = random.Random(11)
    messages = [rng.randbytes(rng.randint(1, 8192)).replace(b"\xfe", b"\x00") for _ in range(3000)]
    async with echo_upstream(netns) as up:
        with pinned_rules(netns, RuleSet((Rule("Pass", name="first"),))) as enforcer:
            first_gen = enforcer.generation
            replaced = 0
            async with proxy_process(netns, up, "--policy", "connect") as px:  # type: ignore[arg-type]
                with trio.fail_after(TIMEOUT):
                    [sock] = client_sockets(netns, 1)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    await sock.connect(px.addr)
                    done = trio.Event()

                    async def ping_pong() -> None:
                        for message in messages:
                            await sock.send(message)
                            assert await recv_exact(sock, len(message)) == message
                        sock.shutdown(socket.SHUT_WR)
                        assert await sock.recv(1) == b""
                        sock.close()
                        done.set()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(ping_pong)
                        while not done.is_set():  # replace for as long as the traffic flows
                            await trio.to_thread.run_sync(enforcer.replace, sets[replaced % len(sets)])
                            replaced += 1
                            await trio.sleep(0.005)  # each generation active for a while (not a timing check)
                    stats = await px.wait_idle()
            retired = await trio.to_thread.run_sync(enforcer.flush)
            retired = {**enforcer.retired, **retired}
            active = enforcer.stats()
    assert up.received == [b"".join(messages)]
    assert_clean(stats)
    assert stats["splicer"]["spliced"] == 1 and stats["kernel"]["rule_dropped"] == 0
    gens = {**retired, active.gen: active}
    assert sorted(gens) == list(range(first_gen, first_gen + replaced + 1))
    assert sum(total(g)[1] for g in gens.values()) == 2 * sum(len(m) for m in messages)
    assert all(g["never"].msgs == 0 for gen, g in gens.items() if gen != first_gen)
    judged_by = [gen for gen, g in sorted(gens.items()) if total(g)[1]]
    print(f"{replaced} replacements, {len(judged_by)} generations judged traffic")
    assert len(judged_by) >= 10, (replaced, judged_by)


async def test_redirect_rule_diverts_to_a_labelled_socket(netns: NetNS) -> None:
    """A Redirect rule sends the matching message out of the labelled socket instead of the peer."""
    rules = RuleSet((Rule("Redirect", to="tap", name="to-tap", prefix=b"TAP"),))
    tap_listener = netns.socket()
    tap_listener.bind(("127.0.0.1", 0))
    tap_listener.listen(1)
    tap_out = netns.socket()
    tap_out.connect(tap_listener.getsockname())
    tap_in, _ = tap_listener.accept()
    tap_listener.close()
    with pinned_rules(netns, rules) as enforcer, tap_out, tap_in:
        enforcer.label(tap_out, "tap")
        async with echo_upstream(netns) as up, proxy_process(netns, up, "--policy", "connect") as px:  # type: ignore[arg-type]
            with trio.fail_after(TIMEOUT):
                [sock] = client_sockets(netns, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await sock.connect(px.addr)
                for i in range(10):
                    await sock.send(b"keep %d\n" % i)
                    assert await recv_exact(sock, len(b"keep %d\n" % i)) == b"keep %d\n" % i
                    await sock.send(b"TAP %d\n" % i)
                    await wait_count(enforcer, "to-tap", i + 1)
                sock.shutdown(socket.SHUT_WR)
                assert await sock.recv(1) == b""
                sock.close()
                stats = await px.wait_idle()
        expected = b"".join(b"TAP %d\n" % i for i in range(10))
        tap_in.settimeout(10)
        got = b""
        while len(got) < len(expected):
            got += tap_in.recv(65536)
    assert got == expected
    assert up.received == [b"".join(b"keep %d\n" % i for i in range(10))]
    assert_clean(stats)
    assert stats["kernel"]["rule_diverted"] == 10 and stats["kernel"]["rule_dropped"] == 0


async def test_framed_rule_set_is_not_applied_per_skb(netns: NetNS) -> None:
    """A framed rule set judges frames, which a spliced stream does not delimit: it is not applied (no
    drop although its rule matches everything), the skbs are counted as not judged, and the proxy warns."""
    rules = RuleSet((Rule("Drop", name="all"),), framing=Framing())
    with pinned_rules(netns, rules):
        async with upstream_server(netns) as up, proxy_process(netns, up, "--policy", "connect") as px:
            with trio.fail_after(TIMEOUT):
                [sock] = client_sockets(netns, 1)
                await exchange(sock, px.addr, 3, 200_000, 200_000)
                stats = await px.wait_idle()
            log = px.stderr()
    assert up.errors == [] and up.results == {3: 200_000}
    assert_clean(stats)
    assert stats["kernel"]["rule_dropped"] == 0 and stats["kernel"]["rules_framed"] >= 2, stats["kernel"]
    assert "is framed: spliced connections are not judged" in log, log


async def test_rules_that_cannot_be_shared_disable_splicing(netns: NetNS) -> None:
    """Pinned rules whose maps do not fit the splice program (here a ``targets`` map of another size, as
    an incompatible version would leave): the splicer refuses with feature ``rules`` rather than splice
    past the rules, and the proxy relays in userspace, byte-exact."""
    with pinned_rules(netns, RuleSet((Rule("Pass", name="all"),))) as enforcer:
        assert enforcer.directory is not None
        (enforcer.directory / "targets").unlink()
        with Map.create(MapType.SOCKHASH, 4, 8, 16) as other:
            other.pin(enforcer.directory / "targets")
        async with upstream_server(netns) as up, proxy_process(netns, up, "--policy", "connect") as px:
            assert px.splice_reason is not None
            assert "the kernel rules' map 'targets'" in px.splice_reason, px.splice_reason
            with trio.fail_after(TIMEOUT):
                [sock] = client_sockets(netns, 1)
                await exchange(sock, px.addr, 4, 100_000, 100_000)
    assert up.errors == [] and up.results == {4: 100_000}


# ---------------------------------------------------------------------------------------------------------
# from the command line: sockpolicy enforce, then sockpolicy serve --splice in the same namespace


def _cli_rules(ns: Any) -> dict[str, Any]:
    result = cli(ns, "rules", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _cli_count(ns: Any, rule: str) -> int:
    return next(r["msgs"] for r in _cli_rules(ns)["counters"]["rules"] if r["name"] == rule)


def test_cli_enforce_then_serve_splice(netns: Any, tmp_path: Path) -> None:
    """``sockpolicy enforce --rules`` then ``serve --splice``: a drop rule removes exactly the matching
    messages of a spliced connection, ``sockpolicy rules`` counts them, a replacement with
    ``enforce --rules`` takes effect on the open connection, and ``enforce --unload`` stops the rules."""
    drop_toml = tmp_path / "drop.toml"
    drop_toml.write_text('[[rule]]\nname = "no-drop"\nverdict = "Drop"\nprefix = "DROP"\n')
    pass_toml = tmp_path / "pass.toml"
    pass_toml.write_text('[[rule]]\nname = "tagged"\nverdict = "Pass"\nprefix = "DROP"\n')
    up = ThreadedEchoUpstream(netns)
    log = tmp_path / "serve.log"
    result = cli(netns, "enforce", "--rules", str(drop_toml))
    assert result.returncode == 0, result.stderr
    proc = start(netns, log, *serve_args(up))  # type: ignore[arg-type]
    try:
        with connect(netns) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(20)

            def keep(line: bytes) -> None:
                sock.sendall(line)
                got = b""
                while len(got) < len(line):
                    chunk = sock.recv(len(line) - len(got))
                    assert chunk, "EOF"
                    got += chunk
                assert got == line

            for i in range(5):
                keep(b"keep %d\n" % i)
                sock.sendall(b"DROP %d\n" % i)
                wait_for(f"drop {i}", lambda i=i: _cli_count(netns, "no-drop") == i + 1)
            keep(b"keep 5\n")
            status = _cli_rules(netns)
            assert status["counters"]["unmatched"]["msgs"] == 2 * 6, status  # 6 requests, 6 echoes
            # Replaced while the connection is open (and spliced): the same message now passes.
            result = cli(netns, "enforce", "--rules", str(pass_toml))
            assert result.returncode == 0, result.stderr
            keep(b"DROP 6\n")
            assert _cli_count(netns, "tagged") == 2  # the request and its echo
            # Unloaded: the splicer keeps the (now empty) tables, and judges nothing more.
            result = cli(netns, "enforce", "--unload")
            assert result.returncode == 0, result.stderr
            keep(b"DROP 7\n")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
    finally:
        code, _ = stop(proc)
        cli(netns, "unload")
        cli(netns, "enforce", "--unload")
        up.close()
    text = log.read_text()
    assert code == 0, text
    assert "splice: kernel rules apply to received messages (generation 1)" in text, text
    assert re.search(r"splice: 1 connections spliced \([1-9]\d* bytes\), 0 relayed in userspace", text), text
    assert "Traceback" not in text
