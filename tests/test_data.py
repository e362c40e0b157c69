"""hf_gns.data: the embedded stdlib corpus, byte-level tokenizer, chunking, local loading paths."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets", reason="the recipe and hf_gns.data need the datasets package")

from hf_gns.data import (
    EXCLUDED_STDLIB_DIRS,
    build_lm_dataset,
    chunk_token_ids,
    embedded_corpus_files,
    expand_text_files,
    load_text_files,
    load_tokenizer,
    pack_token_dataset,
    read_corpus,
    read_hub_dataset,
    tokenize_dataset,
    train_byte_level_tokenizer,
)

ROUND_TRIP_TEXTS = [
    "def f(x):\n    return x + 1  # trailing\n\n",
    "  leading spaces, tabs\t and punctuation: a , b . c ?",
    "ünïcödé, 漢字, emoji 🙂, and a zero-width\u200bjoiner",
    "",
]


@pytest.fixture(scope="module")
def small_corpus() -> list[str]:
    return read_corpus(embedded_corpus_files(), max_bytes=200_000)


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    return train_byte_level_tokenizer(small_corpus, vocab_size=320)


def test_embedded_corpus_is_the_stdlib_without_tests_in_a_fixed_order():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = embedded_corpus_files()
    assert files == embedded_corpus_files()
    relative = [path.relative_to(root) for path in files]
    assert [p.as_posix() for p in relative] == sorted(p.as_posix() for p in relative)
    assert all(path.suffix == ".py" and path.is_file() for path in files)
    assert not any(set(p.parts[:-1]) & EXCLUDED_STDLIB_DIRS for p in relative)
    assert {"os.py", "json/__init__.py"} <= {p.as_posix() for p in relative}
    assert sum(path.stat().st_size for path in files) > 4_000_000  # room for the recipe's 2 MB default


def test_read_corpus_stops_at_max_bytes_in_file_order(tmp_path):
    files = embedded_corpus_files()
    texts = read_corpus(files, max_bytes=50_000)
    assert sum(len(text.encode("utf-8")) for text in texts) == 50_000
    assert texts[0] == files[0].read_text(encoding="utf-8")
    assert texts == read_corpus(files, max_bytes=50_000)

    accents = tmp_path / "accents.txt"
    accents.write_text("é" * 10, encoding="utf-8")  # 2 bytes each: a 5-byte cap keeps 2 whole ones
    assert read_corpus([accents], max_bytes=5) == ["éé"]
    assert read_corpus([accents, accents], max_bytes=None) == ["é" * 10] * 2


def test_expand_text_files_globs_sorted_and_missing_pattern_raises(tmp_path):
    for name in ["b.txt", "a.txt", "sub/c.txt", "sub/skip.md"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    found = expand_text_files([str(tmp_path / "**" / "*.txt"), str(tmp_path / "a.txt")])
    assert found == [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "sub" / "c.txt"]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        expand_text_files([str(tmp_path / "*.csv")])


def test_byte_level_tokenizer_round_trips_and_has_eos_and_pad(tokenizer):
    assert len(tokenizer) == 320
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < len(tokenizer) for i in ids)
        assert tokenizer.decode(ids) == text
    # merges were learned: Python source compresses well below one token per byte
    source = "    def __init__(self, name):\n        self.name = name\n"
    assert len(tokenizer(source)["input_ids"]) < 0.6 * len(source.encode("utf-8"))


def test_byte_level_tokenizer_training_is_deterministic(small_corpus, tokenizer):
    again = train_byte_level_tokenizer(small_corpus, vocab_size=320)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_byte_level_tokenizer_needs_room_for_the_byte_alphabet(small_corpus):
    with pytest.raises(ValueError, match="at least 257"):
        train_byte_level_tokenizer(small_corpus, vocab_size=256)


def test_chunk_token_ids_drops_the_incomplete_tail():
    assert chunk_token_ids(list(range(10)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert chunk_token_ids(list(range(6)), 3) == [[0, 1, 2], [3, 4, 5]]
    assert chunk_token_ids([1, 2], 3) == []
    with pytest.raises(ValueError):
        chunk_token_ids([1, 2], 0)


def test_build_lm_dataset_blocks_are_the_eos_joined_token_stream(small_corpus, tokenizer):
    texts = small_corpus[:5]
    block_size = 32
    dataset = build_lm_dataset(texts, tokenizer, block_size)
    assert set(dataset.column_names) == {"input_ids", "labels"}
    assert all(len(row) == block_size for row in dataset["input_ids"])
    assert dataset["labels"] == dataset["input_ids"]

    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(dataset) == len(stream) // block_size
    assert [i for row in dataset["input_ids"] for i in row] == stream[: len(dataset) * block_size]
    with pytest.raises(ValueError, match="fewer than"):
        build_lm_dataset(["x"], tokenizer, block_size)


def test_load_tokenizer_from_a_local_saved_dir(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>"
    for text in ROUND_TRIP_TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text


def test_load_tokenizer_sets_pad_to_eos_when_missing(tmp_path, tokenizer):
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    tokenizer.save_pretrained(tmp_path / "tok")
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    assert load_tokenizer(tmp_path / "tok").pad_token == "<|endoftext|>"


def test_read_hub_dataset_goes_through_load_dataset(tmp_path):
    """The `--dataset_name` path, offline: `datasets`' packaged json builder on local files."""
    path = tmp_path / "docs.jsonl"
    rows = [{"text": f"document {i} " * 5, "id": i} for i in range(4)] + [{"text": "", "id": 4}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    texts = read_hub_dataset("json", data_files=str(path))
    assert texts == [row["text"] for row in rows[:4]]  # empty texts are skipped
    capped = read_hub_dataset("json", data_files=str(path), max_bytes=80)
    assert capped == [rows[0]["text"], rows[1]["text"][:25]]  # 55 + 25 bytes
    with pytest.raises(KeyError, match="no column 'body'"):
        read_hub_dataset("json", data_files=str(path), text_column="body")


def test_expand_text_files_takes_directories_of_data_files(tmp_path):
    # a .json in a folder is configuration far more often than a corpus (package.json): named files only
    for name in ["a.txt", "sub/b.jsonl", "sub/c.md", "skip.bin", ".hidden.txt", ".git/d.txt", "package.json"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    assert expand_text_files([str(tmp_path)]) == [
        tmp_path / "a.txt",
        tmp_path / "sub/b.jsonl",
        tmp_path / "sub/c.md",
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no data file"):
        expand_text_files([str(tmp_path / "empty")])


def test_load_text_files_reads_text_documents_and_json_records(tmp_path):
    (tmp_path / "one.txt").write_text("first document\nwith two lines\n")
    (tmp_path / "two.txt").write_text("second")
    rows = [{"body": "record one", "id": 1}, {"body": "", "id": 2}, {"body": "record three", "id": 3}]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    files = [tmp_path / "records.jsonl", tmp_path / "one.txt", tmp_path / "two.txt"]
    dataset = load_text_files(files, text_column="body")
    assert dataset.column_names == ["text"]
    # text files first (whole file = one document), then JSON records; empty ones dropped
    assert list(dataset["text"]) == [
        "first document\nwith two lines\n",
        "second",
        "record one",
        "record three",
    ]
    assert list(load_text_files(files, text_column="body", max_bytes=20)["text"]) == ["first document\nwith "]


def test_load_text_files_says_what_is_wrong(tmp_path):
    (tmp_path / "records.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    assert list(load_text_files([tmp_path / "records.jsonl"], text_column="body")["text"]) == ["x"]
    (tmp_path / "plain.jsonl").write_text(json.dumps({"text": "y", "id": 1}) + "\n")
    assert list(load_text_files([tmp_path / "plain.jsonl"])["text"]) == ["y"]  # the default field name
    with pytest.raises(ValueError, match="no field 'text'.*--text_column"):
        load_text_files([tmp_path / "records.jsonl"])
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    with pytest.raises(ValueError, match=r"binary.txt' is not UTF-8 text \(byte 0xff at offset 0\)"):
        load_text_files([tmp_path / "binary.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="hold no text"):
        load_text_files([tmp_path / "empty.txt"])


def test_pack_token_dataset_joins_documents_and_cuts_int64_blocks(small_corpus, tokenizer):
    from datasets import Dataset

    tokenized = Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [], [5, 6, 7, 8, 9]]})
    packed = pack_token_dataset(tokenized, block_size=4)
    assert packed["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]] == packed["labels"]
    assert packed.with_format("torch")[0]["input_ids"].dtype == torch.int64  # what cross_entropy needs
    with pytest.raises(ValueError, match="fewer than block_size=16"):
        pack_token_dataset(tokenized, block_size=16)

    documents = Dataset.from_dict({"text": small_corpus[:3]})
    ids = tokenize_dataset(documents, tokenizer)["input_ids"]
    assert ids[0] == tokenizer(small_corpus[0], add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]


def test_the_error_names_the_one_file_that_is_not_utf8_among_many(tmp_path, capsys):
    # Refused, not skipped: skipping would train on less data than asked, silently.
    files = []
    for i in range(12):
        files.append(tmp_path / f"doc_{i}.txt")
        files[-1].write_text(f"document {i}\n")
    (tmp_path / "doc_7.txt").write_bytes("caf\u00e9 ok, then latin-1: ".encode() + b"caf\xe9\n")
    with pytest.raises(ValueError) as error:
        load_text_files(sorted(files))
    message = str(error.value)
    assert "doc_7.txt' is not UTF-8 text (byte 0xe9 at offset 27)" in message
    assert "doc_0.txt" not in message and "doc_10.txt" not in message
    assert "Downloading" not in capsys.readouterr().err  # local files: no download progress bars


def test_a_stray_json_file_is_named_as_not_data(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "a record"}) + "\n")
    (tmp_path / "package.json").write_text(json.dumps({"name": "site", "version": "1.0.0"}))
    assert expand_text_files([str(tmp_path)]) == [tmp_path / "a.txt", tmp_path / "docs.jsonl"]
    expected = r"'.*package.json' has no field 'text' \(its fields: name, version\)"
    with pytest.raises(ValueError, match=expected):
        load_text_files([tmp_path / "docs.jsonl", tmp_path / "package.json"])
