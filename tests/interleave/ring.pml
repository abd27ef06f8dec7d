/* The SPSC BipBuffer ring of src/shmhub/_native.pyx (class Ring), checked by SPIN over every
 * interleaving of one producer and one consumer (algorithms.md 2.1 with the mid-wrap fix of
 * docs/deviations.md ring 1, and both sides' caches of the other's index: seen_read, run_end).
 *
 * Every statement that touches a shared word (write, watermark, read, or frame bytes) is one
 * atomic step; local computation is folded into the step next to it. SPIN interleaves the steps
 * of the two processes in every possible order (sequential consistency: the Acquire/Release
 * orderings of the C code are what makes the real machine behave like one of these orders).
 *
 * Sizes are in 4-byte units (ring entries are 4-aligned): a frame is HDR units of header
 * (total_len, then the sequence number in the word the real header keeps inline_len in) and
 * payload units each holding the sequence number, so a torn or overwritten frame shows.
 *
 * Forbidden outcomes, each an assert below:
 *   - a frame delivered twice, out of order or lost      (the sequence check on delivery, and
 *                                                         the consumer must end with NFRAMES)
 *   - a torn / corrupted frame                           (every unit of a delivered frame holds
 *                                                         its sequence number; check_frame holds)
 *   - the producer writing bytes the consumer has not released, or the consumer reading bytes
 *     not committed yet                                  (ghost ownership of every unit: own[])
 *   - an index the C code would reject as LinkCorrupted (read past write with no watermark,
 *     a commit or release overrunning the capacity)
 *   - both sides stuck (SPIN's invalid end state): a side that finds no room / nothing to read
 *     blocks until the other side changes an index (the doorbell, modelled in waiters.pml)
 *
 * -DKILL: the producer may be killed at any step, and the consumer then drains what is left, as
 * the host's recovery does (see the killer below).
 *
 * Injected bugs (each must make SPIN report an error; tests/interleave/test_interleave.py):
 *   BUG_NO_MIDWRAP       the original 2.1 read: no "write >= watermark" mid-wrap check
 *   BUG_WRITE_FIRST      the wrap stores write = 0 before the watermark (trap 1)
 *   BUG_WM_FIRST         the consumer loads the watermark before write (trap 1)
 *   BUG_NONSTRICT        a grant may make write reach read (trap 2)
 *   BUG_NO_LAST_LOOK     with -DKILL: the consumer stops when it learns of the death, without
 *                        one more look (frames committed just before the death are lost)
 */

#ifndef CAP
#define CAP 6          /* capacity in units (24 bytes) */
#endif
#ifndef NFRAMES
#define NFRAMES 4      /* frames sent */
#endif
#ifndef MAXF
#define MAXF 3         /* largest frame (units); <= CAP/2, the geometry caveat of 2.1 */
#endif
#define HDR 2          /* SHMHUB_FRAME_HEADER_SIZE = 8 bytes */

#define FREE 0
#define WRITING 1      /* granted to the producer, not committed */
#define COMMITTED 2    /* committed, not released */

byte wr;               /* RING_WRITE: stored by the producer (and the consumer never) */
byte wm;               /* RING_WATERMARK: stored by the producer (wrap) and the consumer (reset to 0) */
byte rd;               /* RING_READ: stored by the consumer */
byte data[CAP];
byte own[CAP];         /* ghost */
bool pdone;
bool pdead;            /* -DKILL: the producer was killed */
byte committed;        /* ghost: frames committed */

/* fits(w, r, n, cap) of _native.pyx: room at w, or at 0 after a wrap (n > 0) */
#ifdef BUG_NONSTRICT
#define FITS(w, r, n) ((w >= r) -> (CAP - w >= n || (r != 0 && n <= r)) : (w + n <= r))
#else
#define FITS(w, r, n) ((w >= r) -> (CAP - w >= n || (r != 0 && n < r)) : (w + n < r))
#endif

active proctype producer() {
    byte w, r, n, i, seq = 1;
    byte seen_read;          /* Ring.seen_read */
    bool seen_ok = false;    /* Ring.seen_read_ok */
    short off;

    {
    do
    :: seq > NFRAMES -> break
    :: else ->
        if                   /* the frame's size: every size from a bare header to MAXF */
        :: n = HDR
        :: MAXF > HDR -> n = HDR + 1
        :: MAXF > HDR + 1 -> n = HDR + 2
        fi;
grant:  /* c_grant(n) */
        w = wr;              /* idx(WRITE, Relaxed): only this process stores write */
        if
        :: seen_ok && FITS(w, seen_read, n) -> skip
        :: else -> seen_read = rd; seen_ok = true       /* idx(READ, Acquire) */
        fi;
        r = seen_read;
        if
        :: w >= r ->
            if
            :: CAP - w >= n -> off = w
            :: else ->
                if
                :: r == 0 -> off = -1      /* wrapping would make write == read == 0 */
                :: else ->
#ifdef BUG_WRITE_FIRST
                    wr = 0;
                    wm = w;
#else
                    wm = w;                 /* watermark before write (trap 1) */
                    wr = 0;
#endif
#ifdef BUG_NONSTRICT
                    off = (n <= r -> 0 : -1)
#else
                    off = (n < r -> 0 : -1) /* strict (trap 2); the wrap is never undone (trap 3) */
#endif
                fi
            fi
        :: else ->
#ifdef BUG_NONSTRICT
            off = (w + n <= r -> w : -1)
#else
            off = (w + n < r -> w : -1)
#endif
        fi;
        if
        :: off < 0 ->        /* full: sleep until the consumer moves read (its doorbell) */
            (rd != seen_read);
            goto grant
        :: else
        fi;
        /* the frame bytes (memcpy): only units nobody else owns */
        d_step {
            i = 0;
            do
            :: i < n ->
                assert(own[off + i] == FREE);
                own[off + i] = WRITING;
                data[off + i] = (i == 0 -> n : seq);
                i++
            :: else -> break
            od;
            skip
        }
        /* c_commit(n) */
        w = wr;              /* own index */
        assert(w == off);
        assert(n <= CAP - w);                   /* else LinkCorrupted */
        d_step {
            wr = w + n;      /* Release */
            committed++;
            i = 0;
            do
            :: i < n -> own[w + i] = COMMITTED; i++
            :: else -> break
            od;
            skip
        }
        seq++
    od;
    pdone = true
#ifdef KILL
    } unless { pdead }
#else
    }
