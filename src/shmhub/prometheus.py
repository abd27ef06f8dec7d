"""Prometheus exposition of a Host's counters (the `prometheus` extra: prometheus_client).

    from prometheus_client import REGISTRY, start_http_server
    REGISTRY.register(shmhub.prometheus.HostCollector(host))

Every scrape reads `host.stats()`: per-guest link counters (labels `peer_id`, `pid`), host events
by kind, and the slot pool per class.
"""

from __future__ import annotations

from typing import Any, Iterator

from ._native import LinkStats
from .host import Host


class HostCollector:
    """A prometheus_client collector over one Host."""

    def __init__(self, host: Host, prefix: str = "shmhub") -> None:
        self.host = host
        self.prefix = prefix

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.host.stats()
        p = self.prefix
        for name in LinkStats.FIELDS:
            fam = CounterMetricFamily(f"{p}_link_{name}", f"LinkStats.{name} of the host's end of each guest's link", labels=["peer_id", "pid"])
            for peer_id, g in s["guests"].items():
                fam.add_metric([str(peer_id), str(g["pid"] or "")], g["link"][name])
            yield fam
        events = CounterMetricFamily(f"{p}_host_events", "host events by kind (spawned, attached, exited, died, ...)", labels=["kind"])
        for kind, n in sorted(s["events"].items()):
            events.add_metric([kind], n)
        yield events
        alive = GaugeMetricFamily(f"{p}_guests_alive", "guests alive now")
        alive.add_metric([], sum(1 for g in s["guests"].values() if g["alive"]))
        yield alive
        for what in ("free", "allocated"):
            pool = GaugeMetricFamily(f"{p}_pool_{what}_slots", f"{what} slots of each slot class", labels=["slot_class", "slot_size"])
            for c in s["pool"]:
                pool.add_metric([str(c["class"]), str(c["slot_size"])], c[what])
            yield pool
