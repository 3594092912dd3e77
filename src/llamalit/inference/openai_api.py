"""The OpenAI API's request checks and response shapes, for :mod:`llamalit.inference.server`.

Every bad request becomes one :class:`ApiError` (HTTP 400 unless said) whose message names the field, its
value and what to send instead; the body is the OpenAI error object, so the ``openai`` client raises
``BadRequestError`` with that message.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llamalit.inference.engine import SamplingParams
from llamalit.inference.templates import Template, check_messages

MAX_STOP = 16


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.kind = message, status, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass
class Job:
    """A checked request: what the engine gets and how the answer is shaped."""

    prompt_ids: list[int]
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    continuation: bool = True  # False: a reply of its own (leading whitespace dropped)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; an ApiError saying where it is malformed."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as e:
        raise ApiError(f"malformed JSON body: not UTF-8 ({e}); send a UTF-8 JSON object") from e
    except json.JSONDecodeError as e:
        raise ApiError(f"malformed JSON body: {e.msg} at line {e.lineno} column {e.colno}; "
                       "send a JSON object such as {\"prompt\": \"Once upon a time\"}") from e
    if not isinstance(body, dict):
        raise ApiError(f"malformed JSON body: expected an object, got {type(body).__name__}; "
                       "send a JSON object such as {\"prompt\": \"Once upon a time\"}")
    return body


def _number(body: Mapping, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(f"{key}={value!r}: must be a number", param=key)
    return float(value)


def _integer(body: Mapping, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{key}={value!r}: must be an integer", param=key)
    return value


def check_model(body: Mapping, served: str) -> None:
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(f"model={model!r}: not served here; this server serves {served!r} (GET /v1/models)",
                       param="model", kind="invalid_request_error")


def sampling(body: Mapping, prompt_len: int, context: int, default_max: int) -> SamplingParams:
    """The sampling settings of an OpenAI request, checked against the prompt and the model's context."""
    room = context - prompt_len
    if room < 1:
        raise ApiError(f"prompt: {prompt_len} tokens fill the model's context of {context} tokens (no room to "
                       "generate); shorten the prompt or the conversation", param="prompt")
    if body.get("n") not in (None, 1):
        raise ApiError(f"n={body.get('n')!r}: only n=1 is supported; send one request per completion", param="n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key)
    if max_tokens is None:
        max_tokens = min(default_max, room)
    elif max_tokens < 1:
        raise ApiError(f"{key}={max_tokens}: must be >= 1", param=key)
    elif max_tokens > room:
        raise ApiError(f"{key}={max_tokens}: the prompt ({prompt_len} tokens) + {key} exceed the model's context "
                       f"of {context} tokens; at most {room} here", param=key)
    temperature = _number(body, "temperature")
    temperature = 1.0 if temperature is None else temperature
    if temperature < 0:
        raise ApiError(f"temperature={temperature:g}: must be >= 0 (0 = greedy, 1 = the model's distribution)",
                       param="temperature")
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(f"top_p={top_p:g}: must be in (0, 1] (nucleus mass; 1 = off)", param="top_p")
    top_k = _integer(body, "top_k")
    if top_k is not None and top_k < -1:
        raise ApiError(f"top_k={top_k}: must be >= 1 (keep the k most likely tokens), or 0 / -1 for off",
                       param="top_k")
    seed = _integer(body, "seed")
    min_tokens = _integer(body, "min_tokens") or 0
    if not 0 <= min_tokens <= max_tokens:
        raise ApiError(f"min_tokens={min_tokens}: must be in [0, {key}={max_tokens}] (EOS is held back until "
                       "that many tokens)", param="min_tokens")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                          top_k=top_k if top_k and top_k > 0 else None,
                          top_p=None if top_p in (None, 1.0) else top_p, seed=seed, min_tokens=min_tokens)


def stop_strings(body: Mapping) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(f"stop={body.get('stop')!r}: must be a string or a list of up to {MAX_STOP} strings",
                       param="stop")
    return [s for s in stop if s]


def stream_flags(body: Mapping) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(f"stream={stream!r}: must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(f"stream_options={options!r}: must be an object such as {{\"include_usage\": true}}",
                       param="stream_options")
    return stream, bool(options.get("include_usage", False))


def completion_job(body: Mapping, tok: Any, template: Template, context: int, default_max: int) -> Job:
    """``/v1/completions``: ``prompt`` (a string, a list of one string, or token ids), or llamalit's
    ``instruction`` (+ ``input``) put in the model's template."""
    if body.get("instruction") is not None:
        instruction, extra = body.get("instruction"), body.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise ApiError("instruction and input: must be strings", param="instruction")
        ids, continuation = template.encode(tok, template.format_instruction(instruction, extra)), \
            template.continuation
    else:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tok.encode(prompt, bos=True, eos=False)
        elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool)
                                                         for i in prompt):
            if not all(0 <= i < tok.vocab_size for i in prompt):
                raise ApiError(f"prompt: token ids must be in [0, {tok.vocab_size})", param="prompt")
            ids = list(prompt)
        else:
            raise ApiError("prompt: must be a string, a list of one string, or a list of token ids "
                           "(one completion per request)", param="prompt")
        continuation = True
    return _job(body, ids, context, default_max, [], continuation)


def chat_job(body: Mapping, tok: Any, template: Template, context: int, default_max: int) -> Job:
    """``/v1/chat/completions``: ``messages`` in the model's template; its stop strings join the request's."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise ApiError("messages: required, a list of {\"role\": ..., \"content\": ...} objects", param="messages")
    try:
        text = template.format_chat(check_messages(messages))
    except ValueError as e:
        raise ApiError(str(e), param="messages") from e
    return _job(body, template.encode(tok, text), context, default_max, template.stop, template.continuation)


def _job(body: Mapping, ids: list[int], context: int, default_max: int, stop: list[str],
         continuation: bool) -> Job:
    params = sampling(body, len(ids), context, default_max)
    stream, usage = stream_flags(body)
    return Job(ids, params, list(stop) + stop_strings(body), stream, usage, continuation)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str | None, use: dict | None, chat: bool,
                    chunk: bool, first: bool = False) -> dict:
    """A response (``chunk`` False) or a streamed chunk, in the shape of the route (``chat`` or not)."""
    if chat:
        if chunk:
            delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    if use is not None:
        body["usage"] = use
    return body
