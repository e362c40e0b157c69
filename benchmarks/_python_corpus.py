"""A corpus that does not repeat within a GPU budget: every `.py` file installed on the machine.

The standard library alone (`hf_gns.data.embedded_corpus_files`, ~10M characters, ~2.6M
tokens at vocab 8192) is repeated many times by any GPU-sized budget, and a repeated
corpus stalls the eval loss (issue 14). Every Python source file of the interpreter —
standard library, tests included, and every installed package (`site-packages`: on the GPU
image torch, transformers, jax, scipy, ...) — is hundreds of millions of characters of real
code. On the CPU development machine (Python 3.11, torch + transformers + datasets + ...):
20,723 distinct files, 328M characters after the rules below.

Rules (deterministic for a given machine):
- roots: `sysconfig` stdlib / purelib / platlib and `site.getsitepackages()`, real paths;
- `__pycache__` left out; a file reached twice (symlinks, nested roots) read once;
- files in a fixed pseudo-random order (sorted by path, then permuted with `seed`): a
  package's files are not contiguous, so the data distribution does not drift along the run;
- byte-identical files (vendored copies) kept once, the first in that order; files over 1 MB
  left out (generated tables, not code anyone writes);
- the first documents of that order (about 4 characters per held-out token) are held out
  for eval, the next 4 MB train the tokenizer and start the training tokens.

`prepare_token_data` reads the files lazily, only as many as the budget needs (the GPU image
holds far more than a budget uses; reading all of it costs minutes on a cold disk), tokenizes
them with the byte-level BPE of `hf_gns.data`, joins them with `<|endoftext|>`, and writes
`train.npy` / `eval.npy` (uint16 token ids) and `meta.json` (counts: files and bytes found,
documents and characters read) into a folder that later calls reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import site
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

MAX_FILE_BYTES = 1_000_000
TOKENIZER_TRAIN_BYTES = 4_000_000


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def installed_python_roots() -> list[str]:
    """The folders holding the interpreter's Python sources (stdlib and installed packages)."""
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "purelib", "platlib") if key in paths}
    roots.update(site.getsitepackages())
    return sorted({os.path.realpath(root) for root in roots if os.path.isdir(root)})


def installed_python_files(roots: list[str] | None = None) -> list[Path]:
    """Every `.py` file under `roots` (real paths, no `__pycache__`), sorted, each once."""
    found: set[str] = set()
    for root in roots or installed_python_roots():
        for directory, subdirs, names in os.walk(root):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            found.update(os.path.realpath(os.path.join(directory, n)) for n in names if n.endswith(".py"))
    return [Path(p) for p in sorted(found)]


def distinct_documents(files: list[Path], counts: dict[str, int]) -> Iterator[str]:
    """The files' texts in the order given, lazily; byte-identical copies, files over
    `MAX_FILE_BYTES` and blank files left out. Updates `counts` as it reads."""
    hashes: set[bytes] = set()
    for key in ("documents", "characters", "duplicates", "too_large", "unreadable"):
        counts.setdefault(key, 0)
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError:
            counts["unreadable"] += 1
            continue
        digest = hashlib.sha1(raw).digest()
        if digest in hashes:
            counts["duplicates"] += 1
            continue
        hashes.add(digest)
        if len(raw) > MAX_FILE_BYTES:
            counts["too_large"] += 1
            continue
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            counts["documents"] += 1
            counts["characters"] += len(text)
            yield text


def read_distinct_documents(files: list[Path]) -> tuple[list[str], dict[str, int]]:
    """Every distinct document of `files` (see `distinct_documents`) and the counts."""
    counts = {"files_found": len(files)}
    return list(distinct_documents(files, counts)), counts


def _take_chars(documents: Iterator[str], n_chars: float) -> list[str]:
    """The next documents of `documents` until they hold at least `n_chars` characters (or it ends)."""
    taken, total = [], 0
    while total < n_chars:
        text = next(documents, None)
        if text is None:
            break
        taken.append(text)
        total += len(text)
    return taken


