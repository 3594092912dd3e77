"""Prompt formats: how a conversation or an instruction becomes the text a model was trained to answer.

A :class:`Template` renders OpenAI-style messages (``{"role": "system"|"user"|"assistant", "content": ...}``)
with :meth:`~Template.format_chat`, or one instruction with :meth:`~Template.format_instruction`; the text
ends where the model's reply starts. BOS and EOS inside the text are written as the tokenizer's markers
(``<s>``, ``</s>``), as Hugging Face chat templates do; :meth:`~Template.encode` turns them into the ids and
puts BOS in front when ``add_bos``. ``stop`` lists the strings that end a reply (EOS always does).

- ``instruct_stories``: our TinyStories instruct rows, ``<prompt><s><story></s>`` with the prompt shortened as
  the data was (:func:`llamalit.data.text_formats.shorten_prompt`, ``Write a story. ... Possible story:``).
- ``alpaca``: the Alpaca template (:func:`llamalit.data.text_formats.alpaca_prompt`), BOS + prompt + response +
  EOS, as our Alpaca and Dolly data are built.
- ``llama2_chat``: Meta's Llama 2 chat format, ``<s>[INST] <<SYS>>\\n...\\n<</SYS>>\\n\\n... [/INST] ... </s>``.
- ``hf_chat_template``: the ``chat_template`` of a checkpoint's ``tokenizer_config.json`` (or its
  ``chat_template.jinja``), rendered as transformers renders it.
- ``plain``: continuation; the text as given.

:func:`template_for` picks the one a checkpoint was trained with (see its docstring).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from llamalit.data.text_formats import ALPACA_TEMPLATE_NO_INPUT, alpaca_prompt, prompt_format, shorten_prompt
from llamalit.inference.streaming import StopScanner

Message = Mapping[str, str]
ROLES = ("system", "user", "assistant")
STORY_START = "Write a story."
STORY_END = "Possible story:"
ALPACA_REPLY = ALPACA_TEMPLATE_NO_INPUT.rsplit("\n\n", 1)[-1]  # "### Response:\n": where the response starts
# end-of-turn markers of common chat templates: a stop string when the template writes one
_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class TokenizerLike(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...


def check_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` dicts of ``messages``; a ValueError naming the first bad one."""
    if not messages:
        raise ValueError("messages: the list is empty; give at least one user message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: {m!r} is not a message; each is {{'role': one of {ROLES}, "
                             "'content': a string}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


@dataclass
class Template:
    """A prompt format. Subclasses implement :meth:`format_chat`; the rest follows from it."""

    name: str = "plain"
    stop: list[str] = field(default_factory=list)
    add_bos: bool = True
    bos_token: str = "<s>"
    eos_token: str = "</s>"

    def format_chat(self, messages: Sequence[Message]) -> str:
        """The conversation as text, ending where the assistant's next reply starts."""
        raise NotImplementedError

    def format_instruction(self, instruction: str, input: str = "") -> str:  # noqa: A002 (Alpaca's name)
        """One instruction (and optional input) as a single user turn."""
        text = instruction.strip() + (f"\n\n{input.strip()}" if input.strip() else "")
        return self.format_chat([{"role": "user", "content": text}])

    @property
    def continuation(self) -> bool:
        """True when the reply continues the text (keep its leading space); False: a reply of its own."""
        return False

    def encode(self, tok: TokenizerLike, text: str) -> list[int]:
        """Token ids of ``text``: BOS first when ``add_bos``; the BOS/EOS markers in it become those ids and
        the text between them is encoded piece by piece (as the training data encodes prompt and answer)."""
        ids = [tok.bos_id] if self.add_bos and not text.startswith(self.bos_token) else []
        markers = sorted({self.bos_token, self.eos_token} - {""}, key=len, reverse=True)
        for part in re.split("(" + "|".join(map(re.escape, markers)) + ")", text) if markers else [text]:
            if part == self.bos_token:
                ids.append(tok.bos_id)
            elif part == self.eos_token:
                ids.append(tok.eos_id)
            elif part:
                for piece in self._pieces(part):
                    ids += tok.encode(piece, bos=False, eos=False)
        return ids

    def _pieces(self, text: str) -> list[str]:
        """Parts of ``text`` the training data encoded separately (between BOS/EOS markers: one)."""
        return [text]


def stories_prompt(text: str) -> str:
    """A user's story request in the shortened Instruct TinyStories form the model learned: a dataset prompt
    (``Write a short story ...``) is shortened as the data was; anything else gets ``Write a story.`` in front;
    both end in ``Possible story:``."""
    text = text.strip()
    text = text[: -len(STORY_END)].rstrip() if text.endswith(STORY_END) else text
    if not text.startswith(("Write a short story", STORY_START)):
        text = f"{STORY_START} {text}"
    return shorten_prompt(text)


@dataclass
class InstructStories(Template):
    """``<prompt><s><story></s>`` per turn (the prompt is not preceded by BOS); system messages are not part
    of the format and are left out."""

    name: str = "instruct_stories"
    add_bos: bool = False

    def format_chat(self, messages: Sequence[Message]) -> str:
        out = []
        for m in check_messages(messages):
            if m["role"] == "user":
                out.append(stories_prompt(m["content"]) + self.bos_token)
            elif m["role"] == "assistant":
                out.append(m["content"].strip() + self.eos_token)
        return "".join(out)

    def format_instruction(self, instruction: str, input: str = "") -> str:  # noqa: A002
        return self.format_chat([{"role": "user", "content": f"{instruction.strip()} {input.strip()}".strip()}])


@dataclass
class Alpaca(Template):
    """BOS + Alpaca prompt + response + EOS per turn; a system message is put before the first
    instruction's text. The instruction's input goes in the template's ``### Input:`` section."""

    name: str = "alpaca"
    stop: list[str] = field(default_factory=lambda: ["### Instruction:", "### Input:", "### Response:"])

    def format_chat(self, messages: Sequence[Message]) -> str:
        return self._render([(m["role"], m["content"], "") for m in check_messages(messages)])

    def format_instruction(self, instruction: str, input: str = "") -> str:  # noqa: A002
        return self._render([("user", instruction, input)])

    def _pieces(self, text: str) -> list[str]:
        """The prompt and the response are encoded apart, as the data encodes them (so a reply in the
        history has the ids training saw)."""
        return [p for p in re.split(f"(?<={re.escape(ALPACA_REPLY)})", text) if p]

    def _render(self, turns: list[tuple[str, str, str]]) -> str:
        out, system = "", ""
        for role, content, extra in turns:
            if role == "system":
                system = f"{system}\n\n{content.strip()}".strip()
            elif role == "user":
                text = f"{system}\n\n{content.strip()}".strip() if system else content
                out += (self.bos_token if out else "") + alpaca_prompt(text, extra)
                system = ""
            else:
                out += content.strip() + self.eos_token
        return out


@dataclass
class Llama2Chat(Template):
    """Meta's Llama 2 chat format, as its reference code and its Hugging Face ``chat_template`` write it."""

    name: str = "llama2_chat"
    stop: list[str] = field(default_factory=lambda: ["[INST]"])
    add_bos: bool = False  # the text carries its BOS markers

    def format_chat(self, messages: Sequence[Message]) -> str:
        msgs = check_messages(messages)
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        out = []
        for i, m in enumerate(msgs[1:] if system is not None else msgs):
            if (m["role"] == "user") != (i % 2 == 0):
                raise ValueError(f"messages: llama2_chat needs user and assistant turns alternating after an "
                                 f"optional system message; turn {i} is {m['role']!r}")
            content = m["content"]
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            if m["role"] == "user":
                out.append(f"{self.bos_token}[INST] {content.strip()} [/INST]")
            else:
                out.append(f" {content.strip()} {self.eos_token}")
        return "".join(out)


@dataclass
class Plain(Template):
    """Continuation: the messages' texts one per line; an assistant message continues the text before it."""

    name: str = "plain"

    @property
    def continuation(self) -> bool:
        return True

    def format_chat(self, messages: Sequence[Message]) -> str:
        out = ""
        for m in check_messages(messages):
            out += m["content"] if m["role"] == "assistant" or not out else "\n" + m["content"]
        return out

    def format_instruction(self, instruction: str, input: str = "") -> str:  # noqa: A002
        return instruction + (f"\n{input}" if input else "")


@dataclass
class HFChatTemplate(Template):
    """A Hugging Face ``chat_template`` (Jinja), rendered with transformers' own renderer when it imports,
    else with a sandboxed Jinja environment set up as transformers sets it up."""

    name: str = "hf_chat_template"
    add_bos: bool = False  # apply_chat_template's text carries whatever BOS the template writes
    chat_template: str = ""
    special_tokens: dict[str, str] = field(default_factory=dict)

    def format_chat(self, messages: Sequence[Message]) -> str:
        msgs = check_messages(messages)
        kwargs = {**self.special_tokens, "bos_token": self.bos_token, "eos_token": self.eos_token}
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            return _render_jinja(self.chat_template, msgs, **kwargs)
        rendered, _ = render_jinja_template([msgs], chat_template=self.chat_template,
                                            add_generation_prompt=True, **kwargs)
        return rendered[0]

    @classmethod
    def from_folder(cls, folder: str | Path) -> HFChatTemplate | None:
        """The chat template of a Hugging Face folder (``chat_template.jinja``, else ``tokenizer_config.json``'s
        ``chat_template``), with its BOS/EOS strings; None when it has none."""
        folder = Path(folder)
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            config = {}
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder / 'tokenizer_config.json'}: unreadable ({e}); fix or remove it") from e
        config = config if isinstance(config, dict) else {}
        source = folder / "chat_template.jinja"
        template = source.read_text(encoding="utf-8") if source.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str) or not template.strip():
            return None
        tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        tokens = {k: v for k, v in tokens.items() if v}
        bos, eos = tokens.get("bos_token", "<s>"), tokens.get("eos_token", "</s>")
        stop = [eos] + [t for t in _TURN_ENDS if t in template and t != eos]
        return cls(stop=stop, bos_token=bos, eos_token=eos, chat_template=template, special_tokens=tokens)


