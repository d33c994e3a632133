"""`sap serve`: a guarded, OpenAI-compatible inference server with a moderation endpoint.

Needs the ``serve`` extra (``pip install 'sapguard[serve]'``): FastAPI, uvicorn, prometheus-client.
The core library never imports this package.
"""

from typing import Any

from sapguard.serve.config import ServeConfig

__all__ = ["ServeConfig", "build_state", "create_app", "run_server"]


def __getattr__(name: str) -> Any:  # heavy imports only when used
    if name in ("build_state", "run_server"):
        from sapguard.serve import server

        return getattr(server, name)
    if name == "create_app":
        from sapguard.serve.app import create_app

        return create_app
    raise AttributeError(name)
