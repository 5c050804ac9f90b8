"""The source stage (pipeline.source): inputs, row slices, unit numbering, keys and the row-level filters,
on real parquet files written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.build_config import LAION_COLUMNS, BuildConfig
from pipeline.config import ConfigError
from pipeline.schema import Sample, make_key
from pipeline.source import (Unit, check_inputs, expand_inputs, input_rows, load_allowlist, plan_units, read_rows,
                             read_unit, register_inputs)
from pipeline.storage import Output


def laion_table(n: int, first_id: int = 1000, **overrides: list) -> pa.Table:
    """n LAION-400M-like rows; keyword arguments replace whole columns."""
    columns = {
        "SAMPLE_ID": pa.array([first_id + i for i in range(n)], pa.int64()),
        "URL": [f"https://img.example.com/{i}.jpg" for i in range(n)],
        "TEXT": [f"a photo of person number {i}" for i in range(n)],
        "HEIGHT": pa.array([480] * n, pa.int32()),
        "WIDTH": pa.array([640] * n, pa.int32()),
        "LICENSE": ["?"] * n,
        "NSFW": ["UNLIKELY"] * n,
        "similarity": pa.array([0.33] * n, pa.float64()),
    }
    columns.update(overrides)
    return pa.table(columns)


def write_parquet(path: Path, table: pa.Table, row_group_size: int | None = None) -> str:
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def whole_file(path: str, rows: int, file_index: int = 0) -> Unit:
    return Unit(unit=0, file_index=file_index, path=path, start=0, stop=rows)


def read_all(path: str, rows: int, config: BuildConfig | None = None, allowlist: np.ndarray | None = None,
             url_duplicates: dict[str, str] | None = None) -> list[Sample]:
    return read_unit(whole_file(path, rows), config or BuildConfig(), allowlist, url_duplicates or {})


# --- inputs -------------------------------------------------------------------------------------

def test_expand_inputs_globs_sorted_and_deduplicated(tmp_path: Path) -> None:
    for name in ("b.parquet", "a.parquet", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    files = expand_inputs([str(tmp_path / "*.parquet"), str(tmp_path / "a.parquet")])
    assert files == [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]


def test_expand_inputs_missing_path_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(ConfigError, match="not found") as err:
        expand_inputs([missing])
    assert missing in str(err.value)


def test_expand_inputs_glob_without_match_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        expand_inputs([str(tmp_path / "*.parquet")])


def test_check_inputs_returns_the_columns_read_and_input_rows_the_row_counts(tmp_path: Path) -> None:
    a = write_parquet(tmp_path / "a.parquet", laion_table(7))
    b = write_parquet(tmp_path / "b.parquet", laion_table(3))
    columns = check_inputs([a, b], BuildConfig())
    assert input_rows([a, b]) == {a: 7, b: 3}
    assert columns == {name: theirs for name, theirs in LAION_COLUMNS.items() if theirs}


@pytest.mark.parametrize("dropped, flag", [("TEXT", "--caption-col"), ("URL", "--url-col")])
def test_check_inputs_missing_column_names_file_column_and_flag(tmp_path: Path, dropped: str, flag: str) -> None:
    path = write_parquet(tmp_path / "a.parquet", laion_table(2).drop_columns([dropped]))
    with pytest.raises(ConfigError) as err:
        check_inputs([path], BuildConfig())
    message = str(err.value)
    assert path in message and f"'{dropped}'" in message and flag in message and "required" in message


def test_only_the_url_and_the_caption_are_required(tmp_path: Path) -> None:
    """A file with SAMPLE_ID, URL and TEXT only is read, the other fields null; ids stay the file's."""
    path = write_parquet(tmp_path / "a.parquet", laion_table(3).select(["SAMPLE_ID", "URL", "TEXT"]))
    columns = check_inputs([path], BuildConfig())
    assert input_rows([path]) == {path: 3} and columns == {"sample_id": "SAMPLE_ID", "url": "URL", "caption": "TEXT"}
    samples = read_all(path, 3, BuildConfig().with_columns(columns))
    assert [s.sample_id for s in samples] == [1000, 1001, 1002]
    assert {(s.license, s.nsfw, s.similarity) for s in samples} == {(None, None, None)}
    assert all(s.pending for s in samples)


