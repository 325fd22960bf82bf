"""Prometheus metrics: counters the app and flusher update, gauges read from the database at scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.store import lifecycle
from sidecar.store.protocol import UsageReader


class Metrics:
    """One registry per app, so tests and several apps in one process never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter("sidecar_events_total", "Usage events by result (accepted, duplicate, rejected).",
                              ["result"], registry=self.registry)
        # Children resolved once: label lookups take a lock on every call.
        self.accepted = self.events.labels("accepted")
        self.duplicates = self.events.labels("duplicate")
        self.rejected_events = self.events.labels("rejected")
        self.rejected = Counter("sidecar_events_rejected_total",
                                "Rejected events by the field that broke the contract.", ["field"],
                                registry=self.registry)
        self.requests_refused = Counter("sidecar_ingest_refused_total",
                                        "Ingest requests refused whole, by HTTP status.", ["status"],
                                        registry=self.registry)
        self.ingest_latency = Histogram(
            "sidecar_ingest_latency_seconds", "Time from request to durable acknowledgement of POST /v1/events.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry)
        self.group_size = Histogram(
            "sidecar_group_commit_requests", "Ingest requests merged into one SQLite transaction.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.spool_replay_events = Counter(
            "sidecar_spool_replay_events_total", "Events received from a reporter's spool replay (X-Spool-Replay).",
            ["result"], registry=self.registry)
        self.pruned = Counter("sidecar_events_pruned_total", "Event rows deleted by retention.", registry=self.registry)

    def attach(self, *, view: UsageReader, now: Callable[[], float], flusher: Any, member: Any = None,
               consumer: Any = None) -> None:
        """Add the scrape-time collector that reads state from the database and the flusher (and, in
        fleet mode, this member's shipping and lease figures; with a subscription queue, its consumer's)."""
        self.registry.register(_StateCollector(view, now, flusher, lifecycle=member is None))
        if member is not None:
            self.registry.register(_FleetCollector(member))
        if consumer is not None:
            self.registry.register(_ConsumerCollector(consumer))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, view: UsageReader, now: Callable[[], float], flusher: Any, *, lifecycle: bool) -> None:
        self.view = view
        self.now = now
        self.flusher = flusher
        self.lifecycle = lifecycle  # fleet mode: the fleet's figures say it (_FleetCollector)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        buckets = GaugeMetricFamily("sidecar_buckets", "Hourly buckets by state.", labels=["state"])
        records = GaugeMetricFamily("sidecar_records", "Metering records by state.", labels=["state"])
        oldest = GaugeMetricFamily(
            "sidecar_oldest_pending_age_seconds",
            "Age of the oldest usage still owed to AWS (sealed or pending); alarm well before 24 h.")
        size = GaugeMetricFamily("sidecar_db_size_bytes", "SQLite database file plus WAL.")
        unmapped_age = GaugeMetricFamily(
            "sidecar_unmapped_oldest_age_seconds",
            "Age of the oldest usage of a tenant with no customer mapping (0 when none); map it before 24 h.")
        unmapped_raw = GaugeMetricFamily("sidecar_unmapped_usage_raw",
                                         "Raw usage (source units) waiting for a tenant mapping, by dimension.",
                                         labels=["dimension"])
        parked = GaugeMetricFamily("sidecar_unconfigured_usage_raw",
                                   "Raw usage parked because no configured dimension can bill it, by dimension.",
                                   labels=["dimension"])
        gpu_total = CounterMetricFamily(
            "sidecar_gpu_seconds",
            "GPU wall time the task had (kind=wall, x SIDECAR_GPUS) and GPU time it billed (kind=billed);"
            " increase() over an hour compares them. fair_share and dedicated keep them equal.",
            labels=["dimension", "kind"])
        gpu_hour = GaugeMetricFamily(
            "sidecar_gpu_last_hour_seconds",
            "The same two figures for the last completed hour with GPU time (its start: sidecar_gpu_last_hour).",
            labels=["dimension", "kind"])
        gpu_hour_at = GaugeMetricFamily("sidecar_gpu_last_hour", "Start (epoch seconds) of that hour.",
                                        labels=["dimension"])
        settled_raw = GaugeMetricFamily(
            "sidecar_remainder_settled_raw",
            "Remainders settled at final seals (raw units): rounded_up = billed beyond usage, given_up = not billed.",
            labels=["customer", "dimension", "result"])
        figures = self.view.figures(self.now())
        if figures is not None:
            counts, age = figures["counts"], figures["oldest_pending_age_s"]
            unmapped, unconfigured = figures["unmapped"], figures["unconfigured"]
            settled, gpu = figures["settlements"], figures["gpu"]
            for state, n in sorted(counts["buckets"].items()):
                buckets.add_metric([state], n)
            for state, n in sorted(counts["records"].items()):
                records.add_metric([state], n)
            oldest.add_metric([], age or 0.0)
            size.add_metric([], figures["size_bytes"])
            unmapped_age.add_metric([], (unmapped or {}).get("oldest_age_s", 0))
            for dim, raw in sorted((unmapped or {}).get("raw_by_dimension", {}).items()):
                unmapped_raw.add_metric([dim], raw)
            for dim, raw in sorted((unconfigured or {}).get("raw_by_dimension", {}).items()):
                parked.add_metric([dim], raw)
            for s in settled:
                settled_raw.add_metric([s["customer"], s["dimension"], "rounded_up"], s["rounded_up"])
                settled_raw.add_metric([s["customer"], s["dimension"], "given_up"], s["given_up"])
            for g in gpu["total"]:
                gpu_total.add_metric([g["dimension"], "wall"], g["wall_us"] / 1e6)
                gpu_total.add_metric([g["dimension"], "billed"], g["billed_us"] / 1e6)
            for g in gpu["last_hour"]:
                gpu_hour.add_metric([g["dimension"], "wall"], g["wall_us"] / 1e6)
                gpu_hour.add_metric([g["dimension"], "billed"], g["billed_us"] / 1e6)
                gpu_hour_at.add_metric([g["dimension"]], g["hour"])
        yield from (buckets, records, oldest, size, unmapped_age, unmapped_raw, parked, settled_raw, gpu_total,
                    gpu_hour, gpu_hour_at)
        if self.lifecycle:
            yield from lifecycle_families((figures or {}).get("lifecycle"))
        calls = CounterMetricFamily("sidecar_marketplace_calls", "BatchMeterUsage calls by outcome.",
                                    labels=["outcome"])
        for outcome, n in sorted(self.flusher.calls_by_outcome.items()):
            calls.add_metric([outcome], n)
        yield calls
        outcomes = CounterMetricFamily("sidecar_marketplace_records",
                                       "Record outcomes (sent, rejected, conflict, retry, carried, ...).",
                                       labels=["outcome"])
        for outcome, n in sorted(self.flusher.records_by_outcome.items()):
            outcomes.add_metric([outcome], n)
        yield outcomes


