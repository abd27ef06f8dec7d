"""Many guests, one host (issue 12): fan-in, fan-out and request/response with G guests, the time
to spawn 255 guests, and the multiprocessing baselines, all in the `make bench` invocation.

Each (scenario, G) runs a fixed phase of `seconds`; the senders start and stop at shared
CLOCK_MONOTONIC moments and the rate is what the receivers verified divided by the time from the
start until every guest's report was in (the backlog drained after the deadline included).
shmhub runs one host per G and its three phases in turn on the same guests (spawning 255 Python
processes is the slow part); the baselines fork their children per G. No process is pinned: all
share every core.

    python -m benchmarks --only fanin fanout reqresp spawn [--guests 2 8 64 255] [--quick]
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.forkserver
import os
import statistics
import sys
import time

from .scale_guest import CMD, DATA, END, HELLO, REPORT, SLOT, INLINE, Payloads, body, check, command_loop, fanin_guest, kind_of, message, size_table
from .scale_guest import main as guest_main

GUEST_COUNTS = (2, 8, 64, 255)
SEED = 12
TIMEOUT = 120.0  # any single blocking step of a phase (the drain at 255 guests on a slow build included)
COLD_REPS = 5
SCENARIOS = ("fanin", "fanout", "reqresp")
BASELINE = {"fanin": "multiprocessing.Queue", "fanout": "multiprocessing.Pipe", "reqresp": "multiprocessing.Pipe"}

# The guest a new user writes first: connect, say hello, wait for the host to go.
MINIMAL_GUEST = "import shmhub\nl = shmhub.connect()\nl.send(b'hello')\ntry:\n    l.recv()\nexcept shmhub.HostGone:\n    pass\nl.close()\n"


def scale_config():
    """The segment as a user would size it for 255 guests: 64 KiB rings (255 x 2 of them: 33 MB),
    1024 slots in each of four classes up to 16 KiB payloads (31 MB)."""
    import shmhub

    return shmhub.SegmentConfig(max_guests=255, bipbuf_capacity=64 << 10, size_classes=((1088, 1024), (4160, 1024), (8256, 1024), (16448, 1024)))


def describe() -> dict:
    cfg = scale_config()
    return {"max_guests": cfg.max_guests, "bipbuf_capacity": cfg.bipbuf_capacity, "size_classes": cfg.size_classes, "inline_sizes": INLINE, "slot_sizes": SLOT}


@contextlib.contextmanager
def unpinned():
    """Every core for this process and the guests it starts (the two-process benchmarks pin it)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    try:
        yield len(os.sched_getaffinity(0))
    finally:
        os.sched_setaffinity(0, before)


def summary(counts: list, nbytes: int, dt: float, errors: int) -> dict:
    total = sum(counts)
    fair = total / len(counts) if counts else 0
    shares = [c / fair for c in counts] if fair else [0.0] * len(counts)
    return {
        "guests": len(counts),
        "seconds": dt,
        "msgs": total,
        "msgs_per_s": total / dt,
        "bytes_per_s": nbytes / dt,
        "errors": errors,
        "share_min": min(shares),
        "share_max": max(shares),
        "counts": counts,
    }


def weighted_percentiles(reports: list, qs=(0.5, 0.99)) -> list:
    """Percentiles of all round trips from each guest's reservoir sample, weighted by its rounds."""
    pts = []
    for r in reports:
        lat = r.get("lat_ns") or []
        if lat:
            w = r["rounds"] / len(lat)
            pts += [(v, w) for v in lat]
    if not pts:
        return [float("nan")] * len(qs)
    pts.sort()
    total = sum(w for _, w in pts)
    out, acc, j = [], 0.0, 0
    for q in qs:
        while j < len(pts) - 1 and acc + pts[j][1] < q * total:
            acc += pts[j][1]
            j += 1
        out.append(pts[j][0] / 1e3)
    return out


