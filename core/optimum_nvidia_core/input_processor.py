"""Input processing: a prompt (text or token ids) or chat messages become checked token ids and the
SamplingParams to generate with. Runs on the caller's thread, before anything reaches the engine core (async
callers come through a worker thread, never on their event loop)."""
from __future__ import annotations

from typing import Any

from .engine.interface import EngineInfo, check_token_ids
from .request_checks import ContextLengthError, as_token_ids, check_kv_room
from .sampling_params import SamplingParams
from .text_checks import check_unicode


class InputProcessor:
    def __init__(self, tokenizer: Any, info: EngineInfo):
        self.tokenizer = tokenizer
        self.info = info
        self._chat = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str or a list of token ids, got {type(text).__name__}")
        check_unicode(text, "the prompt")
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def check_prompt(self, prompt: Any, params: SamplingParams) -> list[int]:
        """Token ids for ``prompt``, or an error that names the problem and the fix."""
        prompt = as_token_ids(prompt)
        if not isinstance(prompt, (str, list)):
            raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        check_token_ids(ids, params, self.info.vocab_size)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        check_kv_room(len(ids), params, self.info.num_blocks * self.info.block_size)
        max_seq_len = self.info.max_seq_len
        if len(ids) >= max_seq_len:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens but max_seq_len is {max_seq_len}; shorten it, set "
                "SamplingParams(truncate_prompt_tokens=N) to keep the last N tokens, or build with a larger "
                "max_seq_len")
        if params.guided_json is not None:
            from .guided import check_json_schema

            check_json_schema(params.guided_json, "guided_json")
        room = max_seq_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise ContextLengthError(
                f"max_tokens={params.max_tokens} does not fit: the prompt has {len(ids)} tokens and max_seq_len is "
                f"{max_seq_len}, leaving room for {room}; lower max_tokens or pass max_tokens=None")
        return ids

    def prepare_chat(self, messages: list[dict], params: SamplingParams, tools: list[dict] | None,
                     tool_choice: str | None) -> tuple[list[int], SamplingParams, Any]:
        """(prompt ids, params to generate with, the chat request's tool plan) for one chat turn."""
        if self._chat is None:
            from pathlib import Path

            from .chat_request import ChatRequestBuilder

            self._chat = ChatRequestBuilder(self.tokenizer, Path(self.info.model_dir))
        return self._chat.prepare(messages, params, tools=tools, tool_choice=tool_choice)
