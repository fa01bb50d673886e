"""A fault-injecting HTTP proxy on loopback, in front of a local S3 server (not a test module).

``FaultProxy(upstream)`` listens on 127.0.0.1 (a free port) and forwards every request it
receives to ``upstream`` (moto's server: the ``s3_url`` fixture's ``AWS_ENDPOINT_URL``),
one upstream connection per client connection, keep-alive on both sides. Point a client at
``proxy.url`` (``storage_options={"endpoint": proxy.url}``) and every request it makes is
recorded (``proxy.requests``: method, path, the query's keys such as ``uploadId`` and
``partNumber``, what the client got, what the server answered) and may be broken on purpose.

``proxy.inject(kind, method=..., path=..., skip=k, times=n)`` breaks the requests of that
method whose path (or, for a bulk delete, a deleted key's path) contains ``path`` (and,
with ``query=``, whose query has exactly those keys): the first ``k`` pass, the next ``n``
(every one after them with ``times=None``) get the fault. The kinds, and whether the server
saw the request:

============== ==================================================================== ======
kind           what the client sees                                                 server
============== ==================================================================== ======
reset          the connection reset (RST) once the request is read                  no
reset_after    the same, after the server answered                                  yes
500            ``500 InternalError``, S3's XML error body                           no
503            ``503 SlowDown`` (throttling: ``times=None`` answers it every time)  no
timeout        no answer until the client gives up (its timeout) and hangs up       no
timeout_after  the server answered; the answer is held until the client hangs up    yes
delay          held for ``seconds`` (or until ``release`` is set), then forwarded;  yes
               dropped, unforwarded, if the client hung up meanwhile                (no)
============== ==================================================================== ======

Every wait is bounded: a held request lets go after ``seconds`` (10 by default) or when the
proxy stops; ``stop()`` closes every client connection and joins every thread it started,
within a few seconds.
"""

from __future__ import annotations

import contextlib
import html
import http.client
import http.server
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import TracebackType

__all__ = ["FAULT_KINDS", "FaultKind", "FaultProxy", "Request", "Rule"]

FaultKind = Literal["reset", "reset_after", "500", "503", "timeout", "timeout_after", "delay"]
FAULT_KINDS: Final[tuple[FaultKind, ...]] = (
    "reset",
    "reset_after",
    "500",
    "503",
    "timeout",
    "timeout_after",
    "delay",
)

# Headers that belong to one connection, not to the request or the answer (RFC 9110 7.6.1),
# and the ones the proxy sets itself.
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
    }
)
_ERRORS: Final[dict[str, tuple[str, str]]] = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
}
_POLL: Final = 0.01


@dataclass(frozen=True, slots=True)
class Request:
    """One request the proxy received, and what became of it."""

    method: str
    path: str
    """The URL's path, ``/<bucket>/<key>`` (S3's path style), still percent-encoded."""
    query: tuple[str, ...]
    """The query's keys, sorted: ``("uploads",)`` starts a multipart upload,
    ``("partNumber", "uploadId")`` is a part, ``("uploadId",)`` completes or aborts it."""
    status: int | None
    """What the client got (None: no answer, the connection reset or hung up)."""
    upstream: int | None
    """What the server answered (None: the request never reached it)."""
    fault: FaultKind | None
    objects: tuple[str, ...]
    """The paths of the objects it is about: its own path, or for a bulk delete
    (``POST /<bucket>?delete``, which obstore's ``delete`` sends) ``/<bucket>/<key>`` of each
    key its body names. A rule's ``path`` is looked for in these."""

    @property
    def name(self) -> str:
        """The last segment of its (first) object's path: the object's name in its prefix."""
        return urllib.parse.unquote(self.objects[0].rsplit("/", 1)[-1])

    @property
    def what(self) -> str:
        """A short label: ``PUT model.ckpt-2 ?partNumber&uploadId``."""
        query = f" ?{'&'.join(self.query)}" if self.query else ""
        return f"{self.method} {self.name}{query}"


def _objects(path: str, query: tuple[str, ...], body: bytes) -> tuple[str, ...]:
    if query != ("delete",):
        return (path,)
    bucket = path.rstrip("/")
    keys = re.findall(rb"<Key>(.*?)</Key>", body)
    return tuple(f"{bucket}/{html.unescape(key.decode())}" for key in keys) or (path,)


