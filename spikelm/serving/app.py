"""The HTTP app: OpenAI-compatible endpoints over one Engine.

create_app(settings) builds a FastAPI app; its lifespan loads the tokenizer into app.state and starts the
engine: by default in a process of its own (engine_process.py), which loads the model; with
`engine_process=False` in a thread of this process. Handlers parse and check the request (every bad one gets a
4xx in OpenAI's error shape), hand token ids to the engine, and relay its events as a JSON response or
server-sent events. Blocking work (tokenising, loading, asking the engine process for its figures) runs in
worker threads; the model runs only in the engine.
"""

import asyncio
import hmac
import json
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import TemplateError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..loading import load_model_and_tokenizer, load_tokenizer
from ..tokenizer import CHAT_TEMPLATE
from . import schemas
from .engine import Engine, EngineBusy, EngineStopped, SamplingParams
from .engine_process import EngineProcess
from .metrics import CONTENT_TYPE, ServerMetrics
from .settings import ServeSettings

logger = logging.getLogger("spikelm.serving")

ROUTES = ("/", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
# The playground page (GET /): static files shipped in the package; it loads nothing from anywhere else.
STATIC_DIR = Path(__file__).parent / "static"
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class APIError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(self, status, message, type="invalid_request_error", param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self):
        body = schemas.ErrorResponse(error=schemas.ErrorBody(message=self.message, type=self.type, param=self.param,
                                                            code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def loopback_or_bound_hosts(settings: ServeSettings) -> set[str] | None:
    """The Host names a request may carry (None: any). A page on another site that a browser resolves to this
    machine (DNS rebinding) carries its own name, and is refused."""
    if "*" in settings.allowed_hosts or (settings.host in ("0.0.0.0", "::", "") and not settings.allowed_hosts):
        return None
    return {settings.host.lower(), "localhost", "127.0.0.1", "::1", *(h.lower() for h in settings.allowed_hosts)}


def host_name(value: str) -> str:
    """'example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class RequestGate:
    """The outermost layer of every HTTP request (pure ASGI: it does not get between a stream and its client).

    It gives the request an id (`X-Request-Id`, and in the log), refuses a Host header this server does not
    answer to and a cross-origin POST, turns an unexpected exception into ONE logged 500 whose message carries
    the id (never the exception's text), and counts the request by endpoint and status, 500s included.
    """

    def __init__(self, app, metrics, hosts: set[str] | None):
        self.app, self.metrics, self.hosts = app, metrics, hosts

    def refusal(self, scope) -> "APIError | None":
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        if self.hosts is not None and host is not None and host_name(host) not in self.hosts:
            return APIError(400, f"this server does not answer to the host name {host_name(host)[:100]!r}: "
                                 "use its address, or start it with --allowed-host NAME",
                            code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            if host is None or origin.split("://", 1)[-1].rstrip("/").lower() != host.lower():
                return APIError(403, f"cross-origin requests are refused (Origin {origin[:100]!r}, Host "
                                     f"{str(host)[:100]!r}): call the API from a page this server serves, "
                                     "or without a browser", code="cross_origin")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = "req-" + uuid.uuid4().hex[:20]
        scope.setdefault("state", {})["request_id"] = request_id
        status = None

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        except Exception:  # logged once here, and not raised again (uvicorn would log it a second time)
            logger.exception("request %s %s failed", request_id, scope.get("path"))
            if status is None:
                error = APIError(500, f"internal error (request id {request_id}); the server's log has the cause",
                                 type="server_error")
                await error.response()(scope, receive, send_and_note)
        finally:
            if status is not None:
                endpoint = scope["path"] if scope["path"] in ROUTES else "other"
                self.metrics.requests.labels(endpoint, str(status)).inc()


# ================================================================ request parsing


JSON_TYPES = ("application/json",)


def check_content_type(request: Request):
    """Only JSON bodies: a browser page on another site can POST text/plain without asking (a CORS "simple"
    request), but not application/json."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in JSON_TYPES and not (media_type.startswith("application/") and media_type.endswith("+json")):
        raise APIError(415, f"Content-Type must be application/json, got {media_type[:100] or 'none'!r}",
                       code="unsupported_media_type")


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes, over this server's limit of {limit}",
                       code="body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):  # a client that trickles its body does not hold a worker
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body is over this server's limit of {limit} bytes",
                                   code="body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="request_timeout", headers={"Connection": "close"}) from None
    return b"".join(chunks)


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes, model_class):
    if not raw:
        raise APIError(400, "request body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise APIError(400, f"request body is not valid UTF-8 (byte {error.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise APIError(400, f"request body is not valid JSON: {error.msg} at line {error.lineno} "
                            f"column {error.colno}") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    except ValueError:  # Python refuses to convert integer literals of more than 4,300 digits
        raise APIError(400, "request body holds a number with too many digits") from None
    if _ESCAPED_SURROGATE.search(text):  # "\ud83d\ude00" is one character; a lone "\ud800" is no text at all
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "request body holds a lone UTF-16 surrogate escape (such as \\ud800), which is "
                                "not a character: send valid Unicode") from None
    try:
        return model_class.model_validate(data)
    except ValidationError as error:
        problems = error.errors(include_url=False)
        first = problems[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in problems[:3])
        raise APIError(400, message, param=param) from None


def check_api_key(request: Request, api_key: str | None):
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                       type="authentication_error", code="invalid_api_key")


# ================================================================ the app


def create_app(settings: ServeSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine_kwargs = dict(max_batch=settings.max_batch, max_queue=settings.max_queue,
                             dtype=getattr(torch, settings.dtype), threads=settings.threads,
                             e_ac_pj=settings.e_ac_pj, e_mac_pj=settings.e_mac_pj, step_tokens=settings.step_tokens,
                             prefix_cache_bytes=settings.prefix_cache_bytes)
        if settings.engine_process:  # the model in a child process; here only the tokenizer (for prompts)
            engine = EngineProcess(settings.model, revision=settings.revision,
                                   log_level=logging.getLogger("spikelm").getEffectiveLevel(), **engine_kwargs)
            tokenizer = await asyncio.to_thread(load_tokenizer, settings.model, revision=settings.revision)
            await asyncio.to_thread(engine.start)
        else:
            model, tokenizer = await asyncio.to_thread(load_model_and_tokenizer, settings.model,
                                                       revision=settings.revision)
            engine = Engine(model, tokenizer, **engine_kwargs)
            engine.start()
        app.state.tokenizer, app.state.engine = tokenizer, engine
        app.state.relay = EventRelay(asyncio.get_running_loop())
        app.state.started = int(time.time())
        logger.info("serving %s as %r (max batch %d, %s, engine in %s)", settings.model, settings.served_model_name,
                    settings.max_batch, settings.dtype, "a process of its own" if settings.engine_process else
                    "a thread")
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="spikelm", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.settings = settings
    app.state.engine = None
    app.state.metrics = ServerMetrics(lambda: app.state.engine)

    # ---------------------------------------------------------------- errors in OpenAI's shape
    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), type=kind).response()

    # unexpected exceptions: RequestGate logs them once and answers a 500 that names the request id
    app.add_middleware(RequestGate, metrics=app.state.metrics, hosts=loopback_or_bound_hosts(settings))

    # ---------------------------------------------------------------- endpoints
    @app.get("/health")
    async def health():
        engine = app.state.engine
        # figures: a round trip to an engine process, so off the event loop
        figures = await asyncio.to_thread(engine.figures) if engine is not None and engine.alive else None
        if figures is None:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "active_sequences": figures["active"], "queue_depth": figures["waiting"]}

    @app.get("/")
    async def playground():  # the page needs no key; the API calls it makes send the one typed into it
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/metrics")
    async def metrics():
        return Response(await asyncio.to_thread(app.state.metrics.render), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        check_api_key(request, settings.api_key)
        card = schemas.ModelCard(id=settings.served_model_name, created=app.state.started)
        return schemas.ModelList(data=[card]).model_dump()

    @app.post("/v1/completions", openapi_extra=request_body_schema(schemas.CompletionRequest))
    async def completions(request: Request):
        body = await parsed_body(request, schemas.CompletionRequest)
        prompt_ids = await asyncio.to_thread(encode_prompt, body.prompt)
        params = sampling_params(body, body.max_tokens)
        return await generate(request, "text_completion", prompt_ids, params, body)

    @app.post("/v1/chat/completions", openapi_extra=request_body_schema(schemas.ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = await parsed_body(request, schemas.ChatCompletionRequest)
        prompt_ids = await asyncio.to_thread(encode_chat, body.messages, request.state.request_id)
        params = sampling_params(body, body.requested_max_tokens() or settings.default_max_tokens)
        return await generate(request, "chat.completion", prompt_ids, params, body)

    # ---------------------------------------------------------------- helpers that need the settings
    async def parsed_body(request, model_class):
        check_api_key(request, settings.api_key)
        check_content_type(request)
        body = parse_json(await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s),
                          model_class)
        check_model_name(body.model)
        return body

    def check_model_name(name):
        if name is not None and name not in (settings.served_model_name, settings.model):
            raise APIError(404, f"model {name!r} is not served here; this server serves "
                                f"{settings.served_model_name!r}", param="model", code="model_not_found")

    def sampling_params(body, max_tokens) -> SamplingParams:
        if max_tokens > settings.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}, over this server's limit of {settings.max_tokens}",
                           param="max_tokens")
        logit_bias = body.logit_bias_ids()
        vocab = app.state.engine.config.vocab_size
        if logit_bias and max(logit_bias) >= vocab:
            raise APIError(400, f"logit_bias names token id {max(logit_bias)}, outside the vocabulary (size "
                                f"{vocab})", param="logit_bias")
        temperature = body.temperature if body.temperature == 0 else max(body.temperature, MIN_TEMPERATURE)
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=body.top_p,
                              top_k=body.top_k, stop=body.stop_list(), seed=body.seed, logit_bias=logit_bias)

    def checked_prompt(ids, param):
        tokenizer, vocab = app.state.tokenizer, app.state.engine.config.vocab_size
        if not ids:
            if tokenizer.bos_token_id is None:
                raise APIError(400, "the prompt is empty: send at least one token", param=param)
            ids = [tokenizer.bos_token_id]
        if len(ids) > settings.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of "
                                f"{settings.max_prompt_tokens}", param=param, code="context_length_exceeded")
        if max(ids) >= vocab:
            raise APIError(400, f"token id {max(ids)} is outside the vocabulary (size {vocab})", param=param)
        return ids

    def encode_prompt(prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return checked_prompt(prompt, "prompt")
        text = prompt[0] if isinstance(prompt, list) else prompt
        return checked_prompt(app.state.tokenizer(text)["input_ids"], "prompt")

    def encode_chat(messages, request_id):
        tokenizer = app.state.tokenizer
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        template = None if getattr(tokenizer, "chat_template", None) else CHAT_TEMPLATE  # spikelm's own
        try:
            text = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as error:
            if type(error) is TemplateError:  # the template's own raise_exception(): a message for the client
                raise APIError(400, f"the chat template refused the messages: {error}", param="messages") from None
            logger.exception("request %s: the chat template failed", request_id)  # its text stays in the log
            raise APIError(400, f"the chat template could not render these messages (request id {request_id})",
                           param="messages") from None
        return checked_prompt(tokenizer(text, add_special_tokens=False)["input_ids"], "messages")

    async def generate(request, kind, prompt_ids, params, body):
        engine, relay = app.state.engine, app.state.relay
        events: asyncio.Queue = asyncio.Queue()

        def on_event(event):  # engine thread (or engine process's reader thread) -> this request's event loop
            relay.put(events, event)

        arrived = time.monotonic()
        request_id = request.state.request_id
        try:
            sequence = engine.submit(prompt_ids, params, on_event, request_id=request_id)
        except EngineBusy as error:
            raise APIError(503, f"the server is busy ({error}); retry later", type="server_overloaded",
                           code="overloaded", headers={"Retry-After": str(settings.retry_after_s)}) from None
        except EngineStopped as error:
            raise APIError(503, str(error), type="server_unavailable",
                           headers={"Retry-After": str(settings.retry_after_s)}) from None
        # beside the handler, listen for the client going away: its slot is freed at the next engine step
        watcher = asyncio.create_task(cancel_on_disconnect(request, engine, sequence, events))
        reply = Reply(app, kind, settings.served_model_name, len(prompt_ids), arrived, request_id)
        if body.stream:
            return EventStream(reply.stream(events, engine, sequence, body.include_usage_in_stream(), watcher),
                               settings.stream_stall_timeout_s, request_id)
        try:
            return await reply.whole(events, engine, sequence)
        finally:
            watcher.cancel()

    plain_openapi = app.openapi

    def openapi_with_request_schemas():
        """/openapi.json with the request bodies' definitions moved into its components."""
        if app.openapi_schema is None:
            schema = plain_openapi()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path in schema["paths"].values():
                for operation in path.values():
                    components.update(operation.pop("x-components", {}))
        return app.openapi_schema

    app.openapi = openapi_with_request_schemas
    return app


MIN_TEMPERATURE = 0.01  # below it, logits / temperature overflows float64 for tiny values; vLLM uses 0.01 too
DISCONNECTED = object()  # put in a request's event queue when its client has gone


class EventRelay:
    """Hands engine events (from the engine thread) to the requests' queues on the event loop. Events that
    arrive before the loop has run the last hand-over go with it: the engine sends a step's events together,
    so the loop wakes once per step, not once per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, object]] = []

    def put(self, queue: asyncio.Queue, event):
        """Any thread."""
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:  # a hand-over is already scheduled
                return
        try:
            self.loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # the loop is closed: this event's sender is told (raise), and so is the next one's
            with self._lock:
                self._pending.clear()
            raise

    def _hand_over(self):
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


async def cancel_on_disconnect(request: Request, engine, sequence, events):
    """Waits for the client's disconnect (the body has been read, so the next ASGI message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    engine.cancel(sequence)
    events.put_nowait(DISCONNECTED)


def request_body_schema(model_class) -> dict:
    """The request body's JSON schema for /openapi.json (the handlers parse the body themselves, to answer
    every bad one in OpenAI's error shape)."""
    schema = model_class.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = schema.pop("$defs", {})
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "x-components": definitions}


