"""A fault-injecting HTTP(S) proxy between a client under test and a real server.

The real apiserver and management API cannot be told to answer 429, to hang half-open or to
send truncated JSON on demand, so the test bed puts this proxy between them and the scaler.
Without a fault it forwards every request to the real server and streams the answer back
(watches included). A fault applies to the requests it matches (method, path fragment):

- `latency`: the answer is held back `seconds`;
- `reset`: the connection is reset (RST) without forwarding the request;
- `reset_after_forward`: the request reaches the server, then the connection is reset, so
  the client cannot know the outcome;
- `half_open`: the request is read and never answered, the connection never closed, until
  the fault is cleared;
- `status`: the proxy answers `status` itself (with `Retry-After` when given);
- `truncate`: the server's answer, cut in the middle of its body (Content-Length kept);
- `malform`: the server's answer with its JSON body replaced by text that is not JSON;
- `replace`: the server's status kept, its body replaced by `body`.

TLS: with `server_tls` the proxy serves HTTPS with that key pair (the apiserver's own
certificate does: it names 127.0.0.1), and it talks HTTPS to the server when given
`upstream_ca`. Bearer tokens pass through, so a ServiceAccount's kubeconfig works through it.
Each fault applied is counted, so a test can show that its fault was really met."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from jobtide_testbed.pki import KeyPair

# Hop-by-hop headers: they describe one connection, not the message.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"}
)
KINDS = frozenset(
    {
        "latency",
        "reset",
        "reset_after_forward",
        "half_open",
        "status",
        "truncate",
        "malform",
        "replace",
    }
)


@dataclass(frozen=True)
class Fault:
    kind: str
    method: str | None = None  # None: every method
    path_contains: str | None = None  # None: every path
    seconds: float = 0.0
    status: int = 503
    retry_after: int | None = None
    body: bytes = b""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; one of {sorted(KINDS)}")

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path_contains is None or self.path_contains in path
        )


class FaultProxy:
    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        server_tls: KeyPair | None = None,
        upstream_ca: Path | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._upstream_tls = (
            ssl.create_default_context(cafile=str(upstream_ca)) if upstream_ca else None
        )
        self._lock = threading.Lock()
        self._fault: Fault | None = None
        self._cleared = threading.Event()
        self.applied: Counter[str] = Counter()
        self.forwarded = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        if server_tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(server_tls.cert), str(server_tls.key))
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.scheme = "https" if server_tls else "http"
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()
        self._server.shutdown()
        self._server.server_close()

    # -- faults ---------------------------------------------------------------------------
    def inject(self, fault: Fault) -> None:
        with self._lock:
            self._fault = fault
            self._cleared.clear()

    def clear(self) -> None:
        with self._lock:
            self._fault = None
            self._cleared.set()

    def fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            fault = self._fault
        if fault is not None and fault.matches(method, path):
            with self._lock:
                self.applied[fault.kind] += 1
            return fault
        return None

    # -- forwarding -----------------------------------------------------------------------
    def connect_upstream(self) -> http.client.HTTPConnection:
        host, port = self.upstream
        if self._upstream_tls is not None:
            return http.client.HTTPSConnection(host, port, timeout=600, context=self._upstream_tls)
        return http.client.HTTPConnection(host, port, timeout=600)

    def wait_cleared(self, timeout: float) -> None:
        self._cleared.wait(timeout)


def _reset(connection: socket.socket) -> None:
    """Close with RST instead of FIN: the client sees 'connection reset by peer'."""
    raw = connection.unwrap() if isinstance(connection, ssl.SSLSocket) else connection
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def do_PUT(self) -> None:
            self._serve()

        def do_PATCH(self) -> None:
            self._serve()

        def do_DELETE(self) -> None:
            self._serve()

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            fault = proxy.fault_for(self.command, self.path)
            kind = fault.kind if fault else None
            if fault is not None and kind == "reset":
                self._abort()
                return
            if fault is not None and kind == "half_open":
                proxy.wait_cleared(timeout=600)
                self._abort()
                return
            if fault is not None and kind == "status":
                self._answer(fault.status, b'{"kind":"Status","code":%d}' % fault.status, fault)
                return
            upstream = proxy.connect_upstream()
            try:
                # Bodies travel unencoded, so the proxy can cut or rewrite them.
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in HOP_BY_HOP and k.lower() != "accept-encoding"
                }
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = upstream.getresponse()
                proxy.forwarded += 1
                if fault is not None and kind == "reset_after_forward":
                    response.read()
                    self._abort()
                    return
                if fault is not None and kind == "latency":
                    proxy.wait_cleared(timeout=fault.seconds)
                streaming = response.getheader("Content-Length") is None
                if streaming and fault is None:
                    self._stream(response)
                    return
                data = response.read()
                status = response.status
                if fault is not None and kind == "truncate":
                    self._relay(status, response, data[: len(data) // 2], declared=len(data))
                    self.close_connection = True
                    return
                if fault is not None and kind == "malform":
                    data = b"<html>not json: " + data[:20]
                if fault is not None and kind == "replace":
                    data = fault.body
                self._relay(status, response, data, declared=len(data))
            except (OSError, http.client.HTTPException):
                self._abort()
            finally:
                upstream.close()

        def _abort(self) -> None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                _reset(self.connection)

        def _answer(self, status: int, data: bytes, fault: Fault) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if fault.retry_after is not None:
                self.send_header("Retry-After", str(fault.retry_after))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _relay(
            self, status: int, response: http.client.HTTPResponse, data: bytes, declared: int
        ) -> None:
            self.send_response(status)
            for k, v in response.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(declared))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, response: http.client.HTTPResponse) -> None:
            """A watch: each chunk as it comes, until the server ends it or a fault starts."""
            self.send_response(response.status)
            for k, v in response.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while True:
                chunk = response.read1(65536)
                if not chunk:
                    break
                if proxy.fault_for(self.command, self.path) is not None:
                    # A fault begun mid-watch cuts the stream, as a dropped connection would.
                    self._abort()
                    return
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

    return Handler
