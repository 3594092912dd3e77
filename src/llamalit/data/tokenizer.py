"""SentencePiece tokenizers: load, train with llama2.c's settings, export llama2.c's ``tokenizer.bin``."""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm

from llamalit.data.download import cached_download, is_url, sha256_file
from llamalit.utils.fileio import atomic_path

TRAIN_PREFIX = "train:"


class TokenizerError(ValueError):
    """A tokenizer that cannot be used; the message says which and what to do."""


class Tokenizer:
    """A SentencePiece model: ``encode(text, bos, eos)``, ``decode(ids)``, ``bos_id``, ``eos_id``, ``vocab_size``."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: tokenizer model not found; check data.tokenizer "
                                 f"(a .model path or URL, or train:N)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({e})") from e
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{self.path}: the model has no BOS or EOS piece (bos {self.bos_id}, "
                                 f"eos {self.eos_id}); train it with bos_id/eos_id set")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS in front / EOS at the end when asked."""
        return self.sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = 1) -> list[list[int]]:
        """:meth:`encode` of many texts in one call (much faster than a Python loop)."""
        return self.sp.encode(list(texts), add_bos=bos, add_eos=eos, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

    def pieces(self) -> list[tuple[str, float]]:
        """Every piece with its score, in id order: what decides how text is split and what each id means."""
        return [(self.sp.id_to_piece(i), self.sp.get_score(i)) for i in range(self.vocab_size)]

    def same_as(self, other: Tokenizer) -> bool:
        """True when both split text the same way into the same ids (the same file, or the same pieces)."""
        return self.sha256 == other.sha256 or (
            self.vocab_size == other.vocab_size and (self.bos_id, self.eos_id) == (other.bos_id, other.eos_id)
            and self.pieces() == other.pieces())

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def check_vocab_fits(vocab_size: int, dtype: str = "uint16", source: str = "tokenizer") -> None:
    """Refuse a vocabulary whose ids do not fit the token dtype of the shards."""
    limit = int(np.iinfo(np.dtype(dtype)).max) + 1
    if vocab_size > limit:
        raise TokenizerError(f"{source}: vocab_size {vocab_size} does not fit token dtype {dtype} (at most "
                             f"{limit} ids); use a tokenizer with at most {limit} pieces")


def parse_train_spec(spec: str) -> int | None:
    """N for ``train:N``, None for anything else."""
    if not str(spec).startswith(TRAIN_PREFIX):
        return None
    try:
        n = int(str(spec)[len(TRAIN_PREFIX):])
    except ValueError as e:
        raise TokenizerError(f"data.tokenizer={spec!r}: expected train:N with an integer N, e.g. train:512") from e
    if n < 260:
        raise TokenizerError(f"data.tokenizer={spec!r}: N must be at least 260 (256 byte pieces + specials)")
    check_vocab_fits(n, source=f"data.tokenizer={spec}")
    return n


def fetch_tokenizer(spec: str, cache_dir: str | Path, sha256: str | None = None,
                    key: str = "data.tokenizer") -> Path:
    """The local file of a tokenizer given as a path or URL (URLs are downloaded into the cache).

    ``key``: the caller's config key, named in errors (``tokenizer`` for generate.py and export.py).
    """
    if is_url(spec):
        return cached_download(str(spec), cache_dir, sha256=sha256)
    path = Path(spec).expanduser()
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "no such file"
        also = ", or train:N to train one" if key == "data.tokenizer" else ""
        raise TokenizerError(f"{key}={spec!r}: {what}; give a SentencePiece .model path or URL{also}")
    if sha256 is not None and (digest := sha256_file(path)) != sha256.lower():
        raise TokenizerError(f"{path}: sha256 {digest} differs from the configured {sha256}")
    return path


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path,
                    hard_vocab_limit: bool = True, num_threads: int | None = None) -> Path:
    """Train a BPE SentencePiece model with llama2.c's ``train_vocab`` settings; write it to ``out_path``."""
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="llamalit-spm-") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        n_lines = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for text in texts:
                for line in text.splitlines():
                    if line.strip():
                        f.write(line + "\n")
                        n_lines += 1
        if n_lines == 0:
            raise TokenizerError(f"train:{vocab_size}: no text to train the tokenizer on; check data.source")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(Path(tmp) / "tok"), model_type="bpe",
                vocab_size=vocab_size, input_format="text",
                character_coverage=1.0, num_threads=num_threads or os.cpu_count() or 1,
                split_digits=True, allow_whitespace_only_pieces=True, byte_fallback=True,
                unk_surface=r" \342\201\207 ", normalization_rule_name="identity",
                hard_vocab_limit=hard_vocab_limit, minloglevel=2)
        except RuntimeError as e:
            raise _train_error(vocab_size, str(e)) from e
        with atomic_path(out_path) as dst:
            shutil.copyfile(Path(tmp) / "tok.model", dst)
    return out_path


def _train_error(vocab_size: int, message: str) -> TokenizerError:
    """A TokenizerError that says which way to move N, from SentencePiece's own message."""
    if m := re.search(r"smaller than required_chars\. *\d+ vs (\d+)", message):
        need = int(m.group(1))
        return TokenizerError(
            f"train:{vocab_size}: too few pieces; SentencePiece needs a vocabulary of at least {need} for this "
            f"corpus (256 byte pieces, the special pieces and every distinct character); use a larger N, "
            f"train:{need} or more")
    if m := re.search(r"too high \(\d+\)\. Please set it to a value <= (\d+)", message):
        most = int(m.group(1))
        return TokenizerError(
            f"train:{vocab_size}: the corpus is too small for {vocab_size} pieces (SentencePiece can make at "
            f"most {most}); use a smaller N, train:{most} or less, or train on more text")
    return TokenizerError(f"train:{vocab_size}: SentencePiece could not train this vocabulary ({message}); "
                          "check N and the training text")


def write_llama2c_tokenizer_bin(model_path: str | Path, out_path: str | Path) -> Path:
    """llama2.c's ``tokenizer.bin``: uint32 max_token_length, then per id float32 score, uint32 length, bytes."""
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tokens, scores = [], []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if i == sp.bos_id():
            piece = "\n<s>\n"
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    blob = [struct.pack("<I", max(len(t) for t in tokens))]
    for token, score in zip(tokens, scores):
        blob.append(struct.pack("<fI", score, len(token)))
        blob.append(token)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(b"".join(blob))
    return Path(out_path)


def read_llama2c_tokenizer_bin(path: str | Path, vocab_size: int) -> tuple[int, list[tuple[float, bytes]]]:
    """Parse a ``tokenizer.bin`` of ``vocab_size`` entries: (max_token_length, [(score, piece bytes)])."""
    data = Path(path).read_bytes()
    (max_len,), pos, entries = struct.unpack_from("<I", data), 4, []
    for _ in range(vocab_size):
        score, n = struct.unpack_from("<fI", data, pos)
        entries.append((score, data[pos + 8: pos + 8 + n]))
        pos += 8 + n
    if pos != len(data):
        raise TokenizerError(f"{path}: {len(data) - pos} bytes left after {vocab_size} entries")
    return max_len, entries
