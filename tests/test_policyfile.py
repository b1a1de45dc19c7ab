"""Tests for :mod:`sockpolicy._policyfile`: TOML rules, rule matching and loading ``.py`` policies."""

from __future__ import annotations

import ipaddress
import sys
import textwrap
from pathlib import Path

import pytest

from sockpolicy._policyfile import (
    ConnectionRule,
    PolicyFileError,
    first_match,
    load_policy,
    load_rules,
    match,
)
from sockpolicy._ranges import parse_ports


def _proxy_available() -> bool:
    try:
        from sockpolicy.proxy import Policy  # noqa: F401
    except ImportError:
        return False
    return True


needs_proxy = pytest.mark.skipif(not _proxy_available(), reason="sockpolicy.proxy.Policy not available yet")


def write(tmp_path: Path, name: str, text: str, mode: int = 0o644) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


def error(path: Path, loader=load_rules) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(PolicyFileError) as info:
        loader(path)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    assert msg.startswith(str(path))
    return msg


FULL = """
[[rule]]
name = "block-ssh"
proto = "tcp"
ports = "22,2222"
addrs = ["127.0.0.0/8"]
clients = ["127.0.0.2/32"]
action = "drop"

[[rule]]
ports = "8000-8999"
action = "redirect"
to = "127.0.0.1:9000"

[[rule]]
name = "v6"
proto = "udp"
action = "redirect"
to = "[::1]:53"
"""


def test_load_rules(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, "p.toml", FULL))
    assert rules == [
        ConnectionRule(
            index=1,
            name="block-ssh",
            proto="tcp",
            ports=parse_ports("22,2222"),
            addrs=(ipaddress.ip_network("127.0.0.0/8"),),
            clients=(ipaddress.ip_network("127.0.0.2/32"),),
            action="drop",
        ),
        ConnectionRule(2, None, "both", parse_ports("8000-8999"), (), (), "redirect", ("127.0.0.1", 9000)),
        ConnectionRule(3, "v6", "udp", None, (), (), "redirect", ("::1", 53)),
    ]
    assert str(rules[0]) == (
        "rule #1 (block-ssh): tcp ports 22,2222 addrs 127.0.0.0/8 clients 127.0.0.2/32 -> drop"
    )
    assert str(rules[1]) == "rule #2: both ports 8000-8999 -> redirect to 127.0.0.1:9000"
    assert str(rules[2]) == "rule #3 (v6): udp ports any -> redirect to [::1]:53"


def test_empty_file_has_no_rules(tmp_path: Path) -> None:
    assert load_rules(write(tmp_path, "empty.toml", "")) == []


# --- matching ----------------------------------------------------------------------------------------


def test_match(tmp_path: Path) -> None:
    block, redirect, v6 = load_rules(write(tmp_path, "p.toml", FULL))
    c2, c3 = ("127.0.0.2", 40000), ("127.0.0.3", 40000)
    assert match(block, "tcp", c2, ("127.0.0.1", 22))
    assert match(block, "tcp", c2, ("127.9.9.9", 2222))
    assert not match(block, "udp", c2, ("127.0.0.1", 22))  # proto
    assert not match(block, "tcp", c3, ("127.0.0.1", 22))  # client
    assert not match(block, "tcp", c2, ("127.0.0.1", 23))  # port
    assert not match(block, "tcp", ("::1", 1), ("::1", 22))  # addr family
    # A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6 addresses.
    assert match(block, "tcp", ("::ffff:127.0.0.2", 1, 0, 0), ("::ffff:127.0.0.1", 22, 0, 0))
    assert match(redirect, "udp", c3, ("::1", 8500))
    assert match(v6, "udp", c3, ("127.0.0.1", 1))
    assert not match(v6, "tcp", c3, ("127.0.0.1", 1))
    assert not match(block, "tcp", ("not-an-address", 1), ("127.0.0.1", 22))


def test_first_match_wins(tmp_path: Path) -> None:
    rules = load_rules(
        write(
            tmp_path,
            "p.toml",
            """
            [[rule]]
            ports = "80"
            action = "pass"
            [[rule]]
            action = "drop"
            """,
        )
    )
    assert first_match(rules, "tcp", ("127.0.0.1", 1), ("127.0.0.1", 80)) is rules[0]
    assert first_match(rules, "tcp", ("127.0.0.1", 1), ("127.0.0.1", 81)) is rules[1]
    assert first_match([], "tcp", ("127.0.0.1", 1), ("127.0.0.1", 81)) is None