def rr_summary(rounds: list, reports: list, dt: float, errors: int) -> dict:
    out = summary(rounds, 0, dt, errors)
    out.pop("bytes_per_s")
    out["rounds_per_s"] = out.pop("msgs_per_s")
    out["p50_us"], out["p99_us"] = weighted_percentiles(reports)
    return out


# -- shmhub --------------------------------------------------------------------------------------


def _cmd(op: str, **kw) -> bytes:
    return message(CMD, 0, {"op": op, **kw})


def start_time(g: int) -> float:
    """When the senders of a phase start: after every guest has had time to get its command."""
    return time.monotonic() + 0.1 + 0.002 * g


def _sh_fanin(host, handles, idx, secs):
    g = len(handles)
    sizes = [size_table(SEED, i, "up") for i in range(g)]
    t0 = start_time(g)
    for h in handles:
        h.link.send(_cmd("fanin", start=t0, until=t0 + secs), TIMEOUT)
    recv_any = host.recv_any

    def get():
        h, m = recv_any(TIMEOUT)
        return idx[h.peer_id], m

    return _collect(get, g, sizes, t0)


def _collect(get, g: int, sizes: list, t0: float) -> dict:
    """Fan-in's receiving side for any transport: get() -> (guest index, message) until every
    guest's report is in; each message checked in order per guest."""
    counts, reports, errors, nbytes = [0] * g, {}, 0, 0
    while len(reports) < g:
        i, m = get()
        with memoryview(m) as mv:
            if check(mv, i, counts[i], sizes[i]):
                counts[i] += 1
                nbytes += len(mv)
            elif kind_of(mv) == REPORT:
                reports[i] = body(mv)
            else:
                errors += 1
                counts[i] += 1
        if hasattr(m, "release"):
            m.release()
    dt = time.monotonic() - t0
    errors += sum(abs(reports[i]["sent"] - counts[i]) for i in range(g))
    return summary(counts, nbytes, dt, errors)


def _sh_fanout(host, handles, idx, secs):
    g = len(handles)
    payloads = [Payloads(size_table(SEED, i, "down")) for i in range(g)]
    for h in handles:
        h.link.send(_cmd("fanout"), TIMEOUT)
    sends = [h.link.send for h in handles]
    seqs, nbytes = [0] * g, 0
    clock = time.monotonic
    t0 = clock()
    until = t0 + secs
    while clock() < until:
        for i in range(g):
            v = payloads[i].get(DATA, i, seqs[i])
            sends[i](v, TIMEOUT)
            nbytes += len(v)
            seqs[i] += 1
    for h in handles:
        h.link.send(message(END, 0), TIMEOUT)
    reports = {}
    while len(reports) < g:
        h, m = host.recv_any(TIMEOUT)
        with m:
            if kind_of(m) != REPORT:
                raise RuntimeError(f"fan-out: guest {idx[h.peer_id]} sent kind {kind_of(m)}")
            reports[idx[h.peer_id]] = body(m)
    dt = clock() - t0
    errors = sum(r["errors"] for r in reports.values()) + sum(abs(reports[i]["seen"] - seqs[i]) for i in range(g))
    return summary([reports[i]["seen"] for i in range(g)], nbytes, dt, errors)


def _sh_reqresp(host, handles, idx, secs):
    g = len(handles)
    t0 = start_time(g)
    for h in handles:
        h.link.send(_cmd("reqresp", start=t0, until=t0 + secs), TIMEOUT)
    rounds, reports = [0] * g, {}
    recv_any = host.recv_any
    while len(reports) < g:
        h, m = recv_any(TIMEOUT)
        i = idx[h.peer_id]
        with m:
            if kind_of(m) == DATA:
                h.link.send(m, TIMEOUT)  # the guest checks the echo
                rounds[i] += 1
                continue
            reports[i] = body(m)
    dt = time.monotonic() - t0
    reps = [reports[i] for i in range(g)]
    errors = sum(r["errors"] for r in reps) + sum(abs(reports[i]["rounds"] - rounds[i]) for i in range(g))
    return rr_summary(rounds, reps, dt, errors)


