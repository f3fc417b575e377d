"""Errors by exception class, mapped to JSON in one place: {"detail": message, ...} with extra
fields (the node, the user's line) where known. Routes raise; nothing searches messages."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from nnfabric.graph.validate import GraphError, LimitExceeded
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.extra = extra


class InvalidJob(ApiError):
    """A request the validator refused: 413 for a limit, 422 for anything else."""

    def __init__(self, error: GraphError) -> None:
        status = 413 if isinstance(error, LimitExceeded) else 422
        line = error.line
        where = None if line is None else {"file": line.file, "line": line.line, "code": line.code}
        super().__init__(status, str(error), node=error.node, trace=error.trace, line=where)


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse({"detail": exc.message, **exc.extra}, status_code=exc.status, headers=exc.headers)


async def store_unreachable(request: Request, exc: Exception) -> JSONResponse:
    # Redis restarting or unreachable: nothing the caller did wrong, and worth retrying.
    return JSONResponse(
        {"detail": "the job store is unreachable for a moment; retry shortly"},
        status_code=503,
        headers={"Retry-After": "2"},
    )


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's own request validation, in the one error shape: a sentence, then the details.
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"][1:]) or "request"
    return JSONResponse({"detail": f"{where}: {first['msg']}", "errors": errors[:20]}, status_code=422)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, invalid_request)
    for error in (RedisConnectionError, RedisTimeoutError):
        app.add_exception_handler(error, store_unreachable)


# Error shapes per status, for the OpenAPI document of each route.
def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    from nnfabric.protocol import ErrorBody

    text = {401: "missing or unknown API key", 403: "the key may not use this model", 404: "no such job or model",
            409: "the job is not in a state that allows this", 413: "over a size limit",
            422: "invalid request", 429: "rate limit reached (see Retry-After)",
            503: "the model is not ready (see Retry-After)"}  # fmt: skip
    return {status: {"model": ErrorBody, "description": text.get(status, "error")} for status in statuses}
