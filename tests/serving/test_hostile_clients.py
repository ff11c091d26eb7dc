"""The server against hostile or careless clients (issue 10's defects 1 to 11), over real HTTP on 127.0.0.1.

Each test names the defect it shows fixed; each failed on the server before the fix.
"""

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import spikelm.serving.app as app_module
import spikelm.serving.engine as engine_module
from helpers import save_tiny_model
from serving_helpers import metric, running_server, server_handle, stream_completion

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("hostile") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, max_batch=8, max_queue=8, max_tokens=4000, max_prompt_tokens=4000,
                        max_body_bytes=100_000) as base:
        yield base


def post(base, body, path="/v1/completions", **kwargs):
    return httpx.post(f"{base}{path}", json=body, timeout=60, **kwargs)


def raw_post(base, raw: bytes, path="/v1/completions", content_type="application/json"):
    return httpx.post(f"{base}{path}", content=raw, headers={"Content-Type": content_type}, timeout=60)


def error_of(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]


def text_of(events):
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices"))


# ================================================================ 1. one request cannot abort the others


def test_1_a_tiny_temperature_is_raised_and_its_neighbours_finish(server):
    neighbour = {}
    thread = threading.Thread(target=lambda: neighbour.update(result=stream_completion(
        server, {"prompt": "Neighbour", "max_tokens": 200, "temperature": 0})))
    thread.start()
    time.sleep(0.2)
    for temperature in (3.5e-309, 1e-300, 0.001):
        tiny = post(server, {"prompt": "To be", "max_tokens": 8, "temperature": temperature})
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["usage"]["completion_tokens"] == 8
    thread.join(120)
    events, done = neighbour["result"]
    assert done and all("error" not in e for e in events)
    assert sum(1 for e in events if e["choices"]) == 200


def test_1_a_failure_while_sampling_one_row_fails_that_sequence_alone(model_dir):
    """Below the HTTP layer on purpose: with the clamp, no request can make sampling fail any more."""
    model, tokenizer = app_module.load_model_and_tokenizer(str(model_dir))
    engine = engine_module.Engine(model, tokenizer, max_batch=4, threads=1)
    engine.start()
    try:
        events = {"good": [], "bad": []}
        finished = {name: threading.Event() for name in events}

        def listener(name):
            def on_event(event):
                events[name].append(event)
                if event.finish_reason is not None:
                    finished[name].set()
            return on_event

        ids = tokenizer("To be, or not")["input_ids"]
        engine.submit(ids, engine_module.SamplingParams(max_tokens=40, temperature=0), listener("good"))
        # an unclamped tiny temperature: logits / 3.5e-309 overflow, and torch.multinomial raises
        engine.submit(ids, engine_module.SamplingParams(max_tokens=40, temperature=3.5e-309, top_p=0.5),
                      listener("bad"))
        assert finished["good"].wait(60) and finished["bad"].wait(60)
    finally:
        engine.stop()
    assert events["bad"][-1].error and events["bad"][-1].finish_reason == "error"
    assert "probability" not in events["bad"][-1].error  # torch's words stay in the log
    good = events["good"]
    assert not any(e.error for e in good) and good[-1].finish_reason == "length" and len(good) == 40
    assert engine.failed_total == 1


# ================================================================ 2. a plain request whose client left


def test_2_a_non_streaming_client_that_times_out_frees_its_slot(server):
    cancelled = metric(server, "spikelm_cancelled_sequences_total")
    steps = metric(server, "spikelm_decode_steps_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json={"prompt": "Patience", "max_tokens": 3000, "temperature": 0},
                   timeout=httpx.Timeout(60, read=0.3))
    deadline = time.monotonic() + 10
    while metric(server, "spikelm_cancelled_sequences_total") == cancelled:
        assert time.monotonic() < deadline, "the server did not notice that the client left"
        time.sleep(0.05)
    assert metric(server, "spikelm_active_sequences") + metric(server, "spikelm_prefilling_sequences") == 0
    assert metric(server, "spikelm_decode_steps_total") - steps < 3000  # it did not run to max_tokens


