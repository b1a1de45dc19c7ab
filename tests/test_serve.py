"""Tests for :mod:`sockpolicy._serve`: config building, listening sockets, and steering cleanup."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest
from test_cli import FakeDispatcher, fake_dispatcher  # noqa: F401  (fixture)

from sockpolicy import _errors
from sockpolicy._ranges import InvalidEndpoint, PrefixNotLocal
from sockpolicy._serve import ConfigError, ServeConfig, create_sockets, steering


def test_from_cli_defaults() -> None:
    config = ServeConfig.from_cli()
    assert str(config.ports) == "8000-8999"
    assert config.addrs == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    assert config.protos == ("tcp", "udp")
    assert config.needs_ipv6
    (r,) = config.ports
    assert config.bindings() == [
        ("tcp", ipaddress.ip_network("127.0.0.1/32"), r, "default"),
        ("tcp", ipaddress.ip_network("::1/128"), r, "default"),
        ("udp", ipaddress.ip_network("127.0.0.1/32"), r, "default"),
        ("udp", ipaddress.ip_network("::1/128"), r, "default"),
    ]
    assert len(ServeConfig.from_cli(ports="80,443", proto="tcp").bindings()) == 4


def test_from_cli_dedupes_prefixes_and_skips_route_check() -> None:
    config = ServeConfig.from_cli(
        addrs=["198.51.100.0/24", "198.51.100.0/24"], proto="udp", check_routes=False
    )
    assert config.addrs == (ipaddress.ip_network("198.51.100.0/24"),)
    assert not config.needs_ipv6
    with pytest.raises(PrefixNotLocal):
        ServeConfig.from_cli(addrs=["198.51.100.0/24"])


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        ({"workers": 0}, ConfigError),
        ({"workers": 10_000}, ConfigError),
        ({"drain_timeout": -1.0}, ConfigError),
        ({"drain_timeout": float("nan")}, ConfigError),
        ({"label": "x" * 64}, ConfigError),
        ({"proto": "sctp"}, ConfigError),
        ({"log_level": "loud"}, ConfigError),
        ({"upstream": "::1"}, InvalidEndpoint),
        ({"upstream": "127.0.0.1:8080"}, ConfigError),  # inside 127.0.0.1/32 ports 8000-8999: a loop
    ],
)
def test_from_cli_rejects(kwargs: dict[str, Any], exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        ServeConfig.from_cli(**kwargs)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("upstream", ["127.0.0.1:9000", "127.0.0.2", "localhost", "[::1]:7999"])
def test_upstream_outside_steered_range_ok(upstream: str) -> None:
    ServeConfig.from_cli(upstream=upstream)


def test_sockets_ipv4_only() -> None:
    config = ServeConfig.from_cli(addrs=["127.0.0.0/8"])
    sockets = create_sockets(config)
    try:
        assert sorted(sockets.socks) == [("tcp", 4), ("udp", 4)]
        for sock in sockets.all():
            assert sock.family == socket.AF_INET
            assert sock.getsockname()[0] == "127.0.0.1"
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert not sock.getblocking()
        assert sockets.of("tcp")[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        sockets.close()


def test_sockets_both_families_and_reuseport_siblings() -> None:
    config = ServeConfig.from_cli(proto="tcp")
    first = create_sockets(config)
    second = create_sockets(config, like=first)
    try:
        assert sorted(first.socks) == [("tcp", 4), ("tcp", 6)]
        assert first.socks[("tcp", 6)].getsockname()[0] == "::1"
        assert first.socks[("tcp", 4)].getsockname()[0] == "127.0.0.1"
        for key, sock in first.socks.items():
            assert second.socks[key].getsockname()[:2] == sock.getsockname()[:2]
        assert set(first.addresses()) == {"tcp4", "tcp6"}
    finally:
        first.close()
        second.close()


def test_sockets_ipv6_only() -> None:
    sockets = create_sockets(ServeConfig.from_cli(addrs=["::1"], proto="udp"))
    try:
        assert list(sockets.socks) == [("udp", 6)]
    finally:
        sockets.close()


def test_steering_adds_registers_and_removes(fake_dispatcher: type[FakeDispatcher]) -> None:  # noqa: F811
    config = ServeConfig.from_cli(addrs=["127.0.0.0/8"], proto="tcp", label="web")
    sockets = create_sockets(config)
    try:
        with steering(config, sockets) as steer:
            assert [(b.proto, str(b.prefix), b.label) for b in FakeDispatcher.table] == [
                ("tcp", "127.0.0.0/8", "web")
            ]
            assert list(FakeDispatcher.socks) == ["web/SOCK_STREAM/AF_INET"]
            assert steer.created
        # This call loaded the dispatcher and nothing else uses it: unloaded again.
        assert FakeDispatcher.table == []
        assert FakeDispatcher.calls[-1] == "unload"
    finally:
        sockets.close()


def test_steering_keeps_a_dispatcher_it_did_not_create(fake_dispatcher: type[FakeDispatcher]) -> None:  # noqa: F811
    FakeDispatcher.loaded = True
    config = ServeConfig.from_cli(addrs=["127.0.0.0/8"], proto="udp")
    sockets = create_sockets(config)
    try:
        with steering(config, sockets):
            pass
        assert "unload" not in FakeDispatcher.calls
        assert FakeDispatcher.loaded
    finally:
        sockets.close()


def test_failed_steering_leaves_nothing(fake_dispatcher: type[FakeDispatcher]) -> None:  # noqa: F811
    FakeDispatcher.fail_on_add = 2
    config = ServeConfig.from_cli()
    sockets = create_sockets(config)
    try:
        with pytest.raises(_errors.NotSupported), steering(config, sockets):
            raise AssertionError("not reached")
        assert FakeDispatcher.table == []
        assert not FakeDispatcher.loaded
        assert [c for c in FakeDispatcher.calls if c.startswith("remove")] == [
            "remove tcp ::1/128",
            "remove tcp 127.0.0.1/32",
        ]
        assert not any(c.startswith("register") for c in FakeDispatcher.calls)
    finally:
        sockets.close()


def test_steering_refuses_a_label_already_served(fake_dispatcher: type[FakeDispatcher]) -> None:  # noqa: F811
    config = ServeConfig.from_cli(addrs=["127.0.0.0/8"], proto="tcp")
    first, second = create_sockets(config), create_sockets(config)
    try:
        with steering(config, first):
            with (
                pytest.raises(ConfigError, match="already being served by another process"),
                steering(config, second),
            ):
                raise AssertionError("not reached")
            assert len(FakeDispatcher.table) == 1  # the first serve's binding is untouched
        assert FakeDispatcher.table == []
    finally:
        first.close()
        second.close()
