"""ToolCallStream: content streams, tool-call markup is held back and parsed at the end, nothing is lost."""
from __future__ import annotations

from optimum_nvidia_core.outputs import RequestOutput
from optimum_nvidia_core.tool_stream import ToolCallStream

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def _run(pieces: list[str], forced: bool = False) -> tuple[str, RequestOutput]:
    stream = ToolCallStream(source=None, tools=TOOLS, forced=forced)
    shown, last = "", None
    for k, piece in enumerate(pieces):
        delta = RequestOutput(request_id="r", text=piece, finished=k == len(pieces) - 1)
        for out in stream.feed(delta):
            shown += out.text
            last = out
    return shown, last


def test_content_before_a_split_marker_streams_and_the_call_is_parsed():
    shown, last = _run(["Let me check. <to", "ol_call>\n{\"name\": \"get_weather\", ",
                        "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"])
    assert shown.strip() == "Let me check."
    assert last.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in last.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_a_bare_json_call_is_held_back():
    shown, last = _run(["{\"name\": \"get_weather\",", " \"arguments\": {\"city\": \"Rome\"}}"])
    assert shown == ""
    assert last.tool_calls[0].arguments == {"city": "Rome"}


def test_text_that_only_looked_like_a_marker_is_released():
    shown, last = _run(["a <t", "able> b"])
    assert shown == "a <table> b"
    assert last.tool_calls == []


def test_forced_calls_show_no_content():
    shown, last = _run(["{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}"], forced=True)
    assert shown == "" and last.tool_calls[0].name == "get_weather"