class EventStream(Response):
    """Server-sent events whose every send must go through within `stall_timeout_s`: a client that stops
    reading is dropped (its connection closed, its generation cancelled) instead of holding a connection and a
    slot for ever."""

    def __init__(self, chunks, stall_timeout_s: float, request_id: str):
        self.status_code, self.background = 200, None
        self.chunks, self.stall_timeout_s, self.request_id = chunks, stall_timeout_s, request_id

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache")]})
        loop = asyncio.get_running_loop()
        try:
            # one deadline, set around each send and lifted while waiting for the engine (cheaper per token
            # than wait_for, which wraps every send in a task of its own)
            async with asyncio.timeout(None) as stall:
                async for text in self.chunks:
                    stall.reschedule(loop.time() + self.stall_timeout_s)
                    await send({"type": "http.response.body", "body": text.encode(), "more_body": True})
                    stall.reschedule(None)
                stall.reschedule(loop.time() + self.stall_timeout_s)
                await send({"type": "http.response.body", "body": b""})
        except TimeoutError:  # returning without finishing the response makes uvicorn close the connection
            logger.warning("request %s: the client read nothing for %g s; dropped", self.request_id,
                           self.stall_timeout_s)
        except OSError:  # the client went away (ASGI 2.4 servers raise on send)
            pass
        finally:
            await self.chunks.aclose()  # the generator's own cleanup cancels the sequence


