"""The fetch stage against a real loopback server with fault injection (demo/server.py)."""

from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Iterator

import pytest

from demo.server import ImageServer, synthetic_jpeg
from pipeline.build_config import BuildConfig
from pipeline.fetch import Fetcher, fetch_samples, optout_directive
from pipeline.schema import Sample

STALL = 20.0  # the server's stall; every client limit below is far shorter


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer(stall_seconds=STALL) as srv:
        srv.add("/img/a.jpg", synthetic_jpeg())
        srv.add("/img/big.jpg", b"\xff" * 3_000_000)
        yield srv


def config_for(server: ImageServer, **changes) -> BuildConfig:
    settings = dict(allow_host=[f"127.0.0.1:{server.port}"], connect_timeout=1.0, read_timeout=1.0,
                    url_deadline=4.0, retries=2, retry_backoff=0.05, max_bytes=1_000_000)
    return BuildConfig(**{**settings, **changes})


def fetch(url: str, config: BuildConfig) -> Sample:
    sample = Sample(key="k", unit=0, input_file="f", input_row=0, url=url, caption=None)
    Fetcher(config).fetch(sample)
    return sample


def test_ok_download_returns_the_bytes_and_names_the_project(server: ImageServer) -> None:
    sample = fetch(server.url("/img/a.jpg"), config_for(server))
    assert sample.pending and sample.content == synthetic_jpeg() and sample.http_status == 200
    assert server.user_agents["/img/a.jpg"].startswith("laion-face-builder/")


@pytest.mark.parametrize("route, status, requests", [
    ("/fault/404", "http_error", 1),  # permanent: never retried
    ("/fault/500", "server_error", 3),  # transient: 1 + 2 retries
    ("/fault/429", "rate_limited", 3),
    ("/fault/html", "ok-bytes", 1),  # HTTP is fine; decode rejects it later
])
def test_http_statuses_and_which_are_retried(server: ImageServer, route: str, status: str, requests: int) -> None:
    before = server.requests[route]
    # a deadline far beyond the two 1-s Retry-After waits of /fault/429, however slow the box
    sample = fetch(server.url(route), config_for(server, retry_backoff=0.01, url_deadline=15.0))
    if status == "ok-bytes":
        assert sample.pending and sample.content.startswith(b"<!doctype html>")
    else:
        assert sample.status == status, sample.reason
    assert server.requests[route] - before == requests


def test_429_honours_retry_after_within_the_deadline(server: ImageServer) -> None:
    started = time.monotonic()
    sample = fetch(server.url("/fault/429"), config_for(server, retries=1, url_deadline=5.0))
    assert sample.status == "rate_limited"
    assert time.monotonic() - started >= 1.0  # the server's Retry-After: 1


def test_flaky_server_succeeds_on_retry(server: ImageServer) -> None:
    sample = fetch(server.url("/fault/flaky?id=retry-me&fail=2"), config_for(server))
    assert sample.pending and sample.content, sample.reason


def test_stall_times_out_and_drip_hits_the_url_deadline(server: ImageServer) -> None:
    started = time.monotonic()
    stalled = fetch(server.url("/fault/stall"), config_for(server, retries=0))
    assert stalled.status == "timeout" and time.monotonic() - started < STALL / 2
    started = time.monotonic()
    # a byte every 0.25 s, each well within read_timeout: only the deadline stops it (10 kB would take 40 min)
    dripped = fetch(server.url("/fault/drip"), config_for(server, retries=0, read_timeout=5.0, url_deadline=2.0))
    assert dripped.status == "timeout" and "deadline" in dripped.reason, dripped.reason
    assert time.monotonic() - started < STALL / 2


def test_body_cap_from_the_header_and_while_streaming(server: ImageServer) -> None:
    declared = fetch(server.url("/fault/oversize?mb=5"), config_for(server))
    assert declared.status == "too_large" and "Content-Length" in declared.reason
    chunked = fetch(server.url("/fault/oversize-chunked?mb=5"), config_for(server))
    assert chunked.status == "too_large" and "exceeds" in chunked.reason
    assert fetch(server.url("/img/big.jpg"), config_for(server, max_bytes=4_000_000)).pending