def _token_text(token) -> str | None:
    """A special token of ``tokenizer_config.json``: a string, or an AddedToken dict with ``content``."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _render_jinja(template: str, messages: list[dict[str, str]], **kwargs) -> str:
    """transformers' rendering without transformers: sandboxed, trim_blocks/lstrip_blocks, loop controls,
    ``raise_exception``, ``strftime_now`` and a ``tojson`` that does not escape HTML."""
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **kwargs)


TEMPLATES: dict[str, type[Template]] = {"instruct_stories": InstructStories, "alpaca": Alpaca,
                                        "llama2_chat": Llama2Chat, "hf_chat_template": HFChatTemplate,
                                        "plain": Plain}
META_FILES = ("llamalit.json", "llamalit_adapter.json")
# experiments of earlier runs that did not record their template
_EXPERIMENT_TEMPLATES = {"demo": "instruct_stories", "demo_lora": "instruct_stories",
                         "instruct_scratch": "instruct_stories", "instruct_lora": "instruct_stories",
                         "pretrain": "plain", "alpaca_qlora": "alpaca"}


def _folders(ckpt: Path) -> list[Path]:
    """Where a checkpoint's metadata lies: the folder itself, or for a file its folder and the one above
    (``RUN/checkpoints/last.ckpt``)."""
    return [ckpt] if ckpt.is_dir() else [ckpt.parent, ckpt.parent.parent]


def recorded_template(ckpt: str | Path) -> str | None:
    """The template name a run recorded (``template`` in ``llamalit.json`` / ``llamalit_adapter.json``), or for
    an earlier run without it, what its Hydra config's data (``.hydra/config.yaml``) or experiment name says."""
    for folder in _folders(Path(ckpt)):
        for name in META_FILES:
            try:
                meta = json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("template") in TEMPLATES:
                return meta["template"]
            if isinstance(meta, dict) and meta.get("experiment") in _EXPERIMENT_TEMPLATES:
                return _from_hydra_config(folder) or _EXPERIMENT_TEMPLATES[meta["experiment"]]
        if (found := _from_hydra_config(folder)) is not None:
            return found
    return None


