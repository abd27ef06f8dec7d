"""Guest program of the scale tests (tests/scale): `scale_guest.py MODE IDX PARAMS_JSON`.

Modes
- worker: say hello, then serve commands from the host, blocked in link.recv() in between:
  {"op": "burst", "count", "seed", "lo", "hi"} sends `count` data messages, then writes one byte to
  the pipe fd `params["ready_fd"]` (the host learns the burst is complete without reading the ring);
  {"op": "ping"} answers a pong.
- stream: send `count` data messages of seeded sizes in [lo, hi], then a done message (with
  params["go"], only after a "go" command).
- roundtrip: after a "go" command, `count` round trips: a data message, then the host's reply (the
  same seq, a seeded size in [lo, hi]), checked; then a done message.
- victim: forever: a mark (inline) then a data message of the same seq (slot tier); the host holds
  the data messages, so this guest ends up blocked in send, where the test kills it.
- hoard-hold: say hello, receive every message and keep it (never released) until a STOP.
- hoard-stall: say hello, never read; leave when stdin reaches EOF.

Every guest leaves when the host goes away (HostGone); after its work it waits for that. Exit codes:
0 done, 3 the host went away mid-work, 4 a blocking call timed out, 5 a check failed."""

import json
import os
import select
import sys

import shmhub
from scale_proto import CMD, DATA, DONE, HELLO, MARK, PONG, STOP, check, header, make, parse_command, sizes

mode, idx, params = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
timeout = params.get("timeout", 60.0)
link = shmhub.connect()


def fail(code: int, why: str) -> None:
    sys.stderr.write(f"scale_guest {mode} {idx}: {why}\n")
    link.close()
    sys.exit(code)


def wait_for_goodbye() -> None:
    """Work done: stay attached until the host says goodbye."""
    try:
        while True:
            with link.recv(timeout=timeout + 60):
                pass
    except shmhub.HostGone:
        pass
    except shmhub.ShmTimeout:
        fail(4, "no goodbye from the host")


def wait_command(op: str) -> dict:
    with link.recv(timeout=timeout) as msg:
        kind = header(msg)[0]
        cmd = parse_command(msg) if kind == CMD else None
    if cmd is None or cmd.get("op") != op:
        fail(5, f"expected command {op!r}, got kind {kind} {cmd}")
    return cmd


try:
    if mode == "worker":
        link.send(make(HELLO, idx, 0))
        while True:
            try:
                msg = link.recv()  # no timeout: the idle test wants every guest blocked right here
            except shmhub.HostGone:
                break
            with msg:
                cmd = parse_command(msg)
            if cmd["op"] == "burst":
                for seq, n in enumerate(sizes(cmd["seed"], idx, cmd["count"], cmd["lo"], cmd["hi"])):
                    link.send(make(DATA, idx, seq, n), timeout=timeout)
                os.write(params["ready_fd"], b"x")
            elif cmd["op"] == "ping":
                link.send(make(PONG, idx, cmd.get("seq", 0)))
            else:
                fail(5, f"unknown command {cmd}")
    elif mode == "stream":
        count = params["count"]
        if params.get("go"):
            wait_command("go")
        for seq, n in enumerate(sizes(params["seed"], idx, count, params["lo"], params["hi"])):
            link.send(make(DATA, idx, seq, n), timeout=timeout)
        link.send(make(DONE, idx, count))
        wait_for_goodbye()
    elif mode == "roundtrip":
        count = params["count"]
        wait_command("go")
        req = sizes(params["seed"], idx, count, params["lo"], params["hi"])
        rep = sizes(params["seed"] + 1, idx, count, params["lo"], params["hi"])
        for seq in range(count):
            link.send(make(DATA, idx, seq, req[seq]), timeout=timeout)
            with link.recv(timeout=timeout) as msg:
                err = check(msg, DATA, idx, seq, rep[seq])
            if err:
                fail(5, err)
        link.send(make(DONE, idx, count))
        wait_for_goodbye()
    elif mode == "victim":
        seq = 0
        while True:
            link.send(make(MARK, idx, seq))
            link.send(make(DATA, idx, seq, params["size"]))  # blocks once the host holds every slot it can get
            seq += 1
    elif mode == "hoard-hold":
        link.send(make(HELLO, idx, 0))
        held = []
        while True:
            msg = link.recv(timeout=timeout)
            if len(msg) == len(STOP):
                break
            held.append(msg)  # never released until the STOP
        for m in held:
            m.release()
        link.send(make(DONE, idx, len(held)))
        wait_for_goodbye()
    elif mode == "hoard-stall":
        link.send(make(HELLO, idx, 0))
        r, _, _ = select.select([sys.stdin.buffer], [], [], timeout + 60)
        if not r:
            fail(4, "stdin never reached EOF")
        sys.stdin.buffer.read()
    else:
        fail(5, f"unknown mode {mode!r}")
except shmhub.HostGone as e:
    fail(3, f"host went away mid-work: {e}")
except shmhub.ShmTimeout as e:
    fail(4, f"timed out: {e}")
link.close()
