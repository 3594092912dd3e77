"""Streamed text: token ids to text as they arrive (:class:`StreamDecoder`), cut at stop strings (:class:`StopScanner`)."""

from __future__ import annotations

from collections.abc import Sequence


class StreamDecoder:
    """Turns token ids into text as they arrive, holding back incomplete multi-byte characters.

    It decodes the whole sequence (prompt included, so leading spaces come out right) and emits
    what is new; text ending in U+FFFD (an unfinished UTF-8 byte sequence) waits for more bytes.
    """

    def __init__(self, tokenizer, prefix_ids: list[int]):
        self.tok = tokenizer
        self.ids = list(prefix_ids)
        self.emitted = tokenizer.decode(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        return self._emit(self.tok.decode(self.ids))

    def _emit(self, text: str) -> str:
        n = len(self.emitted) if text.startswith(self.emitted) else _common_prefix(text, self.emitted)
        new, self.emitted = text[n:], text
        return new


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class StopScanner:
    """Cuts streamed text at the first stop string. :meth:`push` returns what can be shown now, holding back
    a tail that may be the start of a stop string; ``stopped`` turns True once one appeared."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.held += text
        hits = [i for s in self.stop if (i := self.held.find(s)) >= 0]
        if hits:
            out, self.held, self.stopped = self.held[:min(hits)], "", True
            return out
        keep = max((k for s in self.stop for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        """The held-back tail, once the text has ended without a stop string."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out
