"""High-level routes, each compiled into an ordinary job (same validation, limits, queue, batching):

- `POST /v1/models/{name}/activations`: prompts and module paths -> those modules' outputs;
- `POST /v1/completions` and `POST /v1/chat/completions`: OpenAI-compatible (any OpenAI client
  works, streaming too), with an optional `nnfabric` field of interventions (steering).

They wait for the job (up to NNFABRIC_COMPILED_WAIT_S); a job still queued then is answered
with 202 and its id, to follow like any other.
"""

from __future__ import annotations

import base64
import functools
import json
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from nnfabric.graph.codec import encode_envelope
from nnfabric.graph.json_form import result_to_json
from nnfabric.graph.validate import GraphError, Limits
from nnfabric.protocol import TERMINAL, ActivationsReply, ChatCompletion, Completion
from pydantic import BaseModel, Field

from ..common.catalog import ModelSpec, limits_for
from ..common.settings import Settings
from ..common.store import ApiKey, Store
from .compile import Detokenizer, Extension, activations_job, generation_job, vector_of
from .deps import CatalogDep, KeyDep, SettingsDep, StoreDep
from .errors import ApiError, InvalidJob, responses
from .intake import accept

router = APIRouter(tags=["compiled"])
_WAITING: dict[int | str, dict[str, Any]] = {
    202: {"description": "still queued after the wait: follow the job like any other"}
}
_STREAMABLE: dict[int | str, dict[str, Any]] = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                     "description": "the completion (JSON), or its chunks as server-sent events"}}  # fmt: skip
# What every compiled route may answer besides its result; generation may also stream.
_COMPILED = {**_WAITING, **responses(401, 403, 404, 413, 422, 429, 503)}
_GENERATING = {**_STREAMABLE, **_COMPILED}


class ActivationsRequest(BaseModel):
    prompts: list[str] = Field(min_length=1, max_length=64)
    modules: list[str] = Field(min_length=1, max_length=64, description="module paths (GET .../structure)")
    positions: list[int] | None = Field(None, max_length=64, description="token positions to keep, e.g. [-1]")


class CompletionRequest(BaseModel):
    model: str
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    stream: bool = False
    nnfabric: Extension | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    nnfabric: Extension | None = None


def _spec(name: str, key: ApiKey, catalog: Any) -> ModelSpec:
    spec: ModelSpec | None = catalog.get(name)
    if spec is None:
        raise ApiError(404, f"unknown model {name[:100]!r}; GET /v1/models lists the hosted ones")
    if not key.allows(spec.name):
        raise ApiError(403, f"this API key may not use model {spec.name!r}")
    return spec


async def _run(
    header: dict[str, Any], blob: bytes, key: ApiKey, store: Store, catalog: Any, settings: Settings
) -> tuple[str, bytes | JSONResponse]:
    """Queue the compiled job and wait for its result (or answer 202 with the job to follow)."""
    body = encode_envelope(header, blob)
    reply = await accept(header, blob, body, key, store, catalog, settings)
    job_id = reply["id"]
    deadline = time.monotonic() + settings.compiled_wait_s
    cursor = "0-0"
    while time.monotonic() < deadline:
        block = max(1, int(min(1.0, deadline - time.monotonic()) * 1000))
        for event in await store.events(job_id, cursor, block_ms=block):
            cursor = event["id"]
            if event["type"] == "completed":
                data = await store.result(job_id)
                if data is None:
                    raise ApiError(404, "the result has expired")
                return job_id, data
            if event["type"] in TERMINAL:
                raise ApiError(422, str(event.get("message") or f"job {event['type']}"), node=event.get("node"))
    return job_id, JSONResponse({**reply, "detail": "still queued: follow the job"}, status_code=202)


