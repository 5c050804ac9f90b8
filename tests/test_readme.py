"""Every command README.md shows exists as shown, without running the expensive thing.

Which text is a command:
  - in ```sh, ```bash, ```shell and ```console blocks, each logical line (backslash continuations
    joined; in console blocks only the lines with a `$ ` prompt, which is dropped), skipping blanks
    and `#` comments; every such line of an sh/bash/shell block must start with one of COMMANDS
    (so a new kind of command cannot slip past unchecked: add it there, with a check);
  - inline code spans that are a command of the same kinds: `python -m X ...`, `make X`.

What is checked:
  - the quickstart block comes first and is `make demo`, `make test`;
  - `make X`: the Makefile has a rule for X;
  - `python -m MODULE ARGS` (also inside `ray job submit ... -- python -m ...`): MODULE imports
    and its `--help` exits 0 and names every `--flag` of ARGS; then ARGS go through the program's
    own parser (its `parse_args` stops the program right after parsing), which must accept them
    and hold each flag under that exact spelling (argparse would take an abbreviation); for the
    programs whose parser comes from a config dataclass (`pipeline.config.load_config`), the whole
    config is loaded as the program would: the `--config` YAML (unknown keys are errors), the
    values' types, the dataclass's `validate`;
  - a flag the prose names in inline code (`--detect-backend`, `--sample-ids FILE`, ...) is
    known to one of the README's python programs (the settings tables name them without a command);
  - `ray ...`: click parses the arguments with Ray's own command;
  - paths: repo paths in commands (configs/..., pipeline/..., anything ending .yaml) exist; an
    input under out/ lies in an output of an earlier command (`make demo` writes the builder's
    default output, `--output DIR` the others); repo paths in inline code and relative links exist.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import re
import runpy
import shlex
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_LANGS = {"sh", "bash", "shell", "console"}
PYTHONS = {"python", "python3", "python3.11"}  # also as a path: .venv/bin/python
COMMANDS = ("make", "ray", *PYTHONS)
REPO_DIRS = ("configs", "pipeline", "train", "demo", "queries", "bench", "docs", "tests")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


@dataclasses.dataclass(frozen=True)
class Command:
    text: str  # as the README shows it, one line
    where: int  # offset in the README, for order
    inline: bool

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    def python_m(self) -> tuple[str, list[str]] | None:
        """(MODULE, ARGS) of the `python -m MODULE ARGS` this command runs, if any."""
        words = self.words
        for i, word in enumerate(words[:-2]):
            if Path(word).name in PYTHONS and words[i + 1] == "-m":
                return words[i + 2], words[i + 3:]
        return None


def _is_command(line: str) -> bool:
    words = line.split()
    return bool(words) and (words[0] in COMMANDS or Path(words[0]).name in PYTHONS)


def readme_commands() -> list[Command]:
    text = README.read_text()
    found: list[Command] = []
    fenced: list[tuple[int, int]] = []
    for block in FENCE.finditer(text):
        fenced.append(block.span())
        lang, body = block.group(1), block.group(2)
        if lang not in SHELL_LANGS:
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = line.strip()
            if lang == "console":
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            found.append(Command(line, block.start(2) + body.find(line.split()[0]), inline=False))
    for span in INLINE.finditer(text):
        if any(start <= span.start() < end for start, end in fenced):
            continue
        code = " ".join(span.group(1).split())
        if re.match(r"(\S*/)?python3?(\.\d+)? -m \S", code) or re.fullmatch(r"make [\w-]+", code):
            found.append(Command(code, span.start(), inline=True))
    return sorted(found, key=lambda c: c.where)


COMMANDS_FOUND = readme_commands()
PYTHON_COMMANDS = [c for c in COMMANDS_FOUND if c.python_m()]


def _id(command: Command) -> str:
    return command.text if len(command.text) < 90 else command.text[:87] + "..."


# --- running a program's parser in this process ---------------------------------------------------

class Parsed(BaseException):  # not an Exception: no `except Exception` in a program's main catches it
    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace):
        super().__init__()
        self.parser, self.namespace = parser, namespace


@dataclasses.dataclass
class Run:
    exit_code: int | None  # None: the parser accepted the arguments and the program was stopped there
    stdout: str
    stderr: str
    parser: argparse.ArgumentParser | None = None
    config_class: type | None = None  # the dataclass, when the parser came from pipeline.config


def run_parser(module: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """`python -m MODULE ARGS`, as far as parsing ARGS: the program's own parser, nothing after it."""
    import pipeline.config

    original_parse = argparse.ArgumentParser.parse_args
    original_build = pipeline.config.build_parser
    config_classes: list[type] = []

    def parse_args(self, args=None, namespace=None):
        raise Parsed(self, original_parse(self, args, namespace))

    def build_parser(cls, description):
        config_classes.append(cls)
        return original_build(cls, description)

    out, err = io.StringIO(), io.StringIO()
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        patch.setattr(pipeline.config, "build_parser", build_parser)
        patch.setattr(sys, "argv", [module, *args])
        patch.chdir(ROOT)
        patch.syspath_prepend(str(ROOT))  # what `python -m` in the repo root puts first on the path
        patch.setenv("COLUMNS", "200")
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore")  # runpy: "found in sys.modules" for a module imported before
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except Parsed as parsed:
                return Run(None, out.getvalue(), err.getvalue(), parsed.parser,
                           config_classes[-1] if config_classes else None)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
                return Run(code, out.getvalue(), err.getvalue())
    pytest.fail(f"python -m {module} {shlex.join(args)} ran to its end without parsing arguments "
                f"with argparse's parse_args: this test cannot check it")


