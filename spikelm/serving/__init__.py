"""An OpenAI-compatible HTTP server for spikelm models that reports the energy of every token.

schemas.py   request and response models (pydantic, bounds on every field)
settings.py  ServeSettings: what `spikelm serve` can be told
engine.py    the generation engine: one thread batches the decode steps of all active sequences and prefills
             prompts in chunks between them (no web framework here; it knows token ids, sampling, energy)
engine_process.py  the same engine in a process of its own (the server's default): the model and the HTTP
             event loop do not share one GIL
prefix_cache.py  the prefix-state cache: prompt states by token prefix (a radix tree), an LRU bounded in bytes
app.py       create_app(): the FastAPI app, model loaded in its lifespan
server.py    serve(): uvicorn with the settings' connection cap and a shutdown that drains, then ends cleanly
(`spikelm serve` is spikelm/cli/serve.py)
"""
