# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""shmhub's compiled core: a bounds-checked memory region over a shared mapping with explicit
atomics, the BipBuffer ring and frame codec, and the VarSlotPool. Nothing else lives here: policy,
lifecycle and waiting are in the Python modules."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.errno cimport errno
from libc.time cimport timespec
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBuffer_FillInfo, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.mem cimport PyMem_Malloc, PyMem_Free

import os

from shmhub.errors import (
    DoubleFree,
    InvalidSlotRef,
    LinkCorrupted,
    SegmentCorrupted,
    StaleSlotRef,
)

cdef extern from "<sys/mman.h>":
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset) nogil
    int munmap(void* addr, size_t length) nogil
    int PROT_READ, PROT_WRITE, MAP_SHARED
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

cdef extern from "_layout.h":
    # Generated from layout.py (the single source of truth) by setup.py.
    const unsigned long long SHMHUB_RING_HEADER_SIZE, SHMHUB_RING_WRITE, SHMHUB_RING_WATERMARK
    const unsigned long long SHMHUB_RING_CAPACITY, SHMHUB_RING_READ, SHMHUB_RING_ALIGN
    const unsigned long long SHMHUB_RING_PRODUCER_WAITING, SHMHUB_RING_CONSUMER_WAITING
    const unsigned long long SHMHUB_FRAME_HEADER_SIZE, SHMHUB_FRAME_TOTAL_LEN, SHMHUB_FRAME_FLAGS
    const unsigned long long SHMHUB_FRAME_INLINE_LEN, SHMHUB_FRAME_ALIGN
    const unsigned long long SHMHUB_FLAG_SLOT_REF, SHMHUB_FLAG_MMAP_REF
    const unsigned long long SHMHUB_SLOT_REF_FRAME_SIZE, SHMHUB_SR_CLASS, SHMHUB_SR_EXTENT
    const unsigned long long SHMHUB_SR_SLOT, SHMHUB_SR_GENERATION
    const unsigned long long SHMHUB_MMAP_REF_FRAME_SIZE, SHMHUB_MR_MAP_ID, SHMHUB_MR_MAP_GENERATION
    const unsigned long long SHMHUB_MR_MAP_OFFSET, SHMHUB_MR_PAYLOAD_LEN
    const unsigned long long SHMHUB_KIND_INLINE, SHMHUB_KIND_SLOT_REF, SHMHUB_KIND_MMAP_REF
    const unsigned long long SHMHUB_MAX_INLINE_LEN
    const unsigned long long SHMHUB_CLASS_HEADER_SIZE, SHMHUB_CLS_SLOT_SIZE, SHMHUB_CLS_SLOT_COUNT
    const unsigned long long SHMHUB_CLS_FREE_HEAD
    const unsigned long long SHMHUB_SLOT_META_SIZE, SHMHUB_META_GENERATION, SHMHUB_META_STATE
    const unsigned long long SHMHUB_META_OWNER, SHMHUB_META_NEXT_FREE
    const unsigned long long SHMHUB_SLOT_FREE, SHMHUB_SLOT_ALLOCATED, SHMHUB_EMPTY_INDEX
    const unsigned long long SHMHUB_SLOT_LEN_PREFIX, SHMHUB_MAX_CLASSES
    const unsigned long long SHMHUB_PEER_ENTRY_SIZE, SHMHUB_PEER_POOL_OP, SHMHUB_PEER_POOL_OP_GEN
    const unsigned long long SHMHUB_POOL_OP_NONE, SHMHUB_POOL_OP_POP, SHMHUB_POOL_OP_FREE

RELAXED = SHM_RELAXED
ACQUIRE = SHM_ACQUIRE
RELEASE = SHM_RELEASE
ACQ_REL = SHM_ACQ_REL
SEQ_CST = SHM_SEQ_CST

def cpu_relax():
    """One CPU pause instruction (for spin loops)."""
    shm_cpu_relax()


def fence(int order=SHM_SEQ_CST):
    """A memory fence with the given order."""
    shm_fence(order)


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

    def __cinit__(self, int fd, Py_ssize_t size, bint writable=True):
        if size <= 0:
            raise ValueError(f"cannot map {size} bytes")
        cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
        cdef void* p = mmap(NULL, <size_t>size, prot, MAP_SHARED, fd, 0)
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

    def read(self, Py_ssize_t off, Py_ssize_t n):
        """Copy n bytes at off into a new bytes object (non-atomic)."""
        cdef char* p = self.ptr(off, n, 1)
        return PyBytes_FromStringAndSize(p, n)

    def write(self, Py_ssize_t off, data):
        """Copy a bytes-like object into the mapping at off (non-atomic)."""
        cdef Py_buffer b
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
        try:
            memcpy(self.wptr(off, b.len, 1), b.buf, b.len)
        finally:
            PyBuffer_Release(&b)

    def zero(self, Py_ssize_t off, Py_ssize_t n):
        memset(self.wptr(off, n, 1), 0, n)

    def view(self, Py_ssize_t off, Py_ssize_t n):
        """A zero-copy memoryview of [off, off+n) that keeps the mapping alive."""
        self.ptr(off, n, 1)
        return memoryview(self)[off:off + n]


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