# ================================================================ replies


def energy_usage(usage) -> dict:
    """The request's energy figures, per generated token (see schemas.EnergyUsage)."""
    tokens = max(usage.completion_tokens, 1)
    mine, refs = usage.summary["spikelm"], usage.summary["references"]
    return dict(energy_joules=usage.pj * 1e-12, energy_pj_per_token=usage.pj / tokens,
                energy_ac_per_token=usage.energy.ac / tokens, energy_mac_per_token=usage.energy.mac / tokens,
                energy_firing_rate=usage.energy.firing_rate, energy_gpt2_pj_per_token=usage.gpt2_pj / tokens,
                energy_ratio_to_gpt2=usage.pj / usage.gpt2_pj if usage.gpt2_pj else 0.0,
                energy_tokens_processed=usage.tokens_processed,
                energy_memory_pj_per_token=mine["memory_pj"], energy_total_pj_per_token=mine["total_pj"],
                energy_weight_reads_per_token=mine["weight_reads"],
                energy_gpt2_mac_per_token=refs["gpt2_fp32"]["mac"],
                energy_gpt2_total_pj_per_token=refs["gpt2_fp32"]["total_pj"],
                energy_gpt2_int8_pj_per_token=refs["gpt2_int8"]["compute_pj"],
                energy_gpt2_int8_total_pj_per_token=refs["gpt2_int8"]["total_pj"],
                energy_ann_twin_ac_per_token=refs["ann_twin"]["ac"], energy_ann_twin_mac_per_token=refs["ann_twin"]["mac"],
                energy_ann_twin_pj_per_token=refs["ann_twin"]["compute_pj"],
                energy_ann_twin_total_pj_per_token=refs["ann_twin"]["total_pj"])


