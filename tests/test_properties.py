"""Property tests for bad input that tests/test_ranges.py and tests/proxy/test_framers.py do not cover:
TOML policy files (any content gives rules or one clear one-line error) and prefixes with host bits."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sockpolicy._policyfile import PolicyFileError, load_rules
from sockpolicy._ranges import InvalidPrefix, parse_prefix

_values = st.one_of(
    st.text(max_size=20),
    st.integers(-70000, 70000),
    st.booleans(),
    st.lists(st.text(max_size=15), max_size=3),
    st.sampled_from(
        ["tcp", "udp", "both", "pass", "drop", "redirect", "127.0.0.0/8", "80,443", "127.0.0.1:9000"]
    ),
    st.lists(st.sampled_from(["127.0.0.0/8", "::1", "10.0.0.1/8", "fd00::/8", "x"]), max_size=3),
)
_keys = st.sampled_from(["name", "proto", "ports", "addrs", "clients", "action", "to", "port", "extra"])


def _toml_value(value: object) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def _check(path: Path) -> None:
    try:
        rules = load_rules(path)
    except PolicyFileError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(str(path)), message
    else:
        for rule in rules:
            assert rule.action in ("pass", "drop", "redirect")
            assert (rule.to is not None) == (rule.action == "redirect")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(_keys, _values, max_size=7), max_size=4))
def test_any_rule_table_gives_rules_or_one_line_error(
    tmp_path: Path, tables: list[dict[str, object]]
) -> None:
    path = tmp_path / "p.toml"
    text = "".join(
        "[[rule]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items()) for table in tables
    )
    path.write_text(text)
    path.chmod(0o644)
    _check(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_any_bytes_as_toml_give_rules_or_one_line_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(data)
    path.chmod(0o644)
    _check(path)


@given(st.ip_addresses(), st.data())
def test_host_bits_are_refused_with_the_network_suggested(
    addr: ipaddress._BaseAddress, data: st.DataObject
) -> None:
    bits = addr.max_prefixlen
    plen = data.draw(st.integers(0, bits))
    network = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
    text = f"{addr}/{plen}"
    if network.network_address == addr:
        assert parse_prefix(text) == network
    else:
        with pytest.raises(InvalidPrefix, match=f"did you mean {network}"):
            parse_prefix(text)
