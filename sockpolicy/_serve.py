"""Orchestration behind ``sockpolicy serve``: config, sockets, steering, proxy, signals, workers.

The code is layered so that most of it runs without privileges:

* :class:`ServeConfig` — validation of every CLI input (pure, apart from the ``ip route get`` locality
  check); nothing touches the kernel's BPF state until a config exists.
* :func:`create_sockets` — plain listening sockets (unprivileged).
* :func:`steering` — **the only kernel-touching part**: opens the dispatcher, adds the bindings,
  registers the sockets, and on exit removes exactly what it added (unloading the dispatcher again if
  this process created it and nothing else uses it).
* :func:`run_serve` / :func:`run_worker` — the trio side: proxy, SIGINT/SIGTERM, draining, SIGHUP.
* :func:`serve_main` — the synchronous entry point used by the CLI, including ``--workers`` forking.

Around them, the operations features (docs/operations.md): the socket handoff of a restart
(:mod:`sockpolicy._handoff`), Prometheus metrics (:mod:`sockpolicy._metrics`), policy hot reload
(:class:`ReloadablePolicy`) and the privilege drop of ``--user`` (:mod:`sockpolicy._privileges`).
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import functools
import ipaddress
import json
import logging
import os
import re
import resource
import signal
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ._ranges import (
    InvalidEndpoint,
    IPNetwork,
    PortRange,
    PortRanges,
    check_local,
    parse_endpoint,
    parse_ports,
    parse_prefix,
)

if TYPE_CHECKING:
    from ._dispatcher import Dispatcher
    from ._handoff import Adopted, HandoffServer
    from .proxy import Policy, ServeHandle

__all__ = [
    "DEFAULT_ADDRS",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_LABEL",
    "DEFAULT_PORTS",
    "ConfigError",
    "ListenSockets",
    "ServeConfig",
    "create_sockets",
    "run_serve",
    "run_worker",
    "serve_main",
    "steering",
]

log = logging.getLogger("sockpolicy.serve")

DEFAULT_PORTS = "8000-8999"
DEFAULT_ADDRS = ("127.0.0.1/32", "::1/128")
DEFAULT_LABEL = "default"
DEFAULT_DRAIN_TIMEOUT = 10.0
DEFAULT_HANDOFF_TIMEOUT = 5.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_CONN_LOG_INTERVAL = 60.0
#: seconds a stopping serve keeps trying to hand its spliced connections to a splicing successor
HAND_OVER_WINDOW = 2.0
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
MAX_WORKERS = 256

# The dispatcher stores labels in a 32-byte map key: 1-31 characters (sockpolicy._dispatcher.check_label).
_LABEL_RE = re.compile(r"[A-Za-z0-9_.-]{1,31}")


class ConfigError(ValueError):
    """A ``serve``/``bind`` input that is individually valid but unusable (one-line message)."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``sockpolicy serve`` needs, validated.

    :ivar protos: ``("tcp",)``, ``("udp",)`` or ``("tcp", "udp")``.
    :ivar upstream: ``(host, port)``; ``port`` is ``None`` for "the original destination port".
        ``None`` when no ``--upstream`` was given (the policy must redirect).
    :ivar policy: the loaded policy, or ``None`` for the proxy's default behaviour.
    """

    ports: PortRanges
    addrs: tuple[IPNetwork, ...]
    protos: tuple[str, ...]
    upstream: tuple[str, int | None] | None = None
    policy_path: Path | None = None
    workers: int = 1
    label: str = DEFAULT_LABEL
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    log_level: str = "info"
    policy: Policy | None = field(default=None, compare=False, repr=False)
    #: ``--metrics``: where to serve Prometheus metrics, or ``None``.
    metrics: tuple[str, int] | None = None
    log_format: str = "text"
    #: after SIGTERM, how long the listening sockets are offered to a successor (0: not at all).
    handoff_timeout: float = DEFAULT_HANDOFF_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    #: seconds between the log lines of a long-lived connection (0: no periodic lines).
    conn_log_interval: float = DEFAULT_CONN_LOG_INTERVAL
    #: ``--user``: drop to this user after setup.
    user: str | None = None
    #: ``sockpolicy reload``: make the running serve of the label stop and hand its sockets over.
    takeover: bool = False
    #: ``--splice``: open a :class:`~sockpolicy.proxy.Splicer` (kernel splicing) before the sockets.
    splice: bool = False

    @classmethod
    def from_cli(
        cls,
        *,
        ports: str = DEFAULT_PORTS,
        addrs: Sequence[str] = (),
        proto: str = "both",
        upstream: str | None = None,
        policy: str | os.PathLike[str] | None = None,
        workers: int = 1,
        label: str = DEFAULT_LABEL,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        log_level: str = "info",
        metrics: str | None = None,
        log_format: str = "text",
        handoff_timeout: float = DEFAULT_HANDOFF_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        conn_log_interval: float = DEFAULT_CONN_LOG_INTERVAL,
        user: str | None = None,
        takeover: bool = False,
        splice: bool = False,
        check_routes: bool = True,
        load: bool = True,
    ) -> ServeConfig:
        """Validate CLI values, in the order the user wrote the options, and build a config.

        :param check_routes: run :func:`~sockpolicy._ranges.check_local` on every prefix.
        :param load: load the policy file (``False`` only checks that it is given).
        :raises ValueError: a subclass with a one-line message (InvalidRange, InvalidPrefix,
            PrefixNotLocal, InvalidEndpoint, PolicyFileError, ConfigError).
        """
        port_ranges = parse_ports(ports)
        prefixes = tuple(dict.fromkeys(parse_prefix(a) for a in (addrs or DEFAULT_ADDRS)))
        protos = parse_proto(proto)
        if check_routes:
            for prefix in prefixes:
                check_local(prefix)
        up = _parse_upstream(upstream) if upstream is not None else None
        if up is not None:
            _check_no_loop(up, prefixes, port_ranges)
        if isinstance(workers, bool) or not 1 <= workers <= MAX_WORKERS:
            raise ConfigError(f"invalid --workers {workers}: must be 1-{MAX_WORKERS}")
        check_label(label)
        if not drain_timeout >= 0:  # also rejects NaN
            raise ConfigError(f"invalid --drain-timeout {drain_timeout}: must be 0 or more seconds")
        if log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"invalid --log-level {log_level!r}: use one of {', '.join(LOG_LEVELS)}")
        if log_format.lower() not in LOG_FORMATS:
            raise ConfigError(f"invalid --log-format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
        metrics_addr = _parse_metrics(metrics, prefixes, port_ranges) if metrics is not None else None
        for name, value, minimum in (
            ("--handoff-timeout", handoff_timeout, 0.0),
            ("--connect-timeout", connect_timeout, 0.001),
            ("--conn-log-interval", conn_log_interval, 0.0),
        ):
            if not value >= minimum:  # also rejects NaN
                raise ConfigError(f"invalid {name} {value}: must be {minimum:g} or more seconds")
        if user is not None:
            from ._privileges import resolve_user

            resolve_user(user)
        loaded = None
        path = Path(policy) if policy is not None else None
        if path is not None and load:
            from ._policyfile import load_policy

            loaded = load_policy(path)
        return cls(
            ports=port_ranges,
            addrs=prefixes,
            protos=protos,
            upstream=up,
            policy_path=path,
            workers=workers,
            label=label,
            drain_timeout=float(drain_timeout),
            log_level=log_level.lower(),
            policy=loaded,
            metrics=metrics_addr,
            log_format=log_format.lower(),
            handoff_timeout=float(handoff_timeout),
            connect_timeout=float(connect_timeout),
            conn_log_interval=float(conn_log_interval),
            user=user,
            takeover=takeover,
            splice=bool(splice),
        )

    @property
    def needs_ipv6(self) -> bool:
        """Whether any prefix is IPv6, which needs IPv6 listening sockets."""
        return any(p.version == 6 for p in self.addrs)

    def bindings(self) -> list[tuple[str, IPNetwork, PortRange, str]]:
        """``(proto, prefix, port range, label)`` for every binding this config adds, in a stable order.

        A dispatcher binding holds one port range, so ``--ports 80,443`` gives two bindings per prefix.
        """
        return [
            (proto, prefix, ports, self.label)
            for proto in self.protos
            for prefix in self.addrs
            for ports in self.ports
        ]


def parse_proto(proto: str) -> tuple[str, ...]:
    """``"tcp"`` / ``"udp"`` / ``"both"`` → the protocols it stands for."""
    value = proto.strip().lower()
    if value == "both":
        return ("tcp", "udp")
    if value in ("tcp", "udp"):
        return (value,)
    raise ConfigError(f"invalid protocol {proto!r}: use tcp, udp or both")


def check_label(label: str) -> None:
    """Labels name a socket slot in the dispatcher and appear in ``status`` output."""
    if not _LABEL_RE.fullmatch(label):
        raise ConfigError(f"invalid label {label!r}: use 1-31 characters from A-Z a-z 0-9 _ . -")


def _parse_upstream(text: str) -> tuple[str, int | None]:
    try:
        return parse_endpoint(text, require_port=False)
    except InvalidEndpoint as exc:
        raise InvalidEndpoint(f"--upstream: {exc}") from None


def _parse_metrics(text: str, prefixes: Sequence[IPNetwork], ports: PortRanges) -> tuple[str, int]:
    try:
        host, port = parse_endpoint(text, require_port=True)
    except InvalidEndpoint as exc:
        raise InvalidEndpoint(f"--metrics: {exc}") from None
    assert port is not None
    # SK_LOOKUP runs before the normal socket lookup: a metrics port inside the steered range would be
    # answered by the proxy, not by the metrics server.
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host, port
    for prefix in prefixes:
        if addr.version == prefix.version and (addr in prefix or addr.is_unspecified) and port in ports:
            raise ConfigError(
                f"--metrics {text} is inside the steered range {prefix} ports {ports}, so the proxy would "
                "answer it; choose a port outside it"
            )
    return host, port


def _check_no_loop(
    upstream: tuple[str, int | None], prefixes: Sequence[IPNetwork], ports: PortRanges
) -> None:
    """Refuse an upstream that the dispatcher itself would steer back into the proxy.

    SK_LOOKUP also runs for the proxy's own connections to local addresses, so an upstream inside a
    bound prefix and port range makes every connection connect to itself.  Host names are not
    resolved here; only literal addresses are checked.
    """
    host, port = upstream
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return
    for prefix in prefixes:
        if addr.version == prefix.version and addr in prefix and (port is None or port in ports):
            at = "at the original destination port" if port is None else f"port {port}"
            raise ConfigError(
                f"--upstream {host} {at} is inside the steered range {prefix} ports {ports}, so the proxy "
                "would connect to itself; choose an upstream address or port outside it"
            )


# --- sockets (unprivileged) --------------------------------------------------------------------------


@dataclass
class ListenSockets:
    """One worker's listening sockets, keyed by ``(proto, family)``: ``("tcp", 4)``, ``("udp", 6)``, ..."""

    socks: dict[tuple[str, int], socket.socket] = field(default_factory=dict)
    #: more members of the same reuseport groups, adopted from a predecessor that had more workers.
    extra: list[tuple[tuple[str, int], socket.socket]] = field(default_factory=list)
    #: ``--splice``: the splice cgroup (its name) each socket was created in, where known.  A socket's
    #: cgroup never changes, and its accepted connections are enrolled by that cgroup's SOCK_OPS program.
    cgroup_of: dict[socket.socket, str] = field(default_factory=dict)

    def all(self) -> list[socket.socket]:
        return [*self.socks.values(), *(s for _, s in self.extra)]

    def items(self) -> list[tuple[tuple[str, int], socket.socket]]:
        """``(key, socket)`` for every socket, primaries first."""
        return [*self.socks.items(), *self.extra]

    def of(self, proto: str) -> list[socket.socket]:
        """The sockets of one protocol, IPv4 first."""
        extra = [s for (p, _), s in self.extra if p == proto]
        return [s for (p, _), s in sorted(self.socks.items()) if p == proto] + extra

    def addresses(self) -> dict[str, tuple[Any, ...]]:
        """``{"tcp4": ("127.0.0.1", port), ...}`` for logs and tests."""
        return {f"{p}{v}": s.getsockname() for (p, v), s in sorted(self.socks.items())}

    def close(self) -> None:
        for s in self.all():
            s.close()


