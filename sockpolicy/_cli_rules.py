"""``sockpolicy enforce`` and ``sockpolicy rules``: kernel per-message rules from the command line.

Register them into the main group with :func:`register`.  Every user error (bad rules file, missing
cgroup, nothing loaded) is one line ``sockpolicy: error: ...`` on stderr and exit status 2 (1 for
"nothing loaded"), and rules and cgroups are checked before anything is loaded or attached.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import click

from sockpolicy import _errors
from sockpolicy._rules import Enforcer, GenerationStats, RuleError, RuleSet, check_cgroup

__all__ = ["enforce", "register", "rules", "rules_status"]


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"sockpolicy: error: {' '.join(str(message).split())}", err=True)
    raise click.exceptions.Exit(code)


@click.command()
@click.option("--rules", "rules_path", metavar="FILE", help="TOML rule set to load (see docs/rules.md).")
@click.option(
    "--cgroup",
    "cgroups",
    metavar="PATH",
    multiple=True,
    help="cgroup v2 directory whose TCP connections are enrolled when established (repeatable).",
)
@click.option(
    "--framed", is_flag=True, help="Also police received streams as framed messages (needs [framing])."
)
@click.option("--unload", is_flag=True, help="Detach everything and remove the pinned rules state.")
def enforce(rules_path: str | None, cgroups: tuple[str, ...], framed: bool, unload: bool) -> None:
    """Load a rule set into the kernel and enrol a cgroup's connections (state stays pinned)."""
    if unload:
        try:
            enforcer = Enforcer.open()
        except _errors.NotLoaded:
            click.echo("sockpolicy: no kernel rules were loaded")
            return
        enforcer.unload()
        click.echo("sockpolicy: kernel rules unloaded")
        return
    if rules_path is None:
        _fail("enforce needs --rules FILE (or --unload)")
    try:
        ruleset = RuleSet.from_file(rules_path)
        for path in cgroups:
            check_cgroup(path)
        if framed and ruleset.framing is None:
            raise RuleError(f"{rules_path}: --framed needs a [framing] table in the rules file")
    except RuleError as exc:
        _fail(str(exc))
    try:
        enforcer = Enforcer.create(pin=True)
    except _errors.SockpolicyError as exc:
        _fail(str(exc))
    with enforcer:
        try:
            gen = enforcer.replace(ruleset)
            for path in cgroups:
                enforcer.attach_cgroup(path, framed=framed)
        except (RuleError, _errors.SockpolicyError) as exc:
            _fail(str(exc))
        click.echo(
            f"sockpolicy: generation {gen} loaded: {len(ruleset.rules)} rule(s), default {ruleset.default}"
        )
        for path in cgroups:
            click.echo(f"sockpolicy: enrolling TCP connections of cgroup {path}")


def _format(stats: GenerationStats, ruleset: RuleSet | None) -> list[str]:
    lines = [f"generation {stats.gen}"]
    described = {i: r.describe() for i, r in enumerate(ruleset.rules)} if ruleset else {}
    width = max((len(r.name) for r in stats.rules), default=9)
    width = max(width, 9)
    for r in stats.rules:
        lines.append(
            f"  {r.index:>2} {r.name:<{width}} msgs={r.msgs} bytes={r.bytes}  {described.get(r.index, '')}"
        )
    u = stats.unmatched
    lines.append(f"   - {u.name:<{width}} msgs={u.msgs} bytes={u.bytes}  no rule matched -> {u.verdict}")
    return lines


def rules_status() -> dict[str, Any]:
    """What ``sockpolicy status`` shows about kernel rules: ``{"loaded": False}`` or the counters."""
    try:
        enforcer = Enforcer.open()
    except _errors.NotLoaded:
        return {"loaded": False}
    with enforcer:
        stats = enforcer.stats()
        return {
            "loaded": True,
            "generation": stats.gen,
            "enrolled": len(enforcer.enrolled()),
            "framed": len(enforcer.enrolled("framed")),
            "labels": len(enforcer.labelled()),
            "cgroups": enforcer.cgroup_links(),
            "counters": stats.to_dict(),
            "lines": _format(stats, enforcer.ruleset()),
        }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rules(as_json: bool) -> None:
    """Show the kernel rule set of this network namespace and its per-rule counters."""
    status = rules_status()
    if not status["loaded"]:
        _fail("no kernel rules are loaded in this network namespace (run sockpolicy enforce)", 1)
    if as_json:
        click.echo(json.dumps({k: v for k, v in status.items() if k != "lines"}, indent=2))
        return
    click.echo(
        f"kernel rules: {status['enrolled']} socket(s) enrolled, {status['framed']} framed, "
        f"{status['labels']} label(s), cgroups: {', '.join(status['cgroups']) or 'none'}"
    )
    for line in status["lines"]:
        click.echo(line)


def register(cli_group: click.Group) -> None:
    """Add ``enforce`` and ``rules`` to the main ``sockpolicy`` group."""
    cli_group.add_command(enforce)
    cli_group.add_command(rules)
