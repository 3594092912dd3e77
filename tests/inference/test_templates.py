"""Prompt formats: golden strings, the same ids as the training data, Hugging Face chat templates rendered as
transformers renders them, and the template a checkpoint says it was trained with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llamalit.checkpoints.run_export import export_weights
from llamalit.data.pretokenize import instruct_rows
from llamalit.data.text_formats import alpaca_pair, read_records, tinystories_pair
from llamalit.data.tokenizer import Tokenizer
from llamalit.inference.templates import (
    TEMPLATES,
    HFChatTemplate,
    StopScanner,
    template_for,
)
from llamalit.model.llama import Llama, ModelConfig

MESSAGES = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a story."}]
# meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json chat_template
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_golden_strings():
    t = {name: cls() for name, cls in TEMPLATES.items() if name != "hf_chat_template"}
    assert t["instruct_stories"].format_chat(MESSAGES) == (
        "Write a story. Hi there Possible story:<s>Hello!</s>Write a story. Tell me a story. Possible story:<s>")
    assert t["instruct_stories"].format_instruction(
        'Write a story. In the story, try to use the verb "jump". Possible story:') == (
        'Write a story. In the story, try to use the verb "jump". Possible story:<s>')
    head = "Below is an instruction that describes a task"
    assert t["alpaca"].format_chat(MESSAGES) == (
        f"{head}. Write a response that appropriately completes the request.\n\n### Instruction:\nBe kind.\n\n"
        f"Hi there\n\n### Response:\nHello!</s><s>{head}. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nTell me a story.\n\n### Response:\n")
    assert t["alpaca"].format_instruction("Add them.", "1 2") == (
        f"{head}, paired with an input that provides further context. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd them.\n\n### Input:\n1 2\n\n### Response:\n")
    assert t["llama2_chat"].format_chat(MESSAGES) == (
        "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] Tell me a story. [/INST]")
    assert t["llama2_chat"].format_instruction("Add them.", "1 2") == "<s>[INST] Add them.\n\n1 2 [/INST]"
    assert t["plain"].format_chat(MESSAGES) == "Be kind.\nHi thereHello!\nTell me a story."
    assert t["plain"].format_instruction("Once upon a time") == "Once upon a time"
    assert [t[n].add_bos for n in ("instruct_stories", "alpaca", "llama2_chat", "plain")] == [False, True, False, True]
    with pytest.raises(ValueError, match="alternating"):
        t["llama2_chat"].format_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        t["plain"].format_chat([{"role": "robot", "content": "a"}])
    with pytest.raises(ValueError, match="empty"):
        t["alpaca"].format_chat([])


def test_instruct_stories_prompt_gives_the_ids_of_the_training_rows(synthetic_corpus, tiny_tokenizer):
    """A TinyStories prompt through the template encodes to exactly the head of its pretokenized row."""
    tok, template = tiny_tokenizer, TEMPLATES["instruct_stories"]()
    for i, record in enumerate(read_records(synthetic_corpus[0])[:20]):
        pair = tinystories_pair(record, synthetic_corpus[0], i)
        tokens, _, _ = instruct_rows(tok, [pair], 256)
        ids = template.encode(tok, template.format_instruction(record["instruction"]["prompt:"]))
        assert ids[-1] == tok.bos_id and tokens[0, :len(ids)].tolist() == ids
        story = tok.encode(pair[1], bos=False) + [tok.eos_id]
        assert tokens[0, len(ids):len(ids) + len(story)].tolist() == story


def test_alpaca_prompt_gives_the_ids_of_the_training_rows(tiny_tokenizer, tmp_path):
    tok, template = tiny_tokenizer, TEMPLATES["alpaca"]()
    records = [{"instruction": "Name a color.", "input": "", "output": "Red."},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    for i, r in enumerate(records):
        tokens, _, _ = instruct_rows(tok, [alpaca_pair(r, tmp_path / "a.json", i)], 256, fmt="alpaca")
        ids = template.encode(tok, template.format_instruction(r["instruction"], r["input"]))
        assert ids[0] == tok.bos_id and tokens[0, :len(ids)].tolist() == ids
        # the history of a finished turn is what training saw: the response and EOS after the prompt
        turn = template.encode(tok, template.format_chat([{"role": "user", "content": r["instruction"]},
                                                          {"role": "assistant", "content": r["output"]}]))
        if not r["input"]:
            assert turn == tokens[0, :len(turn)].tolist() and turn[-1] == tok.eos_id


@pytest.fixture(scope="module")
def llama_like_tokenizer(synthetic_corpus, tmp_path_factory) -> Path:
    """A SentencePiece BPE with Llama 2's normalizer settings (dummy prefix, whitespace kept), as HF expects."""
    out = tmp_path_factory.mktemp("llama_tok")
    text = out / "corpus.txt"
    text.write_text("\n".join(r["story"] for f in synthetic_corpus for r in read_records(f)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out / "tokenizer"), model_type="bpe",
                                   vocab_size=400, byte_fallback=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", num_threads=1, minloglevel=2)
    return out / "tokenizer.model"


def hf_dir(folder: Path, tokenizer: Path, chat_template: str, as_file: bool = False) -> Path:
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "unk_token": "<unk>", "legacy": True,
              "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "__type": "AddedToken"}, "add_bos_token": True}
    if as_file:  # what transformers >= 4.43 writes
        (folder / "chat_template.jinja").write_text(chat_template)
    else:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name,chat_template,as_file", [("llama2", LLAMA2_CHAT_TEMPLATE, False),
                                                        ("chatml", CHATML_TEMPLATE, True)])
