# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""shmhub's compiled core: a bounds-checked memory region over a shared mapping with explicit
atomics, the BipBuffer ring and frame codec, the VarSlotPool, and the RPC frame header codec.
Nothing else lives here: policy, lifecycle and waiting are in the Python modules."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, uintptr_t
from libc.string cimport memcpy, memset
from libc.errno cimport errno
from libc.time cimport timespec
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBuffer_FillInfo, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.unicode cimport PyUnicode_DecodeUTF8

import os
from warnings import warn as _warn  # bound now: usable from __del__ at shutdown

from shmhub.errors import (
    DoubleFree,
    InvalidSlotRef,
    LinkCorrupted,
    RpcProtocolError,
    SegmentCorrupted,
    StaleSlotRef,
)

cdef extern from "<sys/mman.h>":
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset) nogil
    int munmap(void* addr, size_t length) nogil
    int PROT_READ, PROT_WRITE, MAP_SHARED, MAP_POPULATE
    void* MAP_FAILED

cdef extern from "<time.h>" nogil:
    int clock_gettime(int clk, timespec* ts)
    int CLOCK_MONOTONIC

cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec

cdef extern from "_atomics.h":
    int SHM_RELAXED, SHM_ACQUIRE, SHM_RELEASE, SHM_ACQ_REL, SHM_SEQ_CST
    uint32_t shm_load32(const void* p, int mo) nogil
    void shm_store32(void* p, uint32_t v, int mo) nogil
    uint32_t shm_cas32(void* p, uint32_t expected, uint32_t desired) nogil
    uint32_t shm_fetch_add32(void* p, uint32_t v, int mo) nogil
    uint32_t shm_fetch_or32(void* p, uint32_t v) nogil
    uint64_t shm_load64(const void* p, int mo) nogil
    void shm_store64(void* p, uint64_t v, int mo) nogil
    uint64_t shm_cas64(void* p, uint64_t expected, uint64_t desired) nogil
    uint64_t shm_fetch_add64(void* p, uint64_t v, int mo) nogil
    void shm_fence(int mo) nogil
    void shm_cpu_relax() nogil
    uint32_t shm_get_u32(const char* p) nogil
    uint16_t shm_get_u16(const char* p) nogil
    uint64_t shm_get_u64(const char* p) nogil
    void shm_put_u32(char* p, uint32_t v) nogil
    void shm_put_u16(char* p, uint16_t v) nogil
    void shm_put_u64(char* p, uint64_t v) nogil
    struct shm_futex_waitv:
        uint64_t val
        uint64_t uaddr
        uint32_t flags
        uint32_t reserved
    int shm_futex_wake(void* p, int n) nogil
    int shm_futex_wait(void* p, uint32_t expected, const timespec* rel) nogil
    int shm_futex_wait_any(shm_futex_waitv* w, unsigned n, const timespec* abs) nogil
    enum: SHM_FUTEX_WAITV_MAX
    enum: FUTEX_32_FLAG "FUTEX_32"
    enum: ENOSYS
    enum: ETIMEDOUT
    void SHM_CRASHPOINT(const char* name) nogil  # nothing unless built with SHMHUB_CRASHPOINTS
    enum: SHM_CRASHPOINTS_BUILT

cdef extern from "_layout.h":
    # Generated from layout.py (the single source of truth) by setup.py.
    const unsigned long long SHMHUB_RING_HEADER_SIZE, SHMHUB_RING_WRITE, SHMHUB_RING_WATERMARK
    const unsigned long long SHMHUB_RING_CAPACITY, SHMHUB_RING_READ, SHMHUB_RING_ALIGN
    const unsigned long long SHMHUB_RING_PRODUCER_WAITING, SHMHUB_RING_CONSUMER_WAITING
    const unsigned long long SHMHUB_RING_SENT_MESSAGES, SHMHUB_RING_SENT_BYTES, SHMHUB_RING_DOORBELLS
    const unsigned long long SHMHUB_FRAME_HEADER_SIZE, SHMHUB_FRAME_TOTAL_LEN, SHMHUB_FRAME_FLAGS
    const unsigned long long SHMHUB_FRAME_INLINE_LEN, SHMHUB_FRAME_ALIGN
    const unsigned long long SHMHUB_FLAG_SLOT_REF, SHMHUB_FLAG_MMAP_REF
    const unsigned long long SHMHUB_SLOT_REF_FRAME_SIZE, SHMHUB_SR_CLASS, SHMHUB_SR_EXTENT
    const unsigned long long SHMHUB_SR_SLOT, SHMHUB_SR_GENERATION
    const unsigned long long SHMHUB_MMAP_REF_FRAME_SIZE, SHMHUB_MR_MAP_ID, SHMHUB_MR_MAP_GENERATION
    const unsigned long long SHMHUB_MR_MAP_OFFSET, SHMHUB_MR_PAYLOAD_LEN, SHMHUB_MR_FLAGS, SHMHUB_MR_RETURN
    const unsigned long long SHMHUB_KIND_INLINE, SHMHUB_KIND_SLOT_REF, SHMHUB_KIND_MMAP_REF, SHMHUB_KIND_MMAP_RETURN
    const unsigned long long SHMHUB_MAX_INLINE_LEN
    const unsigned long long SHMHUB_CLASS_HEADER_SIZE, SHMHUB_CLS_SLOT_SIZE, SHMHUB_CLS_SLOT_COUNT
    const unsigned long long SHMHUB_CLS_FREE_HEAD, SHMHUB_CLS_WAITERS, SHMHUB_POOL_WAITERS_MASK, SHMHUB_POOL_WAKE_STEP
    const unsigned long long SHMHUB_HDR_SHARE_LINKS, SHMHUB_SLOT_SHARE_MIN
    const unsigned long long SHMHUB_SLOT_META_SIZE, SHMHUB_META_GENERATION, SHMHUB_META_STATE
    const unsigned long long SHMHUB_META_OWNER, SHMHUB_META_NEXT_FREE
    const unsigned long long SHMHUB_SLOT_FREE, SHMHUB_SLOT_ALLOCATED, SHMHUB_EMPTY_INDEX
    const unsigned long long SHMHUB_SLOT_LEN_PREFIX, SHMHUB_MAX_CLASSES
    const unsigned long long SHMHUB_PEER_ENTRY_SIZE, SHMHUB_PEER_POOL_OP, SHMHUB_PEER_POOL_OP_GEN
    const unsigned long long SHMHUB_POOL_OP_NONE, SHMHUB_POOL_OP_POP, SHMHUB_POOL_OP_FREE
    enum: SHMHUB_MAX_EXTENTS
    const unsigned long long SHMHUB_HDR_HOST_GOODBYE

DEF GIL_FREE_COPY = 1 << 20  # copies at least this large run without the GIL
DEF SPIN_PROBE_EVERY = 16
DEF SPIN_PROBE_MAX = 1024
DEF SPIN_MISSES = 3
DEF SPIN_STRETCH = 4  # a spin may grow to this many times spin_ns (LinkCore.c_slept)
DEF SPIN_NEAR = 2  # sleeps in a row that ended within that long before it grows

RELAXED = SHM_RELAXED
ACQUIRE = SHM_ACQUIRE
RELEASE = SHM_RELEASE
ACQ_REL = SHM_ACQ_REL
SEQ_CST = SHM_SEQ_CST

CRASHPOINTS = bool(SHM_CRASHPOINTS_BUILT)  # a test build with crash points (docs/hardening.md)


def crashpoint(const char* name):
    """Pass crash point `name` (bytes): in a build with crash points, SHMHUB_CRASH_AT=name:count
    aborts the process at the count-th pass. Does nothing in a normal build."""
    SHM_CRASHPOINT(name)


def cpu_relax():
    """One CPU pause instruction (for spin loops)."""
    shm_cpu_relax()


def fence(int order=SHM_SEQ_CST):
    """A memory fence with the given order."""
    shm_fence(order)


# ---------------------------------------------------------------------------------------------
# Doorbell waits: poll + drain in one call without the GIL (the per-wake cost of every sleeper)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum:
        POLLIN
        POLLHUP
        POLLERR
        POLLNVAL

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL

from posix.unistd cimport read
from cpython.exc cimport PyErr_CheckSignals

cdef extern from "<errno.h>":
    enum:
        EINTR
        EAGAIN
        EPIPE
        ECONNRESET
        ENOTCONN
        EBADF
        ENOBUFS

cdef short BELL_POLLRDHUP = 0x2000  # POLLRDHUP (a GNU extension): the peer closed its end


cdef Py_ssize_t c_bell_drain(int fd) except -2:
    """Consume a doorbell's pending bytes: their count, -1 if the peer is gone (EOF or a dead
    socket); OSError otherwise. A read shorter than the buffer means nothing more is pending (a
    stream socket returns all it has), so the usual drain is one recv, with no EAGAIN round."""
    cdef char buf[4096]
    cdef Py_ssize_t total = 0
    cdef ssize_t n
    cdef int err
    while True:
        with nogil:
            n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT)
            err = errno
        if n > 0:
            total += n
            if n < <ssize_t>sizeof(buf):
                return total
            continue
        if n == 0:
            return -1
        if err == EINTR:  # trap 28
            continue
        if err == EAGAIN:  # == EWOULDBLOCK on Linux
            return total
        if err == EPIPE or err == ECONNRESET or err == ENOTCONN or err == EBADF:
            return -1
        raise OSError(err, os.strerror(err))


def bell_drain(int fd):
    """Consume a doorbell fd's pending bytes: their count, or -1 if the peer is gone."""
    return c_bell_drain(fd)


def bell_ring(int fd):
    """Send a doorbell's one byte: True if sent or already pending (EAGAIN/ENOBUFS: trap 29),
    False if the peer is gone; OSError otherwise. MSG_NOSIGNAL: no SIGPIPE in embedders (trap 30)."""
    cdef ssize_t n
    cdef int err
    cdef char one = 1
    while True:
        with nogil:  # waking the peer costs the syscall a few microseconds: other threads run
            n = send(fd, &one, 1, MSG_DONTWAIT | MSG_NOSIGNAL)
            err = errno
        if n == 1:
            return True
        if err == EINTR:  # trap 28
            continue
        if err == EAGAIN or err == ENOBUFS:
            return True
        if err == EPIPE or err == ECONNRESET or err == ENOTCONN or err == EBADF:
            return False
        raise OSError(err, os.strerror(err))


def bell_wait(int fd, int wake_fd, timeout):
    """Sleep (GIL released) until the doorbell `fd` has bytes or EOF, `wake_fd` (an eventfd, or -1)
    is readable, or `timeout` seconds pass (None: no limit); then consume the eventfd and the
    doorbell's bytes. Returns 0 on timeout, 1 when woken, -1 if the doorbell's peer is gone.
    Signals are handled as Python's poll does (PEP 475): handlers run, the wait resumes."""
    cdef pollfd fds[2]
    cdef int nfds = 2 if wake_fd >= 0 else 1
    cdef int ms, r, err
    cdef int64_t deadline = -1, left
    cdef uint64_t count
    if timeout is not None:
        if timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        deadline = now_ns() + <int64_t>(timeout * 1e9)
    fds[0].fd = fd
    fds[0].events = POLLIN | BELL_POLLRDHUP
    fds[1].fd = wake_fd
    fds[1].events = POLLIN
    while True:
        if deadline < 0:
            ms = -1
        else:
            left = deadline - now_ns()
            ms = 0 if left <= 0 else <int>min((left + 999999) // 1000000, 0x7fffffff)
        fds[0].revents = 0
        fds[1].revents = 0
        with nogil:
            r = poll(fds, nfds, ms)
            err = errno
        if r >= 0:
            break
        if err != EINTR:
            raise OSError(err, os.strerror(err))
        PyErr_CheckSignals()
    if r == 0:
        return 0
    if fds[0].revents & POLLNVAL:
        raise OSError(EBADF, os.strerror(EBADF))
    if nfds == 2 and fds[1].revents & POLLIN:
        with nogil:
            read(wake_fd, &count, 8)  # EAGAIN (another reader won) is fine
    if c_bell_drain(fd) < 0:
        return -1
    return 1


# ---------------------------------------------------------------------------------------------
# Region: a shared mapping with bounds-checked atomics
# ---------------------------------------------------------------------------------------------

cdef class Region:
    """A MAP_SHARED mapping of `size` bytes of `fd`. Every access is bounds- and alignment-checked.

    Views handed out (`view`, the buffer protocol) keep the mapping alive: `close()` marks the
    region closed at once and unmaps when the last view is released.
    """
    cdef char* base
    cdef readonly Py_ssize_t size
    cdef readonly bint writable
    cdef readonly bint closed
    cdef Py_ssize_t exports

    def __cinit__(self, int fd, Py_ssize_t size, bint writable=True, Py_ssize_t offset=0, bint populate=False):
        if size <= 0:
            raise ValueError(f"cannot map {size} bytes")
        if offset < 0 or offset % 4096:
            raise ValueError(f"mapping offset {offset} must be a non-negative multiple of 4096")
        cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
        cdef void* p = mmap(NULL, <size_t>size, prot, MAP_SHARED | (MAP_POPULATE if populate else 0), fd, offset)
        if p == MAP_FAILED:
            e = errno
            raise OSError(e, f"mmap of {size} bytes failed: {os.strerror(e)}")
        self.base = <char*>p
        self.size = size
        self.writable = writable
        self.closed = False
        self.exports = 0

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, <size_t>self.size)
            self.base = NULL

    def close(self):
        """Stop all access through this object; unmap once no exported view remains."""
        self.closed = True
        if self.exports == 0 and self.base != NULL:
            munmap(self.base, <size_t>self.size)
            self.base = NULL

    @property
    def exported_views(self):
        return self.exports

    def __getbuffer__(self, Py_buffer* buf, int flags):
        if self.closed:
            raise ValueError("region is closed")
        PyBuffer_FillInfo(buf, self, self.base, self.size, not self.writable, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* buf):
        self.unpin()

    cdef int pin(self) except -1:
        """Keep the mapping alive (e.g. across a GIL-free wait or under a Message)."""
        if self.closed:
            raise ValueError("region is closed")
        self.exports += 1
        return 0

    cdef void unpin(self) noexcept:
        self.exports -= 1
        if self.closed and self.exports == 0 and self.base != NULL:
            munmap(self.base, <size_t>self.size)
            self.base = NULL

    cdef inline char* ptr(self, Py_ssize_t off, Py_ssize_t n, Py_ssize_t align) except NULL:
        if self.closed:
            raise ValueError("region is closed")
        if off < 0 or n < 0 or off > self.size - n:
            raise IndexError(f"access [{off}, {off}+{n}) outside the mapping of {self.size} bytes")
        if align > 1 and off % align:
            raise ValueError(f"offset {off} is not {align}-byte aligned")
        return self.base + off

    cdef inline char* wptr(self, Py_ssize_t off, Py_ssize_t n, Py_ssize_t align) except NULL:
        if not self.writable:
            raise PermissionError("region is mapped read-only")
        return self.ptr(off, n, align)

    def load_u32(self, Py_ssize_t off, int order=SHM_ACQUIRE):
        return shm_load32(self.ptr(off, 4, 4), order)

    def store_u32(self, Py_ssize_t off, uint32_t value, int order=SHM_RELEASE):
        shm_store32(self.wptr(off, 4, 4), value, order)

    def cas_u32(self, Py_ssize_t off, uint32_t expected, uint32_t desired):
        """Compare-exchange (AcqRel/Acquire); returns the value seen (success iff == expected)."""
        return shm_cas32(self.wptr(off, 4, 4), expected, desired)

    def fetch_add_u32(self, Py_ssize_t off, uint32_t delta, int order=SHM_ACQ_REL):
        return shm_fetch_add32(self.wptr(off, 4, 4), delta, order)

    def load_u64(self, Py_ssize_t off, int order=SHM_ACQUIRE):
        return shm_load64(self.ptr(off, 8, 8), order)

    def store_u64(self, Py_ssize_t off, uint64_t value, int order=SHM_RELEASE):
        shm_store64(self.wptr(off, 8, 8), value, order)

    def cas_u64(self, Py_ssize_t off, uint64_t expected, uint64_t desired):
        """Compare-exchange (AcqRel/Acquire); returns the value seen (success iff == expected)."""
        return shm_cas64(self.wptr(off, 8, 8), expected, desired)

    def fetch_add_u64(self, Py_ssize_t off, uint64_t delta, int order=SHM_ACQ_REL):
        return shm_fetch_add64(self.wptr(off, 8, 8), delta, order)

    def futex_wait(self, Py_ssize_t off, uint32_t expected, double timeout=-1):
        """Sleep (GIL released) while the u32 at off equals expected, at most timeout seconds
        (< 0: no limit); a shared futex. False on timeout, True when woken (or spuriously)."""
        cdef char* p = self.ptr(off, 4, 4)
        cdef timespec ts
        cdef int r
        if timeout >= 0:
            ts.tv_sec = <long>timeout
            ts.tv_nsec = <long>((timeout - <double>ts.tv_sec) * 1e9)
        self.pin()
        try:
            with nogil:
                r = shm_futex_wait(p, expected, &ts if timeout >= 0 else NULL)
        finally:
            self.unpin()
        return r != -ETIMEDOUT

    def futex_wake(self, Py_ssize_t off, int n=0x7FFFFFFF):
        """Wake up to n sleepers of futex_wait on the u32 at off; how many were woken."""
        cdef int r = shm_futex_wake(self.wptr(off, 4, 4), n)
        return max(r, 0)

    def read(self, Py_ssize_t off, Py_ssize_t n):
        """Copy n bytes at off into a new bytes object (non-atomic)."""
        cdef char* p = self.ptr(off, n, 1)
        return PyBytes_FromStringAndSize(p, n)

    def write(self, Py_ssize_t off, data):
        """Copy a bytes-like object into the mapping at off (non-atomic; large copies drop the GIL)."""
        cdef Py_buffer b
        cdef char* dst
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
        try:
            dst = self.wptr(off, b.len, 1)
            if b.len < GIL_FREE_COPY:
                memcpy(dst, b.buf, b.len)
            else:
                self.pin()
                try:
                    with nogil:
                        memcpy(dst, b.buf, b.len)
                finally:
                    self.unpin()
        finally:
            PyBuffer_Release(&b)

    def zero(self, Py_ssize_t off, Py_ssize_t n):
        memset(self.wptr(off, n, 1), 0, n)

    def view(self, Py_ssize_t off, Py_ssize_t n):
        """A zero-copy memoryview of [off, off+n) that keeps the mapping alive."""
        self.ptr(off, n, 1)
        return memoryview(self)[off:off + n]

    @property
    def address(self):
        """Where the mapping starts in this process (0 once unmapped): Link.lend() finds by it the
        mapping a buffer lies in."""
        return <uintptr_t>self.base


