"""CSV and TSV inputs (pipeline.text_inputs): staged once as parquet in OUT/inputs/, on real files. A
real build of a CC12M-style TSV is in test_build_laion_face.py."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.build_config import BuildConfig
from pipeline.config import ConfigError
from pipeline.source import Unit, check_inputs, input_rows, read_unit
from pipeline.storage import Output
from pipeline.text_inputs import staged_parquet

CSV = ('SAMPLE_ID,URL,TEXT,WIDTH,HEIGHT,similarity\n'
       '7,https://a.example/1.jpg,"a caption, with a comma",640,480,0.31\n'
       '8,https://a.example/2.jpg,"two lines\nof caption",,, 0.29\n'
       '9,https://a.example/3.jpg,null,800,600,0.40\n')


def output_at(path: Path) -> Output:
    output = Output(str(path))
    output.make_dirs()
    return output


def staged(path: Path, out: Path, config: BuildConfig) -> str:
    """What build() does with an input: its columns checked, then its parquet staged."""
    config = config.with_columns(check_inputs([str(path)], config))
    return staged_parquet(str(path), output_at(out), config)


def test_a_csv_is_converted_once_with_its_quoting_nulls_and_numbers(tmp_path: Path) -> None:
    source = tmp_path / "meta.csv"
    source.write_text(CSV)
    parquet = staged(source, tmp_path / "out", BuildConfig())
    assert parquet.startswith(str(tmp_path / "out" / "inputs" / "meta-")) and input_rows([parquet]) == {parquet: 3}
    table = pq.read_table(parquet)
    assert table["TEXT"].to_pylist() == ["a caption, with a comma", "two lines\nof caption", "null"]
    assert table["SAMPLE_ID"].to_pylist() == [7, 8, 9] and table["WIDTH"].to_pylist() == [640.0, None, 800.0]
    assert table["similarity"].to_pylist() == [0.31, 0.29, 0.40]
    config = BuildConfig(min_similarity=0.3).with_columns(check_inputs([str(source)], BuildConfig()))
    samples = read_unit(Unit(0, 0, parquet, 0, 3), config, None, {})
    assert [(s.sample_id, s.status) for s in samples] == [(7, None), (8, "filtered_metadata"), (9, None)]
    modified = Path(parquet).stat().st_mtime_ns
    assert staged(source, tmp_path / "out", BuildConfig()) == parquet  # a rerun reads the same conversion
    assert Path(parquet).stat().st_mtime_ns == modified


def test_a_headerless_gzipped_tsv_reads_as_url_and_caption(tmp_path: Path) -> None:
    """CC12M's own file: no header, no quoting, a quote mark is part of a caption."""
    source = tmp_path / "cc12m.tsv.gz"
    source.write_bytes(gzip.compress(b'https://a.example/1.jpg\tshe said "hi\n'
                                     b'https://a.example/2.jpg\t"Quoted" at the start\n'))
    config = BuildConfig(preset="cc12m")
    assert check_inputs([str(source)], config) == {"url": "url", "caption": "caption"}
    table = pq.read_table(staged(source, tmp_path / "out", config))
    assert table.to_pydict() == {"url": ["https://a.example/1.jpg", "https://a.example/2.jpg"],
                                 "caption": ['she said "hi', '"Quoted" at the start']}


def test_a_tsv_without_the_url_column_is_refused_by_name(tmp_path: Path) -> None:
    source = tmp_path / "meta.tsv"
    source.write_text("link\tcaption\nhttps://a.example/1.jpg\tx\n")
    with pytest.raises(ConfigError, match=r"meta.tsv: missing column 'url'.*--url-col"):
        check_inputs([str(source)], BuildConfig(preset="cc12m"))


@pytest.mark.parametrize("text, problem", [
    ("URL,TEXT,similarity\nhttps://a.example/1.jpg,x,high\n", "column 'similarity' holds a value that is not a number"),
    ("URL,TEXT\nhttps://a.example/1.jpg,x\nhttps://a.example/2.jpg,x,extra\n", "Expected 2 columns, got 3"),
])
def test_a_bad_row_is_one_line_and_leaves_nothing_behind(tmp_path: Path, text: str, problem: str) -> None:
    source = tmp_path / "meta.csv"
    source.write_text(text)
    with pytest.raises(ConfigError) as err:
        staged(source, tmp_path / "out", BuildConfig())
    message = str(err.value)
    assert message.startswith(f"cannot convert {source}: ") and problem in message and "\n" not in message
    assert list((tmp_path / "out" / "inputs").iterdir()) == []


def test_a_file_changed_since_its_conversion_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "meta.csv"
    source.write_text(CSV)
    staged(source, tmp_path / "out", BuildConfig())
    source.write_text(CSV + '10,https://a.example/4.jpg,four,1,1,0.5\n')
    with pytest.raises(ConfigError, match=r"meta.csv changed since this output converted it \(\d+ bytes then, \d+ now\)"):
        staged(source, tmp_path / "out", BuildConfig())


def test_an_empty_text_input_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "meta.csv"
    source.write_text("")
    with pytest.raises(ConfigError, match="meta.csv is empty"):
        check_inputs([str(source)], BuildConfig())
