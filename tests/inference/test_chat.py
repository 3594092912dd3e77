"""The chat session: the oldest turns go when the context fills (never past it), replies stream and are what
generate() gives, and ``python chat.py`` talks to a run a real training run made."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import llamalit.cli
import llamalit.inference.generate
from llamalit.data.tokenizer import Tokenizer
from llamalit.inference.chat import ChatSession, fit_messages, run_session
from llamalit.inference.generate import generate
from llamalit.inference.templates import TEMPLATES, template_for
from llamalit.model.llama import Llama, ModelConfig

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"temperature": 0.0, "top_k": None, "top_p": None, "max_new_tokens": 16, "seed": None}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_fit_messages_drops_whole_oldest_turns_and_keeps_the_system_message():
    msgs = [{"role": "system", "content": "s"}, user("aa"), bot("bb"), user("cc"), bot("dd"), user("ee")]
    count = lambda ms: sum(len(m["content"]) for m in ms)  # noqa: E731
    assert fit_messages(msgs, count, 100) == (msgs, 0)
    assert fit_messages(msgs, count, 7) == ([msgs[0], user("cc"), bot("dd"), user("ee")], 2)
    assert fit_messages(msgs, count, 4) == ([msgs[0], user("ee")], 4)
    assert fit_messages(msgs, count, 1) == ([msgs[0], user("ee")], 4)  # the last turn always stays
    assert fit_messages([user("x")], count, 0) == ([user("x")], 0)


def tiny_session(tok: Tokenizer, template: str, max_seq_len: int, **settings) -> tuple[ChatSession, io.StringIO,
                                                                                        io.StringIO]:
    torch.manual_seed(0)
    model = Llama(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=max_seq_len)).eval()
    out, info = io.StringIO(), io.StringIO()
    return ChatSession(model, tok, TEMPLATES[template](), {**SETTINGS, **settings}, out, info), out, info


@pytest.mark.parametrize("template", ["alpaca", "instruct_stories", "llama2_chat", "plain"])
def test_a_long_conversation_never_overflows_the_context(template, tiny_tokenizer, monkeypatch):
    seen = []
    real = llamalit.inference.chat.generate_stream

    def recording(model, ids, max_new, **kw):
        seen.append((len(ids), max_new))
        return real(model, ids, max_new, **kw)

    monkeypatch.setattr(llamalit.inference.chat, "generate_stream", recording)
    session, out, info = tiny_session(tiny_tokenizer, template, 256, max_new_tokens=60, stop_at_eos=False)
    for i in range(8):
        session.reply(f"Tell me about the little dog number {i} and the big red ball in the park.")
    assert len(seen) == 8 and all(n + new <= 256 and new >= 1 for n, new in seen)
    assert "oldest message(s) to fit 256 tokens]" in info.getvalue()
    assert info.getvalue().count("tokens/s]") == 8
    assert session.messages[-1]["role"] == "assistant" and len(session.messages) < 16
    # a message that cannot fit at all is refused with one line, and the session goes on
    session.reply("dog " * 400)
    assert "error: this message makes a prompt of" in info.getvalue() and len(seen) == 8
    session.reply("ball")
    assert len(seen) == 9


def test_replies_are_what_generate_gives_and_commands_work(tiny_tokenizer):
    tok = tiny_tokenizer
    session, out, info = tiny_session(tok, "instruct_stories", 256, max_new_tokens=24, stop_at_eos=False)
    template = session.template
    ids = template.encode(tok, template.format_chat([user("a cat and a ball")]))
    expected = tok.decode(generate(session.model, ids, 24, temperature=0.0)).strip()
    run_session(session, ["a cat and a ball", "/set temperature 0.7", "/set top_p 2", "/set nope 1", "/set x",
                          "/help", "/reset", "/exit", "never read"])
    assert out.getvalue().splitlines()[0] == expected
    assert session.settings["temperature"] == 0.7 and session.settings["top_p"] is None
    assert session.messages == []  # /reset
    notes = info.getvalue()
    for line in ("[temperature = 0.7]", "error: top_p=2: must be a number in (0, 1]", "error: /set nope: unknown",
                 "error: /set takes a key and a value", "commands: /reset", "[conversation reset]"):
        assert line in notes


# ----- a real run: train the demo two steps, then talk to it with chat.py in a terminal-like subprocess -----
TINY_DEMO = ["experiment=demo", "logger=none", "trainer.accelerator=cpu", "trainer.enable_model_summary=false",
             "data.batch_size=4", "data.num_workers=1", "data.loader_workers=0", "data.n_shards=2",
             "data.stories_per_shard=60", "data.tokenizer=train:384", "model=tiny", "model.max_seq_len=256",
             "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
             "evaluation.adherence_n=1", "evaluation.max_new_tokens=4", "callbacks.samples.max_new_tokens=4"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    from llamalit.training.run import train

    root = tmp_path_factory.mktemp("demo")
    with initialize_config_dir(config_dir=llamalit.cli.CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*TINY_DEMO, f"paths.cache_dir={root / 'cache'}", f"run_dir={root / 'run'}"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(before)
    return root / "run"


@pytest.mark.slow
def test_chat_py_talks_to_a_trained_run(demo_run, tmp_path):
    assert json.loads((demo_run / "llamalit.json").read_text())["template"] == "instruct_stories"
    assert template_for(demo_run).name == "instruct_stories"  # recorded by the run: no user input
    prompt = 'In the story, try to use the verb "jump", the noun "ball" and the adjective "happy".'
    from llamalit.checkpoints import find_tokenizer, load_checkpoint

    model, tok = load_checkpoint(demo_run).eval(), Tokenizer(find_tokenizer(demo_run))
    template = template_for(demo_run)
    ids = template.encode(tok, template.format_chat([user(prompt)]))
    new = generate(model, ids, 30, temperature=0.0, eos_id=tok.eos_id)
    expected = tok.decode([t for t in new if t != tok.eos_id]).strip()
    res = subprocess.run(
        [sys.executable, str(ROOT / "chat.py"), f"ckpt={demo_run}", "temperature=0", "max_new_tokens=30",
         "device=cpu"], input=f"{prompt}\n/reset\n{prompt}\n/exit\n", capture_output=True, text=True,
        cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(f">> {expected}\n") == 2, res.stdout  # the same greedy reply before and after /reset
    assert "template instruct_stories" in res.stderr and "[conversation reset]" in res.stderr
    assert res.stderr.count("tokens/s]") == 2
    assert list(tmp_path.iterdir()) == []  # Hydra left nothing behind


def test_chat_py_rejects_a_bad_setting_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "chat.py"), f"ckpt={tmp_path}", "template=chatml"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, input="")
    assert res.returncode == 1
    assert res.stderr.splitlines()[0] == ("error: template='chatml': unknown; use one of instruct_stories, alpaca, "
                                          "llama2_chat, hf_chat_template, plain")
