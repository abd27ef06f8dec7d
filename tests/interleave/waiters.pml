/* The waiter flags and doorbells (FEATURE_WAITER_FLAGS, algorithms.md 2.8): Link._wait and
 * LinkCore's send/receive paths over one ring, checked by SPIN over every interleaving of the
 * producer and the consumer, both of which sleep (a ring of K frames, N frames sent).
 *
 * The sleeper (Link._wait): try; announce (Waiter.announce -> Ring.set_waiting(side, 1): SeqCst
 * store + fence); try again; sleep on its doorbell end (Doorbell.wait: poll, then drain); withdraw
 * (set_waiting(side, 0)); try again; loop. The publisher, after its commit or release
 * (Ring.c_waiting, behind claim_peer_waiting / check_waiter): fence; load the peer's flag; while
 * set, CAS it to 0, and the winner rings the peer's doorbell (one byte; a full socket buffer
 * coalesces: EAGAIN is "already pending"). The ring itself is an abstract frame count here; its
 * indices are ring.pml's.
 *
 * Forbidden outcome: a lost wakeup -- a side asleep for good while the other has published what
 * it waits for. Both sides block without a timeout here, so a lost wakeup ends the run with a
 * process blocked: SPIN's invalid end state. Also asserted: every frame delivered once.
 *
 * The consumer wakes a waiting producer in batches (Ring.c_wake_due): after a release it rings only
 * once B releases have passed since the producer announced, or when the ring is left empty.
 *
 * Injected bugs (each must make SPIN report an error):
 *   BUG_NO_RECHECK     the sleeper sleeps right after announcing, without trying again
 *   BUG_LOOK_FIRST     the publisher loads the flag before it publishes
 *   BUG_ANNOUNCE_ONCE  the sleeper announces once, not before every sleep (the publisher's
 *                      claim clears the flag: a second sleep would go unannounced)
 *   BUG_DRAIN_FIRST    the doorbell drains before it polls (a byte rung between the re-check
 *                      and the sleep is thrown away: not sticky)
 *   BUG_BATCH_ONLY     the consumer rings every B releases only, not when the ring is left empty
 *
 * FILENO: the consumer is a Link.fileno() user (Host.recv_any, selectors): its flag is announced
 * for good; it polls, and on an empty ring re-arms (Link._rearm_locked: drain the doorbell,
 * announce, poll again) and waits for the fd to be readable, which does not drain it (epoll is
 * level-triggered). Injected bug:
 *   BUG_REARM_LATE_DRAIN  the re-arm announces, then drains: a late notify (of a frame already
 *                      read) claims the new announcement and its byte is drained, so the next
 *                      frame's notify finds the flag claimed and does not ring
 */

#ifndef K
#define K 1            /* ring capacity in frames */
#endif
#ifndef N
#define N 3            /* frames sent */
#endif
#ifndef B
#define B 2            /* Ring.wake_batch: releases per wake-up of a waiting producer */
#endif

byte count;            /* frames committed, not released */
byte sent, received;
bool pdone;
bit cw, pw;            /* RING_CONSUMER_WAITING, RING_PRODUCER_WAITING */
bit bell_c, bell_p;    /* a byte pending at the consumer's / producer's doorbell end */
byte unrung;           /* the consumer's releases since the producer's flag was seen (Ring.unrung) */

/* Ring.c_waiting + Link._ring: claim the peer's flag, ring its doorbell if we won */
inline notify(flag, bell) {
#ifndef BUG_LOOK_FIRST
    v = flag;                                /* fence(SeqCst); load (Acquire) */
#endif
    do
    :: v != 0 ->
        atomic {                             /* CAS(v -> 0) */
            if
            :: flag == v -> flag = 0; won = true
            :: else -> v = flag; won = false
            fi
        };
        if
        :: won -> bell = 1; break            /* send one byte (EAGAIN: already pending) */
        :: else
        fi
    :: else -> break
    od
}

/* Ring.c_wake_due, after a release: ring a waiting producer once B releases have passed, or when
 * the ring is left empty */
inline wake_producer() {
    v = pw;                                  /* fence(SeqCst); load (Acquire) */
    if
    :: v == 0 -> unrung = 0
    :: else ->
        unrung++;
        if
#ifdef BUG_BATCH_ONLY
        :: unrung >= B -> unrung = 0; notify(pw, bell_p)
#else
        :: unrung >= B || count == 0 -> unrung = 0; notify(pw, bell_p)
#endif
        :: else
        fi
    fi
}

/* the doorbell's wait: poll for a byte, then drain it */
inline sleep(bell) {
#ifdef BUG_DRAIN_FIRST
    bell = 0;
#endif
    (bell == 1);
    bell = 0
}

active proctype producer() {
    bit v;
    bool won, ok;
    do
    :: sent == N -> break
    :: else ->
        /* Link._wait(attempt = try to send) */
#ifdef BUG_ANNOUNCE_ONCE
        pw = 1;
#endif
        do
        :: true ->
#ifdef BUG_LOOK_FIRST
            v = cw;
#endif
            atomic { ok = count < K; if :: ok -> count++ :: else fi };    /* grant + commit */
            if
            :: ok -> break
            :: else
            fi;
#ifndef BUG_ANNOUNCE_ONCE
            pw = 1;                          /* announce: SeqCst store + fence */
#endif
#ifndef BUG_NO_RECHECK
            atomic { ok = count < K; if :: ok -> count++ :: else fi };    /* re-check */
            if
            :: ok -> pw = 0; break           /* withdraw */
            :: else
            fi;
#endif
            sleep(bell_p);
            pw = 0                           /* withdraw */
        od;
        sent++;
        notify(cw, bell_c)                   /* send_inline(check_waiter) -> ring if claimed */
    od;
    pdone = true
}

active proctype consumer() {
    bit v;
    bool won, ok;
    do
    :: received == N -> break
    :: else ->
#ifdef FILENO
        do
        :: true ->
            atomic { ok = count > 0; if :: ok -> count-- :: else fi };    /* try_recv */
            if
            :: ok -> break
            :: else
            fi;
#ifdef BUG_REARM_LATE_DRAIN
            cw = 1;
            bell_c = 0;
#else
            bell_c = 0;                      /* drain */
            cw = 1;                          /* announce */
#endif
            atomic { ok = count > 0; if :: ok -> count-- :: else fi };    /* poll again */
            if
            :: ok -> break
            :: else
            fi;
            (bell_c == 1)                    /* the fd is readable (epoll: not drained) */
        od;
#else
        /* Link._wait(attempt = try to receive) */
#ifdef BUG_ANNOUNCE_ONCE
        cw = 1;
#endif
        do
        :: true ->
#ifdef BUG_LOOK_FIRST
            v = pw;
#endif
            atomic { ok = count > 0; if :: ok -> count-- :: else fi };    /* read + release */
            if
            :: ok -> break
            :: else
            fi;
#ifndef BUG_ANNOUNCE_ONCE
            cw = 1;
#endif
#ifndef BUG_NO_RECHECK
            atomic { ok = count > 0; if :: ok -> count-- :: else fi };
            if
            :: ok -> cw = 0; break
            :: else
            fi;
#endif
            sleep(bell_c);
            cw = 0
        od;
#endif
        received++;
        wake_producer()                      /* recv_inline(check_waiter): producer_waiting -> ring */
    od;
    pdone;
    assert(count == 0 && sent == N)          /* every frame delivered once */
}
