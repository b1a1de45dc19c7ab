"""The sockpolicy L7 proxy: trio, verdict callbacks per connection and per message, upstreams.

Public API::

    from sockpolicy.proxy import Policy, Pass, Drop, Redirect, Rewrite, Close, serve

    policy = Policy()

    @policy.on_connect(ports="8000-8999")
    def only_loopback(conn):
        return Pass() if conn.client[0].startswith("127.") else Drop()

    handle = await nursery.start(serve, policy, tcp_sockets=[listener], upstream=("127.0.0.1", None))

Everything else lives in private modules and may change.
"""

from ._connection import Connection, Direction, Message
from ._context import ServeStats
from ._framers import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Framer,
    FramingError,
    HttpHeadFramer,
    LengthPrefixFramer,
    LineFramer,
    MessageTooLarge,
    RawFramer,
)
from ._policy import Policy
from ._serve import ServeHandle, serve
from ._splice import Splicer, SpliceStats, SpliceUnavailable
from ._verdicts import Close, Drop, Pass, Redirect, Rewrite, Splice, Verdict

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Close",
    "Connection",
    "Direction",
    "Drop",
    "Framer",
    "FramingError",
    "HttpHeadFramer",
    "LengthPrefixFramer",
    "LineFramer",
    "Message",
    "MessageTooLarge",
    "Pass",
    "Policy",
    "RawFramer",
    "Redirect",
    "Rewrite",
    "ServeHandle",
    "ServeStats",
    "Splice",
    "SpliceStats",
    "SpliceUnavailable",
    "Splicer",
    "Verdict",
    "serve",
]

# Present public names as living here (as trio does), so reprs and docs point at the public path.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith(__name__ + "._"):
        _obj.__module__ = __name__
del _name, _obj
