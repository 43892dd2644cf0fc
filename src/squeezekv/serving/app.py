"""The OpenAI-compatible HTTP server: ``/v1/completions``, ``/v1/chat/completions`` (both streaming
as server-sent events), ``/v1/models`` and ``/health``, over a :class:`ServingEngine` that runs in
its own thread.

Decoding is greedy: sampling settings other than their greedy values are refused (400), as is any
field this server does not implement, so that nothing a client asks for is silently ignored. A
request may set ``budget`` (an extra body field: a fraction in (0, 1] or tokens per layer) and the
``allocator``; the policy is the server's. Every error has OpenAI's shape, naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from squeezekv.config import SqueezeConfig
from squeezekv.serving.scheduler import QueueFull, Request, ServingEngine, unservable

try:
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError as error:  # the server is an optional extra
    raise ImportError(
        "squeezekv serve needs its optional dependencies: pip install 'squeezekv[serve]'"
    ) from error

RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.1
# the value at which each OpenAI sampling field means greedy decoding, which this server does
GREEDY = {"temperature": 0.0, "top_p": 1.0, "n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0}
COMMON_FIELDS = {
    "model",
    "max_tokens",
    "stream",
    "stream_options",
    "user",
    "seed",
    "budget",
    "allocator",
    *GREEDY,
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "logprobs", "stop"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "stop"}


class BadRequest(Exception):
    """A request the server refuses: its message, the field at fault and the HTTP status."""

    def __init__(
        self, message: str, param: str | None, status: int = 400, kind: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def error_response(error: BadRequest, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": str(error), "type": error.kind, "param": error.param, "code": None}}
    return JSONResponse(body, status_code=error.status, headers=headers)


class Server:
    """The engine's thread and what the endpoints share: the tokenizer, the served name, defaults."""

    def __init__(
        self, engine: ServingEngine, tokenizer, model_name: str, default_max_tokens: int = 16
    ) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.default_max_tokens = default_max_tokens
        eos = engine.model.generation_config.eos_token_id
        self.stop_tokens = frozenset([eos] if isinstance(eos, int) else eos or [])
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.engine.serve_forever, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        with self.engine.wakeup:
            self.engine.wakeup.notify()
        if self.thread is not None:
            self.thread.join()

    # -- turning a body into a Request ---------------------------------------------------------

    def parse(self, body: object, allowed: set[str]) -> tuple[dict, SqueezeConfig, int]:
        """The body as a dict, the request's compression settings and its ``max_tokens``."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object", None)
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise BadRequest(f"field {unknown[0]!r} is not supported by this server", unknown[0])
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise BadRequest(
                f"model {model!r} is not served here; this server serves {self.model_name!r}",
                "model",
                status=404,
                kind="model_not_found",
            )
        for name, greedy in GREEDY.items():
            value = body.get(name)
            if value is not None and value != greedy:
                raise BadRequest(
                    f"{name}={value!r} is not supported: decoding is greedy ({name}: {greedy} or absent)",
                    name,
                )
        for name in ("echo", "logprobs"):
            if body.get(name) not in (None, False):
                raise BadRequest(f"{name} is not supported by this server", name)
        if body.get("stop") not in (None, [], ""):
            raise BadRequest(
                "stop sequences are not supported; the model's end-of-text token ends an answer", "stop"
            )
        if not isinstance(body.get("stream", False), bool):
            raise BadRequest("stream must be true or false", "stream")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = body.get(name, self.default_max_tokens)
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise BadRequest(f"{name} must be an integer >= 1, got {max_tokens!r}", name)
        config = self.engine.config
        try:
            if body.get("budget") is not None:
                config = replace(config, budget=body["budget"])
        except (ValueError, TypeError) as error:
            raise BadRequest(f"budget: {error}", "budget") from None
        try:
            if body.get("allocator") is not None:
                config = replace(config, allocator=body["allocator"])
        except (ValueError, TypeError) as error:
            raise BadRequest(f"allocator: {error}", "allocator") from None
        refused = unservable(config)
        if refused:
            raise BadRequest(f"allocator: {refused}: the server cannot serve it yet", "allocator")
        return body, config, max_tokens

    def completion_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return self.tokenizer(prompt).input_ids
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            vocabulary = self.engine.model.config.get_text_config().vocab_size
            if not all(0 <= token < vocabulary for token in prompt):
                raise BadRequest(f"prompt token ids must lie in [0, {vocabulary})", "prompt")
            return list(prompt)
        raise BadRequest(
            "prompt must be a non-empty string or a non-empty list of token ids (one prompt)", "prompt"
        )

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list", "messages")
        for index, message in enumerate(messages):
            if not (
                isinstance(message, dict)
                and message.get("role") in ("system", "user", "assistant")
                and isinstance(message.get("content"), str)
            ):
                raise BadRequest(
                    f"messages[{index}] must be an object with a role (system, user or assistant) and "
                    "string content",
                    f"messages[{index}]",
                )
        if self.tokenizer.chat_template is not None:
            return list(
                self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            )
        # a base model without a chat template continues a plain transcript
        transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.tokenizer(transcript).input_ids

    def submit(
        self, prompt: list[int], config: SqueezeConfig, max_tokens: int
    ) -> tuple[Request, asyncio.Queue]:
        """Queues the request; its events arrive on the returned queue (on this event loop)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def listener(kind: str, value: object) -> None:
            with contextlib.suppress(RuntimeError):  # a closed event loop (shutting down): nobody waits
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))

        request = Request(prompt, max_tokens, config, listener, self.stop_tokens)
        try:
            self.engine.submit(request)
        except QueueFull as error:
            raise BadRequest(f"the server is busy: {error}; retry later", None, 503, "server_busy") from None
        except ValueError as error:
            limit = getattr(self.engine.model.config.get_text_config(), "max_position_embeddings", None)
            field = "prompt" if limit is not None and len(prompt) > limit else "max_tokens"
            raise BadRequest(str(error), field) from None
        return request, events


