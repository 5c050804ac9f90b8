"""robots.txt (--respect-robots, pipeline.robots): a real loopback server's rules for our user
agent and for *, asked once per host; hosts without rules, or whose robots.txt cannot be read."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from demo.server import ImageServer, synthetic_jpeg
from pipeline.build_config import BuildConfig
from pipeline.fetch import Fetcher
from pipeline.robots import RobotsCache, agent_token
from pipeline.schema import Sample

EVERYONE = b"""# a host that keeps every crawler out of one folder
User-agent: *
Disallow: /private/
"""
OURS = EVERYONE + b"""
User-agent: laion-face-builder
Disallow: /faces/
"""


@pytest.fixture
def server() -> Iterator[ImageServer]:  # one per test: each is a new host to the process-wide cache
    with ImageServer(stall_seconds=5) as srv:
        for path in ("/private/a.jpg", "/faces/b.jpg", "/ok.jpg", "/other/c.jpg"):
            srv.add(path, synthetic_jpeg())
        yield srv


def fetch_all(server: ImageServer, paths: list[str], **changes) -> list[Sample]:
    config = BuildConfig(allow_host=[f"127.0.0.1:{server.port}"], read_timeout=1.0, url_deadline=4.0, retries=0,
                         **{"respect_robots": True, **changes})
    fetcher = Fetcher(config)
    samples = [Sample(key=str(i), unit=0, input_file="f", input_row=i, url=server.url(path), caption=None)
               for i, path in enumerate(paths)]
    threads = [threading.Thread(target=fetcher.fetch, args=(sample,)) for sample in samples]  # at once, as a unit does
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples


def test_the_rules_for_everyone_are_obeyed_asking_once(server: ImageServer) -> None:
    server.add("/robots.txt", EVERYONE, "text/plain")
    paths = ["/private/a.jpg", "/faces/b.jpg", "/ok.jpg", "/other/c.jpg", "/fault/redirect?to=/private/a.jpg"]
    samples = fetch_all(server, paths)
    assert [s.status for s in samples] == ["robots_disallowed", None, None, None, "robots_disallowed"]
    assert samples[4].reason == f"robots.txt of 127.0.0.1:{server.port} disallows {server.url('/private/a.jpg')}"
    assert samples[2].content == synthetic_jpeg() and samples[2].reason is None
    assert server.requests["/robots.txt"] == 1, "one robots.txt request for the host, however many threads ask"
    assert server.requests["/private/a.jpg"] == 0
    assert server.user_agents["/robots.txt"].startswith("laion-face-builder/")


def test_a_group_for_our_agent_replaces_the_one_for_everyone(server: ImageServer) -> None:
    """RFC 9309: a crawler obeys the group that names it, and the `*` group only when none does."""
    server.add("/robots.txt", OURS, "text/plain")
    samples = fetch_all(server, ["/private/a.jpg", "/faces/b.jpg", "/ok.jpg"])
    assert [s.status for s in samples] == [None, "robots_disallowed", None]


def test_without_the_flag_robots_txt_is_never_asked(server: ImageServer) -> None:
    server.add("/robots.txt", EVERYONE, "text/plain")
    samples = fetch_all(server, ["/private/a.jpg"], respect_robots=False)
    assert samples[0].pending and server.requests["/robots.txt"] == 0


def test_a_host_without_robots_txt_has_no_rules(server: ImageServer) -> None:
    samples = fetch_all(server, ["/private/a.jpg", "/faces/b.jpg"])
    assert [s.status for s in samples] == [None, None] and {s.reason for s in samples} == {None}


def test_a_robots_txt_that_times_out_counts_as_allowing_and_says_so(server: ImageServer) -> None:
    server.add("/robots.txt", EVERYONE, "text/plain", stall=True)
    [sample] = fetch_all(server, ["/private/a.jpg"])
    assert sample.pending and sample.content == synthetic_jpeg()
    assert sample.reason.startswith(f"robots.txt of http://127.0.0.1:{server.port} could not be read (")
    assert sample.reason.endswith("treated as allowing")


@pytest.mark.parametrize("status, note", [(503, "answered HTTP 503"), (429, "answered HTTP 429"), (404, None)])
def test_what_a_robots_txt_status_means(status: int, note: str | None) -> None:
    rules = RobotsCache().rules("http://h.example/x.jpg", lambda url: (status, b"User-agent: *\nDisallow: /\n"))
    assert rules.allows("laion-face-builder", "http://h.example/x.jpg")
    assert (note in rules.note) if note else rules.note is None


def test_the_cache_is_bounded_and_evicts_the_least_recent_host() -> None:
    asked: list[str] = []

    def fetch(url: str) -> tuple[int, bytes]:
        asked.append(url)
        return 200, b"User-agent: *\nDisallow: /no/\n"

    cache = RobotsCache(max_hosts=2)
    for host in ("a", "b", "a", "c", "b"):
        cache.rules(f"http://{host}.example/x", fetch)
    assert asked == [f"http://{h}.example/robots.txt" for h in ("a", "b", "c", "b")]
    assert not cache.rules("http://c.example/no/1.jpg", fetch).allows("anybot", "http://c.example/no/1.jpg")


def test_the_agent_token_is_the_product_name() -> None:
    assert agent_token(BuildConfig().user_agent) == "laion-face-builder"
    assert agent_token(BuildConfig(contact_url="https://example.org/crawl").user_agent) == "laion-face-builder"
