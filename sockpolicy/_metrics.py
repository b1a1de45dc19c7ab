"""Prometheus metrics of ``sockpolicy serve --metrics ADDR:PORT``.

Nothing is counted twice: the proxy keeps plain integer counters (:class:`~sockpolicy.proxy.ServeStats`),
the kernel keeps its own (the dispatcher's per-label ``lookups``/``misses``/``errors``, the kernel rules'
per-rule message and byte counts), and :class:`Collector` reads all of them when Prometheus scrapes.  So
the hot path pays nothing for metrics, and a scrape always sees the kernel's current numbers.

With ``--workers N`` each worker sends a :func:`snapshot` of its counters to the parent once a second
(:class:`SnapshotReceiver`) and the parent's endpoint serves their sum: one endpoint per ``serve``.

Metric names and labels are listed in docs/operations.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

if TYPE_CHECKING:
    from .proxy import ServeStats

__all__ = [
    "Collector",
    "MetricsServer",
    "RuleTotals",
    "SnapshotReceiver",
    "merge",
    "open_rules",
    "send_snapshots",
    "snapshot",
]

log = logging.getLogger("sockpolicy.metrics")

#: How often a worker sends its counters to the parent (seconds).
SNAPSHOT_INTERVAL = 1.0

_BYTE_FIELDS = ("bytes_from_client", "bytes_to_upstream", "bytes_from_upstream", "bytes_to_client")
_PLAIN_FIELDS = (
    "connections_accepted",
    "connections_active",
    "connections_closed",
    "errors",
    "inspect_timeouts",
    "datagrams_dropped",
    "bytes_spliced",
    *_BYTE_FIELDS,
)


def snapshot(stats: ServeStats) -> dict[str, Any]:
    """The counters of one server as plain JSON-able data (safe to call from another thread)."""
    doc: dict[str, Any] = {name: int(getattr(stats, name, 0)) for name in _PLAIN_FIELDS}
    # dict() of a dict runs no Python code, so it is atomic under the GIL even while the trio thread
    # adds keys; iterating the Counter directly could fail with "dictionary changed size".
    doc["verdicts"] = dict(dict(stats.verdicts))
    doc["callback_verdicts"] = [[cb, kind, n] for (cb, kind), n in dict(stats.callback_verdicts).items()]
    doc["upstream_failures"] = dict(dict(stats.upstream_failures))
    doc["by_proto"] = dict(dict(stats.connections_by_proto))
    return doc


def merge(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum snapshots (of several workers, or of several servers in one process)."""
    total: dict[str, Any] = {name: 0 for name in _PLAIN_FIELDS}
    total.update(verdicts={}, callback_verdicts={}, upstream_failures={}, by_proto={})
    for snap in snapshots:
        for name in _PLAIN_FIELDS:
            total[name] += int(snap.get(name, 0))
        for key in ("verdicts", "upstream_failures", "by_proto"):
            for k, n in snap.get(key, {}).items():
                total[key][k] = total[key].get(k, 0) + n
        for cb, kind, n in snap.get("callback_verdicts", []):
            total["callback_verdicts"][cb, kind] = total["callback_verdicts"].get((cb, kind), 0) + n
    return total