# ================================================================ 3. 500s that are 4xx (or 200)


def test_3_inputs_that_raised_inside_the_server_get_a_clear_answer(server):
    # null max_tokens: the default (16) instead of a TypeError
    nulled = post(server, {"prompt": "To be", "max_tokens": None, "temperature": 0})
    assert nulled.status_code == 200 and nulled.json()["usage"]["completion_tokens"] <= 16
    # an integer literal over Python's 4,300-digit limit
    huge = b'{"prompt": "a", "seed": ' + b"7" * 5000 + b"}"
    assert "too many digits" in error_of(raw_post(server, huge), 400)["message"]
    # a lone surrogate in a prompt, a chat message and a stop sequence
    for path, raw in [("/v1/completions", b'{"prompt": "a\\ud800b"}'),
                      ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
                      ("/v1/completions", b'{"prompt": "a", "stop": ["\\ud83d"]}')]:
        assert "surrogate" in error_of(raw_post(server, raw, path), 400)["message"]
    # a surrogate pair is one character and fine
    assert raw_post(server, b'{"prompt": "\\ud83d\\ude00", "max_tokens": 2}').status_code == 200


# ================================================================ 4 and 10. a 500: counted, logged once, no internals


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_4_10_an_unexpected_error_is_one_counted_logged_500_without_its_text(server, monkeypatch):
    def broken(raw, model_class):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app_module, "parse_json", broken)  # a bug, as a handler would hit it
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("spikelm.serving", "uvicorn.error", "uvicorn")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        response = post(server, {"prompt": "a", "max_tokens": 2})
    finally:
        for logger in loggers:
            logger.removeHandler(records)
    error = error_of(response, 500)
    request_id = response.headers["x-request-id"]
    assert request_id in error["message"] and "secret" not in response.text and error["type"] == "server_error"
    assert 'spikelm_requests_total{endpoint="/v1/completions",status="500"} 1.0' in \
        httpx.get(f"{server}/metrics").text
    with_traceback = [r for r in records.records if r.exc_info]
    assert len(with_traceback) == 1 and request_id in with_traceback[0].getMessage()


def test_10_an_engine_failure_reaches_the_client_as_a_generic_message_with_the_request_id(model_dir, monkeypatch):
    def broken(logits, params, generator):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0 (secret)")

    monkeypatch.setattr(engine_module, "sample_next", broken)
    # the patched sampler reaches an engine in this process only: the engine runs in the server's thread here
    with running_server(model_dir, engine_process=False) as base:
        response = post(base, {"prompt": "a", "max_tokens": 2})
        error = error_of(response, 500)
        assert response.headers["x-request-id"] in error["message"] and "secret" not in response.text
        events, done = stream_completion(base, {"prompt": "a", "max_tokens": 2})
        assert done and "error" in events[-1] and "secret" not in json.dumps(events)


def test_10_a_dead_engine_process_fails_its_requests_and_health_turns_503(model_dir):
    """The engine's own process killed mid-stream (as the OOM killer would): the open stream ends in an error
    chunk and [DONE], a waiting plain request gets a 500, /health says 503, and new requests get 503."""
    with server_handle(model_dir, max_batch=1, max_tokens=4000) as handle:
        base = handle.base
        results = {}
        streaming = threading.Thread(target=lambda: results.update(stream=stream_completion(
            base, {"prompt": "Long", "max_tokens": 4000, "temperature": 0})))
        streaming.start()
        while metric(base, "spikelm_active_sequences") < 1:
            time.sleep(0.05)
        queued = threading.Thread(target=lambda: results.update(plain=post(base, {"prompt": "b", "max_tokens": 5})))
        queued.start()
        while metric(base, "spikelm_queue_depth") < 1:
            time.sleep(0.05)
        handle.app.state.engine._process.kill()
        streaming.join(30)
        queued.join(30)
        events, done = results["stream"]
        assert done and "error" in events[-1]
        assert "engine process stopped" in events[-1]["error"]["message"]
        error = error_of(results["plain"], 500)
        assert results["plain"].headers["x-request-id"] in error["message"]
        assert httpx.get(f"{base}/health", timeout=10).status_code == 503
        refused = post(base, {"prompt": "c", "max_tokens": 2})
        assert "engine process has stopped" in error_of(refused, 503)["message"]


