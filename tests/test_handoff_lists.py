"""The handoff passes long lists of spliced connections (``sockpolicy._handoff``), unprivileged.

A ``SOCK_SEQPACKET`` message must fit the sender's send buffer (212992 bytes by default): the list of
handed-over connections travels in chunks, else a restart with a few thousand spliced connections could
not send it and would close them all.  Real unix sockets and fds; no BPF.
"""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sockpolicy._handoff import LIST_CHUNK, HandoffServer, Offer, request_handoff

COUNT = 3000  # about 300 KB of metadata: well over the default send buffer


@pytest.fixture
def nofile() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * COUNT + 1000  # the server's duplicates and the client's received fds, both at once
    if hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_thousands_of_spliced_connections_cross_in_chunks(tmp_path: Path, nofile: None) -> None:
    a, b = socket.socketpair()
    metas: list[dict[str, Any]] = [
        {"splicer": 0, "client": [2**63 + i, i, 1], "upstream": [2**63 + COUNT + i, COUNT + i, 1]}
        for i in range(COUNT)
    ]
    handed: list[int] = []

    def hand_over() -> tuple[list[dict[str, Any]], list[int]]:
        fds = [a.fileno() if i % 2 else b.fileno() for i in range(2 * COUNT)]
        handed.append(len(fds))
        return metas, [os.dup(fd) for fd in fds]  # the server closes them once sent

    directory = tmp_path / "run"
    server = HandoffServer(
        directory, "t", lambda splice, workers: Offer([], splice={"link": False, "pids": []}), lambda: None,
        hand_over,
    )  # fmt: skip
    server.stopping.set()
    server.start()
    adopted = None
    try:
        adopted = request_handoff(directory, "t", splice=True, timeout=30)
        assert adopted is not None
        adopted.take_splice = True
        adopted.confirm()
        assert handed == [2 * COUNT]
        assert [meta for meta, _, _ in adopted.spliced] == metas
        assert len(metas) > LIST_CHUNK
        # Each received socket is a duplicate of the one sent in its place.
        inode = {os.fstat(sock.fileno()).st_ino: name for sock, name in ((a, "a"), (b, "b"))}
        assert {(inode[os.fstat(c.fileno()).st_ino], inode[os.fstat(u.fileno()).st_ino])
                for _, c, u in adopted.spliced} == {("b", "a")}  # fmt: skip
    finally:
        if adopted is not None:
            for _, client, upstream in adopted.spliced:
                client.close()
                upstream.close()
        server.close()
        a.close()
        b.close()
