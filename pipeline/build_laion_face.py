"""Build LAION-FACE: LAION metadata parquet -> face-filtered webdataset shards + Parquet metadata.

    python -m pipeline.build_laion_face --input 'laion400m-meta/*.parquet' --output out/laion-face
    python -m pipeline.build_laion_face            # no --input: builds the embedded demo into out/demo

The command line only: the build itself is `pipeline.build.build`, and the demo is the `demo`
package, which serves its own input and calls that same function. This module is the one place
that knows both, so imports go one way: this CLI -> demo -> pipeline.build -> the stages.
Rerunning the same command after a kill finishes the job.
"""

from __future__ import annotations

import logging
import re
import sys

import ray

from demo.build import build_demo
from pipeline.build import build
from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError, load_config
from pipeline.source import InputError
from pipeline.storage import StorageError


def main(argv: list[str] | None = None) -> int:
    quiet_ray_data_console()
    try:
        config = load_config(BuildConfig, argv, __doc__.split("\n\n")[0])
        if config.input:
            build(config)
        else:
            build_demo(config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"error: {err}; nothing half-written is left: rerun the same command to go on", file=sys.stderr)
        return 1
    except (InputError, ray.exceptions.RayTaskError) as err:  # in a Ray task: its cause, not Ray's traceback
        message = task_failure(err) if isinstance(err, ray.exceptions.RayTaskError) else str(err)
        print(f"error: {message}; finished units are kept: rerun the same command to go on", file=sys.stderr)
        return 1
    return 0


def task_failure(err: ray.exceptions.RayTaskError) -> str:
    """The first exception line of a failed task's text: the root cause, as Ray's chained traceback
    lists it first (Ray Data wraps the exception itself in a UserCodeException that drops it)."""
    for line in str(err).splitlines():
        found = re.match(r"(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)", line)
        if found and found[1] != "UserCodeException":
            return found[2] if found[1] == "InputError" else f"{found[1]}: {found[2]}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def quiet_ray_data_console() -> None:
    """Ray Data repeats a failed task's traceback on the console, and warns there about its own
    progress bars; this command prints its own progress, summary and one error line. Everything
    still goes to Ray Data's log file (the Ray session's logs/ray-data/)."""
    for handler in logging.getLogger("ray.data").handlers:
        if getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
            handler.setLevel(logging.CRITICAL)


if __name__ == "__main__":
    sys.exit(main())