@router.post(
    "/v1/models/{name}/activations",
    response_model=ActivationsReply,
    responses=_COMPILED,
)
async def activations(
    name: str, request: ActivationsRequest, key: KeyDep, store: StoreDep, catalog: CatalogDep, settings: SettingsDep
) -> Any:
    """Each prompt's output of each module (at `positions`, if given), as JSON tensors:
    `{"job", "activations": {"<prompt index>": {"<module>": {dtype, shape, data}}}}`."""
    spec = _spec(name, key, catalog)
    limits = limits_for(spec, settings)
    header, blob = activations_job(spec.name, request.prompts, request.modules, request.positions, limits)
    job_id, data = await _run(header, blob, key, store, catalog, settings)
    if isinstance(data, JSONResponse):
        return data
    values = result_to_json(data)["values"]
    found: dict[str, dict[str, Any]] = {}
    for label, node in header["names"].items():
        prompt, _, module = label.partition(".")
        found.setdefault(prompt, {})[module] = values.get(node)
    return {"job": job_id, "activations": found}


@functools.lru_cache(maxsize=16)
def _detokenizer(files: str) -> Detokenizer:
    return Detokenizer(json.loads(files))


async def _tokenizer(spec: ModelSpec, store: Store) -> Detokenizer:
    published = await store.model(spec.name, "tokenizer")
    if "tokenizer" not in published:
        raise ApiError(503, f"model {spec.name!r} is not loaded yet", headers={"Retry-After": "5"})
    try:
        return _detokenizer(published["tokenizer"])
    except GraphError as exc:
        raise ApiError(422, str(exc)) from None


def _sampling(temperature: float, top_p: float, seed: int | None) -> dict[str, Any]:
    if temperature == 0:
        return {}  # greedy, as model.generate() is by default
    options: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    if seed is not None:
        options["seed"] = seed
    return options


async def _generation(
    spec: ModelSpec,
    prompts: list[str],
    max_tokens: int,
    sampling: dict[str, Any],
    extension: Extension | None,
    key: ApiKey,
    store: Store,
    settings: Settings,
) -> tuple[dict[str, Any], bytes, Detokenizer]:
    """The generation job's header and tensors, and the model's tokenizer."""
    tokenizer = await _tokenizer(spec, store)
    if extension is not None:
        await _resolve_saved(extension, key, store)
        if extension.exact:
            sampling = {**sampling, "exact": True}
    limits: Limits = limits_for(spec, settings)
    if max_tokens > limits.max_new_tokens:
        raise ApiError(422, f"max_tokens must be at most {limits.max_new_tokens} for model {spec.name!r}")
    try:
        header, blob = generation_job(spec.name, prompts, max_tokens, sampling,
                                      extension.interventions if extension else [], limits)  # fmt: skip
    except GraphError as exc:
        raise InvalidJob(exc) from None
    return header, blob, tokenizer


def _choices(data: bytes, prompts: list[str], tokenizer: Detokenizer) -> tuple[list[tuple[str, int, str]], int]:
    """Each prompt's (text, tokens, finish reason) from the job's result, and the prompt tokens."""
    ids = next(iter(result_to_json(data)["values"].values()))
    rows, width = ids["shape"]
    flat = struct.unpack(f"<{rows * width}q", base64.b64decode(ids["data"]))
    counts = [tokenizer.count(p) for p in prompts]
    prompt_width = max(counts)
    choices = [tokenizer.completion(list(flat[r * width : (r + 1) * width]), prompt_width, None) for r in range(rows)]
    return choices, sum(counts)


async def _generate(
    spec: ModelSpec,
    prompts: list[str],
    max_tokens: int,
    sampling: dict[str, Any],
    extension: Extension | None,
    key: ApiKey,
    store: Store,
    catalog: Any,
    settings: Settings,
) -> tuple[str, list[tuple[str, int, str]], int] | JSONResponse:
    """(job id, each prompt's (text, tokens, finish reason), prompt tokens)."""
    header, blob, tokenizer = await _generation(spec, prompts, max_tokens, sampling, extension, key, store, settings)
    job_id, data = await _run(header, blob, key, store, catalog, settings)
    if isinstance(data, JSONResponse):
        return data
    choices, prompt_tokens = _choices(data, prompts, tokenizer)
    return job_id, choices, prompt_tokens


Piece = tuple[int, str | None, str | None]  # (row, text piece or None, finish reason or None)
Chunk = Callable[[int, str | None, str | None], dict[str, Any]]