class Collector:
    """A prometheus-client collector that reads every source at scrape time.

    :param label: the ``serve --label``; every proxy metric carries it.
    :param stats: returns the current snapshots of this serve's proxies (one per worker).
    :param dispatcher: an open :class:`~sockpolicy._dispatcher.Dispatcher` (its own fds: it is read from
        the HTTP server's thread), or ``None``.
    :param rules: returns an open rules ``Enforcer`` or ``None`` when no kernel rules are loaded.
    :param policy: returns the live policy, for per-rule matches of TOML policies and reload counts.
    """

    def __init__(
        self,
        label: str,
        stats: Callable[[], list[dict[str, Any]]],
        *,
        dispatcher: Any = None,
        rules: Callable[[], Any] | None = None,
        policy: Callable[[], Any] | None = None,
    ) -> None:
        self.label = label
        self.stats = stats
        self.dispatcher = dispatcher
        self.rules = rules
        self.policy = policy
        self.lock = threading.Lock()  # one scrape at a time: the dispatcher object is not thread-safe
        self._rule_totals = RuleTotals()

    def describe(self) -> list[Metric]:
        # No up-front description: the families depend on what is loaded (prometheus-client then
        # calls collect() once at registration, which is harmless).
        return []

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            yield from self._proxy(merge(self.stats()))
            yield from self._policy()
            yield from self._dispatcher()
            yield from self._rules()

    def _proxy(self, s: dict[str, Any]) -> Iterator[Metric]:
        lbl = [self.label]
        conns = CounterMetricFamily(
            "sockpolicy_connections", "TCP connections and UDP flows accepted", labels=["label", "proto"]
        )
        for proto in ("tcp", "udp"):
            conns.add_metric([self.label, proto], s["by_proto"].get(proto, 0))
        yield conns
        active = GaugeMetricFamily(
            "sockpolicy_connections_active", "connections and flows being served", labels=["label"]
        )
        active.add_metric(lbl, s["connections_active"])
        yield active
        verdicts = CounterMetricFamily(
            "sockpolicy_verdicts",
            "verdicts applied, by kind (callbacks and defaults)",
            labels=["label", "verdict"],
        )
        for kind, n in sorted(s["verdicts"].items()):
            verdicts.add_metric([self.label, kind], n)
        yield verdicts
        per_cb = CounterMetricFamily(
            "sockpolicy_callback_verdicts",
            "verdicts returned by each policy callback",
            labels=["label", "callback", "verdict"],
        )
        for (cb, kind), n in sorted(s["callback_verdicts"].items()):
            per_cb.add_metric([self.label, cb, kind], n)
        yield per_cb
        errors = CounterMetricFamily(
            "sockpolicy_connection_errors",
            "connections closed by a callback error, an oversized or malformed message, or an I/O error",
            labels=["label"],
        )
        errors.add_metric(lbl, s["errors"])
        yield errors
        timeouts = CounterMetricFamily(
            "sockpolicy_inspect_timeouts", "callbacks that overran inspect_timeout", labels=["label"]
        )
        timeouts.add_metric(lbl, s["inspect_timeouts"])
        yield timeouts
        upstream = CounterMetricFamily(
            "sockpolicy_upstream_connect_failures",
            "failed upstream connects (the client is reset)",
            labels=["label", "reason"],
        )
        for reason in ("refused", "timeout", "error"):
            upstream.add_metric([self.label, reason], s["upstream_failures"].get(reason, 0))
        yield upstream
        proxied = CounterMetricFamily(
            "sockpolicy_bytes_proxied",
            "payload bytes through the userspace relay",
            labels=["label", "direction"],
        )
        for name in _BYTE_FIELDS:
            proxied.add_metric([self.label, name.removeprefix("bytes_")], s[name])
        yield proxied
        spliced = CounterMetricFamily(
            "sockpolicy_bytes_spliced", "payload bytes moved by kernel splicing", labels=["label"]
        )
        spliced.add_metric(lbl, s["bytes_spliced"])
        yield spliced
        dropped = CounterMetricFamily(
            "sockpolicy_udp_datagrams_dropped", "datagrams dropped (queue full, truncated)", labels=["label"]
        )
        dropped.add_metric(lbl, s["datagrams_dropped"])
        yield dropped

    def _policy(self) -> Iterator[Metric]:
        policy = self.policy() if self.policy is not None else None
        if policy is None:
            return
        reloads = CounterMetricFamily(
            "sockpolicy_policy_reloads", "policy reloads on SIGHUP", labels=["label", "result"]
        )
        for result in ("ok", "failed"):
            reloads.add_metric([self.label, result], getattr(policy, "reloads", {}).get(result, 0))
        yield reloads
        hits = getattr(getattr(policy, "current", policy), "rule_hits", None)
        if hits is not None:
            fam = CounterMetricFamily(
                "sockpolicy_policy_rule_matches",
                "connections matched by each rule of the TOML policy in force",
                labels=["label", "rule", "action"],
            )
            for (rule, action), n in sorted(dict(hits).items()):
                fam.add_metric([self.label, rule, action], n)
            yield fam

    def _dispatcher(self) -> Iterator[Metric]:
        if self.dispatcher is None:
            return
        try:
            counters = self.dispatcher.counters()
            unmatched = self.dispatcher.unmatched()
        except Exception as exc:  # unloaded meanwhile, ...: the proxy metrics are still worth serving
            log.debug("cannot read the dispatcher counters: %s", exc)
            return
        names = {
            "lookups": "sk_lookup runs that matched a binding of the label",
            "misses": "matched lookups refused because the label had no socket",
            "errors": "matched lookups refused because the kernel refused the socket assignment",
        }
        for key, doc in names.items():
            fam = CounterMetricFamily(f"sockpolicy_dispatcher_{key}", doc, labels=["label"])
            for label, values in sorted(counters.items()):
                fam.add_metric([label], values.get(key, 0))
            yield fam
        fam = CounterMetricFamily(
            "sockpolicy_dispatcher_unmatched", "sk_lookup runs that matched no binding (normal lookup)"
        )
        fam.add_metric([], unmatched)
        yield fam

    def _rules(self) -> Iterator[Metric]:
        # Kernel per-message rules (sockpolicy._rules): per rule, messages judged and their bytes, as
        # totals over every generation (see RuleTotals).
        enforcer = self.rules() if self.rules is not None else None
        if enforcer is None:
            return
        try:
            gen = self._rule_totals.update(enforcer)
        except Exception as exc:
            log.debug("cannot read the kernel rule counters: %s", exc)
            return
        msgs = CounterMetricFamily(
            "sockpolicy_kernel_rule_messages",
            "verdicts of each kernel rule (one per sendmsg, apply_bytes window, filled cork or frame), "
            "summed over rule-set generations",
            labels=["rule", "verdict"],
        )
        nbytes = CounterMetricFamily(
            "sockpolicy_kernel_rule_bytes",
            "bytes covered by the verdicts of each kernel rule, summed over rule-set generations",
            labels=["rule", "verdict"],
        )
        for (name, verdict), (m, b) in sorted(self._rule_totals.totals().items()):
            msgs.add_metric([name, verdict], m)
            nbytes.add_metric([name, verdict], b)
        yield msgs
        yield nbytes
        active = GaugeMetricFamily(
            "sockpolicy_kernel_rule_generation", "the active kernel rule-set generation (0: none loaded)"
        )
        active.add_metric([], gen)
        yield active