def buffer_address(obj):
    """The address of the first byte of a contiguous bytes-like object."""
    cdef Py_buffer b
    PyObject_GetBuffer(obj, &b, PyBUF_SIMPLE)
    cdef uintptr_t p = <uintptr_t>b.buf
    PyBuffer_Release(&b)
    return p


# ---------------------------------------------------------------------------------------------
# Frames (format-v7 1.5): one encoder and one decoder, used by rings and by standalone helpers
# ---------------------------------------------------------------------------------------------

cdef inline uint32_t align4(uint64_t n) nogil:
    return <uint32_t>((n + 3) & ~(<uint64_t>3))


cdef inline void put_header(char* p, uint32_t total, uint8_t flags, uint16_t inline_len) noexcept nogil:
    shm_put_u32(p + SHMHUB_FRAME_TOTAL_LEN, total)
    p[SHMHUB_FRAME_FLAGS] = <char>flags
    p[SHMHUB_FRAME_FLAGS + 1] = 0
    shm_put_u16(p + SHMHUB_FRAME_INLINE_LEN, inline_len)


cdef inline void put_slot_ref(char* p, uint8_t cls, uint8_t extent, uint32_t slot, uint32_t gen) noexcept nogil:
    put_header(p, <uint32_t>SHMHUB_SLOT_REF_FRAME_SIZE, <uint8_t>SHMHUB_FLAG_SLOT_REF, 0)
    cdef char* b = p + SHMHUB_FRAME_HEADER_SIZE
    b[SHMHUB_SR_CLASS] = <char>cls
    b[SHMHUB_SR_EXTENT] = <char>extent
    b[SHMHUB_SR_EXTENT + 1] = 0
    b[SHMHUB_SR_EXTENT + 2] = 0
    shm_put_u32(b + SHMHUB_SR_SLOT, slot)
    shm_put_u32(b + SHMHUB_SR_GENERATION, gen)


cdef inline void put_mmap_ref(char* p, uint32_t map_id, uint32_t map_gen, uint64_t offset, uint32_t length, uint32_t flags) noexcept nogil:
    put_header(p, <uint32_t>SHMHUB_MMAP_REF_FRAME_SIZE, <uint8_t>SHMHUB_FLAG_MMAP_REF, 0)
    cdef char* b = p + SHMHUB_FRAME_HEADER_SIZE
    shm_put_u32(b + SHMHUB_MR_MAP_ID, map_id)
    shm_put_u32(b + SHMHUB_MR_MAP_GENERATION, map_gen)
    shm_put_u64(b + SHMHUB_MR_MAP_OFFSET, offset)  # only 4-aligned in a ring: memcpy, never a cast
    shm_put_u32(b + SHMHUB_MR_PAYLOAD_LEN, length)
    shm_put_u32(b + SHMHUB_MR_FLAGS, flags)


cdef uint32_t check_frame(const char* p, Py_ssize_t avail) except 0:
    """Validate the frame at p with `avail` readable bytes; return its total_len (trap 4, 5, 9)."""
    if avail < <Py_ssize_t>SHMHUB_FRAME_HEADER_SIZE:
        raise LinkCorrupted(f"{avail} readable bytes cannot hold an 8-byte frame header")
    cdef uint32_t total = shm_get_u32(p + SHMHUB_FRAME_TOTAL_LEN)
    cdef uint8_t flags = <uint8_t>p[SHMHUB_FRAME_FLAGS]
    cdef uint32_t ilen
    if total < SHMHUB_FRAME_HEADER_SIZE:
        raise LinkCorrupted(f"frame total_len {total} is below the 8-byte header")
    if total % SHMHUB_FRAME_ALIGN:
        raise LinkCorrupted(f"frame total_len {total} is not a multiple of 4")
    if total > avail:
        raise LinkCorrupted(f"frame total_len {total} exceeds the {avail} readable bytes")
    if (flags & SHMHUB_FLAG_SLOT_REF) and (flags & SHMHUB_FLAG_MMAP_REF):
        raise LinkCorrupted(f"frame flags {flags:#04x} set both SLOT_REF and MMAP_REF")
    if flags & SHMHUB_FLAG_SLOT_REF:
        if total < SHMHUB_SLOT_REF_FRAME_SIZE:
            raise LinkCorrupted(f"slot-ref frame total_len {total} is below {SHMHUB_SLOT_REF_FRAME_SIZE}")
    elif flags & SHMHUB_FLAG_MMAP_REF:
        if total < SHMHUB_MMAP_REF_FRAME_SIZE:
            raise LinkCorrupted(f"mmap-ref frame total_len {total} is below {SHMHUB_MMAP_REF_FRAME_SIZE}")
    else:
        ilen = shm_get_u16(p + SHMHUB_FRAME_INLINE_LEN)
        if ilen > total - SHMHUB_FRAME_HEADER_SIZE:
            raise LinkCorrupted(f"inline_payload_len {ilen} exceeds frame total_len {total} - 8")
    return total


cdef object decode_checked(const char* p, uint32_t total):
    """Decode a frame already validated by check_frame into a tuple (see decode_frame)."""
    cdef uint8_t flags = <uint8_t>p[SHMHUB_FRAME_FLAGS]
    cdef const char* b = p + SHMHUB_FRAME_HEADER_SIZE
    cdef uint32_t ilen
    if flags & SHMHUB_FLAG_SLOT_REF:
        return (SHMHUB_KIND_SLOT_REF, total, <uint8_t>b[SHMHUB_SR_CLASS], <uint8_t>b[SHMHUB_SR_EXTENT],
                shm_get_u32(b + SHMHUB_SR_SLOT), shm_get_u32(b + SHMHUB_SR_GENERATION))
    if flags & SHMHUB_FLAG_MMAP_REF:
        # MR_FLAGS bit 0 (FEATURE_MMAP_RETURN) makes it a return ref; other bits are reserved, ignored.
        return (SHMHUB_KIND_MMAP_RETURN if shm_get_u32(b + SHMHUB_MR_FLAGS) & SHMHUB_MR_RETURN else SHMHUB_KIND_MMAP_REF,
                total, shm_get_u32(b + SHMHUB_MR_MAP_ID),
                shm_get_u32(b + SHMHUB_MR_MAP_GENERATION), shm_get_u64(b + SHMHUB_MR_MAP_OFFSET),
                shm_get_u32(b + SHMHUB_MR_PAYLOAD_LEN))
    ilen = shm_get_u16(p + SHMHUB_FRAME_INLINE_LEN)
    if ilen == 0:  # legacy writer: the payload runs to total_len, padding included (format-v7 1.5)
        ilen = total - SHMHUB_FRAME_HEADER_SIZE
    return (SHMHUB_KIND_INLINE, total, PyBytes_FromStringAndSize(b, ilen))


def decode_frame(data):
    """Decode the frame at the start of a bytes-like object.

    Returns (KIND_INLINE, total_len, payload) | (KIND_SLOT_REF, total_len, class_idx, extent_idx,
    slot_idx, generation) | (KIND_MMAP_REF or KIND_MMAP_RETURN, total_len, map_id, map_generation,
    map_offset, payload_len). Raises LinkCorrupted for a malformed frame.
    """
    cdef Py_buffer b
    PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
    try:
        total = check_frame(<char*>b.buf, b.len)
        return decode_checked(<char*>b.buf, total)
    finally:
        PyBuffer_Release(&b)


def encode_inline(payload, bint legacy=False):
    """An inline frame; `legacy` leaves inline_payload_len at 0 as pre-2026-03 writers did."""
    cdef Py_buffer b
    cdef char* p
    cdef uint32_t total
    PyObject_GetBuffer(payload, &b, PyBUF_SIMPLE)
    try:
        if b.len > <Py_ssize_t>SHMHUB_MAX_INLINE_LEN:
            raise ValueError(f"inline payload of {b.len} bytes exceeds {SHMHUB_MAX_INLINE_LEN}")
        total = align4(SHMHUB_FRAME_HEADER_SIZE + b.len)
        out = PyBytes_FromStringAndSize(NULL, total)
        p = PyBytes_AS_STRING(out)
        memset(p, 0, total)
        put_header(p, total, 0, 0 if legacy else <uint16_t>b.len)
        memcpy(p + SHMHUB_FRAME_HEADER_SIZE, b.buf, b.len)
        return out
    finally:
        PyBuffer_Release(&b)


def encode_slot_ref(uint8_t class_idx, uint8_t extent_idx, uint32_t slot_idx, uint32_t generation):
    out = PyBytes_FromStringAndSize(NULL, SHMHUB_SLOT_REF_FRAME_SIZE)
    put_slot_ref(PyBytes_AS_STRING(out), class_idx, extent_idx, slot_idx, generation)
    return out


def encode_mmap_ref(uint32_t map_id, uint32_t map_generation, uint64_t map_offset, uint32_t payload_len, uint32_t flags=0):
    out = PyBytes_FromStringAndSize(NULL, SHMHUB_MMAP_REF_FRAME_SIZE)
    put_mmap_ref(PyBytes_AS_STRING(out), map_id, map_generation, map_offset, payload_len, flags)
    return out


# ---------------------------------------------------------------------------------------------
# The RPC frame header (shmhub.rpc._wire has its layout and constants, docs/rpc.md its bytes):
# decoded and encoded here because every call does both twice, and in Python they were a
# quarter of a null call's time.
# ---------------------------------------------------------------------------------------------

DEF RPC_HEADER_SIZE = 32
DEF RPC_DESCRIPTOR_SIZE = 16

cdef tuple _rpc_kinds = ()  # kind byte -> Kind member (None: unknown); set by rpc_wire_setup
cdef uint32_t _rpc_version = 0, _rpc_known_flags = 0, _rpc_max_buffers = 0, _rpc_max_method = 0


def rpc_wire_setup(tuple kinds, uint32_t version, uint32_t known_flags, uint32_t max_buffers, uint32_t max_method_len):
    """The RPC wire's constants, from shmhub.rpc._wire (their one source), once at its import."""
    global _rpc_kinds, _rpc_version, _rpc_known_flags, _rpc_max_buffers, _rpc_max_method
    if len(kinds) != 256:
        raise ValueError("kinds must map every byte")
    _rpc_kinds, _rpc_version, _rpc_known_flags = kinds, version, known_flags
    _rpc_max_buffers, _rpc_max_method = max_buffers, max_method_len


cdef class RpcFrame:
    """A decoded header frame: the fixed header's fields, the descriptors of the buffers that
    follow, and where the codec payload starts in the message."""

    cdef public object kind
    cdef public uint64_t call_id
    cdef public uint32_t flags
    cdef public uint64_t deadline_ns  # absolute CLOCK_MONOTONIC nanoseconds; 0: no deadline
    cdef public uint32_t arg  # CREDIT: items granted
    cdef public str method
    cdef public uint32_t n_buffers
    cdef public tuple descriptors
    cdef public Py_ssize_t payload_offset

    def __init__(self, kind, uint64_t call_id, uint32_t flags, uint64_t deadline_ns, uint32_t arg, str method,
                 uint32_t n_buffers, tuple descriptors, Py_ssize_t payload_offset):
        self.kind, self.call_id, self.flags, self.deadline_ns, self.arg = kind, call_id, flags, deadline_ns, arg
        self.method, self.n_buffers, self.descriptors, self.payload_offset = method, n_buffers, descriptors, payload_offset

    def __repr__(self):
        return (f"Frame({self.kind.name}, call_id={self.call_id}, flags={self.flags:#x}, "
                f"deadline_ns={self.deadline_ns}, arg={self.arg}, method={self.method!r}, n_buffers={self.n_buffers})")


cdef tuple _NO_DESCS = ()


def rpc_decode(data, Py_ssize_t max_frame):
    """Parse an RPC header message (any buffer); RpcProtocolError if it is malformed or larger
    than max_frame. Every length is checked against the message before it is used."""
    cdef Py_buffer b
    cdef const char* p
    cdef Py_ssize_t n, end
    cdef uint32_t version, kb, flags, nbuf, mlen, i
    cdef RpcFrame f
    PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
    try:
        p = <const char*>b.buf
        n = b.len
        if n > max_frame:
            raise RpcProtocolError(f"oversize frame: {n} bytes exceed max_frame {max_frame}")
        if n < RPC_HEADER_SIZE:
            raise RpcProtocolError(f"truncated frame: {n} bytes, the header alone is {RPC_HEADER_SIZE}")
        version = <uint8_t>p[0]
        if version != _rpc_version:
            raise RpcProtocolError(f"frame of protocol version {version}, this end speaks {_rpc_version}")
        kb = <uint8_t>p[1]
        kind = _rpc_kinds[kb]
        if kind is None:
            raise RpcProtocolError(f"unknown frame kind {kb}")
        flags = shm_get_u16(p + 2)
        nbuf = shm_get_u32(p + 4)
        mlen = shm_get_u16(p + 28)
        f = RpcFrame.__new__(RpcFrame)
        f.kind = kind
        f.call_id = shm_get_u64(p + 8)
        f.deadline_ns = shm_get_u64(p + 16)
        f.arg = shm_get_u32(p + 24)
        if not (flags or nbuf or mlen):  # responses: the common case
            f.flags, f.method, f.n_buffers, f.descriptors, f.payload_offset = 0, "", 0, _NO_DESCS, RPC_HEADER_SIZE
            return f
        if flags & ~_rpc_known_flags:
            raise RpcProtocolError(f"unknown frame flags {flags:#x}")
        if nbuf > _rpc_max_buffers:
            raise RpcProtocolError(f"oversize frame: {nbuf} out-of-band buffers, at most {_rpc_max_buffers}")
        if mlen > _rpc_max_method:
            raise RpcProtocolError(f"oversize frame: method name of {mlen} bytes, at most {_rpc_max_method}")
        end = RPC_HEADER_SIZE + mlen + <Py_ssize_t>nbuf * RPC_DESCRIPTOR_SIZE
        if end > n:
            raise RpcProtocolError(f"truncated frame: {n} bytes, its header announces {end}")
        try:
            f.method = PyUnicode_DecodeUTF8(p + RPC_HEADER_SIZE, mlen, NULL)
        except UnicodeDecodeError:
            raise RpcProtocolError("method name is not UTF-8") from None
        if nbuf:
            p += RPC_HEADER_SIZE + mlen
            descs = []
            for i in range(nbuf):
                descs.append((shm_get_u64(p), shm_get_u64(p + 8)))
                p += RPC_DESCRIPTOR_SIZE
            f.descriptors = tuple(descs)
        else:
            f.descriptors = _NO_DESCS
        f.flags, f.n_buffers, f.payload_offset = flags, nbuf, end
        return f
    finally:
        PyBuffer_Release(&b)


