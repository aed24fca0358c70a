"""Walking a grammar like a sampler would, and checking what comes out (jsonschema is not installed).

A plain module (not conftest.py) so the guided test files can import it by name. The walk picks a random allowed
token under the mask, with extra weight on chosen pools of tokens (tokens that close strings and objects, so walks
end; hostile ones such as control characters, so a loose grammar shows), accepts it, and repeats until the matcher
terminates.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

PADDED_VOCAB = 49152 + 64  # logits wider than the SmolLM2 tokenizer, as with padded embeddings


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    """The real SmolLM2 tokenizer, from the directory the engine loads (converted once from the packaged GGUF)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def decoder(tokenizer):
    pytest.importorskip("xgrammar")
    from optimum_nvidia_core.guided import GuidedDecoder

    return GuidedDecoder(tokenizer, PADDED_VOCAB)


def token_pool(tokenizer, predicate) -> np.ndarray:
    """bool [PADDED_VOCAB]: the tokens whose decoded text satisfies ``predicate``."""
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    return np.array([bool(predicate(t)) for t in texts] + [False] * (PADDED_VOCAB - len(texts)))


@pytest.fixture(scope="module")
def closing_tokens(tokenizer):
    """Tokens with a quote, a closing bracket or a digit: they end strings and objects."""
    return token_pool(tokenizer, lambda t: any(ch in t for ch in '"}]0123456789'))


def random_walk(decoder, tokenizer, schema, seed, pools=(), max_steps=400) -> str:
    """The text of one walk; ``pools`` are (bool [V] token pool, probability of drawing from it when it has
    allowed tokens). Uses numpy (torch's threads crawl on a busy CPU)."""
    rng = random.Random(seed)
    matcher = decoder.matcher(schema)
    row = torch.zeros(PADDED_VOCAB, dtype=torch.bool)
    allowed = row.numpy()  # shares memory with row
    out: list[int] = []
    for _ in range(max_steps):
        assert matcher.fill_mask(row), f"the mask allows nothing after {tokenizer.decode(out)!r}"
        assert not allowed[len(tokenizer):].any(), "padding ids beyond the tokenizer must never be allowed"
        stops = [t for t in decoder.stop_token_ids if allowed[t]]
        assert bool(stops) == matcher.allowed_eos()
        if stops and rng.random() < 0.3:
            token = stops[0]
        else:
            candidates = allowed
            for pool, probability in pools:
                if rng.random() < probability and (allowed & pool).any():
                    candidates = allowed & pool
                    break
            token = int(rng.choice(np.flatnonzero(candidates)))
        assert matcher.accept(token)
        if matcher.is_terminated():
            assert token in decoder.stop_token_ids
            return tokenizer.decode(out)
        out.append(token)
    raise AssertionError(f"no termination within {max_steps} tokens: {tokenizer.decode(out)!r}")


def validate(value: Any, schema: dict, root: dict, path: str = "$") -> list[str]:
    """The ways ``value`` breaks ``schema`` (the keywords the guided tests use); [] when it is valid."""
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/") if schema["$ref"] != "#" else []:
            target = target[part]
        return validate(value, target, root, path)
    if "anyOf" in schema or "oneOf" in schema:
        branches = schema.get("anyOf") or schema["oneOf"]
        matching = [b for b in branches if not validate(value, b, root, path)]
        if not matching or ("oneOf" in schema and len(matching) > 1):
            return [f"{path}: matches {len(matching)} of the branches"]
        return []
    errors = []
    for part in schema.get("allOf", []):
        errors += validate(value, part, root, path)
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} != const {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in the enum")
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    checks = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
              "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "null": lambda v: v is None}
    if kinds is not None and not any(checks[k](value) for k in kinds):
        return errors + [f"{path}: {value!r} is not of type {kinds}"]
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: length {len(value)} outside [{schema.get('minLength')}, "
                          f"{schema.get('maxLength')}]")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            errors.append(f"{path}: {value} outside [{schema.get('minimum')}, {schema.get('maximum')}]")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for key, item in value.items():
            if key in properties:
                errors += validate(item, properties[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False or (properties and "object" in (kinds or [])):
                errors.append(f"{path}: unexpected property {key!r}")  # xgrammar is strict: no extra keys
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], root, f"{path}[{i}]")
    return errors
