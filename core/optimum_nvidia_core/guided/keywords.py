"""Which JSON Schema keywords the grammar enforces: the others are rewritten into ones it does, or refused.

xgrammar 0.2.9 accepts some keywords and silently drops them (measured: a violating value is still generated).
A constraint the caller asked for and did not get is a silent wrong answer, so this walk over every subschema
- merges ``allOf`` into one schema (properties and required joined, bounds tightened) where the parts agree;
- accepts ``oneOf`` only when its branches are mutually exclusive (then it is what anyOf generates);
- refuses the rest with a ValueError that names the keyword, where it is, and what to do;
- bounds the nesting depth, so a 500-level schema is a clear error and never a RecursionError.
``format`` values the grammar does not know stay annotations, as JSON Schema defines ``format`` by default.
"""
from __future__ import annotations

from typing import Any

MAX_DEPTH = 64  # nested subschemas; $defs + $ref express deeper (and recursive) shapes

# keyword -> what to do instead. Each one was checked: xgrammar generates values that break it.
UNENFORCED = {
    "not": "remove it, or state what is allowed with enum / anyOf",
    "if": "remove if/then/else, or use anyOf of the allowed shapes",
    "then": "remove if/then/else, or use anyOf of the allowed shapes",
    "else": "remove if/then/else, or use anyOf of the allowed shapes",
    "dependentRequired": "list the properties in 'required', or use anyOf of the allowed shapes",
    "dependentSchemas": "use anyOf of the allowed shapes",
    "dependencies": "list the properties in 'required', or use anyOf of the allowed shapes",
    "contains": "use 'items' (every item) or 'prefixItems'",
    "minContains": "use 'items' (every item) or 'prefixItems'",
    "maxContains": "use 'items' (every item) or 'prefixItems'",
    "$dynamicRef": "use a $ref to #/$defs/...",
    "$recursiveRef": "use a $ref to #/$defs/...",
}
# Keywords whose value holds subschemas, by shape.
_ONE = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties", "unevaluatedItems",
        "additionalItems")
_MANY = ("anyOf", "oneOf", "prefixItems")
_NAMED = ("properties", "patternProperties", "$defs", "definitions")
_ANNOTATIONS = ("title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly")
_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


def enforceable_schema(schema: dict[str, Any], what: str = "the JSON schema") -> dict[str, Any]:
    """``schema`` with allOf merged away; a ValueError naming the keyword for a constraint the grammar drops."""
    return _Walk(schema, what).node(schema, "$", 0)


