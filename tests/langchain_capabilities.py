"""What ChatOptimumNvidia claims to the langchain-tests standard suites: one place for the unit and the
integration suite, so both test the same feature set."""
from __future__ import annotations

from langchain_optimum_nvidia import ChatOptimumNvidia


class ChatOptimumNvidiaCapabilities:
    @property
    def chat_model_class(self) -> type[ChatOptimumNvidia]:
        return ChatOptimumNvidia

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
