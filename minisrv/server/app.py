"""The API server's HTTP side: OpenAI routes, SGLang's /generate, /health, /models, /metrics, /openapi.json.

`build_app(engine, config, load_tokenizer)` makes the Starlette app around an EngineHandle; `run_http(app, config,
shutdown_event)` serves it with hypercorn on the running event loop (the launcher runs that loop
with uvloop, so the rings' asyncio consumer and the HTTP connections share one loop).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.metadata
import json
import logging
import socket
import ssl
import time
import types
from contextlib import aclosing
from functools import partial
from http import HTTPStatus
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import h11
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.protocol import h11 as hypercorn_h11
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from minisrv.config import ServerConfig, reported_settings
from minisrv.sampling_params import SamplingParams
from minisrv.server import message_blocks, messages_api, response_items, responses, responses_api, sglang
from minisrv.server import response_schemas as answers
from minisrv.server import sglang_schemas as sglang_answers
from minisrv.server.engine_handle import EngineHandle, RequestError
from minisrv.server.errors import (APIError, ErrorBody, handle_api_error, handle_http_exception,
                                   handle_unexpected)
from minisrv.server import connections
from minisrv.server.connections import Connections, default_limit
from minisrv.server.metrics import ServerMetrics
from minisrv.server.openapi import openapi_document
from minisrv.server.tokenize import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest, Tokenization
from minisrv.server.protocol import ChatCompletionRequest, CompletionRequest, checked_request_id, parse_request
from minisrv.structured_output import Grammar, GrammarError, GrammarValidator
from minisrv.server.streams import ChoiceDelta, ChoiceResult, ResponseContext, choice_deltas, collect, to_json
from minisrv.tokenizer.prompts import PromptTokenizer
from minisrv.wire.records import PromptRequest

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024   # a full-context prompt as token ids is a few MiB of JSON at most
HEALTH_GENERATE_TIMEOUT_S = 20.0   # /health_generate's one token, queued behind whatever runs
SHUTDOWN_GRACE_S = 2.0              # open connections get this long after shutdown; all exits stay within 5 s
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T")

Streamer = Callable[[ResponseContext, AsyncIterator[ChoiceDelta]], AsyncIterator[bytes]]
Builder = Callable[[ResponseContext, list[ChoiceResult]], object]
Collector = Callable[[ResponseContext, AsyncIterator[ChoiceDelta]], Awaitable[object]]


class ClientDisconnected(Exception):
    """The client closed the connection before its response; nobody will read what we answer."""


async def client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)   # nginx's "client closed request"; logged at debug where it is noticed


def route(path: str, endpoint: Callable, methods: list[str], body_schema: type | tuple[type, ...] | None = None,
          error_schema: type = ErrorBody, response_schema: type | None = None, stream_schema: type | None = None
          ) -> Route:
    """A route; `body_schema` is the pydantic model of its JSON body (a tuple: one of them), `error_schema` that of
    its error bodies, `response_schema` that of its JSON success body and `stream_schema` that of each event when it
    streams (response_schemas.py), for /openapi.json."""
    declared = Route(path, endpoint, methods=methods)
    declared.body_schema, declared.error_schema = body_schema, error_schema
    declared.response_schema, declared.stream_schema = response_schema, stream_schema
    return declared


def json_response(obj: object, status: int = 200) -> Response:
    return Response(to_json(obj), status_code=status, media_type="application/json")


class ApiRoutes:
    """The HTTP routes and their state: the engine handle, the metrics, and the API key."""

    def __init__(self, engine: EngineHandle, config: ServerConfig, tokenization: Tokenization,
                 request_defaults: dict[str, Any]) -> None:
        self.engine = engine
        self.config = config
        self.request_defaults = request_defaults
        self.tokenization = tokenization
        self.connections = Connections(config.max_connections or default_limit())
        self.metrics = ServerMetrics(engine.stats, engine.histograms, lambda: engine.model_name, self.connections,
                                     config.metrics_prefix)
        self.started = int(time.time())
        self.grammars = GrammarValidator()
        self._api_key = config.api_key.encode() if config.api_key else None
        self._ignored_seen: set[str] = set()   # IGNORED_FIELDS already logged
        self._openapi: dict | None = None

    def routes(self) -> list[Route]:
        return [
            route("/health", self.health, ["GET"], response_schema=answers.HealthStatus),
            route("/ping", self.health, ["GET", "POST"],   # SageMaker's name for it, as vLLM serves
                  response_schema=answers.HealthStatus),
            route("/health_generate", self.health_generate, ["GET"], response_schema=answers.HealthStatus),
            route("/version", self.version, ["GET"], response_schema=answers.ServerVersion),
            route("/metrics", self.metrics_text, ["GET"]),
            route("/openapi.json", self.openapi, ["GET"]),
            route("/v1/models", self.list_models, ["GET"], response_schema=answers.ModelList),
            route("/v1/models/{model:path}", self.get_model, ["GET"], response_schema=answers.ModelCard),
            route("/v1/chat/completions", self.chat_completions, ["POST"], ChatCompletionRequest,
                  response_schema=answers.ChatCompletion, stream_schema=answers.ChatCompletionChunk),
            route("/v1/completions", self.completions, ["POST"], CompletionRequest,
                  response_schema=answers.Completion, stream_schema=answers.CompletionChunk),
            route("/invocations", self.invocations, ["POST"], (ChatCompletionRequest, CompletionRequest)),  # SageMaker's
            route("/v1/responses", self.create_response, ["POST"], responses_api.ResponsesRequest),
            route("/v1/messages", self.create_message, ["POST"], messages_api.MessagesRequest,
                  messages_api.AnthropicErrorBody),
            route("/v1/messages/count_tokens", self.count_message_tokens, ["POST"], messages_api.CountTokensRequest,
                  messages_api.AnthropicErrorBody),
            route("/v1/responses/{response_id}", self.stored_response, ["GET", "DELETE"]),
            route("/v1/responses/{response_id}/cancel", self.stored_response, ["POST"]),
            route("/generate", self.sglang_generate, ["POST"], sglang.SGLangGenerateRequest,
                  response_schema=sglang_answers.GenerateAnswer, stream_schema=sglang_answers.GenerateChunk),
            route("/flush_cache", self.flush_cache, ["GET", "POST"]),             # SGLang's
            route("/get_model_info", self.model_info, ["GET"], response_schema=sglang_answers.ModelInfo),  # SGLang's
            route("/get_server_info", self.server_info, ["GET"],                  # SGLang's
                  response_schema=sglang_answers.ServerInfo),
            route("/reset_prefix_cache", self.reset_prefix_cache, ["POST"]),    # vLLM's
            route("/tokenize", self.tokenize, ["POST"], (TokenizeCompletionRequest, TokenizeChatRequest),
                  response_schema=answers.TokenizeResponse),
            route("/detokenize", self.detokenize, ["POST"], DetokenizeRequest,
                  response_schema=answers.DetokenizeResponse),
            route("/v1/embeddings", self.embeddings, ["POST"]),
        ]

    # --- routes ----------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """Whether the server can take requests (503 while it starts, stops, or a worker died)."""
        if self.engine.dead_worker is not None:
            raise APIError(503, f"worker {self.engine.dead_worker} died; the server is going down")
        if not self.engine.ready:
            raise APIError(503, "the server is starting or shutting down")
        if self.engine.unresponsive_worker is not None:
            raise APIError(503, f"worker {self.engine.unresponsive_worker}")
        return json_response({"status": "ok"})

    async def health_generate(self, request: Request) -> Response:
        """Healthy and able to generate: one greedy token through every process (SGLang's /health_generate)."""
        await self.health(request)
        probe = PromptRequest(prompt_ids=[0], params=SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        deltas = self.engine.stream(probe)
        try:
            async with aclosing(deltas):
                await asyncio.wait_for(collect_all(deltas), HEALTH_GENERATE_TIMEOUT_S)
        except RequestError as exc:
            raise APIError(503, f"generation failed: {exc.message}") from exc
        except asyncio.TimeoutError:
            raise APIError(503, f"no token within {HEALTH_GENERATE_TIMEOUT_S:g} s") from None
        return json_response({"status": "ok"})

    async def version(self, request: Request) -> Response:
        """The minisrv version."""
        return json_response({"version": _version()})

    async def metrics_text(self, request: Request) -> Response:
        """Prometheus metrics."""
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, request: Request) -> Response:
        """This document: every route, its request schema and the error body."""
        if self._openapi is None:
            self._openapi = openapi_document(self.routes(), "minisrv", importlib.metadata.version("minisrv"))
        return json_response(self._openapi)

    async def list_models(self, request: Request) -> Response:
        """The served model (OpenAI's model list); 503 until the model is loaded."""
        self._authorize(request)
        self._check_ready()
        return json_response({"object": "list", "data": [self._model_card(name) for name in self._model_names()]})

    async def get_model(self, request: Request) -> Response:
        """One model's card; 404 for any model but the served one."""
        self._authorize(request)
        self._check_model(request.path_params["model"])
        return json_response(self._model_card(request.path_params["model"]))

    async def chat_completions(self, request: Request) -> Response:
        """OpenAI chat completions, streamed as server-sent events with stream: true."""
        self._authorize(request)
        return await self._chat_completions(request, await read_body(request, self.config.body_read_timeout))

    async def invocations(self, request: Request) -> Response:
        """SageMaker's one route, as vLLM serves it: a chat completions body (it has `messages`) or a completions
        body (`prompt`), answered as that endpoint answers."""
        self._authorize(request)
        body = await read_body(request, self.config.body_read_timeout)
        try:
            fields = json.loads(body)
        except ValueError:
            fields = None   # parse_request names what is wrong with it
        if isinstance(fields, dict) and "messages" in fields:
            return await self._chat_completions(request, body)
        if isinstance(fields, dict) and "prompt" in fields:
            return await self._completions(request, body)
        if not isinstance(fields, dict):
            parse_request(CompletionRequest, body)
        raise APIError(400, "/invocations takes a chat completions request (with `messages`) or a completions request "
                            "(with `prompt`)", "messages")

    async def _chat_completions(self, request: Request, body: bytes) -> Response:
        req = parse_request(ChatCompletionRequest, body)
        ctx, prompt = await self._chat(req, request, "chatcmpl")
        return await self._respond(request, ctx, [prompt], req.stream, responses.chat_stream,
                                   responses.chat_completion)

    async def create_response(self, request: Request) -> Response:
        """OpenAI's Responses API: the chat request it stands for (responses_api.py), answered as output items
        (response_items.py)."""
        self._authorize(request)
        req = parse_request(responses_api.ResponsesRequest, await read_body(request, self.config.body_read_timeout))
        self._log_ignored(req.ignored_fields())
        try:
            ctx, prompt = await self._chat(req.to_chat_request(), request, "resp")
            ctx.id = "resp_" + ctx.id.removeprefix("resp-")
            return await self._respond(request, ctx, [prompt], req.stream, partial(response_items.response_stream, req),
                                       collector=partial(response_items.whole_response, req))
        except APIError as exc:   # named as the chat request it became: renamed as the client sent it
            raise responses_api.renamed_error(exc) from None

    async def create_message(self, request: Request) -> Response:
        """Anthropic's Messages API: the chat request it stands for (messages_api.py), answered as content blocks
        (message_blocks.py); errors in Anthropic's shape."""
        try:
            self._authorize(request, anthropic=True)
            req = parse_request(messages_api.MessagesRequest, await read_body(request, self.config.body_read_timeout))
            self._log_ignored(req.ignored_fields())
            ctx, prompt = await self._chat(req.to_chat_request(), request, "msg")
            return await self._respond(request, ctx, [prompt], req.stream, partial(message_blocks.message_stream, req),
                                       collector=partial(message_blocks.whole_message, req))
        except APIError as exc:
            return messages_api.error_response(messages_api.renamed_error(exc))

    async def count_message_tokens(self, request: Request) -> Response:
        """Anthropic's count_tokens: the prompt's tokens as the chat template renders it, tools included."""
        try:
            self._authorize(request, anthropic=True)
            req = parse_request(messages_api.CountTokensRequest, await read_body(request,
                                                                                 self.config.body_read_timeout))
            chat = req.to_chat_request()
            self._check_model(chat.model)
            prompt = chat.to_prompt_request(self.engine.vocab_size, self.engine.max_model_len, None,
                                            self.request_defaults)
            return json_response({"input_tokens": len(await self.tokenization.request_token_ids(prompt))})
        except APIError as exc:
            return messages_api.error_response(messages_api.renamed_error(exc))

    async def stored_response(self, request: Request) -> Response:
        """Retrieving, deleting or cancelling a response: none is stored, a 404 saying so."""
        self._authorize(request)
        raise APIError(404, f"response {request.path_params['response_id']!r} was not stored: this server stores no "
                            "responses (as vLLM by default); a stream or the answer itself is all there is",
                       "response_id", "response_not_stored")

    async def _chat(self, req: ChatCompletionRequest, request: Request, id_prefix: str
                    ) -> tuple[ResponseContext, PromptRequest]:
        """A chat request's prompt and its response's context (tools, reasoning, echo), checked."""
        self._check_model(req.model)
        self._log_ignored(req.ignored_fields())
        self._check_priority(req.priority)
        grammar = await self._checked(req.grammar())
        prompt = req.to_prompt_request(self.engine.vocab_size, self.engine.max_model_len, grammar,
                                       self.request_defaults)
        ctx = self._context(id_prefix, req.include_usage(), req.continuous_usage(), _client_request_id(req, request))
        ctx.prompt_logprobs = req.prompt_logprobs
        ctx.tool_choice = req.resolved_tool_choice()
        if ctx.tool_choice == "auto" and not self.config.enable_auto_tool_choice:
            raise APIError(400, 'tool_choice "auto" (the default with tools) needs a server started with '
                                "--enable-auto-tool-choice; name a function or ask for \"required\"", "tool_choice")
        ctx.tool_names = frozenset(t.function.name for t in req.tools or [])
        ctx.tool_call_parser = self.config.tool_call_parser
        ctx.echoed = req.echoed_text()
        ctx.tokens_as_ids = req.return_tokens_as_token_ids
        if self.config.reasoning_parser != "none" and grammar is None:   # a grammar leaves no room to think
            ctx.reasoning_parser = self.config.reasoning_parser
        return ctx, prompt

    async def completions(self, request: Request) -> Response:
        """OpenAI (legacy) completions, streamed as server-sent events with stream: true."""
        self._authorize(request)
        return await self._completions(request, await read_body(request, self.config.body_read_timeout))

    async def _completions(self, request: Request, body: bytes) -> Response:
        req = parse_request(CompletionRequest, body)
        self._check_model(req.model)
        self._log_ignored(req.ignored_fields())
        self._check_priority(req.priority)
        grammar = await self._checked(req.grammar())
        prompts = req.to_prompt_requests(self.engine.vocab_size, self.engine.max_model_len,
                                         self.config.max_choices_per_request, grammar, self.request_defaults)
        ctx = self._context("cmpl", req.include_usage(), req.continuous_usage(), _client_request_id(req, request))
        ctx.prompt_logprobs = req.prompt_logprobs
        ctx.echo_logprobs = req.logprobs if req.echo else None
        ctx.tokens_as_ids = req.return_tokens_as_token_ids
        return await self._respond(request, ctx, prompts, req.stream, responses.completion_stream,
                                   responses.completion)

    async def sglang_generate(self, request: Request) -> Response:
        """SGLang's native generation endpoint."""
        self._authorize(request)
        req = parse_request(sglang.SGLangGenerateRequest, await read_body(request, self.config.body_read_timeout))
        prompt = req.to_prompt_request(self.engine.vocab_size, await self._checked(req.grammar()),
                                       self.request_defaults)
        ctx = self._context("gen", False)
        ctx.id = req.rid or ctx.id   # SGLang's: meta_info.id is the client's rid as it is
        ctx.logprob_text = req.return_text_in_logprobs if req.return_logprob else None
        return await self._respond(request, ctx, [prompt], req.stream, sglang.generate_stream,
                                   sglang.generate_result)

    async def model_info(self, request: Request) -> Response:
        """SGLang's: the model as --model named it, and the sampling defaults requests get."""
        self._authorize(request)
        self._check_ready()
        engine = self.config.engine
        return json_response({"model_path": engine.model, "tokenizer_path": engine.tokenizer or engine.model,
                              "is_generation": True, "preferred_sampling_params": self.request_defaults or None,
                              "weight_version": "default"})

    async def server_info(self, request: Request) -> Response:
        """SGLang's: the server's settings (secrets left out), under minisrv's names and SGLang's for those its
        tools read, and the schedulers' state (every replica's stats together)."""
        self._authorize(request)
        self._check_ready()
        engine = self.config.engine
        settings = {name: getattr(config, name) for config in (engine, self.config)
                    for name in reported_settings(config)}
        return json_response({**settings, "model_path": engine.model, "context_length": self.engine.max_model_len,
                              "served_model_name": self.engine.model_name, "version": _version(),
                              "internal_states": [dataclasses.asdict(self.engine.stats())]})

    async def flush_cache(self, request: Request) -> Response:
        """SGLang's: evict every cached prompt prefix no running request holds (benchmarks flush before a
        cold-cache run); answers once every replica has."""
        await self._flush(request)
        return Response("Cache flushed.\n", media_type="text/plain")

    async def reset_prefix_cache(self, request: Request) -> Response:
        """vLLM's name for /flush_cache."""
        await self._flush(request)
        return Response(status_code=200)

    async def _flush(self, request: Request) -> None:
        self._authorize(request)
        self._refuse_cross_site(request)
        self._check_ready()
        try:
            await self.engine.flush_cache()
        except RequestError as exc:
            raise APIError(exc.status, exc.message) from exc

    async def tokenize(self, request: Request) -> Response:
        """The token ids of a prompt, or of a chat rendered with the chat template (vLLM's /tokenize)."""
        self._authorize(request)
        body = await read_body(request, self.config.body_read_timeout)
        schema = TokenizeChatRequest if b'"messages"' in body else TokenizeCompletionRequest
        req = parse_request(schema, body)
        self._check_model(req.model)
        return json_response(await self.tokenization.tokenize(req, self.engine.vocab_size, self.engine.max_model_len))

    async def embeddings(self, request: Request) -> Response:
        """Not served: a 404 saying why, rather than an unexplained one."""
        self._authorize(request)
        raise APIError(404, "/v1/embeddings is not served: minisrv runs generative models, and its engine "
                            "returns sampled tokens, not hidden states; use an embedding server for vectors",
                       code="embeddings_not_supported")

    async def detokenize(self, request: Request) -> Response:
        """The text of token ids (vLLM's /detokenize)."""
        self._authorize(request)
        req = parse_request(DetokenizeRequest, await read_body(request, self.config.body_read_timeout))
        self._check_model(req.model)
        return json_response(await self.tokenization.detokenize(req, self.engine.vocab_size))

    # --- shared steps ----------------------------------------------------------------------------------

    async def _checked(self, grammar: Grammar | None) -> Grammar | None:
        """`grammar`, once llguidance accepts it; else a 400 naming the field it came from."""
        try:
            await self.grammars.check(grammar)
        except GrammarError as exc:
            raise APIError(400, str(exc), exc.field, "invalid_grammar") from None
        return grammar

    def _refuse_cross_site(self, request: Request) -> None:
        """A 403 for a browser's request on behalf of a page of another origin that --allowed-origins does not name.
        For routes that act without a body: a page may send those cross-site without asking first (a form's
        POST, an image's GET), and no Content-Type check stops them. Browsers name the page's origin in Origin,
        or at least say the request is cross-site in Sec-Fetch-Site; other clients send neither."""
        origin, site = request.headers.get("origin"), request.headers.get("sec-fetch-site")
        if origin is not None:
            allowed = self.config.allowed_origins
            if origin in allowed or "*" in allowed or urlsplit(origin).netloc == request.headers.get("host"):
                return
        elif site not in ("cross-site", "same-site"):
            return
        raise APIError(403, f"{request.url.path} does not take requests from other origins' pages "
                            f"({origin or 'Sec-Fetch-Site: ' + str(site)}); allow an origin with --allowed-origins",
                       code="cross_site_request")

    def _authorize(self, request: Request, anthropic: bool = False) -> None:
        """`anthropic`: the key may come as Anthropic's SDK sends it, in X-Api-Key, too."""
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if anthropic and "x-api-key" in request.headers:
            scheme, token = "bearer", request.headers["x-api-key"]
        # Headers arrive decoded as latin-1; re-encoding gives back the bytes the client sent.
        given = token.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._api_key):
            raise APIError(401, "missing or wrong API key; send it as 'Authorization: Bearer <key>'"
                           + (" or 'X-Api-Key: <key>'" if anthropic else ""), code="invalid_api_key")

    def _check_priority(self, priority: int) -> None:
        if priority != 0 and self.config.engine.scheduling_policy != "priority":
            raise APIError(400, f"priority: this server schedules first come, first served (start it with "
                                f"--scheduling-policy priority), so only 0 is accepted, got {priority}", "priority",
                           "unsupported_field")

    def _check_ready(self) -> None:
        # Before the workers report, the model's name and context length are not known: no card with blanks.
        if not self.engine.ready:
            raise APIError(503, "the server is starting or shutting down; the model is not being served")

    def _check_model(self, model: str | None) -> None:
        self._check_ready()   # the served name is known only then
        if model is not None and model not in self._model_names():
            served = " or ".join(repr(name) for name in self._model_names())
            raise APIError(404, f"the model '{model}' does not exist; this server serves {served}",
                           "model", "model_not_found")

    def _model_names(self) -> tuple[str, ...]:
        """What requests may call the model: --served-model-name's names, else the model's own."""
        return self.config.served_model_name or (self.engine.model_name,)

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "minisrv",
                "root": self.config.engine.model, "max_model_len": self.engine.max_model_len}

    def _context(self, id_prefix: str, include_usage: bool, continuous_usage: bool = False,
                 request_id: str | None = None) -> ResponseContext:
        """`request_id`: the client's (vLLM's request_id field or X-Request-Id header) for the response's id."""
        return ResponseContext.new(id_prefix, self.engine.model_name, include_usage,
                                   continuous_usage, self.config.sse_timestamps, request_id)

    def _log_ignored(self, names: list[str]) -> None:
        for name in names:
            if name not in self._ignored_seen:
                self._ignored_seen.add(name)
                logger.warning("request field %r is accepted and ignored (it does not change the output); "
                               "logged once", name)

    async def _respond(self, request: Request, ctx: ResponseContext, prompts: list[PromptRequest], stream: bool,
                       streamer: Streamer, builder: Builder | None = None, collector: Collector | None = None
                       ) -> Response:
        """The prompts' answer: streamed by `streamer`, else made whole by `builder` from the collected choices
        (or by `collector` from the deltas themselves)."""
        n = prompts[0].n
        deltas = choice_deltas([self.engine.stream(prompt) for prompt in prompts], n)
        try:
            if not stream:
                if collector is not None:
                    return json_response(await until_disconnect(request, collector(ctx, deltas)))
                results = await until_disconnect(request, collect(ctx, deltas, n * len(prompts)))
                return json_response(builder(ctx, results))
            # The first delta comes before the 200: a refused request (400 too long, 503) gets its status.
            first = await until_disconnect(request, anext(deltas))
        except RequestError as exc:
            raise APIError(exc.status, exc.message, exc.param) from exc
        except ClientDisconnected:
            return Response(status_code=499)   # nobody is listening; the request was aborted (client_gone)
        return StreamingResponse(streamer(ctx, prepend(first, deltas)), media_type="text/event-stream",
                                 headers=SSE_HEADERS)


