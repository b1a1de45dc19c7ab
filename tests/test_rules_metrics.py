"""Kernel-rule metrics (``sockpolicy_kernel_rule_*`` of ``serve --metrics``): exact per-rule counts of
real traffic judged by the kernel, read from the rules maps, that stay totals across rule-set
replacements (the kernel counts per generation)."""

from __future__ import annotations

import errno
import os
import socket
import textwrap
from pathlib import Path

import pytest
from _e2e import sockpolicy
from _harness import NetNS
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry
from test_ops import log_of, parse_metrics, scrape, start, stop
from test_ops_load import wait_for_metrics
from test_rules_kernel import read_exact

from sockpolicy._metrics import Collector
from sockpolicy._rules import N_SLOTS, Enforcer, Rule, RuleSet

pytestmark = pytest.mark.privileged

MSGS = "sockpolicy_kernel_rule_messages_total"
BYTES = "sockpolicy_kernel_rule_bytes_total"


def key(metric: str, rule: str, verdict: str) -> str:
    return f'{metric}{{rule="{rule}",verdict="{verdict}"}}'


def connect(netns: NetNS) -> tuple[socket.socket, socket.socket]:
    def make() -> tuple[socket.socket, socket.socket]:
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            client = socket.create_connection(srv.getsockname())
            server, _ = srv.accept()
        return client, server

    client, server = netns.call(make)
    for s in (client, server):
        s.settimeout(5)
    return client, server


def send_each(client: socket.socket, server: socket.socket, messages: list[bytes]) -> None:
    """One sendmsg per message (one verdict each), each read back before the next."""
    for m in messages:
        assert client.send(m) == len(m)
        assert read_exact(server, len(m)) == m


RULES = textwrap.dedent(
    """
    [[rule]]
    name = "no-flush"
    verdict = "Drop"
    prefix = "FLUSHALL"
    on = "send"

    [[rule]]
    name = "get"
    verdict = "Pass"
    prefix = "GET "
    on = "send"
    """
)


def test_e2e_serve_metrics_count_kernel_rules_across_replacements(netns: NetNS, tmp_path: Path) -> None:
    """``sockpolicy enforce`` in a namespace, traffic that matches each rule or none, a scrape of
    ``serve --metrics`` over loopback in that namespace: exact counts, which keep growing through
    replacements (including ring wrap-arounds, whose harvest zeroes the kernel's counters) and an unload
    followed by a new ``enforce``."""
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    # serve first: the rules are loaded later, and the collector opens them on demand.
    proc = start(netns, tmp_path, "--addr", "127.0.0.1", "--ports", "8000-8099",
                 "--metrics", "127.0.0.1:9464", "--handoff-timeout", "0")  # fmt: skip
    socks: list[socket.socket] = []
    try:
        wait_for_metrics(netns, proc)
        assert not any(k.startswith("sockpolicy_kernel_rule") for k in scrape(netns, 9464))
        done = sockpolicy(netns, "enforce", "--rules", str(rules))
        assert done.returncode == 0, done.stderr
        with Enforcer.open(netns_inode=os.stat(netns.path).st_ino) as enforcer:
            a, a_srv = connect(netns)
            b, b_srv = connect(netns)
            socks += [a, a_srv, b, b_srv]
            enforcer.enrol(a)
            enforcer.enrol(b)
            send_each(a, a_srv, [b"GET /a", b"GET /bb", b"PING"])
            with pytest.raises(PermissionError) as info:
                a.send(b"FLUSHALL")
            assert info.value.errno == errno.EACCES
            send_each(b, b_srv, [b"x" * 100])
            m = scrape(netns, 9464)
            assert m[key(MSGS, "get", "Pass")] == 2 and m[key(BYTES, "get", "Pass")] == 13
            assert m[key(MSGS, "no-flush", "Drop")] == 1 and m[key(BYTES, "no-flush", "Drop")] == 8
            assert m[key(MSGS, "(default)", "Pass")] == 2 and m[key(BYTES, "(default)", "Pass")] == 104
            assert m["sockpolicy_kernel_rule_generation"] == 1

            # 2 * N_SLOTS replacements with the same rule names, one GET after each, a scrape between
            # them: the ring wraps twice, so the CLI harvests (zeroes) slots the collector had read.
            for i in range(2 * N_SLOTS):
                done = sockpolicy(netns, "enforce", "--rules", str(rules))
                assert done.returncode == 0, done.stderr
                send_each(b, b_srv, [b"GET " + b"z" * i])
                m = scrape(netns, 9464)
                assert m[key(MSGS, "get", "Pass")] == 3 + i, (i, m)
            assert m["sockpolicy_kernel_rule_generation"] == 1 + 2 * N_SLOTS
            assert m[key(BYTES, "get", "Pass")] == 13 + sum(4 + i for i in range(2 * N_SLOTS))
            assert m[key(MSGS, "no-flush", "Drop")] == 1  # still there, from generation 1
            assert m[key(MSGS, "(default)", "Pass")] == 2
            # The live counters of the active generation alone: only the last GET.
            assert enforcer.stats()["get"].msgs == 1
        get_bytes = m[key(BYTES, "get", "Pass")]

        # Unloaded and loaded anew: the collector follows the new maps, and the totals still only grow.
        for argv in (("enforce", "--unload"), ("enforce", "--rules", str(rules))):
            done = sockpolicy(netns, *argv)
            assert done.returncode == 0, done.stderr
        with Enforcer.open(netns_inode=os.stat(netns.path).st_ino) as enforcer:
            c, c_srv = connect(netns)
            socks += [c, c_srv]
            enforcer.enrol(c)
            send_each(c, c_srv, [b"GET /new"])
        m = scrape(netns, 9464)
        assert m["sockpolicy_kernel_rule_generation"] == 1
        assert m[key(MSGS, "get", "Pass")] == 3 + 2 * N_SLOTS
        assert m[key(BYTES, "get", "Pass")] == get_bytes + 8
        assert m[key(MSGS, "no-flush", "Drop")] == 1 and m[key(MSGS, "(default)", "Pass")] == 2
    finally:
        for s in socks:
            s.close()
        sockpolicy(netns, "enforce", "--unload")
        assert stop(proc) == 0, log_of(proc)


