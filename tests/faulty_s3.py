"""A faulty S3 endpoint for tests: a threaded HTTP proxy on 127.0.0.1 in front of the loopback moto server
that fails a seeded share of requests the way S3 and GCS do under load. A HEAD answer keeps the
object's Content-Length (s3fs takes a file's size from it; answering 0 there made every file read empty).

Request ``n`` (counted in arrival order) is answered, without reaching moto, with

* ``503 SlowDown`` (a throttle: "Please reduce your request rate") with probability ``slowdown``,
* ``500 InternalError`` or ``503 ServiceUnavailable`` (alternately) with probability ``fail``,

and forwarded to moto otherwise. The draws come from ``random.Random(seed)``, one per request, so a given
seed fails the same request numbers on every run (which requests those are depends on the order requests
arrive in, as on a real endpoint). ``counts`` says how many of each were sent.
"""

from __future__ import annotations

import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length"}
ERRORS = {
    "SlowDown": (503, "Please reduce your request rate."),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "ServiceUnavailable": (503, "Service is unable to handle request."),
}


class FaultyS3:
    """The proxy (``start()`` / ``stop()``, or a context manager); ``url`` is its endpoint."""

    def __init__(self, upstream: str, seed: int = 0, fail: float = 0.05, slowdown: float = 0.02) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.rng = random.Random(seed)
        self.fail, self.slowdown = fail, slowdown
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "forwarded": 0, **{code: 0 for code in ERRORS}}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def fault(self) -> str | None:
        """The error to answer the next request with, or None to forward it (one seeded draw per request)."""
        with self.lock:
            self.counts["requests"] += 1
            u = self.rng.random()
            if u < self.slowdown:
                code = "SlowDown"
            elif u < self.slowdown + self.fail:
                code = "InternalError" if self.counts["requests"] % 2 else "ServiceUnavailable"
            else:
                self.counts["forwarded"] += 1
                return None
            self.counts[code] += 1
            return code

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                return

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes,
                       length: str | None = None) -> None:
                # A HEAD answer has no body but must keep the object's Content-Length (s3fs takes a file's
                # size from it): ``length`` is the upstream's header for HEAD, else the body's length.
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", length if length is not None else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                code = proxy.fault()
                if code is not None:
                    status, message = ERRORS[code]
                    xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}'
                           f"</Message><RequestId>faulty-s3</RequestId></Error>").encode()
                    self._reply(status, [("Content-Type", "application/xml")], xml)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                finally:
                    conn.close()
                self._reply(resp.status, kept, data, length)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler

    def start(self) -> FaultyS3:
        self._thread = threading.Thread(target=self.server.serve_forever, name="faulty-s3", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FaultyS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
