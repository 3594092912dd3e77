"""Adherence evaluation: held-out records, the prompt plumbing (same ids as the instruct shards), scoring, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamalit.checkpoints.native import save_model
from llamalit.data.pretokenize import instruct_rows
from llamalit.data.synthetic import make_corpus
from llamalit.data.text_formats import DataFormatError, read_records, shorten_prompt
from llamalit.data.tokenizer import Tokenizer, train_tokenizer
from llamalit.inference import evaluation
from llamalit.inference.adherence import score_story
from llamalit.inference.evaluation import evaluate_adherence, held_out_records, instruction_prompt, prompt_ids
from llamalit.model.llama import Llama, ModelConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, n_shards=2, stories_per_shard=60, seed=0)
    return out


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory) -> Tokenizer:
    texts = [f"{shorten_prompt(r['instruction']['prompt:'])}\n{r['story']}" for r in read_records(corpus / "data01.json")]
    return Tokenizer(train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok") / "tok.model", num_threads=1))


@pytest.fixture(scope="module")
def model(tok) -> Llama:
    torch.manual_seed(0)
    return Llama(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256)).eval()


def test_held_out_records_come_from_data00_seeded(corpus):
    val = read_records(corpus / "data00.json")
    a = held_out_records(corpus, n=10, seed=1)
    assert len(a) == 10 and all(r in val for r in a)
    assert a == held_out_records(corpus, n=10, seed=1)
    assert a != held_out_records(corpus, n=10, seed=2)
    assert [val.index(r) for r in a] == sorted(val.index(r) for r in a)  # file order
    assert held_out_records(corpus, n=None) == val
    assert held_out_records(corpus, n=1000) == val
    assert held_out_records(corpus / "data00.json", n=None) == val  # a file works too


def test_held_out_records_from_data_configs(corpus, tmp_path):
    base = {"kind": "instruct", "format": "tinystories", "tokenizer": "train:300", "seq_len": 256,
            "dir": str(tmp_path / "shards")}
    val = read_records(corpus / "data00.json")
    assert held_out_records({**base, "source": str(corpus)}, n=None) == val
    synthetic = {**base, "source": "synthetic", "n_shards": 2, "stories_per_shard": 7, "seed": 3}
    got = held_out_records(synthetic, n=None, cache_dir=tmp_path / "cache")
    expected = read_records(make_corpus(tmp_path / "ref", 2, 7, seed=3)[0])
    assert got == expected
    with pytest.raises(ValueError, match="TinyStories-format"):
        held_out_records({**base, "format": "alpaca", "source": str(corpus)})


def test_malformed_record_names_file_and_record(tmp_path):
    (tmp_path / "data00.json").write_text(json.dumps([{"story": "x", "instruction": {"prompt:": "p"}},
                                                      {"story": "no instruction"}]))
    with pytest.raises(DataFormatError, match=r"data00\.json: record 1 has no 'instruction'"):
        held_out_records(tmp_path, n=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no data00\.json"):
        held_out_records(tmp_path / "empty", n=None)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        held_out_records(tmp_path / "missing", n=None)


def test_prompt_ids_match_the_instruct_shards(corpus, tok):
    """The evaluation prompt is exactly the prompt part of an instruct training row, BOS next."""
    records = read_records(corpus / "data00.json")[:5]
    pairs = [(instruction_prompt(r), r["story"].strip()) for r in records]
    tokens, labels, dropped = instruct_rows(tok, pairs, seq_len=512)
    assert dropped == 0
    for r, row, lab in zip(records, tokens, labels):
        ids = prompt_ids(tok, instruction_prompt(r))
        n_prompt = int((lab != -100).argmax())  # first position counted in the loss: BOS
        assert row[:n_prompt].tolist() == ids[:-1]  # prompt tokens, no BOS in front
        assert row[n_prompt] == tok.bos_id == ids[-1]  # then BOS, where the story begins
        assert instruction_prompt(r).startswith("Write a story.") and instruction_prompt(r).endswith("Possible story:")


def test_pipeline_runs_on_a_random_model(corpus, tok, model):
    records = held_out_records(corpus, n=6, seed=0)
    res = evaluate_adherence(model, tok, records, max_new_tokens=6, batch_size=4)
    assert res["n_stories"] == 6 and res["skipped"] == 0
    assert 0.0 <= res["adherence"] <= 1.0 and 0.0 <= res["word_recall"] <= 1.0
    assert 0 < res["new_tokens"] <= 6 * 6
    assert len(res["examples"]) == 3 and res["examples"][0]["words"] == records[0]["instruction"]["words"]
    # Greedy: batching prompts of equal length does not change the stories (float64 model).
    m64 = Llama(model.cfg).double().eval()
    m64.load_state_dict(model.state_dict())
    one = evaluate_adherence(m64, tok, records, max_new_tokens=6, batch_size=1, n_examples=6)
    many = evaluate_adherence(m64, tok, records, max_new_tokens=6, batch_size=6, n_examples=6)
    assert [e["story"] for e in one["examples"]] == [e["story"] for e in many["examples"]]
    # limit, and prompts longer than the context are skipped, not crashed on
    short = Llama(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=8)).eval()
    res = evaluate_adherence(short, tok, records, max_new_tokens=4, limit=2)
    assert res["skipped"] == 2 and res["n_stories"] == 0 and res["settings"]["n_records"] == 2


def _echo_generate(tok, records, story_of):
    """A fake ``generate`` that recognises each prompt by its exact token ids and returns a story for it."""
    expected = {tuple(tok.encode(shorten_prompt(r["instruction"]["prompt:"]), bos=False) + [tok.bos_id]): r
                for r in records}
    calls = []

    def fake(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, seed=None):
        assert eos_id == tok.eos_id and temperature == 0.0
        batched = isinstance(prompts[0], list)
        rows = prompts if batched else [prompts]
        calls.append(len(rows))
        outs = [tok.encode(story_of(expected[tuple(p)]), bos=False) for p in rows]  # KeyError: wrong prompt ids
        return outs if batched else outs[0]

    return fake, calls


def test_echo_model_scores_one_and_silent_model_zero(corpus, tok, model, monkeypatch):
    """With a 'model' that writes the reference story, adherence is exactly 1; without the words, 0."""
    records = [r for r in read_records(corpus / "data00.json") if "Foreshadowing" not in r["instruction"]["features"]]
    records = records[:12]
    assert any(r["instruction"]["features"] for r in records)
    fake, calls = _echo_generate(tok, records, lambda r: r["story"])
    monkeypatch.setattr(evaluation, "generate", fake)
    res = evaluate_adherence(model, tok, records, max_new_tokens=50, batch_size=4)
    assert res["n_stories"] == 12 and res["adherence"] == 1.0 and res["word_recall"] == 1.0
    assert res["feature_rate"] == 1.0 and sum(calls) == 12 and max(calls) > 1  # batched and single calls

    silent, _ = _echo_generate(tok, records, lambda r: "The end.")
    monkeypatch.setattr(evaluation, "generate", silent)
    res = evaluate_adherence(model, tok, records, max_new_tokens=50)
    assert res["word_recall"] == 0.0 and res["examples"][0]["words_missing"] == records[0]["instruction"]["words"]


def test_synthetic_reference_stories_show_foreshadowing(corpus):
    records = [r for r in read_records(corpus / "data00.json") if "Foreshadowing" in r["instruction"]["features"]]
    assert records
    assert all(score_story(r["story"], r["instruction"]["words"], r["instruction"]["features"])["adherence"] == 1.0
               for r in records)


@pytest.mark.slow
def test_cli_writes_table_and_json(corpus, tok, model, tmp_path):
    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt, extra={"tokenizer": str(tok.path)})
    out = tmp_path / "adherence.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), f"ckpt={ckpt}", f"source={corpus}", "n=3",
         "max_new_tokens=5", "device=cpu", f"out={out}", f"paths.cache_dir={tmp_path / 'cache'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "adherence" in proc.stdout and "word_recall" in proc.stdout
    result = json.loads(out.read_text())
    assert result["n_stories"] == 3 and result["tokenizer"] == str(tok.path)
    assert result["settings"]["max_new_tokens"] == 5 and len(result["examples"]) == 3


def test_run_evaluate_finds_the_checkpoints_tokenizer(corpus, tok, model, tmp_path):
    """The CLI's body without Hydra: tokenizer named in config.json, table printed, JSON written."""
    import io

    from llamalit.cli.evaluate import run_evaluate

    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt, extra={"tokenizer": str(tok.path)})
    buf, out = io.StringIO(), tmp_path / "r.json"
    cfg = {"ckpt": str(ckpt), "source": str(corpus), "n": 2, "max_new_tokens": 4, "device": "cpu",
           "out": str(out), "paths": {"cache_dir": str(tmp_path / "cache")}, "data": {"name": "synthetic"}}
    result = run_evaluate(cfg, out=buf)
    assert result["n_stories"] == 2 and json.loads(out.read_text())["n_stories"] == 2
    assert "word_recall" in buf.getvalue() and f"wrote {out}" in buf.getvalue()
    wrong = Llama(ModelConfig.preset("tiny", vocab_size=tok.vocab_size + 1))
    save_model(wrong, tmp_path / "wrong", extra={"tokenizer": str(tok.path)})
    with pytest.raises(ValueError, match="401"):
        run_evaluate({**cfg, "ckpt": str(tmp_path / "wrong")}, out=io.StringIO())