def rpc_encode(uint8_t kind, uint64_t call_id, payload, uint16_t flags, uint64_t deadline_ns, uint32_t arg, str method, buffers):
    """One header message: the header, the method name, a descriptor per (offset, length) of
    `buffers`, then the payload (any buffer), in one new bytes object."""
    cdef Py_buffer b
    cdef char* p
    cdef Py_ssize_t mlen = 0, nbuf = len(buffers), i = 0
    cdef bytes m = method.encode() if method else b""
    mlen = len(m)
    if mlen > _rpc_max_method:
        raise ValueError(f"method name of {mlen} bytes exceeds {_rpc_max_method}")
    if nbuf > _rpc_max_buffers:
        raise ValueError(f"{nbuf} out-of-band buffers exceed {_rpc_max_buffers} per frame")
    PyObject_GetBuffer(payload, &b, PyBUF_SIMPLE)
    try:
        out = PyBytes_FromStringAndSize(NULL, RPC_HEADER_SIZE + mlen + nbuf * RPC_DESCRIPTOR_SIZE + b.len)
        p = PyBytes_AS_STRING(out)
        p[0] = <char><uint8_t>_rpc_version
        p[1] = <char>kind
        shm_put_u16(p + 2, flags)
        shm_put_u32(p + 4, <uint32_t>nbuf)
        shm_put_u64(p + 8, call_id)
        shm_put_u64(p + 16, deadline_ns)
        shm_put_u32(p + 24, arg)
        shm_put_u16(p + 28, <uint16_t>mlen)
        shm_put_u16(p + 30, 0)
        p += RPC_HEADER_SIZE
        if mlen:
            memcpy(p, PyBytes_AS_STRING(m), mlen)
            p += mlen
        for o, ln in buffers:
            if i == nbuf:
                raise ValueError("buffers changed size while encoding")
            shm_put_u64(p, <uint64_t>o)
            shm_put_u64(p + 8, <uint64_t>ln)
            p += RPC_DESCRIPTOR_SIZE
            i += 1
        if i != nbuf:
            raise ValueError("buffers changed size while encoding")
        memcpy(p, b.buf, b.len)
        return out
    finally:
        PyBuffer_Release(&b)


# ---------------------------------------------------------------------------------------------
# Ring: one SPSC BipBuffer (algorithms.md 2.1)
# ---------------------------------------------------------------------------------------------

cdef inline bint hdr_has_data(const char* hdr) noexcept nogil:
    cdef uint32_t r = shm_load32(hdr + SHMHUB_RING_READ, SHM_RELAXED)
    cdef uint32_t w = shm_load32(hdr + SHMHUB_RING_WRITE, SHM_ACQUIRE)
    cdef uint32_t wm = shm_load32(hdr + SHMHUB_RING_WATERMARK, SHM_ACQUIRE)
    if wm != 0:
        return r < wm or w < r  # w >= r >= wm: the producer is mid-wrap, nothing to read yet
    return w != r


cdef inline bint fits(uint32_t w, uint32_t r, uint32_t n, uint32_t cap) noexcept nogil:
    """The grant predicate of algorithms.md 2.1 (n > 0): room at w, or at 0 after a wrap."""
    if w >= r:
        return cap - w >= n or (r != 0 and n < r)
    return w + n < r


cdef class Ring:
    """One BipBuffer at `offset` of a region. The producer side uses grant/commit and the
    write_* methods; the consumer side readable/release and read_frame. Callers serialise each
    side within a process; the two sides may run in different processes."""
    cdef readonly Region region
    cdef readonly Py_ssize_t offset
    cdef readonly uint32_t capacity
    cdef public bint producer_waiting  # set by recv_inline / recv_inline_many
    cdef public Py_ssize_t batch_bytes  # payload bytes of the last send_inline_many / recv_inline_many
    cdef char* hdr
    cdef char* data
    # Each side keeps what it last learned of the other's index, so the common case touches only
    # its own cache line (a remote line costs a cross-core transfer per message). Both are only
    # ever behind the truth, which is safe (docs/deviations.md, ring 2); reset() forgets them.
    cdef uint32_t seen_read  # producer: a read index loaded earlier
    cdef bint seen_read_ok
    cdef uint32_t run_end  # consumer: end of the contiguous readable run last found (0: none)
    cdef public bint counting  # FEATURE_RING_COUNTERS: the producer keeps RING_SENT_* (set by Segment)
    cdef public int wake_batch  # consumer: frees or consumes per wake-up of a waiting producer (c_wake_due)
    cdef int unrung  # consumer: frees or consumes since the producer's announcement was last seen or claimed

    def __init__(self, Region region, Py_ssize_t offset):
        cdef char* h = region.ptr(offset, SHMHUB_RING_HEADER_SIZE, SHMHUB_RING_ALIGN)
        cdef uint32_t cap = shm_load32(h + SHMHUB_RING_CAPACITY, SHM_RELAXED)
        if cap == 0 or cap % SHMHUB_RING_ALIGN:
            raise SegmentCorrupted(f"ring at {offset}: capacity {cap} is not a positive multiple of 64")
        if offset + <Py_ssize_t>SHMHUB_RING_HEADER_SIZE + cap > region.size:
            raise SegmentCorrupted(f"ring at {offset} with capacity {cap} runs past the mapping")
        self.region = region
        self.offset = offset
        self.capacity = cap
        self.hdr = h
        self.data = h + SHMHUB_RING_HEADER_SIZE
        self.wake_batch = 16

    cdef inline int live(self) except -1:
        if self.region.closed:
            raise ValueError("ring's region is closed")
        return 0

    cdef inline int wlive(self) except -1:
        self.live()
        if not self.region.writable:  # a read-only attach (inspect) must never store
            raise PermissionError("region is mapped read-only")
        return 0

    cdef inline uint32_t idx(self, uint64_t field, int order) except? 0xFFFFFFFF:
        # Every index read from shared memory is bounds-checked before use (DECISIONS 3, trap 23).
        cdef uint32_t v = shm_load32(self.hdr + field, order)
        if v > self.capacity:
            raise LinkCorrupted(f"ring at {self.offset}: index {v} at +{field} exceeds capacity {self.capacity}")
        return v

    # -- producer --------------------------------------------------------------------------

    cdef Py_ssize_t c_grant(self, uint32_t n) except -2:
        """Offset of a contiguous n-byte grant, or -1 if the ring is full."""
        self.wlive()
        cdef uint32_t cap = self.capacity
        cdef uint32_t w = self.idx(SHMHUB_RING_WRITE, SHM_RELAXED)
        cdef uint32_t r
        if n > cap:
            return -1
        if n == 0:
            return w
        # A stale read index can only refuse room that exists, never grant room that does not.
        if not (self.seen_read_ok and fits(w, self.seen_read, n, cap)):
            self.seen_read = self.idx(SHMHUB_RING_READ, SHM_ACQUIRE)
            self.seen_read_ok = True
        r = self.seen_read
        if w >= r:
            if cap - w >= n:
                return w
            if r == 0:
                return -1  # wrapping would make write == read == 0, which means empty
            # Wrap: watermark before write (trap 1). Never undone, even if the front is too small (trap 3).
            shm_store32(self.hdr + SHMHUB_RING_WATERMARK, w, SHM_RELEASE)
            SHM_CRASHPOINT("wrap.watermark")
            shm_store32(self.hdr + SHMHUB_RING_WRITE, 0, SHM_RELEASE)
            return 0 if n < r else -1  # strict: write may never reach read (trap 2)
        return w if w + n < r else -1

    cdef int c_commit(self, uint32_t n) except -1:
        self.wlive()
        cdef uint32_t w = self.idx(SHMHUB_RING_WRITE, SHM_RELAXED)
        if n > self.capacity - w:
            raise LinkCorrupted(f"commit of {n} bytes at write {w} overruns capacity {self.capacity}")
        SHM_CRASHPOINT("commit.written")
        shm_store32(self.hdr + SHMHUB_RING_WRITE, w + n, SHM_RELEASE)
        SHM_CRASHPOINT("commit.published")
        return 0

    def grant(self, uint32_t n):
        """Reserve n contiguous bytes; returns their offset in the data area, or -1 when full."""
        return self.c_grant(n)

    def can_grant(self, uint32_t n):
        """The grant predicate without any store."""
        self.live()
        cdef uint32_t cap = self.capacity
        cdef uint32_t w = self.idx(SHMHUB_RING_WRITE, SHM_RELAXED)
        cdef uint32_t r = self.idx(SHMHUB_RING_READ, SHM_ACQUIRE)
        return n <= cap and (n == 0 or fits(w, r, n, cap))

    def commit(self, uint32_t n):
        """Publish n granted bytes (Release)."""
        self.c_commit(n)

    def write_data(self, Py_ssize_t offset, data):
        """Copy bytes into the data area (for raw grant/commit users)."""
        cdef Py_buffer b
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
        try:
            if offset < 0 or b.len > <Py_ssize_t>self.capacity - offset:
                raise IndexError(f"write of {b.len} bytes at {offset} outside ring capacity {self.capacity}")
            self.wlive()
            memcpy(self.data + offset, b.buf, b.len)
        finally:
            PyBuffer_Release(&b)

    def write_inline(self, payload):
        """Append an inline frame; False if the ring has no room now."""
        cdef Py_buffer b
        cdef Py_ssize_t off
        cdef uint32_t total
        PyObject_GetBuffer(payload, &b, PyBUF_SIMPLE)
        try:
            if b.len > <Py_ssize_t>SHMHUB_MAX_INLINE_LEN:
                raise ValueError(f"inline payload of {b.len} bytes exceeds {SHMHUB_MAX_INLINE_LEN}")
            total = align4(SHMHUB_FRAME_HEADER_SIZE + b.len)
            off = self.c_grant(total)
            if off < 0:
                return False
            put_header(self.data + off, total, 0, <uint16_t>b.len)
            memcpy(self.data + off + SHMHUB_FRAME_HEADER_SIZE, b.buf, b.len)
            memset(self.data + off + SHMHUB_FRAME_HEADER_SIZE + b.len, 0, total - SHMHUB_FRAME_HEADER_SIZE - b.len)
            self.c_commit(total)
            return True
        finally:
            PyBuffer_Release(&b)

    cdef int c_put_inline(self, const char* buf, Py_ssize_t n) except -2:
        """Grant, write and commit one inline frame; -1 when full. (Single-writer: caller serialises.)"""
        if n > <Py_ssize_t>SHMHUB_MAX_INLINE_LEN:
            raise ValueError(f"inline payload of {n} bytes exceeds {SHMHUB_MAX_INLINE_LEN}")
        cdef uint32_t total = align4(SHMHUB_FRAME_HEADER_SIZE + n)
        cdef Py_ssize_t off = self.c_grant(total)
        if off < 0:
            return -1
        cdef char* p = self.data + off
        put_header(p, total, 0, <uint16_t>n)
        memcpy(p + SHMHUB_FRAME_HEADER_SIZE, buf, n)
        memset(p + SHMHUB_FRAME_HEADER_SIZE + n, 0, total - SHMHUB_FRAME_HEADER_SIZE - n)
        self.c_commit(total)
        return 0

    cdef inline bint c_wake_due(self, int events) noexcept:
        """The consumer side, after `events` consumes or slot frees: True, with the producer's
        sleep announcement claimed (ring its doorbell), once wake_batch of them have passed since
        it announced, or at once when nothing is left to read. A producer blocked on ring room or
        on its slot share is woken once per few messages instead of once per message: with
        hundreds of guests on two cores each wake-up is a context switch (issue 12). It cannot be
        left asleep: what is left to read is read by this consumer, and the last read rings."""
        shm_fence(SHM_SEQ_CST)
        if shm_load32(self.hdr + SHMHUB_RING_PRODUCER_WAITING, SHM_ACQUIRE) == 0:
            self.unrung = 0
            return False
        self.unrung += events
        if self.unrung < self.wake_batch and hdr_has_data(self.hdr):
            return False
        self.unrung = 0
        return self.c_waiting(True)

    cdef inline bint c_waiting(self, bint producer) noexcept:
        """After publishing: claim the peer's sleep announcement (CAS 1 -> 0) so the caller rings
        once per sleep, not once per frame while the sleeper wakes up (see claim_peer_waiting)."""
        shm_fence(SHM_SEQ_CST)
        cdef char* p = self.hdr + (SHMHUB_RING_PRODUCER_WAITING if producer else SHMHUB_RING_CONSUMER_WAITING)
        cdef uint32_t v = shm_load32(p, SHM_ACQUIRE)
        cdef uint32_t seen
        while v != 0:
            seen = shm_cas32(p, v, 0)
            if seen == v:
                return True
            v = seen
        return False

    def send_inline(self, payload, bint check_waiter):
        """Hot path: one inline frame. Returns -1 if the ring is full, else 1 when the consumer
        announced it sleeps (ring its doorbell) and 0 when it is awake (or check_waiter is false)."""
        cdef Py_buffer b
        cdef int r
        if type(payload) is bytes:
            self.live()
            r = self.c_put_inline(PyBytes_AS_STRING(payload), len(<bytes>payload))
        else:
            PyObject_GetBuffer(payload, &b, PyBUF_SIMPLE)
            try:
                self.live()
                r = self.c_put_inline(<char*>b.buf, b.len)
            finally:
                PyBuffer_Release(&b)
        if r < 0:
            return -1
        return 1 if check_waiter and self.c_waiting(False) else 0

    def send_inline_many(self, list payloads, Py_ssize_t start, Py_ssize_t max_len):
        """Batch: write inline frames from payloads[start:] while they fit and are at most max_len
        bytes. Returns how many were written; each frame is committed as it is written."""
        cdef Py_ssize_t i, n = len(payloads)
        cdef Py_buffer b
        cdef int r = 0
        self.live()
        self.batch_bytes = 0
        for i in range(start, n):
            item = payloads[i]
            if type(item) is bytes:
                if len(<bytes>item) > max_len:
                    return i - start
                r = self.c_put_inline(PyBytes_AS_STRING(item), len(<bytes>item))
                if r == 0:
                    self.batch_bytes += len(<bytes>item)
            else:
                PyObject_GetBuffer(item, &b, PyBUF_SIMPLE)
                try:
                    if b.len > max_len:
                        return i - start
                    r = self.c_put_inline(<char*>b.buf, b.len)
                    if r == 0:
                        self.batch_bytes += b.len
                finally:
                    PyBuffer_Release(&b)
            if r < 0:
                return i - start
        return n - start

    def send_rows(self, rows, Py_ssize_t start, Py_ssize_t row_len):
        """Batch: rows[start:] of a C-contiguous buffer of row_len-byte rows, one inline frame
        each, while they fit. Returns how many were written; each is committed as it is written."""
        cdef Py_buffer b
        cdef Py_ssize_t i, count
        cdef const char* base
        if row_len <= 0:
            raise ValueError("row_len must be positive")
        PyObject_GetBuffer(rows, &b, PyBUF_SIMPLE)
        try:
            self.live()
            count = b.len // row_len
            if b.len != count * row_len or not 0 <= start <= count:
                raise ValueError(f"a buffer of {b.len} bytes is not rows of {row_len} bytes from row {start}")
            base = <const char*>b.buf
            i = start
            while i < count and self.c_put_inline(base + i * row_len, row_len) == 0:
                i += 1
            self.batch_bytes = (i - start) * row_len
            return i - start
        finally:
            PyBuffer_Release(&b)

    def consumer_waiting(self):
        """After a commit: does the consumer sleep (full fence, then load)?"""
        self.live()
        return self.c_waiting(False)

    def write_slot_ref(self, uint8_t class_idx, uint8_t extent_idx, uint32_t slot_idx, uint32_t generation):
        """Append a slot-ref frame; False if the ring has no room now."""
        cdef Py_ssize_t off = self.c_grant(SHMHUB_SLOT_REF_FRAME_SIZE)
        if off < 0:
            return False
        put_slot_ref(self.data + off, class_idx, extent_idx, slot_idx, generation)
        self.c_commit(SHMHUB_SLOT_REF_FRAME_SIZE)
        return True

    def write_mmap_ref(self, uint32_t map_id, uint32_t map_generation, uint64_t map_offset, uint32_t payload_len, uint32_t flags=0):
        """Append an mmap-ref frame (flags: MR_FLAGS); False if the ring has no room now."""
        cdef Py_ssize_t off = self.c_grant(SHMHUB_MMAP_REF_FRAME_SIZE)
        if off < 0:
            return False
        put_mmap_ref(self.data + off, map_id, map_generation, map_offset, payload_len, flags)
        self.c_commit(SHMHUB_MMAP_REF_FRAME_SIZE)
        return True

    # -- consumer --------------------------------------------------------------------------

    cdef Py_ssize_t c_readable(self, Py_ssize_t* start) except -1:
        self.live()
        cdef uint32_t r = self.idx(SHMHUB_RING_READ, SHM_RELAXED)
        cdef Py_ssize_t n = <Py_ssize_t>self.run_end - r
        # Committed bytes seen earlier and not consumed yet hold the next frame whole: no remote
        # load. A frame running past them (published in parts) needs a fresh look.
        if n >= <Py_ssize_t>SHMHUB_FRAME_HEADER_SIZE and shm_get_u32(self.data + r + SHMHUB_FRAME_TOTAL_LEN) <= n:
            start[0] = r
            return n
        n = self.c_readable_fresh(r, start)
        self.run_end = <uint32_t>(start[0] + n)
        return n

    cdef Py_ssize_t c_readable_fresh(self, uint32_t r, Py_ssize_t* start) except -1:
        # write before watermark (trap 1): seeing a wrapped write implies seeing its watermark.
        cdef uint32_t w = self.idx(SHMHUB_RING_WRITE, SHM_ACQUIRE)
        cdef uint32_t wm = self.idx(SHMHUB_RING_WATERMARK, SHM_ACQUIRE)
        if wm != 0:
            if r < wm:
                start[0] = r
                return wm - r  # the tail before the wrap comes first (trap 2)
            # A settled wrap has write < read <= watermark. write >= watermark means the producer has
            # stored the watermark but not yet write = 0: [0, watermark) is the previous lap, already
            # consumed. Nothing is readable yet and nothing may be reset (docs/deviations.md, ring 1).
            if self.idx(SHMHUB_RING_WRITE, SHM_ACQUIRE) >= wm:
                start[0] = r
                return 0
            self.wlive()
            shm_store32(self.hdr + SHMHUB_RING_READ, 0, SHM_RELEASE)
            SHM_CRASHPOINT("read.reset")
            shm_store32(self.hdr + SHMHUB_RING_WATERMARK, 0, SHM_RELEASE)
            w = self.idx(SHMHUB_RING_WRITE, SHM_ACQUIRE)
            start[0] = 0
            return w
        if r > w:
            raise LinkCorrupted(f"ring at {self.offset}: read {r} is past write {w} with no watermark")
        start[0] = r
        return w - r

    cdef int c_release(self, uint32_t n) except -1:
        self.wlive()
        cdef uint32_t r = self.idx(SHMHUB_RING_READ, SHM_RELAXED)
        if n > self.capacity - r:
            raise LinkCorrupted(f"release of {n} bytes at read {r} overruns capacity {self.capacity}")
        cdef uint32_t nr = r + n
        if nr < self.run_end:  # inside a run found readable: short of any watermark
            shm_store32(self.hdr + SHMHUB_RING_READ, nr, SHM_RELEASE)
            return 0
        self.run_end = 0
        cdef uint32_t wm = self.idx(SHMHUB_RING_WATERMARK, SHM_ACQUIRE)
        if wm != 0 and nr >= wm and self.idx(SHMHUB_RING_WRITE, SHM_ACQUIRE) < wm:  # not mid-wrap (see c_readable)
            shm_store32(self.hdr + SHMHUB_RING_READ, 0, SHM_RELEASE)
            SHM_CRASHPOINT("release.reset")
            shm_store32(self.hdr + SHMHUB_RING_WATERMARK, 0, SHM_RELEASE)
        else:
            shm_store32(self.hdr + SHMHUB_RING_READ, nr, SHM_RELEASE)
        SHM_CRASHPOINT("release.done")
        return 0

    def readable(self):
        """(offset, length) of the next contiguous readable bytes; length 0 when empty."""
        cdef Py_ssize_t start = 0
        cdef Py_ssize_t n = self.c_readable(&start)
        return (start, n)

    def read_data(self, Py_ssize_t offset, Py_ssize_t n):
        """Copy n bytes of the data area at offset."""
        if offset < 0 or n < 0 or n > <Py_ssize_t>self.capacity - offset:
            raise IndexError(f"read of {n} bytes at {offset} outside ring capacity {self.capacity}")
        self.live()
        return PyBytes_FromStringAndSize(self.data + offset, n)

    def release(self, uint32_t n):
        """Give n consumed bytes back to the producer (Release)."""
        self.c_release(n)

    def read_frame(self):
        """The next frame as decode_frame returns it, or None when empty. Does not release it:
        the caller releases total_len bytes once it has taken what the frame refers to."""
        cdef Py_ssize_t start = 0
        cdef Py_ssize_t n = self.c_readable(&start)
        if n == 0:
            return None
        cdef uint32_t total = check_frame(self.data + start, n)
        return decode_checked(self.data + start, total)

    cdef object c_take_inline(self):
        """If the next frame is inline: copy its payload out, release it, return the bytes.
        None when empty; the frame tuple (not released) when it is a reference frame."""
        cdef Py_ssize_t start = 0
        cdef Py_ssize_t n = self.c_readable(&start)
        if n == 0:
            return None
        cdef const char* p = self.data + start
        cdef uint32_t total = check_frame(p, n)
        cdef uint32_t ilen
        if (<uint8_t>p[SHMHUB_FRAME_FLAGS]) & (SHMHUB_FLAG_SLOT_REF | SHMHUB_FLAG_MMAP_REF):
            return decode_checked(p, total)
        ilen = shm_get_u16(p + SHMHUB_FRAME_INLINE_LEN)
        if ilen == 0:  # legacy writer (format-v7 1.5)
            ilen = total - SHMHUB_FRAME_HEADER_SIZE
        out = PyBytes_FromStringAndSize(p + SHMHUB_FRAME_HEADER_SIZE, ilen)
        self.c_release(total)
        return out

    def recv_inline(self, bint check_waiter=False):
        """Hot path: the next inline payload as bytes (released), None when empty, or the next
        reference frame as a tuple (not released). With check_waiter, `producer_waiting` tells
        afterwards whether the producer announced it sleeps (ring its doorbell)."""
        out = self.c_take_inline()
        self.producer_waiting = check_waiter and type(out) is bytes and self.c_wake_due(1)
        return out

    def recv_inline_many(self, Py_ssize_t max_count, bint check_waiter=False):
        """Batch: up to max_count consecutive inline payloads (bytes), released. Stops early at an
        empty ring or a reference frame (left in the ring for the caller's slower path)."""
        cdef list out = []
        cdef Py_ssize_t start = 0, n
        cdef const char* p
        self.batch_bytes = 0
        while len(out) < max_count:
            n = self.c_readable(&start)
            if n == 0:
                break
            p = self.data + start
            check_frame(p, n)
            if (<uint8_t>p[SHMHUB_FRAME_FLAGS]) & (SHMHUB_FLAG_SLOT_REF | SHMHUB_FLAG_MMAP_REF):
                break
            item = self.c_take_inline()
            self.batch_bytes += len(<bytes>item)
            out.append(item)
        self.producer_waiting = check_waiter and len(out) > 0 and self.c_wake_due(len(out))
        return out

    # -- sleeping and waking (FEATURE_WAITER_FLAGS) -----------------------------------------
    # Dekker pattern: the sleeper stores its flag, fences, re-checks the ring; the other side
    # publishes (commit/release), fences, loads the flag. One of the two always sees the other,
    # so a wakeup is never lost, and no doorbell is rung while nobody sleeps.

    def set_waiting(self, bint producer, uint32_t value):
        """Announce (1) or withdraw (0) that this ring's producer / consumer is about to sleep."""
        self.wlive()
        shm_store32(self.hdr + (SHMHUB_RING_PRODUCER_WAITING if producer else SHMHUB_RING_CONSUMER_WAITING), value, SHM_SEQ_CST)
        shm_fence(SHM_SEQ_CST)

    def peer_waiting(self, bint producer):
        """After publishing: does the ring's producer / consumer sleep (so it must be rung)?"""
        self.live()
        shm_fence(SHM_SEQ_CST)
        return shm_load32(self.hdr + (SHMHUB_RING_PRODUCER_WAITING if producer else SHMHUB_RING_CONSUMER_WAITING), SHM_ACQUIRE) != 0

    def claim_peer_waiting(self, bint producer):
        """After publishing: if the ring's producer / consumer announced it sleeps, withdraw the
        announcement (CAS to 0) and return True, so the caller rings the doorbell once per sleep,
        not once per frame while the sleeper is waking up. The sleeper announces again before it
        sleeps again, so this loses no wakeup."""
        self.wlive()
        return self.c_waiting(producer)

    cdef inline bint c_has_data(self) noexcept nogil:
        return hdr_has_data(self.hdr)

    cdef inline bint c_room(self, uint32_t n) noexcept nogil:
        cdef uint32_t w = shm_load32(self.hdr + SHMHUB_RING_WRITE, SHM_RELAXED)
        cdef uint32_t r
        if w > self.capacity:
            return True  # let the caller's real grant report the corruption
        if self.seen_read_ok and fits(w, self.seen_read, n, self.capacity):
            return True
        r = shm_load32(self.hdr + SHMHUB_RING_READ, SHM_ACQUIRE)
        if r > self.capacity:
            return True
        self.seen_read, self.seen_read_ok = r, True
        return fits(w, r, n, self.capacity)

    def has_data(self):
        """Whether a read may find a frame (a cheap check; read_frame decides)."""
        self.live()
        return self.c_has_data()

    def spin_readable(self, int64_t spin_ns):
        """Poll for data for up to spin_ns with a CPU pause, without the GIL. True if data came."""
        return self._spin(0, spin_ns)

    def spin_room(self, uint32_t n, int64_t spin_ns):
        """Poll for room for an n-byte entry for up to spin_ns, without the GIL."""
        return self._spin(n, spin_ns)

    cdef bint _spin(self, uint32_t n, int64_t spin_ns) except -1:
        cdef bint ok = False
        cdef int64_t deadline
        cdef unsigned int i = 0
        self.region.pin()  # the mapping must outlive the GIL-free loop even if closed meanwhile
        try:
            with nogil:
                deadline = now_ns() + spin_ns
                while True:
                    ok = self.c_room(n) if n else self.c_has_data()
                    if ok:
                        break
                    shm_cpu_relax()
                    i += 1
                    if (i & 63) == 0 and now_ns() >= deadline:
                        break
        finally:
            self.region.unpin()
        return ok

    def forget(self):
        """Drop what this side learned of the other's index (seen_read, run_end): needed only
        after the indices were changed outside the protocol (reset, a test forging a state)."""
        self.seen_read_ok = False
        self.run_end = 0

    def reset(self):
        """Zero all indices. Crash recovery only: the other side must be dead."""
        self.wlive()
        self.forget()
        shm_store32(self.hdr + SHMHUB_RING_WRITE, 0, SHM_RELEASE)
        shm_store32(self.hdr + SHMHUB_RING_WATERMARK, 0, SHM_RELEASE)
        shm_store32(self.hdr + SHMHUB_RING_READ, 0, SHM_RELEASE)
        shm_store32(self.hdr + SHMHUB_RING_PRODUCER_WAITING, 0, SHM_RELEASE)
        shm_store32(self.hdr + SHMHUB_RING_CONSUMER_WAITING, 0, SHM_RELEASE)
        if self.counting:
            shm_store64(self.hdr + SHMHUB_RING_SENT_MESSAGES, 0, SHM_RELAXED)
            shm_store64(self.hdr + SHMHUB_RING_SENT_BYTES, 0, SHM_RELAXED)
            shm_store64(self.hdr + SHMHUB_RING_DOORBELLS, 0, SHM_RELAXED)

    cdef inline void c_count(self, uint64_t messages, uint64_t nbytes) noexcept:
        """Add to the producer's running totals (FEATURE_RING_COUNTERS). The producer's send lock
        is held: one writer, so a relaxed load and store suffice (no read-modify-write)."""
        if self.counting:
            shm_store64(self.hdr + SHMHUB_RING_SENT_MESSAGES,
                        shm_load64(self.hdr + SHMHUB_RING_SENT_MESSAGES, SHM_RELAXED) + messages, SHM_RELAXED)
            shm_store64(self.hdr + SHMHUB_RING_SENT_BYTES,
                        shm_load64(self.hdr + SHMHUB_RING_SENT_BYTES, SHM_RELAXED) + nbytes, SHM_RELAXED)

    def count_sent(self, uint64_t messages, uint64_t nbytes):
        """Producer (send lock held): `messages` more committed, carrying `nbytes` of payload."""
        self.wlive()
        self.c_count(messages, nbytes)

    def count_doorbell(self):
        """The producer's process rang its peer's doorbell (FEATURE_RING_COUNTERS). An atomic add:
        the ringing thread need not hold the send lock (a doorbell costs a syscall anyway)."""
        if self.counting and not self.region.closed and self.region.writable:  # never fails a ring
            shm_fetch_add64(self.hdr + SHMHUB_RING_DOORBELLS, 1, SHM_RELAXED)

    @property
    def doorbells(self):
        """Doorbells the producer's process rang its peer (FEATURE_RING_COUNTERS), else None."""
        if not self.counting:
            return None
        self.live()
        return shm_load64(self.hdr + SHMHUB_RING_DOORBELLS, SHM_RELAXED)

    @property
    def sent(self):
        """(messages, payload bytes) the producer has committed (FEATURE_RING_COUNTERS), else None."""
        if not self.counting:
            return None
        self.live()
        return (shm_load64(self.hdr + SHMHUB_RING_SENT_MESSAGES, SHM_RELAXED),
                shm_load64(self.hdr + SHMHUB_RING_SENT_BYTES, SHM_RELAXED))

    @property
    def waiting(self):
        """(producer_waiting, consumer_waiting) flags, for inspection."""
        self.live()
        return (shm_load32(self.hdr + SHMHUB_RING_PRODUCER_WAITING, SHM_ACQUIRE),
                shm_load32(self.hdr + SHMHUB_RING_CONSUMER_WAITING, SHM_ACQUIRE))

    @property
    def indices(self):
        """(write, watermark, read) as loaded now (Acquire), for inspection."""
        self.live()
        return (shm_load32(self.hdr + SHMHUB_RING_WRITE, SHM_ACQUIRE),
                shm_load32(self.hdr + SHMHUB_RING_WATERMARK, SHM_ACQUIRE),
                shm_load32(self.hdr + SHMHUB_RING_READ, SHM_ACQUIRE))