def test_10_a_broken_chat_template_is_a_400_without_jinja_internals(tmp_path):
    model_dir = save_tiny_model(tmp_path / "templated")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversations "
                               "must start with a user message') }}{% endif %}{{ messages[0]['content'] | "
                               "int(no_such_argument=1) }}")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with running_server(model_dir) as base:
        refused = post(base, {"messages": [{"role": "assistant", "content": "hi"}]}, "/v1/chat/completions")
        assert "Conversations must start with a user message" in error_of(refused, 400)["message"]
        broken = post(base, {"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions")
        message = error_of(broken, 400)["message"]
        assert broken.headers["x-request-id"] in message and "no_such_argument" not in message


# ================================================================ 5 and 6. nulls are defaults; no option is dropped


def test_5_null_means_the_default(server):
    nulls = dict(temperature=None, top_p=None, n=None, stream=None, presence_penalty=None, frequency_penalty=None,
                 max_tokens=None, top_k=None)
    plain = post(server, {"prompt": "To be", "max_tokens": 16, "temperature": 1.0, "seed": 3})
    nulled = post(server, {"prompt": "To be", "seed": 3, **nulls})
    assert nulled.status_code == 200 and nulled.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    chat = post(server, {"messages": [{"role": "user", "content": "hi"}], **nulls}, "/v1/chat/completions")
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "a", "logprobs": 0}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "a", "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, None),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"100000": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"x": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
])
def test_6_options_the_server_cannot_honour_are_refused_by_name(server, path, body, param):
    error = error_of(post(server, body, path), 400)
    assert error["param"] == param
    assert (param or "stream_options") in error["message"]


def test_6_logit_bias_is_applied(server, model_dir):
    from transformers import AutoTokenizer

    q = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("q")
    biased = post(server, {"prompt": "To be", "max_tokens": 6, "temperature": 0, "logit_bias": {str(q): 100}})
    assert biased.json()["choices"][0]["text"] == "q" * 6
    sampled = post(server, {"prompt": "To be", "max_tokens": 6, "seed": 1, "logit_bias": {str(q): 100}})
    assert sampled.json()["choices"][0]["text"] == "q" * 6


# ================================================================ 7. only JSON, only our own host names


