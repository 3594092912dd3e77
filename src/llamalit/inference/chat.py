"""A terminal conversation with a model: history in the model's prompt format, the oldest turns dropped (with
a notice) when the context fills, replies streamed as they are decoded, tokens/s after each.

Commands: ``/reset`` (forget the conversation), ``/exit`` (or end of input), ``/set KEY VALUE`` for
``temperature``, ``top_k``, ``top_p``, ``max_new_tokens``, ``seed`` (``null`` clears), ``/help``. Ctrl-C
stops a reply (what came so far is kept) and, at the prompt, ends the session.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TextIO

from llamalit.inference.generate import check_sampling_args, generate_stream
from llamalit.inference.streaming import StopScanner, StreamDecoder
from llamalit.inference.templates import Template

SETTINGS = ("temperature", "top_k", "top_p", "max_new_tokens", "seed")
HELP = ("commands: /reset (forget the conversation), /exit, /set KEY VALUE (KEY one of "
        f"{', '.join(SETTINGS)}; VALUE null clears), /help")


class ContextFull(ValueError):
    """The newest message alone does not fit the model's context."""


def fit_messages(messages: list[dict[str, str]], count: Callable[[list[dict[str, str]]], int],
                 limit: int) -> tuple[list[dict[str, str]], int]:
    """The most recent turns of ``messages`` whose prompt (``count``: its token count) is at most ``limit``.

    A turn is a user message and the replies after it; whole turns go, oldest first; a leading system
    message and the last turn always stay. Returns (kept messages, number of messages dropped).
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"] or [0]
    for start in starts:
        if start == starts[-1] or count(system + rest[start:]) <= limit:
            return system + rest[start:], start
    return messages, 0  # unreachable: the loop returns at the last start


class ChatSession:
    """One conversation with ``model`` in ``template``'s format; :meth:`reply` streams to ``out``, notices
    (dropped turns, tokens/s, setting changes) go to ``info``."""

    def __init__(self, model, tok, template: Template, settings: dict, out: TextIO, info: TextIO,
                 system: str | None = None):
        self.model, self.tok, self.template = model, tok, template
        self.settings = {k: settings.get(k) for k in SETTINGS}
        self.check(self.settings)
        self.stop_at_eos = settings.get("stop_at_eos", True)
        self.out, self.info = out, info
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    @staticmethod
    def check(s: dict) -> None:
        check_sampling_args(s["max_new_tokens"] or 1, s["temperature"], s["top_k"], s["top_p"], s["seed"])

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    @property
    def max_seq_len(self) -> int:
        return self.model.cfg.max_seq_len

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.template.encode(self.tok, self.template.format_chat(messages))

    def fit(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[int]]:
        """The messages to send and their prompt ids: room for ``max_new_tokens`` (at most half the context)
        after the prompt, dropping the oldest turns for it; a ContextFull when the newest message alone
        leaves no room for one token."""
        want = min(self.settings["max_new_tokens"] or self.max_seq_len, self.max_seq_len // 2)
        kept, dropped = fit_messages(messages, lambda ms: len(self.prompt_ids(ms)), self.max_seq_len - want)
        ids = self.prompt_ids(kept)
        if len(ids) >= self.max_seq_len:
            raise ContextFull(f"this message makes a prompt of {len(ids)} tokens and the model's context holds "
                              f"{self.max_seq_len}; send a shorter one (or /reset)")
        if dropped:
            print(f"[context: dropped the {dropped} oldest message(s) to fit {self.max_seq_len} tokens]",
                  file=self.info, flush=True)
        return kept, ids

    def reply(self, text: str) -> str:
        """Add the user's ``text``, stream the model's reply, add it to the history and return it."""
        try:
            self.messages, ids = self.fit([*self.messages, {"role": "user", "content": text}])
        except ContextFull as e:
            print(f"error: {e}", file=self.info, flush=True)
            return ""
        s = self.settings
        room = self.max_seq_len - len(ids)
        max_new = min(s["max_new_tokens"] or room, room)  # never past the context
        decoder, stops = StreamDecoder(self.tok, ids[-1:]), StopScanner(self.template.stop)
        pieces, n, start = [], 0, time.perf_counter()
        started = self.template.continuation
        stream = generate_stream(self.model, ids, max_new, temperature=s["temperature"], top_k=s["top_k"],
                                 top_p=s["top_p"], eos_id=self.tok.eos_id if self.stop_at_eos else None,
                                 seed=s["seed"])
        try:
            for token in stream:
                n += 1
                if token == self.tok.eos_id and self.stop_at_eos:
                    break
                piece = stops.push(decoder.push(token))
                if not started:  # a reply of its own starts at its first visible character
                    piece = piece.lstrip()
                    started = bool(piece)
                self._show(piece, pieces)
                if stops.stopped:
                    break
            self._show(stops.push(decoder.flush()) + stops.flush(), pieces)
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        finally:
            stream.close()
        seconds = time.perf_counter() - start
        self.out.write("\n")
        self.out.flush()
        print(f"[{n} tokens in {seconds:.2f} s: {n / max(seconds, 1e-9):.1f} tokens/s]", file=self.info, flush=True)
        reply = "".join(pieces)
        self.messages.append({"role": "assistant", "content": reply})
        return reply

    def _show(self, piece: str, pieces: list[str]) -> None:
        if piece:
            pieces.append(piece)
            self.out.write(piece)
            self.out.flush()

    def set(self, key: str, value: str) -> None:
        """``/set KEY VALUE``: a sampling setting, checked (a ValueError names a bad one)."""
        if key not in SETTINGS:
            raise ValueError(f"/set {key}: unknown setting; use one of {', '.join(SETTINGS)}")
        new = dict(self.settings)
        new[key] = _parse_value(value)
        self.check(new)
        self.settings = new

    def command(self, line: str) -> bool:
        """Run a ``/`` command; False when the session should end."""
        words = line.split()
        name = words[0].lower()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.reset()
            print("[conversation reset]", file=self.info, flush=True)
        elif name == "/set" and len(words) == 3:
            try:
                self.set(words[1], words[2])
                print(f"[{words[1]} = {self.settings[words[1]]}]", file=self.info, flush=True)
            except ValueError as e:
                print(f"error: {e}", file=self.info, flush=True)
        elif name == "/set":
            print(f"error: /set takes a key and a value, e.g. /set temperature 0.5 ({', '.join(SETTINGS)})",
                  file=self.info, flush=True)
        else:
            print(HELP if name == "/help" else f"error: unknown command {name}; {HELP}", file=self.info, flush=True)
        return True


def _parse_value(value: str) -> int | float | None:
    if value.lower() in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ValueError(f"/set: {value!r} is not a number (or null)")


def run_session(session: ChatSession, lines: Iterable[str] | None = None, prompt: str = ">> ") -> None:
    """Read lines (``input()`` when ``lines`` is None) until ``/exit`` or the end of input, answering each."""
    source = iter(lines) if lines is not None else None
    while True:
        try:
            line = next(source) if source is not None else input(prompt)
        except (EOFError, StopIteration, KeyboardInterrupt):
            session.out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        session.reply(line)
