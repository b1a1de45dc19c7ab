"""Loading a :class:`sockpolicy.proxy.Policy` from a file.

Two formats:

``.py``
    A Python module that defines ``policy = Policy()`` and registers callbacks on it.  It is imported
    under a unique module name that is removed from :data:`sys.modules` again afterwards, so loading
    the same file twice gives two independent policies.

``.toml``
    Declarative connection rules, ``[[rule]]`` tables that are tried in order; the first matching rule's
    action is the verdict and a connection no rule matches is passed.  :func:`load_rules` returns them as
    :class:`ConnectionRule` objects; :func:`load_policy` compiles them into one ``on_connect`` callback.

A policy decides what happens to traffic, so a file that other users can write is refused outright.
Every problem is reported as a :class:`PolicyFileError` whose message is a single line starting with the
file name.
"""

from __future__ import annotations

import collections
import importlib.util
import ipaddress
import itertools
import json
import os
import re
import stat
import sys
import tomllib
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._ranges import (
    InvalidEndpoint,
    InvalidPrefix,
    InvalidRange,
    IPNetwork,
    PortRanges,
    parse_endpoint,
    parse_ports,
    parse_prefix,
)

if TYPE_CHECKING:
    from .proxy import Policy

__all__ = [
    "ACTIONS",
    "PROTOS",
    "SUFFIXES",
    "ConnectionRule",
    "PolicyFileError",
    "load_policy",
    "load_rules",
    "match",
]

Proto = Literal["tcp", "udp", "both"]
Action = Literal["pass", "drop", "redirect"]

PROTOS: tuple[str, ...] = ("tcp", "udp", "both")
ACTIONS: tuple[str, ...] = ("pass", "drop", "redirect")
SUFFIXES: tuple[str, ...] = (".py", ".toml")

_RULE_KEYS = ("name", "proto", "ports", "addrs", "clients", "action", "to")
_module_counter = itertools.count()


class PolicyFileError(ValueError):
    """A policy file cannot be used; the message is one line and starts with the file name.

    :ivar path: the policy file.
    """

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(_one_line(message))
        self.path = Path(path)


def _one_line(text: str) -> str:
    # Exception messages from user code or tomllib may span lines; the CLI promises one line.
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


@dataclass(frozen=True)
class ConnectionRule:
    """One ``[[rule]]`` of a TOML policy.

    Empty ``addrs``/``clients`` and ``ports=None`` mean "any".

    :ivar index: the rule's 1-based position in the file.
    :ivar to: the redirect target ``(host, port)``; set exactly when ``action == "redirect"``.
    """

    index: int
    name: str | None
    proto: Proto
    ports: PortRanges | None
    addrs: tuple[IPNetwork, ...]
    clients: tuple[IPNetwork, ...]
    action: Action
    to: tuple[str, int] | None = None

    @property
    def label(self) -> str:
        """``#N (name)`` or ``#N``, as used in messages."""
        return f"#{self.index} ({self.name})" if self.name else f"#{self.index}"

    def __str__(self) -> str:
        parts = [f"rule {self.label}:", self.proto]
        parts.append(f"ports {self.ports}" if self.ports is not None else "ports any")
        if self.addrs:
            parts.append("addrs " + ",".join(map(str, self.addrs)))
        if self.clients:
            parts.append("clients " + ",".join(map(str, self.clients)))
        verdict = self.action
        if self.to is not None:
            host, port = self.to
            verdict += f" to {_format_endpoint(host, port)}"
        parts.append(f"-> {verdict}")
        return " ".join(parts)


