"""What stands between the network and the API: body size, host and origin, the API key.

* `BodyLimit` (ASGI, outermost): a body over the limit is read to the end (up to `DRAIN` times the
  limit, so the client sees the answer instead of a reset connection) and answered 413.
* `check_request`: on a loopback bind only Host headers naming the loopback (or `--allowed-host`)
  are served (DNS rebinding); a POST whose Origin header is not the server itself is refused (cross-site requests
  from a page the user visits); with an API key every API route wants it as `Authorization:
  Bearer KEY`, `X-API-Key: KEY` or HTTP basic auth with KEY as the password (A1111's clients).
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import secrets

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

DRAIN = 4  # a too-large body is read up to this many times the limit before the connection is dropped
PROTECTED = ("/sdapi", "/ldmkit", "/docs", "/openapi.json", "/redoc")  # what needs the API key
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, whether or not they declare their length."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._drain(receive)
            return await self._reject(send, declared.decode("latin-1"))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    if message.get("more_body"):
                        await self._drain(receive)
                    raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)

    async def _drain(self, receive) -> None:
        read = 0
        while read <= DRAIN * self.limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def _reject(self, send, declared: str) -> None:
        body = json.dumps({"detail": f"request body of {declared} bytes is over this server's limit of "
                                     f"{self.limit} bytes (ldm serve --max-body-mb)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _host_name(header: str) -> str:
    if header.startswith("["):
        return header[1: header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def key_matches(headers, api_key: str) -> bool:
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError, ValueError):
            given = None
    return given is not None and secrets.compare_digest(given.encode(), api_key.encode())


def check_request(request, api_key: str | None, loopback: bool, hosts: tuple = ()) -> tuple[int, str] | None:
    """(status, reason) when the request must be refused, else None; `hosts`: names besides the loopback's
    that a loopback bind answers to (a reverse proxy's, `--allowed-host`)."""
    host = request.headers.get("host", "")
    if loopback and _host_name(host) not in LOOPBACK_NAMES + tuple(hosts):
        return 421, (f"Host {host!r} is not this server's loopback address (ldm serve binds 127.0.0.1; "
                     "a reverse proxy's name needs --allowed-host)")
    origin = request.headers.get("origin")
    if request.method not in ("GET", "HEAD", "OPTIONS") and origin is not None:
        if origin.partition("://")[2] != host:
            return 403, f"cross-site request from origin {origin!r} refused"
    if api_key and request.url.path.startswith(PROTECTED) and not key_matches(request.headers, api_key):
        return 401, "this server needs its API key: Authorization: Bearer KEY (or X-API-Key: KEY)"
    return None


class Guard:
    """ASGI middleware: `check_request` on every HTTP request, and security headers on the answers (a
    plain ASGI class: it leaves the server's disconnect messages to the routes, which cancel jobs on them)."""

    def __init__(self, app, api_key: str | None = None, loopback: bool = True, hosts: tuple = ()):
        self.app, self.api_key, self.loopback, self.hosts = app, api_key, loopback, tuple(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refused = check_request(request, self.api_key, self.loopback, self.hosts)
        if refused:
            status, reason = refused
            docs = scope["path"].startswith(("/docs", "/openapi", "/redoc"))
            headers = {"WWW-Authenticate": 'Basic realm="ldmkit"'} if status == 401 and docs else {}
            return await JSONResponse({"detail": reason}, status_code=status, headers=headers)(scope, receive, send)
        page = scope["path"] == "/" or scope["path"].startswith("/static")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if page:
                    headers["Content-Security-Policy"] = PAGE_CSP
            await send(message)

        await self.app(scope, receive, send_with_headers)
