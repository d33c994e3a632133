"""The endpoint plugin's routes, on a FastAPI app with a stand-in engine client (no engine)."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.testclient import TestClient

from sapguard.engines.vllm_endpoint import endpoints


class FakeEngine:
    def __init__(self):
        self.records = {"chatcmpl-1": {"mode": "refuse", "prompt_score": 1.5, "gate_active": True}}

    async def collective_rpc(self, method, args=()):
        if method == "sapguard_results":
            return [{rid: self.records.pop(rid) for rid in args[0] if rid in self.records}]
        return [{"layer": 18, "modes": ["detect"], "default_mode": "detect"}]


def test_results_route_returns_a_record_once():
    app = FastAPI()
    plugin = endpoints()
    plugin.attach_router(app)
    asyncio.run(plugin.init_state(FakeEngine(), app.state, None))
    client = TestClient(app)
    got = client.get("/v1/sapguard/results/chatcmpl-1")
    assert got.status_code == 200 and got.json() == {"id": "chatcmpl-1", "mode": "refuse", "prompt_score": 1.5, "gate_active": True}
    again = client.get("/v1/sapguard/results/chatcmpl-1")
    assert again.status_code == 404 and "already read" in again.json()["error"]["message"]
    assert client.get("/v1/sapguard/info").json()["layer"] == 18