def _format_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _address(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Normalise a socket address host for prefix matching.

    A dual-stack IPv6 socket reports IPv4 peers as ``::ffff:a.b.c.d``; rules are written with IPv4
    prefixes, so mapped addresses are unwrapped.  Scope ids (``fe80::1%lo``) are dropped.
    """
    try:
        addr = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _in_any(host: object, prefixes: tuple[IPNetwork, ...]) -> bool:
    addr = _address(host)
    return addr is not None and any(addr in p for p in prefixes)


def match(rule: ConnectionRule, proto: str, client: tuple[Any, ...], original_dst: tuple[Any, ...]) -> bool:
    """Whether ``rule`` applies to a connection.

    :param proto: ``"tcp"`` or ``"udp"``.
    :param client: the client's socket address, ``(host, port, ...)``.
    :param original_dst: the destination the client asked for, ``(host, port, ...)``.
    """
    if rule.proto != "both" and rule.proto != proto:
        return False
    if rule.ports is not None and original_dst[1] not in rule.ports:
        return False
    if rule.addrs and not _in_any(original_dst[0], rule.addrs):
        return False
    return not rule.clients or _in_any(client[0], rule.clients)


def first_match(
    rules: list[ConnectionRule], proto: str, client: tuple[Any, ...], original_dst: tuple[Any, ...]
) -> ConnectionRule | None:
    """The first rule that :func:`match` es, or ``None``."""
    return next((r for r in rules if match(r, proto, client, original_dst)), None)


# --- loading -----------------------------------------------------------------------------------------


def _check_file(path: Path) -> os.stat_result:
    if path.suffix not in SUFFIXES:
        raise PolicyFileError(
            path,
            f"{path}: unsupported policy file type {path.suffix or '(no suffix)'!r}; "
            "use a Python module (.py) or TOML rules (.toml)",
        )
    try:
        st = path.stat()
    except FileNotFoundError:
        raise PolicyFileError(path, f"{path}: no such file") from None
    except OSError as exc:
        raise PolicyFileError(path, f"{path}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PolicyFileError(path, f"{path}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    # Anyone who can write the policy can redirect or drop every steered connection.
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PolicyFileError(
            path, f"{path} is writable by group/others (mode {mode:04o}); chmod go-w {path}"
        )
    return st


def load_rules(path: str | os.PathLike[str]) -> list[ConnectionRule]:
    """Parse and validate a TOML policy file.

    :raises PolicyFileError: ``FILE: rule #N (name): what is wrong``, or ``FILE:LINE:COL: invalid
        TOML: ...`` for syntax errors.
    """
    p = Path(path)
    _check_file(p)
    if p.suffix != ".toml":
        raise PolicyFileError(p, f"{p}: only .toml policy files contain rules")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
        if m:
            raise PolicyFileError(p, f"{p}:{m[1]}:{m[2]}: invalid TOML: {msg[: m.start()]}") from None
        raise PolicyFileError(p, f"{p}: invalid TOML: {msg}") from None
    except UnicodeDecodeError as exc:
        raise PolicyFileError(p, f"{p}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise PolicyFileError(p, f"{p}: cannot read: {exc.strerror or exc}") from None
    return _rules_from_data(p, data)


def _rules_from_data(path: Path, data: Mapping[str, Any]) -> list[ConnectionRule]:
    unknown = [k for k in data if k != "rule"]
    if unknown:
        raise PolicyFileError(
            path, f"{path}: unknown top-level key {unknown[0]!r}; a TOML policy contains only [[rule]] tables"
        )
    raw = data.get("rule", [])
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise PolicyFileError(path, f"{path}: 'rule' must be an array of tables, written [[rule]]")
    return [_parse_rule(path, i, r) for i, r in enumerate(raw, start=1)]


_TOML_TYPES = {
    str: "string",
    int: "integer",
    float: "float",
    bool: "boolean",
    list: "array",
    dict: "table",
}


def _toml_type(value: object) -> str:
    return next((name for t, name in _TOML_TYPES.items() if type(value) is t), type(value).__name__)


def _parse_rule(path: Path, index: int, raw: Mapping[str, Any]) -> ConnectionRule:
    name = raw.get("name")
    where = f"{path}: rule #{index}"

    def fail(what: str) -> PolicyFileError:
        return PolicyFileError(path, f"{where}: {what}")

    if name is not None:
        if not isinstance(name, str):
            raise fail(f"'name' must be a string, not {_toml_type(name)}")
        where = f"{path}: rule #{index} ({name})"

    for key in raw:
        if key not in _RULE_KEYS:
            raise fail(f"unknown key {key!r} (known keys: {', '.join(_RULE_KEYS)})")

    def string(key: str, default: str | None = None) -> str | None:
        value = raw.get(key, default)
        if value is not None and not isinstance(value, str):
            raise fail(f"{key!r} must be a string, not {_toml_type(value)} {value!r}")
        return value

    def prefixes(key: str) -> tuple[IPNetwork, ...]:
        value = raw.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            # json.dumps quotes like TOML does, so the suggestion can be pasted into the file.
            raise fail(f"{key!r} must be an array of prefixes, e.g. {key} = [{json.dumps(value)}]")
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail(f'{key!r} must be an array of strings like ["127.0.0.0/8"], not {_toml_type(value)}')
        if not value:
            raise fail(f"{key!r} is empty, which would match nothing; leave it out to match any address")
        try:
            return tuple(parse_prefix(v) for v in value)
        except InvalidPrefix as exc:
            raise fail(f"{key}: {exc}") from None

    proto = string("proto", "both")
    if proto not in PROTOS:
        raise fail(f"unknown proto {proto!r} (use {', '.join(PROTOS)})")

    ports_text = string("ports")
    try:
        ports = parse_ports(ports_text) if ports_text is not None else None
    except InvalidRange as exc:
        raise fail(f"ports: {exc}") from None

    addrs = prefixes("addrs")
    clients = prefixes("clients")

    if "action" not in raw:
        raise fail(f"missing 'action' (one of {', '.join(ACTIONS)})")
    action = string("action")
    if action not in ACTIONS:
        raise fail(f"unknown action {action!r} (use {', '.join(ACTIONS)})")

    to_text = string("to")
    to: tuple[str, int] | None = None
    if action == "redirect":
        if to_text is None:
            raise fail("action 'redirect' needs 'to', e.g. to = \"127.0.0.1:9000\"")
        try:
            host, port = parse_endpoint(to_text, require_port=True)
        except InvalidEndpoint as exc:
            raise fail(f"to: {exc}") from None
        assert port is not None  # require_port=True guarantees it
        to = (host, port)
    elif to_text is not None:
        raise fail(f"'to' is only allowed with action = \"redirect\", not {action!r}")

    return ConnectionRule(
        index=index,
        name=name,
        proto=proto,  # type: ignore[arg-type]  # checked against PROTOS above
        ports=ports,
        addrs=addrs,
        clients=clients,
        action=action,  # type: ignore[arg-type]  # checked against ACTIONS above
        to=to,
    )


def compile_rules(rules: list[ConnectionRule]) -> Policy:
    """Build a :class:`~sockpolicy.proxy.Policy` whose single ``on_connect`` callback applies ``rules``.

    One catch-all callback evaluating the rules in order, rather than one filtered callback per rule,
    keeps "first match wins, otherwise pass" independent of how the proxy orders its callbacks.
    """
    from .proxy import Drop, Pass, Policy, Redirect

    frozen = list(rules)
    policy = Policy()
    # Per-rule match counts, exported by `serve --metrics` as sockpolicy_policy_rule_matches_total.
    hits: collections.Counter[tuple[str, str]] = collections.Counter()
    policy.rule_hits = hits  # type: ignore[attr-defined]

    def toml_rules(conn: Any) -> Any:
        rule = first_match(frozen, conn.proto, conn.client, conn.original_dst)
        hits[(rule.label, rule.action) if rule is not None else ("(none)", "pass")] += 1
        if rule is None or rule.action == "pass":
            return Pass()
        if rule.action == "drop":
            return Drop()
        assert rule.to is not None
        return Redirect(rule.to)

    toml_rules.__sockpolicy_name__ = "toml_rules"  # type: ignore[attr-defined]  # metrics label
    policy.on_connect()(toml_rules)
    return policy


def _load_python(path: Path) -> Policy:
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_sockpolicy_policy_{next(_module_counter)}_{stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PolicyFileError(path, f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered while it executes because dataclasses, typing and pickle look the module up by name;
    # removed afterwards so policies loaded from different files (or reloaded) never share state.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        line = f":{exc.lineno}" if exc.lineno else ""
        raise PolicyFileError(path, f"{path}{line}: SyntaxError: {exc.msg}") from None
    except (Exception, SystemExit) as exc:
        # SystemExit too: a stray sys.exit() in a policy must not end the CLI with its own exit code.
        raise PolicyFileError(path, _describe_exec_error(path, exc)) from None
    finally:
        sys.modules.pop(module_name, None)

    if not hasattr(module, "policy"):
        raise PolicyFileError(
            path, f"{path}: defines no 'policy'; a policy module must set policy = sockpolicy.proxy.Policy()"
        )
    policy = module.policy
    # Imported only now so that errors in the file itself are reported even if the proxy is broken.
    from .proxy import Policy

    if not isinstance(policy, Policy):
        raise PolicyFileError(
            path, f"{path}: 'policy' is a {type(policy).__name__}, not a sockpolicy.proxy.Policy"
        )
    return policy


def _describe_exec_error(path: Path, exc: BaseException) -> str:
    """``FILE:LINE: ExcType: message``, with LINE the deepest frame inside the policy file."""
    lineno = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == str(path):
            lineno = frame.lineno
    where = f"{path}:{lineno}" if lineno else str(path)
    text = str(exc)
    return f"{where}: {type(exc).__name__}: {text}" if text else f"{where}: {type(exc).__name__}"


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load a policy from a ``.py`` module or ``.toml`` rules file.

    :raises PolicyFileError: one line naming the file and the problem.
    """
    p = Path(path)
    _check_file(p)
    if p.suffix == ".toml":
        return compile_rules(load_rules(p))
    return _load_python(p)
