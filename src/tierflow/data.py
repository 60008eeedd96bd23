"""Built-in training data that needs no download.

Three sources, all turned into packed token windows for a causal LM:

* the Python standard library's ``.py`` sources (present on every machine
  that runs Python; the default),
* a plain text file (any extension but ``.jsonl``),
* a ``.jsonl`` file with a ``"text"`` field on every line.

Tokens come from :class:`ByteTokenizer` (one id per UTF-8 byte) or, when a
local Hugging Face model directory ships a tokenizer, from that tokenizer
(:func:`load_tokenizer`). Documents are wrapped as ``BOS doc EOS`` and
concatenated; the stream is cut into windows of ``seq_len`` tokens, so no
window is padded except the very last one of a finite pass. Everything is
deterministic given ``seed``.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import torch

from tierflow.errors import ConfigError

#: Folders inside the stdlib tree that hold installed packages, not the stdlib.
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}

#: Characters of text handed to a tokenizer at a time (bounds memory).
_CHUNK_CHARS = 1 << 16


class Tokenizer(Protocol):
    """What :func:`text_batches` needs from a tokenizer."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int
    vocab_size: int

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of ``text``, without special tokens."""


@dataclass(frozen=True)
class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then 3 specials.

    ``BOS = 256``, ``EOS = 257``, ``PAD = 258``, so ``vocab_size`` is 259.
    The built-in models use an embedding of :data:`BYTE_VOCAB_PADDED` (320)
    rows: a multiple of 64 keeps the output matmul on fast kernel shapes, and
    the 61 spare rows are simply never produced as targets.
    """

    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258
    vocab_size: int = 259

    def encode(self, text: str | bytes) -> list[int]:
        """One id per UTF-8 byte of ``text``."""
        data = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
        return list(data)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special ids are dropped."""
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    def describe(self) -> str:
        """Which tokenizer this is, for messages."""
        return f"bytes (ids 0-255, BOS/EOS/PAD {self.bos_id}/{self.eos_id}/{self.pad_id})"

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write this tokenizer as a Hugging Face fast tokenizer (tokenizer.json +
        tokenizer_config.json) with the same ids: byte-level, no merges. `AutoTokenizer` loads
        it; :func:`load_tokenizer` recognises it and gives a :class:`ByteTokenizer` back."""
        _byte_level_hf_tokenizer().save_pretrained(str(directory))


#: Embedding rows the built-in models reserve for :class:`ByteTokenizer`.
BYTE_VOCAB_PADDED = 320


class HFTokenizer:
    """Adapter giving a ``transformers`` tokenizer the :class:`Tokenizer` shape."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        tokenizer.model_max_length = 1 << 60  # we window ourselves; silence length warnings
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.vocab_size = len(tokenizer)

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def describe(self) -> str:
        """Which tokenizer this is, for messages."""
        source = getattr(self.tokenizer, "name_or_path", "") or "?"
        return f"{type(self.tokenizer).__name__} from {source} ({self.vocab_size} tokens)"

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The tokenizer's own files, as ``transformers`` writes them."""
        self.tokenizer.save_pretrained(str(directory))


#: Names of ByteTokenizer's special ids in its Hugging Face form.
_BYTE_SPECIALS = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258}


def _byte_level_vocab() -> dict[str, int]:
    """Token -> id of the byte tokenizer in Hugging Face's byte-level alphabet (GPT-2's map of
    the 256 bytes to printable characters), the specials after the bytes."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    vocab, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            vocab[chr(byte)] = byte
        else:
            vocab[chr(256 + extra)] = byte
            extra += 1
    return {**vocab, **_BYTE_SPECIALS}


def _byte_level_hf_tokenizer():
    """:class:`ByteTokenizer` as a ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(vocab=_byte_level_vocab(), merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    names = {v: k for k, v in _BYTE_SPECIALS.items()}
    byte = ByteTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=names[byte.bos_id],
                                   eos_token=names[byte.eos_id], pad_token=names[byte.pad_id])


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a local HF model directory, else :class:`ByteTokenizer`.

    Only local files are read (``HF_HUB_OFFLINE=1``, ``local_files_only``);
    a directory without tokenizer files, or ``None`` / a built-in model
    name, gives the byte tokenizer.
    """
    if model_path is None or not Path(model_path).is_dir():
        return ByteTokenizer()
    path = Path(model_path)
    if not has_tokenizer(path):
        return ByteTokenizer()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer in {path}: {exc}") from exc
    if len(tok) == ByteTokenizer.vocab_size and tok.get_vocab() == _byte_level_vocab():
        return ByteTokenizer()  # written by ByteTokenizer.save_pretrained (tierflow train --export)
    return HFTokenizer(tok)


def has_tokenizer(model_path: str | os.PathLike) -> bool:
    """Whether directory ``model_path`` ships tokenizer files."""
    return any((Path(model_path) / name).exists() for name in _TOKENIZER_FILES)


def stdlib_text_files() -> list[Path]:
    """The standard library's ``.py`` files, sorted by path (deterministic).

    Installed packages (``site-packages``) and byte-code caches are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _NOT_STDLIB)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files)


