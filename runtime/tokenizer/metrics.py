"""Prometheus metrics of the gateway: request latencies measured here, plus the cluster's
numbers (KV usage, prefix-cache hit rate, KV transfer, speculative accept length) taken
from the controller's ClusterStatus. One registry per gateway, so tests can run several."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0, 600.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ACCEPT_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 16.0)


class _ClusterTotals(Collector):
    """Counters whose totals the controller keeps (summed over workers): exported as they
    are, since a prometheus_client Counter can only be incremented."""

    def __init__(self) -> None:
        self.transfer_bytes = 0.0
        self.transfer_failures = 0.0

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("runtime_kv_transfer_bytes", "Bytes of KV cache sent from prefill to decode workers", value=self.transfer_bytes)
        yield CounterMetricFamily("runtime_kv_transfer_failures", "KV transfers that failed or timed out", value=self.transfer_failures)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("runtime_time_to_first_token_seconds", "Time from request arrival to its first token", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("runtime_inter_token_latency_seconds", "Time between two token deltas of one request", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("runtime_e2e_request_latency_seconds", "Time from request arrival to its last token", buckets=E2E_BUCKETS, registry=r)
        self.requests = Counter("runtime_requests", "Finished generations (one per choice), by finish reason", ["finish_reason"], registry=r)
        self.errors = Counter("runtime_request_errors", "Requests answered with an error, by HTTP status", ["code"], registry=r)
        self.prompt_tokens = Counter("runtime_prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generation_tokens = Counter("runtime_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("runtime_requests_running", "Generations in flight at the gateway", registry=r)
        self.hit_rate = Gauge("runtime_prefix_cache_hit_rate", "Prefix-cache hit rate of the workers that prefill (prefill workers, or colocated decode workers)", registry=r)
        self.kv_usage = Gauge("runtime_kv_usage_ratio", "Used / total KV pages over live workers", registry=r)
        self.kv_used = Gauge("runtime_kv_used_pages", "Used KV pages over live workers", registry=r)
        self.kv_total = Gauge("runtime_kv_total_pages", "KV pages over live workers", registry=r)
        self.workers_alive = Gauge("runtime_workers_alive", "Live workers per role", ["role"], registry=r)
        # What an autoscaler reads (deploy/k8s/base/hpa.yaml): work waiting at, and running on, each pool.
        self.worker_queued = Gauge("runtime_worker_queued_requests", "Requests queued at live workers, per role",
                                   ["role"], registry=r)
        self.worker_running = Gauge("runtime_worker_running_requests", "Requests running on live workers, per role",
                                    ["role"], registry=r)
        self.transfer_latency = Histogram(
            "runtime_kv_transfer_latency_seconds", "Prefill side: from posting a request's KV write to its completion",
            buckets=TRANSFER_BUCKETS, registry=r,
        )
        self.kv_wait = Histogram(
            "runtime_kv_wait_seconds",
            "Decode side: from reserving a request's pages to its KV landing (prefill queue, prefill and transfer)",
            buckets=TRANSFER_BUCKETS, registry=r,
        )
        self.accept_length = Histogram(
            "runtime_spec_accept_length", "Tokens gained per speculative decode step (counts the bonus token)",
            ["drafter"], buckets=ACCEPT_BUCKETS, registry=r,
        )
        self.totals = _ClusterTotals()
        r.register(self.totals)

    def update_cluster(self, workers: list[dict[str, Any]], m: dict[str, Any]) -> None:
        """Apply one ClusterStatus. Sample lists hold only the samples taken since the
        previous status, so each is observed exactly once."""
        for role in ("prefill", "decode"):
            live = [w for w in workers if w.get("role") == role and w.get("alive")]
            self.workers_alive.labels(role).set(len(live))
            self.worker_queued.labels(role).set(sum(int(w.get("queued", 0)) for w in live))
            self.worker_running.labels(role).set(sum(int(w.get("running", 0)) for w in live))
        if "prefix_cache_hit_rate" in m:
            self.hit_rate.set(float(m["prefix_cache_hit_rate"]))
        used, total = m.get("kv_used_pages"), m.get("kv_total_pages")
        if used is not None and total is not None:
            self.kv_used.set(used)
            self.kv_total.set(total)
            self.kv_usage.set(used / total if total else 0.0)
        if "kv_transfer_bytes_total" in m:
            self.totals.transfer_bytes = float(m["kv_transfer_bytes_total"])
        if "kv_transfer_failures_total" in m:
            self.totals.transfer_failures = float(m["kv_transfer_failures_total"])
        for s in m.get("kv_transfer_latency_seconds") or ():
            self.transfer_latency.observe(float(s))
        for s in m.get("kv_wait_seconds") or ():
            self.kv_wait.observe(float(s))
        for drafter, samples in (m.get("spec_accept_length") or {}).items():
            h = self.accept_length.labels(str(drafter))
            for s in samples:
                h.observe(float(s))

    def render(self) -> bytes:
        return generate_latest(self.registry)
