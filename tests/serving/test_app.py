"""The HTTP server, end to end: a real uvicorn server on 127.0.0.1, a tiny saved model, real clients."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from helpers import save_tiny_model
from serving_helpers import metric, running_server, stream_completion

pytestmark = pytest.mark.timeout(180)

ENERGY_KEYS = ("energy_joules", "energy_pj_per_token", "energy_ac_per_token", "energy_mac_per_token",
               "energy_firing_rate", "energy_gpt2_pj_per_token", "energy_memory_pj_per_token",
               "energy_total_pj_per_token", "energy_weight_reads_per_token", "energy_gpt2_mac_per_token",
               "energy_gpt2_total_pj_per_token", "energy_gpt2_int8_pj_per_token", "energy_gpt2_int8_total_pj_per_token",
               "energy_ann_twin_ac_per_token", "energy_ann_twin_mac_per_token", "energy_ann_twin_pj_per_token",
               "energy_ann_twin_total_pj_per_token")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("serving") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, max_batch=32, max_queue=16, max_tokens=512, max_prompt_tokens=200,
                        max_body_bytes=50_000) as base:
        yield base


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def extra(obj):
    """An extra key the openai client kept: as model_extra on its pydantic models."""
    return obj.model_extra if hasattr(obj, "model_extra") else obj


# ================================================================ 1. the openai client


def test_openai_completion_carries_text_and_energy(client):
    result = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0)
    choice = result.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("length", "stop")
    usage = result.usage
    assert usage.prompt_tokens == len("To be, or not") and 1 <= usage.completion_tokens <= 12
    energy = extra(usage)
    for key in ENERGY_KEYS:
        assert energy[key] > 0, key
    assert energy["energy_joules"] == pytest.approx(energy["energy_pj_per_token"] * usage.completion_tokens * 1e-12)
    assert energy["energy_total_pj_per_token"] == pytest.approx(energy["energy_pj_per_token"]
                                                                + energy["energy_memory_pj_per_token"])
    assert energy["energy_gpt2_int8_pj_per_token"] < energy["energy_gpt2_pj_per_token"]  # int8 prices
    # the spiking model should be cheaper than the same-shape GPT-2 doing the same work
    assert 0 < energy["energy_ratio_to_gpt2"] < 5


def test_openai_streamed_completion_matches_plain_and_sums_energy(client):
    # a first request leaves the prompt's state in the prefix cache: the two compared below both resume there,
    # so they do the same work
    client.completions.create(model="tiny", prompt="Whether 'tis", max_tokens=1, temperature=0)
    plain = client.completions.create(model="tiny", prompt="Whether 'tis", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Whether 'tis", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) == plain.usage.completion_tokens  # one chunk per generated token
    assert "".join(c.choices[0].text for c in text_chunks) == plain.choices[0].text
    per_token = [extra(c.choices[0])["energy"] for c in text_chunks]
    assert all(e["pj"] > 0 and e["ac"] > 0 and 0 < e["firing_rate"] < 1 for e in per_token)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == plain.usage.completion_tokens
    cached = len("Whether 'tis") - 1  # all but the last prompt token, which runs again for its logits
    assert last.usage.prompt_tokens_details.cached_tokens == plain.usage.prompt_tokens_details.cached_tokens == cached
    # the chunks' energies add up to the request's, which equals the same request's without streaming
    total_pj = extra(last.usage)["energy_joules"] * 1e12
    assert sum(e["pj"] for e in per_token) == pytest.approx(total_pj)
    assert total_pj == pytest.approx(extra(plain.usage)["energy_joules"] * 1e12)


def test_openai_chat_plain_and_streamed(client):
    messages = [{"role": "system", "content": "Speak as the Prince."}, {"role": "user", "content": "To be?"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert plain.choices[0].message.role == "assistant"
    assert isinstance(plain.choices[0].message.content, str)
    assert extra(plain.usage)["energy_pj_per_token"] > 0
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(extra(c.choices[0])["energy"]["pj"] > 0 for c in chunks if c.choices)
    assert chunks[-1].choices == [] and extra(chunks[-1].usage)["energy_gpt2_pj_per_token"] > 0


def test_stream_without_usage_ends_with_done(server):
    events, done = stream_completion(server, {"prompt": "Or to take", "max_tokens": 5, "temperature": 0})
    assert done and len(events) == 5 and all(e["choices"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_chunks_are_the_response_schemas_field_for_field(server):
    """The chunks are built as plain dicts (one per token, no model validation): each must be what its
    pydantic schema makes of it, byte for byte (an int where the schema has a float would show)."""
    from spikelm.serving import schemas

    chat = {"messages": [{"role": "user", "content": "To be?"}], "max_tokens": 4, "temperature": 0, "stream": True}
    for path, body, schema in (("/v1/completions", {"prompt": "Or not", "max_tokens": 4, "temperature": 0,
                                                     "stream": True}, schemas.CompletionResponse),
                               ("/v1/chat/completions", chat, schemas.ChatCompletionChunk)):
        with httpx.stream("POST", f"{server}{path}", json=body, timeout=60) as response:
            lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: {")]
        assert len(lines) == 4
        for line in lines:
            assert json.dumps(schema.model_validate_json(line).model_dump()) == json.dumps(json.loads(line))


def test_seeded_sampling_repeats_and_stop_sequences_cut(client):
    kwargs = dict(model="tiny", prompt="The slings", max_tokens=30, temperature=1.0, top_p=0.9)
    first = client.completions.create(seed=7, **kwargs, extra_body={"top_k": 20})
    again = client.completions.create(seed=7, **kwargs, extra_body={"top_k": 20})
    assert first.choices[0].text == again.choices[0].text
    text = client.completions.create(model="tiny", prompt="The slings", max_tokens=30, temperature=0).choices[0].text
    assert len(text) >= 4
    stop = text[2:4]
    cut = client.completions.create(model="tiny", prompt="The slings", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_models_and_health(server):
    models = httpx.get(f"{server}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


# ================================================================ 2. concurrency and determinism


def test_32_concurrent_greedy_streams_equal_each_request_alone(server):
    bodies = [{"prompt": f"Request {i}: to be", "max_tokens": 16 + i % 5, "temperature": 0} for i in range(32)]

    def text_of(body):
        events, done = stream_completion(server, body)
        assert done
        return "".join(e["choices"][0]["text"] for e in events if e["choices"])

    alone = [text_of(body) for body in bodies]
    steps_before = metric(server, "spikelm_decode_steps_total")
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(text_of, bodies))
    steps_batched = metric(server, "spikelm_decode_steps_total") - steps_before
    assert together == alone
    assert len(set(alone)) > 1  # the prompts differ, so should the outputs
    # the decode steps were shared: far fewer than the 32 * ~18 that one-at-a-time decoding takes
    assert steps_batched < sum(b["max_tokens"] for b in bodies) / 3


# ================================================================ 3. bad requests


BAD_REQUESTS = [
    ("malformed JSON", b'{"prompt": "a", ', 400),
    ("not an object", b'["prompt"]', 400),
    ("wrong type", json.dumps({"prompt": 5}).encode(), 400),
    ("wrong type of max_tokens", json.dumps({"prompt": "a", "max_tokens": "many"}).encode(), 400),
    ("missing prompt", json.dumps({"max_tokens": 3}).encode(), 400),
    ("max_tokens 0", json.dumps({"prompt": "a", "max_tokens": 0}).encode(), 400),
    ("max_tokens negative", json.dumps({"prompt": "a", "max_tokens": -5}).encode(), 400),
    ("max_tokens over the limit", json.dumps({"prompt": "a", "max_tokens": 513}).encode(), 400),
    ("prompt over the limit", json.dumps({"prompt": "a" * 201}).encode(), 400),
    ("token id outside the vocabulary", json.dumps({"prompt": [1, 10**6]}).encode(), 400),
    ("temperature below 0", json.dumps({"prompt": "a", "temperature": -0.1}).encode(), 400),
    ("top_p 0", json.dumps({"prompt": "a", "top_p": 0}).encode(), 400),
    ("n 2", json.dumps({"prompt": "a", "n": 2}).encode(), 400),
    ("unknown model", json.dumps({"prompt": "a", "model": "gpt-5"}).encode(), 404),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', 400),
    ("empty body", b"", 400),
    ("huge body", json.dumps({"prompt": "a" * 60_000}).encode(), 413),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 413),
    ("deep nesting, small", b"[" * 20_000 + b"]" * 20_000, 400),
]

BAD_CHAT_REQUESTS = [
    ("empty messages", {"messages": []}, 400),
    ("missing messages", {"max_tokens": 3}, 400),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("content of the wrong type", {"messages": [{"role": "user", "content": 12}]}, 400),
    ("max_tokens 0", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
]


def _assert_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and isinstance(error["message"], str)
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("name,body,status", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_completion_requests_get_4xx(server, name, body, status):
    response = httpx.post(f"{server}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                          timeout=30)
    _assert_openai_error(response, status)


@pytest.mark.parametrize("name,body,status", BAD_CHAT_REQUESTS, ids=[r[0] for r in BAD_CHAT_REQUESTS])
def test_bad_chat_requests_get_4xx(server, name, body, status):
    _assert_openai_error(httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30), status)


def test_unknown_route_and_method_get_openai_errors(server):
    _assert_openai_error(httpx.get(f"{server}/v1/nothing"), 404)
    _assert_openai_error(httpx.get(f"{server}/v1/completions"), 405)


def test_server_healthy_after_bad_requests(server, client):
    for _, body, _ in BAD_REQUESTS:
        httpx.post(f"{server}/v1/completions", content=body, timeout=30)
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    # greedy: sampled at temperature 1, the random model drew its end-of-text token now and then (1 token, "stop")
    completion = client.completions.create(model="tiny", prompt="a", max_tokens=2, temperature=0)
    assert completion.usage.completion_tokens == 2 and completion.choices[0].finish_reason == "length"
    assert 'status="500"' not in httpx.get(f"{server}/metrics").text


# ================================================================ 4. a client that goes away


def test_disconnected_client_frees_its_slot_while_others_continue(server):
    cancelled_before = metric(server, "spikelm_cancelled_sequences_total")
    long_body = {"prompt": "Long: to be", "max_tokens": 500, "temperature": 0}
    results = {}

    def finish_stream(key):
        results[key] = stream_completion(server, long_body)

    others = [threading.Thread(target=finish_stream, args=(k,)) for k in range(2)]
    for thread in others:
        thread.start()
    with httpx.Client(timeout=60) as quitter:
        with quitter.stream("POST", f"{server}/v1/completions", json={**long_body, "stream": True}) as response:
            received = 0
            for line in response.iter_lines():
                received += line.startswith("data: ")
                if received == 3:
                    break  # leave mid-stream: closing the response drops the connection
    deadline = time.monotonic() + 20
    while metric(server, "spikelm_cancelled_sequences_total") == cancelled_before:
        assert time.monotonic() < deadline, "the server did not notice the disconnect"
        time.sleep(0.05)
    active_after_cancel = metric(server, "spikelm_active_sequences")
    for thread in others:
        thread.join(120)
    assert active_after_cancel <= 2  # the quitter's slot is free; the other two may still be running
    for events, done in results.values():  # the others finished their whole generation
        assert done and sum(1 for e in events if e["choices"]) == 500
    assert metric(server, "spikelm_active_sequences") == 0


# ================================================================ 5. API key, and a full server


def test_api_key_required_when_set(model_dir):
    with running_server(model_dir, api_key="s3cret") as base:
        body = {"prompt": "a", "max_tokens": 2, "temperature": 0}  # greedy: no end-of-text token drawn by chance
        _assert_openai_error(httpx.post(f"{base}/v1/completions", json=body), 401)
        _assert_openai_error(httpx.post(f"{base}/v1/completions", json=body,
                                        headers={"Authorization": "Bearer wrong"}), 401)
        _assert_openai_error(httpx.get(f"{base}/v1/models"), 401)
        ok = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2).choices[0].message is not None
        assert httpx.get(f"{base}/health").status_code == 200  # health stays open for probes


def test_full_server_answers_503_with_retry_after(model_dir):
    with running_server(model_dir, max_batch=1, max_queue=1) as base:
        long_body = {"prompt": "busy", "max_tokens": 400, "temperature": 0, "stream": True}
        holders = [httpx.Client(timeout=60) for _ in range(2)]
        streams = [h.stream("POST", f"{base}/v1/completions", json=long_body) for h in holders]
        responses = [s.__enter__() for s in streams]  # one in the slot, one in the queue
        try:
            deadline = time.monotonic() + 20
            while metric(base, "spikelm_queue_depth") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            refused = httpx.post(f"{base}/v1/completions", json={"prompt": "a", "max_tokens": 2})
            _assert_openai_error(refused, 503)
            assert int(refused.headers["Retry-After"]) >= 1
        finally:
            for stream, holder in zip(streams, holders):
                stream.__exit__(None, None, None)
                holder.close()
        assert all(r.status_code == 200 for r in responses)
        deadline = time.monotonic() + 20
        while metric(base, "spikelm_active_sequences") + metric(base, "spikelm_queue_depth") > 0:
            assert time.monotonic() < deadline, "abandoned requests kept their slot"
            time.sleep(0.05)
        ok = httpx.post(f"{base}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200
