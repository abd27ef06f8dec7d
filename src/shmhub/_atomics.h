/* Cross-process atomics on shared memory with explicit memory orderings (GCC/Clang builtins).
 * Every function takes the order as an argument; with a constant order and inlining the switch
 * folds away. Lock-free 4- and 8-byte atomics are address-free, so they work across processes. */
#pragma once
#include <stdint.h>

#define SHM_RELAXED __ATOMIC_RELAXED
#define SHM_ACQUIRE __ATOMIC_ACQUIRE
#define SHM_RELEASE __ATOMIC_RELEASE
#define SHM_ACQ_REL __ATOMIC_ACQ_REL
#define SHM_SEQ_CST __ATOMIC_SEQ_CST

_Static_assert(__atomic_always_lock_free(4, 0), "u32 atomics must be lock-free");
_Static_assert(__atomic_always_lock_free(8, 0), "u64 atomics must be lock-free");

static inline int shm_load_order(int mo) {
    return (mo == SHM_RELAXED || mo == SHM_ACQUIRE) ? mo : SHM_SEQ_CST;
}
static inline int shm_store_order(int mo) {
    return (mo == SHM_RELAXED || mo == SHM_RELEASE) ? mo : SHM_SEQ_CST;
}

#define SHM_DEFINE(bits)                                                                       \
static inline uint##bits##_t shm_load##bits(const void *p, int mo) {                           \
    switch (shm_load_order(mo)) {                                                              \
    case SHM_RELAXED: return __atomic_load_n((const uint##bits##_t *)p, SHM_RELAXED);          \
    case SHM_ACQUIRE: return __atomic_load_n((const uint##bits##_t *)p, SHM_ACQUIRE);          \
    default: return __atomic_load_n((const uint##bits##_t *)p, SHM_SEQ_CST);                   \
    }                                                                                          \
}                                                                                              \
static inline void shm_store##bits(void *p, uint##bits##_t v, int mo) {                        \
    switch (shm_store_order(mo)) {                                                             \
    case SHM_RELAXED: __atomic_store_n((uint##bits##_t *)p, v, SHM_RELAXED); break;            \
    case SHM_RELEASE: __atomic_store_n((uint##bits##_t *)p, v, SHM_RELEASE); break;            \
    default: __atomic_store_n((uint##bits##_t *)p, v, SHM_SEQ_CST); break;                     \
    }                                                                                          \
}                                                                                              \
/* Compare-exchange, AcqRel on success / Acquire on failure (algorithms.md 2.3, 2.4).        \
 * Returns the value seen: success iff it equals `expected`. */                               \
static inline uint##bits##_t shm_cas##bits(void *p, uint##bits##_t expected, uint##bits##_t desired) { \
    __atomic_compare_exchange_n((uint##bits##_t *)p, &expected, desired, 0,                    \
                                SHM_ACQ_REL, SHM_ACQUIRE);                                      \
    return expected;                                                                           \
}                                                                                              \
static inline uint##bits##_t shm_fetch_add##bits(void *p, uint##bits##_t v, int mo) {         \
    switch (mo) {                                                                              \
    case SHM_RELAXED: return __atomic_fetch_add((uint##bits##_t *)p, v, SHM_RELAXED);          \
    case SHM_ACQUIRE: return __atomic_fetch_add((uint##bits##_t *)p, v, SHM_ACQUIRE);          \
    case SHM_RELEASE: return __atomic_fetch_add((uint##bits##_t *)p, v, SHM_RELEASE);          \
    case SHM_ACQ_REL: return __atomic_fetch_add((uint##bits##_t *)p, v, SHM_ACQ_REL);          \
    default: return __atomic_fetch_add((uint##bits##_t *)p, v, SHM_SEQ_CST);                   \
    }                                                                                          \
}

SHM_DEFINE(32)
SHM_DEFINE(64)

static inline uint32_t shm_fetch_or32(void *p, uint32_t v) {
    return __atomic_fetch_or((uint32_t *)p, v, SHM_SEQ_CST);
}

static inline void shm_fence(int mo) {
    switch (mo) {
    case SHM_ACQUIRE: __atomic_thread_fence(SHM_ACQUIRE); break;
    case SHM_RELEASE: __atomic_thread_fence(SHM_RELEASE); break;
    case SHM_ACQ_REL: __atomic_thread_fence(SHM_ACQ_REL); break;
    default: __atomic_thread_fence(SHM_SEQ_CST); break;
    }
}

static inline void shm_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Unaligned little-endian field access for frame bytes (ring entries are only 4-aligned). */
#include <string.h>
static inline uint32_t shm_get_u32(const char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t shm_get_u16(const char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint64_t shm_get_u64(const char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void shm_put_u32(char *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void shm_put_u16(char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void shm_put_u64(char *p, uint64_t v) { memcpy(p, &v, 8); }

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "shmhub's format is little-endian; big-endian hosts are not supported"
#endif

/* Shared (not private) futexes on words of the segment: FUTEX_WAIT/WAKE key a MAP_SHARED word by
 * its file and offset, so processes mapping the segment at different addresses meet on it
 * (FEATURE_POOL_WAITERS, docs/extensions.md). Each returns >= 0, or -errno. */
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>
#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#define SHM_FUTEX_WAITV_MAX 128

struct shm_futex_waitv { uint64_t val; uint64_t uaddr; uint32_t flags; uint32_t reserved; };

static inline int shm_futex_wake(void *p, int n) {
    long r = syscall(SYS_futex, p, FUTEX_WAKE, n, NULL, NULL, 0);
    return r < 0 ? -errno : (int)r;
}

/* Sleep while *p == expected, at most rel (NULL: no limit). 0 when woken (or spuriously). */
static inline int shm_futex_wait(void *p, uint32_t expected, const struct timespec *rel) {
    long r = syscall(SYS_futex, p, FUTEX_WAIT, expected, rel, NULL, 0);
    return r < 0 ? -errno : (int)r;
}

/* Sleep on several words at once until one changes or CLOCK_MONOTONIC reaches abs (NULL: no limit).
 * -ENOSYS before Linux 5.16. */
static inline int shm_futex_wait_any(struct shm_futex_waitv *w, unsigned n, const struct timespec *abs) {
    long r = syscall(SYS_futex_waitv, w, n, 0, abs, CLOCK_MONOTONIC);
    return r < 0 ? -errno : (int)r;
}

/* Deterministic crash points for the kill-anywhere tests (docs/hardening.md, tests/crashpoints).
 * Only a build with -DSHMHUB_CRASHPOINTS (SHMHUB_CRASHPOINTS=1 at setup.py time: `make
 * crashpoints`) has them; elsewhere SHM_CRASHPOINT(name) is nothing at all. In that build,
 * SHMHUB_CRASH_AT=name:count makes the count-th pass through point `name` abort() the process
 * (read once, at the first point passed). */
#ifdef SHMHUB_CRASHPOINTS
#include <stdlib.h>
#define SHM_CRASHPOINTS_BUILT 1
static char shm_crash_name[96];
static long shm_crash_left = -1; /* -1: SHMHUB_CRASH_AT not read yet; 0: disarmed */

static void shm_crash_arm(void) {
    const char *at = getenv("SHMHUB_CRASH_AT");
    const char *colon = at ? strrchr(at, ':') : NULL;
    shm_crash_left = 0;
    if (colon == NULL || (size_t)(colon - at) >= sizeof shm_crash_name)
        return;
    memcpy(shm_crash_name, at, (size_t)(colon - at));
    shm_crash_name[colon - at] = 0;
    shm_crash_left = strtol(colon + 1, NULL, 10);
}

static inline void shm_crashpoint(const char *name) {
    if (shm_crash_left < 0)
        shm_crash_arm();
    if (shm_crash_left > 0 && strcmp(name, shm_crash_name) == 0 && --shm_crash_left == 0)
        abort();
}
#define SHM_CRASHPOINT(name) shm_crashpoint(name)
#else
#define SHM_CRASHPOINTS_BUILT 0
#define SHM_CRASHPOINT(name) ((void)0)
#endif
