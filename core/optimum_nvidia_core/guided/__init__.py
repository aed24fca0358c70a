"""Constrained decoding: a JSON schema becomes the tokens allowed at each step, through xgrammar.

Forced tool calls and structured output (json_schema / json_mode) all come through here, so their output always
parses and validates. ``schema`` turns schemas into grammars (refusing constraints the grammar would drop),
``decoder`` builds matchers off the step loop, ``bitmask`` packs the step's masks for the device.
"""
from .bitmask import GrammarBitmask
from .decoder import GuidedDecoder, Matcher, bitmask_to_bool
from .schema import (
    ANY_JSON_OBJECT, XGRAMMAR_MISSING, check_json_schema, function_call_schema, grammar_from_text, import_xgrammar,
    schema_text,
)

__all__ = [
    "ANY_JSON_OBJECT", "XGRAMMAR_MISSING", "GrammarBitmask", "GuidedDecoder", "Matcher", "bitmask_to_bool",
    "check_json_schema", "function_call_schema", "grammar_from_text", "import_xgrammar", "schema_text",
]
