"""Record readers and prompt text for the supported corpora (FORMATS.md): TinyStories, Alpaca, Dolly.

Every reader raises :class:`DataFormatError` naming the file, the record index and what to do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

FORMATS = ("tinystories", "alpaca", "dolly")

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_FIRST_SENTENCE = re.compile(r"^.*?\.(?=\s)", re.S)


class DataFormatError(ValueError):
    """A corpus file or record that cannot be used; the message says which and what to do."""


def shorten_prompt(prompt: str) -> str:
    """Instruct Llama's prompt shortening (FORMATS.md): ``Write a story. ... Possible story:``."""
    text = prompt.strip()
    if not text.startswith("Write a story."):
        text = _FIRST_SENTENCE.sub("Write a story.", text, count=1)
    text = text.replace(" Remember to only use simple words!", "")
    text = text.replace("\n\nPossible story:", "").replace("try to at some point use", "try to use")
    return text.strip() + " Possible story:"


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca template; the shorter variant when ``input_text`` is empty."""
    if input_text.strip():
        return ALPACA_TEMPLATE.format(instruction=instruction.strip(), input=input_text.strip())
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction.strip())


def prompt_format(kind: str, fmt: str) -> str:
    """The name of the prompt format data of ``kind`` (pretrain/instruct) and corpus ``fmt`` teaches a model
    (``llamalit.inference.templates``): ``instruct_stories`` (:func:`shorten_prompt`, then BOS and the story),
    ``alpaca`` (:func:`alpaca_prompt`, Alpaca and Dolly), or ``plain`` (pretraining: text continues)."""
    if kind == "pretrain":
        return "plain"
    if kind == "instruct" and fmt in FORMATS:
        return "instruct_stories" if fmt == "tinystories" else "alpaca"
    raise DataFormatError(f"data.kind={kind!r} / data.format={fmt!r}: unknown; use kind pretrain or instruct "
                          f"and a format of {FORMATS}")


def read_records(path: str | Path) -> list:
    """All records of a JSON array file, a JSONL file (``.jsonl``) or a Parquet table (``.parquet``, as
    Hugging Face Hub datasets ship; needs pyarrow), with clear errors."""
    path = Path(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DataFormatError(f"{path}: file not found; check data.source") from e
    except (PermissionError, IsADirectoryError, UnicodeDecodeError, OSError) as e:
        raise DataFormatError(f"{path}: cannot read it ({e}); fix its permissions or re-download it") from e
    if not text.strip():
        return []  # an empty file: no records (the caller says so, with what it needed)
    if path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}: record {len(records)} (line {i + 1}) is not valid JSON "
                                      f"({e.msg}); fix or re-download the file") from e
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        index = _record_index_at(text, e.pos)
        raise DataFormatError(f"{path}: invalid JSON near record {index} (line {e.lineno}, column {e.colno}: "
                              f"{e.msg}); fix or re-download the file") from e
    if not isinstance(records, list):
        raise DataFormatError(f"{path}: expected a JSON array of records, found {type(records).__name__}")
    return records


def _read_parquet(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataFormatError(f"{path}: a Parquet file, and reading it needs pyarrow: pip install pyarrow") from e
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise DataFormatError(f"{path}: not a readable Parquet file ({e}); fix or re-download it") from e


def _record_index_at(text: str, pos: int) -> int:
    """Index of the top-level array element that contains character ``pos`` (for error messages)."""
    depth, index, in_str, escape = 0, 0, False, False
    for ch in text[:pos]:
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 1:
            index += 1
    return index


def _field(record, key: str, path: Path, index: int, kinds: Sequence[type] = (str,)):
    if not isinstance(record, dict):
        raise DataFormatError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
    if key not in record:
        raise DataFormatError(f"{path}: record {index} has no {key!r} field (keys: {sorted(record)}); "
                              f"is data.format right for this file?")
    value = record[key]
    if not isinstance(value, tuple(kinds)):
        raise DataFormatError(f"{path}: record {index} field {key!r} is a {type(value).__name__}, "
                              f"expected {' or '.join(k.__name__ for k in kinds)}")
    return value


def story_text(record, path: Path, index: int) -> str:
    """The stripped ``story`` of a TinyStories record."""
    return _field(record, "story", path, index).strip()


def tinystories_pair(record, path: Path, index: int) -> tuple[str, str]:
    """(shortened prompt, story) of a TinyStories record with an ``instruction``."""
    instruction = _field(record, "instruction", path, index, (dict,))
    prompt = _field(instruction, "prompt:", path, index)
    return shorten_prompt(prompt), story_text(record, path, index)


def alpaca_pair(record, path: Path, index: int) -> tuple[str, str]:
    """(templated prompt, response) of an Alpaca record."""
    instruction = _field(record, "instruction", path, index)
    input_text = record.get("input") or ""
    return alpaca_prompt(instruction, input_text), _field(record, "output", path, index).strip()


def dolly_pair(record, path: Path, index: int) -> tuple[str, str]:
    """(templated prompt, response) of a Dolly record; ``context`` plays the Alpaca ``input``."""
    instruction = _field(record, "instruction", path, index)
    context = record.get("context") or ""
    return alpaca_prompt(instruction, context), _field(record, "response", path, index).strip()


PAIR_READERS = {"tinystories": tinystories_pair, "alpaca": alpaca_pair, "dolly": dolly_pair}


def text_for_kind(kind: str, fmt: str, record, path: Path, index: int) -> tuple[str | None, str]:
    """(prompt or None, text) of one record for ``kind`` (pretrain/instruct) and corpus ``fmt``."""
    if fmt not in FORMATS:
        raise DataFormatError(f"data.format={fmt!r} is unknown; use one of {FORMATS}")
    if kind == "pretrain":
        if fmt == "tinystories":
            return None, story_text(record, path, index)
        prompt, response = PAIR_READERS[fmt](record, path, index)
        return None, prompt + response
    if kind == "instruct":
        return PAIR_READERS[fmt](record, path, index)
    raise DataFormatError(f"data.kind={kind!r} is unknown; use 'pretrain' or 'instruct'")
