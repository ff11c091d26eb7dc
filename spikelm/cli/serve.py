"""`spikelm serve --model DIR`: the OpenAI-compatible HTTP server (uvicorn).

    spikelm serve --model runs/quickstart --port 8000 [--api-key KEY]
"""

import argparse
import logging

from ..serving.settings import ServeSettings


def add_arguments(parser: argparse.ArgumentParser):
    defaults = ServeSettings.__dataclass_fields__
    d = lambda name: defaults[name].default  # noqa: E731
    parser.add_argument("--model", required=True, help="a saved spikelm model and tokenizer: directory or hub id")
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a hub id")
    parser.add_argument("--served-model-name", default=None, help="the name clients send (default: the directory's)")
    parser.add_argument("--host", default=d("host"), help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=d("port"))
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 "
                                                        "(or set SPIKELM_API_KEY)")
    parser.add_argument("--max-batch", type=int, default=d("max_batch"), help="sequences decoded together")
    parser.add_argument("--max-queue", type=int, default=d("max_queue"),
                        help="requests that may wait for a slot; beyond it the server answers 503")
    parser.add_argument("--max-prompt-tokens", type=int, default=d("max_prompt_tokens"))
    parser.add_argument("--max-tokens", type=int, default=d("max_tokens"), help="most tokens one request generates")
    parser.add_argument("--default-max-tokens", type=int, default=d("default_max_tokens"),
                        help="for chat requests that name none")
    parser.add_argument("--max-body-bytes", type=int, default=d("max_body_bytes"))
    parser.add_argument("--dtype", choices=["float64", "float32"], default=d("dtype"),
                        help="float32 (default) or float64; both keep each sequence's output independent of the batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the engine")
    parser.add_argument("--engine-in-thread", action="store_true",
                        help="run the model in a thread of the server's process, not in a process of its own "
                             "(slower: the model and the HTTP event loop then share one GIL)")
    parser.add_argument("--step-tokens", type=int, default=d("step_tokens"),
                        help="tokens one engine step may process: decode rows plus prompt chunks")
    parser.add_argument("--prefix-cache-bytes", type=int, default=d("prefix_cache_bytes"),
                        help="budget of the prefix-state cache (0: off)")
    parser.add_argument("--allowed-host", action="append", default=[], dest="allowed_hosts",
                        help="a Host name to answer besides the bound address and loopback (repeatable; '*': any)")
    parser.add_argument("--max-connections", type=int, default=d("max_connections"))
    parser.add_argument("--shutdown-timeout", type=float, default=d("shutdown_timeout_s"),
                        help="seconds running requests get to finish on shutdown")
    parser.add_argument("--log-level", default="info")


def settings_from(args) -> ServeSettings:
    settings_kwargs = dict(model=args.model, revision=args.revision, served_model_name=args.served_model_name,
                           host=args.host, port=args.port,
                           max_batch=args.max_batch, max_queue=args.max_queue,
                           max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                           default_max_tokens=args.default_max_tokens, max_body_bytes=args.max_body_bytes,
                           dtype=args.dtype, threads=args.threads, step_tokens=args.step_tokens,
                           prefix_cache_bytes=args.prefix_cache_bytes, allowed_hosts=args.allowed_hosts,
                           max_connections=args.max_connections, shutdown_timeout_s=args.shutdown_timeout)
    if args.api_key:
        settings_kwargs["api_key"] = args.api_key
    if args.engine_in_thread:
        settings_kwargs["engine_process"] = False
    return ServeSettings(**settings_kwargs)


def run(args) -> int:
    from ..loading import require_saved_model
    from ..serving.server import serve

    settings = settings_from(args)
    require_saved_model(settings.model, revision=settings.revision)  # a clear message before the server starts, not in its lifespan
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(settings, log_level=args.log_level)
    return 0
