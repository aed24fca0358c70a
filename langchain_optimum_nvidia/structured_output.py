"""``with_structured_output``: the model's reply is generated under a JSON-schema grammar, then parsed.

Three methods, as in LangChain's other chat models:
- "json_schema" (default): the reply text is constrained to the schema (SamplingParams.guided_json).
- "function_calling": the schema becomes a tool that the model is forced to call (constrained the same way).
- "json_mode": the reply is a JSON object; the prompt says what to put in it. With a schema, the reply is
  constrained to that schema too (so the parsed object is valid); without one, to any JSON object.
Because decoding is constrained, the parsed object is valid JSON for the schema every time; ``strict`` is
accepted for API compatibility and changes nothing (decoding is always strict). The core also tells the model
the schema's keys in a system sentence (``optimum_nvidia_core.chat_request.with_json_instruction``).
"""
from __future__ import annotations

from operator import itemgetter
from typing import Any, Literal

from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

Method = Literal["json_schema", "function_calling", "json_mode"]
METHODS = ("json_schema", "function_calling", "json_mode")


def structured_runnable(
    model: BaseChatModel, schema: Any, method: Method, include_raw: bool, strict: bool | None
) -> Runnable:
    """``model`` bound so that it answers in ``schema``, piped into the matching parser."""
    if schema is None and method != "json_mode":
        raise ValueError(f"method={method!r} needs a schema; pass one, or use method='json_mode'")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {list(METHODS)}")
    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    trace = {"kwargs": {"method": method, "strict": strict}, "schema": schema}

    if method == "function_calling":
        tool = convert_to_openai_tool(schema)
        tool_name = tool["function"]["name"]
        if is_pydantic:
            tool["function"]["parameters"] = _model_schema(schema)
        bound = model.bind_tools([tool], tool_choice=tool_name, ls_structured_output_format=trace)
        parser: Runnable = (
            PydanticToolsParser(tools=[schema], first_tool_only=True)
            if is_pydantic
            else JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True)
        )
    else:
        json_schema = {"type": "object"} if schema is None else (
            _model_schema(schema) if is_pydantic else convert_to_json_schema(schema))
        bound = model.bind(guided_json=json_schema, ls_structured_output_format=trace)
        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()

    if not include_raw:
        return bound | parser
    # {"raw": AIMessage, "parsed": object or None, "parsing_error": exception or None}
    parse_or_fail = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    no_parse = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=bound) | parse_or_fail.with_fallbacks([no_parse], exception_key="parsing_error")


def _model_schema(model: type) -> dict[str, Any]:
    """A pydantic model's own JSON schema, $defs and $refs kept. LangChain's converters inline the refs and
    replace a recursive one with {} (any value), so the grammar would not generate that model."""
    if hasattr(model, "model_json_schema"):
        return model.model_json_schema()
    return convert_to_json_schema(model)  # pydantic v1 models
