/* The slot pool of src/shmhub/_native.pyx (class SlotPool): the Treiber-stack pop with its ABA
 * tag, free by CAS (Allocated -> Free, then push), the pool-op journal (FEATURE_POOL_JOURNAL),
 * reclaim() and recover_pool_op(), checked by SPIN over every interleaving.
 *
 * One class, one extent, NSLOTS slots. Two guests (peers 1 and 2, each with its journal) pop and
 * free; guest 1 may be killed before any of its steps (the `unless` below: a kill at every
 * instruction boundary), and then the host recovers it as Host._recover does: recover_pool_op()
 * until it resolves, then reclaim(), while guest 2 keeps popping and freeing. With -DDOUBLE the
 * two guests instead free one reference at the same time (the CAS must let exactly one win).
 *
 * Each statement touching a shared word is one atomic step: the 64-bit words (the free-list
 * head: tag + index; a slot's generation + state; a journal's op word) are single variables or
 * pairs updated in one atomic block, as the C code's 64-bit loads, stores and CASes are.
 *
 * Forbidden outcomes, each an assert:
 *   - a slot held by two (ghost holder[]: set when a pop's CAS takes it, cleared when a free's
 *     CAS gives it back)
 *   - a slot pushed while already on the free list (on the list twice, a cycle)
 *   - at the end (all guests done or dead and recovered): a lost slot: every slot Free, owner 0,
 *     on the list exactly once, every journal clear
 *   - recovery that cannot resolve while the other guest is quiescent
 *   - with -DDOUBLE: both or neither of two frees of one reference winning
 *
 * Injected bugs (each must make SPIN report an error):
 *   BUG_NO_TAG        the head CAS ignores the ABA tag (legacy v2)
 *   BUG_NO_JOURNAL    guests keep no journal (a kill between a pop's CAS and its Allocated store
 *                     loses the slot)
 *   BUG_FREE_STORE    free marks the slot Free with a plain store instead of a CAS (trap 21)
 *   BUG_NO_OTHER      recovery does not look at the other guests' journals before restoring
 *   BUG_POP_ONLY      recovery waits for another guest's journaled pop of the slot but not for
 *                     its journaled free: the bug this model found in _native.pyx (a guest killed
 *                     in a pop retry with a stale record naming a slot that a live guest is
 *                     freeing; recovery pushed the slot and so did the live guest: on the list
 *                     twice). Fixed; kept as the regression check of the model.
 *   BUG_ONE_CHECK     the journals are looked at after the walk only (the model's second find:
 *                     the live guest finishes its push and clears its journal between the two,
 *                     recovery claims a slot that is back on the list). Fixed likewise.
 */

#ifndef NSLOTS
#define NSLOTS 2
#endif
#ifndef ROUNDS1
#define ROUNDS1 2      /* pop + free rounds of guest 1 (the one that may be killed) */
#endif
#ifndef ROUNDS2
#define ROUNDS2 1      /* pop + free rounds of guest 2 */
#endif
#define EMPTY 255      /* SHMHUB_EMPTY_INDEX */
#define FREE 0
#define ALLOC 1
#define OP_NONE 0
#define OP_POP 1
#define OP_FREE 2
#define HOST 0
#define NOBODY 255

byte htag, hidx;                 /* CLS_FREE_HEAD: ABA tag (high word), index (low word) */
byte gen[NSLOTS], st[NSLOTS];    /* META_GENERATION + META_STATE: one u64 */
byte owner[NSLOTS];              /* META_OWNER */
byte nxt[NSLOTS];                /* META_NEXT_FREE */
byte jop[3], jidx[3];            /* PEER_POOL_OP (op << 56 | class << 32 | slot), by peer */
byte jgen[3];                    /* PEER_POOL_OP_GEN */
byte holder[NSLOTS];             /* ghost */
bool started, dead1, done1, done2, recovered;
#ifdef DOUBLE
byte shared_ref = EMPTY, shared_gen;
byte wins;
bool freed2;
#endif

#ifdef BUG_NO_TAG
#define HEAD_IS(t, i) (hidx == i)
#else
#define HEAD_IS(t, i) (htag == t && hidx == i)
#endif
#ifdef BUG_NO_JOURNAL
#define JOURNALED(p) false
#else
#define JOURNALED(p) (p != HOST)
#endif

/* ghost: assert slot s is not reachable from index i (walk at most NSLOTS links) */
inline not_listed(s, i) {
    k = 0; x = i;
    do
    :: x != EMPTY && k <= NSLOTS -> assert(x != s); x = nxt[x]; k++
    :: else -> break
    od;
    assert(x == EMPTY)
}

