"""Review 3: OpenAI fields that change the answer and that the server does not implement are refused with a
400 that names them; they were dropped silently (unknown fields are ignored), so a logit_bias that bans tokens
still got them."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

pytest.importorskip("fastapi")
from optimum_nvidia_core.server.errors import from_exception  # noqa: E402
from optimum_nvidia_core.server.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402

HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("model, body, named", [
    (ChatCompletionRequest, {"messages": HI, "logit_bias": {"50256": -100}}, "logit_bias"),
    (CompletionRequest, {"prompt": "a", "logit_bias": {"11": -100}}, "logit_bias"),
    (CompletionRequest, {"prompt": "a", "best_of": 3}, "best_of=3"),
])
def test_unsupported_fields_that_change_the_answer_are_refused(model, body, named):
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    error = from_exception(info.value)
    assert error.status == 400 and named in error.message


def test_their_neutral_values_still_pass():
    assert ChatCompletionRequest.model_validate({"messages": HI, "logit_bias": {}, "best_of": 1}).n == 1
    assert CompletionRequest.model_validate({"prompt": "a", "logit_bias": None, "n": 2, "best_of": 2}).n == 2
