"""The fabric's HTTP records: one definition for the api (response models), the CLI and the client.

Usage::

    job: JobRecord = fabric.status(job_id)      # {"id", "state", "position", ...}
    if job["state"] in TERMINAL: ...

Plain typed dicts (no pydantic, no HTTP library), so the thin client reads them as the JSON
they are and the gateway declares them in its OpenAPI document.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired

from typing_extensions import TypedDict

JobState = Literal["queued", "running", "completed", "failed", "cancelled"]
EventType = Literal["queued", "running", "tokens", "completed", "failed", "cancelled", "log"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class LineInfo(TypedDict):
    """A line of the user's code that recorded a node."""

    file: str
    line: int
    code: str


class ErrorBody(TypedDict):
    """Every 4xx/5xx answer: `detail` says what went wrong; the rest say where, when known."""

    detail: str
    node: NotRequired[int | None]
    trace: NotRequired[int | None]
    line: NotRequired[LineInfo | None]
    state: NotRequired[str]
    errors: NotRequired[list[dict[str, Any]]]  # each field that failed validation: {loc, msg}


class JobMeta(TypedDict, total=False):
    kind: str  # "trace", "generate" or "session"
    traces: int
    nodes: int
    names: dict[str, Any]  # saved values' variable names in the submitting code


class JobRecord(TypedDict):
    id: str
    user: str
    model: str
    state: JobState
    created: float
    bytes: int
    meta: JobMeta
    started: NotRequired[float]
    finished: NotRequired[float]
    position: NotRequired[int | None]  # while queued: jobs ahead of it
    error: NotRequired[str]
    error_node: NotRequired[int]
    error_trace: NotRequired[int]
    attempts: NotRequired[int]  # times a replica started it (a lost replica's jobs run once more)


class SubmitReply(TypedDict):
    id: str
    state: JobState
    model: str
    position: int
    status: str
    events: str
    result: str


class BatchItem(TypedDict):
    """One job of a batch, in the order sent: accepted (`id`, `position`) or refused (`status`
    and `detail`, as POST /v1/jobs would have answered it)."""

    index: int
    id: NotRequired[str]
    position: NotRequired[int]
    status: NotRequired[int]
    detail: NotRequired[str]
    node: NotRequired[int | None]
    trace: NotRequired[int | None]
    line: NotRequired[LineInfo | None]
    retry_after: NotRequired[float]


class BatchReply(TypedDict):
    # None (both) only when Redis went away before the batch could be recorded: the accepted
    # jobs run, and are followed one by one (their ids are in `jobs`).
    batch: str | None
    accepted: int
    events: str | None  # one websocket with every accepted job's events
    jobs: list[BatchItem]


class CancelReply(TypedDict):
    id: str
    state: JobState


class JobEvent(TypedDict):
    """One event of a job's stream (a websocket text frame); fields beyond id and type by type."""

    id: str
    type: EventType
    position: NotRequired[int]  # queued
    retry: NotRequired[bool]  # queued again: its replica was lost
    reason: NotRequired[str]
    batch: NotRequired[int]  # running: jobs in its batch
    result: NotRequired[str]  # completed: where the result is
    bytes: NotRequired[int]
    seconds: NotRequired[float]
    shared: NotRequired[int]  # completed: jobs that shared its forward pass or generate (1: it ran alone)
    inline: NotRequired[bool]  # completed: the result follows as one binary frame
    message: NotRequired[str | None]  # failed, log
    node: NotRequired[int | None]
    trace: NotRequired[int | None]
    by: NotRequired[str]  # cancelled
    step: NotRequired[int]  # tokens: the generation step (0: the token after the prompt)
    tokens: NotRequired[list[int]]  # tokens: that step's token of each row (padding after a row's end)


class ModelLimitsInfo(TypedDict):
    max_batch: int
    max_new_tokens: int
    max_saved_bytes: int
    timeout_s: float
    max_nodes: int
    max_tensor_bytes: int
    max_traces: int