class _Walk:
    def __init__(self, root: dict[str, Any], what: str):
        self.root, self.what = root, what

    def refuse(self, keyword: str, path: str, fix: str) -> ValueError:
        return ValueError(f"{self.what} uses {keyword!r} at {path}, which constrained decoding cannot enforce; {fix}")

    def node(self, node: Any, path: str, depth: int) -> Any:
        if not isinstance(node, dict):
            return node  # true / false / a bad value: the grammar compiler judges those
        if depth > MAX_DEPTH:
            raise ValueError(f"{self.what} nests deeper than {MAX_DEPTH} levels (at {path[:120]}...); flatten it, "
                             "or name the repeated part in $defs and point to it with $ref")
        if "allOf" in node:
            node = self.merge_all_of(node, path)
        self.check_keywords(node, path)
        out = dict(node)
        for key in _ONE:
            if isinstance(node.get(key), dict):
                out[key] = self.node(node[key], f"{path}.{key}", depth + 1)
        for key in _MANY + ("items",):
            if isinstance(node.get(key), list):
                out[key] = [self.node(s, f"{path}.{key}[{i}]", depth + 1) for i, s in enumerate(node[key])]
        for key in _NAMED:
            if isinstance(node.get(key), dict):
                out[key] = {k: self.node(s, f"{path}.{key}.{k}", depth + 1) for k, s in node[key].items()}
        return out

    def check_keywords(self, node: dict[str, Any], path: str) -> None:
        for keyword, fix in UNENFORCED.items():
            if keyword in node:
                raise self.refuse(keyword, path, fix)
        if node.get("uniqueItems") is True:
            raise self.refuse("uniqueItems", path, "remove it and drop duplicates from the parsed output")
        if node.get("nullable") is True:
            raise self.refuse("nullable", path, 'write anyOf: [<the schema>, {"type": "null"}] (JSON Schema)')
        ref = node.get("$ref")
        if isinstance(ref, str) and not (ref == "#" or ref.startswith("#/")):
            raise self.refuse("$ref", path, f"{ref!r} is not a local reference; copy the referenced schema into "
                                            "$defs and point to it with '#/$defs/<name>'")
        if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
            raise self.refuse("minLength/maxLength", path, "the grammar drops lengths beside 'pattern' or "
                              "'format'; put the length into the pattern (e.g. '^[a-z]{1,8}$')")
        if isinstance(node.get("oneOf"), list) and not self.exclusive(node["oneOf"]):
            raise self.refuse("oneOf", path, "its branches can match the same value and the grammar cannot "
                              "enforce 'exactly one'; use anyOf, or make the branches exclusive (different "
                              "types, or a required property with a different const in each)")

    # ---- allOf ------------------------------------------------------------------------------------------
    def merge_all_of(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        merged = {k: v for k, v in node.items() if k != "allOf"}
        parts = node["allOf"] if isinstance(node["allOf"], list) else [node["allOf"]]
        for i, part in enumerate(parts):
            part = self.resolve(part, f"{path}.allOf[{i}]")
            if "allOf" in part:
                part = self.merge_all_of(part, f"{path}.allOf[{i}]")
            for key, value in part.items():
                merged[key] = self.merge_value(key, merged[key], value, path) if key in merged else value
        return merged

    def merge_value(self, key: str, a: Any, b: Any, path: str) -> Any:
        if a == b or key in _ANNOTATIONS:
            return a
        if key == "properties" and isinstance(a, dict) and isinstance(b, dict):
            both = {k: {"allOf": [a[k], b[k]]} for k in a if k in b and a[k] != b[k]}
            return {**a, **b, **both}
        if key == "required":
            return list(dict.fromkeys([*a, *b]))
        if key in _LOWER_BOUNDS and _numbers(a, b):
            return max(a, b)
        if key in _UPPER_BOUNDS and _numbers(a, b):
            return min(a, b)
        if key == "additionalProperties" and (a is False or b is False):
            return False
        if key == "type":
            common = _common_types(a, b)
            if common:
                return common[0] if len(common) == 1 else common
            raise ValueError(f"{self.what} has allOf parts at {path} with types {a!r} and {b!r}: no value is "
                             "both; fix the schema")
        raise self.refuse("allOf", path, f"its parts give {key!r} different values ({a!r} and {b!r}) and "
                          "they cannot be merged into one; write the merged schema yourself")

    def resolve(self, node: Any, path: str) -> dict[str, Any]:
        """A local $ref followed to its target (one level), so an allOf part can be merged."""
        if not isinstance(node, dict):
            raise ValueError(f"{self.what} has a non-object allOf part at {path}; each part must be a schema")
        ref = node.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#"):
            return node
        target: Any = self.root
        for part in ref[1:].strip("/").split("/") if ref != "#" else []:
            if not isinstance(target, dict) or part not in target:
                raise ValueError(f"{self.what} has a $ref {ref!r} at {path} that points nowhere; fix the reference")
            target = target[part]
        return {**target, **{k: v for k, v in node.items() if k != "$ref"}}

    # ---- oneOf ------------------------------------------------------------------------------------------
    def exclusive(self, branches: list[Any]) -> bool:
        resolved = [self.resolve(b, "oneOf") if isinstance(b, dict) else b for b in branches]
        return all(_disjoint(a, b) for i, a in enumerate(resolved) for b in resolved[i + 1:])


def _disjoint(a: Any, b: Any) -> bool:
    """Whether no value can match both schemas, by the evidence a discriminated union gives."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return False
    values_a, values_b = _values(a), _values(b)
    if values_a is not None and values_b is not None and not any(v in values_b for v in values_a):
        return True
    types_a, types_b = _types(a.get("type")), _types(b.get("type"))
    if types_a and types_b and not _common_types(a["type"], b["type"]):
        return True
    props_a, props_b = a.get("properties") or {}, b.get("properties") or {}
    shared_required = set(a.get("required") or []) & set(b.get("required") or [])
    return any(_disjoint(props_a.get(k), props_b.get(k)) for k in shared_required)


def _values(schema: dict[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    return schema["enum"] if isinstance(schema.get("enum"), list) else None


def _types(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    return {t for t in value if isinstance(t, str)} if isinstance(value, list) else set()


def _common_types(a: Any, b: Any) -> list[str]:
    """The JSON types both declarations allow (an integer is also a number)."""
    types_a, types_b = _types(a), _types(b)
    common = types_a & types_b
    if {"integer", "number"} & types_a and {"integer", "number"} & types_b:
        common.add("integer")
    return sorted(common)


def _numbers(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
