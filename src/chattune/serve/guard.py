"""The ASGI guard in front of the app: the API key, then the body size."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chattune.serve.errors import APIError

OPEN_PATHS = ("/health",)  # answered without the API key: liveness probes carry no credentials


class Guard:
    """Checks the API key, then reads the whole body under the size limit before the app sees it.

    Pure ASGI (not BaseHTTPMiddleware) so that a counted, buffered body works for chunked uploads too and
    the client's disconnect still reaches the streaming response afterwards.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body = app, max_body_bytes
        self.key = api_key.encode() if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                error = APIError(401, "missing API key: send the header `Authorization: Bearer KEY`")
                await error.response()(scope, receive, send)
                return
            if not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                await APIError(401, "incorrect API key", code="invalid_api_key").response()(
                    scope, receive, send
                )
                return
        too_large = APIError(
            413, f"the request body exceeds {self.max_body} bytes", code="request_too_large", param=None
        )
        declared = headers.get("content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            await too_large.response()(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                await too_large.response()(scope, receive, send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the server's own receive does

        await self.app(scope, replay, send)
