"""The embedded demo build: what `python -m pipeline.build_laion_face` runs with no --input.

Generates a LAION-format parquet of a few hundred rows (real photos, broken links, traps;
see data.py), serves its images from a loopback server started here, runs the full
pipeline into `out/demo` (or --output), and stops the server. The server's port is kept in
OUT/demo_input/server.json so that a rerun (say, after a kill) sees the same URLs and resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from demo.data import write_demo_input
from demo.server import ImageServer
from pipeline.build import build
from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError

DEMO_ROWS = 300
# Settings the demo changes from the defaults (only where the user kept the default): units
# small enough to run in parallel, and patience for the stalled links short enough to finish
# in seconds.
DEMO_SETTINGS = {"shard_size": 50, "read_timeout": 2.0, "url_deadline": 6.0, "retry_backoff": 0.2}


def demo_config(config: BuildConfig, input_path: str, port: int) -> BuildConfig:
    defaults = BuildConfig()
    changes = {k: v for k, v in DEMO_SETTINGS.items() if getattr(config, k) == getattr(defaults, k)}
    return dataclasses.replace(config, input=[input_path], allow_host=[*config.allow_host, f"127.0.0.1:{port}"],
                               **changes)


def build_demo(config: BuildConfig, rows: int = DEMO_ROWS) -> dict:
    """Serve the demo images, build them into config.output, stop the server; returns the stats."""
    if "://" in config.output:
        raise ConfigError("the demo builds into a local directory; give --output a local path")
    folder = Path(config.output) / "demo_input"
    folder.mkdir(parents=True, exist_ok=True)
    state = folder / "server.json"
    port = json.loads(state.read_text())["port"] if state.exists() else 0
    try:
        server = ImageServer(port=port)
    except OSError as err:
        raise ConfigError(f"demo server cannot listen on 127.0.0.1:{port} again ({err.strerror}); "
                          f"free the port or delete {config.output}") from None
    with server:
        state.write_text(json.dumps({"port": server.port}))
        parquet = folder / "laion_demo.parquet"
        tmp = folder / "laion_demo.parquet.tmp"
        write_demo_input(str(tmp), server, num_rows=rows)  # deterministic: same rows, same URLs
        os.replace(tmp, parquet)
        return build(demo_config(config, str(parquet), server.port))