# ---------------------------------------------------------------------------------------------
# SlotPool: the VarSlotPool's Treiber stacks (algorithms.md 2.3, DECISIONS 8-9)
# ---------------------------------------------------------------------------------------------

cdef struct ClassInfo:
    uint32_t slot_size
    uint32_t slot_count
    Py_ssize_t header
    int max_extents  # 1 for a v7 class
    int nmapped  # extents this process maps
    char* meta[SHMHUB_MAX_EXTENTS]
    char* data[SHMHUB_MAX_EXTENTS]


class NeedExtent(Exception):
    """Internal: a slot lives in an extent this process has not mapped yet (args: class, extent)."""


cdef inline void journal_set(char* j, uint64_t op, int c, uint32_t g, uint32_t gen) noexcept nogil:
    # FEATURE_POOL_JOURNAL: the generation first; the op word (Release) publishes the record. The
    # CAS that follows is a release too, so whoever sees that CAS's effect sees the record.
    shm_store32(j + (SHMHUB_PEER_POOL_OP_GEN - SHMHUB_PEER_POOL_OP), gen, SHM_RELAXED)
    shm_store64(j, (op << 56) | (<uint64_t>c << 32) | g, SHM_RELEASE)


cdef inline uint64_t meta_word(uint32_t gen, uint32_t state) noexcept nogil:
    # generation (+0) and state (+4) form one little-endian u64: the free CAS keys on both.
    return (<uint64_t>state << 32) | gen