def create_sockets(config: ServeConfig, *, like: ListenSockets | None = None) -> ListenSockets:
    """Create the listening sockets for one worker: per protocol, one per address family in play.

    IPv4 sockets bind to ``127.0.0.1`` and IPv6 sockets to ``::1``, port 0, so that traffic which is
    not steered can only reach them over loopback; steered traffic arrives whatever they are bound to.
    (A dual-stack socket cannot be bound to ``::1``: binding any specific IPv6 address makes the kernel
    set ``IPV6_V6ONLY``, and binding ``::`` would expose the port on every interface.  The dispatcher
    has a slot per family, so a separate IPv4 socket is the loopback-only way to take IPv4 traffic.)

    ``SO_REUSEPORT`` is always set.  With ``like`` the new sockets bind to the same ports as ``like``
    and so join its reuseport groups: the dispatcher holds one socket per label, protocol and family,
    and the kernel's reuseport selection spreads the steered traffic over every worker's socket.

    :raises ConfigError: if the sockets cannot be created (e.g. IPv6 disabled).
    """
    families = sorted({p.version for p in config.addrs})
    out = ListenSockets()
    host = ""
    try:
        for proto in config.protos:
            kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
            for version in families:
                family, host = (socket.AF_INET6, "::1") if version == 6 else (socket.AF_INET, "127.0.0.1")
                sock = socket.socket(family, kind)
                out.socks[(proto, version)] = sock
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sibling = like.socks.get((proto, version)) if like is not None else None
                sock.bind((host, sibling.getsockname()[1] if sibling is not None else 0))
                if kind == socket.SOCK_STREAM:
                    sock.listen(socket.SOMAXCONN)
                sock.setblocking(False)
    except OSError as exc:
        out.close()
        if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL) and host == "::1":
            raise ConfigError(f"cannot listen on [::1]: IPv6 is not available ({exc.strerror})") from None
        raise ConfigError(f"cannot create listening sockets on {host}: {exc.strerror or exc}") from None
    return out


# --- kernel (privileged) -----------------------------------------------------------------------------


def require_privileges() -> None:
    """Fail early, before any BPF call, when the process lacks the needed capabilities."""
    try:
        from ._errors import missing_capabilities
    except ImportError:  # pragma: no cover - _errors is part of the package
        return
    missing = missing_capabilities()
    if missing:
        raise ConfigError(f"permission denied: needs {' and '.join(missing)} (run as root)")


class Steering:
    """The bindings and socket registrations one ``serve`` made; :meth:`stop` undoes them.

    :ivar added: the bindings this serve owns: it added them, or took them over from a predecessor
        (socket handoff, or the state file of one that was killed).  Only these are removed.
    :ivar created: whether the dispatcher was loaded by this serve (or by the predecessor it took over
        from); then :meth:`stop` unloads it when no bindings remain.
    :ivar handed_off: a successor took everything over: :meth:`stop` leaves it all in place.
    """

    def __init__(self, dispatcher: Dispatcher, created: bool) -> None:
        self.dispatcher = dispatcher
        self.created = created
        self.added: list[Any] = []
        self.stopped = False
        self.handed_off = False
        #: False after a privilege drop: changing the pinned state needs root (docs/security.md).
        self.can_unload = True

    def added_json(self) -> list[dict[str, str]]:
        """The owned bindings as JSON-able dicts (handoff metadata, state file)."""
        return [
            {"proto": b.proto, "prefix": str(b.prefix), "ports": str(b.ports), "label": b.label}
            for b in self.added
        ]

    def stop(self) -> None:
        """Remove the bindings (new connections stop being steered); idempotent.

        Removal errors are logged, not raised: this runs on the way out, often after another error.
        """
        if self.stopped:
            return
        self.stopped = True
        if self.handed_off:
            log.info("bindings and sockets handed over to the successor; leaving them in place")
            return
        if not self.can_unload:
            # Changing the dispatcher takes its lock, which stats the root-only state directory: not
            # possible without privileges.  Leaving the bindings is the safe side: with no socket behind
            # the label the kernel refuses their connections, and the next serve of the label takes them
            # over (state file); 'sockpolicy unbind' / 'unload' remove them.
            log.info("privileges dropped: leaving the bindings in place (refused until the next serve)")
            return
        for binding in reversed(self.added):
            try:
                self.dispatcher.remove_binding(binding)
            except Exception as exc:
                log.warning("could not remove binding %s: %s", binding, exc)
        self.added.clear()
        if self.created:
            try:
                if not self.dispatcher.bindings():
                    if self.can_unload:
                        self.dispatcher.unload()
                    else:
                        log.info(
                            "privileges dropped: leaving the empty dispatcher loaded (sockpolicy unload)"
                        )
            except Exception as exc:
                log.warning("could not unload the dispatcher: %s", exc)


def _family_version(family: Any) -> int:
    return 6 if str(family) in ("ipv6", "6", str(int(socket.AF_INET6))) else 4


