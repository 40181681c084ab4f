"""The worker's HTTP endpoints (metrics, health, status), with no web framework.

``Endpoints`` is a table of ``GET`` routes. It is served two ways:

- ``await endpoints.serve(host, port)``: a small asyncio HTTP/1.1 server (one request per
  connection), which ``oncely run --metrics-port`` starts;
- ``endpoints.asgi``: a plain ASGI application, for an app that embeds the worker and wants the
  routes under its own server (mount it, or call it from a route).

A route is an ``async`` function of the query string's parameters returning a ``Response``;
one that raises answers 500 and is logged, and never takes the server down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = ["Endpoints", "Response", "Route"]

log = logging.getLogger("oncely.http")

MAX_HEAD = 16 * 1024
"""Largest request head (request line and headers) the server reads."""

READ_TIMEOUT = 10.0
"""Seconds a client has to send its request head, and to take the response."""

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Response:
    """What a route answers."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)


Route = Callable[[Mapping[str, str]], Awaitable[Response]]
"""A route: the query parameters in, a response out."""

ASGIScope = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Endpoints:
    """``GET`` routes by exact path."""

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[Any]] = set()

    def add(self, path: str, route: Route) -> None:
        """Serve ``route`` at ``path`` (replacing any route there)."""
        if not path.startswith("/"):
            raise ValueError(f"a route path starts with '/': {path!r}")
        self._routes[path] = route

    def remove(self, path: str) -> None:
        """Stop serving ``path`` (nothing happens when it is not served)."""
        self._routes.pop(path, None)

    @property
    def paths(self) -> list[str]:
        return sorted(self._routes)

    async def respond(self, method: str, target: str) -> Response:
        """Answer one request; never raises."""
        parts = urlsplit(target)
        route = self._routes.get(parts.path or "/")
        if route is None:
            return Response(404, b"not found\n")
        if method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers={"Allow": "GET, HEAD"})
        try:
            return await route(dict(parse_qsl(parts.query)))
        except Exception:
            log.exception("route %s failed", parts.path)
            return Response(500, b"internal error\n")

    async def asgi(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        """The routes as an ASGI 3 application (``http`` scope; ``lifespan`` is accepted)."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        query = scope.get("query_string", b"").decode("latin-1")
        path: str = scope.get("path", "/")
        # ASGI servers and Starlette's Mount pass the full path, the mount point as root_path.
        root = scope.get("root_path", "").rstrip("/")
        if root and (path == root or path.startswith(root + "/")):
            path = path[len(root) :] or "/"
        target = path + (f"?{query}" if query else "")
        response = await self.respond(scope.get("method", "GET"), target)
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(response.body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in response.headers.items()]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        body = b"" if scope.get("method") == "HEAD" else response.body
        await send({"type": "http.response.body", "body": body})

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        """Start serving on ``host:port`` (``port=0`` picks a free one: read it from
        ``server.sockets[0].getsockname()``). ``aclose()`` stops every server started here.

        Raises:
            OSError: the address is in use or cannot be bound.
        """
        server = await asyncio.start_server(self._connection, host, port, limit=MAX_HEAD)
        self._servers.append(server)
        return server

    async def aclose(self) -> None:
        """Stop every server, and end the connections still open: a client sending its head
        slowly (or never, as a browser's preconnect) or a route still running must neither
        keep serving after this nor hold it up (``wait_closed`` waits for connections on
        Python 3.12+)."""
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        for server in servers:
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)
        method = "GET"
        answered = False
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
                method_, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            except asyncio.LimitOverrunError:
                response = Response(431, b"request head too large\n")
            except ValueError:
                response = Response(400, b"bad request\n")
            else:
                method = method_
                response = await self.respond(method, target)
            writer.write(_head(response) + (b"" if method == "HEAD" else response.body))
            # A client that never reads must not hold its connection (and buffer) for good.
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
            answered = True
        except (ConnectionError, OSError, TimeoutError):
            pass  # the client went away, or would not take the answer
        except asyncio.CancelledError:
            # aclose(): the connection's own task, which asyncio would log as an error were
            # it to end cancelled ("Unhandled exception in client_connected_cb").
            pass
        except Exception:
            log.exception("serving a request failed")
        finally:
            # Not waited for: a cancel from aclose() must not be held up by the peer. A close
            # would keep the socket until unsent bytes drain, which a client that does not
            # read never lets happen: anything but a sent answer aborts.
            if answered:
                writer.close()
            else:
                writer.transport.abort()


def _head(response: Response) -> bytes:
    reason = _REASONS.get(response.status, "Unknown")
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in response.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