def make_usage(usage) -> schemas.Usage:
    return schemas.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                         total_tokens=usage.prompt_tokens + usage.completion_tokens,
                         prompt_tokens_details=schemas.PromptTokensDetails(cached_tokens=usage.cached_tokens),
                         **energy_usage(usage))


def token_energy(event) -> dict:
    """schemas.TokenEnergy's fields, as a plain dict (a stream sends one per token: no model to validate)."""
    e = event.energy
    rates = event.firing_rate_per_layer
    return {"pj": float(event.pj), "ac": int(e.ac), "mac": int(e.mac), "firing_rate": float(e.firing_rate),
            "firing_rate_per_layer": None if rates is None else {k: float(v) for k, v in rates.items()},
            "gpt2_pj": float(event.gpt2_pj)}


class Reply:
    """Relays one request's engine events as a JSON body or as server-sent events, and records its metrics."""

    def __init__(self, app, kind, model_name, prompt_tokens, arrived, request_id):
        self.app, self.kind, self.model_name = app, kind, model_name
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + request_id.removeprefix("req-")
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.arrived = arrived
        self.first_token_at = self.last_token_at = None

    def _observe(self, event):
        metrics = self.app.state.metrics
        now = time.monotonic()
        if event.token_id is not None:
            if self.first_token_at is None:
                self.first_token_at = now
                metrics.time_to_first_token.observe(now - self.arrived)
            else:
                metrics.inter_token_latency.observe(now - self.last_token_at)
            self.last_token_at = now
        if event.usage is not None:
            usage = event.usage
            metrics.prompt_tokens.inc(usage.prompt_tokens)
            metrics.generation_tokens.inc(usage.completion_tokens)
            metrics.energy_joules.inc(usage.pj * 1e-12)
            metrics.energy_pj_per_token.observe(usage.pj / max(usage.completion_tokens, 1))
            if usage.completion_tokens > 1 and now > self.first_token_at:
                metrics.tokens_per_second.observe((usage.completion_tokens - 1) / (now - self.first_token_at))

    @staticmethod
    def _error(event) -> "APIError":
        if event.retryable:  # the server is shutting down
            return APIError(503, event.error, type="server_unavailable", headers={"Retry-After": "1"})
        return APIError(500, event.error, type="server_error")

    async def whole(self, events, engine, sequence):
        texts, finish = [], None
        try:
            while finish is None:
                event = await events.get()
                if event is DISCONNECTED:  # nobody waits for the answer: the slot is already freed
                    return Response(status_code=499)
                if event.error:
                    raise self._error(event)
                self._observe(event)
                texts.append(event.text)
                finish = event.finish_reason
        finally:
            if finish is None:
                engine.cancel(sequence)
        text = "".join(texts)
        usage = make_usage(event.usage)
        if self.kind == "chat.completion":
            choice = schemas.ChatChoice(message=schemas.ChatResponseMessage(content=text), finish_reason=finish)
            body = schemas.ChatCompletionResponse(id=self.id, created=self.created, model=self.model_name,
                                                  choices=[choice], usage=usage)
        else:
            body = schemas.CompletionResponse(id=self.id, created=self.created, model=self.model_name,
                                              choices=[schemas.CompletionChoice(text=text, finish_reason=finish)],
                                              usage=usage)
        return JSONResponse(body.model_dump(exclude_none=False))

    def _chunk(self, event, first) -> dict:
        """A token's chunk: schemas.ChatCompletionChunk or schemas.CompletionResponse with one
        CompletionStreamChoice, field for field (tests/serving/test_app.py checks it), built as a plain dict."""
        energy = token_energy(event)
        if self.kind == "chat.completion":
            choice = {"index": 0, "delta": {"role": "assistant" if first else None, "content": event.text},
                      "finish_reason": event.finish_reason, "logprobs": None, "energy": energy}
            object_name = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": event.text, "finish_reason": event.finish_reason, "logprobs": None,
                      "energy": energy}
            object_name = "text_completion"
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_name,
                "choices": [choice], "usage": None}

    def _usage_chunk(self, usage):
        object_name = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model_name,
                "choices": [], "usage": make_usage(usage).model_dump()}

    async def stream(self, events, engine, sequence, include_usage, watcher):
        """The server-sent events, a send's worth at a time: every event waiting in the queue goes out in one
        send (the bytes are the same; the client's parser splits them at the blank lines)."""
        finished, first, done = False, True, False
        try:
            while not done:
                ready = [await events.get()]
                while not events.empty():
                    ready.append(events.get_nowait())
                parts = []
                for event in ready:
                    if event is DISCONNECTED:
                        return
                    if event.error:  # an error chunk, then [DONE]: a stream never ends in a silent close
                        error = self._error(event)
                        body = {"error": {"message": error.message, "type": error.type, "param": None,
                                          "code": None}}
                        parts.append(f"data: {json.dumps(body)}\n\n")
                        done = True
                        break
                    self._observe(event)
                    parts.append(f"data: {json.dumps(self._chunk(event, first))}\n\n")
                    first = False
                    if event.finish_reason is not None:
                        finished = done = True
                        if include_usage:
                            parts.append(f"data: {json.dumps(self._usage_chunk(event.usage))}\n\n")
                        break
                if done:
                    parts.append("data: [DONE]\n\n")
                yield "".join(parts)
        finally:
            watcher.cancel()
            # the client went away (the send failed or timed out, or it disconnected): free the slot
            if not finished:
                engine.cancel(sequence)
