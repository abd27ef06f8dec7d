"""Random-instant kills in the phases the traffic trials of tests/link/test_crash.py rarely reach:
class growth, mmap attach and the socket bootstrap (docs/hardening.md). Any build.

Each trial starts a guest that waits for a go once it is started (so the kill does not land in
the interpreter's start-up), then runs one phase -- slot sends into classes the host has taken
every free slot of (request, growth, extent mapping), payloads above the largest slot both ways
(memfd creation, attach datagram, mapping, leases), or connecting to the host's bootstrap socket
(request, response with four fds, segment attach, claim) -- and SIGKILLs it a seeded random
0..SPAN s after the go. After every trial: every peer Empty, every slot Free and listed once, no
mapping and no fd left in the host; the next trial's guest is the next guest that must work
(and every trial's guest that outlived its kill instant ran the phase to the end, checked). A
growth trial has a host of its own (a class never shrinks); the other phases share one.

A few trials per phase run by default; `make test-slow` runs 1000 per phase.
"""

from __future__ import annotations

import os
import random
import signal

import pytest
from killutil import CONFIG, assert_left_nothing, fds, mappings, run_guest

from shmhub import Host

# phase -> (rounds, kill instants spread over 0..SPAN s after the go: about the phase's length)
PHASES = {"growth": (8, 0.020), "mmap": (4, 0.030), "bootstrap": (2, 0.025)}
QUICK, LONG = 8, 1000


def trials(tmp_path, phase: str, n: int, seed: int) -> dict:
    """n trials of one phase; how many guests were killed and how many finished first. Growth is
    one-way (recovery does not shrink a class), so each growth trial has a host of its own; the
    other phases share one host through all their trials."""
    rounds, span = PHASES[phase]
    rng = random.Random(seed)
    env = {k: v for k, v in os.environ.items() if k != "SHMHUB_CRASH_AT"}
    outcome = {"killed": 0, "finished": 0}
    sock = str(tmp_path / "hub.sock")
    shared = None if phase == "growth" else Host(CONFIG)
    try:
        for i in range(n):
            host = shared or Host(CONFIG)
            try:
                if i == 0 or shared is None:
                    host.listen(sock)
                    assert run_guest(host, "traffic", 3, env, sock) == 0
                    fds_before, maps_before = fds(), mappings()
                rc = run_guest(host, phase, rounds, env, sock, take_slots=phase == "growth", kill_after=rng.uniform(0.0, span))
                assert rc in (0, -signal.SIGKILL), f"trial {i}: the guest exited {rc}"
                outcome["killed" if rc else "finished"] += 1
                assert_left_nothing(host, fds_before, maps_before)
                if shared is None or i % 10 == 9 or i == n - 1:
                    assert run_guest(host, "traffic", 3, env, sock) == 0  # the next guest works
            finally:
                if shared is None:
                    host.close()
    finally:
        if shared is not None:
            shared.close()
    return outcome


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_guest_killed_at_random_in_a_phase(tmp_path, phase):
    out = trials(tmp_path, phase, QUICK, seed=17)
    assert out["killed"] > 0, out


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("phase", sorted(PHASES))
def test_guest_killed_at_random_in_a_phase_long(tmp_path, phase):
    out = trials(tmp_path, phase, LONG, seed=1017)
    print(f"{phase}: {out}")
    assert out["killed"] >= LONG // 3, out  # kills land all over the phase, most inside it