SHMHUB_PHASES = {"fanin": _sh_fanin, "fanout": _sh_fanout, "reqresp": _sh_reqresp}


def run_shmhub(g: int, scenarios, secs: float) -> dict:
    """One host, g guests of benchmarks.scale_guest, the selected phases in turn."""
    import shmhub

    out = {}
    t0 = time.monotonic()
    with shmhub.Host(scale_config()) as host:
        # Forkserver children, as the multiprocessing baselines' guests are forked children: they
        # share the interpreter's memory, so waking one of hundreds costs fewer cache misses
        # (fan-out at 255: 44 k msg/s against 20 k with guests spawned as fresh interpreters).
        ctx = mp.get_context("forkserver")
        # A forkserver that an earlier scenario started (the executor's) has its own preload and
        # affinity: start a fresh one (a private but long-standing call), so that every G runs alike.
        mp.forkserver._forkserver._stop()  # type: ignore[attr-defined]
        ctx.set_forkserver_preload(["benchmarks.scale_guest", "shmhub"])
        cpus = sorted(os.sched_getaffinity(0))
        handles = [host.start_process(guest_main, (i, SEED, cpus), context=ctx) for i in range(g)]
        idx = {h.peer_id: i for i, h in enumerate(handles)}
        seen = set()
        while len(seen) < g:
            h, m = host.recv_any(TIMEOUT)
            with m:
                if kind_of(m) != HELLO:
                    raise RuntimeError(f"guest {idx[h.peer_id]} sent kind {kind_of(m)} instead of hello")
            seen.add(h.peer_id)
        out["spawn_s"] = time.monotonic() - t0
        failed = None
        for sc in scenarios:
            if failed:
                out[sc] = {"error": f"skipped: {failed}"}
                continue
            try:
                out[sc] = SHMHUB_PHASES[sc](host, handles, idx, secs)
                out[sc]["link_stats"] = _stats(handles)
            except Exception as e:  # reported in the table; the host's guests may be stuck: skip the rest
                failed = f"{sc} failed: {type(e).__name__}: {e}"
                out[sc] = {"error": f"{type(e).__name__}: {e}"}
        t1 = time.monotonic()
    out["close_s"] = time.monotonic() - t1
    return out


def _stats(handles) -> dict:
    """The host side's link counters, summed over the guests (waits, doorbells)."""
    total = {}
    for h in handles:
        for k, v in h.link.stats.as_dict().items():
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
    return total


def run_spawn(g: int = 255, reps: int = COLD_REPS) -> dict:
    """Time until g minimal guests (MINIMAL_GUEST) have all connected and said hello, against g x one
    guest's cold start (spawn to hello, one at a time, the median of `reps`) / cores."""
    import shmhub

    argv = [sys.executable, "-c", MINIMAL_GUEST]
    cold = []
    with shmhub.Host(scale_config()) as host:
        for _ in range(reps):
            t0 = time.monotonic()
            h = host.spawn(argv)
            _, m = host.recv_any(TIMEOUT)
            cold.append(time.monotonic() - t0)
            m.release()
            h.link.send(b"bye")
            h.wait(TIMEOUT)
    with shmhub.Host(scale_config()) as host:
        t0 = time.monotonic()
        for _ in range(g):
            host.spawn(argv)
        spawned = time.monotonic() - t0
        for _ in range(g):
            _, m = host.recv_any(TIMEOUT)
            m.release()
        all_in = time.monotonic() - t0
        t1 = time.monotonic()
    close = time.monotonic() - t1
    cores = len(os.sched_getaffinity(0))
    cold_s = statistics.median(cold)
    ideal = g * cold_s / cores
    return {
        "guests": g,
        "cores": cores,
        "all_connected_s": all_in,
        "spawn_calls_s": spawned,
        "cold_start_s": cold_s,
        "cold_starts_s": cold,
        "ideal_s": ideal,
        "ratio": all_in / ideal,
        "close_s": close,
    }


# -- multiprocessing baselines (forked children, the same guest loops) ----------------------------


