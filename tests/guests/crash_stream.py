"""Guest for the crash tests: two-way full-speed traffic of self-checking payloads.

argv: GUEST_NONCE HOST_NONCE STALL_AFTER COUNT [SPIN_NS]
  GUEST_NONCE  stream id of what this guest sends
  HOST_NONCE   stream id of what the host sends here (every message is verified, in order)
  STALL_AFTER  stop receiving after this many host messages, holding the last ones (-1: never)
  COUNT        -1: stream until killed; N >= 0: send N, receive N, close gracefully, exit 0

Exit codes: 0 done / host gone, 3 a host message was wrong, 4 anything unexpected.
A receiving thread keeps the last two received messages unreleased, so at any instant the guest
owns slots the host sent it (trap 22) besides the slots it is filling itself.
"""

import os
import sys
import threading
import traceback
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import crash_payload as P  # noqa: E402
import shmhub  # noqa: E402
from shmhub.errors import HostGone, LinkClosed, PeerDead  # noqa: E402

HOLD = 2
TIMEOUT = 20.0  # no wait in a guest is unbounded


def die(code: int, what: str) -> None:
    sys.stderr.write(f"crash_stream guest pid {os.getpid()}: {what}\n")
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    g_nonce, h_nonce, stall_after, count = (int(a) for a in sys.argv[1:5])
    spin = int(sys.argv[5]) if len(sys.argv) > 5 else shmhub.link.DEFAULT_SPIN_NS
    link = shmhub.connect(spin_ns=spin)
    verified = [0]
    rx_done = threading.Event()
    acked_stall = threading.Event()

    def receive() -> None:
        held: deque = deque()
        try:
            seq = 0
            while count < 0 or seq < count:
                if seq == stall_after:
                    # stall only once the host has our ack of everything so far: from here on the
                    # host may exhaust the pool with slots sent to us, and our sends may block
                    if not acked_stall.wait(TIMEOUT):
                        die(4, "sender never acknowledged the stall point")
                    threading.Event().wait(TIMEOUT)  # stalled; the test kills us meanwhile
                    die(4, f"stalled receiver was not killed within {TIMEOUT} s")
                try:
                    msg = link.recv(timeout=TIMEOUT)
                except (HostGone, PeerDead, LinkClosed):
                    return
                try:
                    P.check(msg, h_nonce, seq)
                except P.BadMessage as e:
                    die(3, f"bad host message: {e}")
                held.append(msg)
                if len(held) > HOLD:
                    held.popleft().release()
                seq += 1
                verified[0] = seq
            for m in held:
                P.check(m, h_nonce, seq - len(held) + list(held).index(m))  # still intact while held
        except BaseException:
            die(4, "receiver: " + traceback.format_exc())
        finally:
            while held:
                held.popleft().release()
            rx_done.set()

    threading.Thread(target=receive, name="guest-rx", daemon=True).start()
    try:
        seq = 0
        while count < 0 or seq < count:
            try:
                ack = verified[0]
                link.send(P.make(g_nonce, seq, ack), timeout=TIMEOUT)
                if ack == stall_after:
                    acked_stall.set()
            except (HostGone, PeerDead):
                os._exit(0)
            seq += 1
        if not rx_done.wait(TIMEOUT):
            die(4, f"received {verified[0]} of {count} host messages within {TIMEOUT} s")
        if verified[0] != count:
            die(4, f"receiver stopped after {verified[0]} of {count} host messages")
        link.close()  # goodbye
    except BaseException:
        die(4, "sender: " + traceback.format_exc())
    os._exit(0)


if __name__ == "__main__":
    main()
