"""Tests for :mod:`sockpolicy._ranges`: port ranges, prefixes, endpoints and the locality check."""

from __future__ import annotations

import ipaddress
import itertools
import shutil
import subprocess

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sockpolicy._ranges import (
    MAX_PORT,
    InvalidEndpoint,
    InvalidPrefix,
    InvalidRange,
    PortRange,
    PortRanges,
    PrefixNotLocal,
    RouteCheckError,
    check_local,
    local_route_command,
    parse_endpoint,
    parse_ports,
    parse_prefix,
)

HINT = "(ports are 1-65535, ranges lo-hi, comma separated)"


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert len(text.splitlines()) == 1, text
    return text


# --- PortRange ---------------------------------------------------------------------------------------


def test_port_range_basics() -> None:
    r = PortRange(8000, 8999)
    assert str(r) == "8000-8999"
    assert str(PortRange(80, 80)) == "80"
    assert r.width == 1000
    assert 8000 in r and 8999 in r
    assert 7999 not in r and 9000 not in r
    assert "8000" not in r
    assert PortRange(1, 5) < PortRange(1, 6) < PortRange(2, 2)
    with pytest.raises(AttributeError):
        r.lo = 1  # type: ignore[misc]


@pytest.mark.parametrize("lo,hi", [(0, 1), (1, 70000), (5, 3), (True, 2)])
def test_port_range_constructor_validates(lo: int, hi: int) -> None:
    with pytest.raises(InvalidRange):
        PortRange(lo, hi)


# --- parse_ports -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("80", "80"),
        ("1-65535", "1-65535"),
        ("80,443,8000-8999", "80,443,8000-8999"),
        (" 80 ,  443\t,8000-8999 ", "80,443,8000-8999"),
        ("443,80", "80,443"),
        ("80,80,80", "80"),
        ("7-7", "7"),
        ("0080", "80"),
    ],
)
def test_parse_ports_valid(text: str, expected: str) -> None:
    ranges = parse_ports(text)
    assert isinstance(ranges, tuple)
    assert all(isinstance(r, PortRange) for r in ranges)
    assert str(ranges) == expected


def test_parse_ports_keeps_ranges_unmerged() -> None:
    ranges = parse_ports("80-90,85-95,96,443")
    assert ranges == (PortRange(80, 90), PortRange(85, 95), PortRange(96, 96), PortRange(443, 443))
    assert ranges.merged() == (PortRange(80, 96), PortRange(443, 443))
    assert ranges.width == 18
    assert 95 in ranges and 100 not in ranges
    assert PortRange(443, 443) in ranges


@pytest.mark.parametrize(
    "text,message",
    [
        ("0", "invalid port range '0': port 0 is out of range"),
        ("70000", "invalid port range '70000': port 70000 is out of range"),
        ("5-3", "invalid port range '5-3': start 5 is greater than end 3"),
        ("a-b", "invalid port range 'a-b': expected PORT or LO-HI"),
        ("", "invalid port range '': no ports given"),
        ("   ", "invalid port range '   ': no ports given"),
        ("1-", "invalid port range '1-': expected PORT or LO-HI"),
        ("-5", "invalid port range '-5': expected PORT or LO-HI"),
        ("1--2", "invalid port range '1--2': expected PORT or LO-HI"),
        ("80,", "invalid port range '': empty range"),
        ("80,,443", "invalid port range '': empty range"),
        ("80,5-3", "invalid port range '5-3'"),
        ("1 - 5", "invalid port range '1 - 5'"),
        ("+80", "invalid port range '+80'"),
        ("\u0668\u0660", "expected PORT or LO-HI"),  # Arabic-Indic "80": int() would accept it
        ("9" * 5000, "is out of range"),  # longer than int()'s default digit limit
        ("80\n443", "invalid port range '80\\n443'"),
    ],
)
def test_parse_ports_invalid(text: str, message: str) -> None:
    with pytest.raises(InvalidRange) as info:
        parse_ports(text)
    msg = one_line(info.value)
    assert message in msg
    assert msg.endswith(HINT)
    assert isinstance(info.value, ValueError)


def test_exact_message_for_reversed_range() -> None:
    with pytest.raises(InvalidRange) as info:
        parse_ports("5-3")
    assert str(info.value) == f"invalid port range '5-3': start 5 is greater than end 3 {HINT}"


ports = st.integers(1, MAX_PORT)
port_ranges = st.tuples(ports, ports).map(lambda t: PortRange(min(t), max(t)))


