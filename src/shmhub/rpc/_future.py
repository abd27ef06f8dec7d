"""LazyFuture: a concurrent.futures.Future that makes its Condition only when something waits."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any, Callable, List, Optional

_PENDING, _RUNNING, _FINISHED = cf._base.PENDING, cf._base.RUNNING, cf._base.FINISHED
_CANCELLED, _CANCELLED_AND_NOTIFIED = cf._base.CANCELLED, cf._base.CANCELLED_AND_NOTIFIED
DONE = frozenset((_CANCELLED, _CANCELLED_AND_NOTIFIED, _FINISHED))

_MAKE_LOCK = threading.Lock()  # a LazyFuture's Condition is made, or its state set without one


class _MadeOnUse:
    """LazyFuture._condition: made on first use (with the waiter list), then an instance attribute,
    which shadows this non-data descriptor: later uses cost a plain attribute read."""

    def __get__(self, fut: "Optional[LazyFuture]", owner: Any = None) -> threading.Condition:
        if fut is None:
            return self  # type: ignore[return-value]  # on the class: the descriptor itself
        with _MAKE_LOCK:
            cond = fut._cond
            if cond is None:
                fut._waiters = fut._make_waiters()
                cond = fut._cond = fut._condition = threading.Condition()
        return cond


class LazyFuture(cf.Future):  # type: ignore[type-arg]
    """A Future (rpc's submit(), the executor's tasks) whose Condition and waiter list are made
    when something first uses them (a waiter, a callback, wait() or as_completed()): a future
    settled before anyone waits never needs one, and making one was 40% of an executor submit().
    Until then the state moves under _MAKE_LOCK, which making them also takes: whoever makes them
    finds the state as it was set. done(), running(), cancelled() and the result of a settled
    future read the state without a lock (it only moves forward)."""

    def __init__(self) -> None:  # cf.Future.__init__'s fields (a test checks), bar the two made later
        self._cond: Optional[threading.Condition] = None
        self._state = _PENDING
        self._result: Any = None
        self._exception: Optional[BaseException] = None
        self._done_callbacks: List[Callable[["cf.Future[Any]"], object]] = []

    def make_condition(self) -> threading.Condition:
        """Its Condition, made now if not yet: for a future of a crowd, whose Conditions wait() or
        as_completed() would otherwise make all at once while holding every future's Condition
        (the threads that settle them stall meanwhile: 15% of an executor's rate, 30,000 tasks)."""
        return self._condition

    def _make_waiters(self) -> List[Any]:
        """The waiter list that concurrent.futures.wait() and as_completed() append to."""
        return []

    _condition = _MadeOnUse()

    def _set_bare(self, result: Any, exc: Optional[BaseException]) -> bool:
        """Settle it while it has no Condition (so no waiter and no callback): False if it has one
        now (the caller takes the Condition's path)."""
        with _MAKE_LOCK:
            if self._cond is not None:
                return False
            if self._state in DONE:
                raise cf.InvalidStateError(f"{self._state}: {self!r}")
            self._result, self._exception, self._state = result, exc, _FINISHED
            return True

    def set_result(self, result: Any) -> None:
        if self._cond is None and self._set_bare(result, None):
            return
        super().set_result(result)

    def set_exception(self, exception: Optional[BaseException]) -> None:
        if self._cond is None and self._set_bare(None, exception):
            return
        super().set_exception(exception)

    def set_running_or_notify_cancel(self) -> bool:
        if self._cond is None:
            with _MAKE_LOCK:
                if self._cond is None:
                    if self._state == _PENDING:
                        self._state = _RUNNING
                        return True
                    if self._state == _CANCELLED:
                        self._state = _CANCELLED_AND_NOTIFIED
                        return False
                    raise RuntimeError(f"Future in unexpected state: {self._state}")
        return super().set_running_or_notify_cancel()

    def done(self) -> bool:
        return self._state in DONE

    def running(self) -> bool:
        return self._state == _RUNNING

    def cancelled(self) -> bool:
        return self._state in (_CANCELLED, _CANCELLED_AND_NOTIFIED)

    def result(self, timeout: Optional[float] = None) -> Any:
        if self._state == _FINISHED and self._exception is None:
            return self._result
        return super().result(timeout)