@dataclass(slots=True, eq=False)
class Rule:
    """A fault to inject into matching requests (see the module docstring)."""

    kind: FaultKind
    method: str
    path: str
    query: frozenset[str] | None
    skip: int
    times: int | None
    seconds: float
    release: threading.Event | None
    seen: int = 0
    """Matching requests seen so far, the skipped ones included."""
    hits: int = 0
    """Requests that got the fault."""
    hit: threading.Event = field(default_factory=threading.Event)
    """Set once the fault was injected (a test can wait for a held request to arrive)."""

    def matches(self, method: str, objects: Iterable[str], query: Iterable[str]) -> bool:
        return (
            method == self.method
            and any(self.path in path for path in objects)
            and (self.query is None or self.query == frozenset(query))
        )

    def take(self) -> bool:
        """Count one matching request; whether it gets the fault (called under the lock)."""
        self.seen += 1
        if self.seen <= self.skip or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        self.hit.set()
        return True


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() joins the handlers itself, with a deadline
    # Clients open connections in bursts (a multipart upload's parts at once, several
    # clients at once): with socketserver's backlog of 5 a SYN beyond it is dropped and
    # retried a second later, which a client with a short connect timeout takes for a fault.
    request_queue_size = 128

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        assert isinstance(request, socket.socket)  # a TCP server's requests are sockets
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="s3-proxy-connection",
            daemon=True,
        )
        with self.proxy._lock:
            stopping = self.proxy._stopping.is_set()
            if not stopping:
                self.proxy._connections.add(request)
                self.proxy._threads.append(thread)
        if stopping:
            self.shutdown_request(request)
        else:
            thread.start()

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        assert isinstance(request, socket.socket)
        with self.proxy._lock:
            self.proxy._connections.discard(request)
            reset = request in self.proxy._resets
            self.proxy._resets.discard(request)
        if reset:
            request.close()  # SO_LINGER 0: the close sends RST, with no FIN before it
        else:
            super().shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up mid-answer (a timeout, a test that ended) is no error of
        # the proxy's; count it, never print it.
        with self.proxy._lock:
            self.proxy.connection_errors += 1


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: object) -> None:
        return None  # silent: the proxy records every request instead

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        if self._upstream is not None:
            self._upstream.close()

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    # -- the request -------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _proxy(self) -> None:
        body = self._read_body()
        url = urllib.parse.urlsplit(self.path)
        query = tuple(sorted(urllib.parse.parse_qs(url.query, keep_blank_values=True)))
        objects = _objects(url.path, query, body)
        rule = self.server.proxy._take(self.command, objects, query)
        kind = None if rule is None else rule.kind

        def record(status: int | None, upstream: int | None) -> None:
            # Before the client can see the outcome (an answer, a reset, or the end of its
            # wait): a test that saw its call return finds the request recorded.
            request = Request(self.command, url.path, query, status, upstream, kind, objects)
            self.server.proxy._record(request)

        if rule is None or rule.kind in ("reset_after", "timeout_after", "delay"):
            if rule is not None and rule.kind == "delay" and not self._hold(rule, rule.release):
                record(None, None)
                self._reset()  # the client hung up meanwhile: the request is lost
                return
            answer = self._forward(body)
            if rule is None or rule.kind == "delay":
                record(answer[0], answer[0])
                self._answer(*answer)
                return
            record(None, answer[0])
            if rule.kind == "timeout_after":
                self._hold(rule, None)
            self._reset()
        elif rule.kind in ("500", "503"):
            status = int(rule.kind)
            record(status, None)
            self._error(status, _ERRORS[rule.kind], url.path)
        else:  # reset, timeout
            record(None, None)
            if rule.kind == "timeout":
                self._hold(rule, None)
            self._reset()

    # -- faults ------------------------------------------------------------------------------

    def _reset(self) -> None:
        """Close the client's connection with a TCP reset once this request is done."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with self.server.proxy._lock:
            self.server.proxy._resets.add(self.connection)

    def _client_gone(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True

    def _hold(self, rule: Rule, until: threading.Event | None) -> bool:
        """Hold the request until ``until`` is set (True), or the client hangs up, the rule's
        ``seconds`` run out or the proxy stops (False)."""
        deadline = time.monotonic() + rule.seconds
        stopping = self.server.proxy._stopping
        while time.monotonic() < deadline and not stopping.is_set():
            if until is not None and until.is_set():
                return True
            if self._client_gone():
                return False
            stopping.wait(_POLL)
        return until is None and not self._client_gone()

    def _error(self, status: int, error: tuple[str, str], path: str) -> None:
        code, message = error
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{path}</Resource><RequestId>s3-proxy</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- forwarding --------------------------------------------------------------------------

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request upstream; return its status, reason, headers and body (a 502
        when the server cannot be reached)."""
        for attempt in range(2):
            if self._upstream is None:
                host, port = self.server.proxy.upstream
                self._upstream = http.client.HTTPConnection(host, port, timeout=30)
            connection = self._upstream
            try:
                connection.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for name, value in self.headers.items():
                    if name.lower() not in _HOP_BY_HOP:
                        connection.putheader(name, value)
                if body or self.command in ("PUT", "POST"):
                    connection.putheader("Content-Length", str(len(body)))
                connection.endheaders(body or None)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                self._upstream = None
                if attempt:
                    return 502, "Bad Gateway", [], b""
                continue  # a pooled upstream connection the server had closed
            if response.will_close:
                connection.close()
                self._upstream = None
            return response.status, response.reason, response.getheaders(), data
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer(
        self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes
    ) -> None:
        self.send_response_only(status, reason)
        length = None
        for name, value in headers:
            lower = name.lower()
            if lower == "content-length":
                length = value
            elif lower not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":
            if length is not None:
                self.send_header("Content-Length", length)  # the object's size
        elif status >= 200 and status not in (204, 304):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)