@given(st.lists(port_ranges, min_size=1, max_size=20))
def test_round_trip(ranges: list[PortRange]) -> None:
    parsed = parse_ports(str(PortRanges(ranges)))
    assert parsed == PortRanges(ranges)
    assert set(parsed) == set(ranges)
    assert list(parsed) == sorted(parsed)
    # Formatting each range with arbitrary spacing and order gives the same result.
    assert parse_ports(" , ".join(str(r) for r in reversed(ranges))) == parsed


@given(st.lists(port_ranges, min_size=1, max_size=20), st.integers(1, MAX_PORT))
def test_merged_covers_the_same_ports(ranges: list[PortRange], port: int) -> None:
    rs = PortRanges(ranges)
    merged = rs.merged()
    assert (port in rs) == (port in merged)
    # Minimal: neither overlapping nor adjacent.
    for a, b in itertools.pairwise(merged):
        assert a.hi + 1 < b.lo


@given(st.lists(st.tuples(st.integers(1, MAX_PORT), st.integers(1, MAX_PORT)), min_size=1, max_size=10))
def test_every_valid_input_accepted(pairs: list[tuple[int, int]]) -> None:
    text = ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in ((min(p), max(p)) for p in pairs))
    assert len(parse_ports(text)) >= 1


@given(st.integers(), st.integers())
def test_out_of_range_or_reversed_rejected(lo: int, hi: int) -> None:
    text = f"{lo}-{hi}"
    valid = 1 <= lo <= hi <= MAX_PORT
    if valid:
        assert parse_ports(text) == (PortRange(lo, hi),)
    else:
        with pytest.raises(InvalidRange) as info:
            parse_ports(text)
        one_line(info.value)


@given(st.text())
@example("1-\u2028")
@example("\x85")
@example("٣")
def test_arbitrary_text_only_raises_invalid_range(text: str) -> None:
    try:
        ranges = parse_ports(text)
    except InvalidRange as exc:
        one_line(exc)
    else:
        # Whatever was accepted round-trips.
        assert parse_ports(str(ranges)) == ranges


# --- parse_prefix ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1", "127.0.0.1/32"),
        ("127.0.0.0/8", "127.0.0.0/8"),
        ("::1", "::1/128"),
        ("2001:db8::/64", "2001:db8::/64"),
        (" 10.0.0.0/8 ", "10.0.0.0/8"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ],
)
def test_parse_prefix_valid(text: str, expected: str) -> None:
    assert parse_prefix(text) == ipaddress.ip_network(expected)


@pytest.mark.parametrize(
    "text,message",
    [
        ("127.0.0.1/8", "invalid prefix '127.0.0.1/8': host bits are set; did you mean 127.0.0.0/8?"),
        ("2001:db8::1/64", "did you mean 2001:db8::/64?"),
        ("", "invalid prefix '': empty"),
        ("x", "'x' is not an IPv4 or IPv6 address"),
        ("1.2.3.4/33", "prefix length must be 0-32"),
        ("::/129", "prefix length must be 0-128"),
        ("10.0.0.0/255.0.0.0", "expected ADDRESS or ADDRESS/LENGTH"),
        ("fe80::1%lo", "expected ADDRESS or ADDRESS/LENGTH"),
        ("1.2.3.4/", "expected ADDRESS or ADDRESS/LENGTH"),
        ("1.2.3.4/8/8", "expected ADDRESS or ADDRESS/LENGTH"),
    ],
)
def test_parse_prefix_invalid(text: str, message: str) -> None:
    with pytest.raises(InvalidPrefix) as info:
        parse_prefix(text)
    assert message in one_line(info.value)


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.data())
def test_prefix_round_trip(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, data: st.DataObject
) -> None:
    length = data.draw(st.integers(0, address.max_prefixlen))
    network = ipaddress.ip_network(f"{address}/{length}", strict=False)
    assert parse_prefix(str(network)) == network
    if network.network_address != address:
        with pytest.raises(InvalidPrefix) as info:
            parse_prefix(f"{address}/{length}")
        assert f"did you mean {network}?" in one_line(info.value)


@given(st.text())
@example("1.2.3.4/\u0663")
@example("::ffff:1.2.3.4/\n")
def test_arbitrary_text_only_raises_invalid_prefix(text: str) -> None:
    try:
        parse_prefix(text)
    except InvalidPrefix as exc:
        one_line(exc)


