"""Prometheus metrics of one server (its own registry, so two servers in one process never share counts)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
SCORE_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)


class ServerMetrics:
    def __init__(self, max_batch: int, threshold: float | None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mhpc_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("mhpc_request_duration_seconds", "HTTP request latency by endpoint", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
        self.batch_size = Histogram("mhpc_batch_size", "images per engine batch (dynamic batching)",
                                    buckets=[s for s in sizes if s <= max_batch], registry=r)
        self.queue_depth = Gauge("mhpc_queue_depth", "images waiting for the engine", registry=r)
        self.in_flight = Gauge("mhpc_requests_in_flight", "HTTP requests being answered", registry=r)
        # Score buckets are fractions of the threshold at start-up, so the verdict boundary is a bucket edge.
        buckets = [threshold * f for f in SCORE_FRACTIONS] if threshold else [0.01 * 2**k for k in range(14)]
        self.scores = Histogram("mhpc_image_score", "image anomaly scores (buckets: fractions of the start-up "
                                "threshold)", buckets=buckets, registry=r)
        self.model_info = Gauge("mhpc_model_info", "the live model (1) by identity",
                                ["name", "engine", "sha256", "saved", "n_train_images"], registry=r)
        self.reloads = Counter("mhpc_model_reloads", "hot reloads by result (loaded, unchanged, refused)",
                               ["result"], registry=r)

    def set_model(self, name: str, identity: dict[str, Any]) -> None:
        self.model_info.clear()
        self.model_info.labels(name=name, engine=identity["engine"], sha256=identity["sha256"],
                               saved=identity["saved"], n_train_images=str(identity["n_train_images"])).set(1)


def merge_replicas(texts: dict[str, str], label: str = "replica") -> bytes:
    """Several replicas' Prometheus texts as one exposition, each sample labelled with its replica (what
    `/metrics` answers under Ray Serve, so one scrape sees every replica; sum over ``replica`` for totals).
    The ``*_created`` timestamps are left out: the parser reads them back as separate gauges."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created") and family.type == "gauge":
                continue
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, label: replica}, sample.value, sample.timestamp)

    class _Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry()
    registry.register(_Merged())
    return generate_latest(registry)