/* the other guest's journal names slot s (a pop or a free in progress): resolved = false */
inline other_busy(s) {
#ifndef BUG_NO_OTHER
    atomic { op = jop[2]; other = jidx[2] };
    if
#ifdef BUG_POP_ONLY
    :: op == OP_POP && other == s -> resolved = false
#else
    :: (op == OP_POP || op == OP_FREE) && other == s -> resolved = false
#endif
    :: else
    fi
#else
    skip
#endif
}

/* SlotPool.pop(c, owner): got = slot index or EMPTY, g = its new generation */
inline pop(me, got, g) {
    atomic { ht = htag; hi = hidx };                 /* load head (Acquire) */
    do
    :: hi == EMPTY ->
        if :: JOURNALED(me) -> atomic { jop[me] = OP_NONE; jidx[me] = 0 } :: else fi;
        got = EMPTY;
        break
    :: else ->
        m = hi;
        if
        :: JOURNALED(me) ->                          /* journal_set(POP, idx, generation) */
            g = gen[m];
            jgen[me] = g;
            atomic { jop[me] = OP_POP; jidx[me] = m }
        :: else
        fi;
        nx = nxt[m];                                 /* next_free (Acquire) */
        atomic {                                     /* CAS head (tag, idx) -> (tag + 1, next) */
            if
            :: HEAD_IS(ht, hi) ->
                assert(holder[m] == NOBODY);         /* nobody else holds it */
                holder[m] = me;
                htag = ht + 1; hidx = nx; ok = true
            :: else -> ht = htag; hi = hidx; ok = false
            fi
        };
        if :: ok -> got = m; break :: else fi
    od;
    if
    :: got != EMPTY ->
        g = gen[got] + 1;                            /* generation (Relaxed) */
        owner[got] = me;                             /* owner (Relaxed) */
        atomic { gen[got] = g; st[got] = ALLOC };    /* meta_word(gen, Allocated) (Release) */
        if :: JOURNALED(me) -> atomic { jop[me] = OP_NONE; jidx[me] = 0 } :: else fi
    :: else
    fi
}

/* SlotPool.push_chain(c, s, meta(s)) for one slot */
inline push(s) {
    atomic { ht = htag; hi = hidx };
    do
    :: nxt[s] = hi;                                  /* next_free = head.idx (Release) */
        atomic {                                     /* CAS head -> (tag + 1, s) */
            if
            :: HEAD_IS(ht, hi) ->
                not_listed(s, hi);                   /* never on the list twice */
                htag = ht + 1; hidx = s; ok = true
            :: else -> ht = htag; hi = hidx; ok = false
            fi
        };
        if :: ok -> break :: else fi
    od
}

/* SlotPool.c_free(c, 0, s, g, strict=False, by): won = this call freed it */
inline free(by, s, g, won) {
    won = false;
    atomic { wg = gen[s]; ws = st[s] };              /* load meta word (Acquire) */
    if
    :: wg == g && ws == ALLOC ->
        if
        :: JOURNALED(by) ->                          /* journal_set(FREE, s, g) */
            jgen[by] = g;
            atomic { jop[by] = OP_FREE; jidx[by] = s }
        :: else
        fi;
#ifdef BUG_FREE_STORE
        atomic { st[s] = FREE; won = true; holder[s] = NOBODY };
#else
        atomic {                                     /* CAS (g, Allocated) -> (g, Free) */
            if
            :: gen[s] == g && st[s] == ALLOC -> st[s] = FREE; won = true; holder[s] = NOBODY
            :: else
            fi
        };
#endif
        if
        :: won ->
            owner[s] = 0;                            /* owner = 0 (Relaxed) */
            push(s)
        :: else
        fi;
        if :: JOURNALED(by) -> atomic { jop[by] = OP_NONE; jidx[by] = 0 } :: else fi
    :: else
    fi
}

proctype guest(byte me; byte rounds) {
    byte ht, hi, m, nx, got, g, wg, ws, k, x, r;
    bool ok, won;
    {
#ifdef DOUBLE
        if
        :: me == 1 ->
            pop(me, got, g);
            assert(got != EMPTY);
            shared_gen = g;
            shared_ref = got                         /* handed to guest 2 (a frame in a ring) */
        :: else ->
            (shared_ref != EMPTY);
            got = shared_ref; g = shared_gen
        fi;
        free(me, got, g, won);                       /* both free the same reference */
        if :: won -> wins++ :: else fi;
#else
        r = 0;
        do
        :: r == rounds -> break
        :: else ->
            pop(me, got, g);
            if
            :: got != EMPTY ->
                assert(holder[got] == me && owner[got] == me && st[got] == ALLOC);
                free(me, got, g, won);
                assert(won)
            :: else
            fi;
            r++
        od;
#endif
        if :: me == 1 -> done1 = true :: else -> done2 = true fi
    } unless { me == 1 && dead1 }
}