def test_compressed_bodies_are_decoded_within_the_cap(server: ImageServer) -> None:
    """A server may gzip its answer although we ask for identity: decoded, but the cap and the
    deadline hold for what it decompresses to, and a body that is not what it says is refused."""
    server.add("/gz/ok.jpg", gzip.compress(synthetic_jpeg()), headers={"Content-Encoding": "gzip"})
    server.add("/gz/bomb.jpg", gzip.compress(b"\x00" * 50_000_000), headers={"Content-Encoding": "gzip"})
    server.add("/gz/lie.jpg", synthetic_jpeg(), headers={"Content-Encoding": "gzip"})
    server.add("/gz/brotli.jpg", synthetic_jpeg(), headers={"Content-Encoding": "br"})
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    server.add("/gz/raw-deflate.jpg", raw.compress(synthetic_jpeg()) + raw.flush(), headers={"Content-Encoding": "deflate"})
    assert fetch(server.url("/gz/ok.jpg"), config_for(server)).content == synthetic_jpeg()
    assert fetch(server.url("/gz/raw-deflate.jpg"), config_for(server)).content == synthetic_jpeg()
    bomb = fetch(server.url("/gz/bomb.jpg"), config_for(server))
    assert bomb.status == "too_large" and "decompressed" in bomb.reason
    lie = fetch(server.url("/gz/lie.jpg"), config_for(server))
    assert lie.status == "decode_error" and "does not decompress" in lie.reason
    assert fetch(server.url("/gz/brotli.jpg"), config_for(server)).status == "decode_error"
    # 50 MiB of gzip that decompresses to nothing: a decoding read never returns, so neither the
    # byte cap nor the deadline could act; read raw, the cap stops it at 1 MB
    started = time.monotonic()
    empty = fetch(server.url("/fault/gzip-empty?mb=50"), config_for(server, url_deadline=60.0))
    assert empty.status == "too_large" and time.monotonic() - started < 20


@pytest.mark.parametrize("route", ["slow-headers", "slow-trailer"])
def test_a_response_that_trickles_in_is_cut_off_at_the_deadline(server: ImageServer, route: str) -> None:
    """Header lines, or a chunked body's trailer lines, one every 0.25 s: each receive is well within
    read_timeout, and http.client reads them all inside one call, so only the watchdog stops it."""
    started = time.monotonic()
    sample = fetch(server.url(f"/fault/{route}"), config_for(server, retries=0, read_timeout=5.0, url_deadline=1.5))
    assert sample.status == "timeout" and "deadline" in sample.reason, sample.reason
    assert time.monotonic() - started < STALL / 2  # the trickle itself lasts STALL


def test_a_malformed_redirect_is_an_invalid_url(server: ImageServer) -> None:
    sample = fetch(server.url("/fault/redirect?to=http://[::1/x.jpg"), config_for(server))
    assert sample.status == "invalid_url" and "malformed" in sample.reason


def test_optout_is_decided_from_headers_before_the_body(server: ImageServer) -> None:
    started = time.monotonic()
    sample = fetch(server.url("/fault/optout?tag=noimageai&stall=1"), config_for(server, read_timeout=5.0))
    assert sample.status == "opted_out" and "noimageai" in sample.reason
    assert time.monotonic() - started < STALL / 2  # the body only comes after STALL: it was never read
    assert fetch(server.url("/fault/optout?tag=noai"), config_for(server, respect_optout=False)).pending


@pytest.mark.parametrize("values, expected", [
    (["noai"], "noai"), (["noindex, nofollow"], "noindex"), (["otherbot: noimageindex"], "noimageindex"),
    (["nofollow", "NoImageAI"], "noimageai"), (["nofollow"], None), ([], None),
])
def test_optout_directive_parsing(values: list[str], expected: str | None) -> None:
    assert optout_directive(values) == expected