@pytest.mark.parametrize("flags, field, column", [
    ({"min_image_side": 64}, "--min-image-side", "WIDTH"),
    ({"min_similarity": 0.3}, "--min-similarity", "similarity"),
    ({"drop_nsfw": ["NSFW"]}, "--drop-nsfw", "NSFW"),
    ({"max_nsfw_score": 0.5}, "--max-nsfw-score", ""),
])
def test_a_filter_needs_the_column_it_reads(tmp_path: Path, flags: dict, field: str, column: str) -> None:
    path = write_parquet(tmp_path / "a.parquet", laion_table(2).select(["URL", "TEXT"]))
    with pytest.raises(ConfigError) as err:
        check_inputs([path], BuildConfig(**flags))
    message = str(err.value)
    assert f"read by {field}" in message
    assert (f"'{column}'" in message and path in message) if column else "--nsfw-score-col is ''" in message


def test_an_allowlist_needs_a_sample_id_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", laion_table(2))
    with pytest.raises(ConfigError, match="--sample-id-col is '' but the sample_id column is read by --sample-ids"):
        check_inputs([path], BuildConfig(sample_ids="ids.txt", sample_id_col=""))


def test_a_file_without_sample_ids_gets_the_ids_of_its_keys(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", pa.table({"url": ["https://a.example/1.jpg"] * 2, "caption": ["a", "b"]}))
    config = BuildConfig(preset="cc12m")
    columns = check_inputs([path], config)
    assert columns == {"url": "url", "caption": "caption"}
    samples = read_unit(Unit(0, 3, path, 0, 2), config.with_columns(columns), None, {})
    assert [s.sample_id for s in samples] == [int(make_key(3, 0)), int(make_key(3, 1))]
    assert {s.caption for s in samples} == {"a", "b"}


def test_column_names_match_whatever_their_case(tmp_path: Path) -> None:
    table = laion_table(1).rename_columns(["sample_id", "url", "text", "height", "width", "license", "nsfw", "Similarity"])
    path = write_parquet(tmp_path / "a.parquet", table)
    columns = check_inputs([path], BuildConfig())
    assert columns["url"] == "url" and columns["caption"] == "text" and columns["similarity"] == "Similarity"


def test_inputs_with_different_columns_are_refused_together(tmp_path: Path) -> None:
    a = write_parquet(tmp_path / "a.parquet", laion_table(2))
    b = write_parquet(tmp_path / "b.parquet", laion_table(2).drop_columns(["LICENSE"]))
    with pytest.raises(ConfigError, match="other columns than"):
        check_inputs([a, b], BuildConfig())


@pytest.mark.parametrize("preset, table, expected", [
    ("coyo700m", {"id": [7], "url": ["https://a.example/1.jpg"], "text": ["t"], "width": [640], "height": [480],
                  "clip_similarity_vitb32": [0.31], "nsfw_score_opennsfw2": [0.02], "watermark_score": [0.1]},
     {"sample_id": "id", "url": "url", "caption": "text", "width": "width", "height": "height",
      "similarity": "clip_similarity_vitb32", "nsfw_score": "nsfw_score_opennsfw2"}),
    ("datacomp", {"uid": ["00a1"], "url": ["https://a.example/1.jpg"], "text": ["t"], "original_width": [640],
                  "original_height": [480], "clip_b32_similarity_score": [0.31], "clip_l14_similarity_score": [0.25]},
     {"url": "url", "caption": "text", "width": "original_width", "height": "original_height",
      "similarity": "clip_b32_similarity_score"}),
    ("relaion", {"URL": ["https://a.example/1.jpg"], "TEXT": ["t"], "WIDTH": [640], "HEIGHT": [480],
                 "similarity": [0.31], "punsafe": [0.01], "pwatermark": [0.2]},
     {"url": "URL", "caption": "TEXT", "width": "WIDTH", "height": "HEIGHT", "similarity": "similarity",
      "nsfw_score": "punsafe"}),
])
def test_presets_read_their_releases_columns(tmp_path: Path, preset: str, table: dict, expected: dict) -> None:
    path = write_parquet(tmp_path / "a.parquet", pa.table(table))
    config = BuildConfig(preset=preset)
    columns = check_inputs([path], config)
    assert columns == expected
    [sample] = read_all(path, 1, config.with_columns(columns))
    assert sample.pending and sample.url == "https://a.example/1.jpg" and sample.caption == "t"


def test_datacomp_preset_applies_laions_clip_threshold_unless_told_otherwise() -> None:
    assert BuildConfig(preset="datacomp").min_similarity == 0.28
    assert BuildConfig(preset="datacomp", min_similarity=0.2).min_similarity == 0.2
    assert BuildConfig(preset="coyo700m").min_similarity is None


def test_max_nsfw_score_drops_scores_above_it_and_unknown_ones(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", laion_table(3, punsafe=[0.1, 0.9, None]))
    config = BuildConfig(nsfw_score_col="punsafe", max_nsfw_score=0.5)
    columns = check_inputs([path], config)
    samples = read_all(path, 3, config.with_columns(columns))
    assert [(s.status, s.reason) for s in samples[1:]] == [("filtered_metadata", "NSFW score 0.9 > 0.5"),
                                                           ("filtered_metadata", "no NSFW score")]
    assert samples[0].pending


def test_check_inputs_refuses_a_file_that_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    path.write_text("SAMPLE_ID,URL\n1,http://x\n")
    with pytest.raises(ConfigError, match="cannot read parquet"):
        check_inputs([str(path)], BuildConfig())


def test_column_remapping(tmp_path: Path) -> None:
    table = pa.table({"link": ["https://a.example/1.jpg"], "alt": ["hello"]})
    path = write_parquet(tmp_path / "other.parquet", table)
    config = BuildConfig(url_col="link", caption_col="alt")
    columns = check_inputs([path], config)
    assert (input_rows([path]), columns) == ({path: 1}, {"url": "link", "caption": "alt"})
    [sample] = read_all(path, 1, config.with_columns(columns))
    assert (sample.url, sample.caption, sample.nsfw) == ("https://a.example/1.jpg", "hello", None)
    assert sample.pending


# --- row slices, units, keys --------------------------------------------------------------------

@pytest.mark.parametrize("start, stop", [(0, 4), (3, 11), (4, 8), (9, 23), (22, 23), (0, 23)])
def test_read_rows_returns_exactly_the_slice_across_row_groups(tmp_path: Path, start: int, stop: int) -> None:
    path = write_parquet(tmp_path / "a.parquet", laion_table(23), row_group_size=4)
    assert pq.ParquetFile(path).num_row_groups == 6
    ids = read_rows(path, start, stop, ["SAMPLE_ID"])["SAMPLE_ID"].to_pylist()
    assert ids == [1000 + i for i in range(start, stop)]


def test_plan_units_slices_every_row_once() -> None:
    units = plan_units([{"path": "a", "index": 0, "rows": 25, "first_unit": 0},
                        {"path": "b", "index": 1, "rows": 10, "first_unit": 3}], 10)
    assert [(u.unit, u.path, u.start, u.stop) for u in units] == [
        (0, "a", 0, 10), (1, "a", 10, 20), (2, "a", 20, 25), (3, "b", 0, 10)]


def test_unit_numbers_stay_stable_when_a_file_is_added(tmp_path: Path) -> None:
    output = Output(str(tmp_path))
    before = plan_units(*register_inputs(output, {"b.parquet": 25}, BuildConfig(shard_size=10)))
    # a later run adds a file that sorts first: the earlier file keeps its number and its units
    after = plan_units(*register_inputs(output, {"a.parquet": 12, "b.parquet": 25}, BuildConfig(shard_size=10)))
    assert set(before) <= set(after)
    assert [(u.unit, u.file_index) for u in after if u.path == "a.parquet"] == [(3, 1), (4, 1)]
    assert {k: v for k, v in output.read_json("inputs.json").items() if k != "settings"} == {"shard_size": 10, "files": [
        {"path": "b.parquet", "index": 0, "rows": 25, "first_unit": 0},
        {"path": "a.parquet", "index": 1, "rows": 12, "first_unit": 3}]}


def test_register_inputs_refuses_another_shard_size(tmp_path: Path) -> None:
    output = Output(str(tmp_path))
    register_inputs(output, {"a.parquet": 25}, BuildConfig(shard_size=10))
    with pytest.raises(ConfigError, match="shard_size 10"):
        register_inputs(output, {"a.parquet": 25}, BuildConfig(shard_size=20))


@pytest.mark.parametrize("rows, cpus, expected", [
    (6_000, 2, 1_500),  # a few thousand rows still reach every CPU, twice
    (300, 2, 1_000),  # no unit below 1,000 rows: a small build stays one shard
    (400_000_000, 800, 10_000),  # nor above 10,000 at LAION size
    (50_000, 16, 1_563)])
def test_an_output_without_shard_size_gets_units_for_every_cpu(tmp_path: Path, rows: int, cpus: int,
                                                               expected: int) -> None:
    inputs, shard_size = register_inputs(Output(str(tmp_path)), {"a.parquet": rows}, BuildConfig(), cpus=cpus)
    assert shard_size == expected and len(plan_units(inputs, shard_size)) == -(-rows // expected)


def test_an_output_keeps_its_first_runs_unit_size_on_another_cluster(tmp_path: Path) -> None:
    output = Output(str(tmp_path))
    first, size = register_inputs(output, {"a.parquet": 6_000}, BuildConfig(), cpus=2)
    # resumed on a bigger cluster, with a file added: the units already planned stay what they were
    later, size_later = register_inputs(output, {"a.parquet": 6_000, "b.parquet": 9_000}, BuildConfig(), cpus=64)
    assert size_later == size == 1_500
    assert set(plan_units(first, size)) <= set(plan_units(later, size_later))
    assert register_inputs(output, {"a.parquet": 6_000}, BuildConfig(shard_size=1_500), cpus=8)[1] == 1_500
    with pytest.raises(ConfigError, match="shard_size 1500, not 1000"):
        register_inputs(output, {"a.parquet": 6_000}, BuildConfig(shard_size=1_000), cpus=2)


def test_register_inputs_refuses_settings_that_change_what_a_unit_writes(tmp_path: Path) -> None:
    output = Output(str(tmp_path))
    register_inputs(output, {"a.parquet": 25}, BuildConfig(shard_size=10), np.array([1, 2, 3]))
    # what only changes how a unit is fetched or run is free to change, and new files may come
    register_inputs(output, {"a.parquet": 25, "b.parquet": 5},
                    BuildConfig(shard_size=10, url_deadline=90.0, retries=5, detect_actors=4, threads_per_task=64),
                    np.array([1, 2, 3]))
    for changes, allowlist, named in [({"min_face_score": 0.5}, [1, 2, 3], "min_face_score 0.9 -> 0.5"),
                                      ({"detector": "none", "jpeg_quality": 80}, [1, 2, 3], "jpeg_quality 95 -> 80"),
                                      ({"drop_nsfw": ["NSFW"]}, [1, 2, 3], "drop_nsfw [] -> ['NSFW']"),
                                      ({}, [1, 2, 4], "sample_ids")]:
        with pytest.raises(ConfigError) as error:
            register_inputs(output, {"a.parquet": 25}, BuildConfig(shard_size=10, **changes), np.array(allowlist))
        assert named in str(error.value) and "\n" not in str(error.value)
    assert output.read_json("inputs.json")["settings"]["min_face_score"] == 0.9  # unchanged


def test_units_of_a_file_built_alone_later_do_not_collide(tmp_path: Path) -> None:
    output = Output(str(tmp_path))
    first = plan_units(*register_inputs(output, {"a.parquet": 25}, BuildConfig(shard_size=10)))
    later = plan_units(*register_inputs(output, {"b.parquet": 15}, BuildConfig(shard_size=10)))
    assert not {u.unit for u in first} & {u.unit for u in later}


def test_register_inputs_refuses_a_file_whose_row_count_changed(tmp_path: Path) -> None:
    output = Output(str(tmp_path))
    register_inputs(output, {"a.parquet": 25}, BuildConfig(shard_size=10))
    with pytest.raises(ConfigError, match="a.parquet"):
        register_inputs(output, {"a.parquet": 26}, BuildConfig(shard_size=10))


def test_keys_are_file_index_and_row_and_repeat_across_reads(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", laion_table(20), row_group_size=3)
    unit = Unit(unit=4, file_index=7, path=path, start=10, stop=20)
    first = read_unit(unit, BuildConfig(), None, {})
    second = read_unit(unit, BuildConfig(), None, {})
    assert [s.key for s in first] == [make_key(7, row) for row in range(10, 20)] == [s.key for s in second]
    assert first[0].key == "00007000000010"
    assert [s.input_row for s in first] == list(range(10, 20))
    assert {s.unit for s in first} == {4} and {s.input_file for s in first} == {path}
    assert [s.sample_id for s in first] == list(range(1010, 1020))


def test_only_rows_restricts_the_rows(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", laion_table(10))
    samples = read_unit(Unit(0, 0, path, 0, 10), BuildConfig(), None, {}, only_rows={2, 7, 42})
    assert [s.input_row for s in samples] == [2, 7]
    assert [s.sample_id for s in samples] == [1002, 1007]


# --- row-level decisions ------------------------------------------------------------------------

def test_plain_rows_stay_pending_with_their_metadata(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", laion_table(3))
    samples = read_all(path, 3)
    assert all(s.pending for s in samples)
    assert samples[1].url == "https://img.example.com/1.jpg" and samples[1].caption == "a photo of person number 1"
    assert (samples[1].license, samples[1].nsfw, samples[1].similarity) == ("?", "UNLIKELY", pytest.approx(0.33))


@pytest.mark.parametrize("config, column, values, expected", [
    (BuildConfig(drop_nsfw=["NSFW", "UNSURE"]), "NSFW", ["UNLIKELY", "NSFW", "UNSURE"], [None, "NSFW", "NSFW"]),
    (BuildConfig(min_similarity=0.3), "similarity", [0.31, 0.29, None], [None, "similarity", "similarity"]),
    (BuildConfig(min_image_side=100), "WIDTH", [100, 99, None], [None, "advertised size", "advertised size"]),
    (BuildConfig(min_caption_length=5), "TEXT", ["hello", "hell", None], [None, "caption", "caption"]),
])
def test_metadata_filters(tmp_path: Path, config: BuildConfig, column: str, values: list,
                          expected: list[str | None]) -> None:
    path = write_parquet(tmp_path / "a.parquet", laion_table(3, **{column: values}))
    samples = read_all(path, 3, config)
    for sample, reason_part in zip(samples, expected):
        if reason_part is None:
            assert sample.pending, sample.reason
        else:
            assert sample.status == "filtered_metadata"
            assert reason_part in sample.reason


def test_metadata_filters_are_off_by_default(tmp_path: Path) -> None:
    table = laion_table(2, NSFW=["NSFW", "UNSURE"], similarity=[0.0, None], WIDTH=[1, None], TEXT=["", None])
    table = table.set_column(table.schema.get_field_index("URL"), "URL", pa.array(["http://a/1", "http://a/2"]))
    samples = read_all(write_parquet(tmp_path / "a.parquet", table), 2)
    assert all(s.pending for s in samples)


@pytest.mark.parametrize("suffix", [".txt", ".parquet"])
def test_allowlist_marks_other_rows_not_in_allowlist(tmp_path: Path, suffix: str) -> None:
    allow = tmp_path / f"ids{suffix}"
    if suffix == ".txt":
        allow.write_text("1003\n\n1001\n1001\n")
    else:
        pq.write_table(pa.table({"SAMPLE_ID": pa.array([1003, 1001], pa.int64())}), allow)
    ids = load_allowlist(str(allow))
    assert ids.dtype == np.int64 and ids.tolist() == [1001, 1003]
    path = write_parquet(tmp_path / "a.parquet", laion_table(5))
    samples = read_all(path, 5, allowlist=ids)
    assert [s.status for s in samples] == ["not_in_allowlist", None, "not_in_allowlist", None, "not_in_allowlist"]


def test_allowlist_parquet_without_sample_id_column_uses_first_column(tmp_path: Path) -> None:
    allow = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"id": [5, 2, 9]}), allow)
    assert load_allowlist(str(allow)).tolist() == [2, 5, 9]


def test_unreadable_allowlist_is_a_config_error(tmp_path: Path) -> None:
    allow = tmp_path / "ids.txt"
    allow.write_text("1001\nnot-a-number\n")
    with pytest.raises(ConfigError, match="allow-list"):
        load_allowlist(str(allow))


def test_null_sample_id_is_not_in_allowlist(tmp_path: Path) -> None:
    table = laion_table(2, SAMPLE_ID=pa.array([None, 1001], pa.int64()))
    samples = read_all(write_parquet(tmp_path / "a.parquet", table), 2, allowlist=np.array([1001], np.int64))
    assert [s.status for s in samples] == ["not_in_allowlist", None]


def test_invalid_urls(tmp_path: Path) -> None:
    urls = [None, "", "file:///etc/passwd", "ftp://x", "javascript:alert(1)", "img.example.com/a.jpg",
            "http://ok.example/a.jpg", "HTTPS://ok.example/b.jpg"]
    path = write_parquet(tmp_path / "a.parquet", laion_table(len(urls), URL=urls))
    samples = read_all(path, len(urls))
    assert [s.status for s in samples] == ["invalid_url"] * 6 + [None, None]
    assert all("http" in s.reason for s in samples[:6])


def test_url_duplicates_mark_duplicate_url(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", laion_table(3))
    first = make_key(0, 0)
    samples = read_all(path, 3, url_duplicates={make_key(0, 2): first})
    assert [s.status for s in samples] == [None, None, "duplicate_url"]
    assert samples[2].duplicate_of == first and first in samples[2].reason
    assert samples[0].duplicate_of is None


def test_filters_come_before_the_duplicate_check(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", laion_table(2, NSFW=["UNLIKELY", "NSFW"]))
    samples = read_all(path, 2, BuildConfig(drop_nsfw=["NSFW"]), url_duplicates={make_key(0, 1): make_key(0, 0)})
    assert samples[1].status == "filtered_metadata" and samples[1].duplicate_of is None
