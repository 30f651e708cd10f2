"""/openapi.json: the OpenAPI 3.1 document of the HTTP API, generated from the routes themselves.

Each route that takes a JSON body names its pydantic schema (or schemas, one of which the body must match)
where it is declared (`body_schema`, see minisrv/server/app.py); the document's paths come from the route
table, its request schemas from pydantic's JSON Schema of those models, and every error is the one ErrorBody
(or the route's own `error_schema`: Anthropic's on its routes). Nothing here lists a route or a field by hand,
so the document cannot drift from what the server accepts.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

from pydantic.json_schema import models_json_schema
from starlette.routing import Route

from minisrv.server.errors import ErrorBody

REF = "#/components/schemas/{model}"


def openapi_document(routes: list[Route], title: str, version: str) -> dict[str, Any]:
    bodies = {route.path: _as_tuple(route.body_schema) for route in routes if getattr(route, "body_schema", None)}
    errors = {route.path: getattr(route, "error_schema", ErrorBody) for route in routes}
    models = [*((model, "validation") for model in dict.fromkeys((ErrorBody, *errors.values()))),
              *((model, "validation") for choices in bodies.values() for model in choices)]
    _, schemas = models_json_schema(models, ref_template=REF)
    paths: dict[str, dict] = {}
    for route in routes:
        operations = {}
        for method in sorted(route.methods - {"HEAD"}):
            operation: dict[str, Any] = {
                "operationId": method.lower() + re.sub(r"[^a-z0-9]+", "_", route.path_format.lower()).rstrip("_"),
                "summary": _summary(route.endpoint),
                "responses": {"200": {"description": "success"}, "4XX": _error_response(errors[route.path]),
                              "5XX": _error_response(errors[route.path])}}
            if route.param_convertors:
                operation["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                                           for name in route.param_convertors]
            if route.path in bodies:
                refs = [{"$ref": REF.format(model=model.__name__)} for model in bodies[route.path]]
                schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
                operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
            operations[method.lower()] = operation
        paths[route.path_format] = operations
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"schemas": schemas.get("$defs", {})}}


def _error_response(model: type) -> dict[str, Any]:
    return {"description": "an error naming the field at fault",
            "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}


def _as_tuple(body_schema: type | tuple[type, ...]) -> tuple[type, ...]:
    return body_schema if isinstance(body_schema, tuple) else (body_schema,)


def _summary(endpoint: Any) -> str:
    doc = inspect.getdoc(endpoint) or ""
    return doc.splitlines()[0] if doc else endpoint.__name__.replace("_", " ")
