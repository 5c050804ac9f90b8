"""Session-wide fixtures: one local Ray instance, one loopback image server, one real demo build."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local test cluster; subprocesses join it by address
# torch.compile's CPU kernels are cached without ATEN_CPU_CAPABILITY in the key: a kernel vectorised
# under avx512 fails to build under `default` (at::vec undeclared). One cache per capability.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"torchinductor_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))


@pytest.fixture(scope="session")
def ray_address() -> str:
    """Start Ray once for the whole session (ray.init costs ~5 s); builds in this process reuse it.
    Ray Data as a build sets it up, so that a test of a stage alone runs it as a build does."""
    import ray

    from pipeline.build import configure_ray_data

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    configure_ray_data(progress_bars=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def built_output(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded demo, built for real: loopback server, real detector, real Ray."""
    from pipeline.build_config import BuildConfig
    from demo.build import build_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    build_demo(BuildConfig(output=str(out), progress=False))
    return out