_HELP: dict[str, Run] = {}


def help_text(module: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if module not in _HELP:
        _HELP[module] = run_parser(module, ["--help"], monkeypatch)
    run = _HELP[module]
    assert run.exit_code == 0, f"python -m {module} --help failed ({run.exit_code}): {run.stderr.strip()}"
    return run.stdout


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and a != "--"]


# --- the tests ------------------------------------------------------------------------------------

def test_the_readme_shows_commands():
    assert len(PYTHON_COMMANDS) >= 10, [c.text for c in COMMANDS_FOUND]  # the extraction still finds them


def test_quickstart_comes_first():
    first_block = [c.words for c in COMMANDS_FOUND if not c.inline][:2]
    assert first_block == [["make", "demo"], ["make", "test"]]
    assert COMMANDS_FOUND[0].words == ["make", "demo"]


def test_every_shell_line_is_a_command_this_test_knows():
    text = README.read_text()
    for block in FENCE.finditer(text):
        if block.group(1) in SHELL_LANGS - {"console"}:
            for line in re.sub(r"\\\n\s*", " ", block.group(2)).splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    assert _is_command(line), f"README shell line of an unknown kind (extend COMMANDS): {line}"


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.M))
    for command in COMMANDS_FOUND:
        if command.words[0] == "make":
            for target in command.words[1:]:
                assert target in targets, f"`{command.text}`: the Makefile has no target {target}"


@pytest.mark.parametrize("command", PYTHON_COMMANDS, ids=_id)
def test_python_command(command: Command, monkeypatch: pytest.MonkeyPatch):
    module, args = command.python_m()
    monkeypatch.syspath_prepend(str(ROOT))  # `python -m` from the repo root, wherever pytest runs
    assert importlib.util.find_spec(module) is not None, f"`{command.text}`: no module {module}"
    text = help_text(module, monkeypatch)
    for flag in flags(args):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
            f"`{command.text}`: python -m {module} --help does not know {flag}"
    if "--help" in args or "-h" in args:
        return
    run = run_parser(module, args, monkeypatch)
    assert run.exit_code is None, f"`{command.text}`: its parser refused it: {run.stderr.strip()}"
    for flag in flags(args):
        assert flag in run.parser._option_string_actions, f"`{command.text}`: {flag} is an abbreviation"
    if run.config_class is not None:
        from pipeline.config import ConfigError, load_config

        with monkeypatch.context() as patch:
            patch.chdir(ROOT)
            try:
                load_config(run.config_class, args, "")
            except ConfigError as err:
                pytest.fail(f"`{command.text}`: {err}")


def test_flags_in_the_prose_exist(monkeypatch: pytest.MonkeyPatch):
    known = "\n".join(help_text(module, monkeypatch) for module in sorted({c.python_m()[0] for c in PYTHON_COMMANDS}))
    named = {span.split()[0] for span in INLINE.findall(README.read_text()) if re.match(r"--[a-z]", span)}
    assert len(named) > 30  # the settings tables
    unknown = sorted(f for f in named if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", known))
    assert not unknown, f"README names flags no program of its commands has: {unknown}"


def test_ray_commands_parse():
    from ray.scripts.scripts import cli

    ray_commands = [c for c in COMMANDS_FOUND if c.words[0] == "ray"]
    assert ray_commands
    for command in ray_commands:
        group, words = cli, command.words[1:]
        while hasattr(group, "commands"):
            assert words and words[0] in group.commands, f"`{command.text}`: no ray command {words[:1]}"
            group, words = group.commands[words[0]], words[1:]
        group.make_context(command.words[0], list(words))  # raises click's usage error


def _repo_path(word: str) -> bool:
    return "://" not in word and (word.split("/")[0] in REPO_DIRS or word.endswith((".yaml", ".yml")))


def test_paths_in_commands_exist():
    from pipeline.build_config import BuildConfig

    produced = [BuildConfig().output]  # what `make demo` writes
    for command in COMMANDS_FOUND:
        words = [w.split("=", 1)[-1] for w in command.words]
        outputs = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--output"]
        for i, word in enumerate(words):
            if _repo_path(word):
                assert (ROOT / word).exists(), f"`{command.text}`: {word} does not exist"
            elif word.startswith("out/") and word not in outputs:
                assert any(word == p or word.startswith(p.rstrip("/") + "/") for p in produced), \
                    f"`{command.text}`: no earlier command in the README writes {word}"
        produced += outputs


def test_named_files_exist():
    text = README.read_text()
    for span in INLINE.finditer(text):
        word = span.group(1).strip()
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)+/?", word) and word.split("/")[0] in REPO_DIRS + ("cluster.yaml",):
            assert (ROOT / word).exists(), f"README names {word}, which does not exist"
        elif word in ("cluster.yaml", "Makefile", "pyproject.toml", "requirements.lock"):
            assert (ROOT / word).exists(), f"README names {word}, which does not exist"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