@contextlib.contextmanager
def steering(
    config: ServeConfig,
    sockets: ListenSockets,
    *,
    adopted: Adopted | None = None,
    inherited: dict[str, Any] | None = None,
) -> Iterator[Steering]:
    """KERNEL-TOUCHING: steer the config's bindings to ``sockets``; undo everything on exit.

    If anything fails half-way (a binding already exists, the kernel lacks SK_LOOKUP, ...), the
    bindings added so far are removed and a dispatcher this call loaded is unloaded again, so a failed
    ``serve`` leaves nothing attached or pinned.

    :param adopted: sockets handed over by the label's previous ``serve`` (restart).  They are already
        registered, so the label counts as free; once everything is set up the predecessor is told
        (:meth:`Adopted.confirm`) and its bindings become this serve's.
    :param inherited: the state file of a predecessor that died without cleaning up: the bindings it
        added become this serve's.
    """
    from ._dispatcher import Binding, Dispatcher
    from ._errors import NotLoaded

    require_privileges()
    try:
        with Dispatcher.open(create=False):
            created = False
    except NotLoaded:
        created = True
    with Dispatcher.open(create=True) as dispatcher:
        state = Steering(dispatcher, created)
        try:
            # Registering replaces the label's sockets, so a second serve on a live label would
            # silently take its traffic (and later remove bindings the first one relies on).  The
            # sockmap drops closed sockets, so a registered socket means a live process -- unless
            # it is one of the sockets that process just handed to us.
            registered = dispatcher.sockets().get(config.label) or []
            ours = adopted.cookies() if adopted is not None else set()
            if any(entry.get("cookie") not in ours for entry in registered):
                raise ConfigError(
                    f"label {config.label!r} is already being served by another process; "
                    "stop it first, or use another --label (or --workers N for more processes)"
                )
            # add_binding is a no-op for an identical existing binding; such a binding belongs to
            # whoever made it (e.g. an earlier 'sockpolicy bind'), so it is neither recorded nor removed
            # -- unless our predecessor made it: then it is ours now.
            existing = set(dispatcher.bindings())
            before = adopted.added if adopted is not None else (inherited or {}).get("added", [])
            taken = [b for b in (Binding(**d) for d in before) if b in existing]
            wanted = []
            for proto, prefix, ports, label in config.bindings():
                binding = Binding(proto, prefix, ports, label)
                wanted.append(binding)
                if binding in existing:
                    continue
                dispatcher.add_binding(binding)
                state.added.append(binding)
            slots = {(e["proto"], _family_version(e["family"])): e.get("cookie") for e in registered}
            for key, sock in sockets.socks.items():
                members = {
                    _cookie(s) for k, s in (adopted.sockets if adopted is not None else []) if k == key
                }
                if slots.get(key) is not None and slots[key] in members:
                    continue  # the predecessor's registration already points at this reuseport group
                dispatcher.register_socket(config.label, sock)
            if adopted is not None:
                adopted.confirm()  # from here on the predecessor leaves bindings and sockets to us
            if adopted is not None:
                state.created = created or adopted.created
            elif inherited is not None:
                state.created = created or bool(inherited.get("created"))
            state.added = [*taken, *(b for b in state.added if b not in taken)]
            for binding in [b for b in taken if b not in wanted]:
                dispatcher.remove_binding(binding)  # the predecessor's config wanted it, ours does not
                state.added.remove(binding)
            for key in slots:
                if key not in sockets.socks:
                    dispatcher.unregister_socket(config.label, key[0], key[1])
            log.info(
                "steering %s %s ports %s to label %r",
                "+".join(config.protos),
                ",".join(map(str, config.addrs)),
                config.ports,
                config.label,
            )
            yield state
        finally:
            state.stop()


def _cookie(sock: socket.socket) -> int | None:
    from ._handoff import socket_cookie

    try:
        return socket_cookie(sock)
    except OSError:
        return None


# --- operations: limits, policy reload, handoff, metrics, privileges -----------------------------------


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each proxied connection needs two fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@functools.cache
def _reloadable_class() -> type:
    from .proxy import Policy

    class ReloadablePolicy(Policy):
        """A :class:`~sockpolicy.proxy.Policy` whose rules can be swapped while serving (SIGHUP).

        A connection uses the policy that was in force when it started, for all its callbacks: the
        proxy asks for the on_connect rule first, and that pins the current policy to the connection.
        Swapping is one reference assignment in the trio thread, so new connections switch atomically.
        """

        def __init__(self, current: Policy) -> None:
            super().__init__()
            self.current = current
            self.reloads = {"ok": 0, "failed": 0}
            self._pinned: weakref.WeakKeyDictionary[Any, Policy] = weakref.WeakKeyDictionary()

        def swap(self, policy: Policy) -> None:
            self.current = policy

        def _connect_rule(self, conn: Any) -> Any:
            policy = self._pinned.setdefault(conn, self.current)
            return policy._connect_rule(conn)

        def _message_rule(self, conn: Any, direction: Any) -> Any:
            policy = self._pinned.get(conn) or self.current
            return policy._message_rule(conn, direction)

    return ReloadablePolicy


def reloadable(policy: Policy | None, *, splice: bool = False) -> Any:
    """Wrap ``policy`` (``None``: pass everything, spliced if ``splice``) so that SIGHUP can replace it."""
    from .proxy import Pass, Policy

    if policy is None:
        policy = Policy()
        if splice:

            @policy.on_connect(proto="tcp")
            def _splice_all(conn: Any) -> Any:
                return Pass(splice=True)

    return _reloadable_class()(policy)


async def reload_policy(config: ServeConfig, policy: Any) -> bool:
    """SIGHUP: load ``--policy`` again; swap it in, or keep the current one and log why."""
    if config.policy_path is None:
        log.warning("SIGHUP: serve has no --policy; nothing to reload")
        return False
    from ._policyfile import load_policy

    try:
        new = await trio.to_thread.run_sync(load_policy, config.policy_path)
    except Exception as exc:
        policy.reloads["failed"] += 1
        log.error("SIGHUP: keeping the current policy: %s", exc)
        return False
    policy.swap(new)
    policy.reloads["ok"] += 1
    log.info("SIGHUP: policy %s reloaded; new connections use it", config.policy_path)
    return True


@dataclass
class _SpliceUnit:
    """One splicer cgroup of a predecessor (restart): its SOCK_OPS link, if passed, and the maps of every
    group of connections it had (``(pid, maps)``: its own splicer's, then those it had adopted)."""

    cgroup: str | None
    link: Any
    groups: list[tuple[int, list[Any]]]

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
        for _, maps in self.groups:
            for m in maps:
                m.close()
        self.groups = []


def _take_link(units: list[_SpliceUnit], cgroup: str) -> Any:
    """The predecessor's SOCK_OPS link on ``cgroup``, removed from ``units`` (the caller owns it), or None."""
    for unit in units:
        if unit.link is not None and unit.cgroup == cgroup:
            link, unit.link = unit.link, None
            return link
    return None