def _encode(tokenizer, texts: list[str], eos: int) -> np.ndarray:
    """The documents' ids, each followed by `eos`, as one int32 array (the Rust tokenizer, batched)."""
    parts = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        parts.append(np.asarray(encoded, dtype=np.int32))
        parts.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def prepare_token_data(
    folder: str | os.PathLike,
    *,
    train_tokens: int,
    eval_tokens: int,
    vocab_size: int,
    roots: list[str] | None = None,
    max_chars: int | None = None,
    seed: int = 0,
    allow_fewer: bool = False,
) -> dict:
    """Tokenize the installed Python sources into `folder` (reused when its `meta.json` matches).

    Args:
        train_tokens (`int`): training tokens needed (the budget, plus a margin the caller chooses).
        eval_tokens (`int`): held-out tokens.
        vocab_size (`int`): of the byte-level BPE.
        roots (`list[str]`, *optional*): folders to read instead of the installed ones (tests).
        max_chars (`int`, *optional*): read only this many characters of documents (a small corpus).
        seed (`int`, *optional*, defaults to 0): document order.
        allow_fewer (`bool`, *optional*, defaults to `False`): when the corpus holds fewer training
            tokens than asked, write what it holds (`meta["train_tokens_written"]`, `meta["short"]`)
            instead of raising: the caller shrinks its budget (a GPU image with fewer packages
            installed than expected must not waste the call).

    Returns:
        `dict`: the meta data (counts, paths, tokenizer), also written to `folder/meta.json`.

    Raises:
        `ValueError`: the corpus holds fewer tokens than asked (it would repeat), unless
            `allow_fewer` (held-out tokens are always required).
    """
    from hf_gns.data import train_byte_level_tokenizer

    folder = Path(folder)
    request = {
        "train_tokens": train_tokens,
        "eval_tokens": eval_tokens,
        "vocab_size": vocab_size,
        "roots": roots,
        "max_chars": max_chars,
        "seed": seed,
    }
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("request") == request:
            return meta
    start = time.perf_counter()
    # Files in a fixed pseudo-random order, read lazily: only as many as the budget needs (reading
    # every installed package, half a GB of source on a large image, would take minutes).
    files = installed_python_files(roots)
    random.Random(seed).shuffle(files)
    counts = {"files_found": len(files), "bytes_found": sum(_size(path) for path in files)}
    documents = distinct_documents(files, counts)
    if max_chars is not None:
        documents = iter(_take_chars(documents, max_chars))
    # Held out: the first documents of that order, about 4 characters a token.
    eval_texts = _take_chars(documents, 4 * eval_tokens)
    first_train = _take_chars(documents, TOKENIZER_TRAIN_BYTES)  # the tokenizer learns on these
    tokenizer = train_byte_level_tokenizer(
        first_train, vocab_size=vocab_size, max_train_bytes=TOKENIZER_TRAIN_BYTES
    )
    eos = tokenizer.eos_token_id
    eval_ids = _encode(tokenizer, eval_texts, eos)
    parts, n_train, used_docs, used_chars = [], 0, 0, 0
    batch, chunk_chars = first_train, 8_000_000
    while batch and n_train < train_tokens:
        parts.append(_encode(tokenizer, batch, eos))
        n_train += len(parts[-1])
        used_docs += len(batch)
        used_chars += sum(len(t) for t in batch)
        batch = _take_chars(documents, min(chunk_chars, 4.5 * (train_tokens - n_train)))
    train_ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    short = len(train_ids) < train_tokens
    if (short and not allow_fewer) or len(eval_ids) < eval_tokens:
        raise ValueError(
            f"the installed Python sources hold {len(train_ids):,} training tokens (and {len(eval_ids):,} "
            f"held out), fewer than the {train_tokens:,} (and {eval_tokens:,}) asked: the corpus would "
            "repeat; use a smaller model or budget"
        )
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 65536 else np.int32
    np.save(folder / "train.npy", np.asarray(train_ids, dtype=dtype))
    np.save(folder / "eval.npy", np.asarray(eval_ids[:eval_tokens], dtype=dtype))
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    meta = {
        "request": request,
        "corpus": counts,
        "eval_documents": len(eval_texts),
        "train_documents_used": used_docs,
        "train_characters_used": used_chars,
        "train_tokens_written": len(train_ids),
        "short": short,
        "chars_per_token": used_chars / max(1, len(train_ids)),
        "vocab_size": len(tokenizer),
        "seconds": round(time.perf_counter() - start, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def fitted_budget(meta: dict, budget: int, margin: float = 1.02, slack: int = 4096) -> int:
    """`budget`, or the largest one the written training tokens hold when the corpus was short.

    The callers ask `prepare_token_data` for `budget × margin + slack` tokens (room for the last
    batch); this inverts that for the tokens actually written.
    """
    if not meta.get("short"):
        return budget
    return min(budget, int((meta["train_tokens_written"] - slack) / margin))


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of `block_size` tokens of a 1-D id array: `{"input_ids", "labels"}` (T,) int64."""

    def __init__(self, ids: np.ndarray, block_size: int):
        self.ids, self.block_size = ids, block_size
        self.n_blocks = len(ids) // block_size
        if self.n_blocks == 0:
            raise ValueError(f"{len(ids)} tokens hold no block of {block_size}")

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.block_size
        row = torch.from_numpy(self.ids[start : start + self.block_size].astype(np.int64))
        return {"input_ids": row, "labels": row}