# --- TOML errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,expected",
    [
        ('action = "drop"\nport = "22"', "rule #1: unknown key 'port' (known keys: name, proto, ports,"),
        ('name = "x"\naction = 5', "rule #1 (x): 'action' must be a string, not integer 5"),
        ('action = "drop"\nports = 22', "rule #1: 'ports' must be a string, not integer 22"),
        ('action = "drop"\nproto = "sctp"', "rule #1: unknown proto 'sctp' (use tcp, udp, both)"),
        ('action = "allow"', "rule #1: unknown action 'allow' (use pass, drop, redirect)"),
        ('proto = "tcp"', "rule #1: missing 'action' (one of pass, drop, redirect)"),
        ('action = "redirect"', "rule #1: action 'redirect' needs 'to'"),
        ('action = "drop"\nto = "127.0.0.1:1"', "rule #1: 'to' is only allowed with action = \"redirect\""),
        ('action = "redirect"\nto = "127.0.0.1"', "rule #1: to: invalid endpoint '127.0.0.1': missing port"),
        ('action = "redirect"\nto = "::1:53"', "IPv6 addresses must be written in brackets"),
        ('action = "drop"\nports = "5-3"', "rule #1: ports: invalid port range '5-3': start 5 is greater"),
        ('action = "drop"\naddrs = "127.0.0.0/8"', "rule #1: 'addrs' must be an array of prefixes"),
        ('action = "drop"\naddrs = []', "rule #1: 'addrs' is empty"),
        ('action = "drop"\naddrs = [1]', "'addrs' must be an array of strings"),
        ('action = "drop"\nclients = ["127.0.0.1/8"]', "clients: invalid prefix '127.0.0.1/8': host bits"),
        ('action = "drop"\nname = 3', "rule #1: 'name' must be a string, not integer"),
        ('action = "drop"\nproto = true', "'proto' must be a string, not boolean True"),
    ],
)
def test_rule_errors(tmp_path: Path, body: str, expected: str) -> None:
    path = write(tmp_path, "p.toml", "[[rule]]\n" + body + "\n")
    msg = error(path)
    assert msg.startswith(f"{path}: rule #1")
    assert expected in msg


def test_error_names_the_rule(tmp_path: Path) -> None:
    path = write(
        tmp_path, "p.toml", '[[rule]]\naction = "drop"\n[[rule]]\nname = "second"\naction = "nope"\n'
    )
    assert error(path) == f"{path}: rule #2 (second): unknown action 'nope' (use pass, drop, redirect)"


@pytest.mark.parametrize(
    "text,expected",
    [
        ('[[rule]]\naction = "drop\n', ":2:"),
        ("[[rule]]\naction = \n", ":2:"),
        ("[[rule]\n", ":1:"),
    ],
)
def test_toml_syntax_error_has_line_and_column(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "p.toml", text)
    msg = error(path)
    assert msg.startswith(f"{path}{expected}")
    assert "invalid TOML" in msg


@pytest.mark.parametrize(
    "text,expected",
    [
        ('[rule]\naction = "drop"\n', "'rule' must be an array of tables, written [[rule]]"),
        ("rules = []\n", "unknown top-level key 'rules'"),
        ("rule = 5\n", "'rule' must be an array of tables"),
    ],
)
def test_toml_structure_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error(write(tmp_path, "p.toml", text))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(b'[[rule]]\nname = "\xff"\n')
    assert "not UTF-8" in error(path)


# --- file checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620])
@pytest.mark.parametrize("name", ["p.toml", "p.py"])
def test_group_or_world_writable_refused(tmp_path: Path, mode: int, name: str) -> None:
    path = write(tmp_path, name, "", mode=mode)
    msg = error(path, load_policy)
    assert msg == f"{path} is writable by group/others (mode {mode:04o}); chmod go-w {path}"


def test_missing_file(tmp_path: Path) -> None:
    assert error(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: no such file"


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "d.toml").mkdir()
    assert error(tmp_path / "d.toml").endswith("not a regular file")


@pytest.mark.parametrize("name", ["policy.yaml", "policy", "policy.PY"])
def test_unsupported_suffix(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, "")
    msg = error(path, load_policy)
    assert "use a Python module (.py) or TOML rules (.toml)" in msg


def test_load_rules_of_a_python_file(tmp_path: Path) -> None:
    assert "only .toml policy files contain rules" in error(write(tmp_path, "p.py", ""))


# --- .py policies ------------------------------------------------------------------------------------


def test_python_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "p.py", "x = 1\ndef broken(:\n")
    msg = error(path, load_policy)
    assert msg.startswith(f"{path}:2: SyntaxError: ")


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "import sockpolicy_no_such_module\n",
            ":1: ModuleNotFoundError: No module named 'sockpolicy_no_such_module'",
        ),
        ("x = 1\n\nraise RuntimeError('boom\\nsecond line')\n", ":3: RuntimeError: boom second line"),
        ("import sys\nsys.exit(3)\n", ":2: SystemExit: 3"),
    ],
)
def test_python_exec_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "p.py", text)
    assert error(path, load_policy) == f"{path}{expected}"


def test_module_not_left_in_sys_modules(tmp_path: Path) -> None:
    before = set(sys.modules)
    path = write(tmp_path, "p.py", "policy = 1\nraise ValueError\n")
    with pytest.raises(PolicyFileError):
        load_policy(path)
    assert {m for m in set(sys.modules) - before if m.startswith("_sockpolicy_policy_")} == set()


@needs_proxy
def test_python_policy_missing_or_wrong(tmp_path: Path) -> None:
    path = write(tmp_path, "p.py", "x = 1\n")
    assert error(path, load_policy).endswith(
        "defines no 'policy'; a policy module must set policy = sockpolicy.proxy.Policy()"
    )
    path = write(tmp_path, "q.py", "policy = 42\n")
    assert error(path, load_policy) == f"{path}: 'policy' is a int, not a sockpolicy.proxy.Policy"


@needs_proxy
def test_python_policy_loads_twice_independently(tmp_path: Path) -> None:
    from sockpolicy.proxy import Policy

    path = write(
        tmp_path,
        "p.py",
        """
        from dataclasses import dataclass
        from sockpolicy.proxy import Policy

        @dataclass
        class Seen:
            n: int = 0

        policy = Policy()
        """,
    )
    a, b = load_policy(path), load_policy(path)
    assert isinstance(a, Policy) and isinstance(b, Policy)
    assert a is not b