class Runtime:
    """Everything ``serve`` sets up around the proxy, in order, and undoes in reverse.

    1. raise RLIMIT_NOFILE; ask the label's running serve for its sockets (restart);
    2. sockets: the adopted ones, plus new ones for what is missing;
    3. steering (bindings, registrations; confirms the handoff), the state file;
    4. bind the handoff socket and the metrics port; drop privileges (``--user``);
    5. :meth:`start_services` starts their threads (after forking the workers).
    """

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.stack = contextlib.ExitStack()
        self.socket_sets: list[ListenSockets] = []
        self.steer: Steering | None = None
        self.handoff: HandoffServer | None = None
        self.metrics: Any = None
        self.receiver: Any = None
        self.policy: Any = None
        #: ``--splice``: the open :class:`~sockpolicy.proxy.Splicer`, or None (not asked for, or unavailable).
        self.splicer: Any = None
        self.stats: list[Any] = []  # ServeStats of the trio workers in this process
        self.expired = False
        #: the trio run serving in this process (single worker): the handoff thread calls into it
        self.trio_token: Any = None
        self._offered: list[Any] = []  # splicers whose maps went into a handoff offer
        self._adopted_splicers: dict[int, Any] = {}  # the predecessor's splicers, by its offer's index
        #: ``--splice --workers N``: one Splicer per worker (index = worker), opened by the parent
        self.worker_splicers: list[Any] = []
        #: ``--splice --workers N``: the parent's end of each worker's channel (restart: the worker's maps
        #: and spliced connections), and the workers' pids
        self.worker_channels: list[socket.socket | None] = []
        self.worker_pids: list[int] = []
        #: restart, by the predecessor's group index (``"splicer"`` of a handed-over connection): the splicer
        #: of this process that runs that group's connections (``--workers``: the worker's)
        self._adopted_targets: dict[int, Any] = {}
        #: ``--workers`` restart offer: the group index of each worker's own maps, and its number of groups
        self._worker_groups: list[int] = []
        self._worker_group_counts: list[int] = []

    def __enter__(self) -> Runtime:
        try:
            self._setup()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.steer is not None and self.handoff is not None:
            self.steer.handed_off = self.handoff.handed_off.is_set()
        if self.handoff is not None and self.handoff.handed_off.is_set():
            # The successor's cgroups (same names) are its own now; the others we remove once empty.
            used = set(self.handoff.successor_cgroups)
            named = [(self.splicer, self._splice_cgroup_name())] if self.splicer is not None else []
            if self.worker_splicers:
                named += list(zip(self.worker_splicers, self._worker_cgroup_names(), strict=True))
            for splicer, name in named:
                splicer.keep_cgroup = name in used
        self.stack.close()

    def _setup(self) -> None:
        from . import _handoff

        config = self.config
        raise_nofile_limit()
        require_privileges()
        directory = _handoff.run_dir()
        adopted = self._ask_predecessor(directory)
        inherited = None
        if adopted is None:
            inherited = _dead_state(_handoff.read_state(directory, config.label))
        else:
            self.stack.callback(adopted.abandon)  # after confirm() this only closes our dups
            log.info("adopted %d sockets from pid %d", len(adopted.sockets), adopted.pid)
        before = None
        cgroups: list[str] = []
        if config.splice and config.workers > 1:
            self.worker_splicers = self._open_worker_splicers(adopted)
            if self.worker_splicers:
                before = lambda index: self.worker_splicers[index].enter()  # noqa: E731
                cgroups = self._worker_cgroup_names()
        elif config.splice:
            self.splicer = self._open_splicer(adopted)  # BEFORE the sockets: they take its cgroup
            if self.splicer is not None:
                cgroups = [self._splice_cgroup_name()]
        self.policy = reloadable(config.policy, splice=self.splicer is not None or bool(self.worker_splicers))
        try:
            self.socket_sets = _socket_sets(config, adopted, before, cgroups)
        finally:
            if self.worker_splicers:
                self.worker_splicers[0].leave()  # the parent's own sockets (metrics) stay unenrolled
        for sockets in self.socket_sets:
            self.stack.callback(sockets.close)
        if adopted is not None and cgroups:
            self._warn_unenrolled(adopted, cgroups)
        self.steer = self.stack.enter_context(
            steering(config, self.socket_sets[0], adopted=adopted, inherited=inherited)
        )
        steer = self.steer
        if adopted is not None and adopted.spliced:
            self._adopt_spliced(adopted)
        _handoff.write_state(
            directory,
            config.label,
            {"pid": os.getpid(), "added": steer.added_json(), "created": steer.created},
        )
        self.stack.callback(_handoff.remove_state, directory, config.label, os.getpid())
        self.handoff = _handoff.HandoffServer(
            directory,
            config.label,
            self._offer,
            lambda: os.kill(os.getpid(), signal.SIGTERM),
            self._hand_over_spliced,
        )
        self.stack.callback(self.handoff.close)
        if config.metrics is not None:
            self._setup_metrics()
        if config.user is not None:
            from ._privileges import drop_privileges

            drop_privileges(config.user)
            steer.can_unload = False
            log.info("running as user %r with no capabilities", config.user)

    def _splice_refusal(self) -> str | None:
        """Why ``--splice`` cannot be honoured with this config (one line), or None."""
        config = self.config
        if config.upstream is None and config.policy is None:
            return "no --upstream: the built-in echo service has no socket to splice to"
        return None

    def _splice_cgroup_name(self) -> str:
        """``<netns inode>-<label>``: the same for every ``serve`` of this label in this namespace, so a
        successor finds the cgroup its adopted listening sockets were created in."""
        from ._state import netns_inode

        return f"{netns_inode('/proc/self/ns/net')}-{self.config.label}"

    def _worker_cgroup_names(self) -> list[str]:
        """``<netns inode>-<label>-w<i>``: worker i's splice cgroup, the same for every serve of the label."""
        base = self._splice_cgroup_name()
        return [f"{base}-w{index}" for index in range(self.config.workers)]

    def _warn_unenrolled(self, adopted: Adopted, cgroups: list[str]) -> None:
        """One line if adopted listening sockets are served by a process whose splicer does not enrol their
        cgroup: what they accept is relayed in userspace."""
        ours = {id(sock) for _, sock in adopted.sockets}
        served = 0
        foreign: list[str] = []
        for sockets, name in zip(self.socket_sets, cgroups, strict=True):
            for _, sock in sockets.items():
                if id(sock) not in ours:
                    continue
                served += 1
                cgroup = sockets.cgroup_of.get(sock)
                if cgroup != name:
                    foreign.append(cgroup or "outside any splice cgroup")
        if foreign:
            log.warning(
                "splice: %d of the %d listening sockets adopted from pid %d were not created in the splice "
                "cgroup of the process serving them (%s), so connections accepted on them are relayed in "
                "userspace (docs/operations.md)",
                len(foreign),
                served,
                adopted.pid,
                ", ".join(sorted(set(foreign))),
            )

    def _splice_units(self, adopted: Adopted | None) -> list[_SpliceUnit]:
        """The predecessor's splicing state (restart), one unit per splicer cgroup it had: the SOCK_OPS
        link on it, if passed, and the maps of each splicer whose connections it had.  The fds are taken
        from ``adopted``; whatever is malformed is closed with one warning."""
        from ._objects import Link, Map
        from .proxy._splice import MAP_NAMES

        if adopted is None or adopted.splice is None:
            return []
        fds, adopted.splice_fds = adopted.splice_fds, []
        described = adopted.splice.get("units")
        if described is None:  # a single-process predecessor: its cgroup is the label's
            described = [
                {
                    "cgroup": self._splice_cgroup_name(),
                    "link": adopted.splice.get("link"),
                    "pids": adopted.splice.get("pids", []),
                }
            ]
        units: list[_SpliceUnit] = []
        try:
            for unit in described:
                link = None
                if unit.get("link"):
                    link = Link(fds.pop(0), description=f"splice SOCK_OPS link of pid {adopted.pid}")
                units.append(_SpliceUnit(unit.get("cgroup"), link, []))
                for pid in unit.get("pids", []):
                    maps: list[Any] = []
                    units[-1].groups.append((int(pid), maps))
                    for _ in MAP_NAMES:
                        maps.append(Map(fds.pop(0)))
        except (IndexError, AttributeError, TypeError, ValueError, OSError) as exc:
            log.warning("splice: the splicing state of pid %d is malformed (%s); not taken", adopted.pid, exc)
            for each in units:
                each.close()
            units = []
        for fd in fds:
            os.close(fd)
        return units

    def _adopt_units(self, units: list[_SpliceUnit], splicers: list[Any], names: list[str]) -> None:
        """Give each predecessor group of maps to the splicer of the same cgroup (else spread them), log
        one line for the links nobody here takes (the predecessor detaches them when it has handed off)."""
        from .proxy import Splicer, SpliceUnavailable

        dropped = []
        index = 0
        for position, unit in enumerate(units):
            if unit.link is not None:
                dropped.append(str(unit.cgroup))
                unit.link.close()
                unit.link = None
            home = names.index(unit.cgroup) if unit.cgroup in names else position % len(splicers)
            for pid, maps in unit.groups:
                try:
                    adopted = Splicer.adopt(maps, pid)  # closes the maps if it fails
                except SpliceUnavailable as exc:
                    log.warning("splice: cannot use the splice maps of pid %d: %s", pid, exc)
                else:
                    splicers[home].adopted.append(adopted)
                    self._adopted_splicers[index] = adopted
                    self._adopted_targets[index] = splicers[home]
                index += 1
            unit.groups = []
        if dropped:
            log.warning(
                "splice: the SOCK_OPS attachment of cgroup %s is not carried over (no splicer of this "
                "serve enrols there; the predecessor detaches it); its maps and connections still move",
                ", ".join(dropped),
            )

    def _open_splicer(self, adopted: Adopted | None) -> Any:
        """``--splice``: open the Splicer (moves this process into its cgroup), or log one line why not.

        The cgroup is named after the network namespace and the label, so that it is the same for
        every ``serve`` of the label: a successor's adopted listening sockets (created in it by the
        predecessor) then accept into it.  A splicing predecessor hands over its SOCK_OPS link, which
        we update to our program (from then on every new connection is enrolled in our maps), and its
        splice maps, which keep its connections (and the ones it hands over) spliced.
        """
        refusal = self._splice_refusal()
        if refusal is not None:
            log.warning("splice: %s; serving in userspace", refusal)
            return None
        from .proxy import Splicer, SpliceUnavailable

        name = self._splice_cgroup_name()
        units = self._splice_units(adopted)
        try:
            splicer = Splicer.open(name=name, link=_take_link(units, name))
        except SpliceUnavailable as exc:
            log.warning("splice: unavailable (%s), serving in userspace: %s", exc.feature, exc)
            for unit in units:
                unit.close()
            return None
        self.stack.callback(self._close_splicer, splicer)
        self._adopt_units(units, [splicer], [name])
        if adopted is not None:
            adopted.take_splice = True
            adopted.splice_cgroups = [name]
        return splicer

    def _open_worker_splicers(self, adopted: Adopted | None) -> list[Any]:
        """``--splice --workers N``: a Splicer per worker, each with its own cgroup
        (``sockpolicy-splice-<netns inode>-<label>-w<i>``), maps and sweeper; empty if unavailable."""
        refusal = self._splice_refusal()
        if refusal is not None:
            log.warning("splice: %s; serving in userspace", refusal)
            return []
        from .proxy import Splicer, SpliceUnavailable

        names = self._worker_cgroup_names()
        units = self._splice_units(adopted)
        splicers: list[Any] = []
        try:
            for index, name in enumerate(names):
                # A predecessor's worker i passes its link on cgroup w<i>: ours takes it over atomically.
                splicer = Splicer.open(name=name, link=_take_link(units, name))
                splicers.append(splicer)
                self.stack.callback(self._close_splicer, splicer, index)
        except SpliceUnavailable as exc:
            log.warning("splice: unavailable (%s), serving in userspace: %s", exc.feature, exc)
            if splicers:
                splicers[0].leave()
            for splicer in reversed(splicers):
                splicer.close()
            for unit in units:
                unit.close()
            return []
        self._adopt_units(units, splicers, names)
        if adopted is not None:
            adopted.take_splice = True
            adopted.splice_cgroups = names
        return splicers

    def _adopt_spliced(self, adopted: Adopted) -> None:
        """Claim the slots of the spliced connections the predecessor handed over; queue them for
        ``serve()`` (which runs them with :func:`~sockpolicy.proxy._tcp.run_adopted_splice`)."""
        from .proxy import SpliceUnavailable
        from .proxy._splice import AdoptedPair
        from .proxy._streams import abort_socket

        count = 0
        for meta, client, upstream in adopted.spliced:
            try:
                owner = self._adopted_splicers.get(int(meta["splicer"]))
                # The splicer that sweeps the group's maps runs its connections (--workers: that worker).
                splicer = self._adopted_targets.get(int(meta["splicer"]), self.splicer)
                if owner is None or splicer is None:
                    raise SpliceUnavailable("restart", "its splice maps were not adopted")
                client_slot = owner.adopt_slot(client, *meta["client"])
                try:
                    upstream_slot = owner.adopt_slot(upstream, *meta["upstream"])
                except SpliceUnavailable:
                    client_slot.release()
                    raise
            except (SpliceUnavailable, IndexError, KeyError, TypeError, ValueError) as exc:
                # Reset both sides: the connection cannot be served any more (its state is lost).
                log.warning(
                    "splice: a spliced connection from pid %d cannot be adopted: %s", adopted.pid, exc
                )
                abort_socket(client)
                abort_socket(upstream)
                continue
            client.setblocking(False)
            upstream.setblocking(False)
            splicer.adopted_pairs.append(
                AdoptedPair(client, upstream, client_slot, upstream_slot, adopted.pid, meta.get("conn"))
            )
            splicer.stats.adopted += 1
            count += 1
        adopted.spliced = []
        log.info("splice: adopted %d spliced connections from pid %d", count, adopted.pid)

    @staticmethod
    def _close_splicer(splicer: Any, worker: int | None = None) -> None:
        from .proxy._splice import QUARANTINE

        stats = splicer.stats
        if not splicer.closed and not splicer.exported and worker is None:
            # Let the last slots out of quarantine, so that the line below shows what was really left
            # (the first sweep quarantines the sockets that closed since the sweeper stopped).
            splicer.sweep()
            time.sleep(QUARANTINE)
            splicer.sweep()
        if splicer.closed:
            return
        if worker is not None:
            splicer.close()  # the worker logged its counters and what it left in the maps
            return
        entries = splicer.entries()
        log.info(
            "splice: %d connections spliced (%d bytes), %d relayed in userspace; %d adopted, %d handed over; "
            "left in the maps: socks=%d slot_of=%d owners=%d claimed=%d%s",
            stats.spliced,
            stats.bytes_spliced,
            stats.fallbacks,
            stats.adopted,
            stats.handed_over,
            entries["socks"],
            entries["slot_of"],
            entries["owners"],
            entries["claimed"],
            " (the successor has them)" if splicer.exported else "",
        )
        splicer.close()

    def _ask_predecessor(self, directory: Path) -> Adopted | None:
        from ._handoff import HandoffBusy, request_handoff

        try:
            adopted = request_handoff(
                directory,
                self.config.label,
                takeover=self.config.takeover,
                splice=self.config.splice and self._splice_refusal() is None,
                workers=self.config.workers,
            )
        except HandoffBusy as busy:
            raise ConfigError(
                f"label {self.config.label!r} is already being served by another process (pid {busy.pid}); "
                "stop it first, restart it with 'sockpolicy reload', or use another --label"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"socket handoff from the running serve failed: {exc}") from None
        if adopted is None and self.config.takeover:
            raise ConfigError(
                f"no running serve of label {self.config.label!r} to reload in this network namespace; "
                "start one with 'sockpolicy serve'"
            )
        return adopted

    def _offer(self, splice: bool = False, workers: int | None = None) -> Any:
        """The handoff offer (in the handoff thread); with ``splice``, our splicing state too (with
        ``--workers``, only to a successor that said its worker count, i.e. understands units)."""
        from ._handoff import Offer

        assert self.steer is not None
        socks = [item for sockets in self.socket_sets for item in sockets.items()]
        cgroups = [sockets.cgroup_of.get(sock) for sockets in self.socket_sets for _, sock in sockets.items()]
        offer = Offer(socks, self.steer.added_json(), self.steer.created, cgroups=cgroups)
        if splice and self.splicer is not None and self.trio_token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                offer.splice, offer.splice_fds = trio.from_thread.run_sync(
                    self._splice_offer, trio_token=self.trio_token
                )
        elif splice and self.worker_splicers and workers is not None:
            self._worker_splice_offer(offer)
        return offer

    def _worker_splice_offer(self, offer: Any) -> None:
        """``--workers``, in the handoff thread: a unit per worker, with the SOCK_OPS link and maps this
        parent holds for it and the maps the worker adopted in an earlier restart (asked over its
        channel; a worker that has exited has none).  Fixes the group indexes :meth:`_hand_over_spliced`
        refers to."""
        from .proxy._splice import MAP_NAMES

        units: list[dict[str, Any]] = []
        self._worker_groups = []
        self._worker_group_counts = []
        groups = 0
        for index, splicer in enumerate(self.worker_splicers):
            pids = [self.worker_pids[index] if index < len(self.worker_pids) else os.getpid()]
            extra: list[int] = []
            channel = self.worker_channels[index] if index < len(self.worker_channels) else None
            if channel is not None:
                try:
                    reply, extra = _ask_worker(channel, {"op": "offer"}, timeout=10)
                    adopted_pids = [int(pid) for pid in reply.get("pids", [])]
                    if len(extra) != len(adopted_pids) * len(MAP_NAMES):
                        raise ValueError(f"{len(extra)} fds for {len(adopted_pids)} adopted splicers")
                    pids += adopted_pids
                except (OSError, ValueError, TypeError) as exc:
                    if isinstance(exc, ConnectionError) and not extra:
                        # It drained and exited: its connections are gone, its maps (ours too) are empty.
                        log.info("splice: worker %d has exited: %s", index, exc)
                    else:
                        log.warning(
                            "splice: worker %d did not pass the maps it adopted (%s); "
                            "its spliced connections drain there",
                            index,
                            exc,
                        )
                    for fd in extra:
                        os.close(fd)
                    extra = []
                    # Not asked to hand over: its groups would not match the offer's.
                    self.worker_channels[index] = None
                    channel.close()
            link = splicer.sockops_link()
            units.append(
                {"cgroup": self._worker_cgroup_names()[index], "link": link is not None, "pids": pids}
            )
            offer.splice_fds += [link.fd] if link is not None else []
            offer.splice_fds += [m.fd for m in splicer.export_maps()] + extra
            offer.owned_fds += extra
            self._worker_groups.append(groups)
            self._worker_group_counts.append(len(pids))
            groups += len(pids)
        offer.splice = {"units": units}

    def _splice_offer(self) -> tuple[dict[str, Any], list[int]]:
        """In the trio thread: our SOCK_OPS link and the maps of our splicer and of those we adopted.

        The fds are ours; SCM_RIGHTS gives the successor its own.  The list of splicers is fixed here,
        and :meth:`_hand_over_spliced` refers to it.
        """
        splicer = self.splicer
        link = splicer.sockops_link()
        self._offered = [splicer, *splicer.adopted]
        fds = [link.fd] if link is not None else []
        for offered in self._offered:
            fds += [m.fd for m in offered.export_maps()]
        pids = [os.getpid(), *(offered.adopted_from for offered in self._offered[1:])]
        return {"link": link is not None, "pids": pids}, fds

    def _hand_over_spliced(self) -> tuple[list[dict[str, Any]], list[int]]:
        """In the handoff thread, once a splicing successor adopted everything: hand it our spliced
        connections, busy or not (:meth:`~sockpolicy.proxy._tcp._TcpSession.hand_over`)."""
        if self.worker_splicers:
            return self._hand_over_worker_spliced()
        if self.trio_token is None or not self._offered:
            return [], []
        metas: list[dict[str, Any]] = []
        fds: list[int] = []
        # hand_over() keeps a connection back only while its first switch to the kernel is in progress
        # (usually milliseconds): retry for a while.  Whatever is still kept then drains here.
        deadline = time.monotonic() + HAND_OVER_WINDOW
        while True:
            try:
                waiting = trio.from_thread.run_sync(
                    self._detach_spliced, metas, fds, trio_token=self.trio_token
                )
            except trio.RunFinishedError:
                break
            if not waiting or time.monotonic() >= deadline:
                _log_kept(waiting)
                break
            time.sleep(0.01)
        self.splicer.stats.handed_over += len(metas)
        return metas, fds

    def _hand_over_worker_spliced(self) -> tuple[list[dict[str, Any]], list[int]]:
        """``--workers``, in the handoff thread once a splicing successor adopted everything: every worker
        hands over its spliced connections (all asked at once, over their channels); the group
        indexes become the offer's (:meth:`_worker_splice_offer`)."""
        for splicer in self.worker_splicers:
            splicer.mark_exported()  # the successor holds the maps: keep the verdict attached at exit
        asked = []
        for index, channel in enumerate(self.worker_channels):
            if channel is None or index >= len(self._worker_groups):
                continue  # not in the offer: its connections drain there
            try:
                channel.settimeout(HAND_OVER_WINDOW + 10)
                channel.sendall(json.dumps({"op": "hand_over"}).encode())
            except OSError as exc:
                log.info("splice: worker %d was not asked for its spliced connections: %s", index, exc)
                continue
            asked.append(index)
        metas: list[dict[str, Any]] = []
        fds: list[int] = []
        for index in asked:
            got: list[int] = []
            try:
                reply, got = _worker_reply(self.worker_channels[index])  # type: ignore[arg-type]
                spliced = reply.get("spliced", [])
                if len(got) != 2 * len(spliced):
                    raise ValueError(f"{len(got)} fds for {len(spliced)} connections")
                groups = self._worker_group_counts[index]
                for meta in spliced:
                    if not 0 <= int(meta["splicer"]) < groups:
                        raise ValueError(f"group {meta['splicer']} of a connection was not offered")
                    meta["splicer"] = self._worker_groups[index] + int(meta["splicer"])
            except (OSError, ValueError, TypeError, KeyError) as exc:
                # A worker that exited meanwhile had nothing left (its connections ended); anything else
                # loses the connections it detached, so say so.
                log.warning("splice: worker %d handed over no spliced connections: %s", index, exc)
                for fd in got:
                    os.close(fd)
                continue
            metas += spliced
            fds += got
        return metas, fds

    def _close_channels(self) -> None:
        """Close the workers' channels, after the handoff thread (which uses them) has stopped."""
        if self.handoff is not None:
            self.handoff.close()
        channels, self.worker_channels = self.worker_channels, []
        for channel in channels:
            if channel is not None:
                channel.close()

    def _detach_spliced(self, metas: list[dict[str, Any]], fds: list[int]) -> list[str]:
        """In the trio thread: hand over what can go now (appended to ``metas`` and ``fds``); returns
        why each of the others stays, for now."""
        for splicer in self._offered:
            splicer.mark_exported()  # the successor holds the maps: keep the verdict attached at exit
        return _detach_spliced_sessions(self.splicer, self._offered, metas, fds)

    def _setup_metrics(self) -> None:
        from ._dispatcher import Dispatcher
        from ._metrics import Collector, MetricsServer, SnapshotReceiver, open_rules, snapshot

        config = self.config
        assert config.metrics is not None
        # Its own fds: the HTTP thread reads counters while the trio thread may change bindings.
        dispatcher = self.stack.enter_context(Dispatcher.open(create=False))
        if config.workers > 1:
            self.receiver = SnapshotReceiver()
            self.stack.callback(self.receiver.close)
            stats: Callable[[], list[dict[str, Any]]] = self.receiver.snapshots
        else:
            stats = lambda: [snapshot(s) for s in self.stats]  # noqa: E731
        collector = Collector(
            config.label, stats, dispatcher=dispatcher, rules=open_rules(), policy=lambda: self.policy
        )
        try:
            self.metrics = MetricsServer(config.metrics, collector)
        except OSError as exc:
            host, port = config.metrics
            raise ConfigError(f"--metrics {host}:{port}: cannot listen: {exc.strerror or exc}") from None
        self.stack.callback(self.metrics.close)

    def start_services(self) -> None:
        """Start the handoff, metrics and snapshot threads."""
        if self.handoff is not None:
            self.handoff.start()
        if self.metrics is not None:
            self.metrics.start()
        if self.receiver is not None:
            self.receiver.start()

    def close_in_child(self) -> None:
        """In a forked worker: close the inherited fds of the parent's services."""
        if self.handoff is not None:
            self.handoff.close_in_child()
        if self.metrics is not None:
            self.metrics.close_in_child()

    def begin_stop(self) -> None:
        """SIGTERM: from now on a successor may take the sockets."""
        if self.handoff is not None:
            self.handoff.stopping.set()

    def handed_off(self) -> bool:
        return self.handoff is not None and self.handoff.handed_off.is_set()

    def expire(self) -> bool:
        """The offer window is over: if nobody took the sockets, stop steering here (idempotent).

        :returns: whether the window is closed (False while a successor is taking over).
        """
        if self.expired:
            return True
        if self.handoff is not None and not self.handoff.try_expire():
            return self.handed_off()
        self.expired = True
        if self.steer is not None:
            self.steer.stop()  # new connections are refused from now on, not queued
        return True


