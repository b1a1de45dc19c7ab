"""Prometheus metrics: the collector over real ServeStats, and ``serve --metrics`` end to end."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry
from test_ops import echo, log_of, scrape, start, stop, wait_serving
from test_ops_load import wait_for_metrics

from sockpolicy._metrics import Collector, merge, snapshot
from sockpolicy._serve import ConfigError, ServeConfig
from sockpolicy.proxy import Drop, Pass, ServeStats


def _text(collector: Collector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_collector_sums_workers_and_names_callbacks() -> None:
    a, b = ServeStats(), ServeStats()
    a.connections_by_proto["tcp"] += 2
    b.connections_by_proto["udp"] += 1
    a.count_verdict(Drop())

    def no_ssh() -> None: ...

    a.count_callback(no_ssh, Drop())
    b.count_callback(no_ssh, Pass())
    b.upstream_failed(ConnectionRefusedError())
    b.bytes_from_client = 10
    text = _text(Collector("web", lambda: [snapshot(a), snapshot(b)]))
    assert 'sockpolicy_connections_total{label="web",proto="tcp"} 2.0' in text
    assert 'sockpolicy_connections_total{label="web",proto="udp"} 1.0' in text
    cb = "test_collector_sums_workers_and_names_callbacks.<locals>.no_ssh"
    assert f'sockpolicy_callback_verdicts_total{{callback="{cb}",label="web",verdict="drop"}} 1.0' in text
    assert f'sockpolicy_callback_verdicts_total{{callback="{cb}",label="web",verdict="pass"}} 1.0' in text
    assert 'sockpolicy_upstream_connect_failures_total{label="web",reason="refused"} 1.0' in text
    assert 'sockpolicy_bytes_proxied_total{direction="from_client",label="web"} 10.0' in text
    assert merge([snapshot(a), snapshot(b)])["by_proto"] == {"tcp": 2, "udp": 1}


def test_metrics_port_inside_the_steered_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="inside the steered range"):
        ServeConfig.from_cli(metrics="127.0.0.1:8080", check_routes=False, load=False)
    with pytest.raises(ValueError, match="--metrics"):
        ServeConfig.from_cli(metrics="127.0.0.1", check_routes=False, load=False)
    ok = ServeConfig.from_cli(metrics="127.0.0.1:9464", check_routes=False, load=False)
    assert ok.metrics == ("127.0.0.1", 9464)


@pytest.mark.privileged
def test_e2e_metrics_proxy_dispatcher_and_rule_counters(netns: Any, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[[rule]]\nname = "no-8022"\nports = "8022"\naction = "drop"\n')
    policy.chmod(0o644)
    proc = start(netns, tmp_path, "--addr", "127.0.0.1", "--ports", "8000-8099", "--policy", str(policy),
                 "--metrics", "127.0.0.1:9464", "--handoff-timeout", "0")  # fmt: skip
    try:
        wait_serving(netns, proc)
        wait_for_metrics(netns, proc)
        for port in range(8001, 8004):
            assert echo(netns, "127.0.0.1", port) == b"hello"
        with pytest.raises(ConnectionResetError):
            echo(netns, "127.0.0.1", 8022)

        def udp() -> bytes:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.sendto(b"dgram", ("127.0.0.1", 8005))
                return s.recv(100)

        assert netns.call(udp) == b"dgram"
        m = scrape(netns, 9464)
        assert m['sockpolicy_connections_total{label="default",proto="tcp"}'] >= 5  # 1 from wait_serving
        assert m['sockpolicy_connections_total{label="default",proto="udp"}'] == 1
        assert (
            m['sockpolicy_policy_rule_matches_total{action="drop",label="default",rule="#1 (no-8022)"}'] == 1
        )
        assert (
            m['sockpolicy_callback_verdicts_total{callback="toml_rules",label="default",verdict="drop"}'] == 1
        )
        assert m['sockpolicy_bytes_proxied_total{direction="to_client",label="default"}'] >= 5 * 4 + 5
        # Read from the dispatcher's BPF maps: every steered connection and datagram was a lookup.
        assert m['sockpolicy_dispatcher_lookups_total{label="default"}'] >= 6
        assert m['sockpolicy_dispatcher_misses_total{label="default"}'] == 0
        assert "sockpolicy_dispatcher_unmatched_total" in m
    finally:
        assert stop(proc) == 0, log_of(proc)
