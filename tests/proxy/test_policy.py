"""Policy registration, filter parsing and matching, verdict objects."""

from __future__ import annotations

import ipaddress

import pytest

from sockpolicy.proxy import (
    Close,
    Connection,
    Direction,
    Drop,
    HttpHeadFramer,
    LengthPrefixFramer,
    Pass,
    Policy,
    Redirect,
    Rewrite,
)
from sockpolicy.proxy._match import Matcher, parse_addrs, parse_ports


def conn(dst: tuple[str, int], proto: str = "tcp") -> Connection:
    return Connection(proto, ("127.0.0.1", 40000), dst)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (80, ((80, 80),)),
        ("80,443,8000-8999", ((80, 80), (443, 443), (8000, 8999))),
        (" 443 , 80 ", ((80, 80), (443, 443))),
        ([22, (1000, 2000), (1500, 3000), 3001], ((22, 22), (1000, 3001))),
        ("1-65535", ((1, 65535),)),
    ],
)
def test_parse_ports(spec: object, expected: tuple[tuple[int, int], ...]) -> None:
    assert parse_ports(spec) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", [0, 65536, "", "80,", "a", "90-80", "1-70000", [(1, 2, 3)], [True], [], -1, 1.5]
)
def test_parse_ports_rejects(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_ports(bad)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_parse_addrs() -> None:
    assert parse_addrs("127.0.0.0/8") == (ipaddress.ip_network("127.0.0.0/8"),)
    assert parse_addrs("10.1.2.3/8, ::1") == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert parse_addrs([ipaddress.ip_network("fd00::/8")]) == (ipaddress.ip_network("fd00::/8"),)
    for bad in ("", "300.1.1.1/8", "127.0.0.0/33", [42], []):
        with pytest.raises(ValueError):
            parse_addrs(bad)  # type: ignore[arg-type]


def test_matcher() -> None:
    m = Matcher.build(ports="53,8000-8999", addrs="127.0.0.0/8", proto="UDP")
    assert m.matches("udp", ("127.0.0.5", 8500))
    assert not m.matches("tcp", ("127.0.0.5", 8500))
    assert not m.matches("udp", ("127.0.0.5", 80))
    assert not m.matches("udp", ("::1", 53))  # v6 address vs v4 prefix: simply no match
    assert Matcher.build().matches("tcp", ("::1", 1))
    with pytest.raises(ValueError):
        Matcher.build(proto="sctp")


def test_first_matching_rule_wins() -> None:
    policy = Policy()
    policy.on_connect(ports=443)(lambda c: Drop())
    policy.on_connect(addrs="127.0.0.0/8")(lambda c: Close())
    policy.on_connect()(lambda c: Pass())
    rule = policy._connect_rule(conn(("127.0.0.1", 443)))
    assert rule is not None and rule.fn(conn(("127.0.0.1", 443))) == Drop()
    rule = policy._connect_rule(conn(("127.0.0.1", 80)))
    assert rule is not None and rule.fn(conn(("127.0.0.1", 80))) == Close()
    rule = policy._connect_rule(conn(("::1", 80)))
    assert rule is not None and rule.fn(conn(("::1", 80))) == Pass()
    assert Policy()._connect_rule(conn(("::1", 80))) is None


def test_message_rule_direction() -> None:
    policy = Policy()
    up = policy.on_message(direction=Direction.TO_UPSTREAM)(lambda c, m: Pass())
    both = policy.on_message()(lambda c, m: Drop())
    c = conn(("127.0.0.1", 1))
    assert policy._message_rule(c, Direction.TO_UPSTREAM).fn is up  # type: ignore[union-attr]
    assert policy._message_rule(c, Direction.TO_CLIENT).fn is both  # type: ignore[union-attr]


def test_registration_errors() -> None:
    policy = Policy()
    with pytest.raises(ValueError):
        policy.on_message(framer=LengthPrefixFramer(include_header=False))
    with pytest.raises(TypeError):
        policy.on_message(framer=HttpHeadFramer)  # type: ignore[arg-type]  # the class, not an instance
    with pytest.raises(ValueError):
        policy.on_message(direction="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        policy.on_connect(ports="99999")


def test_verdicts() -> None:
    assert Pass() == Pass(splice=False)
    assert Redirect(("127.0.0.1", 80)).addr == ("127.0.0.1", 80)
    assert Rewrite(bytearray(b"x")).data == b"x"
    for bad in (("127.0.0.1", 0), ("127.0.0.1",), (1, 2)):
        with pytest.raises((ValueError, TypeError)):
            Redirect(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Rewrite("text")  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        Pass().splice = True  # type: ignore[misc]


def test_connection_ids_unique_and_v4_mapped_normalized() -> None:
    from sockpolicy.proxy._connection import normalize_addr

    a, b = conn(("127.0.0.1", 1)), conn(("127.0.0.1", 1))
    assert a.id != b.id
    assert normalize_addr(("::ffff:127.0.0.1", 80, 0, 0)) == ("127.0.0.1", 80)
    assert normalize_addr(("::1", 80, 0, 0)) == ("::1", 80)
