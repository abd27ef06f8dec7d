"""Benchmark scenarios. Each has a parent side (`a`, measures) and a child side (`b`, serves and
verifies). Both sides run the same code for every transport."""

from __future__ import annotations

import struct
import time

from .scale_guest import drop

STOP = b"!"  # a 1-byte message ends a phase (payloads are never 1 byte)
REPORT = struct.Struct("<QQ")  # messages seen, errors


# -- ping-pong --------------------------------------------------------------------------------


def pingpong_a(t, p):
    payload = bytes(p["size"])
    busy = p["busy"]
    lat = []
    end_warm = time.perf_counter() + p["warmup"]
    deadline = end_warm + p["seconds"]
    now = time.perf_counter_ns
    while True:
        t0 = now()
        t.send(payload)
        if busy:
            while t.poll() is None:
                pass
        else:
            t.recv()
        t1 = now()
        if t1 / 1e9 >= end_warm:
            lat.append(t1 - t0)
            if t1 / 1e9 >= deadline or len(lat) >= p["max_rounds"]:
                break
    t.send(STOP)
    lat.sort()
    return {
        "rounds": len(lat),
        "median_us": lat[len(lat) // 2] / 1e3,
        "p99_us": lat[int(len(lat) * 0.99)] / 1e3,
        "p10_us": lat[len(lat) // 10] / 1e3,
        "p90_us": lat[int(len(lat) * 0.9)] / 1e3,
    }


def pingpong_b(t, p):
    busy = p["busy"]
    while True:
        if busy:
            m = t.poll()
            while m is None:
                m = t.poll()
        else:
            m = t.recv()
        if len(m) == 1:
            return
        t.send(m)


# -- one-way streaming ------------------------------------------------------------------------

SEQ = struct.Struct("<Q")  # the sequence number in a payload's first 8 bytes
LAST = struct.Struct("<B")


def stream_a(t, p):
    size, seconds = p["size"], p["seconds"]
    batch = p.get("batch", 0)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    i = 0
    if batch:
        import numpy as np

        # a (batch, size) array of messages, one per row; send_many sends its rows
        rows = np.zeros((batch, size), dtype=np.uint8)
        seq = np.ndarray((batch,), dtype="<u8", buffer=rows, strides=(size,))
        step = np.arange(batch, dtype=np.uint64)
        while time.perf_counter() < deadline:
            seq[:] = step + i
            rows[:, -1] = (step + i) & 0xFF
            t.send_many(rows)
            i += batch
    elif p.get("zero_copy"):
        # shmhub's reserve/send_reserved: the sender writes its message into shared memory itself
        pack, reserve, send = SEQ.pack_into, t.link.reserve, t.link.send_reserved
        while True:
            if (i & 63) == 0 and time.perf_counter() >= deadline:
                break
            buf = reserve(size)
            pack(buf, 0, i)
            LAST.pack_into(buf, size - 1, i & 0xFF)
            send(buf)
            i += 1
        buf = None
    else:
        buf = bytearray(size)
        pack, send = SEQ.pack_into, t.send
        while True:
            if (i & 63) == 0 and time.perf_counter() >= deadline:
                break
            pack(buf, 0, i)
            buf[-1] = i & 0xFF
            send(buf)
            i += 1
    t.send(STOP)
    seen, errors = REPORT.unpack(bytes(t.recv()))
    dt = time.perf_counter() - t0
    return {"sent": i, "seen": seen, "errors": errors, "msgs_per_s": seen / dt, "bytes_per_s": seen * size / dt}


def stream_b(t, p):
    """Checks every message: its length, the sequence number in its first 8 bytes, its last byte."""
    size = p["size"]
    seen = errors = 0
    if p.get("batch"):
        import numpy as np

        while True:
            batch = t.recv_many(4096)
            stop = len(batch[-1]) == 1
            if stop:
                batch = batch[:-1]
            if batch:
                if any(len(m) != size for m in batch):
                    errors += 1
                arr = np.frombuffer(b"".join(batch), dtype=np.uint8).reshape(len(batch), size)
                seq = arr[:, :8].copy().view("<u8").ravel()
                want = np.arange(seen, seen + len(batch), dtype=np.uint64)
                errors += int(np.count_nonzero(seq != want)) + int(np.count_nonzero(arr[:, -1] != (want & 0xFF)))
                seen += len(batch)
            # Slot payloads in a batch are Messages holding their slots: give them back before
            # waiting for the next batch, or the sender may wait for slots this side still holds.
            for m in batch:
                drop(m)
            batch = None
            if stop:
                break
    else:
        seq, last, recv = SEQ.unpack_from, LAST.unpack_from, t.recv
        while True:
            m = recv()
            n = len(m)
            if n == 1:
                break
            if n != size or seq(m)[0] != seen or last(m, n - 1)[0] != seen & 0xFF:
                errors += 1
            seen += 1
            drop(m)  # a zero-copy message goes back before the next wait
    t.send(REPORT.pack(seen, errors))


# -- 256 MiB ndarray hand-over ------------------------------------------------------------------


def _pattern(np, n):
    return (np.arange(n, dtype=np.uint32) % 251).astype(np.uint8)


ACK = struct.Struct("<Bd")  # sampled check passed, the receiver's perf_counter() once it held the array
SAMPLES = 64


def ndarray_a(t, p):
    """Time from "send" until the receiver holds an ndarray whose shape, dtype and 64 sampled bytes
    (first and last included) it has checked: the receiver stamps that moment with perf_counter(),
    CLOCK_MONOTONIC, the same clock in both processes. Then, untimed, it compares every byte and
    answers before the next round."""
    import numpy as np

    n, mode, reps = p["nbytes"], p["mode"], p["reps"]
    src = _pattern(np, n)
    times = []
    for _ in range(reps):
        if mode == "shm":  # born in shared memory: filled before the clock starts
            a = t.link.empty((n,), np.uint8)
            a[:] = src
            t0 = time.perf_counter()
            t.link.send_array(a)
            del a
        elif mode == "copy_shmhub":
            t0 = time.perf_counter()
            t.link.send_array(src)
        else:  # baselines: the array's bytes through the transport
            t0 = time.perf_counter()
            t.send(memoryview(src))
        ok, held = ACK.unpack(bytes(t.recv()))
        times.append(held - t0)
        full = bytes(t.recv())
        if not ok or full != b"ok":
            raise RuntimeError(f"receiver rejected the array (sampled check {bool(ok)}, full check {full!r})")
    t.send(STOP)
    times.sort()
    return {"reps": reps, "median_ms": times[len(times) // 2] * 1e3, "min_ms": times[0] * 1e3, "max_ms": times[-1] * 1e3}


def ndarray_b(t, p):
    import numpy as np

    from shmhub.codec import decode_array

    n = p["nbytes"]
    expect = _pattern(np, n)
    idx = np.linspace(0, n - 1, SAMPLES).astype(np.int64)
    want = expect[idx]
    while True:
        if p["mode"] in ("shm", "copy_shmhub"):
            m = t.link.recv()
            if len(m) == 1:
                return
            a = decode_array(m)
        else:
            m = t.recv()
            if len(m) == 1:
                return
            a = np.frombuffer(m, dtype=np.uint8)
        ok = a.shape == (n,) and a.dtype == np.uint8 and np.array_equal(a[idx], want)
        held = time.perf_counter()
        t.send(ACK.pack(ok, held))
        full = ok and np.array_equal(a, expect)
        del a
        drop(m)
        t.send(b"ok" if full else b"bad")


def memcpy_rate(nbytes: int, seconds: float) -> dict:
    """How fast this machine copies nbytes from one buffer into another, both already faulted:
    the ceiling of any transport that copies once."""
    import numpy as np

    def paged(fill):  # page-aligned, so the copy runs at full speed (no 4K aliasing)
        raw = np.full(nbytes + 4096, fill, np.uint8)
        return raw[-raw.__array_interface__["data"][0] % 4096 :][:nbytes]

    src, dst = paged(1), paged(0)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(64):
            np.copyto(dst, src)
        count += 64
    dt = time.perf_counter() - t0
    return {"sent": count, "seen": count, "errors": 0, "msgs_per_s": count / dt, "bytes_per_s": count * nbytes / dt}


def memcpy_reference(nbytes: int, reps: int) -> dict:
    """One memcpy of nbytes into an already-faulted destination, and into fresh pages."""
    import numpy as np

    src = _pattern(np, nbytes)
    dst = np.empty_like(src)
    dst[:] = 0
    warm, cold = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        warm.append(time.perf_counter() - t0)
        fresh = np.empty_like(src)
        t0 = time.perf_counter()
        np.copyto(fresh, src)
        cold.append(time.perf_counter() - t0)
        del fresh
    return {"warm_median_ms": sorted(warm)[reps // 2] * 1e3, "fresh_pages_median_ms": sorted(cold)[reps // 2] * 1e3}


READY = b"ready"


def handshake_a(t):
    """Wait until the child is up, so no start-up time is measured."""
    m = t.recv()
    if bytes(m) != READY:
        raise RuntimeError(f"child said {bytes(m)!r} instead of ready")


def handshake_b(t):
    t.send(READY)


SIDES = {"pingpong": (pingpong_a, pingpong_b), "stream": (stream_a, stream_b), "ndarray": (ndarray_a, ndarray_b)}