def _mp_fanin_child(q, idx, go, times):
    q.put(message(HELLO, idx))
    if not go.wait(TIMEOUT):
        return
    out = fanin_guest(lambda v: q.put(bytes(v), timeout=TIMEOUT), idx, SEED, times[0], times[1])
    q.put(message(REPORT, idx, out))


def mp_fanin(g: int, secs: float) -> dict:
    """G producers share one multiprocessing.Queue (bounded, so producers feel backpressure)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue(maxsize=4096)
    go, times = ctx.Event(), ctx.Array("d", 2, lock=False)  # start, until
    procs = [ctx.Process(target=_mp_fanin_child, args=(q, i, go, times), daemon=True) for i in range(g)]
    try:
        for p in procs:
            p.start()
        for _ in range(g):
            if kind_of(q.get(timeout=TIMEOUT)) != HELLO:
                raise RuntimeError("expected hellos")
        sizes = [size_table(SEED, i, "up") for i in range(g)]
        t0 = start_time(g)
        times[0], times[1] = t0, t0 + secs
        go.set()
        get = q.get

        def take():
            m = get(timeout=TIMEOUT)
            return m[2] | (m[3] << 8), m

        return _collect(take, g, sizes, t0)
    finally:
        go.set()
        _join(procs)
        q.close()
        q.join_thread()


def _mp_pipe_child(conns, mine):
    conn = conns[mine]
    for j, c in enumerate(conns):  # the other children's ends, inherited through fork
        if j != mine:
            c.close()
    try:
        command_loop(conn.send_bytes, conn.recv_bytes, mine, SEED)
    except (EOFError, OSError):
        pass


def mp_pipes(g: int, scenarios, secs: float) -> dict:
    """G children, one duplex multiprocessing.Pipe each: fan-out and request/response."""
    ctx = mp.get_context("fork")
    pairs = [ctx.Pipe(duplex=True) for _ in range(g)]
    mine = [a for a, _ in pairs]
    theirs = [b for _, b in pairs]
    procs = [ctx.Process(target=_mp_pipe_child, args=(theirs, i), daemon=True) for i in range(g)]
    out = {}
    try:
        for p in procs:
            p.start()
        for c in theirs:
            c.close()
        for c in mine:
            if not c.poll(TIMEOUT) or kind_of(c.recv_bytes()) != HELLO:
                raise RuntimeError("expected hellos")
        for sc in scenarios:
            try:
                out[sc] = (_mp_fanout if sc == "fanout" else _mp_reqresp)(mine, secs)
            except Exception as e:
                out[sc] = {"error": f"{type(e).__name__}: {e}"}
                break
        for c in mine:
            c.send_bytes(_cmd("exit"))
    finally:
        _join(procs)
        for c in mine:
            c.close()
    return out


def _mp_fanout(conns, secs):
    g = len(conns)
    payloads = [Payloads(size_table(SEED, i, "down")) for i in range(g)]
    for c in conns:
        c.send_bytes(_cmd("fanout"))
    sends = [c.send_bytes for c in conns]
    seqs, nbytes = [0] * g, 0
    clock = time.monotonic
    t0 = clock()
    until = t0 + secs
    while clock() < until:
        for i in range(g):
            v = payloads[i].get(DATA, i, seqs[i])
            sends[i](v)
            nbytes += len(v)
            seqs[i] += 1
    for c in conns:
        c.send_bytes(message(END, 0))
    reports = []
    for c in conns:
        if not c.poll(TIMEOUT):
            raise RuntimeError("no fan-out report")
        reports.append(body(c.recv_bytes()))
    dt = clock() - t0
    errors = sum(r["errors"] for r in reports) + sum(abs(r["seen"] - s) for r, s in zip(reports, seqs))
    return summary([r["seen"] for r in reports], nbytes, dt, errors)


def _mp_reqresp(conns, secs):
    g = len(conns)
    t0 = start_time(g)
    for c in conns:
        c.send_bytes(_cmd("reqresp", start=t0, until=t0 + secs))
    index = {c: i for i, c in enumerate(conns)}
    rounds, reports = [0] * g, {}
    active = list(conns)
    wait = multiprocessing.connection.wait
    while active:
        ready = wait(active, TIMEOUT)
        if not ready:
            raise RuntimeError("request/response: no request within the timeout")
        for c in ready:
            data = c.recv_bytes()
            i = index[c]
            if kind_of(data) == DATA:
                c.send_bytes(data)
                rounds[i] += 1
            else:
                reports[i] = body(data)
                active.remove(c)
    dt = time.monotonic() - t0
    reps = [reports[i] for i in range(g)]
    errors = sum(r["errors"] for r in reps) + sum(abs(reports[i]["rounds"] - rounds[i]) for i in range(g))
    return rr_summary(rounds, reps, dt, errors)


def _join(procs) -> None:
    deadline = time.monotonic() + 30
    for p in procs:
        if p.pid is None:
            continue
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


# -- the runner ----------------------------------------------------------------------------------


def run(selected, guest_counts, secs: float, log=print) -> dict:
    """Every selected scenario at every G, shmhub and baseline side by side."""
    scen = [s for s in SCENARIOS if s in selected]
    res = {"guest_counts": list(guest_counts), "seconds": secs, "config": describe()}
    for s in scen:
        res[s] = {"shmhub": {}, BASELINE[s]: {}}
    res["shmhub_host"] = {}
    with unpinned() as cores:
        res["cores"] = cores
        for g in guest_counts:
            if scen:
                try:
                    r = run_shmhub(g, scen, secs)
                except Exception as e:
                    r = {s: {"error": f"{type(e).__name__}: {e}"} for s in scen}
                res["shmhub_host"][str(g)] = {k: r.get(k) for k in ("spawn_s", "close_s")}
                for s in scen:
                    res[s]["shmhub"][str(g)] = r[s]
                    log(f"  {s} G={g}: shmhub {short(r[s])}")
                log(f"  G={g}: shmhub spawn+connect {r.get('spawn_s', float('nan')):.2f} s, close {r.get('close_s', float('nan')):.2f} s")
            if "fanin" in scen:
                try:
                    b = mp_fanin(g, secs)
                except Exception as e:
                    b = {"error": f"{type(e).__name__}: {e}"}
                res["fanin"][BASELINE["fanin"]][str(g)] = b
                log(f"  fanin G={g}: {BASELINE['fanin']} {short(b)}")
            piped = [s for s in scen if s in ("fanout", "reqresp")]
            if piped:
                try:
                    b = mp_pipes(g, piped, secs)
                except Exception as e:
                    b = {s: {"error": f"{type(e).__name__}: {e}"} for s in piped}
                for s in piped:
                    res[s][BASELINE[s]][str(g)] = b.get(s, {"error": "not run"})
                    log(f"  {s} G={g}: {BASELINE[s]} {short(res[s][BASELINE[s]][str(g)])}")
        if "spawn" in selected:
            g = max(guest_counts)
            try:
                res["spawn"] = run_spawn(g)
            except Exception as e:
                res["spawn"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  spawn G={g}: {short(res['spawn'])}")
    return res


def short(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    if "rounds_per_s" in r:
        return (
            f"{r['rounds_per_s'] / 1e3:.1f} k round trips/s, p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs, "
            f"shares {r['share_min']:.2f}-{r['share_max']:.2f}, errors {r['errors']}"
        )
    if "msgs_per_s" in r:
        return f"{r['msgs_per_s'] / 1e3:.1f} k msg/s, {r['bytes_per_s'] / 1e6:.0f} MB/s, shares {r['share_min']:.2f}-{r['share_max']:.2f}, errors {r['errors']}"
    if "ratio" in r:
        return (
            f"all connected in {r['all_connected_s']:.2f} s; one cold start {1e3 * r['cold_start_s']:.0f} ms "
            f"x {r['guests']} / {r['cores']} cores = {r['ideal_s']:.2f} s; ratio {r['ratio']:.2f}; close {r['close_s']:.2f} s"
        )
    return str(r)
