"""The Jinja chat templates render exactly what the Python prompt formats do (transformers' own renderer)."""

from __future__ import annotations

import pytest

from llamalit.inference.jinja_templates import JINJA_TEMPLATES
from llamalit.inference.templates import TEMPLATES, HFChatTemplate

CONVERSATIONS = [
    [{"role": "user", "content": "Name a color."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Name a color. "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello there "},
     {"role": "user", "content": "Tell me a story\nabout a cat."}],
]


@pytest.mark.parametrize("name", sorted(JINJA_TEMPLATES))
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_jinja_renders_as_the_python_format(name, messages):
    jinja = HFChatTemplate(chat_template=JINJA_TEMPLATES[name])
    assert jinja.format_chat(messages) == TEMPLATES[name]().format_chat(messages)