def test_hf_chat_template_renders_and_encodes_as_transformers(name, chat_template, as_file, llama_like_tokenizer,
                                                             tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    folder = hf_dir(tmp_path / name, llama_like_tokenizer, chat_template, as_file)
    hf = AutoTokenizer.from_pretrained(str(folder))
    template = template_for(folder)
    assert isinstance(template, HFChatTemplate) and template.name == "hf_chat_template"
    assert template.bos_token == "<s>" and template.eos_token == "</s>"
    for messages in (MESSAGES, MESSAGES[1:2], MESSAGES[1:]):
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert template.format_chat(messages) == text
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert template.encode(Tokenizer(llama_like_tokenizer), text) == list(ids)
        if name == "llama2":
            assert TEMPLATES["llama2_chat"]().format_chat(messages) == text
        monkeypatch.setitem(sys.modules, "transformers.utils.chat_template_utils", None)  # the jinja2 fallback
        assert template.format_chat(messages) == text
        monkeypatch.undo()
    if name == "chatml":
        assert template.stop == ["</s>", "<|im_end|>"]


def test_stop_scanner_holds_back_a_partial_stop_string():
    s = StopScanner(["### Instruction:"])
    assert [s.push(x) for x in ["abc ##", "# Ins", "x", " ### Instr", "uction: more"]] == ["abc ", "", "### Insx",
                                                                                           " ", ""]
    assert s.stopped and s.push("late") == "" and s.flush() == ""
    s = StopScanner(["[INST]"])
    assert s.push("a [IN") == "a " and s.flush() == "[IN" and not s.stopped


def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig.preset("tiny", vocab_size=512))


@pytest.mark.parametrize("kind,fmt,lora,expected", [
    ("instruct", "tinystories", False, "instruct_stories"), ("instruct", "tinystories", True, "instruct_stories"),
    ("instruct", "alpaca", True, "alpaca"), ("instruct", "dolly", False, "alpaca"),
    ("pretrain", "tinystories", False, "plain")])
def test_a_run_export_records_its_template(kind, fmt, lora, expected, tiny_tokenizer, tmp_path):
    """export_weights (what train() calls) writes the template its data taught; template_for finds it."""
    from llamalit.checkpoints import save_model
    from llamalit.model.lora import LoraConfig, apply_lora

    cfg = {"experiment_name": "x", "data": {"kind": kind, "format": fmt}, "lora": {"enabled": lora}}
    model = tiny_model()
    if lora:
        base = save_model(model, tmp_path / "base", extra={"tokenizer": str(tiny_tokenizer.path)})
        lora_cfg = LoraConfig(rank=2, alpha=4, dropout=0.0)
        cfg.update(init_from=str(base), lora={"enabled": True, **lora_cfg.to_dict()})
        apply_lora(model, lora_cfg)
    export_weights(model, tmp_path / "run", str(tiny_tokenizer.path), cfg)
    meta = "llamalit_adapter.json" if lora else "llamalit.json"
    assert json.loads((tmp_path / "run" / meta).read_text())["template"] == expected
    assert template_for(tmp_path / "run").name == expected
    from llamalit.checkpoints import load_checkpoint

    assert load_checkpoint(tmp_path / "run").cfg == model.cfg  # the new field does not disturb loading
    (tmp_path / "run" / "checkpoints").mkdir()  # a Lightning checkpoint inside the run directory
    assert template_for(tmp_path / "run" / "checkpoints" / "last.ckpt").name == expected


def test_template_for_earlier_runs_overrides_and_fallbacks(tiny_tokenizer, tmp_path, llama_like_tokenizer):
    from llamalit.checkpoints import save_model

    run = save_model(tiny_model(), tmp_path / "old", extra={"tokenizer": str(tiny_tokenizer.path)})
    assert template_for(run).name == "plain"  # nothing says: continuation
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("data:\n  kind: instruct\n  format: dolly\n")
    assert template_for(run).name == "alpaca"  # an earlier run: its Hydra config's data says
    (run / ".hydra" / "config.yaml").unlink()
    meta = json.loads((run / "llamalit.json").read_text())
    (run / "llamalit.json").write_text(json.dumps({**meta, "experiment": "demo"}))
    assert template_for(run).name == "instruct_stories"  # or its experiment
    assert template_for(run, "llama2_chat").name == "llama2_chat"  # override wins
    with pytest.raises(ValueError, match="template='chatml': unknown; use one of instruct_stories, alpaca"):
        template_for(run, "chatml")
    with pytest.raises(ValueError, match="has no chat_template"):
        template_for(run, "hf_chat_template")
    hf = hf_dir(tmp_path / "hf", llama_like_tokenizer, LLAMA2_CHAT_TEMPLATE)
    assert template_for(hf).name == "hf_chat_template" and template_for(hf, "plain").name == "plain"
    (hf / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: unreadable"):
        template_for(hf)
