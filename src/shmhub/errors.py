"""The exception hierarchy of shmhub. Every error raised by the library derives from ShmhubError."""

import concurrent.futures


class ShmhubError(Exception):
    """Base class of every shmhub error."""


class ConfigError(ShmhubError, ValueError):
    """A SegmentConfig (or another setting) is invalid; the message says how to fix it."""


class SegmentError(ShmhubError):
    """A segment cannot be created or attached."""


class ResourceExhausted(ShmhubError, OSError):
    """The system refused a resource (errno ENOSPC, ENOMEM, EFBIG, EMFILE or ENFILE). Nothing was
    left half-done: the call may succeed once the resource is back. Built as (errno, message)."""


class InsufficientSharedMemory(SegmentError, ResourceExhausted):
    """The segment, or its growth, does not fit: no room in the shared-memory filesystem
    (ENOSPC, EFBIG past RLIMIT_FSIZE), no memory to map it (ENOMEM), or no fd to hold it (EMFILE)."""


class SegmentCorrupted(SegmentError):
    """The segment's bytes violate the v7 format (truncated, bad offsets, bad counts)."""


class BadMagic(SegmentCorrupted):
    """The file does not start with ROAMHUB\\x07 or TELXHUB\\x07."""


class UnsupportedVersion(SegmentCorrupted):
    """The segment has a version, header size or feature bit this library does not speak."""


class CredentialsRefused(ShmhubError, PermissionError):
    """Another user is at the other end: a bootstrap peer's SO_PEERCRED uid or a named segment's owner
    is not this process's euid nor explicitly allowed (docs/guides/security.md)."""


class ForeignSegment(SegmentError, CredentialsRefused):
    """A named segment opened for writing is owned by another uid (and not in allow_uids), or is
    writable by every user."""


class PeerError(ShmhubError):
    """A peer-table operation failed."""


class PeerTableFull(PeerError):
    """No Empty peer entry is left (max_guests reached)."""


class PeerStateError(PeerError):
    """A peer entry is not in the state the operation requires."""


class SlotError(ShmhubError):
    """A slot-pool operation failed."""


class DoubleFree(SlotError):
    """A slot was freed that is not allocated (DECISIONS 8)."""


class StaleSlotRef(SlotError):
    """A slot reference carries a generation that no longer matches the slot (DECISIONS 8)."""


class InvalidSlotRef(SlotError):
    """A slot reference points outside the pool (class, extent or slot index out of range)."""


class LinkError(ShmhubError):
    """A link between host and guest failed."""


class LinkCorrupted(LinkError):
    """A frame in a ring is malformed; the link is terminal (DECISIONS 6)."""


class LinkExhausted(LinkCorrupted, ResourceExhausted):
    """An mmap-tier mapping was lost because this process had no fd (EMFILE) or memory (ENOMEM) to
    take it: the payloads it carries can never be read, so the link is terminal like LinkCorrupted."""


class LinkClosed(LinkError):
    """The link was closed by this process."""


class PeerDead(LinkError):
    """The other end of the link died."""


class HostGone(LinkError):
    """The host said goodbye or died; no more messages will come."""


class BootstrapError(ShmhubError):
    """The socket bootstrap of a walk-in guest failed: connection, malformed frame, or wrong fds
    (format-v7 1.11, DECISIONS 17)."""


class BootstrapExhausted(BootstrapError, ResourceExhausted):
    """This process ran out of file descriptors (or memory) during the bootstrap: the host's fds
    were lost in transit and closed, and the host recovers the peer it reserved."""


class BootstrapRefused(BootstrapError):
    """The host answered the bootstrap request with an error response; the message is its diagnostic."""


class PeerCredentialsRefused(BootstrapRefused, CredentialsRefused):
    """The host refused this process's credentials (SO_PEERCRED uid and gid not allowed by its
    Host.listen(allow_uids=, allow_gids=)); the message is its diagnostic."""


class PayloadTooLarge(ShmhubError, ValueError):
    """A payload exceeds max_payload_size (or the largest tier available)."""


class ShmTimeout(ShmhubError, TimeoutError):
    """A blocking call did not complete within its timeout."""


class RpcError(ShmhubError):
    """Base class of the errors of shmhub.rpc."""


class RpcProtocolError(RpcError, LinkCorrupted):
    """A malformed RPC frame (truncated header, unknown kind or flags, a call id never issued,
    oversize): the RPC connection is terminal and every call in flight fails with this error."""


class DeadlineExceeded(RpcError, ShmTimeout):
    """An RPC call did not complete by its deadline (a TimeoutError)."""


class RemoteError(RpcError):
    """A handler raised an exception that cannot be rebuilt here (it does not unpickle, or the
    codec does not carry Python objects). type_name, message and traceback describe it."""

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return type(self), (self.type_name, self.message, self.traceback)

    def __str__(self) -> str:
        base = f"{self.type_name}: {self.message}" if self.message else self.type_name
        return f"{base}\n\nRemote traceback:\n{self.traceback}" if self.traceback else base


class MethodNotFound(RemoteError, LookupError):
    """The serving end has no handler of that name."""

    def __init__(self, type_name: str, message: str = "", traceback: str = "") -> None:
        super().__init__(type_name, message, traceback)


class ExecutorError(ShmhubError):
    """Base class of the errors of shmhub.Executor."""


class WorkerCrashed(ExecutorError):
    """The worker running this task died (killed, crashed, exited); the message gives its exit
    status or signal. Only the task it was running fails: tasks queued behind it run elsewhere."""


class TaskTimeout(ExecutorError, ShmTimeout):
    """The task was still running at its deadline (Executor.options(timeout=...)): its worker was
    killed and replaced (a TimeoutError)."""


class TaskStopped(ExecutorError):
    """Executor.stop() stopped this task while it ran: its worker was killed and replaced."""


class ExecutorBroken(ExecutorError, concurrent.futures.BrokenExecutor):
    """A worker's initializer failed: the executor takes no more tasks and fails those pending."""


class HttpError(ShmhubError):
    """Base class of the errors of shmhub.http."""


class HttpProtocolError(HttpError, RpcProtocolError):
    """Malformed HTTP metadata (truncated, unknown version, kind, flag or method code, bad
    lengths, trailing bytes), or a worker answering out of protocol. The front logs it, answers
    502 for that request and replaces the worker, as a terminal connection would be."""
