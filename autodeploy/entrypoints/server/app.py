"""The OpenAI-compatible HTTP app: FastAPI handlers over one :class:`~autodeploy.runtime.service.EngineService`.

The service's owner thread runs the engine and feeds one in-flight batch from every client; handlers only
tokenize, submit (non-blocking, thread-safe) and ``async for`` over the request's token stream, so the event loop
never waits on a forward. A client that goes away has its request aborted (its KV pages freed) whether it was
streaming (the SSE generator is closed) or waiting for a whole response (a watcher sees ``http.disconnect``).
Every refusal is an OpenAI-style error body naming the offending field.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from autodeploy.entrypoints.server.metrics import ServerMetrics
from autodeploy.entrypoints.server.protocol import (
    ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta, ChatLogprobs,
    ChatMessageOut, ChatStreamChoice, CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest,
    CompletionResponse, ErrorInfo, ErrorResponse, ModelCard, ModelList, TokenLogprob, TopLogprob, Usage,
)
from autodeploy.errors import (
    AutoDeployError, ConfigError, EngineClosedError, EngineOverloadedError, InvalidRequestError, SamplingConfigError,
)
from autodeploy.runtime.detokenizer import IncrementalDetokenizer
from autodeploy.runtime.sampling import SamplingConfig

log = logging.getLogger(__name__)

# SamplingConfig field -> the request field a client set it through (for error bodies).
SAMPLING_TO_PARAM = {
    "max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
    "min_p": "min_p", "seed": "seed", "n": "n", "stop_strings": "stop", "stop_token_ids": "stop_token_ids",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "logprobs": "logprobs", "ignore_eos": "ignore_eos",
    "min_tokens": "min_tokens",
}
# Engine finish reasons -> OpenAI's. Running out of context is "length" to a client.
FINISH_REASONS = {"stop": "stop", "length": "length", "max_seq_len": "length", "kv_cache_full": "length",
                  "abort": "abort", "error": "error"}


class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code if self.code is not None else self.status))
        return JSONResponse(body.model_dump(), status_code=self.status)


def _engine_error(exc: AutoDeployError, prompt_param: str) -> APIError:
    """Map an error the service raised at submission to an HTTP error naming the request field."""
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, f"server overloaded: {exc}", type="server_overloaded", code="overloaded")
    if isinstance(exc, EngineClosedError):
        return APIError(503, f"server shutting down: {exc}", type="server_unavailable", code="shutting_down")
    msg = str(exc)
    if isinstance(exc, SamplingConfigError):
        m = re.match(r"SamplingConfig\.(\w+)=", msg)
        param = SAMPLING_TO_PARAM.get(m.group(1), m.group(1)) if m else None
        return APIError(400, msg, param=param)
    if isinstance(exc, InvalidRequestError):
        return APIError(400, msg, param="n" if msg.startswith("n/") else prompt_param)
    return APIError(500, msg, type="server_error")


@dataclass
class ServerState:
    """What the handlers share: the service, the tokenizer and the served model's limits."""

    service: Any  # EngineService
    tokenizer: Any
    model_name: str
    max_seq_len: int
    default_sampling: SamplingConfig
    metrics: ServerMetrics
    shutdown_timeout: Optional[float] = None
    owns_service: bool = True


def token_text(tokenizer: Any, token_id: int) -> str:
    """The text one token stands for (special tokens included), for logprob entries."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


class TextStream:
    """The text of one sample: pieces come out as the detokenizer releases them (stable, never part of a
    stop string), and everything taken plus ``finish()`` is exactly the final text."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop_strings: Sequence[str]):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop_strings)
        self.pending = ""

    def add(self, token_id: int) -> None:
        self.pending += self.detok.add(token_id)

    def take(self) -> str:
        piece, self.pending = self.pending, ""
        return piece

    def finish(self) -> str:
        """The rest of the final text (held-back characters included)."""
        return self.take() + self.detok.finish()

    def finish_all(self) -> str:
        """The whole final text (non-streaming responses)."""
        self.finish()
        return self.detok.text


# -- one prompt's run ----------------------------------------------------------------------------------------
@dataclass
class _Choice:
    """One sample of one prompt as the client sees it: text so far, tokens, logprobs."""

    index: int
    text: TextStream
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Optional[float]] = field(default_factory=list)
    top_logprobs: list[Optional[dict[int, float]]] = field(default_factory=list)
    finish_reason: Optional[str] = None
    flushed: bool = False  # its final chunk went out (a stream closes each choice as soon as it finishes)

    def close_chunk(self) -> Optional[str]:
        """The rest of this choice's text for its final stream chunk, once (None: already sent)."""
        if self.flushed:
            return None
        self.flushed = True
        return self.text.finish()


