"""Request and response bodies of the OpenAI-compatible API, with bounds on every field.

Requests ignore keys they do not know, but refuse values that would silently change what the client asked for
(n > 1, penalties, logprobs, best_of, response_format, stream_options without stream), each with a message
naming the field. A field OpenAI types "or null" takes null as its default. Responses add spikelm's energy
figures as extra keys, which the official `openai` client keeps (as attributes / `model_extra`).
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Hard ceilings: the server's settings set the working limits below them (checked in app.py).
MAX_TOKENS_CEILING = 1_000_000
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_TEXT_CHARS = 4_000_000
MAX_MESSAGES = 1024
MAX_TOKEN_ID = 2**31 - 1
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, max_length=256)
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_CEILING)] | None = None
    # 0: greedy; (0, 0.01) is raised to 0.01 (as vLLM does): smaller ones overflow the division
    temperature: Annotated[float, Field(ge=0.0, le=10.0)] | None = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = 1.0
    top_k: Annotated[int, Field(ge=0, le=1_000_000)] | None = 0  # 0: no top-k cut
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: Annotated[int, Field(ge=1, le=1)] | None = 1  # one choice per request
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0  # only 0 (neutral) is supported
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = 0.0  # only 0 (neutral) is supported
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None  # token id -> bias
    user: str | None = Field(default=None, max_length=256)
    response_format: dict | None = None  # only {"type": "text"}

    @field_validator("max_tokens", "temperature", "top_p", "top_k", "n", "stream", "presence_penalty",
                     "frequency_penalty", mode="before")
    @classmethod
    def _null_means_default(cls, value, info):
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("logit_bias", mode="after")
    @classmethod
    def _token_ids(cls, value):
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries")
        for key in value:
            if not (key.isascii() and key.isdigit()) or int(key) > MAX_TOKEN_ID:
                raise ValueError(f"keys must be token ids (non-negative integers as strings), got {key[:20]!r}")
        return value

    @field_validator("response_format", mode="after")
    @classmethod
    def _text_only(cls, value):
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(f"only {{\"type\": \"text\"}} is supported, not {str(value.get('type'))[:40]!r}: "
                             "this server cannot constrain its output to JSON")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def logit_bias_ids(self) -> dict[int, float]:
        return {int(key): bias for key, bias in (self.logit_bias or {}).items()}

    @field_validator("n", mode="before")
    @classmethod
    def _one_choice(cls, value):
        if isinstance(value, int) and not isinstance(value, bool) and value != 1:
            raise ValueError("only n=1 is supported: send one request per choice")
        return value

    @field_validator("presence_penalty", "frequency_penalty", mode="after")
    @classmethod
    def _neutral_penalty(cls, value):
        if value:
            raise ValueError("penalties are not supported: leave them at 0")
        return value

    @field_validator("stop", mode="after")
    @classmethod
    def _bounded_stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    # a string, a list holding one string, or token ids (several prompts in one request: send several requests)
    prompt: str | list[str] | list[int]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_CEILING)] | None = 16  # OpenAI's default for completions
    echo: bool | None = False  # not supported (checked below)
    logprobs: int | None = Field(default=None, ge=0, le=5)  # not supported (checked below)
    suffix: str | None = Field(default=None, max_length=MAX_STOP_CHARS)  # not supported (checked below)
    best_of: int | None = Field(default=None, ge=1, le=1)  # one candidate per request

    @field_validator("prompt", mode="after")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if len(value) > MAX_TEXT_CHARS:
                raise ValueError(f"prompt has more than {MAX_TEXT_CHARS} tokens")
            if isinstance(value[0], str):
                if len(value) != 1:
                    raise ValueError("send one prompt per request (a batch of prompts is not supported)")
                if len(value[0]) > MAX_TEXT_CHARS:
                    raise ValueError(f"prompt has more than {MAX_TEXT_CHARS} characters")
            elif any(t < 0 or t > MAX_TOKEN_ID for t in value):
                raise ValueError("token ids must be non-negative integers")
        elif len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"prompt has more than {MAX_TEXT_CHARS} characters")
        return value

    @field_validator("logprobs", mode="after")
    @classmethod
    def _no_logprobs(cls, value):
        if value is not None:
            raise ValueError("logprobs is not supported by this server: leave it out or null")
        return value

    @field_validator("echo", "suffix", mode="after")
    @classmethod
    def _not_supported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server: leave it out")
        return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)

    @field_validator("content", mode="after")
    @classmethod
    def _bounded_content(cls, value):
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"content has more than {MAX_TEXT_CHARS} characters")
        if isinstance(value, list) and len(value) > MAX_MESSAGES:
            raise ValueError(f"content has more than {MAX_MESSAGES} parts")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CEILING)  # newer name
    logprobs: bool | None = None  # not supported (checked below)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)  # not supported (checked below)

    @field_validator("logprobs", "top_logprobs", mode="after")
    @classmethod
    def _no_logprobs(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server: leave it out, false or null")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ================================================================ responses


class EnergyUsage(BaseModel):
    """The energy of a whole request: the prompt's forward pass and every decode step.

    Per-token figures divide by the generated tokens (completion_tokens), so they amortise the prompt;
    the GPT-2 reference is the same-shape GPT-2 (with a KV cache) doing the same work, divided the same way.
    """

    energy_joules: float  # total
    energy_pj_per_token: float  # picojoules per generated token
    energy_ac_per_token: float  # accumulate operations per generated token
    energy_mac_per_token: float  # multiply-accumulate operations per generated token
    energy_firing_rate: float  # spikes per neuron and time step, over the request
    energy_gpt2_pj_per_token: float  # the same-shape GPT-2, same tokens, same denominator
    energy_ratio_to_gpt2: float
    energy_tokens_processed: int  # prompt tokens + generated tokens fed back into the model
    # memory traffic (spikelm.energy's rules, SRAM prices) and operation + memory totals, per generated token;
    # the references: GPT-2 at fp32 and int8, the ANN twin; each with its operation counts
    energy_memory_pj_per_token: float = 0.0
    energy_total_pj_per_token: float = 0.0
    energy_weight_reads_per_token: float = 0.0
    energy_gpt2_mac_per_token: float = 0.0
    energy_gpt2_total_pj_per_token: float = 0.0
    energy_gpt2_int8_pj_per_token: float = 0.0
    energy_gpt2_int8_total_pj_per_token: float = 0.0
    energy_ann_twin_ac_per_token: float = 0.0
    energy_ann_twin_mac_per_token: float = 0.0
    energy_ann_twin_pj_per_token: float = 0.0
    energy_ann_twin_total_pj_per_token: float = 0.0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens resumed from the prefix-state cache (not run again)


class Usage(EnergyUsage):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TokenEnergy(BaseModel):
    """The forward pass that produced one token (for the first: the prompt's)."""

    pj: float
    ac: int
    mac: int
    firing_rate: float
    firing_rate_per_layer: dict[str, float] | None = None  # "layers.0", ..., "head", in layer order
    gpt2_pj: float | None = None  # the same-shape GPT-2 doing the same forward pass (with a KV cache)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionStreamChoice(CompletionChoice):
    energy: TokenEnergy | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice | CompletionStreamChoice]
    usage: Usage | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None
    logprobs: None = None
    energy: TokenEnergy | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "spikelm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
