"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

Clients (the openai SDK, LangChain, LlamaIndex) turn these into their own typed exceptions
(BadRequestError, AuthenticationError, NotFoundError, ...). No stack trace ever leaves the server.
"""
from __future__ import annotations

from typing import Any

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    413: "invalid_request_error", 422: "invalid_request_error", 500: "server_error", 503: "service_unavailable",
}


class APIError(Exception):
    """A request failed with ``status``; the message names the problem and the fix."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def __reduce__(self):  # crosses process boundaries (Ray) with its status intact
        return _rebuild, (self.status, self.message, self.param, self.code)


def _rebuild(status: int, message: str, param: str | None, code: str | None) -> APIError:
    return APIError(status, message, param=param, code=code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else str(status)}}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable sentence from pydantic's error list, and the first offending field."""
    parts, first = [], None
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        first = first or loc or None
        parts.append(f"{loc}: {err.get('msg', 'invalid value')}" if loc else str(err.get("msg", "invalid value")))
    return "; ".join(parts) or "invalid request body", first


def from_exception(exc: BaseException) -> APIError:
    """The API error for an exception raised while serving (Ray wraps the original one as ``cause``)."""
    from pydantic import ValidationError

    from ..request_checks import ContextLengthError
    from ..request_stream import EngineError, RequestFailed

    exc = getattr(exc, "cause", None) or exc
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        message, param = validation_message(exc.errors())
        return APIError(400, message, param=param)
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), code="context_length_exceeded")  # OpenAI's code: clients trim on it
    if isinstance(exc, (ValueError, TypeError)):  # the core names bad inputs with these
        return APIError(400, str(exc))
    if isinstance(exc, RequestFailed):  # this request alone, in a live engine: no "retry shortly"
        if exc.bad_request:
            return APIError(400, str(exc), code="request_failed")
        return APIError(500, f"the engine failed on this request: {exc}", code="request_failed")
    if isinstance(exc, EngineError):
        return APIError(503, f"the engine could not serve this request ({exc}); retry shortly",
                        code="engine_unavailable")
    return APIError(500, "internal server error; the server log has the details", code="internal_error")
