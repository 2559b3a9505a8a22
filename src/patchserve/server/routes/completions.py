"""OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` with interventions:
parse, the generation service (``server/generation.py``), the wire model or its stream of
chunks (``stream: true``: OpenAI's ``data: {...}`` chunks, then ``data: [DONE]``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import StreamingResponse

from patchserve.engine import InvalidArgument
from patchserve.engine.generation import GenerationResult, apply_chat_template
from patchserve.engine.generation.batch import Finish
from patchserve.server.errors import error_responses
from patchserve.server.generation import Generation
from patchserve.server.openai import chat_logprobs, completion_logprobs
from patchserve.server.openapi import event_stream
from patchserve.server.state import ServerState
from patchserve.wire import sse
from patchserve.wire.base import WireModel
from patchserve.wire.completions import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionResponse,
    Usage,
)
from patchserve.wire.requests import ChatCompletionRequest, CompletionRequest

router = APIRouter()

Results = list[tuple[GenerationResult, str | None]]


def _usage(results: list[GenerationResult]) -> Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _requested(result: GenerationResult) -> list[dict[str, float]] | None:
    if result.requested_logprobs is None:
        return None
    return [{str(k): v for k, v in step.items()} for step in result.requested_logprobs]


def _completion_choice(
    state: ServerState, index: int, result: GenerationResult, captured: str | None
) -> CompletionChoice:
    return CompletionChoice(
        index=index,
        text=result.text,
        logprobs=None
        if result.logprobs is None
        else completion_logprobs(state.tokenizer, result.logprobs),
        finish_reason=result.finish_reason,
        token_ids=result.token_ids,
        logprob_token_ids=_requested(result),
        captured_source_run=captured,
    )


def _chat_choice(
    state: ServerState, index: int, result: GenerationResult, captured: str | None
) -> ChatChoice:
    return ChatChoice(
        index=index,
        message=AssistantMessage(content=result.text),
        logprobs=None
        if result.logprobs is None
        else chat_logprobs(state.tokenizer, result.logprobs),
        finish_reason=result.finish_reason,
        token_ids=result.token_ids,
        logprob_token_ids=_requested(result),
        captured_source_run=captured,
    )


def _stream(
    gen: Generation,
    event: Callable[[int, str, Finish | None], WireModel],
    usage: Callable[[Usage], WireModel],
) -> StreamingResponse:
    """The run as Server-Sent Events: ``event`` per piece of text, then (with
    ``stream_options.include_usage``) ``usage``'s chunk, then ``[DONE]``."""
    options = gen.req.stream_options

    async def events() -> AsyncIterator[bytes]:
        async for item in gen.stream(event):
            if isinstance(item, WireModel):
                yield sse.encode(item)
            elif options is not None and options.include_usage:
                yield sse.encode(usage(_usage([r for r, _ in item])))
        yield sse.DONE

    return StreamingResponse(events(), media_type="text/event-stream")


# Shown by /docs and sent as they are by a schema-driven fuzzer (Schemathesis' examples
# phase), so the chunk streams are exercised and checked against their documented events.
_FACT = "The capital of Rorsun is"
COMPLETION_EXAMPLES: dict[str, Any] = {
    "text": {"summary": "Greedy, two tokens", "value": {"prompt": _FACT, "max_tokens": 2}},
    "stream": {
        "summary": "Two seeded samples, streamed with usage",
        "value": {
            "prompt": _FACT,
            "max_tokens": 3,
            "n": 2,
            "seed": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    },
}
CHAT_EXAMPLES: dict[str, Any] = {
    "stream": {
        "summary": "A chat answer, streamed",
        "value": {
            "messages": [{"role": "user", "content": _FACT}],
            "max_tokens": 2,
            "stream": True,
        },
    },
}
COMPLETION_ERRORS = error_responses(400, 401, 404, 409, 413, 500, 503, 507)


def _responses(chunk: type[WireModel]) -> dict[int | str, dict[str, Any]]:
    what = f"with `stream: true` Server-Sent Events: {chunk.__name__} objects, then [DONE]"
    return {
        200: {"description": f"The completion; {what}", "content": event_stream(chunk)},
        **COMPLETION_ERRORS,
    }


@router.post(
    "/v1/completions", response_model=CompletionResponse, responses=_responses(CompletionChunk)
)
async def completions(
    req: Annotated[CompletionRequest, Body(openapi_examples=COMPLETION_EXAMPLES)], request: Request
) -> Any:
    """OpenAI-compatible completions with patches, steering vectors, captures and exact
    logprobs of chosen ids; every prompt (and sample) decoded in one batch."""
    state: ServerState = request.app.state.patchserve
    state.check_model(req.model)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise InvalidArgument("prompt is empty", "prompt")
    state.check_prompt_count(len(prompts))
    if req.logprobs is not None and (
        not isinstance(req.logprobs, int) or isinstance(req.logprobs, bool)
    ):
        raise InvalidArgument("logprobs must be an integer (top-k)", "logprobs")
    encoded = [state.encode(p).ids for p in prompts]
    gen = await state.run_blocking(
        lambda: Generation.prepare(
            state, req, prompts, encoded, logprobs=req.logprobs, echo=req.echo, best_of=req.best_of
        )
    )
    head: dict[str, Any] = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": state.model_name,
    }
    await state.run_cancellable(request.receive, gen.capture)
    if req.stream:
        return _stream(
            gen,
            lambda i, text, end: CompletionChunk(
                **head, choices=[CompletionChunkChoice(index=i, text=text, finish_reason=end)]
            ),
            lambda usage: CompletionChunk(**head, choices=[], usage=usage),
        )
    results: Results = await state.run_cancellable(request.receive, gen.run)
    choices = [_completion_choice(state, i, r, c) for i, (r, c) in enumerate(results)]
    return CompletionResponse(**head, choices=choices, usage=_usage([r for r, _ in results]))


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=_responses(ChatCompletionChunk),
)
async def chat_completions(
    req: Annotated[ChatCompletionRequest, Body(openapi_examples=CHAT_EXAMPLES)], request: Request
) -> Any:
    """OpenAI-compatible chat completions (the model's chat template) with the same
    interventions."""
    state: ServerState = request.app.state.patchserve
    state.check_model(req.model)
    if not req.messages:
        raise InvalidArgument("messages is empty", "messages")
    ids = apply_chat_template(state.tokenizer, [m.model_dump() for m in req.messages])
    state.check_token_count(len(ids), "messages")
    top = req.top_logprobs if req.logprobs else None
    if req.logprobs and top is None:
        top = 0
    prompt = state.tokenizer.decode(ids)
    gen = await state.run_blocking(  # may read a source run
        lambda: Generation.prepare(state, req, [prompt], [ids], logprobs=top, echo=False)
    )
    head: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": state.model_name,
    }
    await state.run_cancellable(request.receive, gen.capture)
    if req.stream:
        return _stream(
            gen,
            lambda i, text, end: ChatCompletionChunk(
                **head,
                choices=[
                    ChatChunkChoice(
                        index=i, delta=ChatDelta(role="assistant", content=text), finish_reason=end
                    )
                ],
            ),
            lambda usage: ChatCompletionChunk(**head, choices=[], usage=usage),
        )
    results: Results = await state.run_cancellable(request.receive, gen.run)
    choices = [_chat_choice(state, i, r, c) for i, (r, c) in enumerate(results)]
    return ChatCompletionResponse(**head, choices=choices, usage=_usage([r for r, _ in results]))
