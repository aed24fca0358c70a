"""Run the app under uvicorn: 127.0.0.1 unless told otherwise, graceful and bounded shutdown on SIGTERM/SIGINT.

On a signal uvicorn stops accepting connections and lets in-flight requests finish for ``shutdown_timeout``
seconds; then it cancels the rest (which aborts their engine requests) and the lifespan hook stops the engine.
"""
from __future__ import annotations

import logging
from typing import Any

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def serve(model: str, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
          served_model_name: str | None = None, shutdown_timeout: float = 10.0, log_level: str = "info",
          **engine_options: Any) -> None:
    """Serve ``model`` until SIGTERM/SIGINT (blocks)."""
    import uvicorn

    from .app import create_app
    from .local_engine import LocalEngine

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = LocalEngine(model, served_model_name=served_model_name, **engine_options)
    app = create_app(engine, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout, timeout_keep_alive=30)
    uvicorn.Server(config).run()
