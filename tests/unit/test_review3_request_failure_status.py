"""Review 3: a request that fails alone inside a live engine (its JSON schema is complete before min_tokens, a
prompt the cache can never hold, ...) is answered as that request's failure, not as "the engine is unavailable,
retry shortly" (503 + Retry-After: clients retry it, and it fails the same way again), and it does not flip the
server into "restarting", which answered 503 to every other new request meanwhile."""
from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("xgrammar")
from optimum_nvidia_core.server.errors import from_exception  # noqa: E402
from optimum_nvidia_core.server.local_engine import LocalEngine  # noqa: E402
from optimum_nvidia_core.server.protocol import ChatCompletionRequest  # noqa: E402

COMPLETE_TOO_EARLY = {"messages": [{"role": "user", "content": "yes or no?"}], "max_tokens": 30, "min_tokens": 20,
                      "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
                          "name": "answer", "schema": {"type": "boolean"}}}}


def test_a_request_failing_alone_is_its_own_error_and_the_engine_stays_ready(tiny_llama_dir):
    async def scenario():
        engine = LocalEngine(str(tiny_llama_dir), device="cpu", block_size=4, max_seq_len=256, engine_process=False)
        await engine.start()
        await engine.wait_ready()
        try:
            req = ChatCompletionRequest.model_validate(COMPLETE_TOO_EARLY)
            with pytest.raises(Exception) as info:
                async for _ in engine.chat(req):
                    pass
            await asyncio.sleep(0)  # a recovery task, if one was started, runs now
            return from_exception(info.value), engine.state  # the HTTP layer's answer (app.generate)
        finally:
            await engine.stop()

    error, state = asyncio.run(scenario())
    assert state == "ready"
    assert error.status == 400 and error.code != "engine_unavailable"
    assert "min_tokens=20 forbids stopping" in error.message
