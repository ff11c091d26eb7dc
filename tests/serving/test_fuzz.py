"""A schema fuzz run: schemathesis generates requests from the server's own /openapi.json (valid ones and
ones that break the schema) and sends them to the real server over HTTP. No request may get a 5xx.

Bounded to run in CI within a minute: a few dozen examples per operation, tiny generations.
"""

import collections

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from helpers import save_tiny_model
from serving_helpers import metric, running_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    model_dir = save_tiny_model(tmp_path_factory.mktemp("fuzz") / "tiny")
    # small limits keep each generated request cheap; requests over them must get a clear 400, not a 5xx
    with running_server(model_dir, max_tokens=16, default_max_tokens=4, max_prompt_tokens=256,
                        max_body_bytes=20_000) as base:
        yield base


def _operations(base):
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


# schemathesis's pytest plugin does not load under pytest 9 (it reads a removed attribute), so the cases come
# from its strategies directly, drawn by hypothesis inside one test per generation mode
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_generated_request_gets_a_server_error(fuzzed_server, mode):
    operations = _operations(fuzzed_server)
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    seen = []

    @given(case=st.one_of([op.as_strategy(generation_mode=mode) for op in operations]))
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def send(case):
        response = case.call(base_url=fuzzed_server, timeout=30)
        seen.append((case.path, response.status_code))
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)

    send()
    print(mode, collections.Counter(seen))  # shown with -s
    posted = [status for path, status in seen if path.endswith("completions")]
    assert len(posted) >= 20
    if mode == GenerationMode.POSITIVE:  # schema-valid requests mostly generate; some hit the server's limits
        assert any(status == 200 for status in posted)


def test_the_fuzz_run_left_the_server_healthy(fuzzed_server):
    assert httpx.get(f"{fuzzed_server}/health").json()["status"] == "ok"
    assert 'status="5' not in httpx.get(f"{fuzzed_server}/metrics").text
    assert metric(fuzzed_server, "spikelm_failed_sequences_total") == 0