@dataclass
class _Run:
    """One submitted prompt (n samples) and its bookkeeping."""

    stream: Any  # RequestStream
    prompt_ids: list[int]
    choices: list[_Choice]
    arrival: float
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    done: bool = False
    error: Optional[str] = None
    observed: bool = False

    def apply(self, ev: Any) -> Optional[_Choice]:
        """Fold one TokenEvent in; return the choice it touched (None for a token-less final event)."""
        now = time.perf_counter()
        ch: Optional[_Choice] = None
        if ev.token_id is not None and ev.token_id >= 0:
            ch = self.choices[ev.index]
            ch.token_ids.append(ev.token_id)
            ch.logprobs.append(ev.logprob)
            ch.top_logprobs.append(ev.top_logprobs)
            ch.text.add(ev.token_id)
            if ev.sample_finished and not ev.finished:
                ch.finish_reason = FINISH_REASONS.get(ev.finish_reason or "", ev.finish_reason or "stop")
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
        if ev.finished:
            self.done = True
            out = ev.output
            if out is not None and out.error:
                self.error = out.error
            samples = list(getattr(out, "outputs", None) or []) if out is not None else []
            for c in self.choices:
                reason = samples[c.index].finish_reason if c.index < len(samples) else ev.finish_reason
                c.finish_reason = FINISH_REASONS.get(reason or "", reason or "stop")
        return ch

    def observe(self, metrics: ServerMetrics) -> None:
        """Record this run in the metrics once; a run that never finished counts as aborted."""
        if self.observed:
            return
        self.observed = True
        gen = sum(len(c.token_ids) for c in self.choices)
        n0 = len(self.choices[0].token_ids) if self.choices else 0
        ttft = None if self.first_token is None else self.first_token - self.arrival
        tpot = None
        if self.first_token is not None and self.last_token is not None and n0 > 1:
            tpot = (self.last_token - self.first_token) / (n0 - 1)
        e2e = None if self.last_token is None else self.last_token - self.arrival
        reason = "error" if self.error else (self.choices[0].finish_reason if self.choices else None)
        if not self.done:
            reason = "abort"
        metrics.observe_request(finish_reason=reason or "unknown", prompt_tokens=len(self.prompt_ids),
                                generation_tokens=gen, ttft=ttft, tpot=tpot, e2e=e2e)


