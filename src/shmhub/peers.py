"""The peer table: reserve / claim / attach / detach / reset by CAS (algorithms.md 2.4)."""

from __future__ import annotations

import time
from typing import Callable

from . import layout as L
from ._native import RELAXED, Region
from .errors import PeerStateError, PeerTableFull, SegmentCorrupted

STATE_NAMES = {L.PEER_EMPTY: "Empty", L.PEER_ATTACHED: "Attached", L.PEER_GOODBYE: "Goodbye", L.PEER_RESERVED: "Reserved"}


class PeerTable:
    """Peer entries of one segment, addressed by peer_id 1..max_guests."""

    def __init__(self, region: Region, layout: L.Layout) -> None:
        self._region = region
        self._layout = layout
        self.max_guests = layout.max_guests

    def _off(self, peer_id: int, field: int) -> int:
        return self._layout.peer_entry_offset(peer_id) + field

    def state(self, peer_id: int) -> int:
        s = self._region.load_u32(self._off(peer_id, L.PEER_STATE))
        if s not in STATE_NAMES:
            raise SegmentCorrupted(f"peer {peer_id} has unknown state {s}")
        return s

    def epoch(self, peer_id: int) -> int:
        return self._region.load_u32(self._off(peer_id, L.PEER_EPOCH))

    def last_heartbeat(self, peer_id: int) -> int:
        return self._region.load_u64(self._off(peer_id, L.PEER_LAST_HEARTBEAT))

    def ring_offset(self, peer_id: int) -> int:
        return self._region.load_u64(self._off(peer_id, L.PEER_RING_OFFSET), RELAXED)

    def _cas(self, peer_id: int, old: int, new: int) -> bool:
        return self._region.cas_u32(self._off(peer_id, L.PEER_STATE), old, new) == old

    def _take_empty(self, new_state: int) -> int:
        # Upstream gave up when its CAS lost; we scan on (algorithms.md 2.4).
        for peer_id in range(1, self.max_guests + 1):
            if self._region.load_u32(self._off(peer_id, L.PEER_STATE)) == L.PEER_EMPTY and self._cas(peer_id, L.PEER_EMPTY, new_state):
                self._region.fetch_add_u32(self._off(peer_id, L.PEER_EPOCH), 1)
                return peer_id
        raise PeerTableFull(f"all {self.max_guests} peer entries are in use; raise max_guests in SegmentConfig")

    def reserve(self) -> int:
        """Host, before spawning: Empty -> Reserved; returns the peer_id."""
        return self._take_empty(L.PEER_RESERVED)

    def release_reserved(self, peer_id: int) -> None:
        """Host, when a spawn or bootstrap fails: Reserved -> Empty."""
        if not self._cas(peer_id, L.PEER_RESERVED, L.PEER_EMPTY):
            raise PeerStateError(f"peer {peer_id} is {self.state_name(peer_id)}, not Reserved")

    def claim(self, peer_id: int) -> None:
        """Spawned guest: Reserved -> Attached (epoch unchanged); writes a first heartbeat (trap 34)."""
        if not self._cas(peer_id, L.PEER_RESERVED, L.PEER_ATTACHED):
            raise PeerStateError(f"peer {peer_id} is {self.state_name(peer_id)}, not Reserved")
        self.heartbeat(peer_id)

    def attach(self) -> int:
        """Walk-in guest: Empty -> Attached; returns the peer_id."""
        peer_id = self._take_empty(L.PEER_ATTACHED)
        self.heartbeat(peer_id)
        return peer_id

    def detach(self, peer_id: int) -> None:
        """Goodbye: the guest leaves (or the host starts recovering it)."""
        self._region.store_u32(self._off(peer_id, L.PEER_STATE), L.PEER_GOODBYE)

    def leave(self, peer_id: int, epoch: int) -> bool:
        """Guest goodbye, only while the entry is still ours: Attached at our epoch. A guest the host
        recovered meanwhile (a stale heartbeat while SIGSTOPped) must not mark the entry's next
        owner as gone. State and epoch are one u64 (little-endian), so one CAS checks both."""
        off = self._off(peer_id, L.PEER_STATE)
        mine = L.PEER_ATTACHED | epoch << 32
        return self._region.cas_u64(off, mine, L.PEER_GOODBYE | epoch << 32) == mine

    def reset(self, peer_id: int) -> None:
        """Host, after recovery: heartbeat 0, extension counters 0, state Empty. The epoch is never reset."""
        self._region.store_u64(self._off(peer_id, L.PEER_LAST_HEARTBEAT), 0)
        for off in range(L.PEER_G2H_MAPPINGS, L.PEER_EXT_END, 8):
            self._region.store_u64(self._off(peer_id, off), 0)
        self._region.store_u32(self._off(peer_id, L.PEER_STATE), L.PEER_EMPTY)

    def heartbeat(self, peer_id: int, now_ns: int | None = None) -> None:
        self._region.store_u64(self._off(peer_id, L.PEER_LAST_HEARTBEAT), time.monotonic_ns() if now_ns is None else now_ns)

    def is_stale(self, peer_id: int, interval_ns: int, now_ns: int | None = None) -> bool:
        """Heartbeat older than twice the interval. 0 means "not yet" (trap 34); interval 0 disables."""
        last = self.last_heartbeat(peer_id)
        if interval_ns == 0 or last == 0:
            return False
        now = time.monotonic_ns() if now_ns is None else now_ns
        return max(0, now - last) > 2 * interval_ns

    def mmap_counters(self, peer_id: int) -> dict[str, dict[str, int]]:
        """The FEATURE_MMAP_LEASES counters of a peer's link, per direction."""
        u32: Callable[[int], int] = lambda f: self._region.load_u32(self._off(peer_id, f))  # noqa: E731
        return {
            "g2h": {"mappings": u32(L.PEER_G2H_MAPPINGS), "mapped_bytes": u32(L.PEER_G2H_MAPPED_KIB) << 10, "leases": u32(L.PEER_G2H_LEASES)},
            "h2g": {"mappings": u32(L.PEER_H2G_MAPPINGS), "mapped_bytes": u32(L.PEER_H2G_MAPPED_KIB) << 10, "leases": u32(L.PEER_H2G_LEASES)},
        }

    def state_name(self, peer_id: int) -> str:
        return STATE_NAMES.get(self._region.load_u32(self._off(peer_id, L.PEER_STATE)), "Unknown")
