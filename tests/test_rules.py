"""Rule parsing and validation, and the CLI's one-line errors (no kernel needed except where marked)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sockpolicy._rules import Rule, RuleError, RuleSet, state_dir
from sockpolicy.proxy._verdicts import Close, Drop, Pass, Redirect, Rewrite

GOOD = """
default = "Pass"

[[rule]]
name = "no-flushall"
verdict = "Drop"
local_ports = "6379"
prefix = "FLUSHALL"

[[rule]]
name = "to-backend"
verdict = "Redirect"
to = "backend"
ingress = true
prefix_hex = "00000000 01"
mask_hex = "00000000ff"
on = "receive"

[framing]
length = "u32"
offset = 0
"""


def test_parse_good() -> None:
    rs = RuleSet.from_toml(GOOD)
    assert [r.name for r in rs.rules] == ["no-flushall", "to-backend"]
    assert rs.labels() == ["backend"]
    assert rs.evaluate(b"FLUSHALL\r\n", local_port=6379) == (0, "Drop")
    assert rs.evaluate(b"FLUSHALL\r\n", local_port=6380) == (None, "Pass")
    assert rs.evaluate(b"\0\0\0\5\x01abcd", direction="receive") == (1, "Redirect")
    assert RuleSet.from_dict(rs.to_dict()) == rs


def test_proxy_verdicts_are_the_vocabulary() -> None:
    assert Rule(Pass()).verdict == "Pass"
    assert Rule(Drop()).verdict == "Drop"
    r = Rule(Redirect(("127.0.0.1", 6380)))
    assert (r.verdict, r.to) == ("Redirect", "127.0.0.1:6380")
    with pytest.raises(RuleError, match=r"Rewrite cannot be expressed in the kernel: .*never change bytes"):
        Rule(Rewrite(b"x"))
    with pytest.raises(RuleError, match="Close cannot be expressed in the kernel"):
        Rule(Close())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]\nverdict=1", "invalid TOML"),
        ('[[rule]]\nverdict = "Pass"\ncolour = "red"', "unknown field 'colour'"),
        ('oops = 1\n[[rule]]\nverdict = "Pass"', "unknown field 'oops'"),
        (
            f'[[rule]]\nverdict = "Drop"\nprefix = "{"x" * 65}"',
            "prefix is 65 bytes; the kernel matches at most 64",
        ),
        (
            '[[rule]]\nname="a"\nverdict = "Drop"\nprefix = "FLUSH"\n'
            '[[rule]]\nname="b"\nverdict = "Pass"\nprefix = "FLUSHALL"',
            "rule 'b' can never match: earlier rule 'a'",
        ),
        (
            '[[rule]]\nname="a"\nverdict = "Pass"\n[[rule]]\nname="b"\nverdict = "Drop"\nlocal_ports="80"',
            "rule 'b' can never match",
        ),
        ('[[rule]]\nverdict = "Redirect"', "Redirect needs a target label"),
        ('[[rule]]\nverdict = "Rewrite"', "cannot be expressed in the kernel"),
        ('[[rule]]\nverdict = "Pass"\nlocal_ports = "1,3,5,7,9"', "at most 4"),
        ('[[rule]]\nverdict = "Pass"\nlocal_ports = "70000"', "out of range"),
        (
            '[[rule]]\nverdict = "Pass"\nprefix = "abcd"\nmax_len = 3',
            "can never match: its prefix needs 4 bytes",
        ),
        ('[[rule]]\nverdict = "Pass"\napply_bytes = 4\non = "receive"', "mean nothing for received frames"),
        ('[framing]\nlength = "u8"', "use 'u16' or 'u32'"),
    ],
)
def test_bad_rules_one_line(text: str, message: str) -> None:
    with pytest.raises(RuleError) as info:
        RuleSet.from_toml(text, source="r.toml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_partial_overlap_is_allowed() -> None:
    RuleSet((Rule("Drop", name="a", local_ports="80-90"), Rule("Pass", name="b", local_ports="85-95")))
    RuleSet((Rule("Drop", name="a", prefix=b"GET", on="send"), Rule("Pass", name="b", prefix=b"GET")))


def _cli() -> click.Group:
    # The real command group: the rules commands are registered into it like any other.
    from sockpolicy._cli import cli

    return cli


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("[[rule]\n", [], "invalid TOML"),
        ('[[rule]]\nverdict = "Pass"\nbogus = 1', [], "unknown field 'bogus'"),
        (f'[[rule]]\nverdict = "Drop"\nprefix_hex = "{"00" * 65}"', [], "at most 64"),
        ('[[rule]]\nverdict = "Pass"\n[[rule]]\nverdict = "Drop"', [], "can never match"),
        (
            '[[rule]]\nverdict = "Pass"',
            ["--cgroup", "/sys/fs/cgroup/unified/no-such-cgroup"],
            "does not exist",
        ),
    ],
)
def test_cli_bad_input_exit_2_nothing_attached(
    tmp_path: Path, content: str, extra: list[str], message: str
) -> None:
    before = state_dir().exists()
    path = tmp_path / "rules.toml"
    path.write_text(content)
    result = CliRunner().invoke(_cli(), ["enforce", "--rules", str(path), *extra])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sockpolicy: error: ") and message in lines[0], lines
    assert "Traceback" not in result.output
    assert state_dir().exists() == before


@pytest.mark.privileged
def test_cli_enforce_rules_unload(tmp_path: Path) -> None:
    if state_dir().exists():
        pytest.skip("kernel rules already loaded in this namespace")
    path = tmp_path / "rules.toml"
    path.write_text('[[rule]]\nname = "everything"\nverdict = "Pass"\n')
    runner = CliRunner()
    try:
        result = runner.invoke(_cli(), ["enforce", "--rules", str(path)])
        assert result.exit_code == 0, result.output
        assert "generation 1 loaded" in result.output
        assert oct(state_dir().stat().st_mode & 0o777) == "0o700"
        result = runner.invoke(_cli(), ["rules"])
        assert result.exit_code == 0, result.output
        assert "everything" in result.output and "msgs=0" in result.output
        result = runner.invoke(_cli(), ["status"])
        assert result.exit_code == 0, result.output
        assert "kernel rules: generation 1" in result.output and "everything" in result.output
        result = runner.invoke(_cli(), ["status", "--json"])
        assert json.loads(result.output)["kernel_rules"]["generation"] == 1
    finally:
        result = runner.invoke(_cli(), ["enforce", "--unload"])
    assert result.exit_code == 0
    assert not state_dir().exists()
    result = runner.invoke(_cli(), ["rules"])
    assert result.exit_code == 1 and "no kernel rules are loaded" in result.stderr
    assert os.path.exists("/proc/self/ns/net")
