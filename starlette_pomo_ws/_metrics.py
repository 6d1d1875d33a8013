from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._broadcaster import Broadcaster

__all__ = ["MetricsCollector", "Stats"]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(_BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*map(str, _BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets


class Stats:
    """Plain counters, always on: an increment per event or per connection, never per delivery."""

    __slots__ = (
        "accepted",
        "backend_errors",
        "broadcast_duration",
        "bytes_sent",
        "disconnects",
        "messages_sent",
        "pubsub_lag",
        "rejected",
        "replayed",
        "resumes",
        "slow_closes",
    )

    def __init__(self) -> None:
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.disconnects: Counter[int] = Counter()
        self.messages_sent = 0
        self.bytes_sent = 0
        self.slow_closes = 0
        self.resumes: Counter[str] = Counter()
        self.replayed = 0
        self.backend_errors = 0
        self.broadcast_duration = Histogram()
        self.pubsub_lag = Histogram()


class MetricsCollector:
    """A prometheus_client collector that reads `Stats` at scrape time, so metrics cost nothing in between.

    Register it in your own registry to serve the metrics elsewhere:
    `prometheus_client.REGISTRY.register(pomo.metrics_collector)`.
    """

    def __init__(self, broadcaster: Broadcaster) -> None:
        self.broadcaster = broadcaster

    def __repr__(self) -> str:
        return "MetricsCollector()"

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        broadcaster = self.broadcaster
        stats = broadcaster.stats
        yield GaugeMetricFamily(
            "pomo_ws_connections", "Open WebSocket connections on this node.", broadcaster.registry.total
        )
        yield GaugeMetricFamily("pomo_ws_users", "Users with a connection on this node.", broadcaster.registry.users)
        yield GaugeMetricFamily(
            "pomo_ws_backend_connected",
            "1 when the backend can publish.",
            1 if broadcaster.running and broadcaster.backend.connected else 0,
        )
        yield CounterMetricFamily("pomo_ws_connections_accepted", "Accepted connections.", stats.accepted)
        rejected = CounterMetricFamily(
            "pomo_ws_handshakes_rejected", "Refused handshakes, by reason.", labels=["reason"]
        )
        for reason, count in sorted(stats.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        disconnects = CounterMetricFamily("pomo_ws_disconnects", "Closed connections, by close code.", labels=["code"])
        for code, count in sorted(stats.disconnects.items()):
            disconnects.add_metric([str(code)], count)
        yield disconnects
        yield CounterMetricFamily(
            "pomo_ws_messages_sent",
            "Messages sent to sockets, counted once each when the server took them.",
            stats.messages_sent,
        )
        yield CounterMetricFamily(
            "pomo_ws_sent_bytes", "Bytes of UTF-8 of the messages sent to sockets.", stats.bytes_sent
        )
        yield CounterMetricFamily("pomo_ws_slow_client_closes", "Connections closed with 1013.", stats.slow_closes)
        resumes = CounterMetricFamily("pomo_ws_resumes", "Resume attempts, by result.", labels=["result"])
        for result in ("ok", "resync"):
            resumes.add_metric([result], stats.resumes[result])
        yield resumes
        yield CounterMetricFamily("pomo_ws_replayed_events", "Events replayed on resume.", stats.replayed)
        yield CounterMetricFamily("pomo_ws_backend_errors", "Publishes refused by the backend.", stats.backend_errors)
        for name, doc, histogram in (
            ("pomo_ws_broadcast_duration_seconds", "Time for a broadcast to be stored.", stats.broadcast_duration),
            ("pomo_ws_pubsub_lag_seconds", "Publish to fan-out delay across nodes.", stats.pubsub_lag),
        ):
            yield HistogramMetricFamily(name, doc, buckets=histogram.cumulative(), sum_value=histogram.sum)
