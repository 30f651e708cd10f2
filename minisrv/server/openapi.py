"""/openapi.json: the OpenAPI 3.1 document of the HTTP API, generated from the routes themselves.

Each route that takes a JSON body names its pydantic schema (or schemas, one of which the body must match)
where it is declared (`body_schema`, see minisrv/server/app.py); the document's paths come from the route
table, its request schemas from pydantic's JSON Schema of those models, and every error is the one ErrorBody
(or the route's own `error_schema`: Anthropic's on its routes). A route may name its success body too
(`response_schema`, and `stream_schema` for each server-sent event when it streams: response_schemas.py and
sglang_schemas.py).
Nothing here lists a route or a field by hand, so the document cannot drift from what the server accepts.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

from pydantic.json_schema import models_json_schema
from starlette.routing import Route

from minisrv.server.errors import ErrorBody

REF = "#/components/schemas/{model}"
MODE = "validation"   # pydantic's JSON Schema of what a model accepts, bodies received and sent alike
STREAMED = ("the answer; with stream true, server-sent events, each `data:` one chunk, the last `data: [DONE]` (an "
            "error after the stream began comes as one more event: an error body)")


def openapi_document(routes: list[Route], title: str, version: str) -> dict[str, Any]:
    bodies = {route.path: _as_tuple(route.body_schema) for route in routes if getattr(route, "body_schema", None)}
    errors = {route.path: getattr(route, "error_schema", ErrorBody) for route in routes}
    successes = {route.path: _success_content(route) for route in routes}
    declared = (ErrorBody, *errors.values(), *(model for choices in bodies.values() for model in choices),
                *(model for content in successes.values() for model in content.values()))
    refs, schemas = models_json_schema([(model, MODE) for model in dict.fromkeys(declared)], ref_template=REF)
    paths: dict[str, dict] = {}
    for route in routes:
        operations = {}
        for method in sorted(route.methods - {"HEAD"}):
            operation: dict[str, Any] = {
                "operationId": method.lower() + re.sub(r"[^a-z0-9]+", "_", route.path_format.lower()).rstrip("_"),
                "summary": _summary(route.endpoint),
                "responses": {"200": _success_response(successes[route.path], refs),
                              "4XX": _error_response(refs[errors[route.path], MODE]),
                              "5XX": _error_response(refs[errors[route.path], MODE])}}
            if route.param_convertors:
                operation["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                                           for name in route.param_convertors]
            if route.path in bodies:
                choices = [refs[model, MODE] for model in bodies[route.path]]
                schema = choices[0] if len(choices) == 1 else {"oneOf": choices}
                operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
            operations[method.lower()] = operation
        paths[route.path_format] = operations
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"schemas": schemas.get("$defs", {})}}


def _error_response(ref: dict[str, Any]) -> dict[str, Any]:
    return {"description": "an error naming the field at fault", "content": {"application/json": {"schema": ref}}}


def _success_content(route: Route) -> dict[str, type]:
    """The model of a route's success body by media type: none for a route that declares none."""
    declared = {"application/json": getattr(route, "response_schema", None),
                "text/event-stream": getattr(route, "stream_schema", None)}
    return {media_type: model for media_type, model in declared.items() if model is not None}


def _success_response(content: dict[str, type], refs: dict[tuple[type, str], dict[str, Any]]) -> dict[str, Any]:
    if not content:
        return {"description": "success"}
    return {"description": STREAMED if "text/event-stream" in content else "success",
            "content": {media_type: {"schema": refs[model, MODE]} for media_type, model in content.items()}}


def _as_tuple(body_schema: type | tuple[type, ...]) -> tuple[type, ...]:
    return body_schema if isinstance(body_schema, tuple) else (body_schema,)


def _summary(endpoint: Any) -> str:
    doc = inspect.getdoc(endpoint) or ""
    return doc.splitlines()[0] if doc else endpoint.__name__.replace("_", " ")
