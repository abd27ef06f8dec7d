"""ASGI and WSGI type aliases, named once (as starlette/types.py does)."""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Iterable, MutableMapping, Optional, Tuple

__all__ = ["ASGIApp", "Address", "Headers", "Message", "Receive", "Scope", "Send", "StartResponse", "WSGIApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Headers = Tuple[Tuple[bytes, bytes], ...]  # ASGI: lower-case names, repeats kept, in order
Address = Optional[Tuple[str, int]]