class RuleTotals:
    """Per-rule counters of the kernel rules summed over rule-set generations, so that they only grow.

    The kernel counts per generation: ``Enforcer.replace`` writes a new rule set into a free slot of a
    ring of :data:`~sockpolicy._rules.N_SLOTS` with zeroed counters, and whoever replaces later harvests
    (reads, zeroes and frees) retired slots, once per ``N_SLOTS - 1`` replacements.  A Prometheus counter
    must not fall at each replacement, so each scrape reads every live slot (the active generation and
    the retired ones not yet harvested), remembers the highest numbers seen per generation, and folds a
    generation into a running base once its slot is gone.  Rules are identified by name (an unnamed rule
    is ``rule-N``, N counted from 1) and verdict: a rule kept across replacements continues its series;
    ``(default)`` counts the messages no rule matched.

    What is not seen is not counted: traffic of a generation between the last scrape and the harvest of
    its slot, which needs ``N_SLOTS - 1`` replacements (or ``Enforcer.flush()``) between two scrapes.
    """

    def __init__(self) -> None:
        self._base: dict[tuple[str, str], tuple[int, int]] = {}
        self._seen: dict[int, dict[tuple[str, str], tuple[int, int]]] = {}

    def update(self, enforcer: Any) -> int:
        """Read the live slots of ``enforcer``; returns the active generation (0: none)."""
        # The slot walk needs the ring's layout, which Enforcer keeps private (it only exposes the active
        # generation and its own harvests); reading is lock-free, as the kernel programs read it.
        from . import _rules

        live: dict[int, dict[tuple[str, str], tuple[int, int]]] = {}
        active = 0
        for slot in range(_rules.N_SLOTS):
            meta = enforcer._meta(slot)
            state = meta[7]
            if state not in (_rules._STATE_ACTIVE, _rules._STATE_RETIRED):
                continue
            stats = enforcer._read_stats(slot, meta, final=False)
            if enforcer._meta(slot)[7:9] != meta[7:9]:
                continue  # harvested or reused while we read it: the next scrape sees the new state
            if state == _rules._STATE_ACTIVE:
                active = stats.gen
            counts: dict[tuple[str, str], tuple[int, int]] = {}
            for r in (*stats.rules, stats.unmatched):
                name = r.name or f"rule-{(r.index or 0) + 1}"  # RuleSet names unnamed rules so itself
                key = (name, str(r.verdict))
                m, b = counts.get(key, (0, 0))
                counts[key] = (m + r.msgs, b + r.bytes)
            live[stats.gen] = counts
        for gen, counts in live.items():
            before = self._seen.get(gen)
            if before is not None and any(
                counts.get(k, (0, 0))[0] < v[0] or counts.get(k, (0, 0))[1] < v[1] for k, v in before.items()
            ):
                # Lower than already seen: a new rules state reusing the number (unload, enforce).
                self._fold(before)
                before = None
            merged = dict(counts)
            for k, v in (before or {}).items():
                cur = merged.get(k, (0, 0))
                merged[k] = (max(cur[0], v[0]), max(cur[1], v[1]))
            self._seen[gen] = merged
        for gen in [g for g in self._seen if g not in live]:
            self._fold(self._seen.pop(gen))  # harvested: its numbers are final
        return active

    def _fold(self, counts: dict[tuple[str, str], tuple[int, int]]) -> None:
        for k, (m, b) in counts.items():
            bm, bb = self._base.get(k, (0, 0))
            self._base[k] = (bm + m, bb + b)

    def totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        """``(rule, verdict) -> (messages, bytes)`` over every generation seen."""
        out = dict(self._base)
        for counts in self._seen.values():
            for k, (m, b) in counts.items():
                om, ob = out.get(k, (0, 0))
                out[k] = (om + m, ob + b)
        return out


