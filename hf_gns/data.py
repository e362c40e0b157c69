"""Text corpora and tokenizers for recipes and tests, with no hub access on the default path.

The default corpus is the interpreter's own standard library: ~11 MB of real Python
source that every Python install carries (DESIGN.md section 6), read in a fixed order so
that runs are reproducible. The default tokenizer is a byte-level BPE trained on that
text in about a second. The real loading paths stay for users: `load_tokenizer` is
`AutoTokenizer.from_pretrained`, `read_hub_dataset` is `datasets.load_dataset`; neither is
called unless asked for.

Example:
```python
>>> texts = read_corpus(embedded_corpus_files(), max_bytes=2_000_000)
>>> tokenizer = train_byte_level_tokenizer(texts, vocab_size=512)
>>> dataset = build_lm_dataset(texts, tokenizer, block_size=64)  # columns input_ids, labels: (64,) each
```
"""

from __future__ import annotations

import contextlib
import glob
import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

if TYPE_CHECKING:  # imported where used: the tokenizer and corpus helpers work without `datasets`
    from datasets import Dataset

END_OF_TEXT = "<|endoftext|>"
# Directories left out of the standard-library corpus: test suites (large, repetitive,
# and some hold deliberately malformed files), IDLE, and installed third-party packages.
EXCLUDED_STDLIB_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})


def embedded_corpus_files() -> list[Path]:
    """The `.py` files of the running interpreter's standard library, in a fixed order.

    Returns:
        `list[pathlib.Path]`: absolute paths under `sysconfig.get_paths()["stdlib"]`, sorted
        by their path relative to it, leaving out directories named in `EXCLUDED_STDLIB_DIRS`.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_STDLIB_DIRS]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


# What a directory given as data contributes: text files, and JSON Lines files of documents. A plain
# `.json` file is read only when named (or matched by a glob): folders hold configuration JSON
# (package.json, tsconfig.json, config.json) far more often than a corpus.
TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".rst", ".py"})
JSON_SUFFIXES = frozenset({".json", ".jsonl"})
DIRECTORY_SUFFIXES = TEXT_SUFFIXES | {".jsonl"}


def expand_text_files(patterns: Sequence[str]) -> list[Path]:
    """Local files named by paths, glob patterns (`**` recursive) or directories, sorted, without duplicates.

    A directory stands for every file under it (recursively) whose suffix is in
    `DIRECTORY_SUFFIXES` (text files and `.jsonl`; not `.json`, which folders mostly hold as
    configuration), hidden files and directories left out. Name `.json` data files explicitly.

    Raises:
        `FileNotFoundError`: a pattern matches nothing, or a directory holds no such file.
    """
    files = set()
    for pattern in patterns:
        matches = glob.glob(os.path.expanduser(pattern), recursive=True)
        if not matches:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        for match in matches:
            if os.path.isdir(match):
                found = _data_files_under(Path(match))
                if not found:
                    suffixes = " ".join(sorted(DIRECTORY_SUFFIXES))
                    raise FileNotFoundError(f"directory {match!r} holds no data file (suffixes: {suffixes})")
                files.update(found)
            elif os.path.isfile(match):
                files.add(Path(match))
    return sorted(files)


def _data_files_under(root: Path) -> list[Path]:
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend(
            Path(directory, name)
            for name in names
            if not name.startswith(".") and Path(name).suffix.lower() in DIRECTORY_SUFFIXES
        )
    return found


def _take_bytes(texts: Iterable[str], max_bytes: int | None) -> list[str]:
    """The leading texts whose UTF-8 size adds up to `max_bytes`, the last one cut to fit."""
    if max_bytes is None or max_bytes <= 0:
        return list(texts)
    taken, remaining = [], max_bytes
    for text in texts:
        encoded = text.encode("utf-8")
        if len(encoded) >= remaining:
            # Cutting may split a multi-byte character: drop the partial one.
            taken.append(encoded[:remaining].decode("utf-8", errors="ignore"))
            break
        taken.append(text)
        remaining -= len(encoded)
    return taken


def read_corpus(files: Sequence[str | os.PathLike], max_bytes: int | None = None) -> list[str]:
    """One text per file, in the given order, up to `max_bytes` of UTF-8 in total.

    Args:
        files (`Sequence[str | os.PathLike]`): text files, e.g. `embedded_corpus_files()`.
        max_bytes (`int`, *optional*): stop after this many bytes; the last text is cut.
            `None` or `<= 0` reads everything.

    Returns:
        `list[str]`: the texts. Undecodable bytes become U+FFFD.
    """
    texts = (Path(path).read_text(encoding="utf-8", errors="replace") for path in files)
    return _take_bytes(texts, max_bytes)


def read_hub_dataset(
    name: str,
    config_name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    max_bytes: int | None = None,
    data_files: str | Sequence[str] | None = None,
) -> list[str]:
    """Texts of one column of a `datasets` dataset, streamed, up to `max_bytes` of UTF-8.

    Streaming reads only as much as `max_bytes` needs instead of downloading the whole
    dataset. Needs network access for hub datasets; packaged builders such as `"json"` or
    `"text"` with local `data_files` work offline.

    Args:
        name (`str`): a hub dataset (`"wikitext"`), a local dataset directory, or a builder name.
        config_name (`str`, *optional*): the dataset configuration (`"wikitext-103-raw-v1"`).
        split (`str`, *optional*, defaults to `"train"`): the split to read.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the text.
        max_bytes (`int`, *optional*): stop after this many bytes; `None` reads the whole split.
        data_files (`str` or `Sequence[str]`, *optional*): passed to `datasets.load_dataset`.
    """
    from datasets import load_dataset

    stream = load_dataset(name, config_name, split=split, data_files=data_files, streaming=True)
    if stream.column_names is not None and text_column not in stream.column_names:
        raise KeyError(f"dataset {name!r} has no column {text_column!r}; its columns: {stream.column_names}")
    return _take_bytes((row[text_column] for row in stream if row[text_column]), max_bytes)


def train_byte_level_tokenizer(
    texts: Sequence[str], vocab_size: int, max_train_bytes: int | None = 4_000_000
) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`, with `<|endoftext|>` as eos and pad.

    Byte-level means every string round-trips (`decode(encode(s)) == s`) and no unknown
    token exists. Training is deterministic for given texts.

    Args:
        texts (`Sequence[str]`): training text.
        vocab_size (`int`): at least 257 (256 byte symbols and `<|endoftext|>`); the rest are merges.
        max_train_bytes (`int`, *optional*, defaults to 4 MB): train on at most this many
            leading bytes of `texts` (about a second per MB on one core); `None` for all.

    Returns:
        `transformers.PreTrainedTokenizerFast`: save it with `save_pretrained`, load it with
        `load_tokenizer`.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"vocab_size must be at least {len(alphabet) + 1} for a byte-level BPE, got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(_take_bytes(texts, max_train_bytes), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        # Byte-level decoding is already exact; the HF clean-up would drop spaces before punctuation.
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name_or_path)`, with pad set to eos when the tokenizer has none.

    Args:
        name_or_path (`str` or `os.PathLike`): a hub id (needs network) or a local directory
            written by `save_pretrained`.
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chunk_token_ids(ids: Sequence[int], block_size: int) -> list[list[int]]:
    """`ids` cut into consecutive blocks of exactly `block_size`; the incomplete tail is dropped."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_blocks = len(ids) // block_size
    return [list(ids[i * block_size : (i + 1) * block_size]) for i in range(n_blocks)]


