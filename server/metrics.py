"""Prometheus metrics: one registry per app, request-side counters and histograms, engine gauges read at scrape."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class EngineCollector:
    """Gauges and counters from engine.stats(), read when /metrics is scraped (nothing while loading)."""

    def __init__(self, get_engine: Callable[[], object | None]):
        self._get_engine = get_engine

    def collect(self):
        engine = self._get_engine()
        if engine is None:
            return
        s = engine.stats()
        gauges = [
            ("goose_requests_running", "Sequences decoding or prefilling", s.running),
            ("goose_requests_waiting", "Sequences waiting for a state slot", s.waiting),
            ("goose_state_slots_total", "Preallocated recurrent-state slots", s.slots_total),
            ("goose_state_slots_used", "State slots in use", s.slots_used),
            ("goose_state_slots_free", "State slots free", s.slots_total - s.slots_used),
            ("goose_state_bytes_per_slot", "Bytes of one sequence's recurrent state", s.state_bytes_per_slot),
            ("goose_state_bytes_total", "Bytes of the whole state pool", s.state_bytes_total),
            ("goose_prefix_cache_bytes", "Host bytes held by prefix-state snapshots", s.prefix_cache_bytes),
            ("goose_prefix_cache_entries", "Prefix-state snapshots held", s.prefix_cache_entries),
            ("goose_engine_alive", "1 while the engine step loop runs", int(s.alive)),
            ("goose_engine_draining", "1 while the engine drains for shutdown", int(s.draining)),
            ("goose_engine_threads", "CPU threads of the engine's model calls", s.threads),
        ]
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)
        counters = [
            ("goose_prefix_cache_hits", "Prompts resumed from a cached prefix state", s.prefix_cache_hits),
            ("goose_prefix_cache_misses", "Prompts with no cached prefix state", s.prefix_cache_misses),
            ("goose_prefix_cache_tokens_saved", "Prompt tokens not recomputed thanks to the prefix cache",
             s.prefix_cache_tokens_saved),
            ("goose_engine_steps", "Engine steps run", s.steps_total),
            ("goose_engine_aborted_requests", "Requests aborted in the engine", s.aborted_total),
        ]
        for name, text, value in counters:
            yield CounterMetricFamily(name, text, value=value)
        store = getattr(engine, "store_stats", None)
        stats = store() if store is not None else None
        if stats is not None:
            yield from _store_metrics(stats)


def _store_metrics(s):
    """The state store's tiers (memory, disk, redis): hits, misses, writes, evictions, errors, bytes, entries."""
    per_tier = [("hits", "Stored-state and response lookups found in the tier"),
                ("misses", "Lookups not found in the tier (or found expired, damaged or another model's)"),
                ("writes", "States and records written to the tier"),
                ("evictions", "States and records evicted from the tier by its byte budget"),
                ("errors", "I/O or connection failures of the tier, and copies found damaged")]
    for field, text in per_tier:
        family = CounterMetricFamily(f"goose_state_store_{field}", text, labels=["tier"])
        for tier, t in s.tiers.items():
            family.add_metric([tier], getattr(t, field))
        yield family
    for field, text in (("bytes", "Bytes held by the tier (unknown for Redis)"),
                        ("entries", "States and records held by the tier (unknown for Redis)")):
        family = GaugeMetricFamily(f"goose_state_store_{field}", text, labels=["tier"])
        for tier, t in s.tiers.items():
            if getattr(t, field) is not None:
                family.add_metric([tier], getattr(t, field))
        yield family
    yield GaugeMetricFamily("goose_state_store_pending_writes", "Writes accepted and not yet in every tier",
                            value=s.pending)
    yield CounterMetricFamily("goose_state_store_dropped_writes", "Writes dropped because the write queue was full",
                              value=s.writer.dropped)
    yield CounterMetricFamily("goose_state_store_expired", "Stored copies found expired (and deleted)",
                              value=s.expired)
    yield CounterMetricFamily("goose_state_store_corrupt", "Stored copies found damaged or mismatched (and deleted)",
                              value=s.corrupt)


class Metrics:
    """Everything /metrics exposes for one app."""

    def __init__(self, get_engine: Callable[[], object | None]):
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter("goose_http_requests", "HTTP requests by route, method and status",
                                     ["route", "method", "status"], registry=r)
        self.client_disconnects = Counter("goose_http_requests_client_disconnected",
                                          "Requests whose client went away before the response ended", registry=r)
        self.ttft = Histogram("goose_time_to_first_token_seconds", "Request arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("goose_inter_token_latency_seconds", "Time between generated-token updates",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("goose_e2e_request_latency_seconds", "Request arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("goose_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.cached_prompt_tokens = Counter("goose_prompt_tokens_cached", "Prompt tokens served from the prefix "
                                            "cache", registry=r)
        self.generation_tokens = Counter("goose_generation_tokens", "Generated tokens", registry=r)
        self.request_success = Counter("goose_request_success", "Finished sequences by finish reason",
                                       ["finished_reason"], registry=r)
        self.rejections = Counter("goose_requests_rejected", "Requests refused with an error, by error code",
                                  ["reason"], registry=r)
        r.register(EngineCollector(get_engine))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