cdef inline void put_mmap_ref(char* p, uint32_t map_id, uint32_t map_gen, uint64_t offset, uint32_t length) noexcept nogil:
    put_header(p, <uint32_t>SHMHUB_MMAP_REF_FRAME_SIZE, <uint8_t>SHMHUB_FLAG_MMAP_REF, 0)
    cdef char* b = p + SHMHUB_FRAME_HEADER_SIZE
    shm_put_u32(b + SHMHUB_MR_MAP_ID, map_id)
    shm_put_u32(b + SHMHUB_MR_MAP_GENERATION, map_gen)
    shm_put_u64(b + SHMHUB_MR_MAP_OFFSET, offset)  # only 4-aligned in a ring: memcpy, never a cast
    shm_put_u32(b + SHMHUB_MR_PAYLOAD_LEN, length)
    shm_put_u32(b + SHMHUB_MR_PAYLOAD_LEN + 4, 0)


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
        return (SHMHUB_KIND_MMAP_REF, total, shm_get_u32(b + SHMHUB_MR_MAP_ID),
                shm_get_u32(b + SHMHUB_MR_MAP_GENERATION), shm_get_u64(b + SHMHUB_MR_MAP_OFFSET),
                shm_get_u32(b + SHMHUB_MR_PAYLOAD_LEN))
    ilen = shm_get_u16(p + SHMHUB_FRAME_INLINE_LEN)
    if ilen == 0:  # legacy writer: the payload runs to total_len, padding included (format-v7 1.5)
        ilen = total - SHMHUB_FRAME_HEADER_SIZE
    return (SHMHUB_KIND_INLINE, total, PyBytes_FromStringAndSize(b, ilen))


