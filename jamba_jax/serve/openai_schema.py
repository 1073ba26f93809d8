"""The OpenAI request bodies the server accepts (``/v1/completions``, ``/v1/chat/completions``) and the
response objects it writes, following the OpenAI API reference. Fields this server cannot honour
(``n > 1``, ``logprobs``, ``echo``, ``best_of > 1``, tools) are refused, never ignored."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engine import Params

TokenIds = list[int]


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # an extension (vLLM's): -1 or None = off
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None

    def params(self, default_max_tokens: int) -> Params:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        top_k = None if self.top_k in (None, -1, 0) else self.top_k
        return Params(max_tokens=self.max_tokens or default_max_tokens, temperature=self.temperature,
                      top_k=top_k, top_p=None if self.top_p >= 1.0 else self.top_p, seed=self.seed or 0,
                      stop=tuple(stop))

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


def _refused_when_set(field: str):
    """A validator refusing ``field`` when true (an OpenAI option this server does not support)."""
    def check(cls, value):
        if value:
            raise ValueError(f"{field} is not supported")
        return value

    return field_validator(field)(classmethod(check))


class CompletionRequest(_Common):
    prompt: str | TokenIds | list[str] | list[TokenIds]
    echo: bool = False
    logprobs: int | None = Field(default=None, le=0)
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: None = None

    _no_echo = _refused_when_set("echo")

    @property
    def single_prompt(self) -> str | TokenIds:
        """The one prompt (a batch of one is accepted; several are refused: use concurrent requests)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError("prompt: one prompt per request is supported; send concurrent requests")
            p = p[0]
        if isinstance(p, list) and not p:
            raise ValueError("prompt is empty")
        return p


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    tools: None = None

    _no_logprobs = _refused_when_set("logprobs")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish: str | None, use: dict | None, *, chunk: bool = False) -> dict:
    """A ``text_completion`` object (also each streamed chunk: ``finish`` None until the last)."""
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if use is not None or not chunk:
        out["usage"] = use
    return out


def chat_completion(rid: str, model: str, text: str, finish: str | None, use: dict | None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}], "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, use: dict | None = None) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        out["usage"] = use
        out["choices"] = []
    return out


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
