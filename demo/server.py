"""A real HTTP image server on loopback, with every failure a web crawl meets.

The demo build and the tests fetch from it instead of the internet, so that each fault the
fetch stage must survive (dead links, stalls, slow drips, bombs, redirect loops, opt-outs,
oversize bodies) happens for real, over a socket, and reproducibly.

Static files are registered with `ImageServer.add`; fault routes live under `/fault/`:

    /fault/404, /fault/500            that status, always
    /fault/429                        429 with Retry-After: 1
    /fault/flaky?id=X&fail=N          503 for the first N requests of id X, then an image
    /fault/stall                      headers and Content-Length, then silence for stall_seconds
    /fault/drip                       a ~10 kB JPEG-looking body, one byte every 0.25 s
    /fault/truncated                  a real JPEG cut to 40 %, with a matching Content-Length
    /fault/html                       200 text/html
    /fault/oversize?mb=N              N MiB image/jpeg (default 30) with Content-Length
    /fault/oversize-chunked?mb=N      the same, chunked: no length known in advance
    /fault/bomb                       a valid 30000 x 30000 PNG of about 100 kB
    /fault/redirect?to=URL            302 to URL
    /fault/redirect-chain?n=K         K hops of 302, then an image
    /fault/loop                       302 to itself, forever
    /fault/optout?tag=noai            an image with X-Robots-Tag: <tag>
    /fault/slow-headers               a status line, then one header line every 0.25 s for stall_seconds
    /fault/slow-trailer               a chunked image, then after its last chunk one trailer line every 0.25 s
    /fault/gzip-empty?mb=N            Content-Encoding: gzip, chunked: N MiB of empty deflate blocks,
                                      which decompress to nothing (a decoding client never sees output)

Routes that end in an image (flaky, stall, drip, truncated, redirect-chain, optout) take
`src=/registered/path` to serve that file instead of the built-in synthetic JPEG, so a
demo can make e.g. an opted-out *face* photo, whose only reason to be dropped is the opt-out.
"""

from __future__ import annotations

import collections
import functools
import io
import struct
import sys
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import numpy as np
from PIL import Image

DRIP_INTERVAL = 0.25  # seconds between bytes: far below any read timeout
DRIP_BYTES = 10_000
BOMB_SIDE = 30_000
TRUNCATE_FRACTION = 0.4
_CHUNK = 1 << 16
# Errors that only mean the client went away; a crawler hangs up on us all the time.
_DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