async def _streamed(
    spec: ModelSpec,
    prompts: list[str],
    max_tokens: int,
    sampling: dict[str, Any],
    extension: Extension | None,
    key: ApiKey,
    store: Store,
    catalog: Any,
    settings: Settings,
) -> tuple[str, AsyncIterator[Piece]]:
    """Queue a generation that streams: its id, and its text as it is made: (row, piece, None)
    as each step's tokens arrive (`tokens` events), then (row, None, finish reason) per row."""
    sampling = {**sampling, "stream": True}
    header, blob, tokenizer = await _generation(spec, prompts, max_tokens, sampling, extension, key, store, settings)
    reply = await accept(header, blob, encode_envelope(header, blob), key, store, catalog, settings)
    job_id = reply["id"]
    deadline = settings.compiled_wait_s + spec.limits.timeout_s

    async def pieces() -> AsyncIterator[Piece]:
        made: list[list[int]] = [[] for _ in prompts]
        sent = [""] * len(prompts)
        ended = [False] * len(prompts)
        cursor, start, step = "0-0", time.monotonic(), 0
        while time.monotonic() - start < deadline:
            for event in await store.events(job_id, cursor, block_ms=1000):
                cursor = event["id"]
                if event["type"] == "tokens" and event.get("step") == step:  # a run again repeats none
                    step += 1
                    for row, token in enumerate(event.get("tokens", [])[: len(prompts)]):
                        if ended[row] or token == tokenizer.eos_id:
                            ended[row] = True
                            continue
                        made[row].append(token)
                        text = tokenizer.text(made[row])
                        # A character split over tokens decodes as U+FFFD until its last byte comes.
                        if text.startswith(sent[row]) and len(text) > len(sent[row]) and not text.endswith("\ufffd"):
                            yield row, text[len(sent[row]) :], None
                            sent[row] = text
                elif event["type"] == "completed":
                    data = await store.result(job_id)
                    if data is None:
                        raise ApiError(404, "the result has expired")
                    for row, (text, _, finish) in enumerate(_choices(data, prompts, tokenizer)[0]):
                        if text.startswith(sent[row]) and len(text) > len(sent[row]):
                            yield row, text[len(sent[row]) :], None  # what no event carried (a job run alone)
                        yield row, None, finish
                    return
                elif event["type"] in TERMINAL:
                    raise ApiError(422, str(event.get("message") or f"job {event['type']}"), node=event.get("node"))
        raise ApiError(504, f"job {job_id} did not end within {deadline:g} s; follow it with GET /v1/jobs/{job_id}")

    return job_id, pieces()


async def _sse(first: list[dict[str, Any]], pieces: AsyncIterator[Piece], chunk: Chunk) -> AsyncIterator[bytes]:
    """Server-sent events: each piece as a chunk the moment it is made, then [DONE]; a failure as
    an `error` event (the status line went out with the first byte)."""
    for item in first:
        yield f"data: {json.dumps(item)}\n\n".encode()
    try:
        async for row, text, finish in pieces:
            yield f"data: {json.dumps(chunk(row, text, finish))}\n\n".encode()
    except ApiError as exc:
        error = {"message": exc.message, "type": "job_failed" if exc.status == 422 else "timeout",
                 "code": exc.status}  # fmt: skip
        yield f"data: {json.dumps({'error': error})}\n\n".encode()
    except Exception as exc:  # Redis away mid-stream...: the client still hears why, then [DONE]
        error = {"message": f"the stream broke off: {type(exc).__name__}", "type": "server_error", "code": 503}
        yield f"data: {json.dumps({'error': error})}\n\n".encode()
    yield b"data: [DONE]\n\n"


async def _resolve_saved(extension: Extension, key: ApiKey, store: Store) -> None:
    """Interventions that name a value an earlier job of the caller saved get its numbers."""
    for number, edit in enumerate(extension.interventions):
        if edit.saved is None:
            continue
        where = f"intervention {number}"
        job = await store.job(edit.saved.job)
        if job is None or job["user"] != key.user:
            raise ApiError(404, f"{where}: no job {edit.saved.job!r}")
        data = await store.result(edit.saved.job) if job["state"] == "completed" else None
        if data is None:
            raise ApiError(409, f"{where}: job {edit.saved.job!r} has no result ({job['state']})")
        values = result_to_json(data)["values"]
        names = job.get("meta", {}).get("names", {})
        result_key = names.get(edit.saved.value, edit.saved.value)
        if not isinstance(result_key, str) or result_key not in values:
            raise ApiError(422, f"{where}: job {edit.saved.job!r} saved no value {edit.saved.value!r}")
        try:
            edit.add = vector_of(values[result_key], where)
        except GraphError as exc:
            raise ApiError(422, str(exc)) from None