def test_7_only_json_bodies_and_our_own_host(server):
    body = json.dumps({"prompt": "a", "max_tokens": 2}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        assert error_of(raw_post(server, body, content_type=content_type), 415)["code"] == "unsupported_media_type"
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert raw_post(server, body, content_type=content_type).status_code == 200
    port = server.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io"):
        rebound = post(server, {"prompt": "a", "max_tokens": 2}, headers={"Host": host})
        assert error_of(rebound, 400)["code"] == "invalid_host"
    assert post(server, {"prompt": "a", "max_tokens": 2}, headers={"Host": f"localhost:{port}"}).status_code == 200
    cross = post(server, {"prompt": "a", "max_tokens": 2}, headers={"Origin": "http://attacker.example"})
    assert error_of(cross, 403)["code"] == "cross_origin"
    same = post(server, {"prompt": "a", "max_tokens": 2}, headers={"Origin": f"http://127.0.0.1:{port}"})
    assert same.status_code == 200


def test_7_a_configured_host_name_is_accepted(model_dir):
    with running_server(model_dir, allowed_hosts=["spikelm.internal"]) as base:
        ok = post(base, {"prompt": "a", "max_tokens": 2}, headers={"Host": "spikelm.internal:8000"})
        assert ok.status_code == 200
        assert post(base, {"prompt": "a", "max_tokens": 2}, headers={"Host": "other.internal"}).status_code == 400


# ================================================================ 8. the queue bound is exact


def test_8_a_sequence_in_prefill_holds_its_slot(model_dir):
    with running_server(model_dir, max_batch=1, max_queue=1, max_prompt_tokens=40000, max_tokens=400) as base:
        long_prompt = [3 + i % 15 for i in range(40000)]  # its prefill takes seconds, however fast the machine
        held = {}
        holder = threading.Thread(target=lambda: held.update(
            response=post(base, {"prompt": long_prompt, "max_tokens": 300})))
        holder.start()
        time.sleep(0.5)  # the long request is in, and in its prefill
        with ThreadPoolExecutor(2) as pool:
            statuses = sorted(r.status_code for r in pool.map(
                lambda i: post(base, {"prompt": f"late {i}", "max_tokens": 2}), range(2)))
        holder.join(120)
        assert held["response"].status_code == 200
        assert statuses == [200, 503]  # one waits in the queue, the other finds slot and queue taken


# ================================================================ 9. slow bodies, connection cap, stalled readers


def _connect(base, receive_buffer=None):
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((host, int(port)))
    sock.settimeout(10)
    return sock


def _read_all(sock, limit_s=15) -> bytes:
    data, deadline = b"", time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            part = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not part:
            break
        data += part
    return data


def test_9_a_body_that_trickles_is_cut_with_408(model_dir):
    with running_server(model_dir, body_read_timeout_s=0.5) as base:
        sock = _connect(base)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        started = time.monotonic()
        reply = _read_all(sock, limit_s=10)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
        assert post(base, {"prompt": "a", "max_tokens": 2}).status_code == 200


def test_9_connections_beyond_the_cap_get_503(model_dir):
    with running_server(model_dir, max_batch=2, max_connections=4) as base:
        idle = [_connect(base) for _ in range(4)]
        time.sleep(0.2)
        try:
            assert httpx.get(f"{base}/health", timeout=10).status_code == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200


def test_9_a_stream_nobody_reads_is_dropped_and_its_slot_freed(model_dir):
    with server_handle(model_dir, stream_stall_timeout_s=1.0, max_tokens=20_000) as handle:
        base = handle.base
        cancelled = metric(base, "spikelm_cancelled_sequences_total")
        sock = _connect(base, receive_buffer=4096)
        time.sleep(0.2)
        # small buffers on the server's side of this connection too, so that they fill in seconds, not minutes
        for connection in list(handle.server.server_state.connections):
            connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            connection.transport.set_write_buffer_limits(high=4096)
        body = json.dumps({"prompt": "Stalled", "max_tokens": 20_000, "temperature": 0, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 60  # the buffers fill, a send waits over 1 s, the server drops us
        while metric(base, "spikelm_cancelled_sequences_total") == cancelled:
            assert time.monotonic() < deadline, "the stalled stream kept its slot"
            time.sleep(0.2)
        assert metric(base, "spikelm_active_sequences") == 0
        received = _read_all(sock)
        sock.close()
        assert received.startswith(b"HTTP/1.1 200") and b"[DONE]" not in received  # cut, and closed


# ================================================================ 11. shutdown: drain, then an error chunk and [DONE]


def test_11_shutdown_drains_then_ends_streams_with_an_error_and_done(model_dir):
    with server_handle(model_dir, shutdown_timeout_s=1.0, max_tokens=20_000) as handle:
        body = {"prompt": "Until the end", "max_tokens": 20_000, "temperature": 0, "stream": True}
        lines, shutdown_at, done_at = [], None, None
        with httpx.stream("POST", f"{handle.base}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                lines.append((time.monotonic(), line))
                if len(lines) == 5:
                    shutdown_at = time.monotonic()
                    handle.shut_down()
                if line == "data: [DONE]":
                    done_at = time.monotonic()
        handle.thread.join(20)
    assert done_at is not None, "the stream was closed without [DONE]"
    error = json.loads(lines[-2][1][len("data: "):])
    assert "shutting down" in error["error"]["message"]
    drained = [line for at, line in lines[5:-2]]
    assert drained and all(json.loads(line[6:])["choices"] for line in drained)  # tokens kept coming
    assert 0.8 <= done_at - shutdown_at < 5  # after the drain time, before uvicorn's own deadline