#endif
}

#ifdef KILL
/* The producer (a guest) is killed before any of its steps: then the consumer (the host's
 * recovery, drain_into_backlog) takes what is left; with nothing readable on a look after the
 * death, it stops. Every frame committed before the death must be delivered, once, and nothing
 * else -- no stale frame of the previous lap (a kill between the wrap's two stores leaves write at
 * the watermark: docs/deviations.md ring 1), no frame granted but not committed. */
active proctype killer() {
    if
    :: pdead = true
    :: skip
    fi
}
#endif

active proctype consumer() {
    byte r, w, wm_, start, total, nr, i, expect = 1;
    short n;
    byte run_end = 0;        /* Ring.run_end */
    bool seen_dead = false;

    do
    :: expect > NFRAMES -> break
    :: else ->
readable:   /* c_readable */
#ifdef KILL
        seen_dead = pdead;   /* the death as known before this look (Link._check_waiting looks once more) */
#endif
        r = rd;              /* idx(READ, Relaxed): own index */
        n = run_end - r;
        if
        :: n >= HDR && (data[r] <= n) ->        /* the cached run holds the next frame whole */
            assert(own[r] == COMMITTED);
            start = r
        :: else ->
            /* c_readable_fresh(r) */
#ifdef BUG_WM_FIRST
            wm_ = wm;
            w = wr;
#else
            w = wr;          /* write first, then watermark (trap 1) */
            wm_ = wm;
#endif
            if
            :: wm_ != 0 ->
                if
                :: r < wm_ -> start = r; n = wm_ - r     /* the tail first (trap 2) */
                :: else ->
#ifdef BUG_NO_MIDWRAP
                    if
                    :: false -> skip
#else
                    if
                    :: wr >= wm_ -> start = r; n = 0     /* mid-wrap: nothing yet, reset nothing */
#endif
                    :: else ->
                        rd = 0;
                        wm = 0;
                        w = wr;
                        start = 0; n = w
                    fi
                fi
            :: else ->
                assert(r <= w);                  /* else LinkCorrupted */
                start = r; n = w - r
            fi;
            run_end = start + n
        fi;
        if
#if defined(KILL) && defined(BUG_NO_LAST_LOOK)
        :: n == 0 && pdead -> break          /* gives up on a look from before the death */
        :: n == 0 && !pdead ->
            (wr != w || wm != wm_ || pdead);
            goto readable
#elif defined(KILL)
        :: n == 0 && seen_dead -> break      /* a look after the death found nothing: all taken */
        :: n == 0 && !seen_dead ->
            (wr != w || wm != wm_ || pdead);
            goto readable
#else
        :: n == 0 ->         /* empty: sleep until the producer moves write or the watermark */
            (wr != w || wm != wm_);
            goto readable
#endif
        :: else
        fi;
        /* check_frame, copy the payload out: a complete, committed frame with the next number */
        d_step {
            total = data[start];
            assert(total >= HDR && total <= n);
            i = 0;
            do
            :: i < total ->
                assert(own[start + i] == COMMITTED);
                assert(i == 0 || data[start + i] == expect);
                i++
            :: else -> break
            od;
            skip
        }
        expect++;
        /* c_release(total) */
        r = rd;
        assert(total <= CAP - r);                /* else LinkCorrupted */
        nr = r + total;
        if
        :: nr < run_end ->
            d_step { rd = nr; i = r; do :: i < nr -> own[i] = FREE; i++ :: else -> break od; skip }
        :: else ->
            run_end = 0;
            wm_ = wm;
            if
#ifdef BUG_NO_MIDWRAP
            :: wm_ != 0 && nr >= wm_ ->
#else
            :: wm_ != 0 && nr >= wm_ && wr < wm_ ->      /* not mid-wrap */
#endif
                d_step { rd = 0; i = r; do :: i < nr -> own[i] = FREE; i++ :: else -> break od; skip };
                wm = 0
            :: else ->
                d_step { rd = nr; i = r; do :: i < nr -> own[i] = FREE; i++ :: else -> break od; skip }
            fi
        fi
    od;
#ifdef KILL
    (pdone || pdead);
    d_step {                 /* every committed frame delivered, once; none left behind */
        assert(expect - 1 == committed);
        i = 0;
        do
        :: i < CAP -> assert(own[i] != COMMITTED); i++
        :: else -> break
        od;
        skip
    }
#else
    /* everything delivered once: once the producer is done, nothing is left in the ring */
    pdone;
    d_step {
        i = 0;
        do
        :: i < CAP -> assert(own[i] == FREE); i++
        :: else -> break
        od;
        assert(wm == 0 -> rd == wr : (rd >= wm && wr < rd))
    }
#endif
}
