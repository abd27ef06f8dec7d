"""A guest that closes its link before it exits is recovered on the doorbell hang-up while still
running; the host must still reap it once it exits (no zombie children)."""

from __future__ import annotations

import os
import sys
import time

from shmhub import Host

GUESTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "guests")


def test_host_reaps_a_guest_recovered_before_it_exited():
    with Host() as host:
        g = host.spawn([sys.executable, os.path.join(GUESTS, "aio_burst.py"), "3"])
        ev = host.events.get(timeout=30)
        assert ev.kind == "spawned"
        ev = host.events.get(timeout=30)  # its link closed: recovered, process maybe still running
        assert (ev.kind, ev.peer_id) == ("exited", g.peer_id)
        deadline = time.monotonic() + 30
        # Neither g.wait() nor g.alive here: both would reap it themselves.
        while g.process.returncode is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert g.process.returncode == 0
        assert not os.path.exists(f"/proc/{g.pid}")  # reaped, not a zombie