def _dead_state(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    """The state file of a serve that died without cleaning up (``None`` if it is alive or absent)."""
    if not doc or not isinstance(doc.get("pid"), int):
        return None
    try:
        os.kill(doc["pid"], 0)
    except ProcessLookupError:
        log.info("taking over the bindings of serve pid %d, which died without removing them", doc["pid"])
        return doc
    except PermissionError:
        pass
    return None


def _socket_sets(
    config: ServeConfig,
    adopted: Adopted | None,
    before: Callable[[int], None] | None = None,
    cgroups: Sequence[str | None] = (),
) -> list[ListenSockets]:
    """One :class:`ListenSockets` per worker: adopted sockets first (spread over the workers), then new
    ones for whatever is missing, each joining the reuseport group of the first set.

    :param before: called with the worker's index before its new sockets are created (``--splice``:
        enter that worker's splice cgroup).
    :param cgroups: ``--splice``: per worker, the name of the splice cgroup ``before`` enters.  An adopted
        socket created in one of them is served by that worker, whose splicer enrols what it accepts; the
        other adopted sockets are then extra members of the workers' groups, so that every worker still
        gets a new socket of its own cgroup (without ``--splice`` they fill the missing ones first).
    """
    names = [*cgroups, *[None] * (config.workers - len(cgroups))]
    if adopted is None:
        sets: list[ListenSockets] = []
        try:
            for index in range(config.workers):
                if before is not None:
                    before(index)
                sets.append(create_sockets(config, like=sets[0] if sets else None))
                _record_cgroup(sets[-1], sets[-1].socks.values(), names[index])
        except BaseException:
            for s in sets:
                s.close()
            raise
        return sets
    wanted = {(proto, p.version) for proto in config.protos for p in config.addrs}
    sets = [ListenSockets() for _ in range(config.workers)]
    counts: dict[tuple[str, int], int] = {}
    origins = adopted.cgroups or [None] * len(adopted.sockets)
    homed = [
        (key, sock, cgroup, names.index(cgroup) if cgroup is not None and cgroup in names else None)
        for (key, sock), cgroup in zip(adopted.sockets, origins, strict=True)
        if key in wanted  # else steering unregisters the slot; the predecessor closes its copy
    ]
    splicing = any(name is not None for name in names)
    for key, sock, cgroup, home in sorted(homed, key=lambda item: item[3] is None):  # homed ones first
        sock.setblocking(False)
        if home is None:
            target = sets[counts.get(key, 0) % len(sets)]
            counts[key] = counts.get(key, 0) + 1
        else:
            target = sets[home]
        if key in target.socks or (home is None and splicing):
            target.extra.append((key, sock))
        else:
            target.socks[key] = sock
        _record_cgroup(target, [sock], cgroup)
    try:
        for index, target in enumerate(sets):
            if before is not None:
                before(index)
            fresh = create_sockets(config, like=_like(sets))
            for key, sock in fresh.socks.items():
                if key in target.socks:
                    sock.close()
                else:
                    target.socks[key] = sock
                    _record_cgroup(target, [sock], names[index])
    except BaseException:
        for s in sets:
            s.close()
        raise
    return sets


def _record_cgroup(sockets: ListenSockets, socks: Iterable[socket.socket], cgroup: str | None) -> None:
    if cgroup is not None:
        for sock in socks:
            sockets.cgroup_of[sock] = cgroup


def _like(sets: Sequence[ListenSockets]) -> ListenSockets | None:
    """One socket per key of all ``sets``: the ports new sockets bind to, joining their reuseport groups."""
    like = ListenSockets()
    for sockets in sets:
        for key, sock in sockets.items():
            like.socks.setdefault(key, sock)
    return like if like.socks else None


# --- --workers restart: the parent <-> worker channel -------------------------------------------------
#
# With ``--splice --workers N`` the parent holds every worker's SOCK_OPS link and splice maps (it opened
# them before forking) but the workers run the spliced connections.  For a restart the parent asks each
# worker over a SOCK_SEQPACKET socketpair made before the fork: ``{"op": "offer"}`` (the worker answers
# with the maps it adopted in an earlier restart) and ``{"op": "hand_over"}`` (its spliced
# connections, as a single-process serve hands over its own).  A reply is one JSON message with
# ``"nfds"``, followed by the fds in messages of at most FDS_PER_MESSAGE.

_CHANNEL_MSG = 1 << 20


def _ask_worker(
    channel: socket.socket, request: dict[str, Any], *, timeout: float
) -> tuple[dict[str, Any], list[int]]:
    """Parent side (blocking): send ``request`` and return the worker's reply and the fds it sent."""
    channel.settimeout(timeout)
    channel.sendall(json.dumps(request).encode())
    return _worker_reply(channel)


def _worker_reply(channel: socket.socket) -> tuple[dict[str, Any], list[int]]:
    from ._handoff import _recv_fds, _recv_listed

    reply, spliced = _recv_listed(channel, "spliced")
    if not isinstance(reply, dict):
        raise ConnectionError("the worker closed its channel (it has exited)")
    reply["spliced"] = spliced
    return reply, _recv_fds(channel, int(reply.get("nfds", 0)))


async def _send_to_parent(
    sock: trio.socket.SocketType, doc: dict[str, Any], fds: list[int], spliced: list[Any] | None = None
) -> None:
    """``doc``, then ``spliced`` in chunks (as :func:`sockpolicy._handoff._recv_listed` expects), then
    ``fds``."""
    from ._handoff import FDS_PER_MESSAGE, LIST_CHUNK

    items = spliced or []
    chunks = [items[start : start + LIST_CHUNK] for start in range(0, len(items), LIST_CHUNK)] or [[]]
    await sock.send(
        json.dumps({**doc, "spliced": chunks[0], "more": len(chunks) - 1, "nfds": len(fds)}).encode()
    )
    for chunk in chunks[1:]:
        await sock.send(json.dumps({"spliced": chunk}).encode())
    for start in range(0, len(fds), FDS_PER_MESSAGE):
        chunk = array.array("i", fds[start : start + FDS_PER_MESSAGE])
        await sock.sendmsg([b"fds"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, chunk)])