@functools.cache
def synthetic_jpeg() -> bytes:
    """A deterministic 256 px JPEG with enough texture to weigh ~15-20 kB."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    base = np.stack([xx, yy, (xx + yy) // 2], axis=-1).astype(np.float32)
    pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@functools.cache
def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A complete, valid 1-bit PNG of side x side black pixels: ~100 kB on the wire,
    but 900 M pixels (gigabytes) once decoded. Compressed in blocks of rows so that
    building it never holds the raw image in memory."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_block = 1000
    parts = [compressor.compress(row * min(rows_per_block, side - start))
             for start in range(0, side, rows_per_block)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # needed for chunked transfer encoding
    server: _HTTPServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass  # thousands of requests per demo: stderr stays readable

    def do_GET(self) -> None:
        # One request per connection: no idle keep-alive threads outlive stop().
        self.close_connection = True
        split = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        app = self.server.app
        app._count(split.path, self.headers.get("User-Agent", ""))
        try:
            if split.path.startswith("/fault/"):
                route = _ROUTES.get(split.path.removeprefix("/fault/"), _Handler._not_found)
                route(self, query)
            else:
                self._static(split.path)
        except _DISCONNECTS:
            pass
        except ValueError:  # a non-numeric fail=, n= or mb=
            self._send(400, b"bad query\n", "text/plain")

    # --- helpers ---------------------------------------------------------------
    @property
    def _stop(self) -> threading.Event:
        return self.server.app._stopping

    def _send(self, status: int, body: bytes = b"", content_type: str = "image/jpeg",
              headers: dict[str, str] | None = None) -> None:
        self._head(status, content_type, {"Content-Length": str(len(body)), **(headers or {})})
        self.wfile.write(body)

    def _head(self, status: int, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _image(self, query: dict[str, str]) -> tuple[bytes, str]:
        """The image a fault route ends with: `src` if registered, else the synthetic JPEG."""
        entry = self.server.app._files.get(query.get("src", ""))
        return (entry[0], entry[1]) if entry else (synthetic_jpeg(), "image/jpeg")

    def _redirect(self, location: str) -> None:
        self._send(302, content_type="text/plain", headers={"Location": location})

    def _static(self, path: str) -> None:
        entry = self.server.app._files.get(path)
        if entry is None:
            self._not_found({})
            return
        if path in self.server.app._stalled:
            self._stall({"src": path})
            return
        data, content_type, headers = entry
        self._send(200, data, content_type, headers)

    def _megabytes(self, query: dict[str, str]) -> int:
        return int(float(query.get("mb", "30")) * (1 << 20))

    def _filler(self, total: int) -> Iterator[bytes]:
        """`total` bytes that start like a JPEG, then zeros, in chunks."""
        head = synthetic_jpeg()[:min(total, 1024)]
        yield head
        left = total - len(head)
        zeros = b"\x00" * _CHUNK
        while left > 0 and not self._stop.is_set():
            yield zeros[:min(left, _CHUNK)]
            left -= _CHUNK

    # --- routes --------------------------------------------------------------------
    def _not_found(self, query: dict[str, str]) -> None:
        self._send(404, b"not found\n", "text/plain")

    def _error_500(self, query: dict[str, str]) -> None:
        self._send(500, b"internal server error\n", "text/plain")

    def _too_many(self, query: dict[str, str]) -> None:
        self._send(429, b"slow down\n", "text/plain", {"Retry-After": "1"})

    def _flaky(self, query: dict[str, str]) -> None:
        attempt = self.server.app._attempt(query.get("id", ""))
        if attempt <= int(query.get("fail", "1")):
            self._send(503, b"try again\n", "text/plain", {"Retry-After": "0"})
        else:
            self._send(200, *self._image(query))

    def _stall(self, query: dict[str, str]) -> None:
        data, content_type = self._image(query)
        self._head(200, content_type, {"Content-Length": str(len(data))})
        self.wfile.flush()
        # A stall shorter than the client's read timeout is just a slow server: finish.
        if not self._stop.wait(self.server.app.stall_seconds):
            self.wfile.write(data)

    def _drip(self, query: dict[str, str]) -> None:
        data, content_type = self._image(query)
        data = data[:DRIP_BYTES]
        self._head(200, content_type, {"Content-Length": str(len(data))})
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            if self._stop.wait(DRIP_INTERVAL):
                return

    def _truncated(self, query: dict[str, str]) -> None:
        data, content_type = self._image(query)
        self._send(200, data[:int(len(data) * TRUNCATE_FRACTION)], content_type)

    def _html(self, query: dict[str, str]) -> None:
        page = b"<!doctype html><html><head><title>Photo</title></head><body><p>Not an image.</p></body></html>"
        self._send(200, page, "text/html; charset=utf-8")

    def _oversize(self, query: dict[str, str]) -> None:
        total = self._megabytes(query)
        self._head(200, "image/jpeg", {"Content-Length": str(total)})
        for chunk in self._filler(total):
            self.wfile.write(chunk)

    def _oversize_chunked(self, query: dict[str, str]) -> None:
        self._head(200, "image/jpeg", {"Transfer-Encoding": "chunked"})
        for chunk in self._filler(self._megabytes(query)):
            self.wfile.write(b"%X\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def _bomb(self, query: dict[str, str]) -> None:
        self._send(200, bomb_png(), "image/png")

    def _redirect_to(self, query: dict[str, str]) -> None:
        self._redirect(query.get("to", "/"))

    def _redirect_chain(self, query: dict[str, str]) -> None:
        hops = int(query.get("n", "3"))
        if hops <= 0:
            self._send(200, *self._image(query))
            return
        # A relative Location on purpose: clients must resolve it against the current URL.
        self._redirect("/fault/redirect-chain?" + urlencode({**query, "n": hops - 1}))

    def _loop(self, query: dict[str, str]) -> None:
        self._redirect("/fault/loop")

    def _slow_headers(self, query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.flush_headers()  # every line goes out alone, well within any read timeout
        for n in range(int(self.server.app.stall_seconds / DRIP_INTERVAL)):
            self.wfile.write(f"X-Filler-{n}: {'x' * 20}\r\n".encode())
            self.wfile.flush()
            if self._stop.wait(DRIP_INTERVAL):
                return
        data, _ = self._image(query)
        self.wfile.write(f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)

    def _slow_trailer(self, query: dict[str, str]) -> None:
        data, content_type = self._image(query)
        self._head(200, content_type, {"Transfer-Encoding": "chunked"})
        self.wfile.write(b"%X\r\n%s\r\n0\r\n" % (len(data), data))  # the last chunk, then trailer lines
        for n in range(int(self.server.app.stall_seconds / DRIP_INTERVAL)):
            self.wfile.write(f"X-Trailer-{n}: x\r\n".encode())
            self.wfile.flush()
            if self._stop.wait(DRIP_INTERVAL):
                return
        self.wfile.write(b"\r\n")

    def _gzip_empty(self, query: dict[str, str]) -> None:
        self._head(200, "image/jpeg", {"Content-Encoding": "gzip", "Transfer-Encoding": "chunked"})
        empty_blocks = b"\x00\x00\x00\xff\xff" * (_CHUNK // 5)  # stored blocks of length 0, not final
        stream = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"]  # a gzip header
        stream += [empty_blocks] * (self._megabytes(query) // len(empty_blocks))
        for chunk in stream:
            if self._stop.is_set():
                return
            self.wfile.write(b"%X\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")

    def _optout(self, query: dict[str, str]) -> None:
        data, content_type = self._image(query)
        headers = {"X-Robots-Tag": query.get("tag", "noai")}
        if "stall" not in query:
            self._send(200, data, content_type, headers)
            return
        # headers now, body only after stall_seconds: a client that decides from the
        # headers returns at once, one that reads the body first times out
        self._head(200, content_type, {"Content-Length": str(len(data)), **headers})
        self.wfile.flush()
        if not self._stop.wait(self.server.app.stall_seconds):
            self.wfile.write(data)


_ROUTES = {
    "404": _Handler._not_found, "500": _Handler._error_500, "429": _Handler._too_many,
    "flaky": _Handler._flaky, "stall": _Handler._stall, "drip": _Handler._drip,
    "truncated": _Handler._truncated, "html": _Handler._html, "oversize": _Handler._oversize,
    "oversize-chunked": _Handler._oversize_chunked, "bomb": _Handler._bomb,
    "redirect": _Handler._redirect_to, "redirect-chain": _Handler._redirect_chain,
    "loop": _Handler._loop, "optout": _Handler._optout, "slow-headers": _Handler._slow_headers,
    "gzip-empty": _Handler._gzip_empty, "slow-trailer": _Handler._slow_trailer,
}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stalled handler never keeps the process alive
    request_queue_size = 128  # the default backlog of 5 refuses a fetcher's burst of connections
    app: ImageServer

    def handle_error(self, request: object, client_address: object) -> None:
        # Client disconnects are routine; anything else is a bug worth a traceback.
        if not isinstance(sys.exc_info()[1], _DISCONNECTS):
            super().handle_error(request, client_address)


class ImageServer:
    """Serves registered files and the `/fault/` routes on 127.0.0.1 from a daemon thread.

    Use as a context manager, or call `stop()`; stop wakes stalled and dripping handlers.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1", stall_seconds: float = 30.0) -> None:
        if host != "127.0.0.1":
            raise ValueError("ImageServer serves loopback only (host='127.0.0.1')")
        self.stall_seconds = stall_seconds
        self.requests: collections.Counter[str] = collections.Counter()
        self.user_agents: dict[str, str] = {}  # path -> User-Agent of its latest request
        self._files: dict[str, tuple[bytes, str, dict[str, str]]] = {}
        self._stalled: set[str] = set()
        self._lock = threading.Lock()
        self._attempts: collections.Counter[str] = collections.Counter()
        self._stopping = threading.Event()
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.app = self
        self.port: int = self._httpd.server_address[1]
        self.base_url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"image-server-{self.port}", daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def add(self, path: str, data: bytes, content_type: str = "image/jpeg",
            headers: dict[str, str] | None = None, stall: bool = False) -> None:
        """Serve `data` at `path` (any query string is ignored when matching); with `stall`, as
        /fault/stall serves it (a robots.txt that never comes, say)."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        self._files[path] = (data, content_type, dict(headers or {}))
        if stall:
            self._stalled.add(path)

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ImageServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _count(self, path: str, user_agent: str) -> None:
        with self._lock:
            self.requests[path] += 1
            self.user_agents[path] = user_agent

    def _attempt(self, key: str) -> int:
        with self._lock:
            self._attempts[key] += 1
            return self._attempts[key]
