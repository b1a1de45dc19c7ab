"""Zero-downtime restart: passing a ``serve``'s listening sockets to its successor (SCM_RIGHTS).

The dispatcher steers a label's traffic to the *socket* registered in its SOCKMAP, not to a process.  A
restart therefore refuses no connection as long as that socket stays open from the moment the old process
stops accepting until the new one accepts: connections that arrive meanwhile wait in its backlog (UDP
datagrams in its receive queue).  The handoff keeps it open by giving the successor duplicates of the very
same sockets, so the registration never changes.

Protocol, on a ``SOCK_SEQPACKET`` unix socket at ``/run/sockpolicy/<netns inode>/handoff-<label>.sock``
(directory mode 0700; the server also checks that the peer is root or its own uid):

1. the successor sends ``{"op": "handoff", "label": L, "takeover": bool}``;
2. a server that is not stopping answers ``{"status": "busy", "pid": P}`` -- unless ``takeover`` is true
   (``sockpolicy reload``), in which case it stops itself first, exactly as on SIGTERM;
3. a stopping server (it no longer accepts) answers ``{"status": "ok", ...}`` with the sockets'
   metadata (protocol, family), the bindings it added and whether it loaded the dispatcher, followed by
   the sockets themselves in messages of at most :data:`FDS_PER_MESSAGE` fds;
4. the successor adopts them, takes over the steering, and sends ``{"op": "adopted"}``.  Only then does
   the old process consider the bindings handed over (it will not remove them); until then a failed
   successor changes nothing for it.

Splicing (``serve --splice``, docs/operations.md): a successor that splices says ``"splice": true`` in
its request.  A splicing server then adds, after the sockets, its SOCK_OPS link (which the successor
takes over with ``BPF_LINK_UPDATE``) and its splice maps (``"splice"`` in the reply describes them).
If the successor answers ``{"op": "adopted", "splice": true}``, the server hands over its spliced
connections: ``{"status": "bye", "spliced": [...], "more": k}``, ``k`` more ``{"spliced": [...]}``
messages (at most :data:`LIST_CHUNK` connections per message), then two socket fds per connection.  The
answer also names the splice cgroups the successor uses (``"cgroups"``), which the server then leaves in
place when it exits, even if no process is in them at that moment.

A successor also says how many workers it has (``"workers": M``); a ``--workers`` server splices with one
splicer per worker and offers them only to a successor that says so: ``"splice"`` in its reply then has
``"units"``, one per worker (its cgroup, whether its link follows, the pids whose maps follow).  Every
socket's metadata names the splice cgroup it was created in (``"cgroup"``, ``null`` if none), so that a
successor serves each adopted listening socket in the worker whose splicer enrols that cgroup.

Besides the socket, a small state file ``serve-<label>.json`` in the same directory records the bindings
a ``serve`` added, so that a ``serve`` started after its predecessor was killed (SIGKILL, OOM) takes over
their ownership and removes them when it stops.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_RUN_DIR",
    "Adopted",
    "HandoffBusy",
    "HandoffServer",
    "Offer",
    "read_state",
    "remove_state",
    "request_handoff",
    "run_dir",
    "socket_cookie",
    "write_state",
]

log = logging.getLogger("sockpolicy.handoff")

DEFAULT_RUN_DIR = "/run/sockpolicy"
FDS_PER_MESSAGE = 200  # the kernel accepts at most SCM_MAX_FD (253) fds per message
#: spliced connections per metadata message: a SOCK_SEQPACKET message must fit the sender's send buffer
#: (212992 bytes by default, else EMSGSIZE), and one connection's metadata takes up to about 130 bytes
LIST_CHUNK = 1000
_MAX_MSG = 1 << 20
SO_COOKIE = getattr(socket, "SO_COOKIE", 57)
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class HandoffBusy(Exception):
    """The label's current ``serve`` is running and was not asked to take over (``pid`` attribute)."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"pid {pid}")
        self.pid = pid


