"""The engine's scheduling: chunked prefill between decode steps, and the prefix-state cache.

The engine runs here without HTTP (a real model, real threads), then once behind the real server for /metrics.
"""

import threading
import time

import httpx
import pytest

from helpers import save_tiny_model
from serving_helpers import metric, running_server
from spikelm.serving.app import load_model_and_tokenizer
from spikelm.serving.engine import Engine, SamplingParams

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=["ssa", "sdsa"])
def model_dir(request, tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp(f"scheduling-{request.param}") / "tiny",
                           attention_type=request.param)


class Collector:
    """Events of one request, with the time each arrived."""

    def __init__(self):
        self.events, self.times, self.done = [], [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        self.times.append(time.monotonic())
        if event.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self):
        return [e.token_id for e in self.events if e.token_id is not None]


def run_engine(model_dir, prompts, params, one_at_a_time=False, **engine_settings):
    """Submit the prompts (together, or each after the one before has finished) to a fresh engine; returns
    their Collectors and the engine."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    engine = Engine(model, tokenizer, threads=1, **engine_settings)
    engine.start()
    try:
        collectors = []
        for prompt in prompts:
            collectors.append(Collector())
            engine.submit(prompt, params, collectors[-1])
            if one_at_a_time:
                assert collectors[-1].done.wait(120)
        for collector in collectors:
            assert collector.done.wait(120)
    finally:
        engine.stop()
    return collectors, engine


SHARED = [3 + (i * 7) % 17 for i in range(300)]  # a "system prompt" of token ids
PROMPTS = [SHARED + [4, 5, 6], SHARED + [8], SHARED + [9, 10], SHARED + [4, 5, 6]]


def test_prefix_cache_gives_the_same_greedy_tokens_and_skips_shared_prompts(model_dir):
    greedy = SamplingParams(max_tokens=24, temperature=0)
    # one at a time, so that each prompt can find the ones before it in the cache
    cold, uncached = run_engine(model_dir, PROMPTS, greedy, True, prefix_cache_bytes=0, step_tokens=64)
    warm, cached = run_engine(model_dir, PROMPTS, greedy, True, prefix_cache_bytes=2**26, step_tokens=64)
    assert [c.tokens for c in warm] == [c.tokens for c in cold]  # identical with and without the cache
    assert len({tuple(c.tokens) for c in cold}) > 1
    usage = [c.events[-1].usage for c in warm]
    assert usage[0].cached_tokens == 0  # the first prompt finds nothing
    assert usage[1].cached_tokens == 0  # nor the second, which keeps a snapshot where it parts from the first
    assert usage[2].cached_tokens == 300  # the third resumes there
    assert usage[3].cached_tokens == len(PROMPTS[3]) - 1  # a repeated prompt runs only its last token
    assert all(u.tokens_processed == u.prompt_tokens - u.cached_tokens + u.completion_tokens - 1 for u in usage)
    # the energy counts only what ran: a cached prompt costs less than the same prompt cold
    assert warm[3].events[0].energy.ac < cold[3].events[0].energy.ac
    # and at the positions where it ran (the GPT-2 reference's attention cost grows with them)
    n, generated = len(PROMPTS[3]), usage[3].completion_tokens
    decode_positions = sum(n + j for j in range(1, generated))
    assert usage[3].energy.context == n + decode_positions
    assert cold[3].events[-1].usage.energy.context == n * (n + 1) // 2 + decode_positions
    assert (cached.prefix_cache.hits, cached.prefix_cache.misses) == (2, 2) and uncached.prefix_cache is None


def test_a_prompts_last_token_runs_as_a_row_of_the_decode_step(model_dir):
    greedy = SamplingParams(max_tokens=8, temperature=0)
    prompt = SHARED[:40]
    collectors, engine = run_engine(model_dir, [prompt, prompt], greedy, True, prefix_cache_bytes=2**26)
    # the first prompt runs [0, 39) in a chunk (a snapshot is kept there) and its last token in a decode step;
    # the repeated one resumes at 39 and runs no chunk at all
    assert engine.prefill_chunks == 1
    assert collectors[0].tokens == collectors[1].tokens
    first, again = (c.events[0] for c in collectors)
    assert first.energy.tokens == len(prompt) and again.energy.tokens == 1  # the first token's event: the prompt's


def test_chunked_prefill_gives_the_same_tokens_as_one_forward(model_dir):
    greedy = SamplingParams(max_tokens=16, temperature=0)
    prompts = [SHARED[:200], SHARED[:150] + [8, 9], [5, 6, 7]]
    whole, _ = run_engine(model_dir, prompts, greedy, prefix_cache_bytes=0, step_tokens=4096,
                          idle_prefill_tokens=4096)
    chunked, engine = run_engine(model_dir, prompts, greedy, prefix_cache_bytes=0, step_tokens=7,
                                 min_prefill_chunk=1, idle_prefill_tokens=7)
    assert [c.tokens for c in chunked] == [c.tokens for c in whole]
    assert engine.prefill_chunks >= sum(len(p) for p in prompts) // 7


def run_wave(model_dir, warm_up, wave, params, warm_up_params=None, **engine_settings):
    """Run `warm_up` alone, then submit every prompt of `wave` before the engine's next step (they wait
    together, so their prefill chunks of one length run as one forward); returns the wave's Collectors and the
    engine."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    engine = Engine(model, tokenizer, threads=1, **engine_settings)
    engine.start()
    try:
        if warm_up:
            first = Collector()
            engine.submit(warm_up, warm_up_params, first)
            assert first.done.wait(120)
        collectors = [Collector() for _ in wave]
        with engine._wakeup:  # the engine thread waits for this lock before it looks at the queue
            for prompt, p, collector in zip(wave, params, collectors):
                engine.submit(prompt, p, collector)
        for collector in collectors:
            assert collector.done.wait(120)
    finally:
        engine.stop()
    return collectors, engine