def _stdlib_documents(rng: random.Random) -> Iterator[bytes]:
    """The stdlib sources as bytes, one document per file, in shuffled order."""
    files = stdlib_text_files()
    rng.shuffle(files)
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue  # unreadable file (permissions, race with an uninstall)
        if data:
            yield data


def _text_documents(path: Path) -> Iterator[str]:
    """A text file as one document, read in pieces of whole lines."""
    with path.open("r", encoding="utf-8", errors="replace") as f:
        piece: list[str] = []
        size = 0
        for line in f:
            piece.append(line)
            size += len(line)
            if size >= _CHUNK_CHARS:
                yield "".join(piece)
                piece, size = [], 0
        if piece:
            yield "".join(piece)


def _jsonl_documents(path: Path, rng: random.Random) -> Iterator[str]:
    """The ``"text"`` field of every line of a ``.jsonl`` file, shuffled."""
    texts = []
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}:{exc.colno}: not valid JSON at line {number}, column "
                                  f"{exc.colno} ({exc.msg}): fix or remove that line") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f'{path}:{number}: each line needs a string "text" field (line {number})')
            texts.append(record["text"])
    rng.shuffle(texts)
    return iter(texts)


def _check_source(source: str | os.PathLike | None) -> Path | None:
    """``None`` for the stdlib, else the existing file ``source`` names."""
    if source is None or source == "stdlib":
        return None
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"data file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"data must be a .txt or .jsonl file, not a directory: {path}")
    return path


def _token_stream(path: Path | None, tokenizer: Tokenizer, rng: random.Random) -> Iterator[int]:
    """One pass over the source as a flat token stream: ``BOS doc EOS ...``."""
    if path is None:
        documents: Iterable[str | bytes] = _stdlib_documents(rng)
        whole = True
    elif path.suffix == ".jsonl":
        documents = _jsonl_documents(path, rng)
        whole = True
    else:
        documents, whole = _text_documents(path), False
    if not whole:  # one long document cut into pieces
        started = False
        for piece in documents:
            ids = tokenizer.encode(piece)
            if ids and not started and tokenizer.bos_id is not None:
                yield tokenizer.bos_id
            started = started or bool(ids)
            yield from ids
        if started and tokenizer.eos_id is not None:
            yield tokenizer.eos_id
        return
    for doc in documents:
        ids = tokenizer.encode(doc)
        if not ids:
            continue
        if tokenizer.bos_id is not None:
            yield tokenizer.bos_id
        yield from ids
        if tokenizer.eos_id is not None:
            yield tokenizer.eos_id


def _windows(stream: Iterator[int], seq_len: int) -> Iterator[list[int]]:
    """Consecutive windows of ``seq_len`` ids; the last one may be shorter."""
    window: list[int] = []
    for token in stream:
        window.append(token)
        if len(window) == seq_len:
            yield window
            window = []
    if window:
        yield window


def _collate(windows: list[list[int]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Stack windows into an HF causal-LM batch; padding is masked out of the loss."""
    batch = len(windows)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, seq_len), dtype=torch.long)
    for row, window in enumerate(windows):
        input_ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        mask[row, : len(window)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)  # HF shifts labels itself
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def text_batches(
    source: str | os.PathLike | None,
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    seed: int = 0,
    repeat: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{"input_ids", "attention_mask", "labels"}`` of shape ``[B, L]``.

    ``source`` is ``None`` (or ``"stdlib"``) for the standard library, else a
    path to a ``.txt`` / ``.jsonl`` file. With ``repeat`` the data cycles
    forever, each pass in a new order drawn from ``seed``; without it, one
    pass is made and the last batch may be smaller. Raises
    :class:`~tierflow.errors.ConfigError` for a missing file, a ``.jsonl``
    line without ``"text"``, or a source with no text at all.
    """
    if batch_size < 1 or seq_len < 2:
        raise ConfigError(f"need batch_size >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
    path = _check_source(source)  # checked now, before the first batch is asked for
    return _batches(_passes(path, tokenizer, random.Random(seed), repeat), tokenizer, batch_size, seq_len)


def _batches(
    stream: Iterator[int], tokenizer: Tokenizer, batch_size: int, seq_len: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Group the windows of ``stream`` into collated batches."""
    rows: list[list[int]] = []
    for window in _windows(stream, seq_len):
        rows.append(window)
        if len(rows) == batch_size:
            yield _collate(rows, seq_len, tokenizer.pad_id)
            rows = []
    if rows:  # only reached without repeat: the last, smaller batch
        yield _collate(rows, seq_len, tokenizer.pad_id)


def _passes(path: Path | None, tokenizer: Tokenizer, rng: random.Random, repeat: bool) -> Iterator[int]:
    """Token stream over one pass, or endless passes (each reshuffled) with ``repeat``."""
    while True:
        count = 0
        for token in _token_stream(path, tokenizer, rng):
            count += 1
            yield token
        if count == 0:
            where = "the standard library" if path is None else str(path)
            raise ConfigError(f"no text found in {where}")
        if not repeat:
            return
