"""Public home of the framers (also re-exported from :mod:`sockpolicy.proxy`)."""

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

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Framer",
    "FramingError",
    "HttpHeadFramer",
    "LengthPrefixFramer",
    "LineFramer",
    "MessageTooLarge",
    "RawFramer",
]