async def _merge(runs: Sequence[_Run]) -> AsyncIterator[tuple[_Run, Any]]:
    """Events of several runs as they arrive (a completion request may carry several prompts)."""
    if len(runs) == 1:
        async for ev in runs[0].stream:
            yield runs[0], ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(run: _Run) -> None:
        try:
            async for ev in run.stream:
                await queue.put((run, ev))
        except BaseException as exc:  # hand failures to the consumer
            await queue.put((run, exc))
            raise
        finally:
            await queue.put((run, end))

    tasks = [asyncio.create_task(pump(r)) for r in runs]
    try:
        left = len(runs)
        while left:
            run, ev = await queue.get()
            if ev is end:
                left -= 1
            elif isinstance(ev, BaseException):
                raise ev
            else:
                yield run, ev
    finally:
        for t in tasks:
            t.cancel()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class SSEResponse(StreamingResponse):
    """Server-sent events that call ``on_close`` when the response ends, however it ends (finished, client gone,
    cancelled, or failed before the first event), so unfinished requests are aborted at once, not when the
    generator is garbage-collected."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def stream_response(self, send: Any) -> None:
        try:
            await super().stream_response(send)
        finally:
            self.on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


# -- the app ---------------------------------------------------------------------------------------------------
class Server:
    """The handlers, over one :class:`ServerState`."""

    def __init__(self, state: ServerState):
        self.state = state

    # -- inputs ------------------------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.state.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.state.model_name}`", param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, "the prompt is empty: it needs at least one token", param=param)
        if len(ids) >= self.state.max_seq_len:
            raise APIError(400, f"This model's maximum context length is {self.state.max_seq_len} tokens; the "
                                f"prompt has {len(ids)} tokens and needs room for at least one generated token",
                           param=param, code="context_length_exceeded")
        return ids

    def encode(self, text: str) -> list[int]:
        return list(self.state.tokenizer.encode(text))

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            prompts = [self.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif not p:
            raise APIError(400, "prompt is an empty list", param="prompt")
        else:
            prompts = [self.encode(x) if isinstance(x, str) else list(x) for x in p]
        return [self.check_prompt(ids, "prompt") for ids in prompts]

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.state.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=req.add_generation_prompt)
        except Exception as exc:  # the template itself refuses (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from exc
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return self.check_prompt(list(ids), "messages")

    def sampling(self, req: Any, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingConfig:
        """The request's SamplingConfig. Fields the client leaves out keep the model's generation-config
        defaults (``LLM.default_sampling``); validation happens in ``EngineService.submit``."""
        d = self.state.default_sampling
        changes: dict[str, Any] = dict(
            n=req.n, stop_strings=req.stop_list(), presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, ignore_eos=req.ignore_eos, logits_processors=[],
            stopping_criteria=[], beam_width=1,
        )
        changes["max_new_tokens"] = max_tokens if max_tokens is not None else d.max_new_tokens
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed"):
            v = getattr(req, name)
            if v is not None:
                changes[name] = v
        if req.stop_token_ids is not None:
            changes["stop_token_ids"] = list(req.stop_token_ids)
        if req.min_tokens is not None:
            changes["min_tokens"] = req.min_tokens
        changes["logprobs"] = logprobs
        try:
            return dataclasses.replace(d, **changes)  # SamplingConfig validates itself
        except AutoDeployError as exc:
            raise _engine_error(exc, "prompt") from exc

    def submit(self, prompts: list[list[int]], sampling: SamplingConfig, rid: str, prompt_param: str) -> list[_Run]:
        arrival = time.perf_counter()
        runs: list[_Run] = []
        try:
            for i, ids in enumerate(prompts):
                stream = self.state.service.submit(ids, sampling, request_id=f"{rid}-{i}")
                choices = [_Choice(j, TextStream(self.state.tokenizer, ids, sampling.stop_strings))
                           for j in range(sampling.n)]
                runs.append(_Run(stream, ids, choices, arrival))
        except AutoDeployError as exc:
            self.abort(runs)
            raise _engine_error(exc, prompt_param) from exc
        return runs

    def abort(self, runs: Sequence[_Run]) -> None:
        for r in runs:
            if not r.done:
                try:
                    self.state.service.abort(r.stream.request_id)
                except Exception:  # best effort: the request may be gone already
                    log.exception("abort of %s failed", r.stream.request_id)

    def close(self, runs: Sequence[_Run]) -> None:
        """A response is over: abort what has not finished and record every run in the metrics (idempotent)."""
        self.abort(runs)
        for r in runs:
            r.observe(self.state.metrics)

    async def collect(self, request: Request, runs: list[_Run]) -> bool:
        """Run every prompt to completion; abort them all (and return False) if the client goes away."""

        async def consume() -> None:
            async for _run, ev in _merge(runs):
                _run.apply(ev)

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                log.info("client went away: aborting %d request(s)", len(runs))
                return False
            work.result()
            return True
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
            self.close(runs)

    def check_errors(self, runs: Sequence[_Run]) -> None:
        for r in runs:
            if r.error:
                raise APIError(500, f"generation failed: {r.error}", type="server_error", code="generation_failed")

    def usage(self, runs: Sequence[_Run]) -> Usage:
        p = sum(len(r.prompt_ids) for r in runs)
        c = sum(len(ch.token_ids) for r in runs for ch in r.choices)
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    # -- logprob shapes ----------------------------------------------------------------------------------------
    def completion_logprobs(self, ch: _Choice, start: int, k: int, offset: int) -> CompletionLogprobs:
        tok = self.state.tokenizer
        lp = CompletionLogprobs(top_logprobs=[] if k else None)
        for i in range(start, len(ch.token_ids)):
            s = token_text(tok, ch.token_ids[i])
            lp.tokens.append(s)
            lp.token_logprobs.append(ch.logprobs[i])
            lp.text_offset.append(offset)
            offset += len(s)
            if k:
                top = ch.top_logprobs[i] or {}
                lp.top_logprobs.append({token_text(tok, t): v for t, v in top.items()})
        return lp

    def chat_logprobs(self, ch: _Choice, start: int, k: int) -> ChatLogprobs:
        tok = self.state.tokenizer
        content = []
        for i in range(start, len(ch.token_ids)):
            s = token_text(tok, ch.token_ids[i])
            top = sorted((ch.top_logprobs[i] or {}).items(), key=lambda kv: -kv[1])[:k] if k else []
            content.append(TokenLogprob(
                token=s, logprob=ch.logprobs[i] if ch.logprobs[i] is not None else float("nan"),
                bytes=list(s.encode()),
                top_logprobs=[TopLogprob(token=token_text(tok, t), logprob=v, bytes=list(token_text(tok, t).encode()))
                              for t, v in top]))
        return ChatLogprobs(content=content)

    async def stream_events(self, runs: list[_Run], n: int, *, token: Callable[[int, _Choice, str], str],
                            final: Callable[[int, str, Optional[str]], str],
                            usage: Optional[Callable[[], str]] = None, head: Sequence[str] = ()
                            ) -> AsyncIterator[str]:
        """The SSE body both endpoints stream: ``head``, then one ``token`` chunk per generated token (its text
        may be empty: bytes held back, as vLLM sends them, so clients and benchmarks see every step), each
        choice's ``final`` chunk as soon as its sample ends, the ``usage`` chunk and ``[DONE]``. Choices are
        indexed prompt-major (``prompt * n + sample``)."""
        try:
            for h in head:
                yield h
            async for run, ev in _merge(runs):
                ch = run.apply(ev)
                base = runs.index(run) * n
                if ch is not None:
                    yield token(base + ch.index, ch, ch.text.take())
                    if ch.finish_reason is not None and not run.done:  # this sample is over
                        yield final(base + ch.index, ch.close_chunk(), ch.finish_reason)
                if run.done:
                    run.observe(self.state.metrics)
                    if run.error:
                        yield _sse(ErrorResponse(error=ErrorInfo(message=f"generation failed: {run.error}",
                                                                 type="server_error", code="generation_failed")))
                        continue
                    for c in run.choices:
                        rest = c.close_chunk()
                        if rest is not None:
                            yield final(base + c.index, rest, c.finish_reason)
            if usage is not None:
                yield usage()
            yield "data: [DONE]\n\n"
        finally:
            self.close(runs)

    # -- endpoints ---------------------------------------------------------------------------------------------
    async def completions(self, request: Request, req: CompletionRequest) -> Response:
        self.check_model(req.model)
        prompts = self.completion_prompts(req)
        sampling = self.sampling(req, req.max_tokens, req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        runs = self.submit(prompts, sampling, rid, "prompt")
        created = int(time.time())
        n = sampling.n
        k = req.logprobs or 0
        want_lp = req.logprobs is not None

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            offsets: dict[int, int] = {}

            def chunk(choice_index: int, text: str, lp: Optional[CompletionLogprobs],
                      reason: Optional[str]) -> str:
                return _sse(CompletionChunk(id=rid, created=created, model=self.state.model_name, choices=[
                    CompletionChoice(index=choice_index, text=text, logprobs=lp, finish_reason=reason)]))

            sent_lp: dict[int, int] = {}

            def token(idx: int, ch: _Choice, text: str) -> str:
                lp = None
                if want_lp:
                    lp = self.completion_logprobs(ch, sent_lp.get(idx, 0), k, offsets.get(idx, 0))
                    sent_lp[idx] = len(ch.token_ids)
                    offsets[idx] = lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else 0
                return chunk(idx, text, lp, None)

            usage = (lambda: _sse(CompletionChunk(id=rid, created=created, model=self.state.model_name, choices=[],
                                                  usage=self.usage(runs)))) if include_usage else None
            events = self.stream_events(runs, n, token=token, final=lambda i, text, why: chunk(i, text, None, why),
                                        usage=usage)
            return SSEResponse(events, on_close=lambda: self.close(runs))

        if not await self.collect(request, runs):
            return Response(status_code=499)
        self.check_errors(runs)
        choices = []
        for pi, run in enumerate(runs):
            for c in run.choices:
                choices.append(CompletionChoice(index=pi * n + c.index, text=c.text.finish_all(),
                                                logprobs=self.completion_logprobs(c, 0, k, 0) if want_lp else None,
                                                finish_reason=c.finish_reason))
        body = CompletionResponse(id=rid, created=created, model=self.state.model_name, choices=choices,
                                  usage=self.usage(runs))
        return JSONResponse(body.model_dump())

    async def chat_completions(self, request: Request, req: ChatCompletionRequest) -> Response:
        self.check_model(req.model)
        ids = self.chat_prompt(req)
        limit = req.output_limit()
        if limit is None:  # OpenAI's chat default: as long as the context allows
            limit = self.state.max_seq_len - len(ids)
        k = req.top_logprobs or 0
        sampling = self.sampling(req, limit, k if req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        runs = self.submit([ids], sampling, rid, "messages")
        run = runs[0]
        created = int(time.time())
        model = self.state.model_name

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(i: int, delta: ChatDelta, lp: Optional[ChatLogprobs] = None,
                      reason: Optional[str] = None) -> str:
                return _sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[
                    ChatStreamChoice(index=i, delta=delta, logprobs=lp, finish_reason=reason)]))

            sent_lp = [0] * sampling.n

            def token(i: int, ch: _Choice, text: str) -> str:
                lp = None
                if req.logprobs:
                    lp = self.chat_logprobs(ch, sent_lp[i], k)
                    sent_lp[i] = len(ch.token_ids)
                return chunk(i, ChatDelta(content=text), lp)

            usage = (lambda: _sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=[],
                                                      usage=self.usage(runs)))) if include_usage else None
            events = self.stream_events(
                runs, sampling.n, token=token, usage=usage,
                final=lambda i, text, why: chunk(i, ChatDelta(content=text or None), None, why),
                head=[chunk(c.index, ChatDelta(role="assistant", content="")) for c in run.choices])
            return SSEResponse(events, on_close=lambda: self.close(runs))

        if not await self.collect(request, runs):
            return Response(status_code=499)
        self.check_errors(runs)
        choices = [ChatChoice(index=c.index, message=ChatMessageOut(content=c.text.finish_all()),
                              logprobs=self.chat_logprobs(c, 0, k) if req.logprobs else None,
                              finish_reason=c.finish_reason) for c in run.choices]
        body = ChatCompletionResponse(id=rid, created=created, model=model, choices=choices, usage=self.usage(runs))
        return JSONResponse(body.model_dump())

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.state.model_name, max_model_len=self.state.max_seq_len)])


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [x for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}",
                        param="body", code="invalid_json")
    param = str(loc[0]) if loc else "body"
    where = ".".join(str(x) for x in loc) or "body"
    msg = first.get("msg", "invalid request")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return APIError(400, f"{where}: {msg}{more}", param=param)


class _CountRequests:
    """Pure ASGI middleware counting responses by endpoint and status (BaseHTTPMiddleware would wrap
    streaming responses and get in the way of disconnect detection)."""

    def __init__(self, app: Any, metrics: ServerMetrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
        status = {"code": 500}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http_requests.labels(endpoint=endpoint, status=str(status["code"])).inc()


def build_app(service: Any, tokenizer: Any, *, model_name: str, max_seq_len: int,
              default_sampling: Optional[SamplingConfig] = None, shutdown_timeout: Optional[float] = None,
              owns_service: bool = True) -> FastAPI:
    """An OpenAI-compatible FastAPI app over ``service`` (an ``EngineService``).

    ``owns_service``: shut the service down (draining what is in flight, up to ``shutdown_timeout`` seconds)
    when the app's lifespan ends.
    """
    if tokenizer is None:
        raise ConfigError(f"serving {model_name!r} needs a tokenizer: the OpenAI API speaks text")
    metrics = ServerMetrics(service.stats)
    state = ServerState(service, tokenizer, model_name, max_seq_len, default_sampling or SamplingConfig(),
                        metrics, shutdown_timeout, owns_service)
    server = Server(state)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if state.owns_service:
            log.info("shutting down: draining requests in flight")
            await asyncio.to_thread(service.shutdown, drain=True, timeout=state.shutdown_timeout)

    app = FastAPI(title="autodeploy", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(AutoDeployError)
    async def _autodeploy_error(_request: Request, exc: AutoDeployError) -> JSONResponse:
        return _engine_error(exc, "prompt").response()

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    @app.get("/health")
    async def health() -> Response:
        try:
            await asyncio.to_thread(service.stats)
        except Exception as exc:
            return APIError(503, f"engine unavailable: {exc}", type="server_unavailable").response()
        if getattr(service, "closed", False):
            return APIError(503, "server shutting down", type="server_unavailable").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        data, content_type = await asyncio.to_thread(metrics.render)
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(server.models().model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        server.check_model(model_id)
        return JSONResponse(server.models().data[0].model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await server.completions(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await server.chat_completions(request, body)

    endpoints = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
    app.add_middleware(_CountRequests, metrics=metrics, endpoints=endpoints)
    return app