@pytest.mark.parametrize("path", ["kernel", "fused-step", "model-forward"])
def test_left_padded_batches_give_each_prompt_its_greedy_story_alone(corpus, tok, model, path, monkeypatch):
    """The batched path the training device takes (prompts of any length in one KV-cached batch, left-padded)
    produces exactly the tokens of generating each prompt alone, EOS stops and per-row limits included: with the
    compiled CPU kernel (fp32; per-row RoPE positions and first visible key), with the fused decode step
    (float64) and with the model's own forward (what LoRA-wrapped layers get)."""
    from collections import Counter

    import llamalit.inference.evaluation as evaluation
    from llamalit.inference.decode import decode_weights
    from llamalit.inference.evaluation import generate_left_padded
    from llamalit.inference.generate import generate
    from llamalit.inference.kernels import DecodeKernel, load_decode_kernel

    calls = Counter()
    if path == "model-forward":
        monkeypatch.setattr(evaluation, "decode_weights", lambda model, kernel=None: None)
    elif path == "kernel":
        if load_decode_kernel() is None:
            pytest.skip("the decode kernel does not build here")
        monkeypatch.setattr(evaluation, "decode_weights", lambda model, kernel=None: decode_weights(model, True))
        for name in ("step", "greedy"):
            real = getattr(DecodeKernel, name)
            monkeypatch.setattr(DecodeKernel, name, lambda self, *a, _real=real, _name=name, **kw: (
                calls.update([_name]), _real(self, *a, **kw))[1])

    m64 = Llama(model.cfg).to(torch.float32 if path == "kernel" else torch.float64).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # wide weights: a random tiny model at init repeats its input token
        for p in m64.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    prompts = [prompt_ids(tok, instruction_prompt(r)) for r in held_out_records(corpus, n=5, seed=1)]
    assert len({len(p) for p in prompts}) > 2  # lengths differ: padding is exercised
    steps = [9, 4, 9, 7, 9]
    free = [generate(m64, p, n, temperature=0.0) for p, n in zip(prompts, steps)]
    eos = Counter(t for row in free for t in row[1:]).most_common(1)[0][0]  # a token several rows emit
    alone = [generate(m64, p, n, temperature=0.0, eos_id=eos) for p, n in zip(prompts, steps)]
    assert sum(len(a) < n for a, n in zip(alone, steps)) >= 2  # rows stop at EOS at different steps
    assert generate_left_padded(m64, prompts, steps, eos_id=None) == free
    assert generate_left_padded(m64, prompts, steps, eos_id=eos) == alone
    if path == "kernel":
        assert calls["greedy"] > 0
        sampled = [generate_left_padded(m64, prompts, steps, 0.8, 20, eos, torch.Generator().manual_seed(3))
                   for _ in range(2)]
        assert calls["step"] > 0 and sampled[0] == sampled[1]
        monkeypatch.setattr(evaluation, "decode_weights", lambda model, kernel=None: decode_weights(model, False))
        assert generate_left_padded(m64, prompts, steps, 0.8, 20, eos, torch.Generator().manual_seed(3)) == sampled[0]
    padded = evaluate_adherence(m64, tok, held_out_records(corpus, n=6, seed=0), max_new_tokens=8, batch_size=6,
                                n_examples=6, batching="padded")
    by_length = evaluate_adherence(m64, tok, held_out_records(corpus, n=6, seed=0), max_new_tokens=8,
                                   batch_size=1, n_examples=6, batching="length")
    assert [e["story"] for e in padded["examples"]] == [e["story"] for e in by_length["examples"]]
    with pytest.raises(ValueError, match="batching='nope'"):
        evaluate_adherence(m64, tok, [], batching="nope")
