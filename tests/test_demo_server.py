"""The demo image server: every fault route, over a real loopback socket."""

from __future__ import annotations

import http.client
import io
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from PIL import Image

from demo.server import DRIP_BYTES, TRUNCATE_FRACTION, ImageServer, bomb_png, synthetic_jpeg

JPEG_MAGIC = b"\xff\xd8"


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(stall_seconds=0.5) as srv:
        yield srv


def get(srv: ImageServer, path: str, timeout: float = 5.0,
        read: bool = True) -> tuple[http.client.HTTPResponse, bytes, http.client.HTTPConnection]:
    """One GET without following redirects; the connection is returned open so that
    tests can read slowly or hang up."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read() if read else b""
    return resp, body, conn


def decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except OSError:
        return False


def test_binds_loopback_and_builds_urls(server: ImageServer) -> None:
    assert server.port > 0
    assert server.base_url == f"http://127.0.0.1:{server.port}"
    assert server.url("/a/b") == server.url("a/b") == server.base_url + "/a/b"
    assert server._httpd.server_address[0] == "127.0.0.1"
    with pytest.raises(ValueError):
        ImageServer(host="0.0.0.0")


def test_static_files_headers_and_request_counts(server: ImageServer) -> None:
    server.add("/img/s.png", b"\x89PNG-bytes", "image/png", {"X-Extra": "1"})
    for v in range(3):
        resp, body, _ = get(server, f"/img/s.png?v={v}")
        assert (resp.status, body) == (200, b"\x89PNG-bytes")
        assert resp.headers["Content-Type"] == "image/png" and resp.headers["X-Extra"] == "1"
    assert server.requests["/img/s.png"] == 3
    assert get(server, "/img/missing.jpg")[0].status == 404
    with pytest.raises(ValueError):
        server.add("no-slash", b"")


@pytest.mark.parametrize(("route", "status"), [("404", 404), ("500", 500), ("nonexistent", 404)])
def test_error_statuses(server: ImageServer, route: str, status: int) -> None:
    assert get(server, f"/fault/{route}?x=1")[0].status == status


def test_bad_query_is_a_400(server: ImageServer) -> None:
    assert get(server, "/fault/oversize?mb=lots")[0].status == 400


def test_429_says_retry_after(server: ImageServer) -> None:
    resp, _, _ = get(server, "/fault/429")
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"


def test_flaky_fails_n_times_per_id_then_serves_a_jpeg(server: ImageServer) -> None:
    statuses = [get(server, "/fault/flaky?id=a&fail=2")[0].status for _ in range(2)]
    assert statuses == [503, 503]
    assert get(server, "/fault/flaky?id=b&fail=2")[0].status == 503  # ids are counted apart
    resp, body, _ = get(server, "/fault/flaky?id=a&fail=2")
    assert resp.status == 200 and body.startswith(JPEG_MAGIC) and decodes(body)


def test_stall_sends_headers_then_nothing() -> None:
    with ImageServer(stall_seconds=30) as srv:  # a stall far beyond the client's timeout, however slow the box
        resp, _, conn = get(srv, "/fault/stall", timeout=1.0, read=False)
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(synthetic_jpeg())
        with pytest.raises(TimeoutError):
            resp.read(1)
        conn.close()


def test_stall_shorter_than_the_timeout_is_just_slow(server: ImageServer) -> None:
    start = time.monotonic()
    _, body, _ = get(server, "/fault/stall", timeout=5)
    assert body == synthetic_jpeg() and time.monotonic() - start >= 0.4


def test_stop_wakes_stalled_handlers() -> None:
    srv = ImageServer(stall_seconds=30)
    resp, _, conn = get(srv, "/fault/stall", timeout=10, read=False)
    reader_done = threading.Event()

    def read_rest() -> None:
        try:
            resp.read()
        except (http.client.IncompleteRead, OSError):
            pass
        reader_done.set()

    threading.Thread(target=read_rest, daemon=True).start()
    start = time.monotonic()
    srv.stop()
    assert time.monotonic() - start < 2
    assert reader_done.wait(3), "the stalled response was not ended by stop()"
    conn.close()
    srv.stop()  # idempotent


def test_drip_is_slow_but_never_silent(server: ImageServer) -> None:
    start = time.monotonic()  # before the request: the first byte comes with the headers, the fifth 1 s later
    resp, _, conn = get(server, "/fault/drip", timeout=1.0, read=False)
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == DRIP_BYTES
    head = b"".join(resp.read(1) for _ in range(6))  # each read well inside the 1 s timeout
    elapsed = time.monotonic() - start
    assert head.startswith(JPEG_MAGIC) and head == synthetic_jpeg()[:6]
    assert elapsed >= 5 * 0.25 * 0.9  # ...while 10 kB would take ~40 minutes
    conn.close()


def test_truncated_jpeg_is_valid_http_but_corrupt(server: ImageServer) -> None:
    resp, body, _ = get(server, "/fault/truncated")
    assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(body)
    assert len(body) == int(len(synthetic_jpeg()) * TRUNCATE_FRACTION) and body.startswith(JPEG_MAGIC)
    assert not decodes(body)


def test_html_page(server: ImageServer) -> None:
    resp, body, _ = get(server, "/fault/html")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
    assert body.startswith(b"<!doctype html>")


def test_oversize_with_content_length(server: ImageServer) -> None:
    resp, body, _ = get(server, "/fault/oversize?mb=2")
    assert int(resp.headers["Content-Length"]) == len(body) == 2 << 20
    assert body.startswith(JPEG_MAGIC)
    resp, _, conn = get(server, "/fault/oversize", read=False)
    assert int(resp.headers["Content-Length"]) == 30 << 20  # the default
    conn.close()


def test_oversize_chunked_has_no_length(server: ImageServer) -> None:
    resp, body, _ = get(server, "/fault/oversize-chunked?mb=1.5")
    assert resp.headers["Transfer-Encoding"] == "chunked" and resp.headers["Content-Length"] is None
    assert len(body) == int(1.5 * (1 << 20))


def test_bomb_header_is_readable_without_decoding(server: ImageServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    resp, body, _ = get(server, "/fault/bomb")
    assert resp.headers["Content-Type"] == "image/png" and len(body) < 300_000
    with pytest.raises(Image.DecompressionBombError):  # PIL's own guard trips on open
        Image.open(io.BytesIO(body))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(io.BytesIO(body)) as img:
        assert (img.format, img.size) == ("PNG", (30_000, 30_000))


def test_bomb_is_a_real_png() -> None:
    # The same construction at a decodable size.
    with Image.open(io.BytesIO(bomb_png(64))) as img:
        img.load()
        assert img.size == (64, 64) and img.getextrema() == (0, 0)


def test_redirect_to_any_url(server: ImageServer) -> None:
    resp, _, _ = get(server, "/fault/redirect?to=http%3A%2F%2F127.0.0.1%3A1%2Fx")
    assert resp.status == 302 and resp.headers["Location"] == "http://127.0.0.1:1/x"


def test_redirect_chain_hops_then_serves_an_image(server: ImageServer) -> None:
    path, hops = "/fault/redirect-chain?n=3", 0
    while (resp := get(server, path)[0]).status == 302 and hops < 10:
        path, hops = resp.headers["Location"], hops + 1
    assert (hops, resp.status) == (3, 200)
    with urllib.request.urlopen(server.url("/fault/redirect-chain?n=2"), timeout=5) as final:
        assert decodes(final.read())


def test_loop_redirects_to_itself(server: ImageServer) -> None:
    for _ in range(5):
        resp, _, _ = get(server, "/fault/loop")
        assert resp.status == 302 and resp.headers["Location"] == "/fault/loop"


def test_optout_tag_and_src(server: ImageServer) -> None:
    server.add("/img/face.jpg", synthetic_jpeg()[:100] + b"x")
    resp, body, _ = get(server, "/fault/optout?tag=noai")
    assert resp.headers["X-Robots-Tag"] == "noai" and decodes(body)
    resp, body, _ = get(server, "/fault/optout?tag=noimageindex&src=/img/face.jpg")
    assert resp.headers["X-Robots-Tag"] == "noimageindex" and body == synthetic_jpeg()[:100] + b"x"


def test_survives_hangups_quietly(server: ImageServer, capfd: pytest.CaptureFixture[str]) -> None:
    for path in ("/fault/oversize?mb=20", "/fault/oversize-chunked?mb=20", "/fault/drip"):
        resp, _, conn = get(server, path, read=False)
        resp.read(10)
        resp.close()  # the response owns the socket: this hangs up mid-body
        conn.close()
    time.sleep(0.5)  # let the handlers hit the broken pipe
    resp, body, _ = get(server, "/fault/html")
    assert resp.status == 200 and body
    assert capfd.readouterr().err == ""
