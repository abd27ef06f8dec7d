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
__all__ = ["Guest", "GuestHandle", "Host", "HostEvent", "Layout", "Link", "LinkStats", "Message", "Segment",
           "SegmentConfig", "SlotRef", "connect", "errors"]
__all__ += [n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception) and v.__module__ == errors.__name__]