cdef class SlotPool:
    """The slot classes of a segment. `classes` is a sequence of (slot_size, slot_count,
    header_offset, meta_offset, data_offset[, max_extents]) as computed by layout.Layout; every range is
    checked against the region here, so slot indices below slot_count are always in bounds.

    Growable classes (FEATURE_EXTENTS) have further extents, each its own Region, added with
    add_extent(). Free-list indices are global (extent * slot_count + slot); meeting an extent
    not mapped yet raises NeedExtent before anything is changed, so the caller maps it and retries."""
    cdef readonly Region region
    cdef ClassInfo cls[256]
    cdef readonly int num_classes
    cdef list extent_regions  # per class: [Region or None for extent 0, ...]
    cdef Py_ssize_t journal_base
    cdef readonly uint32_t journal_count
    cdef public bint waiters  # FEATURE_POOL_WAITERS: freers wake the class's futex sleepers

    def __init__(self, Region region, classes, journals=None):
        """`journals` = (peer_table_offset, max_guests) turns on FEATURE_POOL_JOURNAL: a guest's pop
        and free record the slot in its peer entry while they run, so recover_pool_op() can finish
        the operation if the guest dies inside it (docs/deviations.md, slots 2)."""
        if journals is not None:
            base, count = journals
            if count:
                region.ptr(base, <Py_ssize_t>count * SHMHUB_PEER_ENTRY_SIZE, 64)
            self.journal_base = base
            self.journal_count = count
        classes = list(classes)
        if not 1 <= len(classes) <= <int>SHMHUB_MAX_CLASSES:
            raise SegmentCorrupted(f"{len(classes)} slot classes; the format allows 1 to {SHMHUB_MAX_CLASSES}")
        self.region = region
        self.num_classes = len(classes)
        self.extent_regions = []
        for i, spec in enumerate(classes):
            size, count, header, meta, data = spec[:5]
            max_ext = spec[5] if len(spec) > 5 else 1
            if not 1 <= max_ext <= <int>SHMHUB_MAX_EXTENTS:
                raise SegmentCorrupted(f"slot class {i}: max_extents {max_ext} out of range")
            if size < SHMHUB_SLOT_LEN_PREFIX or count < 1 or <uint64_t>count * SHMHUB_MAX_EXTENTS >= SHMHUB_EMPTY_INDEX:
                raise SegmentCorrupted(f"slot class {i}: slot_size {size} / slot_count {count} out of range")
            region.ptr(header, SHMHUB_CLASS_HEADER_SIZE, 64)
            self.cls[i].slot_size = size
            self.cls[i].slot_count = count
            self.cls[i].header = header
            self.cls[i].meta[0] = region.ptr(meta, <Py_ssize_t>SHMHUB_SLOT_META_SIZE * count, 16)
            self.cls[i].data[0] = region.ptr(data, <Py_ssize_t>size * count, 1)
            self.cls[i].nmapped = 1
            self.cls[i].max_extents = max_ext
            self.extent_regions.append([region])

    def add_extent(self, int class_idx, Region region, Py_ssize_t data_offset):
        """Use `region` as the next extent: the meta array at 0, slot data at data_offset
        (layout.extent_layout); both ranges are checked against the region."""
        self.check_class(class_idx)
        cdef ClassInfo* ci = &self.cls[class_idx]
        if ci.nmapped >= ci.max_extents:
            raise SegmentCorrupted(f"class {class_idx} already has its {ci.nmapped} extents")
        cdef Py_ssize_t meta_size = data_offset
        if meta_size < <Py_ssize_t>SHMHUB_SLOT_META_SIZE * ci.slot_count:
            raise SegmentCorrupted(f"extent data offset {data_offset} overlaps its slot metadata")
        ci.meta[ci.nmapped] = region.ptr(0, <Py_ssize_t>SHMHUB_SLOT_META_SIZE * ci.slot_count, 16)
        ci.data[ci.nmapped] = region.ptr(meta_size, <Py_ssize_t>ci.slot_size * ci.slot_count, 1)
        self.extent_regions[class_idx].append(region)
        ci.nmapped += 1

    def mapped_extents(self, int class_idx):
        self.check_class(class_idx)
        return self.cls[class_idx].nmapped

    cdef inline char* base(self) except NULL:
        if self.region.closed:
            raise ValueError("slot pool's region is closed")
        return self.region.base

    cdef inline char* wbase(self) except NULL:
        if not self.region.writable:  # a read-only attach (inspect) must never store
            raise PermissionError("region is mapped read-only")
        return self.base()

    cdef inline int check_class(self, int c) except -1:
        if c < 0 or c >= self.num_classes:
            raise InvalidSlotRef(f"class_idx {c} out of range (pool has {self.num_classes} classes)")
        return 0

    cdef inline int check_ref(self, int c, int extent, uint32_t s) except -1:
        # trap 23: class, extent and slot index all bounds-checked before any use.
        self.check_class(c)
        if extent < 0 or extent >= self.cls[c].max_extents:
            raise InvalidSlotRef(f"extent_idx {extent} out of range (class {c} has at most {self.cls[c].max_extents} extents)")
        if s >= self.cls[c].slot_count:
            raise InvalidSlotRef(f"slot_idx {s} out of range (class {c} has {self.cls[c].slot_count} slots per extent)")
        if extent >= self.cls[c].nmapped:
            raise NeedExtent(c, extent)
        self.base()
        return 0

    cdef inline char* meta(self, int c, int e, uint32_t s) noexcept:
        return self.cls[c].meta[e] + <Py_ssize_t>s * SHMHUB_SLOT_META_SIZE

    cdef inline char* slot_data(self, int c, int e, uint32_t s) noexcept:
        return self.cls[c].data[e] + <Py_ssize_t>s * self.cls[c].slot_size

    def format(self):
        """Write empty class headers and free lists (host, before the segment is shared)."""
        cdef char* b = self.base()
        cdef int c
        if not self.region.writable:
            raise PermissionError("region is mapped read-only")
        for c in range(self.num_classes):
            shm_put_u32(b + self.cls[c].header + SHMHUB_CLS_SLOT_SIZE, self.cls[c].slot_size)
            shm_put_u32(b + self.cls[c].header + SHMHUB_CLS_SLOT_COUNT, self.cls[c].slot_count)
            shm_store64(b + self.cls[c].header + SHMHUB_CLS_FREE_HEAD, 0, SHM_RELAXED)
            chain_meta(self.cls[c].meta[0], self.cls[c].slot_count, 0)
        shm_fence(SHM_RELEASE)

    cdef long long pop(self, int c, uint32_t owner, uint32_t* gen_out) except -2:
        """Pop a slot of class c for owner: its global index (and its new generation in *gen_out),
        or -1 when the class is exhausted. The generation is not packed into the result: one of
        2**31 or more made it negative, read as exhausted, and the slot popped was lost."""
        cdef ClassInfo* ci = &self.cls[c]
        cdef char* headp = self.wbase() + ci.header + SHMHUB_CLS_FREE_HEAD
        cdef char* j = self.journal(owner)
        cdef uint64_t head, seen, new
        cdef uint32_t idx, nxt, gen, s
        cdef int e
        cdef char* m
        head = shm_load64(headp, SHM_ACQUIRE)
        while True:
            idx = <uint32_t>(head & 0xFFFFFFFF)
            if idx == SHMHUB_EMPTY_INDEX:
                if j != NULL:
                    shm_store64(j, 0, SHM_RELEASE)
                return -1
            e = idx / ci.slot_count
            s = idx % ci.slot_count
            if e >= ci.max_extents:
                raise SegmentCorrupted(f"class {c} free list head {idx} is out of range")
            if e >= ci.nmapped:
                if j != NULL:
                    shm_store64(j, 0, SHM_RELEASE)
                raise NeedExtent(c, e)  # nothing changed yet: map it and call again
            m = self.meta(c, e, s)
            if j != NULL:  # a guest killed between the CAS and the Allocated store is recoverable
                journal_set(j, SHMHUB_POOL_OP_POP, c, idx, shm_load32(m + SHMHUB_META_GENERATION, SHM_ACQUIRE))
                SHM_CRASHPOINT("pop.journaled")
            nxt = shm_load32(m + SHMHUB_META_NEXT_FREE, SHM_ACQUIRE)
            # The ABA tag rides along through EMPTY and is never reset (trap 24).
            new = (((head >> 32) + 1) << 32) | nxt
            seen = shm_cas64(headp, head, new)
            if seen == head:
                break
            head = seen
        SHM_CRASHPOINT("pop.taken")
        gen = shm_load32(m + SHMHUB_META_GENERATION, SHM_RELAXED) + 1
        shm_store32(m + SHMHUB_META_OWNER, owner, SHM_RELAXED)
        SHM_CRASHPOINT("pop.owned")
        shm_store64(m + SHMHUB_META_GENERATION, meta_word(gen, <uint32_t>SHMHUB_SLOT_ALLOCATED), SHM_RELEASE)
        SHM_CRASHPOINT("pop.allocated")
        if j != NULL:
            shm_store64(j, 0, SHM_RELEASE)
        gen_out[0] = gen
        return idx

    # -- the pool-op journal (FEATURE_POOL_JOURNAL) ------------------------------------------

    cdef inline char* journal(self, uint32_t peer) except? NULL:
        """The PEER_POOL_OP word of a guest, or NULL (the host and journal-less pools keep none:
        the host's pool calls hold the GIL, so its own recovery never sees them half done)."""
        if peer == 0 or peer > self.journal_count:
            return NULL
        return self.base() + self.journal_base + <Py_ssize_t>(peer - 1) * SHMHUB_PEER_ENTRY_SIZE + SHMHUB_PEER_POOL_OP

    cdef int listed(self, int c, uint32_t g) except -2:
        """1 if global slot g is on class c's free list, 0 if not, -1 if no consistent view was had.
        A walk is a snapshot when the head word (its ABA tag counts every push and pop) is the
        same before and after it: nodes on the list never change their next_free."""
        cdef ClassInfo* ci = &self.cls[c]
        cdef char* headp = self.base() + ci.header + SHMHUB_CLS_FREE_HEAD
        cdef uint64_t h1
        cdef uint32_t idx, steps, total = ci.slot_count * <uint32_t>ci.nmapped
        cdef int attempt, found
        for attempt in range(4096):
            h1 = shm_load64(headp, SHM_ACQUIRE)
            idx = <uint32_t>(h1 & 0xFFFFFFFF)
            found = 0
            steps = 0
            while idx != SHMHUB_EMPTY_INDEX and idx < total and steps <= total:
                if idx == g:
                    found = 1
                    break
                idx = shm_load32(self.meta(c, idx / ci.slot_count, idx % ci.slot_count) + SHMHUB_META_NEXT_FREE, SHM_ACQUIRE)
                steps += 1
            if shm_load64(headp, SHM_ACQUIRE) == h1:
                if not found and idx != SHMHUB_EMPTY_INDEX:
                    raise SegmentCorrupted(f"class {c} free list is broken (index {idx} after {steps} steps)")
                return found
            shm_cpu_relax()
        return -1

    def recover_pool_op(self, uint32_t peer):
        """Crash recovery: finish the pop or free a dead guest was in the middle of.

        Returns (slots_freed, resolved). resolved is False when it cannot be decided yet (a live
        peer is itself mid-pop or mid-free of the very slot, or the free list never held still for
        a look): call again shortly. Clears the journal once resolved."""
        cdef char* j = self.journal(peer)
        cdef uint64_t word, w, seen
        cdef uint32_t gen, g, s
        cdef int c, e, op, n, on_list
        cdef char* m
        if j == NULL:
            return (0, True)
        self.wbase()
        word = shm_load64(j, SHM_ACQUIRE)
        gen = shm_load32(j + (SHMHUB_PEER_POOL_OP_GEN - SHMHUB_PEER_POOL_OP), SHM_ACQUIRE)
        op = <int>(word >> 56)
        c = <int>((word >> 32) & 0xFF)
        g = <uint32_t>(word & 0xFFFFFFFF)
        if op not in (SHMHUB_POOL_OP_POP, SHMHUB_POOL_OP_FREE) or c >= self.num_classes or \
                g / self.cls[c].slot_count >= <uint32_t>self.cls[c].nmapped:
            shm_store64(j, 0, SHM_RELEASE)
            return (0, True)  # nothing in progress (or a record that names no slot: nothing to do)
        e = g / self.cls[c].slot_count
        s = g % self.cls[c].slot_count
        m = self.meta(c, e, s)
        w = shm_load64(m, SHM_ACQUIRE)
        n = 0
        if op == SHMHUB_POOL_OP_FREE and w == meta_word(gen, <uint32_t>SHMHUB_SLOT_ALLOCATED):
            n = self.c_free(c, e, s, gen, False, 0)  # died before marking it Free: finish the free
        elif w == meta_word(gen, <uint32_t>SHMHUB_SLOT_FREE):
            # Free under the journaled generation: still on the list (the pop never happened, or
            # the push did), or orphaned (popped but not yet Allocated / Free but not yet pushed).
            # Off the list, it is ours to restore -- unless a live guest popped it and is between its
            # CAS and its Allocated store, or freed it and is between its Free CAS and its push:
            # its journal names the slot until it is done. Looked at before the walk (a freer
            # may push the slot and clear its journal before we look after it) and after it (a
            # popper may take the slot between the first look and the walk). The dead guest's
            # record may be a stale pop, of a slot another guest has since taken and is freeing.
            # Both found by tests/interleave/pool.pml (docs/hardening.md).
            if self.journaled_elsewhere(peer, c, g):
                return (0, False)
            on_list = self.listed(c, g)
            if on_list < 0:
                return (0, False)
            if not on_list:
                if self.journaled_elsewhere(peer, c, g):
                    return (0, False)
                # Claim it as a pop would (a CAS: nobody else may hold it), then free it.
                seen = shm_cas64(m, meta_word(gen, <uint32_t>SHMHUB_SLOT_FREE), meta_word(gen + 1, <uint32_t>SHMHUB_SLOT_ALLOCATED))
                if seen != meta_word(gen, <uint32_t>SHMHUB_SLOT_FREE):
                    return (0, False)
                shm_store32(m + SHMHUB_META_OWNER, 0, SHM_RELAXED)
                n = self.c_free(c, e, s, gen + 1, False, 0)
        # else: the operation completed (reclaim() frees what the guest still owns) or the slot
        # has moved on since.
        shm_store64(j, 0, SHM_RELEASE)
        return (n, True)

    cdef bint journaled_elsewhere(self, uint32_t peer, int c, uint32_t g) except -1:
        """Whether a guest other than `peer` has a pop or a free of class c's global slot g in progress."""
        cdef uint32_t other
        cdef uint64_t word
        cdef int op
        for other in range(1, self.journal_count + 1):
            if other == peer:
                continue
            word = shm_load64(self.journal(other), SHM_ACQUIRE)
            op = <int>(word >> 56)
            if (op == SHMHUB_POOL_OP_POP or op == SHMHUB_POOL_OP_FREE) and \
                    <int>((word >> 32) & 0xFF) == c and <uint32_t>(word & 0xFFFFFFFF) == g:
                return True
        return False

    def pool_op(self, uint32_t peer):
        """(op, class_idx, global slot index, generation) journaled by a guest, or None."""
        cdef char* j = self.journal(peer)
        if j == NULL:
            return None
        cdef uint64_t word = shm_load64(j, SHM_ACQUIRE)
        return (<int>(word >> 56), <int>((word >> 32) & 0xFF), <uint32_t>(word & 0xFFFFFFFF),
                shm_load32(j + (SHMHUB_PEER_POOL_OP_GEN - SHMHUB_PEER_POOL_OP), SHM_ACQUIRE))

    cdef int push_chain(self, int c, uint32_t first, char* last_meta) except -1:
        """Push the chain first..(last_meta) whose links are already written (one slot: first)."""
        cdef char* headp = self.wbase() + self.cls[c].header + SHMHUB_CLS_FREE_HEAD
        cdef uint64_t head = shm_load64(headp, SHM_ACQUIRE)
        cdef uint64_t seen
        while True:
            shm_store32(last_meta + SHMHUB_META_NEXT_FREE, <uint32_t>(head & 0xFFFFFFFF), SHM_RELEASE)
            seen = shm_cas64(headp, head, (((head >> 32) + 1) << 32) | first)
            if seen == head:
                return 0
            head = seen

    cdef tuple split(self, int c, long long r, uint32_t gen):
        cdef uint32_t idx = <uint32_t>r
        return (c, <int>(idx / self.cls[c].slot_count), <uint32_t>(idx % self.cls[c].slot_count), gen)

    def alloc(self, Py_ssize_t size, uint32_t owner):
        """Allocate a slot holding at least `size` bytes from the smallest fitting class, then
        larger ones. Returns (class_idx, extent_idx, slot_idx, generation) -- the order free() and
        take() take -- or None when all are exhausted. NeedExtent if the next free slot is in an extent not mapped here yet."""
        cdef long long r
        cdef int c
        cdef uint32_t gen
        for c in range(self.num_classes):
            if self.cls[c].slot_size < size:
                continue
            r = self.pop(c, owner, &gen)
            if r >= 0:
                return self.split(c, r, gen)
        return None

    def alloc_in_class(self, int class_idx, uint32_t owner):
        """Allocate from one class only; (class_idx, extent_idx, slot_idx, generation) or None."""
        self.check_class(class_idx)
        cdef uint32_t gen
        cdef long long r = self.pop(class_idx, owner, &gen)
        if r < 0:
            return None
        return self.split(class_idx, r, gen)

    cdef int c_free(self, int c, int extent, uint32_t s, uint32_t gen, bint strict, uint32_t by) except -1:
        self.check_ref(c, extent, s)
        self.wbase()
        cdef char* m = self.meta(c, extent, s)
        cdef char* j
        cdef uint32_t g = <uint32_t>extent * self.cls[c].slot_count + s
        cdef uint64_t expected = meta_word(gen, <uint32_t>SHMHUB_SLOT_ALLOCATED)
        cdef uint64_t seen = shm_load64(m, SHM_ACQUIRE)
        if seen == expected:
            j = self.journal(by)
            if j != NULL:  # a guest killed between the CAS and the push is recoverable
                journal_set(j, SHMHUB_POOL_OP_FREE, c, g, gen)
                SHM_CRASHPOINT("free.journaled")
            # DECISIONS 8 / trap 21: only the winner of Allocated->Free clears the owner and pushes
            # the slot (a loser clearing it could clobber the owner of the slot's next allocation).
            seen = shm_cas64(m, expected, meta_word(gen, <uint32_t>SHMHUB_SLOT_FREE))
            if seen == expected:
                SHM_CRASHPOINT("free.marked")
                shm_store32(m + SHMHUB_META_OWNER, 0, SHM_RELAXED)
                self.push_chain(c, g, m)
                SHM_CRASHPOINT("free.pushed")
            if j != NULL:
                shm_store64(j, 0, SHM_RELEASE)
            if seen == expected:
                self.c_wake(c, 1)
                return 1
        if not strict:
            return 0
        if (seen >> 32) != SHMHUB_SLOT_ALLOCATED:
            raise DoubleFree(f"slot class {c} extent {extent} idx {s} generation {gen} is not allocated (double free)")
        raise StaleSlotRef(f"slot class {c} extent {extent} idx {s}: reference generation {gen}, slot is at {<uint32_t>seen}")

    def free(self, int class_idx, int extent_idx, uint32_t slot_idx, uint32_t generation, uint32_t by=0):
        """Free an allocated slot. DoubleFree / StaleSlotRef / InvalidSlotRef on a bad reference.
        `by`: the freeing peer (a guest journals the operation, see recover_pool_op)."""
        self.c_free(class_idx, extent_idx, slot_idx, generation, True, by)

    def free_if_current(self, int class_idx, int extent_idx, uint32_t slot_idx, uint32_t generation, uint32_t by=0):
        """Free the slot if it is still allocated under `generation`; True if this call freed it.
        Never raises for a stale or already-freed reference (crash recovery must be idempotent)."""
        return bool(self.c_free(class_idx, extent_idx, slot_idx, generation, False, by))

    def take(self, int class_idx, int extent_idx, uint32_t slot_idx, uint32_t generation, uint32_t new_owner):
        """Become the owner of a received slot (DECISIONS 9); returns its payload length.
        The generation is re-checked after the owner store, before any data is exposed."""
        return self.c_take(class_idx, extent_idx, slot_idx, generation, new_owner)

    cdef long long c_take(self, int class_idx, int extent_idx, uint32_t slot_idx, uint32_t generation, uint32_t new_owner) except -1:
        self.check_ref(class_idx, extent_idx, slot_idx)
        self.wbase()
        cdef char* m = self.meta(class_idx, extent_idx, slot_idx)
        cdef uint64_t expected = meta_word(generation, <uint32_t>SHMHUB_SLOT_ALLOCATED)
        if shm_load64(m, SHM_ACQUIRE) != expected:
            self.c_free(class_idx, extent_idx, slot_idx, generation, True, 0)  # raises the precise error
        shm_store32(m + SHMHUB_META_OWNER, new_owner, SHM_RELEASE)
        SHM_CRASHPOINT("take.owned")
        if shm_load64(m, SHM_ACQUIRE) != expected:
            raise StaleSlotRef(f"slot class {class_idx} idx {slot_idx} changed while being received")
        cdef uint32_t n = shm_get_u32(self.slot_data(class_idx, extent_idx, slot_idx))
        if n > self.cls[class_idx].slot_size - SHMHUB_SLOT_LEN_PREFIX:
            raise InvalidSlotRef(f"slot class {class_idx} idx {slot_idx}: length prefix {n} exceeds "
                                 f"slot_size {self.cls[class_idx].slot_size} - 4")
        return n

    def payload_len(self, int class_idx, uint32_t slot_idx, int extent_idx=0):
        """The u32 length prefix of a slot, checked against the slot size (format-v7 1.6)."""
        self.check_ref(class_idx, extent_idx, slot_idx)
        cdef uint32_t n = shm_get_u32(self.slot_data(class_idx, extent_idx, slot_idx))
        if n > self.cls[class_idx].slot_size - SHMHUB_SLOT_LEN_PREFIX:
            raise InvalidSlotRef(f"slot class {class_idx} idx {slot_idx}: length prefix {n} exceeds "
                                 f"slot_size {self.cls[class_idx].slot_size} - 4")
        return n

    def write_payload(self, int class_idx, uint32_t slot_idx, data, int extent_idx=0):
        """Write [u32 len][data] into a slot."""
        self.check_ref(class_idx, extent_idx, slot_idx)
        self.wbase()
        cdef Py_buffer b
        cdef char* p
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
        try:
            if b.len > <Py_ssize_t>(self.cls[class_idx].slot_size - SHMHUB_SLOT_LEN_PREFIX):
                raise ValueError(f"{b.len} bytes do not fit in a {self.cls[class_idx].slot_size}-byte slot")
            p = self.slot_data(class_idx, extent_idx, slot_idx)
            shm_put_u32(p, <uint32_t>b.len)
            memcpy(p + SHMHUB_SLOT_LEN_PREFIX, b.buf, b.len)
        finally:
            PyBuffer_Release(&b)

    def set_payload_len(self, int class_idx, uint32_t slot_idx, uint32_t n, int extent_idx=0):
        """Store the length prefix after writing the payload in place (zero-copy send)."""
        self.check_ref(class_idx, extent_idx, slot_idx)
        self.wbase()
        if n > self.cls[class_idx].slot_size - SHMHUB_SLOT_LEN_PREFIX:
            raise ValueError(f"{n} bytes do not fit in a {self.cls[class_idx].slot_size}-byte slot")
        shm_put_u32(self.slot_data(class_idx, extent_idx, slot_idx), n)

    def payload_span(self, int class_idx, uint32_t slot_idx, int extent_idx=0):
        """(region, offset) of a slot's payload (after the length prefix)."""
        self.check_ref(class_idx, extent_idx, slot_idx)
        region = <Region>self.extent_regions[class_idx][extent_idx]
        return region, <Py_ssize_t>(self.slot_data(class_idx, extent_idx, slot_idx) - region.base) + SHMHUB_SLOT_LEN_PREFIX

    def payload_offset(self, int class_idx, uint32_t slot_idx):
        """Offset in the segment region of a payload in extent 0."""
        return self.payload_span(class_idx, slot_idx, 0)[1]

    def read_payload(self, int class_idx, uint32_t slot_idx, int extent_idx=0):
        """Copy a slot's payload out (bytes)."""
        n = self.payload_len(class_idx, slot_idx, extent_idx)
        return PyBytes_FromStringAndSize(self.slot_data(class_idx, extent_idx, slot_idx) + SHMHUB_SLOT_LEN_PREFIX, n)

    def reclaim(self, uint32_t owner):
        """Free every allocated slot owned by `owner` in the mapped extents (crash recovery); returns how many."""
        cdef int freed = 0
        cdef int c, e
        cdef uint32_t s
        cdef uint64_t w
        cdef char* m
        self.wbase()
        for c in range(self.num_classes):
            for e in range(self.cls[c].nmapped):
                for s in range(self.cls[c].slot_count):
                    m = self.meta(c, e, s)
                    w = shm_load64(m, SHM_ACQUIRE)
                    if (w >> 32) == SHMHUB_SLOT_ALLOCATED and shm_load32(m + SHMHUB_META_OWNER, SHM_ACQUIRE) == owner:
                        freed += self.c_free(c, e, s, <uint32_t>w, False, 0)
        if freed:
            self.wake_all()
        return freed

    # -- waiting for a free slot (FEATURE_POOL_WAITERS) -----------------------------------------
    # An eventcount per class (CLS_WAITERS, docs/extensions.md bit 4): a waiter sets the waiting bit
    # (SeqCst), re-tries the pop, then sleeps on the word's value; a freer pushes, fences, and if it
    # sees the bit clears it, advances the sequence and wakes one sleeper. Either the waiter's pop
    # sees the push or the freer sees the bit (Dekker), and a change between the waiter's store and
    # its sleep makes the sleep return at once, so no wakeup is lost. A waiter sets the bit again
    # whenever its sleep ends (others may still sleep), so the bit is self-correcting: a waiter
    # killed in its sleep costs at most one wake-up with nobody to wake, never a count that drifts.
    # Wake-one keeps 64 waiters from stampeding for each freed slot.

    cdef inline char* waiters_word(self, int c) noexcept:
        return self.region.base + self.cls[c].header + SHMHUB_CLS_WAITERS

    cdef int c_wake(self, int c, int n) noexcept:
        cdef char* p
        if not self.waiters or self.region.closed or not self.region.writable:
            return 0
        cdef uint32_t v, seen
        p = self.waiters_word(c)
        shm_fence(SHM_SEQ_CST)
        v = shm_load32(p, SHM_RELAXED)
        while v & SHMHUB_POOL_WAITERS_MASK:
            seen = shm_cas32(p, v, (v + <uint32_t>SHMHUB_POOL_WAKE_STEP) & ~(<uint32_t>SHMHUB_POOL_WAITERS_MASK))
            if seen == v:
                shm_futex_wake(p, n)
                return 1
            v = seen
        return 0

    def wake_all(self):
        """Wake every slot waiter of every class (recovery, growth, a closing link), whether the
        waiting bit is set or not: a waiter killed between its wake-up and setting the bit again
        may have left sleepers behind a clear bit."""
        cdef int c
        cdef char* p
        if not self.waiters or self.region.closed or not self.region.writable:
            return
        for c in range(self.num_classes):
            p = self.waiters_word(c)
            shm_fetch_add32(p, <uint32_t>SHMHUB_POOL_WAKE_STEP, SHM_SEQ_CST)
            shm_futex_wake(p, 0x7FFFFFFF)

    def waiting(self, int class_idx):
        """1 if a thread of some process may sleep waiting for a slot of this class, else 0."""
        self.check_class(class_idx)
        if not self.waiters:
            return 0
        return shm_load32(self.base() + self.cls[class_idx].header + SHMHUB_CLS_WAITERS, SHM_ACQUIRE) & SHMHUB_POOL_WAITERS_MASK

    cdef inline bint c_has_free(self, int c) noexcept:
        return (shm_load64(self.region.base + self.cls[c].header + SHMHUB_CLS_FREE_HEAD, SHM_ACQUIRE) & 0xFFFFFFFF) != SHMHUB_EMPTY_INDEX

    def wait_alloc(self, Py_ssize_t size, uint32_t owner, double timeout=-1, bint take=True):
        """Allocate like alloc(), sleeping (GIL released) on the fitting classes' futex words until a
        slot is freed or timeout seconds pass (< 0: no limit). The ref, or None: timed out, or woken
        while another took the slot; the caller re-checks its own conditions and calls again.
        take=False only waits: True when a fitting class has a free slot (asyncio waits so, in a
        thread, and then allocates on the loop all or nothing)."""
        cdef int cs[SHM_FUTEX_WAITV_MAX]
        cdef shm_futex_waitv wv[SHM_FUTEX_WAITV_MAX]
        cdef int n = 0, i, c, r = 0
        cdef long long got = -1
        cdef uint32_t gen = 0
        cdef timespec ts
        cdef int64_t t
        if not self.waiters:
            raise ValueError("this segment has no slot waiters (FEATURE_POOL_WAITERS)")
        self.wbase()
        for c in range(self.num_classes):
            if self.cls[c].slot_size >= size and n < SHM_FUTEX_WAITV_MAX:
                cs[n] = c
                n += 1
        if n == 0:
            return None
        for i in range(n):
            wv[i].val = shm_fetch_or32(self.waiters_word(cs[i]), <uint32_t>SHMHUB_POOL_WAITERS_MASK) | <uint32_t>SHMHUB_POOL_WAITERS_MASK
            wv[i].uaddr = <uint64_t>self.waiters_word(cs[i])
            wv[i].flags = FUTEX_32_FLAG
            wv[i].reserved = 0
        shm_fence(SHM_SEQ_CST)
        try:
            for i in range(n):
                got = self.pop(cs[i], owner, &gen) if take else (0 if self.c_has_free(cs[i]) else -1)
                if got >= 0:
                    c = cs[i]
                    break
            if got < 0:
                if timeout >= 0:
                    t = now_ns() + <int64_t>(timeout * 1e9)
                    ts.tv_sec = t // 1000000000
                    ts.tv_nsec = t % 1000000000
                self.region.pin()
                try:
                    with nogil:
                        r = shm_futex_wait_any(wv, n, &ts if timeout >= 0 else NULL)
                        if r == -ENOSYS:  # before Linux 5.16: the smallest fitting class only
                            if timeout >= 0:
                                ts.tv_sec = <long>timeout
                                ts.tv_nsec = <long>((timeout - <double>ts.tv_sec) * 1e9)
                            shm_futex_wait(<void*>wv[0].uaddr, <uint32_t>wv[0].val, &ts if timeout >= 0 else NULL)
                finally:
                    self.region.unpin()
                for i in range(n):
                    got = self.pop(cs[i], owner, &gen) if take else (0 if self.c_has_free(cs[i]) else -1)
                    if got >= 0:
                        c = cs[i]
                        break
        finally:
            for i in range(n):  # others may still sleep: the next freer must look (self-correcting bit)
                shm_fetch_or32(self.waiters_word(cs[i]), <uint32_t>SHMHUB_POOL_WAITERS_MASK)
        # Pass the baton: a slot freed while we were between our wake-up and setting the bit again
        # found the bit clear and woke nobody; if a fitting class still has free slots, wake one.
        if take:
            for i in range(n):
                if self.c_has_free(cs[i]):
                    self.c_wake(cs[i], 1)
        if not take:
            return got >= 0
        if got < 0:
            return None
        return self.split(c, got, gen)

    def counts(self, int class_idx):
        """(free, allocated) slot counts of a class over its mapped extents, from the slot states."""
        self.check_class(class_idx)
        self.base()
        cdef uint32_t s, free = 0
        cdef int e
        for e in range(self.cls[class_idx].nmapped):
            for s in range(self.cls[class_idx].slot_count):
                if shm_load32(self.meta(class_idx, e, s) + SHMHUB_META_STATE, SHM_ACQUIRE) == SHMHUB_SLOT_FREE:
                    free += 1
        return (free, self.cls[class_idx].slot_count * self.cls[class_idx].nmapped - free)

    def class_info(self, int class_idx):
        """(slot_size, slot_count per extent) of a class."""
        self.check_class(class_idx)
        return (self.cls[class_idx].slot_size, self.cls[class_idx].slot_count)

    def free_head(self, int class_idx):
        """(aba_tag, global index) of a class's free list head."""
        self.check_class(class_idx)
        cdef uint64_t h = shm_load64(self.base() + self.cls[class_idx].header + SHMHUB_CLS_FREE_HEAD, SHM_ACQUIRE)
        return (<uint32_t>(h >> 32), <uint32_t>(h & 0xFFFFFFFF))

    def slot_meta(self, int class_idx, uint32_t slot_idx, int extent_idx=0):
        """(generation, state, owner, next_free) of one slot."""
        self.check_ref(class_idx, extent_idx, slot_idx)
        cdef char* m = self.meta(class_idx, extent_idx, slot_idx)
        return (shm_load32(m + SHMHUB_META_GENERATION, SHM_ACQUIRE), shm_load32(m + SHMHUB_META_STATE, SHM_ACQUIRE),
                shm_load32(m + SHMHUB_META_OWNER, SHM_ACQUIRE), shm_load32(m + SHMHUB_META_NEXT_FREE, SHM_ACQUIRE))

    def publish_extent(self, int class_idx):
        """Host, after add_extent of a freshly formatted extent whose offset and count are
        published in the class header: push all its slots onto the class free list at once."""
        self.check_class(class_idx)
        cdef ClassInfo* ci = &self.cls[class_idx]
        cdef int e = ci.nmapped - 1
        if e < 1:
            raise ValueError("no appended extent to publish")
        self.push_chain(class_idx, <uint32_t>e * ci.slot_count, self.meta(class_idx, e, ci.slot_count - 1))
        self.wake_all()


