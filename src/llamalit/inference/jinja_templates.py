"""The prompt formats of :mod:`llamalit.inference.templates` as Jinja chat templates (what a Hugging Face
``tokenizer_config.json`` or a GGUF's ``tokenizer.chat_template`` holds), for the formats Jinja can express
exactly: ``llama2_chat`` (Meta's template, as its Hugging Face tokenizer ships it) and ``alpaca``.
``instruct_stories`` shortens dataset prompts in Python and ``plain`` is continuation: neither has one.
The tests render each with transformers' renderer and compare with ``Template.format_chat``."""

from __future__ import annotations

__all__ = ["JINJA_TEMPLATES", "jinja_template"]

LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

ALPACA = (
    "{%- set ns = namespace(started=false, system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = (ns.system + '\\n\\n' + m['content'].strip()).strip() -%}"
    "{%- elif m['role'] == 'user' -%}"
    "{%- set text = (ns.system + '\\n\\n' + m['content'].strip()).strip() if ns.system else m['content'] -%}"
    "{%- if ns.started -%}{{ bos_token }}{%- endif -%}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\\n\\n### Instruction:\\n' + text.strip() + '\\n\\n### Response:\\n' }}"
    "{%- set ns.system = '' -%}{%- set ns.started = true -%}"
    "{%- else -%}{{ m['content'].strip() + eos_token }}{%- set ns.started = true -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

JINJA_TEMPLATES = {"llama2_chat": LLAMA2_CHAT, "alpaca": ALPACA}


def jinja_template(name: str) -> str | None:
    """The Jinja chat template of the prompt format ``name`` (None where Jinja cannot express it)."""
    return JINJA_TEMPLATES.get(name)