def load_text_files(
    files: Sequence[str | os.PathLike], text_column: str = "text", max_bytes: int | None = None
) -> Dataset:
    """Local documents through `datasets`' packaged builders: one row per text file, one per JSON record.

    `.json` / `.jsonl` files go through the `json` builder (records with a `text_column`
    field); every other file through the `text` builder, whole file as one document. Both
    work offline. Text files come first, then JSON records, each in the given order.

    Args:
        files (`Sequence[str | os.PathLike]`): e.g. from `expand_text_files`.
        text_column (`str`, *optional*, defaults to `"text"`): the JSON field holding the text.
        max_bytes (`int`, *optional*): keep the leading documents up to this many UTF-8 bytes.

    Returns:
        `datasets.Dataset` with one column, `text`; empty documents are dropped.

    Raises:
        `ValueError`: a file is not UTF-8 (refused, naming it and the first bad byte: skipping it
            would silently train on less data than asked), a JSON file cannot be parsed or lacks
            `text_column` (named), or there is no text at all.
    """
    from datasets import Dataset, concatenate_datasets, load_dataset

    files = [Path(path) for path in files]
    if not files:
        raise ValueError("no data files given")
    json_files = [str(path) for path in files if path.suffix.lower() in JSON_SUFFIXES]
    text_files = [str(path) for path in files if path.suffix.lower() not in JSON_SUFFIXES]
    parts = []
    if text_files:
        try:
            with _quiet_datasets():
                texts = load_dataset("text", data_files=text_files, sample_by="document", split="train")
        except Exception as error:  # datasets wraps decoding errors in its own exception types
            raise ValueError(_unreadable_text_message(text_files, error)) from error
        parts.append(texts)
    if json_files:
        try:
            with _quiet_datasets():
                records = load_dataset("json", data_files=json_files, split="train")
        except Exception as error:
            raise ValueError(_unreadable_json_message(json_files, text_column, error)) from error
        if text_column not in records.column_names:
            raise ValueError(_unreadable_json_message(json_files, text_column, None))
        records = records.select_columns([text_column])
        parts.append(records if text_column == "text" else records.rename_column(text_column, "text"))
    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    with _quiet_datasets():
        dataset = dataset.filter(lambda text: bool(text), input_columns="text")
    if max_bytes is not None and max_bytes > 0:
        dataset = Dataset.from_dict({"text": _take_bytes(dataset["text"], max_bytes)})
    if len(dataset) == 0:
        raise ValueError(f"the data files {_names([str(path) for path in files])} hold no text")
    return dataset


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` without its progress bars ("Downloading data: 293/293 files" for LOCAL files, "Generating
    train split"): they describe copying local files into its cache, not a download."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def first_non_utf8(path: str | os.PathLike) -> tuple[int, int] | None:
    """(byte offset, byte value) of the first byte of `path` that is not valid UTF-8, or `None`."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start, data[error.start]
    return None


def _unreadable_text_message(text_files: Sequence[str], error: Exception) -> str:
    for path in text_files:  # find the culprit: datasets' error names the whole list, or nothing
        bad = first_non_utf8(path)
        if bad is not None:
            return (
                f"{path!r} is not UTF-8 text (byte 0x{bad[1]:02x} at offset {bad[0]}): convert it "
                "(e.g. iconv -f latin1 -t utf-8) or leave it out of --train_files"
            )
    return f"could not read the text files {_names(text_files)}: {error}"


def _json_fields(path: str) -> list[str] | None:
    """Field names of the first record of a JSON or JSON Lines file; `None` if it does not parse."""
    import json

    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = json.loads(text.lstrip().splitlines()[0]) if text.strip() else None
        except ValueError:
            return None
    if isinstance(data, list):
        data = data[0] if data else {}
    return sorted(data) if isinstance(data, dict) else None


def _unreadable_json_message(json_files: Sequence[str], text_column: str, error: Exception | None) -> str:
    for path in json_files:  # name the file that is not a corpus (e.g. a stray package.json)
        fields = _json_fields(path)
        if fields is None:
            return f"{path!r} is not JSON or JSON Lines: leave it out of --train_files"
        if text_column not in fields:
            return (
                f"{path!r} has no field {text_column!r} (its fields: {', '.join(fields[:8])}"
                f"{' ...' if len(fields) > 8 else ''}): if it is not data, leave it out of --train_files; "
                "if it is, name its text field with --text_column"
            )
    return f"could not read the JSON files {_names(json_files)}: {error}"


def _names(paths: Sequence[str], shown: int = 3) -> str:
    names = ", ".join(repr(path) for path in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str = "text",
    num_proc: int | None = None,
) -> Dataset:
    """Each document's token ids followed by eos (when the tokenizer has one), in column `input_ids`.

    Args:
        dataset (`datasets.Dataset`): documents in `text_column`.
        tokenizer (`PreTrainedTokenizerBase`): e.g. from `train_byte_level_tokenizer`.
        text_column (`str`, *optional*, defaults to `"text"`): the column to tokenize.
        num_proc (`int`, *optional*): worker processes for `Dataset.map`.
    """
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]

    def tokenize(texts: list[str]) -> dict[str, list[list[int]]]:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + eos for row in ids]}

    return dataset.map(
        tokenize,
        batched=True,
        input_columns=text_column,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
    )


def pack_token_dataset(tokenized: Dataset, block_size: int) -> Dataset:
    """Packs documents into fixed-length examples: all token ids joined in order, cut into blocks.

    The incomplete tail is dropped; examples span document boundaries (the eos between
    documents marks them), so no token is padding. Done on the Arrow buffers, without
    Python lists: a 100M-token corpus packs in seconds.

    Args:
        tokenized (`datasets.Dataset`): a column `input_ids` of int lists, e.g. from `tokenize_dataset`.
        block_size (`int`): tokens per example.

    Returns:
        `datasets.Dataset`: columns `input_ids` and `labels`, equal int64 lists of length
        `block_size`, one row per block in order.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset

    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    column = tokenized.data.column("input_ids")  # ChunkedArray of int lists
    stream = pc.list_flatten(column.combine_chunks()).to_numpy(zero_copy_only=False).astype(np.int64)  # (N,)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(
            f"the texts hold {len(stream)} tokens, fewer than block_size={block_size}: "
            "give more text or a smaller block size"
        )
    blocks = pa.FixedSizeListArray.from_arrays(pa.array(stream[: n_blocks * block_size]), block_size)
    return Dataset(pa.table({"input_ids": blocks, "labels": blocks}))


def build_lm_dataset(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int) -> Dataset:
    """A causal-LM dataset: the texts tokenized, joined by eos and cut into blocks.

    Every token is a target (no padding, no attention mask needed); models shift `labels`
    themselves.

    Args:
        texts (`Sequence[str]`): documents, e.g. from `read_corpus`.
        tokenizer (`PreTrainedTokenizerBase`): e.g. from `train_byte_level_tokenizer`.
        block_size (`int`): tokens per example.

    Returns:
        `datasets.Dataset`: columns `input_ids` and `labels`, equal int lists of length
        `block_size`, one row per block in corpus order.
    """
    from datasets import Dataset

    documents = Dataset.from_dict({"text": list(texts)})
    return pack_token_dataset(tokenize_dataset(documents, tokenizer), block_size)
