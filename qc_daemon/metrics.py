"""Prometheus metrics (``qc_`` names) in a registry of the daemon's own, never the process-global one.

Counted where the decision is taken: instances received or refused by :class:`~qc_daemon.intake.Intake`. Read
at scrape time: series by final status, alerts raised and pending, results to PACS pending and failed (never
counted as alerts), scoring and end-to-end latency histograms (aggregates over the store, so they survive a
restart and never miss a row), and the daemon's
:class:`~qc_daemon.status.DaemonStatus` (queue depth, series receiving, free disk, listener up, model loaded).
No UID is ever a label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from qc_daemon.status import DaemonStatus
from qc_daemon.store import Latency, Store, latency_counts, result_totals


SCORING_BUCKETS_S = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
END_TO_END_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class DaemonMetrics:
    """The daemon's counters and its registry; :meth:`render` is the ``/metrics`` body."""

    def __init__(self, store: Store, status: Callable[[], DaemonStatus]):
        self.registry = CollectorRegistry()
        self._received = Counter(
            "qc_instances_received", "Instances accepted (success status), by source", ["source"],
            registry=self.registry,
        )
        self._refused = Counter(
            "qc_instances_refused", "Instances refused, by the reason's status name", ["reason"],
            registry=self.registry,
        )
        self.registry.register(_StoreAndStatusCollector(store, status))

    def received(self, source: str) -> None:
        self._received.labels(source=source).inc()

    def refused(self, reason: str) -> None:
        self._refused.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreAndStatusCollector(Collector):
    def __init__(self, store: Store, status: Callable[[], DaemonStatus]):
        self.store = store
        self.status = status

    def describe(self) -> list[Metric]:
        return []  # values come from the store at each scrape: nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        yield _gauge("qc_listener_up", "1 when the DICOM port is open", float(status.listener_up))
        yield _gauge("qc_model_loaded", "1 when the scoring model is loaded", float(status.model_loaded))
        yield _gauge("qc_queue_depth", "Complete series waiting for a scoring worker", len(status.queued))
        yield _gauge("qc_series_receiving", "Series whose instances are arriving", len(status.receiving))
        yield _gauge("qc_series_scoring", "Series being scored", len(status.scoring))
        yield _gauge("qc_disk_free_bytes", "Free space where the spool lives", status.free_disk_mb * 2**20)
        yield _gauge("qc_disk_min_free_bytes", "Below this free space instances are refused",
                     status.min_free_mb * 2**20)
        try:
            with self.store.session() as session:
                totals = result_totals(session)
                latencies = {
                    Latency.SCORING: latency_counts(session, Latency.SCORING, SCORING_BUCKETS_S),
                    Latency.END_TO_END: latency_counts(session, Latency.END_TO_END, END_TO_END_BUCKETS_S),
                }
        except SQLAlchemyError as exc:
            self.store.availability.failed(exc, "metrics")  # logged once per outage, not per scrape
            yield _gauge("qc_store_up", "1 when the results database answers", 0.0)
            return
        self.store.availability.answered()
        yield _gauge("qc_store_up", "1 when the results database answers", 1.0)
        series = CounterMetricFamily("qc_series", "Series revisions recorded, by final status", labels=["status"])
        for name, count in totals.series_by_status.items():
            series.add_metric([name], count)
        yield series
        yield CounterMetricFamily("qc_alerts_raised", "Scored revisions below the alert threshold",
                                  value=totals.alerts_raised)
        yield _gauge("qc_alerts_pending", "Alert deliveries (webhook, exec) waiting in the outbox",
                     totals.alerts_pending)
        yield _gauge("qc_results_pending", "Results to PACS (SR, montage SC) waiting in the outbox",
                     totals.results_pending)
        yield _gauge("qc_results_failed", "Results to PACS the destination refused for good", totals.results_failed)
        helps = {
            Latency.SCORING: "Seconds to preprocess and score a volume",
            Latency.END_TO_END: "Seconds from the newest instance in the spool to the stored outcome",
        }
        for latency, counts in latencies.items():
            buckets = [(_le(bound), n) for bound, n in zip(counts.bounds, counts.buckets)]
            buckets.append(("+Inf", counts.count))
            yield HistogramMetricFamily(f"qc_{latency.value}_seconds", helps[latency], buckets=buckets,
                                        sum_value=counts.sum_s)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _le(bound: float) -> str:
    return repr(float(bound))