def test_redirects_are_followed_and_bounded(server: ImageServer) -> None:
    assert fetch(server.url("/fault/redirect-chain?n=3"), config_for(server)).pending
    too_long = fetch(server.url("/fault/redirect-chain?n=8"), config_for(server, max_redirects=5))
    assert too_long.status == "too_many_redirects"
    loop = fetch(server.url("/fault/loop"), config_for(server))
    assert loop.status == "too_many_redirects" and "loop" in loop.reason


def test_ssrf_guard_refuses_loopback_unless_allow_listed(server: ImageServer) -> None:
    before = server.requests["/img/a.jpg"]
    refused = fetch(server.url("/img/a.jpg"), config_for(server, allow_host=[]))
    assert refused.status == "blocked_address" and "loopback" in refused.reason
    other_port = fetch(server.url("/img/a.jpg"), config_for(server, allow_host=[f"127.0.0.1:{server.port + 1}"]))
    assert other_port.status == "blocked_address"
    assert server.requests["/img/a.jpg"] == before  # refused before connecting


def test_ssrf_guard_checks_every_redirect_hop(server: ImageServer) -> None:
    before = server.requests["/img/a.jpg"]
    # an allow-listed server redirecting to a loopback port that is not allow-listed
    hop = fetch(server.url("/fault/redirect?to=http://127.0.0.1:1/secret"), config_for(server))
    assert hop.status == "blocked_address" and "127.0.0.1:1" in hop.reason
    metadata = fetch(server.url("/fault/redirect?to=http://169.254.169.254/latest/meta-data/"), config_for(server))
    assert metadata.status == "blocked_address" and "link-local" in metadata.reason
    localhost = fetch(server.url("/fault/redirect?to=http://localhost:%d/img/a.jpg" % server.port), config_for(server))
    assert localhost.status == "blocked_address"  # allow-listed as 127.0.0.1:PORT, not as localhost:PORT
    assert server.requests["/img/a.jpg"] == before


def test_redirect_to_file_url_is_refused(server: ImageServer) -> None:
    sample = fetch(server.url("/fault/redirect?to=file:///etc/passwd"), config_for(server))
    assert sample.status == "invalid_url" and sample.content is None


def test_unreachable_port_is_a_connection_error() -> None:
    config = BuildConfig(allow_host=["127.0.0.1:1"], retries=0, connect_timeout=1.0)
    assert fetch("http://127.0.0.1:1/x.jpg", config).status == "connection_error"


def test_fetch_samples_downloads_concurrently_and_skips_decided_rows(server: ImageServer) -> None:
    samples = [Sample(key=str(i), unit=0, input_file="f", input_row=i, url=server.url("/fault/stall"), caption=None)
               for i in range(8)]
    samples[0].fail("invalid_url", "decided earlier")
    started = time.monotonic()
    yielded = list(fetch_samples(samples, config_for(server, retries=0, threads_per_task=8)))
    assert sorted(s.input_row for s in yielded) == list(range(1, 8))  # each pending sample once, no other
    assert time.monotonic() - started < 5  # 7 stalls of 1 s each, side by side (one after another: 7 s)
    assert samples[0].reason == "decided earlier"
    assert all(s.status == "timeout" for s in samples[1:])


def test_samples_come_back_as_their_downloads_finish(server: ImageServer) -> None:
    """A stalled download does not hold back the samples behind it: the caller decodes those meanwhile."""
    urls = [server.url("/fault/stall"), server.url("/img/a.jpg"), server.url("/img/a.jpg")]
    samples = [Sample(key=str(i), unit=0, input_file="f", input_row=i, url=url, caption=None)
               for i, url in enumerate(urls)]
    order = [s.input_row for s in fetch_samples(samples, config_for(server, retries=0, threads_per_task=4))]
    assert order[-1] == 0 and sorted(order) == [0, 1, 2], order
    assert samples[0].status == "timeout" and samples[1].content and samples[2].content
