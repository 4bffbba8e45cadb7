"""ASGI middleware that keeps malformed requests away from the API and makes every refusal JSON.

For every request: a declared Content-Length above the limit gets 413 before anything is read.
For the API routes (POST /predict, /predict_batch, /read) it also checks, before BentoML sees
them:
- the method is POST (else 405) and the Content-Type is application/json (else 415);
- the body, read here chunk by chunk, stays within the limit even when no length was declared
  (else 413 as soon as the limit is passed; the rest is only drained, see below);
- the body is valid JSON matching the route's input model (else 400 naming the field). BentoML
  would answer these itself, but with its own body shape and a logged traceback per request.
For every route it then rewrites any error answer that is not already `{"error", "reason"}`
JSON: a 404 for an unknown path, a 405, an unexpected 500 (which says only that the server log
has the details). The service's own refusals pass as they are, with any fields they add (the
marks of a /read drawing that holds non-digits).

A refusal can go out while the client is still sending its body (a 413, or a 404 to a POST).
The answer is then sent with `Connection: close`, and the rest of the body is read and dropped
before the response ends: the HTTP server closes the connection at that point, and closing it
with unread data resets it, losing the answer for clients that send their whole body before
reading (Python's urllib). Draining is bounded in bytes and seconds; past the bound, or when
the declared length is beyond it, the connection is closed without reading further.

Each refused request is counted by reason in `digits_rejected_inputs_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import RequestError, error_body

JSON_MEDIA_TYPE = "application/json"

# Pydantic error types (from BentoML's validation of the JSON body) -> our reason codes.
VALIDATION_REASONS = {
    "json_invalid": "invalid_json",
    "missing": "missing_field",
    "extra_forbidden": "unexpected_field",
    "model_type": "invalid_request",
    "model_attributes_type": "invalid_request",
    "too_long": "invalid_batch_size",
    "too_short": "invalid_batch_size",
}


class ClientDisconnected(Exception):
    """The client went away before its request body was complete."""


class RequestBody:
    """Follows how far the request body has been read (all reads go through `receive`), and
    reads what is left when an answer must end before the body has."""

    def __init__(self, headers: Headers, receive: Receive, max_bytes: int, max_seconds: float):
        try:
            self.declared_length = int(headers.get("content-length", "0"))
        except ValueError:  # the HTTP server normally rejects these itself
            self.declared_length = 0
        # A request with neither header has no body (RFC 9112, 6.3).
        self.complete = self.declared_length <= 0 and "transfer-encoding" not in headers
        self.expects_continue = headers.get("expect", "").lower() == "100-continue"
        self.asked = False  # whether anyone has asked for the body yet
        self.received = 0
        self._receive = receive
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds

    async def receive(self) -> Message:
        self.asked = True
        message = await self._receive()
        self.received += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            self.complete = True
        return message

    async def drain(self) -> None:
        """Read and drop the rest of the body, within the bounds; stop early if it is beyond."""
        if self.expects_continue and not self.asked:
            return  # nobody said "100 Continue": the client waits, and sends nothing
        if self.declared_length > self.max_bytes:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.max_seconds):
                while not self.complete and self.received <= self.max_bytes:
                    await self.receive()


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        api_inputs: Mapping[str, type[BaseModel]],
        max_body_bytes: int,
        max_drain_bytes: int,
        max_drain_seconds: float,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.api_inputs = dict(api_inputs)  # route path -> the model its JSON body must match
        self.max_body_bytes = max_body_bytes
        self.max_drain_bytes = max_drain_bytes
        self.max_drain_seconds = max_drain_seconds
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_body = RequestBody(headers, receive, self.max_drain_bytes, self.max_drain_seconds)
        receive = request_body.receive
        send = _finishing_body(send, request_body)
        if request_body.declared_length > self.max_body_bytes:
            await self._refuse(send, self._too_large())
            return
        input_model = self.api_inputs.get(scope["path"])
        if input_model is None:
            await self.app(scope, receive, self._normalizing(send))
            return
        if scope["method"] != "POST":
            refusal = RequestError(
                f"use POST for {scope['path']}",
                "method_not_allowed",
                HTTPStatus.METHOD_NOT_ALLOWED,
            )
            await self._refuse(send, refusal, extra_headers=[(b"allow", b"POST")])
            return
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != JSON_MEDIA_TYPE:
            refusal = RequestError(
                f"the request body must be JSON (Content-Type: {JSON_MEDIA_TYPE})",
                "unsupported_media_type",
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            )
            await self._refuse(send, refusal)
            return
        try:
            body = await self._read_body(receive)
        except ClientDisconnected:
            return  # nobody is left to answer
        if body is None:
            await self._refuse(send, self._too_large())
            return
        try:
            input_model.model_validate_json(body or b"{}")
        except ValidationError as error:
            details = error.errors(include_url=False, include_context=False, include_input=False)
            await self._send_json(
                send, HTTPStatus.BAD_REQUEST, _from_validation_error(details[0]), []
            )
            return
        await self.app(scope, _replay(body, receive), self._normalizing(send))

    def _too_large(self) -> RequestError:
        return RequestError(
            f"the request body is larger than {self.max_body_bytes} bytes",
            "body_too_large",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(
        self,
        send: Send,
        error: RequestError,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        await self._send_json(send, error.status, error_body(error), extra_headers or [])

    async def _send_json(
        self, send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
    ) -> None:
        if self.on_reject is not None:
            self.on_reject(body["reason"])
        content = json.dumps(body).encode()
        headers = [
            *headers,
            (b"content-type", JSON_MEDIA_TYPE.encode()),
            (b"content-length", str(len(content)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    def _normalizing(self, send: Send) -> Send:
        """Wrap `send`: pass successes through, collect error answers and send them normalized."""
        start: Message | None = None
        chunks: list[bytes] = []

        async def normalizing_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status = start["status"]
            kept = [
                (name, value)
                for name, value in start.get("headers", [])
                if name.lower() not in (b"content-type", b"content-length")
            ]
            await self._send_json(send, status, normalized(status, b"".join(chunks)), kept)

        return normalizing_send


def normalized(status: int, body: bytes) -> dict[str, Any]:
    """`{"error", "reason"}` for any error body BentoML or the service produced; a body that
    already has both keeps its other fields."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # BentoML 1.4 wraps the body of a raised BentoMLException in a list
    if isinstance(data, dict) and isinstance(data.get("reason"), str) and "error" in data:
        return {**data, "error": str(data["error"])}
    if status >= 500:
        return {
            "error": "internal error; the server log has the details",
            "reason": "internal_error",
        }
    if isinstance(data, dict) and isinstance(data.get("detail"), list) and data["detail"]:
        return _from_validation_error(data["detail"][0])
    phrase = _phrase(status)
    message = data.get("error") if isinstance(data, dict) else None
    return {
        "error": str(message) if message else phrase,
        "reason": phrase.lower().replace(" ", "_").replace("-", "_"),
    }


def _from_validation_error(detail: dict[str, Any]) -> dict[str, str]:
    kind = str(detail.get("type", ""))
    field = ".".join(str(part) for part in detail.get("loc", ()))
    reason = VALIDATION_REASONS.get(kind, "invalid_field")
    if kind == "json_invalid":
        message = "the request body is not valid JSON"
    elif kind in ("model_type", "model_attributes_type"):
        message = "the request body must be a JSON object"
    elif kind == "missing":
        message = f"missing field '{field}'"
    elif kind == "extra_forbidden":
        message = f"unexpected field '{field}'"
    else:
        message = f"field '{field}': {detail.get('msg', 'invalid value')}"
    return {"error": message, "reason": reason}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _finishing_body(send: Send, body: RequestBody) -> Send:
    """Wrap `send`: an answer that starts before the request body is all read closes the
    connection, and drains the body (`RequestBody.drain`) before its last message."""

    async def finishing_send(message: Message) -> None:
        if body.complete:
            await send(message)
        elif message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (b"connection", b"close")]
            await send({**message, "headers": headers})
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            if message.get("body"):
                await send({**message, "more_body": True})  # the answer first, then the drain
            await body.drain()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send(message)

    return finishing_send


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the already-read body once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
