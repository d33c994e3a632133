"""vLLM endpoint plugin (entry point ``vllm.endpoint_plugins: sapguard``): verdicts over HTTP.

The general plugin (:mod:`sapguard.engines.vllm_plugin`) installs the worker-side method
``sapguard_results``; this plugin exposes it on ``vllm serve``'s OpenAI server, as vLLM's plugin
contract prescribes (endpoint plugins are opt-in: ``VLLM_PLUGINS=sapguard``):

- ``GET /v1/sapguard/results/{id}``: the record of a finished request by the ``id`` of its
  completion response (``chatcmpl-...`` / ``cmpl-...``): mode, prompt margins per facet, prompt
  score, fired / edited token counts, per-token scores. Each record is returned once (then freed).
- ``GET /v1/sapguard/info``: the attached polytope's layer and modes.

Example::

    curl localhost:8000/v1/chat/completions -d '{"model": "...", "messages": [...],
         "vllm_xargs": {"sapguard_mode": "refuse"}}'        # -> {"id": "chatcmpl-abc", ...}
    curl localhost:8000/v1/sapguard/results/chatcmpl-abc
"""

# No `from __future__ import annotations`: FastAPI reads the route handlers' annotations at
# definition time (``Request`` is imported inside :meth:`SapguardEndpoints.attach_router`).
from typing import Any


class SapguardEndpoints:
    """The endpoint plugin object (vLLM's ``EndpointPlugin`` protocol)."""

    name = "sapguard"
    required_tasks = None

    def attach_router(self, app: Any) -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse

        router = APIRouter()

        async def _rpc(request: Request, method: str, *args: Any) -> Any:
            engine = getattr(request.app.state, "sapguard_engine", None)
            if engine is None:
                return None
            replies = await engine.collective_rpc(method, args=args)
            return replies[0] if replies else None

        @router.get("/v1/sapguard/results/{request_id}")
        async def results(request_id: str, request: Request) -> JSONResponse:
            found = await _rpc(request, "sapguard_results", [request_id]) or {}
            if request_id not in found:
                return JSONResponse(
                    {"error": {"message": f"no sapguard record for {request_id!r} (unknown, unfinished or already read)",
                               "type": "not_found", "code": 404}},
                    status_code=404,
                )
            return JSONResponse({"id": request_id, **found[request_id]})

        @router.get("/v1/sapguard/info")
        async def info(request: Request) -> JSONResponse:
            data = await _rpc(request, "sapguard_info")
            if data is None:
                return JSONResponse({"error": {"message": "no polytope attached", "type": "not_found", "code": 404}},
                                    status_code=404)
            return JSONResponse(data)

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        state.sapguard_engine = engine_client


def endpoints() -> SapguardEndpoints:
    """The entry point's factory."""
    return SapguardEndpoints()
