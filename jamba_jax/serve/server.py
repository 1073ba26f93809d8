"""An OpenAI-compatible HTTP server (FastAPI on uvicorn) over a running ``Engine``.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (the OpenAI schemas; ``stream: true`` as
server-sent events; ``usage`` counts), ``GET /v1/models``, ``GET /health``. A bad request gets HTTP 400
with an OpenAI error body, a full queue 429; a client that disconnects cancels its request, which frees
its slot. Chat prompts are rendered with the checkpoint's chat template.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from ..chat_template import load_chat_template, render_chat
from . import openai_schema as schema
from .engine import Engine, Event, QueueFull

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
DISCONNECT_POLL_S = 0.25


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
    return JSONResponse(schema.error_body(message, kind, param), status_code=status)


def _validation_message(e: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    first = e.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


def create_app(engine: Engine, model_name: str) -> FastAPI:
    """The ASGI app serving ``engine`` under the name ``model_name``."""
    app = FastAPI(title="jamba_jax", docs_url=None, redoc_url=None)
    template, special = load_chat_template(engine.model.checkpoint_dir)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request, e):  # FastAPI would answer 422; OpenAI answers 400
        message, param = _validation_message(e)
        return _error(400, message, param=param)

    @app.get("/health")
    async def health():
        status = "error" if engine.error is not None else "ok"
        return JSONResponse({"status": status, "slots": engine.slots, "busy_slots": engine.busy_slots,
                             "waiting": engine.waiting, "compiles_after_warm_up": engine.compiles},
                            status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "jamba_jax", "max_model_len": engine.max_length}]}

    async def parse(request: Request, kind):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return None, _error(400, "the request body must be a JSON object")
        try:
            return kind.model_validate(body), None
        except ValidationError as e:
            message, param = _validation_message(e)
            return None, _error(400, message, param=param)

    def submit(prompt, body, loop, events):
        def listener(event: Event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        return engine.submit(prompt, body.params(DEFAULT_MAX_TOKENS), listener=listener)

    async def follow(stream, events: asyncio.Queue, request: Request):
        """The stream's events as they come; a client gone away cancels the request (freeing its slot)."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        stream.cancel()
                        return
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:  # also when the response is abandoned mid-stream (the client disconnected)
            if stream.finish_reason is None:
                stream.cancel()

    async def run(request: Request, body, prompt, chat: bool):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            stream = submit(prompt, body, loop, events)
        except QueueFull as e:
            return _error(429, str(e), kind="rate_limit_error")
        except ValueError as e:
            return _error(400, str(e))
        if engine.error is not None:
            return _error(500, f"the engine stopped: {engine.error}", kind="server_error")
        rid = schema.new_id("chatcmpl" if chat else "cmpl")

        def use():
            return schema.usage(len(stream.prompt), len(stream.tokens))

        def finish(reason):
            return "length" if reason == "length" else "stop"

        if not body.stream:
            text, reason = [], None
            async for event in follow(stream, events, request):
                text.append(event.text)
                reason = event.finish_reason
            if reason is None or reason == "cancelled":
                return _error(499, "the client disconnected")
            if reason == "error":
                return _error(500, f"the engine stopped: {engine.error}", kind="server_error")
            make = schema.chat_completion if chat else schema.completion
            return make(rid, model_name, "".join(text), finish(reason), use())

        async def sse():
            def data(obj) -> str:
                return f"data: {json.dumps(obj)}\n\n"

            if chat:
                yield data(schema.chat_chunk(rid, model_name, {"role": "assistant", "content": ""}, None))
            async for event in follow(stream, events, request):
                reason = None if event.finish_reason is None else finish(event.finish_reason)
                if event.finish_reason == "error":
                    yield data(schema.error_body(f"the engine stopped: {engine.error}", "server_error"))
                    return
                if not event.text and reason is None:
                    continue
                if chat:
                    delta = {"content": event.text} if event.text else {}
                    yield data(schema.chat_chunk(rid, model_name, delta, reason))
                else:
                    yield data(schema.completion(rid, model_name, event.text, reason, None, chunk=True))
            if body.include_usage:
                if chat:
                    yield data(schema.chat_chunk(rid, model_name, {}, None, use()))
                else:
                    last = schema.completion(rid, model_name, "", None, use(), chunk=True)
                    last["choices"] = []
                    yield data(last)
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, error = await parse(request, schema.CompletionRequest)
        if error is not None:
            return error
        try:
            prompt = body.single_prompt
        except ValueError as e:
            return _error(400, str(e), param="prompt")
        return await run(request, body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, error = await parse(request, schema.ChatRequest)
        if error is not None:
            return error
        if engine.model.tokenizer is None:
            return _error(400, "chat completions need the model's tokenizer (tokenizer.json)")
        try:
            text = render_chat([m.model_dump() for m in body.messages], template, special)
        except ValueError as e:
            return _error(400, str(e), param="messages")
        ids = engine.model.tokenizer.encode(text, add_special_tokens=False).ids
        return await run(request, body, ids, chat=True)

    return app


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """Runs the server until interrupted (the engine must be started)."""
    import uvicorn

    uvicorn.run(create_app(engine, model_name), host=host, port=port, log_level=log_level)
