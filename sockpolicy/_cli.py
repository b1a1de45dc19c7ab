"""The ``sockpolicy`` command line.

Nouns read (``bindings``, ``status``, ``policy``), verbs change (``serve``, ``bind``, ``unbind``,
``unload``).  Every user error — bad input, a prefix that is not local, a bad policy file, missing
privileges, a kernel without the needed features — is printed as exactly one line
``sockpolicy: error: ...`` on stderr with exit status 2, and is detected before the kernel is touched
wherever that is possible.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from sockpolicy._cli_rules import register as _register_rules_commands

from ._policyfile import PolicyFileError
from ._ranges import InvalidEndpoint, InvalidPrefix, InvalidRange, PrefixNotLocal, RouteCheckError
from ._serve import (
    DEFAULT_CONN_LOG_INTERVAL,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HANDOFF_TIMEOUT,
    DEFAULT_LABEL,
    DEFAULT_PORTS,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WORKERS,
    ConfigError,
)

__all__ = ["EXIT_BUG", "EXIT_OK", "EXIT_USAGE", "cli", "main"]

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_PROG = "sockpolicy"

# Input errors defined by sockpolicy itself; SockpolicyError (kernel, privileges) is added lazily.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    InvalidRange,
    InvalidPrefix,
    InvalidEndpoint,
    PrefixNotLocal,
    RouteCheckError,
    PolicyFileError,
    ConfigError,
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = list(_USER_ERRORS)
    # Imported lazily and guarded: a broken backend module must not hide the error being reported.
    try:
        from ._errors import SockpolicyError

        types.append(SockpolicyError)
    except ImportError:
        pass
    try:
        from ._dispatcher import BindingConflict, InvalidLabel

        types += [BindingConflict, InvalidLabel]
    except ImportError:
        pass
    return tuple(types)


def _one_line(exc: BaseException) -> str:
    """The first line of the message (verifier logs and the like follow on further lines)."""
    if isinstance(exc, click.ClickException):
        text = exc.format_message()  # includes the option name: "Invalid value for '--proto': ..."
    else:
        # LoadError keeps the libbpf/verifier log out of .message; str() would include it.
        message = getattr(exc, "message", None)
        text = message if isinstance(message, str) and message else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _fail(message: str) -> NoReturn:
    click.echo(f"{_PROG}: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


class _Group(click.Group):
    """Adds the error boundary to click's entry point, so ``main()`` and ``CliRunner`` share it."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> NoReturn:  # type: ignore[override]
        extra.pop("standalone_mode", None)
        user_errors = _user_error_types()
        try:
            code = super().main(args=args, prog_name=prog_name or _PROG, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            # "sockpolicy" on its own: show help on stdout like --help, but as a usage error.
            click.echo(exc.ctx.get_help() if exc.ctx else "", err=False)
            sys.exit(EXIT_USAGE)
        except click.UsageError as exc:
            hint = ""
            if exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            _fail(_one_line(exc) + hint)
        except click.ClickException as exc:
            _fail(_one_line(exc))
        except click.Abort:
            click.echo(f"{_PROG}: aborted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        except user_errors as exc:
            if os.environ.get("SOCKPOLICY_DEBUG"):
                raise
            _fail(_one_line(exc))
        sys.exit(code if isinstance(code, int) else EXIT_OK)


@click.group(
    name=_PROG, cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(package_name="sockpolicy", prog_name=_PROG)
def cli() -> None:
    """Socket-layer proxying and policy with eBPF SK_LOOKUP.

    \b
    Nouns read:  bindings, status, policy
    Verbs change: serve, reload, bind, unbind, unload

    User errors print one line 'sockpolicy: error: ...' and exit with status 2.
    """


_proto_option = click.option(
    "--proto",
    type=click.Choice(["tcp", "udp", "both"], case_sensitive=False),
    default="both",
    show_default=True,
    help="Transport protocol(s) to steer.",
)
_label_option = click.option(
    "--label",
    default=DEFAULT_LABEL,
    show_default=True,
    metavar="NAME",
    help="Which socket the traffic is steered to.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


_serve_options: list[Callable[[Any], Any]] = [
    click.option(
        "--ports",
        default=DEFAULT_PORTS,
        show_default=True,
        metavar="RANGES",
        help="Destination ports to steer, e.g. 80,443,8000-8999.",
    ),
    click.option(
        "--addr",
        "addrs",
        multiple=True,
        metavar="PREFIX",
        help="Destination prefix to steer; repeatable; must be routed locally. "
        "[default: 127.0.0.1/32 and ::1/128]",
    ),
    _proto_option,
    click.option(
        "--upstream",
        metavar="HOST[:PORT]",
        help="Where passed connections go: HOST (at the original destination port), HOST:PORT or "
        "[IPV6]:PORT.  [default: the built-in echo service]",
    ),
    click.option(
        "--policy",
        "policy_path",
        metavar="FILE",
        type=click.Path(dir_okay=False),
        help="Policy: a Python module defining 'policy', or TOML [[rule]]s.  SIGHUP reloads it.",
    ),
    click.option(
        "--workers",
        type=click.IntRange(1, MAX_WORKERS),
        default=1,
        show_default=True,
        help="Processes sharing the label's sockets via SO_REUSEPORT.",
    ),
    _label_option,
    click.option(
        "--drain-timeout",
        type=click.FloatRange(min=0),
        default=DEFAULT_DRAIN_TIMEOUT,
        show_default=True,
        metavar="SECONDS",
        help="On SIGINT/SIGTERM, how long open connections may finish.",
    ),
    click.option(
        "--handoff-timeout",
        type=click.FloatRange(min=0),
        default=DEFAULT_HANDOFF_TIMEOUT,
        show_default=True,
        metavar="SECONDS",
        help="On SIGINT/SIGTERM, how long the listening sockets wait (queueing new connections) for a "
        "successor serve to adopt them; 0: refuse new connections at once.",
    ),
    click.option(
        "--connect-timeout",
        type=click.FloatRange(min=0.001),
        default=DEFAULT_CONNECT_TIMEOUT,
        show_default=True,
        metavar="SECONDS",
        help="Upstream TCP connect timeout; the client is reset when it expires.",
    ),
    click.option(
        "--metrics",
        metavar="ADDR:PORT",
        help="Serve Prometheus metrics at http://ADDR:PORT/metrics, e.g. 127.0.0.1:9464.",
    ),
    click.option(
        "--log-level",
        type=click.Choice(LOG_LEVELS, case_sensitive=False),
        default="info",
        show_default=True,
        help="Logging verbosity (stderr).",
    ),
    click.option(
        "--log-format",
        type=click.Choice(LOG_FORMATS, case_sensitive=False),
        default="text",
        show_default=True,
        help="Log lines as text or as one JSON object per line.",
    ),
    click.option(
        "--conn-log-interval",
        type=click.FloatRange(min=0),
        default=DEFAULT_CONN_LOG_INTERVAL,
        show_default=True,
        metavar="SECONDS",
        help="Log a line for each connection open this long, and again every SECONDS; 0: never.",
    ),
    click.option(
        "--user",
        metavar="NAME",
        help="After setup, drop root and run as this user with no capabilities.",
    ),
    click.option(
        "--splice",
        is_flag=True,
        help="Kernel splicing (docs/splice.md): connections passed to an --upstream (or given a splice "
        "verdict by the policy) are handed to the kernel; if the kernel cannot, one log line and userspace.",
    ),
]


def _with_serve_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_serve_options):
        fn = option(fn)
    return fn


def _run_serve(takeover: bool, **options: Any) -> None:
    from ._logging import setup_logging
    from ._serve import ServeConfig, require_privileges, serve_main

    options["policy"] = options.pop("policy_path")
    config = ServeConfig.from_cli(takeover=takeover, **options)
    require_privileges()
    setup_logging(config.log_level, config.log_format)
    code = serve_main(config)
    if code:
        sys.exit(code)


@cli.command()
@_with_serve_options
def serve(**options: Any) -> None:
    """Steer traffic to a proxy and run it until SIGINT/SIGTERM.

    Everything is validated before the kernel is touched; on exit the bindings are removed again.
    SIGHUP reloads --policy.  After SIGTERM the listening sockets wait --handoff-timeout seconds for a
    successor (see 'sockpolicy reload').

    \b
    Examples:
      sockpolicy serve --upstream 127.0.0.2
      sockpolicy serve --ports 80,443 --addr 127.0.0.0/8 --proto tcp --upstream 127.0.0.2:8080
      sockpolicy serve --policy rules.toml --workers 4 --metrics 127.0.0.1:9464
    """
    _run_serve(False, **options)


@cli.command()
@_with_serve_options
def reload(**options: Any) -> None:
    """Restart the running serve of --label without refusing a connection.

    Validates the options, then asks the running 'serve' of the label (through its handoff socket) to
    stop as on SIGTERM and hand over its listening sockets and bindings, and continues as the new
    'serve' in the foreground.  Takes the same options as 'serve'.

    \b
    Example:
      sockpolicy reload --policy rules.toml --upstream 127.0.0.2
    """
    _run_serve(True, **options)


def _binding_args(proto: str, addrs: tuple[str, ...], ports: str, label: str, *, check: bool) -> list[Any]:
    """Validate ``bind``/``unbind`` options and build the Binding objects (one per proto and prefix)."""
    from ._ranges import check_local, parse_ports, parse_prefix
    from ._serve import check_label, parse_proto

    port_ranges = parse_ports(ports)
    prefixes = list(dict.fromkeys(parse_prefix(a) for a in addrs))
    protos = parse_proto(proto)
    check_label(label)
    if check:
        for prefix in prefixes:
            check_local(prefix)
    from ._dispatcher import Binding

    # A dispatcher binding holds one port range: "80,443" is two bindings per protocol and prefix.
    return [Binding(p, prefix, r, label) for p in protos for prefix in prefixes for r in port_ranges]


@contextmanager
def _dispatcher(create: bool) -> Iterator[Any]:
    from ._dispatcher import Dispatcher
    from ._serve import require_privileges

    require_privileges()
    with Dispatcher.open(create=create) as d:
        yield d


def _not_loaded() -> type[BaseException]:
    from ._errors import NotLoaded

    return NotLoaded


def _format_binding(b: Any) -> str:
    """The binding in the option syntax of ``bind``/``unbind``."""
    return f"{b.proto} {b.prefix} ports {b.ports} label {b.label}"


def _binding_json(b: Any) -> dict[str, Any]:
    return {"proto": b.proto, "prefix": str(b.prefix), "ports": str(b.ports), "label": b.label}


_binding_options: list[Callable[[Any], Any]] = [
    _proto_option,
    click.option(
        "--addr",
        "addrs",
        multiple=True,
        required=True,
        metavar="PREFIX",
        help="Destination prefix; repeatable.",
    ),
    click.option(
        "--ports", required=True, metavar="RANGES", help="Destination ports, e.g. 80,443,8000-8999."
    ),
    _label_option,
]


def _with_binding_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_binding_options):
        fn = option(fn)
    return fn


@cli.command()
@_with_binding_options
def bind(proto: str, addrs: tuple[str, ...], ports: str, label: str) -> None:
    """Add a binding: steer PROTO traffic for PREFIX and RANGES to LABEL's socket.

    Loads the dispatcher if needed.  The prefix must be routed locally.

    \b
    Example:
      sockpolicy bind --proto tcp --addr 127.0.0.0/8 --ports 1-65535 --label default
    """
    bindings = _binding_args(proto, addrs, ports, label, check=True)
    with _dispatcher(create=True) as d:
        existing = set(d.bindings())
        added = []
        try:
            for b in bindings:
                if b in existing:  # add_binding would be a no-op; rolling it back would not
                    continue
                d.add_binding(b)
                added.append(b)
        except BaseException:
            # All or nothing: a failed bind leaves no partial state behind.
            for b in reversed(added):
                d.remove_binding(b)
            raise
    for b in bindings:
        click.echo(f"bound {_format_binding(b)}")


@cli.command()
@_with_binding_options
def unbind(proto: str, addrs: tuple[str, ...], ports: str, label: str) -> None:
    """Remove a binding, given exactly as it was added.

    \b
    Example:
      sockpolicy unbind --proto tcp --addr 127.0.0.0/8 --ports 1-65535 --label default
    """
    # No locality check: a binding must stay removable after its route is gone.
    bindings = _binding_args(proto, addrs, ports, label, check=False)
    with _dispatcher(create=False) as d:
        for b in bindings:
            d.remove_binding(b)
    for b in bindings:
        click.echo(f"unbound {_format_binding(b)}")


@cli.command()
def unload() -> None:
    """Detach the dispatcher and remove its pinned state in this network namespace.

    Succeeds (with a note on stderr) when nothing is loaded.
    """
    try:
        with _dispatcher(create=False) as d:
            d.unload()
    except _not_loaded():
        click.echo(f"{_PROG}: nothing loaded", err=True)
        return
    click.echo("unloaded")


@cli.command()
@_json_option
def bindings(as_json: bool) -> None:
    """List the bindings, one per line, in the form 'bind' takes.

    Prints nothing when the dispatcher is not loaded.
    """
    try:
        with _dispatcher(create=False) as d:
            items = list(d.bindings())
    except _not_loaded():
        items = []
    if as_json:
        click.echo(json.dumps([_binding_json(b) for b in items], indent=2))
        return
    for b in items:
        click.echo(_format_binding(b))


@cli.command()
@_json_option
def status(as_json: bool) -> None:
    """Show whether the dispatcher is loaded, its bindings, sockets and counters."""
    try:
        with _dispatcher(create=False) as d:
            items = list(d.bindings())
            sockets = dict(d.sockets())
            counters = dict(d.counters())
        loaded = True
    except _not_loaded():
        loaded, items, sockets, counters = False, [], {}, {}
    from sockpolicy._cli_rules import rules_status

    kernel_rules = rules_status()
    if as_json:
        doc = {
            "loaded": loaded,
            "bindings": [_binding_json(b) for b in items],
            "sockets": {str(k): _jsonable(v) for k, v in sockets.items()},
            "counters": {str(k): _jsonable(v) for k, v in counters.items()},
            "kernel_rules": {k: v for k, v in kernel_rules.items() if k != "lines"},
        }
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"dispatcher: {'loaded' if loaded else 'not loaded'}")
    if loaded:
        _echo_dispatcher_status(items, sockets, counters)
    if kernel_rules["loaded"]:
        click.echo(
            f"kernel rules: generation {kernel_rules['generation']}, {kernel_rules['enrolled']} enrolled"
        )
        for line in kernel_rules["lines"]:
            click.echo(f"  {line}")


def _echo_dispatcher_status(items: list[Any], sockets: dict[Any, Any], counters: dict[Any, Any]) -> None:
    click.echo(f"bindings: {len(items)}")
    for b in items:
        click.echo(f"  {_format_binding(b)}")
    click.echo("sockets:")
    for label, entries in sockets.items():
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, dict):
                shown = " ".join(f"{k}={v}" for k, v in entry.items() if v is not None)
            else:
                shown = str(entry)
            click.echo(f"  {label}: {shown}")
    click.echo("counters:")
    for group, values in counters.items():
        shown = " ".join(f"{k}={v}" for k, v in values.items()) if isinstance(values, dict) else values
        click.echo(f"  {group}: {shown}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


@cli.command("policy")
@click.argument("path", metavar="FILE", type=click.Path(dir_okay=False))
def policy_cmd(path: str) -> None:
    """Check a policy file and print its rules (TOML) or confirm it loads (Python)."""
    from ._policyfile import load_policy, load_rules

    if path.endswith(".toml"):
        rules = load_rules(path)
        for rule in rules:
            click.echo(str(rule))
        click.echo(f"{path}: {len(rules)} rule(s), unmatched connections pass")
    else:
        load_policy(path)
        click.echo(f"{path}: ok")


_register_rules_commands(cli)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point (``sockpolicy``) and ``python -m sockpolicy``."""
    cli.main(args=list(argv) if argv is not None else None, prog_name=_PROG)
