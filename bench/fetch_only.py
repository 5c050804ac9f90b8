"""`python -m bench.fetch_only URLS.txt THREADS RESULT.json`: download every URL, nothing else.

The ceiling the loopback server and the machine allow a downloader: one client process,
THREADS threads of urllib3, bodies read and dropped (no decode, no write). Run as a subprocess
of bench.build_speed, against the same server and URLs as the real runs.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import urllib3


def main(argv: list[str]) -> int:
    urls_path, threads, result_path = argv[0], int(argv[1]), argv[2]
    with open(urls_path) as f:
        urls = [line.strip() for line in f if line.strip()]
    http = urllib3.PoolManager(maxsize=int(threads), retries=False)

    def get(url: str) -> int:
        response = http.request("GET", url, timeout=urllib3.Timeout(connect=5, read=10))
        return len(response.data) if response.status == 200 else -1

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        sizes = list(pool.map(get, urls))
    seconds = time.perf_counter() - started
    ok = [s for s in sizes if s >= 0]
    with open(result_path, "w") as f:
        json.dump({"urls": len(urls), "ok": len(ok), "bytes": sum(ok), "seconds": seconds,
                   "images_per_s": len(ok) / seconds, "threads": threads}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
