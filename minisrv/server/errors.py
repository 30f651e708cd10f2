"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}` for every failure the API reports."""
from __future__ import annotations

import json
import logging

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger(__name__)

# The `type` OpenAI's API (and so its SDKs' error classes) pairs with each status we emit.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error a client caused or should see; the routes raise it and one handler renders it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class ErrorDetail(BaseModel):
    message: str
    type: str                  # ERROR_TYPES of the status
    param: str | None = None   # the request field at fault, as the client spelled it (`messages.0.role`)
    code: str | None = None


class ErrorBody(BaseModel):
    """Every error response's body (also its schema in /openapi.json)."""

    error: ErrorDetail


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    detail = ErrorDetail(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"), param=param,
                         code=code)
    return ErrorBody(error=detail).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(error_body(status, message, param, code), ensure_ascii=False).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def from_validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error, phrased with the request field it is about (`messages.0.role`)."""
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    kind = first["type"]
    if kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", first["msg"])
        return APIError(400, f"request body is not valid JSON: {reason}", code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"{param}: this server does not support this field", param, "unsupported_field")
    if kind == "missing":
        return APIError(400, f"{param}: field required", param, "missing_field")
    if kind == "model_type" and not first["loc"]:
        return APIError(400, "request body must be a JSON object", code="invalid_type")
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if kind.endswith("_type"):
        code = "invalid_type"
    else:
        code = "invalid_value"
        message = f"{message}, got {first['input']!r}"
    return APIError(400, message[:500], param, code)


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    return error_response(exc.status, exc.message, exc.param, exc.code, headers | exc.headers)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no route) and 405 (wrong method), in the OpenAI shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=exc.headers)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    # Reaching this is a bug in the server, never the client's doing; log it whole, reveal nothing.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal server error", code="internal_error")
