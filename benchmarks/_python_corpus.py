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
- byte-identical files (vendored copies) kept once; files over 1 MB left out (generated
  tables, not code anyone writes);
- documents in a fixed pseudo-random order (files sorted by path, then permuted with
  `seed`): a package's files are not contiguous, so the data distribution does not drift
  along the run; the first files of that order (about `eval_chars`) are held out for eval.

`prepare_token_data` tokenizes with the byte-level BPE of `hf_gns.data` (trained on the
first 4 MB of the training documents) only as many documents as the budget needs, joins
them with `<|endoftext|>`, and writes `train.npy` / `eval.npy` (uint16 token ids) and
`meta.json` (counts) into a folder that later calls reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import site
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

MAX_FILE_BYTES = 1_000_000


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


def read_distinct_documents(files: list[Path]) -> tuple[list[str], dict[str, int]]:
    """The files' texts, byte-identical copies and files over `MAX_FILE_BYTES` left out; and counts."""
    hashes: set[bytes] = set()
    texts: list[str] = []
    counts = {"files_found": len(files), "duplicates": 0, "too_large": 0, "unreadable": 0}
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
            texts.append(text)
    counts["documents"] = len(texts)
    counts["characters"] = sum(len(t) for t in texts)
    return texts, counts


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
) -> dict:
    """Tokenize the installed Python sources into `folder` (reused when its `meta.json` matches).

    Args:
        train_tokens (`int`): training tokens needed (the budget, plus a margin the caller chooses).
        eval_tokens (`int`): held-out tokens.
        vocab_size (`int`): of the byte-level BPE.
        roots (`list[str]`, *optional*): folders to read instead of the installed ones (tests).
        max_chars (`int`, *optional*): read only this many characters of documents (a small corpus).
        seed (`int`, *optional*, defaults to 0): document order.

    Returns:
        `dict`: the meta data (counts, paths, tokenizer), also written to `folder/meta.json`.

    Raises:
        `ValueError`: the corpus holds fewer tokens than asked (it would repeat).
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
    texts, counts = read_distinct_documents(installed_python_files(roots))
    random.Random(seed).shuffle(texts)
    if max_chars is not None:
        kept, total = [], 0
        for text in texts:
            if total >= max_chars:
                break
            kept.append(text)
            total += len(text)
        texts = kept
    read_s = time.perf_counter() - start
    # Held out: the first documents of the shuffled order, about 4 characters a token.
    n_eval, chars = 0, 0
    while n_eval < len(texts) - 1 and chars < 4 * eval_tokens:
        chars += len(texts[n_eval])
        n_eval += 1
    eval_texts, train_texts = texts[:n_eval], texts[n_eval:]
    tokenizer = train_byte_level_tokenizer(train_texts, vocab_size=vocab_size)
    eos = tokenizer.eos_token_id
    eval_ids = _encode(tokenizer, eval_texts, eos)
    parts, n_train = [], 0
    used_docs, used_chars, chunk = 0, 0, 2000
    while n_train < train_tokens and used_docs < len(train_texts):
        batch = train_texts[used_docs : used_docs + chunk]
        parts.append(_encode(tokenizer, batch, eos))
        n_train += len(parts[-1])
        used_docs += len(batch)
        used_chars += sum(len(t) for t in batch)
    train_ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    if len(train_ids) < train_tokens or len(eval_ids) < eval_tokens:
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
        "eval_documents": n_eval,
        "train_documents_used": used_docs,
        "train_characters_used": used_chars,
        "train_tokens_written": len(train_ids),
        "chars_per_token": used_chars / max(1, len(train_ids)),
        "vocab_size": len(tokenizer),
        "seconds": round(time.perf_counter() - start, 1),
        "read_seconds": round(read_s, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


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