def test_collector_totals_rename_unnamed_and_verdict_change(netns: NetNS, enforcer: Enforcer) -> None:
    """Without serve: a rule whose verdict changes starts a new series, an unnamed rule is ``rule-N``, a rule
    that disappears keeps its total, and a scrape never shows a counter lower than the one before."""
    collector = Collector("t", list, rules=lambda: enforcer)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]

    def metrics() -> dict[str, float]:
        return parse_metrics(generate_latest(registry).decode())

    client, server = connect(netns)
    with client, server:
        enforcer.enrol(client)
        enforcer.replace(RuleSet((Rule("Pass", name="a", prefix=b"A"), Rule("Drop", prefix=b"X"))))
        send_each(client, server, [b"A1", b"B22"])
        m = metrics()
        assert (m[key(MSGS, "a", "Pass")], m[key(BYTES, "a", "Pass")]) == (1, 2)
        assert m[key(MSGS, "rule-2", "Drop")] == 0
        assert m[key(BYTES, "(default)", "Pass")] == 3
        enforcer.replace(RuleSet((Rule("Drop", name="a", prefix=b"Z"), Rule("Pass", name="b", prefix=b"B"))))
        send_each(client, server, [b"B4444"])
        m = metrics()
        assert m[key(MSGS, "a", "Pass")] == 1 and m[key(MSGS, "a", "Drop")] == 0
        assert (m[key(MSGS, "b", "Pass")], m[key(BYTES, "b", "Pass")]) == (1, 5)
        assert m[key(MSGS, "rule-2", "Drop")] == 0 and m[key(BYTES, "(default)", "Pass")] == 3
        before = m
        for _ in range(N_SLOTS + 1):  # wraps: the harvested generations fold into the base
            enforcer.replace(RuleSet((Rule("Pass", name="b", prefix=b"B"),)))
            send_each(client, server, [b"B"])
            m = metrics()
            assert all(m[k] >= v for k, v in before.items() if "_total" in k), (before, m)
            before = m
        assert m[key(MSGS, "b", "Pass")] == 1 + N_SLOTS + 1
        assert m[key(MSGS, "a", "Pass")] == 1 and m[key(BYTES, "(default)", "Pass")] == 3
        assert m["sockpolicy_kernel_rule_generation"] == 2 + N_SLOTS + 1


def test_e2e_kernel_rule_metrics_after_privilege_drop(netns: NetNS, tmp_path: Path) -> None:
    """``serve --user nobody``: the rules maps opened before the drop keep being read (the pins are
    root-only, so the collector cannot check them and keeps what it has)."""
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    done = sockpolicy(netns, "enforce", "--rules", str(rules))
    assert done.returncode == 0, done.stderr
    proc = start(netns, tmp_path, "--addr", "127.0.0.1", "--ports", "8000-8099", "--user", "nobody",
                 "--metrics", "127.0.0.1:9464", "--handoff-timeout", "0")  # fmt: skip
    try:
        wait_for_metrics(netns, proc)
        with Enforcer.open(netns_inode=os.stat(netns.path).st_ino) as enforcer:
            a, a_srv = connect(netns)
            with a, a_srv:
                enforcer.enrol(a)
                send_each(a, a_srv, [b"GET /", b"other"])
                with pytest.raises(PermissionError):
                    a.send(b"FLUSHALL")
        m = scrape(netns, 9464)
        assert (m[key(MSGS, "get", "Pass")], m[key(BYTES, "get", "Pass")]) == (1, 5)
        assert (m[key(MSGS, "no-flush", "Drop")], m[key(BYTES, "no-flush", "Drop")]) == (1, 8)
        assert (m[key(MSGS, "(default)", "Pass")], m[key(BYTES, "(default)", "Pass")]) == (1, 5)
    finally:
        assert stop(proc) == 0, log_of(proc)
        sockpolicy(netns, "unload")  # nobody could not remove its bindings
        sockpolicy(netns, "enforce", "--unload")