class Detokenizer:
    """The text of the tokens so far, handed out as increments that never split a character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.tokens, self.sent = tokenizer, [], 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a character still incomplete
            return ""
        delta, self.sent = text[self.sent :], len(text)
        return delta

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)


async def answer_events(http: HttpRequest | None, events: asyncio.Queue) -> AsyncIterator[tuple[str, object]]:
    """The engine's events for one request until it finishes, or until the client goes away (polled
    with ``http`` every ``DISCONNECT_POLL_SECONDS``; a streaming response learns it from Starlette,
    which cancels the stream)."""
    checked = time.monotonic()
    while True:
        try:
            kind, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            kind = None
        if http is not None and time.monotonic() - checked >= DISCONNECT_POLL_SECONDS:
            checked = time.monotonic()
            if await http.is_disconnected():
                return
        if kind is None:
            continue
        yield kind, value
        if kind != "token":
            return


def usage(request: Request, completion_tokens: int) -> dict:
    prompt = len(request.prompt)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def create_app(server: Server) -> FastAPI:
    """The FastAPI application; the engine's thread runs while the application does."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(title="squeezekv", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict:
        engine = server.engine
        return {
            "status": "ok",
            "running": len(engine.running),
            "waiting": len(engine.waiting),
            "kv_bytes_in_use": engine.kv_bytes_in_use,
            "kv_memory": engine.kv_memory,
            "finished": dict(engine.finished),
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": server.model_name, "object": "model", "created": 0, "owned_by": "squeezekv"}],
        }

    async def serve(http: HttpRequest, chat: bool):
        try:
            body = await http.json()
        except ValueError:
            return error_response(BadRequest("the request body is not valid JSON", None))
        try:
            body, config, max_tokens = server.parse(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
            prompt = server.chat_prompt(body) if chat else server.completion_prompt(body)
            request, events = server.submit(prompt, config, max_tokens)
        except BadRequest as error:
            retry = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status == 503 else None
            return error_response(error, retry)
        answer = Answer(server, chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", request)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = answer.chunks(answer_events(None, events), include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        return await answer.whole(answer_events(http, events))

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await serve(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await serve(http, chat=True)

    return app


class Answer:
    """One answer in OpenAI's format: whole, or as server-sent event chunks."""

    def __init__(self, server: Server, chat: bool, answer_id: str, request: Request) -> None:
        self.server, self.chat, self.id, self.request = server, chat, answer_id, request
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, choice: dict, chunk: bool) -> dict:
        kind = f"{self.object}.chunk" if chunk and self.chat else self.object
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.server.model_name,
            "choices": [choice],
        }

    def _choice(self, text: str | None, finish: str | None, chunk: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not chunk:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def _cancel_unless_finished(self) -> None:
        """A request whose client went away leaves the engine (and frees its memory)."""
        if not self.request.finished:
            self.server.engine.cancel(self.request)

    async def whole(self, events: AsyncIterator[tuple[str, object]]) -> JSONResponse:
        text, count, finish = Detokenizer(self.server.tokenizer), 0, None
        try:
            async for kind, value in events:
                if kind == "token":
                    text.add(value)
                    count += 1
                elif kind == "finish":
                    finish = value
                else:
                    return error_response(BadRequest(str(value), None, 500, "server_error"))
        finally:
            self._cancel_unless_finished()
        if finish is None:  # the client went away; nobody reads this
            return JSONResponse({}, status_code=499)
        body = self._envelope(self._choice(text.text(), finish, chunk=False), chunk=False)
        body["usage"] = usage(self.request, count)
        return JSONResponse(body)

    async def chunks(
        self, events: AsyncIterator[tuple[str, object]], include_usage: bool
    ) -> AsyncIterator[str]:
        def event(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        text, count = Detokenizer(self.server.tokenizer), 0
        try:
            if self.chat:
                yield event(self._envelope(self._choice(None, None, chunk=True, first=True), chunk=True))
            async for kind, value in events:
                if kind == "token":
                    count += 1
                    delta = text.add(value)
                    if delta:
                        yield event(self._envelope(self._choice(delta, None, chunk=True), chunk=True))
                elif kind == "finish":
                    yield event(self._envelope(self._choice(None, value, chunk=True), chunk=True))
                else:
                    error = {"message": str(value), "type": "server_error", "param": None, "code": None}
                    yield event({"error": error})
            if include_usage:
                final = self._envelope(self._choice(None, None, chunk=True), chunk=True)
                final["choices"], final["usage"] = [], usage(self.request, count)
                yield event(final)
            yield "data: [DONE]\n\n"
        finally:  # also when Starlette cancels the stream of a client that went away
            self._cancel_unless_finished()
