"""The OpenAI-compatible HTTP app (FastAPI): routes, API key, body limit, SSE framing, disconnects, errors.

``create_app(engine)`` serves any engine object with ``model_names``, ``start/stop``, ``check_ready``, the
coroutine ``replica_stats()`` (replica -> its engine's ``stats()``, for /metrics) and the async-generator methods
``chat(req, timer)`` / ``completions(req, timer)``: the in-process ``LocalEngine``, or the Ray Serve replicas
behind ``ray_serve.ReplicaPool`` — one ingress for both.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import APIError, error_body, from_exception, validation_message
from .metrics import RequestTimer, ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 8 * 2**20
CLIENT_CLOSED = 499  # nginx's status for "the client hung up"; only ever seen in metrics


def create_app(engine: Any, *, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    metrics = ServerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="optimum-nvidia", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _add_error_handlers(app)
    key = api_key.encode() if api_key else None

    def authorize(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.strip().encode(), key):  # constant time: no timing oracle on the key
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name not in engine.model_names:
            raise APIError(404, f"the model {name!r} does not exist here; this server serves {engine.model_names}",
                           param="model", code="model_not_found")

    async def generate(request: Request, endpoint: str, model: type[BaseModel]) -> Response:
        try:
            authorize(request)
            req = model.model_validate(await read_json(request))
            check_model(req.model)
            engine.check_ready()
        except (APIError, ValidationError) as exc:  # refused before it started: counted all the same
            metrics.count(endpoint, getattr(exc, "status", 400))
            raise
        timer = metrics.start()
        items = getattr(engine, endpoint)(req, timer)
        status = 200
        try:
            first = await until_disconnect(request, anext(items))
        except ClientGone:
            status = CLIENT_CLOSED
            return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:
            error = from_exception(exc)
            status = error.status
            if status >= 500:
                logger.exception("request failed")
            raise error from None
        finally:
            if status != 200 or not req.stream:
                await items.aclose()
                timer.finish()
                metrics.count(endpoint, status)
        if not req.stream:
            return JSONResponse(first)
        events = sse_events(first, items, req.include_usage, timer, lambda s: metrics.count(endpoint, s))
        return ClosingStreamingResponse(events, media_type="text/event-stream",
                                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat", ChatCompletionRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completions", CompletionRequest)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [_model_card(name) for name in engine.model_names]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> dict:
        authorize(request)
        check_model(name)
        return _model_card(name)

    @app.get("/health")
    async def health() -> dict:
        engine.check_ready()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        try:
            engine_stats = await engine.replica_stats()
        except Exception:  # noqa: BLE001 - an engine (re)starting: the server's own metrics still go out
            logger.warning("could not read the engines' stats for /metrics", exc_info=True)
            engine_stats = {}
        return Response(await asyncio.to_thread(metrics.exposition, engine_stats), media_type=CONTENT_TYPE_LATEST)

    return app


# ---- request and response plumbing ----------------------------------------------------------------------------
class ClientGone(Exception):
    """The client closed the connection before the answer was ready."""


async def read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc}); send a JSON object") from None


async def until_disconnect(request: Request, awaitable: Any) -> Any:
    """Await ``awaitable``, cancelling it (which aborts its engine request) if the client disconnects first."""
    work = asyncio.ensure_future(awaitable)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            raise ClientGone()
    return work.result()


async def sse_events(first: dict, items: AsyncIterator[dict], include_usage: bool, timer: RequestTimer,
                     count: Any) -> AsyncIterator[bytes]:
    """Server-sent events; the serving layer's last usage chunk goes out only when the client asked for it."""
    status, item = CLIENT_CLOSED, first
    try:
        while item is not None:
            if include_usage or item.get("choices") or "usage" not in item:
                yield b"data: " + json.dumps(item, ensure_ascii=False).encode() + b"\n\n"
            item = await anext(items, None)
        status = 200
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream, OpenAI-style
        error = from_exception(exc)
        status = error.status
        if status >= 500:
            logger.exception("stream failed")
        yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
    finally:
        await items.aclose()
        timer.finish()
        count(status)
    yield b"data: [DONE]\n\n"


class ClosingStreamingResponse(StreamingResponse):
    """Closes its event generator when the client hangs up, at once: that aborts the request and frees its KV
    blocks then, not whenever the garbage collector gets to it."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


class BodyLimit:
    """413 for a body over ``max_bytes``: at once from Content-Length, else while a chunked body arrives."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse(_too_large(self.max_bytes).body(), status_code=413)(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _too_large(self.max_bytes)
            return message

        await self.app(scope, limited, send)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"the request body is over {max_bytes} bytes; send a smaller one", code="body_too_large")


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "optimum-nvidia"}


def _add_error_handlers(app: FastAPI) -> None:
    def respond(error: APIError) -> JSONResponse:
        headers = {"Retry-After": "5"} if error.status == 503 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(ValidationError)
    async def bad_body(request: Request, exc: ValidationError) -> JSONResponse:
        message, param = validation_message(exc.errors())
        return respond(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        error = from_exception(exc)
        if error.status >= 500:
            logger.exception("request failed")
        return respond(error)
