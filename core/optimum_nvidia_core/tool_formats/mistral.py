"""Mistral (v0.3 and the v3 template of Nemo / Small): ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``.

``[TOOL_CALLS]`` is a control token: with special tokens skipped it is not in the text, so the stream puts it back
from its token id. A reply lists all its calls at once, so a forced reply is a non-empty list (parallel calls).
Mistral's templates require call ids of exactly 9 letters or digits: new calls get such ids, and ids from a
LangChain or LlamaIndex history are mapped to 9 characters the same way every time (a tool result keeps matching
its call, and the same history gives the same prompt, so the prefix cache still hits).
"""
from __future__ import annotations

import hashlib
import re
import secrets
import string

from ..outputs import ToolCall
from .base import ToolFormat, call_list_schema, calls_in

TOOL_CALLS = "[TOOL_CALLS]"
_ALPHANUMERIC = string.ascii_letters + string.digits
_MISTRAL_ID = re.compile(r"^[A-Za-z0-9]{9}$")


class MistralFormat(ToolFormat):
    name = "mistral"
    markers = (TOOL_CALLS,)
    forced_prefix = TOOL_CALLS
    parallel_forced = True

    def new_call_id(self) -> str:
        return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))

    def history_id(self, call_id: str) -> str:
        if _MISTRAL_ID.match(call_id):
            return call_id
        number = int.from_bytes(hashlib.sha256(call_id.encode("utf-8")).digest()[:8], "big")
        digits = []
        for _ in range(9):
            number, k = divmod(number, len(_ALPHANUMERIC))
            digits.append(_ALPHANUMERIC[k])
        return "".join(digits)

    def forced_schema(self, functions, one: bool = False):
        schema = call_list_schema(functions, self.arguments_key)
        return {**schema, "maxItems": 1} if one else schema

    def parse(self, text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
        before, marker, after = text.partition(TOOL_CALLS)
        payload = after if marker else text
        found = calls_in(payload, names, self.new_call_id)
        if found:
            return (before.strip() if marker else ""), found
        return text, []