def decode_frame(data):
    """Decode the frame at the start of a bytes-like object.

    Returns (KIND_INLINE, total_len, payload) | (KIND_SLOT_REF, total_len, class_idx, extent_idx,
    slot_idx, generation) | (KIND_MMAP_REF, total_len, map_id, map_generation, map_offset,
    payload_len). Raises LinkCorrupted for a malformed frame.
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


def encode_mmap_ref(uint32_t map_id, uint32_t map_generation, uint64_t map_offset, uint32_t payload_len):
    out = PyBytes_FromStringAndSize(NULL, SHMHUB_MMAP_REF_FRAME_SIZE)
    put_mmap_ref(PyBytes_AS_STRING(out), map_id, map_generation, map_offset, payload_len)
    return out


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


cdef class Ring:
    """One BipBuffer at `offset` of a region. The producer side uses grant/commit and the
    write_* methods; the consumer side readable/release and read_frame. Callers serialise each
    side within a process; the two sides may run in different processes."""
    cdef readonly Region region
    cdef readonly Py_ssize_t offset
    cdef readonly uint32_t capacity
    cdef char* hdr
    cdef char* data

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

    cdef inline int live(self) except -1:
        if self.region.closed:
            raise ValueError("ring's region is closed")
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
        self.live()
        cdef uint32_t cap = self.capacity
        cdef uint32_t w = self.idx(SHMHUB_RING_WRITE, SHM_RELAXED)
        cdef uint32_t r = self.idx(SHMHUB_RING_READ, SHM_ACQUIRE)
        if n > cap:
            return -1
        if n == 0:
            return w
        if w >= r:
            if cap - w >= n:
                return w
            if r == 0:
                return -1  # wrapping would make write == read == 0, which means empty
            # Wrap: watermark before write (trap 1). Never undone, even if the front is too small (trap 3).
            shm_store32(self.hdr + SHMHUB_RING_WATERMARK, w, SHM_RELEASE)
            shm_store32(self.hdr + SHMHUB_RING_WRITE, 0, SHM_RELEASE)
            return 0 if n < r else -1  # strict: write may never reach read (trap 2)
        return w if w + n < r else -1

    cdef int c_commit(self, uint32_t n) except -1:
        self.live()
        cdef uint32_t w = self.idx(SHMHUB_RING_WRITE, SHM_RELAXED)
        if n > self.capacity - w:
            raise LinkCorrupted(f"commit of {n} bytes at write {w} overruns capacity {self.capacity}")
        shm_store32(self.hdr + SHMHUB_RING_WRITE, w + n, SHM_RELEASE)
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
        if n > cap:
            return False
        if n == 0:
            return True
        if w >= r:
            return cap - w >= n or (r != 0 and n < r)
        return w + n < r

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
            self.live()
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

    def write_slot_ref(self, uint8_t class_idx, uint8_t extent_idx, uint32_t slot_idx, uint32_t generation):
        """Append a slot-ref frame; False if the ring has no room now."""
        cdef Py_ssize_t off = self.c_grant(SHMHUB_SLOT_REF_FRAME_SIZE)
        if off < 0:
            return False
        put_slot_ref(self.data + off, class_idx, extent_idx, slot_idx, generation)
        self.c_commit(SHMHUB_SLOT_REF_FRAME_SIZE)
        return True

    def write_mmap_ref(self, uint32_t map_id, uint32_t map_generation, uint64_t map_offset, uint32_t payload_len):
        """Append an mmap-ref frame; False if the ring has no room now."""
        cdef Py_ssize_t off = self.c_grant(SHMHUB_MMAP_REF_FRAME_SIZE)
        if off < 0:
            return False
        put_mmap_ref(self.data + off, map_id, map_generation, map_offset, payload_len)
        self.c_commit(SHMHUB_MMAP_REF_FRAME_SIZE)
        return True

    # -- consumer --------------------------------------------------------------------------

    cdef Py_ssize_t c_readable(self, Py_ssize_t* start) except -1:
        self.live()
        cdef uint32_t r = self.idx(SHMHUB_RING_READ, SHM_RELAXED)
        # write before watermark (trap 1): seeing a wrapped write implies seeing its watermark.
        cdef uint32_t w = self.idx(SHMHUB_RING_WRITE, SHM_ACQUIRE)
        cdef uint32_t wm = self.idx(SHMHUB_RING_WATERMARK, SHM_ACQUIRE)
        if wm != 0:
            if r < wm:
                start[0] = r
                return wm - r  # the tail before the wrap comes first (trap 2)
            if w >= r:
                # The producer has stored the watermark but not yet write = 0 (it is between the
                # two stores, or died there): after a wrap, write only ever stays below read, so
                # [0, write) would be old, consumed frames. Nothing to read until write = 0.
                start[0] = r
                return 0
            shm_store32(self.hdr + SHMHUB_RING_READ, 0, SHM_RELEASE)
            shm_store32(self.hdr + SHMHUB_RING_WATERMARK, 0, SHM_RELEASE)
            w = self.idx(SHMHUB_RING_WRITE, SHM_ACQUIRE)
            start[0] = 0
            return w
        if r > w:
            raise LinkCorrupted(f"ring at {self.offset}: read {r} is past write {w} with no watermark")
        start[0] = r
        return w - r

    cdef int c_release(self, uint32_t n) except -1:
        self.live()
        cdef uint32_t r = self.idx(SHMHUB_RING_READ, SHM_RELAXED)
        if n > self.capacity - r:
            raise LinkCorrupted(f"release of {n} bytes at read {r} overruns capacity {self.capacity}")
        cdef uint32_t nr = r + n
        cdef uint32_t wm = self.idx(SHMHUB_RING_WATERMARK, SHM_ACQUIRE)
        if wm != 0 and nr >= wm and self.idx(SHMHUB_RING_WRITE, SHM_ACQUIRE) >= nr:
            # tail consumed, but the producer is mid-wrap (write still at the watermark): resetting
            # read to 0 now would expose [0, write) again; c_readable resets once write = 0 is seen
            shm_store32(self.hdr + SHMHUB_RING_READ, nr, SHM_RELEASE)
        elif wm != 0 and nr >= wm:
            shm_store32(self.hdr + SHMHUB_RING_READ, 0, SHM_RELEASE)
            shm_store32(self.hdr + SHMHUB_RING_WATERMARK, 0, SHM_RELEASE)
        else:
            shm_store32(self.hdr + SHMHUB_RING_READ, nr, SHM_RELEASE)
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

    def recv_inline(self):
        """Fast path: if the next frame is inline, copy its payload out, release it and return
        the bytes; otherwise return None (empty) or the frame tuple without releasing."""
        cdef Py_ssize_t start = 0
        cdef Py_ssize_t n = self.c_readable(&start)
        if n == 0:
            return None
        cdef uint32_t total = check_frame(self.data + start, n)
        frame = decode_checked(self.data + start, total)
        if frame[0] == SHMHUB_KIND_INLINE:
            self.c_release(total)
            return frame[2]
        return frame

    # -- sleeping and waking (FEATURE_WAITER_FLAGS) -----------------------------------------
    # Dekker pattern: the sleeper stores its flag, fences, re-checks the ring; the other side
    # publishes (commit/release), fences, loads the flag. One of the two always sees the other,
    # so a wakeup is never lost, and no doorbell is rung while nobody sleeps.

    def set_waiting(self, bint producer, uint32_t value):
        """Announce (1) or withdraw (0) that this ring's producer / consumer is about to sleep."""
        self.live()
        shm_store32(self.hdr + (SHMHUB_RING_PRODUCER_WAITING if producer else SHMHUB_RING_CONSUMER_WAITING), value, SHM_SEQ_CST)
        shm_fence(SHM_SEQ_CST)

    def peer_waiting(self, bint producer):
        """After publishing: does the ring's producer / consumer sleep (so it must be rung)?"""
        self.live()
        shm_fence(SHM_SEQ_CST)
        return shm_load32(self.hdr + (SHMHUB_RING_PRODUCER_WAITING if producer else SHMHUB_RING_CONSUMER_WAITING), SHM_ACQUIRE) != 0

    cdef inline bint c_has_data(self) noexcept nogil:
        return hdr_has_data(self.hdr)

    cdef inline bint c_room(self, uint32_t n) noexcept nogil:
        cdef uint32_t w = shm_load32(self.hdr + SHMHUB_RING_WRITE, SHM_RELAXED)
        cdef uint32_t r = shm_load32(self.hdr + SHMHUB_RING_READ, SHM_ACQUIRE)
        if w > self.capacity or r > self.capacity:
            return True  # let the caller's real grant report the corruption
        if w >= r:
            return self.capacity - w >= n or (r != 0 and n < r)
        return w + n < r

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

    def reset(self):
        """Zero all indices. Crash recovery only: the other side must be dead."""
        self.live()
        shm_store32(self.hdr + SHMHUB_RING_WRITE, 0, SHM_RELEASE)
        shm_store32(self.hdr + SHMHUB_RING_WATERMARK, 0, SHM_RELEASE)
        shm_store32(self.hdr + SHMHUB_RING_READ, 0, SHM_RELEASE)
        shm_store32(self.hdr + SHMHUB_RING_PRODUCER_WAITING, 0, SHM_RELEASE)
        shm_store32(self.hdr + SHMHUB_RING_CONSUMER_WAITING, 0, SHM_RELEASE)

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
    Py_ssize_t meta
    Py_ssize_t data


