"""The transports compared, behind one interface: send(bytes-like), recv() -> bytes-like (blocking),
poll() -> bytes-like or None (non-blocking). `pair()` builds both ends before the fork; each side
calls `open(side)` after it ("a" = parent, "b" = child)."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import socket
import struct
import tempfile
import uuid
import time

MAX_MSG = 16 << 20


class Transport:
    name = "?"
    busy_poll = True  # has a non-blocking receive

    def open(self, side: str) -> None:
        pass

    def send(self, data) -> None:
        raise NotImplementedError

    def recv(self):
        raise NotImplementedError

    def poll(self):
        raise NotImplementedError

    def close(self) -> None:
        pass


class MpPipe(Transport):
    name = "multiprocessing.Pipe"

    def __init__(self) -> None:
        self.a, self.b = mp.get_context("fork").Pipe(duplex=True)

    def open(self, side):
        self.c = self.a if side == "a" else self.b
        self.send, self.recv = self.c.send_bytes, self.c.recv_bytes  # bound directly, as for shmhub

    def poll(self):
        return self.c.recv_bytes() if self.c.poll(0) else None


class MpQueue(Transport):
    name = "multiprocessing.Queue"

    def __init__(self) -> None:
        ctx = mp.get_context("fork")
        self.q = (ctx.Queue(), ctx.Queue())

    def open(self, side):
        self.tx, self.rx = self.q if side == "a" else self.q[::-1]

    def send(self, data):
        self.tx.put(bytes(data))

    def recv(self):
        return self.rx.get()

    def poll(self):
        import queue

        try:
            return self.rx.get_nowait()
        except queue.Empty:
            return None


class SocketPair(Transport):
    """Raw AF_UNIX stream socketpair with a 4-byte length prefix."""

    name = "socketpair"

    def __init__(self) -> None:
        self.s = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s in self.s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    def open(self, side):
        self.sock = self.s[0] if side == "a" else self.s[1]
        self.buf = bytearray(MAX_MSG + 4)
        self.view = memoryview(self.buf)

    def send(self, data):
        self.sock.sendall(struct.pack("<I", len(data)))
        self.sock.sendall(data)

    def _exact(self, n):
        got = 0
        while got < n:
            k = self.sock.recv_into(self.view[got:n], n - got)
            if k == 0:
                raise EOFError
            got += k
        return self.view[:n]

    def recv(self):
        (n,) = struct.unpack("<I", self._exact(4))
        if n > len(self.buf):
            self.buf = bytearray(n)
            self.view = memoryview(self.buf)
        return self._exact(n)

    def poll(self):
        self.sock.setblocking(False)
        try:
            head = self.sock.recv(4, socket.MSG_PEEK)
        except BlockingIOError:
            return None
        finally:
            self.sock.setblocking(True)
        return self.recv() if len(head) == 4 else None


class Zmq(Transport):
    name = "pyzmq ipc PAIR"

    def __init__(self) -> None:
        import zmq  # noqa: F401  (fail early if missing)

        self.addr = f"ipc://{tempfile.gettempdir()}/shmhub-bench-{uuid.uuid4().hex}"

    def open(self, side):
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PAIR)
        self.sock.setsockopt(zmq.SNDHWM, 100000)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        (self.sock.bind if side == "a" else self.sock.connect)(self.addr)
        # bound directly, as for shmhub; copying (the default): copy=False would race the
        # sender's reuse of its buffer
        self.send, self.recv = self.sock.send, self.sock.recv

    def poll(self):
        try:
            return self.sock.recv(self.zmq.NOBLOCK)
        except self.zmq.Again:
            return None

    def close(self):
        self.sock.close(linger=0)
        self.ctx.term()


class FasterFifo(Transport):
    name = "faster-fifo"

    def __init__(self) -> None:
        from faster_fifo import Queue

        self.q = (Queue(max_size_bytes=64 << 20), Queue(max_size_bytes=64 << 20))

    def open(self, side):
        self.tx, self.rx = self.q if side == "a" else self.q[::-1]

    def send(self, data):
        self.tx.put(bytes(data), timeout=60)

    def recv(self):
        return self.rx.get(timeout=60)

    def poll(self):
        import queue

        try:
            return self.rx.get(block=False)
        except queue.Empty:
            return None


class Iceoryx2(Transport):
    """iceoryx2 publish-subscribe of byte slices with loans, plus its event service as wake-up."""

    name = "iceoryx2"

    def __init__(self) -> None:
        import iceoryx2  # noqa: F401

        self.tag = f"shmhub-bench/{uuid.uuid4().hex}"

    def open(self, side):
        import iceoryx2 as iox2

        self.iox2 = iox2
        iox2.set_log_level(iox2.LogLevel.Error)
        self.node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        mine, theirs = ("ab", "ba") if side == "a" else ("ba", "ab")

        def pubsub(direction):
            return (
                self.node.service_builder(iox2.ServiceName.new(f"{self.tag}/{direction}"))
                .publish_subscribe(iox2.Slice[ctypes.c_uint8])
                .max_publishers(1)
                .max_subscribers(1)
                .subscriber_max_buffer_size(4096)
                .history_size(0)
                .enable_safe_overflow(False)
                .open_or_create()
            )  # lossless, as every other transport

        def event(direction):
            return self.node.service_builder(iox2.ServiceName.new(f"{self.tag}/{direction}/event")).event().open_or_create()

        out_service = pubsub(mine)
        self.pub = (
            out_service.publisher_builder()
            .initial_max_slice_len(64)
            .allocation_strategy(iox2.AllocationStrategy.PowerOfTwo)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        self.sub = pubsub(theirs).subscriber_builder().create()
        self.notifier = event(mine).notifier_builder().create()
        self.listener = event(theirs).listener_builder().create()
        self.wait = iox2.Duration.from_millis(100)
        # history_size(0): a sample published before the peer's subscriber exists is lost, and the
        # handshake's first message would leave both sides waiting. Start once the peer is there.
        deadline = time.monotonic() + 60
        while out_service.dynamic_config.number_of_subscribers < 1:
            if time.monotonic() > deadline:
                raise TimeoutError("iceoryx2: the peer's subscriber did not appear within 60 s")
            time.sleep(0.001)
        self.pub.update_connections()

    def send(self, data):
        n = len(data)
        while True:
            try:
                sample = self.pub.loan_slice_uninit(n)
                break
            except Exception:  # all samples in flight: the subscriber has not caught up
                pass
        ctypes.memmove(sample.payload().data_ptr, bytes(data) if not isinstance(data, bytes) else data, n)
        sample.assume_init().send()
        self.notifier.notify()

    def poll(self):
        s = self.sub.receive()
        if s is None:
            return None
        out = bytes(s.payload().as_memory_view())
        s.delete()
        return out

    def recv(self):
        deadline = time.monotonic() + 60
        while True:
            m = self.poll()
            if m is not None:
                return m
            if time.monotonic() > deadline:  # the peer is gone: end instead of waiting forever
                raise TimeoutError("iceoryx2: nothing received for 60 s")
            self.listener.timed_wait(self.wait)

    def close(self):
        # delete every port, then the node, so iceoryx2 leaves nothing in /dev/shm
        for port in (self.pub, self.sub, self.notifier, self.listener):
            port.delete()
        del self.node


class Shmhub(Transport):
    """Not built by pair(): the parent is a shmhub Host and the child a spawned guest. The link's
    methods are bound directly; recv() of a large payload gives a zero-copy Message (len() and the
    buffer protocol; dropping it releases its memory)."""

    name = "shmhub"

    def __init__(self, link, size: int = 0) -> None:
        self.link = link
        self.send = link.send
        # payloads up to 256 B come as bytes (a copy, as from every baseline), larger ones zero-copy
        self.recv = link.recv_bytes if 0 < size <= 256 else link.recv
        self.poll = link.try_recv_bytes
        self.send_many = link.send_many
        self.recv_many = link.recv_many


BASELINES = {
    "pipe": MpPipe,
    "queue": MpQueue,
    "socketpair": SocketPair,
    "zmq": Zmq,
    "faster-fifo": FasterFifo,
    "iceoryx2": Iceoryx2,
}


def available() -> dict:
    """Baselines whose package imports here (the bench extra installs them all)."""
    out = {}
    for key, cls in BASELINES.items():
        try:
            if key == "zmq":
                import zmq  # noqa: F401
            elif key == "faster-fifo":
                import faster_fifo  # noqa: F401
            elif key == "iceoryx2":
                import iceoryx2  # noqa: F401
            out[key] = cls
        except ImportError:
            pass
    return out


def pin(cpu: int) -> None:
    """Pin this process to one CPU (each side of a pair gets its own core). Uses the machine's CPU
    count, not the inherited affinity: a child of a pinned parent starts pinned to the parent's core."""
    n = os.cpu_count() or 1
    if n >= 2:
        os.sched_setaffinity(0, {cpu % n})