class ModelInfo(TypedDict):
    name: str
    source: str
    dtype: str
    gpus: int
    state: str  # "ready", "loading", "failed", "unavailable" (no live replica), "not started"
    error: str | None
    replicas: int  # replicas alive now
    replicas_wanted: int
    queue_depth: int
    oldest_wait_s: float | None
    limits: ModelLimitsInfo


class ModuleTreeJSON(TypedDict):
    type: str
    children: dict[str, Any]  # name -> ModuleTreeJSON
    params: NotRequired[dict[str, list[int]]]  # its own parameters: name -> shape
    source: NotRequired[str]  # its forward's operations: a key of the root's `sources`
    sources: NotRequired[dict[str, list[list[Any]]]]  # root only: key -> [[name, line, text], ...]


class EditRecord(TypedDict):
    """A persistent edit registered for one user's jobs on one model (`POST /v1/models/{name}/edits`)."""

    id: str
    model: str
    nodes: int
    bytes: int
    created: float
    lines: list[str]  # the user's lines that recorded it, for `nnfabric edits`


class ModelStructure(TypedDict):
    name: str
    tree: ModuleTreeJSON


class TokenizerFiles(TypedDict):
    files: dict[str, str]


class Health(TypedDict):
    ok: bool


class Readiness(TypedDict):
    ready: bool
    checks: dict[str, Any]


class StatusModel(TypedDict):
    name: str
    state: str
    replicas: int
    replicas_wanted: int
    queue_depth: int
    oldest_wait_s: float | None
    gpus: int
    reason: str | None  # why the model cannot run jobs now (unavailable, failed), else None


class StatusJobs(TypedDict):
    """Aggregates over the most recent jobs: no ids, no users, no contents."""

    recent: int
    by_state: dict[str, int]
    median_wait_s: float | None
    median_run_s: float | None


class StatusPage(TypedDict):
    models: list[StatusModel]
    jobs: StatusJobs
    outcomes: dict[str, int]


class ModelHistory(TypedDict):
    """One model's samples, oldest first, as columns: entry i of every list is sample i.
    Rates and percentiles are over the jobs that ended between sample i-1 and sample i (None:
    no such job, or no sample before)."""

    name: str
    t: list[float]  # when sampled, on Redis's clock (Unix seconds)
    queue_depth: list[int]
    jobs_per_s: list[float | None]  # jobs that ended (any final state) per second
    wait_p50_s: list[float | None]  # created to started
    wait_p95_s: list[float | None]
    run_p50_s: list[float | None]  # started to ended
    run_p95_s: list[float | None]
    batch_size: list[float | None]  # mean jobs per batch sent to a replica
    replicas: list[int]  # live replicas


class StatusHistory(TypedDict):
    """GET /status/history.json: about an hour of each model's aggregates (no ids, no users)."""

    interval_s: float  # seconds between samples
    window_s: float  # how far back the history reaches
    now: float  # Redis's clock when answered: the charts' right edge
    models: list[ModelHistory]


class ActivationsReply(TypedDict):
    job: str
    activations: dict[str, dict[str, Any]]  # prompt index -> module path -> {dtype, shape, data}


class CompletionChoice(TypedDict):
    index: int
    text: str
    finish_reason: str  # "length" or "stop"
    logprobs: None


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(TypedDict):
    """OpenAI's text completion object."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessage(TypedDict):
    role: str
    content: str


class ChatChoice(TypedDict):
    index: int
    message: ChatMessage
    finish_reason: str


class ChatCompletion(TypedDict):
    """OpenAI's chat completion object."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class OpInfo(TypedDict):
    """One op of the registry: its positional arity and, for named ops, the names allowed."""

    min_args: int
    max_args: int
    name_arg: NotRequired[int]
    names: NotRequired[list[str]]
    module_event: NotRequired[bool]


class SchemaVersions(TypedDict):
    graph: str
    result: str


# GET /v1/schema: a JSON Schema document (hence the "$" keys) plus the op table.
SchemaDocument = TypedDict(
    "SchemaDocument",
    {
        "$schema": str,
        "$id": str,
        "title": str,
        "version": SchemaVersions,
        "$defs": dict[str, Any],
        "ops": dict[str, OpInfo],
        "kwargs": str,
    },
)