/* the host, once guest 1 is dead: Host._recover's pool steps */
active proctype host() {
    byte ht, hi, m, nx, g, wg, ws, k, x, s, o, op, jg, jgi, h1t, h1i, idx, steps, other;
    bool ok, won, found, resolved, quiet;

    (dead1 || done1);
    if
    :: dead1 ->
        /* recover_pool_op(1), called again while it does not resolve */
        do
        :: true ->
            quiet = done2;                           /* guest 2 quiescent for the whole call */
            resolved = true;
            atomic { op = jop[1]; jgi = jidx[1] };   /* the journal word (Acquire) */
            jg = jgen[1];
            if
            :: op == OP_POP || op == OP_FREE ->
                atomic { wg = gen[jgi]; ws = st[jgi] };
                if
                :: op == OP_FREE && wg == jg && ws == ALLOC ->
                    free(HOST, jgi, jg, won)          /* died before marking it Free */
                :: wg == jg && ws == FREE ->
                    /* a live guest mid-pop or mid-free of the slot: before the walk... */
#ifndef BUG_ONE_CHECK
                    other_busy(jgi);
#endif
                    /* listed(): a walk is a snapshot if the head is unchanged around it */
                    atomic { h1t = htag; h1i = hidx };
                    idx = h1i; found = false; steps = 0;
                    do
                    :: idx != EMPTY && idx < NSLOTS && steps <= NSLOTS ->
                        if
                        :: idx == jgi -> found = true; break
                        :: else -> idx = nxt[idx]; steps++
                        fi
                    :: else -> break
                    od;
                    if
                    :: htag == h1t && hidx == h1i ->
                        assert(found || idx == EMPTY);          /* else SegmentCorrupted */
                        if
                        :: !found && resolved ->
                            /* off the list: ours, unless a live guest is mid-pop or mid-free
                             * of it (...and after the walk) */
                            other_busy(jgi);
                            if
                            :: resolved ->
                                atomic {             /* CAS (jg, Free) -> (jg + 1, Allocated) */
                                    if
                                    :: gen[jgi] == jg && st[jgi] == FREE ->
                                        assert(holder[jgi] == NOBODY || holder[jgi] == 1);
                                        holder[jgi] = HOST;
                                        gen[jgi] = jg + 1; st[jgi] = ALLOC; ok = true
                                    :: else -> ok = false
                                    fi
                                };
                                if
                                :: ok ->
                                    owner[jgi] = 0;
                                    free(HOST, jgi, jg + 1, won);
                                    assert(won)
                                :: else -> resolved = false
                                fi
                            :: else
                            fi
                        :: else
                        fi
                    :: else -> resolved = false          /* the list moved: look again */
                    fi
                :: else
                fi
            :: else
            fi;
            if
            :: resolved -> atomic { jop[1] = OP_NONE; jidx[1] = 0 }; break
            :: else -> assert(!quiet)                    /* only a live guest can hold it up */
            fi
        od;
        /* reclaim(1): free every slot still Allocated to guest 1 */
        s = 0;
        do
        :: s < NSLOTS ->
            atomic { wg = gen[s]; ws = st[s] };
            if
            :: ws == ALLOC ->
                o = owner[s];
                if
                :: o == 1 -> free(HOST, s, wg, won)
                :: else
                fi
            :: else
            fi;
            s++
        :: else -> break
        od
    :: else
    fi;
    recovered = true
}

active proctype killer() {
    started;
#ifndef DOUBLE
    if
    :: dead1 = true
    :: skip
    fi
#endif
}

init {
    byte i, n, x;
    d_step {
        htag = 0; hidx = 0;
        i = 0;
        do
        :: i < NSLOTS ->
            nxt[i] = (i + 1 < NSLOTS -> i + 1 : EMPTY);
            holder[i] = NOBODY;
            i++
        :: else -> break
        od
    };
    atomic {
        run guest(1, ROUNDS1);
        run guest(2, ROUNDS2);
        started = true
    };
    (recovered && done2);                            /* guest 1 done or dead and recovered */
    d_step {
        /* no slot lost: all Free, owner 0, nobody holds one, each on the list exactly once */
        i = 0;
        do
        :: i < NSLOTS ->
            assert(st[i] == FREE && owner[i] == 0 && holder[i] == NOBODY);
            i++
        :: else -> break
        od;
        n = 0; x = hidx;
        do
        :: x != EMPTY && n <= NSLOTS -> x = nxt[x]; n++
        :: else -> break
        od;
        assert(x == EMPTY && n == NSLOTS);
        assert(jop[1] == OP_NONE && recovered);
        assert(jop[2] == OP_NONE);
#ifdef DOUBLE
        assert(wins == 1);
#endif
        skip
    }
}