async def collect_all(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


async def prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


async def read_body(request: Request, timeout_s: float) -> bytes:
    """A JSON request's body. Anything not sent as application/json is a 415: a web page may send other
    types cross-site without asking first (a CORS "simple request"), never JSON. A body announced larger
    than MAX_BODY_BYTES is refused before any of it is read, and the connection closed (the client is still
    sending it); a client that goes away mid-upload ends the request quietly, and one that takes longer than
    `timeout_s` to send it gets a 408."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {media_type or 'none'}",
                       code="unsupported_media_type")
    too_large = APIError(413, f"request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large",
                         headers={"Connection": "close"})
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []

    async def receive_all() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(receive_all(), timeout_s)   # (asyncio.timeout is Python 3.11+)
    except ClientDisconnect:
        logger.debug("client went away while sending the body of %s %s", request.method, request.url.path)
        raise ClientDisconnected from None
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s (--body-read-timeout)",
                       code="request_timeout", headers={"Connection": "close"}) from None
    return b"".join(chunks)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work` unless the client goes away first; then cancel it, which aborts its request."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((work_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
    if not work_task.done():
        work_task.cancel()
        raise ClientDisconnected
    return work_task.result()


def _version() -> str:
    return importlib.metadata.version("minisrv")


def _client_request_id(req: ChatCompletionRequest | CompletionRequest, request: Request) -> str | None:
    """The id a client gave its request (vLLM's request_id field, else the X-Request-Id header), if any."""
    return checked_request_id(req.request_id or request.headers.get("x-request-id"), "request_id")


def build_app(engine: EngineHandle, config: ServerConfig, load_tokenizer: Callable[[], PromptTokenizer],
              request_defaults: dict[str, Any] | None = None) -> Starlette:
    """`load_tokenizer` gives the served model's PromptTokenizer (a blocking call, made once, in a thread);
    `request_defaults` the values of the sampling options a request leaves out (models/source.py)."""
    routes = ApiRoutes(engine, config, Tokenization(load_tokenizer), request_defaults or {})
    # No origins: no CORS headers at all, so browsers keep pages of other origins from reading responses.
    middleware = [Middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                             allow_methods=list(config.allowed_methods), allow_headers=list(config.allowed_headers))
                  ] if config.allowed_origins else []
    app = Starlette(
        routes=routes.routes(),
        middleware=middleware,
        exception_handlers={APIError: handle_api_error, HTTPException: handle_http_exception,
                            ClientDisconnected: client_gone, Exception: handle_unexpected},
    )
    app.state.connections = routes.connections
    return app


class _H11WithReasonPhrases(types.ModuleType):
    """The h11 module as hypercorn's HTTP/1.1 protocol sees it, except that a Response it makes without a reason
    phrase gets the standard one: hypercorn passes none, so every status line read "HTTP/1.1 400 " (allowed by
    RFC 9112, but shown blank by clients and proxies). The events are h11's own, so h11 handles them as ever."""

    def __getattr__(self, name: str):
        return getattr(h11, name)

    @staticmethod
    def Response(**fields) -> h11.Response:   # noqa: N802 (h11's class name, which hypercorn calls)
        if not fields.get("reason") and fields["status_code"] in _REASONS:
            fields["reason"] = _REASONS[fields["status_code"]]
        return h11.Response(**fields)


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def listen_sockets(config: ServerConfig, count: int) -> list[socket.socket]:
    """A socket bound to --host/--port for each of `count` API server processes, bound before any process starts
    so a port in use is a clear error at once. Several API server processes each get one of SO_REUSEPORT sockets: the
    kernel spreads connections over them by address hash (one shared socket would let whichever process
    woke first accept a whole burst). ValueError naming the flags when the address cannot be bound."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # accepted connections inherit it
            if count > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((config.host, config.port))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ValueError(f"host, port (--host {config.host} --port {config.port}): cannot listen there: "
                         f"{exc.strerror or exc}") from None
    return sockets


def check_tls(config: ServerConfig) -> None:
    """ValueError naming the flags when the certificate and key do not load together."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"ssl_certfile, ssl_keyfile (--ssl-certfile {config.ssl_certfile} --ssl-keyfile "
                         f"{config.ssl_keyfile}): cannot load them: {exc.strerror or exc}") from None


async def run_http(app: Starlette, config: ServerConfig, shutdown_event: asyncio.Event,
                   listener: socket.socket | None = None) -> None:
    """Serve until `shutdown_event` is set; call on the (uvloop) loop the EngineClient runs on. On `listener`
    (from listen_sockets; it stays the caller's to close) if given, else on --host/--port."""
    hypercorn_h11.h11 = _H11WithReasonPhrases("h11")
    connections.install(app.state.connections)
    hc = HypercornConfig()
    # hypercorn closes the sockets it serves on: give it a duplicate of ours.
    hc.bind = [f"fd://{listener.dup().detach()}" if listener is not None else config.address]
    hc.graceful_timeout = SHUTDOWN_GRACE_S
    hc.include_server_header = False
    hc.certfile, hc.keyfile = config.ssl_certfile, config.ssl_keyfile
    # Through our logging setup; its own "Running on" line would come before the workers are ready, and the
    # launcher logs the URL once they are, so hypercorn speaks only of problems unless debugging.
    http_log = logging.getLogger("minisrv.http")
    http_log.setLevel(logging.DEBUG if config.log_level == "debug" else logging.WARNING)
    hc.errorlog = http_log
    if config.enable_access_log:
        hc.accesslog = logging.getLogger("minisrv.access")
        hc.access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss'   # request line, status, bytes, seconds
    await hypercorn_serve(app, hc, shutdown_trigger=shutdown_event.wait)