# --- parse_endpoint ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,require_port,expected",
    [
        ("127.0.0.1:9000", True, ("127.0.0.1", 9000)),
        ("[::1]:9000", True, ("::1", 9000)),
        ("localhost:80", True, ("localhost", 80)),
        ("127.0.0.1", False, ("127.0.0.1", None)),
        ("[::1]", False, ("::1", None)),
        ("up-stream.example:65535", False, ("up-stream.example", 65535)),
    ],
)
def test_parse_endpoint_valid(text: str, require_port: bool, expected: tuple[str, int | None]) -> None:
    assert parse_endpoint(text, require_port=require_port) == expected


@pytest.mark.parametrize(
    "text,require_port",
    [
        ("127.0.0.1", True),
        ("127.0.0.1:0", False),
        ("127.0.0.1:70000", False),
        ("127.0.0.1:http", False),
        ("::1", False),
        ("::1:80", False),
        ("[::1", False),
        ("[::1]80", False),
        ("[127.0.0.1]:80", False),
        ("1.2.3:80", False),
        ("bad_host:80", False),
        ("", False),
        ("[fe80::1%lo]:80", False),
    ],
)
def test_parse_endpoint_invalid(text: str, require_port: bool) -> None:
    with pytest.raises(InvalidEndpoint) as info:
        parse_endpoint(text, require_port=require_port)
    assert one_line(info.value).startswith("invalid endpoint ")


@given(st.text(), st.booleans())
def test_arbitrary_text_only_raises_invalid_endpoint(text: str, require_port: bool) -> None:
    try:
        host, port = parse_endpoint(text, require_port=require_port)
    except InvalidEndpoint as exc:
        one_line(exc)
    else:
        assert host and (port is not None or not require_port)


# --- check_local -------------------------------------------------------------------------------------

needs_ip = pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 'ip' not installed")


def test_local_route_command() -> None:
    assert local_route_command(parse_prefix("192.0.2.0/24")) == "ip route add local 192.0.2.0/24 dev lo"
    assert local_route_command(parse_prefix("2001:db8::/64")) == "ip -6 route add local 2001:db8::/64 dev lo"


@needs_ip
@pytest.mark.parametrize("text", ["127.0.0.0/8", "127.0.0.1", "127.0.0.0/16", "::1"])
def test_loopback_is_local(text: str) -> None:
    # 127.255.255.255 has a "broadcast" route; the neighbouring address decides for /8.
    check_local(parse_prefix(text))


@needs_ip
@pytest.mark.parametrize(
    "text,fix",
    [
        ("198.51.100.0/24", "ip route add local 198.51.100.0/24 dev lo"),
        ("2001:db8::/64", "ip -6 route add local 2001:db8::/64 dev lo"),
    ],
)
def test_non_local_prefix_rejected_with_fix(text: str, fix: str) -> None:
    with pytest.raises(PrefixNotLocal) as info:
        check_local(parse_prefix(text))
    msg = one_line(info.value)
    assert msg.startswith(f"prefix {text} is not local")
    assert msg.endswith(fix)
    assert info.value.prefix == parse_prefix(text)


@needs_ip
def test_prefix_straddling_local_and_remote_rejected() -> None:
    # 127.0.0.0/8 is local, 128.0.0.0/8 is not: the last address gives it away.
    with pytest.raises(PrefixNotLocal) as info:
        check_local(parse_prefix("126.0.0.0/7"))
    assert "126.0.0.0" in str(info.value) or "127.255.255.255" in str(info.value)


@needs_ip
def test_unknown_netns() -> None:
    with pytest.raises(RouteCheckError) as info:
        check_local(parse_prefix("127.0.0.1"), netns="sockpolicy-test-no-such-netns")
    assert "sockpolicy-test-no-such-netns" in one_line(info.value)


def _can_create_netns() -> bool:
    if shutil.which("ip") is None:
        return False
    name = "sockpolicy-test-probe"
    ok = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


@pytest.mark.privileged
@pytest.mark.skipif(not _can_create_netns(), reason="cannot create network namespaces")
def test_check_local_in_netns() -> None:
    name = "sockpolicy-test-ranges"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        check_local(parse_prefix("127.0.0.0/8"), netns=name)
        with pytest.raises(PrefixNotLocal, match=r"in network namespace 'sockpolicy-test-ranges'"):
            check_local(parse_prefix("198.51.100.0/24"), netns=name)
        subprocess.run(
            ["ip", "-n", name, "route", "add", "local", "198.51.100.0/24", "dev", "lo"], check=True
        )
        check_local(parse_prefix("198.51.100.0/24"), netns=name)
        # The host namespace is unaffected.
        with pytest.raises(PrefixNotLocal):
            check_local(parse_prefix("198.51.100.0/24"))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