class _FleetCollector(Collector):
    """Fleet mode: this member's outbox and lease, and every member as last read from PostgreSQL."""

    def __init__(self, member: Any) -> None:
        self.member = member

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.member
        health = m.health()
        backlog = GaugeMetricFamily("sidecar_fleet_backlog_deltas",
                                    "Usage deltas committed locally and not yet shipped to the fleet's PostgreSQL.")
        backlog.add_metric([], health["backlog_deltas"])
        age = GaugeMetricFamily("sidecar_fleet_backlog_age_seconds",
                                "Age of the oldest unshipped delta (0 when none); alarm when it grows.")
        age.add_metric([], health["backlog_age_s"] or 0.0)
        failing = GaugeMetricFamily("sidecar_fleet_ship_failing", "1 while shipping to PostgreSQL fails.")
        failing.add_metric([], 1 if health["ship_error"] else 0)
        leader = GaugeMetricFamily("sidecar_fleet_leader", "1 while this member holds the sender lease.")
        leader.add_metric([], 1 if health["leader"] else 0)
        shipped = CounterMetricFamily("sidecar_fleet_shipped_deltas", "Deltas this member shipped (new in PostgreSQL).")
        shipped.add_metric([], m.shipped)
        beat = GaugeMetricFamily("sidecar_fleet_member_heartbeat_age_seconds",
                                 "Each member's heartbeat age, as last read from PostgreSQL.", labels=["member"])
        member_backlog = GaugeMetricFamily("sidecar_fleet_member_backlog_deltas",
                                           "Each member's unshipped deltas, as it last reported.", labels=["member"])
        for row in m.members_seen:
            if not row["stopped"]:
                beat.add_metric([row["member_id"]], row["heartbeat_age_s"])
                member_backlog.add_metric([row["member_id"]], row["backlog"])
        yield from (backlog, age, failing, leader, shipped, beat, member_backlog)
        yield from lifecycle_families(m.fleet_figures.get("lifecycle"))


def lifecycle_families(summary: dict[str, Any] | None) -> Iterator[Metric]:
    """The customer lifecycle's gauges from a store's lifecycle summary (`store.lifecycle.summary`)."""
    summary = summary or lifecycle.summarize([], {"customers": 0, "events": 0}, now=0.0)  # no database yet
    states = GaugeMetricFamily("sidecar_lifecycle_customers", "Customers by subscription state (from the queue).",
                               labels=["state"])
    for state, n in sorted(summary["customers_by_state"].items()):
        states.add_metric([state], n)
    parked = GaugeMetricFamily(
        "sidecar_lifecycle_parked_after_end_events",
        "Events of customers whose subscription had ended: stored, parked, never sent; alarm when it grows.")
    parked.add_metric([], summary["parked_after_end_events"])
    overdue = GaugeMetricFamily(
        "sidecar_lifecycle_final_usage_overdue_customers",
        "Customers whose agreement began to end 30 min ago or more with records not yet accepted by AWS; alarm > 0.")
    overdue.add_metric([], len(summary["final_usage_overdue"]))
    yield from (states, parked, overdue)


class _ConsumerCollector(Collector):
    """The subscription queue's consumer: messages by result, failing, the last end's latency."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        health = self.consumer.health()
        messages = CounterMetricFamily(
            "sidecar_subscription_messages",
            "Queue messages by result: applied, duplicate, unparseable and other_product (left for the DLQ).",
            labels=["result"])
        for result, n in sorted(health["messages"].items()):
            messages.add_metric([result], n)
        failing = GaugeMetricFamily("sidecar_subscription_queue_failing", "1 while polling the queue fails.")
        failing.add_metric([], 1 if health["error"] else 0)
        latency = GaugeMetricFamily(
            "sidecar_lifecycle_final_usage_seconds",
            "For the last agreement that began to end: seconds from its message to AWS's answer on its final usage.")
        latency.add_metric([], health["final_usage_s"] or 0.0)
        yield from (messages, failing, latency)