cdef inline uint64_t meta_word(uint32_t gen, uint32_t state) noexcept nogil:
    # generation (+0) and state (+4) form one little-endian u64: the free CAS keys on both.
    return (<uint64_t>state << 32) | gen


cdef inline void journal_set(char* j, uint64_t op, int c, uint32_t s, uint32_t gen) noexcept nogil:
    # FEATURE_POOL_JOURNAL: the generation first; the op word (Release) publishes the record. The
    # CAS that follows is a release too, so whoever sees that CAS's effect sees the record.
    shm_store32(j + (SHMHUB_PEER_POOL_OP_GEN - SHMHUB_PEER_POOL_OP), gen, SHM_RELAXED)
    shm_store64(j, (op << 56) | (<uint64_t>c << 32) | s, SHM_RELEASE)


cdef class SlotPool:
    """The slot classes of a segment. `classes` is a sequence of (slot_size, slot_count,
    header_offset, meta_offset, data_offset) as computed by layout.Layout; every range is
    checked against the region here, so slot indices below slot_count are always in bounds.

    `journals` = (peer_table_offset, max_guests) turns on FEATURE_POOL_JOURNAL: a guest's pop and
    free record the slot in its peer entry while they run, so recover_pool_op() can finish the
    operation if the guest dies inside it (a slot off every free list but not yet Allocated, or
    marked Free but not yet pushed, is otherwise lost for good)."""
    cdef readonly Region region
    cdef ClassInfo cls[256]
    cdef readonly int num_classes
    cdef Py_ssize_t journal_base
    cdef readonly uint32_t journal_count

    def __init__(self, Region region, classes, journals=None):
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
        for i, (size, count, header, meta, data) in enumerate(classes):
            if size < SHMHUB_SLOT_LEN_PREFIX or count < 1 or count >= SHMHUB_EMPTY_INDEX:
                raise SegmentCorrupted(f"slot class {i}: slot_size {size} / slot_count {count} out of range")
            region.ptr(header, SHMHUB_CLASS_HEADER_SIZE, 64)
            region.ptr(meta, <Py_ssize_t>SHMHUB_SLOT_META_SIZE * count, 16)
            region.ptr(data, <Py_ssize_t>size * count, 1)
            self.cls[i].slot_size = size
            self.cls[i].slot_count = count
            self.cls[i].header = header
            self.cls[i].meta = meta
            self.cls[i].data = data

    cdef inline char* base(self) except NULL:
        if self.region.closed:
            raise ValueError("slot pool's region is closed")
        return self.region.base

    cdef inline int check_ref(self, int c, int extent, uint32_t s) except -1:
        # trap 23: class, extent and slot index all bounds-checked before any use.
        if c < 0 or c >= self.num_classes:
            raise InvalidSlotRef(f"class_idx {c} out of range (pool has {self.num_classes} classes)")
        if extent != 0:
            raise InvalidSlotRef(f"extent_idx {extent} does not exist (class {c} has 1 extent)")
        if s >= self.cls[c].slot_count:
            raise InvalidSlotRef(f"slot_idx {s} out of range (class {c} has {self.cls[c].slot_count} slots)")
        return 0

    cdef inline char* meta(self, int c, uint32_t s) except NULL:
        return self.base() + self.cls[c].meta + <Py_ssize_t>s * SHMHUB_SLOT_META_SIZE

    cdef inline char* slot_data(self, int c, uint32_t s) except NULL:
        return self.base() + self.cls[c].data + <Py_ssize_t>s * self.cls[c].slot_size

    # -- the pool-op journal (FEATURE_POOL_JOURNAL) ------------------------------------------

    cdef inline char* journal(self, uint32_t peer) except? NULL:
        """The PEER_POOL_OP word of a guest, or NULL (the host and journal-less pools keep none:
        the host's pool calls hold the GIL, so its own recovery never sees them half done)."""
        if peer == 0 or peer > self.journal_count:
            return NULL
        return self.base() + self.journal_base + <Py_ssize_t>(peer - 1) * SHMHUB_PEER_ENTRY_SIZE + SHMHUB_PEER_POOL_OP

    cdef int listed(self, int c, uint32_t s) except -2:
        """1 if slot s is on class c's free list, 0 if not, -1 if no consistent view was had.
        A walk is a snapshot when the head word (its ABA tag counts every push and pop) is the
        same before and after it: nodes on the list never change their next_free."""
        cdef char* headp = self.base() + self.cls[c].header + SHMHUB_CLS_FREE_HEAD
        cdef uint64_t h1
        cdef uint32_t idx, steps, count = self.cls[c].slot_count
        cdef int attempt, found
        for attempt in range(4096):
            h1 = shm_load64(headp, SHM_ACQUIRE)
            idx = <uint32_t>(h1 & 0xFFFFFFFF)
            found = 0
            steps = 0
            while idx != SHMHUB_EMPTY_INDEX and idx < count and steps <= count:
                if idx == s:
                    found = 1
                    break
                idx = shm_load32(self.meta(c, idx) + SHMHUB_META_NEXT_FREE, SHM_ACQUIRE)
                steps += 1
            if shm_load64(headp, SHM_ACQUIRE) == h1:
                if not found and (idx != SHMHUB_EMPTY_INDEX):
                    raise SegmentCorrupted(f"class {c} free list is broken (index {idx} after {steps} steps)")
                return found
            shm_cpu_relax()
        return -1

    def recover_pool_op(self, uint32_t peer):
        """Crash recovery: finish the pop or free a dead guest was in the middle of.

        Returns (slots_freed, resolved). resolved is False when it cannot be decided yet (a live
        peer is itself mid-pop of the very slot, or the free list never held still for a look):
        call again shortly. Clears the journal once resolved."""
        cdef char* j = self.journal(peer)
        cdef uint64_t word, w, seen
        cdef uint32_t gen, s, other
        cdef int c, op, n, listed
        cdef char* m
        cdef char* oj
        if j == NULL:
            return (0, True)
        word = shm_load64(j, SHM_ACQUIRE)
        gen = shm_load32(j + (SHMHUB_PEER_POOL_OP_GEN - SHMHUB_PEER_POOL_OP), SHM_ACQUIRE)
        op = <int>(word >> 56)
        c = <int>((word >> 32) & 0xFF)
        s = <uint32_t>(word & 0xFFFFFFFF)
        if op == SHMHUB_POOL_OP_NONE or c >= self.num_classes or s >= self.cls[c].slot_count or \
                op not in (SHMHUB_POOL_OP_POP, SHMHUB_POOL_OP_FREE):
            shm_store64(j, 0, SHM_RELEASE)
            return (0, True)  # nothing in progress (or a record that names no slot: nothing to do)
        m = self.meta(c, s)
        w = shm_load64(m, SHM_ACQUIRE)
        n = 0
        if op == SHMHUB_POOL_OP_FREE and w == meta_word(gen, <uint32_t>SHMHUB_SLOT_ALLOCATED):
            n = self.c_free(c, 0, s, gen, False, 0)  # died before marking it Free: finish the free
        elif w == meta_word(gen, <uint32_t>SHMHUB_SLOT_FREE):
            # Free under the journaled generation: still on the list (the pop never happened, or
            # the push did), or orphaned (popped but not yet Allocated / Free but not yet pushed).
            listed = self.listed(c, s)
            if listed < 0:
                return (0, False)
            if not listed:
                # Off the list: ours to restore, unless a live guest popped it and is between its
                # CAS and its Allocated store (its journal names the slot until it is done).
                for other in range(1, self.journal_count + 1):
                    if other == peer:
                        continue
                    oj = self.journal(other)
                    word = shm_load64(oj, SHM_ACQUIRE)
                    if <int>(word >> 56) == SHMHUB_POOL_OP_POP and <int>((word >> 32) & 0xFF) == c and \
                            <uint32_t>(word & 0xFFFFFFFF) == s:
                        return (0, False)
                # Claim it as a pop would (a CAS: nobody else may hold it), then free it.
                seen = shm_cas64(m, meta_word(gen, <uint32_t>SHMHUB_SLOT_FREE), meta_word(gen + 1, <uint32_t>SHMHUB_SLOT_ALLOCATED))
                if seen != meta_word(gen, <uint32_t>SHMHUB_SLOT_FREE):
                    return (0, False)
                shm_store32(m + SHMHUB_META_OWNER, 0, SHM_RELAXED)
                n = self.c_free(c, 0, s, gen + 1, False, 0)
        # else: the operation completed (reclaim() frees what the guest still owns) or the slot
        # has moved on since.
        shm_store64(j, 0, SHM_RELEASE)
        return (n, True)

    def pool_op(self, uint32_t peer):
        """(op, class_idx, slot_idx, generation) journaled by a guest, or None (inspection, tests)."""
        cdef char* j = self.journal(peer)
        if j == NULL:
            return None
        cdef uint64_t word = shm_load64(j, SHM_ACQUIRE)
        return (<int>(word >> 56), <int>((word >> 32) & 0xFF), <uint32_t>(word & 0xFFFFFFFF),
                shm_load32(j + (SHMHUB_PEER_POOL_OP_GEN - SHMHUB_PEER_POOL_OP), SHM_ACQUIRE))

    def format(self):
        """Write empty class headers and free lists (host, before the segment is shared)."""
        cdef char* b = self.base()
        cdef char* m
        cdef uint32_t s, n
        cdef int c
        if not self.region.writable:
            raise PermissionError("region is mapped read-only")
        for c in range(self.num_classes):
            n = self.cls[c].slot_count
            shm_put_u32(b + self.cls[c].header + SHMHUB_CLS_SLOT_SIZE, self.cls[c].slot_size)
            shm_put_u32(b + self.cls[c].header + SHMHUB_CLS_SLOT_COUNT, n)
            shm_store64(b + self.cls[c].header + SHMHUB_CLS_FREE_HEAD, 0, SHM_RELAXED)
            for s in range(n):
                m = self.meta(c, s)
                memset(m, 0, SHMHUB_SLOT_META_SIZE)
                shm_put_u32(m + SHMHUB_META_NEXT_FREE, s + 1 if s + 1 < n else <uint32_t>SHMHUB_EMPTY_INDEX)
        shm_fence(SHM_RELEASE)

    cdef long long pop(self, int c, uint32_t owner) except -2:
        cdef char* headp = self.base() + self.cls[c].header + SHMHUB_CLS_FREE_HEAD
        cdef char* j = self.journal(owner)
        cdef uint64_t head, seen, new
        cdef uint32_t idx, nxt, gen
        cdef char* m
        head = shm_load64(headp, SHM_ACQUIRE)
        while True:
            idx = <uint32_t>(head & 0xFFFFFFFF)
            if idx == SHMHUB_EMPTY_INDEX:
                if j != NULL:
                    shm_store64(j, 0, SHM_RELEASE)
                return -1
            if idx >= self.cls[c].slot_count:
                raise SegmentCorrupted(f"class {c} free list head {idx} is out of range")
            nxt = shm_load32(self.meta(c, idx) + SHMHUB_META_NEXT_FREE, SHM_ACQUIRE)
            if j != NULL:
                journal_set(j, SHMHUB_POOL_OP_POP, c, idx, shm_load32(self.meta(c, idx) + SHMHUB_META_GENERATION, SHM_ACQUIRE))
            # The ABA tag rides along through EMPTY and is never reset (trap 24).
            new = (((head >> 32) + 1) << 32) | nxt
            seen = shm_cas64(headp, head, new)
            if seen == head:
                break
            head = seen
        m = self.meta(c, idx)
        gen = shm_load32(m + SHMHUB_META_GENERATION, SHM_RELAXED) + 1
        shm_store32(m + SHMHUB_META_OWNER, owner, SHM_RELAXED)
        shm_store64(m + SHMHUB_META_GENERATION, meta_word(gen, <uint32_t>SHMHUB_SLOT_ALLOCATED), SHM_RELEASE)
        if j != NULL:
            shm_store64(j, 0, SHM_RELEASE)
        return (<long long>gen << 32) | idx

    cdef int push(self, int c, uint32_t s) except -1:
        cdef char* headp = self.base() + self.cls[c].header + SHMHUB_CLS_FREE_HEAD
        cdef char* m = self.meta(c, s)
        cdef uint64_t head = shm_load64(headp, SHM_ACQUIRE)
        cdef uint64_t seen
        while True:
            shm_store32(m + SHMHUB_META_NEXT_FREE, <uint32_t>(head & 0xFFFFFFFF), SHM_RELEASE)
            seen = shm_cas64(headp, head, (((head >> 32) + 1) << 32) | s)
            if seen == head:
                return 0
            head = seen

    def alloc(self, Py_ssize_t size, uint32_t owner):
        """Allocate a slot holding at least `size` bytes from the smallest fitting class, then
        larger ones. Returns (class_idx, slot_idx, generation), or None when all are exhausted."""
        cdef long long r
        cdef int c
        for c in range(self.num_classes):
            if self.cls[c].slot_size < size:
                continue
            r = self.pop(c, owner)
            if r >= 0:
                return (c, <uint32_t>(r & 0xFFFFFFFF), <uint32_t>(r >> 32))
        return None

    def alloc_in_class(self, int class_idx, uint32_t owner):
        """Allocate from one class only; (class_idx, slot_idx, generation) or None."""
        self.check_ref(class_idx, 0, 0)
        cdef long long r = self.pop(class_idx, owner)
        if r < 0:
            return None
        return (class_idx, <uint32_t>(r & 0xFFFFFFFF), <uint32_t>(r >> 32))

    cdef int c_free(self, int c, int extent, uint32_t s, uint32_t gen, bint strict, uint32_t by) except -1:
        self.check_ref(c, extent, s)
        cdef char* m = self.meta(c, s)
        cdef char* j
        cdef uint64_t expected = meta_word(gen, <uint32_t>SHMHUB_SLOT_ALLOCATED)
        cdef uint64_t seen = shm_load64(m, SHM_ACQUIRE)
        if seen == expected:
            j = self.journal(by)
            if j != NULL:
                journal_set(j, SHMHUB_POOL_OP_FREE, c, s, gen)
            shm_store32(m + SHMHUB_META_OWNER, 0, SHM_RELAXED)
            # DECISIONS 8 / trap 21: only the winner of Allocated->Free pushes the slot.
            seen = shm_cas64(m, expected, meta_word(gen, <uint32_t>SHMHUB_SLOT_FREE))
            if seen == expected:
                self.push(c, s)
            if j != NULL:
                shm_store64(j, 0, SHM_RELEASE)
            if seen == expected:
                return 1
        if not strict:
            return 0
        if (seen >> 32) != SHMHUB_SLOT_ALLOCATED:
            raise DoubleFree(f"slot class {c} idx {s} generation {gen} is not allocated (double free)")
        raise StaleSlotRef(f"slot class {c} idx {s}: reference generation {gen}, slot is at {<uint32_t>seen}")

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
        self.check_ref(class_idx, extent_idx, slot_idx)
        cdef char* m = self.meta(class_idx, slot_idx)
        cdef uint64_t expected = meta_word(generation, <uint32_t>SHMHUB_SLOT_ALLOCATED)
        if shm_load64(m, SHM_ACQUIRE) != expected:
            self.c_free(class_idx, extent_idx, slot_idx, generation, True, 0)  # raises the precise error
        shm_store32(m + SHMHUB_META_OWNER, new_owner, SHM_RELEASE)
        if shm_load64(m, SHM_ACQUIRE) != expected:
            raise StaleSlotRef(f"slot class {class_idx} idx {slot_idx} changed while being received")
        return self.payload_len(class_idx, slot_idx)

    def payload_len(self, int class_idx, uint32_t slot_idx):
        """The u32 length prefix of a slot, checked against the slot size (format-v7 1.6)."""
        self.check_ref(class_idx, 0, slot_idx)
        cdef uint32_t n = shm_get_u32(self.slot_data(class_idx, slot_idx))
        if n > self.cls[class_idx].slot_size - SHMHUB_SLOT_LEN_PREFIX:
            raise InvalidSlotRef(f"slot class {class_idx} idx {slot_idx}: length prefix {n} exceeds "
                                 f"slot_size {self.cls[class_idx].slot_size} - 4")
        return n

    def write_payload(self, int class_idx, uint32_t slot_idx, data):
        """Write [u32 len][data] into a slot."""
        self.check_ref(class_idx, 0, slot_idx)
        cdef Py_buffer b
        cdef char* p
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
        try:
            if b.len > <Py_ssize_t>(self.cls[class_idx].slot_size - SHMHUB_SLOT_LEN_PREFIX):
                raise ValueError(f"{b.len} bytes do not fit in a {self.cls[class_idx].slot_size}-byte slot")
            p = self.slot_data(class_idx, slot_idx)
            shm_put_u32(p, <uint32_t>b.len)
            memcpy(p + SHMHUB_SLOT_LEN_PREFIX, b.buf, b.len)
        finally:
            PyBuffer_Release(&b)

    def set_payload_len(self, int class_idx, uint32_t slot_idx, uint32_t n):
        """Store the length prefix after writing the payload in place (zero-copy send)."""
        self.check_ref(class_idx, 0, slot_idx)
        if n > self.cls[class_idx].slot_size - SHMHUB_SLOT_LEN_PREFIX:
            raise ValueError(f"{n} bytes do not fit in a {self.cls[class_idx].slot_size}-byte slot")
        shm_put_u32(self.slot_data(class_idx, slot_idx), n)

    def payload_offset(self, int class_idx, uint32_t slot_idx):
        """Region offset of a slot's payload (after the length prefix)."""
        self.check_ref(class_idx, 0, slot_idx)
        return self.cls[class_idx].data + <Py_ssize_t>slot_idx * self.cls[class_idx].slot_size + SHMHUB_SLOT_LEN_PREFIX

    def read_payload(self, int class_idx, uint32_t slot_idx):
        """Copy a slot's payload out (bytes)."""
        n = self.payload_len(class_idx, slot_idx)
        return PyBytes_FromStringAndSize(self.slot_data(class_idx, slot_idx) + SHMHUB_SLOT_LEN_PREFIX, n)

    def reclaim(self, uint32_t owner):
        """Free every allocated slot owned by `owner` (crash recovery); returns how many."""
        cdef int freed = 0
        cdef int c
        cdef uint32_t s
        cdef uint64_t w
        cdef char* m
        for c in range(self.num_classes):
            for s in range(self.cls[c].slot_count):
                m = self.meta(c, s)
                w = shm_load64(m, SHM_ACQUIRE)
                if (w >> 32) == SHMHUB_SLOT_ALLOCATED and shm_load32(m + SHMHUB_META_OWNER, SHM_ACQUIRE) == owner:
                    freed += self.c_free(c, 0, s, <uint32_t>w, False, 0)
        return freed

    def counts(self, int class_idx):
        """(free, allocated) slot counts of a class, from the slot states."""
        self.check_ref(class_idx, 0, 0)
        cdef uint32_t s, free = 0
        for s in range(self.cls[class_idx].slot_count):
            if shm_load32(self.meta(class_idx, s) + SHMHUB_META_STATE, SHM_ACQUIRE) == SHMHUB_SLOT_FREE:
                free += 1
        return (free, self.cls[class_idx].slot_count - free)

    def class_info(self, int class_idx):
        """(slot_size, slot_count) of a class."""
        self.check_ref(class_idx, 0, 0)
        return (self.cls[class_idx].slot_size, self.cls[class_idx].slot_count)

    def free_head(self, int class_idx):
        """(aba_tag, index) of a class's free list head."""
        self.check_ref(class_idx, 0, 0)
        cdef uint64_t h = shm_load64(self.base() + self.cls[class_idx].header + SHMHUB_CLS_FREE_HEAD, SHM_ACQUIRE)
        return (<uint32_t>(h >> 32), <uint32_t>(h & 0xFFFFFFFF))

    def slot_meta(self, int class_idx, uint32_t slot_idx):
        """(generation, state, owner, next_free) of one slot."""
        self.check_ref(class_idx, 0, slot_idx)
        cdef char* m = self.meta(class_idx, slot_idx)
        return (shm_load32(m + SHMHUB_META_GENERATION, SHM_ACQUIRE), shm_load32(m + SHMHUB_META_STATE, SHM_ACQUIRE),
                shm_load32(m + SHMHUB_META_OWNER, SHM_ACQUIRE), shm_load32(m + SHMHUB_META_NEXT_FREE, SHM_ACQUIRE))


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

