/* The slot waiters of FEATURE_POOL_WAITERS (SlotPool.wait_alloc / c_wake in _native.pyx): an
 * eventcount per class on the futex word CLS_WAITERS (bit 0: somebody may sleep; the rest: a
 * sequence a wake advances), checked by SPIN over every interleaving of two waiters, each
 * waiting for one slot, and a freer that frees FREES slots into an exhausted pool.
 *
 * wait_alloc: fetch_or(bit) (the value with the bit is what it will sleep on); fence; try to pop;
 * if none: futex_wait(word, value) (sleeps only if the word still holds it: atomically checked
 * by the kernel); pop again; finally fetch_or(bit) again (others may still sleep: the bit is
 * self-correcting); then pass the baton: a fitting class with a free slot gets c_wake(1).
 * The caller calls again while it gets None (woken but another took the slot).
 * c_wake (after every push): fence; load the word; while the bit is set, CAS it to
 * (word + STEP) & ~bit, and the winner futex_wake(1)s.
 * The free list is an abstract count here (its CAS protocol is pool.pml's).
 *
 * Forbidden outcome: a lost wakeup -- a waiter asleep for good while a slot is free (SPIN's
 * invalid end state: waiters block without a timeout here); and a slot lost or made up.
 *
 * Injected bugs (each must make SPIN report an error):
 *   BUG_NO_RETRY    the waiter sleeps without trying to pop after setting the bit
 *   BUG_NO_REARM    the waiter does not set the bit again when its sleep ends
 *   BUG_NO_BATON    no wake is passed on after the waiter took its slot
 *   BUG_PLAIN_WAIT  the sleep does not compare the word (a plain sleep until woken)
 */

#define BIT 1
#define STEP 2
#define NW 2
#ifndef FREES
#define FREES 2     /* slots the freer frees (the pool starts with none free) */
#endif
/* -DRETURN: each waiter frees its slot again once it has it (then FREES >= 1 suffices) */
#ifdef RETURN
#define LEFT FREES
#else
#define LEFT (FREES - NW)
#endif

byte word;             /* CLS_WAITERS */
byte nfree;            /* slots on the class's free list */
bool asleep[NW];       /* in futex_wait on the word */
byte done;

inline pop(got) {
    atomic { got = nfree > 0; if :: got -> nfree-- :: else fi }
}

/* SlotPool.c_wake(c, 1) */
inline wake() {
    v = word;                                /* fence(SeqCst); load (Relaxed) */
    do
    :: v & BIT ->
        atomic {
            if
            :: word == v -> word = (v + STEP) & ~BIT; won = true
            :: else -> v = word; won = false
            fi
        };
        if
        :: won ->
            atomic {                         /* futex_wake(word, 1) */
                if
                :: asleep[0] -> asleep[0] = false
                :: asleep[1] -> asleep[1] = false
                :: else
                fi
            };
            break
        :: else
        fi
    :: else -> break
    od
}

/* free a slot: push it, then c_wake */
inline free() {
    atomic { nfree++ };
    wake()
}

proctype waiter(byte me) {
    byte val, v;
    bool got, won;
    got = false;
    do
    :: got -> break
    :: else ->
        /* wait_alloc(size, owner, timeout = -1) */
        atomic { val = word | BIT; word = word | BIT };          /* fetch_or */
#ifndef BUG_NO_RETRY
        pop(got);
#endif
        if
        :: !got ->
#ifdef BUG_PLAIN_WAIT
            asleep[me] = true;
#else
            atomic { if :: word == val -> asleep[me] = true :: else fi };   /* futex_wait */
#endif
            !asleep[me];
            pop(got)
        :: else
        fi;
#ifndef BUG_NO_REARM
        atomic { word = word | BIT };                            /* finally: fetch_or */
#endif
#ifndef BUG_NO_BATON
        if
        :: nfree > 0 -> wake()                                   /* pass the baton */
        :: else
        fi
#endif
    od;
#ifdef RETURN
    free();                                                      /* done with the slot */
#endif
    done++
}

active proctype freer() {
    byte v, i;
    bool won;
    do
    :: i < FREES -> free(); i++
    :: else -> break
    od;
    done++
}

init {
    atomic {
        run waiter(0);
        run waiter(1)
    };
    (done == NW + 1);
    assert(nfree == LEFT && !asleep[0] && !asleep[1])
}