async def _serve_worker_channel(channel: socket.socket, splicer: Any, stopping: trio.Event) -> None:
    """In a ``--splice --workers`` worker: answer the parent's restart requests until it closes the channel.

    Requests are answered only once this worker has stopped accepting (the parent may ask a moment before
    the worker has seen its SIGTERM), and each one is shielded: the connections detached by a hand over
    end the worker's drain, which must not cancel the sending of their fds.
    """
    sock = trio.socket.from_stdlib_socket(channel)
    offered = [splicer]  # fixed by "offer": the groups whose connections "hand_over" may pass on
    try:
        while data := await sock.recv(_CHANNEL_MSG):
            await stopping.wait()
            request = json.loads(data)
            op = request.get("op") if isinstance(request, dict) else None
            with trio.CancelScope(shield=True):
                if op == "offer":
                    offered = [splicer, *splicer.adopted]
                    fds = [m.fd for other in offered[1:] for m in other.export_maps()]  # ours: not closed
                    await _send_to_parent(sock, {"pids": [other.adopted_from for other in offered[1:]]}, fds)
                elif op == "hand_over":
                    metas: list[dict[str, Any]] = []
                    fds = []
                    try:
                        await _collect_spliced(splicer, offered, metas, fds)
                        await _send_to_parent(sock, {}, fds, metas)
                    finally:
                        for fd in fds:
                            os.close(fd)  # duplicates: the parent has its own now, or the send failed
                    if metas:
                        log.info("splice: handed %d spliced connections to the parent", len(metas))
                else:
                    await _send_to_parent(sock, {"error": f"unknown request {op!r}"}, [])
    except (OSError, ValueError) as exc:
        log.warning("splice: the restart channel to the parent failed: %s", exc)


