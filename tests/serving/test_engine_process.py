"""The engine in a process of its own, without HTTP: the same events as the engine in a thread, its bound,
cancelling, figures, and a clear error when the model cannot be loaded."""

import threading

import pytest

from helpers import save_tiny_model
from spikelm.errors import SpikeLMError
from spikelm.loading import load_model_and_tokenizer
from spikelm.serving.engine import Engine, EngineBusy, SamplingParams
from spikelm.serving.engine_process import EngineProcess

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("engine-process") / "tiny")


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.finish_reason is not None or event.error:
            self.done.set()


def run_requests(engine, requests):
    collectors = [Collector() for _ in requests]
    for (prompt, params), collector in zip(requests, collectors):
        engine.submit(prompt, params, collector)
    for collector in collectors:
        assert collector.done.wait(120)
    return [c.events for c in collectors]


def test_the_process_sends_the_events_the_thread_sends(model_dir):
    """Token ids, text, per-token energy and usage: equal, request by request, greedy and seeded sampling."""
    requests = [([5, 6, 7], SamplingParams(max_tokens=12, temperature=0)),
                ([9, 10, 11, 12], SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=3)),
                ([20], SamplingParams(max_tokens=5, temperature=0, stop=["e"]))]
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    in_thread = Engine(model, tokenizer, threads=1)
    in_thread.start()
    try:
        expected = run_requests(in_thread, requests)
    finally:
        in_thread.stop()
    in_process = EngineProcess(str(model_dir), threads=1)
    in_process.start()
    try:
        got = run_requests(in_process, requests)
    finally:
        in_process.stop()
    assert not in_process.alive
    for want, have in zip(expected, got):
        assert [(e.token_id, e.text, e.energy, e.pj, e.gpt2_pj, e.finish_reason) for e in have] == \
               [(e.token_id, e.text, e.energy, e.pj, e.gpt2_pj, e.finish_reason) for e in want]
        assert have[-1].usage.energy == want[-1].usage.energy
        assert have[-1].usage.summary == want[-1].usage.summary


def test_bound_cancel_and_figures(model_dir):
    engine = EngineProcess(str(model_dir), max_batch=1, max_queue=1, threads=1)
    engine.start()
    try:
        assert engine.config.vocab_size > 0
        long_one, waiting = Collector(), Collector()
        running = engine.submit([5, 6], SamplingParams(max_tokens=100_000, temperature=0), long_one)
        queued = engine.submit([7], SamplingParams(max_tokens=3, temperature=0), waiting)
        with pytest.raises(EngineBusy):  # one slot, one queue place: the third is refused at once
            engine.submit([8], SamplingParams(max_tokens=3, temperature=0), Collector())
        while not long_one.events:
            threading.Event().wait(0.01)
        figures = engine.figures()
        assert (figures["active"], figures["waiting"], figures["max_batch"]) == (1, 1, 1)
        engine.cancel(running)  # frees the slot: the queued request runs and finishes
        assert waiting.done.wait(60) and waiting.events[-1].finish_reason == "length"
        assert len(waiting.events) == 3
        assert engine.figures()["cancelled"] == 1
        assert not long_one.done.is_set()  # a cancelled request hears nothing more
        engine.cancel(queued)  # already finished: nothing happens
    finally:
        engine.stop()


def test_shutdown_ends_open_requests_with_a_retryable_error(model_dir):
    engine = EngineProcess(str(model_dir), threads=1)
    engine.start()
    collector = Collector()
    engine.submit([5], SamplingParams(max_tokens=100_000, temperature=0), collector)
    while not collector.events:
        threading.Event().wait(0.01)
    engine.stop()
    assert collector.done.is_set()
    last = collector.events[-1]
    assert last.error and last.retryable and "shutting down" in last.error


def test_a_directory_without_a_model_is_a_clear_error(tmp_path):
    engine = EngineProcess(str(tmp_path), threads=1)
    with pytest.raises(SpikeLMError, match="no saved model in"):
        engine.start()
    assert not engine.alive


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model_dir = save_tiny_model(tmp_path / "corrupt")
    weights = next(model_dir.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    engine = EngineProcess(str(model_dir), threads=1)
    with pytest.raises(SpikeLMError, match="could not load the model") as error:
        engine.start()
    assert str(model_dir) in str(error.value) and not engine.alive


def test_the_command_runs_the_engine_in_a_process_unless_told_otherwise():
    import argparse

    from spikelm.cli import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    assert serve.settings_from(parser.parse_args(["--model", "m"])).engine_process
    assert not serve.settings_from(parser.parse_args(["--model", "m", "--engine-in-thread"])).engine_process
