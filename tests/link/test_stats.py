"""Stats for programs: host.stats() and link.stats.as_dict() as plain dicts, host events as records
of the "shmhub" logger."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time

import shmhub
from linkutil import spawn, wait_event


def test_host_stats_count_traffic_and_events(caplog):
    caplog.set_level(logging.INFO, logger="shmhub")
    with shmhub.Host(shmhub.SegmentConfig(max_guests=2)) as host:
        a = spawn(host, "echo.py")
        b = spawn(host, "echo.py")
        for payload in (b"x" * 10, b"y" * 5000):
            a.link.send(payload, timeout=10)
            with a.link.recv(timeout=10) as msg:
                assert bytes(msg) == payload
        s = host.stats()
        json.dumps(s)  # plain data all the way down
        assert s["events"] == {"spawned": 2}
        assert set(s["guests"]) == {a.peer_id, b.peer_id} and s["guests"][a.peer_id]["pid"] == a.pid
        link = s["guests"][a.peer_id]["link"]
        assert link == a.link.stats.as_dict()
        assert (link["sent_inline"], link["sent_slot"], link["recv_inline"], link["recv_slot"]) == (1, 1, 1, 1)
        assert link["sent_bytes_slot"] == link["recv_bytes_slot"] == 5000
        assert s["guests"][b.peer_id]["link"]["sent_inline"] == 0
        # what shmhub top reads from the segment (FEATURE_RING_COUNTERS) agrees with the host's own counts
        seg = host.segment
        assert seg.h2g(a.peer_id).sent == (2, 5010) and seg.g2h(a.peer_id).sent == (2, 5010)
        assert seg.h2g(a.peer_id).doorbells == link["doorbells_rung"]
        ring_b = seg.h2g(b.peer_id)
        deadline = time.monotonic() + 10
        while not ring_b.waiting[1]:  # b sleeps in recv (its consumer flag is up): a send must ring it
            assert time.monotonic() < deadline, "guest b never waited for a message"
            time.sleep(0.001)
        b.link.send(b"z", timeout=10)
        with b.link.recv(timeout=10) as msg:
            assert bytes(msg) == b"z"
        assert seg.h2g(b.peer_id).doorbells == b.link.stats()["doorbells_rung"] >= 1
        assert s["guests"][a.peer_id]["mmap"] == {
            "g2h": {"mappings": 0, "mapped_bytes": 0, "leases": 0},
            "h2g": {"mappings": 0, "mapped_bytes": 0, "leases": 0},
        }
        assert [(c["slot_size"], c["free"] + c["allocated"]) for c in s["pool"]] == [c[:2] for c in host.segment.config.size_classes]
        assert s["segment_size"] == host.segment.current_size
        b.process.send_signal(signal.SIGKILL)
        wait_event(host, "died", b.peer_id)
        s = host.stats()
        assert s["events"] == {"spawned": 2, "died": 1} and b.peer_id not in s["guests"]
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "shmhub"]
    assert (logging.INFO, f"guest {a.peer_id} (pid {a.pid}) spawned") in records
    died = [r for r in caplog.records if getattr(r, "shmhub_event", None) and r.shmhub_event.kind == "died"]
    assert len(died) == 1 and died[0].levelno == logging.WARNING and died[0].shmhub_event.peer_id == b.peer_id
    assert died[0].getMessage().startswith(f"guest {b.peer_id} (pid {b.pid}) died: ")
    assert any(r.shmhub_event.kind == "exited" and r.levelno == logging.INFO for r in caplog.records if hasattr(r, "shmhub_event"))


def test_prometheus_exposition():
    from prometheus_client import CollectorRegistry, generate_latest

    from shmhub.prometheus import HostCollector

    with shmhub.Host(shmhub.SegmentConfig(max_guests=2)) as host:
        g = spawn(host, "echo.py")
        for _ in range(3):
            g.link.send(b"z" * 100, timeout=10)
            with g.link.recv(timeout=10):
                pass
        registry = CollectorRegistry()
        registry.register(HostCollector(host))
        text = generate_latest(registry).decode()
    lines = set(text.splitlines())
    assert f'shmhub_link_sent_inline_total{{peer_id="{g.peer_id}",pid="{g.pid}"}} 3.0' in lines
    assert f'shmhub_link_recv_bytes_inline_total{{peer_id="{g.peer_id}",pid="{g.pid}"}} 300.0' in lines
    assert 'shmhub_host_events_total{kind="spawned"} 1.0' in lines
    assert "shmhub_guests_alive 1.0" in lines
    assert any(line.startswith('shmhub_pool_free_slots{slot_class="0",') for line in lines)


def test_link_stats_called_is_a_plain_dict_of_the_same_counters():
    with shmhub.Host() as host:
        g = host.spawn([sys.executable, "-c", "import shmhub; l = shmhub.connect(); l.send(b'hi'); l.recv(timeout=10); l.close()"])
        assert g.link.recv_bytes(timeout=10) == b"hi"
        d = g.link.stats()
        assert type(d) is dict and d == g.link.stats.as_dict()
        assert d["recv_inline"] == g.link.stats.recv_inline == 1
        g.link.send(b"bye")
        g.wait(10)