cdef void chain_meta(char* meta, uint32_t count, uint32_t first_global) noexcept:
    """All slots Free, generation 0, linked first_global.. in order, the last to EMPTY."""
    cdef uint32_t s
    cdef char* m
    for s in range(count):
        m = meta + <Py_ssize_t>s * SHMHUB_SLOT_META_SIZE
        memset(m, 0, SHMHUB_SLOT_META_SIZE)
        shm_put_u32(m + SHMHUB_META_NEXT_FREE, first_global + s + 1 if s + 1 < count else <uint32_t>SHMHUB_EMPTY_INDEX)


def format_extent(Region region, uint32_t slot_count, uint32_t first_global):
    """Host: write a new extent's slot metadata: all Free, chained first_global.. to EMPTY."""
    chain_meta(region.wptr(0, <Py_ssize_t>SHMHUB_SLOT_META_SIZE * slot_count, 16), slot_count, first_global)
    shm_fence(SHM_RELEASE)


def spin_any_readable(rings, int64_t spin_ns):
    """Poll several rings for data for up to spin_ns without the GIL; index of one with data or -1."""
    cdef list rs = list(rings)
    cdef Py_ssize_t n = len(rs), k, found = -1
    cdef Ring r
    cdef char** hdrs
    cdef int64_t deadline
    cdef unsigned int i = 0
    if n == 0:
        return -1
    hdrs = <char**>PyMem_Malloc(n * sizeof(char*))
    if hdrs == NULL:
        raise MemoryError()
    pinned = []
    try:
        for k in range(n):
            r = <Ring?>rs[k]
            r.live()
            r.region.pin()
            pinned.append(r.region)
            hdrs[k] = r.hdr
        with nogil:
            deadline = now_ns() + spin_ns
            while found < 0:
                for k in range(n):
                    if hdr_has_data(hdrs[k]):
                        found = k
                        break
                if found >= 0:
                    break
                shm_cpu_relax()
                i += 1
                if (i & 63) == 0 and now_ns() >= deadline:
                    break
    finally:
        for reg in pinned:
            (<Region>reg).unpin()
        PyMem_Free(hdrs)
    return found


# ---------------------------------------------------------------------------------------------
# Message: a received payload exposing the buffer protocol (zero-copy for slot/mmap payloads)
# ---------------------------------------------------------------------------------------------

cdef object _pinned_view(object owner, Py_ssize_t offset, Py_ssize_t length):
    """A memoryview holding an export of any C-contiguous buffer: the memory stays put while it lives."""
    try:
        mv = memoryview(owner)
    except TypeError:
        raise TypeError("owner must be a Region, bytes or a C-contiguous buffer") from None
    if not mv.c_contiguous:
        mv.release()
        raise TypeError("owner must be a Region, bytes or a C-contiguous buffer")
    if offset < 0 or length < 0 or offset > mv.nbytes - length:
        mv.release()
        raise IndexError("message span outside its buffer")
    return mv


cdef const char* _view_ptr(object mv):
    cdef Py_buffer view
    PyObject_GetBuffer(mv, &view, PyBUF_SIMPLE)
    cdef const char* p = <const char*>view.buf
    PyBuffer_Release(&view)  # the memoryview keeps its own export, so p stays valid while it lives
    return p


