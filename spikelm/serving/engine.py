"""The generation engine: one thread batches the decode steps of every active sequence.

No web framework here: requests come in as token ids and sampling parameters, and go out as events (a token's
text, the energy of the forward pass that made it, and at the end the request's usage) through a callback.

How a request flows:
    submit() -> a bounded waiting queue -> the engine thread gives it a free slot (max_batch), resumes it from
    the longest cached prefix of its prompt (prefix_cache.py) and prefills the rest in chunks: each step runs
    ONE batched decode forward over the last token of every active sequence (the recurrent form: a fixed-size
    state per sequence), then spends what is left of the step's token budget (step_tokens) on prompt chunks,
    each sequence's chunk in a forward of its own. A long prompt therefore delays the active streams by one
    chunk per step, never by its whole prefill (the chunked prefill of Sarathi-Serve, Agrawal et al. 2024).
    A prompt leaves a snapshot of its state in the prefix cache one token before its end; its last token then
    runs as a row of the next decode step (a one-token step, as it would alone: the same numbers, without a
    forward of its own), which samples its first token, and it stays in the batch. Each row is sampled with the
    sequence's own generator; a failure while sampling one row fails that sequence alone. A finished or
    cancelled sequence leaves the batch through `batch_select_indices`. The events of a forward go out
    together once its rows are sampled, so that the listener (the HTTP app's event loop) wakes once per step.

Determinism. A spike is a threshold: a rounding difference of one ulp can flip it, and a flipped spike changes
everything after it. Matrix kernels sum in an order that depends on the batch size (a matrix-vector product
for one row, blocked matrix products for many), so with them a float32 sequence's numbers would depend on what
else is in the batch. The engine therefore switches its model's spike-fed matrices to the event-driven
gather-sum (`spikelm.event_driven.set_batch_invariant`): each output row adds the weight rows of its own firing
inputs one by one, in input order, whatever the other rows are; norms, neurons and the attention update work
row by row. A sequence then gets the same numbers alone or in a batch of 32, in float32 (the default) or
float64 (tests/serving/test_app.py checks it).

Energy. spikelm.energy's counter keeps every count per batch row, so a sequence's counts in a batched step
equal what count_energy counts for that sequence alone (tests/serving/test_engine.py checks it). The prompt is
counted in its own forwards (only the tokens that ran: a cached prefix costs nothing).
"""

import collections
import functools
import itertools
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from ..energy import (E_AC_PJ, E_MAC_PJ, CounterSwitch, EnergyCounter, EnergyCounts, Prices, count_energy,
                      gpt2_reference_counts, summarise)
from ..event_driven import set_batch_invariant
from ..modeling_spikelm import SpikeLMCache
from .prefix_cache import PrefixStateCache

logger = logging.getLogger("spikelm.serving")


class EngineBusy(Exception):
    """Every slot is taken and the waiting queue is full: try again later."""


class EngineStopped(Exception):
    """The engine is shutting down."""


# ================================================================ requests, sampling, text


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no cut
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample_next(logits, params: SamplingParams, generator) -> int:
    """One token id from logits [V] with the sequence's own generator."""
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
        logits = logits.index_add(0, ids, torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype))
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first token always stays)
        drop = (cumulative - torch.softmax(sorted_logits, -1)) >= params.top_p
        drop[0] = False  # rounding can push the first one's "before" above a tiny top_p: it stays regardless
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


