"""Orchestration behind ``sockpolicy serve``: config, sockets, steering, proxy, signals, workers.

The code is layered so that most of it runs without privileges:

* :class:`ServeConfig` — validation of every CLI input (pure, apart from the ``ip route get`` locality
  check); nothing touches the kernel's BPF state until a config exists.
* :func:`create_sockets` — plain listening sockets (unprivileged).
* :func:`steering` — **the only kernel-touching part**: opens the dispatcher, adds the bindings,
  registers the sockets, and on exit removes exactly what it added (unloading the dispatcher again if
  this process created it and nothing else uses it).
* :func:`run_serve` / :func:`run_worker` — the trio side: proxy, SIGINT/SIGTERM, draining.
* :func:`serve_main` — the synchronous entry point used by the CLI, including ``--workers`` forking.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
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
    from .proxy import Policy

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
LOG_LEVELS = ("debug", "info", "warning", "error")
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

    def all(self) -> list[socket.socket]:
        return list(self.socks.values())

    def of(self, proto: str) -> list[socket.socket]:
        """The sockets of one protocol, IPv4 first."""
        return [s for (p, _), s in sorted(self.socks.items()) if p == proto]

    def addresses(self) -> dict[str, tuple[Any, ...]]:
        """``{"tcp4": ("127.0.0.1", port), ...}`` for logs and tests."""
        return {f"{p}{v}": s.getsockname() for (p, v), s in sorted(self.socks.items())}

    def close(self) -> None:
        for s in self.socks.values():
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
    """The bindings and socket registrations one ``serve`` made; :meth:`stop` undoes them."""

    def __init__(self, dispatcher: Dispatcher, created: bool) -> None:
        self.dispatcher = dispatcher
        self.created = created
        self.added: list[Any] = []
        self.stopped = False

    def stop(self) -> None:
        """Remove the bindings (new connections stop being steered); idempotent.

        Removal errors are logged, not raised: this runs on the way out, often after another error.
        """
        if self.stopped:
            return
        self.stopped = True
        for binding in reversed(self.added):
            try:
                self.dispatcher.remove_binding(binding)
            except Exception as exc:
                log.warning("could not remove binding %s: %s", binding, exc)
        self.added.clear()
        if self.created:
            try:
                if not self.dispatcher.bindings():
                    self.dispatcher.unload()
            except Exception as exc:
                log.warning("could not unload the dispatcher: %s", exc)


@contextlib.contextmanager
def steering(config: ServeConfig, sockets: ListenSockets) -> Iterator[Steering]:
    """KERNEL-TOUCHING: steer the config's bindings to ``sockets``; undo everything on exit.

    If anything fails half-way (a binding already exists, the kernel lacks SK_LOOKUP, ...), the
    bindings added so far are removed and a dispatcher this call loaded is unloaded again, so a failed
    ``serve`` leaves nothing attached or pinned.
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
            # sockmap drops closed sockets, so a registered socket means a live process.
            if dispatcher.sockets().get(config.label):
                raise ConfigError(
                    f"label {config.label!r} is already being served by another process; "
                    "stop it first, or use another --label (or --workers N for more processes)"
                )
            # add_binding is a no-op for an identical existing binding; such a binding belongs to
            # whoever made it (e.g. an earlier 'sockpolicy bind'), so it is neither recorded nor removed.
            existing = set(dispatcher.bindings())
            for proto, prefix, ports, label in config.bindings():
                binding = Binding(proto, prefix, ports, label)
                if binding in existing:
                    continue
                dispatcher.add_binding(binding)
                state.added.append(binding)
            for sock in sockets.all():
                dispatcher.register_socket(config.label, sock)
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


# --- trio side ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeInfo:
    """Handed to ``task_status.started()``: where the listening sockets ended up."""

    label: str
    addresses: dict[str, tuple[Any, ...]]


async def run_worker(
    config: ServeConfig,
    sockets: ListenSockets,
    *,
    on_stop: Callable[[], None] | None = None,
    task_status: trio.TaskStatus[ServeInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy on ``sockets`` until SIGINT/SIGTERM, then drain and return.

    Draining: ``on_stop`` (if given) runs first so that the dispatcher stops steering new connections
    here; then the proxy stops accepting and gives open connections up to ``config.drain_timeout``
    seconds (:meth:`ServeHandle.aclose <sockpolicy.proxy.ServeHandle.aclose>`).
    """
    from .proxy import Policy, serve

    policy = config.policy if config.policy is not None else Policy()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                functools.partial(
                    serve,
                    policy,
                    tcp_sockets=sockets.of("tcp"),
                    udp_sockets=sockets.of("udp"),
                    upstream=config.upstream,
                    label=config.label,
                )
            )
            task_status.started(ServeInfo(config.label, sockets.addresses()))
            async for signum in signals:
                log.info("%s: draining for up to %gs", signal.Signals(signum).name, config.drain_timeout)
                break
            if on_stop is not None:
                on_stop()
            await handle.aclose(config.drain_timeout)


async def run_serve(
    config: ServeConfig, *, task_status: trio.TaskStatus[ServeInfo] = trio.TASK_STATUS_IGNORED
) -> None:
    """Single-process ``serve``: sockets, steering, proxy, signals, drain; returns after a clean stop."""
    sockets = create_sockets(config)
    try:
        with steering(config, sockets) as steer:
            await run_worker(config, sockets, on_stop=steer.stop, task_status=task_status)
    finally:
        sockets.close()


def serve_main(config: ServeConfig) -> int:
    """Synchronous entry point for the CLI; returns the exit status.

    With ``workers > 1`` the parent creates every worker's sockets first (all in one reuseport
    group), sets up steering once, forks the workers, and forwards SIGINT/SIGTERM to them.  When
    every worker has exited it removes the steering.  A worker dying on its own stops the others.
    """
    if config.workers == 1:
        trio.run(run_serve, config)
        return 0

    socket_sets = [create_sockets(config)]
    try:
        socket_sets += [create_sockets(config, like=socket_sets[0]) for _ in range(config.workers - 1)]
        with steering(config, socket_sets[0]) as steer:
            return _run_workers(config, socket_sets, steer)
    finally:
        for s in socket_sets:
            s.close()


def _run_workers(config: ServeConfig, socket_sets: list[ListenSockets], steer: Steering) -> int:
    children: dict[int, int] = {}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            steer.stop()  # no new connections while the workers drain
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for index, sockets in enumerate(socket_sets):
            pid = os.fork()
            if pid == 0:  # child: serve its own sockets only, never return into the CLI
                code = 1
                try:
                    for s, handler in old.items():
                        signal.signal(s, handler)
                    for other in socket_sets:
                        if other is not sockets:
                            other.close()
                    trio.run(run_worker, config, sockets)
                    code = 0
                except BaseException:
                    log.exception("worker %d failed", index)
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            children[pid] = index
            log.info("worker %d started (pid %d)", index, pid)
        for sockets in socket_sets:
            sockets.close()  # the workers hold their own copies
        status = 0
        while children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            index = children.pop(pid, None)
            code = os.waitstatus_to_exitcode(wait_status)
            if code != 0 or not stopping:
                log.error("worker %s (pid %d) exited with status %d; stopping", index, pid, code)
                status = 1
                forward(signal.SIGTERM, None)
        return status
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