class FaultProxy:
    """A fault-injecting HTTP proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``).

    Use it as a context manager (``start()`` / ``stop()``); see the module docstring.
    """

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.connection_errors = 0
        """Client connections that ended in an error (a client hanging up mid-answer)."""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._requests: list[Request] = []
        self._rules: list[Rule] = []
        self._connections: set[socket.socket] = set()
        self._resets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._server: _Server | None = None
        self._serving: threading.Thread | None = None

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"<FaultProxy {where} -> {self.upstream[0]}:{self.upstream[1]}>"

    @property
    def url(self) -> str:
        """The endpoint to give a client: ``http://127.0.0.1:<port>``."""
        if self._server is None:
            raise RuntimeError("the proxy is not running: start() it first")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        """Listen and serve, from a thread of its own."""
        if self._server is not None:
            raise RuntimeError("the proxy is running already")
        self._stopping.clear()
        self._server = _Server(self)
        self._serving = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="s3-proxy",
            daemon=True,
        )
        self._serving.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: release every held request, close every client connection and join
        every thread (idempotent).

        Raises:
            RuntimeError: a thread was still running ``timeout`` seconds later.
        """
        server, serving = self._server, self._serving
        if server is None or serving is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections, threads = list(self._connections), list(self._threads)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        stuck = []
        for thread in [serving, *threads]:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
        self._server = self._serving = None
        with self._lock:
            self._threads.clear()
        if stuck:
            raise RuntimeError(f"the proxy's threads {stuck} did not stop within {timeout} s")

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------------------------

    def inject(
        self,
        kind: FaultKind,
        *,
        method: str,
        path: str,
        query: Iterable[str] | None = None,
        skip: int = 0,
        times: int | None = 1,
        seconds: float = 10.0,
        release: threading.Event | None = None,
    ) -> Rule:
        """Break requests of ``method`` whose path contains ``path`` (and whose query has
        exactly the keys ``query``, when given): after ``skip`` of them, the next ``times``
        (all, for None). ``seconds`` bounds a ``timeout``, ``timeout_after`` or ``delay``;
        ``release`` ends a ``delay`` early. Returns the rule (its ``hits`` count)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {FAULT_KINDS}, not {kind!r}")
        rule = Rule(
            kind=kind,
            method=method.upper(),
            path=path,
            query=None if query is None else frozenset(query),
            skip=skip,
            times=times,
            seconds=seconds,
            release=release,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        """Forget ``rule`` (idempotent)."""
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear_faults(self) -> None:
        """Forget every rule (requests held now are not released: see ``stop``)."""
        with self._lock:
            self._rules.clear()

    def _take(self, method: str, objects: tuple[str, ...], query: tuple[str, ...]) -> Rule | None:
        with self._lock:
            chosen = None
            for rule in self._rules:
                if not rule.matches(method, objects, query):
                    continue
                if chosen is None and rule.take():
                    chosen = rule
                elif chosen is not None:
                    rule.seen += 1  # counted, but this request has its fault already
            return chosen

    # -- the record ----------------------------------------------------------------------------

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[Request]:
        """Every request received so far, in the order they ended."""
        with self._lock:
            return list(self._requests)

    def requests_of(self, path: str) -> list[Request]:
        """The requests about an object whose path contains ``path``."""
        return [r for r in self.requests if any(path in o for o in r.objects)]

    def clear(self) -> None:
        """Forget the requests recorded so far."""
        with self._lock:
            self._requests.clear()