class Detokenizer:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, and the ids after which the text so far is final.

    Where the tokenizer's decoder turns each token (a run of byte tokens: each run) into text on its own and
    joins the texts (Replace and ByteFallback, then Fuse: spikelm's SentencePiece tokenizers; or Fuse alone),
    the text of ids[:k] is a prefix of every later text once ids[k - 1] is an ordinary token: not a byte token
    (a run of them decodes as one, or as U+FFFDs when it is not UTF-8) and not an added one (a skipped special
    token joins the byte runs around it). Other decoders get no such ids (Metaspace drops the first token's
    space, ByteLevel joins bytes across tokens, cleaning up spaces looks across tokens): their streams decode
    every id at every token, as before."""

    JOINED_PER_TOKEN = ("Replace", "ByteFallback")  # decoders that map each token (each byte run) alone

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.piece_ends = self._piece_ends(tokenizer)
        self._pieces: dict[int, str] = {}  # an ordinary token's own text

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        """The text an id in piece_ends adds after a final text."""
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[token_id] = self.decode([token_id])
        return text

    @classmethod
    def _piece_ends(cls, tokenizer) -> frozenset[int]:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or backend.decoder is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
            return frozenset()
        decoder = json.loads(backend.to_str())["decoder"]
        steps = [step["type"] for step in (decoder["decoders"] if decoder["type"] == "Sequence" else [decoder])]
        if steps[-1:] != ["Fuse"] or any(step not in cls.JOINED_PER_TOKEN for step in steps[:-1]):
            return frozenset()
        added = set(getattr(tokenizer, "added_tokens_decoder", {}))  # special tokens are in the model vocabulary too
        return frozenset(token_id for token, token_id in backend.get_vocab(with_added_tokens=False).items()
                         if token_id not in added and not cls._byte_token(token))

    @staticmethod
    def _byte_token(token: str) -> bool:
        """ByteFallback's shape of a byte token, "<0x41>"."""
        return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


class TextStream:
    """Turns generated ids into text deltas: the text is always what decoding all generated ids together gives
    (SentencePiece drops a word's leading space when a token is decoded alone), built from the final text so
    far and the ids after it (Detokenizer); sends the new suffix; holds back text ending in U+FFFD (an
    incomplete multi-byte character) and text that may be the start of a stop sequence."""

    def __init__(self, detokenizer: Detokenizer, stops: list[str]):
        self.detokenizer = detokenizer
        self.stops = stops
        self.longest_stop = max((len(s) for s in stops), default=0)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of self.text already handed out
        self.final_ids = 0  # ids whose text no later id changes: the first final_chars characters of self.text
        self.final_chars = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (new text to send, whether a stop sequence was reached)."""
        self.ids.append(token_id)
        ends_piece = token_id in self.detokenizer.piece_ends
        if ends_piece and self.final_ids == len(self.ids) - 1:  # the usual token: its own text, decoded once
            tail = self.detokenizer.piece(token_id)
        else:
            tail = self.detokenizer.decode(self.ids[self.final_ids:])
        self.text = self.text[:self.final_chars] + tail
        if ends_piece:
            self.final_ids, self.final_chars = len(self.ids), len(self.text)
        start = max(0, self.sent - self.longest_stop)
        hits = [p for p in (self.text.find(s, start) for s in self.stops) if p >= 0]
        if hits:
            end = max(min(hits), self.sent)
            self.text = self.text[:end]
            return self._take(end), True
        safe = len(self.text)
        while safe > self.sent and self.text[safe - 1] == "\ufffd":
            safe -= 1
        for stop in self.stops:  # the longest tail of the text that could grow into a stop sequence
            for length in range(min(len(stop) - 1, safe - self.sent), 0, -1):
                if self.text[safe - length:safe] == stop[:length]:
                    safe -= length
                    break
        return self._take(safe), False

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, end):
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta

    @property
    def sent_text(self) -> str:
        return self.text[:self.sent]


@dataclass
class RequestUsage:
    prompt_tokens: int
    completion_tokens: int
    energy: EnergyCounts  # the whole request: prompt forward + every decode step
    tokens_processed: int  # tokens that went through the model
    cached_tokens: int  # prompt tokens resumed from the prefix cache (not processed)
    pj: float
    gpt2_pj: float  # the same-shape GPT-2 processing the same tokens (with a KV cache)
    summary: dict  # spikelm.energy.summarise per generated token: memory traffic, totals, every reference


@dataclass
class SequenceEvent:
    """What the engine tells a request: a token (its text delta and energy), and at the end why it finished
    and the request's usage; or an error."""

    text: str = ""
    token_id: int | None = None
    energy: EnergyCounts | None = None
    pj: float = 0.0
    firing_rate_per_layer: dict[str, float] | None = None  # of the forward pass that made the token
    gpt2_pj: float = 0.0  # the same-shape GPT-2 doing that forward pass's work (with a KV cache)
    finish_reason: str | None = None  # "stop", "length"; None while generating
    usage: RequestUsage | None = None
    error: str | None = None
    retryable: bool = False  # the error is the server shutting down, not this request's fault or the model's


class Sequence:
    """One request inside the engine. `on_event` is called from the engine thread."""

    _ids = itertools.count()

    def __init__(self, prompt_ids, params: SamplingParams, on_event, text_stream: TextStream, request_id=None):
        self.id = next(self._ids)
        self.request_id = request_id or f"seq-{self.id}"
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_event = on_event
        self.text = text_stream
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.generated: list[int] = []
        self.energy = EnergyCounts()
        self.tokens_processed = 0
        self.cancelled = False
        self.finished = False
        self.submitted_at = time.monotonic()
        # while its prompt is prefilled: its own cache, how many prompt tokens it holds, where to snapshot
        self.cache = None
        self.prefilled = 0
        self.cached_tokens = 0  # prompt tokens resumed from the prefix cache
        self.snapshot_at = 0  # a prompt length at which to keep a snapshot (where it parts from a cached key)
        self.prompt_energy = EnergyCounts()
        self.prompt_layer_spikes: dict[str, float] = {}  # by layer: firing rate x tokens, summed over chunks

    def cancel(self):
        """Called from any thread: the engine drops the sequence at its next step."""
        self.cancelled = True


# ================================================================ the engine


def _failure(sequence) -> SequenceEvent:
    """What a client is told when its generation failed inside the engine (the cause is in the server's log)."""
    return SequenceEvent(error=f"generation failed inside the server (request id {sequence.request_id}); "
                               "its log has the cause", finish_reason="error")


class Engine:
    """Runs a model for many concurrent requests; one background thread does all the model work.

    step_tokens: the tokens one step may process while sequences decode: one per decoding sequence, the rest
    for prompt chunks (at least `min_prefill_chunk` whenever a prompt waits, so that prompts progress under a
    full batch). With nothing decoding, prompts run in chunks of up to `idle_prefill_tokens`.
    prefix_cache_bytes: the budget of the prefix-state cache (0: no cache).
    """

    def __init__(self, model, tokenizer, max_batch=32, max_queue=64, dtype=torch.float32, threads=None,
                 e_ac_pj=E_AC_PJ, e_mac_pj=E_MAC_PJ, step_tokens=64, min_prefill_chunk=16,
                 idle_prefill_tokens=2048, prefix_cache_bytes=64 * 2**20):
        self.model = model.to(dtype).eval()
        set_batch_invariant(self.model)  # per-row sums in a fixed order: batch neighbours change nothing
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer)
        self.config = model.config
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.threads = threads
        self.step_tokens = step_tokens
        self.min_prefill_chunk = min_prefill_chunk
        self.idle_prefill_tokens = max(idle_prefill_tokens, step_tokens)
        self.e_ac_pj, self.e_mac_pj = e_ac_pj, e_mac_pj
        self.prices = Prices(e_ac=e_ac_pj, e_mac=e_mac_pj)  # fp32 memory prices (spikelm.energy)
        # a decode step's GPT-2 reference depends on its position alone: every stream at that position shares it
        self._gpt2_pj_of = functools.lru_cache(maxsize=16384)(self._reference_pj)
        eos = {tokenizer.eos_token_id, *(self.config.eos_token_id if isinstance(self.config.eos_token_id, list)
                                         else [self.config.eos_token_id])}
        self.eos_ids = {i for i in eos if i is not None}
        self.prefix_cache = (PrefixStateCache(prefix_cache_bytes, lambda cache: cache.state_size_bytes())
                             if prefix_cache_bytes > 0 else None)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._prefilling: list[Sequence] = []  # holding a slot while their prompt runs, oldest first
        self._active: list[Sequence] = []
        self._cache = None  # the batched recurrent state of self._active, row i = self._active[i]
        self._counts = CounterSwitch()  # where the model's counting hooks send each forward's counts
        self._outbox: list[tuple[Sequence, SequenceEvent]] = []  # events of the current forward, not yet sent
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = None
        # figures for /metrics
        self.steps = 0
        self.prefill_chunks = 0  # a prompt's chunk each
        self.prefill_forwards = 0  # chunks of one length run together: one forward
        self.last_batch_size = 0
        self.cancelled_total = 0
        self.failed_total = 0

    # ---------------------------------------------------------------- any thread
    def start(self):
        self._thread = threading.Thread(target=self._run, name="spikelm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout=10.0):
        """Stop after the current step; every sequence still in the engine gets a shutdown error event."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompt_ids, params: SamplingParams, on_event, request_id=None) -> Sequence:
        """Queue a request; raises EngineBusy when every slot and the queue are taken."""
        sequence = Sequence(prompt_ids, params, on_event, TextStream(self.detokenizer, params.stop), request_id)
        with self._wakeup:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            # a sequence being prefilled holds a slot too: the bound counts it
            if self.slots_taken + len(self._waiting) >= self.max_batch + self.max_queue:
                raise EngineBusy(f"all {self.max_batch} slots and {self.max_queue} queue places are taken")
            self._waiting.append(sequence)
            self._wakeup.notify_all()
        return sequence

    def cancel(self, sequence: Sequence):
        sequence.cancel()
        with self._wakeup:
            if sequence in self._waiting:  # never started: leave the queue now
                self._waiting.remove(sequence)
                self.cancelled_total += 1
            self._wakeup.notify_all()

    @property
    def slots_taken(self) -> int:
        return len(self._active) + len(self._prefilling)

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def prefilling_count(self) -> int:
        return len(self._prefilling)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def figures(self) -> dict:
        """The live figures /metrics shows, read together."""
        cache = self.prefix_cache
        return dict(waiting=self.waiting_count, active=self.active_count, prefilling=self.prefilling_count,
                    max_batch=self.max_batch, steps=self.steps, prefill_chunks=self.prefill_chunks,
                    prefill_forwards=self.prefill_forwards,
                    cancelled=self.cancelled_total, failed=self.failed_total,
                    prefix_cache=None if cache is None else dict(
                        hits=cache.hits, misses=cache.misses, hit_tokens=cache.hit_tokens,
                        evictions=cache.evictions, bytes=cache.bytes, entries=len(cache)))

    # ---------------------------------------------------------------- the engine thread
    def _run(self):
        if self.threads:
            torch.set_num_threads(self.threads)
        # the counting hooks stay installed while the engine runs; each forward counts into a counter of its own
        with torch.inference_mode(), count_energy(self.model, self._counts):
            while True:
                with self._wakeup:
                    while not self._stopping and not self._waiting and not self.slots_taken:
                        self._wakeup.wait()
                    if self._stopping:
                        break
                self._drop_cancelled()
                self._admit()
                joining = [s for s in self._prefilling if self._joins_decode(s)]
                if self._active or joining:
                    try:
                        self._decode_step(joining)
                    except Exception:  # the batched forward itself failed: its sequences fail, the engine lives
                        logger.exception("decode step failed for requests %s",
                                         [s.request_id for s in self._active])
                        for sequence in self._active:
                            self._fail(sequence)
                        self._active, self._cache = [], None
                    self._deliver()
                # the budget protects decoding streams; with none, a prompt runs in chunks as large as the idle budget
                budget = self.step_tokens - len(self._active) if self._active else self.idle_prefill_tokens
                self._prefill_step(max(budget, self.min_prefill_chunk))
        with self._wakeup:
            left = self._active + self._prefilling + list(self._waiting)
            self._active, self._prefilling, self._cache = [], [], None
            self._waiting.clear()
        for sequence in left:
            self._emit(sequence, SequenceEvent(error="the server is shutting down: retry later",
                                               finish_reason="error", retryable=True))
        self._deliver()

    def _admit(self):
        """Give free slots to waiting sequences, each resumed from the longest cached prefix of its prompt."""
        while self.slots_taken < self.max_batch:
            with self._wakeup:
                if not self._waiting:
                    return
                sequence = self._waiting.popleft()
                if sequence.cancelled:
                    self.cancelled_total += 1
                    continue
                self._prefilling.append(sequence)  # holds its slot from here (the queue bound counts it)
            if self.prefix_cache is not None:
                # at least the last prompt token runs: its logits give the first generated token
                match = self.prefix_cache.lookup(sequence.prompt_ids, limit=len(sequence.prompt_ids) - 1)
                if match.state is not None:
                    sequence.cache, sequence.prefilled = match.state, match.length
                    sequence.cached_tokens = match.length
                if match.length < match.shared < len(sequence.prompt_ids):
                    sequence.snapshot_at = match.shared  # the next prompt with this start resumes here

    def _prefill_step(self, budget: int):
        """Run prompt chunks, oldest prompt first, until `budget` tokens have run. Chunks of one length whose
        prompts all start afresh, or all continue a state, run as one forward: rows are independent, so each
        gets the numbers it gets alone (a wave of requests then costs a few forwards, not one each)."""
        planned = []
        for sequence in self._prefilling:
            if budget <= 0:
                break
            remaining = len(sequence.prompt_ids) - sequence.prefilled
            chunk = min(remaining, budget)
            snapshots = [at for at in self._snapshot_points(sequence) if at > sequence.prefilled]
            if snapshots:  # end the chunk where a snapshot is wanted
                chunk = min(chunk, min(snapshots) - sequence.prefilled)
            budget -= chunk
            planned.append((sequence, chunk))
        groups: dict[tuple[int, bool], list[Sequence]] = {}
        for sequence, chunk in planned:
            groups.setdefault((chunk, sequence.cache is None), []).append(sequence)
        for (chunk, _), group in groups.items():
            for start in range(0, len(group), self.max_batch):
                self._prefill_group(group[start:start + self.max_batch], chunk)

    def _prefill_group(self, group, chunk: int):
        """Prefill the next `chunk` tokens of each sequence in `group` (in one forward; if that fails, each alone,
        so that only a bad request fails), and move the prompts that are done to the decode batch."""
        outcomes = None
        if len(group) > 1:
            try:
                outcomes = self._run_chunks(group, chunk)
            except Exception:
                logger.exception("a batched prefill of %d prompts failed; running them one by one", len(group))
        if outcomes is None:
            outcomes = []
            for sequence in group:
                try:
                    outcomes.append(self._run_chunks([sequence], chunk)[0])
                except Exception:
                    logger.exception("prefill failed for request %s", sequence.request_id)
                    outcomes.append(None)
        for sequence, outcome in zip(group, outcomes):
            try:
                logits = None if outcome is None else self._take_chunk(sequence, chunk, *outcome)
            except Exception:
                logger.exception("prefill failed for request %s", sequence.request_id)
                outcome = None
            if outcome is None:  # a bad request must not take the engine down: it fails alone
                self._prefilling.remove(sequence)
                self._fail(sequence)
                self._deliver()
                continue
            if logits is None:
                continue
            finished = self._accept(sequence, logits, *self._prompt_counts(sequence))
            self._deliver()
            with self._wakeup:  # from prefilling to active in one move: submit() never sees the slot free
                self._prefilling.remove(sequence)
                if not finished:
                    self._cache = sequence.cache if self._cache is None else self._cache.append_rows(sequence.cache)
                    self._active.append(sequence)
            sequence.cache = None

    def _run_chunks(self, group, chunk: int):
        """One forward over the next `chunk` prompt tokens of every sequence in `group` (all fresh, or all
        continuing a state); -> per sequence (its state after, its energy counts and firing rates, its last
        logits). Changes no sequence."""
        ids = torch.tensor([s.prompt_ids[s.prefilled:s.prefilled + chunk] for s in group], dtype=torch.long)
        cache = group[0].cache
        if cache is not None and len(group) > 1:  # their states in one batch (new tensors: theirs stay as they are)
            cache = SpikeLMCache(self.config)
            for sequence in group:
                cache.append_rows(sequence.cache)
        # a resumed prompt continues at its cached length
        counter = self._counts.use(EnergyCounter(positions=[s.prefilled for s in group]))
        output = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        self.prefill_forwards += 1
        states = [output.cache] if len(group) == 1 else \
            output.cache.split_rows([s.prefilled + chunk for s in group])
        return [(state, energy, rates, logits[-1])
                for state, (energy, rates), logits in zip(states, counter.per_row(), output.logits)]

    def _take_chunk(self, sequence, chunk: int, state, energy, rates, logits):
        """Note a chunk that ran; returns the logits once the prompt is done, else None."""
        sequence.cache = state
        sequence.prefilled += chunk
        self._add_prompt_counts(sequence, energy, rates, chunk)
        self.prefill_chunks += 1
        if sequence.prefilled in self._snapshot_points(sequence):
            self.prefix_cache.insert(sequence.prompt_ids[:sequence.prefilled], sequence.cache)
        return logits if sequence.prefilled == len(sequence.prompt_ids) else None

    @staticmethod
    def _add_prompt_counts(sequence, energy: EnergyCounts, rates: dict[str, float], tokens: int):
        sequence.tokens_processed += tokens
        sequence.prompt_energy += energy
        for layer, rate in rates.items():
            sequence.prompt_layer_spikes[layer] = sequence.prompt_layer_spikes.get(layer, 0.0) + rate * tokens

    @staticmethod
    def _prompt_counts(sequence) -> tuple[EnergyCounts, dict[str, float]]:
        """The whole prompt's energy, and its firing rate by layer over its chunks (each layer's neuron steps
        grow with the tokens): what its first token's event carries."""
        rates = {layer: spikes / sequence.tokens_processed for layer, spikes in sequence.prompt_layer_spikes.items()}
        return sequence.prompt_energy, rates

    @staticmethod
    def _joins_decode(sequence) -> bool:
        """Whether the prompt's only token left runs as a row of the decode step: it continues a state, so
        alone it would run as a one-token step too."""
        return sequence.cache is not None and sequence.prefilled == len(sequence.prompt_ids) - 1

    def _snapshot_points(self, sequence) -> tuple[int, ...]:
        """Prompt lengths after which the prefix cache keeps the state: where the prompt parts from a cached
        one, and one token before its end (the last token must run again for its logits, so a repeated
        prompt, or a chat's next turn, resumes there)."""
        if self.prefix_cache is None:
            return ()
        return sequence.snapshot_at, len(sequence.prompt_ids) - 1

    def _decode_step(self, joining):
        """One forward over the last token of every active sequence and of every prompt in `joining` (whose
        other tokens have run): they join the batch here, their first token sampled from this forward."""
        for sequence in joining:
            self._cache = sequence.cache if self._cache is None else self._cache.append_rows(sequence.cache)
            sequence.cache = None
        with self._wakeup:  # from prefilling to active in one move: submit() never sees the slot free
            self._prefilling = [s for s in self._prefilling if s not in joining]
            self._active = self._active + joining
        batch = self._active
        ids = torch.tensor([[(s.generated or s.prompt_ids)[-1]] for s in batch], dtype=torch.long)
        # continuing sequences: each row's context so far (its prompt, cached part included, and its tokens)
        counter = self._counts.use(EnergyCounter(positions=[len(s.prompt_ids) + len(s.generated) - 1 for s in batch]))
        output = self.model(input_ids=ids, cache=self._cache, use_cache=True)
        self._cache = output.cache
        self.steps += 1
        self.last_batch_size = len(batch)
        greedy = self._greedy_tokens(batch, output.logits)
        keep = []
        for row, (sequence, (energy, rates)) in enumerate(zip(batch, counter.per_row())):
            if sequence.generated:
                sequence.tokens_processed += 1
            else:  # a prompt's last token: its first token carries the whole prompt's counts
                self._add_prompt_counts(sequence, energy, rates, 1)
                energy, rates = self._prompt_counts(sequence)
            token = greedy.get(row)
            logits = output.logits[row, -1] if token is None else None
            if not self._accept(sequence, logits, energy, rates, token):
                keep.append(row)
        self._keep_rows(keep)

    @staticmethod
    def _greedy_tokens(batch, logits) -> dict[int, int]:
        """Row -> token of the rows sampled greedily without a logit bias: one argmax over their logits [B, 1, V]
        (the same first maximum as each row's own argmax) instead of one per row."""
        rows = [row for row, s in enumerate(batch) if s.params.greedy and not s.params.logit_bias]
        if not rows:
            return {}
        if len(rows) == 1:  # (one stream: plain indexing, not a gather)
            return {rows[0]: int(torch.argmax(logits[rows[0], -1]))}
        return dict(zip(rows, torch.argmax(logits[rows, -1], dim=-1).tolist()))

    def _drop_cancelled(self):
        keep = [row for row, s in enumerate(self._active) if not s.cancelled]
        dropped = [s for s in self._prefilling if s.cancelled]
        self._prefilling = [s for s in self._prefilling if not s.cancelled]
        self.cancelled_total += len(self._active) - len(keep) + len(dropped)
        self._keep_rows(keep)

    def _keep_rows(self, keep):
        if len(keep) == len(self._active):
            return
        self._active = [self._active[row] for row in keep]
        if not keep:
            self._cache = None
            return
        self._cache.select_rows(torch.tensor(keep, dtype=torch.long))

    def _accept(self, sequence, logits, energy: EnergyCounts, firing_rate_per_layer=None, token=None) -> bool:
        """Sample the next token from logits [V] (unless `token` was already picked), tell the request; returns
        True when the sequence is done (finished, or failed: a failure here is this sequence's alone)."""
        if token is None:
            try:
                token = sample_next(logits, sequence.params, sequence.generator)
            except Exception:
                logger.exception("sampling failed for request %s", sequence.request_id)
                self._fail(sequence)
                return True
        sequence.generated.append(token)
        sequence.energy += energy
        delta, hit_stop = ("", False) if token in self.eos_ids else sequence.text.push(token)
        finish = None
        if token in self.eos_ids or hit_stop:
            finish = "stop"
        elif len(sequence.generated) >= sequence.params.max_tokens:
            finish = "length"
        if finish == "length" or token in self.eos_ids:
            delta += sequence.text.flush()  # nothing more is coming: send what was held back
        event = SequenceEvent(text=delta, token_id=token, energy=energy,
                              pj=energy.picojoules(self.e_ac_pj, self.e_mac_pj), finish_reason=finish,
                              firing_rate_per_layer=firing_rate_per_layer, gpt2_pj=self._gpt2_pj(energy))
        if finish is not None:
            sequence.finished = True
            event.usage = self._usage(sequence)
        self._emit(sequence, event)
        return sequence.finished

    def _fail(self, sequence):
        sequence.finished = True
        self.failed_total += 1
        self._emit(sequence, _failure(sequence))

    def _gpt2_pj(self, energy: EnergyCounts) -> float:
        """The same-shape fp32 GPT-2's operations for the work `energy` counts (its counts are linear in tokens,
        logits and context, so the shares of a request's forward passes add up to the request's)."""
        return self._gpt2_pj_of(energy.tokens, energy.logits, energy.context)

    def _reference_pj(self, tokens: int, logits: int, context: int) -> float:
        reference = gpt2_reference_counts(self.config, tokens, logits=logits, context=context)
        return self.prices.compute_pj(reference["counts"])

    def _usage(self, sequence) -> RequestUsage:
        per = max(len(sequence.generated), 1)  # per generated token
        summary = summarise(sequence.energy, self.config, self.prices, per)
        return RequestUsage(prompt_tokens=len(sequence.prompt_ids), completion_tokens=len(sequence.generated),
                            energy=sequence.energy, tokens_processed=sequence.tokens_processed,
                            cached_tokens=sequence.cached_tokens,
                            pj=sequence.energy.picojoules(self.e_ac_pj, self.e_mac_pj),
                            gpt2_pj=self._gpt2_pj(sequence.energy), summary=summary)

    def _emit(self, sequence, event):
        self._outbox.append((sequence, event))

    def _deliver(self):
        """Send the events the last forward made."""
        outbox, self._outbox = self._outbox, []
        for sequence, event in outbox:
            try:
                sequence.on_event(event)
            except Exception:  # the listener's problem (e.g. its event loop closed): drop the sequence
                logger.exception("event delivery failed for request %s", sequence.request_id)
                sequence.cancel()
