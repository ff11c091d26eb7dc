"""Running the app under uvicorn: the settings' connection cap, and a shutdown that drains, then cuts cleanly.

On shutdown uvicorn stops accepting connections and waits for the running ones. `DrainingServer` gives them
`shutdown_timeout_s` to finish; then it stops the engine, which ends every sequence still running with an
error event: a stream sends an error chunk and `data: [DONE]` (never a silent close), a plain request gets a
503. uvicorn's own deadline is a little later, so that those last messages go out before it cancels anything.
"""

import asyncio
import logging

import uvicorn

from .settings import ServeSettings

logger = logging.getLogger("spikelm.serving")

CUT_MARGIN_S = 2.0  # after the engine stops: time for the last error chunks to reach their clients


def uvicorn_config(app, settings: ServeSettings, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                          limit_concurrency=settings.max_connections,
                          timeout_graceful_shutdown=settings.shutdown_timeout_s + CUT_MARGIN_S)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app):
        super().__init__(config)
        self.app = app  # the FastAPI app (config.app may be wrapped)

    async def shutdown(self, sockets=None):
        cut = asyncio.create_task(self._stop_engine_after(self.app.state.settings.shutdown_timeout_s))
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()

    async def _stop_engine_after(self, seconds: float):
        await asyncio.sleep(seconds)
        engine = self.app.state.engine
        figures = await asyncio.to_thread(engine.figures) if engine is not None else None
        left = 0 if figures is None else figures["active"] + figures["prefilling"] + figures["waiting"]
        if left:
            logger.warning("shutdown: %d requests still running after %g s; ending them with an error", left,
                           seconds)
            await asyncio.to_thread(engine.stop)


def serve(settings: ServeSettings, log_level: str = "info"):
    """Serve until interrupted (what `spikelm serve` runs)."""
    from .app import create_app

    app = create_app(settings)
    DrainingServer(uvicorn_config(app, settings, log_level), app).run()