def _from_hydra_config(folder: Path) -> str | None:
    path = folder / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(path)).get("data") or {}
        return prompt_format(data.get("kind"), data.get("format", "tinystories"))
    except (OSError, ValueError, AttributeError):
        return None


def template_for(ckpt: str | Path, override: str | None = None) -> Template:
    """The prompt format of a local checkpoint: ``override`` when given (a name of :data:`TEMPLATES`); else
    the one its run recorded (:func:`recorded_template`); else the ``chat_template`` of a
    ``tokenizer_config.json`` beside it; else ``plain``. A ValueError names an unknown name, or an
    ``hf_chat_template`` asked of a checkpoint without one."""
    ckpt = Path(ckpt)
    if override:
        if override not in TEMPLATES:
            raise ValueError(f"template={override!r}: unknown; use one of {', '.join(TEMPLATES)}")
        if override != "hf_chat_template":
            return TEMPLATES[override]()
        found = next((t for f in _folders(ckpt) if (t := HFChatTemplate.from_folder(f))), None)
        if found is None:
            raise ValueError(f"template=hf_chat_template: {ckpt} has no chat_template (no tokenizer_config.json "
                             "with one, nor chat_template.jinja); pick another template")
        return found
    if (name := recorded_template(ckpt)) is not None and name != "hf_chat_template":
        return TEMPLATES[name]()
    for folder in _folders(ckpt):
        if (found := HFChatTemplate.from_folder(folder)) is not None:
            return found
    return Plain()



__all__ = ["TEMPLATES", "Alpaca", "HFChatTemplate", "InstructStories", "Llama2Chat", "Plain", "StopScanner",
           "Template", "check_messages", "recorded_template", "stories_prompt", "template_for"]
