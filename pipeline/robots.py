"""robots.txt, asked once per host (--respect-robots).

Each host's robots.txt is fetched through the fetcher's own guarded client (the SSRF guard, the
deadline, the byte cap) and parsed by the standard library's RobotFileParser, whose rules for our
user agent's product token and for `*` decide. What a crawler does when a robots.txt cannot be
read (RFC 9309): a 4xx means no rules; a timeout, a 5xx or a failed connection is treated as
allowing too, as the large crawlers do for a host that is down, and the row's `reason` says so.
Verdicts are kept per worker process, for the whole run, in a bounded LRU; the threads of a task
asking for the same host wait for one fetch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309: at least the first 500 KiB are parsed; the rest is ignored
MAX_HOSTS = 20_000  # verdicts kept per worker process (a parsed robots.txt is a few kB)


@dataclass(frozen=True)
class HostRules:
    parser: RobotFileParser | None  # None: no rules (missing, or unreadable)
    note: str | None = None  # why there are none, when the row's reason should say it

    def allows(self, agent: str, url: str) -> bool:
        return self.parser is None or self.parser.can_fetch(agent, url)


class RobotsCache:
    """host -> HostRules, bounded; `fetch(url)` returns (status code or None, body) or raises."""

    def __init__(self, max_hosts: int = MAX_HOSTS):
        self.max_hosts = max_hosts
        self._lock = threading.Lock()
        self._rules: OrderedDict[str, Future] = OrderedDict()

    def rules(self, url: str, fetch: Callable[[str], tuple[int, bytes]]) -> HostRules:
        """The rules of url's host; `fetch(robots_url)` returns (HTTP status, body), or raises
        TimeoutError / ConnectionError for a host that cannot be asked."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        with self._lock:
            future = self._rules.get(origin)
            mine = future is None
            if mine:
                future = self._rules[origin] = Future()
                if len(self._rules) > self.max_hosts:
                    self._rules.popitem(last=False)
            else:
                self._rules.move_to_end(origin)
        if mine:
            future.set_result(_read(origin, fetch))
        return future.result()


def _read(origin: str, fetch: Callable[[str], tuple[int, bytes]]) -> HostRules:
    try:
        status, body = fetch(f"{origin}/robots.txt")
    except (TimeoutError, ConnectionError) as err:
        return HostRules(None, f"robots.txt of {origin} could not be read ({err}): treated as allowing")
    if status >= 500 or status == 429:
        return HostRules(None, f"robots.txt of {origin} answered HTTP {status}: treated as allowing")
    if status != 200:
        return HostRules(None)  # 4xx: the host publishes no rules
    parser = RobotFileParser()
    parser.parse(body[:ROBOTS_MAX_BYTES].decode("utf-8", errors="replace").splitlines())
    return HostRules(parser)


def agent_token(user_agent: str) -> str:
    """The product token robots.txt groups name: 'laion-face-builder' of 'laion-face-builder/0.2 (...)'."""
    return user_agent.split("/", 1)[0].split()[0]