def open_rules() -> Callable[[], Any]:
    """A getter for the kernel rules enforcer of this namespace, opened now if loaded, else on demand.

    Opened eagerly so that the fds survive a privilege drop; while nothing is loaded each scrape tries
    again (which only succeeds while the process still may open pinned objects).  Each call also checks
    that the pinned state is still the one opened: after ``sockpolicy enforce --unload`` (and a new
    ``enforce``) the old fds would show the frozen counters of maps nobody uses any more.
    """
    holder: dict[str, Any] = {}

    def get() -> Any:
        enforcer = holder.get("enforcer")
        if enforcer is not None and not _same_rules_state(enforcer):
            log.info("kernel rules were unloaded or loaded anew: reopening them for the metrics")
            enforcer.close()
            del holder["enforcer"]
        if "enforcer" not in holder:
            try:
                from ._rules import Enforcer

                holder["enforcer"] = Enforcer.open()
            except Exception:  # not loaded, no permission, or the rules module is not there
                return None
        return holder["enforcer"]

    get()
    return get


def _same_rules_state(enforcer: Any) -> bool:
    """Whether the pinned rules state is still the one ``enforcer`` has open (True if it cannot tell)."""
    from . import _errors
    from ._objects import Map

    if enforcer.directory is None:
        return True
    try:
        pinned = Map.from_pin(enforcer.directory / "config")
    except _errors.KeyNotFound:
        return False  # unloaded
    except OSError:
        return True  # e.g. privileges dropped: keep what we have (see docs/operations.md)
    with pinned:
        return bool(pinned.id == enforcer.map("config").id)


class MetricsServer:
    """The HTTP endpoint: prometheus-client's WSGI app on a threaded server.

    The port is bound by the constructor (before a privilege drop, so ports below 1024 work) and served
    from :meth:`start` on (after any fork).
    """

    def __init__(self, addr: tuple[str, int], collector: Collector) -> None:
        from wsgiref.simple_server import make_server

        from prometheus_client import make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)  # type: ignore[arg-type]
        host, port = addr
        server_class = ThreadingWSGIServer
        if ":" in host:
            server_class = type(
                "ThreadingWSGIServer6", (ThreadingWSGIServer,), {"address_family": socket.AF_INET6}
            )
        self._server = make_server(
            host, port, make_wsgi_app(self.registry), server_class, handler_class=_SilentHandler
        )
        self.address = self._server.server_address[:2]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics on http://%s/metrics", _fmt(self.address))

    def close_in_child(self) -> None:
        self._server.socket.close()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def _fmt(addr: tuple[Any, ...]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


# --- workers -> parent ----------------------------------------------------------------------------------


class SnapshotReceiver:
    """Parent side of ``--workers``: the latest counter snapshot of each worker, read by a thread.

    Each worker gets one end of a ``socketpair`` (:meth:`add_worker`) and sends a JSON datagram of its
    snapshot every :data:`SNAPSHOT_INTERVAL` seconds and once more when it stops.
    """

    def __init__(self) -> None:
        self.latest: dict[int, dict[str, Any]] = {}
        self._socks: dict[int, socket.socket] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add_worker(self, index: int) -> socket.socket:
        """A socketpair for worker ``index``: returns the worker's end (the parent keeps the other)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        theirs.setblocking(False)  # a worker never waits for the parent: a lost snapshot is replaced
        self._socks[index] = ours
        return theirs

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics-snapshots", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import selectors

        with selectors.DefaultSelector() as sel:
            for index, sock in self._socks.items():
                sel.register(sock, selectors.EVENT_READ, index)
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.2):
                    with contextlib.suppress(OSError, ValueError):
                        self.latest[key.data] = json.loads(key.fileobj.recv(1 << 20))  # type: ignore[union-attr]

    def snapshots(self) -> list[dict[str, Any]]:
        return list(self.latest.values())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock in self._socks.values():
            sock.close()


async def send_snapshots(sock: socket.socket, stats: ServeStats) -> None:
    """Worker side: send :func:`snapshot` of ``stats`` every second until cancelled, and once at the end."""
    import trio

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.send(json.dumps(snapshot(stats)).encode())

    try:
        while True:
            send()
            await trio.sleep(SNAPSHOT_INTERVAL)
    finally:
        send()
