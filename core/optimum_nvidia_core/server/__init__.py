"""The OpenAI-compatible HTTP server (``optimum-nvidia serve``) and its Ray Serve scale-out.

Needs the ``server`` extra (FastAPI, uvicorn, prometheus-client); the core never imports this package.
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_app", "LocalEngine", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "LocalEngine":
        from .local_engine import LocalEngine

        return LocalEngine
    if name == "serve":
        from .launcher import serve

        return serve
    raise AttributeError(f"module 'optimum_nvidia_core.server' has no attribute {name!r}")
