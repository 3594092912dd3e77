"""An OpenAI-compatible HTTP server over the batching :class:`~llamalit.inference.engine.Engine` (FastAPI).

Routes: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true``: server-sent events in
the OpenAI chunk format, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (slots, queue,
finished counts), and the web page at ``/``. With ``api_key`` the ``/v1`` routes want
``Authorization: Bearer KEY``. A full queue answers 429; bad requests 400 with one message
(:mod:`~llamalit.inference.openai_api`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from llamalit.inference.engine import Engine, QueueFull
from llamalit.inference.openai_api import (
    ApiError,
    Job,
    chat_job,
    check_model,
    completion_body,
    completion_job,
    new_id,
    parse_json,
    usage,
)
from llamalit.inference.streaming import StreamDecoder
from llamalit.inference.templates import StopScanner, Template

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.5


class _Run:
    """One job in the engine, read as text pieces: detokenized, cut at stop strings, cancelled when left."""

    def __init__(self, engine: Engine, tok: Any, job: Job):
        self.job, self.tok = job, tok
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[int | None] = asyncio.Queue()
        self.finish: str | None = None
        self.req = engine.submit(job.prompt_ids, job.params, tok.eos_id, sink=self._sink)

    def _sink(self, item: int | None) -> None:  # called from the engine's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def pieces(self, request: Request) -> AsyncIterator[str]:
        """Text as it is decoded; ``finish`` is set at the end. The request is cancelled however this ends."""
        decoder, scanner = StreamDecoder(self.tok, self.job.prompt_ids), StopScanner(self.job.stop)
        started = self.job.continuation
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.finish = "cancelled"
                        return
                    continue
                items = [item]
                while item is not None and not self.queue.empty():  # a backlog goes out as one chunk
                    item = self.queue.get_nowait()
                    items.append(item)
                text = "".join(decoder.flush() if i is None else decoder.push(i) for i in items)
                if not started:  # a reply of its own: no leading whitespace
                    text = text.lstrip()
                    started = bool(text)
                out = scanner.push(text) + (scanner.flush() if item is None else "")
                if out:
                    yield out
                if scanner.stopped:
                    self.finish = "stop"
                    return
                if item is None:
                    reason = self.req.finish_reason
                    if reason == "error":
                        raise ApiError(f"generation failed: {self.req.error}", status=500, kind="server_error")
                    self.finish = "length" if reason == "length" else "stop"
                    return
        finally:
            self.req.cancel()

    @property
    def completion_tokens(self) -> int:
        return self.req.n_generated


def create_app(engine: Engine, tok: Any, template: Template, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app; the engine is started with the app and closed with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="llamalit", lifespan=lifespan, docs_url=None, redoc_url=None)
    created = int(time.time())

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError("missing or wrong API key: send the header 'Authorization: Bearer <api_key>'",
                           status=401, kind="authentication_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            authorize(request)
        except ApiError as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "llamalit",
             "max_model_len": engine.context, "template": template.name}]})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("llamalit.inference").joinpath("static/index.html").read_text("utf-8"))

    async def answer(request: Request, chat: bool) -> Response:
        try:
            authorize(request)
            body = parse_json(await request.body())
            check_model(body, model_name)
            build = chat_job if chat else completion_job
            job = build(body, tok, template, engine.context, default_max_tokens)
            run = _Run(engine, tok, job)
        except ApiError as e:
            return error(e)
        except QueueFull as e:
            return error(ApiError(str(e), status=429, kind="rate_limit_error"))
        except ValueError as e:
            return error(ApiError(str(e)))
        rid = new_id("chatcmpl" if chat else "cmpl")
        if job.stream:
            return StreamingResponse(_events(run, request, rid, model_name, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text = "".join([piece async for piece in run.pieces(request)])
        except ApiError as e:
            return error(e)
        if run.finish == "cancelled":
            return Response(status_code=499)
        use = usage(len(job.prompt_ids), run.completion_tokens)
        return JSONResponse(completion_body(rid, model_name, text, run.finish, use, chat, chunk=False))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await answer(request, chat=True)

    return app


def _sse(data: Mapping | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(run: _Run, request: Request, rid: str, model: str, chat: bool) -> AsyncIterator[str]:
    """The SSE stream: a chunk per text piece (the first carries the assistant role), a last chunk with the
    finish reason (and usage when asked), then ``[DONE]``."""
    if chat:
        yield _sse(completion_body(rid, model, "", None, None, chat, chunk=True, first=True))
    try:
        async for piece in run.pieces(request):
            yield _sse(completion_body(rid, model, piece, None, None, chat, chunk=True))
    except ApiError as e:
        yield _sse(e.body())
        yield _sse("[DONE]")
        return
    if run.finish == "cancelled":
        return
    yield _sse(completion_body(rid, model, "", run.finish, None, chat, chunk=True))
    if run.job.include_usage:
        body = completion_body(rid, model, "", None, usage(len(run.job.prompt_ids), run.completion_tokens),
                               chat, chunk=True)
        body["choices"] = []
        yield _sse(body)
    yield _sse("[DONE]")


def serve(cfg: Mapping) -> None:
    """Load the checkpoint named by ``cfg`` (see ``conf/serve.yaml``) and serve it until interrupted."""
    import uvicorn

    from llamalit.inference.loading import load_for_serving

    loaded = load_for_serving(cfg)
    engine = Engine(loaded.model, slots=int(cfg.get("slots", 8)), max_queue=int(cfg.get("max_queue", 64)))
    app = create_app(engine, loaded.tokenizer, loaded.template, cfg.get("model_name") or loaded.name,
                     api_key=cfg.get("api_key") or None, default_max_tokens=int(cfg.get("max_tokens", 256)))
    host, port = str(cfg.get("host", "127.0.0.1")), int(cfg.get("port", 8000))
    print(f"llamalit-serve: {loaded.name} ({loaded.template.name} template, {engine.slots} slots, context "
          f"{engine.context}) on http://{host}:{port}/  (OpenAI base_url http://{host}:{port}/v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=str(cfg.get("log_level", "warning")))