cdef class Message:
    """A received payload. Supports the buffer protocol (read-only); slot and mapping payloads
    are views into shared memory, freed by release() or a with block (garbage collection frees
    them too, with a ResourceWarning, as for an unclosed file). release() refuses while
    memoryviews of the message are still alive; a with block that ends while some are alive
    releases the message when the last of them goes."""
    cdef object owner
    cdef const char* ptr
    cdef Py_ssize_t length
    cdef Py_ssize_t exports
    cdef object on_release
    cdef readonly str tier
    cdef bint released
    cdef bint release_pending  # a with block ended while views were alive: release with the last one
    cdef readonly bint writable
    cdef public object token  # what the link needs to send a reserved buffer
    cdef public bint owned_by_views  # link.empty(): the array owns it; the collector frees it quietly
    cdef SlotPool slot_pool  # set by recv_next: the slot is freed natively on release
    cdef Ring wake_ring  # with slot_pool: on_release() runs only if this ring's producer waits (claimed here)
    cdef int sc, se
    cdef uint32_t ss, sgen, sby

    def __init__(self, owner, Py_ssize_t offset, Py_ssize_t length, str tier, on_release=None, bint writable=False):
        """owner: a Region (the span is pinned) or a bytes object holding the payload.
        writable: export a writable buffer (reserved send buffers; the region must be writable)."""
        if writable and not (isinstance(owner, Region) and (<Region>owner).writable):
            raise ValueError("only a writable Region can back a writable message")
        if isinstance(owner, Region):
            (<Region>owner).ptr(offset, length, 1)
            (<Region>owner).pin()
            self.ptr = (<Region>owner).base + offset
        elif isinstance(owner, bytes):
            if offset < 0 or length < 0 or offset > len(owner) - length:
                raise IndexError("message span outside its bytes")
            self.ptr = PyBytes_AS_STRING(owner) + offset
        else:
            owner = _pinned_view(owner, offset, length)  # e.g. a zmq.Frame (shmhub.remote)
            self.ptr = _view_ptr(owner) + offset
        self.owner = owner
        self.length = length
        self.tier = tier
        self.on_release = on_release
        self.exports = 0
        self.released = False
        self.release_pending = False
        self.writable = writable

    def __getbuffer__(self, Py_buffer* buf, int flags):
        if self.released or self.release_pending:
            raise ValueError("message was released")
        PyBuffer_FillInfo(buf, self, <void*>self.ptr, self.length, not self.writable, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* buf):
        self.exports -= 1
        if self.exports == 0 and self.release_pending and not self.released:
            try:
                self._finish()
            except Exception:
                pass  # nowhere to report it from here; the segment may be gone

    def __len__(self):
        return self.length

    @property
    def nbytes(self):
        return self.length

    @property
    def released(self):
        return self.released

    def tobytes(self):
        """A copy of the payload."""
        if self.released:
            raise ValueError("message was released")
        return PyBytes_FromStringAndSize(self.ptr, self.length)

    def __bytes__(self):
        return self.tobytes()

    def release(self):
        """Give the payload's shared memory back (idempotent). BufferError while views exist."""
        if self.released:
            return
        if self.exports:
            raise BufferError(f"{self.exports} memoryview(s) of this message are still alive; release them first")
        self._finish()

    def detach(self):
        """The payload was sent by reference: forget the release callback (the receiver owns the
        memory now) and refuse new views; existing views keep the mapping alive until released."""
        if self.released or self.release_pending:
            raise ValueError("buffer was already released or sent")
        self.on_release = None
        self.token = None
        self.slot_pool = None
        self.wake_ring = None
        if self.exports:
            self.release_pending = True
        else:
            self._finish()

    cdef _finish(self):
        self.released = True
        if self.slot_pool is None and self.on_release is None and type(self.owner) is bytes:
            self.owner = None  # an inline payload: nothing shared to give back
            return
        cb, self.on_release = self.on_release, None
        owner = self.owner
        self.owner = None
        pool, self.slot_pool = self.slot_pool, None
        wake, self.wake_ring = self.wake_ring, None
        try:
            if pool is not None and not (<SlotPool>pool).region.closed:
                (<SlotPool>pool).c_free(self.sc, self.se, self.ss, self.sgen, False, self.sby)
                # The producer may sleep waiting for a slot (trap 27): claim its flag, then ring.
                if wake is not None and (wake.region.closed or not wake.region.writable or not wake.c_wake_due(1)):
                    cb = None
            if cb is not None:
                cb()
        finally:
            if isinstance(owner, Region):
                (<Region>owner).unpin()
            elif isinstance(owner, memoryview):
                owner.release()  # the exporter (a received zmq frame) may free its memory now

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.exports:
            self.release_pending = True  # never mask the block's own exception with BufferError
        else:
            self.release()

    def __del__(self):
        if self.released:
            return
        try:
            if not self.owned_by_views and (self.slot_pool is not None or self.on_release is not None
                                            or isinstance(self.owner, Region)):  # a remote frame is not shared memory
                # Shared memory freed by the collector, as a file closed by it: say so (ResourceWarning,
                # ignored by default; the tests make it an error, raised from here as unraisable).
                _warn(f"unreleased {self!r}: release() it or use a with block", ResourceWarning, source=self)
        finally:
            try:
                self._finish()
            except Exception:
                pass  # the segment may be gone already; nothing left to free then

    def __repr__(self):
        state = "released" if self.released else f"{self.length} bytes"
        return f"<shmhub.Message {self.tier} {state}>"


# ---------------------------------------------------------------------------------------------
# Fused hot paths over a ring and the pool (one call per message from the link)
# ---------------------------------------------------------------------------------------------

cdef struct HeldRef:
    int c, e
    uint32_t s, gen


cdef class SlotShares:
    """One link direction's slots, per class, for the slot share (FEATURE_POOL_WAITERS,
    docs/extensions.md): the sender remembers each slot ref it committed and counts it until the
    slot's meta word no longer says Allocated under that generation (its receiver freed it, or
    recovery did). Exact per class, kept by the sender alone: no shared counter to drift."""
    cdef SlotPool pool
    cdef Region hdr
    cdef HeldRef* refs
    cdef Py_ssize_t n, cap
    cdef uint32_t per_class[256]
    cdef public bint over  # the last allocation skipped a class where this link holds its share

    def __cinit__(self, SlotPool pool, Region hdr):
        self.pool, self.hdr = pool, hdr
        self.n = self.cap = 0
        self.refs = NULL
        memset(self.per_class, 0, sizeof(self.per_class))

    def __dealloc__(self):
        PyMem_Free(self.refs)

    cdef uint32_t share(self, int c) noexcept:
        """max(SLOT_SHARE_MIN, slots of class c - SLOT_SHARE_MIN x (link directions - 1)): a link
        leaves SLOT_SHARE_MIN slots for each other one. No limit if the host set none."""
        cdef uint32_t links
        cdef uint64_t slots, reserve
        if self.hdr.closed:
            return 0xFFFFFFFF
        links = shm_load32(self.hdr.base + SHMHUB_HDR_SHARE_LINKS, SHM_RELAXED)
        if links == 0:
            return 0xFFFFFFFF
        slots = <uint64_t>self.pool.cls[c].slot_count * <uint64_t>self.pool.cls[c].nmapped
        reserve = <uint64_t>SHMHUB_SLOT_SHARE_MIN * (<uint64_t>links - 1)
        if slots <= reserve + SHMHUB_SLOT_SHARE_MIN:
            return <uint32_t>SHMHUB_SLOT_SHARE_MIN
        return <uint32_t>min(slots - reserve, <uint64_t>0xFFFFFFFE)

    cdef void prune(self) noexcept:
        """Forget the refs whose slot was freed since."""
        cdef Py_ssize_t i, j = 0
        cdef HeldRef r
        if self.pool.region.closed:
            return
        for i in range(self.n):
            r = self.refs[i]
            if shm_load64(self.pool.meta(r.c, r.e, r.s), SHM_ACQUIRE) == meta_word(r.gen, <uint32_t>SHMHUB_SLOT_ALLOCATED):
                self.refs[j] = r
                j += 1
            else:
                self.per_class[r.c] -= 1
        self.n = j

    cdef bint may_take(self, int c) noexcept:
        cdef uint32_t share = self.share(c)
        if self.per_class[c] < share:
            return True
        self.prune()
        return self.per_class[c] < share

    cdef int hold(self, int c, int e, uint32_t s, uint32_t gen) except -1:
        cdef HeldRef* grown
        if self.n == self.cap:
            grown = <HeldRef*>PyMem_Realloc(self.refs, sizeof(HeldRef) * (self.cap * 2 + 16))
            if grown == NULL:
                raise MemoryError()
            self.refs, self.cap = grown, self.cap * 2 + 16
        self.refs[self.n].c, self.refs[self.n].e, self.refs[self.n].s, self.refs[self.n].gen = c, e, s, gen
        self.n += 1
        self.per_class[c] += 1
        return 0

    def add(self, int c, int e, uint32_t s, uint32_t gen):
        """A slot ref was committed on this link."""
        self.pool.check_ref(c, e, s)
        self.hold(c, e, s, gen)

    def held(self, int class_idx):
        """Slots of this class the link holds now (committed, not yet freed)."""
        self.pool.check_class(class_idx)
        self.prune()
        return self.per_class[class_idx]

    def limit(self, int class_idx):
        """This link direction's share of a class now (0xFFFFFFFF: no limit)."""
        self.pool.check_class(class_idx)
        return self.share(class_idx)

    def alloc(self, Py_ssize_t size, uint32_t owner):
        """pool.alloc(size, owner) within this link's shares: a ref, or None (see `over`)."""
        cdef int c, e = 0
        cdef uint32_t s = 0, gen = 0
        c = c_pop_fit(self.pool, size - <Py_ssize_t>SHMHUB_SLOT_LEN_PREFIX, owner, &e, &s, &gen, self)
        return None if c < 0 else (c, e, s, gen)


cdef int c_pop_fit(SlotPool pool, Py_ssize_t n, uint32_t owner, int* e, uint32_t* s, uint32_t* gen,
                   SlotShares shares=None) except -3:
    """A slot for an n-byte payload from the smallest fitting class, then larger ones (as
    SlotPool.alloc): its class, or -1 when all are exhausted. With `shares`, classes where the link
    holds its share are skipped (shares.over says so). NeedExtent as pool.pop."""
    cdef long long r
    cdef int c
    cdef uint32_t idx
    if shares is not None:
        shares.over = False
    for c in range(pool.num_classes):
        if <Py_ssize_t>pool.cls[c].slot_size - <Py_ssize_t>SHMHUB_SLOT_LEN_PREFIX < n:
            continue
        if shares is not None and not shares.may_take(c):
            shares.over = True
            continue
        r = pool.pop(c, owner, gen)
        if r >= 0:
            idx = <uint32_t>r
            e[0] = idx / pool.cls[c].slot_count
            s[0] = idx % pool.cls[c].slot_count
            return c
    return -1


cdef int c_send_slot(Ring ring, SlotPool pool, const char* buf, Py_ssize_t n, uint32_t owner, SlotShares shares=None) except -3:
    """One payload by slot reference: room in the ring is checked first, so nothing is held on
    failure. -1 ring full, -2 pool exhausted, 0 sent. NeedExtent if the free slot is in an extent
    not mapped here yet (nothing taken)."""
    cdef int c, e
    cdef uint32_t s, gen
    cdef char* p
    cdef Py_ssize_t off
    ring.wlive()
    if not ring.c_room(SHMHUB_SLOT_REF_FRAME_SIZE):
        return -1
    c = c_pop_fit(pool, n, owner, &e, &s, &gen, shares)
    if c < 0:
        return -2
    p = pool.slot_data(c, e, s)
    shm_put_u32(p, <uint32_t>n)
    memcpy(p + SHMHUB_SLOT_LEN_PREFIX, buf, n)
    off = ring.c_grant(SHMHUB_SLOT_REF_FRAME_SIZE)
    if off < 0:  # cannot happen: room was checked and this side is the only producer
        pool.c_free(c, e, s, gen, False, owner)
        return -1
    put_slot_ref(ring.data + off, c, e, s, gen)
    ring.c_commit(SHMHUB_SLOT_REF_FRAME_SIZE)
    if shares is not None:
        shares.hold(c, e, s, gen)
    return 0


def send_slot(Ring ring, SlotPool pool, payload, uint32_t owner, bint check_waiter, SlotShares shares=None):
    """c_send_slot for Python: -1 (ring full), -2 (pool exhausted), else 1 when the consumer
    announced it sleeps and 0 otherwise."""
    cdef Py_buffer b
    cdef int r
    PyObject_GetBuffer(payload, &b, PyBUF_SIMPLE)
    try:
        r = c_send_slot(ring, pool, <const char*>b.buf, b.len, owner, shares)
    finally:
        PyBuffer_Release(&b)
    if r < 0:
        return r
    return 1 if check_waiter and ring.c_waiting(False) else 0


cdef object c_recv_next(Ring ring, SlotPool pool, uint32_t owner, bint check_waiter, on_release):
    """The next message: bytes (inline, released), a Message (slot: owned by `owner` before the ring
    bytes are released, freed natively on release, then on_release() is called if the producer
    waits for a slot -- always without check_waiter), None when empty, or an mmap-ref frame tuple
    (not released). Sets ring.producer_waiting like recv_inline."""
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t n = ring.c_readable(&start)
    cdef const char* p
    cdef const char* body
    cdef uint32_t total
    cdef uint8_t flags
    cdef Message msg
    cdef long long length
    cdef int c, e
    cdef uint32_t s, gen
    if n == 0:
        return None
    p = ring.data + start
    total = check_frame(p, n)
    flags = <uint8_t>p[SHMHUB_FRAME_FLAGS]
    if flags & SHMHUB_FLAG_MMAP_REF:
        return decode_checked(p, total)
    if not flags & SHMHUB_FLAG_SLOT_REF:
        out = ring.c_take_inline()
        ring.producer_waiting = check_waiter and ring.c_wake_due(1)
        return out
    body = p + SHMHUB_FRAME_HEADER_SIZE
    c = <uint8_t>body[SHMHUB_SR_CLASS]
    e = <uint8_t>body[SHMHUB_SR_EXTENT]
    s = shm_get_u32(body + SHMHUB_SR_SLOT)
    gen = shm_get_u32(body + SHMHUB_SR_GENERATION)
    length = pool.c_take(c, e, s, gen, owner)  # DECISIONS 9: owner first, generation re-checked
    region = <Region>pool.extent_regions[c][e]
    msg = Message.__new__(Message)
    msg.owner = region
    region.pin()
    msg.ptr = pool.slot_data(c, e, s) + SHMHUB_SLOT_LEN_PREFIX
    msg.length = length
    msg.tier = "slot"
    msg.on_release = on_release
    msg.wake_ring = ring if check_waiter else None
    msg.slot_pool = pool
    msg.sc, msg.se, msg.ss, msg.sgen, msg.sby = c, e, s, gen, owner
    try:
        ring.c_release(total)
    except BaseException:
        # A read index changed under us (a hostile peer): the slot is ours, and nobody will see
        # this Message. Free it here, not in the collector (which would warn of a leak).
        msg.release()
        raise
    ring.producer_waiting = check_waiter and ring.c_wake_due(1)
    return msg


def recv_next(Ring ring, SlotPool pool, uint32_t owner, bint check_waiter, on_release):
    """c_recv_next for Python."""
    return c_recv_next(ring, pool, owner, check_waiter, on_release)


# ---------------------------------------------------------------------------------------------
# The link's per-message fast path. Link (link.py) subclasses LinkCore: the common case -- room in
# the ring, a message already there or arriving within the spin window -- is one C call; anything
# else (waiting, the mmap tier, errors, closed or dead links) goes to the Python methods
# _send_slow / _poll_slow / _recv / _try_recv, which hold the policy.
# ---------------------------------------------------------------------------------------------

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_trylock(pthread_mutex_t*)
    int pthread_mutex_timedlock(pthread_mutex_t*, const timespec*)
    int pthread_mutex_unlock(pthread_mutex_t*)

cdef extern from "<time.h>" nogil:
    int CLOCK_REALTIME

from cpython.exc cimport PyErr_CheckSignals

DEF LOCK_SLICE_NS = 50000000  # a blocked acquire wakes this often to run signal handlers


cdef class FastLock:
    """A mutex with threading.Lock's interface, released by the thread that acquired it. The
    uncontended acquire is one pthread_mutex_trylock: CPython's own lock reads the clock even
    for a non-blocking try (16% of a small send). Blocking acquires release the GIL."""
    cdef pthread_mutex_t mu
    cdef bint held

    def __cinit__(self):
        if pthread_mutex_init(&self.mu, NULL) != 0:
            raise MemoryError()

    def __dealloc__(self):
        if self.held:
            pthread_mutex_unlock(&self.mu)
        pthread_mutex_destroy(&self.mu)

    cdef inline bint c_try(self) noexcept:
        if pthread_mutex_trylock(&self.mu) == 0:
            self.held = True
            return True
        return False

    cdef inline void c_release(self) noexcept:
        self.held = False
        pthread_mutex_unlock(&self.mu)

    def acquire(self, bint blocking=True, double timeout=-1):
        """True once acquired; False if not blocking, or timeout (seconds, -1: none) passed."""
        cdef int64_t deadline = 0, slice_ns
        cdef timespec ts
        cdef int r
        if self.c_try():
            return True
        if not blocking:
            if timeout != -1:
                raise ValueError("can't specify a timeout for a non-blocking call")
            return False
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        if timeout >= 0:
            deadline = now_ns() + <int64_t>(timeout * 1e9)
        while True:
            slice_ns = LOCK_SLICE_NS
            if timeout >= 0:
                slice_ns = min(slice_ns, max(0, deadline - now_ns()))
            with nogil:
                clock_gettime(CLOCK_REALTIME, &ts)  # timedlock takes a CLOCK_REALTIME deadline
                ts.tv_nsec += slice_ns
                ts.tv_sec += ts.tv_nsec // 1000000000
                ts.tv_nsec %= 1000000000
                r = pthread_mutex_timedlock(&self.mu, &ts)
            if r == 0:
                self.held = True
                return True
            PyErr_CheckSignals()
            if timeout >= 0 and now_ns() >= deadline:
                return False

    def release(self):
        if not self.held:
            raise RuntimeError("release unlocked lock")
        self.c_release()

    def locked(self):
        if self.c_try():
            self.c_release()
            return False
        return True

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.c_release()


