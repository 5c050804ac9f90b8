"""Stage 2, fetch: download every pending Sample of a unit, many at once.

Hand-written on urllib3 because img2dataset's downloader has no SSRF guard, no byte cap
enforced while streaming and no opt-out decided before the body is read. Retries with
exponential backoff only for failures that may pass (timeouts, 429, 5xx, connection errors).

The byte cap and the URL deadline hold against hostile servers too: the body is read raw, one
receive at a time, and a compressed body (sent despite our `Accept-Encoding: identity`) is
decompressed afterwards with its output bounded, so neither a gzip bomb nor an endless stream of
empty deflate blocks gets past them; a response that trickles in (headers, chunk sizes, chunked
trailers: reads the per-receive timeout cannot bound) is cut off at the deadline by a watchdog.
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextvars import ContextVar
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, NameResolutionError, NewConnectionError,
                                ProtocolError, ReadTimeoutError, SSLError)

from pipeline.build_config import BuildConfig
from pipeline.netguard import AddressGuard, BlockedAddress, guarded_pool_classes
from pipeline.robots import RobotsCache, agent_token
from pipeline.schema import TRANSIENT_STATUSES, Sample
from pipeline.source import is_http_url

OPTOUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024
ZLIB_WBITS = {"gzip": zlib.MAX_WBITS | 16, "x-gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS | 32}
ROBOTS_DEADLINE_S = 10.0  # a robots.txt gets at most this long (or the URL deadline, if shorter)
ROBOTS = RobotsCache()  # per worker process, for the whole run: each host is asked once
WATCHDOG_TICK = 0.05  # seconds: how late past its deadline a socket may be shut down
DEADLINE: ContextVar[float | None] = ContextVar("fetch_deadline", default=None)  # the URL being fetched in this thread
ARMED: ContextVar[int | None] = ContextVar("fetch_watchdog_token", default=None)  # its response's socket, if watched


class FetchFailure(Exception):
    def __init__(self, status: str, reason: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.status, self.reason, self.http_status, self.retry_after = status, reason, http_status, retry_after


def optout_directive(values: list[str]) -> str | None:
    """The opt-out directive among X-Robots-Tag header values, if any.

    A value may name a crawler first ('otherbot: noindex'); we honour it whichever bot it names.
    """
    for value in values:
        for token in value.split(","):
            directive = token.rsplit(":", 1)[-1].strip().lower()
            if directive in OPTOUT_DIRECTIVES:
                return directive
    return None


class _Watchdog:
    """One thread per process that shuts down each armed socket whose deadline passes (a timer
    thread per request would cost more CPU than the request)."""

    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._armed: dict[int, socket.socket] = {}
        self._deadlines: list[tuple[float, int]] = []  # a heap; disarmed entries leave it when due
        self._tokens = itertools.count()
        threading.Thread(target=self._run, name="fetch-deadlines", daemon=True).start()

    def arm(self, sock: socket.socket, deadline: float) -> int:
        with self._wake:
            token = next(self._tokens)
            self._armed[token] = sock
            heapq.heappush(self._deadlines, (deadline, token))
            if self._deadlines[0][1] == token:  # sooner than the one the thread waits for
                self._wake.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._wake:
            self._armed.pop(token, None)

    def _run(self) -> None:
        with self._wake:
            while True:
                while self._deadlines and self._deadlines[0][0] <= time.monotonic():
                    sock = self._armed.pop(heapq.heappop(self._deadlines)[1], None)
                    if sock is not None:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:  # closed meanwhile
                            pass
                # at least WATCHDOG_TICK: deadlines that are due together are handled in one wake-up
                self._wake.wait(max(self._deadlines[0][0] - time.monotonic(), WATCHDOG_TICK) if self._deadlines else None)


_watchdog: _Watchdog | None = None
_watchdog_lock = threading.Lock()


def watchdog() -> _Watchdog:
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = _Watchdog()
        return _watchdog


class _Deadline:
    """Connection mixin: a response ends at the URL's deadline. The read timeout applies to each
    receive only, so a server that sends a byte now and then (of the headers, a chunk size, a
    chunked trailer) would hold the thread for ever; past the deadline the watchdog shuts the
    socket down. Armed when the headers are awaited; the fetcher disarms it (ARMED) once it has
    read the body, before the connection can go back to the pool."""

    sock: socket.socket | None

    def getresponse(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - urllib3's signature
        deadline, sock = DEADLINE.get(), self.sock
        if deadline is None or sock is None:
            return super().getresponse(*args, **kwargs)
        token = watchdog().arm(sock, deadline)
        try:
            response = super().getresponse(*args, **kwargs)
        except BaseException:
            watchdog().disarm(token)
            raise
        if time.monotonic() >= deadline:  # a shut-down socket reads as the end of the headers
            watchdog().disarm(token)
            raise TimeoutError("URL deadline passed while reading the response headers")
        ARMED.set(token)
        return response


class Fetcher:
    """Thread-safe downloader; one per fetch task."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.http = urllib3.PoolManager(num_pools=256, maxsize=4, retries=False,
                                        headers={"User-Agent": config.user_agent})
        self.http.pool_classes_by_scheme = guarded_pool_classes(
            AddressGuard(config.allow_host),
            type("DeadlineHTTPConnection", (_Deadline, HTTPConnection), {}),
            type("DeadlineHTTPSConnection", (_Deadline, HTTPSConnection), {}))
        self.robots = ROBOTS if config.respect_robots else None
        self.agent = agent_token(config.user_agent)

    def fetch(self, sample: Sample) -> None:
        """Fill sample.content, or give the sample a failure status."""
        try:
            self._fetch(sample)
        except Exception as err:  # one odd response must not fail the unit, and with it the build
            sample.fail("connection_error", f"unexpected {type(err).__name__}: {err}"[:300])

    def _fetch(self, sample: Sample) -> None:
        deadline = time.monotonic() + self.config.url_deadline
        DEADLINE.set(deadline)
        for attempt in range(self.config.retries + 1):
            try:
                sample.content = self._follow(sample.url, deadline, sample)
                return
            except FetchFailure as failure:
                sample.http_status = failure.http_status
                wait = failure.retry_after or self.config.retry_backoff * 2 ** attempt
                last = attempt == self.config.retries or time.monotonic() + wait >= deadline
                if failure.status not in TRANSIENT_STATUSES or last:
                    tries = f" after {attempt + 1} attempts" if failure.status in TRANSIENT_STATUSES else ""
                    sample.fail(failure.status, failure.reason + tries)
                    return
                time.sleep(wait)

    def _follow(self, url: str, deadline: float, sample: Sample | None) -> bytes:
        """GET url, following redirects by hand so that every hop is checked (by robots.txt too,
        with --respect-robots). Without a sample: a robots.txt, read whatever its X-Robots-Tag."""
        seen = {url}
        for _ in range(self.config.max_redirects + 1):
            if self.robots is not None and sample is not None:
                self._obey_robots(url, sample)
            response = self._request(url, deadline)
            body_read = False
            try:
                if sample is not None:
                    sample.http_status = response.status
                if response.status in REDIRECTS and response.headers.get("Location"):
                    try:
                        url = urljoin(url, response.headers["Location"])
                    except ValueError:  # e.g. 'http://[::1/x.jpg'
                        raise FetchFailure("invalid_url", f"redirect to a malformed URL: "
                                                          f"{response.headers['Location'][:200]!r}") from None
                    if not is_http_url(url):  # the rule the source stage applies to input URLs
                        raise FetchFailure("invalid_url", f"redirect to a non-http URL: {url[:200]}")
                    if url in seen:
                        raise FetchFailure("too_many_redirects", f"redirect loop at {url[:200]}")
                    seen.add(url)
                    continue
                body = self._read_body(response, deadline, honour_optout=sample is not None)
                body_read = True
                return body
            finally:
                if (token := ARMED.get()) is not None:
                    watchdog().disarm(token)
                    ARMED.set(None)
                if not body_read:  # an unread body must not be left on a connection that gets reused
                    response.close()
                response.release_conn()
        raise FetchFailure("too_many_redirects", f"more than {self.config.max_redirects} redirects")

    def _request(self, url: str, deadline: float) -> urllib3.BaseHTTPResponse:
        remaining = max(deadline - time.monotonic(), 0.001)
        timeout = urllib3.Timeout(connect=min(self.config.connect_timeout, remaining),
                                  read=min(self.config.read_timeout, remaining))
        try:
            return self.http.request("GET", url, preload_content=False, redirect=False, timeout=timeout)
        except BlockedAddress as err:
            raise FetchFailure("blocked_address", str(err)) from None
        except (NameResolutionError, NewConnectionError) as err:  # before ConnectTimeoutError: they subclass it
            raise FetchFailure("connection_error", f"{type(err).__name__}: {err}"[:300]) from None
        except ConnectTimeoutError:
            raise FetchFailure("timeout", f"connect timed out after {timeout.connect_timeout}s") from None
        except (ReadTimeoutError, TimeoutError, ProtocolError, SSLError, OSError) as err:
            if time.monotonic() >= deadline:  # _HeaderDeadline shut the socket
                raise FetchFailure("timeout", f"URL deadline of {self.config.url_deadline}s exceeded "
                                              "while waiting for the response headers") from None
            if isinstance(err, (ReadTimeoutError, TimeoutError)):
                raise FetchFailure("timeout", f"no response within {timeout.read_timeout}s") from None
            raise FetchFailure("connection_error", f"{type(err).__name__}: {err}"[:300]) from None
        except (HTTPError, ValueError) as err:  # ValueError: a URL urllib3 cannot parse
            raise FetchFailure("invalid_url", f"{type(err).__name__}: {err}"[:300]) from None

    def _obey_robots(self, url: str, sample: Sample) -> None:
        """Raise robots_disallowed where the host's robots.txt forbids url; note a host whose
        robots.txt could not be read in the row's reason."""
        rules = self.robots.rules(url, self._robots_file)
        if not rules.allows(self.agent, url):
            raise FetchFailure("robots_disallowed", f"robots.txt of {urlsplit(url).netloc} disallows {url[:200]}")
        if rules.note and sample.pending:
            sample.reason = rules.note  # kept if the row ends ok; a later failure says its own reason

    def _robots_file(self, url: str) -> tuple[int, bytes]:
        """(HTTP status, body) of a robots.txt, under its own deadline; TimeoutError or
        ConnectionError where the host cannot be asked."""
        token = DEADLINE.set(time.monotonic() + min(self.config.url_deadline, ROBOTS_DEADLINE_S))
        try:
            return 200, self._follow(url, DEADLINE.get(), None)
        except FetchFailure as failure:
            if failure.http_status is not None and failure.status in ("http_error", "rate_limited", "server_error"):
                return failure.http_status, b""
            if failure.status == "timeout":
                raise TimeoutError(failure.reason) from None
            raise ConnectionError(f"{failure.status}: {failure.reason}") from None
        finally:
            DEADLINE.reset(token)

    def _read_body(self, response: urllib3.BaseHTTPResponse, deadline: float, honour_optout: bool = True) -> bytes:
        status = response.status
        if status == 429 or status >= 500:
            retry_after = response.headers.get("Retry-After", "")
            raise FetchFailure("rate_limited" if status == 429 else "server_error", f"HTTP {status}", status,
                               float(retry_after) if retry_after.isdigit() else None)
        if status != 200:
            raise FetchFailure("http_error", f"HTTP {status}", status)
        tag = optout_directive(response.headers.getlist("X-Robots-Tag"))
        if tag and honour_optout and self.config.respect_optout:
            raise FetchFailure("opted_out", f"X-Robots-Tag: {tag}", status)
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.config.max_bytes:
            raise FetchFailure("too_large", f"Content-Length {length} > max_bytes {self.config.max_bytes}", status)
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "") and encoding not in ZLIB_WBITS:
            raise FetchFailure("decode_error", f"unsupported Content-Encoding {encoding[:50]!r}", status)
        body = bytearray()
        try:
            # raw, one recv per call: urllib3's decoding read1 loops inside until output appears
            while chunk := response.read1(CHUNK, decode_content=False):
                body += chunk
                if len(body) > self.config.max_bytes:
                    raise FetchFailure("too_large", f"body exceeds max_bytes {self.config.max_bytes}", status)
                if time.monotonic() > deadline:
                    raise FetchFailure("timeout", f"URL deadline of {self.config.url_deadline}s exceeded", status)
        except (ReadTimeoutError, TimeoutError, ProtocolError, SSLError, OSError, HTTPError) as err:
            if time.monotonic() >= deadline:  # the watchdog shut the socket
                raise FetchFailure("timeout", f"URL deadline of {self.config.url_deadline}s exceeded", status) from None
            if isinstance(err, (ReadTimeoutError, TimeoutError)):
                raise FetchFailure("timeout", f"no data for {self.config.read_timeout}s while reading", status) from None
            raise FetchFailure("connection_error", f"{type(err).__name__}: {err}"[:300], status) from None
        if time.monotonic() >= deadline:  # a body that ends with the connection ends when the watchdog shuts it
            raise FetchFailure("timeout", f"URL deadline of {self.config.url_deadline}s exceeded", status)
        return self._decompress(bytes(body), encoding, status)

    def _decompress(self, body: bytes, encoding: str, status: int) -> bytes:
        """A gzip or deflate body, decompressed to at most max_bytes."""
        if encoding not in ZLIB_WBITS:
            return body
        raw_deflate = [-zlib.MAX_WBITS] if encoding == "deflate" else []  # 'deflate' comes without its zlib header too
        for wbits in (ZLIB_WBITS[encoding], *raw_deflate):
            inflater = zlib.decompressobj(wbits)
            try:
                data = inflater.decompress(body, self.config.max_bytes + 1)
                break
            except zlib.error as err:
                error = err
        else:
            raise FetchFailure("decode_error", f"Content-Encoding {encoding} body does not decompress: {error}", status)
        if len(data) > self.config.max_bytes:
            raise FetchFailure("too_large", f"decompressed body exceeds max_bytes {self.config.max_bytes}", status)
        if not inflater.eof:
            raise FetchFailure("decode_error", f"Content-Encoding {encoding} body is truncated", status)
        return data


def fetch_samples(samples: list[Sample], config: BuildConfig) -> Iterator[Sample]:
    """Download every pending sample, `threads_per_task` at a time, and yield each as it finishes
    (content filled, or failed): the caller's CPU work on one (decoding) overlaps the downloads of
    the others, and a retry's backoff holds only its own thread, not the unit's CPU."""
    pending = [s for s in samples if s.pending]
    if not pending:
        return
    fetcher = Fetcher(config)
    pool = ThreadPoolExecutor(max_workers=min(config.threads_per_task, len(pending)))
    try:
        downloads = {pool.submit(fetcher.fetch, sample): sample for sample in pending}
        for done in as_completed(downloads):
            done.result()
            yield downloads[done]
    finally:
        pool.shutdown(cancel_futures=True)  # a consumer that stopped early waits only for those under way
