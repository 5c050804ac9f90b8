"""Settings of the builder: BuildConfig's defaults, then a YAML file, then CLI flags (pipeline.config,
pipeline.build_config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError, load_config


def load(*argv: str) -> BuildConfig:
    return load_config(BuildConfig, list(argv), "test")


def yaml_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


# --- defaults -----------------------------------------------------------------------------------

def test_no_flags_gives_the_dataclass_defaults() -> None:
    assert load() == BuildConfig()


def test_documented_defaults() -> None:
    config = load()
    assert config.input == [] and config.output == "out/demo"
    assert (config.url_col, config.caption_col, config.sample_id_col) == ("URL", "TEXT", "SAMPLE_ID")
    assert config.shard_size is None  # auto: source.auto_shard_size
    assert config.detector == "retinaface"
    assert config.min_face_score == 0.9 and config.min_face_size == 32
    assert config.image_max_side == 512
    assert config.progress is True and config.retry_failed is False and config.respect_optout is True


def test_list_defaults_are_not_shared_between_configs() -> None:
    first, second = BuildConfig(), BuildConfig()
    first.input.append("x.parquet")
    assert second.input == []


# --- YAML, then flags ---------------------------------------------------------------------------

def test_yaml_values_override_defaults(tmp_path: Path) -> None:
    config = load("--config", yaml_file(tmp_path, "shard_size: 50\noutput: out/x\nmin_similarity: 0.3\n"))
    assert config.shard_size == 50 and config.output == "out/x" and config.min_similarity == 0.3
    assert config.detector == "retinaface"  # untouched keys keep their default


def test_flags_override_yaml(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "shard_size: 50\noutput: out/yaml\n")
    config = load("--config", path, "--shard-size", "7")
    assert config.shard_size == 7
    assert config.output == "out/yaml"


def test_flag_before_config_still_wins(tmp_path: Path) -> None:
    config = load("--shard-size", "7", "--config", yaml_file(tmp_path, "shard_size: 50\n"))
    assert config.shard_size == 7


def test_list_flag_replaces_yaml_list(tmp_path: Path) -> None:
    config = load("--config", yaml_file(tmp_path, "input: [a.parquet, b.parquet]\n"), "--input", "c.parquet")
    assert config.input == ["c.parquet"]


def test_yaml_scalar_for_a_list_key_becomes_a_one_item_list(tmp_path: Path) -> None:
    assert load("--config", yaml_file(tmp_path, "drop_nsfw: NSFW\n")).drop_nsfw == ["NSFW"]


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert load("--config", yaml_file(tmp_path, "")) == BuildConfig()


def test_yaml_null_for_optional_key_is_none(tmp_path: Path) -> None:
    assert load("--config", yaml_file(tmp_path, "min_similarity: null\n")).min_similarity is None


# --- flags --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, field", [("--input", "input"), ("--allow-host", "allow_host"),
                                         ("--drop-nsfw", "drop_nsfw")])
def test_list_flags_are_repeatable(flag: str, field: str) -> None:
    config = load(flag, "one:1", flag, "two:2")
    assert getattr(config, field) == ["one:1", "two:2"]


def test_no_prefix_turns_booleans_off(tmp_path: Path) -> None:
    config = load("--config", yaml_file(tmp_path, "retry_failed: true\n"), "--no-progress", "--no-respect-optout",
                  "--no-retry-failed")
    assert config.progress is False and config.respect_optout is False and config.retry_failed is False


def test_positive_boolean_flag_overrides_yaml_false(tmp_path: Path) -> None:
    config = load("--config", yaml_file(tmp_path, "progress: false\n"), "--progress", "--retry-failed")
    assert config.progress is True and config.retry_failed is True


def test_flag_strings_are_coerced_to_field_types() -> None:
    config = load("--shard-size", "25", "--connect-timeout", "2", "--min-similarity", "0.28",
                  "--detect-gpus", "0.5")
    assert config.shard_size == 25 and type(config.shard_size) is int
    assert config.connect_timeout == 2.0 and type(config.connect_timeout) is float
    assert config.min_similarity == pytest.approx(0.28)
    assert config.detect_gpus == 0.5


@pytest.mark.parametrize("text, expected", [("yes", True), ("1", True), ("false", False), ("No", False)])
def test_yaml_string_booleans(tmp_path: Path, text: str, expected: bool) -> None:
    assert load("--config", yaml_file(tmp_path, f"progress: '{text}'\n")).progress is expected


def test_help_lists_every_field(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load("--help")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    missing = [f.name for f in dataclasses.fields(BuildConfig) if "--" + f.name.replace("_", "-") not in text]
    assert missing == []
    assert "--config" in text and "--no-progress" in text


# --- errors -------------------------------------------------------------------------------------

def test_unknown_yaml_key_names_key_and_file(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "shard_size: 5\nshard_sise: 6\n")
    with pytest.raises(ConfigError) as err:
        load("--config", path)
    assert "shard_sise" in str(err.value) and path in str(err.value)


@pytest.mark.parametrize("text, key", [("shard_size: abc\n", "shard_size"), ("min_face_score: high\n", "min_face_score"),
                                       ("progress: maybe\n", "progress"), ("min_face_size: null\n", "min_face_size")])
def test_wrong_yaml_type_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load("--config", yaml_file(tmp_path, text))


def test_wrong_flag_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match="'min_face_size'"):
        load("--min-face-size", "big")


@pytest.mark.parametrize("text", ["shard_size: 2.5\n", "shard_size: true\n", "output: {a: 1}\n",
                                  "output: [a, b]\n", "progress: 5\n"])
def test_yaml_value_of_another_type_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=f"'{text.split(':')[0]}'"):
        load("--config", yaml_file(tmp_path, text))


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read config file") as err:
        load("--config", path)
    assert path in str(err.value)


def test_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = yaml_file(tmp_path, "input: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load("--config", path)
    assert path in str(err.value)
    assert "\n" not in str(err.value)  # one line for the user


def test_yaml_that_is_not_a_mapping_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load("--config", yaml_file(tmp_path, "- shard_size\n- 5\n"))


# --- validate() ---------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--allow-host", "localhost"], "HOST:PORT"),
    (["--allow-host", "localhost:"], "HOST:PORT"),
    (["--allow-host", "localhost:http"], "HOST:PORT"),
    (["--shard-size", "0"], "shard_size"),
    (["--detect-batch-size", "0"], "detect_batch_size"),
    (["--threads-per-task", "0"], "threads_per_task"),
    (["--url-col", ""], "url_col"),
    (["--caption-col", ""], "caption_col"),
])
def test_validate_rejects(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(*argv)


def test_validate_accepts_host_with_port() -> None:
    assert load("--allow-host", "127.0.0.1:8080", "--allow-host", "images.local:443").allow_host == [
        "127.0.0.1:8080", "images.local:443"]


def test_unknown_detector_in_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="detector"):
        load("--config", yaml_file(tmp_path, "detector: yolo\n"))


def test_validate_rejects_allow_host_without_host() -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        load("--allow-host", "8080")


def test_source_columns_skip_empty_names() -> None:
    columns = load("--url-col", "link", "--license-col", "", "--nsfw-col", "").source_columns()
    assert columns["url"] == "link"
    assert "license" not in columns and "nsfw" not in columns
    assert columns["caption"] == "TEXT"


def test_a_preset_fills_what_flags_leave_out() -> None:
    config = load("--preset", "coyo700m", "--caption-col", "alt_text")
    assert (config.url_col, config.caption_col, config.similarity_col) == ("url", "alt_text", "clip_similarity_vitb32")
    assert config.license_col == ""  # COYO has none


def test_an_unknown_preset_is_refused() -> None:
    with pytest.raises(ConfigError, match="preset must be one of laion400m"):
        BuildConfig(preset="laion9b").validate()