def run_dir(netns: str = "/proc/self/ns/net", root: str | os.PathLike[str] = DEFAULT_RUN_DIR) -> Path:
    """``/run/sockpolicy/<netns inode>``: where handoff sockets and serve state files live."""
    return Path(os.fspath(root)) / str(os.stat(netns).st_ino)


def _ensure_dir(path: Path) -> None:
    # Only root may connect: whoever gets the sockets can answer every steered connection.
    for d in (path.parent, path):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's socket cookie (what the dispatcher reports for a registered socket)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def _sock_path(directory: Path, label: str) -> Path:
    return directory / f"handoff-{label}.sock"


def _state_path(directory: Path, label: str) -> Path:
    return directory / f"serve-{label}.json"


# --- state file ------------------------------------------------------------------------------------------


def write_state(directory: Path, label: str, doc: dict[str, Any]) -> None:
    """Atomically write the serve state of ``label`` (pid, bindings it added, created flag)."""
    _ensure_dir(directory)
    path = _state_path(directory, label)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def read_state(directory: Path, label: str) -> dict[str, Any] | None:
    """The state file of ``label``, or ``None`` if missing or unreadable."""
    try:
        return json.loads(_state_path(directory, label).read_text())
    except (OSError, ValueError):
        return None


def remove_state(directory: Path, label: str, pid: int) -> None:
    """Remove the state file if it still belongs to ``pid`` (a successor may have rewritten it)."""
    doc = read_state(directory, label)
    if doc is not None and doc.get("pid") == pid:
        with contextlib.suppress(OSError):
            _state_path(directory, label).unlink()


# --- server (the running serve) -------------------------------------------------------------------------


@dataclass
class Offer:
    """What a stopping ``serve`` hands over.

    :ivar sockets: ``((proto, family version), socket)`` pairs: every listening/UDP socket it has.
    :ivar added: the bindings it added (as ``{"proto", "prefix", "ports", "label"}`` dicts).
    :ivar created: whether it (or a predecessor it took over from) loaded the dispatcher.
    """

    sockets: list[tuple[tuple[str, int], socket.socket]]
    added: list[dict[str, str]] = field(default_factory=list)
    created: bool = False
    #: splicing state for a splicing successor: ``{"link": bool, "pids": [...]}`` (see :data:`splice_fds`)
    splice: dict[str, Any] | None = None
    #: the SOCK_OPS link fd (if ``splice["link"]``), then the maps of each splicer in ``splice["pids"]``
    splice_fds: list[int] = field(default_factory=list)
    #: the splice cgroup each socket was created in (``None``: none, or not known), same order as sockets
    cgroups: list[str | None] = field(default_factory=list)
    #: fds of ``splice_fds`` that are this offer's own (received from a worker): closed once sent
    owned_fds: list[int] = field(default_factory=list)


