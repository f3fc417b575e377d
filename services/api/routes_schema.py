"""/v1/schema: the published, versioned JSON Schema of graphs, JSON jobs, JSON results and the
job record, with the op table; the same definitions are the OpenAPI document's components."""

from __future__ import annotations

from typing import Any, cast

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from nnfabric.graph.schema import schema_defs, schema_document
from nnfabric.protocol import JobEvent, JobRecord, SchemaDocument
from pydantic import TypeAdapter

router = APIRouter(tags=["schema"])


def published_schema() -> SchemaDocument:
    document = cast(SchemaDocument, schema_document())
    for name, kind in (("JobRecord", JobRecord), ("JobEvent", JobEvent)):
        document["$defs"][name] = TypeAdapter(kind).json_schema(ref_template="#/$defs/{model}")
    return document


@router.get("/v1/schema")
async def schema() -> SchemaDocument:
    """The JSON Schema of graphs (`Graph`), jobs in JSON (`JobJSON`), results in JSON
    (`ResultJSON`), job records and events, and the op table (`ops`: arity and allowed names)."""
    return published_schema()


def _scope(path: str) -> str | None:
    """What a key needs for a route: None (public), any key, or the model named in the request."""
    if not path.startswith("/v1/") or path == "/v1/schema":
        return None
    if path.startswith("/v1/jobs/"):
        return "any key: only the key's user's own jobs"
    if path in ("/v1/jobs", "/v1/completions", "/v1/chat/completions") or path.startswith("/v1/models/"):
        return "a key whose models include the model named (`*` for all)"
    return "any key"


def install_openapi(app: FastAPI) -> None:
    """Add the graph, JSON job and JSON result definitions to the OpenAPI document's components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                   description=app.description)  # fmt: skip
            components = document.setdefault("components", {})
            components.setdefault("schemas", {}).update(schema_defs("#/components/schemas/"))
            components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer",
                                                        "description": "Authorization: Bearer nnf_..."}}  # fmt: skip
            for path, operations in document["paths"].items():
                for operation in operations.values():
                    invalid = operation.get("responses", {}).get("422", {}).get("content", {}).get("application/json")
                    if invalid and invalid["schema"].get("$ref", "").endswith("/HTTPValidationError"):
                        invalid["schema"] = {"$ref": "#/components/schemas/ErrorBody"}  # what errors.py answers
                    scope = _scope(path)
                    if scope:
                        operation["security"] = [{"apiKey": []}]
                        operation["x-scope"] = scope
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


if __name__ == "__main__":  # python -m services.api.routes_schema: rewrite docs/schema.json
    import json
    from pathlib import Path

    target = Path(__file__).resolve().parents[2] / "docs" / "schema.json"
    target.write_text(json.dumps(published_schema(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {target}")