cdef class Message:
    """A received payload. Supports the buffer protocol (read-only); slot and mapping payloads
    are views into shared memory, freed by release(), a with block, or garbage collection.
    release() refuses while memoryviews of the message are still alive."""
    cdef object owner
    cdef const char* ptr
    cdef Py_ssize_t length
    cdef Py_ssize_t exports
    cdef object on_release
    cdef readonly str tier
    cdef bint released

    def __init__(self, owner, Py_ssize_t offset, Py_ssize_t length, str tier, on_release=None):
        """owner: a Region (the span is pinned) or a bytes object holding the payload."""
        if isinstance(owner, Region):
            (<Region>owner).ptr(offset, length, 1)
            (<Region>owner).pin()
            self.ptr = (<Region>owner).base + offset
        elif isinstance(owner, bytes):
            if offset < 0 or length < 0 or offset > len(owner) - length:
                raise IndexError("message span outside its bytes")
            self.ptr = PyBytes_AS_STRING(owner) + offset
        else:
            raise TypeError("owner must be a Region or bytes")
        self.owner = owner
        self.length = length
        self.tier = tier
        self.on_release = on_release
        self.exports = 0
        self.released = False

    def __getbuffer__(self, Py_buffer* buf, int flags):
        if self.released:
            raise ValueError("message was released")
        PyBuffer_FillInfo(buf, self, <void*>self.ptr, self.length, 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* buf):
        self.exports -= 1

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

    cdef _finish(self):
        self.released = True
        cb, self.on_release = self.on_release, None
        owner = self.owner
        self.owner = None
        try:
            if cb is not None:
                cb()
        finally:
            if isinstance(owner, Region):
                (<Region>owner).unpin()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        if not self.released:
            try:
                self._finish()
            except Exception:
                pass  # the segment may be gone already; nothing left to free then

    def __repr__(self):
        state = "released" if self.released else f"{self.length} bytes"
        return f"<shmhub.Message {self.tier} {state}>"
