"""langchain-tests' standard unit suite for ChatOptimumNvidia (no engine is loaded: construction is lazy)."""
from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_capabilities import ChatOptimumNvidiaCapabilities


class TestChatOptimumNvidiaUnit(ChatOptimumNvidiaCapabilities, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "temperature": 0}
