"""Our lm-eval model against the harness's own HFLM on the Hugging Face export of the same model (our run
directory IS one): per-request log-likelihoods, greedy generations and task metrics, on local tasks written here."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llamalit.checkpoints.run_export import copy_export, export_weights  # noqa: E402
from llamalit.data.text_formats import read_records  # noqa: E402
from llamalit.inference.harness import LlamalitLM  # noqa: E402
from llamalit.inference.harness_run import write_our_task  # noqa: E402
from llamalit.model.llama import Llama, ModelConfig  # noqa: E402

LORA = {"enabled": True, "rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["wq", "wk", "wv", "wo"]}


def trained(tokenizer, records: list[dict], steps: int = 60, seed: int = 0) -> Llama:
    """A tiny model trained briefly on the stories, so that its greedy continuations differ from prompt to
    prompt and reach stop strings (a random one repeats a token)."""
    torch.manual_seed(seed)
    model = Llama(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size))
    ids = torch.tensor([t for r in records for t in tokenizer.encode(r["story"], bos=True, eos=True)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    width = 64
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - width - 1, (16,))
        rows = torch.stack([ids[s:s + width + 1] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def write_tasks(folder: Path, records: list[dict]) -> list[str]:
    """A multiple-choice task (the story's second sentence among others) and a generation task (continue
    a story's first words), as YAML + jsonl."""
    rng = random.Random(0)
    sentences = [r["story"].split(". ") for r in records]
    with open(folder / "mc.jsonl", "w") as f:
        for s in sentences[:24]:
            choices = [s[1] if len(s) > 1 else s[0]] + [rng.choice(other) for other in rng.sample(sentences, 3)]
            rng.shuffle(choices)
            f.write(json.dumps({"question": s[0] + ".", "choices": choices, "answer": choices.index(
                s[1] if len(s) > 1 else s[0])}) + "\n")
    with open(folder / "gen.jsonl", "w") as f:
        for r in records[30:46]:
            words = r["story"].split()
            f.write(json.dumps({"prompt": " ".join(words[:10]), "target": " ".join(words[10:12])}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "toy_mc.yaml").write_text(
        f"task: toy_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (folder / "toy_gen.yaml").write_text(
        f"task: toy_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['.', ',']\n  max_gen_toks: 20\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return ["toy_mc", "toy_gen"]


@pytest.fixture(scope="module")
def setup(synthetic_corpus, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    records = read_records(synthetic_corpus[0])
    tasks = root / "tasks"
    tasks.mkdir()
    names = write_tasks(tasks, records)
    write_our_task("tinystories_perplexity", records[:6], root / "data", tasks)
    files = export_weights(trained(tiny_tokenizer, records), root / "run", str(tiny_tokenizer.path),
                           {"experiment_name": "demo"})
    copy_export(files, root / "base")
    return {"root": root, "run": root / "run", "base": root / "base", "tasks": tasks, "names": names,
            "manager": TaskManager(include_path=str(tasks), include_defaults=False)}


def evaluate(model, setup, tasks) -> dict:
    return simple_evaluate(model=model, tasks=tasks, task_manager=setup["manager"], log_samples=True,
                           bootstrap_iters=0)


def hflm(path: Path, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), device="cpu", batch_size=4, dtype="float32", **kw)


@pytest.fixture(scope="module")
def both(setup):
    ours = evaluate(LlamalitLM.from_checkpoint(setup["run"], device="cpu", batch_size=4), setup, setup["names"])
    theirs = evaluate(hflm(setup["run"]), setup, setup["names"])
    return ours, theirs


def test_loglikelihoods_match_hflm_per_request(both):
    ours, theirs = both
    pairs = [(a["resps"], b["resps"]) for a, b in zip(ours["samples"]["toy_mc"], theirs["samples"]["toy_mc"])]
    assert len(pairs) == 24
    for ra, rb in pairs:
        assert len(ra) == len(rb) == 4
        for (ll_a, greedy_a), (ll_b, greedy_b) in ((x[0], y[0]) for x, y in zip(ra, rb)):
            assert abs(ll_a - ll_b) < 1e-4
            assert greedy_a == greedy_b


def test_greedy_generations_match_hflm(both):
    ours, theirs = both
    gens_a = [s["resps"][0][0] for s in ours["samples"]["toy_gen"]]
    gens_b = [s["resps"][0][0] for s in theirs["samples"]["toy_gen"]]
    assert gens_a == gens_b
    assert all(gens_a)  # the model writes words, not EOS at once
    assert any(len(g.split()) < 12 for g in gens_a)  # some stopped at a stop string before max_gen_toks


def test_task_metrics_match_hflm(both):
    ours, theirs = both
    for task in ("toy_mc", "toy_gen"):
        a, b = ours["results"][task], theirs["results"][task]
        keys = [k for k in a if "," in k and "stderr" not in k]
        assert keys and {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_rolling_perplexity_matches_hflm_without_bos(setup):
    """Rolling windows of the model's context (stories longer than it), each scored as HFLM scores them
    when it adds no BOS to the text (the first window conditions on BOS either way)."""
    ours = evaluate(LlamalitLM.from_checkpoint(setup["run"], device="cpu", batch_size=3), setup,
                    ["tinystories_perplexity"])
    theirs = evaluate(hflm(setup["run"], add_bos_token=False), setup, ["tinystories_perplexity"])
    lls = [(a["resps"][0][0], b["resps"][0][0]) for a, b in zip(ours["samples"]["tinystories_perplexity"],
                                                                 theirs["samples"]["tinystories_perplexity"])]
    assert len(lls) == 6
    for a, b in lls:
        assert abs(a - b) < 1e-3 and abs(a - b) / abs(b) < 1e-6
    r = ours["results"]["tinystories_perplexity"]
    assert math.isfinite(r["word_perplexity,none"]) and r["bits_per_byte,none"] > 0


def test_long_texts_span_several_windows(setup):
    """A text over two contexts long: the sum of its windows, each token predicted once, from the tokens before
    it (BOS before the first) back to the start of its window; the last window reaches back a full context."""
    lm = LlamalitLM.from_checkpoint(setup["run"], device="cpu", batch_size=2)
    text = "Lily went to the park with her red ball, and Tom said: \"Let us play!\" " * 30
    tokens = lm.tok_encode(text, add_special_tokens=False)
    length = lm.max_length
    assert len(tokens) > 2 * length

    class Req:
        args = (text,)

    (total,) = lm.loglikelihood_rolling([Req()])
    expect, shifted = 0.0, [lm.tok.bos_id, *tokens]
    with torch.no_grad():
        for p in range(0, len(tokens), length):
            pred, end = tokens[p:p + length], min(p + length, len(tokens))  # the last window sees a full context
            logp = torch.log_softmax(lm.model(torch.tensor([shifted[max(0, end - length):end]])), -1)[0, -len(pred):]
            expect += float(logp.gather(1, torch.tensor(pred)[:, None]).sum())
    assert abs(total - expect) < 1e-3


def test_lora_adapter_run_is_applied_and_changes_scores(setup, tiny_tokenizer):
    from llamalit.checkpoints import load_checkpoint
    from llamalit.model.lora import LoraConfig, apply_lora

    model = apply_lora(load_checkpoint(setup["base"]), LoraConfig.from_dict(LORA))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)
    adapter_run = setup["root"] / "lora_run"
    export_weights(model.eval(), adapter_run, str(tiny_tokenizer.path),
                   {"experiment_name": "demo_lora", "lora": LORA, "init_from": str(setup["base"])})
    assert not (adapter_run / "model.safetensors").exists()  # the adapter alone
    lm = LlamalitLM.from_checkpoint(adapter_run, device="cpu", batch_size=4)
    base = evaluate(LlamalitLM.from_checkpoint(setup["base"], device="cpu", batch_size=4), setup, ["toy_mc"])
    tuned = evaluate(lm, setup, ["toy_mc"])
    lls = lambda r: [x[0][0] for s in r["samples"]["toy_mc"] for x in s["resps"]]  # noqa: E731
    diffs = [abs(a - b) for a, b in zip(lls(base), lls(tuned))]
    assert min(diffs) > 1e-3  # every score moved
    with torch.no_grad():  # and they are the merged model's
        tokens = torch.tensor([lm.tok_encode("Lily went to the park.")])
        torch.testing.assert_close(lm.model(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def test_sampled_generation_follows_the_seed_and_max_gen_toks(setup):
    lm = LlamalitLM.from_checkpoint(setup["run"], device="cpu", batch_size=4)

    class Req:
        def __init__(self, text):
            self.args, self.task_name, self.doc_id = (text, {"do_sample": True, "temperature": 1.0,
                                                             "max_gen_toks": 6, "until": []}), "t", 0

    reqs = [Req("Lily went to the"), Req("Once upon a time")] * 2
    torch.manual_seed(1)
    first = lm.generate_until(reqs)
    torch.manual_seed(1)
    assert lm.generate_until(reqs) == first
    torch.manual_seed(2)
    assert lm.generate_until(reqs) != first
    assert all(len(lm.tok_encode(t, add_special_tokens=False)) <= 7 for t in first)


def test_instruct_form_encodes_as_the_instruct_shards(setup, tiny_tokenizer):
    """``prompt<s>`` is the prompt without BOS, then BOS, as llamalit.inference.evaluation.prompt_ids; plain text gets BOS."""
    from llamalit.inference.evaluation import prompt_ids

    lm = LlamalitLM.from_checkpoint(setup["run"], device="cpu")
    prompt = "Write a story. In the story, try to use the verb \"jump\"."
    assert lm.tok_encode(prompt + "<s>") == prompt_ids(tiny_tokenizer, prompt)
    assert lm.tok_encode(prompt) == tiny_tokenizer.encode(prompt, bos=True)
    assert lm.tok_encode(prompt, add_special_tokens=False) == tiny_tokenizer.encode(prompt, bos=False)