async def _collect_spliced(
    splicer: Any, offered: list[Any], metas: list[dict[str, Any]], fds: list[int]
) -> None:
    """Worker side of a hand over: detach what can go, retrying the rest for :data:`HAND_OVER_WINDOW`
    (as :meth:`Runtime._hand_over_spliced` does in a single-process serve)."""
    for each in offered:
        each.mark_exported()  # the successor holds the maps: keep the verdict attached at exit
    deadline = trio.current_time() + HAND_OVER_WINDOW
    while True:
        waiting = _detach_spliced_sessions(splicer, offered, metas, fds)
        if not waiting or trio.current_time() >= deadline:
            _log_kept(waiting)
            break
        await trio.sleep(0.01)
    splicer.stats.handed_over += len(metas)


def _detach_spliced_sessions(
    splicer: Any, offered: list[Any], metas: list[dict[str, Any]], fds: list[int]
) -> list[str]:
    """Hand over (:meth:`~sockpolicy.proxy._tcp._TcpSession.hand_over`) every spliced session of
    ``splicer`` that can go now, appending to ``metas`` and ``fds``; returns why each of the others stays,
    for now.  A session whose slots are in a group of maps that was not offered stays here (the
    successor could not find its slots)."""
    waiting: list[str] = []
    for session in list(splicer.sessions):
        if not session.splicing or session.end is not None or session.client_slot is None:
            continue  # relayed in userspace, ending, or handed over already
        if session.client_slot.splicer not in offered:
            continue
        got = session.hand_over()
        if got is None:
            waiting.append(session.kept_because)
            continue
        client_fd, upstream_fd, client, upstream = got
        metas.append(
            {
                "splicer": offered.index(client.splicer),
                "client": [client.cookie, client.slot, client.base],
                "upstream": [upstream.cookie, upstream.slot, upstream.base],
                # A socket that is already closed (both FINs, bytes still held) has no peer name.
                "conn": [session.conn.client, session.conn.original_dst, session.conn.upstream],
            }
        )
        fds += [client_fd, upstream_fd]
    return waiting


def _log_kept(waiting: list[str]) -> None:
    """One line for the spliced connections a hand-over kept back, with why."""
    if waiting:
        reasons = collections.Counter(waiting)
        log.info(
            "splice: %d spliced connections could not be handed over (%s); they drain here",
            len(waiting),
            ", ".join(f"{count} {why}" for why, count in reasons.most_common()),
        )


# --- trio side ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeInfo:
    """Handed to ``task_status.started()``: where the listening sockets ended up."""

    label: str
    addresses: dict[str, tuple[Any, ...]]


async def _report_long_lived(handle: ServeHandle, interval: float) -> None:
    while True:
        await trio.sleep(max(0.25, min(interval / 4, 5.0)))
        handle.stats.report_long_lived(interval)