@pytest.mark.parametrize("cached", [False, True])
def test_prompts_prefilled_together_get_what_each_gets_alone(model_dir, cached):
    """Equal-length chunks of waiting prompts run as one forward: fresh prompts, or (with the prefix cache)
    prompts that continue different cached states. Each gets the tokens, the per-token energy and the usage it
    gets alone, bit for bit, in float32; sampled ones too."""
    params = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=10, temperature=0.9, seed=5),
              SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=8, temperature=0.7, seed=1)]
    if cached:  # the first prompt leaves a snapshot at SHARED[:60]; the wave's prompts resume from it
        warm_up, wave = SHARED[:60] + [4], [SHARED[:60] + [5 + i, 6, 7 + i, 8] for i in range(4)]
        settings = dict(prefix_cache_bytes=2**26)
    else:
        warm_up, wave = None, [[3 + i, 9, 4 + 2 * i, 11, 5] for i in range(4)]
        settings = dict(prefix_cache_bytes=0)
    together, engine = run_wave(model_dir, warm_up, wave, params, params[0], **settings)
    assert engine.prefill_forwards < engine.prefill_chunks  # some chunks ran together
    alone = [run_engine(model_dir, ([warm_up] if warm_up else []) + [prompt], p, True, **settings)[0][-1]
             for prompt, p in zip(wave, params)]
    for one, batched in zip(alone, together):
        assert [(e.token_id, e.energy, e.firing_rate_per_layer) for e in batched.events] == \
               [(e.token_id, e.energy, e.firing_rate_per_layer) for e in one.events]
        assert batched.events[-1].usage.energy == one.events[-1].usage.energy
        assert batched.events[-1].usage.cached_tokens == one.events[-1].usage.cached_tokens == (60 if cached else 0)
    assert len({tuple(c.tokens) for c in together}) > 1


def test_a_long_prompt_is_prefilled_between_the_decode_steps_of_running_streams(model_dir):
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    engine = Engine(model, tokenizer, threads=1, step_tokens=64, prefix_cache_bytes=0)
    engine.start()
    try:
        streams = [Collector() for _ in range(2)]
        sequences = [engine.submit([3 + i, 4, 5], SamplingParams(max_tokens=2000, temperature=0), stream)
                     for i, stream in enumerate(streams)]
        while min(len(s.events) for s in streams) < 3:
            time.sleep(0.01)
        long_one = Collector()
        submitted = time.monotonic()
        engine.submit([3 + i % 15 for i in range(2000)], SamplingParams(max_tokens=1, temperature=0), long_one)
        assert long_one.done.wait(120)
        for sequence in sequences:
            engine.cancel(sequence)
    finally:
        engine.stop()
    first_token = long_one.times[0]
    for stream in streams:
        during = [t for t in stream.times if submitted < t < first_token]
        # (2000 tokens) / (64 - 2 per step) = 33 chunks: a stream token between each, not one long pause
        assert len(during) >= 2000 // 62 - 2


def test_metrics_show_prefix_cache_hits_and_latency_histograms(model_dir):
    with running_server(model_dir, max_prompt_tokens=1000) as base:
        system = "You are the Prince of Denmark. Answer in verse. " * 8
        for question in ("To be?", "Or not?", "Which?"):
            body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                    "max_tokens": 5, "temperature": 0}
            response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
        assert response["usage"]["prompt_tokens_details"]["cached_tokens"] > len(system)
        assert metric(base, "spikelm_prefix_cache_hits_total") >= 1
        assert metric(base, "spikelm_prefix_cache_hit_tokens_total") > len(system)
        assert metric(base, "spikelm_prefix_cache_bytes") > 0
        assert metric(base, "spikelm_time_to_first_token_seconds_count") == 3
        assert metric(base, "spikelm_inter_token_latency_seconds_count") == 3 * 4
        assert metric(base, "spikelm_energy_pj_per_token_count") == 3
