"""How the service says no: every refusal is JSON `{"error": <what was wrong>, "reason": <code>}`.

    ImageError (pipelines.preprocessing)   the image itself: unreadable, too large, no digit
    RequestError                           the request around it: encoding, fields, size, type

`reason` is a short, stable, machine-readable code; `error` is a sentence for people. Neither
ever contains a stack trace, a file path or the submitted data.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse

from pipelines.preprocessing import ImageError

# HTTP status for each ImageError reason; any other reason is 422 (readable request, bad image).
IMAGE_ERROR_STATUS = {"too_large": HTTPStatus.REQUEST_ENTITY_TOO_LARGE}


class RequestError(Exception):
    """A request the service will not process. `status` is the HTTP status to answer with."""

    def __init__(self, message: str, reason: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = int(status)


def error_body(error: Exception) -> dict[str, str]:
    """The JSON body for a RequestError or ImageError."""
    return {"error": str(error), "reason": getattr(error, "reason", "invalid_request")}


def error_status(error: Exception) -> int:
    if isinstance(error, RequestError):
        return error.status
    if isinstance(error, ImageError):
        return int(IMAGE_ERROR_STATUS.get(error.reason, HTTPStatus.UNPROCESSABLE_ENTITY))
    return int(HTTPStatus.BAD_REQUEST)


def error_response(error: RequestError | ImageError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error_status(error))
