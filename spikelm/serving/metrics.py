"""Prometheus metrics of one app (its own registry: two apps in one process do not share counters)."""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector:
    """Reads the engine's live figures at scrape time."""

    def __init__(self, engine_of):
        self.engine_of = engine_of  # () -> Engine or None (before the lifespan has loaded the model)

    def collect(self):
        engine = self.engine_of()
        if engine is None:
            return
        f = engine.figures()
        if f is None:  # the engine process did not answer in time: no engine figures in this scrape
            return
        yield GaugeMetricFamily("spikelm_queue_depth", "Requests waiting for a free slot", value=f["waiting"])
        yield GaugeMetricFamily("spikelm_active_sequences", "Sequences being generated (decode batch size)",
                                value=f["active"])
        yield GaugeMetricFamily("spikelm_max_batch", "Most sequences decoded together", value=f["max_batch"])
        yield CounterMetricFamily("spikelm_cancelled_sequences", "Sequences dropped because the client went away",
                                  value=f["cancelled"])
        yield CounterMetricFamily("spikelm_decode_steps", "Batched decode steps run", value=f["steps"])
        yield GaugeMetricFamily("spikelm_prefilling_sequences", "Sequences whose prompt is being prefilled "
                                "(they hold a slot)", value=f["prefilling"])
        yield CounterMetricFamily("spikelm_prefill_chunks", "Prompt chunks run between decode steps",
                                  value=f["prefill_chunks"])
        yield CounterMetricFamily("spikelm_prefill_forwards", "Forwards that ran prompt chunks (chunks of one "
                                  "length run together)", value=f["prefill_forwards"])
        yield CounterMetricFamily("spikelm_failed_sequences", "Sequences failed inside the engine (each alone)",
                                  value=f["failed"])
        cache = f["prefix_cache"]
        if cache is not None:
            yield CounterMetricFamily("spikelm_prefix_cache_hits", "Prompts resumed from a cached prefix state",
                                      value=cache["hits"])
            yield CounterMetricFamily("spikelm_prefix_cache_misses", "Prompts with no cached prefix",
                                      value=cache["misses"])
            yield CounterMetricFamily("spikelm_prefix_cache_hit_tokens", "Prompt tokens not run again thanks "
                                      "to the prefix cache", value=cache["hit_tokens"])
            yield CounterMetricFamily("spikelm_prefix_cache_evictions", "Prefix states evicted (least recently "
                                      "used first)", value=cache["evictions"])
            yield GaugeMetricFamily("spikelm_prefix_cache_bytes", "Bytes held by the prefix cache",
                                    value=cache["bytes"])
            yield GaugeMetricFamily("spikelm_prefix_cache_entries", "Prefix states held", value=cache["entries"])


class ServerMetrics:
    def __init__(self, engine_of):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("spikelm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("spikelm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("spikelm_generation_tokens", "Tokens generated", registry=r)
        self.energy_joules = Counter("spikelm_energy_joules", "Energy of all requests (prompt and decode)",
                                     registry=r)
        self.energy_pj_per_token = Histogram(
            "spikelm_energy_pj_per_token", "Picojoules per generated token, per request (prompt included)", registry=r,
            buckets=[10.0 ** e for e in range(3, 12)])
        self.time_to_first_token = Histogram(
            "spikelm_time_to_first_token_seconds", "From request arrival to its first token", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.inter_token_latency = Histogram(
            "spikelm_inter_token_latency_seconds", "Between two tokens of one request", registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.tokens_per_second = Histogram(
            "spikelm_tokens_per_second", "Decode speed of each request (tokens after the first / time)",
            registry=r, buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000))
        self.registry.register(EngineCollector(engine_of))

    def render(self) -> bytes:
        return generate_latest(self.registry)
