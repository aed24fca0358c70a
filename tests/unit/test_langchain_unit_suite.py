"""langchain-tests' standard unit suite for ChatOptimumNvidia (no engine is loaded: construction is lazy)."""
from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_optimum_nvidia import ChatOptimumNvidia


class TestChatOptimumNvidiaUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatOptimumNvidia]:
        return ChatOptimumNvidia

    @property
    def chat_model_params(self) -> dict:
        return {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "temperature": 0}

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True