def _usage(prompt_tokens: int, choices: list[tuple[str, int, str]]) -> dict[str, int]:
    completion = sum(tokens for _, tokens, _ in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses=_GENERATING,
)
async def completions(
    request: CompletionRequest, key: KeyDep, store: StoreDep, catalog: CatalogDep, settings: SettingsDep
) -> Any:
    """OpenAI-compatible text completion; `nnfabric.interventions` steers the generation."""
    spec = _spec(request.model, key, catalog)
    prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
    if not prompts or len(prompts) > 64:
        raise ApiError(422, "prompt must be a string or a list of 1..64 strings")
    sampling = _sampling(request.temperature, request.top_p, request.seed)
    if request.stream:
        job_id, pieces = await _streamed(spec, prompts, request.max_tokens, sampling, request.nnfabric, key, store,
                                         catalog, settings)  # fmt: skip
        base = {"id": f"cmpl-{job_id}", "object": "text_completion", "created": int(time.time()), "model": spec.name}

        def chunk(row: int, text: str | None, finish: str | None) -> dict[str, Any]:
            return {**base, "choices": [{"index": row, "text": text or "", "finish_reason": finish, "logprobs": None}]}

        return StreamingResponse(_sse([], pieces, chunk), media_type="text/event-stream")
    done = await _generate(spec, prompts, request.max_tokens, sampling, request.nnfabric, key, store, catalog,
                           settings)  # fmt: skip
    if isinstance(done, JSONResponse):
        return done
    job_id, choices, prompt_tokens = done
    base = {"id": f"cmpl-{job_id}", "object": "text_completion", "created": int(time.time()), "model": spec.name}
    return {**base, "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                                for i, (text, _, finish) in enumerate(choices)],
            "usage": _usage(prompt_tokens, choices)}  # fmt: skip


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=_GENERATING,
)
async def chat_completions(
    request: ChatRequest, key: KeyDep, store: StoreDep, catalog: CatalogDep, settings: SettingsDep
) -> Any:
    """OpenAI-compatible chat completion (the model's own chat template); `nnfabric.interventions`
    steers the generation."""
    spec = _spec(request.model, key, catalog)
    tokenizer = await _tokenizer(spec, store)
    try:
        prompt = tokenizer.chat_prompt([m.model_dump() for m in request.messages])
    except GraphError as exc:
        raise ApiError(422, str(exc)) from None
    except Exception as exc:  # a template error is about this conversation, not the server
        raise ApiError(422, f"the chat template could not render this conversation: {type(exc).__name__}") from None
    max_tokens = request.max_completion_tokens or request.max_tokens or 16
    sampling = _sampling(request.temperature, request.top_p, request.seed)
    if request.stream:
        job_id, pieces = await _streamed(spec, [prompt], max_tokens, sampling, request.nnfabric, key, store, catalog,
                                         settings)  # fmt: skip
        head = {"id": f"chatcmpl-{job_id}", "created": int(time.time()), "model": spec.name,
                "object": "chat.completion.chunk"}  # fmt: skip

        def chunk(row: int, text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {"content": text} if text is not None else {}
            return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        first = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
        return StreamingResponse(_sse(first, pieces, chunk), media_type="text/event-stream")
    done = await _generate(spec, [prompt], max_tokens, sampling, request.nnfabric, key, store, catalog, settings)
    if isinstance(done, JSONResponse):
        return done
    job_id, choices, prompt_tokens = done
    ((text, _, finish),) = choices
    base = {"id": f"chatcmpl-{job_id}", "created": int(time.time()), "model": spec.name}
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": _usage(prompt_tokens, choices)}  # fmt: skip
