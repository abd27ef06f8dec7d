"""The worker process: a guest serving the task protocol (docs/executor.md) until the executor
closes its link. Tasks run one at a time, in the order they arrive, on the connection's reader
thread (rpc.inline): no hand-off between threads, and the executor knows which task runs -- the
oldest it has sent and not had answered."""

from __future__ import annotations

import socket
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .. import _crash, rpc
from ..errors import ExecutorBroken
from ..guest import connect
from ..rpc._protocol import encode_error
from ._shared import TaskCodec, WorkerRegions

__all__ = ["main"]


_init_error: Optional[BaseException] = None  # tasks are refused once the initializer failed
_ERRORS = TaskCodec()  # how run_batch encodes a task's exception (pickled, with its traceback)


def _check_init() -> None:
    if _init_error is not None:
        raise ExecutorBroken(f"this worker's initializer failed: {_init_error!r}")


class _Init:
    """The worker's initializer, run by the first call the executor makes."""

    def __init__(self, initializer: Optional[Callable[..., Any]], initargs: Tuple[Any, ...]) -> None:
        self.initializer, self.initargs = initializer, initargs

    def __call__(self) -> int:
        import os

        global _init_error
        if self.initializer is not None:
            try:
                self.initializer(*self.initargs)
            except BaseException as e:
                _init_error = e
                raise
        return os.getpid()


@rpc.inline
def run(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]]) -> Any:
    _check_init()
    _crash.point(b"executor.task")
    out = fn(*args, **kwargs) if kwargs else fn(*args)
    _crash.point(b"executor.done")
    return out


@rpc.inline
def run_chunk(fn: Callable[..., Any], chunk: Sequence[Tuple[Any, ...]]) -> List[Any]:
    """A chunk of map(): its results in order (the first exception fails the whole chunk, as in
    ProcessPoolExecutor.map)."""
    _check_init()
    return [fn(*args) for args in chunk]


@rpc.inline
def run_batch(tasks: Sequence[Tuple[Callable[..., Any], Tuple[Any, ...], Optional[Dict[str, Any]]]]) -> Iterator[Tuple[bool, Any]]:
    """Several tasks in one call (docs/executor.md): one item per task, in order, as each ends --
    (True, result) or (False, its ERROR payload) -- so the executor still knows which task runs.
    At most STREAM_WINDOW tasks: an inline stream never waits for credit (its reader runs it)."""
    _check_init()
    for fn, args, kwargs in tasks:
        _crash.point(b"executor.task")
        try:
            out = fn(*args, **kwargs) if kwargs else fn(*args)
        except BaseException as e:  # as the server answers a lone task's: this task alone fails
            yield False, encode_error(e, _ERRORS)
            continue
        _crash.point(b"executor.done")
        yield True, out
        del out


def main(initializer: Optional[Callable[..., Any]], initargs: Tuple[Any, ...], fd_sock: socket.socket, preload: Iterable[str] = ()) -> None:
    """Entry point in the child (Host.start_process)."""
    import importlib

    for name in preload:  # already imported in a forkserver's template: then this costs nothing
        importlib.import_module(name)
    link = connect()
    regions = WorkerRegions(fd_sock)
    regions.install()

    @rpc.inline
    def retire() -> None:
        link.close()  # serve() returns: the reader's next recv finds the link closed

    handlers = {"init": rpc.inline(_Init(initializer, initargs)), "run": run, "run_chunk": run_chunk, "run_batch": run_batch, "retire": retire}
    with rpc.Server(handlers, codec=TaskCodec(), max_concurrency=1) as server:
        server.serve(link)
    link.close()
    fd_sock.close()


def serve_remote(url: str, **options: Any) -> None:
    """`shmhub worker URL`: join the executor listening at tcp://HOST:PORT (Executor(listen=...))
    and run its tasks until it closes the link or is gone. options go to shmhub.connect (CURVE
    keys, liveness, name, timeout). The initializer comes with the init call."""
    from ..remote import connect as connect_remote

    options.setdefault("name", "worker")
    link = connect_remote(url, **options)

    @rpc.inline
    def init(initializer: Optional[Callable[..., Any]], initargs: Tuple[Any, ...]) -> int:
        return _Init(initializer, initargs)()

    @rpc.inline
    def retire() -> None:
        link.close()

    handlers = {"init": init, "run": run, "run_chunk": run_chunk, "run_batch": run_batch, "retire": retire}
    try:
        with rpc.Server(handlers, codec=TaskCodec(), max_concurrency=1) as server:
            server.serve(link)
    finally:
        link.close()
