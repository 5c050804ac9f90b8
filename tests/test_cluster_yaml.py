"""cluster.yaml (the Ray cluster-launcher config for AWS) against Ray's own schema and this project.

What `ray up cluster.yaml` does first, in ray.autoscaler._private.commands._bootstrap_config:
  1. prepare_config: merge with the AWS defaults.yaml, prepend setup_commands to the head's and
     workers' setup lists, check the docker section, fill per-type min/max_workers;
  2. the AWS provider fills each node type's resources from EC2's instance catalogue (boto3;
     a failure there is only a warning);
  3. validate_config: Ray's ray-schema.json (jsonschema), then head_node_type is one of the
     node types and the sum of min_workers fits in max_workers;
  4. the AWS provider's bootstrap (IAM role, key pair, subnets, security group, AMI), which
     calls AWS.
Steps 1 and 3 are plain Ray code and run here exactly as `ray up` runs them: for provider
type aws, prepare_config only reads Ray's bundled defaults.yaml, so neither boto3 nor AWS
credentials are needed. Steps 2 and 4 need boto3 and an AWS account and are not covered: in
particular the keys inside node_config (EC2's RunInstances parameters) are free-form for
Ray's schema and are checked by AWS only at launch.

On top of the schema, the project's own expectations: every node installs the project the
way the Makefile does (requirements.lock with --no-deps, then the project editable), every
node type runs that same setup (GPU nodes detect with the lock's torch: none installs
onnxruntime-gpu), pins match the lock, there is a GPU node type and a spot CPU worker type,
and the head takes no tasks.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
LOCK = ROOT / "requirements.lock"
VENV_RAY = "laion-face/.venv/bin"
GPU_FAMILY = re.compile(r"^(g|p)\d")  # EC2 accelerated families with NVIDIA GPUs: g4dn, g5, g6, p4d, p5...


def load_raw() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


def ray_validate(raw: dict[str, Any]) -> dict[str, Any]:
    """Ray's own checks (steps 1 and 3 above) on a copy; returns the config Ray would use."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def segments(command: str) -> list[list[str]]:
    """A shell command split into simple commands at &&, ||, ;, | and parentheses."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set("();<>|&"):
            out.append([])
        else:
            out[-1].append(token)
    return [seg for seg in out if seg]


def pip_calls(commands: list[str]) -> list[tuple[int, str, list[str]]]:
    """(position, action, arguments) of every `pip install/uninstall` in a command list, in order."""
    calls = []
    for command in commands:
        for seg in segments(command):
            if len(seg) >= 2 and Path(seg[0]).name in ("pip", "pip3") and seg[1] in ("install", "uninstall"):
                calls.append((len(calls), seg[1], seg[2:]))
    return calls


def requirements(args: list[str]) -> list[str]:
    """The positional package specifiers of a pip install (options and their values dropped)."""
    takes_value = {"-r", "--requirement", "-e", "--editable", "-c", "--constraint", "-i", "--index-url"}
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in takes_value:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def effective_setup_commands(prepared: dict[str, Any], node_type: str) -> list[str]:
    """What Ray runs on a node of this type: for the head, setup_commands + head_setup_commands
    (merged by prepare_config); for a worker, its own worker_setup_commands if it has them (they
    replace the global lists, see autoscaler._get_node_type_specific_fields), else
    setup_commands + worker_setup_commands."""
    if node_type == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    return prepared["available_node_types"][node_type].get("worker_setup_commands", prepared["worker_setup_commands"])


def has_gpu(node: dict[str, Any]) -> bool:
    return node["resources"].get("GPU", 0) >= 1


# --- the project's expectations, as functions so that the negative tests can reuse them ---


def check_install(prepared: dict[str, Any]) -> None:
    pins = lock_versions()
    for name, node in prepared["available_node_types"].items():
        commands = effective_setup_commands(prepared, name)
        calls = pip_calls(commands)
        lock = [i for i, action, args in calls
                if action == "install" and "requirements.lock" in args and "--no-deps" in args
                and args[args.index("requirements.lock") - 1] in ("-r", "--requirement")]
        assert lock, f"{name}: no `pip install --no-deps -r requirements.lock` in {commands}"
        editable = [i for i, action, args in calls
                    if action == "install" and "--no-deps" in args
                    and any(a in ("-e", "--editable") and b == "." for a, b in zip(args, args[1:]))]
        assert editable and editable[-1] > lock[0], f"{name}: no `pip install --no-deps -e .` after the lock"
        assert any(seg[:2] == ["cd", "~/laion-face"] for c in commands for seg in segments(c)), \
            f"{name}: setup never enters ~/laion-face, where file_mounts puts the project"

        for i, action, args in calls:
            for spec in requirements(args) if action == "install" else []:
                if spec == "pip":  # `pip install --upgrade pip`, as the Makefile does
                    continue
                m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)", spec)
                assert m, f"{name}: unpinned requirement {spec!r}"
                package = canonical(m.group(1))
                if package in pins:
                    assert m.group(3) == pins[package], \
                        f"{name}: {spec} but requirements.lock has {package}=={pins[package]}"


def check_same_setup(prepared: dict[str, Any]) -> None:
    """GPU nodes detect with torch, which the lock holds: no node type installs onnxruntime-gpu, and
    every node type, GPU ones included, runs the same setup (the lock install, see check_install)."""
    setups = {name: effective_setup_commands(prepared, name) for name in prepared["available_node_types"]}
    for name, commands in setups.items():
        installed = [canonical(re.split(r"[\[=<>!~ ]", spec, maxsplit=1)[0])
                     for _, action, args in pip_calls(commands) if action == "install" for spec in requirements(args)]
        assert "onnxruntime-gpu" not in installed, \
            f"{name}: installs onnxruntime-gpu (GPU nodes detect with the lock's torch)"
    reference = prepared["head_node_type"]
    for name, commands in setups.items():
        assert commands == setups[reference], \
            f"{name}: not the same setup as {reference} (every node type runs the global setup_commands)"


def check_node_types(prepared: dict[str, Any]) -> None:
    types = prepared["available_node_types"]
    head_name = prepared["head_node_type"]
    head = types[head_name]
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU 0 so that no task runs on it"
    assert head["max_workers"] == 0

    workers = {name: node for name, node in types.items() if name != head_name}
    for name, node in types.items():
        instance = node["node_config"]["InstanceType"]
        assert has_gpu(node) == bool(GPU_FAMILY.match(instance)), \
            f"{name}: GPU resource and instance type {instance} disagree"
        assert node["node_config"].get("ImageId", "").startswith("ami-"), \
            f"{name}: no ImageId (Ray would fall back to an old Ubuntu 18.04 DLAMI)"
    assert len({node["node_config"]["ImageId"] for node in types.values()}) == 1, "one AMI for all node types"

    for name, node in workers.items():
        assert node["min_workers"] == 0, f"{name}: workers scale from zero"
        assert 1 <= node["max_workers"] <= prepared["max_workers"], name
        assert "IamInstanceProfile" in node["node_config"], f"{name}: workers write to S3 and need a profile"

    gpu_types = [name for name, node in workers.items() if has_gpu(node)]
    assert gpu_types, "no GPU worker type (detection, training)"
    spot_cpu = [name for name, node in workers.items()
                if not has_gpu(node) and node["resources"].get("CPU", 0) > 0
                and node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot_cpu, "no spot CPU worker type (downloads)"


def check_cluster(prepared: dict[str, Any]) -> None:
    assert prepared["cluster_name"] == "laion-face"
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    assert prepared["file_mounts"] == {"~/laion-face": "."}
    assert ".venv" in prepared["rsync_exclude"], "the local .venv must not be synced to the nodes"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts and all(VENV_RAY in c for c in prepared[key]), f"{key}: must use the venv's ray"
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c
               for c in prepared["head_start_ray_commands"]), "the head must run the autoscaler"


# --- tests ---


def test_cluster_yaml_passes_rays_validation_and_project_checks():
    raw = load_raw()
    prepared = ray_validate(raw)  # raises jsonschema.ValidationError / ValueError if invalid
    check_cluster(prepared)
    check_node_types(prepared)
    check_install(prepared)
    check_same_setup(prepared)


def _set(path: str, value: Any):
    def corrupt(config: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    return corrupt


@pytest.mark.parametrize(
    ("corrupt", "error"),
    [
        pytest.param(_set("max_worker", 3), jsonschema.ValidationError, id="unknown-top-level-key"),
        pytest.param(_set("max_workers", "42"), jsonschema.ValidationError, id="max_workers-not-integer"),
        pytest.param(_set("idle_timeout_minutes", -1), jsonschema.ValidationError, id="negative-idle-timeout"),
        pytest.param(_set("available_node_types.detect.resources", {"CPU": 4, "GPU": 0.5}),
                     jsonschema.ValidationError, id="fractional-resource"),
        pytest.param(_set("available_node_types.download.min_worker", 1),
                     jsonschema.ValidationError, id="unknown-node-type-key"),
        pytest.param(_set("setup_commands", "pip install -r requirements.lock"),
                     (jsonschema.ValidationError, TypeError), id="setup_commands-not-a-list"),
        pytest.param(_set("head_node_type", "ray.head.default"), ValueError, id="head-type-not-defined"),
        pytest.param(_set("available_node_types.download.min_workers", 43), ValueError,
                     id="min_workers-exceed-max_workers"),
    ],
)
def test_ray_validation_rejects_a_corrupted_copy(corrupt, error):
    config = load_raw()
    corrupt(config)
    with pytest.raises(error):
        ray_validate(config)


def test_project_checks_reject_a_corrupted_copy():
    """Valid for Ray, wrong for this project: each must trip the project checks."""
    prepared = ray_validate(load_raw())

    head = copy.deepcopy(prepared)
    head["available_node_types"][head["head_node_type"]]["resources"]["CPU"] = 8
    with pytest.raises(AssertionError, match="CPU 0"):
        check_node_types(head)

    no_spot = copy.deepcopy(prepared)
    for node in no_spot["available_node_types"].values():
        node["node_config"].pop("InstanceMarketOptions", None)
    with pytest.raises(AssertionError, match="spot"):
        check_node_types(no_spot)

    with_deps = copy.deepcopy(prepared)
    with_deps["head_setup_commands"] = [c.replace("--no-deps -r", "-r") for c in with_deps["head_setup_commands"]]
    with pytest.raises(AssertionError, match="requirements.lock"):
        check_install(with_deps)

    stale_pin = copy.deepcopy(prepared)
    stale_pin["head_setup_commands"] = [re.sub(r"ray\[default\]==[^\s\"]+", "ray[default]==1.0.0", c)
                                        for c in prepared["head_setup_commands"]]
    assert stale_pin["head_setup_commands"] != prepared["head_setup_commands"]
    with pytest.raises(AssertionError, match="requirements.lock has ray=="):
        check_install(stale_pin)

    # The swap the GPU node types used to make, back on `detect`: the lock install is still
    # there (check_install passes), but the node installs onnxruntime-gpu.
    gpu_ort = copy.deepcopy(prepared)
    gpu_ort["available_node_types"]["detect"]["worker_setup_commands"] = prepared["worker_setup_commands"] + [
        "cd ~/laion-face && .venv/bin/pip uninstall -y -q onnxruntime && "
        f".venv/bin/pip install -q --no-deps --force-reinstall onnxruntime-gpu=={lock_versions()['onnxruntime']}"]
    check_install(gpu_ort)
    with pytest.raises(AssertionError, match="detect: installs onnxruntime-gpu"):
        check_same_setup(gpu_ort)

    # A GPU node type with a setup of its own, without onnxruntime-gpu, is still a different setup.
    own_setup = copy.deepcopy(prepared)
    own_setup["available_node_types"]["train"]["worker_setup_commands"] = [
        *prepared["worker_setup_commands"], "cd ~/laion-face && .venv/bin/pip install -q nvitop==1.5.0"]
    check_install(own_setup)
    with pytest.raises(AssertionError, match="train: not the same setup"):
        check_same_setup(own_setup)