class HandoffServer:
    """Answers handoff requests for one label in a thread (so it works with and without trio).

    :param offer: called when a successor asks while we are stopping, with whether it splices and its
        worker count (``None``: it did not say); returns the :class:`Offer`.
    :param request_stop: called for a ``takeover`` request while we are running (sends us SIGTERM).
    :param hand_over_spliced: called once a splicing successor has adopted everything; returns the
        spliced connections' metadata and their socket fds (two per connection, the caller's to close).
    """

    def __init__(
        self,
        directory: Path,
        label: str,
        offer: Callable[[bool, int | None], Offer],
        request_stop: Callable[[], None],
        hand_over_spliced: Callable[[], tuple[list[dict[str, Any]], list[int]]] | None = None,
    ) -> None:
        self.label = label
        self.path = _sock_path(directory, label)
        self._offer = offer
        self._request_stop = request_stop
        self._hand_over_spliced = hand_over_spliced
        #: the successor took our splicing state (link, maps) and so our spliced connections
        self.spliced_to: int | None = None
        #: the splice cgroups the successor uses (names, from its ``adopted`` answer): not ours to remove
        self.successor_cgroups: list[str] = []
        self.stopping = threading.Event()
        self.handed_off = threading.Event()
        self.expired = False
        # Held from sending the offer until the successor's answer, so that the offer window cannot
        # expire (and the bindings be removed) while a successor is taking them over.
        self._busy = threading.Lock()
        self._closed = threading.Event()
        _ensure_dir(directory)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            sock.bind(os.fspath(tmp))
            os.chmod(tmp, 0o600)
            sock.listen(8)
            # rename() replaces a predecessor's socket file atomically: a successor asking at any
            # moment reaches either the old server or this one, never nothing.
            os.replace(tmp, self.path)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        sock.settimeout(0.2)
        self._sock = sock
        self._inode = os.stat(self.path).st_ino
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start answering in a thread (after any fork: a forked child has no threads)."""
        self._thread = threading.Thread(target=self._run, name=f"handoff-{self.label}", daemon=True)
        self._thread.start()

    def close_in_child(self) -> None:
        """In a forked worker: drop the inherited listening fd, touch nothing else."""
        self._sock.close()

    def try_expire(self) -> bool:
        """End the offer unless a handoff is in progress or done; ``True`` if it ended now or before."""
        if not self._busy.acquire(blocking=False):
            return False
        try:
            if self.handed_off.is_set():
                return False
            self.expired = True
            return True
        finally:
            self._busy.release()

    def close(self) -> None:
        """Stop answering; remove the socket file unless a successor's has replaced it."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    def _run(self) -> None:
        while not self._closed.is_set() and not self.handed_off.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                continue
            with conn:
                try:
                    self._serve_one(conn)
                except Exception as exc:  # a broken successor must not take the server down
                    log.warning("handoff request failed: %s", exc)

    def _serve_one(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        pid, uid, _ = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid not in (0, os.getuid(), os.geteuid()):
            log.warning("refusing a handoff request from pid %d (uid %d)", pid, uid)
            _send(conn, {"status": "denied"})
            return
        request = json.loads(conn.recv(_MAX_MSG) or b"null")
        if (
            not isinstance(request, dict)
            or request.get("op") != "handoff"
            or request.get("label") != self.label
        ):
            _send(conn, {"status": "error", "message": f"this server hands over label {self.label!r} only"})
            return
        if not self.stopping.is_set():
            if not request.get("takeover"):
                _send(conn, {"status": "busy", "pid": os.getpid()})
                return
            log.info("pid %d asks to take over label %r: stopping", pid, self.label)
            self._request_stop()
            if not self.stopping.wait(10):
                _send(conn, {"status": "busy", "pid": os.getpid()})
                return
        with self._busy:
            if self.expired:
                _send(conn, {"status": "expired"})
                return
            workers = request.get("workers")
            workers = workers if isinstance(workers, int) and not isinstance(workers, bool) else None
            self._hand_over(conn, pid, bool(request.get("splice")), workers)

    def _hand_over(self, conn: socket.socket, pid: int, splice: bool, workers: int | None = None) -> None:
        offer = self._offer(splice, workers)
        try:
            cgroups = offer.cgroups or [None] * len(offer.sockets)
            keys = [
                {"proto": proto, "family": version, "cgroup": cgroup}
                for ((proto, version), _), cgroup in zip(offer.sockets, cgroups, strict=True)
            ]
            fds = [s.fileno() for _, s in offer.sockets] + offer.splice_fds
            _send(
                conn,
                {
                    "status": "ok",
                    "pid": os.getpid(),
                    "sockets": keys,
                    "added": offer.added,
                    "created": offer.created,
                    "splice": offer.splice,
                    "nsplice": len(offer.splice_fds),
                },
            )
            _send_fds(conn, fds)
        finally:
            for fd in offer.owned_fds:
                os.close(fd)
        reply = json.loads(conn.recv(_MAX_MSG) or b"null")
        if isinstance(reply, dict) and reply.get("op") == "adopted":
            log.info("pid %d adopted %d sockets of label %r", pid, len(keys), self.label)
            cgroups = reply.get("cgroups")
            if isinstance(cgroups, list):
                self.successor_cgroups = [c for c in cgroups if isinstance(c, str)]
            self.handed_off.set()
            spliced: list[dict[str, Any]] = []
            conn_fds: list[int] = []
            if reply.get("splice") and offer.splice is not None and self._hand_over_spliced is not None:
                self.spliced_to = pid
                spliced, conn_fds = self._hand_over_spliced()
            try:
                _send_listed(conn, {"status": "bye"}, "spliced", spliced)
                _send_fds(conn, conn_fds)
            finally:
                for fd in conn_fds:
                    os.close(fd)
            if spliced:
                log.info("handed %d spliced connections to pid %d", len(spliced), pid)
        else:
            log.warning("pid %d did not adopt the sockets of label %r; keeping them", pid, self.label)


def _send(conn: socket.socket, doc: dict[str, Any]) -> None:
    conn.sendall(json.dumps(doc).encode())


def _send_listed(conn: socket.socket, doc: dict[str, Any], key: str, items: list[Any]) -> None:
    """Send ``doc`` with ``items`` as its ``key``, split over ``1 + doc["more"]`` messages of at most
    :data:`LIST_CHUNK` items (:func:`_recv_listed` joins them)."""
    chunks = [items[start : start + LIST_CHUNK] for start in range(0, len(items), LIST_CHUNK)] or [[]]
    _send(conn, {**doc, key: chunks[0], "more": len(chunks) - 1})
    for chunk in chunks[1:]:
        _send(conn, {key: chunk})


def _recv_listed(conn: socket.socket, key: str) -> tuple[Any, list[Any]]:
    """Receive what :func:`_send_listed` sent: the first message (``None`` if the channel closed) and the
    whole list under ``key``."""
    doc = json.loads(conn.recv(_MAX_MSG) or b"null")
    if not isinstance(doc, dict):
        return doc, []
    items = list(doc.get(key) or [])
    for _ in range(int(doc.get("more", 0))):
        part = json.loads(conn.recv(_MAX_MSG) or b"null")
        if not isinstance(part, dict):
            raise ConnectionError("the handoff channel closed in the middle of a list")
        items += part.get(key) or []
    return doc, items


def _send_fds(conn: socket.socket, fds: list[int]) -> None:
    for start in range(0, len(fds), FDS_PER_MESSAGE):
        socket.send_fds(conn, [b"fds"], fds[start : start + FDS_PER_MESSAGE])


def _recv_fds(conn: socket.socket, count: int) -> list[int]:
    """Receive ``count`` fds sent by :func:`_send_fds`; on failure close what arrived and raise."""
    received: list[int] = []
    try:
        while len(received) < count:
            _, fds, _, _ = socket.recv_fds(conn, 16, FDS_PER_MESSAGE)
            if not fds:
                raise ConnectionError("the running serve closed the handoff channel")
            received += fds
    except BaseException:
        for fd in received:
            os.close(fd)
        raise
    return received


# --- client (the successor) ----------------------------------------------------------------------------


@dataclass
class Adopted:
    """Sockets received from a predecessor; :meth:`confirm` tells it the handoff is complete.

    :ivar sockets: ``((proto, version), socket)`` pairs, now owned by the caller.
    """

    pid: int
    sockets: list[tuple[tuple[str, int], socket.socket]]
    added: list[dict[str, str]]
    created: bool
    _conn: socket.socket
    #: the predecessor's splicing state, if it splices and we asked: ``{"link": bool, "pids": [...]}``
    splice: dict[str, Any] | None = None
    #: its fds (SOCK_OPS link first if ``splice["link"]``, then 6 maps per pid); taken by whoever uses them
    splice_fds: list[int] = field(default_factory=list)
    #: set before :meth:`confirm`: we took the splicing state, so ask for the spliced connections
    take_splice: bool = False
    #: filled by :meth:`confirm`: the spliced connections ``(metadata, client, upstream)`` we received
    spliced: list[tuple[dict[str, Any], socket.socket, socket.socket]] = field(default_factory=list)
    #: the splice cgroup each socket was created in (``None``: none, or the predecessor did not say)
    cgroups: list[str | None] = field(default_factory=list)
    #: set before :meth:`confirm`: the splice cgroups we use, which the predecessor must not remove
    splice_cgroups: list[str] = field(default_factory=list)

    def cookies(self) -> set[int]:
        return {socket_cookie(s) for _, s in self.sockets}

    def confirm(self) -> None:
        """Tell the predecessor that the sockets and bindings are ours now; close the channel.

        With :attr:`take_splice` it then hands over its spliced connections (:attr:`spliced`).
        """
        self.spliced = self._confirm()

    def _confirm(self) -> list[tuple[dict[str, Any], socket.socket, socket.socket]]:
        try:
            _send(self._conn, {"op": "adopted", "splice": self.take_splice, "cgroups": self.splice_cgroups})
            _, spliced = _recv_listed(self._conn, "spliced")
            fds = _recv_fds(self._conn, 2 * len(spliced)) if spliced else []
        except (OSError, ValueError) as exc:
            # The bindings are ours already (the predecessor set handed_off before answering).
            log.warning("handoff: the predecessor's spliced connections did not arrive: %s", exc)
            return []
        finally:
            self._conn.close()
        socks = [socket.socket(fileno=fd) for fd in fds]
        return [(meta, socks[2 * i], socks[2 * i + 1]) for i, meta in enumerate(spliced)]

    def abandon(self) -> None:
        """Give up (the predecessor keeps everything); close what was received."""
        self._conn.close()
        for _, s in self.sockets:
            s.close()
        self.close_splice_fds()

    def close_splice_fds(self) -> None:
        """Close the splicing fds nobody took (idempotent)."""
        fds, self.splice_fds = self.splice_fds, []
        for fd in fds:
            os.close(fd)


def request_handoff(
    directory: Path,
    label: str,
    *,
    takeover: bool = False,
    splice: bool = False,
    workers: int = 1,
    timeout: float = 30,
) -> Adopted | None:
    """Ask the running ``serve`` of ``label`` for its sockets (and, with ``splice``, its splicing state).

    :param workers: our worker count (a ``--workers`` predecessor offers its splicing state per worker).

    :returns: ``None`` if no ``serve`` of the label is listening for handoffs.
    :raises HandoffBusy: it is running and not stopping (and ``takeover`` is false).
    :raises OSError: the exchange failed half-way.
    """
    path = _sock_path(directory, label)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(timeout)
    try:
        conn.connect(os.fspath(path))
    except OSError as exc:
        conn.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
            return None  # nobody there (a socket file left by a process that died is refused)
        raise
    received: list[socket.socket] = []
    extra: list[int] = []
    try:
        _send(
            conn,
            {"op": "handoff", "label": label, "takeover": takeover, "splice": splice, "workers": workers},
        )
        reply = json.loads(conn.recv(_MAX_MSG) or b"null")
        if not isinstance(reply, dict):
            raise ConnectionError("the running serve closed the handoff channel")
        if reply.get("status") == "busy":
            raise HandoffBusy(int(reply.get("pid", 0)))
        if reply.get("status") != "ok":
            raise ConnectionError(f"handoff refused: {reply}")
        keys = reply["sockets"]
        nsplice = int(reply.get("nsplice", 0))
        fds = _recv_fds(conn, len(keys) + nsplice)
        received = [socket.socket(fileno=fd) for fd in fds[: len(keys)]]
        extra = fds[len(keys) :]
        pairs = [((k["proto"], int(k["family"])), s) for k, s in zip(keys, received, strict=True)]
        return Adopted(
            int(reply["pid"]),
            pairs,
            list(reply.get("added", [])),
            bool(reply.get("created")),
            conn,
            splice=reply.get("splice") if nsplice else None,
            splice_fds=extra,
            cgroups=[k.get("cgroup") if isinstance(k.get("cgroup"), str) else None for k in keys],
        )
    except BaseException:
        for s in received:
            s.close()
        for fd in extra:
            os.close(fd)
        conn.close()
        raise
