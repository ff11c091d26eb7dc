"""An OpenAI-compatible HTTP server for spikelm models that reports the energy of every token.

schemas.py   request and response models (pydantic, bounds on every field)
settings.py  ServeSettings: what `spikelm serve` can be told
engine.py    the generation engine: one thread batches the decode steps of all active sequences
             (no web framework here; it knows token ids, sampling and energy counts)
app.py       create_app(): the FastAPI app, model loaded in its lifespan
(`spikelm serve` is spikelm/cli/serve.py)
"""
