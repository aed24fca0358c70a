"""ToolCallStream: content streams, tool-call markup is held back and parsed at the end of each completion,
reasoning streams apart, and nothing is lost (text, token ids, logprobs)."""
from __future__ import annotations

import pytest

from optimum_nvidia_core.outputs import RequestOutput
from optimum_nvidia_core.tool_formats import FallbackFormat, HermesFormat, Llama3Format, MistralFormat, ToolPlan
from optimum_nvidia_core.tool_stream import ToolCallStream

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def _plan(fmt=None, tool_choice=None, tools=TOOLS, **details):
    return ToolPlan.build(fmt or FallbackFormat(), tools, tool_choice, **details)


def _run(pieces, plan=None, ids=None):
    """Feed one completion's pieces (one token each); returns (content shown, reasoning shown, outputs)."""
    stream = ToolCallStream(source=None, plan=plan or _plan())
    outs = []
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        delta = RequestOutput(request_id="r", text=piece, token_ids=[ids[k] if ids else 100 + k],
                              logprobs=[{100 + k: -0.5}], finished=last, finish_reason="stop" if last else None)
        outs += stream.feed(delta)
    return "".join(o.text for o in outs), "".join(o.reasoning or "" for o in outs), outs


def test_content_before_a_split_marker_streams_and_the_call_is_parsed():
    shown, _, outs = _run(["Let me check. <to", "ol_call>\n{\"name\": \"get_weather\", ",
                           "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"])
    assert shown.strip() == "Let me check."
    assert outs[-1].finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in outs[-1].tool_calls] == [("get_weather", {"city": "Paris"})]


def test_every_token_id_and_logprob_arrives_even_while_a_call_is_held():
    """Issue 14 item 4 / issue 15 item 14: a tool-call reply's token_ids and logprobs are complete."""
    pieces = ["{\"name\": \"get_weather\",", " \"arguments\":", " {\"city\": \"Rome\"}}"]
    shown, _, outs = _run(pieces)
    assert shown == "" and outs[-1].tool_calls[0].arguments == {"city": "Rome"}
    assert [t for o in outs for t in o.token_ids] == [100, 101, 102]
    assert [lp for o in outs for lp in o.logprobs] == [{100: -0.5}, {101: -0.5}, {102: -0.5}]


def test_text_that_only_looked_like_a_marker_is_released():
    shown, _, outs = _run(["a <t", "able> b"])
    assert shown == "a <table> b" and outs[-1].tool_calls == []


def test_forced_calls_show_no_content():
    shown, _, outs = _run(["{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}"],
                          _plan(tool_choice="any"))
    assert shown == "" and outs[-1].tool_calls[0].name == "get_weather"


@pytest.mark.parametrize("fmt, pieces, ids, marker", [
    # Mistral's [TOOL_CALLS] and Llama's <|python_tag|> are special tokens: skipped, they leave no text
    (MistralFormat(), ["", " [{\"name\": \"get_weather\",", " \"arguments\": {\"city\": \"Oslo\"}}]"], [7, 8, 9],
     "[TOOL_CALLS]"),
    (Llama3Format(), ["", "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}"], [7, 8],
     "<|python_tag|>"),
])
def test_call_openers_count_whether_special_tokens_are_shown_or_not(fmt, pieces, ids, marker):
    for shown_pieces in (pieces, [marker] + pieces[1:]):
        shown, _, outs = _run(shown_pieces, _plan(fmt, marker_ids={7: marker}), ids)
        assert shown == "" and [(c.name, c.arguments) for c in outs[-1].tool_calls] == \
            [("get_weather", {"city": "Oslo"})]


def test_a_skipped_opener_that_starts_no_call_stays_skipped():
    shown, _, outs = _run(["Hi ", "", "[oops"], _plan(MistralFormat(), marker_ids={7: "[TOOL_CALLS]"}), [5, 7, 8])
    assert shown == "Hi [oops" and outs[-1].tool_calls == []
    shown, _, _ = _run(["Hi ", "[TOOL_CALLS]", "[oops"], _plan(MistralFormat(), marker_ids={7: "[TOOL_CALLS]"}),
                       [5, 7, 8])
    assert shown == "Hi [TOOL_CALLS][oops"  # shown special tokens stay shown


def test_mistral_parallel_calls_and_ids():
    shown, _, outs = _run(["Checking.", "[TOOL_CALLS]", " [{\"name\": \"get_weather\", \"arguments\": {\"city\": "
                           "\"Oslo\"}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}]"],
                          _plan(MistralFormat()))
    calls = outs[-1].tool_calls
    assert shown == "Checking." and [c.arguments["city"] for c in calls] == ["Oslo", "Rome"]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)


def test_reasoning_streams_apart_and_calls_start_after_it():
    plan = _plan(HermesFormat(), reasoning=True, thinking_open=True)
    shown, reasoning, outs = _run(["Weather", " needs a tool.</th", "ink>\n\n<tool_call>\n{\"name\": \"get_weather\", "
                                   "\"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"], plan)
    assert reasoning == "Weather needs a tool." and shown == ""
    assert outs[0].reasoning == "Weather" and outs[-1].tool_calls[0].arguments == {"city": "Oslo"}
    shown, reasoning, _ = _run(["<think>", "hmm", "</think>", "\n\nThe answer: 4"], _plan(tools=None, reasoning=True))
    assert (reasoning, shown) == ("hmm", "The answer: 4")
    shown, reasoning, _ = _run(["No thinking ", "here."], _plan(tools=None, reasoning=True))
    assert (reasoning, shown) == ("", "No thinking here.")


def test_n_completions_are_parsed_apart():
    """Issue 15 item 6: n=3 with a forced call interleaves three completions; each keeps its own call."""
    stream = ToolCallStream(source=None, plan=_plan(tool_choice="get_weather"))
    cities = ["Oslo", "Rome", "Lima"]
    parts = [[f"{{\"name\": \"get_weather\", ", f"\"arguments\": {{\"city\": \"{c}\"}}}}"] for c in cities]
    outs = []
    for step in range(2):
        for i in range(3):
            last = step == 1
            outs += stream.feed(RequestOutput(request_id="r", text=parts[i][step], token_ids=[10 * i + step],
                                              index=i, finish_reason="stop" if last else None,
                                              finished=last and i == 2))
    by_index = {o.index: o for o in outs if o.finish_reason}
    assert {i: by_index[i].tool_calls[0].arguments["city"] for i in range(3)} == dict(enumerate(cities))
    assert all(by_index[i].finish_reason == "tool_calls" and by_index[i].token_ids == [10 * i, 10 * i + 1]
               for i in range(3))