async def run_worker(
    config: ServeConfig,
    sockets: ListenSockets,
    *,
    on_stop: Callable[[], Any] | None = None,
    runtime: Runtime | None = None,
    policy: Any = None,
    snapshot_sock: socket.socket | None = None,
    splicer: Any = None,
    channel: socket.socket | None = None,
    task_status: trio.TaskStatus[ServeInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy on ``sockets`` until SIGINT/SIGTERM, then drain and return.

    ``splicer``: a forked worker's own Splicer (``--splice --workers N``); with a ``runtime``, its
    splicer is used.  ``channel``: that worker's end of its restart channel to the parent
    (:func:`_serve_worker_channel`).

    SIGHUP reloads the policy file (:func:`reload_policy`).

    Stopping: the proxy stops accepting at once and gives open connections up to
    ``config.drain_timeout`` seconds (:meth:`ServeHandle.aclose <sockpolicy.proxy.ServeHandle.aclose>`).
    With a ``runtime`` (the process that owns the steering), the sockets stay open and registered for
    ``config.handoff_timeout`` seconds so that a successor can adopt them; if none does, the steering is
    removed then (``runtime.expire()``).  Without one, ``on_stop`` (if given) runs at once, which removes
    the steering right away.
    """
    from .proxy import serve

    if policy is None:
        policy = runtime.policy if runtime is not None else reloadable(config.policy)
    if runtime is not None:
        runtime.trio_token = trio.lowlevel.current_trio_token()  # for the handoff thread (splicing)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                functools.partial(
                    serve,
                    policy,
                    tcp_sockets=sockets.of("tcp"),
                    udp_sockets=sockets.of("udp"),
                    upstream=config.upstream,
                    label=config.label,
                    connect_timeout=config.connect_timeout,
                    splice=runtime.splicer if runtime is not None else splicer,
                )
            )
            if runtime is not None:
                runtime.stats.append(handle.stats)
            background = trio.CancelScope()
            stopping = trio.Event()

            async def side_tasks() -> None:
                with background:
                    async with trio.open_nursery() as side:
                        if channel is not None and splicer is not None:
                            side.start_soon(_serve_worker_channel, channel, splicer, stopping)
                        if config.conn_log_interval > 0:
                            side.start_soon(_report_long_lived, handle, config.conn_log_interval)
                        if snapshot_sock is not None:
                            from ._metrics import send_snapshots

                            side.start_soon(send_snapshots, snapshot_sock, handle.stats)

            nursery.start_soon(side_tasks)
            task_status.started(ServeInfo(config.label, sockets.addresses()))
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await reload_policy(config, policy)
                    continue
                log.info("%s: draining for up to %gs", signal.Signals(signum).name, config.drain_timeout)
                break
            handle.stop(config.drain_timeout)
            stopping.set()
            if runtime is not None:
                runtime.begin_stop()
                deadline = trio.current_time() + config.handoff_timeout
                while True:
                    if runtime.splicer is not None and runtime.handed_off():
                        # The listeners are the successor's now: stop enrolling what they accept.
                        runtime.splicer.stop_enrolling()
                    closed = runtime.handed_off() or (trio.current_time() >= deadline and runtime.expire())
                    if closed and handle.finished:
                        break
                    await trio.sleep(0.05)
            else:
                if on_stop is not None:
                    on_stop()
                await handle.aclose(config.drain_timeout)
            background.cancel()
    if splicer is not None:
        from .proxy._splice import QUARANTINE

        if not splicer.exported:
            # Let the last slots out of quarantine, so that the line below shows what was really left:
            # the first sweep puts the sockets that closed since the sweeper stopped (with the listeners)
            # into quarantine.  (Exported: the successor sweeps these maps now; two sweepers would race.)
            splicer.sweep()
            await trio.sleep(QUARANTINE)
            splicer.sweep()
        stats, entries = splicer.stats, splicer.entries()
        log.info(
            "splice: %d connections spliced (%d bytes), %d relayed in userspace (worker); "
            "left in the maps: socks=%d slot_of=%d owners=%d claimed=%d; %d adopted, %d handed over%s",
            stats.spliced,
            stats.bytes_spliced,
            stats.fallbacks,
            entries["socks"],
            entries["slot_of"],
            entries["owners"],
            entries["claimed"],
            stats.adopted,
            stats.handed_over,
            " (the successor has them)" if splicer.exported else "",
        )


async def run_serve(
    config: ServeConfig, *, task_status: trio.TaskStatus[ServeInfo] = trio.TASK_STATUS_IGNORED
) -> None:
    """Single-process ``serve``: setup (:class:`Runtime`), proxy, signals, drain, handoff; returns after a
    clean stop."""
    with Runtime(config) as runtime:
        runtime.start_services()
        await run_worker(config, runtime.socket_sets[0], runtime=runtime, task_status=task_status)


def serve_main(config: ServeConfig) -> int:
    """Synchronous entry point for the CLI; returns the exit status.

    With ``workers > 1`` the parent sets everything up once (sockets of every worker in one reuseport
    group, steering, handoff socket, metrics), forks N workers, forwards SIGINT/SIGTERM/SIGHUP to them,
    serves handoffs and metrics, and when every worker has exited (and the handoff window is over)
    removes the steering.  A worker dying on its own stops the others.
    """
    if config.workers == 1:
        trio.run(run_serve, config)
        return 0
    with Runtime(config) as runtime:
        return _run_workers(config, runtime)


def _run_workers(config: ServeConfig, runtime: Runtime) -> int:
    children: dict[int, int] = {}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP and not stopping:
            stopping = True
            runtime.begin_stop()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, forward) for s in handled}
    if runtime.worker_splicers:
        runtime.stack.callback(runtime._close_channels)
    try:
        for index, sockets in enumerate(runtime.socket_sets):
            snapshot_sock = runtime.receiver.add_worker(index) if runtime.receiver is not None else None
            parent_end = child_end = None
            if runtime.worker_splicers:
                parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
            if pid == 0:  # child: serve its own sockets only, never return into the CLI
                code = 1
                try:
                    for s, handler in old.items():
                        signal.signal(s, handler)
                    runtime.close_in_child()
                    for other in runtime.socket_sets:
                        if other is not sockets:
                            other.close()
                    for channel in [*runtime.worker_channels, parent_end]:
                        if channel is not None:
                            channel.close()  # the parent's ends
                    splicer = None
                    if runtime.worker_splicers:
                        for each in runtime.worker_splicers:
                            each.drop_links()  # the parent's fds keep (and end) the attachments
                        for other_index, each in enumerate(runtime.worker_splicers):
                            if other_index != index:
                                # Another worker's maps, and the connections and maps it adopted in a
                                # restart: this process must not hold them (a socket closes when its
                                # last fd does).
                                each.forget()
                        splicer = runtime.worker_splicers[index]
                        splicer.enter()  # its upstream connections must be enrolled in its maps
                    trio.run(
                        functools.partial(
                            run_worker,
                            config,
                            sockets,
                            policy=runtime.policy,
                            snapshot_sock=snapshot_sock,
                            splicer=splicer,
                            channel=child_end,
                        )
                    )
                    code = 0
                except BaseException:
                    log.exception("worker %d failed", index)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            if snapshot_sock is not None:
                snapshot_sock.close()
            if child_end is not None:
                child_end.close()
            runtime.worker_channels.append(parent_end)
            runtime.worker_pids.append(pid)
            children[pid] = index
            log.info("worker %d started (pid %d)", index, pid)
        for splicer in runtime.worker_splicers:
            # The connections and maps adopted in a restart are the workers' now: the parent's copies of
            # the sockets would keep them open after a worker closes them.
            splicer.forget_adopted()
        # The parent keeps its copies of the sockets: they are what it offers to a successor.
        runtime.start_services()
        status = 0
        deadline: float | None = None
        while True:
            while children:
                try:
                    pid, wait_status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    children.clear()
                    break
                if pid == 0:
                    break
                index = children.pop(pid, None)
                code = os.waitstatus_to_exitcode(wait_status)
                if code != 0 or not stopping:
                    log.error("worker %s (pid %d) exited with status %d; stopping", index, pid, code)
                    status = 1
                    forward(signal.SIGTERM, None)
            if stopping:
                if deadline is None:
                    deadline = time.monotonic() + config.handoff_timeout
                if runtime.handed_off():
                    # The listeners are the successor's now: stop enrolling what they accept.
                    for splicer in runtime.worker_splicers:
                        splicer.stop_enrolling()
                closed = runtime.handed_off() or (time.monotonic() >= deadline and runtime.expire())
                if closed and not children:
                    return status
            time.sleep(0.05)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