cdef class LinkStats:
    """Counters of one link end (this process's view)."""
    cdef public unsigned long long sent_inline, sent_slot, sent_mmap
    cdef public unsigned long long sent_bytes_inline, sent_bytes_slot, sent_bytes_mmap
    cdef public unsigned long long recv_inline, recv_slot, recv_mmap
    cdef public unsigned long long recv_bytes_inline, recv_bytes_slot, recv_bytes_mmap
    cdef public unsigned long long ring_full_waits, slot_exhaustion_waits, mapping_waits, recv_waits
    cdef public unsigned long long doorbells_rung, doorbells_elided

    FIELDS = ("sent_inline", "sent_slot", "sent_mmap", "sent_bytes_inline", "sent_bytes_slot", "sent_bytes_mmap",
              "recv_inline", "recv_slot", "recv_mmap", "recv_bytes_inline", "recv_bytes_slot", "recv_bytes_mmap",
              "ring_full_waits", "slot_exhaustion_waits", "mapping_waits", "recv_waits",
              "doorbells_rung", "doorbells_elided")

    def as_dict(self):
        return {k: getattr(self, k) for k in LinkStats.FIELDS}

    def __call__(self):
        """link.stats() is the counters as a plain dict (link.stats.sent_inline still reads one)."""
        return self.as_dict()

    def __eq__(self, other):
        return isinstance(other, LinkStats) and self.as_dict() == other.as_dict()

    def __repr__(self):
        return "LinkStats(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


cdef object SLOW = object()  # the fast path cannot decide: the Python slow path takes over


cdef class LinkCore:
    """The compiled half of Link: per-direction locks, counters and the fast paths of send, recv,
    recv_bytes, try_recv and try_recv_bytes. Link's __init__ fills the fields."""
    cdef public Ring _tx, _rx
    cdef public SlotPool _pool
    cdef public uint32_t _owner
    cdef public bint _ok  # not closed, dead or corrupted: the fast paths check only this
    cdef public bint _elide  # FEATURE_WAITER_FLAGS with a doorbell: ring only a peer that sleeps
    cdef public bint _has_bell
    cdef public bint _watched  # fileno() was called: empty polls re-arm in Python
    cdef public bint _is_guest
    cdef public Region _hdr  # the segment header, for host_goodbye
    cdef public Py_ssize_t _inline_max, _fast_max
    cdef public int64_t spin_ns
    cdef public FastLock _tx_lock, _rx_lock
    cdef public LinkStats stats
    cdef public object _on_slot_free  # the bound _slot_freed, made once
    cdef public object _backlog  # frames taken out of the ring (drain_into_backlog) come first
    cdef public SlotShares _shares  # FEATURE_POOL_WAITERS: this side's slots on the link, per class (or None)
    # Adaptive spinning: after SPIN_MISSES spins in a row that caught nothing (the peer is not
    # running: more runnable processes than cores, or a slow peer) waits sleep at once, with a full
    # probe after SPIN_PROBE_EVERY waits; each probe that misses doubles that gap (up to
    # SPIN_PROBE_MAX), so a process among many on few cores stops paying for probes (a missed probe
    # costs a whole budget, several wake-ups' worth). One spin that pays restores spinning. A single
    # miss changes nothing: a ping-pong peer preempted once must not cost the next round trips a sleep.
    # The spin's length adapts too on links that opt in (spin_stretch: rpc sets it), from the
    # sleeps their waits report (c_slept): a peer that answers a little later than spin_ns (a
    # handler of 60 µs) would otherwise be caught by no spin and every round trip would pay two
    # wake-ups, an equilibrium no probe leaves (seen: 40 µs calls turning into 115 µs for good).
    # Off by default: with many guests taking turns on few cores a longer spin costs the others
    # CPU (the reqresp scenario at G = 8 lost 15% of its rate with it on every link).
    cdef public bint spin_stretch
    cdef int _spin_misses, _spin_skips, _spin_gap, _near
    cdef int64_t _spin_len  # the spin's length now: spin_ns .. SPIN_STRETCH * spin_ns

    cdef inline int64_t c_spin_budget(self) noexcept:
        if self._spin_misses < SPIN_MISSES:
            return self._spin_len if self._spin_len > self.spin_ns and self.spin_ns > 0 else self.spin_ns
        self._spin_skips += 1
        if self._spin_skips >= self._spin_gap:
            self._spin_skips = 0
            return self.spin_ns
        return 0

    cdef inline void c_spin_result(self, bint ok) noexcept:
        if ok:
            self._spin_misses = 0
            self._spin_gap = SPIN_PROBE_EVERY
        elif self._spin_misses < SPIN_MISSES:
            self._spin_misses += 1
            self._spin_gap = SPIN_PROBE_EVERY
            if self._spin_misses == SPIN_MISSES:
                self._spin_len = self.spin_ns  # the peer is not running: back to the short spin
        elif self._spin_gap < SPIN_PROBE_MAX:
            self._spin_gap *= 2  # a probe missed

    cdef inline void c_slept(self, int64_t waited_ns) noexcept:
        # A wait that slept ended after waited_ns (wake-up included). SPIN_NEAR such waits in a row
        # within SPIN_STRETCH * spin_ns: a spin that long would have caught the event, so the spin
        # grows to it and spinning resumes. Longer waits (an idle peer, many processes taking
        # turns on few cores) change nothing.
        if self.spin_ns <= 0:
            return
        if waited_ns > SPIN_STRETCH * self.spin_ns:
            self._near = 0
            return
        self._near += 1
        if self._near < SPIN_NEAR:
            return
        self._near = 0
        waited_ns += waited_ns // 4
        self._spin_len = min(max(self._spin_len, waited_ns), SPIN_STRETCH * self.spin_ns)
        self._spin_misses = 0
        self._spin_gap = SPIN_PROBE_EVERY

    def spin_budget(self):
        """How long the next wait of this link may spin (ns), adapted to how recent spins went."""
        return self.c_spin_budget()

    def spin_result(self, bint ok):
        """Report whether a spin of spin_budget() caught the event."""
        self.c_spin_result(ok)

    def spin_slept(self, int64_t waited_ns):
        """Report that a wait went to sleep and its event came waited_ns after the wait began."""
        self.c_slept(waited_ns)

    # -- send ----------------------------------------------------------------------------

    def send(self, data, timeout=None):
        """Send a bytes-like object. Blocks (spin, then sleep) while the ring or pool is full."""
        cdef Py_buffer b
        cdef const char* p
        cdef Py_ssize_t n
        cdef int r = -1
        cdef bint wake = False, view = False
        if not self._ok:
            return self._send_slow(data, timeout)
        if type(data) is bytes:
            p = PyBytes_AS_STRING(data)
            n = len(<bytes>data)
        else:
            try:
                PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
            except (BufferError, TypeError, ValueError):
                return self._send_slow(data, timeout)  # non-contiguous, released, ...: it says why
            view = True
            p = <const char*>b.buf
            n = b.len
        try:
            if n <= self._fast_max and self._tx_lock.c_try():
                try:
                    if n <= self._inline_max:
                        r = self._tx.c_put_inline(p, n)
                    else:
                        try:
                            r = c_send_slot(self._tx, self._pool, p, n, self._owner, self._shares)
                        except NeedExtent:
                            r = -1  # the slow path maps the extent
                    if r >= 0:
                        self._tx.c_count(1, n)
                        if self._elide:
                            wake = self._tx.c_waiting(False)
                finally:
                    self._tx_lock.c_release()
        except LinkCorrupted as e:  # our ring's indices out of range: the Python half ends the link (and the host isolates the guest)
            raise self._corrupted(e) from None
        finally:
            if view:
                PyBuffer_Release(&b)
        if r < 0:
            return self._send_slow(data, timeout)
        cdef LinkStats st = self.stats
        if n <= self._inline_max:
            st.sent_inline += 1
            st.sent_bytes_inline += n
        else:
            st.sent_slot += 1
            st.sent_bytes_slot += n
        self.c_doorbell(wake)

    cdef int c_doorbell(self, bint wake) except -1:
        """After a send: ring the peer if it sleeps (every time without waiter flags)."""
        if wake or (self._has_bell and not self._elide):
            self._ring()
        elif self._has_bell:
            self.stats.doorbells_elided += 1
        return 0

    def reserve(self, Py_ssize_t nbytes, timeout=None):
        """A writable buffer of nbytes in shared memory (a slot, or an mmap-tier mapping above the
        largest slot). Fill it, then send_reserved() sends it by reference without a copy.
        Released unsent (release(), with block, garbage collection) it goes back to the pool."""
        cdef int c = -1, e = 0
        cdef uint32_t s = 0, gen = 0
        if self._ok and 0 <= nbytes <= self._fast_max:
            try:
                c = c_pop_fit(self._pool, nbytes, self._owner, &e, &s, &gen, self._shares)
            except NeedExtent:
                c = -1  # the slow path maps the extent
        if c < 0:
            return self._reserve_slow(nbytes, timeout)
        return self.c_reserved_slot(c, e, s, gen, nbytes)

    def _reserved_slot(self, int c, int e, uint32_t s, uint32_t gen, Py_ssize_t nbytes):
        """The writable Message over a slot this side just allocated (freed natively if released unsent)."""
        return self.c_reserved_slot(c, e, s, gen, nbytes)

    cdef Message c_reserved_slot(self, int c, int e, uint32_t s, uint32_t gen, Py_ssize_t nbytes):
        self._pool.check_ref(c, e, s)
        if nbytes > <Py_ssize_t>self._pool.cls[c].slot_size - <Py_ssize_t>SHMHUB_SLOT_LEN_PREFIX:
            raise ValueError(f"{nbytes} bytes do not fit in a {self._pool.cls[c].slot_size}-byte slot")
        cdef Region region = <Region>self._pool.extent_regions[c][e]
        cdef Message m = Message.__new__(Message)
        region.pin()
        m.owner = region
        m.ptr = self._pool.slot_data(c, e, s) + SHMHUB_SLOT_LEN_PREFIX
        m.length = nbytes
        m.tier = "slot"
        m.writable = True
        m.slot_pool = self._pool
        m.sc, m.se, m.ss, m.sgen, m.sby = c, e, s, gen, self._owner
        m.token = (self, (c, e, s, gen))
        return m

    def send_reserved(self, buf, nbytes=None, timeout=None):
        """Send a buffer from reserve() by reference (its first nbytes; all of it by default).
        The buffer is then the receiver's: do not write to views of it any more."""
        cdef Message m
        cdef Py_ssize_t n, off
        cdef bint sent = False, wake = False
        token = buf.token if type(buf) is Message else None
        if token is None or token[0] is not self or (<Message>buf).released:
            raise ValueError("not an unsent buffer reserved on this link")
        m = <Message>buf
        n = m.length if nbytes is None else nbytes
        if not 0 <= n <= m.length:
            raise ValueError(f"nbytes {n} outside the reserved {m.length} bytes")
        # A slot-tier buffer of this link was made by _reserved_slot: its slot fields are checked.
        if self._ok and m.slot_pool is not None and self._tx_lock.c_try():
            try:
                off = self._tx.c_grant(SHMHUB_SLOT_REF_FRAME_SIZE)
                if off >= 0:
                    shm_put_u32(self._pool.slot_data(m.sc, m.se, m.ss), <uint32_t>n)  # n <= the reserved length
                    put_slot_ref(self._tx.data + off, m.sc, m.se, m.ss, m.sgen)
                    self._tx.c_commit(SHMHUB_SLOT_REF_FRAME_SIZE)
                    if self._shares is not None:
                        self._shares.hold(m.sc, m.se, m.ss, m.sgen)
                    m.detach()  # committed: the slot now travels with the ref
                    self._tx.c_count(1, n)
                    sent = True
                    wake = self._elide and self._tx.c_waiting(False)
            except LinkCorrupted as e:
                raise self._corrupted(e) from None
            finally:
                self._tx_lock.c_release()
        if not sent:
            return self._send_reserved_slow(m, n, timeout)
        cdef LinkStats st = self.stats
        st.sent_slot += 1
        st.sent_bytes_slot += n
        self.c_doorbell(wake)

    # -- receive -------------------------------------------------------------------------

    cdef object c_poll(self, bint as_bytes):
        """One message if there is one (rx lock held): bytes or a Message, None when empty, SLOW
        for what the Python side handles (backlog, closed or dead links, mmap refs, new extents,
        corruption -- those frames are left in the ring and read again there)."""
        cdef Ring rx = self._rx
        cdef Message m
        if not self._ok or self._backlog:
            return SLOW
        try:
            r = c_recv_next(rx, self._pool, self._owner, self._elide, self._on_slot_free)
        except Exception:
            return SLOW
        if r is None:
            return None
        cdef LinkStats st = self.stats
        if type(r) is bytes:
            st.recv_inline += 1
            st.recv_bytes_inline += len(<bytes>r)
            if not as_bytes:
                m = Message.__new__(Message)
                m.owner = r
                m.ptr = PyBytes_AS_STRING(r)
                m.length = len(<bytes>r)
                m.tier = "inline"
                r = m
        elif type(r) is Message:
            m = <Message>r
            st.recv_slot += 1
            st.recv_bytes_slot += m.length
            if as_bytes:
                r = PyBytes_FromStringAndSize(m.ptr, m.length)
                m._finish()
        else:
            return SLOW  # an mmap ref: not consumed
        if rx.producer_waiting or (self._has_bell and not self._elide):  # a producer may wait for space (trap 27)
            self._ring()
        elif self._has_bell:
            st.doorbells_elided += 1
        return r

    def _poll_locked(self, bint as_bytes=False):
        """One message if there is one (rx lock held): a Message, or bytes when as_bytes; None if empty."""
        r = self.c_poll(as_bytes)
        return self._poll_slow(as_bytes) if r is SLOW else r

    cdef inline bint c_goodbye(self) noexcept:
        return self._is_guest and not self._hdr.closed and shm_load32(self._hdr.base + SHMHUB_HDR_HOST_GOODBYE, SHM_ACQUIRE) != 0

    cdef object c_try_recv(self, bint as_bytes):
        r = SLOW
        if self._rx_lock.c_try():
            try:
                r = self.c_poll(as_bytes)
            finally:
                self._rx_lock.c_release()
        if r is SLOW or (r is None and (self._watched or self.c_goodbye())):
            return self._try_recv(as_bytes)
        return r

    def try_recv(self):
        """The next message if one is there now, else None (raises if the link is gone and empty)."""
        return self.c_try_recv(False)

    def try_recv_bytes(self):
        """try_recv(), copied into bytes (for busy-polling loops)."""
        return self.c_try_recv(True)

    cdef object c_recv(self, timeout, bint as_bytes):
        cdef int64_t t0 = 0, budget, began = 0
        cdef bint spun = False, decided = False
        r = SLOW
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        if self._rx_lock.c_try():
            try:
                r = self.c_poll(as_bytes)
                if r is None:
                    decided = True  # the spin budget is asked once per wait, not per recv
                    if self.spin_stretch:
                        began = now_ns()
                    budget = self.c_spin_budget()
                    if timeout is not None:
                        budget = min(budget, <int64_t>(timeout * 1e9))
                    if budget > 0:
                        t0 = now_ns()
                        # GIL released; the rx lock stays ours. A Ring subclass (test
                        # instrumentation) keeps its own spin_readable.
                        spun = self._rx._spin(0, budget) if type(self._rx) is Ring else self._rx.spin_readable(budget)
                        self.c_spin_result(spun)
                        if spun:
                            r = self.c_poll(as_bytes)
            finally:
                self._rx_lock.c_release()
        if r is SLOW or r is None:
            if t0 and timeout is not None:
                timeout = max(0.0, timeout - (now_ns() - t0) / 1e9)
            r = self._recv(timeout, as_bytes, not decided)  # decided: the slow path only sleeps
            if began:
                self.c_slept(now_ns() - began)
        return r

    def recv(self, timeout=None):
        """The next message; blocks (spin, then sleep) up to timeout. Messages already in the ring
        are delivered before PeerDead / HostGone is raised."""
        return self.c_recv(timeout, False)

    def recv_bytes(self, timeout=None):
        """The next message copied into bytes (its shared memory is released at once)."""
        return self.c_recv(timeout, True)
