"""shmhub: inter-process communication through shared memory (roam v7 layout)."""

from . import errors
from .errors import *  # noqa: F401,F403
from .layout import Layout, SegmentConfig
from ._native import Message
from .guest import Guest, connect
from .host import GuestHandle, Host, HostEvent
from .link import Link, LinkStats
from .segment import Segment
from .slots import SlotRef

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name == "Executor":  # imported on first use: it pulls in rpc and multiprocessing
        from .executor import Executor

        return Executor
    raise AttributeError(f"module 'shmhub' has no attribute {name!r}")


__all__ = [
    "Executor",
    "Guest",
    "GuestHandle",
    "Host",
    "HostEvent",
    "Layout",
    "Link",
    "LinkStats",
    "Message",
    "Segment",
    "SegmentConfig",
    "SlotRef",
    "connect",
    "errors",
]
__all__ += [n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception) and v.__module__ == errors.__name__]
